"""QEMU guests with one virtio-net NIC on a vhost-user socket: the real front end for tests.

API
- `start_guest(name, sock_path, mac, ip, peer_ip="", role="client", action="ping", ...) -> Guest`
  builds (or reuses) the initramfs of tests.peers.initramfs, launches QEMU and returns at once.
  `role="client"`: QEMU connects to a back end listening on `sock_path` (pyswitch's
  `dpdkvhostuser`); the socket must appear within `connect_timeout` s. `role="server"`: QEMU listens
  on `sock_path` (server=on,wait=off) and the back end connects (pyswitch's `dpdkvhostuserclient`).
  `action`, `count`, `seconds`, `vlan`, `script`, `linger` are passed to the guest's /init (see
  tests.peers.initramfs for the actions and the `PYSWITCH-*` console markers).
- `Guest` is a context manager: `.wait_for(marker, timeout) -> str` (the console line, or
  `GuestError` with the console and QEMU's own log when QEMU exits or the time is up),
  `.seconds_to(marker)` (host seconds from launch to the first sight of the marker),
  `.console_text()`, `.wait_exit(timeout)`, `.stop()` (always kills QEMU, removes a socket QEMU
  created). QEMU runs under `timeout -s KILL <timeout>` in its own process group, so even a test
  process that dies cannot leave a guest running past `timeout`.
- `Guest.ping_result(timeout) -> PingResult`: the outcome of the `ping` action with its timings.
- `ping_pair(workdir, (sock0, sock1), role) -> context manager of (Guest, Guest)`: two guests that
  ping each other: the standard two-VM test, whatever back end is between them.
- qemu-system-x86_64, the kernel or busybox missing: `PeerMissingError` naming the Debian package.

Why the command line looks like this (see /work/shared/real-peers.md): `-accel tcg` (the nested KVM
here cannot run a stock kernel); `vectors=0` on virtio-net-pci (QEMU 7.2 segfaults under TCG when a
vhost-user virtio-net-pci device starts with MSI-X; `msix=True` turns MSI-X back on for newer
QEMUs); guest RAM in a shared memfd (a vhost-user back end maps it); `romfile=` skips the iPXE
option ROM and `-nodefaults` the VGA card, both only cost boot time. `-smp 1`: the guests of a test
share the cores left by the back end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.peers.initramfs import boot_image, build_initramfs, find_kernel, guest_cmdline
from tests.peers.missing import require_binary

QEMU_PACKAGE = "qemu-system-x86"
QEMU = "qemu-system-x86_64"


class GuestError(AssertionError):
    """A guest did not reach an expected state; the message carries its console and QEMU's log."""


@dataclass(frozen=True)
class PingResult:
    """The outcome of a guest's `ping` action with its timings (host seconds from launch)."""

    ok: bool  # every one of the `count` pings after the first reply was answered
    line: str  # the PYSWITCH-PING-OK / PYSWITCH-PING-FAIL console line
    ready_s: float  # launch -> eth0 up with its address
    first_reply_s: float | None  # launch -> first reply (None: no reply at all)
    first_reply_uptime: float | None  # the guest's own uptime at the first reply


def qemu_argv(
    name: str,
    sock_path: Path,
    mac: str,
    cmdline: str,
    kernel: Path,
    initramfs: Path,
    console: Path,
    role: str = "client",
    memory_mb: int = 256,
    msix: bool = False,
    reconnect: int = 1,
) -> list[str]:
    """The QEMU command line for one guest (without the `timeout` wrapper).

    `reconnect` (client role only): seconds between QEMU's attempts to reconnect after the back end
    went away, 0 for none.
    """
    path = str(sock_path).replace(",", ",,")  # QEMU option syntax: a literal comma is doubled
    if role == "server":
        chardev = f"socket,id=c0,path={path},server=on,wait=off"
    elif role == "client":
        chardev = f"socket,id=c0,path={path}" + (f",reconnect={reconnect}" if reconnect else "")
    else:
        raise ValueError(f"role must be 'client' or 'server', not {role!r}")
    device = f"virtio-net-pci,netdev=n0,mac={mac},romfile=" + ("" if msix else ",vectors=0")
    options = [
        ("-name", name),
        ("-accel", "tcg"),
        ("-nodefaults",),
        ("-no-user-config",),
        ("-display", "none"),
        ("-no-reboot",),
        ("-smp", "1"),
        ("-m", str(memory_mb)),
        ("-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on"),
        ("-numa", "node,memdev=mem"),
        ("-kernel", str(kernel)),
        ("-initrd", str(initramfs)),
        ("-append", cmdline),
        ("-serial", f"file:{console}"),
        ("-chardev", chardev),
        ("-netdev", "vhost-user,id=n0,chardev=c0"),
        ("-device", device),
    ]
    return [require_binary(QEMU, QEMU_PACKAGE), *(word for option in options for word in option)]


class Guest:
    """One running QEMU guest; see the module docstring.  Create it with `start_guest`."""

    def __init__(
        self, name: str, argv: list[str], workdir: Path, sock_path: Path, role: str, timeout: float
    ) -> None:
        self.name = name
        self.argv = argv
        self.sock_path = sock_path
        self.role = role
        self.console = workdir / f"{name}.console"
        self.log = workdir / f"{name}.qemu.log"
        self.timeout = timeout
        self.started = 0.0
        self._lines: list[tuple[str, float]] = []  # console lines with the host time first seen
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def launch(self) -> None:
        """Start QEMU (bounded by `timeout` seconds of wall time)."""
        self.console.write_text("")
        with open(self.log, "wb") as log:
            wrapper = [require_binary("timeout", "coreutils"), "-s", "KILL", str(int(self.timeout))]
            self._proc = subprocess.Popen(
                wrapper + self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started = time.monotonic()
        self._watcher = threading.Thread(target=self._watch, name=f"guest-{self.name}", daemon=True)
        self._watcher.start()

    @property
    def running(self) -> bool:
        """True while QEMU (or its timeout wrapper) has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def console_text(self) -> str:
        """Everything the guest printed on its serial console so far."""
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _poll(self) -> None:
        """Note the host time at which each new complete console line was first seen."""
        lines = self.console_text().split("\n")[:-1]  # the last piece is an unfinished line
        now = time.monotonic() - self.started
        for line in lines[len(self._lines) :]:
            self._lines.append((line.strip(), now))

    def _watch(self) -> None:
        """Background poller: line times stay right even while a test waits on another guest."""
        while not self._stopped.is_set():
            with self._lock:
                self._poll()
            self._stopped.wait(0.05)

    def _find(self, marker: str, after: float = 0.0) -> str | None:
        with self._lock:
            self._poll()
            return next(
                (
                    line
                    for line, when in self._lines
                    if marker in line and self.started + when >= after
                ),
                None,
            )

    def wait_for(self, marker: str, timeout: float = 60.0, after: float = 0.0) -> str:
        """Wait until a console line contains `marker`; return that line.  `GuestError` if QEMU
        exits first or `timeout` seconds pass.  `after` (a time.monotonic() value) ignores lines
        seen before it."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._find(marker, after)
            if line is not None:
                return line
            exited = self._proc is None or self._proc.poll() is not None
            if exited or time.monotonic() > deadline:
                line = self._find(marker, after)  # QEMU may have printed it just before exiting
                if line is not None:
                    return line
                why = self._exit_reason() if exited else f"not seen within {timeout:.0f}s"
                raise GuestError(f"guest {self.name}: {marker!r} {why}\n{self.describe()}")
            time.sleep(0.05)

    def _exit_reason(self) -> str:
        """How QEMU ended, in words (a signal usually means QEMU crashed, e.g. the MSI-X bug)."""
        status = None if self._proc is None else self._proc.poll()
        if status is not None and status < 0:
            return f"QEMU died of {signal.Signals(-status).name}"
        if status == 137:  # the `timeout -s KILL` wrapper reports a killed child as 128 + 9
            return f"QEMU killed after its {self.timeout:.0f}s time limit"
        return f"QEMU exited with status {status}"

    def seconds_to(self, marker: str) -> float:
        """Host seconds from QEMU's launch to the first console line containing `marker` (±0.05 s);
        KeyError if there is none yet."""
        with self._lock:
            self._poll()
            for line, when in self._lines:
                if marker in line:
                    return when
        raise KeyError(marker)

    def ping_result(self, timeout: float = 90.0) -> PingResult:
        """Wait for the end of the `ping` action (GuestError if it never comes) and return it."""
        line = self.wait_for("PYSWITCH-PING-", timeout)
        ready = self.seconds_to("PYSWITCH-READY")
        first = uptime = None
        if "PING-OK" in line or self._find("PYSWITCH-FIRST-REPLY"):
            first_line = self.wait_for("PYSWITCH-FIRST-REPLY", 0)
            first, uptime = self.seconds_to("PYSWITCH-FIRST-REPLY"), float(first_line.split("=")[1])
        return PingResult("PYSWITCH-PING-OK" in line, line, ready, first, uptime)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for QEMU to exit (the guest powers off after its action); return its exit status."""
        assert self._proc is not None
        return self._proc.wait(timeout=timeout)

    def describe(self) -> str:
        """The command line, the console tail and QEMU's log: what a failure message needs."""
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        return (
            f"command: {' '.join(self.argv)}\n--- console (tail) ---\n{self.console_text()[-2500:]}"
            f"\n--- qemu log ---\n{log[-1500:]}"
        )

    def stop(self) -> None:
        """Kill QEMU (its whole process group) if it runs; remove the socket it listened on."""
        proc = self._proc
        self._stopped.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2)
        if proc is not None and proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.role == "server":
            self.sock_path.unlink(missing_ok=True)


def start_guest(
    name: str,
    sock_path: Path,
    mac: str,
    ip: str,
    peer_ip: str = "",
    *,
    workdir: Path,
    role: str = "client",
    action: str = "ping",
    count: int = 5,
    seconds: int = 60,
    vlan: int | None = None,
    script: str | None = None,
    linger: int = 0,
    timeout: float = 120.0,
    connect_timeout: float = 10.0,
    msix: bool = False,
    memory_mb: int = 256,
) -> Guest:
    """Launch a guest whose eth0 is on `sock_path` with address `ip` (CIDR); see the module doc.

    Raises `PeerMissingError` (QEMU, kernel or busybox absent) or `GuestError` (client role and no
    socket at `sock_path` within `connect_timeout` seconds).
    """
    require_binary(QEMU, QEMU_PACKAGE)
    kernel = find_kernel()
    initramfs = build_initramfs(kernel=kernel)
    cmdline = guest_cmdline(
        ip,
        peer_ip,
        action=action,
        count=count,
        seconds=seconds,
        vlan=vlan,
        script=script,
        linger=linger,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    console = workdir / f"{name}.console"
    argv = qemu_argv(
        name,
        sock_path,
        mac,
        cmdline,
        boot_image(kernel),
        initramfs,
        console,
        role=role,
        memory_mb=memory_mb,
        msix=msix,
    )
    guest = Guest(name, argv, workdir, Path(sock_path), role, timeout)
    if role == "client":
        deadline = time.monotonic() + connect_timeout
        while not Path(sock_path).exists():
            if time.monotonic() > deadline:
                raise GuestError(
                    f"guest {name}: no vhost-user back end listening on {sock_path} "
                    f"after {connect_timeout}s"
                )
            time.sleep(0.1)
    guest.launch()
    return guest


@contextmanager
def ping_pair(
    workdir: Path,
    socks: tuple[Path, Path],
    role: str = "client",
    subnet: str = "10.250.0",
    count: int = 5,
    linger: int = 8,
    timeout: float = 100.0,
) -> Iterator[tuple[Guest, Guest]]:
    """Two guests, <subnet>.1 on socks[0] and <subnet>.2 on socks[1], that ping each other
    (`count` pings each, then `linger` seconds up for the other's pings).  Both are stopped on exit,
    also when the second fails to start.  Read the outcome with `Guest.ping_result()`."""
    macs = ("02:50:53:00:00:01", "02:50:53:00:00:02")
    with ExitStack() as stack:
        guests = [
            stack.enter_context(
                start_guest(
                    f"pst-g{i}",
                    sock,
                    macs[i],
                    f"{subnet}.{i + 1}/24",
                    f"{subnet}.{2 - i}",
                    workdir=workdir,
                    role=role,
                    count=count,
                    linger=linger,
                    timeout=timeout,
                )
            )
            for i, sock in enumerate(socks)
        ]
        yield guests[0], guests[1]
