"""Pure two-way planning: judge each side's change against the base, never by clocks.

``plan_sync(base, local, remote, policy)`` returns a Plan; ``simulate`` applies
actions to entry maps (used to compute the new base from what succeeded, and by
the tests to check that planning again after a plan yields nothing).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

from leftssh.model import (
    DIR,
    FILE,
    Action,
    BaseEntry,
    Entry,
    Kind,
    Manifest,
    Plan,
    Side,
    Skipped,
    delete_kind,
    mkdir_kind,
    snapshot,
    transfer_kind,
)
from leftssh.paths import depth, is_under, parent_of

POLICIES = ("newer", "local", "remote", "skip")

Base = dict[str, BaseEntry]


@dataclass(frozen=True)
class Change:
    """How one side's entry relates to the base: absent/same/meta/content/new/deleted."""

    kind: str

    @property
    def changed(self) -> bool:
        return self.kind not in ("same", "absent")


SAME = Change("same")
ABSENT = Change("absent")
META = Change("meta")
CONTENT = Change("content")
NEW = Change("new")
DELETED = Change("deleted")


def change_of(e: Entry | None, b: BaseEntry | None, side: Side, checksum: bool = False) -> Change:
    """Classify ``e`` (this side now) against the base record ``b``."""
    snap = b.snap(side) if b is not None else None
    if e is None:
        return DELETED if snap is not None or (b is not None and b.kind == DIR) else ABSENT
    if b is None:
        return NEW
    if e.kind != b.kind:
        return CONTENT
    if e.is_dir:
        return SAME
    if snap is None:
        return NEW
    size, mtime, mode = snap
    if checksum and e.md5 and b.md5:
        if e.md5 != b.md5:
            return CONTENT
        return META if (mtime, mode) != (e.mtime, e.mode) else SAME
    if (e.size, e.mtime) != (size, mtime):
        if e.md5 and b.md5 and e.md5 == b.md5 and e.size == size:
            return META
        return CONTENT
    return META if e.mode != mode else SAME


def same_content(a: Entry, b: Entry, checksum: bool = False) -> bool:
    """Tell whether two files hold the same bytes (MD5 when known, else size+mtime)."""
    if a.kind != b.kind:
        return False
    if a.is_dir:
        return True
    if a.size != b.size:
        return False
    if a.md5 and b.md5:
        return a.md5 == b.md5
    return not checksum and a.mtime == b.mtime


def needs_hash_sync(base: Base, local: Manifest, remote: Manifest, checksum: bool) -> list[str]:
    """Paths whose MD5 (both sides) is needed to plan a sync correctly.

    Files changed on both sides with equal sizes (identical content is not a
    conflict); with ``checksum`` also files whose size is unchanged but whose
    mtime moved (touched, maybe not modified).
    """
    out = []
    for path, le in local.entries.items():
        b = base.get(path)
        if le.is_dir:
            continue
        if not checksum and b is not None and b.local == (le.size, le.mtime, le.mode):
            continue  # unchanged here (as change_of would say): no MD5 needed
        re = remote.entries.get(path)
        if re is not None and not re.is_dir:
            if (
                le.size == re.size
                and change_of(le, b, Side.LOCAL).changed
                and change_of(re, b, Side.REMOTE).changed
            ):
                if checksum or le.mtime != re.mtime or b is not None:
                    out.append(path)
                continue
        if checksum and b is not None and b.md5:
            snap = b.local
            if snap and snap[0] == le.size and snap[1] != le.mtime:
                out.append(path)
    if checksum:
        for path, re in remote.entries.items():
            b = base.get(path)
            if re.is_dir or b is None or not b.md5 or path in out:
                continue
            snap = b.remote
            if snap and snap[0] == re.size and snap[1] != re.mtime:
                out.append(path)
    return sorted(set(out))


def conflict_name(path: str, loser: Side, when: float, taken: set[str]) -> str:
    """Return ``NAME.conflict-YYYYmmdd-HHMMSS-<side>.EXT`` beside ``path``, not in ``taken``."""
    parent, _, name = path.rpartition("/")
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when))
    n = 1
    while True:
        suffix = "" if n == 1 else f"-{n}"
        candidate = f"{stem}.conflict-{stamp}-{loser.value}{suffix}{ext}"
        full = f"{parent}/{candidate}" if parent else candidate
        if full not in taken:
            taken.add(full)
            return full
        n += 1


def plan_sync(
    base: Base,
    local: Manifest,
    remote: Manifest,
    policy: str = "newer",
    *,
    checksum: bool = False,
    now: float | None = None,
) -> Plan:
    """Plan a two-way sync.

    Invariants: a path changed on one side only is copied to the other; a path
    changed on both sides with different content is a conflict whose losing
    version is kept under a conflict name on both sides (or, with ``skip``,
    left alone); a deletion only propagates when the other side is unchanged;
    with no base record for a path nothing is deleted.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown conflict policy {policy!r}")
    when = time.time() if now is None else now
    L, R = Side.LOCAL, Side.REMOTE
    entries = {L: local.entries, R: remote.entries}
    taken: set[str] | None = None  # every name in use, made at the first conflict
    conflicts: list[Action] = []
    mkdirs: list[Action] = []
    transfers: list[Action] = []
    deletes: list[Action] = []
    skips: list[Action] = []
    skipped: list[Skipped] = list(local.skipped) + list(remote.skipped)
    dirty: dict[Side, set[str]] = {}  # made when first needed (a file replaced a dir)
    held: set[str] = set()

    skipped_paths = {s.path for s in skipped}
    paths = list(union(local.entries, remote.entries, base))
    paths.sort()
    # With --checksum a record may gain the MD5 both sides now agree on, so the base
    # is never taken as current then.
    current = not checksum
    lget, rget, bget = local.entries.get, remote.entries.get, base.get
    for path in paths:
        le, re, b = lget(path), rget(path), bget(path)
        if not checksum and b is not None and le is not None and re is not None:
            # change_of's answer for the common case, unchanged on both sides, inline.
            if b.kind == FILE:
                if (
                    le.kind == FILE
                    and re.kind == FILE
                    and b.local == (le.size, le.mtime, le.mode)
                    and b.remote == (re.size, re.mtime, re.mode)
                ):
                    continue
            elif b.kind == DIR and le.kind == DIR and re.kind == DIR:
                continue
        if le is None or re is None:
            current = False  # a new base keeps no record for a path one side lacks
        cl = change_of(le, b, L, checksum)
        cr = change_of(re, b, R, checksum)
        if not cl.changed and not cr.changed:
            # Unchanged on both sides (so both are of the base's kind): nothing to do,
            # whatever the checks below would say. Most paths of most syncs end here.
            continue
        current = False
        if local.under_unreadable(path) or remote.under_unreadable(path):
            continue
        if is_under(path, skipped_paths):
            # A symlink or special file on one side: never copied, and never
            # a reason to delete or overwrite what the other side has there.
            continue
        if any(path.startswith(h + "/") for h in held):
            continue
        if le is not None and re is not None and le.is_dir != re.is_dir:
            holder = L if le.is_dir else R
            if holder not in dirty:
                dirty[holder] = _dirs_with_changes(base, entries[holder], holder, checksum)
            if path in dirty[holder] and not (cl if holder is L else cr).changed:
                # A file replaced this directory on one side while the other side changed
                # something inside it: replacing the directory would lose that change.
                cl = cr = CONTENT
        if not cl.changed and not cr.changed:
            continue
        if cl.changed and not cr.changed:
            _propagate(path, le, re, L, mkdirs, transfers, deletes, meta=cl is META)
            continue
        if cr.changed and not cl.changed:
            _propagate(path, re, le, R, mkdirs, transfers, deletes, meta=cr is META)
            continue
        # Changed on both sides.
        if le is None and re is None:
            continue
        if le is None or re is None:
            # Deleted on one side, modified (or created) on the other: the modification wins.
            present, side = (le, L) if le is not None else (re, R)
            _propagate(path, present, None, side, mkdirs, transfers, deletes, meta=False)
            continue
        if le.is_dir and re.is_dir:
            continue
        if not le.is_dir and not re.is_dir and {cl.kind, cr.kind} == {"meta", "content"}:
            # Only attributes changed on one side: the content change wins, no conflict.
            side = L if cl is CONTENT else R
            src, dst = (le, re) if side is L else (re, le)
            _propagate(path, src, dst, side, mkdirs, transfers, deletes, meta=False)
            continue
        if not le.is_dir and not re.is_dir and same_content(le, re, checksum):
            if (le.mtime, le.mode) != (re.mtime, re.mode):
                # Same bytes, different attributes: not a conflict; one side's attributes win.
                side = _winner(policy, le, re) or _winner("newer", le, re)
                src, dst = (le, re) if side is L else (re, le)
                _propagate(path, src, dst, side, mkdirs, transfers, deletes, meta=True)
            continue
        winner = _winner(policy, le, re)
        if (le.is_dir or re.is_dir) and winner is not None:
            # A file and a directory: the directory keeps the name, the file is kept aside.
            winner = L if le.is_dir else R
        if winner is None:
            skips.append(
                Action(
                    Kind.CONFLICT, path, local=le, remote=re, reason="conflict (--conflict skip)"
                )
            )
            held.add(path)
            continue
        loser = winner.other
        if taken is None:
            taken = set(local.entries) | set(remote.entries)
        keep = conflict_name(path, loser, when, taken)
        conflicts.append(Action(Kind.CONFLICT, path, keep=keep, winner=winner, local=le, remote=re))
        if (le if winner is L else re).is_dir:  # type: ignore[union-attr]
            mkdirs.append(Action(mkdir_kind(loser), path, source=le if winner is L else re))

    _ensure_parents(transfers + mkdirs + conflicts, entries, mkdirs, deletes)
    pre = _type_change_deletes(mkdirs, transfers, deletes, entries)
    mkdirs.sort(key=lambda a: (depth(a.path), a.path))
    deletes.sort(key=lambda a: (-depth(a.path), a.path))
    skips.extend(Action(Kind.SKIP, s.path, reason=s.reason) for s in skipped)
    return Plan(
        actions=pre + conflicts + mkdirs + transfers + deletes + skips,
        skipped=skipped,
        base_current=current,
    )


def _dirs_with_changes(
    base: Base, entries: dict[str, Entry], side: Side, checksum: bool
) -> set[str]:
    """Directories on ``side`` that hold something changed since the base."""
    out: set[str] = set()
    for path, e in entries.items():
        if change_of(e, base.get(path), side, checksum).changed:
            parent = parent_of(path)
            while parent and parent not in out:
                out.add(parent)
                parent = parent_of(parent)
    return out


def _winner(policy: str, le: Entry, re: Entry) -> Side | None:
    if policy == "skip":
        return None
    if policy == "local":
        return Side.LOCAL
    if policy == "remote":
        return Side.REMOTE
    return Side.REMOTE if re.mtime > le.mtime else Side.LOCAL


def _propagate(
    path: str,
    src: Entry | None,
    dst: Entry | None,
    src_side: Side,
    mkdirs: list[Action],
    transfers: list[Action],
    deletes: list[Action],
    *,
    meta: bool,
) -> None:
    """Make the other side match ``src`` (the side that changed) at ``path``."""
    dst_side = src_side.other
    if src is None:
        if dst is not None:
            deletes.append(Action(delete_kind(dst_side), path, expected=dst))
        return
    if src.is_dir:
        if dst is not None and not dst.is_dir:
            deletes.append(Action(delete_kind(dst_side), path, expected=dst))
        if dst is None or not dst.is_dir:
            mkdirs.append(Action(mkdir_kind(dst_side), path, source=src))
        return
    if dst is not None and dst.is_dir:
        deletes.append(Action(delete_kind(dst_side), path, expected=dst))
    expected = dst if dst is not None and not dst.is_dir else None
    transfers.append(
        Action(
            transfer_kind(dst_side),
            path,
            source=src,
            expected=expected,
            meta_only=meta and expected is not None,
        )
    )


def _ensure_parents(
    creating: list[Action],
    entries: dict[Side, dict[str, Entry]],
    mkdirs: list[Action],
    deletes: list[Action],
) -> None:
    """Every created path gets its parent directories, and keeps them, on both sides.

    A created path exists on both sides afterwards, so a planned deletion of one of its
    parent directories on either side is dropped (deletions of files in the way stay).
    """
    planned = {(a.target_side, a.path) for a in mkdirs}
    keep: set[tuple[Side | None, str]] = set()
    for a in list(creating):
        for side in (Side.LOCAL, Side.REMOTE):
            parent = parent_of(a.path)
            while parent:
                if (side, parent) in keep:
                    break
                keep.add((side, parent))
                here = entries[side].get(parent)
                if (here is None or not here.is_dir) and (side, parent) not in planned:
                    other = entries[side.other].get(parent)
                    source = other if other is not None and other.is_dir else Entry(parent, DIR)
                    mkdirs.append(Action(mkdir_kind(side), parent, source=source))
                    planned.add((side, parent))
                parent = parent_of(parent)
    if keep:
        deletes[:] = [
            d
            for d in deletes
            if (d.target_side, d.path) not in keep or (d.expected and not d.expected.is_dir)
        ]


def _type_change_deletes(
    mkdirs: list[Action],
    transfers: list[Action],
    deletes: list[Action],
    entries: dict[Side, dict[str, Entry]],
) -> list[Action]:
    """Move deletions that must happen before a create at the same path to the front."""
    blocked = {
        (a.target_side, a.path)
        for a in mkdirs + transfers
        if (e := entries[a.target_side].get(a.path)) is not None and e.kind != _kind_of(a)
    }
    pre = [
        d
        for d in deletes
        if any(
            d.target_side is side and (d.path == p or d.path.startswith(p + "/"))
            for side, p in blocked
        )
    ]
    deletes[:] = [d for d in deletes if d not in pre]
    pre.sort(key=lambda a: (-depth(a.path), a.path))
    return pre


def _kind_of(a: Action) -> str:
    return DIR if a.kind in (Kind.MKDIR_LOCAL, Kind.MKDIR_REMOTE) else "file"


# -- applying a plan (pure) ----------------------------------------------------------------


def simulate(
    local: dict[str, Entry],
    remote: dict[str, Entry],
    actions: list[Action],
) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """Return both sides' entries after ``actions`` succeed (as execute would leave them)."""
    state = {Side.LOCAL: dict(local), Side.REMOTE: dict(remote)}
    for a in actions:
        side = a.target_side
        if a.kind is Kind.CONFLICT:
            if a.winner is None:
                continue
            win = a.local if a.winner is Side.LOCAL else a.remote
            lose = a.remote if a.winner is Side.LOCAL else a.local
            assert win is not None and lose is not None
            for s in (Side.LOCAL, Side.REMOTE):
                if lose.kind != DIR:
                    state[s][a.keep] = _at(lose, a.keep)
                if win.kind != DIR:
                    state[s][a.path] = _at(win, a.path)
                elif s is a.winner.other:
                    state[s].pop(a.path, None)
            continue
        if side is None:
            continue
        if a.kind in (Kind.DELETE_LOCAL, Kind.DELETE_REMOTE):
            state[side].pop(a.path, None)
        elif a.kind in (Kind.MKDIR_LOCAL, Kind.MKDIR_REMOTE):
            state[side][a.path] = Entry(a.path, DIR)
        elif a.is_transfer and a.source is not None:
            state[side][a.path] = _at(a.source, a.path)
    return state[Side.LOCAL], state[Side.REMOTE]


def _at(e: Entry, path: str) -> Entry:
    return Entry(path, e.kind, e.size, e.mtime, e.mode, e.md5)


def union(*maps: Collection[str]) -> Iterator[str]:
    """Yield each key of ``maps`` once, without building a set of them all."""
    seen: list[Collection[str]] = []
    for m in maps:
        if not seen:
            yield from m
        else:
            yield from (k for k in m if not any(k in s for s in seen))
        seen.append(m)


_DIR_BASE = BaseEntry(DIR)


def next_base(
    old: Base,
    local_after: dict[str, Entry],
    remote_after: dict[str, Entry],
    unsettled: set[str],
) -> Base:
    """Return the new base: agreed paths recorded, unsettled paths keep their old record."""
    return dict(base_records(old, local_after, remote_after, unsettled))


def base_records(
    old: Base,
    local_after: Mapping[str, Entry],
    remote_after: Mapping[str, Entry],
    unsettled: set[str],
) -> Iterator[tuple[str, BaseEntry]]:
    """Yield the records of the new base (see ``next_base``), one path at a time.

    A record equal to the old one is the old object itself, so a new base holds
    new records only for what changed.
    """
    for path in union(local_after, remote_after, old):
        prev = old.get(path)
        if path in unsettled:
            if prev is not None:
                yield path, prev
            continue
        le, re = local_after.get(path), remote_after.get(path)
        if le is None or re is None or le.kind != re.kind:
            continue
        if le.is_dir:
            rec = _DIR_BASE
        else:
            hashes = {h for h in (le.md5, re.md5) if h}
            md5 = hashes.pop() if len(hashes) == 1 else None  # never one side's hash for both
            local, remote = snapshot(le), snapshot(re)
            if remote == local:
                remote = local
            if md5 is None and prev is not None and prev.md5:
                if prev.local == local and prev.remote == remote:
                    md5 = prev.md5
            rec = BaseEntry("file", md5, local, remote)
        yield path, (prev if prev is not None and prev == rec else rec)


def same_base(old: Base, records: Iterable[tuple[str, BaseEntry]]) -> bool:
    """Tell whether ``records`` (each path once) are exactly the base ``old``."""
    count = 0
    for path, rec in records:
        prev = old.get(path)
        if prev is not rec and prev != rec:
            return False
        count += 1
    return count == len(old)
