"""vhost-user wire format: message header, request codes, payload structs, transport.

The vhost-user protocol (QEMU ``docs/interop/vhost-user.rst``) carries the vhost
ioctls of the kernel's vhost-net over a unix stream socket.  Every message is a
12-byte header of three native-endian u32 (``request``, ``flags``, ``size``)
followed by ``size`` payload bytes; file descriptors travel as SCM_RIGHTS
ancillary data attached to the header.

This module knows bytes and file descriptors only.  It does not know what a ring
or a feature means: that is :mod:`.device`.  One validator per payload turns bytes
into a typed value or raises :class:`InvalidMessage`; the transport raises
:class:`Disconnected` or :class:`PartialMessage`.  Nothing here blocks longer than
the socket's timeout.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from dataclasses import dataclass, field

# -- errors ----------------------------------------------------------------------------


class ProtocolError(Exception):
    """Base of the errors of the vhost-user transport and payload validation."""


class Disconnected(ProtocolError):
    """The peer closed the socket (or it failed) at a message boundary."""


class PartialMessage(ProtocolError):
    """The socket ended or timed out in the middle of a message."""


class InvalidMessage(ProtocolError):
    """A header or payload violates the protocol (size, count of fds, field values)."""


# -- header ----------------------------------------------------------------------------

#: "Header": request u32, flags u32, size u32, native endian (vhost-user.rst, "Message Specification").
HEADER = struct.Struct("=III")
assert HEADER.size == 12

#: flags bits 0-1: protocol version, always 1.
VERSION = 0x1
VERSION_MASK = 0x3
#: flags bit 2: this message is a reply (the back end sets it on every reply).
FLAG_REPLY = 0x4
#: flags bit 3: the sender asks for a u64 status reply (REPLY_ACK protocol feature).
FLAG_NEED_REPLY = 0x8

#: Largest payload we accept.  The biggest request a net back end handles is
#: SET_MEM_TABLE: 8 + 8 * 32 bytes.  Anything far larger is a broken peer.
MAX_PAYLOAD = 4096
#: Most fds in one message: one per memory region (at most 8 in SET_MEM_TABLE).
MAX_FDS = 8


class Request(enum.IntEnum):
    """Front-end request codes, named as in vhost-user.rst without the prefix."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits (vhost-user.rst, "Protocol features")."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


# -- payloads --------------------------------------------------------------------------

#: A u64 payload (features, protocol features, queue num, status reply).
U64 = struct.Struct("=Q")
#: "A vring state description": index u32, num u32.
VRING_STATE = struct.Struct("=II")
#: "A vring address description": index, flags, desc, used, avail, log (note: used before avail).
VRING_ADDR = struct.Struct("=IIQQQQ")
#: "Multiple Memory regions description" header: nregions u32, padding u32.
MEM_TABLE_HEADER = struct.Struct("=II")
#: "Memory region description": guest_phys_addr, memory_size, userspace_addr, mmap_offset.
MEM_REGION = struct.Struct("=QQQQ")
#: "Single memory region description": padding u64 then one region (ADD/REM_MEM_REG).
SINGLE_MEM_REGION = struct.Struct("=QQQQQ")
assert (U64.size, VRING_STATE.size, VRING_ADDR.size) == (8, 8, 40)
assert (MEM_TABLE_HEADER.size, MEM_REGION.size, SINGLE_MEM_REGION.size) == (8, 32, 40)

#: At most this many regions in SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_REGIONS = 8
#: SET_VRING_KICK/CALL/ERR payload: bits 0-7 the ring index, bit 8 "no fd" (poll instead).
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """Ring addresses, front-end virtual addresses (translated through ``userspace_addr``)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True, slots=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(slots=True)
class Message:
    """One message: header fields, raw payload and the fds that came with it.

    The receiver owns ``fds``: whoever consumes the message must keep or close them.
    """

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        """Close every fd still held by the message (those nobody took)."""
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"


def _expect_size(msg: Message, size: int) -> None:
    if len(msg.payload) != size:
        raise InvalidMessage(f"{msg.name()}: payload of {len(msg.payload)} bytes, expected {size}")


def parse_u64(msg: Message) -> int:
    """The u64 payload of SET_FEATURES, SET_PROTOCOL_FEATURES, SET_LOG_BASE ..."""
    _expect_size(msg, U64.size)
    return U64.unpack(msg.payload)[0]


def parse_vring_state(msg: Message) -> VringState:
    """SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE payload."""
    _expect_size(msg, VRING_STATE.size)
    return VringState(*VRING_STATE.unpack(msg.payload))


def parse_vring_addr(msg: Message) -> VringAddr:
    """SET_VRING_ADDR payload (field order on the wire: desc, used, avail)."""
    _expect_size(msg, VRING_ADDR.size)
    return VringAddr(*VRING_ADDR.unpack(msg.payload))


def parse_vring_fd(msg: Message) -> tuple[int, int | None]:
    """SET_VRING_KICK/CALL/ERR: ``(index, fd)``, ``fd`` None when bit 8 (no fd) is set.

    Takes the fd out of ``msg.fds``.  Raises InvalidMessage if the fd count does not
    match the flag or unknown bits are set.
    """
    value = parse_u64(msg)
    if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
        raise InvalidMessage(f"{msg.name()}: unknown bits in {value:#x}")
    index = value & VRING_INDEX_MASK
    if value & VRING_NOFD_MASK:
        if msg.fds:
            raise InvalidMessage(f"{msg.name()}: no-fd flag set but {len(msg.fds)} fds sent")
        return index, None
    if len(msg.fds) != 1:
        raise InvalidMessage(f"{msg.name()}: expected 1 fd, got {len(msg.fds)}")
    return index, msg.fds.pop()


def parse_mem_table(msg: Message) -> list[MemRegion]:
    """SET_MEM_TABLE payload: the regions (fds stay in ``msg.fds``, one per region, in order)."""
    if len(msg.payload) < MEM_TABLE_HEADER.size:
        raise InvalidMessage(f"SET_MEM_TABLE: payload of {len(msg.payload)} bytes")
    nregions, _pad = MEM_TABLE_HEADER.unpack_from(msg.payload)
    if not 1 <= nregions <= MAX_MEM_REGIONS:
        raise InvalidMessage(f"SET_MEM_TABLE: {nregions} regions (1..{MAX_MEM_REGIONS})")
    # QEMU always sends the full 8-slot table; only the first nregions count.
    if len(msg.payload) < MEM_TABLE_HEADER.size + nregions * MEM_REGION.size:
        raise InvalidMessage(f"SET_MEM_TABLE: {len(msg.payload)} bytes for {nregions} regions")
    regions = []
    for i in range(nregions):
        off = MEM_TABLE_HEADER.size + i * MEM_REGION.size
        regions.append(_checked_region(msg, i, MemRegion(*MEM_REGION.unpack_from(msg.payload, off))))
    return regions


def parse_single_region(msg: Message) -> MemRegion:
    """ADD_MEM_REG / REM_MEM_REG payload: one region after 8 bytes of padding."""
    _expect_size(msg, SINGLE_MEM_REGION.size)
    return _checked_region(msg, 0, MemRegion(*SINGLE_MEM_REGION.unpack(msg.payload)[1:]))


def _checked_region(msg: Message, i: int, region: MemRegion) -> MemRegion:
    """``region`` unless it is empty or one of its ranges runs past 2**64: such a range
    would wrap in the compiled kernel's u64 address arithmetic."""
    if region.memory_size == 0:
        raise InvalidMessage(f"{msg.name()}: region {i} has size 0")
    for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
        if getattr(region, name) + region.memory_size > 1 << 64:
            raise InvalidMessage(f"{msg.name()}: region {i}: {name} + size passes 2**64")
    return region


# -- encoding --------------------------------------------------------------------------


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """Header plus payload, ready for ``sendmsg``."""
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    """A back-end reply: version 1 with the REPLY flag."""
    return encode(request, payload, VERSION | FLAG_REPLY)


def encode_u64_reply(request: int, value: int) -> bytes:
    return encode_reply(request, U64.pack(value))


# -- transport -------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        try:
            data = sock.recv(n)
        except (socket.timeout, BlockingIOError) as exc:
            raise PartialMessage("timed out in the middle of a message") from exc
        except OSError as exc:
            raise PartialMessage(f"socket error in the middle of a message: {exc}") from exc
        if not data:
            raise PartialMessage("peer closed in the middle of a message")
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def read_message(sock: socket.socket) -> Message:
    """Read one whole message with its fds from a socket that is readable now.

    The socket should have a timeout (the caller sets it) so a peer that stalls in
    the middle of a message cannot hang the loop.  Raises :class:`Disconnected` on
    EOF before a header, :class:`PartialMessage` on EOF/timeout inside a message,
    :class:`InvalidMessage` for a bad version or oversized payload (received fds
    are closed before raising).
    """
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, MAX_FDS)
    except (socket.timeout, BlockingIOError) as exc:
        raise Disconnected("no message although the socket was readable") from exc
    except OSError as exc:
        raise Disconnected(f"socket error: {exc}") from exc
    if not data:
        _close_all(fds)
        raise Disconnected("peer closed the connection")
    msg = Message(0, 0, b"", list(fds))
    try:
        if len(data) < HEADER.size:
            data += _recv_exact(sock, HEADER.size - len(data))
        msg.request, msg.flags, size = HEADER.unpack(data)
        if msg.flags & VERSION_MASK != VERSION:
            raise InvalidMessage(f"{msg.name()}: protocol version {msg.flags & VERSION_MASK}")
        if size > MAX_PAYLOAD:
            raise InvalidMessage(f"{msg.name()}: payload size {size} > {MAX_PAYLOAD}")
        msg.payload = _recv_exact(sock, size) if size else b""
    except ProtocolError:
        msg.close_fds()
        raise
    return msg


class MessageReader:
    """Reads messages from a non-blocking socket as bytes arrive, never waiting.

    The event loop calls :meth:`read` whenever the socket is readable; it returns the
    messages completed so far (usually one).  A front end that stalls in the middle
    of a message only holds up its own connection.  The header is read on its own
    (12 bytes) so the fds sent with a message are attached to that message.
    Raises :class:`Disconnected` on EOF at a message boundary, :class:`PartialMessage`
    on EOF inside one, :class:`InvalidMessage` for a bad header (fds closed).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self._size = -1  # payload size once the header is complete
        self._header = (0, 0)  # request, flags of the message being read

    def close(self) -> None:
        """Close fds of an incomplete message."""
        _close_all(self._fds)
        self._fds = []

    def read(self, sock: socket.socket) -> list[Message]:
        """The messages completed by now.  On an error the messages already completed
        in this call are dropped with the connection: their fds are closed first."""
        out: list[Message] = []
        try:
            return self._read(sock, out)
        except ProtocolError:
            for msg in out:
                msg.close_fds()
            raise

    def _read(self, sock: socket.socket, out: list[Message]) -> list[Message]:
        while True:
            want = HEADER.size - len(self._buf) if self._size < 0 else self._size - len(self._buf)
            try:
                if self._size < 0:
                    data, fds, flags, _addr = socket.recv_fds(sock, want, MAX_FDS)
                    self._fds.extend(fds)
                    if flags & socket.MSG_CTRUNC:  # the kernel closed the fds past MAX_FDS
                        self.close()
                        raise InvalidMessage(f"more than {MAX_FDS} fds on one message")
                else:
                    data = sock.recv(want) if want else b""
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as exc:
                self.close()
                raise Disconnected(f"socket error: {exc}") from exc
            if not data and want:
                partial = bool(self._buf) or self._size >= 0
                self.close()
                if partial:
                    raise PartialMessage("peer closed in the middle of a message")
                raise Disconnected("peer closed the connection")
            self._buf += data
            msg = self._complete()
            if msg is not None:
                out.append(msg)

    def _complete(self) -> Message | None:
        if self._size < 0:
            if len(self._buf) < HEADER.size:
                return None
            request, flags, size = HEADER.unpack(self._buf)
            if flags & VERSION_MASK != VERSION or size > MAX_PAYLOAD:
                self.close()
                name = Message(request, flags, b"").name()
                raise InvalidMessage(f"{name}: bad version {flags & VERSION_MASK} or size {size}")
            self._size, self._header = size, (request, flags)
            self._buf.clear()
        if len(self._buf) < self._size:
            return None
        request, flags = self._header
        msg = Message(request, flags, bytes(self._buf), self._fds)
        self._buf.clear()
        self._fds, self._size = [], -1
        return msg


def send_message(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    """Send one encoded message (with ``fds`` as SCM_RIGHTS).  Raises Disconnected."""
    try:
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.sendall(data)
    except OSError as exc:
        raise Disconnected(f"send failed: {exc}") from exc


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
