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
    tmp_path.mkdir(parents=True, exist_ok=True)
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


TOPO = "bridges:\n  br0:\n    ports:\n      m1: {type: memory}\nmetrics: {address: 127.0.0.1, port: %d}\n"


def start_on_a_free_port(tmp_path) -> tuple[subprocess.Popen, dict, object, int]:
    """A port found free may be taken before pyswitch binds it: then try another."""
    for attempt in range(5):
        port = free_port()
        try:
            return (*start(tmp_path / str(attempt), TOPO % port), port)
        except AssertionError as exc:
            if "Address already in use" not in str(exc):
                raise
    raise AssertionError("no free port for /metrics in 5 tries")


def apply_on_a_free_port(tmp_path, env) -> tuple[subprocess.CompletedProcess, int]:
    for _ in range(5):
        port = free_port()
        (tmp_path / "t2.yaml").write_text(TOPO % port)
        r = subprocess.run([sys.executable, "-m", "pyswitch", "apply", str(tmp_path / "t2.yaml")], env=env,
                           capture_output=True, text=True, cwd=ROOT, timeout=30)
        if "Address already in use" not in r.stderr:
            return r, port
    raise AssertionError("no free port for /metrics in 5 tries")


def test_yaml_metrics_block_is_served_and_moved_by_apply(tmp_path):
    proc, env, log, p1 = start_on_a_free_port(tmp_path)
    try:
        assert 'pyswitch_port_rx_packets_total{bridge="br0",port="m1",type="memory"} 0.0' in scrape(p1)
        r, p2 = apply_on_a_free_port(tmp_path, env)
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
