"""Two-way ``sync``, ``status`` and ``verify`` against a real OpenSSH server."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO_ROOT, Result, tree, write_file
from tests.sshd import Sshd

MTIME = 1_600_000_000
LOCK = ".leftssh.lock"


def conflict_re(name: str, loser: str | None = None) -> re.Pattern[str]:
    """The conflict-copy name of ``name`` (``NAME.conflict-YYYYmmdd-HHMMSS-SIDE.EXT``)."""
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    side = loser or "(local|remote)"
    return re.compile(
        re.escape(stem) + r"\.conflict-\d{8}-\d{6}-" + side + r"(-\d+)?" + re.escape(ext)
    )


def copies_of(snapshot: dict, path: str, loser: str | None = None) -> list[str]:
    """Paths in a tree() snapshot that are conflict copies of ``path``."""
    parent, _, name = path.rpartition("/")
    pattern = conflict_re(name, loser)
    return sorted(
        p
        for p in snapshot
        if p.rpartition("/")[0] == parent and pattern.fullmatch(p.rpartition("/")[2])
    )


def md5_of(data: bytes | str) -> str:
    return hashlib.md5(data.encode() if isinstance(data, str) else data).hexdigest()


def clear(root: Path) -> None:
    """Remove everything inside ``root`` (keeping ``root`` itself)."""
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


@dataclass
class Pair:
    """A local share and a share on the test sshd, with their own sync state directory."""

    local: Path
    remote: Path
    state: Path
    sshd: Sshd
    runner: Callable[..., Result]

    @property
    def target(self) -> str:
        return self.sshd.target(str(self.remote))

    @property
    def env(self) -> dict[str, str]:
        return {"LEFTSSH_STATE_DIR": str(self.state)}

    def args(self, command: str, *extra: Any) -> list[str]:
        return [
            command,
            self.target,
            "-d",
            str(self.local),
            "--json",
            *map(str, extra),
            *self.sshd.cli_args(),
        ]

    def run(self, command: str, *extra: Any, code: int | None = 0, timeout: float = 120) -> Result:
        """Run ``leftssh COMMAND`` on this pair; check the exit code and the JSON summary."""
        r = self.runner(*self.args(command, *extra), env=self.env, timeout=timeout)
        assert r.summary()["exit_code"] == r.code, r
        if code is not None:
            assert r.code == code, r
        return r

    def sync(self, *extra: Any, code: int | None = 0) -> Result:
        return self.run("sync", *extra, code=code)

    def start(self, command: str, *extra: Any) -> subprocess.Popen[bytes]:
        """Start ``leftssh COMMAND`` in the background (output discarded)."""
        env = dict(os.environ, **self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return subprocess.Popen(
            [sys.executable, "-m", "leftssh", *self.args(command, *extra)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    def same(self) -> dict:
        """Assert both shares hold the same tree; return it."""
        left, right = tree(self.local), tree(self.remote)
        assert left == right
        return left

    def snapshot(self) -> tuple[dict, dict, dict[str, bytes]]:
        """Both trees and every file of the state directory."""
        state = {}
        if self.state.exists():
            state = {
                p.relative_to(self.state).as_posix(): p.read_bytes()
                for p in self.state.rglob("*")
                if p.is_file()
            }
        return tree(self.local), tree(self.remote) if self.remote.exists() else None, state


@pytest.fixture
def pair(sshd: Sshd, run_leftssh: Callable[..., Result], tmp_path: Path) -> Pair:
    local = tmp_path / "project" / "share"
    remote = tmp_path / "peer" / "share"
    local.mkdir(parents=True)
    remote.mkdir(parents=True)
    return Pair(local, remote, tmp_path / "state", sshd, run_leftssh)


def actions_by_path(r: Result) -> dict[str, dict]:
    return {a["path"]: a for a in r.actions() if a["action"] != "skip"}


def synced(pair: Pair, files: dict[str, str], mtime: int = MTIME) -> dict:
    """Create ``files`` locally, sync them to the peer, return the agreed tree."""
    for i, (path, content) in enumerate(sorted(files.items())):
        write_file(pair.local / path, content, mtime=mtime + i, mode=0o644)
    pair.sync()
    return pair.same()


# -- propagation ---------------------------------------------------------------------------


def test_new_files_on_either_side_show_up_on_the_other(pair: Pair) -> None:
    write_file(pair.local / "a.txt", "from local\n", mtime=MTIME)
    write_file(pair.remote / "b.txt", "from remote\n", mtime=MTIME + 1)
    r = pair.sync()
    assert {p: a["action"] for p, a in actions_by_path(r).items()} == {
        "a.txt": "upload",
        "b.txt": "download",
    }
    assert all(a["status"] == "ok" and a["verified"] == "md5" for a in actions_by_path(r).values())
    assert pair.same().keys() == {"a.txt", "b.txt"}

    # With a base: new files (and a new folder) on each side travel the other way.
    write_file(pair.local / "c.txt", "new local\n", mtime=MTIME + 2)
    write_file(pair.remote / "d" / "e.txt", "new remote\n", mtime=MTIME + 3)
    r = pair.sync()
    got = {p: a["action"] for p, a in actions_by_path(r).items()}
    assert got == {"c.txt": "upload", "d": "mkdir_local", "d/e.txt": "download"}
    assert r.summary()["uploaded"] == 1 and r.summary()["downloaded"] == 1
    assert (pair.local / "d" / "e.txt").read_text() == "new remote\n"
    assert (pair.remote / "c.txt").read_text() == "new local\n"
    assert pair.same().keys() == {"a.txt", "b.txt", "c.txt", "d", "d/e.txt"}

    again = pair.sync()
    assert actions_by_path(again) == {}


def test_new_folder_with_50_files(pair: Pair) -> None:
    synced(pair, {"readme.txt": "hello\n"})
    for i in range(50):
        sub = "raw/" if i % 5 == 0 else ""
        write_file(pair.local / "album" / f"{sub}img{i:02}.jpg", os.urandom(100 + 37 * i))
    (pair.remote / "inbox" / "empty").mkdir(parents=True)
    r = pair.sync()
    s = r.summary()
    assert s["uploaded"] == 50 and s["downloaded"] == 0 and s["failed"] == 0
    kinds = {(a["action"], a["path"]) for a in r.actions()}
    assert {("mkdir_remote", "album"), ("mkdir_remote", "album/raw")} <= kinds
    assert {("mkdir_local", "inbox"), ("mkdir_local", "inbox/empty")} <= kinds
    t = pair.same()
    assert sum(1 for p, e in t.items() if p.startswith("album/") and e[0] == "file") == 50
    assert t["inbox/empty"] == ("dir",)


def test_update_on_one_side_propagates(pair: Pair) -> None:
    synced(pair, {"a.txt": "a v1\n", "b.txt": "b v1\n", "same-size.txt": "1111"})
    write_file(pair.local / "a.txt", "a v2, longer\n", mtime=MTIME + 100)
    write_file(pair.remote / "b.txt", "b v2\n", mtime=MTIME + 100)
    # Same size, new mtime: still a change.
    write_file(pair.remote / "same-size.txt", "2222", mtime=MTIME + 100)
    r = pair.sync()
    got = {p: a["action"] for p, a in actions_by_path(r).items()}
    assert got == {"a.txt": "upload", "b.txt": "download", "same-size.txt": "download"}
    assert r.summary()["conflicts"] == 0
    t = pair.same()
    assert (pair.remote / "a.txt").read_text() == "a v2, longer\n"
    assert (pair.local / "b.txt").read_text() == "b v2\n"
    assert (pair.local / "same-size.txt").read_text() == "2222"
    assert t["a.txt"][3] == MTIME + 100
    assert not [p for p in t if "conflict" in p]


def test_delete_propagates_files_and_folders(pair: Pair) -> None:
    files = {f"keep{i}.txt": f"keep {i}\n" for i in range(10)}
    files.update(
        {
            "gone-local.txt": "x\n",
            "dir1/x.txt": "x\n",
            "dir1/sub/y.txt": "y\n",
            "gone-remote.txt": "z\n",
            "dir2/z.txt": "z\n",
        }
    )
    (pair.local / "dir3").mkdir(parents=True)
    synced(pair, files)
    (pair.local / "gone-local.txt").unlink()
    shutil.rmtree(pair.local / "dir1")
    (pair.remote / "gone-remote.txt").unlink()
    shutil.rmtree(pair.remote / "dir2")
    (pair.local / "dir3").rmdir()
    r = pair.sync()
    got = {p: a["action"] for p, a in actions_by_path(r).items()}
    assert got == {
        "gone-local.txt": "delete_remote",
        "dir1": "delete_remote",
        "dir1/x.txt": "delete_remote",
        "dir1/sub": "delete_remote",
        "dir1/sub/y.txt": "delete_remote",
        "dir3": "delete_remote",
        "gone-remote.txt": "delete_local",
        "dir2": "delete_local",
        "dir2/z.txt": "delete_local",
    }
    t = pair.same()
    assert sorted(t) == sorted(f"keep{i}.txt" for i in range(10))
    assert actions_by_path(pair.sync()) == {}


# -- conflicts -----------------------------------------------------------------------------


def test_conflict_newer_wins_and_both_versions_are_kept_on_both_sides(pair: Pair) -> None:
    synced(pair, {"notes.md": "base\n", "docs/README": "base readme\n", "other.txt": "o\n"})
    write_file(pair.local / "notes.md", "local edit\n", mtime=MTIME + 100)
    write_file(pair.remote / "notes.md", "remote edit, newer\n", mtime=MTIME + 200)
    write_file(pair.local / "docs/README", "local readme, newer\n", mtime=MTIME + 300)
    write_file(pair.remote / "docs/README", "remote readme\n", mtime=MTIME + 100)
    r = pair.sync()
    conflicts = {a["path"]: a for a in r.actions() if a["action"] == "conflict"}
    assert set(conflicts) == {"notes.md", "docs/README"}
    assert all(a["status"] == "ok" for a in conflicts.values())
    assert r.summary()["conflicts"] == 2
    t = pair.same()
    kept = conflicts["notes.md"]["kept"]
    assert copies_of(t, "notes.md") == [kept]
    assert conflict_re("notes.md", "local").fullmatch(kept)
    kept_readme = conflicts["docs/README"]["kept"]
    assert copies_of(t, "docs/README") == [kept_readme]
    assert conflict_re("README", "remote").fullmatch(kept_readme.rpartition("/")[2])
    for root in (pair.local, pair.remote):
        assert (root / "notes.md").read_text() == "remote edit, newer\n"
        assert (root / kept).read_text() == "local edit\n"
        assert (root / "docs/README").read_text() == "local readme, newer\n"
        assert (root / kept_readme).read_text() == "remote readme\n"
    assert actions_by_path(pair.sync()) == {}


@pytest.mark.parametrize("policy", ["local", "remote"])
def test_conflict_policy_picks_the_winning_side(pair: Pair, policy: str) -> None:
    synced(pair, {"f.txt": "base\n"})
    # The side that wins by policy holds the *older* edit: mtime does not matter.
    older, newer = (MTIME + 100, MTIME + 200) if policy == "local" else (MTIME + 200, MTIME + 100)
    write_file(pair.local / "f.txt", "local edit\n", mtime=older)
    write_file(pair.remote / "f.txt", "remote edit\n", mtime=newer)
    r = pair.sync("--conflict", policy)
    (conflict,) = [a for a in r.actions() if a["action"] == "conflict"]
    loser = "remote" if policy == "local" else "local"
    assert conflict_re("f.txt", loser).fullmatch(conflict["kept"])
    t = pair.same()
    assert copies_of(t, "f.txt") == [conflict["kept"]]
    for root in (pair.local, pair.remote):
        assert (root / "f.txt").read_text() == f"{policy} edit\n"
        assert (root / conflict["kept"]).read_text() == f"{loser} edit\n"


def test_conflict_skip_leaves_both_untouched_and_exits_1(pair: Pair) -> None:
    synced(pair, {"f.txt": "base\n", "g.txt": "g\n"})
    write_file(pair.local / "f.txt", "local edit\n", mtime=MTIME + 100)
    write_file(pair.remote / "f.txt", "remote edit\n", mtime=MTIME + 200)
    write_file(pair.local / "new.txt", "unrelated\n", mtime=MTIME + 5)
    before_local = tree(pair.local)
    before_remote = tree(pair.remote)
    r = pair.sync("--conflict", "skip", code=1)
    (conflict,) = [a for a in r.actions() if a["action"] == "conflict"]
    assert conflict["path"] == "f.txt" and conflict["status"] == "skipped"
    assert (pair.local / "f.txt").read_text() == "local edit\n"
    assert (pair.remote / "f.txt").read_text() == "remote edit\n"
    assert tree(pair.local) == before_local
    # The unrelated change still went through.
    assert tree(pair.remote) == {**before_remote, "new.txt": before_local["new.txt"]}
    # Still pending: status says so.
    pair.run("status", "--conflict", "skip", code=1)


def test_delete_vs_modify_keeps_the_modification(pair: Pair) -> None:
    files = {f"keep{i}.txt": "k\n" for i in range(4)}
    synced(pair, {**files, "a.txt": "a v1\n", "b.txt": "b v1\n"})
    (pair.local / "a.txt").unlink()
    write_file(pair.remote / "a.txt", "a v2 (remote)\n", mtime=MTIME + 100)
    (pair.remote / "b.txt").unlink()
    write_file(pair.local / "b.txt", "b v2 (local)\n", mtime=MTIME + 100)
    r = pair.sync()
    got = {p: a["action"] for p, a in actions_by_path(r).items()}
    assert got == {"a.txt": "download", "b.txt": "upload"}
    t = pair.same()
    assert (pair.local / "a.txt").read_text() == "a v2 (remote)\n"
    assert (pair.remote / "b.txt").read_text() == "b v2 (local)\n"
    assert not [p for p in t if "conflict" in p]


def test_identical_change_on_both_sides_is_not_a_conflict(pair: Pair) -> None:
    synced(pair, {"same.txt": "base\n", "touched.txt": "base\n", "new-dir/x.txt": "x\n"})
    write_file(pair.local / "same.txt", "the same edit\n", mtime=MTIME + 100)
    write_file(pair.remote / "same.txt", "the same edit\n", mtime=MTIME + 100)
    write_file(pair.local / "both-new.txt", "created twice\n", mtime=MTIME + 50)
    write_file(pair.remote / "both-new.txt", "created twice\n", mtime=MTIME + 50)
    # Same bytes, different mtimes: still not a conflict.
    write_file(pair.local / "touched.txt", "the same edit\n", mtime=MTIME + 100)
    write_file(pair.remote / "touched.txt", "the same edit\n", mtime=MTIME + 200)
    r = pair.sync()
    assert r.summary()["conflicts"] == 0 and r.summary()["failed"] == 0
    assert not [a for a in r.actions() if a["action"] == "conflict"]
    assert set(actions_by_path(r)) <= {"touched.txt"}
    # At most the attributes are aligned: no content is sent either way.
    assert r.summary()["bytes"] == 0
    for root in (pair.local, pair.remote):
        assert not [p for p in root.rglob("*") if "conflict" in p.name]
        assert (root / "same.txt").read_text() == "the same edit\n"
        assert (root / "touched.txt").read_text() == "the same edit\n"
    # Settled: nothing left to do.
    pair.run("status", code=0)


def test_first_sync_with_differing_files_makes_conflicts_and_deletes_nothing(pair: Pair) -> None:
    write_file(pair.local / "same.txt", "same\n", mtime=MTIME)
    write_file(pair.remote / "same.txt", "same\n", mtime=MTIME)
    write_file(pair.local / "diff.txt", "local version\n", mtime=MTIME + 10)
    write_file(pair.remote / "diff.txt", "remote version\n", mtime=MTIME + 20)
    write_file(pair.local / "only-local.txt", "l\n", mtime=MTIME)
    write_file(pair.remote / "sub/only-remote.txt", "r\n", mtime=MTIME)
    r = pair.sync()
    kinds = {a["action"] for a in r.actions()}
    assert "delete_local" not in kinds and "delete_remote" not in kinds
    (conflict,) = [a for a in r.actions() if a["action"] == "conflict"]
    assert conflict["path"] == "diff.txt"
    t = pair.same()
    assert {"same.txt", "diff.txt", "only-local.txt", "sub/only-remote.txt"} <= t.keys()
    assert (pair.local / "diff.txt").read_text() == "remote version\n"
    assert (pair.local / conflict["kept"]).read_text() == "local version\n"

    # Lost state is a first sync again: a file missing on one side comes back.
    shutil.rmtree(pair.state)
    (pair.local / "only-local.txt").unlink()
    r = pair.sync()
    assert {a["action"] for a in r.actions()} == {"download"}
    assert pair.same() == t


# -- safety stops --------------------------------------------------------------------------


def test_emptied_local_root_stops_with_6_then_force_propagates(pair: Pair) -> None:
    synced(pair, {"a.txt": "a\n", "b/c.txt": "c\n", "d.txt": "d\n"})
    clear(pair.local)
    before = pair.snapshot()
    r = pair.sync(code=6)
    assert "empty" in r.stderr and "--force" in r.stderr
    assert [a for a in r.actions() if a["action"] != "skip"] == []
    assert pair.snapshot() == before
    r = pair.sync("--force")
    assert r.summary()["deleted_remote"] == 4  # three files and the folder
    assert tree(pair.local) == {} and tree(pair.remote) == {}


def test_missing_remote_root_stops_with_6_then_force_propagates(pair: Pair) -> None:
    synced(pair, {"a.txt": "a\n", "b/c.txt": "c\n"})
    shutil.rmtree(pair.remote)
    before = pair.snapshot()
    r = pair.sync(code=6)
    assert "missing" in r.stderr
    assert pair.snapshot() == before
    assert not pair.remote.exists()
    r = pair.sync("--force")
    assert r.summary()["deleted_local"] == 3  # two files and the folder
    assert tree(pair.local) == {}
    assert not pair.remote.exists() or tree(pair.remote) == {}


def test_max_delete_stops_with_6(pair: Pair) -> None:
    synced(pair, {f"f{i}.txt": f"{i}\n" for i in range(10)})
    for i in range(4):
        (pair.local / f"f{i}.txt").unlink()
    before = pair.snapshot()
    r = pair.sync("--max-delete", "3", code=6)
    assert "max-delete" in r.stderr
    assert pair.snapshot() == before
    pair.sync()  # 4 of 10 is within the default 50%
    assert len(pair.same()) == 6
    for i in range(4, 8):
        (pair.remote / f"f{i}.txt").unlink()
    before = pair.snapshot()
    pair.sync(code=6)  # 4 of the 6 local files is more than 50%
    assert pair.snapshot() == before
    pair.sync("--max-delete", "4")
    assert sorted(pair.same()) == ["f8.txt", "f9.txt"]


# -- attributes ----------------------------------------------------------------------------


def test_mode_change_propagates(pair: Pair) -> None:
    synced(pair, {"run.sh": "#!/bin/sh\n", "secret.txt": "s\n"})
    os.chmod(pair.local / "run.sh", 0o755)
    os.chmod(pair.remote / "secret.txt", 0o600)
    r = pair.sync()
    got = actions_by_path(r)
    assert {p: a["action"] for p, a in got.items()} == {
        "run.sh": "upload",
        "secret.txt": "download",
    }
    assert all(a["bytes"] == 0 for a in got.values())
    t = pair.same()
    assert t["run.sh"][4] == 0o755 and t["secret.txt"][4] == 0o600
    assert actions_by_path(pair.sync()) == {}


# -- status and verify ---------------------------------------------------------------------


def test_status_reports_pending_work_and_changes_nothing(pair: Pair) -> None:
    synced(pair, {"a.txt": "a\n", "b.txt": "b\n", "c.txt": "c\n", "d.txt": "d\n"})
    r = pair.run("status", code=0)
    assert actions_by_path(r) == {}
    write_file(pair.local / "new.txt", "n\n", mtime=MTIME + 50)
    (pair.remote / "b.txt").unlink()
    write_file(pair.local / "c.txt", "c local\n", mtime=MTIME + 60)
    write_file(pair.remote / "c.txt", "c remote\n", mtime=MTIME + 70)
    before = pair.snapshot()
    r = pair.run("status", code=1)
    got = actions_by_path(r)
    assert {p: a["action"] for p, a in got.items()} == {
        "new.txt": "upload",
        "b.txt": "delete_local",
        "c.txt": "conflict",
    }
    assert {a["status"] for a in got.values()} == {"planned"}
    assert conflict_re("c.txt", "local").fullmatch(got["c.txt"]["kept"])
    assert pair.snapshot() == before
    assert not (pair.local / LOCK).exists() and not (pair.remote / LOCK).exists()
    pair.sync()
    pair.run("status", code=0)


def test_verify_reports_a_corrupted_file(pair: Pair) -> None:
    synced(pair, {"a.txt": "alpha\n", "sub/b.bin": "bravo bravo\n", "c.txt": "charlie\n"})
    r = pair.run("verify", code=0)
    assert r.summary()["verified"] == 3 and r.summary()["differ"] == 0
    victim = pair.remote / "sub/b.bin"
    st = victim.stat()
    victim.write_bytes(b"bravo BRAVO\n")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size
    # size + mtime cannot see it...
    pair.run("status", code=0)
    # ...MD5 does.
    r = pair.run("verify", code=1)
    (bad,) = r.actions()
    assert bad["path"] == "sub/b.bin" and bad["status"] == "failed"
    assert md5_of("bravo BRAVO\n") in bad["error"] and md5_of("bravo bravo\n") in bad["error"]
    assert r.summary()["differ"] == 1 and r.summary()["verified"] == 2


# -- locks ---------------------------------------------------------------------------------


@pytest.fixture
def sleeper() -> Any:
    """A live process this test started (its pid plays a lock holder); killed afterwards."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.parametrize("side", ["local", "remote"])
def test_lock_held_by_a_live_process_exits_7_naming_it(
    pair: Pair, sleeper: subprocess.Popen, side: str
) -> None:
    synced(pair, {"a.txt": "a\n"})
    write_file(pair.local / "new.txt", "n\n", mtime=MTIME + 5)
    host = socket.gethostname()
    lock = (pair.local if side == "local" else pair.remote) / LOCK
    lock.write_text(json.dumps({"host": host, "pid": sleeper.pid}) + "\n")
    r = pair.sync(code=7)
    assert str(sleeper.pid) in r.stderr and host in r.stderr
    assert str(sleeper.pid) in r.summary()["error"] and host in r.summary()["error"]
    assert not (pair.remote / "new.txt").exists()
    assert json.loads(lock.read_text())["pid"] == sleeper.pid
    # Once the holder is gone the lock is stale: cleared, and the run proceeds.
    sleeper.kill()
    sleeper.wait()
    r = pair.sync()
    assert [a["path"] for a in r.actions()] == ["new.txt"]
    assert not lock.exists()
    assert not (pair.local / LOCK).exists() and not (pair.remote / LOCK).exists()
    pair.same()


def test_second_concurrent_sync_exits_7_then_a_dead_holder_is_cleared(pair: Pair) -> None:
    big = write_file(pair.local / "big.bin", os.urandom(8 << 20), mtime=MTIME)
    first = pair.start("sync", "--bwlimit", "1M")
    try:
        deadline = time.monotonic() + 30
        while not (pair.remote / LOCK).exists():
            assert first.poll() is None, "the first sync ended early"
            assert time.monotonic() < deadline, "the first sync never took the remote lock"
            time.sleep(0.02)
        assert (pair.local / LOCK).exists()
        r = pair.sync(code=7)
        assert f"pid {first.pid}" in r.stderr and socket.gethostname() in r.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (pair.remote / LOCK).exists() and (pair.local / LOCK).exists()
    r = pair.sync()
    assert [a["path"] for a in r.actions()] == ["big.bin"]
    assert hashlib.md5((pair.remote / "big.bin").read_bytes()).hexdigest() == md5_of(
        big.read_bytes()
    )
    assert not (pair.local / LOCK).exists() and not (pair.remote / LOCK).exists()
    pair.same()


def test_leftssh_own_files_are_never_synced(pair: Pair) -> None:
    write_file(pair.local / "real.txt", "real\n", mtime=MTIME)
    write_file(pair.local / ".leftssh" / "notes", "local state\n")
    write_file(pair.local / "sub" / LOCK, "not a lock here\n")
    write_file(pair.local / "sub" / ".x.txt.0123456789.leftpart", "partial\n")
    write_file(pair.remote / "stray.leftpart", "remote partial\n")
    write_file(pair.remote / ".leftssh" / "other", "remote state\n")
    # A stale lock (dead pid) at the remote root: cleared, never copied.
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_file(pair.remote / LOCK, json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    r = pair.sync()
    assert {a["path"] for a in r.actions()} == {"real.txt", "sub"}
    for path in ("stray.leftpart", ".leftssh/other", LOCK):
        assert not (pair.local / path).exists(), path
    for path in (".leftssh/notes", LOCK, f"sub/{LOCK}", "sub/.x.txt.0123456789.leftpart"):
        assert not (pair.remote / path).exists(), path
    assert (pair.remote / "stray.leftpart").read_text() == "remote partial\n"
    assert (pair.local / "sub" / LOCK).read_text() == "not a lock here\n"
    assert actions_by_path(pair.sync()) == {}


# -- SIGKILL at random moments -------------------------------------------------------------

FAULT_SEED = 20261121
FAULT_TRIALS = 10


def _fault_size(rng: random.Random) -> int:
    """Mixed sizes from 0 to 300 KB: empty, tiny, small and large files."""
    low, high = rng.choice([(0, 0), (1, 2_000), (2_000, 50_000), (50_000, 300_000)])
    return rng.randint(low, high)


def _prepare_fault_pair(pair: Pair, rng: random.Random) -> dict:
    """Sync a 200-file tree, then change both sides; return the agreed (base) tree."""
    paths = []
    for i in range(200):
        folder = f"d{i % 8}" + (f"/s{i % 3}" if i % 5 == 0 else "")
        paths.append(f"{folder}/f{i:03}.bin")
        write_file(pair.local / paths[-1], rng.randbytes(_fault_size(rng)), mtime=MTIME + i)
    pair.sync()
    base = pair.same()
    rng.shuffle(paths)
    stamps = iter(range(MTIME + 10_000, MTIME + 20_000))

    def take(n: int) -> list[str]:
        taken, paths[:] = paths[:n], paths[n:]
        return taken

    def put(root: Path, path: str, data: bytes | None = None, mtime: int | None = None) -> None:
        if data is None:
            data = rng.randbytes(max(1, _fault_size(rng)))
        write_file(root / path, data, mtime=mtime or next(stamps))

    for root in (pair.local, pair.remote):
        for path in take(15):  # modified on this side only
            put(root, path)
        for path in take(10):  # deleted on this side only
            (root / path).unlink()
        side = "l" if root == pair.local else "r"
        for i in range(12):  # new files, half of them in a new folder
            put(root, f"new-{side}/{i:02}.bin" if i % 2 else f"d{i % 8}/n{side}{i:02}.bin")
    for path in take(3):  # conflicts: different edits on both sides
        put(pair.local, path)
        put(pair.remote, path)
    for path in take(3):  # modified on one side, deleted on the other
        put(pair.local, path)
        (pair.remote / path).unlink()
    for path in take(3):
        put(pair.remote, path)
        (pair.local / path).unlink()
    for path in take(2):  # the same edit on both sides
        data, mtime = rng.randbytes(1000), next(stamps)
        put(pair.local, path, data, mtime)
        put(pair.remote, path, data, mtime)
    return base


def _lost_versions(base: dict, before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """Versions present on a side before the run and now on neither side.

    A version may legitimately go only when its side left the path as it was
    in the base while the other side changed or deleted it: that change (an
    update or a deletion) was propagated over it.
    """

    def md5s(t: dict) -> dict[str, str]:
        return {p: e[1] for p, e in t.items() if e[0] == "file"}

    base_md5, now = md5s(base), [md5s(t) for t in after.values()]
    lost = []
    for side, other in (("local", "remote"), ("remote", "local")):
        mine, theirs = md5s(before[side]), md5s(before[other])
        for path, md5 in mine.items():
            if path in base_md5 and md5 == base_md5[path] != theirs.get(path):
                continue
            if not any(f.get(q) == md5 for f in now for q in (path, *copies_of(f, path))):
                lost.append(f"{side}:{path}")
    return lost


@pytest.mark.slow
def test_sigkill_at_random_moments_converges_and_loses_nothing(pair: Pair, tmp_path: Path) -> None:
    rng = random.Random(FAULT_SEED)
    base = _prepare_fault_pair(pair, rng)
    before = {"local": tree(pair.local), "remote": tree(pair.remote)}
    known = {e[1] for t in before.values() for e in t.values() if e[0] == "file"}
    golden = tmp_path / "golden"
    roots = {"local": pair.local, "remote": pair.remote, "state": pair.state}
    for name, root in roots.items():
        shutil.copytree(root, golden / name)

    def restore() -> None:
        for name, root in roots.items():
            shutil.rmtree(root)
            shutil.copytree(golden / name, root)
        assert tree(pair.local) == before["local"] and tree(pair.remote) == before["remote"]

    def check(label: str, reruns: int) -> list[int]:
        """Rerun sync until both trees agree; check status and that no version was lost."""
        codes: list[int] = []
        r = None
        while len(codes) < reruns:
            r = pair.sync(code=None)
            codes.append(r.code)
            if r.code == 0 and tree(pair.local) == tree(pair.remote):
                break
        after = {"local": tree(pair.local), "remote": tree(pair.remote)}
        assert after["local"] == after["remote"], f"{label}: not converged ({codes}):\n{r}"
        assert r is None or r.code == 0, f"{label}: reruns exited {codes}:\n{r}"
        pair.run("status", code=0)
        assert _lost_versions(base, before, after) == [], label
        foreign = {e[1] for e in after["local"].values() if e[0] == "file"} - known
        assert not foreign, f"{label}: files with content that never existed (torn?)"
        return codes

    # One uninterrupted run: it must converge at once, and it sets the range of kill delays.
    started = time.monotonic()
    pair.sync()
    duration = time.monotonic() - started
    check("uninterrupted run", 0)

    results = []
    for trial in range(FAULT_TRIALS):
        restore()
        delay = rng.uniform(0, duration)
        proc = pair.start("sync")
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=120)
        assert killed or code == 0, f"trial {trial}: the run ended with {code} before the kill"
        codes = check(f"trial {trial} (kill after {delay:.2f} s)", 2)
        results.append((round(delay, 2), killed, codes))
    print(
        f"\nuninterrupted sync {duration:.2f} s; trials (delay s, killed, rerun codes): {results}"
    )


def test_a_damaged_base_is_reported_only_once_connected(pair: Pair, tmp_path: Path) -> None:
    """The base is read while the connection is being made; a damaged one still yields
    to a failed connection (its exit code), and is reported (exit 2) once connected."""
    write_file(pair.local / "a.txt", "a\n", mtime=MTIME)
    pair.sync()
    (base,) = (pair.state / "bases").glob("*.base")
    base.write_bytes(base.read_bytes()[:-20])
    empty = tmp_path / "no_known_hosts"
    empty.write_text("")
    args = pair.args("sync")
    args[args.index("--known-hosts") + 1] = str(empty)
    r = pair.runner(*args, env=pair.env)
    assert r.code == 5, r  # host key unknown: the connection's own exit code
    assert "sync state" not in r.stderr, r
    r = pair.sync(code=2)
    assert "cannot read the sync state" in r.stderr, r


def test_a_relative_remote_path_finds_the_same_base(pair: Pair) -> None:
    """A path relative to the login directory names the same pair as its absolute form."""
    write_file(pair.local / "a.txt", "a\n", mtime=MTIME)
    write_file(pair.local / "b.txt", "b\n", mtime=MTIME)
    pair.sync()
    home = subprocess.run(
        [*pair.sshd.ssh_args(), "pwd"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    relative = os.path.relpath(pair.remote, home)
    assert not relative.startswith("/")
    (pair.remote / "a.txt").unlink()  # with the base found, a deletion to propagate
    args = pair.args("sync")
    args[1] = f"{pair.sshd.ALIAS}:{relative}"  # the alias of the ssh_config given with -F
    r = pair.runner(*args, env=pair.env)
    assert r.code == 0, r
    assert not (pair.local / "a.txt").exists(), r
    assert (pair.local / "b.txt").exists()


def _held_by_this_process(command: str = "sync") -> str:
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": command,
        "started": "2026-01-01T00:00:00Z",
    }
    return json.dumps(holder) + "\n"


def test_a_run_refused_by_the_local_lock_leaves_the_remote_share_unlocked(pair: Pair) -> None:
    """The remote side is locked and listed while the local side is scanned, but only
    after the local lock is taken: a run refused there never holds the remote lock."""
    write_file(pair.local / "a.txt", "a\n", mtime=MTIME)
    write_file(pair.local / LOCK, _held_by_this_process())
    seen: list[bool] = []
    watching = True

    def watch() -> None:
        while watching:
            seen.append((pair.remote / LOCK).exists())

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        r = pair.sync(code=7)
    finally:
        watching = False
        th.join(5)
    assert f"pid {os.getpid()}" in r.stderr, r
    assert not any(seen) and not (pair.remote / LOCK).exists()
    assert not (pair.remote / "a.txt").exists()


def test_a_remote_refusal_or_scan_error_releases_the_local_lock(pair: Pair) -> None:
    write_file(pair.local / "a.txt", "a\n", mtime=MTIME)
    write_file(pair.remote / LOCK, _held_by_this_process())
    r = pair.sync(code=7)
    assert f"pid {os.getpid()}" in r.stderr, r
    assert not (pair.local / LOCK).exists()
    (pair.remote / LOCK).unlink()
    (pair.remote / "sub").mkdir()
    (pair.remote / "sub" / ".leftignore").write_bytes(b"\xff\xfe not UTF-8\n")
    r = pair.sync(code=2)
    assert ".leftignore" in r.stderr, r
    assert not (pair.local / LOCK).exists() and not (pair.remote / LOCK).exists()
    assert not (pair.remote / "a.txt").exists()
