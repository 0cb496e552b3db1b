"""Errors that stop a run, each carrying the exit code of SPEC section 7."""

from __future__ import annotations


class LeftsshError(Exception):
    """A failure that stops the run; ``exit_code`` is what the process exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(LeftsshError):
    """Bad option, bad target, unreadable configuration."""

    exit_code = 2


class ConnectError(LeftsshError):
    """DNS failure, refused connection, timeout, broken SSH session."""

    exit_code = 3


class AuthError(LeftsshError):
    """No offered credential was accepted."""

    exit_code = 4


class HostKeyError(LeftsshError):
    """The peer's host key is unknown or changed."""

    exit_code = 5


class SafetyError(LeftsshError):
    """A plan was refused before anything changed (emptied root, --max-delete)."""

    exit_code = 6


class LockError(LeftsshError):
    """Another leftssh run holds the lock."""

    exit_code = 7


class Interrupted(LeftsshError):
    """SIGINT or SIGTERM arrived; partial transfers are kept for resume."""

    exit_code = 8

    def __init__(self, message: str, cut: bool = True) -> None:
        super().__init__(message)
        self.cut = cut


class TransferError(Exception):
    """A per-file failure: reported as a Problem, the run goes on (exit 1)."""


SOURCE_CHANGED = "source changed during transfer; will retry on the next run"


class SourceChanged(TransferError):
    """The source no longer has the size and mtime it was listed with, after it was read."""

    def __init__(self, message: str = SOURCE_CHANGED) -> None:
        super().__init__(message)


class ChangedError(TransferError):
    """The target changed since the scan, so it was not overwritten or deleted."""


class RenameRefused(TransferError):
    """The peer said why a partial did not get its new name: asking again would not help."""
