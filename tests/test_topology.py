"""YAML topologies: accepted shapes, and errors that name the file, line and field."""

import pytest

from pyswitch.config import ConfigError
from pyswitch.topology import default_topology_text, dump_topology, load_topology, load_topology_text

GOOD = """\
bridges:
  br0:
    mac_aging_time: 30
    mac_table_size: 100
    ports:
      a: {type: memory, tag: 10}
      b:
        type: memory
        trunks: [10, 20]
      c: {type: memory, tag: 10, trunks: "20,30", vlan_mode: native-untagged}
  br1:
    fail_mode: secure
    ports:
      d: {type: memory, options: {capacity: 8}}
"""


def test_good_topology_parses():
    cfg = load_topology_text(GOOD, "good.yaml")
    br0 = cfg.bridges["br0"]
    assert br0.mac_aging_time == 30 and br0.mac_table_size == 100
    assert br0.ports["a"].vlan.tag == 10 and br0.ports["a"].vlan.mode == "access"
    assert br0.ports["b"].vlan.trunks == {10, 20}
    assert br0.ports["c"].vlan.mode == "native-untagged" and br0.ports["c"].vlan.trunks == {20, 30}
    assert cfg.bridges["br1"].ports["d"].options == {"capacity": "8"}


def test_export_round_trips():
    cfg = load_topology_text(GOOD, "good.yaml")
    again = load_topology_text(dump_topology(cfg), "exported.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "text,expected",
    [
        ("bridges:\n  br0:\n    ports:\n      a: {type: memory, tag: 5000}\n",
         "t.yaml:4: bridges.br0.ports.a.tag: 5000 is out of range (1..4095)"),
        ("bridges:\n  br0:\n    ports:\n      a: {type: memory}\n      a: {type: memory}\n",
         "t.yaml:5: bridges.br0.ports.a: duplicate key"),
        ("bridges:\n  br0:\n    ports:\n      a: {type: warp}\n",
         "t.yaml:4: bridges.br0.ports.a.type: unknown port type 'warp'"),
        ("bridges:\n  br0:\n    portz: {}\n",
         "t.yaml:3: bridges.br0.portz: unknown key"),
        ("bridges:\n  br0: [\n", "t.yaml:3: not valid YAML"),
        ("bridges:\n  br0:\n    ports:\n      a: {type: memory, options: {colour: red}}\n",
         "t.yaml:4: bridges.br0.ports.a.options: unknown option 'colour' for type memory"),
        ("bridges:\n  br0:\n    ports:\n      a: {type: memory}\n  br1:\n    ports:\n      a: {type: memory}\n",
         "t.yaml:7: bridges.br1.ports.a: port name already used on bridge br0"),
        ("bridges:\n  br0:\n    ports:\n      ../x: {type: memory}\n",
         "t.yaml:4: bridges.br0.ports.../x: port name '../x' may not contain"),
        ("bridges:\n  br0:\n    mac_aging_time: soon\n",
         "t.yaml:3: bridges.br0.mac_aging_time: must be an integer"),
        ("bridges:\n  br0:\n    ports:\n      a: {tag: 3}\n",
         "t.yaml:4: bridges.br0.ports.a.type: every port needs a type"),
        ("bridges:\n  br0:\n    ports:\n      a: {type: memory, tag: 3, vlan_mode: trunk}\n",
         "t.yaml:4: bridges.br0.ports.a.vlan_mode: a trunk port has no tag"),
        ("- just\n- a list\n", "t.yaml:1: the configuration must be a mapping"),
        ("bridges:\n  br0:\n    ports:\n      a: !!python/object:os.system {}\n",
         "t.yaml"),
    ],
)
def test_errors_name_file_line_and_field(text, expected):
    with pytest.raises(ConfigError) as info:
        load_topology_text(text, "t.yaml")
    assert str(info.value).startswith(expected), str(info.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_topology(tmp_path / "missing.yaml")


def test_default_topology_is_valid_text():
    text = default_topology_text()
    assert "bridges:" in text and "tap" in text and "veth" in text


def test_examples_are_valid():
    from pathlib import Path

    examples = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))
    assert examples, "examples/ has no topology"
    for path in examples:
        load_topology(path)


@pytest.mark.parametrize("text", ["10,20", "[10,20]", "[10, 20]", " 10, 20 "])
def test_trunks_take_the_ovs_vsctl_set_syntax(text):
    """`pyswitch set Port p trunks=[10,20]` is how ovs-vsctl writes a set; the brackets
    were read as part of the first and last VLAN ID."""
    from pyswitch.config import parse_config

    cfg = parse_config({"bridges": {"br0": {"ports": {"p": {"type": "memory", "trunks": text}}}}})
    assert cfg.bridges["br0"].ports["p"].vlan.trunks == {10, 20}
