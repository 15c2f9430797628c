"""The ``tap`` port type: a kernel TAP interface whose other side is the host stack.

``open()`` opens ``/dev/net/tun`` and attaches it to a TAP device (``TUNSETIFF``
with ``IFF_TAP | IFF_NO_PI``: whole Ethernet frames, no packet-information
prefix; Documentation/networking/tuntap.rst), named after the port or ``ifname``;
then sets the MAC, MTU and host-side addresses and brings the link up.  The device
is not persistent: closing the file descriptor removes it.

Directions: a frame the host stack sends out of the TAP interface is read from the
fd (receive, into the switch); a frame the switch transmits is written to the fd
and enters the host stack as if received on the interface.

The receive path reads one frame per ``readv()`` into a pool of preallocated
buffers and hands out memoryviews of them, valid until :meth:`TapPort.release`.
TAP has no offloads unless ``TUNSETOFFLOAD`` asks for them, so frames are always
complete, MTU-sized and with finished checksums.  See ``ports/README.md``.

On the compiled data path, ``open()`` takes the ``_pktio`` kernel's ``TapIO`` instead:
one call per batch that loops ``read()`` until EAGAIN or the batch is full (frames as
``bytes``), one call that writes a batch; same counting, same error meanings.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, ClassVar

from pyswitch.ports import netlink as nl
from pyswitch.ports.frames import VLAN_TPIDS, send_each

from pyswitch import fastpath
from pyswitch.port import MAX_BURST, Frame, Port, PortError, PortIO

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int), linux/if_tun.h
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
_IFREQ_FLAGS = struct.Struct("16sH22x")  # struct ifreq: name, ifr_flags (40 bytes)
DEFAULT_MTU = 1500


class TapPort(Port):
    """A TAP interface as a switch port (see the module docstring)."""

    type_name: ClassVar[str] = "tap"
    OPTIONS: ClassVar[Mapping[str, str]] = {
        "ifname": "interface name (default: the port name)",
        "address": "comma-separated host-side CIDRs (IPv4/IPv6) on the interface",
        "mac": "MAC address of the host side of the interface",
        "mtu": "MTU of the interface (default 1500)",
    }

    def __init__(
        self, name: str, options: Mapping[str, str] | None = None, *,
        pktio: ModuleType | None = None,
    ) -> None:
        """``pktio``: the compiled ``_pktio`` kernel to use even when the selected data
        path is Python (tests of the kernel); by default the selected path decides."""
        super().__init__(name, options)
        self._pktio = pktio
        self._kio: Any = None  # the kernel's TapIO on the compiled path
        opts = self.options
        self.ifname = nl.check_ifname(
            opts.get("ifname", name), "ifname" if "ifname" in opts else f"port {name!r}"
        )
        self._addresses = nl.parse_cidrs(opts["address"], "address") if "address" in opts else []
        self._mac = nl.parse_mac(opts["mac"], "mac") if "mac" in opts else None
        self._mtu = nl.parse_mtu(opts["mtu"]) if "mtu" in opts else DEFAULT_MTU
        self._fd = -1
        self._io: PortIO | None = None
        self._limit = self._mtu + 14
        # Receive buffer pool: room for a tagged frame plus one byte to detect oversize.
        self._bufsize = self._mtu + 14 + 4 + 1
        self._pool: list[memoryview] = []

    @classmethod
    def validate_options(cls, name: str, options: Mapping[str, str]) -> None:
        super().validate_options(name, options)
        cls(name, options)  # the constructor parses every option and creates nothing

    # -- set-up and tear-down -------------------------------------------------------------
    def open(self) -> None:
        """Create the TAP device and configure it; ``PortError`` (and nothing left
        behind) on failure."""
        if self._fd >= 0:
            return
        self._fd = _open_tap(self.ifname)
        try:
            with nl.rtnl() as ipr:
                nl.set_link(ipr, self.ifname, mac=self._mac, mtu=self._mtu, up=True)
                nl.add_addresses(ipr, self.ifname, self._addresses)
        except BaseException:
            self._close_fd()
            raise
        pktio = self._pktio or fastpath.kernel("_pktio")
        if pktio is not None:
            self._kio = pktio.TapIO(self._fd, self._mtu, self.counters)
        else:
            self._grow_pool(MAX_BURST)

    def close(self) -> None:
        """Unwatch and close the fd; the kernel removes the (non-persistent) device."""
        if self._io is not None and self._fd >= 0:
            self._io.unwatch(self._fd)
        self._io = None
        self._close_fd()

    def _close_fd(self) -> None:
        if self._kio is not None:
            self._kio.close()
            self._kio = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _grow_pool(self, n: int) -> None:
        while len(self._pool) < n:
            self._pool.append(memoryview(bytearray(self._bufsize)))

    # -- data path ---------------------------------------------------------------------
    def attach(self, io: PortIO) -> None:
        if self._fd < 0:
            raise PortError(f"port {self.name!r}: attach() before open()")
        self._io = io
        io.watch(self._fd, io.rx_ready)

    def receive(self, max_frames: int = MAX_BURST) -> Sequence[Frame]:
        """Read up to ``max_frames`` frames (one ``readv`` each); EAGAIN ends the batch.
        Frames are views into the buffer pool, valid until :meth:`release` or the next
        ``receive``."""
        fd = self._fd
        if fd < 0:
            return ()
        if self._kio is not None:
            frames, err = self._kio.receive(max_frames)
            if err:
                self._rx_error(OSError(err, os.strerror(err)))
            return frames  # type: ignore[no-any-return]
        if max_frames > len(self._pool):
            self._grow_pool(max_frames)
        readv, pool, limit = os.readv, self._pool, self._limit
        out: list[Frame] = []
        nbytes = oversize = 0
        for i in range(max_frames):
            buf = pool[i]
            try:
                n = readv(fd, (buf,))
            except BlockingIOError:
                break
            except OSError as exc:
                self._rx_error(exc)
                break
            if n > limit and (n > limit + 4 or buf[12:14] not in VLAN_TPIDS):
                oversize += 1
                continue
            out.append(buf[:n])
            nbytes += n
        self.counters.rx_packets += len(out)
        self.counters.rx_bytes += nbytes
        if oversize:
            self.counters.drop("mtu", oversize, rx=True)
        return out

    def _rx_error(self, exc: OSError) -> None:
        if exc.errno not in (errno.EIO, errno.ENETDOWN, errno.ENXIO, errno.EBADFD):
            self.counters.rx_errors += 1
            log.warning("port %s: read failed: %s", self.name, exc)

    def transmit(self, frames: Sequence[Frame]) -> int:
        """Write each frame to the TAP fd; returns how many were written.  Oversized
        frames are dropped one by one (``mtu``); EAGAIN after retries drops the rest (``tx_full``),
        a down device (EIO/ENETDOWN) drops the rest (``link_down``)."""
        counters = self.counters
        fd = self._fd
        if fd < 0:
            if frames:
                counters.drop("link_down", len(frames), rx=False)
            return 0
        if self._kio is not None:
            return self._kio.transmit(frames)  # type: ignore[no-any-return]
        return send_each(frames, functools.partial(os.write, fd), self._limit, counters,
                         _tx_error_reason)

    # -- operator views ----------------------------------------------------------------
    def link_state(self) -> str:
        return "up" if self._fd >= 0 and nl.link_is_up(self.ifname) else "down"

    def status(self) -> dict[str, Any]:
        return {
            "ifname": self.ifname,
            "mtu": self._mtu,
            "open": self._fd >= 0,
            "address": [str(a) for a in self._addresses],
        }


def _tx_error_reason(exc: OSError) -> str:
    """A failed TAP ``write()`` as a drop reason: EINVAL is a frame shorter than an
    Ethernet header, EAGAIN/ENOBUFS a full queue, anything else a down device."""
    if exc.errno == errno.EINVAL:
        return "malformed"
    return "tx_full" if exc.errno in (errno.EAGAIN, errno.ENOBUFS) else "link_down"


def _open_tap(ifname: str) -> int:
    """Open /dev/net/tun non-blocking and attach it to TAP device ``ifname``."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PortError(f"opening {TUN_DEVICE}: {exc.strerror}") from exc
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(ifname.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        why = exc.strerror
        if exc.errno in (errno.EBUSY, errno.EINVAL, errno.EEXIST):
            why = "the name is taken by another device or another open TAP"
        raise PortError(f"cannot create TAP {ifname!r}: {why}") from exc
    return fd
