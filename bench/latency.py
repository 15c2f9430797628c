"""bench/run.py's scenario 3: round trips between two namespaces, idle and under load.

For each path, bench/udpecho.py's server runs in the receiver namespace and its client in
the sender namespace (both on CPU 0): one 32-byte UDP datagram at a time, the round trip
taken with `time.perf_counter_ns()` around send and the matching recv (see udpecho.py
for why this tool). `--samples` round trips per path and condition, split over `--reps`
interleaved runs and pooled; p50 and p99 of the pool, lost = no echo within 0.2 s.
*Under load*: trafgen sends 64-byte UDP frames at a fixed `--load-pps` (default 20 kpps,
below what either pyswitch path forwards, so it measures queueing, not overload) through
the same path in the same direction, to a destination address nobody answers.
The ratio is p50 / the Linux bridge's p50 in the same condition.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import run as sh
from common import stop_group, stop_process
from report import Row
from veth import RX_IP, Setup

UDPECHO = Path(__file__).resolve().parent / "udpecho.py"
PORT = 7777
SCEN3 = "3 latency (RTT)"
LB = "linux bridge"
CPU = "0"


def _server(s: Setup) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", s.rx_ns, "taskset", "-c", CPU,
                             sys.executable, str(UDPECHO), "server", RX_IP, str(PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while f":{PORT}" not in sh("ip", "netns", "exec", s.rx_ns, "ss", "-Hlun"):
        if time.monotonic() > deadline or proc.poll() is not None:
            stop_process(proc)
            raise RuntimeError(f"UDP echo server did not start in {s.rx_ns}")
        time.sleep(0.05)
    return proc


def _client(s: Setup, count: int) -> dict:
    out = sh("ip", "netns", "exec", s.tx_ns, "taskset", "-c", CPU, sys.executable,
             str(UDPECHO), "client", RX_IP, str(PORT), str(count), timeout=60 + count * 0.25)
    return json.loads(out)


def _load(s: Setup, conf: Path, pps: int) -> subprocess.Popen:
    argv = ["ip", "netns", "exec", s.tx_ns, "taskset", "-c", CPU, "trafgen", "--dev", "eth0",
            "--conf", str(conf), "--cpus", "1", "--no-sock-mem", "--notouch-irq",
            "--no-cpu-stats", "--rate", f"{pps}pps"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _pct(values: list[int], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else float(values[0])


def run(args, setups: list[Setup], conf: Path, rows: list[Row], errors: dict[str, str],
        lb: dict | None = None) -> dict:
    """Measure every set-up idle and under load; append rows (paths in `errors` as failed).
    `lb`: the Linux bridge's {condition: p50} from an earlier call, for the ratios when it
    is not among `setups`. Returns the Linux bridge's {condition: p50}."""
    conds = ("idle", f"under {args.load_pps / 1000:g} kpps load")
    pooled: dict[str, dict[str, dict]] = {s.name: {c: {"rtt_ns": [], "lost": 0} for c in conds}
                                          for s in setups}
    servers = {}
    per_run = max(50, args.samples // args.reps)
    try:
        for s in setups:
            try:
                servers[s.name] = _server(s)
            except RuntimeError as exc:
                errors[s.name] = str(exc)
        for rep in range(args.reps):
            for cond in conds:
                for s in setups:
                    if s.name not in servers:
                        continue
                    gen = _load(s, conf, args.load_pps) if cond != "idle" else None
                    try:
                        if gen:
                            time.sleep(0.3)
                        got = _client(s, per_run)
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                        errors[s.name] = f"echo client: {exc}"
                        continue
                    finally:
                        if gen:
                            stop_group(gen)
                    pooled[s.name][cond]["rtt_ns"] += got["rtt_ns"]
                    pooled[s.name][cond]["lost"] += got["lost"]
                    print(f"  [3] rep {rep + 1} {cond} {s.name}: {len(got['rtt_ns'])} samples",
                          file=sys.stderr)
    finally:
        for proc in servers.values():
            stop_process(proc)
    p50 = {n: {c: (_pct(v["rtt_ns"], 50) / 1000 if v["rtt_ns"] else None)
               for c, v in by.items()} for n, by in pooled.items()}
    lb = p50.get(LB) or lb or {}
    for name in [*(s.name for s in setups), *(n for n in errors if n not in pooled)]:
        for cond in conds:
            row = Row(SCEN3, f"RTT {cond}", name)
            if name.startswith("pyswitch compiled"):
                row.target = ("p50 <= linux bridge, p99 < 200 us" if cond == "idle"
                              else "p50 <= linux bridge")
            got = pooled.get(name, {}).get(cond, {"rtt_ns": [], "lost": 0})
            if not got["rtt_ns"]:
                row.error = errors.get(name, "no sample")
                rows.append(row)
                continue
            us = got["rtt_ns"]
            p99 = _pct(us, 99) / 1000
            mid = p50[name][cond]
            row.value = (f"p50 {mid:.1f} us, p99 {p99:.1f} us "
                         f"(lost {got['lost']}/{len(us) + got['lost']})")
            base = lb.get(cond)
            if name != LB:
                row.ratios = {f"{LB} p50": mid / base if base else None}
            row.extra = {"p50_us": mid, "p99_us": p99, "samples": len(us), "lost": got["lost"]}
            if row.target is not None and base:
                row.met = mid <= base and (p99 < 200 if cond == "idle" else True)
            rows.append(row)
    return lb
