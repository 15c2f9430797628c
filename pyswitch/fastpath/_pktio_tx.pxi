# The _pktio kernel, continued (included by _pktio.pyx): TAP batches and the write loop
# shared by both port types.

cdef class TapIO:
    """Batched reads and writes on a non-blocking TAP fd (the fd stays ``TapPort``'s).

    ``receive`` loops ``read()`` until EAGAIN or the batch is full, with the GIL released,
    into one buffer per frame of ``mtu + 14 + 4 + 1`` bytes (a tagged frame fits, a longer
    one is seen to be too long); ``transmit`` writes a batch.  Counting as ``TapPort``."""

    cdef readonly int fd
    cdef public object counters
    cdef Py_ssize_t limit, bufsize
    cdef char *arena
    cdef Py_ssize_t *lens
    cdef int capacity
    #: a receive is reading into the arena without the GIL: close() must not free it
    cdef bint busy

    def __cinit__(self):
        self.arena = NULL
        self.lens = NULL
        self.capacity = 0
        self.busy = False

    def __init__(self, int fd, int mtu, counters):
        self.fd, self.counters = fd, counters
        self.limit = mtu + ETH_HLEN
        self.bufsize = mtu + ETH_HLEN + 4 + 1

    cdef int _grow(self, int n) except -1:
        cdef char *a
        cdef Py_ssize_t *l
        if n <= self.capacity:
            return 0
        a = <char *>PyMem_Realloc(self.arena, <size_t>n * self.bufsize)
        if a == NULL:
            raise MemoryError()
        self.arena = a
        l = <Py_ssize_t *>PyMem_Realloc(self.lens, <size_t>n * sizeof(Py_ssize_t))
        if l == NULL:
            raise MemoryError()
        self.lens = l
        self.capacity = n
        return 0

    def receive(self, int max_frames):
        """``(frames, errno)``: up to ``max_frames`` frames as ``bytes``, and the errno
        that ended the batch (0 for EAGAIN or a full batch) for ``TapPort._rx_error``."""
        cdef int i, got = 0, err = 0, oversize = 0, fd = self.fd
        cdef Py_ssize_t r, n, bufsize = self.bufsize, limit = self.limit
        cdef uint64_t nbytes = 0
        cdef list out = []
        cdef char *buf
        if fd < 0 or max_frames <= 0 or self.busy:  # busy: another thread is receiving
            return out, 0
        self._grow(max_frames)
        self.busy = True
        with nogil:
            while got < max_frames:
                r = read(fd, self.arena + <size_t>got * bufsize, bufsize)
                if r < 0:
                    if errno == EINTR:
                        continue
                    if errno != EAGAIN:
                        err = errno
                    break
                self.lens[got] = r
                got += 1
        for i in range(got):
            n = self.lens[i]
            buf = self.arena + <size_t>i * bufsize
            if _over_mtu(n, limit, <const uint8_t *>buf):
                oversize += 1
                continue
            out.append(PyBytes_FromStringAndSize(buf, n))
            nbytes += n
        self.busy = False  # nothing above let another thread run: the arena was ours
        if self.fd < 0:  # closed while we read: free what close() left
            self._free()
        counters = self.counters
        counters.rx_packets += len(out)
        counters.rx_bytes += nbytes
        if oversize:
            counters.drop("mtu", oversize, rx=True)
        return out, err

    def release(self):
        """Nothing to do: frames are ``bytes``."""

    def transmit(self, frames):
        """Write each frame (``send_each``'s rules, TAP's error meanings)."""
        if self.fd < 0:
            if frames:
                self.counters.drop("link_down", len(frames), rx=False)
            return 0
        return _send_batch(self.fd, frames, self.limit, self.counters, True)

    def close(self):
        """Forget the fd (the port closes it) and free the buffers (at the end of a
        receive still reading into them on another thread)."""
        self.fd = -1
        if not self.busy:
            self._free()

    cdef void _free(self) noexcept:
        PyMem_Free(self.arena)
        PyMem_Free(self.lens)
        self.arena, self.lens, self.capacity = NULL, NULL, 0

    def __dealloc__(self):
        PyMem_Free(self.arena)
        PyMem_Free(self.lens)


cdef inline int _reason(int e, bint tap) noexcept nogil:
    """A failed write's errno as a drop reason: afpacket's and tap's ``_tx_error_reason``."""
    if tap:
        if e == EINVAL:
            return R_MALFORMED
        return R_TX_FULL if e == EAGAIN or e == ENOBUFS else R_LINK_DOWN
    if e == EAGAIN or e == ENOBUFS or e == ENOMEM:
        return R_TX_FULL
    if e == EMSGSIZE:
        return R_MTU
    if e == EINVAL:
        return R_MALFORMED
    return R_LINK_DOWN


cdef inline Py_ssize_t _write(int fd, const void *p, Py_ssize_t n) noexcept nogil:
    """``write()``, repeated on EINTR (as Python's os.write and socket.send do)."""
    cdef Py_ssize_t r
    while True:
        r = write(fd, p, n)
        if r >= 0 or errno != EINTR:
            return r


cdef inline bint _retry(int fd, const void *p, Py_ssize_t n) noexcept nogil:
    """``frames._retry``: try again ``TX_RETRIES`` times while the queue stays full."""
    cdef int k
    for k in range(C_TX_RETRIES):
        if _write(fd, p, n) >= 0:
            return True
        if errno != EAGAIN and errno != ENOBUFS and errno != ENOMEM:
            return False
    return False


cdef Py_ssize_t _send_batch(int fd, frames, Py_ssize_t limit, counters, bint tap) except -1:
    """``ports/frames.py:send_each`` in C: one ``write()`` per frame, GIL released."""
    cdef Py_ssize_t total = len(frames), got = 0, i, n, sent = 0, r
    cdef Py_ssize_t n_mtu = 0, n_malformed = 0, n_fail = 0
    cdef uint64_t nbytes = 0
    cdef int why, fail = R_OK
    cdef const uint8_t *p
    cdef Py_buffer *bufs
    if total == 0:
        return 0
    bufs = <Py_buffer *>PyMem_Malloc(total * sizeof(Py_buffer))
    if bufs == NULL:
        raise MemoryError()
    try:
        for i in range(total):
            PyObject_GetBuffer(frames[i], &bufs[i], PyBUF_SIMPLE)
            got += 1
        with nogil:
            for i in range(total):
                n = bufs[i].len
                p = <const uint8_t *>bufs[i].buf
                if _over_mtu(n, limit, p):
                    n_mtu += 1
                    continue
                if n < ETH_HLEN:
                    n_malformed += 1
                    continue
                r = _write(fd, p, n)
                if r < 0:
                    why = _reason(errno, tap)
                    if why == R_TX_FULL and _retry(fd, p, n):
                        sent += 1
                        nbytes += n
                        continue
                    if why == R_MTU:
                        n_mtu += 1
                        continue
                    if why == R_MALFORMED:
                        n_malformed += 1
                        continue
                    fail, n_fail = why, total - i
                    break
                sent += 1
                nbytes += n
    finally:
        for i in range(got):
            PyBuffer_Release(&bufs[i])
        PyMem_Free(bufs)
    if n_mtu:
        counters.drop("mtu", n_mtu, rx=False)
    if n_malformed:
        counters.drop("malformed", n_malformed, rx=False)
    if fail == R_TX_FULL:
        counters.drop("tx_full", n_fail, rx=False)
    elif fail == R_LINK_DOWN:
        counters.drop("link_down", n_fail, rx=False)
    counters.tx_packets += sent
    counters.tx_bytes += nbytes
    return sent
