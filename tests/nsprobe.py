"""A tiny frame tool run *inside* a test namespace (``ip netns exec NS python -m tests.nsprobe``).

``send IFACE HEXFRAME [HEXFRAME ...]`` writes raw frames on IFACE.
``sniff IFACE SECONDS [--ethertype 0x88b5]`` prints ``ready``, then one line of hex per frame
received on IFACE (802.1Q tags that the kernel moved into metadata are put back, as
tcpdump does), until SECONDS have passed.  Outgoing frames are ignored.

Kept free of scapy so it starts fast; the tests build and parse frames with scapy.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10
ETH_P_ALL = 0x0003
_AUX = struct.Struct("=IIIHHHH")


def send(iface: str, frames: list[str]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((iface, 0))
        for h in frames:
            s.send(bytes.fromhex(h))


def sniff(iface: str, seconds: float, ethertype: int | None) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    s.bind((iface, 0))
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data, anc, _, addr = s.recvmsg(65536, socket.CMSG_SPACE(_AUX.size))
        except TimeoutError:
            break
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        for level, kind, payload in anc:
            if level == SOL_PACKET and kind == PACKET_AUXDATA and len(payload) >= _AUX.size:
                status, _, _, _, _, tci, tpid = _AUX.unpack_from(payload)
                if status & TP_STATUS_VLAN_VALID:
                    data = data[:12] + struct.pack("!HH", tpid or 0x8100, tci) + data[12:]
        etype = struct.unpack_from("!H", data, 12)[0]
        if etype == 0x8100 and len(data) >= 18:
            etype = struct.unpack_from("!H", data, 16)[0]
        if ethertype is None or etype == ethertype:
            print(data.hex(), flush=True)


def main(argv: list[str]) -> None:
    if argv[0] == "send":
        send(argv[1], argv[2:])
    elif argv[0] == "sniff":
        etype = int(argv[4], 0) if len(argv) > 4 and argv[3] == "--ethertype" else None
        sniff(argv[1], float(argv[2]), etype)
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
