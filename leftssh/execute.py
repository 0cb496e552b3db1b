"""Apply a Plan through two transports: resumable, verified, atomic transfers.

Invariant kept for every transfer: the final name holds either its old
content or the complete, verified new content. New bytes go to a partial file
beside the destination (named for the source version), are MD5-checked on the
receiving side, and only then renamed over the final name.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

from leftssh.errors import (
    SOURCE_CHANGED,
    ChangedError,
    Interrupted,
    LeftsshError,
    RenameRefused,
    SourceChanged,
    TransferError,
)
from leftssh.model import (
    FILE,
    Action,
    Entry,
    Kind,
    Manifest,
    Outcome,
    Plan,
    Side,
    Status,
    transfer_kind,
)
from leftssh.paths import PARTIAL_SUFFIX, partial_name, version_tag
from leftssh.transport.base import (
    HashUnavailable,
    ManyDirs,
    ManyRenames,
    ManyStats,
    PipelinedDownloads,
    PipelinedUploads,
    Transport,
    WholeReads,
    WholeWrites,
    matches,
)

BATCH_FILES = 2000
BATCH_BYTES = 256 << 20
SETTLE_AHEAD = 2  # batches that may wait for their verify-and-commit stage
FOLLOW_MIN = 32 << 20  # files this large are hashed by the receiving side as they arrive
SMALL_FILE = 256 << 10  # transfers up to this size share one request pipeline


class VerifyUnavailable(LeftsshError):
    """--verify md5 was asked for, but the peer cannot compute MD5."""

    exit_code = 1


@dataclass
class ExecOptions:
    verify: str = "auto"
    jobs: int = 4
    bwlimit: float | None = None
    dry_run: bool = False


@dataclass
class _Copy:
    """One file in flight: what was sent and what the receiving side must hash to."""

    action: Action
    partial: str
    resumed_from: int = 0
    sent: int = 0
    digest: str = ""
    dst_md5: str | None = None  # the receiving side's MD5, when it hashed while receiving
    error: str = ""
    attrs_set: bool = False

    def start_whole(self, source: Entry) -> None:
        """Start over as a file sent whole (no resume): its partial for ``source``."""
        self.partial = partial_name(self.action.path, version_tag(source.size, source.mtime))
        self.error, self.resumed_from, self.dst_md5, self.attrs_set = "", 0, None, False


class RateLimiter:
    """A token bucket shared by all transfers of one run."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def consume(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
            delay = self._next - now - 0.05
        if delay > 0:
            time.sleep(delay)


@dataclass
class Executor:
    """Run the actions of a plan and report one Outcome per action."""

    local: Transport
    remote: Transport
    manifests: dict[Side, Manifest]
    options: ExecOptions
    emit: Callable[[Outcome], None]
    warn: Callable[[str], None]
    stop: threading.Event = field(default_factory=threading.Event)
    on_bytes: Callable[[int, str], None] | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._emit_lock = threading.Lock()
        self.cut = False
        self._pool: ThreadPoolExecutor | None = None
        self._hasher: ThreadPoolExecutor | None = None
        self._settler: ThreadPoolExecutor | None = None
        self._settling: collections.deque[Future] = collections.deque()
        self._verify_mode: str | None = None
        # Small uploads share one request pipeline where both sides offer it.
        self._small_pipeline = isinstance(self.remote, PipelinedUploads) and isinstance(
            self.local, WholeReads
        )
        self._small_downloads = isinstance(self.remote, PipelinedDownloads) and isinstance(
            self.local, WholeWrites
        )
        self._many_dirs = isinstance(self.remote, ManyDirs)
        self._many_stats = isinstance(self.remote, ManyStats)
        self._probed = threading.Event()  # the background md5 probe has answered
        self._index_lock = threading.Lock()
        self._partials_by_stem: dict[Side, dict[str, list[str]]] = {}
        self._limiter = RateLimiter(self.options.bwlimit) if self.options.bwlimit else None

    # -- plumbing --------------------------------------------------------------

    def side(self, side: Side) -> Transport:
        return self.local if side is Side.LOCAL else self.remote

    def _record(self, outcome: Outcome) -> None:
        with self._emit_lock:
            self.outcomes.append(outcome)
            self.emit(outcome)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("interrupted; partial transfers are kept for resume", cut=self.cut)

    def verify_mode(self) -> str:
        """Decide once how transfers are verified: 'md5' or 'size'."""
        if self._verify_mode is None:
            if self.options.verify == "size":
                self._verify_mode = "size"
            elif self.local.can_hash() and self.remote.can_hash():
                self._verify_mode = "md5"
            elif self.options.verify == "md5":
                raise VerifyUnavailable(
                    f"--verify md5: {self.remote.label} cannot run md5sum (an SFTP-only "
                    "account?); nothing was transferred. Use --verify auto or size"
                )
            else:
                self.warn(
                    f"MD5 is not available on {self.remote.label} (no md5sum through "
                    "exec); transfers are verified by size only"
                )
                self._verify_mode = "size"
        return self._verify_mode

    def _probe_quietly(self) -> None:
        try:
            self.remote.can_hash()
        except Exception:
            pass  # verify_mode() asks again and reports what stops the run
        finally:
            self._probed.set()

    def _mode_to_start(self, actions: list[Action]) -> str:
        """The verification mode, or "" when copying may start before it is known.

        Small uploads need it only to settle. Others need it to start only to resume
        a partial (proving its prefix takes MD5): while the background probe of the
        peer is still out and no partial of these versions was found, they start at
        once, and the peer's hash of a large upload joins when the probe answers.
        """
        if all(self._pipelined(a, Kind.UPLOAD) for a in actions):
            return ""
        if (
            self._verify_mode is None
            and self.options.verify == "auto"
            and not self._probed.is_set()
            and not any(self._resumable(a) for a in actions)
        ):
            return ""
        return self.verify_mode()

    def _resumable(self, a: Action) -> bool:
        if a.source is None:
            return False
        _, _, dst_side = self._endpoints(a)
        partial = partial_name(a.path, version_tag(a.source.size, a.source.mtime))
        return partial in self.manifests[dst_side].partials

    # -- the run -------------------------------------------------------------

    def run(self, plan: Plan) -> list[Outcome]:
        """Execute ``plan`` in order; per-file failures become failed outcomes."""
        if self.options.dry_run:
            for a in plan.actions:
                status = Status.SKIPPED if a.kind is Kind.SKIP else Status.PLANNED
                self._record(Outcome(a, status, reason=a.reason))
            return self.outcomes
        try:
            return self._run(plan)
        finally:
            while self._settling:
                try:
                    self._settling.popleft().result()
                except BaseException:
                    pass  # the run is already ending with its own error
            for pool in (self._settler, self._pool, self._hasher):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._pool = self._hasher = self._settler = None

    def _run(self, plan: Plan) -> list[Outcome]:
        if any(_copies_content(a) for a in plan.actions):
            if self.options.verify == "auto":
                # Probe the peer while the first directories are made; the first
                # batch waits for the answer (verify_mode) only if it is not in yet.
                threading.Thread(target=self._probe_quietly, daemon=True).start()
            else:
                self.verify_mode()  # may refuse (--verify md5) before anything changed
        conflicts = [a for a in plan.actions if a.kind is Kind.CONFLICT]
        pending: list[Action] = []
        pending_bytes = 0
        dirs: list[Action] = []  # remote directories to make together
        for a in plan.actions:
            self._check_stop()
            if a.kind is Kind.MKDIR_REMOTE and self._many_dirs:
                if not dirs:
                    if pending:
                        self._transfer_batch(pending, background=True)
                        pending, pending_bytes = [], 0
                    self._settled()
                dirs.append(a)
                continue
            if dirs:
                self._make_dirs(dirs)
                dirs = []
            if a.kind is Kind.CONFLICT:
                if conflicts:  # all of them together, where the first one stands
                    if pending:
                        self._transfer_batch(pending, background=True)
                        pending, pending_bytes = [], 0
                    self._settled()
                    self._run_conflicts(conflicts)
                    conflicts = []
                continue
            if a.is_transfer and not a.meta_only:
                pending.append(a)
                pending_bytes += a.source.size if a.source else 0
                if len(pending) >= BATCH_FILES or pending_bytes >= BATCH_BYTES:
                    self._transfer_batch(pending, background=True)
                    pending, pending_bytes = [], 0
                continue
            if pending:
                self._transfer_batch(pending, background=True)
                pending, pending_bytes = [], 0
            self._settled()
            self._run_simple(a)
        if dirs:
            self._make_dirs(dirs)
        if pending:
            self._transfer_batch(pending, background=True)
        self._settled()
        self._check_stop()
        return self.outcomes

    def _make_dirs(self, actions: list[Action]) -> None:
        """Make consecutive remote directories with their requests in flight."""
        remote = self.remote
        assert isinstance(remote, ManyDirs)
        failed = remote.make_dirs([a.path for a in actions])
        for a in actions:
            e = failed.get(a.path)
            if e is None:
                self._record(Outcome(a, Status.OK, result=a.source))
            elif isinstance(e, ChangedError):
                self._record(Outcome(a, Status.SKIPPED, reason=str(e)))
            else:
                self._record(Outcome(a, Status.FAILED, error=_message(e)))

    def _run_conflicts(self, actions: list[Action]) -> None:
        """Keep each losing version under ``a.keep`` on both sides; the winner takes the name.

        Order matters for crash safety: every loser is first renamed aside on
        its own side (so no version is ever overwritten), then the winners are
        copied into the freed names and the kept copies to the other side, all
        in shared batches (one remote hash call per batch, not per conflict).
        """
        staged: list[tuple[Action, list[Action]]] = []
        for a in actions:
            self._check_stop()
            if a.winner is None:
                self._record(Outcome(a, Status.SKIPPED, reason=a.reason or "conflict"))
                continue
            win_side, lose_side = a.winner, a.winner.other
            win = a.local if win_side is Side.LOCAL else a.remote
            lose = a.remote if win_side is Side.LOCAL else a.local
            assert win is not None and lose is not None
            try:
                self.side(lose_side).rename_aside(a.path, a.keep, lose)
            except ChangedError as e:
                self._record(Outcome(a, Status.SKIPPED, reason=str(e)))
                continue
            except (TransferError, OSError) as e:
                self._record(Outcome(a, Status.FAILED, error=_message(e)))
                continue
            copies = [Action(transfer_kind(win_side), a.keep, source=_moved(lose, a.keep))]
            if not win.is_dir:
                copies.insert(0, Action(transfer_kind(lose_side), a.path, source=win))
            staged.append((a, copies))
        pending = [c for _, copies in staged for c in copies]
        sink: list[Outcome] = []
        for i in range(0, len(pending), BATCH_FILES):
            self._transfer_batch(pending[i : i + BATCH_FILES], sink)
        results = {id(o.action): o for o in sink}
        for a, copies in staged:
            outs = [results[id(c)] for c in copies if id(c) in results]
            failed = [o for o in outs if o.status is not Status.OK]
            sent = sum(o.bytes for o in outs)
            verified = {o.verified for o in outs} - {"none"}
            if failed or len(outs) != len(copies):
                error = "; ".join(f"{o.action.path}: {o.error or o.reason}" for o in failed)
                self._record(Outcome(a, Status.FAILED, bytes=sent, error=error or "not copied"))
                continue
            self._record(
                Outcome(a, Status.OK, bytes=sent, verified=",".join(sorted(verified)) or "none")
            )

    def _run_simple(self, a: Action) -> None:
        if a.kind is Kind.CONFLICT:
            self._run_conflicts([a])
            return
        if a.kind is Kind.SKIP:
            self._record(Outcome(a, Status.SKIPPED, reason=a.reason))
            return
        target = a.target_side
        assert target is not None
        t = self.side(target)
        try:
            if a.kind in (Kind.MKDIR_LOCAL, Kind.MKDIR_REMOTE):
                t.mkdir(a.path)
            elif a.kind in (Kind.DELETE_LOCAL, Kind.DELETE_REMOTE):
                t.remove(a.path, a.expected)
            elif a.is_transfer and a.meta_only:
                if not matches(t.stat(a.path), a.expected):
                    raise ChangedError("changed since the scan; not touched")
                assert a.source is not None
                t.set_attrs(a.path, a.source.mtime, a.source.mode)
            else:
                raise TransferError(f"unsupported action {a.kind.value}")
        except ChangedError as e:
            self._record(Outcome(a, Status.SKIPPED, reason=str(e)))
            return
        except (TransferError, OSError) as e:
            self._record(Outcome(a, Status.FAILED, error=_message(e)))
            return
        self._record(Outcome(a, Status.OK, result=a.source))

    # -- transfers -------------------------------------------------------------

    def _endpoints(self, a: Action) -> tuple[Transport, Transport, Side]:
        dst_side = Side.REMOTE if a.kind is Kind.UPLOAD else Side.LOCAL
        return self.side(dst_side.other), self.side(dst_side), dst_side

    def _out(self, outcome: Outcome, sink: list[Outcome] | None) -> None:
        if sink is None:
            self._record(outcome)
        else:
            sink.append(outcome)

    def _transfer_batch(
        self, actions: list[Action], sink: list[Outcome] | None = None, background: bool = False
    ) -> None:
        """Copy a batch of files, then verify them with one hash call per side and commit.

        With ``background`` the verify-and-commit stage runs on its own thread while
        the caller goes on copying the next batches: batches settle one at a time, in
        order, and at most ``SETTLE_AHEAD`` wait for it (``_settled`` waits for all).
        """
        mode = self._mode_to_start(actions)
        copies = {a.path: _Copy(a, "") for a in actions}
        self._check_stop()
        prehash = self._start_source_hash(actions, mode)
        placed = self._copy_all(actions, copies, resume=True, mode=mode)
        if self.stop.is_set():
            with contextlib.suppress(Exception):
                placed()  # the small files still being placed, before the run ends
        self._stop_if_asked(actions, copies, sink)
        mode = mode or self.verify_mode()
        if not background:
            self._settle(actions, copies, mode, sink, prehash, placed)
            return
        while len(self._settling) >= SETTLE_AHEAD:
            self._settling.popleft().result()
        if self._settler is None:
            self._settler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle")
        self._settling.append(
            self._settler.submit(self._settle, actions, copies, mode, sink, prehash, placed)
        )

    def _settled(self) -> None:
        """Wait for the batches verifying in the background; re-raise what stopped one."""
        while self._settling:
            self._settling.popleft().result()

    def _stop_if_asked(
        self, actions: list[Action], copies: dict[str, _Copy], sink: list[Outcome] | None
    ) -> None:
        if not self.stop.is_set():
            return
        for a in actions:
            c = copies[a.path]
            error = "interrupted; the partial file is kept for resume"
            self._out(
                Outcome(a, Status.FAILED, bytes=c.sent, resumed_from=c.resumed_from, error=error),
                sink,
            )
        self._check_stop()

    def _settle(
        self,
        actions: list[Action],
        copies: dict[str, _Copy],
        mode: str,
        sink: list[Outcome] | None,
        prehash: Future | None,
        placed: Callable[[], None],
    ) -> None:
        """Verify copied files, commit the good ones, resend the others once from zero.

        ``placed`` (from :meth:`_copy_all`) first waits for the small files still
        being placed and copies one by one those that could not be.
        """
        placed()
        todo = list(actions)
        for attempt in (1, 2):
            if attempt == 2:
                self._check_stop()
                prehash = self._start_source_hash(todo, mode)
                self._copy_all(todo, copies, resume=False, mode=mode)()
                self._stop_if_asked(todo, copies, sink)
            verified = self._verify(todo, copies, mode, prehash)
            self._commit_all(
                [a for a in todo if not copies[a.path].error and a.path in verified],
                copies,
                mode,
                sink,
            )
            retry: list[Action] = []
            for a in todo:
                c = copies[a.path]
                if c.error or a.path in verified:
                    continue
                _, dst, _ = self._endpoints(a)
                _quiet(dst.remove_partial, c.partial)
                if attempt == 1:
                    retry.append(a)
                else:
                    c.error = f"{mode} verification failed twice; destination left untouched"
            todo = retry
            if not todo:
                break
        for a in actions:
            c = copies[a.path]
            if c.error:
                status = Status.SKIPPED if c.error.startswith("skipped: ") else Status.FAILED
                text = c.error.removeprefix("skipped: ")
                self._out(
                    Outcome(
                        a,
                        status,
                        bytes=c.sent,
                        resumed_from=c.resumed_from,
                        error=text if status is Status.FAILED else "",
                        reason=text if status is Status.SKIPPED else "",
                    ),
                    sink,
                )

    def _map(self, fn: Callable[[Action], object], actions: list[Action]) -> None:
        """Run ``fn`` over ``actions`` on up to ``jobs`` threads; re-raise run-stopping errors."""
        jobs = max(1, self.options.jobs)
        if jobs == 1 or len(actions) <= 1:
            for a in actions:
                fn(a)
            return
        with self._index_lock:  # the settle thread may get here too
            if self._pool is None:
                # One pool for the whole run: each worker thread keeps its own SFTP channel.
                self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="transfer")
            pool = self._pool
        _wait_all([pool.submit(fn, a) for a in actions])

    def _start_source_hash(self, actions: list[Action], mode: str) -> Future | None:
        """For downloads, start the peer's MD5 of the sources now, alongside the copies.

        With the mode not known yet ("") it starts too (it waits for the probe); if
        MD5 turns out unavailable, the batch settles by size and never asks for it.
        """
        if mode not in ("md5", "") or not actions:
            return None
        src, dst, _ = self._endpoints(actions[0])
        if dst is not self.local or src is self.local:
            return None
        if any(self._endpoints(a)[1] is not dst for a in actions):
            return None
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
        return self._hasher.submit(src.hash_files, [a.path for a in actions])

    def _copy_all(
        self, actions: list[Action], copies: dict[str, _Copy], *, resume: bool, mode: str
    ) -> Callable[[], None]:
        """Copy ``actions``; return what finishes the small uploads among them.

        Small uploads are sent together (:meth:`_copy_small`); the peer may still be
        placing the last of them when this returns. The function returned waits
        for them and copies one by one those that could not be placed. It must be
        called before the batch is verified.
        """
        small: list[Action] = []
        small_down: list[Action] = []
        rest: list[Action] = []
        for a in actions:
            if self._pipelined(a, Kind.UPLOAD):
                small.append(a)
            elif self._pipelined(a, Kind.DOWNLOAD):
                small_down.append(a)
            else:
                rest.append(a)
        sent = self._copy_small(small, copies) if small else None
        self._map(lambda a: self._copy_guarded(copies[a.path], resume, mode), rest)
        if small_down:
            # What the pipeline could not read goes the one-file-at-a-time way.
            retry = self._copy_small_down(small_down, copies)
            self._map(lambda a: self._copy_guarded(copies[a.path], resume, mode), retry)

        def placed() -> None:
            if sent is not None:
                # What the pipeline could not place goes the one-file-at-a-time way.
                retry = sent()
                self._map(lambda a: self._copy_guarded(copies[a.path], resume, mode), retry)

        return placed

    def _pipelined(self, a: Action, kind: Kind) -> bool:
        """Tell whether ``a`` is a small transfer of ``kind`` (upload or download) that
        can share one request pipeline."""
        able = self._small_pipeline if kind is Kind.UPLOAD else self._small_downloads
        return a.kind is kind and a.source is not None and a.source.size <= SMALL_FILE and able

    def _copy_small_down(self, actions: list[Action], copies: dict[str, _Copy]) -> list[Action]:
        """Download small files together; return those to copy one by one.

        The peer's answers for many files are in flight at once (the transport's
        ``get_files``); each file read whole is written to its local partial and
        hashed here, as :meth:`_copy` would. A file the pipeline could not read is
        returned, to meet the one-file path and its own error.
        """
        src, dst = self.remote, self.local
        assert isinstance(src, PipelinedDownloads) and isinstance(dst, WholeWrites)
        retry: list[Action] = []
        left = {a.path: a for a in actions}
        got = src.get_files((a.path, a.source.size) for a in actions if a.source is not None)
        try:
            for path, data, size, mtime in got:
                if self.stop.is_set():
                    break
                a = left.pop(path)
                c, source = copies[path], a.source
                assert source is not None
                c.start_whole(source)
                if isinstance(data, Exception):
                    retry.append(a)
                    continue
                if len(data) != source.size or size != source.size or mtime != source.mtime:
                    c.error = SOURCE_CHANGED
                    continue
                self._drop_stale_partials(path, c.partial, Side.LOCAL, dst)
                if self._limiter:
                    self._limiter.consume(len(data))
                try:
                    dst.write_whole(c.partial, data, (source.mtime, source.mode))
                except (TransferError, OSError) as e:
                    c.error = _message(e)
                    continue
                c.attrs_set = True
                c.digest = hashlib.md5(data).hexdigest()
                c.sent += len(data)
                if self.on_bytes is not None:
                    self.on_bytes(len(data), path)
        finally:
            got.close()
        for a in left.values():  # not reached: the run is stopping
            copies[a.path].error = "interrupted"
        return retry

    def _copy_small(
        self, actions: list[Action], copies: dict[str, _Copy]
    ) -> Callable[[], list[Action]]:
        """Upload small files together; return what waits for them to be placed.

        Each file is read whole and hashed here, then handed to the transport's
        ``put_files``, which writes it as a partial with mtime and mode. The function
        returned waits until the peer has placed them all and returns those to retry
        one by one. Verification and the rename into place follow in the batch's
        settle stage, exactly as for files copied one at a time.
        """
        dst = self.remote
        started: list[Action] = []

        def items() -> Iterator[tuple[str, bytes, tuple[int, int]]]:
            for a in actions:
                c, source = copies[a.path], a.source
                assert source is not None
                if self.stop.is_set():
                    c.error = "interrupted"
                    continue
                c.start_whole(source)
                self._drop_stale_partials(a.path, c.partial, Side.REMOTE, dst)
                try:
                    data, size, mtime = self.local.read_whole(a.path, source.size + 1)
                except (TransferError, OSError) as e:
                    c.error = _message(e)
                    continue
                if len(data) != source.size or size != source.size or mtime != source.mtime:
                    c.error = SOURCE_CHANGED
                    continue
                if self._limiter:
                    self._limiter.consume(dst.wire_size(c.partial, len(data)))
                c.digest = hashlib.md5(data).hexdigest()
                c.sent += len(data)
                if self.on_bytes is not None:
                    self.on_bytes(len(data), a.path)
                started.append(a)
                yield c.partial, data, (source.mtime, source.mode)

        placed = dst.put_files(items())

        def retries() -> list[Action]:
            failed = placed()
            retry = []
            for a in started:
                c = copies[a.path]
                if c.partial in failed:
                    retry.append(a)
                else:
                    c.attrs_set = True
            return retry

        return retries

    def _copy_guarded(self, c: _Copy, resume: bool, mode: str) -> None:
        if self.stop.is_set():
            c.error = "interrupted"
            return
        c.error = ""
        try:
            self._copy(c, resume, mode)
        except ChangedError as e:
            c.error = f"skipped: {e}"
        except (TransferError, OSError) as e:
            c.error = _message(e)
        except Interrupted:
            c.error = "interrupted"
            self.cut = True

    def _copy(self, c: _Copy, resume: bool, mode: str) -> None:
        a = c.action
        assert a.source is not None
        src, dst, dst_side = self._endpoints(a)
        source = a.source
        c.partial = partial_name(a.path, version_tag(source.size, source.mtime))
        self._drop_stale_partials(a.path, c.partial, dst_side, dst)
        offset = 0
        hasher = hashlib.md5()
        if resume and mode == "md5":
            offset = self._resume_offset(c, src, dst, dst_side)
            if offset:
                local_t, local_path = (dst, c.partial) if dst is self.local else (src, a.path)
                hasher = _prefix_hash(local_t, local_path, offset)
        c.resumed_from = offset if resume else c.resumed_from
        follow = mode in ("md5", "") and source.size - offset >= FOLLOW_MIN
        out = dst.open_write(c.partial, offset, (source.mtime, source.mode), follow=follow)
        c.attrs_set = False
        c.dst_md5 = None
        sent = 0
        empty = stale = False
        try:
            if source.size - offset >= FOLLOW_MIN:
                hasher = _HashingThread(hasher)
            for block in src.read_chunks(a.path, offset, source.size, source.mtime):
                if self.stop.is_set():
                    raise Interrupted("interrupted")
                if self._limiter:
                    self._limiter.consume(len(block))
                _write(out, block, dst, c.partial)
                if self.on_bytes is not None:
                    self.on_bytes(len(block), a.path)
                hasher.update(block)
                sent += len(block)
                c.sent += len(block)
        except BaseException as e:
            empty = not offset and not sent  # nothing to resume: the source gave no byte
            stale = isinstance(e, SourceChanged)  # a partial of a version that is gone
            raise
        finally:
            if isinstance(hasher, _HashingThread):
                hasher.close()
            try:
                _write(out, None, dst, c.partial)
            finally:
                if empty or stale:
                    _quiet(dst.remove_partial, c.partial)
        c.attrs_set = bool(getattr(out, "attrs_set", False))
        c.dst_md5 = getattr(out, "md5", None)
        c.digest = hasher.hexdigest()
        if offset + sent != source.size:
            raise TransferError(
                f"source changed during transfer ({offset + sent} bytes read, "
                f"{source.size} expected); will retry on the next run"
            )
        if src is self.local:
            # The path too: a local file replaced while the old one was read is caught.
            now = src.stat(a.path)
            if now is None or now.size != source.size or now.mtime != source.mtime:
                _quiet(dst.remove_partial, c.partial)
                raise SourceChanged()

    def _resume_offset(self, c: _Copy, src: Transport, dst: Transport, dst_side: Side) -> int:
        """Return how many bytes of an existing partial are proven to match the source."""
        have = self.manifests[dst_side].partials.get(c.partial, 0)
        source = c.action.source
        assert source is not None
        if have <= 0 or have > source.size:
            return 0
        found = dst.stat(c.partial)
        if found is None or found.kind != "file" or found.size != have:
            return 0
        try:
            dst_md5 = dst.hash_files([c.partial]).get(c.partial)
            src_md5 = src.hash_prefix(c.action.path, have)
        except (HashUnavailable, TransferError):
            return 0
        if dst_md5 and src_md5 and dst_md5 == src_md5:
            return have
        return 0

    def _drop_stale_partials(self, path: str, keep: str, dst_side: Side, dst: Transport) -> None:
        """Remove partials of ``path`` left by an older source version."""
        # keep is ".NAME.<tag>.leftpart", or ".<md5 of NAME>.<tag>.leftpart" for a name
        # too long to fit: either way, the part up to the tag is shared by every version.
        if not self.manifests[dst_side].partials:
            return  # the scan found none (the usual case): nothing to look up per file
        with self._index_lock:
            index = self._partials_by_stem.get(dst_side)
            if index is None:  # once per side, not a pass over every partial per file
                index = self._partials_by_stem[dst_side] = {}
                for p in self.manifests[dst_side].partials:
                    stem = _version_stem(p)
                    if stem is not None:
                        index.setdefault(stem, []).append(p)
            stale = [p for p in index.pop(_version_stem(keep) or "", []) if p != keep]
        for p in stale:
            _quiet(dst.remove_partial, p)
            self.manifests[dst_side].partials.pop(p, None)

    def _verify(
        self,
        actions: list[Action],
        copies: dict[str, _Copy],
        mode: str,
        prehash: Future | None = None,
    ) -> set[str]:
        """Return the paths whose receiving-side copy matches the source."""
        ok: set[str] = set()
        live = [a for a in actions if not copies[a.path].error]
        if not live:
            return ok
        if mode == "size":
            many: dict[str, Entry | None] = {}
            if self._many_stats:  # the peer's partials in one round trip, not one each
                remote = self.remote
                assert isinstance(remote, ManyStats)
                partials = [copies[a.path].partial for a in live if self._endpoints(a)[1] is remote]
                many = remote.stat_many(partials) if partials else {}
            for a in live:
                c = copies[a.path]
                _, dst, _ = self._endpoints(a)
                found = many[c.partial] if c.partial in many else dst.stat(c.partial)
                # a partial swapped for a directory or a FIFO is no copy, whatever its size
                if (
                    found is not None
                    and found.kind == FILE
                    and a.source
                    and found.size == a.source.size
                ):
                    ok.add(a.path)
            return ok
        by_dst: dict[int, list[Action]] = {}
        for a in live:
            by_dst.setdefault(id(self._endpoints(a)[1]), []).append(a)
        for group in by_dst.values():
            src, dst, _ = self._endpoints(group[0])
            if dst is self.local and src is not self.local:
                # Receiving side is local: its bytes were hashed as written;
                # compare with the source's MD5 computed by the peer.
                sums = (
                    prehash.result()
                    if prehash is not None
                    else src.hash_files([a.path for a in group])
                )
                for a in group:
                    if sums.get(a.path) == copies[a.path].digest:
                        ok.add(a.path)
            else:
                # A partial the receiving side already hashed while it arrived
                # (large files) needs no second pass, unless that hash disagrees.
                partials = [
                    copies[a.path].partial
                    for a in group
                    if copies[a.path].dst_md5 != copies[a.path].digest
                ]
                sums = dst.hash_files(partials) if partials else {}
                for a in group:
                    c = copies[a.path]
                    if c.dst_md5 == c.digest or sums.get(c.partial) == c.digest:
                        ok.add(a.path)
        return ok

    def _commit_all(
        self, actions: list[Action], copies: dict[str, _Copy], mode: str, sink: list[Outcome] | None
    ) -> None:
        """Rename verified partials into place: new names together on a side that can
        (``ManyRenames``), the rest one by one (those re-check what they replace, see
        ``Transport.commit``)."""
        done: set[str] = set()
        for kind, side in ((Kind.UPLOAD, self.remote), (Kind.DOWNLOAD, self.local)):
            if isinstance(side, ManyRenames):
                new = [
                    a
                    for a in actions
                    if a.kind is kind and a.expected is None and copies[a.path].attrs_set
                ]
                if len(new) > 1:
                    done |= self._rename_new(side, new, copies, mode, sink)
        rest = [a for a in actions if a.path not in done]
        self._map(lambda a: self._finish(copies[a.path], mode, sink), rest)

    def _rename_new(
        self,
        side: ManyRenames,
        new: list[Action],
        copies: dict[str, _Copy],
        mode: str,
        sink: list[Outcome] | None,
    ) -> set[str]:
        """Give new names to the partials of ``new`` together; return the paths settled
        (placed, or failed for good); the others are left to the one-by-one commit."""
        failed = side.rename_new([(copies[a.path].partial, a.path) for a in new])
        done = set()
        for a in new:
            c = copies[a.path]
            error = failed.get(c.partial)
            if error is None:
                self._committed(c, mode, sink)
            elif isinstance(error, (ChangedError, RenameRefused)):
                _not_placed(c, side, error)
            else:
                # It may have met a name that appeared since the scan:
                # commit() tells that apart and reports it.
                continue
            done.add(a.path)
        return done

    def _finish(self, c: _Copy, mode: str, sink: list[Outcome] | None) -> None:
        a = c.action
        assert a.source is not None
        _, dst, _ = self._endpoints(a)
        try:
            if not c.attrs_set:
                dst.set_attrs(c.partial, a.source.mtime, a.source.mode)
            dst.commit(c.partial, a.path, a.expected)
        except (TransferError, OSError) as e:
            _not_placed(c, dst, e)
            return
        self._committed(c, mode, sink)

    def _committed(self, c: _Copy, mode: str, sink: list[Outcome] | None) -> None:
        a = c.action
        assert a.source is not None
        result = a.source.with_md5(c.digest) if mode == "md5" else a.source
        self._out(
            Outcome(
                a,
                Status.OK,
                bytes=c.sent,
                resumed_from=c.resumed_from,
                verified=mode,
                result=result,
            ),
            sink,
        )


class _HashingThread:
    """An MD5 that takes its blocks on a thread of its own.

    hashlib lets go of the GIL while it hashes a large block, so a large copy's
    hash runs beside the reads and writes of the thread that copies instead of
    after each of them. At most ``AHEAD`` blocks wait; ``close`` (always called)
    lets the thread finish, and ``hexdigest`` waits for it.
    """

    AHEAD = 16

    def __init__(self, h: hashlib._Hash) -> None:
        self._h = h
        self._blocks: queue.Queue[bytes | memoryview | None] = queue.Queue(self.AHEAD)
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="md5", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._blocks.get()) is not None:
            if self._error is None:
                try:
                    self._h.update(block)
                except BaseException as e:  # kept for hexdigest; the queue is still drained
                    self._error = e

    def update(self, block: bytes | memoryview) -> None:
        self._blocks.put(block)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._blocks.put(None)

    def hexdigest(self) -> str:
        self.close()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._h.hexdigest()


def _write(out: BinaryIO, block: bytes | memoryview | None, dst: Transport, partial: str) -> None:
    """Write ``block`` to a partial file (None: close it).

    When the receiving side refuses the bytes (disk full, quota, permission, I/O
    error), the partial is removed: it could not be completed anyway, and left
    behind it would keep the disk full for every file after it. An interruption
    or a lost connection is not a refusal: that partial stays, for resume.
    """
    try:
        if block is None:
            out.close()
        else:
            out.write(block)
    except (TransferError, OSError):
        if block is not None:
            _quiet(out.close)
        _quiet(dst.remove_partial, partial)
        raise


def _version_stem(partial: str) -> str | None:
    """The part of a partial's name that every version of its file shares (up to the tag).

    None for a name that is not ``STEM<tag>.leftpart`` with a tag free of '/' and '.'.
    """
    if not partial.endswith(PARTIAL_SUFFIX):
        return None
    stem = partial[: -len(PARTIAL_SUFFIX)]
    cut = stem.rfind(".") + 1
    return None if "/" in stem[cut:] else stem[:cut]


def _prefix_hash(t: Transport, path: str, length: int) -> hashlib._Hash:
    h = hashlib.md5()
    remaining = length
    for block in t.read_chunks(path, 0):
        if remaining <= 0:
            break
        piece = block[:remaining]
        h.update(piece)
        remaining -= len(piece)
    if remaining:
        raise TransferError("partial file shrank while resuming")
    return h


def _copies_content(a: Action) -> bool:
    """Tell whether running ``a`` sends file content (a transfer, or resolving a conflict)."""
    if a.kind is Kind.CONFLICT:
        return a.winner is not None
    return a.is_transfer and not a.meta_only


def _moved(e: Entry, path: str) -> Entry:
    return Entry(path, e.kind, e.size, e.mtime, e.mode, e.md5)


def _not_placed(c: _Copy, dst: ManyRenames | Transport, e: Exception) -> None:
    """Record why ``c`` did not get its name: skipped when the name changed since
    the scan (its partial then goes), failed otherwise."""
    if isinstance(e, ChangedError):
        _quiet(dst.remove_partial, c.partial)
        c.error = f"skipped: {e}"
    else:
        c.error = _message(e)


def _wait_all(futures: list[Future]) -> None:
    for f in futures:
        f.result()


def _quiet(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except (TransferError, OSError):
        pass


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e)
