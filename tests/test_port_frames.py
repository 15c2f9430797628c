"""The transmit loop shared by tap and veth (ports/frames.py), with a scripted send()."""

import errno

from pyswitch.ports.afpacket import _tx_error_reason
from pyswitch.ports.frames import TX_RETRIES, send_each
from pyswitch.ports.tap import _tx_error_reason as tap_reason

from pyswitch.port import PortCounters

FRAME = bytes(60)


def scripted(errors):
    """A send() that raises the next error of ``errors`` (None: success)."""
    it = iter(errors)
    sent = []

    def send(frame):
        e = next(it, None)
        if e is not None:
            raise OSError(e, "scripted")
        sent.append(frame)

    return send, sent


def test_full_queue_is_retried_then_dropped_as_tx_full():
    for reason_of in (_tx_error_reason, tap_reason):
        c = PortCounters()
        send, sent = scripted([errno.EAGAIN] * TX_RETRIES)  # full, then room again
        assert send_each([FRAME, FRAME], send, 1500, c, reason_of) == 2 and len(sent) == 2
        c = PortCounters()
        send, sent = scripted([None] + [errno.ENOBUFS] * (TX_RETRIES + 1))  # stays full
        assert send_each([FRAME] * 4, send, 1500, c, reason_of) == 1
        assert c.drops == {"tx_full": 3} and c.tx_dropped == 3 and c.tx_packets == 1


def test_down_link_drops_the_rest_without_retry():
    c = PortCounters()
    send, sent = scripted([errno.ENETDOWN])
    assert send_each([FRAME] * 3, send, 1500, c, _tx_error_reason) == 0
    assert c.drops == {"link_down": 3} and sent == []
