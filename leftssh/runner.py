"""One run from end to end: scan, hash, plan, safety, execute, report."""

from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from leftssh.errors import ConnectError, Interrupted, LockError, SafetyError, UsageError
from leftssh.execute import ExecOptions, Executor, VerifyUnavailable
from leftssh.ignore import IgnoreRules
from leftssh.lock import Heartbeat
from leftssh.model import Action, BaseEntry, Kind, Manifest, Outcome, Plan, Side, Status
from leftssh.plan import needs_hash_oneway, plan_oneway
from leftssh.reconcile import (
    base_records,
    needs_hash_sync,
    next_base,
    plan_sync,
    same_base,
    simulate,
)
from leftssh.report import Reporter
from leftssh.safety import DEFAULT_MAX_DELETE, check_max_delete
from leftssh.state import BaseStore, pair_key
from leftssh.target import SshSettings, Target, resolve_ssh
from leftssh.transport.base import HashUnavailable, Transport, WarmsUp
from leftssh.transport.local import LocalTransport


@dataclass
class RunOptions:
    """Everything the command line decided, for one target."""

    local_dir: Path
    port: int | None = None
    identity: str | None = None
    ssh_config: str | None = None
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    dry_run: bool = False
    checksum: bool = False
    delete: bool = False
    max_delete: str = DEFAULT_MAX_DELETE
    force: bool = False
    conflict: str = "newer"
    verify: str = "auto"
    compress: bool = False
    bwlimit: float | None = None
    jobs: int = 4
    timeout: float = 30.0


def open_remote(target: Target, opts: RunOptions, settings: SshSettings | None = None) -> Transport:
    """Open the transport for TARGET: a local directory or an SFTP session.

    ``settings``, when given, are what :func:`ssh_settings` returned for TARGET.
    """
    if target.local_path is not None:
        if target.local_path.resolve() == opts.local_dir.resolve():
            raise UsageError("the target is the local share itself")
        return LocalTransport(target.local_path, label=target.raw)
    from leftssh.transport.sftp import SFTPTransport

    if settings is None:
        settings = ssh_settings(target, opts)
    return SFTPTransport(settings, target.path, target.label(), opts.timeout)


def ssh_settings(target: Target, opts: RunOptions) -> SshSettings:
    """Resolve how to reach an SSH TARGET (ssh_config, options, defaults)."""
    return resolve_ssh(
        target,
        port=opts.port,
        identity=opts.identity,
        ssh_config=opts.ssh_config,
        known_hosts=opts.known_hosts,
        accept_new=opts.accept_new_host_key,
        timeout=opts.timeout,
        compress=opts.compress,
    )


def filter_ignored(manifest: Manifest, rules: IgnoreRules, entries: bool = True) -> None:
    """Drop entries the combined ignore rules exclude (both sides use the same rules).

    ``entries=False`` filters only what was reported as skipped: the scan already
    applied these very rules to the entries.
    """
    if entries:
        for path in [p for p, e in manifest.entries.items() if rules.is_ignored(p, e.is_dir)]:
            del manifest.entries[path]
    manifest.skipped = [s for s in manifest.skipped if not rules.is_ignored(s.path, False)]


def combined_rules(base: IgnoreRules, *manifests: Manifest) -> IgnoreRules:
    """Project rules plus every nested .leftignore found on either side."""
    rules = base.copy()
    seen: set[tuple[str, bytes]] = set()
    for m in manifests:
        for directory, data in sorted(m.ignore_files.items()):
            if (directory, data) not in seen:
                seen.add((directory, data))
                rules.add_nested(directory, data)
    return rules


class Connecting:
    """The remote transport, opened on a thread of its own.

    Connecting is mostly waiting for the peer (key exchange, authentication, the
    SFTP subsystem starting), so the local share is locked and scanned meanwhile.
    Given ``scan`` rules, the thread then goes on to lock the remote share (with
    ``locks``, once the local side is locked: the order of a run's locks stays
    local first, and the lock is refreshed from the moment it is taken) and to
    list it, while the local scan still runs.
    """

    def __init__(
        self,
        target: Target,
        opts: RunOptions,
        scan: IgnoreRules | None = None,
        locks: _Locks | None = None,
    ) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._remote: Transport | None = None
        self._settings: SshSettings | None = None
        self._resolved = threading.Event()
        self._error: BaseException | None = None
        self._abandoned = False
        self._rules = scan
        self._locks = locks
        self._local_locked = threading.Event()
        self._lock_settled = threading.Event()  # the remote lock is taken, or will not be
        self._manifest: Manifest | None = None
        self._scan_error: BaseException | None = None
        self._hashes = opts.verify != "size"
        self._thread = threading.Thread(
            target=self._connect, args=(target, opts), name="connect", daemon=True
        )
        self._thread.start()

    @property
    def scans(self) -> bool:
        return self._rules is not None

    def _connect(self, target: Target, opts: RunOptions) -> None:
        try:
            try:
                if target.local_path is None:
                    self._settings = ssh_settings(target, opts)
            finally:
                self._resolved.set()
            remote = open_remote(target, opts, self._settings)
        except BaseException as e:
            self._error = e
            self._lock_settled.set()
            return
        with self._lock:
            self._remote = remote
            abandoned = self._abandoned
        if abandoned or self._rules is None:
            self._lock_settled.set()
            if abandoned:
                _close_quietly(remote)
            return
        self._lock_and_scan(remote)

    def _lock_and_scan(self, remote: Transport) -> None:
        assert self._rules is not None
        try:
            try:
                if self._locks is not None:
                    self._local_locked.wait()
                    with self._lock:
                        if self._abandoned:
                            return
                    if remote.root_exists():
                        self._locks.take(remote)
            finally:
                self._lock_settled.set()
            if not self._abandoned:
                self._manifest = remote.scan(self._rules)
                if self._locks is not None and not self._manifest.entries:
                    # Nothing there: whatever the local share holds will be copied.
                    if isinstance(remote, WarmsUp):
                        remote.warm_up(hashes=self._hashes)
        except BaseException as e:
            self._scan_error = e

    def local_side_locked(self) -> None:
        """The local share is locked (or needs no lock): the remote one may be locked now."""
        self._local_locked.set()

    def result(self) -> Transport:
        """Wait for the connection (and the scan, if asked for); raise what stopped it."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._remote is not None
        return self._remote

    def scanned(self) -> Manifest:
        """The remote manifest (after ``result``); raise what stopped the lock or the scan."""
        if self._scan_error is not None:
            raise self._scan_error
        assert self._manifest is not None
        return self._manifest

    def settings(self) -> SshSettings | None:
        """The SSH settings of the target once resolved (before the connection is made);
        None for a local target or when resolving them failed (``result`` raises that)."""
        self._resolved.wait()
        return self._settings

    def abandon(self) -> None:
        """The run ends before it used the connection: close it whenever it is made.

        A remote lock being taken is waited for (not the listing after it), so that
        closing the connection removes it before the run exits; the closed connection
        then ends the listing.
        """
        with self._lock:
            self._abandoned = True
            remote = self._remote
        self._local_locked.set()
        if remote is not None:
            self._lock_settled.wait()
            _close_quietly(remote)  # which removes a remote lock taken meanwhile


def scan_sides(
    local: Transport,
    remote: Transport | Connecting,
    ignore: IgnoreRules,
    locks: _Locks | None = None,
    meanwhile: Callable[[], object] | None = None,
) -> tuple[Transport, Manifest, Manifest]:
    """Lock (with ``locks``) and scan each side, then drop what the combined ignore
    rules of both exclude. The local side goes first, while ``remote`` may still be
    connecting (and, if it ``scans``, then locking and listing the remote side), and
    then ``meanwhile`` is called (the local lock held) if the remote side is not done
    yet; returns the connected remote transport and the two manifests."""
    if locks is not None and local.root_exists():
        locks.take(local)
    if isinstance(remote, Connecting):
        remote.local_side_locked()
    local_m = local.scan(ignore)
    if isinstance(remote, Connecting):
        pending = remote
        if meanwhile is not None:
            meanwhile()
        remote = pending.result()
        if pending.scans:
            remote_m = pending.scanned()
        else:
            remote_m = _lock_and_scan(remote, ignore, locks)
    else:
        remote_m = _lock_and_scan(remote, ignore, locks)
    rules = combined_rules(ignore, local_m, remote_m)
    # Each scan applied the project rules and its own side's .leftignore files; when
    # both sides hold the same ones, those are already the combined rules.
    again = local_m.ignore_files != remote_m.ignore_files
    filter_ignored(local_m, rules, entries=again)
    filter_ignored(remote_m, rules, entries=again)
    return remote, local_m, remote_m


def _lock_and_scan(remote: Transport, ignore: IgnoreRules, locks: _Locks | None) -> Manifest:
    if locks is not None and remote.root_exists():
        locks.take(remote)
    return remote.scan(ignore)


def _close_remote(remote: Transport | None, pending: Connecting | None) -> None:
    if remote is not None:
        _close_quietly(remote)
    elif pending is not None:
        pending.abandon()


def oneway(
    direction: str,
    target: Target,
    opts: RunOptions,
    reporter: Reporter,
    stop: threading.Event,
) -> int:
    """Run ``push`` (direction 'push') or ``pull``; return the exit code."""
    local_dir = opts.local_dir
    ignore = IgnoreRules.from_project(local_dir)
    if direction == "push" and not local_dir.is_dir():
        raise UsageError(f"local share {local_dir} does not exist (use -d to choose another)")
    if local_dir.exists() and not local_dir.is_dir():
        raise UsageError(f"local share {local_dir} is not a directory")
    locks = _Locks(direction)
    pending = Connecting(target, opts, ignore, None if opts.dry_run else locks)
    remote: Transport | None = None
    local = LocalTransport(local_dir)
    try:
        remote, local_m, remote_m = scan_sides(
            local, pending, ignore, None if opts.dry_run else locks
        )
        if direction == "pull" and not remote_m.exists:
            raise UsageError(f"remote share {remote.label} does not exist")
        if direction == "push":
            src_m, dst_m, dst_side = local_m, remote_m, Side.REMOTE
        else:
            src_m, dst_m, dst_side = remote_m, local_m, Side.LOCAL
        if opts.checksum:
            _fill_hashes(needs_hash_oneway(src_m, dst_m, True), local, remote, local_m, remote_m)
        plan: Plan = plan_oneway(src_m, dst_m, dst_side, checksum=opts.checksum, delete=opts.delete)
        if opts.delete and not opts.force:
            check_max_delete(plan, {dst_side: dst_m}, opts.max_delete)
        if not opts.dry_run:
            dst = remote if direction == "push" else local
            dst.ensure_root()
            locks.take(dst)
        executor = Executor(
            local=local,
            remote=remote,
            manifests={Side.LOCAL: local_m, Side.REMOTE: remote_m},
            options=ExecOptions(
                verify=opts.verify, jobs=opts.jobs, bwlimit=opts.bwlimit, dry_run=opts.dry_run
            ),
            emit=reporter.emit,
            warn=reporter.warn,
            stop=stop,
            on_bytes=reporter.advance,
        )
        _start_progress(reporter, plan)
        executor.run(plan)
        return reporter.exit_code()
    finally:
        locks.release()
        local.close()
        _close_remote(remote, pending)


def _start_progress(reporter: Reporter, plan: Plan) -> None:
    sizes = {
        a.path: a.source.size
        for a in plan.actions
        if a.is_transfer and a.source and not a.meta_only
    }
    for a in plan.actions:
        if a.kind is Kind.CONFLICT and a.winner is not None:
            sizes[a.path] = (a.local.size if a.local else 0) + (a.remote.size if a.remote else 0)
    reporter.start_progress(sum(sizes.values()), len(sizes), sizes)


def _fill_hashes(
    paths: list[str],
    local: Transport,
    remote: Transport,
    local_m: Manifest,
    remote_m: Manifest,
) -> None:
    if not paths:
        return
    try:
        remote_sums = remote.hash_files(paths)
    except HashUnavailable as e:
        raise UsageError(f"--checksum needs MD5 on the peer: {e}") from e
    local_sums = local.hash_files(paths)
    for path in paths:
        local_m.entries[path] = local_m.entries[path].with_md5(local_sums.get(path))
        remote_m.entries[path] = remote_m.entries[path].with_md5(remote_sums.get(path))


class _Locks:
    """Locks taken on each side for one run; released in reverse order.

    The remote lock may be taken on the connecting thread (see ``Connecting``).
    """

    def __init__(self, command: str) -> None:
        self.command = command
        self.held: list[Transport] = []
        self._beat: Heartbeat | None = None
        self._mutex = threading.Lock()

    def take(self, t: Transport) -> None:
        if t in self.held:
            return
        t.acquire_lock(self.command)
        with self._mutex:
            self.held.append(t)
            if self._beat is None:
                self._beat = Heartbeat([self._touch]).start()

    def _touch(self) -> None:
        with self._mutex:
            held = list(self.held)
        for t in held:
            t.touch_lock()

    def release(self) -> None:
        with self._mutex:
            beat, held = self._beat, list(self.held)
            self.held.clear()
        if beat is not None:
            beat.stop()
        for t in reversed(held):
            t.release_lock()


def _pair_store(target: Target, opts: RunOptions, remote: Transport) -> BaseStore:
    if target.local_path is not None:
        return _store_for(opts, "", "", 0, str(target.local_path))
    settings = remote.settings  # type: ignore[attr-defined]
    return _store_for(opts, settings.user, settings.hostname, settings.port, remote.root)  # type: ignore[attr-defined]


def _foreseen_store(opts: RunOptions, pending: Connecting) -> BaseStore | None:
    """The store ``_pair_store`` will name once connected, when it is known before:
    a local target, or an absolute remote path (a relative one needs the login directory).
    """
    target = pending.target
    if target.local_path is not None:
        return _store_for(opts, "", "", 0, str(target.local_path))
    if not target.path.startswith("/"):
        return None
    settings = pending.settings()
    if settings is None:
        return None
    root = posixpath.normpath(target.path)
    return _store_for(opts, settings.user, settings.hostname, settings.port, root)


class _EarlyBase:
    """The base, read while the connection is being made, for ``load`` to hand out.

    Reading it is what a run does next once connected; its key is known earlier for
    most targets. A read error is kept and raised by ``load``, where it would have
    been raised anyway (after a connection error, not before it).
    """

    def __init__(self, opts: RunOptions, pending: Connecting | None) -> None:
        self.opts = opts
        self.pending = pending
        self.path: Path | None = None
        self.base: dict[str, BaseEntry] | None = None
        self.error: UsageError | None = None

    def read(self) -> None:
        if self.pending is None:
            return
        store = _foreseen_store(self.opts, self.pending)
        if store is None:
            return
        try:
            self.base = store.load()
        except UsageError as e:
            self.error = e
        self.path = store.path

    def load(self, store: BaseStore) -> dict[str, BaseEntry] | None:
        if store.path != self.path:
            return store.load()
        if self.error is not None:
            raise self.error
        return self.base


def _store_for(opts: RunOptions, user: str, host: str, port: int, path: str) -> BaseStore:
    key = pair_key(opts.local_dir, user, host, port, path)
    describe = {
        "local": str(opts.local_dir),
        "user": user,
        "host": host,
        "port": port,
        "remote": path,
    }
    return BaseStore(key, describe)


def base_file_count(base: dict[str, BaseEntry], side: Side) -> int:
    return sum(1 for e in base.values() if e.kind == "file" and e.snap(side) is not None)


def check_emptied_root(
    base: dict[str, BaseEntry], manifests: dict[Side, Manifest], labels: dict[Side, str]
) -> None:
    """Stop (exit 6) when a side whose base had files is now empty or missing."""
    for side, m in manifests.items():
        had = base_file_count(base, side)
        if had and m.file_count() == 0:
            state = "missing" if not m.exists else "empty"
            raise SafetyError(
                f"the {side.value} share {labels[side]} is {state} but held {had} file(s) at "
                "the last sync (an unmounted disk or a wrong path?); nothing was changed. "
                "If you really emptied it, pass --force to delete everything on the other side"
            )


def sync(
    mode: str,
    target: Target,
    opts: RunOptions,
    reporter: Reporter,
    stop: threading.Event,
    remote: Transport | None = None,
) -> int:
    """Run ``sync`` (mode 'sync') or ``status`` (mode 'status'); return the exit code.

    A ``remote`` transport passed in (by ``watch``) is used and left open.
    """
    local_dir = opts.local_dir
    ignore = IgnoreRules.from_project(local_dir)
    if local_dir.exists() and not local_dir.is_dir():
        raise UsageError(f"local share {local_dir} is not a directory")
    read_only = mode == "status" or opts.dry_run
    owned = remote is None
    locks = _Locks(mode)
    pending = (
        Connecting(target, opts, ignore, None if read_only else locks) if remote is None else None
    )
    local = LocalTransport(local_dir)
    early = _EarlyBase(opts, pending)

    def early_read() -> None:
        # Only under the local lock (the base belongs to the local side): with no local
        # share yet there is none, and the base is read after the remote lock instead.
        if read_only or local in locks.held:
            early.read()

    try:
        remote, local_m, remote_m = scan_sides(
            local, pending or remote, ignore, None if read_only else locks, early_read
        )
        store = _pair_store(target, opts, remote)
        base = early.load(store)
        reporter.info(f"sync state: {store.path}" + ("" if base is not None else " (none yet)"))
        manifests = {Side.LOCAL: local_m, Side.REMOTE: remote_m}
        if not local_m.exists and not remote_m.exists:
            raise UsageError(
                f"neither the local share {local_dir} nor the remote share {remote.label} exists"
            )
        if base is not None and not opts.force:
            check_emptied_root(
                base, manifests, {Side.LOCAL: local.label, Side.REMOTE: remote.label}
            )
        needed = needs_hash_sync(base or {}, local_m, remote_m, opts.checksum)
        verify_mode = opts.verify
        if needed:
            try:
                _fill_hashes(needed, local, remote, local_m, remote_m)
            except UsageError:
                if opts.checksum:
                    raise
                # One warning for the one cause; transfers then need no second one.
                reporter.warn(
                    f"MD5 is not available on {remote.label} (no md5sum through exec): "
                    "files changed on both sides are treated as conflicts"
                    + (", transfers are verified by size only" if verify_mode == "auto" else "")
                )
                verify_mode = "size" if verify_mode == "auto" else verify_mode
        plan = plan_sync(base or {}, local_m, remote_m, opts.conflict, checksum=opts.checksum)
        if not opts.force:
            check_max_delete(plan, manifests, opts.max_delete)
        if read_only:
            Executor(
                local=local,
                remote=remote,
                manifests=manifests,
                options=ExecOptions(dry_run=True),
                emit=reporter.emit,
                warn=reporter.warn,
                stop=stop,
            ).run(plan)
            if mode == "status":
                pending = any(a.kind is not Kind.SKIP for a in plan.actions)
                return 1 if pending else 0
            return 0
        for t, m in ((local, local_m), (remote, remote_m)):
            if not m.exists:
                t.ensure_root()
                locks.take(t)
        executor = Executor(
            local=local,
            remote=remote,
            manifests=manifests,
            options=ExecOptions(verify=verify_mode, jobs=opts.jobs, bwlimit=opts.bwlimit),
            emit=reporter.emit,
            warn=reporter.warn,
            stop=stop,
            on_bytes=reporter.advance,
        )
        _start_progress(reporter, plan)
        try:
            executor.run(plan)
        finally:
            _save_base(store, base, local_m, remote_m, executor.outcomes, plan)
        return reporter.exit_code()
    finally:
        locks.release()
        local.close()
        if owned:
            _close_remote(remote, pending)


def _save_base(
    store: BaseStore,
    base: dict[str, BaseEntry] | None,
    local_m: Manifest,
    remote_m: Manifest,
    outcomes: list[Outcome],
    plan: Plan,
) -> None:
    """Save the new base: what succeeded is agreed; every other planned path keeps its old record.

    When that is the base already (a sync with nothing to do), nothing is built or written.
    """
    if base is not None and plan.base_current:
        return  # every path as the base has it: nothing to record
    old = base or {}
    done: list[Action] = []
    settled: set[int] = set()
    for o in outcomes:
        if o.status is Status.OK:
            a = o.action
            if a.is_transfer and o.result is not None:
                a = replace(a, source=o.result)
            done.append(a)
            settled.add(id(o.action))
    unsettled: set[str] = set()
    for a in plan.actions:
        if a.kind is Kind.SKIP:
            continue
        if id(a) not in settled:
            unsettled.add(a.path)
            if a.keep:
                unsettled.add(a.keep)
    if done:
        local_after, remote_after = simulate(local_m.entries, remote_m.entries, done)
    else:
        local_after, remote_after = local_m.entries, remote_m.entries
    if base is None or not same_base(old, base_records(old, local_after, remote_after, unsettled)):
        store.save(next_base(old, local_after, remote_after, unsettled))


def verify(target: Target, opts: RunOptions, reporter: Reporter, stop: threading.Event) -> int:
    """MD5 every file present on both sides; report those that differ (exit 1 if any)."""
    local_dir = opts.local_dir
    ignore = IgnoreRules.from_project(local_dir)
    if not local_dir.is_dir():
        raise UsageError(f"local share {local_dir} does not exist")
    pending = Connecting(target, opts, ignore)
    remote: Transport | None = None
    local = LocalTransport(local_dir)
    try:
        remote, local_m, remote_m = scan_sides(local, pending, ignore)
        if not remote_m.exists:
            raise UsageError(f"remote share {remote.label} does not exist")
        both = sorted(
            p
            for p, e in local_m.entries.items()
            if not e.is_dir and (r := remote_m.entries.get(p)) is not None and not r.is_dir
        )
        if not remote.can_hash():
            raise VerifyUnavailable(
                f"verify needs md5sum on {remote.label}, which cannot run it (SFTP-only account?)"
            )
        remote_sums = remote.hash_files(both)
        local_sums = local.hash_files(both)
        differ = 0
        for path in both:
            ls, rs = local_sums.get(path), remote_sums.get(path)
            if ls is None or rs is None or ls != rs:
                differ += 1
                why = "could not be read" if ls is None or rs is None else "content differs"
                reporter.emit(
                    Outcome(
                        Action(Kind.VERIFY, path),
                        Status.FAILED,
                        error=f"{why} (local {ls or '-'}, remote {rs or '-'})",
                        verified="md5",
                    )
                )
        reporter.extra_summary = {"verified": len(both) - differ, "differ": differ}
        return 1 if differ else 0
    finally:
        local.close()
        _close_remote(remote, pending)


def _fingerprint(manifest: Manifest) -> int:
    return hash(
        (
            manifest.exists,
            frozenset((e.path, e.kind, e.size, e.mtime, e.mode) for e in manifest.entries.values()),
        )
    )


def watch(
    target: Target,
    opts: RunOptions,
    reporter: Reporter,
    stop: threading.Event,
    *,
    interval: float = 2.0,
    remote_interval: float = 10.0,
    max_backoff: float = 60.0,
) -> int:
    """Sync, then keep syncing whenever either side changes, until SIGINT/SIGTERM.

    The local tree is polled with a stat scan every ``interval`` seconds, the
    remote one listed every ``remote_interval`` seconds. When the peer goes
    away this is reported once and the connection retried with exponential
    backoff. Returns 0 on a clean stop, 8 if the stop cut a transfer.
    """
    ignore = IgnoreRules.from_project(opts.local_dir)
    local = LocalTransport(opts.local_dir)
    remote: Transport | None = None
    backoff = 1.0
    down = False
    last: tuple[int, int] | None = None
    next_remote = 0.0
    remote_fp = 0
    last_lock_message = ""
    try:
        while not stop.is_set():
            try:
                if remote is None:
                    remote = open_remote(target, opts)
                    if down:
                        reporter.warn(f"{remote.label} is reachable again")
                    down, backoff, last = False, 1.0, None
                local_fp = _fingerprint(local.scan(ignore))
                now = time.monotonic()
                if last is None or now >= next_remote:
                    remote_fp = _fingerprint(remote.scan(ignore))
                    next_remote = now + remote_interval
                if last != (local_fp, remote_fp):
                    sync("sync", target, opts, reporter, stop, remote=remote)
                    reporter.info("in sync; watching for changes")
                    # Remember the state seen *before* this sync: whatever the sync changed,
                    # or anyone changed while it ran, differs from it and is synced next
                    # round (a no-op sync when nothing new happened). Fingerprints taken
                    # after the sync would hide changes made while it ran.
                    last = (local_fp, remote_fp)
            except ConnectError as e:
                if not down:
                    reporter.warn(f"peer unreachable ({e}); retrying with backoff")
                    down = True
                if remote is not None:
                    _close_quietly(remote)
                    remote = None
                stop.wait(backoff)
                backoff = min(backoff * 2, max_backoff)
                continue
            except LockError as e:
                if str(e) != last_lock_message:
                    reporter.warn(f"{e}; retrying")
                    last_lock_message = str(e)
                stop.wait(interval)
                continue
            except Interrupted as e:
                return Interrupted.exit_code if e.cut else 0
            stop.wait(interval)
        return 0
    finally:
        local.close()
        if remote is not None:
            _close_quietly(remote)


def _close_quietly(t: Transport) -> None:
    try:
        t.close()
    except Exception:
        pass
