"""The compiled split virtqueue (``pyswitch/fastpath/_vring.pyx``) beside the reference.

The behaviour and hostile-guest tests of the virtqueue live in tests/test_vhost_virtqueue.py
and run there on both implementations (its ``Vq`` fixture).  This file holds what is about
the kernel's own machinery -- its region table, the lifetime of the memory it points into,
64-bit bounds at the top of the address space, its alignment rule -- and, for every hostile
chain of that file, a check that both implementations drop and count it identically.
"""

from __future__ import annotations

import gc

import pytest
from pyswitch.ports.vhostuser.memory import BadAddress, GuestMemory

from tests.test_vhost_virtqueue import IMPLS, virtqueue_class
from tests.vhost_frontend import F_INDIRECT, F_NEXT, F_WRITE, DriverQueue, GuestRAM

FRAME = bytes(range(60))


@pytest.fixture(params=IMPLS)
def Vq(request):
    return virtqueue_class(request.param)


def queue(ram, Vq, mem, size=16, **kw):
    dq = DriverQueue(ram, size)
    a = dq.addr(0)
    return dq, Vq(mem, size, a.desc, a.avail, a.used, **kw)


def pop(vq, n=32):
    frames, heads = [], []
    bad = vq.pop_frames(n, frames, heads)
    return frames, heads, bad


def test_a_region_added_after_the_ring_is_used_at_once(Vq):
    """ADD_MEM_REG appends to the same GuestMemory and leaves started rings alone: the
    kernel's copy of the region table must follow (it is re-read when it changed)."""
    ram = GuestRAM([(0, 1 << 20), (0x4000_0000, 1 << 20)])
    mem = GuestMemory.map(ram.table()[:1], ram.fds()[:1])
    try:
        dq, vq = queue(ram, Vq, mem)
        buf = ram.alloc(12 + len(FRAME), region=1)
        ram.write(buf, bytes(12) + FRAME)
        dq.make_available([dq.add_chain([(buf, 12 + len(FRAME), False)])])
        assert pop(vq)[1:] == ([0], 1)  # not mapped yet: a bad chain
        mem.add(ram.table()[1], ram.fds()[1], 64)
        dq.make_available([dq.add_chain([(buf, 12 + len(FRAME), False)])])
        frames, _, bad = pop(vq)
        assert (frames, bad) == ([FRAME], 0)
        # and removed again (REM_MEM_REG rebuilds rings, but the table must not linger)
        assert mem.remove(ram.table()[1])
        dq.make_available([dq.add_chain([(buf, 12 + len(FRAME), False)])])
        assert pop(vq)[2] == 1
    finally:
        mem.close()
        ram.close()


def test_memory_closed_under_a_live_queue_stays_mapped_and_refuses_buffers(Vq):
    """GuestMemory.close unmaps later while a view is exported: the queue's rings stay
    readable (no use after unmap), and no buffer is found in a closed table."""
    ram = GuestRAM([(0, 1 << 20)])
    try:
        mem = ram.mapped()
        dq, vq = queue(ram, Vq, mem)
        region = mem.regions[0]
        dq.send_frame(FRAME)
        mem.close()  # must not raise: the unmap is deferred
        assert not region.map.closed  # still exported by the queue
        assert vq.pending() == 1
        frames, heads, bad = pop(vq)
        assert (frames, heads, bad) == ([], [0], 1)
        assert vq.put_used([(0, 0)]) is True and dq.take_used() == [(0, 0)]
        del vq
        gc.collect()
    finally:
        ram.close()


@pytest.mark.parametrize("length, ok", [(16, True), (32, False), (17, False), (0, True)])
def test_descriptor_at_the_top_of_the_address_space(Vq, length, ok):
    """A region that ends at 2**64: a buffer at 2**64 - 16 is inside for 16 bytes and
    outside for 17 (in C, addr + len wraps to a small number; the check must not)."""
    top = 2**64 - (1 << 16)
    ram = GuestRAM([(0, 1 << 20), (top, 1 << 16)])
    mem = ram.mapped()
    try:
        dq, vq = queue(ram, Vq, mem)
        ram.write(2**64 - 16, bytes(12) + b"wxyz")
        h = dq.free.pop(0)
        dq.write_desc(h, 2**64 - 16, length, 0)
        dq.make_available([h])
        frames, _, bad = pop(vq, 1)
        expect = ([b"wxyz"], 0) if ok and length > 12 else ([], 1)
        assert (frames, bad) == expect
        if ok:
            assert [bytes(s) for s in vq.walk(h, False)] == [(bytes(12) + b"wxyz")[:length]]
    finally:
        mem.close()
        ram.close()


def test_kernel_refuses_a_ring_its_mapping_misaligns():
    """The guest's ring addresses are aligned but an odd mmap_offset shifts them in the
    back end: 16-bit single stores need aligned words, so the kernel refuses the ring
    (ValueError, which the device turns into a refused start); the reference accepts it."""
    ram = GuestRAM([(0, 1 << 20)], mmap_offset=1)
    mem = ram.mapped()
    try:
        dq = DriverQueue(ram, 16)
        a = dq.addr(0)
        with pytest.raises(ValueError, match="misaligned"):
            virtqueue_class("compiled")(mem, 16, a.desc, a.avail, a.used)
        virtqueue_class("python")(mem, 16, a.desc, a.avail, a.used)
    finally:
        mem.close()
        ram.close()


def test_ring_outside_memory_raises_bad_address_like_the_reference(Vq):
    ram = GuestRAM([(0, 1 << 16)])
    mem = ram.mapped()
    try:
        base = ram.regions[0].uva
        with pytest.raises(BadAddress):
            Vq(mem, 256, base, base + 0x1000, base + (1 << 16) - 8)
        with pytest.raises(ValueError):
            Vq(mem, 24, base, base + 0x1000, base + 0x2000)
        with pytest.raises(ValueError):
            Vq(mem, 16, base + 8, base + 0x1000, base + 0x2000)
    finally:
        mem.close()
        ram.close()


# -- hostile chains: both implementations drop and count the same --------------------------

def _hostile(dq, ram, kind: str, buf: int) -> list[int]:
    """Write one hostile chain of ``kind``; return the heads to make available."""
    w, h = dq.write_desc, dq.free.pop(0)
    if kind == "outside":
        w(h, 0x9000_0000, 100, 0)
    elif kind == "straddles":
        w(h, (1 << 20) - 50, 100, 0)
    elif kind == "wraps":
        w(h, 2**64 - 16, 64, 0)
    elif kind == "loop":
        w(h, buf, 20, F_NEXT, h)
    elif kind == "longer_than_ring":
        for i in range(dq.size):
            w(i, buf, 1, F_NEXT, (i + 1) % dq.size)
    elif kind == "nested_indirect":
        table = ram.alloc(32)
        w(0, table, 16, F_INDIRECT, table=table)
        w(h, table, 16, F_INDIRECT)
    elif kind == "indirect_out_of_range":
        w(h, 0x9000_0000, 32, F_INDIRECT)
    elif kind == "indirect_too_long":
        w(h, buf, 16 * (dq.size + 1), F_INDIRECT)
    elif kind == "zero_length":
        w(h, buf, 0, F_WRITE)
    elif kind == "too_small":
        w(h, buf, 8, F_WRITE)
    elif kind == "head_past_table":
        return [dq.size + 3]
    return [h]


HOSTILE = ["outside", "straddles", "wraps", "loop", "longer_than_ring", "nested_indirect",
           "indirect_out_of_range", "indirect_too_long", "zero_length", "too_small",
           "head_past_table"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_chains_are_dropped_and_counted_identically(kind):
    """Each hostile chain through pop_frames and fill_frames (with and without MRG_RXBUF)
    on both implementations: the same frames, heads, counts, stats and used ring."""
    seen = []
    for impl in IMPLS:
        ram = GuestRAM([(0, 1 << 20)])
        mem = ram.mapped()
        try:
            dq, vq = queue(ram, virtqueue_class(impl), mem, size=8)
            buf = ram.alloc(4096)
            ram.write(buf, bytes(12) + FRAME)
            dq.make_available(_hostile(dq, ram, kind, buf))
            out = [pop(vq)]
            vq.put_used([(h, 0) for h in out[0][1]])
            for mergeable in (True, False):
                dq.make_available(_hostile(dq, ram, kind, buf) if dq.free else [0])
                res = vq.fill_frames([FRAME, FRAME], mergeable)
                out.append((res.taken, res.sent, res.bad, res.too_big, res.notify))
            out.append((vq.stats.bad_chains, vq.stats.broken_avail, vq.broken,
                        vq.last_avail_idx, vq.used_idx, dq.take_used()))
            seen.append(out)
        finally:
            mem.close()
            ram.close()
    assert seen[0] == seen[1]
    assert seen[0][0][2] == 1  # the transmit side dropped it as one bad chain


def test_longest_is_the_reference_max():
    """The kernel's batch MTU helper equals the reference for every buffer kind."""
    from pyswitch import fastpath
    from pyswitch.ports.vhostuser import virtqueue

    kernel = fastpath.load_kernel("_vring")
    for frames in ([], [b""], [b"ab", bytearray(70), memoryview(b"x" * 1518), b"y" * 9]):
        assert kernel.longest(frames) == virtqueue.longest(frames)
