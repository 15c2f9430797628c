"""The configuration database: one YAML file, saved atomically after every change.

The file holds exactly what ``pyswitch export`` prints (the topology format of
docs/topology.md), so an operator can read it, back it up, or ``apply`` it elsewhere.

Saving writes a temporary file in the same directory, fsyncs it, renames it over the old
one and fsyncs the directory: a crash at any point leaves either the old or the new file,
never a half-written one.  A crash between writing and renaming leaves the temporary
file (``.<name>.<random>``) behind; the next save removes such leftovers.  Loading refuses a file it cannot read or validate, with the
reason, and never overwrites it: the daemon stops instead, and the operator decides.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .config import ConfigError, SwitchConfig
from .topology import dump_topology, load_topology_text

HEADER = "# pyswitch configuration database: written by the daemon after every change.\n"


class DatabaseError(Exception):
    """The database file exists but cannot be used; the message says why and where."""


class ConfigStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> SwitchConfig | None:
        """The saved configuration, or None when there is no database file yet."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise DatabaseError(f"cannot read the database {self.path}: {exc}") from None
        try:
            return load_topology_text(text, str(self.path))
        except ConfigError as exc:
            raise DatabaseError(f"the database is not valid, refusing to start: {exc} "
                                f"(left untouched; fix or move it away)") from None

    def save(self, cfg: SwitchConfig) -> None:
        """Write ``cfg`` atomically (see the module docstring)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        data = (HEADER + dump_topology(cfg)).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _remove_leftovers(self) -> None:
        """Temporary files of saves that a crash interrupted (only the daemon, one per
        run directory, saves: none of them is being written now)."""
        for stale in self.path.parent.glob(f".{self.path.name}.*"):
            try:
                stale.unlink()
            except OSError:
                pass
