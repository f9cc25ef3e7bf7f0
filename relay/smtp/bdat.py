"""
The framing of CHUNKING (RFC 3030): the C{BDAT} command line and its
chunk, raw bytes read by count.

Unlike DATA (L{relay.smtp.data}) a chunk has no end marker, no
dot-stuffing and no line endings to repair: its bytes are the message's
bytes as sent.  L{ChunkReader} takes them off the input, however the reads
split them, and says where the chunk ends; L{ChunkedBody} is what the
chunks of one transaction have in common.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Coroutine

#: The EHLO keyword.
EXTENSION = "CHUNKING"

# RFC 3030 section 2: "BDAT" SP chunk-size [SP end-marker]; chunk-size is
# 1*DIGIT, end-marker "LAST" (case-insensitive, as every SMTP keyword).
# The digits are bounded only by the line length: a size too big to read
# is refused by its value, not its syntax.
_ARGUMENT = re.compile(r"([0-9]+)(?: +(LAST))?", re.I | re.A)

#: The reply to a BDAT line whose size cannot be read: the chunk that
#: follows cannot be told from commands, so the session ends (Postfix's
#: reply; 521 says that the server closes the connection, RFC 7504).
SYNTAX_ERROR_TEXT = "5.5.4 Syntax: BDAT count [LAST]"


def parse_bdat(arg: str) -> tuple[int, bool]:
    """
    The chunk size and whether it is the last chunk, from the argument of
    a C{BDAT} command.

    @raise ValueError: when the argument is not C{count [LAST]}.
    """
    m = _ARGUMENT.fullmatch(arg)
    if m is None:
        raise ValueError(f"not a BDAT argument: {arg!r}")
    return int(m.group(1)), m.group(2) is not None


class ChunkReader:
    """
    Read one chunk of exactly C{size} bytes off the input, passing them to
    C{sink} as they come (memory stays flat: nothing is kept here).

    It has the shape of L{relay.smtp.data.DataReader} (L{feed} returns the
    input past its end), so the session reads both the same way.

    @ivar remaining: the bytes of the chunk not read yet.
    @ivar on_end: what the session runs once the chunk is read (the
        chunk's reply).
    """

    def __init__(
        self,
        size: int,
        sink: Callable[[bytes], object],
        on_end: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self.remaining = size
        self._sink = sink
        self.on_end = on_end

    def feed(self, data: bytes) -> bytes | None:
        """
        Take the chunk's bytes from C{data}.

        @return: C{None} while the chunk goes on, else the bytes after it
            (which belong to the command stream; maybe empty).
        """
        remaining = self.remaining
        if len(data) < remaining:
            self.remaining = remaining - len(data)
            if data:
                self._sink(data)
            return None
        self.remaining = 0
        if remaining:
            # The common case (a read within the chunk) passes the read on
            # whole, without a copy.
            self._sink(data if len(data) == remaining else data[:remaining])
        return data[remaining:]


def discard(data: bytes) -> None:
    """
    The sink of a chunk that is read only to be thrown away.
    """


class ChunkedBody:
    """
    What the BDAT chunks of one mail transaction have in common: whether
    one failed (the later ones are read and thrown away, RFC 3030 section
    2, until C{BDAT LAST} or RSET), the bytes announced so far, and whether
    a bare LF was seen (for C{--reject-bare-lf}; the bytes are stored as
    sent either way).

    @ivar failed: a chunk of this transaction was refused.
    @ivar announced: the sum of the chunk sizes announced so far, stored
        or thrown away.
    @ivar bare_lf_seen: a LF not preceded by CR was stored.
    """

    def __init__(self, failed: bool = False) -> None:
        self.failed = failed
        self.announced = 0
        self.bare_lf_seen = False
        # The last byte stored was a CR: a LF first in the next read ends
        # a CRLF split between reads (or chunks), not a bare LF.
        self._after_cr = False

    def note(self, data: bytes) -> None:
        """
        Watch the stored bytes C{data} for a bare LF.
        """
        if not data or self.bare_lf_seen:
            return
        newlines = data.count(b"\n")
        if newlines and newlines != data.count(b"\r\n"):
            first = data.find(b"\n")
            # Bare unless the only ones uncounted are a first LF after a CR
            # that ended the previous read.
            if not (
                self._after_cr
                and first == 0
                and newlines - 1 == data.count(b"\r\n", 1)
            ):
                self.bare_lf_seen = True
        self._after_cr = data.endswith(b"\r")
