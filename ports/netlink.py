"""Kernel plumbing shared by the ``veth`` and ``tap`` port types.

Thin wrappers over pyroute2 0.9 (rtnetlink: namespaces, links, addresses, routes)
(offload settings are in ``ethtool.py``), plus the parsers that turn
configuration strings (CIDR lists, MACs, MTUs, interface names) into values.

Every failure surfaces as :class:`~pyswitch.port.PortError` with a message that says
what was being done and why it failed, for the operator.  Nothing here runs on the
data path: these calls are for ``open()``/``close()`` only.

pyroute2's synchronous ``IPRoute`` drives a private asyncio loop with
``run_until_complete``: do not call these helpers from inside a running asyncio
event loop (call them from plain code, or from a worker thread).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterator

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from pyswitch.port import PortError

#: Linux IFNAMSIZ is 16 including the terminating NUL.
IFNAMSIZ = 16
NETNS_RUN_DIR = "/var/run/netns"
IFA_F_NODAD = 0x02  # linux/if_addr.h: no duplicate address detection
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")

# -- configuration values ---------------------------------------------------------------


def check_ifname(name: str, what: str) -> str:
    """Return ``name`` if it is a valid Linux interface name, else ``PortError`` naming
    ``what`` (the option or port it came from).  Rules of ``dev_valid_name()``."""
    if not name or len(name) >= IFNAMSIZ:
        raise PortError(f"{what}: interface name {name!r} must be 1-{IFNAMSIZ - 1} characters")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise PortError(f"{what}: interface name {name!r} may not contain '/', ':' or spaces")
    return name


def check_netns_name(name: str, what: str = "netns") -> str:
    """Return ``name`` if usable as a named namespace (a file in /var/run/netns)."""
    if not name or name in (".", "..") or "/" in name or len(name) > 200:
        raise PortError(f"{what}: invalid network namespace name {name!r}")
    return name


def parse_mac(text: str, what: str) -> str:
    """Normalise ``aa:bb:cc:dd:ee:ff``; refuse multicast MACs for an interface."""
    if not _MAC_RE.match(text):
        raise PortError(f"{what}: {text!r} is not a MAC address like 02:00:00:00:00:01")
    if int(text[:2], 16) & 1:
        raise PortError(f"{what}: {text!r} is a multicast address")
    return text.lower()


def parse_mtu(text: str, what: str = "mtu") -> int:
    """An Ethernet MTU (IP payload size, without the 14-byte header), 68..65535."""
    try:
        mtu = int(text, 10)
    except ValueError:
        raise PortError(f"{what}: {text!r} is not an integer") from None
    if not 68 <= mtu <= 65535:
        raise PortError(f"{what}: {mtu} is outside 68..65535")
    return mtu


def parse_cidrs(text: str, what: str) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """Parse a comma-separated list of ``addr/prefix`` (IPv4 or IPv6)."""
    out: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for item in (s.strip() for s in text.split(",")):
        if "/" not in item:
            raise PortError(f"{what}: {item!r} needs a prefix length (e.g. 10.0.0.1/24)")
        try:
            out.append(ipaddress.ip_interface(item))
        except ValueError as exc:
            raise PortError(f"{what}: {exc}") from None
    return out


def parse_ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError as exc:
        raise PortError(f"{what}: {exc}") from None


def parse_bool(text: str, what: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise PortError(f"{what}: {text!r} is not true or false")


# -- namespaces and rtnetlink ------------------------------------------------------------


@contextlib.contextmanager
def errors(doing: str) -> Iterator[None]:
    """Turn netlink and OS errors raised inside into ``PortError("<doing>: <why>")``."""
    try:
        yield
    except PortError:
        raise
    except NetlinkError as exc:
        raise PortError(f"{doing}: {os.strerror(exc.code)}") from exc
    except OSError as exc:
        raise PortError(f"{doing}: {exc.strerror or exc}") from exc


def netns_exists(name: str) -> bool:
    """Whether ``/var/run/netns/<name>`` exists (the ``ip netns`` convention)."""
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def create_netns(name: str) -> None:
    """Create the named namespace (``ip netns add``) and bring its ``lo`` up."""
    with errors(f"creating network namespace {name!r}"):
        pr_netns.create(name)
    try:
        with rtnl(name) as ipr:
            set_link(ipr, "lo", up=True)
    except PortError:
        remove_netns(name)
        raise


def remove_netns(name: str) -> None:
    """Remove the named namespace (``ip netns del``); absent is not an error."""
    if netns_exists(name):
        with errors(f"removing network namespace {name!r}"):
            pr_netns.remove(name)


@contextlib.contextmanager
def rtnl(netns: str | None = None) -> Iterator[IPRoute]:
    """An rtnetlink socket in the current namespace or in the named one (never creates)."""
    with errors(f"opening rtnetlink{f' in namespace {netns!r}' if netns else ''}"):
        ipr = IPRoute(netns=netns, flags=0) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def ifindex(ipr: IPRoute, name: str) -> int | None:
    """The ifindex of ``name`` in ``ipr``'s namespace, or None."""
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def link_info(ipr: IPRoute, name: str) -> dict[str, object]:
    """``index``, ``mtu``, ``mac``, ``kind`` (None for plain devices), ``up``, ``link_type``,
    ``alias`` (IFLA_IFALIAS, None when unset)."""
    with errors(f"reading interface {name!r}"):
        (msg,) = ipr.link("get", ifname=name)
    info = msg.get_attr("IFLA_LINKINFO")
    return {
        "index": msg["index"],
        "mtu": msg.get_attr("IFLA_MTU"),
        "mac": msg.get_attr("IFLA_ADDRESS"),
        "kind": info.get_attr("IFLA_INFO_KIND") if info else None,
        "up": bool(msg["flags"] & 1),
        "link_type": msg["ifi_type"],  # ARPHRD_ETHER = 1
        "alias": msg.get_attr("IFLA_IFALIAS"),
    }


def create_veth(ipr: IPRoute, name: str, peer: str) -> int:
    """Create the veth pair ``name`` <-> ``peer`` in ``ipr``'s namespace; return ``name``'s
    ifindex.  ``PortError`` if a name is taken."""
    try:
        ipr.link("add", ifname=name, kind="veth", peer=peer)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            raise PortError(
                f"cannot create veth {name!r}: an interface {name!r} or {peer!r} already exists"
            ) from exc
        raise PortError(f"cannot create veth {name!r}: {os.strerror(exc.code)}") from exc
    index = ifindex(ipr, name)
    if index is None:
        raise PortError(f"veth {name!r} vanished right after creation")
    return index


def set_link(
    ipr: IPRoute,
    name: str,
    *,
    ifname: str | None = None,
    mac: str | None = None,
    mtu: int | None = None,
    up: bool | None = None,
    arp: bool | None = None,
    alias: str | None = None,
    netns: str | None = None,
) -> None:
    """Change link ``name``: rename, MAC, MTU, ARP, alias, admin state, or move to namespace
    ``netns`` (each given attribute in its own request, in that order, so errors name the step)."""
    index = ifindex(ipr, name)
    if index is None:
        raise PortError(f"interface {name!r} does not exist")
    steps: list[tuple[str, dict[str, object]]] = []
    if ifname is not None:
        steps.append((f"renaming {name!r} to {ifname!r}", {"ifname": ifname}))
    if mac is not None:
        steps.append((f"setting MAC {mac} on {name!r}", {"address": mac}))
    if mtu is not None:
        steps.append((f"setting MTU {mtu} on {name!r}", {"mtu": mtu}))
    if arp is not None:
        steps.append((f"setting ARP {'on' if arp else 'off'} on {name!r}", {"arp": arp}))
    if alias is not None:
        steps.append((f"setting the alias of {name!r}", {"ifalias": alias}))
    if up is not None:
        steps.append(
            (f"setting {name!r} {'up' if up else 'down'}", {"state": "up" if up else "down"})
        )
    if netns is not None:
        steps.append((f"moving {name!r} into namespace {netns!r}", {"net_ns_fd": netns}))
    for doing, attrs in steps:
        with errors(doing):
            ipr.link("set", index=index, **attrs)


def add_addresses(
    ipr: IPRoute, name: str, cidrs: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]
) -> None:
    """Add each ``addr/prefix`` to ``name``; IPv6 ones without DAD (usable at once)."""
    index = ifindex(ipr, name)
    for cidr in cidrs:
        extra = {"flags": IFA_F_NODAD} if cidr.version == 6 else {}
        with errors(f"adding address {cidr} to {name!r}"):
            ipr.addr(
                "add", index=index, address=str(cidr.ip), prefixlen=cidr.network.prefixlen, **extra
            )


def add_default_route(ipr: IPRoute, gateway: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Add a default route via ``gateway`` (family taken from the address)."""
    family = socket.AF_INET6 if gateway.version == 6 else socket.AF_INET
    dst = "::/0" if gateway.version == 6 else "0.0.0.0/0"
    with errors(f"adding default route via {gateway}"):
        ipr.route("add", dst=dst, gateway=str(gateway), family=family)


def detach_from_host_stack(ipr: IPRoute, name: str) -> None:
    """Keep this namespace's IP stack off interface ``name`` (a switch port's own end).

    AF_PACKET reads frames *beside* the stack, not instead of it: without this, the
    kernel answers ARP on the switch end for any local address (``arp_ignore=0``), and
    an attached host could reach this namespace directly, around the switch and its
    VLANs.  So: no ARP (``IFF_NOARP``), no IPv6 (no link-local address, ND, MLD), and a
    strict reverse-path filter (``rp_filter=1``; the end has no routes, so IPv4 with a
    source address arriving on it is dropped).  Call before bringing the link up."""
    if os.path.exists(f"/proc/sys/net/ipv6/conf/{name}"):  # absent: no IPv6 in this kernel
        _write_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "1")
    _write_sysctl(f"net/ipv4/conf/{name}/rp_filter", "1")
    set_link(ipr, name, arp=False)


def _write_sysctl(key: str, value: str) -> None:
    with errors(f"setting sysctl {key.replace('/', '.')}"), open(f"/proc/sys/{key}", "w") as f:
        f.write(value)


def wait_oper_up(ipr: IPRoute, name: str, timeout: float = 5.0) -> None:
    """Wait until ``name`` is operationally up.  The kernel attaches a device's real
    qdisc only then (linkwatch, up to about a second after "set up"); until then every
    frame sent out of it is silently dropped.  ``PortError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        with errors(f"reading the state of {name!r}"):
            (msg,) = ipr.link("get", ifname=name)
        state = msg.get_attr("IFLA_OPERSTATE")
        if state in ("UP", "UNKNOWN"):
            return
        time.sleep(0.01)
    raise PortError(f"interface {name!r} did not come up within {timeout:g}s (state {state})")


def delete_link(ipr: IPRoute, name: str) -> bool:
    """Delete link ``name``; False if it was already gone."""
    index = ifindex(ipr, name)
    if index is None:
        return False
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise PortError(f"deleting {name!r}: {os.strerror(exc.code)}") from exc
    return True


def link_is_up(ifname: str) -> bool:
    """Administratively up and operationally up (or ``unknown``, as for TAP and dummy
    devices), read from sysfs of the caller's namespace: cheap enough for ``show``."""
    base = f"/sys/class/net/{ifname}"
    try:
        with open(f"{base}/flags") as f:
            flags = int(f.read(), 16)
        with open(f"{base}/operstate") as f:
            oper = f.read().strip()
    except OSError:
        return False
    return bool(flags & 1) and oper in ("up", "unknown")
