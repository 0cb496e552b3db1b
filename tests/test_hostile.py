"""Hostile input and faults: every case ends in success or a clear error with its exit code.

What every test here checks, besides its own point: no Python traceback, JSON output that
parses, nothing read or written outside the two share roots, and no file lost or left torn.

Many cases run leftssh dozens of times. They use a "zygote": one Python process that has
imported leftssh once and forks a child per run (the child runs the real command line
with its own argv, environment, cwd, stdout and stderr), which saves about a second of
imports per run. The other cases use ``run_leftssh`` (a fresh interpreter).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leftssh.errors import UsageError
from leftssh.state import read_base
from leftssh.target import parse_target
from leftssh.transport.remote_shell import HashTool, parse_hash_output
from tests.helpers import REPO_ROOT, Result, tree, write_file
from tests.hostile_sftp import HostileServer, fake
from tests.sshd import Sshd

MTIME = 1_600_000_000
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
NAME_MAX = 255


# -- running leftssh fast: a pre-imported process that forks one child per run --------------

_LAUNCHER = r"""
import json, os, sys, traceback
import leftssh.cli, leftssh.transport.sftp  # imported once; every run forks from here

report = os.fdopen(os.dup(1), "w")
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    out, err = os.open(req["stdout"], flags, 0o600), os.open(req["stderr"], flags, 0o600)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            report.close()
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.chdir(req["cwd"])
            for key, value in req["env"].items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            sys.argv = ["leftssh", *req["args"]]
            leftssh.cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out)
    os.close(err)
    report.write(f"{pid}\n")
    report.flush()
    sys.stdin.readline()  # "reap": the test has seen the child end (a zombie keeps its pid)
    _, status = os.waitpid(pid, 0)
    report.write(f"{os.waitstatus_to_exitcode(status)}\n")
    report.flush()
"""


class Run:
    """One leftssh child of the zygote; its pid stays reserved (as a zombie) until waited."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str], out: Path, err: Path) -> None:
        self.zygote = zygote
        self.pid = pid
        self.args = args
        self.out = out
        self.err = err
        self.result: Result | None = None

    def running(self) -> bool:
        if self.result is not None:
            return False
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii", errors="replace") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    def kill(self) -> None:
        """SIGKILL the child (safe: its pid cannot be reused before ``wait``)."""
        if self.result is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float = 120) -> Result:
        if self.result is not None:
            return self.result
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                self.kill()
                self._reap()
                raise AssertionError(f"timed out after {timeout} s:\n{self.result}")
            time.sleep(0.01)
        result = self._reap()
        if "Traceback" in result.stderr:
            raise AssertionError(f"a Python traceback reached stderr:\n{result}")
        return result

    def _reap(self) -> Result:
        code = self.zygote._reap()
        self.result = Result(
            ["leftssh", *self.args],
            code,
            self.out.read_bytes().decode("utf-8", "replace"),
            self.err.read_bytes().decode("utf-8", "replace"),
        )
        return self.result


class Zygote:
    """A Python process with leftssh imported that forks one child per ``start``."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.count = 0
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.current: Run | None = None

    def start(
        self, *args: object, cwd: Path | None = None, env: dict[str, str | None] | None = None
    ) -> Run:
        assert self.current is None or self.current.result is not None, "one run at a time"
        self.count += 1
        out = self.scratch / f"run{self.count}.out"
        err = self.scratch / f"run{self.count}.err"
        argv = [str(a) for a in args]
        request = {
            "args": argv,
            "cwd": str(cwd or self.scratch),
            "env": env or {},
            "stdout": str(out),
            "stderr": str(err),
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        self.current = Run(self, pid, argv, out, err)
        return self.current

    def run(self, *args: object, timeout: float = 120, **kw) -> Result:
        return self.start(*args, **kw).wait(timeout)

    def _reap(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        if self.current is not None and self.current.result is None:
            self.current.kill()
            self.current._reap()
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory, isolated_env: Path) -> Iterator[Zygote]:
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


# -- shared helpers ---------------------------------------------------------------------------


def md5(data: bytes | str) -> str:
    return hashlib.md5(data.encode() if isinstance(data, str) else data).hexdigest()


def md5_path(path: Path) -> str | None:
    try:
        return md5(path.read_bytes())
    except FileNotFoundError:
        return None


def snapshot_outside(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple]:
    """Everything under ``root`` except the ``skip`` subtrees, symlinks not followed."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            p = here / name
            if p in skip:
                continue
            info = p.lstat()
            content = md5(p.read_bytes()) if p.is_file() and not p.is_symlink() else None
            found[str(p.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime, content)
    return found


def wait_watching(run: Run, directory: Path, timeout: float = 120) -> Result:
    """Wait for ``run``, failing as soon as ``directory`` lists a name it did not hold before
    (a file written outside and removed again before the run ends is caught too)."""
    before = set(os.listdir(directory))
    deadline = time.monotonic() + timeout
    while run.running():
        extra = set(os.listdir(directory)) - before
        if extra or time.monotonic() > deadline:
            run.kill()
            r = run.wait()
            raise AssertionError(f"{directory} gained {extra} during the run:\n{r}")
        time.sleep(0.001)
    return run.wait()


def assert_json_clean(r: Result) -> None:
    """Every stdout line parses; the summary's exit code is the process's."""
    assert r.summary()["exit_code"] == r.code, r
    for obj in r.json():
        json.dumps(obj)  # only str, never lone surrogates that could not be encoded


def no_partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.leftpart")]


@pytest.fixture
def work(tmp_path: Path) -> dict[str, Path]:
    """A local share, a remote share and a state directory, with an 'outside' next to them."""
    paths = {
        "local": tmp_path / "project" / "share",
        "remote": tmp_path / "peer" / "share",
        "state": tmp_path / "state",
        "outside": tmp_path / "outside",
    }
    paths["outside"].mkdir()
    write_file(paths["outside"] / "secret.txt", "outside the share\n", mtime=MTIME)
    return paths


def env_for(work: dict[str, Path]) -> dict[str, str | None]:
    return {"LEFTSSH_STATE_DIR": str(work["state"])}


# -- names ------------------------------------------------------------------------------------

NAMES = [
    'it\'s "quoted".txt',
    "$(touch pwned)",
    "`touch pwned`",
    "semi;colon && pipe | redir > in < x",
    "-leading-dash.txt",
    "--help",
    "-",
    "new\nline.txt",
    "\nstarts-with-newline",
    "back\\slash.txt",
    "trailing-backslash\\",
    "\\n-not-a-newline",
    "tab\there",
    "cr\rhere",
    "caf\u00e9.txt",  # NFC
    "cafe\u0301.txt",  # NFD: a different file with the same look
    "bell\x07.txt",
    "\x1b[31mred\x1b[0m.txt",
    "\x1b]0;title\x07",
    "del\x7f.txt",
    "c1-csi\u009b2J.txt",
    "\x01\x02\x03",
    "rtl-\u202egnp.exe",
    "A.txt",
    "a.txt",
    "*",
    "?",
    "[a]",
    " leading space",
    "trailing space ",
    "~tilde",
    "..dots",
    "...",
    "emoji-\U0001f600.txt",
    "L" * NAME_MAX,
    "\u00e9" * 127 + "x",  # 255 bytes of UTF-8
    "n" * (NAME_MAX - 4) + ".txt",
]


def make_hostile_tree(root: Path) -> dict:
    for i, name in enumerate(NAMES):
        write_file(root / "names" / name, f"content {i}\n", mtime=MTIME + i, mode=0o644)
    (root / "dir\nwith newline" / "\x1b[1mempty").mkdir(parents=True)
    write_file(root / "-d" / "--" / "-f", "dashes", mtime=MTIME)
    # A file whose absolute path on either side is a few bytes short of PATH_MAX, with room
    # for its partial file (".NAME.<tag>.leftpart" beside it).
    base = len(str(root)) + 1
    room = PATH_MAX - 1 - base - len("/f.txt") - len("..0123456789.leftpart") - 2
    parts, length = [], 0
    while length + 201 <= room:
        parts.append(chr(ord("a") + len(parts) % 26) * 200)
        length += 201
    parts.append("z" * max(1, room - length - 1))
    deep = root.joinpath(*parts) / "f.txt"
    assert PATH_MAX - 40 < len(str(deep)) < PATH_MAX - 20
    write_file(deep, "near PATH_MAX\n", mtime=MTIME)
    return tree(root)


def _escaped_only(text: str) -> None:
    """Human output shows control characters escaped, never raw (except line ends)."""
    raw = [c for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F]
    assert not raw, f"raw control characters in human output: {raw!r}\n{text}"


def test_hostile_names_round_trip_push_pull_and_sync(sshd: Sshd, zygote: Zygote, work) -> None:
    local, remote = work["local"], work["remote"]
    # Both roots have the same length, so the near-PATH_MAX path fits on both sides.
    remote = work["remote"].parent.parent / "peerxxx" / "share"
    assert len(str(remote)) == len(str(local))
    expected = make_hostile_tree(local)
    assert unicodedata.normalize("NFC", "cafe\u0301.txt") == "caf\u00e9.txt"
    target = sshd.target(str(remote))
    env = env_for(work)

    r = zygote.run("push", target, "-d", local, "--json", *sshd.cli_args(), env=env)
    assert r.code == 0, r
    assert_json_clean(r)
    uploads = [a for a in r.actions() if a["action"] == "upload"]
    assert len(uploads) == sum(1 for e in expected.values() if e[0] == "file")
    assert all(a["status"] == "ok" and a["verified"] == "md5" for a in uploads), r
    assert {a["path"] for a in uploads} >= {"names/" + n for n in NAMES}
    assert tree(remote) == expected
    assert not no_partials(remote)

    # Pull into a fresh share with human output: every odd name is shown escaped.
    other = work["local"].parent / "other"
    r = zygote.run("pull", target, "-d", other, "-v", *sshd.cli_args(), env=env)
    assert r.code == 0, r
    _escaped_only(r.stderr)
    assert "\\x1b[31mred\\x1b[0m.txt" in r.stderr
    assert tree(other) == expected

    # A two-way sync of the pulled copy finds nothing to do, and status agrees.
    r = zygote.run("sync", target, "-d", other, "--json", *sshd.cli_args(), env=env)
    assert r.code == 0, r
    assert [a for a in r.actions() if a["action"] != "skip"] == [], r
    r = zygote.run("status", target, "-d", other, "--json", *sshd.cli_args(), env=env)
    assert r.code == 0, r
    for where in (local, remote, other):  # no name was ever run by a shell
        assert not list(where.rglob("pwned"))
    assert not (Path(sshd.home) / "pwned").exists() and not (zygote.scratch / "pwned").exists()
    assert tree(work["outside"]) == {"secret.txt": tree(work["outside"])["secret.txt"]}


@pytest.mark.slow
def test_tree_500_levels_deep(sshd: Sshd, zygote: Zygote, work) -> None:
    local = work["local"]
    deep = local.joinpath(*(["d"] * 500))
    write_file(deep / "bottom.txt", "at depth 500\n", mtime=MTIME)
    write_file(local.joinpath(*(["d"] * 250)) / "middle.txt", "at depth 250\n", mtime=MTIME)
    expected = tree(local)
    target = sshd.target(str(work["remote"]))
    r = zygote.run("push", target, "-d", local, "--json", *sshd.cli_args(), env=env_for(work))
    assert r.code == 0, r
    assert r.summary()["uploaded"] == 2
    assert tree(work["remote"]) == expected
    other = local.parent / "back"
    r = zygote.run("pull", target, "-d", other, "--json", *sshd.cli_args(), env=env_for(work))
    assert r.code == 0, r
    assert tree(other) == expected


@pytest.mark.slow
def test_partial_of_a_255_byte_name_fits_and_an_outdated_one_is_removed(
    sshd: Sshd, zygote: Zygote, work
) -> None:
    from leftssh.paths import partial_name, version_tag

    local, remote = work["local"], work["remote"]
    name = "\u00e9" * 127 + "x"  # 255 bytes: ".NAME.<tag>.leftpart" would not fit
    f = write_file(local / "sub" / name, os.urandom(4 << 20), mtime=MTIME)
    target = sshd.target(str(remote))
    args = ("push", target, "-d", local, "--json", *sshd.cli_args())
    run = zygote.start(*args, "--bwlimit", "8M", env=env_for(work))
    _wait_for_partial(run, remote, 1 << 20)
    run.kill()
    run.wait()
    (old_partial,) = no_partials(remote)
    assert old_partial.name == partial_name(name, version_tag(4 << 20, MTIME))
    assert len(old_partial.name.encode()) <= NAME_MAX
    write_file(f, os.urandom(4 << 20), mtime=MTIME + 1)  # a new version: new partial name
    r = zygote.run(*args, env=env_for(work))
    assert r.code == 0, r
    assert md5_path(remote / "sub" / name) == md5_path(f)
    assert not no_partials(remote), "the outdated partial was left behind"


def test_undecodable_local_name_is_reported_and_json_stays_valid(
    sshd: Sshd, zygote: Zygote, work
) -> None:
    local = work["local"]
    write_file(local / "good.txt", "good", mtime=MTIME)
    bad = os.fsencode(local) + b"/bad-\xff\xfe-name.txt"
    with open(bad, "wb") as f:
        f.write(b"undecodable")
    os.mkdir(os.fsencode(local) + b"/dir-\xc3(")
    target = sshd.target(str(work["remote"]))
    r = zygote.run("push", target, "-d", local, "--json", *sshd.cli_args(), env=env_for(work))
    assert r.code == 0, r
    assert_json_clean(r)
    skips = {a["path"]: a for a in r.actions() if a["action"] == "skip"}
    assert {"bad-\\udcff\\udcfe-name.txt", "dir-\\udcc3("} <= set(skips), r
    assert all("undecodable" in a["reason"] for a in skips.values())
    assert sorted(os.listdir(work["remote"])) == ["good.txt"]
    # Human output escapes the bytes too.
    r = zygote.run("push", target, "-d", local, *sshd.cli_args(), env=env_for(work))
    assert r.code == 0, r
    _escaped_only(r.stderr)
    assert "bad-\\udcff\\udcfe-name.txt" in r.stderr


def test_undecodable_remote_name_skips_that_name_not_its_directory(
    sshd: Sshd, zygote: Zygote, work
) -> None:
    remote = work["remote"]
    write_file(remote / "sub" / "good.txt", "good", mtime=MTIME)
    write_file(remote / "top.txt", "top", mtime=MTIME)
    with open(os.fsencode(remote) + b"/sub/bad-\xff.txt", "wb") as f:
        f.write(b"undecodable")
    target = sshd.target(str(remote))
    r = zygote.run(
        "pull", target, "-d", work["local"], "--json", *sshd.cli_args(), env=env_for(work)
    )
    assert r.code == 0, r
    assert_json_clean(r)
    skips = {a["path"]: a["reason"] for a in r.actions() if a["action"] == "skip"}
    assert set(skips) == {"sub/bad-\\udcff.txt"}, r
    assert "undecodable" in skips["sub/bad-\\udcff.txt"]
    assert (work["local"] / "sub" / "good.txt").read_text() == "good"
    assert sorted(os.listdir(work["local"] / "sub")) == ["good.txt"]


# -- symlinks ---------------------------------------------------------------------------------


def _plant_links(share: Path, outside: Path) -> set[str]:
    """Symlinks of every kind that lead outside ``share`` (or nowhere); return their paths."""
    rel_outside = os.path.relpath(outside, share)
    links = {
        "abs-dir": "/etc",
        "abs-file": str(outside / "secret.txt"),
        "rel-file": f"{rel_outside}/secret.txt",
        "chain-1": "chain-2",
        "chain-2": "sub/chain-3",
        "sub/chain-3": f"../{rel_outside}/secret.txt",
        "dir-link": rel_outside,
        "sub/up": "../..",
        "inside": "real.txt",
        "dangling": "no/such/file",
        "loop-a": "loop-b",
        "loop-b": "loop-a",
    }
    (share / "sub").mkdir(parents=True, exist_ok=True)
    for name, dest in links.items():
        (share / name).symlink_to(dest)
    return set(links)


def test_symlinks_leading_outside_are_never_followed_on_either_side(
    sshd: Sshd, zygote: Zygote, work
) -> None:
    local, remote, outside = work["local"], work["remote"], work["outside"]
    write_file(local / "real.txt", "local real\n", mtime=MTIME)
    write_file(remote / "real-remote.txt", "remote real\n", mtime=MTIME)
    local_links = _plant_links(local, outside)
    remote_links = _plant_links(remote, outside)
    before = snapshot_outside(outside, ())
    target = sshd.target(str(remote))
    for command, links in (("push", local_links), ("pull", remote_links), ("sync", None)):
        r = zygote.run(command, target, "-d", local, "--json", *sshd.cli_args(), env=env_for(work))
        assert_json_clean(r)
        assert r.code == 0, r
        skipped = [a["path"] for a in r.actions() if a["action"] == "skip"]
        assert len(skipped) == len(set(skipped)), f"a skip reported twice: {r}"
        assert all(a["reason"] == "symlink" for a in r.actions() if a["action"] == "skip"), r
        if links is not None:
            assert set(skipped) == links, r
        else:
            assert set(skipped) == local_links | remote_links, r
    assert snapshot_outside(outside, ()) == before
    for share in (local, remote):
        for p in share.rglob("*"):
            if p.is_file() and not p.is_symlink():
                assert b"outside the share" not in p.read_bytes(), p
        assert tree(share, special=True)["abs-dir"] == ("symlink", "/etc")
    assert (local / "real-remote.txt").read_text() == "remote real\n"
    assert (remote / "real.txt").read_text() == "local real\n"


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two names (renameat2 RENAME_EXCHANGE): neither is ever missing."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a))


class Swapper:
    """A thread that keeps swapping a directory with a symlink to ``outside`` and back."""

    def __init__(self, directory: Path, outside: Path, seed: int) -> None:
        self.directory = directory
        self.link = directory.parent.parent / f"{directory.name}-swap-link"
        self.link.symlink_to(outside, target_is_directory=True)
        self.rng = random.Random(seed)
        self.swaps = 0
        self.paused = threading.Event()
        self.stopped = threading.Event()
        self.idle = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.is_set():
            if self.paused.is_set():
                self.idle.set()
                time.sleep(0.002)
                continue
            self.idle.clear()
            _exchange(self.directory, self.link)  # the directory is now a symlink
            self.swaps += 1
            time.sleep(self.rng.random() * 0.004)
            _exchange(self.directory, self.link)  # and a directory again
            time.sleep(self.rng.random() * 0.004)
        self.idle.set()

    def __enter__(self) -> Swapper:
        self.thread.start()
        return self

    def pause(self) -> None:
        self.idle.clear()
        self.paused.set()
        assert self.idle.wait(5)
        assert self.directory.is_dir() and not self.directory.is_symlink()

    def resume(self) -> None:
        self.paused.clear()

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(5)
        assert self.directory.is_dir() and not self.directory.is_symlink()
        self.link.unlink()


def _fill(directory: Path, count: int, tag: str, mtime: int) -> None:
    for i in range(count):
        write_file(directory / f"f{i:02}.txt", f"{tag} {i}\n" * 40, mtime=mtime + i)


@pytest.mark.slow
def test_local_dir_swapped_for_symlink_during_pulls_never_writes_outside(
    sshd: Sshd, zygote: Zygote, work
) -> None:
    """50 pulls of 16 files while a thread keeps swapping the local directory with a
    symlink to an outside directory. Every 5th pull is over SSH; the others pull from a
    local directory target (the same local writes, without the cost of a connection)."""
    local, remote, outside = work["local"], work["remote"], work["outside"]
    _fill(remote / "dir", 16, "remote", MTIME)
    _fill(local / "dir", 16, "old", MTIME - 1000)
    before = snapshot_outside(outside, ())
    ssh_target = sshd.target(str(remote))
    with Swapper(local / "dir", outside, seed=11) as swapper:
        for iteration in range(50):
            target = ssh_target if iteration % 5 == 0 else str(remote)
            run = zygote.start(
                "pull", target, "-d", local, "--json", *sshd.cli_args(), env=env_for(work)
            )
            r = wait_watching(run, outside)
            assert_json_clean(r)
            assert r.code in (0, 1), r
            assert snapshot_outside(outside, ()) == before, f"iteration {iteration} wrote outside"
            swapper.pause()
            _fill(local / "dir", 16, "old", MTIME - 1000)
            swapper.resume()
        assert swapper.swaps > 100
    assert snapshot_outside(outside, ()) == before


def _wait_for_partial(run: Run, root: Path, at_least: int, timeout: float = 30) -> int:
    """Wait until a partial file under ``root`` holds ``at_least`` bytes; return its size."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in no_partials(root):
            with contextlib.suppress(FileNotFoundError):
                size = p.stat().st_size
                if size >= at_least:
                    return size
        if not run.running():
            raise AssertionError(f"finished before the partial grew:\n{run.wait()}")
        time.sleep(0.005)
    raise AssertionError(f"no partial of {at_least} bytes under {root}")


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_remote_dir_swapped_for_symlink_after_the_scan_is_never_followed(
    sshd: Sshd, zygote: Zygote, work, direction: str
) -> None:
    """The peer's directory becomes a symlink to an outside directory while leftssh is busy
    with an earlier file: no later read or write goes through it.

    (A swap that lands inside the one round trip between leftssh's check and its SFTP
    call cannot be caught: SFTP v3 has neither O_NOFOLLOW nor openat. The local side has
    no such window; see the test above.)
    """
    local, remote, outside = work["local"], work["remote"], work["outside"]
    src, dst = (local, remote) if direction == "push" else (remote, local)
    for i in range(6):  # outside holds files with the same names, to be clobbered or leaked
        write_file(outside / f"f{i:02}.txt", f"SECRET {i}\n", mtime=MTIME - 5000)
    before = snapshot_outside(outside, ())
    rng = random.Random(21)
    target = sshd.target(str(remote))
    for iteration in range(3):
        # 3 MiB at 4 MiB/s: the rate limiter sleeps before each 1 MiB block, so once the
        # partial holds a whole block leftssh is busy with big.bin for a while.
        write_file(src / "big.bin", os.urandom(3 << 20), mtime=MTIME + iteration)
        write_file(dst / "big.bin", b"old big", mtime=MTIME - 1)
        _fill(src / "z", 6, f"new {iteration}", MTIME + 100)
        _fill(dst / "z", 6, "old", MTIME - 1000)
        swapper = Swapper(remote / "z", outside, seed=iteration)
        run = zygote.start(
            direction, target, "-d", local, "--json", "-j", "1", "--bwlimit", "4M",
            *sshd.cli_args(), env=env_for(work),
        )  # fmt: skip
        _wait_for_partial(run, dst, rng.choice([1, 2]) << 20)
        _exchange(remote / "z", swapper.link)  # the peer's z is now a symlink to outside
        try:
            r = wait_watching(run, outside)
        finally:
            _exchange(remote / "z", swapper.link)
            swapper.link.unlink()
        assert_json_clean(r)
        assert r.code == 1, r
        assert snapshot_outside(outside, ()) == before, f"iteration {iteration}"
        got = {a["path"]: a for a in r.actions()}
        assert got["big.bin"]["status"] == "ok", r
        assert md5_path(dst / "big.bin") == md5_path(src / "big.bin")
        for i in range(6):
            assert got[f"z/f{i:02}.txt"]["status"] in ("failed", "skipped"), r
            assert (dst / "z" / f"f{i:02}.txt").read_text().startswith(f"old {i}\n")
        for p in local.rglob("*"):
            assert not (p.is_file() and p.read_bytes().startswith(b"SECRET")), (p, r)


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_symlink_planted_at_the_partial_name_is_never_followed(
    sshd: Sshd, zygote: Zygote, work, direction: str
) -> None:
    """Partial names are predictable (``.NAME.<tag>.leftpart``): a symlink planted there
    must be replaced, not written through."""
    from leftssh.paths import partial_name, version_tag

    local, remote, outside = work["local"], work["remote"], work["outside"]
    src, dst = (local, remote) if direction == "push" else (remote, local)
    victim = outside / "victim.txt"
    write_file(victim, "must stay\n", mtime=MTIME)
    write_file(src / "sub" / "f.txt", "payload\n" * 100, mtime=MTIME)
    write_file(src / "g.txt", "payload g\n", mtime=MTIME)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "sub").mkdir()
    for rel in ("sub/f.txt", "g.txt"):
        size = (src / rel).stat().st_size
        (dst / partial_name(rel, version_tag(size, MTIME))).symlink_to(victim)
    before = snapshot_outside(outside, ())
    r = zygote.run(
        direction, sshd.target(str(remote)), "-d", local, "--json", *sshd.cli_args(),
        env=env_for(work),
    )  # fmt: skip
    assert r.code == 0, r
    assert snapshot_outside(outside, ()) == before
    assert (dst / "sub" / "f.txt").read_bytes() == (src / "sub" / "f.txt").read_bytes()
    assert (dst / "g.txt").read_text() == "payload g\n"
    assert not [p for p in dst.rglob("*.leftpart")]


# -- a hostile peer -----------------------------------------------------------------------------


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[HostileServer]:
    """An in-process SSH server whose answers can lie; its share is ``/share``."""
    with HostileServer(tmp_path / "hostile") as server:
        (server.backing / "share").mkdir()
        write_file(server.backing / "escape.txt", "the peer's file outside its share\n")
        yield server


def on_peer(zygote: Zygote, peer: HostileServer, work, command: str, *extra: object) -> Result:
    r = zygote.run(
        command, peer.target("/share"), "-d", work["local"], "--json", *extra,
        *peer.cli_args(), env=env_for(work), timeout=60,
    )  # fmt: skip
    assert_json_clean(r)
    return r


def assert_stays_in_share(peer: HostileServer, work, before: dict) -> None:
    """No SFTP request named a path outside /share; nothing local changed outside it."""
    allowed = ("/", "/share")  # "/" is the login directory, resolved once at connect
    outside = [p for p in peer.requested if p not in allowed and not p.startswith("/share/")]
    assert not outside, f"requests outside the share: {outside}"
    top = work["local"].parent.parent
    assert snapshot_outside(top, (work["local"], peer.workdir, work["state"])) == before


def local_snapshot(work, peer: HostileServer) -> dict:
    work["local"].mkdir(parents=True, exist_ok=True)
    return snapshot_outside(
        work["local"].parent.parent, (work["local"], peer.workdir, work["state"])
    )


def test_hostile_listing_never_leads_outside_the_share(zygote: Zygote, peer, work) -> None:
    share = peer.backing / "share"
    write_file(share / "real.txt", "real\n", mtime=MTIME)
    write_file(share / "sub" / "inner.txt", "inner\n", mtime=MTIME)
    write_file(share / "dup.txt", "the real dup\n", mtime=MTIME)
    write_file(share / "\x1b[2J\x1b[31mansi", "a name with escapes\n", mtime=MTIME)
    peer.extra_entries["/share"] = [
        fake(".."),
        fake("."),
        fake("../escape.txt", size=34),
        fake("/etc/passwd", size=100),
        fake("sub/../../escape.txt", size=34),
        fake("a/b", kind="dir"),
        fake(b"nul\0name", size=3),
        fake(b"bad-\xff-utf8", size=3),
        fake("dup.txt", size=999),
        fake("dup.txt", kind="dir"),
        fake("ghost.txt", size=5),  # listed, but there is no such file
        fake("link", kind="link"),
        fake("ghostdir", kind="dir"),  # listed, but cannot be listed itself
    ]
    peer.extra_entries["/share/sub"] = [fake(".."), fake("../../escape.txt", size=34), fake("..")]
    before = local_snapshot(work, peer)

    r = on_peer(zygote, peer, work, "pull")
    assert r.code == 1, r  # ghost.txt fails, everything else is settled
    got = {a["path"]: a for a in r.actions()}
    assert got["ghost.txt"]["status"] == "failed"
    assert got["real.txt"]["status"] == "ok" and got["real.txt"]["verified"] == "md5"
    assert got["link"]["reason"] == "symlink"
    assert "duplicate" in got["dup.txt"]["reason"]
    assert "undecodable" in got["bad-\\udcff-utf8"]["reason"]
    unsafe = {p for p, a in got.items() if a.get("reason") == "unsafe name"}
    assert {"../escape.txt", "/etc/passwd", "a/b", "sub/../../escape.txt"} <= unsafe
    assert "nul\\x00name" in unsafe
    assert "unreadable" in got["ghostdir"]["reason"]
    assert sorted(p for p, e in tree(work["local"]).items() if e[0] == "file") == [
        "\x1b[2J\x1b[31mansi",
        "real.txt",
        "sub/inner.txt",
    ]
    assert not (work["local"] / "dup.txt").exists()
    assert_stays_in_share(peer, work, before)

    # The same listing seen by push --delete and by sync: nothing outside is touched.
    write_file(work["local"] / "mine.txt", "mine\n", mtime=MTIME)
    r = on_peer(zygote, peer, work, "push", "--delete", "--force")
    assert r.code in (0, 1), r
    r = on_peer(zygote, peer, work, "sync")
    assert r.code in (0, 1), r
    assert (peer.backing / "escape.txt").read_text() == "the peer's file outside its share\n"
    assert (peer.backing / "share" / "mine.txt").read_text() == "mine\n"
    assert_stays_in_share(peer, work, before)
    # Human output escapes the names a peer chose.
    r = zygote.run("pull", peer.target("/share"), "-d", work["local"], *peer.cli_args(),
                   env=env_for(work))  # fmt: skip
    _escaped_only(r.stderr)


def test_unreadable_share_root_on_the_peer_deletes_nothing(zygote: Zygote, peer, work) -> None:
    write_file(peer.backing / "share" / "a.txt", "peer\n", mtime=MTIME)
    for i in range(3):
        write_file(work["local"] / f"mine{i}.txt", "mine\n", mtime=MTIME)
    assert on_peer(zygote, peer, work, "sync").code == 0  # a base that knows every file
    expected = tree(work["local"])
    peer.listing_fails.add("/share")
    # Even --force (which overrides the emptied-root stop) must not read "cannot list"
    # as "empty": nothing is deleted.
    for command in ("sync", "pull"):
        r = on_peer(zygote, peer, work, command, "--delete" if command == "pull" else "-v",
                    "--force")  # fmt: skip
        assert r.code in (0, 1), r
        assert not [a for a in r.actions() if a["action"].startswith("delete")], r
        assert tree(work["local"]) == expected
    assert sorted(os.listdir(peer.backing / "share")) == sorted(os.listdir(work["local"]))


LIES = {
    # case: (real size, size in listings, size from fstat of the open file)
    "longer-than-listed": (5000, 100, None),
    "shorter-than-listed": (100, 5000, None),
    "listing-and-fstat-both-too-short": (5000, 100, 100),
    "fstat-absurdly-large": (100, None, 1 << 60),
    "listing-absurdly-large": (100, 1 << 62, None),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_lying_sizes_never_end_in_a_false_md5(zygote: Zygote, peer, work, case: str) -> None:
    real, listed, fstat = LIES[case]
    content = os.urandom(real)
    write_file(peer.backing / "share" / "f.bin", content, mtime=MTIME)
    write_file(peer.backing / "share" / "ok.txt", "honest\n", mtime=MTIME)
    if listed is not None:
        peer.size_lies["/share/f.bin"] = listed
    if fstat is not None:
        peer.fstat_lies["/share/f.bin"] = fstat
    before = local_snapshot(work, peer)
    r = on_peer(zygote, peer, work, "pull")
    got = {a["path"]: a for a in r.actions()}
    assert got["ok.txt"]["status"] == "ok" and got["ok.txt"]["verified"] == "md5", r
    f = got["f.bin"]
    if f["status"] == "ok":
        assert f["verified"] == "md5" and case == "fstat-absurdly-large", r
        assert (work["local"] / "f.bin").read_bytes() == content
        assert r.code == 0
    else:
        assert f["status"] == "failed" and f["verified"] != "md5", r
        assert not (work["local"] / "f.bin").exists()
        assert r.code == 1
    assert f["bytes"] <= real + 1
    assert_stays_in_share(peer, work, before)


def test_lying_sizes_without_md5_are_only_size_checked(zygote: Zygote, peer, work) -> None:
    """With no MD5 on the peer, a listing and fstat that agree on a wrong size pass the size
    check: the output says "size", never "md5", and nothing beyond the share is touched."""
    write_file(peer.backing / "share" / "f.bin", b"x" * 5000, mtime=MTIME)
    peer.size_lies["/share/f.bin"] = peer.fstat_lies["/share/f.bin"] = 100
    peer.exec_mode = "nothing"
    r = on_peer(zygote, peer, work, "pull")
    (f,) = r.actions()
    assert f["verified"] == "size" and f["status"] == "ok" and r.code == 0, r
    assert (work["local"] / "f.bin").read_bytes() == b"x" * 100
    assert "MD5 is not available" in r.stderr


def test_entry_whose_type_changes_between_listing_and_open(zygote: Zygote, peer, work) -> None:
    share = peer.backing / "share"
    (share / "was-a-file").mkdir()  # listed as a file, opened as a directory
    write_file(share / "was-a-file" / "x.txt", "x")
    write_file(share / "was-a-dir", "a file listed as a directory", mtime=MTIME)
    write_file(share / "vanishes.txt", "listed, then cannot be opened", mtime=MTIME)
    write_file(share / "fine.txt", "fine\n", mtime=MTIME)
    peer.kind_lies["/share/was-a-file"] = "file"
    peer.kind_lies["/share/was-a-dir"] = "dir"
    peer.open_fails.add("/share/vanishes.txt")
    before = local_snapshot(work, peer)
    r = on_peer(zygote, peer, work, "pull")
    assert r.code == 1, r
    got = {a["path"]: a for a in r.actions()}
    assert got["was-a-file"]["status"] == "failed"
    assert got["vanishes.txt"]["status"] == "failed"
    assert "unreadable" in got["was-a-dir"]["reason"]
    assert got["fine.txt"]["status"] == "ok"
    assert sorted(tree(work["local"])) == ["fine.txt", "was-a-dir"]
    assert tree(work["local"])["was-a-dir"] == ("dir",)
    assert_stays_in_share(peer, work, before)


def test_a_peer_listing_symlinks_as_what_they_lead_to(zygote: Zygote, peer, work) -> None:
    """Some servers list a symlink as the file it leads to (and open it too). Such a
    file, large or small, arrives like any other: its size and mtime are checked
    on the handle it was read from, not by an lstat of its path."""
    share = peer.backing / "share"
    big, small = os.urandom(600_000), b"small\n"
    write_file(share / "big.bin", big, mtime=MTIME)
    write_file(share / "small.txt", small, mtime=MTIME)
    os.symlink("big.bin", share / "big-link.bin")
    os.symlink("small.txt", share / "small-link.txt")
    peer.follow_links = True
    before = local_snapshot(work, peer)
    r = on_peer(zygote, peer, work, "pull")
    assert r.code == 0, r
    assert {a["path"]: a["status"] for a in r.actions()} == dict.fromkeys(
        ["big.bin", "big-link.bin", "small.txt", "small-link.txt"], "ok"
    )
    for name, data in (("big-link.bin", big), ("small-link.txt", small)):
        path = work["local"] / name
        assert not path.is_symlink() and path.read_bytes() == data
        assert int(path.stat().st_mtime) == MTIME
    assert_stays_in_share(peer, work, before)


MD5_CASES = [
    # (exec mode, --verify, direction, expected exit code, expected "verified" of the file)
    ("garbage", "auto", "pull", 0, "size"),
    ("garbage", "auto", "push", 0, "size"),
    ("nothing", "auto", "pull", 0, "size"),
    ("fail", "auto", "push", 0, "size"),
    ("garbage", "md5", "pull", 1, None),
    ("nothing", "md5", "push", 1, None),
    ("lie", "auto", "pull", 1, "failed"),
    ("lie", "auto", "push", 1, "failed"),
    ("lie", "md5", "push", 1, "failed"),
]


@pytest.mark.parametrize("mode,verify,direction,code,verified", MD5_CASES)
def test_md5_answers_are_never_trusted(
    zygote: Zygote, peer, work, mode: str, verify: str, direction: str, code: int, verified
) -> None:
    share = peer.backing / "share"
    src, dst = (work["local"], share) if direction == "push" else (share, work["local"])
    write_file(src / "f.txt", "new content\n" * 100, mtime=MTIME)
    write_file(dst / "f.txt", "old content\n", mtime=MTIME - 100)
    peer.exec_mode = mode
    r = on_peer(zygote, peer, work, direction, "--verify", verify)
    assert r.code == code, r
    if verified is None:  # --verify md5 with no MD5: refused before anything changed
        assert "md5" in r.stderr.lower() and r.actions() == [], r
        assert (dst / "f.txt").read_text() == "old content\n"
        return
    (f,) = r.actions()
    if verified == "failed":
        assert f["status"] == "failed" and f["verified"] != "md5", r
        assert (dst / "f.txt").read_text() == "old content\n"
    else:
        assert f["status"] == "ok" and f["verified"] == verified, r
        assert "MD5 is not available" in r.stderr
        assert (dst / "f.txt").read_text() == "new content\n" * 100
    assert not list(dst.glob(".*.leftpart")) or f["status"] == "failed"


def test_peer_storing_other_bytes_than_sent_is_caught(zygote: Zygote, peer, work) -> None:
    write_file(work["local"] / "f.txt", "what was sent\n" * 50, mtime=MTIME)
    write_file(peer.backing / "share" / "f.txt", "old\n", mtime=MTIME - 100)
    peer.corrupt_writes = True
    r = on_peer(zygote, peer, work, "push")
    assert r.code == 1, r
    (f,) = r.actions()
    assert f["status"] == "failed" and "verification failed" in f["error"], r
    assert (peer.backing / "share" / "f.txt").read_text() == "old\n"


def test_hash_claimed_for_content_the_peer_does_not_serve(zygote: Zygote, peer, work) -> None:
    share = peer.backing / "share"
    write_file(share / "a.txt", "served bytes\n", mtime=MTIME)
    write_file(share / "b.txt", "honest\n", mtime=MTIME)
    write_file(share / "c.txt", "also honest\n", mtime=MTIME)
    peer.hash_claims["/share/a.txt"] = md5("what it claims to hold\n")
    # Records for names never asked for, and a second, different record for c.txt.
    peer.extra_hash_records = [
        md5("x").encode() + b"  ./../escape.txt\0",
        md5("y").encode() + b"  /etc/passwd\0",
        md5("z").encode() + b"  ./c.txt\0",
        md5("w").encode() + b"  b.txt\0",
    ]
    r = on_peer(zygote, peer, work, "pull")
    got = {a["path"]: a for a in r.actions()}
    assert got["a.txt"]["status"] == "failed" and got["a.txt"]["verified"] != "md5", r
    assert got["b.txt"]["status"] == "ok" and got["b.txt"]["verified"] == "md5", r
    assert got["c.txt"]["status"] == "failed", r  # two answers for one name: neither trusted
    assert r.code == 1
    assert sorted(os.listdir(work["local"])) == ["b.txt"]


# -- faults -------------------------------------------------------------------------------------


def _sides(work, direction: str) -> tuple[Path, Path]:
    """(source root, destination root) for a push or a pull."""
    return (
        (work["local"], work["remote"]) if direction == "push" else (work["remote"], work["local"])
    )


def _partial_size(root: Path) -> int:
    sizes = [0]
    for p in no_partials(root):
        with contextlib.suppress(FileNotFoundError):
            sizes.append(p.stat().st_size)
    return max(sizes)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_sigkill_at_random_offsets_leaves_old_or_new_and_a_rerun_converges(
    sshd: Sshd, zygote: Zygote, work, direction: str
) -> None:
    """Even trials replace the file with a new version and start without a partial; odd
    trials resume what the previous kill left. Every kill happens once the partial holds
    a random number of bytes (beyond what it already held), plus a random delay."""
    rng = random.Random(f"sigkill-{direction}")
    src, dst = _sides(work, direction)
    size = 1 << 20
    old = b"old version\n" * 1000
    target = sshd.target(str(work["remote"]))
    args = (direction, target, "-d", work["local"], "--json", "--bwlimit", "8M", *sshd.cli_args())
    new = b""
    killed = 0
    seen: dict[tuple, str | None] = {}

    def final() -> str | None:
        """MD5 of the final name (hashed again only when its inode, size or mtime moved)."""
        try:
            st = (dst / "f.bin").stat()
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in seen:
            seen[key] = md5_path(dst / "f.bin")
        return seen[key]

    def converge() -> None:
        r = zygote.run(*args, env=env_for(work))
        assert r.code == 0, r
        assert_json_clean(r)
        assert md5_path(dst / "f.bin") == md5(new)
        assert not no_partials(dst)

    for trial in range(20):
        if trial % 2 == 0:
            new = rng.randbytes(size)
            write_file(src / "f.bin", new, mtime=MTIME + trial)
            write_file(dst / "f.bin", old, mtime=MTIME - 1)
            for p in no_partials(dst):
                p.unlink()
        allowed = {md5(old), md5(new)}
        kill_at = rng.randrange(_partial_size(dst), size + 1)
        run = zygote.start(*args, env=env_for(work))
        while run.running() and _partial_size(dst) < kill_at:
            assert final() in allowed, f"trial {trial}: torn final name"
            time.sleep(0.002)
        time.sleep(rng.random() * 0.02)
        run.kill()
        r = run.wait()
        if r.code == 0:
            assert md5_path(dst / "f.bin") == md5(new)
        else:
            killed += 1
            assert r.code == -signal.SIGKILL, r
        assert md5_path(dst / "f.bin") in allowed, f"trial {trial}: torn final name after kill"
        if trial % 5 == 4:
            converge()
    assert killed >= 10  # the others finished first: the kill came in their last moments
    converge()
    assert not (dst / ".leftssh.lock").exists() and not (src / ".leftssh.lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_sshd_killed_mid_transfer_exits_3_and_a_restarted_server_resumes(
    sshd_factory: Callable[..., Sshd], zygote: Zygote, work, direction: str
) -> None:
    server = sshd_factory()
    src, dst = _sides(work, direction)
    big = write_file(src / "big.bin", os.urandom(8 << 20), mtime=MTIME)
    write_file(dst / "big.bin", "old\n", mtime=MTIME - 1)
    target = server.target(str(work["remote"]))
    args = (direction, target, "-d", work["local"], "--json", *server.cli_args())
    run = zygote.start(*args, "--bwlimit", "8M", env=env_for(work))
    _wait_for_partial(run, dst, 2 << 20)
    server.stop()
    r = run.wait(30)
    assert r.code == 3, r
    assert r.summary()["exit_code"] == 3
    assert (dst / "big.bin").read_text() == "old\n"
    kept = _partial_size(dst)
    assert kept >= 1 << 20
    server.start()
    r = zygote.run(*args, env=env_for(work))
    assert r.code == 0, r
    (a,) = [a for a in r.actions() if a["path"] == "big.bin"]
    assert a["resumed_from"] > 0 and a["verified"] == "md5", r
    assert a["bytes"] == (8 << 20) - a["resumed_from"]
    assert md5_path(dst / "big.bin") == md5_path(big)
    assert not no_partials(dst)


class StallingProxy:
    """A TCP proxy on 127.0.0.1 that forwards to ``port`` until ``stall`` is set, then holds
    every connection open without passing a single byte on."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stall = threading.Event()
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.listen_port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                th = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                self.threads.append(th)
                th.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        a.settimeout(0.1)
        while not self.closed.is_set():
            if self.stall.is_set():
                time.sleep(0.05)
                continue
            try:
                data = a.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                b.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()
        for th in self.threads:
            th.join(2)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_stalled_connection_gives_up_within_the_timeout(
    sshd: Sshd, zygote: Zygote, work, direction: str, tmp_path: Path
) -> None:
    src, dst = _sides(work, direction)
    write_file(src / "big.bin", os.urandom(16 << 20), mtime=MTIME)
    proxy = StallingProxy(sshd.port)
    try:
        known = tmp_path / "known_hosts"
        key = sshd.known_hosts.read_text().split(None, 1)[1]
        known.write_text(f"[127.0.0.1]:{proxy.listen_port} {key}")
        target = f"ssh://{sshd.user}@127.0.0.1:{proxy.listen_port}{work['remote']}"
        timeout = 2.0
        run = zygote.start(
            direction, target, "-d", work["local"], "--json", "--bwlimit", "4M",
            "--timeout", str(timeout), "-i", sshd.identity, "--known-hosts", known,
            env=env_for(work),
        )  # fmt: skip
        _wait_for_partial(run, dst, 1 << 20)
        proxy.stall.set()
        stalled = time.monotonic()
        r = run.wait(60)
        took = time.monotonic() - stalled
    finally:
        proxy.close()
    assert r.code == 3, r
    assert r.summary()["exit_code"] == 3
    assert "stall" in r.stderr or "timed out" in r.stderr or "lost" in r.stderr, r
    assert took < timeout + 3, f"gave up {took:.1f} s after the stall with --timeout {timeout}"
    assert not (dst / "big.bin").exists()


@pytest.fixture
def small_disk(work) -> Iterator[Path]:
    """The remote share on a 2 MiB tmpfs (unmounted afterwards)."""
    mount_point = work["remote"]
    mount_point.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_remote_disk_full_fails_per_file_and_corrupts_nothing(
    sshd: Sshd, zygote: Zygote, work, small_disk: Path
) -> None:
    local = work["local"]
    write_file(small_disk / "keep.txt", "old keep\n", mtime=MTIME - 10)
    write_file(local / "a-big.bin", os.urandom(3 << 20), mtime=MTIME)  # cannot fit
    write_file(local / "keep.txt", "new keep\n" * 10, mtime=MTIME)
    write_file(local / "small.txt", "small\n", mtime=MTIME)
    target = sshd.target(str(small_disk))
    r = zygote.run(
        "push", target, "-d", local, "--json", "-j", "1", *sshd.cli_args(), env=env_for(work)
    )
    assert_json_clean(r)
    assert r.code == 1, r
    got = {a["path"]: a for a in r.actions()}
    assert got["a-big.bin"]["status"] == "failed" and got["a-big.bin"]["verified"] != "md5"
    assert not (small_disk / "a-big.bin").exists()
    # A failed file's partial does not keep the disk full: the other files still fit.
    assert got["keep.txt"]["status"] == "ok", r
    assert got["small.txt"]["status"] == "ok", r
    assert (small_disk / "keep.txt").read_text() == "new keep\n" * 10
    assert not no_partials(small_disk)


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """``make(path)``: chattr +i (even root cannot write into it); undone afterwards."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: no way to deny root a directory")
    made: list[Path] = []

    def make(path: Path) -> None:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_permission_denied_on_a_subdirectory_fails_only_its_files(
    sshd: Sshd, zygote: Zygote, work, immutable, direction: str
) -> None:
    src, dst = _sides(work, direction)
    write_file(src / "locked" / "new.txt", "new\n", mtime=MTIME)
    write_file(src / "locked" / "changed.txt", "changed\n", mtime=MTIME)
    write_file(src / "open.txt", "open\n", mtime=MTIME)
    write_file(dst / "locked" / "changed.txt", "before\n", mtime=MTIME - 10)
    immutable(dst / "locked")
    target = sshd.target(str(work["remote"]))
    r = zygote.run(direction, target, "-d", work["local"], "--json", *sshd.cli_args(),
                   env=env_for(work))  # fmt: skip
    assert_json_clean(r)
    assert r.code == 1, r
    got = {a["path"]: a for a in r.actions()}
    assert got["locked/new.txt"]["status"] == "failed"
    assert got["locked/changed.txt"]["status"] == "failed"
    assert got["open.txt"]["status"] == "ok"
    assert sorted(os.listdir(dst / "locked")) == ["changed.txt"]
    assert (dst / "locked" / "changed.txt").read_text() == "before\n"


def _mutate(path: Path, how: str) -> None:
    if how == "grows":
        with open(path, "ab") as f:
            f.write(b"appended while being sent\n" * 1000)
    elif how == "shrinks":
        os.truncate(path, 1000)
    elif how == "vanishes":
        path.unlink()
    elif how == "rewritten-same-size":
        with open(path, "r+b") as f:
            f.seek(100)
            f.write(b"X" * 1000)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["grows", "shrinks", "vanishes", "rewritten-same-size"])
def test_local_file_changing_during_its_upload_is_never_committed_as_verified(
    sshd: Sshd, zygote: Zygote, work, how: str
) -> None:
    local, remote = work["local"], work["remote"]
    f = write_file(local / "f.bin", os.urandom(3 << 20), mtime=MTIME)
    write_file(remote / "f.bin", "old\n", mtime=MTIME - 10)
    target = sshd.target(str(remote))
    args = ("push", target, "-d", local, "--json", *sshd.cli_args())
    run = zygote.start(*args, "--bwlimit", "4M", env=env_for(work))
    _wait_for_partial(run, remote, 1 << 20)
    _mutate(f, how)
    r = run.wait()
    assert_json_clean(r)
    assert r.code == 1, r
    (a,) = r.actions()
    assert a["status"] == "failed" and "changed" in a["error"], r
    assert (remote / "f.bin").read_text() == "old\n"
    # The next run sends the file as it is now.
    r = zygote.run(*args, env=env_for(work))
    assert r.code == 0, r
    if how == "vanishes":
        assert (remote / "f.bin").read_text() == "old\n"
    else:
        assert md5_path(remote / "f.bin") == md5_path(f)
    assert not no_partials(remote)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_source_changed_between_interruption_and_resume_starts_over(
    sshd: Sshd, zygote: Zygote, work, direction: str
) -> None:
    """Same size, same mtime, other bytes: only the MD5 of the prefix can tell."""
    src, dst = _sides(work, direction)
    f = write_file(src / "f.bin", os.urandom(4 << 20), mtime=MTIME)
    target = sshd.target(str(work["remote"]))
    args = (direction, target, "-d", work["local"], "--json", *sshd.cli_args())
    run = zygote.start(*args, "--bwlimit", "8M", env=env_for(work))
    _wait_for_partial(run, dst, 2 << 20)
    run.kill()
    run.wait()
    assert _partial_size(dst) >= 1 << 20
    write_file(f, os.urandom(4 << 20), mtime=MTIME)  # same size and mtime, new content
    r = zygote.run(*args, env=env_for(work))
    assert r.code == 0, r
    (a,) = r.actions()
    assert a["resumed_from"] == 0 and a["bytes"] == 4 << 20 and a["verified"] == "md5", r
    assert md5_path(dst / "f.bin") == md5_path(f)
    assert not no_partials(dst)


@pytest.mark.slow
def test_sync_state_survives_sigkill_at_any_moment(sshd: Sshd, zygote: Zygote, work) -> None:
    rng = random.Random("state")
    local, remote = work["local"], work["remote"]
    for i in range(200):
        write_file(local / f"d{i % 10}" / f"f{i}.txt", f"{i}\n", mtime=MTIME)
    remote.mkdir(parents=True)
    target = sshd.target(str(remote))
    args = ("sync", target, "-d", local, "--json", *sshd.cli_args())
    assert zygote.run(*args, env=env_for(work)).code == 0
    bases = work["state"] / "bases"

    def change(trial: int) -> None:  # a few changes on each side, so the base is rewritten
        for i in rng.sample(range(200), 6):
            side = local if i % 2 else remote
            write_file(side / f"d{i % 10}" / f"f{i}.txt", f"{i} v{trial}\n", mtime=MTIME + trial)

    change(-1)
    started = time.monotonic()
    assert zygote.run(*args, env=env_for(work)).code == 0
    full = time.monotonic() - started  # how long such a sync takes, base write included
    torn = 0
    for trial in range(10):
        change(trial)
        run = zygote.start(*args, env=env_for(work))
        if trial % 2:  # at a random moment
            time.sleep(rng.uniform(0.3, 1.05) * full)
        else:  # while the new base is being written: its temporary file exists
            while run.running() and not list(bases.glob(".*.tmp")):
                time.sleep(0.0005)
            torn += bool(list(bases.glob(".*.tmp")))
        run.kill()
        run.wait()
        for base in bases.glob("*.base"):
            with open(base, "rb") as f:
                assert read_base(f)  # never torn
    assert torn >= 2, "never caught the base being written"
    r = zygote.run(*args, env=env_for(work))
    assert r.code == 0, r
    assert tree(local) == tree(remote)
    assert [p.name for p in bases.iterdir()] == [p.name for p in bases.glob("*.base")]


def test_two_runs_on_one_share_the_second_exits_7(sshd: Sshd, zygote: Zygote, work) -> None:
    local, remote = work["local"], work["remote"]
    write_file(local / "big.bin", os.urandom(4 << 20), mtime=MTIME)
    other = local.parent / "other-share"
    write_file(other / "x.txt", "x\n", mtime=MTIME)
    target = sshd.target(str(remote))
    first = subprocess.Popen(
        [sys.executable, "-m", "leftssh", "push", target, "-d", local, "--bwlimit", "4M",
         *sshd.cli_args()],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "LEFTSSH_STATE_DIR": str(work["state"])},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (remote / ".leftssh.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr
            time.sleep(0.01)
        # Another local share, same remote share: the remote lock refuses it.
        r = zygote.run("push", target, "-d", other, "--json", *sshd.cli_args(), env=env_for(work))
        assert r.code == 7, r
        assert r.summary()["exit_code"] == 7
        assert f"pid {first.pid}" in r.stderr and socket.gethostname() in r.stderr, r
        # Same local share, another remote: the local lock refuses it.
        elsewhere = sshd.target(str(work["remote"].parent / "elsewhere"))
        r = zygote.run("pull", elsewhere, "-d", local, "--json", *sshd.cli_args(),
                       env=env_for(work))  # fmt: skip
        assert r.code == 7, r
        assert f"pid {first.pid}" in r.stderr, r
    finally:
        assert first.wait(60) == 0, first.stderr.read() if first.stderr else ""
    assert md5_path(remote / "big.bin") == md5_path(local / "big.bin")
    assert not (remote / "x.txt").exists()


# -- parsers --------------------------------------------------------------------------------------

_TARGET_PIECES = st.sampled_from(
    ["ssh://", "@", ":", "[", "]", "/", "~", "~/", "-", "host", "user", "22", "65536", "0",
     "::1", "%", ".", "..", " ", "\n", "\x00", "\u00e9", "\udcff", "a.b", "-oProxyCommand=x", "//"]
)  # fmt: skip


@given(
    st.one_of(
        st.text(max_size=60),
        st.text(st.characters(categories=("Cs", "L", "P", "S")), max_size=20),
        st.lists(_TARGET_PIECES, max_size=12).map("".join),
    )
)
@settings(max_examples=400, deadline=None)
def test_parse_target_raises_only_usage_error(text: str) -> None:
    try:
        t = parse_target(text)
    except UsageError:
        return
    if t.local_path is not None:
        assert t.local_path.is_absolute()
        return
    assert t.host and not t.host.startswith("-")
    assert not any(c in t.host for c in "/@ \x00\n")
    assert t.user is None or (t.user and not t.user.startswith("-") and "@" not in t.user)
    assert t.port is None or 0 < t.port < 65536
    assert t.path and "\x00" not in t.path and not any(ord(c) < 32 for c in t.path)
    again = parse_target(t.label())  # what leftssh prints can be given back to it
    assert (again.host, again.user, again.port, again.path) == (t.host, t.user, t.port, t.path)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.lists(_label, min_size=1, max_size=3).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    st.sampled_from(["::1", "fe80::1%eth0", "2001:db8::7"]),
)
_users = st.none() | st.from_regex(r"[a-z_][a-z0-9_.]{0,7}", fullmatch=True)
_parts = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/\x00"),
    min_size=1,
    max_size=8,
).filter(lambda p: p not in (".", "..") and not p.startswith("~"))
_paths = st.tuples(st.booleans(), st.lists(_parts, min_size=1, max_size=3))


@given(_users, _hosts, st.none() | st.integers(1, 65535), _paths, st.booleans())
@settings(max_examples=300, deadline=None)
def test_well_formed_targets_round_trip(user, host, port, path, url: bool) -> None:
    absolute, parts = path
    rel = "/".join(parts)
    expected_path = ("/" + rel) if absolute else rel
    shown_host = f"[{host}]" if ":" in host else host
    at = f"{user}@" if user else ""
    if url or port is not None:
        text = f"ssh://{at}{shown_host}{f':{port}' if port else ''}/{'' if absolute else '~/'}{rel}"
    else:
        text = f"{at}{shown_host}:{expected_path}"
    t = parse_target(text)
    assert (t.host, t.user, t.port, t.path) == (host, user, port, expected_path), text
    again = parse_target(t.label())
    assert (again.host, again.user, again.port, again.path) == (host, user, port, expected_path)


_md5_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=12,
).filter(lambda n: not n.startswith("/"))
_NEAR_MISSES = ["/{}", "./{}", "../{}", "{}/", "{} ", " {}", "{}\\", "{}.", "x/{}", "{}\r", "{}\t"]


def _record(tool: HashTool, name: str, digest: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if tool is HashTool.GNU_Z:
        return digest.encode() + b"  ./" + raw + b"\0"
    if tool is HashTool.BSD:
        return digest.encode() + b" ./" + raw + b"\n"
    escaped = raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    return (b"\\" if escaped != raw else b"") + digest.encode() + b"  ./" + escaped + b"\n"


@given(
    st.lists(_md5_names, min_size=1, max_size=5, unique=True),
    st.sampled_from(list(HashTool)),
    st.data(),
)
@settings(max_examples=300, deadline=None)
def test_md5_records_for_names_never_asked_for_are_ignored(
    requested: list[str], tool: HashTool, data
) -> None:
    """A hostile peer's records for near-miss names (absolute, ``../``, a trailing space or
    slash...) never yield a hash, and each requested path gets its own record's hash."""
    if tool is HashTool.BSD:  # names printed raw: a newline in a name is ambiguous by design
        requested = [n for n in requested if "\n" not in n and "\r" not in n] or ["plain"]
    keys = {n.encode("utf-8", "surrogateescape") for n in requested}
    honest = data.draw(st.sets(st.sampled_from(requested)))
    truth = {n: md5(f"true {n}") for n in honest}
    records = [_record(tool, n, d) for n, d in truth.items()]
    for name in requested:
        for pattern in data.draw(st.lists(st.sampled_from(_NEAR_MISSES), max_size=3)):
            other = pattern.format(name)
            if other.encode("utf-8", "surrogateescape") not in keys and "\n" not in other:
                records.append(_record(tool, other, md5(f"forged {other}")))
    data.draw(st.randoms(use_true_random=False)).shuffle(records)
    got = parse_hash_output(tool, b"".join(records), requested)
    assert set(got) <= set(requested)
    assert {n: d for n, d in got.items()} == {n: truth[n] for n in got}
    if tool is not HashTool.BSD:
        assert got == truth
