"""A bridge's compiled fast path: the slow path in Python that fills the kernel's cache.

As in Open vSwitch, the *datapath* (the ``_emc`` kernel, ``pyswitch/fastpath/_emc.pyx``)
repeats decisions and the *slow path* (this module, over the same flow tables, MAC
table and VLAN settings as :mod:`pyswitch.bridge`) makes them.  One batch:

1. the kernel runs cached decisions until a frame misses and returns its index;
2. :meth:`FastPath._miss` decides that frame exactly as ``Bridge._through_flows`` and
   ``Bridge._normal`` would (the flow tables through the bridge's own decision cache,
   with its hit/miss counts; NORMAL with its learning and lookups), writes the result
   down as a *program* for the kernel (rewrites, output snapshots, port indices, egress
   VLAN forms) and per-frame counts (floods, forwards, drops by reason);
3. ``Cache.install`` runs the program on the missed frame and goes on with the batch,
   so the frames of each output port keep their arrival order.

**What a cached entry may assume.**  The kernel's key holds every field of
``flows.extract`` plus whether the frame carries an 802.1Q C-tag, so the flow tables'
decision and NORMAL's VLAN, learning and lookup inputs are the same for every frame of
a key; rewrites and tag edits are still computed per frame.  While the default
``priority=0 actions=NORMAL`` is the only rule, keys hold only what NORMAL reads
(in_port, MACs, the tag), so many L3/L4 flows between a few hosts share entries.  The rest of a decision's
inputs are state: the rules (``flows.generation``), the MAC table (``fdb.generation``:
a MAC added, moved, aged, evicted or flushed), the ports and their VLANs and the aging
time (``Bridge.config_epoch``).  Any change empties the cache before the next frame;
a NORMAL lookup that found its MAC also bounds the entry in time (it holds while that
MAC's last sighting is younger than the aging time, as ``MacTable.lookup`` checks).

**Not cached** (decided in Python for every such frame): frames shorter than an
Ethernet header (``malformed``), and a frame whose own processing changed the MAC
table (a new source MAC, a move, an aged-out destination): the decision for the next
frame of the key may differ, so that next frame misses too, and is cached.

**Harvest.**  A cached frame must still do what the Python path does per frame: credit
its rules' counters (``FlowEntry.credit``: n_packets, n_bytes, the idle clock) and
refresh its source MAC's age and LRU place (``MacTable.touch``).  The kernel keeps
per-entry packets, bytes, last time and sequence; :meth:`FastPath.sync` replays them
in frame order before every slow-path decision (so lookups and evictions see the
learning of earlier frames), before any change of the MAC table's limits, from
``Bridge.expire`` (every second) and when stats are read (``Bridge.sync``).  Rule
counters may thus lag until the next miss, sweep or read.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .bridge import FLOW_CACHE_SIZE, RESERVED_GROUP
from .flows import Decision, decide, extract
from .flows.model import OUTPUT_KINDS
from .flows.rewrite import REWRITES
from .packet import ETH_HLEN, vlan_tci
from .port import Frame
from .vlan import NOT_CARRIED

if TYPE_CHECKING:
    from .bridge import Bridge, BridgePort

#: Decisions the kernel keeps (4-way sets; the least recently used way is replaced).
CAPACITY = 65536
#: What the default-only bridge does with every frame (no flow lookup, no cache counts).
NORMAL_OPS = (("normal", None),)


class _Plan:
    """One frame's decision as the kernel runs it, and what harvest must replay."""

    __slots__ = ("floods", "flow", "forwarded", "learns", "malformed", "prog", "seen", "vlan")

    def __init__(self) -> None:
        self.prog: list[tuple[int, int, int, int, int]] = []  # (code, form, port index, arg, mac)
        self.floods = self.forwarded = self.flow = self.vlan = self.malformed = 0
        self.learns: list[tuple[int, bytes]] = []  # (vlan, source MAC) NORMAL learned
        self.seen: float | None = None  # oldest last sighting among the MACs looked up

    def counts(self) -> tuple[int, int, int, int, int]:
        return self.floods, self.forwarded, self.flow, self.vlan, self.malformed


class FastPath:
    """The compiled path of one bridge: ``process`` as ``Bridge.process`` (whose
    caller has counted the frames), same outputs, counters and state changes."""

    def __init__(self, bridge: Bridge, kernel: ModuleType) -> None:
        self.br = bridge
        self.cache = kernel.Cache(CAPACITY)
        self.op = kernel.OPCODES
        self.scratch = self.cache.capacity  # the slot of decisions run once, not kept
        self.meta: list[Any] = [None] * (self.scratch + 1)  # slot -> (rules, learns, in_no)
        self.stamp: tuple[int, int, int] | None = None
        self.nos: list[int] = []  # port index -> port number (the kernel knows indices)
        self.index: dict[int, int] = {}
        self.default: Any = None  # the sole default rule (Bridge._default_only)

    def _revalidate(self) -> None:
        """Empty the cache if the rules, MAC table, ports or VLANs changed."""
        br = self.br
        stamp = (br.flows.generation, br.fdb.generation, br.config_epoch)
        if stamp == self.stamp:
            return
        self.sync()
        self.default = br._default_only()
        self.cache.clear(l2_only=self.default is not None)  # NORMAL alone reads only L2
        self.stamp = stamp
        self.nos = list(br.ports)
        self.index = {no: i for i, no in enumerate(self.nos)}

    def process(self, inp: BridgePort, frames: Sequence[Frame], now: float) -> dict[int, list[Frame]]:
        self._revalidate()
        if type(frames) is not list:
            frames = list(frames)
        lists: list[Any] = [None] * len(self.nos)
        order: list[int] = []
        n = len(frames)
        i = self.cache.run(frames, 0, inp.no, now, lists, order)
        while i < n:
            i = self._miss(inp, frames, i, now, lists, order)
        hits, floods, forwarded, flow, vlan, malformed = self.cache.take_counts()
        stats = self.br.stats
        if self.default is None:
            stats.flow_cache_hits += hits
        stats.floods += floods
        stats.forwarded += forwarded
        for reason, count in (("flow", flow), ("vlan", vlan), ("malformed", malformed)):
            if count:
                inp.counters.drop(reason, count, rx=True)
        nos = self.nos
        return {nos[j]: lists[j] for j in order}

    def _miss(self, inp: BridgePort, frames: list, i: int, now: float, lists: list,
              order: list) -> int:
        """Decide ``frames[i]``, install it, go on; returns the next miss's index."""
        br = self.br
        self.sync()  # the learning of earlier frames comes first
        frame = frames[i]
        if self.default is not None:
            ops, rules = NORMAL_OPS, (self.default,)
        else:
            d = self._decision(frame, inp.no)
            ops, rules = d.ops, d.entries
        gen = br.fdb.generation
        plan = self._plan(inp, frame, ops, now)
        self._revalidate()
        cacheable = len(frame) >= ETH_HLEN and br.fdb.generation == gen
        seen = plan.seen
        slot, nxt = self.cache.install(cacheable, plan.prog, plan.counts(), seen is not None,
                                       seen or 0.0, float(br.fdb.aging_time), frames, i,
                                       inp.no, now, lists, order)
        for e in rules:  # this frame; the kernel counts the hits that follow
            e.credit(1, len(frame), now)
        if slot != self.scratch:
            self.meta[slot] = (rules, tuple(plan.learns), inp.no)  # tuples: not tracked by the GC
        return nxt

    def _decision(self, frame: Frame, in_no: int) -> Decision:
        """The flow tables' decision through the bridge's decision cache, counted as
        ``Bridge._through_flows`` counts it."""
        br = self.br
        key = extract(frame, in_no)
        cache, gen = br._cache, br.flows.generation
        d = cache.get(key)
        if d is None or d.generation != gen:
            br.stats.flow_cache_misses += 1
            d = decide(br.flows, key)
            if len(cache) >= FLOW_CACHE_SIZE:
                cache.clear()
                self.stamp = None  # kernel hits must stay Python cache hits
            cache[key] = d
        else:
            br.stats.flow_cache_hits += 1
        return d

    def _plan(self, inp: BridgePort, frame: Frame, ops: Sequence[tuple[str, Any]],
              now: float) -> _Plan:
        """``Decision.apply`` and the bridge's output loop, written down as a program."""
        op, index, plan = self.op, self.index, _Plan()
        prog = plan.prog
        emit = (op["emit"], 0, 0, 0, 0)
        buf: bytearray | None = None
        sent = False
        for kind, arg in ops:
            if kind not in OUTPUT_KINDS:
                if buf is None:
                    buf = bytearray(frame)
                REWRITES[kind](buf, arg)
                mac = arg if kind in ("mod_dl_src", "mod_dl_dst") else 0
                prog.append((op[kind], 0, 0, 0 if mac or arg is None else arg, mac))
                continue
            sent = True
            if kind == "normal":
                outs = self._plan_normal(inp, frame if buf is None else bytes(buf), now, plan)
                if outs:
                    prog += [emit, (op["normal"], 0, 0, 0, 0), *outs]
                continue
            if kind == "output" or kind == "in_port":
                targets = [arg] if arg in index else []
            else:  # flood, all: every port but the ingress one
                targets = [no for no in self.nos if no != inp.no]
            if targets:
                prog += [emit, *((op["out"], 0, index[no], 0, 0) for no in targets)]
        if not sent:
            plan.flow = 1
        return plan

    def _plan_normal(self, inp: BridgePort, f: Frame, now: float, plan: _Plan) -> list:
        """``Bridge._normal`` for frame ``f``, step by step (learning included); returns
        the egress ops and notes counts, learned MACs and lookups in ``plan``."""
        br = self.br
        if len(f) < ETH_HLEN:
            plan.malformed += 1
            return []
        tci = vlan_tci(f)
        vid = None if tci is None else tci & 0x0FFF
        vlan = inp.vlan.ingress(vid)
        if vlan is None:
            plan.vlan += 1
            return []
        if f[0] == 0x01 and f[1:5] == RESERVED_GROUP and f[5] < 0x10:
            return []
        if not f[6] & 1:
            src = bytes(f[6:12])
            br.fdb.learn(vlan, src, inp.no, now)
            plan.learns.append((vlan, src))
        if f[0] & 1:
            targets = br._flood_targets(vlan, inp.no)
            plan.floods += 1
        else:
            mac = bytes(f[0:6])
            dst = br.fdb.lookup(vlan, mac, now)
            if dst is None:
                targets = br._flood_targets(vlan, inp.no)
                plan.floods += 1
            else:
                seen = br.fdb.last_seen(vlan, mac)
                if seen is not None and (plan.seen is None or seen < plan.seen):
                    plan.seen = seen
                if dst == inp.no:
                    return []
                form = br.ports[dst].vlan.egress(vlan)
                if form == NOT_CARRIED:
                    return []
                plan.forwarded += 1
                targets = [(dst, form)]
        nout = self.op["nout"]
        return [(nout, form, self.index[no], vlan, 0) for no, form in targets]

    def sync(self) -> None:
        """Replay the kernel's hits since the last sync, in frame order: credit the
        rules and refresh the learned MACs (see the module docstring)."""
        got = self.cache.harvest()
        if not got:
            return
        got.sort(key=itemgetter(4))
        touch, meta = self.br.fdb.touch, self.meta
        for slot, packets, nbytes, last, _seq in got:
            rules, learns, in_no = meta[slot]
            for e in rules:
                e.credit(packets, nbytes, last)
            for vlan, mac in learns:
                touch(vlan, mac, in_no, last)
