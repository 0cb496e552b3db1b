"""Summarize py-spy raw (collapsed) stack files: where did the samples go?

    python tests/bench/profsum.py PROFILE.txt [...] [--top 30] [--filter SUBSTR]

Prints, for all files together, the functions with the most samples on top of the stack
("self") and the most samples anywhere in the stack ("total"), as percentages of all
samples. ``bench.py --profile DIR`` writes such files.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)' so lines of one function merge."""
    frame = _LINE.sub(")", frame.strip())
    if "(" in frame:
        func, _, where = frame.partition(" (")
        return f"{func} ({Path(where.rstrip(')')).name})"
    return frame


def load(paths: list[Path], needle: str | None) -> tuple[Counter, Counter, int]:
    own: Counter = Counter()
    total: Counter = Counter()
    n = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            if needle and needle not in stack:
                continue
            c = int(count)
            frames = [frame_name(f) for f in stack.split(";") if f]
            if not frames:
                continue
            n += c
            own[frames[-1]] += c
            for f in set(frames):
                total[f] += c
    return own, total, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--filter", help="only stacks containing this text")
    args = p.parse_args()
    own, total, n = load(args.files, args.filter)
    if not n:
        print("no samples")
        return
    print(f"{n} samples")
    print("\nself:")
    for name, c in own.most_common(args.top):
        print(f"  {100 * c / n:5.1f}%  {name}")
    print("\ntotal:")
    for name, c in total.most_common(args.top):
        print(f"  {100 * c / n:5.1f}%  {name}")


if __name__ == "__main__":
    main()
