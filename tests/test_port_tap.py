"""The ``tap`` port type against the real kernel (root).

The host stack is the TAP's peer: it pings an address that only exists "behind" the
TAP, and a small scapy responder in the test answers from the frames the port
receives.  Addresses come from 198.18.0.0/15 (benchmarking range) and pings are bound
to the TAP interface, so nothing leaves the machine.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Self

import pytest
from pyswitch.ports.tap import TapPort
from pyswitch.ports.veth import VethPort
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Dot1Q, Ether

from pyswitch.port import PortError, port_type
from tests.netns_util import (
    PortWire,
    cleanup,  # noqa: F401 - fixture
    link_exists,
    ns_exec,
    ping_argv,
    require_root,
    unique_name,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

BEHIND_MAC = "02:00:00:00:bb:02"


@pytest.fixture
def subnet() -> str:
    """A random /24 prefix in 198.18.0.0/15, e.g. ``198.19.7``."""
    return f"198.{random.choice((18, 19))}.{random.randrange(1, 255)}"


@pytest.fixture
def open_tap(cleanup: Callable, pktio: object) -> Iterator[Callable[..., TapPort]]:  # noqa: F811
    """``open_tap(name, **options)``: an opened TAP port, closed at teardown; once per
    data path (``pktio``: Python reads and writes, then the compiled kernel's)."""
    require_root()

    def make(name: str, **options: str) -> TapPort:
        port = TapPort(name, options, pktio=pktio)
        cleanup(port.close)
        port.open()
        return port

    yield make


class Responder:
    """Answers ARP for ``ip`` and ICMP echo to it from frames received on ``port``."""

    def __init__(self, port: TapPort, ip: str, mac: str = BEHIND_MAC) -> None:
        self.port, self.ip, self.mac = port, ip, mac
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            frames = [Ether(bytes(f)) for f in self.port.receive(32)]
            if frames:
                self.port.release()
            replies = [r for r in map(self.answer, frames) if r is not None]
            if replies:
                self.answered += self.port.transmit(replies)
            time.sleep(0.002)

    def answer(self, pkt: Ether) -> bytes | None:
        if ARP in pkt and pkt[ARP].op == 1 and pkt[ARP].pdst == self.ip:
            return bytes(
                Ether(src=self.mac, dst=pkt.src)
                / ARP(op=2, hwsrc=self.mac, psrc=self.ip, hwdst=pkt[ARP].hwsrc, pdst=pkt[ARP].psrc)
            )
        if ICMP in pkt and pkt[ICMP].type == 8 and pkt[IP].dst == self.ip:
            ip, icmp = pkt[IP], pkt[ICMP]
            return bytes(
                Ether(src=self.mac, dst=pkt.src)
                / IP(src=self.ip, dst=ip.src)
                / ICMP(type=0, id=icmp.id, seq=icmp.seq)
                / bytes(icmp.payload)
            )
        return None


def test_host_pings_an_address_behind_the_tap(open_tap: Callable, subnet: str) -> None:
    name = unique_name()
    port = open_tap(name, address=f"{subnet}.1/24")
    with Responder(port, f"{subnet}.2") as responder:
        argv = ping_argv(f"{subnet}.2", count=3, wait_s=2)
        ns_exec(None, *argv[:2], "-I", name, *argv[2:], timeout=20)
    assert responder.answered >= 4  # one ARP reply and three echo replies
    c = port.counters
    assert c.rx_packets >= 4 and c.tx_packets == responder.answered and c.rx_bytes > 0
    assert port.link_state() == "up"


def test_address_mac_mtu_set_and_device_removed(open_tap: Callable, subnet: str) -> None:
    name = unique_name()
    port = open_tap(
        name, address=f"{subnet}.1/24,fd00:198::1/64", mac="02:00:00:00:bb:01", mtu="1400"
    )
    info = json.loads(ns_exec(None, "ip", "-j", "addr", "show", "dev", name).stdout)[0]
    assert info["address"] == "02:00:00:00:bb:01" and info["mtu"] == 1400
    assert "UP" in info["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in info["addr_info"]}
    assert {(f"{subnet}.1", 24), ("fd00:198::1", 64)} <= addrs
    port.close()
    assert not link_exists(name)
    port.close()  # idempotent


def test_ifname_option_names_the_device(open_tap: Callable) -> None:
    ifname = unique_name()
    port = open_tap("a-port-name", ifname=ifname)
    assert link_exists(ifname) and port.status()["ifname"] == ifname


def test_name_taken_fails_and_first_keeps_working(open_tap: Callable, subnet: str) -> None:
    name = unique_name()
    first = open_tap(name, address=f"{subnet}.1/24")
    with pytest.raises(PortError, match="taken"):
        open_tap(name)
    with pytest.raises(PortError, match="taken"):
        open_tap("lo")  # an existing device that is not a TAP
    assert link_exists(name) and first.link_state() == "up"
    with Responder(first, f"{subnet}.2"):
        argv = ping_argv(f"{subnet}.2", count=1, wait_s=2)
        ns_exec(None, *argv[:2], "-I", name, *argv[2:], timeout=20)


def test_mtu_and_link_down_drops(open_tap: Callable) -> None:
    name = unique_name()
    port = open_tap(name, mtu="1000")
    header = bytes(Ether(src="02:00:00:00:bb:01", dst="02:00:00:00:bb:02", type=0x0800))
    tagged = bytes(Ether(src="02:00:00:00:bb:01", dst="02:00:00:00:bb:02") / Dot1Q(vlan=3))
    assert port.transmit([header + bytes(1001), tagged + bytes(1000), b"", bytes(13)]) == 1
    assert port.counters.drops == {"mtu": 1, "malformed": 2}
    ns_exec(None, "ip", "link", "set", name, "down")
    assert port.link_state() == "down"
    assert port.transmit([header + bytes(100)] * 3) == 0
    assert port.counters.drops["link_down"] == 3
    assert list(port.receive(32)) == []


def test_receive_batch_limit_and_oversized_frames(open_tap: Callable, subnet: str) -> None:
    """receive(n) returns at most n frames; a frame over the port's MTU (the device's
    MTU raised behind the port's back) is dropped as ``mtu``."""
    name = unique_name()
    port = open_tap(name, address=f"{subnet}.1/24", mtu="1000")
    ns_exec(None, "ip", "link", "set", name, "mtu", "1400")
    ns_exec(None, "ip", "neigh", "replace", f"{subnet}.2", "lladdr", BEHIND_MAC, "dev", name)
    while port.receive(32):  # whatever the host sent when the link came up
        port.release()
    ping = ping_argv(f"{subnet}.2", count=1, wait_s=1)
    for size in ("100", "200", "300", "1200"):  # ICMP payload; 1200 -> a 1242-byte frame
        ns_exec(None, *ping[:2], "-s", size, "-I", name, *ping[2:], check=False)
    ipv4_lengths = []
    while batch := port.receive(2):
        assert len(batch) <= 2
        ipv4_lengths += [len(f) for f in batch if bytes(f[12:14]) == b"\x08\x00"]
        port.release()
    assert ipv4_lengths == [142, 242, 342], "the three small echo requests, whole"
    assert port.counters.drops == {"mtu": 1} and port.counters.rx_dropped == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ifname": "x" * 16}, "ifname"),
        ({"address": "198.18.0.1"}, "address"),
        ({"mac": "ff:ff:ff:ff:ff:ff"}, "mac"),
        ({"mtu": "0"}, "mtu"),
        ({"peer-name": "x"}, "peer-name"),
    ],
)
def test_invalid_options_name_the_option(options: dict[str, str], message: str) -> None:
    with pytest.raises(PortError, match=message):
        port_type("tap").validate_options("tap0", options)


def test_namespace_pings_host_through_veth_and_tap(
    open_tap: Callable,
    subnet: str,
    cleanup: Callable,  # noqa: F811
) -> None:
    """veth (namespace) <-> wire <-> TAP (host stack): the namespace pings the host."""
    tap = open_tap(unique_name(), address=f"{subnet}.1/24")
    veth = VethPort(unique_name(), {"netns": unique_name(), "peer-address": f"{subnet}.2/24"},
                    pktio=tap._pktio)
    cleanup(veth.close)
    veth.open()
    with PortWire([tap, veth]) as wire:
        ns_exec(veth.config.netns, *ping_argv(f"{subnet}.1", count=2, wait_s=2), timeout=20)
    assert wire.frames >= 4
    assert tap.counters.tx_packets >= 3 and veth.counters.tx_packets >= 3
