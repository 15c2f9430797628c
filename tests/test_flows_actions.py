"""Actions: decisions (outputs, resubmit, limits), replay on other frames of the same
key (the flow cache contract), and header rewrites whose checksums scapy verifies by
recomputing them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Packet, Raw

from pyswitch.flows.actions import MAX_RESUBMIT_DEPTH, Decision, decide, execute
from pyswitch.flows.key import extract
from pyswitch.flows.model import PortNames
from pyswitch.flows.rewrite import csum_adjust
from pyswitch.flows.table import FlowTables, install_default

PORTS = PortNames.from_dict({"vhu1": 1, "vhu2": 2, "vhu3": 3})
SRC, DST = "02:00:00:00:00:01", "02:00:00:00:00:02"


def tables(*flows: str) -> FlowTables:
    t = FlowTables(ports=PORTS)
    for f in flows:
        t.add_flow(f, 0.0)
    return t


def run(t: FlowTables, pkt: Packet | bytes, in_port: int = 1) -> list:
    raw = bytes(pkt)
    return decide(t, extract(raw, in_port)).apply(raw)


def checksums_ok(raw: bytes) -> bool:
    """Each IPv4/TCP/UDP checksum in ``raw`` equals what scapy recomputes for it."""
    pkt = Ether(raw)
    for layer in (IP, TCP, UDP):
        if layer in pkt and not (layer is UDP and IP in pkt and pkt[UDP].chksum == 0):
            if layer is not IP and IP in pkt and pkt[IP].frag:
                continue
            clone = pkt.copy()
            del clone[layer].chksum
            if Ether(bytes(clone))[layer].chksum != pkt[layer].chksum:
                return False
    return True


# ---- outputs -----------------------------------------------------------------------
def test_output_kinds_and_in_port_rules() -> None:
    t = tables("in_port=1 actions=output:2,output:1,NORMAL,FLOOD,ALL,IN_PORT,output:3")
    pkt = bytes(Ether(src=SRC, dst=DST) / IP() / TCP())
    out = run(t, pkt)
    # output:1 to the ingress port is skipped, as in OVS; IN_PORT names the port
    assert [(k, p) for k, p, _ in out] == [
        ("output", 2),
        ("normal", None),
        ("flood", None),
        ("all", None),
        ("in_port", 1),
        ("output", 3),
    ]
    assert all(f is pkt for _, _, f in out)  # no rewrite: no copy
    assert run(t, pkt, in_port=2) == []  # table miss drops (no default rule)
    assert run(tables("actions=drop"), pkt) == []


def test_default_rule_is_normal() -> None:
    t = FlowTables()
    install_default(t, 0.0)
    assert [(k, p) for k, p, _ in run(t, b"\x00" * 5)] == [("normal", None)]


def test_outputs_see_rewrites_in_order() -> None:
    t = tables("ip actions=output:2,mod_nw_dst:10.9.9.9,output:3,mod_vlan_vid:7,output:2")
    pkt = bytes(Ether() / IP(dst="10.0.0.2") / UDP(sport=1, dport=2) / b"data")
    (_, p1, f1), (_, p2, f2), (_, p3, f3) = run(t, pkt)
    assert (p1, p2, p3) == (2, 3, 2)
    assert f1 is pkt
    assert Ether(f2)[IP].dst == "10.9.9.9" and Dot1Q not in Ether(f2)
    assert Ether(f3)[Dot1Q].vlan == 7 and Ether(f3)[IP].dst == "10.9.9.9"
    assert all(checksums_ok(f) for f in (f2, f3))


# ---- resubmit ----------------------------------------------------------------------
def test_resubmit_sees_rewrites_and_restores_in_port() -> None:
    t = tables(
        "table=0, in_port=1 actions=mod_vlan_vid:5,resubmit(,1),IN_PORT",
        "table=1, dl_vlan=5 actions=output:3,resubmit(2,2)",
        "table=2, in_port=2 actions=output:1",
        "table=1, dl_vlan=6 actions=output:2",
    )
    out = run(t, Ether() / IP())
    assert [(k, p) for k, p, _ in out] == [("output", 3), ("output", 1), ("in_port", 1)]
    d = decide(t, extract(bytes(Ether() / IP()), 1))
    assert [e.flow.table for e in d.entries] == [0, 1, 2]


def test_resubmit_to_missing_table_or_rule_is_a_no_op() -> None:
    t = tables("actions=resubmit(,15),resubmit(,3),output:2")
    assert [(k, p) for k, p, _ in run(t, Ether())] == [("output", 2)]
    t2 = FlowTables(n_tables=2)
    t2.add_flow("actions=resubmit(,200),output:2", 0.0)
    assert [(k, p) for k, p, _ in run(t2, Ether())] == [("output", 2)]


def test_resubmit_loop_is_bounded_and_counted() -> None:
    t = tables("actions=output:2,resubmit(,0)")
    d = decide(t, extract(bytes(Ether()), 1))
    assert d.overflow and d.ops == () and d.apply(bytes(Ether())) == []
    assert len(d.entries) == MAX_RESUBMIT_DEPTH + 1
    assert t.resubmit_overflows == 1


def test_resubmit_fan_out_is_bounded() -> None:
    # each table resubmits twice to the next: 2^15 paths without the total budget
    t = tables(
        *[f"table={i}, actions=resubmit(,{i + 1}),resubmit(,{i + 1})" for i in range(15)],
        "table=15, actions=output:2",
    )
    d = decide(t, extract(bytes(Ether()), 1))
    assert d.overflow and d.apply(bytes(Ether())) == []


# ---- counters and the cache contract -------------------------------------------------
def test_credit_counts_every_rule_traversed() -> None:
    t = tables("actions=resubmit(,1)", "table=1, actions=output:2")
    raw = bytes(Ether() / IP())
    d = decide(t, extract(raw, 1))
    d.credit(3, 3 * len(raw), now=4.0)
    assert [(e.n_packets, e.n_bytes, e.last_used) for e in t] == [(3, 3 * len(raw), 4.0)] * 2
    execute(t, extract(raw, 1), raw, now=5.0)
    assert [e.n_packets for e in t] == [4, 4]


def test_decision_replays_on_other_frames_of_the_same_key() -> None:
    t = tables("tcp actions=mod_nw_src:192.0.2.1,mod_tp_dst:8080,output:2")
    a = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=80) / b"a")
    b = bytes(
        Ether()
        / IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01" * 8, id=7)
        / TCP(sport=1, dport=80, seq=99)
        / (b"payload" * 30)
    )
    assert extract(a, 1) == extract(b, 1)
    d = decide(t, extract(a, 1))
    for raw in (a, b):
        ((_kind, port, out),) = d.apply(raw)
        p = Ether(out)
        assert (p[IP].src, p[TCP].dport, port) == ("192.0.2.1", 8080, 2)
        assert bytes(p[TCP].payload) == bytes(Ether(raw)[TCP].payload)
        assert checksums_ok(out)


def test_generation_invalidates_a_cache() -> None:
    """The bridge's cache, in miniature: a rule added must apply to the next frame."""
    t = tables("priority=0 actions=NORMAL")
    cache: dict = {}

    def forward(raw: bytes) -> list:
        key = extract(raw, 1)
        d = cache.get(key)
        if d is None or d.generation != t.generation:
            d = cache[key] = decide(t, key)
        return [(k, p) for k, p, _ in d.apply(raw)]

    raw = bytes(Ether() / IP() / UDP(dport=53))
    assert forward(raw) == [("normal", None)] and forward(raw) == [("normal", None)]
    t.add_flow("udp,tp_dst=53 actions=output:3", 1.0)
    assert forward(raw) == [("output", 3)]
    t.del_flows("udp")
    assert forward(raw) == [("normal", None)]
    t.add_flow("hard_timeout=1, actions=drop", 2.0)
    assert forward(raw) == []
    t.expire(3.0)
    assert forward(raw) == [("normal", None)]


# ---- rewrites, verified with scapy ---------------------------------------------------
REWRITE_CASES = [
    (
        "tcp actions=mod_nw_src:192.0.2.1",
        Ether() / IP(src="10.0.0.1") / TCP(),
        lambda p: p[IP].src == "192.0.2.1",
    ),
    (
        "tcp actions=mod_nw_dst:198.51.100.7",
        Ether() / Dot1Q(vlan=3) / IP(dst="10.0.0.1", options=b"\x01" * 4) / TCP() / b"xyz",
        lambda p: p[IP].dst == "198.51.100.7",
    ),
    (
        "udp actions=mod_nw_src:1.1.1.1",
        Ether() / IP() / UDP() / b"hello",
        lambda p: p[IP].src == "1.1.1.1" and p[UDP].chksum != 0,
    ),
    (
        "udp actions=mod_nw_src:1.1.1.1",
        Ether() / IP() / UDP(chksum=0) / b"hello",
        lambda p: p[IP].src == "1.1.1.1" and p[UDP].chksum == 0,
    ),
    (
        "icmp actions=mod_nw_dst:2.2.2.2",
        Ether() / IP() / ICMP() / b"ping",
        lambda p: p[IP].dst == "2.2.2.2" and p[ICMP].chksum == ICMP(bytes(ICMP() / b"ping")).chksum,
    ),
    (
        "ip actions=mod_nw_src:3.3.3.3",
        Ether() / IP(proto=6, frag=100) / (b"\x00" * 24),
        lambda p: p[IP].src == "3.3.3.3" and bytes(p[IP].payload) == b"\x00" * 24,
    ),
    (
        "tcp actions=mod_tp_src:4242,mod_tp_dst:443",
        Ether() / IP() / TCP(sport=1, dport=2),
        lambda p: (p[TCP].sport, p[TCP].dport) == (4242, 443),
    ),
    (
        "udp actions=mod_tp_dst:5353",
        Ether() / IP() / UDP(dport=53) / b"q",
        lambda p: p[UDP].dport == 5353,
    ),
    (
        "tcp6 actions=mod_tp_dst:8443",
        Ether() / IPv6() / TCP(dport=443) / b"tls",
        lambda p: p[TCP].dport == 8443,
    ),
    (
        "udp6 actions=mod_tp_src:547",
        Ether() / IPv6() / UDP(sport=546) / b"dhcp",
        lambda p: p[UDP].sport == 547,
    ),
    (
        "actions=mod_dl_src:02:aa:bb:cc:dd:ee,mod_dl_dst:ff:ff:ff:ff:ff:ff",
        Ether(src=SRC, dst=DST) / IP() / TCP(),
        lambda p: (p.src, p.dst) == ("02:aa:bb:cc:dd:ee", "ff:ff:ff:ff:ff:ff"),
    ),
    (
        "actions=mod_vlan_vid:42",
        Ether() / IP() / TCP(),
        lambda p: (p[Dot1Q].vlan, p[Dot1Q].prio, p.type) == (42, 0, 0x8100) and IP in p,
    ),
    (
        "actions=mod_vlan_vid:42",
        Ether() / Dot1Q(vlan=7, prio=5) / IP() / TCP(),
        lambda p: (p[Dot1Q].vlan, p[Dot1Q].prio) == (42, 5),
    ),
    (
        "actions=mod_vlan_pcp:6",
        Ether() / Dot1Q(vlan=7, prio=1) / IP(),
        lambda p: (p[Dot1Q].vlan, p[Dot1Q].prio) == (7, 6),
    ),
    ("actions=mod_vlan_pcp:6", Ether() / IP(), lambda p: (p[Dot1Q].vlan, p[Dot1Q].prio) == (0, 6)),
    (
        "actions=strip_vlan",
        Ether() / Dot1Q(vlan=7) / IP() / TCP(),
        lambda p: Dot1Q not in p and p.type == 0x0800 and TCP in p,
    ),
    ("actions=strip_vlan", Ether() / IP() / TCP(), lambda p: Dot1Q not in p and TCP in p),
    (
        "actions=push_vlan:0x8100",
        Ether() / IP(),
        lambda p: p.type == 0x8100 and p[Dot1Q].vlan == 0 and p[Dot1Q].type == 0x0800,
    ),
    (
        "actions=push_vlan:0x88a8",
        Ether() / Dot1Q(vlan=9, prio=2) / IP(),
        lambda p: (
            p.type == 0x88A8
            and (p.payload.vlan, p.payload.prio) == (9, 2)
            and p.payload.type == 0x8100
            and p[Dot1Q].vlan == 9
        ),
    ),
    (
        "actions=strip_vlan,push_vlan:0x8100,mod_vlan_vid:100",
        Ether() / Dot1Q(vlan=9) / IP(),
        lambda p: p[Dot1Q].vlan == 100 and p[Dot1Q].type == 0x0800,
    ),
]


@pytest.mark.parametrize(("flow", "pkt", "check"), REWRITE_CASES, ids=[c[0] for c in REWRITE_CASES])
def test_rewrite(flow: str, pkt: Packet, check) -> None:
    t = tables(flow + ",output:2")
    raw = bytes(pkt)
    ((kind, port, out),) = run(t, raw)
    assert (kind, port) == ("output", 2) and isinstance(out, bytes)
    p = Ether(out)
    assert check(p), p.show(dump=True)
    assert checksums_ok(out)


def test_truncated_frames_are_left_alone() -> None:
    t = tables("tcp actions=mod_tp_dst:1,mod_nw_src:1.2.3.4,output:2")
    raw = bytes(Ether() / IP() / TCP())[: 14 + 20 + 10]  # TCP header cut short
    ((_, _, out),) = run(t, raw)
    assert len(out) == len(raw) and out[14 + 20 :] == raw[14 + 20 :]
    assert Ether(out)[IP].src == "1.2.3.4" and checksums_ok(out[: 14 + 20])


def test_csum_adjust_matches_rfc1624_example() -> None:
    # RFC 1624 §4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000
    assert csum_adjust(0xDD2F, b"\x55\x55", b"\x32\x85") == 0x0000


@settings(max_examples=60, deadline=None)
@given(
    src=st.ip_addresses(v=4),
    new=st.ip_addresses(v=4),
    sport=st.integers(0, 65535),
    nport=st.integers(0, 65535),
    payload=st.binary(max_size=40),
    udp=st.booleans(),
)
def test_rewrite_checksums_property(
    src, new, sport: int, nport: int, payload: bytes, udp: bool
) -> None:
    proto, l4 = ("udp", UDP(sport=sport)) if udp else ("tcp", TCP(sport=sport))
    t = tables(f"{proto} actions=mod_nw_src:{new},mod_tp_src:{nport},output:2")
    ((_, _, out),) = run(t, Ether() / IP(src=str(src)) / l4 / Raw(payload))
    p = Ether(out)
    assert p[IP].src == str(new) and p[l4.__class__].sport == nport
    assert checksums_ok(out)


def test_decision_properties() -> None:
    t = tables("tcp actions=mod_tp_dst:1,output:2,NORMAL")
    d = decide(t, extract(bytes(Ether() / IP() / TCP()), 1))
    assert isinstance(d, Decision) and d.rewrites and d.generation == t.generation
    assert d.outputs == (("output", 2), ("normal", None))
    hash(d.ops)


def test_checksum_oracle_detects_corruption() -> None:
    """Guard against a vacuous oracle: a wrong checksum must be caught."""
    for pkt, at in (
        (Ether() / IP() / TCP(), 14 + 20 + 16),
        (Ether() / IP() / UDP(), 14 + 20 + 6),
        (Ether() / IP() / TCP(), 14 + 10),
    ):
        raw = bytearray(bytes(pkt))
        assert checksums_ok(bytes(raw))
        raw[at] ^= 0x01
        assert not checksums_ok(bytes(raw))
