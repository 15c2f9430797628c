"""DPDK testpmd (net_virtio_user) on two pyswitch vhost-user ports: traffic through the bridge.

The real front end of DPDK apps.  Counts are compared between testpmd's own `show port
stats` and pyswitch's port-stats: what one testpmd sends, pyswitch receives, the bridge
floods to the other port (unknown unicast), and the other testpmd receives.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.peers.testpmd import Testpmd

pytestmark = [pytest.mark.peer, pytest.mark.timeout(180)]


def wait(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def stats(sw) -> dict:
    return json.loads(sw.cli("port-stats", "--json").stdout)


def vdev(n: int, path, queues: int = 1, server: bool = False) -> str:
    return (f"net_virtio_user{n},path={path},queues={queues},mac=02:00:00:00:0a:0{n + 1}"
            + (",server=1" if server else ""))


def test_txonly_through_the_bridge_to_rxonly_counts_agree(pyswitch_up, tmp_path):
    sw = pyswitch_up("bridges:\n  br0:\n    ports:\n"
                     f"      vhu1: {{type: dpdkvhostuser, options: {{vhost-sock-dir: {tmp_path}}}}}\n"
                     f"      vhu2: {{type: dpdkvhostuser, options: {{vhost-sock-dir: {tmp_path}}}}}\n")
    with Testpmd([vdev(1, tmp_path / "vhu2")], forward_mode="rxonly", lcores="0@0,1@0") as rx, \
            Testpmd([vdev(0, tmp_path / "vhu1")], forward_mode="txonly", lcores="0@0,1@1") as tx:
        rx.command("start")
        assert wait(lambda: stats(sw)["vhu2"]["link_state"] == "up"), rx.output()[-2000:]
        tx.command("start")
        time.sleep(3)
        tx.command("stop")
        sent = tx.port_stats()[0].tx_packets
        assert sent > 1000, tx.output()[-2000:]
        assert wait(lambda: stats(sw)["vhu1"]["rx_packets"] == sent), (sent, stats(sw))
        s = stats(sw)
        given, dropped = s["vhu2"]["tx_packets"], s["vhu2"]["drops"]["no_buffer"]
        assert given + dropped == sent, s  # every frame flooded to vhu2: given or counted
        assert wait(lambda: rx.port_stats()[0].rx_packets == given), (rx.port_stats(), s["vhu2"])
        assert given > 0 and s["vhu1"]["rx_bytes"] == 64 * sent


@pytest.mark.parametrize("queues", [1, 2])
def test_closed_io_loop_client_role(pyswitch_up, tmp_path, queues):
    """One testpmd, two virtio-user ports listening (server=1), pyswitch connects
    (dpdkvhostuserclient); `io` forwarding with `start tx_first` keeps frames circling
    port0 -> vhu1 -> bridge -> vhu2 -> port1 -> port0 ..."""
    socks = [tmp_path / "pmd0.sock", tmp_path / "pmd1.sock"]
    args = (f"--rxq={queues}", f"--txq={queues}")
    # pyswitch first: it keeps retrying until testpmd listens (testpmd waits for its
    # clients before it even shows a prompt)
    sw = pyswitch_up("bridges:\n  br0:\n    ports:\n"
                     f"      vhu1: {{type: dpdkvhostuserclient, options: {{vhost-server-path: {socks[0]}}}}}\n"
                     f"      vhu2: {{type: dpdkvhostuserclient, options: {{vhost-server-path: {socks[1]}}}}}\n")
    with Testpmd([vdev(0, socks[0], queues, True), vdev(1, socks[1], queues, True)], forward_mode="io",
                 app_args=args, cleanup_paths=tuple(socks)) as pmd:
        assert wait(lambda: all(p["link_state"] == "up" for p in stats(sw).values())), pmd.output()[-3000:]
        pmd.command("start tx_first 8")
        time.sleep(4)
        s1 = stats(sw)
        time.sleep(1)
        s2 = stats(sw)
        pmd.command("stop")
        ps = pmd.port_stats()
        assert s2["vhu1"]["rx_packets"] > s1["vhu1"]["rx_packets"] > 1000, (s1, s2)  # still circling
        assert s2["vhu2"]["rx_packets"] > s1["vhu2"]["rx_packets"] > 1000
        shown = json.loads(sw.cli("show", "--json").stdout)["bridges"][0]["ports"]
        assert {p["status"]["queue_pairs"] for p in shown} == {queues}, shown
        time.sleep(0.5)
        s = stats(sw)
        # testpmd's counters against pyswitch's: what pyswitch received from port N is what
        # port N transmitted; what port N received pyswitch gave it (less what is still in its
        # receive ring after `stop`: at most one ring per queue)
        assert s["vhu1"]["rx_packets"] == ps[0].tx_packets and s["vhu2"]["rx_packets"] == ps[1].tx_packets
        for port, vhu in ((0, "vhu1"), (1, "vhu2")):
            assert 0 <= s[vhu]["tx_packets"] - ps[port].rx_packets <= 1024 * queues, (s[vhu], ps[port])
