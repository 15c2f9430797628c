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

Prints one table: kpps and the CPU time per frame spent in the port calls.  The machine
is shared and noisy: compare figures of one run, not across runs.  Everything made
(namespaces, links, trafgen) is removed at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pyswitch.ports.tap import TapPort
from pyswitch.ports.veth import VethPort

from pyswitch import fastpath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import stop_group
from veth_rate import FRAME, _Io

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
    poll = select.poll()
    port.attach(_Io(poll))  # type: ignore[arg-type]
    with trafgen(dev, ns):
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
        elapsed = time.monotonic() - start
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
    return out


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    paths = {"python": None, "compiled": fastpath.load_kernel("_pktio")}
    results = {name: run_path(mod, seconds) for name, mod in paths.items()}
    print(f"\n{'64-byte frames':16} {'python kpps':>12} {'us/frame':>9} {'compiled kpps':>14} "
          f"{'us/frame':>9} {'ratio':>6}")
    for what in results["python"]:
        (pk, pu), (ck, cu) = results["python"][what], results["compiled"][what]
        print(f"{what:16} {pk:12.0f} {pu:9.2f} {ck:14.0f} {cu:9.2f} {ck / pk if pk else 0:6.2f}")


if __name__ == "__main__":
    main()
