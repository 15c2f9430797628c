"""Header rewrites on a ``bytearray`` frame, keeping checksums right.

Each function takes the frame being built and the action's argument, edits the frame
in place, and silently does nothing when the frame lacks the header it would edit
(the flow's match guarantees the protocol, but a frame can still be truncated).

Checksums are updated incrementally (RFC 1624 §3, eqn. 3: ``HC' = ~(~HC + ~m + m')``):
the IPv4 header checksum when an address changes, and the TCP/UDP checksum whose
pseudo-header (RFC 9293 §3.1, RFC 768, RFC 8200 §8.1) covers the addresses, or which
covers the port itself.  A UDP-over-IPv4 checksum of zero means "none" (RFC 768) and
stays zero; a UDP checksum that computes to zero is sent as 0xffff.
"""

from __future__ import annotations

import struct

from .key import parse as parse_layout
from .model import ETH_TYPE_IP, ETH_TYPE_QINQ, ETH_TYPE_VLAN, IPPROTO_TCP, IPPROTO_UDP

_U16 = struct.Struct("!H")
_TAG = struct.Struct("!HH")
_TPIDS = (ETH_TYPE_VLAN, ETH_TYPE_QINQ)
#: Offset of the checksum within the L4 header, and the bytes the header needs.
_L4_CSUM = {IPPROTO_TCP: (16, 20), IPPROTO_UDP: (6, 8)}


def csum_adjust(csum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3 for equal-length, even-length ``old`` -> ``new`` data."""
    s = ~csum & 0xFFFF
    for i in range(0, len(old), 2):
        s += ~(old[i] << 8 | old[i + 1]) & 0xFFFF
        s += new[i] << 8 | new[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _tagged(buf: bytearray) -> bool:
    return len(buf) >= 18 and _U16.unpack_from(buf, 12)[0] in _TPIDS


def set_dl_src(buf: bytearray, mac: int) -> None:
    if len(buf) >= 14:
        buf[6:12] = mac.to_bytes(6, "big")


def set_dl_dst(buf: bytearray, mac: int) -> None:
    if len(buf) >= 14:
        buf[0:6] = mac.to_bytes(6, "big")


def set_vlan_vid(buf: bytearray, vid: int) -> None:
    """Set the outer tag's VID; an untagged frame gets an 802.1Q tag (PCP 0), as
    OpenFlow 1.0's SET_VLAN_VID does (OpenFlow 1.0 §5.2.4)."""
    if _tagged(buf):
        tci = _U16.unpack_from(buf, 14)[0]
        _U16.pack_into(buf, 14, (tci & 0xF000) | vid)
    elif len(buf) >= 14:
        buf[12:12] = _TAG.pack(ETH_TYPE_VLAN, vid)


def set_vlan_pcp(buf: bytearray, pcp: int) -> None:
    """Set the outer tag's PCP; an untagged frame gets a tag with VID 0."""
    if _tagged(buf):
        tci = _U16.unpack_from(buf, 14)[0]
        _U16.pack_into(buf, 14, (tci & 0x1FFF) | pcp << 13)
    elif len(buf) >= 14:
        buf[12:12] = _TAG.pack(ETH_TYPE_VLAN, pcp << 13)


def strip_vlan(buf: bytearray) -> None:
    """Remove the outer tag, if any."""
    if _tagged(buf):
        del buf[12:16]


def push_vlan(buf: bytearray, tpid: int) -> None:
    """Push a new outer tag; its TCI copies the current outer tag's, or is 0
    (OpenFlow 1.3 §5.12.1, push VLAN)."""
    if len(buf) < 14:
        return
    tci = _U16.unpack_from(buf, 14)[0] if _tagged(buf) else 0
    buf[12:12] = _TAG.pack(tpid, tci)


def _l4_csum(buf: bytearray, key: tuple, l4: int) -> int:
    """Offset of the TCP/UDP checksum field, or -1 if absent/truncated."""
    spec = _L4_CSUM.get(key[8])  # nw_proto
    if l4 < 0 or spec is None or len(buf) - l4 < spec[1]:
        return -1
    return l4 + spec[0]


def _update_l4(buf: bytearray, at: int, key: tuple, old: bytes, new: bytes) -> None:
    udp = key[8] == IPPROTO_UDP
    csum = _U16.unpack_from(buf, at)[0]
    if udp and csum == 0 and key[3] == ETH_TYPE_IP:
        return  # IPv4 UDP without checksum (RFC 768)
    csum = csum_adjust(csum, old, new)
    _U16.pack_into(buf, at, 0xFFFF if udp and csum == 0 else csum)


def _set_nw(buf: bytearray, addr: int, field_off: int) -> None:
    key, lay = parse_layout(buf, 0)
    if key.dl_type != ETH_TYPE_IP or lay.l3 < 0:
        return
    at = lay.l3 + field_off
    old, new = bytes(buf[at : at + 4]), addr.to_bytes(4, "big")
    buf[at : at + 4] = new
    ip_csum = _U16.unpack_from(buf, lay.l3 + 10)[0]
    _U16.pack_into(buf, lay.l3 + 10, csum_adjust(ip_csum, old, new))
    l4c = _l4_csum(buf, key, lay.l4)
    if l4c >= 0:
        _update_l4(buf, l4c, key, old, new)


def set_nw_src(buf: bytearray, addr: int) -> None:
    _set_nw(buf, addr, 12)


def set_nw_dst(buf: bytearray, addr: int) -> None:
    _set_nw(buf, addr, 16)


def _set_tp(buf: bytearray, port: int, field_off: int) -> None:
    key, lay = parse_layout(buf, 0)
    l4c = _l4_csum(buf, key, lay.l4)
    if l4c < 0:
        return
    at = lay.l4 + field_off
    old, new = bytes(buf[at : at + 2]), port.to_bytes(2, "big")
    buf[at : at + 2] = new
    _update_l4(buf, l4c, key, old, new)


def set_tp_src(buf: bytearray, port: int) -> None:
    _set_tp(buf, port, 0)


def set_tp_dst(buf: bytearray, port: int) -> None:
    _set_tp(buf, port, 2)


#: Action kind -> rewrite function (argument-less ones take and ignore ``arg``).
REWRITES = {
    "mod_dl_src": set_dl_src,
    "mod_dl_dst": set_dl_dst,
    "mod_vlan_vid": set_vlan_vid,
    "mod_vlan_pcp": set_vlan_pcp,
    "strip_vlan": lambda buf, _arg: strip_vlan(buf),
    "push_vlan": push_vlan,
    "mod_nw_src": set_nw_src,
    "mod_nw_dst": set_nw_dst,
    "mod_tp_src": set_tp_src,
    "mod_tp_dst": set_tp_dst,
}
