"""bench/run.py's scenario 4 over veth: rate against rules, learned MACs and distinct flows.

Each dimension gets fresh switches (one per data path, bench/scen_veth.py's
`pyswitch_path`; bridge with `mac_table_size: 250000`, `mac_aging_time: 3600` and the one
rule `priority=0 actions=NORMAL`), so one dimension's state never weighs on another's.
Its values are set up in ascending order and each is measured `--reps` times, the paths
interleaved, with bench/veth.py's `udp_rate` (64-byte UDP, trafgen flat out, receiver's
rx_packets). Every figure is given as a ratio to the dimension's first value on the
same path.
- flow rules 1, 100, 10,000: `pyswitch replace-flows` with the NORMAL rule and filler
  rules above it that never match the traffic, shaped like an ACL (`priority=1000..1099,
  ip,nw_src=172.16.X.Y actions=drop`, 100 priorities), in ascending order only. (Not
  `add-flows`: adding 9,900 rules to 100 did not return within 3 minutes here, it is
  quadratic in edits.py; nor `replace-flows` back down: 10,000 rules to 1 did not
  return within 120 s.)
- learned MACs 10, 10,000, 100,000: trafgen sends frames with source MACs
  02:55:00:00:00:00 + 0..N-1 at `--learn-pps` (default 10 kpps: every new MAC goes up to
  the Python slow path) to the receiver, up to `--learn-passes` times (3) while pyswitch's gauge
  `pyswitch_bridge_mac_entries` counts under 95 % of N; the case shows the count (the 2
  hosts' MACs included; `fdb-show --json` of 100,000 entries failed on the control socket);
- distinct flows 1, 1,000, 100,000 (the decision cache's worst case): the measured stream
  itself varies its UDP ports with trafgen's per-frame counters, source port over 125 or
  3125 values and destination port over 8 or 32 (coprime periods: 1,000 and 100,000
  distinct port pairs).
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from common import proc_rss_bytes, si, stop_group, summary, tempdir
from report import Row, ratio
from scen_veth import GEN_CPU, pyswitch_path
from veth import FRAME, RX_MAC, SINK_IP, TX_IP, TX_MAC, Setup, udp_rate

SCEN4 = "4 cost growth (veth)"
SETTINGS = {"mac_table_size": 250000, "mac_aging_time": 3600,
            "flows": ["priority=0 actions=NORMAL"]}
TARGETS = {("flow rules", 10000), ("learned MACs", 100000)}


def udp_conf(sport: str = "9", dport: str = "9", sa: str = f"sa={TX_MAC}") -> str:
    """A trafgen packet: 64-byte UDP frame from the sender to the receiver's MAC."""
    return (f"{{ eth(da={RX_MAC}, {sa}), ipv4(saddr={TX_IP}, daddr={SINK_IP}, ttl=64), "
            f"udp(sp={sport}, dp={dport}), fill(0, 18) }}\n")


FLOW_CONFS = {1: udp_conf(),
              1000: udp_conf("dinc(10000, 10124)", "dinc(20000, 20007)"),
              100000: udp_conf("dinc(10000, 13124)", "dinc(20000, 20031)")}


def fillers(start: int, stop: int) -> str:
    return "".join(f"priority={1000 + i % 100},ip,nw_src=172.16.{i >> 8 & 255}.{i & 255} "
                   "actions=drop\n" for i in range(start, stop))


def bridge(s: Setup) -> str:
    return s.tx_ns[:-1] + "br"  # veth.pyswitch_bridge names it <tag>br, namespaces <tag>a/b


def learn(s: Setup, n: int, pps: int, work: Path, passes: int) -> int:
    """Send frames from n distinct source MACs through `s` (again, up to `passes`, while
    the table holds under 95 % of them: a frame the switch dropped taught it nothing);
    the MAC table's size after."""
    conf = work / f"learn{n}.cfg"
    conf.write_text(udp_conf(sa=f"sa=02:55:00:00:00:00, sa=dinc(0, {n - 1})"))
    argv = ["ip", "netns", "exec", s.tx_ns, "taskset", "-c", str(GEN_CPU), "trafgen",
            "--dev", "eth0", "--conf", str(conf), "--cpus", "1", "--no-sock-mem",
            "--notouch-irq", "--no-cpu-stats", "--rate", f"{pps}pps", "-n", str(n)]
    for _ in range(passes):
        gen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        try:
            gen.wait(n / pps + 30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop_group(gen)
        got = int(s.switch.metric("pyswitch_bridge_mac_entries", bridge=bridge(s)))
        if got >= 0.95 * n:
            break
    return got


class Dimension:
    """One dimension: its name, its values and how a switch is brought to a value."""

    def __init__(self, name: str, values: tuple[int, ...], work: Path, args) -> None:
        self.name, self.values, self.work, self.args = name, values, work, args
        self.conf = {v: work / f"{name.replace(' ', '_')}{v}.cfg" for v in values}
        for v, path in self.conf.items():
            path.write_text(FLOW_CONFS[v] if name == "distinct flows" else FLOW_CONFS[1])
        self.state: dict[str, int] = {}
        self.note: dict[tuple[str, int], str] = {}

    def prepare(self, s: Setup, value: int) -> None:
        if self.name == "flow rules":
            have = self.state.get(s.name, 1)
            if value > have:
                f = self.work / f"rules-{s.tx_ns}.txt"
                f.write_text(fillers(0, value - 1) + SETTINGS["flows"][0] + "\n")
                s.switch.ctl("replace-flows", bridge(s), str(f), timeout=300)
                self.state[s.name] = value
        elif self.name == "learned MACs":
            got = learn(s, value, self.args.learn_pps, self.work, self.args.learn_passes)
            self.note[(s.name, value)] = f"fdb {got}"


def run(stack: ExitStack, args, datapaths: tuple[str, ...], rows: list[Row]) -> None:
    work = tempdir(stack)
    dims = [Dimension("flow rules", (1, 100, 10000), work, args),
            Dimension("learned MACs", (10, 10000, 100000), work, args),
            Dimension("distinct flows", (1, 1000, 100000), work, args)]
    for dim in dims:
        with ExitStack() as dstack:
            setups, errors = [], {}
            for dp in datapaths:
                try:
                    setups.append(pyswitch_path(dstack, dp, settings=SETTINGS))
                except RuntimeError as exc:
                    errors[f"pyswitch {dp}"] = str(exc)
            raw: dict[str, dict[int, list[dict]]] = {s.name: {} for s in setups}
            for value in dim.values:
                for s in list(setups):
                    try:
                        dim.prepare(s, value)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        errors[s.name] = f"{dim.name} = {value}: {exc}"
                        setups.remove(s)
                for rep in range(args.reps):
                    for s in setups:
                        try:
                            r = udp_rate(s, dim.conf[value], args.seconds, GEN_CPU)
                        except RuntimeError as exc:
                            errors[s.name] = str(exc)
                            continue
                        raw[s.name].setdefault(value, []).append(r)
                        print(f"  [4] rep {rep + 1} {dim.name} {value} {s.name}: "
                              f"{si(r['rx_pps'], 'pps')}", file=sys.stderr)
            rss = {s.name: proc_rss_bytes(s.switch.proc.pid) for s in setups
                   if s.switch.proc.poll() is None}
        emit(dim, datapaths, raw, errors, rss, rows)


def emit(dim: Dimension, datapaths, raw, errors, rss, rows: list[Row]) -> None:
    for dp in datapaths:
        name = f"pyswitch {dp}"
        runs = raw.get(name, {})
        base = summary(r["rx_pps"] for r in runs.get(dim.values[0], []))
        for value in dim.values:
            row = Row(SCEN4, f"{dim.name}: {value:,}", name)
            got = runs.get(value, [])
            if not got:
                row.error = errors.get(name, "not measured")
            else:
                row.pps = summary(r["rx_pps"] for r in got)
                row.bits = summary(r["rx_pps"] * FRAME * 8 for r in got)
                row.ratios = {f"{dim.values[0]:,} {dim.name.split()[-1]}": ratio(row.pps, base)}
                row.extra = {"offered_pps": summary(r["offered_pps"] for r in got)}
                if (name, value) in dim.note:
                    row.case += f" ({dim.note[(name, value)]})"
            row.extra["baseline"] = value == dim.values[0]
            if (dim.name, value) in TARGETS:
                row.target = ">= 0.9x the smallest case"
                r = next(iter(row.ratios.values()), None)
                row.met = None if r is None else r >= 0.9
            rows.append(row)
        if name in rss:
            label = {"flow rules": "10,000 rules", "learned MACs": "100,000 MACs",
                     "distinct flows": "after 100,000 flows"}[dim.name]
            rows.append(Row(SCEN4, f"resident memory, {label}", name,
                            value=f"{rss[name] / 2**20:.1f} MiB", extra={"rss": rss[name]}))
