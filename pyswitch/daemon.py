"""The daemon: the switch, its saved configuration and the control socket, together.

Every request that changes something is a function of the configuration: the daemon
takes the current configuration as plain data, applies the request(s) to it, validates
the result with the one validator (:func:`pyswitch.config.parse_config`), makes the
running switch match it (:mod:`pyswitch.reconcile`, undone on failure), and only then
saves it.  So a refused or failed request changes nothing, and the database always
holds a configuration that was validated and applied.

``pyswitch up FILE`` runs the same daemon without a database (the file is the
configuration); ``pyswitch daemon`` restores from and saves to the database.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError, SwitchConfig, parse_config
from .control import ControlError, ControlServer, control_path
from .bridge import DEFAULT_FLOW
from .db import ConfigStore
from .flows import (Flow, FlowSyntaxError, PortNames, entry_to_dict, format_dump_line, format_flow,
                    parse_filter, parse_flow)
from .flows.model import IN_PORT
from .metrics import MetricsConfig, MetricsError, MetricsServer, start_metrics_server
from .packet import mac_str
from .stats import port_stats
from .port import PortError
from .reconcile import execute, plan
from .switch import Switch

log = logging.getLogger(__name__)

PORT_KEYS = ("type", "tag", "trunks", "vlan_mode")
BRIDGE_SETTINGS = {"fail_mode": "fail_mode", "mac_aging_time": "mac_aging_time",
                   "mac_table_size": "mac_table_size",
                   "other_config:mac-aging-time": "mac_aging_time",
                   "other_config:mac-table-size": "mac_table_size"}
DEFAULT_BRIDGE = "br0"

Raw = dict[str, Any]


class Daemon:
    def __init__(self, rundir: Path, db: Path | None = None, group: str | None = None,
                 metrics_override: dict[str, Any] | None = None) -> None:
        self.switch = Switch()
        #: command-line settings of /metrics that win over the configuration (not saved)
        self.metrics_override = metrics_override or {}
        self.metrics: MetricsServer | None = None
        self.cfg = SwitchConfig()
        self.store = ConfigStore(db) if db is not None else None
        self.control = ControlServer(control_path(rundir), self.switch.loop, self.dispatch, group)
        self.errors: dict[str, str] = {}  # port -> why it could not be restored
        self._mutators: dict[str, Callable[[Raw, dict[str, Any]], None]] = {
            "add-br": _add_br, "del-br": _del_br, "add-port": _add_port, "del-port": _del_port,
            "set-port": _set_port, "set-bridge": _set_bridge,
            "add-flow": _add_flow, "add-flows": _add_flow, "del-flows": _del_flows,
            "mod-flows": _mod_flows, "replace-flows": _replace_flows,
        }
        self._readers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "list-br": self._list_br, "br-exists": self._br_exists, "list-ports": self._list_ports,
            "show": self._show, "export": lambda p: self.cfg.to_dict(),
            "fdb-show": self._fdb_show, "fdb-flush": self._fdb_flush, "port-stats": self._port_stats,
            "dump-flows": self._dump_flows,
        }
        self.switch.on_flows_expired = self._flows_expired

    # -- life cycle ----------------------------------------------------------------------
    def start(self, initial: SwitchConfig | None = None) -> None:
        """Open the control socket, then build the configuration (the database's when
        there is one, else ``initial``).  Raises DatabaseError, ControlError, PortError."""
        cfg = initial or SwitchConfig()
        if self.store is not None:
            saved = self.store.load()
            if saved is not None:
                cfg = saved
        self.control.open()
        if self.store is not None:
            self._restore(cfg)
        else:
            self.commit(cfg)
        self.metrics = self._start_metrics(cfg.metrics)
        # Long-lived objects made so far never die: keep the collector from walking
        # them (a full collection stalls forwarding for tens of milliseconds).
        gc.collect()
        gc.freeze()

    def _start_metrics(self, mcfg: MetricsConfig) -> MetricsServer | None:
        """Serve /metrics as configured (and overridden); MetricsError if it cannot."""
        eff = dataclasses.replace(mcfg, **self.metrics_override)
        if not eff.enabled:
            log.info("metrics: disabled")
            return None
        return start_metrics_server(self.switch, eff.address, eff.port)

    def _restore(self, cfg: SwitchConfig) -> None:
        """Build every saved bridge and port; a port that fails is logged and kept in the
        configuration (shown with its error), never dropped from the database."""
        for change in plan(self.switch, SwitchConfig(), cfg):
            try:
                change.do()
                log.info("restored: %s", change.text)
            except (PortError, OSError) as exc:
                if change.port is not None:
                    self.errors[change.port] = str(exc)
                log.error("could not restore (%s): %s", change.text, exc)
        self.cfg = cfg

    def run(self) -> None:
        self.switch.loop.install_signal_handlers()
        self.switch.run()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.control.close()
        self.switch.close()
        self.switch.loop.close()

    # -- changing the configuration -------------------------------------------------------
    def commit(self, new: SwitchConfig, dry_run: bool = False) -> list[str]:
        """Make the switch run ``new``, then save it; return what changed."""
        live = _without(self.cfg, self.errors)
        changes = plan(self.switch, live, new)
        texts = [c.text for c in changes]
        metrics_changed = new.metrics != self.cfg.metrics and self.control.path.exists()
        if metrics_changed:
            texts.append(f"set metrics {new.metrics.to_dict()}")
        if dry_run:
            return texts
        new_server = None
        if metrics_changed:  # first, so that a port it cannot bind changes nothing
            old_server, self.metrics = self.metrics, None
            if old_server is not None:
                old_server.close()
            try:
                new_server = self._start_metrics(new.metrics)
            except MetricsError as exc:
                self.metrics = self._start_metrics(self.cfg.metrics)
                raise ControlError(f"{exc} (nothing was changed)") from None
        try:
            execute(changes)
        except (PortError, OSError, ValueError) as exc:
            if metrics_changed:
                if new_server is not None:
                    new_server.close()
                self.metrics = self._start_metrics(self.cfg.metrics)
            raise ControlError(f"{exc} (nothing was changed)") from None
        if metrics_changed:
            self.metrics = new_server
        self.cfg = new
        self.errors = {}
        if self.store is not None:
            try:
                self.store.save(new)
            except OSError as exc:
                raise ControlError(f"applied, but saving {self.store.path} failed: {exc}") from None
        return texts

    def mutate(self, steps: list[tuple[str, dict[str, Any]]], dry_run: bool = False) -> list[str]:
        raw = copy.deepcopy(self.cfg.to_dict())
        for method, params in steps:
            fn = self._mutators.get(method)
            if fn is None:
                raise ControlError(f"unknown command {method!r} in a transaction", 2)
            fn(raw, params)
        _default_types(raw)
        try:
            new = parse_config(raw)
        except ConfigError as exc:
            raise ControlError(str(exc), 2) from None
        return self.commit(new, dry_run)

    def dispatch(self, method: str, params: dict[str, Any]) -> Any:
        if method in self._mutators:
            return {"changes": self.mutate([(method, params)])}
        if method == "transaction":
            steps = params.get("commands")
            if not isinstance(steps, list) or not all(
                    isinstance(s, list) and len(s) == 2 and isinstance(s[1], dict) for s in steps):
                raise ControlError("transaction: commands must be a list of [method, params]", 2)
            return {"changes": self.mutate([(m, p) for m, p in steps])}
        if method == "apply":
            try:
                new = parse_config(params.get("config"))
            except ConfigError as exc:
                raise ControlError(str(exc), 2) from None
            return {"changes": self.commit(new, bool(params.get("dry_run")))}
        reader = self._readers.get(method)
        if reader is None:
            raise ControlError(f"unknown command {method!r}", 2)
        return reader(params)

    # -- views ---------------------------------------------------------------------------
    def _bridge(self, params: dict[str, Any]) -> str:
        name = params.get("bridge")
        if name not in self.cfg.bridges:
            raise ControlError(f"no bridge named {name}", 2)
        return str(name)

    def _list_br(self, params: dict[str, Any]) -> list[str]:
        return sorted(self.cfg.bridges)

    def _br_exists(self, params: dict[str, Any]) -> bool:
        self._bridge(params)
        return True

    def _list_ports(self, params: dict[str, Any]) -> list[str]:
        return sorted(self.cfg.bridges[self._bridge(params)].ports)

    def _show(self, params: dict[str, Any]) -> dict[str, Any]:
        bridges = []
        for bname, bcfg in self.cfg.bridges.items():
            ports = []
            for pname, pcfg in bcfg.ports.items():
                entry: dict[str, Any] = {"name": pname, "type": pcfg.type, **pcfg.vlan.as_dict(),
                                         "options": dict(pcfg.options)}
                if pname in self.errors:
                    entry.update(link_state="down", error=self.errors[pname])
                elif pname in self.switch.port_names():
                    port = self.switch.port(pname)
                    entry.update(ofport=self.switch.port_number(pname),
                                 link_state=port.link_state(), status=port.status())
                ports.append(entry)
            bridges.append({"name": bname, "fail_mode": bcfg.fail_mode,
                            "mac_aging_time": bcfg.mac_aging_time,
                            "mac_table_size": bcfg.mac_table_size, "ports": ports})
        return {"bridges": bridges}

    def _fdb_show(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        br = self.switch.bridges[self._bridge(params)]
        names = {p.no: p.name for p in br.ports.values()}
        return [{"port": no, "port_name": names.get(no, "?"), "vlan": vlan, "mac": mac_str(mac),
                 "age": int(age)} for no, vlan, mac, age in br.fdb.entries(self.switch.loop.now())]

    def _fdb_flush(self, params: dict[str, Any]) -> dict[str, int]:
        names = [self._bridge(params)] if params.get("bridge") else list(self.switch.bridges)
        return {n: self.switch.bridges[n].fdb.flush() for n in names}

    def _port_stats(self, params: dict[str, Any]) -> dict[str, Any]:
        """The same snapshot /metrics serves (pyswitch.stats), so the two agree."""
        names = self._list_ports(params) if params.get("bridge") else self.switch.port_names()
        if params.get("port"):
            if params["port"] not in self.switch.port_names():
                raise ControlError(f"no port named {params['port']}", 2)
            names = [params["port"]]
        return port_stats(self.switch, names)


    def _dump_flows(self, params: dict[str, Any]) -> list[Any]:
        br = self.switch.bridges[self._bridge(params)]
        now = self.switch.loop.now()
        try:
            filt = parse_filter(params.get("filter") or "", br.names)
        except FlowSyntaxError as exc:
            raise ControlError(f"dump-flows: {exc}", 2) from None
        if params.get("json"):
            return [entry_to_dict(e, now, br.names) for e in br.flows.select(filt)]
        return [format_dump_line(e, now, br.names) for e in br.flows.select(filt)]

    def _flows_expired(self, bridge: str, entries: list[Any]) -> None:
        """Rules that timed out leave the configuration too (and the database)."""
        bcfg = self.cfg.bridges.get(bridge)
        if bcfg is None or bcfg.flows is None:
            return
        names = self.switch.bridges[bridge].names
        gone = {format_flow(e.flow, names) for e in entries}
        bcfg.flows = [t for t in bcfg.flows if t not in gone]
        if self.store is not None:
            try:
                self.store.save(self.cfg)
            except OSError as exc:
                log.error("saving %s after flow expiry failed: %s", self.store.path, exc)


def _without(cfg: SwitchConfig, failed: dict[str, str]) -> SwitchConfig:
    """``cfg`` less the ports that failed to restore (they are not running)."""
    if not failed:
        return cfg
    out = copy.deepcopy(cfg)
    for br in out.bridges.values():
        for name in failed:
            br.ports.pop(name, None)
    return out


# -- mutators: plain-data edits, validated afterwards by parse_config -----------------------

def _find_port(raw: Raw, name: str) -> tuple[str, Raw] | None:
    for bname, br in raw.get("bridges", {}).items():
        if name in br.get("ports", {}):
            return bname, br["ports"][name]
    return None


def _add_br(raw: Raw, p: dict[str, Any]) -> None:
    name = p.get("bridge")
    if not isinstance(name, str) or not name:
        raise ControlError("add-br needs a bridge name", 2)
    bridges = raw.setdefault("bridges", {})
    if name in bridges:
        if p.get("may_exist"):
            return
        raise ControlError(f"bridge {name} already exists", 1)
    bridges[name] = {"ports": {}}
    _set_bridge(raw, {"bridge": name, "settings": p.get("settings", {})})


def _del_br(raw: Raw, p: dict[str, Any]) -> None:
    name = p.get("bridge")
    if name not in raw.get("bridges", {}):
        if p.get("if_exists"):
            return
        raise ControlError(f"no bridge named {name}", 2)
    del raw["bridges"][name]


def _set_bridge(raw: Raw, p: dict[str, Any]) -> None:
    name = p.get("bridge")
    br = raw.get("bridges", {}).get(name)
    if br is None:
        raise ControlError(f"no bridge named {name}", 2)
    for key, value in (p.get("settings") or {}).items():
        field = BRIDGE_SETTINGS.get(key)
        if field is None:
            raise ControlError(f"unknown bridge setting {key!r} (known: {', '.join(BRIDGE_SETTINGS)})", 2)
        if value in ("", None):
            br.pop(field, None)
        else:
            br[field] = value


def _pick_bridge(raw: Raw, name: str | None) -> str:
    bridges = raw.setdefault("bridges", {})
    if name:
        if name not in bridges:
            raise ControlError(f"no bridge named {name}", 2)
        return name
    if len(bridges) == 1:
        return next(iter(bridges))
    if not bridges:
        bridges[DEFAULT_BRIDGE] = {"ports": {}}
        return DEFAULT_BRIDGE
    if DEFAULT_BRIDGE in bridges:
        return DEFAULT_BRIDGE
    raise ControlError(f"several bridges ({', '.join(sorted(bridges))}): name one", 2)


def _default_type(port: str) -> tuple[str, dict[str, str]]:
    """OVS-like defaults: ``vhostuser*`` is a vhost-user port; an existing kernel interface
    is attached as it is; anything else needs --type."""
    if port.startswith("vhostuser"):
        return "dpdkvhostuser", {}
    if Path("/sys/class/net", port).exists():
        return "veth", {"options:existing": "true"}
    raise ControlError(f"port {port}: no --type given and no interface named {port} exists "
                       "(use --type veth|tap|dpdkvhostuser|dpdkvhostuserclient)", 2)


def _default_types(raw: Raw) -> None:
    for br in raw.get("bridges", {}).values():
        for name, port in br.get("ports", {}).items():
            if "type" not in port:
                ptype, extra = _default_type(name)
                _apply_port_settings(port, {"type": ptype, **extra})


def _add_port(raw: Raw, p: dict[str, Any]) -> None:
    name = p.get("port")
    if not isinstance(name, str) or not name:
        raise ControlError("add-port needs a port name", 2)
    found = _find_port(raw, name)
    if found is not None:
        if p.get("may_exist"):
            return
        raise ControlError(f"port {name} already exists on bridge {found[0]}", 1)
    bname = _pick_bridge(raw, p.get("bridge"))
    settings = dict(p.get("settings") or {})
    port: Raw = {}  # a missing type is defaulted after the whole transaction (_default_types)
    raw["bridges"][bname].setdefault("ports", {})[name] = port
    _apply_port_settings(port, settings)


def _del_port(raw: Raw, p: dict[str, Any]) -> None:
    name = p.get("port")
    found = _find_port(raw, str(name))
    if found is None or (p.get("bridge") and found[0] != p["bridge"]):
        if p.get("if_exists"):
            return
        where = f" on bridge {p['bridge']}" if p.get("bridge") else ""
        raise ControlError(f"no port named {name}{where}", 2)
    _drop_flows_naming(raw["bridges"][found[0]], str(name))
    del raw["bridges"][found[0]]["ports"][name]


def _set_port(raw: Raw, p: dict[str, Any]) -> None:
    name = p.get("port")
    found = _find_port(raw, str(name))
    if found is None:
        raise ControlError(f"no port named {name}", 2)
    _apply_port_settings(found[1], p.get("settings") or {})


def _apply_port_settings(port: Raw, settings: dict[str, Any]) -> None:
    """``type``/``tag``/``trunks``/``vlan_mode`` and ``options:KEY``; "" or "[]" clears."""
    for key, value in settings.items():
        clear = value in ("", "[]", None)
        if key.startswith("options:") and len(key) > 8:
            opts = port.setdefault("options", {})
            if clear:
                opts.pop(key[8:], None)
            else:
                opts[key[8:]] = str(value)
        elif key in PORT_KEYS:
            if clear:
                port.pop(key, None)
            else:
                port[key] = value
        else:
            raise ControlError(f"unknown port setting {key!r} (use type, tag, trunks, vlan_mode "
                               "or options:KEY)", 2)


# -- flow mutators: the bridge's list of rule strings, as ovs-ofctl would change its table ---

def _bridge_flows(raw: Raw, p: dict[str, Any]) -> tuple[Raw, list[str], PortNames]:
    name = p.get("bridge")
    br = raw.get("bridges", {}).get(name)
    if br is None:
        raise ControlError(f"no bridge named {name}", 2)
    flows = br.get("flows")
    if flows is None:  # the fail mode's default is what the table holds now
        flows = [] if br.get("fail_mode") == "secure" else [format_flow(DEFAULT_FLOW)]
    names = PortNames.from_dict({n: i + 1 for i, n in enumerate(br.get("ports", {}))})
    return br, list(flows), names


def _parse_each(texts: list[str], names: PortNames) -> list[Flow]:
    try:
        return [parse_flow(t, names) for t in texts]
    except FlowSyntaxError as exc:
        raise ControlError(str(exc), 2) from None


def _add_flow(raw: Raw, p: dict[str, Any]) -> None:
    """add-flow: a rule with the same table, priority and match is replaced (as OVS)."""
    br, flows, names = _bridge_flows(raw, p)
    texts = p.get("flows") if "flows" in p else [p.get("flow")]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ControlError("add-flow needs a flow string", 2)
    current = _parse_each(flows, names)
    for new in _parse_each(texts, names):
        keep = [(t, f) for t, f in zip(flows, current)
                if (f.table, f.priority, f.match) != (new.table, new.priority, new.match)]
        flows = [t for t, _ in keep] + [format_flow(new, names)]
        current = [f for _, f in keep] + [new]
    br["flows"] = flows


def _select(p: dict[str, Any], flows: list[str], names: PortNames, with_actions: bool = False
            ) -> tuple[Any, list[bool]]:
    try:
        filt = parse_filter(p.get("flow") or "", names, with_actions=with_actions)
    except FlowSyntaxError as exc:
        raise ControlError(str(exc), 2) from None
    strict = bool(p.get("strict"))
    return filt, [filt.selects(f, strict) for f in _parse_each(flows, names)]


def _del_flows(raw: Raw, p: dict[str, Any]) -> None:
    br, flows, names = _bridge_flows(raw, p)
    _, chosen = _select(p, flows, names)
    br["flows"] = [t for t, c in zip(flows, chosen) if not c]


def _mod_flows(raw: Raw, p: dict[str, Any]) -> None:
    br, flows, names = _bridge_flows(raw, p)
    filt, chosen = _select(p, flows, names, with_actions=True)
    out = []
    for text, flow, c in zip(flows, _parse_each(flows, names), chosen):
        out.append(format_flow(dataclasses.replace(flow, actions=filt.actions), names) if c else text)
    br["flows"] = out


def _replace_flows(raw: Raw, p: dict[str, Any]) -> None:
    br, _, names = _bridge_flows(raw, p)
    texts = p.get("flows")
    if not isinstance(texts, list):
        raise ControlError("replace-flows needs a list of flows", 2)
    br["flows"] = [format_flow(f, names) for f in _parse_each(texts, names)]


def _drop_flows_naming(br: Raw, port: str) -> None:
    """Rules that name a port (in_port or output) go with it."""
    if not br.get("flows"):
        return
    names = PortNames.from_dict({n: i + 1 for i, n in enumerate(br.get("ports", {}))})
    no = names.to_number(port)
    kept = []
    for text, flow in zip(br["flows"], _parse_each(br["flows"], names)):
        if flow.match.exact(IN_PORT) != no and not flow.outputs_to(no):
            kept.append(text)
    br["flows"] = kept
