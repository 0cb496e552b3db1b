"""The SSH peer: paramiko's SFTP for files, exec channels for batched MD5.

This is the only module that imports paramiko; every paramiko or socket
exception is translated here into a ``LeftsshError`` (stops the run) or a
``TransferError`` (one file fails, the run goes on).
"""

from __future__ import annotations

import os
import posixpath
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import paramiko
from paramiko.sftp import CMD_CLOSE, CMD_HANDLE, CMD_NAME, CMD_OPENDIR, CMD_READDIR, CMD_SETSTAT

from leftssh import lock
from leftssh.errors import (
    AuthError,
    ChangedError,
    ConnectError,
    HostKeyError,
    LeftsshError,
    LockError,
    TransferError,
    UsageError,
)
from leftssh.ignore import IGNORE_FILE, IgnoreRules
from leftssh.model import DIR, FILE, Entry, Manifest, Skipped
from leftssh.paths import PARTIAL_SUFFIX, UnsafePath, check_name, display, is_internal, join
from leftssh.target import SshSettings
from leftssh.transport import remote_shell
from leftssh.transport.base import CHUNK, HashUnavailable, matches

WINDOW_SIZE = 64 << 20
MAX_PACKET = 32768
PREFETCH_REQUESTS = 128
_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
_HASH_BATCH = 2000


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


def _listdir(sftp: paramiko.SFTPClient, path: str) -> list[paramiko.SFTPAttributes]:
    """List a remote directory like ``listdir_attr``, keeping names that are not UTF-8.

    paramiko decodes names as strict UTF-8, so a single odd name would make the whole
    directory unreadable; here it becomes a surrogate escape that the scan reports.
    """
    t, msg = sftp._request(CMD_OPENDIR, path)
    if t != CMD_HANDLE:
        raise paramiko.SFTPError("expected a handle")
    handle = msg.get_binary()
    found = []
    while True:
        try:
            t, msg = sftp._request(CMD_READDIR, handle)
        except EOFError:
            break
        if t != CMD_NAME:
            raise paramiko.SFTPError("expected a name response")
        for _ in range(msg.get_int()):
            name = msg.get_string().decode("utf-8", "surrogateescape")
            msg.get_string()  # the "ls -l" line
            found.append(paramiko.SFTPAttributes._from_msg(msg, name))
    sftp._request(CMD_CLOSE, handle)
    return found


# -- connecting -----------------------------------------------------------


def _open_socket(settings: SshSettings) -> socket.socket:
    try:
        return socket.create_connection(
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


class _Writer:
    """A pipelined SFTP write handle that reports failures as TransferError."""

    def __init__(self, f: paramiko.SFTPFile) -> None:
        self._f = f

    def write(self, data: bytes) -> int:
        try:
            self._f.write(data)
        except Exception as e:
            raise _io_error(e, "write") from e
        return len(data)

    def close(self) -> None:
        try:
            self._f.close()
        except Exception as e:
            raise _io_error(e, "close") from e

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        self.md5_method = "md5"
        self._lock_path: str | None = None
        self._real_root: str | None = None
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
                sftp = paramiko.SFTPClient.from_transport(
                    self._t, window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET
                )
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
        try:
            if self._real_root is None:
                self._real_root = sftp.normalize(self.root)
            real = sftp.normalize(self.full(target))
        except FileNotFoundError:
            return  # nothing there to follow: the operation fails on its own
        except Exception as e:
            raise _io_error(e, "resolving a path") from e
        if real != posixpath.join(self._real_root, target):
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
        sftp = self.client()
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                attrs = _listdir(sftp, self.full(rel_dir))
            except Exception as e:
                err = _io_error(e, f"listing {rel_dir or '.'}")
                if isinstance(err, LeftsshError):
                    raise err from e
                manifest.unreadable.add(rel_dir)
                manifest.skipped.append(Skipped(rel_dir or ".", f"unreadable: {err}"))
                continue
            attrs.sort(key=lambda a: a.filename)
            names: set[str] = set()
            twice: set[str] = set()
            for a in attrs:
                if a.filename in names and a.filename not in twice:
                    twice.add(a.filename)
                    manifest.skipped.append(Skipped(join(rel_dir, a.filename), "duplicate name"))
                names.add(a.filename)
            # A listing that names an entry twice contradicts itself: trust neither.
            attrs = [a for a in attrs if a.filename not in twice]
            for a in attrs:
                if a.filename == IGNORE_FILE and stat.S_ISREG(a.st_mode or 0):
                    data = self._read_small(join(rel_dir, a.filename))
                    manifest.ignore_files[rel_dir] = data
                    rules.add_nested(rel_dir, data)
            seen: set[str] = set()
            for a in attrs:
                if a.filename in seen:
                    continue
                seen.add(a.filename)
                self._scan_one(a, rel_dir, rules, manifest, stack)
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

    def _scan_one(
        self,
        a: paramiko.SFTPAttributes,
        rel_dir: str,
        rules: IgnoreRules,
        manifest: Manifest,
        stack: list[str],
    ) -> None:
        name = a.filename
        if name in (".", ".."):
            return
        rel = join(rel_dir, name)
        try:
            check_name(name)
        except UnsafePath:
            manifest.skipped.append(Skipped(join(rel_dir, display(name)), "unsafe name"))
            return
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            manifest.skipped.append(Skipped(rel, "undecodable name (not UTF-8)"))
            return
        mode = a.st_mode or 0
        if is_internal(name):
            if name.endswith(PARTIAL_SUFFIX) and stat.S_ISREG(mode):
                manifest.partials[rel] = a.st_size or 0
            return
        if stat.S_ISLNK(mode):
            if not rules.is_ignored(rel, False):
                manifest.skipped.append(Skipped(rel, "symlink"))
            return
        if stat.S_ISDIR(mode):
            if rules.is_ignored(rel, True):
                return
            manifest.entries[rel] = Entry(rel, DIR, mtime=int(a.st_mtime or 0))
            stack.append(rel)
            return
        if rules.is_ignored(rel, False):
            return
        if not stat.S_ISREG(mode):
            manifest.skipped.append(Skipped(rel, "special file"))
            return
        manifest.entries[rel] = Entry(
            rel, FILE, size=a.st_size or 0, mtime=int(a.st_mtime or 0), mode=mode & 0o777
        )

    def stat(self, path: str) -> Entry | None:
        try:
            a = self.client().lstat(self.full(path))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise _io_error(e, "stat") from e
        mode = a.st_mode or 0
        if stat.S_ISDIR(mode):
            return Entry(path, DIR, mtime=int(a.st_mtime or 0))
        if stat.S_ISREG(mode):
            return Entry(
                path, FILE, size=a.st_size or 0, mtime=int(a.st_mtime or 0), mode=mode & 0o777
            )
        return Entry(path, "other")

    # -- remote commands -----------------------------------------------------

    def run(self, command: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        """Run one command on the peer, feeding ``stdin``; return (status, stdout, stderr)."""
        try:
            chan = self._t.open_session(timeout=self.timeout)
            chan.settimeout(self.timeout)
            chan.exec_command(command)
        except Exception as e:
            raise _io_error(e, "starting a remote command") from e
        errors: list[BaseException] = []
        err_buf: list[bytes] = []

        def feed() -> None:
            try:
                if stdin:
                    chan.sendall(stdin)
                chan.shutdown_write()
            except Exception as e:  # the command may exit before reading everything
                errors.append(e)

        def drain_stderr() -> None:
            try:
                err_buf.append(chan.makefile_stderr("rb").read())
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=feed), threading.Thread(target=drain_stderr)]
        for th in threads:
            th.daemon = True
            th.start()
        try:
            out = chan.makefile("rb").read()
            status = chan.recv_exit_status()
        except Exception as e:
            chan.close()
            raise _io_error(e, "running a remote command") from e
        for th in threads:
            th.join(self.timeout)
        chan.close()
        return status, out, b"".join(err_buf)

    def _hash_tool(self) -> remote_shell.HashTool | None:
        if not self._probed:
            with self._lock:
                if not self._probed:
                    try:
                        status, out, _ = self.run(remote_shell.PROBE_COMMAND)
                        self._tool = remote_shell.parse_probe(out, status)
                    except ConnectError:
                        if not self._t.is_active():
                            raise
                        self._tool = None
                    self._probed = True
        return self._tool

    def can_hash(self) -> bool:
        return self._hash_tool() is not None

    def hash_files(self, paths: list[str]) -> dict[str, str]:
        """MD5 many remote files with one command per batch (names on stdin)."""
        tool = self._hash_tool()
        if tool is None:
            raise HashUnavailable("the peer cannot run md5sum")
        result: dict[str, str] = {}
        for i in range(0, len(paths), _HASH_BATCH):
            batch = paths[i : i + _HASH_BATCH]
            for p in batch:
                check_name(p.rpartition("/")[2])
            command = remote_shell.hash_command(tool, self.root)
            _, out, _ = self.run(command, remote_shell.hash_stdin(batch))
            result.update(remote_shell.parse_hash_output(tool, out, batch))
        return result

    def hash_prefix(self, path: str, length: int) -> str | None:
        tool = self._hash_tool()
        if tool is None:
            return None
        _, out, _ = self.run(remote_shell.prefix_hash_command(tool, self.root, path, length))
        return remote_shell.parse_prefix_hash(tool, out)

    # -- transfers -------------------------------------------------------------

    def read_chunks(self, path: str, offset: int, size: int | None = None) -> Iterator[bytes]:
        sftp = self.client()
        self._inside(path, whole=True)
        try:
            f = sftp.open(self.full(path), "rb")
        except Exception as e:
            raise _io_error(e, "open") from e
        try:
            claimed = f.stat().st_size or 0
            # The peer's fstat may lie (paramiko's prefetch plans every request up front):
            # read at most one byte past the size the listing gave.
            size = claimed if size is None else min(claimed, size + 1)
            f.seek(offset)
            if size > offset:
                f.prefetch(size, PREFETCH_REQUESTS)
            remaining = size - offset
            while remaining > 0:
                block = f.read(min(CHUNK, remaining))
                if not block:
                    return
                remaining -= len(block)
                yield block
        except Exception as e:
            raise _io_error(e, "read") from e
        finally:
            try:
                f.close()
            except Exception:
                pass

    def open_write(self, path: str, offset: int) -> BinaryIO:
        sftp = self.client()
        full = self.full(path)
        self._inside(path)
        try:
            if offset:
                f = sftp.open(full, "r+b")
                f.truncate(offset)
                f.seek(offset)
            else:
                f = sftp.open(full, "wb")
            f.set_pipelined(True)
        except Exception as e:
            raise _io_error(e, "open for writing") from e
        return _Writer(f)  # type: ignore[return-value]

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
        self._inside(path)
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
        """Take the remote share's run lock (exclusive create) or raise LockError."""
        sftp = self.client()
        path = self.full(lock.LOCK_NAME)
        for _ in range(3):
            try:
                with sftp.open(path, "wxb") as f:
                    f.write(lock.encode(lock.holder_info(command)))
                self._lock_path = path
                return
            except OSError as e:
                try:
                    with sftp.open(path, "rb") as f:
                        info = lock.decode(f.read(4096))
                    age = time.time() - (sftp.stat(path).st_mtime or 0)
                except FileNotFoundError:
                    continue
                except OSError:
                    raise UsageError(f"cannot lock {self.label}: {e}") from e
                if lock.is_stale(info, age):
                    try:
                        sftp.remove(path)
                    except OSError:
                        pass
                    continue
                raise LockError(lock.describe(info, self.label)) from None
            except Exception as e:
                raise _io_error(e, "taking the lock") from e
        raise LockError(f"{self.label}: could not take the lock")

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
        for sftp in self._clients:
            try:
                sftp.close()
            except Exception:
                pass
        self._t.close()
        hop = getattr(self._t, "_leftssh_hop", None)
        if hop is not None:
            hop.close()
