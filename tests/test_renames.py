"""Many partials renamed into place at once by the peer's perl: the script run for real
by each local shell, its output parsed, and ``rename_new`` against a real sshd with
and without perl on the peer."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from leftssh.errors import ChangedError
from leftssh.transport import remote_shell, sftp
from leftssh.transport.sftp import SFTPTransport
from tests.helpers import cli_json, record_calls
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
    pairs = [(f"p{i}", f"n{i}") for i in range(8)]
    out = b"noise\nleftssh-mv 0 ok\nleftssh-mv 1 EEXIST\nleftssh-mv 2 nf\nleftssh-mv 3 13\n"
    out += b"leftssh-mv 4 ok\n"
    out += b"leftssh-mv 99 ok\nleftssh-mv 5\nleftssh-mv 6 ok extra\n"  # out of range, broken
    out += b"leftssh-mv " + b"9" * 5000 + b" ok\nleftssh-mv 7 E" + b"X" * 500 + b"\n"  # absurd
    failed = remote_shell.parse_rename_output(out, pairs)
    assert failed == {1: "EEXIST", 2: "nf", 3: "13", 5: "?", 6: "?", 7: "?"}
    assert remote_shell.parse_rename_output(b"", pairs) == dict.fromkeys(range(8), "?")
    assert remote_shell.parse_perl_probe(b"motd\nleftssh-perl\n")
    assert not remote_shell.parse_perl_probe(b"sh: perl: not found\n")
    assert sftp._why("EEXIST") == os.strerror(errno.EEXIST)
    assert sftp._why("EBOGUS") == "error EBOGUS" and sftp._why("13") == "error 13"
    assert "gone" in sftp._why("nf")


@needs_perl
def test_rename_takes_the_name_back_when_the_partial_cannot_be_removed(tmp_path: Path) -> None:
    """As OpenSSH does: a new name whose partial stays is no new name (the partial,
    still linked to it, could later be written to in place)."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "FailUnlink.pm").write_text(
        "package FailUnlink; use Errno;\n"
        "BEGIN { *CORE::GLOBAL::unlink = sub { if ($_[0] =~ /^[.]stuck[.]leftpart$/) { $! = Errno::EACCES(); "
        "return 0 } CORE::unlink(@_) } }\n1;\n"
    )
    root = tmp_path / "share"
    root.mkdir()
    for name in (".stuck.leftpart", ".fine.leftpart"):
        (root / name).write_bytes(name.encode())
    pairs = [(".stuck.leftpart", "stuck"), (".fine.leftpart", "fine")]
    env = dict(os.environ, PERL5LIB=str(tmp_path / "lib"), PERL5OPT="-MFailUnlink")
    script = remote_shell.rename_script(str(root), pairs)
    result = _run(["sh", "-c"], script.decode(), cwd=tmp_path, env=env)
    assert remote_shell.parse_rename_output(result.stdout, pairs) == {0: "EACCES"}, result
    assert not (root / "stuck").exists()
    assert (root / ".stuck.leftpart").stat().st_nlink == 1
    assert (root / "fine").read_bytes() == b".fine.leftpart"


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
    assert failed == {taken: "EEXIST", gone: "nf", swapped: "nf"}, result
    for i, (partial, name) in enumerate(pairs):
        if i in failed:
            continue
        assert not (root / partial).exists()
        assert (root / name).read_bytes() == os.fsencode(name.rpartition("/")[2])
        assert (root / name).stat().st_nlink == 1
    assert (root / pairs[taken][1]).read_bytes() == b"appeared since the scan"
    assert (root / pairs[taken][0]).exists()  # kept: the caller decides
    assert not (root / pairs[swapped][1]).exists()  # the script never names a symlink
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
    # perl tells a taken name for sure; SFTP's failure is left to commit() to tell apart
    assert isinstance(failed[pairs[7][0]], ChangedError) is perl, failed
    assert (root / pairs[7][1]).read_bytes() == b"appeared since the scan"
    assert (root / pairs[7][0]).exists()
    for i, (partial, name) in enumerate(pairs):
        if i != 7:
            assert not (root / partial).exists()
            assert (root / name).read_bytes() == os.fsencode(name.rpartition("/")[2])


@pytest.mark.parametrize(
    "code",
    [
        "exit 0",  # a perl that died before a line: nothing is known of any pair
        "my $b = shift; for (my $i = 0; $i < @ARGV; $i += 2) { my $k = $b + $i / 2;"
        " print qq(leftssh-mv $k EPERM\\n) }",  # no hard links on this file system
    ],
    ids=["no-lines", "no-hard-links"],
)
def test_rename_new_falls_back_to_sftp_when_the_shell_cannot_rename(
    remote, monkeypatch, code: str
) -> None:
    """Pairs that perl did not do, or could not for want of hard links, go to SFTP."""
    t, root = remote
    t._perl = True
    monkeypatch.setattr(remote_shell, "_RENAME_PERL", code)
    pairs = _pairs_on_disk(root, 100, SCANNED)
    assert t.rename_new(pairs) == {}
    for partial, name in pairs:
        assert not (root / partial).exists() and (root / name).exists()


def test_perl_probe_says_no_without_perl(remote, monkeypatch) -> None:
    t, _ = remote
    monkeypatch.setattr(remote_shell, "PERL_PROBE", "no-such-perl-here </dev/null")
    assert t._perl_usable() is False


def _push(sshd: Sshd, local: Path, remote_dir: Path, state: Path) -> tuple[int, dict[str, dict]]:
    """Push through the CLI: the exit code, and the JSON record of each path."""
    code, _, records = cli_json(sshd, "push", local, remote_dir, state)
    return code, records


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
        used.append(len(pairs))
        return got

    monkeypatch.setattr(SFTPTransport, "rename_new", late_writer)
    real_shell = SFTPTransport._rename_in_shell
    left_to_sftp = []

    def counted(self: SFTPTransport, pairs, failed):  # type: ignore[no-untyped-def]
        left = real_shell(self, pairs, failed)
        left_to_sftp.append(len(left))
        return left

    monkeypatch.setattr(SFTPTransport, "_rename_in_shell", counted)
    code, by_path = _push(sshd, local, remote_dir, tmp_path / "state")
    assert by_path["d/f7.txt"]["status"] == "skipped", by_path["d/f7.txt"]
    assert "appeared since the scan" in by_path["d/f7.txt"]["reason"]
    assert (remote_dir / "d" / "f7.txt").read_text() == "written by someone else\n"
    for i in range(count):
        if i != 7:
            assert by_path[f"d/f{i}.txt"]["status"] == "ok"
            assert (remote_dir / "d" / f"f{i}.txt").read_text() == f"file {i}\n"
    assert not [p for p in remote_dir.rglob("*.leftpart")]
    assert code == 1
    with_perl = count >= sftp.SHELL_RENAMES and shutil.which("perl") is not None
    assert used == [count]  # one call for every new name
    assert left_to_sftp == ([0] if with_perl else [])  # perl gave every name it could


@needs_perl
def test_push_never_renames_a_partial_swapped_for_a_symlink(
    sshd: Sshd, tmp_path: Path, monkeypatch
) -> None:
    """perl refuses a partial that is no longer a regular file, and SFTP is not asked."""
    local, remote_dir, outside = tmp_path / "share", tmp_path / "peer", tmp_path / "outside"
    (local / "d").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("not to be shared\n")
    count = sftp.SHELL_RENAMES + 10
    for i in range(count):
        (local / "d" / f"f{i}.txt").write_text(f"file {i}\n")
    real_rename = SFTPTransport.rename_new

    def swapper(self: SFTPTransport, pairs: list[tuple[str, str]]) -> dict[str, Exception]:
        partial = dict((path, part) for part, path in pairs)["d/f9.txt"]
        (remote_dir / partial).unlink()
        (remote_dir / partial).symlink_to(outside / "secret")
        return real_rename(self, pairs)

    monkeypatch.setattr(SFTPTransport, "rename_new", swapper)
    commits = record_calls(monkeypatch, SFTPTransport, "commit")
    code, by_path = _push(sshd, local, remote_dir, tmp_path / "state")
    assert by_path["d/f9.txt"]["status"] == "failed", by_path["d/f9.txt"]
    assert "no longer a regular file" in by_path["d/f9.txt"]["error"]
    assert not (remote_dir / "d" / "f9.txt").is_symlink()
    assert not (remote_dir / "d" / "f9.txt").exists()
    assert commits == []  # nothing went to a plain SFTP rename
    assert (outside / "secret").read_text() == "not to be shared\n"
    for i in range(count):
        if i != 9:
            assert (remote_dir / "d" / f"f{i}.txt").read_text() == f"file {i}\n"
    assert code == 1
