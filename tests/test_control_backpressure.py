"""Control socket replies never block forwarding: a client that sends requests and never
reads is served from a bounded per-client buffer, then disconnected.

Before the replies were non-blocking, each reply to such a client waited up to 5 s in
``sendall`` inside the event loop, and forwarding stopped meanwhile.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from pyswitch.control import MAX_OUTPUT, ControlServer
from pyswitch.loop import EventLoop
from tests.control_client import Pinger, raw_exchange, two_veth_hosts
from tests.netns_util import wait_until

pytestmark = pytest.mark.timeout(120)

BIG = "x" * 60000  # one reply of ~60 kB: a few fill any socket buffer


def _server(tmp_path):
    loop = EventLoop()
    srv = ControlServer(tmp_path / "ctl", loop, lambda method, params: BIG if method == "big" else method)
    srv.open()
    return loop, srv


def _request(method: str, rid: int = 1) -> bytes:
    return json.dumps({"id": rid, "method": method, "params": {}}).encode() + b"\n"


def test_a_client_that_never_reads_is_dropped_and_the_loop_never_blocks(tmp_path):
    loop, srv = _server(tmp_path)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stuck.connect(str(tmp_path / "ctl"))
        stuck.setblocking(False)
        worst, sent, dropped = 0.0, 0, False
        for _ in range(3000):
            try:
                sent += stuck.send(_request("big") * 4)
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
            t = time.monotonic()
            loop.run_once(max_wait=0)
            worst = max(worst, time.monotonic() - t)
        assert dropped and srv.dropped_slow == 1, (sent, srv.dropped_slow)
        assert sent // len(_request("big")) * len(BIG) > MAX_OUTPUT  # it was over the cap
        assert worst < 0.5, f"one loop iteration took {worst:.3f}s"
        assert not srv._conns
    finally:
        stuck.close()
        srv.close()
        loop.close()


def test_a_slow_reader_gets_every_reply_whole_and_in_order(tmp_path):
    loop, srv = _server(tmp_path)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.connect(str(tmp_path / "ctl"))
        c.sendall(b"".join(_request("big", i) for i in range(20)) + _request("tail", 20))
        buf = b""
        while buf.count(b"\n") < 21:
            loop.run_once(max_wait=0.01)  # most of it waits in the server's buffer
            c.setblocking(False)
            try:
                buf += c.recv(7000)  # reads in small pieces, slowly
            except BlockingIOError:
                pass
        replies = [json.loads(line) for line in buf.split(b"\n") if line]
        assert [r["id"] for r in replies] == list(range(21))
        assert all(r["result"] == BIG for r in replies[:20]) and replies[20]["result"] == "tail"
        assert srv.dropped_slow == 0
    finally:
        c.close()
        srv.close()
        loop.close()


def test_one_reply_larger_than_the_limit_reaches_a_client_that_reads_it(tmp_path):
    """The limit is on replies left unread, not on one reply (fdb-show of a big table)."""
    loop = EventLoop()
    huge = "y" * (MAX_OUTPUT + (2 << 20))
    srv = ControlServer(tmp_path / "ctl", loop, lambda method, params: huge)
    srv.open()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.connect(str(tmp_path / "ctl"))
        c.sendall(_request("fdb-show"))
        c.setblocking(False)
        buf = bytearray()
        while not buf.endswith(b"\n"):
            loop.run_once(max_wait=0.01)
            try:
                buf += c.recv(1 << 20)
            except BlockingIOError:
                pass
        assert json.loads(buf)["result"] == huge and srv.dropped_slow == 0
    finally:
        c.close()
        srv.close()
        loop.close()


def test_a_stuck_client_does_not_stall_forwarding(daemon, prefix):
    d = daemon.start()
    ns1, _ = two_veth_hosts(d, prefix, "10.97.0")
    pinger = Pinger(ns1, "10.97.0.2", count=100_000, interval=0.01)  # stopped below
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        time.sleep(0.5)
        stuck.connect(str(d.rundir / "pyswitch.ctl"))
        stuck.setblocking(False)
        request = _request("show") * 50
        dropped_at = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                stuck.send(request)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                dropped_at = time.monotonic()
                break
        time.sleep(0.5)
    finally:
        pinger.proc.send_signal(2)  # SIGINT: ping prints its summary
        lost, worst_ms = pinger.result(timeout=30)
        stuck.close()
    assert dropped_at is not None, "the daemon kept a client that never reads"
    assert lost <= 1 and worst_ms < 500, pinger.out  # <= 1: the echo in flight at SIGINT
    assert wait_until(lambda: "does not read its replies" in d.log.read_text(), 5)
    # the daemon still answers others
    assert raw_exchange(d.rundir / "pyswitch.ctl", _request("list-br"))[0]["result"] == ["br0"]
