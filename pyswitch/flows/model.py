"""The values the flow modules share: match fields, matches, actions, flows, filters.

A **flow key** (``key.FlowKey``) is a tuple of header fields extracted from one frame;
a **match** is a set of ``(field index, value, mask)`` conditions on that tuple.  A
condition holds when ``key[index] is not None and key[index] & mask == value``.  The one
exception is ``value is None``: the field must be *absent* (``dl_vlan=0xffff``, "no
802.1Q tag").  A field a frame does not carry (an IPv6 address in an ARP frame, the
ports of a truncated TCP header) is ``None`` in the key and so matches no condition.

Matches are canonical (values already masked, conditions sorted by index), so two
matches that select the same frames compare and hash equal: that is what "identical
match" means for add-flow replacement and strict mod/del.

Everything here is immutable and hashable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# ---- flow key field indices (the order of key.FlowKey) -------------------------------
IN_PORT, DL_SRC, DL_DST, DL_TYPE, DL_VLAN, DL_VLAN_PCP = range(6)
NW_SRC, NW_DST, NW_PROTO, NW_TOS, TP_SRC, TP_DST, IPV6_SRC, IPV6_DST = range(6, 14)
N_FIELDS = 14

#: Full-width masks per key index (a condition with this mask is an exact match).
FULL_MASK: tuple[int, ...] = (
    0xFFFF,
    (1 << 48) - 1,
    (1 << 48) - 1,
    0xFFFF,
    0xFFF,
    0x7,
    0xFFFFFFFF,
    0xFFFFFFFF,
    0xFF,
    0xFC,
    0xFFFF,
    0xFFFF,
    (1 << 128) - 1,
    (1 << 128) - 1,
)

ETH_TYPE_IP = 0x0800
ETH_TYPE_ARP = 0x0806
ETH_TYPE_IPV6 = 0x86DD
ETH_TYPE_VLAN = 0x8100
ETH_TYPE_QINQ = 0x88A8
#: dl_type of an 802.3 frame (length field < 0x600), as in OVS (FLOW_DL_TYPE_NONE).
ETH_TYPE_NONE = 0x05FF
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6, IPPROTO_SCTP = 1, 6, 17, 58, 132

DEFAULT_PRIORITY = 32768

# ---- OpenFlow 1.0 reserved port numbers (OpenFlow 1.0 §5.2.1, ofp_port) ---------------
OFPP_MAX = 0xFF00
OFPP_IN_PORT = 0xFFF8
OFPP_NORMAL = 0xFFFA
OFPP_FLOOD = 0xFFFB
OFPP_ALL = 0xFFFC
OFPP_NONE = 0xFFFF


class FlowSyntaxError(ValueError):
    """A flow string is malformed.  ``str()`` names the field, the reason and the
    1-based column where the offending token starts, e.g.
    ``nw_src=10.0.0.300: not an IPv4 address (at column 14)``."""

    def __init__(self, token: str, reason: str, column: int) -> None:
        self.token, self.reason, self.column = token, reason, column
        super().__init__(f"{token}: {reason} (at column {column})")


@dataclass(frozen=True, slots=True)
class PortNames:
    """The bridge's port naming, handed to the parser and the printer.

    ``to_number(name)`` returns the OpenFlow port number of a port name or None;
    ``to_name(number)`` returns the name of a port number or None.  Either may be
    called with names/numbers that do not exist.
    """

    to_number: Callable[[str], int | None]
    to_name: Callable[[int], str | None]

    @classmethod
    def from_dict(cls, by_name: dict[str, int]) -> PortNames:
        """A static mapping (tests, tools)."""
        by_number = {v: k for k, v in by_name.items()}
        return cls(by_name.get, by_number.get)


Condition = tuple[int, int | None, int]  # (key index, value or None = absent, mask)


@dataclass(frozen=True, slots=True)
class Match:
    """A canonical conjunction of conditions on a flow key (see module docstring)."""

    conditions: tuple[Condition, ...] = ()

    @classmethod
    def of(cls, conds: dict[int, tuple[int | None, int]]) -> Match:
        """Canonicalise ``{index: (value, mask)}``: values masked, sorted by index,
        full-wildcard conditions (mask 0) dropped."""
        out = []
        for idx in sorted(conds):
            value, mask = conds[idx]
            if mask == 0:
                continue
            out.append((idx, None if value is None else value & mask, mask))
        return cls(tuple(out))

    def get(self, index: int) -> tuple[int | None, int] | None:
        """``(value, mask)`` of the condition on ``index``, or None if wildcarded."""
        for idx, value, mask in self.conditions:
            if idx == index:
                return value, mask
        return None

    def exact(self, index: int) -> int | None:
        """The value of an exact (full-mask) condition on ``index``, else None."""
        got = self.get(index)
        if got is None or got[1] != FULL_MASK[index]:
            return None
        return got[0]

    def matches(self, key: tuple[Any, ...]) -> bool:
        """Whether ``key`` satisfies every condition (the reference semantics)."""
        for idx, value, mask in self.conditions:
            k = key[idx]
            if value is None:
                if k is not None:
                    return False
            elif k is None or k & mask != value:
                return False
        return True

    def covers(self, other: Match) -> bool:
        """True if every frame ``other`` matches is matched by ``self`` *as OVS's
        non-strict mod/del see it*: each condition of ``self`` is implied by a
        condition of ``other`` on the same field with a mask at least as wide."""
        theirs = {idx: (v, m) for idx, v, m in other.conditions}
        for idx, value, mask in self.conditions:
            got = theirs.get(idx)
            if got is None:
                return False
            ov, om = got
            if value is None or ov is None:
                if value is not ov:
                    return False
            elif om & mask != mask or ov & mask != value:
                return False
        return True

    def __iter__(self) -> Iterator[Condition]:
        return iter(self.conditions)

    def __len__(self) -> int:
        return len(self.conditions)


class Action(NamedTuple):
    """One action of a rule.  ``kind`` is the ovs-ofctl keyword (lower case);
    ``arg`` is its parsed argument: an int for ports, VIDs, MACs (48-bit int),
    IPv4 addresses (32-bit int) and L4 ports, ``(port or None, table or None)`` for
    ``resubmit``, None for argument-less actions."""

    kind: str
    arg: Any = None


#: Actions that send the frame somewhere (bridge-resolved kinds included).
OUTPUT_KINDS = frozenset({"output", "normal", "flood", "all", "in_port"})


@dataclass(frozen=True, slots=True)
class Flow:
    """A rule as an ``add-flow`` string describes it; ``parse(format(f)) == f``."""

    match: Match = field(default_factory=Match)
    actions: tuple[Action, ...] = ()
    priority: int = DEFAULT_PRIORITY
    table: int = 0
    cookie: int = 0
    idle_timeout: int = 0
    hard_timeout: int = 0

    def outputs_to(self, port: int) -> bool:
        """Whether an ``output`` action names ``port`` (del/dump ``out_port=``)."""
        return any(a.kind == "output" and a.arg == port for a in self.actions)


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """What ``mod-flows``/``del-flows``/``dump-flows`` select.

    ``table`` None = all tables.  ``cookie_mask`` 0 = any cookie.  ``out_port``
    None = no filter.  ``priority`` is compared only by strict operations.
    ``actions`` is set for ``mod-flows`` (None elsewhere).
    """

    match: Match = field(default_factory=Match)
    table: int | None = None
    priority: int = DEFAULT_PRIORITY
    cookie: int = 0
    cookie_mask: int = 0
    out_port: int | None = None
    actions: tuple[Action, ...] | None = None

    def selects(self, flow: Flow, strict: bool) -> bool:
        """OVS's selection rule: table and cookie (under mask) and out_port agree,
        and the match is identical with equal priority (strict) or covered by the
        filter's match (non-strict)."""
        if self.table is not None and flow.table != self.table:
            return False
        if (flow.cookie ^ self.cookie) & self.cookie_mask:
            return False
        if self.out_port is not None and not flow.outputs_to(self.out_port):
            return False
        if strict:
            return flow.priority == self.priority and flow.match == self.match
        return self.match.covers(flow.match)
