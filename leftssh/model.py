"""Values that flow through a run: entries, manifests, actions, plans, problems."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

FILE = "file"
DIR = "dir"


@dataclass(frozen=True, slots=True)
class Entry:
    """One file or directory, as seen on one side at scan time.

    ``mtime`` is whole seconds (SFTP carries no more); ``md5`` is filled only
    when something needed it.
    """

    path: str
    kind: str
    size: int = 0
    mtime: int = 0
    mode: int = 0
    md5: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    def with_md5(self, md5: str | None) -> Entry:
        return replace(self, md5=md5)


@dataclass(frozen=True, slots=True)
class Skipped:
    """An entry not synced by design (symlink, special file, unsafe name)."""

    path: str
    reason: str


@dataclass
class Manifest:
    """What one side holds: entries by relative path, plus what was skipped."""

    entries: dict[str, Entry] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    partials: dict[str, int] = field(default_factory=dict)
    ignore_files: dict[str, bytes] = field(default_factory=dict)
    unreadable: set[str] = field(default_factory=set)
    exists: bool = True

    def under_unreadable(self, path: str) -> bool:
        """Tell whether ``path`` lies in a directory whose listing failed (or is skipped)."""
        if "" in self.unreadable:
            return True
        return any(path == d or path.startswith(d + "/") for d in self.unreadable)

    def file_count(self) -> int:
        return sum(1 for e in self.entries.values() if not e.is_dir)


class Side(str, Enum):
    LOCAL = "local"
    REMOTE = "remote"

    @property
    def other(self) -> Side:
        return Side.REMOTE if self is Side.LOCAL else Side.LOCAL


class Kind(str, Enum):
    """What an action does; the values are the JSON ``action`` names."""

    UPLOAD = "upload"
    DOWNLOAD = "download"
    DELETE_LOCAL = "delete_local"
    DELETE_REMOTE = "delete_remote"
    MKDIR_LOCAL = "mkdir_local"
    MKDIR_REMOTE = "mkdir_remote"
    CONFLICT = "conflict"
    SKIP = "skip"
    VERIFY = "verify"


def transfer_kind(dst: Side) -> Kind:
    return Kind.UPLOAD if dst is Side.REMOTE else Kind.DOWNLOAD


def delete_kind(side: Side) -> Kind:
    return Kind.DELETE_REMOTE if side is Side.REMOTE else Kind.DELETE_LOCAL


def mkdir_kind(side: Side) -> Kind:
    return Kind.MKDIR_REMOTE if side is Side.REMOTE else Kind.MKDIR_LOCAL


@dataclass(frozen=True, slots=True)
class Action:
    """One step of a plan.

    ``source`` is the entry being copied (for transfers and mkdirs); ``expected``
    is what the plan believes the target side holds at ``path`` now (None:
    nothing). Execute re-checks ``expected`` before it overwrites or deletes.
    ``meta_only`` marks a transfer whose content already matches, so only
    mtime and mode are set. For conflicts, ``keep`` names the copy that keeps
    the losing version and ``winner`` the side whose version takes the name.
    """

    kind: Kind
    path: str
    source: Entry | None = None
    expected: Entry | None = None
    meta_only: bool = False
    reason: str = ""
    keep: str = ""
    winner: Side | None = None
    local: Entry | None = None
    remote: Entry | None = None

    @property
    def is_transfer(self) -> bool:
        return self.kind in (Kind.UPLOAD, Kind.DOWNLOAD)

    @property
    def target_side(self) -> Side | None:
        if self.kind in (Kind.UPLOAD, Kind.DELETE_REMOTE, Kind.MKDIR_REMOTE):
            return Side.REMOTE
        if self.kind in (Kind.DOWNLOAD, Kind.DELETE_LOCAL, Kind.MKDIR_LOCAL):
            return Side.LOCAL
        return None


@dataclass
class Plan:
    """Everything a run intends to do, in execution order."""

    actions: list[Action] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    base_current: bool = False
    """Set by a two-way plan when every path is unchanged on both sides since the base:
    the base the run would save is the one it loaded."""


class Status(str, Enum):
    OK = "ok"
    FAILED = "failed"
    PLANNED = "planned"
    SKIPPED = "skipped"


@dataclass
class Outcome:
    """What happened to one action; becomes one JSON line."""

    action: Action
    status: Status
    bytes: int = 0
    resumed_from: int = 0
    verified: str = "none"
    error: str = ""
    reason: str = ""
    result: Entry | None = None


Snapshot = tuple[int, int, int]  # size, whole-second mtime, mode


@dataclass(frozen=True, slots=True)
class BaseEntry:
    """The last agreed state of one path: its kind, content hash, and how each side saw it."""

    kind: str
    md5: str | None = None
    local: Snapshot | None = None
    remote: Snapshot | None = None

    def snap(self, side: Side) -> Snapshot | None:
        return self.local if side is Side.LOCAL else self.remote


def snapshot(e: Entry) -> Snapshot:
    return (e.size, e.mtime, e.mode)


_SHARED: dict[int, int] = {}
_SHARED_MAX = 4096


def shared_int(value: int) -> int:
    """Return an int equal to ``value``: the same object as for the equal values before it.

    Each side's scan and the base hold one mtime and one mode per path, mostly repeated
    values; above 256 each would be its own 32-byte object. The pool is bounded: it
    starts over when full, so distinct values cost no more than without it.
    """
    got = _SHARED.get(value)
    if got is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        _SHARED[value] = got = value
    return got
