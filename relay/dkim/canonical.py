"""
A message as DKIM reads it, in chunks: its line endings made what the
wire will carry (L{relay.smtp.stuffing.CRLFLines}), its header section kept for signing and
its body hashed in relaxed canonical form (RFC 6376 section 3.4.4) as it
goes (L{SigningInput}), so that a message of any size is hashed with the
memory of one chunk.

dkimpy canonicalises a body it holds whole; here its two substitutions
(trailing whitespace, whitespace runs) are applied to whole lines of each
chunk, and the rule that needs the end of the body (empty lines at the end
are ignored) is kept as a count of the empty lines not yet hashed.  The
property test in C{tests/test_dkim.py} checks that any cut of any body
gives dkimpy's digest.
"""

from __future__ import annotations

import hashlib
from typing import Any

from dkim.canonicalization import compress_whitespace, strip_trailing_whitespace

from relay.model.message import MAX_HEADER_BYTES

CRLF = b"\r\n"
#: An unfinished line longer than this is hashed up to its last
#: non-blank byte, so that a body without line ends costs no more memory.
MAX_PENDING_LINE = 64 * 1024


class RelaxedBodyHash:
    """
    The SHA-256 of a body in relaxed canonical form, fed in chunks of
    CRLF-only text (L{relay.smtp.stuffing.CRLFLines}' output).
    """

    def __init__(self) -> None:
        self._hash: Any = hashlib.sha256()
        # The line not ended yet, raw (past MAX_PENDING_LINE, what is left
        # of it after its start was hashed).
        self._line = b""
        # The start of the unfinished line is hashed already.
        self._line_started = False
        # Empty lines seen and not hashed: dropped if the body ends here.
        self._empty_lines = 0

    def update(self, data: bytes) -> None:
        data = self._line + data
        end = data.rfind(CRLF)
        if end < 0:
            self._line = data
            if len(data) > MAX_PENDING_LINE:
                self._hash_start_of_line()
            return
        self._line = data[end + 2 :]
        lines = data[: end + 2]
        if b"\t" in lines or b"  " in lines or b" \r\n" in lines:
            # (Most text has neither tabs nor runs of spaces nor blanks at
            # line ends: then the substitutions change nothing.)
            lines = compress_whitespace(strip_trailing_whitespace(lines))
        if self._line_started:
            # The end of a line whose start is hashed: never an empty line.
            first = lines.find(CRLF) + 2
            self._emit(lines[:first])
            lines = lines[first:]
            self._line_started = False
        text = lines.rstrip(CRLF)
        if not text:
            # Only empty lines (the relaxed form of a blank line is CRLF).
            self._empty_lines += len(lines) // 2
            return
        self._emit(text + CRLF)
        self._empty_lines = (len(lines) - len(text)) // 2 - 1

    def _emit(self, text: bytes) -> None:
        if self._empty_lines:
            self._hash.update(CRLF * self._empty_lines)
            self._empty_lines = 0
        self._hash.update(text)

    def _hash_start_of_line(self) -> None:
        """
        Hash a long unfinished line up to its last non-blank byte: what
        follows may be whitespace that the line's end removes.
        """
        line = self._line
        # A final CR may be the start of the line's CRLF.
        cr = b"\r" if line.endswith(b"\r") else b""
        line = line[: len(line) - len(cr)]
        blank = len(line) - len(line.rstrip(b" \t"))
        head, tail = line[: len(line) - blank], line[len(line) - blank :]
        # A run of whitespace is one space, whatever its length: one byte
        # of it stands for the rest.
        self._line = tail[:1] + cr
        if head:
            self._emit(compress_whitespace(head))
            self._line_started = True

    def digest(self) -> bytes:
        """
        The body hash (the C{bh=} tag, before base64), once the body ended.
        """
        if self._line or self._line_started:
            # A last line without its CRLF (the signer ends every message
            # with one; this keeps the class whole): as dkimpy reads RFC
            # 6376 section 3.4.4, its whitespace is compressed, not
            # removed, and the CRLF added.
            self._emit(compress_whitespace(self._line) + CRLF)
            self._line = b""
            self._line_started = False
        return bytes(self._hash.digest())


class HeaderSectionTooLarge(ValueError):
    """
    The header section is longer than L{MAX_HEADER_BYTES}: it is not signed.
    """


class SigningInput:
    """
    A whole message fed in chunks of CRLF-only text: its header section
    (the fields, each with its CRLF, without the empty line) is kept, its
    body hashed (L{RelaxedBodyHash}).

    @ivar max_header_bytes: the longest header section kept.
    """

    def __init__(self, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self.max_header_bytes = max_header_bytes
        self._head = b""
        self._in_body = False
        self.body = RelaxedBodyHash()

    def update(self, data: bytes) -> None:
        """
        @raise HeaderSectionTooLarge: when no empty line ends the header
            section within L{max_header_bytes}.
        """
        if self._in_body:
            self.body.update(data)
            return
        head = self._head + data
        if head.startswith(CRLF):
            # No header fields at all: the body begins after this line.
            end = 0
        else:
            end = head.find(b"\r\n\r\n")
            if end >= 0:
                end += 2
        if end < 0:
            if len(head) > self.max_header_bytes:
                raise HeaderSectionTooLarge(
                    f"header section over {self.max_header_bytes} bytes: not signed"
                )
            self._head = head
            return
        self._head = head[:end]
        self._in_body = True
        self.body.update(head[end + 2 :])

    def finish(self) -> tuple[bytes, bytes]:
        """
        The message ended.

        @return: the header section and the body hash.
        """
        # Without an empty line, a message of header fields only: its
        # body is empty.
        self._in_body = True
        return self._head, self.body.digest()
