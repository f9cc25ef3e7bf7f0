"""
Is one directory of a million files slow on this file system?  The
question of issue 12's scope 3 (Postfix's C{hash_queue_depth}): the spool
keeps every active entry's metadata in C{active/} and every message in
C{messages/}, one flat directory each.

    .venv/bin/python bench/dir_hashing.py                  # 1,000,000 files
    .venv/bin/python bench/dir_hashing.py --files 100000 --tmpdir /var/tmp

For each layout, in a fresh directory on the file system under C{--tmpdir}:
C{flat} (every file in one directory, as the spool has it) and C{hashed}
(two levels of 16 directories named by the first two characters of the
name, 256 leaves, as Postfix with C{hash_queue_depth = 2}), the script
creates the files (names like the spool's ids; empty by default, as the
question is the directory's cost: a file's data blocks cost the same in
either layout, and freeing them on a C{discard} mount dominates an unlink
otherwise), then times, at that size: C{stat} of random names,
C{open} and C{read} of random files, C{create} of new files, C{rename}
of a file from a side directory into the queue (the spool's update:
C{tmp/} to C{active/}), C{unlink} of random files, and the whole listing
(names only, then names and C{stat} of each: what a scan of the due
times reads).  The same operations in a directory of 1,000 files are the
baseline.  Page cache warm (the files were just written): a cold cache
would cost both layouts the same reads of inodes, and the flat layout
fewer directory blocks.

Prints a Markdown table (microseconds per operation, seconds per
listing); the decision and the figures go in bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
CONTENT = b""
SAMPLE = 20_000


def names(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(16)) + f"-{i % 3}.json" for i in range(n)]


class Layout:
    def __init__(self, root: str, hashed: bool) -> None:
        self.root = root
        self.hashed = hashed
        os.makedirs(root)
        if hashed:
            for a in "0123456789abcdef":
                for b in "0123456789abcdef":
                    os.makedirs(os.path.join(root, a, b))

    def path(self, name: str) -> str:
        if not self.hashed:
            return os.path.join(self.root, name)
        # spool ids are base32 (not hex): hash them into 16 x 16 leaves
        h = hash(name) & 0xFF
        return os.path.join(self.root, "0123456789abcdef"[h >> 4], "0123456789abcdef"[h & 15], name)

    def listing(self, with_stat: bool) -> int:
        n = 0
        dirs = (
            [os.path.join(self.root, a, b) for a in "0123456789abcdef" for b in "0123456789abcdef"]
            if self.hashed
            else [self.root]
        )
        for d in dirs:
            with os.scandir(d) as it:
                for e in it:
                    if with_stat:
                        e.stat()
                    n += 1
        return n


def create(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if CONTENT:
        os.write(fd, CONTENT)
    os.close(fd)


def read(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.read(fd, 4096)
    os.close(fd)


def per_op(f: Callable[[str], object], paths: list[str]) -> float:
    start = time.perf_counter()
    for p in paths:
        f(p)
    return (time.perf_counter() - start) / len(paths) * 1e6


def measure(base: str, n: int, hashed: bool, seed: int) -> dict[str, float]:
    layout = Layout(os.path.join(base, f"{'hashed' if hashed else 'flat'}-{n}"), hashed)
    side = os.path.join(base, f"tmp-{hashed}-{n}")
    os.makedirs(side)
    all_names = names(n, seed)
    r: dict[str, float] = {}
    start = time.perf_counter()
    for name in all_names:
        create(layout.path(name))
    r["fill: create, µs per file"] = (time.perf_counter() - start) / n * 1e6
    rng = random.Random(seed + 1)
    sample = [layout.path(x) for x in rng.sample(all_names, min(SAMPLE, n))]
    r["stat, µs"] = per_op(os.stat, sample)
    rng.shuffle(sample)
    r["open+read, µs"] = per_op(read, sample)
    fresh = names(min(SAMPLE, n), seed + 2)
    r["create, µs"] = per_op(create, [layout.path("n" + x) for x in fresh])
    for x in fresh:
        create(os.path.join(side, x))
    start = time.perf_counter()
    for x in fresh:
        os.rename(os.path.join(side, x), layout.path("r" + x))
    r["rename into it, µs"] = (time.perf_counter() - start) / len(fresh) * 1e6
    r["unlink, µs"] = per_op(os.unlink, sample)
    start = time.perf_counter()
    listed = layout.listing(with_stat=False)
    r["list names, s"] = time.perf_counter() - start
    start = time.perf_counter()
    layout.listing(with_stat=True)
    r["list names + stat, s"] = time.perf_counter() - start
    r["files listed"] = listed
    start = time.perf_counter()
    shutil.rmtree(layout.root)
    shutil.rmtree(side)
    r["remove all, s"] = time.perf_counter() - start
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--baseline", type=int, default=1000)
    parser.add_argument("--size", type=int, default=0, help="bytes per file (default 0)")
    parser.add_argument("--tmpdir")
    args = parser.parse_args()
    global CONTENT
    CONTENT = b"x" * args.size
    base = tempfile.mkdtemp(prefix="relay-dir-hashing-", dir=args.tmpdir)
    results: dict[str, dict[str, float]] = {}
    try:
        for label, n, hashed in (
            (f"flat, {args.baseline:,}", args.baseline, False),
            (f"flat, {args.files:,}", args.files, False),
            (f"hashed 16x16, {args.files:,}", args.files, True),
        ):
            print(f"{label} ...", file=sys.stderr, flush=True)
            results[label] = measure(base, n, hashed, seed=len(results))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    labels = list(results)
    rows = list(results[labels[0]])
    print("| operation | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for row in rows:
        cells = []
        for label in labels:
            v = results[label][row]
            cells.append(f"{v:,.0f}" if row == "files listed" else f"{v:,.2f}")
        print(f"| {row} | " + " | ".join(cells) + " |")
    print(f"\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
