"""Each example topology in examples/ is run for real (the VM example: see the vhost-user tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.switch_proc import SwitchProcess, leftovers
from tests.test_e2e_namespaces import ping

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def example(tmp_path):
    started: list[SwitchProcess] = []

    def start(name: str) -> SwitchProcess:
        if leftovers("ex-"):
            pytest.fail(f"example names already in use on this machine: {leftovers('ex-')}")
        sp = SwitchProcess(tmp_path)
        started.append(sp)
        return sp.start((EXAMPLES / name).read_text())

    yield start
    for sp in started:
        if sp.proc.poll() is None:
            sp.proc.kill()
            sp.proc.wait()
    for name in leftovers("ex-"):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def test_namespaces_example(example):
    sw = example("namespaces.yaml")
    assert ping("ex-a", "10.78.0.2")
    r = subprocess.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.78.0.1"], capture_output=True, timeout=20)
    assert r.returncode == 0
    sw.stop()
    assert not leftovers("ex-")


def test_vlans_example(example):
    sw = example("vlans.yaml")
    assert ping("ex-v10a", "10.79.0.2")
    assert not ping("ex-v10a", "10.79.0.3", count=2)
    sw.stop()
    assert not leftovers("ex-")
