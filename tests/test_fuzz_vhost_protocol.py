"""A vhost-user protocol fuzzer against a live port in a running switch (hypothesis).

Each example is one front-end session on the port's real unix socket: a valid prefix
of QEMU's negotiation (tests/vhost_live.py ``negotiation``), then random actions --
messages of the negotiation sent as they are or mutated (a byte flipped, a lying size
field, another request code, other flags, a random payload, fds of random kinds
instead of the right ones), random bytes, kicks, random bytes written over the rings
in guest memory -- and, sometimes, a message cut in the middle before the close.

Invariants after every example: the switch loop thread is alive and no exception
reached the log, the vhost-user port is disconnected and the process has exactly the
fds it had before (nothing the front end sent is kept), and the two other ports of
the bridge forward.

It runs once per data path (``datapath`` fixture): on ``compiled`` the rings the guest
scribbles over are the compiled kernel's.  Bounded for CI: ``PYSWITCH_FUZZ_EXAMPLES``
examples per path (default 200, about 20 s each);
set it higher for a long run, e.g. ``PYSWITCH_FUZZ_EXAMPLES=20000``.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyswitch.ports.vhostuser import protocol as p

from tests.netns_util import wait_until
from tests.vhost_frontend import DriverQueue, Frontend, GuestRAM

pytest.register_assert_rewrite("tests.vhost_live")
from tests.vhost_live import FD_KINDS, LiveSwitch, negotiation, open_fds

EXAMPLES = int(os.environ.get("PYSWITCH_FUZZ_EXAMPLES", "200"))
STEPS = 21  # messages in negotiation()
RING_BYTES = 8192  # the rings sit at the start of guest memory: scribble there
REQUESTS = [int(r) for r in p.Request] + [0, 41, 99, 0xFFFF_FFFF]

fd_kinds = st.lists(st.sampled_from(sorted(FD_KINDS)), max_size=9)
mutation = st.one_of(
    st.tuples(st.just("asis")),
    st.tuples(st.just("flip"), st.integers(0, 400), st.integers(0, 255)),
    st.tuples(st.just("size"), st.integers(0, 5000)),
    st.tuples(st.just("req"), st.sampled_from(REQUESTS)),
    st.tuples(st.just("flags"), st.integers(0, 0xFFFF_FFFF)),
    st.tuples(st.just("payload"), st.binary(max_size=300)),
    st.tuples(st.just("fds"), fd_kinds),
)
action = st.one_of(
    st.tuples(st.just("msg"), st.integers(0, STEPS - 1), mutation),
    st.tuples(st.just("raw"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("kick"), st.integers(0, 1)),
    st.tuples(st.just("guest"), st.integers(0, RING_BYTES - 1), st.binary(min_size=1, max_size=64)),
)
session = st.tuples(
    st.integers(0, STEPS),  # valid prefix
    st.lists(action, max_size=12),
    st.one_of(st.none(), st.tuples(st.integers(0, STEPS - 1), st.integers(1, 300))),  # cut
)


def encode(req: int, payload: bytes, m: tuple) -> tuple[bytes, list[str] | None]:
    """The bytes of one mutated message, and fd kinds replacing its own fds (or None)."""
    flags, size, kinds = p.VERSION, None, None
    kind = m[0]
    if kind == "flip" and payload:
        b = bytearray(payload)
        b[m[1] % len(b)] ^= m[2] or 1
        payload = bytes(b)
    elif kind == "size":
        size = m[1]
    elif kind == "req":
        req = m[1]
    elif kind == "flags":
        flags = m[1]
    elif kind == "payload":
        payload = m[1]
    elif kind == "fds":
        kinds = m[1]
    data = p.HEADER.pack(req, flags, len(payload) if size is None else size) + payload
    return data, kinds


def send(sock: socket.socket, data: bytes, fds: list[int] | None) -> None:
    """Send, then wait until the switch has read it (so it is handled, not dropped with
    the rest of the session when the close comes in the same read), reading replies."""
    p.send_message(sock, data, fds or None)
    deadline = time.monotonic() + 1.0
    while unread(sock) and time.monotonic() < deadline:
        drain(sock)
        time.sleep(0.0005)
    drain(sock)


def unread(sock: socket.socket) -> int:
    """Bytes we sent that the switch has not read yet (SIOCOUTQ of a unix socket)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def drain(sock: socket.socket) -> None:
    """Read and drop the replies (so the switch never finds our receive buffer full)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        while sock.recv(65536):
            pass
    except (BlockingIOError, InterruptedError):
        pass
    except OSError as exc:  # reset by the switch
        raise p.Disconnected(str(exc)) from exc
    finally:
        sock.settimeout(timeout)


def play(live: LiveSwitch, example: tuple) -> None:
    prefix, actions, cut = example
    ram = GuestRAM([(0, 4 << 20)])
    fe = Frontend.connect(live.path)
    try:
        steps = negotiation(fe, ram, DriverQueue(ram, 64), DriverQueue(ram, 64))
        for req, payload, fds in steps[:prefix]:
            send(fe.sock, p.encode(req, payload), fds)
        for act in actions:
            if act[0] == "msg":
                req, payload, fds = steps[act[1]]
                data, kinds = encode(req, payload, act[2])
                if kinds is None:
                    send(fe.sock, data, fds)
                    continue
                made = [FD_KINDS[k]() for k in kinds]
                try:
                    send(fe.sock, data, [fd for fd, _ in made])
                finally:
                    for fd, extra in made:
                        for f in (fd, *extra):
                            os.close(f)
            elif act[0] == "raw":
                send(fe.sock, act[1], None)
            elif act[0] == "kick":
                os.eventfd_write(fe.kicks[act[1]], 1)
            else:
                ram.write(act[1], act[2][: RING_BYTES - act[1]])
        if cut is not None:
            req, payload, fds = steps[cut[0]]
            data = p.encode(req, payload)
            send(fe.sock, data[: min(cut[1], len(data) - 1)], fds)
    except p.Disconnected:
        pass  # the switch closed the connection: allowed at any point
    finally:
        fe.close()
        ram.close()


@pytest.fixture
def live_on(datapath: str, tmp_path: Path) -> Iterator[LiveSwitch]:
    """The live switch built on ``datapath`` (its rings are the compiled kernel's there)."""
    sw = LiveSwitch(tmp_path)
    try:
        yield sw
        sw.assert_healthy()
    finally:
        sw.close()


@pytest.mark.timeout(max(120, EXAMPLES))
def test_fuzz_vhost_protocol(live_on: LiveSwitch) -> None:
    live = live_on
    baseline = open_fds()
    seen = {"examples": 0, "closed_by_switch": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(session)
    def run(example: tuple) -> None:
        gone = live.stat("disconnects")
        play(live, example)
        assert wait_until(lambda: live.stat("disconnects") == gone + 1), "session not torn down"
        assert live.disconnected()
        assert wait_until(lambda: open_fds() == baseline), (
            f"fds leaked: {open_fds()} open, {baseline} before")
        live.assert_healthy()
        seen["examples"] += 1

    errors, kicks, connections = (live.stat(k) for k in ("protocol_errors", "kicks", "connections"))
    run()
    assert seen["examples"] >= min(EXAMPLES, 50)
    # it reached the error paths, and sessions got as far as rings that were kicked
    assert live.stat("protocol_errors") > errors
    assert live.stat("kicks") > kicks
    print(f"{live.stat('connections') - connections} sessions: "
          f"{live.stat('protocol_errors') - errors} protocol errors, {live.stat('kicks') - kicks} kicks")
