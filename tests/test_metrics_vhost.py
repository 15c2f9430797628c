"""/metrics of a vhost-user port driven by a front end over its real unix socket.

The switch (a ``dpdkvhostuser`` port and a memory port on one bridge) runs its own event
loop on a thread; the test plays the guest with tests/vhost_frontend.py.  Checked: rx
is what the guest sent, ``no_buffer`` drops when the guest posted too few buffers, the
connection state, features and queue pairs, and that nothing goes backwards across a
disconnect and a reconnect.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyswitch.stats import port_stats
from pyswitch.switch import Switch
from pyswitch.topology import load_topology_text
from tests.netns_util import wait_until
from tests.test_metrics import Samples, get, running, scrape
from tests.test_vhost_port import bring_up, frame
from tests.vhost_frontend import Frontend, GuestRAM


@pytest.fixture
def vhost_switch(tmp_path: Path) -> Iterator[tuple[Switch, str]]:
    name = "pst" + secrets.token_hex(3)
    topo = (f"bridges:\n  br0:\n    ports:\n"
            f"      {name}: {{type: dpdkvhostuser, options: {{vhost-sock-dir: '{tmp_path}'}}}}\n"
            f"      mem: {{type: memory}}\n")
    sw = Switch()
    try:
        sw.build(load_topology_text(topo, "vhost.yaml"))
        yield sw, name
    finally:
        sw.close()
        sw.loop.close()


def counters(s: Samples) -> dict[tuple, float]:
    return {k: v for k, v in s.items() if k[0].startswith("pyswitch_") and k[0].endswith("_total")}


def assert_not_lower(before: dict[tuple, float], after: dict[tuple, float]) -> None:
    lower = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1) < v}
    assert not lower, f"counters went back or vanished: {lower}"


@pytest.mark.timeout(60)
def test_vhost_port_metrics_survive_a_reconnect(vhost_switch: tuple[Switch, str]) -> None:
    sw, name = vhost_switch
    lv = {"bridge": "br0", "port": name, "type": "dpdkvhostuser"}
    mem = {"bridge": "br0", "port": "mem", "type": "memory"}
    path = sw.port(name).socket_path()  # type: ignore[attr-defined]
    with running(sw) as srv:
        s = scrape(srv.url)
        assert get(s, "pyswitch_vhost_connected", **lv) == 0
        assert get(s, "pyswitch_port_link_up", **lv) == 0
        ram, fe = GuestRAM([(0, 8 << 20)]), Frontend.connect(path)
        try:
            ((rxq, txq),) = bring_up(fe, ram)
            sent = [frame(0xFF, 60 + i) for i in range(40)]  # 02:..:ff: unknown unicast, flooded
            for f in sent:
                txq.send_frame(f)
            fe.kick(1)
            assert wait_until(lambda: get(scrape(srv.url), "pyswitch_port_tx_packets_total",
                                          **mem) == 40)
            rxq.post_rx_buffers(4)
            fe.kick(0)
            assert wait_until(lambda: sw.port(name).link_state() == "up")
            sw.port("mem").inject([frame(1, 64, src=9)] * 10)  # to the guest: room for 4
            assert wait_until(lambda: get(scrape(srv.url), "pyswitch_port_tx_dropped_total",
                                          **lv) == 6)
            s = scrape(srv.url)
            assert get(s, "pyswitch_port_rx_packets_total", **lv) == 40  # what the guest sent
            assert get(s, "pyswitch_port_rx_bytes_total", **lv) == sum(map(len, sent))
            assert get(s, "pyswitch_port_tx_packets_total", **lv) == 4
            assert get(s, "pyswitch_port_dropped_total", reason="no_buffer", **lv) == 6
            assert get(s, "pyswitch_vhost_connected", **lv) == 1
            assert get(s, "pyswitch_port_link_up", **lv) == 1
            assert get(s, "pyswitch_vhost_queue_pairs", **lv) == 1
            feats = [dict(k[1]) for k in s if k[0] == "pyswitch_vhost_features_info"]
            assert len(feats) == 1 and int(feats[0]["features"], 16) == fe.features
            assert get(s, "pyswitch_vhost_connections_total", **lv) == 1
            assert get(s, "pyswitch_vhost_kicks_total", **lv) >= 1
            assert get(s, "pyswitch_vhost_notifications_sent_total", **lv) >= 1
        finally:
            fe.close()
            ram.close()
        assert wait_until(lambda: get(scrape(srv.url), "pyswitch_vhost_connected", **lv) == 0)
        before = counters(scrape(srv.url))
        ram, fe = GuestRAM([(0, 4 << 20)]), Frontend.connect(path)
        try:
            ((_, txq),) = bring_up(fe, ram)
            for i in range(7):
                txq.send_frame(frame(0xFF, 70 + i))
            fe.kick(1)
            assert wait_until(lambda: get(scrape(srv.url), "pyswitch_port_rx_packets_total",
                                          **lv) == 47)
            s = scrape(srv.url)
            assert_not_lower(before, counters(s))
            assert get(s, "pyswitch_vhost_reconnects_total", **lv) == 1
            assert get(s, "pyswitch_vhost_connections_total", **lv) == 2
            assert get(s, "pyswitch_vhost_disconnects_total", **lv) == 1
            assert get(s, "pyswitch_port_tx_packets_total", **mem) == 47
            st = port_stats(sw, [name])[name]  # what port-stats shows: the same numbers
            assert json.loads(json.dumps(st)) == st
            assert st["rx_packets"] == 47 and st["vhost"]["counters"]["reconnects"] == 1
            assert st["vhost"]["connected"] and st["vhost"]["queue_pairs"] == 1
        finally:
            fe.close()
            ram.close()
