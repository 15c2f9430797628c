"""vhost-user ports over real unix sockets, against the Python front end of tests/vhost_frontend.py.

The port runs in a MiniLoop thread (select-based PortIO); the test thread plays the guest.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pyswitch.port import PortError, port_type
from pyswitch.ports.vhostuser import protocol as p
from pyswitch.ports.vhostuser.device import (
    OFFERED_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
)
from pyswitch.ports.vhostuser.port import VhostUserClientPort, VhostUserServerPort
from tests.vhost_frontend import DriverQueue, Frontend, GuestRAM, wait_for
from tests.vhost_frontend import PortHarness as Harness

R = p.Request


def frame(dst: int, n: int = 60, src: int = 1) -> bytes:
    return bytes([2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src]) + b"\x08\x00" + bytes([n % 256]) * (n - 14)


@pytest.fixture
def ram():
    r = GuestRAM([(0, 8 << 20)])
    yield r
    r.close()


@pytest.fixture
def server(tmp_path):
    h = Harness(VhostUserServerPort("pst" + secrets.token_hex(3), {"vhost-sock-dir": str(tmp_path)}))
    yield h
    h.close()


@pytest.fixture
def fe(server):
    f = Frontend.connect(server.port.socket_path())
    yield f
    f.close()


def bring_up(fe, ram, pairs=1, features=OFFERED_FEATURES, size=256):
    """Negotiate, share memory, set up ``pairs`` queue pairs; return [(rxq, txq), ...]."""
    fe.negotiate(features)
    fe.set_mem_table(ram)
    queues = []
    for i in range(pairs):
        rxq, txq = DriverQueue(ram, size), DriverQueue(ram, size)
        fe.setup_ring(2 * i, rxq)
        fe.setup_ring(2 * i + 1, txq)
        queues.append((rxq, txq))
    return queues


def test_registered_under_ovs_names():
    assert port_type("dpdkvhostuser") is VhostUserServerPort
    assert port_type("dpdkvhostuserclient") is VhostUserClientPort


def test_guest_to_switch(server, fe, ram):
    ((rxq, txq),) = bring_up(fe, ram)
    frames = [frame(i, 60 + i) for i in range(40)]
    for i, f in enumerate(frames):
        txq.send_frame(f, ["together", "apart", "indirect"][i % 3])
    fe.kick(1)
    assert wait_for(lambda: len(server.sink) == 40), server.sink
    assert server.sink == frames
    assert wait_for(lambda: txq.used_idx() == 40)  # buffers returned to the guest
    assert fe.calls_seen(1) >= 1
    c = server.port.counters
    assert (c.rx_packets, c.rx_bytes) == (40, sum(map(len, frames)))


def test_switch_to_guest_one_call_per_batch(server, fe, ram):
    ((rxq, txq),) = bring_up(fe, ram)
    rxq.post_rx_buffers(64)
    fe.kick(0)  # the receiveq starts on its first kick
    assert wait_for(lambda: server.call(lambda: server.port.link_state()) == "down")
    fe.kick(1)
    assert wait_for(lambda: server.call(server.port.link_state) == "up")
    frames = [frame(7, 60 + i) for i in range(32)]
    assert server.call(lambda: server.port.transmit(frames)) == 32
    assert fe.calls_seen(0) == 1  # one eventfd write for the whole batch
    assert rxq.receive_frames() == [(f, 1) for f in frames]
    assert server.port.counters.tx_packets == 32


def test_no_buffer_drops_are_counted(server, fe, ram):
    ((rxq, _),) = bring_up(fe, ram)
    rxq.post_rx_buffers(4)
    fe.kick(0)
    assert wait_for(lambda: server.port.device.rings[0].started)
    assert server.call(lambda: server.port.transmit([frame(1)] * 10)) == 4
    c = server.port.counters
    assert c.drops["no_buffer"] == 6 and c.tx_dropped == 6 and c.tx_packets == 4


def test_transmit_without_front_end_is_link_down(server):
    assert server.call(lambda: server.port.transmit([frame(1)] * 3)) == 0
    assert server.port.counters.drops["link_down"] == 3


def test_polling_front_end_without_kick_fds(server, fe, ram):
    fe.negotiate()
    fe.set_mem_table(ram)
    txq = DriverQueue(ram, 64)
    fe.setup_ring(1, txq, kick=False)  # no-fd flag: the back end must poll
    txq.send_frame(frame(3))
    assert wait_for(lambda: server.sink == [frame(3)])
    txq.send_frame(frame(4))
    assert wait_for(lambda: server.sink == [frame(3), frame(4)])


def test_disconnect_tears_down_and_next_front_end_is_served(server, ram):
    fe1 = Frontend.connect(server.port.socket_path())
    ((_, txq),) = bring_up(fe1, ram)
    txq.send_frame(frame(1))
    fe1.kick(1)
    assert wait_for(lambda: len(server.sink) == 1)
    fe1.close()
    assert wait_for(lambda: server.port.conn is None)
    assert server.call(server.port.link_state) == "down"
    assert server.port.device.memory is None
    ram2 = GuestRAM([(0, 4 << 20)])
    fe2 = Frontend.connect(server.port.socket_path())
    try:
        ((_, txq2),) = bring_up(fe2, ram2)
        txq2.send_frame(frame(2))
        fe2.kick(1)
        assert wait_for(lambda: len(server.sink) == 2)
        assert server.port.counters.rx_packets == 2  # counters survive the reconnect
        assert server.port.vhost_stats["reconnects"] == 1
    finally:
        fe2.close()
        ram2.close()


def test_second_front_end_is_refused(server, fe, ram):
    bring_up(fe, ram)
    other = Frontend.connect(server.port.socket_path())
    try:
        other.sock.settimeout(2)
        assert other.sock.recv(1) == b""  # closed by the back end
    finally:
        other.close()
    assert p.U64.unpack(fe.request(R.GET_FEATURES).payload)[0] == OFFERED_FEATURES


def test_garbage_drops_connection_not_port(server, ram):
    bad = Frontend.connect(server.port.socket_path())
    bad.sock.sendall(b"\xff" * 12)  # version bits wrong
    bad.sock.settimeout(2)
    assert bad.sock.recv(1) == b""
    bad.close()
    good = Frontend.connect(server.port.socket_path())
    try:
        bring_up(good, ram)
    finally:
        good.close()


def test_out_of_order_setup(server, fe, ram):
    """Kick fd and addresses before the memory table: nothing starts until it is complete."""
    fe.negotiate()
    txq = DriverQueue(ram, 64)
    fe.request(R.SET_VRING_CALL, p.U64.pack(1), [os.eventfd(0)])
    k = os.eventfd(0, os.EFD_NONBLOCK)
    fe.kicks[1] = k
    fe.request(R.SET_VRING_KICK, p.U64.pack(1), [k])
    a = txq.addr(1)
    fe.request(R.SET_VRING_ADDR, p.VRING_ADDR.pack(1, 0, a.desc, a.used, a.avail, 0))
    txq.send_frame(frame(9))
    fe.kick(1)  # a kick with no memory yet: remembered, ring stays stopped
    fe.request(R.SET_VRING_NUM, p.VRING_STATE.pack(1, 64))
    assert wait_for(lambda: server.port.vhost_stats["kicks"] == 1)
    assert not server.port.device.rings[1].started
    fe.request(R.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    fe.set_mem_table(ram)  # now complete: the remembered kick starts the ring
    assert wait_for(lambda: server.sink == [frame(9)])


def test_disabled_transmitq_is_drained_not_forwarded(server, fe, ram):
    ((_, txq),) = bring_up(fe, ram)
    fe.request(R.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 0))
    for i in range(5):
        txq.send_frame(frame(i))
    fe.kick(1)
    assert wait_for(lambda: txq.used_idx() == 5)
    assert server.sink == [] and server.port.vhost_stats["tx_disabled_discards"] == 5


def test_bad_descriptor_in_guest_ring_is_counted(server, fe, ram):
    ((_, txq),) = bring_up(fe, ram)
    h = txq.free.pop(0)
    txq.write_desc(h, 0xDEAD_0000_0000, 100, 0)
    txq.make_available([h])
    txq.send_frame(frame(5))
    fe.kick(1)
    assert wait_for(lambda: server.sink == [frame(5)])
    assert server.port.counters.drops["bad_descriptor"] == 1
    assert wait_for(lambda: txq.used_idx() == 2)


def test_event_idx_suppresses_calls(server, fe, ram):
    features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_RING_F_EVENT_IDX
    ((rxq, _),) = bring_up(fe, ram, features=features)
    rxq.post_rx_buffers(16)
    fe.kick(0)
    assert wait_for(lambda: server.port.device.rings[0].started)
    rxq.set_used_event(10)  # "call me once used passes 10"
    for _ in range(4):
        server.call(lambda: server.port.transmit([frame(1)] * 2))  # used 2, 4, 6, 8: no call
    assert fe.calls_seen(0) == 0
    server.call(lambda: server.port.transmit([frame(1)] * 3))  # used 11: crosses 10
    assert fe.calls_seen(0) == 1
    s = server.port.vhost_stats
    assert s["notifications_suppressed"] >= 4 and s["notifications_sent"] >= 1
    assert len(rxq.receive_frames()) == 11


def test_multiqueue_spreads_and_collects(server, fe, ram):
    queues = bring_up(fe, ram, pairs=2, size=64)
    for i, (rxq, txq) in enumerate(queues):
        rxq.post_rx_buffers(48)
        fe.kick(2 * i)
        txq.send_frame(frame(i, 80))
        fe.kick(2 * i + 1)
    assert wait_for(lambda: sorted(server.sink) == sorted([frame(0, 80), frame(1, 80)]))
    assert server.call(server.port.status)["queue_pairs"] == 2
    frames = [frame(d) for d in range(40)]
    assert server.call(lambda: server.port.transmit(frames)) == 40
    got = [queues[0][0].receive_frames(), queues[1][0].receive_frames()]
    assert all(got), "both receiveqs carry traffic"
    assert sorted(f for q in got for f, _ in q) == sorted(frames)
    # queue pair 1 disabled: everything goes to pair 0
    fe.request(R.SET_VRING_ENABLE, p.VRING_STATE.pack(2, 0))
    server.call(lambda: server.port.transmit(frames[:8]))
    assert len(queues[0][0].receive_frames()) == 8 and queues[1][0].receive_frames() == []


def test_status_and_socket_options(tmp_path):
    name = "pst" + secrets.token_hex(3)
    opts = {"vhost-sock-dir": str(tmp_path / "sub"), "vhost-sock-mode": "0660",
            "vhost-sock-owner": "0", "vhost-sock-group": "root"}
    h = Harness(VhostUserServerPort(name, opts))
    try:
        path = tmp_path / "sub" / name
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, 0)
        s = h.call(h.port.status)
        assert s["socket"] == str(path) and s["connected"] is False and s["role"] == "server"
    finally:
        h.close()
    assert not path.exists()  # close removes the socket


@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "x..y", ""])
def test_bad_port_names_refused(name, tmp_path):
    with pytest.raises(PortError):
        VhostUserServerPort.validate_options(name, {"vhost-sock-dir": str(tmp_path)})


@pytest.mark.parametrize("opts", [{"vhost-sock-mode": "999"}, {"vhost-sock-owner": "pst-nobody-x"},
                                  {"bogus": "1"}, {"mtu": "67"}, {"mtu": "9k"}])
def test_bad_options_refused(opts):
    with pytest.raises(PortError):
        VhostUserServerPort.validate_options("p0", opts)


def test_stale_socket_replaced_live_one_refused(tmp_path):
    path = tmp_path / "p0"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # stale file, nobody listens
    port = VhostUserServerPort("p0", {"vhost-sock-dir": str(tmp_path)})
    port.open()
    try:
        other = VhostUserServerPort("p0", {"vhost-sock-dir": str(tmp_path)})
        with pytest.raises(PortError, match="in use"):
            other.open()
    finally:
        port.close()


def test_client_retries_until_server_appears_and_reconnects(tmp_path, ram):
    path = str(tmp_path / "fe.sock")
    h = Harness(VhostUserClientPort("pst" + secrets.token_hex(3), {"vhost-server-path": path}))
    try:
        assert wait_for(lambda: h.port._backoff >= 0.8, timeout=5)  # 0.1 0.2 0.4 ... doubling
        lsock = socket.socket(socket.AF_UNIX)
        lsock.bind(path)
        lsock.listen(1)
        lsock.settimeout(5)
        conn, _ = lsock.accept()
        fe = Frontend(conn)
        ((_, txq),) = bring_up(fe, ram)
        txq.send_frame(frame(1))
        fe.kick(1)
        assert wait_for(lambda: h.sink == [frame(1)])
        assert h.call(h.port.link_state) == "down"  # RX ring not started yet
        fe.close()  # the front end goes away: the port reconnects
        conn2, _ = lsock.accept()
        fe2 = Frontend(conn2)
        ((_, txq2),) = bring_up(fe2, ram)
        txq2.send_frame(frame(2))
        fe2.kick(1)
        assert wait_for(lambda: h.sink == [frame(1), frame(2)])
        assert h.port.vhost_stats["reconnects"] == 1
        fe2.close()
        lsock.close()
    finally:
        h.close()


def test_client_requires_server_path():
    with pytest.raises(PortError, match="vhost-server-path"):
        VhostUserClientPort.validate_options("c0", {})


def test_event_idx_driver_that_kicks_only_when_asked_never_stalls(server, fe, ram):
    """A driver honouring avail_event (virtio 2.7.10) kicks only when its new avail
    entries cross the index the device asked for.  If the device asked wrongly, or
    forgot to look again after asking, frames would sit in the ring: none may."""
    import random

    rnd = random.Random(7)
    features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_RING_F_EVENT_IDX
    ((_, txq),) = bring_up(fe, ram, features=features, size=64)
    sent, kicks, asked = 0, 0, 0
    for _ in range(40):
        txq.free.extend(h for h, _ in txq.take_used())  # recycle, as a driver does
        for _ in range(2):  # two bursts back to back: the second may race the device
            burst = rnd.randint(1, 12)
            old = txq.avail_idx
            for _ in range(burst):
                txq.send_frame(frame(sent % 250, 60))
                sent += 1
            new, event = txq.avail_idx, txq.avail_event()
            asked += 1
            if ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF):
                fe.kick(1)
                kicks += 1
        assert wait_for(lambda: len(server.sink) == sent, 3), (len(server.sink), sent, kicks)
    assert 0 < kicks <= asked


def test_mtu_drops_in_both_directions(server, fe, ram):
    ((rxq, txq),) = bring_up(fe, ram)
    rxq.post_rx_buffers(8, size=4096)
    fe.kick(0)
    tagged = frame(1, 1518)[:12] + b"\x81\x00\x00\x05" + frame(1, 1518)[16:]
    for f in (frame(1, 1514), frame(2, 1515), tagged):
        txq.send_frame(f)
    fe.kick(1)
    assert wait_for(lambda: txq.used_idx() == 3)  # all buffers go back to the guest
    assert server.sink == [frame(1, 1514), tagged]
    c = server.port.counters
    assert c.drops["mtu"] == 1 and c.rx_dropped == 1
    sent = server.call(lambda: server.port.transmit([frame(3, 1600), frame(4, 100)]))
    assert sent == 1 and c.drops["mtu"] == 2 and c.tx_dropped == 1 and c.tx_packets == 1
    assert [f for f, _ in rxq.receive_frames()] == [frame(4, 100)]


def test_polling_driver_without_call_fd(server, fe, ram):
    """SET_VRING_CALL with the no-fd bit: the driver polls its used ring; the port must
    deliver without ever signalling (and without failing on the missing fd)."""
    fe.negotiate()
    fe.set_mem_table(ram)
    rxq = DriverQueue(ram, 64)
    fe.setup_ring(0, rxq, call=False)
    rxq.post_rx_buffers(8)
    fe.kick(0)
    assert wait_for(lambda: server.port.device.rings[0].started)
    assert server.call(lambda: server.port.transmit([frame(1), frame(2)])) == 2
    assert [f for f, _ in rxq.receive_frames()] == [frame(1), frame(2)]
    assert server.port.vhost_stats["notifications_sent"] == 0


def test_front_end_stalled_mid_message_does_not_block_the_port(server, ram):
    """Half a message and silence: the loop keeps serving (it never waits on a socket)."""
    import time as _time

    stalled = Frontend.connect(server.port.socket_path())
    try:
        stalled.sock.sendall(p.HEADER.pack(p.Request.SET_FEATURES, 1, 8) + b"\0\0")
        _time.sleep(0.1)
        t0 = _time.monotonic()
        assert server.call(server.port.link_state) == "down"
        assert _time.monotonic() - t0 < 0.5
    finally:
        stalled.close()
    assert wait_for(lambda: server.port.conn is None)  # EOF mid-message: dropped
    good = Frontend.connect(server.port.socket_path())
    try:
        bring_up(good, ram)
    finally:
        good.close()


def test_release_asks_again_for_a_transmitq_the_batch_did_not_reach(server, fe, ram):
    """Two transmitqs kicked once each; the first batch (32) is all from ring 1.  The
    kick of ring 3 is already consumed, so release() itself must ask to be serviced
    again, or ring 3's frames wait forever (seen with testpmd, 2 queue pairs)."""
    import time as _time

    queues = bring_up(fe, ram, pairs=2, size=128)
    asked: list[int] = []
    server.loop.on_ready = lambda: asked.append(1)  # the test drives receive itself
    for k in range(32):
        queues[0][1].send_frame(frame(k, 60))
    for k in range(5):
        queues[1][1].send_frame(frame(k, 61))
    fe.kick(1)
    fe.kick(3)
    port = server.port
    assert wait_for(lambda: port.device.rings[1].started and port.device.rings[3].started)

    def drain_once() -> int:
        n = len(port.receive(32))
        port.release()
        return n

    got = 0
    for _ in range(10):
        _time.sleep(0.05)
        asked.clear()
        got += server.call(drain_once)
        _time.sleep(0.05)  # the loop runs on_ready if release() said rx_ready
        if not asked:
            break
    assert got == 37


def test_reconnects_leak_no_file_descriptors(server):
    """Ten front ends in a row, each sharing memory and eventfds: after each goes away the
    port holds exactly the descriptors it held before (no kick, call, memory or socket fd)."""
    def count() -> int:
        return len(os.listdir("/proc/self/fd"))

    def guest_maps() -> int:
        with open("/proc/self/maps") as f:
            return sum("pst-guest" in line for line in f)

    baseline = count()
    for _ in range(10):
        ram = GuestRAM([(0, 1 << 20), (0x4000_0000, 1 << 20)])
        fe = Frontend.connect(server.port.socket_path())
        try:
            bring_up(fe, ram, pairs=2, size=64)
            fe.kick(0)
            fe.kick(1)
            assert wait_for(lambda: server.port.device.rings[1].started)
        finally:
            fe.close()
            ram.close()
        assert wait_for(lambda: server.port.conn is None)
        assert wait_for(lambda: count() == baseline, 2), (count(), baseline)
        assert wait_for(lambda: guest_maps() == 0, 2), "guest memory still mapped"
    assert server.port.vhost_stats["connections"] == 10


@contextmanager
def busy_listener(path: str) -> Iterator[None]:
    """A unix socket that listens on ``path`` but never accepts, its backlog full: a
    blocking connect() to it waits forever."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    try:
        while True:  # fill the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            fillers.append(s)
            try:
                s.connect(path)
            except BlockingIOError:
                break
        yield
    finally:
        for s in fillers:
            s.close()
        listener.close()


class Blocked(Exception):
    pass


@contextmanager
def must_not_block(what: str, seconds: float = 2.0) -> Iterator[None]:
    """Fail with ``Blocked(what)`` if the body is still running after ``seconds``."""
    def timeout(_sig, _frame):
        raise Blocked(what)

    old = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_client_connect_never_blocks_on_a_full_backlog(tmp_path):
    """A server that listens but does not accept (a hung QEMU, a stray process): once its
    backlog is full, a blocking unix connect() waits forever -- in the switch's loop.
    The client port must return at once and retry later."""
    path = str(tmp_path / "busy.sock")
    h = None
    with busy_listener(path):
        try:
            with must_not_block("the client port's connect() blocked the loop"):
                h = Harness(VhostUserClientPort("pst" + secrets.token_hex(3), {"vhost-server-path": path}))
            assert h.port.conn is None  # not connected, a retry is scheduled
            assert h.call(lambda: h.port.link_state()) == "down"
        finally:
            if h is not None:
                h.close()


def test_close_mid_message_leaks_no_fd(tmp_path, ram):
    """A front end sends the header of SET_MEM_TABLE with its fds and stalls before the
    payload; the switch removes the port.  The fds of the incomplete message go too."""
    def count() -> int:
        return len(os.listdir("/proc/self/fd"))

    baseline = count()
    h = Harness(VhostUserServerPort("pst" + secrets.token_hex(3), {"vhost-sock-dir": str(tmp_path)}))
    fe = Frontend.connect(h.port.socket_path())
    try:
        fds = [os.dup(fd) for fd in ram.fds()]
        socket.send_fds(fe.sock, [p.HEADER.pack(p.Request.SET_MEM_TABLE, 1, 40)], fds)
        for fd in fds:
            os.close(fd)
        assert wait_for(lambda: len(h.port._reader._fds) == 1)  # header in, payload awaited
    finally:
        h.close()
        fe.close()
    assert wait_for(lambda: count() == baseline, 2), (count(), baseline)


def test_unexpected_error_in_a_handler_drops_the_connection_and_leaks_no_fd(server, ram):
    """Whatever a message handler raises (here: a bug, simulated), the port drops that
    front end -- closing the fds of the messages that came with it in the same read --
    and serves the next one; the exception does not reach the loop."""
    def count() -> int:
        return len(os.listdir("/proc/self/fd"))

    def broken(_msg):
        raise RuntimeError("simulated bug in a handler")

    baseline = count()
    server.port.device._handlers[R.SET_OWNER] = broken
    bad = Frontend.connect(server.port.socket_path())
    try:
        import threading
        import time as _time

        busy = threading.Thread(target=server.call, args=(lambda: _time.sleep(0.5),))
        busy.start()  # hold the loop so that both messages are there when it reads
        _time.sleep(0.1)
        efd = os.eventfd(0)
        bad.sock.sendall(p.encode(R.SET_OWNER))
        socket.send_fds(bad.sock, [p.encode(R.SET_VRING_CALL, p.U64.pack(0))], [efd])
        os.close(efd)
        busy.join()
        bad.sock.settimeout(2)
        assert bad.sock.recv(1) == b""  # dropped
    finally:
        bad.close()
    assert wait_for(lambda: server.port.conn is None)
    assert wait_for(lambda: count() == baseline, 2), (count(), baseline)
    assert not server.loop.errors
    del server.port.device._handlers[R.SET_OWNER]


def test_corrupt_receiveq_avail_index_stops_that_ring(server, fe, ram):
    """The guest moves its receiveq's avail index by more than the ring size: like a
    corrupt transmitq, the ring is stopped and counted (broken_rings, log), not left
    silently turning every frame sent to it into a no_buffer drop."""
    ((rxq, _),) = bring_up(fe, ram)
    rxq.post_rx_buffers(4)
    fe.kick(0)
    assert wait_for(lambda: server.port.device.rings[0].started)
    rxq.avail_idx += 1000
    rxq.make_available([])
    assert server.call(lambda: server.port.transmit([frame(1)] * 2)) == 0
    assert server.port.vhost_stats["broken_rings"] == 1
    assert not server.port.device.rings[0].started
    assert server.call(lambda: server.port.transmit([frame(1)])) == 0
    assert server.port.counters.drops["link_down"] == 1  # no receiveq left


def test_socket_in_use_by_a_server_that_does_not_accept_is_refused_at_once(tmp_path):
    """open() probes an existing socket path to tell a stale file from a live server; the
    probe must not wait on a live server whose backlog is full (it would hold the loop)."""
    path = str(tmp_path / "p1")
    with busy_listener(path), must_not_block("the stale-socket probe blocked"):
        with pytest.raises(PortError, match="in use"):
            VhostUserServerPort("p1", {"vhost-sock-dir": str(tmp_path)}).open()
    assert os.path.exists(path)  # a live server's socket is left alone


def test_poll_mode_asks_the_guest_not_to_kick(server, fe, ram):
    """While the switch polls the port, the transmitqs carry NO_NOTIFY; when polling
    stops the flag goes and a frame queued meanwhile is reported (no lost wake-up)."""
    ((rxq, txq),) = bring_up(fe, ram, features=OFFERED_FEATURES & ~(1 << VIRTIO_RING_F_EVENT_IDX))
    txq.send_frame(frame(3))
    fe.kick(1)
    assert wait_for(lambda: len(server.sink) == 1)
    assert server.call(lambda: server.port.poll_mode(True)) is False
    assert txq.used_flags() & 1  # VIRTQ_USED_F_NO_NOTIFY
    assert server.call(lambda: server.port.poll_mode(False)) is False  # nothing waiting
    assert not txq.used_flags() & 1
    server.call(lambda: server.port.poll_mode(True))
    txq.send_frame(frame(4))  # no kick: the guest was told not to
    assert server.call(lambda: server.port.poll_mode(False)) is True
