"""
Tests for CHUNKING (RFC 3030) in the server: L{relay.smtp.bdat} and BDAT
in L{relay.smtp.transaction}, as SMTP transcripts against
L{SMTPServerProtocol} (the chunks' bytes sent raw, as a client sends
them); and the client's chunk encoder, L{relay.smtp.stuffing.LineEndings}.
The relay client's transactions are in L{tests.test_client} and
L{tests.test_client_memory}.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from relay.model.reply import Reply
from relay.model.results import Consume, Reject
from relay.smtp.bdat import ChunkedBody, ChunkReader, parse_bdat
from relay.smtp.protocol import Mode
from relay.smtp.stuffing import LineEndings
from relay.testing import ProcessEnvelopeCall, ServerHarness
from tests.test_server import Recorder, ServerTestCase
from tests.test_stuffing import split

EHLO = """
< 220 test.example
> EHLO client.example
< 250-localhost
< 250-PIPELINING
< re:250-SIZE \\d+
< 250-8BITMIME
< 250-DSN
< 250-ENHANCEDSTATUSCODES
< 250-SMTPUTF8
< 250 CHUNKING
"""

ENVELOPE = EHLO + """
> MAIL FROM:<a@example.org>
< 250 2.1.0 Ok
> RCPT TO:<b@example.com>
< 250 2.1.5 Ok
"""

QUEUED = "< re:250 2\\.0\\.0 Ok: queued as \\S+"

#: Bytes that DATA would change (a dot line, dot-stuffing, bare LF and
#: CR, the end marker itself, NUL, 8-bit) and a chunk stores as sent.
AWKWARD = (
    b"Subject: raw\r\n\r\n.\r\n..two\r\n.leading\r\nbare\nlf\rcr\r\n"
    b"\r\n.\r\nMAIL FROM:<evil@x.example>\r\n\x00caf\xc3\xa9"
)


def bdat(data: bytes, last: bool = False) -> bytes:
    """
    One BDAT command with its chunk, as a client sends them.
    """
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def without_received(data: bytes) -> bytes:
    """
    The message as the client sent it: C{data} without the C{Received}
    header the server put first.  That header ends with its date (after
    the C{;}): the message itself may begin with a tab, which must not be
    taken for the header's continuation.
    """
    m = _RECEIVED.match(data)
    assert m is not None, data[:200]
    return data[m.end() :]


_RECEIVED = re.compile(
    rb"Received: [^;]*;\s*[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n"
)


class ChunkingTestCase(ServerTestCase):
    def envelope(self, **kw: Any) -> ServerHarness:
        """
        A session with a transaction open for one accepted recipient.
        """
        h = self.harness(**kw)
        self.transcript(h, ENVELOPE)
        return h

    def patch_writer(self, h: ServerHarness, **methods: Any) -> None:
        """
        Replace C{methods} of the message writer that the spool of C{h}
        makes next (at the transaction's first chunk).
        """
        spool = h.spool
        receive = spool.receive

        def patched(message_id: str) -> Any:
            spool.receive = receive  # type: ignore[method-assign]
            writer = receive(message_id)
            for name, method in methods.items():
                setattr(writer, name, method)
            return writer

        spool.receive = patched  # type: ignore[method-assign]

    def stored(self, h: ServerHarness) -> list[bytes]:
        """
        What each spooled message holds after our Received header.
        """
        return [without_received(d) for d in self.message_data(h)]


class ParseTests(SynchronousTestCase):
    """
    L{parse_bdat}: RFC 3030's C{chunk-size [SP "LAST"]}.
    """

    def test_sizes_and_last(self) -> None:
        """
        Digits, with or without LAST in any case (after one space or more);
        a size beyond any limit is still a size (refused by its value, not
        its syntax).
        """
        self.assertEqual(parse_bdat("0"), (0, False))
        self.assertEqual(parse_bdat("1024 LAST"), (1024, True))
        self.assertEqual(parse_bdat("7 last"), (7, True))
        self.assertEqual(parse_bdat("7  LAST"), (7, True))
        self.assertEqual(parse_bdat("100000000000000000000"), (10**20, False))

    def test_malformed(self) -> None:
        """
        Anything else is a ValueError: no size, a sign, an exponent, other
        digits than ASCII, another word, more words.
        """
        for arg in ["", "x", "-1", "+1", "1e3", "１２", "5 NOW", "5 LAST x", "LAST", "5LAST"]:
            self.assertRaises(ValueError, parse_bdat, arg)


class ChunkReaderTests(SynchronousTestCase):
    """
    L{ChunkReader} takes exactly its size off the input.
    """

    def test_exact_count_across_reads(self) -> None:
        """
        However the input is split, the sink gets the chunk's bytes and
        nothing more, and what follows comes back once.
        """
        got: list[bytes] = []

        async def end() -> None:
            pass

        reader = ChunkReader(10, got.append, end)
        self.assertIsNone(reader.feed(b"0123"))
        self.assertIsNone(reader.feed(b""))
        self.assertEqual(reader.remaining, 6)
        self.assertEqual(reader.feed(b"456789NOOP\r\n"), b"NOOP\r\n")
        self.assertEqual(b"".join(got), b"0123456789")
        self.assertEqual(reader.remaining, 0)

    def test_exact_fit(self) -> None:
        """
        A read that ends with the chunk leaves nothing (not None: the
        chunk is complete).
        """
        got: list[bytes] = []

        async def end() -> None:
            pass

        data = b"abc"
        reader = ChunkReader(3, got.append, end)
        self.assertEqual(reader.feed(data), b"")
        self.assertIs(got[0], data)


class BareLFTests(SynchronousTestCase):
    """
    L{ChunkedBody.note} finds a bare LF wherever the reads are split.
    """

    def seen(self, *reads: bytes) -> bool:
        body = ChunkedBody()
        for read in reads:
            body.note(read)
        return body.bare_lf_seen

    def test_bare_lf(self) -> None:
        """
        CRLF is not bare, split across reads or not; LF alone is, at the
        start of a read that does not follow a CR too.
        """
        self.assertFalse(self.seen(b"a\r\nb\r\n"))
        self.assertFalse(self.seen(b"a\r", b"\nb\r\n", b"c\r", b"\n"))
        self.assertTrue(self.seen(b"a\nb"))
        self.assertTrue(self.seen(b"a\r\n", b"\nb"))
        self.assertTrue(self.seen(b"a\r", b"\n\n"))
        self.assertTrue(self.seen(b"a\r", b"\nb\n"))
        self.assertFalse(self.seen(b"lone\rcr"))


_TEXT = st.lists(
    st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\r", b"\n\n"])
).map(b"".join)


class LineEndingsTests(SynchronousTestCase):
    """
    L{LineEndings}, the client's encoder of BDAT chunks.
    """

    # A loaded machine must not fail it: only the examples' outcome counts.
    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_TEXT | st.binary(max_size=200), st.lists(st.integers(0, 300), max_size=6))
    def test_canonical_whatever_the_chunking(self, body: bytes, cuts: list[int]) -> None:
        """
        Any body in any chunking comes out with every lone CR and LF made
        CRLF and nothing else changed (no dot is stuffed, no final line
        ending added).
        """
        encoder = LineEndings()
        out = b"".join(encoder.encode(chunk) for chunk in split(body, cuts)) + encoder.finish()
        self.assertEqual(
            out, body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        )

    def test_canonical_chunks_not_copied(self) -> None:
        """
        A canonical chunk is returned as it is (the same object), also the
        halves of a CRLF split between chunks: no copy for a message the
        server took with DATA.
        """
        encoder = LineEndings()
        chunks = [b"Subject: x\r\n\r\n.\r\nline\r", b"\nmore\r\n", b"end"]
        for chunk in chunks:
            self.assertIs(encoder.encode(chunk), chunk)
        self.assertEqual(encoder.finish(), b"")


class AdvertisedTests(ChunkingTestCase):
    def test_ehlo_offers_chunking(self) -> None:
        """
        EHLO offers CHUNKING (and not BINARYMIME); the session records it.
        """
        h = self.harness()
        self.transcript(h, EHLO)
        self.assertIn("CHUNKING", h.protocol.session.advertised_extensions)
        self.assertNotIn("BINARYMIME", h.protocol.session.advertised_extensions)

    def test_binarymime_refused(self) -> None:
        """
        BODY=BINARYMIME stays unsupported (as in Postfix): 555 at MAIL.
        """
        h = self.harness()
        self.transcript(
            h,
            EHLO + "> MAIL FROM:<a@example.org> BODY=BINARYMIME\n< 555 5.5.4 BODY must be",
        )

    def test_without_chunking(self) -> None:
        """
        A server made with chunking=False does not offer it, and BDAT is an
        unknown command there (as for a server that predates it).
        """
        h = self.harness(chunking=False)
        self.transcript(
            h,
            EHLO.replace("< 250-SMTPUTF8\n< 250 CHUNKING", "< 250 SMTPUTF8")
            + "> BDAT 0 LAST\n< 500 5.5.2 Command unrecognized",
        )


class ChunkTests(ChunkingTestCase):
    def test_one_last_chunk(self) -> None:
        """
        BDAT n LAST with the whole message: the reply is DATA's end's, the
        plugin sees the message, and our Received header comes first.
        """
        h = self.envelope()
        message = b"Subject: one\r\n\r\nhello\r\n"
        h.send(bdat(message, last=True))
        self.transcript(h, QUEUED)
        self.assertEqual(self.stored(h), [message])
        [data] = self.message_data(h)
        self.assertRegex(data, rb"^Received: from client\.example \(\[198\.51\.100\.7\]\)\r\n"
                               rb"\tby localhost \(relay\) with ESMTP id ")
        [call] = self.callbacks.calls_to(ProcessEnvelopeCall)
        self.assertEqual(call.envelope.message.header("Subject"), "one")

    def test_several_chunks_pipelined(self) -> None:
        """
        Chunks pipelined in one write: 250 with each chunk's size, then the
        message's reply; the chunks are stored one after the other.
        """
        h = self.envelope()
        h.send(bdat(b"Subject: x\r\n") + bdat(b"\r\nbody ") + bdat(b"end\r\n", last=True))
        self.transcript(h, f"< 250 2.0.0 Ok: 12 bytes\n< 250 2.0.0 Ok: 7 bytes\n{QUEUED}")
        self.assertEqual(self.stored(h), [b"Subject: x\r\n\r\nbody end\r\n"])

    def test_bytes_stored_as_sent(self) -> None:
        """
        A chunk's bytes are the message's: no dot is removed, no line
        ending repaired, the end-of-data marker and command text inside are
        just bytes.
        """
        h = self.envelope()
        h.send(bdat(AWKWARD, last=True))
        self.transcript(h, QUEUED)
        self.assertEqual(self.stored(h), [AWKWARD])
        self.assertEqual(self.callbacks.names().count("process_sender"), 1)

    def test_one_byte_at_a_time(self) -> None:
        """
        The command and its chunk trickling in one byte per read are read
        just the same.
        """
        h = self.envelope()
        wire = bdat(AWKWARD, last=True)
        for i, byte in enumerate(wire):
            self.assertEqual(h.lines(), [])
            h.send(bytes([byte]))
            if i > len(b"BDAT 99 LAST"):
                reading = i + 1 < len(wire)
                self.assertIs(h.protocol.mode, Mode.CHUNK if reading else Mode.COMMAND)
        self.transcript(h, QUEUED)
        self.assertEqual(self.stored(h), [AWKWARD])

    def test_commands_after_chunk(self) -> None:
        """
        Commands pipelined right behind a chunk run as commands.
        """
        h = self.envelope()
        h.send(
            bdat(b"x\r\n", last=True)
            + b"MAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.com>\r\n"
            + bdat(b"y\r\n", last=True)
            + b"QUIT\r\n"
        )
        self.transcript(h, f"{QUEUED}\n< 250 2.1.0\n< 250 2.1.5\n{QUEUED}\n< 221 2.0.0 Bye")
        self.assertEqual(sorted(self.stored(h)), [b"x\r\n", b"y\r\n"])

    def test_empty_last_chunk(self) -> None:
        """
        BDAT 0 LAST ends a message sent in earlier chunks; BDAT 0 (not
        last) is an empty chunk, 250.
        """
        h = self.envelope()
        h.send(bdat(b"Subject: z\r\n\r\nbody\r\n") + b"BDAT 0\r\n" + b"BDAT 0 LAST\r\n")
        self.transcript(h, f"< 250 2.0.0 Ok: 20 bytes\n< 250 2.0.0 Ok: 0 bytes\n{QUEUED}")
        self.assertEqual(self.stored(h), [b"Subject: z\r\n\r\nbody\r\n"])

    def test_empty_message(self) -> None:
        """
        BDAT 0 LAST alone is an empty message: accepted, like an empty
        DATA, holding our Received header only.
        """
        h = self.envelope()
        h.send(b"BDAT 0 LAST\r\n")
        self.transcript(h, QUEUED)
        self.assertEqual(self.stored(h), [b""])

    def test_lower_case(self) -> None:
        """
        The verb and LAST are case-insensitive.
        """
        h = self.envelope()
        h.send(b"bdat 3 last\r\nhi\n")
        self.transcript(h, QUEUED)
        self.assertEqual(self.stored(h), [b"hi\n"])

    def test_mode(self) -> None:
        """
        CHUNK while a chunk is read (its bytes not taken as commands),
        WAITING while the message at its end is finished, then COMMAND.
        """
        envelope: Deferred[Any] = Deferred()
        h = self.harness(Recorder(process_envelope=lambda *args: envelope))
        self.transcript(h, ENVELOPE)
        h.send(b"BDAT 10 LAST\r\nQUIT\r\n")
        self.assertIs(h.protocol.mode, Mode.CHUNK)
        h.send(b"abcdNOOP\r\n")
        self.assertIs(h.protocol.mode, Mode.WAITING)
        envelope.callback(Consume())
        self.assertIs(h.protocol.mode, Mode.COMMAND)
        self.transcript(h, "< 250 2.0.0 Ok\n< 250 2.0.0 Ok")

    def test_plugin_decides_at_last(self) -> None:
        """
        The plugin's process_envelope answers at the last chunk as at the
        end of DATA: a Reject is the reply, nothing is spooled.
        """
        h = self.harness(Recorder(process_envelope=Reject(Reply(550, "5.7.1 no thanks"))))
        self.transcript(h, ENVELOPE)
        h.send(bdat(b"a\r\n") + bdat(b"b\r\n", last=True))
        self.transcript(h, "< 250 2.0.0 Ok: 3 bytes\n< 550 5.7.1 no thanks")
        self.assertEqual(self.entries(h), [])


class SequenceTests(ChunkingTestCase):
    """
    BDAT out of sequence: refused once its chunk is read and thrown away
    (RFC 3030 section 2), so that the session stays in step.
    """

    def test_before_mail(self) -> None:
        """
        BDAT without a transaction: 503 after the chunk, whose text (a
        QUIT here) is not run; the session goes on.
        """
        h = self.harness()
        self.transcript(h, EHLO)
        h.send(bdat(b"QUIT\r\n", last=True) + b"NOOP\r\n")
        self.transcript(h, "< 503 5.5.1 Error: need MAIL command\n< 250 2.0.0 Ok")
        self.assertFalse(h.closed)
        self.assertEqual(h.spool.writers, [])

    def test_after_last(self) -> None:
        """
        BDAT after BDAT LAST: the transaction is over, 503.
        """
        h = self.envelope()
        h.send(bdat(b"x\r\n", last=True) + bdat(b"more", last=True))
        self.transcript(h, f"{QUEUED}\n< 503 5.5.1 Error: need MAIL command")
        self.assertEqual(self.stored(h), [b"x\r\n"])

    def test_no_valid_recipients(self) -> None:
        """
        Every recipient refused: 554 5.5.1 (as Postfix); the later chunks
        of the transaction are thrown away with 554 5.0.0 until the last
        one, which ends the transaction (RCPT then needs MAIL).
        """
        h = self.harness(Recorder(process_recipient=Reject(Reply(550, "5.1.1 no such user"))))
        self.transcript(h, ENVELOPE.replace("< 250 2.1.5 Ok", "< 550 5.1.1 no such user"))
        h.send(bdat(b"first") + bdat(b"second") + bdat(b"last", last=True) + b"RCPT TO:<c@d.e>\r\n")
        self.transcript(
            h,
            """
            < 554 5.5.1 No valid recipients
            < 554 5.0.0 Error: 6 bytes discarded after an earlier error
            < 554 5.0.0 Error: 4 bytes discarded after an earlier error
            < 503 5.5.1 Error: need MAIL command
            """,
        )
        self.assertEqual(h.spool.writers, [])

    def test_no_valid_recipients_then_rset(self) -> None:
        """
        RSET after a refused chunk clears the transaction; the next one
        goes through.
        """
        h = self.harness(Recorder(process_recipient=Reject(Reply(550, "5.1.1 no"))))
        self.transcript(h, ENVELOPE.replace("< 250 2.1.5 Ok", "< 550 5.1.1 no"))
        h.send(bdat(b"chunk") + b"RSET\r\n")
        self.transcript(h, "< 554 5.5.1 No valid recipients\n< 250 2.0.0 Ok")
        self.assertIsNone(h.protocol.mail.transaction)

    def test_rcpt_after_bdat(self) -> None:
        """
        RCPT after the first chunk: 503 (the chunks come after every
        RCPT); the message goes on to its recipient.
        """
        h = self.envelope()
        h.send(bdat(b"a\r\n") + b"RCPT TO:<c@example.com>\r\n" + bdat(b"b\r\n", last=True))
        self.transcript(h, f"< 250 2.0.0 Ok: 3 bytes\n< 503 5.5.1 Error: RCPT after BDAT\n{QUEUED}")
        self.assertEqual([str(r) for r in self.entries(h)[0].recipients], ["b@example.com"])

    def test_data_after_bdat(self) -> None:
        """
        DATA after BDAT in the same transaction: 503 (RFC 3030 section 2);
        RSET clears it and a new transaction with DATA goes through.
        """
        h = self.envelope()
        h.send(bdat(b"a\r\n"))
        self.transcript(
            h,
            """
            < 250 2.0.0 Ok: 3 bytes
            > DATA
            < 503 5.5.1 Error: DATA after BDAT
            > RSET
            < 250 2.0.0 Ok
            > MAIL FROM:<a@example.org>
            < 250 2.1.0 Ok
            > RCPT TO:<b@example.com>
            < 250 2.1.5 Ok
            > DATA
            < 354
            > Subject: by DATA
            >
            > .
            """ + QUEUED,
        )
        self.assertEqual(self.stored(h), [b"Subject: by DATA\r\n\r\n"])
        self.assertTrue(h.spool.writers[0].aborted)

    def test_bdat_after_data(self) -> None:
        """
        BDAT after DATA: the message that DATA sent ended the transaction,
        so 503; after a DATA that was refused (a syntax error), the
        transaction's message goes with BDAT.
        """
        h = self.envelope()
        self.transcript(h, "> DATA\n< 354\n> hello\n> .\n" + QUEUED)
        h.send(bdat(b"late", last=True))
        self.transcript(
            h,
            """
            < 503 5.5.1 Error: need MAIL command
            > MAIL FROM:<a@example.org>
            < 250
            > RCPT TO:<b@example.com>
            < 250
            > DATA now
            < 501 5.5.4 Syntax: DATA
            """,
        )
        h.send(bdat(b"by BDAT\r\n", last=True))
        self.transcript(h, QUEUED)
        self.assertEqual(sorted(self.stored(h)), [b"by BDAT\r\n", b"hello\r\n"])

    def test_rset_between_chunks(self) -> None:
        """
        RSET between chunks throws the message away (RFC 3030 section 2);
        nothing is spooled and the next transaction starts clean.
        """
        h = self.envelope()
        h.send(bdat(b"part one") + b"RSET\r\n")
        self.transcript(h, "< 250 2.0.0 Ok: 8 bytes\n< 250 2.0.0 Ok")
        self.assertTrue(h.spool.writers[0].aborted)
        self.transcript(h, "> MAIL FROM:<a@example.org>\n< 250\n> RCPT TO:<b@example.com>\n< 250")
        h.send(bdat(b"fresh\r\n", last=True))
        self.transcript(h, QUEUED)
        self.assertEqual(self.stored(h), [b"fresh\r\n"])

    def test_mail_between_chunks(self) -> None:
        """
        MAIL between chunks is a nested MAIL: 503, and the message goes on.
        """
        h = self.envelope()
        h.send(bdat(b"a") + b"MAIL FROM:<x@example.org>\r\n" + bdat(b"b", last=True))
        self.transcript(
            h, f"< 250 2.0.0 Ok: 1 bytes\n< 503 5.5.1 Error: nested MAIL command\n{QUEUED}"
        )
        self.assertEqual(self.stored(h), [b"ab"])


class SyntaxTests(ChunkingTestCase):
    def test_malformed_size_closes(self) -> None:
        """
        A BDAT whose size cannot be read: where its chunk ends is unknown,
        so 521 5.5.4 and the session is closed (as Postfix does), before
        any of the chunk can run as commands; the message is dropped.
        """
        for arg in ["", " x", " -5", " 1e3", " 5 NOW", " 5 LAST x"]:
            h = self.envelope()
            h.send(b"BDAT" + arg.encode() + b"\r\nQUIT\r\n")
            self.assertEqual(h.lines(), ["521 5.5.4 Syntax: BDAT count [LAST]"], arg)
            self.assertTrue(h.closed)
            self.assertEqual(self.entries(h), [])


class SizeTests(ChunkingTestCase):
    def test_limit_across_chunks(self) -> None:
        """
        The size limit (advertised with SIZE) applies to the sum of the
        chunks: the chunk that crosses it is read, thrown away and refused
        with 552 5.3.4; the rest are thrown away until the last, which ends
        the transaction; the session goes on.
        """
        h = self.envelope(max_message_size=100)
        h.send(bdat(b"a" * 60) + bdat(b"b" * 50) + bdat(b"c" * 10, last=True) + b"NOOP\r\n")
        self.transcript(
            h,
            """
            < 250 2.0.0 Ok: 60 bytes
            < 552 5.3.4 Message size exceeds fixed limit
            < 554 5.0.0 Error: 10 bytes discarded after an earlier error
            < 250 2.0.0 Ok
            """,
        )
        self.assertEqual(self.entries(h), [])
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertIsNone(h.protocol.mail.transaction)

    def test_exactly_the_limit(self) -> None:
        """
        A message of exactly the limit goes through.
        """
        h = self.envelope(max_message_size=100)
        h.send(bdat(b"a" * 40) + bdat(b"b" * 60, last=True))
        self.transcript(h, f"< 250 2.0.0 Ok: 40 bytes\n{QUEUED}")
        self.assertEqual(self.stored(h), [b"a" * 40 + b"b" * 60])

    def test_last_chunk_over_the_limit(self) -> None:
        """
        A last chunk that crosses the limit: 552, the transaction is over.
        """
        h = self.envelope(max_message_size=100)
        h.send(bdat(b"x" * 101, last=True) + b"RCPT TO:<b@example.com>\r\n")
        self.transcript(
            h, "< 552 5.3.4 Message size exceeds fixed limit\n< 503 5.5.1 Error: need MAIL"
        )
        self.assertEqual(self.entries(h), [])

    def test_too_big_to_read(self) -> None:
        """
        A chunk announced beyond 1.5 times the limit (in all, with the
        transaction's earlier chunks) is not worth reading to stay in
        step: 552 5.3.4 at once and the session is closed (RFC 3030
        section 2: a chunk can only be cut short by closing).  Up to that
        bound it is read and thrown away, and the session goes on.
        """
        h = self.envelope(max_message_size=100)
        h.send(b"BDAT 100000000000000000000 LAST\r\n")
        self.assertEqual(h.lines(), ["552 5.3.4 Message size exceeds fixed limit"])
        self.assertTrue(h.closed)
        h = self.envelope(max_message_size=100)
        h.send(bdat(b"x" * 150) + b"NOOP\r\n")
        self.transcript(h, "< 552 5.3.4\n< 250 2.0.0 Ok")
        h.send(b"BDAT 1 LAST\r\n")
        self.assertEqual(h.lines(), ["554 5.0.0 Error: 1 bytes discarded after an earlier error"])
        self.assertTrue(h.closed)
        h = self.harness(max_message_size=100)
        self.transcript(h, EHLO.replace("SIZE \\d+", "SIZE 100"))
        h.send(b"BDAT 151\r\n")
        self.assertEqual(h.lines(), ["503 5.5.1 Error: need MAIL command"])
        self.assertTrue(h.closed)


class FailureTests(ChunkingTestCase):
    def test_spool_write_failure(self) -> None:
        """
        The spool failing under a chunk: 451 for that chunk, the later ones
        thrown away, the last one ends the transaction; the next message
        goes through.
        """
        h = self.envelope()

        def broken(data: bytes) -> bool:
            raise RuntimeError("write failed")

        self.patch_writer(h, write=broken)
        h.send(bdat(b"one") + bdat(b"two", last=True) + b"NOOP\r\n")
        self.transcript(
            h,
            """
            < 451 4.3.0
            < 554 5.0.0 Error: 3 bytes discarded after an earlier error
            < 250 2.0.0 Ok
            """,
        )
        self.assertEqual(self.entries(h), [])
        self.flushLoggedErrors(RuntimeError)
        self.transcript(h, "> MAIL FROM:<a@b.c>\n< 250\n> RCPT TO:<x@y.z>\n< 250")
        h.send(bdat(b"fine\r\n", last=True))
        self.transcript(h, QUEUED)

    def test_spool_receive_failure(self) -> None:
        """
        The spool refusing a new message at the first chunk: 451 once the
        chunk is read, and the transaction failed.
        """
        h = self.harness()
        self.transcript(h, ENVELOPE)

        def refuse(message_id: str) -> Any:
            raise RuntimeError("no spool")

        h.spool.receive = refuse  # type: ignore[method-assign]
        h.send(bdat(b"chunk") + bdat(b"end", last=True))
        self.transcript(
            h, "< 451 4.3.0\n< 554 5.0.0 Error: 3 bytes discarded after an earlier error"
        )
        self.flushLoggedErrors(RuntimeError)

    def test_dropped_mid_chunk(self) -> None:
        """
        The connection lost in the middle of a chunk: the message writer is
        aborted and nothing is spooled.
        """
        h = self.envelope()
        h.send(b"BDAT 100 LAST\r\nonly part")
        h.disconnect()
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertEqual(self.entries(h), [])

    def test_bare_lf_rejected_on_request(self) -> None:
        """
        With reject_bare_lf a message holding a bare LF is refused at the
        last chunk (550 5.6.2, as after DATA); a CRLF split between two
        chunks is no bare LF.
        """
        h = self.envelope(reject_bare_lf=True)
        h.send(bdat(b"a\r") + bdat(b"\nb\r\n", last=True))
        self.transcript(h, f"< 250 2.0.0 Ok: 2 bytes\n{QUEUED}")
        self.transcript(h, "> MAIL FROM:<a@example.org>\n< 250\n> RCPT TO:<b@example.com>\n< 250")
        h.send(bdat(b"a\nb\r\n", last=True))
        self.transcript(h, "< 550 5.6.2 Bare LF not allowed")
        self.assertEqual(self.stored(h), [b"a\r\nb\r\n"])


class FlowControlTests(ChunkingTestCase):
    def test_backpressure(self) -> None:
        """
        A chunk is written to the spool as it arrives; when the writer is
        full the transport is paused until it drains, as for DATA.
        """
        h = self.envelope()
        drained: Deferred[None] = Deferred()
        writes: list[bytes] = []

        def full(data: bytes) -> bool:
            writes.append(data)
            return True

        self.patch_writer(h, write=full, drained=lambda: drained)
        h.send(b"BDAT 10\r\n01234")
        self.assertEqual(h.transport.producerState, "paused")
        # Our Received header, then the chunk's first read.
        self.assertEqual(writes[1:], [b"01234"])
        drained.callback(None)
        self.assertEqual(h.transport.producerState, "producing")

    def test_big_message_streams(self) -> None:
        """
        A 50 MB message in 1 MB chunks, sent in 64 KiB reads: every read
        reaches the spool's writer as it comes (never more than a read at a
        time, so memory does not grow with the message), the session holds
        no input back, and the stored size is exact.
        """
        h = self.envelope(max_message_size=60 * 1024 * 1024)
        sizes: list[int] = []
        total = [0]

        def count(data: bytes) -> bool:
            sizes.append(len(data))
            total[0] += len(data)
            return False

        self.patch_writer(h, write=count)
        read = 64 * 1024
        chunk = b"x" * (1024 * 1024)
        for n in range(50):
            wire = bdat(chunk, last=n == 49)
            for start in range(0, len(wire), read):
                h.send(wire[start : start + read])
                self.assertFalse(h.protocol.has_pending_input())
        self.assertEqual(total[0] - sizes[0], 50 * 1024 * 1024)
        self.assertLessEqual(max(sizes[1:]), read)
        replies = h.lines()
        self.assertEqual(replies[:49], ["250 2.0.0 Ok: 1048576 bytes"] * 49)
        self.assertRegex(replies[49], r"^250 2\.0\.0 Ok: queued as ")
