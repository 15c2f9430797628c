"""Hostile vhost-user sequences on a live port: out of order, bad ring addresses, a
disconnect at every step of the negotiation (issue 8).

The switch runs as in tests/test_hostile_frontend.py (tests/vhost_live.py): a vhost-user
port beside two memory ports that forward throughout.  What is checked:

* out-of-order setup the port can complete later (rings before memory, a kick before the
  addresses) is logged and counted when the ring cannot start, and the ring starts
  once the setup is complete (front ends do reorder: QEMU enables rings before it acks
  the features);
* ring addresses outside every region, or straddling a region's end, never start a ring
  (logged, counted); a started ring whose memory or addresses go bad is stopped;
* a front end that goes away after any step of the negotiation -- at a message boundary
  or in the middle of a message -- leaves no fd behind, is counted as a disconnect (and a
  cut message as a protocol error), and the next front end gets a working port.
"""

from __future__ import annotations

import os

import pytest
from pyswitch.ports.vhostuser import protocol as p
from pyswitch.ports.vhostuser.device import OFFERED_PROTOCOL_FEATURES

from tests.netns_util import wait_until
from tests.test_vhost_port import bring_up
from tests.vhost_frontend import DriverQueue, Frontend, GuestRAM

pytest.register_assert_rewrite("tests.vhost_live")
from tests.vhost_live import A_MAC, LiveSwitch, Session, negotiation, open_fds

pytest_plugins = ["tests.vhost_live"]  # fixtures live, session, ram
R = p.Request
MiB = 1 << 20


def guest_frame(seq: int) -> bytes:
    """A frame from the guest to port a's MAC (learned: it goes to a only, not to b)."""
    return A_MAC + b"\x02\x00\x00\x00\x00\x77\x08\x00" + seq.to_bytes(4, "big") + bytes(42)


def ring_started(live: LiveSwitch, index: int) -> bool:
    return live.port.device.rings[index].started  # type: ignore[attr-defined]


def guest_sends(live: LiveSwitch, fe: Frontend, txq: DriverQueue, n: int = 3) -> bool:
    """The guest transmits ``n`` frames on vring 1; True once a sent them all."""
    b = live.sw.port("a")
    before = b.counters.tx_packets
    for i in range(n):
        txq.send_frame(guest_frame(i))
    fe.kick(1)
    return wait_until(lambda: b.counters.tx_packets - before >= n)


STEPS = 6 + 1 + 12 + 2  # len(negotiation(...))
TRAFFIC_AFTER = 6 + 1 + 12  # both rings set up: the guest sends before the stop


def run_steps(live: LiveSwitch, fe: Frontend, ram: GuestRAM, k: int, cut: bool) -> None:
    """The first ``k`` steps; then, if ``cut``, half of step ``k``'s bytes (with its fds)."""
    rxq, txq = DriverQueue(ram, 64), DriverQueue(ram, 64)
    steps = negotiation(fe, ram, rxq, txq)
    assert len(steps) == STEPS
    for i, (req, payload, fds) in enumerate(steps[:k]):
        if i == TRAFFIC_AFTER:
            rxq.post_rx_buffers(8)
            assert guest_sends(live, fe, txq)
        fe.request(req, payload, fds or None)
        if req == R.SET_PROTOCOL_FEATURES:
            fe.protocol_features = int(OFFERED_PROTOCOL_FEATURES)  # REPLY_ACK from now on
    if cut:
        req, payload, fds = steps[k]
        data = p.encode(req, payload, p.VERSION)
        p.send_message(fe.sock, data[: max(1, len(data) // 2)], fds or None)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cut", [False, True], ids=["at_boundary", "mid_message"])
@pytest.mark.parametrize("k", range(STEPS + 1))
def test_disconnect_at_every_step(live: LiveSwitch, caplog: pytest.LogCaptureFixture,
                                  ram: GuestRAM, k: int, cut: bool) -> None:
    if cut and k == STEPS:
        return  # no step left to cut (the boundary case covers it)
    assert live.disconnected()
    fds, errors, gone = open_fds(), live.stat("protocol_errors"), live.stat("disconnects")
    with live.traffic():
        fe = Frontend.connect(live.path)
        try:
            run_steps(live, fe, ram, k, cut)
        finally:
            fe.close()
        assert wait_until(lambda: live.stat("disconnects") == gone + 1)
    assert live.disconnected()
    assert live.port.link_state() == "down"  # type: ignore[attr-defined]
    assert wait_until(lambda: open_fds() == fds), f"fds leaked: {open_fds()} open, {fds} before"
    assert live.stat("protocol_errors") == errors + cut  # a cut message is an error, a close is not
    if cut:
        assert any(live.name in r.getMessage() and "refused" in r.getMessage()
                   for r in caplog.records)
    # the port serves the next front end as if nothing happened
    good_ram = GuestRAM([(0, 4 * MiB)])
    good = Frontend.connect(live.path)
    try:
        ((_, txq),) = bring_up(good, good_ram, size=64)
        assert guest_sends(live, good, txq)
    finally:
        good.close()
        good_ram.close()
    assert live.disconnected()
    live.assert_healthy()


# -- out of order ------------------------------------------------------------------------------

def test_rings_before_memory(session: Session, ram: GuestRAM) -> None:
    fe, live = session.fe, session.live
    fe.negotiate()
    txq = DriverQueue(ram, 64)
    fe.setup_ring(1, txq)
    txq.send_frame(guest_frame(1))
    fe.kick(1)  # no memory: the ring cannot start; the kick is remembered
    session.assert_refused(closed=False)
    assert not ring_started(live, 1)
    b = live.sw.port("a")
    before = b.counters.tx_packets
    fe.set_mem_table(ram)  # the setup is complete: the remembered kick starts the ring
    assert wait_until(lambda: ring_started(live, 1))
    assert wait_until(lambda: b.counters.tx_packets > before)


def test_kick_before_addresses(session: Session, ram: GuestRAM) -> None:
    fe, live = session.fe, session.live
    fe.negotiate()
    fe.set_mem_table(ram)
    txq = DriverQueue(ram, 64)
    fe.request(R.SET_VRING_NUM, p.VRING_STATE.pack(1, 64))
    kick = fe.kicks.setdefault(1, os.eventfd(0, os.EFD_NONBLOCK))
    fe.request(R.SET_VRING_KICK, p.U64.pack(1), [kick])
    for _ in range(50):  # a flood of kicks logs and counts once (a repeated kick changes nothing)
        fe.kick(1)
    session.assert_refused(closed=False)
    assert wait_until(lambda: live.stat("kicks") > 0)
    assert live.stat("protocol_errors") - session.errors == 1
    a = txq.addr(1)
    fe.request(R.SET_VRING_ADDR, p.VRING_ADDR.pack(1, 0, a.desc, a.used, a.avail, 0))
    assert wait_until(lambda: ring_started(live, 1))


def _addr(q: DriverQueue, **override: int) -> bytes:
    a = q.addr(1)
    fields = {"desc": a.desc, "used": a.used, "avail": a.avail} | override
    return p.VRING_ADDR.pack(1, 0, fields["desc"], fields["used"], fields["avail"], 0)


def _region_end(ram: GuestRAM) -> int:
    r = ram.regions[0]
    return r.uva + r.size


BAD_ADDRESSES = {
    "desc_outside": lambda q, ram: _addr(q, desc=0xDEAD_0000_0000),
    "avail_outside": lambda q, ram: _addr(q, avail=1 << 63),
    "used_outside": lambda q, ram: _addr(q, used=0),
    "desc_straddles_region_end": lambda q, ram: _addr(q, desc=_region_end(ram) - 512),
    "used_straddles_region_end": lambda q, ram: _addr(q, used=_region_end(ram) - 8),
    "guest_physical_not_virtual": lambda q, ram: _addr(q, desc=q.desc),
}


@pytest.mark.parametrize("kicked", [True, False], ids=["kick_fd", "polled"])
@pytest.mark.parametrize("bad", BAD_ADDRESSES)
def test_ring_addresses_outside_guest_memory(session: Session, ram: GuestRAM, bad: str,
                                             kicked: bool) -> None:
    fe, live = session.fe, session.live
    fe.negotiate()
    fe.set_mem_table(ram)
    txq = DriverQueue(ram, 64)
    fe.request(R.SET_VRING_NUM, p.VRING_STATE.pack(1, 64))
    fe.request(R.SET_VRING_ADDR, BAD_ADDRESSES[bad](txq, ram))
    if kicked:
        kick = fe.kicks.setdefault(1, os.eventfd(0, os.EFD_NONBLOCK))
        fe.request(R.SET_VRING_KICK, p.U64.pack(1), [kick])
        fe.kick(1)
    else:  # a polling front end: the ring would start at once
        fe.request(R.SET_VRING_KICK, p.U64.pack(1 | p.VRING_NOFD_MASK))
    session.assert_refused(closed=False)
    assert not ring_started(live, 1)
    assert any("cannot start" in m for m in session.warned())


def started_transmitq(session: Session, ram: GuestRAM) -> DriverQueue:
    """Negotiate, share ``ram`` and start a polled transmitq (vring 1)."""
    session.fe.negotiate()
    session.fe.set_mem_table(ram)
    txq = DriverQueue(ram, 64)
    session.fe.setup_ring(1, txq, kick=False)
    assert wait_until(lambda: ring_started(session.live, 1))
    return txq


def test_started_ring_moved_outside_memory_stops(session: Session, ram: GuestRAM) -> None:
    fe, live = session.fe, session.live
    txq = started_transmitq(session, ram)
    fe.request(R.SET_VRING_ADDR, _addr(txq, desc=0xDEAD_0000_0000))
    session.assert_refused(closed=False)
    assert not ring_started(live, 1)


def test_new_memory_table_without_the_rings_stops_them(session: Session, ram: GuestRAM) -> None:
    fe, live = session.fe, session.live
    started_transmitq(session, ram)
    other = GuestRAM([(64 * MiB, MiB)])
    other.regions[0].uva = 0x5000_0000_0000  # the front end moved: ring addresses now point nowhere
    try:
        fe.set_mem_table(other)  # valid table, but the ring's memory is gone
    finally:
        other.close()
    session.assert_refused(closed=False)
    assert not ring_started(live, 1)
