"""The connecting thread: it locks and lists the remote side while the local side is
scanned; a run that stops first waits only for the lock attempt, which it undoes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from leftssh import cli, runner
from leftssh.ignore import IgnoreRules
from leftssh.lock import LOCK_NAME
from leftssh.model import Manifest
from leftssh.runner import Connecting, RunOptions, _Locks
from leftssh.target import parse_target
from leftssh.transport.local import LocalTransport
from tests.helpers import write_file


@pytest.fixture
def sides(tmp_path: Path) -> tuple[Path, Path]:
    local, remote = tmp_path / "local", tmp_path / "remote"
    write_file(local / "a.txt", "a")
    write_file(remote / "b.txt", "b")
    return local, remote


def _held_scan(
    monkeypatch: pytest.MonkeyPatch, root: Path
) -> tuple[threading.Event, threading.Event]:
    """Make scans of ``root`` wait for the first event; the second is set when one starts."""
    release, started = threading.Event(), threading.Event()
    real = LocalTransport.scan

    def scan(self: LocalTransport, ignore: IgnoreRules) -> Manifest:
        if self.root == root:
            started.set()
            release.wait(30)
        return real(self, ignore)

    monkeypatch.setattr(LocalTransport, "scan", scan)
    return release, started


def _connecting(local_dir: Path, remote_dir: Path, locks: _Locks) -> Connecting:
    """Start connecting to ``remote_dir`` (a local directory target) to lock and list it."""
    opts = RunOptions(local_dir=local_dir)
    return Connecting(
        parse_target(str(remote_dir)), opts, IgnoreRules.from_project(local_dir), locks
    )


def test_the_remote_lock_is_refreshed_from_the_moment_it_is_taken(sides, monkeypatch) -> None:
    local_dir, remote_dir = sides
    release, started = _held_scan(monkeypatch, remote_dir)
    locks = _Locks("sync")
    pending = _connecting(local_dir, remote_dir, locks)
    local = LocalTransport(local_dir)
    try:
        locks.take(local)
        assert not (remote_dir / LOCK_NAME).exists()  # not before the local lock
        pending.local_side_locked()
        assert started.wait(10)
        # The remote lock is held, and in the heartbeat's list, while its scan still runs.
        assert (remote_dir / LOCK_NAME).exists()
        assert len(locks.held) == 2
        release.set()
        remote = pending.result()
        assert sorted(pending.scanned().entries) == ["b.txt"]
        assert remote in locks.held
    finally:
        release.set()
        locks.release()
    assert not (remote_dir / LOCK_NAME).exists() and not (local_dir / LOCK_NAME).exists()


def test_a_run_that_stops_waits_for_the_lock_not_the_listing(sides, monkeypatch) -> None:
    local_dir, remote_dir = sides
    release, started = _held_scan(monkeypatch, remote_dir)
    locks = _Locks("sync")
    pending = _connecting(local_dir, remote_dir, locks)
    try:
        pending.local_side_locked()
        assert started.wait(10)
        assert (remote_dir / LOCK_NAME).exists()
        t0 = time.monotonic()
        pending.abandon()  # the listing is still held up
        assert time.monotonic() - t0 < 5
        assert not (remote_dir / LOCK_NAME).exists()
    finally:
        release.set()
        locks.release()


@pytest.mark.parametrize("local_exists", [True, False])
def test_the_base_is_read_early_only_under_the_local_lock(
    sides, tmp_path, monkeypatch, local_exists: bool
) -> None:
    """With no local share yet there is no local lock to cover an early read of the
    base: it is then read after the remote lock, as it always was."""
    local_dir, remote_dir = sides
    if not local_exists:
        (local_dir / "a.txt").unlink()
        local_dir.rmdir()
    early: list[bool] = []
    real = runner._EarlyBase.read

    def spy(self: runner._EarlyBase) -> None:
        early.append((local_dir / LOCK_NAME).exists())
        real(self)

    monkeypatch.setattr(runner._EarlyBase, "read", spy)
    result = CliRunner().invoke(
        cli.main_group,
        ["sync", str(remote_dir), "-d", str(local_dir), "--json"],
        env={"LEFTSSH_STATE_DIR": str(tmp_path / "state")},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert early == ([True] if local_exists else [])
    assert (local_dir / "b.txt").read_text() == "b"
