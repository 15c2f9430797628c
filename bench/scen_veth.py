"""bench/run.py's namespace scenarios over veth: throughput (2) and latency (3).

Each path joins a sender namespace (10.77.0.1) and a receiver namespace (10.77.0.2) and
is built by bench/veth.py's functions: pyswitch on each data path (`pyswitch_bridge`: one
bridge, two `veth` ports, NORMAL), the Linux bridge (`linux_bridge`) and, here, Open
vSwitch's userspace datapath: a private ovs-vswitchd without DPDK (bench/ovs.py,
`dpdk=False`) with a `datapath_type=netdev` bridge whose two ports are the root-namespace
ends of the hosts' veth pairs (`ovs-vsctl add-port BR vethX`; NORMAL; no kernel module).
Latency runs first (bench/latency.py), then the 64-byte UDP flood of bench/veth.py's
`udp_rate`, interleaved over the paths, so a path that a flood leaves broken still has
its latency figures; 5 pings through each path 1 s after the last flood (`pings_after`)
and pyswitch's port counters (drops by reason) go into the JSON. CPUs: trafgen, the echo client and server on CPU 0 (with the Linux
bridge's forwarding, in the sender's softirq); pyswitch and ovs-vswitchd on CPU 1.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack

import latency
from common import run as sh
from common import si, summary, tag, tempdir
from ovs import OvsDpdk
from report import Row, ratio
from veth import (
    FRAME,
    OFFLOADS,
    RX_IP,
    RX_MAC,
    TRAFGEN_CONF,
    TX_IP,
    TX_MAC,
    Setup,
    add_netns,
    check_path,
    configure_host,
    linux_bridge,
    pings_after,
    pyswitch_bridge,
    udp_rate,
)

SCEN2 = "2 namespaces over veth"
LB, OVSN = "linux bridge", "OVS netdev"
SWITCH_CPU, GEN_CPU = 1, 0
CPUS = ("trafgen, UDP echo client and server, Linux bridge softirq: CPU 0; pyswitch, "
        "ovs-vswitchd (netdev): CPU 1")


def ovs_netdev(stack: ExitStack, t: str) -> Setup:
    """Two host namespaces whose veth peers are the ports of an OVS netdev bridge."""
    ovs = OvsDpdk(stack, tempdir(stack), dpdk=False, cpu=SWITCH_CPU)
    a, b = add_netns(stack, f"{t}g"), add_netns(stack, f"{t}h")
    ports = []
    for ns, mac, ip, port in ((a, TX_MAC, TX_IP, f"{t}o0"), (b, RX_MAC, RX_IP, f"{t}o1")):
        sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        stack.callback(sh, "ip", "link", "del", port, check=False)
        sh("ethtool", "-K", port, *OFFLOADS)
        sh("ip", "link", "set", port, "up")
        configure_host(ns, mac, ip)
        ports.append(port)
    ovs.start(f"{t}ob", ports, [], port_type=None)
    return Setup(OVSN, a, b)


def pyswitch_path(stack: ExitStack, datapath: str, name: str | None = None,
                  extra: tuple[str, ...] = (), settings: dict | None = None) -> Setup:
    """pyswitch on `datapath` between two new namespaces, checked with a ping."""
    s = pyswitch_bridge(stack, tag(), SWITCH_CPU, datapath, name or f"pyswitch {datapath}",
                        extra, settings)
    active = s.switch.active_datapath
    if active != datapath:  # `auto` or a fallback would make the row lie about its path
        raise RuntimeError(f"asked for --datapath {datapath}; pyswitch's log says datapath: "
                           f"{active}")
    check_path(s)
    return s


def build(stack: ExitStack, datapaths: tuple[str, ...],
          ovs: bool = True) -> tuple[list[Setup], dict[str, str]]:
    """Every path that could be set up, and why the others could not."""
    setups, errors = [], {}
    makers = [(f"pyswitch {dp}", lambda dp=dp: pyswitch_path(stack, dp)) for dp in datapaths]
    makers.append((LB, lambda: linux_bridge(stack, tag())))
    if ovs:
        makers.append((OVSN, lambda: ovs_netdev(stack, tag())))
    for name, make in makers:
        try:
            s = make()
            if s.switch is None:
                check_path(s)
            setups.append(s)
        except RuntimeError as exc:
            errors[name] = str(exc)
    return setups, errors


def run(stack: ExitStack, args, datapaths: tuple[str, ...], pmd: bool, rows: list[Row],
        throughput: bool = True, lat: bool = True) -> None:
    """Scenarios 2 (`throughput`) and 3 (`lat`); rows appended to `rows`."""
    conf = tempdir(stack) / "udp64.cfg"
    conf.write_text(TRAFGEN_CONF)
    setups, errors = build(stack, datapaths, ovs=throughput)
    if lat:
        lat_setups = [s for s in setups if s.name != OVSN]
        lat_errors = {k: v for k, v in errors.items() if k != OVSN}
        lb = latency.run(args, lat_setups, conf, rows, lat_errors)
    if lat and pmd:  # spins on CPU 1: its own switch, measured alone, stopped at once
        best = "compiled" if "compiled" in datapaths else datapaths[0]
        name = f"pyswitch {best} --pmd"
        with ExitStack() as pst:
            try:
                s = pyswitch_path(pst, best, name, ("--pmd",))
                latency.run(args, [s], conf, rows, {}, lb)
            except RuntimeError as exc:
                latency.run(args, [], conf, rows, {name: str(exc)}, lb)
    if throughput:
        measure(args, setups, errors, conf, datapaths, rows)


def measure(args, setups: list[Setup], errors: dict[str, str], conf, datapaths, rows) -> None:
    """Scenario 2: the UDP flood, interleaved over the paths."""
    raw: dict[str, list[dict]] = {s.name: [] for s in setups}
    for rep in range(args.reps):
        for s in setups:
            try:
                r = udp_rate(s, conf, args.seconds, GEN_CPU)
            except RuntimeError as exc:
                errors[s.name] = str(exc)
                continue
            raw[s.name].append(r)
            print(f"  [2] rep {rep + 1} {s.name}: {si(r['rx_pps'], 'pps')}", file=sys.stderr)
    time.sleep(1.0)
    after = {s.name: pings_after(s) for s in setups}  # does the path still forward?
    stats = {}
    for s in setups:
        if s.switch is not None:
            try:
                stats[s.name] = s.switch.port_stats()
            except RuntimeError as exc:
                stats[s.name] = {"error": str(exc)}
    res = {n: summary(r["rx_pps"] for r in runs) for n, runs in raw.items()}
    names = [f"pyswitch {dp}" for dp in datapaths] + [LB, OVSN]
    for name in names:
        row = Row(SCEN2, "64 B UDP (trafgen)", name)
        if not raw.get(name):
            row.error = errors.get(name, "not measured")
        else:
            row.pps = res[name]
            row.bits = summary(r["rx_pps"] * FRAME * 8 for r in raw[name])
            row.ratios = {p: ratio(res[name], res.get(p)) for p in (LB, OVSN) if p != name}
            row.extra = {"offered_pps": summary(r["offered_pps"] for r in raw[name]),
                         "pings_after_flood": after.get(name), "port_stats": stats.get(name)}
        if name == "pyswitch compiled":
            row.target = ">= 2x linux bridge"
            r = row.ratios.get(LB)
            row.met = None if r is None else r >= 2.0
        rows.append(row)
