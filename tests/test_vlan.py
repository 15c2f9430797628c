"""VLAN membership with Open vSwitch's semantics, table-driven."""

import pytest

from pyswitch.vlan import NOT_CARRIED, TAGGED, UNTAGGED, PortVlan, VlanConfigError

ACCESS10 = PortVlan.make(tag=10)
TRUNK_ALL = PortVlan.make()
TRUNK_10_20 = PortVlan.make(trunks=[10, 20])
NATIVE_T = PortVlan.make(tag=10, trunks=[20], vlan_mode="native-tagged")
NATIVE_U = PortVlan.make(tag=10, trunks=[20], vlan_mode="native-untagged")


@pytest.mark.parametrize(
    "port,vid,expected",
    [
        (ACCESS10, None, 10),  # untagged enters the access VLAN
        (ACCESS10, 0, 10),  # priority-tagged counts as untagged
        (ACCESS10, 10, None),  # an access port drops tagged frames
        (ACCESS10, 20, None),
        (TRUNK_ALL, None, 0),  # untagged on a trunk is VLAN 0
        (TRUNK_ALL, 4094, 4094),
        (TRUNK_10_20, 10, 10),
        (TRUNK_10_20, 30, None),  # not trunked
        (TRUNK_10_20, None, None),  # VLAN 0 not in trunks
        (NATIVE_T, None, 10),
        (NATIVE_T, 20, 20),
        (NATIVE_T, 30, None),
        (NATIVE_U, None, 10),
    ],
)
def test_ingress(port, vid, expected):
    assert port.ingress(vid) == expected


@pytest.mark.parametrize(
    "port,vlan,expected",
    [
        (ACCESS10, 10, UNTAGGED),
        (ACCESS10, 20, NOT_CARRIED),
        (TRUNK_ALL, 0, UNTAGGED),
        (TRUNK_ALL, 5, TAGGED),
        (TRUNK_10_20, 20, TAGGED),
        (TRUNK_10_20, 5, NOT_CARRIED),
        (NATIVE_T, 10, TAGGED),
        (NATIVE_U, 10, UNTAGGED),
        (NATIVE_U, 20, TAGGED),
    ],
)
def test_egress(port, vlan, expected):
    assert port.egress(vlan) == expected


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"tag": 0}, "tag"),
        ({"tag": 4096}, "tag"),
        ({"trunks": [5000]}, "trunks"),
        ({"vlan_mode": "access"}, "needs a tag"),
        ({"vlan_mode": "native-untagged"}, "needs a tag"),
        ({"tag": 5, "trunks": [6]}, "access port has no trunks"),
        ({"tag": 5, "vlan_mode": "trunk"}, "trunk port has no tag"),
        ({"vlan_mode": "hybrid"}, "vlan_mode"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(VlanConfigError, match=message):
        PortVlan.make(**kwargs)


def test_defaults_follow_ovs():
    assert PortVlan.make(tag=3).mode == "access"
    assert PortVlan.make().mode == "trunk"
    assert PortVlan.make(tag=3).as_dict() == {"tag": 3}
    assert NATIVE_U.as_dict() == {"tag": 10, "trunks": [20], "vlan_mode": "native-untagged"}
