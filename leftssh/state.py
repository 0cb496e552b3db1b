"""The base: the last agreed state of a (local dir, user, host, port, remote path) pair.

Stored as one JSON file per pair under the state directory (outside the share,
so an unmounted or wiped share is recognised as emptied rather than as a first
sync). A single writer holds the run lock, and each save writes a new file,
fsyncs it and ``os.replace``s it over the old one: a run killed at any moment
leaves the old base or the new one, never a torn file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

from leftssh.errors import UsageError
from leftssh.model import BaseEntry

FORMAT = 1


def state_dir() -> Path:
    """Return leftssh's state directory (``$LEFTSSH_STATE_DIR``, else XDG state home)."""
    explicit = os.environ.get("LEFTSSH_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "leftssh"


def pair_key(local_dir: Path, user: str, host: str, port: int, remote_path: str) -> str:
    """A stable file name for one sync pair."""
    ident = json.dumps([str(local_dir), user, host, port, remote_path])
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


class BaseStore:
    """Load and atomically save the base of one sync pair."""

    def __init__(self, key: str, describe: dict, directory: Path | None = None) -> None:
        self.directory = directory or state_dir() / "bases"
        self.path = self.directory / f"{key}.json"
        self.describe = describe

    def load(self) -> dict[str, BaseEntry] | None:
        """Return the base, or None when there is none yet (first sync)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise UsageError(
                f"cannot read the sync state {self.path}: {e}; remove it to start over "
                "(the next sync then treats every difference as new, deleting nothing)"
            ) from e
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UsageError(f"sync state {self.path} has an unknown format; remove it")
        base: dict[str, BaseEntry] = {}
        for path, rec in data.get("entries", {}).items():
            kind, md5, local, remote = rec
            base[path] = BaseEntry(
                kind, md5, tuple(local) if local else None, tuple(remote) if remote else None
            )
        return base

    def save(self, base: dict[str, BaseEntry]) -> None:
        """Write the base atomically (new file, fsync, rename, fsync the directory)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {
            "format": FORMAT,
            "pair": self.describe,
            "entries": {
                p: [
                    e.kind,
                    e.md5,
                    list(e.local) if e.local else None,
                    list(e.remote) if e.remote else None,
                ]
                for p, e in sorted(base.items())
            },
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # A run killed while saving left its temporary file; the run locks make this
        # run the only writer for the pair, so any other one is an orphan.
        for orphan in self.directory.glob(f".{glob.escape(self.path.name)}.*.tmp"):
            try:
                orphan.unlink()
            except OSError:
                pass
        try:
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def reset(self) -> bool:
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False
