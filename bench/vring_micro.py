"""Split-ring work of one vhost-user port pair, both data paths: frames per second.

    .venv/bin/python bench/vring_micro.py [--seconds 1] [--runs 5] [--batch 32]

The loop of hot-path.md without the switching: one guest transmitq and one receiveq of
256 entries in one shared memfd mapping, no sockets, no peer.  Per batch, as the vhost-user
port calls the ring (``ports/vhostuser/base.py``): ``pop_frames`` (avail ring, descriptor,
bounds check, the frame copied out after its 12-byte header), ``put_used`` of those heads,
``fill_frames`` into the receiveq (MRG_RXBUF, header + frame into a 2048-byte buffer, used
ring, notify decision).  The "driver" side costs one 16-bit store per queue and batch: the
descriptors never change and the avail ring already names every head, so giving the
buffers back is only moving ``avail.idx`` on.

For each path (the Python reference ``virtqueue.Virtqueue``, the compiled
``pyswitch.fastpath._vring``) and frame size (64, 1518 bytes) it prints the median of
``--runs`` runs: Mpps and Gbit/s of frame bytes.  The machine is shared and noisy:
compare figures of one run, not across runs.  Nothing is left behind (memfds only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyswitch.ports.vhostuser.virtqueue import Virtqueue

from pyswitch import fastpath
from tests.vhost_frontend import DriverQueue, GuestRAM

RING = 256
HDR = 12


class Setup:
    """A transmitq full of ``size``-byte frames and a receiveq of 2048-byte buffers."""

    def __init__(self, cls: type, size: int) -> None:
        self.ram = GuestRAM([(0, 8 << 20)])
        self.mem = self.ram.mapped()
        self.tx, self.rx = DriverQueue(self.ram, RING), DriverQueue(self.ram, RING)
        frame = bytes([0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0]) + bytes(size - 14)
        for i in range(RING):
            buf = self.ram.alloc(HDR + size)
            self.ram.write(buf, bytes(HDR) + frame)
            self.tx.write_desc(i, buf, HDR + size, 0)
            self.rx.write_desc(i, self.ram.alloc(2048), 2048, 2)  # WRITE
        self.tx.make_available(list(range(RING)))
        self.rx.make_available(list(range(RING)))
        self.queues = []
        for dq in (self.tx, self.rx):
            a = dq.addr(0)
            self.queues.append(cls(self.mem, RING, a.desc, a.avail, a.used, event_idx=True))
        self.views = [self._u16(dq.avail + 2) for dq in (self.tx, self.rx)]

    def _u16(self, gpa: int) -> memoryview:
        r, off = self.ram._locate(gpa, 2)
        return memoryview(r.map)[off : off + 2].cast("H")

    def run(self, seconds: float, batch: int) -> tuple[int, float]:
        """Frames moved in about ``seconds``, and the time it took."""
        txq, rxq = self.queues
        tx_avail, rx_avail = self.views
        moved = 0
        start = time.perf_counter()
        end = start + seconds
        while True:
            for _ in range(64):
                frames: list = []
                heads: list[int] = []
                txq.pop_frames(batch, frames, heads, HDR)
                txq.put_used([(h, 0) for h in heads])
                res = rxq.fill_frames(frames, True, HDR)
                moved += res.sent
                # the driver gives the buffers back: every head is already on the ring
                tx_avail[0] = (tx_avail[0] + len(heads)) & 0xFFFF
                rx_avail[0] = (rx_avail[0] + res.taken) & 0xFFFF
            now = time.perf_counter()
            if now >= end:
                return moved, now - start

    def close(self) -> None:
        for v in self.views:
            v.release()
        self.queues.clear()
        self.mem.close()
        self.ram.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="length of one run")
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (median shown)")
    ap.add_argument("--batch", type=int, default=32, help="frames per pop/fill call")
    args = ap.parse_args()
    paths = {"python": Virtqueue, "compiled": fastpath.load_kernel("_vring").Virtqueue}
    print(f"ring {RING}, batch {args.batch}, median of {args.runs} x {args.seconds:g} s")
    print(f"{'path':<10}{'frame':>7}{'Mpps':>9}{'Gbit/s':>9}   runs (Mpps)")
    for size in (64, 1518):
        for name, cls in paths.items():
            setup = Setup(cls, size)
            try:
                rates = []
                for _ in range(args.runs):
                    moved, took = setup.run(args.seconds, args.batch)
                    rates.append(moved / took)
            finally:
                setup.close()
            mpps = statistics.median(rates) / 1e6
            print(f"{name:<10}{size:>7}{mpps:>9.2f}{mpps * size * 8 / 1e3:>9.1f}   "
                  + " ".join(f"{r / 1e6:.2f}" for r in rates))


if __name__ == "__main__":
    main()
