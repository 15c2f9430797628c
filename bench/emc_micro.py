"""Microbenchmark of one bridge's forwarding decision, both data paths, in process.

``Bridge.process`` on batches of 32 pre-built 64-byte UDP frames received on port 1
(no ports, no I/O: the decision alone), in µs per frame, for:

* NORMAL with the default rule only (known unicast, learned beforehand);
* through 1, 100 or 10,000 rules (``udp,tp_dst=N actions=NORMAL``, each matched);
* few distinct flows (1) or many (100,000 source ports: more keys than the compiled
  path's 65,536-entry cache holds, its worst case).

The Python path and the compiled path (the ``_emc`` kernel, built with
``setup.py build_ext --inplace``) run the same frames, interleaved per repetition.
Prints one table and writes bench/out/emc_micro-<stamp>.json.  No root needed::

    .venv/bin/python bench/emc_micro.py [--reps 3] [--frames 200000]
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, save, summary, table
from pyswitch.bridge import Bridge
from pyswitch.fastpath import load_kernel
from pyswitch.port import PortCounters
from pyswitch.vlan import PortVlan

BATCH = 32
A, B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def udp_frame(sport: int, dport: int) -> bytes:
    """A 64-byte (without FCS: 60) UDP/IPv4 frame from A to B."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 46, 0, 0, 64, 17, 0, bytes([10, 0, 0, 1]),
                     bytes([10, 0, 0, 2]))
    udp = struct.pack("!HHHH", sport, dport, 26, 0)
    return B + A + b"\x08\x00" + ip + udp + bytes(18)


def bridge(kernel, rules: int) -> Bridge:
    br = Bridge("br0", kernel=kernel)
    for no in (1, 2, 3):
        br.add_port(no, f"p{no}", PortVlan.make(), PortCounters())
    if rules:
        texts = [f"priority={n + 1},udp,tp_dst={n} actions=NORMAL" for n in range(rules)]
        br.set_flows(["priority=0 actions=NORMAL", *texts], now=0)
    br.process(2, [B + A + b"\x08\x00" + bytes(46)], now=0)  # learn B on port 2
    br.process(1, [A + B + b"\x08\x00" + bytes(46)], now=0)  # learn A on port 1
    return br


def batches(rules: int, flows: int, total: int) -> list[list[bytes]]:
    """``total`` frames in batches; ``flows`` distinct keys, cycling."""
    distinct = [udp_frame(1024 + (i % 60000), (i // 60000 + i) % max(rules, 1)) for i in range(flows)]
    frames = [distinct[i % flows] for i in range(total)]
    return [frames[i : i + BATCH] for i in range(0, total, BATCH)]


def us_per_frame(br: Bridge, work: list[list[bytes]]) -> float:
    n = sum(map(len, work))
    process = br.process
    t0 = time.perf_counter()
    for b in work:
        process(1, b, 1.0)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--frames", type=int, default=200_000, help="frames per measurement")
    args = ap.parse_args()
    kernel = load_kernel("_emc")
    cases = [("default NORMAL", 0, 1), ("default NORMAL", 0, 100_000),
             ("1 rule", 1, 1), ("100 rules", 100, 1), ("10,000 rules", 10_000, 1),
             ("1 rule", 1, 100_000), ("10,000 rules", 10_000, 100_000)]
    rows, results = [], []
    for name, rules, flows in cases:
        work = batches(rules, flows, max(args.frames, 2 * flows))
        got: dict[str, list[float]] = {"python": [], "compiled": []}
        bridges = {"python": bridge(None, rules), "compiled": bridge(kernel, rules)}
        for path, br in bridges.items():  # warm: caches filled, the first misses paid
            us_per_frame(br, work[: max(1, flows // BATCH + 1)])
        for _ in range(args.reps):
            for path, br in bridges.items():
                got[path].append(us_per_frame(br, work))
        py, c = summary(got["python"]), summary(got["compiled"])
        hits = bridges["compiled"].stats.flow_cache_hits
        rows.append([name, f"{flows:,}", f"{py['median']:.3f}", f"{c['median']:.3f}",
                     f"{py['median'] / c['median']:.1f}x", f"{1 / c['median']:.2f}"])
        results.append({"case": name, "rules": rules, "flows": flows, "python_us": py,
                        "compiled_us": c, "compiled_flow_cache_hits": hits})
        print(f"  {name}, {flows:,} flows: python {py['median']:.3f} us, compiled {c['median']:.3f} us",
              file=sys.stderr)
    print(table(["case", "distinct flows", "python us/frame", "compiled us/frame", "speed-up",
                 "compiled Mpps"], rows))
    path = save("emc_micro", {"machine": machine(), "batch": BATCH, "frames": args.frames,
                              "reps": args.reps, "results": results})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
