"""Authentication through a running ssh-agent (no key file given to leftssh)."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from tests.helpers import write_file


@pytest.fixture
def agent(sshd, tmp_path):
    """Start an ssh-agent holding the test key; stop it (by its pid) afterwards."""
    out = subprocess.run(
        ["ssh-agent", "-s", "-a", str(tmp_path / "agent.sock")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sock = re.search(r"SSH_AUTH_SOCK=([^;]+);", out).group(1)
    pid = int(re.search(r"SSH_AGENT_PID=(\d+);", out).group(1))
    env = {**os.environ, "SSH_AUTH_SOCK": sock}
    subprocess.run(["ssh-add", "-q", str(sshd.identity)], env=env, check=True)
    yield sock
    os.kill(pid, signal.SIGTERM)


def test_key_from_agent_logs_in(sshd, agent, run_leftssh, tmp_path):
    write_file(tmp_path / "p" / "share" / "a.txt", "via agent")
    empty_config = tmp_path / "ssh_config"
    empty_config.write_text("")
    remote = tmp_path / "remote"
    r = run_leftssh(
        "push",
        sshd.target(str(remote)),
        "-d",
        tmp_path / "p" / "share",
        "-F",
        empty_config,
        "--known-hosts",
        sshd.known_hosts,
        env={"SSH_AUTH_SOCK": agent},
    )
    assert r.code == 0, r
    assert (remote / "a.txt").read_text() == "via agent"


def test_without_agent_or_key_authentication_fails_with_4(sshd, run_leftssh, tmp_path):
    write_file(tmp_path / "p" / "share" / "a.txt", "x")
    empty_config = tmp_path / "ssh_config"
    empty_config.write_text("")
    r = run_leftssh(
        "push",
        sshd.target(str(tmp_path / "remote")),
        "-d",
        tmp_path / "p" / "share",
        "-F",
        empty_config,
        "--known-hosts",
        sshd.known_hosts,
    )
    assert r.code == 4, r
    assert not (tmp_path / "remote").exists()
