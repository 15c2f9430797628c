"""Which data path runs: the compiled kernels or the plain-Python reference.

pyswitch has one fast-path interface with two implementations, as Open vSwitch has a
datapath under ofproto:

* **python** -- the reference, written to be read: ``ports/vhostuser/virtqueue.py``
  (split rings), ``pyswitch/flows`` and ``pyswitch/bridge.py`` (keys, decisions),
  ``ports/afpacket.py`` (packet rings).  Always available.
* **compiled** -- small Cython kernels in this package, called once per port and
  batch, that implement the same interfaces: ``_vring`` (split-ring reads and writes
  over guest memory), ``_emc`` (flow keys, the exact-match decision cache, cached
  actions), ``_pktio`` (AF_PACKET and TAP batches).  Built by ``pip install`` when a
  compiler is at hand (``setup.py``; the extensions are optional).

:func:`select` is called once at start with the configured mode (``auto`` picks the
compiled path when every kernel loads, else the Python path and says why, once).
Components ask :func:`kernel` for a module: it returns ``None`` on the Python path.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType

log = logging.getLogger(__name__)

MODES = ("auto", "compiled", "python")
#: The compiled kernels; the compiled path runs only when every one of them loads.
KERNELS = ("_vring", "_emc", "_pktio")


class DatapathError(Exception):
    """``compiled`` was asked for but a kernel cannot be loaded."""


@dataclass
class Datapath:
    """The path that runs in this process and why."""

    requested: str = "auto"
    active: str = "python"
    reason: str = "not selected yet"
    modules: dict[str, ModuleType] = field(default_factory=dict)

    def as_dict(self) -> dict[str, str]:
        return {"requested": self.requested, "active": self.active, "reason": self.reason}


_current = Datapath()


def load_kernel(name: str) -> ModuleType:
    """Import kernel ``name``; ImportError if it is not built.

    ``PYSWITCH_KERNEL_DIR`` names a directory whose ``<name>*.so`` is loaded instead of
    the installed one (the sanitizer tests build an ASan/UBSan copy there)."""
    full = f"{__name__}.{name}"
    where = os.environ.get("PYSWITCH_KERNEL_DIR")
    if not where or full in sys.modules:
        return importlib.import_module(full)
    found = sorted(f for f in os.listdir(where) if f.startswith(name + ".") and f.endswith(".so"))
    if not found:
        raise ImportError(f"no {name}*.so in PYSWITCH_KERNEL_DIR={where}")
    spec = importlib.util.spec_from_file_location(full, os.path.join(where, found[0]))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[full]
        raise
    return mod


def _load() -> tuple[dict[str, ModuleType], str | None]:
    mods: dict[str, ModuleType] = {}
    for name in KERNELS:
        try:
            mods[name] = load_kernel(name)
        except ImportError as exc:
            return mods, f"kernel {name} is not built or cannot be loaded ({exc})"
    return mods, None


def select(mode: str = "auto") -> Datapath:
    """Choose the data path for this process; logs the choice once.

    ``python`` always works; ``compiled`` raises :class:`DatapathError` if a kernel is
    missing; ``auto`` falls back to Python with a warning naming what is missing."""
    global _current
    if mode not in MODES:
        raise DatapathError(f"datapath {mode!r} is not one of {', '.join(MODES)}")
    if mode == "python":
        _current = Datapath(mode, "python", "asked for")
        log.info("datapath: python (asked for)")
        return _current
    mods, missing = _load()
    if missing is None:
        _current = Datapath(mode, "compiled", "every kernel loaded", mods)
        log.info("datapath: compiled (%s)", ", ".join(KERNELS))
        return _current
    if mode == "compiled":
        raise DatapathError(f"datapath compiled: {missing}; reinstall with a C compiler and the "
                            "Python headers (apt-get install gcc python3-dev), or use --datapath python")
    _current = Datapath(mode, "python", missing)
    log.warning("datapath: python, the compiled fast path is unavailable: %s", missing)
    return _current


def current() -> Datapath:
    """The data path selected for this process (python until :func:`select`)."""
    return _current


def kernel(name: str) -> ModuleType | None:
    """The compiled kernel ``name`` when the compiled path runs, else ``None``."""
    return _current.modules.get(name) if _current.active == "compiled" else None
