"""The ``pyswitch`` command line.

Verbs so far:

* ``pyswitch up [TOPOLOGY.yaml]`` -- run the switch in the foreground with the bridges and
  ports the file declares (the embedded default topology without a file); Ctrl-C or
  SIGTERM tears down every link and namespace it created.
* ``pyswitch check TOPOLOGY.yaml`` -- validate a file without creating anything.
* ``pyswitch show-default`` -- print the embedded default topology.

Exit status: 0 on success, 1 on a runtime failure, 2 on bad input (arguments, files).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from . import __version__
from .config import ConfigError, SwitchConfig
from .logfmt import setup_logging
from .port import PortError
from .topology import default_topology_text, load_topology, load_topology_text

log = logging.getLogger("pyswitch")


def _load(path: str | None) -> SwitchConfig:
    if path is None:
        return load_topology_text(default_topology_text(), "<default topology>")
    return load_topology(path)


def _how_to_reach(cfg: SwitchConfig) -> list[str]:
    """Lines telling the operator how to reach the hosts the topology declares."""
    hosts: list[tuple[str, str]] = []  # (namespace, first address)
    lines: list[str] = []
    for br in cfg.bridges.values():
        for p in br.ports.values():
            addr = p.options.get("peer-address", "").split(",")[0].split("/")[0]
            if p.type == "veth" and p.options.get("netns") and addr:
                hosts.append((p.options["netns"], addr))
                lines.append(f"  host in namespace {p.options['netns']}: {addr} (port {p.name}, bridge {br.name})")
            host_addr = p.options.get("address", "").split(",")[0].split("/")[0]
            if p.type == "tap" and host_addr:
                lines.append(f"  this host: {host_addr} on TAP {p.name} (bridge {br.name})")
    if len(hosts) >= 2:
        lines.append(f"Try: ip netns exec {hosts[0][0]} ping {hosts[1][1]}")
    if hosts and any(p.type == "tap" and p.options.get("address")
                     for br in cfg.bridges.values() for p in br.ports.values()):
        lines.append(f"     ping {hosts[0][1]}   (from this host, through the TAP port)")
    return lines


def cmd_up(args: argparse.Namespace) -> int:
    from .switch import Switch  # imported late: keeps `pyswitch check` light

    cfg = _load(args.topology)
    sw = Switch()
    try:
        sw.build(cfg)
    except PortError as exc:
        log.error("cannot build the topology: %s", exc)
        return 1
    try:
        sw.loop.install_signal_handlers()
        n_ports = len(sw.port_names())
        log.info("pyswitch %s running: %d bridge(s), %d port(s); Ctrl-C to stop",
                 __version__, len(cfg.bridges), n_ports)
        for line in _how_to_reach(cfg):
            print(line, flush=True)
        sw.run()
        log.info("stopping: removing ports")
        for name in sw.port_names():
            c = sw.port(name).counters
            drops = ",".join(f"{k}={v}" for k, v in sorted(c.drops.items())) or "none"
            log.info("port %s: rx_packets=%d rx_bytes=%d tx_packets=%d tx_bytes=%d drops: %s",
                     name, c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes, drops)
    finally:
        sw.close()
        sw.loop.close()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.topology)
    n = sum(len(b.ports) for b in cfg.bridges.values())
    print(f"{args.topology}: OK ({len(cfg.bridges)} bridge(s), {n} port(s))")
    return 0


def cmd_show_default(args: argparse.Namespace) -> int:
    sys.stdout.write(default_topology_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyswitch", description="A software virtual switch in Python.")
    p.add_argument("--version", action="version", version=f"pyswitch {__version__}")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="log verbosity (stderr)")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    up = sub.add_parser("up", help="run the switch in the foreground from a YAML topology")
    up.add_argument("topology", nargs="?", help="topology file (default: the embedded default)")
    up.set_defaults(func=cmd_up)
    chk = sub.add_parser("check", help="validate a YAML topology without creating anything")
    chk.add_argument("topology")
    chk.set_defaults(func=cmd_check)
    sd = sub.add_parser("show-default", help="print the embedded default topology")
    sd.set_defaults(func=cmd_show_default)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"pyswitch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
