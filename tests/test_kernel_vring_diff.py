"""Differential fuzzing of the compiled split virtqueue against the Python reference.

Each example builds one random guest: 1-8 memory regions with gaps (sometimes one at the
very top of the 64-bit address space), random bytes in them, a ring of random size whose
descriptors are a mix of good buffers and hostile ones (outside memory, straddling a region
end, at 2**64 - 16, zero length, loops, indexes past the table, nested or malformed
INDIRECT tables, the wrong direction), and a random sequence of driver and device steps:
pop_frames, pop_done, fill_frames (random frames, batch sizes, with and without MRG_RXBUF),
put_used, need_notify, ask_kicks, walk, more avail entries (sometimes an absurd jump),
new flags / used_event, and regions added (ADD_MEM_REG) or removed after the ring exists.

The same guest is laid out twice, in two separate memories, one per implementation.  After
every step the two must agree on every return value (frames, heads, bad counts, RxResult,
notify decisions, walk segments or the exception type), the queue's indexes, ``broken``
and stats, and on the guest memory byte for byte.

CI runs ``PYSWITCH_FUZZ_EXAMPLES`` examples (default 300); set it higher for a longer run.
"""

from __future__ import annotations

import os
import random
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyswitch.ports.vhostuser.memory import GuestMemory
from pyswitch.ports.vhostuser.virtqueue import BadChain, Virtqueue

from tests.test_vhost_virtqueue import virtqueue_class
from tests.vhost_frontend import DESC, F_INDIRECT, F_NEXT, F_WRITE, U16, GuestRAM

EXAMPLES = int(os.environ.get("PYSWITCH_FUZZ_EXAMPLES", "300"))
TOP = 2**64
_FLAGS = st.sampled_from([0, 0, 0, F_WRITE, F_WRITE, F_NEXT, F_NEXT | F_WRITE, F_INDIRECT,
                          F_INDIRECT | F_NEXT, F_INDIRECT | F_WRITE, 7, 0xFFF8])


class Guest:
    """One random guest memory and ring layout, instantiated twice (A and B)."""

    def __init__(self, data: st.DataObject) -> None:
        draw = data.draw
        n = draw(st.integers(1, 8), label="regions")
        sizes = [draw(st.sampled_from([1 << 14, 1 << 15]))] + [
            draw(st.sampled_from([4096, 8192, 1 << 14])) for _ in range(n - 1)]
        gpa = draw(st.sampled_from([0, 0x1000, 0x1_0000_0000]))
        layout = []
        for i, size in enumerate(sizes):
            layout.append((gpa, size))
            gpa += size + draw(st.sampled_from([0, 0, 4096, 1 << 20, 1 << 32]), label=f"gap{i}")
        if n > 1 and draw(st.booleans(), label="top region"):
            layout[-1] = (TOP - layout[-1][1], layout[-1][1])  # ends exactly at 2**64
        self.layout = layout
        self.mapped_first = draw(st.integers(1, n), label="mapped at start")  # rest: ADD_MEM_REG
        self.size = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]), label="queue size")
        self.event_idx = draw(st.booleans(), label="event_idx")
        self.hdr_len = draw(st.sampled_from([10, 12]), label="hdr_len")
        self.last_avail = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFE, 0xFFFF]), label="base")
        self.used_start = draw(st.sampled_from([0, 5, 0xFFFF]), label="used.idx")
        self.seed = draw(st.integers(0, 2**32 - 1), label="memory seed")
        self.rams = [GuestRAM(layout), GuestRAM(layout)]
        rng = random.Random(self.seed)
        for k, (_, size) in enumerate(layout):
            fill = rng.randbytes(size)
            for ram in self.rams:
                ram.regions[k].map[:] = fill
        g0, s0 = layout[0]
        n_ = self.size
        self.desc = g0
        self.avail = g0 + 16 * n_
        self.used = (self.avail + 6 + 2 * n_ + 3) // 4 * 4
        end = self.used + 6 + 8 * n_
        assert end <= g0 + s0
        self.write(self.avail, bytes(4 + 2 * n_ + 2))
        self.write(self.used, bytes(4 + 8 * n_ + 2))
        self.write_u16(self.avail + 2, self.last_avail)
        self.write_u16(self.used + 2, self.used_start)
        self.avail_idx = self.last_avail
        # indirect tables, then the descriptor table: drawn from the seed (fast), good
        # buffers with a drawn share of hostile ones
        self.hostile = draw(st.sampled_from([0.0, 0.1, 0.3, 0.7, 1.0]), label="hostile share")
        # most good buffers go one way: frames to pop (readable) or room to fill (writable)
        self.writable = draw(st.sampled_from([0.1, 0.5, 0.9]), label="writable share")
        self.tables = []
        for _ in range(rng.randrange(3)):
            entries = rng.randrange(1, n_ + 3)
            self.tables.append((self.address(rng, 16 * entries, good=True), entries))
        for at, entries in self.tables:
            for i in range(entries):
                self.write(at + 16 * i, self.descriptor(rng, entries))
        for i in range(n_):
            self.write(self.desc + 16 * i, self.descriptor(rng, n_))
        self.rng = rng
        self.post([rng.randrange(n_ + 2) for _ in range(rng.randrange(n_ + 1))])

    def post(self, heads: list[int]) -> None:
        """The driver makes ``heads`` available (one avail.idx store after the entries)."""
        for h in heads:
            self.write(self.avail + 4 + 2 * (self.avail_idx % self.size), U16.pack(h))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.write_u16(self.avail + 2, self.avail_idx)

    # -- memory of both copies ---------------------------------------------------------
    def inside(self, gpa: int, n: int) -> bool:
        return any(g <= gpa and gpa + n <= g + s for g, s in self.layout)

    def write(self, gpa: int, data: bytes) -> None:
        for ram in self.rams:
            ram.write(gpa, data)

    def write_u16(self, gpa: int, value: int) -> None:
        for ram in self.rams:
            ram.write_u16(gpa, value)

    def contents(self, k: int) -> list[bytes]:
        return [bytes(r.map) for r in self.rams[k].regions]

    # -- drawing addresses and descriptors ---------------------------------------------
    def address(self, rng: random.Random, length: int, good: bool) -> int:
        """A guest-physical address for ``length`` bytes: inside a region if ``good``, else
        at or across a region's end, in a gap, wrapping past 2**64, or zero."""
        mapped = self.layout[: self.mapped_first]  # good buffers: mostly where memory is now
        g, s = rng.choice(mapped if good and rng.random() < 0.8 else self.layout)
        kind = "in" if good else rng.choice(["in", "end", "across", "across", "across", "gap",
                                             "wrap", "zero"])
        room = max(s - length, 0)
        if kind == "wrap":
            return TOP - 16
        if kind == "zero":
            return 0
        if kind == "gap":  # past the top region this wraps to low memory, as a u64 would
            return (g + s + rng.choice([0, 1, 4096])) % TOP
        if kind == "end":
            return (g + room) % TOP
        if kind == "across":
            return min(g + room + rng.choice([1, 1, 2, 15, rng.randrange(1, 64)]), TOP - 1)
        return g + rng.randrange(room + 1)

    def descriptor(self, rng: random.Random, table_n: int) -> bytes:
        """A good buffer (either direction, maybe chained, maybe an indirect table) or,
        with the drawn probability, a hostile one."""
        nxt = rng.randrange(table_n + 2) if rng.random() < 0.1 else rng.randrange(table_n)
        if rng.random() >= self.hostile:
            if self.tables and rng.random() < 0.15:
                at, entries = rng.choice(self.tables)
                return DESC.pack(at, 16 * entries, F_INDIRECT, 0)
            length = rng.choice([10, 12, 13, 60, 76, 100, 300, 1526, 2048])
            flags = (F_WRITE if rng.random() < self.writable else 0) | (
                F_NEXT if rng.random() < 0.15 else 0)
            return DESC.pack(self.address(rng, length, True), length, flags, nxt)
        flags = rng.choice([0, 0, F_WRITE, F_WRITE, F_NEXT, F_NEXT | F_WRITE, F_INDIRECT,
                            F_INDIRECT | F_NEXT, F_INDIRECT | F_WRITE, 7, 0xFFF8])
        if flags & F_INDIRECT and self.tables and rng.random() < 0.5:
            at, entries = rng.choice(self.tables)
            length = rng.choice([16 * entries, 16 * entries + 8, 0, 16 * (table_n + 1)])
            return DESC.pack(at, length, flags, nxt)
        length = rng.choice([0, 1, 9, 10, 11, 12, 13, 60, 76, 300, 1526, 4000, 2**32 - 1,
                             rng.randrange(2049)])
        return DESC.pack(self.address(rng, length, rng.random() < 0.3), length, flags, nxt)

    def close(self) -> None:
        for ram in self.rams:
            ram.close()


class Pair:
    """The two queues, one per implementation, over the two copies of the guest."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.mems, self.vqs = [], []
        first = guest.mapped_first
        for ram, impl in zip(guest.rams, ("python", "compiled")):
            mem = GuestMemory.map(ram.table()[:first], ram.fds()[:first])
            self.mems.append(mem)
            vq = virtqueue_class(impl)(mem, guest.size, ram.uva(guest.desc), ram.uva(guest.avail),
                                       ram.uva(guest.used), last_avail_idx=guest.last_avail,
                                       event_idx=guest.event_idx)
            self.vqs.append(vq)
        assert isinstance(self.vqs[0], Virtqueue) and not isinstance(self.vqs[1], Virtqueue)
        self.added = first
        self.popped: list[int] = []

    def both(self, what: str, fn):
        """``fn(vq)`` on both; the results (or exception types) must be equal."""
        out = []
        for vq in self.vqs:
            try:
                out.append(("ok", fn(vq)))
            except (BadChain, ValueError, OverflowError) as exc:
                out.append(("raised", type(exc).__name__))
        assert out[0] == out[1], f"{what}: python {_short(out[0])} != compiled {_short(out[1])}"
        return out[0][1]

    def check_state(self, what: str) -> None:
        py, c = self.vqs
        state = [(vq.last_avail_idx, vq.used_idx, vq.broken, vq.stats.bad_chains,
                  vq.stats.broken_avail, vq.pending()) for vq in self.vqs]
        assert state[0] == state[1], f"after {what}: python {state[0]} != compiled {state[1]}"
        for k, (a, b) in enumerate(zip(self.guest.contents(0), self.guest.contents(1))):
            if a != b:
                at = next(i for i in range(len(a)) if a[i] != b[i])
                raise AssertionError(f"after {what}: region {k} differs at offset {at:#x}")
        assert py.size == c.size and py.event_idx == c.event_idx

    def close(self) -> None:
        for mem in self.mems:
            mem.close()
        self.vqs.clear()


def _short(value) -> str:
    """``value`` for a failure message, with each bytes object as its length and CRC."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes crc {zlib.crc32(value):#x}>"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return repr(value)


def _pop(vq, max_n, hdr_len):
    frames, heads = [], []
    bad = vq.pop_frames(max_n, frames, heads, hdr_len)
    return [bytes(f) for f in frames], heads, bad


def _pop_done(vq, max_n, hdr_len):
    frames: list = []
    bad, notify, nbytes, longest = vq.pop_done(max_n, frames, hdr_len)
    return [bytes(f) for f in frames], bad, notify, nbytes, longest


def _fill(vq, frames, mergeable, hdr_len):
    res = vq.fill_frames(frames, mergeable, hdr_len)
    return (res.taken, res.sent, res.bytes, res.bad, res.too_big, res.notify)


def _walk(vq, head, writable):
    return [bytes(s) for s in vq.walk(head, writable)]


def step(pair: Pair, data: st.DataObject) -> str:
    """One random driver or device step, on both; returns its name."""
    g = pair.guest
    draw = data.draw
    op = draw(st.sampled_from(["pop", "pop", "pop_done", "fill", "fill", "post", "post",
                               "put_used", "notify", "kicks", "walk", "flags", "add", "remove"]))
    if op == "pop":
        max_n = draw(st.sampled_from([0, 1, 4, 32, 64]))
        _, heads, _ = pair.both(op, lambda vq: _pop(vq, max_n, g.hdr_len))
        pair.popped += heads
    elif op == "pop_done":  # pop and give the heads back in one call, as the port does
        max_n = draw(st.sampled_from([0, 1, 4, 32, 64]))
        pair.both(op, lambda vq: _pop_done(vq, max_n, g.hdr_len))
    elif op == "fill":
        lengths = draw(st.lists(st.sampled_from([0, 1, 14, 60, 64, 300, 1514, 1518, 2000])
                                | st.integers(0, 1600), max_size=40))
        rng = random.Random(draw(st.integers(0, 2**32 - 1)))
        # bytes as the switch mostly passes them; bytearray and memoryview take the
        # kernel's buffer-protocol path
        frames = [rng.choice((bytes, bytes, bytearray, memoryview))(rng.randbytes(n))
                  for n in lengths]
        mergeable = draw(st.booleans())
        pair.both(op, lambda vq: _fill(vq, frames, mergeable, g.hdr_len))
    elif op == "post":  # the driver makes more heads available (or jumps absurdly)
        count = draw(st.integers(0, g.size))
        g.post([g.rng.randrange(g.size + 2) for _ in range(count)])
        if draw(st.integers(0, 9)) == 0:
            g.avail_idx = (g.avail_idx + g.size + draw(st.integers(1, 3000))) & 0xFFFF
            g.write_u16(g.avail + 2, g.avail_idx)
    elif op == "put_used":
        if pair.popped and draw(st.booleans()):
            entries, pair.popped = [(h, 0) for h in pair.popped], []
        else:
            entries = draw(st.lists(st.tuples(st.integers(0, g.size + 2),
                                              st.integers(0, 2**32 - 1)), max_size=g.size + 3))
        pair.both(op, lambda vq: vq.put_used(entries))
    elif op == "notify":
        old, new = draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
        pair.both(op, lambda vq: vq.need_notify(old, new))
    elif op == "kicks":
        enable = draw(st.booleans())
        pair.both(op, lambda vq: vq.ask_kicks(enable))
    elif op == "walk":
        head, writable = draw(st.integers(0, g.size + 1)), draw(st.booleans())
        pair.both(op, lambda vq: _walk(vq, head, writable))
    elif op == "flags":  # avail.flags (NO_INTERRUPT) and used_event
        g.write_u16(g.avail, draw(st.sampled_from([0, 1, 0xFFFF])))
        if g.event_idx:
            g.write_u16(g.avail + 4 + 2 * g.size, draw(st.integers(0, 0xFFFF)))
    elif op == "add" and pair.added < len(g.layout):  # ADD_MEM_REG: rings are not rebuilt
        for ram, mem in zip(g.rams, pair.mems):
            mem.add(ram.table()[pair.added], ram.fds()[pair.added], 64)
        pair.added += 1
    elif op == "remove" and pair.added > 1:  # the last region goes (REM_MEM_REG)
        for ram, mem in zip(g.rams, pair.mems):
            assert mem.remove(ram.table()[pair.added - 1])
        pair.added -= 1
    return op


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_compiled_virtqueue_matches_the_reference(data):
    guest = Guest(data)
    pair = None
    try:
        pair = Pair(guest)
        pair.check_state("construction")
        for i in range(data.draw(st.integers(1, 12), label="steps")):
            op = step(pair, data)
            pair.check_state(f"step {i} ({op})")
    finally:
        if pair is not None:
            pair.close()
        guest.close()
