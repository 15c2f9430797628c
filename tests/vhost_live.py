"""A live switch for hostile vhost-user tests: one vhost-user port beside two forwarding ports.

:class:`LiveSwitch` builds an in-process :class:`pyswitch.switch.Switch` with bridge
``br0`` holding a ``dpdkvhostuser`` port and two ``memory`` ports ``a`` and ``b``, and
runs the switch's own event loop on a thread (the same loop ``pyswitch up`` runs).  The
hostile test plays the front end on the port's real unix socket; meanwhile the switch
must keep forwarding between ``a`` and ``b``:

* :meth:`LiveSwitch.forwards` injects frames on ``a`` and waits for exactly as many on ``b``;
* :meth:`LiveSwitch.traffic` does so continuously on a thread while a hostile session runs,
  and checks on exit that every frame arrived;
* :meth:`LiveSwitch.assert_healthy` says the loop thread is alive, still iterating, and
  no exception reached a log record (the loop logs handler exceptions instead of dying:
  a record with ``exc_info`` is an exception that escaped a handler).

:class:`Session` is one hostile front end with the checks every case makes (counted,
logged, refused or closed, no fd left behind, forwarding went on); the fixtures ``live``
(one running switch per test module) and ``session`` are used through
``pytest_plugins = ["tests.vhost_live"]``.  :func:`open_fds` and :func:`rss_kib` read
/proc for leak checks.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pyswitch.ports.vhostuser import protocol as p
from pyswitch.ports.vhostuser.device import OFFERED_FEATURES, OFFERED_PROTOCOL_FEATURES

from pyswitch.switch import Switch
from pyswitch.topology import load_topology_text
from tests.netns_util import wait_until
from tests.vhost_frontend import DriverQueue, Frontend, GuestRAM

R = p.Request
BROADCAST = b"\xff" * 6
#: Source MACs of the frames injected on ports a and b (the bridge learns them there):
#: traffic a -> b is unicast to B_MAC, so it never reaches the vhost-user guest.
A_MAC = b"\x02\x00\x00\x00\x00\x0a"
B_MAC = b"\x02\x00\x00\x00\x00\x0b"


class _ExcRecords(logging.Handler):
    """Keeps every log record that carries an exception (``log.exception``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


class LiveSwitch:
    """Switch with ``vh`` (vhost-user server), ``a``, ``b`` (memory) on br0, running."""

    def __init__(self, sock_dir: Path, server_path: str | None = None) -> None:
        """A ``dpdkvhostuser`` port listening in ``sock_dir``, or with ``server_path`` a
        ``dpdkvhostuserclient`` port connecting there."""
        self.name = "pst" + secrets.token_hex(2)
        vh = (f"{{type: dpdkvhostuser, options: {{vhost-sock-dir: '{sock_dir}'}}}}" if server_path is None
              else f"{{type: dpdkvhostuserclient, options: {{vhost-server-path: '{server_path}'}}}}")
        topo = ("bridges:\n  br0:\n    ports:\n"
                f"      {self.name}: {vh}\n"
                "      a: {type: memory}\n      b: {type: memory, options: {capacity: '64'}}\n")
        self.sw = Switch()
        self._exc = _ExcRecords()
        logging.getLogger().addHandler(self._exc)
        self._seq = 0  # frames made so far (all of them go a -> b)
        self._lock = threading.Lock()
        try:
            self.sw.build(load_topology_text(topo, "hostile.yaml"))
            self.port = self.sw.port(self.name)
            self.path = self.port.socket_path()  # type: ignore[attr-defined]
            self._thread = threading.Thread(target=self.sw.run, name="pst-hostile-loop")
            self._thread.start()
            assert wait_until(lambda: self.sw.loop.iterations > 0), "switch loop did not start"
            a = self.sw.port("a")
            self.sw.port("b").inject([BROADCAST + B_MAC + b"\x08\x00" + bytes(46)])  # type: ignore[attr-defined]
            assert wait_until(lambda: a.counters.tx_packets == 1), "b -> a does not forward"
            assert self.forwards(1), "a -> b does not forward"  # and the bridge learns A_MAC
        except BaseException:
            self.close()
            raise

    def stat(self, key: str) -> int:
        return int(self.port.vhost_stats[key])  # type: ignore[attr-defined]

    def frames(self, n: int) -> list[bytes]:
        """``n`` distinct frames from a's MAC to b's (learned: they go to b only)."""
        out = []
        with self._lock:  # the traffic thread and the test thread both make frames
            first, self._seq = self._seq, self._seq + n
        for seq in range(first + 1, first + n + 1):
            out.append(B_MAC + A_MAC + b"\x08\x00"
                       + seq.to_bytes(8, "big") + bytes(38))
        return out

    def forwards(self, n: int = 16, timeout: float = 5.0) -> bool:
        """Inject ``n`` frames on a; True once b transmitted all of them."""
        b = self.sw.port("b")
        before = b.counters.tx_packets
        self.sw.port("a").inject(self.frames(n))  # type: ignore[attr-defined]
        return wait_until(lambda: b.counters.tx_packets - before >= n, timeout)

    @contextmanager
    def traffic(self, interval: float = 0.002) -> Iterator[None]:
        """Forward a -> b on a thread for the duration of the block; on exit assert every
        injected frame came out of b (the hostile session did not stall the switch)."""
        a, b = self.sw.port("a"), self.sw.port("b")
        before, made, stop = b.counters.tx_packets, self._seq, threading.Event()

        def run() -> None:
            while not stop.is_set():
                a.inject(self.frames(1))  # type: ignore[attr-defined]
                stop.wait(interval)

        th = threading.Thread(target=run, name="pst-traffic")
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join(5)
        sent = self._seq - made  # by the thread, and by forwards() meanwhile
        assert sent > 0
        assert wait_until(lambda: b.counters.tx_packets - before == sent), (
            f"other ports stalled: {b.counters.tx_packets - before} of {sent} frames forwarded")

    def assert_healthy(self) -> None:
        assert self._thread.is_alive(), "the switch loop thread died"
        n = self.sw.loop.iterations
        assert self.forwards(1), "a -> b stopped forwarding"  # an event: the loop wakes up
        assert self.sw.loop.iterations > n, "the switch loop stopped iterating"
        escaped = [r.getMessage() for r in self._exc.records]
        assert not escaped, f"exceptions escaped into the log: {escaped}"

    def disconnected(self, timeout: float = 5.0) -> bool:
        return wait_until(lambda: self.port.conn is None, timeout)  # type: ignore[attr-defined]

    def close(self) -> None:
        try:
            if getattr(self, "_thread", None) is not None:
                self.sw.stop()
                self._thread.join(10)
                assert not self._thread.is_alive(), "the switch loop did not stop"
        finally:
            self.sw.close()
            self.sw.loop.close()
            logging.getLogger().removeHandler(self._exc)


def open_fds(pid: int | str = "self") -> int:
    """How many fds process ``pid`` has open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of ``pid`` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


def closed_by_switch(sock: socket.socket, timeout: float = 3.0) -> bool:
    """True if the switch closed the connection (EOF after any replies) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def status(reply: p.Message) -> int:
    return p.U64.unpack(reply.payload)[0]


# -- the harness of every case --------------------------------------------------------------

class Session:
    """One hostile front end: counts, log lines and fds checked around it."""

    def __init__(self, live: LiveSwitch, caplog: pytest.LogCaptureFixture) -> None:
        self.live, self.caplog = live, caplog
        assert live.disconnected(), "a previous case left a front end connected"
        self.fds = open_fds()
        self.errors = live.stat("protocol_errors")
        self.fe = Frontend.connect(live.path)
        assert wait_until(lambda: live.port.conn is not None)  # type: ignore[attr-defined]

    def warned(self) -> list[str]:
        return [r.getMessage() for r in self.caplog.records
                if r.levelno >= logging.WARNING and self.live.name in r.getMessage()]

    def assert_refused(self, closed: bool) -> None:
        live = self.live
        assert wait_until(lambda: live.stat("protocol_errors") > self.errors), "not counted"
        assert self.warned(), "no warning naming the port"
        if closed:
            assert closed_by_switch(self.fe.sock), "the switch did not close the connection"
        else:  # the port refused the request and keeps serving this front end
            assert self.fe.request(R.GET_QUEUE_NUM).payload == p.U64.pack(8)

    def refuse(self, req: int, payload: bytes, fds: list[int] | None = None) -> None:
        """Send a request with ``fds`` (closed here afterwards); it must get a failure
        status (REPLY_ACK negotiated), be counted and logged, and the connection stay."""
        try:
            reply = self.fe.request(req, payload, fds or None, check=False)
        finally:
            for fd in fds or ():
                os.close(fd)
        assert status(reply) != 0, f"request {req} was not refused"
        self.assert_refused(closed=False)

    def close(self) -> None:
        self.fe.close()
        assert self.live.disconnected()
        assert wait_until(lambda: open_fds() == self.fds), (
            f"fds leaked: {open_fds()} open, {self.fds} before")
        self.live.assert_healthy()


@pytest.fixture
def session(live: LiveSwitch, caplog: pytest.LogCaptureFixture) -> Iterator[Session]:
    caplog.set_level(logging.WARNING)
    with live.traffic():
        s = Session(live, caplog)
        try:
            yield s
        finally:
            s.close()
    assert live.forwards()


@pytest.fixture
def ram() -> Iterator[GuestRAM]:
    """4 MiB of guest memory in one region (a module's own ``ram`` fixture wins)."""
    r = GuestRAM([(0, 4 << 20)])
    yield r
    r.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSwitch]:
    sw = LiveSwitch(tmp_path_factory.mktemp("hostile"))
    try:
        yield sw
        sw.assert_healthy()
    finally:
        sw.close()


# -- fds of every kind ---------------------------------------------------------------------

def memfd(size: int = (1 << 20)) -> int:
    fd = os.memfd_create("pst-hostile", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def _pipe() -> tuple[int, list[int]]:
    r, w = os.pipe()
    return r, [w]


def _socket() -> tuple[int, list[int]]:
    a, b = socket.socketpair()
    return a.detach(), [b.detach()]


def _devnull() -> tuple[int, list[int]]:
    fd = os.open("/dev/null", os.O_RDWR)
    return fd, []


def _directory() -> tuple[int, list[int]]:
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    return fd, []


def _readonly_memfd() -> tuple[int, list[int]]:
    m = memfd()
    ro = os.open(f"/proc/self/fd/{m}", os.O_RDONLY)
    return ro, [m]


def _sealed_memfd() -> tuple[int, list[int]]:
    m = memfd()
    fcntl.fcntl(m, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    return m, []


def _short_memfd() -> tuple[int, list[int]]:
    return memfd(4096), []  # the region says 1 MiB


def _eventfd() -> tuple[int, list[int]]:
    return os.eventfd(0), []


def _memfd() -> tuple[int, list[int]]:
    return memfd(), []


#: Makers of one fd of each kind a hostile front end may send where another is due:
#: each returns (the fd to send, other fds to close afterwards).
FD_KINDS: dict[str, Callable[[], tuple[int, list[int]]]] = {
    "pipe": _pipe, "socket": _socket, "devnull": _devnull, "directory": _directory,
    "readonly_memfd": _readonly_memfd, "sealed_memfd": _sealed_memfd,
    "short_memfd": _short_memfd, "eventfd": _eventfd, "memfd": _memfd,
}


# -- a well-behaved negotiation, message by message ------------------------------------

def ring_msgs(fe: Frontend, index: int, q: DriverQueue) -> list[tuple[int, bytes, list[int]]]:
    """NUM, ADDR, BASE, CALL, KICK, ENABLE of one ring, eventfds kept in ``fe``."""
    a = q.addr(index)
    call = fe.calls.setdefault(index, os.eventfd(0, os.EFD_NONBLOCK))
    kick = fe.kicks.setdefault(index, os.eventfd(0, os.EFD_NONBLOCK))
    return [
        (R.SET_VRING_NUM, p.VRING_STATE.pack(index, q.size), []),
        (R.SET_VRING_ADDR, p.VRING_ADDR.pack(index, 0, a.desc, a.used, a.avail, 0), []),
        (R.SET_VRING_BASE, p.VRING_STATE.pack(index, 0), []),
        (R.SET_VRING_CALL, p.U64.pack(index), [call]),
        (R.SET_VRING_KICK, p.U64.pack(index), [kick]),
        (R.SET_VRING_ENABLE, p.VRING_STATE.pack(index, 1), []),
    ]


def negotiation(fe: Frontend, ram: GuestRAM, rxq: DriverQueue, txq: DriverQueue
                ) -> list[tuple[int, bytes, list[int]]]:
    """QEMU's order: owner, features, protocol features, memory, the two rings, then stop."""
    table = ram.table()
    mem = p.MEM_TABLE_HEADER.pack(len(table), 0) + b"".join(
        p.MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        for r in table)
    return [
        (R.SET_OWNER, b"", []),
        (R.GET_FEATURES, b"", []),
        (R.GET_PROTOCOL_FEATURES, b"", []),
        (R.SET_PROTOCOL_FEATURES, p.U64.pack(int(OFFERED_PROTOCOL_FEATURES)), []),
        (R.GET_QUEUE_NUM, b"", []),
        (R.SET_FEATURES, p.U64.pack(OFFERED_FEATURES), []),
        (R.SET_MEM_TABLE, mem, ram.fds()),
        *ring_msgs(fe, 0, rxq),
        *ring_msgs(fe, 1, txq),
        (R.GET_VRING_BASE, p.VRING_STATE.pack(0, 0), []),
        (R.GET_VRING_BASE, p.VRING_STATE.pack(1, 0), []),
    ]


# -- hostile sessions for churn tests -------------------------------------------------------

def _send_fd_kind(fe: Frontend, i: int) -> None:
    kind = sorted(FD_KINDS)[i % len(FD_KINDS)]
    fd, extra = FD_KINDS[kind]()
    try:
        table = p.MEM_TABLE_HEADER.pack(1, 0) + p.MEM_REGION.pack(0, (1 << 20), 0, 0)
        req = (R.SET_MEM_TABLE, R.SET_VRING_KICK, R.ADD_MEM_REG)[i % 3]
        payload = {R.SET_MEM_TABLE: table, R.SET_VRING_KICK: p.U64.pack(1),
                   R.ADD_MEM_REG: bytes(8) + p.MEM_REGION.pack(0, (1 << 20), 0, 0)}[req]
        fe.request(req, payload, [fd], check=False)
    finally:
        for f in (fd, *extra):
            os.close(f)


def _cut_mid_message(fe: Frontend, i: int) -> None:
    ram = GuestRAM([(0, (1 << 20))])
    try:
        steps = negotiation(fe, ram, DriverQueue(ram, 64), DriverQueue(ram, 64))
        for req, payload, fds in steps[: i % len(steps)]:
            fe.request(req, payload, fds or None)
            if req == R.SET_PROTOCOL_FEATURES:
                fe.protocol_features = p.U64.unpack(payload)[0]
        req, payload, fds = steps[i % len(steps)]
        data = p.encode(req, payload)
        p.send_message(fe.sock, data[: len(data) // 2 or 1], fds or None)
    finally:
        ram.close()


def _many_fds_and_regions(fe: Frontend, i: int) -> None:
    fds = [memfd(4096) for _ in range(p.MAX_FDS + 1)]
    try:
        table = p.MEM_TABLE_HEADER.pack(9, 0) + b"".join(
            p.MEM_REGION.pack(k * (1 << 20), 4096, k * (1 << 20), 0) for k in range(9))
        p.send_message(fe.sock, p.encode(R.SET_MEM_TABLE, table), fds)
    finally:
        for fd in fds:
            os.close(fd)


def _garbage(fe: Frontend, i: int) -> None:
    fe.sock.sendall(os.urandom(12 + i % 50))


HOSTILE: list[Callable[[Frontend, int], None]] = [
    _send_fd_kind, _cut_mid_message, _many_fds_and_regions, _garbage]


def hostile_session(path: str, i: int) -> None:
    """Hostile session number ``i`` on the socket at ``path``: the i-th of a rotation of
    wrong fd kinds, messages cut in the middle at each step, 9 regions with 9 fds, and
    garbage.  Returns once this side closed (the switch may have closed first)."""
    fe = Frontend.connect(path)
    try:
        fe.negotiate()
        HOSTILE[i % len(HOSTILE)](fe, i // len(HOSTILE))
    except (p.Disconnected, AssertionError, TimeoutError):
        pass  # the switch may close at once: that is its right
    finally:
        fe.close()
