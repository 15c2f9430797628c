"""Packet I/O of one port, both data paths: frames per second in and out (root; trafgen).

    .venv/bin/python bench/pktio_micro.py [seconds]

For each path (the Python reference, the compiled ``_pktio`` kernel) and each port type:

* **veth receive**: ``trafgen`` (netsniff-ng, one CPU) in the peer's namespace floods
  64-byte frames; the port drains its ring in batches of 32 while the fd is readable.
* **veth transmit**: the port sends batches of 32 64-byte frames as fast as it can; the
  peer's ``rx_packets`` counts what arrived.
* **TAP receive**: ``trafgen`` sends 64-byte frames out of the TAP device (host side);
  the port reads them from its fd.
* **TAP transmit**: the port writes batches of 32; the TAP's ``rx_packets`` counts them.
* **lone frame**: one frame at a time sent from the peer's namespace (a packet socket,
  3-8 ms apart), the time until the port has received it: p50 and p99 in µs.
* **ping RTT**: two veth ports forwarded to each other by this script (poll, receive,
  transmit: no bridge); ``ping`` between their namespaces, 200 echoes 10 ms apart.  The
  TPACKET_V3 ring hands a block over when it is full or its timer (1 ms) fires, so a lone
  frame can wait up to that long: this row shows what that costs.

Three columns: the Python path, the compiled path with its default ``TPACKET_V3`` ring, and
the compiled path with its ``TPACKET_V2`` reader (``afpacket.COMPILED_TPACKET = 2``; TAP
is the same code in both compiled columns).

``--tx-ring`` instead compiles (gcc) and runs a small C sender that compares, on a veth,
one ``send()`` per frame with a ``TPACKET_V2`` TX ring flushed by one ``sendto()`` per 32
frames: the measurement behind the kernel's choice of a ``write()`` loop.

Prints one table: kpps and the CPU time per frame spent in the port calls.  The machine
is shared and noisy: compare figures of one run, not across runs.  Everything made
(namespaces, links, trafgen) is removed at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pyswitch.ports import afpacket
from pyswitch.ports.tap import TapPort
from pyswitch.ports.veth import VethPort

from pyswitch import fastpath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stop_group
from veth_rate import FRAME, _Io, receive_loop

TRAFGEN_CONF = "{ 0x02,0,0,0,0xcc,0x01, 0x02,0,0,0,0xcc,0x02, 0x88,0xb5, fill(0x41, 46) }\n"


def sysfs_packets(ifname: str, which: str, ns: str | None = None) -> int:
    argv = (["ip", "netns", "exec", ns] if ns else []) + [
        "cat", f"/sys/class/net/{ifname}/statistics/{which}"]
    return int(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout)


@contextlib.contextmanager
def trafgen(dev: str, ns: str | None) -> Iterator[None]:
    """trafgen flooding 64-byte frames out of ``dev`` (in ``ns``) until the block ends."""
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as cfg:
        cfg.write(TRAFGEN_CONF)
        cfg.flush()
        argv = (["ip", "netns", "exec", ns] if ns else []) + [
            "trafgen", "--dev", dev, "--conf", cfg.name, "--cpus", "1", "--no-sock-mem",
            "--notouch-irq", "--no-cpu-stats"]
        gen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        try:
            yield
        finally:
            stop_group(gen)


def receive_rate(port: VethPort | TapPort, dev: str, ns: str | None, seconds: float) -> tuple[float, float]:
    """(kpps received, µs of CPU per frame in receive+release) under a trafgen flood."""
    with trafgen(dev, ns):
        frames, busy, elapsed = receive_loop(port, seconds)
    return frames / elapsed / 1e3, busy / frames * 1e6 if frames else float("nan")


def transmit_rate(port: VethPort | TapPort, count: object, seconds: float) -> tuple[float, float]:
    """(kpps that arrived, µs per frame in transmit) sending batches of 32 for ``seconds``."""
    batch = [FRAME] * 32
    before = count()  # type: ignore[operator]
    sent, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            sent += port.transmit(batch)
    elapsed = time.perf_counter() - start
    arrived = count() - before  # type: ignore[operator]
    return arrived / elapsed / 1e3, elapsed / max(sent, 1) * 1e6


def ping_rtt(pktio: object, count: int = 200) -> tuple[float, float]:
    """(p50, p99) ping RTT in µs between two namespaces whose veth ports this loop wires."""
    tag = secrets.token_hex(3)
    ports = [VethPort(f"pstl{tag}{x}", {"netns": f"pstl{tag}{x}",
                                        "peer-address": f"10.213.0.{i}/24"},
                      pktio=pktio)  # type: ignore[arg-type]
             for i, x in ((1, "a"), (2, "b"))]
    with contextlib.ExitStack() as stack:
        for port in ports:
            stack.callback(port.close)
            port.open()
        poll = select.poll()
        by_fd = {}
        for port in ports:
            port.attach(_Io(poll))  # type: ignore[arg-type]
            by_fd[port._ring.fileno()] = port  # type: ignore[union-attr]
        ping = subprocess.Popen(["ip", "netns", "exec", f"pstl{tag}a", "ping", "-n", "-c",
                                 str(count), "-i", "0.01", "10.213.0.2"],
                                stdout=subprocess.PIPE, text=True)
        stack.callback(ping.kill)
        while ping.poll() is None:
            for fd, _ in poll.poll(50):
                src = by_fd[fd]
                frames = src.receive(32)
                if frames:
                    for dst in ports:
                        if dst is not src:
                            dst.transmit(frames)
                    src.release()
        out = ping.stdout.read() if ping.stdout else ""
    rtts = sorted(float(t) * 1e3 for t in re.findall(r"time=([\d.]+) ms", out))
    if not rtts:
        return float("nan"), float("nan")
    return rtts[len(rtts) // 2], rtts[min(len(rtts) - 1, len(rtts) * 99 // 100)]


def lone_frame_latency(port: VethPort, ns: str, count: int = 200) -> tuple[float, float]:
    """(p50, p99) µs from send() in ``ns`` to the frame returned by ``port.receive``."""
    from pyroute2 import netns as pr_netns  # the bench's only use of a socket in a namespace

    sock = pr_netns.create_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    waits = []
    try:
        sock.bind(("eth0", 0))
        for i in range(count):
            start = time.perf_counter()
            sock.send(FRAME)
            got = 0
            while not got and time.perf_counter() - start < 1:
                select.select([port._ring.fileno()], [], [], 0.1)  # type: ignore[union-attr]
                got = len(port.receive(32))
                port.release()
            waits.append((time.perf_counter() - start) * 1e6)
            time.sleep(0.003 + (i % 11) * 0.0005)
    finally:
        sock.close()
    waits.sort()
    return waits[len(waits) // 2], waits[len(waits) * 99 // 100]


def run_path(pktio: object, seconds: float) -> dict[str, tuple[float, float]]:
    tag = secrets.token_hex(3)
    out = {}
    ns = f"pstm{tag}"
    veth = VethPort(f"pstm{tag}", {"netns": ns, "peer-mac": "02:00:00:00:cc:02"},
                    pktio=pktio)  # type: ignore[arg-type]
    veth.open()
    try:
        out["veth transmit"] = transmit_rate(veth, lambda: sysfs_packets("eth0", "rx_packets", ns),
                                             seconds)
        out["veth receive"] = receive_rate(veth, "eth0", ns, seconds)
        out["lone frame p50/99"] = lone_frame_latency(veth, ns)
    finally:
        veth.close()
    tap = TapPort(f"pstt{tag}", {}, pktio=pktio)  # type: ignore[arg-type]
    tap.open()
    try:
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{tap.ifname}.disable_ipv6=1"], check=False)
        out["TAP transmit"] = transmit_rate(tap, lambda: sysfs_packets(tap.ifname, "rx_packets"),
                                            seconds)
        out["TAP receive"] = receive_rate(tap, tap.ifname, None, seconds)
    finally:
        tap.close()
    out["ping RTT p50/p99"] = ping_rtt(pktio)
    return out


TX_BENCH_C = r"""
#include <linux/if_packet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
                          return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {  /* IFACE send|ring N: 64-byte frames, prints us/frame */
    long n = atol(argv[3]), sent = 0;
    unsigned char fr[60] = {2, 0, 0, 0, 0xcc, 2, 2, 0, 0, 0, 0xcc, 1, 0x88, 0xb5};
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_ifindex = if_nametoindex(argv[1])};
    double t0;
    if (!strcmp(argv[2], "send")) {
        bind(fd, (void *)&sll, sizeof sll);
        t0 = now();
        for (long i = 0; i < n; i++) sent += send(fd, fr, 60, MSG_DONTWAIT) == 60;
    } else {
        int v = TPACKET_V2;
        struct tpacket_req req = {1 << 16, 4, 2048, 128};
        setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v, sizeof v);
        if (setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &req, sizeof req)) return 1;
        char *ring = mmap(0, 4 << 16, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        bind(fd, (void *)&sll, sizeof sll);
        unsigned cur = 0;
        t0 = now();
        for (long i = 0; i < n;) {
            for (int b = 0; b < 32 && i < n; b++, i++) {
                struct tpacket2_hdr *h = (void *)(ring + cur * 2048);
                if (__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) != TP_STATUS_AVAILABLE)
                    continue;
                memcpy((char *)h + TPACKET2_HDRLEN - sizeof(struct sockaddr_ll), fr, 60);
                h->tp_len = 60;
                __atomic_store_n(&h->tp_status, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
                cur = (cur + 1) % 128;
                sent++;
            }
            sendto(fd, NULL, 0, MSG_DONTWAIT, NULL, 0);
        }
    }
    printf("%.2f %ld\n", (now() - t0) / sent * 1e6, sent);
    return 0;
}
"""


def tx_ring_vs_send(runs: int = 3, frames: int = 300_000) -> None:
    """The C comparison of ``send()`` per frame and a TX ring (module docstring)."""
    tag = secrets.token_hex(3)
    ns, dev = f"pstr{tag}", f"pstr{tag}"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        src, exe = os.path.join(tmp, "tx.c"), os.path.join(tmp, "tx")
        Path(src).write_text(TX_BENCH_C)
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        stack.callback(subprocess.run, ["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", "eth0",
                        "netns", ns], check=True)
        stack.callback(subprocess.run, ["ip", "link", "del", dev], check=False,
                       capture_output=True)
        subprocess.run(["ip", "link", "set", dev, "up"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        for mode in ("send", "ring") * runs:
            us, sent = subprocess.run([exe, dev, mode, str(frames)], capture_output=True,
                                      text=True, check=True).stdout.split()
            print(f"{mode:5} {float(us):6.2f} us/frame ({sent} frames)")


def main() -> None:
    if "--tx-ring" in sys.argv:
        tx_ring_vs_send()
        return
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    kern = fastpath.load_kernel("_pktio")
    paths = {"python": (None, 3), "compiled": (kern, 3), "compiled V2": (kern, 2)}
    results = {}
    for name, (mod, tpacket) in paths.items():
        afpacket.COMPILED_TPACKET = tpacket  # the ring VethPort's open() takes
        results[name] = run_path(mod, seconds)
    print(f"\n64-byte frames     {'python':>16} {'compiled (V3)':>16} {'compiled V2':>16}"
          "   kpps and us/frame; p50/p99 rows: us")
    for what in results["python"]:
        cells = "".join(f" {results[p][what][0]:8.0f} {results[p][what][1]:7.2f}" for p in paths)
        print(f"{what:17}{cells}")


if __name__ == "__main__":
    main()
