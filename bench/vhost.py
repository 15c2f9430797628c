"""pyswitch's vhost-user ports against DPDK's own vhost back end, with testpmd as the guests.

    sudo .venv/bin/python bench/vhost.py [--seconds 5] [--reps 3] [--ovs]

One `dpdk-testpmd` with six `net_virtio_user` ports plays the VMs (`--forward-mode=io`: a
frame received on one port of a pair is sent out of the other). Each pair of its ports
is plugged into one back end, so that pair and the back end make a closed loop:
- pyswitch flows: two `dpdkvhostuser` ports of one bridge with the rules
  `in_port=P1 actions=output:P2` and the reverse;
- pyswitch NORMAL: two `dpdkvhostuser` ports of another bridge, no rules (the
  learning switch; testpmd's io mode keeps the source MAC, so the MAC moves between
  the two ports with every frame, and the destination is unknown, so every frame floods
  to the one other port);
- DPDK vhost: a second testpmd with two `net_vhost` ports, `--forward-mode=io`;
- OVS-DPDK flows (only with `--ovs`): Open vSwitch with DPDK, a `netdev` bridge with two
  `dpdkvhostuser` ports and the same two rules (bench/ovs.py: hugepages are reserved for
  the run and given back; its PMD thread is stopped while the others are measured).
A measurement (`set portlist` picks the pair) drains the loop (`rxonly` for 0.5 s),
then `set txpkts SIZE`, `start tx_first 8` (8 bursts of 32 frames from each port), waits
1 s, and counts RX-packets of both ports over `--seconds`: the rate is both directions
together, what the back end delivered. Sizes: 64 and 1518 bytes (testpmd's frame length,
no FCS; pyswitch's ports get `mtu: 1504` so a 1518-byte frame is not dropped as too long).
Runs are interleaved (rep, size, back end) and summarised as median (range).
CPUs: pyswitch, the DPDK vhost testpmd's forwarding lcore and OVS's PMD on CPU 1; the virtio-user
testpmd (main and forwarding lcore) on CPU 0. Only one back end forwards at a time.
Everything is removed on exit, Ctrl-C or SIGTERM. Results: bench/out/vhost-*.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from common import (
    Pyswitch,
    fmt,
    guard_signals,
    machine,
    need,
    save,
    si,
    summary,
    table,
    tag,
    tempdir,
)
from ovs import OvsDpdk

from tests.peers.testpmd import Testpmd  # the test suite's testpmd driver, reused

SIZES = (64, 1518)
BACKENDS = ("pyswitch flows", "pyswitch NORMAL", "DPDK vhost")
OVS = "OVS-DPDK flows"
SWITCH_CPU = 1


def vhost_port(sock_dir: Path) -> dict:
    """A `dpdkvhostuser` port whose socket is `sock_dir/<name>`, MTU 1504 (1518-byte frames)."""
    return {"type": "dpdkvhostuser", "options": {"vhost-sock-dir": str(sock_dir), "mtu": "1504"}}


def loop_flows(p1: str, p2: str) -> list[str]:
    """The two rules that make ports p1 and p2 a loop (as OVS-DPDK gets)."""
    return [f"in_port={p1} actions=output:{p2}", f"in_port={p2} actions=output:{p1}"]


def start_pyswitch(stack: ExitStack, t: str, sock_dir: Path) -> tuple[Pyswitch, list[Path]]:
    """Two bridges of two dpdkvhostuser ports: one with port-to-port rules, one NORMAL."""
    f1, f2, n1, n2 = f"{t}f1", f"{t}f2", f"{t}n1", f"{t}n2"
    port = vhost_port(sock_dir)
    topo = {"bridges": {
        f"{t}bf": {"ports": {f1: port, f2: port}, "flows": loop_flows(f1, f2)},
        f"{t}bn": {"ports": {n1: port, n2: port}},
    }}
    sw = Pyswitch(stack, topo, cpu=SWITCH_CPU).start()
    return sw, [sock_dir / name for name in (f1, f2, n1, n2)]


def start_dpdk_vhost(stack: ExitStack, sock_dir: Path) -> tuple[Testpmd, list[Path]]:
    """testpmd with two net_vhost ports (it listens on both sockets), io forwarding."""
    socks = [sock_dir / "vh1.sock", sock_dir / "vh2.sock"]
    vdevs = [f"net_vhost{i},iface={s},queues=1" for i, s in enumerate(socks)]
    pmd = Testpmd(vdevs, forward_mode="io", lcores=f"0@0,1@{SWITCH_CPU}", mem_mb=1024,
                  mbufs=16384, cleanup_paths=tuple(socks))
    return stack.enter_context(pmd), socks


def start_guests(stack: ExitStack, socks: list[Path]) -> Testpmd:
    """testpmd with one net_virtio_user port per socket, both lcores on CPU 0."""
    vdevs = [f"net_virtio_user{i},path={s},queues=1,mac=02:00:00:00:01:{i + 1:02x}"
             for i, s in enumerate(socks)]
    pmd = Testpmd(vdevs, forward_mode="io", lcores="0@0,1@0", mem_mb=1024, mbufs=32768)
    pmd = stack.enter_context(pmd)
    summary_text = pmd.command("show port summary all")
    for i in range(len(socks)):
        if f"net_virtio_user{i}" not in summary_text:
            raise RuntimeError(f"virtio-user port {i} missing:\n{summary_text}")
    return pmd


def loop_rate(guests: Testpmd, pair: tuple[int, int], size: int, seconds: float) -> dict:
    """Drain, then run the io loop on `pair`; frames per second received by both ports."""
    guests.command(f"set portlist {pair[0]},{pair[1]}")
    guests.command("set fwd rxonly")
    guests.command("start")
    time.sleep(0.5)
    guests.command("stop")
    guests.command("set fwd io")
    guests.command(f"set txpkts {size}")
    guests.command("start tx_first 8")
    try:
        time.sleep(1.0)
        a, t0 = guests.port_stats(), time.monotonic()
        time.sleep(seconds)
        b, t1 = guests.port_stats(), time.monotonic()
    finally:
        guests.command("stop")
    rx = sum(b[p].rx_packets - a[p].rx_packets for p in pair)
    tx = sum(b[p].tx_packets - a[p].tx_packets for p in pair)
    return {"rx_pps": rx / (t1 - t0), "tx_pps": tx / (t1 - t0)}


def hooks(backend: str, vhost: Testpmd, ovs: OvsDpdk | None) -> tuple[Callable, Callable]:
    """What lets a back end forward before its measurement, and stops it after."""
    if backend == "DPDK vhost":
        return (lambda: vhost.command("start")), (lambda: vhost.command("stop"))
    if backend == OVS and ovs is not None:
        return ovs.resume, ovs.pause
    return (lambda: None), (lambda: None)


def measure(guests: Testpmd, vhost: Testpmd, ovs: OvsDpdk | None,
            args: argparse.Namespace) -> dict:
    """{backend: {size: [run, ...]}}, interleaved by rep, size, back end."""
    backends = [*BACKENDS, OVS] if ovs else list(BACKENDS)
    pairs = {b: (2 * i, 2 * i + 1) for i, b in enumerate(backends)}
    raw: dict = {b: {s: [] for s in SIZES} for b in backends}
    for rep in range(args.reps):
        for size in SIZES:
            for backend in backends:
                resume, pause = hooks(backend, vhost, ovs)
                resume()
                try:
                    r = loop_rate(guests, pairs[backend], size, args.seconds)
                finally:
                    pause()
                raw[backend][size].append(r)
                print(f"  rep {rep + 1} {size:4d} B {backend}: {si(r['rx_pps'], 'pps')}",
                      file=sys.stderr)
    return raw


def report(raw: dict, args: argparse.Namespace) -> tuple[str, dict]:
    """The printed table and the JSON-able results."""
    res: dict = {}
    for backend, by_size in raw.items():
        for size, runs in by_size.items():
            res.setdefault(backend, {})[size] = {
                "rx_pps": summary(r["rx_pps"] for r in runs),
                "rx_bits": summary(r["rx_pps"] * size * 8 for r in runs)}
    peers = [b for b in ("DPDK vhost", OVS) if b in res]
    rows = []
    for size in SIZES:
        for backend in res:
            r = res[backend][size]
            row = [f"{size} B", backend, fmt(r["rx_pps"], "pps"), fmt(r["rx_bits"], "bit/s")]
            for peer in peers:
                base = res[peer][size]["rx_pps"]["median"]
                row.append(f"{r['rx_pps']['median'] / base:.3f}" if base else "n/a")
            rows.append(row)
    head = (f"vhost-user: testpmd virtio-user io loop through each back end, {args.seconds:g} s x "
            f"{args.reps} runs, both directions together, median (min-max); "
            f"back ends on CPU {SWITCH_CPU}, testpmd guests on CPU 0")
    header = ["frame", "back end", "rate", "bits/s (frame bytes)", *(f"this/{p}" for p in peers)]
    return head + "\n" + table(header, rows), res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=None,
                   help="measuring time of one run (default 5, with --ovs 4: under 3 min)")
    p.add_argument("--reps", type=int, default=3, help="runs of each measurement")
    p.add_argument("--ovs", action="store_true",
                   help="also OVS-DPDK (needs openvswitch-switch-dpdk; reserves hugepages)")
    args = p.parse_args()
    if args.seconds is None:
        args.seconds = 4.0 if args.ovs else 5.0
    need("dpdk-testpmd", "taskset", "stdbuf",
         *(("ovsdb-server", "ovsdb-tool", "ovs-vsctl", "ovs-ofctl") if args.ovs else ()))
    guard_signals()
    started, info = time.monotonic(), machine()
    with ExitStack() as stack:
        t = tag()
        sock_dir = tempdir(stack)
        sw, sw_socks = start_pyswitch(stack, t, sock_dir)
        vhost, vh_socks = start_dpdk_vhost(stack, sock_dir)
        ovs, ovs_socks = None, []
        if args.ovs:
            ovs = OvsDpdk(stack, tempdir(stack))
            ovs_socks = ovs.start(f"{t}o", ["vhu1", "vhu2"],
                                  ["in_port=vhu1,actions=output:vhu2",
                                   "in_port=vhu2,actions=output:vhu1"])
        guests = start_guests(stack, sw_socks + vh_socks + ovs_socks)
        if ovs:
            ovs.pause()
        raw = measure(guests, vhost, ovs, args)
        switch_stats = sw.port_stats()
    text, res = report(raw, args)
    print(text)
    path = save("vhost", {"machine": info, "args": vars(args), "results": res, "raw": raw,
                          "pyswitch_port_stats": switch_stats, "table": text,
                          "elapsed_s": time.monotonic() - started})
    print(f"({time.monotonic() - started:.0f} s; JSON: {path})")


if __name__ == "__main__":
    main()
