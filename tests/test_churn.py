"""Churn: vhost-user ports added and removed in a loop while two namespaces ping each
other through the same bridge every 10 ms.  No ping may be lost, and the daemon ends
with the fds it started with.

(test_cli_daemon.py's test_port_changes_do_not_disturb_traffic_on_other_ports does the
same for veth and memory ports.)
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from pyswitch.control import call
from tests.control_client import Pinger, two_veth_hosts
from tests.netns_util import wait_until
from tests.peers.testpmd import Testpmd
from tests.test_vhost_testpmd import vdev

pytestmark = pytest.mark.timeout(240)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _links(pid: int) -> list[str]:
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


def test_vhost_user_ports_come_and_go_under_traffic_on_others(daemon, prefix, tmp_path):
    d = daemon.start()
    ns1, _ = two_veth_hosts(d, prefix, "10.94.0")
    ctl = d.rundir / "pyswitch.ctl"
    socks = tmp_path / "socks"
    fds_before = _fds(d.proc.pid)
    links_before = _links(d.proc.pid)
    pinger = Pinger(ns1, "10.94.0.2", count=100_000, interval=0.01)
    try:
        time.sleep(0.3)
        for i in range(20):  # listening ports, a front end that connects and leaves, client ports retrying
            call("add-port", {"bridge": "br0", "port": f"vs{i}",
                              "settings": {"type": "dpdkvhostuser", "options:vhost-sock-dir": str(socks)}}, path=ctl)
            call("add-port", {"bridge": "br0", "port": f"vc{i}",
                              "settings": {"type": "dpdkvhostuserclient",
                                           "options:vhost-server-path": str(tmp_path / f"nobody{i}.sock")}},
                 path=ctl)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(socks / f"vs{i}"))
            call("del-port", {"port": f"vs{i}"}, path=ctl)
            call("del-port", {"port": f"vc{i}"}, path=ctl)
            assert not (socks / f"vs{i}").exists()
        for i in range(2):  # a port with a live front end (testpmd receiving) is removed
            call("add-port", {"bridge": "br0", "port": "vlive",
                              "settings": {"type": "dpdkvhostuser", "options:vhost-sock-dir": str(socks)}}, path=ctl)
            with Testpmd([vdev(str(socks / "vlive"))], forward_mode="rxonly") as pmd:
                pmd.command("start")
                deadline = time.monotonic() + 20
                while call("show", {}, path=ctl)["bridges"][0]["ports"][-1].get("link_state") != "up":
                    assert time.monotonic() < deadline, pmd.output()[-2000:]
                    time.sleep(0.05)
                time.sleep(0.5)  # flooded pings and ARP reach testpmd meanwhile
                call("del-port", {"port": "vlive"}, path=ctl)
                time.sleep(0.3)
    finally:
        pinger.proc.send_signal(2)
        lost, _ = pinger.result(timeout=30)
    assert lost <= 1, pinger.out  # <= 1: the echo in flight at SIGINT
    transmitted = int(pinger.out.split(" packets transmitted")[0].split()[-1])
    assert transmitted > 200, pinger.out
    assert call("list-ports", {"bridge": "br0"}, path=ctl) == sorted([f"{prefix}1", f"{prefix}2"])
    # (the daemon closes its end of our last control connection when it reads the EOF)
    assert wait_until(lambda: _fds(d.proc.pid) == fds_before, 3), \
        (links_before, _links(d.proc.pid))
