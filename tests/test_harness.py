"""The test harness itself: real sshd logins, SFTP-only accounts, environment, helpers."""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest

from tests.helpers import run_command, tree, write_file
from tests.sshd import Sshd


@contextmanager
def connect(server: Sshd, known_hosts: Path | None = None) -> Iterator[paramiko.SSHClient]:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts or server.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            server.host,
            port=server.port,
            username=server.user,
            key_filename=str(server.identity),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
        yield client
    finally:
        client.close()


def exec_with_eof(client: paramiko.SSHClient, command: str) -> tuple[int, bytes]:
    """Run a command with stdin closed; return (exit status, stdout)."""
    stdin, stdout, _ = client.exec_command(command, timeout=10)
    stdin.channel.shutdown_write()
    output = stdout.read()
    return stdout.channel.recv_exit_status(), output


def test_paramiko_logs_in_with_client_key_and_md5sum_matches_sftp_upload(
    sshd: Sshd, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    remote = tmp_path / "uploaded file.bin"
    with connect(sshd) as client:
        with client.open_sftp() as sftp:
            with sftp.open(str(remote), "wb") as f:
                f.write(data)
            assert sftp.stat(str(remote)).st_size == len(data)
        code, output = exec_with_eof(client, f"md5sum -- {shlex.quote(str(remote))}")
    assert code == 0
    assert output.split()[0].decode() == hashlib.md5(data).hexdigest()
    assert remote.read_bytes() == data


def test_unknown_host_key_is_rejected(sshd: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        with connect(sshd, known_hosts=empty):
            pass


def test_openssh_client_logs_in_through_ssh_config(sshd: Sshd) -> None:
    true = run_command([*sshd.ssh_args(), "true"], timeout=30)
    assert true.code == 0, true
    version = run_command([*sshd.ssh_args(), "md5sum", "--version"], timeout=30)
    assert version.code == 0, version
    assert "md5sum" in version.stdout


def test_sftp_only_server_serves_sftp_but_runs_no_commands(
    sftp_only_sshd: Sshd, tmp_path: Path
) -> None:
    remote = tmp_path / "via-sftp.txt"
    with connect(sftp_only_sshd) as client:
        with client.open_sftp() as sftp:
            with sftp.open(str(remote), "wb") as f:
                f.write(b"hello")
        # ForceCommand internal-sftp answers a command request with an error and exit 1.
        code, output = exec_with_eof(client, "echo shell-is-here; md5sum --version")
    assert remote.read_bytes() == b"hello"
    assert b"shell-is-here" not in output
    assert b"md5sum" not in output
    assert code != 0


def test_restart_keeps_port_and_drop_connections_cuts_clients(
    sshd_factory: Callable[..., Sshd],
) -> None:
    server = sshd_factory()
    port = server.port
    with connect(server) as client:
        transport = client.get_transport()
        assert transport is not None and transport.is_active()
        assert server.drop_connections() >= 1
        deadline = time.monotonic() + 5
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not transport.is_active()
    server.stop()
    assert not server.is_running()
    server.start()
    assert server.port == port
    with connect(server) as client:
        assert exec_with_eof(client, "true")[0] == 0


def test_sshd_start_failure_reports_the_log(tmp_path: Path) -> None:
    server = Sshd(tmp_path / "bad", extra_config=["NoSuchOption yes"])
    with pytest.raises(RuntimeError, match="NoSuchOption"):
        server.start()
    assert not server.is_running()


def test_cli_args_and_target_name_this_server(sshd: Sshd) -> None:
    assert sshd.cli_args() == [
        "-i",
        str(sshd.identity),
        "--known-hosts",
        str(sshd.known_hosts),
        "-F",
        str(sshd.ssh_config),
    ]
    assert sshd.target("/srv/x") == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/srv/x"
    assert f"[127.0.0.1]:{sshd.port} ssh-ed25519 " in sshd.known_hosts.read_text()
    assert "Host leftssh-test" in sshd.ssh_config.read_text()


def test_environment_is_isolated(isolated_env: Path) -> None:
    assert os.environ["HOME"] == str(isolated_env)
    assert Path("~").expanduser() == isolated_env
    assert "SSH_AUTH_SOCK" not in os.environ
    assert not [name for name in os.environ if name.startswith("LEFTSSH_")]


def test_tree_snapshots_files_and_dirs_and_skips_leftssh_internals(tmp_path: Path) -> None:
    write_file(tmp_path / "a" / "b.txt", "hello", mtime=1_700_000_000.7, mode=0o640)
    (tmp_path / "empty").mkdir()
    write_file(tmp_path / "a" / ".b.txt.x1.leftpart", "partial")
    write_file(tmp_path / ".leftssh" / "state.json", "{}")
    (tmp_path / "link").symlink_to("a/b.txt")

    md5 = hashlib.md5(b"hello").hexdigest()
    assert tree(tmp_path) == {
        "a": ("dir",),
        "a/b.txt": ("file", md5, 5, 1_700_000_000, 0o640),
        "empty": ("dir",),
    }
    assert tree(tmp_path, special=True)["link"] == ("symlink", "a/b.txt")


def test_run_command_parses_json_lines_and_closes_stdin() -> None:
    script = (
        "import json, sys\n"
        "assert sys.stdin.read() == ''\n"
        "print(json.dumps({'action': 'upload', 'path': 'x', 'status': 'ok'}))\n"
        "print(json.dumps({'summary': {'exit_code': 0}}))\n"
    )
    result = run_command([sys.executable, "-c", script])
    assert result.code == 0, result
    assert result.json()[0]["action"] == "upload"
    assert result.actions() == [{"action": "upload", "path": "x", "status": "ok"}]
    assert result.summary() == {"exit_code": 0}


def test_run_command_fails_on_a_traceback() -> None:
    with pytest.raises(AssertionError, match="traceback"):
        run_command([sys.executable, "-c", "raise SystemExit(1/0)"])


def test_run_command_passes_input_and_env() -> None:
    script = "import os, sys; print(sys.stdin.read() + os.environ['HARNESS_X'])"
    result = run_command([sys.executable, "-c", script], input="in-", env={"HARNESS_X": "env"})
    assert result.stdout.strip() == "in-env"


def test_sshd_runs_as_the_current_user(sshd: Sshd) -> None:
    result = run_command([*sshd.ssh_args(), "id", "-u"], timeout=30)
    assert result.code == 0, result
    assert result.stdout.strip() == str(os.geteuid())
