"""DPDK testpmd as a real peer: start it with given vdevs, drive it on stdin, parse its counters.

API
- `Testpmd(vdevs, forward_mode="io", lcores="0@0,1@1", ...)`: a context manager. Entering starts
  `dpdk-testpmd -i` (no PCI, no hugepages, a unique `--file-prefix`) and waits for its first prompt;
  leaving always kills it and removes its runtime directory (/var/run/dpdk/<prefix>) and the socket
  files named in `cleanup_paths`. `dpdk-testpmd` missing raises `PeerMissingError` ("install
  dpdk-dev").
- `.command(text, timeout) -> str`: send one interactive command ("start", "start tx_first 8",
  "stop", ...) and return what testpmd printed before its next prompt.
- `.port_stats() -> dict[int, PortStats]`: `show port stats all`, parsed.
- `.output() -> str`: everything testpmd printed so far (stdout and stderr), for failure messages.

CPU: the forwarding lcore spins on its CPU once forwarding starts ("start"); with `lcores="0@0,1@1"`
the main lcore (asleep in the command line) shares CPU 0 with everything else and CPU 1 is the
forwarding core. testpmd's stdout is a pipe: it runs under `stdbuf -oL` so lines arrive at once.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.peers.missing import require_binary

TESTPMD_PACKAGE = "dpdk-dev"
PROMPT = "testpmd> "
_STATS_BLOCK = re.compile(r"NIC statistics for port (\d+)\s*#+(.*?)#{20,}", re.S)
_COUNTER = re.compile(r"([A-Za-z]+-[a-z]+):\s+(\d+)")


@dataclass(frozen=True)
class PortStats:
    """One port's counters from `show port stats all` (testpmd's names, lower-cased, '-' -> '_')."""

    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Parse `show port stats all` output into {port id: PortStats}; ValueError if no port block."""
    ports: dict[int, PortStats] = {}
    for match in _STATS_BLOCK.finditer(text):
        values = {k.lower().replace("-", "_"): int(v) for k, v in _COUNTER.findall(match.group(2))}
        ports[int(match.group(1))] = PortStats(
            **{f: values[f] for f in PortStats.__dataclass_fields__}
        )
    if not ports:
        raise ValueError(f"no port statistics in testpmd output: {text!r}")
    return ports


class Testpmd:
    """One interactive dpdk-testpmd process; see the module docstring for the contract."""

    __test__ = False  # not a pytest test class despite its name

    def __init__(
        self,
        vdevs: list[str],
        forward_mode: str = "io",
        lcores: str = "0@0,1@1",
        mem_mb: int = 512,
        mbufs: int = 8192,
        app_args: tuple[str, ...] = (),
        cleanup_paths: tuple[Path, ...] = (),
        start_timeout: float = 30.0,
    ) -> None:
        self.prefix = "pst" + secrets.token_hex(4)
        binary = require_binary("dpdk-testpmd", TESTPMD_PACKAGE)
        self.argv = [
            binary,
            "--lcores",
            lcores,
            "--no-pci",
            "--no-huge",
            "-m",
            str(mem_mb),
            f"--file-prefix={self.prefix}",
        ]
        for vdev in vdevs:
            self.argv += ["--vdev", vdev]
        self.argv += [
            "--",
            "-i",
            "--nb-cores=1",
            f"--forward-mode={forward_mode}",
            f"--total-num-mbufs={mbufs}",
            *app_args,
        ]
        self.cleanup_paths = cleanup_paths
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Testpmd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Launch testpmd, wait for its first prompt; on failure stop it, raise RuntimeError."""
        stdbuf = shutil.which("stdbuf")
        argv = [stdbuf, "-oL", *self.argv] if stdbuf else self.argv
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._read, name=f"testpmd-{self.prefix}", daemon=True
        )
        self._reader.start()
        try:
            self._wait_prompt(0, self.start_timeout)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self._cond:
                self._buf += chunk
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait_prompt(self, start: int, timeout: float) -> int:
        """Wait for a prompt at/after byte `start`; its offset.  RuntimeError on exit/timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._buf.find(PROMPT.encode(), start)
                if found >= 0:
                    return found
                assert self._proc is not None
                left = deadline - time.monotonic()
                if self._proc.poll() is not None or left <= 0:
                    why = "exited" if self._proc.poll() is not None else f"no prompt in {timeout}s"
                    raise RuntimeError(
                        f"dpdk-testpmd {why}: {' '.join(self.argv)}\n{self.output()[-3000:]}"
                    )
                self._cond.wait(min(left, 0.5))

    def command(self, text: str, timeout: float = 10.0) -> str:
        """Send one command line; return the reply (text before the next prompt, echo removed)."""
        assert self._proc is not None and self._proc.stdin is not None
        with self._cond:
            mark = len(self._buf)
        self._proc.stdin.write(text.encode() + b"\n")
        self._proc.stdin.flush()
        end = self._wait_prompt(mark, timeout)
        with self._cond:
            reply = self._buf[mark:end].decode(errors="replace")
        first, _, rest = reply.partition("\n")
        return rest if first.strip() == text.strip() else reply

    def port_stats(self) -> dict[int, PortStats]:
        """The counters of every port (`show port stats all`)."""
        return parse_port_stats(self.command("show port stats all"))

    def output(self) -> str:
        """Everything testpmd printed so far."""
        with self._cond:
            return self._buf.decode(errors="replace")

    def stop(self) -> None:
        """Quit (or kill) testpmd and remove its runtime files; safe to call more than once."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(b"stop\nquit\n")
                proc.stdin.flush()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait(timeout=5)
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        for runtime in self.runtime_dirs():
            shutil.rmtree(runtime, ignore_errors=True)
        for path in self.cleanup_paths:
            Path(path).unlink(missing_ok=True)

    def runtime_dirs(self) -> list[Path]:
        """Where EAL puts this prefix's runtime files (/var/run/dpdk as root, else XDG/tmp)."""
        bases = [Path("/var/run/dpdk"), Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / "dpdk"]
        return [base / self.prefix for base in bases]
