"""The port interface: the one contract between the switch and every port type.

In the spirit of DPDK's ethdev burst API and Open vSwitch's ``netdev-provider.h``,
a port has four things the switch uses on the data path and one for set-up:

* ``attach(io)``   -- set-up: register the file descriptors to wait on, timers.
* ``receive(n)``   -- a batch of at most ``n`` frames *into the switch*.
* ``release()``    -- the switch is done with the last received batch.
* ``transmit(fs)`` -- a batch of frames *out of the switch*; returns how many were taken.
* ``close()``      -- tear down what the port created.

Directions are always the switch's view: **receive = into the switch**, **transmit =
out of the switch**.  (For a vhost-user port, receive is what the guest sent on its
transmitq; transmit fills the guest's receiveq.)

Counters are plain integers owned by the port (``PortCounters``): the data path does
``+=``; the metrics collector and ``port-stats`` read snapshots.  A port's counters
belong to the port, not to a connection, so they survive reconnects.

Port types register under a name (``veth``, ``tap``, ``dpdkvhostuser`` ...) through the
``pyswitch.port_types`` entry-point group, or by calling :func:`register_port_type`.
The core only ever calls :func:`port_type` with a name: it never imports a port type.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

log = logging.getLogger(__name__)

#: Largest batch a port is asked to receive at once (OVS: NETDEV_MAX_BURST).
MAX_BURST = 32

#: A frame on the data path: a whole Ethernet frame without FCS.  A port may hand the
#: switch memoryviews over memory that only it can write until ``release()`` (an
#: AF_PACKET ring slot the kernel has handed over); they are valid until then.  Memory
#: another party can still write (a guest's buffers) must be copied once on receive:
#: the switch classifies a frame before it copies it out (no double fetch).
Frame = bytes | bytearray | memoryview

#: Drop reasons, the label values of ``pyswitch_port_dropped_total{reason=...}``.
#: A port or the bridge adds to ``PortCounters.drops[reason]``.
DROP_REASONS = (
    "vlan",  # received in a VLAN the port does not carry (flooding skips such ports)
    "no_buffer",  # no room in the peer's ring / socket buffer (guest receiveq empty)
    "mtu",  # frame longer than the port's MTU
    "flow",  # a flow rule dropped it
    "bad_descriptor",  # a guest descriptor chain failed validation
    "tx_full",  # transmit ring still full after retries
    "malformed",  # too short to be Ethernet, or an unparsable header
    "link_down",  # transmitted to a port that is not connected
)


class PortError(Exception):
    """A port cannot be created or configured; the message says why, for the operator."""


@dataclass(slots=True)
class PortCounters:
    """Per-port counters, plain ints updated once per batch by the data path.

    ``rx_*`` counts frames the port received into the switch, ``tx_*`` frames the
    switch transmitted out of the port.  ``rx_dropped``/``tx_dropped`` are the sums of
    ``drops`` by direction and are maintained by :meth:`drop`.
    """

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1, *, rx: bool) -> None:
        """Count ``n`` frames dropped for ``reason`` on the receive or transmit side."""
        self.drops[reason] = self.drops.get(reason, 0) + n
        if rx:
            self.rx_dropped += n
        else:
            self.tx_dropped += n

    def as_dict(self) -> dict[str, Any]:
        """A snapshot with OVS's statistics keys plus ``drops`` by reason."""
        return {
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "rx_dropped": self.rx_dropped,
            "rx_errors": self.rx_errors,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "tx_dropped": self.tx_dropped,
            "tx_errors": self.tx_errors,
            "drops": dict(self.drops),
        }


class Timer(Protocol):
    def cancel(self) -> None: ...


class PortIO(Protocol):
    """What the event loop offers a port.  Callbacks run on the loop's thread.

    ``watch(fd, cb)`` calls ``cb()`` whenever ``fd`` is readable (level-triggered);
    ``unwatch(fd)`` stops it (safe to call for an fd not watched; call it *before*
    closing the fd).  ``rx_ready()`` tells the switch this port has frames to
    receive now (e.g. from a watch callback or a timer).  ``call_later`` runs a
    callback once after ``delay`` seconds.  ``now()`` is the loop's monotonic clock.
    """

    def watch(self, fd: int, callback: Callable[[], None]) -> None: ...

    def unwatch(self, fd: int) -> None: ...

    def rx_ready(self) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...

    def now(self) -> float: ...


class Port(abc.ABC):
    """Base of every port type.  See the module docstring for the contract.

    Subclasses set ``type_name`` and implement the abstract methods.  The constructor
    takes the port name and its validated ``options`` (strings from the configuration;
    ``OPTIONS`` lists the keys the type accepts so the configuration layer can reject
    unknown ones) and must not yet create anything in the system: creation happens in
    :meth:`open`, so that a whole topology can be validated first.
    """

    type_name: ClassVar[str] = ""
    #: option key -> one-line help; keys not listed here are refused by validation.
    OPTIONS: ClassVar[Mapping[str, str]] = {}

    def __init__(self, name: str, options: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.options: dict[str, str] = dict(options or {})
        self.counters = PortCounters()

    @classmethod
    def validate_options(cls, name: str, options: Mapping[str, str]) -> None:
        """Raise ``PortError`` naming the option if ``options`` are unacceptable.

        Called before anything is created.  The default refuses unknown keys.
        """
        for key in options:
            if key not in cls.OPTIONS:
                known = ", ".join(sorted(cls.OPTIONS)) or "none"
                raise PortError(f"unknown option {key!r} for type {cls.type_name} (known: {known})")

    def open(self) -> None:  # noqa: B027 - optional hook
        """Create the system objects (links, sockets).  Raise ``PortError`` on failure."""

    @abc.abstractmethod
    def attach(self, io: PortIO) -> None:
        """Register with the event loop: ``io.watch(fd, io.rx_ready)`` for data fds,
        other fds (control sockets) with their own callbacks.  Called once after open."""

    @abc.abstractmethod
    def receive(self, max_frames: int = MAX_BURST) -> Sequence[Frame]:
        """Return up to ``max_frames`` frames received into the switch; never blocks.

        Returns an empty sequence when nothing is ready (EAGAIN is not an error).
        The port counts ``rx_packets``/``rx_bytes`` for what it returns and counts its
        own drops and errors.  Returned frames may be views over port-owned memory and
        stay valid until :meth:`release`; the switch calls ``release()`` after every
        non-empty receive, once it has transmitted (copied) the batch.
        """

    def release(self) -> None:  # noqa: B027 - optional hook
        """The switch is done with the last batch from :meth:`receive`."""

    def poll_mode(self, polling: bool) -> bool:
        """The switch starts (True) or stops (False) polling this port while traffic flows.

        A port whose peer notifies it (a vhost-user guest's kicks) may ask the peer not to
        while it is polled, and to notify again when polling stops.  Returns True when
        frames arrived while notifications were off (the switch then keeps polling: the
        check closes the race between the last poll and the peer's next notification).
        """
        return False

    @abc.abstractmethod
    def transmit(self, frames: Sequence[Frame]) -> int:
        """Send ``frames`` out of the switch through this port; never blocks.

        Returns how many frames were sent.  The port counts ``tx_packets``/``tx_bytes``
        for those and ``drops[reason]`` for each one it did not send (e.g.
        ``no_buffer``, ``mtu``, ``link_down``): the caller does not retry.
        The port must copy what it keeps: the frames are only valid during the call.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Unregister from the loop and remove what :meth:`open` created.  Idempotent."""

    # -- views for the operator -------------------------------------------------------
    def link_state(self) -> str:
        """``up`` or ``down`` (for vhost-user: connected with rings enabled or not)."""
        return "up"

    def status(self) -> dict[str, Any]:
        """Type-specific facts for ``show`` (socket path, namespace, features ...)."""
        return {}


# -- registry ---------------------------------------------------------------------------

_registry: dict[str, type[Port]] = {}
_loaded_entry_points = False


def register_port_type(cls: type[Port], name: str | None = None) -> type[Port]:
    """Register ``cls`` under ``name`` (default ``cls.type_name``).  Usable as decorator."""
    key = name or cls.type_name
    if not key:
        raise ValueError(f"{cls.__name__} has no type_name")
    _registry[key] = cls
    return cls


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for ep in entry_points(group="pyswitch.port_types"):
        if ep.name in _registry:
            continue
        try:
            _registry[ep.name] = ep.load()
        except Exception as exc:  # a broken third-party type must not break the rest
            log.warning("port type %s (%s) failed to load: %s", ep.name, ep.value, exc)


def port_type(name: str) -> type[Port]:
    """Return the port class registered as ``name``; ``PortError`` if none is."""
    cls = _registry.get(name)
    if cls is None:
        _load_entry_points()
        cls = _registry.get(name)
    if cls is None:
        raise PortError(f"unknown port type {name!r} (known: {', '.join(port_types())})")
    return cls


def port_types() -> list[str]:
    """Names of every registered port type."""
    _load_entry_points()
    return sorted(_registry)
