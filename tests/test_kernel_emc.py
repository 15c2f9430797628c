"""The ``_emc`` kernel and the bridge's compiled path: cache use, invalidation, harvest.

Every change a decision depends on must show on the very next frame (rules, MAC
moves, aging, flushes, VLAN settings, ports), and frames forwarded from the cache
must still keep rules and MACs alive (the harvest).  The kernel is loaded directly
(``load_kernel``), so these tests also run in the sanitizer build
(``PYSWITCH_KERNEL_DIR``).
"""

from __future__ import annotations

import pytest

from pyswitch.bridge import Bridge
from pyswitch.fastpath import load_kernel
from pyswitch.port import PortCounters
from pyswitch.vlan import PortVlan
from tests.test_bridge import BCAST, frame, mac

EMC = load_kernel("_emc")
TRUNK = PortVlan.make()


def bridge(n: int = 3, **kw) -> Bridge:
    br = Bridge("br0", kernel=EMC, **kw)
    for no in range(1, n + 1):
        br.add_port(no, f"p{no}", TRUNK, PortCounters())
    assert br.datapath == "compiled"
    return br


def learned(br: Bridge, *macs: int, now: float = 0) -> None:
    """Port ``n`` learns ``mac(n)`` (a broadcast from it)."""
    for n in macs:
        br.process(n, [frame(BCAST, mac(n))], now)


def test_cache_is_used_one_miss_then_hits() -> None:
    br = bridge()
    br.set_flows(["priority=0 actions=NORMAL", "priority=5,tcp actions=drop"], now=0)
    learned(br, 1, 2)
    f = frame(mac(2), mac(1))
    before = br.stats.flow_cache_misses, br.stats.flow_cache_hits
    out = br.process(1, [f] * 32, now=1)
    assert out == {2: [f] * 32} and all(x is f for x in out[2])
    assert br.stats.flow_cache_misses - before[0] == 1
    assert br.stats.flow_cache_hits - before[1] == 31
    assert br.stats.forwarded == 32
    assert len(br._fast.cache) >= 1


def test_rule_added_or_deleted_takes_effect_on_the_very_next_frame() -> None:
    br = bridge()
    learned(br, 1, 2)
    f = frame(mac(2), mac(1))
    assert br.process(1, [f, f], now=1) == {2: [f, f]}
    br.flows.add_flow("priority=9,in_port=p1 actions=output:p3", now=1)  # as the daemon does
    assert br.process(1, [f], now=1) == {3: [f]}
    br.flows.del_flows("in_port=p1")
    assert br.process(1, [f], now=1) == {2: [f]}
    br.set_flows(["priority=0 actions=NORMAL", "priority=9 actions=drop"], now=2)
    assert br.process(1, [f], now=2) == {}
    assert br.ports[1].counters.drops == {"flow": 1}


def test_mac_moving_port_is_followed_at_once() -> None:
    br = bridge()
    learned(br, 1, 2)
    f = frame(mac(2), mac(1))
    assert list(br.process(1, [f] * 4, now=1)) == [2]
    br.process(3, [frame(BCAST, mac(2))], now=1)  # mac(2) now lives behind port 3
    assert list(br.process(1, [f], now=1)) == [3]


def test_destination_aging_out_floods_again() -> None:
    br = bridge(aging_time=5)
    learned(br, 1, 2)
    f = frame(mac(2), mac(1))
    for t in range(1, 5):
        assert list(br.process(1, [f], now=t)) == [2]  # cached, mac(2) last seen at 0
    assert sorted(br.process(1, [f], now=5)) == [2, 3]  # 5 s after: aged, floods


def test_cached_frames_keep_their_source_mac_alive() -> None:
    """mac(2) is only ever seen in frames forwarded from the cache: the harvest
    refreshes it, so frames to it keep going to port 2 after the aging time, and the
    periodic sweep does not remove it."""
    br = bridge(aging_time=5)
    learned(br, 1, 2)
    to2, to1 = frame(mac(2), mac(1)), frame(mac(1), mac(2))
    for t in range(1, 13):
        assert list(br.process(2, [to1] * 3, now=t)) == [1]
        assert list(br.process(1, [to2] * 3, now=t)) == [2]
        br.expire(now=t)
    assert {(no, m) for no, _vlan, m, _age in br.fdb.entries(12)} == {
        (1, bytes.fromhex("020000000001")), (2, bytes.fromhex("020000000002"))}


def test_fdb_flush_vlan_change_and_port_removal_apply_to_the_next_frame() -> None:
    br = bridge(n=4)
    learned(br, 1, 2)
    f = frame(mac(2), mac(1))
    assert list(br.process(1, [f] * 2, now=1)) == [2]
    br.fdb.flush()  # fdb/flush from the daemon
    assert sorted(br.process(1, [f], now=1)) == [2, 3, 4]
    learned(br, 2)
    assert list(br.process(1, [f], now=1)) == [2]
    br.set_port_vlan(2, PortVlan.make(tag=20))  # port 2 leaves VLAN 0
    assert sorted(br.process(1, [f], now=1)) == [3, 4]
    br.remove_port(3)
    assert sorted(br.process(1, [f], now=1)) == [4]


def test_flow_counters_and_idle_timeout_follow_cached_traffic() -> None:
    br = bridge()
    br.set_flows(["priority=0 actions=NORMAL", "idle_timeout=3,priority=5,in_port=p1 actions=output:p2"],
                 now=0)
    f = frame(mac(2), mac(1))
    for t in range(1, 10):
        assert br.process(1, [f] * 4, now=t) == {2: [f] * 4}
        assert br.expire(now=t) == []  # kept alive by frames the kernel forwarded
    br.sync(now=9)
    rule = next(e for e in br.flows.entries() if e.flow.priority == 5)
    assert (rule.n_packets, rule.n_bytes, rule.last_used) == (36, 36 * len(f), 9)
    assert [e.removed_reason for e in br.expire(now=12)] == ["idle"]


def test_malformed_frames_are_never_cached_and_always_counted() -> None:
    br = bridge()
    assert br.process(1, [b"\x01" * 13, b"", b"\x02" * 5], now=0) == {}
    assert br.ports[1].counters.drops == {"malformed": 3}
    assert len(br._fast.cache) == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_buffer_is_forwarded_as_the_same_object(kind) -> None:
    br = bridge()
    frames = [kind(frame(BCAST, mac(1), payload=bytes([i]) * 46)) for i in range(8)]
    out = br.process(1, frames, now=0)
    assert sorted(out) == [2, 3] and all(a is b for a, b in zip(out[2], frames))
    assert out[3] == out[2]


def test_tag_edits_are_new_bytes_shared_by_one_form() -> None:
    br = Bridge("br0", kernel=EMC)
    for no, v in {1: PortVlan.make(tag=7), 2: TRUNK, 3: TRUNK, 4: PortVlan.make(tag=7)}.items():
        br.add_port(no, f"p{no}", v, PortCounters())
    f = frame(BCAST, mac(1))
    for _ in range(2):  # the first frame misses, the second hits
        out = br.process(1, [f], now=0)
        assert out[2][0] is out[3][0] and out[2][0] is not f and out[4][0] is f
        assert out[2][0][12:16] == b"\x81\x00\x00\x07" and out[2][0][16:] == f[12:]


def test_small_cache_replaces_entries_and_stays_correct() -> None:
    cache = EMC.Cache(4)
    assert cache.capacity == 4
    lists: list = [None, None]
    order: list = []
    prog = [(EMC.OPCODES["emit"], 0, 0, 0, 0), (EMC.OPCODES["out"], 0, 1, 0, 0)]
    frames = [frame(mac(2), mac(n)) for n in range(1, 20)]
    for i in range(len(frames)):
        _slot, nxt = cache.install(True, prog, (0, 1, 0, 0, 0), False, 0.0, 300.0, frames, i, 1, 0.0,
                                  lists, order)
        assert nxt == i + 1 or nxt <= len(frames)
    assert len(cache) <= 4
    assert cache.run(frames, 0, 1, 0.0, lists, order) < len(frames)  # most were replaced
    assert order == [1] and lists[0] is None
    with pytest.raises(ValueError):
        EMC.Cache(6)


def test_deadline_and_clear() -> None:
    cache = EMC.Cache(64)
    lists: list = [None]
    order: list = []
    f = frame(mac(2), mac(1))
    prog = [(EMC.OPCODES["emit"], 0, 0, 0, 0), (EMC.OPCODES["out"], 0, 0, 0, 0)]
    cache.install(True, prog, (0, 1, 0, 0, 0), True, 10.0, 5.0, [f], 0, 1, 10.0, lists, order)
    assert cache.run([f, f], 0, 1, 14.9, lists, order) == 2  # 4.9 s after the lookup: valid
    assert cache.run([f], 0, 1, 15.0, lists, order) == 0  # 5 s: the MAC may have aged
    assert cache.take_counts()[:3] == (2, 0, 3)  # 2 hits, 3 frames forwarded
    [(_slot, packets, nbytes, last, _seq)] = cache.harvest()
    assert (packets, nbytes, last) == (2, 2 * len(f), 14.9)  # the hits (install credits its own)
    assert cache.harvest() == []
    cache.clear()
    assert len(cache) == 0 and cache.run([f], 0, 1, 11.0, lists, order) == 0


def _rewrite_frames() -> list[bytes]:
    """Frames every rewrite meets: TCP, UDP with and without checksum (IPv4 and IPv6),
    ICMP, IP options, fragments, tags, and truncations of each."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Dot1Q, Ether

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    pkts = [eth / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1234, dport=80) / b"data",
            eth / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=53, dport=53) / b"q",
            eth / IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01\x01\x01\x00") / UDP(dport=9),
            eth / IP(dst="10.0.0.2", frag=3) / (b"x" * 20),
            eth / IP(dst="10.0.0.2") / ICMP(),
            eth / Dot1Q(vlan=5, prio=3) / IP(dst="10.0.0.2") / TCP(dport=22),
            eth / IPv6(src="fe80::1", dst="fe80::2") / UDP(dport=53) / b"q",
            eth / IPv6(src="fe80::1", dst="fe80::2") / TCP(dport=80)]
    out = []
    for p in pkts:
        raw = bytes(p)
        out += [raw, raw[:-3], raw[:30]]
        if UDP in p:
            udp_at = len(raw) - len(bytes(p[UDP]))
            out.append(raw[: udp_at + 6] + b"\x00\x00" + raw[udp_at + 8 :])  # no checksum
    return out


@pytest.mark.parametrize(("match", "action"), [
    ("ip", "mod_nw_src:192.168.1.1"), ("ip", "mod_nw_dst:10.9.9.9"), ("tcp", "mod_tp_src:4444"),
    ("udp", "mod_tp_dst:65535"), ("udp6", "mod_tp_src:1"), ("tcp6", "mod_tp_dst:8080"),
    ("", "mod_dl_src:02:aa:00:00:00:01"), ("", "mod_dl_dst:02:bb:00:00:00:02"), ("", "mod_vlan_vid:7"),
    ("", "mod_vlan_pcp:6"), ("", "strip_vlan"), ("", "push_vlan:0x88a8"),
    ("udp", "mod_vlan_vid:9,mod_nw_dst:1.2.3.4,mod_tp_dst:7,strip_vlan,mod_nw_src:1.1.1.1"),
])
def test_rewrites_match_the_python_path_byte_for_byte(match: str, action: str) -> None:
    """Each rewrite, with its RFC 1624 checksum update, on every kind of frame: the
    compiled path's bytes are the Python path's (the first frames miss, the third
    of each key runs from the cache)."""
    frames = _rewrite_frames()
    rule = f"priority=5,{match} actions={action},output:p2,NORMAL".replace(",,", ",")
    py, fast = Bridge("br0", kernel=None), bridge()
    for br in (py, fast):
        if br is py:
            for no in (1, 2, 3):
                br.add_port(no, f"p{no}", TRUNK, PortCounters())
        br.set_flows([rule], now=0)
    for f in frames:
        want = py.process(1, [f, f, f], now=1)
        got = fast.process(1, [f, f, f], now=1)
        assert {k: [bytes(x) for x in v] for k, v in got.items()} == {
            k: [bytes(x) for x in v] for k, v in want.items()}, f.hex()


def test_default_normal_keys_hold_only_l2_and_rules_need_the_full_key() -> None:
    """With only the default rule, 200 UDP flows between two hosts share one entry;
    with a rule on UDP ports each flow has its own (the rule reads them)."""
    import struct

    def udp(sport: int) -> bytes:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes(4), bytes(4))
        return frame(mac(2), mac(1), payload=ip + struct.pack("!HHHH", sport, 53, 8, 0) + bytes(18))

    flows = [udp(1000 + i) for i in range(200)]
    br = bridge()
    learned(br, 1, 2)
    assert br.process(1, flows, now=1) == {2: flows}
    assert len(br._fast.cache) == 1
    br.set_flows(["priority=0 actions=NORMAL", "priority=5,udp,tp_src=1 actions=drop"], now=1)
    assert br.process(1, flows, now=1) == {2: flows}
    assert len(br._fast.cache) == 200 and br.stats.flow_cache_misses == 200
