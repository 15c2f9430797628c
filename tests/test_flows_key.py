"""Flow key extraction: every field on frames built with scapy, and no exception on
short or garbage input (hypothesis)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.sctp import SCTP

from pyswitch.flows.key import FlowKey, extract, parse

SRC, DST = "02:00:00:00:00:01", "02:00:00:00:00:02"
MAC_SRC, MAC_DST = 0x020000000001, 0x020000000002


def ip4(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def ip6(a: str) -> int:
    return int(ipaddress.IPv6Address(a))


def eth() -> Ether:
    return Ether(src=SRC, dst=DST)


CASES = [
    (
        eth() / IP(src="10.0.0.1", dst="10.0.0.2", tos=0xB9) / TCP(sport=1234, dport=80),
        {
            "dl_type": 0x0800,
            "nw_src": ip4("10.0.0.1"),
            "nw_dst": ip4("10.0.0.2"),
            "nw_proto": 6,
            "nw_tos": 0xB8,
            "tp_src": 1234,
            "tp_dst": 80,
        },
    ),
    (
        eth() / Dot1Q(vlan=100, prio=5) / IP(src="1.1.1.1", dst="2.2.2.2") / UDP(sport=53, dport=9),
        {
            "dl_type": 0x0800,
            "dl_vlan": 100,
            "dl_vlan_pcp": 5,
            "nw_proto": 17,
            "tp_src": 53,
            "tp_dst": 9,
            "nw_src": ip4("1.1.1.1"),
            "nw_dst": ip4("2.2.2.2"),
            "nw_tos": 0,
        },
    ),
    (
        eth() / Dot1Q(vlan=0, prio=3) / IP() / ICMP(type=8, code=0),
        {
            "dl_type": 0x0800,
            "dl_vlan": 0,
            "dl_vlan_pcp": 3,
            "nw_proto": 1,
            "tp_src": 8,
            "tp_dst": 0,
        },
    ),
    (
        eth() / IP(options=b"\x01\x01\x01\x01") / TCP(sport=5, dport=6),
        {"dl_type": 0x0800, "nw_proto": 6, "tp_src": 5, "tp_dst": 6},
    ),
    (
        eth() / IP(frag=10, proto=6) / (b"\x00" * 20),
        {"dl_type": 0x0800, "nw_proto": 6, "tp_src": None, "tp_dst": None},
    ),
    (
        eth() / IP(flags="MF", frag=0) / UDP(sport=7, dport=8),
        {"dl_type": 0x0800, "nw_proto": 17, "tp_src": 7, "tp_dst": 8},
    ),
    (
        eth() / IP() / SCTP(sport=100, dport=200),
        {"dl_type": 0x0800, "nw_proto": 132, "tp_src": 100, "tp_dst": 200},
    ),
    (
        eth() / IPv6(src="2001:db8::1", dst="fe80::2", tc=0x2C) / TCP(sport=9, dport=443),
        {
            "dl_type": 0x86DD,
            "ipv6_src": ip6("2001:db8::1"),
            "ipv6_dst": ip6("fe80::2"),
            "nw_proto": 6,
            "nw_tos": 0x2C,
            "tp_src": 9,
            "tp_dst": 443,
            "nw_src": None,
            "nw_dst": None,
        },
    ),
    (
        eth() / IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(sport=546, dport=547),
        {"dl_type": 0x86DD, "nw_proto": 17, "tp_src": 546, "tp_dst": 547},
    ),
    (
        eth() / IPv6() / IPv6ExtHdrFragment(offset=0) / UDP(sport=1, dport=2),
        {"nw_proto": 17, "tp_src": 1, "tp_dst": 2},
    ),
    (
        eth() / IPv6() / IPv6ExtHdrFragment(offset=5) / UDP(sport=1, dport=2),
        {"nw_proto": 17, "tp_src": None, "tp_dst": None},
    ),
    (
        eth() / IPv6() / ICMPv6EchoRequest(),
        {"dl_type": 0x86DD, "nw_proto": 58, "tp_src": 128, "tp_dst": 0},
    ),
    (
        eth() / ARP(op=1, psrc="10.0.0.1", pdst="10.0.0.9", hwsrc=SRC),
        {
            "dl_type": 0x0806,
            "nw_src": ip4("10.0.0.1"),
            "nw_dst": ip4("10.0.0.9"),
            "nw_proto": 1,
            "nw_tos": None,
            "tp_src": None,
        },
    ),
    (
        eth() / Dot1Q(vlan=7) / ARP(op=2, psrc="1.2.3.4", pdst="4.3.2.1", hwdst=DST),
        {"dl_type": 0x0806, "dl_vlan": 7, "nw_proto": 2, "nw_src": ip4("1.2.3.4")},
    ),
    (
        Ether(src=SRC, dst=DST, type=0x88CC) / b"lldp",
        {"dl_type": 0x88CC, "nw_src": None, "nw_proto": None},
    ),
    (
        Ether(src=SRC, dst=DST, type=60) / (b"x" * 60),  # 802.3 length field
        {"dl_type": 0x05FF},
    ),
    (
        eth() / Dot1Q(vlan=5, type=0x8100) / Dot1Q(vlan=6) / IP(),  # only the outer tag
        {"dl_vlan": 5, "dl_type": 0x8100, "nw_src": None},
    ),
]


@pytest.mark.parametrize(("pkt", "want"), CASES, ids=[c[0].summary() for c in CASES])
def test_fields(pkt: Ether, want: dict) -> None:
    key = extract(bytes(pkt), 3)
    assert key.in_port == 3 and key.dl_src == MAC_SRC and key.dl_dst == MAC_DST
    for name, value in want.items():
        assert getattr(key, name) == value, name
    if "dl_vlan" not in want:
        assert key.dl_vlan is None and key.dl_vlan_pcp is None


def test_qinq_outer_tag() -> None:
    key = extract(bytes(eth() / Dot1Q(vlan=9, type=0x0800) / IP()), 1)
    frame = bytearray(bytes(eth() / Dot1Q(vlan=9) / IP()))
    frame[12:14] = b"\x88\xa8"
    assert extract(bytes(frame), 1)[3:6] == key[3:6] == (0x0800, 9, 0)


def test_layout_offsets() -> None:
    _, lay = parse(bytes(eth() / Dot1Q(vlan=1) / IP(options=b"\x01" * 4) / TCP()), 1)
    assert lay == (12, 18, 18 + 24)
    _, lay = parse(bytes(eth() / ARP()), 1)
    assert lay == (-1, 14, -1)


@pytest.mark.parametrize("pkt", [c[0] for c in CASES])
def test_truncations_never_raise_and_drop_layers(pkt: Ether) -> None:
    raw = bytes(pkt)
    full = extract(raw, 1)
    for n in range(len(raw)):
        key = extract(raw[:n], 1)
        assert isinstance(key, FlowKey)
        for got, whole in zip(key, full):  # a prefix never invents a field
            assert got is None or got == whole
    assert extract(raw[:13], 1) == FlowKey(1)
    assert extract(memoryview(raw), 1) == full == extract(bytearray(raw), 1)


def test_truncated_l4_is_absent() -> None:
    raw = bytes(eth() / IP() / TCP())
    assert extract(raw[: 14 + 20 + 19], 1).tp_src is None
    assert extract(raw[: 14 + 20 + 20], 1).tp_src is not None


def test_bad_ip_headers() -> None:
    raw = bytearray(bytes(eth() / IP() / TCP()))
    raw[14] = 0x44  # IHL 4 < 5
    assert extract(bytes(raw), 1).nw_src is None
    raw[14] = 0x65  # version 6 in an IPv4 ethertype
    assert extract(bytes(raw), 1).nw_src is None
    raw6 = bytearray(bytes(eth() / IPv6() / UDP()))
    raw6[14] = 0x40
    assert extract(bytes(raw6), 1).ipv6_src is None
    arp = bytearray(bytes(eth() / ARP()))
    arp[14:16] = b"\x00\x06"  # not Ethernet hardware type
    assert extract(bytes(arp), 1).nw_src is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 0xFFFF))
def test_garbage_never_raises(data: bytes, in_port: int) -> None:
    key, _lay = parse(data, in_port)
    assert key.in_port == in_port
    hash(key)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00"]), st.binary(max_size=80)
)
def test_garbage_after_a_known_ethertype_never_raises(etype: bytes, rest: bytes) -> None:
    key = extract(b"\x02" * 12 + etype + rest, 1)
    hash(key)
