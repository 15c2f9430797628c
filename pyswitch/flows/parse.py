"""Parse ``ovs-ofctl`` flow strings (``add-flow``, ``mod-flows``, ``del-flows``,
``dump-flows``) into :class:`model.Flow` / :class:`model.FlowFilter`.

Syntax (ovs-ofctl(8), "Flow Syntax"): ``field=value`` items separated by commas or
white space, then ``actions=`` followed by a comma-separated action list that runs to
the end of the string.  ``field:value`` is accepted too, as OVS does.  Numbers are
decimal or ``0x`` hex.  Items may come in any order; prerequisites (``nw_src`` needs
``ip`` or ``arp``, ``tp_dst`` needs ``tcp``/``udp``/``sctp`` ...) are checked once the
whole match is known, as OVS does.

Every error is a :class:`model.FlowSyntaxError` naming the offending ``field=value``,
the reason, and the 1-based column where that item starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_DST,
    IPV6_SRC,
    NW_DST,
    NW_PROTO,
    NW_SRC,
    NW_TOS,
    TP_DST,
    TP_SRC,
    Action,
    Flow,
    FlowFilter,
    FlowSyntaxError,
    Match,
    PortNames,
)

_SEPARATORS = ", \t\r\n"

#: name -> (key index, value kind).  Kinds are parsed by values.parse_match_value.
MATCH_FIELDS: dict[str, tuple[int, str]] = {
    "in_port": (IN_PORT, "port"),
    "dl_src": (DL_SRC, "mac"),
    "dl_dst": (DL_DST, "mac"),
    "dl_type": (DL_TYPE, "u16"),
    "dl_vlan": (DL_VLAN, "vlan"),
    "dl_vlan_pcp": (DL_VLAN_PCP, "pcp"),
    "vlan_tci": (DL_VLAN, "vlan_tci"),
    "nw_src": (NW_SRC, "ipv4"),
    "nw_dst": (NW_DST, "ipv4"),
    "arp_spa": (NW_SRC, "ipv4"),
    "arp_tpa": (NW_DST, "ipv4"),
    "nw_proto": (NW_PROTO, "u8"),
    "arp_op": (NW_PROTO, "u8"),
    "nw_tos": (NW_TOS, "tos"),
    "tp_src": (TP_SRC, "u16m"),
    "tp_dst": (TP_DST, "u16m"),
    "icmp_type": (TP_SRC, "icmp"),
    "icmp_code": (TP_DST, "icmp"),
    "ipv6_src": (IPV6_SRC, "ipv6"),
    "ipv6_dst": (IPV6_DST, "ipv6"),
}

#: Protocol shorthands (ovs-fields(7)): name -> (dl_type, nw_proto or None).
SHORTHANDS: dict[str, tuple[int, int | None]] = {
    "ip": (ETH_TYPE_IP, None),
    "ipv6": (ETH_TYPE_IPV6, None),
    "arp": (ETH_TYPE_ARP, None),
    "icmp": (ETH_TYPE_IP, IPPROTO_ICMP),
    "icmp6": (ETH_TYPE_IPV6, IPPROTO_ICMPV6),
    "tcp": (ETH_TYPE_IP, IPPROTO_TCP),
    "udp": (ETH_TYPE_IP, IPPROTO_UDP),
    "sctp": (ETH_TYPE_IP, IPPROTO_SCTP),
    "tcp6": (ETH_TYPE_IPV6, IPPROTO_TCP),
    "udp6": (ETH_TYPE_IPV6, IPPROTO_UDP),
    "sctp6": (ETH_TYPE_IPV6, IPPROTO_SCTP),
}

_IP, _IP6, _ARP = {ETH_TYPE_IP}, {ETH_TYPE_IPV6}, {ETH_TYPE_ARP}
_L4 = {IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP}
#: Prerequisites (ovs-fields(7)): field -> (allowed dl_types, allowed nw_protos or None,
#: what to tell the user).
_PREREQS: dict[str, tuple[set[int], set[int] | None, str]] = {
    "nw_src": (_IP | _ARP, None, "'ip' or 'arp'"),
    "nw_dst": (_IP | _ARP, None, "'ip' or 'arp'"),
    "arp_spa": (_ARP, None, "'arp'"),
    "arp_tpa": (_ARP, None, "'arp'"),
    "arp_op": (_ARP, None, "'arp'"),
    "nw_proto": (_IP | _IP6, None, "'ip' or 'ipv6'"),
    "nw_tos": (_IP | _IP6, None, "'ip' or 'ipv6'"),
    "ipv6_src": (_IP6, None, "'ipv6'"),
    "ipv6_dst": (_IP6, None, "'ipv6'"),
    "tp_src": (_IP | _IP6, _L4, "'tcp', 'udp' or 'sctp' (or their IPv6 forms)"),
    "tp_dst": (_IP | _IP6, _L4, "'tcp', 'udp' or 'sctp' (or their IPv6 forms)"),
    "icmp_type": (_IP | _IP6, {IPPROTO_ICMP, IPPROTO_ICMPV6}, "'icmp' or 'icmp6'"),
    "icmp_code": (_IP | _IP6, {IPPROTO_ICMP, IPPROTO_ICMPV6}, "'icmp' or 'icmp6'"),
}
_ACTION_PREREQS: dict[str, tuple[set[int], set[int] | None, str]] = {
    "mod_nw_src": (_IP, None, "'ip'"),
    "mod_nw_dst": (_IP, None, "'ip'"),
    "mod_tp_src": (_IP | _IP6, {IPPROTO_TCP, IPPROTO_UDP}, "'tcp' or 'udp'"),
    "mod_tp_dst": (_IP | _IP6, {IPPROTO_TCP, IPPROTO_UDP}, "'tcp' or 'udp'"),
}

Token = tuple[str, int]  # (text, 1-based column)


def parse_flow(text: str, ports: PortNames | None = None) -> Flow:
    """Parse an ``add-flow`` string.  ``actions=`` is required; ``cookie`` takes no
    mask; ``out_port`` is not allowed.  Raises FlowSyntaxError."""
    p = _Parser(text, ports, "add")
    return Flow(
        match=p.match,
        actions=p.actions or (),
        priority=p.priority,
        table=p.table or 0,
        cookie=p.cookie,
        idle_timeout=p.idle,
        hard_timeout=p.hard,
    )


def parse_filter(
    text: str, ports: PortNames | None = None, *, with_actions: bool = False
) -> FlowFilter:
    """Parse a ``del-flows``/``dump-flows`` filter, or with ``with_actions=True`` a
    ``mod-flows`` string (actions required).  No ``table=`` means every table;
    ``cookie=V/M`` filters on cookie bits; ``cookie=V`` means ``V/-1``;
    ``out_port=P`` keeps rules with an ``output:P`` action.  Raises FlowSyntaxError."""
    p = _Parser(text, ports, "modify" if with_actions else "filter")
    return FlowFilter(
        match=p.match,
        table=p.table,
        priority=p.priority,
        cookie=p.cookie,
        cookie_mask=p.cookie_mask,
        out_port=p.out_port,
        actions=p.actions,
    )


def split_items(text: str, start: int = 0, parens: bool = False) -> list[Token]:
    """Split ``text[start:]`` at commas/white space (outside parentheses when
    ``parens``) into (item, column) pairs."""
    out, i, n = [], start, len(text)
    while i < n:
        if text[i] in _SEPARATORS:
            i += 1
            continue
        j, depth = i, 0
        while j < n and (depth or text[j] not in _SEPARATORS):
            if parens and text[j] == "(":
                depth += 1
            elif parens and text[j] == ")" and depth:
                depth -= 1
            j += 1
        out.append((text[i:j], i + 1))
        i = j
    return out


def split_kv(item: str) -> tuple[str, str | None]:
    """``'k=v'``/``'k:v'`` -> (k, v); ``'k'`` -> (k, None)."""
    for i, ch in enumerate(item):
        if ch in "=:(":
            return item[:i], item[i + 1 :] if ch != "(" else item[i:]
    return item, None


class _Parser:
    """One parse of one flow string; the results are attributes."""

    def __init__(self, text: str, ports: PortNames | None, mode: str) -> None:
        self.text, self.ports, self.mode = text, ports, mode
        self.priority, self.cookie, self.cookie_mask = DEFAULT_PRIORITY, 0, 0
        self.table: int | None = None
        self.idle = self.hard = 0
        self.out_port: int | None = None
        self.actions: tuple[Action, ...] | None = None
        self.conds: dict[int, tuple[int | None, int]] = {}
        self.seen: dict[int, Token] = {}  # key index -> item that set it
        self.named: list[tuple[str, Token]] = []  # (field name, item) for prereqs
        items, actions_at = self._split()
        for item in items:
            self._item(*item)
        self.match = Match.of(self.conds)
        self._check_prereqs()
        if actions_at is not None:
            self._actions(actions_at)
        elif mode != "filter":
            raise FlowSyntaxError("actions", "missing: a flow needs actions=...", len(text) + 1)

    def err(self, item: Token, reason: str) -> FlowSyntaxError:
        return FlowSyntaxError(item[0], reason, item[1])

    def _split(self) -> tuple[list[Token], int | None]:
        """The match items, and the offset just after ``actions=`` (None if absent)."""
        items: list[Token] = []
        for text, col in split_items(self.text):
            key, value = split_kv(text)
            if key == "actions":
                if value is None:
                    raise FlowSyntaxError(text, "expected actions=...", col)
                if self.mode == "filter":
                    raise FlowSyntaxError(text, "actions are not allowed here", col)
                return items, col - 1 + len("actions=")
            items.append((text, col))
        return items, None

    def _item(self, text: str, col: int) -> None:
        key, value = split_kv(text)
        item = (text, col)
        if value is None:
            if key not in SHORTHANDS:
                raise self.err(item, "unknown field or protocol (expected field=value)")
            dl_type, proto = SHORTHANDS[key]
            self._set(item, DL_TYPE, dl_type, 0xFFFF)
            if proto is not None:
                self._set(item, NW_PROTO, proto, 0xFF)
            return
        if value == "":
            raise self.err(item, "missing value")
        handler = _FLOW_ATTRS.get(key)
        if handler is not None:
            handler(self, item, value)
            return
        spec = MATCH_FIELDS.get(key)
        if spec is None:
            raise self.err(item, f"unknown field {key!r}")
        idx, kind = spec
        try:
            v, m = V.parse_match_value(kind, value, self.ports)
        except ValueError as e:
            raise self.err(item, str(e)) from None
        self._set(item, idx, v, m)
        self.named.append((key, item))

    def _set(self, item: Token, idx: int, value: int | None, mask: int) -> None:
        old = self.conds.get(idx)
        new = (None if value is None else value & mask, mask)
        if old is not None and old != new:
            raise self.err(item, f"conflicts with earlier {self.seen[idx][0]!r}")
        self.conds[idx] = new
        self.seen.setdefault(idx, item)

    def _check_prereqs(self) -> None:
        for name, item in self.named:
            if name in _PREREQS:
                self._prereq(item, *_PREREQS[name])

    def _prereq(self, item: Token, types: set[int], protos: set[int] | None, what: str) -> None:
        dl_type, nw_proto = self.match.exact(DL_TYPE), self.match.exact(NW_PROTO)
        if dl_type not in types or (protos is not None and nw_proto not in protos):
            raise self.err(item, f"needs {what} in the match too (OVS prerequisite)")

    def _actions(self, start: int) -> None:
        acts = []
        items = split_items(self.text, start, parens=True)
        for text, col in items:
            try:
                act = V.parse_action(text, self.ports)
            except ValueError as e:
                raise FlowSyntaxError(text, str(e), col) from None
            if act.kind == "drop":
                if len(items) > 1:
                    raise FlowSyntaxError(text, "drop must be the only action", col)
                continue
            if act.kind in _ACTION_PREREQS:
                self._prereq((text, col), *_ACTION_PREREQS[act.kind])
            acts.append(act)
        self.actions = tuple(acts)


def _set_int(attr: str, hi: int) -> Callable[[_Parser, Token, str], None]:
    def handler(p: _Parser, item: Token, value: str) -> None:
        try:
            setattr(p, attr, V.parse_int(value, hi))
        except ValueError as e:
            raise p.err(item, str(e)) from None

    return handler


def _set_table(p: _Parser, item: Token, value: str) -> None:
    try:
        t = V.parse_int(value, 255)
    except ValueError as e:
        raise p.err(item, str(e)) from None
    if t == 255 and p.mode == "add":
        raise p.err(item, "table 255 means 'all tables' and cannot hold a flow")
    p.table = None if t == 255 else t


def _set_cookie(p: _Parser, item: Token, value: str) -> None:
    text, _, mask = value.partition("/")
    if mask and p.mode == "add":
        raise p.err(item, "a cookie mask is only for mod-flows/del-flows/dump-flows")
    try:
        p.cookie = V.parse_int(text, (1 << 64) - 1)
        p.cookie_mask = V.parse_int(mask, (1 << 64) - 1) if mask else (1 << 64) - 1
    except ValueError as e:
        raise p.err(item, str(e)) from None
    if p.mode == "add":
        p.cookie_mask = 0


def _set_timeout(attr: str) -> Callable[[_Parser, Token, str], None]:
    inner = _set_int(attr, 0xFFFF)

    def handler(p: _Parser, item: Token, value: str) -> None:
        if p.mode != "add":
            raise p.err(item, "timeouts are only for add-flow")
        inner(p, item, value)

    return handler


def _set_out_port(p: _Parser, item: Token, value: str) -> None:
    if p.mode == "add":
        raise p.err(item, "out_port is only for mod-flows/del-flows/dump-flows")
    try:
        p.out_port = V.parse_port(value, p.ports)
    except ValueError as e:
        raise p.err(item, str(e)) from None


_FLOW_ATTRS: dict[str, Callable[[_Parser, Token, str], Any]] = {
    "priority": _set_int("priority", 0xFFFF),
    "table": _set_table,
    "cookie": _set_cookie,
    "idle_timeout": _set_timeout("idle"),
    "hard_timeout": _set_timeout("hard"),
    "out_port": _set_out_port,
}

__all__ = ["FULL_MASK", "MATCH_FIELDS", "SHORTHANDS", "parse_filter", "parse_flow"]
