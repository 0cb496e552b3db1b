"""Pipelines and daily use: the JSON Lines contract, every exit code, configuration through
the environment, OpenSSH client configuration, several targets, ``watch``, progress output
and SFTP-only peers. Every test talks to real OpenSSH servers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO_ROOT, Result, tree, write_file
from tests.sshd import Sshd

MTIME = 1_600_000_000

# -- the JSON Lines contract (SPEC section 7), as one schema ---------------------------------

ACTIONS = {
    "upload",
    "download",
    "delete_local",
    "delete_remote",
    "mkdir_local",
    "mkdir_remote",
    "conflict",
    "skip",
    "verify",
}
TRANSFERS = {"upload", "download"}
STATUSES = {"ok", "failed", "planned", "skipped"}
VERIFIED = {"md5", "size", "none"}


def _is_int(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and value >= 0


@dataclass(frozen=True)
class Field:
    """One key of a record: how to check its value and whether it must be present."""

    check: Callable[[Any], bool]
    required: bool = False


ACTION_FIELDS = {
    "action": Field(lambda v: v in ACTIONS, required=True),
    "path": Field(_is_str, required=True),
    "status": Field(lambda v: v in STATUSES, required=True),
    "target": Field(_is_str),
    "error": Field(_is_str),
    "reason": Field(_is_str),
    "bytes": Field(_is_int),
    "resumed_from": Field(_is_int),
    "verified": Field(lambda v: v in VERIFIED),
    "kept": Field(_is_str),
}

SUMMARY_FIELDS = {
    "target": Field(_is_str, required=True),
    **{
        name: Field(_is_int, required=True)
        for name in (
            "uploaded",
            "downloaded",
            "deleted_local",
            "deleted_remote",
            "conflicts",
            "failed",
            "bytes",
        )
    },
    "seconds": Field(_is_number, required=True),
    "exit_code": Field(lambda v: type(v) is int and 0 <= v <= 8, required=True),
    "error": Field(_is_str),
    "verified": Field(_is_int),
    "differ": Field(_is_int),
}


def _check_fields(obj: dict, fields: dict[str, Field], what: str) -> None:
    unknown = set(obj) - set(fields)
    assert not unknown, f"{what} has unknown keys {sorted(unknown)}: {obj}"
    for name, spec in fields.items():
        if name not in obj:
            assert not spec.required, f"{what} lacks {name!r}: {obj}"
        else:
            assert spec.check(obj[name]), f"{what} has a bad {name!r}: {obj}"


def check_action(rec: dict) -> None:
    """Validate one action record, including the rules that tie keys together."""
    _check_fields(rec, ACTION_FIELDS, "action record")
    action, status = rec["action"], rec["status"]
    assert (status == "failed") == ("error" in rec), f"failed <=> error: {rec}"
    assert (status == "skipped") == ("reason" in rec), f"skipped <=> reason: {rec}"
    if action in TRANSFERS:
        for key in ("bytes", "resumed_from", "verified"):
            assert key in rec, f"a transfer record lacks {key!r}: {rec}"
    else:
        assert "resumed_from" not in rec, f"only transfers resume: {rec}"
        if action != "conflict":
            assert "bytes" not in rec and "verified" not in rec, rec
    if action == "conflict" and status == "ok":
        assert "kept" in rec, f"a resolved conflict names the kept copy: {rec}"
    if action != "conflict":
        assert "kept" not in rec, rec
    if action == "skip":
        assert status == "skipped", rec
    if action == "verify":
        assert status in ("ok", "failed"), rec


def check_summary(body: dict) -> None:
    _check_fields(body, SUMMARY_FIELDS, "summary")


def check_output(r: Result, *, targets: int = 1) -> tuple[list[dict], list[dict]]:
    """Validate every stdout line of a ``--json`` run; return (actions, summaries).

    Every line is a JSON object, either an action record or a summary. There is one summary
    per target, coming after that target's actions; the highest summary exit code is the
    process exit code; and the bytes of a target's records add up to its summary's bytes.
    """
    lines = r.stdout.splitlines()
    assert lines, f"no JSON output:\n{r}"
    actions: list[dict] = []
    summaries: list[dict] = []
    for number, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise AssertionError(f"stdout line {number} is not JSON ({e}):\n{r}") from e
        assert isinstance(obj, dict), f"stdout line {number} is not an object:\n{r}"
        if "summary" in obj:
            assert set(obj) == {"summary"} and isinstance(obj["summary"], dict), obj
            check_summary(obj["summary"])
            summaries.append(obj["summary"])
        else:
            check_action(obj)
            if targets > 1:
                assert "target" in obj, f"with several targets every record names one: {obj}"
                done = {s["target"] for s in summaries}
                assert obj["target"] not in done, f"a record after its summary: {obj}"
            actions.append(obj)
    assert "summary" in json.loads(lines[-1]), f"the last line is not a summary:\n{r}"
    assert len(summaries) == targets, f"{len(summaries)} summaries for {targets} target(s):\n{r}"
    assert max(s["exit_code"] for s in summaries) == r.code, f"exit code mismatch:\n{r}"
    for s in summaries:
        mine = [a for a in actions if targets == 1 or a["target"] == s["target"]]
        assert sum(a.get("bytes", 0) for a in mine) == s["bytes"], f"bytes do not add up:\n{r}"
        assert sum(a["status"] == "failed" for a in mine) == s["failed"], f"failed count:\n{r}"
        if s["exit_code"] == 0:
            assert "error" not in s, s
    return actions, summaries


def test_schema_rejects_records_that_break_the_contract() -> None:
    good = {"action": "upload", "path": "a", "bytes": 1, "resumed_from": 0, "verified": "md5"}
    check_action({**good, "status": "ok"})
    bad = [
        {**good, "status": "failed"},  # failed without error
        {**good, "status": "skipped"},  # skipped without reason
        {**good, "status": "ok", "verified": "sha1"},
        {**good, "status": "ok", "bytes": -1},
        {**good, "status": "ok", "bytes": True},
        {**good, "status": "ok", "extra": 1},
        {"action": "upload", "path": "a", "status": "ok"},  # transfer without bytes
        {"action": "conflict", "path": "a", "status": "ok"},  # resolved without kept
        {"action": "rename", "path": "a", "status": "ok"},
        {"action": "skip", "path": "a", "status": "ok"},
    ]
    for rec in bad:
        with pytest.raises(AssertionError):
            check_action(rec)
    summary = {
        "target": "t",
        "uploaded": 0,
        "downloaded": 0,
        "deleted_local": 0,
        "deleted_remote": 0,
        "conflicts": 0,
        "failed": 0,
        "bytes": 0,
        "seconds": 0.1,
        "exit_code": 0,
    }
    check_summary(summary)
    for broken in ({**summary, "exit_code": 9}, {**summary, "bogus": 1}, {"target": "t"}):
        with pytest.raises(AssertionError):
            check_summary(broken)


# -- helpers ------------------------------------------------------------------------------------


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def child_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment ``run_leftssh`` gives a child, for processes started by hand."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def leftssh_cmd(*args: Any) -> list[str]:
    return [sys.executable, "-m", "leftssh", *map(str, args)]


class Background:
    """A leftssh process started by a test, its output captured in files."""

    def __init__(self, workdir: Path, *args: Any, env: dict[str, str | None] | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.out_path = workdir / "stdout"
        self.err_path = workdir / "stderr"
        self.args = leftssh_cmd(*args)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=child_env(env)
            )

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def finish(self, timeout: float = 20) -> Result:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not stop within {timeout} s:\n{self.stderr()}") from None
        result = Result(self.args, code, self.out_path.read_text(errors="replace"), self.stderr())
        assert "Traceback" not in result.stderr, result
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, run: Background | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    detail = f"\n--- stderr of {run.args} ---\n{run.stderr()}" if run is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")


def partials(root: Path) -> list[Path]:
    return sorted(root.rglob("*.leftpart")) if root.exists() else []


def partial_size(root: Path, of: str = "") -> int:
    """The size of the largest partial file under ``root`` (0 if none, even while renamed);
    with ``of``, only partials of that file name (``.NAME.<tag>.leftpart``), never an
    archive of small files."""
    sizes = [0]
    for path in partials(root):
        if of and not path.name.startswith(f".{of}."):
            continue
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:
            pass
    return max(sizes)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections but never says a word of SSH."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A key the servers do not know, and an encrypted (passphrase-protected) key."""
    d = tmp_path_factory.mktemp("keys")
    made = {}
    for name, passphrase in (("wrong", ""), ("encrypted", "secret phrase")):
        cmd = ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(d / name)]
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, capture_output=True)
        made[name] = d / name
    return made


@pytest.fixture
def work(tmp_path: Path) -> dict[str, Path]:
    return {
        "local": tmp_path / "project" / "share",
        "remote": tmp_path / "remote" / "share",
        "state": tmp_path / "state",
    }


def ssh_config(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# -- 1. the JSON contract on every command ------------------------------------------------------


def test_json_contract_of_push_pull_sync_status_and_verify(sshd, run_leftssh, work, tmp_path):
    local, remote = work["local"], work["remote"]
    env = {"LEFTSSH_STATE_DIR": str(work["state"])}
    files = {
        "a.txt": b"alpha\n",
        "sub/b.bin": os.urandom(300_000),
        "sub/deeper/empty.txt": b"",
        "conflict.md": b"local version\n",
    }
    for name, data in files.items():
        write_file(local / name, data, mtime=MTIME)
    (local / "empty-dir").mkdir()
    (local / "link").symlink_to("a.txt")
    target = sshd.target(str(remote))

    def run(command: str, *extra: Any, d: Path = local) -> Result:
        r = run_leftssh(command, target, "-d", d, "--json", *extra, *sshd.cli_args(), env=env)
        check_output(r)
        return r

    r = run("push")
    assert r.code == 0, r
    uploads = {a["path"]: a for a in r.actions() if a["action"] == "upload"}
    assert set(uploads) == set(files)
    for name, rec in uploads.items():
        assert rec["status"] == "ok" and rec["resumed_from"] == 0 and rec["verified"] == "md5"
        assert rec["bytes"] == len(files[name]), rec
    assert r.summary()["bytes"] == sum(len(d) for d in files.values())
    skip = next(a for a in r.actions() if a["action"] == "skip")
    assert skip == {"action": "skip", "path": "link", "reason": "symlink", "status": "skipped"}

    pulled = tmp_path / "pulled"
    r = run("pull", d=pulled)
    assert r.code == 0, r
    downloads = {a["path"]: a for a in r.actions() if a["action"] == "download"}
    assert {p: a["bytes"] for p, a in downloads.items()} == {p: len(d) for p, d in files.items()}
    assert r.summary()["downloaded"] == len(files)

    # A first sync where both sides hold a different conflict.md: a conflict, kept on both.
    write_file(remote / "conflict.md", b"remote version, longer\n", mtime=MTIME + 50)
    write_file(remote / "from-remote.txt", b"r" * 1000, mtime=MTIME)
    write_file(local / "from-local.txt", b"l" * 2000, mtime=MTIME)
    r = run("status")
    assert r.code == 1, r
    assert {a["status"] for a in r.actions()} <= {"planned", "skipped"}
    assert not (remote / "from-local.txt").exists()

    r = run("sync")
    assert r.code == 0, r
    by_path = {a["path"]: a for a in r.actions()}
    assert by_path["from-local.txt"]["action"] == "upload"
    assert by_path["from-local.txt"]["bytes"] == 2000
    assert by_path["from-remote.txt"]["action"] == "download"
    assert by_path["from-remote.txt"]["bytes"] == 1000
    conflict = by_path["conflict.md"]
    assert conflict["action"] == "conflict" and conflict["status"] == "ok"
    # Resolving it copied the winner over and the kept version across: both count.
    assert conflict["bytes"] == len(b"remote version, longer\n") + len(files["conflict.md"])
    assert conflict["verified"] == "md5"
    assert (local / conflict["kept"]).exists() and (remote / conflict["kept"]).exists()
    assert tree(local) == tree(remote)

    r = run("verify")
    assert r.code == 0, r
    assert r.summary()["differ"] == 0 and r.summary()["verified"] == len(files) + 3
    # Same size, same mtime, different bytes: only verify can tell.
    write_file(remote / "a.txt", b"ALPHA\n", mtime=MTIME)
    r = run("verify")
    assert r.code == 1, r
    (bad,) = r.actions()
    assert bad["action"] == "verify" and bad["path"] == "a.txt" and bad["status"] == "failed"
    assert r.summary()["differ"] == 1 and r.summary()["failed"] == 1


# -- 2. every exit code from a real scenario ----------------------------------------------------


def test_exit_0_done(sshd, run_leftssh, work):
    write_file(work["local"] / "x.txt", "x")
    r = run_leftssh(
        "push", sshd.target(str(work["remote"])), "-d", work["local"], "--json", *sshd.cli_args()
    )
    assert r.code == 0, r
    check_output(r)
    assert (work["remote"] / "x.txt").read_text() == "x"


def test_exit_1_a_file_that_vanishes_mid_transfer_fails_alone(sshd, work):
    """A per-file failure (the source vanished during its transfer): the rest goes on."""
    local, remote = work["local"], work["remote"]
    write_file(local / "big.bin", os.urandom(4 << 20))
    write_file(local / "small.txt", "small")
    run = Background(
        work["state"],
        "push",
        sshd.target(str(remote)),
        "-d",
        local,
        "--json",
        "--jobs",
        "1",
        "--bwlimit",
        "3M",
        *sshd.cli_args(),
    )
    try:
        # big.bin's partial, not small.txt's archive: the source must vanish once it is open
        wait_for(lambda: partial_size(remote, "big.bin") > 1024, 20, "the transfer", run)
        (local / "big.bin").unlink()
        r = run.finish()
    finally:
        run.kill()
    assert r.code == 1, r
    actions, (summary,) = check_output(r)
    failed = [a for a in actions if a["status"] == "failed"]
    assert [a["path"] for a in failed] == ["big.bin"], r
    assert "changed" in failed[0]["error"] or "vanished" in failed[0]["error"], failed
    assert summary["failed"] == 1 and summary["uploaded"] == 1
    assert (remote / "small.txt").read_text() == "small"
    assert not (remote / "big.bin").exists()


def test_exit_2_usage(sshd, run_leftssh, work, tmp_path):
    r = run_leftssh("push", "somehost", "--jobs", "zero", cwd=tmp_path)
    assert r.code == 2, r
    assert "--jobs" in r.stderr
    r = run_leftssh("sync", "ssh://host:99999/x", "--json", cwd=tmp_path)
    assert r.code == 2, r
    check_output(r)
    r = run_leftssh("push", sshd.target(str(work["remote"])), "-d", tmp_path / "nope", "--json")
    assert r.code == 2, r
    _, (summary,) = check_output(r)
    assert "does not exist" in summary["error"]


def test_exit_3_cannot_connect(run_leftssh, work, sshd):
    write_file(work["local"] / "x.txt", "x")
    port = closed_port()
    r = run_leftssh(
        "push", f"ssh://127.0.0.1:{port}/tmp/x", "-d", work["local"], "--json", *sshd.cli_args()
    )
    assert r.code == 3, r
    _, (summary,) = check_output(r)
    assert str(port) in summary["error"]


def test_exit_4_authentication(sshd, run_leftssh, work, keys):
    write_file(work["local"] / "x.txt", "x")
    r = run_leftssh(
        "push",
        sshd.target(str(work["remote"])),
        "-d",
        work["local"],
        "--json",
        "-i",
        keys["wrong"],
        "--known-hosts",
        sshd.known_hosts,
    )
    assert r.code == 4, r
    _, (summary,) = check_output(r)
    assert "permission denied" in summary["error"].lower()
    assert not work["remote"].exists()


def test_exit_5_unknown_host_key(sshd, run_leftssh, work, tmp_path):
    write_file(work["local"] / "x.txt", "x")
    known = tmp_path / "known_hosts"
    known.write_text("")
    r = run_leftssh(
        "push",
        sshd.target(str(work["remote"])),
        "-d",
        work["local"],
        "--json",
        "-i",
        sshd.identity,
        "--known-hosts",
        known,
    )
    assert r.code == 5, r
    _, (summary,) = check_output(r)
    assert "unknown" in summary["error"]
    assert known.read_text() == "" and not work["remote"].exists()


def test_exit_6_safety_stop_max_delete(sshd, run_leftssh, work):
    local, remote = work["local"], work["remote"]
    for i in range(4):
        write_file(remote / f"old{i}.txt", str(i))
    write_file(local / "keep.txt", "keep")
    before = tree(remote)
    r = run_leftssh(
        "push",
        sshd.target(str(remote)),
        "-d",
        local,
        "--delete",
        "--max-delete",
        "3",
        "--json",
        *sshd.cli_args(),
    )
    assert r.code == 6, r
    actions, (summary,) = check_output(r)
    assert actions == [] and "max-delete" in summary["error"]
    assert tree(remote) == before


def test_exit_7_lock_held_by_a_live_process(sshd, run_leftssh, work):
    local, remote = work["local"], work["remote"]
    write_file(local / "x.txt", "x")
    host = socket.gethostname()
    holder = {
        "host": host,
        "pid": os.getpid(),
        "command": "sync",
        "started": "2026-01-01T00:00:00Z",
    }
    write_file(remote / ".leftssh.lock", json.dumps(holder) + "\n")
    r = run_leftssh("push", sshd.target(str(remote)), "-d", local, "--json", *sshd.cli_args())
    assert r.code == 7, r
    _, (summary,) = check_output(r)
    assert f"pid {os.getpid()}" in summary["error"] and host in summary["error"]
    assert f"pid {os.getpid()}" in r.stderr
    assert json.loads((remote / ".leftssh.lock").read_text()) == holder
    assert not (remote / "x.txt").exists()


def test_exit_8_sigint_and_sigterm_keep_the_partial_and_the_next_run_resumes(sshd, work):
    local, remote = work["local"], work["remote"]
    data = os.urandom(8 << 20)
    write_file(local / "big.bin", data)
    args = ["push", sshd.target(str(remote)), "-d", local, "--json", *sshd.cli_args()]
    sizes = []
    for n, signum in enumerate((signal.SIGINT, signal.SIGTERM)):
        floor = (sizes[-1] if sizes else 0) + (1 << 20)
        run = Background(work["state"] / str(n), *args, "--bwlimit", "4M")
        try:
            wait_for(
                lambda floor=floor: partial_size(remote) >= floor,
                20,
                "the transfer to progress",
                run,
            )
            run.signal(signum)
            r = run.finish()
        finally:
            run.kill()
        assert r.code == 8, r
        _, (summary,) = check_output(r)
        assert "interrupted" in summary["error"]
        (partial,) = partials(remote)
        assert partial.name.startswith(".big.bin.")
        sizes.append(partial.stat().st_size)
        assert 0 < sizes[-1] < len(data)
        assert not (remote / "big.bin").exists()
    assert sizes[1] > sizes[0], "the second run did not go on from the first partial"

    done = subprocess.run(
        leftssh_cmd(*args), stdin=subprocess.DEVNULL, capture_output=True, env=child_env()
    )
    r = Result(leftssh_cmd(*args), done.returncode, done.stdout.decode(), done.stderr.decode())
    assert r.code == 0, r
    (upload,), _ = check_output(r)
    assert upload["resumed_from"] == sizes[1], "the partial was not resumed where it stopped"
    assert upload["bytes"] == len(data) - upload["resumed_from"]
    assert upload["verified"] == "md5"
    assert md5_of(remote / "big.bin") == hashlib.md5(data).hexdigest()
    assert partials(remote) == []


# -- 3. non-interactive use --------------------------------------------------------------------


def test_every_option_can_come_from_the_environment(sshd, run_leftssh, work, tmp_path, silent_port):
    local, remote = work["local"], work["remote"]
    for i in range(3):
        write_file(local / f"f{i}.txt", f"file {i}\n", mtime=MTIME)
    target = sshd.target(str(remote))
    env: dict[str, str | None] = {
        "LEFTSSH_DIR": str(local),
        "LEFTSSH_JSON": "1",
        "LEFTSSH_DRY_RUN": "1",
        "LEFTSSH_IDENTITY": str(sshd.identity),
        "LEFTSSH_KNOWN_HOSTS": str(sshd.known_hosts),
        "LEFTSSH_STATE_DIR": str(work["state"]),
    }
    # Only environment variables, no options: a JSON dry run from an unrelated directory.
    r = run_leftssh("push", target, env=env, cwd=tmp_path)
    assert r.code == 0, r
    actions, _ = check_output(r)
    assert {a["status"] for a in actions} == {"planned"} and len(actions) == 3
    assert not remote.exists()

    env.update({"LEFTSSH_DRY_RUN": None, "LEFTSSH_VERIFY": "size", "LEFTSSH_JOBS": "2"})
    r = run_leftssh("push", target, env=env, cwd=tmp_path)
    assert r.code == 0, r
    actions, _ = check_output(r)
    assert {a["verified"] for a in actions} == {"size"} and len(actions) == 3
    assert tree(remote) == tree(local)

    r = run_leftssh("push", target, env={**env, "LEFTSSH_JOBS": "0"}, cwd=tmp_path)
    assert r.code == 2 and "jobs" in r.stderr.lower(), r

    # LEFTSSH_MAX_DELETE: deleting 2 files is over a limit of 1.
    (local / "f1.txt").unlink()
    (local / "f2.txt").unlink()
    r = run_leftssh(
        "push", target, env={**env, "LEFTSSH_DELETE": "1", "LEFTSSH_MAX_DELETE": "1"}, cwd=tmp_path
    )
    assert r.code == 6, r
    check_output(r)
    assert (remote / "f2.txt").exists()

    # LEFTSSH_SSH_CONFIG: the alias's IdentityFile and UserKnownHostsFile are used.
    alias_env = {**env, "LEFTSSH_IDENTITY": None, "LEFTSSH_KNOWN_HOSTS": None}
    alias_env["LEFTSSH_SSH_CONFIG"] = str(sshd.ssh_config)
    alias_env["LEFTSSH_VERIFY"] = None
    r = run_leftssh("sync", f"{Sshd.ALIAS}:{remote}", env=alias_env, cwd=tmp_path)
    assert r.code == 0, r
    check_output(r)
    # LEFTSSH_CONFLICT=skip: a file changed on both sides stays as it is, exit 1.
    write_file(local / "f0.txt", "local edit\n", mtime=MTIME + 10)
    write_file(remote / "f0.txt", "remote edit!\n", mtime=MTIME + 20)
    r = run_leftssh(
        "sync",
        f"{Sshd.ALIAS}:{remote}",
        env={**alias_env, "LEFTSSH_CONFLICT": "skip"},
        cwd=tmp_path,
    )
    assert r.code == 1, r
    actions, _ = check_output(r)
    assert [(a["action"], a["status"]) for a in actions] == [("conflict", "skipped")]
    assert (local / "f0.txt").read_text() == "local edit\n"

    # LEFTSSH_TIMEOUT: a server that never answers is given up on after the timeout.
    started = time.monotonic()
    r = run_leftssh("push", f"ssh://127.0.0.1:{silent_port}/x", env={**env, "LEFTSSH_TIMEOUT": "1"})
    assert r.code == 3, r
    check_output(r)
    assert time.monotonic() - started < 10


def run_detached(*args: Any, env: dict[str, str | None] | None = None) -> Result:
    """Run leftssh with stdin closed (not even /dev/null) and no controlling terminal."""
    cmd = ["sh", "-c", 'exec "$@" <&-', "sh", *leftssh_cmd(*args)]
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=child_env(env),
            start_new_session=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"hung with stdin closed: {cmd}") from e
    r = Result(cmd, done.returncode, done.stdout.decode(), done.stderr.decode())
    assert "Traceback" not in r.stderr, r
    return r


def test_closed_stdin_never_hangs_or_prompts(sshd, work, keys, tmp_path):
    local, remote = work["local"], work["remote"]
    write_file(local / "x.txt", "x")
    target = sshd.target(str(remote))
    empty_known = tmp_path / "known_hosts"
    empty_known.write_text("")
    # An unknown host key is refused, not asked about.
    r = run_detached("push", target, "-d", local, "-i", sshd.identity, "--known-hosts", empty_known)
    assert r.code == 5, r
    # An encrypted key named by the SSH config, and no agent: exit 4, pointing at ssh-agent.
    config = ssh_config(
        tmp_path / "config",
        f"Host locked\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
        f"    IdentityFile {keys['encrypted']}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {sshd.known_hosts}\n",
    )
    r = run_detached(
        "push", f"locked:{remote}", "-d", local, "-F", config, "--json", env={"SSH_AUTH_SOCK": None}
    )
    assert r.code == 4, r
    check_output(r)
    assert "ssh-agent" in r.stderr and "encrypted" in r.stderr
    # And a real run works the same way.
    r = run_detached("push", target, "-d", local, "--json", *sshd.cli_args())
    assert r.code == 0, r
    check_output(r)
    for text in (r.stdout, r.stderr):
        assert "passphrase" not in text.lower() and "(yes/no" not in text


# -- 4. OpenSSH client configuration -----------------------------------------------------------


def test_ssh_config_wildcard_alias_with_identities_only_and_several_identity_files(
    sshd, run_leftssh, work, keys, tmp_path
):
    """Host peer-*: HostName, Port, User, two IdentityFiles (the first one is refused),
    IdentitiesOnly, ServerAliveInterval and a plain ``[127.0.0.1]:port`` known_hosts entry."""
    write_file(work["local"] / "x.txt", "x")
    assert sshd.known_hosts.read_text().startswith(f"[127.0.0.1]:{sshd.port} ")
    config = ssh_config(
        tmp_path / "config",
        "Host other\n    HostName 127.0.0.2\n\n"
        "Host peer-*\n"
        "    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.user}\n"
        f"    IdentityFile {keys['wrong']}\n"
        f"    IdentityFile {sshd.identity}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {sshd.known_hosts}\n"
        "    ServerAliveInterval 5\n",
    )
    r = run_leftssh("push", f"peer-office:{work['remote']}", "-d", work["local"], "-F", config)
    assert r.code == 0, r
    assert (work["remote"] / "x.txt").read_text() == "x"
    # Only the wrong key: refused (so the second IdentityFile above really did the login).
    only_wrong = ssh_config(
        tmp_path / "config-wrong",
        config.read_text().replace(f"    IdentityFile {sshd.identity}\n", ""),
    )
    r = run_leftssh("push", f"peer-office:{work['remote']}", "-d", work["local"], "-F", only_wrong)
    assert r.code == 4, r


def test_hashed_known_hosts_entry(sshd, run_leftssh, work, tmp_path):
    write_file(work["local"] / "x.txt", "x")
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts.read_text())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert known.read_text().startswith("|1|") and "127.0.0.1" not in known.read_text()
    config = ssh_config(
        tmp_path / "config",
        f"Host hashed\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
        f"    IdentityFile {sshd.identity}\n    UserKnownHostsFile {known}\n"
        "    StrictHostKeyChecking yes\n",
    )
    before = known.read_text()
    r = run_leftssh("push", f"hashed:{work['remote']}", "-d", work["local"], "-F", config)
    assert r.code == 0, r
    assert known.read_text() == before


def test_user_known_hosts_file_and_accept_new_from_the_config(sshd, run_leftssh, work, tmp_path):
    write_file(work["local"] / "x.txt", "x")
    known = tmp_path / "sub" / "known_hosts"  # not there yet
    lines = (
        f"Host fresh\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
        f"    IdentityFile {sshd.identity}\n    UserKnownHostsFile {known}\n"
    )
    strict = ssh_config(tmp_path / "strict", lines)
    r = run_leftssh("push", f"fresh:{work['remote']}", "-d", work["local"], "-F", strict)
    assert r.code == 5, r
    assert not known.exists()
    accept = ssh_config(tmp_path / "accept", lines + "    StrictHostKeyChecking accept-new\n")
    r = run_leftssh("push", f"fresh:{work['remote']}", "-d", work["local"], "-F", accept)
    assert r.code == 0, r
    host_key = " ".join(sshd.host_key_pub.read_text().split()[:2])
    assert known.read_text() == f"[127.0.0.1]:{sshd.port} {host_key}\n"


def test_proxyjump_through_a_second_server(sshd, sshd_factory, run_leftssh, work, tmp_path):
    jump = sshd_factory()
    local, remote = work["local"], work["remote"]
    write_file(local / "through-the-jump.txt", "hop")
    known = tmp_path / "known_hosts"
    known.write_text(jump.known_hosts.read_text() + sshd.known_hosts.read_text())
    config = ssh_config(
        tmp_path / "config",
        f"Host jumpbox\n    HostName 127.0.0.1\n    Port {jump.port}\n    User {jump.user}\n"
        f"    IdentityFile {jump.identity}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known}\n\n"
        f"Host behind\n    HostName 127.0.0.1\n    Port {sshd.port}\n    User {sshd.user}\n"
        f"    IdentityFile {sshd.identity}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known}\n    ProxyJump jumpbox\n",
    )
    r = run_leftssh("push", f"behind:{remote}", "-d", local, "-F", config, "--json")
    assert r.code == 0, r
    check_output(r)
    assert (remote / "through-the-jump.txt").read_text() == "hop"
    assert f"Accepted publickey for {jump.user}" in jump.log_text()
    # The jump server is really on the path: without it the target is not reached.
    jump.stop()
    r = run_leftssh("push", f"behind:{remote}", "-d", local, "-F", config, "--json")
    assert r.code == 3, r
    check_output(r)


def test_connect_timeout_from_the_config(run_leftssh, work, sshd, silent_port, tmp_path):
    write_file(work["local"] / "x.txt", "x")
    config = ssh_config(
        tmp_path / "config",
        f"Host mute\n    HostName 127.0.0.1\n    Port {silent_port}\n    ConnectTimeout 2\n"
        f"    IdentityFile {sshd.identity}\n    UserKnownHostsFile {sshd.known_hosts}\n",
    )
    started = time.monotonic()
    r = run_leftssh("push", "mute:/tmp/never", "-d", work["local"], "-F", config, "--json")
    elapsed = time.monotonic() - started
    assert r.code == 3, r
    _, (summary,) = check_output(r)
    assert "timed out" in summary["error"]
    assert elapsed < 8, f"took {elapsed:.1f} s with ConnectTimeout 2"


# -- 5. several targets -------------------------------------------------------------------------


def test_push_to_three_targets_one_unreachable(sshd, run_leftssh, work, tmp_path):
    local = work["local"]
    write_file(local / "a.txt", "a" * 100, mtime=MTIME)
    write_file(local / "d/b.txt", "b" * 200, mtime=MTIME)
    one, two = tmp_path / "one", tmp_path / "two"
    targets = [sshd.target(str(one)), sshd.target(str(two)), f"ssh://127.0.0.1:{closed_port()}/x"]
    r = run_leftssh("push", *targets, "-d", local, "--json", *sshd.cli_args())
    assert r.code == 3, r
    actions, summaries = check_output(r, targets=3)
    assert sorted(s["exit_code"] for s in summaries) == [0, 0, 3]
    assert len({s["target"] for s in summaries}) == 3
    for s in summaries:
        if s["exit_code"] == 0:
            assert s["uploaded"] == 2 and s["bytes"] == 300
    assert tree(one) == tree(local) == tree(two)
    assert len([a for a in actions if a["action"] == "upload"]) == 4


# -- 6. watch -----------------------------------------------------------------------------------


def test_watch_syncs_both_ways_survives_a_server_restart_and_stops_on_sigterm(sshd_factory, work):
    server = sshd_factory()
    local, remote = work["local"], work["remote"]
    write_file(local / "first.txt", "first")
    remote.mkdir(parents=True)
    run = Background(
        work["state"] / "watch",
        "watch",
        server.target(str(remote)),
        "-d",
        local,
        "--interval",
        "0.5",
        "--remote-interval",
        "1",
        "--json",
        *server.cli_args(),
        env={"LEFTSSH_STATE_DIR": str(work["state"])},
    )
    try:
        wait_for(lambda: (remote / "first.txt").exists(), 15, "the first sync", run)
        write_file(local / "new-local.txt", "from local")
        wait_for(lambda: (remote / "new-local.txt").exists(), 10, "a local file to go up", run)
        write_file(remote / "new-remote.txt", "from remote")
        wait_for(lambda: (local / "new-remote.txt").exists(), 10, "a remote file to come down", run)

        server.stop()
        wait_for(lambda: "unreachable" in run.stderr(), 10, "watch to notice the outage", run)
        write_file(local / "while-down.txt", "made while the peer was away")
        time.sleep(2)  # at least one more failed attempt while down
        server.start()
        wait_for(
            lambda: (remote / "while-down.txt").exists(), 20, "the change after reconnecting", run
        )
        assert run.proc.poll() is None, "watch gave up"
        run.signal(signal.SIGTERM)
        r = run.finish()
    finally:
        run.kill()
    assert r.code == 0, r
    actions, (summary,) = check_output(r)
    assert summary["exit_code"] == 0
    done = {(a["action"], a["path"]) for a in actions if a["status"] == "ok"}
    assert {
        ("upload", "first.txt"),
        ("upload", "new-local.txt"),
        ("download", "new-remote.txt"),
        ("upload", "while-down.txt"),
    } <= done
    assert r.stderr.count("unreachable") == 1, r.stderr
    assert (remote / "while-down.txt").read_text() == "made while the peer was away"


# -- 7. progress --------------------------------------------------------------------------------


def run_with_terminal_stderr(*args: Any) -> tuple[int, str, str]:
    """Run leftssh with a pseudo-terminal as stderr; return (code, stdout, terminal text)."""
    master, slave = pty.openpty()
    captured = bytearray()

    def reader() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the child side is closed
                return
            if not data:
                return
            captured.extend(data)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        proc = subprocess.Popen(
            leftssh_cmd(*args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=child_env(),
        )
    finally:
        os.close(slave)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    thread.join(5)
    os.close(master)
    return proc.returncode, out.decode(), captured.decode(errors="replace")


def test_progress_on_a_terminal_and_none_with_json_or_no_progress(sshd, work):
    local, remote = work["local"], work["remote"]
    write_file(local / "big-file.bin", os.urandom(20 << 20))
    target = sshd.target(str(remote))
    code, _, text = run_with_terminal_stderr(
        "push", target, "-d", local, "--bwlimit", "20M", *sshd.cli_args()
    )
    assert code == 0, text
    assert re.search(r"\b\d{1,3}%", text), text
    assert "big-file.bin" in text
    assert "Traceback" not in text

    write_file(local / "second.bin", os.urandom(2 << 20))
    code, out, text = run_with_terminal_stderr(
        "push", target, "-d", local, "--bwlimit", "8M", "--json", *sshd.cli_args()
    )
    assert code == 0, text
    assert json.loads(out.splitlines()[-1])["summary"]["uploaded"] == 1
    assert "%" not in text and "second.bin" not in text

    write_file(local / "third.bin", os.urandom(2 << 20))
    code, _, text = run_with_terminal_stderr(
        "push", target, "-d", local, "--bwlimit", "8M", "--no-progress", *sshd.cli_args()
    )
    assert code == 0, text
    assert "%" not in text and "third.bin" in text  # the result line, no progress bar


# -- 8. SFTP-only peers -------------------------------------------------------------------------


def md5_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "MD5" in line]


def test_sftp_only_peer_push_pull_sync_with_size_verification(
    sftp_only_sshd, run_leftssh, work, tmp_path
):
    server = sftp_only_sshd
    local, remote = work["local"], work["remote"]
    write_file(local / "a.txt", "alpha", mtime=MTIME)
    write_file(local / "sub/b.bin", os.urandom(100_000), mtime=MTIME)
    target = server.target(str(remote))
    env = {"LEFTSSH_STATE_DIR": str(work["state"])}

    def run(*args: Any) -> Result:
        r = run_leftssh(*args, "--json", *server.cli_args(), env=env)
        assert r.code == 0, r
        actions, _ = check_output(r)
        transfers = [a for a in actions if a["action"] in TRANSFERS]
        assert transfers and {a["verified"] for a in transfers} == {"size"}, r
        assert len(md5_warnings(r.stderr)) == 1, r.stderr
        return r

    run("push", target, "-d", local)
    assert tree(remote) == tree(local)
    run("pull", target, "-d", tmp_path / "pulled")
    assert tree(tmp_path / "pulled") == tree(remote)
    # First sync, with a file that differs on both sides (same size: MD5 would be wanted).
    write_file(local / "c.txt", "local", mtime=MTIME + 1)
    write_file(remote / "c.txt", "remot", mtime=MTIME + 2)
    write_file(remote / "r.txt", "remote only", mtime=MTIME)
    r = run("sync", target, "-d", local)
    assert any(a["action"] == "conflict" and a["status"] == "ok" for a in r.actions())
    assert tree(local) == tree(remote)


def test_sftp_only_peer_refuses_md5_verification_clearly(sftp_only_sshd, run_leftssh, work):
    server = sftp_only_sshd
    local, remote = work["local"], work["remote"]
    write_file(local / "a.txt", "alpha")
    remote.mkdir(parents=True)
    target = server.target(str(remote))
    r = run_leftssh("push", target, "-d", local, "--verify", "md5", "--json", *server.cli_args())
    assert r.code != 0, r
    actions, (summary,) = check_output(r)
    assert actions == [] and summary["uploaded"] == 0
    assert "md5" in summary["error"].lower() and "md5" in r.stderr.lower()
    assert list(remote.iterdir()) == []

    # A conflict is refused as well, before either version is moved aside.
    write_file(remote / "a.txt", "remote alpha, longer")
    before = tree(local), tree(remote)
    r = run_leftssh(
        "sync",
        target,
        "-d",
        local,
        "--verify",
        "md5",
        "--json",
        *server.cli_args(),
        env={"LEFTSSH_STATE_DIR": str(work["state"])},
    )
    assert r.code != 0, r
    actions, (summary,) = check_output(r)
    assert actions == [] and "md5" in summary["error"].lower()
    assert (tree(local), tree(remote)) == before

    r = run_leftssh("verify", target, "-d", local, "--json", *server.cli_args())
    assert r.code != 0, r
    _, (summary,) = check_output(r)
    assert "md5sum" in summary["error"] and "md5sum" in r.stderr


# -- 9. compression and bandwidth limit --------------------------------------------------------


def test_compression_and_bwlimit(sshd, run_leftssh, work):
    local, remote = work["local"], work["remote"]
    write_file(local / "text.txt", "compressible line\n" * 20_000)
    r = run_leftssh(
        "push",
        sshd.target(str(remote)),
        "-d",
        local,
        "-z",
        "--bwlimit",
        "10M",
        "--json",
        *sshd.cli_args(),
    )
    assert r.code == 0, r
    (upload,), _ = check_output(r)
    assert upload["bytes"] == 18 * 20_000 and upload["verified"] == "md5"
    assert tree(remote) == tree(local)


def test_match_exec_in_the_ssh_config_still_works_though_invoke_loads_late(tmp_path):
    """paramiko's ``invoke`` is loaded only when a ``Match exec`` line needs it."""
    config = tmp_path / "ssh_config"
    config.write_text('Match exec "true"\n    HostName 127.0.0.9\n    Port 2299\n')
    script = f"""
import sys
import leftssh.transport.sftp
from leftssh.target import parse_target, resolve_ssh
assert "invoke.context" not in sys.modules, "invoke was loaded at start-up"
s = resolve_ssh(parse_target("somehost:/x"), ssh_config={str(config)!r})
assert (s.hostname, s.port) == ("127.0.0.9", 2299), (s.hostname, s.port)
assert "invoke.context" in sys.modules
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    # Code in the same process that imports one of invoke's modules first gets it too.
    script = "import leftssh, invoke.context; print(invoke.context.Context.__name__)"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout == "Context\n", r.stderr
