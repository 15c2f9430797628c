"""The runtime with in-memory ports: frames go through the real event loop, no root."""

import time

import pytest

from pyswitch.switch import Switch
from pyswitch.topology import load_topology_text
from tests.test_bridge import BCAST, frame, mac, vid_of

TOPO = """\
bridges:
  br0:
    ports:
      m1: {type: memory, tag: 10}
      m2: {type: memory, tag: 10}
      m3: {type: memory, tag: 20}
      t1: {type: memory, trunks: [10, 20]}
"""


@pytest.fixture
def sw():
    s = Switch()
    s.build(load_topology_text(TOPO, "t.yaml"))
    yield s
    s.close()
    s.loop.close()


def pump(sw: Switch, rounds: int = 5) -> None:
    for _ in range(rounds):
        sw.loop.run_once(max_wait=0.01)


def test_frames_cross_the_loop_with_vlans(sw):
    m1, m2, m3, t1 = (sw.port(n) for n in ("m1", "m2", "m3", "t1"))
    m1.inject([frame(BCAST, mac(1))])
    pump(sw)
    assert len(m2.sent) == 1 and len(m3.sent) == 0
    assert vid_of(t1.sent[0]) == 10
    assert m1.counters.rx_packets == 1 and m2.counters.tx_packets == 1
    assert t1.counters.tx_bytes == len(frame(BCAST, mac(1))) + 4


def test_big_batches_are_serviced_fairly_and_completely(sw):
    m1, m2, m3 = sw.port("m1"), sw.port("m2"), sw.port("m3")
    m2.inject([frame(BCAST, mac(2))])
    pump(sw)
    m2.sent.clear()
    sw.port("t1").sent.clear()
    m1.inject([frame(mac(2), mac(1), payload=i.to_bytes(4, "big") * 12) for i in range(1000)])
    m3.inject([frame(BCAST, mac(3))])
    pump(sw, rounds=50)
    assert len(m2.sent) == 1000
    assert [int.from_bytes(f[14:18], "big") for f in m2.sent] == list(range(1000))
    assert len(sw.port("t1").sent) == 1  # only m3's broadcast: m1's frames were unicast


def test_port_add_and_delete_live(sw):
    from pyswitch.config import PortConfig

    sw.add_port("br0", PortConfig("m4", "memory"))
    sw.del_port("m2")
    sw.port("t1").inject([frame(BCAST, mac(7), vid=10)])
    pump(sw)
    assert len(sw.port("m1").sent) == 1
    assert vid_of(sw.port("m4").sent[0]) == 10  # no VLAN setting: a trunk of every VLAN
    with pytest.raises(KeyError):
        sw.port("m2")
    assert "m2" not in sw.port_names("br0") and sw.port_number("m4") == 5
    sw.add_port("br0", PortConfig("m5", "memory"))
    assert sw.port_number("m5") == 2  # the lowest free number, m2's


def test_counters_continue_when_a_port_is_deleted_and_added_again(sw):
    """A port's counters belong to its name: a re-add never makes them go backwards
    (Prometheus counters stay monotonic); a new name starts from zero."""
    from pyswitch.config import PortConfig

    sw.port("m1").inject([frame(BCAST, mac(1))] * 3)
    pump(sw)
    assert sw.port("m1").counters.rx_packets == 3
    sw.del_port("m1")
    sw.add_port("br0", PortConfig("m1", "memory"))
    sw.port("m1").inject([frame(BCAST, mac(1))])
    pump(sw)
    assert sw.port("m1").counters.rx_packets == 4
    sw.add_port("br0", PortConfig("m9", "memory"))
    assert sw.port("m9").counters.rx_packets == 0



def test_a_periodic_timer_survives_a_failing_callback():
    """call_every goes on after its callback raises once (the MAC aging sweep, which
    calls on_flows_expired, would otherwise stop for good)."""
    from pyswitch.loop import EventLoop

    loop = EventLoop()
    calls = []

    def tick():
        calls.append(loop.now())
        if len(calls) == 1:
            raise RuntimeError("callback failed")

    try:
        loop.call_every(0.01, tick)
        for _ in range(50):
            loop.run_once(max_wait=0.02)
            if len(calls) >= 3:
                break
    finally:
        loop.close()
    assert len(calls) >= 3


def test_a_stop_before_run_is_not_lost():
    """A SIGTERM while the daemon is still building its ports calls stop() before run():
    run() must then return at once (it used to reset the flag and run on)."""
    import time

    from pyswitch.loop import EventLoop

    loop = EventLoop()
    try:
        loop.stop()
        safety = loop.call_later(3.0, loop.stop)  # bounds the test if the stop was lost
        t0 = time.monotonic()
        loop.run()
        assert time.monotonic() - t0 < 1.0
        safety.cancel()
        loop.call_later(0.05, loop.stop)  # a later run is not stopped by the old request
        t0 = time.monotonic()
        loop.run()
        assert time.monotonic() - t0 >= 0.04
    finally:
        loop.close()


def test_counters_survive_a_re_add_that_fails(sw):
    """A re-add that fails (here: a veth of that name with no interface) must not lose the
    counters kept for the name; the undo that adds the port back continues them."""
    from pyswitch.config import PortConfig
    from pyswitch.port import PortError

    sw.port("m1").inject([frame(BCAST, mac(1))] * 3)
    pump(sw)
    sw.del_port("m1")
    with pytest.raises(PortError):
        sw.add_port("br0", PortConfig("m1", "veth", {"existing": "true"}))
    sw.add_port("br0", PortConfig("m1", "memory"))
    assert sw.port("m1").counters.rx_packets == 3


def test_a_port_is_polled_while_traffic_flows_then_sleeps(sw, monkeypatch):
    """After a batch the port stays ready (polled, its peer's notifications off) until
    POLL_LINGER passes without frames; then poll_mode(False) and the loop sleeps."""
    m1 = sw.port("m1")
    calls: list[bool] = []
    monkeypatch.setattr(m1, "poll_mode", lambda polling: calls.append(polling) or False)
    m1.inject([frame(BCAST, mac(1))])
    sw.loop.run_once(max_wait=0.01)  # the fd fires: m1 is ready
    sw.loop.run_once(max_wait=0.01)  # serviced: one frame, polling starts
    assert calls == [True]
    assert m1 in sw.loop._ready  # still polled, no fd needed
    deadline = time.monotonic() + 2
    while len(calls) < 2 and time.monotonic() < deadline:  # empty polls until the linger passed
        sw.loop.run_once(max_wait=0.01)
    assert calls == [True, False]
    assert m1 not in sw.loop._ready


def test_pmd_polls_every_port_always():
    s = Switch(pmd=True)
    try:
        s.build(load_topology_text(TOPO, "t.yaml"))
        pump(s, 3)
        assert {s.port(n) for n in ("m1", "m2", "m3", "t1")} <= set(s.loop._ready)
    finally:
        s.close()
        s.loop.close()
