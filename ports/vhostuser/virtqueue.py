"""Split virtqueues of a virtio-net device, worked from the device side.

Layout (virtio 1.2, 2.7 "Split Virtqueues"), all little endian, N = queue size:

* descriptor table, 16 bytes each: ``le64 addr, le32 len, le16 flags, le16 next``
  (flags: 1 NEXT, 2 WRITE, 4 INDIRECT) -- addresses are guest physical;
* avail ring: ``le16 flags (1 NO_INTERRUPT), le16 idx, le16 ring[N], le16 used_event``;
* used ring:  ``le16 flags (1 NO_NOTIFY), le16 idx, {le32 id, le32 len}[N], le16 avail_event``.

Indices are free-running u16.  Directions keep the guest's names: the **transmitq**
carries frames from the guest (the switch *receives* them, :meth:`Virtqueue.pop_frames`);
the **receiveq** carries frames to the guest (:meth:`Virtqueue.fill_frames`).

Safety rules, because guest memory is hostile:

* every descriptor is copied out with one ``unpack_from`` and only the copies are
  checked and used (no double fetch); the avail index is read once per batch;
* every buffer goes through :class:`GuestMemory`'s bounds-checked accessor;
* a chain visits at most N descriptors (N of the indirect table inside one), so a
  loop ends (rust-vmm's TTL); a bad chain raises :class:`BadChain` inside and is
  returned to the guest as used with length 0, dropped and counted, never fatal;
* the used ring is written element by element and ``used.idx`` is published once
  per batch, after the elements (x86 keeps store order; see ``vhost-user-notes``);
* the ring indexes shared with the driver (``avail.idx``, ``used.idx``, the event
  indexes) are read and written as whole 16-bit words through ``memoryview.cast``
  views.  ``struct.pack_into`` is not one store: it zero-fills the field, then
  writes it (a reader in another process was seen to get 0x0 and 0x100 while
  0x101 was stored over 0x101).  DPDK virtio-user, polling ``used.idx``, read
  such a value, freed descriptors it never sent and crashed.
"""

from __future__ import annotations

import struct
import sys
import threading
from dataclasses import dataclass
from typing import Sequence

from pyswitch import fastpath

from .memory import BadAddress, GuestMemory

DESC = struct.Struct("<QIHH")
#: virtio-net header with num_buffers (5.1.6 "Device Operation"): 12 bytes with VERSION_1/MRG_RXBUF.
NET_HDR = struct.Struct("<BBHHHHH")
assert (DESC.size, NET_HDR.size) == (16, 12)
NET_HDR_LEN = NET_HDR.size
# The cast views below use the host's byte order for the rings' little-endian fields.
assert sys.byteorder == "little", "split rings are accessed natively: little-endian hosts only"

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
_CHAINED = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT
_NOT_SIMPLE = _CHAINED | VIRTQ_DESC_F_WRITE
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768

#: An uncontended lock acquire is a LOCK-prefixed instruction on x86-64: a full fence.
#: Needed between publishing used.idx and reading used_event or avail.flags (2.7.7, 2.7.10).
_fence = threading.Lock()


#: Descriptors a transmitq batch may walk per frame asked for.  A real driver uses 1-3
#: per frame (up to 19 with indirect scatter lists); heads that share one long chain
#: would otherwise cost max_n * N fetches in one batch, on the switch's only thread.
_TX_WALK_BUDGET = 16


class BadChain(Exception):
    """A descriptor chain the device must not use (loop, bad index, bad address ...)."""


@dataclass(slots=True)
class QueueStats:
    """Per-queue counters; plain ints, updated once per batch where possible."""

    bad_chains: int = 0
    broken_avail: int = 0


class Virtqueue:
    """One split virtqueue mapped over guest memory.

    ``desc``, ``avail`` and ``used`` are front-end virtual addresses (SET_VRING_ADDR);
    construction raises :class:`BadAddress` if a ring is not inside guest memory or
    ``ValueError`` for a bad size/alignment.  ``last_avail_idx`` is the next avail
    entry to process (SET_VRING_BASE); the used index is read from the ring.
    """

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        last_avail_idx: int = 0,
        event_idx: bool = False,
    ) -> None:
        if not (0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
            raise ValueError(f"queue size {size} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        if desc % 16 or avail % 2 or used % 4:
            raise ValueError("misaligned ring (2.7: desc 16, avail 2, used 4 bytes)")
        self.mem = mem
        self.size = size
        self.desc = mem.uva(desc, 16 * size)
        # used_event / avail_event exist only with EVENT_IDX (DPDK allocates without them)
        extra = 2 if event_idx else 0
        self.avail = mem.uva(avail, 4 + 2 * size + extra)
        self.used = mem.uva(used, 4 + 8 * size + extra)
        # Whole-word views (see the module docstring): avail16[1] = avail.idx,
        # avail16[2 + i] = avail.ring[i], avail16[2 + N] = used_event; used16[1] =
        # used.idx, used16[2 + 4N] = avail_event; used32[2i], used32[2i + 1] = ring[i].
        self._avail16 = self.avail.cast("H")
        self._used16 = self.used.cast("H")
        self._used32 = self.used[4 : 4 + 8 * size].cast("I")
        self.event_idx = event_idx
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = self._used16[1]
        self.stats = QueueStats()
        self.broken = False
        self._used_event = 2 + size
        self._avail_event = 2 + 4 * size

    # -- avail side -----------------------------------------------------------------------
    def pending(self) -> int:
        """How many avail entries wait; 0 (and ``broken``) if the guest's index is absurd."""
        if self.broken:
            return 0
        n = (self._avail16[1] - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            # 2.7.13: the driver never has more than N buffers out; this ring is corrupt.
            self.broken = True
            self.stats.broken_avail += 1
            return 0
        return n

    def _take_heads(self, max_n: int) -> list[int]:
        n = min(self.pending(), max_n)
        if not n:
            return []
        avail, mask, last = self._avail16, self.size - 1, self.last_avail_idx
        heads = [avail[2 + ((last + i) & mask)] for i in range(n)]
        self.last_avail_idx = (last + n) & 0xFFFF
        return heads

    def walk(self, head: int, writable: bool) -> list[memoryview]:
        """The buffers of the chain at ``head``, all device-writable or all readable.

        Raises :class:`BadChain` for an index out of range, a loop or a chain longer
        than the table (TTL), nested or malformed INDIRECT (2.7.5.3), a buffer of the
        wrong direction, or an address outside guest memory.
        """
        if head < self.size:  # fast path: one direct descriptor (its single fetch is used)
            addr, length, flags, _nxt = DESC.unpack_from(self.desc, 16 * head)
            if not flags & _CHAINED and bool(flags & VIRTQ_DESC_F_WRITE) == writable:
                try:
                    return [self.mem.gpa(addr, length)]
                except BadAddress as exc:
                    raise BadChain(str(exc)) from exc
        return self._walk_chain(head, writable)

    def _walk_chain(self, head: int, writable: bool) -> list[memoryview]:
        """:meth:`walk` for chained and indirect descriptors (fetches each one once)."""
        table, table_n, idx = self.desc, self.size, head
        ttl, indirect, segs = self.size, False, []
        mem = self.mem
        try:
            while True:
                if idx >= table_n:
                    raise BadChain(f"descriptor index {idx} >= {table_n}")
                ttl -= 1
                if ttl < 0:
                    raise BadChain("chain longer than its table (loop?)")
                addr, length, flags, nxt = DESC.unpack_from(table, 16 * idx)
                if flags & VIRTQ_DESC_F_INDIRECT:
                    if indirect or flags & VIRTQ_DESC_F_NEXT:
                        raise BadChain("nested INDIRECT, or INDIRECT with NEXT")
                    # at most N entries: a chain is never longer than the queue
                    # (2.7.5.3.1), so a bigger table only buys a hostile guest CPU time
                    if length == 0 or length % 16 or length > 16 * self.size:
                        raise BadChain(f"indirect table of {length} bytes (queue of {self.size})")
                    table, table_n = mem.gpa(addr, length), length // 16
                    ttl, indirect, idx = table_n, True, 0
                    continue
                if bool(flags & VIRTQ_DESC_F_WRITE) != writable:
                    raise BadChain("buffer of the wrong direction for this queue")
                segs.append(mem.gpa(addr, length))
                if not flags & VIRTQ_DESC_F_NEXT:
                    return segs
                idx = nxt
        except BadAddress as exc:
            raise BadChain(str(exc)) from exc

    # -- used side -----------------------------------------------------------------------
    def put_used(self, entries: Sequence[tuple[int, int]]) -> bool:
        """Write ``(head, length)`` used elements, publish ``used.idx`` once.

        Returns whether the driver wants a notification for this batch (2.7.7 /
        2.7.10).  With EVENT_IDX also asks for a kick at the next avail entry.
        """
        if not entries:
            return False
        used, mask, old = self._used32, self.size - 1, self.used_idx
        idx = old
        for head, length in entries:
            slot = 2 * (idx & mask)
            used[slot] = head
            used[slot + 1] = length
            idx = (idx + 1) & 0xFFFF
        self._used16[1] = idx  # publish after the elements, one 16-bit store
        self.used_idx = idx
        return self.need_notify(old, idx)

    def need_notify(self, old: int, new: int) -> bool:
        """The driver's notification wish for used entries ``old..new``.

        A full fence first, on both paths: used.idx (published) must be visible before
        the driver's flag or used_event is read (2.7.7.2, 2.7.10), or a driver that just
        re-enabled interrupts misses the call."""
        with _fence:
            pass
        if self.event_idx:
            event = self._avail16[self._used_event]
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self._avail16[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def ask_kicks(self, enable: bool) -> None:
        """Ask the driver to kick on new buffers or not (used.flags / avail_event)."""
        if self.event_idx:
            value = self.last_avail_idx if enable else (self.last_avail_idx - 1) & 0xFFFF
            self._used16[self._avail_event] = value
        self._used16[0] = 0 if enable else VIRTQ_USED_F_NO_NOTIFY

    # -- transmitq: frames from the guest -------------------------------------------------
    def pop_frames(self, max_n: int, frames: list, heads: list[int], hdr_len: int = NET_HDR_LEN) -> int:
        """Pop up to ``max_n`` chains of the guest's transmitq.

        Appends each frame (without its virtio-net header) to ``frames`` as a copy
        (``bytes``), taken once: the guest can still write its buffers, and the switch
        classifies a frame (flows, VLANs) before it copies it out, so a view would let
        a guest change a frame after the check (a double fetch).  Its head goes to
        ``heads``; the caller must :meth:`put_used` the
        heads (length 0) when done with the frames.  Bad chains are put on ``heads``
        too (so the guest gets them back) but give no frame.  Returns the number of
        bad chains.  With EVENT_IDX, asks for a kick at the next entry.  The batch ends
        early once it has walked ``_TX_WALK_BUDGET`` descriptors per frame asked for;
        the heads not reached stay pending (:meth:`pending`) for the next batch.
        """
        bad = 0
        desc, size, gpa, unpack = self.desc, self.size, self.mem.gpa, DESC.unpack_from
        taken = self._take_heads(max_n)
        budget = _TX_WALK_BUDGET * max_n  # descriptors; a bad chain counts as N
        for k, head in enumerate(taken):
            if budget < 0:  # spent (heads sharing long chains): the rest waits on the ring
                self.last_avail_idx = (self.last_avail_idx - (len(taken) - k)) & 0xFFFF
                break
            heads.append(head)
            if head < size:  # fast path: header and frame in one readable descriptor
                addr, length, flags, _nxt = unpack(desc, 16 * head)
                if not flags & _NOT_SIMPLE and length > hdr_len:
                    budget -= 1
                    try:
                        frames.append(bytes(gpa(addr, length)[hdr_len:]))
                    except BadAddress:
                        bad += 1
                    continue
            try:  # anything else: the general walk (which fetches the descriptor anew)
                segs = self.walk(head, False)
                budget -= len(segs) + 1
                if len(segs) == 1 and len(segs[0]) > hdr_len:
                    frames.append(bytes(segs[0][hdr_len:]))
                else:
                    frames.append(bytes(_strip_header(segs, hdr_len)))
            except BadChain:
                bad += 1
                budget -= size
        if self.event_idx:
            self._used16[self._avail_event] = self.last_avail_idx
        self.stats.bad_chains += bad
        return bad

    def pop_done(self, max_n: int, frames: list, hdr_len: int = NET_HDR_LEN
                 ) -> tuple[int, bool, int, int]:
        """:meth:`pop_frames`, then every head popped straight back to the guest (used,
        length 0, published once): the frames are copies, so the guest may reuse its
        buffers at once.  Returns (bad chains, whether the driver wants a notification,
        bytes of the frames appended, the longest of them or 0) -- the port's counters
        and MTU check without another pass over the frames.  One call per batch on the
        compiled path."""
        heads: list[int] = []
        before = len(frames)
        bad = self.pop_frames(max_n, frames, heads, hdr_len)
        lengths = [len(f) for f in frames[before:]]
        return (bad, self.put_used([(h, 0) for h in heads]), sum(lengths),
                max(lengths, default=0))

    # -- receiveq: frames to the guest ----------------------------------------------------
    def fill_frames(self, frames: Sequence, mergeable: bool, hdr_len: int = NET_HDR_LEN) -> RxResult:
        """Copy ``frames`` (in order) into the guest's receiveq, header first.

        Stops at the first frame for which the guest has too few buffers (the rest
        are not taken: ``result.taken`` tells how many were).  With MRG_RXBUF a frame
        may span several chains and its header's ``num_buffers`` says how many
        (5.1.6.4); without it a frame must fit one chain or is dropped as too big.
        The descriptors walked per call are bounded (:func:`_walk_budget`).
        Used entries are published once; ``result.notify`` says whether to call.
        """
        res = RxResult()
        used: list[tuple[int, int]] = []
        # every buffer the guest offers now, and a bound on the descriptors walked for
        # them: heads may share one long chain, which must not cost N * N fetches
        avail = _Avail(self._take_heads(self.size), _walk_budget(self.size, len(frames)))
        heads, desc, size, gpa = avail.heads, self.desc, self.size, self.mem.gpa
        unpack, hdr = DESC.unpack_from, _HDR1[:hdr_len]
        for frame in frames:
            n = len(frame)
            need = hdr_len + n
            pos = avail.pos
            if pos < len(heads) and heads[pos] < size:  # fast path: one big enough buffer
                head = heads[pos]
                addr, length, flags, _nxt = unpack(desc, 16 * head)
                if flags == VIRTQ_DESC_F_WRITE and length >= need:
                    try:
                        buf = gpa(addr, need)
                    except BadAddress:
                        pass  # the general path below counts it
                    else:
                        buf[:hdr_len] = hdr
                        buf[hdr_len:] = frame
                        avail.pos = pos + 1
                        used.append((head, need))
                        res.taken += 1
                        res.sent += 1
                        res.bytes += n
                        continue
            mark = avail.pos
            chains = self._collect(avail, need, mergeable, res, used, hdr_len)
            if chains is None:
                avail.pos = mark  # not consumed: the guest keeps these buffers
                break
            res.taken += 1
            if not chains:
                continue  # dropped (too big or bad chain), heads already returned
            if len(chains) == 1:
                used.append((chains[0][0], _scatter_one(chains[0][1], hdr_len, frame)))
            else:
                lengths = _scatter([segs for _, segs in chains], hdr_len, len(chains), frame)
                used.extend((head, n) for (head, _), n in zip(chains, lengths))
            res.sent += 1
            res.bytes += len(frame)
        # give back the heads we looked at but did not use
        self.last_avail_idx = (self.last_avail_idx - (len(avail.heads) - avail.pos)) & 0xFFFF
        self.stats.bad_chains += res.bad
        res.notify = self.put_used(used)
        return res

    def _collect(self, avail: _Avail, need: int, mergeable: bool, res: RxResult,
                 used: list, hdr_len: int = NET_HDR_LEN) -> list | None:
        """Chains with room for ``need`` bytes; ``None`` if the guest has too few buffers
        (or the batch's walk budget is spent: heads sharing one long chain);
        ``[]`` if the frame is dropped (bad chain or too big) with the heads returned.
        With MRG_RXBUF a chain smaller than the virtio-net header is a bad chain: every
        buffer must hold a whole header (5.1.6.3.1), where num_buffers is read."""
        chains: list[tuple[int, list[memoryview]]] = []
        room = 0
        heads = avail.heads
        while room < need:
            if avail.pos >= len(heads):
                return None
            head = heads[avail.pos]
            avail.pos += 1
            try:
                segs = self.walk(head, True)
            except BadChain:
                res.bad += 1
                used.extend((h, 0) for h in [*(h for h, _ in chains), head])
                return []
            avail.budget -= len(segs)
            if avail.budget < 0:
                return None  # hostile layout: treat as out of buffers (not consumed)
            chain_room = len(segs[0]) if len(segs) == 1 else sum(map(len, segs))
            if mergeable and chain_room < hdr_len:
                res.bad += 1
                used.extend((h, 0) for h in [*(h for h, _ in chains), head])
                return []
            chains.append((head, segs))
            room += chain_room
            if not mergeable and room < need:
                res.too_big += 1
                used.append((head, 0))
                return []
        return chains


def longest(frames: Sequence) -> int:
    """The length of the longest of ``frames`` (0 if none), for a port's MTU check of a
    batch; the compiled kernel has the same function."""
    return max(map(len, frames), default=0)


def new_virtqueue(mem: GuestMemory, size: int, desc: int, avail: int, used: int, *,
                  last_avail_idx: int = 0, event_idx: bool = False) -> Virtqueue:
    """A virtqueue of the data path that runs: the compiled kernel's (same interface,
    ``pyswitch.fastpath._vring``) or this module's :class:`Virtqueue`."""
    kernel = fastpath.kernel("_vring")
    cls = Virtqueue if kernel is None else kernel.Virtqueue
    return cls(mem, size, desc, avail, used, last_avail_idx=last_avail_idx, event_idx=event_idx)


def _walk_budget(size: int, frames: int) -> int:
    """Descriptors one fill of ``frames`` frames may walk on a ring of ``size``: two
    rings' worth plus 64 per frame, far more than a real driver's buffers use (1-2 each)."""
    return 2 * size + 64 * frames


class _Avail:
    """Heads taken from the avail ring for one batch and how many were consumed."""

    __slots__ = ("heads", "pos", "budget")

    def __init__(self, heads: list[int], budget: int) -> None:
        self.heads, self.pos, self.budget = heads, 0, budget


@dataclass(slots=True)
class RxResult:
    """Outcome of :meth:`Virtqueue.fill_frames`."""

    taken: int = 0  # frames consumed from the input (sent or dropped for a reason below)
    sent: int = 0
    bytes: int = 0
    bad: int = 0  # dropped: bad descriptor chain
    too_big: int = 0  # dropped: larger than one guest buffer without MRG_RXBUF
    notify: bool = False


#: Longest frame a chain may carry: no offloads are offered, so a frame is at most the
#: largest port MTU (65535) plus an Ethernet header and one tag.  Checked before a
#: multi-buffer frame is copied (the buffers may all point at the same guest memory).
MAX_TX_FRAME = 65535 + 18


def _strip_header(segs: list[memoryview], hdr_len: int) -> memoryview | bytes:
    """The frame after the virtio-net header, whatever the split of the buffers.

    :class:`BadChain` if the chain holds no frame or one longer than ``MAX_TX_FRAME``."""
    if sum(map(len, segs)) - hdr_len > MAX_TX_FRAME:
        raise BadChain(f"chain of more than {MAX_TX_FRAME} bytes after the header")
    skip = hdr_len
    parts = []
    for seg in segs:
        if skip:
            if len(seg) <= skip:
                skip -= len(seg)
                continue
            seg = seg[skip:]
            skip = 0
        if len(seg):
            parts.append(seg)
    if skip or not parts:
        raise BadChain("chain shorter than the virtio-net header plus a frame")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _scatter_one(segs: list[memoryview], hdr_len: int, frame) -> int:
    """Header (num_buffers 1) and frame into one chain; bytes written."""
    first = segs[0]
    total = hdr_len + len(frame)
    if len(first) >= total:
        first[:hdr_len] = _HDR1[:hdr_len]
        first[hdr_len:total] = frame
        return total
    return _scatter([segs], hdr_len, 1, frame)[0]


_HDR1 = NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)


def _scatter(chains: list[list[memoryview]], hdr_len: int, nbufs: int, frame) -> list[int]:
    """Write header (num_buffers = ``nbufs``) then ``frame`` across the chains' buffers;
    return the bytes written into each chain."""
    hdr = NET_HDR.pack(0, 0, 0, 0, 0, 0, nbufs)[:hdr_len]
    first = chains[0][0]
    total = hdr_len + len(frame)
    if len(first) >= total:  # the common case: one buffer holds it all
        first[:hdr_len] = hdr
        first[hdr_len:total] = frame
        return [total] + [0] * (len(chains) - 1)
    pieces = (memoryview(hdr), memoryview(frame).cast("B"))
    pi, po, lengths = 0, 0, []
    for segs in chains:
        written = 0
        for seg in segs:
            so = 0
            while so < len(seg) and pi < 2:
                piece = pieces[pi]
                take = min(len(seg) - so, len(piece) - po)
                seg[so : so + take] = piece[po : po + take]
                so, po, written = so + take, po + take, written + take
                if po == len(piece):
                    pi, po = pi + 1, 0
        lengths.append(written)
    return lengths
