"""The NORMAL pipeline on its own (pure: no I/O, manual clock), on both data paths.

Every test runs once on the Python path and once on the compiled one (the ``datapath``
fixture selects it; ``Bridge`` picks the ``_emc`` kernel from that selection).
"""

import struct

import pytest

from pyswitch.bridge import Bridge
from pyswitch.port import PortCounters
from pyswitch.vlan import PortVlan

BCAST = "ff:ff:ff:ff:ff:ff"


def mac(n: int) -> str:
    return f"02:00:00:00:00:{n:02x}"


def frame(dst: str, src: str, vid: int | None = None, pcp: int = 0, payload: bytes = b"x" * 46) -> bytes:
    d = bytes.fromhex(dst.replace(":", ""))
    s = bytes.fromhex(src.replace(":", ""))
    tag = b"" if vid is None else struct.pack("!HH", 0x8100, (pcp << 13) | vid)
    return d + s + tag + b"\x08\x00" + payload


def vid_of(f: bytes) -> int | None:
    return struct.unpack_from("!H", f, 14)[0] & 0xFFF if f[12:14] == b"\x81\x00" else None


def make_bridge(vlans: dict[int, PortVlan], **kw) -> Bridge:
    br = Bridge("br0", **kw)
    for no, v in vlans.items():
        br.add_port(no, f"p{no}", v, PortCounters())
    return br


TRUNK = PortVlan.make()


@pytest.fixture(autouse=True)
def both_paths(datapath):
    """Run each test of this module on the Python and on the compiled path."""
    return datapath


def test_bridge_runs_the_selected_path(datapath):
    assert Bridge("br0").datapath == datapath


def test_flood_then_learn_then_unicast_only():
    br = make_bridge({1: TRUNK, 2: TRUNK, 3: TRUNK})
    out = br.process(1, [frame(mac(2), mac(1))], now=0)
    assert sorted(out) == [2, 3]  # unknown unicast floods, never back to port 1
    out = br.process(2, [frame(mac(1), mac(2))], now=1)
    assert list(out) == [1]  # mac(1) was learned on port 1
    out = br.process(1, [frame(mac(2), mac(1))], now=2)
    assert list(out) == [2]  # mac(2) learned on port 2: port 3 no longer sees it
    assert br.stats.floods == 1 and br.stats.forwarded == 2


def test_broadcast_and_multicast_flood():
    br = make_bridge({1: TRUNK, 2: TRUNK, 3: TRUNK})
    br.process(2, [frame(mac(1), mac(2))], now=0)
    assert sorted(br.process(1, [frame(BCAST, mac(1))], now=0)) == [2, 3]
    assert sorted(br.process(1, [frame("01:00:5e:00:00:01", mac(1))], now=0)) == [2, 3]


@pytest.mark.parametrize("dst", ["01:80:c2:00:00:00", "01:80:c2:00:00:02", "01:80:c2:00:00:0e"])
def test_reserved_multicast_is_not_forwarded(dst):
    """NORMAL drops frames to the IEEE 802.1D reserved group 01:80:c2:00:00:00-0f (STP BPDUs,
    LACP, LLDP), as Open vSwitch does by default (other_config:forward-bpdu=false); the
    addresses next to that block flood as other multicast does."""
    br = make_bridge({1: TRUNK, 2: TRUNK, 3: TRUNK})
    assert br.process(1, [frame(dst, mac(1))], now=0) == {}
    assert sorted(br.process(1, [frame("01:80:c2:00:00:10", mac(1))], now=0)) == [2, 3]
    assert sorted(br.process(1, [frame("01:80:c3:00:00:00", mac(1))], now=0)) == [2, 3]

def test_multicast_source_is_not_learned():
    br = make_bridge({1: TRUNK, 2: TRUNK})
    br.process(1, [frame(BCAST, "01:00:5e:00:00:01")], now=0)
    assert len(br.fdb) == 0


def test_mac_move_is_relearned():
    br = make_bridge({1: TRUNK, 2: TRUNK, 3: TRUNK})
    br.process(1, [frame(BCAST, mac(9))], now=0)
    br.process(3, [frame(BCAST, mac(9))], now=1)  # mac(9) moved to port 3
    assert list(br.process(2, [frame(mac(9), mac(2))], now=2)) == [3]
    assert br.fdb.stats.moved == 1


def test_frame_to_ingress_port_is_dropped():
    br = make_bridge({1: TRUNK, 2: TRUNK})
    br.process(1, [frame(BCAST, mac(1)), frame(BCAST, mac(5))], now=0)
    assert br.process(1, [frame(mac(5), mac(1))], now=0) == {}


def test_aging_makes_unicast_flood_again():
    br = make_bridge({1: TRUNK, 2: TRUNK, 3: TRUNK}, aging_time=5)
    br.process(2, [frame(BCAST, mac(2))], now=0)
    assert list(br.process(1, [frame(mac(2), mac(1))], now=4)) == [2]
    assert sorted(br.process(1, [frame(mac(2), mac(1))], now=10)) == [2, 3]


def test_table_size_limit():
    br = make_bridge({1: TRUNK, 2: TRUNK}, max_entries=3)
    br.process(1, [frame(BCAST, mac(n)) for n in range(10, 20)], now=0)
    assert len(br.fdb) == 3 and br.fdb.stats.evicted == 7


def test_access_vlans_are_isolated():
    a10, a20 = PortVlan.make(tag=10), PortVlan.make(tag=20)
    br = make_bridge({1: a10, 2: a10, 3: a20})
    out = br.process(1, [frame(BCAST, mac(1))], now=0)
    assert list(out) == [2]  # port 3 is in VLAN 20
    assert vid_of(out[2][0]) is None  # leaves an access port untagged


def test_access_port_drops_tagged_and_counts():
    br = make_bridge({1: PortVlan.make(tag=10), 2: TRUNK})
    assert br.process(1, [frame(BCAST, mac(1), vid=10)], now=0) == {}
    c = br.ports[1].counters
    assert c.rx_dropped == 1 and c.drops == {"vlan": 1}


def test_trunk_carries_tagged_both_ways():
    br = make_bridge({1: PortVlan.make(tag=10), 2: PortVlan.make(tag=20), 3: PortVlan.make(trunks=[10, 20])})
    out = br.process(1, [frame(BCAST, mac(1))], now=0)
    assert list(out) == [3] and vid_of(out[3][0]) == 10  # tag pushed on the trunk
    out = br.process(3, [frame(mac(1), mac(3), vid=10)], now=0)
    assert list(out) == [1] and vid_of(out[1][0]) is None  # tag stripped on the access port
    out = br.process(3, [frame(BCAST, mac(3), vid=20)], now=0)
    assert list(out) == [2]
    assert br.process(3, [frame(BCAST, mac(3), vid=30)], now=0) == {}  # 30 not trunked
    assert br.ports[3].counters.drops == {"vlan": 1}


def test_tag_push_keeps_payload_and_strip_restores_it():
    br = make_bridge({1: PortVlan.make(tag=7), 2: TRUNK, 3: PortVlan.make(tag=7)})
    original = frame(BCAST, mac(1), payload=bytes(range(60)))
    out = br.process(1, [original], now=0)
    tagged = out[2][0]
    assert len(tagged) == len(original) + 4 and vid_of(tagged) == 7
    assert tagged[:12] == original[:12] and tagged[16:] == original[12:]
    back = br.process(2, [tagged], now=0)
    assert back[3][0] == original


def test_native_untagged_and_priority_tag():
    native = PortVlan.make(tag=10, trunks=[20], vlan_mode="native-untagged")
    br = make_bridge({1: native, 2: PortVlan.make(tag=10), 3: TRUNK})
    out = br.process(2, [frame(BCAST, mac(2))], now=0)
    assert vid_of(out[1][0]) is None  # native VLAN leaves untagged
    assert vid_of(out[3][0]) == 10
    out = br.process(1, [frame(BCAST, mac(1), vid=0, pcp=5)], now=0)  # priority tag
    assert vid_of(out[3][0]) == 10 and out[3][0][14] >> 5 == 5  # PCP kept, VID set
    assert vid_of(out[2][0]) is None


def test_runt_frames_are_malformed_drops():
    br = make_bridge({1: TRUNK, 2: TRUNK})
    assert br.process(1, [b"\x00" * 13], now=0) == {}
    assert br.ports[1].counters.drops == {"malformed": 1}


def test_removing_a_port_forgets_its_macs():
    br = make_bridge({1: TRUNK, 2: TRUNK, 3: TRUNK})
    br.process(2, [frame(BCAST, mac(2))], now=0)
    br.remove_port(2)
    assert list(br.process(1, [frame(mac(2), mac(1))], now=0)) == [3]


@pytest.mark.parametrize("n", [1, 32, 256])
def test_batches_keep_order(n):
    br = make_bridge({1: TRUNK, 2: TRUNK})
    frames = [frame(BCAST, mac(1), payload=i.to_bytes(2, "big") * 23) for i in range(n)]
    out = br.process(1, frames, now=0)
    assert out[2] == frames
