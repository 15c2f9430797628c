"""Differential fuzzing of the compiled fast path (``_emc`` + bridge_fast) against the
Python path, the reference.

Hypothesis draws a bridge (ports with VLAN modes, a fail mode, small MAC limits so
aging and eviction happen), then a sequence of steps over time: batches of frames
(tagged or not, IPv4/IPv6/ARP/TCP/UDP/ICMP, fragments, extension headers, multicast
and reserved destinations, truncated, garbage), rule sets from the flow syntax, MAC
flushes, VLAN changes, ports removed and added, aging sweeps, limit changes.  Two
bridges get the same steps with the same frame objects; after every batch the outputs
must agree byte for byte, in order, port by port, and in *which* objects they are (the
input itself, or a new copy shared by the same outputs); at check points and at the
end the bridge counters, port counters, MAC tables (entries in LRU order, ages,
stats) and rule counters must agree after ``sync``.

``PYSWITCH_FUZZ_EXAMPLES`` sets the number of examples (300 by default, for CI).
A key test checks the kernel's flow key against ``flows.extract`` on random frames.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pyswitch.bridge import Bridge
from pyswitch.fastpath import load_kernel
from pyswitch.flows import FlowSyntaxError, PortNames, extract, parse_flow
from pyswitch.port import PortCounters
from pyswitch.vlan import PortVlan

EMC = load_kernel("_emc")
EXAMPLES = int(os.environ.get("PYSWITCH_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

UNICAST = [bytes.fromhex(f"02000000000{n}") for n in range(1, 4)]
GROUP = [b"\xff" * 6, bytes.fromhex("01005e000001"), bytes.fromhex("0180c2000000"),
         bytes.fromhex("0180c2000010")]
IP4 = [bytes([10, 0, 0, n]) for n in (1, 2, 9)]
IP6 = [bytes(15) + bytes([n]) for n in (1, 2)]
VIDS = [0, 10, 20, 30]

# ---- frames --------------------------------------------------------------------------


@st.composite
def l4(draw: st.DrawFn, proto: int) -> bytes:
    if proto in (6, 17):
        ports = struct.pack("!HH", draw(st.sampled_from([53, 80, 1234])), draw(st.sampled_from([53, 80])))
        csum = draw(st.sampled_from([0, 0xFFFF, 0x1234]))
        if proto == 6:
            return ports + bytes(12) + struct.pack("!H", csum) + bytes(2) + draw(st.binary(max_size=8))
        return ports + struct.pack("!HH", 8, csum) + draw(st.binary(max_size=8))
    if proto in (1, 58):
        return bytes([draw(st.sampled_from([0, 8, 128])), 0]) + draw(st.binary(min_size=2, max_size=8))
    return draw(st.binary(max_size=12))


@st.composite
def ipv4(draw: st.DrawFn) -> bytes:
    proto = draw(st.sampled_from([6, 17, 1, 47]))
    ihl = draw(st.sampled_from([5, 5, 6, 4]))
    frag = draw(st.sampled_from([0, 0, 0x4000, 0x2000, 0x0010]))
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, draw(st.sampled_from([0, 4, 0xB8])), 40, 1,
                       frag, 64, proto, draw(st.integers(0, 0xFFFF)),
                       draw(st.sampled_from(IP4)), draw(st.sampled_from(IP4)))
    return head + bytes(4) * max(0, ihl - 5) + draw(l4(proto))


@st.composite
def ipv6(draw: st.DrawFn) -> bytes:
    proto = draw(st.sampled_from([6, 17, 58, 59]))
    exts = draw(st.lists(st.sampled_from([0, 44, 60]), max_size=3))
    chain = exts + [proto]
    body = b""
    for i, kind in enumerate(exts):
        if kind == 44:
            body += struct.pack("!BBHI", chain[i + 1], 0, draw(st.sampled_from([0, 8])), 7)
        else:
            body += bytes([chain[i + 1], 0]) + bytes(6)
    head = struct.pack("!IHBB", 6 << 28 | draw(st.sampled_from([0, 0x0B8])) << 20, 0, chain[0], 64)
    return head + draw(st.sampled_from(IP6)) + draw(st.sampled_from(IP6)) + body + draw(l4(proto))


@st.composite
def arp(draw: st.DrawFn) -> bytes:
    ok = draw(st.booleans()) or draw(st.booleans())
    return struct.pack("!HHBBH6s4s6s4s", 1 if ok else 6, 0x0800, 6, 4, draw(st.sampled_from([1, 2, 300])),
                       UNICAST[0], draw(st.sampled_from(IP4)), bytes(6), draw(st.sampled_from(IP4)))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["ipv4", "ipv4", "ipv4", "ipv6", "ipv6", "arp", "other", "garbage"]))
    if kind == "garbage":
        return draw(st.binary(max_size=24))
    dst = draw(st.sampled_from(UNICAST * 3 + GROUP))
    src = draw(st.sampled_from(UNICAST + GROUP[1:2]))
    tag = b""
    tpid = draw(st.sampled_from([None, None, None, 0x8100, 0x8100, 0x88A8]))
    if tpid is not None:
        tag = struct.pack("!HH", tpid, draw(st.integers(0, 7)) << 13 | draw(st.sampled_from(VIDS)))
    if kind == "ipv4":
        etype, body = 0x0800, draw(ipv4())
    elif kind == "ipv6":
        etype, body = 0x86DD, draw(ipv6())
    elif kind == "arp":
        etype, body = 0x0806, draw(arp())
    else:
        etype, body = draw(st.sampled_from([0x88CC, 0x0040, 0x8100])), draw(st.binary(max_size=30))
    raw = dst + src + tag + struct.pack("!H", etype) + body
    cut = draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, len(raw))))
    return raw if cut is None else raw[:cut]


# ---- bridges, rules and steps ---------------------------------------------------------

VLAN_CONFIGS = [PortVlan.make(), PortVlan.make(trunks=[10, 20]), PortVlan.make(tag=10),
                PortVlan.make(tag=20), PortVlan.make(tag=10, trunks=[20], vlan_mode="native-tagged"),
                PortVlan.make(tag=20, vlan_mode="native-untagged")]
MATCHES = ["", "", "ip", "udp", "tcp", "in_port=1", "in_port=2", "dl_dst=02:00:00:00:00:02", "dl_src=02:00:00:00:00:01",
           "dl_vlan=10", "dl_vlan=0xffff", "ip", "tcp", "udp,tp_dst=53", "tcp,tp_dst=80", "arp",
           "arp,arp_op=1", "icmp", "ipv6", "tcp6", "ip,nw_dst=10.0.0.2", "ip,nw_tos=4",
           "dl_type=0x88cc", "udp6,tp_src=53", "icmp,icmp_type=8"]
ACTIONS = ["output:1", "output:2", "output:3", "output:7", "normal", "normal", "flood", "all",
           "in_port", "mod_vlan_vid:10", "mod_vlan_vid:20", "strip_vlan", "mod_vlan_pcp:3",
           "push_vlan:0x8100", "mod_dl_src:02:00:00:00:00:05", "mod_dl_dst:02:00:00:00:00:02",
           "mod_nw_dst:10.0.0.9", "mod_nw_src:10.0.0.8", "mod_tp_dst:8080", "mod_tp_src:1",
           "resubmit(,1)"]
NAMES = PortNames.from_dict({f"p{n}": n for n in range(1, 6)})


@st.composite
def rule(draw: st.DrawFn) -> str | None:
    match = draw(st.sampled_from(MATCHES))
    acts = draw(st.lists(st.sampled_from(ACTIONS), max_size=4)) or ["drop"]
    table = draw(st.sampled_from([0, 0, 0, 1]))
    head = f"table={table},priority={draw(st.integers(0, 3))}"
    text = f"{head},{match} actions={','.join(acts)}" if match else f"{head} actions={','.join(acts)}"
    try:
        parse_flow(text, NAMES)
    except FlowSyntaxError:  # an action whose prerequisites the match lacks
        return None
    return text


#: a batch names frames of the example's pool (so keys repeat and hit the cache) or is new
batch_frames = st.lists(st.one_of(st.integers(0, 5), st.integers(0, 5), st.integers(0, 7), frames()),
                        min_size=3, max_size=12)
batches = st.tuples(st.just("batch"), st.integers(1, 4), batch_frames,
                    st.sampled_from([0, 0, 0, 0.25, 0.5, 1, 2.5, 5, 6]), st.integers(1, 4))
steps = st.one_of(
    batches, batches, batches, batches, batches, batches, batches, batches, batches, batches,
    st.tuples(st.just("rules"), st.one_of(st.none(), st.lists(rule(), max_size=5))),
    st.tuples(st.just("flush")),
    st.tuples(st.just("vlan"), st.integers(1, 4), st.sampled_from(VLAN_CONFIGS)),
    st.tuples(st.just("remove"), st.integers(1, 4)),
    st.tuples(st.just("add"), st.integers(1, 5), st.sampled_from(VLAN_CONFIGS)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("limits"), st.sampled_from([0, 3, 5, 300]), st.sampled_from([2, 4, 100])),
    st.tuples(st.just("check")),
)


def from_port(pool: list[bytes], i: int, in_no: int, _memo: dict = {}) -> bytes:  # noqa: B006
    """Pool frame ``i`` as port ``in_no`` sends it: a unicast source becomes the MAC of
    that port (ports 1 and 4 share one, so MACs still move), so that sources stay put
    and decisions stay cached long enough to be tested."""
    f = pool[i]
    if len(f) < 12 or f[6] & 1:
        return f
    key = (id(f), in_no)
    if key not in _memo or _memo[key][0] is not f:
        _memo[key] = (f, f[:6] + UNICAST[in_no % len(UNICAST)] + f[12:])
    return _memo[key][1]


def signature(out: dict, inputs: list) -> list:
    """The outputs as comparable data: port order, bytes, and object identity (which
    input, or which new object in order of first appearance)."""
    news: dict[int, int] = {}
    sig = []
    for no, lst in out.items():
        for f in lst:
            if len(f) <= 1:  # CPython shares its 0- and 1-byte bytes objects: no identity
                sig.append((no, bytes(f), "short"))
                continue
            same = [i for i, x in enumerate(inputs) if x is f]
            ident = ("in", same[0]) if same else ("new", news.setdefault(id(f), len(news)))
            sig.append((no, bytes(f), ident))
    return sig


def state(br: Bridge, counters: dict[int, PortCounters], now: float) -> dict:
    br.sync(now)
    return {
        "stats": br.stats,
        "ports": {no: c.as_dict() for no, c in counters.items()},
        "fdb": br.fdb.entries(now),
        "fdb_stats": br.fdb.stats,
        "fdb_len": len(br.fdb),
        "flows": [(e.flow, e.n_packets, e.n_bytes, e.last_used) for e in br.flows.entries()],
        "overflows": br.flows.resubmit_overflows,
    }


def apply(br: Bridge, step: tuple, now: float) -> object:
    """A configuration step on one bridge; returns what the two bridges must agree on."""
    kind = step[0]
    if kind == "rules":
        return br.set_flows(None if step[1] is None else [t for t in step[1] if t is not None], now)
    if kind == "flush":
        return br.fdb.flush()
    if kind == "vlan":
        return br.set_port_vlan(step[1], step[2]) if step[1] in br.ports else None
    if kind == "remove":
        return br.remove_port(step[1])
    if kind == "expire":
        return [e.flow for e in br.expire(now)]
    assert kind == "limits"
    return br.set_mac_limits(step[1], step[2])


class Pair:
    """The same bridge twice: Python path (``py``) and compiled path (``fast``)."""

    def __init__(self, ports: dict[int, PortVlan], fail_mode: str) -> None:
        self.py = Bridge("br0", aging_time=5, max_entries=4, fail_mode=fail_mode, kernel=None)
        self.fast = Bridge("br0", aging_time=5, max_entries=4, fail_mode=fail_mode, kernel=EMC)
        assert (self.py.datapath, self.fast.datapath) == ("python", "compiled")
        self.counters: dict[int, dict[int, PortCounters]] = {id(self.py): {}, id(self.fast): {}}
        for no, vlan in ports.items():
            self.add(no, vlan)

    def add(self, no: int, vlan: PortVlan) -> None:
        for br in (self.py, self.fast):
            if no not in br.ports:
                c = self.counters[id(br)].setdefault(no, PortCounters())
                br.add_port(no, f"p{no}", vlan, c)

    def both(self, fn) -> None:
        a, b = fn(self.py), fn(self.fast)
        assert a == b

    def check(self, now: float) -> None:
        want = state(self.py, self.counters[id(self.py)], now)
        assert state(self.fast, self.counters[id(self.fast)], now) == want


@FUZZ
@given(ports=st.dictionaries(st.integers(1, 4), st.sampled_from(VLAN_CONFIGS), min_size=2, max_size=4),
       fail_mode=st.sampled_from(["standalone", "standalone", "secure"]),
       rules=st.one_of(st.none(), st.lists(rule(), min_size=1, max_size=6)),
       pool=st.lists(frames(), min_size=8, max_size=8), script=st.lists(steps, min_size=8, max_size=20))
def test_compiled_path_matches_python_path(ports, fail_mode, rules, pool, script) -> None:
    pair = Pair(ports, fail_mode)
    now = 0.0
    script = [("rules", rules), *script]
    for step in script:
        kind = step[0]
        if kind == "batch":
            _, pick_port, picks, dt, repeat = step
            nos = sorted(pair.py.ports) or [1]
            in_no = nos[pick_port % len(nos)]
            batch = [from_port(pool, p, in_no) if isinstance(p, int) else p for p in picks] * repeat
            now += dt
            a, b = pair.py.process(in_no, batch, now), pair.fast.process(in_no, batch, now)
            assert signature(a, batch) == signature(b, batch)
        elif kind == "add":
            pair.add(step[1], step[2])
        elif kind == "check":
            pair.check(now)
        else:
            pair.both(lambda br, step=step, now=now: apply(br, step, now))
    pair.check(now)


@FUZZ
@given(frame=frames(), in_port=st.integers(0, 0xFFFF))
def test_kernel_key_is_the_python_flow_key(frame: bytes, in_port: int) -> None:
    got = EMC.flow_key(frame, in_port)
    assert got[:14] == tuple(extract(frame, in_port))
    assert got[14] == (len(frame) >= 18 and frame[12:14] == b"\x81\x00")


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=80), in_port=st.integers(0, 0xFFFF))
def test_kernel_key_of_garbage(data: bytes, in_port: int) -> None:
    assert EMC.flow_key(data, in_port)[:14] == tuple(extract(data, in_port))
