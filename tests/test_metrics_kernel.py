"""/metrics against the kernel's own counters: ping between two namespaces through veth ports.

The test makes two veth pairs, moves one end of each into a namespace of its own
(``eth0``, an address, IPv6 off so nothing chatters), and gives the other ends to an
in-process switch as ``existing`` veth ports (IPv6 off on them too, before they come up,
so the host stack sends nothing through them: every frame the kernel counts on them is
the switch's or the namespace's).  After ``ping -c 5`` the scraped packet and byte
counts of both ports must equal the kernel's counters of both veth ends, exactly.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from pyswitch.switch import Switch
from pyswitch.topology import load_topology_text
from tests.netns_util import netns, ns_exec, ping_argv, require_root, unique_name, wait_until
from tests.test_metrics import get, running, scrape

KEYS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


def sysfs_counters(ifname: str) -> dict[str, int]:
    """The kernel's counters of ``ifname`` in this namespace."""
    base = f"/sys/class/net/{ifname}/statistics"
    out = {}
    for key in KEYS:
        with open(f"{base}/{key}") as f:
            out[key] = int(f.read())
    return out


def ns_counters(ns: str, ifname: str = "eth0") -> dict[str, int]:
    """The kernel's counters of ``ifname`` inside namespace ``ns`` (``ip -s -j``)."""
    r = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", ifname],
                       capture_output=True, text=True, check=True, timeout=10)
    st = json.loads(r.stdout)[0]["stats64"]
    return {"rx_packets": st["rx"]["packets"], "tx_packets": st["tx"]["packets"],
            "rx_bytes": st["rx"]["bytes"], "tx_bytes": st["tx"]["bytes"]}


def no_ipv6(ifname: str, ns: str | None = None) -> None:
    path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
    if ns is None:
        with open(path, "w") as f:
            f.write("1")
    else:
        ns_exec(ns, "sh", "-c", f"echo 1 > {path}")


@contextlib.contextmanager
def host(ns: str, port: str, address: str) -> Iterator[None]:
    """veth ``port`` here <-> ``eth0`` in ``ns`` at ``address``; the pair is always deleted."""
    tmp = unique_name("pst", 8)
    ip("link", "add", port, "type", "veth", "peer", "name", tmp)
    try:
        no_ipv6(port)
        ip("link", "set", tmp, "netns", ns)
        ip("-n", ns, "link", "set", tmp, "name", "eth0")
        no_ipv6("eth0", ns)
        ip("-n", ns, "addr", "add", address, "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("link", "set", port, "up")
        yield
    finally:
        subprocess.run(["ip", "link", "del", port], check=False, capture_output=True,
                       timeout=10)


def scraped(url: str, port: str) -> dict[str, int]:
    s = scrape(url)
    lv = {"bridge": "br0", "port": port, "type": "veth"}
    return {k: int(get(s, f"pyswitch_port_{k}_total", **lv)) for k in KEYS}


@pytest.mark.timeout(60)
def test_scraped_counters_equal_the_kernels_after_ping() -> None:
    require_root()
    p = "pst" + secrets.token_hex(2)
    net = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}"
    with contextlib.ExitStack() as stack:
        ns = {x: stack.enter_context(netns(f"{p}n{x}")) for x in "ab"}
        stack.enter_context(host(ns["a"], f"{p}a", f"{net}.1/24"))
        stack.enter_context(host(ns["b"], f"{p}b", f"{net}.2/24"))
        topo = "bridges:\n  br0:\n    ports:\n" + "".join(
            f"      {p}{x}: {{type: veth, options: {{existing: true}}}}\n" for x in "ab")
        sw = Switch()
        stack.callback(sw.loop.close)
        stack.callback(sw.close)
        sw.build(load_topology_text(topo, "kernel.yaml"))
        srv = stack.enter_context(running(sw))
        assert wait_until(lambda: all(sw.port(n).link_state() == "up" for n in sw.port_names()))
        r = ns_exec(ns["a"], *ping_argv(f"{net}.2", count=5), "-i", "0.2", check=False)
        assert r.returncode == 0, f"ping through the switch failed:\n{r.stdout}{r.stderr}"

        def agree() -> bool:
            return all(scraped(srv.url, f"{p}{x}") == kernel(x) for x in "ab")

        def kernel(x: str) -> dict[str, int]:
            here, peer = sysfs_counters(f"{p}{x}"), ns_counters(ns[x])
            # The two ends of a pair see the same frames, mirrored.
            assert here == {"rx_packets": peer["tx_packets"], "tx_packets": peer["rx_packets"],
                            "rx_bytes": peer["tx_bytes"], "tx_bytes": peer["rx_bytes"]}
            return here

        ok = wait_until(agree, timeout=5, interval=0.1)
        detail = {x: (scraped(srv.url, f"{p}{x}"), kernel(x)) for x in "ab"}
        assert ok, f"scraped vs kernel: {detail}"
        print("scraped == kernel:", detail)
        a, b = detail["a"][0], detail["b"][0]
        assert a["rx_packets"] >= 6 and b["rx_packets"] >= 6  # ARP + 5 echoes / replies
        assert a["tx_packets"] == b["rx_packets"] and b["tx_packets"] == a["rx_packets"]
