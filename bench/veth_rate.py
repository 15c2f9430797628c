"""Receive and transmit rate of one ``veth`` port, 64-byte frames (root; needs trafgen).

    .venv/bin/python bench/veth_rate.py [seconds]

Receive: ``trafgen`` (netsniff-ng) in the peer's namespace sends 64-byte frames; the
port drains its ring in batches of 32 and the script counts.  Transmit: the port
sends batches of 32 as fast as it can; the peer's ``rx_packets`` is the count.
Prints one line per direction: frames per second (what arrived, not what was offered)
and the CPU time per frame spent in receive()+release() or transmit().  The numbers
depend heavily on the machine's load: run it on a quiet machine and compare runs made
in the same session.
"""

from __future__ import annotations

import secrets
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyswitch.ports.veth import VethPort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stop_group

FRAME = bytes.fromhex("02000000cc0202000000cc0188b5") + b"A" * 46  # 60 bytes + FCS = 64


def peer_rx(ns: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/sys/class/net/eth0/statistics/rx_packets"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return int(out)


def bench_receive(port: VethPort, ns: str, seconds: float) -> None:
    conf = "{ 0x02,0,0,0,0xcc,0x01, 0x02,0,0,0,0xcc,0x02, 0x88,0xb5, fill(0x41, 46) }\n"
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as cfg:
        cfg.write(conf)
        cfg.flush()
        # one worker; leave host-wide socket and IRQ settings alone (trafgen's -q is not "quiet":
        # it is --qdisc-path, which this bench never meant)
        argv = ["ip", "netns", "exec", ns, "trafgen", "--dev", "eth0", "--conf", cfg.name,
                "--cpus", "1", "--no-sock-mem", "--notouch-irq", "--no-cpu-stats"]
        gen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        try:
            frames, busy, elapsed = receive_loop(port, seconds)
        finally:
            stop_group(gen)  # SIGTERM to trafgen and its forked worker
    per = busy / frames * 1e6 if frames else float("nan")
    print(
        f"veth receive:  {frames / elapsed / 1e3:7.0f} kpps  ({per:.2f} us/frame in "
        f"receive+release; ring drops {port.counters.drops.get('no_buffer', 0)})"
    )


def bench_transmit(port: VethPort, ns: str, seconds: float) -> None:
    batch = [FRAME] * 32
    before = peer_rx(ns)
    sent, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            sent += port.transmit(batch)
    elapsed = time.perf_counter() - start
    arrived = peer_rx(ns) - before
    print(
        f"veth transmit: {arrived / elapsed / 1e3:7.0f} kpps  ({elapsed / max(sent, 1) * 1e6:.2f}"
        f" us/frame in transmit; {sent} sent, {arrived} arrived)"
    )


def receive_loop(port, seconds: float) -> tuple[int, float, float]:
    """Receive batches from ``port`` for ``seconds``, waking on its fd: (frames, seconds
    spent in receive + release, seconds elapsed)."""
    poll = select.poll()
    port.attach(_Io(poll))
    frames, busy = 0, 0.0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if not poll.poll(100):
            continue
        t = time.perf_counter()
        got = port.receive(32)
        if got:
            port.release()
        busy += time.perf_counter() - t
        frames += len(got)
    return frames, busy, time.monotonic() - start


class _Io:
    """Just enough of PortIO for attach(): register the fd with a poll object."""

    def __init__(self, poll: select.poll) -> None:
        self._poll = poll

    def watch(self, fd: int, callback: object) -> None:
        self._poll.register(fd, select.POLLIN)

    def unwatch(self, fd: int) -> None:
        self._poll.unregister(fd)

    def rx_ready(self) -> None:
        pass


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    tag = secrets.token_hex(3)
    ns = f"pstb{tag}"
    port = VethPort(f"pstb{tag}", {"netns": ns, "peer-mac": "02:00:00:00:cc:02"})
    port.open()
    try:
        bench_transmit(port, ns, seconds)  # first: trafgen's workers linger a moment
        bench_receive(port, ns, seconds)
    finally:
        port.close()


if __name__ == "__main__":
    main()
