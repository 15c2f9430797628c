"""The event loop: one thread, epoll, timers, and batched servicing of ready ports.

Everything the switch does happens in callbacks from this loop: control-plane fds
(vhost-user sockets, the control socket) call their handlers (on readable, or on
writable for output that could not be sent at once: :meth:`EventLoop.watch_writable`); data fds mark their port
*ready*, and the loop then services ready ports in rounds, each port receiving at most
one batch (``MAX_BURST`` frames) per round so that a busy port cannot starve others.
The owner's ``service`` says whether a port stays ready for the next round (the switch
keeps a port ready while traffic flows: see ``pyswitch.switch``); one that is not is
serviced again when its fd fires (epoll is level-triggered, so no readiness is lost).

The loop is the only place that reads the clock (``time.monotonic``); it passes ``now``
down.  Signals (SIGINT/SIGTERM) are turned into a clean stop through a wakeup fd.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import signal
import socket
import time
from typing import Callable

log = logging.getLogger(__name__)

_NOT_OUT = ~select.EPOLLOUT
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class TimerHandle:
    """A scheduled callback; :meth:`cancel` makes it never run."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """epoll + timers + a set of ready items serviced in rounds.

    ``service(item)`` is the function the owner (the switch) provides to work one
    ready item (a port); it returns True when the item should stay ready (polled in the
    next round) and False when it may sleep until its fd fires.
    """

    def __init__(self, service: Callable[[object], bool] | None = None) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}  # fd -> called while writable
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._ready: dict[object, None] = {}  # insertion-ordered set
        self._service = service
        self._running = False
        self._stop_requested = False  # a stop() that came before run(): honoured by run()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.watch(self._wake_r.fileno(), self._drain_wakeup)
        self.iterations = 0  # loop iterations, for metrics
        self.busy_seconds = 0.0  # time spent servicing (not waiting)
        self._signals_installed = False

    # -- PortIO-shaped API -------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic()

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` while ``fd`` is readable.  Re-watching replaces it."""
        if fd in self._callbacks:
            self._callbacks[fd] = callback
            return
        if fd in self._writers:
            self._epoll.modify(fd, select.EPOLLIN | select.EPOLLOUT)
        else:
            self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (readable and writable); harmless if not watched.  Call
        before closing the fd."""
        known = fd in self._callbacks or fd in self._writers
        self._callbacks.pop(fd, None)
        self._writers.pop(fd, None)
        if known:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def watch_writable(self, fd: int, callback: Callable[[], None]) -> None:
        """Also call ``callback()`` while ``fd`` is writable (or has an error), until
        :meth:`unwatch_writable`.  For a sender whose output did not fit at once (the
        control socket's replies to a slow reader): it must never block the loop."""
        if fd in self._writers:
            self._writers[fd] = callback
            return
        if fd in self._callbacks:
            self._epoll.modify(fd, select.EPOLLIN | select.EPOLLOUT)
        else:
            self._epoll.register(fd, select.EPOLLOUT)
        self._writers[fd] = callback

    def unwatch_writable(self, fd: int) -> None:
        """Stop the writable calls of :meth:`watch_writable`; the read watch stays."""
        if self._writers.pop(fd, None) is None:
            return
        if fd in self._callbacks:
            self._epoll.modify(fd, select.EPOLLIN)
        else:
            self._epoll.unregister(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        return handle

    def call_every(self, interval: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` every ``interval`` seconds until the returned handle is cancelled."""
        outer = TimerHandle(0.0, callback)

        def tick() -> None:
            if outer.cancelled:
                return
            try:
                callback()
            finally:  # a failing callback is logged by the caller and runs again
                self.call_later(interval, tick)

        self.call_later(interval, tick)
        return outer

    def set_ready(self, item: object) -> None:
        """Mark ``item`` as having work; it is serviced in the next round."""
        self._ready[item] = None

    def discard_ready(self, item: object) -> None:
        self._ready.pop(item, None)

    # -- running -----------------------------------------------------------------------
    def stop(self) -> None:
        """Make :meth:`run` return after the current iteration, or at once if it is not
        running yet (safe from signal handlers)."""
        self._running = False
        self._stop_requested = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM stop the loop cleanly."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: self.stop())
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._signals_installed = True

    def run(self) -> None:
        self._running = not self._stop_requested
        try:
            while self._running:
                self.run_once()
        finally:
            self._stop_requested = False

    def run_once(self, max_wait: float | None = None) -> None:
        """One iteration: service ready items, run due timers, wait for events."""
        self.iterations += 1
        t0 = time.monotonic()
        self._service_ready()
        self._run_timers(time.monotonic())
        if self._ready:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        else:
            timeout = -1.0
        if max_wait is not None:
            timeout = max_wait if timeout < 0 else min(timeout, max_wait)
        t1 = time.monotonic()
        self.busy_seconds += t1 - t0
        events = self._epoll.poll(timeout)
        t2 = time.monotonic()
        for fd, ev in events:
            if ev & _NOT_OUT:  # readable, hang-up or error: the read handler sees it
                cb = self._callbacks.get(fd)
                if cb is not None:
                    try:
                        cb()
                    except Exception:
                        log.exception("handler for fd %d failed", fd)
            if ev & _WRITE_EVENTS:
                wcb = self._writers.get(fd)  # looked up after the read handler ran
                if wcb is not None:
                    try:
                        wcb()
                    except Exception:
                        log.exception("write handler for fd %d failed", fd)
        self.busy_seconds += time.monotonic() - t2

    def _service_ready(self) -> None:
        if not self._ready or self._service is None:
            return
        items = list(self._ready)
        self._ready.clear()
        for item in items:
            try:
                again = self._service(item)
            except Exception:
                log.exception("servicing %r failed", item)
                again = False
            if again:
                self._ready[item] = None

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, handle = heapq.heappop(timers)
            if handle.cancelled:
                continue
            try:
                handle.callback()
            except Exception:
                log.exception("timer callback failed")

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._signals_installed:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
            self._signals_installed = False
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()
