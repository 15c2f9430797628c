"""The _pktio kernel's ring walkers (TPACKET_V3 blocks, TPACKET_V2 slots) on impossible values.

The kernel writes the ring, but a wrong offset or length must never make the walker read
outside the mapping.  The test maps the same ring a second time (an AF_PACKET ring can be
mapped more than once), waits until the kernel hands block 0 over (a 200 ms block timer,
so that the four frames sent land in it together), overwrites one field
with a hostile value, and then lets the kernel's ring read it: what comes back must be
whole frames that were sent, the damage counted as ``malformed``, and the ring must go
on receiving.  Run under ASan/UBSan by the sanitizer runner, a stray read is a failure.
"""

from __future__ import annotations

import mmap
import struct
import time
from types import ModuleType

import pytest
from pyswitch.ports.afpacket import TPACKET_V3, _open_socket, open_ring

from pyswitch.port import PortCounters
from tests.test_kernel_pktio import collect, frame, kern, ns_send, veth_pair

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]
__all__ = ["kern"]  # the fixture, shared with test_kernel_pktio

# struct tpacket_block_desc: block_status, num_pkts, offset_to_first_pkt (linux/if_packet.h)
BLOCK_STATUS, NUM_PKTS, FIRST = 8, 12, 16
# struct tpacket3_hdr: tp_next_offset, tp_snaplen, tp_status, tp_mac
NEXT, SNAPLEN, STATUS, MAC = 0, 12, 20, 24
VLAN_VALID = 0x10


def u32(view: mmap.mmap, off: int) -> int:
    return int(struct.unpack_from("=I", view, off)[0])


def second_frame(view: mmap.mmap) -> int:
    """Offset in block 0 of its second frame's header."""
    first = u32(view, FIRST)
    return first + u32(view, first + NEXT)


CASES = {
    # (what to overwrite: offset function, struct format, value), frames before the damage
    "no frames (as old kernels retired empty blocks)": (lambda v: NUM_PKTS, "=I", 0, 0),
    "num_pkts past the frames": (lambda v: NUM_PKTS, "=I", 0xFFFFFFFF, 4),
    "first frame past the block": (lambda v: FIRST, "=I", 1 << 20, 0),
    "first frame inside the header": (lambda v: FIRST, "=I", 8, 0),
    "snaplen past the block": (lambda v: second_frame(v) + SNAPLEN, "=I", 0xFFFFFFF0, 1),
    "mac offset past the block": (lambda v: second_frame(v) + MAC, "=H", 0xFFFF, 1),
    "next offset zero": (lambda v: u32(v, FIRST) + NEXT, "=I", 0, 1),
    "next offset past the block": (lambda v: u32(v, FIRST) + NEXT, "=I", 0xFFFFFF00, 1),
    "tagged runt": (lambda v: second_frame(v) + SNAPLEN, "=I", 3, 1),
    "untagged runt": (lambda v: second_frame(v) + SNAPLEN, "=I", 13, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_block_values_are_contained(kern: ModuleType, case: str) -> None:
    where, fmt, value, intact = CASES[case]
    sent = [frame(bytes([i]) * 60) for i in range(4)]
    with veth_pair() as (here, ns):
        c = PortCounters()
        ring = kern.PacketRingV3(_open_socket(here, TPACKET_V3), here, 1500, c, 4 << 16, 200)
        view = mmap.mmap(ring.fileno(), ring.ring_info()["ring_bytes"])
        try:
            ns_send(ns, sent)
            deadline = time.monotonic() + 2
            while not u32(view, BLOCK_STATUS) & 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert u32(view, BLOCK_STATUS) & 1, "the kernel did not hand block 0 over"
            assert u32(view, NUM_PKTS) == 4, "the four frames must share block 0"
            if case == "tagged runt":
                off = second_frame(view) + STATUS
                struct.pack_into("=I", view, off, u32(view, off) | VLAN_VALID)
            struct.pack_into(fmt, view, where(view), value)
            got = list(ring.receive(32))  # IPv6 is off: nothing else is on the wire
            assert u32(view, BLOCK_STATUS) == 0, "the damaged block must go back to the kernel"
            ns_send(ns, [frame(b"after" + bytes(60))])
            after = collect(ring, 1)
        finally:
            view.close()
            ring.close()
    assert got == sent[:intact]
    assert c.drops == ({} if case.startswith("no frames") else {"malformed": 1}), c.drops
    assert after == [frame(b"after" + bytes(60))]


# struct tpacket2_hdr: tp_status, tp_snaplen, tp_mac
V2_STATUS, V2_SNAPLEN, V2_MAC = 0, 8, 12
V2_CASES = {
    "snaplen past the slot": ("=I", V2_SNAPLEN, 0xFFFFFFF0),
    "mac offset past the slot": ("=H", V2_MAC, 0xFFFF),
    "runt": ("=I", V2_SNAPLEN, 13),
}


@pytest.mark.parametrize("case", list(V2_CASES))
def test_hostile_slot_values_are_contained(kern: ModuleType, case: str) -> None:
    """The same for the compiled TPACKET_V2 reader: the second of four slots is damaged;
    the other three frames come back, the damaged one counts as malformed."""
    fmt, field, value = V2_CASES[case]
    sent = [frame(bytes([i]) * 60) for i in range(4)]
    with veth_pair() as (here, ns):
        c = PortCounters()
        ring = open_ring(here, 1500, c, kern, tpacket=2)
        info = ring.ring_info()
        view = mmap.mmap(ring.fileno(), info["ring_slots"] * info["slot_size"])
        try:
            ns_send(ns, sent)
            last = 3 * info["slot_size"]
            deadline = time.monotonic() + 2
            while not u32(view, last + V2_STATUS) & 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            struct.pack_into(fmt, view, info["slot_size"] + field, value)
            got = list(ring.receive(32))
            ns_send(ns, [frame(b"after" + bytes(60))])
            after = collect(ring, 1)
        finally:
            view.close()
            ring.close()
    assert got == [sent[0], *sent[2:]]
    assert c.drops == {"malformed": 1}, c.drops
    assert after == [frame(b"after" + bytes(60))]
