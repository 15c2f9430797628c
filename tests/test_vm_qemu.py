"""QEMU guests (virtio-net over vhost-user) attached to pyswitch: the OVS-DPDK topology.

Real front ends: QEMU's vhost-user net device and the guest kernel's virtio-net driver
(tests/peers/qemu.py boots the distribution kernel with a busybox initramfs, TCG).
VM to VM in both socket roles, VM to host through a TAP port, a switch restart under
running VMs (client mode), flow rules on VM traffic, and examples/ovs-dpdk-vms.yaml.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.peers.qemu import ping_pair, start_guest
from tests.switch_proc import SwitchProcess

pytestmark = pytest.mark.timeout(240)

MACS = ("02:50:53:00:00:01", "02:50:53:00:00:02")


def vhost_port(name: str, kind: str, path: Path) -> str:
    if kind == "dpdkvhostuser":
        opts = f"{{vhost-sock-dir: {path}}}"
    else:
        opts = f"{{vhost-server-path: {path / (name + '.sock')}}}"
    return f"      {name}: {{type: {kind}, options: {opts}}}\n"


def sock_of(name: str, kind: str, path: Path) -> Path:
    return path / name if kind == "dpdkvhostuser" else path / f"{name}.sock"


@pytest.mark.parametrize("kind,role", [("dpdkvhostuser", "client"), ("dpdkvhostuserclient", "server")])
def test_two_vms_ping_each_other_through_pyswitch(pyswitch_up, tmp_path, kind, role):
    socks = tmp_path / "s"
    socks.mkdir()
    sw = pyswitch_up("bridges:\n  br0:\n    ports:\n" + vhost_port("vhu1", kind, socks)
                     + vhost_port("vhu2", kind, socks))
    with ping_pair(tmp_path / "vm", (sock_of("vhu1", kind, socks), sock_of("vhu2", kind, socks)),
                   role=role) as (g0, g1):
        r0, r1 = g0.ping_result(), g1.ping_result()
        assert r0.ok and r1.ok, (r0, r1, g0.console_text()[-2000:])
        stats = json.loads(sw.cli("port-stats", "--json").stdout)
        fdb = json.loads(sw.cli("fdb-show", "br0", "--json").stdout)
    assert stats["vhu1"]["rx_packets"] >= 6 and stats["vhu2"]["rx_packets"] >= 6
    assert stats["vhu1"]["tx_packets"] >= 6 and stats["vhu2"]["tx_packets"] >= 6
    assert {e["mac"] for e in fdb} >= set(MACS)
    assert {e["port_name"] for e in fdb if e["mac"] in MACS} == {"vhu1", "vhu2"}


def test_vm_pings_the_host_through_a_tap_port(pyswitch_up, tmp_path, prefix):
    socks = tmp_path / "s"
    socks.mkdir()
    subnet = f"10.251.{secrets.randbelow(250)}"
    pyswitch_up("bridges:\n  br0:\n    ports:\n" + vhost_port("vhu1", "dpdkvhostuser", socks)
                + f"      {prefix}t: {{type: tap, options: {{address: {subnet}.254/24}}}}\n")
    with start_guest("pst-vh", socks / "vhu1", MACS[0], f"{subnet}.1/24", f"{subnet}.254",
                     workdir=tmp_path / "vm", count=5, linger=6) as g:
        r = g.ping_result()
        assert r.ok, (r, g.console_text()[-2000:])
        host = subprocess.run(["ping", "-c", "3", "-i", "0.3", "-W", "2", f"{subnet}.1"],
                              capture_output=True, text=True, timeout=30)
        assert host.returncode == 0, host.stdout  # and the host reaches the VM


PINGER = """i=0
while [ $i -lt {n} ]; do
  if ping -c 1 -W 1 {peer} >/dev/null 2>&1; then echo "PYSWITCH-REPLY $i"; else echo "PYSWITCH-LOST $i"; fi
  i=$((i+1)); sleep 0.3
done
"""


def _pinging_guests(tmp_path: Path, socks: tuple[Path, Path], role: str, n: int = 400):
    """Two guests: the first pings the second in a loop printing REPLY/LOST lines."""
    g0 = start_guest("pst-p0", socks[0], MACS[0], "10.252.0.1/24", "10.252.0.2", workdir=tmp_path,
                     role=role, action="cmd", script=PINGER.format(n=n, peer="10.252.0.2"), timeout=200)
    g1 = start_guest("pst-p1", socks[1], MACS[1], "10.252.0.2/24", "10.252.0.1", workdir=tmp_path,
                     role=role, action="serve", seconds=190, timeout=200)
    return g0, g1


def test_switch_restart_under_running_vms_client_mode(tmp_path):
    """dpdkvhostuserclient: QEMU listens, pyswitch connects.  Kill the switch (SIGKILL and
    SIGTERM), start it again: traffic between the running VMs resumes by itself."""
    socks = tmp_path / "s"
    socks.mkdir()
    topo = ("bridges:\n  br0:\n    ports:\n" + vhost_port("vhu1", "dpdkvhostuserclient", socks)
            + vhost_port("vhu2", "dpdkvhostuserclient", socks))
    g0, g1 = _pinging_guests(tmp_path / "vm", (socks / "vhu1.sock", socks / "vhu2.sock"), "server")
    with g0, g1:
        (tmp_path / "a").mkdir()
        sw = SwitchProcess(tmp_path / "a").start(topo)
        try:
            g0.wait_for("PYSWITCH-REPLY", timeout=90)
            for sig in (signal.SIGKILL, signal.SIGTERM):
                sw.proc.send_signal(sig)
                sw.proc.wait(20)
                down = time.monotonic()
                time.sleep(2)
                g0.wait_for("PYSWITCH-LOST", timeout=20, after=down)  # really down meanwhile
                up_at = time.monotonic()
                workdir = tmp_path / f"restart-{sig}"
                workdir.mkdir()
                sw = SwitchProcess(workdir).start(topo)
                g0.wait_for("PYSWITCH-REPLY", timeout=30, after=up_at)
                resumed = time.monotonic() - up_at
                print(f"traffic resumed {resumed:.1f}s after the restart ({signal.Signals(sig).name})")
                assert json.loads(sw.cli("port-stats", "--json").stdout)["vhu1"]["rx_packets"] > 0
        finally:
            if sw.proc.poll() is None:
                sw.proc.kill()
                sw.proc.wait()


def test_flow_rules_apply_to_vm_traffic(pyswitch_up, tmp_path):
    socks = tmp_path / "s"
    socks.mkdir()
    sw = pyswitch_up("bridges:\n  br0:\n    ports:\n" + vhost_port("vhu1", "dpdkvhostuser", socks)
                     + vhost_port("vhu2", "dpdkvhostuser", socks))
    g0, g1 = _pinging_guests(tmp_path / "vm", (socks / "vhu1", socks / "vhu2"), "client")
    with g0, g1:
        g0.wait_for("PYSWITCH-REPLY", timeout=90)
        sw.cli("add-flow", "br0", "priority=100,icmp,in_port=vhu1 actions=drop")
        t = time.monotonic()
        g0.wait_for("PYSWITCH-LOST", timeout=20, after=t)
        stats = json.loads(sw.cli("port-stats", "--json").stdout)
        assert stats["vhu1"]["drops"]["flow"] >= 1
        sw.cli("del-flows", "br0", "--strict", "priority=100,icmp,in_port=vhu1")
        g0.wait_for("PYSWITCH-REPLY", timeout=20, after=time.monotonic())


def test_ovs_dpdk_example_topology(tmp_path, prefix):
    """examples/ovs-dpdk-vms.yaml, with its paths moved under the test's directory."""
    text = (Path(__file__).resolve().parent.parent / "examples" / "ovs-dpdk-vms.yaml").read_text()
    socks = tmp_path / "s"
    socks.mkdir()
    text = text.replace("type: dpdkvhostuser\n", f"type: dpdkvhostuser\n        options: {{vhost-sock-dir: {socks}}}\n")
    text = text.replace("/run/vm2/vhu2.sock", str(socks / "vhu2.sock")).replace("ex-host", f"{prefix}h")
    sw = SwitchProcess(tmp_path).start(text)
    try:
        g0 = start_guest("pst-e0", socks / "vhu1", MACS[0], "10.80.0.1/24", "10.80.0.2", workdir=tmp_path / "vm",
                         role="client", count=3, linger=8)
        g1 = start_guest("pst-e1", socks / "vhu2.sock", MACS[1], "10.80.0.2/24", "10.80.0.254",
                         workdir=tmp_path / "vm", role="server", count=3, linger=8)
        with g0, g1:
            assert g0.ping_result().ok  # VM to VM
            assert g1.ping_result().ok  # VM to the host's TAP address
    finally:
        sw.stop()
