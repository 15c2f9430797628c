"""DPDK testpmd (net_virtio_user) against pyswitch's vhost-user ports, on both data paths.

* In process: the port tests of tests/test_vhost_testpmd.py (one port, testpmd txonly /
  rxonly, reconnects, two queue pairs) again with the compiled path selected, checking
  that the rings built were the ``_vring`` kernel's.  Their Python-path runs are in that file.
* Forwarding through the switch: tests/test_testpmd_bridge.py's ``io`` loop (testpmd
  ``start tx_first``: port0 -> vhu1 -> bridge -> vhu2 -> port1 -> port0 ...) with
  ``pyswitch up --datapath python`` and ``--datapath compiled``, each run checking that
  ``pyswitch show`` reports the path asked for.
"""

from __future__ import annotations

import json
import secrets

import pytest
from pyswitch.ports.vhostuser.port import VhostUserServerPort

from tests import test_testpmd_bridge as bridge_tests
from tests import test_vhost_testpmd as pmd_tests
from tests.test_kernel_vring_ports import kernel_rings
from tests.vhost_frontend import PortHarness

pytestmark = [pytest.mark.peer, pytest.mark.timeout(180)]


@pytest.fixture
def server(monkeypatch, tmp_path):
    """tests/test_vhost_testpmd.py's port, with the compiled path selected while it runs."""
    with kernel_rings(monkeypatch) as built:
        h = PortHarness(VhostUserServerPort("pst" + secrets.token_hex(3),
                                            {"vhost-sock-dir": str(tmp_path)}), keep=64)
        try:
            yield h
        finally:
            h.close()
        assert built, "no ring was built"


for _name in ("test_testpmd_txonly_into_server_port", "test_transmit_into_testpmd_rxonly",
              "test_server_port_serves_testpmd_again_after_it_quits", "test_multiqueue_both_directions"):
    globals()[_name] = getattr(pmd_tests, _name)


@pytest.fixture(params=["python", "compiled"])
def pyswitch_up(request, pyswitch_up):
    """``pyswitch up --datapath <param>``; the switch must say that path runs."""
    path = request.param

    def start(topology: str, args=()):
        sw = pyswitch_up(topology, args=("--datapath", path, *args))
        shown = json.loads(sw.cli("show", "--json").stdout)["datapath"]
        assert shown["active"] == path, shown
        return sw

    return start


def test_closed_io_loop_through_the_bridge(pyswitch_up, tmp_path):
    """testpmd ``io`` forwarding with ``start tx_first`` through two client ports and the
    bridge, one queue pair (the two-pair and txonly -> rxonly variants run in
    tests/test_testpmd_bridge.py on the default path)."""
    bridge_tests.test_closed_io_loop_client_role(pyswitch_up, tmp_path, 1)
