"""FlowTables: add/replace, modify, delete, lookup order against a brute-force
reference, timeouts on a manual clock, the generation, dump-flows and JSON forms."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyswitch.flows.format import entry_to_dict, format_dump_line, format_duration
from pyswitch.flows.key import FlowKey
from pyswitch.flows.model import FULL_MASK, Action, Flow, FlowFilter, Match, PortNames
from pyswitch.flows.parse import parse_flow
from pyswitch.flows.table import FlowEntry, FlowTables, install_default

PORTS = PortNames.from_dict({"vhu1": 1, "vhu2": 2, "vhu3": 3})


def tables(*flows: str, now: float = 0.0) -> FlowTables:
    t = FlowTables(ports=PORTS)
    for f in flows:
        t.add_flow(f, now)
    return t


def texts(t: FlowTables) -> list[str]:
    from pyswitch.flows.format import format_flow

    return [format_flow(e.flow, PORTS) for e in t]


def tcp_key(in_port: int = 1, dst: int = 80) -> FlowKey:
    return FlowKey(in_port, 1, 2, 0x0800, None, None, 0x0A000001, 0x0A000002, 6, 0, 999, dst)


_FIVE = (
    "cookie=0x11, priority=10,tcp,in_port=1 actions=output:2",
    "cookie=0x12, priority=20,tcp actions=output:3",
    "cookie=0x21, priority=30,in_port=1 actions=output:3",
    "cookie=0x22, table=1, priority=10,in_port=1 actions=output:2",
    "priority=0 actions=NORMAL",
)


# ---- add / replace / modify / delete --------------------------------------------------
def test_add_replaces_identical_match_and_priority() -> None:
    t = tables("priority=10,in_port=1 actions=output:2")
    first = t.lookup(tcp_key())
    assert first is not None
    first.credit(3, 300, 1.0)
    gen = t.generation
    new = t.add_flow("priority=10,in_port=1 actions=output:3", now=5.0)
    assert len(t) == 1 and t.generation == gen + 1
    assert t.lookup(tcp_key()) is new and new.flow.actions == (Action("output", 3),)
    assert (new.n_packets, new.n_bytes, new.created) == (0, 0, 5.0)  # ADD clears counters
    assert first.removed_reason == "replaced"
    t.add_flow("priority=11,in_port=1 actions=output:2", 6.0)  # other priority: coexists
    t.add_flow("table=1,priority=10,in_port=1 actions=output:2", 6.0)  # other table too
    assert len(t) == 3


def test_modify_keeps_counters_and_respects_strictness() -> None:
    t = tables(
        "priority=10,tcp,in_port=1 actions=output:2",
        "priority=20,tcp actions=output:3",
        "priority=5,udp actions=NORMAL",
    )
    e = t.lookup(tcp_key())
    assert e is not None and e.flow.priority == 20
    e.credit(2, 100, 1.0)
    gen = t.generation
    changed = t.mod_flows("tcp actions=drop", now=7.0)  # non-strict: both tcp rules
    assert len(changed) == 2 and t.generation == gen + 1
    assert all(c.flow.actions == () for c in changed)
    assert (e.n_packets, e.n_bytes, e.created, e.modified) == (2, 100, 0.0, 7.0)
    assert t.mod_flows("tcp actions=output:1", now=8.0, strict=True) == []  # prio differs
    assert len(t.mod_flows("priority=20,tcp actions=output:1", now=8.0, strict=True)) == 1
    assert len(t.mod_flows("sctp actions=drop", now=9.0)) == 0 and len(t) == 3
    assert t.generation == gen + 2  # a modify that changes nothing is not a change


def test_delete_non_strict_strict_cookie_out_port() -> None:
    t = tables(*_FIVE)
    # non-strict: deletes rules at least as specific as the filter, in every table
    gone = t.del_flows("in_port=1")
    assert sorted(e.flow.cookie for e in gone) == [0x11, 0x21, 0x22]
    assert all(e.removed_reason == "delete" for e in gone)
    t = tables(*_FIVE)
    assert [e.flow.cookie for e in t.del_flows("tcp,in_port=1")] == [0x11]
    assert t.del_flows("priority=10,tcp", strict=True) == []  # match differs
    assert len(t.del_flows("priority=20,tcp", strict=True)) == 1
    t = tables(*_FIVE)
    assert sorted(e.flow.cookie for e in t.del_flows("cookie=0x20/0xf0")) == [0x21, 0x22]
    t = tables(*_FIVE)
    assert sorted(e.flow.cookie for e in t.del_flows("out_port=vhu3")) == [0x12, 0x21]
    t = tables(*_FIVE)
    assert [e.flow.cookie for e in t.del_flows("table=1")] == [0x22]
    gen = t.generation
    assert len(t.del_flows()) == 4 and len(t) == 0 and t.generation == gen + 1
    assert t.del_flows() == [] and t.generation == gen + 1


def test_non_strict_masks_cover_only_narrower_rules() -> None:
    t = tables(
        "ip,nw_src=10.0.0.0/8 actions=drop",
        "ip,nw_src=10.1.0.0/16 actions=drop",
        "ip,nw_src=11.0.0.0/16 actions=drop",
        "vlan_tci=0x0000 actions=drop",
        "dl_vlan=3 actions=drop",
    )
    assert len(t.del_flows("ip,nw_src=10.0.0.0/8")) == 2
    assert len(t.del_flows("vlan_tci=0x0000")) == 1
    assert len(t) == 2


def test_table_range_and_default_rule() -> None:
    t = FlowTables(n_tables=2)
    with pytest.raises(ValueError, match="tables 0..1"):
        t.add(parse_flow("table=2 actions=drop"), 0.0)
    assert t.lookup(tcp_key()) is None  # secure mode: empty, a miss
    e = install_default(t, 0.0)
    assert t.lookup(tcp_key()) is e and t.lookup(FlowKey(9)) is e
    assert t.dump_flows(0.0) == [
        (
            " cookie=0x0, duration=0s, table=0, n_packets=0, n_bytes=0, "
            "idle_age=0, priority=0 actions=NORMAL"
        )
    ]


def test_lookup_priority_then_first_added() -> None:
    t = tables(
        "priority=5,in_port=1 actions=output:2",
        "priority=5,tcp actions=output:3",
        "priority=5,tcp,tp_dst=80 actions=NORMAL",
    )
    assert t.lookup(tcp_key()).flow.actions == (Action("output", 2),)  # added first
    t.add_flow("priority=6,tcp,tp_dst=80 actions=FLOOD", 1.0)
    assert t.lookup(tcp_key()).flow.actions == (Action("flood"),)
    # replacing the first rule makes it the newest: the next oldest wins the tie
    t.del_flows("priority=6,tcp,tp_dst=80", strict=True)
    t.add_flow("priority=5,in_port=1 actions=output:9", 2.0)
    assert t.lookup(tcp_key()).flow.actions == (Action("output", 3),)
    # modify keeps a rule's place
    t.mod_flows("priority=5,tcp actions=ALL", 3.0, strict=True)
    assert t.lookup(tcp_key()).flow.actions == (Action("all"),)


# ---- brute-force reference ------------------------------------------------------------
def reference_lookup(rules: list[FlowEntry], key: FlowKey, table: int = 0) -> FlowEntry | None:
    """Every rule tested in turn; highest priority, then lowest seq."""
    best = None
    for e in rules:
        if e.flow.table != table or not e.flow.match.matches(key):
            continue
        if best is None or (e.flow.priority, -e.seq) > (best.flow.priority, -best.seq):
            best = e
    return best


MACS = [0x020000000001, 0x020000000002, 0x030000000001]
IPS = [0x0A000001, 0x0A000101, 0x0B000001]


@st.composite
def conditions(draw: st.DrawFn) -> Match:
    conds: dict[int, tuple[int | None, int]] = {}
    if draw(st.booleans()):
        conds[0] = (draw(st.sampled_from([1, 2, 3])), 0xFFFF)
    if draw(st.booleans()):
        conds[1] = (
            draw(st.sampled_from(MACS)),
            draw(st.sampled_from([FULL_MASK[1], 0xFF0000000000, 0x010000000000])),
        )
    if draw(st.booleans()):
        conds[3] = (draw(st.sampled_from([0x0800, 0x0806, 0x86DD])), 0xFFFF)
    if draw(st.booleans()):
        conds[4] = (draw(st.sampled_from([None, 1, 2])), 0xFFF)
    if draw(st.booleans()):
        conds[6] = (
            draw(st.sampled_from(IPS)),
            draw(st.sampled_from([0xFFFFFFFF, 0xFFFFFF00, 0xFF000000])),
        )
    if draw(st.booleans()):
        conds[11] = (
            draw(st.sampled_from([80, 443, 0x50])),
            draw(st.sampled_from([0xFFFF, 0xFF00])),
        )
    return Match.of(conds)


keys = st.builds(
    lambda port, src, dtype, vlan, nw, tp: FlowKey(
        port,
        src,
        0,
        dtype,
        vlan,
        None if vlan is None else 0,
        nw if dtype in (0x0800, 0x0806) else None,
        None,
        None,
        None,
        None,
        tp if dtype == 0x0800 else None,
    ),
    st.sampled_from([1, 2, 3]),
    st.sampled_from(MACS),
    st.sampled_from([0x0800, 0x0806, 0x86DD, None]),
    st.sampled_from([None, 1, 2]),
    st.sampled_from(IPS + [0x0A0000FF]),
    st.sampled_from([80, 443, 81, 0x5050]),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(conditions(), st.integers(0, 3), st.integers(0, 1)), max_size=25),
    st.lists(st.integers(0, 30), max_size=6),
    st.lists(keys, min_size=1, max_size=15),
)
def test_classifier_matches_brute_force(rules: list, deletions: list, probe: list) -> None:
    t = FlowTables(n_tables=2)
    for i, (match, prio, table) in enumerate(rules):
        t.add(Flow(match=match, priority=prio, table=table, cookie=i), float(i))
    for d in deletions:  # strict deletes exercise subtable removal
        if len(t):
            v = t.entries()[d % len(t)].flow
            filt = FlowFilter(match=v.match, table=v.table, priority=v.priority)
            assert len(t.delete(filt, strict=True)) == 1
    rules = t.entries()
    for key in probe:
        for table in (0, 1):
            assert t.lookup(key, table) is reference_lookup(rules, key, table)


# ---- timeouts on a manual clock -------------------------------------------------------
def test_idle_and_hard_timeouts() -> None:
    t = tables(
        "idle_timeout=10, in_port=1 actions=output:2",
        "hard_timeout=30, in_port=2 actions=output:1",
        "idle_timeout=10, hard_timeout=15, in_port=3 actions=drop",
        "in_port=4 actions=drop",
    )
    idle, hard, both, forever = t.entries()
    assert t.expire(9.9) == []
    idle.credit(1, 60, 9.0)  # traffic refreshes the idle clock
    both.credit(1, 60, 9.0)
    assert t.expire(10.0) == []
    gen = t.generation
    assert t.expire(15.0) == [both] and both.removed_reason == "hard"  # despite traffic
    assert t.generation == gen + 1
    assert t.expire(18.9) == []
    assert t.expire(19.0) == [idle] and idle.removed_reason == "idle"
    t.mod_flows("in_port=2 actions=drop", now=20.0)  # hard timeout counts from the modify
    assert t.expire(49.9) == []
    assert t.expire(50.0) == [hard] and hard.removed_reason == "hard"
    assert t.entries() == [forever] and t.expire(1e9) == []


# ---- dump-flows and JSON --------------------------------------------------------------
def test_dump_line_shape() -> None:
    t = tables("priority=100,in_port=vhu1 actions=output:vhu2")
    e = t.entries()[0]
    e.credit(5, 420, 0.0)
    line = format_dump_line(e, 1.2, PORTS)
    assert line == (
        " cookie=0x0, duration=1.200s, table=0, n_packets=5, n_bytes=420, "
        "idle_age=1, priority=100,in_port=vhu1 actions=output:vhu2"
    )
    t = tables(
        "cookie=0xab, table=2, idle_timeout=60, hard_timeout=300, tcp,tp_dst=22 actions=drop",
        now=100.0,
    )
    e = t.entries()[0]
    e.credit(1, 64, 101.5)
    t.mod_flows("tcp actions=NORMAL", now=104.0)
    assert t.dump_flows(110.25) == [
        (
            " cookie=0xab, duration=10.250s, table=2, n_packets=1, n_bytes=64, idle_timeout=60, "
            "hard_timeout=300, idle_age=8, hard_age=6, tcp,tp_dst=22 actions=NORMAL"
        )
    ]
    assert format_duration(3.0) == "3s" and format_duration(0.0014) == "0.001s"
    assert format_duration(59.9996) == "60s"


def test_dump_order_and_filter() -> None:
    t = tables(
        "table=1, priority=5 actions=drop",
        "priority=1 actions=drop",
        "priority=9,in_port=1 actions=output:2",
        "priority=1,in_port=2 actions=drop",
    )
    assert [l.split(", ", 6)[-1] for l in t.dump_flows(0.0)] == [
        "priority=9,in_port=vhu1 actions=output:vhu2",
        "priority=1 actions=drop",
        "priority=1,in_port=vhu2 actions=drop",
        "priority=5 actions=drop",
    ]
    assert len(t.dump_flows(0.0, "table=1")) == 1
    assert len(t.dump_flows(0.0, "out_port=vhu2")) == 1


def test_json_form() -> None:
    t = tables(
        "cookie=0x7, priority=100,tcp,in_port=vhu1,nw_src=10.0.0.0/24 "
        "actions=mod_tp_dst:8080,output:vhu2"
    )
    d = entry_to_dict(t.entries()[0], 2.5, PORTS)
    assert json.loads(json.dumps(d)) == d
    assert d["match"] == {"tcp": True, "in_port": "vhu1", "nw_src": "10.0.0.0/24"}
    assert d["actions"] == ["mod_tp_dst:8080", "output:vhu2"]
    assert (d["priority"], d["cookie"], d["duration"], d["n_packets"]) == (100, "0x7", 2.5, 0)
    assert parse_flow(d["flow"], PORTS) == t.entries()[0].flow


def test_invalidate_bumps_generation() -> None:
    t = FlowTables()
    g = t.generation
    t.invalidate()
    assert t.generation == g + 1
