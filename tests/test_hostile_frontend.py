"""Hostile vhost-user front ends against a live port inside a running switch (issue 8).

Each case speaks the protocol badly on purpose over the port's real unix socket while
the switch forwards between two other ports (tests/vhost_live.py).  Every case must be:

* refused: a failure status (REPLY_ACK) for a request the port can refuse and go on,
  or the connection closed by the switch where nothing else is possible (a bad
  header, a GET_* we cannot answer, a message cut short);
* logged: a WARNING naming the port;
* counted: ``vhost_stats["protocol_errors"]`` (``pyswitch_vhost_protocol_errors_total``);
* harmless: frames keep flowing a -> b during the session, the loop survives with no
  exception escaping, and the process has the same number of open fds afterwards.

Out-of-order setup the port can still complete (rings before memory, a kick before the
addresses) is tolerated as the spec's front ends need: the ring that cannot start yet
is logged and counted, and it starts once the setup is complete.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
from pyswitch.ports.vhostuser import protocol as p

from pyswitch.metrics import start_metrics_server
from pyswitch.stats import port_stats
from tests.netns_util import wait_until
from tests.test_metrics import get, scrape
from tests.vhost_frontend import DriverQueue, Frontend, GuestRAM

pytest.register_assert_rewrite("tests.vhost_live")
from tests.vhost_live import FD_KINDS, Session, memfd, status

pytest_plugins = ["tests.vhost_live"]  # fixtures live, session, ram
R = p.Request
MiB = 1 << 20


def table(*regions: tuple[int, int, int, int], n: int | None = None) -> bytes:
    """A SET_MEM_TABLE payload: (gpa, size, uva, offset) regions, ``n`` overrides nregions."""
    return p.MEM_TABLE_HEADER.pack(len(regions) if n is None else n, 0) + b"".join(
        p.MEM_REGION.pack(*r) for r in regions)


NOT_MEMORY = {k: FD_KINDS[k] for k in (
    "pipe", "socket", "devnull", "directory", "readonly_memfd", "sealed_memfd", "short_memfd",
    "eventfd")}
NOT_EVENTFD = {k: FD_KINDS[k] for k in ("pipe", "socket", "devnull", "memfd")}


def send_fd(fe: Frontend, req: int, payload: bytes, make: Callable[[], tuple[int, list[int]]]
            ) -> p.Message:
    fd, keep = make()
    try:
        return fe.request(req, payload, [fd], check=False)
    finally:
        for f in (fd, *keep):
            os.close(f)


# -- transport: headers and sizes -------------------------------------------------------------

RAW = {
    "truncated_header": p.HEADER.pack(R.GET_FEATURES, 1, 0)[:7],
    "truncated_payload": p.HEADER.pack(R.SET_FEATURES, 1, 8) + bytes(4),
    "bad_version": p.HEADER.pack(R.GET_FEATURES, 2, 0),
    "reply_flag_version_0": p.HEADER.pack(R.GET_FEATURES, p.FLAG_REPLY, 0),
    "oversized": p.HEADER.pack(R.SET_MEM_TABLE, 1, 1 << 20) + bytes(64),
}


@pytest.mark.parametrize("data", RAW.values(), ids=RAW.keys())
def test_bad_bytes_close_the_connection(session: Session, data: bytes) -> None:
    session.fe.sock.sendall(data)
    session.fe.sock.shutdown(socket.SHUT_WR)  # a message cut short ends at EOF
    session.assert_refused(closed=True)


def test_more_fds_than_any_message_carries(session: Session) -> None:
    fds = [memfd(4096) for _ in range(p.MAX_FDS + 1)]
    try:
        regions = [(i * MiB, 4096, i * MiB, 0) for i in range(p.MAX_FDS)]
        session.fe.send(R.SET_MEM_TABLE, table(*regions), fds)
    finally:
        for fd in fds:
            os.close(fd)
    session.assert_refused(closed=True)


WRONG_SIZE = {
    "set_features_short": (R.SET_FEATURES, bytes(4)),
    "set_features_long": (R.SET_FEATURES, bytes(12)),
    "vring_num_short": (R.SET_VRING_NUM, bytes(4)),
    "vring_addr_long": (R.SET_VRING_ADDR, bytes(44)),
    "vring_kick_empty": (R.SET_VRING_KICK, b""),
    "mem_table_header_only": (R.SET_MEM_TABLE, table(n=1)),
    "add_mem_reg_short": (R.ADD_MEM_REG, bytes(32)),
    "unknown_request_99": (99, bytes(8)),
    "set_log_base_unsupported": (R.SET_LOG_BASE, bytes(8)),
    "features_not_offered": (R.SET_FEATURES, p.U64.pack(1 << 63)),
    "protocol_features_not_offered": (R.SET_PROTOCOL_FEATURES, p.U64.pack(1 << 40)),
    "vring_size_3": (R.SET_VRING_NUM, p.VRING_STATE.pack(1, 3)),
    "vring_size_0": (R.SET_VRING_NUM, p.VRING_STATE.pack(1, 0)),
    "vring_size_65536": (R.SET_VRING_NUM, p.VRING_STATE.pack(1, 65536)),
    "vring_index_200": (R.SET_VRING_NUM, p.VRING_STATE.pack(200, 256)),
    "vring_enable_2": (R.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 2)),
    "kick_unknown_bits": (R.SET_VRING_KICK, p.U64.pack(0x1000 | p.VRING_NOFD_MASK)),
    "rem_unknown_region": (R.REM_MEM_REG, bytes(8) + p.MEM_REGION.pack(0, 4096, 0, 0)),
}


@pytest.mark.parametrize("req,payload", WRONG_SIZE.values(), ids=WRONG_SIZE.keys())
def test_bad_request_is_refused_with_a_status(session: Session, req: int, payload: bytes) -> None:
    session.fe.negotiate()  # REPLY_ACK: a refused request gets a non-zero status
    assert status(session.fe.request(req, payload, check=False)) != 0
    session.assert_refused(closed=False)


MUST_REPLY = {
    "get_vring_base_short": (R.GET_VRING_BASE, bytes(4)),
    "get_vring_base_index_200": (R.GET_VRING_BASE, p.VRING_STATE.pack(200, 0)),
    "get_status_unsupported": (R.GET_STATUS, b""),
    "get_config_unsupported": (R.GET_CONFIG, bytes(12)),
    "get_features_with_fd": (R.GET_FEATURES, b""),
}


@pytest.mark.parametrize("req,payload", MUST_REPLY.values(), ids=MUST_REPLY.keys())
def test_a_get_that_cannot_be_answered_closes(session: Session, req: int, payload: bytes) -> None:
    """The front end waits for the value: the only clean answer is to close."""
    fd = os.eventfd(0)
    try:
        session.fe.send(req, payload, [fd] if req == R.GET_FEATURES else None)
    finally:
        os.close(fd)
    session.assert_refused(closed=True)


def test_enable_before_any_negotiation_is_taken(session: Session) -> None:
    """DPDK virtio-user sends SET_VRING_ENABLE first when it reconnects to a restarted
    back end, and drops the connection if it is refused: it is taken, as DPDK's vhost
    library takes it (refused only once SET_FEATURES left out bit 30)."""
    session.fe.send(R.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 1))  # no REPLY_ACK yet: no status
    assert session.fe.request(R.GET_QUEUE_NUM).payload == p.U64.pack(8)  # handled in order
    assert session.live.port.device.rings[0].enabled  # type: ignore[attr-defined]
    assert session.live.stat("protocol_errors") == session.errors


def test_resize_of_a_started_ring(session: Session, ram: GuestRAM) -> None:
    fe = session.fe
    fe.negotiate()
    fe.set_mem_table(ram)
    fe.setup_ring(1, DriverQueue(ram, 64), kick=False)  # polled: starts at once
    assert wait_until(lambda: session.live.port.device.rings[1].started)  # type: ignore[attr-defined]
    assert status(fe.request(R.SET_VRING_NUM, p.VRING_STATE.pack(1, 128), check=False)) != 0
    session.assert_refused(closed=False)


# -- memory tables ----------------------------------------------------------------------------

def test_more_regions_than_set_mem_table_allows(session: Session) -> None:
    session.fe.negotiate()
    regions = [(i * MiB, 4096, i * MiB, 0) for i in range(9)]
    session.refuse(R.SET_MEM_TABLE, table(*regions), [memfd(4096) for _ in range(p.MAX_FDS)])


def test_add_mem_reg_beyond_the_slots_offered(session: Session) -> None:
    """GET_MAX_MEM_SLOTS says 64: the 65th region is refused, the 64 stay mapped."""
    fe = session.fe
    fe.negotiate()
    slots = status(fe.request(R.GET_MAX_MEM_SLOTS, check=False))  # the reply is the value
    assert slots == 64
    for i in range(slots + 1):
        fd = memfd(4096)
        try:
            reply = fe.request(R.ADD_MEM_REG, bytes(8) + p.MEM_REGION.pack(i * MiB, 4096, i * MiB, 0),
                               [fd], check=False)
        finally:
            os.close(fd)
        assert status(reply) == (0 if i < slots else 1), i
    session.assert_refused(closed=False)
    assert len(session.live.port.device.memory.regions) == slots  # type: ignore[attr-defined]


BAD_TABLES = {
    "zero_regions": (table(n=0), 0),
    "zero_size": (table((0, 0, 0, 0)), 1),
    "overlapping": (table((0, 2 * MiB, 0, 0), (MiB, 2 * MiB, 1 << 40, 0)), 2),
    "same_gpa": (table((0, MiB, 0, 0), (0, MiB, 1 << 40, 0)), 2),
    "missing_fds": (table((0, MiB, 0, 0), (4 * MiB, MiB, 1 << 40, 0)), 1),
    "extra_fds": (table((0, MiB, 0, 0)), 2),
    "gpa_wraps": (table((2**64 - 4096, MiB, 0, 0)), 1),
    "offset_past_fd": (table((0, MiB, 0, 2**63)), 1),
}


@pytest.mark.parametrize("payload,nfds", BAD_TABLES.values(), ids=BAD_TABLES.keys())
def test_bad_memory_table(session: Session, payload: bytes, nfds: int) -> None:
    session.fe.negotiate()
    session.refuse(R.SET_MEM_TABLE, payload, [memfd(2 * MiB) for _ in range(nfds)])
    assert session.live.port.device.memory is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", NOT_MEMORY)
def test_memory_fd_that_is_not_shareable_memory(session: Session, kind: str) -> None:
    session.fe.negotiate()
    reply = send_fd(session.fe, R.SET_MEM_TABLE, table((0, MiB, 0, 0)), NOT_MEMORY[kind])
    assert status(reply) != 0
    session.assert_refused(closed=False)


@pytest.mark.parametrize("kind", NOT_MEMORY)
def test_add_mem_reg_fd_that_is_not_shareable_memory(session: Session, kind: str) -> None:
    session.fe.negotiate()
    reply = send_fd(session.fe, R.ADD_MEM_REG, bytes(8) + p.MEM_REGION.pack(0, MiB, 0, 0),
                    NOT_MEMORY[kind])
    assert status(reply) != 0
    session.assert_refused(closed=False)


# -- notification fds -------------------------------------------------------------------------

@pytest.mark.parametrize("req", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR],
                         ids=lambda r: r.name)
@pytest.mark.parametrize("kind", NOT_EVENTFD)
def test_notification_fd_that_is_not_an_eventfd(session: Session, req: int, kind: str) -> None:
    session.fe.negotiate()
    assert status(send_fd(session.fe, req, p.U64.pack(1), NOT_EVENTFD[kind])) != 0
    session.assert_refused(closed=False)


@pytest.mark.parametrize("nfds,flag", [(0, 0), (2, 0), (1, p.VRING_NOFD_MASK)],
                         ids=["missing", "two", "fd_with_nofd_flag"])
def test_notification_fd_count(session: Session, nfds: int, flag: int) -> None:
    session.fe.negotiate()
    session.refuse(R.SET_VRING_KICK, p.U64.pack(1 | flag), [os.eventfd(0) for _ in range(nfds)])


def test_fd_on_a_request_that_takes_none(session: Session) -> None:
    session.fe.negotiate()
    session.refuse(R.SET_OWNER, b"", [memfd()])


def test_the_count_is_in_port_stats_and_metrics(session: Session) -> None:
    """What an operator sees: ``port-stats`` (pyswitch.stats) and ``/metrics``."""
    session.fe.sock.sendall(p.HEADER.pack(R.GET_FEATURES, 2, 0))  # bad version
    session.assert_refused(closed=True)
    live = session.live
    n = live.stat("protocol_errors")
    assert port_stats(live.sw, [live.name])[live.name]["vhost"]["counters"]["protocol_errors"] == n
    srv = start_metrics_server(live.sw, port=0)
    try:
        samples = scrape(srv.url)
    finally:
        srv.close()
    assert get(samples, "pyswitch_vhost_protocol_errors_total", bridge="br0", port=live.name,
               type="dpdkvhostuser") == n
