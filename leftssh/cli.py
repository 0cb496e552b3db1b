"""The command line: the only module that prints to the user or exits."""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from leftssh import __version__
from leftssh.errors import Interrupted, LeftsshError, TransferError, UsageError
from leftssh.paths import display
from leftssh.report import Reporter
from leftssh.runner import RunOptions, oneway, sync, verify, watch
from leftssh.safety import DEFAULT_MAX_DELETE, parse_max_delete
from leftssh.target import Target, parse_target

_SUFFIX = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_rate(text: str | None) -> float | None:
    """Parse a --bwlimit RATE such as 500k, 10M or 1G (bytes per second, 1024-based)."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(?:i?B)?(?:/s)?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"invalid --bwlimit {text!r}: use bytes per second, e.g. 500k or 10M")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


def _opt(*names: str, env: str, **kw: Any) -> Callable:
    return click.option(*names, envvar=f"LEFTSSH_{env}", show_envvar=True, **kw)


CONNECTION_OPTIONS = [
    _opt(
        "-d",
        "--dir",
        "local_dir",
        env="DIR",
        default="share",
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Local share directory.",
    ),
    _opt("-p", "--port", env="PORT", type=click.IntRange(1, 65535), help="SSH port."),
    _opt("-i", "--identity", env="IDENTITY", metavar="FILE", help="Private key file."),
    _opt("-F", "--ssh-config", env="SSH_CONFIG", metavar="FILE", help="SSH config file."),
    _opt("--known-hosts", env="KNOWN_HOSTS", metavar="FILE", help="known_hosts file."),
    _opt(
        "--accept-new-host-key",
        env="ACCEPT_NEW_HOST_KEY",
        is_flag=True,
        help="Trust and record an unknown host key (a changed key is always refused).",
    ),
    _opt("-z", "--compress", env="COMPRESS", is_flag=True, help="SSH compression."),
    _opt(
        "--timeout",
        env="TIMEOUT",
        type=click.FloatRange(min=0.1),
        default=30.0,
        show_default=True,
        help="Connect and stall timeout in seconds.",
    ),
    _opt("--json", "json_mode", env="JSON", is_flag=True, help="JSON Lines on stdout."),
    _opt("-q", "--quiet", env="QUIET", is_flag=True, help="Only errors on stderr."),
    _opt("-v", "--verbose", env="VERBOSE", is_flag=True, help="More detail on stderr."),
    _opt(
        "--progress/--no-progress",
        env="PROGRESS",
        default=None,
        help="Progress on stderr (default: only when stderr is a terminal and not --json).",
    ),
]

TRANSFER_OPTIONS = [
    _opt("-n", "--dry-run", env="DRY_RUN", is_flag=True, help="Plan and report, change nothing."),
    _opt("-c", "--checksum", env="CHECKSUM", is_flag=True, help="Compare by MD5, not size+mtime."),
    _opt(
        "--verify",
        env="VERIFY",
        type=click.Choice(["auto", "md5", "size"]),
        default="auto",
        show_default=True,
        help="How each transferred file is verified.",
    ),
    _opt("--bwlimit", env="BWLIMIT", metavar="RATE", help="Bytes/s limit (k, M, G suffixes)."),
    _opt(
        "-j",
        "--jobs",
        env="JOBS",
        type=click.IntRange(1, 64),
        default=4,
        show_default=True,
        help="Concurrent file transfers.",
    ),
    _opt(
        "--max-delete",
        env="MAX_DELETE",
        default=DEFAULT_MAX_DELETE,
        show_default=True,
        metavar="N|N%",
        help="Refuse (exit 6) a plan deleting more files than this.",
    ),
    _opt("--force", env="FORCE", is_flag=True, help="Override the safety stops."),
]

CONFLICT_OPTION = [
    _opt(
        "--conflict",
        env="CONFLICT",
        type=click.Choice(["newer", "local", "remote", "skip"]),
        default="newer",
        show_default=True,
        help="Two-way conflict policy: newer mtime wins, a fixed side wins, or skip (exit 1).",
    )
]

DELETE_OPTION = [
    _opt(
        "--delete",
        env="DELETE",
        is_flag=True,
        help="Remove destination files the source does not have (mirror).",
    )
]


def _apply(options: list[Callable]) -> Callable:
    def decorator(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorator


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="leftssh")
def main_group() -> None:
    """Keep a local folder and a folder on an SSH peer in sync.

    TARGET is [user@]host[:path], ssh://[user@]host[:port][/path], or a local
    directory (starting with /, ./, ../ or ~/). The default remote path is
    'share' in the login directory; the default local share is ./share.
    """


def _options(kw: dict[str, Any]) -> RunOptions:
    parse_max_delete(kw.get("max_delete") or DEFAULT_MAX_DELETE)
    return RunOptions(
        local_dir=Path(kw["local_dir"]).expanduser().absolute(),
        port=kw.get("port"),
        identity=kw.get("identity"),
        ssh_config=kw.get("ssh_config"),
        known_hosts=kw.get("known_hosts"),
        accept_new_host_key=kw.get("accept_new_host_key", False),
        dry_run=kw.get("dry_run", False),
        checksum=kw.get("checksum", False),
        delete=kw.get("delete", False),
        max_delete=kw.get("max_delete") or DEFAULT_MAX_DELETE,
        force=kw.get("force", False),
        conflict=kw.get("conflict", "newer"),
        verify=kw.get("verify", "auto"),
        compress=kw.get("compress", False),
        bwlimit=parse_rate(kw.get("bwlimit")),
        jobs=kw.get("jobs", 4),
        timeout=kw.get("timeout", 30.0),
    )


class _Signals:
    """First SIGINT/SIGTERM asks the run to stop; a second one stops it at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.stop.is_set():
            raise Interrupted("interrupted")
        self.stop.set()

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


Body = Callable[[Target, RunOptions, Reporter, threading.Event], int]


def _run_one(
    kw: dict[str, Any],
    target_text: str,
    body: Body,
    stop: threading.Event,
    *,
    multi: bool = False,
    stop_is_normal: bool = False,
) -> int:
    """Run ``body`` for one target; print its errors and summary; return its exit code."""
    reporter = Reporter(
        target=target_text,
        json_mode=kw.get("json_mode", False),
        quiet=kw.get("quiet", False),
        verbose=kw.get("verbose", False),
        multi=multi,
        progress=_progress_wanted(kw),
    )
    code = 0
    error: str | None = None
    try:
        target = parse_target(target_text)
        reporter.target = target.label()
        opts = _options(kw)
        code = body(target, opts, reporter, stop)
        if stop.is_set() and not stop_is_normal:
            code, error = (
                Interrupted.exit_code,
                "interrupted; partial transfers are kept for resume",
            )
    except LeftsshError as e:
        code, error = e.exit_code, str(e)
    except TransferError as e:  # a per-file kind of failure that stopped the whole run
        code, error = 1, str(e)
    except KeyboardInterrupt:
        code, error = Interrupted.exit_code, "interrupted"
    except Exception as e:  # the last line of defence: never show a traceback
        code, error = 1, f"internal error: {type(e).__name__}: {e}"
        if kw.get("verbose"):
            sys.stderr.write(traceback.format_exc())
    reporter.end_progress()
    if error:
        where = f"{reporter.target}: " if multi else ""
        sys.stderr.write(f"leftssh: {where}{display(error)}\n")
    reporter.finish(code, error, dry_run=kw.get("dry_run", False))
    return code


def _progress_wanted(kw: dict[str, Any]) -> bool:
    wanted = kw.get("progress")
    if wanted is None:
        return sys.stderr.isatty() and not kw.get("json_mode") and not kw.get("quiet")
    return bool(wanted)


def _run_command(
    kw: dict[str, Any], target_text: str, body: Body, *, stop_is_normal: bool = False
) -> None:
    with _Signals() as signals:
        code = _run_one(kw, target_text, body, signals.stop, stop_is_normal=stop_is_normal)
    sys.exit(code)


def _run_many(kw: dict[str, Any], targets: tuple[str, ...], body: Body, parallel: int) -> None:
    """Run ``body`` for several targets concurrently; exit with the highest code."""
    if len(targets) == 1:
        _run_command(kw, targets[0], body)
    with _Signals() as signals:
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            futures = [
                pool.submit(_run_one, kw, t, body, signals.stop, multi=True) for t in targets
            ]
            codes = [f.result() for f in futures]
    sys.exit(max(codes, default=0))


@main_group.command()
@click.argument("targets", metavar="TARGET...", nargs=-1, required=True)
@_apply(CONNECTION_OPTIONS + TRANSFER_OPTIONS + DELETE_OPTION)
@_opt(
    "--parallel",
    env="PARALLEL",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Targets pushed concurrently.",
)
def push(targets: tuple[str, ...], parallel: int, **kw: Any) -> None:
    """Copy the local share to each TARGET (one-way, local -> remote)."""
    _run_many(kw, targets, functools.partial(_oneway, "push"), parallel)


@main_group.command()
@click.argument("target")
@_apply(CONNECTION_OPTIONS + TRANSFER_OPTIONS + DELETE_OPTION)
def pull(target: str, **kw: Any) -> None:
    """Copy TARGET into the local share (one-way, remote -> local)."""
    _run_command(kw, target, functools.partial(_oneway, "pull"))


@main_group.command(name="sync")
@click.argument("target")
@_apply(CONNECTION_OPTIONS + TRANSFER_OPTIONS + CONFLICT_OPTION)
def sync_command(target: str, **kw: Any) -> None:
    """Two-way sync with TARGET: both sides end with the same tree."""
    _run_command(kw, target, functools.partial(sync, "sync"))


@main_group.command()
@click.argument("target")
@_apply(CONNECTION_OPTIONS + TRANSFER_OPTIONS + CONFLICT_OPTION)
def status(target: str, **kw: Any) -> None:
    """Show what sync would do, changing nothing (exit 0 in sync, 1 pending)."""
    _run_command(kw, target, functools.partial(sync, "status"))


@main_group.command(name="verify")
@click.argument("target")
@_apply(CONNECTION_OPTIONS)
def verify_command(target: str, **kw: Any) -> None:
    """MD5 every file present on both sides and report those that differ (exit 1)."""
    _run_command(kw, target, verify)


@main_group.command(name="watch")
@click.argument("target")
@_apply(CONNECTION_OPTIONS + TRANSFER_OPTIONS + CONFLICT_OPTION)
@_opt(
    "--interval",
    env="INTERVAL",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between local change scans.",
)
@_opt(
    "--remote-interval",
    env="REMOTE_INTERVAL",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between remote listings.",
)
def watch_command(target: str, interval: float, remote_interval: float, **kw: Any) -> None:
    """Sync with TARGET, then keep syncing as either side changes (stop: Ctrl-C)."""
    body = functools.partial(_watch, interval, remote_interval)
    _run_command(kw, target, body, stop_is_normal=True)


def _watch(
    interval: float,
    remote_interval: float,
    target: Target,
    opts: RunOptions,
    reporter: Reporter,
    stop: threading.Event,
) -> int:
    return watch(target, opts, reporter, stop, interval=interval, remote_interval=remote_interval)


def _oneway(direction: str, target: Target, opts: RunOptions, reporter: Reporter, stop) -> int:
    return oneway(direction, target, opts, reporter, stop)


def main() -> None:
    """Entry point of the ``leftssh`` console script."""
    try:
        main_group.main(prog_name="leftssh", standalone_mode=True)
    except KeyboardInterrupt:
        sys.stderr.write("leftssh: interrupted\n")
        sys.exit(Interrupted.exit_code)
    except SystemExit as e:
        _exit_now(e)
        raise


def _exit_now(e: SystemExit) -> None:
    """Exit at once with ``e``'s status once the run is over and its output flushed.

    Everything a run writes (files, the base, the locks, the connections) is done
    and closed before the command returns; what is left is the interpreter taking
    apart every object of the run, tens of milliseconds for a large tree. When a
    thread that is not a daemon is still running, the usual exit waits for it.
    """
    if any(
        t.is_alive() and not t.daemon
        for t in threading.enumerate()
        if t is not threading.main_thread()
    ):
        return
    if e.code is None or isinstance(e.code, int):
        code = e.code or 0
    else:
        return  # a message to print: the usual exit does that
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        return
    os._exit(code)
