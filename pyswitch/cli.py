"""The ``pyswitch`` command line, in the spirit of ovs-vsctl, ovs-ofctl and ovs-appctl.

Running the switch:
  ``up [TOPOLOGY.yaml]``  foreground switch from a file (the embedded default without one)
  ``daemon``             the long-running switch with a saved configuration database
Talking to it (through the control socket, ``$PYSWITCH_RUNDIR/pyswitch.ctl``):
  ``add-br``, ``del-br``, ``list-br``, ``br-exists``, ``add-port``, ``del-port``, ``list-ports``,
  ``set-port``, ``set-bridge``, ``set TABLE NAME COL=VAL...``, ``show``, ``fdb-show``,
  ``fdb-flush``, ``port-stats``, ``apply``, ``export``.  ``--json`` on every read verb.
Offline: ``check FILE``, ``show-default``.

Like ovs-vsctl, commands chained with a bare ``--`` run as one transaction:
``pyswitch add-port br0 p -- set Interface p type=dpdkvhostuserclient options:vhost-server-path=/x``

Exit status: 0 success; 1 failure; 2 bad input or no such bridge/port (as ovs-vsctl).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__, cli_format
from .config import ConfigError, SwitchConfig
from .control import ControlError, call, control_path, default_rundir
from .logfmt import setup_logging
from .topology import (
    default_topology_text,
    dump_topology,
    load_topology,
    load_topology_data,
    load_topology_text,
)

log = logging.getLogger("pyswitch")

PORT_COLUMNS = ("type", "tag", "trunks", "vlan_mode")
DEFAULT_DB = "/var/lib/pyswitch/conf.yaml"
MUTATING = {"add-br", "del-br", "add-port", "del-port", "set-port", "set-bridge", "set",
            "add-flow", "add-flows", "del-flows", "mod-flows", "replace-flows"}


class UsageError(Exception):
    pass


def _load(path: str | None) -> SwitchConfig:
    if path is None:
        return load_topology_text(default_topology_text(), "<default topology>")
    return load_topology(path)


def _pairs(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{item!r}: expected KEY=VALUE")
        out.append((key, value))
    return out


def _port_settings(items: Sequence[str]) -> dict[str, str]:
    """Column-style settings: type/tag/trunks/vlan_mode, options:K=V; any other K=V is an
    option (``mtu_request`` is the ``mtu`` option)."""
    settings: dict[str, str] = {}
    for key, value in _pairs(items):
        if key == "mtu_request":
            key = "options:mtu"
        elif key not in PORT_COLUMNS and not key.startswith("options:"):
            key = f"options:{key}"
        settings[key] = value
    return settings


# -- running the switch ---------------------------------------------------------------------

def _how_to_reach(cfg: SwitchConfig) -> list[str]:
    """Lines telling the operator how to reach the hosts the topology declares."""
    hosts: list[tuple[str, str]] = []
    lines: list[str] = []
    has_tap = False
    for br in cfg.bridges.values():
        for p in br.ports.values():
            addr = p.options.get("peer-address", "").split(",")[0].split("/")[0]
            if p.type == "veth" and p.options.get("netns") and addr:
                hosts.append((p.options["netns"], addr))
                lines.append(f"  host in namespace {p.options['netns']}: {addr} (port {p.name}, bridge {br.name})")
            host_addr = p.options.get("address", "").split(",")[0].split("/")[0]
            if p.type == "tap" and host_addr:
                has_tap = True
                lines.append(f"  this host: {host_addr} on TAP {p.name} (bridge {br.name})")
    if len(hosts) >= 2:
        lines.append(f"Try: ip netns exec {hosts[0][0]} ping {hosts[1][1]}")
    if hosts and has_tap:
        lines.append(f"     ping {hosts[0][1]}   (from this host, through the TAP port)")
    return lines


def _run_daemon(args: argparse.Namespace, initial: SwitchConfig | None, db: Path | None) -> int:
    from . import fastpath
    from .daemon import Daemon  # late import: keeps the client verbs light
    from .db import DatabaseError
    from .port import PortError

    override: dict[str, Any] = {}
    if args.no_metrics:
        override["enabled"] = False
    if args.metrics_address is not None:
        override["address"] = args.metrics_address
    if args.metrics_port is not None:
        override["port"] = args.metrics_port
    try:
        fastpath.select(args.datapath)
    except fastpath.DatapathError as exc:
        log.error("%s", exc)
        return 1
    d = Daemon(args.rundir, db, getattr(args, "control_group", None), override, pmd=args.pmd)
    d.switch.loop.install_signal_handlers()  # a SIGTERM while starting stops it cleanly after
    try:
        d.start(initial)
    except (DatabaseError, ControlError, PortError, OSError) as exc:
        log.error("%s", exc)
        d.close()
        return 1
    try:
        log.info("pyswitch %s running: %d bridge(s), %d port(s); control socket %s",
                 __version__, len(d.cfg.bridges), len(d.switch.port_names()), d.control.path)
        for line in _how_to_reach(d.cfg):
            print(line, flush=True)
        d.run()
        log.info("stopping: removing ports")
        for name in d.switch.port_names():
            c = d.switch.port(name).counters
            drops = ",".join(f"{k}={v}" for k, v in sorted(c.drops.items())) or "none"
            log.info("port %s: rx_packets=%d rx_bytes=%d tx_packets=%d tx_bytes=%d drops: %s",
                     name, c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes, drops)
    finally:
        d.close()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    return _run_daemon(args, _load(args.topology), None)


def cmd_daemon(args: argparse.Namespace) -> int:
    return _run_daemon(args, None, Path(args.db))


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.topology)
    n = sum(len(b.ports) for b in cfg.bridges.values())
    print(f"{args.topology}: OK ({len(cfg.bridges)} bridge(s), {n} port(s))")
    return 0


def cmd_show_default(args: argparse.Namespace) -> int:
    sys.stdout.write(default_topology_text())
    return 0


# -- client verbs ---------------------------------------------------------------------------

def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The control request of a parsed mutating verb."""
    v = args.verb
    if v == "add-br":
        return v, {"bridge": args.bridge, "may_exist": args.may_exist,
                   "settings": dict(_pairs(args.settings))}
    if v == "del-br":
        return v, {"bridge": args.bridge, "if_exists": args.if_exists}
    if v == "add-port":
        names = [n for n in args.names if "=" not in n]
        if len(names) not in (1, 2):
            raise UsageError("add-port takes [BRIDGE] PORT [KEY=VALUE ...]")
        settings = _port_settings([n for n in args.names if "=" in n] + args.option)
        if args.type:
            settings["type"] = args.type
        return v, {"bridge": names[0] if len(names) == 2 else None, "port": names[-1],
                   "may_exist": args.may_exist, "settings": settings}
    if v == "del-port":
        names = args.names
        if len(names) not in (1, 2):
            raise UsageError("del-port takes [BRIDGE] PORT")
        return v, {"bridge": names[0] if len(names) == 2 else None, "port": names[-1],
                   "if_exists": args.if_exists}
    if v == "set-port":
        return v, {"port": args.port, "settings": _port_settings(args.settings)}
    if v == "set-bridge":
        return v, {"bridge": args.bridge, "settings": dict(_pairs(args.settings))}
    if v == "set":
        table = args.table.lower()
        if table in ("port", "interface"):
            return "set-port", {"port": args.record, "settings": _port_settings(args.settings)}
        if table == "bridge":
            return "set-bridge", {"bridge": args.record, "settings": dict(_pairs(args.settings))}
        raise UsageError(f"set: unknown table {args.table!r} (Bridge, Port or Interface)")
    if v == "add-flow":
        return v, {"bridge": args.bridge, "flow": args.flow}
    if v in ("add-flows", "replace-flows"):
        return v, {"bridge": args.bridge, "flows": _flow_file(args.file)}
    if v in ("del-flows", "mod-flows"):
        return v, {"bridge": args.bridge, "flow": args.flow, "strict": args.strict}
    raise UsageError(f"{v} cannot be chained")


def _flow_file(path: str) -> list[str]:
    """Flow strings from a file (``-``: standard input), one a line; # comments."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _print(args: argparse.Namespace, data: Any, text: Any) -> None:
    """``data`` as JSON with --json, else ``text`` (a string, or a function of data)."""
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text(data) if callable(text) else text)


def cmd_read(args: argparse.Namespace) -> int:
    v = args.verb
    path = control_path(args.rundir)
    if v == "list-br":
        data = call("list-br", path=path)
        _print(args, data, "\n".join(data))
    elif v == "br-exists":
        call("br-exists", {"bridge": args.bridge}, path=path)
    elif v == "list-ports":
        data = call("list-ports", {"bridge": args.bridge}, path=path)
        _print(args, data, "\n".join(data))
    elif v == "show":
        data = call("show", path=path)
        _print(args, data, cli_format.show(data))
    elif v in ("fdb-show", "fdb/show"):
        data = call("fdb-show", {"bridge": args.bridge}, path=path)
        _print(args, data, cli_format.fdb(data))
    elif v in ("fdb-flush", "fdb/flush"):
        data = call("fdb-flush", {"bridge": args.bridge}, path=path)
        _print(args, data, "table successfully flushed")
    elif v in ("port-stats", "dump-ports"):
        data = call("port-stats", {"bridge": args.bridge, "port": args.port}, path=path)
        _print(args, data, cli_format.port_stats(data))
    elif v == "dump-flows":
        data = call("dump-flows", {"bridge": args.bridge, "filter": args.flow, "json": args.json}, path=path)
        _print(args, data, "\n".join)
    elif v == "export":
        text = dump_topology(load_topology_text(json.dumps(call("export", path=path)), "<daemon>"))
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    _, raw = load_topology_data(args.topology)  # validated here first, with file and line
    result = call("apply", {"config": raw, "dry_run": args.dry_run},
                  path=control_path(args.rundir))
    changes = result["changes"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        prefix = "would " if args.dry_run else ""
        for c in changes:
            print(f"{prefix}{c}")
        if not changes:
            print("no changes: the switch already matches the file")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyswitch", description="A software virtual switch in Python.",
                                epilog="Chain commands with a bare -- to run them as one transaction.")
    p.add_argument("--version", action="version", version=f"pyswitch {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--rundir", type=Path, default=None,
                   help="run directory with the control socket (default $PYSWITCH_RUNDIR or /run/pyswitch)")
    p.add_argument("--json", action="store_true", help="JSON output for read verbs")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    def verb(name: str, help_text: str, func: Any, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, aliases=list(aliases))
        sp.set_defaults(func=func)
        if func in (cmd_read, cmd_apply):  # --json is accepted after the verb too
            sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
        return sp

    up = verb("up", "run the switch in the foreground from a YAML topology", cmd_up)
    up.add_argument("topology", nargs="?", help="topology file (default: the embedded default)")
    d = verb("daemon", "run the switch with a saved configuration database", cmd_daemon)
    d.add_argument("--db", default=os.environ.get("PYSWITCH_DB", DEFAULT_DB),
                   help=f"configuration database (default $PYSWITCH_DB or {DEFAULT_DB})")
    d.add_argument("--control-group", help="group allowed to use the control socket (default: root only)")
    for sp in (up, d):
        sp.add_argument("--metrics-address", help="serve /metrics on this address (overrides the configuration)")
        sp.add_argument("--metrics-port", type=int, help="serve /metrics on this port (0: any free port)")
        sp.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
        sp.add_argument("--datapath", choices=("auto", "compiled", "python"),
                        default=os.environ.get("PYSWITCH_DATAPATH", "auto"),
                        help="the compiled fast path, the Python one, or auto: compiled when it is "
                             "built, else python with a warning (default $PYSWITCH_DATAPATH or auto)")
        sp.add_argument("--pmd", action="store_true",
                        help="poll every port without sleeping, as OVS-DPDK's PMD threads: lowest "
                             "latency, one core always busy (default: sleep when idle)")
    verb("check", "validate a YAML topology without creating anything", cmd_check).add_argument("topology")
    verb("show-default", "print the embedded default topology", cmd_show_default)

    ab = verb("add-br", "add a bridge", None)
    ab.add_argument("bridge")
    ab.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="mac_aging_time, mac_table_size, fail_mode")
    ab.add_argument("--may-exist", action="store_true")
    db = verb("del-br", "delete a bridge and its ports", None)
    db.add_argument("bridge")
    db.add_argument("--if-exists", action="store_true")
    ap = verb("add-port", "add a port: [BRIDGE] PORT [KEY=VALUE ...]", None)
    ap.add_argument("names", nargs="+", metavar="[BRIDGE] PORT [KEY=VALUE]")
    ap.add_argument("--type", help="dpdkvhostuser, dpdkvhostuserclient, tap, veth, memory")
    ap.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a port option, or tag/trunks/vlan_mode (repeatable)")
    ap.add_argument("--may-exist", action="store_true")
    dp = verb("del-port", "delete a port: [BRIDGE] PORT", None)
    dp.add_argument("names", nargs="+", metavar="[BRIDGE] PORT")
    dp.add_argument("--if-exists", action="store_true")
    spt = verb("set-port", "change a port: PORT KEY=VALUE ...", None)
    spt.add_argument("port")
    spt.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    sb = verb("set-bridge", "change a bridge: BRIDGE KEY=VALUE ...", None)
    sb.add_argument("bridge")
    sb.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    st = verb("set", "ovs-vsctl style: set Bridge|Port|Interface NAME COL=VALUE ...", None)
    st.add_argument("table")
    st.add_argument("record")
    st.add_argument("settings", nargs="+", metavar="COL=VALUE")

    verb("list-br", "list bridges", cmd_read)
    verb("br-exists", "exit 0 if the bridge exists, 2 if not", cmd_read).add_argument("bridge")
    verb("list-ports", "list a bridge's ports", cmd_read).add_argument("bridge")
    verb("show", "bridges, ports, types, options and link state", cmd_read)
    verb("fdb-show", "a bridge's MAC table", cmd_read, ["fdb/show"]).add_argument("bridge")
    verb("fdb-flush", "empty MAC tables", cmd_read, ["fdb/flush"]).add_argument("bridge", nargs="?")
    ps = verb("port-stats", "per-port counters", cmd_read, ["dump-ports"])
    ps.add_argument("bridge", nargs="?")
    ps.add_argument("port", nargs="?")
    af = verb("add-flow", "add a flow rule (ovs-ofctl syntax)", None)
    af.add_argument("bridge")
    af.add_argument("flow")
    for name, help_text in (("add-flows", "add the flow rules of a file (- for stdin)"),
                            ("replace-flows", "make the bridge's rules those of a file")):
        fl = verb(name, help_text, None)
        fl.add_argument("bridge")
        fl.add_argument("file")
    dfl = verb("del-flows", "delete flow rules (all, or those a match selects)", None)
    dfl.add_argument("bridge")
    dfl.add_argument("flow", nargs="?", default="")
    dfl.add_argument("--strict", action="store_true", help="match and priority must be identical")
    mf = verb("mod-flows", "change the actions of the rules a match selects", None)
    mf.add_argument("bridge")
    mf.add_argument("flow")
    mf.add_argument("--strict", action="store_true")
    dpf = verb("dump-flows", "list a bridge's flow rules with their counters", cmd_read)
    dpf.add_argument("bridge")
    dpf.add_argument("flow", nargs="?", default="")
    ex = verb("export", "print the running configuration as a YAML topology", cmd_read)
    ex.add_argument("-o", "--output", help="write to this file instead")
    a = verb("apply", "make the running switch match a YAML topology", cmd_apply)
    a.add_argument("topology")
    a.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    return p


def _split_chain(argv: list[str]) -> list[list[str]]:
    chain: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            chain.append([])
        else:
            chain[-1].append(arg)
    return [c for c in chain if c]


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but KEY=VALUE words may also follow options (``add-port br0 p --type
    memory tag=7``), as ovs-vsctl allows."""
    args, extra = parser.parse_known_args(argv)
    if len(extra) == 1 and getattr(args, "flow", None) == "" and not extra[0].startswith("-"):
        args.flow, extra = extra[0], []  # `del-flows BR --strict FLOW`: FLOW after an option
    if extra:
        target = "names" if hasattr(args, "names") else "settings"
        if not hasattr(args, target) or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, target).extend(extra)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    segments = _split_chain(list(sys.argv[1:] if argv is None else argv)) or [[]]
    args = _parse(parser, segments[0])
    setup_logging(args.log_level)
    if args.rundir is not None:  # port types (vhost-user sockets) read it from the environment
        os.environ["PYSWITCH_RUNDIR"] = str(args.rundir)
    args.rundir = args.rundir or default_rundir()
    try:
        if args.verb in MUTATING or len(segments) > 1:
            steps = [request_of(args)]
            for seg in segments[1:]:
                more = _parse(parser, seg)
                if more.verb not in MUTATING:
                    raise UsageError(f"{more.verb} cannot be chained with --")
                steps.append(request_of(more))
            path = control_path(args.rundir)
            if len(steps) == 1:
                call(steps[0][0], steps[0][1], path=path)
            else:
                call("transaction", {"commands": [list(s) for s in steps]}, path=path)
            return 0
        return int(args.func(args))
    except ConfigError as exc:
        print(f"pyswitch: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"pyswitch: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        if str(exc):
            print(f"pyswitch: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
