"""One flow table's classifier: tuple space search (as in OVS's ``lib/classifier.c``).

Rules are grouped into *subtables* by their mask signature, the tuple of
``(field index, mask)`` they test.  Within a subtable a rule is found by one dict probe
with the key's fields masked the same way, so a lookup costs one probe per distinct
signature, not one test per rule.  Subtables are visited in order of the highest
priority they hold, and the search stops as soon as no remaining subtable can beat the
best rule found.

Order (documented contract, checked against a brute-force reference in the tests):

* the matching rule with the highest priority wins;
* among matching rules of equal priority, the one **added first** (lowest ``seq``)
  wins.  ``seq`` is assigned when a rule is added (a replacing add-flow counts as a new
  rule); mod-flows keeps it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .table import FlowEntry

Signature = tuple[tuple[int, int], ...]


def _order(e: FlowEntry) -> tuple[int, int]:
    return (-e.flow.priority, e.seq)


class _Subtable:
    __slots__ = ("buckets", "count", "max_priority", "sig")

    def __init__(self, sig: Signature) -> None:
        self.sig = sig
        self.buckets: dict[tuple, list[FlowEntry]] = {}  # sorted by (-priority, seq)
        self.max_priority = -1
        self.count = 0

    def masked(self, key: Sequence[Any]) -> tuple:
        return tuple([None if (k := key[i]) is None else k & m for i, m in self.sig])


class Classifier:
    """The rules of one table, with ``lookup(key)`` as specified in the module doc."""

    def __init__(self) -> None:
        self._subtables: dict[Signature, _Subtable] = {}
        self._ordered: list[_Subtable] = []  # by max_priority, descending

    def __len__(self) -> int:
        return sum(st.count for st in self._ordered)

    def __iter__(self) -> Iterator[FlowEntry]:
        for st in self._ordered:
            for bucket in st.buckets.values():
                yield from bucket

    def insert(self, entry: FlowEntry) -> None:
        """Add ``entry`` (the caller has removed any identical match+priority rule)."""
        match = entry.flow.match
        sig = tuple((idx, mask) for idx, _v, mask in match)
        st = self._subtables.get(sig)
        if st is None:
            st = self._subtables[sig] = _Subtable(sig)
        values = tuple(v for _i, v, _m in match)
        bucket = st.buckets.setdefault(values, [])
        bucket.append(entry)
        bucket.sort(key=_order)
        st.count += 1
        st.max_priority = max(st.max_priority, entry.flow.priority)
        self._reorder()

    def remove(self, entry: FlowEntry) -> None:
        """Remove ``entry`` (by identity); no-op if absent."""
        match = entry.flow.match
        st = self._subtables.get(tuple((idx, mask) for idx, _v, mask in match))
        if st is None:
            return
        values = tuple(v for _i, v, _m in match)
        bucket = st.buckets.get(values, [])
        for i, e in enumerate(bucket):
            if e is entry:
                del bucket[i]
                st.count -= 1
                break
        else:
            return
        if not bucket:
            del st.buckets[values]
        if st.count == 0:
            del self._subtables[st.sig]
        else:
            st.max_priority = max(b[0].flow.priority for b in st.buckets.values())
        self._reorder()

    def find_exact(self, flow_match: Any, priority: int) -> FlowEntry | None:
        """The rule with exactly this match and priority, if any."""
        st = self._subtables.get(tuple((idx, mask) for idx, _v, mask in flow_match))
        if st is None:
            return None
        for e in st.buckets.get(tuple(v for _i, v, _m in flow_match), ()):
            if e.flow.priority == priority:
                return e
        return None

    def lookup(self, key: Sequence[Any]) -> FlowEntry | None:
        """The winning rule for ``key`` (highest priority, then first added), or None."""
        best: FlowEntry | None = None
        best_p = -1
        for st in self._ordered:
            if st.max_priority < best_p:
                break
            bucket = st.buckets.get(st.masked(key))
            if bucket:
                e = bucket[0]
                p = e.flow.priority
                if p > best_p or (best is not None and p == best_p and e.seq < best.seq):
                    best, best_p = e, p
        return best

    def _reorder(self) -> None:
        self._ordered = sorted(self._subtables.values(), key=lambda st: -st.max_priority)
