"""The configuration model: bridges, ports and their settings, validated in one place.

One model, whatever it came from (a YAML topology, the CLI, the saved database): plain
data is turned into :class:`SwitchConfig` by :func:`parse_config`, which checks every
field and raises :class:`ConfigError` naming the path of the offending field (and, when
the data came from YAML, its file and line).  The data path is configured from this
model, never the other way round.

Names follow Open vSwitch's database where one exists: ``tag``, ``trunks``,
``vlan_mode``, ``type``, ``options``; bridge settings ``fail_mode``, ``mac_aging_time``
(OVS ``other_config:mac-aging-time``) and ``mac_table_size`` (``mac-table-size``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .bridge import FAIL_MODES
from .metrics import MetricsConfig, parse_metrics_config
from .fdb import DEFAULT_AGING_TIME, DEFAULT_MAX_ENTRIES
from .flows import PortNames
from .port import PortError, port_type
from .vlan import PortVlan, VlanConfigError

Path = tuple[str | int, ...]
#: path -> (line, column), 1-based, of where the value stands in its source file
Marks = Mapping[Path, tuple[int, int]]

_NAME_FORBIDDEN = set("/\\ \t\n:,=")

class ConfigError(ValueError):
    """A configuration value is wrong: ``path`` says which, ``message`` why."""

    def __init__(self, path: Path, message: str, source: str | None = None,
                 line: int | None = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ".".join(str(p) for p in self.path)
        loc = ""
        if self.source:
            loc = f"{self.source}:{self.line}: " if self.line else f"{self.source}: "
        return f"{loc}{where}: {self.message}" if where else f"{loc}{self.message}"

    def located(self, source: str | None, marks: Marks | None) -> "ConfigError":
        """The same error with the file and the line of the deepest known path prefix."""
        line = None
        if marks:
            for n in range(len(self.path), -1, -1):
                if self.path[:n] in marks:
                    line = marks[self.path[:n]][0]
                    break
        return ConfigError(self.path, self.message, source, line)

@dataclass
class PortConfig:
    name: str
    type: str
    options: dict[str, str] = field(default_factory=dict)
    vlan: PortVlan = field(default_factory=PortVlan)
    #: the OpenFlow port number on its bridge: asked for in the YAML (OVS's
    #: ofport_request) or given by :func:`parse_bridge` (lowest free), then saved, so a
    #: port keeps its number across restarts and rules written with numbers stay true
    ofport: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type}
        d.update(self.vlan.as_dict())
        if self.options:
            d["options"] = dict(self.options)
        if self.ofport is not None:
            d["ofport"] = self.ofport
        return d

@dataclass
class BridgeConfig:
    name: str
    fail_mode: str = "standalone"
    mac_aging_time: int = DEFAULT_AGING_TIME
    mac_table_size: int = DEFAULT_MAX_ENTRIES
    ports: dict[str, PortConfig] = field(default_factory=dict)
    #: flow rules in ovs-ofctl syntax (canonical form); None = the fail mode's default
    #: (standalone: ``priority=0 actions=NORMAL``; secure: none).
    flows: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.fail_mode != "standalone":
            d["fail_mode"] = self.fail_mode
        if self.mac_aging_time != DEFAULT_AGING_TIME:
            d["mac_aging_time"] = self.mac_aging_time
        if self.mac_table_size != DEFAULT_MAX_ENTRIES:
            d["mac_table_size"] = self.mac_table_size
        d["ports"] = {n: p.to_dict() for n, p in self.ports.items()}
        if self.flows is not None:
            d["flows"] = list(self.flows)
        return d

@dataclass
class SwitchConfig:
    bridges: dict[str, BridgeConfig] = field(default_factory=dict)
    #: where /metrics is served (docs/metrics.md); on, on loopback, by default
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bridges": {n: b.to_dict() for n, b in self.bridges.items()}}
        if self.metrics != MetricsConfig():
            d["metrics"] = self.metrics.to_dict()
        return d

    def find_port(self, name: str) -> tuple[BridgeConfig, PortConfig] | None:
        for br in self.bridges.values():
            if name in br.ports:
                return br, br.ports[name]
        return None

# -- validation --------------------------------------------------------------------------

def _mapping(value: Any, path: Path, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"{what} must be a mapping, not {_kind(value)}")
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(path + (str(k),), f"keys must be strings, not {_kind(k)}")
    return value

def _kind(value: Any) -> str:
    return {list: "a list", dict: "a mapping", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)

def _check_keys(d: Mapping[str, Any], allowed: set[str], path: Path) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(path + (k,), f"unknown key (allowed: {', '.join(sorted(allowed))})")

def _int(value: Any, path: Path, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        else:
            raise ConfigError(path, f"must be an integer, not {_kind(value)} {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(path, f"{value} is out of range ({rng})")
    return value

def check_name(name: str, path: Path, what: str) -> None:
    """Bridge and port names: non-empty, printable, no path separators or spaces."""
    if not name:
        raise ConfigError(path, f"{what} name is empty")
    bad = sorted(set(name) & _NAME_FORBIDDEN)
    if bad or ".." in name or not name.isprintable():
        raise ConfigError(path, f"{what} name {name!r} may not contain {bad or '..'}")
    if len(name) > 64:
        raise ConfigError(path, f"{what} name {name!r} is longer than 64 characters")

def _trunks(value: Any, path: Path) -> list[int]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.replace(" ", "")
        if text[:1] == "[" and text[-1:] == "]":  # ovs-vsctl's set syntax: [10,20]
            text = text[1:-1]
        items: list[Any] = [v for v in text.split(",") if v]
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(path, f"must be a list of VLAN IDs, not {_kind(value)}")
    return [_int(v, path + (i,), 0, 4095) for i, v in enumerate(items)]

def _options(value: Any, path: Path) -> dict[str, str]:
    opts = _mapping(value, path, "options")
    out: dict[str, str] = {}
    for k, v in opts.items():
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, (str, int, float)):
            out[k] = str(v)
        else:
            raise ConfigError(path + (k,), f"option values are scalars, not {_kind(v)}")
    return out

PORT_KEYS = {"type", "tag", "trunks", "vlan_mode", "options", "ofport"}
#: Highest OpenFlow port number a port may have (OFPP_MAX)
MAX_OFPORT = 0xFEFF
BRIDGE_KEYS = {"fail_mode", "mac_aging_time", "mac_table_size", "ports", "flows"}

def parse_port(name: str, raw: Any, path: Path) -> PortConfig:
    check_name(name, path, "port")
    d = _mapping(raw, path, "a port")
    _check_keys(d, PORT_KEYS, path)
    ptype = d.get("type")
    if not isinstance(ptype, str) or not ptype:
        raise ConfigError(path + ("type",), "every port needs a type (e.g. veth, tap, dpdkvhostuser)")
    try:
        cls = port_type(ptype)
    except PortError as exc:
        raise ConfigError(path + ("type",), str(exc)) from None
    options = _options(d.get("options"), path + ("options",))
    try:
        cls.validate_options(name, options)
    except PortError as exc:
        raise ConfigError(path + ("options",), str(exc)) from None
    tag = d.get("tag")
    if tag is not None:
        tag = _int(tag, path + ("tag",), 1, 4095)
    trunks = _trunks(d.get("trunks"), path + ("trunks",))
    mode = d.get("vlan_mode")
    if mode is not None and not isinstance(mode, str):
        raise ConfigError(path + ("vlan_mode",), f"must be a string, not {_kind(mode)}")
    try:
        vlan = PortVlan.make(tag, trunks, mode)
    except VlanConfigError as exc:
        field_name = str(exc).split(":")[0] if ":" in str(exc) else "vlan_mode"
        key = field_name if field_name in PORT_KEYS else "vlan_mode"
        raise ConfigError(path + (key,), str(exc)) from None
    ofport = d.get("ofport")
    if ofport is not None:
        ofport = _int(ofport, path + ("ofport",), 1, MAX_OFPORT)
    return PortConfig(name, ptype, options, vlan, ofport)

def parse_bridge(name: str, raw: Any, path: Path) -> BridgeConfig:
    check_name(name, path, "bridge")
    d = _mapping(raw, path, "a bridge")
    _check_keys(d, BRIDGE_KEYS, path)
    br = BridgeConfig(name)
    if "fail_mode" in d:
        if d["fail_mode"] not in FAIL_MODES:
            raise ConfigError(path + ("fail_mode",), f"must be one of {', '.join(FAIL_MODES)}")
        br.fail_mode = d["fail_mode"]
    if "mac_aging_time" in d:
        br.mac_aging_time = _int(d["mac_aging_time"], path + ("mac_aging_time",), 0, 86400 * 365)
    if "mac_table_size" in d:
        br.mac_table_size = _int(d["mac_table_size"], path + ("mac_table_size",), 1, 10_000_000)
    ports = _mapping(d.get("ports"), path + ("ports",), "ports")
    owner: dict[int, str] = {}
    for pname, praw in ports.items():
        pcfg = br.ports[pname] = parse_port(pname, praw, path + ("ports", pname))
        if pcfg.ofport is not None:
            if pcfg.ofport in owner:
                raise ConfigError(path + ("ports", pname, "ofport"),
                                  f"ofport {pcfg.ofport} is already port {owner[pcfg.ofport]}'s")
            owner[pcfg.ofport] = pname
    numbers = assign_ofports((n, p.ofport) for n, p in br.ports.items())
    for pname, pcfg in br.ports.items():
        pcfg.ofport = numbers[pname]
    if "flows" in d:
        br.flows = _flows(d["flows"], numbers, path + ("flows",))
    return br


def assign_ofports(ports: Iterable[tuple[str, int | None]]) -> dict[str, int]:
    """OpenFlow port numbers for a bridge's ports, in order: a port's own number when it
    has one, else the lowest number free (as the switch gives them).  Used to check and
    canonicalize flow rules against the numbers the ports have, or will have."""
    ports = list(ports)
    taken = {no for _, no in ports if no is not None}
    out: dict[str, int] = {}
    free = 1
    for name, no in ports:
        if no is None:
            while free in taken:
                free += 1
            no = free
            taken.add(no)
        out[name] = no
    return out


def keep_ofports(raw: Any, current: SwitchConfig) -> Any:
    """``raw`` (a whole configuration to apply) with the ports that ``current`` has on the
    same bridge given their current ofport where ``raw`` names none: applying a file
    written without numbers does not renumber (nor re-create) running ports.  Anything
    malformed is returned as it is, for :func:`parse_config` to report."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("bridges"), Mapping):
        return raw
    out = dict(raw)
    out["bridges"] = dict(raw["bridges"])
    for bname, braw in raw["bridges"].items():
        cur = current.bridges.get(bname) if isinstance(bname, str) else None
        if cur is None or not isinstance(braw, Mapping) or not isinstance(braw.get("ports"), Mapping):
            continue
        ports = {}
        for pname, praw in braw["ports"].items():
            have = cur.ports.get(pname) if isinstance(pname, str) else None
            if have is not None and isinstance(praw, Mapping) and "ofport" not in praw:
                praw = {**praw, "ofport": have.ofport}
            ports[pname] = praw
        out["bridges"][bname] = {**braw, "ports": ports}
    return out


def port_numbers(numbers: dict[str, int]) -> PortNames:
    """Names and numbers of :func:`assign_ofports` as the flow parser resolves them."""
    return PortNames.from_dict(numbers)


def _flows(value: Any, numbers: dict[str, int], path: Path) -> list[str]:
    """Validate flow strings against the bridge's ports (name -> ofport); return
    canonical texts."""
    from .flows import FlowSyntaxError, format_flow, parse_flow

    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(path, f"must be a list of flow strings, not {_kind(value)}")
    names = port_numbers(numbers)
    out = []
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise ConfigError(path + (i,), f"a flow is a string in ovs-ofctl syntax, not {_kind(text)}")
        try:
            out.append(format_flow(parse_flow(text, names), names))
        except (FlowSyntaxError, ValueError) as exc:
            raise ConfigError(path + (i,), str(exc)) from None
    return out

def parse_config(raw: Any, extra_keys: set[str] | None = None) -> SwitchConfig:
    """Validate plain data (from YAML or the database) into a :class:`SwitchConfig`."""
    d = _mapping(raw, (), "the configuration")
    _check_keys(d, {"bridges", "metrics"} | (extra_keys or set()), ())
    cfg = SwitchConfig(metrics=parse_metrics_config(d.get("metrics")))
    seen: dict[str, str] = {}
    bridges = _mapping(d.get("bridges"), ("bridges",), "bridges")
    for bname, braw in bridges.items():
        br = parse_bridge(bname, braw, ("bridges", bname))
        for pname in br.ports:
            if pname in seen:
                raise ConfigError(("bridges", bname, "ports", pname),
                                  f"port name already used on bridge {seen[pname]}")
            seen[pname] = bname
        cfg.bridges[bname] = br
    return cfg
