"""The interface both sides of a sync implement, and the optional capabilities of some."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from typing import BinaryIO, Protocol, runtime_checkable

from leftssh.ignore import IgnoreRules
from leftssh.model import Entry, Manifest

CHUNK = 1 << 20


class HashUnavailable(Exception):
    """This side cannot compute MD5 (an SFTP-only peer)."""


class Transport(Protocol):
    """A directory tree on one side, addressed by relative posix paths.

    Implementations translate their own exceptions: per-file failures raise
    ``TransferError`` (or OSError for local I/O), connection failures raise
    ``LeftsshError`` subclasses.
    """

    label: str

    def root_exists(self) -> bool: ...

    def ensure_root(self) -> None: ...

    def scan(self, ignore: IgnoreRules) -> Manifest: ...

    def stat(self, path: str) -> Entry | None: ...

    def can_hash(self) -> bool: ...

    def hash_files(self, paths: list[str]) -> dict[str, str]: ...

    def hash_prefix(self, path: str, length: int) -> str | None: ...

    def open_write(
        self,
        path: str,
        offset: int,
        attrs: tuple[int, int] | None = None,
        follow: bool = False,
    ) -> BinaryIO:
        """Open the partial ``path`` for writing at ``offset``.

        ``attrs`` (mtime, mode) are set when it is closed. ``follow`` asks the receiving
        side to hash the file while it is written, if it can: the returned writer's
        ``md5`` attribute then holds that hash after ``close`` (None: not available).
        """
        ...

    def read_chunks(
        self, path: str, offset: int, size: int | None = None, mtime: int | None = None
    ) -> Iterator[bytes | memoryview]:
        """Yield the file's bytes from ``offset`` (bytes, or views of what arrived).

        With ``size`` (what the scan saw), stop one byte past it: a source that grew, or a
        peer whose fstat lies, is caught without reading on. With ``mtime`` too (the
        scan's, whole seconds), the open file's own size and mtime are checked once its
        bytes are read: a file changed while it was read raises SourceChanged.
        """
        ...

    def set_attrs(self, path: str, mtime: int, mode: int) -> None: ...

    def commit(self, partial: str, path: str, expected: Entry | None) -> None: ...

    def mkdir(self, path: str) -> None: ...

    def remove(self, path: str, expected: Entry | None) -> None: ...

    def remove_partial(self, path: str) -> None: ...

    def rename_aside(self, path: str, new_path: str, expected: Entry | None) -> None: ...

    def acquire_lock(self, command: str) -> None: ...

    def touch_lock(self) -> None: ...

    def release_lock(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class PipelinedUploads(Protocol):
    """What a transport offers to receive many small files in one request pipeline."""

    def put_files(
        self, items: Iterable[tuple[str, bytes, tuple[int, int]]]
    ) -> Callable[[], dict[str, Exception]]:
        """Create and fill each (partial path, content, (mtime, mode)).

        Returns once every item is sent; the returned function waits until the
        last partial is in place and returns the failures by partial path (those
        are retried one by one). It must be called, once."""
        ...

    def wire_size(self, name: str, size: int) -> int:
        """About how many bytes ``put_files`` sends for a file (its data and framing),
        for ``--bwlimit``; known once ``put_files`` has started taking items."""
        ...


@runtime_checkable
class WarmsUp(Protocol):
    """What a transport offers to get ready, in the background, for the first copy."""

    def warm_up(self, hashes: bool) -> None:
        """Start what a copy will wait for (returns at once; errors come later, if at all);
        ``hashes``: the copies will be verified by MD5."""
        ...


@runtime_checkable
class ManyDirs(Protocol):
    """What a transport offers to make many directories with their requests in flight."""

    def make_dirs(self, paths: list[str]) -> dict[str, Exception]:
        """Make each directory (parents listed before their children), as ``mkdir``
        would; return the failures by path (ChangedError: a non-directory is there)."""
        ...


@runtime_checkable
class ManyStats(Protocol):
    """What a transport offers to look at many paths with their requests in flight."""

    def stat_many(self, paths: list[str]) -> dict[str, Entry | None]:
        """What ``stat`` would say of each path (None: missing); raises what ``stat``
        would raise for the first path that could not be looked at."""
        ...


@runtime_checkable
class PipelinedDownloads(Protocol):
    """What a transport offers to send many small files in one request pipeline."""

    def get_files(
        self, items: Iterable[tuple[str, int]]
    ) -> Generator[tuple[str, bytes | Exception, int, int], None, None]:
        """Read each (path, size the listing gave), at most one byte past that size.

        Yields, in the order given, (path, data, size, whole-second mtime) as the
        open file has them, or (path, error, -1, -1); a failed file is retried one
        by one. Closing the iterator early closes every file still open."""
        ...


@runtime_checkable
class ManyRenames(Protocol):
    """What a transport offers to give many partials their new names at once."""

    def rename_new(self, pairs: list[tuple[str, str]]) -> dict[str, Exception]:
        """Rename each partial to a name that held nothing at the scan, never replacing
        one; return the failures by partial path. A ChangedError (the name was taken
        since) or a RenameRefused is final; any other failure is worth one more try
        by ``commit``, which tells a name taken since the scan apart from the rest."""
        ...

    def remove_partial(self, path: str) -> None:
        """Remove a partial file (no error if it is gone)."""
        ...


@runtime_checkable
class WholeWrites(Protocol):
    """What a transport offers to write a small file in one call."""

    def write_whole(self, path: str, data: bytes | memoryview, attrs: tuple[int, int]) -> None:
        """Create the partial ``path`` holding ``data``, with (mtime, mode) ``attrs``."""
        ...


@runtime_checkable
class WholeReads(Protocol):
    """What a transport offers to read a small file in one call."""

    def read_whole(self, path: str, limit: int) -> tuple[bytes, int, int]:
        """Return (up to ``limit`` bytes, size, whole-second mtime) of the open file."""
        ...


def matches(found: Entry | None, expected: Entry | None) -> bool:
    """Tell whether what is on disk now is what the plan expected to find."""
    if expected is None or found is None:
        return expected is None and found is None
    if expected.is_dir or found.is_dir:
        return expected.kind == found.kind
    return (
        found.kind == expected.kind
        and found.size == expected.size
        and (found.mtime == expected.mtime)
    )
