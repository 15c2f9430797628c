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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, PortConfig, SwitchConfig, keep_ofports, parse_config
from .control import ControlError, ControlServer, control_path
from .db import ConfigStore
from .edits import EDITS, default_types
from .flows import (
    FlowSyntaxError,
    entry_to_dict,
    format_dump_line,
    format_flow,
    parse_filter,
)
from .metrics import MetricsConfig, MetricsError, MetricsServer, start_metrics_server
from .packet import mac_str
from .port import PortError
from .reconcile import execute, plan
from .stats import port_stats, process_stats
from .switch import Switch

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, rundir: Path, db: Path | None = None, group: str | None = None,
                 metrics_override: dict[str, Any] | None = None, pmd: bool = False) -> None:
        self.switch = Switch(pmd=pmd)
        #: command-line settings of /metrics that win over the configuration (not saved)
        self.metrics_override = metrics_override or {}
        self.metrics: MetricsServer | None = None
        self.cfg = SwitchConfig()
        self.store = ConfigStore(db) if db is not None else None
        self.control = ControlServer(control_path(rundir), self.switch.loop, self.dispatch, group)
        self.errors: dict[str, str] = {}  # port -> why it could not be restored
        self._mutators = EDITS
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
        # Metrics first, and once: the commit below then sees them unchanged.
        self.metrics = self._start_metrics(cfg.metrics)
        self.cfg.metrics = cfg.metrics
        if self.store is not None:
            self._restore(cfg)
        else:
            self.commit(cfg)
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
        configuration (shown with its error), never dropped from the database.  Rules are
        installed last, less those naming a port that failed."""
        self._restore_steps(SwitchConfig(), _without_flows(cfg))
        self.cfg = cfg
        live = _without(cfg, self.errors)
        self._restore_steps(_without_flows(live), live)

    def _restore_steps(self, old: SwitchConfig, new: SwitchConfig) -> None:
        for change in plan(self.switch, old, new):
            try:
                change.do()
                log.info("restored: %s", change.text)
            except (PortError, OSError) as exc:
                if change.port is not None:
                    self.errors[change.port] = str(exc)
                log.error("could not restore (%s): %s", change.text, exc)

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
        """Make the switch run ``new``, then save it; return what changed.  A port that
        failed to restore and that ``new`` leaves as it was stays failed (a request that
        changes it retries it)."""
        still = {n: e for n, e in self.errors.items() if _port(new, n) == _port(self.cfg, n)}
        changes = plan(self.switch, _without(self.cfg, self.errors), _without(new, still))
        texts = [c.text for c in changes]
        metrics_changed = new.metrics != self.cfg.metrics
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
        self.errors = still
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
            try:
                fn(raw, params)
            except (TypeError, ValueError, AttributeError, KeyError) as exc:
                # parameters of the wrong shape, from a client other than the CLI
                raise ControlError(f"{method}: malformed parameters ({exc})", 2) from None
        default_types(raw)
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
            if not isinstance(params.get("config"), dict):  # else parse_config(None): all deleted
                raise ControlError("apply: params.config must be the configuration (a mapping)", 2)
            try:
                new = parse_config(keep_ofports(params.get("config"), self.cfg))
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
        dp = process_stats(self.switch)["datapath"]
        return {"datapath": dp, "bridges": bridges}

    def _fdb_show(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        br = self.switch.bridges[self._bridge(params)]
        br.sync()  # MAC ages of frames the compiled path forwarded from its cache
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
        br.sync(now)  # rule counters of frames the compiled path forwarded from its cache
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


def _without_flows(cfg: SwitchConfig) -> SwitchConfig:
    """A copy of ``cfg`` whose bridges hold their fail mode's default rules."""
    out = copy.deepcopy(cfg)
    for bcfg in out.bridges.values():
        bcfg.flows = None
    return out


def _without(cfg: SwitchConfig, failed: dict[str, str]) -> SwitchConfig:
    """``cfg`` less the ports that failed to restore (they are not running) and the rules
    that name them (as ``del-port`` would drop them)."""
    if not failed:
        return cfg
    raw = cfg.to_dict()
    for name in failed:
        EDITS["del-port"](raw, {"port": name, "if_exists": True})
    return parse_config(raw)


def _port(cfg: SwitchConfig, name: str) -> tuple[str, PortConfig] | None:
    found = cfg.find_port(name)
    return None if found is None else (found[0].name, found[1])
