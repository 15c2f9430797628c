"""The transmit loop shared by the port types that send one frame per system call.

``tap`` (one ``write()`` per frame) and the AF_PACKET ring of ``veth`` (one
``send()``) drop the same frames the same way before and after the call; only the
call and the meaning of its errors differ, and those are parameters here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pyswitch.port import Frame, PortCounters

#: EtherTypes of a VLAN tag (802.1Q, 802.1ad): such a frame may be 4 bytes longer.
VLAN_TPIDS = (b"\x81\x00", b"\x88\xa8")
ETH_HLEN = 14


def send_each(
    frames: Sequence[Frame],
    send: Callable[[Frame], object],
    limit: int,
    counters: PortCounters,
    reason_of: Callable[[OSError], str],
) -> int:
    """Send each frame with ``send``; count and return how many were sent.

    A frame longer than ``limit`` (``limit + 4`` if VLAN-tagged) is dropped as ``mtu``,
    one shorter than an Ethernet header as ``malformed``.  A failed send is mapped by
    ``reason_of``: ``mtu``/``malformed`` drop that frame only; any other reason
    (``no_buffer``, ``link_down``) drops it and the rest of the batch.
    """
    sent = nbytes = 0
    for i, frame in enumerate(frames):
        n = len(frame)
        if n > limit and (n > limit + 4 or bytes(frame[12:14]) not in VLAN_TPIDS):
            counters.drop("mtu", rx=False)
            continue
        if n < ETH_HLEN:
            counters.drop("malformed", rx=False)
            continue
        try:
            send(frame)
        except OSError as exc:
            reason = reason_of(exc)
            if reason == "mtu" or reason == "malformed":
                counters.drop(reason, rx=False)
                continue
            counters.drop(reason, len(frames) - i, rx=False)
            break
        sent += 1
        nbytes += n
    counters.tx_packets += sent
    counters.tx_bytes += nbytes
    return sent
