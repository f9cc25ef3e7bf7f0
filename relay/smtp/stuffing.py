"""
A streaming encoder for the SMTP DATA phase (RFC 5321 section 4.5.2): the
inverse of L{relay.smtp.data.DataReader}.

Whatever line endings the stored bytes hold, only CRLF reaches the wire:
lone CR and lone LF both become CRLF.  A line that begins with C{.} gets
another C{.} (dot-stuffing), at chunk boundaries and at the very start of
the body too.  It works on whole chunks with C{bytes.replace}: no Python
call per line.
"""

from __future__ import annotations


class DotStuffer:
    """
    Encode a message body chunk by chunk.

    Feed every chunk to L{encode} and write what it returns, then write what
    L{finish} returns: the final line ending if the body lacks one, and the
    end marker C{.CRLF}.
    """

    def __init__(self) -> None:
        # The previous chunk ended with CR: held back until we know whether
        # a LF follows (a CRLF split across two chunks is one line ending).
        self._pending_cr = False
        # The last byte written ended a line (true at the start of the body).
        self._at_line_start = True
        self.size = 0

    def encode(self, chunk: bytes) -> bytes:
        """
        Encode C{chunk}: normalize its line endings and stuff its dots.

        @return: the bytes to write (may be empty).
        """
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        chunk = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and chunk[:1] == b".":
            chunk = b"." + chunk
        self._at_line_start = chunk.endswith(b"\n")
        self.size += len(chunk)
        return chunk

    def finish(self) -> bytes:
        """
        End the body.

        @return: the line ending the body still needs, if any, followed by
            the end-of-data marker C{.CRLF}.
        """
        out = b".\r\n"
        if self._pending_cr or not self._at_line_start:
            out = b"\r\n" + out
        self._pending_cr = False
        self._at_line_start = True
        self.size += len(out)
        return out
