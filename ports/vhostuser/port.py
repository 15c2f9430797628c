"""vhost-user port types: ``dpdkvhostuser`` (we listen) and ``dpdkvhostuserclient`` (we connect).

A vhost-user port is the virtio-net device of one guest (QEMU) or one DPDK
virtio-user front end.  It composes the three layers -- :mod:`.protocol` (messages
on the unix socket), :mod:`.device` (the state machine, guest memory) and
:mod:`.virtqueue` (split rings) -- in :class:`.base.VhostUserPort`, shared by both
roles; this module adds the socket role:

* ``dpdkvhostuser``: listens on ``<vhost-sock-dir>/<port name>`` and serves one
  front end at a time; on disconnect it tears down rings and memory and waits for
  the next connection.
* ``dpdkvhostuserclient``: connects to ``vhost-server-path`` and retries forever with
  backoff (0.1 s doubling to 2 s) while the server is absent or after it goes away.

Directions (the switch's view, see :mod:`pyswitch.port`): :meth:`receive` pops the
guest's transmitqs (vring 2i+1) and returns the frames as views over guest memory,
valid until :meth:`release`, which returns the buffers (one used-index update and at
most one call per ring).  :meth:`transmit` copies into the guest's receiveqs (vring
2i) that are started and enabled, spreading frames over them by a hash of the MAC
addresses; frames that find no guest buffer are counted as ``no_buffer`` drops.

Counters live on the port and survive reconnects: ``counters`` (PortCounters) and
``vhost_stats`` (connections, reconnects, notifications sent/suppressed, kicks ...).
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import socket
import stat
from typing import Mapping

from pyswitch.port import PortError, PortIO, Timer

from .base import COMMON_OPTIONS, VhostUserPort

log = logging.getLogger(__name__)

DEFAULT_SOCK_DIR = "/run/pyswitch"


def sock_dir(options: Mapping[str, str]) -> str:
    """The socket directory: option ``vhost-sock-dir``, else the switch's run directory
    (``$PYSWITCH_RUNDIR``, as OVS's vhost-sock-dir is relative to its run directory), else
    /run/pyswitch."""
    return options.get("vhost-sock-dir") or os.environ.get("PYSWITCH_RUNDIR") or DEFAULT_SOCK_DIR
#: Client reconnect backoff: first delay, factor, ceiling (seconds).
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0


# -- server role ----------------------------------------------------------------------------


class VhostUserServerPort(VhostUserPort):
    """``dpdkvhostuser``: pyswitch listens on ``<vhost-sock-dir>/<name>``; QEMU connects."""

    type_name = "dpdkvhostuser"
    role = "server"
    OPTIONS = {
        "vhost-sock-dir": f"directory of the socket (default $PYSWITCH_RUNDIR, else {DEFAULT_SOCK_DIR})",
        "vhost-sock-owner": "user name or uid owning the socket",
        "vhost-sock-group": "group name or gid of the socket",
        "vhost-sock-mode": "octal permissions of the socket, e.g. 0660",
        **COMMON_OPTIONS,
    }

    def __init__(self, name: str, options: Mapping[str, str] | None = None) -> None:
        super().__init__(name, options)
        self.listener: socket.socket | None = None

    @classmethod
    def validate_options(cls, name: str, options: Mapping[str, str]) -> None:
        super().validate_options(name, options)
        if not name or "/" in name or "\\" in name or ".." in name:
            raise PortError(f"port name {name!r}: a vhost-user socket name may not contain / \\ or ..")
        path = os.path.join(sock_dir(options), name)
        if len(os.fsencode(path)) >= 108:
            raise PortError(f"socket path {path} is too long for a unix socket (max 107 bytes)")
        _owner_ids(options)
        if "vhost-sock-mode" in options:
            _parse_mode(options["vhost-sock-mode"])

    def socket_path(self) -> str:
        return os.path.join(sock_dir(self.options), self.name)

    def open(self) -> None:
        """Create the socket directory and listen; refuse a socket someone serves."""
        self.validate_options(self.name, self.options)
        path = self.socket_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            uid, gid = _owner_ids(self.options)
            if uid != -1 or gid != -1:
                os.chown(path, uid, gid)
            if "vhost-sock-mode" in self.options:
                os.chmod(path, _parse_mode(self.options["vhost-sock-mode"]))
            sock.listen(4)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise PortError(f"{self.name}: cannot listen on {path}: {exc}") from exc
        self.listener = sock

    def attach(self, io: PortIO) -> None:
        if self.listener is None:
            self.open()
        assert self.listener is not None
        self.io = io
        io.watch(self.listener.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.conn is not None:
            log.warning("%s: refusing a second front end (one is connected)", self.name)
            sock.close()
            return
        self._connected(sock)

    def close(self) -> None:
        super().close()
        if self.listener is not None:
            if self.io is not None:
                self.io.unwatch(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.socket_path())
            except FileNotFoundError:
                pass


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PortError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a live server with a full backlog: EAGAIN, not a wait
    try:
        probe.connect(path)
    except BlockingIOError:
        pass  # somebody listens (and does not accept): in use
    except OSError:
        os.unlink(path)  # nobody listens: left over from a previous run
        return
    finally:
        probe.close()
    raise PortError(f"{path} is in use by another process")


def _owner_ids(options: Mapping[str, str]) -> tuple[int, int]:
    uid = gid = -1
    owner, group = options.get("vhost-sock-owner"), options.get("vhost-sock-group")
    try:
        if owner:
            uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise PortError(f"unknown socket owner or group: {exc}") from exc
    return uid, gid


def _parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise PortError(f"vhost-sock-mode {text!r}: expected octal permissions like 0660")
    return mode


# -- client role ----------------------------------------------------------------------------


class VhostUserClientPort(VhostUserPort):
    """``dpdkvhostuserclient``: pyswitch connects to ``vhost-server-path`` and reconnects."""

    type_name = "dpdkvhostuserclient"
    role = "client"
    OPTIONS = {
        "vhost-server-path": "unix socket the front end (QEMU server=on, testpmd server=1) listens on",
        **COMMON_OPTIONS,
    }

    def __init__(self, name: str, options: Mapping[str, str] | None = None) -> None:
        super().__init__(name, options)
        self._backoff = BACKOFF_FIRST
        self._retry: Timer | None = None

    @classmethod
    def validate_options(cls, name: str, options: Mapping[str, str]) -> None:
        super().validate_options(name, options)
        path = options.get("vhost-server-path")
        if not path:
            raise PortError(f"port {name}: option vhost-server-path is required")
        if len(os.fsencode(path)) >= 108:
            raise PortError(f"vhost-server-path {path} is too long for a unix socket")

    def socket_path(self) -> str:
        return self.options.get("vhost-server-path", "")

    def open(self) -> None:
        self.validate_options(self.name, self.options)

    def attach(self, io: PortIO) -> None:
        self.io = io
        self._try_connect()

    def _try_connect(self) -> None:
        self._retry = None
        if self._closed or self.conn is not None or self.io is None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Non-blocking: a unix connect() to a server whose backlog is full (one that
        # does not accept) would otherwise wait in the loop; it fails with EAGAIN instead.
        sock.setblocking(False)
        try:
            sock.connect(self.socket_path())
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                log.warning("%s: connect %s: %s", self.name, self.socket_path(), exc)
            self._retry = self.io.call_later(self._backoff, self._try_connect)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            return
        self._backoff = BACKOFF_FIRST
        self._connected(sock)

    def _after_disconnect(self) -> None:
        if not self._closed and self.io is not None and self._retry is None:
            self._retry = self.io.call_later(BACKOFF_FIRST, self._try_connect)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        super().close()
