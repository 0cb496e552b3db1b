"""push and pull against a real OpenSSH server."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import tree, write_file

HOSTILE_NAMES = [
    "plain.txt",
    "with space.txt",
    'it\'s "quoted".txt',
    "$(touch pwned).txt",
    "semi;colon;rm -rf x.txt",
    "back`tick`.txt",
    "-leading-dash.txt",
    "--help",
    "new\nline.txt",
    "back\\slash.txt",
    "tab\there.txt",
    "ünïcødé-名前.txt",
    "*",
]

MTIME = 1_600_000_000


def make_tree(root: Path) -> dict:
    """A nested tree with empty dirs, empty files, modes and hostile names."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(HOSTILE_NAMES):
        write_file(root / "names" / name, f"content {i} of {name}\n", mtime=MTIME + i, mode=0o644)
    write_file(root / "empty.bin", b"", mtime=MTIME, mode=0o600)
    write_file(root / "script.sh", "#!/bin/sh\necho hi\n", mtime=MTIME, mode=0o755)
    write_file(root / "a/b/c/deep.txt", "deep\n", mtime=MTIME, mode=0o640)
    (root / "empty-dir/nested-empty").mkdir(parents=True)
    write_file(root / "big.bin", os.urandom(3 << 20), mtime=MTIME)
    return tree(root)


@pytest.fixture
def work(tmp_path: Path) -> dict[str, Path]:
    return {"local": tmp_path / "project" / "share", "remote": tmp_path / "remote" / "share"}


def _no_pwned(*roots: Path) -> None:
    for root in roots:
        assert not list(root.rglob("pwned")), "a file name was executed by a shell"
    assert not Path("pwned").exists()


def test_push_round_trip_preserves_tree_mtime_and_mode(sshd, run_leftssh, work):
    expected = make_tree(work["local"])
    r = run_leftssh(
        "push", sshd.target(str(work["remote"])), "-d", work["local"], "--json", *sshd.cli_args()
    )
    assert r.code == 0, r
    assert tree(work["remote"]) == expected
    assert r.summary()["uploaded"] == len([v for v in expected.values() if v[0] == "file"])
    assert r.summary()["exit_code"] == 0
    uploads = [a for a in r.actions() if a["action"] == "upload"]
    assert uploads and all(a["verified"] == "md5" and a["status"] == "ok" for a in uploads)
    big = next(a for a in uploads if a["path"] == "big.bin")
    assert big["bytes"] == 3 << 20 and big["resumed_from"] == 0
    _no_pwned(work["local"], work["remote"])

    again = run_leftssh(
        "push", sshd.target(str(work["remote"])), "-d", work["local"], "--json", *sshd.cli_args()
    )
    assert again.code == 0, again
    assert again.actions() == []
    assert again.summary()["uploaded"] == 0 and again.summary()["bytes"] == 0


def test_pull_round_trip_preserves_tree_mtime_and_mode(sshd, run_leftssh, work):
    expected = make_tree(work["remote"])
    r = run_leftssh(
        "pull", sshd.target(str(work["remote"])), "-d", work["local"], "--json", *sshd.cli_args()
    )
    assert r.code == 0, r
    assert tree(work["local"]) == expected
    downloads = [a for a in r.actions() if a["action"] == "download"]
    assert downloads and all(a["verified"] == "md5" for a in downloads)
    _no_pwned(work["local"], work["remote"])
    again = run_leftssh(
        "pull", sshd.target(str(work["remote"])), "-d", work["local"], "--json", *sshd.cli_args()
    )
    assert again.code == 0 and again.actions() == [], again


def test_changed_file_is_sent_again_and_mode_only_change_is_applied(sshd, run_leftssh, work):
    make_tree(work["local"])
    target = sshd.target(str(work["remote"]))
    assert run_leftssh("push", target, "-d", work["local"], *sshd.cli_args()).code == 0
    write_file(work["local"] / "a/b/c/deep.txt", "deeper\n", mtime=MTIME + 99)
    os.chmod(work["local"] / "script.sh", 0o700)
    r = run_leftssh("push", target, "-d", work["local"], "--json", *sshd.cli_args())
    assert r.code == 0, r
    paths = {a["path"]: a for a in r.actions()}
    assert set(paths) == {"a/b/c/deep.txt", "script.sh"}
    assert paths["a/b/c/deep.txt"]["bytes"] == len("deeper\n")
    assert paths["script.sh"]["bytes"] == 0
    assert tree(work["remote"]) == tree(work["local"])


def test_checksum_mode_detects_same_size_same_mtime_change(sshd, run_leftssh, work):
    write_file(work["local"] / "f.txt", "aaaa", mtime=MTIME)
    target = sshd.target(str(work["remote"]))
    assert run_leftssh("push", target, "-d", work["local"], *sshd.cli_args()).code == 0
    write_file(work["remote"] / "f.txt", "bbbb", mtime=MTIME)
    quick = run_leftssh("push", target, "-d", work["local"], "--json", *sshd.cli_args())
    assert quick.actions() == []
    deep = run_leftssh("push", target, "-d", work["local"], "-c", "--json", *sshd.cli_args())
    assert [a["path"] for a in deep.actions()] == ["f.txt"], deep
    assert (work["remote"] / "f.txt").read_text() == "aaaa"


def test_dry_run_changes_nothing(sshd, run_leftssh, work):
    make_tree(work["local"])
    write_file(work["remote"] / "extra.txt", "x")
    before = tree(work["remote"])
    r = run_leftssh(
        "push",
        sshd.target(str(work["remote"])),
        "-d",
        work["local"],
        "-n",
        "--delete",
        "--force",
        "--json",
        *sshd.cli_args(),
    )
    assert r.code == 0, r
    assert tree(work["remote"]) == before
    statuses = {a["status"] for a in r.actions()}
    assert statuses == {"planned"}
    kinds = {a["action"] for a in r.actions()}
    assert {"upload", "mkdir_remote", "delete_remote"} <= kinds
    r = run_leftssh(
        "pull", sshd.target(str(work["remote"])), "-d", work["local"], "-n", *sshd.cli_args()
    )
    assert r.code == 0
    assert not (work["local"] / "extra.txt").exists()


def test_push_creates_missing_remote_root(sshd, run_leftssh, work):
    write_file(work["local"] / "x.txt", "x")
    deep_root = work["remote"] / "not" / "yet"
    r = run_leftssh("push", sshd.target(str(deep_root)), "-d", work["local"], *sshd.cli_args())
    assert r.code == 0, r
    assert (deep_root / "x.txt").read_text() == "x"


def test_delete_mirrors_and_max_delete_stops(sshd, run_leftssh, work):
    for i in range(10):
        write_file(work["local"] / f"f{i}.txt", str(i))
    target = sshd.target(str(work["remote"]))
    assert run_leftssh("push", target, "-d", work["local"], *sshd.cli_args()).code == 0
    write_file(work["remote"] / "stray/old.txt", "old")
    # without --delete nothing is removed
    r = run_leftssh("push", target, "-d", work["local"], *sshd.cli_args())
    assert r.code == 0 and (work["remote"] / "stray/old.txt").exists()
    r = run_leftssh("push", target, "-d", work["local"], "--delete", "--json", *sshd.cli_args())
    assert r.code == 0, r
    assert not (work["remote"] / "stray").exists()
    assert r.summary()["deleted_remote"] == 2  # the file and its directory
    # Deleting 7 of 10 files exceeds the default 50%: exit 6, nothing changed.
    for i in range(7):
        (work["local"] / f"f{i}.txt").unlink()
    before = tree(work["remote"])
    r = run_leftssh("push", target, "-d", work["local"], "--delete", "--json", *sshd.cli_args())
    assert r.code == 6, r
    assert r.summary()["exit_code"] == 6
    assert tree(work["remote"]) == before
    r = run_leftssh(
        "push", target, "-d", work["local"], "--delete", "--max-delete", "7", *sshd.cli_args()
    )
    assert r.code == 0, r
    assert sorted(p.name for p in work["remote"].iterdir()) == ["f7.txt", "f8.txt", "f9.txt"]


def test_pull_delete_respects_max_delete_then_force(sshd, run_leftssh, work):
    for i in range(4):
        write_file(work["local"] / f"l{i}.txt", str(i))
    write_file(work["remote"] / "r.txt", "r")
    target = sshd.target(str(work["remote"]))
    r = run_leftssh("pull", target, "-d", work["local"], "--delete", *sshd.cli_args())
    assert r.code == 6, r
    assert len(list(work["local"].iterdir())) == 4
    r = run_leftssh("pull", target, "-d", work["local"], "--delete", "--force", *sshd.cli_args())
    assert r.code == 0, r
    assert sorted(p.name for p in work["local"].iterdir()) == ["r.txt"]


def test_local_path_target_needs_no_server(run_leftssh, tmp_path):
    expected = make_tree(tmp_path / "proj" / "share")
    dest = tmp_path / "mnt" / "backup"
    r = run_leftssh("push", str(dest), "-d", tmp_path / "proj" / "share", "--json")
    assert r.code == 0, r
    assert tree(dest) == expected
    r = run_leftssh("pull", str(dest), "-d", tmp_path / "other", "--json")
    assert r.code == 0, r
    assert tree(tmp_path / "other") == expected


def test_relative_local_target_and_default_share(run_leftssh, tmp_path):
    write_file(tmp_path / "share" / "hello.txt", "hello")
    r = run_leftssh("push", "./copy", cwd=tmp_path)
    assert r.code == 0, r
    assert (tmp_path / "copy" / "hello.txt").read_text() == "hello"


def test_symlinks_and_fifos_are_skipped_and_reported(sshd, run_leftssh, work):
    write_file(work["local"] / "real.txt", "real")
    (work["local"] / "link").symlink_to("/etc/passwd")
    os.mkfifo(work["local"] / "fifo")
    r = run_leftssh(
        "push", sshd.target(str(work["remote"])), "-d", work["local"], "--json", *sshd.cli_args()
    )
    assert r.code == 0, r
    skips = {a["path"]: a for a in r.actions() if a["action"] == "skip"}
    assert skips["link"]["reason"] == "symlink" and skips["link"]["status"] == "skipped"
    assert skips["fifo"]["reason"] == "special file"
    assert sorted(p.name for p in work["remote"].iterdir()) == ["real.txt"]


def test_leftignore_next_to_share_and_nested(sshd, run_leftssh, work):
    project = work["local"].parent
    write_file(project / ".leftignore", "*.log\nbuild/\n")
    write_file(work["local"] / "keep.txt", "k")
    write_file(work["local"] / "debug.log", "l")
    write_file(work["local"] / "build/out.o", "o")
    write_file(work["local"] / "sub/.leftignore", "secret*\n!*.log\n")
    write_file(work["local"] / "sub/secret.txt", "s")
    write_file(work["local"] / "sub/app.log", "l")
    write_file(work["remote"] / "remote.log", "stays")
    r = run_leftssh(
        "push",
        sshd.target(str(work["remote"])),
        "-d",
        work["local"],
        "--delete",
        "--force",
        *sshd.cli_args(),
    )
    assert r.code == 0, r
    got = sorted(p.relative_to(work["remote"]).as_posix() for p in work["remote"].rglob("*"))
    assert got == ["keep.txt", "remote.log", "sub", "sub/.leftignore", "sub/app.log"]


# -- errors and exit codes ---------------------------------------------------------------------


def test_unknown_host_key_exits_5_and_accept_new_records_it(sshd, run_leftssh, work, tmp_path):
    write_file(work["local"] / "x.txt", "x")
    kh = tmp_path / "kh"
    kh.write_text("")
    args = ["-i", sshd.identity, "--known-hosts", kh]
    r = run_leftssh("push", sshd.target(str(work["remote"])), "-d", work["local"], *args)
    assert r.code == 5, r
    assert "unknown" in r.stderr
    assert kh.read_text() == ""
    assert not work["remote"].exists()
    r = run_leftssh(
        "push",
        sshd.target(str(work["remote"])),
        "-d",
        work["local"],
        *args,
        "--accept-new-host-key",
    )
    assert r.code == 0, r
    assert f"[127.0.0.1]:{sshd.port} ssh-ed25519" in kh.read_text()
    r = run_leftssh("push", sshd.target(str(work["remote"])), "-d", work["local"], *args)
    assert r.code == 0, r


def test_changed_host_key_exits_5_even_with_accept_new(sshd, run_leftssh, work, tmp_path):
    write_file(work["local"] / "x.txt", "x")
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh = tmp_path / "kh"
    kh.write_text(
        f"[127.0.0.1]:{sshd.port} "
        + " ".join((tmp_path / "other_key.pub").read_text().split()[:2])
        + "\n"
    )
    before = kh.read_text()
    r = run_leftssh(
        "push",
        sshd.target(str(work["remote"])),
        "-d",
        work["local"],
        "-i",
        sshd.identity,
        "--known-hosts",
        kh,
        "--accept-new-host-key",
        "--json",
    )
    assert r.code == 5, r
    assert "CHANGED" in r.stderr
    assert r.summary()["exit_code"] == 5
    assert kh.read_text() == before


def test_wrong_key_exits_4(sshd, run_leftssh, work, tmp_path):
    write_file(work["local"] / "x.txt", "x")
    wrong = tmp_path / "wrong"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    r = run_leftssh(
        "push",
        sshd.target(str(work["remote"])),
        "-d",
        work["local"],
        "-i",
        wrong,
        "--known-hosts",
        sshd.known_hosts,
    )
    assert r.code == 4, r
    assert "permission denied" in r.stderr.lower()


def test_encrypted_key_without_agent_exits_4_with_clear_message(sshd, run_leftssh, work, tmp_path):
    write_file(work["local"] / "x.txt", "x")
    key = tmp_path / "enc"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(key)], check=True
    )
    r = run_leftssh(
        "push",
        sshd.target(str(work["remote"])),
        "-d",
        work["local"],
        "-i",
        key,
        "--known-hosts",
        sshd.known_hosts,
    )
    assert r.code == 4, r
    assert "encrypted" in r.stderr and "ssh-agent" in r.stderr


def test_closed_port_exits_3(run_leftssh, work, sshd):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    write_file(work["local"] / "x.txt", "x")
    r = run_leftssh(
        "push",
        f"ssh://127.0.0.1:{port}/tmp/x",
        "-d",
        work["local"],
        "--json",
        "--timeout",
        "5",
        *sshd.cli_args()[:2],
    )
    assert r.code == 3, r
    assert r.summary()["exit_code"] == 3


@pytest.mark.parametrize(
    "args",
    [
        ["push"],
        ["push", "host", "--bogus"],
        ["push", "-oProxyCommand=evil:x"],
        ["push", "ssh://host:99999/x"],
        ["push", "host", "--max-delete", "lots"],
        ["push", "host", "--bwlimit", "fast"],
        ["push", "host", "--verify", "sha1"],
        ["frobnicate"],
    ],
)
def test_bad_usage_exits_2(run_leftssh, args, tmp_path):
    (tmp_path / "share").mkdir()
    r = run_leftssh(*args, cwd=tmp_path)
    assert r.code == 2, r


def test_push_without_local_share_exits_2(run_leftssh, tmp_path):
    r = run_leftssh("push", "./elsewhere", "-d", tmp_path / "missing", "--json")
    assert r.code == 2, r
    assert "does not exist" in r.stderr
    assert r.summary()["exit_code"] == 2


def test_ssh_config_alias_is_honoured(sshd, run_leftssh, work):
    write_file(work["local"] / "x.txt", "via alias")
    r = run_leftssh(
        "push", f"leftssh-test:{work['remote']}", "-d", work["local"], "-F", sshd.ssh_config
    )
    assert r.code == 0, r
    assert (work["remote"] / "x.txt").read_text() == "via alias"


# -- resume and atomicity ----------------------------------------------------------------------

BIG = 64 << 20


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.leftpart")]


def _start(args: list, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "leftssh", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def _kill_when_partial(
    proc: subprocess.Popen,
    root: Path,
    at_least: int,
    watch: Path | None = None,
    allowed: set[str] | None = None,
) -> int:
    """SIGKILL ``proc`` once a partial under ``root`` holds ``at_least`` bytes."""
    deadline = time.monotonic() + 60
    seen = 0
    while time.monotonic() < deadline:
        if watch is not None and watch.exists() and allowed is not None:
            assert _md5(watch) in allowed, "the final name held a torn file"
        parts = _partials(root)
        if parts:
            seen = parts[0].stat().st_size
            if seen >= at_least:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return parts[0].stat().st_size
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stderr.read().decode()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"partial never reached {at_least} bytes (saw {seen})")


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_resume_after_sigkill_sends_only_the_remainder(sshd, run_leftssh, work, direction):
    src_root = work["local"] if direction == "push" else work["remote"]
    dst_root = work["remote"] if direction == "push" else work["local"]
    src_root.mkdir(parents=True)
    dst_root.mkdir(parents=True)
    big = write_file(src_root / "dir" / "big.bin", os.urandom(BIG), mtime=MTIME)
    old = write_file(dst_root / "dir" / "big.bin", b"old version\n", mtime=MTIME - 10)
    old_md5, new_md5 = _md5(old), _md5(big)
    target = sshd.target(str(work["remote"]))
    proc = _start([direction, target, "-d", work["local"], "--bwlimit", "24M", *sshd.cli_args()])
    kept = _kill_when_partial(
        proc, dst_root, int(BIG * 0.4), watch=dst_root / "dir/big.bin", allowed={old_md5, new_md5}
    )
    assert _md5(dst_root / "dir" / "big.bin") == old_md5
    assert kept > 0
    r = run_leftssh(direction, target, "-d", work["local"], "--json", *sshd.cli_args())
    assert r.code == 0, r
    (action,) = [a for a in r.actions() if a["path"] == "dir/big.bin"]
    assert action["resumed_from"] >= kept - (4 << 20)  # unflushed tail may be lost
    assert action["resumed_from"] > 0
    assert action["bytes"] == BIG - action["resumed_from"]
    assert action["verified"] == "md5"
    assert _md5(dst_root / "dir" / "big.bin") == new_md5
    assert not _partials(dst_root)


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_corrupted_partial_is_not_trusted(sshd, run_leftssh, work, direction):
    src_root = work["local"] if direction == "push" else work["remote"]
    dst_root = work["remote"] if direction == "push" else work["local"]
    src_root.mkdir(parents=True)
    dst_root.mkdir(parents=True)
    big = write_file(src_root / "big.bin", os.urandom(BIG), mtime=MTIME)
    target = sshd.target(str(work["remote"]))
    proc = _start([direction, target, "-d", work["local"], "--bwlimit", "24M", *sshd.cli_args()])
    _kill_when_partial(proc, dst_root, int(BIG * 0.3))
    (partial,) = _partials(dst_root)
    with open(partial, "r+b") as f:
        f.seek(1000)
        f.write(b"\xffCORRUPT\xff")
    r = run_leftssh(direction, target, "-d", work["local"], "--json", *sshd.cli_args())
    assert r.code == 0, r
    (action,) = [a for a in r.actions() if a["path"] == "big.bin"]
    assert action["resumed_from"] == 0
    assert action["bytes"] == BIG
    assert _md5(dst_root / "big.bin") == _md5(big)
    assert not _partials(dst_root)


def test_partial_of_an_older_source_version_is_discarded(sshd, run_leftssh, work):
    write_file(work["local"] / "f.bin", os.urandom(BIG // 4), mtime=MTIME)
    target = sshd.target(str(work["remote"]))
    proc = _start(["push", target, "-d", work["local"], "--bwlimit", "8M", *sshd.cli_args()])
    _kill_when_partial(proc, work["remote"], 2 << 20)
    write_file(work["local"] / "f.bin", os.urandom(BIG // 4), mtime=MTIME + 5)
    r = run_leftssh("push", target, "-d", work["local"], "--json", *sshd.cli_args())
    assert r.code == 0, r
    (action,) = r.actions()
    assert action["resumed_from"] == 0
    assert _md5(work["remote"] / "f.bin") == _md5(work["local"] / "f.bin")
    assert not _partials(work["remote"])
