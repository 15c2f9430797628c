"""The control socket: JSON requests over a unix stream socket, served in the event loop.

Wire format, one JSON object per line each way (in the spirit of ovs-appctl's JSON-RPC):

    request:  {"id": 1, "method": "add-port", "params": {...}}
    reply:    {"id": 1, "result": ...}
           or {"id": 1, "error": {"message": "...", "status": 1}}

``status`` is the exit status the CLI should use (1: failed, 2: bad input or "no such
thing" where OVS exits 2).  A request is handled completely before the next one, so
concurrent clients see each change whole.

Access: the socket file is created mode 0600 (root only), or 0660 with a group; the
peer's credentials (SO_PEERCRED) are checked as well: root, the daemon's own user, or a
member of the configured group.  Requests are bounded (1 MiB) and malformed ones get an
error reply, never a crash.

Replies never block the event loop (which also forwards frames): a reply is sent
without waiting; what the client's socket cannot take at once stays in the client's
output buffer and is sent when the socket becomes writable again.  A client that asks
for more while earlier replies have left over ``MAX_OUTPUT`` bytes unsent (it sends
requests and never reads) is disconnected, logged and counted
(``ControlServer.dropped_slow``); a single reply of any size is always sent whole.
Requests are served a few per client per loop iteration, so a client that pipelines
thousands of them shares the loop with the ports instead of holding it.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .loop import EventLoop, TimerHandle

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
MAX_OUTPUT = 4 << 20  # unsent reply bytes a client may have before it is disconnected
_RECV = 16384  # bytes read per readiness event
REQUESTS_PER_TURN = 8  # requests served per client per loop iteration: ports get their turn between
_UCRED = struct.Struct("3i")  # pid, uid, gid


class ControlError(Exception):
    """A request failed; ``status`` is the exit status for the CLI."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class DaemonNotRunning(ControlError):
    pass


Dispatch = Callable[[str, dict[str, Any]], Any]


def default_rundir() -> Path:
    return Path(os.environ.get("PYSWITCH_RUNDIR", "/run/pyswitch"))


def control_path(rundir: Path | None = None) -> Path:
    return (rundir or default_rundir()) / "pyswitch.ctl"


class _Conn:
    __slots__ = ("buf", "closing", "out", "sock", "turn")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()  # request bytes received and not yet served
        self.out = bytearray()  # reply bytes not yet taken by the client's socket
        self.closing = False  # drop once ``out`` is sent (after a fatal error reply)
        self.turn: TimerHandle | None = None  # more whole requests wait for the next turn


class ControlServer:
    """Accepts clients on ``path`` and answers their requests through ``dispatch``."""

    def __init__(self, path: Path, loop: EventLoop, dispatch: Dispatch,
                 group: str | None = None) -> None:
        self.path = path
        self.loop = loop
        self.dispatch = dispatch
        self.group = group
        self._gid: int | None = None
        self._sock: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}
        self.dropped_slow = 0  # clients disconnected for not reading their replies
        self.refused = 0  # clients refused for lack of permission

    def open(self) -> None:
        """Bind the socket; ControlError if another pyswitch already answers there."""
        if self.group is not None:
            try:
                self._gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ControlError(f"control socket group {self.group!r} does not exist", 2) from None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
                raise ControlError(f"another pyswitch is running (control socket {self.path}); "
                                   "stop it or set PYSWITCH_RUNDIR")
            except (ConnectionRefusedError, FileNotFoundError):
                self.path.unlink(missing_ok=True)  # stale, from a process that died
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        if self._gid is not None:
            os.chown(self.path, -1, self._gid)
            os.chmod(self.path, 0o660)
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock
        self.loop.watch(sock.fileno(), self._accept)
        log.info("control socket %s", self.path)

    def _allowed(self, conn: socket.socket) -> bool:
        pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid in (0, os.getuid()):
            return True
        if self._gid is None:
            return False
        if gid == self._gid:
            return True
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Groups:"):
                    return str(self._gid) in line.split()[1:]
        except OSError:
            pass
        return False

    def _accept(self) -> None:
        assert self._sock is not None
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        if not self._allowed(conn):
            self.refused += 1
            try:  # one short line into an empty socket buffer: it fits, or is lost
                conn.send(_encode({"id": None, "error": {"message": "permission denied", "status": 1}}))
            except OSError:
                pass
            conn.close()
            log.warning("control: refused a client without permission")
            return
        c = _Conn(conn)
        self._conns[conn.fileno()] = c
        self.loop.watch(conn.fileno(), lambda: self._read(c))

    def _read(self, c: _Conn) -> None:
        if c.closing:  # its last reply is still being sent; ignore what else it says
            self._discard_input(c)
            return
        if c.turn is not None:  # requests it sent are still waiting: read more later
            return
        try:
            data = c.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # closed, possibly in the middle of a line: that line is dropped
            self._drop(c)
            return
        c.buf += data
        self._serve(c)

    def _serve(self, c: _Conn) -> None:
        """Answer up to ``REQUESTS_PER_TURN`` whole requests; the rest in the next loop
        iteration, after the ports' turn (a client pipelining thousands of requests
        must not hold up forwarding)."""
        c.turn = None
        for _ in range(REQUESTS_PER_TURN):
            end = c.buf.find(b"\n")
            if end < 0:
                break
            if end > MAX_REQUEST:
                self._too_large(c)
                return
            line = bytes(c.buf[:end])
            del c.buf[:end + 1]
            self._queue(c, self._handle(line))
            if c.sock.fileno() < 0:  # dropped for not reading its replies
                return
        else:
            if b"\n" in c.buf:
                c.turn = self.loop.call_later(0, lambda: self._serve(c))
                return
        if len(c.buf) > MAX_REQUEST:
            self._too_large(c)

    def _too_large(self, c: _Conn) -> None:
        log.warning("control: a request longer than %d bytes; closing the connection", MAX_REQUEST)
        c.buf.clear()
        self._queue(c, {"id": None, "error": {"message": f"request too large (over {MAX_REQUEST} bytes)",
                                              "status": 2}})
        self._close_after_reply(c)

    def _discard_input(self, c: _Conn) -> None:
        try:
            if not c.sock.recv(_RECV):
                self._drop(c)
        except BlockingIOError:
            pass
        except OSError:
            self._drop(c)

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"id": None, "error": {"message": f"request is not JSON: {exc}", "status": 2}}
        except RecursionError:  # "[[[[...": the decoder recurses once per level
            return {"id": None, "error": {"message": "request is not JSON: nested too deeply", "status": 2}}
        if not isinstance(req, dict) or not isinstance(req.get("method"), str) \
                or not isinstance(req.get("params", {}), dict):
            return {"id": None, "error": {"message": "request needs a method and params object",
                                          "status": 2}}
        rid = req.get("id")
        try:
            return {"id": rid, "result": self.dispatch(req["method"], req.get("params", {}))}
        except ControlError as exc:
            return {"id": rid, "error": {"message": str(exc), "status": exc.status}}
        except Exception as exc:  # a bug must not take the daemon down
            log.exception("control request %s failed", req["method"])
            return {"id": rid, "error": {"message": f"internal error: {exc}", "status": 1}}

    def _queue(self, c: _Conn, reply: dict[str, Any]) -> None:
        """Send ``reply`` as far as the socket takes it now; keep the rest for later.

        The limit applies to what earlier replies left unsent: one reply of any size
        (an fdb-show of 100 000 MACs is ~8 MB) reaches a client that reads it."""
        if len(c.out) > MAX_OUTPUT:
            self.dropped_slow += 1
            log.warning("control: disconnecting a client that does not read its replies "
                        "(%d bytes unsent, limit %d)", len(c.out), MAX_OUTPUT)
            self._drop(c)
            return
        c.out += _encode(reply)
        self._flush(c)
        if c.sock.fileno() >= 0 and c.out:
            self.loop.watch_writable(c.sock.fileno(), lambda: self._flush(c))

    def _flush(self, c: _Conn) -> None:
        """Write what the socket takes without blocking; stop the writable watch when
        all is sent (and close a connection that was to be closed)."""
        if c.sock.fileno() < 0:
            return
        while c.out:
            try:
                sent = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the client went away: nobody to answer
                self._drop(c)
                return
            del c.out[:sent]
        self.loop.unwatch_writable(c.sock.fileno())
        if c.closing:
            self._drop(c)

    def _close_after_reply(self, c: _Conn) -> None:
        if c.sock.fileno() < 0:
            return
        c.closing = True
        if not c.out:
            self._drop(c)

    def _drop(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd < 0:
            return
        if c.turn is not None:
            c.turn.cancel()
            c.turn = None
        self.loop.unwatch(fd)
        self._conns.pop(fd, None)
        c.sock.close()

    def close(self) -> None:
        for c in list(self._conns.values()):
            self._drop(c)
        if self._sock is not None:
            self.loop.unwatch(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


def call(method: str, params: dict[str, Any] | None = None, path: Path | None = None,
         timeout: float = 120) -> Any:
    """Send one request to the daemon and return its result; ControlError on failure."""
    path = path or control_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"pyswitch is not running (no control socket at {path}); start it with "
                "'pyswitch daemon' (or 'systemctl start pyswitch')") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as root or as a member of "
                               "the control socket's group") from None
        try:
            sock.sendall(json.dumps({"id": 1, "method": method, "params": params or {}}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before reading: its reply (e.g. "permission denied") is still readable
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ControlError("the daemon closed the connection without a reply")
            buf += chunk
    finally:
        sock.close()
    reply = json.loads(buf.split(b"\n", 1)[0])
    if "error" in reply:
        err = reply["error"]
        raise ControlError(err.get("message", "failed"), int(err.get("status", 1)))
    return reply.get("result")
