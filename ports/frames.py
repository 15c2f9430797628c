"""The transmit loop shared by the port types that send one frame per system call.

``tap`` (one ``write()`` per frame) and the AF_PACKET ring of ``veth`` (one
``send()``) drop the same frames the same way before and after the call; only the
call and the meaning of its errors differ, and those are parameters here.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence

from pyswitch.port import Frame, PortCounters

#: EtherTypes of a VLAN tag (802.1Q, 802.1ad): such a frame may be 4 bytes longer.
VLAN_TPIDS = (b"\x81\x00", b"\x88\xa8")
ETH_HLEN = 14
#: Immediate retries of a frame whose send found the transmit queue full (``tx_full``),
#: as OVS retries a full vhost queue; never a wait: transmit must not block.
TX_RETRIES = 2


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
    ``reason_of``: ``mtu``/``malformed`` drop that frame only; ``tx_full`` (the
    kernel's transmit queue is full) is retried ``TX_RETRIES`` times at once, then it
    and the rest of the batch are dropped as ``tx_full``; any other reason
    (``link_down``) drops the frame and the rest of the batch.
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
            if reason == "tx_full" and _retry(send, frame):
                sent += 1
                nbytes += n
                continue
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


def _retry(send: Callable[[Frame], object], frame: Frame) -> bool:
    """Try ``frame`` again ``TX_RETRIES`` times while the queue stays full."""
    for _ in range(TX_RETRIES):
        try:
            send(frame)
            return True
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM):
                return False
    return False
