"""A real peer that is not installed is a test failure, never a skip.

`require_binary` and `require_path` raise `PeerMissingError` whose message names the Debian package
that provides the missing piece, so the failure tells the reader what to install.
"""

from __future__ import annotations

import shutil
from pathlib import Path


class PeerMissingError(RuntimeError):
    """A peer program or file is absent; the message names the package that provides it."""


def require_binary(name: str, package: str) -> str:
    """The absolute path of program `name` on PATH; else `PeerMissingError` naming `package`."""
    found = shutil.which(name)
    if found is None:
        raise PeerMissingError(f"{name} not found on PATH: install the Debian package {package}")
    return found


def require_path(path: Path, package: str, what: str) -> Path:
    """`path` if it exists; else `PeerMissingError` saying `what` is missing, naming `package`."""
    if not path.exists():
        raise PeerMissingError(f"{what} ({path}) not found: install the Debian package {package}")
    return path
