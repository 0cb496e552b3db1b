"""Helpers shared by the tests: run a command and read its output, snapshot a directory tree."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# Whether this machine's perl can load Digest::MD5 (what the follower's perl needs).
PERL_MD5 = (
    shutil.which("perl") is not None
    and subprocess.run(["perl", "-MDigest::MD5", "-e", "1"], capture_output=True).returncode == 0
)

# One entry of tree(): ("dir",) or ("file", md5hex, size, int(mtime), mode & 0o777).
TreeEntry = tuple


@dataclass
class Result:
    """What a finished command left behind."""

    args: list[str]
    code: int
    stdout: str
    stderr: str

    def json(self) -> list[dict[str, Any]]:
        """Return the JSON Lines objects printed on stdout (blank lines ignored)."""
        objects = []
        for number, line in enumerate(self.stdout.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                raise AssertionError(f"stdout line {number} is not JSON ({e}):\n{self}") from e
            if not isinstance(value, dict):
                raise AssertionError(f"stdout line {number} is not a JSON object:\n{self}")
            objects.append(value)
        return objects

    def actions(self) -> list[dict[str, Any]]:
        """Return the per-action JSON objects (everything but summaries)."""
        return [o for o in self.json() if "summary" not in o]

    def summaries(self) -> list[dict[str, Any]]:
        """Return every summary object, in output order (one per target)."""
        return [o["summary"] for o in self.json() if "summary" in o]

    def summary(self) -> dict[str, Any]:
        """Return the dict under the last JSON line's "summary" key."""
        objects = self.json()
        if not objects or "summary" not in objects[-1]:
            raise AssertionError(f"the last stdout line is not a summary:\n{self}")
        return objects[-1]["summary"]

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.args)}\n"
            f"exit code: {self.code}\n"
            f"--- stdout ---\n{self.stdout}"
            f"--- stderr ---\n{self.stderr}"
        )


def run_command(
    cmd: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 120,
    input: str | bytes | None = None,
) -> Result:
    """Run a command without a terminal and return its Result.

    ``env`` entries are added to the current environment; a value of None removes the
    variable. The repository root is put first on PYTHONPATH so ``python -m leftssh`` works
    without installing. stdin is /dev/null unless ``input`` is given. A Python traceback on
    stderr fails the test: users must never see one.
    """
    full_env = dict(os.environ)
    pythonpath = full_env.get("PYTHONPATH")
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), pythonpath]))
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    args = [str(a) for a in cmd]
    data = input.encode() if isinstance(input, str) else input
    try:
        done = subprocess.run(
            args,
            cwd=cwd,
            env=full_env,
            input=data,
            stdin=subprocess.DEVNULL if data is None else None,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        partial = Result(args, -1, _text(e.stdout), _text(e.stderr))
        raise AssertionError(f"timed out after {timeout} s:\n{partial}") from None
    result = Result(args, done.returncode, _text(done.stdout), _text(done.stderr))
    if "Traceback" in result.stderr:
        raise AssertionError(f"a Python traceback reached stderr:\n{result}")
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _is_internal(name: str) -> bool:
    return name.endswith(".leftpart") or name == ".leftssh"


def tree(root: Path, *, special: bool = False) -> dict[str, TreeEntry]:
    """Snapshot a directory: relative posix path -> ("dir",) or ("file", md5, size, mtime, mode).

    ``mtime`` is whole seconds and ``mode`` is ``st_mode & 0o777``. Partial files
    (``*.leftpart``) and ``.leftssh`` state directories are left out. Symlinks are never
    followed; they and other special files are left out too unless ``special`` is true, in
    which case they appear as ("symlink", target) or ("special",).
    """
    root = Path(root)
    entries: dict[str, TreeEntry] = {}
    pending = [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as listing:
            for item in listing:
                if _is_internal(item.name):
                    continue
                path = Path(item.path)
                rel = path.relative_to(root).as_posix()
                st = item.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    entries[rel] = ("dir",)
                    pending.append(path)
                elif stat.S_ISREG(st.st_mode):
                    entries[rel] = (
                        "file",
                        _md5(path),
                        st.st_size,
                        int(st.st_mtime),
                        st.st_mode & 0o777,
                    )
                elif special and stat.S_ISLNK(st.st_mode):
                    entries[rel] = ("symlink", os.readlink(path))
                elif special:
                    entries[rel] = ("special",)
    return dict(sorted(entries.items()))


def write_file(
    path: Path,
    content: bytes | str = b"",
    *,
    mtime: float | None = None,
    mode: int | None = None,
) -> Path:
    """Create or replace a file (and its parent directories), optionally setting mtime and mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    if mode is not None:
        path.chmod(mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def record_calls(monkeypatch: Any, owner: object, name: str) -> list[tuple[Any, ...]]:
    """Wrap ``owner.name`` (a method) so that each call's arguments, after ``self``,
    are recorded in the list returned, and the real method then runs."""
    real = getattr(owner, name)
    calls: list[tuple[Any, ...]] = []

    def recorded(self: object, *args: Any) -> Any:
        calls.append(args)
        return real(self, *args)

    monkeypatch.setattr(owner, name, recorded)
    return calls


def cli_json(
    sshd: Any, command: str, local: Path, remote_dir: Path, state: Path
) -> tuple[int, str, dict[str, dict]]:
    """``push``/``pull``/``sync`` through the CLI in this process, with ``--json``: the
    exit code, the output, and the JSON record of each path."""
    from click.testing import CliRunner

    from leftssh import cli

    result = CliRunner().invoke(
        cli.main_group,
        [command, sshd.target(str(remote_dir)), "-d", str(local), "--json", *sshd.cli_args()],
        env={"LEFTSSH_STATE_DIR": str(state)},
        catch_exceptions=False,
    )
    lines = [json.loads(line) for line in result.output.splitlines() if line.strip()]
    return result.exit_code, result.output, {r["path"]: r for r in lines if "path" in r}
