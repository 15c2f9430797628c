"""Run ``pyswitch up TOPOLOGY`` as a real process for end-to-end tests, and always stop it.

``SwitchProcess.start(yaml_text)`` writes the file, starts the process, waits for its
"running" log line (or fails with its stderr), and ``stop()`` sends SIGTERM and checks
that it exits cleanly.  The fixture ``pyswitch_up`` stops every process it started and
removes any namespace or link left with the test's unique prefix, even on failure.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def ns_exec(ns: str, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return run("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)


def ns_python(ns: str, module_args: list[str]) -> list[str]:
    """argv to run ``python -m tests.nsprobe ...`` inside ``ns``."""
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.nsprobe", *module_args]


class SwitchProcess:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "pyswitch.log"
        self.rundir = workdir / "run"
        #: the environment of the switch and of CLI calls to it: its own run directory
        self.env = {**os.environ, "PYSWITCH_RUNDIR": str(self.rundir)}

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``pyswitch ARGS`` against this switch."""
        r = subprocess.run([sys.executable, "-m", "pyswitch", *args], capture_output=True, text=True,
                           env=self.env, cwd=ROOT, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"pyswitch {' '.join(args)} exited {r.returncode}: {r.stderr}")
        return r

    def start(self, topology: str, timeout: float = 30, args: Sequence[str] = ()) -> "SwitchProcess":
        """Run ``pyswitch up`` on ``topology`` (YAML text) with extra ``args``; return once
        it is running."""
        path = self.workdir / "topology.yaml"
        path.write_text(topology)
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyswitch", "up", str(path), "--metrics-port", "0", *args],
            stdout=self._logf, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if "running:" in text:
                self.metrics_url = _metrics_url(text)
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"pyswitch up exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"pyswitch up not running after {timeout}s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 15) -> str:
        """SIGTERM, wait, and return the whole log; fail if the exit was not clean."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"pyswitch did not stop on SIGTERM:\n{self.log.read_text()}")
        self._logf.close()
        text = self.log.read_text()
        assert self.proc.returncode == 0, f"exit status {self.proc.returncode}:\n{text}"
        return text


def _metrics_url(log: str) -> str | None:
    for line in log.splitlines():
        if "metrics: serving " in line:
            return line.split("metrics: serving ", 1)[1].strip()
    return None


def leftovers(prefix: str) -> list[str]:
    """Namespaces and root-namespace links whose names start with ``prefix``."""
    names = [line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line]
    links = [line.split()[0].split("@")[0] for line in run("ip", "-br", "link").stdout.splitlines()]
    return [n for n in names + links if n.startswith(prefix)]


@pytest.fixture
def prefix() -> str:
    """A unique name prefix for this test's namespaces and links (<= 7 characters)."""
    return "pst" + secrets.token_hex(2)


@pytest.fixture
def pyswitch_up(tmp_path, prefix):
    """Start ``pyswitch up`` on a topology text; stopped and cleaned up after the test."""
    if os.geteuid() != 0:  # say so instead of failing obscurely
        pytest.fail("end-to-end tests need root (network namespaces, veth, TAP)")
    started: list[SwitchProcess] = []

    def start(topology: str, args: Sequence[str] = ()) -> SwitchProcess:
        sp = SwitchProcess(tmp_path)
        started.append(sp)
        return sp.start(topology, args=args)

    yield start
    for sp in started:
        if sp.proc is not None and sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait()
    for name in leftovers(prefix):  # a safety net: the switch should have removed them
        run("ip", "netns", "del", name, check=False)
        run("ip", "link", "del", name, check=False)
