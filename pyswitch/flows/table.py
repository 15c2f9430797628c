"""The flow tables of one bridge: rules, counters, timeouts, and the change generation.

``FlowTables`` holds tables ``0..n_tables-1``, each a :class:`classifier.Classifier`.
It is pure: every operation that needs the time takes ``now`` (seconds, any monotonic
origin) as a parameter.

Operations follow ovs-ofctl / OpenFlow 1.3 §6.4 ("Flow Table Modification Messages"):

* ``add``: a rule with an identical match and priority in the same table is replaced;
  the new rule starts with fresh counters and a fresh ``created`` time (OpenFlow's
  ADD "clears" the old entry, duration included).
* ``modify`` (strict or not): replaces the actions of the selected rules; their
  counters, cookie, timeouts and ``created`` are kept; ``modified`` is set to ``now``.
* ``delete`` (strict or not, cookie/mask, ``out_port``): returns the removed rules.
* ``expire(now)``: removes rules whose ``idle_timeout`` (since ``last_used``) or
  ``hard_timeout`` (since ``modified``, i.e. the add or the last modify) has passed.

``generation`` increases on every change that can alter a forwarding decision (add,
modify, delete, expiry, ``invalidate()``).  The bridge's exact-match flow cache keeps
the generation its entries were computed under and discards them when it differs; see
``actions.decide``.  Counters are credited through ``Decision.credit`` (cache hits
included) so that idle timeouts see traffic that never reaches the classifier.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .classifier import Classifier
from .format import format_dump_line
from .model import Action, Flow, FlowFilter, PortNames
from .parse import parse_filter, parse_flow

#: OpenFlow table ids are 0..254; pyswitch defaults to a smaller set.
DEFAULT_N_TABLES = 16


@dataclass(eq=False, slots=True)
class FlowEntry:
    """A rule in a table, with its counters.  Identity matters: the bridge's cache
    holds references to entries and credits them on every hit."""

    flow: Flow
    seq: int
    created: float
    modified: float
    last_used: float
    n_packets: int = 0
    n_bytes: int = 0
    removed_reason: str | None = field(default=None)

    def credit(self, packets: int, nbytes: int, now: float) -> None:
        """Add traffic to the counters and refresh the idle clock."""
        self.n_packets += packets
        self.n_bytes += nbytes
        if packets and now > self.last_used:
            self.last_used = now


class FlowTables:
    """Tables ``0..n_tables-1`` of rules; see the module docstring for the semantics."""

    def __init__(self, n_tables: int = DEFAULT_N_TABLES, ports: PortNames | None = None) -> None:
        if not 1 <= n_tables <= 255:
            raise ValueError("n_tables must be 1..255")
        self.n_tables = n_tables
        self.ports = ports
        self.generation = 0
        self._tables = [Classifier() for _ in range(n_tables)]
        self._seq = 0
        #: Frames dropped because resubmit went deeper than actions.MAX_RESUBMIT_DEPTH
        #: (or past the total budget); counted by actions.decide.
        self.resubmit_overflows = 0

    # ---- changes ---------------------------------------------------------------------
    def add(self, flow: Flow, now: float) -> FlowEntry:
        """Install ``flow``, replacing a rule with identical match and priority."""
        table = self._table(flow.table)
        old = table.find_exact(flow.match, flow.priority)
        if old is not None:
            table.remove(old)
            old.removed_reason = "replaced"
        self._seq += 1
        entry = FlowEntry(flow, self._seq, now, now, now)
        table.insert(entry)
        self.generation += 1
        return entry

    def modify(
        self,
        filt: FlowFilter,
        actions: tuple[Action, ...] | None = None,
        *,
        strict: bool = False,
        now: float,
    ) -> list[FlowEntry]:
        """Set the actions of the selected rules (``actions`` or ``filt.actions``);
        returns the rules changed.  Like OVS with OpenFlow 1.1+, a modify that selects
        nothing adds nothing."""
        new_actions = actions if actions is not None else filt.actions
        if new_actions is None:
            raise ValueError("modify needs actions")
        changed = list(self.select(filt, strict=strict))
        for e in changed:
            e.flow = replace(e.flow, actions=tuple(new_actions))
            e.modified = now
        if changed:
            self.generation += 1
        return changed

    def delete(self, filt: FlowFilter | None = None, *, strict: bool = False) -> list[FlowEntry]:
        """Remove the selected rules (all rules when ``filt`` is None) and return them."""
        gone = list(self.select(filt or FlowFilter(), strict=strict))
        for e in gone:
            self._tables[e.flow.table].remove(e)
            e.removed_reason = "delete"
        if gone:
            self.generation += 1
        return gone

    def remove(self, entries: Iterable[FlowEntry]) -> None:
        """Remove these rules (by identity), with one generation bump: what ``delete``
        does for rules already in hand, without a selection per rule (a table of 10,000
        rules replaced by one would otherwise cost 10,000 scans)."""
        n = 0
        for e in entries:
            self._tables[e.flow.table].remove(e)
            e.removed_reason = "delete"
            n += 1
        if n:
            self.generation += 1

    def expire(self, now: float) -> list[FlowEntry]:
        """Remove and return the rules whose idle or hard timeout has passed at ``now``;
        each has ``removed_reason`` set to ``"idle"`` or ``"hard"``."""
        gone = []
        for e in self:
            f = e.flow
            if f.hard_timeout and now - e.modified >= f.hard_timeout:
                e.removed_reason = "hard"
            elif f.idle_timeout and now - e.last_used >= f.idle_timeout:
                e.removed_reason = "idle"
            else:
                continue
            gone.append(e)
        for e in gone:
            self._tables[e.flow.table].remove(e)
        if gone:
            self.generation += 1
        return gone

    def invalidate(self) -> None:
        """Bump the generation without changing rules (ports renamed/removed ...)."""
        self.generation += 1

    # ---- queries -------------------------------------------------------------------
    def lookup(self, key: Sequence[Any], table: int = 0) -> FlowEntry | None:
        """The winning rule for ``key`` in ``table`` (highest priority, then the rule
        added first), or None on a miss.  Does not touch counters."""
        return self._tables[table].lookup(key)

    def select(self, filt: FlowFilter, *, strict: bool = False) -> Iterator[FlowEntry]:
        """The rules ``filt`` selects, in dump order."""
        for e in self.entries():
            if filt.selects(e.flow, strict):
                yield e

    def entries(self) -> list[FlowEntry]:
        """All rules in dump order: by table, then priority (high first), then age."""
        out: list[FlowEntry] = []
        for t in self._tables:
            out.extend(sorted(t, key=lambda e: (-e.flow.priority, e.seq)))
        return out

    def __iter__(self) -> Iterator[FlowEntry]:
        return iter(self.entries())

    def __len__(self) -> int:
        return sum(len(t) for t in self._tables)

    def _table(self, table: int) -> Classifier:
        if not 0 <= table < self.n_tables:
            raise ValueError(f"table={table}: this bridge has tables 0..{self.n_tables - 1}")
        return self._tables[table]

    # ---- ovs-ofctl string front end (what the control API calls) -------------------
    def add_flow(self, text: str, now: float) -> FlowEntry:
        """``ovs-ofctl add-flow``: parse with this bridge's port names and add."""
        return self.add(parse_flow(text, self.ports), now)

    def mod_flows(self, text: str, now: float, *, strict: bool = False) -> list[FlowEntry]:
        return self.modify(
            parse_filter(text, self.ports, with_actions=True), strict=strict, now=now
        )

    def del_flows(self, text: str = "", *, strict: bool = False) -> list[FlowEntry]:
        return self.delete(parse_filter(text, self.ports), strict=strict)

    def dump_flows(self, now: float, text: str = "") -> list[str]:
        """``ovs-ofctl dump-flows`` lines (no header), optionally filtered."""
        filt = parse_filter(text, self.ports)
        return [format_dump_line(e, now, self.ports) for e in self.select(filt)]


def install_default(tables: FlowTables, now: float) -> FlowEntry:
    """Install ``priority=0 actions=NORMAL`` in table 0: what a new bridge in
    ``standalone`` fail mode holds (``secure`` mode starts empty: a miss drops)."""
    return tables.add(Flow(actions=(Action("normal"),), priority=0), now)
