"""
Pieces of SMTP transcripts that many tests share: the EHLO reply of
relay's server with its default settings, spelled out here once
(C{tests/test_server.py}'s EHLO tests check the server against it), so
that a new extension is one line to change, not every transcript.
"""

from __future__ import annotations

#: The extensions relay's server offers by default, in its order.
EXTENSIONS = ("PIPELINING", "SIZE", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING")


def ehlo_reply(*more: str, hostname: str = "localhost") -> str:
    """
    The EHLO reply as script lines (C{< 250-...}, the last C{< 250 ...}),
    each ending with a newline: the default extensions, then C{more}.
    """
    names = [hostname, *EXTENSIONS, *more]
    lines = [f"< 250-{name}" for name in names[:-1]] + [f"< 250 {names[-1]}"]
    return "".join(line + "\n" for line in lines)
