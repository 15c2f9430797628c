"""The ``veth`` port type: one end of a kernel veth pair, read and written with AF_PACKET.

``open()`` creates a veth pair whose switch-side end is named after the port and
whose peer end goes into a network namespace (created if absent) with an optional
MAC, addresses, default route and MTU; the switch then reads and writes its own end
through a :class:`~pyswitch.ports.afpacket.PacketRing` (or, on the compiled data path,
the ``_pktio`` kernel's TPACKET_V2 ring, or TPACKET_V3 with ``rx-ring=tpacket-v3``:
:func:`~pyswitch.ports.afpacket.open_ring` picks, once, at ``open()``).  With ``existing=true`` it
creates nothing and attaches to an interface named like the port.

Offloads: a veth end does TSO/GSO and checksum offload by default, so the frames
the switch would read are up to 64 KB "super-frames" whose TCP/UDP checksums are
not filled in.  Forwarded as they are, they are dropped (too big for the egress
MTU) or arrive with bad checksums, and TCP through the switch stalls.  ``open()``
therefore turns off checksum offload, every segmentation offload, GRO and
scatter-gather on both ends (``ethtool.py``)
*before* the peer moves into its namespace (features move with the device).  An
``existing`` interface is left as it is: turn them off yourself on its peer.

See ``ports/README.md`` for the options.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from types import ModuleType
from typing import Any, ClassVar

from pyswitch.ports import ethtool
from pyswitch.ports import netlink as nl
from pyswitch.ports.afpacket import RX_RINGS, PacketRing, open_ring

from pyswitch import fastpath
from pyswitch.port import MAX_BURST, Frame, Port, PortError, PortIO

log = logging.getLogger(__name__)

ARPHRD_ETHER = 1
DEFAULT_MTU = 1500

#: Namespaces this process created for veth ports -> number of open ports using them.
#: The last port to close removes the namespace.
_created_netns: dict[str, int] = {}


@dataclass(slots=True)
class VethConfig:
    """The validated options of one veth port."""

    existing: bool = False
    netns: str | None = None
    peer: str = ""
    peer_mac: str | None = None
    addresses: list[IPv4Interface | IPv6Interface] = field(default_factory=list)
    gateway: IPv4Address | IPv6Address | None = None
    mtu: int | None = None
    tpacket: int | None = None  # the compiled path's ring (rx-ring); None: COMPILED_TPACKET


def parse_options(name: str, options: Mapping[str, str]) -> VethConfig:
    """Check every option of port ``name``; ``PortError`` naming the first bad one."""
    nl.check_ifname(name, f"port {name!r}")
    cfg = VethConfig(existing=nl.parse_bool(options.get("existing", "false"), "existing"))
    if "rx-ring" in options:
        cfg.tpacket = RX_RINGS.get(options["rx-ring"])
        if cfg.tpacket is None:
            raise PortError(f"rx-ring: {options['rx-ring']!r} is not one of {', '.join(RX_RINGS)}")
    if cfg.existing:
        extra = sorted(set(options) - {"existing", "rx-ring"})
        if extra:
            raise PortError(f"{extra[0]}: has no effect with existing=true (nothing is created)")
        return cfg
    if "netns" in options:
        cfg.netns = nl.check_netns_name(options["netns"])
    default_peer = "eth0" if cfg.netns else f"{name}-p"
    cfg.peer = nl.check_ifname(options.get("peer-name", default_peer), "peer-name")
    if cfg.peer == name and cfg.netns is None:
        raise PortError(f"peer-name: {cfg.peer!r} is the port's own name")
    if "peer-mac" in options:
        cfg.peer_mac = nl.parse_mac(options["peer-mac"], "peer-mac")
    if "peer-address" in options:
        cfg.addresses = nl.parse_cidrs(options["peer-address"], "peer-address")
    if "peer-gateway" in options:
        if cfg.netns is None:
            raise PortError(
                "peer-gateway: needs netns (refusing to change the default "
                "route of the switch's own namespace)"
            )
        cfg.gateway = nl.parse_ip(options["peer-gateway"], "peer-gateway")
    if "mtu" in options:
        cfg.mtu = nl.parse_mtu(options["mtu"])
    return cfg


def leftover_alias(port: str, pid: int | None = None) -> str:
    """The interface alias that marks the switch end of a veth pyswitch created, with the
    creating process's id."""
    return f"pyswitch veth port {port} pid {os.getpid() if pid is None else pid}"


def _left_by_dead_process(port: str, alias: object) -> bool:
    """Whether ``alias`` marks a veth of ``port`` made by a process that no longer runs."""
    head = f"pyswitch veth port {port} pid "
    if not isinstance(alias, str) or not alias.startswith(head) or not alias[len(head):].isdigit():
        return False
    try:
        os.kill(int(alias[len(head):]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False  # that pyswitch still runs: the interface is its


class VethPort(Port):
    """A veth pair end (or any existing Ethernet device) as a switch port."""

    type_name: ClassVar[str] = "veth"
    OPTIONS: ClassVar[Mapping[str, str]] = {
        "netns": "namespace for the peer end; created if absent (and removed on close)",
        "peer-name": "peer interface name (default eth0 with netns, else <port>-p)",
        "peer-mac": "MAC address of the peer end",
        "peer-address": "comma-separated CIDRs (IPv4/IPv6) on the peer end",
        "peer-gateway": "default route via this address inside netns",
        "mtu": "MTU of both ends (default 1500)",
        "existing": "true: attach to an existing interface named like the port",
        "rx-ring": "compiled path's receive ring: tpacket-v2 (default, lowest latency) or "
                   "tpacket-v3 (least CPU under load, up to a timer tick of latency)",
    }

    def __init__(
        self, name: str, options: Mapping[str, str] | None = None, *,
        pktio: ModuleType | None = None,
    ) -> None:
        """``pktio``: the compiled ``_pktio`` kernel to use even when the selected data
        path is Python (tests of the kernel); by default the selected path decides."""
        super().__init__(name, options)
        self.config = parse_options(name, self.options)
        self._pktio = pktio
        self._ring: PacketRing | None = None
        self._io: PortIO | None = None
        self._made_link = False
        self._netns_ref: str | None = None
        self._mtu = self.config.mtu or DEFAULT_MTU

    @classmethod
    def validate_options(cls, name: str, options: Mapping[str, str]) -> None:
        super().validate_options(name, options)
        parse_options(name, options)

    # -- set-up and tear-down -------------------------------------------------------------
    def open(self) -> None:
        """Create (or find) the interface, then bind the AF_PACKET ring to it.
        On failure everything made so far is removed and ``PortError`` raised."""
        if self._ring is not None:
            return
        try:
            if self.config.existing:
                self._find_existing()
            else:
                self._create()
            pktio = self._pktio or fastpath.kernel("_pktio")
            self._ring = open_ring(self.name, self._mtu, self.counters, pktio,
                                   tpacket=self.config.tpacket)
        except BaseException:
            self._teardown()
            raise

    def _find_existing(self) -> None:
        with nl.rtnl() as ipr:
            if nl.ifindex(ipr, self.name) is None:
                raise PortError(f"existing=true but there is no interface {self.name!r}")
            info = nl.link_info(ipr, self.name)
        if info["link_type"] != ARPHRD_ETHER:
            raise PortError(f"interface {self.name!r} is not an Ethernet device")
        self._mtu = int(info["mtu"])  # type: ignore[call-overload]

    def _create(self) -> None:
        cfg = self.config
        self._check_names_free()
        if cfg.netns:
            self._use_netns(cfg.netns)
        # A temporary peer name when it moves: "eth0" is usually taken here.
        tmp = f"pst{secrets.token_hex(4)}t" if cfg.netns else cfg.peer
        with nl.rtnl() as ipr:
            nl.create_veth(ipr, self.name, tmp)
            self._made_link = True
            nl.set_link(ipr, self.name, alias=leftover_alias(self.name))
            for end in (self.name, tmp):
                self._disable_offloads(end)
            nl.set_link(ipr, tmp, mac=cfg.peer_mac, mtu=cfg.mtu, netns=cfg.netns)
            nl.set_link(ipr, self.name, mtu=cfg.mtu)
            nl.detach_from_host_stack(ipr, self.name)
            if not cfg.netns:
                self._configure_peer(ipr, tmp)
            nl.set_link(ipr, self.name, up=True)
            if cfg.netns:
                with nl.rtnl(cfg.netns) as nsipr:
                    self._configure_peer(nsipr, tmp)
                    nl.wait_oper_up(nsipr, cfg.peer)
            else:
                nl.wait_oper_up(ipr, cfg.peer)
            nl.wait_oper_up(ipr, self.name)

    def _disable_offloads(self, ifname: str) -> None:
        left = ethtool.disable_offloads(ifname)
        if left:
            log.warning(
                "port %s: %s keeps offloads the driver will not turn off: %s",
                self.name,
                ifname,
                ", ".join(left),
            )

    def _check_names_free(self) -> None:
        cfg = self.config
        with nl.rtnl() as ipr:
            if nl.ifindex(ipr, self.name) is not None and not self._reclaim(ipr):
                raise PortError(
                    f"cannot create veth {self.name!r}: an interface of that name already exists"
                )
            if not cfg.netns and nl.ifindex(ipr, cfg.peer) is not None:
                raise PortError(f"peer-name: an interface {cfg.peer!r} already exists")
        if cfg.netns and nl.netns_exists(cfg.netns):
            with nl.rtnl(cfg.netns) as nsipr:
                if nl.ifindex(nsipr, cfg.peer) is not None:
                    raise PortError(
                        f"peer-name: {cfg.peer!r} already exists in namespace {cfg.netns!r}"
                    )

    def _reclaim(self, ipr: Any) -> bool:
        """Remove a veth this port made in a pyswitch process that did not stop cleanly
        (killed, crashed): it carries our alias.  Any other interface is left alone."""
        info = nl.link_info(ipr, self.name)
        if info["kind"] != "veth" or not _left_by_dead_process(self.name, info["alias"]):
            return False
        log.warning("port %s: removing the veth left by a pyswitch that did not stop cleanly",
                    self.name)
        nl.delete_link(ipr, self.name)  # its peer goes with it, wherever it is
        return True

    def _use_netns(self, ns: str) -> None:
        if ns in _created_netns:
            _created_netns[ns] += 1
        elif not nl.netns_exists(ns):
            nl.create_netns(ns)
            _created_netns[ns] = 1
        else:  # somebody else's namespace: only make sure lo is up
            with nl.rtnl(ns) as nsipr:
                nl.set_link(nsipr, "lo", up=True)
            return
        self._netns_ref = ns

    def _configure_peer(self, ipr: Any, current: str) -> None:
        cfg = self.config
        rename = cfg.peer if current != cfg.peer else None
        nl.set_link(ipr, current, ifname=rename, up=True)
        nl.add_addresses(ipr, cfg.peer, cfg.addresses)
        if cfg.gateway is not None:
            nl.add_default_route(ipr, cfg.gateway)

    def close(self) -> None:
        """Unwatch, close the socket, delete the pair (unless ``existing``), and remove
        the namespace if this port was its last user and it was created here."""
        if self._io is not None and self._ring is not None:
            self._io.unwatch(self._ring.fileno())
        self._io = None
        self._teardown()

    def _teardown(self) -> None:
        steps: list[tuple[str, Callable[[], object]]] = []
        if self._ring is not None:
            steps.append(("closing socket", self._ring.close))
        if self._made_link:
            steps.append(("deleting veth", self._delete_link))
        if self._netns_ref is not None:
            steps.append(("removing namespace", self._release_netns))
        self._ring, self._made_link = None, False
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - keep tearing down the rest
                log.warning("port %s: %s failed: %s", self.name, what, exc)

    def _delete_link(self) -> None:
        with nl.rtnl() as ipr:
            nl.delete_link(ipr, self.name)  # deleting one end removes both

    def _release_netns(self) -> None:
        ns, self._netns_ref = self._netns_ref, None
        if ns is None:
            return
        _created_netns[ns] -= 1
        if _created_netns[ns] <= 0:
            del _created_netns[ns]
            nl.remove_netns(ns)

    # -- data path ---------------------------------------------------------------------
    def attach(self, io: PortIO) -> None:
        if self._ring is None:
            raise PortError(f"port {self.name!r}: attach() before open()")
        self._io = io
        io.watch(self._ring.fileno(), io.rx_ready)

    def receive(self, max_frames: int = MAX_BURST) -> Sequence[Frame]:
        ring = self._ring
        return ring.receive(max_frames) if ring is not None else ()

    def release(self) -> None:
        if self._ring is not None:
            self._ring.release()

    def transmit(self, frames: Sequence[Frame]) -> int:
        ring = self._ring
        if ring is None:
            if frames:
                self.counters.drop("link_down", len(frames), rx=False)
            return 0
        return ring.transmit(frames)

    # -- operator views ----------------------------------------------------------------
    def link_state(self) -> str:
        return "up" if self._ring is not None and nl.link_is_up(self.name) else "down"

    def status(self) -> dict[str, Any]:
        cfg = self.config
        out: dict[str, Any] = {"existing": cfg.existing, "mtu": self._mtu}
        if not cfg.existing:
            out.update(peer=cfg.peer, netns=cfg.netns, offloads="off")
        if self._ring is not None:
            self._ring.poll_kernel_drops()
            out.update(self._ring.ring_info())
        return out
