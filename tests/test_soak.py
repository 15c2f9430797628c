"""A bounded soak in CI: bench/soak.py for $PYSWITCH_SOAK_SECONDS (default 30 s).

Forwarding flat out between two namespaces (trafgen, 64-byte frames), alone and with a
testpmd io loop over two vhost-user ports beside it, pyswitch's RSS and fd count sampled; after warm-up RSS must stay within 4 MiB and the fd count constant,
and frames must arrive in every sampling interval.  Run it for ten minutes with
``PYSWITCH_SOAK_SECONDS=600`` or ``bench/soak.py --seconds 600``.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.switch_proc import ROOT

SECONDS = float(os.environ.get("PYSWITCH_SOAK_SECONDS", "30"))

pytestmark = pytest.mark.timeout(SECONDS + 120)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rss_and_fds_stay_flat_under_full_rate_traffic():
    soak = _bench()
    every = max(1.0, min(5.0, SECONDS / 20))
    result = soak.soak(SECONDS, every)
    print({k: v for k, v in result.items() if k != "samples"})
    assert result["ok"], result["problems"]
    assert result["rx_pps"] > 1000, result  # it was loaded


def test_rss_and_fds_stay_flat_with_a_vhost_user_loop_beside():
    """The same with testpmd's io loop over two vhost-user ports of another bridge (guest
    memory is mapped during warm-up: RSS grows by what the switch touches, then stays)."""
    soak = _bench()
    result = soak.soak(SECONDS, max(1.0, min(5.0, SECONDS / 20)), vhost=True)
    print({k: v for k, v in result.items() if k != "samples"})
    assert result["ok"], result["problems"]
    assert result["vhost_rx_pps"] > 1000 and result["rx_pps"] > 1000, result


def test_the_verdict_catches_growth_fd_leaks_and_stalls():
    """The verdict itself can fail: fed samples with a leak, an fd leak and a stall."""
    soak = _bench()
    flat = [{"t": t, "rss": 50 << 20, "fds": 10, "rx": 1000 * t} for t in range(0, 41, 2)]
    assert soak.verdict(flat, 40, 5, "python")["ok"]
    leak = [{**x, "rss": x["rss"] + x["t"] * (1 << 20) // 4} for x in flat]  # 0.25 MiB/s
    assert "RSS (rss) grew" in soak.verdict(leak, 40, 5, "python")["problems"][0]
    anon = [{**x, "rss_anon": x["rss"] // 2, "rss_shmem": x["t"] << 20} for x in flat]  # guest memory touched
    assert soak.verdict(anon, 40, 5, "python")["ok"]
    anon_leak = [{**x, "rss_anon": x["rss"]} for x in leak]
    assert "RSS (rss_anon) grew" in soak.verdict(anon_leak, 40, 5, "python")["problems"][0]
    fds = [{**x, "fds": 10 + (x["t"] > 30)} for x in flat]
    assert "fd count changed" in soak.verdict(fds, 40, 5, "python")["problems"][0]
    stall = [{**x, "rx": min(x["rx"], 20000)} for x in flat]
    assert "no frames forwarded" in soak.verdict(stall, 40, 5, "python")["problems"][0]
