"""vhost-user ports and the device on the compiled path, against the test front end.

The port and device tests of tests/test_vhost_port.py and tests/test_vhost_device.py run
on the Python path in their own files; here the same tests run again with the compiled
path selected (``fastpath.select("compiled")``), so every ring the device builds is the
``_vring`` kernel's.  Each test also checks that it really was: the rings it started are
counted by class.  ADD_MEM_REG / REM_MEM_REG and SET_MEM_TABLE under live rings are among
them (test_add_and_remove_memory_regions, test_new_memory_table_remaps_started_rings).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from pyswitch.ports.vhostuser import device as device_mod
from pyswitch.ports.vhostuser.virtqueue import Virtqueue

from pyswitch import fastpath
from tests import test_vhost_device as dev_tests
from tests import test_vhost_port as port_tests
from tests.test_vhost_device import dev  # noqa: F401 -- fixtures the imported tests use
from tests.test_vhost_port import fe, ram, server  # noqa: F401


@contextmanager
def kernel_rings(monkeypatch):
    """Select the compiled path; yields the list of the classes of the rings the device
    builds meanwhile, which must all be the kernel's; back to the Python path after."""
    fastpath.select("compiled")
    built: list[type] = []
    real = device_mod.new_virtqueue

    def counting(*args, **kw):
        q = real(*args, **kw)
        built.append(type(q))
        return q

    monkeypatch.setattr(device_mod, "new_virtqueue", counting)
    try:
        yield built
    finally:
        fastpath.select("python")
    assert all(cls is not Virtqueue and cls.__module__ == "pyswitch.fastpath._vring"
               for cls in built), built


@pytest.fixture(autouse=True)
def compiled_rings(monkeypatch):
    with kernel_rings(monkeypatch) as built:
        yield built


_PORT_TESTS = [
    "test_guest_to_switch", "test_switch_to_guest_one_call_per_batch",
    "test_no_buffer_drops_are_counted", "test_polling_front_end_without_kick_fds",
    "test_disconnect_tears_down_and_next_front_end_is_served", "test_out_of_order_setup",
    "test_disabled_transmitq_is_drained_not_forwarded", "test_bad_descriptor_in_guest_ring_is_counted",
    "test_event_idx_suppresses_calls", "test_multiqueue_spreads_and_collects",
    "test_client_retries_until_server_appears_and_reconnects",
    "test_event_idx_driver_that_kicks_only_when_asked_never_stalls",
    "test_mtu_drops_in_both_directions", "test_polling_driver_without_call_fd",
    "test_release_asks_again_for_a_transmitq_the_batch_did_not_reach",
    "test_reconnects_leak_no_file_descriptors", "test_corrupt_receiveq_avail_index_stops_that_ring",
]
_DEVICE_TESTS = [
    "test_ring_starts_on_first_kick_and_stops_on_get_vring_base",
    "test_nofd_kick_means_polling_and_starts_at_once", "test_buffers_waiting_at_set_vring_kick_count_as_a_kick",
    "test_new_memory_table_remaps_started_rings", "test_add_and_remove_memory_regions",
]
for _name in _PORT_TESTS:
    globals()[_name] = getattr(port_tests, _name)
for _name in _DEVICE_TESTS:
    globals()[_name] = getattr(dev_tests, _name)


def test_rings_are_the_kernels(server, fe, ram, compiled_rings):  # noqa: F811
    """The check above is not vacuous: bringing up a port builds kernel rings."""
    port_tests.bring_up(fe, ram)
    assert port_tests.wait_for(lambda: len(compiled_rings) >= 2)
