"""vhost-user ports against a real front end: DPDK testpmd with net_virtio_user.

testpmd runs as its own process (tests/peers/testpmd.py: interactive, killed on exit);
the pyswitch port runs in a MiniLoop thread.  Counts are compared with testpmd's own
``show port stats``.  A missing dpdk-testpmd fails with PeerMissingError (install dpdk-dev).
"""

from __future__ import annotations

import secrets
import time

import pytest

from pyswitch.ports.vhostuser.port import VhostUserClientPort, VhostUserServerPort
from tests.peers.testpmd import Testpmd
from tests.vhost_frontend import PortHarness, wait_for

pytestmark = [pytest.mark.peer, pytest.mark.timeout(120)]

GUEST_MAC = "02:00:00:00:00:01"


def frame(i: int, n: int = 64) -> bytes:
    dst = bytes.fromhex(GUEST_MAC.replace(":", ""))
    src = bytes([2, 0, 0, 0xAA, i >> 8 & 0xFF, i & 0xFF])
    return dst + src + b"\x08\x00" + bytes(n - 14)


def vdev(path: str, queues: int = 1, server: bool = False) -> str:
    extra = ",server=1" if server else ""
    return f"net_virtio_user0,path={path},queues={queues},mac={GUEST_MAC}{extra}"


@pytest.fixture
def server(tmp_path):
    h = PortHarness(VhostUserServerPort("pst" + secrets.token_hex(3),
                                        {"vhost-sock-dir": str(tmp_path)}), keep=64)
    yield h
    h.close()


def settle(h: PortHarness, pmd: Testpmd, before: int = 0, timeout: float = 10) -> int:
    """After ``stop``: wait until we received all that this testpmd sent (``before`` =
    our count when it started); return its count."""
    sent = pmd.port_stats()[0].tx_packets
    assert wait_for(lambda: h.received - before >= sent, timeout), \
        f"received {h.received - before} of {sent}"
    return sent


def up(h: PortHarness, timeout: float = 20) -> bool:
    return wait_for(lambda: h.call(h.port.link_state) == "up", timeout)


def test_testpmd_txonly_into_server_port(server):
    path = server.port.socket_path()
    with Testpmd([vdev(path)], forward_mode="txonly") as pmd:
        pmd.command("start")
        assert up(server), pmd.output()[-2000:]
        time.sleep(3)
        pmd.command("stop")
        sent = settle(server, pmd)
        stats = pmd.port_stats()[0]
    assert sent > 1000, f"testpmd sent only {sent}"
    c = server.port.counters
    assert server.received == c.rx_packets == sent
    assert c.rx_bytes == stats.tx_bytes == 64 * sent  # frames arrive without the virtio header
    f = server.sink[0]
    assert len(f) == 64 and f[12:14] == b"\x08\x00" and f[6:12] == bytes.fromhex("020000000001")
    assert c.drops.get("bad_descriptor", 0) == 0


def test_transmit_into_testpmd_rxonly(server):
    path = server.port.socket_path()
    with Testpmd([vdev(path)], forward_mode="rxonly") as pmd:
        pmd.command("start")
        assert up(server), pmd.output()[-2000:]
        batch = [frame(i) for i in range(32)]
        offered = 0
        for _ in range(200):
            server.call(lambda: server.port.transmit(batch))
            offered += 32
            time.sleep(0.002)
        c = server.port.counters
        assert wait_for(lambda: pmd.port_stats()[0].rx_packets == c.tx_packets, 10)
        stats = pmd.port_stats()[0]
        pmd.command("stop")
    assert c.tx_packets + c.drops.get("no_buffer", 0) == offered
    assert c.tx_packets > offered // 2, c.as_dict()
    assert stats.rx_bytes == 64 * c.tx_packets
    s = server.port.vhost_stats
    assert s["notifications_sent"] == 0  # testpmd polls: NO_INTERRUPT respected


def test_server_port_serves_testpmd_again_after_it_quits(server):
    path = server.port.socket_path()
    total = 0
    for _ in range(2):
        with Testpmd([vdev(path)], forward_mode="txonly") as pmd:
            before = server.received
            pmd.command("start")
            assert up(server), pmd.output()[-2000:]
            time.sleep(1)
            pmd.command("stop")
            total += settle(server, pmd, before)
        assert wait_for(lambda: server.call(server.port.link_state) == "down", 10)
    assert server.port.counters.rx_packets == total  # counters survive the reconnect
    assert server.port.vhost_stats["reconnects"] == 1


def test_client_port_reconnects_to_restarted_testpmd(tmp_path):
    path = str(tmp_path / "pmd.sock")
    h = PortHarness(VhostUserClientPort("pst" + secrets.token_hex(3), {"vhost-server-path": path}),
                    keep=0)
    try:
        time.sleep(0.5)  # the port retries while nobody listens
        assert h.port.conn is None and h.port.vhost_stats["connections"] == 0
        total = 0
        for round_ in range(2):
            with Testpmd([vdev(path, server=True)], forward_mode="txonly",
                         cleanup_paths=(tmp_path / "pmd.sock",)) as pmd:
                before = h.received
                pmd.command("start")
                assert up(h), pmd.output()[-2000:]
                time.sleep(1)
                pmd.command("stop")
                total += settle(h, pmd, before)
            assert wait_for(lambda: h.port.conn is None, 10)
        assert h.port.counters.rx_packets == total > 0
        assert h.port.vhost_stats["reconnects"] == 1
    finally:
        h.close()


def test_multiqueue_both_directions(server):
    path = server.port.socket_path()
    args = ("--rxq=2", "--txq=2")
    with Testpmd([vdev(path, queues=2)], forward_mode="txonly", app_args=args) as pmd:
        pmd.command("start")
        assert up(server), pmd.output()[-2000:]
        assert wait_for(lambda: server.call(server.port.status)["queue_pairs"] == 2, 10)
        time.sleep(2)
        pmd.command("stop")
        sent = settle(server, pmd)
        rings = server.port.device.rings
        tx_used = [rings[1].queue.used_idx, rings[3].queue.used_idx]
        assert all(tx_used), f"both transmitqs carried frames: {tx_used}"
        pmd.command("set fwd rxonly")
        pmd.command("start")
        batch = [frame(i) for i in range(64)]  # 64 source MACs: spread over both receiveqs
        for _ in range(50):
            server.call(lambda: server.port.transmit(batch))
            time.sleep(0.002)
        c = server.port.counters
        assert wait_for(lambda: pmd.port_stats()[0].rx_packets == c.tx_packets, 10)
        rx_used = [rings[0].queue.used_idx, rings[2].queue.used_idx]
        pmd.command("stop")
    assert server.received == sent > 0
    assert all(rx_used), f"both receiveqs carried frames: {rx_used}"
