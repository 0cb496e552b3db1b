"""Tests for leftssh.transport.remote_shell: parsers on crafted output, commands run for real.

The real-execution tests run the built commands with local shells (``sh``, ``bash``,
``dash``, ``zsh`` and busybox when installed) in temporary directories full of hostile
names, and compare with hashlib. BSD ``md5`` and busybox-style ``md5sum`` (no ``-z``, no
escaping) are emulated by small scripts put first on PATH.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leftssh.transport.remote_shell import (
    EMPTY_MD5,
    FOLLOW_BLOCK,
    FOLLOW_PERL_PROBE,
    PROBE_COMMAND,
    SESSION_COMMAND,
    HashTool,
    follow_hash_command,
    follow_hash_request,
    hash_script,
    parse_hash_output,
    parse_perl_probe,
    parse_prefix_hash,
    parse_probe,
    prefix_hash_command,
    session_request,
)
from tests.helpers import PERL_MD5

MD5SUM = shutil.which("md5sum")
needs_md5sum = pytest.mark.skipif(MD5SUM is None, reason="GNU md5sum not installed")
needs_perl_md5 = pytest.mark.skipif(not PERL_MD5, reason="perl with Digest::MD5 not installed")


def _shells() -> list[pytest.param]:
    found = []
    for name in ("sh", "bash", "dash", "zsh", "ksh", "mksh"):
        path = shutil.which(name)
        if path:
            found.append(pytest.param([path, "-c"], id=name))
    busybox = shutil.which("busybox")
    if busybox:
        found.append(pytest.param([busybox, "sh", "-c"], id="busybox-sh"))
    return found


SHELLS = _shells()

FORGED_GNU = "forged-gnu\n" + EMPTY_MD5 + "  ./plain.txt"
FORGED_BSD = "forged-bsd\n" + EMPTY_MD5 + " ./plain.txt"

# Requested but absent, while "lonely\nline" exists: a tool printing names raw
# (BSD md5, busybox md5sum) gives a line that reads as either name, so neither is
# reported. GNU md5sum escapes the newline and reports "lonely\nline".
ABSENT_PREFIX = "lonely"
AMBIGUOUS = "lonely\nline"

HOSTILE_NAMES: list[str] = [
    "plain.txt",
    "empty",
    "with space",
    " leading and trailing ",
    "single'quote",
    'double"quote',
    "'",
    '"',
    "$(touch pwned)",
    "`touch pwned`",
    ";rm -rf x;",
    "-rf",
    "--help",
    "-",
    "-z",
    "new\nline",
    "trailing-newline\n",
    "\nleading-newline",
    "back\\slash",
    "literal-backslash-n\\n",
    "\\",
    "tab\there",
    "carriage\rreturn",
    unicodedata.normalize("NFC", "caf\u00e9"),
    unicodedata.normalize("NFD", "caf\u00e9"),
    "\u65e5\u672c\u8a9e \U0001f600",
    "*",
    "?",
    "[ab]",
    "~",
    "=cmd",
    "a && b || c | d > e < f &",
    "${HOME}",
    "$HOME",
    "!bang",
    "#hash",
    "%percent",
    os.fsdecode(b"latin1-\xe9\xff"),
    FORGED_GNU,
    FORGED_BSD,
    "dir $(touch pwned)/-rf",
    "dir $(touch pwned)/new\nline",
    "-dir/--help",
    "big.bin",
    AMBIGUOUS,
]


HOSTILE_ROOTS = [
    "-r oot $(touch pwned) 'q\" `touch pwned`; x",
    "-",
    "--",
    "plain root",
    "~tilde",
]


def _content(name: str) -> bytes:
    if name == "empty":
        return b""
    if name == "big.bin":
        return hashlib.sha256(b"seed").digest() * 40000  # 1.28 MB
    return b"content of " + os.fsencode(name) + b"\n"


def _make_tree(root: Path, names: Iterable[str]) -> dict[str, str]:
    expected = {}
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_content(name))
        expected[name] = hashlib.md5(_content(name)).hexdigest()
    return expected


def _snapshot(top: Path) -> set[bytes]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(top)):
        for name in dirnames + filenames:
            found.add(os.path.join(dirpath, name))
    return found


def _run(
    shell: Sequence[str],
    command: str,
    *,
    cwd: Path,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*shell, command],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )


_FAKE_TOOL = r"""#!{python}
import hashlib
import os
import sys

STYLE = {style!r}
prog = "md5" if STYLE == "bsd" else "md5sum"
args = sys.argv[1:]
flags = set()
while args and args[0].startswith("-") and args[0] != "-":
    arg = args.pop(0)
    if arg == "--":
        break
    for ch in arg[1:]:
        if ch not in ("rq" if STYLE == "bsd" else "b"):
            sys.stderr.write(prog + ": unrecognized option -- " + ch + "\n")
            sys.exit(64 if STYLE == "bsd" else 1)
        flags.add(ch)
out = sys.stdout.buffer
if not args:
    digest = hashlib.md5(sys.stdin.buffer.read()).hexdigest().encode()
    out.write(digest + (b"\n" if STYLE == "bsd" else b"  -\n"))
    sys.exit(0)
status = 0
for arg in args:
    try:
        with open(arg, "rb") as handle:
            digest = hashlib.md5(handle.read()).hexdigest().encode()
    except OSError:
        sys.stderr.buffer.write(prog.encode() + b": " + os.fsencode(arg) + b": error\n")
        status = 1
        continue
    if STYLE == "bsd" and "q" in flags:
        out.write(digest + b"\n")
    elif STYLE == "bsd":
        out.write(digest + b" " + os.fsencode(arg) + b"\n")
    else:
        out.write(digest + b"  " + os.fsencode(arg) + b"\n")
sys.exit(status)
"""


def _fake_bin(directory: Path, style: str, *, with_system_tools: bool = True) -> Path:
    """A directory holding a fake ``md5`` (style 'bsd') or ``md5sum`` (style 'busybox')."""
    directory.mkdir(parents=True, exist_ok=True)
    tool = directory / ("md5" if style == "bsd" else "md5sum")
    tool.write_text(_FAKE_TOOL.format(python=sys.executable, style=style))
    tool.chmod(0o755)
    if with_system_tools:
        for name in ("xargs", "tr", "head", "cat"):
            real = shutil.which(name)
            if real:
                (directory / name).symlink_to(real)
    return directory


def _env(path: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "CDPATH"}
    env["PATH"] = path
    env["LC_ALL"] = "C"
    env.update(extra)
    return env


# (tool, environment, names the tool cannot report unambiguously)
ToolEnv = tuple[HashTool, dict[str, str], set[str]]


@pytest.fixture
def tool_env(request: pytest.FixtureRequest, tmp_path: Path) -> ToolEnv:
    """Real GNU md5sum with and without -z, and the emulated BSD and busybox tools."""
    kind = request.param
    system_path = os.environ.get("PATH", os.defpath)
    if kind in ("gnu-z", "gnu"):
        if MD5SUM is None:
            pytest.skip("GNU md5sum not installed")
        return (HashTool.GNU_Z if kind == "gnu-z" else HashTool.GNU), _env(system_path), set()
    style = "bsd" if kind == "bsd-fake" else "busybox"
    fake = _fake_bin(tmp_path / "fakebin", style, with_system_tools=False)
    tool = HashTool.BSD if style == "bsd" else HashTool.GNU
    return tool, _env(f"{fake}{os.pathsep}{system_path}"), {AMBIGUOUS}


TOOL_KINDS = ["gnu-z", "gnu", "bsd-fake", "busybox-fake"]


# --------------------------------------------------------------------------- parsing


def test_hash_tool_values() -> None:
    assert HashTool.GNU_Z.value == "md5sum -z"
    assert HashTool.GNU.value == "md5sum"
    assert HashTool.BSD.value == "md5 -r"
    assert HashTool("md5 -r") is HashTool.BSD


def test_hash_script_names_and_roots() -> None:
    def script(root: str, names: list[str]) -> bytes:
        return hash_script(HashTool.GNU_Z, root, names)

    assert b" './a' './-rf' './x y/z';" in script("/r", ["a", "-rf", "x y/z"])
    assert b" './caf\xc3\xa9';" in script("/r", ["caf\u00e9"])
    assert b" './\xff';" in script("/r", [os.fsdecode(b"\xff")])
    assert b" '././a';" in script("/r", ["./a"])
    assert script("data", ["f"]).startswith(b"(cd -- ./data && ")
    assert script("", ["f"]).startswith(b"(cd -- . && ")
    assert script("-", ["f"]).startswith(b"(cd -- ./- && ")
    assert script("a b'c", ["f"]).startswith(b"(cd -- './a b'\"'\"'c' && ")
    assert hash_script(HashTool.BSD, "/r", ["f"]).endswith(b"| xargs -0 md5 -r --)")
    assert hash_script(HashTool.GNU, "/r", ["f"]).endswith(b"| xargs -0 md5sum --)")
    with pytest.raises(ValueError):
        script("a\0b", ["f"])


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "a\0b"])
def test_hash_script_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        hash_script(HashTool.GNU_Z, "/r", ["ok", bad])


def test_parse_gnu_z_basic() -> None:
    out = (
        b"D41D8CD98F00B204E9800998ECF8427E  ./a\0"
        b"0cc175b9c0f1b6a831c399e269772661 *./b c\0"
        b"92eb5ffee6ae2fec3ad71c777531578f  ./new\nline\0"
        b"4a8a08f09d37b73795649038408b5f33  ./-\0"
    )
    got = parse_hash_output(HashTool.GNU_Z, out, ["a", "b c", "new\nline", "-", "missing"])
    assert got == {
        "a": EMPTY_MD5,
        "b c": "0cc175b9c0f1b6a831c399e269772661",
        "new\nline": "92eb5ffee6ae2fec3ad71c777531578f",
        "-": "4a8a08f09d37b73795649038408b5f33",
    }


def test_parse_ignores_unrequested_garbage_and_partial() -> None:
    h = "0cc175b9c0f1b6a831c399e269772661"
    out = (
        (
            f"{EMPTY_MD5}  -\0"  # GNU xargs on empty input hashes its stdin
            f"{h}  ./not-asked\0"
            "garbage\0"
            f"{h[:31]}  ./a\0"  # short hash
            f"{h[:31]}g  ./a\0"  # not hex
            f"{h}./a\0"  # no separator
            f"{h}  a\0"  # no ./ prefix: not produced by hash_script
            f"{h}  ./b\0"
            f"{h}  ./c"  # truncated: no terminator
        ).encode()
    )
    assert parse_hash_output(HashTool.GNU_Z, out, ["a", "b", "c"]) == {"b": h}
    assert parse_hash_output(HashTool.GNU_Z, b"", ["a"]) == {}
    assert parse_hash_output(HashTool.GNU_Z, out, []) == {}


def test_parse_leading_noise_before_first_record() -> None:
    h = "0cc175b9c0f1b6a831c399e269772661"
    out = f"Welcome to host\nLast login: never\n{h}  ./a\0{h}  ./b\0".encode()
    assert parse_hash_output(HashTool.GNU_Z, out, ["a", "b"]) == {"a": h, "b": h}
    lines = f"Welcome to host\n{h}  ./a\n".encode()
    assert parse_hash_output(HashTool.GNU, lines, ["a"]) == {"a": h}


def test_parse_duplicates() -> None:
    h1, h2 = "0cc175b9c0f1b6a831c399e269772661", "92eb5ffee6ae2fec3ad71c777531578f"
    same = f"{h1}  ./a\0{h1.upper()}  ./a\0".encode()
    assert parse_hash_output(HashTool.GNU_Z, same, ["a"]) == {"a": h1}
    differ = f"{h1}  ./a\0{h2}  ./b\0{h2}  ./a\0{h1}  ./a\0".encode()
    assert parse_hash_output(HashTool.GNU_Z, differ, ["a", "b"]) == {"b": h2}
    lines = f"{h1}  ./a\n{h2}  ./a\n".encode()
    assert parse_hash_output(HashTool.GNU, lines, ["a"]) == {}


def test_parse_requested_spellings() -> None:
    h = "0cc175b9c0f1b6a831c399e269772661"
    out = f"{h}  ././x\0{h}  ./y\0".encode()
    assert parse_hash_output(HashTool.GNU_Z, out, ["./x", "x", "y", "y"]) == {"./x": h, "y": h}
    raw = b"0cc175b9c0f1b6a831c399e269772661  ./\xff\xfe\0"
    name = os.fsdecode(b"\xff\xfe")
    assert parse_hash_output(HashTool.GNU_Z, raw, [name]) == {name: h}
    # a lone surrogate that cannot be encoded is simply never matched
    assert parse_hash_output(HashTool.GNU_Z, raw, ["\ud800"]) == {}


def test_parse_gnu_escaped_names() -> None:
    h = "0cc175b9c0f1b6a831c399e269772661"
    out = (
        f"\\{h}  ./new\\nline\n"
        f"\\{h}  ./back\\\\slash\n"
        f"\\{h} *./cr\\rname\n"
        f"\\{h}  ./bad\\x\n"  # unknown escape
        f"\\{h}  ./trailing\\\n"  # lone backslash
        f"{h}  ./raw\\n\n"  # not escaped: the name really is 'raw\n' spelled with a backslash
    ).encode()
    requested = ["new\nline", "back\\slash", "cr\rname", "bad\\x", "badx", "trailing\\", "raw\\n"]
    assert parse_hash_output(HashTool.GNU, out, requested) == {
        "new\nline": h,
        "back\\slash": h,
        "cr\rname": h,
        "raw\\n": h,
    }
    # older GNU versions escaped even with -z
    z_out = f"\\{h}  ./new\\nline\0".encode()
    assert parse_hash_output(HashTool.GNU_Z, z_out, ["new\nline"]) == {"new\nline": h}


def test_parse_binary_marker_and_case() -> None:
    h = "0CC175B9C0F1B6A831C399E269772661"
    out = f"{h} *./a\n{h}  ./*\n".encode()
    assert parse_hash_output(HashTool.GNU, out, ["a", "*"]) == {"a": h.lower(), "*": h.lower()}
    # BSD has no mode marker: one space, then the name
    assert parse_hash_output(HashTool.BSD, f"{h} ./a\n".encode(), ["a"]) == {"a": h.lower()}
    assert parse_hash_output(HashTool.BSD, f"{h}  ./a\n".encode(), ["a"]) == {}
    assert parse_hash_output(HashTool.GNU, f"{h} ./a\n".encode(), ["a"]) == {}


def test_parse_bsd_newline_names() -> None:
    h1, h2, h3 = (
        "0cc175b9c0f1b6a831c399e269772661",
        "92eb5ffee6ae2fec3ad71c777531578f",
        "4a8a08f09d37b73795649038408b5f33",
    )
    out = f"{h1} ./a\n{h2} ./a\nb\n{h3} ./c\n\n".encode()
    got = parse_hash_output(HashTool.BSD, out, ["a", "a\nb", "c\n"])
    assert got == {"a": h1, "a\nb": h2, "c\n": h3}
    # "a" missing, "a\nb" present: line 0 reads as either; both readings are dropped
    out = f"{h2} ./a\nb\n".encode()
    assert parse_hash_output(HashTool.BSD, out, ["a", "a\nb"]) == {}
    # a name forging a second entry does not give plain.txt a wrong hash: plain.txt
    # (requested once) is settled by its own line, so line 1 belongs to the forged name
    forged = f"x\n{EMPTY_MD5} ./plain.txt"
    out = f"{h1} ./x\n{EMPTY_MD5} ./plain.txt\n{h2} ./plain.txt\n".encode()
    got = parse_hash_output(HashTool.BSD, out, [forged, "plain.txt"])
    assert got == {"plain.txt": h2, forged: h1}
    # plain.txt missing: line 1 could be either, so neither is reported
    out = f"{h1} ./x\n{EMPTY_MD5} ./plain.txt\n".encode()
    assert parse_hash_output(HashTool.BSD, out, [forged, "plain.txt"]) == {}
    # requested twice, the same name may really appear twice: nothing can be settled
    out = f"{h1} ./x\n{EMPTY_MD5} ./plain.txt\n{h2} ./plain.txt\n".encode()
    got = parse_hash_output(HashTool.BSD, out, [forged, "plain.txt", "plain.txt"])
    assert got == {"plain.txt": h2}
    # incomplete last line
    assert parse_hash_output(HashTool.BSD, f"{h1} ./a".encode(), ["a"]) == {}


def test_parse_probe() -> None:
    assert parse_probe(b"gnu-z\ngnu\n", 0) is HashTool.GNU_Z
    assert parse_probe(b"gnu\nbsd\n", 0) is HashTool.GNU
    assert parse_probe(b"motd line\r\nbsd\r\n", 0) is HashTool.BSD
    assert parse_probe(b"bsd", 0) is HashTool.BSD
    assert parse_probe(b"", 0) is None
    assert parse_probe(b"gnu-z\n", 127) is None
    assert parse_probe(b"gnu-zz\n gnu\nGNU\n", 0) is None


def test_prefix_hash_command_shape() -> None:
    cmd = prefix_hash_command(HashTool.GNU_Z, "/r", "-rf $(x)", 12)
    assert cmd == (
        "cd -- /r && { { head -c 12 -- './-rf $(x)'; echo \"leftssh-rc=$?\" >&3; } | md5sum; } 3>&1"
    )
    assert "| md5 -q;" in prefix_hash_command(HashTool.BSD, "r", "a", 0)
    for bad_length in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            prefix_hash_command(HashTool.GNU, "r", "a", bad_length)  # type: ignore[arg-type]
    for bad_path in ("", "/abs", "a\0b"):
        with pytest.raises(ValueError):
            prefix_hash_command(HashTool.GNU, "r", bad_path, 1)


def test_parse_prefix_hash() -> None:
    h = "0cc175b9c0f1b6a831c399e269772661"
    assert parse_prefix_hash(HashTool.GNU, f"leftssh-rc=0\n{h}  -\n".encode()) == h
    assert parse_prefix_hash(HashTool.GNU, f"leftssh-rc=0\n{h.upper()} *-\n".encode()) == h
    assert parse_prefix_hash(HashTool.BSD, f"leftssh-rc=0\n{h}\n".encode()) == h
    assert parse_prefix_hash(HashTool.GNU, f"motd\nleftssh-rc=0\n{h}  -\n".encode()) == h
    for bad in (
        f"leftssh-rc=1\n{EMPTY_MD5}  -\n",  # head failed: hash of nothing
        f"{h}  -\n",  # no status
        f"leftssh-rc=0\n{h}  -",  # truncated
        f"leftssh-rc=0\n{h}  -\n{h}  -\n",  # two hashes
        f"leftssh-rc=0\nleftssh-rc=0\n{h}  -\n",
        f"leftssh-rc=0\n{h[:-1]}  -\n",
        f"leftssh-rc=0\n{h}  ./file\n",
        "leftssh-rc=0\n",
        "",
    ):
        assert parse_prefix_hash(HashTool.GNU, bad.encode()) is None, bad


# --------------------------------------------------------------------- real execution


@needs_md5sum
@pytest.mark.parametrize("shell", SHELLS)
def test_probe_finds_gnu_z(shell: list[str], tmp_path: Path) -> None:
    result = _run(shell, PROBE_COMMAND, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == b""
    assert parse_probe(result.stdout, result.returncode) is HashTool.GNU_Z
    assert set(result.stdout.split()) == {b"gnu-z", b"gnu"}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shell", SHELLS)
def test_probe_without_any_tool(shell: list[str], tmp_path: Path) -> None:
    empty = tmp_path / "emptybin"
    empty.mkdir()
    result = _run(shell, PROBE_COMMAND, cwd=tmp_path, env=_env(str(empty)))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert parse_probe(result.stdout, result.returncode) is None
    # the helper tools exist, the hash tools do not
    bare = _fake_bin(tmp_path / "bare", "bsd")
    (bare / "md5").unlink()
    result = _run(shell, PROBE_COMMAND, cwd=tmp_path, env=_env(str(bare)))
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


@pytest.mark.parametrize("shell", SHELLS)
def test_probe_emulated_tools(shell: list[str], tmp_path: Path) -> None:
    bsd = _fake_bin(tmp_path / "bsd", "bsd")
    result = _run(shell, PROBE_COMMAND, cwd=tmp_path, env=_env(str(bsd)))
    assert result.stdout == b"bsd\n"
    assert parse_probe(result.stdout, result.returncode) is HashTool.BSD
    busybox = _fake_bin(tmp_path / "busybox", "busybox")
    result = _run(shell, PROBE_COMMAND, cwd=tmp_path, env=_env(str(busybox)))
    assert result.stdout == b"gnu\n"
    assert parse_probe(result.stdout, result.returncode) is HashTool.GNU


def _check_hashing(
    shell: list[str],
    tool: HashTool,
    env: dict[str, str],
    top: Path,
    root_arg: str,
    root_dir: Path,
    names: list[str],
    missing: set[str],
) -> None:
    expected = _make_tree(root_dir, names)
    requested = names + ["does-not-exist", "dir $(touch pwned)", "-dir", ABSENT_PREFIX]
    before = _snapshot(top)
    result = _run(shell, hash_script(tool, root_arg, requested), cwd=top, env=env)
    assert _snapshot(top) == before, "the command created or removed files"
    assert result.returncode != 0  # the missing file and the directories
    got = parse_hash_output(tool, result.stdout, requested)
    assert got == {name: digest for name, digest in expected.items() if name not in missing}


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("tool_env", TOOL_KINDS, indirect=True)
def test_hash_hostile_names(shell: list[str], tool_env: ToolEnv, tmp_path: Path) -> None:
    tool, env, missing = tool_env
    top = tmp_path / "top"
    root = top / "data"
    root.mkdir(parents=True)
    _check_hashing(shell, tool, env, top, str(root), root, HOSTILE_NAMES, missing)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("root_name", HOSTILE_ROOTS)
@pytest.mark.parametrize("relative", [True, False], ids=["relative", "absolute"])
def test_hash_hostile_root(
    shell: list[str], root_name: str, relative: bool, tmp_path: Path
) -> None:
    if MD5SUM is None:
        pytest.skip("GNU md5sum not installed")
    top = tmp_path / "top"
    root = top / root_name
    root.mkdir(parents=True)
    root_arg = root_name if relative else str(root)
    names = ["plain.txt", "-rf", "$(touch pwned)", "new\nline"]
    env = _env(os.environ.get("PATH", os.defpath))
    _check_hashing(shell, HashTool.GNU_Z, env, top, root_arg, root, names, set())


@needs_md5sum
@pytest.mark.parametrize("shell", SHELLS)
def test_relative_root_ignores_cdpath(shell: list[str], tmp_path: Path) -> None:
    top, decoy = tmp_path / "top", tmp_path / "decoy"
    (top / "data").mkdir(parents=True)
    (decoy / "data").mkdir(parents=True)
    (top / "data" / "f").write_bytes(b"real")
    (decoy / "data" / "f").write_bytes(b"decoy")
    env = _env(os.environ.get("PATH", os.defpath), CDPATH=str(decoy))
    result = _run(shell, hash_script(HashTool.GNU_Z, "data", ["f"]), cwd=top, env=env)
    assert result.returncode == 0
    assert result.stdout == f"{hashlib.md5(b'real').hexdigest()}  ./f\0".encode()


@needs_md5sum
@pytest.mark.parametrize("shell", SHELLS)
def test_missing_root_hashes_nothing(shell: list[str], tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    cmd = hash_script(HashTool.GNU_Z, str(tmp_path / "nope"), ["f"])
    result = _run(shell, cmd, cwd=tmp_path)
    assert result.returncode != 0
    assert parse_hash_output(HashTool.GNU_Z, result.stdout, ["f"]) == {}


@needs_md5sum
def test_hash_many_files_split_by_xargs(tmp_path: Path) -> None:
    # ~2000 names of ~150 bytes: beyond one xargs batch (128 KiB by default)
    names = [f"{i:05d}-{'x' * 140} $(touch pwned)" for i in range(2000)]
    root = tmp_path / "many"
    root.mkdir()
    expected = {}
    for name in names:
        (root / name).write_bytes(name.encode())
        expected[name] = hashlib.md5(name.encode()).hexdigest()
    before = _snapshot(tmp_path)
    # The script (about 330 KB) is read from stdin, as the session shell reads it: as a
    # single argument it would exceed Linux's limit for one (128 KiB).
    result = subprocess.run(
        ["sh"], input=hash_script(HashTool.GNU_Z, str(root), names), capture_output=True,
        cwd=tmp_path, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _snapshot(tmp_path) == before
    assert parse_hash_output(HashTool.GNU_Z, result.stdout, names) == expected


def _hostile_root(tmp_path: Path) -> tuple[Path, Path]:
    """(top, root): a share root with a hostile name under ``top``, holding a ``subdir``."""
    top = tmp_path / "top"
    root = top / "-r $(touch pwned) 'x\""
    (root / "subdir").mkdir(parents=True)
    return top, root


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("tool_env", TOOL_KINDS, indirect=True)
def test_prefix_hash_hostile(shell: list[str], tool_env: ToolEnv, tmp_path: Path) -> None:
    tool, env, _ = tool_env
    top, root = _hostile_root(tmp_path)
    name = "-rf $(touch pwned) `touch pwned`;\n'\"\\ *"
    data = bytes(range(256)) * 400
    (root / name).write_bytes(data)
    before = _snapshot(top)
    for root_arg in (str(root), root.name):
        for length in (0, 1, 1000, len(data), len(data) + 10):
            cmd = prefix_hash_command(tool, root_arg, name, length)
            result = _run(shell, cmd, cwd=top, env=env)
            assert parse_prefix_hash(tool, result.stdout) == hashlib.md5(data[:length]).hexdigest()
        for absent in ("missing", "subdir"):
            result = _run(shell, prefix_hash_command(tool, root_arg, absent, 5), cwd=top, env=env)
            assert parse_prefix_hash(tool, result.stdout) is None, result.stdout
    result = _run(shell, prefix_hash_command(tool, "no-root", name, 5), cwd=top, env=env)
    assert parse_prefix_hash(tool, result.stdout) is None
    assert _snapshot(top) == before


def _follow_requests(size: int, steps: Sequence[int]) -> bytes:
    """The requests a writer sends: whole blocks at each acknowledged size, then the rest."""
    out, asked = [], 0
    for acked in steps:
        whole = acked // FOLLOW_BLOCK
        if whole > asked:
            out.append(follow_hash_request(asked, whole - asked))
            asked = whole
    total = -(-size // FOLLOW_BLOCK)
    if total > asked:
        out.append(follow_hash_request(asked, total - asked))
    return b"".join(out)


def _check_follow_hash(
    shell: list[str], tool: HashTool, env: dict[str, str], tmp_path: Path, perl: bool
) -> None:
    """The MD5 of the whole file, however the ranges are cut, and never an injection."""
    top, root = _hostile_root(tmp_path)
    name = "if=-rf $(touch pwned) `touch pwned`;\n'\"\\ *"
    for size in (0, 1, FOLLOW_BLOCK, 3 * FOLLOW_BLOCK + 12345):
        data = os.urandom(size)
        (root / name).write_bytes(data)
        before = _snapshot(top)
        cuts = ([], [size // 2], [FOLLOW_BLOCK, 2 * FOLLOW_BLOCK, size])
        for root_arg in (str(root), root.name):
            for steps in cuts:
                cmd = follow_hash_command(tool, root_arg, name, perl)
                result = _run(shell, cmd, cwd=top, env=env, stdin=_follow_requests(size, steps))
                got = parse_prefix_hash(tool, result.stdout)
                assert got == hashlib.md5(data).hexdigest(), (size, steps, result.stdout)
        assert _snapshot(top) == before
    for absent in ("missing", "subdir"):
        cmd = follow_hash_command(tool, str(root), absent, perl)
        result = _run(shell, cmd, cwd=top, env=env, stdin=follow_hash_request(0, 1))
        assert parse_prefix_hash(tool, result.stdout) is None, result.stdout
    result = _run(shell, follow_hash_command(tool, "no-root", name, perl), cwd=top, env=env)
    assert parse_prefix_hash(tool, result.stdout) is None
    assert not list(top.rglob("pwned"))


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("tool_env", TOOL_KINDS, indirect=True)
def test_follow_hash_hostile(shell: list[str], tool_env: ToolEnv, tmp_path: Path) -> None:
    tool, env, _ = tool_env
    _check_follow_hash(shell, tool, env, tmp_path, perl=False)


@needs_perl_md5
@pytest.mark.parametrize("shell", SHELLS)
def test_follow_hash_hostile_with_perl(shell: list[str], tmp_path: Path) -> None:
    _check_follow_hash(
        shell, HashTool.GNU, _env(os.environ.get("PATH", os.defpath)), tmp_path, True
    )


@needs_perl_md5
def test_follow_hash_with_perl_refuses_odd_input(tmp_path: Path) -> None:
    """perl gives no hash for a symlink at the name, a garbled request or a read error."""
    data = os.urandom(2 * FOLLOW_BLOCK + 5)
    (tmp_path / "real").write_bytes(data)
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "dir").mkdir()

    def follow(name: str, requests: bytes) -> str | None:
        cmd = follow_hash_command(HashTool.GNU, str(tmp_path), name, perl=True)
        result = _run(["sh", "-c"], cmd, cwd=tmp_path, stdin=requests)
        return parse_prefix_hash(HashTool.GNU, result.stdout)

    assert follow("real", b"0 1\n1 2\n") == hashlib.md5(data).hexdigest()
    assert follow("real", b"0 1\n") == hashlib.md5(data[:FOLLOW_BLOCK]).hexdigest()
    assert follow("link", b"0 3\n") is None  # never read through a symlink
    assert follow("dir", b"0 1\n") is None  # a read error
    for garbled in (b"0 1\nx 1\n", b"0 1\n1 2", b"-1 2\n", b"0 1 2\n", b"1" * 40 + b" 1\n"):
        assert follow("real", garbled) is None, garbled


def test_follow_perl_probe() -> None:
    """The probe says yes exactly when this machine's perl can load Digest::MD5."""
    result = _run(["sh", "-c"], FOLLOW_PERL_PROBE, cwd=Path.cwd())
    assert parse_perl_probe(result.stdout) is PERL_MD5
    assert not parse_perl_probe(b"perl: not found\n")


def test_follow_hash_request_checks() -> None:
    assert follow_hash_request(0, 3) == b"0 3\n"
    for first, blocks in ((0, 0), (-1, 1), (1, -2), (True, 1)):
        with pytest.raises(ValueError):
            follow_hash_request(first, blocks)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        follow_hash_command(HashTool.GNU, "r", "/abs")


# ------------------------------------------------------------------------- properties

_names = st.one_of(
    st.binary(min_size=1, max_size=30).map(lambda raw: os.fsdecode(raw.replace(b"\0", b"0"))),
    st.text(min_size=1, max_size=30).map(lambda text: text.replace("\0", "0")),
)
_entries = st.lists(
    st.tuples(_names, st.binary(min_size=16, max_size=16), st.booleans(), st.booleans()),
    max_size=20,
    unique_by=lambda entry: entry[0].encode("utf-8", "surrogateescape"),
)


def _gnu_escape(raw: bytes) -> bytes:
    return raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


@given(_entries, st.randoms(use_true_random=False))
def test_roundtrip_gnu_z(entries: list[tuple[str, bytes, bool, bool]], rnd: object) -> None:
    out = b""
    expected = {}
    for name, digest, upper, binary in entries:
        hexdigest = digest.hex()
        expected[name] = hexdigest
        shown = hexdigest.upper() if upper else hexdigest
        out += (
            shown.encode()
            + (b" *" if binary else b"  ")
            + b"./"
            + name.encode("utf-8", "surrogateescape")
            + b"\0"
        )
    requested = [name for name, *_ in entries] + ["never-reported"]
    rnd.shuffle(requested)  # type: ignore[attr-defined]
    assert parse_hash_output(HashTool.GNU_Z, out, requested) == expected


@given(_entries)
def test_roundtrip_gnu_escaped(entries: list[tuple[str, bytes, bool, bool]]) -> None:
    out = b""
    expected = {}
    for name, digest, upper, binary in entries:
        raw = name.encode("utf-8", "surrogateescape")
        hexdigest = digest.hex()
        expected[name] = hexdigest
        line = (hexdigest.upper() if upper else hexdigest).encode()
        line += (b" *" if binary else b"  ") + b"./" + _gnu_escape(raw) + b"\n"
        out += (b"\\" + line) if _gnu_escape(raw) != raw else line
    assert parse_hash_output(HashTool.GNU, out, [name for name, *_ in entries]) == expected


@given(_entries, st.sampled_from([HashTool.BSD, HashTool.GNU]))
def test_unescaped_lines_are_sound(
    entries: list[tuple[str, bytes, bool, bool]], tool: HashTool
) -> None:
    # BSD md5 -r and busybox md5sum print names raw: every hash reported must be right,
    # and every name without a newline must be reported.
    out = b""
    expected = {}
    for name, digest, _, _ in entries:
        expected[name] = digest.hex()
        sep = b" " if tool is HashTool.BSD else b"  "
        out += digest.hex().encode() + sep + b"./" + name.encode("utf-8", "surrogateescape")
        out += b"\n"
    got = parse_hash_output(tool, out, list(expected))
    assert got.items() <= expected.items()
    if not any("\n" in name for name in expected):
        assert got == expected


@given(st.binary(max_size=600), st.lists(_names, max_size=8))
def test_arbitrary_output_never_raises(stdout: bytes, requested: list[str]) -> None:
    for tool in HashTool:
        got = parse_hash_output(tool, stdout, requested)
        assert set(got) <= set(requested)
        for digest in got.values():
            assert len(digest) == 32 and set(digest) <= set("0123456789abcdef")
        prefix = parse_prefix_hash(tool, stdout)
        assert prefix is None or len(prefix) == 32
    assert parse_probe(stdout, 0) in (None, *HashTool)


@given(
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
        min_size=1,
        max_size=60,
    ).filter(lambda name: name not in (".", "..") and len(name.encode()) <= 200)
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_root_name_is_quoted(root_name: str) -> None:
    if MD5SUM is None:
        pytest.skip("GNU md5sum not installed")
    with tempfile.TemporaryDirectory() as scratch:
        top = Path(scratch)
        (top / root_name).mkdir()
        (top / root_name / "f").write_bytes(b"data")
        before = _snapshot(top)
        for root_arg in (root_name, str(top / root_name)):
            result = _run(["sh", "-c"], hash_script(HashTool.GNU_Z, root_arg, ["f"]), cwd=top)
            assert parse_hash_output(HashTool.GNU_Z, result.stdout, ["f"]) == {
                "f": hashlib.md5(b"data").hexdigest()
            }
        assert _snapshot(top) == before


# ------------------------------------------------------------------- the session shell


def test_session_request_shape() -> None:
    request, end = session_request("echo hi", "leftssh-ab12-3")
    assert request == b"echo hi\nprintf '\\n%s\\n' leftssh-ab12-3\n"
    assert end == b"\nleftssh-ab12-3\n"
    # The first bytes a session gets are plain text: read as an SFTP packet length they
    # are far beyond any server's limit.
    assert int.from_bytes(request[:4], "big") > 1 << 24
    for bad in ("", "a b", "x'y", "a;b", "n\nl"):
        with pytest.raises(ValueError):
            session_request("true", bad)
    with pytest.raises(ValueError):
        session_request(b"echo \0", "m")


def test_hash_script_shape() -> None:
    script = hash_script(HashTool.GNU_Z, "/srv/d", ["a", "it's", "-x"])
    assert script == (
        b"(cd -- /srv/d && { printf '%s\\0' './a' './it'\\''s' './-x'; } | xargs -0 md5sum -z --)"
    )
    assert hash_script(HashTool.BSD, "rel", ["a"]).startswith(b"(cd -- ./rel && ")
    for bad in ([], [""], ["/abs"], ["nul\0"]):
        with pytest.raises(ValueError):
            hash_script(HashTool.GNU, "/r", bad)


def _session(
    shell: Sequence[str],
    scripts: list[bytes | str],
    *,
    cwd: Path,
    env: dict[str, str],
    bindir: Path,
) -> list[bytes | None]:
    """Run ``scripts`` through one session shell, ``sh`` being ``shell`` (a wrapper put
    in ``bindir``); return each script's answer (None for one whose marker never came)."""
    bindir.mkdir(exist_ok=True)
    if not (bindir / "sh").exists():
        (bindir / "sh").write_text(
            "#!" + shutil.which("sh") + "\nexec " + " ".join(shell[:-1]) + ' "$@"\n'
        )
        (bindir / "sh").chmod(0o755)
    env = dict(env, PATH=f"{bindir}{os.pathsep}{env['PATH']}")
    requests = [session_request(sc, f"m-{i}") for i, sc in enumerate(scripts)]
    result = subprocess.run(
        [*shell, SESSION_COMMAND],
        input=b"".join(r for r, _ in requests),
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )
    out, answers = result.stdout, []
    for _, end in requests:
        before, found, out = out.partition(end)
        answers.append(before if found else None)
        if not found:
            out = before
    return answers


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("tool_env", TOOL_KINDS, indirect=True)
def test_session_probes_then_hashes_hostile_names(
    shell: list[str], tool_env: ToolEnv, tmp_path: Path
) -> None:
    """One shell answers the probe and two hash batches, each up to its own marker; the
    names ride on the script, quoted, and none of them runs or creates anything."""
    tool, env, missing = tool_env
    top = tmp_path / "top"
    root = top / "data"
    root.mkdir(parents=True)
    expected = _make_tree(root, HOSTILE_NAMES)
    requested = HOSTILE_NAMES + ["does-not-exist", "dir $(touch pwned)", "-dir", ABSENT_PREFIX]
    half = len(requested) // 2
    before = _snapshot(top)
    probe, first, second = _session(
        shell,
        [
            PROBE_COMMAND,
            hash_script(tool, str(root), requested[:half]),
            hash_script(tool, str(root), requested[half:]),
        ],
        cwd=top,
        env=env,
        bindir=tmp_path / "bin",
    )
    assert _snapshot(top) == before, "the session created or removed files"
    alone = _run(shell, PROBE_COMMAND, cwd=top, env=env)  # the probe as a command of its own
    assert probe is not None and parse_probe(probe, 0) is parse_probe(alone.stdout, 0)
    assert parse_probe(probe, 0) is not None
    assert first is not None and second is not None
    got = parse_hash_output(tool, first, requested[:half])
    got.update(parse_hash_output(tool, second, requested[half:]))
    assert got == {name: digest for name, digest in expected.items() if name not in missing}


@needs_md5sum
@pytest.mark.parametrize("shell", SHELLS)
def test_session_splits_long_name_lists(shell: list[str], tmp_path: Path) -> None:
    """Names beyond one printf's share of the argument space go in several printfs."""
    root = tmp_path / "data"
    root.mkdir()
    names = [f"{i:04}-" + "n" * 200 for i in range(400)]  # about 80 KiB of names
    expected = _make_tree(root, names)
    script = hash_script(HashTool.GNU_Z, str(root), names)
    assert script.count(b"printf '%s\\0'") >= 3
    env = _env(os.environ["PATH"])
    (answer,) = _session(shell, [script], cwd=root, env=env, bindir=tmp_path / "bin")
    assert answer is not None
    assert parse_hash_output(HashTool.GNU_Z, answer, names) == expected


SFTP_SERVERS = [
    p
    for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
    if Path(p).exists()
]


@pytest.mark.skipif(not SFTP_SERVERS, reason="OpenSSH sftp-server not installed")
def test_sftp_server_given_a_session_request_closes_at_once(tmp_path: Path) -> None:
    """A peer forcing its SFTP server on every command reads the first request as a far
    too long packet and exits: the client sees the end of the session, not a hang."""
    request, _ = session_request(PROBE_COMMAND, "m-0")
    proc = subprocess.Popen(
        [SFTP_SERVERS[0]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    proc.stdin.write(request)
    proc.stdin.flush()  # and stdin stays open, as in a session
    try:
        code = proc.wait(10)
    finally:
        proc.kill()
        proc.communicate()
    assert code != 0
