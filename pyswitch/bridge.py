"""A bridge: the forwarding decision for a batch of frames, as Open vSwitch's NORMAL action.

Pure: frames and ``now`` in, ``{output port number: [frames]}`` out.  No sockets, no
clock, no port objects -- a bridge knows its ports only as numbers with a name, a
VLAN setting (:class:`~pyswitch.vlan.PortVlan`) and the port's counters, where it
records the drops it decides.  The switch runtime (``pyswitch.switch``) moves the
frames.

For each received frame (the order of ``br_input.c``):

1. shorter than an Ethernet header: dropped, ``malformed``;
2. VLAN ingress: the port's setting maps the 802.1Q VID (or its absence) to the
   frame's VLAN inside the bridge, or drops it (``vlan``);
3. learning: a unicast source MAC is recorded for (VLAN, MAC) on the ingress port;
4. lookup: a known unicast destination goes to its one port (never back out of the
   ingress port: such a frame is dropped silently, as OVS and Linux do); unknown
   unicast, broadcast and multicast flood to every other port that carries the VLAN;
5. VLAN egress: per output port the frame leaves untagged or tagged with its VLAN;
   tag edits make a new copy, shared by all ports that want the same form.

The flow table (OpenFlow-style rules) will sit in front of step 4 and call into this
NORMAL pipeline for rules whose action is ``normal``; see docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .fdb import DEFAULT_AGING_TIME, DEFAULT_MAX_ENTRIES, MacTable
from .packet import ETH_HLEN, push_tag, set_vid, strip_tag, vlan_tci
from .port import Frame, PortCounters
from .vlan import NOT_CARRIED, UNTAGGED, PortVlan

FAIL_MODES = ("standalone", "secure")


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


@dataclass
class Bridge:
    """One bridge's ports, MAC table and NORMAL forwarding."""

    name: str
    aging_time: float = DEFAULT_AGING_TIME
    max_entries: int = DEFAULT_MAX_ENTRIES
    fail_mode: str = "standalone"
    ports: dict[int, BridgePort] = field(default_factory=dict)
    stats: BridgeStats = field(default_factory=BridgeStats)

    def __post_init__(self) -> None:
        self.fdb = MacTable(self.aging_time, self.max_entries)
        # (vlan, in_port) -> [(out_port, egress form)], rebuilt when ports change.
        self._flood_cache: dict[tuple[int, int], list[tuple[int, int]]] = {}

    # -- configuration -----------------------------------------------------------------
    def add_port(self, no: int, name: str, vlan: PortVlan, counters: PortCounters) -> None:
        if no in self.ports:
            raise ValueError(f"port number {no} already on bridge {self.name}")
        self.ports[no] = BridgePort(no, name, vlan, counters)
        self._flood_cache.clear()

    def remove_port(self, no: int) -> None:
        self.ports.pop(no, None)
        self.fdb.flush(port=no)
        self._flood_cache.clear()

    def set_port_vlan(self, no: int, vlan: PortVlan) -> None:
        self.ports[no].vlan = vlan
        self.fdb.flush(port=no)
        self._flood_cache.clear()

    def set_mac_limits(self, aging_time: float, max_entries: int) -> None:
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
        (tag edits); they are only valid as long as the inputs are.
        """
        out: dict[int, list[Frame]] = {}
        inp = self.ports.get(in_no)
        if inp is None or not frames:
            return out
        self.stats.frames += len(frames)
        for frame in frames:
            self._normal(inp, frame, now, out)
        return out

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
            else:
                form = self.ports[dst].vlan.egress(vlan)
                if form == NOT_CARRIED:
                    return
                targets = [(dst, form)]
                self.stats.forwarded += 1
        untagged: Frame | None = None
        tagged: Frame | None = None
        for no, form in targets:
            if form == UNTAGGED:
                if untagged is None:
                    untagged = frame if tci is None else strip_tag(frame)
                f = untagged
            else:
                if tagged is None:
                    if tci is None:
                        tagged = push_tag(frame, vlan)
                    elif vid == vlan:
                        tagged = frame
                    else:
                        tagged = set_vid(frame, vlan)
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

    def expire(self, now: float) -> int:
        """Age out MAC entries; called periodically by the runtime."""
        return self.fdb.expire(now)

