"""An AF_PACKET socket with a memory-mapped receive ring, bound to one interface.

Receive uses a ``PACKET_RX_RING`` of ``TPACKET_V2`` frames (packet(7),
Documentation/networking/packet_mmap.rst): the kernel copies each frame into a
slot of a ring shared with us and flips the slot's ``tp_status`` to
``TP_STATUS_USER``; a batch is read without any system call, handed to the switch
as memoryviews into the ring, and returned to the kernel (``TP_STATUS_KERNEL``) by
:meth:`PacketRing.release`.  So the receive path allocates one memoryview per frame
and nothing else, and received frames are valid until ``release()``.

The ring also fixes a correctness trap of plain ``recv()``: the kernel strips an
802.1Q tag into skb metadata before AF_PACKET sees the frame (``skb_vlan_untag``),
so a plain read loses it.  The ring header carries it (``tp_vlan_tci``,
``tp_vlan_tpid``) and we put it back in the frame, using the 4 bytes of headroom
reserved with ``PACKET_RESERVE``.

Transmit is one ``send()`` per frame on the same non-blocking socket.
``PACKET_IGNORE_OUTGOING`` keeps the ring from seeing our own transmissions.

This is the reference.  When the compiled data path runs, :func:`open_ring` returns the
kernel's ``PacketRingV3`` instead (``pyswitch/fastpath/_pktio.pyx``: a ``TPACKET_V3``
block ring read in C, frames as ``bytes``, the same methods and counters).
"""

from __future__ import annotations

import errno
import logging
import mmap
import socket
import struct
from collections.abc import Sequence
from types import ModuleType

from pyswitch.ports.frames import VLAN_TPIDS, send_each

from pyswitch.port import Frame, PortCounters, PortError

# linux/if_packet.h, linux/if_ether.h
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_RESERVE = 12
PACKET_IGNORE_OUTGOING = 23
TPACKET_V2 = 1
TPACKET_V3 = 2
ETH_P_ALL = 0x0003
SO_SNDBUFFORCE = 32
TP_STATUS_USER = 0x1
TP_STATUS_LOSING = 0x4
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40

#: struct tpacket2_hdr: status, len, snaplen, mac, net, sec, nsec, vlan_tci, vlan_tpid, pad.
TPACKET2_HDR = struct.Struct("=IIIHHIIHH4x")
_TPACKET_REQ = struct.Struct("=IIII")  # block_size, block_nr, frame_size, frame_nr
_TPACKET_STATS = struct.Struct("=II")  # tp_packets, tp_drops (reset on read)
_VLAN_TAG = struct.Struct("!HH")  # TPID, TCI
_STATUS_KERNEL = b"\x00\x00\x00\x00"
# Where the MAC header lands in a slot (tpacket_rcv): netoff = TPACKET_ALIGN(TPACKET2_HDRLEN 52
# + 16) + tp_reserve 4 = 84, macoff = netoff - 14 = 70; 8 bytes of margin on top.
_MAC_OFFSET_MAX = 78
RING_BYTES = 2 << 20
VLAN_HEADROOM = 4


def frame_slot_size(mtu: int) -> int:
    """Smallest power-of-two ring slot that holds header, headroom and an MTU-sized
    frame with one VLAN tag (at least 2048)."""
    need = _MAC_OFFSET_MAX + 14 + 4 + mtu
    size = 2048
    while size < need:
        size <<= 1
    return size


log = logging.getLogger(__name__)


#: The ring the compiled path reads by default (a veth port's ``rx-ring`` option picks):
#: 2: TPACKET_V2 slots read in C (each frame seen at once: a lone frame crosses in tens
#: of microseconds); 3: TPACKET_V3 blocks (the least CPU per frame under load, but a lone
#: frame waits for the kernel's block timer: up to a jiffy, 4 ms at HZ=250, which a
#: switch cannot ask of interactive traffic).  See _pktio.pyx's docstring.
COMPILED_TPACKET = 2
#: ``rx-ring`` option values of a veth port -> TPACKET version
RX_RINGS = {"tpacket-v2": 2, "tpacket-v3": 3}


def open_ring(
    ifname: str,
    mtu: int,
    counters: PortCounters,
    pktio: ModuleType | None = None,
    ring_bytes: int = RING_BYTES,
    tpacket: int | None = None,
) -> PacketRing:
    """The receive ring and transmit loop of a veth port: the compiled kernel's
    ``PacketRingV3`` or ``PacketRingV2`` (``tpacket``, default :data:`COMPILED_TPACKET`)
    when ``pktio`` (the ``_pktio`` module) is given, else the Python :class:`PacketRing`.
    ``PortError`` if the socket or ring cannot be set up."""
    if pktio is None:
        return PacketRing(ifname, mtu, counters, ring_bytes)
    tpacket = tpacket or COMPILED_TPACKET
    sock = _open_socket(ifname, TPACKET_V3 if tpacket == 3 else TPACKET_V2)
    try:
        kind = pktio.PacketRingV3 if tpacket == 3 else pktio.PacketRingV2
        return kind(sock, ifname, mtu, counters, ring_bytes)  # type: ignore[no-any-return]
    except OSError as exc:
        sock.close()
        raise PortError(f"setting up the receive ring on {ifname!r}: {exc.strerror}") from exc


#: Slots after an empty reader's slot looked at for frames (see PacketRing._resync).
RESYNC_LOOKAHEAD = 8


class PacketRing:
    """A non-blocking AF_PACKET socket bound to ``ifname`` with a TPACKET_V2 RX ring.

    ``receive``/``release``/``transmit`` count into ``counters`` as the port contract
    says; ``mtu`` sets the size limit (``mtu + 14``, ``+ 4`` when VLAN-tagged).
    """

    def __init__(
        self, ifname: str, mtu: int, counters: PortCounters, ring_bytes: int = RING_BYTES
    ) -> None:
        self.ifname = ifname
        self.mtu = mtu
        self.counters = counters
        self._limit = mtu + 14
        self._held: list[int] = []
        self._head = 0
        self._suspect = False  # the reader's slot was empty with a frame after it
        self.resyncs = 0  # times the reader skipped slots the kernel left empty
        self.sock = _open_socket(ifname)
        try:
            self._setup_ring(ring_bytes)
        except OSError as exc:
            self.sock.close()
            raise PortError(f"setting up the receive ring on {ifname!r}: {exc.strerror}") from exc

    def _setup_ring(self, ring_bytes: int) -> None:
        self._slot = frame_slot_size(self.mtu)
        block = max(self._slot, 1 << 16)
        blocks = max(1, ring_bytes // block)
        self._slots = blocks * (block // self._slot)
        req = _TPACKET_REQ.pack(block, blocks, self._slot, self._slots)
        self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        self._mmap = mmap.mmap(
            self.sock.fileno(), block * blocks, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._mv = memoryview(self._mmap)
        # bind last: frames start arriving in the ring from here on.
        self.sock.bind((self.ifname, ETH_P_ALL))

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, max_frames: int) -> list[Frame]:
        """Up to ``max_frames`` frames from the ring as views; never blocks.

        At most ``max_frames`` slots are examined, so a batch of oversized (dropped)
        frames may return fewer frames, even none, while more are pending; the fd stays
        readable then.  Slots of dropped frames go straight back to the kernel."""
        mv, mm, unpack, slot, nslots = (
            self._mv,
            self._mmap,
            TPACKET2_HDR.unpack_from,
            self._slot,
            self._slots,
        )
        held, head, limit = self._held, self._head, self._limit
        if not unpack(mv, head * slot)[0] & TP_STATUS_USER:
            head = self._resync(head)
            if head < 0:
                return []
        out: list[Frame] = []
        nbytes = oversize = 0
        lost = False
        for _ in range(max_frames):  # slots examined, dropped ones included: bounded work
            off = head * slot
            status, length, snap, mac, _net, _s, _ns, tci, tpid = unpack(mv, off)
            if not status & TP_STATUS_USER:
                break
            head = head + 1 if head + 1 < nslots else 0
            lost |= bool(status & TP_STATUS_LOSING)
            start = off + mac
            if status & TP_STATUS_VLAN_VALID:  # re-insert the tag the kernel took out
                mm.move(start - 4, start, 12)
                _VLAN_TAG.pack_into(
                    mv, start + 8, tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100, tci
                )
                start -= 4
                snap += 4
                length += 4
            if length > limit and (
                snap < length or length > limit + 4 or mv[start + 12 : start + 14] not in VLAN_TPIDS
            ):
                oversize += 1
                mv[off : off + 4] = _STATUS_KERNEL  # nobody will release() a dropped slot
                continue
            held.append(off)
            out.append(mv[start : start + snap])
            nbytes += snap
        self._head = head
        counters = self.counters
        counters.rx_packets += len(out)
        counters.rx_bytes += nbytes
        if oversize:
            counters.drop("mtu", oversize, rx=True)
        if lost:
            self.poll_kernel_drops()
        return out

    def _resync(self, head: int) -> int:
        """The reader's slot is empty.  Usually the ring is just drained; but the kernel
        may have moved on past a slot it never filled (seen after floods), and then
        nothing would ever be read again while the fd stays readable.  If one of the
        next ``RESYNC_LOOKAHEAD`` slots holds a frame on two looks in a row (the first
        may catch a slot still being filled on another CPU), skip to it; a frame that
        lands in the skipped slot later is read when the reader comes round.  Returns
        the slot to read from, or -1 for nothing to read."""
        nslots, slot, mv = self._slots, self._slot, self._mv
        for k in range(1, min(RESYNC_LOOKAHEAD, nslots)):
            nxt = (head + k) % nslots
            if mv[nxt * slot] & TP_STATUS_USER:  # status is little-endian: low byte
                if not self._suspect:
                    self._suspect = True
                    return -1
                self._suspect = False
                self.resyncs += 1
                log.warning("%s: AF_PACKET ring out of step: skipped %d empty slot(s)",
                            self.ifname, k)
                return nxt
        self._suspect = False
        return -1

    def release(self) -> None:
        """Give every slot handed out since the last release back to the kernel."""
        mv = self._mv
        for off in self._held:
            mv[off : off + 4] = _STATUS_KERNEL
        self._held.clear()

    def transmit(self, frames: Sequence[Frame]) -> int:
        """Send each frame; returns how many were sent.  Oversized frames are dropped
        one by one (``mtu``); a full socket after retries (``tx_full``) or a down link (``link_down``)
        drops the rest of the batch (:func:`pyswitch.ports.frames.send_each`)."""
        return send_each(frames, self.sock.send, self._limit, self.counters, _tx_error_reason)

    def poll_kernel_drops(self) -> int:
        """Fold the kernel's count of frames lost for want of a free ring slot into
        ``drops["no_buffer"]`` (rx); returns how many were new."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        _packets, drops = _TPACKET_STATS.unpack(raw)
        if drops:
            self.counters.drop("no_buffer", drops, rx=True)
        return int(drops)

    def ring_info(self) -> dict[str, int]:
        return {"tpacket_version": 2, "ring_slots": self._slots, "slot_size": self._slot}

    def close(self) -> None:
        """Close the socket and unmap the ring (idempotent).  Views the switch still
        holds keep the mapping alive until they are dropped."""
        if self.sock.fileno() < 0:
            return
        self._held.clear()
        self._mv.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # outstanding frame views; the mapping goes when they do
        self.sock.close()


def _open_socket(ifname: str, version: int = TPACKET_V2) -> socket.socket:
    """Create the socket with protocol 0 (it receives nothing until bound), set it up
    for a ring of ``version`` (V2 reserves headroom for the tag; V3's kernel copies)."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except OSError as exc:
        raise PortError(f"opening an AF_PACKET socket for {ifname!r}: {exc.strerror}") from exc
    try:
        sock.setblocking(False)
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, version)
        if version == TPACKET_V2:
            sock.setsockopt(SOL_PACKET, PACKET_RESERVE, VLAN_HEADROOM)
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    except OSError as exc:
        sock.close()
        raise PortError(f"configuring the AF_PACKET socket for {ifname!r}: {exc.strerror}") from exc
    return sock


def _tx_error_reason(exc: OSError) -> str:
    """Map a ``send()`` error to a drop reason of :data:`pyswitch.port.DROP_REASONS`."""
    if exc.errno in (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM):
        return "tx_full"
    if exc.errno in (errno.ENETDOWN, errno.ENXIO, errno.ENODEV, errno.EIO):
        return "link_down"
    if exc.errno == errno.EMSGSIZE:
        return "mtu"
    if exc.errno == errno.EINVAL:
        return "malformed"
    return "link_down"
