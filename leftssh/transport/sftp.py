"""The SSH peer: paramiko's SFTP for files, exec channels for batched MD5.

This is the only module that imports paramiko; every paramiko or socket
exception is translated here into a ``LeftsshError`` (stops the run) or a
``TransferError`` (one file fails, the run goes on).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import posixpath
import queue
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO, NoReturn

import paramiko
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSETSTAT,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_LSTAT,
    CMD_MKDIR,
    CMD_NAME,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_REALPATH,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_SETSTAT,
    CMD_STATUS,
    CMD_WRITE,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_EXCL,
    SFTP_FLAG_READ,
    SFTP_FLAG_WRITE,
    int64,
)

from leftssh import lock
from leftssh.errors import (
    AuthError,
    ChangedError,
    ConnectError,
    HostKeyError,
    LeftsshError,
    RenameRefused,
    SourceChanged,
    TransferError,
    UsageError,
)
from leftssh.ignore import IGNORE_FILE, IgnoreRules
from leftssh.model import DIR, FILE, Entry, Manifest, Skipped, shared_int
from leftssh.paths import (
    MAX_NAME_BYTES,
    PARTIAL_SUFFIX,
    UnsafePath,
    check_name,
    display,
    is_internal,
    join,
)
from leftssh.target import SshSettings
from leftssh.transport import remote_shell, tar
from leftssh.transport.base import HashUnavailable, matches

WINDOW_SIZE = 64 << 20
MAX_PACKET = 32768  # OpenSSH sends at most 32 KiB per channel packet whatever we offer
# READ/WRITE request sizes: 32 KiB works everywhere (paramiko's own choice); a peer
# that answers limits@openssh.com (OpenSSH 8.7+: 255 KiB) gets bigger requests,
# which cuts the Python work per byte (requests, responses, buffer joins) ~8 times.
DEFAULT_REQUEST = 32768
MAX_REQUEST = 255 * 1024
READ_AHEAD = 4 << 20  # bytes of READ requests in flight
WRITE_AHEAD = 8 << 20  # bytes of WRITE requests not yet acknowledged
_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
_HASH_BATCH = 2000
FOLLOW_STEP = 16 << 20  # acknowledged bytes between two range requests to the follower
PIPELINE_REQUESTS = 256  # requests in flight when many small files are written or renamed
PIPELINE_BYTES = 8 << 20  # bytes of small files in flight
_LIST_AHEAD = 32  # directories listed ahead of the scan
ARCHIVE_BYTES = 1 << 20  # file bytes per archive of small files
ARCHIVE_FILES = 1000  # files per archive
SHELL_RENAMES = 64  # new names given at once by the peer's perl, when it has one
# link(2) errors of a file system without hard links, and a chunk that did not finish
_LINK_UNSUPPORTED = {"EPERM", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EXDEV", "?"}


class _Chunks:
    """The bytes waiting in a channel, kept as the pieces that came in.

    Stands in for the ``array`` of paramiko's BufferedPipe (:class:`_ChunkPipe`):
    taking bytes from the front hands out a whole piece as it is, where the array
    copied them out and then moved everything behind them forward.
    """

    __slots__ = ("_pieces", "_size")

    def __init__(self) -> None:
        self._pieces: collections.deque[bytes | memoryview] = collections.deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def frombytes(self, data: bytes) -> None:
        if data:
            self._pieces.append(data)
            self._size += len(data)

    def take(self, limit: int | None = None) -> bytes | memoryview:
        """Remove and return up to ``limit`` bytes (all with None) from the front.

        A piece that is split stays a view of the bytes that came in (nothing is
        copied to split it); what is returned is such a view or bytes.
        """
        pieces = self._pieces
        if not pieces:
            return b""
        first = pieces[0]
        if limit is not None and len(first) >= limit:
            if len(first) == limit:
                pieces.popleft()
            else:
                view = first if isinstance(first, memoryview) else memoryview(first)
                pieces[0] = view[limit:]
                first = view[:limit]
            self._size -= len(first)
            return first
        got = [pieces.popleft()]
        have = len(first)
        while pieces and (limit is None or have + len(pieces[0]) <= limit):
            piece = pieces.popleft()
            got.append(piece)
            have += len(piece)
        self._size -= have
        return got[0] if len(got) == 1 else b"".join(got)


class _ChunkPipe(BufferedPipe):
    """paramiko's channel input buffer, without copying the bytes it holds on each read.

    A read returns whole pieces as the transport fed them (at most ``nbytes``);
    paramiko's own pipe copied them out of an array and moved the rest of the array
    forward, once per read, which for a large download was most of the copying.
    """

    def __init__(self) -> None:
        super().__init__()
        self._buffer = _Chunks()  # type: ignore[assignment]

    def read(self, nbytes: int, timeout: float | None = None) -> bytes | memoryview:
        with self._cv:
            while len(self._buffer) == 0:
                if self._closed:
                    return b""
                if timeout == 0.0:
                    raise PipeTimeout()
                then = time.monotonic()
                self._cv.wait(timeout)
                if timeout is not None:
                    timeout -= time.monotonic() - then
                    if timeout <= 0.0 and len(self._buffer) == 0:
                        raise PipeTimeout()
            out = self._buffer.take(nbytes)  # type: ignore[attr-defined]
            if len(self._buffer) == 0 and self._event is not None and not self._closed:
                self._event.clear()
            return out

    def empty(self) -> bytes:
        with self._cv:
            out = bytes(self._buffer.take())  # type: ignore[attr-defined]
            if self._event is not None and not self._closed:
                self._event.clear()
            return out


class _SFTPClient(paramiko.SFTPClient):
    """paramiko's SFTP client, copying the bytes of large requests and answers less.

    paramiko's ``_read_all`` grew a bytes object by ``+=`` once per channel read
    (a 255 KiB answer comes in 32 KiB packets: it was copied about eight times)
    and ``_read_packet`` copied it once more to drop the type byte. On the way
    out, a request was written into a message, copied out of it, copied behind
    its header, and what the channel had not taken yet was copied again after
    each channel packet. Here an answer is joined once from its pieces, and a
    request is joined once and handed to the channel as views.
    """

    def _async_request(self, fileobj: object, t: int, *args: object) -> int:
        with self._lock:
            num = self.request_number
            self._expecting[num] = fileobj
            self.request_number += 1
        self._write_all(b"".join(_request(t, num, args)))
        return num

    def _write_all(self, out: bytes) -> None:
        if len(out) <= MAX_PACKET:  # one channel packet: handed on as it is
            while out:
                n = self.sock.send(out)
                if n <= 0:
                    raise EOFError()
                out = out[n:]
            return
        view = memoryview(out)
        while view:
            n = self.sock.send(view)
            if n <= 0:
                raise EOFError()
            view = view[n:]

    def _read_all(self, n: int) -> bytes:
        chan = self.sock
        parts = []
        while n > 0:
            x = chan.recv(n)
            if not x:
                raise EOFError()
            parts.append(x)
            n -= len(x)
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)

    def _read_response(
        self, waitfor: int | None = None
    ) -> tuple[int, paramiko.Message] | tuple[None, None]:
        """paramiko's, with each answer read as an :class:`_Answer`."""
        while True:
            try:
                t, data = self._read_packet()
            except EOFError as e:
                raise paramiko.SSHException(f"Server connection dropped: {e}") from e
            msg = _Answer(data)
            num = msg.get_int()
            with self._lock:
                if num not in self._expecting:
                    # an answer to a request given up (a file closed before it came)
                    if waitfor is None:
                        break
                    continue
                fileobj = self._expecting.pop(num)
            if num == waitfor:
                if t == CMD_STATUS:
                    self._convert_status(msg)
                return t, msg
            if fileobj is not type(None):
                fileobj._async_response(t, msg, num)
            if waitfor is None:
                break
        return None, None

    def _read_packet(self) -> tuple[int, bytes]:
        (size,) = _U32.unpack(self._read_all(4))
        if size >= _MAX_ANSWER:
            raise paramiko.SFTPError("Garbage packet received")
        if size == 0:
            return 0, b""
        t = self._read_all(1)[0]
        return t, self._read_all(size - 1) if size > 1 else b""


_PAD_LIMIT = 1 << 20  # paramiko pads a short string with zeros only below this


class _Answer(paramiko.Message):
    """An SFTP answer that can hand out its data (of a READ) as a view, not a copy."""

    def __init__(self, content: bytes) -> None:
        super().__init__(content)
        self._content = content

    def get_data(self) -> bytes | memoryview:
        """The next string, as ``get_binary`` reads it, but as a view of the answer."""
        n = self.get_int()
        at = self.packet.tell()
        got = memoryview(self._content)[at : at + n]
        self.packet.seek(at + len(got))
        if len(got) < n < _PAD_LIMIT:  # short: zero-padded, as paramiko's get_bytes
            return bytes(got) + bytes(n - len(got))
        return got


def _data(msg: paramiko.Message) -> bytes | memoryview:
    """The data string of a DATA answer (a view when the answer is an :class:`_Answer`)."""
    return msg.get_data() if isinstance(msg, _Answer) else msg.get_binary()


def _request(t: int, num: int, args: Sequence[object]) -> list[bytes | memoryview]:
    """The pieces of one SFTP request: length, type, id, then each argument (a
    preformatted ``_Raw``, an ``int64``, an int, attributes, or a string)."""
    parts: list[bytes | memoryview] = [b"", bytes((t,)), _U32.pack(num)]
    for arg in args:
        if isinstance(arg, _Raw):
            parts.append(arg)
        elif isinstance(arg, int64):
            parts.append(_U64.pack(arg))
        elif isinstance(arg, int):
            parts.append(_U32.pack(arg))
        elif isinstance(arg, paramiko.SFTPAttributes):
            msg = paramiko.Message()
            arg._pack(msg)
            parts.append(msg.asbytes())
        else:
            data = _encode(arg) if isinstance(arg, str) else arg
            assert isinstance(data, bytes | memoryview)
            parts += (_U32.pack(len(data)), data)
    parts[0] = _U32.pack(sum(map(len, parts)))
    return parts


def _open_sftp(t: paramiko.Transport) -> paramiko.SFTPClient | None:
    """Open an SFTP channel whose input buffer is a :class:`_ChunkPipe`."""
    chan = t.open_session(window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET)
    if chan is None:
        return None
    chan.in_buffer = _ChunkPipe()  # before the subsystem starts: nothing was fed yet
    chan.invoke_subsystem("sftp")
    return _SFTPClient(chan)


def _entry(path: str, a: paramiko.SFTPAttributes) -> Entry:
    """The Entry for what an LSTAT answered of ``path``."""
    mode = a.st_mode or 0
    if stat.S_ISDIR(mode):
        return Entry(path, DIR, mtime=int(a.st_mtime or 0))
    if stat.S_ISREG(mode):
        return Entry(path, FILE, size=a.st_size or 0, mtime=int(a.st_mtime or 0), mode=mode & 0o777)
    return Entry(path, "other")


def _why(code: str) -> str:
    """Words for what :func:`remote_shell.parse_rename_output` says of a failed pair."""
    if code == "nf":
        return "the partial file is gone or no longer a regular file"
    number = getattr(errno, code, None) if code.startswith("E") else None
    if isinstance(number, int):
        return os.strerror(number)
    return f"error {code}"


def _connection_lost(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno is None and str(e) == "Socket is closed":
        return True  # paramiko's error for a channel whose connection went away
    return isinstance(e, (EOFError, paramiko.SSHException, socket.timeout, ConnectionError))


def _io_error(e: BaseException, what: str) -> Exception:
    """Translate an exception from an SFTP call into one of ours."""
    if isinstance(e, socket.timeout):
        return ConnectError(f"connection stalled ({what})")
    if _connection_lost(e):
        return ConnectError(f"connection lost ({what}): {e}")
    if isinstance(e, OSError):
        return TransferError(f"{what}: {e.strerror or e}")
    return TransferError(f"{what}: {e}")


_U32 = struct.Struct(">I")


def _encode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


_U64 = struct.Struct(">Q")
_MAX_ANSWER = 1 << 24  # no SFTP answer to the pipeline's requests is this large


_Listed = tuple[str, int, int, int]
"""One directory entry as a READDIR answer gave it: name, mode, size, mtime (0 if absent)."""

_FLAG_SIZE = paramiko.SFTPAttributes.FLAG_SIZE
_FLAG_UIDGID = paramiko.SFTPAttributes.FLAG_UIDGID
_FLAG_PERMISSIONS = paramiko.SFTPAttributes.FLAG_PERMISSIONS
_FLAG_AMTIME = paramiko.SFTPAttributes.FLAG_AMTIME
_FLAG_EXTENDED = paramiko.SFTPAttributes.FLAG_EXTENDED


def _parse_names(data: bytes) -> list[_Listed]:
    """Decode the body of an SSH_FXP_NAME answer (after its request id).

    The same fields as paramiko's ``SFTPAttributes._from_msg``, read with ``struct``
    at a fraction of the cost (a listing of 100,000 entries spent most of its time
    there). Names that are not UTF-8 become surrogate escapes, which the scan reports.
    A truncated answer raises instead of being padded with zeros.
    """
    u32, u64 = _U32.unpack_from, _U64.unpack_from
    try:
        (count,) = u32(data, 0)
        pos = 4
        found = []
        for _ in range(count):
            (n,) = u32(data, pos)
            name = data[pos + 4 : pos + 4 + n]
            pos += 4 + n
            (n,) = u32(data, pos)  # the "ls -l" line, unused
            pos += 4 + n
            (flags,) = u32(data, pos)
            pos += 4
            size = mode = mtime = 0
            if flags & _FLAG_SIZE:
                (size,) = u64(data, pos)
                pos += 8
            if flags & _FLAG_UIDGID:
                pos += 8
            if flags & _FLAG_PERMISSIONS:
                (mode,) = u32(data, pos)
                pos += 4
            if flags & _FLAG_AMTIME:
                (mtime,) = u32(data, pos + 4)
                pos += 8
            if flags & _FLAG_EXTENDED:
                (pairs,) = u32(data, pos)
                pos += 4
                for _ in range(2 * pairs):
                    (n,) = u32(data, pos)
                    pos += 4 + n
            if pos > len(data):
                raise struct.error("truncated")
            found.append((name.decode("utf-8", "surrogateescape"), mode, size, mtime))
    except struct.error as e:
        raise paramiko.SFTPError(f"malformed directory listing: {e}") from None
    return found


class _Listing:
    __slots__ = ("handle", "entries", "error", "done")

    def __init__(self) -> None:
        self.handle: bytes | None = None
        self.entries: list[_Listed] = []
        self.error: BaseException | None = None
        self.done = False


class _DirLister:
    """List many remote directories at once over one SFTP channel.

    Listing a directory takes at least three round trips (OPENDIR, READDIR until
    EOF, CLOSE); the scan asks for the next directories on its stack ahead of
    time, so their requests travel together (in a :class:`_Pipeline`) instead of
    one after another. Results come back per directory, in any order the scan asks
    for them. While requests are out, the channel is the lister's: ``quiesce``
    first, to use it otherwise.
    """

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self._pipe = _Pipeline(sftp)
        self._dirs: dict[str, _Listing] = {}

    def want(self, key: str, path: str) -> None:
        """Start listing ``path`` (remembered as ``key``) unless already started."""
        if key not in self._dirs:
            listing = self._dirs[key] = _Listing()
            name = path.encode("utf-8", "surrogateescape")
            self._pipe.send(self._opened(listing), CMD_OPENDIR, name)

    def get(self, key: str, path: str) -> list[_Listed]:
        """Return the entries of ``path``; raise what listing it raised."""
        self.want(key, path)
        listing = self._dirs[key]
        while not listing.done:
            if not len(self._pipe):
                raise paramiko.SFTPError("directory listing stalled")
            self._pipe.step()
        del self._dirs[key]
        if listing.error is not None:
            raise listing.error
        return listing.entries

    def quiesce(self) -> None:
        """Finish every listing started (their results are kept for ``get``)."""
        self._pipe.drain()

    def finish(self) -> None:
        """Collect the answers still due (CLOSEs, directories never asked for)."""
        try:
            self._pipe.drain()
        except Exception:
            pass

    def _opened(self, listing: _Listing) -> _Callback:
        def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
            if error is not None or msg is None or t != CMD_HANDLE:
                self._end(listing, error or paramiko.SFTPError("expected a handle"))
                return
            listing.handle = msg.get_binary()
            self._pipe.send(self._read(listing), CMD_READDIR, listing.handle)

        return done

    def _read(self, listing: _Listing) -> _Callback:
        def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
            if isinstance(error, _EndOfFile):  # the end of the listing
                self._end(listing, None)
            elif error is not None or msg is None or t != CMD_NAME:
                self._end(listing, error or paramiko.SFTPError("expected a name response"))
            else:
                try:
                    listing.entries.extend(_parse_names(msg.get_remainder()))
                except paramiko.SFTPError as e:
                    self._end(listing, e)
                    return
                self._pipe.send(self._read(listing), CMD_READDIR, listing.handle)

        return done

    def _end(self, listing: _Listing, error: BaseException | None) -> None:
        listing.done = True
        listing.error = error
        if listing.handle is not None:
            self._pipe.send(_ignore, CMD_CLOSE, listing.handle)


# -- connecting -----------------------------------------------------------


def _open_socket(settings: SshSettings) -> socket.socket:
    try:
        sock = socket.create_connection(
            (settings.hostname, settings.port), timeout=settings.connect_timeout
        )
    except socket.gaierror as e:
        raise ConnectError(f"cannot resolve {settings.hostname}: {e.strerror}") from e
    except TimeoutError as e:
        raise ConnectError(f"timed out connecting to {settings.hostname}:{settings.port}") from e
    except OSError as e:
        raise ConnectError(
            f"cannot connect to {settings.hostname}:{settings.port}: {e.strerror or e}"
        ) from e
    # A request and the one after it often leave as two small packets; with Nagle's
    # algorithm the second waits for the peer's delayed ACK (tens of ms) first.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if _QUICKACK is None:
        return sock
    return _AckingSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class _AckingSocket(socket.socket):
    """A TCP socket that acknowledges what it receives at once (Linux TCP_QUICKACK).

    The peer's sshd keeps Nagle's algorithm on: a small packet it sends right after
    another waits until that one is acknowledged. A client waiting for that second
    packet has nothing to send, so its ACK would be delayed by up to 40 ms: after
    authentication (OpenSSH's host key announcement, then the channel confirmation),
    and wherever an answer follows a notice. The kernel leaves quick-ACK mode by
    itself, so it is asked again after every read from the kernel. Reads also take
    what the kernel has beyond what was asked (see :meth:`recv`).
    """

    _READ = 256 << 10  # bytes asked of the kernel at a time

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._ahead = memoryview(b"")

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read up to ``bufsize`` bytes; what the kernel had beyond them is kept for the
        next reads. paramiko reads each SSH packet's header and then its body: one
        system call per many packets instead of two per packet."""
        if not self._ahead:
            data = super().recv(max(bufsize, self._READ), flags)
            with contextlib.suppress(OSError):
                self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[arg-type]
            if len(data) <= bufsize:
                return data
            self._ahead = memoryview(data)
        got = bytes(self._ahead[:bufsize])
        self._ahead = self._ahead[bufsize:]
        return got


def _load_known_hosts(paths: list[Path]) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    for path in paths:
        if path.is_file():
            try:
                keys.load(str(path))
            except (OSError, paramiko.SSHException) as e:
                raise UsageError(f"cannot read known_hosts {path}: {e}") from e
    return keys


def _check_host_key(settings: SshSettings, key: paramiko.PKey, known: paramiko.HostKeys) -> None:
    """Refuse an unknown (unless accept-new) or changed host key; record a new one."""
    name = settings.known_hosts_name()
    found = known.lookup(name)
    fingerprint = key.fingerprint if hasattr(key, "fingerprint") else key.get_name()
    if found:
        recorded = found.get(key.get_name())
        if recorded is not None and recorded == key:
            return
        raise HostKeyError(
            f"host key for {name} has CHANGED (now {key.get_name()} {fingerprint}); refusing "
            f"to connect. If the change is expected, remove the old entry from "
            f"{settings.known_hosts[0]}"
        )
    if settings.strict_host_key != "accept-new":
        raise HostKeyError(
            f"host key for {name} is unknown ({key.get_name()} {fingerprint}); add it to "
            f"{settings.known_hosts[0]} or pass --accept-new-host-key"
        )
    path = settings.known_hosts[0]
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        prefix = ""
        if path.exists() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                prefix = "" if f.read(1) == b"\n" else "\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{prefix}{name} {key.get_name()} {key.get_base64()}\n")
    except OSError as e:
        raise HostKeyError(f"cannot record the new host key in {path}: {e.strerror}") from e


def _candidate_keys(settings: SshSettings, notes: list[str]) -> Iterator[paramiko.PKey]:
    paths: list[Path] = []
    if settings.explicit_identity is not None:
        paths.append(settings.explicit_identity)
    paths.extend(settings.identity_files)
    if not settings.identities_only or not paths:
        default_dir = Path(os.path.expanduser("~/.ssh"))
        if not settings.identity_files:
            paths.extend(default_dir / n for n in ("id_ed25519", "id_ecdsa", "id_rsa"))
    seen: set[str] = set()
    if not settings.identities_only and os.environ.get("SSH_AUTH_SOCK"):
        try:
            agent_keys = paramiko.Agent().get_keys()
        except paramiko.SSHException:
            agent_keys = ()
        for key in agent_keys:
            seen.add(key.get_base64())
            yield key
    for path in paths:
        if not path.is_file():
            continue
        try:
            key = paramiko.PKey.from_path(str(path))
        except (paramiko.PasswordRequiredException, TypeError):
            # paramiko raises TypeError from cryptography for an encrypted key
            notes.append(
                f"{path} is encrypted and leftssh never asks for a passphrase: "
                "load it into ssh-agent"
            )
            continue
        except (paramiko.SSHException, OSError, ValueError) as e:
            notes.append(f"cannot load key {path}: {e}")
            continue
        if key.get_base64() in seen:
            continue
        seen.add(key.get_base64())
        yield key


def _authenticate(t: paramiko.Transport, settings: SshSettings) -> None:
    notes: list[str] = []
    tried = 0
    for key in _candidate_keys(settings, notes):
        tried += 1
        try:
            t.auth_publickey(settings.user, key)
        except paramiko.BadAuthenticationType as e:
            raise AuthError(
                f"{settings.user}@{settings.hostname} does not accept public keys "
                f"(allowed: {', '.join(e.allowed_types)})"
            ) from e
        except paramiko.AuthenticationException:
            continue
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise ConnectError(f"connection lost during authentication: {e}") from e
        if t.is_authenticated():
            return
    detail = "; ".join(notes)
    if not tried:
        raise AuthError(
            f"no usable key to log in as {settings.user}@{settings.hostname}"
            + (f" ({detail})" if detail else "")
        )
    raise AuthError(
        f"permission denied for {settings.user}@{settings.hostname} ({tried} key(s) tried"
        + (f"; {detail}" if detail else "")
        + ")"
    )


def _jump_socket(settings: SshSettings) -> tuple[paramiko.Channel, paramiko.Transport]:
    """Open a ``direct-tcpip`` channel to the target through its ProxyJump host."""
    assert settings.jump is not None
    hop = connect(settings.jump)
    try:
        chan = hop.open_channel(
            "direct-tcpip",
            (settings.hostname, settings.port),
            ("127.0.0.1", 0),
            timeout=settings.connect_timeout,
        )
    except (paramiko.SSHException, EOFError, OSError) as e:
        hop.close()
        raise ConnectError(
            f"jump host {settings.jump.hostname} cannot reach "
            f"{settings.hostname}:{settings.port}: {e}"
        ) from e
    return chan, hop


def connect(settings: SshSettings) -> paramiko.Transport:
    """Open an authenticated SSH connection, checking the host key first."""
    known = _load_known_hosts(settings.known_hosts)
    hop: paramiko.Transport | None = None
    if settings.jump is not None:
        sock, hop = _jump_socket(settings)
    else:
        sock = _open_socket(settings)
    try:
        t = paramiko.Transport(
            sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET
        )
    except (paramiko.SSHException, OSError) as e:
        sock.close()
        raise ConnectError(f"cannot start SSH with {settings.hostname}: {e}") from e
    opts = t.get_security_options()
    available = tuple(opts.ciphers)
    opts.ciphers = tuple(c for c in _FAST_CIPHERS if c in available) + tuple(
        c for c in available if c not in _FAST_CIPHERS
    )
    recorded = known.lookup(settings.known_hosts_name())
    if recorded:
        types = tuple(opts.key_types)
        preferred = tuple(k for k in types if k in recorded or _base_type(k) in recorded)
        if preferred:
            opts.key_types = preferred + tuple(k for k in types if k not in preferred)
    t.use_compression(settings.compression)
    try:
        t.start_client(timeout=settings.connect_timeout)
    except (paramiko.SSHException, EOFError, OSError) as e:
        t.close()
        if hop is not None:
            hop.close()
        raise ConnectError(
            f"SSH handshake with {settings.hostname}:{settings.port} failed: {e}"
        ) from e
    if not t.initial_kex_done:
        # start_client returns silently when its timeout expires (no banner, no key exchange).
        t.close()
        if hop is not None:
            hop.close()
        raise ConnectError(
            f"SSH handshake with {settings.hostname}:{settings.port} timed out after "
            f"{settings.connect_timeout:g} s"
        )
    try:
        _check_host_key(settings, t.get_remote_server_key(), known)
        _authenticate(t, settings)
    except BaseException:
        t.close()
        if hop is not None:
            hop.close()
        raise
    if settings.keepalive:
        t.set_keepalive(settings.keepalive)
    t._leftssh_hop = hop  # type: ignore[attr-defined]  # kept alive with the connection
    return t


def _base_type(key_type: str) -> str:
    return "ssh-rsa" if key_type.startswith("rsa-sha2") else key_type


# -- the transport ---------------------------------------------------------


class _Requests:
    """Responses to pipelined SFTP requests of one reader or writer, collected in order.

    paramiko hands a response that arrives while another one is awaited to the
    ``fileobj`` of its request (``_async_response``); it is kept here until asked for.
    """

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self.sftp = sftp
        self.pending: collections.deque[int] = collections.deque()
        self._early: dict[int, tuple[int, paramiko.Message]] = {}

    def send(self, t: int, *args: object) -> None:
        self.pending.append(self.sftp._async_request(self, t, *args))

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        self._early[num] = (t, msg)

    def wait(self, num: int) -> tuple[int, paramiko.Message]:
        """Return the response to request ``num``; an error status raises (EOFError, OSError)."""
        got = self._early.pop(num, None)
        if got is None:
            return self.sftp._read_response(num)
        if got[0] == CMD_STATUS:
            self.sftp._convert_status(got[1])
        return got

    def wait_oldest(self) -> tuple[int, paramiko.Message]:
        return self.wait(self.pending.popleft())


class _Pipeline:
    """Many requests of one thread in flight, each answer handed to its own callback.

    Callbacks run in the order the requests were sent (answers that come early are
    kept until then), and get ``(type, message, None)`` or ``(0, None, error)`` for an
    error status. A stalled or lost connection raises out of :meth:`step`.

    Requests are encoded here and queued, and the queue leaves in one write before
    the pipeline next waits, so many small requests share SSH packets. Answers are
    read from the channel in large pieces and split here, instead of two reads from
    paramiko's buffer per answer. Request ids come from paramiko's client, so they
    never collide with its own; while a pipeline has requests out, nothing else may
    use that client (each thread has its own, see ``SFTPTransport.client``).
    """

    _COALESCE = 64 << 10  # queued request bytes sent in one go
    _READ = 256 << 10  # bytes asked of the channel at a time

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self._sftp = sftp
        self._chan = sftp.sock
        self._pending: collections.deque[tuple[int, _Callback]] = collections.deque()
        self._outstanding: set[int] = set()
        self._answers: dict[int, tuple[int, bytes]] = {}
        self._in = bytearray()
        self._out: list[bytes] = []
        self._queued = 0

    def __len__(self) -> int:
        return len(self._pending)

    def send(self, callback: _Callback, t: int, *args: bytes | memoryview | str | int) -> None:
        """Queue a request (the few argument types the pipeline uses)."""
        sftp = self._sftp
        with sftp._lock:
            num = sftp.request_number
            sftp.request_number += 1
        parts = _request(t, num, args)
        self._out.extend(parts)
        self._queued += sum(map(len, parts))
        self._pending.append((num, callback))
        self._outstanding.add(num)
        if self._queued >= self._COALESCE:
            self.flush()

    def make_room(self) -> None:
        """Wait (handling answers) until fewer than ``PIPELINE_REQUESTS`` are in flight."""
        while len(self._pending) >= PIPELINE_REQUESTS:
            self.step()

    def flush(self) -> None:
        if self._out:
            data = b"".join(self._out)  # memoryviews of WRITE data are copied here, once
            self._out.clear()
            self._queued = 0
            self._sftp._write_all(data)

    def step(self) -> None:
        """Send what is queued, then handle the oldest answer and every one already in."""
        self.flush()
        self._answer()
        while self._pending and self._ready():
            self._answer()

    def drain(self) -> None:
        while self._pending:
            self.step()

    def _ready(self) -> bool:
        return (
            self._pending[0][0] in self._answers
            or self._complete() is not None
            or self._chan.recv_ready()
        )

    def _complete(self) -> int | None:
        """The length of the first whole packet in the input, if there is one."""
        if len(self._in) < 4:
            return None
        (size,) = _U32.unpack_from(self._in, 0)
        if size < 5 or size > _MAX_ANSWER:
            # The channel is out of step: nothing after this can be read as answers.
            raise paramiko.SSHException("malformed SFTP packet from the peer")
        return size + 4 if len(self._in) >= size + 4 else None

    def _read(self, num: int) -> tuple[int, bytes]:
        while num not in self._answers:
            length = self._complete()
            if length is None:
                data = self._chan.recv(self._READ)
                if not data:
                    raise EOFError("the SFTP channel closed")
                self._in += data
                continue
            t = self._in[4]
            (got,) = _U32.unpack_from(self._in, 5)
            if got not in self._outstanding:
                raise paramiko.SSHException(f"an answer to no request ({got}) from the peer")
            self._outstanding.discard(got)
            self._answers[got] = (t, bytes(self._in[9:length]))
            del self._in[:length]
        return self._answers.pop(num)

    def _answer(self) -> None:
        num, callback = self._pending.popleft()
        t, body = self._read(num)
        msg = paramiko.Message(body)
        if t == CMD_STATUS:
            try:
                self._sftp._convert_status(paramiko.Message(body))
            except EOFError as e:
                callback(0, None, _EndOfFile(f"unexpected end of file: {e}"))
                return
            except OSError as e:
                callback(0, None, e)
                return
        callback(t, msg, None)


_Callback = Callable[[int, "paramiko.Message | None", "BaseException | None"], None]


class _EndOfFile(OSError):
    """An SFTP EOF status, as a pipeline callback gets it (the end of a listing)."""


class _Raw(bytes):
    """Bytes that :meth:`_Pipeline.send` puts in a request as they are (no length)."""


_NO_ATTRS = _Raw(_U32.pack(0))  # SFTP v3 ATTRS with no attribute set
_DIR_ATTRS = _Raw(_U32.pack(paramiko.SFTPAttributes.FLAG_PERMISSIONS) + _U32.pack(0o755))
_MODE_AND_TIMES = paramiko.SFTPAttributes.FLAG_PERMISSIONS | paramiko.SFTPAttributes.FLAG_AMTIME


def _mode_and_times(mode: int, mtime: int) -> _Raw:
    """SFTP v3 ATTRS setting the permission bits of ``mode``, and atime and mtime."""
    return _Raw(struct.pack(">IIII", _MODE_AND_TIMES, mode & 0o777, mtime, mtime))


def _ignore(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
    pass


def _outside(
    path: str,
    parent: str,
    real_root: str,
    t: int,
    msg: paramiko.Message | None,
    error: BaseException | None,
) -> BaseException | None:
    """What is wrong with the REALPATH answer for ``path``'s directory ``parent``: its
    error, an answer that is not one name, or an UnsafePath when that name is not
    ``parent`` under ``real_root`` (a symlink on the way); None when nothing is."""
    if error is not None:
        return error
    if msg is None or t != CMD_NAME or msg.get_int() != 1:
        return paramiko.SFTPError("cannot resolve the directory")
    # as bytes: a name that is not UTF-8 (a symlink's target) is no error of the run
    if msg.get_string() != _encode(posixpath.join(real_root, parent)):
        return UnsafePath(f"{display(path)}: leads outside the share")
    return None


_CREATE_EXCL = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
_Answer3 = tuple[int, "paramiko.Message | None", "BaseException | None"]


def _exchange(sftp: paramiko.SFTPClient, requests: list[tuple[int, tuple]]) -> list[_Answer3]:
    """Send ``requests`` (type, arguments) together; return each answer as a
    pipeline callback gets it: (type, message, None) or (0, None, error)."""
    pipe = _Pipeline(sftp)
    answers: list[_Answer3] = []
    for t, args in requests:
        pipe.send(lambda *answer: answers.append(answer), t, *args)
    pipe.drain()
    return answers


_LOCK_READ = 4096  # bytes of a lock file read back (its holder, a short JSON object)


def _handle_of(answer: _Answer3) -> bytes | None:
    """The handle an OPEN answered with, or None if it answered anything else."""
    t, msg, error = answer
    return msg.get_binary() if error is None and t == CMD_HANDLE and msg is not None else None


def _read_back(sftp: paramiko.SFTPClient, opened: _Answer3) -> tuple[bytes, float] | None:
    """Read a small file through the answer to its OPEN, with its mtime (the READ,
    FSTAT and CLOSE together); None if the OPEN found nothing."""
    if isinstance(opened[2], FileNotFoundError):
        return None
    if opened[2] is not None:
        raise opened[2]
    handle = _handle_of(opened)
    if handle is None:
        raise paramiko.SFTPError("expected a handle")
    data, attrs, closed = _exchange(
        sftp,
        [
            (CMD_READ, (handle, int64(0), _LOCK_READ)),
            (CMD_FSTAT, (handle,)),
            (CMD_CLOSE, (handle,)),
        ],
    )
    for answer in (attrs, closed):
        if answer[2] is not None:
            raise answer[2]
    if isinstance(data[2], _EndOfFile):
        content = b""
    elif data[2] is not None:
        raise data[2]
    elif data[0] != CMD_DATA or data[1] is None:
        raise paramiko.SFTPError("expected data")
    else:
        content = data[1].get_binary()
    if attrs[0] != CMD_ATTRS or attrs[1] is None:
        raise paramiko.SFTPError("expected attributes")
    return content, float(paramiko.SFTPAttributes._from_msg(attrs[1]).st_mtime or 0)


class _InFlight:
    """One small file on its way through a request pipeline, and its first failure."""

    __slots__ = ("path", "error")

    def __init__(self, path: str) -> None:
        self.path = path
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error


class _Get(_InFlight):
    """One small file of :meth:`SFTPTransport.get_files` on its way."""

    __slots__ = ("want", "pieces", "size", "mtime", "handle", "closing", "finished")

    def __init__(self, path: str, want: int) -> None:
        super().__init__(path)
        self.want = want  # bytes asked for: one past the listed size
        self.pieces: list[tuple[int, int, bytes | memoryview]] = []  # (offset, asked, data)
        self.size = -1
        self.mtime = -1
        self.handle: bytes | None = None
        self.closing = False  # its CLOSE is sent (or there is no handle)
        self.finished = False  # nothing more will come for it

    def data(self) -> bytes:
        """The bytes read, in order; a short answer before the end is an error."""
        out, at = [], 0
        for offset, asked, piece in sorted(self.pieces, key=lambda p: p[0]):
            if offset != at:
                raise paramiko.SFTPError("a short read before the end of the file")
            out.append(piece)
            at += len(piece)
            if len(piece) < asked:
                break
        return b"".join(out)


class _Put(_InFlight):
    """One small file of :meth:`SFTPTransport.put_files` on its way."""

    __slots__ = ("data", "attrs")

    def __init__(self, path: str, data: bytes, attrs: tuple[int, int]) -> None:
        super().__init__(path)
        self.data = data
        self.attrs = attrs


def _stops_pipeline(e: BaseException) -> bool:
    """After this error no further response can be expected on the channel."""
    return isinstance(e, socket.timeout) or _connection_lost(e)


class _Writer:
    """Pipelined SFTP writes that report failures as TransferError.

    Requests carry up to ``request_size`` bytes (the peer's limit, not paramiko's
    32 KiB) with at most ``depth`` of them unacknowledged; the CLOSE rides the same
    pipeline, so a small file costs one round trip after its OPEN. Once a file
    proves large, the requests go out from a helper thread, so building and
    encrypting packets overlaps with the caller reading and hashing the next block.
    Every response is checked before ``close`` returns.
    """

    _THREAD_AFTER = 4 << 20  # bytes written before the helper thread takes over
    _QUEUE = 4  # blocks waiting for the helper thread

    def __init__(self, f: paramiko.SFTPFile, offset: int, request_size: int, depth: int) -> None:
        self._file = f
        self._req = _Requests(f.sftp)
        self._handle = f.handle
        self._pos = offset
        self._size = request_size
        self._depth = depth
        self._written = 0
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._ends: collections.deque[int] = collections.deque()
        self.attrs: tuple[int, int] | None = None
        self.attrs_set = False
        self.follower: _Follower | None = None
        self.joining: Future[_Follower | None] | None = None  # a follower still starting
        self._acked = 0
        self.md5: str | None = None

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), self._size):
            piece = view[start : start + self._size]
            self._req.send(CMD_WRITE, self._handle, int64(self._pos), piece)
            self._pos += len(piece)
            self._ends.append(self._pos)
            while len(self._req.pending) > self._depth:
                self._req.wait_oldest()
                self._acked = self._ends.popleft()
                follower = self._current_follower()
                if follower is not None:
                    follower.advance(self._acked)

    def _current_follower(self, wait: bool = False) -> _Follower | None:
        """The follower; one that was still starting joins (caught up) once it is ready."""
        joining = self.joining
        if joining is not None and (wait or joining.done()):
            self.joining = None
            self.follower = joining.result()
            if self.follower is not None and self._acked:
                self.follower.advance(self._acked)
        return self.follower

    def _finish(self) -> None:
        """Send CLOSE after the writes, then collect every response; raise the first error."""
        error: BaseException | None = None
        self._file._closed = True  # the CLOSE is ours: paramiko must not send another
        try:
            if self.attrs is not None:
                # mtime and mode ride the pipeline on the handle (no path, no symlink).
                attr = paramiko.SFTPAttributes()
                attr.st_mtime = attr.st_atime = self.attrs[0]
                attr.st_mode = self.attrs[1] & 0o777
                self._req.send(CMD_FSETSTAT, self._handle, attr)
                self.attrs_set = True
            self._req.send(CMD_CLOSE, self._handle)
        except Exception as e:
            error = e
        while self._req.pending:
            try:
                self._req.wait_oldest()
            except Exception as e:
                error = error or e
                if _stops_pipeline(e) or not isinstance(e, OSError):
                    break
        if error is not None:
            self._drop_follower()
            raise error
        self._current_follower(wait=True)
        follower, self.follower = self.follower, None
        if follower is not None:
            self.md5 = follower.finish(self._pos)

    def _run(self) -> None:
        """The helper thread: send queued blocks until None, then finish."""
        assert self._queue is not None
        while True:
            data = self._queue.get()
            if data is None:
                break
            if self._error is None:
                try:
                    self._send(data)
                except BaseException as e:
                    self._error = e
        if self._error is None or not _stops_pipeline(self._error):
            try:
                self._finish()
            except BaseException as e:
                self._error = self._error or e
        self._drop_follower()

    def _drop_follower(self) -> None:
        follower, self.follower = self.follower, None
        if follower is not None:
            follower.abort()
        joining, self.joining = self.joining, None
        if joining is not None:
            joining.add_done_callback(_abort_follower)

    def write(self, data: bytes) -> int:
        if self._error is not None:
            raise _io_error(self._error, "write") from self._error
        if self._queue is not None:
            self._queue.put(data)
            return len(data)
        try:
            self._send(data)
        except Exception as e:
            self._error = e
            raise _io_error(e, "write") from e
        self._written += len(data)
        if self._written >= self._THREAD_AFTER:
            self._queue = queue.Queue(self._QUEUE)
            self._thread = threading.Thread(target=self._run, name="sftp-writer", daemon=True)
            self._thread.start()
        return len(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join()
            if self._error is not None:
                raise _io_error(self._error, "write") from self._error
            return
        if self._error is not None and _stops_pipeline(self._error):
            self._drop_follower()
            raise _io_error(self._error, "write") from self._error
        try:
            self._finish()
        except Exception as e:
            raise _io_error(self._error or e, "write" if self._error else "close") from e
        if self._error is not None:
            raise _io_error(self._error, "write") from self._error

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _abort_follower(started: Future[_Follower | None]) -> None:
    follower = started.result()
    if follower is not None:
        follower.abort()


class _Follower:
    """The peer's MD5 of a partial, computed by ``md5sum`` while the partial is written.

    The writer reports how many bytes the peer has acknowledged; every
    ``FOLLOW_STEP`` of them, the remote command is asked to read the next whole
    blocks back from the file and add them to its hash. When the file is closed
    only the tail is left to hash, instead of a second pass over the whole file.
    This is only ever an early answer: any trouble (the command could not start,
    a range could not be read, the channel failed) gives None, and the partial is
    then hashed after it is closed, as every other file is.
    """

    def __init__(self, chan: paramiko.Channel, tool: remote_shell.HashTool) -> None:
        self._chan = chan
        self._tool = tool
        self._blocks = 0  # blocks asked for so far
        self._broken = False

    def advance(self, acked: int) -> None:
        whole = acked // remote_shell.FOLLOW_BLOCK
        if (whole - self._blocks) * remote_shell.FOLLOW_BLOCK >= FOLLOW_STEP:
            self._ask(whole)

    def _ask(self, upto: int) -> None:
        if self._broken:
            return
        try:
            self._chan.sendall(remote_shell.follow_hash_request(self._blocks, upto - self._blocks))
            self._blocks = upto
        except Exception:
            self.abort()

    def finish(self, size: int) -> str | None:
        """Ask for the rest of the file (``size`` bytes in all); return its MD5, or None."""
        total = -(-size // remote_shell.FOLLOW_BLOCK)
        if total > self._blocks:
            self._ask(total)
        if self._broken:
            return None
        try:
            self._chan.shutdown_write()
            out = self._chan.makefile("rb").read()
            status = self._chan.recv_exit_status()
        except Exception:
            return None
        finally:
            self.abort()
        return remote_shell.parse_prefix_hash(self._tool, out) if status == 0 else None

    def abort(self) -> None:
        self._broken = True
        try:
            self._chan.close()
        except Exception:
            pass


def _read_pipelined(
    sftp: paramiko.SFTPClient, handle: bytes, offset: int, end: int, request: int, depth: int
) -> Iterator[bytes | memoryview]:
    """Yield the bytes of ``[offset, end)`` in order, ``depth`` READ requests in flight.

    Unlike paramiko's prefetch this keeps memory bounded (no read-ahead past
    ``depth`` requests), never re-joins its buffer per read, and uses the peer's
    request size. A short answer is completed with plain reads; an EOF ends the
    stream early (the caller compares the length with what it expected).
    """
    req = _Requests(sftp)
    spans: collections.deque[tuple[int, int]] = collections.deque()
    position = offset
    while True:
        while len(spans) < depth and position < end:
            n = min(request, end - position)
            req.send(CMD_READ, handle, int64(position), n)
            spans.append((position, n))
            position += n
        if not spans:
            return
        at, n = spans.popleft()
        try:
            t, msg = req.wait_oldest()
        except EOFError:
            return
        if t != CMD_DATA:
            raise paramiko.SFTPError("expected data")
        data = _data(msg)[:n]
        if len(data) < n:
            parts, have = [data], len(data)
            while have < n:
                try:
                    t, msg = sftp._request(CMD_READ, handle, int64(at + have), n - have)
                except EOFError:
                    break
                if t != CMD_DATA:
                    raise paramiko.SFTPError("expected data")
                more = _data(msg)[: n - have]
                if not more:
                    break
                parts.append(more)
                have += len(more)
            data = b"".join(parts)
            if have < n:
                if data:
                    yield data
                return
        yield data


class _GuardedWriter(_Writer):
    """A writer that closes the connection (``on_lost``) once it finds it stalled or lost."""

    on_lost: Callable[[], None] | None = None

    def write(self, data: bytes) -> int:
        try:
            return super().write(data)
        except ConnectError:
            if self.on_lost is not None:
                self.on_lost()
            raise

    def close(self) -> None:
        try:
            super().close()
        except ConnectError:
            if self.on_lost is not None:
                self.on_lost()
            raise


class _Shell:
    """One long-lived ``sh`` on the peer that runs script after script (remote_shell).

    A command of its own would pay the login shell's start-up each time. Answers are
    read up to the marker of their request; a session whose shell went away (or
    never was one) answers what it printed, if anything, and is not used again.
    """

    _READ = 64 << 10

    def __init__(self, t: paramiko.Transport, timeout: float) -> None:
        self._chan = t.open_session(timeout=timeout)
        self._chan.settimeout(timeout)
        self._chan.exec_command(remote_shell.SESSION_COMMAND)
        self._token = os.urandom(8).hex()
        self._count = 0
        self._in = bytearray()
        self.alive = True

    def ask(self, script: str | bytes) -> tuple[bool, bytes]:
        """Run ``script``; return (whether it finished, what it printed)."""
        if not self.alive:
            return False, b""
        self._count += 1
        request, end = remote_shell.session_request(script, f"leftssh-{self._token}-{self._count}")
        try:
            self._chan.sendall(request)
        except OSError:
            # The shell is gone (or the command was never one): take what it said.
            pass
        searched = 0
        while True:
            at = self._in.find(end, searched)
            if at >= 0:
                out = bytes(self._in[:at])
                del self._in[: at + len(end)]
                return True, out
            searched = max(0, len(self._in) - len(end) + 1)
            data = self._chan.recv(self._READ)
            if not data:
                self.alive = False
                out = bytes(self._in)
                self._in.clear()
                return False, out
            self._in += data

    def close(self) -> None:
        self.alive = False
        with contextlib.suppress(Exception):
            self._chan.close()


class _Unpacker:
    """The helper thread of :meth:`SFTPTransport._put_tarred`: it unpacks archives.

    One per connection. ``submit`` (from a writing thread) queues an archive whose
    CLOSE succeeded, with the partials in it and where their failures go; the
    thread sends all that are queued in one session script, so the peer unpacks
    one batch while the next is written, all through one shell. ``wait(n)`` waits
    until the first ``n`` archives ever submitted are done, and raises what
    stopped the thread (a lost connection).
    """

    def __init__(self, t: SFTPTransport, real_root: str) -> None:
        self._t = t
        self._real_root = real_root
        self._queue: queue.Queue[_Archive | None] = queue.Queue()
        self._done = threading.Condition()
        self._submitted = 0
        self._finished = 0
        self._error: BaseException | None = None
        self._count = 0
        self._thread = threading.Thread(target=self._run, name="sftp-unpack", daemon=True)
        self._thread.start()

    def submit(self, archive: _Archive) -> None:
        with self._done:
            self._submitted += 1
        self._queue.put(archive)

    def submitted(self) -> int:
        with self._done:
            return self._submitted

    def wait(self, count: int) -> None:
        with self._done:
            while self._finished < count and self._error is None:
                self._done.wait()
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        ending = False
        while not ending:
            batch: list[_Archive] = []
            item = self._queue.get()
            while True:
                if item is None:
                    ending = True
                else:
                    batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                if batch and self._error is None:
                    self._unpack(batch)
            except (TransferError, OSError) as e:  # no shell: the files go one by one
                error = e if isinstance(e, TransferError) else TransferError(str(e))
                for archive in batch:
                    archive.fail(error)
            except BaseException as e:  # raised to the writing threads by wait()
                with self._done:
                    self._error = e
            finally:
                if self._error is not None:
                    for archive in batch:
                        archive.fail(TransferError("write: not unpacked"))
                with self._done:
                    self._finished += len(batch)
                    self._done.notify_all()

    def _unpack(self, batch: list[_Archive]) -> None:
        t = self._t
        jobs = []
        for archive in batch:
            parent, _, name = archive.path.rpartition("/")
            members = [p.rpartition("/")[2] for p in archive.members]
            jobs.append(remote_shell.Unpack(parent, name, t._first_archive_in(parent), members))
        tool = t._tool if t._probed else None  # hashed now if the probe has answered
        self._count += 1
        marker = f"leftssh-{t._run}-{self._count}"
        script = remote_shell.unpack_script(t.root, self._real_root, t._run, jobs, tool, marker)
        done, out = t._ask_shell(script, "unpacking")
        if done:
            results = remote_shell.parse_unpack_output(out, jobs, tool, marker)
        else:
            results = [(False, {})] * len(jobs)
        for archive, job, (ok, hashes) in zip(batch, jobs, results, strict=True):
            if not ok:
                archive.fail(TransferError("write: the archive did not unpack"))
            elif hashes:
                t._remember_hashes({join(job.directory, n): md5 for n, md5 in hashes.items()})


class _Archive:
    """One archive of small files on its way: its path, the partials in it, and where
    the failures of those go."""

    __slots__ = ("path", "members", "failed")

    def __init__(self, path: str, members: list[str], failed: dict[str, Exception]) -> None:
        self.path = path
        self.members = members
        self.failed = failed

    def fail(self, error: Exception) -> None:
        for path in self.members:
            self.failed[path] = error


class SFTPTransport:
    """A share directory on an SSH peer."""

    def __init__(self, settings: SshSettings, path: str, label: str, timeout: float) -> None:
        self.settings = settings
        self.label = label
        self.timeout = timeout
        self._t = connect(settings)
        self._local = threading.local()
        self._clients: list[paramiko.SFTPClient] = []
        self._owners: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._tool: remote_shell.HashTool | None = None
        self._probed = False
        self._probe_lock = threading.Lock()
        self._shells: list[_Shell] = []  # idle ones
        self._all_shells: list[_Shell] = []
        self._lock_path: str | None = None
        self._real_root: str | None = None
        self._tar: bool | None = None  # GNU tar on the peer (asked once)
        self._perl: bool | None = None  # perl on the peer (asked once)
        self._perl_md5: bool | None = None  # perl with Digest::MD5 on the peer (asked once)
        self._run = os.urandom(6).hex()  # names this run's archives
        self._archives = 0
        self._swept: set[str] = set()  # directories cleared of other runs' archives
        self._hashed: dict[str, str] = {}  # partial -> MD5 the peer took as it unpacked it
        self._unpacker: _Unpacker | None = None
        sftp = self.client()
        try:
            home = sftp.normalize(".")
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise _io_error(e, "resolving the login directory") from e
        self.root = posixpath.normpath(posixpath.join(home, path))

    def client(self) -> paramiko.SFTPClient:
        """Return this thread's SFTP channel (one per thread, opened on first use)."""
        sftp = getattr(self._local, "sftp", None)
        if sftp is None:
            sftp = self._adopt()
            if sftp is not None:
                self._local.sftp = sftp
                return sftp
            try:
                sftp = _open_sftp(self._t)
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise ConnectError(f"cannot open an SFTP channel: {e}") from e
            if sftp is None:
                raise ConnectError("the peer refused the SFTP subsystem")
            sftp.get_channel().settimeout(self.timeout)
            self._local.sftp = sftp
            with self._lock:
                self._clients.append(sftp)
                self._owners[id(sftp)] = threading.current_thread()
        return sftp

    def _adopt(self) -> paramiko.SFTPClient | None:
        """Hand a channel whose thread has ended to the current thread (no channel leak)."""
        with self._lock:
            for sftp in self._clients:
                owner = self._owners.get(id(sftp))
                if owner is not None and not owner.is_alive():
                    self._owners[id(sftp)] = threading.current_thread()
                    return sftp
        return None

    def full(self, path: str) -> str:
        if not path:
            return self.root
        for part in path.split("/"):
            check_name(part)
        return f"{self.root}/{path}" if self.root != "/" else f"/{path}"

    def _error(self, e: BaseException, what: str) -> Exception:
        """Translate ``e``; a stalled or lost connection is closed, so nothing waits on it again.

        Otherwise each later call (closing a handle, removing the lock) would wait out
        another full --timeout before the run could stop.
        """
        if _stops_pipeline(e):
            self._t.close()
        return _io_error(e, what)

    def _inside(self, path: str, whole: bool = False) -> None:
        """Refuse ``path`` if its directory (``whole``: the path itself) resolves outside.

        The SFTP server follows symlinks, so a directory swapped for a symlink after the
        scan would lead a read or write outside the share. SFTP v3 has neither O_NOFOLLOW
        nor openat: one round trip remains between this check and the operation.
        """
        target = path if whole else path.rpartition("/")[0]
        if not target:
            return
        sftp = self.client()
        real_root = self._resolved_root(sftp)
        try:
            real = sftp.normalize(self.full(target))
        except FileNotFoundError:
            return  # nothing there to follow: the operation fails on its own
        except Exception as e:
            raise _io_error(e, "resolving a path") from e
        if real != posixpath.join(real_root, target):
            raise UnsafePath(f"{display(path)}: leads outside the share through a symlink")

    # -- reading -------------------------------------------------------------

    def root_exists(self) -> bool:
        try:
            return stat.S_ISDIR(self.client().stat(self.root).st_mode or 0)
        except FileNotFoundError:
            return False
        except Exception as e:
            raise _io_error(e, f"checking {self.root}") from e

    def ensure_root(self) -> None:
        sftp = self.client()
        parts = self.root.strip("/").split("/")
        current = ""
        for part in parts:
            current += "/" + part
            try:
                sftp.mkdir(current, 0o755)
            except OSError:
                try:
                    if not stat.S_ISDIR(sftp.stat(current).st_mode or 0):
                        raise UsageError(f"remote {current} is not a directory")
                except FileNotFoundError as e:
                    raise UsageError(f"cannot create remote {self.root}") from e
                except OSError as e:
                    raise UsageError(f"cannot create remote {self.root}: {e}") from e
            except Exception as e:
                raise _io_error(e, f"creating {self.root}") from e

    def scan(self, ignore: IgnoreRules) -> Manifest:
        """List the remote tree over SFTP, validating every name before use."""
        manifest = Manifest()
        if not self.root_exists():
            manifest.exists = False
            return manifest
        rules = ignore.copy()
        lister = _DirLister(self.client())
        try:
            return self._scan_tree(lister, rules, manifest)
        finally:
            lister.finish()

    def _scan_tree(self, lister: _DirLister, rules: IgnoreRules, manifest: Manifest) -> Manifest:
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                attrs = lister.get(rel_dir, self.full(rel_dir))
            except Exception as e:
                err = _io_error(e, f"listing {rel_dir or '.'}")
                if isinstance(err, LeftsshError):
                    raise err from e
                manifest.unreadable.add(rel_dir)
                manifest.skipped.append(Skipped(rel_dir or ".", f"unreadable: {err}"))
                continue
            attrs.sort()
            twice = {b[0] for a, b in zip(attrs, attrs[1:], strict=False) if a[0] == b[0]}
            if twice:
                # A listing that names an entry twice contradicts itself: trust neither.
                for name in sorted(twice):
                    manifest.skipped.append(Skipped(join(rel_dir, name), "duplicate name"))
                attrs = [a for a in attrs if a[0] not in twice]
            for name, mode, _, _ in attrs:
                if name == IGNORE_FILE and stat.S_ISREG(mode):
                    try:
                        lister.quiesce()  # the file is read over the lister's channel
                    except Exception as e:
                        raise self._error(e, f"listing {rel_dir or '.'}") from e
                    data = self._read_small(join(rel_dir, name))
                    manifest.ignore_files[rel_dir] = data
                    rules.add_nested(rel_dir, data)
            self._scan_dir(attrs, rel_dir, rules, manifest, stack)
            for rel in stack[: -_LIST_AHEAD - 1 : -1]:  # the next ones to be listed
                try:
                    lister.want(rel, self.full(rel))
                except UnsafePath:
                    pass  # get() reports it
        return manifest

    def _read_small(self, path: str) -> bytes:
        try:
            with self.client().open(self.full(path), "rb") as f:
                return f.read(1 << 20)
        except Exception as e:
            err = _io_error(e, f"reading {path}")
            if isinstance(err, LeftsshError):
                raise err from e
            raise UsageError(f"cannot read remote {path}: {err}") from e

    def _scan_dir(
        self,
        attrs: list[_Listed],
        rel_dir: str,
        rules: IgnoreRules,
        manifest: Manifest,
        stack: list[str],
    ) -> None:
        """Record the entries of one listed directory (sorted, no name twice)."""
        entries, skipped, ignored = manifest.entries, manifest.skipped, rules.is_ignored
        prefix = rel_dir + "/" if rel_dir else ""
        intern = sys.intern
        for name, mode, size, mtime in attrs:
            if name in (".", ".."):
                continue
            rel = prefix + name
            # Most names are short and ASCII: only the others need the full checks.
            if (
                not (name and name.isascii() and len(name) <= MAX_NAME_BYTES)
                or "/" in name
                or "\x00" in name
            ):
                try:
                    check_name(name)
                except UnsafePath:
                    skipped.append(Skipped(join(rel_dir, display(name)), "unsafe name"))
                    continue
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError:
                    skipped.append(Skipped(rel, "undecodable name (not UTF-8)"))
                    continue
            if is_internal(name):
                if name.endswith(PARTIAL_SUFFIX) and stat.S_ISREG(mode):
                    manifest.partials[rel] = size
                continue
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFDIR:
                if ignored(rel, True):
                    continue
                rel = intern(rel)
                entries[rel] = Entry(rel, DIR, mtime=shared_int(mtime))
                stack.append(rel)
            elif kind == stat.S_IFLNK:
                if not ignored(rel, False):
                    skipped.append(Skipped(rel, "symlink"))
            elif ignored(rel, False):
                continue
            elif kind != stat.S_IFREG:
                skipped.append(Skipped(rel, "special file"))
            else:
                rel = intern(rel)
                entries[rel] = Entry(
                    rel, FILE, size=size, mtime=shared_int(mtime), mode=shared_int(mode & 0o777)
                )

    def stat(self, path: str) -> Entry | None:
        try:
            a = self.client().lstat(self.full(path))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise _io_error(e, "stat") from e
        return _entry(path, a)

    def stat_many(self, paths: list[str]) -> dict[str, Entry | None]:
        """``stat`` of many paths, their LSTAT requests in flight together."""
        sftp = self.client()
        pipe = _Pipeline(sftp)
        found: dict[str, Entry | None] = {}
        problems: list[BaseException] = []

        def seen(path: str) -> _Callback:
            def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                if error is None and msg is not None and t == CMD_ATTRS:
                    found[path] = _entry(path, paramiko.SFTPAttributes._from_msg(msg))
                elif isinstance(error, FileNotFoundError):
                    found[path] = None
                else:
                    problems.append(error or paramiko.SFTPError("expected attributes"))

            return done

        try:
            for path in paths:
                pipe.make_room()
                pipe.send(seen(path), CMD_LSTAT, self.full(path))
            pipe.drain()
        except Exception as e:
            raise self._error(e, "stat") from e
        if problems:  # as stat: only a missing path is an answer
            raise _io_error(problems[0], "stat") from problems[0]
        return found

    # -- remote commands -----------------------------------------------------

    def _ask_shell(self, script: str | bytes, what: str) -> tuple[bool, bytes]:
        """Run ``script`` in an idle session shell (a new one if none is idle)."""
        with self._lock:
            shell = self._shells.pop() if self._shells else None
        if shell is None:
            try:
                shell = _Shell(self._t, self.timeout)
            except Exception as e:  # a refused channel leaves the connection as it was
                raise _io_error(e, f"starting a remote shell ({what})") from e
            with self._lock:
                self._all_shells.append(shell)
        try:
            done, out = shell.ask(script)
        except Exception as e:
            shell.close()
            raise self._error(e, what) from e
        if shell.alive:
            with self._lock:
                self._shells.append(shell)
        return done, out

    def _probe(self, script: str, what: str) -> bytes | None:
        """What the session shell printed for ``script``; None if it did not finish it
        or no shell could be started on a connection that is still up."""
        try:
            done, out = self._ask_shell(script, what)
        except ConnectError:
            if not self._t.is_active():
                raise
            return None
        return out if done else None

    def _hash_tool(self) -> remote_shell.HashTool | None:
        if not self._probed:
            with self._probe_lock:
                if not self._probed:
                    got = self._probe(remote_shell.PROBE_COMMAND, "probing md5sum")
                    self._tool = remote_shell.parse_probe(got, 0) if got is not None else None
                    self._probed = True
        return self._tool

    def can_hash(self) -> bool:
        return self._hash_tool() is not None

    def _remember_hashes(self, hashes: dict[str, str]) -> None:
        with self._lock:
            self._hashed.update(hashes)

    def _forget_hash(self, path: str) -> None:
        """``path`` is about to be written another way: its remembered MD5 is void."""
        if self._hashed:
            with self._lock:
                self._hashed.pop(path, None)

    def hash_files(self, paths: list[str]) -> dict[str, str]:
        """MD5 many remote files with one command per batch (names on stdin).

        A partial that the peer hashed right after unpacking it (see
        :meth:`_put_tarred`) is answered with that MD5, once, instead of again.
        """
        tool = self._hash_tool()
        if tool is None:
            raise HashUnavailable("the peer cannot run md5sum")
        result: dict[str, str] = {}
        if self._hashed:
            with self._lock:
                for p in paths:
                    md5 = self._hashed.pop(p, None)
                    if md5 is not None:
                        result[p] = md5
            paths = [p for p in paths if p not in result]
        for i in range(0, len(paths), _HASH_BATCH):
            batch = paths[i : i + _HASH_BATCH]
            for p in batch:
                check_name(p.rpartition("/")[2])
            script = remote_shell.hash_script(tool, self.root, batch)
            done, out = self._ask_shell(script, "hashing")
            if done:  # an answer cut off by a shell that went away is not trusted at all
                result.update(remote_shell.parse_hash_output(tool, out, batch))
        return result

    def hash_prefix(self, path: str, length: int) -> str | None:
        tool = self._hash_tool()
        if tool is None:
            return None
        command = remote_shell.prefix_hash_command(tool, self.root, path, length)
        done, out = self._ask_shell(f"({command})", "hashing a prefix")  # cd stays in ( )
        return remote_shell.parse_prefix_hash(tool, out) if done else None

    # -- transfers -------------------------------------------------------------

    _io_sizes: tuple[int, int] | None = None

    def _request_sizes(self, sftp: paramiko.SFTPClient) -> tuple[int, int]:
        """(read, write) bytes per request: the peer's limits@openssh.com, capped."""
        if self._io_sizes is None:
            sizes = (DEFAULT_REQUEST, DEFAULT_REQUEST)
            try:
                t, msg = sftp._request(CMD_EXTENDED, "limits@openssh.com")
                if t == CMD_EXTENDED_REPLY:
                    msg.get_int64()  # max packet length
                    read, write = msg.get_int64(), msg.get_int64()
                    if read > 0 and write > 0:
                        sizes = (min(read, MAX_REQUEST), min(write, MAX_REQUEST))
            except Exception as e:
                if _stops_pipeline(e):
                    raise
                # not supported (or not understood): keep the size every server takes
            self._io_sizes = sizes
        return self._io_sizes

    def read_chunks(
        self, path: str, offset: int, size: int | None = None, mtime: int | None = None
    ) -> Iterator[bytes | memoryview]:
        sftp = self.client()
        try:
            f = sftp.open(self.full(path), "rb")
        except Exception as e:
            raise _io_error(e, "open") from e
        listed, changed = size, False
        try:
            # Checked after the open: a swap before it is seen, and a read has no effect.
            self._inside(path, whole=True)
            claimed = f.stat().st_size or 0
            # The peer's fstat may lie: read at most one byte past the size the listing
            # gave (one more byte is enough to tell that the file is not what was listed).
            size = claimed if listed is None else min(claimed, listed + 1)
            request = self._request_sizes(sftp)[0]
            depth = max(2, READ_AHEAD // request)
            yield from _read_pipelined(sftp, f.handle, offset, size, request, depth)
            if mtime is not None:
                # The file read, by its handle (a path may name a symlink that a
                # listing following links reported as the file it leads to).
                st = f.stat()
                changed = int(st.st_mtime or 0) != mtime or (
                    listed is not None and st.st_size != listed
                )
        except Exception as e:
            raise self._error(e, "read") from e
        finally:
            try:
                f.close()
            except Exception:
                pass
        if changed:
            raise SourceChanged()

    def open_write(
        self,
        path: str,
        offset: int,
        attrs: tuple[int, int] | None = None,
        follow: bool = False,
    ) -> BinaryIO:
        """Open a partial for writing at ``offset``; ``attrs`` (mtime, mode) are set on close.

        With ``follow`` (a large file), the peer hashes the partial while it is written;
        the writer's ``md5`` then holds that hash after ``close`` (None if it failed).
        """
        sftp = self.client()
        full = self.full(path)
        self._forget_hash(path)
        self._inside(path, whole=bool(offset))
        try:
            if offset:
                f = sftp.open(full, "r+b")
                f.truncate(offset)
                f.seek(offset)
            else:
                f = self._create(full)
            request = self._request_sizes(sftp)[1]
        except Exception as e:
            raise _io_error(e, "open for writing") from e
        writer = _GuardedWriter(f, offset, request, max(2, WRITE_AHEAD // request))
        writer.on_lost = self._t.close
        writer.attrs = attrs
        if follow:
            writer._acked = offset
            if self._probed:
                writer.follower = self._follower(path)
                if writer.follower is not None and offset:
                    writer.follower.advance(offset)
            else:
                # The md5 probe has not answered yet: the writing need not wait for it.
                writer.joining = self._start_follower(path)
        return writer  # type: ignore[return-value]

    def _start_follower(self, path: str) -> Future[_Follower | None]:
        started: Future[_Follower | None] = Future()

        def run() -> None:
            try:
                started.set_result(self._follower(path))
            except BaseException:
                started.set_result(None)

        threading.Thread(target=run, name="follower", daemon=True).start()
        return started

    def _follower(self, path: str) -> _Follower | None:
        tool = self._hash_tool()
        if tool is None:
            return None
        perl = self._perl_md5_usable()
        try:
            chan = self._t.open_session(timeout=self.timeout)
            chan.settimeout(self.timeout)
            chan.exec_command(remote_shell.follow_hash_command(tool, self.root, path, perl))
        except Exception:
            return None
        return _Follower(chan, tool)

    def _create(self, full: str) -> paramiko.SFTPFile:
        """Create a new partial file exclusively (O_EXCL never follows a symlink).

        Partial names are predictable, so whatever already holds the name (an old
        partial, or a symlink planted there) is removed, never opened.
        """
        sftp = self.client()
        try:
            return sftp.open(full, "wx")
        except OSError as e:
            try:
                sftp.remove(full)
            except OSError:
                raise e from None
            return sftp.open(full, "wx")

    def set_attrs(self, path: str, mtime: int, mode: int) -> None:
        attr = paramiko.SFTPAttributes()
        attr.st_mode = mode & 0o777
        attr.st_atime = mtime
        attr.st_mtime = mtime
        self._inside(path, whole=True)
        try:
            self.client()._request(CMD_SETSTAT, self.full(path), attr)
        except Exception as e:
            raise _io_error(e, "setting mtime and mode") from e

    def commit(self, partial: str, path: str, expected: Entry | None) -> None:
        """Rename the partial over ``path`` unless ``path`` changed since the scan."""
        sftp = self.client()
        src, dst = self.full(partial), self.full(path)
        # No separate parent check here: the partial was created in this directory
        # after one, and a parent swapped since cannot hold it, so the rename fails.
        try:
            if expected is None:
                # Plain SFTP rename refuses to replace an existing file: no clobbering.
                try:
                    sftp.rename(src, dst)
                except OSError as e:
                    if self.stat(path) is not None:
                        raise ChangedError("appeared since the scan; not overwritten") from e
                    raise
                return
            if not matches(self.stat(path), expected):
                raise ChangedError("changed since the scan; not overwritten")
            sftp.posix_rename(src, dst)
        except TransferError:
            raise
        except Exception as e:
            raise _io_error(e, "rename into place") from e

    def put_files(
        self, items: Iterable[tuple[str, bytes, tuple[int, int]]]
    ) -> Callable[[], dict[str, Exception]]:
        """Create and fill many small partials, with mtime and mode set.

        Each item is (partial path, its whole content, (mtime, mode)), taken from
        ``items`` as they can be sent. Returns, once all are sent, a function that
        waits for the last ones to be in place and returns the failures by partial
        path (the caller may retry those one by one); a stalled or lost connection
        raises ConnectError from either. When the peer has GNU tar the files travel
        as archives, one or more per directory (:meth:`_put_tarred`); otherwise
        each file is written with its own pipelined requests (:meth:`_put_each`).
        """
        if self._tar_usable():
            return self._put_tarred(items)
        failed = self._put_each(items)
        return lambda: failed

    def wire_size(self, name: str, size: int) -> int:
        """About how many bytes ``put_files`` sends for a file (for ``--bwlimit``)."""
        if self._tar:
            return tar.member_size(len(_encode(name.rpartition("/")[2])), size)
        # an OPEN, WRITE, FSETSTAT and CLOSE with their headers, names and handles
        return size + 4 * 13 + 2 * len(_encode(name)) + 40

    def _put_each(
        self,
        items: Iterable[tuple[str, bytes, tuple[int, int]]],
        on_done: Callable[[str], None] | None = None,
    ) -> dict[str, Exception]:
        """Write each file with its own requests, every request of every file pipelined.

        For each item, the directory is checked first (a REALPATH must resolve inside
        the share); only its answer sends the exclusive OPEN, then the WRITEs, an
        FSETSTAT of mtime and mode on the handle and the CLOSE. Many files are at
        different steps at once. ``on_done`` is called with each partial path whose
        CLOSE succeeded. A partial that failed after it was created is removed.
        """
        sftp = self.client()
        pipe = _Pipeline(sftp)
        real_root = self._resolved_root(sftp)
        request = self._request_sizes(sftp)[1]
        failed: dict[str, Exception] = {}
        in_flight = [0]

        def checked(put: _Put, parent: str) -> _Callback:
            def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                problem = _outside(put.path, parent, real_root, t, msg, error)
                if problem is not None:
                    put.fail(problem)
                if put.error is not None:
                    finish(put)
                    return
                open_partial(put)

            return done

        def open_partial(put: _Put) -> None:
            flags = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_EXCL
            pipe.send(opened(put), CMD_OPEN, self.full(put.path), flags, _NO_ATTRS)

        def opened(put: _Put) -> _Callback:
            def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                if error is not None or msg is None or t != CMD_HANDLE:
                    put.fail(error or paramiko.SFTPError("expected a handle"))
                    finish(put)
                    return
                handle = msg.get_binary()
                try:
                    attrs = _mode_and_times(put.attrs[1], put.attrs[0])
                except struct.error:  # SFTP v3 times are 32-bit: the one-by-one path says so
                    put.fail(paramiko.SFTPError("mtime out of the SFTP range"))
                else:
                    view = memoryview(put.data)
                    for at in range(0, len(view), request):
                        piece = view[at : at + request]
                        pipe.send(written(put), CMD_WRITE, handle, int64(at), piece)
                    pipe.send(written(put), CMD_FSETSTAT, handle, attrs)
                pipe.send(closed(put), CMD_CLOSE, handle)

            return done

        def written(put: _Put) -> _Callback:
            def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                if error is not None:
                    put.fail(error)

            return done

        def closed(put: _Put) -> _Callback:
            def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                if error is not None:
                    put.fail(error)
                if put.error is not None:
                    pipe.send(_ignore, CMD_REMOVE, self.full(put.path))
                finish(put)

            return done

        def finish(put: _Put) -> None:
            in_flight[0] -= len(put.data)
            put.data = b""
            if put.error is not None:
                failed[put.path] = _io_error(put.error, "write")
            elif on_done is not None:
                on_done(put.path)

        def start(path: str, data: bytes, attrs: tuple[int, int]) -> None:
            self._forget_hash(path)
            put = _Put(path, data, attrs)
            in_flight[0] += len(data)
            parent = path.rpartition("/")[0]
            if parent:
                pipe.send(checked(put, parent), CMD_REALPATH, self.full(parent))
            else:
                open_partial(put)

        source = iter(items)
        try:
            while True:
                while len(pipe) < PIPELINE_REQUESTS and in_flight[0] < PIPELINE_BYTES:
                    item = next(source, None)
                    if item is None:
                        break
                    start(*item)
                if not len(pipe):
                    return failed
                pipe.step()
        except BaseException as e:
            self._end_pipeline(pipe, e, "write")

    def _end_pipeline(self, pipe: _Pipeline, e: BaseException, what: str) -> NoReturn:
        """Raise what ``e`` means for the run, once every handle in ``pipe`` is closed
        (unless the channel itself is gone)."""
        if not _stops_pipeline(e):
            try:
                pipe.drain()  # close every handle before the error goes on
            except Exception as again:
                raise self._error(again, what) from e
        if isinstance(e, Exception) and _stops_pipeline(e):
            raise self._error(e, what) from e
        raise e

    def get_files(
        self, items: Iterable[tuple[str, int]]
    ) -> Generator[tuple[str, bytes | Exception, int, int], None, None]:
        """Read many small files, every request of every file pipelined.

        For each (path, size the listing gave): the OPEN, then on its handle a
        REALPATH of the path (as :meth:`read_chunks` checks after its open: it must
        resolve to that path in the share); only once that answered, the FSTAT,
        READs of at most one byte past the listed size, and the CLOSE. Many files
        are at different steps at once. Yields, in the order given, (path, data,
        size, mtime) with the file's size and whole-second mtime from the FSTAT
        (the data cut to that size), or (path, error, -1, -1): a file whose data
        came short of that size is an error too, for the one-file path to read.
        """
        sftp = self.client()
        pipe = _Pipeline(sftp)
        real_root = self._resolved_root(sftp)
        request = self._request_sizes(sftp)[0]
        order: collections.deque[_Get] = collections.deque()  # in the order given
        in_flight = [0]

        def guarded(get: _Get, handle: _Callback) -> _Callback:
            """An answer that cannot be read fails its file, not the pipeline."""

            def answer(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                try:
                    handle(t, msg, error)
                except Exception as e:
                    get.fail(e)
                    if not get.closing:  # the handle is still to be closed
                        get.closing = True
                        get.finished = get.handle is None
                        if get.handle is not None:
                            pipe.send(closed(get), CMD_CLOSE, get.handle)

            return answer

        def opened(get: _Get) -> _Callback:
            def answer(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                if error is not None or msg is None or t != CMD_HANDLE:
                    get.closing = True
                    get.finished = True
                    get.fail(error or paramiko.SFTPError("expected a handle"))
                    return
                get.handle = msg.get_binary()
                pipe.send(guarded(get, checked(get)), CMD_REALPATH, self.full(get.path))

            return answer

        def checked(get: _Get) -> _Callback:
            def answer(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                problem = _outside(get.path, get.path, real_root, t, msg, error)
                get.closing = True
                if problem is not None:
                    get.fail(problem)  # nothing is read through a symlink
                else:
                    handle = get.handle
                    pipe.send(guarded(get, stated(get)), CMD_FSTAT, handle)
                    for at in range(0, get.want, request):
                        asked = min(request, get.want - at)
                        pipe.send(
                            guarded(get, read(get, at, asked)), CMD_READ, handle, int64(at), asked
                        )
                pipe.send(closed(get), CMD_CLOSE, get.handle)

            return answer

        def stated(get: _Get) -> _Callback:
            def answer(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                if error is not None or msg is None or t != CMD_ATTRS:
                    get.fail(error or paramiko.SFTPError("expected attributes"))
                    return
                attrs = paramiko.SFTPAttributes._from_msg(msg)
                if attrs.st_size is None or attrs.st_mtime is None:
                    get.fail(paramiko.SFTPError("no size or mtime from the peer"))
                    return
                get.size, get.mtime = attrs.st_size, int(attrs.st_mtime)

            return answer

        def read(get: _Get, at: int, asked: int) -> _Callback:
            def answer(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                if isinstance(error, _EndOfFile):
                    return  # nothing at or past ``at``
                if error is not None or msg is None or t != CMD_DATA:
                    get.fail(error or paramiko.SFTPError("expected data"))
                    return
                piece = _data(msg)
                if len(piece) > asked:
                    get.fail(paramiko.SFTPError("more data than asked for"))
                    return
                get.pieces.append((at, asked, piece))

            return answer

        def closed(get: _Get) -> _Callback:
            def answer(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                get.finished = True  # a read handle that would not close has given its data

            return answer

        def result(get: _Get) -> tuple[str, bytes | Exception, int, int]:
            in_flight[0] -= get.want
            if get.error is None:
                try:
                    data = get.data()
                    # No more than the open file's size (as read_chunks reads): a peer
                    # whose listing and fstat agree on a wrong size passes a size check.
                    data = data[: get.size]
                    if len(data) < min(get.size, get.want):
                        raise paramiko.SFTPError("the peer answered short of the file's size")
                    return get.path, data, get.size, get.mtime
                except paramiko.SFTPError as e:
                    get.error = e
            return get.path, _io_error(get.error, "read"), -1, -1

        source = iter(items)
        more = True
        try:
            while True:
                while more and len(pipe) < PIPELINE_REQUESTS and in_flight[0] < PIPELINE_BYTES:
                    item = next(source, None)
                    if item is None:
                        more = False
                        break
                    path, size = item
                    get = _Get(path, size + 1)
                    in_flight[0] += get.want
                    order.append(get)
                    pipe.send(
                        guarded(get, opened(get)),
                        CMD_OPEN,
                        self.full(path),
                        SFTP_FLAG_READ,
                        _NO_ATTRS,
                    )
                if len(pipe):
                    pipe.step()
                while order and order[0].finished:
                    yield result(order.popleft())
                if not len(pipe) and not more:
                    break
        except BaseException as e:
            self._end_pipeline(pipe, e, "read")

    def warm_up(self, hashes: bool) -> None:
        """Start the run's shell and ask it what it has, on a thread of its own.

        The first command of a session pays the login shell's start-up (a user's
        ``.bashrc`` may take a tenth of a second); a copy that needs the shell then
        finds it ready, and finds the answers about tar and perl known (asked later,
        they would wait behind the unpacking of archives). With ``hashes`` the md5
        probes are asked too (archives are then hashed as soon as they are unpacked).
        Failures are left for the copy to meet.
        """

        def ask() -> None:
            with contextlib.suppress(Exception):
                if hashes:
                    self._hash_tool()
                self._tar_usable()
                self._perl_usable()
                if hashes:
                    self._perl_md5_usable()

        threading.Thread(target=ask, name="sftp-warm-up", daemon=True).start()

    def _tar_usable(self) -> bool:
        """Tell (asking once) whether the peer's session shell has GNU tar."""
        return self._has("_tar", remote_shell.TAR_PROBE, remote_shell.parse_tar_probe)

    def _perl_usable(self) -> bool:
        """Tell (asking once) whether the peer's session shell has perl."""
        return self._has("_perl", remote_shell.PERL_PROBE, remote_shell.parse_perl_probe)

    def _perl_md5_usable(self) -> bool:
        """Tell (asking once) whether the peer's perl has Digest::MD5 (for the follower)."""
        return self._has("_perl_md5", remote_shell.FOLLOW_PERL_PROBE, remote_shell.parse_perl_probe)

    def _has(self, attribute: str, script: str, parse: Callable[[bytes], bool]) -> bool:
        """The answer kept in ``attribute``, asked once: did ``script`` print what
        ``parse`` looks for (False if the shell could not run it)."""
        known = getattr(self, attribute)
        if known is None:
            with self._probe_lock:
                known = getattr(self, attribute)
                if known is None:
                    got = self._probe(script, f"probing {attribute.lstrip('_')}")
                    known = got is not None and parse(got)
                    setattr(self, attribute, known)
        return known

    def _first_archive_in(self, parent: str) -> bool:
        """True once per directory: the first archive there clears older runs' leftovers."""
        with self._lock:
            first = parent not in self._swept
            self._swept.add(parent)
        return first

    def _put_tarred(
        self, items: Iterable[tuple[str, bytes, tuple[int, int]]]
    ) -> Callable[[], dict[str, Exception]]:
        """Send the files of each directory as archives that the peer's tar unpacks.

        Consecutive files of one directory go into one archive (up to ``ARCHIVE_BYTES``
        or ``ARCHIVE_FILES``), written as a partial of its own in that directory by
        :meth:`_put_each` (so its directory is checked like any other). As soon as an
        archive is closed, the connection's unpacking thread (:class:`_Unpacker`) has
        the session shell unpack it there (:func:`remote_shell.unpack_script`) while
        the next ones are written, and goes on after this returns; the function
        returned waits for it. A file whose archive was not written or not wholly
        unpacked is reported failed.
        """
        unpacker = self._unpacking()
        failed: dict[str, Exception] = {}
        archives: dict[str, _Archive] = {}

        def packed() -> Iterator[tuple[str, bytes, tuple[int, int]]]:
            parent: str | None = None
            pieces: list[bytes] = []
            paths: list[str] = []
            size = 0
            for path, data, (mtime, mode) in items:
                where, _, name = path.rpartition("/")
                if paths and (
                    where != parent or size >= ARCHIVE_BYTES or len(paths) >= ARCHIVE_FILES
                ):
                    yield self._archive(parent or "", pieces, paths, archives, failed)
                    pieces, paths, size = [], [], 0
                parent = where
                self._forget_hash(path)
                try:
                    got = tar.member(_encode(name), data, mtime, mode)
                except ValueError as e:
                    failed[path] = TransferError(f"write: {e}")
                    continue
                pieces += got
                paths.append(path)
                size += len(data)
            if paths:
                yield self._archive(parent or "", pieces, paths, archives, failed)

        not_written = self._put_each(packed(), on_done=lambda p: unpacker.submit(archives[p]))
        count = unpacker.submitted()

        def unpacked() -> dict[str, Exception]:
            unpacker.wait(count)
            for path, error in not_written.items():
                archives[path].fail(error)
            return failed

        return unpacked

    def _unpacking(self) -> _Unpacker:
        real_root = self._resolved_root(self.client())
        with self._lock:
            if self._unpacker is None:
                self._unpacker = _Unpacker(self, real_root)
            return self._unpacker

    def _archive(
        self,
        parent: str,
        pieces: list[bytes],
        paths: list[str],
        archives: dict[str, _Archive],
        failed: dict[str, Exception],
    ) -> tuple[str, bytes, tuple[int, int]]:
        with self._lock:
            self._archives += 1
            number = self._archives
        path = join(parent, remote_shell.archive_name(self._run, number))
        archives[path] = _Archive(path, paths, failed)
        pieces.append(tar.END)
        return path, b"".join(pieces), (int(time.time()), 0o600)

    def rename_new(self, pairs: list[tuple[str, str]]) -> dict[str, Exception]:
        """Rename many partials to names that held nothing at the scan, pipelined.

        Plain SFTP RENAME never replaces an existing file, so a name that appeared
        since the scan is not clobbered: that pair fails, like any other that did not
        go through. Returns the failures by partial path; the caller decides what each
        one means (see :meth:`commit`).
        """
        failed: dict[str, Exception] = {}
        if len(pairs) >= SHELL_RENAMES and self._perl_usable():
            pairs = self._rename_in_shell(pairs, failed)
            if not pairs:
                return failed
        sftp = self.client()
        pipe = _Pipeline(sftp)

        def renamed(partial: str) -> _Callback:
            def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                if error is not None:
                    failed[partial] = _io_error(error, "rename into place")

            return done

        try:
            for partial, path in pairs:
                pipe.make_room()
                pipe.send(renamed(partial), CMD_RENAME, self.full(partial), self.full(path))
            pipe.drain()
        except Exception as e:
            raise self._error(e, "rename into place") from e
        return failed

    def _rename_in_shell(
        self, pairs: list[tuple[str, str]], failed: dict[str, Exception]
    ) -> list[tuple[str, str]]:
        """Rename pairs with perl in the session shell (:func:`remote_shell.rename_script`).

        Each pair's line says what became of it. A pair refused for a reason of its
        own goes into ``failed``: a ChangedError when its new name was taken, else a
        RenameRefused (a partial gone or no longer a regular file is never renamed
        by SFTP, which would rename whatever holds its name). Returned are the pairs
        left for SFTP: those with no line (all of them if no shell could be started),
        and those whose link(2) the file system does not support (OpenSSH's RENAME
        then uses rename(2)).
        A shell that ended early still tells what it did before.
        """
        try:
            _, out = self._ask_shell(remote_shell.rename_script(self.root, pairs), "renaming")
        except ConnectError:
            if not self._t.is_active():
                raise
            return pairs
        left: list[tuple[str, str]] = []
        for number, why in remote_shell.parse_rename_output(out, pairs).items():
            partial, path = pairs[number]
            if why in _LINK_UNSUPPORTED:
                left.append(pairs[number])
            elif why == "EEXIST":
                failed[partial] = ChangedError("appeared since the scan; not overwritten")
            else:
                failed[partial] = RenameRefused(f"rename into place: {_why(why)}")
        return left

    def _resolved_root(self, sftp: paramiko.SFTPClient) -> str:
        if self._real_root is None:
            try:
                self._real_root = sftp.normalize(self.root)
            except Exception as e:
                raise _io_error(e, "resolving the share") from e
        return self._real_root

    def make_dirs(self, paths: list[str]) -> dict[str, Exception]:
        """Make many directories, as :meth:`mkdir` would, with their requests in flight.

        Parents come before their children in ``paths``: the directories are made
        one depth at a time. For each, the parent is checked first (a REALPATH must
        resolve inside the share), and only its answer sends the MKDIR; a MKDIR that
        fails is followed by an LSTAT, so a directory already there is no failure and
        a non-directory in the way is a ChangedError. Returns the failures by path.
        """
        sftp = self.client()
        real_root = self._resolved_root(sftp)
        pipe = _Pipeline(sftp)
        failed: dict[str, Exception] = {}

        def make(path: str) -> None:
            pipe.send(made(path), CMD_MKDIR, self.full(path), _DIR_ATTRS)

        def checked(path: str, parent: str) -> _Callback:
            def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                problem = _outside(path, parent, real_root, t, msg, error)
                if isinstance(problem, UnsafePath):
                    failed[path] = problem
                elif problem is not None and not isinstance(problem, FileNotFoundError):
                    failed[path] = _io_error(problem, "mkdir")
                else:  # a missing parent has nothing to follow: the MKDIR fails on its own
                    make(path)

            return done

        def made(path: str) -> _Callback:
            def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                if error is not None:
                    pipe.send(found(path, error), CMD_LSTAT, self.full(path))

            return done

        def found(path: str, cause: BaseException) -> _Callback:
            def done(t: int, msg: paramiko.Message | None, error: BaseException | None) -> None:
                if error is None and msg is not None and t == CMD_ATTRS:
                    if stat.S_ISDIR(paramiko.SFTPAttributes._from_msg(msg).st_mode or 0):
                        return
                    failed[path] = ChangedError("a non-directory is in the way")
                else:
                    failed[path] = _io_error(cause, "mkdir")

            return done

        levels: dict[int, list[str]] = {}
        for path in paths:
            levels.setdefault(path.count("/"), []).append(path)
        try:
            for level in sorted(levels):
                for path in levels[level]:
                    pipe.make_room()
                    parent = path.rpartition("/")[0]
                    if parent:
                        pipe.send(checked(path, parent), CMD_REALPATH, self.full(parent))
                    else:
                        make(path)
                pipe.drain()
        except Exception as e:
            raise self._error(e, "mkdir") from e
        return failed

    def mkdir(self, path: str) -> None:
        self._inside(path)
        try:
            self.client().mkdir(self.full(path), 0o755)
        except Exception as e:
            found = self.stat(path)
            if found is not None and found.is_dir:
                return
            if found is not None:
                raise ChangedError("a non-directory is in the way") from e
            raise _io_error(e, "mkdir") from e

    def remove(self, path: str, expected: Entry | None) -> None:
        found = self.stat(path)
        if found is None:
            return
        if expected is not None and not matches(found, expected):
            raise ChangedError("changed since the scan; not deleted")
        self._inside(path)
        try:
            if found.is_dir:
                self.client().rmdir(self.full(path))
            else:
                self.client().remove(self.full(path))
        except OSError as e:
            if found.is_dir and self.client().listdir(self.full(path)):
                raise TransferError("directory not empty (holds ignored or new files)") from e
            raise _io_error(e, "delete") from e
        except Exception as e:
            raise _io_error(e, "delete") from e

    def remove_partial(self, path: str) -> None:
        self._forget_hash(path)
        self._inside(path)
        try:
            self.client().remove(self.full(path))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise _io_error(e, "removing a partial file") from e

    def rename_aside(self, path: str, new_path: str, expected: Entry | None) -> None:
        if not matches(self.stat(path), expected):
            raise ChangedError("changed since the scan; not moved")
        self._inside(path)
        try:
            self.client().rename(self.full(path), self.full(new_path))
        except Exception as e:
            raise _io_error(e, "rename") from e

    # -- locking -------------------------------------------------------------

    def acquire_lock(self, command: str) -> None:
        """Take the remote share's run lock (exclusive create) or raise LockError.

        Each step's requests go together (:class:`_Pipeline`): the exclusive OPEN;
        then the WRITE, the CLOSE and an OPEN of the path again for reading; then
        the READ, FSTAT and CLOSE that read back what the path now holds. Three
        round trips where one request at a time took eight; a lock found taken is
        read in two."""
        sftp = self.client()
        path = self.full(lock.LOCK_NAME)
        read_back: list[tuple[bytes, float] | None] = []

        def refused(e: Exception) -> Exception:
            if isinstance(e, OSError) and not _stops_pipeline(e):
                return UsageError(f"cannot lock {self.label}: {e}")
            return self._error(e, "taking the lock")  # a lost connection stays one

        def create(data: bytes) -> bool:
            try:
                got = _exchange(sftp, [(CMD_OPEN, (path, _CREATE_EXCL, _NO_ATTRS))])[0]
                handle = _handle_of(got)
                if handle is None:
                    return False  # it exists (or vanishes again: read() tells)
                wrote, closed, opened = _exchange(
                    sftp,
                    [
                        (CMD_WRITE, (handle, int64(0), data)),
                        (CMD_CLOSE, (handle,)),
                        (CMD_OPEN, (path, SFTP_FLAG_READ, _NO_ATTRS)),
                    ],
                )
                if wrote[2] is not None or closed[2] is not None:
                    # Created but not written: read() finds it without a holder.
                    if (reading := _handle_of(opened)) is not None:
                        _exchange(sftp, [(CMD_CLOSE, (reading,))])
                    return False
                read_back.append(_read_back(sftp, opened))
                return True
            except Exception as e:
                raise refused(e) from e

        def read() -> tuple[bytes, float] | None:
            if read_back:  # what create() read back, right after it wrote
                return read_back.pop()
            try:
                opened = _exchange(sftp, [(CMD_OPEN, (path, SFTP_FLAG_READ, _NO_ATTRS))])[0]
                return _read_back(sftp, opened)
            except Exception as e:
                raise refused(e) from e

        def remove() -> None:
            try:
                sftp.remove(path)
            except OSError:
                pass

        lock.take(create, read, remove, self.label, command)
        self._lock_path = path

    def touch_lock(self) -> None:
        if self._lock_path:
            now = int(time.time())
            self.client().utime(self._lock_path, (now, now))

    def release_lock(self) -> None:
        if self._lock_path and self._t.is_active():
            try:
                self.client().remove(self._lock_path)
            except Exception:
                pass
        self._lock_path = None

    def close(self) -> None:
        self.release_lock()
        if self._unpacker is not None:
            self._unpacker.close()
        for shell in self._all_shells:
            shell.close()
        for sftp in self._clients:
            try:
                sftp.close()
            except Exception:
                pass
        self._t.close()
        hop = getattr(self._t, "_leftssh_hop", None)
        if hop is not None:
            hop.close()
