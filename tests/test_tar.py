"""Small files sent as tar archives: the members as Python's tarfile reads them, the
unpack script run for real by each local shell with GNU tar, and ``put_files`` against a
real sshd both ways (archives, and one request stream per file)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from leftssh import cli, execute
from leftssh.transport import remote_shell, tar
from leftssh.transport.remote_shell import HashTool, Unpack
from leftssh.transport.sftp import SFTPTransport
from tests.helpers import record_calls
from tests.test_remote_shell import HOSTILE_NAMES, SHELLS, needs_md5sum


def _gnu_tar() -> bool:
    found = shutil.which("tar")
    if found is None:
        return False
    out = subprocess.run([found, "--version"], capture_output=True, check=False).stdout
    return remote_shell.parse_tar_probe(out)


needs_gnu_tar = pytest.mark.skipif(not _gnu_tar(), reason="GNU tar not installed")

RUN = "abc123"
# Single names (no '/'), as member names of partials.
NAMES = [n for n in HOSTILE_NAMES if "/" not in n] + ["x" * 90, "y" * 101, "z" * 255]


def _encoded(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _archive(files: dict[str, tuple[bytes, int, int]]) -> bytes:
    pieces: list[bytes] = []
    for name, (data, mtime, mode) in files.items():
        pieces += tar.member(_encoded(name), data, mtime, mode)
    pieces.append(tar.END)
    return b"".join(pieces)


def _files(seed: int) -> dict[str, tuple[bytes, int, int]]:
    sizes = [0, 1, 511, 512, 513, 4096, 70_000]
    return {
        name: (
            bytes((seed + i + j) % 251 for j in range(sizes[i % len(sizes)])),
            [0, 1, 1_700_000_000, 2**32 - 1][i % 4],
            [0o644, 0o600, 0o755, 0o640, 0o777, 0o400][i % 6],
        )
        for i, name in enumerate(NAMES)
    }


# --------------------------------------------------------------------------- members


def test_members_read_back_by_python_tarfile() -> None:
    files = _files(1)
    with tarfile.open(fileobj=io.BytesIO(_archive(files)), encoding="utf-8") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == list(files)
        for m in members:
            data, mtime, mode = files[m.name]
            assert m.isreg() and (m.size, m.mtime, m.mode) == (len(data), mtime, mode)
            extracted = tf.extractfile(m)
            assert extracted is not None and extracted.read() == data


def test_member_size_is_what_member_makes() -> None:
    for name_bytes in (1, 99, 100, 101, 255):
        for size in (0, 1, 511, 512, 513, 70_000):
            made = tar.member(b"n" * name_bytes, bytes(size), 0, 0o644)
            assert sum(map(len, made)) == tar.member_size(name_bytes, size)


def test_member_masks_mode_and_rejects_what_it_cannot_hold() -> None:
    (header, data, pad) = tar.member(b"f", b"abc", 5, 0o104755)
    with tarfile.open(fileobj=io.BytesIO(header + data + pad + tar.END)) as tf:
        assert tf.getmembers()[0].mode == 0o755
    for name in (b"", b".", b"..", b"a/b", b"a\0b"):
        with pytest.raises(ValueError):
            tar.member(name, b"", 0, 0o644)
    for mtime in (-1, tar.MAX_MTIME + 1):
        with pytest.raises(ValueError):
            tar.member(b"f", b"", mtime, 0o644)


# --------------------------------------------------------------------------- script


def test_parse_tar_probe() -> None:
    assert remote_shell.parse_tar_probe(b"motd noise\ntar (GNU tar) 1.34\nCopyright\n")
    assert not remote_shell.parse_tar_probe(b"tar: unrecognized option '--version'\n")
    assert not remote_shell.parse_tar_probe(b"bsdtar 3.6.2 - libarchive 3.6.2\n")
    assert not remote_shell.parse_tar_probe(b"")


def _job(directory: str, n: int, members: list[str], sweep: bool = False) -> Unpack:
    return Unpack(directory, remote_shell.archive_name(RUN, n), sweep, members)


def test_parse_unpack_output() -> None:
    jobs = [_job("a", 1, ["x", "y"]), _job("", 2, ["z"]), _job("b", 3, ["w"])]
    h = [hashlib.md5(c).hexdigest() for c in (b"x", b"y", b"z", b"w")]
    hashes = f"{h[0]}  ./a/x\0{h[1]}  ./a/y\0{h[2]}  ./z\0{h[3]}  ./b/w\0".encode()
    out = b"noise\nleftssh-unpack 0\nleftssh-unpack 0\nleftssh-unpack -\n\nM\n" + hashes
    assert remote_shell.parse_unpack_output(out, jobs, HashTool.GNU_Z, "M") == [
        (True, {"x": h[0], "y": h[1]}),
        (True, {"z": h[2]}),
        (False, {}),  # refused: its hashes are not taken
    ]
    assert remote_shell.parse_unpack_output(out, jobs, None, "M") == [
        (True, {}),
        (True, {}),
        (False, {}),
    ]
    nothing = [(False, {})] * 3
    assert remote_shell.parse_unpack_output(out, jobs, HashTool.GNU_Z, "N") == nothing
    cut = b"leftssh-unpack 0\nleftssh-unpack 0\n\nM\n"  # one result missing
    assert remote_shell.parse_unpack_output(cut, jobs, HashTool.GNU_Z, "M") == nothing


def test_unpack_script_rejects_odd_jobs() -> None:
    good = remote_shell.archive_name(RUN, 1)
    for job in [("/abs", good), ("a\0b", good), ("d", "other.tar"), ("d", "a/" + good)]:
        with pytest.raises(ValueError):
            remote_shell.unpack_script("/r", "/r", RUN, [Unpack(*job, False, [])], None, "M")
    with pytest.raises(ValueError):
        remote_shell.unpack_script("/r", "/r", "not plain!", [_job("d", 1, [])], None, "M")
    with pytest.raises(ValueError):
        remote_shell.unpack_script("/r", "/r", RUN, [_job("d", 1, [])], None, "not plain!")
    with pytest.raises(ValueError):
        remote_shell.unpack_script("/r", "/r", RUN, [], None, "M")


@needs_gnu_tar
@needs_md5sum
@pytest.mark.parametrize("shell", SHELLS)
def test_unpack_under_each_shell(shell: list[str], tmp_path: Path) -> None:
    root = tmp_path / "share $(touch pwned) 'q"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"outside")
    dirs = ["", "plain", "dir $(touch pwned)/-rf", "swapped", "missing"]
    for d in dirs[:3]:
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "swapped").symlink_to(outside)  # a directory swapped for a symlink
    expected: dict[str, dict[str, tuple[bytes, int, int]]] = {}
    jobs = []
    for n, d in enumerate(dirs, 1):
        files = _files(n)
        expected[d] = files
        job = _job(d, n, list(files), sweep=d in ("", "plain"))
        target = root / d
        if target.is_dir() and not target.is_symlink():
            (target / job.archive).write_bytes(_archive(files))
        jobs.append(job)
    plain = root / "plain"
    (plain / "plain.txt").write_bytes(b"old partial")  # replaced
    (plain / "empty").symlink_to(outside / "keep")  # replaced, never followed
    other = plain / remote_shell.archive_name("oldrun", 7)  # left by a killed run: removed
    other.write_bytes(b"x")
    later = plain / remote_shell.archive_name(RUN, 99)  # this run's next one: kept
    later.write_bytes(b"y")

    script = remote_shell.unpack_script(
        str(root), str(root.resolve()), RUN, jobs, HashTool.GNU_Z, "end-1"
    )
    result = subprocess.run(
        [*shell, script.decode("utf-8", "surrogateescape")],
        capture_output=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    got = remote_shell.parse_unpack_output(result.stdout, jobs, HashTool.GNU_Z, "end-1")
    assert [ok for ok, _ in got] == [True, True, True, False, False], result
    for (ok, hashes), d in zip(got, dirs, strict=True):
        want = {name: hashlib.md5(data).hexdigest() for name, (data, _, _) in expected[d].items()}
        assert hashes == (want if ok else {}), d
    for d in dirs[:3]:
        for name, (data, mtime, mode) in expected[d].items():
            path = root / d / name
            st = path.lstat()
            assert path.is_file() and not path.is_symlink(), (d, name)
            assert path.read_bytes() == data, (d, name)
            assert (int(st.st_mtime), st.st_mode & 0o777) == (mtime, mode), (d, name)
        leftovers = [p.name for p in (root / d).iterdir() if p.name.startswith(".leftssh-tar-")]
        assert leftovers == ([later.name] if d == "plain" else []), d
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]
    assert (outside / "keep").read_bytes() == b"outside"
    assert not list(tmp_path.rglob("pwned"))


# --------------------------------------------------------------------------- against sshd


def _items(root: Path) -> list[tuple[str, bytes, tuple[int, int]]]:
    for d in ("a", "a/b", "c"):
        (root / d).mkdir()
    files = {
        f"{d}/.f{i}.leftpart": os.urandom(i * 37) for d in ("a", "a/b", "c") for i in range(40)
    }
    files[".top.leftpart"] = os.urandom(300_000)  # more than one WRITE request
    files["c/." + "n" * 150 + ".leftpart"] = b"a long name"
    return [
        (p, data, (1_600_000_000 + i, 0o600 + (i % 2) * 0o40))
        for i, (p, data) in enumerate(files.items())
    ]


@pytest.mark.parametrize("archives", [True, False], ids=["archives", "each"])
def test_put_files_both_ways(remote, archives: bool) -> None:
    t, root = remote
    if not archives:
        t._tar = False
    items = _items(root)
    assert t.put_files(iter(items))() == {}
    assert t._tar is archives
    for p, data, (mtime, mode) in items:
        st = (root / p).stat()
        assert (root / p).read_bytes() == data
        assert (int(st.st_mtime), st.st_mode & 0o777) == (mtime, mode)
    assert not [p for p in root.rglob("*") if p.name.startswith(".leftssh-tar-")]


@pytest.mark.parametrize("archives", [True, False], ids=["archives", "each"])
def test_put_files_reports_failures_and_writes_nothing_outside(
    remote, tmp_path: Path, archives: bool
) -> None:
    """As archives, a file fails with its directory's archive; one by one, alone."""
    t, root = remote
    if not archives:
        t._tar = False
    outside = tmp_path / "outside"
    outside.mkdir()
    for d in ("ok", "blocked", "ok2"):
        (root / d).mkdir()
    (root / "link").symlink_to(outside)  # a directory swapped for a symlink after the scan
    (root / "ok" / ".held.leftpart").write_bytes(b"an old partial")
    # A non-empty directory where a file goes: neither tar nor an OPEN can replace it.
    (root / "blocked" / ".x.leftpart").mkdir()
    (root / "blocked" / ".x.leftpart" / "inside").write_bytes(b"kept")
    items = [
        ("ok/.a.leftpart", b"a", (1_600_000_000, 0o644)),
        ("ok/.held.leftpart", b"new", (1_600_000_000, 0o644)),
        ("blocked/.y.leftpart", b"y", (1_600_000_000, 0o644)),
        ("blocked/.x.leftpart", b"x", (1_600_000_000, 0o644)),
        ("link/.b.leftpart", b"b", (1_600_000_000, 0o644)),
        ("gone/.c.leftpart", b"c", (1_600_000_000, 0o644)),
        ("ok2/.d.leftpart", b"d", (1_600_000_000, 0o644)),
        ("ok2/.e.leftpart", b"e", (2**40, 0o644)),  # beyond what tar or SFTP can set
    ]
    failed = t.put_files(items)()
    assert t._tar is archives
    both = {"blocked/.x.leftpart", "link/.b.leftpart", "gone/.c.leftpart", "ok2/.e.leftpart"}
    if archives:
        # tar replaces an old partial, as a one-by-one retry would; the blocked
        # directory's archive did not unpack whole, so all of it failed.
        assert set(failed) == both | {"blocked/.y.leftpart"}
        assert (root / "ok" / ".held.leftpart").read_bytes() == b"new"
    else:
        assert set(failed) == both | {"ok/.held.leftpart"}
        assert (root / "ok" / ".held.leftpart").read_bytes() == b"an old partial"
        assert (root / "blocked" / ".y.leftpart").read_bytes() == b"y"
    assert (root / "ok" / ".a.leftpart").read_bytes() == b"a"
    assert (root / "ok2" / ".d.leftpart").read_bytes() == b"d"
    assert (root / "blocked" / ".x.leftpart" / "inside").read_bytes() == b"kept"
    assert not (root / "ok2" / ".e.leftpart").exists()
    assert list(outside.iterdir()) == []
    assert not [p for p in root.rglob("*") if p.name.startswith(".leftssh-tar-")]


def test_put_files_without_a_shell_writes_each_file(remote) -> None:
    t, root = remote
    t._tar = None

    def no_shell(script: str | bytes, what: str) -> tuple[bool, bytes]:
        return False, b""

    t._ask_shell = no_shell  # type: ignore[method-assign]
    items = _items(root)
    assert t.put_files(iter(items))() == {}
    assert t._tar is False
    for p, data, _ in items:
        assert (root / p).read_bytes() == data


def test_partials_hashed_as_they_were_unpacked_are_not_hashed_again(remote) -> None:
    t, root = remote
    assert t.can_hash()  # the probe has answered: archives are hashed as they unpack
    items = _items(root)
    assert t.put_files(iter(items))() == {}
    asked: list[str] = []
    real = t._ask_shell

    def counting(script: str | bytes, what: str) -> tuple[bool, bytes]:
        asked.append(what)
        return real(script, what)

    t._ask_shell = counting  # type: ignore[method-assign]
    paths = [p for p, _, _ in items]
    assert t.hash_files(paths) == {p: hashlib.md5(data).hexdigest() for p, data, _ in items}
    assert asked == []
    out = t.open_write(paths[0], 0, None)  # written again another way: hashed again
    out.write(b"other")
    out.close()
    assert t.hash_files(paths[:2]) == {
        paths[0]: hashlib.md5(b"other").hexdigest(),
        paths[1]: hashlib.md5(items[1][1]).hexdigest(),
    }
    assert asked == ["hashing"]


@pytest.mark.parametrize("archives", [True, False], ids=["archives", "each"])
def test_bwlimit_counts_what_small_files_take_on_the_wire(
    sshd, tmp_path: Path, monkeypatch, archives: bool
) -> None:
    local, peer = tmp_path / "share", tmp_path / "peer"
    (local / "d").mkdir(parents=True)
    sizes = [1, 100, 511, 513, 3000]
    for i, size in enumerate(sizes):
        (local / "d" / f"f{i}.bin").write_bytes(bytes(size))
    peer.mkdir()
    if not archives:
        monkeypatch.setattr(SFTPTransport, "_tar_usable", lambda self: False)
    consumed = record_calls(monkeypatch, execute.RateLimiter, "consume")
    args = ["push", sshd.target(str(peer)), "-d", str(local), "-q", "--bwlimit", "10M"]
    result = CliRunner().invoke(
        cli.main_group,
        [*args, *sshd.cli_args()],
        env={"LEFTSSH_STATE_DIR": str(tmp_path / "state")},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    charged = [n for (n,) in consumed]
    assert len(charged) == len(sizes)
    if archives:  # a 512-byte header, and the data padded to whole blocks
        assert sorted(charged) == sorted(512 + s + (-s % 512) for s in sizes)
    else:
        assert all(n > s for n, s in zip(sorted(charged), sorted(sizes), strict=True))
