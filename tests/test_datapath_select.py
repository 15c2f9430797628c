"""Which data path runs, as the operator sees it: ``--datapath``, ``--pmd``, ``show``,
the log and ``/metrics`` (pyswitch.fastpath, the switch's polling)."""

from __future__ import annotations

import time

from tests.test_metrics import get, scrape

TOPO = """\
bridges:
  br0:
    ports:
      m1: {type: memory}
      m2: {type: memory}
"""


def _info(sw) -> dict[str, str]:
    samples = scrape(sw.metrics_url)
    found = [dict(labels) for (name, labels) in samples if name == "pyswitch_datapath_info"]
    assert len(found) == 1, found
    assert get(samples, "pyswitch_datapath_info", **found[0]) == 1
    return found[0]


def _iterations(sw) -> float:
    return get(scrape(sw.metrics_url), "pyswitch_loop_iterations_total")


def test_python_path_when_asked(pyswitch_up):
    sw = pyswitch_up(TOPO, args=["--datapath", "python"])
    assert "datapath: python (requested python, pmd false)" in sw.cli("show").stdout
    assert _info(sw) == {"path": "python", "requested": "python", "pmd": "false"}
    assert "datapath: python (asked for)" in sw.stop()


def test_compiled_path_runs_when_built(pyswitch_up):
    """The kernels are built by the install (setup.py): ``auto`` picks them."""
    sw = pyswitch_up(TOPO)
    assert "datapath: compiled (requested auto, pmd false)" in sw.cli("show").stdout
    assert _info(sw) == {"path": "compiled", "requested": "auto", "pmd": "false"}
    assert "datapath: compiled (_vring, _emc, _pktio)" in sw.stop()


def test_unbuilt_kernels_fall_back_or_refuse(pyswitch_up, tmp_path):
    """No kernel in PYSWITCH_KERNEL_DIR stands for a build without a compiler: ``auto``
    runs the Python path and says why once; ``compiled`` refuses to start, saying why."""
    empty = tmp_path / "no-kernels"
    empty.mkdir()
    from tests.switch_proc import SwitchProcess

    refused = SwitchProcess(tmp_path / "a")
    (tmp_path / "a").mkdir()
    refused.env["PYSWITCH_KERNEL_DIR"] = str(empty)
    try:
        refused.start(TOPO, args=["--datapath", "compiled"], timeout=20)
        raise AssertionError("started although no kernel could load")
    except AssertionError as exc:
        assert "exited 1" in str(exc), exc
        assert "datapath compiled: kernel _vring is not built or cannot be loaded" in str(exc)
        assert "--datapath python" in str(exc)

    fallback = SwitchProcess(tmp_path / "b")
    (tmp_path / "b").mkdir()
    fallback.env["PYSWITCH_KERNEL_DIR"] = str(empty)
    fallback.start(TOPO)
    try:
        assert _info(fallback) == {"path": "python", "requested": "auto", "pmd": "false"}
    finally:
        log = fallback.stop()
    assert log.count("the compiled fast path is unavailable: kernel _vring is not built") == 1


def test_idle_switch_sleeps_and_pmd_spins(pyswitch_up):
    """No busy spinning unless asked: an idle switch waits in epoll (a handful of loop
    iterations a second, for its timers); with --pmd the loop polls without sleeping."""
    idle = pyswitch_up(TOPO, args=["--datapath", "python"])
    before = _iterations(idle)
    time.sleep(1.0)
    slept = _iterations(idle) - before
    idle.stop()
    pmd = pyswitch_up(TOPO, args=["--datapath", "python", "--pmd"])
    assert _info(pmd)["pmd"] == "true"
    before = _iterations(pmd)
    time.sleep(1.0)
    spun = _iterations(pmd) - before
    pmd.stop()
    # a scrape wakes the loop too; the timers fire about once a second per kind
    assert slept < 50, slept
    assert spun > 1000, spun
