"""The ``veth`` port type against the real kernel (root): the kernel in a namespace
answers what the port transmits, and what it answers comes back through ``receive``."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import secrets
import time
from collections.abc import Callable, Iterator

import pytest
from pyroute2 import netns as pr_netns
from pyswitch.ports import ethtool
from pyswitch.ports.tap import TapPort
from pyswitch.ports.veth import VethPort
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether

from pyswitch.port import PortError, port_type
from tests.netns_util import (
    PortWire,
    cleanup,  # noqa: F401 - fixture
    link_exists,
    netns_exists,
    netns_factory,  # noqa: F401 - fixture
    ns_exec,
    ns_process,
    ping_argv,
    require_root,
    require_tool,
    unique_name,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

PORT_MAC = "02:00:00:00:aa:01"
PEER_MAC = "02:00:00:00:aa:02"
PORT_IP, PEER_IP = "10.201.0.1", "10.201.0.2"


@pytest.fixture
def open_port(cleanup: Callable, pktio: object) -> Iterator[Callable[..., VethPort]]:  # noqa: F811
    """``open_port(name, **options)``: an opened veth port, closed at teardown; once
    per data path (``pktio``: the Python ring, then the compiled kernel's)."""
    require_root()

    def make(name: str, **options: str) -> VethPort:
        port = VethPort(name, {k.replace("_", "-"): v for k, v in options.items()}, pktio=pktio)
        cleanup(port.close)
        port.open()
        return port

    yield make


def receive_until(port: VethPort, match: Callable[[Ether], bool], timeout: float = 3.0) -> Ether:
    """Receive (and release) until a frame satisfies ``match``; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        frames = port.receive(32)
        parsed = [Ether(bytes(f)) for f in frames]
        if frames:
            port.release()
        for pkt in parsed:
            if match(pkt):
                return pkt
            seen.append(pkt.summary())
        time.sleep(0.005)
    pytest.fail(f"no matching frame within {timeout}s; saw: {seen}")


def arp_request(src_mac: str, src_ip: str, dst_ip: str) -> bytes:
    return bytes(
        Ether(src=src_mac, dst="ff:ff:ff:ff:ff:ff")
        / ARP(op=1, hwsrc=src_mac, psrc=src_ip, pdst=dst_ip)
    )


def test_arp_and_icmp_echo_with_peer_in_namespace(open_port: Callable) -> None:
    ns = unique_name()
    port = open_port(unique_name(), netns=ns, peer_mac=PEER_MAC, peer_address=f"{PEER_IP}/24")
    assert port.transmit([arp_request(PORT_MAC, PORT_IP, PEER_IP)]) == 1
    reply = receive_until(port, lambda p: ARP in p and p[ARP].op == 2)
    assert reply[ARP].hwsrc == PEER_MAC and reply[ARP].psrc == PEER_IP
    assert reply[Ether].dst == PORT_MAC

    echo = (
        Ether(src=PORT_MAC, dst=PEER_MAC)
        / IP(src=PORT_IP, dst=PEER_IP)
        / ICMP(type=8, id=0x4242, seq=7)
        / (b"pyswitch" * 8)
    )
    assert port.transmit([bytes(echo)]) == 1
    answer = receive_until(port, lambda p: ICMP in p and p[ICMP].type == 0)
    assert (answer[ICMP].id, answer[ICMP].seq) == (0x4242, 7)
    assert answer[IP].src == PEER_IP and bytes(answer[ICMP].payload) == b"pyswitch" * 8
    c = port.counters
    assert c.tx_packets == 2 and c.tx_bytes == 42 + len(echo)
    assert c.rx_packets >= 2 and c.rx_bytes >= 42 + len(echo)
    assert port.link_state() == "up"


def test_namespace_created_configured_and_removed(open_port: Callable) -> None:
    ns, name = unique_name(), unique_name()
    port = open_port(
        name,
        netns=ns,
        peer_mac=PEER_MAC,
        mtu="1400",
        peer_address=f"{PEER_IP}/24,fd00:201::2/64",
        peer_gateway=PORT_IP,
    )
    assert netns_exists(ns)
    links = json.loads(ns_exec(ns, "ip", "-j", "addr", "show").stdout)
    eth0 = next(link for link in links if link["ifname"] == "eth0")
    assert eth0["address"] == PEER_MAC and eth0["mtu"] == 1400
    assert "UP" in eth0["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in eth0["addr_info"]}
    assert {(PEER_IP, 24), ("fd00:201::2", 64)} <= addrs
    lo = next(link for link in links if link["ifname"] == "lo")
    assert "UP" in lo["flags"]
    assert f"default via {PORT_IP} dev eth0" in ns_exec(ns, "ip", "route").stdout
    mine = json.loads(ns_exec(None, "ip", "-j", "link", "show", "dev", name).stdout)[0]
    assert mine["mtu"] == 1400 and "UP" in mine["flags"]
    port.close()
    assert not netns_exists(ns)
    assert not link_exists(name)
    port.close()  # idempotent


def test_existing_namespace_is_left_alone(open_port: Callable, netns_factory: Callable) -> None:  # noqa: F811
    ns = netns_factory()
    port = open_port(unique_name(), netns=ns, peer_name="veth9")
    assert link_exists("veth9", ns)
    port.close()
    assert netns_exists(ns), "a namespace the port did not create must survive close()"
    assert not link_exists("veth9", ns)


def test_two_ports_share_a_created_namespace(open_port: Callable) -> None:
    ns = unique_name()
    a = open_port(unique_name(), netns=ns, peer_name="eth0")
    b = open_port(unique_name(), netns=ns, peer_name="eth1")
    a.close()
    assert netns_exists(ns) and link_exists("eth1", ns), "b still uses the namespace"
    b.close()
    assert not netns_exists(ns)


def test_offloads_are_off_on_both_ends(open_port: Callable) -> None:
    ethtool_bin = require_tool("ethtool", "ethtool")
    ns, name = unique_name(), unique_name()
    open_port(name, netns=ns)
    text = ns_exec(ns, ethtool_bin, "-k", "eth0").stdout
    for feature in (
        "tx-checksumming",
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "scatter-gather",
    ):
        assert re.search(rf"^{feature}: off", text, re.MULTILINE), f"{feature} not off:\n{text}"
    still_on = re.findall(
        r"^\s*(tx-\S*(?:segmentation|checksum)\S*): on(?! \[fixed\])", text, re.MULTILINE
    )
    assert not still_on, f"still on in the namespace: {still_on}"
    assert not any(ethtool.get_offloads("eth0", netns=ns).values())
    assert not any(ethtool.get_offloads(name).values())
    mine = ethtool.features(name)
    assert mine and not [f for f, on in mine.items() if on and ethtool.is_switch_hostile(f)]


def test_existing_interface_attach(
    open_port: Callable,
    netns_factory: Callable,  # noqa: F811
    cleanup: Callable,  # noqa: F811
) -> None:
    ns, name = netns_factory(), unique_name()
    ns_exec(None, "ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", ns)
    cleanup(lambda: ns_exec(None, "ip", "link", "del", name, check=False))
    ns_exec(None, "ip", "link", "set", name, "up")
    ns_exec(ns, "ip", "link", "set", "eth0", "up", "address", PEER_MAC)
    ns_exec(ns, "ip", "addr", "add", f"{PEER_IP}/24", "dev", "eth0")
    port = open_port(name, existing="true")
    assert port.transmit([arp_request(PORT_MAC, PORT_IP, PEER_IP)]) == 1
    reply = receive_until(port, lambda p: ARP in p and p[ARP].op == 2)
    assert reply[ARP].hwsrc == PEER_MAC
    port.close()
    assert link_exists(name) and link_exists("eth0", ns), "existing=true must delete nothing"


def test_existing_missing_interface_fails(open_port: Callable) -> None:
    with pytest.raises(PortError, match="no interface"):
        open_port(unique_name(), existing="true")


def test_same_name_twice_fails_and_leaves_nothing(open_port: Callable) -> None:
    name, ns1, ns2 = unique_name(), unique_name(), unique_name()
    first = open_port(name, netns=ns1, peer_address=f"{PEER_IP}/24")
    index = json.loads(ns_exec(None, "ip", "-j", "link", "show", "dev", name).stdout)[0]["ifindex"]
    in_ns1 = ns_exec(ns1, "ip", "-o", "link").stdout
    with pytest.raises(PortError, match="already exists"):
        open_port(name, netns=ns2)
    assert not netns_exists(ns2), "the namespace made for the failed port must be gone"
    other = unique_name()
    with pytest.raises(PortError, match="peer-name"):
        open_port(other, netns=ns1)  # eth0 is taken in ns1
    assert not link_exists(other), "the failed port's link must be gone"
    assert ns_exec(ns1, "ip", "-o", "link").stdout == in_ns1, "ns1 must be untouched"
    now = json.loads(ns_exec(None, "ip", "-j", "link", "show", "dev", name).stdout)[0]["ifindex"]
    assert now == index, "the first port's link must be the same one"
    assert first.transmit([arp_request(PORT_MAC, PORT_IP, PEER_IP)]) == 1
    receive_until(first, lambda p: ARP in p and p[ARP].op == 2)


def test_failure_after_creation_cleans_up(open_port: Callable) -> None:
    """A gateway that no address reaches fails late (after the veth was made)."""
    name, ns = unique_name(), unique_name()
    with pytest.raises(PortError, match="default route"):
        open_port(name, netns=ns, peer_gateway="192.0.2.1")
    assert not link_exists(name) and not netns_exists(ns)


def test_switch_end_is_not_a_host_interface(open_port: Callable, cleanup: Callable) -> None:  # noqa: F811
    """The switch's own namespace must not answer through the switch end: no ARP reply
    for its local addresses, no IPv6, and IPv4 sent straight to the end's MAC is
    dropped, so a host cannot reach it around the switch (and its VLANs)."""
    busybox = require_tool("busybox", "busybox-static")
    prefix = f"198.18.{random.randrange(1, 255)}"
    local = f"{prefix}.1"
    tap = TapPort(unique_name(), {"address": f"{local}/24"})  # a local address here
    cleanup(tap.close)
    tap.open()
    ns, name = unique_name(), unique_name()
    open_port(name, netns=ns, peer_address=f"{prefix}.2/24")
    arping = ns_exec(ns, busybox, "arping", "-I", "eth0", "-c", "2", "-w", "2", local, check=False)
    assert arping.returncode != 0, f"the switch end answered ARP:\n{arping.stdout}"
    link = json.loads(ns_exec(None, "ip", "-j", "addr", "show", "dev", name).stdout)[0]
    assert "NOARP" in link["flags"] and not link["addr_info"], link
    # UDP sent straight to the end's MAC must not reach a socket of this namespace.
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cleanup(listener.close)
    listener.bind((local, 0))
    listener.settimeout(1.0)
    probe = (
        Ether(src=PEER_MAC, dst=link["address"])
        / IP(src=f"{prefix}.2", dst=local)
        / UDP(sport=4242, dport=listener.getsockname()[1])
        / b"around the switch"
    )
    sender = pr_netns.create_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    try:
        sender.bind(("eth0", 0))
        sender.send(bytes(probe))
    finally:
        sender.close()
    with pytest.raises(TimeoutError):
        data = listener.recv(100)
        pytest.fail(f"this namespace received {data!r} through the switch end")


def test_broken_namespace_fails_cleanly(open_port: Callable, cleanup: Callable) -> None:  # noqa: F811
    """A stale /var/run/netns entry (a file, not a namespace) is a clear PortError."""
    ns, name = unique_name(), unique_name()
    path = f"/var/run/netns/{ns}"
    os.makedirs("/var/run/netns", exist_ok=True)
    open(path, "w").close()
    cleanup(lambda: os.unlink(path))
    with pytest.raises(PortError, match=f"namespace '{ns}'"):
        open_port(name, netns=ns)
    assert not link_exists(name) and os.path.isfile(path), "must not touch what it did not make"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"peer-name": "x" * 16}, "peer-name"),
        ({}, "peer-name"),  # default <port>-p is too long for a 14-character port name
        ({"peer-mac": "01:00:00:00:00:01"}, "peer-mac"),
        ({"peer-mac": "nonsense"}, "peer-mac"),
        ({"peer-address": "10.0.0.1"}, "peer-address"),
        ({"peer-address": "10.0.0.1/24,300.1.1.1/8"}, "peer-address"),
        ({"peer-gateway": "10.0.0.1"}, "peer-gateway"),
        ({"mtu": "9x"}, "mtu"),
        ({"mtu": "40"}, "mtu"),
        ({"existing": "true", "netns": "x"}, "netns"),
        ({"existing": "maybe"}, "existing"),
        ({"colour": "red"}, "colour"),
        ({"rx-ring": "tpacket-v9"}, "rx-ring"),
    ],
)
def test_invalid_options_name_the_option(options: dict[str, str], message: str) -> None:
    name = "pstlongname014" if not options else "pstok"
    with pytest.raises(PortError, match=message):
        port_type("veth").validate_options(name, options)


def test_vlan_tag_survives_receive(open_port: Callable) -> None:
    """The kernel strips 802.1Q tags before AF_PACKET; the ring puts them back.
    The peer sends tagged frames from a packet socket inside its namespace."""
    ns = unique_name()
    port = open_port(unique_name(), netns=ns, peer_mac=PEER_MAC)
    tagged = (
        Ether(src=PEER_MAC, dst=PORT_MAC)
        / Dot1Q(vlan=10, prio=3)
        / IP(src=PEER_IP, dst=PORT_IP)
        / ICMP(id=0x77)
    )
    qinq = (
        Ether(src=PEER_MAC, dst=PORT_MAC, type=0x88A8)
        / Dot1Q(vlan=20)
        / Dot1Q(vlan=30)
        / IP(src=PEER_IP, dst=PORT_IP)
        / ICMP(id=0x78)
    )
    sock = pr_netns.create_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    try:
        sock.bind(("eth0", 0))
        sock.send(bytes(tagged))
        sock.send(bytes(qinq))
    finally:
        sock.close()
    got: dict[bytes, int] = {}

    def both(pkt: Ether) -> bool:
        raw = bytes(pkt)
        if raw in (bytes(tagged), bytes(qinq)):
            got[raw] = got.get(raw, 0) + 1
        return len(got) == 2

    receive_until(port, both)
    assert port.counters.rx_bytes >= len(tagged) + len(qinq)


def test_mtu_and_link_down_drops(open_port: Callable) -> None:
    name = unique_name()
    port = open_port(name, netns=unique_name(), mtu="1000")
    big = bytes(Ether(src=PORT_MAC, dst=PEER_MAC, type=0x0800)) + bytes(1001)
    tagged_ok = bytes(Ether(src=PORT_MAC, dst=PEER_MAC) / Dot1Q(vlan=5)) + bytes(1000)
    assert port.transmit([big, tagged_ok, b"", bytes(13)]) == 1
    assert port.counters.drops == {"mtu": 1, "malformed": 2} and port.counters.tx_dropped == 3
    ns_exec(None, "ip", "link", "set", name, "down")
    assert port.link_state() == "down"
    assert port.transmit([tagged_ok, tagged_ok]) == 0
    assert port.counters.drops["link_down"] == 2


def test_oversized_received_frames_dropped_and_slots_reused(open_port: Callable) -> None:
    """Frames over the port's MTU (the switch end's MTU raised behind the port's back)
    are dropped as ``mtu``; their ring slots go back to the kernel even though the
    switch never release()s an empty batch: 2000 drops are more than the ring holds."""
    ns, name = unique_name(), unique_name()
    port = open_port(name, netns=ns, peer_mac=PEER_MAC, mtu="1000")
    ns_exec(None, "ip", "link", "set", name, "mtu", "1400")
    ns_exec(ns, "ip", "link", "set", "eth0", "mtu", "1400")
    head = bytes(Ether(src=PEER_MAC, dst=PORT_MAC, type=0x88B5))
    sock = pr_netns.create_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, 0, flags=0)
    try:
        sock.bind(("eth0", 0))
        for _ in range(20):  # 100 at a time: under the kernel's backlog and ring sizes
            for _ in range(100):
                sock.send(head + bytes(1200))
            for _ in range(10):  # an all-dropped batch returns nothing: no release()
                if port.receive(32):
                    port.release()
        sock.send(head + b"last" + bytes(60))
    finally:
        sock.close()
    receive_until(port, lambda p: bytes(p).startswith(head + b"last"))
    assert port.counters.drops["mtu"] == 2000 and port.counters.rx_dropped == 2000
    info = port.status()  # V2: one frame a slot; V3: frames packed into the ring's bytes
    assert info.get("ring_slots", info.get("ring_bytes", 0) // (len(head) + 1200)) < 2000


def test_ping_and_iperf3_tcp_between_namespaces(open_port: Callable) -> None:
    """Two veth ports wired together by a flooding thread: ping, then TCP with iperf3
    (which fails if the peers' offloads leak super-frames or unfinished checksums)."""
    iperf3 = require_tool("iperf3", "iperf3")
    ns_a, ns_b = unique_name(), unique_name()
    a = open_port(unique_name(), netns=ns_a, peer_address="10.202.0.1/24,fd00:202::1/64")
    b = open_port(unique_name(), netns=ns_b, peer_address="10.202.0.2/24,fd00:202::2/64")
    with PortWire([a, b]) as wire:
        ns_exec(ns_a, *ping_argv("10.202.0.2", count=2, wait_s=2))
        ns_exec(ns_a, *ping_argv("fd00:202::2", count=2, wait_s=2))  # ND over multicast
        with ns_process(ns_b, iperf3, "-s", "-1", "-B", "10.202.0.2"):
            time.sleep(0.3)
            run = ns_exec(ns_a, iperf3, "-c", "10.202.0.2", "-t", "2", "-J", timeout=30)
    result = json.loads(run.stdout)
    received = result["end"]["sum_received"]
    assert received["bytes"] > 0
    print(
        f"\niperf3 TCP through the Python wire: {received['bits_per_second'] / 1e6:.0f} Mbit/s, "
        f"{wire.frames} frames forwarded, drops a={a.counters.drops} b={b.counters.drops}"
    )


def test_only_leftovers_of_a_dead_pyswitch_are_reclaimed():
    """At open, a veth carrying pyswitch's alias with the pid of a process that no longer
    runs is a leftover (kill -9) and is replaced; one of a live process, or without the
    alias, is someone's interface and the open fails."""
    import secrets
    import subprocess

    from pyswitch.ports.veth import VethPort, leftover_alias

    from pyswitch.port import PortError

    dead = subprocess.Popen(["true"])
    dead.wait()
    for alias, reclaimed in ((leftover_alias("X", dead.pid), True), (leftover_alias("X", 1), False),
                             (None, False)):
        name = "pstrc" + secrets.token_hex(2)
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
        if alias:
            subprocess.run(["ip", "link", "set", name, "alias", alias.replace(" X ", f" {name} ")], check=True)
        port = VethPort(name, {})
        try:
            if reclaimed:
                port.open()
                assert subprocess.run(["ip", "link", "show", name + "p"], capture_output=True, check=False).returncode != 0
            else:
                with pytest.raises(PortError, match="already exists"):
                    port.open()
                assert subprocess.run(["ip", "link", "show", name], capture_output=True, check=False).returncode == 0
        finally:
            port.close()
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


def test_rx_ring_option_picks_the_compiled_ring(open_port: Callable, pktio: object) -> None:
    """The compiled path reads TPACKET_V2 unless ``rx-ring=tpacket-v3`` asks for blocks;
    the Python path reads TPACKET_V2 whatever the option says."""
    name = "pst" + secrets.token_hex(3)
    default = open_port(name)
    v3 = open_port(name + "b", rx_ring="tpacket-v3")
    assert default.status()["tpacket_version"] == 2
    assert v3.status()["tpacket_version"] == (2 if pktio is None else 3)
