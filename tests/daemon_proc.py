"""Run ``pyswitch daemon`` as a real process with its own run directory and database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.switch_proc import ROOT, leftovers, run


class DaemonProcess:
    def __init__(self, workdir: Path, rundir: Path | None = None) -> None:
        self.workdir = workdir
        self.rundir = rundir or workdir / "run"
        self.db = workdir / "conf.yaml"
        self.env = {**os.environ, "PYSWITCH_RUNDIR": str(self.rundir), "PYSWITCH_DB": str(self.db)}
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "daemon.log"
        self.starts = 0

    def start(self, expect_running: bool = True, timeout: float = 30) -> "DaemonProcess":
        self.starts += 1
        logf = open(self.log, "a")
        mark = f"--- start {self.starts}\n"
        logf.write(mark)
        logf.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", "pyswitch", "daemon", "--metrics-port", "0"], stdout=logf,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        logf.close()
        if not expect_running:
            self.proc.wait(timeout)
            return self
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text().split(mark, 1)[1]
            if "running:" in text:
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"daemon not running after {timeout}s:\n{self.log.read_text()}")

    def cli(self, *args: str, check: bool = True, timeout: float = 60, user: str | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "pyswitch", *args]
        if user:
            argv = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *argv]
        r = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=ROOT,
                           timeout=timeout, input=stdin)
        if check and r.returncode != 0:
            raise AssertionError(f"pyswitch {' '.join(args)} exited {r.returncode}: {r.stderr}")
        return r

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def open_rundir():
    """A run directory that unprivileged users can traverse (pytest's tmp_path is 0700)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="pyswitch-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path, prefix):
    d = DaemonProcess(tmp_path)
    try:
        yield d
    finally:
        d.stop(signal.SIGKILL if d.proc is not None and d.proc.poll() is None else signal.SIGTERM)
        for name in leftovers(prefix):
            run("ip", "netns", "del", name, check=False)
            run("ip", "link", "del", name, check=False)
