"""The base: the last agreed state of a (local dir, user, host, port, remote path) pair.

Stored as one file per pair under the state directory (outside the share, so an
unmounted or wiped share is recognised as emptied rather than as a first sync).
A single writer holds the run lock, and each save writes a new file, fsyncs it
and ``os.replace``s it over the old one: a run killed at any moment leaves the
old base or the new one, never a torn file.

The file (``<key>.base``, format 2) is text, one line per path, so that it is
read and written a line at a time: a base of 100,000 paths never exists as one
document in memory. Lines::

    {"format": 2, "pair": {...}}                         the header (JSON)
    PATH <TAB> KIND <TAB> MD5 <TAB> LOCAL <TAB> REMOTE   one per path, sorted by path
    <TAB>end <TAB> COUNT <TAB> SHA256                     the last line

PATH is written as it is unless it holds a tab, CR or LF or starts with ``"``;
then it is a JSON string. KIND is ``file`` or ``dir``, MD5 is empty when
unknown, LOCAL and REMOTE are ``size,mtime,mode`` or empty (no snapshot), and
REMOTE is ``=`` when it equals LOCAL. The last line counts the records and
holds the SHA-256 of every byte before it: a file without it, or whose sum does
not match, is refused rather than read as a smaller base. Names are UTF-8; lone
surrogates (names that are not UTF-8 on disk) are kept as such
(``surrogatepass``).

Format 1 (``<key>.json``: one JSON document) is still read; the next save
writes format 2 and removes it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

from leftssh.errors import UsageError
from leftssh.model import DIR, FILE, BaseEntry, Snapshot, shared_int

FORMAT = 2
LEGACY_FORMAT = 1
_KINDS = {FILE: FILE, DIR: DIR}
_END = "\tend\t"
_QUOTE = ("\t", "\n", "\r")
_CHUNK = 2048  # records encoded, hashed and written at a time
_SHARE_MAX = 4096  # distinct record texts whose BaseEntry is shared while loading


class CorruptState(ValueError):
    """The state file cannot be read as a base."""


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


# -- format 2 ------------------------------------------------------------------------------


def _encode_path(path: str) -> str:
    if path and not path.startswith('"') and not any(c in path for c in _QUOTE):
        return path
    return json.dumps(path)


def _encode_snap(snap: Snapshot | None) -> str:
    if snap is None:
        return ""
    size, mtime, mode = snap
    return f"{size},{mtime},{mode}"


def encode_record(path: str, e: BaseEntry) -> str:
    """Return the line (newline included) that stores ``e`` for ``path``."""
    if e.kind not in _KINDS or (e.md5 and not e.md5.isalnum()):
        raise ValueError(f"cannot store the base record {e!r}")
    local = _encode_snap(e.local)
    remote = "=" if e.remote is not None and e.remote == e.local else _encode_snap(e.remote)
    return f"{_encode_path(path)}\t{e.kind}\t{e.md5 or ''}\t{local}\t{remote}\n"


def _decode_snap(text: str) -> Snapshot | None:
    if not text:
        return None
    size, mtime, mode = text.split(",")
    return (shared_int(int(size)), shared_int(int(mtime)), shared_int(int(mode)))


def _decode_entry(text: str) -> BaseEntry:
    kind, md5, local_text, remote_text = text.split("\t")
    local = _decode_snap(local_text)
    remote = local if remote_text == "=" and local is not None else _decode_snap(remote_text)
    return BaseEntry(_KINDS[kind], md5 or None, local, remote)


def write_base(f: IO[bytes], describe: dict, records: Iterable[tuple[str, BaseEntry]]) -> None:
    """Write a format 2 base (records sorted by path) to the binary file ``f``."""
    digest = hashlib.sha256()
    count = 0

    def put(text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(data)
        f.write(data)

    put(json.dumps({"format": FORMAT, "pair": describe}, separators=(",", ":")) + "\n")
    lines: list[str] = []
    for path, e in records:
        lines.append(encode_record(path, e))
        if len(lines) >= _CHUNK:
            put("".join(lines))
            count += len(lines)
            lines.clear()
    put("".join(lines))
    count += len(lines)
    f.write(f"{_END}{count}\t{digest.hexdigest()}\n".encode())


def read_base(f: IO[bytes]) -> dict[str, BaseEntry]:
    """Read a format 2 base from the binary file ``f``; raise CorruptState if it is not one.

    Paths are interned, so the scans' entries and the base share one string per path,
    and records with the same text (same kind, hash and snapshots: files written
    together often have the same size and mtime) share one BaseEntry.
    """
    digest = hashlib.sha256()
    header = f.readline()
    digest.update(header)
    try:
        head = json.loads(header)
    except ValueError as e:
        raise CorruptState(f"damaged header ({e})") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise CorruptState("unknown format")
    base: dict[str, BaseEntry] = {}
    shared: dict[str, BaseEntry] = {}
    number = 1
    try:
        for raw in f:
            number += 1
            if not raw.endswith(b"\n"):
                break
            line = raw[:-1].decode("utf-8", "surrogatepass")
            if line.startswith(_END):
                count, _, sum_ = line[len(_END) :].partition("\t")
                if int(count) != len(base) or sum_ != digest.hexdigest() or f.read(1):
                    raise CorruptState("damaged (its checksum or record count does not match)")
                return base
            digest.update(raw)
            path, _, rest = line.partition("\t")
            if not path:
                raise ValueError("empty path")
            if path.startswith('"'):
                path = json.loads(path)
                if not isinstance(path, str):
                    raise ValueError("path is not a string")
            e = shared.get(rest)
            if e is None:
                if len(shared) >= _SHARE_MAX:
                    shared.clear()
                e = shared[rest] = _decode_entry(rest)
            base[sys.intern(path)] = e
    except CorruptState:
        raise
    except (ValueError, KeyError) as e:
        raise CorruptState(f"damaged at line {number} ({e!r})") from None
    raise CorruptState("truncated (its last line is missing)")


def _read_legacy(f: IO[bytes]) -> dict[str, BaseEntry]:
    """Read a format 1 base: one JSON document with every record."""
    data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != LEGACY_FORMAT:
        raise CorruptState("unknown format")
    entries = data.get("entries", {})
    if not isinstance(entries, dict):
        raise CorruptState("damaged (no entries)")
    base: dict[str, BaseEntry] = {}
    for path, rec in entries.items():
        kind, md5, local, remote = rec
        base[sys.intern(path)] = BaseEntry(kind, md5, _legacy_snap(local), _legacy_snap(remote))
    return base


def _legacy_snap(value: list | None) -> Snapshot | None:
    if not value:
        return None
    size, mtime, mode = value
    return (shared_int(size), shared_int(mtime), shared_int(mode))


# -- the store -----------------------------------------------------------------------------


class BaseStore:
    """Load and atomically save the base of one sync pair."""

    def __init__(self, key: str, describe: dict, directory: Path | None = None) -> None:
        self.directory = directory or state_dir() / "bases"
        self.path = self.directory / f"{key}.base"
        self.legacy_path = self.directory / f"{key}.json"
        self.describe = describe

    def load(self) -> dict[str, BaseEntry] | None:
        """Return the base, or None when there is none yet (first sync)."""
        for path, read in ((self.path, read_base), (self.legacy_path, _read_legacy)):
            try:
                with open(path, "rb") as f:
                    return read(f)
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError) as e:  # CorruptState is a ValueError
                raise UsageError(
                    f"cannot read the sync state {path}: {e}; remove it to start over "
                    "(the next sync then treats every difference as new, deleting nothing)"
                ) from e
        return None

    def save(self, base: Mapping[str, BaseEntry]) -> None:
        """Write the base atomically (new file, fsync, rename, fsync the directory)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            write_base(f, self.describe, _sorted_items(base))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # The format 1 file this one replaces, if any. A run killed while saving left
        # its temporary file; the run locks make this run the only writer for the
        # pair, so any other one is an orphan.
        stale = [self.legacy_path, *self.directory.glob(f".{glob.escape(self.path.name)}.*.tmp")]
        for orphan in stale:
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


def _sorted_items(base: Mapping[str, BaseEntry]) -> Iterator[tuple[str, BaseEntry]]:
    for path in sorted(base):
        yield path, base[path]
