"""ovs-ofctl flow syntax: round trips over every field and action, canonical
printing, filters, and error messages that name the field and the column."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyswitch.flows.format import format_flow, format_match
from pyswitch.flows.model import (
    DL_TYPE,
    DL_VLAN,
    IN_PORT,
    NW_PROTO,
    NW_SRC,
    TP_DST,
    Action,
    FlowSyntaxError,
    PortNames,
)
from pyswitch.flows.parse import parse_filter, parse_flow

PORTS = PortNames.from_dict({"vhu1": 1, "vhu2": 2, "tap0": 7})

# Each string is already in canonical (printed) form: parse then print gives it back.
CANONICAL = [
    "actions=drop",
    "priority=0 actions=NORMAL",
    "priority=100,in_port=vhu1 actions=output:vhu2",
    "in_port=5 actions=output:9",
    "dl_src=02:00:00:00:00:01 actions=FLOOD",
    "dl_dst=01:00:00:00:00:00/01:00:00:00:00:00 actions=ALL",
    "dl_src=aa:bb:cc:00:00:00/ff:ff:ff:00:00:00,dl_dst=ff:ff:ff:ff:ff:ff actions=IN_PORT",
    "dl_type=0x88cc actions=drop",
    "dl_vlan=10 actions=strip_vlan",
    "dl_vlan=0,dl_vlan_pcp=5 actions=mod_vlan_pcp:3",
    "vlan_tci=0x0000 actions=mod_vlan_vid:20",
    "dl_vlan_pcp=7 actions=push_vlan:0x8100",
    "dl_vlan=4095 actions=push_vlan:0x88a8",
    "ip actions=NORMAL",
    "ip,nw_src=10.0.0.1 actions=mod_nw_src:192.168.1.1",
    "ip,nw_dst=10.0.0.0/8 actions=mod_nw_dst:10.1.2.3",
    "ip,nw_src=10.0.0.0/255.0.255.0 actions=drop",
    "ip,nw_proto=47 actions=drop",
    "ip,nw_tos=184 actions=drop",
    "tcp actions=NORMAL",
    "tcp,tp_src=1024,tp_dst=80 actions=mod_tp_src:2048,mod_tp_dst:8080",
    "udp,tp_dst=0x1000/0xf000 actions=mod_tp_dst:53",
    "sctp,tp_dst=5000 actions=drop",
    "icmp actions=drop",
    "icmp,icmp_type=8,icmp_code=0 actions=drop",
    "ipv6 actions=NORMAL",
    "ipv6,ipv6_src=2001:db8::1 actions=drop",
    "ipv6,ipv6_dst=fe80::/10 actions=drop",
    "ipv6,ipv6_src=2001:0:db8::/ffff:0:ffff::,nw_tos=16 actions=drop",
    "tcp6,tp_dst=443 actions=mod_tp_dst:8443",
    "udp6,tp_src=546 actions=drop",
    "icmp6,icmp_type=135 actions=drop",
    "ipv6,nw_proto=89 actions=drop",
    "arp actions=FLOOD",
    "arp,arp_spa=10.0.0.1,arp_tpa=10.0.0.0/24,arp_op=1 actions=NORMAL",
    "actions=resubmit(,1)",
    "actions=resubmit:vhu1,resubmit(tap0,3),resubmit(vhu2,254)",
    "actions=mod_dl_src:02:00:00:00:00:aa,mod_dl_dst:02:00:00:00:00:bb,output:3,output:4",
    "cookie=0x1f, actions=drop",
    "table=3, priority=10 actions=drop",
    "idle_timeout=30, hard_timeout=600, priority=5,in_port=tap0 actions=output:vhu1",
    (
        "cookie=0xffffffffffffffff, table=254, idle_timeout=65535, hard_timeout=1, "
        "priority=65535,tcp,in_port=vhu1,dl_vlan=5,dl_vlan_pcp=1,dl_src=02:00:00:00:00:01,"
        "dl_dst=02:00:00:00:00:02,nw_src=1.2.3.4,nw_dst=5.6.7.0/24,nw_tos=8,tp_src=1,tp_dst=2 "
        "actions=mod_vlan_vid:6,mod_nw_dst:9.9.9.9,output:vhu2,NORMAL"
    ),
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_round_trip(text: str) -> None:
    flow = parse_flow(text, PORTS)
    assert format_flow(flow, PORTS) == text
    assert parse_flow(format_flow(flow, PORTS), PORTS) == flow
    # Without port names the printer falls back to numbers, which parse back too.
    assert parse_flow(format_flow(flow), None) == flow


# Non-canonical spellings and the canonical form each must print as.
EQUIVALENT = [
    (
        "in_port=vhu1,priority=100,actions=output:vhu2",
        "priority=100,in_port=vhu1 actions=output:vhu2",
    ),
    (
        "priority=100 in_port=vhu1 actions=output:vhu2",
        "priority=100,in_port=vhu1 actions=output:vhu2",
    ),
    ("in_port:vhu1, actions=output:vhu2", "in_port=vhu1 actions=output:vhu2"),
    ("nw_src=10.0.0.1,ip actions=drop", "ip,nw_src=10.0.0.1 actions=drop"),
    ("dl_type=0x0800,nw_proto=6 actions=drop", "tcp actions=drop"),
    ("dl_type=0x86dd,nw_proto=58 actions=drop", "icmp6 actions=drop"),
    ("dl_type=0x0806 actions=drop", "arp actions=drop"),
    ("arp,nw_src=10.0.0.1 actions=drop", "arp,arp_spa=10.0.0.1 actions=drop"),
    ("ip,nw_src=10.0.0.77/24 actions=drop", "ip,nw_src=10.0.0.0/24 actions=drop"),
    ("ip,nw_src=10.0.0.1/32 actions=drop", "ip,nw_src=10.0.0.1 actions=drop"),
    ("ip,nw_src=10.0.0.0/255.255.255.0 actions=drop", "ip,nw_src=10.0.0.0/24 actions=drop"),
    ("ip,nw_src=0.0.0.0/0 actions=drop", "ip actions=drop"),
    ("dl_vlan=0xffff actions=drop", "vlan_tci=0x0000 actions=drop"),
    ("dl_src=2:0:0:0:0:1 actions=drop", "dl_src=02:00:00:00:00:01 actions=drop"),
    ("tcp,tp_dst=0x50 actions=drop", "tcp,tp_dst=80 actions=drop"),
    ("tcp,tp_dst=80/0xffff actions=drop", "tcp,tp_dst=80 actions=drop"),
    ("actions=", "actions=drop"),
    ("actions=normal,flood,all,in_port", "actions=NORMAL,FLOOD,ALL,IN_PORT"),
    ("actions=3,4", "actions=output:3,output:4"),
    ("actions=pop_vlan", "actions=strip_vlan"),
    ("priority=32768 actions=drop", "actions=drop"),
    ("table=0,cookie=0 actions=drop", "actions=drop"),
    ("ip,dl_type=0x0800 actions=drop", "ip actions=drop"),
]


@pytest.mark.parametrize(("text", "canonical"), EQUIVALENT)
def test_equivalent_spellings(text: str, canonical: str) -> None:
    flow = parse_flow(text, PORTS)
    assert format_flow(flow, PORTS) == canonical
    assert parse_flow(canonical, PORTS) == flow


def test_parsed_values() -> None:
    f = parse_flow(
        "priority=7,tcp,in_port=tap0,nw_src=10.1.0.0/16,tp_dst=22 actions=output:vhu2,resubmit(,4)",
        PORTS,
    )
    assert f.priority == 7 and f.table == 0 and f.cookie == 0
    assert f.match.get(IN_PORT) == (7, 0xFFFF)
    assert f.match.get(DL_TYPE) == (0x0800, 0xFFFF)
    assert f.match.get(NW_PROTO) == (6, 0xFF)
    assert f.match.get(NW_SRC) == (0x0A010000, 0xFFFF0000)
    assert f.match.get(TP_DST) == (22, 0xFFFF)
    assert f.actions == (Action("output", 2), Action("resubmit", (None, 4)))
    assert parse_flow("dl_vlan=0xffff actions=drop").match.get(DL_VLAN) == (None, 0xFFF)


ERRORS = [
    (
        "in_port=1,ip,nw_src=10.0.0.300 actions=drop",
        "nw_src=10.0.0.300: not an IPv4 address (at column 14)",
    ),
    (
        "ip,nw_dst=10.0.0.1/33 actions=drop",
        "nw_dst=10.0.0.1/33: prefix length out of range (0..32) (at column 4)",
    ),
    (
        "ipv6,ipv6_src=2001:db8::zz actions=drop",
        "ipv6_src=2001:db8::zz: not an IPv6 address (at column 6)",
    ),
    (
        "dl_src=02:00:00:00:00 actions=drop",
        "dl_src=02:00:00:00:00: not an Ethernet address (want xx:xx:xx:xx:xx:xx) (at column 1)",
    ),
    ("priority=70000 actions=drop", "priority=70000: out of range (0..65535) (at column 1)"),
    ("priority=abc actions=drop", "priority=abc: not a number (at column 1)"),
    (
        "dl_vlan=4096 actions=drop",
        "dl_vlan=4096: VLAN id out of range (0..4095, or 0xffff for untagged) (at column 1)",
    ),
    ("dl_vlan_pcp=8 actions=drop", "dl_vlan_pcp=8: out of range (0..7) (at column 1)"),
    (
        "ip,nw_tos=5 actions=drop",
        "nw_tos=5: must be a multiple of 4 (the DSCP bits of the TOS byte) (at column 4)",
    ),
    ("in_port=nosuch actions=drop", "in_port=nosuch: no such port 'nosuch' (at column 1)"),
    ("bogus=1 actions=drop", "bogus=1: unknown field 'bogus' (at column 1)"),
    ("tcpp actions=drop", "tcpp: unknown field or protocol (expected field=value) (at column 1)"),
    ("in_port= actions=drop", "in_port=: missing value (at column 1)"),
    ("priority=1", "actions: missing: a flow needs actions=... (at column 11)"),
    (
        "nw_src=10.0.0.1 actions=drop",
        "nw_src=10.0.0.1: needs 'ip' or 'arp' in the match too (OVS prerequisite) (at column 1)",
    ),
    (
        "ipv6,nw_src=10.0.0.1 actions=drop",
        "nw_src=10.0.0.1: needs 'ip' or 'arp' in the match too (OVS prerequisite) (at column 6)",
    ),
    (
        "ip,arp_spa=10.0.0.1 actions=drop",
        "arp_spa=10.0.0.1: needs 'arp' in the match too (OVS prerequisite) (at column 4)",
    ),
    (
        "ip,tp_dst=80 actions=drop",
        (
            "tp_dst=80: needs 'tcp', 'udp' or 'sctp' (or their IPv6 forms) in the match too "
            "(OVS prerequisite) (at column 4)"
        ),
    ),
    (
        "tcp,icmp_type=8 actions=drop",
        "icmp_type=8: needs 'icmp' or 'icmp6' in the match too (OVS prerequisite) (at column 5)",
    ),
    (
        "ip,ipv6_dst=::1 actions=drop",
        "ipv6_dst=::1: needs 'ipv6' in the match too (OVS prerequisite) (at column 4)",
    ),
    (
        "nw_tos=4 actions=drop",
        "nw_tos=4: needs 'ip' or 'ipv6' in the match too (OVS prerequisite) (at column 1)",
    ),
    ("tcp,udp actions=drop", "udp: conflicts with earlier 'tcp' (at column 5)"),
    ("ip,dl_type=0x86dd actions=drop", "dl_type=0x86dd: conflicts with earlier 'ip' (at column 4)"),
    ("actions=output:nosuch", "output:nosuch: no such port 'nosuch' (at column 9)"),
    ("actions=output:0", "output:0: out of range (1..65279) (at column 9)"),
    ("actions=frobnicate", "frobnicate: unknown action (at column 9)"),
    ("actions=output", "output: output needs an argument (output:VALUE) (at column 9)"),
    ("actions=normal:1", "normal:1: normal takes no argument (at column 9)"),
    ("actions=output:1,drop", "drop: drop must be the only action (at column 18)"),
    ("actions=mod_vlan_vid:5000", "mod_vlan_vid:5000: out of range (0..4095) (at column 9)"),
    (
        "actions=push_vlan:0x0800",
        "push_vlan:0x0800: push_vlan takes 0x8100 or 0x88a8 (at column 9)",
    ),
    ("actions=resubmit(,255)", "resubmit(,255): out of range (0..254) (at column 9)"),
    ("actions=resubmit(,)", "resubmit(,): resubmit needs a port or a table (at column 9)"),
    (
        "actions=resubmit(1,2",
        ("resubmit(1,2: expected resubmit(PORT,TABLE) or resubmit:PORT (at column 9)"),
    ),
    (
        "priority=5 actions=mod_nw_src:1.2.3.4",
        "mod_nw_src:1.2.3.4: needs 'ip' in the match too (OVS prerequisite) (at column 20)",
    ),
    (
        "ipv6 actions=mod_nw_dst:1.2.3.4",
        "mod_nw_dst:1.2.3.4: needs 'ip' in the match too (OVS prerequisite) (at column 14)",
    ),
    (
        "ip actions=mod_tp_dst:80",
        "mod_tp_dst:80: needs 'tcp' or 'udp' in the match too (OVS prerequisite) (at column 12)",
    ),
    (
        "tcp actions=mod_nw_src:1.2.3.999",
        "mod_nw_src:1.2.3.999: not an IPv4 address (at column 13)",
    ),
    (
        "cookie=1/0xff actions=drop",
        "cookie=1/0xff: a cookie mask is only for mod-flows/del-flows/dump-flows (at column 1)",
    ),
    (
        "table=255 actions=drop",
        "table=255: table 255 means 'all tables' and cannot hold a flow (at column 1)",
    ),
    (
        "out_port=1 actions=drop",
        "out_port=1: out_port is only for mod-flows/del-flows/dump-flows (at column 1)",
    ),
    ("actions", "actions: expected actions=... (at column 1)"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_error_messages(text: str, message: str) -> None:
    with pytest.raises(FlowSyntaxError) as info:
        parse_flow(text, PORTS)
    assert str(info.value) == message
    err = info.value
    if err.reason.startswith("missing: a flow needs"):
        assert err.column == len(text) + 1  # just past the end
    else:  # the column points at the offending item in the input
        assert text[err.column - 1 :].startswith(err.token)


def test_filters() -> None:
    f = parse_filter("", PORTS)
    assert f.table is None and f.cookie_mask == 0 and f.out_port is None and len(f.match) == 0
    f = parse_filter("table=2,cookie=0x10/0xf0,out_port=vhu2,tcp", PORTS)
    assert (f.table, f.cookie, f.cookie_mask, f.out_port) == (2, 0x10, 0xF0, 2)
    assert format_match(f.match) == "tcp"
    assert parse_filter("cookie=0x5").cookie_mask == (1 << 64) - 1
    assert parse_filter("table=255").table is None
    m = parse_filter("priority=9,in_port=1 actions=output:2", with_actions=True)
    assert m.actions == (Action("output", 2),) and m.priority == 9
    with pytest.raises(FlowSyntaxError, match=r"actions=drop: actions are not allowed here"):
        parse_filter("in_port=1 actions=drop")
    with pytest.raises(FlowSyntaxError, match="timeouts are only for add-flow"):
        parse_filter("idle_timeout=5")
    with pytest.raises(FlowSyntaxError, match="missing: a flow needs actions"):
        parse_filter("in_port=1", with_actions=True)


def test_port_names_are_resolved_through_the_bridge() -> None:
    calls: list[object] = []

    def to_number(name: str) -> int | None:
        calls.append(name)
        return {"p": 42}.get(name)

    ports = PortNames(to_number, lambda n: "p" if n == 42 else None)
    f = parse_flow("in_port=p actions=output:p", ports)
    assert f.match.get(IN_PORT) == (42, 0xFFFF) and f.actions == (Action("output", 42),)
    assert calls == ["p", "p"]
    assert format_flow(f, ports) == "in_port=p actions=output:p"
    assert format_flow(f) == "in_port=42 actions=output:42"
    # names that start with a digit are names; all-digit text is a number
    ports = PortNames.from_dict({"1gig": 5, "9": 6})
    assert parse_flow("in_port=1gig actions=output:9", ports).match.get(IN_PORT) == (5, 0xFFFF)
    f = parse_flow("in_port=1gig actions=output:9", ports)
    assert f.actions == (Action("output", 9),)
    assert format_flow(parse_flow("in_port=6 actions=output:1gig", ports), ports) == (
        "in_port=6 actions=output:1gig"  # port 6 is named "9": printed as its number
    )


# ---- property: random valid flows print and parse back to themselves -----------------
_PROTOS = {  # shorthand -> fields it allows (beyond the L2 ones)
    "": [],
    "ip": ["nw_src", "nw_dst", "nw_proto", "nw_tos"],
    "tcp": ["nw_src", "nw_dst", "nw_tos", "tp_src", "tp_dst"],
    "udp": ["nw_src", "nw_dst", "tp_src", "tp_dst"],
    "icmp": ["nw_src", "icmp_type", "icmp_code"],
    "arp": ["arp_spa", "arp_tpa", "arp_op"],
    "ipv6": ["ipv6_src", "ipv6_dst", "nw_proto", "nw_tos"],
    "tcp6": ["ipv6_src", "tp_dst"],
    "icmp6": ["icmp_type", "icmp_code"],
}
_L2 = ["in_port", "dl_src", "dl_dst", "dl_vlan", "dl_vlan_pcp"]
_ip4 = st.builds(lambda *o: ".".join(map(str, o)), *[st.integers(0, 255)] * 4)
_mac = st.builds(lambda *o: ":".join(f"{x:02x}" for x in o), *[st.integers(0, 255)] * 6)
_VALUES = {
    "in_port": st.sampled_from(["vhu1", "vhu2", "tap0", "9", "65279"]),
    "dl_src": _mac | st.builds(lambda a, b: f"{a}/{b}", _mac, _mac),
    "dl_dst": _mac,
    "dl_vlan": st.integers(0, 4095).map(str) | st.just("0xffff"),
    "dl_vlan_pcp": st.integers(0, 7).map(str),
    "nw_src": _ip4 | st.builds(lambda a, n: f"{a}/{n}", _ip4, st.integers(0, 32)),
    "nw_dst": st.builds(lambda a, m: f"{a}/{m}", _ip4, _ip4),
    "arp_spa": _ip4,
    "arp_tpa": st.builds(lambda a, n: f"{a}/{n}", _ip4, st.integers(1, 32)),
    "arp_op": st.integers(0, 255).map(str),
    "nw_proto": st.sampled_from(["47", "89", "50"]),
    "nw_tos": st.integers(0, 63).map(lambda d: str(d * 4)),
    "tp_src": st.integers(0, 65535).map(str),
    "tp_dst": st.integers(0, 65535).map(hex)
    | st.builds(lambda v, m: f"{v:#x}/{m:#x}", st.integers(0, 65535), st.integers(0, 65535)),
    "icmp_type": st.integers(0, 255).map(str),
    "icmp_code": st.integers(0, 255).map(str),
    "ipv6_src": st.ip_addresses(v=6).map(str),
    "ipv6_dst": st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=6), st.integers(0, 128)),
}
_ACTIONS = st.sampled_from(
    [
        "output:vhu1",
        "output:3",
        "NORMAL",
        "flood",
        "all",
        "in_port",
        "strip_vlan",
        "mod_vlan_vid:5",
        "mod_vlan_pcp:2",
        "push_vlan:0x8100",
        "mod_dl_src:02:00:00:00:00:09",
        "mod_dl_dst:0a:00:00:00:00:01",
        "resubmit(,3)",
        "resubmit:vhu2",
        "resubmit(tap0,1)",
    ]
)


@st.composite
def flow_strings(draw: st.DrawFn) -> str:
    proto = draw(st.sampled_from(sorted(_PROTOS)))
    names = draw(st.lists(st.sampled_from(_L2 + _PROTOS[proto]), unique=True))
    items = [proto] if proto else []
    items += [f"{n}={draw(_VALUES[n])}" for n in names]
    for attr, hi in (
        ("priority", 65535),
        ("table", 254),
        ("cookie", 2**64 - 1),
        ("idle_timeout", 65535),
        ("hard_timeout", 65535),
    ):
        if draw(st.booleans()):
            items.append(f"{attr}={draw(st.integers(0, hi))}")
    items = draw(st.permutations(items))
    actions = draw(st.lists(_ACTIONS, max_size=5))
    return ",".join(items) + (" " if items else "") + "actions=" + ",".join(actions)


@settings(max_examples=200, deadline=None)
@given(flow_strings())
def test_random_flows_round_trip(text: str) -> None:
    flow = parse_flow(text, PORTS)
    printed = format_flow(flow, PORTS)
    assert parse_flow(printed, PORTS) == flow
    assert format_flow(parse_flow(printed, PORTS), PORTS) == printed  # printing is canonical
