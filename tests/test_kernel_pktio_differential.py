"""Both packet-I/O paths on the same traffic: what they return, send and count must agree.

Receive: the Python ``PacketRing`` (TPACKET_V2) and the kernel's ``PacketRingV3`` and
``PacketRingV2`` are bound to the same veth end at once, so each gets its own copy of
every frame the namespace sends; the two lists must be equal byte for byte, in order, tags included, and so must
the counters.  Transmit: each path sends the same batch (tags, runts, over-MTU frames)
to a sniffer in the namespace.  TAP: the host sends the same frames out of a TAP read by
one path, then by the other.
"""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import sys
import time
from types import ModuleType

import pytest
from pyswitch.ports.afpacket import open_ring
from pyswitch.ports.tap import TapPort

from pyswitch.port import PortCounters
from tests.netns_util import ns_exec, require_root, unique_name
from tests.test_kernel_pktio import collect, frame, kern, ns_send, ours, veth_pair

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]
__all__ = ["kern"]  # the fixture, shared with test_kernel_pktio

TAGS = [(), ((0x8100, 10),), ((0x8100, 7 << 13 | 4094),), ((0x8100, 0),), ((0x88A8, 300),),
        ((0x88A8, 20), (0x8100, 30)), ((0x8100, 5), (0x8100, 6))]


def random_frames(seed: int, n: int, biggest: int) -> list[bytes]:
    """``n`` test frames of random sizes (some over a 1500 MTU), tags and contents."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tags = rng.choice(TAGS)
        size = rng.choice((0, 1, 46, rng.randrange(0, biggest), biggest - 4 * len(tags)))
        out.append(frame(struct.pack("!H", i) + rng.randbytes(size), *tags))
    return out


def test_receive_is_identical_on_both_paths(kern: ModuleType) -> None:
    sent = random_frames(1, 300, 1500 + 60)
    with veth_pair(mtu=1600) as (here, ns):
        counters = {p: PortCounters() for p in ("python", "compiled", "compiled V2")}
        rings = {p: open_ring(here, 1500, counters[p], kern if p != "python" else None,
                              tpacket=2 if p.endswith("V2") else 3) for p in counters}
        try:
            for i in range(0, len(sent), 50):
                ns_send(ns, sent[i:i + 50])
            ns_send(ns, [frame(b"end" + bytes(60))])
            got = {p: collect(r, len(sent)) for p, r in rings.items()}
        finally:
            for r in rings.values():
                r.close()
    assert got["compiled"] == got["python"] and got["compiled V2"] == got["python"]
    assert got["python"][-1] == frame(b"end" + bytes(60))
    limit = [f for f in sent if len(f) <= 1514 or (len(f) <= 1518 and f[12:14] in (
        b"\x81\x00", b"\x88\xa8"))]
    assert got["python"][:-1] == limit, "both paths must return exactly the frames in the limit"
    assert counters["compiled"].as_dict() == counters["python"].as_dict()
    assert counters["compiled V2"].as_dict() == counters["python"].as_dict()
    assert counters["python"].drops == {"mtu": len(sent) - len(limit)}


def sniffed(ns: str, send: object, seconds: float = 2.0) -> list[bytes]:
    """Frames of the test EtherType seen on eth0 in ``ns`` while ``send()`` runs."""
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.nsprobe", "sniff", "eth0",
            str(seconds)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        send()  # type: ignore[operator]
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return ours([bytes.fromhex(line) for line in out.split()])


def test_transmit_is_identical_on_both_paths(kern: ModuleType) -> None:
    batch = random_frames(2, 64, 1500 + 60) + [b"", bytes(13), frame(b"last")]
    with veth_pair(mtu=1600) as (here, ns):
        seen, counted, returned = {}, {}, {}
        for path in ("python", "compiled"):
            c = PortCounters()
            ring = open_ring(here, 1500, c, kern if path == "compiled" else None)
            try:
                def send(ring: object = ring, path: str = path) -> None:
                    returned[path] = ring.transmit(batch)  # type: ignore[attr-defined]
                seen[path] = sniffed(ns, send)
            finally:
                ring.close()
            counted[path] = c.as_dict()
    assert seen["compiled"] == seen["python"] and seen["python"][-1] == frame(b"last")
    assert returned["compiled"] == returned["python"] == len(seen["python"])
    assert counted["compiled"] == counted["python"]
    assert counted["python"]["drops"]["malformed"] == 2


def test_tap_receive_and_transmit_are_identical_on_both_paths(kern: ModuleType) -> None:
    """The host sends frames out of the TAP (a packet socket on it): the port reads
    them; the port writes frames: the host's packet socket sees them come in."""
    require_root()
    sent = random_frames(3, 100, 1000 + 40)
    results = {}
    for path in ("python", "compiled"):
        tap = TapPort(unique_name(), {"mtu": "1000"}, pktio=kern if path == "compiled" else None)
        try:
            tap.open()
            ns_exec(None, "sysctl", "-qw", f"net.ipv6.conf.{tap.ifname}.disable_ipv6=1",
                    check=False)
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5)) as s:
                s.bind((tap.ifname, 0))
                refused = 0
                for f in sent:
                    try:
                        s.send(f)
                    except OSError:  # over the TAP's MTU: the host refuses to send it
                        refused += 1
                got = read_all(tap, len(sent) - refused)
                back = tap.transmit(sent[:40])
                heard = listen(s)
            results[path] = (got, refused, back, heard, tap.counters.as_dict())
        finally:
            tap.close()
    assert results["compiled"][0] == results["python"][0]
    assert results["compiled"][1:] == results["python"][1:]
    got, refused, back, heard, _ = results["python"]
    assert len(got) == len(sent) - refused and refused > 0 and back > 0 and heard


def read_all(tap: TapPort, want: int, timeout: float = 5.0) -> list[bytes]:
    """Test frames received from ``tap`` until ``want`` came or ``timeout`` passed."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        batch = tap.receive(8)
        got += ours([bytes(f) for f in batch])
        if not batch:
            time.sleep(0.01)
    return got


def listen(s: socket.socket, quiet: float = 0.5) -> list[bytes]:
    """What packet socket ``s`` receives until it has been quiet for ``quiet`` s."""
    s.settimeout(quiet)
    heard = []
    while True:
        try:
            heard.append(s.recv(4096))
        except TimeoutError:
            return heard
