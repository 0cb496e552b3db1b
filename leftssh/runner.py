"""One run from end to end: scan, hash, plan, safety, execute, report."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from leftssh.errors import UsageError
from leftssh.execute import ExecOptions, Executor
from leftssh.ignore import IgnoreRules
from leftssh.model import Manifest, Plan, Side
from leftssh.plan import needs_hash_oneway, plan_oneway
from leftssh.report import Reporter
from leftssh.safety import DEFAULT_MAX_DELETE, check_max_delete
from leftssh.target import Target, parse_target, resolve_ssh
from leftssh.transport.base import HashUnavailable, Transport
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


def open_remote(target: Target, opts: RunOptions) -> Transport:
    """Open the transport for TARGET: a local directory or an SFTP session."""
    if target.local_path is not None:
        if target.local_path.resolve() == opts.local_dir.resolve():
            raise UsageError("the target is the local share itself")
        return LocalTransport(target.local_path, label=target.raw)
    from leftssh.transport.sftp import SFTPTransport

    settings = resolve_ssh(
        target,
        port=opts.port,
        identity=opts.identity,
        ssh_config=opts.ssh_config,
        known_hosts=opts.known_hosts,
        accept_new=opts.accept_new_host_key,
        timeout=opts.timeout,
        compress=opts.compress,
    )
    return SFTPTransport(settings, target.path, target.label(), opts.timeout)


def filter_ignored(manifest: Manifest, rules: IgnoreRules) -> None:
    """Drop entries the combined ignore rules exclude (both sides use the same rules)."""
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


def target_label(text: str) -> str:
    return parse_target(text).label()


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
    remote = open_remote(target, opts)
    local = LocalTransport(local_dir)
    try:
        reporter.info(f"scanning {local.label}")
        local_m = local.scan(ignore)
        reporter.info(f"listing {remote.label}")
        remote_m = remote.scan(ignore)
        if direction == "pull" and not remote_m.exists:
            raise UsageError(f"remote share {remote.label} does not exist")
        rules = combined_rules(ignore, local_m, remote_m)
        filter_ignored(local_m, rules)
        filter_ignored(remote_m, rules)
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
            (remote if direction == "push" else local).ensure_root()
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
        )
        executor.run(plan)
        return reporter.exit_code()
    finally:
        local.close()
        remote.close()


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
