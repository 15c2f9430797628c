"""bench/run.py's vhost-user scenarios: VM-to-VM (1) and how cost grows with ports (4).

One `dpdk-testpmd` plays the VMs with two `net_virtio_user` ports per back end
(bench/vhost.py's `start_guests`, `loop_rate`, `hooks`): pyswitch on each data path (a
bridge with two `dpdkvhostuser` ports and the two port-to-port rules, bench/vhost.py's
`loop_flows`), DPDK's `net_vhost` (bench/vhost.py's `start_dpdk_vhost`) and OVS-DPDK
(bench/ovs.py, the same two rules). Only one back end forwards at a time: the loop runs
on one pair of testpmd ports (`set portlist`), OVS-DPDK's vswitchd is SIGSTOPped and the
net_vhost testpmd's forwarding stopped while others are measured; pyswitch sleeps when
it has nothing to do. Then, on the same switches, idle `dpdkvhostuser` ports are added and
deleted (`pyswitch add-port`/`del-port`: 2, 16, 64 ports in each rep, so the counts are
interleaved like everything else) and the 64-byte loop measured at each count; last, the
CPU time of each idle switch with 64 ports over `idle_seconds` and its VmRSS.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from pathlib import Path

from common import Pyswitch, proc_cpu_seconds, proc_rss_bytes, si, summary, tag, tempdir
from ovs import OvsDpdk
from report import Row, ratio
from vhost import OVS, hooks, loop_flows, loop_rate, start_dpdk_vhost, start_guests, vhost_port

SIZES = (64, 1518)
PORT_COUNTS = (2, 16, 64)
VHOST = "DPDK vhost"
SCEN1 = "1 VM-to-VM vhost-user"
SCEN4 = "4 cost growth (vhost)"
CPUS = ("testpmd guests (main + forwarding lcore): CPU 0; pyswitch, DPDK vhost's forwarding "
        "lcore, OVS-DPDK's PMD: CPU 1")


class Switch:
    """One pyswitch of one data path: a bridge with two looped vhost-user ports."""

    def __init__(self, stack: ExitStack, datapath: str, sock_dir: Path, cpu: int) -> None:
        self.name, self.t, self.sock_dir = f"pyswitch {datapath}", tag(), sock_dir
        self.datapath = datapath
        self.bridge = f"{self.t}b"
        self.ports = [f"{self.t}p1", f"{self.t}p2"]
        topo = {"bridges": {self.bridge: {
            "ports": {p: vhost_port(sock_dir) for p in self.ports},
            "flows": loop_flows(*self.ports)}}}
        self.sw = Pyswitch(stack, topo, cpu=cpu, datapath=datapath)
        self.error: str | None = None

    def start(self) -> Switch:
        try:
            self.sw.start()
        except RuntimeError as exc:
            self.error = str(exc)
            return self
        if self.sw.active_datapath != self.datapath:
            self.error = (f"asked for --datapath {self.datapath}; pyswitch's log says "
                          f"datapath: {self.sw.active_datapath}")
        return self

    def socks(self) -> list[Path]:
        return [self.sock_dir / p for p in self.ports]

    def alive(self) -> bool:
        """False (and `error` set from its log) once the process has exited."""
        if self.error is None and self.sw.proc is not None and self.sw.proc.poll() is not None:
            self.error = (f"pyswitch exited {self.sw.proc.returncode} during the run:\n"
                          + self.sw.log.read_text()[-2000:])
        return self.error is None

    def resize(self, total: int) -> None:
        """Add idle dpdkvhostuser ports, or delete the added ones, until the bridge has
        `total` ports (one transaction; the two looped ports stay)."""
        argv: list[str] = []
        while len(self.ports) < total:
            name = f"{self.t}x{len(self.ports) + 1}"
            argv += ["--", "add-port", self.bridge, name, "--type", "dpdkvhostuser",
                     "-o", f"vhost-sock-dir={self.sock_dir}", "-o", "mtu=1504"]
            self.ports.append(name)
        while len(self.ports) > max(total, 2):
            argv += ["--", "del-port", self.bridge, self.ports.pop()]
        if argv:
            self.sw.ctl(*argv[1:])


def run(stack: ExitStack, args, datapaths: tuple[str, ...], rows: list[Row], vm: bool = True,
        ports: bool = True) -> None:
    """Scenario 1 (`vm`) and the vhost part of scenario 4 (`ports`); rows appended."""
    sock_dir = tempdir(stack)
    switches = [Switch(stack, dp, sock_dir, cpu=1).start() for dp in datapaths]
    running = [s for s in switches if s.error is None]
    backends: dict[str, list[Path]] = {s.name: s.socks() for s in running}
    errors: dict[str, str] = {s.name: s.error for s in switches if s.error is not None}
    if not vm:
        for s in switches:
            if s.error:
                rows.append(Row(SCEN4, "vhost ports", s.name, error=s.error))
        if running:
            guests = start_guests(stack, [x for b in backends.values() for x in b])
            grow_ports(guests, running, {b: (2 * i, 2 * i + 1) for i, b in enumerate(backends)},
                       args, rows)
        return
    vhost, socks = start_dpdk_vhost(stack, sock_dir)
    backends[VHOST] = socks
    ovs = None
    try:
        ovs = OvsDpdk(stack, tempdir(stack))
        backends[OVS] = ovs.start(f"{tag()}o", ["vhu1", "vhu2"],
                                  ["in_port=vhu1,actions=output:vhu2",
                                   "in_port=vhu2,actions=output:vhu1"])
    except RuntimeError as exc:
        errors[OVS], ovs = str(exc), None
    order = list(backends)
    guests = start_guests(stack, [s for b in order for s in backends[b]])
    if ovs:
        ovs.pause()
    pairs = {b: (2 * i, 2 * i + 1) for i, b in enumerate(order)}
    raw: dict[str, dict[int, list[float]]] = {b: {s: [] for s in SIZES} for b in order}
    by_name = {s.name: s for s in running}
    for rep in range(args.reps):
        for size in SIZES:
            for b in order:
                if b in by_name and not by_name[b].alive():
                    continue
                resume, pause = hooks(b, vhost, ovs)
                resume()
                try:
                    pps = loop_rate(guests, pairs[b], size, args.seconds)["rx_pps"]
                finally:
                    pause()
                raw[b][size].append(pps)
                print(f"  [1] rep {rep + 1} {size} B {b}: {si(pps, 'pps')}", file=sys.stderr)
    stats = {}
    for s in running:
        if s.alive():
            stats[s.name] = s.sw.port_stats()  # drops by reason, into the JSON
        else:
            errors[s.name] = s.error
    for size in SIZES:
        res = {b: summary(raw[b][size]) for b in order}
        for b in [*(s.name for s in switches), VHOST, OVS]:
            row = Row(SCEN1, f"{size} B", b)
            if b in errors and not res.get(b, {}).get("runs"):
                row.error = errors[b]
            else:
                row.pps = res[b]
                row.bits = summary(x * size * 8 for x in raw[b][size])
                row.ratios = {p: ratio(res[b], res.get(p)) for p in (OVS, VHOST) if p != b}
                row.extra = {"port_stats": stats.get(b)} if b in stats else {}
            if b == "pyswitch compiled":
                row.target = "pps >= 0.5x OVS-DPDK" if size == 64 else "bits/s >= 1x OVS-DPDK"
                r = row.ratios.get(OVS)
                row.met = None if r is None else r >= (0.5 if size == 64 else 1.0)
            rows.append(row)
    if ports:
        for s in switches:
            if s.error:
                rows.append(Row(SCEN4, "vhost ports", s.name, error=s.error))
        grow_ports(guests, [s for s in running if s.alive()], pairs, args, rows)


def grow_ports(guests, running: list[Switch], pairs: dict, args, rows: list[Row]) -> None:
    """Rate of the 64-byte loop with 2, 16 and 64 vhost-user ports on the bridge, then the
    idle CPU and memory of each switch with 64 ports."""
    rss2 = {s.name: proc_rss_bytes(s.sw.proc.pid) for s in running}
    raw: dict[str, dict[int, list[float]]] = {s.name: {} for s in running}
    for rep in range(args.reps):
        for n in PORT_COUNTS:
            for s in running:
                if not s.alive():
                    continue
                try:
                    s.resize(n)
                except RuntimeError as exc:
                    s.error = str(exc)
                    continue
                pps = loop_rate(guests, pairs[s.name], 64, args.seconds)["rx_pps"]
                raw[s.name].setdefault(n, []).append(pps)
                print(f"  [4] rep {rep + 1} {n} ports {s.name}: {si(pps, 'pps')}",
                      file=sys.stderr)
    for s in running:  # the idle measurement wants the 64 ports
        if s.alive() and len(s.ports) != PORT_COUNTS[-1]:
            s.resize(PORT_COUNTS[-1])
    for s in running:
        base = summary(raw[s.name].get(2, []))
        for n in PORT_COUNTS:
            row = Row(SCEN4, f"vhost ports: {n} (64 B loop)", s.name)
            got = summary(raw[s.name].get(n, []))
            if not got["runs"]:
                row.error = s.error or "not measured"
            else:
                row.pps, row.bits = got, summary(x * 64 * 8 for x in got["runs"])
                row.ratios = {"2 ports": ratio(got, base)}
                row.extra["baseline"] = n == PORT_COUNTS[0]
            if n == 64:
                row.target = ">= 0.9x 2 ports"
                r = row.ratios.get("2 ports")
                row.met = None if r is None else r >= 0.9
            rows.append(row)
    idle = [s for s in running if s.alive()]
    time.sleep(1.0)
    cpu0 = {s.name: proc_cpu_seconds(s.sw.proc.pid) for s in idle}
    t0 = time.monotonic()
    time.sleep(args.idle_seconds)
    elapsed = time.monotonic() - t0
    for s in idle:
        share = (proc_cpu_seconds(s.sw.proc.pid) - cpu0[s.name]) / elapsed * 100
        rows.append(Row(SCEN4, f"idle CPU, {len(s.ports)} vhost ports ({elapsed:.0f} s)", s.name,
                        value=f"{share:.2f} % of a CPU", target="< 1 % of a CPU",
                        met=share < 1.0, extra={"cpu_percent": share}))
        rss = proc_rss_bytes(s.sw.proc.pid)
        rows.append(Row(SCEN4, "resident memory (VmRSS), 2 -> 64 vhost ports", s.name,
                        value=f"{rss2[s.name] / 2**20:.1f} -> {rss / 2**20:.1f} MiB",
                        extra={"rss_2_ports": rss2[s.name], "rss_64_ports": rss}))
