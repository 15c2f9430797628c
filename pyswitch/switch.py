"""The switch runtime: the one place that wires the loop, the ports and the bridges.

:class:`Switch` owns an :class:`~pyswitch.loop.EventLoop`, the port objects (created by
name through the port-type registry) and one :class:`~pyswitch.bridge.Bridge` per
bridge.  When a port has frames, the loop calls :meth:`Switch._service`, which moves
one batch: ``receive`` -> ``Bridge.process`` -> ``transmit`` on each output port ->
``release``.  Timers age the MAC tables.

Ports are numbered per bridge like OpenFlow ports (1, 2, ...), lowest free number first.

Polling.  A port is serviced when its file descriptors (or kicks) say it has frames.
While traffic flows the switch *polls* it instead: a port that gave frames stays ready
until ``POLL_LINGER`` seconds pass without any, with its peer's notifications off
(:meth:`Port.poll_mode`), then goes back to sleep on its descriptors.  An idle switch
sleeps in ``epoll_wait``.  With ``pmd=True`` (OVS-DPDK's poll-mode threads) every port is
polled on every loop iteration (a port is never taken off the ready set, so the loop never
waits in ``epoll_wait``): a core spins, for the lowest latency.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .bridge import Bridge
from .config import BridgeConfig, PortConfig, SwitchConfig
from .flows import FlowEntry
from .loop import EventLoop, TimerHandle
from .port import MAX_BURST, Port, PortCounters, PortError, port_type
from .vlan import PortVlan

log = logging.getLogger(__name__)

#: Most deleted ports whose counters are kept for a re-add of the same name.
MAX_RETIRED = 4096
#: How often MAC tables are swept for aged entries (lookups also expire lazily).
AGING_SWEEP_INTERVAL = 1.0
#: How long a port that received frames is polled after its last frame.
POLL_LINGER = 0.0005


class _PortIO:
    """The loop as one port sees it (implements ``pyswitch.port.PortIO``)."""

    __slots__ = ("_loop", "_port")

    def __init__(self, loop: EventLoop, port: Port) -> None:
        self._loop = loop
        self._port = port

    def watch(self, fd: int, callback: Any) -> None:
        self._loop.watch(fd, callback)

    def unwatch(self, fd: int) -> None:
        self._loop.unwatch(fd)

    def rx_ready(self) -> None:
        self._loop.set_ready(self._port)

    def call_later(self, delay: float, callback: Any) -> TimerHandle:
        return self._loop.call_later(delay, callback)

    def now(self) -> float:
        return self._loop.now()


class _Attached:
    """A port as the switch holds it: the object, its bridge and its number there."""

    __slots__ = ("port", "bridge", "no", "config", "last_rx", "polling")

    def __init__(self, port: Port, bridge: Bridge, no: int, config: PortConfig) -> None:
        self.port = port
        self.bridge = bridge
        self.no = no
        self.config = config
        self.last_rx = 0.0  # the loop's clock at the last non-empty batch
        self.polling = False  # notifications off, polled while traffic flows


class Switch:
    """Bridges and ports, running on one event loop."""

    def __init__(self, pmd: bool = False) -> None:
        self.pmd = pmd
        self.loop = EventLoop(self._service)
        self.bridges: dict[str, Bridge] = {}
        self._ports: dict[str, _Attached] = {}
        self._by_port: dict[Port, _Attached] = {}
        self._outputs: dict[str, dict[int, Port]] = {}  # bridge -> port number -> port
        self._aging = self.loop.call_every(AGING_SWEEP_INTERVAL, self._age)
        #: called with (bridge name, expired FlowEntry list) when rules time out
        self.on_flows_expired: Callable[[str, list[FlowEntry]], None] | None = None
        #: counters of deleted ports by name, continued if a port of that name comes back
        self._retired: dict[str, PortCounters] = {}
        #: batch_sizes[n] = how many received batches held n frames (n <= MAX_BURST)
        self.batch_sizes = [0] * (MAX_BURST + 1)

    # -- building ------------------------------------------------------------------------
    def build(self, cfg: SwitchConfig) -> None:
        """Create every bridge and port of ``cfg``; on failure remove what was made."""
        try:
            for bcfg in cfg.bridges.values():
                self.add_bridge(bcfg)
                for pcfg in bcfg.ports.values():
                    self.add_port(bcfg.name, pcfg)
                if bcfg.flows is not None:
                    self.set_flows(bcfg.name, bcfg.flows)
        except BaseException:
            self.close()
            raise

    def add_bridge(self, bcfg: BridgeConfig) -> Bridge:
        if bcfg.name in self.bridges:
            raise PortError(f"bridge {bcfg.name} already exists")
        br = Bridge(bcfg.name, bcfg.mac_aging_time, bcfg.mac_table_size, bcfg.fail_mode,
                    created=self.loop.now())
        self.bridges[bcfg.name] = br
        self._outputs[bcfg.name] = {}
        log.info("bridge %s: created (mac aging %ss, table size %d)",
                 br.name, bcfg.mac_aging_time, bcfg.mac_table_size)
        return br

    def del_bridge(self, name: str) -> None:
        br = self.bridges[name]
        for pname in [n for n, a in self._ports.items() if a.bridge is br]:
            self.del_port(pname)
        del self.bridges[name]
        del self._outputs[name]
        log.info("bridge %s: deleted", name)

    def set_bridge(self, name: str, aging_time: int, table_size: int, fail_mode: str) -> None:
        br = self.bridges[name]
        br.set_mac_limits(aging_time, table_size)
        br.fail_mode = fail_mode  # the flows that depend on it are set by the caller

    def add_port(self, bridge: str, pcfg: PortConfig, no: int | None = None) -> Port:
        """Create, open and attach a port as number ``no`` (default: its configured
        ``ofport``) if free, else the lowest free number; PortError (nothing left behind)
        on failure."""
        if pcfg.name in self._ports:
            raise PortError(f"port {pcfg.name} already exists")
        br = self.bridges[bridge]
        port = port_type(pcfg.type)(pcfg.name, pcfg.options)
        retired = self._retired.get(pcfg.name)
        if retired is not None:  # a port's counters belong to its name: they never go back
            port.counters = retired
        port.open()
        try:
            port.attach(_PortIO(self.loop, port))
        except BaseException:
            port.close()
            raise
        self._retired.pop(pcfg.name, None)  # only now: a failed add keeps them for the next
        if no is None:
            no = pcfg.ofport
        if no is None or no < 1 or no in br.ports:
            no = 1
            while no in br.ports:
                no += 1
        br.add_port(no, pcfg.name, pcfg.vlan, port.counters)
        att = _Attached(port, br, no, pcfg)
        self._ports[pcfg.name] = att
        self._by_port[port] = att
        self._outputs[bridge][no] = port
        if self.pmd:
            self.loop.set_ready(port)
        log.info("bridge %s: added port %s (type %s, ofport %d%s)", bridge, pcfg.name,
                 pcfg.type, no, _vlan_text(pcfg.vlan))
        return port

    def del_port(self, name: str) -> None:
        att = self._ports.pop(name)
        del self._by_port[att.port]
        self.loop.discard_ready(att.port)
        att.bridge.remove_port(att.no)
        del self._outputs[att.bridge.name][att.no]
        att.port.close()
        self._retired[name] = att.port.counters
        while len(self._retired) > MAX_RETIRED:
            self._retired.pop(next(iter(self._retired)))
        log.info("bridge %s: deleted port %s", att.bridge.name, name)

    def set_port_vlan(self, name: str, vlan: PortVlan) -> None:
        att = self._ports[name]
        att.config.vlan = vlan
        att.bridge.set_port_vlan(att.no, vlan)

    # -- queries -------------------------------------------------------------------------
    def port(self, name: str) -> Port:
        return self._ports[name].port

    def port_names(self, bridge: str | None = None) -> list[str]:
        return [n for n, a in self._ports.items() if bridge is None or a.bridge.name == bridge]

    def port_number(self, name: str) -> int:
        return self._ports[name].no

    def port_bridge(self, name: str) -> str:
        return self._ports[name].bridge.name

    def port_config(self, name: str) -> PortConfig:
        return self._ports[name].config

    # -- data path -----------------------------------------------------------------------
    def _service(self, port: object) -> bool:
        """Move one batch from ``port``; True while it stays polled (it gave frames, or
        its linger has not passed, or pmd), False when it goes back to sleep."""
        att = self._by_port.get(port)  # type: ignore[arg-type]
        if att is None:
            return False
        src = att.port
        frames = src.receive(MAX_BURST)
        if not frames:
            return self._idle(att)
        self.batch_sizes[min(len(frames), MAX_BURST)] += 1
        now = att.last_rx = self.loop.now()
        if not att.polling:
            att.polling = True
            src.poll_mode(True)
        try:
            out = att.bridge.process(att.no, frames, now)
            outputs = self._outputs[att.bridge.name]
            for no, batch in out.items():
                dst = outputs.get(no)
                if dst is None:
                    continue
                try:
                    dst.transmit(batch)
                except Exception:
                    dst.counters.tx_errors += len(batch)
                    log.exception("port %s: transmit failed", dst.name)
        finally:
            src.release()
        return True

    def _idle(self, att: _Attached) -> bool:
        """A poll found nothing: keep polling (pmd, or within POLL_LINGER of the last
        frame), else turn the peer's notifications back on and sleep."""
        if self.pmd:
            return True
        if not att.polling:
            return False
        if self.loop.now() - att.last_rx < POLL_LINGER:
            return True
        att.polling = False
        if att.port.poll_mode(False):  # frames came while notifications were off
            att.polling = True
            att.port.poll_mode(True)
            att.last_rx = self.loop.now()
            return True
        return False

    def set_flows(self, bridge: str, texts: list[str] | None) -> None:
        """Make ``bridge``'s flow tables hold ``texts`` (None: the fail mode's default)."""
        self.bridges[bridge].set_flows(texts, self.loop.now())

    def _age(self) -> None:
        now = self.loop.now()
        for br in self.bridges.values():
            expired = br.expire(now)
            if expired:
                log.info("bridge %s: %d flow(s) expired", br.name, len(expired))
                if self.on_flows_expired is not None:
                    self.on_flows_expired(br.name, expired)

    # -- running -------------------------------------------------------------------------
    def run(self) -> None:
        self.loop.run()

    def stop(self) -> None:
        self.loop.stop()

    def close(self) -> None:
        """Close every port (removing what they created) and the bridges.  Idempotent."""
        for name in list(self._ports):
            try:
                self.del_port(name)
            except Exception:
                log.exception("port %s: close failed", name)
        for name in list(self.bridges):
            self.bridges.pop(name)
            self._outputs.pop(name, None)
        self._aging.cancel()


def _vlan_text(vlan: PortVlan) -> str:
    d = vlan.as_dict()
    return "".join(f", {k} {v}" for k, v in d.items())
