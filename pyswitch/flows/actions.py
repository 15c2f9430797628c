"""From a flow key to a cached, replayable forwarding *decision*, and its execution.

Two steps, so that the bridge can keep an exact-match flow cache (OVS's megaflow idea
without the wildcards):

1. ``decide(tables, key)`` runs the lookup in table 0 and the matched rule's actions,
   following ``resubmit`` into other tables, and flattens everything into a
   :class:`Decision`: an ordered tuple of *ops* (header rewrites and outputs, already
   resolved: no rule is looked up again) plus the rules that took part (for counters)
   and the ``tables.generation`` it was computed under.
2. ``Decision.apply(frame)`` replays the ops on a frame and returns the outputs
   ``(kind, port, frame_bytes)``; an empty list means drop.

**The cache contract.**  A decision depends only on the flow key and the rules, so it
is valid for *every* frame with an equal key until ``tables.generation`` changes.  The
bridge keeps ``{key: decision}``; on a hit with ``decision.generation ==
tables.generation`` it calls ``apply`` and, once per batch, ``credit`` (which keeps
the rules' counters and idle timers right); any other generation is a miss.  Rewrites
compute offsets and checksums per frame, so IPv4 options or payload differences
between frames of one key are handled.

Output kinds: ``output`` (port number), ``normal``, ``flood``, ``all`` (port None: the
bridge resolves them with MAC learning/VLANs), ``in_port`` (the port number the frame
is to go back out of).  As in OVS, ``output:P`` where P is the frame's in_port is
skipped (use ``in_port``).

``resubmit`` follows OVS: the rewrites done so far are visible to the lookup in the
next table; ``resubmit:P`` looks up with in_port = P, then restores it.  Nesting
deeper than ``MAX_RESUBMIT_DEPTH`` or more than ``MAX_RESUBMITS`` resubmits in total
drops the frame (``Decision.overflow``; ``tables.resubmit_overflows`` counts them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .key import FlowKey
from .model import (
    DL_DST,
    DL_SRC,
    DL_TYPE,
    DL_VLAN,
    DL_VLAN_PCP,
    ETH_TYPE_IP,
    IN_PORT,
    IPPROTO_TCP,
    IPPROTO_UDP,
    NW_DST,
    NW_PROTO,
    NW_SRC,
    TP_DST,
    TP_SRC,
    Action,
)
from .rewrite import REWRITES
from .table import FlowEntry, FlowTables

MAX_RESUBMIT_DEPTH = 64
MAX_RESUBMITS = 4096

OUTPUT, NORMAL, FLOOD, ALL, IN_PORT_KIND = "output", "normal", "flood", "all", "in_port"
_OUTPUT_KINDS = frozenset({OUTPUT, NORMAL, FLOOD, ALL, IN_PORT_KIND})

Op = tuple[str, Any]  # (output kind or rewrite action kind, port or argument)
Output = tuple[str, "int | None", Any]  # (kind, port or None, frame bytes)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with every frame of one flow key (see the module docstring)."""

    ops: tuple[Op, ...]
    entries: tuple[FlowEntry, ...]
    generation: int
    overflow: bool = False

    @property
    def rewrites(self) -> bool:
        return any(kind not in _OUTPUT_KINDS for kind, _ in self.ops)

    @property
    def outputs(self) -> tuple[Op, ...]:
        """The output ops alone (what happens to a frame, rewrites aside)."""
        return tuple(op for op in self.ops if op[0] in _OUTPUT_KINDS)

    def apply(self, frame: bytes | bytearray | memoryview) -> list[Output]:
        """Replay the ops on ``frame``.  With no rewrites the outputs carry ``frame``
        itself (no copy: a memoryview stays valid only as long as the caller's
        buffer); otherwise each output carries its own ``bytes``."""
        out: list[Output] = []
        buf: bytearray | None = None
        for kind, arg in self.ops:
            if kind in _OUTPUT_KINDS:
                out.append((kind, arg, frame if buf is None else bytes(buf)))
            else:
                if buf is None:
                    buf = bytearray(frame)
                REWRITES[kind](buf, arg)
        return out

    def credit(self, packets: int, nbytes: int, now: float) -> None:
        """Count ``packets`` frames of ``nbytes`` total against every rule that took
        part (OVS credits each rule a packet traversed, resubmits included)."""
        for e in self.entries:
            e.credit(packets, nbytes, now)


class _Translation:
    """One run of ``decide``: the ops and rules gathered so far."""

    def __init__(self, tables: FlowTables) -> None:
        self.tables = tables
        self.ops: list[Op] = []
        self.entries: list[FlowEntry] = []
        self.resubmits = 0
        self.overflow = False

    def table(self, k: list, table: int, depth: int) -> None:
        entry = self.tables.lookup(k, table)
        if entry is None:
            return  # a miss drops (table 0) or does nothing (after resubmit)
        self.entries.append(entry)
        for act in entry.flow.actions:
            if self.overflow:
                return
            self.action(k, act, table, depth)

    def action(self, k: list, act: Action, table: int, depth: int) -> None:
        kind, arg = act
        if kind == "output":
            if arg != k[IN_PORT]:
                self.ops.append((OUTPUT, arg))
        elif kind == IN_PORT_KIND:
            self.ops.append((IN_PORT_KIND, k[IN_PORT]))
        elif kind in _OUTPUT_KINDS:
            self.ops.append((kind, None))
        elif kind == "resubmit":
            self.resubmit(k, arg, table, depth)
        else:
            self.ops.append((kind, arg))
            _update_key(k, kind, arg)

    def resubmit(self, k: list, arg: tuple[int | None, int | None], table: int, depth: int) -> None:
        port, target = arg
        self.resubmits += 1
        if depth + 1 > MAX_RESUBMIT_DEPTH or self.resubmits > MAX_RESUBMITS:
            self.overflow = True
            return
        target = table if target is None else target
        if not 0 <= target < self.tables.n_tables:
            return  # a table this bridge does not have: a miss
        saved = k[IN_PORT]
        if port is not None:
            k[IN_PORT] = port
        self.table(k, target, depth + 1)
        k[IN_PORT] = saved


def _update_key(k: list, kind: str, arg: Any) -> None:
    """Mirror a rewrite in the key so later resubmit lookups see it (OVS does)."""
    if kind == "mod_dl_src":
        k[DL_SRC] = arg
    elif kind == "mod_dl_dst":
        k[DL_DST] = arg
    elif kind in ("mod_vlan_vid", "mod_vlan_pcp", "push_vlan"):
        if k[DL_VLAN] is None and k[DL_TYPE] is not None:
            k[DL_VLAN], k[DL_VLAN_PCP] = 0, 0
        if kind == "mod_vlan_vid" and k[DL_VLAN] is not None:
            k[DL_VLAN] = arg
        elif kind == "mod_vlan_pcp" and k[DL_VLAN] is not None:
            k[DL_VLAN_PCP] = arg
    elif kind == "strip_vlan":
        k[DL_VLAN] = k[DL_VLAN_PCP] = None
    elif kind in ("mod_nw_src", "mod_nw_dst"):
        idx = NW_SRC if kind == "mod_nw_src" else NW_DST
        if k[DL_TYPE] == ETH_TYPE_IP and k[idx] is not None:
            k[idx] = arg
    elif kind in ("mod_tp_src", "mod_tp_dst"):
        idx = TP_SRC if kind == "mod_tp_src" else TP_DST
        if k[NW_PROTO] in (IPPROTO_TCP, IPPROTO_UDP) and k[idx] is not None:
            k[idx] = arg


def decide(tables: FlowTables, key: FlowKey | tuple) -> Decision:
    """The decision for frames with ``key`` under the current rules (see module doc).
    Does not touch counters; the caller credits them via ``Decision.credit``."""
    t = _Translation(tables)
    t.table(list(key), 0, 0)
    if t.overflow:
        tables.resubmit_overflows += 1
        return Decision((), tuple(t.entries), tables.generation, overflow=True)
    return Decision(tuple(t.ops), tuple(t.entries), tables.generation)


def execute(
    tables: FlowTables, key: FlowKey | tuple, frame: bytes | bytearray | memoryview, now: float
) -> list[Output]:
    """Uncached convenience: decide, apply to ``frame``, credit one packet."""
    d = decide(tables, key)
    d.credit(1, len(frame), now)
    return d.apply(frame)
