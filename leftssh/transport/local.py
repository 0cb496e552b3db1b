"""A directory on this machine: the local side of every sync, and local targets."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from leftssh import lock
from leftssh.errors import ChangedError, LockError, TransferError, UsageError
from leftssh.ignore import IGNORE_FILE, IgnoreRules
from leftssh.model import DIR, FILE, Entry, Manifest, Skipped
from leftssh.paths import PARTIAL_SUFFIX, STATE_DIR, UnsafePath, check_name, is_internal, join
from leftssh.transport.base import CHUNK, matches

CACHE_FILE = "md5-cache.json"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_HELD: dict[str, int] = {}
_HELD_LOCK = threading.Lock()
_IGNORE_MAX = 1 << 20


def md5_file(path: str | Path, limit: int | None = None) -> str:
    """Return the MD5 of a local file (of its first ``limit`` bytes if given)."""
    h = hashlib.md5()
    remaining = limit
    with open(path, "rb", buffering=0) as f:
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


class LocalTransport:
    """A share directory on this machine."""

    md5_method = "md5"

    def __init__(self, root: Path, label: str | None = None) -> None:
        self.root = Path(os.path.abspath(root))
        self.label = label or str(self.root)
        self._stat_keys: dict[str, tuple[int, int, int]] = {}
        self._cache: dict[str, list] | None = None
        self._cache_dirty = False
        self._lock_path: str | None = None

    # -- paths -------------------------------------------------------------

    def full(self, path: str) -> str:
        """Return the absolute path of ``path``, refusing anything that escapes the root."""
        if path:
            for part in path.split("/"):
                check_name(part)
        full = os.path.join(self.root, path) if path else str(self.root)
        parent = os.path.dirname(full) if path else full
        real_root = os.path.realpath(self.root)
        real_parent = os.path.realpath(parent)
        if real_parent != real_root and not real_parent.startswith(real_root + os.sep):
            raise UnsafePath(f"{path}: a parent directory leads outside the share")
        return full

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
            directory = os.path.join(self.root, rel_dir) if rel_dir else str(self.root)
            try:
                with os.scandir(directory) as it:
                    children = sorted(it, key=lambda d: d.name)
            except OSError as e:
                manifest.unreadable.add(rel_dir)
                manifest.skipped.append(Skipped(rel_dir or ".", f"unreadable: {_describe(e)}"))
                continue
            for child in children:
                if child.name == IGNORE_FILE and child.is_file(follow_symlinks=False):
                    data = self._read_ignore(child.path, join(rel_dir, child.name))
                    manifest.ignore_files[rel_dir] = data
                    rules.add_nested(rel_dir, data)
            for child in children:
                self._scan_one(child, rel_dir, rules, manifest, stack)
        return manifest

    def _read_ignore(self, full: str, rel: str) -> bytes:
        try:
            with open(full, "rb") as f:
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
            manifest.entries[rel] = Entry(rel, DIR, mtime=int(st.st_mtime))
            stack.append(rel)
            return
        if rules.is_ignored(rel, False):
            return
        if not stat.S_ISREG(st.st_mode):
            manifest.skipped.append(Skipped(rel, "special file"))
            return
        manifest.entries[rel] = Entry(
            rel, FILE, size=st.st_size, mtime=int(st.st_mtime), mode=st.st_mode & 0o777
        )
        self._stat_keys[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)

    def stat(self, path: str) -> Entry | None:
        try:
            st = os.lstat(self.full(path))
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
                full = self.full(path)
                st = os.lstat(full)
                key = [st.st_size, st.st_mtime_ns, st.st_ino]
                hit = cache.get(path)
                if hit and hit[:3] == key and isinstance(hit[3], str):
                    result[path] = hit[3]
                    continue
                digest = md5_file(full)
                if (st.st_size, st.st_mtime_ns, st.st_ino) == tuple(key) and not is_internal(
                    path.rpartition("/")[2]
                ):
                    cache[path] = [*key, digest]
                    self._cache_dirty = True
                result[path] = digest
            except (OSError, UnsafePath):
                continue
        return result

    def hash_prefix(self, path: str, length: int) -> str | None:
        try:
            return md5_file(self.full(path), length)
        except (OSError, UnsafePath):
            return None

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

    def read_chunks(self, path: str, offset: int) -> Iterator[bytes]:
        fd = os.open(self.full(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb", buffering=0) as f:
            if offset:
                f.seek(offset)
            while True:
                block = f.read(CHUNK)
                if not block:
                    return
                yield block

    def open_write(self, path: str, offset: int) -> BinaryIO:
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.full(path), flags, 0o600)
        try:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        except OSError:
            os.close(fd)
            raise
        return os.fdopen(fd, "wb")

    def set_attrs(self, path: str, mtime: int, mode: int) -> None:
        full = self.full(path)
        os.chmod(full, mode & 0o777)
        ns = mtime * 1_000_000_000
        os.utime(full, ns=(ns, ns), follow_symlinks=False)

    def commit(self, partial: str, path: str, expected: Entry | None) -> None:
        """Rename the partial over ``path`` unless ``path`` changed since the scan."""
        src, dst = self.full(partial), self.full(path)
        if expected is None:
            try:
                os.link(src, dst, follow_symlinks=False)
            except FileExistsError as e:
                raise ChangedError("appeared since the scan; not overwritten") from e
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if os.path.lexists(dst):
                    raise ChangedError("appeared since the scan; not overwritten") from e
                os.replace(src, dst)
                return
            os.unlink(src)
            return
        if not matches(self.stat(path), expected):
            raise ChangedError("changed since the scan; not overwritten")
        os.replace(src, dst)

    def mkdir(self, path: str) -> None:
        try:
            os.mkdir(self.full(path), 0o755)
        except FileExistsError:
            if not os.path.isdir(self.full(path)) or os.path.islink(self.full(path)):
                raise ChangedError("a non-directory is in the way") from None

    def remove(self, path: str, expected: Entry | None) -> None:
        found = self.stat(path)
        if found is None:
            return
        if expected is not None and not matches(found, expected):
            raise ChangedError("changed since the scan; not deleted")
        if found.is_dir:
            try:
                os.rmdir(self.full(path))
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise TransferError("directory not empty (holds ignored or new files)") from e
                raise
        else:
            os.unlink(self.full(path))

    def remove_partial(self, path: str) -> None:
        try:
            os.unlink(self.full(path))
        except FileNotFoundError:
            pass

    def rename_aside(self, path: str, new_path: str, expected: Entry | None) -> None:
        if not matches(self.stat(path), expected):
            raise ChangedError("changed since the scan; not moved")
        dst = self.full(new_path)
        if os.path.lexists(dst):
            raise ChangedError(f"{new_path} already exists")
        os.rename(self.full(path), dst)

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
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
            except FileExistsError:
                try:
                    with open(path, "rb") as f:
                        info = lock.decode(f.read(4096))
                    age = time.time() - os.lstat(path).st_mtime
                except FileNotFoundError:
                    continue
                if lock.is_stale(info, age):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                    continue
                raise LockError(lock.describe(info, self.label)) from None
            except OSError as e:
                raise UsageError(f"cannot lock {self.label}: {_describe(e)}") from e
            with os.fdopen(fd, "wb") as f:
                f.write(lock.encode(lock.holder_info(command)))
            self._lock_path = path
            return
        raise LockError(f"{self.label}: could not take the lock")

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
