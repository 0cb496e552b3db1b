"""The fast paths of a transfer against a real sshd: the receiving side hashing a large
partial while it arrives, and the fallback to a hash after the close when it cannot."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from leftssh import cli, execute
from leftssh.errors import ChangedError, TransferError
from leftssh.ignore import IgnoreRules
from leftssh.paths import UnsafePath
from leftssh.transport import remote_shell, sftp
from leftssh.transport.local import LocalTransport
from leftssh.transport.remote_shell import FOLLOW_BLOCK
from leftssh.transport.sftp import SFTPTransport
from tests.helpers import PERL_MD5, cli_json, record_calls
from tests.sshd import Sshd

pytestmark = pytest.mark.usefixtures("sshd")


def _write_all(t: SFTPTransport, name: str, data: bytes, offset: int = 0) -> str | None:
    out = t.open_write(name, offset, (1_700_000_000, 0o640), follow=True)
    view = memoryview(data)
    for at in range(offset, len(data), 300_000):
        out.write(bytes(view[at : at + 300_000]))
    out.close()
    return out.md5  # type: ignore[attr-defined]


def test_follower_hashes_the_partial_while_it_is_written(remote, monkeypatch) -> None:
    t, root = remote
    monkeypatch.setattr(sftp, "FOLLOW_STEP", FOLLOW_BLOCK)
    monkeypatch.setattr(sftp, "WRITE_AHEAD", FOLLOW_BLOCK)  # acknowledgements come early
    asks = record_calls(monkeypatch, sftp._Follower, "_ask")
    data = os.urandom(5 * FOLLOW_BLOCK + 4321)
    assert _write_all(t, ".big.leftpart", data) == hashlib.md5(data).hexdigest()
    assert (root / ".big.leftpart").read_bytes() == data
    # Ranges were asked for while the file was still being written, not only at the end.
    asked = [upto for (upto,) in asks]
    assert len(asked) >= 2 and asked[-1] == 6, asked


@pytest.mark.parametrize("perl", [True, False], ids=["perl", "dd"])
def test_follower_reads_with_perl_when_the_peer_has_it(remote, monkeypatch, perl: bool) -> None:
    """The follower is one perl when the peer's perl has Digest::MD5, else dd and md5sum."""
    t, root = remote
    if perl and not PERL_MD5:
        pytest.skip("perl with Digest::MD5 not installed")
    if not perl:
        monkeypatch.setattr(remote_shell, "FOLLOW_PERL_PROBE", "no-such-perl-here </dev/null")
    monkeypatch.setattr(sftp, "FOLLOW_STEP", FOLLOW_BLOCK)
    real, used = remote_shell.follow_hash_command, []

    def spy(tool, root_arg: str, path: str, with_perl: bool = False) -> str:  # noqa: ANN001
        used.append(with_perl)
        return real(tool, root_arg, path, with_perl)

    monkeypatch.setattr(remote_shell, "follow_hash_command", spy)
    data = os.urandom(3 * FOLLOW_BLOCK + 777)
    assert _write_all(t, ".big.leftpart", data) == hashlib.md5(data).hexdigest()
    assert used == [perl]


def test_follower_covers_the_resumed_prefix(remote, monkeypatch) -> None:
    t, root = remote
    monkeypatch.setattr(sftp, "FOLLOW_STEP", FOLLOW_BLOCK)
    data = os.urandom(4 * FOLLOW_BLOCK + 99)
    have = 2 * FOLLOW_BLOCK + 17
    (root / ".big.leftpart").write_bytes(data[:have] + b"stale tail to be cut")
    assert _write_all(t, ".big.leftpart", data, offset=have) == hashlib.md5(data).hexdigest()
    assert (root / ".big.leftpart").read_bytes() == data


def test_follower_sees_what_is_on_disk_not_what_was_sent(remote, monkeypatch) -> None:
    """A byte changed in the partial behind the writer's back changes the peer's hash."""
    t, root = remote
    monkeypatch.setattr(sftp, "FOLLOW_STEP", 1 << 40)  # everything is hashed at close
    data = os.urandom(3 * FOLLOW_BLOCK)
    out = t.open_write(".big.leftpart", 0, None, follow=True)
    out.write(data)
    with open(root / ".big.leftpart", "r+b") as f:  # flip one byte once it is on disk
        f.seek(10)
        f.write(bytes([data[10] ^ 1]))
    out.close()
    assert out.md5 not in (None, hashlib.md5(data).hexdigest())  # type: ignore[attr-defined]


def _push(sshd: Sshd, local: Path, remote_dir: Path, state: Path, *extra: str) -> list[dict]:
    result = CliRunner().invoke(
        cli.main_group,
        [
            "push",
            sshd.target(str(remote_dir)),
            "-d",
            str(local),
            "--json",
            *extra,
            *sshd.cli_args(),
        ],
        env={"LEFTSSH_STATE_DIR": str(state)},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("peer_hash", ["agrees", "disagrees", "missing"])
def test_push_uses_the_peer_hash_and_falls_back_when_it_is_not_right(
    sshd: Sshd, tmp_path: Path, monkeypatch, peer_hash: str
) -> None:
    monkeypatch.setattr(execute, "FOLLOW_MIN", 2 * FOLLOW_BLOCK)
    monkeypatch.setattr(sftp, "FOLLOW_STEP", FOLLOW_BLOCK)
    if peer_hash != "agrees":
        forged = "0" * 32 if peer_hash == "disagrees" else None
        monkeypatch.setattr(sftp._Follower, "finish", lambda self, size: self.abort() or forged)
    hashed: list[str] = []
    real_hash = SFTPTransport.hash_files

    def spy(self: SFTPTransport, paths: list[str]) -> dict[str, str]:
        hashed.extend(paths)
        return real_hash(self, paths)

    monkeypatch.setattr(SFTPTransport, "hash_files", spy)
    local, remote_dir = tmp_path / "share", tmp_path / "peer"
    local.mkdir()
    big, small = os.urandom(3 * FOLLOW_BLOCK + 5), b"small file\n"
    (local / "big.bin").write_bytes(big)
    (local / "small.txt").write_bytes(small)
    records = _push(sshd, local, remote_dir, tmp_path / "state")
    done = {r["path"]: r for r in records if "path" in r}
    assert done["big.bin"]["status"] == "ok" and done["big.bin"]["verified"] == "md5"
    assert done["small.txt"]["verified"] == "md5"
    assert (remote_dir / "big.bin").read_bytes() == big
    assert (remote_dir / "small.txt").read_bytes() == small
    big_hashed_after = any("big.bin" in p for p in hashed)
    assert big_hashed_after is (peer_hash != "agrees"), hashed
    assert any("small.txt" in p for p in hashed)


def test_rename_new_never_replaces_a_name_that_appeared(remote) -> None:
    t, root = remote
    for name in ("one", "two", "three"):
        (root / f".{name}.leftpart").write_bytes(name.encode())
    (root / "two").write_bytes(b"appeared since the scan")
    failed = t.rename_new([(f".{n}.leftpart", n) for n in ("one", "two", "three")])
    assert set(failed) == {".two.leftpart"}
    assert (root / "one").read_bytes() == b"one" and (root / "three").read_bytes() == b"three"
    assert (root / "two").read_bytes() == b"appeared since the scan"
    assert (root / ".two.leftpart").exists()


def test_locks_appear_whole_and_leave_no_temporary_file(remote, tmp_path) -> None:
    """A lock file is linked or renamed into place already holding its holder, so a run
    killed while taking it never leaves an empty lock behind."""
    from leftssh.errors import LockError
    from leftssh.transport.local import LocalTransport

    t, root = remote
    local_root = tmp_path / "share"
    local_root.mkdir()
    local = LocalTransport(local_root)
    for side, where in ((t, root), (local, local_root)):
        side.acquire_lock("sync")
        assert json.loads((where / ".leftssh.lock").read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in where.iterdir()) == [".leftssh.lock"]
    # Held by another live process on this host: the next taker is refused, and cleans up.
    for side, where in ((t, root), (local, local_root)):
        held = json.loads((where / ".leftssh.lock").read_text())
        side.release_lock()
        held["pid"] = os.getppid()
        (where / ".leftssh.lock").write_text(json.dumps(held))
        with pytest.raises(LockError, match="locked by another leftssh run: pid"):
            side.acquire_lock("sync")
        assert sorted(p.name for p in where.iterdir()) == [".leftssh.lock"]


def test_the_remote_lock_takes_three_round_trips_and_reads_back_by_path(
    remote, monkeypatch
) -> None:
    """Taking the lock: the exclusive OPEN; the WRITE, CLOSE and an OPEN of the path;
    the READ, FSTAT and CLOSE. What is read back is whatever the path holds then: a
    lock another run put there meanwhile is seen, and the lock is not taken."""
    from leftssh import lock
    from leftssh.errors import LockError

    t, root = remote
    real = sftp._exchange
    batches: list[list[int]] = []

    def counted(client, requests):  # type: ignore[no-untyped-def]
        batches.append([kind for kind, _ in requests])
        return real(client, requests)

    monkeypatch.setattr(sftp, "_exchange", counted)
    t.acquire_lock("sync")
    assert batches == [
        [sftp.CMD_OPEN],
        [sftp.CMD_WRITE, sftp.CMD_CLOSE, sftp.CMD_OPEN],
        [sftp.CMD_READ, sftp.CMD_FSTAT, sftp.CMD_CLOSE],
    ]
    t.release_lock()
    other = lock.encode({**lock.holder_info("push"), "pid": os.getppid()})
    (root / ".leftssh.lock").write_bytes(other)
    batches.clear()
    with pytest.raises(LockError, match="locked by another leftssh run: pid"):
        t.acquire_lock("sync")
    assert batches == [
        [sftp.CMD_OPEN],
        [sftp.CMD_OPEN],
        [sftp.CMD_READ, sftp.CMD_FSTAT, sftp.CMD_CLOSE],
    ]
    (root / ".leftssh.lock").unlink()

    def racing(client, requests):  # type: ignore[no-untyped-def]
        if requests[0][0] == sftp.CMD_WRITE:  # another run replaced it before it was written
            (root / ".leftssh.lock").unlink()
            (root / ".leftssh.lock").write_bytes(other)
        return real(client, requests)

    monkeypatch.setattr(sftp, "_exchange", racing)
    with pytest.raises(LockError, match="took the lock at the same moment"):
        t.acquire_lock("sync")
    assert (root / ".leftssh.lock").read_bytes() == other
    # The other run has created its lock but not written it yet: not ours either.
    (root / ".leftssh.lock").unlink()
    other = b""
    with pytest.raises(LockError, match="took the lock at the same moment"):
        t.acquire_lock("sync")
    assert (root / ".leftssh.lock").read_bytes() == b""


def test_a_connection_lost_while_taking_the_lock_is_no_usage_error(remote, monkeypatch) -> None:
    """A refusal of the peer (a status) is a usage error; a connection that goes away
    while the lock is taken is a lost connection (exit 3), not "cannot lock"."""
    from leftssh.errors import ConnectError, UsageError

    t, root = remote
    real = sftp._exchange

    def cut(client, requests):  # type: ignore[no-untyped-def]
        if requests[0][0] == sftp.CMD_WRITE:
            raise OSError("Socket is closed")  # paramiko's words for a channel gone
        return real(client, requests)

    (root / ".leftssh.lock").mkdir()  # the peer refuses to open it: a status, not a loss
    with pytest.raises(UsageError, match="cannot lock"):
        t.acquire_lock("sync")
    (root / ".leftssh.lock").rmdir()
    monkeypatch.setattr(sftp, "_exchange", cut)
    with pytest.raises(ConnectError, match="connection lost"):
        t.acquire_lock("sync")


def test_a_lock_of_this_host_not_refreshed_for_long_is_stale_whoever_has_its_pid() -> None:
    """A holder on this machine refreshes its lock every HEARTBEAT seconds: one not
    refreshed for STALE_AFTER is dead, even if its pid now belongs to another process."""
    from leftssh import lock

    alive = {**lock.holder_info("sync"), "pid": os.getppid()}  # a live process, not us
    assert not lock.is_stale(alive, lock.HEARTBEAT)
    assert lock.is_stale(alive, lock.STALE_AFTER + 1)
    gone = {**alive, "pid": 2**22 + 12345}  # above any pid this machine hands out
    assert lock.is_stale(gone, 0)
    other = {**alive, "host": "another-machine"}
    assert not lock.is_stale(other, lock.STALE_AFTER - 1)
    assert lock.is_stale(other, lock.STALE_AFTER + 1)


@pytest.mark.parametrize("side_name", ["remote", "local"])
def test_a_lock_left_empty_by_a_killed_taker_is_cleared(remote, tmp_path, side_name) -> None:
    """Killed between creating and writing its lock, a run leaves an empty lock file:
    the next run waits briefly for a holder to appear, then takes the lock."""
    import threading
    import time

    from leftssh import lock
    from leftssh.errors import LockError
    from leftssh.transport.local import LocalTransport

    t, root = remote
    if side_name == "local":
        root = tmp_path / "share"
        root.mkdir()
        t = LocalTransport(root)
    (root / ".leftssh.lock").write_bytes(b"")
    started = time.monotonic()
    t.acquire_lock("sync")
    assert time.monotonic() - started >= lock.TORN_AFTER * 0.9
    assert json.loads((root / ".leftssh.lock").read_text())["pid"] == os.getpid()
    t.release_lock()
    # A taker that is only slow to write its lock is waited for, and then honoured.
    (root / ".leftssh.lock").write_bytes(b"")
    holder = {**lock.holder_info("push"), "pid": os.getppid()}
    late = threading.Timer(0.5, (root / ".leftssh.lock").write_bytes, [lock.encode(holder)])
    late.start()
    with pytest.raises(LockError, match=f"pid {os.getppid()}"):
        t.acquire_lock("sync")
    late.join()


def test_read_whole_reads_a_small_file_in_one_go_and_reports_its_size(tmp_path) -> None:
    from leftssh.transport.local import LocalTransport

    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "small").write_bytes(b"abc")
    (tmp_path / "big").write_bytes(b"x" * 300_000)
    os.utime(tmp_path / "small", (1_600_000_000, 1_600_000_000))
    t = LocalTransport(tmp_path)
    assert t.read_whole("empty", 1) == (b"", 0, int((tmp_path / "empty").stat().st_mtime))
    assert t.read_whole("small", 4) == (b"abc", 3, 1_600_000_000)
    # A file longer than the scan said: at most ``limit`` bytes, and the size it has now.
    assert t.read_whole("small", 2) == (b"ab", 3, 1_600_000_000)
    data, size, _ = t.read_whole("big", 300_001)
    assert data == b"x" * 300_000 and size == 300_000


def test_read_whole_keeps_its_directory_and_never_reads_through_a_symlink(tmp_path) -> None:
    """The directory of consecutive reads is opened once; swapped for a symlink after
    that, the reads still come from the directory that was checked, and a directory
    that is a symlink when first opened is refused."""
    share, outside = tmp_path / "share", tmp_path / "outside"
    (share / "d").mkdir(parents=True)
    outside.mkdir()
    (share / "d" / "a").write_bytes(b"inside a")
    (share / "d" / "b").write_bytes(b"inside b")
    (outside / "b").write_bytes(b"SECRET")
    (outside / "c").write_bytes(b"SECRET")
    t = LocalTransport(share)
    opened: list[str] = []
    real = t._open_dir

    def spy(rel_dir: str) -> int:
        opened.append(rel_dir)
        return real(rel_dir)

    t._open_dir = spy  # type: ignore[method-assign]
    assert t.read_whole("d/a", 100)[0] == b"inside a"
    (share / "d").rename(tmp_path / "moved")
    (share / "d").symlink_to(outside, target_is_directory=True)
    assert t.read_whole("d/b", 100)[0] == b"inside b"  # the directory that was checked
    assert opened == ["d"]
    with pytest.raises(UnsafePath):  # a read from another thread opens its own: refused
        with ThreadPoolExecutor(1) as pool:
            pool.submit(t.read_whole, "d/c", 100).result()
    t.close()
    t = LocalTransport(share)
    with pytest.raises(UnsafePath):
        t.read_whole("d/c", 100)
    t.close()


class _FakeChannel:
    """Stands for the SFTP channel of a client: gives back prepared answer bytes."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        self.data, self.piece, self.sent = data, piece, b""

    def recv(self, n: int) -> bytes:
        out, self.data = self.data[: min(n, self.piece)], self.data[min(n, self.piece) :]
        return out

    def recv_ready(self) -> bool:
        return bool(self.data)


def _fake_client(answers: bytes) -> object:
    import threading

    import paramiko

    client = paramiko.SFTPClient.__new__(paramiko.SFTPClient)
    client.sock = _FakeChannel(answers)
    client._lock = threading.Lock()
    client.request_number = 40
    client.logger = paramiko.util.get_logger("test")

    def write_all(data: bytes) -> None:
        client.sock.sent += data

    client._write_all = write_all
    return client


def _answer(t: int, num: int, body: bytes) -> bytes:
    import struct

    return struct.pack(">IBI", len(body) + 5, t, num) + body


def test_pipeline_routes_answers_by_id_and_refuses_strangers() -> None:
    import struct

    import paramiko
    from paramiko.sftp import CMD_HANDLE, CMD_NAME, CMD_REALPATH, CMD_STATUS

    status = lambda code, text: struct.pack(">I", code) + struct.pack(">I", len(text)) + text  # noqa: E731
    answers = (
        _answer(CMD_HANDLE, 41, struct.pack(">I", 2) + b"h1")  # out of order
        + _answer(CMD_STATUS, 40, status(2, b"no such file") + struct.pack(">I", 0))
        + _answer(CMD_NAME, 42, struct.pack(">I", 1) + struct.pack(">I", 4) + b"/abc")
    )
    got: list[tuple[int, object]] = []

    def keep(t: int, msg: object, error: object) -> None:
        got.append((t, error if error is not None else msg.get_binary()))  # type: ignore[union-attr]

    pipe = sftp._Pipeline(_fake_client(answers))  # type: ignore[arg-type]
    pipe.send(keep, CMD_REALPATH, "/missing")
    pipe.send(keep, CMD_REALPATH, "/open-me")
    pipe.send(keep, CMD_REALPATH, "/resolve")
    pipe.drain()
    assert isinstance(got[0][1], FileNotFoundError)
    assert got[1] == (CMD_HANDLE, b"h1")
    assert got[2][0] == CMD_NAME
    # Three requests went out in one write, each with its own id.
    sent = pipe._sftp.sock.sent  # type: ignore[attr-defined]
    ids, at = [], 0
    while at < len(sent):
        (size,) = struct.unpack_from(">I", sent, at)
        ids.append(struct.unpack_from(">I", sent, at + 5)[0])
        at += 4 + size
    assert ids == [40, 41, 42]

    for bad in (_answer(CMD_HANDLE, 99, b"x"), struct.pack(">I", 2) + b"\x65\x00"):
        pipe = sftp._Pipeline(_fake_client(bad))  # type: ignore[arg-type]
        pipe.send(keep, CMD_REALPATH, "/x")
        with pytest.raises(paramiko.SSHException):
            pipe.drain()


def test_version_stem_groups_the_partials_of_one_file() -> None:
    from leftssh.paths import partial_name, version_tag

    old = partial_name("d/a.txt", version_tag(10, 1_600_000_000))
    new = partial_name("d/a.txt", version_tag(12, 1_700_000_000))
    other = partial_name("d/a.txt.bak", version_tag(10, 1_600_000_000))
    assert execute._version_stem(old) == execute._version_stem(new) is not None
    assert execute._version_stem(other) != execute._version_stem(old)
    assert execute._version_stem("d/a.txt") is None
    assert execute._version_stem("d/.a.x/y.leftpart") is None  # a tag never holds '/'


# -- one shell for the run ------------------------------------------------------------------


def _tree(root: Path, count: int) -> dict[str, str]:
    sums = {}
    for i in range(count):
        name = f"d{i % 3}/it's {i}\n.txt"
        (root / name).parent.mkdir(exist_ok=True)
        data = os.urandom(i * 7)
        (root / name).write_bytes(data)
        sums[name] = hashlib.md5(data).hexdigest()
    return sums


def test_one_shell_answers_the_probe_and_every_hash_batch(remote, monkeypatch) -> None:
    t, root = remote
    monkeypatch.setattr(sftp, "_HASH_BATCH", 7)
    sums = _tree(root, 40)
    assert t.can_hash()
    assert t.hash_files(sorted(sums)) == sums
    assert t.hash_files(sorted(sums)[:3] + ["missing"]) == {p: sums[p] for p in sorted(sums)[:3]}
    assert len(t._all_shells) == 1 and t._all_shells[0].alive


def test_hashes_asked_at_once_get_shells_of_their_own(remote) -> None:
    t, root = remote
    sums = _tree(root, 30)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: t.hash_files(sorted(sums)), range(6)))
    assert answers == [sums] * 6
    assert 1 <= len(t._all_shells) <= 3
    assert sorted(t._shells, key=id) == sorted(t._all_shells, key=id)  # all idle again


def test_a_shell_that_went_away_is_replaced(remote) -> None:
    t, root = remote
    sums = _tree(root, 5)
    assert t.hash_files(sorted(sums)) == sums
    done, out = t._ask_shell("exit 3", "test")
    assert (done, out) == (False, b"")
    assert not t._all_shells[0].alive and t._shells == []
    assert t.hash_files(sorted(sums)) == sums
    assert len(t._all_shells) == 2 and t._all_shells[1].alive


def test_the_connection_acknowledges_at_once_and_sends_without_delay(remote) -> None:
    t, _ = remote
    sock = t._t.sock
    if sftp._QUICKACK is not None:
        assert isinstance(sock, sftp._AckingSocket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# -- listing ----------------------------------------------------------------------------


def test_the_remote_listing_sees_what_a_local_scan_sees(remote) -> None:
    """Many directories listed ahead, nested .leftignore files read between listings,
    odd names: the SFTP scan and the local scan of the same tree agree."""
    t, root = remote
    for d in range(70):
        sub = root / f"d{d:02}" / "inner"
        sub.mkdir(parents=True)
        for i in range(5):
            (sub.parent / f"f{i}.txt").write_bytes(b"x" * (d * 5 + i))
        (sub / "deep.bin").write_bytes(b"deep")
        if d % 9 == 0:
            (sub.parent / ".leftignore").write_text("f1.txt\ninner/\n")
    (root / "it's a\nnewline \u00e9").write_text("odd")
    (root / ("long" * 60)).write_text("long name")
    (root / "link").symlink_to("d00")
    (root / ".x.abc.leftpart").write_text("partial")
    rules = IgnoreRules.from_project(root)
    got, want = t.scan(rules), LocalTransport(root).scan(rules)
    assert got.entries == want.entries
    assert got.ignore_files == want.ignore_files and len(got.ignore_files) == 8
    assert sorted(got.skipped, key=str) == sorted(want.skipped, key=str)
    assert got.partials == want.partials
    assert "d09/f1.txt" not in got.entries and "d09/inner" not in got.entries
    assert "d10/f1.txt" in got.entries and "d10/inner/deep.bin" in got.entries


def _probe_held_back(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make the md5 probe (and anything waiting for it) wait until the event is set."""
    gate = threading.Event()
    real_tool = SFTPTransport._hash_tool

    def slow_tool(self: SFTPTransport):  # noqa: ANN202
        gate.wait(30)
        return real_tool(self)

    monkeypatch.setattr(SFTPTransport, "_hash_tool", slow_tool)
    return gate


def test_a_follower_that_starts_late_catches_up(remote, monkeypatch) -> None:
    """Writing starts before the md5 probe answers; the peer's hash joins when it does,
    asks at once for everything acknowledged so far, and still covers the whole file."""
    t, root = remote
    monkeypatch.setattr(sftp, "FOLLOW_STEP", FOLLOW_BLOCK)
    monkeypatch.setattr(sftp, "WRITE_AHEAD", FOLLOW_BLOCK)
    gate = _probe_held_back(monkeypatch)
    asked: list[tuple[int, int]] = []
    real_ask = sftp._Follower._ask

    def spy(self: sftp._Follower, upto: int) -> None:
        asked.append((self._blocks, upto))
        real_ask(self, upto)

    monkeypatch.setattr(sftp._Follower, "_ask", spy)
    data = os.urandom(6 * FOLLOW_BLOCK + 321)
    out = t.open_write(".late.leftpart", 0, (1_700_000_000, 0o640), follow=True)
    view = memoryview(data)
    half = 14 * 300_000  # about 4 MiB, written while the probe is out
    for at in range(0, half, 300_000):
        out.write(bytes(view[at : at + 300_000]))
    assert out.follower is None and out.joining is not None
    gate.set()
    for at in range(half, len(data), 300_000):
        out.write(bytes(view[at : at + 300_000]))
    out.close()
    assert out.md5 == hashlib.md5(data).hexdigest()
    assert (root / ".late.leftpart").read_bytes() == data
    assert asked[0][0] == 0 and asked[0][1] >= 2, asked  # the catch-up: many blocks at once
    assert asked[-1][1] == 7


def test_a_late_follower_of_an_abandoned_write_is_stopped(remote, monkeypatch) -> None:
    t, root = remote
    gate = _probe_held_back(monkeypatch)
    aborted = threading.Event()
    real_abort = sftp._Follower.abort

    def spy(self: sftp._Follower) -> None:
        aborted.set()
        real_abort(self)

    monkeypatch.setattr(sftp._Follower, "abort", spy)
    out = t.open_write(".gone.leftpart", 0, None, follow=True)
    out.write(b"x" * 1000)
    out._drop_follower()  # as a failed write does
    gate.set()
    assert aborted.wait(10)
    out.close()
    assert out.md5 is None


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_large_copies_start_before_the_md5_probe_answers(
    sshd: Sshd, tmp_path: Path, monkeypatch, direction: str
) -> None:
    """A slow probe (a login shell that takes its time) does not hold the first large
    copy back; the copy still ends up MD5-verified."""
    monkeypatch.setattr(execute, "FOLLOW_MIN", 2 * FOLLOW_BLOCK)
    events: list[str] = []
    real_tool = SFTPTransport._hash_tool

    def slow_tool(self: SFTPTransport):  # noqa: ANN202
        if not self._probed:
            time.sleep(1.0)
        tool = real_tool(self)
        events.append("probed")
        return tool

    monkeypatch.setattr(SFTPTransport, "_hash_tool", slow_tool)
    for cls in (SFTPTransport, LocalTransport):
        real_open = cls.open_write

        def spy(self, *args, _real=real_open, **kwargs):  # noqa: ANN001, ANN202
            events.append("open_write")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "open_write", spy)
    local, remote_dir = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote_dir.mkdir()
    data = os.urandom(3 * FOLLOW_BLOCK + 5)
    (local if direction == "push" else remote_dir).joinpath("big.bin").write_bytes(data)
    result = CliRunner().invoke(
        cli.main_group,
        [direction, sshd.target(str(remote_dir)), "-d", str(local), "--json", *sshd.cli_args()],
        env={"LEFTSSH_STATE_DIR": str(tmp_path / "state")},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.output.splitlines() if '"action"' in line]
    assert record["verified"] == "md5" and record["status"] == "ok", record
    assert events.index("open_write") < events.index("probed"), events
    assert (local / "big.bin").read_bytes() == (remote_dir / "big.bin").read_bytes() == data


def test_an_answer_cut_off_by_a_dying_shell_is_not_trusted(remote, monkeypatch) -> None:
    """A hash batch whose shell goes away before its marker gives no hash at all, even
    for the lines that came through; the next batch gets a new shell."""
    t, root = remote
    sums = _tree(root, 4)
    names = sorted(sums)
    real_script = sftp.remote_shell.hash_script
    cut = {"once": True}

    def dying(tool, base, paths):  # noqa: ANN001, ANN202
        script = real_script(tool, base, paths)
        if cut.pop("once", False):
            return script + b"; exit 0"  # the answers, then the shell is gone
        return script

    monkeypatch.setattr(sftp.remote_shell, "hash_script", dying)
    assert t.can_hash()
    assert t.hash_files(names) == {}
    assert t.hash_files(names) == sums


def test_stat_many_says_what_stat_says(remote, tmp_path) -> None:
    t, root = remote
    (root / "dir").mkdir()
    for i, mode in enumerate((0o644, 0o600, 0o755, 0o000)):
        (root / f"f{i} 'x'").write_bytes(b"x" * i * 1000)
        os.utime(root / f"f{i} 'x'", (1_600_000_000 + i, 1_600_000_000 + i))
        (root / f"f{i} 'x'").chmod(mode)
    (root / "link").symlink_to(tmp_path)  # looked at, not followed
    os.mkfifo(root / "fifo")
    paths = ["dir", "link", "fifo", "missing", "dir/missing"] + [f"f{i} 'x'" for i in range(4)]
    paths += [f"dir/none{i}" for i in range(600)]  # more than the requests kept in flight
    many = t.stat_many(paths)
    assert many == {p: t.stat(p) for p in paths}
    assert many["f3 'x'"].size == 3000 and many["f3 'x'"].mode == 0
    assert many["link"].kind == "other" and many["missing"] is None
    assert t.stat_many([]) == {}
    # Not a missing path: an error, as stat gives it (a path longer than PATH_MAX).
    deep = "/".join(["d" * 250] * 20)
    with pytest.raises(TransferError):
        t.stat(deep)
    with pytest.raises(TransferError):
        t.stat_many(["dir", deep])


def test_size_verification_takes_only_a_regular_file(
    sshd: Sshd, tmp_path: Path, monkeypatch
) -> None:
    """An empty file's partial swapped for a FIFO (size 0 too) is no copy of it."""
    real_many = SFTPTransport.stat_many

    def swapped(self: SFTPTransport, paths: list[str]):  # type: ignore[no-untyped-def]
        for p in paths:
            if "empty" in p:
                (remote_dir / p).unlink()
                os.mkfifo(remote_dir / p)
        return real_many(self, paths)

    monkeypatch.setattr(SFTPTransport, "stat_many", swapped)
    local, remote_dir = tmp_path / "share", tmp_path / "peer"
    local.mkdir()
    (local / "empty").write_bytes(b"")
    (local / "full").write_bytes(b"full\n")
    result = CliRunner().invoke(
        cli.main_group,
        ["push", sshd.target(str(remote_dir)), "-d", str(local), "--json", "--verify", "size",
         *sshd.cli_args()],
        env={"LEFTSSH_STATE_DIR": str(tmp_path / "state")},
        catch_exceptions=False,
    )  # fmt: skip
    records = {r["path"]: r for r in map(json.loads, result.output.splitlines()) if "path" in r}
    assert records["empty"]["status"] == "failed", records
    assert "verification failed twice" in records["empty"]["error"]
    assert records["full"]["status"] == "ok" and (remote_dir / "full").read_bytes() == b"full\n"
    assert not (remote_dir / "empty").exists()
    assert result.exit_code == 1


def test_size_verification_asks_the_peer_once_per_batch(
    sshd: Sshd, tmp_path: Path, monkeypatch
) -> None:
    stats = record_calls(monkeypatch, SFTPTransport, "stat")
    stat_manys = record_calls(monkeypatch, SFTPTransport, "stat_many")
    local, remote_dir = tmp_path / "share", tmp_path / "peer"
    (local / "d").mkdir(parents=True)
    for i in range(50):
        (local / "d" / f"f{i}.txt").write_text(f"file {i}\n" * i)
    records = _push(sshd, local, remote_dir, tmp_path / "state", "--verify", "size")
    done = [r for r in records if r.get("path", "").startswith("d/f")]
    assert len(done) == 50
    assert all(r["status"] == "ok" and r["verified"] == "size" for r in done), done
    calls = {
        "stat": sum(path.endswith(".leftpart") for (path,) in stats),
        "stat_many": len(stat_manys),
    }
    assert calls == {"stat": 0, "stat_many": 1}
    for i in range(50):
        assert (remote_dir / "d" / f"f{i}.txt").read_text() == f"file {i}\n" * i


def test_make_dirs_with_requests_in_flight(remote, tmp_path) -> None:
    t, root = remote
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "exists").mkdir()
    (root / "file").write_text("in the way")
    (root / "link").symlink_to(outside)  # a directory swapped for a symlink after the scan
    paths = ["a", "exists", "file", "a/b", "link/x", "gone/x", "a/b/c", "a/b/c/d"]
    failed = t.make_dirs(paths)
    assert set(failed) == {"file", "link/x", "gone/x"}
    assert isinstance(failed["file"], ChangedError)
    assert isinstance(failed["link/x"], UnsafePath)
    assert isinstance(failed["gone/x"], TransferError)
    assert (root / "a" / "b" / "c" / "d").is_dir() and (root / "exists").is_dir()
    assert (root / "file").read_text() == "in the way"
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("peer_holds", "extra", "expected"),
    [
        (False, [], [True]),  # everything goes there: the shell is started early
        (False, ["--verify", "size"], [False]),  # no md5 probe then
        (True, [], []),  # the peer holds files: nothing started ahead
        (False, ["--dry-run"], []),
    ],
    ids=["empty-peer", "verify-size", "peer-holds-files", "dry-run"],
)
def test_the_shell_starts_early_when_the_peer_share_is_empty(
    sshd: Sshd, tmp_path: Path, monkeypatch, peer_holds: bool, extra: list[str], expected
) -> None:
    local, remote_dir = tmp_path / "share", tmp_path / "peer"
    (local / "d").mkdir(parents=True)
    for i in range(5):
        (local / "d" / f"f{i}.txt").write_text(f"file {i}\n")
    remote_dir.mkdir()
    if peer_holds:
        (remote_dir / "other.txt").write_text("there\n")
    calls: list[bool] = []
    real = SFTPTransport.warm_up

    def warm_up(self: SFTPTransport, hashes: bool) -> None:
        calls.append(hashes)
        real(self, hashes)

    monkeypatch.setattr(SFTPTransport, "warm_up", warm_up)
    result = CliRunner().invoke(
        cli.main_group,
        ["push", sshd.target(str(remote_dir)), "-d", str(local), "-q", *extra, *sshd.cli_args()],
        env={"LEFTSSH_STATE_DIR": str(tmp_path / "state")},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert calls == expected
    copied = (remote_dir / "d" / "f3.txt").exists()
    assert copied is ("--dry-run" not in extra)


@pytest.mark.parametrize("hashes", [True, False])
def test_warm_up_asks_about_tar_and_perl_before_they_are_needed(remote, hashes: bool) -> None:
    """Asked later, these probes would wait behind the unpacking of archives."""
    t, _ = remote
    t.warm_up(hashes)
    for thread in threading.enumerate():
        if thread.name == "sftp-warm-up":
            thread.join(30)
    assert t._tar is not None
    assert t._perl is (shutil.which("perl") is not None)
    assert t._perl_md5 is (PERL_MD5 if hashes else None)
    assert t._probed is hashes


def test_a_local_partial_is_cut_only_past_its_proven_prefix(tmp_path: Path, monkeypatch) -> None:
    """A fresh partial is never truncated to 0 (on ext4 that makes close() write the
    whole file out); a resumed one loses its tail past the offset and nothing else."""
    t = LocalTransport(tmp_path)
    cuts: list[tuple[int, int]] = []
    real = os.ftruncate
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: cuts.append((fd, n)) or real(fd, n))
    with t.open_write(".a.leftpart", 0) as out:
        out.write(b"fresh data")
    assert cuts == []
    assert (tmp_path / ".a.leftpart").read_bytes() == b"fresh data"
    (tmp_path / ".b.leftpart").write_bytes(b"proven|stale tail")
    with t.open_write(".b.leftpart", 6) as out:
        out.write(b"+new")
    assert [n for _, n in cuts] == [6]
    assert (tmp_path / ".b.leftpart").read_bytes() == b"proven+new"


def test_get_files_reads_many_files_in_one_pipeline(remote) -> None:
    """Every size around the request size, hostile names, in order, one past the size."""
    t, root = remote
    request = t._request_sizes(t.client())[0]
    sizes = [0, 1, 4095, request - 1, request, request + 1, 256 << 10]
    names = ["plain.txt", "with space.txt", "$(touch pwned)", "new\nline", "ünï 名前", "-rf"]
    files: dict[str, bytes] = {}
    for i in range(300):
        name = f"d{i % 7}/{names[i % len(names)]}.{i}"
        files[name] = os.urandom(sizes[i % len(sizes)])
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(files[name])
        os.utime(root / name, (1_700_000_000 + i, 1_700_000_000 + i))
    asked = list(files)
    got = list(t.get_files((p, len(files[p])) for p in asked))
    assert [path for path, *_ in got] == asked
    for i, (path, data, size, mtime) in enumerate(got):
        assert data == files[path], path
        assert (size, mtime) == (len(files[path]), 1_700_000_000 + i)
    # A file longer than listed gives one byte past the listed size, and its real size.
    (root / "grown").write_bytes(b"x" * 100)
    ((_, data, size, _),) = t.get_files([("grown", 10)])
    assert (data, size) == (b"x" * 11, 100)
    assert not list(root.rglob("pwned"))


def test_get_files_reports_each_failure_and_goes_on(remote, tmp_path: Path) -> None:
    t, root = remote
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not to be read")
    (root / "ok1").write_bytes(b"one")
    (root / "link").symlink_to(outside / "secret")
    (root / "dir").mkdir()
    (root / "sub").symlink_to(outside)
    (root / "ok2").write_bytes(b"two")
    items = [("ok1", 3), ("missing", 5), ("link", 14), ("sub/secret", 14), ("dir", 0), ("ok2", 3)]
    got = {path: (data, size) for path, data, size, _ in t.get_files(items)}
    assert got["ok1"] == (b"one", 3) and got["ok2"] == (b"two", 3)
    for bad in ("missing", "link", "sub/secret", "dir"):
        assert isinstance(got[bad][0], TransferError), (bad, got[bad])
        assert got[bad][1] == -1
    assert "outside" in str(got["link"][0]) and "outside" in str(got["sub/secret"][0])


def test_get_files_closed_early_leaves_the_connection_usable(remote) -> None:
    t, root = remote
    for i in range(600):
        (root / f"f{i}").write_bytes(b"%d" % i)
    got = t.get_files((f"f{i}", len(b"%d" % i)) for i in range(600))
    assert next(got)[:2] == ("f0", b"0")
    got.close()  # every handle still open is closed
    assert [d for _, d, _, _ in t.get_files([("f599", 3)])] == [b"599"]
    assert t.stat("f7") is not None


def _pull(
    sshd: Sshd, local: Path, remote_dir: Path, state: Path
) -> tuple[int, str, dict[str, dict]]:
    """Pull through the CLI: exit code, output, and the JSON record of each path."""
    return cli_json(sshd, "pull", local, remote_dir, state)


def test_pull_of_many_small_files_goes_through_one_pipeline(
    sshd: Sshd, tmp_path: Path, monkeypatch
) -> None:
    """Through the CLI: every file arrives verified; one vanished on the peer after
    the listing fails alone through the one-file path."""
    local, remote_dir = tmp_path / "share", tmp_path / "peer"
    files = {f"d{i % 5}/f{i}.txt": os.urandom(i * 37 % 5000) for i in range(120)}
    for name, data in files.items():
        (remote_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (remote_dir / name).write_bytes(data)
    real = SFTPTransport.get_files
    asked: list[str] = []

    def spy(self: SFTPTransport, items):  # type: ignore[no-untyped-def]
        items = list(items)
        asked.extend(p for p, _ in items)
        (remote_dir / "d3" / "f3.txt").unlink(missing_ok=True)  # gone since the listing
        return real(self, items)

    monkeypatch.setattr(SFTPTransport, "get_files", spy)
    one_by_one = record_calls(monkeypatch, SFTPTransport, "read_chunks")
    code, output, records = _pull(sshd, local, remote_dir, tmp_path / "state")
    assert sorted(asked) == sorted(files)
    assert [path for path, *_ in one_by_one] == ["d3/f3.txt"]
    assert records["d3/f3.txt"]["status"] == "failed"
    assert code == 1
    for name, data in files.items():
        if name != "d3/f3.txt":
            assert records[name]["status"] == "ok" and records[name]["verified"] == "md5"
            assert (local / name).read_bytes() == data
            assert int((local / name).stat().st_mtime) == int((remote_dir / name).stat().st_mtime)
    assert not list(local.rglob("*.leftpart"))


def test_local_write_whole_and_rename_new(tmp_path: Path) -> None:
    """The local halves of a pipelined download: a partial written whole with its
    mtime and mode (a symlink planted at its name replaced, not followed), then new
    names given together, a taken name never replaced."""
    share, outside = tmp_path / "share", tmp_path / "outside"
    (share / "d").mkdir(parents=True)
    outside.mkdir()
    (outside / "victim").write_text("must stay\n")
    (share / "d" / ".b.leftpart").symlink_to(outside / "victim")
    t = LocalTransport(share)
    t.write_whole("d/.a.leftpart", b"alpha", (1_700_000_000, 0o640))
    t.write_whole("d/.b.leftpart", memoryview(b"beta"), (1_700_000_001, 0o600))
    t.write_whole(".c.leftpart", b"", (1_700_000_002, 0o644))
    assert (outside / "victim").read_text() == "must stay\n"
    for name, data, mtime, mode in (
        ("d/.a.leftpart", b"alpha", 1_700_000_000, 0o640),
        ("d/.b.leftpart", b"beta", 1_700_000_001, 0o600),
        (".c.leftpart", b"", 1_700_000_002, 0o644),
    ):
        st = (share / name).lstat()
        assert (share / name).read_bytes() == data
        assert (int(st.st_mtime), st.st_mode & 0o777) == (mtime, mode)
    (share / "d" / "b").write_text("appeared since the scan\n")
    failed = t.rename_new(
        [("d/.a.leftpart", "d/a"), ("d/.b.leftpart", "d/b"), (".c.leftpart", "c"),
         ("d/.gone.leftpart", "d/gone")]
    )  # fmt: skip
    assert set(failed) == {"d/.b.leftpart", "d/.gone.leftpart"}
    assert isinstance(failed["d/.b.leftpart"], ChangedError)
    assert isinstance(failed["d/.gone.leftpart"], TransferError)
    assert not isinstance(failed["d/.gone.leftpart"], ChangedError)  # left to commit()
    assert (share / "d" / "a").read_bytes() == b"alpha" and (share / "c").exists()
    assert not (share / "d" / ".a.leftpart").exists() and not (share / ".c.leftpart").exists()
    assert (share / "d" / "b").read_text() == "appeared since the scan\n"
    assert (share / "d" / ".b.leftpart").read_bytes() == b"beta"  # kept: the caller decides


def test_get_files_keeps_order_and_sends_short_answers_to_the_one_file_path(
    remote, monkeypatch
) -> None:
    t, root = remote
    blob = os.urandom(100_000)
    (root / "big").write_bytes(blob)
    (root / "small").write_bytes(b"small")
    got = [p for p, *_ in t.get_files([("big", len(blob)), ("missing", 5), ("small", 5)])]
    assert got == ["big", "missing", "small"]  # a failed open does not jump the queue
    real = sftp._data
    monkeypatch.setattr(sftp, "_data", lambda msg: real(msg)[:20_000])  # a server capping reads
    ((_, data, size, _),) = t.get_files([("big", len(blob))])
    assert isinstance(data, TransferError) and size == -1
    assert b"".join(bytes(b) for b in t.read_chunks("big", 0, len(blob))) == blob


def test_pull_goes_on_past_a_file_swapped_for_a_symlink_to_a_non_utf8_name(
    sshd: Sshd, tmp_path: Path, monkeypatch
) -> None:
    """An answer the pipeline cannot decode fails that file alone, nothing is read
    through the symlink, and the other files arrive."""
    local, remote_dir, outside = tmp_path / "share", tmp_path / "peer", tmp_path / "outside"
    outside.mkdir()
    target = os.path.join(os.fsencode(outside), b"secret-\xff")
    with open(target, "wb") as f:
        f.write(b"SECRET")
    remote_dir.mkdir()
    for i in range(20):
        (remote_dir / f"f{i}.txt").write_text(f"file {i}\n")
    real = SFTPTransport.get_files

    def swap(self: SFTPTransport, items):  # type: ignore[no-untyped-def]
        os.unlink(remote_dir / "f3.txt")
        os.symlink(target, os.fsencode(remote_dir / "f3.txt"))
        return real(self, items)

    monkeypatch.setattr(SFTPTransport, "get_files", swap)
    code, output, records = _pull(sshd, local, remote_dir, tmp_path / "state")
    assert code == 1, output
    assert records["f3.txt"]["status"] == "failed"
    for i in range(20):
        if i != 3:
            assert (local / f"f{i}.txt").read_text() == f"file {i}\n"
    assert not (local / "f3.txt").exists()
    assert not list(local.rglob("*.leftpart"))


def test_pull_does_not_place_a_source_rewritten_while_it_was_read(
    sshd: Sshd, tmp_path: Path, monkeypatch
) -> None:
    """A large remote file rewritten in place (same size, same bytes read, a new
    mtime) while it is read is reported changed and not placed, as an upload's
    source is: both sides re-check size and mtime after the copy."""
    local, remote_dir = tmp_path / "share", tmp_path / "peer"
    remote_dir.mkdir()
    big = remote_dir / "big.bin"
    data = os.urandom(600_000)
    big.write_bytes(data)
    os.utime(big, (1_700_000_000, 1_700_000_000))
    real = SFTPTransport.read_chunks

    def rewritten(self: SFTPTransport, path: str, offset: int, size=None, mtime=None):  # type: ignore[no-untyped-def]
        for n, block in enumerate(real(self, path, offset, size, mtime)):
            if n == 0:
                os.utime(big, (1_700_000_100, 1_700_000_100))
            yield block

    monkeypatch.setattr(SFTPTransport, "read_chunks", rewritten)
    code, _, records = _pull(sshd, local, remote_dir, tmp_path / "state")
    assert code == 1
    assert records["big.bin"]["status"] == "failed"
    assert "source changed during transfer" in records["big.bin"]["error"]
    assert not (local / "big.bin").exists()
    assert not list(local.rglob("*.leftpart"))
    monkeypatch.setattr(SFTPTransport, "read_chunks", real)
    code, _, records = _pull(sshd, local, remote_dir, tmp_path / "state")
    assert code == 0 and records["big.bin"]["status"] == "ok"
    assert (local / "big.bin").read_bytes() == data
    assert int((local / "big.bin").stat().st_mtime) == 1_700_000_100


def test_read_chunks_checks_the_open_file_against_the_listing(remote, tmp_path) -> None:
    """With the listed mtime, both transports check the size and mtime of the file they
    read (its handle, not its path) once its bytes are read."""
    from leftssh.errors import SourceChanged

    t, root = remote
    local = LocalTransport(tmp_path)
    for side, where in ((t, root), (local, tmp_path)):
        (where / "f.bin").write_bytes(b"x" * 70_000)
        os.utime(where / "f.bin", (1_700_000_000, 1_700_000_000))
        got = b"".join(bytes(b) for b in side.read_chunks("f.bin", 0, 70_000, 1_700_000_000))
        assert got == b"x" * 70_000
        with pytest.raises(SourceChanged):  # touched since the listing
            list(side.read_chunks("f.bin", 0, 70_000, 1_700_000_001))
        with pytest.raises(SourceChanged):  # grew since the listing
            list(side.read_chunks("f.bin", 0, 60_000, 1_700_000_000))
        assert len(b"".join(bytes(b) for b in side.read_chunks("f.bin", 0, 60_000))) == 60_001
