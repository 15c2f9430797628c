# Included by _emc.pyx: the header parser (flows/key.py's rules, in C) and the
# checksum arithmetic of the rewrites (flows/rewrite.py's).  Every read is bounded by
# the frame length ``n`` before it is made.

cdef inline uint32_t be16(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t be48(const uint8_t* p) noexcept nogil:
    return (<uint64_t>be16(p) << 32) | be32(p + 2)


cdef inline uint64_t be64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>be32(p) << 32) | be32(p + 4)


cdef inline void put16(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline void put32(uint8_t* p, uint32_t v) noexcept nogil:
    put16(p, v >> 16)
    put16(p + 2, v & 0xFFFF)


cdef void l4_fields(const uint8_t* f, Py_ssize_t off, Py_ssize_t n, uint32_t proto,
                    Parsed* k) noexcept nogil:
    """key._l4: ports (TCP/UDP/SCTP) or type/code (ICMP/ICMPv6) when long enough."""
    cdef Py_ssize_t need
    if proto == 6:
        need = 20
    elif proto == 17:
        need = 8
    elif proto == 132:
        need = 12
    elif proto == 1 or proto == 58:
        need = 4
    else:
        return
    if n - off < need:
        return
    k.present |= P_TP_SRC | P_TP_DST
    if proto == 1 or proto == 58:
        k.tp_src, k.tp_dst = f[off], f[off + 1]
    else:
        k.tp_src, k.tp_dst = be16(f + off), be16(f + off + 2)


cdef void parse_ipv4(const uint8_t* f, Py_ssize_t off, Py_ssize_t n, Parsed* k) noexcept nogil:
    """key._ipv4 (RFC 791 §3.1)."""
    if n - off < 20:
        return
    cdef uint32_t vihl = f[off]
    cdef Py_ssize_t hlen = (vihl & 0xF) * 4
    if vihl >> 4 != 4 or hlen < 20 or n - off < hlen:
        return
    k.l3 = off
    k.present |= P_NW_SRC | P_NW_DST | P_PROTO | P_TOS
    k.nw_tos = f[off + 1] & 0xFC
    k.nw_proto = f[off + 9]
    k.nw_src, k.nw_dst = be32(f + off + 12), be32(f + off + 16)
    if be16(f + off + 6) & 0x1FFF:
        return  # a later fragment: no L4 header
    k.l4 = off + hlen
    l4_fields(f, k.l4, n, k.nw_proto, k)


cdef void parse_ipv6(const uint8_t* f, Py_ssize_t off, Py_ssize_t n, Parsed* k) noexcept nogil:
    """key._ipv6: at most 8 extension headers (RFC 8200 §4)."""
    if n - off < 40:
        return
    cdef uint32_t vtf = be32(f + off)
    if vtf >> 28 != 6:
        return
    k.l3 = off
    k.present |= P_TOS | P_V6_SRC | P_V6_DST
    k.nw_tos = (vtf >> 20) & 0xFC
    k.v6[0], k.v6[1] = be64(f + off + 8), be64(f + off + 16)
    k.v6[2], k.v6[3] = be64(f + off + 24), be64(f + off + 32)
    cdef uint32_t nh = f[off + 6]
    cdef Py_ssize_t pos = off + 40, ext
    cdef int later = 0, i, done = 0
    for i in range(8):
        if nh != 0 and nh != 43 and nh != 60 and nh != 44 and nh != 51:
            done = 1
            break
        if n - pos < 8:
            return
        if nh == 44:
            later = (be16(f + pos + 2) & 0xFFF8) != 0
            ext = 8
        elif nh == 51:
            ext = (<Py_ssize_t>f[pos + 1] + 2) * 4
        else:
            ext = (<Py_ssize_t>f[pos + 1] + 1) * 8
        nh = f[pos]
        pos += ext
    if not done:
        return
    k.present |= P_PROTO
    k.nw_proto = nh
    if later or pos > n:
        return
    k.l4 = pos
    l4_fields(f, pos, n, nh, k)


cdef void parse_arp(const uint8_t* f, Py_ssize_t off, Py_ssize_t n, Parsed* k) noexcept nogil:
    """key._arp: IPv4 over Ethernet only (RFC 826)."""
    if n - off < 28:
        return
    if be16(f + off) != 1 or be16(f + off + 2) != 0x0800 or f[off + 4] != 6 or f[off + 5] != 4:
        return
    cdef uint32_t op = be16(f + off + 6)
    k.l3 = off
    k.present |= P_NW_SRC | P_NW_DST | P_PROTO
    k.nw_src, k.nw_dst = be32(f + off + 14), be32(f + off + 24)
    k.nw_proto = op if op <= 0xFF else 0


cdef void parse(const uint8_t* f, Py_ssize_t n, Parsed* k) noexcept nogil:
    """key.parse: the flow key fields and layer offsets of ``f``; never fails."""
    memset(k, 0, sizeof(Parsed))
    k.l3 = -1
    k.l4 = -1
    if n < 14:
        return
    k.present = P_DL_SRC | P_DL_DST
    k.dl_dst, k.dl_src = be48(f), be48(f + 6)
    cdef uint32_t etype = be16(f + 12), tci
    cdef Py_ssize_t off = 14
    k.ctag = etype == 0x8100 and n >= 18
    if etype == 0x8100 or etype == 0x88A8:
        if n < 18:
            return
        tci = be16(f + 14)
        etype = be16(f + 16)
        k.present |= P_VLAN | P_PCP
        k.vid, k.pcp = tci & 0xFFF, tci >> 13
        off = 18
    if etype < 0x600:
        etype = 0x05FF
    k.present |= P_DL_TYPE
    k.dl_type = etype
    if etype == 0x0800:
        parse_ipv4(f, off, n, k)
    elif etype == 0x86DD:
        parse_ipv6(f, off, n, k)
    elif etype == 0x0806:
        parse_arp(f, off, n, k)


cdef void key_words(const Parsed* k, uint32_t in_port, int l2, uint64_t* w) noexcept nogil:
    """The key as words; with ``l2`` only what NORMAL reads (in_port, MACs, the tag)."""
    if l2:
        w[0] = in_port | (<uint64_t>k.ctag << 48) | (<uint64_t>(k.present & P_VLAN) << 32)
        w[1], w[2] = k.dl_src, k.dl_dst | (<uint64_t>k.vid << 48)
        w[3] = w[4] = w[5] = w[6] = w[7] = w[8] = 0
        return
    w[0] = in_port | (<uint64_t>k.present << 32) | (<uint64_t>k.ctag << 48)
    w[1] = k.dl_src | (<uint64_t>k.dl_type << 48)
    w[2] = k.dl_dst | (<uint64_t>k.vid << 48) | (<uint64_t>k.pcp << 60)
    w[3] = k.nw_src | (<uint64_t>k.nw_dst << 32)
    w[4] = k.nw_proto | (<uint64_t>k.nw_tos << 8) | (<uint64_t>k.tp_src << 16) | (<uint64_t>k.tp_dst << 32)
    w[5], w[6], w[7], w[8] = k.v6[0], k.v6[1], k.v6[2], k.v6[3]


cdef inline uint64_t hash_words(const uint64_t* w) noexcept nogil:
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL
    cdef int i
    for i in range(KEY_WORDS):
        h ^= w[i]
        h *= 0xFF51AFD7ED558CCDULL
        h ^= h >> 29
    return h


cdef inline uint32_t csum_adjust(uint32_t csum, const uint8_t* old, const uint8_t* new,
                                 int n) noexcept nogil:
    """RFC 1624 eqn. 3, as rewrite.csum_adjust."""
    cdef uint32_t s = ~csum & 0xFFFF
    cdef int i
    for i in range(0, n, 2):
        s += ~((<uint32_t>old[i] << 8) | old[i + 1]) & 0xFFFF
        s += (<uint32_t>new[i] << 8) | new[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


cdef Py_ssize_t l4_csum_at(const Parsed* k, Py_ssize_t n) noexcept nogil:
    """rewrite._l4_csum: offset of the TCP/UDP checksum, -1 if absent or truncated."""
    if k.l4 < 0 or not (k.present & P_PROTO):
        return -1
    if k.nw_proto == 6:
        return k.l4 + 16 if n - k.l4 >= 20 else -1
    if k.nw_proto == 17:
        return k.l4 + 6 if n - k.l4 >= 8 else -1
    return -1


cdef void update_l4(uint8_t* b, Py_ssize_t at, const Parsed* k, const uint8_t* old,
                    const uint8_t* new, int n) noexcept nogil:
    """rewrite._update_l4: a zero IPv4 UDP checksum stays zero; zero is sent as 0xffff."""
    cdef int udp = k.nw_proto == 17
    cdef uint32_t csum = be16(b + at)
    if udp and csum == 0 and k.dl_type == 0x0800:
        return
    csum = csum_adjust(csum, old, new, n)
    put16(b + at, 0xFFFF if udp and csum == 0 else csum)
