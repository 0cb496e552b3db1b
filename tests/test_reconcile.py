"""The two-way planner: a table of tiny trees (base, local, remote) and properties over many.

Every table case is also applied step by step by a strict model of execute (a delete finds
what it expects and leaves no orphans, a create finds its parent directory and nothing in
the way), and planning again on the result must give nothing more to do.
"""

from __future__ import annotations

import calendar
import hashlib
import re
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from leftssh.model import DIR, FILE, Action, BaseEntry, Entry, Kind, Manifest, Plan, Side, Skipped
from leftssh.paths import parent_of
from leftssh.reconcile import (
    POLICIES,
    Base,
    base_records,
    change_of,
    conflict_name,
    needs_hash_sync,
    next_base,
    plan_sync,
    same_base,
    simulate,
)

L, R = Side.LOCAL, Side.REMOTE
NOW = calendar.timegm((2026, 11, 21, 10, 15, 0))
STAMP = "20261121-101500"
T0 = 1_700_000_000  # when the base was agreed
T1 = T0 + 60  # an edit after the base
T2 = T0 + 120  # a later edit


def md5(content: str) -> str:
    return hashlib.md5(content.encode()).hexdigest()


def f(path: str, content: str = "v1", mtime: int = T0, mode: int = 0o644) -> Entry:
    """A file whose size and MD5 follow from ``content``."""
    return Entry(path, FILE, len(content), mtime, mode, md5(content))


def d(path: str) -> Entry:
    return Entry(path, DIR)


def tree(entries: list[Entry]) -> dict[str, Entry]:
    return {e.path: e for e in entries}


def manifest(entries: dict[str, Entry], unreadable: set[str] | None = None) -> Manifest:
    return Manifest(entries=dict(entries), unreadable=set(unreadable or ()))


def agreed(local: list[Entry], remote: list[Entry] | None = None) -> Base:
    """The base a successful sync of these trees records."""
    return next_base({}, tree(local), tree(local if remote is None else remote), set())


def conflict_copy(path: str, loser: str) -> str:
    parent, _, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    kept = (
        f"{stem}.conflict-{STAMP}-{loser}.{ext}"
        if dot and stem
        else f"{name}.conflict-{STAMP}-{loser}"
    )
    return f"{parent}/{kept}" if parent else kept


def describe(a: Action) -> tuple:
    """An action as the table writes it: (kind, path[, "meta"]) or a conflict's winner and copy."""
    if a.kind is Kind.CONFLICT:
        return ("conflict", a.path, a.winner.value if a.winner else None, a.keep or None)
    if a.is_transfer and a.meta_only:
        return (a.kind.value, a.path, "meta")
    return (a.kind.value, a.path)


def work(plan: Plan) -> list[Action]:
    return [a for a in plan.actions if a.kind is not Kind.SKIP]


def skipped_conflicts(plan: Plan) -> list[Action]:
    return [a for a in plan.actions if a.kind is Kind.CONFLICT and a.winner is None]


def under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r + "/") or r == "" for r in roots)


# -- a strict model of execute ------------------------------------------------------------


def apply_strict(
    local: dict[str, Entry], remote: dict[str, Entry], actions: list[Action]
) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """Apply ``actions`` in order, failing on any step execute could not do as planned."""
    state = {L: dict(local), R: dict(remote)}

    def parent_ready(side: Side, path: str) -> bool:
        parent = parent_of(path)
        return parent == "" or (parent in state[side] and state[side][parent].is_dir)

    for a in actions:
        if a.kind is Kind.SKIP or (a.kind is Kind.CONFLICT and a.winner is None):
            continue
        if a.kind is Kind.CONFLICT:
            win, lose = (a.local, a.remote) if a.winner is L else (a.remote, a.local)
            assert win is not None and lose is not None
            assert lose.kind == FILE, f"{a}: the version kept aside must be a file"
            assert state[L].get(a.path) == a.local and state[R].get(a.path) == a.remote
            for side in (L, R):
                assert a.keep not in state[side], f"{a}: conflict copy name taken on {side}"
                assert parent_ready(side, a.keep)
                state[side][a.keep] = replace(lose, path=a.keep)
            if win.is_dir:
                del state[a.winner.other][a.path]
            else:
                state[a.winner.other][a.path] = win
            continue
        side = a.target_side
        assert side is not None
        here = state[side].get(a.path)
        if a.kind in (Kind.DELETE_LOCAL, Kind.DELETE_REMOTE):
            assert here is not None and here == a.expected, f"{a}: expected {a.expected}, {here}"
            if here.is_dir:
                inside = [p for p in state[side] if p.startswith(a.path + "/")]
                assert not inside, f"{a}: directory still holds {inside}"
            del state[side][a.path]
        elif a.kind in (Kind.MKDIR_LOCAL, Kind.MKDIR_REMOTE):
            assert here is None, f"{a}: {here} is in the way"
            assert parent_ready(side, a.path), f"{a}: no parent directory"
            state[side][a.path] = Entry(a.path, DIR)
        else:
            assert a.is_transfer and a.source is not None and not a.source.is_dir
            assert here == a.expected, f"{a}: expected {a.expected}, found {here}"
            assert parent_ready(side, a.path), f"{a}: no parent directory"
            state[side][a.path] = a.source
    return state[L], state[R]


def well_formed(entries: dict[str, Entry]) -> bool:
    return all(
        parent_of(p) == "" or (parent_of(p) in entries and entries[parent_of(p)].is_dir)
        for p in entries
    )


def outcome(
    base: Base,
    local: Manifest,
    remote: Manifest,
    policy: str,
    checksum: bool = False,
    *,
    agree: bool = True,
) -> tuple[Plan, dict[str, Entry], dict[str, Entry]]:
    """Plan, apply strictly, check the result is whole, agreed and stable; return it."""
    plan = plan_sync(base, local, remote, policy, checksum=checksum, now=NOW)
    la, ra = apply_strict(local.entries, remote.entries, plan.actions)
    assert simulate(local.entries, remote.entries, plan.actions) == (la, ra)
    assert well_formed(la) and well_formed(ra)
    held = {a.path for a in skipped_conflicts(plan)} | local.unreadable | remote.unreadable
    for path in set(la) | set(ra) if agree else ():
        if under(path, held):
            continue
        le, re = la.get(path), ra.get(path)
        assert le is not None and re is not None, f"{path} is on one side only after the sync"
        assert le.kind == re.kind, f"{path}: {le.kind} vs {re.kind}"
        if not le.is_dir:
            assert (le.md5, le.mode) == (re.md5, re.mode), f"{path}: {le} vs {re}"
    unsettled = {a.path for a in skipped_conflicts(plan)}
    after = next_base(base, la, ra, unsettled)
    again = plan_sync(
        after,
        manifest(la, local.unreadable),
        manifest(ra, remote.unreadable),
        policy,
        checksum=checksum,
        now=NOW,
    )
    assert [describe(a) for a in work(again)] == [describe(a) for a in skipped_conflicts(plan)], (
        "planning again after the plan still finds work"
    )
    return plan, la, ra


# -- the table ----------------------------------------------------------------------------


@dataclass
class Case:
    desc: str
    base: list[Entry] | None  # agreed on both sides; None: no base yet
    local: list[Entry]
    remote: list[Entry]
    want: list[tuple]
    policy: str = "newer"
    checksum: bool = False
    ordered: bool = False  # the plan's order is part of the expectation
    base_remote: list[Entry] | None = None  # the remote side's snapshots, when they differ
    unreadable_local: frozenset[str] = frozenset()
    agree: bool = True  # False: the sides may still differ where the quick check is blind
    xfail: str = ""

    def inputs(self) -> tuple[Base, Manifest, Manifest]:
        base = {} if self.base is None else agreed(self.base, self.base_remote)
        return (
            base,
            manifest(tree(self.local), set(self.unreadable_local)),
            manifest(tree(self.remote)),
        )


F = f("f.txt")
TREE = [d("t"), f("t/x"), d("t/sub"), f("t/sub/y")]

CASES = [
    # One file, one side changed.
    Case("unchanged on both sides", [F], [F], [F], []),
    Case("new locally", [F], [F, f("n.txt")], [F], [("upload", "n.txt")]),
    Case("new remotely", [F], [F], [F, f("n.txt")], [("download", "n.txt")]),
    Case("modified locally", [F], [f("f.txt", "v2", T1)], [F], [("upload", "f.txt")]),
    Case("modified remotely", [F], [F], [f("f.txt", "v2", T1)], [("download", "f.txt")]),
    Case("deleted locally", [F], [], [F], [("delete_remote", "f.txt")]),
    Case("deleted remotely", [F], [F], [], [("delete_local", "f.txt")]),
    Case(
        "mode changed locally",
        [F],
        [f("f.txt", mode=0o755)],
        [F],
        [("upload", "f.txt", "meta")],
    ),
    Case(
        "mode changed remotely",
        [F],
        [F],
        [f("f.txt", mode=0o600)],
        [("download", "f.txt", "meta")],
    ),
    Case(
        "touched locally, same content",
        [F],
        [f("f.txt", mtime=T1)],
        [F],
        [("upload", "f.txt", "meta")],
    ),
    Case(
        "touched locally, same content, with checksum",
        [F],
        [f("f.txt", mtime=T1)],
        [F],
        [("upload", "f.txt", "meta")],
        checksum=True,
    ),
    Case(
        "rewritten locally with the same size and mtime: quick check sees nothing",
        [F],
        [f("f.txt", "v9")],
        [F],
        [],
        agree=False,
    ),
    Case(
        "rewritten locally with the same size and mtime: checksum sees it",
        [F],
        [f("f.txt", "v9")],
        [F],
        [("upload", "f.txt")],
        checksum=True,
    ),
    Case(
        "base snapshots differ per side, nothing changed",
        [F],
        [F],
        [f("f.txt", mtime=T0 + 1)],
        [],
        base_remote=[f("f.txt", mtime=T0 + 1)],
    ),
    # Changed on both sides.
    Case(
        "same edit on both sides at the same time is not a conflict",
        [F],
        [f("f.txt", "v2", T1)],
        [f("f.txt", "v2", T1)],
        [],
    ),
    Case(
        "same edit on both sides at different times: the newer mtime is copied",
        [F],
        [f("f.txt", "v2", T1)],
        [f("f.txt", "v2", T2)],
        [("download", "f.txt", "meta")],
    ),
    Case(
        "same edit on both sides, different modes: the newer side's mode wins",
        [F],
        [f("f.txt", "v2", T2, 0o755)],
        [f("f.txt", "v2", T1, 0o644)],
        [("upload", "f.txt", "meta")],
    ),
    Case(
        "created on both sides with the same content",
        [F],
        [F, f("n.txt", "same", T1)],
        [F, f("n.txt", "same", T1)],
        [],
    ),
    Case(
        "modified on both, newer: remote is newer",
        [F],
        [f("f.txt", "local edit", T1)],
        [f("f.txt", "remote edit", T2)],
        [("conflict", "f.txt", "remote", conflict_copy("f.txt", "local"))],
    ),
    Case(
        "modified on both, newer: local is newer",
        [F],
        [f("f.txt", "local edit", T2)],
        [f("f.txt", "remote edit", T1)],
        [("conflict", "f.txt", "local", conflict_copy("f.txt", "remote"))],
    ),
    Case(
        "modified on both, newer: equal mtimes go to local",
        [F],
        [f("f.txt", "local edit", T1)],
        [f("f.txt", "remote edit", T1)],
        [("conflict", "f.txt", "local", conflict_copy("f.txt", "remote"))],
    ),
    Case(
        "modified on both with equal sizes: MD5 tells them apart",
        [F],
        [f("f.txt", "v2", T1)],
        [f("f.txt", "v3", T2)],
        [("conflict", "f.txt", "remote", conflict_copy("f.txt", "local"))],
    ),
    Case(
        "modified on both, policy local beats a newer remote",
        [F],
        [f("f.txt", "local edit", T1)],
        [f("f.txt", "remote edit", T2)],
        [("conflict", "f.txt", "local", conflict_copy("f.txt", "remote"))],
        policy="local",
    ),
    Case(
        "modified on both, policy remote beats a newer local",
        [F],
        [f("f.txt", "local edit", T2)],
        [f("f.txt", "remote edit", T1)],
        [("conflict", "f.txt", "remote", conflict_copy("f.txt", "local"))],
        policy="remote",
    ),
    Case(
        "modified on both, policy skip touches nothing",
        [F],
        [f("f.txt", "local edit", T2)],
        [f("f.txt", "remote edit", T1)],
        [("conflict", "f.txt", None, None)],
        policy="skip",
    ),
    Case(
        "created on both with different content is a conflict",
        [F],
        [F, f("n.txt", "mine", T1)],
        [F, f("n.txt", "theirs", T2)],
        [("conflict", "n.txt", "remote", conflict_copy("n.txt", "local"))],
    ),
    Case(
        "modified locally, mode changed remotely: the content wins",
        [F],
        [f("f.txt", "v2", T1)],
        [f("f.txt", mode=0o755)],
        [("upload", "f.txt")],
    ),
    Case(
        "mode changed locally, modified remotely: the content wins",
        [F],
        [f("f.txt", mode=0o755)],
        [f("f.txt", "v2", T1)],
        [("download", "f.txt")],
    ),
    Case(
        "mode changed differently on both sides, equal mtimes: local's mode",
        [F],
        [f("f.txt", mode=0o755)],
        [f("f.txt", mode=0o600)],
        [("upload", "f.txt", "meta")],
    ),
    # Deleted against modified.
    Case(
        "deleted locally, modified remotely: the modification is restored",
        [F],
        [],
        [f("f.txt", "v2", T1)],
        [("download", "f.txt")],
    ),
    Case(
        "deleted remotely, modified locally: the modification is restored",
        [F],
        [f("f.txt", "v2", T1)],
        [],
        [("upload", "f.txt")],
    ),
    Case(
        "deleted locally, mode changed remotely: restored",
        [F],
        [],
        [f("f.txt", mode=0o755)],
        [("download", "f.txt")],
    ),
    Case(
        "mode changed locally, deleted remotely: restored",
        [F],
        [f("f.txt", mode=0o755)],
        [],
        [("upload", "f.txt")],
    ),
    Case("deleted on both sides", [F], [], [], []),
    Case(
        "deleted directory locally, child modified remotely: child restored with its parent",
        [d("a"), f("a/x"), f("a/y"), d("a/e")],
        [],
        [d("a"), f("a/x", "v2", T1), f("a/y"), d("a/e")],
        [
            ("mkdir_local", "a"),
            ("download", "a/x"),
            ("delete_remote", "a/e"),
            ("delete_remote", "a/y"),
        ],
        ordered=True,
    ),
    Case(
        "deleted directory remotely, new child locally: child kept, parent restored",
        [d("a"), f("a/y")],
        [d("a"), f("a/y"), f("a/new", "n", T1)],
        [],
        [("mkdir_remote", "a"), ("upload", "a/new"), ("delete_local", "a/y")],
        ordered=True,
    ),
    Case(
        "deleted nested directories locally, deep child modified remotely",
        [d("a"), d("a/b"), f("a/b/c"), f("a/z")],
        [],
        [d("a"), d("a/b"), f("a/b/c", "v2", T1), f("a/z")],
        [
            ("mkdir_local", "a"),
            ("mkdir_local", "a/b"),
            ("download", "a/b/c"),
            ("delete_remote", "a/z"),
        ],
        ordered=True,
    ),
    # Directories.
    Case(
        "new nested directories: parents first",
        [],
        [d("a"), d("a/b2"), d("a/b"), d("a/b/c"), f("a/b/c/f")],
        [],
        [
            ("mkdir_remote", "a"),
            ("mkdir_remote", "a/b"),
            ("mkdir_remote", "a/b2"),
            ("mkdir_remote", "a/b/c"),
            ("upload", "a/b/c/f"),
        ],
        ordered=True,
    ),
    Case(
        "deleted tree: deepest first",
        [d("a"), d("a/b"), d("a/b/c"), f("a/b/c/f"), f("a/g")],
        [d("a"), d("a/b"), d("a/b/c"), f("a/b/c/f"), f("a/g")],
        [],
        [
            ("delete_local", "a/b/c/f"),
            ("delete_local", "a/b/c"),
            ("delete_local", "a/b"),
            ("delete_local", "a/g"),
            ("delete_local", "a"),
        ],
        ordered=True,
    ),
    Case("new empty directory locally", [], [d("e")], [], [("mkdir_remote", "e")]),
    Case("empty directory deleted remotely", [d("e")], [d("e")], [], [("delete_local", "e")]),
    Case(
        "same new directory on both sides: children merged",
        [],
        [d("a"), f("a/x")],
        [d("a"), f("a/y")],
        [("upload", "a/x"), ("download", "a/y")],
    ),
    # Type changes on one side.
    Case(
        "file became a directory locally",
        [f("t")],
        [d("t"), f("t/in.txt")],
        [f("t")],
        [("delete_remote", "t"), ("mkdir_remote", "t"), ("upload", "t/in.txt")],
        ordered=True,
    ),
    Case(
        "file became a directory remotely",
        [f("t")],
        [f("t")],
        [d("t"), f("t/in.txt")],
        [("delete_local", "t"), ("mkdir_local", "t"), ("download", "t/in.txt")],
        ordered=True,
    ),
    Case(
        "directory became a file locally, remote unchanged",
        TREE,
        [f("t", "now a file", T1)],
        TREE,
        [
            ("delete_remote", "t/sub/y"),
            ("delete_remote", "t/sub"),
            ("delete_remote", "t/x"),
            ("delete_remote", "t"),
            ("upload", "t"),
        ],
        ordered=True,
    ),
    Case(
        "directory became a file remotely, local unchanged",
        TREE,
        TREE,
        [f("t", "now a file", T1)],
        [
            ("delete_local", "t/sub/y"),
            ("delete_local", "t/sub"),
            ("delete_local", "t/x"),
            ("delete_local", "t"),
            ("download", "t"),
        ],
        ordered=True,
    ),
    Case(
        "directory became a file locally, deleted remotely: the file is restored",
        [d("t"), f("t/x")],
        [f("t", "file", T1)],
        [],
        [("upload", "t")],
    ),
    Case(
        "file became a directory on both sides: children merged",
        [f("p")],
        [d("p"), f("p/x")],
        [d("p"), f("p/y")],
        [("upload", "p/x"), ("download", "p/y")],
    ),
    Case(
        "directory became a file locally while a child changed remotely: a conflict",
        [d("t"), f("t/x"), f("t/y")],
        [f("t", "file", T2)],
        [d("t"), f("t/x", "v2", T1), f("t/y")],
        [
            ("conflict", "t", "remote", conflict_copy("t", "local")),
            ("mkdir_local", "t"),
            ("download", "t/x"),
            ("delete_remote", "t/y"),
        ],
        ordered=True,
    ),
    Case(
        "directory became a file remotely while a child was added locally: a conflict",
        [d("t"), f("t/y")],
        [d("t"), f("t/y"), f("t/new", "n", T1)],
        [f("t", "file", T2)],
        [
            ("conflict", "t", "local", conflict_copy("t", "remote")),
            ("mkdir_remote", "t"),
            ("upload", "t/new"),
            ("delete_local", "t/y"),
        ],
        ordered=True,
    ),
    # File against directory on both sides.
    Case(
        "file and directory created on both sides: the directory keeps the name",
        None,
        [f("p", "file", T2)],
        [d("p"), f("p/in")],
        [
            ("conflict", "p", "remote", conflict_copy("p", "local")),
            ("mkdir_local", "p"),
            ("download", "p/in"),
        ],
        ordered=True,
    ),
    Case(
        "file and directory, policy local: the directory still keeps the name",
        None,
        [f("p", "file", T2)],
        [d("p"), f("p/in")],
        [
            ("conflict", "p", "remote", conflict_copy("p", "local")),
            ("mkdir_local", "p"),
            ("download", "p/in"),
        ],
        policy="local",
    ),
    Case(
        "file modified locally, replaced by a directory remotely",
        [f("p")],
        [f("p", "v2", T1)],
        [d("p"), f("p/in")],
        [
            ("conflict", "p", "remote", conflict_copy("p", "local")),
            ("mkdir_local", "p"),
            ("download", "p/in"),
        ],
    ),
    Case(
        "file and directory, policy skip: neither side touched, not even inside",
        None,
        [f("p", "file", T2)],
        [d("p"), f("p/in")],
        [("conflict", "p", None, None)],
        policy="skip",
    ),
    # First sync.
    Case(
        "first sync: copy what is missing each way, conflict on differences, delete nothing",
        None,
        [f("only-local"), f("same"), f("diff", "L", T1), d("a"), f("a/x")],
        [f("only-remote"), f("same"), f("diff", "RR", T2), d("a"), f("a/y"), d("e")],
        [
            ("upload", "only-local"),
            ("download", "only-remote"),
            ("conflict", "diff", "remote", conflict_copy("diff", "local")),
            ("upload", "a/x"),
            ("download", "a/y"),
            ("mkdir_local", "e"),
        ],
    ),
    Case(
        "first sync into an empty remote",
        None,
        [d("a"), f("a/x"), f("b")],
        [],
        [("mkdir_remote", "a"), ("upload", "a/x"), ("upload", "b")],
    ),
    Case(
        "first sync, policy skip",
        None,
        [f("diff", "L", T1)],
        [f("diff", "RR", T2)],
        [("conflict", "diff", None, None)],
        policy="skip",
    ),
    # Conflict copy names.
    Case(
        "conflict copy of a dotfile",
        [f(".bashrc")],
        [f(".bashrc", "mine", T1)],
        [f(".bashrc", "theirs", T2)],
        [("conflict", ".bashrc", "remote", f".bashrc.conflict-{STAMP}-local")],
    ),
    Case(
        "conflict copy of a name without extension",
        [f("Makefile")],
        [f("Makefile", "mine", T2)],
        [f("Makefile", "theirs", T1)],
        [("conflict", "Makefile", "local", f"Makefile.conflict-{STAMP}-remote")],
    ),
    Case(
        "conflict copy of a multi-dot name keeps the last extension",
        [f("backup.tar.gz")],
        [f("backup.tar.gz", "mine", T1)],
        [f("backup.tar.gz", "theirs", T2)],
        [("conflict", "backup.tar.gz", "remote", f"backup.tar.conflict-{STAMP}-local.gz")],
    ),
    Case(
        "conflict copy name already taken: -2",
        [f("notes.md")],
        [f("notes.md", "mine", T1)],
        [f("notes.md", "theirs", T2), f(f"notes.conflict-{STAMP}-local.md", "old copy", T0)],
        [
            ("conflict", "notes.md", "remote", f"notes.conflict-{STAMP}-local-2.md"),
            ("download", f"notes.conflict-{STAMP}-local.md"),
        ],
    ),
    Case(
        "conflict inside a directory, two in one run",
        [d("docs"), f("docs/a.txt"), f("docs/b.txt")],
        [d("docs"), f("docs/a.txt", "mine", T1), f("docs/b.txt", "mine", T2)],
        [d("docs"), f("docs/a.txt", "theirs", T2), f("docs/b.txt", "theirs", T1)],
        [
            ("conflict", "docs/a.txt", "remote", f"docs/a.conflict-{STAMP}-local.txt"),
            ("conflict", "docs/b.txt", "local", f"docs/b.conflict-{STAMP}-remote.txt"),
        ],
    ),
    # Unreadable directories.
    Case(
        "unreadable local directory: nothing inside it is deleted remotely",
        [d("a"), f("a/x"), f("b")],
        [d("a"), f("b", "v2", T1)],
        [d("a"), f("a/x"), f("b")],
        [("upload", "b")],
        unreadable_local=frozenset({"a"}),
    ),
    Case(
        "unreadable local root: nothing is deleted remotely",
        [d("a"), f("a/x"), f("b")],
        [],
        [d("a"), f("a/x"), f("b")],
        [],
        unreadable_local=frozenset({""}),
    ),
]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c, id=c.desc, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] * bool(c.xfail)
        )
        for c in CASES
    ],
)
def test_plan_sync(case: Case) -> None:
    base, local, remote = case.inputs()
    plan, _, _ = outcome(base, local, remote, case.policy, case.checksum, agree=case.agree)
    got = [describe(a) for a in work(plan)]
    if case.ordered:
        assert got == case.want
    else:
        assert sorted(got, key=repr) == sorted(case.want, key=repr)


def test_table_is_broad() -> None:
    assert len(CASES) >= 40
    assert len({c.desc for c in CASES}) == len(CASES)


# -- single behaviours --------------------------------------------------------------------


def test_conflict_carries_both_versions() -> None:
    local, remote = f("f.txt", "mine", T1), f("f.txt", "theirs", T2)
    plan = plan_sync(agreed([F]), manifest(tree([local])), manifest(tree([remote])), now=NOW)
    (a,) = plan.actions
    assert (a.local, a.remote) == (local, remote)


def test_overwrites_and_deletes_carry_the_entry_they_expect() -> None:
    base = agreed([f("m"), f("gone")])
    local = tree([f("m", "v2", T1)])
    remote = tree([f("m"), f("gone")])
    plan = plan_sync(base, manifest(local), manifest(remote), now=NOW)
    by_path = {a.path: a for a in plan.actions}
    assert by_path["m"].expected == remote["m"] and by_path["m"].source == local["m"]
    assert by_path["gone"].kind is Kind.DELETE_REMOTE
    assert by_path["gone"].expected == remote["gone"]


def test_skipped_entries_are_reported() -> None:
    local = Manifest(entries={}, skipped=[Skipped("link", "symlink")])
    plan = plan_sync({}, local, manifest({}), now=NOW)
    assert [(a.kind, a.path, a.reason) for a in plan.actions] == [(Kind.SKIP, "link", "symlink")]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        plan_sync({}, manifest({}), manifest({}), "mine")


@pytest.mark.parametrize(
    ("path", "loser", "taken", "want"),
    [
        ("notes.md", L, set(), f"notes.conflict-{STAMP}-local.md"),
        ("notes.md", R, set(), f"notes.conflict-{STAMP}-remote.md"),
        (".bashrc", L, set(), f".bashrc.conflict-{STAMP}-local"),
        (".config.json", L, set(), f".config.conflict-{STAMP}-local.json"),
        ("Makefile", R, set(), f"Makefile.conflict-{STAMP}-remote"),
        ("archive.tar.gz", L, set(), f"archive.tar.conflict-{STAMP}-local.gz"),
        ("dir.d/README", L, set(), f"dir.d/README.conflict-{STAMP}-local"),
        ("a/b/c.txt", R, set(), f"a/b/c.conflict-{STAMP}-remote.txt"),
        ("n.md", L, {f"n.conflict-{STAMP}-local.md"}, f"n.conflict-{STAMP}-local-2.md"),
        (
            "n.md",
            L,
            {f"n.conflict-{STAMP}-local.md", f"n.conflict-{STAMP}-local-2.md"},
            f"n.conflict-{STAMP}-local-3.md",
        ),
    ],
)
def test_conflict_name(path: str, loser: Side, taken: set[str], want: str) -> None:
    taken = set(taken)
    assert conflict_name(path, loser, NOW, taken) == want
    assert want in taken
    assert re.fullmatch(r"(.+/)?[^/]+\.conflict-\d{8}-\d{6}-(local|remote)(-\d+)?(\.[^./]+)?", want)


def test_conflict_name_is_utc_wall_clock() -> None:
    assert conflict_name("x.txt", R, 0, set()) == "x.conflict-19700101-000000-remote.txt"


@pytest.mark.parametrize(
    ("desc", "base", "local", "remote", "checksum", "want"),
    [
        ("unchanged", [F], [F], [F], False, []),
        ("changed on one side", [F], [f("f.txt", "v2", T1)], [F], False, []),
        (
            "changed on both, equal sizes",
            [F],
            [f("f.txt", "v2", T1)],
            [f("f.txt", "v3", T2)],
            False,
            ["f.txt"],
        ),
        (
            "changed on both, sizes differ: surely different",
            [F],
            [f("f.txt", "v2", T1)],
            [f("f.txt", "longer", T2)],
            False,
            [],
        ),
        (
            "new on both, same size and mtime: the quick check decides",
            None,
            [f("n", "v2", T1)],
            [f("n", "v3", T1)],
            False,
            [],
        ),
        (
            "new on both, same size and mtime, -c",
            None,
            [f("n", "v2", T1)],
            [f("n", "v3", T1)],
            True,
            ["n"],
        ),
        ("touched on one side, -c", [F], [f("f.txt", mtime=T1)], [F], True, ["f.txt"]),
        ("touched remotely, -c", [F], [F], [f("f.txt", mtime=T1)], True, ["f.txt"]),
        ("touched on one side, no -c", [F], [f("f.txt", mtime=T1)], [F], False, []),
    ],
)
def test_needs_hash_sync(
    desc: str,
    base: list[Entry] | None,
    local: list[Entry],
    remote: list[Entry],
    checksum: bool,
    want: list[str],
) -> None:
    b = {} if base is None else agreed(base)
    strip = {p: e.with_md5(None) for p, e in tree(local).items()}
    rstrip = {p: e.with_md5(None) for p, e in tree(remote).items()}
    assert needs_hash_sync(b, manifest(strip), manifest(rstrip), checksum) == want


def test_next_base_keeps_unsettled_records_and_drops_one_sided_paths() -> None:
    old = agreed([f("kept"), f("failed")])
    local = tree([f("kept", "v2", T1), f("failed", "v2", T1), f("only-here")])
    remote = tree([f("kept", "v2", T1), f("failed")])
    new = next_base(old, local, remote, {"failed"})
    assert new["failed"] == old["failed"]
    assert new["kept"] == BaseEntry(FILE, md5("v2"), (2, T1, 0o644), (2, T1, 0o644))
    assert "only-here" not in new


# -- properties ---------------------------------------------------------------------------

PATHS = ("a", "b", "c", "a/x", "a/y", "b/z", "a/x/q")
CONTENTS = ("v0", "v1", "v22", "v33")  # two sizes, so equal sizes with different bytes happen
MODES = (0o644, 0o755)
BASE_MTIMES = (T0, T0 + 1)
EDIT_MTIMES = (T1, T1 + 1, T2, T2 + 1)  # an edit always moves the mtime away from the base's
SWAP = {
    Kind.UPLOAD: Kind.DOWNLOAD,
    Kind.DOWNLOAD: Kind.UPLOAD,
    Kind.MKDIR_LOCAL: Kind.MKDIR_REMOTE,
    Kind.MKDIR_REMOTE: Kind.MKDIR_LOCAL,
    Kind.DELETE_LOCAL: Kind.DELETE_REMOTE,
    Kind.DELETE_REMOTE: Kind.DELETE_LOCAL,
    Kind.CONFLICT: Kind.CONFLICT,
    Kind.SKIP: Kind.SKIP,
}
SWAP_POLICY = {"newer": "newer", "skip": "skip", "local": "remote", "remote": "local"}


def normalized(entries: dict[str, Entry | None]) -> dict[str, Entry]:
    """Drop whatever has no parent directory (paths are visited parents first)."""
    out: dict[str, Entry] = {}
    for path in sorted(entries, key=lambda p: p.count("/")):
        e = entries[path]
        parent = parent_of(path)
        if e is not None and (parent == "" or (parent in out and out[parent].is_dir)):
            out[path] = e
    return out


def file_values(mtimes: tuple[int, ...]) -> list[tuple]:
    return [(FILE, c, m, mode) for c in CONTENTS for m in mtimes for mode in MODES]


def to_entry(path: str, value: tuple | None) -> Entry | None:
    if value is None:
        return None
    if value[0] == DIR:
        return d(path)
    _, content, mtime, mode = value
    return f(path, content, mtime, mode)


# One draw per path keeps generation fast; shrinking goes towards the front of each list.
BASE_VALUE = st.sampled_from([None, (DIR,), *file_values(BASE_MTIMES)])
KEEP, CHMOD, TOUCH = "keep", "chmod", "touch"
CHANGES = [None, (DIR,), CHMOD, TOUCH, *file_values(EDIT_MTIMES)]
EDIT = st.sampled_from([KEEP] * len(CHANGES) + CHANGES)  # half the paths are left alone


def edited(old: Entry | None, path: str, edit: object) -> Entry | None:
    if edit == KEEP:
        return old
    if edit in (CHMOD, TOUCH):
        if old is None or old.is_dir:
            return old
        if edit == CHMOD:
            return replace(old, mode=0o600 if old.mode != 0o600 else 0o644)
        return replace(old, mtime=T2 + 7)
    return to_entry(path, edit)  # type: ignore[arg-type]


@dataclass
class World:
    """A base (seen by each side) and both sides now."""

    base_local: dict[str, Entry]
    base_remote: dict[str, Entry]
    local: dict[str, Entry]
    remote: dict[str, Entry]
    base: Base
    policy: str
    checksum: bool

    def plan(self) -> Plan:
        return plan_sync(
            self.base,
            manifest(self.local),
            manifest(self.remote),
            self.policy,
            checksum=self.checksum,
            now=NOW,
        )

    def old(self, side: Side) -> dict[str, Entry]:
        return self.base_local if side is L else self.base_remote

    def now(self, side: Side) -> dict[str, Entry]:
        return self.local if side is L else self.remote

    def content_changed(self, side: Side, path: str) -> bool:
        """The bytes (or kind) at ``path`` on ``side`` differ from what the base agreed on."""
        e, b = self.now(side).get(path), self.old(side).get(path)
        if e is None:
            return False
        if b is None or b.kind != e.kind:
            return True
        return not e.is_dir and e.md5 != b.md5

    def changed_at_all(self, side: Side, path: str) -> bool:
        return self.now(side).get(path) != self.old(side).get(path)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    no_base = draw(st.integers(0, 5)) == 0
    base_local = {} if no_base else normalized({p: to_entry(p, draw(BASE_VALUE)) for p in PATHS})
    # The remote may have recorded other mtimes for the same agreed content.
    mask = draw(st.integers(0, 2 ** len(PATHS) - 1))
    shifted = {p for i, p in enumerate(PATHS) if mask >> i & 1}
    base_remote = {
        p: replace(e, mtime=e.mtime + 10) if p in shifted and not e.is_dir else e
        for p, e in base_local.items()
    }
    local = normalized({p: edited(base_local.get(p), p, draw(EDIT)) for p in PATHS})
    remote = normalized({p: edited(base_remote.get(p), p, draw(EDIT)) for p in PATHS})
    base = next_base({}, base_local, base_remote, set())
    if draw(st.booleans()):
        base = {p: replace(b, md5=None) for p, b in base.items()}
    return World(
        base_local,
        base_remote,
        local,
        remote,
        base,
        draw(st.sampled_from(POLICIES)),
        draw(st.booleans()),
    )


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(worlds())
def test_property_applying_a_plan_converges(w: World) -> None:
    plan = w.plan()
    la, ra = simulate(w.local, w.remote, plan.actions)
    after = next_base(w.base, la, ra, set())
    again = plan_sync(after, manifest(la), manifest(ra), w.policy, checksum=w.checksum, now=NOW)
    assert all(a.kind is Kind.CONFLICT and a.winner is None for a in work(again))


@PROPERTY
@given(worlds())
def test_property_plan_is_executable_agreed_and_stable(w: World) -> None:
    outcome(w.base, manifest(w.local), manifest(w.remote), w.policy, w.checksum)


def mirrored(a: Action) -> tuple:
    kind = SWAP[a.kind]
    if a.kind is Kind.CONFLICT:
        winner = a.winner.other.value if a.winner else None
        keep = re.sub(
            r"(conflict-\d{8}-\d{6}-)(local|remote)",
            lambda m: m.group(1) + ("remote" if m.group(2) == "local" else "local"),
            a.keep,
        )
        return ("conflict", a.path, winner, keep or None)
    return describe(replace(a, kind=kind))


def tied(w: World) -> bool:
    """A path both sides changed to files with equal mtimes: ``newer`` has to pick local."""
    for path in set(w.local) & set(w.remote):
        le, re_ = w.local[path], w.remote[path]
        if le.is_dir or re_.is_dir or le.mtime != re_.mtime:
            continue
        if (le.md5, le.mode) == (re_.md5, re_.mode):
            continue
        b = w.base.get(path)
        if change_of(le, b, L, w.checksum).changed and change_of(re_, b, R, w.checksum).changed:
            return True
    return False


@PROPERTY
@given(worlds())
def test_property_swapping_sides_swaps_the_plan(w: World) -> None:
    if w.policy in ("newer", "skip"):
        assume(not tied(w))
    swapped_base = {p: BaseEntry(b.kind, b.md5, b.remote, b.local) for p, b in w.base.items()}
    plan = w.plan()
    mirror = plan_sync(
        swapped_base,
        manifest(w.remote),
        manifest(w.local),
        SWAP_POLICY[w.policy],
        checksum=w.checksum,
        now=NOW,
    )
    assert sorted(map(mirrored, plan.actions), key=repr) == sorted(
        map(describe, mirror.actions), key=repr
    )


def kept_versions(entries: dict[str, Entry], path: str, plan: Plan) -> set[str | None]:
    names = {path} | {a.keep for a in plan.actions if a.kind is Kind.CONFLICT and a.path == path}
    return {entries[n].md5 for n in names if n in entries and not entries[n].is_dir}


@PROPERTY
@given(worlds())
def test_property_no_silent_loss_on_conflicts(w: World) -> None:
    plan = w.plan()
    la, ra = simulate(w.local, w.remote, plan.actions)
    for path in set(w.local) & set(w.remote):
        le, re_ = w.local[path], w.remote[path]
        if le.is_dir or re_.is_dir or le.md5 == re_.md5:
            continue
        if not (w.content_changed(L, path) and w.content_changed(R, path)):
            continue
        if w.policy == "skip":
            assert (la.get(path), ra.get(path)) == (le, re_)
            continue
        for after in (la, ra):
            assert {le.md5, re_.md5} <= kept_versions(after, path, plan), path


@PROPERTY
@given(worlds())
def test_property_deletes_only_what_the_base_knows_unchanged(w: World) -> None:
    plan = w.plan()
    for a in plan.actions:
        if a.kind in (Kind.DELETE_LOCAL, Kind.DELETE_REMOTE):
            assert a.path in w.base, f"{a.kind.value} {a.path} has no base record"
            side = a.target_side
            assert side is not None
            change = change_of(a.expected, w.base[a.path], side, w.checksum)
            assert not change.changed, f"{a.kind.value} {a.path} deletes a change ({change})"


@PROPERTY
@given(worlds())
def test_property_every_new_version_survives(w: World) -> None:
    plan = w.plan()
    la, ra = simulate(w.local, w.remote, plan.actions)
    held = {a.path for a in skipped_conflicts(plan)}
    for side in (L, R):
        for path, e in w.now(side).items():
            if e.is_dir:
                continue
            unchanged = not w.content_changed(side, path)
            if unchanged and w.changed_at_all(side.other, path):
                continue  # the other side's change (or deletion) replaces a base version
            sides_after = (la if side is L else ra,) if under(path, held) else (la, ra)
            for after in sides_after:
                assert e.md5 in {x.md5 for x in after.values()}, f"{side.value} {path} lost"


def with_true_md5(a: Action, w: World) -> Action:
    """``a`` with the entries it carries replaced by the fully hashed ones they stand for."""
    if a.is_transfer:
        return replace(a, source=w.now(R if a.kind is Kind.DOWNLOAD else L)[a.path])
    if a.kind is Kind.CONFLICT:
        return replace(a, local=w.local[a.path], remote=w.remote[a.path])
    return a


@PROPERTY
@given(worlds())
def test_property_hashing_only_what_is_asked_is_enough(w: World) -> None:
    """Plan with only the MD5s ``needs_hash_sync`` asks for, as a run does."""

    def scanned(entries: dict[str, Entry]) -> dict[str, Entry]:
        return {p: e.with_md5(None) for p, e in entries.items()}

    def hashed(
        base: Base, local: dict[str, Entry], remote: dict[str, Entry]
    ) -> tuple[Manifest, Manifest]:
        lm, rm = manifest(scanned(local)), manifest(scanned(remote))
        for path in needs_hash_sync(base, lm, rm, w.checksum):
            for m, entries in ((lm, local), (rm, remote)):
                if path in entries:
                    m.entries[path] = entries[path]
        return lm, rm

    # Without -c, equal size and mtime mean equal content (rsync's quick check); keep to worlds
    # where that assumption is true between the two sides of a path with no base record.
    for path in set(w.local) & set(w.remote):
        le, re_ = w.local[path], w.remote[path]
        if path not in w.base and not w.checksum and not le.is_dir and not re_.is_dir:
            assume(le.md5 == re_.md5 or (le.size, le.mtime) != (re_.size, re_.mtime))
    lm, rm = hashed(w.base, w.local, w.remote)
    plan = plan_sync(w.base, lm, rm, w.policy, checksum=w.checksum, now=NOW)
    la, ra = simulate(w.local, w.remote, [with_true_md5(a, w) for a in plan.actions])
    for path in set(w.local) & set(w.remote):
        le, re_ = w.local[path], w.remote[path]
        if le.is_dir or re_.is_dir or le.md5 == re_.md5 or w.policy == "skip":
            continue
        if w.content_changed(L, path) and w.content_changed(R, path):
            for after in (la, ra):
                assert {le.md5, re_.md5} <= kept_versions(after, path, plan), path
    after = next_base(w.base, *simulate(lm.entries, rm.entries, plan.actions), set())
    lm2, rm2 = hashed(after, la, ra)
    again = plan_sync(after, lm2, rm2, w.policy, checksum=w.checksum, now=NOW)
    assert all(a.kind is Kind.CONFLICT and a.winner is None for a in work(again))


def test_symlink_on_one_side_never_deletes_or_overwrites_the_other_side():
    from leftssh.model import BaseEntry, Entry, Manifest, Skipped

    base = {
        "d": BaseEntry("dir"),
        "d/a": BaseEntry("file", "m1", (1, 10, 0o644), (1, 10, 0o644)),
        "f": BaseEntry("file", "m2", (2, 10, 0o644), (2, 10, 0o644)),
    }
    # Locally, the directory d and the file f were replaced by symlinks.
    local = Manifest(skipped=[Skipped("d", "symlink"), Skipped("f", "symlink")])
    remote = Manifest(
        entries={
            "d": Entry("d", "dir"),
            "d/a": Entry("d/a", "file", 1, 10, 0o644),
            "f": Entry("f", "file", 2, 10, 0o644),
        }
    )
    plan = plan_sync(base, local, remote, "newer", now=0)
    assert [a for a in plan.actions if a.kind.value != "skip"] == []


@PROPERTY
@given(worlds())
def test_property_a_current_base_is_the_base_a_run_would_save(w: World) -> None:
    """``base_current`` lets a run skip building the new base: it must be exact."""
    local = {p: e.with_md5(None) for p, e in w.local.items()}  # as scanned
    remote = {p: e.with_md5(None) for p, e in w.remote.items()}
    plan = plan_sync(w.base, manifest(local), manifest(remote), w.policy, now=NOW)
    if plan.base_current:
        assert not work(plan)
        assert same_base(w.base, base_records(w.base, local, remote, set()))


def test_base_is_current_after_an_agreed_sync_only() -> None:
    entries = tree([d("a"), f("a/x"), f("y")])
    base = agreed(list(entries.values()))
    assert plan_sync(base, manifest(entries), manifest(dict(entries))).base_current
    assert not plan_sync(
        base, manifest(entries), manifest(dict(entries)), checksum=True
    ).base_current
    touched = dict(entries, y=f("y", mtime=T0 + 1))
    assert not plan_sync(base, manifest(touched), manifest(dict(entries))).base_current
    both = dict(entries, z=f("z"))  # new on both sides, same content: no work, a new record
    plan = plan_sync(base, manifest(both), manifest(dict(both)))
    assert not work(plan) and not plan.base_current
    gone = {p: e for p, e in entries.items() if p != "y"}  # deleted on both sides
    assert not plan_sync(base, manifest(gone), manifest(dict(gone))).base_current


def test_a_record_of_one_side_only_is_never_current() -> None:
    """A base record whose side has no snapshot, the path absent there: nothing to do,
    but a new base would drop the record, so the base is not current."""
    entries = tree([f("y")])
    base = agreed(list(entries.values()))
    one_sided = {"y": replace(base["y"], remote=None)}
    plan = plan_sync(one_sided, manifest(entries), manifest({}))
    assert not work(plan) and not plan.base_current
    assert not same_base(one_sided, base_records(one_sided, entries, {}, set()))
