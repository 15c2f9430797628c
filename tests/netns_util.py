"""Helpers and fixtures for tests against the real kernel: namespaces, links, commands.

Everything here cleans up after itself even when the test fails: context managers
and fixtures remove what they made in ``finally``.  Names are unique (``pst`` + random
hex) so that parallel runs do not collide.  Use only addresses inside namespaces the
test made, or 198.18.0.0/15 (RFC 2544 benchmarking range) on links that stay on this
machine.

Reusable pieces:

* :func:`unique_name`, :func:`require_root`, :func:`require_tool`, :func:`ping_argv`
* :func:`netns` (context manager) / fixture ``netns_factory``: create a namespace with
  ``lo`` up, remove it (and kill what still runs in it) afterwards
* :func:`ns_exec` (run and wait, bounded) and :func:`ns_process` (background process,
  always terminated)
* :func:`link_exists`, :func:`wait_until`
* :class:`PortWire`: a thread that floods frames between ports (a two-port hub with no
  learning) through their ``attach``/``receive``/``transmit``/``release`` contract, to
  test port types end to end without the switch core.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Self

import pytest

from tests.peers.missing import PeerMissingError, require_binary


def unique_name(prefix: str = "pst", nhex: int = 6) -> str:
    """``prefix`` + ``nhex`` random hex digits (``pst`` + 6 = 9 characters: room for
    suffixes within the 15-character interface name limit)."""
    return prefix + secrets.token_hex((nhex + 1) // 2)[:nhex]


def require_root() -> None:
    """Fail (never skip) when not root: these tests need namespaces and links."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, veth, TAP)")


def require_tool(name: str, package: str) -> str:
    """Absolute path of ``name``; a clear failure naming the Debian ``package`` if absent."""
    try:
        return require_binary(name, package)
    except PeerMissingError as exc:
        pytest.fail(str(exc))


def ping_argv(address: str, count: int = 1, wait_s: int = 1) -> list[str]:
    """A ping command line: iputils ``ping`` if installed, else ``busybox ping``."""
    if shutil.which("ping"):
        return ["ping", "-n", "-c", str(count), "-W", str(wait_s), address]
    busybox = require_tool("busybox", "busybox-static (or iputils-ping)")
    return [busybox, "ping", "-c", str(count), "-W", str(wait_s), address]


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/var/run/netns/{name}")


def link_exists(name: str, netns: str | None = None) -> bool:
    """Whether interface ``name`` exists in ``netns`` (default: the test's namespace)."""
    argv = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0


def ns_exec(
    netns: str | None, *argv: str, timeout: float = 20, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``netns`` (``ip netns exec``; None = here), wait at most
    ``timeout`` s, return the completed process (text output).  ``check`` fails the test
    with the command's output if it exits non-zero."""
    full = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(full)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def ns_process(netns: str | None, *argv: str, **popen: object) -> Iterator[subprocess.Popen[str]]:
    """Start ``argv`` in ``netns`` in the background; always terminated (then killed)
    and reaped on exit."""
    full = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(full, text=True, **popen)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def kill_netns_pids(name: str) -> None:
    """SIGKILL every process still running inside namespace ``name``."""
    out = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def remove_netns(name: str) -> None:
    """Kill what runs in ``name`` and delete it; absent is fine."""
    if netns_exists(name):
        kill_netns_pids(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)


@contextlib.contextmanager
def netns(name: str | None = None) -> Iterator[str]:
    """Create namespace ``name`` (default: unique) with ``lo`` up; removed afterwards."""
    require_root()
    name = name or unique_name()
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        ns_exec(name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        remove_netns(name)


@pytest.fixture
def netns_factory() -> Iterator[Callable[..., str]]:
    """``make(name=None) -> name``: namespaces removed at teardown, even on failure."""
    stack = contextlib.ExitStack()

    def make(name: str | None = None) -> str:
        return stack.enter_context(netns(name))

    with stack:
        yield make


@pytest.fixture
def cleanup() -> Iterator[Callable[[Callable[[], object]], None]]:
    """``cleanup(fn)``: run ``fn`` at teardown (last registered first), errors ignored."""
    actions: list[Callable[[], object]] = []
    yield actions.append
    for fn in reversed(actions):
        with contextlib.suppress(Exception):
            fn()


def wait_until(
    predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01
) -> bool:
    """Poll ``predicate`` until truthy or ``timeout`` s passed; return its last truth."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class _PollIO:
    """The minimal ``PortIO`` a :class:`PortWire` gives its ports."""

    def __init__(self, wire: PortWire, index: int) -> None:
        self._wire, self._index = wire, index

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._wire._fds[fd] = self._index
        self._wire._poll.register(fd, select.POLLIN)

    def unwatch(self, fd: int) -> None:
        if self._wire._fds.pop(fd, None) is not None:
            self._wire._poll.unregister(fd)

    def rx_ready(self) -> None:  # readiness is taken from poll() directly
        pass

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        raise NotImplementedError("PortWire has no timers")

    def now(self) -> float:
        return time.monotonic()


class PortWire:
    """Flood every frame a port receives to all the other ports, in a thread.

    ``with PortWire([a, b]):`` attaches the (opened) ports, runs until the block ends,
    then stops the thread (the ports are not closed: their owner does that).
    ``frames`` counts what was forwarded.  Any exception in the thread is re-raised
    on exit.
    """

    def __init__(self, ports: Sequence[object], batch: int = 32) -> None:
        self.ports = list(ports)
        self.batch = batch
        self.frames = 0
        self._fds: dict[int, int] = {}
        self._poll = select.poll()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="port-wire", daemon=True)

    def __enter__(self) -> Self:
        for i, port in enumerate(self.ports):
            port.attach(_PollIO(self, i))  # type: ignore[attr-defined]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._error is not None and exc[0] is None:
            raise self._error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for fd, _ in self._poll.poll(50):
                    self._service(self._fds[fd])
        except BaseException as exc:  # noqa: BLE001 - surfaced in __exit__
            self._error = exc

    def _service(self, index: int) -> None:
        src = self.ports[index]
        while True:
            frames = src.receive(self.batch)  # type: ignore[attr-defined]
            if not frames:
                return
            for j, dst in enumerate(self.ports):
                if j != index:
                    dst.transmit(frames)  # type: ignore[attr-defined]
            src.release()  # type: ignore[attr-defined]
            self.frames += len(frames)
            if len(frames) < self.batch:
                return
