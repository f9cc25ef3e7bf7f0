"""
Tests for L{relay.smtp.data.DataReader}.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relay.smtp.data import MAX_CARRY, DataReader, _has_long_line


def decode(data: bytes, reject_bare_lf: bool = False) -> tuple[bytes, bytes | None, DataReader]:
    out: list[bytes] = []
    reader = DataReader(out.append, reject_bare_lf=reject_bare_lf)
    leftover = reader.feed(data)
    return b"".join(out), leftover, reader


def decode_chunks(chunks: list[bytes]) -> tuple[bytes, bytes | None]:
    out: list[bytes] = []
    reader = DataReader(out.append)
    leftover = None
    rest = []
    for chunk in chunks:
        if leftover is not None:
            rest.append(chunk)
            continue
        leftover = reader.feed(chunk)
    if leftover is not None:
        leftover = leftover + b"".join(rest)
    return b"".join(out), leftover


def stuff(body: bytes) -> bytes:
    """
    Dot-stuff a CRLF body and add the end marker.
    """
    if body.startswith(b"."):
        body = b"." + body
    body = body.replace(b"\r\n.", b"\r\n..")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
]


class DataReaderTests(SynchronousTestCase):
    def test_simple(self) -> None:
        """
        A body ends at CRLF . CRLF and the end marker is not part of it.
        """
        body, leftover, reader = decode(b"Subject: x\r\n\r\nhello\r\n.\r\n")
        self.assertEqual(body, b"Subject: x\r\n\r\nhello\r\n")
        self.assertEqual(leftover, b"")
        self.assertEqual(reader.size, len(body))
        self.assertTrue(reader.done)

    def test_empty_message(self) -> None:
        """
        The start of data counts as following a CRLF: ".\\r\\n" at once ends it.
        """
        body, leftover, _ = decode(b".\r\nQUIT\r\n")
        self.assertEqual(body, b"")
        self.assertEqual(leftover, b"QUIT\r\n")

    def test_leftover(self) -> None:
        """
        Bytes after the end marker are returned for the command parser.
        """
        body, leftover, _ = decode(b"a\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT")
        self.assertEqual(body, b"a\r\n")
        self.assertEqual(leftover, b"MAIL FROM:<a@b.c>\r\nRCPT")

    def test_continues(self) -> None:
        """
        C{feed} returns C{None} while the message goes on.
        """
        reader = DataReader(lambda b: None)
        self.assertIsNone(reader.feed(b"abc\r\n"))
        self.assertIsNone(reader.feed(b"def"))
        self.assertEqual(reader.feed(b"\r\n.\r\nX"), b"X")

    def test_smuggling_sequences(self) -> None:
        """
        None of the sequences that some servers take as the end of data ends
        it here; only the real CRLF . CRLF that follows does.
        """
        for seq in SMUGGLING:
            data = b"a" + seq + b"MAIL FROM:<evil@x.y>\r\n\r\n.\r\nNEXT"
            for reject in (False, True):
                body, leftover, _ = decode(data, reject_bare_lf=reject)
                self.assertEqual(leftover, b"NEXT", seq)
                self.assertIn(b"MAIL FROM:<evil@x.y>", body, seq)

    def test_smuggling_at_start(self) -> None:
        """
        The smuggling sequences right at the start of data don't end it.
        """
        for seq in SMUGGLING:
            body, leftover, _ = decode(seq + b"x\r\n.\r\nNEXT")
            self.assertEqual(leftover, b"NEXT", seq)

    def test_bare_lf_normalized(self) -> None:
        """
        A bare LF becomes CRLF and is noted.
        """
        body, _, reader = decode(b"a\nb\r\nc\n.\r\n\r\n.\r\n")
        self.assertEqual(body, b"a\r\nb\r\nc\r\n\r\n\r\n")
        self.assertTrue(reader.bare_lf_seen)

    def test_bare_lf_rejected(self) -> None:
        """
        With C{reject_bare_lf} a bare LF is noted for the server to refuse.
        """
        _, leftover, reader = decode(b"a\nb\r\n.\r\n", reject_bare_lf=True)
        self.assertEqual(leftover, b"")
        self.assertTrue(reader.bare_lf_seen)

    def test_no_bare_lf(self) -> None:
        """
        CRLF-only data is not flagged.
        """
        _, _, reader = decode(b"a\r\nb\r\n.\r\n")
        self.assertFalse(reader.bare_lf_seen)

    def test_lone_cr(self) -> None:
        """
        A lone CR does not end a line and is kept.
        """
        body, _, _ = decode(b"a\rb\r.c\r\n.\r\n")
        self.assertEqual(body, b"a\rb\r.c\r\n")

    def test_unstuff_start(self) -> None:
        """
        A dot at the very start of data is unstuffed.
        """
        body, _, _ = decode(b"..x\r\n.\r\n")
        self.assertEqual(body, b".x\r\n")

    def test_unstuff_lines(self) -> None:
        """
        The first dot of every line that starts with a dot goes.
        """
        body, _, _ = decode(b"a\r\n..\r\n...b\r\n.c\r\n.\r\n")
        self.assertEqual(body, b"a\r\n.\r\n..b\r\nc\r\n")

    def test_unstuff_chunk_boundary(self) -> None:
        """
        A line start that falls at a chunk boundary is unstuffed once.
        """
        body, leftover = decode_chunks([b"a\r\n", b"..b\r\n", b".", b".c\r\n.", b"\r\n"])
        self.assertEqual(body, b"a\r\n.b\r\n.c\r\n")
        self.assertEqual(leftover, b"")

    def test_every_split(self) -> None:
        """
        Splitting the input anywhere in two, or feeding it byte by byte,
        decodes the same as feeding it at once.
        """
        data = (
            b"..start\r\nx\ny\r\n.\n\r\n..\r\n\r.\r\n\r\n\x00.\r\na\r\r\n.\r\nMAIL FROM:<a@b.c>\r\n"
        )
        expected = decode(data)[:2]
        for i in range(len(data) + 1):
            self.assertEqual(decode_chunks([data[:i], data[i:]]), expected, i)
        self.assertEqual(decode_chunks([bytes([b]) for b in data]), expected)
        for i in range(len(data)):
            for j in range(i, len(data) + 1):
                self.assertEqual(decode_chunks([data[:i], data[i:j], data[j:]]), expected)

    def test_long_line_flagged(self) -> None:
        """
        A line over 998 bytes is accepted and flagged.
        """
        body, leftover, reader = decode(b"x" * 999 + b"\r\n.\r\n")
        self.assertEqual(len(body), 1001)
        self.assertTrue(reader.max_line_length_exceeded)
        _, _, reader = decode(b"x" * 998 + b"\r\n.\r\n")
        self.assertFalse(reader.max_line_length_exceeded)

    def test_huge_line_bounded(self) -> None:
        """
        A 10 MB line with no line ending keeps memory bounded and still
        decodes exactly.
        """
        out: list[bytes] = []
        reader = DataReader(out.append)
        chunk = b"." + b"y" * 65535
        for _ in range(160):
            self.assertIsNone(reader.feed(chunk))
            self.assertLessEqual(len(reader._carry), 64 * 1024 + len(chunk))
        leftover = reader.feed(b"\r\n.\r\nQUIT\r\n")
        self.assertEqual(leftover, b"QUIT\r\n")
        body = b"".join(out)
        self.assertEqual(body, b"y" * 65535 + chunk * 159 + b"\r\n")
        self.assertTrue(reader.max_line_length_exceeded)
        self.assertEqual(reader.size, len(body))

    def test_flush_keeps_cr(self) -> None:
        """
        When a long line is flushed, a CR at its end can still pair with
        the LF of the next chunk to end the line before the end marker.
        """
        out: list[bytes] = []
        reader = DataReader(out.append)
        self.assertIsNone(reader.feed(b"z" * 70000 + b"\r"))
        self.assertEqual(reader.feed(b"\n.\r\n"), b"")
        self.assertEqual(b"".join(out), b"z" * 70000 + b"\r\n")

    def test_after_done(self) -> None:
        """
        Feeding after the end returns the bytes unchanged.
        """
        reader = DataReader(lambda b: None)
        reader.feed(b".\r\n")
        self.assertEqual(reader.feed(b"abc"), b"abc")

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from([b".", b"..", b"a", b"\r\n", b"\r", b"x.", b" ", b"\x00"]),
            max_size=40,
        ),
        st.integers(min_value=1, max_value=7),
    )
    def test_stuff_roundtrip(self, parts: list[bytes], step: int) -> None:
        """
        Dot-stuffing any CRLF body and decoding it gives the body back,
        whatever the chunking.
        """
        body = b"".join(parts)
        if body.endswith(b"\r"):
            body += b"\n"
        if body and not body.endswith(b"\r\n"):
            body += b"\r\n"
        wire = stuff(body) + b"TAIL"
        self.assertEqual(decode(wire)[:2], (body, b"TAIL"))
        chunks = [wire[i : i + step] for i in range(0, len(wire), step)]
        self.assertEqual(decode_chunks(chunks), (body, b"TAIL"))


# Bodies made of the pieces that line endings and dot-stuffing turn on.
_BODY_PARTS = st.lists(
    st.sampled_from([b".", b"a", b"\r\n", b"\r", b"\n", b"\r\n.\r"]), max_size=40
)


def check_flag(test: SynchronousTestCase, name: str, cases: list[tuple[bytes, bool]]) -> None:
    """
    Each wire form in C{cases} decodes completely and leaves the reader's
    flag C{name} as given.
    """
    for wire, expected in cases:
        _, _, reader = decode(wire)
        test.assertTrue(reader.done, wire)
        test.assertEqual(getattr(reader, name), expected, wire)


class CanonicalTests(SynchronousTestCase):
    """
    L{DataReader.lone_cr_seen}: without it the decoded bytes are canonical
    (every CR and LF part of a CRLF), which lets delivery skip its
    normalization.
    """

    def test_examples(self) -> None:
        check_flag(
            self,
            "lone_cr_seen",
            [
                (b"a\r\nb\r\n.\r\n", False),
                (b"a\nb\r\n.\r\n", False),
                (b"a\rb\r\n.\r\n", True),
                (b"a\r\r\n.\r\n", True),
                (b".\r\n", False),
            ],
        )

    def test_line_in_pieces(self) -> None:
        """
        A line too long to hold goes in pieces: not known canonical.
        """
        reader = DataReader(lambda data: None)
        reader.feed(b"x" * (MAX_CARRY + 10))
        self.assertTrue(reader.lone_cr_seen)

    @settings(max_examples=300, deadline=None)
    @given(_BODY_PARTS, st.integers(min_value=1, max_value=7))
    def test_canonical_when_no_lone_cr(self, parts: list[bytes], step: int) -> None:
        wire = b"".join(parts) + b"\r\n.\r\n"
        out: list[bytes] = []
        reader = DataReader(out.append)
        for i in range(0, len(wire), step):
            if reader.feed(wire[i : i + step]) is not None:
                break
        self.assertTrue(reader.done)
        body = b"".join(out)
        pairs = body.count(b"\r\n")
        canonical = pairs == body.count(b"\r") == body.count(b"\n")
        if not reader.lone_cr_seen:
            self.assertTrue(canonical, body)


class DotSeenTests(SynchronousTestCase):
    """
    L{DataReader.dot_seen}: a line of the message began with a dot.
    """

    def test_examples(self) -> None:
        check_flag(
            self,
            "dot_seen",
            [
                (b"a\r\nb\r\n.\r\n", False),
                (b"..a\r\nb\r\n.\r\n", True),
                (b"a\r\n..\r\n.\r\n", True),
                (b"a.b\r\n.\r\n", False),
                (b".\r\n", False),
                (b"a\n.b\r\n.\r\n", True),
            ],
        )

    @settings(max_examples=300, deadline=None)
    @given(_BODY_PARTS, st.integers(min_value=1, max_value=7))
    def test_dot_free_needs_no_stuffing(self, parts: list[bytes], step: int) -> None:
        """
        In any chunking: without C{dot_seen}, no line of the decoded body
        begins with a dot; and the end marker is found where it is.
        """
        wire = b"".join(parts) + b"\r\n.\r\nTAIL"
        out: list[bytes] = []
        reader = DataReader(out.append)
        rest = None
        for i in range(0, len(wire), step):
            rest = reader.feed(wire[i : i + step])
            if rest is not None:
                rest += wire[i + step :]
                break
        self.assertTrue(reader.done)
        self.assertEqual(decode(wire)[:2], (b"".join(out), rest))
        body = b"".join(out)
        if not reader.dot_seen and not reader.lone_cr_seen:
            self.assertFalse(any(line.startswith(b".") for line in body.split(b"\r\n")), body)


class LongLineTests(SynchronousTestCase):
    """
    L{_has_long_line} agrees with the definition: some run of bytes
    without CR or LF is longer than the limit.
    """

    @settings(max_examples=300)
    @given(
        st.lists(st.sampled_from([b"a", b"bb", b"\r", b"\n", b"\r\n", b"xxxxx"]), max_size=80).map(
            b"".join
        ),
        st.integers(0, 12),
    )
    def test_agrees_with_definition(self, block: bytes, limit: int) -> None:
        longest = max(map(len, re.split(rb"[\r\n]", block)))
        self.assertEqual(_has_long_line(block, limit), longest > limit)

    def test_message_sized(self) -> None:
        line = b"x" * 998 + b"\r\n"
        self.assertFalse(_has_long_line(line * 1000))
        self.assertTrue(_has_long_line(line * 500 + b"y" * 999 + b"\r\n" + line * 500))
        self.assertTrue(_has_long_line(b"y" * 999))
