"""Tar archives of small files, for the peer's GNU tar to unpack (pure code).

Many small uploads cost several SFTP requests each, and the peer's SFTP server
answers one request at a time. When the peer has GNU tar, the files of one
directory travel instead as one archive (an SFTP upload like any other file) that
``tar`` unpacks in that directory (see :func:`leftssh.transport.remote_shell.unpack_script`).

The archives use GNU tar's own format: 512-byte headers with the ``ustar  `` magic,
a ``././@LongLink`` record before a member whose name is longer than 100 bytes, and
the data padded to whole blocks. Members are regular files named without a
directory part; owner and group are 0 (the peer unpacks with ``--no-same-owner``).
"""

from __future__ import annotations

BLOCK = 512
END = bytes(2 * BLOCK)
"""Two zero blocks: the end of an archive."""

MAX_NAME = 100  # bytes of a name that fit in the header itself
MAX_MTIME = 8**11 - 1  # 11 octal digits
MAX_SIZE = 8**11 - 1

_MAGIC = b"ustar  \x00"  # GNU: "ustar", two spaces, NUL
_LONG_NAME = b"././@LongLink"


_TAIL = bytes(100) + _MAGIC + bytes(BLOCK - 265)  # linkname, magic, the rest unused
_CONSTANT_SUM = 8 * 32 + sum(_MAGIC)  # the checksum field as spaces, and the magic


def _header(name: bytes, size: int, mtime: int, mode: int, kind: bytes) -> bytes:
    numbers = b"%07o\x000000000\x000000000\x00%011o\x00%011o\x00" % (mode, size, mtime)
    checksum = _CONSTANT_SUM + sum(name) + sum(numbers) + kind[0]
    return b"".join((name, bytes(100 - len(name)), numbers, b"%06o\x00 " % checksum, kind, _TAIL))


def _padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def member(name: bytes, data: bytes, mtime: int, mode: int) -> list[bytes]:
    """Return the pieces of one regular-file member: header(s), data, padding.

    ``name`` is a single path component (no ``/``, no NUL, not empty); ``mode`` is
    masked to its permission bits. Raises ValueError for what a member cannot hold.
    """
    if not name or b"/" in name or b"\x00" in name or name in (b".", b".."):
        raise ValueError(f"not a plain file name: {name!r}")
    if not 0 <= mtime <= MAX_MTIME:
        raise ValueError(f"mtime out of the tar range: {mtime}")
    if len(data) > MAX_SIZE:
        raise ValueError("file too large for a tar member")
    pieces: list[bytes] = []
    if len(name) > MAX_NAME:
        long = name + b"\x00"
        pieces += (_header(_LONG_NAME, len(long), 0, 0, b"L"), long, _padding(len(long)))
        name = name[:MAX_NAME]
    pieces += (_header(name, len(data), mtime, mode & 0o777, b"0"), data, _padding(len(data)))
    return pieces


def member_size(name_bytes: int, size: int) -> int:
    """Bytes :func:`member` makes of a name of ``name_bytes`` bytes and ``size`` bytes of data."""
    total = BLOCK + size + (-size % BLOCK)
    if name_bytes > MAX_NAME:
        total += BLOCK + name_bytes + 1 + (-(name_bytes + 1) % BLOCK)
    return total
