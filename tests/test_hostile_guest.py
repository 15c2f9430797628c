"""Hostile guests on a live ring: a vhost-user port in a running switch, on both data paths.

The guest (tests/vhost_frontend.py, negotiated over the port's real socket) writes broken
descriptor chains into its own rings -- addresses outside guest memory or straddling a
region's end, loops, chains longer than the ring, nested or out-of-range indirect tables,
zero-length and too-small receive buffers, avail indexes that jump by more than the ring
size, frames above the MTU -- next to good ones.  Each must be dropped and counted, the
good chains served, and the switch must keep forwarding between its other ports.

"Nothing written outside the guest's own buffers": all guest memory is painted with a
canary pattern before the rings are laid out; after the switch worked, every byte that
changed must lie in a used ring or in a buffer the guest offered as device-writable.

Every test runs once per data path (``datapath`` fixture, tests/datapaths.py): the
switch is built after the path is selected, so its rings, exact-match cache and packet
I/O are the compiled kernel's on ``compiled``.  That variant fails while the kernel is
not built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pyswitch.ports.vhostuser import protocol as p
from pyswitch.ports.vhostuser.device import OFFERED_FEATURES, VIRTIO_NET_F_MRG_RXBUF

from tests.netns_util import wait_until
from tests.vhost_frontend import DESC, F_INDIRECT, F_NEXT, F_WRITE, DriverQueue, Frontend, GuestRAM

pytest.register_assert_rewrite("tests.vhost_live")
from tests.vhost_live import A_MAC, B_MAC, BROADCAST, LiveSwitch

N = 16  # ring size
R0, R1 = (0, 1 << 20), (0x4000_0000, 64 << 10)  # guest memory: (gpa, size) of two regions
CANARY = 0xA5
FRAME = A_MAC + b"\x02\x00\x00\x00\x00\x77\x08\x00" + bytes(range(100))  # guest -> a


class Guest:
    """A guest on a live port, with painted memory and one queue pair of ``N``."""

    def __init__(self, live: LiveSwitch, features: int = OFFERED_FEATURES) -> None:
        self.live = live
        self.ram = GuestRAM([R0, R1])
        for r in self.ram.regions:
            r.map[:] = bytes([CANARY]) * len(r.map)
        self.rxq, self.txq = DriverQueue(self.ram, N), DriverQueue(self.ram, N)
        for q in (self.rxq, self.txq):  # the rings start zeroed, as a driver sets them up
            self.ram.write(q.desc, bytes(16 * N))
            self.ram.write(q.avail, bytes(6 + 2 * N))
            self.ram.write(q.used, bytes(6 + 8 * N))
        self.writable: list[tuple[int, int]] = []  # buffers offered to the device to write
        self.fe = Frontend.connect(live.path)
        self.fe.negotiate(features)
        self.fe.set_mem_table(self.ram)
        self.fe.setup_ring(0, self.rxq)
        self.fe.setup_ring(1, self.txq)
        self.port = live.port
        self.fe.kick(0)  # the receiveq starts on its first kick
        assert wait_until(lambda: self.port.device.rings[0].started)  # type: ignore[attr-defined]

    def buf(self, size: int, fill: int = CANARY) -> int:
        gpa = self.ram.alloc(size)
        self.ram.write(gpa, bytes([fill]) * size)
        return gpa

    def desc(self, q: DriverQueue, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             table: int | None = None) -> None:
        """Write a descriptor; remember device-writable buffers as the guest's own."""
        q.write_desc(i, addr, length, flags, nxt, table=table)
        if table is None and i in q.free:  # the driver's bookkeeping: not free any more
            q.free.remove(i)
        if flags & F_WRITE and not flags & F_INDIRECT:
            self.writable.append((addr, length))

    def snapshot(self) -> list[bytes]:
        return [bytes(r.map) for r in self.ram.regions]

    def assert_only_own_buffers_changed(self, before: list[bytes]) -> None:
        allowed = [(q.used, 6 + 8 * N) for q in (self.rxq, self.txq)] + self.writable
        bad = []
        for r, old in zip(self.ram.regions, before):
            new = bytes(r.map)
            for off in range(0, len(new), 4096):
                if new[off : off + 4096] == old[off : off + 4096]:
                    continue
                for k in range(off, min(off + 4096, len(new))):
                    gpa = r.gpa + k
                    if new[k] != old[k] and not any(a <= gpa < a + n for a, n in allowed):
                        bad.append(hex(gpa))
        assert not bad, f"the switch wrote outside the guest's buffers at {bad[:8]} ({len(bad)} bytes)"

    def __repr__(self) -> str:  # for failure messages
        return (f"port counters {self.port.counters.as_dict()}, "  # type: ignore[attr-defined]
                f"rx used {self.rxq.used_idx()}, tx used {self.txq.used_idx()}")

    def drops(self, reason: str) -> int:
        return self.port.counters.drops.get(reason, 0)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.fe.close()
        self.ram.close()


def live_guest(datapath: str, tmp_path: Path, features: int = OFFERED_FEATURES) -> Iterator[Guest]:
    """A switch built on ``datapath`` with a guest attached; both closed afterwards."""
    live = LiveSwitch(tmp_path)
    g = None
    try:
        g = Guest(live, features)
        impl = type(g.port.device.rings[0].queue).__module__  # type: ignore[attr-defined]
        assert ("_vring" in impl) == (datapath == "compiled"), f"{datapath} path runs {impl}"
        yield g
        live.assert_healthy()
    finally:
        if g is not None:
            g.close()
        live.close()


@pytest.fixture
def guest(datapath: str, tmp_path: Path) -> Iterator[Guest]:
    yield from live_guest(datapath, tmp_path)


def to_guest(live: LiveSwitch, n: int, size: int = 60) -> None:
    """``n`` broadcast frames from b: flooded to a and to the guest."""
    live.sw.port("b").inject([BROADCAST + B_MAC + b"\x08\x00" + bytes(size - 14)] * n)  # type: ignore[attr-defined]


# -- broken chains: each builder writes one into queue q and returns its head -----------------

def _outside(g: Guest, q: DriverQueue, w: int) -> int:
    g.desc(q, 0, 0x9000_0000, 200, w)
    return 0


def _straddles_region_end(g: Guest, q: DriverQueue, w: int) -> int:
    g.desc(q, 0, R1[0] + R1[1] - 60, 200, w)  # 60 bytes inside region 1, 140 past its end
    return 0


def _wraps(g: Guest, q: DriverQueue, w: int) -> int:
    g.desc(q, 0, 2**64 - 16, 200, w)
    return 0


def _loop(g: Guest, q: DriverQueue, w: int) -> int:
    b = g.buf(64)
    g.desc(q, 0, b, 8, w | F_NEXT, 1)
    g.desc(q, 1, b + 8, 8, w | F_NEXT, 0)
    return 0


def _next_out_of_range(g: Guest, q: DriverQueue, w: int) -> int:
    g.desc(q, 0, g.buf(64), 8, w | F_NEXT, 999)
    return 0


def _longer_than_ring(g: Guest, q: DriverQueue, w: int) -> int:
    """An indirect table of 4 * N one-byte pieces: a chain longer than the ring."""
    b, table = g.buf(4 * N), g.ram.alloc(16 * 4 * N)
    for k in range(4 * N):
        g.desc(q, k, b + k, 1, w | (F_NEXT if k < 4 * N - 1 else 0), k + 1, table=table)
    g.desc(q, 0, table, 16 * 4 * N, F_INDIRECT)
    return 0


def _nested_indirect(g: Guest, q: DriverQueue, w: int) -> int:
    inner, outer = g.ram.alloc(16), g.ram.alloc(16)
    g.desc(q, 0, g.buf(256), 256, w, table=inner)
    g.desc(q, 0, inner, 16, F_INDIRECT, table=outer)
    g.desc(q, 0, outer, 16, F_INDIRECT)
    return 0


def _indirect_outside(g: Guest, q: DriverQueue, w: int) -> int:
    g.desc(q, 0, 0x9000_0000, 32, F_INDIRECT)
    return 0


def _indirect_next_out_of_range(g: Guest, q: DriverQueue, w: int) -> int:
    table = g.ram.alloc(32)
    g.desc(q, 0, g.buf(64), 8, w | F_NEXT, 7, table=table)  # the table has 2 entries
    g.desc(q, 1, g.buf(64), 64, w, table=table)
    g.desc(q, 0, table, 32, F_INDIRECT)
    return 0


def _zero_length(g: Guest, q: DriverQueue, w: int) -> int:
    g.desc(q, 0, g.buf(64), 0, w)
    return 0


BROKEN: dict[str, Callable[[Guest, DriverQueue, int], int]] = {
    "outside_memory": _outside, "straddles_region_end": _straddles_region_end,
    "wrapping_address": _wraps, "loop": _loop, "next_out_of_range": _next_out_of_range,
    "longer_than_ring": _longer_than_ring, "nested_indirect": _nested_indirect,
    "indirect_outside_memory": _indirect_outside,
    "indirect_next_out_of_range": _indirect_next_out_of_range, "zero_length": _zero_length,
}


@pytest.mark.parametrize("build", BROKEN)
def test_broken_transmit_chain(guest: Guest, build: str) -> None:
    """Guest -> switch: the broken chain is dropped, counted and returned; the good one
    behind it is forwarded; only the used ring changed."""
    g, live = guest, guest.live
    bad = BROKEN[build](g, g.txq, 0)
    g.txq.make_available([bad])
    good = g.txq.send_frame(FRAME)
    a = live.sw.port("a")
    before, snap, drops = a.counters.tx_packets, g.snapshot(), g.drops("bad_descriptor")
    g.fe.kick(1)
    assert wait_until(lambda: a.counters.tx_packets == before + 1), "the good frame was not forwarded"
    assert wait_until(lambda: g.drops("bad_descriptor") == drops + 1), "the broken chain was not counted"
    assert wait_until(lambda: g.txq.used_idx() == 2)
    assert sorted(h for h, _ in g.txq.take_used()) == sorted([bad, good])  # both given back
    assert g.port.device.rings[1].started  # type: ignore[attr-defined]
    g.assert_only_own_buffers_changed(snap)
    assert live.forwards()


@pytest.mark.parametrize("build", [*(b for b in BROKEN if b != "zero_length"), "read_only"])
def test_broken_receive_chain(guest: Guest, build: str) -> None:
    """Switch -> guest: the broken buffer costs one frame (dropped, counted, the buffer
    returned), the next frame goes into the good buffer behind it; nothing outside the
    guest's writable buffers and used ring changed."""
    _broken_receive_chain(guest, build)


@pytest.mark.parametrize("build", ["zero_length", "too_small"])
def test_receive_buffer_smaller_than_the_header(guest: Guest, build: str) -> None:
    """With MRG_RXBUF every receive buffer must hold at least the virtio-net header
    (virtio 1.2, 5.1.6.3.1); a zero-length or 8-byte buffer is a broken guest: dropped
    and counted like any bad chain (issue 8), not used for the first bytes of a header
    split over two buffers."""
    _broken_receive_chain(guest, build)


def _broken_receive_chain(g: Guest, build: str) -> None:
    live = g.live
    if build == "too_small":  # smaller than the virtio-net header, no next buffer
        g.desc(g.rxq, 0, g.buf(64), 8, F_WRITE)
        bad = 0
    elif build == "read_only":
        g.desc(g.rxq, 0, g.buf(256), 256, 0)
        bad = 0
    else:
        bad = BROKEN[build](g, g.rxq, F_WRITE)
    g.rxq.make_available([bad])
    (good,) = g.rxq.post_rx_buffers(1, size=2048)
    g.writable.append(_chain_buffer(g.rxq, good))
    snap, drops = g.snapshot(), g.drops("bad_descriptor")
    to_guest(live, 1)
    assert wait_until(lambda: g.drops("bad_descriptor") == drops + 1), f"not counted: {g}"
    to_guest(live, 1)
    assert wait_until(lambda: g.rxq.used_idx() == 2), "the good buffer was not filled"
    used = dict(g.rxq.take_used())
    assert used[bad] == 0 and used[good] == 12 + 60
    g.assert_only_own_buffers_changed(snap)
    assert live.forwards()


def _chain_buffer(q: DriverQueue, head: int) -> tuple[int, int]:
    """(gpa, len) of the single buffer at ``head``."""
    addr, length, _flags, _nxt = DESC.unpack(q.ram.read(q.desc + 16 * head, 16))
    return addr, length


# -- sizes: too-small buffers without MRG_RXBUF, frames above the MTU ------------------------

@pytest.fixture
def plain_guest(datapath: str, tmp_path: Path) -> Iterator[Guest]:
    """A guest that did not negotiate mergeable receive buffers."""
    yield from live_guest(datapath, tmp_path, OFFERED_FEATURES & ~VIRTIO_NET_F_MRG_RXBUF)


def test_receive_buffers_too_small_for_the_frame(plain_guest: Guest) -> None:
    """Without MRG_RXBUF a frame must fit one chain: 128-byte buffers cannot take a
    300-byte frame.  Dropped and counted; the buffer is given back unwritten."""
    g, live = plain_guest, plain_guest.live
    heads = g.rxq.post_rx_buffers(2, size=128)
    for h in heads:
        g.writable.append(_chain_buffer(g.rxq, h))
    snap, before = g.snapshot(), g.port.counters.tx_dropped  # type: ignore[attr-defined]
    to_guest(live, 1, size=300)
    assert wait_until(lambda: g.port.counters.tx_dropped == before + 1), g  # type: ignore[attr-defined]
    assert g.port.counters.tx_packets == 0  # type: ignore[attr-defined]
    assert g.rxq.take_used() == [(heads[0], 0)]  # returned empty
    for h in heads:  # not a byte of the frame in the buffers
        addr, length = _chain_buffer(g.rxq, h)
        assert g.ram.read(addr, length) == bytes([CANARY]) * length
    g.assert_only_own_buffers_changed(snap)
    to_guest(live, 1, size=60)  # a frame that fits still goes into the second buffer
    assert wait_until(lambda: g.port.counters.tx_packets == 1), g  # type: ignore[attr-defined]
    assert g.rxq.take_used() == [(heads[1], 12 + 60)]


def test_frames_above_the_mtu_both_directions(guest: Guest) -> None:
    """The port's MTU is 1500: a 1600-byte frame from the guest is not forwarded and one
    for the guest is not written into its buffers; both counted as ``mtu`` drops."""
    g, live = guest, guest.live
    a = live.sw.port("a")
    big = FRAME[:14] + bytes(1600)
    g.txq.send_frame(big)
    g.txq.send_frame(FRAME)
    heads = g.rxq.post_rx_buffers(2, size=2048)
    for h in heads:
        g.writable.append(_chain_buffer(g.rxq, h))
    g.writable.clear()  # an oversized frame must not touch even the guest's buffers
    snap, before = g.snapshot(), a.counters.tx_packets
    g.fe.kick(1)
    assert wait_until(lambda: a.counters.tx_packets == before + 1)
    assert wait_until(lambda: g.drops("mtu") == 1)
    to_guest(live, 1, size=1600 + 14)
    assert wait_until(lambda: g.drops("mtu") == 2)
    assert g.rxq.used_idx() == 0
    # the guest's receive buffers were not written: only the transmitq's used ring changed
    g.assert_only_own_buffers_changed(snap)


# -- avail index jumps ------------------------------------------------------------------------

@pytest.mark.parametrize("ring", [0, 1], ids=["receiveq", "transmitq"])
def test_avail_index_jumping_more_than_the_ring_size(guest: Guest, ring: int) -> None:
    """An avail index N+5 ahead of the device is corrupt: that ring is stopped and counted
    (broken_rings); no descriptor is read, no byte written; the switch forwards on."""
    g, live = guest, guest.live
    q = g.rxq if ring == 0 else g.txq
    g.ram.write_u16(q.avail + 2, N + 5)
    snap, broken = g.snapshot(), live.stat("broken_rings")
    if ring == 0:
        to_guest(live, 1)
    else:
        g.fe.kick(1)
    assert wait_until(lambda: live.stat("broken_rings") == broken + 1)
    assert not g.port.device.rings[ring].started  # type: ignore[attr-defined]
    g.writable.clear()
    g.assert_only_own_buffers_changed(snap)
    to_guest(live, 3)  # the other ring and the other ports carry on
    assert live.forwards()


# -- ring addresses: checked when the ring is built, by either path's ring ------------------

@pytest.mark.parametrize("part", ["desc", "avail", "used"])
@pytest.mark.parametrize("where", ["straddles_region_end", "outside_memory"])
def test_ring_addresses_outside_guest_memory(datapath: str, tmp_path: Path, part: str,
                                             where: str) -> None:
    """A ring whose descriptor table, avail or used ring is not inside one region never
    starts, on either path's ring: refused, logged, counted; the port stays connected."""
    live = LiveSwitch(tmp_path)
    ram = GuestRAM([R0])
    fe = None
    try:
        fe = Frontend.connect(live.path)
        fe.negotiate()
        fe.set_mem_table(ram)
        q = DriverQueue(ram, N)
        a = q.addr(1)
        fields = {"desc": a.desc, "avail": a.avail, "used": a.used}
        end = ram.regions[0].uva + R0[1]
        fields[part] = end - 4 if where == "straddles_region_end" else 0xDEAD_0000_0000
        errors = live.stat("protocol_errors")
        fe.request(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(1, N))
        fe.request(p.Request.SET_VRING_ADDR, p.VRING_ADDR.pack(
            1, 0, fields["desc"], fields["used"], fields["avail"], 0))
        fe.request(p.Request.SET_VRING_KICK, p.U64.pack(1 | p.VRING_NOFD_MASK))  # starts at once
        assert wait_until(lambda: live.stat("protocol_errors") == errors + 1)
        assert not live.port.device.rings[1].started  # type: ignore[attr-defined]
        assert live.port.conn is not None  # type: ignore[attr-defined]
        assert live.forwards()
        live.assert_healthy()
    finally:
        if fe is not None:
            fe.close()
        ram.close()
        live.close()
