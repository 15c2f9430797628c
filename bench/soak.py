"""Soak: pyswitch forwarding flat out for a long time, its RSS and fd count sampled.

    sudo .venv/bin/python bench/soak.py [--seconds 600] [--every 5] [--datapath auto]

Set-up (bench/veth.py's): `pyswitch up` of one bridge with two veth ports, a sender and
a receiver namespace.  `trafgen` in the sender sends 64-byte UDP frames to the
receiver's MAC as fast as it can for the whole run (the switch is saturated: the
receiver's rate is what it forwards).  Every `--every` seconds the pyswitch process's
VmRSS (/proc/PID/status) and open fds (/proc/PID/fd) are sampled, with the frames
received so far.  A ping through the switch before and after the run proves the path.

With `--vhost`, a second bridge carries a closed loop of vhost-user traffic at the same
time: two `dpdkvhostuser` ports joined by two flow rules, and one dpdk-testpmd with two
virtio-user ports in `io` mode (bench/vhost.py's guests) started with `start tx_first 8`;
its received frames are sampled too, and must grow in every interval.

Verdict (exit status 1 if it fails), after a warm-up of 25% of the run (at most 60 s)
in which caches, rings and the MAC table reach their size:
- RSS: the highest sample after warm-up is at most `RSS_TOLERANCE` (4 MiB) above the
  first one after warm-up.  A leak of one 64-byte object per frame forwarded grows
  by tens of MiB per minute at these rates; allocator noise stays within 1-2 MiB.
  The RSS judged is the process's own memory (RssAnon): shared guest memory that the
  switch maps (RssShmem, with `--vhost`) grows as the guest's buffers are first
  touched, up to the guest's size, and is reported beside it.
- fds: the same count in every sample after warm-up.
- forwarding never stopped: frames arrived between every two samples.
Results: bench/out/soak-<stamp>.json.  `tests/test_soak.py` runs this for
$PYSWITCH_SOAK_SECONDS (default 30) in CI.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from common import (
    Pyswitch,
    guard_signals,
    machine,
    need,
    save,
    stop_group,
    tag,
    tempdir,
)
from veth import TRAFGEN_CONF, check_path, counter, pings_after, pyswitch_bridge

RSS_TOLERANCE = 4 << 20
WARMUP_SHARE, WARMUP_MAX = 0.25, 60.0


def rss_parts(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssShmem of a process, in bytes."""
    keys = {"VmRSS:": "rss", "RssAnon:": "rss_anon", "RssShmem:": "rss_shmem"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(None, 1)[0] if line else ""
        if key in keys:
            out[keys[key]] = int(line.split()[1]) * 1024
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def vhost_loop(stack: ExitStack, sw: Pyswitch, t: str) -> Any:
    """A bridge of two dpdkvhostuser ports looped by rules, testpmd's io loop through it."""
    from vhost import loop_flows, start_guests, vhost_port  # needs dpdk-testpmd only here

    sock_dir = tempdir(stack)
    names = (f"{t}v1", f"{t}v2")
    sw.ctl("add-br", f"{t}bv")
    for name in names:
        opts = [f"-o{k}={v}" for k, v in vhost_port(sock_dir)["options"].items()]
        sw.ctl("add-port", f"{t}bv", name, "--type", "dpdkvhostuser", *opts)
    for rule in loop_flows(*names):
        sw.ctl("add-flow", f"{t}bv", rule)
    guests = start_guests(stack, [sock_dir / n for n in names])
    guests.command("start tx_first 8")
    return guests


def soak(seconds: float, every: float = 5.0, datapath: str | None = None, vhost: bool = False) -> dict[str, Any]:
    """Run the soak; return the samples and the verdict (see the module docstring)."""
    need("trafgen", "ethtool")
    with ExitStack() as stack:
        t = tag()
        s = pyswitch_bridge(stack, t, cpu=None, datapath=datapath)
        assert s.switch is not None and s.switch.proc is not None
        pid = s.switch.proc.pid
        check_path(s)
        guests = vhost_loop(stack, s.switch, t) if vhost else None
        conf = tempdir(stack) / "udp.cfg"
        conf.write_text(TRAFGEN_CONF)
        gen = subprocess.Popen(
            ["ip", "netns", "exec", s.tx_ns, "trafgen", "--dev", "eth0", "--conf", str(conf), "--cpus", "1",
             "--no-sock-mem", "--notouch-irq", "--no-cpu-stats"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        stack.callback(stop_group, gen)
        samples: list[dict[str, float]] = []
        t0 = time.monotonic()
        while True:
            now = time.monotonic() - t0
            samples.append({"t": round(now, 2), **rss_parts(pid), "fds": fd_count(pid),
                            "rx": counter(s.rx_ns, "rx_packets")})
            if guests is not None:
                samples[-1]["vhost_rx"] = sum(p.rx_packets for p in guests.port_stats().values())
            if gen.poll() is not None:
                raise RuntimeError(f"trafgen exited {gen.returncode} after {now:.0f} s")
            if now >= seconds:
                break
            time.sleep(min(every, seconds - now))
        stop_group(gen)
        time.sleep(0.5)
        pings = pings_after(s)
        active = s.switch.active_datapath
    return verdict(samples, seconds, pings, active)


def verdict(samples: list[dict[str, float]], seconds: float, pings: int, datapath: str | None) -> dict[str, Any]:
    warmup = min(WARMUP_MAX, WARMUP_SHARE * seconds)
    post = [x for x in samples if x["t"] >= warmup]
    if len(post) < 2:
        raise ValueError(f"too few samples after the {warmup:.0f} s warm-up: run longer or sample more often")
    own = "rss_anon" if "rss_anon" in post[0] else "rss"
    growth = max(x[own] for x in post) - post[0][own]
    fds = sorted({int(x["fds"]) for x in post})
    stalls = [b["t"] for a, b in itertools.pairwise(samples)
              if b["rx"] <= a["rx"] or b.get("vhost_rx", 1) <= a.get("vhost_rx", 0)]
    span = samples[-1]["t"] - samples[0]["t"]
    rate = (samples[-1]["rx"] - samples[0]["rx"]) / span if span else 0.0
    vhost_rate = (samples[-1].get("vhost_rx", 0) - samples[0].get("vhost_rx", 0)) / span if span else 0.0
    problems = []
    if growth > RSS_TOLERANCE:
        problems.append(f"RSS ({own}) grew {growth / 2**20:.1f} MiB after warm-up "
                        f"(tolerance {RSS_TOLERANCE >> 20} MiB)")
    if len(fds) != 1:
        problems.append(f"fd count changed after warm-up: {fds}")
    if stalls:
        problems.append(f"no frames forwarded in the sample(s) ending at {stalls} s")
    if pings != 5:
        problems.append(f"{pings}/5 pings answered after the run")
    return {"seconds": seconds, "warmup_s": warmup, "datapath": datapath, "rx_pps": rate,
            "vhost_rx_pps": vhost_rate,
            "rss_first_mib": samples[0]["rss"] / 2**20, "rss_after_warmup_mib": post[0]["rss"] / 2**20,
            "rss_last_mib": samples[-1]["rss"] / 2**20, "rss_shmem_last_mib": samples[-1].get("rss_shmem", 0) / 2**20,
            "rss_judged": own, "rss_growth_mib": growth / 2**20, "fds": fds, "pings_after": pings,
            "problems": problems, "ok": not problems, "samples": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--every", type=float, default=5)
    ap.add_argument("--datapath", choices=("auto", "compiled", "python"), default=None)
    ap.add_argument("--vhost", action="store_true", help="also a testpmd io loop over two vhost-user ports")
    args = ap.parse_args()
    guard_signals()
    result = soak(args.seconds, args.every, args.datapath, args.vhost)
    path = save("soak", {"machine": machine(), **result})
    print(f"{args.seconds:g} s through pyswitch ({result['datapath']} datapath), trafgen flat out: "
          f"{result['rx_pps'] / 1e3:.0f} kpps forwarded veth to veth"
          + (f", {result['vhost_rx_pps'] / 1e3:.0f} kpps in the vhost-user loop" if args.vhost else "")
          + f"; RSS {result['rss_first_mib']:.1f} MiB at start, "
          f"{result['rss_after_warmup_mib']:.1f} MiB after the {result['warmup_s']:.0f} s warm-up, "
          f"{result['rss_last_mib']:.1f} MiB at the end ({result['rss_shmem_last_mib']:.1f} MiB of it shared "
          f"guest memory); own memory (RssAnon) +{result['rss_growth_mib']:.2f} MiB after warm-up; "
          f"fds {result['fds']}; "
          f"{result['pings_after']}/5 pings after")
    print("OK" if result["ok"] else "FAILED: " + "; ".join(result["problems"]))
    print(f"results: {path}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
