"""Guest memory layer: mapping memfd regions, both translations, bounds checks, remap."""

from __future__ import annotations

import os

import pytest

from pyswitch.ports.vhostuser import protocol as p
from pyswitch.ports.vhostuser.memory import BadAddress, GuestMemory
from tests.vhost_frontend import GuestRAM


@pytest.fixture
def ram():
    r = GuestRAM([(0, 1 << 20), (0x1_0000_0000, 1 << 20)], mmap_offset=4096)
    yield r
    r.close()


def test_both_translations_reach_the_same_bytes(ram):
    mem = ram.mapped()
    try:
        gpa = 0x1_0000_0000 + 0x500
        ram.write(gpa, b"hello")
        assert bytes(mem.gpa(gpa, 5)) == b"hello"
        assert bytes(mem.uva(ram.uva(gpa), 5)) == b"hello"
        mem.gpa(0x100, 3)[:] = b"abc"  # writes land in the front end's memory
        assert ram.read(0x100, 3) == b"abc"
    finally:
        mem.close()


def test_mmap_offset_is_honoured(ram):
    # Region 0 starts 4096 bytes into its memfd: gpa 0 must be file offset 4096.
    os.pwrite(ram.regions[0].fd, b"XY", 4096)
    mem = ram.mapped()
    try:
        assert bytes(mem.gpa(0, 2)) == b"XY"
    finally:
        mem.close()


@pytest.mark.parametrize(
    "addr, length",
    [
        ((1 << 20) - 4, 8),  # crosses the end of region 0
        (1 << 20, 1),  # the hole between the regions
        (0x1_0000_0000 - 1, 2),  # starts in the hole
        (2**64 - 16, 32),  # would wrap a C u64 addr+len
        (0, 2**64 - 1),  # huge length
        (0x1_0000_0000 + (1 << 20), 1),  # one past the end of region 1
    ],
)
def test_out_of_bounds_is_refused(ram, addr, length):
    mem = ram.mapped()
    try:
        with pytest.raises(BadAddress):
            mem.gpa(addr, length)
        with pytest.raises(BadAddress):
            mem.uva(addr, length)
    finally:
        mem.close()


def test_edges_inside_are_accepted(ram):
    mem = ram.mapped()
    try:
        assert len(mem.gpa((1 << 20) - 8, 8)) == 8
        assert len(mem.gpa(1 << 20, 0)) == 0  # empty range at the end is fine
        assert len(mem.gpa(0x1_0000_0000, 1 << 20)) == 1 << 20
    finally:
        mem.close()


def test_missing_fds_says_memory_is_not_shared(ram):
    with pytest.raises(ValueError, match="share=on"):
        GuestMemory.map(ram.table(), [])


def test_overlapping_regions_are_refused(ram):
    table = [p.MemRegion(0, 1 << 20, 0x1000, 4096), p.MemRegion(0x8000, 4096, 0x9000_0000, 4096)]
    with pytest.raises(ValueError, match="overlap"):
        GuestMemory.map(table, ram.fds())


def test_region_larger_than_its_fd_is_refused(ram):
    table = [p.MemRegion(0, 1 << 22, 0x1000, 0)]
    with pytest.raises(ValueError, match="needs"):
        GuestMemory.map(table, ram.fds()[:1])


def test_close_unmaps_and_live_views_keep_memory_valid(ram):
    mem = ram.mapped()
    view = mem.gpa(0x10, 4)
    ram.write(0x10, b"live")
    mem.close()  # a view is still alive: unmap is deferred, no crash
    assert bytes(view) == b"live"
    view.release()
    with pytest.raises(BadAddress):
        mem.gpa(0x10, 4)


@pytest.mark.parametrize("size", [2**63, 2**64 - 1])
def test_absurd_region_size_on_a_non_regular_fd_is_refused_cleanly(size):
    """A front end may send any fd.  With one that has no file size to check against (a
    pipe, /dev/zero), a region size past what mmap takes must give ValueError (which the
    device turns into a refusal), not an OverflowError escaping the message handler."""
    r, w = os.pipe()
    z = os.open("/dev/zero", os.O_RDWR)
    try:
        for fd in (r, z):
            with pytest.raises(ValueError):
                GuestMemory.map([p.MemRegion(0, size, 0x1000, 0)], [fd])
    finally:
        for fd in (r, w, z):
            os.close(fd)
