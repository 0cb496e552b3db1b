"""Remote hashing commands for an SSH peer: build the command lines, parse their output.

Pure code: nothing here opens a connection or touches a file. The caller runs the
strings on the peer and hands the captured bytes back to the parsers.

A login shell costs a start-up per command (a user's ``.bashrc`` can make that a
third of a second), so the probe and the batched hashes of a run go through one
long-lived shell: :data:`SESSION_COMMAND` starts ``sh`` reading scripts on stdin,
and :func:`session_request` wraps each script so that its output ends in a marker
line the client waits for; the prefix hash of a resume goes there too. The hash
that follows a large upload is a command of its own (it reads its requests on stdin).

The remote login shell is assumed to be POSIX sh compatible (bash, dash, zsh, busybox
ash, ksh). Quoting follows these rules:

* the root directory is made explicit (``./`` in front of a relative path, so it can
  never be read as an option, as ``-`` meaning ``$OLDPWD``, or be looked up in
  ``$CDPATH``) and then quoted with :func:`shlex.quote`;
* each name to hash is prefixed with ``./``, so that neither the hash tool nor xargs
  can read one as an option or as ``-`` (stdin), and single-quoted (a ``'`` in it
  becomes ``'\\''``); the names are arguments of the ``printf`` builtin, which prints
  them NUL-terminated into ``xargs -0``; ``--`` ends the options as well;
* the single name of :func:`prefix_hash_command` is quoted the same way.

Relative roots are relative to the login directory; ``~`` is not expanded.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from enum import Enum
from typing import NamedTuple

from leftssh.paths import PARTIAL_SUFFIX

__all__ = [
    "EMPTY_MD5",
    "FOLLOW_BLOCK",
    "FOLLOW_PERL_PROBE",
    "PROBE_COMMAND",
    "HashTool",
    "parse_hash_output",
    "parse_prefix_hash",
    "parse_probe",
    "follow_hash_command",
    "follow_hash_request",
    "prefix_hash_command",
    "SESSION_COMMAND",
    "hash_script",
    "session_request",
    "ARCHIVE_PREFIX",
    "TAR_PROBE",
    "archive_name",
    "parse_tar_probe",
    "unpack_script",
    "parse_unpack_output",
    "Unpack",
]

EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"

_HEX32 = re.compile(rb"[0-9a-fA-F]{32}")
_PREFIX_HASH_LINE = re.compile(rb"([0-9a-fA-F]{32})(?:[ \t]+\*?-)?")
_RC_MARKER = b"leftssh-rc="
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


class HashTool(str, Enum):
    """An MD5 tool found on the peer; the value is the command that hashes named files."""

    GNU_Z = "md5sum -z"
    """GNU coreutils with ``-z``: NUL-terminated records, names not escaped."""
    GNU = "md5sum"
    """GNU or busybox md5sum: ``hash  name`` lines, GNU escapes odd names."""
    BSD = "md5 -r"
    """BSD/macOS md5: ``hash name`` lines, nothing escaped."""


_MARKERS: dict[bytes, HashTool] = {
    b"gnu-z": HashTool.GNU_Z,
    b"gnu": HashTool.GNU,
    b"bsd": HashTool.BSD,
}
_PREFERENCE = (HashTool.GNU_Z, HashTool.GNU, HashTool.BSD)


def _build_probe() -> str:
    # Each candidate hashes /dev/null (empty input) through exactly the pipeline that
    # hash_script uses (names NUL-terminated, xargs -0, '--'), and must print the empty MD5
    # next to the name. For -z the record must end in NUL: tr swaps NUL and newline,
    # so a newline-terminated (non -z) answer leaves `read` without a full line.
    check = (
        'leftssh_probe_ok() { read -r h n && [ "$h" = ' + EMPTY_MD5 + " ] && "
        "case $n in /dev/null|'*/dev/null') true;; *) false;; esac; }"
    )
    feed = "printf '/dev/null\\0' | xargs -0"
    lines = [
        check,
        f"if {feed} {HashTool.GNU_Z.value} -- | tr '\\0\\n' '\\n_' | leftssh_probe_ok;"
        " then echo gnu-z; fi",
        f"if {feed} {HashTool.GNU.value} -- | leftssh_probe_ok; then echo gnu; fi",
        f"if {feed} {HashTool.BSD.value} -- | leftssh_probe_ok; then echo bsd; fi",
    ]
    return "{ " + "; ".join(lines) + "; } 2>/dev/null"


PROBE_COMMAND: str = _build_probe()
"""Run once per connection; prints ``gnu-z``, ``gnu`` and/or ``bsd``, one per working tool.

Missing tools print nothing (all stderr is discarded) and the exit status stays 0.
"""


def parse_probe(stdout: bytes, exit_status: int) -> HashTool | None:
    """Return the best tool reported by :data:`PROBE_COMMAND`, or None when none works.

    Lines other than the markers (shell start-up noise) are ignored. A non-zero exit
    status means the command did not run as a POSIX shell script: None.
    """
    if exit_status != 0:
        return None
    found = {_MARKERS[line] for line in _lines(stdout) if line in _MARKERS}
    for tool in _PREFERENCE:
        if tool in found:
            return tool
    return None


def _lines(data: bytes) -> list[bytes]:
    return [line.rstrip(b"\r") for line in data.split(b"\n")]


def _check_length(length: int) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, not {length!r}")
    return length


def _quote_root(root: str) -> str:
    """Quote a remote directory for ``cd --``."""
    if "\x00" in root:
        raise ValueError("root contains NUL")
    if not root:
        root = "."
    if not root.startswith("/") and not (root in (".", "..") or root.startswith(("./", "../"))):
        root = "./" + root
    return shlex.quote(root)


def _check_relpath(path: str) -> str:
    if not path:
        raise ValueError("empty path")
    if "\x00" in path:
        raise ValueError(f"path contains NUL: {path!r}")
    if path.startswith("/"):
        raise ValueError(f"path must be relative to the root: {path!r}")
    return path


def _encode(path: str) -> bytes:
    return path.encode(_ENCODING, _ERRORS)


def _unescape(name: bytes) -> bytes | None:
    """Undo GNU md5sum name escaping (``\\\\``, ``\\n``, ``\\r``); None if malformed."""
    if b"\\" not in name:
        return name
    out = bytearray()
    i = 0
    while i < len(name):
        byte = name[i]
        if byte != 0x5C:
            out.append(byte)
            i += 1
            continue
        nxt = name[i + 1 : i + 2]
        if nxt == b"\\":
            out += b"\\"
        elif nxt == b"n":
            out += b"\n"
        elif nxt == b"r":
            out += b"\r"
        else:
            return None
        i += 2
    return bytes(out)


def _parse_entry(tool: HashTool, raw: bytes) -> tuple[str, bytes, bool] | None:
    """Split one output record into (lowercase hash, name without './', escaped)."""
    escaped = False
    if tool is not HashTool.BSD and raw.startswith(b"\\"):
        escaped = True
        raw = raw[1:]
    digest = raw[:32]
    if len(digest) != 32 or not _HEX32.fullmatch(digest) or raw[32:33] != b" ":
        return None
    if tool is HashTool.BSD:
        name: bytes | None = raw[33:]
    else:
        if raw[33:34] not in (b" ", b"*"):
            return None
        name = raw[34:]
        if escaped:
            name = _unescape(name)
    if name is None or not name.startswith(b"./"):
        return None
    return digest.decode("ascii").lower(), name[2:], escaped


def _request_keys(requested: Sequence[str]) -> tuple[dict[bytes, list[str]], set[bytes]]:
    """Map the bytes sent for each path to its spellings; also the bytes sent only once."""
    keys: dict[bytes, list[str]] = {}
    seen_twice: set[bytes] = set()
    for path in requested:
        try:
            key = _encode(path)
        except UnicodeEncodeError:
            continue
        spellings = keys.get(key)
        if spellings is None:
            keys[key] = [path]
            continue
        seen_twice.add(key)
        if path not in spellings:
            spellings.append(path)
    return keys, set(keys) - seen_twice


def _candidates_z(
    tool: HashTool, stdout: bytes, keys: dict[bytes, list[str]]
) -> list[tuple[bytes, str]]:
    found: list[tuple[bytes, str]] = []
    for record in stdout.split(b"\x00")[:-1]:
        entry = _parse_entry(tool, record)
        if entry is not None and entry[1] in keys:
            found.append((entry[1], entry[0]))
            continue
        # Output printed before the first record (shell start-up files) ends up in
        # front of it; the record proper then starts after one of the newlines.
        options = []
        start = record.find(b"\n")
        while start >= 0:
            entry = _parse_entry(tool, record[start + 1 :])
            if entry is not None and entry[1] in keys:
                options.append((entry[1], entry[0]))
            start = record.find(b"\n", start + 1)
        if len(options) == 1:
            found.append(options[0])
    return found


def _candidates_lines(
    tool: HashTool, stdout: bytes, keys: dict[bytes, list[str]], once: set[bytes]
) -> list[tuple[bytes, str]]:
    # Unescaped names may contain newlines, so one entry may span several lines. Every
    # way of reading an entry that names a requested path is a candidate; a candidate
    # is kept only when no other candidate claims any of its lines (see _unambiguous).
    lines = stdout.split(b"\n")[:-1]
    splits: set[bytes] = set()
    for key in keys:
        at = key.find(b"\n")
        while at >= 0:
            splits.add(key[:at])
            at = key.find(b"\n", at + 1)
    spans: list[tuple[int, int, bytes, str]] = []
    for first, line in enumerate(lines):
        entry = _parse_entry(tool, line)
        if entry is None:
            continue
        digest, name, escaped = entry
        if name in keys:
            spans.append((first, first, name, digest))
        if escaped:
            continue
        last = first
        while name in splits and last + 1 < len(lines):
            last += 1
            name = name + b"\n" + lines[last]
            if name in keys:
                spans.append((first, last, name, digest))
    return _unambiguous(spans, len(lines), once)


def _unambiguous(
    spans: list[tuple[int, int, bytes, str]], line_count: int, once: set[bytes]
) -> list[tuple[bytes, str]]:
    # A candidate that alone claims all its lines is the real entry (every real entry
    # is a candidate). A name requested once has only one real entry, so its other
    # readings are false and are discarded, which may settle further lines.
    alive = list(spans)
    while True:
        claims = [0] * line_count
        for first, last, _, _ in alive:
            for index in range(first, last + 1):
                claims[index] += 1
        settled = [
            all(claims[index] == 1 for index in range(first, last + 1))
            for first, last, _, _ in alive
        ]
        decided = {
            span[2] for span, ok in zip(alive, settled, strict=True) if ok and span[2] in once
        }
        remaining = [
            span for span, ok in zip(alive, settled, strict=True) if ok or span[2] not in decided
        ]
        if len(remaining) == len(alive):
            return [
                (name, digest)
                for (_, _, name, digest), ok in zip(alive, settled, strict=True)
                if ok
            ]
        alive = remaining


def parse_hash_output(tool: HashTool, stdout: bytes, requested: Sequence[str]) -> dict[str, str]:
    """Map each requested path that was hashed to its lowercase hex MD5.

    Only requested names are accepted, under the spelling they were requested with.
    Garbage, partial records, unrequested names and malformed hashes are ignored; a
    path reported twice with different hashes is dropped; paths the tool could not
    read are simply absent. For line-based output without escaping (BSD md5, busybox
    md5sum), a name containing a newline is matched against the requested names; an
    entry that can still be read in more than one way is dropped.
    """
    tool = HashTool(tool)
    keys, once = _request_keys(requested)
    if not keys:
        return {}
    if tool is HashTool.GNU_Z:
        found = _candidates_z(tool, stdout, keys)
    else:
        found = _candidates_lines(tool, stdout, keys, once)
    hashes: dict[bytes, str] = {}
    conflicting: set[bytes] = set()
    for key, digest in found:
        if key in conflicting:
            continue
        if hashes.setdefault(key, digest) != digest:
            conflicting.add(key)
            del hashes[key]
    return {path: digest for key, digest in hashes.items() for path in keys[key]}


def prefix_hash_command(tool: HashTool, root: str, path: str, length: int) -> str:
    """Return the command printing the MD5 of the first ``length`` bytes of ``root/path``.

    The output is a status line for ``head`` followed by the hash line, which
    :func:`parse_prefix_hash` checks, so a missing or unreadable file never passes
    for the hash of empty input. A file shorter than ``length`` is hashed whole.
    """
    count = _check_length(length)
    name = shlex.quote("./" + _check_relpath(path))
    return _hash_stream(tool, root, f"head -c {count} -- {name}", "$?")


def _hash_stream(tool: HashTool, root: str, producer: str, status: str) -> str:
    """In ``root``, pipe what ``producer`` prints into MD5, after a ``status`` marker line."""
    digest = "md5 -q" if HashTool(tool) is HashTool.BSD else "md5sum"
    return (
        f"cd -- {_quote_root(root)} && "
        f'{{ {{ {producer}; echo "{_RC_MARKER.decode()}{status}" >&3; }} | {digest}; }} 3>&1'
    )


FOLLOW_BLOCK = 1 << 20
"""The unit, in bytes, of the ranges that :func:`follow_hash_request` asks for."""


FOLLOW_PERL_PROBE = "perl -MDigest::MD5 -e 'print qq(leftssh-perl\\n)' </dev/null"
"""Run once per connection in the session: can the peer's perl hash (for
:func:`follow_hash_command` with ``perl``). Read by :func:`parse_perl_probe`."""

# The ranges of follow_hash_request, read with sysread from the file (opened once,
# never through a symlink) into one running MD5; then the status line and the hash.
_FOLLOW_PERL = (
    "use Fcntl; my ($s, $f, $m) = (0, undef, Digest::MD5->new);"
    " sysopen($f, $ARGV[0], O_RDONLY | O_NOFOLLOW) or $s = 1;"
    " while (my $l = <STDIN>) { next if $s;"
    " my ($o, $n) = $l =~ /\\A([0-9]{1,15}) ([0-9]{1,15})\\n\\z/ or do { $s = 1; next };"
    " sysseek($f, $o * BLOCK, 0) or do { $s = 1; next }; my $w = $n * BLOCK;"
    " while ($w > 0) { my $r = sysread($f, my $d, $w < BLOCK ? $w : BLOCK);"
    " if (!defined $r) { $s = 1; last } last if !$r; $m->add($d); $w -= $r } }"
    ' print "leftssh-rc=$s\\n", $m->hexdigest, "  -\\n"'
)


def follow_hash_command(tool: HashTool, root: str, path: str, perl: bool = False) -> str:
    """Return the command that hashes ``root/path`` while it is being written.

    The command reads range requests on stdin (see :func:`follow_hash_request`) and
    feeds each range, read back from the file, into one running MD5; when stdin ends
    it prints what :func:`parse_prefix_hash` reads. The writer asks only for bytes
    the peer has acknowledged, in order, so the hash covers the file as it lies on
    the receiving side, and is ready moments after the last write instead of after a
    second full pass. The ranges are read by ``dd`` into ``md5sum`` (one ``dd`` per
    request), or with ``perl`` (see :data:`FOLLOW_PERL_PROBE`) by one process that
    hashes what it reads, with no pipe between. A failed read: no hash.
    """
    name = "./" + _check_relpath(path)
    if perl:
        script = _FOLLOW_PERL.replace("BLOCK", str(FOLLOW_BLOCK))
        return (
            f"cd -- {_quote_root(root)} && "
            f"perl -MDigest::MD5 -e {shlex.quote(script)} -- {shlex.quote(name)}"
        )
    operand = shlex.quote("if=" + name)
    loop = (
        f"s=0; while read -r a n; do "
        f'dd {operand} bs={FOLLOW_BLOCK} skip="$a" count="$n" 2>/dev/null || s=1; done'
    )
    return _hash_stream(tool, root, loop, "$s")


def follow_hash_request(first_block: int, blocks: int) -> bytes:
    """Return the stdin line asking :func:`follow_hash_command` to hash these blocks."""
    _check_length(first_block)
    if _check_length(blocks) == 0:
        raise ValueError("a request needs at least one block")
    return f"{first_block} {blocks}\n".encode()


def parse_prefix_hash(tool: HashTool, stdout: bytes) -> str | None:
    """Return the lowercase MD5 printed by :func:`prefix_hash_command`, or None.

    None unless the output holds exactly one ``head`` status line, that status is 0,
    and it is followed by exactly one valid hash line (earlier lines, such as shell
    start-up noise, are ignored).
    """
    HashTool(tool)
    lines = _lines(stdout)
    if lines[-1] != b"":
        return None  # the last line is incomplete
    lines.pop()
    markers = [i for i, line in enumerate(lines) if line.startswith(_RC_MARKER)]
    if len(markers) != 1 or lines[markers[0]] != _RC_MARKER + b"0":
        return None
    rest = lines[markers[0] + 1 :]
    if len(rest) != 1:
        return None
    match = _PREFIX_HASH_LINE.fullmatch(rest[0])
    return match.group(1).decode("ascii").lower() if match else None


# -- one shell for many commands -------------------------------------------------------------

SESSION_COMMAND = "exec sh 2>/dev/null"
"""Run once per session: ``sh`` reading commands on stdin, its errors discarded.

The first bytes it is sent (see :func:`session_request`) are plain text, so a peer
that runs an SFTP server whatever the command (``ForceCommand internal-sftp``) reads
a length far beyond its limit and closes the channel at once.
"""

_PRINTF_CHUNK = 32 << 10  # argument bytes per printf: far below any ARG_MAX, builtin or not


def _quote_bytes(name: bytes) -> bytes:
    return b"'" + name.replace(b"'", b"'\\''") + b"'"


def hash_script(tool: HashTool, root: str, paths: Sequence[str]) -> bytes:
    """Return the session script hashing ``paths`` (relative to ``root``) with ``tool``.

    The names, ``./`` in front and single-quoted, are printed NUL-terminated by
    ``printf`` (a shell builtin; in pieces, should it not be one) into the same
    ``xargs -0 TOOL --``, in a subshell, so ``cd`` does not stay. xargs runs the
    tool as often as the argument size limit needs; missing or unreadable files are
    reported on stderr and skipped. Its output is what :func:`parse_hash_output` reads. Raises
    ValueError for an empty list, or an empty or absolute path or one with NUL.
    """
    return (
        b"(cd -- "
        + _quote_root(root).encode(_ENCODING, _ERRORS)
        + b" && "
        + _hashing(tool, paths)
        + b")"
    )


def _hashing(tool: HashTool, paths: Sequence[str]) -> bytes:
    """``{ printf '%s\\0' './a' ...; } | xargs -0 TOOL --``: hash ``paths`` (relative)."""
    if not paths:
        raise ValueError("nothing to hash")
    return _for_each(HashTool(tool).value.encode(), paths)


def _in_chunks(groups: Sequence[Sequence[bytes]], limit: int) -> list[tuple[int, list[bytes]]]:
    """Cut groups of quoted words (a group is never split) into chunks of at most
    ``limit`` argument bytes (a single larger group gets a chunk of its own): for
    each chunk, the number of its first group and its words."""
    chunks: list[tuple[int, list[bytes]]] = []
    words: list[bytes] = []
    size = 0
    for number, group in enumerate(groups):
        length = sum(len(w) + 1 for w in group)
        if not words or size + length > limit:
            words, size = [], 0
            chunks.append((number, words))
        words += group
        size += length
    return chunks


def _for_each(command: bytes, paths: Sequence[str]) -> bytes:
    """``{ printf '%s\\0' './a' ...; } | xargs -0 COMMAND --``: run it on relative ``paths``.

    The names are printed in pieces of at most ``_PRINTF_CHUNK`` argument bytes by
    the ``printf`` builtin; xargs runs the command as often as its limit needs."""
    words = [[_quote_bytes(b"./" + _encode(_check_relpath(p)))] for p in paths]
    printfs = [b"printf '%s\\0' " + b" ".join(w) for _, w in _in_chunks(words, _PRINTF_CHUNK)]
    return b"{ " + b"; ".join(printfs) + b"; } | xargs -0 " + command + b" --"


def session_request(script: str | bytes, marker: str) -> tuple[bytes, bytes]:
    """Return (what to send, what ends its answer) for one script in the session.

    ``marker`` must be unique to the request (a random token and a counter): the
    answer is everything the script printed before the marker line. Raises
    ValueError for a marker that is not a plain word.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", marker):
        raise ValueError(f"marker must be a plain word, not {marker!r}")
    body = script.encode(_ENCODING, _ERRORS) if isinstance(script, str) else script
    if b"\x00" in body:
        raise ValueError("script contains NUL")
    request = body + b"\nprintf '\\n%s\\n' " + marker.encode() + b"\n"
    return request, b"\n" + marker.encode() + b"\n"


# -- unpacking archives of small files (leftssh.transport.tar) ------------------------------

TAR_PROBE = "tar --version </dev/null"
"""Run once per connection in the session; GNU tar names itself on the first line."""

ARCHIVE_PREFIX = ".leftssh-tar-"
_UNPACKED = b"leftssh-unpack "


def parse_tar_probe(stdout: bytes) -> bool:
    """Tell whether :data:`TAR_PROBE` found GNU tar (other lines are start-up noise)."""
    return any(line.startswith(b"tar (GNU tar) ") for line in _lines(stdout))


def archive_name(run: str, number: int) -> str:
    """The name of a run's archive in the directory it unpacks into (a partial's suffix)."""
    if not re.fullmatch(r"[A-Za-z0-9]+", run):
        raise ValueError(f"run must be a plain word, not {run!r}")
    return f"{ARCHIVE_PREFIX}{run}-{number}{PARTIAL_SUFFIX}"


class Unpack(NamedTuple):
    """One archive for :func:`unpack_script` to unpack."""

    directory: str
    """Where, relative to the root ('' for the root itself)."""
    archive: str
    """The archive's name in that directory (see :func:`archive_name`)."""
    sweep: bool
    """First remove archives that other runs left in the directory."""
    members: Sequence[str]
    """The names in the archive: hashed once unpacked, when a hash tool is given."""


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def unpack_script(
    root: str,
    real_root: str,
    run: str,
    jobs: Sequence[Unpack],
    tool: HashTool | None,
    marker: str,
) -> bytes:
    """Return the session script that unpacks archives, each in its own directory.

    For each job the shell enters the directory with ``cd -P`` and goes on only if
    ``$PWD``, the physical path the kernel reports for the directory it is now in,
    is that directory under ``real_root`` (the share's own physical path): a
    directory swapped for a symlink is refused, and no later swap can move the
    shell out. GNU tar then unpacks the archive right there (its members have no
    directory part), replacing whatever holds a member's name without following
    it, with the archive's mtimes and exact permission bits, owned by the login
    user. Then all the archives are removed, a line holding ``marker`` (a word
    unique to this script) is printed and, with ``tool``, all the members are
    hashed, as :func:`hash_script` would. :func:`parse_unpack_output` reads the
    output. One ``tar`` per archive, one ``rm`` and one hash tool for the script.
    """
    archive_name(run, 0)  # checks the run's word
    if not re.fullmatch(r"[A-Za-z0-9._-]+", marker):
        raise ValueError(f"marker must be a plain word, not {marker!r}")
    if not jobs:
        raise ValueError("nothing to unpack")
    quoted_root = _quote_root(root).encode(_ENCODING, _ERRORS)
    lines: list[bytes] = []
    for job in jobs:
        if job.directory:
            _check_relpath(job.directory)
        if not job.archive.startswith(ARCHIVE_PREFIX) or "/" in job.archive:
            raise ValueError(f"not an archive name: {job.archive!r}")
        where = f"{root.rstrip('/')}/{job.directory}" if job.directory else root
        expect = f"{real_root.rstrip('/')}/{job.directory}" if job.directory else real_root
        steps = b""
        if job.sweep:
            steps = (
                f"for f in ./{ARCHIVE_PREFIX}*{PARTIAL_SUFFIX}; do case $f in "
                f'./{ARCHIVE_PREFIX}{run}-*) ;; *) [ -e "$f" ] && rm -f -- "$f";; esac; done; '
            ).encode()
        lines.append(
            b"if cd -P -- "
            + _quote_root(where).encode(_ENCODING, _ERRORS)
            + b' && [ "$PWD" = '
            + _quote_bytes(_encode(expect or "/"))
            + b" ]; then "
            + steps
            + b"tar -x -p --no-same-owner --force-local -f "
            + _quote_bytes(_encode("./" + job.archive))
            + b' </dev/null; echo "'
            + _UNPACKED
            + b"$?\"; else echo '"
            + _UNPACKED
            + b"-'; fi"
        )
    lines.append(b"cd /")
    archives = [_join(job.directory, job.archive) for job in jobs]
    lines.append(b"(cd -- " + quoted_root + b" && " + _for_each(b"rm -f", archives) + b")")
    lines.append(b"printf '\\n%s\\n' " + marker.encode())
    members = [_join(job.directory, m) for job in jobs for m in job.members]
    if tool is not None and members:
        lines.append(b"(cd -- " + quoted_root + b" && " + _hashing(tool, members) + b")")
    return b"\n".join(lines)


def parse_unpack_output(
    stdout: bytes, jobs: Sequence[Unpack], tool: HashTool | None, marker: str
) -> list[tuple[bool, dict[str, str]]]:
    """For each job of :func:`unpack_script`: did its archive unpack whole, and the
    MD5 of each of its members that was hashed (by member name).

    Output that does not hold exactly one result per job proves nothing: all
    (False, {}).
    """
    head, found, tail = stdout.partition(b"\n" + marker.encode() + b"\n")
    statuses = [line[len(_UNPACKED) :] for line in _lines(head) if line.startswith(_UNPACKED)]
    if not found or len(statuses) != len(jobs):
        return [(False, {})] * len(jobs)
    members = [_join(job.directory, m) for job in jobs for m in job.members]
    hashes = parse_hash_output(tool, tail, members) if tool is not None and members else {}
    results = []
    for job, status in zip(jobs, statuses, strict=True):
        if status != b"0":
            results.append((False, {}))
            continue
        mine = {m: hashes[p] for m in job.members if (p := _join(job.directory, m)) in hashes}
        results.append((True, mine))
    return results


# -- renaming many partials into place at once ------------------------------------

PERL_PROBE = "perl -e 'print qq(leftssh-perl\\n)' </dev/null"
"""Run once per connection in the session: does the peer have perl (for :func:`rename_script`)."""

_RENAMED = b"leftssh-mv "
_RENAME_CHUNK = 32 << 10  # argument bytes per perl: far below any ARG_MAX

# Each pair: the partial must still be a regular file (lstat, not followed); link(2)
# gives it the new name only if that name is free (as OpenSSH's SFTP rename does),
# then the partial's name is removed (if that fails, the new name is taken back, as
# OpenSSH does). One line per pair: its number and "ok", or the errno's symbolic
# name (from perl's %!), or "nf" for a partial that is gone or no longer a regular
# file.
_RENAME_PERL = (
    "my $b = shift; sub e { my $c = $! + 0; local $! = $c;"
    " my ($x) = grep { $!{$_} } keys %!; $x // $c }"
    " for (my $i = 0; $i < @ARGV; $i += 2) { my ($o, $n) = @ARGV[$i, $i + 1];"
    " my $k = $b + $i / 2; my $r = q(ok);"
    " if (!(lstat $o) || !-f _) { $r = q(nf) } elsif (!link $o, $n) { $r = e() }"
    " elsif (!unlink $o) { $r = e(); unlink $n } print qq(leftssh-mv $k $r\n) }"
)
_RENAME_LINE = re.compile(rb"leftssh-mv ([0-9]{1,9}) (ok|nf|E[A-Z0-9]{1,20}|[0-9]{1,5})")


def parse_perl_probe(stdout: bytes) -> bool:
    """Tell whether :data:`PERL_PROBE` ran perl (other lines are start-up noise)."""
    return b"leftssh-perl" in _lines(stdout)


def _rename_chunks(pairs: Sequence[tuple[str, str]]) -> list[tuple[int, list[bytes]]]:
    """Cut the pairs into chunks of quoted names: (number of its first pair, words)."""
    quoted = [[_quote_bytes(_encode(_check_relpath(p))) for p in pair] for pair in pairs]
    return _in_chunks(quoted, _RENAME_CHUNK)


def rename_script(root: str, pairs: Sequence[tuple[str, str]]) -> bytes:
    """Return the session script giving each (partial, new name) pair, relative to
    ``root``, its new name unless that name is taken, with one perl per chunk of
    names. :func:`parse_rename_output` reads what it prints. Raises ValueError for
    no pairs, or an empty or absolute path or one with NUL."""
    if not pairs:
        raise ValueError("nothing to rename")
    code = b"perl -e " + _quote_bytes(_RENAME_PERL.encode()) + b" -- "
    runs = [
        code + str(first).encode() + b" " + b" ".join(words)
        for first, words in _rename_chunks(pairs)
    ]
    return (
        b"(cd -- "
        + _quote_root(root).encode(_ENCODING, _ERRORS)
        + b" && { "
        + b"; ".join(runs)
        + b"; } </dev/null)"
    )


def parse_rename_output(stdout: bytes, pairs: Sequence[tuple[str, str]]) -> dict[int, str]:
    """The pairs of :func:`rename_script` that did not get their new name, by number,
    each with why: an errno's symbolic name (or number), "nf" (the partial was gone
    or not a regular file), or "?" for a pair with no line at all (perl absent or
    killed before it got there): that one may or may not have its name.
    """
    done: dict[int, str] = {}
    for line in _lines(stdout):
        m = _RENAME_LINE.fullmatch(line)
        if m is not None and int(m[1]) < len(pairs):
            done[int(m[1])] = m[2].decode("ascii")
    return {n: why for n in range(len(pairs)) if (why := done.get(n, "?")) != "ok"}
