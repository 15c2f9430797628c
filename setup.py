"""Build the compiled fast path (Cython kernels) next to the pure-Python package.

Everything else about the package is declared in pyproject.toml.  Each ``*.pyx`` under
``pyswitch/fastpath/`` becomes an extension module ``pyswitch.fastpath.<name>``.  The
extensions are *optional*: if a compiler or the Python headers are missing, the build
warns and goes on, and pyswitch runs its plain-Python data path (it says so at start).

``PYSWITCH_SANITIZE=1`` builds with AddressSanitizer and UndefinedBehaviorSanitizer
(used by the sanitizer tests; run the interpreter with ``LD_PRELOAD`` of libasan).
``PYSWITCH_ONLY=_vring`` builds only the named kernels (``setup.py build_ext --inplace``).
"""

from __future__ import annotations

import glob
import os

from setuptools import Extension, setup


def _extensions() -> list:
    try:
        from Cython.Build import cythonize
    except ImportError:  # no Cython: the Python path only (pyswitch says so at start)
        print("pyswitch: Cython is not available; building without the compiled fast path")
        return []
    args = ["-O2", "-fno-strict-aliasing"]
    link: list[str] = []
    if os.environ.get("PYSWITCH_SANITIZE"):
        args = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                "-fno-sanitize-recover=undefined"]
        link = ["-fsanitize=address,undefined"]
    # PYSWITCH_ONLY=_vring,_emc builds just those (development: one kernel at a time)
    only = {n for n in os.environ.get("PYSWITCH_ONLY", "").split(",") if n}
    exts = [
        Extension(
            "pyswitch.fastpath." + os.path.splitext(os.path.basename(path))[0],
            [path],
            extra_compile_args=args,
            extra_link_args=link,
            optional=True,
        )
        for path in sorted(glob.glob("pyswitch/fastpath/*.pyx"))
        if not only or os.path.basename(path)[:-4] in only
    ]
    if not exts:
        return []
    return cythonize(exts, language_level=3, quiet=True,
                     compiler_directives={"boundscheck": False, "wraparound": False,
                                          "cdivision": True, "initializedcheck": False})


setup(ext_modules=_extensions())
