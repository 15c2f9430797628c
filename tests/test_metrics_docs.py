"""docs/metrics.md, examples/prometheus.yml and the Grafana dashboard match what is served.

A switch with every kind of metric (a vhost-user port, a memory port, a bridge with
flow rules) is scraped over HTTP; every ``pyswitch_*`` name served
must be documented, every documented one served, and every one the dashboard queries
must exist.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pyswitch.metrics import DEFAULT_ADDRESS, DEFAULT_PORT, start_metrics_server
from pyswitch.switch import Switch
from pyswitch.topology import load_topology_text
from tests.test_metrics import scrape

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\bpyswitch_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_count", "_sum")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[set[str]]:
    """Sample names of one scrape of a switch that has every kind of metric (the bridge
    has a flow table and flow-cache counters of its own)."""
    topo = ("bridges:\n  br0:\n    ports:\n"
            f"      pstvh0: {{type: dpdkvhostuser, options: {{vhost-sock-dir: '{tmp_path}'}}}}\n"
            "      m1: {type: memory}\n")
    sw = Switch()
    try:
        sw.build(load_topology_text(topo, "all.yaml"))
        sw.bridges["br0"].set_flows(["cookie=0x1,actions=normal"], 0.0)
        srv = start_metrics_server(sw, port=0)
        try:
            yield {name for name, _ in scrape(srv.url)}
        finally:
            srv.close()
    finally:
        sw.close()
        sw.loop.close()


def base(name: str) -> str:
    """A sample name without the histogram suffixes."""
    for suffix in SUFFIXES:
        if name.startswith("pyswitch_rx_batch_frames") and name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_served_and_documented_metrics_are_the_same(served: set[str]) -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = {base(n) for n in NAME.findall(doc)} - {"pyswitch_vhost_"}
    mine = {base(n) for n in served if n.startswith("pyswitch_")}
    assert len(mine) >= 40, sorted(mine)
    assert mine - documented == set(), "served but not in docs/metrics.md"
    assert documented - mine == set(), "in docs/metrics.md but not served"
    assert f"http://{DEFAULT_ADDRESS}:{DEFAULT_PORT}/metrics" in doc


def test_dashboard_queries_only_served_metrics(served: set[str]) -> None:
    dash = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 15
    used = {n for e in exprs for n in NAME.findall(e)}
    assert used - served == set(), "the dashboard queries metrics that are not served"
    assert {"pyswitch_port_rx_packets_total", "pyswitch_port_tx_bytes_total",
            "pyswitch_port_dropped_total"} <= used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:  # every panel fits the 24-column grid
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24


def test_prometheus_example_scrapes_the_default_endpoint() -> None:
    cfg = yaml.safe_load((ROOT / "examples" / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "pyswitch"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"{DEFAULT_ADDRESS}:{DEFAULT_PORT}"]
