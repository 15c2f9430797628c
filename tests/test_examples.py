"""Each example topology in examples/ is run for real (the VM example: see the vhost-user tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.switch_proc import SwitchProcess, leftovers
from tests.test_e2e_namespaces import ping

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def example(tmp_path):
    started: list[SwitchProcess] = []

    def start(name: str) -> SwitchProcess:
        if leftovers("ex-"):
            pytest.fail(f"example names already in use on this machine: {leftovers('ex-')}")
        sp = SwitchProcess(tmp_path)
        started.append(sp)
        return sp.start((EXAMPLES / name).read_text())

    yield start
    for sp in started:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait()
    for name in leftovers("ex-"):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_namespaces_example(example):
    sw = example("namespaces.yaml")
    assert ping("ex-a", "10.78.0.2")
    r = subprocess.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.78.0.1"], capture_output=True, timeout=20)
    assert r.returncode == 0
    sw.stop()
    assert not leftovers("ex-")


def test_vlans_example(example):
    sw = example("vlans.yaml")
    assert ping("ex-v10a", "10.79.0.2")
    assert not ping("ex-v10a", "10.79.0.3", count=2)
    sw.stop()
    assert not leftovers("ex-")


def test_systemd_unit_verifies_and_its_command_runs(tmp_path):
    """examples/pyswitch.service: systemd accepts it, and its ExecStart runs the daemon."""
    import shlex
    import sys
    import time

    text = (EXAMPLES / "pyswitch.service").read_text()
    exe = str(Path(sys.executable).with_name("pyswitch"))
    unit = tmp_path / "pyswitch.service"
    unit.write_text(text.replace("/opt/pyswitch/.venv/bin/pyswitch", exe))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    exec_start = [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("ExecStart=")][0]
    argv = shlex.split(exec_start)
    argv[0] = exe
    argv[argv.index("--db") + 1] = str(tmp_path / "conf.yaml")
    env = {**__import__("os").environ, "PYSWITCH_RUNDIR": str(tmp_path / "run")}
    log = tmp_path / "log"
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "running:" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        subprocess.run([exe, "add-br", "br0"], env=env, check=True, timeout=30)
        assert (tmp_path / "conf.yaml").exists()
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0


def test_flow_steering_example(example):
    """Web traffic from the client is copied to the monitor; DNS is dropped and counted."""
    import json
    import sys

    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    sw = example("flow-steering.yaml")
    assert ping("ex-client", "10.81.0.2")  # the default rule: a learning switch

    def sniff(ns: str) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.nsprobe", "sniff", "eth0",
                              "2", "--ethertype", "0x0800"], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        return p

    monitor, server = sniff("ex-monitor"), sniff("ex-server")
    script = "exec 3<>/dev/tcp/10.81.0.2/80; exec 3<>/dev/udp/10.81.0.2/53; echo q >&3"
    subprocess.run(["ip", "netns", "exec", "ex-client", "bash", "-c", script], capture_output=True, timeout=20)
    seen_m = [Ether(bytes.fromhex(h)) for h in monitor.communicate(timeout=20)[0].split()]
    seen_s = [Ether(bytes.fromhex(h)) for h in server.communicate(timeout=20)[0].split()]
    assert any(TCP in f and f[TCP].dport == 80 and f[IP].src == "10.81.0.1" for f in seen_m)
    assert any(TCP in f and f[TCP].dport == 80 for f in seen_s)  # the server got it too
    assert not any(UDP in f and f[UDP].dport == 53 for f in seen_s + seen_m)
    stats = json.loads(sw.cli("port-stats", "--json").stdout)
    assert stats["ex-client"]["drops"]["flow"] >= 1
