"""An in-process SSH server on 127.0.0.1 whose SFTP listings and md5sum answers can lie.

A real OpenSSH server cannot imitate a hostile peer, so this one is built from paramiko's
server side. It serves a real directory (``backing``, seen by the client as ``/``) and
answers ``exec`` requests for the commands leftssh sends (the session shell with the md5
probe, batched ``md5sum -z`` and ``head -c | md5sum`` prefix hash scripts, and the
commands of its own) by computing the answers itself.
Every answer can be made hostile through the attributes documented on the class; they
are read on each request, so a test can change them between runs.

Usage::

    with HostileServer(tmp_path / "peer") as peer:
        peer.extra_entries["/share"] = [fake("../escape", size=3)]
        run_leftssh("pull", peer.target("/share"), "-d", local, *peer.cli_args())
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import random
import re
import shlex
import socket
import stat
import subprocess
import threading
from pathlib import Path
from types import TracebackType

import paramiko
from paramiko.sftp import SFTP_FAILURE, SFTP_OK, SFTP_OP_UNSUPPORTED, SFTP_PERMISSION_DENIED

from leftssh.transport.remote_shell import PROBE_COMMAND, SESSION_COMMAND

__all__ = ["HostileServer", "fake"]

# The end of one script sent to the session shell: the line printing its marker.
_SESSION_END = re.compile(rb"\nprintf '\\n%s\\n' (?P<marker>[A-Za-z0-9._-]+)\n")
EXEC_MODES = ("honest", "garbage", "nothing", "fail", "lie")


def fake(name: str | bytes, *, kind: str = "file", size: int = 0, mtime: int = 1_600_000_000):
    """Return a listing entry that exists only in the listing (``kind``: file, dir, link)."""
    attr = paramiko.SFTPAttributes()
    attr.filename = name
    modes = {"file": stat.S_IFREG | 0o644, "dir": stat.S_IFDIR | 0o755, "link": stat.S_IFLNK}
    attr.st_mode = modes[kind] | 0o777 if kind == "link" else modes[kind]
    attr.st_size = size
    attr.st_uid = attr.st_gid = 0
    attr.st_atime = attr.st_mtime = mtime
    return attr


class HostileServer:
    """An SSH server (SFTP + exec) on 127.0.0.1 that lies on request.

    Knobs (SFTP paths are absolute, as the client sends them, e.g. ``/share/a.txt``):

    - ``extra_entries[dir]``: fake entries appended to the listing of ``dir``;
    - ``size_lies[path]``: ``st_size`` claimed by listings, stat and lstat;
    - ``kind_lies[path]``: the type (``file`` or ``dir``) claimed by listings, stat and lstat;
    - ``fstat_lies[path]``: ``st_size`` claimed by fstat of an open handle;
    - ``open_fails``: paths whose open fails (listed as files, but not openable);
    - ``listing_fails``: directories whose listing fails;
    - ``follow_links``: listings and opens follow symlinks (some servers list a
      symlink as what it leads to);
    - ``corrupt_writes``: flip one byte of every write the client makes;
    - ``exec_mode``: ``honest``, ``garbage`` (random bytes, exit 0), ``nothing`` (no
      output, exit 0), ``fail`` (``sh: md5sum: not found``, exit 127) or ``lie`` (the
      probe succeeds, every hash printed is wrong);
    - ``hash_claims[path]``: the MD5 claimed for ``path`` (any mode that hashes);
    - ``extra_hash_records``: records appended to every md5sum answer (names the client
      never asked for).

    ``exec_log`` keeps every command received, ``requested`` every path an SFTP request
    named (normalized, as this server resolves it).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.backing = self.workdir / "fs"
        self.user = "tester"
        self.port = 0
        self.extra_entries: dict[str, list[paramiko.SFTPAttributes]] = {}
        self.size_lies: dict[str, int] = {}
        self.kind_lies: dict[str, str] = {}
        self.fstat_lies: dict[str, int] = {}
        self.open_fails: set[str] = set()
        self.listing_fails: set[str] = set()
        self.follow_links = False
        self.corrupt_writes = False
        self.exec_mode = "honest"
        self.hash_claims: dict[str, str] = {}
        self.extra_hash_records: list[bytes] = []
        self.exec_log: list[str] = []
        self.requested: list[str] = []
        self._rng = random.Random(1234)
        self._listener: socket.socket | None = None
        self._transports: list[paramiko.Transport] = []
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self.identity = self.workdir / "id_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self._host_key: paramiko.PKey | None = None
        self._client_key_b64 = ""

    # -- public API -------------------------------------------------------------------------

    def start(self) -> HostileServer:
        self.backing.mkdir(parents=True, exist_ok=True)
        self._host_key = paramiko.ECDSAKey.generate()
        if not self.identity.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.identity)],
                check=True,
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
        self._client_key_b64 = self.identity.with_suffix(".pub").read_text().split()[1]
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        key = self._host_key
        self.known_hosts.write_text(
            f"[127.0.0.1]:{self.port} {key.get_name()} {key.get_base64()}\n"
        )
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._listener is not None:
            self._listener.close()
        for t in list(self._transports):
            with contextlib.suppress(Exception):
                t.close()
        for th in self._threads:
            th.join(5)

    def cli_args(self) -> list[str]:
        return ["-i", str(self.identity), "--known-hosts", str(self.known_hosts)]

    def target(self, path: str) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def real(self, path: str) -> Path:
        """The backing file for an SFTP path (never outside ``backing``)."""
        clean = posixpath.normpath("/" + path).lstrip("/")
        return self.backing / clean if clean else self.backing

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- connections ------------------------------------------------------------------------

    def _spawn(self, target, *args) -> None:
        th = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(th)
        th.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        t = paramiko.Transport(sock)
        self._transports.append(t)
        assert self._host_key is not None
        t.add_server_key(self._host_key)
        t.set_subsystem_handler("sftp", paramiko.SFTPServer, _HostileSFTP, self)
        try:
            t.start_server(server=_Interface(self))
        except (paramiko.SSHException, EOFError, OSError):
            return
        channels = []  # a dropped Channel object closes itself when garbage-collected
        while t.is_active() and not self._closing.is_set():
            chan = t.accept(0.2)
            if chan is not None:
                channels.append(chan)

    # -- exec -------------------------------------------------------------------------------

    def run_exec(self, channel: paramiko.Channel, command: str) -> None:
        if command == SESSION_COMMAND and self.exec_mode in ("honest", "lie"):
            self.run_session(channel)
            return
        try:
            stdin = b""
            channel.settimeout(10)
            while True:
                block = channel.recv(65536)
                if not block:
                    break
                stdin += block
            status, out, err = self.answer(command, stdin)
            if out:
                channel.sendall(out)
            if err:
                channel.sendall_stderr(err)
            channel.send_exit_status(status)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            channel.close()

    def run_session(self, channel: paramiko.Channel) -> None:
        """Play ``sh`` reading scripts on stdin: answer each one, then print its marker."""
        try:
            channel.settimeout(10)
            buf = b""
            while True:
                end = _SESSION_END.search(buf)
                if end is None:
                    block = channel.recv(65536)
                    if not block:
                        break
                    buf += block
                    continue
                script, buf = buf[: end.start()], buf[end.end() :]
                out = self.answer_script(script)
                channel.sendall(out + b"\n" + end.group("marker") + b"\n")
            channel.send_exit_status(0)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                channel.close()

    def answer_script(self, script: bytes) -> bytes:
        """What the session shell prints for one script: the probe, a hash batch or a prefix hash."""
        text = script.decode("utf-8", "surrogateescape")
        self.exec_log.append(text)
        if text == PROBE_COMMAND:
            return b"gnu-z\n"
        if text.startswith("(") and text.endswith(")"):
            prefix = self._answer_prefix(text[1:-1])
            if prefix is not None:
                return prefix[1]
        words = _shell_words(script)
        shape = [w for w, quoted in words[:7]]
        if shape[:3] != ["(", "cd", "--"] or words[-8:] != _HASH_TAIL:
            return b""
        root = words[3][0]
        names: list[bytes] = []
        collecting = False
        for w, quoted in words[4:-8]:
            if collecting and not quoted and w == ";":
                collecting = False
            elif collecting:
                names.append(w.encode("utf-8", "surrogateescape"))
            elif w == "%s\\0":
                collecting = True
        stdin = b"".join(n + b"\0" for n in names)
        return self._hash_batch(root, stdin, self.exec_mode == "lie")[1]

    def answer(self, command: str, stdin: bytes) -> tuple[int, bytes, bytes]:
        """Return (exit status, stdout, stderr) for one command, as the knobs dictate."""
        self.exec_log.append(command)
        mode = self.exec_mode
        if mode == "nothing":
            return 0, b"", b""
        if mode == "fail":
            return 127, b"", b"sh: 1: md5sum: not found\n"
        if mode == "garbage":
            junk = bytes(self._rng.randrange(256) for _ in range(300))
            return 0, junk.replace(b"gnu", b"GNU").replace(b"bsd", b"BSD"), b""
        if command == PROBE_COMMAND:
            return 0, b"gnu-z\n", b""
        prefix = self._answer_prefix(command)
        if prefix is not None:
            return prefix[0], prefix[1], b""
        return 127, b"", b"sh: 1: unknown command\n"

    def _answer_prefix(self, command: str) -> tuple[int, bytes] | None:
        """(status, output) of a ``head -c | md5sum`` prefix hash; None for another command."""
        prefix = self._parse_prefix(command)
        if prefix is None:
            return None
        root, name, count = prefix
        data = self._read(posixpath.join(root, name), count)
        if data is None:
            return 1, b"leftssh-rc=1\n" + hashlib.md5(b"").hexdigest().encode() + b"  -\n"
        digest = hashlib.md5(data + (b"lie" if self.exec_mode == "lie" else b"")).hexdigest()
        return 0, b"leftssh-rc=0\n" + digest.encode() + b"  -\n"

    def _hash_batch(self, root: str, stdin: bytes, lie: bool) -> tuple[int, bytes, bytes]:
        out = b""
        status = 0
        for record in stdin.split(b"\0")[:-1]:
            name = record.decode("utf-8", "surrogateescape")
            path = posixpath.normpath(posixpath.join(root, name))
            data = self._read(path, None)
            if data is None:
                status = 123
                continue
            digest = self.hash_claims.get(path) or hashlib.md5(data).hexdigest()
            if lie and path not in self.hash_claims:
                digest = hashlib.md5(data + b"lie").hexdigest()
            out += digest.encode() + b"  " + record + b"\0"
        for extra in self.extra_hash_records:
            out += extra
        return status, out, b""

    @staticmethod
    def _parse_prefix(command: str) -> tuple[str, str, int] | None:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        tokens = list(lexer)
        if tokens[:2] != ["cd", "--"] or "head" not in tokens:
            return None
        at = tokens.index("head")
        if tokens[at + 1 : at + 2] != ["-c"] or tokens[at + 3 : at + 4] != ["--"]:
            return None
        return tokens[2], tokens[at + 4], int(tokens[at + 2])

    def _read(self, path: str, count: int | None) -> bytes | None:
        real = self.real(path)
        try:
            with open(real, "rb") as f:
                return f.read() if count is None else f.read(count)
        except OSError:
            return None


def _shell_words(script: bytes) -> list[tuple[str, bool]]:
    """Split a script as sh would, for the few constructs leftssh sends: single quotes,
    backslash escapes, blanks, and the operators ``( ) { } ; | &`` (one per token).
    Each word comes with whether any of it was quoted."""
    words: list[tuple[str, bool]] = []
    word: bytearray | None = None
    quoted = False
    i = 0
    while i < len(script):
        c = script[i : i + 1]
        if c == b"'":
            end = script.index(b"'", i + 1)
            word = (word or bytearray()) + script[i + 1 : end]
            quoted = True
            i = end + 1
            continue
        if c == b"\\":
            word = (word or bytearray()) + script[i + 1 : i + 2]
            quoted = True
            i += 2
            continue
        if c in b" \t\n()[]{};|&" and c not in b"[]":
            if word is not None:
                words.append((word.decode("utf-8", "surrogateescape"), quoted))
                word, quoted = None, False
            if c not in b" \t\n":
                words.append((c.decode(), False))
            i += 1
            continue
        word = (word or bytearray()) + c
        i += 1
    if word is not None:
        words.append((word.decode("utf-8", "surrogateescape"), quoted))
    return words


_HASH_TAIL = [
    ("}", False),
    ("|", False),
    ("xargs", False),
    ("-0", False),
    ("md5sum", False),
    ("-z", False),
    ("--", False),
    (")", False),
]


class _Interface(paramiko.ServerInterface):
    def __init__(self, server: HostileServer) -> None:
        self.server = server

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if key.get_base64() == self.server._client_key_b64:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        text = command.decode("utf-8", "surrogateescape")
        self.server._spawn(self.server.run_exec, channel, text)
        return True


class _Handle(paramiko.SFTPHandle):
    def __init__(self, server: HostileServer, path: str, f, flags: int) -> None:
        super().__init__(flags)
        self.server = server
        self.path = path
        self.readfile = f
        self.writefile = f

    def stat(self):
        try:
            attr = paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        if self.path in self.server.fstat_lies:
            attr.st_size = self.server.fstat_lies[self.path]
        return attr

    def write(self, offset: int, data: bytes):
        if self.server.corrupt_writes and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return super().write(offset, data)

    def chattr(self, attr):
        try:
            if attr.st_size is not None:
                os.ftruncate(self.writefile.fileno(), attr.st_size)
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return SFTP_OK


class _HostileSFTP(paramiko.SFTPServerInterface):
    def __init__(self, server, hostile: HostileServer, *args, **kwargs) -> None:
        super().__init__(server, *args, **kwargs)
        self.h = hostile

    def _norm(self, path: str) -> str:
        path = posixpath.normpath("/" + path.lstrip("/"))  # "//x" would stay "//x"
        self.h.requested.append(path)
        return path

    def _attr(self, path: str, st: os.stat_result, name: str | None = None):
        attr = paramiko.SFTPAttributes.from_stat(st, name)
        if path in self.h.size_lies:
            attr.st_size = self.h.size_lies[path]
        if path in self.h.kind_lies:
            kind = stat.S_IFDIR if self.h.kind_lies[path] == "dir" else stat.S_IFREG
            attr.st_mode = kind | stat.S_IMODE(attr.st_mode or 0o644)
        return attr

    def canonicalize(self, path: str) -> str:
        return self._norm(path)

    @staticmethod
    def _followed(path: Path) -> os.stat_result:
        try:
            return os.stat(path)
        except OSError:  # a dangling symlink is listed as itself
            return os.lstat(path)

    def list_folder(self, path: str):
        path = self._norm(path)
        if path in self.h.listing_fails:
            return SFTP_PERMISSION_DENIED
        real = self.h.real(path)
        try:
            names = os.listdir(real)
            look = self._followed if self.h.follow_links else os.lstat
            out = [self._attr(posixpath.join(path, n), look(real / n), n) for n in names]
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return out + list(self.h.extra_entries.get(path, []))

    def stat(self, path: str):
        path = self._norm(path)
        try:
            return self._attr(path, os.stat(self.h.real(path)))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)

    def lstat(self, path: str):
        path = self._norm(path)
        try:
            return self._attr(path, os.lstat(self.h.real(path)))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)

    def open(self, path: str, flags: int, attr):
        path = self._norm(path)
        if path in self.h.open_fails:
            return SFTP_FAILURE
        real = self.h.real(path)
        try:
            nofollow = 0 if self.h.follow_links else os.O_NOFOLLOW
            fd = os.open(real, flags | nofollow, 0o644)
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        if flags & os.O_WRONLY:
            mode = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            mode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            mode = "rb"
        return _Handle(self.h, path, os.fdopen(fd, mode), flags)

    def remove(self, path: str):
        try:
            os.unlink(self.h.real(self._norm(path)))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return SFTP_OK

    def rename(self, oldpath: str, newpath: str):
        # Like OpenSSH: link + unlink, so an existing target is never replaced.
        old, new = self.h.real(self._norm(oldpath)), self.h.real(self._norm(newpath))
        try:
            os.link(old, new)
            os.unlink(old)
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return SFTP_OK

    def posix_rename(self, oldpath: str, newpath: str):
        try:
            os.replace(self.h.real(self._norm(oldpath)), self.h.real(self._norm(newpath)))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return SFTP_OK

    def mkdir(self, path: str, attr):
        try:
            os.mkdir(self.h.real(self._norm(path)), 0o755)
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return SFTP_OK

    def rmdir(self, path: str):
        try:
            os.rmdir(self.h.real(self._norm(path)))
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)
        return SFTP_OK

    def chattr(self, path: str, attr):
        real = self.h.real(self._norm(path))
        try:
            if os.path.islink(real):
                return paramiko.SFTPServer.convert_errno(errno.ELOOP)
            return paramiko.SFTPServer.set_file_attr(str(real), attr) or SFTP_OK
        except OSError as e:
            return paramiko.SFTPServer.convert_errno(e.errno)

    def readlink(self, path: str):
        return SFTP_OP_UNSUPPORTED

    def symlink(self, target_path: str, path: str):
        return SFTP_OP_UNSUPPORTED
