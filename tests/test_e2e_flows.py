"""Flow rules end to end: kernel hosts in namespaces, rules added live through the CLI."""

from __future__ import annotations

import json
import subprocess
import time

import yaml
from scapy.layers.l2 import Dot1Q, Ether

from tests.switch_proc import ns_exec
from tests.test_e2e_namespaces import ETYPE, Sniffer, _three_hosts, host, mac_of, ping, send


def test_drop_rule_stops_ping_and_is_counted(pyswitch_up, prefix):
    p = prefix
    sw = pyswitch_up(_three_hosts(p))
    assert ping(f"{p}a", "10.94.0.2")
    sw.cli("add-flow", "br0", f"priority=200,icmp,in_port={p}a actions=drop")
    assert not ping(f"{p}a", "10.94.0.2", count=2)
    stats = json.loads(sw.cli("port-stats", "--json").stdout)
    assert stats[f"{p}a"]["drops"]["flow"] >= 2
    lines = sw.cli("dump-flows", "br0").stdout.splitlines()
    rule = [ln for ln in lines if "priority=200" in ln][0]
    assert f"priority=200,icmp,in_port={p}a actions=drop" in rule and "n_packets=0" not in rule
    sw.cli("del-flows", "br0", "--strict", f"priority=200,icmp,in_port={p}a")
    assert ping(f"{p}a", "10.94.0.2")


def test_output_rule_steers_past_the_learning_table(pyswitch_up, prefix):
    p = prefix
    sw = pyswitch_up(_three_hosts(p))
    send(f"{p}b", Ether(dst="ff:ff:ff:ff:ff:ff", src=mac_of(p, 2), type=ETYPE) / (b"B" * 50))  # b learned
    sw.cli("add-flow", "br0", f"priority=100,in_port={p}a,dl_dst={mac_of(p, 2)} actions=output:{p}c")
    cap_b, cap_c = Sniffer(f"{p}b", 2), Sniffer(f"{p}c", 2)
    send(f"{p}a", Ether(dst=mac_of(p, 2), src=mac_of(p, 1), type=ETYPE) / (b"S" * 50))
    assert [f for f in cap_b.frames() if f.src == mac_of(p, 1)] == []
    assert len([f for f in cap_c.frames() if f.src == mac_of(p, 1)]) == 1


def test_vlan_push_and_pop_seen_on_the_wire(pyswitch_up, prefix):
    p = prefix
    topo = ("bridges:\n  br0:\n    ports:\n" + host(p, "a", 1, "10.97.0")
            + f"      {p}t:\n        type: veth\n        options: {{netns: {p}t}}\n"
            + "    flows:\n"
            + f"    - in_port={p}a actions=push_vlan:0x8100,mod_vlan_vid:42,output:{p}t\n"
            + f"    - in_port={p}t,dl_vlan=42 actions=strip_vlan,output:{p}a\n")
    pyswitch_up(topo)
    cap_t = Sniffer(f"{p}t", 2)
    send(f"{p}a", Ether(dst="ff:ff:ff:ff:ff:ff", src=mac_of(p, 1), type=ETYPE) / (b"P" * 50))
    got = [f for f in cap_t.frames() if f.src == mac_of(p, 1)]
    assert len(got) == 1 and got[0].haslayer(Dot1Q) and got[0][Dot1Q].vlan == 42
    cap_a = Sniffer(f"{p}a", 2)
    send(f"{p}t", *(Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:77") / Dot1Q(vlan=vid, type=ETYPE)
                    / (b"Q" * 50) for vid in (42, 43)))
    got = [f for f in cap_a.frames() if f.src == "02:00:00:00:00:77"]
    assert len(got) == 1 and not got[0].haslayer(Dot1Q)  # VLAN 43 matched no rule: dropped


def test_nat_like_rewrites_are_accepted_by_the_receiving_kernel(pyswitch_up, prefix):
    """a talks TCP to a virtual address .100 that the switch rewrites to b and back:
    the kernels accept the segments only if the IP and TCP checksums were fixed."""
    p = prefix
    b_mac = mac_of(p, 2)
    topo = ("bridges:\n  br0:\n    ports:\n" + host(p, "a", 1, "10.96.0") + host(p, "b", 2, "10.96.0")
            + "    flows:\n    - priority=0 actions=NORMAL\n"
            + f"    - priority=10,ip,in_port={p}a,nw_dst=10.96.0.100 "
              f"actions=mod_nw_dst:10.96.0.2,mod_dl_dst:{b_mac},output:{p}b\n"
            + f"    - priority=10,ip,in_port={p}b,nw_src=10.96.0.2,nw_dst=10.96.0.1 "
              f"actions=mod_nw_src:10.96.0.100,output:{p}a\n")
    sw = pyswitch_up(topo)
    ns_exec(f"{p}a", "ip", "neigh", "add", "10.96.0.100", "lladdr", b_mac, "dev", "eth0")
    server = subprocess.Popen(["ip", "netns", "exec", f"{p}b", "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = ns_exec(f"{p}a", "iperf3", "-c", "10.96.0.100", "-t", "1", "-J", timeout=60, check=False)
        assert r.returncode == 0, r.stdout[-2000:]
        assert json.loads(r.stdout)["end"]["sum_received"]["bytes"] > 100_000
    finally:
        server.kill()
        server.wait()
    dump = sw.cli("dump-flows", "br0", "--json")
    counts = {d["flow"].split(" ")[0]: d["n_packets"] for d in json.loads(dump.stdout)}
    assert all(n > 10 for k, n in counts.items() if k.startswith("priority=10")), counts


def test_hard_timeout_expires_the_rule_and_the_saved_config(pyswitch_up, prefix):
    p = prefix
    sw = pyswitch_up(_three_hosts(p))
    sw.cli("add-flow", "br0", f"hard_timeout=2,priority=300,icmp,in_port={p}a actions=drop")
    assert not ping(f"{p}a", "10.94.0.2", count=1)
    time.sleep(3.2)
    assert ping(f"{p}a", "10.94.0.2")
    assert "priority=300" not in sw.cli("dump-flows", "br0").stdout
    assert "priority=300" not in str(yaml.safe_load(sw.cli("export").stdout))


def test_flow_syntax_errors_name_the_field(pyswitch_up, prefix):
    sw = pyswitch_up(_three_hosts(prefix))
    r = sw.cli("add-flow", "br0", "ip,nw_src=10.0.0.300 actions=drop", check=False)
    assert r.returncode == 2 and r.stderr.strip() == \
        "pyswitch: nw_src=10.0.0.300: not an IPv4 address (at column 4)"
    r = sw.cli("add-flow", "br0", "in_port=nosuchport actions=drop", check=False)
    assert r.returncode == 2 and "no such port 'nosuchport'" in r.stderr
