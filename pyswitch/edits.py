"""Edits of the configuration as plain data: what each changing CLI verb does.

Every function takes the configuration as a plain dict (``SwitchConfig.to_dict()``) and
the request's parameters, and edits the dict in place; it raises
:class:`~pyswitch.control.ControlError` for what it can tell is wrong (no such bridge,
duplicate port, bad flow syntax).  Everything else is checked afterwards, once, by
:func:`pyswitch.config.parse_config` on the edited whole -- so a transaction of several
edits is validated as one, and a refused edit changes nothing.

Flows are kept as the bridge's list of rule strings and edited as ovs-ofctl would edit the
table: ``add-flow`` replaces a rule of the same table, priority and match; ``del-flows`` and
``mod-flows`` select with OVS's strict or non-strict matching.  Port numbers are the
ports' ``ofport`` (a port added in the same transaction gets the lowest free number, as
the switch will give it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bridge import DEFAULT_FLOW
from .config import assign_ofports, port_numbers
from .control import ControlError
from .flows import Flow, FlowSyntaxError, PortNames, format_flow, parse_filter, parse_flow
from .flows.model import IN_PORT

PORT_KEYS = ("type", "tag", "trunks", "vlan_mode")
BRIDGE_SETTINGS = {"fail_mode": "fail_mode", "mac_aging_time": "mac_aging_time",
                   "mac_table_size": "mac_table_size",
                   "other_config:mac-aging-time": "mac_aging_time",
                   "other_config:mac-table-size": "mac_table_size"}
DEFAULT_BRIDGE = "br0"

Raw = dict[str, Any]
Edit = Callable[[Raw, dict[str, Any]], None]


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
        if p.get("may_exist") and p.get("bridge") in (None, "", found[0]):
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
    names = _names(br)
    return br, list(flows), names


def _names(br: Raw) -> PortNames:
    ports = br.get("ports") or {}
    return port_numbers(assign_ofports(
        (n, p.get("ofport") if isinstance(p, dict) else None) for n, p in ports.items()))


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
    # (table, priority, match) -> rule texts, in order; a rule added goes last, as it did
    rules: dict[tuple[Any, ...], list[str]] = {}
    for text, f in zip(flows, _parse_each(flows, names)):
        rules.setdefault((f.table, f.priority, f.match), []).append(text)
    for new in _parse_each(texts, names):
        key = (new.table, new.priority, new.match)
        rules.pop(key, None)
        rules[key] = [format_flow(new, names)]
    br["flows"] = [t for texts_ in rules.values() for t in texts_]


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
    names = _names(br)
    no = names.to_number(port)
    kept = []
    for text, flow in zip(br["flows"], _parse_each(br["flows"], names)):
        if flow.match.exact(IN_PORT) != no and not flow.outputs_to(no):
            kept.append(text)
    br["flows"] = kept


#: request name -> edit
EDITS: dict[str, Edit] = {
    "add-br": _add_br, "del-br": _del_br, "add-port": _add_port, "del-port": _del_port,
    "set-port": _set_port, "set-bridge": _set_bridge,
    "add-flow": _add_flow, "add-flows": _add_flow, "del-flows": _del_flows,
    "mod-flows": _mod_flows, "replace-flows": _replace_flows,
}


def default_types(raw: Raw) -> None:
    """Give every port added without a type the OVS-like default (after a whole
    transaction, so that a chained ``set Interface p type=...`` wins)."""
    _default_types(raw)
