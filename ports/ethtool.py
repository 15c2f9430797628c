"""Offload settings through the ``SIOCETHTOOL`` ioctl (linux/ethtool.h).

Why a user-space switch cares: a veth end offloads segmentation (TSO/GSO) and
checksums by default, so the frames an AF_PACKET socket reads on its peer are up to
64 KB super-frames with unfinished TCP/UDP checksums.  Forwarded by a switch that
does not understand them, they are too big for the egress MTU or arrive with bad
checksums, and TCP stalls.  :func:`disable_offloads` turns off, by name, every
transmit checksum, segmentation and scatter-gather feature and every GRO variant.

Two interfaces of the kernel are used:

* the named feature bits (``ETHTOOL_GSSET_INFO``/``ETHTOOL_GSTRINGS`` on string set
  ``ETH_SS_FEATURES``, then ``ETHTOOL_GFEATURES``/``ETHTOOL_SFEATURES``), because the
  legacy ``ETHTOOL_STSO`` misses features added since (``tx-tcp-accecn-segmentation``
  in Linux 6.18, tunnel and SCTP segmentation);
* the legacy value commands (``ETHTOOL_GTXCSUM`` ...) for :func:`get_offloads`, the five
  aggregate flags that ``ethtool -k`` prints as headings.

A socket created in a namespace resolves interface names there, so every call takes
an optional ``netns``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import socket
import struct
from collections.abc import Callable, Iterator

from pyroute2 import netns as pr_netns
from pyswitch.ports.netlink import errors

from pyswitch.port import PortError

SIOCETHTOOL = 0x8946
ETHTOOL_GSTRINGS = 0x1B
ETHTOOL_GSSET_INFO = 0x37
ETHTOOL_GFEATURES = 0x3A
ETHTOOL_SFEATURES = 0x3B
ETH_SS_FEATURES = 4
ETH_GSTRING_LEN = 32

_IFREQ = struct.Struct("16sP16x")  # struct ifreq: name, ifr_data pointer (40 bytes)
_VALUE = struct.Struct("=II")  # struct ethtool_value { cmd, data }
_SSET_INFO = struct.Struct("=IIQI")  # ethtool_sset_info { cmd, reserved, sset_mask, data[1] }
_GSTRINGS_HEAD = struct.Struct("=III")  # ethtool_gstrings { cmd, string_set, len, data[] }
_FEATURES_HEAD = struct.Struct("=II")  # ethtool_[gs]features { cmd, size, blocks[] }
_GBLOCK = struct.Struct("=IIII")  # available, requested, active, never_changed
_SBLOCK = struct.Struct("=II")  # valid, requested

#: Aggregate flag -> legacy get command (as headings of ``ethtool -k``).
LEGACY_GET = {
    "tx-checksumming": 0x16,  # ETHTOOL_GTXCSUM
    "scatter-gather": 0x18,  # ETHTOOL_GSG
    "tcp-segmentation-offload": 0x1E,  # ETHTOOL_GTSO
    "generic-segmentation-offload": 0x23,  # ETHTOOL_GGSO
    "generic-receive-offload": 0x2B,  # ETHTOOL_GGRO
}
_GRO_FEATURES = ("rx-gro", "rx-lro", "rx-gro-hw", "rx-gro-list", "rx-udp-gro-forwarding")


def is_switch_hostile(feature: str) -> bool:
    """Whether a named feature makes the device hand over super-frames or frames with
    unfinished checksums: tx checksum, segmentation, scatter-gather, GSO, GRO."""
    if feature in _GRO_FEATURES:
        return True
    return feature.startswith("tx-") and any(
        word in feature for word in ("checksum", "segmentation", "scatter-gather", "gso")
    )


def _ioctl(sock: socket.socket, ifname: str, buf: ctypes.Array[ctypes.c_char]) -> None:
    ifr = bytearray(_IFREQ.pack(ifname.encode(), ctypes.addressof(buf)))
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)


@contextlib.contextmanager
def _socket_in(netns: str | None) -> Iterator[socket.socket]:
    if netns is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        with errors(f"opening a socket in namespace {netns!r}"):
            sock = pr_netns.create_socket(netns, socket.AF_INET, socket.SOCK_DGRAM, flags=0)
    try:
        yield sock
    finally:
        sock.close()


def _feature_names(sock: socket.socket, ifname: str) -> list[str]:
    buf = ctypes.create_string_buffer(
        _SSET_INFO.pack(ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_FEATURES, 0)
    )
    _ioctl(sock, ifname, buf)
    count = _SSET_INFO.unpack_from(buf.raw)[3]
    size = _GSTRINGS_HEAD.size + count * ETH_GSTRING_LEN
    buf = ctypes.create_string_buffer(
        _GSTRINGS_HEAD.pack(ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count), size
    )
    _ioctl(sock, ifname, buf)
    raw = buf.raw[_GSTRINGS_HEAD.size :]
    return [
        raw[i * ETH_GSTRING_LEN : (i + 1) * ETH_GSTRING_LEN].split(b"\0", 1)[0].decode()
        for i in range(count)
    ]


def _blocks(sock: socket.socket, ifname: str, nblocks: int) -> list[tuple[int, int, int, int]]:
    buf = ctypes.create_string_buffer(
        _FEATURES_HEAD.pack(ETHTOOL_GFEATURES, nblocks),
        _FEATURES_HEAD.size + nblocks * _GBLOCK.size,
    )
    _ioctl(sock, ifname, buf)
    return [
        _GBLOCK.unpack_from(buf.raw, _FEATURES_HEAD.size + i * _GBLOCK.size) for i in range(nblocks)
    ]


def features(ifname: str, netns: str | None = None) -> dict[str, bool]:
    """Every named feature of ``ifname`` and whether it is active (``ethtool -k``)."""
    with _socket_in(netns) as sock, errors(f"reading features of {ifname!r}"):
        names = _feature_names(sock, ifname)
        blocks = _blocks(sock, ifname, (len(names) + 31) // 32)
    return {name: bool(blocks[i // 32][2] >> (i % 32) & 1) for i, name in enumerate(names)}


def disable_offloads(
    ifname: str, netns: str | None = None, select: Callable[[str], bool] = is_switch_hostile
) -> list[str]:
    """Request every changeable feature for which ``select(name)`` is true to be off;
    return the names that are still active afterwards (fixed on by the driver)."""
    with _socket_in(netns) as sock, errors(f"turning offloads off on {ifname!r}"):
        names = _feature_names(sock, ifname)
        nblocks = (len(names) + 31) // 32
        valid = [0] * nblocks
        for i, name in enumerate(names):
            if select(name):
                valid[i // 32] |= 1 << (i % 32)
        buf = ctypes.create_string_buffer(
            _FEATURES_HEAD.pack(ETHTOOL_SFEATURES, nblocks)
            + b"".join(_SBLOCK.pack(v, 0) for v in valid)
        )
        _ioctl(sock, ifname, buf)  # a positive return (some left on) is not an error
        blocks = _blocks(sock, ifname, nblocks)
    return [
        n
        for i, n in enumerate(names)
        if valid[i // 32] >> (i % 32) & 1 and blocks[i // 32][2] >> (i % 32) & 1
    ]


def get_offloads(ifname: str, netns: str | None = None) -> dict[str, bool]:
    """The five aggregate offload flags of ``LEGACY_GET`` on ``ifname``."""
    out: dict[str, bool] = {}
    with _socket_in(netns) as sock:
        for flag, cmd in LEGACY_GET.items():
            buf = ctypes.create_string_buffer(_VALUE.pack(cmd, 0), _VALUE.size)
            try:
                _ioctl(sock, ifname, buf)
            except OSError as exc:
                if exc.errno == errno.EOPNOTSUPP:
                    continue
                raise PortError(f"reading {flag} of {ifname!r}: {exc.strerror}") from exc
            out[flag] = bool(_VALUE.unpack_from(buf.raw)[1])
    return out
