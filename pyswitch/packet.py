"""Ethernet and 802.1Q: the few header facts the NORMAL pipeline needs, and tag edits.

Wire layout (IEEE 802.3 / 802.1Q)::

    dst(6) src(6) [TPID 0x8100 (2) TCI(2)] ethertype(2) payload

TCI = PCP(3) DEI(1) VID(12).  A frame whose VID is 0 is *priority-tagged*: it belongs to
no VLAN and is treated as untagged (802.1Q-2018 §9.6).
"""

from __future__ import annotations

import struct

ETH_HLEN = 14
VLAN_HLEN = 4
TPID_8021Q = 0x8100
#: 802.1ad S-tag: recognised so that it is not mistaken for an ethertype, but not
#: switched as a VLAN (pyswitch carries only C-tags).
TPID_8021AD = 0x88A8

_U16 = struct.Struct("!H")
_TAG = struct.Struct("!HH")  # TPID, TCI

BROADCAST = b"\xff\xff\xff\xff\xff\xff"


def is_multicast(mac: bytes) -> bool:
    """True for group addresses (broadcast included): the I/G bit of the first octet."""
    return bool(mac[0] & 1)


def mac_str(mac: bytes) -> str:
    """``b'\\x02\\x00..'`` -> ``'02:00:..'``."""
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    """``'02:00:00:00:00:01'`` -> 6 bytes; ValueError naming the text if malformed."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address (want xx:xx:xx:xx:xx:xx)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address (want xx:xx:xx:xx:xx:xx)") from None


def vlan_tci(frame: bytes | memoryview) -> int | None:
    """The 802.1Q TCI of ``frame`` if it carries a C-tag, else None.  Assumes len >= 18
    when tagged; callers check ``len(frame) >= ETH_HLEN`` first."""
    if frame[12] == 0x81 and frame[13] == 0x00 and len(frame) >= ETH_HLEN + VLAN_HLEN:
        return _U16.unpack_from(frame, 14)[0]
    return None


def strip_tag(frame: bytes | memoryview) -> bytes:
    """A copy of tagged ``frame`` without its outer 802.1Q tag."""
    return bytes(frame[:12]) + bytes(frame[16:])


def push_tag(frame: bytes | memoryview, vid: int, pcp: int = 0) -> bytes:
    """A copy of untagged ``frame`` with an 802.1Q tag (vid, pcp) after the MACs."""
    return bytes(frame[:12]) + _TAG.pack(TPID_8021Q, (pcp << 13) | vid) + bytes(frame[12:])


def set_vid(frame: bytes | memoryview, vid: int) -> bytes:
    """A copy of tagged ``frame`` with its VID replaced (PCP and DEI kept)."""
    tci = _U16.unpack_from(frame, 14)[0]
    return bytes(frame[:14]) + _U16.pack((tci & 0xF000) | vid) + bytes(frame[16:])
