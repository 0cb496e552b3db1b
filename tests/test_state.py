"""The base file: format 2 round trip, format 1 still read, damage refused, atomic save."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from leftssh.errors import UsageError
from leftssh.model import DIR, FILE, BaseEntry, Entry
from leftssh.reconcile import base_records, next_base, same_base
from leftssh.state import BaseStore
from tests.helpers import Result, write_file

PAIR = {"local": "/l", "user": "u", "host": "h", "port": 22, "remote": "share"}
MTIME = 1_700_000_000

BASE = {
    "a.txt": BaseEntry(FILE, None, (3, MTIME, 0o644), (3, MTIME, 0o644)),
    "dir": BaseEntry(DIR),
    "dir/b.bin": BaseEntry(FILE, "0" * 32, (1 << 40, MTIME + 1, 0o600), (1 << 40, MTIME, 0o600)),
    "only-local": BaseEntry(FILE, None, (0, 0, 0), None),
    "only-remote": BaseEntry(FILE, None, None, (5, MTIME, 0o755)),
    "end": BaseEntry(FILE, None, (1, 2, 3), (1, 2, 3)),
    "tab\there": BaseEntry(FILE, None, (1, 2, 3), (1, 2, 3)),
    "new\nline\r": BaseEntry(FILE, None, (1, 2, 3), (1, 2, 3)),
    '"quoted"': BaseEntry(FILE, None, (1, 2, 3), (1, 2, 3)),
    "back\\slash, comma": BaseEntry(FILE, None, (1, 2, 3), (1, 2, 3)),
    "ünïcødé/日本": BaseEntry(DIR),
    "not-utf8-\udcff": BaseEntry(FILE, None, (1, 2, 3), (1, 2, 3)),
}


def store(tmp_path: Path) -> BaseStore:
    return BaseStore("pair", PAIR, tmp_path)


def legacy_json(base: dict[str, BaseEntry]) -> str:
    """A base as format 1 wrote it: one JSON document."""
    entries = {
        p: [e.kind, e.md5, list(e.local) if e.local else None, list(e.remote) if e.remote else None]
        for p, e in sorted(base.items())
    }
    return json.dumps({"format": 1, "pair": PAIR, "entries": entries}, separators=(",", ":"))


def test_round_trip(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.load() is None
    s.save(BASE)
    assert s.load() == BASE
    lines = s.path.read_bytes().split(b"\n")
    assert json.loads(lines[0]) == {"format": 2, "pair": PAIR}
    assert lines[1].startswith(b'"\\"quoted\\""\t')  # sorted by path, odd names quoted
    assert lines[-1] == b"" and lines[-2].startswith(b"\tend\t12\t")
    assert [p.name for p in tmp_path.iterdir()] == ["pair.base"]


def test_round_trip_empty_base(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save({})
    assert s.load() == {}


def test_loaded_records_share_paths_and_equal_records(tmp_path: Path) -> None:
    s = store(tmp_path)
    base = {
        f"d/f{i}": BaseEntry(FILE, None, (7, MTIME, 0o644), (7, MTIME, 0o644)) for i in range(50)
    }
    s.save(base)
    loaded = s.load()
    assert loaded == base
    assert len({id(e) for e in loaded.values()}) == 1
    (e,) = set(loaded.values())
    assert e.local is e.remote
    (path,) = (p for p in loaded if p == "d/f7")
    assert path is sys.intern("d/f7")  # as the scans' paths are: one string for both


def test_format_1_is_read_and_replaced_by_the_next_save(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.legacy_path.write_text(legacy_json(BASE))
    assert s.load() == BASE
    s.save(BASE)
    assert not s.legacy_path.exists() and s.path.exists()
    assert s.load() == BASE


def test_format_2_wins_over_a_leftover_format_1(tmp_path: Path) -> None:
    # A run killed between writing the new file and removing the old one.
    s = store(tmp_path)
    s.legacy_path.write_text(legacy_json({"old": BaseEntry(DIR)}))
    s.save(BASE)
    s.legacy_path.write_text(legacy_json({"old": BaseEntry(DIR)}))
    assert s.load() == BASE


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save(BASE)
    whole = s.path.read_bytes()
    for n in range(len(whole)):
        s.path.write_bytes(whole[:n])
        with pytest.raises(UsageError) as e:
            s.load()
        assert e.value.exit_code == 2
        assert str(s.path) in str(e.value) and "remove it" in str(e.value)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b",1700000000,420\t=", b",1700000001,420\t="),  # a changed digit
        (b"\tdir\t\t\t\n", b"\tdisk\t\t\t\n"),  # an unknown kind
        (b"\n\tend\t12", b"\n\tend\t13"),  # a wrong count
        (b"\n\tend\t", b"\nextra\tfile\t\t\t\n\tend\t"),  # a record added
    ],
)
def test_damage_is_refused(tmp_path: Path, old: bytes, new: bytes) -> None:
    s = store(tmp_path)
    s.save(BASE)
    data = s.path.read_bytes()
    assert old in data
    s.path.write_bytes(data.replace(old, new, 1))
    with pytest.raises(UsageError, match="cannot read the sync state .*: damaged"):
        s.load()


def test_bytes_after_the_last_line_are_refused(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save(BASE)
    with open(s.path, "ab") as f:
        f.write(b"x\tdir\t\t\t\n")
    with pytest.raises(UsageError):
        s.load()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        '{"format":3}',
        '{"format":1,"entries":{"a":["file",null,[1,2]]}}',
        '{"format":1,"entries":{"a":5}}',
        '{"format":1,"entries":[]}',
        "[]",
    ],
)
def test_unreadable_format_1_is_refused(tmp_path: Path, text: str) -> None:
    s = store(tmp_path)
    s.legacy_path.write_text(text)
    with pytest.raises(UsageError) as e:
        s.load()
    assert e.value.exit_code == 2 and str(s.legacy_path) in str(e.value)


def test_save_goes_through_a_synced_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = store(tmp_path)
    s.save({"old": BaseEntry(DIR)})
    calls: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        calls.append(("replace", (Path(src), Path(dst))))
        assert store(tmp_path).load() == {"old": BaseEntry(DIR)}  # untouched until now
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    s.save(BASE)
    (tmp,) = [arg[0] for what, arg in calls if what == "replace"]  # type: ignore[index]
    assert tmp.parent == tmp_path and tmp.name.startswith(".pair.base.") and tmp.suffix == ".tmp"
    assert calls == [
        ("fsync", str(tmp)),
        ("replace", (tmp, s.path)),
        ("fsync", str(tmp_path)),
    ]
    assert s.load() == BASE
    assert [p.name for p in tmp_path.iterdir()] == ["pair.base"]


def test_a_failed_save_leaves_the_old_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(tmp_path)
    s.save({"old": BaseEntry(DIR)})
    bad = dict(BASE, zzz=BaseEntry("other"))  # found only after some records were written
    with pytest.raises(ValueError):
        s.save(bad)
    assert s.load() == {"old": BaseEntry(DIR)}
    s.save(BASE)  # the next save removes the orphaned temporary file
    assert [p.name for p in tmp_path.iterdir()] == ["pair.base"]


# -- the new base, without building it ------------------------------------------------------


def files(**sizes: int) -> dict[str, Entry]:
    return {p: Entry(p, FILE, size, MTIME, 0o644) for p, size in sizes.items()}


def test_same_base_is_true_only_for_the_same_records() -> None:
    local = files(a=1, b=2)
    old = next_base({}, local, dict(local), set())
    assert same_base(old, base_records(old, local, dict(local), set()))
    assert not same_base(old, base_records(old, files(a=1, b=3), files(a=1, b=3), set()))
    assert not same_base(old, base_records(old, files(a=1), files(a=1), set()))  # b gone
    grown = files(a=1, b=2, c=3)
    assert not same_base(old, base_records(old, grown, dict(grown), set()))
    assert not same_base({}, base_records({}, local, dict(local), set()))


def test_unchanged_records_are_the_old_objects() -> None:
    local = files(a=1, b=2)
    old = next_base({}, local, dict(local), set())
    new = next_base(old, files(a=1, b=5), files(a=1, b=5), set())
    assert new["a"] is old["a"] and new["b"] != old["b"]
    assert new["b"].local is new["b"].remote


# -- through the command line ---------------------------------------------------------------


def test_no_op_sync_leaves_the_state_file_alone(
    tmp_path: Path, run_leftssh: Callable[..., Result]
) -> None:
    local, other, state = tmp_path / "a", tmp_path / "b", tmp_path / "state"
    write_file(local / "d" / "f.txt", "x\n", mtime=MTIME)
    env = {"LEFTSSH_STATE_DIR": str(state)}
    assert run_leftssh("sync", other, "-d", local, env=env).code == 0
    (base,) = (state / "bases").iterdir()
    before = base.stat()
    r = run_leftssh("sync", other, "-d", local, env=env)
    assert r.code == 0, r
    after = base.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_sync_reads_a_format_1_base_and_a_damaged_one_stops_it(
    tmp_path: Path, run_leftssh: Callable[..., Result]
) -> None:
    local, other, state = tmp_path / "a", tmp_path / "b", tmp_path / "state"
    write_file(local / "keep.txt", "k\n", mtime=MTIME)
    write_file(local / "gone.txt", "g\n", mtime=MTIME)
    env = {"LEFTSSH_STATE_DIR": str(state)}
    assert run_leftssh("sync", other, "-d", local, env=env).code == 0
    (path,) = (state / "bases").iterdir()
    s = BaseStore(path.stem, PAIR, path.parent)
    legacy = s.load()
    assert legacy is not None and set(legacy) == {"keep.txt", "gone.txt"}
    path.unlink()
    s.legacy_path.write_text(legacy_json(legacy))
    # The format 1 base tells a deletion from a creation: gone.txt is deleted on the other side.
    (local / "gone.txt").unlink()
    r = run_leftssh("sync", other, "-d", local, env=env)
    assert r.code == 0, r
    assert not (other / "gone.txt").exists() and (other / "keep.txt").exists()
    assert not s.legacy_path.exists() and s.load() == {"keep.txt": legacy["keep.txt"]}
    s.path.write_bytes(s.path.read_bytes()[:-5])
    r = run_leftssh("sync", other, "-d", local, env=env)
    assert r.code == 2 and str(s.path) in r.stderr and "remove it" in r.stderr, r
