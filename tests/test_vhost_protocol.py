"""vhost-user wire layer: messages with fds over a real socketpair, payload validators."""

from __future__ import annotations

import os
import socket

import pytest

from pyswitch.ports.vhostuser import protocol as p


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(0.5)
    yield a, b
    a.close()
    b.close()


def test_request_codes_follow_the_spec():
    assert p.Request.GET_FEATURES == 1
    assert p.Request.SET_VRING_ENABLE == 18
    assert p.Request.ADD_MEM_REG == 37
    assert p.ProtocolFeature.REPLY_ACK == 1 << 3
    assert p.ProtocolFeature.CONFIGURE_MEM_SLOTS == 1 << 15


def test_message_with_fds_roundtrip(pair):
    a, b = pair
    r, w = os.pipe()
    payload = p.U64.pack(0x105)
    p.send_message(a, p.encode(p.Request.SET_VRING_KICK, payload), [r])
    msg = p.read_message(b)
    try:
        assert msg.request == p.Request.SET_VRING_KICK and msg.payload == payload
        index, fd = p.parse_vring_fd(
            p.Message(msg.request, msg.flags, p.U64.pack(5), msg.fds))
        assert index == 5
        os.write(w, b"k")
        assert os.read(fd, 1) == b"k"  # the fd we got is the pipe we sent
        os.close(fd)
    finally:
        msg.close_fds()
        os.close(r)
        os.close(w)


def test_nofd_flag_means_polling_and_rejects_fds():
    index, fd = p.parse_vring_fd(p.Message(12, 1, p.U64.pack(3 | p.VRING_NOFD_MASK)))
    assert (index, fd) == (3, None)
    r, w = os.pipe()
    msg = p.Message(12, 1, p.U64.pack(3 | p.VRING_NOFD_MASK), [r])
    with pytest.raises(p.InvalidMessage):
        p.parse_vring_fd(msg)
    msg.close_fds()
    os.close(w)
    with pytest.raises(p.InvalidMessage, match="expected 1 fd"):
        p.parse_vring_fd(p.Message(12, 1, p.U64.pack(3)))
    with pytest.raises(p.InvalidMessage, match="unknown bits"):
        p.parse_vring_fd(p.Message(12, 1, p.U64.pack(1 << 9)))


def test_disconnect_and_partial(pair):
    a, b = pair
    a.sendall(p.HEADER.pack(1, 1, 8) + b"1234")  # 4 of 8 payload bytes, then EOF
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(p.PartialMessage):
        p.read_message(b)
    with pytest.raises(p.Disconnected):
        p.read_message(b)


def test_stalled_peer_times_out_as_partial(pair):
    a, b = pair
    a.sendall(p.HEADER.pack(1, 1, 8))  # header promises 8 bytes that never come
    with pytest.raises(p.PartialMessage):
        p.read_message(b)


@pytest.mark.parametrize(
    "header, match",
    [
        (p.HEADER.pack(1, 2, 0), "version"),
        (p.HEADER.pack(1, 1, p.MAX_PAYLOAD + 1), "payload size"),
    ],
)
def test_bad_headers(pair, header, match):
    a, b = pair
    r, w = os.pipe()
    socket.send_fds(a, [header], [r])
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(p.InvalidMessage, match=match):
        p.read_message(b)
    # The fd that came with the bad message was closed by read_message.
    assert len(os.listdir("/proc/self/fd")) == before
    os.close(r)
    os.close(w)


def test_mem_table_validator():
    region = p.MEM_REGION.pack(0, 4096, 0x7000, 0)
    table = p.MEM_TABLE_HEADER.pack(1, 0) + region + bytes(7 * 32)  # QEMU pads to 8 slots
    (r,) = p.parse_mem_table(p.Message(5, 1, table))
    assert (r.guest_phys_addr, r.memory_size, r.userspace_addr) == (0, 4096, 0x7000)
    for bad in (p.MEM_TABLE_HEADER.pack(0, 0), p.MEM_TABLE_HEADER.pack(9, 0) + region * 9,
                p.MEM_TABLE_HEADER.pack(2, 0) + region, b"\0"):
        with pytest.raises(p.InvalidMessage):
            p.parse_mem_table(p.Message(5, 1, bad))
    with pytest.raises(p.InvalidMessage, match="size 0"):
        p.parse_mem_table(p.Message(5, 1, p.MEM_TABLE_HEADER.pack(1, 0) + bytes(32)))


def test_fixed_size_payloads_are_checked():
    with pytest.raises(p.InvalidMessage):
        p.parse_u64(p.Message(2, 1, b"1234"))
    with pytest.raises(p.InvalidMessage):
        p.parse_vring_state(p.Message(8, 1, bytes(12)))
    addr = p.parse_vring_addr(p.Message(9, 1, p.VRING_ADDR.pack(1, 0, 10, 20, 30, 0)))
    assert (addr.desc, addr.used, addr.avail) == (10, 20, 30)  # wire order desc, used, avail


def test_reply_encoding():
    data = p.encode_u64_reply(p.Request.GET_FEATURES, 7)
    req, flags, size = p.HEADER.unpack(data[:12])
    assert (req, flags, size) == (1, p.VERSION | p.FLAG_REPLY, 8)
    assert p.U64.unpack(data[12:]) == (7,)


def test_reader_assembles_messages_from_pieces(pair):
    """MessageReader on a non-blocking socket: a header and payload arriving in pieces,
    a zero-length payload, and two messages in one segment; fds stay with their message."""
    a, b = pair
    b.setblocking(False)
    reader = p.MessageReader()
    r, w = os.pipe()
    data = p.encode(p.Request.SET_VRING_KICK, p.U64.pack(1))
    socket.send_fds(a, [data[:5]], [r])
    assert reader.read(b) == []
    a.sendall(data[5:14])
    assert reader.read(b) == []
    a.sendall(data[14:] + p.encode(p.Request.SET_OWNER) + p.encode(p.Request.GET_FEATURES))
    msgs = reader.read(b)
    assert [m.request for m in msgs] == [p.Request.SET_VRING_KICK, p.Request.SET_OWNER,
                                        p.Request.GET_FEATURES]
    assert msgs[0].payload == p.U64.pack(1) and len(msgs[0].fds) == 1 and not msgs[1].fds
    msgs[0].close_fds()
    os.close(r)
    os.close(w)
    a.sendall(data[:7])
    assert reader.read(b) == []
    a.close()
    with pytest.raises(p.PartialMessage):
        reader.read(b)


def test_reader_eof_and_bad_header(pair):
    a, b = pair
    b.setblocking(False)
    a.sendall(p.HEADER.pack(1, 2, 0))
    with pytest.raises(p.InvalidMessage):
        p.MessageReader().read(b)
    a.close()
    with pytest.raises(p.Disconnected):
        p.MessageReader().read(b)


@pytest.mark.parametrize("then", ["eof", "bad_header", "eof_mid_message"])
def test_reader_error_after_complete_messages_leaks_no_fd(pair, then):
    """A front end sends a message with an fd and then hangs up (or sends garbage) in the
    same burst: the read fails, and the completed message's fd must not leak."""
    a, b = pair
    b.setblocking(False)
    reader = p.MessageReader()
    before = len(os.listdir("/proc/self/fd"))
    efd = os.eventfd(0)
    socket.send_fds(a, [p.encode(p.Request.SET_VRING_CALL, p.U64.pack(0))], [efd])
    os.close(efd)
    if then == "bad_header":
        a.sendall(p.HEADER.pack(1, 2, 0))
    elif then == "eof_mid_message":
        a.sendall(p.encode(p.Request.SET_OWNER)[:5])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(p.ProtocolError):
        reader.read(b)
    assert len(os.listdir("/proc/self/fd")) == before
