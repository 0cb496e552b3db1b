"""``.leftignore`` matching, checked against ``git check-ignore`` on real trees."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leftssh.errors import UsageError
from leftssh.ignore import IGNORE_FILE, IgnoreRules

GIT = shutil.which("git") or "/usr/bin/git"
pytestmark = pytest.mark.skipif(not os.path.exists(GIT), reason="git is not installed")


# -- helpers ----------------------------------------------------------------------------


def _git_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        LC_ALL="C",
    )
    return env


class GitTree:
    """A git repository whose working tree plays the share tree."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = _git_env(root.parent)
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([GIT, "init", "-q", str(root)], check=True, env=self.env)

    def make(self, paths: list[str]) -> list[tuple[str, bool]]:
        """Create files (and dirs for names ending in "/"); return every entry to query."""
        entries: dict[str, bool] = {}
        for spec in paths:
            is_dir = spec.endswith("/")
            rel = spec.rstrip("/")
            parts = rel.split("/")
            for k in range(1, len(parts)):
                entries["/".join(parts[:k])] = True
            entries[rel] = is_dir
            full = self.root / rel
            if is_dir:
                full.mkdir(parents=True, exist_ok=True)
            else:
                full.parent.mkdir(parents=True, exist_ok=True)
                full.write_bytes(b"x")
        return list(entries.items())

    def write_ignores(self, files: dict[str, str], project: str = "") -> None:
        for d, text in files.items():
            target = self.root / d / ".gitignore"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(text.encode("utf-8"))
        # The project-level file has the lowest precedence: git's info/exclude.
        (self.root / ".git" / "info").mkdir(parents=True, exist_ok=True)
        (self.root / ".git" / "info" / "exclude").write_bytes(project.encode("utf-8"))

    def check_ignore(self, paths: list[str]) -> dict[str, bool]:
        """git's verdict for each path, in one ``git check-ignore`` call."""
        data = b"".join(os.fsencode(p) + b"\0" for p in paths)
        proc = subprocess.run(
            [GIT, "check-ignore", "--no-index", "--stdin", "-z", "-v", "-n"],
            cwd=self.root,
            input=data,
            capture_output=True,
            env=self.env,
        )
        assert proc.returncode in (0, 1), proc.stderr.decode(errors="replace")
        fields = proc.stdout.split(b"\0")[:-1]
        assert len(fields) == 4 * len(paths), (fields, paths)
        result: dict[str, bool] = {}
        for k in range(0, len(fields), 4):
            source, _line, pattern, path = fields[k : k + 4]
            # -v also reports a matching "!pattern": that path is not ignored.
            result[os.fsdecode(path)] = bool(source) and not pattern.startswith(b"!")
        return result


def _rules(files: dict[str, str], project: str = "", as_bytes: bool = False) -> IgnoreRules:
    rules = IgnoreRules(project.split("\n") if project else ())
    for d, text in files.items():
        rules.add_nested(d, text.encode("utf-8") if as_bytes else text)
    return rules


def _compare(tree: GitTree, rules: IgnoreRules, entries: list[tuple[str, bool]]) -> dict:
    git = tree.check_ignore([p for p, _ in entries])
    ours = {p: rules.is_ignored(p, is_dir) for p, is_dir in entries}
    diff = {p: (ours[p], git[p]) for p, _ in entries if ours[p] != git[p]}
    assert not diff, f"(ours, git) differ: {diff}"
    return git


# -- table of cases ---------------------------------------------------------------------


@dataclass
class Case:
    name: str
    ignores: dict[str, str]  # dir in the share ('' = root) -> ignore file text
    paths: list[str]  # files; a trailing "/" makes a directory
    project: str = ""  # the file next to the share directory
    ignored: tuple[str, ...] = ()  # sanity: git must say these are ignored...
    kept: tuple[str, ...] = ()  # ...and these are not


CASES = [
    Case(
        "negation, *.log with !keep.log",
        {"": "*.log\n!keep.log\n"},
        ["a.log", "keep.log", "sub/b.log", "sub/keep.log", "sub/keep.log.txt", "x.txt"],
        ignored=("a.log", "sub/b.log"),
        kept=("keep.log", "sub/keep.log", "x.txt"),
    ),
    Case(
        "dir/ matches directories only",
        {"": "build/\ncache/\n"},
        ["build/out.o", "src/build", "src/cache/x", "lib/build/", "cache"],
        ignored=("build", "build/out.o", "src/cache", "lib/build"),
        kept=("src/build", "cache"),
    ),
    Case(
        "leading **",
        {"": "**/logs\n**/cache/tmp\n"},
        ["logs/1", "a/logs/2", "a/b/logs", "cache/tmp/f", "a/cache/tmp/", "a/cache/other"],
        ignored=("logs", "a/b/logs", "a/cache/tmp"),
        kept=("a/cache/other",),
    ),
    Case(
        "trailing /** ignores the contents, not the directory",
        {"": "docs/**\n!docs/keep/\n"},
        ["docs/a.txt", "docs/keep/f", "docs/keep/g/", "other/docs/x"],
        ignored=("docs/a.txt", "docs/keep/f"),
        kept=("docs", "docs/keep", "other/docs/x"),
    ),
    Case(
        "trailing /**/ matches only directories below",
        {"": "foo/**/\n"},
        ["foo/x", "foo/y/z", "foo/y/w/"],
        ignored=("foo/y", "foo/y/z"),
        kept=("foo", "foo/x"),
    ),
    Case(
        "middle ** and runs of stars",
        {"": "a/**/z\nb/***/q\n"},
        ["a/z", "a/b/z", "a/b/c/z", "c/a/z", "a/zz", "b/q", "b/x/y/q", "b/xq"],
        ignored=("a/z", "a/b/z", "a/b/c/z", "b/q", "b/x/y/q"),
        kept=("c/a/z", "a/zz", "b/xq"),
    ),
    Case(
        "anchored /x and a middle slash are relative to the ignore file",
        {"": "/top\ndoc/frotz\nsrc/*.c\n", "sub": "/x\nfoo/bar\n"},
        [
            "top",
            "a/top",
            "doc/frotz/f",
            "a/doc/frotz",
            "src/m.c",
            "src/deep/m.c",
            "sub/x",
            "sub/y/x",
            "sub/foo/bar",
            "foo/bar",
            "x",
        ],
        ignored=("top", "doc/frotz", "src/m.c", "sub/x", "sub/foo/bar"),
        kept=("a/top", "a/doc/frotz", "src/deep/m.c", "sub/y/x", "foo/bar", "x"),
    ),
    Case(
        "escaped \\# and \\!, comments and blank lines",
        {"": "# a comment\n\n   \n\\#hash\n\\!bang\n#comment\n !x\n"},
        ["#hash", "!bang", "comment", "#comment", "a comment", " !x", "!x", "bang", "hash"],
        ignored=("#hash", "!bang", " !x"),
        kept=("#comment", "comment", "a comment", "!x", "bang", "hash"),
    ),
    Case(
        "trailing spaces: unescaped stripped, escaped kept, tab kept",
        {"": "trail   \nesc\\ \nesc2\\  \ntab\t\nmid dle \n"},
        ["trail", "trail ", "esc", "esc ", "esc2", "esc2 ", "tab", "tab\t", "mid dle", "mid dle "],
        ignored=("trail", "esc ", "esc2 ", "tab\t", "mid dle"),
        kept=("trail ", "esc", "esc2", "tab", "mid dle "),
    ),
    Case(
        "a file inside an ignored directory cannot be re-included",
        {"": "out/\n!out/keep.txt\nout2/*\n!out2/keep.txt\n"},
        ["out/keep.txt", "out/x", "out2/keep.txt", "out2/x"],
        ignored=("out", "out/keep.txt", "out2/x"),
        kept=("out2", "out2/keep.txt"),
    ),
    Case(
        "a nested ignore file overrides the root one",
        {"": "*.txt\nb\n", "sub": "!*.txt\n!b\n", "sub/deeper": "b.txt\n"},
        ["a.txt", "sub/a.txt", "sub/deeper/a.txt", "sub/deeper/b.txt", "sub/b/c.txt", "b/x"],
        ignored=("a.txt", "sub/deeper/b.txt", "b"),
        kept=("sub/a.txt", "sub/deeper/a.txt", "sub/b", "sub/b/c.txt"),
    ),
    Case(
        "a deeper negation does not hide shallower patterns for other names",
        {"": "*.txt\n", "a": "!b\n"},
        ["a/b/c.txt", "a/d.txt", "a/b/e.md"],
        ignored=("a/b/c.txt", "a/d.txt"),
        kept=("a/b", "a/b/e.md"),
    ),
    Case(
        "the project file has the lowest precedence",
        {"": "!keep.bak\n", "sub": "!secret\n"},
        ["a.bak", "keep.bak", "secret", "sub/secret", "x/secret"],
        project="*.bak\nsecret\n",
        ignored=("a.bak", "secret", "x/secret"),
        kept=("keep.bak", "sub/secret"),
    ),
    Case(
        "character classes and ?",
        {"": "[abc].txt\nfile?.md\n[!0-9]x\n[[:digit:]]y\n[[:upper:][:punct:]]z\n[z-a]w\n"},
        [
            "a.txt",
            "d.txt",
            "ab.txt",
            "file1.md",
            "file10.md",
            "ax",
            "1x",
            "5y",
            "qy",
            "Qz",
            "-z",
            "qz",
            "zw",
            "aw",
        ],
        ignored=("a.txt", "file1.md", "ax", "5y", "Qz", "-z", "zw"),
        kept=("d.txt", "ab.txt", "file10.md", "1x", "qy", "qz", "aw"),
    ),
    Case(
        "brackets: escapes, ] first, unterminated, and never matching /",
        {"": "q[\\]]\n[]a]r\nun[closed\nd/x[!a]y\n"},
        ["q]", "]r", "ar", "un[closed", "unclosed", "d/xby", "d/x/y"],
        ignored=("q]", "]r", "ar", "d/xby"),
        kept=("un[closed", "d/x", "d/x/y"),
    ),
    Case(
        "names with spaces and unicode (matched byte-wise, as git does)",
        {"": "my file.txt\ncafé/\n*ñ*\nna?ve\nna??ve\nà\n"},
        [
            "my file.txt",
            "my  file.txt",
            "café/menu",
            "a/café",
            "añb",
            "naïve",
            "naive",
            "nave",
            "à",
        ],
        ignored=("my file.txt", "café", "añb", "naïve", "naive", "à"),
        kept=("my  file.txt", "a/café", "nave"),
    ),
    Case(
        "git's literal-prefix ** and trailing backslash",
        {"": "a/b**/c\nback\\\n"},
        ["a/bc", "a/b/c", "a/bx/y/c", "a/bx/y/d", "back\\", "back"],
        ignored=("a/bc", "a/b/c", "a/bx/y/c"),
        kept=("a/bx", "a/bx/y", "back\\", "back"),
    ),
    Case(
        "ignore everything but directories and *.keep",
        {"": "*\n!*/\n!*.keep\n"},
        ["a", "b.keep", "d/c", "d/e.keep", "d/f/g.keep"],
        ignored=("a", "d/c"),
        kept=("b.keep", "d", "d/e.keep", "d/f", "d/f/g.keep"),
    ),
    Case(
        "/* with a re-included top-level directory, and **",
        {"": "/*\n!/src/\n", "src/gen": "**\n"},
        ["README", "lib/x", "src/main.c", "src/gen/out.c", "src/gen/sub/y"],
        ignored=("README", "lib", "src/gen/out.c", "src/gen/sub"),
        kept=("src", "src/main.c", "src/gen"),
    ),
    Case(
        "CRLF line endings and a BOM",
        {"": "\ufeffa.tmp\r\nb.tmp \r\n!c.tmp\r\n*.tmp\r\n"},
        ["a.tmp", "b.tmp", "c.tmp", "d.tmp"],
        ignored=("a.tmp", "b.tmp", "c.tmp", "d.tmp"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_git(case: Case, tmp_path: Path) -> None:
    tree = GitTree(tmp_path / "share")
    entries = tree.make(case.paths)
    tree.write_ignores(case.ignores, case.project)
    git = _compare(tree, _rules(case.ignores, case.project), entries)
    for path in case.ignored:
        assert git[path], f"{path} should be ignored"
    for path in case.kept:
        assert not git[path], f"{path} should not be ignored"
    # Same answers with the files handed over as bytes, and from a copy.
    _compare(tree, _rules(case.ignores, case.project, as_bytes=True).copy(), entries)


# -- property test against git ----------------------------------------------------------

_SEGMENTS = ["a", "b", "ab", "x.log", "*", "**", "?", "a*", "*b", "[ab]", "[!a]*", "?b"]


def _tree_paths() -> list[str]:
    """Names that are files in one place and directories in another."""
    paths = ["ba", "x.log", "a.b"]
    for d1 in ("a", "b", "ab"):
        paths += [f"{d1}/{f}" for f in ("ab", "ba", "x.log")]
        for d2 in ("a", "b"):
            paths += [f"{d1}/{d2}/{f}" for f in ("a", "b", "ab")]
    return paths


@st.composite
def _pattern(draw: st.DrawFn) -> str:
    segs = draw(st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=3))
    text = "/".join(segs)
    if draw(st.booleans()) and draw(st.booleans()):
        text = "/" + text
    if draw(st.booleans()) and draw(st.booleans()):
        text += "/"
    if draw(st.booleans()) and draw(st.booleans()):
        text = "!" + text
    return text


_FILE_TEXT = st.lists(_pattern(), min_size=0, max_size=4).map(lambda ls: "\n".join(ls) + "\n")


@pytest.fixture(scope="module")
def prop_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[GitTree, list[tuple[str, bool]]]:
    tree = GitTree(tmp_path_factory.mktemp("prop") / "share")
    return tree, tree.make(_tree_paths())


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(root=_FILE_TEXT, nested=_FILE_TEXT, project=_FILE_TEXT)
def test_generated_patterns_match_git(
    prop_tree: tuple[GitTree, list[tuple[str, bool]]], root: str, nested: str, project: str
) -> None:
    tree, entries = prop_tree
    files = {"": root, "a": nested}
    tree.write_ignores(files, project)
    _compare(tree, _rules(files, project), entries)


# -- reading the files ------------------------------------------------------------------


def test_from_project_reads_the_file_next_to_the_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (tmp_path / IGNORE_FILE).write_text("*.tmp\n!keep.tmp\n/top/\n", encoding="utf-8")
    (share / IGNORE_FILE).write_text("never\n", encoding="utf-8")  # not the project file
    for share_dir in (share, Path("share"), Path("share/"), Path("./share/../share")):
        monkeypatch.chdir(tmp_path)
        rules = IgnoreRules.from_project(share_dir)
        assert rules.is_ignored("a.tmp", False)
        assert rules.is_ignored("d/b.tmp", False)
        assert not rules.is_ignored("keep.tmp", False)
        assert rules.is_ignored("top", True)
        assert not rules.is_ignored("d/top", True)
        assert not rules.is_ignored("never", False)


def test_from_project_missing_file_ignores_nothing(tmp_path: Path) -> None:
    rules = IgnoreRules.from_project(tmp_path / "share")
    assert not rules.is_ignored("anything", False)
    assert not rules.is_ignored("a/b", True)


def test_from_project_invalid_utf8_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / IGNORE_FILE).write_bytes(b"ok\n\xff\xfe bad\n")
    with pytest.raises(UsageError) as info:
        IgnoreRules.from_project(tmp_path / "share")
    assert info.value.exit_code == 2
    assert str(tmp_path / IGNORE_FILE) in str(info.value)
    assert "UTF-8" in str(info.value)


def test_from_project_unreadable_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / IGNORE_FILE).mkdir()
    with pytest.raises(UsageError) as info:
        IgnoreRules.from_project(tmp_path / "share")
    assert IGNORE_FILE in str(info.value)


def test_add_nested_invalid_utf8_is_a_usage_error() -> None:
    rules = IgnoreRules()
    with pytest.raises(UsageError) as info:
        rules.add_nested("a/b", b"\xc3(\n")
    assert f"a/b/{IGNORE_FILE}" in str(info.value)


# -- behaviour of the object ------------------------------------------------------------


def test_add_nested_invalidates_cached_answers() -> None:
    rules = IgnoreRules(["*.o"])
    assert not rules.is_ignored("d/x.c", False)
    assert rules.is_ignored("d/y.o", False)
    rules.add_nested("d", "*.c\n!y.o\n")
    assert rules.is_ignored("d/x.c", False)
    assert not rules.is_ignored("d/y.o", False)
    rules.add_nested("", "d/\n")
    assert rules.is_ignored("d", True)
    assert rules.is_ignored("d/y.o", False)


def test_copy_is_independent() -> None:
    rules = IgnoreRules(["a"])
    clone = rules.copy()
    clone.add_nested("", "b\n")
    assert clone.is_ignored("b", False)
    assert not rules.is_ignored("b", False)
    assert rules.is_ignored("a", False) and clone.is_ignored("a", False)


def test_root_and_odd_paths() -> None:
    rules = IgnoreRules(["*"])
    assert not rules.is_ignored("", True)
    assert rules.is_ignored("/a/", True)
    assert rules.is_ignored("bad\udcffname", False)


def test_many_paths_are_fast() -> None:
    rules = IgnoreRules(["*.log", "!keep.log", "build/", "**/cache/**", "/top", "docs/*.md"])
    rules.add_nested("src", "*.o\n!main.o\n")
    paths = [f"src/m{i % 50}/d{i % 7}/file{i}.{('o', 'log', 'c')[i % 3]}" for i in range(100_000)]
    start = time.perf_counter()
    ignored = sum(rules.is_ignored(p, False) for p in paths)
    assert 0 < ignored < len(paths)
    assert time.perf_counter() - start < 5.0
