"""The device state machine, driven with messages directly (no socket, no loop)."""

from __future__ import annotations

import logging
import os

import pytest

from pyswitch.ports.vhostuser import protocol as p
from pyswitch.ports.vhostuser.device import (
    OFFERED_FEATURES,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    Device,
    FatalDeviceError,
)
from tests.vhost_frontend import DriverQueue, GuestRAM

R = p.Request


def msg(req, payload=b"", fds=(), need_reply=False):
    flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
    return p.Message(req, flags, payload, list(fds))


def u64(req, value, **kw):
    return msg(req, p.U64.pack(value), **kw)


def status(reply):
    req, flags, size = p.HEADER.unpack(reply[:12])
    assert flags == p.VERSION | p.FLAG_REPLY and size == 8
    return p.U64.unpack(reply[12:])[0]


def mem_table(ram):
    table = ram.table()
    payload = p.MEM_TABLE_HEADER.pack(len(table), 0) + b"".join(
        p.MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        for r in table)
    return msg(R.SET_MEM_TABLE, payload, [os.dup(fd) for fd in ram.fds()], need_reply=True)


@pytest.fixture
def ram():
    r = GuestRAM()
    yield r
    r.close()


@pytest.fixture
def dev():
    d = Device()
    yield d
    d.reset()


def negotiate(dev, features=OFFERED_FEATURES, protocol=int(p.ProtocolFeature.REPLY_ACK)):
    dev.handle(msg(R.SET_OWNER))
    if features & VHOST_USER_F_PROTOCOL_FEATURES:
        dev.handle(u64(R.SET_PROTOCOL_FEATURES, protocol))
    dev.handle(u64(R.SET_FEATURES, features))


def setup_ring(dev, ram, index, size=16, kick=True):
    q = DriverQueue(ram, size)
    a = q.addr(index)
    for m in (
        msg(R.SET_VRING_NUM, p.VRING_STATE.pack(index, size)),
        msg(R.SET_VRING_ADDR, p.VRING_ADDR.pack(index, 0, a.desc, a.used, a.avail, 0)),
        msg(R.SET_VRING_BASE, p.VRING_STATE.pack(index, 0)),
        u64(R.SET_VRING_CALL, index, fds=[os.eventfd(0)]),
    ):
        assert dev.handle(m) is None
    kfd = os.eventfd(0, os.EFD_NONBLOCK) if kick else None
    if kick:
        dev.handle(u64(R.SET_VRING_KICK, index, fds=[os.dup(kfd)]))
    else:
        dev.handle(u64(R.SET_VRING_KICK, index | p.VRING_NOFD_MASK))
    return q, kfd


def test_offer_is_fixed_and_honest(dev):
    for _ in range(2):  # the same every time (front ends compare across reconnects)
        assert p.U64.unpack(dev.handle(msg(R.GET_FEATURES))[12:])[0] == OFFERED_FEATURES
    assert OFFERED_FEATURES == (1 << 32) | (1 << 15) | (1 << 22) | (1 << 28) | (1 << 29) | (1 << 30)
    pf = p.U64.unpack(dev.handle(msg(R.GET_PROTOCOL_FEATURES))[12:])[0]
    assert pf == p.ProtocolFeature.MQ | p.ProtocolFeature.REPLY_ACK | p.ProtocolFeature.CONFIGURE_MEM_SLOTS
    assert p.U64.unpack(dev.handle(msg(R.GET_QUEUE_NUM))[12:])[0] == 8


def test_reply_ack_success_and_failure(dev):
    negotiate(dev)
    assert status(dev.handle(u64(R.SET_FEATURES, OFFERED_FEATURES, need_reply=True))) == 0
    assert status(dev.handle(u64(R.SET_FEATURES, 1 << 34, need_reply=True))) == 1  # not offered
    assert dev.handle(u64(R.SET_FEATURES, OFFERED_FEATURES)) is None  # no reply asked


@pytest.mark.parametrize("req", [R.SET_LOG_BASE, R.SEND_RARP, 99, 1000])
def test_unknown_or_unsupported_request_fails_cleanly(dev, req, caplog):
    negotiate(dev)
    r, w = os.pipe()
    before = len(os.listdir("/proc/self/fd"))
    with caplog.at_level(logging.WARNING):
        assert status(dev.handle(u64(req, 0, fds=[r], need_reply=True))) == 1
    assert "unsupported request" in caplog.text
    assert len(os.listdir("/proc/self/fd")) == before - 1  # its fd was closed
    assert dev.handle(u64(req, 0)) is None  # logged, nothing to answer
    os.close(w)


def test_failed_get_drops_the_connection(dev):
    with pytest.raises(FatalDeviceError):
        dev.handle(msg(R.GET_VRING_BASE, p.VRING_STATE.pack(99, 0)))
    with pytest.raises(FatalDeviceError):
        dev.handle(msg(R.GET_VRING_BASE, b"short"))


def test_memory_without_fds_is_a_clear_error(dev, ram, caplog):
    negotiate(dev)
    m = mem_table(ram)
    m.close_fds()
    with caplog.at_level(logging.WARNING):
        assert status(dev.handle(m)) == 1
    assert "share=on" in caplog.text and dev.memory is None


def test_ring_starts_on_first_kick_and_stops_on_get_vring_base(dev, ram):
    negotiate(dev)
    assert status(dev.handle(mem_table(ram))) == 0
    q, kfd = setup_ring(dev, ram, 1)
    ring = dev.rings[1]
    assert not ring.started and not ring.enabled  # stopped and disabled
    dev.handle(msg(R.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1)))
    assert ring.enabled and not ring.started
    dev.kick(1)
    assert ring.started and ring.queue is not None
    q.send_frame(b"x" * 60)
    q.send_frame(b"y" * 60)
    frames, heads = [], []
    ring.queue.pop_frames(32, frames, heads)
    reply = dev.handle(msg(R.GET_VRING_BASE, p.VRING_STATE.pack(1, 0)))
    assert p.VRING_STATE.unpack(reply[12:]) == (1, 2)  # next avail index to process
    assert not ring.started and ring.kick_fd is None
    os.close(kfd)


def test_nofd_kick_means_polling_and_starts_at_once(dev, ram):
    negotiate(dev)
    dev.handle(mem_table(ram))
    setup_ring(dev, ram, 1, kick=False)
    assert dev.rings[1].started and dev.rings[1].polled


def test_buffers_waiting_at_set_vring_kick_count_as_a_kick(dev, ram):
    negotiate(dev)
    dev.handle(mem_table(ram))
    q = DriverQueue(ram, 16)
    q.send_frame(b"z" * 60)  # the guest kicked before we were there
    a = q.addr(1)
    dev.handle(msg(R.SET_VRING_NUM, p.VRING_STATE.pack(1, 16)))
    dev.handle(msg(R.SET_VRING_ADDR, p.VRING_ADDR.pack(1, 0, a.desc, a.used, a.avail, 0)))
    kfd = os.eventfd(0)
    dev.handle(u64(R.SET_VRING_KICK, 1, fds=[kfd]))
    assert dev.rings[1].started


def test_enable_without_protocol_features(dev, ram):
    features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF
    negotiate(dev, features)
    assert all(r.enabled for r in dev.rings)  # SET_FEATURES enabled every ring
    # refused (bit 30 not negotiated); no REPLY_ACK either, so nothing to answer
    assert dev.handle(msg(R.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 0), need_reply=True)) is None
    assert dev.rings[0].enabled
    assert dev.hdr_len == 12 and dev.mergeable


def test_started_ring_refuses_resize(dev, ram):
    negotiate(dev)
    dev.handle(mem_table(ram))
    setup_ring(dev, ram, 0, kick=False)
    assert status(dev.handle(msg(R.SET_VRING_NUM, p.VRING_STATE.pack(0, 32), need_reply=True))) == 1
    assert status(dev.handle(msg(R.SET_VRING_NUM, p.VRING_STATE.pack(2, 100), need_reply=True))) == 1


def test_new_memory_table_remaps_started_rings(dev, ram):
    negotiate(dev)
    dev.handle(mem_table(ram))
    q, _ = setup_ring(dev, ram, 1, kick=False)
    old = dev.memory
    q.send_frame(b"a" * 60)
    frames, heads = [], []
    dev.rings[1].queue.pop_frames(32, frames, heads)
    del frames
    assert status(dev.handle(mem_table(ram))) == 0  # same RAM, new mapping (hotplug path)
    assert dev.memory is not old and old.regions == []  # old one unmapped
    q.send_frame(b"b" * 60)
    frames2, heads2 = [], []
    dev.rings[1].queue.pop_frames(32, frames2, heads2)  # continues at avail index 1
    assert [bytes(f) for f in frames2] == [b"b" * 60]


def test_reset_closes_every_fd(ram):
    before = len(os.listdir("/proc/self/fd"))
    dev = Device()
    negotiate(dev)
    dev.handle(mem_table(ram))
    _, k0 = setup_ring(dev, ram, 0)
    _, k1 = setup_ring(dev, ram, 1)
    os.close(k0)
    os.close(k1)
    dev.reset()
    assert len(os.listdir("/proc/self/fd")) == before
    assert dev.features == 0 and dev.memory is None


def test_enable_accepted_once_protocol_features_were_exchanged(dev):
    """QEMU 7.2 sends SET_VRING_ENABLE after SET_PROTOCOL_FEATURES and before SET_FEATURES
    acks bit 30 (seen with a real guest: refusing it left every ring disabled)."""
    dev.handle(u64(R.SET_PROTOCOL_FEATURES, int(p.ProtocolFeature.REPLY_ACK)))
    reply = dev.handle(msg(R.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1), need_reply=True))
    assert reply == p.encode_u64_reply(R.SET_VRING_ENABLE, 0)
    assert dev.rings[1].enabled


def single_region(ram, i, fds=True):
    r = ram.table()[i]
    payload = p.SINGLE_MEM_REGION.pack(0, r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                       r.mmap_offset)
    return msg(R.ADD_MEM_REG, payload, [os.dup(ram.fds()[i])] if fds else [], need_reply=True)


def test_add_and_remove_memory_regions():
    """CONFIGURE_MEM_SLOTS: regions arrive one by one; a ring starts once its memory is there
    and is stopped (not crashed) when the region it lives in is removed."""
    ram = GuestRAM([(0, 1 << 20), (0x4000_0000, 1 << 20)])
    dev = Device()
    try:
        negotiate(dev, protocol=int(p.ProtocolFeature.REPLY_ACK
                                    | p.ProtocolFeature.CONFIGURE_MEM_SLOTS))
        assert p.U64.unpack(dev.handle(msg(R.GET_MAX_MEM_SLOTS))[12:])[0] >= 8
        assert status(dev.handle(single_region(ram, 0))) == 0
        q, kfd = setup_ring(dev, ram, 1)
        dev.kick(1)
        assert dev.rings[1].started
        # the second region carries the frame buffer: not mapped yet -> bad chain
        buf = ram.alloc(200, region=1)
        ram.write(buf, bytes(12) + b"m" * 60)
        q.make_available([q.add_chain([(buf, 72, False)])])
        frames, heads = [], []
        assert dev.rings[1].queue.pop_frames(32, frames, heads) == 1 and frames == []
        assert status(dev.handle(single_region(ram, 1))) == 0
        q.make_available([q.add_chain([(buf, 72, False)])])
        dev.rings[1].queue.pop_frames(32, frames, heads)
        assert [bytes(f) for f in frames] == [b"m" * 60]
        del frames
        # an overlapping region is refused; a region sent without its fd too
        assert status(dev.handle(single_region(ram, 1))) == 1
        assert status(dev.handle(single_region(ram, 0, fds=False))) == 1
        # remove the region holding the ring: the ring stops, the device goes on
        rem = single_region(ram, 0)
        rem.request = R.REM_MEM_REG
        assert status(dev.handle(rem)) == 0
        assert not dev.rings[1].started and len(dev.memory.regions) == 1
        rem2 = single_region(ram, 0)
        rem2.request = R.REM_MEM_REG
        assert status(dev.handle(rem2)) == 1  # already gone
        os.close(kfd)
    finally:
        dev.reset()
        ram.close()


def test_call_never_blocks_on_a_saturated_call_eventfd(dev, ram):
    """The front end shares the call eventfd and may set its counter to the maximum
    (2^64 - 2); a blocking eventfd_write would then hang the switch's loop for good.
    The call is skipped instead (counted as not sent)."""
    import signal

    negotiate(dev)
    dev.handle(mem_table(ram))
    efd = os.eventfd(0)
    try:
        dev.handle(u64(R.SET_VRING_CALL, 0, fds=[os.dup(efd)]))
        os.eventfd_write(efd, 2**64 - 2)  # the hostile front end fills the counter

        class Blocked(Exception):  # not an OSError: call() must not swallow it

            pass

        def timeout(_sig, _frame):
            raise Blocked("Vring.call() blocked on the call eventfd")

        old = signal.signal(signal.SIGALRM, timeout)
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        try:
            assert dev.rings[0].call() is False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    finally:
        os.close(efd)


@pytest.mark.parametrize("req", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
@pytest.mark.parametrize("kind", ["pipe_at_eof", "regular_file"])
def test_notification_fd_that_is_not_an_eventfd_is_refused(dev, req, kind, tmp_path):
    """A kick fd that is always readable (a pipe whose writer is gone, a file) would make
    the level-triggered loop call the port forever; a call fd that is a pipe nobody reads
    fills up.  Only eventfds are taken; the others are refused and closed."""
    negotiate(dev)
    if kind == "pipe_at_eof":
        fd, w = os.pipe()
        os.close(w)
    else:
        fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    before = len(os.listdir("/proc/self/fd"))
    assert status(dev.handle(u64(req, 1, fds=[fd], need_reply=True))) == 1
    assert len(os.listdir("/proc/self/fd")) == before - 1
    ring = dev.rings[1]
    assert ring.kick_fd is None and ring.call_fd is None and ring.err_fd is None


@pytest.mark.parametrize("kick_fd", [True, False])
def test_a_ring_whose_base_is_stale_resumes_at_its_used_index(dev, ram, kick_fd, datapath):
    """DPDK virtio-user reconnecting to a restarted back end sends SET_VRING_BASE 0 while
    its ring is thousands of entries on (and may never kick: NO_NOTIFY was left set).
    The ring starts at used.idx, where the old back end stopped, and what waits after it
    is taken at once."""
    negotiate(dev)
    dev.handle(mem_table(ram))
    q = DriverQueue(ram, 16)
    q.avail_idx = 40_000  # the ring as the crashed back end left it: all returned ...
    q.ram.write_u16(q.used + 2, 40_000)
    q.send_frame(b"z" * 60)  # ... and one frame the guest queued since
    a = q.addr(1)
    dev.handle(msg(R.SET_VRING_NUM, p.VRING_STATE.pack(1, 16)))
    dev.handle(msg(R.SET_VRING_BASE, p.VRING_STATE.pack(1, 0)))
    dev.handle(msg(R.SET_VRING_ADDR, p.VRING_ADDR.pack(1, 0, a.desc, a.used, a.avail, 0)))
    if kick_fd:
        dev.handle(u64(R.SET_VRING_KICK, 1, fds=[os.eventfd(0)]))
    else:
        dev.handle(u64(R.SET_VRING_KICK, 1 | p.VRING_NOFD_MASK))
    ring = dev.rings[1]
    assert ring.started and not ring.queue.broken
    assert ring.queue.last_avail_idx == 40_000 and ring.queue.pending() == 1


def test_vring_enable_before_any_negotiation_is_taken(dev):
    """DPDK virtio-user sends SET_VRING_ENABLE first when it reconnects (and drops the
    connection if it is refused); once SET_FEATURES has left out bit 30 it is refused."""
    dev.handle(msg(R.SET_OWNER))
    assert dev.handle(msg(R.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))) is None
    assert dev.rings[1].enabled


def test_a_started_ring_asks_for_kicks_again(dev, ram, datapath):
    """A back end killed while it polled a ring left NO_NOTIFY in used.flags; the guest
    would never kick the new one: starting a ring clears it (and, with EVENT_IDX, sets
    avail_event to the next entry)."""
    negotiate(dev)
    dev.handle(mem_table(ram))
    q = DriverQueue(ram, 16)
    q.ram.write_u16(q.used, 1)  # VIRTQ_USED_F_NO_NOTIFY, as the old back end left it
    a = q.addr(1)
    dev.handle(msg(R.SET_VRING_NUM, p.VRING_STATE.pack(1, 16)))
    dev.handle(msg(R.SET_VRING_ADDR, p.VRING_ADDR.pack(1, 0, a.desc, a.used, a.avail, 0)))
    dev.handle(u64(R.SET_VRING_KICK, 1 | p.VRING_NOFD_MASK))
    assert dev.rings[1].started
    assert q.used_flags() == 0
