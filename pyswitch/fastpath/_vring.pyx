# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled split virtqueue: ``ports/vhostuser/virtqueue.py`` in C, one call per batch.

This is the fast path's half of the vhost-user data path.  :class:`Virtqueue` here is a
drop-in replacement for the Python reference (same constructor, methods, attributes,
exceptions and results: ``tests/test_kernel_vring_diff.py`` compares the two on random
rings byte for byte), and its code follows the reference's structure function by function;
read the reference first, its docstrings say why each rule exists.

What C changes, and how this file keeps it safe:

* **Memory ordering.**  Python emits no barriers and relies on x86 keeping store order.
  Here ``avail.idx`` is loaded with acquire ordering (the ring entries and descriptors the
  driver wrote before it are visible after it), ``used.idx`` is stored with release
  ordering after the used elements, and a full fence separates that store from the read of
  ``used_event`` / ``avail.flags`` (virtio 1.2, 2.7.7.2 and 2.7.10).
* **Single stores and loads** of the 16-bit ring indexes (``__atomic`` on aligned words): a
  torn store crashed DPDK (see the reference's module docstring).  A ring whose host
  address is misaligned for that is refused at construction (ValueError).
* **No double fetch.**  A descriptor is copied out with one ``memcpy`` followed by a compiler
  barrier, so the compiler cannot re-read guest memory in place of the copy.
* **No wrapping bounds.**  Every (addr, len) is checked against one region as
  ``off <= size - len`` in 64-bit unsigned arithmetic; ``addr + len`` is never computed.
* **The GIL stays held.**  Each frame becomes or comes from a Python object, so the kernel
  needs the interpreter per frame; the inner loops (walks, bounds checks, copies) are
  ``nogil`` C functions all the same.
* **Header lengths** are 0..12 bytes (ValueError otherwise): the device uses 10 or 12.
* **Memory that cannot go away.**  Base pointers come from buffers exported by the region
  views (a typed memoryview over a slice of ``MappedRegion.view``): while this object
  lives, ``mmap.close`` fails with BufferError, which GuestMemory already turns into a
  deferred unmap.  Regions added later (ADD_MEM_REG appends to the same GuestMemory without
  rebuilding rings) are picked up because the table is compared with ``mem.regions`` at the
  start of every batch and re-read when it changed.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

from pyswitch.ports.vhostuser import virtqueue as _ref
from pyswitch.ports.vhostuser.virtqueue import BadChain, QueueStats, RxResult

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    typedef struct { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; } vr_desc;

    /* One copy of a descriptor; the barrier forbids the compiler to read the guest's
       bytes again later instead of using the copy (a double fetch). */
    static inline void vr_fetch(vr_desc *d, const uint8_t *p) {
        memcpy(d, p, sizeof *d);
        __asm__ __volatile__("" ::: "memory");
    }
    /* avail.idx: acquire, so ring entries and descriptors written before it are seen. */
    static inline uint16_t vr_load_acquire16(const uint8_t *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
    }
    /* Other shared 16-bit words: one load / one store, never split. */
    static inline uint16_t vr_load16(const uint8_t *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
    }
    static inline void vr_store16(uint8_t *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
    }
    /* used.idx: release, so the driver sees the used elements before the index. */
    static inline void vr_store_release16(uint8_t *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline void vr_store32(uint8_t *p, uint32_t v) {
        __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED);
    }
    /* Between publishing used.idx and reading the driver's wish (2.7.7.2, 2.7.10). */
    static inline void vr_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """
    ctypedef struct vr_desc:
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next
    void vr_fetch(vr_desc *d, const uint8_t *p) noexcept nogil
    uint16_t vr_load_acquire16(const uint8_t *p) noexcept nogil
    uint16_t vr_load16(const uint8_t *p) noexcept nogil
    void vr_store16(uint8_t *p, uint16_t v) noexcept nogil
    void vr_store_release16(uint8_t *p, uint16_t v) noexcept nogil
    void vr_store32(uint8_t *p, uint32_t v) noexcept nogil
    void vr_fence() noexcept nogil

# The reference's constants, not copies of them.
cdef uint16_t F_NEXT = _ref.VIRTQ_DESC_F_NEXT
cdef uint16_t F_WRITE = _ref.VIRTQ_DESC_F_WRITE
cdef uint16_t F_INDIRECT = _ref.VIRTQ_DESC_F_INDIRECT
cdef uint16_t CHAINED = F_NEXT | F_INDIRECT
cdef uint16_t NOT_SIMPLE = CHAINED | F_WRITE
cdef uint16_t AVAIL_F_NO_INTERRUPT = _ref.VIRTQ_AVAIL_F_NO_INTERRUPT
cdef uint16_t USED_F_NO_NOTIFY = _ref.VIRTQ_USED_F_NO_NOTIFY
cdef int MAX_QUEUE_SIZE = _ref.MAX_QUEUE_SIZE
cdef int TX_WALK_BUDGET = _ref._TX_WALK_BUDGET
cdef int64_t MAX_TX_FRAME = _ref.MAX_TX_FRAME
cdef int NET_HDR_LEN = _ref.NET_HDR_LEN
_walk_budget = _ref._walk_budget

# Why a walk failed; the Python-facing walk() turns these into BadChain messages.
cdef enum:
    WALK_OK = 0
    E_INDEX
    E_LOOP
    E_NESTED
    E_INDIRECT_LEN
    E_DIRECTION
    E_ADDRESS

# What _collect found for one frame (the reference's list / [] / None).
cdef enum:
    GOT_ROOM = 0
    DROPPED
    NO_BUFFERS

ctypedef struct region_t:
    uint64_t gpa
    uint64_t size
    uint8_t *base

ctypedef struct seg_t:     # one guest buffer, already bounds-checked
    uint8_t *p
    uint64_t len
    int region
    uint64_t off

ctypedef struct chain_t:   # one receive chain of a frame: its head and its segments
    uint16_t head
    Py_ssize_t start
    Py_ssize_t count

# a base for empty regions: never NULL, so memcpy(.., p, 0) stays defined
cdef uint8_t _EMPTY[1]


cdef class Virtqueue:
    """One split virtqueue over guest memory; see ``virtqueue.Virtqueue`` for the contract."""

    cdef readonly object mem
    cdef readonly int size
    cdef readonly bint event_idx
    cdef public object stats
    cdef public bint broken
    #: descriptors copied out of guest memory so far (tests bound the work per batch)
    cdef readonly unsigned long long desc_fetches
    cdef uint16_t _last
    cdef uint16_t _used_idx
    cdef uint8_t *_desc
    cdef uint8_t *_avail
    cdef uint8_t *_used
    cdef object _ring_keep     # typed memoryviews over the rings: their exports keep them mapped
    # the region table and what it was read from
    cdef region_t *_regions
    cdef int _nreg
    cdef int _hit              # region of the last translation (GuestMemory._last)
    cdef object _reg_list      # mem.regions as last seen
    cdef list _reg_objs        # its MappedRegion objects, compared by identity
    cdef list _reg_views       # per region: (memoryview slice, typed memoryview export)
    # scratch space of one batch
    cdef uint16_t *_heads
    cdef uint32_t *_used_buf   # (id, len) pairs of one fill, published at its end
    cdef chain_t *_chains
    cdef seg_t *_segs
    cdef Py_ssize_t _segs_cap
    cdef uint64_t _err_addr
    cdef uint64_t _err_len

    def __cinit__(self):
        self._regions = NULL
        self._heads = NULL
        self._used_buf = NULL
        self._chains = NULL
        self._segs = NULL

    def __dealloc__(self):
        free(self._regions)
        free(self._heads)
        free(self._used_buf)
        free(self._chains)
        free(self._segs)

    def __init__(self, mem, int size, desc, avail, used, *, last_avail_idx=0, event_idx=False):
        if not (0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
            raise ValueError(f"queue size {size} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        if desc % 16 or avail % 2 or used % 4:
            raise ValueError("misaligned ring (2.7: desc 16, avail 2, used 4 bytes)")
        self.mem = mem
        self.size = size
        self.event_idx = bool(event_idx)
        cdef int extra = 2 if self.event_idx else 0
        # the reference's bounds-checked accessor: BadAddress if a ring is outside memory
        views = (mem.uva(desc, 16 * size), mem.uva(avail, 4 + 2 * size + extra),
                 mem.uva(used, 4 + 8 * size + extra))
        cdef uint8_t[::1] d = views[0]
        cdef uint8_t[::1] a = views[1]
        cdef uint8_t[::1] u = views[2]
        self._ring_keep = (views, d, a, u)
        self._desc, self._avail, self._used = &d[0], &a[0], &u[0]
        if <size_t>self._avail % 2 or <size_t>self._used % 4:
            # the guest's addresses are aligned but the front end's mapping offsets are
            # not: single 16-bit stores would be impossible (torn indexes)
            raise ValueError("ring misaligned in the back end's mapping (odd mmap_offset)")
        free(self._heads)  # (a second __init__ must not leak the first one's arrays)
        free(self._used_buf)
        free(self._chains)
        free(self._segs)
        self._heads = <uint16_t *>malloc(size * sizeof(uint16_t))
        self._used_buf = <uint32_t *>malloc(2 * size * sizeof(uint32_t))
        self._chains = <chain_t *>malloc(size * sizeof(chain_t))
        self._segs_cap = 2 * size + 64
        self._segs = <seg_t *>malloc(self._segs_cap * sizeof(seg_t))
        if not (self._heads and self._used_buf and self._chains and self._segs):
            raise MemoryError()
        self._last = last_avail_idx & 0xFFFF
        self._used_idx = vr_load16(self._used + 2)
        self.stats = QueueStats()
        self.broken = False
        self._nreg = 0
        self._hit = 0
        self._reg_list = None
        self._sync_regions()

    # -- the attributes the device and the tests read and set -----------------------------
    @property
    def last_avail_idx(self):
        return self._last

    @last_avail_idx.setter
    def last_avail_idx(self, value):
        self._last = value & 0xFFFF

    @property
    def used_idx(self):
        return self._used_idx

    @used_idx.setter
    def used_idx(self, value):
        self._used_idx = value & 0xFFFF

    # -- the region table -------------------------------------------------------------------
    cdef int _sync_regions(self) except -1:
        """Re-read the region table if ``mem.regions`` changed since the last batch (a new
        list after close(), a region added or removed); cheap when it did not."""
        regions = self.mem.regions
        cdef Py_ssize_t n = len(regions), i
        if regions is self._reg_list and n == self._nreg:
            for i in range(n):
                if regions[i] is not self._reg_objs[i]:
                    break
            else:
                return 0
        cdef region_t *table = <region_t *>malloc((n if n else 1) * sizeof(region_t))
        if table == NULL:
            raise MemoryError()
        cdef uint8_t[::1] mv
        objs, views = [], []
        try:
            for i in range(n):
                r = regions[i]
                # a slice shares the region's mapping; exporting from it (not from r.view)
                # leaves r.view free to be released by GuestMemory.close
                sl = r.view[:]
                mv = sl
                table[i].gpa = r.gpa
                table[i].size = min(<uint64_t>r.size, <uint64_t>mv.shape[0])
                table[i].base = &mv[0] if mv.shape[0] else _EMPTY
                objs.append(r)
                views.append((sl, mv))
        except BaseException:
            free(table)
            raise
        free(self._regions)
        self._regions, self._nreg, self._hit = table, <int>n, 0
        self._reg_list, self._reg_objs, self._reg_views = regions, objs, views
        return 0

    cdef inline bint _xlate(self, uint64_t addr, uint64_t length, seg_t *out) noexcept nogil:
        """``GuestMemory.gpa`` without a view: the region and offset of a range that lies
        inside one region, checked as ``off <= size - len`` (nothing can wrap)."""
        cdef int i, k
        cdef uint64_t off
        cdef region_t *r
        for k in range(self._nreg + 1):
            i = self._hit if k == 0 else k - 1  # the last region hit first
            if i >= self._nreg:
                continue
            r = &self._regions[i]
            if addr < r.gpa:
                continue
            off = addr - r.gpa
            if off <= r.size and length <= r.size - off:
                self._hit = i
                out.p = r.base + off
                out.len = length
                out.region = i
                out.off = off
                return True
        self._err_addr, self._err_len = addr, length
        return False

    # -- avail side -------------------------------------------------------------------------
    def pending(self):
        """How many avail entries wait; 0 (and ``broken``) if the guest's index is absurd."""
        return self._pending()

    cdef int _pending(self) except -1:
        if self.broken:
            return 0
        cdef int n = <uint16_t>(vr_load_acquire16(self._avail + 2) - self._last)
        if n > self.size:
            # 2.7.13: the driver never has more than N buffers out; this ring is corrupt.
            self.broken = True
            self.stats.broken_avail += 1
            return 0
        return n

    cdef int _take_heads(self, Py_ssize_t max_n) except -1:
        """Copy up to ``max_n`` avail entries into ``_heads`` (avail.idx read once)."""
        cdef int n = self._pending(), i
        if max_n < n:
            n = <int>max_n if max_n > 0 else 0
        cdef int mask = self.size - 1
        for i in range(n):
            self._heads[i] = vr_load16(self._avail + 4 + 2 * ((self._last + i) & mask))
        self._last = <uint16_t>(self._last + n)
        return n

    cdef int _walk(self, uint32_t head, bint writable, Py_ssize_t start,
                   Py_ssize_t *count) noexcept nogil:
        """The reference's ``_walk_chain``: segments of the chain at ``head`` go to
        ``_segs[start:]`` (room for 2N is the caller's job: N direct + N indirect)."""
        cdef const uint8_t *table = self._desc
        cdef uint32_t table_n = self.size, idx = head
        cdef int64_t ttl = self.size
        cdef bint indirect = False
        cdef vr_desc d
        cdef seg_t s
        cdef Py_ssize_t n = 0
        count[0] = 0
        while True:
            if idx >= table_n:
                self._err_addr, self._err_len = idx, table_n
                return E_INDEX
            ttl -= 1
            if ttl < 0:
                return E_LOOP
            vr_fetch(&d, table + 16 * <size_t>idx)
            self.desc_fetches += 1
            if d.flags & F_INDIRECT:
                if indirect or d.flags & F_NEXT:
                    return E_NESTED
                # at most N entries: a chain is never longer than the queue (2.7.5.3.1)
                if d.len == 0 or d.len % 16 or d.len > 16 * <uint32_t>self.size:
                    self._err_len = d.len
                    return E_INDIRECT_LEN
                if not self._xlate(d.addr, d.len, &s):
                    return E_ADDRESS
                table, table_n = s.p, d.len // 16
                ttl, indirect, idx = table_n, True, 0
                continue
            if (d.flags & F_WRITE != 0) != writable:
                return E_DIRECTION
            if not self._xlate(d.addr, d.len, &self._segs[start + n]):
                return E_ADDRESS
            n += 1
            count[0] = n
            if not d.flags & F_NEXT:
                return WALK_OK
            idx = d.next

    cdef int _room_for_walk(self, Py_ssize_t used) except -1:
        """Grow ``_segs`` so that one more walk (up to 2N segments) fits after ``used``."""
        cdef Py_ssize_t want = used + 2 * self.size
        if want <= self._segs_cap:
            return 0
        cdef seg_t *grown = <seg_t *>realloc(self._segs, 2 * want * sizeof(seg_t))
        if grown == NULL:
            raise MemoryError()
        self._segs, self._segs_cap = grown, 2 * want
        return 0

    def walk(self, head, writable):
        """The buffers of the chain at ``head`` as memoryviews (the reference's walk)."""
        self._sync_regions()
        cdef Py_ssize_t count = 0, i
        if not 0 <= head < self.size:
            raise BadChain(f"descriptor index {head} >= {self.size}")
        cdef int err = self._walk(head, bool(writable), 0, &count)
        if err != WALK_OK:
            raise BadChain(self._why(err))
        out = []
        for i in range(count):
            s = self._segs[i]
            view = self._reg_views[s.region][0]
            out.append(view[s.off : s.off + s.len])
        return out

    cdef str _why(self, int err):
        if err == E_INDEX:
            return f"descriptor index {self._err_addr} >= {self._err_len}"
        if err == E_LOOP:
            return "chain longer than its table (loop?)"
        if err == E_NESTED:
            return "nested INDIRECT, or INDIRECT with NEXT"
        if err == E_INDIRECT_LEN:
            return f"indirect table of {self._err_len} bytes (queue of {self.size})"
        if err == E_DIRECTION:
            return "buffer of the wrong direction for this queue"
        return f"guest physical {self._err_addr:#x}+{self._err_len} is outside guest memory"

    # -- used side --------------------------------------------------------------------------
    def put_used(self, entries):
        """Write ``(head, length)`` used elements, publish ``used.idx`` once; returns
        whether the driver wants a notification (the reference's put_used)."""
        if not entries:
            return False
        cdef uint16_t old = self._used_idx, idx = old
        cdef int mask = self.size - 1
        cdef uint8_t *elem
        cdef uint32_t head, length
        for head, length in entries:
            elem = self._used + 4 + 8 * (idx & mask)
            vr_store32(elem, head)
            vr_store32(elem + 4, length)
            idx += 1
        vr_store_release16(self._used + 2, idx)  # after the elements, one 16-bit store
        self._used_idx = idx
        return self._need_notify(old, idx)

    cdef bint _publish(self, int n) noexcept nogil:
        """put_used for the ``n`` (id, len) pairs of ``_used_buf`` (one fill's)."""
        if n == 0:
            return False
        cdef uint16_t old = self._used_idx, idx = old
        cdef int mask = self.size - 1, i
        cdef uint8_t *elem
        for i in range(n):
            elem = self._used + 4 + 8 * (idx & mask)
            vr_store32(elem, self._used_buf[2 * i])
            vr_store32(elem + 4, self._used_buf[2 * i + 1])
            idx += 1
        vr_store_release16(self._used + 2, idx)
        self._used_idx = idx
        return self._need_notify(old, idx)

    def need_notify(self, old, new):
        """The driver's notification wish for used entries ``old..new`` (after a fence)."""
        return self._need_notify(old & 0xFFFF, new & 0xFFFF)

    cdef bint _need_notify(self, uint16_t old, uint16_t new) noexcept nogil:
        vr_fence()  # used.idx visible before the driver's flag / used_event is read
        cdef uint16_t event
        if self.event_idx:
            event = vr_load16(self._avail + 4 + 2 * <size_t>self.size)
            return <uint16_t>(new - event - 1) < <uint16_t>(new - old)
        return not vr_load16(self._avail) & AVAIL_F_NO_INTERRUPT

    def ask_kicks(self, enable):
        """Ask the driver to kick on new buffers or not (used.flags / avail_event)."""
        if self.event_idx:
            vr_store16(self._used + 4 + 8 * <size_t>self.size,
                       self._last if enable else <uint16_t>(self._last - 1))
        vr_store16(self._used, 0 if enable else USED_F_NO_NOTIFY)

    # -- transmitq: frames from the guest ---------------------------------------------------
    def pop_frames(self, Py_ssize_t max_n, list frames, list heads, int hdr_len=NET_HDR_LEN):
        """Pop up to ``max_n`` chains of the transmitq (the reference's pop_frames): each
        frame is copied once, after its header, into a new ``bytes``; returns bad chains."""
        return self._pop(max_n, frames, heads, hdr_len, NULL)

    def pop_done(self, Py_ssize_t max_n, list frames, int hdr_len=NET_HDR_LEN):
        """The reference's pop_done: pop_frames, then every head popped back on the used
        ring with length 0, published once, in the same call; (bad chains, notify,
        bytes of the frames appended, the longest of them or 0)."""
        cdef int n = 0
        cdef Py_ssize_t before = len(frames), i, length, nbytes = 0, longest = 0
        bad = self._pop(max_n, frames, None, hdr_len, &n)
        for i in range(before, len(frames)):
            length = PyBytes_GET_SIZE(frames[i])
            nbytes += length
            if length > longest:
                longest = length
        return bad, self._publish(n), nbytes, longest

    cdef int _pop(self, Py_ssize_t max_n, list frames, list heads, int hdr_len,
                  int *nused) except -1:
        """pop_frames; the heads go to ``heads``, or with ``heads`` None to ``_used_buf``
        as (head, 0) pairs, counted in ``nused``."""
        if not 0 <= hdr_len <= 12:
            raise ValueError(f"virtio-net header of {hdr_len} bytes")
        self._sync_regions()
        cdef int taken = self._take_heads(max_n), k, bad = 0, err
        cdef int64_t budget = TX_WALK_BUDGET * <int64_t>max_n  # a bad chain counts as N
        cdef uint16_t head
        cdef vr_desc d
        cdef seg_t s
        cdef Py_ssize_t count
        for k in range(taken):
            if budget < 0:  # spent (heads sharing long chains): the rest waits on the ring
                self._last = <uint16_t>(self._last - (taken - k))
                break
            head = self._heads[k]
            if heads is not None:
                heads.append(head)
            else:
                self._put_used_buf(nused, head, 0)
            if head < self.size:  # fast path: header and frame in one readable descriptor
                vr_fetch(&d, self._desc + 16 * <size_t>head)
                self.desc_fetches += 1
                if not d.flags & NOT_SIMPLE and d.len > <uint32_t>hdr_len:
                    budget -= 1
                    if self._xlate(d.addr, d.len, &s):
                        frames.append(PyBytes_FromStringAndSize(
                            <char *>s.p + hdr_len, <Py_ssize_t>(s.len - hdr_len)))
                    else:
                        bad += 1
                    continue
            err = self._walk(head, False, 0, &count)  # the general walk, fetching anew
            if err != WALK_OK:
                bad += 1
                budget -= self.size
                continue
            budget -= count + 1
            frame = self._gather(count, hdr_len)
            if frame is None:
                bad += 1
                budget -= self.size
                continue
            frames.append(frame)
        if self.event_idx:
            vr_store16(self._used + 4 + 8 * <size_t>self.size, self._last)
        self.stats.bad_chains += bad
        return bad

    cdef object _gather(self, Py_ssize_t count, int hdr_len):
        """The frame after the header in ``_segs[:count]`` as bytes, or None where the
        reference's ``_strip_header`` raises BadChain (no frame, or a multi-buffer one
        longer than MAX_TX_FRAME)."""
        cdef seg_t *segs = self._segs
        cdef Py_ssize_t i
        if count == 1 and segs[0].len > <uint64_t>hdr_len:
            return PyBytes_FromStringAndSize(<char *>segs[0].p + hdr_len,
                                             <Py_ssize_t>(segs[0].len - hdr_len))
        cdef uint64_t total = 0
        for i in range(count):
            total += segs[i].len  # at most 2N lengths < 2**32 each: no overflow
        if total <= <uint64_t>hdr_len or total - hdr_len > <uint64_t>MAX_TX_FRAME:
            return None
        frame = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(total - hdr_len))
        cdef uint8_t *out = <uint8_t *>PyBytes_AS_STRING(frame)
        cdef uint64_t skip = hdr_len, take
        for i in range(count):
            take = segs[i].len
            if skip >= take:
                skip -= take
                continue
            memcpy(out, segs[i].p + skip, take - skip)
            out += take - skip
            skip = 0
        return frame

    # -- receiveq: frames to the guest ------------------------------------------------------
    def fill_frames(self, frames, bint mergeable, int hdr_len=NET_HDR_LEN):
        """Copy ``frames`` (in order) into the receiveq, header first (the reference's
        fill_frames, same stops, drops and counts); returns an RxResult."""
        if not 0 <= hdr_len <= 12:
            raise ValueError(f"virtio-net header of {hdr_len} bytes")
        self._sync_regions()
        cdef int nheads = self._take_heads(self.size)
        # a bound on the descriptors walked: heads may share one long chain
        cdef int64_t budget = _walk_budget(self.size, len(frames))
        cdef int pos = 0, mark, nused = 0, nchains = 0, found, i
        cdef long long taken = 0, sent = 0, nbytes = 0, bad = 0, too_big = 0
        cdef uint8_t hdr1[12]
        memset(hdr1, 0, 12)
        hdr1[10] = 1  # num_buffers = 1
        cdef Py_buffer buf
        cdef const uint8_t *data
        cdef Py_ssize_t n
        cdef uint64_t need
        cdef uint16_t head
        cdef vr_desc d
        cdef seg_t s
        cdef bint exported
        for frame in frames:
            exported = not PyBytes_CheckExact(frame)  # bytes: no buffer export needed
            if exported:
                PyObject_GetBuffer(frame, &buf, PyBUF_SIMPLE)
                data, n = <const uint8_t *>buf.buf, buf.len
            else:
                data, n = <const uint8_t *>PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame)
            try:
                need = hdr_len + n
                if pos < nheads and self._heads[pos] < self.size:  # fast path: one big buffer
                    head = self._heads[pos]
                    vr_fetch(&d, self._desc + 16 * <size_t>head)
                    self.desc_fetches += 1
                    if d.flags == F_WRITE and d.len >= need and self._xlate(d.addr, need, &s):
                        memmove(s.p, hdr1, hdr_len)
                        memmove(s.p + hdr_len, data, n)
                        pos += 1
                        self._used_buf[2 * nused] = head
                        self._used_buf[2 * nused + 1] = <uint32_t>need
                        nused += 1
                        taken += 1
                        sent += 1
                        nbytes += n
                        continue
                mark = pos
                found = self._collect(&pos, nheads, need, mergeable, hdr_len, &budget, &nused,
                                      &nchains, &bad, &too_big)
                if found == NO_BUFFERS:
                    pos = mark  # not consumed: the guest keeps these buffers
                    break
                taken += 1
                if found == DROPPED:
                    continue  # too big or a bad chain; its heads are already on _used_buf
                self._scatter(nchains, hdr_len, data, n, nused)
                nused += nchains
                sent += 1
                nbytes += n
            finally:
                if exported:
                    PyBuffer_Release(&buf)
        # give back the heads we looked at but did not use
        self._last = <uint16_t>(self._last - (nheads - pos))
        self.stats.bad_chains += bad
        notify = self._publish(nused)
        return RxResult(taken, sent, nbytes, bad, too_big, notify)

    cdef int _collect(self, int *pos, int nheads, uint64_t need, bint mergeable, int hdr_len,
                      int64_t *budget, int *nused, int *nchains, long long *bad,
                      long long *too_big) except -1:
        """The reference's ``_collect``: chains with room for ``need`` bytes go to
        ``_chains[:nchains]`` (GOT_ROOM); DROPPED (bad chain, a chain smaller than the
        header with MRG_RXBUF, or too big) with the heads put on ``_used_buf`` with length
        0; NO_BUFFERS if the guest has too few buffers or the batch's walk budget is spent."""
        cdef uint64_t room = 0, chain_room
        cdef Py_ssize_t segs_used = 0, count = 0, i
        cdef uint16_t head
        cdef int c
        nchains[0] = 0
        while room < need:
            if pos[0] >= nheads:
                return NO_BUFFERS
            head = self._heads[pos[0]]
            pos[0] += 1
            self._room_for_walk(segs_used)
            if self._walk(head, True, segs_used, &count) != WALK_OK:
                bad[0] += 1
                for c in range(nchains[0]):
                    self._put_used_buf(nused, self._chains[c].head, 0)
                self._put_used_buf(nused, head, 0)
                return DROPPED
            budget[0] -= count
            if budget[0] < 0:
                return NO_BUFFERS  # hostile layout: treat as out of buffers (not consumed)
            chain_room = 0
            for i in range(segs_used, segs_used + count):
                chain_room += self._segs[i].len
            if mergeable and chain_room < <uint64_t>hdr_len:  # 5.1.6.3.1: a whole header each
                bad[0] += 1
                for c in range(nchains[0]):
                    self._put_used_buf(nused, self._chains[c].head, 0)
                self._put_used_buf(nused, head, 0)
                return DROPPED
            c = nchains[0]
            self._chains[c].head, self._chains[c].start, self._chains[c].count = head, segs_used, count
            nchains[0] = c + 1
            room += chain_room
            segs_used += count
            if not mergeable and room < need:
                too_big[0] += 1
                self._put_used_buf(nused, head, 0)
                return DROPPED
        return GOT_ROOM

    cdef inline void _put_used_buf(self, int *nused, uint16_t head, uint32_t length) noexcept nogil:
        self._used_buf[2 * nused[0]] = head
        self._used_buf[2 * nused[0] + 1] = length
        nused[0] += 1

    cdef void _scatter(self, int nchains, int hdr_len, const uint8_t *frame, Py_ssize_t n,
                       int at) noexcept nogil:
        """The reference's ``_scatter_one`` / ``_scatter``: the header (num_buffers =
        ``nchains``) then the frame across the chains' buffers, in order; each chain's
        (head, bytes written) goes to ``_used_buf[at:]``."""
        cdef uint8_t hdr[12]
        memset(hdr, 0, 12)
        hdr[10], hdr[11] = nchains & 0xFF, nchains >> 8
        cdef uint64_t total = hdr_len + n, p = 0, so, take, written
        cdef seg_t *first = &self._segs[self._chains[0].start]
        cdef seg_t *seg
        cdef int c
        cdef Py_ssize_t i
        if first.len >= total:  # the common case: one buffer holds it all
            memmove(first.p, hdr, hdr_len)
            memmove(first.p + hdr_len, frame, n)
            for c in range(nchains):
                self._used_buf[2 * (at + c)] = self._chains[c].head
                self._used_buf[2 * (at + c) + 1] = <uint32_t>total if c == 0 else 0
            return
        # p walks the stream header || frame; each buffer takes what fits
        for c in range(nchains):
            written = 0
            for i in range(self._chains[c].start, self._chains[c].start + self._chains[c].count):
                seg = &self._segs[i]
                so = 0
                while so < seg.len and p < total:
                    if p < <uint64_t>hdr_len:
                        take = min(seg.len - so, hdr_len - p)
                        memmove(seg.p + so, hdr + p, take)
                    else:
                        take = min(seg.len - so, total - p)
                        memmove(seg.p + so, frame + (p - hdr_len), take)
                    so += take
                    p += take
                    written += take
            self._used_buf[2 * (at + c)] = self._chains[c].head
            self._used_buf[2 * (at + c) + 1] = <uint32_t>written


def longest(frames):
    """The length of the longest frame of ``frames`` (0 if none): the reference's
    ``max(map(len, frames), default=0)``, for a port's MTU check of a batch."""
    cdef Py_ssize_t best = 0, n
    for f in frames:
        n = PyBytes_GET_SIZE(f) if type(f) is bytes else len(f)
        if n > best:
            best = n
    return best
