"""Turn outcomes into JSON Lines or human text, and into the exit code."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from leftssh.model import Kind, Outcome, Status
from leftssh.paths import display

_OUTPUT_LOCK = threading.RLock()
LARGE_FILE = 8_000_000

_COUNTED = {
    Kind.UPLOAD: "uploaded",
    Kind.DOWNLOAD: "downloaded",
    Kind.DELETE_LOCAL: "deleted_local",
    Kind.DELETE_REMOTE: "deleted_remote",
    Kind.CONFLICT: "conflicts",
}

_VERIFIED = ("md5", "size", "none")


def _json_path(path: str) -> str:
    """Paths are str; undecodable bytes (surrogates) are shown escaped, never crash."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def outcome_record(o: Outcome, target: str | None = None) -> dict:
    """Return the SPEC section 7 JSON object for one outcome."""
    a = o.action
    rec: dict = {"action": a.kind.value, "path": _json_path(a.path)}
    if target is not None:
        rec["target"] = target
    if a.is_transfer:
        rec["bytes"] = o.bytes
        rec["resumed_from"] = o.resumed_from
        rec["verified"] = o.verified
    if a.kind is Kind.CONFLICT:
        if a.keep:
            rec["kept"] = _json_path(a.keep)
        if o.status in (Status.OK, Status.FAILED):
            # Resolving a conflict copies files: count them like transfers.
            rec["bytes"] = o.bytes
        if o.status is Status.OK and o.verified in _VERIFIED:
            rec["verified"] = o.verified
    rec["status"] = o.status.value
    if o.status is Status.FAILED:
        rec["error"] = o.error or "failed"
    if o.status is Status.SKIPPED:
        rec["reason"] = o.reason or a.reason or "skipped"
    return rec


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def outcome_text(o: Outcome) -> str:
    a = o.action
    path = display(a.path)
    if o.status is Status.FAILED:
        return f"FAILED {a.kind.value} {path}: {display(o.error)}"
    if o.status is Status.SKIPPED:
        return f"skip {path}: {display(o.reason or a.reason)}"
    verb = a.kind.value + (" (planned)" if o.status is Status.PLANNED else "")
    if a.is_transfer and o.status is Status.OK:
        extra = f"{_size(o.bytes)}, {o.verified}"
        if o.resumed_from:
            extra += f", resumed at {_size(o.resumed_from)}"
        if a.meta_only:
            extra = "attributes only"
        return f"{verb} {path} ({extra})"
    if a.kind is Kind.CONFLICT and a.keep:
        return f"{verb} {path} (other version kept as {display(a.keep)})"
    return f"{verb} {path}"


@dataclass
class Reporter:
    """Collects outcomes of one target and writes them as they come."""

    target: str
    json_mode: bool = False
    quiet: bool = False
    verbose: bool = False
    multi: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    started: float = field(default_factory=time.monotonic)
    outcomes: list[Outcome] = field(default_factory=list)
    extra_exit: int = 0
    extra_summary: dict = field(default_factory=dict)
    progress: bool = False
    _skips_seen: set = field(default_factory=set)
    _lock: threading.RLock = field(default_factory=lambda: _OUTPUT_LOCK)
    _bar: object = None

    def start_progress(
        self, total_bytes: int, total_files: int, sizes: dict[str, int] | None = None
    ) -> None:
        """Show progress on stderr for ``total_bytes`` to send (if enabled).

        The bar shows bytes, percent and ETA; beside it, files done/total, the
        rate, and for a large file (>= 8 MB) its own percentage.
        """
        if not self.progress or self.json_mode or total_bytes <= 0:
            return
        import click

        self._p_files = (0, total_files)
        self._p_sizes = sizes or {}
        self._p_sent: dict[str, int] = {}
        self._p_start = time.monotonic()
        self._p_bytes = 0
        self._bar = click.progressbar(
            length=total_bytes,
            label=display(self.target),
            file=self.err,
            show_eta=True,
            show_percent=True,
            show_pos=False,
            item_show_func=self._progress_text,
        )
        self._bar.__enter__()  # type: ignore[attr-defined]

    def _progress_text(self, path: str | None) -> str | None:
        done, total = self._p_files
        elapsed = max(time.monotonic() - self._p_start, 1e-3)
        text = f"{done}/{total} files, {_size(self._p_bytes / elapsed)}/s"
        if path:
            size = self._p_sizes.get(path, 0)
            text += f", {display(path)}"
            if size >= LARGE_FILE:
                text += f" {min(100, 100 * self._p_sent.get(path, 0) // size)}%"
        return text

    def advance(self, nbytes: int, path: str = "") -> None:
        """Count ``nbytes`` sent for ``path`` on the progress bar."""
        if self._bar is not None:
            with self._lock:
                self._p_bytes += nbytes
                self._p_sent[path] = self._p_sent.get(path, 0) + nbytes
                self._bar.update(nbytes, path)  # type: ignore[attr-defined]

    def end_progress(self) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.__exit__(None, None, None)  # type: ignore[attr-defined]
                self._bar = None

    def emit(self, o: Outcome) -> None:
        with self._lock:
            if o.action.kind is Kind.SKIP:
                # Each skipped entry is reported once, also across watch rounds.
                key = (o.action.path, o.action.reason)
                if key in self._skips_seen:
                    return
                self._skips_seen.add(key)
            self.outcomes.append(o)
            if self._bar is not None and o.action.is_transfer:
                done, total = self._p_files
                self._p_files = (done + 1, total)
            if self.json_mode:
                rec = outcome_record(o, self.target if self.multi else None)
                self.out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                self.out.flush()
                return
            if self.quiet and o.status is not Status.FAILED:
                return
            prefix = f"{display(self.target)}: " if self.multi else ""
            if self._bar is not None:
                self.err.write("\r\033[K")
            self.err.write(prefix + outcome_text(o) + "\n")
            self.err.flush()

    def warn(self, message: str) -> None:
        with self._lock:
            if not self.quiet or self.json_mode:
                self.err.write(f"leftssh: warning: {display(message)}\n")
                self.err.flush()

    def info(self, message: str) -> None:
        if self.verbose and not self.quiet:
            with self._lock:
                self.err.write(f"leftssh: {display(message)}\n")
                self.err.flush()

    def exit_code(self) -> int:
        code = self.extra_exit
        for o in self.outcomes:
            if o.status is Status.FAILED:
                code = max(code, 1)
            elif o.status is Status.SKIPPED and o.action.kind is not Kind.SKIP:
                code = max(code, 1)
            elif o.status is Status.SKIPPED and o.action.kind is Kind.CONFLICT:
                code = max(code, 1)
        return code

    def summary(self, exit_code: int, error: str | None = None) -> dict:
        counts = {name: 0 for name in _COUNTED.values()}
        failed = 0
        total_bytes = 0
        for o in self.outcomes:
            if o.status is Status.FAILED:
                failed += 1
            if o.status in (Status.OK, Status.PLANNED) and o.action.kind in _COUNTED:
                if o.action.is_transfer and o.action.meta_only:
                    continue
                counts[_COUNTED[o.action.kind]] += 1
            total_bytes += o.bytes
        body: dict = {"target": self.target, **counts, "failed": failed, "bytes": total_bytes}
        body.update(self.extra_summary)
        body["seconds"] = round(time.monotonic() - self.started, 3)
        body["exit_code"] = exit_code
        if error:
            body["error"] = error
        return {"summary": body}

    def finish(self, exit_code: int, error: str | None = None, dry_run: bool = False) -> None:
        """Write the summary (JSON object, or one human line on stderr)."""
        summary = self.summary(exit_code, error)
        with self._lock:
            if self.json_mode:
                self.out.write(json.dumps(summary, ensure_ascii=False) + "\n")
                self.out.flush()
                return
            if self.quiet and exit_code == 0:
                return
            s = summary["summary"]
            parts = [
                f"{s['uploaded']} uploaded",
                f"{s['downloaded']} downloaded",
                f"{s['deleted_local'] + s['deleted_remote']} deleted",
            ]
            if s["conflicts"]:
                parts.append(f"{s['conflicts']} conflicts")
            if s["failed"]:
                parts.append(f"{s['failed']} failed")
            head = "dry run, would do: " if dry_run else ""
            self.err.write(
                f"leftssh: {display(self.target)}: {head}{', '.join(parts)}; "
                f"{_size(s['bytes'])} sent in {s['seconds']:.2f} s\n"
            )
            self.err.flush()
