"""Make the running switch match a configuration: a plan of changes, applied with undo.

Every change of configuration -- a CLI verb, ``pyswitch apply FILE``, a restore from the
database -- is the same operation: compute the new :class:`~pyswitch.config.SwitchConfig`,
:func:`plan` the differences against the running one, and :func:`execute` them.  Only what
differs is touched (Snabb's ``compute_config_actions``), so traffic on other ports goes on.
If a step fails, the steps already done are undone in reverse order and the switch is as
it was; the caller then keeps the old configuration.

Order: removals first (they free names, sockets and namespaces), then bridges, then
additions and in-place changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from .config import BridgeConfig, PortConfig, SwitchConfig
from .switch import Switch

log = logging.getLogger(__name__)


@dataclass
class Change:
    """One step: ``text`` for the operator, ``do`` and ``undo`` for the switch."""

    text: str
    do: Callable[[], None]
    undo: Callable[[], None]
    port: str | None = None  # the port this step creates, if any


def _same_port(a: PortConfig, b: PortConfig) -> bool:
    return a.type == b.type and a.options == b.options and a.ofport == b.ofport


def plan(sw: Switch, old: SwitchConfig, new: SwitchConfig) -> list[Change]:
    """The steps that turn the switch running ``old`` into one running ``new``."""
    removals: list[Change] = []
    bridges: list[Change] = []
    additions: list[Change] = []
    old_ports = {p.name: (b.name, p) for b in old.bridges.values() for p in b.ports.values()}
    new_ports = {p.name: (b.name, p) for b in new.bridges.values() for p in b.ports.values()}

    for name, (bname, pcfg) in old_ports.items():
        target = new_ports.get(name)
        if target is None or target[0] != bname or not _same_port(pcfg, target[1]):
            why = "" if target is None else " (to re-create it)"
            removals.append(_del_port(sw, bname, pcfg, f"delete port {name} from {bname}{why}"))
    for bname, bcfg in old.bridges.items():
        if bname not in new.bridges:
            if bcfg.flows is not None:  # first: undone last, when its ports are back
                removals.insert(0, _set_flows(sw, bname, bcfg.flows, None))
            removals.append(_del_bridge(sw, bcfg))
    for bname, bcfg in new.bridges.items():
        obr = old.bridges.get(bname)
        if obr is None:
            bridges.append(_add_bridge(sw, bcfg))
        elif (obr.mac_aging_time, obr.mac_table_size, obr.fail_mode) != (
                bcfg.mac_aging_time, bcfg.mac_table_size, bcfg.fail_mode):
            bridges.append(_set_bridge(sw, obr, bcfg))
    for name, (bname, pcfg) in new_ports.items():
        prev = old_ports.get(name)
        if prev is None or prev[0] != bname or not _same_port(prev[1], pcfg):
            # re-created on its bridge: the same ofport, which the bridge's rules hold
            again = prev is not None and prev[0] == bname and name in sw.port_names(bname)
            if again:  # first, before a new port can take its freed number
                additions.insert(0, _add_port(sw, bname, pcfg, sw.port_number(name)))
            else:
                additions.append(_add_port(sw, bname, pcfg))
        elif prev[1].vlan != pcfg.vlan:
            additions.append(_set_vlan(sw, prev[1], pcfg))
    flows: list[Change] = []  # last: rules name ports that must exist by then
    for bname, bcfg in new.bridges.items():
        obr = old.bridges.get(bname)
        before = (None, "standalone") if obr is None else (obr.flows, obr.fail_mode)
        if (bcfg.flows, bcfg.fail_mode) != before:
            flows.append(_set_flows(sw, bname, before[0], bcfg.flows))
    return removals + bridges + additions + flows


def execute(changes: list[Change]) -> None:
    """Run ``changes`` in order; on an exception undo the done ones and re-raise."""
    done: list[Change] = []
    try:
        for ch in changes:
            ch.do()
            done.append(ch)
            log.info("%s", ch.text)
    except BaseException:
        for ch in reversed(done):
            try:
                ch.undo()
                log.info("undone: %s", ch.text)
            except Exception:
                log.exception("could not undo: %s", ch.text)
        raise


# -- the steps -----------------------------------------------------------------------------

def _add_port(sw: Switch, bridge: str, pcfg: PortConfig, ofport: int | None = None) -> Change:
    return Change(f"add port {pcfg.name} to {bridge} (type {pcfg.type})",
                  lambda: sw.add_port(bridge, _copy_port(pcfg), ofport),
                  lambda: sw.del_port(pcfg.name), port=pcfg.name)


def _del_port(sw: Switch, bridge: str, pcfg: PortConfig, text: str) -> Change:
    ofport: list[int] = []  # the number it had, for the undo

    def do() -> None:
        ofport.append(sw.port_number(pcfg.name))
        sw.del_port(pcfg.name)

    return Change(text, do, lambda: sw.add_port(bridge, _copy_port(pcfg), *ofport[-1:]))


def _set_vlan(sw: Switch, old: PortConfig, new: PortConfig) -> Change:
    return Change(f"set port {new.name} VLAN {new.vlan.as_dict() or 'trunk (all VLANs)'}",
                  lambda: sw.set_port_vlan(new.name, new.vlan),
                  lambda: sw.set_port_vlan(old.name, old.vlan))


def _add_bridge(sw: Switch, bcfg: BridgeConfig) -> Change:
    return Change(f"add bridge {bcfg.name}", lambda: sw.add_bridge(bcfg),
                  lambda: sw.del_bridge(bcfg.name))


def _del_bridge(sw: Switch, bcfg: BridgeConfig) -> Change:
    empty = BridgeConfig(bcfg.name, bcfg.fail_mode, bcfg.mac_aging_time, bcfg.mac_table_size)
    return Change(f"delete bridge {bcfg.name}", lambda: sw.del_bridge(bcfg.name),
                  lambda: sw.add_bridge(empty))


def _set_bridge(sw: Switch, old: BridgeConfig, new: BridgeConfig) -> Change:
    def setter(cfg: BridgeConfig) -> Callable[[], None]:
        return lambda: sw.set_bridge(cfg.name, cfg.mac_aging_time, cfg.mac_table_size, cfg.fail_mode)

    return Change(f"set bridge {new.name} mac_aging_time={new.mac_aging_time} "
                  f"mac_table_size={new.mac_table_size} fail_mode={new.fail_mode}",
                  setter(new), setter(old))


def _set_flows(sw: Switch, bridge: str, old: list[str] | None, new: list[str] | None) -> Change:
    what = "the default for its fail mode" if new is None else f"{len(new)} rule(s)"
    return Change(f"set flows of {bridge}: {what}", lambda: sw.set_flows(bridge, new),
                  lambda: sw.set_flows(bridge, old))


def _copy_port(p: PortConfig) -> PortConfig:
    return PortConfig(p.name, p.type, dict(p.options), p.vlan, p.ofport)
