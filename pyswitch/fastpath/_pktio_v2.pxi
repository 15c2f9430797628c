# The _pktio kernel, continued (included by _pktio.pyx): a TPACKET_V2 ring read in C.

cdef class PacketRingV2:
    """The Python ``PacketRing``'s ring (``TPACKET_V2``: one frame a slot, each slot
    handed over as soon as the kernel has written it) read in C, frames as ``bytes``.

    The low-latency alternative to :class:`PacketRingV3`: no block timer, so a lone
    frame is seen at once; the price is one status word per frame shared with the
    kernel, and the reader must follow the kernel slot by slot (``_resync``, as the
    Python ring).  ``sock`` is an unbound socket set to ``TPACKET_V2``
    (``ports/afpacket.py``); same methods and counting as ``PacketRing``.
    """

    cdef readonly object sock
    cdef readonly str ifname
    cdef readonly int mtu
    cdef public object counters
    #: times the reader skipped slots the kernel left empty (PacketRing.resyncs)
    cdef readonly int resyncs
    cdef readonly uint32_t head
    cdef int fd
    cdef char *base
    cdef size_t map_len
    cdef uint32_t slot, nslots
    cdef Py_ssize_t limit
    cdef bint suspect

    def __cinit__(self):
        self.base = NULL
        self.fd = -1

    def __init__(self, sock, str ifname, int mtu, counters, size_t ring_bytes=RING_BYTES):
        cdef tpacket_req req
        cdef uint32_t block
        cdef void *m
        if mtu < 68 or mtu > 65535:
            raise ValueError(f"mtu {mtu} out of range")
        self.sock, self.ifname, self.mtu, self.counters = sock, ifname, mtu, counters
        self.limit = mtu + ETH_HLEN
        self.slot = 2048  # header, sockaddr_ll, headroom and a tagged MTU-sized frame
        while self.slot < <uint32_t>mtu + 78 + 18:
            self.slot <<= 1
        block = max(self.slot, MIN_BLOCK)
        req.tp_block_size = block
        req.tp_block_nr = max(1, ring_bytes // block)
        req.tp_frame_size = self.slot
        self.nslots = req.tp_block_nr * (block // self.slot)
        req.tp_frame_nr = self.nslots
        self.fd = sock.fileno()
        if setsockopt(self.fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req)) != 0:
            raise OSError(errno, strerror(errno).decode())
        self.map_len = <size_t>block * req.tp_block_nr
        m = mmap(NULL, self.map_len, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if m == MAP_FAILED:
            raise OSError(errno, strerror(errno).decode())
        self.base = <char *>m
        sock.bind((ifname, ETH_P_ALL))

    def fileno(self):
        return self.sock.fileno()

    cdef inline tpacket2_hdr *_at(self, uint32_t i) noexcept nogil:
        return <tpacket2_hdr *>(self.base + <size_t>i * self.slot)

    cdef int _resync(self) noexcept:
        """The reader's slot is empty; as ``PacketRing._resync``: if one of the next few
        slots holds a frame on two looks in a row, skip to it.  The slot to read from,
        or -1."""
        cdef uint32_t k, nxt
        for k in range(1, min(<uint32_t>RESYNC_LOOKAHEAD, self.nslots)):
            nxt = (self.head + k) % self.nslots
            if pktio_load_acquire(&self._at(nxt).tp_status) & TP_STATUS_USER:
                if not self.suspect:
                    self.suspect = True
                    return -1
                self.suspect = False
                self.resyncs += 1
                return nxt
        self.suspect = False
        return -1

    def receive(self, int max_frames):
        """Up to ``max_frames`` frames as ``bytes``; never blocks; slots go back at once."""
        cdef list out = []
        cdef int examined = 0, oversize = 0, malformed = 0, lost = 0, skip
        cdef uint64_t nbytes = 0
        cdef tpacket2_hdr *h
        cdef uint32_t status, snap, mac
        if self.base == NULL:
            return out
        if not pktio_load_acquire(&self._at(self.head).tp_status) & TP_STATUS_USER:
            skip = self._resync()
            if skip < 0:
                return out
            log.warning("%s: AF_PACKET ring out of step: skipped to slot %d", self.ifname, skip)
            self.head = skip
        while examined < max_frames:
            h = self._at(self.head)
            status = pktio_load_acquire(&h.tp_status)
            if not status & TP_STATUS_USER:
                break
            examined += 1
            lost |= (status & TP_STATUS_LOSING) != 0
            snap, mac = h.tp_snaplen, h.tp_mac
            if (mac > self.slot or snap > self.slot - mac
                    or snap < (12 if status & TP_STATUS_VLAN_VALID else ETH_HLEN)):
                malformed += 1
            else:
                oversize += _take(out, <const uint8_t *>h + mac, snap, h.tp_len, status,
                                  h.tp_vlan_tpid, h.tp_vlan_tci, self.limit, &nbytes)
            pktio_store_release(&h.tp_status, TP_STATUS_KERNEL)
            self.head = self.head + 1 if self.head + 1 < self.nslots else 0
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
        """Nothing to do: frames are ``bytes`` and slots went back while reading."""

    def transmit(self, frames):
        """Send each frame (``send_each``'s rules and counting); returns how many were sent."""
        if self.base == NULL:
            if frames:
                self.counters.drop("link_down", len(frames), rx=False)
            return 0
        return _send_batch(self.fd, frames, self.limit, self.counters, False)

    def poll_kernel_drops(self):
        """Fold the kernel's count of frames lost for want of a free slot into
        ``drops["no_buffer"]`` (``tpacket_stats``, reset by reading)."""
        cdef tpacket_stats_v3 st  # the V2 struct is its first two fields
        cdef socklen_t n = sizeof(st)
        if self.base == NULL:
            return 0
        st.tp_drops = 0
        if getsockopt(self.fd, SOL_PACKET, PACKET_STATISTICS, &st, &n) != 0:
            raise OSError(errno, strerror(errno).decode())
        if st.tp_drops:
            self.counters.drop("no_buffer", st.tp_drops, rx=True)
        return st.tp_drops

    def ring_info(self):
        return {"tpacket_version": 2, "ring_slots": self.nslots, "slot_size": self.slot}

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
