"""A directory on this machine: the local side of every sync, and local targets."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from leftssh import lock
from leftssh.errors import ChangedError, SourceChanged, TransferError, UsageError
from leftssh.ignore import IGNORE_FILE, IgnoreRules
from leftssh.model import DIR, FILE, Entry, Manifest, Skipped, shared_int
from leftssh.paths import (
    MAX_NAME_BYTES,
    PARTIAL_SUFFIX,
    STATE_DIR,
    UnsafePath,
    check_name,
    display,
    is_internal,
    join,
)
from leftssh.transport.base import CHUNK, matches

CACHE_FILE = "md5-cache.json"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_PROC_FD = "/proc/self/fd"
_HELD: dict[str, int] = {}
_HELD_LOCK = threading.Lock()


def _open_file(dir_fd: int, name: str, flags: int, mode: int, path: str) -> int:
    """Open the regular file ``name`` in ``dir_fd`` without following a symlink.

    O_NONBLOCK keeps a file swapped for a FIFO after the scan from blocking the open.
    """
    fd = os.open(name, flags | _NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


_IGNORE_MAX = 1 << 20


def md5_file(path: str | Path | int, limit: int | None = None) -> str:
    """Return the MD5 of a local file or open fd (of its first ``limit`` bytes if given)."""
    h = hashlib.md5()
    remaining = limit
    with open(path, "rb", buffering=0, closefd=not isinstance(path, int)) as f:
        while remaining is None or remaining > 0:
            n = CHUNK if remaining is None else min(CHUNK, remaining)
            block = f.read(n)
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
    return h.hexdigest()


def _describe(e: OSError) -> str:
    return e.strerror or str(e)


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class LocalTransport:
    """A share directory on this machine."""

    def __init__(self, root: Path, label: str | None = None) -> None:
        self.root = Path(os.path.abspath(root))
        self.label = label or str(self.root)
        self._cache: dict[str, list] | None = None
        self._cache_dirty = False
        self._lock_path: str | None = None
        self._real_root: str | None = None
        # The directory read_whole last read from: (thread, relative path, fd).
        self._reading: tuple[int, str, int] | None = None
        self._reading_lock = threading.Lock()

    # -- paths -------------------------------------------------------------

    def full(self, path: str) -> str:
        """Return the absolute path of ``path`` (names checked; symlinks are not resolved)."""
        if path:
            for part in path.split("/"):
                check_name(part)
        return os.path.join(self.root, path) if path else str(self.root)

    def _open_dir(self, rel_dir: str) -> int:
        """Open a directory of the share, proven to lie inside the root; return its fd.

        Every read and write then works relative to this fd with O_NOFOLLOW on the last
        name, so a directory swapped for a symlink after the check cannot redirect it:
        the check is on what was opened, not on a path that may change afterwards.
        """
        fd = os.open(self.full(rel_dir), _DIRECTORY)
        if not rel_dir:
            return fd
        try:
            where = os.readlink(f"{_PROC_FD}/{fd}")
        except OSError:
            os.close(fd)
            return self._walk_dir(rel_dir)
        if self._real_root is None:  # resolved once: a root moved later fails safe
            self._real_root = os.path.realpath(self.root).rstrip(os.sep) + os.sep
        if not where.startswith(self._real_root):
            os.close(fd)
            raise UnsafePath(f"{display(rel_dir)}: a parent directory leads outside the share")
        return fd

    def _walk_dir(self, rel_dir: str) -> int:
        """Open ``rel_dir`` one name at a time from the root, refusing symlinks (no /proc)."""
        fd = os.open(self.root, _DIRECTORY)
        try:
            for part in rel_dir.split("/"):
                child = os.open(part, _DIRECTORY | _NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        """Yield (fd of the directory holding ``path``, its last name)."""
        rel_dir, _, name = path.rpartition("/")
        check_name(name)
        fd = self._open_checked_dir(rel_dir, path)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def _open_checked_dir(self, rel_dir: str, path: str) -> int:
        """``_open_dir`` for a path on its way to ``path``, every name checked first."""
        for part in rel_dir.split("/") if rel_dir else ():
            check_name(part)
        try:
            return self._open_dir(rel_dir)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(f"{display(path)}: a parent directory is a symlink") from e
            raise

    def _open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """Open a regular file of the share, following no symlink below the root."""
        with self._parent(path) as (dir_fd, name):
            return _open_file(dir_fd, name, flags, mode, path)

    # -- reading -----------------------------------------------------------

    def root_exists(self) -> bool:
        return self.root.is_dir()

    def ensure_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create {self.root}: {_describe(e)}") from e

    def scan(self, ignore: IgnoreRules) -> Manifest:
        """List the tree under the root, pruning ignored directories."""
        manifest = Manifest()
        if not self.root_exists():
            manifest.exists = False
            return manifest
        rules = ignore.copy()
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                fd = self._open_dir(rel_dir)
            except (OSError, UnsafePath) as e:
                why = _describe(e) if isinstance(e, OSError) else str(e)
                manifest.unreadable.add(rel_dir)
                manifest.skipped.append(Skipped(rel_dir or ".", f"unreadable: {why}"))
                continue
            try:
                # DirEntry.stat() works relative to ``fd``, which stays open meanwhile.
                with os.scandir(fd) as it:
                    children = sorted(it, key=lambda d: d.name)
                for child in children:
                    if child.name == IGNORE_FILE and child.is_file(follow_symlinks=False):
                        data = self._read_ignore(fd, child.name, join(rel_dir, child.name))
                        manifest.ignore_files[rel_dir] = data
                        rules.add_nested(rel_dir, data)
                for child in children:
                    self._scan_one(child, rel_dir, rules, manifest, stack)
            except OSError as e:
                manifest.unreadable.add(rel_dir)
                manifest.skipped.append(Skipped(rel_dir or ".", f"unreadable: {_describe(e)}"))
            finally:
                os.close(fd)
        return manifest

    def _read_ignore(self, dir_fd: int, name: str, rel: str) -> bytes:
        try:
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as f:
                return f.read(_IGNORE_MAX)
        except OSError as e:
            raise UsageError(f"cannot read {rel}: {_describe(e)}") from e

    def _scan_one(
        self,
        child: os.DirEntry,
        rel_dir: str,
        rules: IgnoreRules,
        manifest: Manifest,
        stack: list[str],
    ) -> None:
        name = child.name
        rel = join(rel_dir, name)
        if is_internal(name):
            if name.endswith(PARTIAL_SUFFIX) and child.is_file(follow_symlinks=False):
                manifest.partials[rel] = child.stat(follow_symlinks=False).st_size
            return
        # Most names are short and ASCII: only the others need the full checks.
        if not (name.isascii() and len(name) <= MAX_NAME_BYTES):
            try:
                check_name(name)
                name.encode("utf-8")
            except (UnsafePath, UnicodeEncodeError):
                manifest.skipped.append(Skipped(rel, "unsafe or undecodable name"))
                return
        try:
            st = child.stat(follow_symlinks=False)
        except OSError as e:
            manifest.skipped.append(Skipped(rel, f"vanished: {_describe(e)}"))
            return
        if stat.S_ISLNK(st.st_mode):
            if not rules.is_ignored(rel, False):
                manifest.skipped.append(Skipped(rel, "symlink"))
            return
        if stat.S_ISDIR(st.st_mode):
            if rules.is_ignored(rel, True):
                return
            rel = sys.intern(rel)
            manifest.entries[rel] = Entry(rel, DIR, mtime=shared_int(int(st.st_mtime)))
            stack.append(rel)
            return
        if rules.is_ignored(rel, False):
            return
        if not stat.S_ISREG(st.st_mode):
            manifest.skipped.append(Skipped(rel, "special file"))
            return
        rel = sys.intern(rel)
        manifest.entries[rel] = Entry(
            rel,
            FILE,
            size=st.st_size,
            mtime=shared_int(int(st.st_mtime)),
            mode=shared_int(st.st_mode & 0o777),
        )

    def stat(self, path: str) -> Entry | None:
        try:
            with self._parent(path) as (dir_fd, name):
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as e:
            raise TransferError(f"cannot stat: {_describe(e)}") from e
        if stat.S_ISDIR(st.st_mode):
            return Entry(path, DIR, mtime=int(st.st_mtime))
        if stat.S_ISREG(st.st_mode):
            return Entry(
                path, FILE, size=st.st_size, mtime=int(st.st_mtime), mode=st.st_mode & 0o777
            )
        return Entry(path, "other")

    # -- hashing -----------------------------------------------------------

    def can_hash(self) -> bool:
        return True

    def _load_cache(self) -> dict[str, list]:
        if self._cache is None:
            self._cache = {}
            try:
                with open(self.root / STATE_DIR / CACHE_FILE, encoding="utf-8") as f:
                    data = json.load(f)
                if isinstance(data, dict):
                    self._cache = {k: v for k, v in data.items() if isinstance(v, list)}
            except (OSError, ValueError):
                pass
        return self._cache

    def hash_files(self, paths: list[str]) -> dict[str, str]:
        """Return MD5 by path, from the cache when size, mtime and inode still match."""
        cache = self._load_cache()
        result: dict[str, str] = {}
        for path in paths:
            try:
                fd = self._open(path, os.O_RDONLY)
            except (OSError, UnsafePath):
                continue
            try:
                st = os.fstat(fd)
                key = [st.st_size, st.st_mtime_ns, st.st_ino]
                hit = cache.get(path)
                if hit and hit[:3] == key and isinstance(hit[3], str):
                    result[path] = hit[3]
                    continue
                digest = md5_file(fd)
                st = os.fstat(fd)
                if (st.st_size, st.st_mtime_ns, st.st_ino) == tuple(key) and not is_internal(
                    path.rpartition("/")[2]
                ):
                    cache[path] = [*key, digest]
                    self._cache_dirty = True
                result[path] = digest
            except OSError:
                continue
            finally:
                os.close(fd)
        return result

    def hash_prefix(self, path: str, length: int) -> str | None:
        try:
            fd = self._open(path, os.O_RDONLY)
        except (OSError, UnsafePath):
            return None
        try:
            return md5_file(fd, length)
        except OSError:
            return None
        finally:
            os.close(fd)

    def save_cache(self) -> None:
        """Write the MD5 cache, dropping entries for files that are gone."""
        if not self._cache_dirty or self._cache is None or not self.root_exists():
            return
        state = self.root / STATE_DIR
        try:
            state.mkdir(exist_ok=True)
            tmp = state / f"{CACHE_FILE}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self._cache, f, separators=(",", ":"))
            os.replace(tmp, state / CACHE_FILE)
        except OSError:
            pass
        self._cache_dirty = False

    # -- writing -----------------------------------------------------------

    def read_chunks(
        self, path: str, offset: int, size: int | None = None, mtime: int | None = None
    ) -> Iterator[bytes]:
        fd = self._open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb", buffering=0) as f:
            if offset:
                f.seek(offset)
            remaining = None if size is None else size + 1 - offset
            while remaining is None or remaining > 0:
                block = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not block:
                    break
                if remaining is not None:
                    remaining -= len(block)
                yield block
            if mtime is not None:
                st = os.fstat(fd)
                if int(st.st_mtime) != mtime or (size is not None and st.st_size != size):
                    raise SourceChanged()

    def _reading_dir(self, rel_dir: str) -> tuple[int, bool]:
        """The fd of ``rel_dir`` for read_whole, and whether it stays open (cached).

        Small files come in path order, many from one directory: that directory is
        opened (and proven to lie inside the share) once, not per file. The open fd
        pins the directory it checked, so a later swap for a symlink cannot redirect
        the reads. One thread keeps the cached fd; others get one of their own.
        """
        me = threading.get_ident()
        cached = self._reading
        if cached is not None and cached[0] == me and cached[1] == rel_dir:
            return cached[2], True
        fd = self._open_checked_dir(rel_dir, rel_dir)
        with self._reading_lock:
            cached = self._reading
            if cached is not None and cached[0] != me:
                return fd, False
            self._reading = (me, rel_dir, fd)
        if cached is not None:
            os.close(cached[2])
        return fd, True

    def read_whole(self, path: str, limit: int) -> tuple[bytes, int, int]:
        """Read up to ``limit`` bytes of a small file in one go.

        Returns (data, size, whole-second mtime), the last two taken from the open
        file after the read, so a file that changed while it was read is noticed.
        """
        check_name(path.rpartition("/")[2])
        rel_dir, _, name = path.rpartition("/")
        dir_fd, keep = self._reading_dir(rel_dir)
        try:
            fd = _open_file(dir_fd, name, os.O_RDONLY, 0o600, path)
        finally:
            if not keep:
                os.close(dir_fd)
        try:
            parts: list[bytes] = []
            have = 0
            while True:
                block = os.read(fd, limit - have) if have < limit else b""
                parts.append(block)
                have += len(block)
                st = os.fstat(fd)
                # Stop at the end, without a read just to meet it: fstat tells the size.
                if not block or have >= limit or have == st.st_size:
                    break
        finally:
            os.close(fd)
        return b"".join(parts), st.st_size, int(st.st_mtime)

    def open_write(
        self,
        path: str,
        offset: int,
        attrs: tuple[int, int] | None = None,
        follow: bool = False,
    ) -> BinaryIO:
        # ``follow`` needs nothing here: the executor hashes what it writes locally.
        if offset:
            fd = self._open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        else:
            # A fresh partial is created exclusively; whatever holds its (predictable) name,
            # an old partial or a planted symlink, is removed rather than written through.
            try:
                fd = self._open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self.remove_partial(path)
                fd = self._open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if offset:  # a fresh partial is empty already
                # A resumed one loses what lies past the proven prefix. Never cut to
                # 0: ext4 then writes the whole file out at close (its auto_da_alloc,
                # meant for files rewritten in place), which kept close() of a 500 MB
                # download busy for 0.3 s.
                os.ftruncate(fd, offset)
                os.lseek(fd, offset, os.SEEK_SET)
        except OSError:
            os.close(fd)
            raise
        return os.fdopen(fd, "wb")

    def write_whole(self, path: str, data: bytes | memoryview, attrs: tuple[int, int]) -> None:
        """Create the partial ``path`` holding ``data``, with (mtime, mode) ``attrs``.

        As :meth:`open_write` at offset 0 and :meth:`set_attrs` would, with the
        directory opened once. A partial that could not be written whole is removed.
        """
        mtime, mode = attrs
        ns = mtime * 1_000_000_000
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with self._parent(path) as (dir_fd, name):
            try:
                fd = _open_file(dir_fd, name, flags, 0o600, path)
            except FileExistsError:  # an old partial, or a planted symlink: removed
                os.unlink(name, dir_fd=dir_fd)
                fd = _open_file(dir_fd, name, flags, 0o600, path)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode & 0o777)
                os.utime(fd, ns=(ns, ns))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
                raise
            try:
                os.close(fd)
            except OSError:  # not written whole after all (NFS, quota): not kept
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
                raise

    def rename_new(self, pairs: list[tuple[str, str]]) -> dict[str, Exception]:
        """Rename each partial to a name that held nothing at the scan, never replacing
        one, as :meth:`commit` does, each directory opened once. A taken name is a
        ChangedError; a file system without hard links leaves the pair to ``commit``."""
        failed: dict[str, Exception] = {}
        by_dir: dict[str, list[tuple[str, str]]] = {}
        for partial, path in pairs:
            by_dir.setdefault(partial.rpartition("/")[0], []).append((partial, path))
        for rel_dir, group in by_dir.items():
            try:
                fd = self._open_checked_dir(rel_dir, group[0][1])
            except (OSError, TransferError) as e:
                for partial, _ in group:
                    failed[partial] = e if isinstance(e, TransferError) else TransferError(str(e))
                continue
            try:
                for partial, path in group:
                    src, dst = partial.rpartition("/")[2], path.rpartition("/")[2]
                    if path.rpartition("/")[0] != rel_dir:
                        failed[partial] = TransferError("not in the partial's directory")
                        continue
                    try:
                        check_name(src)
                        check_name(dst)
                        os.link(src, dst, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                    except FileExistsError:
                        failed[partial] = ChangedError("appeared since the scan; not overwritten")
                        continue
                    except TransferError as e:
                        failed[partial] = e
                        continue
                    except OSError as e:  # commit() tells "no hard links here" from the rest
                        failed[partial] = TransferError(f"rename into place: {_describe(e)}")
                        continue
                    try:
                        os.unlink(src, dir_fd=fd)
                    except OSError as e:  # as commit() would leave it: the new name goes
                        with contextlib.suppress(OSError):
                            os.unlink(dst, dir_fd=fd)
                        failed[partial] = TransferError(f"rename into place: {_describe(e)}")
            finally:
                os.close(fd)
        return failed

    def set_attrs(self, path: str, mtime: int, mode: int) -> None:
        ns = mtime * 1_000_000_000
        with self._parent(path) as (dir_fd, name):
            try:
                flags = os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                fd = os.open(name, flags, dir_fd=dir_fd)
            except PermissionError:  # unreadable to us (mode 0o000): by name, not followed
                if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    raise ChangedError("no longer a regular file") from None
                os.chmod(name, mode & 0o777, dir_fd=dir_fd)
                os.utime(name, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=False)
                return
            try:
                os.fchmod(fd, mode & 0o777)
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)

    def commit(self, partial: str, path: str, expected: Entry | None) -> None:
        """Rename the partial over ``path`` unless ``path`` changed since the scan."""
        with self._parent(partial) as (src_fd, src), self._parent(path) as (dst_fd, dst):
            at = {"src_dir_fd": src_fd, "dst_dir_fd": dst_fd}
            if expected is None:
                try:
                    os.link(src, dst, **at, follow_symlinks=False)
                except FileExistsError as e:
                    raise ChangedError("appeared since the scan; not overwritten") from e
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    if _lexists(dst, dst_fd):
                        raise ChangedError("appeared since the scan; not overwritten") from e
                    os.replace(src, dst, **at)
                    return
                os.unlink(src, dir_fd=src_fd)
                return
            if not matches(self.stat(path), expected):
                raise ChangedError("changed since the scan; not overwritten")
            os.replace(src, dst, **at)

    def mkdir(self, path: str) -> None:
        with self._parent(path) as (dir_fd, name):
            try:
                os.mkdir(name, 0o755, dir_fd=dir_fd)
            except FileExistsError:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise ChangedError("a non-directory is in the way") from None

    def remove(self, path: str, expected: Entry | None) -> None:
        found = self.stat(path)
        if found is None:
            return
        if expected is not None and not matches(found, expected):
            raise ChangedError("changed since the scan; not deleted")
        with self._parent(path) as (dir_fd, name):
            if found.is_dir:
                try:
                    os.rmdir(name, dir_fd=dir_fd)
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise TransferError(
                            "directory not empty (holds ignored or new files)"
                        ) from e
                    raise
            else:
                os.unlink(name, dir_fd=dir_fd)

    def remove_partial(self, path: str) -> None:
        try:
            with self._parent(path) as (dir_fd, name):
                os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass

    def rename_aside(self, path: str, new_path: str, expected: Entry | None) -> None:
        if not matches(self.stat(path), expected):
            raise ChangedError("changed since the scan; not moved")
        with self._parent(path) as (src_fd, src), self._parent(new_path) as (dst_fd, dst):
            if _lexists(dst, dst_fd):
                raise ChangedError(f"{new_path} already exists")
            os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)

    # -- locking -----------------------------------------------------------

    def acquire_lock(self, command: str) -> None:
        """Take this share's run lock or raise LockError naming the holder.

        Several targets of one run (``push A B C``) share the local lock.
        """
        path = os.path.join(self.root, lock.LOCK_NAME)
        with _HELD_LOCK:
            if _HELD.get(path):
                _HELD[path] += 1
                self._lock_path = path
                return
            self._take_lock(path, command)
            _HELD[path] = 1

    def _take_lock(self, path: str, command: str) -> None:
        def create(data: bytes) -> bool:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
            except FileExistsError:
                return False
            except OSError as e:
                raise UsageError(f"cannot lock {self.label}: {_describe(e)}") from e
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True

        def read() -> tuple[bytes, float] | None:
            try:
                with open(path, "rb") as f:
                    return f.read(4096), os.lstat(path).st_mtime
            except FileNotFoundError:
                return None

        def remove() -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

        lock.take(create, read, remove, self.label, command)
        self._lock_path = path

    def touch_lock(self) -> None:
        if self._lock_path:
            os.utime(self._lock_path)

    def release_lock(self) -> None:
        if not self._lock_path:
            return
        with _HELD_LOCK:
            _HELD[self._lock_path] = _HELD.get(self._lock_path, 1) - 1
            if _HELD[self._lock_path] <= 0:
                del _HELD[self._lock_path]
                try:
                    os.unlink(self._lock_path)
                except OSError:
                    pass
        self._lock_path = None

    def close(self) -> None:
        self.release_lock()
        self.save_cache()
        with self._reading_lock:
            reading, self._reading = self._reading, None
        if reading is not None:
            os.close(reading[2])
