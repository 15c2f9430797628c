"""Shared pieces of the benchmarks: processes, pyswitch, repeated runs, the table, JSON.

Contracts
- Every helper that starts something registers its undo on a `contextlib.ExitStack` the
  caller owns (`main()` of each bench), so a failure or Ctrl-C (SIGINT, and SIGTERM, which
  `guard_signals` turns into KeyboardInterrupt) still removes every process, namespace,
  link, socket and temporary directory.
- `summary(values)` is the median with its range; `table()` formats one fixed-width table;
  `save()` writes `bench/out/<name>-<UTC stamp>.json` and returns the path.
- Rates: pps counts frames; bits/s is pps x frame bytes x 8 (the frame as the generator
  built it, without preamble, inter-frame gap or FCS).
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PYSWITCH = ROOT / ".venv" / "bin" / "pyswitch"


def tag() -> str:
    """A short random name prefix (`pst` + 4 hex), so parallel runs never collide."""
    return "pst" + secrets.token_hex(2)


def guard_signals() -> None:
    """Make SIGTERM behave like Ctrl-C, so `finally` blocks run on either."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)


def run(*argv: str, check: bool = True, timeout: float = 30) -> str:
    """Run a command, return its stdout; RuntimeError with stderr if it fails and `check`."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def need(*programs: str) -> None:
    """Fail at once, naming the program, when a peer program is not installed."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise SystemExit(f"missing programs: {', '.join(missing)} (see bench/README.md)")


def tempdir(stack: ExitStack) -> Path:
    """A world-traversable temporary directory, removed when the stack unwinds."""
    path = Path(tempfile.mkdtemp(prefix="pyswitch-bench-", dir="/tmp"))
    path.chmod(0o755)
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM (then SIGKILL after `grace` seconds) one process we started; reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after 5 s; reap `proc`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait(5)


def spawn(stack: ExitStack, argv: list[str], **kw: Any) -> subprocess.Popen:
    """Start a process whose stop is registered on `stack`."""
    proc = subprocess.Popen(argv, **kw)
    stack.callback(stop_process, proc)
    return proc


class Pyswitch:
    """`pyswitch up` of a topology (a dict) with its own run directory.

    `start()` returns once pyswitch logged "running:" (RuntimeError with its log if it
    exits or takes over `timeout` s). `stop()` sends SIGTERM, which makes pyswitch remove
    its links and namespaces; it is registered on the stack given to the constructor.
    `cpu` pins the process (taskset) when not None. `datapath` (auto, compiled, python) is
    passed as `--datapath`; `extra` are more `pyswitch up` options (e.g. `--pmd`).
    After start, `active_datapath` is what pyswitch's log says runs ("datapath: X").
    """

    def __init__(self, stack: ExitStack, topology: dict, cpu: int | None = None,
                 datapath: str | None = None, extra: tuple[str, ...] = ()) -> None:
        self.dir = tempdir(stack)
        self.env = {**os.environ, "PYSWITCH_RUNDIR": str(self.dir / "run")}
        self.yaml = self.dir / "topology.yaml"
        self.yaml.write_text(yaml.safe_dump(topology))
        self.log = self.dir / "pyswitch.log"
        self.cpu, self.datapath, self.extra = cpu, datapath, extra
        self.active_datapath: str | None = None
        self.proc: subprocess.Popen | None = None
        stack.callback(self.stop)

    def start(self, timeout: float = 30) -> Pyswitch:
        argv = [str(PYSWITCH), "up", str(self.yaml), "--metrics-port", "0", *self.extra]
        if self.datapath is not None:
            argv += ["--datapath", self.datapath]
        if self.cpu is not None:
            argv = ["taskset", "-c", str(self.cpu), *argv]
        with open(self.log, "w") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if "running:" in text:
                found = re.search(r"datapath: (\w+)", text)
                self.active_datapath = found.group(1) if found else None
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"pyswitch exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"pyswitch not running after {timeout}s:\n{self.log.read_text()}")

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """Run a pyswitch client verb (`add-flows BR FILE`, `fdb-show --json BR`, ...)
        against this instance's control socket; its stdout."""
        r = subprocess.run([str(PYSWITCH), *args], capture_output=True, text=True,
                           env=self.env, timeout=timeout, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"pyswitch {' '.join(args)} exited {r.returncode}: "
                               f"{(r.stderr or r.stdout).strip()[-500:]}")
        return r.stdout

    def metric(self, name: str, **labels: str) -> float:
        """One sample of pyswitch's /metrics (the address its log gave), by name and labels;
        RuntimeError if absent. (fdb-show of a 100,000-entry table fails on the control
        socket; the gauge does not.)"""
        found = re.search(r"metrics: serving (http://\S+)", self.log.read_text())
        if not found:
            raise RuntimeError("pyswitch's log names no metrics address")
        with urllib.request.urlopen(found.group(1), timeout=30) as reply:
            text = reply.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            head, _, value = line.rpartition(" ")
            if head.startswith(name + "{") and all(p in head for p in want.split(",")):
                return float(value)
        raise RuntimeError(f"no {name}{{{want}}} in pyswitch's metrics")

    def port_stats(self) -> dict[str, dict]:
        """`pyswitch port-stats --json`: {port name: {"rx_packets": ..., "drops": {...}}}."""
        return json.loads(self.ctl("port-stats", "--json", timeout=30))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=15)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid: int) -> int:
    """VmRSS of a process, in bytes (RuntimeError when /proc has no such line)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def summary(values: Iterable[float]) -> dict[str, Any]:
    """{"median", "min", "max", "runs": [...]} of the values (None for each when empty)."""
    vals = list(values)
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}


def _scale(value: float) -> tuple[float, str]:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return scale, prefix
    return 1.0, ""


def si(value: float, unit: str) -> str:
    """1234567, "pps" -> '1.23 Mpps'."""
    scale, prefix = _scale(value)
    return f"{value / scale:.3g} {prefix}{unit}"


def fmt(s: dict[str, Any], unit: str) -> str:
    """'median (min-max)', the range in the median's unit: '1.23 Mpps (1.1-1.4)'."""
    scale, _ = _scale(s["median"])
    lo, hi = s["min"] / scale, s["max"] / scale
    return f"{si(s['median'], unit)} ({_num(lo)}-{_num(hi)})"


def _num(x: float) -> str:
    """Three significant digits, never in exponent notation."""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg()}


def save(name: str, data: dict[str, Any]) -> Path:
    """Write `data` as bench/out/<name>-<stamp>.json and <name>-latest.json; the first path."""
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = OUT / f"{name}-{stamp}.json"
    text = json.dumps(data, indent=2)
    path.write_text(text)
    (OUT / f"{name}-latest.json").write_text(text)
    return path
