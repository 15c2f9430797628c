"""The metrics endpoint as the YAML configures it, in a real `pyswitch up` process, and
moved live by `pyswitch apply`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.switch_proc import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, topo: str) -> tuple[subprocess.Popen, dict, object]:
    (tmp_path / "t.yaml").write_text(topo)
    env = {**os.environ, "PYSWITCH_RUNDIR": str(tmp_path / "run")}
    log = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-m", "pyswitch", "up", str(tmp_path / "t.yaml")], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 30
    while "running:" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc, env, log


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_yaml_metrics_block_is_served_and_moved_by_apply(tmp_path):
    p1, p2 = free_port(), free_port()
    topo = "bridges:\n  br0:\n    ports:\n      m1: {type: memory}\nmetrics: {address: 127.0.0.1, port: %d}\n"
    proc, env, log = start(tmp_path, topo % p1)
    try:
        assert 'pyswitch_port_rx_packets_total{bridge="br0",port="m1",type="memory"} 0.0' in scrape(p1)
        (tmp_path / "t2.yaml").write_text(topo % p2)
        r = subprocess.run([sys.executable, "-m", "pyswitch", "apply", str(tmp_path / "t2.yaml")], env=env,
                           capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert r.returncode == 0 and "set metrics" in r.stdout, (r.stdout, r.stderr)
        assert "pyswitch_port_rx_packets_total" in scrape(p2)
        try:
            scrape(p1)
            raise AssertionError("the old metrics port still answers")
        except (urllib.error.URLError, ConnectionError):
            pass
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0, log.read_text()


def test_metrics_false_serves_nothing(tmp_path):
    proc, _, log = start(tmp_path, "bridges: {}\nmetrics: false\n")
    try:
        assert "metrics: disabled" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(15)
