"""Guest memory as the back end sees it: the regions of SET_MEM_TABLE, mmapped.

A vhost-user front end shares guest RAM by passing one fd per region.  Each region
is known by three addresses (vhost-user.rst, "Memory region description"):

* ``guest_phys_addr`` -- where the guest sees it; **descriptor addresses** are
  guest-physical (virtio 1.2, 2.7.5 "The Virtqueue Descriptor Table");
* ``userspace_addr``  -- where the front end (QEMU, virtio-user) mapped it; **ring
  addresses** of SET_VRING_ADDR are in that space;
* ``mmap_offset``     -- where the region starts inside the fd.

We mmap ``memory_size + mmap_offset`` bytes of each fd and keep a memoryview of the
region.  Every access from the data path goes through :meth:`GuestMemory.gpa` or
:meth:`GuestMemory.uva`, which check the whole ``(addr, len)`` range against one
region (``off <= size - len``, never ``addr + len`` that could wrap in C) and
return a memoryview slice; an address outside every region raises
:class:`BadAddress`, which the virtqueue turns into a dropped, counted chain.

A new table replaces the old one (hotplug): :meth:`GuestMemory.close` unmaps the old
regions.  A region whose memory is still exported to a live view (a frame the switch
has not released) is unmapped when the last view goes away instead.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from typing import Sequence

from .protocol import MemRegion

log = logging.getLogger(__name__)


class BadAddress(Exception):
    """An (address, length) range is not inside one guest memory region."""


@dataclass(slots=True)
class MappedRegion:
    """One mmapped region; ``view`` covers exactly the region's ``memory_size`` bytes."""

    gpa: int
    uva: int
    size: int
    mmap_offset: int
    map: mmap.mmap
    view: memoryview


class GuestMemory:
    """The mapped regions of one memory table, with both address translations.

    Not thread safe; used from the loop thread only.
    """

    def __init__(self, regions: Sequence[MappedRegion] = ()) -> None:
        self.regions: list[MappedRegion] = list(regions)
        self._last: MappedRegion | None = None  # region of the last gpa() hit

    @classmethod
    def map(cls, table: Sequence[MemRegion], fds: Sequence[int]) -> GuestMemory:
        """Map each region of ``table`` from its fd (one fd per region, in order).

        Does not close ``fds`` (the caller does; mmap keeps its own reference).
        Raises :class:`ValueError` with an operator-facing message if the fds are
        missing or a region cannot be mapped; nothing stays mapped on failure.
        """
        if len(fds) != len(table):
            raise ValueError(
                f"memory table has {len(table)} regions but came with {len(fds)} file descriptors: "
                "the guest RAM is not shared; start QEMU with "
                "-object memory-backend-memfd,id=mem,size=...,share=on -numa node,memdev=mem"
            )
        mem = cls()
        try:
            for region, fd in zip(table, fds):
                mem.regions.append(_map_region(region, fd))
            mem._check_overlaps()
        except (OSError, ValueError):
            mem.close()
            raise
        return mem

    def _check_overlaps(self) -> None:
        spans = sorted((r.gpa, r.size) for r in self.regions)
        for (a, asize), (b, _bsize) in zip(spans, spans[1:]):
            if b - a < asize:
                raise ValueError(f"memory regions overlap at guest physical {b:#x}")

    def add(self, region: MemRegion, fd: int, max_regions: int) -> None:
        """Map one more region (ADD_MEM_REG).  ``ValueError`` if it overlaps another
        region or the table is full; nothing changes on failure."""
        if len(self.regions) >= max_regions:
            raise ValueError(f"memory table full ({max_regions} regions)")
        mapped = _map_region(region, fd)
        self.regions.append(mapped)
        try:
            self._check_overlaps()
        except ValueError:
            self.regions.pop()
            self._last = None
            _unmap(mapped)
            raise

    def remove(self, region: MemRegion) -> bool:
        """Unmap the region matching ``region`` (REM_MEM_REG: same guest physical address,
        size and front-end address); False if there is none."""
        for i, r in enumerate(self.regions):
            if (r.gpa, r.size, r.uva) == (
                region.guest_phys_addr, region.memory_size, region.userspace_addr
            ):
                _unmap(self.regions.pop(i))
                self._last = None
                return True
        return False

    def close(self) -> None:
        """Unmap every region (deferred for a region a live view still exports)."""
        for region in self.regions:
            _unmap(region)
        self.regions = []
        self._last = None

    # -- translation: the one accessor --------------------------------------------------
    def gpa(self, addr: int, length: int) -> memoryview:
        """View of ``length`` bytes at guest-physical ``addr``; :class:`BadAddress` if
        the range is not inside one region.  ``length`` may be 0."""
        r = self._last
        if r is not None:
            off = addr - r.gpa
            if 0 <= off <= r.size and length <= r.size - off:
                return r.view[off : off + length]
        for r in self.regions:
            off = addr - r.gpa
            if 0 <= off <= r.size and length <= r.size - off:
                self._last = r
                return r.view[off : off + length]
        raise BadAddress(f"guest physical {addr:#x}+{length} is outside guest memory")

    def uva(self, addr: int, length: int) -> memoryview:
        """View of ``length`` bytes at front-end virtual ``addr`` (ring addresses)."""
        for r in self.regions:
            off = addr - r.uva
            if 0 <= off <= r.size and length <= r.size - off:
                return r.view[off : off + length]
        raise BadAddress(f"front-end virtual {addr:#x}+{length} is outside guest memory")

    def total_size(self) -> int:
        return sum(r.size for r in self.regions)


def _unmap(region: MappedRegion) -> None:
    region.view.release()
    try:
        region.map.close()
    except BufferError:  # a ring or frame view still uses it: unmapped when that goes
        log.debug("region at gpa %#x still referenced; unmapped when released", region.gpa)


def _map_region(region: MemRegion, fd: int) -> MappedRegion:
    length = region.memory_size + region.mmap_offset
    try:
        size = os.fstat(fd).st_size
    except OSError as exc:
        raise ValueError(f"memory region fd {fd}: {exc}") from exc
    if size and length > size:
        raise ValueError(
            f"memory region gpa {region.guest_phys_addr:#x}: needs {length} bytes of its fd, "
            f"which has {size}"
        )
    try:
        mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, OverflowError) as exc:  # OverflowError: length past ssize_t (no fd size)
        raise ValueError(f"cannot mmap memory region gpa {region.guest_phys_addr:#x}: {exc}") from exc
    whole = memoryview(mm)
    view = whole[region.mmap_offset : length]
    whole.release()
    return MappedRegion(
        gpa=region.guest_phys_addr,
        uva=region.userspace_addr,
        size=region.memory_size,
        mmap_offset=region.mmap_offset,
        map=mm,
        view=view,
    )
