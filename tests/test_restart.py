"""Restarts: kill -9 of the daemon under traffic, and crashes while saving the configuration.

* A crash at any step of ``ConfigStore.save`` leaves the old or the new file, whole
  (fault injection: a child process that ``os._exit``s at the step).
* kill -9 in a loop while a client hammers changes: the database always parses and holds
  a committed state (the last acknowledged one, or the one in flight).
* kill -9 under traffic from real front ends in client mode (``dpdkvhostuserclient``:
  testpmd with ``server=1``, QEMU guests with ``server=on``): on restart every port comes
  back, frames are forwarded again within 2 s of the restart command (the issue's
  requirement, measured to the first forwarded frame in the switch's own counters), and
  the database file is byte for byte the one before the kill.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from pyswitch.config import parse_config
from pyswitch.control import ControlError, call
from pyswitch.db import ConfigStore
from tests.peers.testpmd import Testpmd
from tests.switch_proc import ROOT
from tests.test_vhost_testpmd import vdev
from tests.test_vm_qemu import _pinging_guests

pytestmark = pytest.mark.timeout(240)

RESUME_LIMIT = 2.0  # seconds from the restart command to the first forwarded frame

_CRASH = """
import os, sys
from pyswitch.config import parse_config
from pyswitch.db import ConfigStore

store, point = ConfigStore(sys.argv[1]), sys.argv[2]
new = parse_config({"bridges": {"br0": {"ports": {f"m{i}": {"type": "memory"} for i in range(200)}}}})
real_fdopen, real_replace, real_fsync = os.fdopen, os.replace, os.fsync
fsyncs = []

class HalfWriter:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *a): return False
    def write(self, data):
        self.f.write(data[: len(data) // 2]); self.f.flush(); os._exit(9)

def fsync(fd):
    fsyncs.append(fd)
    if point == "before-dir-fsync" and len(fsyncs) == 2:  # the file's was first: renamed now
        os._exit(9)
    real_fsync(fd)

if point == "mid-write":
    os.fdopen = lambda fd, mode: HalfWriter(real_fdopen(fd, mode))
elif point == "before-rename":
    os.replace = lambda a, b: os._exit(9)
os.fsync = fsync
store.save(new)
"""


@pytest.mark.parametrize("point,survivor", [("mid-write", "old"), ("before-rename", "old"),
                                            ("before-dir-fsync", "new")])
def test_a_crash_while_saving_leaves_the_old_or_the_new_file_whole(tmp_path, point, survivor):
    store = ConfigStore(tmp_path / "conf.yaml")
    store.save(parse_config({"bridges": {"br0": {"ports": {"old": {"type": "memory"}}}}}))
    old = store.path.read_bytes()
    r = subprocess.run([sys.executable, "-c", _CRASH, str(store.path), point], check=False, cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 9, r.stderr  # it died at the injection point
    loaded = store.load()  # parses: never half a file
    names = set(loaded.bridges["br0"].ports)
    if survivor == "old":
        assert store.path.read_bytes() == old and names == {"old"}
        assert list(tmp_path.glob(".conf.yaml.*")), "the interrupted temporary file"
    else:
        assert len(names) == 200
    store.save(loaded)  # the next save removes what the crash left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf.yaml"]


def test_kill_9_while_a_client_hammers_changes_never_leaves_a_bad_database(daemon):
    d = daemon.start()
    ctl = d.rundir / "pyswitch.ctl"
    call("add-br", {"bridge": "br0"}, path=ctl)
    acked = 0
    rng = random.Random(8)
    for round_ in range(5):
        stop = threading.Event()

        def hammer(stop: threading.Event = stop) -> None:
            nonlocal acked
            while not stop.is_set():
                try:
                    call("add-port", {"bridge": "br0", "port": f"m{acked}", "settings": {"type": "memory"}},
                         path=ctl, timeout=5)
                except (ControlError, OSError):
                    return  # the daemon is gone
                acked += 1

        client = threading.Thread(target=hammer)
        client.start()
        time.sleep(rng.uniform(0.3, 1.0))
        d.stop(signal.SIGKILL)
        stop.set()
        client.join(10)
        saved = ConfigStore(d.db).load()  # raises if the file is not whole and valid
        names = set(saved.bridges["br0"].ports)
        assert names in ({f"m{i}" for i in range(acked)}, {f"m{i}" for i in range(acked + 1)}), \
            (round_, acked, sorted(names))
        acked = len(names)  # the one in flight may have been saved without its reply
        d.start()
    assert acked > 10, f"only {acked} changes went through"
    call("add-port", {"bridge": "br0", "port": f"m{acked}", "settings": {"type": "memory"}}, path=ctl)
    acked += 1
    assert not list(d.db.parent.glob(".conf.yaml.*")), "a save leaves no temporary file behind"
    assert set(yaml.safe_load(d.db.read_text())["bridges"]["br0"]["ports"]) == {f"m{i}" for i in range(acked)}


def _first_forwarded(ctl, port: str, t0: float, timeout: float = 20) -> float:
    """Seconds from ``t0`` until ``port`` has transmitted a frame (the switch's counter)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if call("port-stats", {"port": port}, path=ctl, timeout=5)[port]["tx_packets"] > 0:
                return time.monotonic() - t0
        except ControlError:
            pass  # not up yet
        time.sleep(0.01)
    raise AssertionError(f"{port} forwarded nothing within {timeout}s of the restart")


def test_kill_9_under_testpmd_client_mode_traffic(daemon, prefix, tmp_path):
    """testpmd (virtio-user, server=1) keeps sending while the daemon is killed; the
    restarted daemon reconnects.  virtio-user does not know the rings' indexes after a
    back-end crash: it sends SET_VRING_BASE 0 with avail far ahead, and a back end must
    then take the used index as the base (as DPDK's vhost library does at SET_VRING_ADDR)."""
    d = daemon.start()
    ctl = d.rundir / "pyswitch.ctl"
    sock = tmp_path / "pmd.sock"
    d.cli("add-br", "br0")
    d.cli("add-port", "br0", "vhu1", "--type", "dpdkvhostuserclient", "-o", f"vhost-server-path={sock}")
    d.cli("add-port", "br0", f"{prefix}v", "--type", "veth", "-o", f"netns={prefix}v")
    # testpmd (server=1) waits for the switch's connection before its first prompt
    with Testpmd([vdev(str(sock), server=True)], forward_mode="txonly", cleanup_paths=(sock,)) as pmd:
        pmd.command("start")
        _first_forwarded(ctl, f"{prefix}v", time.monotonic())  # testpmd's frames flood to the veth
        db = d.db.read_bytes()
        export = d.cli("export").stdout
        for _ in range(2):
            d.stop(signal.SIGKILL)
            t0 = time.monotonic()
            d.start()
            assert d.db.read_bytes() == db
            took = _first_forwarded(ctl, f"{prefix}v", t0)
            print(f"testpmd client mode: first frame forwarded {took:.2f}s after the restart command")
            assert took < RESUME_LIMIT, f"traffic resumed {took:.2f}s after the restart"
            assert d.db.read_bytes() == db and d.cli("export").stdout == export
            ports = {p["name"]: p for p in call("show", {}, path=ctl)["bridges"][0]["ports"]}
            assert {n: p["link_state"] for n, p in ports.items()} == {"vhu1": "up", f"{prefix}v": "up"}
        pmd.command("stop")


def test_kill_9_under_running_vms_client_mode(daemon, tmp_path):
    """QEMU listens (server=on), the daemon connects; the guests ping each other every
    0.3 s throughout.  After kill -9, frames between them flow again within 2 s."""
    socks = tmp_path / "s"
    socks.mkdir()
    paths = (socks / "vhu1.sock", socks / "vhu2.sock")
    d = daemon.start()
    ctl = d.rundir / "pyswitch.ctl"
    g0, g1 = _pinging_guests(tmp_path / "vm", paths, "server")
    with g0, g1:
        d.cli("add-br", "br0")
        for n, path in enumerate(paths, 1):
            d.cli("add-port", "br0", f"vhu{n}", "--type", "dpdkvhostuserclient", "-o", f"vhost-server-path={path}")
        g0.wait_for("PYSWITCH-REPLY", timeout=120)
        db = d.db.read_bytes()
        d.stop(signal.SIGKILL)
        down = time.monotonic()
        g0.wait_for("PYSWITCH-LOST", timeout=20, after=down)  # really down meanwhile
        t0 = time.monotonic()
        d.start()
        took = _first_forwarded(ctl, "vhu2", t0)
        print(f"QEMU client mode: first frame forwarded {took:.2f}s after the restart command")
        assert took < RESUME_LIMIT, f"traffic resumed {took:.2f}s after the restart"
        g0.wait_for("PYSWITCH-REPLY", timeout=10, after=t0)  # and the pings are answered again
        assert d.db.read_bytes() == db
        ports = call("show", {}, path=ctl)["bridges"][0]["ports"]
        assert {p["name"]: p["link_state"] for p in ports} == {"vhu1": "up", "vhu2": "up"}
