"""The ``memory`` port type: frames in and out through Python calls, for tests.

Like Open vSwitch's netdev-dummy: no system object behind it.  Tests (and, through the
control socket, the CLI) ``inject`` frames as if they had been received on the wire and
read what the switch transmitted from ``sent``.  An eventfd wakes the event loop when
frames are injected, so the port goes through the same loop as real ones.

Options: ``capacity`` -- how many transmitted frames ``sent`` keeps (default 4096; older
ones are discarded and counted as ``no_buffer`` drops, like a full ring); ``mtu``.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Mapping, Sequence

from pyswitch.port import MAX_BURST, Frame, Port, PortError, PortIO, register_port_type


@register_port_type
class MemoryPort(Port):
    type_name = "memory"
    OPTIONS = {
        "capacity": "frames kept in the transmitted queue (default 4096)",
        "mtu": "largest payload after the Ethernet header (default 9000)",
    }

    def __init__(self, name: str, options: Mapping[str, str] | None = None) -> None:
        super().__init__(name, options)
        self.capacity = int(self.options.get("capacity", "4096"))
        self.mtu = int(self.options.get("mtu", "9000"))
        self.rxq: deque[bytes] = deque()
        self.sent: deque[bytes] = deque()
        self._efd = -1
        self._io: PortIO | None = None

    @classmethod
    def validate_options(cls, name: str, options: Mapping[str, str]) -> None:
        super().validate_options(name, options)
        for key in ("capacity", "mtu"):
            if key in options and not options[key].isdigit():
                raise PortError(f"option {key}={options[key]!r}: not a positive integer")

    def open(self) -> None:
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def attach(self, io: PortIO) -> None:
        self._io = io
        io.watch(self._efd, self._on_event)

    def _on_event(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        if self._io is not None:
            self._io.rx_ready()

    def inject(self, frames: Sequence[bytes]) -> None:
        """Queue ``frames`` as received from the wire and wake the loop."""
        self.rxq.extend(bytes(f) for f in frames)
        if self._efd >= 0:
            os.eventfd_write(self._efd, 1)

    def receive(self, max_frames: int = MAX_BURST) -> list[Frame]:
        out: list[Frame] = []
        rxq = self.rxq
        while rxq and len(out) < max_frames:
            out.append(rxq.popleft())
        if out:
            c = self.counters
            c.rx_packets += len(out)
            c.rx_bytes += sum(len(f) for f in out)
        return out

    def transmit(self, frames: Sequence[Frame]) -> int:
        c = self.counters
        limit = self.mtu + 18
        taken = 0
        for f in frames:
            if len(f) > limit:
                c.drop("mtu", rx=False)
                continue
            if len(self.sent) >= self.capacity:
                self.sent.popleft()
                c.drop("no_buffer", rx=False)
            self.sent.append(bytes(f))
            c.tx_packets += 1
            c.tx_bytes += len(f)
            taken += 1
        return taken

    def close(self) -> None:
        if self._efd >= 0:
            if self._io is not None:
                self._io.unwatch(self._efd)
            os.close(self._efd)
            self._efd = -1

    def status(self) -> dict[str, object]:
        return {"queued_rx": len(self.rxq), "queued_tx": len(self.sent)}
