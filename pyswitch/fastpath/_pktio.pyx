# cython: language_level=3
"""The compiled packet-I/O kernel: batched AF_PACKET (veth) and TAP I/O, one call per batch.

The same interfaces as the Python reference (``ports/afpacket.py``'s ``PacketRing``,
``ports/frames.py``'s ``send_each`` and the read loop of ``ports/tap.py``), selected by
``VethPort``/``TapPort`` at ``open()`` when :func:`pyswitch.fastpath.kernel` returns this
module.  Frames go up to Python as ``bytes`` (one allocation and one copy each, done in C):
a ``bytes`` owns its memory, so ring blocks go back to the kernel as soon as they are read
and ``release()`` has nothing to do.

Receive on AF_PACKET uses a ``TPACKET_V3`` ring (Documentation/networking/packet_mmap.rst):
the ring is a list of blocks; the kernel packs frames one after another into the open block
(``tpacket3_hdr``, chained by ``tp_next_offset``) and hands the whole block to us
(``block_status = TP_STATUS_USER``) when it is full or when ``tp_retire_blk_tov``
milliseconds pass, so a poll wakes once per block, not per frame.  We walk the block's
frames, then give it back (``TP_STATUS_KERNEL``).  Blocks are read strictly in ring order,
as the kernel fills them: when the next block is still ours the kernel freezes and counts
drops (``PACKET_STATISTICS``, ``tpacket_stats_v3``) rather than moving past it, so the
reader cannot fall out of step the way a V2 reader did (the Python ring's ``_resync``).
The cost is latency: a lone frame waits until the kernel's timer retires its block.
``retire_ms`` is 1 (the least the interface takes), but the timer counts in jiffies: on
this machine's HZ=250 kernel that is up to 4 ms.  Measured (bench/pktio_micro.py, 64-byte
frames sent one at a time from the peer's namespace, send to receive()): p50 0.4-0.7 ms,
p99 ~4 ms, against 0.13 ms / 0.3 ms for the TPACKET_V2 ring of the Python path, which
sees each frame as soon as its slot is written.  Under load blocks fill before the timer
and the cost goes away; for an idle switch it is the price of V3.  So the kernel also
has :class:`PacketRingV2` (``_pktio_v2.pxi``): the same V2 ring as the Python path, read
in C.  Measured in one run of bench/pktio_micro.py: lone frame p50/p99 61/217 us (V3:
884/5648), ping through two ports p50 202 us (V3: 1180), for 0.28 us of CPU a received
frame (V3: 0.12, Python: 1.08).  ``ports/afpacket.py``'s ``COMPILED_TPACKET`` picks.

The kernel strips an 802.1Q/802.1ad tag into skb metadata before AF_PACKET sees a frame;
it comes back in ``tp_vlan_tci``/``tp_vlan_tpid`` and we put it back while copying.

Every offset and length read from the ring is checked against the block before use (the
ring is the kernel's, but a bad value must never make us read outside the mapping): an
inconsistency gives the rest of its block back and counts one ``malformed`` receive drop.

Transmit (both port types) is a C loop of ``write()`` on the non-blocking fd with the GIL
released, with the exact drop semantics of ``send_each``: over-MTU and runt frames dropped
one by one, a full queue retried ``TX_RETRIES`` times then the rest of the batch dropped
as ``tx_full``, a down link the rest as ``link_down``.  Why not a ``PACKET_TX_RING`` (fill
slots, one ``sendto()`` per batch)?  Measured in C on a veth pair here (64-byte frames,
300,000 a run, 3 runs each, load ~5 on 2 cores): ``send()`` per frame 7.4-8.3 us/frame,
TX ring with one ``sendto()`` per 32 frames 6.2-7.7 us/frame.  The kernel's own per-frame
work (skb, ``dev_queue_xmit``, the veth peer's receive) is the cost either way; the ring
saves only the system call entry, ~15%, inside this machine's noise.  ``perf record`` of
this loop sending for 3 s agrees: of all samples, the system call entry and the write
path (``do_syscall_64``, ``vfs_write``, ``sock_write_iter``, libc ``write``) are 6%, this
kernel's own loop 0.9%, and the rest of the kernel's 58% is per-frame skb and veth work.  And a ring reports
one error per ``sendto()``, not per frame, so ``tx_full``/``link_down``/``mtu`` could no
longer be counted frame by frame as the Python path does.  The write loop keeps them.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.errno cimport (EAGAIN, EINTR, EINVAL, EIO, EMSGSIZE, ENETDOWN, ENOBUFS, ENODEV,
                         ENOMEM, ENXIO, errno)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, strerror
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport read, write

import logging

log = logging.getLogger("pyswitch.ports.afpacket")

cdef enum:
    ETH_HLEN = 14
    ETH_P_ALL = 0x0003
    C_TX_RETRIES = 2  # immediate retries of a full transmit queue (frames.TX_RETRIES)
    RESYNC_LOOKAHEAD = 8  # slots looked at past an empty one (afpacket.RESYNC_LOOKAHEAD)
    # drop reasons of a failed write
    R_OK = 0
    R_TX_FULL = 1
    R_LINK_DOWN = 2
    R_MTU = 3
    R_MALFORMED = 4

TX_RETRIES = C_TX_RETRIES
#: Block size floor: a 64 KiB block holds ~400 small frames (one wake-up each).
MIN_BLOCK = 1 << 16
RING_BYTES = 2 << 20
RETIRE_MS = 1


cdef inline bint _is_vlan_tpid(const uint8_t *p) nogil:
    """Whether the EtherType at ``p`` is 802.1Q or 802.1ad (a frame may be 4 bytes longer)."""
    return (p[0] == 0x81 and p[1] == 0x00) or (p[0] == 0x88 and p[1] == 0xA8)


cdef inline bint _over_mtu(Py_ssize_t n, Py_ssize_t limit, const uint8_t *frame) nogil:
    """``send_each``'s size rule (``frame`` holds at least 14 bytes when ``n > limit``)."""
    return n > limit and (n > limit + 4 or not _is_vlan_tpid(frame + 12))


cdef int _take(list out, const uint8_t *src, uint32_t snap, uint32_t length, uint32_t status,
               uint16_t tpid, uint16_t tci, Py_ssize_t limit, uint64_t *nbytes) except -1:
    """Append the frame at ``src`` (``snap`` bytes captured of ``length``; the caller
    checked that they lie in the ring and that ``snap`` covers the MAC addresses) to
    ``out`` as ``bytes``, its VLAN tag put back; 1 if it is over the MTU (dropped)."""
    cdef bint tagged = (status & TP_STATUS_VLAN_VALID) != 0
    cdef bint vlan_sized
    cdef bytes frame
    cdef char *dst
    if tagged:  # the tag the kernel took out goes back in front of the EtherType
        if not status & TP_STATUS_VLAN_TPID_VALID:
            tpid = 0x8100
        length += 4
        vlan_sized = tpid == 0x8100 or tpid == 0x88A8
    else:
        vlan_sized = snap >= ETH_HLEN and _is_vlan_tpid(src + 12)
    if length > limit and (snap + (4 if tagged else 0) < length or length > limit + 4
                           or not vlan_sized):
        return 1
    if not tagged:
        out.append(PyBytes_FromStringAndSize(<char *>src, snap))
        nbytes[0] += snap
        return 0
    frame = PyBytes_FromStringAndSize(NULL, snap + 4)
    dst = PyBytes_AS_STRING(frame)
    memcpy(dst, src, 12)
    dst[12] = <char>(tpid >> 8)
    dst[13] = <char>(tpid & 0xFF)
    dst[14] = <char>(tci >> 8)
    dst[15] = <char>(tci & 0xFF)
    memcpy(dst + 16, src + 12, snap - 12)
    out.append(frame)
    nbytes[0] += snap + 4
    return 0


cdef class PacketRingV3:
    """A TPACKET_V3 receive ring on an AF_PACKET socket, and its transmit loop.

    ``sock`` is a non-blocking, unbound ``AF_PACKET`` socket already set to
    ``TPACKET_V3`` (``ports/afpacket.py`` makes it); the ring is set up and mapped here and
    the socket bound to ``ifname`` last, so frames start arriving only then.  Same
    methods and counting as ``PacketRing``; frames are ``bytes``.
    """

    cdef readonly object sock
    cdef readonly str ifname
    cdef readonly int mtu
    cdef public object counters
    #: Always 0: a V3 reader follows the kernel block by block (module docstring).
    cdef readonly int resyncs
    #: Blocks handed back to the kernel, and how many of them it retired on its timer.
    cdef readonly uint64_t blocks_read, blocks_by_timeout
    cdef int fd
    cdef char *base
    cdef size_t map_len
    cdef uint32_t block_size, nblocks, cur, left, off
    cdef Py_ssize_t limit

    def __cinit__(self):
        self.base = NULL
        self.fd = -1

    def __init__(self, sock, str ifname, int mtu, counters, size_t ring_bytes=RING_BYTES,
                 unsigned int retire_ms=RETIRE_MS):
        cdef tpacket_req3 req
        cdef uint32_t block = MIN_BLOCK
        cdef void *m
        if mtu < 68 or mtu > 65535:
            raise ValueError(f"mtu {mtu} out of range")
        while block < 2 * (<uint32_t>mtu + 256):  # header, sockaddr_ll, alignment, tag: < 256
            block <<= 1
        self.sock, self.ifname, self.mtu, self.counters = sock, ifname, mtu, counters
        self.limit = mtu + ETH_HLEN
        self.block_size = block
        self.nblocks = max(1, ring_bytes // block)
        req.tp_block_size = block
        req.tp_block_nr = self.nblocks
        req.tp_frame_size = 2048  # V3 frames are variable-sized; this only has to divide
        req.tp_frame_nr = self.nblocks * (block // 2048)
        req.tp_retire_blk_tov = retire_ms
        req.tp_sizeof_priv = 0
        req.tp_feature_req_word = 0
        self.fd = sock.fileno()
        if setsockopt(self.fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req)) != 0:
            raise OSError(errno, strerror(errno).decode())
        self.map_len = <size_t>block * self.nblocks
        m = mmap(NULL, self.map_len, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if m == MAP_FAILED:
            raise OSError(errno, strerror(errno).decode())
        self.base = <char *>m
        sock.bind((ifname, ETH_P_ALL))

    def fileno(self):
        return self.sock.fileno()

    cdef inline tpacket_block_desc *_block(self) noexcept nogil:
        return <tpacket_block_desc *>(self.base + <size_t>self.cur * self.block_size)

    cdef void _give_back(self) noexcept nogil:
        """Hand the current block to the kernel and move to the next one."""
        cdef tpacket_block_desc *bd = self._block()
        pktio_store_release(&bd.hdr.bh1.block_status, TP_STATUS_KERNEL)
        self.blocks_read += 1
        self.left = 0
        self.cur = self.cur + 1 if self.cur + 1 < self.nblocks else 0

    cdef int _open_block(self, int *lost, int *bad) noexcept nogil:
        """Start reading the next block if the kernel has handed it over: 1 if frames
        are ready (``left``/``off`` set), 0 if not.  Empty blocks go straight back, and
        inconsistent ones too (counted in ``bad``); at most one pass over the ring."""
        cdef tpacket_block_desc *bd
        cdef uint32_t status, num, first
        cdef uint32_t tries
        for tries in range(self.nblocks):
            bd = self._block()
            status = pktio_load_acquire(&bd.hdr.bh1.block_status)
            if not status & TP_STATUS_USER:
                return 0
            if status & TP_STATUS_LOSING:
                lost[0] = 1
            if status & TP_STATUS_BLK_TMO:
                self.blocks_by_timeout += 1
            num = bd.hdr.bh1.num_pkts
            first = bd.hdr.bh1.offset_to_first_pkt
            if num == 0 or first < sizeof(tpacket_block_desc) or first >= self.block_size:
                if num != 0:
                    bad[0] += 1
                self._give_back()
                continue
            self.left, self.off = num, first
            return 1
        return 0

    def receive(self, int max_frames):
        """Up to ``max_frames`` frames as ``bytes``; never blocks.  At most ``max_frames``
        frames are examined (dropped ones included: bounded work)."""
        cdef list out = []
        cdef int examined = 0, oversize = 0, malformed = 0, lost = 0
        cdef uint64_t nbytes = 0
        cdef tpacket_block_desc *bd
        cdef tpacket3_hdr *hdr
        cdef uint32_t status, snap, length, mac, nxt, room
        cdef const uint8_t *src
        cdef bint tagged
        if self.base == NULL:
            return out
        while examined < max_frames:
            if self.left == 0 and not self._open_block(&lost, &malformed):
                break
            bd = self._block()
            examined += 1
            if self.off > self.block_size - sizeof(tpacket3_hdr):
                malformed += 1  # a frame header past the block: drop the rest of it
                self._give_back()
                continue
            hdr = <tpacket3_hdr *>(<char *>bd + self.off)
            status, snap, length, mac = hdr.tp_status, hdr.tp_snaplen, hdr.tp_len, hdr.tp_mac
            room = self.block_size - self.off
            tagged = (status & TP_STATUS_VLAN_VALID) != 0
            # out of the block, or shorter than an Ethernet header (a sane kernel sends none)
            if mac > room or snap > room - mac or snap < (12 if tagged else ETH_HLEN):
                malformed += 1
                self._give_back()
                continue
            src = <const uint8_t *>hdr + mac
            oversize += _take(out, src, snap, length, status, hdr.hv1.tp_vlan_tpid,
                              <uint16_t>hdr.hv1.tp_vlan_tci, self.limit, &nbytes)
            self.left -= 1
            if self.left == 0:
                self._give_back()
                continue
            nxt = hdr.tp_next_offset
            if nxt == 0 or nxt >= room:
                malformed += 1  # a broken chain: the rest of the block is lost
                self._give_back()
                continue
            self.off += nxt
        counters = self.counters
        if out:
            counters.rx_packets += len(out)
            counters.rx_bytes += nbytes
        if oversize:
            counters.drop("mtu", oversize, rx=True)
        if malformed:
            counters.drop("malformed", malformed, rx=True)
        if lost:
            self.poll_kernel_drops()
        return out

    def release(self):
        """Nothing to do: frames are ``bytes`` and blocks went back while reading."""

    def transmit(self, frames):
        """Send each frame (``send_each``'s rules and counting); returns how many were sent."""
        if self.base == NULL:
            if frames:
                self.counters.drop("link_down", len(frames), rx=False)
            return 0
        return _send_batch(self.fd, frames, self.limit, self.counters, False)

    def poll_kernel_drops(self):
        """Fold the kernel's count of frames lost for want of a free block
        (``tpacket_stats_v3.tp_drops``, reset by reading) into ``drops["no_buffer"]``."""
        cdef tpacket_stats_v3 st
        cdef socklen_t n = sizeof(st)
        if self.base == NULL:
            return 0
        if getsockopt(self.fd, SOL_PACKET, PACKET_STATISTICS, &st, &n) != 0:
            raise OSError(errno, strerror(errno).decode())
        if st.tp_drops:
            self.counters.drop("no_buffer", st.tp_drops, rx=True)
        return st.tp_drops

    def ring_info(self):
        return {"tpacket_version": 3, "ring_blocks": self.nblocks,
                "block_size": self.block_size, "ring_bytes": self.nblocks * self.block_size}

    def close(self):
        """Unmap the ring and close the socket (idempotent)."""
        if self.base != NULL:
            munmap(self.base, self.map_len)
            self.base = NULL
        self.fd = -1
        if self.sock.fileno() >= 0:
            self.sock.close()

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.map_len)
            self.base = NULL


include "_pktio_v2.pxi"
include "_pktio_tx.pxi"
