"""What both vhost-user socket roles share: one front-end connection and the data path.

:class:`VhostUserPort` composes the three layers (:mod:`.protocol` over the socket,
:mod:`.device` for the state machine and guest memory, :mod:`.virtqueue` for the
rings) with the switch's port contract (:mod:`pyswitch.port`).  The socket role --
listen or connect -- is added by the subclasses in :mod:`.port`.

Directions are the switch's: :meth:`VhostUserPort.receive` pops the guest's
transmitqs (vring 2i+1), :meth:`VhostUserPort.transmit` fills its receiveqs (vring 2i).
Everything runs on the loop thread.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import Any, Mapping, Sequence

from pyswitch.port import MAX_BURST, Frame, Port, PortError, PortIO, Timer

from pyswitch import fastpath

from . import protocol as p
from . import virtqueue
from .device import Device, FatalDeviceError, Vring

log = logging.getLogger(__name__)

#: Period of the poll timer for rings whose front end sends no kick fd.
POLL_INTERVAL = 0.001
#: Default MTU (as OVS: a larger guest MTU needs the ``mtu`` option too).
DEFAULT_MTU = 1500
#: Options both socket roles accept.
COMMON_OPTIONS = {
    "mtu": f"largest payload after the Ethernet header, both directions (default {DEFAULT_MTU})",
    "n-rxq": "accepted for OVS compatibility; queue pairs follow the front end",
}
_VLAN_TPIDS = (b"\x81\x00", b"\x88\xa8")


class VhostUserPort(Port):
    """What both socket roles share: one connection, one :class:`Device`, the data path."""

    role = ""

    def __init__(self, name: str, options: Mapping[str, str] | None = None) -> None:
        super().__init__(name, options)
        self.mtu = int(self.options.get("mtu", DEFAULT_MTU))
        self._limit = self.mtu + 14  # + 4 for a tagged frame
        self.io: PortIO | None = None
        self.conn: socket.socket | None = None
        self._reader = p.MessageReader()
        self.device = Device(before_close_kick=self._unwatch_kick, on_refused=self._refused)
        kernel = fastpath.kernel("_vring")  # the MTU check's loop: the kernel's on its path
        self._longest = virtqueue.longest if kernel is None else kernel.longest
        self._kick_watch: dict[int, int] = {}  # kick fd -> vring index
        self._tx: list[Vring] = []  # started TX rings
        self._rx: list[Vring] = []  # started and enabled RX rings
        self._tx_rr = 0
        self._poll_timer: Timer | None = None
        self._closed = False
        self.vhost_stats: dict[str, int] = {
            "connections": 0, "reconnects": 0, "disconnects": 0, "kicks": 0,
            "notifications_sent": 0, "notifications_suppressed": 0,
            "tx_disabled_discards": 0, "broken_rings": 0, "protocol_errors": 0,
        }

    @classmethod
    def validate_options(cls, name: str, options: Mapping[str, str]) -> None:
        super().validate_options(name, options)
        text = options.get("mtu", str(DEFAULT_MTU))
        if not text.isdigit() or not 68 <= int(text) <= 65535:
            raise PortError(f"port {name}: mtu {text!r} is not a number in 68..65535")

    # -- connection ---------------------------------------------------------------------
    def _connected(self, sock: socket.socket) -> None:
        assert self.io is not None
        sock.setblocking(False)  # messages are assembled as they arrive (MessageReader)
        self.conn = sock
        self._reader = p.MessageReader()
        stats = self.vhost_stats
        stats["reconnects"] += 1 if stats["connections"] else 0
        stats["connections"] += 1
        self.io.watch(sock.fileno(), self._on_control)
        log.info("%s: vhost-user front end connected", self.name)

    def _disconnect(self, reason: str) -> None:
        """Drop the front end: rings, fds and memory go; counters stay."""
        if self.conn is None:
            return
        assert self.io is not None
        log.info("%s: vhost-user front end disconnected: %s", self.name, reason)
        self.io.unwatch(self.conn.fileno())
        self.conn.close()
        self.conn = None
        self._reader.close()
        self.device.reset()  # unwatches kick fds through _unwatch_kick
        self._refresh()
        self.vhost_stats["disconnects"] += 1
        self._after_disconnect()

    def _refused(self, why: str) -> None:
        """A request refused, a malformed message, or a ring that cannot start: the
        front end broke the protocol (or we cannot honour it).  Logged and counted."""
        log.warning("%s: vhost-user %s", self.name, why)
        self.vhost_stats["protocol_errors"] += 1

    def _after_disconnect(self) -> None:
        """Role-specific: wait for the next front end (server) or reconnect (client)."""

    def _on_control(self) -> None:
        """The control socket is readable: handle the messages completed by now."""
        if self.conn is None:
            return
        try:
            messages = self._reader.read(self.conn)
        except p.Disconnected as exc:
            self._disconnect(str(exc))
            return
        except p.ProtocolError as exc:  # a bad header, or EOF inside a message
            self._refused(f"message refused: {exc}")
            self._disconnect(str(exc))
            return
        for i, msg in enumerate(messages):
            log.debug("%s: %s", self.name, msg.name())
            try:
                reply = self.device.handle(msg)
                if reply is not None:
                    p.send_message(self.conn, reply)
            except FatalDeviceError as exc:
                self._refused(f"{exc}: connection dropped")
                reason = str(exc)
            except p.Disconnected as exc:
                reason = str(exc)
            except Exception as exc:  # a bug on hostile input must cost the connection only
                log.exception("%s: vhost-user %s failed", self.name, msg.name())
                self.vhost_stats["protocol_errors"] += 1
                reason = f"internal error on {msg.name()}: {exc}"
            else:
                continue
            for later in messages[i + 1 :]:
                later.close_fds()
            self._disconnect(reason)
            return
        if messages:
            self._refresh()

    def _refresh(self) -> None:
        """Re-derive watched kick fds, ring lists and the poll timer from the device."""
        assert self.io is not None
        for ring in self.device.rings:
            fd = ring.kick_fd
            if fd is not None and fd not in self._kick_watch:
                self._kick_watch[fd] = ring.index
                self.io.watch(fd, functools.partial(self._on_kick, ring.index))
        rings = self.device.rings
        self._tx = [r for r in rings if r.is_tx and r.started]
        self._rx = [r for r in rings if not r.is_tx and r.started and r.enabled]
        for ring in rings:
            if ring.started and not ring.is_tx and ring.queue is not None:
                ring.queue.ask_kicks(False)  # we look for RX buffers on every transmit
        if any(r.polled for r in self._tx) and self._poll_timer is None:
            self._poll_timer = self.io.call_later(POLL_INTERVAL, self._poll)
        if self._tx:
            self.io.rx_ready()

    def _unwatch_kick(self, fd: int) -> None:
        if self._kick_watch.pop(fd, None) is not None and self.io is not None:
            self.io.unwatch(fd)

    def _on_kick(self, index: int) -> None:
        ring = self.device.rings[index]
        if ring.kick_fd is None:
            return
        try:
            os.eventfd_read(ring.kick_fd)
        except (BlockingIOError, OSError):
            pass
        self.vhost_stats["kicks"] += 1
        if not ring.started:
            self.device.kick(index)
            self._refresh()
        elif ring.is_tx and self.io is not None:
            self.io.rx_ready()

    def _poll(self) -> None:
        self._poll_timer = None
        if self.io is None or not any(r.polled for r in self._tx):
            return
        self.io.rx_ready()
        self._poll_timer = self.io.call_later(POLL_INTERVAL, self._poll)

    # -- data path ----------------------------------------------------------------------
    def receive(self, max_frames: int = MAX_BURST) -> Sequence[Frame]:
        """Frames the guest transmitted (header stripped), at most ``max_frames``.

        Copies taken once from guest memory (a guest cannot change a frame after the
        switch classified it), so the descriptors go back to the guest in the same call
        (``pop_done``: one used.idx update and at most one call per ring and batch).  Bad
        chains are returned to the guest and counted as ``bad_descriptor``; a disabled
        transmitq is drained and its frames discarded (vhost-user.rst, ring states).
        """
        frames: list[Frame] = []
        tx = self._tx
        if not tx:
            return frames
        hdr_len, n = self.device.hdr_len, len(tx)
        start, self._tx_rr = self._tx_rr % n, self._tx_rr + 1
        nbytes, oversize = 0, False
        for i in range(n):
            ring = tx[(start + i) % n]
            q = ring.queue
            if q is None:
                continue
            before = len(frames)
            bad, wanted, got, longest = q.pop_done(max_frames - before, frames, hdr_len)
            if bad or len(frames) > before:
                self._notify(ring, wanted)
            if q.broken:
                self._ring_broken(ring)
            if bad:
                self.counters.drop("bad_descriptor", bad, rx=True)
            if not ring.enabled:
                self.vhost_stats["tx_disabled_discards"] += len(frames) - before
                del frames[before:]
            else:
                nbytes += got
                oversize = oversize or longest > self._limit
            if len(frames) >= max_frames:
                break
        if oversize:  # rare: the kernel's longest frame said so, no pass over the batch
            frames = self._drop_oversize(frames, rx=True)
            nbytes = sum(map(len, frames))
        if frames:
            self.counters.rx_packets += len(frames)
            self.counters.rx_bytes += nbytes
        else:
            self.release()
        return frames

    def _drop_oversize(self, frames: Sequence[Frame], rx: bool) -> list[Frame]:
        """``frames`` without those longer than MTU + 14 (+ 4 if 802.1Q/802.1ad tagged),
        which are counted as ``mtu`` drops."""
        limit = self._limit
        keep = [f for f in frames if len(f) <= limit
                or (len(f) <= limit + 4 and bytes(f[12:14]) in _VLAN_TPIDS)]
        if len(keep) < len(frames):
            self.counters.drop("mtu", len(frames) - len(keep), rx=rx)
        return keep

    def _ring_broken(self, ring: Vring) -> None:
        """The guest moved its avail index (of a transmitq or a receiveq) by more than
        the ring size: stop the ring
        (the front end must set it up again); the port keeps serving the others."""
        log.error("%s: vring %d: avail index corrupt, ring stopped", self.name, ring.index)
        self.vhost_stats["broken_rings"] += 1
        self.device.stop_ring(ring)
        self._refresh()

    def release(self) -> None:
        """The batch's buffers went back at :meth:`receive`.  If any transmitq still
        holds frames (the batch limit stopped us, or a ring the round robin did not
        reach), ask to be serviced again: their kicks were already consumed, and with
        EVENT_IDX the guest may not kick again."""
        if self.io is not None:
            for ring in self._tx:
                q = ring.queue
                if q is not None and q.pending():
                    self.io.rx_ready()
                    break

    def poll_mode(self, polling: bool) -> bool:
        """While the switch polls this port, ask the guest not to kick its transmitqs
        (used.flags NO_NOTIFY; with EVENT_IDX, avail_event left behind — the next batch
        re-arms it); when polling stops, ask again, then look once more: a frame the guest
        queued just before it saw the request would otherwise wait for the next kick."""
        pending = False
        for ring in self._tx:
            q = ring.queue
            if q is None:
                continue
            q.ask_kicks(not polling)
            if not polling and q.pending():
                pending = True
        return pending

    def _notify(self, ring: Vring, wanted: bool) -> None:
        if wanted and ring.call():
            self.vhost_stats["notifications_sent"] += 1
        else:
            self.vhost_stats["notifications_suppressed"] += 1

    def transmit(self, frames: Sequence[Frame]) -> int:
        """Copy ``frames`` into the guest's enabled receiveqs; returns how many were
        sent (pyswitch.port's contract).  The others are counted as drops: ``mtu``,
        ``bad_descriptor``, ``no_buffer`` (no receive buffer), ``link_down`` (no
        receiveq started and enabled)."""
        if not frames:
            return 0
        rx = self._rx
        if not rx:
            self.counters.drop("link_down", len(frames), rx=False)
            return 0
        if self._longest(frames) > self._limit:
            frames = self._drop_oversize(frames, rx=False)
        if len(rx) == 1:
            groups: list[tuple[Vring, Sequence[Frame]]] = [(rx[0], frames)]
        else:
            groups = _spread(rx, frames)
        sent = 0
        for ring, group in groups:
            sent += self._fill(ring, group)
        return sent

    def _fill(self, ring: Vring, frames: Sequence[Frame]) -> int:
        q = ring.queue
        assert q is not None
        res = q.fill_frames(frames, self.device.mergeable, self.device.hdr_len)
        if q.broken:
            self._ring_broken(ring)
        c = self.counters
        c.tx_packets += res.sent
        c.tx_bytes += res.bytes
        if res.bad:
            c.drop("bad_descriptor", res.bad, rx=False)
        if res.too_big:
            c.drop("mtu", res.too_big, rx=False)
        if res.taken < len(frames):
            c.drop("no_buffer", len(frames) - res.taken, rx=False)
        if res.sent or res.bad or res.too_big:
            self._notify(ring, res.notify)
        return res.sent

    # -- operator views -----------------------------------------------------------------
    def link_state(self) -> str:
        """``up`` when a front end is connected and a TX+RX ring pair is started."""
        if self.conn is None:
            return "down"
        rings = self.device.rings
        for i in range(0, len(rings), 2):
            if rings[i].started and rings[i + 1].started:
                return "up"
        return "down"

    def status(self) -> dict[str, Any]:
        dev = self.device
        rings = dev.rings
        pairs = sum(1 for i in range(0, len(rings), 2) if rings[i].enabled and rings[i + 1].enabled)
        return {
            "role": self.role,
            "socket": self.socket_path(),
            "connected": self.conn is not None,
            "features": f"{dev.features:#x}",
            "protocol_features": f"{dev.protocol_features:#x}",
            "mergeable_rx": dev.mergeable,
            "event_idx": dev.event_idx,
            "queue_pairs": pairs if self.conn is not None else 0,
            "memory_regions": len(dev.memory.regions) if dev.memory else 0,
            "vhost_stats": dict(self.vhost_stats),
        }

    def socket_path(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.conn is not None:
            if self.io is not None:
                self.io.unwatch(self.conn.fileno())
            self.conn.close()
            self.conn = None
        self._reader.close()  # fds of a message still being received
        self.device.reset()
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        self._tx, self._rx = [], []


def _spread(rx: list[Vring], frames: Sequence[Frame]) -> list[tuple[Vring, Sequence[Frame]]]:
    """Group frames by receiveq using a hash of the MAC addresses (keeps a flow in order)."""
    n = len(rx)
    buckets: list[list[Frame]] = [[] for _ in range(n)]
    for f in frames:
        buckets[hash(bytes(f[:12])) % n].append(f)
    return [(rx[i], b) for i, b in enumerate(buckets) if b]

