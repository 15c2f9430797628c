"""A UDP echo pair for round-trip times between two namespaces (bench/latency.py runs it).

    ip netns exec B python bench/udpecho.py server ADDRESS PORT
    ip netns exec A python bench/udpecho.py client ADDRESS PORT COUNT

The client sends COUNT datagrams one at a time (each carries a sequence number), waits for
its echo (at most 0.2 s: then the sample counts as lost) and takes the round trip as
`time.perf_counter_ns()` just before `sendto` and just after `recv` returned the matching
echo. It prints one JSON object: {"rtt_ns": [...], "lost": N}. The first 20 round trips
are warm-up and not reported. After 25 losses in a row it stops (the path is down, and
waiting 0.2 s per sample would stall the bench): the rest count as lost.

Why this and not ping: the samples are in nanoseconds of one process clock and thousands
of them take a second or two; `ping -i 0.001` reports 3 significant digits and needs
-i >= 0.002 without flood mode. Why not SO_TIMESTAMPING: both ends here are user space
in Python, as pyswitch's users' applications would be; the Python send/recv cost (a few
microseconds, the same on every path) is part of every sample, so compare paths with
each other, not with a hardware figure.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

WARMUP = 20
TIMEOUT = 0.2
GIVE_UP = 25
SEQ = struct.Struct("!Q")


def server(address: str, port: int) -> None:
    """Echo every datagram back to its sender until killed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)


def client(address: str, port: int, count: int) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((address, port))
    sock.settimeout(TIMEOUT)
    payload = bytearray(32)  # 32 + 8 + 20 + 14 = a 74-byte frame
    rtts: list[int] = []
    lost = in_a_row = 0
    for seq in range(count + WARMUP):
        if in_a_row >= GIVE_UP:
            lost += count + WARMUP - max(seq, WARMUP)
            break
        SEQ.pack_into(payload, 0, seq)
        t0 = time.perf_counter_ns()
        sock.send(payload)
        try:
            while True:  # skip a late echo of an earlier, already lost, sample
                data = sock.recv(2048)
                if SEQ.unpack_from(data)[0] == seq:
                    break
            rtt = time.perf_counter_ns() - t0
        except TimeoutError:
            lost += seq >= WARMUP
            in_a_row += 1
            continue
        in_a_row = 0
        if seq >= WARMUP:
            rtts.append(rtt)
    return {"rtt_ns": rtts, "lost": lost}


def main() -> None:
    role, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if role == "server":
        server(address, port)
    else:
        print(json.dumps(client(address, port, int(sys.argv[4]))))


if __name__ == "__main__":
    main()
