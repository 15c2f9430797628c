"""Print flows back in ovs-ofctl's syntax, ``dump-flows`` lines, and a JSON-able form.

``parse_flow(format_flow(f)) == f`` for every flow the parser accepts (tested).
The field order of a match follows OVS's ``match_format()``: priority, protocol
shorthand (``tcp``, ``arp`` ...), in_port, VLAN, dl_src, dl_dst, dl_type (when no
shorthand names it), L3 addresses (``arp_spa``/``arp_tpa`` for ARP, ``ipv6_*`` for
IPv6), nw_proto/arp_op, nw_tos, then L4 (``icmp_type``/``icmp_code`` for ICMP).

A dump line has OVS's exact shape::

     cookie=0x0, duration=1.2s, table=0, n_packets=5, n_bytes=420, idle_age=3, priority=100,in_port=vhu1 actions=output:vhu2

with the duration in OVS's millisecond form (``1.2s`` is printed ``1.200s``; whole
seconds print without decimals), priority omitted when it is the default 32768, and
``idle_timeout``/``hard_timeout``/``hard_age`` present only when OVS shows them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import values as V
from .model import (
    DEFAULT_PRIORITY,
    DL_DST,
    DL_SRC,
    DL_TYPE,
    DL_VLAN,
    DL_VLAN_PCP,
    ETH_TYPE_ARP,
    ETH_TYPE_IP,
    ETH_TYPE_IPV6,
    FULL_MASK,
    IN_PORT,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPV6_DST,
    IPV6_SRC,
    NW_DST,
    NW_PROTO,
    NW_SRC,
    NW_TOS,
    TP_DST,
    TP_SRC,
    Flow,
    Match,
    PortNames,
)

if TYPE_CHECKING:
    from .table import FlowEntry

_PROTO_NAMES = {
    ETH_TYPE_IP: {1: "icmp", 6: "tcp", 17: "udp", 132: "sctp"},
    ETH_TYPE_IPV6: {58: "icmp6", 6: "tcp6", 17: "udp6", 132: "sctp6"},
}
_TYPE_NAMES = {ETH_TYPE_IP: "ip", ETH_TYPE_IPV6: "ipv6", ETH_TYPE_ARP: "arp"}
Item = tuple[str, str | None]  # (field or shorthand, value text or None)


def match_items(match: Match, ports: PortNames | None = None) -> list[Item]:
    """The match as (name, value) items in OVS's order; shorthands have value None."""
    conds = {idx: (v, m) for idx, v, m in match}
    items: list[Item] = []
    dl_type, proto = match.exact(DL_TYPE), match.exact(NW_PROTO)
    if dl_type in _TYPE_NAMES:
        short = _PROTO_NAMES.get(dl_type, {}).get(proto) if proto is not None else None
        items.append((short or _TYPE_NAMES[dl_type], None))
        conds.pop(DL_TYPE)
        if short:
            conds.pop(NW_PROTO)
    _take(items, conds, IN_PORT, "in_port", lambda v, m: V.format_port(v, ports))
    if DL_VLAN in conds and conds[DL_VLAN][0] is None:
        conds.pop(DL_VLAN)
        items.append(("vlan_tci", "0x0000"))
    _take(items, conds, DL_VLAN, "dl_vlan", lambda v, m: str(v))
    _take(items, conds, DL_VLAN_PCP, "dl_vlan_pcp", lambda v, m: str(v))
    _take(items, conds, DL_SRC, "dl_src", _mac)
    _take(items, conds, DL_DST, "dl_dst", _mac)
    _take(items, conds, DL_TYPE, "dl_type", lambda v, m: f"0x{v:04x}")
    _take(items, conds, IPV6_SRC, "ipv6_src", lambda v, m: V.format_ip_masked(v, m, 128))
    _take(items, conds, IPV6_DST, "ipv6_dst", lambda v, m: V.format_ip_masked(v, m, 128))
    arp = dl_type == ETH_TYPE_ARP
    _take(items, conds, NW_SRC, "arp_spa" if arp else "nw_src", _ip4)
    _take(items, conds, NW_DST, "arp_tpa" if arp else "nw_dst", _ip4)
    _take(items, conds, NW_PROTO, "arp_op" if arp else "nw_proto", lambda v, m: str(v))
    _take(items, conds, NW_TOS, "nw_tos", lambda v, m: str(v))
    icmp = (dl_type, proto) in ((ETH_TYPE_IP, IPPROTO_ICMP), (ETH_TYPE_IPV6, IPPROTO_ICMPV6))
    _take(items, conds, TP_SRC, "icmp_type" if icmp else "tp_src", _be16)
    _take(items, conds, TP_DST, "icmp_code" if icmp else "tp_dst", _be16)
    assert not conds, conds
    return items


def _take(items: list[Item], conds: dict, idx: int, name: str, fmt: Any) -> None:
    if idx in conds:
        value, mask = conds.pop(idx)
        items.append((name, fmt(value, mask)))


def _ip4(value: int, mask: int) -> str:
    return V.format_ip_masked(value, mask, 32)


def _mac(value: int, mask: int) -> str:
    if mask == FULL_MASK[DL_SRC]:
        return V.format_mac(value)
    return f"{V.format_mac(value)}/{V.format_mac(mask)}"


def _be16(value: int, mask: int) -> str:
    """OVS's format_be16_masked: decimal when exact, else hex value/mask."""
    return str(value) if mask == 0xFFFF else f"0x{value:04x}/0x{mask:04x}"


def format_match(
    match: Match, priority: int = DEFAULT_PRIORITY, ports: PortNames | None = None
) -> str:
    """``priority=N,`` (unless default) followed by the match items, comma-separated."""
    parts = [] if priority == DEFAULT_PRIORITY else [f"priority={priority}"]
    parts += [n if v is None else f"{n}={v}" for n, v in match_items(match, ports)]
    return ",".join(parts)


def format_flow(flow: Flow, ports: PortNames | None = None) -> str:
    """The flow as an ``add-flow`` string that parses back to an equal Flow."""
    head = []
    if flow.cookie:
        head.append(f"cookie=0x{flow.cookie:x}")
    if flow.table:
        head.append(f"table={flow.table}")
    if flow.idle_timeout:
        head.append(f"idle_timeout={flow.idle_timeout}")
    if flow.hard_timeout:
        head.append(f"hard_timeout={flow.hard_timeout}")
    text = "".join(f"{h}, " for h in head) + format_match(flow.match, flow.priority, ports)
    if text and not text.endswith(" "):
        text += " "
    return f"{text}actions={V.format_actions(flow.actions, ports)}"


def format_duration(seconds: float) -> str:
    """OVS's ofp_print_duration at millisecond precision: ``3s``, ``1.200s``."""
    ms = max(0, round(seconds * 1000))
    whole, frac = divmod(ms, 1000)
    return f"{whole}.{frac:03d}s" if frac else f"{whole}s"


def format_dump_line(entry: FlowEntry, now: float, ports: PortNames | None = None) -> str:
    """One ``dump-flows`` line, in OVS's exact shape (leading space included)."""
    f = entry.flow
    duration = now - entry.created
    s = (
        f" cookie=0x{f.cookie:x}, duration={format_duration(duration)}, table={f.table}, "
        f"n_packets={entry.n_packets}, n_bytes={entry.n_bytes}, "
    )
    if f.idle_timeout:
        s += f"idle_timeout={f.idle_timeout}, "
    if f.hard_timeout:
        s += f"hard_timeout={f.hard_timeout}, "
    s += f"idle_age={max(0, int(now - entry.last_used))}, "
    hard_age = max(0, int(now - entry.modified))
    if hard_age != max(0, int(duration)):
        s += f"hard_age={hard_age}, "
    s += format_match(f.match, f.priority, ports)
    if not s.endswith(" "):
        s += " "
    return f"{s}actions={V.format_actions(f.actions, ports)}"


def entry_to_dict(entry: FlowEntry, now: float, ports: PortNames | None = None) -> dict:
    """A JSON-able description of a rule and its counters.  ``match`` maps field names
    (OVS spelling) to value strings; a protocol shorthand maps to True."""
    f = entry.flow
    return {
        "table": f.table,
        "priority": f.priority,
        "cookie": f"0x{f.cookie:x}",
        "duration": round(max(0.0, now - entry.created), 3),
        "n_packets": entry.n_packets,
        "n_bytes": entry.n_bytes,
        "idle_timeout": f.idle_timeout,
        "hard_timeout": f.hard_timeout,
        "idle_age": max(0, int(now - entry.last_used)),
        "match": {n: True if v is None else v for n, v in match_items(f.match, ports)},
        "actions": [V.format_action(a, ports) for a in f.actions],
        "flow": format_flow(f, ports),
    }
