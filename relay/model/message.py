"""
The message (RFC 5322 header and body) that an envelope carries.

A message received by the server lives in the spool: small ones in memory,
large ones in a temporary spool file, so that memory stays flat whatever
the size.  Plugins read the parsed header fields without touching the body.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import BinaryIO

_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:(.*)$", re.S)

MAX_HEADER_BYTES = 256 * 1024


def parse_header_block(block: bytes) -> tuple[tuple[str, str], ...]:
    """
    Parse the header section (everything before the first empty line) into
    C{(name, value)} pairs, unfolding continuation lines.  Lines that are not
    header fields are skipped: this is for reading, not validating.
    """
    fields: list[list[bytes]] = []
    for line in block.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1] += b" " + line.strip()
            continue
        m = _FIELD.match(line)
        if m is None:
            continue
        fields.append([m.group(1), m.group(2).strip()])
    return tuple(
        (name.decode("ascii", "replace"), value.decode("utf-8", "replace"))
        for name, value in fields
    )


def header_end(data: bytes) -> int:
    """
    Where the header section at the start of C{data} ends, its blank line
    included (CRLF CRLF, else LF LF), or -1 when C{data} does not hold all
    of it yet: for readers that take a message a chunk at a time.
    """
    for blank in (b"\r\n\r\n", b"\n\n"):
        end = data.find(blank)
        if end >= 0:
            return end + len(blank)
    return -1


def header_section(data: bytes) -> bytes:
    """
    The header section of a raw message, bounded by L{MAX_HEADER_BYTES}.
    """
    head = data[:MAX_HEADER_BYTES]
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    return head if end < 0 else head[: end + 2]


@dataclass(frozen=True, eq=False)
class Message:
    """
    A message as received: its parsed header fields, its size, and where
    its bytes are (in memory for small messages, else a file in the spool).

    @ivar headers: C{(name, value)} pairs in order, folded lines joined.
    @ivar size: the size in bytes, CRLF line endings, unstuffed.
    @ivar data: the whole message when it is held in memory.
    @ivar path: the file holding the message when it is not.
    @ivar canonical: every line ends with CRLF and no CR or LF stands
        alone, as relay's server stores what it received with DATA; a
        client then sends the bytes without normalizing their line
        endings (L{relay.smtp.stuffing.DotStuffer}).  C{False}: not known
        (a message a plugin composed, say), and they are normalized.
    @ivar dot_free: besides C{canonical}, no line begins with a dot (the
        server saw no dot-stuffing): the bytes go out under DATA as they
        are, not even searched for dots to stuff.  Only meaningful with
        C{canonical} (normalizing line endings can make new lines).
    """

    headers: tuple[tuple[str, str], ...]
    size: int
    data: bytes | None = None
    path: str | None = field(default=None)
    canonical: bool = False
    dot_free: bool = False

    @classmethod
    def from_bytes(cls, data: bytes) -> Message:
        """
        A message held in memory, e.g. one a plugin composed or rewrote.
        """
        return cls(parse_header_block(header_section(data)), len(data), data=data)

    def header(self, name: str) -> str | None:
        """
        The value of the first header field called C{name}, if any.
        """
        lname = name.lower()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return None

    def header_values(self, name: str) -> list[str]:
        """
        The values of every header field called C{name}, in order.
        """
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def open(self) -> BinaryIO:
        """
        A binary file with the message bytes.  For a message held in a
        file this opens it: blocking disk I/O, not for the reactor thread
        with large messages.
        """
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return open(self.path, "rb")
