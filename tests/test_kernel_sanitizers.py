"""The compiled kernels' tests, run again against an AddressSanitizer + UBSan build.

Every ``pyswitch/fastpath/*.pyx`` is built with ``PYSWITCH_SANITIZE=1`` (setup.py: ASan and
UBSan, UBSan errors abort) into a temporary directory, from a copy of the sources so the
shared checkout's build products are left alone.  Then the kernel tests --
``tests/test_kernel_*.py`` (every kernel's, this file excepted) and the virtqueue tests
that run each hostile guest on both paths -- run in a child interpreter with the
sanitizer runtimes preloaded and ``PYSWITCH_KERNEL_DIR`` pointing at the instrumented
build (``fastpath.load_kernel`` loads from there).  The child must exit 0 and print no
sanitizer report: an out-of-bounds access or undefined behaviour that the tests'
assertions would not notice still fails here.

The differential fuzzer runs ``PYSWITCH_SANITIZE_FUZZ_EXAMPLES`` examples there (default
100; the instrumented build is slower).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")

pytestmark = pytest.mark.timeout(1800)


def _runtime(lib: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert os.path.isabs(path) and os.path.exists(path), \
        f"{lib} not found (gcc says {path!r}): install gcc's sanitizer runtimes (libasan, libubsan)"
    return path


def build_sanitized(where: Path) -> Path:
    """Build every kernel with ASan/UBSan under ``where``; return the directory of the .so."""
    src = where / "src"
    (src / "pyswitch" / "fastpath").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pattern in ("*.pyx", "*.pxd", "*.pxi"):
        for f in glob.glob(str(ROOT / "pyswitch" / "fastpath" / pattern)):
            shutil.copy(f, src / "pyswitch" / "fastpath")
    env = dict(os.environ, PYSWITCH_SANITIZE="1")
    env.pop("PYSWITCH_ONLY", None)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(where / "lib"),
                        "--build-temp", str(where / "tmp")],
                       cwd=src, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return where / "lib" / "pyswitch" / "fastpath"


def test_kernel_tests_pass_under_asan_and_ubsan(tmp_path):
    kernels = sorted(Path(p).stem for p in glob.glob(str(ROOT / "pyswitch/fastpath/*.pyx")))
    assert kernels, "no kernels to build"
    libdir = build_sanitized(tmp_path)
    for name in kernels:  # each one built, and really instrumented
        built = list(libdir.glob(f"{name}.*.so"))
        assert built, f"{name} was not built with sanitizers (optional extension skipped?)"
        needed = subprocess.run(["readelf", "-d", str(built[0])], capture_output=True, text=True,
                                check=True).stdout
        assert "libasan" in needed and "libubsan" in needed, f"{name} is not instrumented"

    tests = sorted(str(p) for p in ROOT.glob("tests/test_kernel_*.py")
                   if p.name != Path(__file__).name)
    tests.append(str(ROOT / "tests" / "test_vhost_virtqueue.py"))
    env = dict(os.environ,
               LD_PRELOAD=f"{_runtime('libasan.so')}:{_runtime('libubsan.so')}",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               PYSWITCH_KERNEL_DIR=str(libdir),
               PYSWITCH_FUZZ_EXAMPLES=os.environ.get("PYSWITCH_SANITIZE_FUZZ_EXAMPLES", "100"))
    # --capture=sys: a sanitizer writes its report to fd 2, which fd capture would swallow
    r = subprocess.run([sys.executable, "-m", "pytest", *tests, "-p", "no:cacheprovider", "-q",
                        "-rfE", "--capture=sys"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500, check=False)
    out = r.stdout + r.stderr
    (tmp_path / "child-output.txt").write_text(out)  # kept by pytest's tmp_path retention
    found = [line for line in out.splitlines() if any(rep in line for rep in REPORTS)]
    failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert r.returncode == 0 and not found, (
        f"exit {r.returncode}; sanitizer reports: {found[:10]}; failed: {failed[:30]}\n"
        f"{out[-6000:]}")
    assert " passed" in r.stdout, r.stdout[-2000:]
    print(f"under ASan/UBSan: {r.stdout.strip().splitlines()[-1]}")  # shown with -s / -rP
