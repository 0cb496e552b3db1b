"""Pure safety checks run on a plan before anything changes."""

from __future__ import annotations

import re

from leftssh.errors import SafetyError, UsageError
from leftssh.model import Manifest, Plan, Side, delete_kind

DEFAULT_MAX_DELETE = "50%"


def parse_max_delete(text: str) -> tuple[int, bool]:
    """Parse ``N`` or ``N%`` into (number, is_percent)."""
    m = re.fullmatch(r"\s*(\d+)\s*(%?)\s*", text or "")
    if not m:
        raise UsageError(f"invalid --max-delete {text!r}: use a count N or a percentage N%")
    value, percent = int(m.group(1)), bool(m.group(2))
    if percent and value > 100:
        raise UsageError(f"invalid --max-delete {text!r}: a percentage is at most 100%")
    return value, percent


def check_max_delete(plan: Plan, manifests: dict[Side, Manifest], limit: str) -> None:
    """Refuse (SafetyError) a plan that deletes more files on a side than ``limit`` allows."""
    value, percent = parse_max_delete(limit)
    for side, manifest in manifests.items():
        deleted = sum(
            1
            for a in plan.actions
            if a.kind == delete_kind(side) and a.expected is not None and not a.expected.is_dir
        )
        if not deleted:
            continue
        total = manifest.file_count()
        allowed = total * value / 100 if percent else value
        if deleted > allowed:
            what = f"{value}% of {total}" if percent else str(value)
            raise SafetyError(
                f"refusing to delete {deleted} file(s) on the {side.value} side "
                f"(--max-delete allows {what}); nothing was changed. "
                "Check the paths, or pass --force or a larger --max-delete"
            )
