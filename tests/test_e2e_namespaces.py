"""pyswitch up with real kernel peers: namespaces on veth ports, the host on a TAP port.

The behavioural spec of a learning bridge (in the spirit of the kernel's
bridge_vlan_unaware.sh selftest): ping and iperf3 through the switch, VLAN isolation and
trunks, learning seen from a third host, aging, the MAC table size limit, flooding.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest
from scapy.layers.l2 import Dot1Q, Ether

from tests.switch_proc import leftovers, ns_exec, ns_python

ETYPE = 0x88B5  # IEEE 802 local experimental: no kernel stack reacts to it


def host(p: str, name: str, n: int, subnet: str, extra: str = "") -> str:
    """A veth port whose peer is eth0 in namespace ``<p><name>`` at ``<subnet>.<n>``."""
    return (f"      {p}{name}:\n        type: veth\n{extra}        options:\n"
            f"          netns: {p}{name}\n          peer-mac: \"02:00:00:00:{int(p[-4:-2], 16):02x}:{n:02x}\"\n"
            f"          peer-address: {subnet}.{n}/24\n")


def mac_of(p: str, n: int) -> str:
    return f"02:00:00:00:{int(p[-4:-2], 16):02x}:{n:02x}"


def ping(ns: str, addr: str, count: int = 3) -> bool:
    r = ns_exec(ns, "ping", "-c", str(count), "-i", "0.2", "-W", "1", addr, check=False, timeout=20)
    return r.returncode == 0


class Sniffer:
    """Capture frames of our test ethertype on eth0 inside a namespace."""

    def __init__(self, ns: str, seconds: float = 3.0, iface: str = "eth0") -> None:
        self.proc = subprocess.Popen(ns_python(ns, ["sniff", iface, str(seconds), "--ethertype", hex(ETYPE)]),
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def frames(self) -> list[Ether]:
        out, _ = self.proc.communicate(timeout=30)
        return [Ether(bytes.fromhex(line)) for line in out.split()]


def send(ns: str, *frames: Ether) -> None:
    subprocess.run(ns_python(ns, ["send", "eth0", *(bytes(f).hex() for f in frames)]), check=True, timeout=30)


def test_ping_and_iperf3_between_namespaces(pyswitch_up, prefix):
    p = prefix
    sw = pyswitch_up("bridges:\n  br0:\n    ports:\n" + host(p, "a", 1, "10.91.0") + host(p, "b", 2, "10.91.0"))
    assert ping(f"{p}a", "10.91.0.2")
    server = subprocess.Popen(["ip", "netns", "exec", f"{p}b", "iperf3", "-s", "-1", "-B", "10.91.0.2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = ns_exec(f"{p}a", "iperf3", "-c", "10.91.0.2", "-t", "2", "-J", timeout=60)
        result = json.loads(r.stdout)
        received = result["end"]["sum_received"]["bytes"]
        assert received > 1_000_000, f"iperf3 moved only {received} bytes"
    finally:
        server.kill()
        server.wait()
    log = sw.stop()
    assert f"port {p}a: rx_packets=" in log
    assert not leftovers(p), "pyswitch left links or namespaces behind"


def test_host_reaches_namespace_through_tap(pyswitch_up, prefix):
    p = prefix
    subnet = f"10.92.{secrets.randbelow(250)}"
    topo = ("bridges:\n  br0:\n    ports:\n" + host(p, "a", 1, subnet)
            + f"      {p}t:\n        type: tap\n        options: {{address: {subnet}.254/24}}\n")
    sw = pyswitch_up(topo)
    r = subprocess.run(["ping", "-c", "3", "-i", "0.2", "-W", "1", f"{subnet}.1"], capture_output=True, timeout=20)
    assert r.returncode == 0, r.stdout
    assert ping(f"{p}a", f"{subnet}.254")  # and back: namespace to the host's stack
    sw.stop()
    assert not leftovers(p)


def test_vlan_isolation_and_trunk(pyswitch_up, prefix):
    p = prefix
    topo = ("bridges:\n  br0:\n    ports:\n"
            + host(p, "a", 1, "10.93.10", "        tag: 10\n")
            + host(p, "b", 2, "10.93.10", "        tag: 10\n")
            + host(p, "c", 3, "10.93.10", "        tag: 20\n")  # same subnet, other VLAN
            + f"      {p}t:\n        type: veth\n        trunks: [10, 20]\n"
              f"        options: {{netns: {p}t}}\n")
    pyswitch_up(topo)
    assert ping(f"{p}a", "10.93.10.2")
    assert not ping(f"{p}a", "10.93.10.3", count=2), "VLAN 20 host reachable from VLAN 10"
    # The trunk carries both VLANs.  (The kernels these tests run on may lack 802.1Q
    # interfaces, so the trunk host speaks raw tagged frames.)  Frames from the access
    # ports leave the trunk tagged with their VLAN ...
    trunk_cap = Sniffer(f"{p}t")
    send(f"{p}a", Ether(dst="ff:ff:ff:ff:ff:ff", src=mac_of(p, 1), type=ETYPE) / (b"A" * 50))
    send(f"{p}c", Ether(dst="ff:ff:ff:ff:ff:ff", src=mac_of(p, 3), type=ETYPE) / (b"C" * 50))
    tags = {f.src: f[Dot1Q].vlan for f in trunk_cap.frames() if f.haslayer(Dot1Q)}
    assert tags == {mac_of(p, 1): 10, mac_of(p, 3): 20}
    # ... and tagged frames from the trunk leave the access ports of their VLAN untagged;
    # a VLAN the trunk does not carry (30) reaches nobody.
    caps = {n: Sniffer(f"{p}{n}") for n in ("a", "b", "c")}
    trunk_mac = "02:00:00:00:00:99"
    send(f"{p}t", *(Ether(dst="ff:ff:ff:ff:ff:ff", src=trunk_mac) / Dot1Q(vlan=vid, type=ETYPE)
                    / (bytes([vid]) * 50) for vid in (10, 20, 30)))
    seen = {n: [(f.haslayer(Dot1Q), bytes(f.payload)[0]) for f in c.frames() if f.src == trunk_mac]
            for n, c in caps.items()}
    assert seen == {"a": [(False, 10)], "b": [(False, 10)], "c": [(False, 20)]}


def _three_hosts(p: str, bridge_extra: str = "") -> str:
    return ("bridges:\n  br0:\n" + bridge_extra + "    ports:\n" + host(p, "a", 1, "10.94.0")
            + host(p, "b", 2, "10.94.0") + host(p, "c", 3, "10.94.0"))


def _unicast(p: str, src: int, dst: int, tag: bytes = b"U") -> Ether:
    return Ether(dst=mac_of(p, dst), src=mac_of(p, src), type=ETYPE) / (tag * 50)


def test_learning_unicast_reaches_only_its_port_and_broadcast_floods(pyswitch_up, prefix):
    p = prefix
    pyswitch_up(_three_hosts(p))
    send(f"{p}b", Ether(dst="ff:ff:ff:ff:ff:ff", src=mac_of(p, 2), type=ETYPE) / (b"B" * 50))  # b is learned
    cap_b, cap_c = Sniffer(f"{p}b"), Sniffer(f"{p}c")
    send(f"{p}a", _unicast(p, 1, 2), Ether(dst="ff:ff:ff:ff:ff:ff", src=mac_of(p, 1), type=ETYPE) / (b"F" * 50))
    seen_b = [bytes(f.payload)[:1] for f in cap_b.frames() if f.src == mac_of(p, 1)]
    seen_c = [bytes(f.payload)[:1] for f in cap_c.frames() if f.src == mac_of(p, 1)]
    assert seen_b == [b"U", b"F"]
    assert seen_c == [b"F"], "the third host saw a unicast frame for a learned MAC"


def test_unknown_unicast_floods(pyswitch_up, prefix):
    p = prefix
    pyswitch_up(_three_hosts(p))
    cap_c = Sniffer(f"{p}c")
    send(f"{p}a", Ether(dst="02:ee:ee:ee:ee:ee", src=mac_of(p, 1), type=ETYPE) / (b"X" * 50))
    assert [f.dst for f in cap_c.frames() if f.src == mac_of(p, 1)] == ["02:ee:ee:ee:ee:ee"]


def test_aging_forgets_a_quiet_mac(pyswitch_up, prefix):
    p = prefix
    pyswitch_up(_three_hosts(p, "    mac_aging_time: 2\n"))
    for ns in ("a", "b", "c"):  # keep the hosts quiet: no IPv6 chatter relearning b
        ns_exec(f"{p}{ns}", "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    send(f"{p}b", Ether(dst="ff:ff:ff:ff:ff:ff", src=mac_of(p, 2), type=ETYPE) / (b"B" * 50))
    cap = Sniffer(f"{p}c", seconds=1.5)
    send(f"{p}a", _unicast(p, 1, 2, b"1"))
    assert not [f for f in cap.frames() if f.src == mac_of(p, 1)], "learned MAC flooded"
    time.sleep(3.5)  # > aging time + sweep interval, b silent
    cap = Sniffer(f"{p}c", seconds=1.5)
    send(f"{p}a", _unicast(p, 1, 2, b"2"))
    assert [bytes(f.payload)[:1] for f in cap.frames() if f.src == mac_of(p, 1)] == [b"2"], \
        "after aging, the frame for the forgotten MAC should flood to the third host"


def test_table_size_limit_evicts_oldest(pyswitch_up, prefix):
    p = prefix
    pyswitch_up(_three_hosts(p, "    mac_table_size: 3\n"))
    for ns in ("a", "b", "c"):
        ns_exec(f"{p}{ns}", "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    send(f"{p}b", Ether(dst="ff:ff:ff:ff:ff:ff", src=mac_of(p, 2), type=ETYPE) / (b"B" * 50))
    # c sends from three other source MACs: the table holds 3, so b's entry (oldest) goes.
    send(f"{p}c", *(Ether(dst="ff:ff:ff:ff:ff:ff", src=f"02:00:00:00:cc:{i:02x}", type=ETYPE) / (b"S" * 50)
                    for i in range(3)))
    time.sleep(0.3)
    cap = Sniffer(f"{p}c", seconds=1.5)
    send(f"{p}a", _unicast(p, 1, 2, b"E"))
    assert [bytes(f.payload)[:1] for f in cap.frames() if f.src == mac_of(p, 1)] == [b"E"]


def test_invalid_topology_creates_nothing(tmp_path, prefix):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"bridges:\n  br0:\n    ports:\n      {prefix}a:\n        type: veth\n"
                   f"        options: {{netns: {prefix}a}}\n      {prefix}b:\n        type: veth\n        tag: 9999\n")
    r = subprocess.run([sys.executable, "-m", "pyswitch", "up", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == f"pyswitch: {bad}:9: bridges.br0.ports.{prefix}b.tag: 9999 is out of range (1..4095)"
    assert not leftovers(prefix)


@pytest.mark.timeout(60)
def test_default_topology_runs_and_is_reachable(tmp_path):
    """The README's main job: `pyswitch up` with no file."""
    if leftovers("psw-"):
        pytest.fail(f"default topology names already in use: {leftovers('psw-')}")
    log = tmp_path / "up.log"
    with open(log, "w") as f:
        env = {**os.environ, "PYSWITCH_RUNDIR": str(tmp_path / "run")}
        proc = subprocess.Popen([sys.executable, "-m", "pyswitch", "up"], stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while "running:" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert "Try: ip netns exec psw-h1 ping 10.77.0.2" in log.read_text()
        assert ping("psw-h1", "10.77.0.2")
        r = subprocess.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.77.0.1"], capture_output=True, timeout=20)
        assert r.returncode == 0
        # /metrics is on by default, on loopback port 9477, and agrees with port-stats
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        def scrape() -> float:
            body = urllib.request.urlopen("http://127.0.0.1:9477/metrics", timeout=10).read().decode()
            return [s.value for fam in text_string_to_metric_families(body) for s in fam.samples
                    if s.name == "pyswitch_port_rx_packets_total" and s.labels["port"] == "psw-h1"][0]

        before = scrape()  # the hosts may send IPv6 chatter meanwhile: port-stats lies between
        stats = json.loads(subprocess.run([sys.executable, "-m", "pyswitch", "port-stats", "--json"], env=env,
                                          capture_output=True, text=True, check=True, timeout=30).stdout)
        after = scrape()
        assert 3 <= before <= stats["psw-h1"]["rx_packets"] <= after, (before, stats["psw-h1"], after)
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0
    assert not leftovers("psw-")
