"""Value syntax shared by the parser and the printer: numbers, MACs, IPv4/IPv6 with
masks, ports, and single actions.

Parsers raise ``ValueError`` with a short reason ("not an IPv4 address"); the flow
parser wraps it into a FlowSyntaxError with the field and column.  Printers produce
exactly what the parsers accept, in ovs-ofctl's spelling.
"""

from __future__ import annotations

import ipaddress

from .model import FULL_MASK, OFPP_MAX, Action, PortNames

MAC_MASK = (1 << 48) - 1
IP4_MASK = 0xFFFFFFFF
IP6_MASK = (1 << 128) - 1
_HEX = frozenset("0123456789abcdefABCDEF")


def parse_int(text: str, hi: int, lo: int = 0) -> int:
    """Decimal or 0x-hex integer in ``lo..hi``."""
    t = text.strip()
    try:
        if t[:2].lower() == "0x" and len(t) > 2 and all(c in _HEX for c in t[2:]):
            n = int(t[2:], 16)  # noqa: FURB166 (int(t, 0) would accept 0o/0b/_)
        elif t.isascii() and t.isdigit():
            n = int(t, 10)
        else:
            raise ValueError
    except ValueError:
        raise ValueError("not a number") from None
    if not lo <= n <= hi:
        raise ValueError(f"out of range ({lo}..{hi})")
    return n


def parse_mac(text: str) -> int:
    """``xx:xx:xx:xx:xx:xx`` -> 48-bit int."""
    parts = text.split(":")
    if len(parts) != 6 or not all(0 < len(p) <= 2 for p in parts):
        raise ValueError("not an Ethernet address (want xx:xx:xx:xx:xx:xx)")
    try:
        return int("".join(p.zfill(2) for p in parts), 16)
    except ValueError:
        raise ValueError("not an Ethernet address (want xx:xx:xx:xx:xx:xx)") from None


def format_mac(n: int) -> str:
    h = f"{n:012x}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


def parse_ipv4(text: str) -> int:
    """Dotted quad -> 32-bit int."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise ValueError("not an IPv4 address")
    octets = [int(p) for p in parts]
    if any(o > 255 for o in octets):
        raise ValueError("not an IPv4 address")
    return octets[0] << 24 | octets[1] << 16 | octets[2] << 8 | octets[3]


def format_ipv4(n: int) -> str:
    return f"{n >> 24}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def parse_ipv6(text: str) -> int:
    try:
        return int(ipaddress.IPv6Address(text))
    except ValueError:
        raise ValueError("not an IPv6 address") from None


def format_ipv6(n: int) -> str:
    return str(ipaddress.IPv6Address(n))


def _prefix_mask(bits: int, width: int) -> int:
    return ((1 << bits) - 1) << (width - bits)


def prefix_len(mask: int, width: int) -> int | None:
    """The prefix length of a CIDR mask, None if the mask is not contiguous."""
    n = (mask).bit_count()
    return n if mask == _prefix_mask(n, width) else None


def _parse_ip_masked(text: str, width: int) -> tuple[int, int]:
    addr, slash, mask = text.partition("/")
    parse = parse_ipv4 if width == 32 else parse_ipv6
    value = parse(addr)
    if not slash:
        return value, (1 << width) - 1
    if mask.isdigit():
        bits = int(mask)
        if bits > width:
            raise ValueError(f"prefix length out of range (0..{width})")
        return value, _prefix_mask(bits, width)
    try:
        return value, parse(mask)
    except ValueError:
        raise ValueError(f"bad mask {mask!r} (want /N or /address)") from None


def format_ip_masked(value: int, mask: int, width: int) -> str:
    """OVS's spelling: no mask if exact, ``/N`` if CIDR, else ``/address``."""
    fmt = format_ipv4 if width == 32 else format_ipv6
    if mask == (1 << width) - 1:
        return fmt(value)
    bits = prefix_len(mask, width)
    return f"{fmt(value)}/{bits}" if bits is not None else f"{fmt(value)}/{fmt(mask)}"


def parse_port(text: str, ports: PortNames | None) -> int:
    """An OpenFlow port number 1..0xfeff, or else a port name (through ``ports``):
    all-digit (or 0x-hex) text is a number, as in ovs-ofctl."""
    if _looks_numeric(text):
        return parse_int(text, OFPP_MAX - 1, 1)
    number = ports.to_number(text) if ports is not None else None
    if number is None:
        raise ValueError(f"no such port {text!r}")
    return number


def format_port(number: int, ports: PortNames | None) -> str:
    """The port's name, or its number when it has none or the name would read back
    as a number (or would not survive the flow syntax)."""
    name = ports.to_name(number) if ports is not None else None
    if name is None or not name or _looks_numeric(name) or any(c in name for c in ",=:() \t"):
        return str(number)
    return name


def _looks_numeric(text: str) -> bool:
    return text.isascii() and (text.isdigit() or text[:2].lower() == "0x")


def parse_match_value(kind: str, text: str, ports: PortNames | None) -> tuple[int | None, int]:
    """(value, mask) of a match field of ``kind`` (see parse.MATCH_FIELDS)."""
    if kind == "port":
        return parse_port(text, ports), 0xFFFF
    if kind == "mac":
        addr, slash, mask = text.partition("/")
        return parse_mac(addr), parse_mac(mask) if slash else MAC_MASK
    if kind == "ipv4":
        return _parse_ip_masked(text, 32)
    if kind == "ipv6":
        return _parse_ip_masked(text, 128)
    if kind == "vlan":
        vid = parse_int(text, 0xFFFF)
        if vid == 0xFFFF:  # OVS: dl_vlan=0xffff matches frames without a tag
            return None, FULL_MASK[4]
        if vid > 0xFFF:
            raise ValueError("VLAN id out of range (0..4095, or 0xffff for untagged)")
        return vid, 0xFFF
    if kind == "vlan_tci":
        if parse_int(text.split("/")[0], 0xFFFF) != 0 or "/" in text:
            raise ValueError("only vlan_tci=0x0000 (no tag) is supported; use dl_vlan")
        return None, FULL_MASK[4]
    if kind == "pcp":
        return parse_int(text, 7), 0x7
    if kind == "tos":
        tos = parse_int(text, 255)
        if tos & 3:
            raise ValueError("must be a multiple of 4 (the DSCP bits of the TOS byte)")
        return tos, 0xFC
    if kind == "u8":
        return parse_int(text, 0xFF), 0xFF
    if kind == "icmp":  # an 8-bit ICMP type/code held in the 16-bit tp_src/tp_dst
        return parse_int(text, 0xFF), 0xFFFF
    if kind == "u16":
        return parse_int(text, 0xFFFF), 0xFFFF
    if kind == "u16m":
        value, slash, mask = text.partition("/")
        return parse_int(value, 0xFFFF), parse_int(mask, 0xFFFF) if slash else 0xFFFF
    raise AssertionError(kind)


# ---- actions ------------------------------------------------------------------------

_SIMPLE = {"normal", "flood", "all", "in_port", "drop", "strip_vlan"}
_ALIASES = {"pop_vlan": "strip_vlan"}
_VALUED = {
    "mod_vlan_vid": lambda t, p: parse_int(t, 0xFFF),
    "mod_vlan_pcp": lambda t, p: parse_int(t, 7),
    "mod_dl_src": lambda t, p: parse_mac(t),
    "mod_dl_dst": lambda t, p: parse_mac(t),
    "mod_nw_src": lambda t, p: parse_ipv4(t),
    "mod_nw_dst": lambda t, p: parse_ipv4(t),
    "mod_tp_src": lambda t, p: parse_int(t, 0xFFFF),
    "mod_tp_dst": lambda t, p: parse_int(t, 0xFFFF),
    "output": parse_port,
    "push_vlan": lambda t, p: _parse_tpid(t),
}


def _parse_tpid(text: str) -> int:
    tpid = parse_int(text, 0xFFFF)
    if tpid not in (0x8100, 0x88A8):
        raise ValueError("push_vlan takes 0x8100 or 0x88a8")
    return tpid


def parse_action(text: str, ports: PortNames | None) -> Action:
    """One action item (``output:2``, ``NORMAL``, ``resubmit(,1)`` ...)."""
    if text.isdigit():
        return Action("output", parse_port(text, ports))
    cut = min((i for i in (text.find(":"), text.find("(")) if i >= 0), default=-1)
    if cut < 0:
        name, sep, arg = text, "", ""
    else:
        name, sep = text[:cut], text[cut]
        arg = text[cut + 1 :] if sep == ":" else text[cut:]
    lname = _ALIASES.get(name.lower(), name.lower())
    if lname == "resubmit":
        return Action("resubmit", _parse_resubmit(sep, arg, ports))
    if lname in _SIMPLE:
        if sep:
            raise ValueError(f"{name} takes no argument")
        return Action(lname)
    parser = _VALUED.get(lname)
    if parser is None:
        raise ValueError("unknown action")
    if not sep or not arg:
        raise ValueError(f"{name} needs an argument ({name}:VALUE)")
    return Action(lname, parser(arg, ports))


def _parse_resubmit(sep: str, arg: str, ports: PortNames | None) -> tuple[int | None, int | None]:
    """``resubmit:PORT``, ``resubmit(PORT)``, ``resubmit(,TABLE)``, ``resubmit(PORT,TABLE)``."""
    if sep == ":":
        return parse_port(arg, ports), None
    if sep != "(" or not arg.endswith(")"):
        raise ValueError("expected resubmit(PORT,TABLE) or resubmit:PORT")
    port_s, _, table_s = arg[1:-1].partition(",")
    port = parse_port(port_s.strip(), ports) if port_s.strip() else None
    table = parse_int(table_s, 254) if table_s.strip() else None
    if port is None and table is None:
        raise ValueError("resubmit needs a port or a table")
    return port, table


def format_action(act: Action, ports: PortNames | None) -> str:
    """ovs-ofctl's spelling of one action."""
    kind, arg = act
    if kind in ("normal", "flood", "all", "in_port"):
        return kind.upper()
    if kind == "strip_vlan":
        return kind
    if kind == "output":
        return f"output:{format_port(arg, ports)}"
    if kind in ("mod_dl_src", "mod_dl_dst"):
        return f"{kind}:{format_mac(arg)}"
    if kind in ("mod_nw_src", "mod_nw_dst"):
        return f"{kind}:{format_ipv4(arg)}"
    if kind == "push_vlan":
        return f"push_vlan:0x{arg:04x}"
    if kind == "resubmit":
        port, table = arg
        p = format_port(port, ports) if port is not None else ""
        return f"resubmit:{p}" if table is None else f"resubmit({p},{table})"
    return f"{kind}:{arg}"


def format_actions(actions: tuple[Action, ...], ports: PortNames | None) -> str:
    return ",".join(format_action(a, ports) for a in actions) if actions else "drop"
