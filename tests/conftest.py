"""Shared fixtures: an isolated environment, real OpenSSH servers, and a leftssh runner."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leftssh.target import parse_target, resolve_ssh
from leftssh.transport.sftp import SFTPTransport
from tests.helpers import Result, run_command
from tests.sshd import Sshd

# Variables that would let the user's own setup leak into a test run.
_SCRUBBED = (
    "SSH_AUTH_SOCK",
    "SSH_AGENT_PID",
    "XDG_CONFIG_HOME",
    "XDG_CACHE_HOME",
    "XDG_STATE_HOME",
    "XDG_DATA_HOME",
)


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point HOME at an empty directory and drop SSH agent and LEFTSSH_* variables.

    The user's real ~/.ssh (config, known_hosts, keys) and agent are never consulted.
    The original environment is restored at the end of the session. Yields the new HOME.
    """
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        for name in _SCRUBBED:
            mp.delenv(name, raising=False)
        for name in list(os.environ):
            if name.startswith("LEFTSSH_"):
                mp.delenv(name)
        yield home


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory, isolated_env: Path) -> Iterator[Sshd]:
    """One real OpenSSH server (shell and SFTP) for the whole test session."""
    with Sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def sftp_only_sshd(tmp_path_factory: pytest.TempPathFactory, isolated_env: Path) -> Iterator[Sshd]:
    """One real OpenSSH server whose account is SFTP-only (``ForceCommand internal-sftp``)."""
    with Sshd(tmp_path_factory.mktemp("sshd-sftp-only"), sftp_only=True) as server:
        yield server


@pytest.fixture
def sshd_factory(
    tmp_path_factory: pytest.TempPathFactory, isolated_env: Path
) -> Iterator[Callable[..., Sshd]]:
    """Start private servers for one test (to stop, restart or configure); all stop afterwards.

    ``sshd_factory(extra_config=[...], sftp_only=False)`` returns a started ``Sshd``.
    """
    servers: list[Sshd] = []

    def make(extra_config: list[str] | tuple[str, ...] = (), sftp_only: bool = False) -> Sshd:
        server = Sshd(tmp_path_factory.mktemp("sshd-private"), extra_config, sftp_only)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def run_leftssh() -> Callable[..., Result]:
    """Return ``run(*args, cwd=None, env=None, timeout=120, input=None) -> Result``.

    Runs ``python -m leftssh ARGS`` with no terminal and stdin closed (unless ``input``),
    capturing stdout and stderr; fails the test if a traceback reaches stderr.
    """

    def run(
        *args: str | os.PathLike[str],
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str | None] | None = None,
        timeout: float = 120,
        input: str | bytes | None = None,
    ) -> Result:
        cmd = [sys.executable, "-m", "leftssh", *map(str, args)]
        return run_command(cmd, cwd=cwd, env=env, timeout=timeout, input=input)

    return run


@pytest.fixture
def remote(sshd: Sshd, tmp_path: Path) -> Iterator[tuple[SFTPTransport, Path]]:
    """An SFTPTransport on a fresh directory ``peer`` of the session sshd, and that directory."""
    root = tmp_path / "peer"
    root.mkdir()
    target = parse_target(sshd.target(str(root)))
    settings = resolve_ssh(
        target,
        identity=str(sshd.identity),
        ssh_config=str(sshd.ssh_config),
        known_hosts=str(sshd.known_hosts),
    )
    t = SFTPTransport(settings, target.path, target.label(), 30.0)
    try:
        yield t, root
    finally:
        t.close()
