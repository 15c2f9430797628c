"""vhost-user ports against QEMU guests running Linux's virtio-net driver.

Two TCG guests (tests/peers/qemu.py) each get one pyswitch vhost-user port; the test
wires the two ports together in one MiniLoop thread (what one port receives, the other
transmits) and the guests ping each other.  Linux negotiates VERSION_1, MRG_RXBUF,
INDIRECT_DESC and EVENT_IDX and waits for calls (interrupts), so this covers the paths
DPDK's polling virtio-user does not.  Both socket roles are exercised.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyswitch.ports.vhostuser.port import VhostUserClientPort, VhostUserServerPort
from tests.peers.qemu import ping_pair, start_guest
from tests.vhost_frontend import MiniLoop

pytestmark = [pytest.mark.peer, pytest.mark.timeout(150)]

GUEST_TIMEOUT = 110


class Wire:
    """Two ports in one loop thread; frames received on one are transmitted on the other."""

    def __init__(self, ports) -> None:
        self.ports = ports
        self.loop = MiniLoop(on_ready=self._forward)
        for p in ports:
            p.open()
            p.attach(self.loop)
        self.loop.start()

    def _forward(self) -> None:
        a, b = self.ports
        for src, dst in ((a, b), (b, a)):
            frames = src.receive(32)
            if frames:
                dst.transmit(frames)
                src.release()

    def close(self) -> None:
        try:
            for p in self.ports:
                self.loop.run_sync(p.close)
        finally:
            self.loop.stop()
        assert not self.loop.errors, self.loop.errors


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pst"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check(wire: Wire, g0, g1) -> None:
    for g in (g0, g1):
        result = g.ping_result(timeout=100)
        assert result.ok, result
    for p in wire.ports:
        c = p.counters
        assert c.rx_packets >= 5 and c.tx_packets >= 5, c.as_dict()
        assert c.drops.get("bad_descriptor", 0) == 0
        st = p.status()
        assert st["connected"] and st["event_idx"] and st["mergeable_rx"], st
        assert p.vhost_stats["notifications_sent"] > 0  # Linux waits for calls


def test_two_guests_ping_through_server_ports(workdir):
    ports = [VhostUserServerPort(f"vu{i}", {"vhost-sock-dir": str(workdir)}) for i in range(2)]
    wire = Wire(ports)
    try:
        socks = (workdir / "vu0", workdir / "vu1")
        with ping_pair(workdir, socks, role="client", timeout=GUEST_TIMEOUT) as (g0, g1):
            check(wire, g0, g1)
    finally:
        wire.close()
    assert not (workdir / "vu0").exists()


def test_two_guests_ping_through_client_ports(workdir):
    socks = (workdir / "q0.sock", workdir / "q1.sock")
    with ping_pair(workdir, socks, role="server", timeout=GUEST_TIMEOUT) as (g0, g1):
        ports = [VhostUserClientPort(f"vc{i}", {"vhost-server-path": str(s)})
                 for i, s in enumerate(socks)]
        wire = Wire(ports)  # connects (with retries) once QEMU listens
        try:
            check(wire, g0, g1)
        finally:
            wire.close()


JUMBO_SERVE = "ip link set eth0 mtu 9000 && sleep 40"
JUMBO_PING = """ip link set eth0 mtu 9000 || exit 2
n=0
until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do n=$((n+1)); [ $n -gt 40 ] && exit 3; done
ping -c 5 -i 0.3 -W 2 -s 8000 {peer} > /tmp/out 2>&1
cat /tmp/out
grep -q ' 5 packets received' /tmp/out
"""


def test_jumbo_frames_span_mergeable_buffers_and_descriptor_chains(workdir):
    """MTU 9000, 8 KB pings: Linux posts page-sized mergeable RX buffers, so each
    8 KB frame the port writes spans several (num_buffers > 1), and Linux sends each
    one as a scatter-gather chain; both directions must carry every byte."""
    ports = [VhostUserServerPort(f"vj{i}", {"vhost-sock-dir": str(workdir), "mtu": "9000"})
             for i in range(2)]
    wire = Wire(ports)
    try:
        macs = ("02:50:53:00:00:11", "02:50:53:00:00:12")
        with start_guest("pst-j0", workdir / "vj0", macs[0], "10.251.0.1/24", workdir=workdir,
                         action="cmd", script=JUMBO_SERVE, timeout=GUEST_TIMEOUT) as g0, \
             start_guest("pst-j1", workdir / "vj1", macs[1], "10.251.0.2/24", workdir=workdir,
                         action="cmd", script=JUMBO_PING.format(peer="10.251.0.1"),
                         timeout=GUEST_TIMEOUT) as g1:
            line = g1.wait_for("PYSWITCH-CMD-EXIT", timeout=100)
            assert line.strip().endswith("rc=0"), g1.console_text()[-3000:]
            assert g0.running
            # g0's receiveq: more used entries than frames, so frames were merged
            rxq = wire.loop.run_sync(lambda: ports[0].device.rings[0].queue)
            frames_in = ports[0].counters.tx_packets
            assert rxq is not None and rxq.used_idx > frames_in, (rxq.used_idx, frames_in)
        for p in ports:
            c = p.counters
            assert c.rx_bytes > 5 * 8000 and c.tx_bytes > 5 * 8000, c.as_dict()
            assert c.drops.get("bad_descriptor", 0) == 0 and c.drops.get("mtu", 0) == 0
    finally:
        wire.close()
