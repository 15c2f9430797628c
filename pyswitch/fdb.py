"""The MAC learning table (forwarding database) of one bridge.

Keys are ``(vlan, mac)``: learning is per VLAN, as in Open vSwitch and the Linux bridge,
so the same MAC may live on different ports in different VLANs.  A value is the port
number and the time the MAC was last seen as a source.

Aging: an entry not refreshed for ``aging_time`` seconds is gone.  Expiry is both lazy
(a lookup ignores and removes a stale entry) and periodic (:meth:`expire`, called by a
timer), like ``br_fdb.c``.  ``aging_time == 0`` disables learning: every unicast frame
floods (the Linux bridge's meaning of ageing 0 for a hub-like bridge).

Size limit: at most ``max_entries``; learning a new MAC when full evicts the entry seen
least recently (the table is an LRU kept in an ordered dict, refreshed on every learn),
so a flood of spoofed sources cannot grow memory without bound.

The table is pure: no clock reads, ``now`` is a parameter.  ``generation`` increases on
every change that can alter a forwarding decision (new MAC, move, removal by aging,
eviction or flush), so caches of decisions can tell they are stale.  A refresh of a
MAC already on its port is no such change: the compiled fast path replays those
later with :meth:`touch`, and bounds its cached lookups with :meth:`last_seen`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_AGING_TIME = 300
DEFAULT_MAX_ENTRIES = 8192


@dataclass(slots=True)
class FdbStats:
    learned: int = 0  # new entries
    moved: int = 0  # an existing MAC seen on another port
    aged: int = 0  # removed by aging
    evicted: int = 0  # removed because the table was full


class MacTable:
    """A per-VLAN MAC -> port table with aging and an LRU size limit."""

    def __init__(
        self, aging_time: float = DEFAULT_AGING_TIME, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.aging_time = aging_time
        self.max_entries = max_entries
        # (vlan, mac) -> [port, last_seen]; ordered from least to most recently seen.
        self._entries: OrderedDict[tuple[int, bytes], list] = OrderedDict()
        self.stats = FdbStats()
        self.generation = 0

    def set_limits(self, aging_time: float, max_entries: int) -> None:
        """Change the aging time and the size limit; a smaller limit evicts at once."""
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.aging_time = aging_time
        self.max_entries = max_entries
        while len(self._entries) > max_entries:
            self._entries.popitem(last=False)
            self.stats.evicted += 1
            self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, vlan: int, mac: bytes, port: int, now: float) -> None:
        """Record that ``mac`` was seen as a source on ``port`` in ``vlan`` at ``now``.

        The caller filters out group (multicast) source addresses.
        """
        if not self.aging_time:
            return
        key = (vlan, mac)
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] != port:
                entry[0] = port
                self.stats.moved += 1
                self.generation += 1
            entry[1] = now
            self._entries.move_to_end(key)
            return
        if len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
            self.stats.evicted += 1
        self._entries[key] = [port, now]
        self.stats.learned += 1
        self.generation += 1

    def touch(self, vlan: int, mac: bytes, port: int, now: float) -> None:
        """What :meth:`learn` does for a MAC already known on ``port`` (refresh its
        time and LRU place); nothing when it is absent or elsewhere.  The compiled fast
        path replays the learning of cached frames with it: an entry removed or moved
        in between stays so, as it would had the refresh come first."""
        if not self.aging_time:
            return
        key = (vlan, mac)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == port:
            entry[1] = now
            self._entries.move_to_end(key)

    def last_seen(self, vlan: int, mac: bytes) -> float | None:
        """When ``mac`` was last seen in ``vlan`` (aged or not), or None."""
        entry = self._entries.get((vlan, mac))
        return None if entry is None else entry[1]

    def lookup(self, vlan: int, mac: bytes, now: float) -> int | None:
        """The port ``mac`` was last seen on in ``vlan``, or None (unknown or aged out)."""
        entry = self._entries.get((vlan, mac))
        if entry is None:
            return None
        if now - entry[1] >= self.aging_time:
            del self._entries[(vlan, mac)]
            self.stats.aged += 1
            self.generation += 1
            return None
        return entry[0]

    def expire(self, now: float) -> int:
        """Remove every entry older than the aging time; return how many went."""
        n = 0
        entries = self._entries
        while entries:
            key, (_, seen) = next(iter(entries.items()))
            if now - seen < self.aging_time:
                break
            del entries[key]
            n += 1
        if n:
            self.stats.aged += n
            self.generation += 1
        return n

    def flush(self, port: int | None = None, vlan: int | None = None) -> int:
        """Remove all entries, or those of one port and/or VLAN; return how many went."""
        if port is None and vlan is None:
            keys = list(self._entries)
        else:
            keys = [
                k
                for k, (p, _) in self._entries.items()
                if (port is None or p == port) and (vlan is None or k[0] == vlan)
            ]
        for k in keys:
            del self._entries[k]
        if keys:
            self.generation += 1
        return len(keys)

    def entries(self, now: float) -> list[tuple[int, int, bytes, float]]:
        """``(port, vlan, mac, age_seconds)`` of every live entry, oldest first."""
        return [
            (p, k[0], k[1], now - seen)
            for k, (p, seen) in self._entries.items()
            if now - seen < self.aging_time
        ]
