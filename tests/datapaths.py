"""The ``datapath`` fixture: run a test once on each data path, in process.

``datapath`` is ``"python"`` or ``"compiled"``; for the duration of the test
:func:`pyswitch.fastpath.select` has chosen it, so ports and bridges made inside the test
use that path's implementation.  The compiled path must be built (``pip install -e .``
builds it): a missing kernel fails the compiled variant with the reason, never skips it.
The process goes back to the Python path afterwards.
"""

from __future__ import annotations

import pytest

from pyswitch import fastpath

DATAPATHS = ("python", "compiled")


@pytest.fixture(params=DATAPATHS)
def datapath(request: pytest.FixtureRequest):
    mode = request.param
    fastpath.select(mode)  # DatapathError (a failure, with the reason) if not built
    try:
        yield mode
    finally:
        fastpath.select("python")


@pytest.fixture(params=DATAPATHS)
def pktio(request: pytest.FixtureRequest):
    """The packet-I/O implementation a port test passes to ``VethPort``/``TapPort``
    (``pktio=``): ``None`` on the Python path, the ``_pktio`` kernel on the compiled one,
    loaded on its own so the port tests do not wait for the other kernels."""
    yield None if request.param == "python" else fastpath.load_kernel("_pktio")
