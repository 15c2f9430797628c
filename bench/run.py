"""Every benchmark scenario of issue 10 in one run: pyswitch on both data paths and its peers.

    sudo .venv/bin/python bench/run.py [--quick] [--only SCENARIO] [--seconds N] [--reps N]

Scenarios (bench/README.md has the method of each):
  vm       1. VM-to-VM over vhost-user: testpmd virtio-user io loop, 64 and 1518 B, against
              OVS-DPDK and DPDK's net_vhost (bench/scen_vhost.py)
  veth     2. namespaces over veth: trafgen 64 B UDP, against the Linux bridge and OVS's
              userspace (netdev) datapath (bench/scen_veth.py)
  latency  3. UDP round trips idle and under load, against the Linux bridge (bench/latency.py)
  scaling  4. rate against flow rules, learned MACs, distinct flows (bench/scaling.py) and
              vhost-user ports, idle CPU with 64 ports, resident memory (bench/scen_vhost.py)
pyswitch runs as `pyswitch up TOPOLOGY --datapath python` and `--datapath compiled` (a path
that cannot start is a failed row with pyswitch's reason; the run goes on). CPUs are
pinned with taskset: 0 for generators and guests, 1 for the switches (see CPU lines in the
output). Prints one table, writes bench/out/run-<stamp>.json (and run-latest.json) and a PNG
chart of the ratios (bench/out/run-<stamp>.png; needs the optional `bench` extra:
matplotlib). Every process, namespace, link, socket, hugepage setting is undone on exit,
failure, Ctrl-C or SIGTERM. Default run: about 12 minutes; --quick: about 4-5 (loaded machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import scaling
import scen_veth
import scen_vhost
from common import OUT, PYSWITCH, ROOT, guard_signals, machine, save
from report import Row, chart, render, targets

SCENARIOS = ("vm", "veth", "latency", "scaling")
DATAPATHS = ("python", "compiled")
#: program -> Debian package, per scenario
NEEDS = {
    "vm": {"dpdk-testpmd": "dpdk-dev", "stdbuf": "coreutils", "ovsdb-server": "openvswitch-switch",
           "ovs-vsctl": "openvswitch-switch", "ovs-ofctl": "openvswitch-switch",
           "ovsdb-tool": "openvswitch-switch",
           "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk": "openvswitch-switch-dpdk"},
    "veth": {"trafgen": "netsniff-ng", "ethtool": "ethtool", "ss": "iproute2",
             "/usr/lib/openvswitch-switch/ovs-vswitchd": "openvswitch-switch",
             "ovsdb-server": "openvswitch-switch", "ovs-vsctl": "openvswitch-switch"},
    "latency": {"trafgen": "netsniff-ng", "ethtool": "ethtool", "ss": "iproute2"},
    "scaling": {"trafgen": "netsniff-ng", "ethtool": "ethtool", "dpdk-testpmd": "dpdk-dev",
                "stdbuf": "coreutils"},
}


def check_prerequisites(chosen: list[str]) -> None:
    """Stop at once, naming the Debian packages to install, if a peer program is missing.
    (The bench does not install packages itself: it runs on shared machines, and an
    apt-get in the middle of a measurement would be a surprise; one command fixes it.)"""
    if os.geteuid() != 0:
        raise SystemExit("bench/run.py needs root (namespaces, hugepages): run it with sudo")
    missing = set()
    for scenario in chosen:
        for program, package in {"taskset": "util-linux", "ip": "iproute2",
                                 **NEEDS[scenario]}.items():
            found = Path(program).exists() if program.startswith("/") else shutil.which(program)
            if not found:
                missing.add(package)
    if missing:
        raise SystemExit("missing peer programs; install them with:\n  apt-get install -y "
                         + " ".join(sorted(missing)))


def pyswitch_has(option: str) -> bool:
    out = subprocess.run([str(PYSWITCH), "up", "--help"], capture_output=True, text=True,
                         timeout=30, check=False).stdout
    return option in out


def code_version() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() or "unknown"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 rep of 2 s, fewer latency samples, 1 learning pass: about 4-5 minutes")
    p.add_argument("--only", action="append", choices=SCENARIOS,
                   help="run only this scenario (repeatable)")
    p.add_argument("--seconds", type=float, help="measuring time of one rate run (3; quick 2)")
    p.add_argument("--reps", type=int, help="runs of each measurement, interleaved (3; quick 1)")
    p.add_argument("--samples", type=int, help="round trips per path and condition (3000; quick 500)")
    p.add_argument("--load-pps", type=int, default=20000, help="background load for latency")
    p.add_argument("--learn-pps", type=int, default=10000, help="rate of the MAC-learning frames")
    p.add_argument("--idle-seconds", type=float, help="idle CPU sampling time (10; quick 5)")
    p.add_argument("--learn-passes", type=int,
                   help="MAC-learning passes at most, while under 95%% learned (3; quick 1)")
    p.add_argument("--datapaths", default=",".join(DATAPATHS),
                   help="pyswitch data paths to measure (default python,compiled)")
    args = p.parse_args()
    quick = args.quick
    for name, full, short in (("seconds", 3.0, 2.0), ("reps", 3, 1), ("samples", 3000, 500),
                              ("idle_seconds", 10.0, 5.0), ("learn_passes", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.only = args.only or list(SCENARIOS)
    return args


def main() -> None:
    args = parse()
    check_prerequisites(args.only)
    guard_signals()
    datapaths = tuple(d for d in args.datapaths.split(",") if d)
    pmd = pyswitch_has("--pmd")
    started, info = time.monotonic(), machine()
    info["code"] = code_version()
    rows: list[Row] = []
    cpus = {"vm/scaling (vhost)": scen_vhost.CPUS, "veth/latency/scaling (veth)": scen_veth.CPUS}
    print(f"pyswitch at {info['code']}; data paths {', '.join(datapaths)}; load average "
          f"{info['loadavg_at_start'][0]:.2f}; CPUs:", file=sys.stderr)
    for k, v in cpus.items():
        print(f"  {k}: {v}", file=sys.stderr)
    steps = []
    if "vm" in args.only or "scaling" in args.only:
        steps.append(("vhost", lambda st: scen_vhost.run(
            st, args, datapaths, rows, vm="vm" in args.only, ports="scaling" in args.only)))
    if "veth" in args.only or "latency" in args.only:
        steps.append(("veth", lambda st: scen_veth.run(
            st, args, datapaths, pmd and "latency" in args.only, rows,
            throughput="veth" in args.only, lat="latency" in args.only)))
    if "scaling" in args.only:
        steps.append(("scaling", lambda st: scaling.run(st, args, datapaths, rows)))
    interrupted = False
    try:
        for name, step in steps:
            t0 = time.monotonic()
            with ExitStack() as stack:
                try:
                    step(stack)
                except Exception as exc:  # noqa: BLE001 (a failed scenario is a row; the rest run)
                    traceback.print_exc()
                    rows.append(Row(name, "whole scenario", "-", error=f"{type(exc).__name__}: {exc}"))
            print(f"  ({name}: {time.monotonic() - t0:.0f} s)", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        rows.append(Row("-", "interrupted", "-", error="Ctrl-C or SIGTERM: the run was cut short"))
    finish(args, info, rows, started, cpus, interrupted)


def finish(args, info: dict, rows: list[Row], started: float, cpus: dict,
           interrupted: bool) -> None:
    elapsed = time.monotonic() - started
    head = (f"pyswitch issue-10 bench, {info['date']}, code {info['code']}, {info['cpus']} CPUs, "
            f"load average {info['loadavg_at_start'][0]:.2f} at start; {args.seconds:g} s x "
            f"{args.reps} runs per rate, median (min-max); ratios are median / median")
    head += "".join(f"\nCPUs, {k}: {v}" for k, v in cpus.items())
    text = head + "\n" + render(rows)
    goals = targets(rows)
    print(text)
    if goals:
        print("\ntargets (issue 10):\n" + goals)
    path = save("run", {"machine": info, "args": vars(args), "cpus": cpus,
                        "rows": [r.as_dict() for r in rows], "table": text, "targets": goals,
                        "elapsed_s": elapsed, "interrupted": interrupted})
    png = path.with_suffix(".png")
    said = chart(rows, png, head.split("\n")[0])
    if png.exists():
        shutil.copyfile(png, OUT / "run-latest.png")
    print(f"({elapsed:.0f} s; JSON: {path}; {said})")
    if interrupted:
        raise SystemExit(130)


if __name__ == "__main__":
    main()
