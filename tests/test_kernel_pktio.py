"""The compiled packet-I/O kernel (``pyswitch/fastpath/_pktio.pyx``) against the real kernel.

A veth pair with its far end in a namespace; frames are sent from there by a packet
socket (``tests/nsprobe.py``, or a flooding script) and read through the kernel's
``TPACKET_V3`` ring.  The kernel is loaded with :func:`pyswitch.fastpath.load_kernel`, so
the sanitizer runner's ASan/UBSan build (``PYSWITCH_KERNEL_DIR``) is the one tested there.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import ModuleType

import pytest
from pyswitch.ports import afpacket
from pyswitch.ports.afpacket import TPACKET_V3, _open_socket, open_ring
from pyswitch.ports.tap import TapPort
from scapy.layers.l2 import Dot1Q, Ether

from pyswitch import fastpath
from pyswitch.port import PortCounters
from tests.netns_util import netns, ns_exec, ping_argv, require_root, unique_name, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]

ETYPE = 0x88B5  # IEEE local experimental: no stack in either namespace answers it
HERE_MAC, PEER_MAC = "02:00:00:00:cc:01", "02:00:00:00:cc:02"


@pytest.fixture
def kern() -> ModuleType:
    """The ``_pktio`` kernel; a failure naming the reason if it is not built."""
    try:
        return fastpath.load_kernel("_pktio")
    except ImportError as exc:
        pytest.fail(f"the _pktio kernel is not built ({exc}): "
                    "PYSWITCH_ONLY=_pktio python setup.py build_ext --inplace")


@contextlib.contextmanager
def veth_pair(mtu: int = 1500) -> Iterator[tuple[str, str]]:
    """``(here, ns)``: veth ``here`` in this namespace, its peer ``eth0`` in namespace
    ``ns``; both up with IPv6 off (no stray frames), both at ``mtu``; always removed."""
    require_root()
    here = unique_name("pstk")
    with netns() as ns:
        subprocess.run(["ip", "link", "add", here, "mtu", str(mtu), "type", "veth", "peer",
                        "name", "eth0", "mtu", str(mtu), "netns", ns], check=True, timeout=10)
        try:
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{here}.disable_ipv6=1"], check=False)
            ns_exec(ns, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1", check=False)
            ns_exec(None, "ip", "link", "set", here, "address", HERE_MAC, "up")
            ns_exec(ns, "ip", "link", "set", "eth0", "address", PEER_MAC, "up")
            yield here, ns
        finally:
            subprocess.run(["ip", "link", "del", here], capture_output=True, check=False,
                           timeout=10)


def ns_send(ns: str, frames: list[bytes]) -> None:
    """Send ``frames`` in order from a packet socket on ``eth0`` inside ``ns``."""
    argv = [sys.executable, "-m", "tests.nsprobe", "send", "eth0", *(f.hex() for f in frames)]
    ns_exec(ns, *argv, timeout=30)


def ours(frames: list[bytes]) -> list[bytes]:
    """The test's frames: EtherType 0x88b5, directly or under one or two VLAN tags."""
    out = []
    for f in frames:
        pos = 12
        while f[pos:pos + 2] in (b"\x81\x00", b"\x88\xa8"):
            pos += 4
        if f[pos:pos + 2] == b"\x88\xb5":
            out.append(bytes(f))
    return out


def collect(ring: object, want: int, timeout: float = 5.0) -> list[bytes]:
    """Receive from ``ring`` (waiting on its fd) until ``want`` test frames came."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        select.select([ring.fileno()], [], [], 0.05)  # type: ignore[attr-defined]
        got += ours(list(ring.receive(32)))  # type: ignore[attr-defined]
        ring.release()  # type: ignore[attr-defined]
    return got


def frame(payload: bytes, *tags: tuple[int, int]) -> bytes:
    """An 0x88b5 frame from the peer with VLAN ``tags`` as ``(tpid, tci)``, outer first."""
    head = bytes.fromhex(HERE_MAC.replace(":", "") + PEER_MAC.replace(":", ""))
    return head + b"".join(struct.pack("!HH", t, c) for t, c in tags) + b"\x88\xb5" + payload


TAGGED = [
    frame(b"untagged" + bytes(50)),
    frame(b"vlan 11 prio 3" + bytes(50), (0x8100, 3 << 13 | 11)),  # odd: every bit counts
    frame(b"priority tag" + bytes(50), (0x8100, 5 << 13)),
    frame(b"vid 0 prio 0" + bytes(50), (0x8100, 0)),
    frame(b"802.1ad" + bytes(50), (0x88A8, 0x1F01)),  # DEI set
    frame(b"qinq" + bytes(50), (0x88A8, 21), (0x8100, 4093)),
]


RINGS = pytest.mark.parametrize("tpacket", [3, 2], ids=["v3", "v2"])


@RINGS
def test_tagged_frames_keep_their_tag(kern: ModuleType, tpacket: int) -> None:
    with veth_pair() as (here, ns):
        c = PortCounters()
        ring = open_ring(here, 1500, c, kern, tpacket=tpacket)
        try:
            assert type(ring).__name__ == f"PacketRingV{tpacket}"
            ns_send(ns, TAGGED)
            got = collect(ring, len(TAGGED))
        finally:
            ring.close()
    assert got == TAGGED, [f.hex() for f in got]
    assert c.rx_packets >= len(TAGGED) and c.rx_bytes >= sum(map(len, TAGGED))


@RINGS
def test_frames_at_the_mtu_and_above(kern: ModuleType, tpacket: int) -> None:
    """The ring's limit is the port's MTU + 14 (+ 4 with a VLAN tag); both veth ends
    carry bigger frames, so the kernel delivers them and the ring must drop them."""
    with veth_pair(mtu=1600) as (here, ns):
        c = PortCounters()
        ring = open_ring(here, 1500, c, kern, tpacket=tpacket)
        try:
            at_mtu = frame(bytes(1500))  # 1514 bytes
            tagged_at_mtu = frame(bytes(1500), (0x8100, 7))  # 1518
            over = [frame(bytes(1501)), frame(bytes(1501), (0x8100, 7)),  # 1515, 1519
                    frame(bytes(1500), (0x88A8, 1), (0x8100, 7)), frame(bytes(1580))]
            ns_send(ns, [over[0], at_mtu, over[1], tagged_at_mtu, *over[2:]])
            ns_send(ns, [frame(b"last" + bytes(60))])
            got = collect(ring, 3)
        finally:
            ring.close()
    assert [len(f) for f in got] == [1514, 1518, 78]
    assert got[:2] == [at_mtu, tagged_at_mtu]
    assert c.drops == {"mtu": 4} and c.rx_dropped == 4


FLOOD = r"""
import socket, struct, sys
n, size = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
head = bytes.fromhex(sys.argv[3])
pad = bytes(range(256)) * 8
for i in range(n):
    s.send(head + struct.pack("!I", i) + pad[i % 256:i % 256 + size - len(head) - 4])
"""


def flood_frame(seq: int, size: int = 64) -> bytes:
    """The frame number ``seq`` the FLOOD script sends."""
    head = frame(b"")
    return head + struct.pack("!I", seq) + (bytes(range(256)) * 8)[seq % 256:][:size - len(head) - 4]


@RINGS
def test_ring_wraps_over_many_blocks_under_a_flood(kern: ModuleType, tpacket: int) -> None:
    """A 4-block ring (V2: 128 slots), 40,000 frames flooded at it while the reader
    pauses now and then: every frame read is whole and in order, the ring wraps many
    times, the kernel's drops are counted as no_buffer, and the ring goes on receiving
    after the flood."""
    n = 40_000
    with veth_pair() as (here, ns):
        c = PortCounters()
        ring = open_ring(here, 1500, c, kern, 4 << 16, tpacket)
        try:
            seqs: list[int] = []
            bad: list[bytes] = []
            sender = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", FLOOD,
                                       str(n), "64", frame(b"").hex()])
            try:
                rounds = 0
                while sender.poll() is None or rounds < 3:
                    if sender.poll() is not None:
                        rounds += 1
                    for _ in range(200):
                        select.select([ring.fileno()], [], [], 0.01)
                        for f in ours(ring.receive(32)):
                            seq = struct.unpack_from("!I", f, 14)[0]
                            if f != flood_frame(seq):
                                bad.append(f)
                            seqs.append(seq)
                    time.sleep(0.02)  # a pause: the ring overflows, the kernel drops
            finally:
                sender.kill()
                sender.wait()
            ring.poll_kernel_drops()
            ns_send(ns, [frame(b"after the flood" + bytes(50))])
            after = collect(ring, 1)
        finally:
            ring.close()
    assert not bad, f"{len(bad)} frames damaged, first {bad[0].hex()}"
    assert seqs == sorted(set(seqs)), "frames out of order or repeated"
    drops = c.drops.get("no_buffer", 0)
    assert drops > 0 and c.rx_dropped == drops, c.drops
    assert drops <= n - len(seqs), "a counted drop must be a frame we did not get"
    wraps = ring.blocks_read / 4 if tpacket == 3 else len(seqs) / ring.ring_info()["ring_slots"]
    assert wraps > 10, f"the ring wrapped only {wraps} times"
    assert after == [frame(b"after the flood" + bytes(50))]
    print(f"\nflood (V{tpacket}): {len(seqs)} of {n} read, {drops} kernel drops, "
          f"the ring wrapped {wraps:.0f} times")


def test_a_block_with_few_frames_is_retired_by_timeout(kern: ModuleType) -> None:
    """Three frames do not fill a 64 KiB block: the kernel hands it over when
    ``retire_ms`` pass, and the fd becomes readable then."""
    with veth_pair() as (here, ns):
        c = PortCounters()
        ring = kern.PacketRingV3(_open_socket(here, TPACKET_V3), here, 1500, c, 4 << 16, 10)
        try:
            sent = [frame(bytes([i]) * 60) for i in range(3)]
            ns_send(ns, sent)
            readable, _, _ = select.select([ring.fileno()], [], [], 1.0)
            assert readable, "no block handed over within 1 s"
            got = ours(ring.receive(32))
        finally:
            ring.close()
    assert got == sent
    assert ring.blocks_by_timeout >= 1 and ring.blocks_read >= 1


@pytest.mark.parametrize("path", ["python", "compiled"])
def test_a_full_transmit_queue_counts_tx_full(kern: ModuleType, path: str) -> None:
    """A tiny token-bucket qdisc on the veth: past its limit the kernel refuses frames
    (ENOBUFS); each batch's first refusal is retried, then the rest is ``tx_full``."""
    with veth_pair() as (here, _ns):
        ns_exec(None, "tc", "qdisc", "add", "dev", here, "root", "tbf", "rate", "100kbit",
                "burst", "1600", "limit", "3000")
        c = PortCounters()
        ring = open_ring(here, 1500, c, kern if path == "compiled" else None)
        try:
            batch = [frame(bytes([i]) * 200) for i in range(32)]
            sent = sum(ring.transmit(batch) for _ in range(10))
        finally:
            ring.close()
    assert c.drops.get("tx_full", 0) > 0, c.drops
    assert sent + c.drops["tx_full"] == 320 and c.tx_packets == sent, (sent, c.drops)
    assert set(c.drops) == {"tx_full"} and c.tx_bytes == sent * len(batch[0])


def test_tap_with_the_host_side_down_counts_as_the_python_path(kern: ModuleType) -> None:
    """Both paths on a TAP whose link is down: the same return values and counters
    (writes fail with EIO: link_down for the rest of the batch; reads find nothing)."""
    seen = {}
    for path in ("python", "compiled"):
        require_root()
        tap = TapPort(unique_name(), {"mtu": "1000"}, pktio=kern if path == "compiled" else None)
        try:
            tap.open()
            ns_exec(None, "ip", "link", "set", tap.ifname, "down")
            head = bytes(Ether(src=HERE_MAC, dst=PEER_MAC, type=ETYPE))
            tagged = bytes(Ether(src=HERE_MAC, dst=PEER_MAC) / Dot1Q(vlan=3, type=ETYPE))
            sent = tap.transmit([head + bytes(1001), b"\x00" * 13, head + bytes(50),
                                 tagged + bytes(1000), head])
            got = list(tap.receive(32))
            seen[path] = (sent, got, tap.counters.as_dict(), tap.link_state())
        finally:
            tap.close()
    assert seen["python"][0] == 0 and seen["python"][2]["drops"] == {
        "mtu": 1, "malformed": 1, "link_down": 3}
    assert seen["compiled"] == seen["python"]


@contextlib.contextmanager
def running(sw: object) -> Iterator[None]:
    """Run ``sw``'s event loop on a thread until the block ends."""
    th = threading.Thread(target=sw.run, name="pst-pktio-switch")  # type: ignore[attr-defined]
    th.start()
    try:
        yield
    finally:
        sw.stop()  # type: ignore[attr-defined]
        th.join(10)
        assert not th.is_alive(), "the switch loop did not stop"


def test_ping_through_a_bridge_on_compiled_veth_ports(
    kern: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pyswitch bridge (in this process) with two veth ports whose namespaces ping
    each other; the data path gives the ports the _pktio kernel only (the other kernels
    are not involved in veth I/O)."""
    from pyswitch.switch import Switch
    from pyswitch.topology import load_topology_text

    require_root()
    monkeypatch.setattr(fastpath, "_current", fastpath.Datapath(
        "compiled", "compiled", "test: _pktio only", {"_pktio": kern}))
    p = "pst" + secrets.token_hex(2)
    net = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}"
    topo = "bridges:\n  br0:\n    ports:\n" + "".join(
        f"      {p}{x}: {{type: veth, options: {{netns: {p}n{x}, "
        f"peer-address: {net}.{i}/24}}}}\n" for i, x in ((1, "a"), (2, "b")))
    sw = Switch()
    try:
        sw.build(load_topology_text(topo, "pktio.yaml"))
        rings = {type(sw.port(n)._ring).__name__ for n in sw.port_names()}  # type: ignore[attr-defined]
        assert rings == {f"PacketRingV{afpacket.COMPILED_TPACKET}"}  # the compiled default
        with running(sw):
            assert wait_until(lambda: all(sw.port(n).link_state() == "up"
                                          for n in sw.port_names()))
            r = ns_exec(f"{p}na", *ping_argv(f"{net}.2", count=5), "-i", "0.2", check=False)
        assert r.returncode == 0, f"ping through the switch failed:\n{r.stdout}{r.stderr}"
        a, b = (sw.port(f"{p}{x}").counters for x in "ab")
        assert a.rx_packets >= 6 and b.tx_packets >= 6 and b.rx_packets >= 6
    finally:
        sw.close()
        sw.loop.close()


def test_closed_ring_is_inert(kern: ModuleType) -> None:
    """After close(): receive returns nothing, transmit counts link_down, close again
    is harmless (the mapping is gone: nothing may touch it)."""
    with veth_pair() as (here, _ns):
        c = PortCounters()
        ring = open_ring(here, 1500, c, kern)
        ring.close()
        ring.close()
        assert ring.receive(32) == [] and ring.transmit([frame(bytes(50))]) == 0
        assert c.drops == {"link_down": 1} and ring.poll_kernel_drops() == 0


