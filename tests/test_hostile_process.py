"""Hostile vhost-user front ends against a real ``pyswitch up`` process (issue 8).

The in-process tests (tests/test_hostile_frontend.py and friends) see every detail; this
one checks the same from outside, as an operator would: the switch is its own process
with two network namespaces on veth ports and a ``dpdkvhostuser`` port.  While one
namespace pings the other every 20 ms, hostile sessions (tests/vhost_live.py
``hostile_session``: fds of every wrong kind, messages cut at every step, 9 regions with
9 fds, garbage) hit the vhost-user socket.  Then:

* no ping was lost;
* the process's log (its stderr) has a refusal warning naming the port and no traceback,
  and ``/metrics`` counts the refusals (``pyswitch_vhost_protocol_errors_total``);
* /proc/PID/fd is exactly as after the warm-up and RSS grew less than 4 MiB;
* the process exits cleanly on SIGTERM.

``PYSWITCH_LEAK_ROUNDS`` scales the number of sessions (default 1000: at least 300 here,
and as many more as fit in the pings' time).
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests.netns_util import wait_until
from tests.switch_proc import ns_exec
from tests.test_e2e_namespaces import host
from tests.test_metrics import get, scrape

pytest.register_assert_rewrite("tests.vhost_live")
from tests.vhost_live import hostile_session, open_fds, rss_kib

SESSIONS = max(30, int(os.environ.get("PYSWITCH_LEAK_ROUNDS", "1000")) * 3 // 10)
WARMUP = 40
RSS_SLACK_KIB = 4096


@pytest.mark.timeout(300)
def test_hostile_front_ends_against_a_running_switch(pyswitch_up, prefix, tmp_path) -> None:
    p = prefix
    vh = f"{p}vh"
    topo = ("bridges:\n  br0:\n    ports:\n" + host(p, "a", 1, "10.93.0") + host(p, "b", 2, "10.93.0")
            + f"      {vh}: {{type: dpdkvhostuser, options: {{vhost-sock-dir: '{tmp_path}'}}}}\n")
    sw = pyswitch_up(topo)
    pid, path = sw.proc.pid, str(tmp_path / vh)
    lv = {"bridge": "br0", "port": vh, "type": "dpdkvhostuser"}
    assert ns_exec(f"{p}a", "ping", "-c", "2", "-W", "2", "10.93.0.2", check=False).returncode == 0
    for i in range(WARMUP):
        hostile_session(path, i)
    assert wait_until(lambda: get(scrape(sw.metrics_url), "pyswitch_vhost_connected", **lv) == 0)
    fds0, rss0 = open_fds(pid), rss_kib(pid)
    errors0 = get(scrape(sw.metrics_url), "pyswitch_vhost_protocol_errors_total", **lv)

    count = max(50, SESSIONS // 10)
    pinger = subprocess.Popen(["ip", "netns", "exec", f"{p}a", "ping", "-c", str(count), "-i", "0.02",
                               "-W", "2", "10.93.0.2"], stdout=subprocess.PIPE, text=True)
    try:
        t0, n = time.monotonic(), 0
        while n < SESSIONS or pinger.poll() is None:  # hostile for as long as the pings run
            hostile_session(path, WARMUP + n)
            n += 1
        elapsed = time.monotonic() - t0
        out, _ = pinger.communicate(timeout=60)
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.wait()
    sent, got = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
    assert got == sent == count, f"pings lost while hostile front ends ran: {out}"

    assert wait_until(lambda: get(scrape(sw.metrics_url), "pyswitch_vhost_connected", **lv) == 0)
    # 3 of the 4 kinds of session always break the protocol; the wrong-fd kind sometimes
    # sends the right fd (an eventfd as kick, a memfd as memory)
    errors = get(scrape(sw.metrics_url), "pyswitch_vhost_protocol_errors_total", **lv) - errors0
    assert errors >= n * 3 // 4, f"{errors} protocol errors counted for {n} sessions"
    assert wait_until(lambda: open_fds(pid) == fds0), f"fds: {open_fds(pid)} after, {fds0} before"
    rss1 = rss_kib(pid)
    assert rss1 - rss0 < RSS_SLACK_KIB, f"RSS grew {rss1 - rss0} KiB over {n} sessions"
    print(f"{n} hostile sessions in {elapsed:.1f} s against pid {pid}: fds {fds0} -> "
          f"{open_fds(pid)}, RSS {rss0} -> {rss1} KiB, {got}/{sent} pings")
    log = sw.stop()
    assert re.search(rf"WARNING.*{vh}: vhost-user .*refused", log), log[-2000:]
    assert "Traceback" not in log, log[-4000:]
