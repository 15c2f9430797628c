"""Snapshots of the data path's counters: the one reader behind ``/metrics`` and ``port-stats``.

The data path owns its counters as plain integers (``PortCounters`` on each port,
``BridgeStats`` and ``FdbStats`` on each bridge, ``iterations``/``busy_seconds`` on the
loop, ``Switch.batch_sizes``) and does ``+=`` on them once per batch.  This module only
*reads* them and turns them into plain dicts; the Prometheus collector
(:mod:`pyswitch.metrics`) and the CLI's ``port-stats`` both call :func:`port_stats`, so
the two always agree.  It imports nothing heavier than the core, so the CLI stays quick.

Thread safety: a snapshot may be taken on another thread than the event loop (the
metrics HTTP server).  Reading an ``int`` attribute is atomic under the GIL; dicts are
copied with ``dict(d)`` (one C call, atomic) before they are iterated; a port or bridge
deleted while a snapshot is being taken is simply left out.  Nothing here writes to the
data path's objects, and no port method with side effects is called: only
``link_state()`` (read-only by contract) and, for vhost-user ports, ``status()``.

Counters of ports that come and go: a port's counters belong to the port object, so they
survive vhost-user reconnects; a port deleted and added again starts from zero (a new
series to Prometheus, which ``rate()`` treats as a counter reset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .port import DROP_REASONS, Port

#: The per-port counters, in OVS's ``statistics`` key order (``get Interface p statistics``).
PORT_COUNTER_KEYS = (
    "rx_packets", "rx_bytes", "rx_dropped", "rx_errors",
    "tx_packets", "tx_bytes", "tx_dropped", "tx_errors",
)

T = TypeVar("T")


def _retry(read: Callable[[], T], attempts: int = 5) -> T:
    """``read()``, retried if another thread changed a dict under it.

    Iterating a dict that the loop thread resizes raises ``RuntimeError``; the next try
    sees the new state.  The last attempt's error propagates.
    """
    for _ in range(attempts - 1):
        try:
            return read()
        except RuntimeError:
            continue
    return read()


def port_stats(switch: Any, names: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{port name: stats}`` for every port of ``switch`` (or only ``names``).

    Each ``stats`` dict holds: ``bridge``, ``type``, ``ofport``, ``link_state``
    (``"up"``/``"down"``), the eight OVS statistics keys of :data:`PORT_COUNTER_KEYS`,
    ``drops`` (``{reason: frames}``, every reason of ``DROP_REASONS`` present, zero if
    never seen, plus any other reason a port used) and, for vhost-user ports only,
    ``vhost`` (see :func:`vhost_stats`).  Directions are the switch's: ``rx`` is what
    the port brought into the switch -- for a vhost-user port, what the guest sent.
    Unknown ``names`` and ports deleted meanwhile are left out.
    """
    wanted = list(names) if names is not None else _retry(switch.port_names)
    out: dict[str, dict[str, Any]] = {}
    for name in wanted:
        try:
            port = switch.port(name)
            bridge = switch.port_bridge(name)
            ofport = switch.port_number(name)
        except KeyError:
            continue
        out[name] = _one_port(port, bridge, ofport)
    return out


def _one_port(port: Port, bridge: str, ofport: int) -> dict[str, Any]:
    c = port.counters
    d: dict[str, Any] = {"bridge": bridge, "type": port.type_name, "ofport": ofport}
    try:
        d["link_state"] = port.link_state()
    except Exception:  # noqa: BLE001 - a port that cannot tell is not up
        d["link_state"] = "down"
    for key in PORT_COUNTER_KEYS:
        d[key] = getattr(c, key)
    drops = dict.fromkeys(DROP_REASONS, 0)
    drops.update(dict(c.drops))
    d["drops"] = drops
    vhost = vhost_stats(port)
    if vhost is not None:
        d["vhost"] = vhost
    return d


def vhost_stats(port: Port) -> dict[str, Any] | None:
    """The vhost-user facts of ``port``, or None for other port types.

    A port is taken for vhost-user when it has a ``vhost_stats`` dict (the attribute
    ``ports/vhostuser/port.py`` keeps).  Returned keys: ``counters`` (a copy of
    ``vhost_stats``: connections, reconnects, disconnects, kicks, notifications_sent,
    notifications_suppressed, tx_disabled_discards, broken_rings ... whatever the port
    counts, all monotonic), and from ``status()`` when it answers: ``connected``
    (bool), ``features`` and ``protocol_features`` (hex strings of the negotiated
    bits), ``queue_pairs`` (enabled queue pairs, 0 when disconnected).
    """
    raw = getattr(port, "vhost_stats", None)
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {"counters": {k: v for k, v in dict(raw).items() if isinstance(v, int)}}
    try:
        status = port.status()
    except Exception:  # noqa: BLE001 - a scrape must not fail for one port's view
        status = {}
    out["connected"] = bool(status.get("connected", False))
    out["features"] = str(status.get("features", "0x0"))
    out["protocol_features"] = str(status.get("protocol_features", "0x0"))
    qp = status.get("queue_pairs", 0)
    out["queue_pairs"] = qp if isinstance(qp, int) else 0
    return out


def bridge_stats(switch: Any) -> dict[str, dict[str, Any]]:
    """``{bridge name: stats}``: MAC table and forwarding counters, flow table if any.

    Keys: ``mac_entries`` (now), ``mac_table_size`` (the limit), ``mac_learned``,
    ``mac_moved``, ``mac_aged``, ``mac_evicted`` (totals), ``frames``, ``floods``,
    ``forwarded`` (totals), ``ports`` (now); and what :func:`flow_stats` finds
    (``flow_rules``, ``flow_cache_hits``, ``flow_cache_misses``).  All values are ints.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, br in list(switch.bridges.items()):
        fdb, st, fst = br.fdb, br.stats, br.fdb.stats
        d: dict[str, Any] = {
            "mac_entries": len(fdb), "mac_table_size": fdb.max_entries,
            "mac_learned": fst.learned, "mac_moved": fst.moved, "mac_aged": fst.aged,
            "mac_evicted": fst.evicted,
            "frames": st.frames, "floods": st.floods, "forwarded": st.forwarded,
            "ports": len(br.ports),
        }
        d.update(flow_stats(br))
        out[name] = d
    return out


def flow_tables(bridge: Any) -> Any:
    """The bridge's flow table (``bridge.flows``, a ``pyswitch.flows.FlowTables``), or
    None for a bridge without one."""
    tables = getattr(bridge, "flows", None)
    return tables if tables is not None and hasattr(tables, "entries") else None


def flow_entries(bridge: Any) -> list[Any] | None:
    """Every rule of the bridge's flow table (objects with ``flow.table``,
    ``flow.cookie``, ``n_packets``, ``n_bytes``), or None without a flow table."""
    tables = flow_tables(bridge)
    return None if tables is None else _retry(tables.entries)


def flow_stats(bridge: Any) -> dict[str, int]:
    """``flow_rules`` (rules now) if the bridge has a flow table, and
    ``flow_cache_hits`` / ``flow_cache_misses`` if its ``stats`` count them."""
    out: dict[str, int] = {}
    tables = flow_tables(bridge)
    if tables is not None:
        out["flow_rules"] = _retry(lambda: len(tables))
    for key in ("flow_cache_hits", "flow_cache_misses"):
        v = getattr(bridge.stats, key, None)
        if isinstance(v, int):
            out[key] = v
    return out


class CookieTotals:
    """Packets and bytes per (bridge, table, cookie) that never go backwards.

    Rules come and go (``del-flows``, timeouts, an ``add`` that replaces a rule), and
    their counters go with them; a plain sum per cookie would then drop.  So what a
    rule had counted when it was last seen is kept ("retired") once it is gone.  What
    a rule counted between the last scrape and its removal is not seen: the totals
    may undercount, never decrease.  Totals of a deleted bridge are forgotten.
    """

    def __init__(self) -> None:
        # id(entry) -> (entry, key, packets, bytes); holding the entry keeps its id unique.
        self._seen: dict[int, tuple[Any, tuple[str, int, int], int, int]] = {}
        self._retired: dict[tuple[str, int, int], list[int]] = {}

    def update(self, rules: dict[str, list[Any]]) -> dict[tuple[str, int, int], list[int]]:
        """Fold in ``{bridge: rules now}`` (:func:`flow_entries`); return
        ``{(bridge, table, cookie): [packets, bytes]}`` for every key ever seen on a
        bridge that still exists."""
        seen: dict[int, tuple[Any, tuple[str, int, int], int, int]] = {}
        totals: dict[tuple[str, int, int], list[int]] = {}
        for bname, entries in rules.items():
            for e in entries:
                key = (bname, e.flow.table, e.flow.cookie)
                pk, by = e.n_packets, e.n_bytes
                seen[id(e)] = (e, key, pk, by)
                t = totals.setdefault(key, [0, 0])
                t[0] += pk
                t[1] += by
        for i, (_, key, pk, by) in self._seen.items():
            if i not in seen:
                r = self._retired.setdefault(key, [0, 0])
                r[0] += pk
                r[1] += by
        self._retired = {k: v for k, v in self._retired.items() if k[0] in rules}
        for key, (pk, by) in self._retired.items():
            t = totals.setdefault(key, [0, 0])
            t[0] += pk
            t[1] += by
        self._seen = seen
        return totals


def process_stats(switch: Any) -> dict[str, Any]:
    """``datapath`` (which path runs, see :mod:`pyswitch.fastpath`), ``loop_iterations``,
    ``loop_busy_seconds`` and ``batch_sizes`` (a copy: index n = received batches of n frames)."""
    from . import fastpath

    loop = switch.loop
    return {
        "datapath": {**fastpath.current().as_dict(), "pmd": "true" if switch.pmd else "false"},
        "loop_iterations": loop.iterations,
        "loop_busy_seconds": float(loop.busy_seconds),
        "batch_sizes": list(switch.batch_sizes),
    }
