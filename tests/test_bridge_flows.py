"""The flow table in front of NORMAL, pure (manual clock): cache, generations, counters.

On both data paths (``both_paths`` from tests/test_bridge.py).  Rule counters are read
after ``Bridge.sync``, as dump-flows reads them (the compiled path credits them then).
"""

from pyswitch.bridge import Bridge
from pyswitch.port import PortCounters
from pyswitch.vlan import PortVlan
from tests.test_bridge import BCAST, both_paths, frame, mac  # noqa: F401 (autouse fixture)

TRUNK = PortVlan.make()


def bridge(n: int = 3, **kw) -> Bridge:
    br = Bridge("br0", **kw)
    for no in range(1, n + 1):
        br.add_port(no, f"p{no}", TRUNK, PortCounters())
    return br


def test_fresh_standalone_bridge_is_a_learning_switch_with_the_default_rule():
    br = bridge()
    assert [e.flow.priority for e in br.flows.entries()] == [0]
    out = br.process(1, [frame(BCAST, mac(1))] * 3, now=1)
    assert sorted(out) == [2, 3]
    br.sync(now=1)
    assert br.flows.entries()[0].n_packets == 3  # the default rule is credited
    assert br.stats.flow_cache_misses == 0  # and the fast path skipped key extraction


def test_secure_bridge_drops_on_table_miss():
    br = bridge(fail_mode="secure")
    assert br.process(1, [frame(BCAST, mac(1))], now=0) == {}
    assert br.ports[1].counters.drops == {"flow": 1}


def test_rule_takes_effect_on_the_very_next_frame_and_cache_is_used():
    br = bridge()
    f = frame(mac(2), mac(1))
    br.process(2, [frame(BCAST, mac(2))], now=0)  # learn mac(2) on port 2
    br.set_flows(["priority=0 actions=NORMAL", "priority=10,in_port=p1 actions=output:p3"], now=1)
    assert list(br.process(1, [f, f, f], now=1)) == [3]
    assert br.stats.flow_cache_misses == 1 and br.stats.flow_cache_hits == 2
    br.set_flows(["priority=0 actions=NORMAL", "priority=10,in_port=p1 actions=drop"], now=2)
    assert br.process(1, [f], now=2) == {}  # the cached output:p3 decision is stale
    assert br.ports[1].counters.drops["flow"] == 1
    br.set_flows(None, now=3)
    assert list(br.process(1, [f], now=3)) == [2]  # back to plain learning


def test_set_flows_keeps_counters_of_rules_that_stay():
    br = bridge()
    rules = ["priority=0 actions=NORMAL", "priority=5,in_port=p1 actions=output:p2"]
    br.set_flows(rules, now=0)
    br.process(1, [frame(BCAST, mac(1))] * 4, now=1)
    br.set_flows(rules + ["priority=6,in_port=p3 actions=drop"], now=2)
    kept = next(e for e in br.flows.entries() if e.flow.priority == 5)
    assert kept.n_packets == 4


def test_flood_all_and_in_port_outputs():
    br = bridge()
    br.set_flows(["in_port=p1 actions=flood", "in_port=p2 actions=in_port"], now=0)
    assert sorted(br.process(1, [frame(mac(9), mac(1))], now=0)) == [2, 3]
    assert list(br.process(2, [frame(mac(9), mac(2))], now=0)) == [2]


def test_vlan_push_and_rewrite_with_flows():
    br = bridge()
    br.set_flows(["in_port=p1 actions=mod_vlan_vid:42,output:p2"], now=0)
    out = br.process(1, [frame(BCAST, mac(1))], now=0)
    tagged = out[2][0]
    assert tagged[12:14] == b"\x81\x00" and int.from_bytes(tagged[14:16], "big") & 0xFFF == 42


def test_port_changes_invalidate_the_cache():
    br = bridge()
    br.set_flows(["actions=flood"], now=0)
    f = frame(BCAST, mac(1))
    assert sorted(br.process(1, [f], now=0)) == [2, 3]
    br.add_port(4, "p4", TRUNK, PortCounters())
    assert sorted(br.process(1, [f], now=0)) == [2, 3, 4]


def test_flow_timeouts_expire_through_the_bridge():
    br = bridge()
    br.set_flows(["priority=0 actions=NORMAL", "hard_timeout=5,priority=9,in_port=p1 actions=drop"], now=0)
    assert br.process(1, [frame(BCAST, mac(1))], now=1) == {}
    assert [e.removed_reason for e in br.expire(now=5)] == ["hard"]
    assert sorted(br.process(1, [frame(BCAST, mac(1))], now=6)) == [2, 3]


def test_ten_thousand_rules_in_and_out(datapath):
    """add-flows of 10,000 rules and replace-flows back to one (issue 10's scale): each
    rule is added once, replaced by its match, and removed with its table; both were
    quadratic (a 10,000-rule add-flows did not end in minutes)."""
    from pyswitch.edits import EDITS

    raw = {"bridges": {"br0": {"ports": {"a": {"type": "memory"}, "b": {"type": "memory"}}}}}
    texts = [f"priority=10,udp,tp_dst={i} actions=output:b" for i in range(10_000)]
    EDITS["add-flows"](raw, {"bridge": "br0", "flows": texts})
    EDITS["add-flows"](raw, {"bridge": "br0", "flows": ["priority=10,udp,tp_dst=7 actions=drop"]})
    flows = raw["bridges"]["br0"]["flows"]
    assert len(flows) == 10_001  # the default rule, 9,999 kept, one replaced (now last)
    assert flows[-1] == "priority=10,udp,tp_dst=7 actions=drop"
    br = Bridge("br0")
    br.add_port(1, "a", PortVlan.make(None, None, None), PortCounters())
    br.add_port(2, "b", PortVlan.make(None, None, None), PortCounters())
    br.set_flows(flows, 0.0)
    assert len(br.flows.entries()) == 10_001
    br.set_flows(["priority=0 actions=NORMAL"], 1.0)
    assert [str(e.flow.priority) for e in br.flows.entries()] == ["0"]
