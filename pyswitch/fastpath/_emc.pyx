# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The exact-match cache of forwarding decisions: the compiled fast path of a bridge.

Open vSwitch keeps its datapath under ofproto: the datapath repeats decisions, ofproto
makes them.  This kernel is pyswitch's datapath for one bridge.  Per batch (one call):

1. parse each frame into a flow key -- the fields ``pyswitch/flows/key.py`` extracts,
   the same way (``flow_key`` returns them for the tests), plus one bit the NORMAL
   pipeline reads beside them: whether the frame carries an 802.1Q C-tag (or, in
   ``l2_only`` mode, for a bridge with only the default NORMAL rule, just in_port,
   MACs and tag);
2. hash it and look it up in a 4-way set-associative table of ``capacity`` entries
   (C arrays; a new entry takes a free way or the way used least recently);
3. on a hit, run the entry's *program*: header rewrites (RFC 1624 incremental
   checksums, exactly as ``flows/rewrite.py``), output snapshots, outputs to port
   indices, NORMAL's egress forms (strip / push / set the 802.1Q tag); output frames
   are appended to the caller's per-port lists: the input object itself when nothing
   was edited, else a new ``bytes`` shared by the outputs of one form, as the Python
   path does; count the hit, the entry's floods/forwards/drops, its packets, bytes and
   last use;
4. on a miss (unknown key, a NORMAL decision past its MAC-aging deadline, a frame
   shorter than an Ethernet header) stop and return the frame's index: Python's slow
   path decides it (``pyswitch/bridge_fast.py``), and ``install`` runs that decision
   on the frame and goes on with the batch -- one call per batch plus one per miss,
   so arrival order per output port is kept.

Entries carry the cache's *epoch*: ``clear`` makes every entry stale in O(1).  Which
decisions may be cached, and how the entries' counters go back to the flow rules and
the MAC table (``harvest``), is the slow path's business; see its docstring.

Memory safety: frames are read through the buffer protocol with their length; every
read is bounded by that length (the parser mirrors key.py's length checks); the edit
buffer grows before every insert.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove, memset

# rewrite op codes (< OP_EMIT) and output op codes; bridge_fast.py uses the same numbers
cdef enum:
    OP_DL_SRC = 1
    OP_DL_DST = 2
    OP_VID = 3
    OP_PCP = 4
    OP_STRIP = 5
    OP_PUSH = 6
    OP_NW_SRC = 7
    OP_NW_DST = 8
    OP_TP_SRC = 9
    OP_TP_DST = 10
    OP_EMIT = 20  # the frame as the outputs that follow see it (a snapshot after rewrites)
    OP_OUT = 21  # append the snapshot to port index ``port``
    OP_NORMAL = 22  # a NORMAL group begins: forget the egress forms made so far
    OP_NOUT = 23  # append the snapshot in egress form ``form`` for VLAN ``arg``

cdef enum:
    UNTAGGED = 1
    TAGGED = 2
    WAYS = 4
    KEY_WORDS = 9
    # presence bits, one per flows.key.FlowKey field (index 1..13; in_port is always there)
    P_DL_SRC = 1 << 1
    P_DL_DST = 1 << 2
    P_DL_TYPE = 1 << 3
    P_VLAN = 1 << 4
    P_PCP = 1 << 5
    P_NW_SRC = 1 << 6
    P_NW_DST = 1 << 7
    P_PROTO = 1 << 8
    P_TOS = 1 << 9
    P_TP_SRC = 1 << 10
    P_TP_DST = 1 << 11
    P_V6_SRC = 1 << 12
    P_V6_DST = 1 << 13

OPCODES = {"mod_dl_src": OP_DL_SRC, "mod_dl_dst": OP_DL_DST, "mod_vlan_vid": OP_VID,
           "mod_vlan_pcp": OP_PCP, "strip_vlan": OP_STRIP, "push_vlan": OP_PUSH,
           "mod_nw_src": OP_NW_SRC, "mod_nw_dst": OP_NW_DST, "mod_tp_src": OP_TP_SRC,
           "mod_tp_dst": OP_TP_DST, "emit": OP_EMIT, "out": OP_OUT, "normal": OP_NORMAL,
           "nout": OP_NOUT}


cdef struct Parsed:
    uint32_t present
    int ctag  # an 802.1Q C-tag NORMAL sees (TPID 0x8100, at least 18 bytes)
    uint64_t dl_src, dl_dst
    uint32_t dl_type, vid, pcp, nw_src, nw_dst, nw_proto, nw_tos, tp_src, tp_dst
    uint64_t v6[4]  # ipv6_src hi, lo, ipv6_dst hi, lo
    Py_ssize_t l3, l4  # layer offsets as key.parse's Layout, -1 = absent


cdef struct Op:
    uint8_t code
    uint8_t form
    uint32_t port
    uint32_t arg
    uint64_t mac


cdef struct Entry:
    uint64_t key[KEY_WORDS]
    uint32_t epoch  # valid while equal to the cache's epoch
    uint32_t nops
    Op* ops
    int has_deadline  # a NORMAL lookup hit: valid while now - seen < aging
    double seen
    uint32_t floods, forwarded, drop_flow, drop_vlan, drop_malformed  # per frame
    uint64_t packets, nbytes, last_seq  # since the last harvest (last_seq: ever)
    double last_now
    int touched


include "_emc_parse.pxi"


cdef class Cache:
    """``capacity`` cached decisions (a power of two, at least 4) of one bridge."""

    cdef Entry* entries  # capacity + 1: the last one is the scratch entry (never hashed)
    cdef uint32_t capacity, epoch, ntouched
    cdef uint32_t* touched
    cdef uint64_t seq
    cdef double aging
    cdef uint8_t* wbuf
    cdef Py_ssize_t wcap, wlen
    cdef uint64_t c_hits, c_floods, c_forwarded, c_flow, c_vlan, c_malformed
    cdef int l2

    def __cinit__(self, uint32_t capacity=65536):
        if capacity < WAYS or capacity & (capacity - 1):
            raise ValueError("capacity must be a power of two, at least 4")
        self.capacity = capacity
        self.epoch = 1
        self.entries = <Entry*>calloc(capacity + 1, sizeof(Entry))
        self.touched = <uint32_t*>malloc(capacity * sizeof(uint32_t))
        self.wcap = 2048
        self.wbuf = <uint8_t*>malloc(self.wcap)
        if self.entries == NULL or self.touched == NULL or self.wbuf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef uint32_t i
        if self.entries != NULL:
            for i in range(self.capacity + 1):
                free(self.entries[i].ops)
            free(self.entries)
        free(self.touched)
        free(self.wbuf)

    @property
    def capacity(self):
        return self.capacity

    def clear(self, bint l2_only=False):
        """Forget every entry (O(1): a new epoch).  Harvest first: counters go too.
        ``l2_only``: from now on keys hold only what NORMAL reads (in_port, MACs,
        802.1Q tag) -- for a bridge whose only rule is the default NORMAL, whose
        decisions do not depend on the other fields."""
        cdef uint32_t i
        self.l2 = l2_only
        for i in range(self.ntouched):
            self.entries[self.touched[i]].touched = 0
        self.ntouched = 0
        self.epoch += 1
        if self.epoch == 0:  # wrapped: make every old entry stale for real
            for i in range(self.capacity):
                self.entries[i].epoch = 0
            self.epoch = 1

    def __len__(self):
        cdef uint32_t i, n = 0
        for i in range(self.capacity):
            n += self.entries[i].epoch == self.epoch
        return n

    def take_counts(self):
        """(hits, floods, forwarded, drop flow, drop vlan, drop malformed) since the
        last call; then zero."""
        out = (self.c_hits, self.c_floods, self.c_forwarded, self.c_flow, self.c_vlan,
               self.c_malformed)
        self.c_hits = self.c_floods = self.c_forwarded = 0
        self.c_flow = self.c_vlan = self.c_malformed = 0
        return out

    def harvest(self):
        """``[(slot, packets, bytes, last_now, last_seq)]`` of every entry run since
        the last harvest; their counters start again from zero."""
        cdef uint32_t i, s
        cdef Entry* e
        out = []
        for i in range(self.ntouched):
            s = self.touched[i]
            e = &self.entries[s]
            out.append((s, e.packets, e.nbytes, e.last_now, e.last_seq))
            e.packets = e.nbytes = 0
            e.touched = 0
        self.ntouched = 0
        return out

    cdef Entry* find(self, const uint64_t* w, uint64_t h) noexcept:
        cdef Entry* e
        cdef uint32_t base = <uint32_t>(h & (self.capacity - 1)) & ~(<uint32_t>WAYS - 1)
        cdef int i, j
        for i in range(WAYS):
            e = &self.entries[base + i]
            if e.epoch != self.epoch:
                continue
            for j in range(KEY_WORDS):
                if e.key[j] != w[j]:
                    break
            else:
                return e
        return NULL

    cdef uint32_t victim(self, const uint64_t* w, uint64_t h) noexcept:
        """The slot for a new key: its old entry, a stale way, or the least recent."""
        cdef uint32_t base = <uint32_t>(h & (self.capacity - 1)) & ~(<uint32_t>WAYS - 1)
        cdef Entry* e = self.find(w, h)
        cdef uint32_t best = base
        cdef int i
        if e != NULL:
            return <uint32_t>(e - self.entries)
        for i in range(WAYS):
            if self.entries[base + i].epoch != self.epoch:
                return base + i
            if self.entries[base + i].last_seq < self.entries[best].last_seq:
                best = base + i
        return best

    def run(self, list frames, Py_ssize_t start, uint32_t in_port, double now, list lists,
            list order):
        """Run cached decisions for ``frames[start:]`` received on ``in_port``; stop
        at the first miss and return its index (``len(frames)`` when none missed).
        Outputs go to ``lists[port index]`` (a new list where None; the index is then
        appended to ``order``)."""
        cdef Py_ssize_t i, n = len(frames)
        cdef Py_buffer view
        cdef Parsed k
        cdef uint64_t w[KEY_WORDS]
        cdef Entry* e
        for i in range(start, n):
            frame = frames[i]
            PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
            try:
                if view.len < 14:
                    return i
                parse(<const uint8_t*>view.buf, view.len, &k)
                key_words(&k, in_port, self.l2, w)
                e = self.find(w, hash_words(w))
                if e == NULL or (e.has_deadline and not (now - e.seen < self.aging)):
                    return i
                self.c_hits += 1
                self.execute(e, frame, <const uint8_t*>view.buf, view.len, now, lists, order, 1)
            finally:
                PyBuffer_Release(&view)
        return n

    def install(self, bint cache, list prog, tuple counts, bint has_deadline, double seen,
                double aging, list frames, Py_ssize_t i, uint32_t in_port, double now,
                list lists, list order):
        """Install the slow path's decision for ``frames[i]``: in the table if
        ``cache``, else in the scratch entry (run once).  ``prog`` is a list of ops
        ``(code, form, port index, arg, mac)``; ``counts`` (floods, forwarded, drop
        flow, drop vlan, drop malformed) per frame; with ``has_deadline`` the entry
        holds while ``now - seen < aging``.  Runs it on ``frames[i]`` (not a hit, and
        not in the entry's counters: the slow path has done that frame's learning and
        credits it), then goes on as :meth:`run` from ``i + 1``.  Returns ``(slot,
        next miss)``."""
        cdef Py_buffer view
        cdef Parsed k
        cdef uint64_t w[KEY_WORDS]
        cdef uint32_t slot = self.capacity
        cdef Entry* e
        cdef Op* ops = <Op*>malloc((len(prog) or 1) * sizeof(Op))
        cdef Py_ssize_t j
        if ops == NULL:
            raise MemoryError()
        try:
            for j, (code, form, port, arg, mac) in enumerate(prog):
                ops[j].code, ops[j].form, ops[j].port = code, form, port
                ops[j].arg, ops[j].mac = arg, mac
        except BaseException:
            free(ops)
            raise
        self.aging = aging
        frame = frames[i]
        PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
        try:
            if cache and view.len >= 14:
                parse(<const uint8_t*>view.buf, view.len, &k)
                key_words(&k, in_port, self.l2, w)
                slot = self.victim(w, hash_words(w))
            e = &self.entries[slot]
            free(e.ops)
            e.ops, e.nops = ops, len(prog)
            if slot != self.capacity:
                memcpy(e.key, w, sizeof(w))
                e.epoch = self.epoch
            e.has_deadline, e.seen = has_deadline, seen
            e.floods, e.forwarded, e.drop_flow, e.drop_vlan, e.drop_malformed = counts
            e.packets = e.nbytes = 0
            self.execute(e, frame, <const uint8_t*>view.buf, view.len, now, lists, order, 0)
        finally:
            PyBuffer_Release(&view)
        return slot, self.run(frames, i + 1, in_port, now, lists, order)

    cdef int grow(self, Py_ssize_t need) except -1:
        cdef uint8_t* b
        if need <= self.wcap:
            return 0
        b = <uint8_t*>realloc(self.wbuf, need * 2)
        if b == NULL:
            raise MemoryError()
        self.wbuf, self.wcap = b, need * 2
        return 0

    cdef int tagged(self) noexcept:
        cdef uint32_t t
        if self.wlen < 18:
            return 0
        t = be16(self.wbuf + 12)
        return t == 0x8100 or t == 0x88A8

    cdef int insert_tag(self, uint32_t tpid, uint32_t tci) except -1:
        self.grow(self.wlen + 4)
        memmove(self.wbuf + 16, self.wbuf + 12, self.wlen - 12)
        put16(self.wbuf + 12, tpid)
        put16(self.wbuf + 14, tci)
        self.wlen += 4
        return 0

    cdef int rewrite(self, const Op* op) except -1:
        """One op of flows/rewrite.py on the edit buffer (nothing if the header the
        op edits is missing)."""
        cdef uint8_t* b = self.wbuf
        cdef uint32_t code = op.code, tci
        cdef Parsed k
        cdef uint8_t old[4]
        cdef uint8_t new[4]
        cdef Py_ssize_t at, l4c
        if code == OP_DL_SRC or code == OP_DL_DST:
            if self.wlen >= 14:
                at = 6 if code == OP_DL_SRC else 0
                put16(b + at, <uint32_t>(op.mac >> 32))
                put32(b + at + 2, <uint32_t>(op.mac & 0xFFFFFFFF))
        elif code == OP_VID or code == OP_PCP:
            if self.tagged():
                tci = be16(b + 14)
                if code == OP_VID:
                    put16(b + 14, (tci & 0xF000) | op.arg)
                else:
                    put16(b + 14, (tci & 0x1FFF) | (op.arg << 13))
            elif self.wlen >= 14:
                self.insert_tag(0x8100, op.arg if code == OP_VID else op.arg << 13)
        elif code == OP_STRIP:
            if self.tagged():
                memmove(b + 12, b + 16, self.wlen - 16)
                self.wlen -= 4
        elif code == OP_PUSH:
            if self.wlen >= 14:
                self.insert_tag(op.arg, be16(b + 14) if self.tagged() else 0)
        elif code == OP_NW_SRC or code == OP_NW_DST:
            parse(b, self.wlen, &k)
            if not (k.present & P_DL_TYPE) or k.dl_type != 0x0800 or k.l3 < 0:
                return 0
            at = k.l3 + (12 if code == OP_NW_SRC else 16)
            memcpy(old, b + at, 4)
            put32(new, op.arg)
            memcpy(b + at, new, 4)
            put16(b + k.l3 + 10, csum_adjust(be16(b + k.l3 + 10), old, new, 4))
            l4c = l4_csum_at(&k, self.wlen)
            if l4c >= 0:
                update_l4(b, l4c, &k, old, new, 4)
        elif code == OP_TP_SRC or code == OP_TP_DST:
            parse(b, self.wlen, &k)
            l4c = l4_csum_at(&k, self.wlen)
            if l4c < 0:
                return 0
            at = k.l4 + (0 if code == OP_TP_SRC else 2)
            memcpy(old, b + at, 2)
            put16(new, op.arg)
            memcpy(b + at, new, 2)
            update_l4(b, l4c, &k, old, new, 2)
        return 0

    cdef object egress(self, object cur, const uint8_t* p, Py_ssize_t n, int form,
                       uint32_t vlan):
        """bridge._egress_frame: ``cur`` as a port of ``form`` wants it for ``vlan``."""
        cdef int ctag = n >= 18 and p[12] == 0x81 and p[13] == 0x00
        cdef uint32_t tci
        cdef object out
        cdef uint8_t* o
        if form == UNTAGGED:
            if not ctag:
                return cur
            out = PyBytes_FromStringAndSize(NULL, n - 4)
            o = <uint8_t*>PyBytes_AS_STRING(out)
            memcpy(o, p, 12)
            memcpy(o + 12, p + 16, n - 16)
            return out
        if not ctag:
            out = PyBytes_FromStringAndSize(NULL, n + 4)
            o = <uint8_t*>PyBytes_AS_STRING(out)
            memcpy(o, p, 12)
            put16(o + 12, 0x8100)
            put16(o + 14, vlan)
            memcpy(o + 16, p + 12, n - 12)
            return out
        tci = be16(p + 14)
        if tci & 0xFFF == vlan:
            return cur
        out = PyBytes_FromStringAndSize(<const char*>p, n)
        o = <uint8_t*>PyBytes_AS_STRING(out)
        put16(o + 14, (tci & 0xF000) | vlan)
        return out

    cdef int execute(self, Entry* e, object frame, const uint8_t* p, Py_ssize_t n,
                     double now, list lists, list order, int record) except -1:
        """Run ``e``'s program on one frame; ``record``: count it in the entry."""
        cdef uint32_t j, slot = <uint32_t>(e - self.entries)
        cdef const Op* op
        cdef object cur = frame, f, untagged = None, tagged = None, lst
        cdef const uint8_t* cp = p
        cdef Py_ssize_t cn = n
        cdef int edited = 0
        self.seq += 1
        e.last_seq = self.seq
        if record and not e.touched and slot != self.capacity:
            e.touched = 1
            self.touched[self.ntouched] = slot
            self.ntouched += 1
        if record:
            e.packets += 1
            e.nbytes += n
            e.last_now = now
        self.c_floods += e.floods
        self.c_forwarded += e.forwarded
        self.c_flow += e.drop_flow
        self.c_vlan += e.drop_vlan
        self.c_malformed += e.drop_malformed
        for j in range(e.nops):
            op = &e.ops[j]
            if op.code < OP_EMIT:
                if not edited:
                    self.grow(n + 64)
                    memcpy(self.wbuf, p, n)
                    self.wlen = n
                    edited = 1
                self.rewrite(op)
            elif op.code == OP_EMIT:
                if edited:
                    cur = PyBytes_FromStringAndSize(<const char*>self.wbuf, self.wlen)
                    cp = <const uint8_t*>PyBytes_AS_STRING(cur)
                    cn = PyBytes_GET_SIZE(cur)
            elif op.code == OP_NORMAL:
                untagged = tagged = None
            else:
                if op.port >= <uint32_t>len(lists):
                    continue
                if op.code == OP_OUT:
                    f = cur
                elif op.form == UNTAGGED:
                    if untagged is None:
                        untagged = self.egress(cur, cp, cn, UNTAGGED, op.arg)
                    f = untagged
                else:
                    if tagged is None:
                        tagged = self.egress(cur, cp, cn, TAGGED, op.arg)
                    f = tagged
                lst = lists[op.port]
                if lst is None:
                    lists[op.port] = [f]
                    order.append(op.port)
                else:
                    (<list>lst).append(f)
        return 0


def flow_key(frame, uint32_t in_port):
    """The kernel's key of ``frame`` as ``(FlowKey fields..., ctag)``: the first 14
    items compare equal to ``pyswitch.flows.extract(frame, in_port)``."""
    cdef Py_buffer view
    cdef Parsed k
    PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
    try:
        parse(<const uint8_t*>view.buf, view.len, &k)
    finally:
        PyBuffer_Release(&view)
    cdef uint32_t p = k.present

    def f(bit, value):
        return value if p & bit else None

    return (in_port, f(P_DL_SRC, k.dl_src), f(P_DL_DST, k.dl_dst), f(P_DL_TYPE, k.dl_type),
            f(P_VLAN, k.vid), f(P_PCP, k.pcp), f(P_NW_SRC, k.nw_src), f(P_NW_DST, k.nw_dst),
            f(P_PROTO, k.nw_proto), f(P_TOS, k.nw_tos), f(P_TP_SRC, k.tp_src),
            f(P_TP_DST, k.tp_dst), f(P_V6_SRC, (<object>k.v6[0]) << 64 | k.v6[1]),
            f(P_V6_DST, (<object>k.v6[2]) << 64 | k.v6[3]), bool(k.ctag))
