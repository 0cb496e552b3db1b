"""Pure planning: from manifests to a Plan. Nothing here touches disk or network."""

from __future__ import annotations

from leftssh.model import (
    Action,
    Entry,
    Kind,
    Manifest,
    Plan,
    Side,
    Skipped,
    delete_kind,
    mkdir_kind,
    transfer_kind,
)
from leftssh.paths import depth, is_under


def content_differs(src: Entry, dst: Entry, checksum: bool) -> bool:
    """Tell whether two files' contents differ (MD5 with ``checksum``, else size+mtime)."""
    if src.size != dst.size:
        return True
    if checksum:
        if src.md5 is None or dst.md5 is None:
            return True
        return src.md5 != dst.md5
    return src.mtime != dst.mtime


def needs_hash_oneway(src: Manifest, dst: Manifest, checksum: bool) -> list[str]:
    """Paths whose MD5 both sides must supply before a one-way plan (only with -c)."""
    if not checksum:
        return []
    out = []
    for path, s in src.entries.items():
        d = dst.entries.get(path)
        if d is not None and not s.is_dir and not d.is_dir and s.size == d.size:
            out.append(path)
    return sorted(out)


def _has_children(manifest: Manifest, path: str) -> bool:
    prefix = path + "/"
    return any(p.startswith(prefix) for p in manifest.entries)


def plan_oneway(
    src: Manifest,
    dst: Manifest,
    dst_side: Side,
    *,
    checksum: bool = False,
    delete: bool = False,
) -> Plan:
    """Plan a one-way copy from ``src`` so that ``dst`` matches it.

    Without ``delete`` nothing on the destination is removed, except a file
    that stands where the source has a directory (it could not coexist).
    Directories are created shallow-first, deletions run deepest-first after
    all transfers, and every overwrite or delete carries the entry it expects.
    """
    actions_pre: list[Action] = []
    mkdirs: list[Action] = []
    transfers: list[Action] = []
    deletes: list[Action] = []
    skipped: list[Skipped] = list(src.skipped)
    replaced: set[str] = set()

    for path in sorted(src.entries):
        s = src.entries[path]
        d = dst.entries.get(path)
        if s.is_dir:
            if d is None:
                mkdirs.append(Action(mkdir_kind(dst_side), path, source=s))
            elif not d.is_dir:
                actions_pre.append(Action(delete_kind(dst_side), path, expected=d))
                mkdirs.append(Action(mkdir_kind(dst_side), path, source=s))
            continue
        if d is None:
            transfers.append(Action(transfer_kind(dst_side), path, source=s))
            continue
        if d.is_dir:
            if _has_children(dst, path) and not delete:
                skipped.append(Skipped(path, "a directory is in the way (use --delete)"))
                continue
            replaced.add(path)
            for sub in sorted(
                (p for p in dst.entries if p.startswith(path + "/")), key=depth, reverse=True
            ):
                actions_pre.append(Action(delete_kind(dst_side), sub, expected=dst.entries[sub]))
            actions_pre.append(Action(delete_kind(dst_side), path, expected=d))
            transfers.append(Action(transfer_kind(dst_side), path, source=s))
            continue
        if content_differs(s, d, checksum):
            transfers.append(Action(transfer_kind(dst_side), path, source=s, expected=d))
        elif s.mtime != d.mtime or s.mode != d.mode:
            transfers.append(
                Action(transfer_kind(dst_side), path, source=s, expected=d, meta_only=True)
            )

    if delete:
        # A path the source holds as something skipped (symlink, special file) is
        # not "missing" from the source: leave the destination's entry alone.
        held = {s.path for s in src.skipped}
        for path in sorted(dst.entries, key=lambda p: (-depth(p), p)):
            if path in src.entries or is_under(path, held) or src.under_unreadable(path):
                continue
            if any(path.startswith(r + "/") for r in replaced):
                continue
            deletes.append(Action(delete_kind(dst_side), path, expected=dst.entries[path]))

    mkdirs.sort(key=lambda a: (depth(a.path), a.path))
    skips = [Action(Kind.SKIP, s.path, reason=s.reason) for s in skipped]
    return Plan(actions=actions_pre + mkdirs + transfers + deletes + skips, skipped=skipped)
