# The C declarations of the _pktio kernel: Linux's packet-ring structures and the
# socket calls (linux/if_packet.h, sys/socket.h), and the two atomics on the block status.
from libc.stdint cimport uint16_t, uint32_t

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)

cdef extern from "<linux/if_packet.h>" nogil:
    struct tpacket_req3:
        unsigned int tp_block_size
        unsigned int tp_block_nr
        unsigned int tp_frame_size
        unsigned int tp_frame_nr
        unsigned int tp_retire_blk_tov
        unsigned int tp_sizeof_priv
        unsigned int tp_feature_req_word
    struct tpacket_req:
        unsigned int tp_block_size
        unsigned int tp_block_nr
        unsigned int tp_frame_size
        unsigned int tp_frame_nr
    struct tpacket2_hdr:
        uint32_t tp_status
        uint32_t tp_len
        uint32_t tp_snaplen
        uint16_t tp_mac
        uint16_t tp_vlan_tci
        uint16_t tp_vlan_tpid
    struct tpacket_stats_v3:
        unsigned int tp_packets
        unsigned int tp_drops
        unsigned int tp_freeze_q_cnt
    struct tpacket_hdr_v1:
        uint32_t block_status
        uint32_t num_pkts
        uint32_t offset_to_first_pkt
        uint32_t blk_len
    union tpacket_bd_header_u:
        tpacket_hdr_v1 bh1
    struct tpacket_block_desc:
        uint32_t version
        uint32_t offset_to_priv
        tpacket_bd_header_u hdr
    struct tpacket_hdr_variant1:
        uint32_t tp_rxhash
        uint32_t tp_vlan_tci
        uint16_t tp_vlan_tpid
    struct tpacket3_hdr:
        uint32_t tp_next_offset
        uint32_t tp_snaplen
        uint32_t tp_len
        uint32_t tp_status
        uint16_t tp_mac
        tpacket_hdr_variant1 hv1
    int SOL_PACKET, PACKET_RX_RING, PACKET_STATISTICS
    int TP_STATUS_KERNEL, TP_STATUS_USER, TP_STATUS_LOSING, TP_STATUS_BLK_TMO
    int TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID

cdef extern from *:
    """
    /* The block status word is shared with the kernel: read it with acquire (the
       frames it covers are complete before we look), write it with release (we are
       done with the block before the kernel may refill it). */
    static inline unsigned int pktio_load_acquire(const unsigned int *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void pktio_store_release(unsigned int *p, unsigned int v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    """
    unsigned int pktio_load_acquire(const unsigned int *p) nogil
    void pktio_store_release(unsigned int *p, unsigned int v) nogil
