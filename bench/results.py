"""
bench/RESULTS.md as several writers' parts: C{bench/run.py} writes the
file's head (the peer benchmark), C{bench/bench_queue.py} its own section,
and neither may destroy the other's figures.

A section is a block between two HTML comments that Markdown does not
show::

    <!-- section queue: begin (written by bench/bench_queue.py) -->
    ...
    <!-- section queue: end -->

A writer of a section replaces only its block (or appends it); the writer
of the head keeps every block it finds in the old file after the head it
writes.  Markers rather than a second file: the issue wants the figures
in RESULTS.md, and a link from RESULTS.md to another file would itself be
something C{run.py} had to preserve.
"""

from __future__ import annotations

import os
import re

_BLOCK = re.compile(
    r"^<!-- section (?P<name>[\w-]+): begin[^\n]*-->\n.*?^<!-- section (?P=name): end -->\n?",
    re.S | re.M,
)


def block(name: str, body: str, writer: str) -> str:
    """
    C{body} as the section C{name}, with its markers.
    """
    return (
        f"<!-- section {name}: begin (written by {writer}; do not edit by hand) -->\n"
        f"{body.rstrip()}\n"
        f"<!-- section {name}: end -->\n"
    )


def sections(text: str) -> dict[str, str]:
    """
    The sections in C{text}: name to the whole block, markers included.
    """
    return {m.group("name"): m.group(0) for m in _BLOCK.finditer(text)}


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def write_section(path: str, name: str, body: str, writer: str, title: str) -> None:
    """
    Replace the section C{name} of the file at C{path} with C{body}, or
    append it; a missing file is made with the heading C{title}.
    """
    text = _read(path)
    new = block(name, body, writer)
    old = sections(text).get(name)
    if old is not None:
        text = text.replace(old, new, 1)
    else:
        if not text:
            text = f"# {title}\n"
        text = text.rstrip("\n") + "\n\n" + new
    _write(path, text)


def write_head(path: str, head: str) -> None:
    """
    Write C{head} as the file's text, followed by the sections the file
    held before (other writers' parts).
    """
    kept = [b for name, b in sections(_read(path)).items() if name not in sections(head)]
    text = head.rstrip("\n") + "\n"
    for b in kept:
        text += "\n" + b
    _write(path, text)


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
