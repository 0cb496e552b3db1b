"""Relative share paths: validation, leftssh's own files, safe display."""

from __future__ import annotations

import hashlib
import re

from leftssh.errors import TransferError

PARTIAL_SUFFIX = ".leftpart"
STATE_DIR = ".leftssh"
MAX_NAME_BYTES = 255

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class UnsafePath(TransferError):
    """A path from a peer or a listing that must not be used."""


def is_internal(name: str) -> bool:
    """Tell whether a single name is one of leftssh's own files (never synced)."""
    if name == ".leftignore":
        return False
    return name.startswith(".left") or "leftssh" in name or name.endswith(PARTIAL_SUFFIX)


def check_name(name: str) -> str:
    """Return ``name`` if it is a usable single path component, else raise UnsafePath."""
    if not name or name in (".", ".."):
        raise UnsafePath(f"invalid name {display(name)}")
    if "/" in name or "\x00" in name:
        raise UnsafePath(f"name contains '/' or NUL: {display(name)}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UnsafePath(f"name longer than {MAX_NAME_BYTES} bytes: {display(name)}")
    return name


def join(parent: str, name: str) -> str:
    """Join a relative directory path ('' for the root) and a name."""
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    """Return the relative parent directory ('' for the root)."""
    return path.rpartition("/")[0]


def is_under(path: str, roots: set[str]) -> bool:
    """Tell whether ``path`` is one of ``roots`` or lies below one of them."""
    while path and roots:
        if path in roots:
            return True
        path = parent_of(path)
    return False


def depth(path: str) -> int:
    """Number of components in a relative path."""
    return path.count("/") + 1


def partial_name(path: str, tag: str) -> str:
    """Return the relative path of the partial file for ``path`` at source version ``tag``."""
    parent, _, name = path.rpartition("/")
    candidate = f".{name}.{tag}{PARTIAL_SUFFIX}"
    if len(candidate.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        digest = hashlib.md5(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        candidate = f".{digest}.{tag}{PARTIAL_SUFFIX}"
    return join(parent, candidate)


def version_tag(size: int, mtime: int) -> str:
    """Return a short tag that ties a partial file to one version of its source."""
    return hashlib.md5(f"{size}:{mtime}".encode()).hexdigest()[:10]


def display(path: str) -> str:
    """Return ``path`` safe for a terminal: control characters and bad bytes escaped."""
    text = path.encode("utf-8", "backslashreplace").decode("utf-8", "replace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
