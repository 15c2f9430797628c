"""The vhost-user net device: the back end's state machine, one message at a time.

:class:`Device` takes decoded :class:`~.protocol.Message` objects and returns the
encoded reply, if any.  It owns the negotiated features, the guest memory and the
per-ring state; it never touches the socket or the event loop (the port does), so
it can be driven directly in tests.

Ring life cycle (vhost-user.rst, "Ring states"): every ring starts **stopped** and
**disabled**.

* A ring **starts** on its first kick: the port calls :meth:`Device.kick` when the
  kick eventfd becomes readable.  If SET_VRING_KICK carries the no-fd flag (bit 8)
  the front end will never kick and the ring is polled, so it starts at once; and a
  ring whose avail ring already holds buffers when its kick fd arrives counts as
  kicked (a kick sent before a reconnect is otherwise lost).
* A ring **stops** on GET_VRING_BASE, whose reply is the next avail index.
* If VHOST_USER_F_PROTOCOL_FEATURES is negotiated, SET_VRING_ENABLE enables and
  disables rings one by one; otherwise SET_FEATURES enables every ring.

Replies: GET_* always reply.  With the REPLY_ACK protocol feature, a request that
set NEED_REPLY gets a u64 status (0 = success); a front end that receives a
non-zero status drops the connection, which is what we want for a request we cannot
honour.  An unknown request is logged and answered with a failure status when a
reply is asked, never ignored into a hang.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from . import protocol as p
from .memory import BadAddress, GuestMemory
from .virtqueue import MAX_QUEUE_SIZE, Virtqueue, new_virtqueue

log = logging.getLogger(__name__)

# virtio feature bits (virtio 1.2, 5.1.3 and 6).
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_MQ = 1 << 22
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32

#: What we offer, always the same (a front end that reconnects must see the same set).
#: VIRTIO_NET_F_MQ is the device half of multiqueue: QEMU (vhost-user "user feature
#: bits") and DPDK virtio-user give a guest more than one queue pair only if the back
#: end offers it; the control queue that sets the pair count stays in the front end.
OFFERED_FEATURES = (
    VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_MRG_RXBUF
    | VIRTIO_NET_F_MQ
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VHOST_USER_F_PROTOCOL_FEATURES
)
OFFERED_PROTOCOL_FEATURES = (
    p.ProtocolFeature.MQ | p.ProtocolFeature.REPLY_ACK | p.ProtocolFeature.CONFIGURE_MEM_SLOTS
)
#: Memory regions we accept through ADD_MEM_REG (GET_MAX_MEM_SLOTS); SET_MEM_TABLE
#: carries at most 8.
MAX_MEM_SLOTS = 64
#: Requests whose reply is their value: if one fails the front end would wait forever.
ALWAYS_REPLY = frozenset({
    p.Request.GET_FEATURES, p.Request.GET_PROTOCOL_FEATURES, p.Request.GET_VRING_BASE,
    p.Request.GET_QUEUE_NUM, p.Request.GET_CONFIG, p.Request.GET_INFLIGHT_FD,
    p.Request.GET_MAX_MEM_SLOTS, p.Request.GET_STATUS,
})
#: The requests this device implements; anything else is refused (logged, failure status).
HANDLED = tuple(p.Request[name] for name in (
    "GET_FEATURES", "SET_FEATURES", "SET_OWNER", "RESET_OWNER", "SET_MEM_TABLE",
    "SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE", "GET_VRING_BASE", "SET_VRING_KICK",
    "SET_VRING_CALL", "SET_VRING_ERR", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM", "SET_VRING_ENABLE", "GET_MAX_MEM_SLOTS", "ADD_MEM_REG", "REM_MEM_REG",
))
#: Requests that may carry fds (vhost-user.rst); an fd on any other is a broken peer.
#: REM_MEM_REG: older QEMU sends the region's fd, which the spec still allows (unused).
TAKE_FDS = frozenset({
    p.Request.SET_MEM_TABLE, p.Request.SET_LOG_BASE, p.Request.SET_LOG_FD,
    p.Request.SET_VRING_KICK, p.Request.SET_VRING_CALL, p.Request.SET_VRING_ERR,
    p.Request.SET_BACKEND_REQ_FD, p.Request.SET_INFLIGHT_FD, p.Request.ADD_MEM_REG,
    p.Request.REM_MEM_REG,
})
#: Queue pairs we support (GET_QUEUE_NUM); vrings are 2 * this.
MAX_QUEUE_PAIRS = 8


class DeviceError(Exception):
    """A request cannot be honoured; the message is for the operator's log."""


class FatalDeviceError(DeviceError):
    """A request we must answer but cannot: the connection has to be dropped."""


@dataclass(slots=True)
class Vring:
    """One ring's state as set by the front end.  ``queue`` exists while started."""

    index: int
    num: int = 0
    addr: p.VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    polled: bool = False  # SET_VRING_KICK with the no-fd flag: no kicks, poll instead
    kicked: bool = False  # kicked while not yet startable: start once it is set up
    started: bool = False
    enabled: bool = False
    queue: Virtqueue | None = None

    @property
    def is_tx(self) -> bool:
        """Odd rings are the guest's transmitq (frames into the switch)."""
        return bool(self.index & 1)

    def call(self) -> bool:
        """Signal the call eventfd; False if there is none (the front end polls) or it
        would block (the counter is full: the front end has a call pending anyway)."""
        if self.call_fd is None:
            return False
        try:
            os.eventfd_write(self.call_fd, 1)
        except OSError:
            return False
        return True

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _require_eventfd(fd: int | None, msg: p.Message) -> None:
    """``DeviceError`` unless ``fd`` (if any) is an eventfd, as vhost-user.rst specifies
    for kick, call and err.  Anything else is hostile or broken: a pipe at EOF or a
    file is always readable (the level-triggered loop would spin on the kick), and a
    pipe nobody reads fills up."""
    if fd is None:
        return
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise DeviceError(f"{msg.name()}: cannot inspect fd: {exc}") from exc
    if kind != "anon_inode:[eventfd]":
        raise DeviceError(f"{msg.name()}: fd is {kind}, not an eventfd")


class Device:
    """State machine of one vhost-user net device (one front-end connection)."""

    def __init__(
        self,
        max_queue_pairs: int = MAX_QUEUE_PAIRS,
        before_close_kick: Callable[[int], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        """``before_close_kick(fd)`` runs before a kick fd is closed (the port unwatches it);
        ``on_refused(why)`` for every request refused and every ring that cannot start
        (the port logs it with its name and counts a protocol error)."""
        self.max_queue_pairs = max_queue_pairs
        self._before_close_kick = before_close_kick or (lambda fd: None)
        self._on_refused = on_refused or (lambda why: log.warning("vhost-user %s", why))
        self.features = 0
        self.features_set = False
        self.protocol_features = 0
        self.protocol_negotiated = False  # SET_PROTOCOL_FEATURES was received
        self.owner = False
        self.memory: GuestMemory | None = None
        self.rings = [Vring(i) for i in range(2 * max_queue_pairs)]
        # Request X is handled by the method named x (SET_VRING_KICK -> set_vring_kick).
        self._handlers: dict[int, Callable[[p.Message], bytes | None]] = {
            r: getattr(self, r.name.lower()) for r in HANDLED
        }

    # -- negotiated facts -------------------------------------------------------------
    @property
    def hdr_len(self) -> int:
        """virtio-net header length: 12 with VERSION_1 or MRG_RXBUF, else 10 (5.1.6)."""
        return 12 if self.features & (VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) else 10

    @property
    def mergeable(self) -> bool:
        return bool(self.features & VIRTIO_NET_F_MRG_RXBUF)

    @property
    def event_idx(self) -> bool:
        return bool(self.features & VIRTIO_RING_F_EVENT_IDX)

    def has_protocol(self, feature: int) -> bool:
        """Protocol features count from SET_PROTOCOL_FEATURES on (QEMU sends it before
        SET_FEATURES and already expects REPLY_ACK for SET_FEATURES)."""
        return bool(self.protocol_features & feature)

    # -- dispatch ---------------------------------------------------------------------
    def handle(self, msg: p.Message) -> bytes | None:
        """Apply one request; return the encoded reply or None.

        Raises :class:`FatalDeviceError` when the connection must be dropped (a
        request that needs a reply failed).  Closes fds the handler did not keep.
        """
        handler = self._handlers.get(msg.request)
        ack = msg.need_reply and self.has_protocol(p.ProtocolFeature.REPLY_ACK)
        try:
            if handler is None:
                raise DeviceError(f"unsupported request {msg.name()}")
            if msg.fds and msg.request not in TAKE_FDS:
                raise DeviceError(f"{len(msg.fds)} fds on a request that takes none")
            reply = handler(msg)
        except (DeviceError, p.InvalidMessage) as exc:
            if isinstance(exc, FatalDeviceError) or msg.request in ALWAYS_REPLY:
                raise FatalDeviceError(f"{msg.name()}: {exc}") from exc
            self._on_refused(f"{msg.name()} refused: {exc}")
            if ack:
                return p.encode_u64_reply(msg.request, 1)
            return None
        finally:
            msg.close_fds()
        self._start_kicked()
        if reply is None and ack:
            return p.encode_u64_reply(msg.request, 0)
        return reply

    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.rings):
            raise DeviceError(f"vring index {index} out of range (0..{len(self.rings) - 1})")
        return self.rings[index]

    # -- features ---------------------------------------------------------------------
    def get_features(self, msg: p.Message) -> bytes:
        return p.encode_u64_reply(msg.request, OFFERED_FEATURES)

    def set_features(self, msg: p.Message) -> None:
        value = p.parse_u64(msg)
        if value & ~OFFERED_FEATURES:
            raise DeviceError(f"front end acked features {value & ~OFFERED_FEATURES:#x} not offered")
        self.features, self.features_set = value, True
        if not value & VHOST_USER_F_PROTOCOL_FEATURES:
            for ring in self.rings:  # no SET_VRING_ENABLE will come: all rings enabled
                ring.enabled = True
        return None

    def get_protocol_features(self, msg: p.Message) -> bytes:
        return p.encode_u64_reply(msg.request, int(OFFERED_PROTOCOL_FEATURES))

    def set_protocol_features(self, msg: p.Message) -> None:
        value = p.parse_u64(msg)
        if value & ~int(OFFERED_PROTOCOL_FEATURES):
            raise DeviceError(f"front end acked protocol features {value:#x} not offered")
        self.protocol_features = value
        self.protocol_negotiated = True
        return None

    def get_queue_num(self, msg: p.Message) -> bytes:
        return p.encode_u64_reply(msg.request, self.max_queue_pairs)

    def set_owner(self, msg: p.Message) -> None:
        self.owner = True
        return None

    def reset_owner(self, msg: p.Message) -> None:
        """Deprecated; we take it as: stop everything, forget the negotiation."""
        self.reset()
        return None

    # -- memory -----------------------------------------------------------------------
    def set_mem_table(self, msg: p.Message) -> None:
        """Map the new table, move started rings onto it, then unmap the old one."""
        table = p.parse_mem_table(msg)
        try:
            memory = GuestMemory.map(table, msg.fds)
        except ValueError as exc:
            raise DeviceError(str(exc)) from exc
        old, self.memory = self.memory, memory
        for ring in self.rings:
            if ring.started:
                self._remap_ring(ring)
        if old is not None:
            old.close()
        log.info("vhost-user memory table: %d regions, %d MiB",
                 len(table), memory.total_size() >> 20)
        return None

    def get_max_mem_slots(self, msg: p.Message) -> bytes:
        return p.encode_u64_reply(msg.request, MAX_MEM_SLOTS)

    def add_mem_reg(self, msg: p.Message) -> None:
        """One more region (CONFIGURE_MEM_SLOTS): existing views stay valid, so started
        rings keep running; a ring waiting for its memory may start on its next kick."""
        region = p.parse_single_region(msg)
        if len(msg.fds) != 1:
            raise DeviceError(
                f"ADD_MEM_REG came with {len(msg.fds)} fds: the guest RAM is not shared "
                "(memory-backend-memfd/file with share=on)"
            )
        if self.memory is None:
            self.memory = GuestMemory()
        try:
            self.memory.add(region, msg.fds[0], MAX_MEM_SLOTS)
        except ValueError as exc:
            raise DeviceError(str(exc)) from exc
        return None

    def rem_mem_reg(self, msg: p.Message) -> None:
        """Drop one region; started rings are rebuilt (a ring that lived there stops)."""
        region = p.parse_single_region(msg)
        if self.memory is None or not self.memory.remove(region):
            raise DeviceError(f"REM_MEM_REG: no region at guest physical {region.guest_phys_addr:#x}")
        for ring in self.rings:
            if ring.started:
                self._remap_ring(ring)
        return None

    def _remap_ring(self, ring: Vring) -> None:
        assert ring.queue is not None
        ring.base = ring.queue.last_avail_idx
        ring.queue = None
        try:
            ring.queue = self._build_queue(ring)
        except DeviceError as exc:
            self._on_refused(f"vring {ring.index} stopped after memory change: {exc}")
            ring.started = False

    # -- rings ------------------------------------------------------------------------
    def set_vring_num(self, msg: p.Message) -> None:
        state = p.parse_vring_state(msg)
        ring = self._stopped_ring(state.index, msg)
        if not (0 < state.num <= MAX_QUEUE_SIZE and state.num & (state.num - 1) == 0):
            raise DeviceError(f"vring {state.index}: size {state.num} not a power of 2 <= 32768")
        ring.num = state.num
        return None

    def set_vring_addr(self, msg: p.Message) -> None:
        addr = p.parse_vring_addr(msg)
        ring = self._ring(addr.index)
        ring.addr = addr
        if ring.started:  # e.g. logging switched on: same ring, maybe new addresses
            assert ring.queue is not None
            self._remap_ring(ring)
        return None

    def set_vring_base(self, msg: p.Message) -> None:
        state = p.parse_vring_state(msg)
        self._stopped_ring(state.index, msg).base = state.num & 0xFFFF
        return None

    def get_vring_base(self, msg: p.Message) -> bytes:
        """Stop the ring; reply with the next avail index to process."""
        state = p.parse_vring_state(msg)
        try:
            ring = self._ring(state.index)
        except DeviceError as exc:
            raise FatalDeviceError(str(exc)) from exc
        self.stop_ring(ring)
        return p.encode_reply(msg.request, p.VRING_STATE.pack(ring.index, ring.base))

    def stop_ring(self, ring: Vring) -> None:
        """Stop ``ring`` (keeping its avail index as base) and close its kick fd."""
        if ring.queue is not None:
            ring.base = ring.queue.last_avail_idx
        ring.queue, ring.started, ring.polled, ring.kicked = None, False, False, False
        self._close_kick(ring)

    def _vring_fd(self, msg: p.Message) -> tuple[Vring, int | None]:
        """The ring and the eventfd (None: no fd, the ring is polled) of a
        SET_VRING_KICK/CALL/ERR; DeviceError, with the fd closed, if either is wrong."""
        index, fd = p.parse_vring_fd(msg)
        try:
            ring = self._ring(index)
            _require_eventfd(fd, msg)
        except DeviceError:
            if fd is not None:
                os.close(fd)
            raise
        return ring, fd

    def set_vring_kick(self, msg: p.Message) -> None:
        ring, fd = self._vring_fd(msg)
        self._close_kick(ring)
        ring.kick_fd, ring.polled = fd, fd is None
        if fd is not None:
            os.set_blocking(fd, False)
        if fd is None or self._has_pending(ring):
            self.start_ring(ring)
        return None

    def _close_kick(self, ring: Vring) -> None:
        if ring.kick_fd is not None:
            self._before_close_kick(ring.kick_fd)
            os.close(ring.kick_fd)
            ring.kick_fd = None

    def set_vring_call(self, msg: p.Message) -> None:
        self._set_fd(msg, "call_fd")
        return None

    def set_vring_err(self, msg: p.Message) -> None:
        self._set_fd(msg, "err_fd")
        return None

    def _set_fd(self, msg: p.Message, name: str) -> None:
        ring, fd = self._vring_fd(msg)
        old = getattr(ring, name)
        if old is not None:
            os.close(old)
        if fd is not None:
            # The front end shares this eventfd and can fill its counter: a blocking
            # write would then hang the loop.  (QEMU's own eventfds are non-blocking.)
            os.set_blocking(fd, False)
        setattr(ring, name, fd)

    def set_vring_enable(self, msg: p.Message) -> None:
        state = p.parse_vring_state(msg)
        # QEMU sends SET_VRING_ENABLE as soon as protocol features were exchanged (it
        # only does that after seeing bit 30 offered), possibly before SET_FEATURES acks
        # bit 30; DPDK virtio-user, reconnecting to a restarted back end, sends it before
        # any negotiation (and drops the connection if it is refused).  So it is refused
        # only once SET_FEATURES has left bit 30 out (every ring is enabled then), as
        # DPDK's vhost library never refuses it.
        if self.features_set and not (self.features & VHOST_USER_F_PROTOCOL_FEATURES
                                      or self.protocol_negotiated):
            raise DeviceError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        if state.num > 1:
            raise DeviceError(f"SET_VRING_ENABLE: value {state.num}")
        self._ring(state.index).enabled = bool(state.num)
        return None

    def _stopped_ring(self, index: int, msg: p.Message) -> Vring:
        ring = self._ring(index)
        if ring.started:
            raise DeviceError(f"{msg.name()} on started vring {index}")
        return ring

    # -- start / kick -----------------------------------------------------------------
    def kick(self, index: int) -> Vring:
        """The kick eventfd of ring ``index`` fired: start the ring if it is stopped.

        A kick that comes before the ring is fully set up (memory, size, addresses)
        is remembered, and the ring starts as soon as a later message completes it.
        """
        ring = self.rings[index]
        if not ring.started and not ring.kicked:  # a repeated kick changes nothing
            ring.kicked = not self.start_ring(ring)
        return ring

    def _start_kicked(self) -> None:
        for ring in self.rings:
            if ring.kicked and not ring.started and self._startable(ring):
                ring.kicked = not self.start_ring(ring)

    def _startable(self, ring: Vring) -> bool:
        return self.memory is not None and ring.addr is not None and ring.num != 0

    def start_ring(self, ring: Vring) -> bool:
        """Start ``ring`` if it is fully set up; log and return False if not."""
        if ring.started:
            return True
        try:
            ring.queue = q = self._build_queue(ring)
        except DeviceError as exc:
            self._on_refused(f"vring {ring.index} cannot start: {exc}")
            return False
        if _resume_at_used(q):
            log.warning("vring %d: base %d but used index %d: resuming at the used index",
                        ring.index, ring.base, q.used_idx)
        # A new ring wants kicks: a back end that was killed while it polled this ring
        # left NO_NOTIFY (or a stale avail_event) in guest memory, and the guest would
        # never kick again (the port turns them off itself where it wants them off).
        q.ask_kicks(True)
        ring.started = True
        return True

    def _build_queue(self, ring: Vring) -> Virtqueue:
        if self.memory is None or ring.addr is None or ring.num == 0:
            raise DeviceError("memory table, ring size or ring addresses missing")
        a = ring.addr
        try:
            return new_virtqueue(self.memory, ring.num, a.desc, a.avail, a.used,
                             last_avail_idx=ring.base, event_idx=self.event_idx)
        except (BadAddress, ValueError) as exc:
            raise DeviceError(str(exc)) from exc

    def _has_pending(self, ring: Vring) -> bool:
        try:
            q = self._build_queue(ring)
        except DeviceError:
            return False
        _resume_at_used(q)
        return q.pending() > 0

    # -- teardown ---------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the connection: stop rings, close fds, unmap memory."""
        for ring in self.rings:
            ring.queue = None
            self._close_kick(ring)
            ring.close_fds()
        self.rings = [Vring(i) for i in range(2 * self.max_queue_pairs)]
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.features, self.features_set, self.protocol_features = 0, False, 0
        self.protocol_negotiated = False
        self.owner = False


def _resume_at_used(q: Virtqueue) -> bool:
    """Start a new ring at its used index when SET_VRING_BASE said otherwise; True if so.

    A front end that lost track of the ring sends a base that is not where the ring is:
    DPDK virtio-user, reconnecting to a back end that was killed, sends 0 with its ring
    thousands of entries ahead (and, if the back end set NO_NOTIFY before it died, never
    kicks).  Every entry up to used.idx was consumed by the back end before, so it goes on
    from there, as DPDK's vhost library and QEMU (virtio_queue_restore_last_avail_idx) do.
    """
    if q.used_idx == q.last_avail_idx:
        return False
    q.last_avail_idx = q.used_idx
    return True

