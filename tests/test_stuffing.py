"""
Tests for L{relay.smtp.stuffing.DotStuffer}, the DATA encoder.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relay.smtp.data import DataReader
from relay.smtp.stuffing import DotStuffer

# Bytes rich in the characters that matter.
_interesting = st.binary() | st.lists(
    st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.\r\n", b"\xff"])
).map(b"".join)


def encode(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.encode(c) for c in chunks) + stuffer.finish()


def normalize(data: bytes) -> bytes:
    """
    C{data} with every line ending made CRLF and a final one added.
    """
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


class DotStufferTests(SynchronousTestCase):
    """
    L{DotStuffer} writes only CRLF line endings and exact dot-stuffing.
    """

    def test_examples(self) -> None:
        """
        Edge cases: leading dot, lone CR and LF, missing final line ending,
        empty body.
        """
        self.assertEqual(encode([b""]), b".\r\n")
        self.assertEqual(encode([]), b".\r\n")
        self.assertEqual(encode([b".x"]), b"..x\r\n.\r\n")
        self.assertEqual(encode([b"a\n.\n"]), b"a\r\n..\r\n.\r\n")
        self.assertEqual(encode([b"a\r.b\rc"]), b"a\r\n..b\r\nc\r\n.\r\n")
        self.assertEqual(encode([b"a\r", b"\n.b"]), b"a\r\n..b\r\n.\r\n")
        self.assertEqual(encode([b"a\r", b"", b"\n", b".", b"b"]), b"a\r\n..b\r\n.\r\n")
        self.assertEqual(encode([b"a\r"]), b"a\r\n.\r\n")
        self.assertEqual(encode([b"a\r\n"]), b"a\r\n.\r\n")
        self.assertEqual(encode([b"\r", b"\r"]), b"\r\n\r\n.\r\n")

    @given(_interesting, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
    def test_chunking_does_not_matter(self, data: bytes, cuts: list[int]) -> None:
        """
        Encoding in any chunking gives the same bytes as encoding at once.
        """
        self.assertEqual(encode(split(data, cuts)), encode([data]))

    @given(_interesting, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
    def test_canonical_body(self, data: bytes, cuts: list[int]) -> None:
        """
        A body known canonical (C{canonical=True}) encodes, in any
        chunking, to the same bytes as one whose line endings are checked.
        """
        body = normalize(data)
        stuffer = DotStuffer(canonical=True)
        out = b"".join(stuffer.encode(c) for c in split(body, cuts)) + stuffer.finish()
        self.assertEqual(out, encode([body]))

    @given(_interesting, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
    def test_dot_free_body(self, data: bytes, cuts: list[int]) -> None:
        """
        A canonical body none of whose lines begins with a dot
        (C{dot_free=True}) encodes, in any chunking, to the same bytes as
        one that is searched for dots; C{dot_free} alone (not canonical)
        changes nothing.
        """
        body = normalize(data)
        lines = body.split(b"\r\n")
        body = b"\r\n".join(line.lstrip(b".") for line in lines)
        for canonical in (True, False):
            stuffer = DotStuffer(canonical=canonical, dot_free=True)
            out = b"".join(stuffer.encode(c) for c in split(body, cuts)) + stuffer.finish()
            self.assertEqual(out, encode([body]))
            self.assertEqual(stuffer.size, len(out))
        if b"\r" in data or b"\n" in data:
            # Not canonical: a dot after a lone CR still gets stuffed.
            stuffer = DotStuffer(dot_free=True)
            self.assertEqual(stuffer.encode(b"a\r.b") + stuffer.finish(), b"a\r\n..b\r\n.\r\n")

    @given(_interesting, st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
    def test_wire_form(self, data: bytes, cuts: list[int]) -> None:
        """
        The output has no bare CR or LF, every line starting with a dot is
        stuffed, it ends with the end marker, and L{DataReader} decodes it
        to the CRLF-normalized input.
        """
        out = encode(split(data, cuts))
        self.assertTrue(out.endswith(b".\r\n"))
        self.assertTrue(out == b".\r\n" or out.endswith(b"\r\n.\r\n"))
        self.assertIsNone(re.search(rb"\r(?!\n)|(?<!\r)\n", out))
        body = out[: -len(b".\r\n")]
        self.assertEqual(body.count(b"\r\n.\r\n"), 0)
        for line in body.split(b"\r\n"):
            if line.startswith(b"."):
                self.assertTrue(line.startswith(b".."), line)
        decoded: list[bytes] = []
        reader = DataReader(decoded.append)
        self.assertEqual(reader.feed(out), b"")
        self.assertTrue(reader.done)
        self.assertEqual(b"".join(decoded), normalize(data))
