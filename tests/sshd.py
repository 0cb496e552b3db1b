"""Run a throw-away OpenSSH server on 127.0.0.1 for tests and benchmarks.

The server is the real ``sshd`` of this machine, started as the current user with its own
config, host key, client key and authorized_keys in a private directory. Only the current
user can log in (as root that is root; as anyone else sshd cannot switch users anyway).

Usage::

    with Sshd(Path("/tmp/x")) as server:
        subprocess.run(["ssh", "-F", str(server.ssh_config), Sshd.ALIAS, "true"], check=True)

This module imports nothing outside the standard library, so scripts can use it too.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

__all__ = ["Sshd", "SshdError", "find_sshd"]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class SshdError(RuntimeError):
    """The test sshd could not be set up or started."""


def find_sshd() -> str | None:
    """Return the absolute path of sshd, or None when it is not installed."""
    found = shutil.which("sshd")
    if found:
        return os.path.abspath(found)
    if os.access("/usr/sbin/sshd", os.X_OK):
        return "/usr/sbin/sshd"
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _keygen(path: Path, key_type: str, comment: str) -> None:
    if path.exists():
        return
    cmd = ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", comment, "-f", str(path)]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise SshdError(f"ssh-keygen failed ({done.returncode}): {done.stderr.strip()}")


def _password_locked(user: str) -> bool:
    """Tell whether /etc/shadow (when readable) marks the user's password as locked ("!...")."""
    try:
        with open("/etc/shadow", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == user:
                    return rest.startswith("!")
    except OSError:
        pass
    return False


def _children(pid: int) -> list[int]:
    """Return the pids whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                    stat = f.read()
            except OSError:
                continue
            # Fields after the parenthesised command name: state, ppid, ...
            fields = stat[stat.rfind(")") + 2 :].split()
            if len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


class Sshd:
    """A real OpenSSH server on 127.0.0.1 at a free port, logging in only the current user."""

    ALIAS = "leftssh-test"

    def __init__(
        self,
        workdir: Path,
        extra_config: Iterable[str] = (),
        sftp_only: bool = False,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.extra_config = list(extra_config)
        self.sftp_only = sftp_only
        self.host = "127.0.0.1"
        self.port = 0
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.home = pwd.getpwuid(os.geteuid()).pw_dir
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.host_key_pub = self.workdir / "ssh_host_ed25519_key.pub"
        self.identity = self.workdir / "id_ed25519"
        self.identity_pub = self.workdir / "id_ed25519.pub"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.known_hosts = self.workdir / "known_hosts"
        self.ssh_config = self.workdir / "ssh_config"
        self.sshd_config = self.workdir / "sshd_config"
        self.pid_file = self.workdir / "sshd.pid"
        self.log = self.workdir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._sshd = find_sshd()
        self._use_pam = os.geteuid() == 0 and _password_locked(self.user)

    # -- public API ---------------------------------------------------------------------------

    def start(self) -> Sshd:
        """Start sshd and wait until it greets with an SSH-2.0 banner.

        A restart after ``stop()`` keeps the same port, so clients can reconnect to it.
        """
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self._sshd is None:
            raise SshdError("sshd not found (install openssh-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        _keygen(self.host_key, "ed25519", "leftssh-test-host")
        _keygen(self.identity, "ed25519", "leftssh-test-client")
        self.authorized_keys.write_text(self.identity_pub.read_text())
        self.authorized_keys.chmod(0o600)
        if os.geteuid() == 0:
            # Privilege separation chroots into this directory; it must exist.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

        keep_port = self.port != 0
        attempts = 1 if keep_port else 5
        for attempt in range(attempts):
            if not keep_port:
                self.port = _free_port(self.host)
            self._write_files()
            try:
                self._spawn()
                return self
            except SshdError:
                # Another process may have taken the port between probing and binding.
                if attempt + 1 < attempts and "Address already in use" in self.log_text():
                    continue
                raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop sshd and the sessions it forked, each by its own pid."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        sessions = _children(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def drop_connections(self) -> int:
        """Cut every open client connection, keeping the listener; return how many were cut."""
        if self.proc is None:
            return 0
        sessions = _children(self.proc.pid)
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return len(sessions)

    def is_running(self) -> bool:
        """Tell whether the sshd listener process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Return everything sshd has logged so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cli_args(self) -> list[str]:
        """Return the leftssh options that select this server's key, known_hosts and config."""
        return [
            "-i",
            str(self.identity),
            "--known-hosts",
            str(self.known_hosts),
            "-F",
            str(self.ssh_config),
        ]

    def target(self, path: str) -> str:
        """Return an ``ssh://`` TARGET for an absolute path on this server."""
        if not path.startswith("/"):
            raise ValueError(f"target() needs an absolute path, got {path!r}")
        return f"ssh://{self.user}@{self.host}:{self.port}{path}"

    def ssh_args(self) -> list[str]:
        """Return an OpenSSH client command line (without the remote command) for this server."""
        return ["ssh", "-F", str(self.ssh_config), self.ALIAS]

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<Sshd {self.user}@{self.host}:{self.port} {state} in {self.workdir}>"

    # -- internals ----------------------------------------------------------------------------

    def _config_lines(self) -> list[str]:
        lines = [
            f"ListenAddress {self.host}",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"AllowUsers {self.user}",
            "StrictModes no",
            # Without PAM, sshd refuses accounts whose password is locked ("!" in /etc/shadow,
            # as for root on many installs) even for key logins; PAM's account check does not.
            "UsePAM yes" if self._use_pam else "UsePAM no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "LogLevel VERBOSE",
            "MaxSessions 64",
            "MaxStartups 64:30:100",
            "Subsystem sftp internal-sftp",
        ]
        if os.geteuid() == 0:
            lines.append("PermitRootLogin prohibit-password")
        if self.sftp_only:
            lines.append("ForceCommand internal-sftp")
        return lines + self.extra_config

    def _write_files(self) -> None:
        self.sshd_config.write_text("\n".join(self._config_lines()) + "\n")
        host_key = " ".join(self.host_key_pub.read_text().split()[:2])
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {host_key}\n")
        self.ssh_config.write_text(
            f"Host {self.ALIAS}\n"
            f"    HostName {self.host}\n"
            f"    Port {self.port}\n"
            f"    User {self.user}\n"
            f"    IdentityFile {self.identity}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n"
        )
        # ssh refuses a config file that others can write.
        self.ssh_config.chmod(0o600)

    def _spawn(self) -> None:
        assert self._sshd is not None
        cmd = [self._sshd, "-D", "-e", "-f", str(self.sshd_config)]
        with open(self.log, "ab") as log:
            log.write(f"--- {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True
            )
        try:
            self._wait_for_banner()
        except SshdError:
            self.stop()
            raise

    def _wait_for_banner(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        last_error = "no attempt"
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise SshdError(
                    f"sshd exited with status {code} while starting on port {self.port}.\n"
                    f"sshd log ({self.log}):\n{self.log_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                    banner = s.recv(256)
                if banner.startswith(b"SSH-2.0"):
                    return
                last_error = f"unexpected banner {banner!r}"
            except OSError as e:
                last_error = str(e)
            time.sleep(0.05)
        raise SshdError(
            f"sshd did not answer with an SSH-2.0 banner on {self.host}:{self.port} within "
            f"{START_TIMEOUT:.0f} s (last error: {last_error}).\n"
            f"sshd log ({self.log}):\n{self.log_text()}"
        )
