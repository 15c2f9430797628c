"""The AF_PACKET TPACKET_V2 receive ring of veth ports: resynchronising when the kernel
moved on past a slot it never filled (seen after floods: the port stopped receiving).
Both V2 readers: the Python ``PacketRing`` and the compiled kernel's ``PacketRingV2``
(``pktio`` fixture); the slot is emptied through a second mapping of the ring."""

from __future__ import annotations

import mmap
import secrets
import socket
import subprocess
import time
from types import ModuleType

from pyswitch.ports.afpacket import open_ring

from pyswitch.port import PortCounters

FRAME = bytes.fromhex("ffffffffffff020000000001") + b"\x88\xb5" + bytes(50)


def test_ring_resyncs_past_a_slot_the_kernel_skipped(pktio: ModuleType | None) -> None:
    a, b = "pstrg" + secrets.token_hex(3), "pstrh" + secrets.token_hex(3)
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    try:
        for n in (a, b):
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{n}.disable_ipv6=1"], check=False)
            subprocess.run(["ip", "link", "set", n, "up"], check=True)
        ring = open_ring(a, 1500, PortCounters(), pktio, tpacket=2)
        info = ring.ring_info()
        view = mmap.mmap(ring.fileno(), info["ring_slots"] * info["slot_size"])
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        tx.bind((b, 0))
        time.sleep(0.3)
        for i in range(5):
            tx.send(FRAME[:-1] + bytes([i]))
        time.sleep(0.3)
        # The kernel skipped the reader's slot: it stays empty while later slots hold frames.
        off = getattr(ring, "head", getattr(ring, "_head", None)) * info["slot_size"]
        view[off:off + 4] = bytes(4)  # TP_STATUS_KERNEL: never filled
        assert ring.receive(32) == []  # a first look may be a slot still being filled
        got = [bytes(f)[-1] for f in ring.receive(32) if bytes(f)[12:14] == b"\x88\xb5"]
        ring.release()
        assert got == [1, 2, 3, 4], got  # the second look skips ahead
        assert ring.resyncs == 1
        tx.send(FRAME[:-1] + b"\x09")  # and the ring goes on as usual
        time.sleep(0.2)
        assert [bytes(f)[-1] for f in ring.receive(32) if bytes(f)[12:14] == b"\x88\xb5"] == [9]
        ring.release()
        view.close()
        ring.close()
        tx.close()
    finally:
        subprocess.run(["ip", "link", "del", a], capture_output=True, check=False)
