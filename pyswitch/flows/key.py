"""Frame -> flow key: the header fields a flow rule can match, extracted once per frame.

The key is a :class:`FlowKey` (a named tuple: hashable, usable as the exact-match flow
cache key).  Field order and meaning (indices in :mod:`model`)::

    in_port      OpenFlow port number the frame came in on
    dl_src/dst   48-bit ints
    dl_type      ethertype after at most one 802.1Q/802.1ad tag; 0x05ff for 802.3
    dl_vlan      VID of the outer tag, None when untagged; dl_vlan_pcp its PCP
    nw_src/dst   IPv4 source/destination; for ARP the SPA/TPA (as OVS does)
    nw_proto     IPv4 protocol / IPv6 next header (after extension headers); ARP opcode
    nw_tos       the DSCP bits of IPv4 TOS / IPv6 traffic class (``tos & 0xfc``)
    tp_src/dst   TCP/UDP/SCTP ports; ICMP/ICMPv6 type/code
    ipv6_src/dst 128-bit ints

Never raises on garbage: a layer that is missing, truncated or malformed leaves its
fields (and those of the layers above it) ``None``.  Non-first IP fragments carry no
L4 ports (``tp_*`` None), as in OVS.

Wire formats: Ethernet II / 802.3 (IEEE 802.3 §3.1), 802.1Q tag (IEEE 802.1Q §9.6),
IPv4 (RFC 791 §3.1), IPv6 and extension headers (RFC 8200 §3-4), ARP (RFC 826),
TCP (RFC 9293 §3.1), UDP (RFC 768), ICMP (RFC 792), ICMPv6 (RFC 4443 §2.1).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .model import (
    ETH_TYPE_ARP,
    ETH_TYPE_IP,
    ETH_TYPE_IPV6,
    ETH_TYPE_NONE,
    ETH_TYPE_QINQ,
    ETH_TYPE_VLAN,
)

_ETH = struct.Struct("!IHIHH")  # dst hi32, dst lo16, src hi32, src lo16, type/len
_TAG = struct.Struct("!HH")  # TCI, inner ethertype
_IP4 = struct.Struct("!BBHHHBBHII")  # ver/ihl tos len id frag ttl proto csum src dst
_IP6 = struct.Struct("!IHBB")  # ver/tc/flow, payload len, next header, hop limit
_ARP = struct.Struct("!HHBBHIHIIHI")  # htype ptype hlen plen op sha(6) spa tha(6) tpa
_PORTS = struct.Struct("!HH")
_ICMP = struct.Struct("!BB")

#: Minimum L4 header bytes before ports/type are trusted (TCP needs its fixed header).
_L4_MIN = {6: 20, 17: 8, 132: 12, 1: 4, 58: 4}
#: IPv6 extension headers walked to find the upper-layer protocol (RFC 8200 §4).
_IP6_EXT = frozenset({0, 43, 60})
_IP6_FRAG = 44
_IP6_AH = 51
_MAX_IP6_EXT = 8


_new = tuple.__new__  # builds a named tuple without the per-field argument handling
_NONE8, _NONE11, _NONE13 = (None,) * 8, (None,) * 11, (None,) * 13


class FlowKey(NamedTuple):
    """The extracted header fields of one frame; None = absent (see module doc)."""

    in_port: int
    dl_src: int | None = None
    dl_dst: int | None = None
    dl_type: int | None = None
    dl_vlan: int | None = None
    dl_vlan_pcp: int | None = None
    nw_src: int | None = None
    nw_dst: int | None = None
    nw_proto: int | None = None
    nw_tos: int | None = None
    tp_src: int | None = None
    tp_dst: int | None = None
    ipv6_src: int | None = None
    ipv6_dst: int | None = None


class Layout(NamedTuple):
    """Where the layers of a frame start; -1 = absent.  ``vlan`` is the offset of the
    outer tag's TPID (12) when the frame is tagged."""

    vlan: int  # offset of the outer tag's TPID, or -1
    l3: int
    l4: int


_NOWHERE = Layout(-1, -1, -1)


def extract(frame: bytes | bytearray | memoryview, in_port: int) -> FlowKey:
    """The flow key of ``frame`` received on ``in_port``.  Never raises."""
    return parse(frame, in_port)[0]


def parse(frame: bytes | bytearray | memoryview, in_port: int) -> tuple[FlowKey, Layout]:
    """The flow key and layer offsets of ``frame``.  Never raises."""
    n = len(frame)
    if n < 14:
        return _new(FlowKey, (in_port,) + _NONE13), _NOWHERE
    dhi, dlo, shi, slo, etype = _ETH.unpack_from(frame, 0)
    off, vlan_off, vid, pcp = 14, -1, None, None
    if etype == ETH_TYPE_VLAN or etype == ETH_TYPE_QINQ:
        if n < 18:
            return _new(FlowKey, (in_port, shi << 16 | slo, dhi << 16 | dlo) + _NONE11), _NOWHERE
        tci, etype = _TAG.unpack_from(frame, 14)
        vid, pcp, vlan_off, off = tci & 0xFFF, tci >> 13, 12, 18
    if etype < 0x600:
        etype = ETH_TYPE_NONE
    head = (in_port, shi << 16 | slo, dhi << 16 | dlo, etype, vid, pcp)
    if etype == ETH_TYPE_IP:
        rest, l4 = _ipv4(frame, off, n)
    elif etype == ETH_TYPE_IPV6:
        rest, l4 = _ipv6(frame, off, n)
    elif etype == ETH_TYPE_ARP:
        rest, l4 = _arp(frame, off, n), -1
    else:
        rest = None
    if rest is None:
        return _new(FlowKey, head + _NONE8), _new(Layout, (vlan_off, -1, -1))
    return _new(FlowKey, head + rest), _new(Layout, (vlan_off, off, l4))


def _l4(frame: bytes | bytearray | memoryview, off: int, n: int, proto: int) -> tuple:
    """(tp_src, tp_dst) of the L4 header at ``off``, (None, None) if absent/short."""
    need = _L4_MIN.get(proto)
    if need is None or n - off < need:
        return None, None
    if proto == 1 or proto == 58:
        return _ICMP.unpack_from(frame, off)
    return _PORTS.unpack_from(frame, off)


def _ipv4(frame: bytes | bytearray | memoryview, off: int, n: int) -> tuple:
    """(nw_src, nw_dst, nw_proto, nw_tos, tp_src, tp_dst), l4 offset; (None, -1) if
    the IPv4 header is short or malformed (RFC 791 §3.1)."""
    if n - off < 20:
        return None, -1
    vihl, tos, _tl, _id, frag, _ttl, proto, _ck, src, dst = _IP4.unpack_from(frame, off)
    hlen = (vihl & 0xF) * 4
    if vihl >> 4 != 4 or hlen < 20 or n - off < hlen:
        return None, -1
    l4 = off + hlen
    if frag & 0x1FFF:  # a later fragment: no L4 header here
        return (src, dst, proto, tos & 0xFC, None, None, None, None), -1
    if (proto == 6 and n - l4 >= 20) or (proto == 17 and n - l4 >= 8):  # the common case
        sp, dp = _PORTS.unpack_from(frame, l4)
        return (src, dst, proto, tos & 0xFC, sp, dp, None, None), l4
    return (src, dst, proto, tos & 0xFC, *_l4(frame, l4, n, proto), None, None), l4


def _ipv6(frame: bytes | bytearray | memoryview, off: int, n: int) -> tuple:
    """IPv6 fields (nw_* with nw_src/dst None, then ipv6_src/dst) and the L4 offset;
    walks at most 8 extension headers (RFC 8200 §4)."""
    if n - off < 40:
        return None, -1
    vtf, _plen, nh, _hlim = _IP6.unpack_from(frame, off)
    if vtf >> 28 != 6:
        return None, -1
    src = int.from_bytes(frame[off + 8 : off + 24], "big")
    dst = int.from_bytes(frame[off + 24 : off + 40], "big")
    tos = (vtf >> 20) & 0xFC
    pos, later = off + 40, False
    for _ in range(_MAX_IP6_EXT):
        if nh not in _IP6_EXT and nh != _IP6_FRAG and nh != _IP6_AH:
            break
        if n - pos < 8:
            return (None, None, None, tos, None, None, src, dst), -1
        if nh == _IP6_FRAG:
            later = bool(_PORTS.unpack_from(frame, pos + 2)[0] & 0xFFF8)
            ext = 8
        elif nh == _IP6_AH:
            ext = (frame[pos + 1] + 2) * 4
        else:
            ext = (frame[pos + 1] + 1) * 8
        nh, pos = frame[pos], pos + ext
    else:
        return (None, None, None, tos, None, None, src, dst), -1
    if later or pos > n:
        return (None, None, nh, tos, None, None, src, dst), -1
    return (None, None, nh, tos, *_l4(frame, pos, n, nh), src, dst), pos


def _arp(frame: bytes | bytearray | memoryview, off: int, n: int) -> tuple | None:
    """ARP for IPv4 over Ethernet (RFC 826): SPA, TPA, opcode (low 8 bits; 0 if the
    opcode does not fit, as OVS does); None for other hardware/protocol types."""
    if n - off < 28:
        return None
    htype, ptype, hlen, plen, op, _sh, _sl, spa, _th, _tl, tpa = _ARP.unpack_from(frame, off)
    if htype != 1 or ptype != ETH_TYPE_IP or hlen != 6 or plen != 4:
        return None
    return (spa, tpa, op if op <= 0xFF else 0, None, None, None, None, None)
