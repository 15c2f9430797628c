"""Prometheus metrics: a collector that snapshots the data path's counters at scrape time.

Following prometheus.io's advice for exporters of counters owned elsewhere, the data
path keeps plain integers and never touches a client-library object; at each scrape
:class:`SwitchCollector` reads them through :mod:`pyswitch.stats` (the same reader as
``pyswitch port-stats``, so the two agree) and yields ``CounterMetricFamily`` /
``GaugeMetricFamily`` / ``HistogramMetricFamily`` snapshots.  A deleted port or bridge
is simply absent from the next scrape.  Every metric is defined in this module and
listed in ``docs/metrics.md``.

:func:`start_metrics_server` serves them over HTTP on a thread of its own, with its own
``CollectorRegistry`` (never the global one): default ``127.0.0.1:9477``
(:data:`DEFAULT_ADDRESS`, :data:`DEFAULT_PORT`; 9477 is clear of the OVS exporters'
9310/9475/1981 and node_exporter's 9100).  The HTTP thread only competes for the GIL;
a collection reads a few ints per port and copies small dicts, so it is cheap (numbers,
and why the daemon should ``gc.freeze()`` its start-up heap: docs/metrics.md, "Cost").

``prometheus_client`` (≈ 0.1 s to import) is imported only when a collection runs or a
server starts, so ``pyswitch check`` and the configuration layer, which use
:class:`MetricsConfig`, stay quick.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from . import __version__, stats
from .port import MAX_BURST

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 9477

#: How often the server thread checks for close() (seconds): bounds close()'s wait.
POLL_INTERVAL = 0.05

PORT_LABELS = ("bridge", "port", "type")

#: stats key -> (metric name without ``_total``, help).  Counters, per port.
PORT_COUNTERS = {
    "rx_packets": ("pyswitch_port_rx_packets", ("Frames the port received into the switch "
                   "(for vhost-user: frames the guest sent).")),
    "rx_bytes": ("pyswitch_port_rx_bytes", ("Bytes of those frames (Ethernet header to "
                 "payload, no FCS, no virtio-net header).")),
    "rx_dropped": ("pyswitch_port_rx_dropped", ("Frames dropped on the receive side "
                   "(sum of the receive-side reasons).")),
    "rx_errors": ("pyswitch_port_rx_errors", "Receive errors."),
    "tx_packets": ("pyswitch_port_tx_packets", ("Frames the switch transmitted out of the "
                   "port (for vhost-user: frames put in the guest's receive queues).")),
    "tx_bytes": ("pyswitch_port_tx_bytes", "Bytes of those frames."),
    "tx_dropped": ("pyswitch_port_tx_dropped", ("Frames dropped on the transmit side "
                   "(sum of the transmit-side reasons).")),
    "tx_errors": ("pyswitch_port_tx_errors", "Transmit errors."),
}

#: stats key -> (metric name, help, kind).  Per bridge.
BRIDGE_METRICS = {
    "mac_entries": ("pyswitch_bridge_mac_entries", "MAC table entries now.", "gauge"),
    "mac_table_size": ("pyswitch_bridge_mac_table_size", "MAC table size limit.", "gauge"),
    "mac_learned": ("pyswitch_bridge_mac_learned", "MAC entries learned.", "counter"),
    "mac_moved": ("pyswitch_bridge_mac_moved", "Known MACs seen on another port.", "counter"),
    "mac_aged": ("pyswitch_bridge_mac_aged", "MAC entries removed by aging.", "counter"),
    "mac_evicted": ("pyswitch_bridge_mac_evicted", ("MAC entries evicted by the size "
                    "limit."), "counter"),
    "frames": ("pyswitch_bridge_frames", "Frames the bridge processed.", "counter"),
    "floods": ("pyswitch_bridge_flooded_frames", ("Frames flooded (broadcast, multicast, "
               "unknown unicast)."), "counter"),
    "forwarded": ("pyswitch_bridge_forwarded_frames", ("Frames sent to the one port their "
                  "destination MAC was learned on."), "counter"),
    "ports": ("pyswitch_bridge_ports", "Ports on the bridge now.", "gauge"),
    "flow_rules": ("pyswitch_bridge_flow_rules", "Flow-table rules now.", "gauge"),
    "flow_cache_hits": ("pyswitch_bridge_flow_cache_hits", ("Frames whose decision came "
                        "from the flow cache."), "counter"),
    "flow_cache_misses": ("pyswitch_bridge_flow_cache_misses", ("Frames that went up to "
                          "the flow tables."), "counter"),
}

#: Known ``vhost_stats`` keys -> help; other keys are exported too, help generic.
VHOST_COUNTER_HELP = {
    "connections": "Front-end connections accepted or made.",
    "reconnects": "Connections after the first one.",
    "disconnects": "Front-end disconnections.",
    "kicks": "Kick eventfd wake-ups from the guest.",
    "notifications_sent": "Call eventfd writes to the guest (interrupts).",
    "notifications_suppressed": "Guest notifications skipped because the guest asked "
                                "for none (event index or NO_INTERRUPT).",
    "tx_disabled_discards": "Frames for the guest discarded while its queues were "
                            "not enabled.",
    "broken_rings": "Rings stopped because the guest broke the ring protocol.",
    "protocol_errors": "vhost-user messages refused (malformed, out of order, bad fds "
                       "or memory) and rings that could not start.",
}

#: Upper bounds of the batch size histogram buckets (frames per received batch).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


# -- configuration ---------------------------------------------------------------------------


@dataclass
class MetricsConfig:
    """Where ``/metrics`` is served; on by default, loopback by default."""

    enabled: bool = True
    address: str = DEFAULT_ADDRESS
    port: int = DEFAULT_PORT

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "address": self.address, "port": self.port}


#: A path in the configuration, as ``pyswitch.config.Path``.
Path = tuple[str | int, ...]


def parse_metrics_config(raw: Any, path: Path = ("metrics",)) -> MetricsConfig:
    """Validate the YAML ``metrics:`` block; ``ConfigError`` names the bad field.

    Accepts a mapping with ``enabled`` (bool), ``address`` (an IPv4/IPv6 literal;
    ``0.0.0.0`` or ``::`` for every address) and ``port`` (0..65535, 0 = any free port),
    or a bare boolean (``metrics: false``); ``None`` gives the defaults.
    (``pyswitch.config`` may import this module: it does not import config at load time.)
    """
    from .config import ConfigError

    cfg = MetricsConfig()
    if raw is None:
        return cfg
    if isinstance(raw, bool):
        cfg.enabled = raw
        return cfg
    if not isinstance(raw, dict):
        raise ConfigError(path, "must be a mapping (enabled, address, port) or a boolean")
    for key in raw:
        if key not in ("enabled", "address", "port"):
            raise ConfigError(path + (str(key),), "unknown key (allowed: address, enabled, port)")
    if "enabled" in raw:
        if not isinstance(raw["enabled"], bool):
            raise ConfigError(path + ("enabled",), "must be true or false")
        cfg.enabled = raw["enabled"]
    if "address" in raw:
        cfg.address = _address(raw["address"], path + ("address",))
    if "port" in raw:
        port = raw["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(path + ("port",), f"must be a TCP port 0..65535, not {port!r}")
        cfg.port = port
    return cfg


def _address(value: Any, path: Path) -> str:
    from .config import ConfigError

    if not isinstance(value, str):
        raise ConfigError(path, f"must be an IP address string, not {value!r}")
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise ConfigError(path, f"{value!r} is not an IPv4 or IPv6 address") from None


# -- collection ------------------------------------------------------------------------------


def _metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _batch_bounds() -> list[int]:
    """Histogram bucket bounds: powers of two up to ``MAX_BURST``, and ``MAX_BURST``."""
    bounds = [b for b in BATCH_BUCKETS if b < MAX_BURST]
    return bounds + [MAX_BURST]


class SwitchCollector:
    """A ``prometheus_client`` collector of one :class:`~pyswitch.switch.Switch`.

    ``collect()`` may run on any thread, concurrently with the event loop (it only
    reads; see :mod:`pyswitch.stats`) and with other scrapes (the cookie totals are
    updated under a lock).  It takes the whole snapshot first -- small plain dicts --
    and then yields one metric family at a time, so that only one family's samples are
    alive at once: a scrape's objects die young and do not push the garbage collector
    into full collections, which would pause the forwarding thread too.
    """

    def __init__(self, switch: Any) -> None:
        self.switch = switch
        self._lock = threading.Lock()
        self._flows = stats.CookieTotals()

    def collect(self) -> Iterator[Metric]:
        sw = self.switch
        ports = stats.port_stats(sw)
        bridges = stats.bridge_stats(sw)
        rules = {}
        for name in bridges:
            br = sw.bridges.get(name)
            entries = stats.flow_entries(br) if br is not None else None
            if entries is not None:
                rules[name] = entries
        with self._lock:
            cookies = self._flows.update(rules)
        process = stats.process_stats(sw)
        for fam in _families(ports, bridges, cookies, process):
            if fam.samples:
                yield fam


def _families(ports: dict[str, dict[str, Any]], bridges: dict[str, dict[str, Any]],
              cookies: dict[tuple[str, int, int], list[int]],
              process: dict[str, Any]) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    info = GaugeMetricFamily("pyswitch_build_info", "pyswitch version.", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    dp = process["datapath"]
    path = GaugeMetricFamily("pyswitch_datapath_info", "The data path that runs: compiled "
                             "kernels or the Python reference, as asked and with pmd polling or not.",
                             labels=["path", "requested", "pmd"])
    path.add_metric([dp["active"], dp["requested"], dp["pmd"]], 1)
    yield path
    yield from _port_families(ports)
    yield from _vhost_families(ports)
    yield from _bridge_families(bridges)
    yield from _flow_families(cookies)
    yield from _process_families(process)


def _port_families(ports: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = list(PORT_LABELS)
    lvs = [(p, [s["bridge"], p, s["type"]]) for p, s in ports.items()]
    for key, (name, doc) in PORT_COUNTERS.items():
        fam = CounterMetricFamily(name, doc, labels=labels)
        for p, lv in lvs:
            fam.add_metric(lv, ports[p][key])
        yield fam
    fam = CounterMetricFamily("pyswitch_port_dropped", "Frames dropped, by reason (vlan, "
                              "no_buffer, mtu, flow, bad_descriptor, tx_full, malformed, "
                              "link_down).", labels=labels + ["reason"])
    for p, lv in lvs:
        for reason, n in sorted(ports[p]["drops"].items()):
            fam.add_metric(lv + [reason], n)
    yield fam
    up = GaugeMetricFamily("pyswitch_port_link_up", "1 if the port's link is up "
                           "(vhost-user: connected with a ring pair started).", labels=labels)
    for p, lv in lvs:
        up.add_metric(lv, 1 if ports[p]["link_state"] == "up" else 0)
    yield up
    info = GaugeMetricFamily("pyswitch_port_info", "Port facts: the OpenFlow port number "
                             "on its bridge.", labels=labels + ["ofport"])
    for p, lv in lvs:
        info.add_metric(lv + [str(ports[p]["ofport"])], 1)
    yield info


def _vhost_families(ports: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = list(PORT_LABELS)
    vh = [([s["bridge"], p, s["type"]], s["vhost"]) for p, s in ports.items() if "vhost" in s]
    if not vh:
        return
    gauges = (
        ("pyswitch_vhost_connected", "1 while a vhost-user front end is connected.",
         lambda v: 1 if v["connected"] else 0),
        ("pyswitch_vhost_queue_pairs", "Queue pairs the guest has enabled now.",
         lambda v: v["queue_pairs"]),
    )
    for name, doc, value in gauges:
        g = GaugeMetricFamily(name, doc, labels=labels)
        for lv, v in vh:
            g.add_metric(lv, value(v))
        yield g
    g = GaugeMetricFamily("pyswitch_vhost_features_info", "Negotiated virtio and vhost-user "
                          "protocol feature bits (hex), 1 per port.",
                          labels=labels + ["features", "protocol_features"])
    for lv, v in vh:
        g.add_metric(lv + [v["features"], v["protocol_features"]], 1)
    yield g
    for key in sorted({k for _, v in vh for k in v["counters"]}):
        doc = VHOST_COUNTER_HELP.get(key, f"vhost-user {key} (port counter).")
        c = CounterMetricFamily(f"pyswitch_vhost_{_metric_name(key)}", doc, labels=labels)
        for lv, v in vh:
            if key in v["counters"]:
                c.add_metric(lv, v["counters"][key])
        yield c


def _bridge_families(bridges: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for key, (name, doc, kind) in BRIDGE_METRICS.items():
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        fam = cls(name, doc, labels=["bridge"])
        for bname, d in bridges.items():
            if key in d:
                fam.add_metric([bname], d[key])
        yield fam


def _flow_families(cookies: dict[tuple[str, int, int], list[int]]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    labels = ["bridge", "table", "cookie"]
    docs = (("Frames matched by the flow rules of a table with this cookie (per rule: "
             "dump-flows)."), "Bytes of those frames.")
    names = ("pyswitch_flow_packets", "pyswitch_flow_bytes")
    for i, (name, doc) in enumerate(zip(names, docs)):
        fam = CounterMetricFamily(name, doc, labels=labels)
        for (bname, table, cookie), totals in sorted(cookies.items()):
            fam.add_metric([bname, str(table), f"{cookie:#x}"], totals[i])
        yield fam


def _process_families(p: dict[str, Any]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    it = CounterMetricFamily("pyswitch_loop_iterations", "Event loop iterations.")
    it.add_metric([], p["loop_iterations"])
    yield it
    busy = CounterMetricFamily("pyswitch_loop_busy_seconds", "Time the event loop spent "
                               "working (servicing ports, timers, handlers), not waiting.")
    busy.add_metric([], p["loop_busy_seconds"])
    yield busy
    sizes = p["batch_sizes"]
    buckets: list[tuple[str, float]] = [(str(b), sum(sizes[: b + 1])) for b in _batch_bounds()]
    buckets.append(("+Inf", sum(sizes)))
    hist = HistogramMetricFamily("pyswitch_rx_batch_frames", "Frames per received batch "
                                 "(only non-empty batches are counted).")
    hist.add_metric([], buckets, sum_value=sum(n * c for n, c in enumerate(sizes)))
    yield hist


# -- the HTTP server -------------------------------------------------------------------------


class MetricsError(OSError):
    """The metrics endpoint cannot be served (address in use, bad address ...)."""


class _HTTPServer(ThreadingMixIn, WSGIServer):
    """One thread per request; request threads never block shutdown."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one every few seconds, forever)."""


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it (idempotent)."""

    def __init__(self, httpd: _HTTPServer, registry: CollectorRegistry,
                 collector: SwitchCollector) -> None:
        self._httpd = httpd
        self.registry = registry
        self.collector = collector
        self.address = str(httpd.server_address[0])
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(target=httpd.serve_forever, args=(POLL_INTERVAL,),
                                        name="pyswitch-metrics", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, close the listening socket, join the thread."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def make_registry(switch: Any) -> tuple[CollectorRegistry, SwitchCollector]:
    """A fresh registry with the switch's collector and the standard process metrics."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    collector = SwitchCollector(switch)
    registry.register(collector)  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry, collector


def start_metrics_server(switch: Any, address: str = DEFAULT_ADDRESS,
                         port: int = DEFAULT_PORT) -> MetricsServer:
    """Serve ``switch``'s metrics at ``http://address:port/metrics`` from a daemon thread.

    ``address`` is an IP literal (``::`` listens on IPv6 and IPv4).  ``port=0`` picks a
    free port (read it back from ``.port``).  Uses its own registry.  Raises
    :class:`MetricsError` if the address cannot be bound.  Close the returned handle
    before closing the switch.
    """
    from prometheus_client import make_wsgi_app

    registry, collector = make_registry(switch)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server_class = type("_Server", (_HTTPServer,), {"address_family": family})
    try:
        httpd = cast(_HTTPServer, make_server(address, port, make_wsgi_app(registry),
                                              server_class, _QuietHandler))
    except OSError as exc:
        raise MetricsError(exc.errno, f"cannot serve metrics on {address} port {port}: "
                           f"{exc.strerror or exc}") from exc
    server = MetricsServer(httpd, registry, collector)
    log.info("metrics: serving %s", server.url)
    return server
