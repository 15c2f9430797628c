"""The AF_PACKET receive ring of veth ports: resynchronising when the kernel moved on
past a slot it never filled (seen after floods: the port stopped receiving)."""

from __future__ import annotations

import secrets
import socket
import subprocess
import time

from pyswitch.ports.afpacket import PacketRing

from pyswitch.port import PortCounters

FRAME = bytes.fromhex("ffffffffffff020000000001") + b"\x88\xb5" + bytes(50)


def test_ring_resyncs_past_a_slot_the_kernel_skipped():
    a, b = "pstrg" + secrets.token_hex(3), "pstrh" + secrets.token_hex(3)
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    try:
        for n in (a, b):
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{n}.disable_ipv6=1"], check=False)
            subprocess.run(["ip", "link", "set", n, "up"], check=True)
        ring = PacketRing(a, 1500, PortCounters())
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        tx.bind((b, 0))
        time.sleep(0.3)
        for i in range(5):
            tx.send(FRAME[:-1] + bytes([i]))
        time.sleep(0.3)
        # The kernel skipped the reader's slot: it stays empty while later slots hold frames.
        off = ring._head * ring._slot
        ring._mv[off:off + 4] = bytes(4)  # TP_STATUS_KERNEL: never filled
        assert ring.receive(32) == []  # a first look may be a slot still being filled
        got = [bytes(f)[-1] for f in ring.receive(32) if bytes(f)[12:14] == b"\x88\xb5"]
        ring.release()
        assert got == [1, 2, 3, 4], got  # the second look skips ahead
        assert ring.resyncs == 1
        tx.send(FRAME[:-1] + b"\x09")  # and the ring goes on as usual
        time.sleep(0.2)
        assert [bytes(f)[-1] for f in ring.receive(32) if bytes(f)[12:14] == b"\x88\xb5"] == [9]
        ring.release()
        ring.close()
        tx.close()
    finally:
        subprocess.run(["ip", "link", "del", a], capture_output=True, check=False)
