"""A small vhost-user front end for tests: guest memory, driver-side rings, messages.

It plays the part QEMU or DPDK virtio-user plays against pyswitch's back end:

* :class:`GuestRAM` -- guest memory in memfds (one per region), with a bump
  allocator handing out guest-physical addresses and a fake front-end virtual
  address per region (so the two translations differ, as they do in QEMU);
* :class:`DriverQueue` -- the *driver* side of a split virtqueue laid out in that
  memory: write descriptors any way a test likes (chained, indirect, broken), make
  them available, read the used ring;
* :class:`Frontend` -- speaks the protocol over a unix socket (header, payload,
  SCM_RIGHTS fds) and knows the usual negotiation sequence;
* :class:`MiniLoop` -- a tiny select-based :class:`pyswitch.port.PortIO` for tests.

Layouts are the test's choice on purpose: the back end must cope with any of them.
"""

from __future__ import annotations

import mmap
import os
import queue
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pyswitch.ports.vhostuser import protocol as p
from pyswitch.ports.vhostuser.device import (
    OFFERED_FEATURES,
    VHOST_USER_F_PROTOCOL_FEATURES,
)
from pyswitch.ports.vhostuser.memory import GuestMemory
from pyswitch.ports.vhostuser.virtqueue import NET_HDR

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
UVA_BASE = 0x7F00_0000_0000
GETS = frozenset({p.Request.GET_FEATURES, p.Request.GET_PROTOCOL_FEATURES,
                  p.Request.GET_QUEUE_NUM, p.Request.GET_VRING_BASE})


@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    mmap_offset: int
    fd: int
    map: mmap.mmap
    next_free: int = 0


class GuestRAM:
    """Guest memory in memfds.  ``regions`` is a list of (gpa, size) pairs."""

    def __init__(self, regions: list[tuple[int, int]] = [(0, 1 << 21)], mmap_offset: int = 0):
        self.regions: list[Region] = []
        for i, (gpa, size) in enumerate(regions):
            fd = os.memfd_create(f"pst-guest{i}", 0)
            os.ftruncate(fd, size + mmap_offset)
            mm = mmap.mmap(fd, size + mmap_offset)
            uva = UVA_BASE + (i << 32) + 0x1000
            self.regions.append(Region(gpa, size, uva, mmap_offset, fd, mm))

    def table(self) -> list[p.MemRegion]:
        return [p.MemRegion(r.gpa, r.size, r.uva, r.mmap_offset) for r in self.regions]

    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]

    def mapped(self) -> GuestMemory:
        """The back end's view of this memory, without any socket (for layer tests)."""
        return GuestMemory.map(self.table(), self.fds())

    def alloc(self, size: int, align: int = 16, region: int = 0) -> int:
        """A guest-physical address of ``size`` fresh bytes in ``region``."""
        r = self.regions[region]
        off = (r.next_free + align - 1) // align * align
        if off + size > r.size:
            raise MemoryError("test guest RAM exhausted")
        r.next_free = off + size
        return r.gpa + off

    def _locate(self, gpa: int, n: int) -> tuple[Region, int]:
        for r in self.regions:
            if r.gpa <= gpa and gpa + n <= r.gpa + r.size:
                return r, r.mmap_offset + gpa - r.gpa
        raise ValueError(f"test bug: {gpa:#x}+{n} not in guest RAM")

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._locate(gpa, len(data))
        r.map[off : off + len(data)] = data

    def write_u16(self, gpa: int, value: int) -> None:
        """One 16-bit store (ring indexes are read concurrently by the device)."""
        r, off = self._locate(gpa, 2)
        view = memoryview(r.map)
        try:
            view[off : off + 2].cast("H")[0] = value
        finally:
            view.release()

    def read(self, gpa: int, n: int) -> bytes:
        r, off = self._locate(gpa, n)
        return bytes(r.map[off : off + n])

    def uva(self, gpa: int) -> int:
        r, _ = self._locate(gpa, 0)
        return r.uva + gpa - r.gpa

    def close(self) -> None:
        for r in self.regions:
            r.map.close()
            os.close(r.fd)
        self.regions = []


class DriverQueue:
    """The driver side of one split virtqueue in :class:`GuestRAM`."""

    def __init__(self, ram: GuestRAM, size: int = 256, region: int = 0) -> None:
        self.ram, self.size = ram, size
        self.desc = ram.alloc(16 * size, 16, region)
        self.avail = ram.alloc(6 + 2 * size, 2, region)
        self.used = ram.alloc(6 + 8 * size, 4, region)
        self.avail_idx = 0
        self.used_seen = 0
        self.free = list(range(size))

    def addr(self, index: int) -> p.VringAddr:
        """SET_VRING_ADDR payload: ring addresses as front-end virtual addresses."""
        r = self.ram
        return p.VringAddr(index, 0, r.uva(self.desc), r.uva(self.used), r.uva(self.avail), 0)

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.ram.write(base + 16 * i, DESC.pack(addr, length, flags, nxt))

    def add_chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        """Chain of (gpa, len, device-writable) buffers from the free list; return head."""
        ids = [self.free.pop(0) for _ in bufs]
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.write_desc(ids[k], addr, length, flags, 0 if last else ids[k + 1])
        return ids[0]

    def add_indirect(self, bufs: list[tuple[int, int, bool]]) -> int:
        """One descriptor pointing to an indirect table holding ``bufs``."""
        table = self.ram.alloc(16 * len(bufs))
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.write_desc(k, addr, length, flags, 0 if last else k + 1, table=table)
        head = self.free.pop(0)
        self.write_desc(head, table, 16 * len(bufs), F_INDIRECT)
        return head

    def make_available(self, heads: list[int]) -> None:
        """Put heads on the avail ring, then publish avail.idx once."""
        for h in heads:
            slot = self.avail_idx % self.size
            self.ram.write(self.avail + 4 + 2 * slot, U16.pack(h))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail, U16.pack(flags))

    def set_used_event(self, value: int) -> None:
        self.ram.write(self.avail + 4 + 2 * self.size, U16.pack(value))

    def used_idx(self) -> int:
        return U16.unpack(self.ram.read(self.used + 2, 2))[0]

    def used_flags(self) -> int:
        return U16.unpack(self.ram.read(self.used, 2))[0]

    def avail_event(self) -> int:
        return U16.unpack(self.ram.read(self.used + 4 + 8 * self.size, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call; ids go back to the free list."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            elem = USED.unpack(self.ram.read(self.used + 4 + 8 * slot, 8))
            out.append(elem)
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def send_frame(self, frame: bytes, split: str = "together") -> int:
        """Put a frame with a zero 12-byte virtio-net header on this (transmit) queue.

        ``split``: "together" (header and frame in one buffer), "apart" (header, then
        frame), "indirect" (header + frame in an indirect table of 2), "bytes" (one
        buffer per 7 bytes, header split in the middle).
        """
        data = bytes(12) + frame
        if split == "together":
            buf = self.ram.alloc(len(data))
            self.ram.write(buf, data)
            head = self.add_chain([(buf, len(data), False)])
        elif split in ("apart", "indirect"):
            h, f = self.ram.alloc(12), self.ram.alloc(len(frame))
            self.ram.write(h, bytes(12))
            self.ram.write(f, frame)
            bufs = [(h, 12, False), (f, len(frame), False)]
            head = self.add_indirect(bufs) if split == "indirect" else self.add_chain(bufs)
        else:
            bufs = []
            for k in range(0, len(data), 7):
                b = self.ram.alloc(7)
                self.ram.write(b, data[k : k + 7])
                bufs.append((b, len(data[k : k + 7]), False))
            head = self.add_chain(bufs)
        self.make_available([head])
        return head

    def post_rx_buffers(self, count: int, size: int = 2048, pieces: int = 1) -> list[int]:
        """Make ``count`` device-writable chains of ``pieces`` buffers of ``size`` available."""
        heads = []
        for _ in range(count):
            bufs = [(self.ram.alloc(size), size, True) for _ in range(pieces)]
            heads.append(self.add_chain(bufs))
        self.make_available(heads)
        return heads

    def read_chain(self, head: int, length: int) -> bytes:
        """``length`` bytes written by the device into the chain at ``head`` (direct chains)."""
        out, i = b"", head
        while len(out) < length:
            addr, dlen, flags, nxt = DESC.unpack(self.ram.read(self.desc + 16 * i, 16))
            out += self.ram.read(addr, min(dlen, length - len(out)))
            if not flags & F_NEXT:
                break
            i = nxt
        return out

    def receive_frames(self, hdr_len: int = 12) -> list[tuple[bytes, int]]:
        """Frames the device put on this receiveq: (frame, num_buffers), merging buffers."""
        used = self.take_used()
        frames, k = [], 0
        while k < len(used):
            head, length = used[k]
            data = self.read_chain(head, length)
            nbufs = NET_HDR.unpack(data[:12])[6] if length >= 12 else 1
            for extra in used[k + 1 : k + nbufs]:
                data += self.read_chain(*extra)
            frames.append((data[hdr_len:], nbufs))
            k += max(nbufs, 1)
        for h, _ in used:
            self.free.append(h)
        return frames


@dataclass
class Frontend:
    """Speaks vhost-user to a back end over ``sock``."""

    sock: socket.socket
    protocol_features: int = 0
    features: int = 0
    kicks: dict[int, int] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> Frontend:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                s.settimeout(timeout)
                return cls(s)
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:
        flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
        p.send_message(self.sock, p.encode(req, payload, flags), fds)

    def recv(self) -> p.Message:
        return p.read_message(self.sock)

    def request(self, req: int, payload: bytes = b"", fds: list[int] | None = None,
                check: bool = True) -> p.Message:
        """Send; wait for the reply of a GET_* or (REPLY_ACK) the status, asserted 0 if
        ``check``.  Without either, returns an empty message at once."""
        is_get = req in GETS
        ack = bool(self.protocol_features & p.ProtocolFeature.REPLY_ACK) and not is_get
        self.send(req, payload, fds, need_reply=ack)
        if not (ack or is_get):
            return p.Message(req, 0, b"")
        reply = self.recv()
        assert reply.request == req and reply.flags & p.FLAG_REPLY, reply
        if ack and check:
            assert p.U64.unpack(reply.payload)[0] == 0, f"{p.Request(req).name} failed"
        return reply

    def u64(self, req: int, value: int) -> p.Message:
        return self.request(req, p.U64.pack(value))

    def negotiate(self, features: int = OFFERED_FEATURES, protocol: int | None = None) -> int:
        """GET/SET_FEATURES (and protocol features if bit 30 is in ``features``)."""
        self.request(p.Request.SET_OWNER)
        offered = p.U64.unpack(self.request(p.Request.GET_FEATURES).payload)[0]
        assert features & ~offered == 0, f"{features:#x} not in offer {offered:#x}"
        if features & VHOST_USER_F_PROTOCOL_FEATURES:
            pf = p.U64.unpack(self.request(p.Request.GET_PROTOCOL_FEATURES).payload)[0]
            want = pf if protocol is None else protocol
            self.u64(p.Request.SET_PROTOCOL_FEATURES, want)
            self.protocol_features = want
        self.u64(p.Request.SET_FEATURES, features)
        self.features = features
        return offered

    def set_mem_table(self, ram: GuestRAM) -> p.Message:
        table = ram.table()
        payload = p.MEM_TABLE_HEADER.pack(len(table), 0) + b"".join(
            p.MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
            for r in table)
        return self.request(p.Request.SET_MEM_TABLE, payload, ram.fds())

    def setup_ring(self, index: int, q: DriverQueue, base: int = 0, kick: bool = True,
                   enable: bool = True, call: bool = True) -> None:
        """NUM, ADDR, BASE, CALL, KICK (eventfds kept in ``kicks``/``calls``), ENABLE."""
        self.request(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(index, q.size))
        a = q.addr(index)
        self.request(p.Request.SET_VRING_ADDR,
                     p.VRING_ADDR.pack(a.index, a.flags, a.desc, a.used, a.avail, a.log))
        self.request(p.Request.SET_VRING_BASE, p.VRING_STATE.pack(index, base))
        if call:
            cfd = self.calls.setdefault(index, os.eventfd(0, os.EFD_NONBLOCK))
            self.request(p.Request.SET_VRING_CALL, p.U64.pack(index), [cfd])
        else:  # a polling driver: no call eventfd (bit 8)
            self.request(p.Request.SET_VRING_CALL, p.U64.pack(index | p.VRING_NOFD_MASK))
        if kick:
            k = self.kicks.setdefault(index, os.eventfd(0, os.EFD_NONBLOCK))
            self.request(p.Request.SET_VRING_KICK, p.U64.pack(index), [k])
        else:
            self.request(p.Request.SET_VRING_KICK, p.U64.pack(index | p.VRING_NOFD_MASK))
        if enable and self.features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.request(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(index, 1))

    def kick(self, index: int) -> None:
        os.eventfd_write(self.kicks[index], 1)

    def calls_seen(self, index: int) -> int:
        """Calls signalled on ``index`` since the last look (eventfd counter, cleared)."""
        try:
            return os.eventfd_read(self.calls[index])
        except BlockingIOError:
            return 0

    def get_vring_base(self, index: int) -> int:
        reply = self.request(p.Request.GET_VRING_BASE, p.VRING_STATE.pack(index, 0))
        return p.VRING_STATE.unpack(reply.payload)[1]

    def close(self) -> None:
        self.sock.close()
        for fd in [*self.kicks.values(), *self.calls.values()]:
            os.close(fd)
        self.kicks.clear()
        self.calls.clear()


class _Timer:
    def __init__(self, when: float, cb: Callable[[], None]) -> None:
        self.when, self.cb, self.cancelled = when, cb, False

    def cancel(self) -> None:
        self.cancelled = True


class MiniLoop:
    """A select-based PortIO for a port under test, run in its own thread.

    The port is only touched from the loop thread: tests reach it through
    :meth:`run_sync`.  When the port says ``rx_ready``, ``on_ready`` runs (in the loop
    thread) after the current round.
    """

    def __init__(self, on_ready: Callable[[], None] | None = None) -> None:
        self.watches: dict[int, Callable[[], None]] = {}
        self.timers: list[_Timer] = []
        self.ready = False
        self.on_ready = on_ready
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._calls: queue.Queue = queue.Queue()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    # -- PortIO ---------------------------------------------------------------------------
    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.watches[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.watches.pop(fd, None)

    def rx_ready(self) -> None:
        self.ready = True

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        t = _Timer(time.monotonic() + delay, callback)
        self.timers.append(t)
        return t

    def now(self) -> float:
        return time.monotonic()

    # -- driving ----------------------------------------------------------------------------
    def step(self, timeout: float = 0.01) -> None:
        """One round: due timers, readable fds, queued calls, then on_ready."""
        now = time.monotonic()
        for t in [t for t in self.timers if t.when <= now]:
            self.timers.remove(t)
            if not t.cancelled:
                t.cb()
        if self.ready:
            timeout = 0
        fds = [self._wake_r, *self.watches]
        readable, _, _ = select.select(fds, [], [], timeout)
        for fd in readable:
            if fd == self._wake_r:
                self._drain_calls()
                continue
            cb = self.watches.get(fd)
            if cb is not None:
                cb()
        if self.ready and self.on_ready is not None:
            self.ready = False
            self.on_ready()

    def _drain_calls(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        while not self._calls.empty():
            fn, box, done = self._calls.get()
            try:
                box.append(fn())
            except BaseException as exc:  # handed back to the caller
                box.append(exc)
            done.set()

    def run_sync(self, fn: Callable[[], object], timeout: float = 5.0) -> object:
        """Run ``fn`` in the loop thread and return its result (or raise its exception)."""
        if self._thread is None:
            return fn()
        box: list = []
        done = threading.Event()
        self._calls.put((fn, box, done))
        os.write(self._wake_w, b"x")
        if not done.wait(timeout):
            raise TimeoutError("loop thread did not run the call")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def start(self) -> None:
        def run() -> None:
            while not self._stop:
                try:
                    self.step()
                except BaseException as exc:  # surfaced by the test through .errors
                    self.errors.append(exc)
                    return

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(5)
            self._thread = None
        os.close(self._wake_r)
        os.close(self._wake_w)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``cond`` until true or ``timeout``; returns the last value."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class PortHarness:
    """A port opened and attached to a :class:`MiniLoop` thread.

    Frames the port receives are copied into ``sink`` (the first ``keep`` of them;
    ``received`` counts all).  ``call(fn)`` runs ``fn`` in the loop thread.
    """

    def __init__(self, port, keep: int = 1 << 20) -> None:
        self.port = port
        self.sink: list[bytes] = []
        self.received = 0
        self.keep = keep
        self.loop = MiniLoop(on_ready=self._drain)
        port.open()
        port.attach(self.loop)
        self.loop.start()

    def _drain(self) -> None:
        frames = self.port.receive(32)
        self.received += len(frames)
        room = self.keep - len(self.sink)
        if room > 0:
            self.sink.extend(bytes(f) for f in frames[:room])
        if frames:
            self.port.release()

    def call(self, fn):
        return self.loop.run_sync(fn)

    def close(self) -> None:
        try:
            self.loop.run_sync(self.port.close)
        finally:
            self.loop.stop()
        assert not self.loop.errors, self.loop.errors
