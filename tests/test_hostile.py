"""
Hostile input against L{SMTPServerProtocol}, deterministically: a
L{StringTransport} and a L{Clock}, no sockets.

Each test pins down the exact reply the attack gets, and that the session
(or, when it is closed, the server) carries on.  The same attacks against
the real C{twistd relay} are in L{tests.test_hostile_live}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relay.model.reply import Reply
from relay.model.results import Accept, Continue, Reject
from relay.smtp.data import DataReader
from relay.smtp.protocol import MAX_LINE, MAX_PENDING_INPUT, MAX_PROTOCOL_ERRORS
from relay.smtp.server import SMTPServerFactory
from relay.smtp.stuffing import DotStuffer
from relay.testing import MemorySpool, ServerHarness
from tests.test_server import MAIL_TXN, Recorder, ServerTestCase, b64

# Sequences that some MTA somewhere took for the end of data (SMTP
# smuggling, CVE-2023-51764/51765/51766): none of them ends the data here.
SMUGGLING = [
    b"\n.\n",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\n",
    b"\r.\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n.\r\r\n",
    b"\n..\n",
]

SMUGGLED = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"

EHLO_REPLIES = "\n< 250" * 8


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class SmugglingTests(ServerTestCase):
    """
    RFC 5321 section 4.1.1.4: only CRLF "." CRLF ends the data.
    """

    def smuggle(self, seq: bytes, writes: list[bytes] | None = None, **kw: Any) -> ServerHarness:
        h = self.harness(**kw)
        self.transcript(h, MAIL_TXN)
        body = b"Subject: x\r\n\r\nbody" + seq + SMUGGLED + b"Smuggled\r\n.\r\nNOOP\r\n"
        for chunk in writes if writes is not None else [body]:
            h.send(chunk)
        return h

    def test_smuggling_one_write(self) -> None:
        """
        Every smuggling sequence, sent in one write with the commands
        after it, is message text: one message, one MAIL FROM run, and the
        only replies are the queued reply and the NOOP after the real end.
        """
        for seq in SMUGGLING:
            h = self.smuggle(seq)
            [queued, noop] = h.lines()
            self.assertTrue(queued.startswith("250 2.0.0 Ok: queued as "), (seq, queued))
            self.assertEqual(noop, "250 2.0.0 Ok", seq)
            self.assertEqual(len(self.entries(h)), 1, seq)
            [data] = self.message_data(h)
            self.assertIn(b"MAIL FROM:<evil@attacker.example>", data, seq)
            self.assertEqual(self.callbacks.names().count("process_sender"), 1, seq)
            self.assertFalse(h.closed, seq)

    def test_smuggling_byte_by_byte(self) -> None:
        """
        The same holds when the client sends one byte per packet, so every
        chunk boundary falls inside the sequence somewhere.
        """
        for seq in SMUGGLING:
            body = b"Subject: x\r\n\r\nbody" + seq + SMUGGLED + b"Smuggled\r\n.\r\nNOOP\r\n"
            h = self.smuggle(seq, writes=pieces(body, 1))
            self.assertEqual(len(h.lines()), 2, seq)
            self.assertEqual(len(self.entries(h)), 1, seq)
            self.assertEqual(self.callbacks.names().count("process_sender"), 1, seq)

    def test_smuggling_stored_form(self) -> None:
        """
        What is stored keeps the smuggled commands as text, and sent on by
        the outbound encoder it is one message again: the next hop's
        decoder ends it exactly at the end marker and gets the stored bytes
        (a lone CR there becomes CRLF, the only line ending on the wire).
        """
        for seq in SMUGGLING:
            h = self.smuggle(seq)
            [data] = self.message_data(h)
            self.assertIn(b"RCPT TO:<victim@example.com>\r\nDATA\r\n", data, seq)
            stuffer = DotStuffer()
            wire = stuffer.encode(data) + stuffer.finish()
            decoded: list[bytes] = []
            reader = DataReader(decoded.append)
            self.assertEqual(reader.feed(wire + b"QUIT\r\n"), b"QUIT\r\n", seq)
            crlf = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
            self.assertEqual(b"".join(decoded), crlf, seq)

    def test_smuggling_with_reject_bare_lf(self) -> None:
        """
        With reject_bare_lf, a smuggling attempt using bare LF refuses the
        whole message with 550 5.6.2 (nothing spooled) and the session goes on.
        """
        for seq in [s for s in SMUGGLING if b"\n" in s.replace(b"\r\n", b"")]:
            h = self.smuggle(seq, reject_bare_lf=True)
            self.assertEqual(h.lines(), ["550 5.6.2 Bare LF not allowed", "250 2.0.0 Ok"], seq)
            self.assertEqual(self.entries(h), [], seq)

    def test_refused_data_with_pipelined_message(self) -> None:
        """
        DATA refused (no valid recipient) with the message pipelined behind
        it: the message is not run as commands; 554 5.5.0 synchronization
        error and the session is closed.
        """
        h = self.harness(Recorder(process_recipient=Reject(Reply(550, "5.1.1 no such user"))))
        self.transcript(h, "< 220\n> EHLO c" + EHLO_REPLIES)
        h.send(
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<nobody@b.example>\r\nDATA\r\n"
            b"Subject: x\r\n\r\n" + SMUGGLED + b"x\r\n.\r\n"
        )
        self.assertEqual(
            h.lines(),
            [
                "250 2.1.0 Ok",
                "550 5.1.1 no such user",
                "554 5.5.1 No valid recipients",
                "554 5.5.0 SMTP synchronization error: input sent after a refused DATA",
            ],
        )
        self.assertTrue(h.closed)
        self.assertEqual(self.callbacks.names().count("process_sender"), 1)
        self.assertEqual(self.entries(h), [])

    def test_refused_data_alone_carries_on(self) -> None:
        """
        A refused DATA with nothing behind it is an ordinary error.
        """
        h = self.harness()
        self.transcript(
            h, "< 220\n> EHLO c" + EHLO_REPLIES + "\n> DATA\n< 503 5.5.1\n> NOOP\n< 250"
        )
        self.assertFalse(h.closed)

    def test_pipelined_after_end_of_data(self) -> None:
        """
        Commands after the real end marker in the same packet are commands
        (RFC 2920): two messages for two DATA, in order.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        h.send(b"a\r\n.\r\nMAIL FROM:<c@d.example>\r\nRCPT TO:<f@g.example>\r\nDATA\r\nb\r\n.\r\n")
        lines = h.lines()
        self.assertEqual(
            [line[:9] for line in lines],
            ["250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End d", "250 2.0.0"],
        )
        self.assertEqual(len(self.entries(h)), 2)


class StartTLSInjectionTests(ServerTestCase):
    """
    CVE-2011-0411: plaintext pipelined after STARTTLS must not run inside
    the TLS session.
    """

    def test_rset_after_starttls(self) -> None:
        """
        "STARTTLS\\r\\nRSET\\r\\n" in one packet: only the 220 is sent, RSET
        is dropped (no 250 for it ever), and the next command, sent after
        the handshake, is answered on its own.
        """
        h = self.harness(tls_context_factory=object())
        self.transcript(h, "< 220\n> EHLO c" + "\n< 250" * 9)
        h.send(b"STARTTLS\r\nRSET\r\n")
        self.assertEqual(h.lines(), ["220 2.0.0 Ready to start TLS"])
        self.transcript(h, "> NOOP\n< 250 2.0.0 Ok")

    def test_transaction_after_starttls(self) -> None:
        """
        A whole injected transaction after STARTTLS runs no callback and
        spools nothing; the session then needs a new EHLO.
        """
        h = self.harness(tls_context_factory=object())
        self.transcript(h, "< 220\n> EHLO c" + "\n< 250" * 9)
        h.send(
            b"STARTTLS\r\nEHLO evil\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nx\r\n.\r\n"
        )
        self.assertEqual(h.lines(), ["220 2.0.0 Ready to start TLS"])
        self.assertEqual(self.callbacks.names(), ["session_connect", "session_helo"])
        self.transcript(h, "> MAIL FROM:<a@b.example>\n< 503 5.5.1 Error: send HELO/EHLO first")
        self.assertEqual(self.entries(h), [])


class PipeliningTests(ServerTestCase):
    def test_before_greeting(self) -> None:
        """
        Input before the greeting (session_connect still pending) is never
        run: the greeting is replaced by 554 5.5.0 and the session closed;
        no later callback is called and the session count goes back to 0.
        """
        pending: Deferred[Any] = Deferred()
        h = self.harness(Recorder(session_connect=lambda log, s: pending))
        h.send(b"EHLO early\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n")
        self.assertEqual(h.lines(), [])
        pending.callback(Accept("test ESMTP"))
        self.assertEqual(
            h.lines(), ["554 5.5.0 SMTP synchronization error: input sent before the greeting"]
        )
        self.assertTrue(h.closed)
        self.assertEqual(self.callbacks.names(), ["session_connect"])
        h.disconnect()
        self.assertEqual(h.factory.sessions, 0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_before_greeting_many_bytes(self) -> None:
        """
        Input before the greeting is not even kept: 10 MB of it leaves no
        buffer behind.
        """
        pending: Deferred[Any] = Deferred()
        h = self.harness(Recorder(session_connect=lambda log, s: pending))
        for _ in range(160):
            h.send(b"x" * 65536)
        self.assertEqual(h.protocol._buffer, b"")
        pending.callback(Accept("test ESMTP"))
        self.assertEqual(
            h.lines(), ["554 5.5.0 SMTP synchronization error: input sent before the greeting"]
        )

    def test_pipelined_while_callback_pending_is_bounded(self) -> None:
        """
        A client that keeps sending while a slow callback is pending is
        paused once MAX_PENDING_INPUT bytes wait, and resumed (with every
        waiting command answered in order) when the callback fires.
        """
        pending: list[Deferred[Any]] = []

        def slow(*args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

        h = self.harness(Recorder(process_sender=slow))
        self.transcript(h, "< 220\n> EHLO c" + EHLO_REPLIES + "\n> MAIL FROM:<a@b.example>")
        self.assertEqual(h.transport.producerState, "producing")
        batch = b"NOOP\r\n" * 1000
        sent = 0
        while h.transport.producerState == "producing":
            h.send(batch)
            sent += 1000
            self.assertLess(sent, 100_000)
        self.assertLessEqual(len(h.protocol._buffer), MAX_PENDING_INPUT + len(batch))
        pending[0].callback(Continue())
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.lines(), ["250 2.1.0 Ok"] + ["250 2.0.0 Ok"] * sent)

    def test_client_not_reading_replies(self) -> None:
        """
        While the transport's write buffer is full (the client does not read
        our replies; the transport pauses us, its producer), commands wait
        unanswered and past MAX_PENDING_INPUT reading stops; when the client
        reads again every command is answered in order.  QUIT unregisters
        the producer, or the transport would never close.
        """
        h = self.harness()
        self.transcript(h, "< 220")
        self.assertIs(h.transport.producer, h.protocol)
        h.protocol.pauseProducing()
        sent = 0
        while h.transport.producerState == "producing":
            h.send(b"NOOP\r\n" * 1000)
            sent += 1000
            self.assertLess(sent, 100_000)
        self.assertEqual(h.lines(), [])
        h.protocol.resumeProducing()
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.lines(), ["250 2.0.0 Ok"] * sent)
        self.transcript(h, "> QUIT\n< 221 2.0.0 Bye")
        self.assertIsNone(h.transport.producer)
        self.assertTrue(h.closed)


class CommandLineTests(ServerTestCase):
    def test_bare_cr(self) -> None:
        """
        Bare CR inside a command line is refused with 500 5.5.2 and nothing
        of the line runs; the session goes on.
        """
        h = self.harness()
        self.transcript(h, "< 220\n> EHLO c" + EHLO_REPLIES)
        for line in [
            b"NOOP\rQUIT\r\n",
            b"MAIL FROM:<a@b.example>\rRCPT TO:<c@d.example>\r\n",
            b"\r\r\n",
            b"QUIT\r\r\n",
        ]:
            h.send(line)
            self.assertEqual(h.lines(), ["500 5.5.2 Bare CR not allowed in commands"], line)
        self.assertEqual(self.callbacks.names(), ["session_connect", "session_helo"])
        self.transcript(h, "> NOOP\n< 250 2.0.0 Ok")

    def test_ten_megabyte_line(self) -> None:
        """
        A 10 MB command line without line ending, in 64 KiB packets, gets one
        500 5.5.2 Line too long; the buffer never holds more than a packet
        plus MAX_LINE; what follows its eventual LF runs.
        """
        h = self.harness()
        self.transcript(h, "< 220")
        for _ in range(160):
            h.send(b"A" * 65536)
            self.assertLessEqual(len(h.protocol._buffer), MAX_LINE)
        self.assertEqual(h.lines(), ["500 5.5.2 Line too long"])
        h.send(b"AAAA\r\nNOOP\r\n")
        self.assertEqual(h.lines(), ["250 2.0.0 Ok"])

    def test_ten_megabyte_line_never_ended(self) -> None:
        """
        If the long line never ends, the command deadline closes the session
        with 421 4.4.2.
        """
        h = self.harness(command_deadline=60, idle_timeout=30)
        self.transcript(h, "< 220")
        for _ in range(160):
            h.send(b"A" * 65536)
            h.clock.advance(0.5)
        self.assertEqual(
            h.lines(), ["500 5.5.2 Line too long", "421 4.4.2 localhost Error: timeout exceeded"]
        )
        self.assertTrue(h.closed)

    def test_ten_megabyte_data_line(self) -> None:
        """
        A 10 MB line inside DATA keeps the decoder's carry bounded and the
        message is accepted once ended.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        for _ in range(160):
            h.send(b"B" * 65536)
            assert h.protocol._reader is not None
            self.assertLessEqual(len(h.protocol._reader._carry), 64 * 1024 + 65536)
        h.send(b"\r\n.\r\n")
        [queued] = h.lines()
        self.assertTrue(queued.startswith("250 2.0.0 Ok: queued"))
        [data] = self.message_data(h)
        self.assertEqual(data.count(b"B"), 160 * 65536)

    def test_non_ascii_verb(self) -> None:
        """
        Unicode case mapping does not make a verb: "quıt" (dotless i)
        upper-cases to QUIT but is 500; "ＱＵＩＴ" likewise.
        """
        h = self.harness()
        self.transcript(h, "< 220\n> quıt\n< 500 5.5.2 Command unrecognized")
        self.transcript(h, "> ＱＵＩＴ\n< 500 5.5.2 Command unrecognized")
        self.assertFalse(h.closed)

    def test_control_characters_in_helo(self) -> None:
        """
        A HELO name with control characters (which would end up in the
        Received header) is 501 5.5.4.
        """
        h = self.harness()
        self.transcript(h, "< 220")
        for name in [b"a\x00b", b"a\tb", b"a\x1bb", b"a\x7f"]:
            h.send(b"EHLO " + name + b"\r\n")
            self.assertEqual(h.lines(), ["501 5.5.4 Syntax: EHLO hostname"], name)
        self.assertEqual(self.callbacks.names(), ["session_connect"])

    def test_invalid_utf8(self) -> None:
        """
        A command that is not UTF-8 is 500 5.5.2 and the session goes on.
        """
        h = self.harness()
        self.transcript(h, "< 220")
        h.send(b"EHLO \xff\xfe\r\nNOOP\r\n")
        self.assertEqual(h.lines(), ["500 5.5.2 Invalid UTF-8 in command", "250 2.0.0 Ok"])

    def test_too_many_errors(self) -> None:
        """
        After MAX_PROTOCOL_ERRORS bad commands the session is closed with
        421 4.7.0 (so a body sent as commands cannot go on for ever);
        policy refusals (550) do not count.
        """
        h = self.harness(Recorder(process_recipient=Reject(Reply(550, "5.1.1 no"))))
        self.transcript(h, "< 220\n> HELO c\n< 250\n> MAIL FROM:<a@b.example>\n< 250")
        h.send(b"RCPT TO:<x@y.example>\r\n" * 50)
        self.assertEqual(h.lines(), ["550 5.1.1 no"] * 50)
        h.send(b"GARBAGE\r\n" * (MAX_PROTOCOL_ERRORS + 5))
        self.assertEqual(
            h.lines(),
            ["500 5.5.2 Command unrecognized"] * MAX_PROTOCOL_ERRORS
            + ["421 4.7.0 localhost Error: too many errors"],
        )
        self.assertTrue(h.closed)


class SlowClientTests(ServerTestCase):
    def test_one_byte_every_five_seconds(self) -> None:
        """
        A client that sends one byte every 5 seconds, never ending a line,
        is closed by the default 600 s command deadline with 421 4.4.2,
        however patient the idle timeout is.
        """
        h = self.harness()
        self.assertEqual((h.factory.settings.idle_timeout, h.factory.settings.command_deadline), (300.0, 600.0))
        self.transcript(h, "< 220")
        sent = 0
        while not h.closed:
            h.send(b"N")
            sent += 1
            h.clock.advance(5)
            self.assertLess(sent, 1000)
        self.assertEqual(sent, 120)
        self.assertEqual(h.lines(), ["421 4.4.2 localhost Error: timeout exceeded"])
        h.disconnect()
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_slow_data(self) -> None:
        """
        The same drip inside DATA: closed at the deadline, the message
        writer aborted and nothing spooled.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        while not h.closed:
            h.send(b"x")
            h.clock.advance(5)
        self.assertEqual(h.lines(), ["421 4.4.2 localhost Error: timeout exceeded"])
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertEqual(self.entries(h), [])


class DroppedConnectionTests(ServerTestCase):
    def test_thousand_dropped_mid_command(self) -> None:
        """
        1000 connections dropped at every stage (mid-line, mid-DATA, while a
        callback is pending, during the AUTH failure delay, in an AUTH
        exchange, discarding an overlong line) leave no session counted, no
        timer pending and no message writer open; callbacks that fire
        afterwards write nothing.
        """
        clock = Clock()
        pending: list[Deferred[Any]] = []

        def slow(log: Any, session: Any, sender: Any, args: Any, recipient: Any) -> Any:
            if recipient.local_part != "slow":
                return Continue()
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

        callbacks = Recorder(session_helo=Continue(advertise_auth=True), process_recipient=slow)
        spool = MemorySpool(clock)
        factory = SMTPServerFactory(callbacks, spool, clock, auth_requires_tls=False)
        bad_auth = f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'wrong')}\r\n".encode()
        stages = [
            b"EH",
            b"EHLO c\r\nMAIL FROM:<a@b.exa",
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<slow@d.example>\r\n",
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nSubject: ha",
            b"EHLO c\r\n" + bad_auth * 3,
            b"EHLO c\r\nAUTH LOGIN\r\n",
            b"A" * 5000,
        ]
        harnesses = []
        for i in range(1000):
            h = ServerHarness(factory=factory)
            h.send(stages[i % len(stages)])
            harnesses.append(h)
        self.assertEqual(factory.sessions, 1000)
        for h in harnesses:
            h.output()
            h.disconnect()
        self.assertEqual(factory.sessions, 0)
        self.assertEqual(clock.getDelayedCalls(), [])
        per_stage = len(range(0, 1000, len(stages)))
        self.assertEqual(len(spool.writers), per_stage)
        self.assertTrue(all(w.aborted and not w.finished for w in spool.writers))
        self.assertEqual(spool.entries_by_id, {})
        self.assertEqual(len(pending), per_stage)
        for d in pending:
            d.callback(Continue())
        self.assertEqual([h.output() for h in harnesses], [b""] * 1000)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_dropped_mid_data(self) -> None:
        """
        Dropped in the middle of DATA: the writer is aborted, nothing is
        spooled.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        h.send(b"Subject: x\r\n\r\nhalf a mess")
        h.disconnect()
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertEqual(self.entries(h), [])
        self.assertEqual(h.factory.sessions, 0)


class AuthBruteForceTests(ServerTestCase):
    def auth_harness(self, **kw: Any) -> ServerHarness:
        h = self.harness(
            Recorder(session_helo=Continue(advertise_auth=True)), auth_requires_tls=False, **kw
        )
        self.transcript(h, "< 220\n> EHLO c" + "\n< 250" * 9)
        return h

    def attempt(self, h: ServerHarness, password: str) -> None:
        h.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + password)}\r\n")

    def test_defaults(self) -> None:
        """
        The numbers: two failures answered at once, then a 2 s delay each,
        the fifth failure closes the session.
        """
        s = SMTPServerFactory(Recorder(), MemorySpool(), Clock()).settings
        self.assertEqual(
            (s.auth_failures_before_delay, s.auth_failure_delay, s.auth_max_failures), (2, 2.0, 5)
        )

    def test_brute_force(self) -> None:
        """
        Failures 1 and 2 get 535 at once; 3 and 4 only after 2 s, with the
        input behind them waiting; failure 5 gets 421 4.7.0 and the close.
        """
        h = self.auth_harness()
        bad = "535 5.7.8 Authentication credentials invalid"
        for _ in range(2):
            self.attempt(h, "guess")
            self.assertEqual(h.lines(), [bad])
        for _ in range(2):
            self.attempt(h, "guess")
            h.send(b"NOOP\r\n")
            h.clock.advance(1.9)
            self.assertEqual(h.lines(), [])
            h.clock.advance(0.1)
            self.assertEqual(h.lines(), [bad, "250 2.0.0 Ok"])
        self.attempt(h, "guess")
        self.assertEqual(
            h.lines(), ["421 4.7.0 localhost Error: too many failed authentication attempts"]
        )
        self.assertTrue(h.closed)
        self.assertEqual(self.callbacks.names().count("check_authentication_credentials"), 5)

    def test_success_after_failures(self) -> None:
        """
        The right password after delayed failures still authenticates, at
        once.
        """
        h = self.auth_harness()
        for _ in range(3):
            self.attempt(h, "guess")
        h.clock.advance(2)
        self.attempt(h, "secret")
        self.assertEqual(h.lines()[-1], "235 2.7.0 Authentication successful")

    def test_login_counts_too(self) -> None:
        """
        AUTH LOGIN failures count the same way.
        """
        h = self.auth_harness(auth_failure_delay=0)
        for _ in range(4):
            self.transcript(h, f"> AUTH LOGIN {b64('alice')}\n< 334\n> {b64('x')}\n< 535 5.7.8")
        self.transcript(h, f"> AUTH LOGIN {b64('alice')}\n< 334\n> {b64('x')}\n< 421 4.7.0")
        self.assertTrue(h.closed)

    def test_dropped_during_delay(self) -> None:
        """
        A client that drops during the delay leaves no timer behind and no
        logged error.
        """
        h = self.auth_harness()
        for _ in range(3):
            self.attempt(h, "guess")
        h.disconnect()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.factory.sessions, 0)
        self.assertEqual(self.flushLoggedErrors(), [])


# (parameters, expected reply) for MAIL FROM:<a@b.example> PARAMETERS.
# RFC 5321 section 4.1.1.11 / RFC 1869 section 6: an unrecognized
# parameter is 555; a recognized one with a bad value is 501.
MAIL_PARAMETERS = [
    ("FOO=bar", "555 5.5.4 Unsupported parameter FOO"),
    ("XFORWARD=1", "555 5.5.4 Unsupported parameter XFORWARD"),
    ("BODY=BINARYMIME", "555 5.5.4 BODY must be 7BIT or 8BITMIME"),
    ("SIZE=abc", "501 5.5.4 SIZE needs a number"),
    ("SIZE=\u00b2", "501 5.5.4 SIZE needs a number"),
    ("SIZE=-1", "501 5.5.4 SIZE needs a number"),
    ("SIZE=1" + "0" * 30, "501 5.5.4 SIZE needs a number"),
    ("SIZE=99999999999", "552 5.3.4 Message size exceeds fixed limit"),
    ("SIZE", "501 5.5.4 SIZE needs a number"),
    ("SIZE=", "501 5.5.4 Malformed parameter 'SIZE='"),
    ("=x", "501 5.5.4 Malformed parameter '=x'"),
    ("-X=1", "501 5.5.4 Malformed parameter '-X=1'"),
    ("SIZE=1 SIZE=2", "501 5.5.4 Duplicate parameter SIZE"),
    ("SMTPUTF8=yes", "501 5.5.4 SMTPUTF8 takes no value"),
    ("RET=ALL", "501 5.5.4 RET must be FULL or HDRS"),
    ("ENVID=a+zz", "501 5.5.4 ENVID must be xtext (+XX for '+', '=', spaces and controls)"),
    ("ENVID=" + "x" * 101, "501 5.5.4 ENVID is longer than 100 characters"),
    ("AUTH=a\u00e9", "501 5.5.4 Bad value for AUTH"),
    ("\u00c9=1", "501 5.5.4 Malformed parameter '\u00c9=1'"),
]

RCPT_PARAMETERS = [
    ("FOO=bar", "555 5.5.4 Unsupported parameter FOO"),
    ("SIZE=1", "555 5.5.4 Unsupported parameter SIZE"),
    ("NOTIFY=SOMETIMES", "501 5.5.4 NOTIFY must be NEVER, or one or more of SUCCESS,FAILURE,DELAY"),
    ("NOTIFY=NEVER,DELAY", "501 5.5.4 NOTIFY=NEVER cannot be combined with other values"),
    ("NOTIFY=", "501 5.5.4 Malformed parameter 'NOTIFY='"),
    ("ORCPT=nosemicolon", "501 5.5.4 ORCPT must be addr-type;xtext, e.g. rfc822;user@example.com"),
    ("ORCPT=rfc822;a=b", "501 5.5.4 ORCPT address must be xtext (+XX for '+', '=', spaces and controls)"),
    ("NOTIFY=SUCCESS NOTIFY=FAILURE", "501 5.5.4 Duplicate parameter NOTIFY"),
]


class ParameterTests(ServerTestCase):
    def test_mail_parameters(self) -> None:
        """
        Unknown MAIL FROM parameters get 555 5.5.4, malformed ones 501
        5.5.4 (a SIZE over the limit 552); none starts a transaction, and
        a good MAIL FROM works afterwards.
        """
        h = self.harness()
        self.transcript(h, "< 220\n> EHLO c" + EHLO_REPLIES)
        for params, reply in MAIL_PARAMETERS:
            h.send(f"MAIL FROM:<a@b.example> {params}\r\n")
            self.assertEqual(h.lines(), [reply], params)
        self.assertNotIn("process_sender", self.callbacks.names())
        self.transcript(h, "> MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME\n< 250 2.1.0 Ok")
        self.flushLoggedErrors()
        self.assertFalse(h.closed)

    def test_rcpt_parameters(self) -> None:
        """
        The same for RCPT TO: 555 for unknown, 501 for malformed; the
        transaction goes on.
        """
        h = self.harness()
        self.transcript(h, "< 220\n> EHLO c" + EHLO_REPLIES + "\n> MAIL FROM:<a@b.example>\n< 250")
        for params, reply in RCPT_PARAMETERS:
            h.send(f"RCPT TO:<c@d.example> {params}\r\n")
            self.assertEqual(h.lines(), [reply], params)
        self.assertNotIn("process_recipient", self.callbacks.names())
        self.transcript(h, "> RCPT TO:<c@d.example> NOTIFY=NEVER\n< 250 2.1.5 Ok")

    def test_malformed_paths(self) -> None:
        """
        Malformed MAIL/RCPT syntax: 501 5.5.4 for the command shape, 553 for
        the address.
        """
        h = self.harness()
        self.transcript(
            h,
            "< 220\n> EHLO c"
            + EHLO_REPLIES
            + """
            > MAIL FROM:a@b.example
            < 501 5.5.4 Syntax: MAIL FROM:<address> [parameters]
            > MAIL FROM:<a@b.example>SIZE=1
            < 501 5.5.4 Syntax: MAIL FROM:<address> [parameters]
            > MAIL FROM:<a\x00@b.example>
            < 553 5.1.7 Bad sender address syntax
            > MAIL FROM:<a@-b.example>
            < 553 5.1.7 Bad sender address syntax
            > MAIL FROM:<>
            < 250 2.1.0 Ok
            > RCPT TO:<c@d.example
            < 501 5.5.4 Syntax: RCPT TO:<address> [parameters]
            > RCPT TO:<@x:c>
            < 553 5.1.3 Bad recipient address syntax
            > RCPT TO:<c@[300.1.1.1]>
            < 553 5.1.3 Bad recipient address syntax
            """,
        )


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


class ChunkingTests(ServerTestCase):
    """
    BDAT (RFC 3030) from a hostile client: a chunk is bytes by count, so
    nothing in it is a command, and a chunk that cannot be read to its end
    ends the session rather than the session taking its bytes for
    commands.
    """

    ENVELOPE = (
        "< 220\n> EHLO c" + EHLO_REPLIES
        + "\n> MAIL FROM:<a@b.example>\n< 250\n> RCPT TO:<c@d.example>\n< 250"
    )  # fmt: skip

    def test_smuggling_in_a_chunk(self) -> None:
        """
        Every smuggling sequence and a whole pipelined transaction inside
        one chunk, in one write or byte by byte: one message holding all of
        it as sent, one MAIL FROM run.
        """
        body = b"Subject: x\r\n\r\n" + b"".join(s + SMUGGLED + b"Smuggled" for s in SMUGGLING)
        body += b"\r\n.\r\n" + bdat(b"inner", last=True) + b"QUIT\r\n"
        for writes in ([bdat(body, last=True)], pieces(bdat(body, last=True), 1)):
            h = self.harness()
            self.transcript(h, self.ENVELOPE)
            for write in writes:
                h.send(write)
            [queued] = h.lines()
            self.assertTrue(queued.startswith("250 2.0.0 Ok: queued as "), queued)
            [data] = self.message_data(h)
            self.assertTrue(data.endswith(body))
            self.assertEqual(self.callbacks.names().count("process_sender"), 1)
            self.assertFalse(h.closed)

    def test_huge_chunk_size(self) -> None:
        """
        BDAT 10**20 (and a size of 500 digits): 552 5.3.4 at once and the
        session is closed, nothing read into memory, nothing spooled.
        """
        for size in (b"1" + b"0" * 20, b"9" * 500):
            h = self.harness()
            self.transcript(h, self.ENVELOPE)
            h.send(b"BDAT " + size + b" LAST\r\n" + b"x" * 100_000)
            self.assertEqual(h.lines(), ["552 5.3.4 Message size exceeds fixed limit"])
            self.assertTrue(h.closed)
            self.assertEqual(len(h.protocol._buffer), 0)
            self.assertEqual(self.entries(h), [])
            self.assertTrue(all(w.aborted for w in h.spool.writers))

    def test_announced_then_silent(self) -> None:
        """
        A client that announces a chunk, sends part of it and falls silent
        is closed by the idle timeout (421 4.4.2); one that trickles it is
        closed by the command deadline.  The message is dropped either way.
        """
        h = self.harness()
        self.transcript(h, self.ENVELOPE)
        h.send(b"BDAT 1000 LAST\r\nsome")
        h.clock.advance(h.factory.settings.idle_timeout)
        self.assertEqual(h.lines(), ["421 4.4.2 localhost Error: timeout exceeded"])
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertEqual(self.entries(h), [])
        h = self.harness()
        self.transcript(h, self.ENVELOPE)
        h.send(b"BDAT 1000 LAST\r\n")
        while not h.closed:
            h.send(b"x")
            h.clock.advance(5)
        self.assertEqual(h.lines(), ["421 4.4.2 localhost Error: timeout exceeded"])
        self.assertTrue(h.spool.writers[0].aborted)
        h.disconnect()
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_pipelined_after_chunk(self) -> None:
        """
        Commands pipelined behind a chunk are commands; behind a refused
        chunk too (it is read and thrown away first), so a client cannot
        get its chunk run by having it refused.
        """
        h = self.harness()
        self.transcript(h, "< 220\n> EHLO c" + EHLO_REPLIES)
        h.send(bdat(b"NOOP\r\n" * 3, last=True) + b"MAIL FROM:<a@b.example>\r\n"
               + b"RCPT TO:<c@d.example>\r\n" + bdat(b"RSET\r\n") + b"RSET\r\n")  # fmt: skip
        self.assertEqual(
            h.lines(),
            [
                "503 5.5.1 Error: need MAIL command",
                "250 2.1.0 Ok",
                "250 2.1.5 Ok",
                "250 2.0.0 Ok: 6 bytes",
                "250 2.0.0 Ok",
            ],
        )
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertEqual(self.entries(h), [])

    def test_discarded_chunks_are_bounded(self) -> None:
        """
        Chunks pipelined after a refusal are thrown away only up to 1.5
        times the size limit in all; the chunk past it closes the session.
        """
        h = self.harness(max_message_size=10_000)
        self.transcript(h, self.ENVELOPE)
        h.send(bdat(b"x" * 10_001))
        sent = 1
        while not h.closed:
            h.send(bdat(b"y" * 1000))
            sent += 1
            self.assertLess(sent, 100)
        lines = h.lines()
        self.assertEqual(lines[0], "552 5.3.4 Message size exceeds fixed limit")
        self.assertEqual(len(lines), sent)
        self.assertTrue(lines[-1].startswith("554 5.0.0 Error: 1000 bytes discarded"))
        self.assertEqual(sent, 6)

    def test_client_not_reading_replies(self) -> None:
        """
        A client that pipelines chunks without reading the replies is not
        read either once MAX_PENDING_INPUT bytes wait; when it reads again
        every chunk is answered in order.
        """
        h = self.harness()
        self.transcript(h, self.ENVELOPE)
        h.protocol.pauseProducing()
        sent = 0
        while h.transport.producerState == "producing":
            h.send(bdat(b"z" * 100) * 100)
            sent += 100
            self.assertLess(sent, 100_000)
        self.assertLessEqual(len(h.protocol._buffer), MAX_PENDING_INPUT + 100 * len(bdat(b"z" * 100)))
        self.assertEqual(h.lines(), [])
        h.protocol.resumeProducing()
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.lines(), ["250 2.0.0 Ok: 100 bytes"] * sent)
