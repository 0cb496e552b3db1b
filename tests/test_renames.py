"""Many partials renamed into place at once by the peer's perl: the script run for real
by each local shell, its output parsed, and ``rename_new`` against a real sshd with
and without perl on the peer."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from leftssh import cli
from leftssh.transport import remote_shell, sftp
from leftssh.transport.sftp import SFTPTransport
from tests.sshd import Sshd
from tests.test_remote_shell import HOSTILE_NAMES, SHELLS, _run

needs_perl = pytest.mark.skipif(shutil.which("perl") is None, reason="perl not installed")

NAMES = [n for n in HOSTILE_NAMES if "/" not in n] + ["z" * 255]
# What a scan can hand on (it skips a name that is not UTF-8, see test_hostile).
SCANNED = [n for n in NAMES if n.encode("utf-8", "replace") == n.encode("utf-8", "ignore")]


def _pairs_on_disk(root: Path, count: int, hostile: list[str]) -> list[tuple[str, str]]:
    """``count`` partials in ``root/d`` (``hostile`` names first), each with its new name."""
    (root / "d").mkdir(exist_ok=True)
    names = (hostile + [f"f{i:05d}-{'x' * 60}" for i in range(count)])[:count]
    pairs = []
    for i, name in enumerate(names):
        partial = f"d/.{i}.leftpart"
        (root / partial).write_bytes(name.encode("utf-8", "surrogateescape"))
        pairs.append((partial, f"d/{name}"))
    return pairs


def test_rename_script_refuses_what_it_cannot_quote() -> None:
    with pytest.raises(ValueError):
        remote_shell.rename_script("/r", [])
    for bad in ("", "/abs", "a\x00b"):
        with pytest.raises(ValueError):
            remote_shell.rename_script("/r", [(bad, "x")])
        with pytest.raises(ValueError):
            remote_shell.rename_script("/r", [("x", bad)])


def test_parse_rename_output() -> None:
    pairs = [(f"p{i}" + "x" * 3000, f"n{i}" + "y" * 3000) for i in range(30)]  # several chunks
    firsts = [first for first, _ in remote_shell._rename_chunks(pairs)]
    assert len(firsts) > 2 and firsts[0] == 0
    ends = b"".join(b"leftssh-mv end %d\n" % f for f in firsts[1:])  # the first chunk died
    out = b"noise\nleftssh-mv 3 17\nleftssh-mv end x\n" + ends + b"leftssh-mv %d nf\n" % firsts[1]
    out += b"leftssh-mv 99 2\nleftssh-mv 5\n"  # a number out of range, a broken line
    failed = remote_shell.parse_rename_output(out, pairs)
    assert failed == {**{n: "?" for n in range(firsts[1]) if n != 3}, 3: "17", firsts[1]: "nf"}
    assert remote_shell.parse_rename_output(b"", pairs) == dict.fromkeys(range(30), "?")
    assert remote_shell.parse_perl_probe(b"motd\nleftssh-perl\n")
    assert not remote_shell.parse_perl_probe(b"sh: perl: not found\n")


@needs_perl
@pytest.mark.parametrize("shell", SHELLS)
def test_rename_under_each_shell(shell: list[str], tmp_path: Path) -> None:
    root = tmp_path / "share $(touch pwned) 'q"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"outside")
    pairs = _pairs_on_disk(root, 400, NAMES)  # more than one chunk
    taken, gone, swapped = 1, 2, 3
    (root / pairs[taken][1]).write_bytes(b"appeared since the scan")
    (root / pairs[gone][0]).unlink()
    (root / pairs[swapped][0]).unlink()
    (root / pairs[swapped][0]).symlink_to(outside / "keep")
    script = remote_shell.rename_script(str(root), pairs)
    assert len(remote_shell._rename_chunks(pairs)) > 1
    result = _run(shell, script.decode("utf-8", "surrogateescape"), cwd=tmp_path)
    failed = remote_shell.parse_rename_output(result.stdout, pairs)
    assert failed == {taken: str(errno.EEXIST), gone: "nf", swapped: "nf"}, result
    for i, (partial, name) in enumerate(pairs):
        if i in failed:
            continue
        assert not (root / partial).exists()
        assert (root / name).read_bytes() == os.fsencode(name.rpartition("/")[2])
        assert (root / name).stat().st_nlink == 1
    assert (root / pairs[taken][1]).read_bytes() == b"appeared since the scan"
    assert (root / pairs[taken][0]).exists()  # kept: the caller decides
    assert not (root / pairs[swapped][1]).exists()  # a symlink is never given the name
    assert (outside / "keep").read_bytes() == b"outside"
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.parametrize("perl", [True, False], ids=["perl", "sftp"])
def test_rename_new_both_ways(remote, perl: bool) -> None:
    t, root = remote
    if perl and shutil.which("perl") is None:
        pytest.skip("perl not installed")
    if not perl:
        t._perl = False
    pairs = _pairs_on_disk(root, 150, SCANNED)
    (root / pairs[7][1]).write_bytes(b"appeared since the scan")
    failed = t.rename_new(pairs)
    assert set(failed) == {pairs[7][0]}
    assert t._perl is perl
    assert (root / pairs[7][1]).read_bytes() == b"appeared since the scan"
    assert (root / pairs[7][0]).exists()
    for i, (partial, name) in enumerate(pairs):
        if i != 7:
            assert not (root / partial).exists()
            assert (root / name).read_bytes() == os.fsencode(name.rpartition("/")[2])


def test_rename_new_falls_back_to_sftp_when_the_shell_cannot_rename(remote, monkeypatch) -> None:
    """A perl that dies (or a file system without hard links) leaves its pairs to SFTP."""
    t, root = remote
    t._perl = True
    monkeypatch.setattr(remote_shell, "_RENAME_PERL", "exit 0")  # never reaches its end line
    pairs = _pairs_on_disk(root, 100, SCANNED)
    assert t.rename_new(pairs) == {}
    for partial, name in pairs:
        assert not (root / partial).exists() and (root / name).exists()


def test_perl_probe_says_no_without_perl(remote, monkeypatch) -> None:
    t, _ = remote
    monkeypatch.setattr(remote_shell, "PERL_PROBE", "no-such-perl-here </dev/null")
    assert t._perl_usable() is False


@pytest.mark.parametrize("count", [30, 120])
def test_push_keeps_a_name_that_appears_before_the_rename(
    sshd: Sshd, tmp_path: Path, monkeypatch, count: int
) -> None:
    """Through the CLI: few files are renamed by SFTP, many by the peer's perl."""
    local, remote_dir = tmp_path / "share", tmp_path / "peer"
    (local / "d").mkdir(parents=True)
    for i in range(count):
        (local / "d" / f"f{i}.txt").write_text(f"file {i}\n")
    real_rename = SFTPTransport.rename_new
    used = []

    def late_writer(self: SFTPTransport, pairs: list[tuple[str, str]]) -> dict[str, Exception]:
        (remote_dir / "d" / "f7.txt").write_text("written by someone else\n")
        got = real_rename(self, pairs)
        used.append(self._perl)
        return got

    monkeypatch.setattr(SFTPTransport, "rename_new", late_writer)
    result = CliRunner().invoke(
        cli.main_group,
        ["push", sshd.target(str(remote_dir)), "-d", str(local), "--json", *sshd.cli_args()],
        env={"LEFTSSH_STATE_DIR": str(tmp_path / "state")},
        catch_exceptions=False,
    )
    records = [json.loads(line) for line in result.output.splitlines() if line.strip()]
    by_path = {r["path"]: r for r in records if "path" in r}
    assert by_path["d/f7.txt"]["status"] == "skipped", by_path["d/f7.txt"]
    assert "appeared since the scan" in by_path["d/f7.txt"]["reason"]
    assert (remote_dir / "d" / "f7.txt").read_text() == "written by someone else\n"
    for i in range(count):
        if i != 7:
            assert by_path[f"d/f{i}.txt"]["status"] == "ok"
            assert (remote_dir / "d" / f"f{i}.txt").read_text() == f"file {i}\n"
    assert not [p for p in remote_dir.rglob("*.leftpart")]
    assert result.exit_code == 1
    with_perl = count >= sftp.SHELL_RENAMES and shutil.which("perl") is not None
    assert used == [True if with_perl else None]
