"""Run locks: one leftssh run at a time per share, on each side.

The lock is a file ``.leftssh.lock`` at the share root, created exclusively
(``O_EXCL`` locally, SFTP's EXCL flag remotely) and holding who took it. It
is stale when its holder is a process on this machine that no longer exists
(or whose pid went to another process: a lock not refreshed for ``STALE_AFTER``),
or when nobody refreshed it for ``STALE_AFTER`` seconds (the holder touches it
every ``HEARTBEAT`` seconds, so a holder on another machine that died is
detected after that delay). A lock file that stays empty for ``TORN_AFTER``
seconds is torn: its taker was killed between creating and writing it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable

from leftssh.errors import LockError

LOCK_NAME = ".leftssh.lock"
HEARTBEAT = 30.0
STALE_AFTER = 600.0
TORN_AFTER = 2.0  # seconds a lock file found without its holder is given to get one


def holder_info(command: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def encode(info: dict) -> bytes:
    return (json.dumps(info) + "\n").encode()


def decode(data: bytes) -> dict:
    try:
        info = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(info: dict, age: float, this_host: str | None = None) -> bool:
    """Tell whether a lock with holder ``info``, last touched ``age`` seconds ago, is dead."""
    host = this_host or socket.gethostname()
    pid = info.get("pid")
    if info.get("host") == host and isinstance(pid, int) and pid > 0:
        if pid == os.getpid():
            # Our own lock, left when a lost connection kept us from removing it
            # (watch reconnecting): nobody else holds it.
            return True
        # Not refreshed for that long: its pid, alive, is another process's now.
        return not _pid_alive(pid) or age > STALE_AFTER
    if not info:
        return age > 60
    return age > STALE_AFTER


def describe(info: dict, where: str) -> str:
    if not info:
        return f"{where} is locked by another leftssh run (holder unknown)"
    return (
        f"{where} is locked by another leftssh run: pid {info.get('pid')} on "
        f"{info.get('host')} ({info.get('command', 'run')} since {info.get('started')})"
    )


def take(
    create: Callable[[bytes], bool],
    read: Callable[[], tuple[bytes, float] | None],
    remove: Callable[[], None],
    where: str,
    command: str,
) -> None:
    """Take a lock through one side's primitives, clearing a stale one; else raise LockError.

    ``create(data)`` makes the lock file exclusively (False: it exists), ``read()``
    returns its content and mtime (None: it vanished), ``remove()`` deletes it.
    """
    mine = holder_info(command)
    for _ in range(3):
        if create(encode(mine)):
            # A run that found this file empty (torn, below) and removed it while we
            # were writing it would take the lock as well: make sure it is not theirs.
            # What we wrote is whole before it is read back, so a lock read back empty
            # is another run's, created and not written yet. (One that does not read
            # as a holder at all is a peer that stored other bytes: its transfers
            # fail verification and say so.)
            found = read()
            holder = decode(found[0]) if found is not None else None
            if found is None or not found[0] or (holder and holder != mine):
                raise LockError(f"{where}: another leftssh run took the lock at the same moment")
            return
        found = read()
        if found is None:
            continue
        info = decode(found[0])
        if not info:
            # Empty or unreadable: its taker is writing it right now, or was killed
            # between creating and writing it. Give a live taker time to finish.
            found = _settled(read, found)
            if found is None:
                continue
            info = decode(found[0])
            if not info:  # still without a holder: torn
                remove()
                continue
        if is_stale(info, time.time() - found[1]):
            remove()
            continue
        raise LockError(describe(info, where))
    raise LockError(f"{where}: could not take the lock")


def _settled(
    read: Callable[[], tuple[bytes, float] | None], found: tuple[bytes, float]
) -> tuple[bytes, float] | None:
    """Re-read a lock found without a holder until it has one, for ``TORN_AFTER`` seconds.

    Timed here (not from the file's mtime), so a peer's clock does not matter.
    """
    deadline = time.monotonic() + TORN_AFTER
    while not decode(found[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
        again = read()
        if again is None:
            return None
        found = again
    return found


class Heartbeat:
    """Touch held locks periodically so other machines can tell they are alive."""

    def __init__(self, touches: list[Callable[[], None]], interval: float = HEARTBEAT) -> None:
        self._touches = touches
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for touch in self._touches:
                try:
                    touch()
                except Exception:
                    pass

    def stop(self) -> None:
        self._stop.set()
