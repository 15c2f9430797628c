"""Split virtqueue layer, driven from the driver side laid out in memfd guest memory.

Every test that takes ``Vq`` runs on both implementations: the Python reference
(``virtqueue.Virtqueue``) and the compiled kernel (``pyswitch.fastpath._vring``), so each
hostile-guest case is proven on both paths.  The compiled variant fails (never skips) if
the kernel is not built.
"""

from __future__ import annotations

import pytest
from pyswitch.ports.vhostuser import virtqueue as vqmod
from pyswitch.ports.vhostuser.memory import BadAddress
from pyswitch.ports.vhostuser.virtqueue import NET_HDR, BadChain, Virtqueue

from pyswitch import fastpath
from tests.vhost_frontend import F_INDIRECT, F_NEXT, F_WRITE, DriverQueue, GuestRAM

FRAME = bytes(range(64)) * 2  # 128-byte frame


@pytest.fixture
def ram():
    r = GuestRAM([(0, 4 << 20), (0x4000_0000, 1 << 20)])
    yield r
    r.close()


#: The two implementations of one split virtqueue.
IMPLS = ("python", "compiled")


def virtqueue_class(impl: str) -> type:
    """The Virtqueue of ``impl``; the compiled one is loaded as pyswitch loads it
    (``PYSWITCH_KERNEL_DIR`` picks a sanitizer build)."""
    return Virtqueue if impl == "python" else fastpath.load_kernel("_vring").Virtqueue


@pytest.fixture(params=IMPLS)
def Vq(request):
    return virtqueue_class(request.param)


def make(ram, Vq, size=16, event_idx=False, region=0):
    dq = DriverQueue(ram, size, region)
    mem = ram.mapped()
    a = dq.addr(0)
    vq = Vq(mem, size, a.desc, a.avail, a.used, event_idx=event_idx)
    return dq, vq, mem


def count_fetches(monkeypatch, vq):
    """A function that returns the descriptors fetched from guest memory since this call.
    The compiled kernel counts its own (``desc_fetches``); the reference's DESC is wrapped."""
    if not isinstance(vq, Virtqueue):
        start = vq.desc_fetches
        return lambda: vq.desc_fetches - start
    fetches = [0]
    real = vqmod.DESC

    class Counting:  # DESC with a count of descriptor fetches
        size = real.size

        @staticmethod
        def unpack_from(buffer, offset=0):
            fetches[0] += 1
            return real.unpack_from(buffer, offset)

    monkeypatch.setattr(vqmod, "DESC", Counting)
    return lambda: fetches[0]


def pop(vq, n=32):
    frames, heads = [], []
    bad = vq.pop_frames(n, frames, heads)
    return [bytes(f) for f in frames], heads, bad


@pytest.mark.parametrize("split", ["together", "apart", "indirect", "bytes"])
def test_transmitq_any_header_layout(ram, split, Vq):
    dq, vq, mem = make(ram, Vq, size=32)
    head = dq.send_frame(FRAME, split)
    frames, heads, bad = pop(vq)
    assert (frames, heads, bad) == ([FRAME], [head], 0)
    assert vq.put_used([(head, 0)]) is True  # no NO_INTERRUPT: notify
    assert dq.take_used() == [(head, 0)]
    mem.close()


def test_batch_publishes_used_idx_once_and_in_order(ram, Vq):
    dq, vq, mem = make(ram, Vq)
    heads = [dq.send_frame(FRAME[: 60 + i]) for i in range(5)]
    frames, got, _ = pop(vq, 3)  # batch limit honoured
    assert [len(f) for f in frames] == [60, 61, 62] and got == heads[:3]
    assert vq.pending() == 2
    vq.put_used([(h, 0) for h in got])
    assert dq.used_idx() == 3
    assert [h for h, _ in dq.take_used()] == heads[:3]
    mem.close()


def test_frame_in_second_region(ram, Vq):
    dq, vq, mem = make(ram, Vq)
    buf = ram.alloc(12 + len(FRAME), region=1)
    ram.write(buf, bytes(12) + FRAME)
    head = dq.add_chain([(buf, 12 + len(FRAME), False)])
    dq.make_available([head])
    assert pop(vq)[0] == [FRAME]
    mem.close()


@pytest.mark.parametrize(
    "build",
    [
        "loop", "self_loop", "bad_next", "bad_addr", "straddles_end", "wrapping_addr", "nested_indirect",
        "indirect_with_next", "indirect_bad_len", "writable_in_tx", "short_header", "indirect_loop",
        "indirect_longer_than_queue", "huge_frame",
    ],
)
def test_bad_chains_are_dropped_counted_and_returned(ram, build, Vq):
    dq, vq, mem = make(ram, Vq, size=8)
    buf = ram.alloc(2048)
    ram.write(buf, bytes(12) + FRAME)
    h = dq.free.pop(0)
    w = dq.write_desc
    if build == "loop":
        dq.free.remove(1)
        w(h, buf, 10, F_NEXT, 1)
        w(1, buf, 10, F_NEXT, h)
    elif build == "self_loop":
        w(h, buf, 10, F_NEXT, h)
    elif build == "bad_next":
        w(h, buf, 12, F_NEXT, 99)
    elif build == "bad_addr":
        w(h, 0x9000_0000, 200, 0)
    elif build == "straddles_end":  # the last 99 bytes of region 0 and one past its end
        w(h, (4 << 20) - 99, 100, 0)
    elif build == "wrapping_addr":
        w(h, 2**64 - 16, 32, 0)
    elif build in ("nested_indirect", "indirect_loop"):
        table = ram.alloc(32)
        if build == "nested_indirect":
            w(0, table, 16, F_INDIRECT, table=table)
        else:
            w(0, buf, 10, F_NEXT, 1, table=table)
            w(1, buf, 10, F_NEXT, 0, table=table)
        w(h, table, 32, F_INDIRECT)
    elif build == "indirect_with_next":
        w(h, buf, 16, F_INDIRECT | F_NEXT, 1)
    elif build == "indirect_bad_len":
        w(h, buf, 20, F_INDIRECT)
    elif build == "writable_in_tx":
        w(h, buf, 200, F_WRITE)
    elif build == "short_header":
        w(h, buf, 8, 0)
    elif build == "indirect_longer_than_queue":
        # a chain may not be longer than the queue (2.7.5.3.1; DPDK refuses len/16 > N):
        # 64 small pieces through an indirect table, on a queue of 8
        table = ram.alloc(16 * 64)
        for k in range(64):
            w(k, buf + 2 * k, 2, F_NEXT if k < 63 else 0, k + 1, table=table)
        w(h, table, 16 * 64, F_INDIRECT)
    elif build == "huge_frame":
        # two 2 MiB buffers (the same guest memory twice): a 4 MiB "frame" would be
        # copied whole before any MTU check; no virtio-net frame exceeds 64 KiB here
        dq.free.remove(1)
        w(h, 0, 2 << 20, F_NEXT, 1)
        w(1, 0, 2 << 20, 0)
    dq.make_available([h])
    good = dq.send_frame(FRAME)  # a good chain after the bad one is still served
    frames, heads, bad = pop(vq)
    assert bad == 1 and frames == [FRAME] and heads == [h, good]
    assert vq.stats.bad_chains == 1
    vq.put_used([(x, 0) for x in heads])
    assert [x for x, _ in dq.take_used()] == [h, good]  # the bad one goes back too
    mem.close()


def test_walk_reports_why(Vq):
    ram = GuestRAM()
    try:
        dq, vq, mem = make(ram, Vq, size=4)
        dq.write_desc(0, 0, 10, F_NEXT, 0)
        with pytest.raises(BadChain, match="loop"):
            vq.walk(0, writable=False)
        mem.close()
    finally:
        ram.close()


def test_corrupt_avail_index_marks_ring_broken(ram, Vq):
    dq, vq, mem = make(ram, Vq, size=8)
    dq.avail_idx = 100  # more than the ring holds
    dq.make_available([])
    assert vq.pending() == 0 and vq.broken
    assert pop(vq)[0] == []
    mem.close()


def test_descriptor_is_fetched_once(Vq):
    """The chain walk copies each descriptor; changing it afterwards changes nothing."""
    ram = GuestRAM()
    try:
        dq, vq, mem = make(ram, Vq)
        head = dq.send_frame(FRAME)
        segs = vq.walk(head, writable=False)
        dq.write_desc(head, 0x7FFF_FFFF_0000, 10, 0)  # guest rewrites after the check
        assert bytes(segs[0][12:]) == FRAME  # what we hold was validated before
        mem.close()
    finally:
        ram.close()


# -- receiveq ----------------------------------------------------------------------------


def test_receiveq_single_buffers(ram, Vq):
    dq, vq, mem = make(ram, Vq)
    dq.post_rx_buffers(4)
    frames = [FRAME, FRAME[:60], b"\xff" * 1514]
    res = vq.fill_frames(frames, mergeable=True)
    assert (res.taken, res.sent, res.bytes) == (3, 3, len(FRAME) + 60 + 1514)
    assert res.notify
    got = dq.receive_frames()
    assert got == [(f, 1) for f in frames]
    mem.close()


def test_receiveq_mergeable_spans_buffers_and_sets_num_buffers(ram, Vq):
    dq, vq, mem = make(ram, Vq)
    dq.post_rx_buffers(8, size=100)
    big = bytes(range(256)) + bytes(44)  # 300 bytes + 12 header = 312 -> 4 buffers of 100
    res = vq.fill_frames([big, FRAME[:50]], mergeable=True)
    assert res.sent == 2
    used = dq.take_used()
    assert [n for _, n in used] == [100, 100, 100, 12, 62]
    first = dq.read_chain(used[0][0], 100)
    assert NET_HDR.unpack(first[:12])[6] == 4
    data = b"".join(dq.read_chain(h, n) for h, n in used[:4])
    assert data[12:] == big
    mem.close()


def test_receiveq_chain_of_pieces_header_split(ram, Vq):
    dq, vq, mem = make(ram, Vq, size=64)
    dq.post_rx_buffers(1, size=5, pieces=40)  # header itself split over three buffers
    assert vq.fill_frames([FRAME], mergeable=False).sent == 1
    assert dq.receive_frames() == [(FRAME, 1)]
    mem.close()


def test_receiveq_indirect(ram, Vq):
    dq, vq, mem = make(ram, Vq)
    a, b = ram.alloc(12), ram.alloc(2048)
    dq.make_available([dq.add_indirect([(a, 12, True), (b, 2048, True)])])
    res = vq.fill_frames([FRAME], mergeable=True)
    assert res.sent == 1
    (_head, length), = dq.take_used()
    assert length == 12 + len(FRAME) and ram.read(b, len(FRAME)) == FRAME
    mem.close()


def test_receiveq_no_buffers_keeps_order_and_does_not_consume(ram, Vq):
    dq, vq, mem = make(ram, Vq)
    dq.post_rx_buffers(2, size=100)
    big = bytes(300)  # needs 4 buffers; only 2 there: not taken, buffers kept
    res = vq.fill_frames([FRAME[:50], big, FRAME[:40]], mergeable=True)
    assert (res.taken, res.sent) == (1, 1)
    assert vq.pending() == 1  # the second buffer was not consumed
    mem.close()


def test_receiveq_without_mergeable_drops_too_big(ram, Vq):
    dq, vq, mem = make(ram, Vq)
    dq.post_rx_buffers(2, size=100)
    res = vq.fill_frames([bytes(200), FRAME[:50]], mergeable=False)
    assert (res.taken, res.sent, res.too_big) == (2, 1, 1)
    used = dq.take_used()
    assert used[0][1] == 0 and used[1][1] == 62  # the small buffer went back empty
    mem.close()


def test_receiveq_readonly_buffer_is_bad(ram, Vq):
    dq, vq, mem = make(ram, Vq)
    buf = ram.alloc(2048)
    dq.make_available([dq.add_chain([(buf, 2048, False)])])
    dq.post_rx_buffers(1)
    res = vq.fill_frames([FRAME, FRAME], mergeable=True)
    assert (res.taken, res.sent, res.bad) == (2, 1, 1)
    mem.close()


# -- notifications ----------------------------------------------------------------------


def test_no_interrupt_flag_suppresses_call(ram, Vq):
    dq, vq, mem = make(ram, Vq)
    dq.set_avail_flags(1)
    dq.post_rx_buffers(2)
    assert vq.fill_frames([FRAME], mergeable=True).notify is False
    dq.set_avail_flags(0)
    assert vq.fill_frames([FRAME], mergeable=True).notify is True
    mem.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_notify_decision_reads_the_driver_flag_after_a_full_fence(ram, monkeypatch, event_idx):
    """used.idx is a store, the driver's wish (avail.flags or used_event) a load: x86 may
    let the load pass the store, and a driver that just turned interrupts back on then
    sees no new used entry while we see its old "no interrupt" -- a lost call, a stalled
    guest (Linux vhost has smp_mb() before both reads).  The race itself cannot be
    forced in a test; this checks the fence is taken on both paths, before the read.
    The reference only: the compiled kernel's fence is one C intrinsic (``vr_fence`` in
    ``_need_notify``), which Python cannot intercept."""
    dq, vq, mem = make(ram, Virtqueue, event_idx=event_idx)
    dq.post_rx_buffers(1)
    seen = []

    class Fence:
        def __enter__(self):
            seen.append(dq.used_idx())  # used.idx is already published when the fence runs
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(vqmod, "_fence", Fence())
    assert vq.fill_frames([FRAME], mergeable=True).notify is True
    assert seen == [1]
    mem.close()


@pytest.mark.parametrize(
    "used_event, old, count, expect",
    [(0, 0, 1, True), (5, 0, 5, False), (4, 0, 5, True), (2, 3, 4, False), (0xFFFF, 0xFFFE, 2, True)],
)
def test_event_idx_decision(ram, used_event, old, count, expect, Vq):
    dq, vq, mem = make(ram, Vq, event_idx=True)
    vq.used_idx = old
    dq.set_used_event(used_event)
    # EVENT_IDX: notify iff (u16)(new - used_event - 1) < (u16)(new - old) (2.7.10)
    assert vq.put_used([(0, 0)] * count) is expect
    mem.close()


def test_event_idx_asks_kick_at_next_avail(ram, Vq):
    dq, vq, mem = make(ram, Vq, event_idx=True)
    for _ in range(3):
        dq.send_frame(FRAME)
    pop(vq)
    assert dq.avail_event() == 3
    vq.ask_kicks(False)
    assert dq.used_flags() == 1
    mem.close()


def test_ring_outside_memory_is_refused(ram, Vq):
    mem = ram.mapped()
    with pytest.raises(BadAddress):
        Vq(mem, 256, 0x10, 0x9000_0000, 0x20000)
    with pytest.raises(ValueError):
        Vq(mem, 100, 0, 0x2000, 0x4000)
    mem.close()


# -- property: any descriptor table a guest can write is survivable -----------------------

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_ADDRS = st.sampled_from([0x1000, 0x2_0000, (4 << 20) - 8, 4 << 20, 0x4000_0000, 0x4010_0000 - 4,
                          2**64 - 16, 0x9000_0000, 0])
_DESC = st.tuples(_ADDRS, st.sampled_from([0, 1, 8, 12, 13, 16, 32, 100, 2**32 - 1]),
                  st.integers(0, 7), st.integers(0, 9))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=st.lists(_DESC, min_size=8, max_size=8),
       heads=st.lists(st.integers(0, 9), min_size=1, max_size=8),
       indirect=st.lists(_DESC, min_size=2, max_size=2))
def test_hostile_rings_never_raise(ram, descs, heads, indirect, Vq):
    """Random descriptors (bad addresses, wrapping lengths, loops, nested/odd INDIRECT,
    wrong directions, indexes past the table): popping and filling never raise, every
    head taken is accounted for, and every frame comes from inside guest memory."""
    dq, vq, mem = make(ram, Vq, size=8)
    table = 0x2_0000  # an indirect table the random descriptors may point at
    for i, (a, n, f, nx) in enumerate(indirect):
        dq.write_desc(i, a, n, f, nx, table=table)
    for i, (a, n, f, nx) in enumerate(descs):
        dq.write_desc(i, a, n, f, nx)
    dq.make_available(heads)
    frames, got = [], []
    bad = vq.pop_frames(32, frames, got)
    assert got == heads and bad + len(frames) == len(heads)
    assert all(len(f) <= (4 << 20) for f in frames)
    vq.put_used([(h, 0) for h in got])
    dq.make_available(heads)
    res = vq.fill_frames([bytes(60)] * len(heads), mergeable=True)
    assert res.sent + res.bad + res.too_big == res.taken
    assert dq.used_idx() == vq.used_idx  # published
    # every head the receive side consumed went back once; the rest still wait
    assert vq.pending() + (vq.used_idx - len(got)) == len(heads)
    mem.close()


def test_rings_without_event_fields_may_end_at_the_region_end(Vq):
    """Without EVENT_IDX a driver may allocate 4 + 8N bytes of used ring (DPDK does):
    a ring flush with the end of guest memory must be accepted."""
    ram = GuestRAM([(0, 1 << 16)])
    try:
        mem = ram.mapped()
        size = 16
        used = (1 << 16) - (4 + 8 * size)
        base = ram.regions[0].uva
        vq = Vq(mem, size, base, base + 0x1000, base + used)
        assert vq.pending() == 0
        with pytest.raises(BadAddress):
            Vq(mem, size, base, base + 0x1000, base + used, event_idx=True)
        del vq
        mem.close()
    finally:
        ram.close()


def test_used_idx_is_published_in_one_store(Vq):
    """A driver polls used.idx from another process while the device publishes batch
    after batch: every value it reads must be one the device published (never 0 or a
    half-written index, which made DPDK free descriptors it never sent)."""
    import os
    import time

    ram = GuestRAM([(0, 1 << 20)])
    try:
        dq = DriverQueue(ram, 256)
        pid = os.fork()
        if pid == 0:  # the device: publish used.idx 0x100, 0x101 ... up to 0xFF00, no wrap
            try:
                mem = ram.mapped()
                a = dq.addr(0)
                vq = Vq(mem, 256, a.desc, a.avail, a.used)
                vq.used_idx = 0x00FF  # cross byte boundaries early and often
                end = time.monotonic() + 1.0
                while time.monotonic() < end and vq.used_idx < 0xFF00:
                    vq.put_used([(0, 0)])
                    pause = time.perf_counter() + 2e-6  # the kernel is fast: let the reader see
                    while time.perf_counter() < pause:
                        pass
            finally:
                os._exit(0)
        r, off = ram._locate(dq.used + 2, 2)
        view = memoryview(r.map)[off : off + 2].cast("H")
        # the index only grows (it never wraps here), so any value below the last one
        # read is torn or zeroed -- whatever the speed of either side
        prev, backwards, reads, seen = view[0], 0, 0, set()
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            for _ in range(1000):
                cur = view[0]
                if cur < prev:
                    backwards += 1
                seen.add(cur)
                prev = cur
                reads += 1
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                break
        else:
            os.waitpid(pid, 0)
        view.release()
        assert reads > 10000 and backwards == 0, (reads, backwards)
        assert len(seen) > 20, "the reader never overlapped the writer"
    finally:
        ram.close()


def test_receiveq_hostile_chains_cost_bounded_work(ram, monkeypatch, Vq):
    """A guest offers N receive buffers that all start at the same N-descriptor chain of
    empty buffers.  With MRG_RXBUF one 1500-byte frame would walk every head to its end:
    N * N descriptor fetches per transmit (2^30 with N = 32768), all on the switch's one
    thread.  The work per fill is bounded by a few ring's worth of descriptors."""
    n = 256
    dq, vq, mem = make(ram, Vq, size=n)
    buf = ram.alloc(n)
    for i in range(n):
        dq.write_desc(i, buf + i, 0, F_WRITE | (F_NEXT if i < n - 1 else 0), i + 1)
    dq.make_available([0] * n)

    fetched = count_fetches(monkeypatch, vq)
    res = vq.fill_frames([bytes(1500)], mergeable=True)
    # the first chain holds less than a virtio-net header: a bad chain (5.1.6.3.1), the
    # frame dropped and that one head returned, the rest left on the ring
    assert (res.sent, res.taken, res.bad) == (0, 1, 1)
    assert vq.pending() == n - 1
    assert fetched() <= 8 * n, f"{fetched()} descriptor fetches for one frame on a ring of {n}"
    mem.close()


def test_transmitq_hostile_chains_cost_bounded_work_per_batch(ram, monkeypatch, Vq):
    """32 avail heads that all start the same N-descriptor chain: one batch would walk
    32 * N descriptors (65536 with QEMU's largest ring) before the loop serves anyone
    else.  A batch stops once its walk budget is spent; the heads it did not reach stay
    on the ring (none lost) and the next batches take them."""
    n = 256
    dq, vq, mem = make(ram, Vq, size=n)
    buf = ram.alloc(2 * n)
    ram.write(buf, bytes(12) + bytes(range(256)) * 2)
    dq.write_desc(0, buf, 12, F_NEXT, 1)
    for i in range(1, n):
        dq.write_desc(i, buf + 12 + i, 1, F_NEXT if i < n - 1 else 0, i + 1)
    dq.make_available([0] * 32)
    expect = bytes(ram.read(buf + 13, n - 1))

    fetched = count_fetches(monkeypatch, vq)
    got = []
    for _ in range(32):
        before = fetched()
        frames, heads, bad = pop(vq)
        assert bad == 0 and len(frames) == len(heads) >= 1
        spent = fetched() - before
        assert spent <= 4 * n, f"{spent} descriptor fetches in one batch on a ring of {n}"
        got += frames
        vq.put_used([(h, 0) for h in heads])
        if len(got) == 32:
            break
    assert got == [expect] * 32 and vq.pending() == 0
    mem.close()


@pytest.mark.parametrize("split", ["together", "apart", "indirect"])
def test_guest_cannot_change_a_frame_after_it_was_popped(ram, split, Vq):
    """A frame is classified (flows, VLAN) after pop_frames and copied out later: what the
    switch got must not follow later guest writes (a double fetch would let a guest slip
    a frame past a flow rule or a VLAN check)."""
    dq, vq, mem = make(ram, Vq, size=32)
    dq.send_frame(FRAME, split)
    frames, heads = [], []
    assert vq.pop_frames(32, frames, heads) == 0
    for r in ram.regions:  # the guest rewrites its buffer behind the switch's back
        at = r.map.find(FRAME)
        while at >= 0:
            r.map[at:at + len(FRAME)] = bytes(len(FRAME))
            at = r.map.find(FRAME)
    assert bytes(frames[0]) == FRAME
    frames.clear()
    mem.close()


def test_pop_done_returns_every_descriptor_in_the_same_call(ram, Vq):
    """pop_done: the frames (copies), and every head popped on the used ring with length
    0 at once, bad chains included, published once; the notification wish comes back."""
    dq, vq, mem = make(ram, Vq)
    frames_in = [bytes([i]) * (60 + i) for i in range(3)]
    heads = [dq.send_frame(f) for f in frames_in]
    dq.write_desc(15, 0xDEAD_0000_0000, 64)  # outside guest memory: a bad chain
    dq.make_available([15])
    got: list = []
    bad, notify, nbytes, longest = vq.pop_done(32, got)
    assert (got, bad, notify) == (frames_in, 1, True)
    assert (nbytes, longest) == (sum(map(len, frames_in)), 62)  # the port's counters, MTU check
    assert dq.used_idx() == 4 and dq.take_used() == [(h, 0) for h in heads] + [(15, 0)]
    assert vq.pop_done(32, got) == (0, False, 0, 0) and vq.used_idx == 4  # nothing: no publish
    mem.close()
