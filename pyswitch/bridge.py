"""A bridge: the forwarding decision for a batch of frames, as Open vSwitch's NORMAL action.

Pure: frames and ``now`` in, ``{output port number: [frames]}`` out.  No sockets, no
clock, no port objects -- a bridge knows its ports only as numbers with a name, a
VLAN setting (:class:`~pyswitch.vlan.PortVlan`) and the port's counters, where it
records the drops it decides.  The switch runtime (``pyswitch.switch``) moves the
frames.

For each received frame (the order of ``br_input.c``):

1. shorter than an Ethernet header: dropped, ``malformed``;
2. VLAN ingress: the port's setting maps the 802.1Q VID (or its absence) to the
   frame's VLAN inside the bridge, or drops it (``vlan``); a frame to a reserved group
   address 01:80:c2:00:00:00-0f (STP BPDUs, LACP, LLDP) goes no further, as in OVS
   without ``other_config:forward-bpdu``;
3. learning: a unicast source MAC is recorded for (VLAN, MAC) on the ingress port;
4. lookup: a known unicast destination goes to its one port (never back out of the
   ingress port: such a frame is dropped silently, as OVS and Linux do); unknown
   unicast, broadcast and multicast flood to every other port that carries the VLAN;
5. VLAN egress: per output port the frame leaves untagged or tagged with its VLAN;
   tag edits make a new copy, shared by all ports that want the same form.

In front of all this sits the flow table (:mod:`pyswitch.flows`), as in Open vSwitch:
every frame's headers become a flow key; an exact-match *flow cache* maps the key to a
decision computed by the tables (rewrites and outputs); ``normal`` runs the pipeline
above, ``output:P``/``flood``/``all``/``in_port`` send the frame as it is.  A decision
depends only on the key and the rules, so the cache is checked against the tables'
``generation`` (bumped by any rule change and by port changes) and a new rule takes
effect on the very next frame.  No matching rule, or a decision with no output, drops
the frame (``drops: flow``).  A bridge whose only rule is the default
``priority=0 actions=NORMAL`` skips key extraction altogether.

This module is the plain-Python data path, the reference.  With the compiled path
(``pyswitch.fastpath``), ``process`` hands the frames to :mod:`pyswitch.bridge_fast`
instead: the ``_emc`` kernel repeats cached decisions, and a slow path over this
bridge's tables, MAC table and VLANs makes them, with the same outputs and counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from . import fastpath
from .fdb import DEFAULT_AGING_TIME, DEFAULT_MAX_ENTRIES, MacTable
from .flows import (
    Decision,
    FlowEntry,
    FlowTables,
    PortNames,
    decide,
    extract,
    parse_flow,
)
from .flows.model import Action, Flow
from .packet import ETH_HLEN, push_tag, set_vid, strip_tag, vlan_tci
from .port import Frame, PortCounters
from .vlan import NOT_CARRIED, UNTAGGED, PortVlan

FAIL_MODES = ("standalone", "secure")
#: The rule a standalone bridge holds when no flows were configured (OVS's default).
DEFAULT_FLOW = Flow(actions=(Action("normal"),), priority=0)
#: Most decisions the flow cache keeps; it is emptied when full (a new generation).
FLOW_CACHE_SIZE = 65536
#: 01:80:c2:00:00:0X less its first octet: the IEEE 802.1D reserved group addresses
#: (802.1Q-2018 Table 8-1), which a bridge never forwards.
RESERVED_GROUP = b"\x80\xc2\x00\x00"


@dataclass(slots=True)
class BridgePort:
    """What a bridge knows of one of its ports."""

    no: int
    name: str
    vlan: PortVlan
    counters: PortCounters


@dataclass(slots=True)
class BridgeStats:
    floods: int = 0  # frames flooded (unknown unicast, broadcast, multicast)
    forwarded: int = 0  # frames sent to one known port
    frames: int = 0  # frames processed
    flow_cache_hits: int = 0  # frames whose decision came from the flow cache
    flow_cache_misses: int = 0  # frames whose key went up to the flow tables


@dataclass
class Bridge:
    """One bridge's ports, MAC table and NORMAL forwarding."""

    name: str
    aging_time: float = DEFAULT_AGING_TIME
    max_entries: int = DEFAULT_MAX_ENTRIES
    fail_mode: str = "standalone"
    created: float = 0.0  # the loop's clock when the bridge was made (default rule's age)
    ports: dict[int, BridgePort] = field(default_factory=dict)
    stats: BridgeStats = field(default_factory=BridgeStats)
    #: the ``_emc`` kernel module for the compiled path, None for the Python path;
    #: "auto": what ``fastpath.kernel("_emc")`` says for this process
    kernel: ModuleType | str | None = field(default="auto", repr=False, compare=False)

    def __post_init__(self) -> None:
        self.fdb = MacTable(self.aging_time, self.max_entries)
        # (vlan, in_port) -> [(out_port, egress form)], rebuilt when ports change.
        self._flood_cache: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.names = PortNames(self._port_number, self._port_name)
        self.flows = FlowTables(ports=self.names)
        self._cache: dict[tuple, Decision] = {}
        self._normal_only: FlowEntry | None = None  # the sole default rule, if that is all
        self._normal_only_gen = -1
        self.config_epoch = 0  # bumped by port, VLAN and aging changes (the fast path's cache)
        self._fast: Any = None
        self.set_flows(None, self.created)
        if self.kernel == "auto":
            self.kernel = fastpath.kernel("_emc")
        if self.kernel is not None:
            from .bridge_fast import FastPath

            self._fast = FastPath(self, self.kernel)

    @property
    def datapath(self) -> str:
        """``compiled`` or ``python``: which implementation ``process`` runs."""
        return "python" if self._fast is None else "compiled"

    def _port_number(self, name: str) -> int | None:
        p = self.port_by_name(name)
        return None if p is None else p.no

    def _port_name(self, no: int) -> str | None:
        p = self.ports.get(no)
        return None if p is None else p.name

    # -- configuration -----------------------------------------------------------------
    def add_port(self, no: int, name: str, vlan: PortVlan, counters: PortCounters) -> None:
        if no in self.ports:
            raise ValueError(f"port number {no} already on bridge {self.name}")
        self.ports[no] = BridgePort(no, name, vlan, counters)
        self.config_epoch += 1
        self._flood_cache.clear()
        self.flows.invalidate()

    def remove_port(self, no: int) -> None:
        self.ports.pop(no, None)
        self.config_epoch += 1
        self.fdb.flush(port=no)
        self._flood_cache.clear()
        self.flows.invalidate()

    def set_flows(self, texts: list[str] | None, now: float) -> None:
        """Make the flow tables hold exactly ``texts`` (ovs-ofctl syntax, port names
        resolved on this bridge); None means the default for the fail mode.  Rules
        already present are kept with their counters.  FlowSyntaxError on a bad rule,
        before anything changes."""
        if texts is None:
            wanted = [DEFAULT_FLOW] if self.fail_mode == "standalone" else []
        else:
            wanted = [parse_flow(t, self.names) for t in texts]
        self.sync()  # rules that go leave with the counts of every frame they matched
        keep = set(wanted)
        self.flows.remove([e for e in self.flows.entries() if e.flow not in keep])
        present = {e.flow for e in self.flows.entries()}
        for f in wanted:
            if f not in present:
                self.flows.add(f, now)

    def set_port_vlan(self, no: int, vlan: PortVlan) -> None:
        self.ports[no].vlan = vlan
        self.config_epoch += 1
        self.fdb.flush(port=no)
        self._flood_cache.clear()

    def set_mac_limits(self, aging_time: float, max_entries: int) -> None:
        self.sync()  # cached frames' learning first: a smaller table evicts the least recent
        self.config_epoch += 1
        self.fdb.set_limits(aging_time, max_entries)
        self.aging_time, self.max_entries = aging_time, max_entries

    def port_by_name(self, name: str) -> BridgePort | None:
        for p in self.ports.values():
            if p.name == name:
                return p
        return None

    # -- data path ---------------------------------------------------------------------
    def process(self, in_no: int, frames: Sequence[Frame], now: float) -> dict[int, list[Frame]]:
        """Decide where each frame received on port ``in_no`` goes.

        Returns output port number -> frames to transmit there, in arrival order.
        Frames in the result are either the input objects themselves or new copies
        (tag edits, rewrites); they are only valid as long as the inputs are.
        """
        out: dict[int, list[Frame]] = {}
        inp = self.ports.get(in_no)
        if inp is None or not frames:
            return out
        self.stats.frames += len(frames)
        if self._fast is not None:
            return self._fast.process(inp, frames, now)
        default = self._default_only()
        if default is not None:
            nbytes = 0
            for frame in frames:
                nbytes += len(frame)
                self._normal(inp, frame, now, out)
            default.credit(len(frames), nbytes, now)
            return out
        self._through_flows(inp, frames, now, out)
        return out

    def _default_only(self) -> FlowEntry | None:
        """The default NORMAL rule when it is the only rule, else None (cached per
        generation of the tables)."""
        gen = self.flows.generation
        if gen != self._normal_only_gen:
            entries = self.flows.entries()
            only = entries[0] if len(entries) == 1 else None
            self._normal_only = only if only is not None and only.flow == DEFAULT_FLOW else None
            self._normal_only_gen = gen
        return self._normal_only

    def _through_flows(self, inp: BridgePort, frames: Sequence[Frame], now: float,
                       out: dict[int, list[Frame]]) -> None:
        tables, cache, stats = self.flows, self._cache, self.stats
        gen = tables.generation
        credits: dict[int, list] = {}  # id(decision) -> [decision, frames, bytes]
        for frame in frames:
            key = extract(frame, inp.no)
            d = cache.get(key)
            if d is None or d.generation != gen:
                stats.flow_cache_misses += 1
                d = decide(tables, key)
                if len(cache) >= FLOW_CACHE_SIZE:
                    cache.clear()
                cache[key] = d
            else:
                stats.flow_cache_hits += 1
            c = credits.get(id(d))
            if c is None:
                credits[id(d)] = [d, 1, len(frame)]
            else:
                c[1] += 1
                c[2] += len(frame)
            outputs = d.apply(frame)
            if not outputs:
                inp.counters.drop("flow", rx=True)
                continue
            for kind, port, f in outputs:
                if kind == "normal":
                    self._normal(inp, f, now, out)
                elif kind == "output" or kind == "in_port":
                    if port in self.ports:
                        out.setdefault(port, []).append(f)
                else:  # flood, all: every port but the ingress one, frame as it is
                    for no in self.ports:
                        if no != inp.no:
                            out.setdefault(no, []).append(f)
        for d, n, nbytes in credits.values():
            d.credit(n, nbytes, now)

    def _normal(self, inp: BridgePort, frame: Frame, now: float, out: dict[int, list[Frame]]) -> None:
        if len(frame) < ETH_HLEN:
            inp.counters.drop("malformed", rx=True)
            return
        tci = vlan_tci(frame)
        vid = None if tci is None else tci & 0x0FFF
        vlan = inp.vlan.ingress(vid)
        if vlan is None:
            inp.counters.drop("vlan", rx=True)
            return
        if frame[0] == 0x01 and frame[1:5] == RESERVED_GROUP and frame[5] < 0x10:
            return  # 802.1D reserved group (STP, LACP, LLDP): OVS drops it without forward-bpdu
        if not frame[6] & 1:
            self.fdb.learn(vlan, bytes(frame[6:12]), inp.no, now)
        if frame[0] & 1:
            targets = self._flood_targets(vlan, inp.no)
            self.stats.floods += 1
        else:
            dst = self.fdb.lookup(vlan, bytes(frame[0:6]), now)
            if dst is None:
                targets = self._flood_targets(vlan, inp.no)
                self.stats.floods += 1
            elif dst == inp.no:
                return  # learned on the ingress port: the destination already has it
            else:  # known unicast: one port, no target list
                form = self.ports[dst].vlan.egress(vlan)
                if form == NOT_CARRIED:
                    return
                self.stats.forwarded += 1
                f = _egress_frame(frame, tci, vid, vlan, form)
                lst = out.get(dst)
                if lst is None:
                    out[dst] = [f]
                else:
                    lst.append(f)
                return
        untagged: Frame | None = None  # each form is made once, shared by its ports
        tagged: Frame | None = None
        for no, form in targets:
            if form == UNTAGGED:
                if untagged is None:
                    untagged = _egress_frame(frame, tci, vid, vlan, form)
                f = untagged
            else:
                if tagged is None:
                    tagged = _egress_frame(frame, tci, vid, vlan, form)
                f = tagged
            lst = out.get(no)
            if lst is None:
                out[no] = [f]
            else:
                lst.append(f)

    def _flood_targets(self, vlan: int, in_no: int) -> list[tuple[int, int]]:
        key = (vlan, in_no)
        targets = self._flood_cache.get(key)
        if targets is None:
            targets = []
            for no, p in self.ports.items():
                if no == in_no:
                    continue
                form = p.vlan.egress(vlan)
                if form != NOT_CARRIED:
                    targets.append((no, form))
            self._flood_cache[key] = targets
        return targets

    def expire(self, now: float) -> list[FlowEntry]:
        """Age out MAC entries and expire timed-out rules; called periodically by the
        runtime.  Returns the rules that expired."""
        self.sync(now)
        self.fdb.expire(now)
        return self.flows.expire(now)

    def sync(self, now: float | None = None) -> None:
        """Bring rule counters and MAC ages up to date with the frames the compiled
        path forwarded from its cache (nothing to do on the Python path).  Call before
        reading them (dump-flows, fdb/show); ``now`` is not needed: each cached
        decision keeps the time it was last used."""
        if self._fast is not None:
            self._fast.sync()


def _egress_frame(frame: Frame, tci: int | None, vid: int | None, vlan: int, form: int) -> Frame:
    """``frame`` as it leaves a port that wants ``form`` (UNTAGGED or TAGGED) for ``vlan``:
    the frame itself when it already has that form, else a copy with the tag edited."""
    if form == UNTAGGED:
        return frame if tci is None else strip_tag(frame)
    if tci is None:
        return push_tag(frame, vlan)
    return frame if vid == vlan else set_vid(frame, vlan)
