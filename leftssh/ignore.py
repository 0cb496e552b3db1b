"""``.leftignore`` rules: gitignore syntax, decided exactly as ``git check-ignore`` does.

Patterns are compiled with :class:`pathspec.GitIgnoreSpec`; :class:`IgnoreRules` adds what a
single spec does not model and corrects the few places where pathspec and git disagree:

* git decides a path with the deepest ignore file that has a matching pattern, and a path
  whose parent directory is ignored is ignored no matter what (it cannot be re-included).
  pathspec matches a pattern against a path *or any of its ancestors*, which gives wrong
  answers once several ignore files are combined (``!b`` in ``a/.leftignore`` would hide
  ``*.txt`` from the root file for ``a/b/c.txt``), so each pattern is matched against the
  path itself only, and ancestors are decided separately (cached per directory).
* ``foo/**`` matches the contents of ``foo``, not ``foo`` itself; ``foo/**/`` matches only
  directories below ``foo``; a segment of three or more stars is ``**``.
* Only unescaped trailing *spaces* are removed (pathspec strips all trailing whitespace and
  rejects ``foo\\   ``); a trailing unescaped backslash makes a pattern that never matches.
* Bracket expressions follow git's wildmatch: ``\\`` escapes, ``[:alpha:]``-style classes,
  ranges, and a bracket never matches ``/``.
* Matching is done on the UTF-8 bytes of names, as git does, so ``?`` matches one byte.
* git's literal-prefix quirk: in ``a/b**/c`` the ``**`` right after the literal prefix
  ``a/b`` still matches across directories.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from leftssh.errors import UsageError

IGNORE_FILE = ".leftignore"

__all__ = ["IGNORE_FILE", "IgnoreRules"]

_UTF8_BOM = "\ufeff"
_GLOB_SPECIAL = "*?[\\"
# Placeholders stand for pieces that pathspec cannot express (bracket expressions, escaped
# trailing whitespace, the literal-prefix "**"). Matched text is the UTF-8 bytes of a name
# mapped one byte to one char (latin-1), so chars from U+0100 never occur in it.
_PLACEHOLDER_BASE = 0x100
_NAMED_GROUP = re.compile(r"\(\?P<[^>]*>")

# git's wildmatch character classes (ASCII only, as git's own ctype).
_PRINT = range(0x20, 0x7F)
_CLASSES: dict[str, frozenset[int]] = {
    "alnum": frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "alpha": frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "blank": frozenset(b" \t"),
    "cntrl": frozenset([*range(0x00, 0x20), 0x7F]),
    "digit": frozenset(b"0123456789"),
    "graph": frozenset(range(0x21, 0x7F)),
    "lower": frozenset(b"abcdefghijklmnopqrstuvwxyz"),
    "print": frozenset(_PRINT),
    "punct": frozenset(c for c in _PRINT if not chr(c).isalnum() and c != 0x20),
    "space": frozenset(b" \t\n\r"),
    "upper": frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "xdigit": frozenset(b"0123456789abcdefABCDEF"),
}


def _raw(text: str) -> str:
    """Map a name or pattern to its UTF-8 bytes, one char per byte (git matches bytes)."""
    if text.isascii():
        return text
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")
    return data.decode("latin-1")


def _decode(data: bytes, name: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"ignore file {name} is not valid UTF-8 (bad byte at offset {exc.start})"
        ) from None
    return text


def _split_lines(text: str) -> list[str]:
    """Split like git: on LF only, dropping one CR before it; a leading BOM is skipped."""
    if text.startswith(_UTF8_BOM):
        text = text[1:]
    return text.split("\n")


def _clean_lines(lines: Iterable[str]) -> list[str]:
    out: list[str] = []
    for item in lines:
        for line in item.split("\n"):
            out.append(line[:-1] if line.endswith("\r") else line)
    return out


def _trim_trailing_spaces(line: str) -> str:
    """git's trim_trailing_spaces(): drop trailing spaces unless escaped with a backslash."""
    last_space = -1
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if ch == " ":
            if last_space < 0:
                last_space = i
        elif ch == "\\":
            i += 1
            if i >= n:
                return line
            last_space = -1
        else:
            last_space = -1
        i += 1
    return line[:last_space] if last_space >= 0 else line


def _byte_set_regex(chars: set[int], negated: bool) -> str:
    if negated:
        chars = set(range(256)) - chars
    chars.discard(0x2F)  # a bracket expression never matches "/"
    chars.discard(0x00)
    if not chars:
        return "(?!)"
    parts: list[str] = []
    ordered = sorted(chars)
    start = prev = ordered[0]
    for c in [*ordered[1:], -1]:
        if c == prev + 1:
            prev = c
            continue
        parts.append(f"\\x{start:02x}" if start == prev else f"\\x{start:02x}-\\x{prev:02x}")
        start = prev = c
    return "[" + "".join(parts) + "]"


def _parse_bracket(p: str, i: int) -> tuple[str, int] | None:
    """Parse the bracket expression at ``p[i] == "["`` as git's wildmatch does.

    Returns (regex, index after the closing bracket), or None when git aborts the match
    (unterminated expression, unknown ``[:class:]``): such a pattern never matches.
    """
    n = len(p)
    j = i + 1
    if j >= n:
        return None
    ch = p[j]
    negated = ch in "!^"
    if negated:
        j += 1
        if j >= n:
            return None
        ch = p[j]
    chars: set[int] = set()
    prev = ""
    while True:
        if ch == "\\":
            j += 1
            if j >= n:
                return None
            ch = p[j]
            chars.add(ord(ch))
        elif ch == "-" and prev and j + 1 < n and p[j + 1] != "]":
            j += 1
            ch = p[j]
            if ch == "\\":
                j += 1
                if j >= n:
                    return None
                ch = p[j]
            chars.update(range(ord(prev), ord(ch) + 1))
            ch = ""
        elif ch == "[" and j + 1 < n and p[j + 1] == ":":
            end = p.find("]", j + 2)
            if end < 0:
                return None
            name = p[j + 2 : end]
            if not name or name[-1] != ":":
                chars.add(ord("["))  # no ":]": a plain "["
            else:
                cls = _CLASSES.get(name[:-1])
                if cls is None:
                    return None
                chars.update(cls)
                j = end
                ch = ""
        else:
            chars.add(ord(ch))
        prev = ch
        j += 1
        if j >= n:
            return None
        ch = p[j]
        if ch == "]":
            return _byte_set_regex(chars, negated), j + 1


def _compile_body(text: str) -> str | None:
    """Compile a pathspec pattern to a regex source; None if it is a no-op or invalid."""
    import pathspec  # here, not at start-up: a share without ignore rules never needs it

    try:
        spec = pathspec.GitIgnoreSpec.from_lines([text])
    except ValueError:  # GitIgnorePatternError
        return None
    if len(spec.patterns) != 1:
        return None
    pattern = spec.patterns[0]
    regex = getattr(pattern, "regex", None)
    if pattern.include is None or regex is None:
        return None
    source = regex.pattern
    if isinstance(source, bytes):  # pragma: no cover - str in, str out
        source = source.decode("latin-1")
    return source


def _translate(body: str, anchored: bool) -> str | None:
    """Regex (fullmatch, DOTALL) for a pattern body; None if it never matches.

    ``body`` has no negation, no trailing ``/`` and no leading ``/``. An ``anchored`` body
    is matched against the path relative to its ignore file's directory, any other body
    (git's "no slash" patterns) against the last component of the path only.
    """
    subs: dict[str, str] = {}

    def placeholder(regex: str) -> str:
        ch = chr(_PLACEHOLDER_BASE + len(subs))
        subs[ch] = regex
        return ch

    first_special = next((k for k, c in enumerate(body) if c in _GLOB_SPECIAL), -1)
    tokens: list[str] = []
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch == "\\":
            if i + 1 >= n:
                return None  # a trailing backslash never matches
            nxt = body[i + 1]
            tokens.append("/" if nxt == "/" else "\\" + nxt)
            i += 2
        elif ch == "[":
            parsed = _parse_bracket(body, i)
            if parsed is None:
                return None
            regex, i = parsed
            tokens.append(placeholder(regex))
        elif ch == "*":
            j = i
            while j < n and body[j] == "*":
                j += 1
            after = body[j : j + 1]
            quirk = (
                anchored
                and i == first_special
                and i > 0
                and body[i - 1] != "/"
                and j - i >= 2
                and (after in ("", "/") or body.startswith("\\/", j))
            )
            if not quirk:
                tokens.append(body[i:j])
                i = j
                continue
            # git compares the literal prefix first, then wildmatches the rest, where a
            # leading "**/" may match nothing or any text ending in "/".
            i = j
            while i < n:
                k = i + (1 if body[i] == "/" else 2)  # skip the "/" or "\/"
                m = k
                while m < n and body[m] == "*":
                    m += 1
                if m - k >= 2 and (m == n or body[m] == "/" or body.startswith("\\/", m)):
                    i = m  # a following "**" segment adds nothing
                    continue
                i = k
                break
            tokens.append(placeholder(".*" if i >= n else "(?:.*/)?"))
        else:
            tokens.append(ch)
            i += 1

    if tokens and len(tokens[-1]) <= 2 and tokens[-1][-1].isspace():
        # pathspec would strip trailing whitespace; git keeps it (spaces only if escaped).
        tokens[-1] = placeholder(re.escape(tokens[-1][-1]))

    text = "".join(tokens)
    segments = text.split("/")
    if "" in segments:
        return None  # an empty segment (e.g. "a//b", or an escaped leading "/") never matches
    segments = ["**" if len(s) >= 2 and s.strip("*") == "" else s for s in segments]
    if len(segments) >= 2 and segments[-1] == "**":
        segments.append("*")  # "dir/**" matches what is inside dir, not dir itself
    text = "/".join(segments)
    if len(segments) == 1:
        # Anchor it: an anchored pattern to the ignore file's directory, a name pattern
        # (no "/" at all) to the name it is matched against.
        text = "/" + text
    elif text[0] in "!#":
        text = "\\" + text

    source = _compile_body(text)
    if source is None:
        return None
    if source == ".":  # pathspec's shortcut for patterns that match every path
        return ".+"
    source = _NAMED_GROUP.sub("(?:", source)
    for ch, regex in subs.items():
        if source.count(ch) != 1:  # pragma: no cover - pathspec keeps literal chars as is
            return None
        source = source.replace(ch, regex)
    return source


class _Rule(NamedTuple):
    negated: bool
    dir_only: bool
    anchored: bool  # False: matched against the name only
    regex: str


def _compile_line(line: str) -> _Rule | None:
    """One ignore-file line (already byte-mapped) -> its rule, or None for a no-op."""
    if not line or line[0] == "#":
        return None
    line = _trim_trailing_spaces(line)
    negated = line.startswith("!")
    body = line[1:] if negated else line
    dir_only = body.endswith("/")
    if dir_only:
        body = body[:-1]
    anchored = "/" in body
    if body.startswith("/"):
        body = body[1:]
        if body.startswith("/"):
            return None
    if not body:
        return None
    regex = _translate(body, anchored)
    if regex is None:
        return None
    return _Rule(negated, dir_only, anchored, regex)


_Alternation = tuple[re.Pattern[str], dict[str, tuple[int, bool]]]


def _alternation(rules: list[tuple[int, _Rule]]) -> _Alternation | None:
    """One regex for several rules; a match names the last matching rule."""
    if not rules:
        return None
    # Later patterns win: try them first, the alternation takes the first that fits.
    parts = [f"(?P<r{index}>{rule.regex})" for index, rule in reversed(rules)]
    info = {f"r{index}": (index, not rule.negated) for index, rule in rules}
    return re.compile("|".join(parts), re.DOTALL), info


class _Level:
    """The compiled patterns of one ignore file: the last matching pattern decides."""

    __slots__ = ("_by_name", "_by_path")

    def __init__(self, rules: list[_Rule]) -> None:
        numbered = list(enumerate(rules))

        def pick(anchored: bool, is_dir: bool) -> _Alternation | None:
            return _alternation(
                [
                    (i, rule)
                    for i, rule in numbered
                    if rule.anchored == anchored and (is_dir or not rule.dir_only)
                ]
            )

        # Indexed by is_dir: name patterns see the last component, the others the path.
        self._by_name = (pick(False, False), pick(False, True))
        self._by_path = (pick(True, False), pick(True, True))

    def match(self, rel: str, is_dir: bool) -> bool | None:
        """True: ignored, False: re-included, None: no pattern of this file matches."""
        best: tuple[int, bool] | None = None
        alt = self._by_name[is_dir]
        if alt is not None:
            m = alt[0].fullmatch(rel.rpartition("/")[2])
            if m is not None and m.lastgroup is not None:
                best = alt[1][m.lastgroup]
        alt = self._by_path[is_dir]
        if alt is not None:
            m = alt[0].fullmatch(rel)
            if m is not None and m.lastgroup is not None:
                found = alt[1][m.lastgroup]
                if best is None or found[0] > best[0]:
                    best = found
        return None if best is None else best[1]


def _compile_level(lines: list[str]) -> _Level | None:
    rules = [rule for line in lines if (rule := _compile_line(_raw(line))) is not None]
    return _Level(rules) if rules else None


def _norm_dir(dir_path: str) -> str:
    d = dir_path.replace(os.sep, "/") if os.sep != "/" else dir_path
    d = d.strip("/")
    while d.startswith("./"):
        d = d[2:]
    return "" if d == "." else d


class IgnoreRules:
    """The ``.leftignore`` rules of one share tree.

    Precedence, lowest first: the project file (``root_lines``, next to the share
    directory), a ``.leftignore`` at the share root, then deeper ``.leftignore`` files.
    """

    def __init__(self, root_lines: Iterable[str] = ()) -> None:
        self._root: list[str] = _clean_lines(root_lines)
        self._nested: dict[str, list[str]] = {}  # byte-mapped share-relative dir -> lines
        self._compiled: dict[str, _Level | None] = {}  # same keys -> compiled, lazily
        self._root_level: _Level | None = _compile_level(self._root)
        self._reset_caches()

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_project(cls, share_dir: Path) -> IgnoreRules:
        """Read ``<parent of the absolute share_dir>/.leftignore`` if it exists.

        Its patterns apply to the share tree as if the file stood at its root. A missing
        file gives empty rules; an unreadable or non-UTF-8 file raises UsageError.
        """
        path = Path(os.path.abspath(share_dir)).parent / IGNORE_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise UsageError(f"cannot read ignore file {path}: {exc.strerror or exc}") from None
        return cls(_split_lines(_decode(data, str(path))))

    def add_nested(self, dir_path: str, text: str | bytes) -> None:
        """Add a ``.leftignore`` found in the share at relative posix dir ``dir_path``.

        ``""`` is the share root itself. Its patterns apply to that subtree like a nested
        ``.gitignore``. Bytes that are not UTF-8 raise UsageError.
        """
        d = _norm_dir(dir_path)
        if isinstance(text, bytes):
            name = f"{d}/{IGNORE_FILE}" if d else IGNORE_FILE
            text = _decode(text, f"{name!r} in the share")
        raw_dir = _raw(d)
        self._nested.setdefault(raw_dir, []).extend(_clean_lines(_split_lines(text)))
        self._compiled.pop(raw_dir, None)
        self._reset_caches()

    def copy(self) -> IgnoreRules:
        """An independent copy (adding files to it leaves this one unchanged)."""
        new = IgnoreRules.__new__(IgnoreRules)
        new._root = list(self._root)
        new._nested = {d: list(lines) for d, lines in self._nested.items()}
        new._compiled = dict(self._compiled)
        new._root_level = self._root_level
        new._reset_caches()
        return new

    # -- queries ------------------------------------------------------------------------

    def is_ignored(self, path: str, is_dir: bool) -> bool:
        """Whether the share-relative posix ``path`` is ignored, exactly as git decides.

        Deeper ignore files win over shallower ones and later patterns over earlier ones;
        ``!`` re-includes, except below an ignored directory.
        """
        if not self._root and not self._nested:
            return False  # no patterns at all
        p = _raw(path.strip("/"))
        if not p:
            return False
        parent = p.rpartition("/")[0]
        if parent and self._dir_ignored(parent):
            return True
        return self._match(p, parent, is_dir)

    # -- internals ----------------------------------------------------------------------

    def _reset_caches(self) -> None:
        base: list[tuple[int, _Level]] = []
        root_nested = self._level_at("") if "" in self._nested else None
        if root_nested is not None:
            base.append((0, root_nested))
        if self._root_level is not None:
            base.append((0, self._root_level))
        # byte-mapped dir -> levels that apply to its entries, deepest first
        self._levels_cache: dict[str, tuple[tuple[int, _Level], ...]] = {"": tuple(base)}
        self._dir_cache: dict[str, bool] = {}

    def _level_at(self, raw_dir: str) -> _Level | None:
        try:
            return self._compiled[raw_dir]
        except KeyError:
            pass
        lines = self._nested.get(raw_dir)
        level = _compile_level(lines) if lines else None
        self._compiled[raw_dir] = level
        return level

    def _levels(self, raw_dir: str) -> tuple[tuple[int, _Level], ...]:
        cache = self._levels_cache
        found = cache.get(raw_dir)
        if found is not None:
            return found
        chain: list[str] = []
        d = raw_dir
        while d not in cache:
            chain.append(d)
            d = d.rpartition("/")[0]
        levels = cache[d]
        for d in reversed(chain):
            level = self._level_at(d) if d in self._nested else None
            if level is not None:
                levels = ((len(d) + 1, level), *levels)
            cache[d] = levels
        return levels

    def _match(self, p: str, parent: str, is_dir: bool) -> bool:
        for strip, level in self._levels(parent):
            result = level.match(p[strip:] if strip else p, is_dir)
            if result is not None:
                return result
        return False

    def _dir_ignored(self, raw_dir: str) -> bool:
        cache = self._dir_cache
        found = cache.get(raw_dir)
        if found is not None:
            return found
        chain = [raw_dir]
        parent = raw_dir.rpartition("/")[0]
        while parent and parent not in cache:
            chain.append(parent)
            parent = parent.rpartition("/")[0]
        ignored = cache[parent] if parent else False
        for d in reversed(chain):
            if not ignored:
                ignored = self._match(d, d.rpartition("/")[0], True)
            cache[d] = ignored
        return ignored
