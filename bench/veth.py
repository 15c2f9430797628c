"""pyswitch between two network namespaces against the Linux bridge and a plain veth pair.

    sudo .venv/bin/python bench/veth.py [--seconds 5] [--reps 3] [--no-pin]

Three set-ups exist side by side, each with a sender namespace and a receiver namespace
(sender 10.77.0.1 / 02:77:00:00:00:01, receiver 10.77.0.2 / 02:77:00:00:00:02):
- pyswitch: `pyswitch up` of one bridge with two `veth` ports;
- linux bridge: the hosts' veth peers enslaved to `ip link add br0 type bridge` (in a
  namespace of its own);
- plain veth: the two hosts on the two ends of one veth pair (the ceiling: no switch).
Offloads are off on the hosts' interfaces in every set-up (pyswitch turns them off on its
peers, see ports/README.md), so all three carry the same frames.

UDP: `trafgen` in the sender sends 64-byte frames (60 + FCS) to the receiver's MAC as
fast as it can; the rate is the receiver's `rx_packets` over `--seconds`, after 0.5 s of
warm-up. The destination IP (10.77.0.99) is not the receiver's, so its stack drops the
frames without answering. TCP: `iperf3 -t SECONDS`, receiver-side bits/s; TCP runs come
first. Last, 5 pings through each path say whether it still forwards after the UDP flood.
Runs are interleaved (each rep measures every set-up) and summarised as median (range).
CPUs (default): the generators (trafgen, both iperf3 ends) on CPU 0, pyswitch on CPU 1;
the kernel's forwarding runs in the sender's softirq, on CPU 0. `--no-pin` pins nothing.
Everything is removed on exit, Ctrl-C or SIGTERM. Results: bench/out/veth-*.json.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Pyswitch,
    fmt,
    guard_signals,
    machine,
    need,
    run,
    save,
    si,
    stop_group,
    summary,
    table,
    tag,
    tempdir,
)

TX_MAC, RX_MAC = "02:77:00:00:00:01", "02:77:00:00:00:02"
TX_IP, RX_IP, SINK_IP = "10.77.0.1", "10.77.0.2", "10.77.0.99"
FRAME = 64  # bytes on the wire without preamble: 60 built by trafgen + 4 FCS
OFFLOADS = ["tx", "off", "sg", "off", "tso", "off", "gso", "off", "gro", "off"]
TRAFGEN_CONF = (  # 14 + 20 + 8 + 18 = 60 bytes
    f"{{ eth(da={RX_MAC}, sa={TX_MAC}), ipv4(saddr={TX_IP}, daddr={SINK_IP}, ttl=64), "
    "udp(sp=9, dp=9), fill(0, 18) }\n"
)


@dataclass
class Setup:
    """One path from a sender namespace to a receiver namespace."""

    name: str
    tx_ns: str
    rx_ns: str
    switch: Pyswitch | None = None  # the pyswitch instance behind it, if any


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def add_netns(stack: ExitStack, name: str) -> str:
    run("ip", "netns", "add", name)
    stack.callback(run, "ip", "netns", "del", name, check=False)
    run("ip", "-n", name, "link", "set", "lo", "up")
    return name


def configure_host(ns: str, mac: str, address: str) -> None:
    """The host end `eth0` in `ns`: MAC, address, offloads off, up."""
    run("ip", "-n", ns, "link", "set", "eth0", "address", mac)
    run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    run("ip", "netns", "exec", ns, "ethtool", "-K", "eth0", *OFFLOADS)
    run("ip", "-n", ns, "link", "set", "eth0", "up")


def plain_pair(stack: ExitStack, t: str) -> Setup:
    """Two namespaces joined by one veth pair."""
    a, b = add_netns(stack, f"{t}e"), add_netns(stack, f"{t}f")
    run("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
    configure_host(a, TX_MAC, TX_IP)
    configure_host(b, RX_MAC, RX_IP)
    return Setup("plain veth (ceiling)", a, b)


def linux_bridge(stack: ExitStack, t: str) -> Setup:
    """Two host namespaces, their veth peers on a Linux bridge in a third namespace."""
    a, b, s = add_netns(stack, f"{t}c"), add_netns(stack, f"{t}d"), add_netns(stack, f"{t}s")
    run("ip", "-n", s, "link", "add", "br0", "type", "bridge")
    for ns, mac, ip, port in ((a, TX_MAC, TX_IP, "p0"), (b, RX_MAC, RX_IP, "p1")):
        run("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
            "netns", s)
        run("ip", "netns", "exec", s, "ethtool", "-K", port, *OFFLOADS)
        run("ip", "-n", s, "link", "set", port, "master", "br0", "up")
        configure_host(ns, mac, ip)
    run("ip", "-n", s, "link", "set", "br0", "up")
    return Setup("linux bridge", a, b)


def pyswitch_bridge(stack: ExitStack, t: str, cpu: int | None, datapath: str | None = None,
                    name: str = "pyswitch", extra: tuple[str, ...] = (),
                    settings: dict | None = None) -> Setup:
    """`pyswitch up` with one bridge `<t>br` and two veth ports (pyswitch makes the
    namespaces); `datapath`, `extra` (more `pyswitch up` options) and the bridge's
    `settings` (e.g. mac_table_size) go to pyswitch as given."""
    a, b = f"{t}a", f"{t}b"
    ports = {
        port: {"type": "veth", "options": {"netns": port, "peer-mac": mac,
                                           "peer-address": f"{ip}/24"}}
        for port, mac, ip in ((a, TX_MAC, TX_IP), (b, RX_MAC, RX_IP))
    }
    topo = {"bridges": {f"{t}br": {"ports": ports, **(settings or {})}}}
    for ns in (a, b):  # pyswitch removes them on SIGTERM; this covers a SIGKILLed pyswitch
        stack.callback(run, "ip", "netns", "del", ns, check=False)
    sw = Pyswitch(stack, topo, cpu=cpu, datapath=datapath, extra=extra).start()
    return Setup(name, a, b, switch=sw)


def counter(ns: str, name: str) -> int:
    return int(run("ip", "netns", "exec", ns, "cat", f"/sys/class/net/eth0/statistics/{name}"))


def check_path(s: Setup) -> None:
    """Ping across (fills the MAC tables); RuntimeError if the path does not work."""
    run("ip", "netns", "exec", s.tx_ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", RX_IP,
        timeout=15)


def udp_rate(s: Setup, conf: Path, seconds: float, cpu: int | None) -> dict[str, float]:
    """trafgen flat out from the sender; received and offered frames per second."""
    # one worker; --no-sock-mem/--notouch-irq leave host-wide socket and IRQ settings alone
    argv = ["ip", "netns", "exec", s.tx_ns, "trafgen", "--dev", "eth0", "--conf", str(conf),
            "--cpus", "1", "--no-sock-mem", "--notouch-irq", "--no-cpu-stats"]
    # own session: SIGTERM reaches trafgen's forked workers too, and SIGINT may be ignored
    # when the bench runs as a background job (trafgen stops cleanly on SIGTERM)
    gen = subprocess.Popen(pinned(cpu, argv), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        rx0, tx0, t0 = counter(s.rx_ns, "rx_packets"), counter(s.tx_ns, "tx_packets"), \
            time.monotonic()
        time.sleep(seconds)
        rx1, tx1, t1 = counter(s.rx_ns, "rx_packets"), counter(s.tx_ns, "tx_packets"), \
            time.monotonic()
    finally:
        stop_group(gen)
    if gen.returncode not in (0, -signal.SIGTERM) and rx1 == rx0:
        raise RuntimeError(f"trafgen exited {gen.returncode} in {s.tx_ns}")
    return {"rx_pps": (rx1 - rx0) / (t1 - t0), "offered_pps": (tx1 - tx0) / (t1 - t0)}


def tcp_rate(s: Setup, seconds: float, cpu: int | None) -> float | None:
    """iperf3 from sender to receiver: the receiver's bits/s; None if the run failed (an
    iperf3 error, or no result `seconds` + 8 s after the start: TCP stalled)."""
    server = subprocess.Popen(
        pinned(cpu, ["ip", "netns", "exec", s.rx_ns, "iperf3", "-s", "-1", "-B", RX_IP]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while ":5201" not in run("ip", "netns", "exec", s.rx_ns, "ss", "-Hltn"):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"iperf3 server did not start in {s.rx_ns}")
            time.sleep(0.05)
        argv = pinned(cpu, ["ip", "netns", "exec", s.tx_ns, "iperf3", "-c", RX_IP,
                            "-t", str(int(seconds)), "--connect-timeout", "3000", "-J"])
        try:
            out = run(*argv, timeout=seconds + 8, check=False)
        except subprocess.TimeoutExpired:
            print(f"  iperf3 through {s.name}: no result in {seconds + 8:g} s", file=sys.stderr)
            return None
        try:
            return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])
        except (ValueError, KeyError):
            why = " ".join(out.split())[-300:] or "no output"
            print(f"  iperf3 through {s.name} failed: {why}", file=sys.stderr)
            return None
    finally:
        server.kill()
        server.wait(5)


def pings_after(s: Setup) -> int:
    """Replies to 5 pings (0.2 s apart, 1 s wait) from sender to receiver."""
    out = run("ip", "netns", "exec", s.tx_ns, "ping", "-c", "5", "-i", "0.2", "-W", "1", RX_IP,
              check=False, timeout=15)
    match = re.search(r"(\d+) received", out)
    return int(match.group(1)) if match else 0


def measure(setups: list[Setup], conf: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Interleaved reps of TCP, then of UDP, over every set-up, then 5 pings through each
    (does the path still forward after the flood?); {name: {"tcp", "udp", "pings_after"}}.
    TCP comes first so that a path the UDP flood leaves broken still gets its TCP figure."""
    gen_cpu = None if args.no_pin else 0
    raw: dict[str, dict] = {s.name: {"udp": [], "tcp": []} for s in setups}
    for rep in range(args.reps):
        for s in setups:
            bits = tcp_rate(s, args.seconds, gen_cpu)
            raw[s.name]["tcp"].append(bits)
            shown = "failed" if bits is None else si(bits, "bit/s")
            print(f"  rep {rep + 1} {s.name}: tcp {shown}", file=sys.stderr)
    for rep in range(args.reps):
        for s in setups:
            raw[s.name]["udp"].append(udp_rate(s, conf, args.seconds, gen_cpu))
            print(f"  rep {rep + 1} {s.name}: udp {si(raw[s.name]['udp'][-1]['rx_pps'], 'pps')}",
                  file=sys.stderr)
    time.sleep(1.0)
    for s in setups:
        raw[s.name]["pings_after"] = pings_after(s)
    return raw


def ratio(a: dict, b: dict) -> str:
    """Median of a over median of b, or '-' when either has no runs."""
    if not a["runs"] or not b["runs"] or not b["median"]:
        return "-"
    return f"{a['median'] / b['median']:.2f}"


def report(raw: dict[str, dict], args: argparse.Namespace) -> tuple[str, dict]:
    """The printed table and the JSON-able results."""
    res = {}
    for name, r in raw.items():
        pps = summary(x["rx_pps"] for x in r["udp"])
        res[name] = {"udp_rx_pps": pps,
                     "udp_rx_bits": summary(x["rx_pps"] * FRAME * 8 for x in r["udp"]),
                     "udp_offered_pps": summary(x["offered_pps"] for x in r["udp"]),
                     "tcp_bits": summary(b for b in r["tcp"] if b is not None),
                     "tcp_failed": sum(b is None for b in r["tcp"]),
                     "pings_after_udp": r["pings_after"]}
    ps = res["pyswitch"]
    rows = []
    for name, r in res.items():
        tcp = fmt(r["tcp_bits"], "bit/s") if r["tcp_bits"]["runs"] else "-"
        if r["tcp_failed"]:
            tcp += f", {r['tcp_failed']}/{args.reps} failed"
        rows.append([name, fmt(r["udp_rx_pps"], "pps"), fmt(r["udp_rx_bits"], "bit/s"),
                     si(r["udp_offered_pps"]["median"], "pps"), tcp,
                     ratio(ps["udp_rx_pps"], r["udp_rx_pps"]),
                     ratio(ps["tcp_bits"], r["tcp_bits"]), f"{r['pings_after_udp']}/5"])
    head = (f"veth: 64-byte UDP frames (trafgen) and TCP (iperf3), {args.seconds:g} s x "
            f"{args.reps} runs, median (min-max); CPUs: "
            + ("none pinned" if args.no_pin else "generators on 0, pyswitch on 1"))
    header = ["path", "UDP rx", "UDP rx (64 B)", "offered", "TCP", "pyswitch/this UDP",
              "pyswitch/this TCP", "pings after"]
    return head + "\n" + table(header, rows), res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time of one run")
    p.add_argument("--reps", type=int, default=3, help="runs of each measurement")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = p.parse_args()
    need("trafgen", "iperf3", "ethtool", "taskset", "ss")
    guard_signals()
    started = time.monotonic()
    info = machine()
    with ExitStack() as stack:
        t = tag()
        conf = tempdir(stack) / "udp64.cfg"
        conf.write_text(TRAFGEN_CONF)
        setups = [pyswitch_bridge(stack, t, None if args.no_pin else 1),
                  linux_bridge(stack, t), plain_pair(stack, t)]
        for s in setups:
            check_path(s)
        print(f"  set up in {time.monotonic() - started:.1f} s", file=sys.stderr)
        raw = measure(setups, conf, args)
        switch_stats = setups[0].switch.port_stats()
    text, res = report(raw, args)
    print(text)
    path = save("veth", {"machine": info, "args": vars(args), "results": res, "raw": raw,
                         "pyswitch_port_stats": switch_stats, "table": text,
                         "elapsed_s": time.monotonic() - started})
    print(f"({time.monotonic() - started:.0f} s; JSON: {path})")


if __name__ == "__main__":
    main()
