"""Helpers for the hardening tests that talk to a daemon the hard way.

* :func:`raw_exchange`: write raw bytes to the control socket and read the reply lines,
  bypassing ``pyswitch.control.call`` (which only ever sends well-formed requests).
* :func:`two_veth_hosts`: a daemon bridge with two veth ports whose peers sit in their own
  namespaces with addresses, so that a test can watch traffic between them.
* :class:`Pinger`: ``ping`` between those namespaces in the background, with the loss
  and worst round trip parsed from its summary.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

from tests.daemon_proc import DaemonProcess
from tests.test_e2e_namespaces import ping


def raw_exchange(path: Path, data: bytes, lines: int = 1, timeout: float = 10) -> list[dict]:
    """Send ``data`` as is; return the first ``lines`` JSON reply lines (fewer if the
    daemon closes the connection first)."""
    import json

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us mid-send (a request over the limit): its reply may be readable
        buf = b""
        while buf.count(b"\n") < lines:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.split(b"\n")[:lines] if line]


def two_veth_hosts(d: DaemonProcess, prefix: str, subnet: str) -> tuple[str, str]:
    """br0 with veth ports ``<prefix>1`` and ``<prefix>2`` (namespaces of the same names,
    ``<subnet>.1`` and ``<subnet>.2``); returns the two namespace names once they ping."""
    d.cli("add-br", "br0", "--may-exist")
    for n in (1, 2):
        d.cli("add-port", "br0", f"{prefix}{n}", "--type", "veth", "-o", f"netns={prefix}{n}",
              "-o", f"peer-address={subnet}.{n}/24")
    assert ping(f"{prefix}1", f"{subnet}.2"), "no connectivity through the switch"
    return f"{prefix}1", f"{prefix}2"


class Pinger:
    """``ping -i INTERVAL -c COUNT`` from namespace ``ns`` in the background."""

    def __init__(self, ns: str, address: str, count: int, interval: float = 0.01) -> None:
        self.count = count
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "ping", "-q", "-i", str(interval), "-c", str(count), "-W", "1",
             address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.out = ""

    def result(self, timeout: float = 120) -> tuple[int, float]:
        """(frames lost, worst round trip in ms) once ping has finished."""
        self.out, _ = self.proc.communicate(timeout=timeout)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", self.out)
        assert m, self.out
        rtt = re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", self.out)
        return int(m.group(1)) - int(m.group(2)), float(rtt.group(1)) if rtt else float("inf")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

