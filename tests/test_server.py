"""
Tests for the SMTP server (L{relay.smtp.server}, L{relay.smtp.protocol} and
the session's parts): SMTP transcripts against L{SMTPServerProtocol}.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.reply import Reply
from relay.model.results import (
    Accept,
    Allow,
    AuthResult,
    ConnectResult,
    Consume,
    Continue,
    Deny,
    Disconnect,
    EnvelopeResult,
    HeloResult,
    Quarantine,
    RecipientResult,
    Reject,
    Send,
    SenderResult,
)
from relay.model.session import Session
from relay.smtp.protocol import Mode
from relay.smtp.server import ServerSettings, SMTPServerFactory
from relay.testing import (
    MemorySpool,
    ProcessEnvelopeCall,
    ProcessSenderCall,
    RecordingCallbacks,
    ServerHarness,
    SessionConnectCall,
    SessionHeloCall,
)
from tests.transcripts import ehlo_reply

MESSAGE = "Subject: hi\r\nFrom: a@example.org\r\n\r\nhello\r\n.\r\n"


class TestPolicy:
    """
    The plugin behind L{Recorder}: greets as C{test.example}, sends every
    envelope to C{mx.example.com:25}, and knows one user (alice, secret);
    L{Simple} answers the other callbacks.
    """

    def session_connect(self, log: Logger, session: Session) -> ConnectResult:
        return Accept("test.example ESMTP")

    def process_envelope(self, log: Logger, session: Session, envelope: Envelope) -> EnvelopeResult:
        return Send([EnvelopeWithNextHop(envelope, ["mx.example.com:25"])])

    def check_authentication_credentials(
        self, log: Logger, username: str, password: str
    ) -> AuthResult:
        return Allow() if (username, password) == ("alice", "secret") else Deny()


class Recorder(RecordingCallbacks):
    """
    The kit's L{RecordingCallbacks} around L{TestPolicy}: each answer given
    is a result, or a function of the callback's arguments (C{log} first).
    """

    def __init__(self, wrapped: object = None, **answers: Any) -> None:
        super().__init__(wrapped if wrapped is not None else TestPolicy(), **answers)


def boom(*args: Any) -> Any:
    raise RuntimeError("plugin bug")


async def async_value(value: Any) -> Any:
    return value


MAIL_TXN = f"""
< 220 test.example
> EHLO client.example
{ehlo_reply()}
> MAIL FROM:<a@example.org>
< 250 2.1.0 Ok
> RCPT TO:<b@example.com>
< 250 2.1.5 Ok
> DATA
< 354 End data with
"""


class ServerTestCase(SynchronousTestCase):
    def harness(self, callbacks: Any = None, **kw: Any) -> ServerHarness:
        self.callbacks = callbacks if callbacks is not None else Recorder()
        h = ServerHarness(self.callbacks, **kw)
        self.addCleanup(h.disconnect)
        return h

    def transcript(self, h: ServerHarness, script: str, exhaustive: bool = True) -> None:
        h.play(script, exhaustive=exhaustive)

    def entries(self, h: ServerHarness) -> list[Any]:
        return list(h.spool.entries_by_id.values())

    def message_data(self, h: ServerHarness) -> list[bytes]:
        return [m.data for m in h.spool.messages_by_id.values()]


class ConnectTests(ServerTestCase):
    def test_greeting(self) -> None:
        """
        Accept(greeting) answers 220 greeting.
        """
        h = self.harness()
        self.transcript(h, "< 220 test.example ESMTP")
        self.assertEqual(self.callbacks.names(), ["session_connect"])
        [connect] = self.callbacks.calls_to(SessionConnectCall)
        session = connect.session
        self.assertEqual(session.remote_host, "198.51.100.7")
        self.assertEqual(len(session.id), 10)

    def test_greeting_deferred_and_async(self) -> None:
        """
        session_connect may return a Deferred or a coroutine.
        """
        d: Deferred[Any] = Deferred()
        h = self.harness(Recorder(session_connect=lambda log, s: d))
        self.assertEqual(h.lines(), [])
        d.callback(Accept("late"))
        self.transcript(h, "< 220 late")
        h = self.harness(Recorder(session_connect=lambda log, s: async_value(Accept("coro"))))
        self.transcript(h, "< 220 coro")

    def test_disconnect(self) -> None:
        """
        Disconnect(reply) sends the reply and closes; without reply, 421.
        """
        h = self.harness(Recorder(session_connect=Disconnect(Reply(554, "5.7.1 go away"))))
        self.transcript(h, "< 554 5.7.1 go away")
        self.assertTrue(h.closed)
        h = self.harness(Recorder(session_connect=Disconnect()))
        self.transcript(h, "< 421 ")
        self.assertTrue(h.closed)

    def test_connect_failure(self) -> None:
        """
        A failing session_connect gives 421, closes, and logs the traceback.
        """
        h = self.harness(Recorder(session_connect=boom))
        self.transcript(h, "< 421 ")
        self.assertTrue(h.closed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_max_sessions(self) -> None:
        """
        Over max_sessions a client gets 421 too many connections; once a
        session ends there is room again.
        """
        h1 = self.harness(max_sessions=1)
        self.transcript(h1, "< 220 ")
        h2 = ServerHarness(factory=h1.factory)
        self.transcript(h2, "< 421 4.7.0 localhost Error: too many connections")
        self.assertTrue(h2.closed)
        h2.disconnect()
        self.assertEqual(h1.factory.sessions, 1)
        h1.disconnect()
        self.assertEqual(h1.factory.sessions, 0)
        h3 = ServerHarness(factory=h1.factory)
        self.transcript(h3, "< 220 ")
        h3.disconnect()


class HeloTests(ServerTestCase):
    def test_ehlo(self) -> None:
        """
        EHLO lists the extensions; no STARTTLS or AUTH by default.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN.split("> MAIL")[0])
        self.assertEqual(h.protocol.session.helo, "client.example")
        self.assertTrue(h.protocol.session.esmtp)
        self.assertIn("PIPELINING", h.protocol.session.advertised_extensions)

    def test_helo(self) -> None:
        """
        HELO answers a single 250 line.
        """
        h = self.harness()
        self.transcript(h, "< 220\n> HELO c.example\n< 250 localhost")
        self.assertFalse(h.protocol.session.esmtp)

    def test_helo_syntax(self) -> None:
        """
        HELO without a name is a syntax error.
        """
        h = self.harness()
        self.transcript(h, "< 220\n> HELO\n< 501 5.5.4\n> EHLO\n< 501 5.5.4")

    def test_starttls_and_auth_advertised(self) -> None:
        """
        STARTTLS is offered with a TLS context; AUTH only when the plugin
        asks and (TLS is active or not required).
        """
        h = self.harness(
            Recorder(session_helo=Continue(advertise_auth=True)), tls_context_factory=object()
        )
        self.transcript(h, "< 220\n> EHLO c\n< 250-localhost\n" + "< 250-\n" * 7 + "< 250 STARTTLS")
        h = self.harness(
            Recorder(session_helo=Continue(advertise_auth=True)), auth_requires_tls=False
        )
        self.transcript(
            h, "< 220\n> EHLO c\n< 250-localhost\n" + "< 250-\n" * 7 + "< 250 AUTH PLAIN LOGIN"
        )

    def test_auth_not_advertised_without_tls(self) -> None:
        """
        With auth_requires_tls (the default) AUTH is not offered in clear
        text and AUTH is refused with 503.
        """
        h = self.harness(Recorder(session_helo=Continue(advertise_auth=True)))
        self.transcript(h, "< 220\n> EHLO c\n< 250-localhost\n" + "< 250-\n" * 6 + "< 250 CHUNKING")
        self.transcript(h, "> AUTH PLAIN AGFsaWNlAHNlY3JldA==\n< 503 5.5.1")

    def test_helo_deny(self) -> None:
        """
        Deny(reply) answers the reply and the session stays open.
        """
        h = self.harness(Recorder(session_helo=Deny(Reply(550, "5.7.1 not you"))))
        self.transcript(
            h,
            "< 220\n> EHLO c\n< 550 5.7.1 not you\n> MAIL FROM:<a@b.c>\n< 503 5.5.1\n> NOOP\n< 250 2.0.0 Ok",
        )
        self.assertFalse(h.closed)

    def test_helo_disconnect(self) -> None:
        """
        Disconnect from session_helo sends its reply (or 421) and closes.
        """
        h = self.harness(Recorder(session_helo=Disconnect(Reply(554, "5.7.1 bye"))))
        self.transcript(h, "< 220\n> EHLO c\n< 554 5.7.1 bye")
        self.assertTrue(h.closed)
        h = self.harness(Recorder(session_helo=lambda log, s, n: async_value(Disconnect())))
        self.transcript(h, "< 220\n> EHLO c\n< 421")
        self.assertTrue(h.closed)

    def test_helo_failure(self) -> None:
        """
        A failing session_helo gives 421 and closes; the traceback is logged.
        """
        h = self.harness(Recorder(session_helo=boom))
        self.transcript(h, "< 220\n> EHLO c\n< 421")
        self.assertTrue(h.closed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SimpleCommandTests(ServerTestCase):
    def test_simple_commands(self) -> None:
        """
        NOOP, HELP, VRFY, RSET, unknown commands, and QUIT.
        """
        h = self.harness()
        self.transcript(
            h,
            """
            < 220
            > NOOP
            < 250 2.0.0 Ok
            > HELP
            < 214
            > VRFY bob
            < 252 2.5.0
            > RSET
            < 250 2.0.0
            > FOO bar
            < 500 5.5.2 Command unrecognized
            > noop
            < 250 2.0.0 Ok
            > QUIT
            < 221 2.0.0 Bye
            """,
        )
        self.assertTrue(h.closed)

    def test_line_too_long(self) -> None:
        """
        A command line over 512 bytes gets 500 and its rest is never run.
        """
        h = self.harness()
        self.transcript(h, "< 220")
        h.send(b"NOOP " + b"x" * 600 + b" QUIT\r\nNOOP\r\n")
        self.assertEqual(h.lines(), ["500 5.5.2 Line too long", "250 2.0.0 Ok"])
        # Split over several writes, the tail of the long line is dropped.
        h.send(b"NOOP " + b"y" * 520)
        h.send(b"y" * 100 + b"\r\nQUIT\r\n")
        self.assertEqual(h.lines(), ["500 5.5.2 Line too long", "221 2.0.0 Bye"])

    def test_line_exactly_512(self) -> None:
        """
        A line of exactly 512 bytes with its CRLF is accepted.
        """
        h = self.harness()
        self.transcript(h, "< 220")
        h.send(b"NOOP " + b"x" * 505 + b"\r\n")
        self.assertEqual(h.lines(), ["250 2.0.0 Ok"])

    def test_bare_cr(self) -> None:
        """
        A bare CR in a command line is refused.
        """
        h = self.harness()
        self.transcript(h, "< 220")
        h.send(b"NOOP\rQUIT\r\nNOOP\r\n")
        self.assertEqual(h.lines(), ["500 5.5.2 Bare CR not allowed in commands", "250 2.0.0 Ok"])

    def test_bare_lf_command(self) -> None:
        """
        A command ended by a bare LF is accepted.
        """
        h = self.harness()
        self.transcript(h, "< 220")
        h.send(b"NOOP\n")
        self.assertEqual(h.lines(), ["250 2.0.0 Ok"])


class MailTests(ServerTestCase):
    def test_mail_before_helo(self) -> None:
        """
        MAIL before HELO/EHLO is a bad sequence.
        """
        h = self.harness()
        self.transcript(h, "< 220\n> MAIL FROM:<a@b.c>\n< 503 5.5.1")

    def test_mail_syntax(self) -> None:
        """
        Bad MAIL syntax, addresses and parameters get clear errors.
        """
        h = self.harness()
        self.transcript(
            h,
            """
            < 220
            > EHLO c
            < 250-
            < 250-
            < 250-
            < 250-
            < 250-
            < 250-
            < 250-SMTPUTF8
            < 250 CHUNKING
            > MAIL TO:<a@b.c>
            < 501 5.5.4 Syntax: MAIL FROM
            > MAIL FROM:<not an address>
            < 553 5.1.7 Bad sender address syntax
            > MAIL FROM:<a@b.c> FOO=1
            < 555 5.5.4 Unsupported parameter FOO
            > MAIL FROM:<a@b.c> SIZE=abc
            < 501 5.5.4
            > MAIL FROM:<a@b.c> SIZE=35000001
            < 552 5.3.4
            > MAIL FROM:<rené@b.c>
            < 553 5.1.7
            > MAIL FROM: <rené@b.c> SMTPUTF8 SIZE=100 BODY=8BITMIME
            < 250 2.1.0 Ok
            > MAIL FROM:<>
            < 503 5.5.1 Error: nested MAIL
            > RSET
            < 250
            > MAIL FROM:<>
            < 250 2.1.0 Ok
            """,
        )
        sender_calls = self.callbacks.calls_to(ProcessSenderCall)
        self.assertEqual(str(sender_calls[0].sender), "rené@b.c")
        self.assertEqual(
            [str(a) for a in sender_calls[0].sender_args], ["SMTPUTF8", "SIZE=100", "BODY=8BITMIME"]
        )
        self.assertTrue(sender_calls[1].sender.is_null)

    def test_sender_reject(self) -> None:
        """
        Reject(reply) from process_sender answers the reply; no transaction.
        """
        h = self.harness(Recorder(process_sender=Reject(Reply(550, "5.7.1 no"))))
        self.transcript(
            h,
            "< 220\n> HELO c\n< 250\n> MAIL FROM:<a@b.c>\n< 550 5.7.1 no\n> RCPT TO:<x@y.z>\n< 503",
        )

    def test_sender_variants(self) -> None:
        """
        process_sender may return a Deferred or a coroutine; failure is 451.
        """
        h = self.harness(Recorder(process_sender=lambda *a: defer.succeed(Continue())))
        self.transcript(h, "< 220\n> HELO c\n< 250\n> MAIL FROM:<a@b.c>\n< 250 2.1.0")
        h = self.harness(Recorder(process_sender=lambda *a: async_value(Continue())))
        self.transcript(h, "< 220\n> HELO c\n< 250\n> MAIL FROM:<a@b.c>\n< 250 2.1.0")
        h = self.harness(Recorder(process_sender=boom))
        self.transcript(
            h, "< 220\n> HELO c\n< 250\n> MAIL FROM:<a@b.c>\n< 451 4.3.0\n> NOOP\n< 250"
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RcptTests(ServerTestCase):
    def test_rcpt_before_mail(self) -> None:
        """
        RCPT before MAIL is a bad sequence.
        """
        h = self.harness()
        self.transcript(h, "< 220\n> HELO c\n< 250\n> RCPT TO:<a@b.c>\n< 503 5.5.1")

    def test_rcpt_syntax_and_postmaster(self) -> None:
        """
        Bad recipients and parameters are refused; Postmaster is accepted.
        """
        h = self.harness()
        self.transcript(
            h,
            """
            < 220
            > HELO c
            < 250
            > MAIL FROM:<a@b.c>
            < 250
            > RCPT FROM:<a@b.c>
            < 501 5.5.4
            > RCPT TO:<bad>
            < 553 5.1.3
            > RCPT TO:<x@y.z> FOO
            < 555
            > RCPT TO:<Postmaster>
            < 250 2.1.5 Ok
            > RCPT TO:<x@y.z> NOTIFY=SUCCESS,FAILURE
            < 250 2.1.5 Ok
            """,
        )
        self.assertEqual(h.protocol.mail.transaction.recipient_args[1][1][0].keyword, "NOTIFY")

    def test_rcpt_reject_goes_on(self) -> None:
        """
        A rejected recipient is left out and recorded; the envelope goes on.
        """

        def policy(log: Any, session: Any, sender: Any, args: Any, rcpt: Any) -> Any:
            if rcpt.domain == "bad.example":
                return Reject(Reply(550, "5.7.1 relaying denied"))
            return Continue()

        h = self.harness(Recorder(process_recipient=policy))
        self.transcript(
            h,
            """
            < 220
            > HELO c
            < 250
            > MAIL FROM:<a@b.c>
            < 250
            > RCPT TO:<x@bad.example>
            < 550 5.7.1 relaying denied
            > RCPT TO:<y@good.example>
            < 250 2.1.5
            > DATA
            < 354
            """,
        )
        h.send(MESSAGE)
        self.transcript(h, "< 250 2.0.0 Ok: queued as")
        envelope = self.callbacks.calls_to(ProcessEnvelopeCall)[-1].envelope
        self.assertEqual([str(r) for r in envelope.recipients], ["y@good.example"])
        self.assertEqual([str(r) for r in envelope.rejected_recipients], ["x@bad.example"])

    def test_too_many_recipients(self) -> None:
        """
        Past max_recipients RCPT gets 452 4.5.3.
        """
        h = self.harness(max_recipients=2)
        self.transcript(
            h,
            """
            < 220
            > HELO c
            < 250
            > MAIL FROM:<a@b.c>
            < 250
            > RCPT TO:<x1@y.z>
            < 250
            > RCPT TO:<x2@y.z>
            < 250
            > RCPT TO:<x3@y.z>
            < 452 4.5.3 Too many recipients
            """,
        )

    def test_rcpt_failure(self) -> None:
        """
        A failing process_recipient gives 451 and the session goes on.
        """
        h = self.harness(Recorder(process_recipient=boom))
        self.transcript(
            h,
            "< 220\n> HELO c\n< 250\n> MAIL FROM:<a@b.c>\n< 250\n> RCPT TO:<x@y.z>\n< 451 4.3.0\n> NOOP\n< 250",
        )
        self.flushLoggedErrors(RuntimeError)


class DataTests(ServerTestCase):
    def test_data_before_mail(self) -> None:
        """
        DATA before MAIL is 503; DATA with no accepted recipient is 554.
        """
        h = self.harness(Recorder(process_recipient=Reject(Reply(550, "5.1.1 no"))))
        self.transcript(
            h,
            """
            < 220
            > HELO c
            < 250
            > DATA
            < 503 5.5.1
            > MAIL FROM:<a@b.c>
            < 250
            > RCPT TO:<x@y.z>
            < 550
            > DATA
            < 554 5.5.1 No valid recipients
            """,
        )

    def test_send(self) -> None:
        """
        A message is spooled with a Received header and acknowledged with
        its envelope id; the transaction then resets.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE)
        envelope = self.callbacks.calls_to(ProcessEnvelopeCall)[-1].envelope
        self.transcript(h, f"< 250 2.0.0 Ok: queued as {envelope.id}")
        [entry] = self.entries(h)
        self.assertEqual(entry.envelope_id, envelope.id)
        self.assertEqual(entry.received_from, "client.example [198.51.100.7]")
        [data] = self.message_data(h)
        self.assertTrue(data.startswith(b"Received: from client.example ([198.51.100.7])\r\n"))
        self.assertIn(f"with ESMTP id {envelope.id}".encode(), data)
        self.assertIn(b"for <b@example.com>", data)
        self.assertTrue(data.endswith(b"\r\n\r\nhello\r\n"))
        self.assertEqual(envelope.header("Subject"), "hi")
        self.assertEqual(len(envelope.header_values("Received")), 1)
        self.assertIsNone(h.protocol.mail.transaction)
        self.transcript(h, "> RCPT TO:<x@y.z>\n< 503")

    def test_canonical(self) -> None:
        """
        A message received with DATA is stored canonical (bare LFs made
        CRLF), and its entry says so, unless it holds a lone CR; and dot
        free (it needs no stuffing to go out) unless a line began with a
        dot.
        """
        for body, canonical, dot_free in [
            ("Subject: hi\r\n\r\nbare\nlf\r\n.\r\n", True, True),
            ("Subject: hi\r\n\r\nlone\rcr\r\n.\r\n", False, False),
            ("Subject: hi\r\n\r\n..dot\r\n.\r\n", True, False),
        ]:
            h = self.harness()
            self.transcript(h, MAIL_TXN)
            h.send(body)
            self.transcript(h, "< 250 2.0.0 Ok: queued")
            [entry] = self.entries(h)
            message = self.callbacks.calls_to(ProcessEnvelopeCall)[-1].envelope.message
            self.assertEqual((message.canonical, entry.message_canonical), (canonical,) * 2)
            self.assertEqual((message.dot_free, entry.message_dot_free), (dot_free,) * 2)
            h.disconnect()

    def test_consume(self) -> None:
        """
        Consume(ok) answers 250 2.0.0 ok and discards the message.
        """
        h = self.harness(Recorder(process_envelope=Consume("done")))
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE)
        self.transcript(h, "< 250 2.0.0 done")
        self.assertEqual(self.entries(h), [])
        self.assertEqual(len(h.spool.discarded), 1)

    def test_reject(self) -> None:
        """
        Reject(reply) answers the reply and discards the message.
        """
        h = self.harness(
            Recorder(process_envelope=lambda log, s, e: async_value(Reject(Reply(554, "5.7.1 spam"))))
        )
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE)
        self.transcript(h, "< 554 5.7.1 spam")
        self.assertEqual(self.entries(h), [])
        self.assertEqual(len(h.spool.discarded), 1)

    def test_quarantine(self) -> None:
        """
        Quarantine stores the envelopes with the reason and answers the reply.
        """
        h = self.harness(
            Recorder(
                process_envelope=lambda log, s, e: Quarantine(
                    [EnvelopeWithNextHop(e)], Reply(250, "2.0.0 held"), "looks odd"
                )
            )
        )
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE)
        self.transcript(h, "< 250 2.0.0 held")
        [entry] = self.entries(h)
        self.assertEqual((entry.queue, entry.reason), ("quarantine", "looks odd"))

    def test_envelope_failure(self) -> None:
        """
        A failing process_envelope gives 451, nothing is spooled, and the
        session goes on.
        """
        h = self.harness(Recorder(process_envelope=boom))
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE)
        self.transcript(h, "< 451 4.3.0\n> NOOP\n< 250")
        self.assertEqual(self.entries(h), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_spool_full(self) -> None:
        """
        ENOSPC from the spool is 452 4.3.1; nothing is in the spool.
        """
        h = self.harness()
        h.spool.fail_next_write = OSError(errno.ENOSPC, "No space left on device")
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE)
        self.transcript(h, "< 452 4.3.1 Insufficient system storage")
        self.assertEqual(self.entries(h), [])
        self.flushLoggedErrors(OSError)

    def test_spool_failure(self) -> None:
        """
        Another spool failure is 451 4.3.0; the next message goes through.
        """
        h = self.harness()
        h.spool.fail_next_write = RuntimeError("disk on fire")
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE)
        self.transcript(h, "< 451 4.3.0")
        self.assertEqual(self.entries(h), [])
        self.flushLoggedErrors(RuntimeError)
        self.transcript(h, "> MAIL FROM:<a@b.c>\n< 250\n> RCPT TO:<x@y.z>\n< 250\n> DATA\n< 354")
        h.send(MESSAGE)
        self.transcript(h, "< 250 2.0.0 Ok: queued")
        self.assertEqual(len(self.entries(h)), 1)

    def test_size_after_data(self) -> None:
        """
        A message over max_message_size is refused after the end of data.
        """
        h = self.harness(max_message_size=1000)
        self.transcript(h, MAIL_TXN.replace("< 250-SIZE", "< 250-SIZE 1000"))
        h.send("Subject: x\r\n\r\n" + ("y" * 100 + "\r\n") * 20)
        self.assertEqual(h.lines(), [])
        h.send(".\r\nNOOP\r\n")
        self.transcript(h, "< 552 5.3.4 Message size exceeds fixed limit\n< 250 2.0.0 Ok")
        self.assertEqual(self.entries(h), [])
        self.assertTrue(h.spool.writers[0].aborted)

    def test_received_loop(self) -> None:
        """
        More than 50 Received headers is a mail loop.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        h.send("Received: from x by y; date\r\n" * 50 + "\r\nbody\r\n.\r\n")
        self.transcript(h, "< 554 5.4.6 Too many Received headers: mail loop")
        self.assertEqual(self.entries(h), [])
        h2 = self.harness()
        self.transcript(h2, MAIL_TXN)
        h2.send("Received: from x by y; date\r\n" * 49 + "\r\nbody\r\n.\r\n")
        self.transcript(h2, "< 250 2.0.0 Ok: queued")

    def test_bare_lf_rejected(self) -> None:
        """
        With reject_bare_lf a message with a bare LF is refused after data.
        """
        h = self.harness(reject_bare_lf=True)
        self.transcript(h, MAIL_TXN)
        h.send("Subject: x\r\n\r\nline\nline\r\n.\r\n")
        self.transcript(h, "< 550 5.6.2 Bare LF not allowed")
        self.assertEqual(self.entries(h), [])

    def test_bare_lf_normalized(self) -> None:
        """
        Without reject_bare_lf a bare LF becomes CRLF.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        h.send("Subject: x\r\n\r\nline\nline\r\n.\r\n")
        self.transcript(h, "< 250 2.0.0 Ok: queued")
        [data] = self.message_data(h)
        self.assertTrue(data.endswith(b"\r\n\r\nline\r\nline\r\n"))

    def test_rset_aborts(self) -> None:
        """
        RSET ends the transaction.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN.split("> DATA")[0] + "> RSET\n< 250 2.0.0\n> DATA\n< 503")

    def test_smuggling(self) -> None:
        """
        A smuggling sequence inside the data never ends it: the commands
        after it are message text and exactly one message is spooled.
        """
        for seq in [
            b"\n.\n",
            b"\r.\r",
            b"\r.\n",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r\n\x00.\r\n",
        ]:
            h = self.harness()
            self.transcript(h, MAIL_TXN)
            h.send(
                b"Subject: x\r\n\r\nbody"
                + seq
                + b"MAIL FROM:<evil@x.y>\r\nRCPT TO:<victim@y.z>\r\nDATA\r\nSmuggled\r\n.\r\n"
            )
            self.transcript(h, "< 250 2.0.0 Ok: queued")
            self.assertEqual(len(self.entries(h)), 1, seq)
            [data] = self.message_data(h)
            self.assertIn(b"MAIL FROM:<evil@x.y>", data)
            self.assertEqual(self.callbacks.names().count("process_sender"), 1, seq)

    def test_long_body_line(self) -> None:
        """
        A body line over 16 KiB followed by command text is all message;
        the commands after the end marker run.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        h.send(b"Subject: x\r\n\r\n" + b"z" * 20000 + b"MAIL FROM:<e@x.y>\r\n.\r\nNOOP\r\n")
        self.transcript(h, "< 250 2.0.0 Ok: queued\n< 250 2.0.0 Ok")
        [data] = self.message_data(h)
        self.assertTrue(data.endswith(b"z" * 20000 + b"MAIL FROM:<e@x.y>\r\n"))

    def test_pipelined_after_data(self) -> None:
        """
        Commands sent right after the end marker in the same write are run.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE + "MAIL FROM:<c@d.e>\r\nRCPT TO:<f@g.h>\r\nDATA\r\n" + MESSAGE + "QUIT\r\n")
        self.transcript(
            h,
            "< 250 2.0.0 Ok: queued\n< 250 2.1.0\n< 250 2.1.5\n< 354\n< 250 2.0.0 Ok: queued\n< 221",
        )
        self.assertEqual(len(self.entries(h)), 2)

    def test_backpressure(self) -> None:
        """
        When the writer asks to stop, the transport is paused until the
        writer drains.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        writer = h.spool.writers[0]
        drained: Deferred[None] = Deferred()
        writer.write = lambda data: True  # type: ignore[method-assign]
        writer.drained = lambda: drained  # type: ignore[method-assign]
        h.send("Subject: x\r\n\r\nmore\r\n")
        self.assertEqual(h.transport.producerState, "paused")
        drained.callback(None)
        self.assertEqual(h.transport.producerState, "producing")

    def test_log_fields(self) -> None:
        """
        The plugin's logger stamps session_id, and envelope_id once there is
        one, on its events.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def log_it(log: Logger, session: Any, envelope: Any) -> Any:
            log.info("plugin says hi")
            return Consume()

        h = self.harness(Recorder(process_envelope=log_it))
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE)
        self.transcript(h, "< 250")
        [event] = [e for e in events if e.get("log_format", "").endswith("plugin says hi")]
        envelope = self.callbacks.calls_to(ProcessEnvelopeCall)[-1].envelope
        self.assertEqual(
            formatEvent(event),
            f"[session_id={h.protocol.session.id} envelope_id={envelope.id}] plugin says hi",
        )
        self.assertEqual(event["session_id"], h.protocol.session.id)
        self.assertEqual(event["envelope_id"], envelope.id)


class PipeliningTests(ServerTestCase):
    def test_slow_callbacks_in_order(self) -> None:
        """
        With callbacks pending, later commands wait and replies go out in
        command order even when the Deferreds fire out of order.
        """
        pending: list[Deferred[Any]] = []

        def slow(*args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

        h = self.harness(Recorder(process_sender=slow, process_recipient=slow))
        self.transcript(h, "< 220\n> EHLO c" + "\n< 250" * 8)
        h.send("MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nRCPT TO:<w@y.z>\r\nNOOP\r\n")
        self.assertEqual(h.lines(), [])
        self.assertEqual(len(pending), 1)
        pending[0].callback(Continue())
        self.assertEqual(h.lines(), ["250 2.1.0 Ok"])
        self.assertEqual(len(pending), 2)
        pending[1].callback(Reject(Reply(550, "5.1.1 no such user")))
        self.assertEqual(h.lines(), ["550 5.1.1 no such user"])
        pending[2].callback(Continue())
        self.assertEqual(h.lines(), ["250 2.1.5 Ok", "250 2.0.0 Ok"])

    def test_out_of_order_fire(self) -> None:
        """
        A Deferred created for a later command cannot exist before the
        earlier one fires: the server calls callbacks strictly in order.
        """
        pending: list[Deferred[Any]] = []

        def slow(*args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

        h = self.harness(Recorder(process_recipient=slow))
        self.transcript(h, "< 220\n> HELO c\n< 250\n> MAIL FROM:<a@b.c>\n< 250")
        h.send("RCPT TO:<x1@y.z>\r\nRCPT TO:<x2@y.z>\r\nDATA\r\n")
        self.assertEqual(len(pending), 1)
        pending[0].callback(Reject(Reply(550, "5.1.1 no")))
        self.assertEqual(len(pending), 2)
        pending[1].callback(Continue())
        self.assertEqual(
            h.lines(), ["550 5.1.1 no", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
        )


class TimeoutTests(ServerTestCase):
    def test_idle_timeout(self) -> None:
        """
        No bytes for idle_timeout: 421 4.4.2 and close.
        """
        h = self.harness(idle_timeout=10)
        self.transcript(h, "< 220")
        h.clock.advance(9)
        h.send("NOOP\r\n")
        h.clock.advance(9)
        self.assertFalse(h.closed)
        h.clock.advance(1)
        self.transcript(h, "< 250\n< 421 4.4.2 localhost Error: timeout exceeded")
        self.assertTrue(h.closed)

    def test_idle_paused_while_callback_pending(self) -> None:
        """
        The idle timeout measures the client's silence: a plugin callback
        slower than idle_timeout does not end the session, and the timer
        starts again once the reply is sent.
        """
        pending: list[Deferred[Any]] = []

        def slow(*args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d

        h = self.harness(Recorder(process_sender=slow), idle_timeout=10)
        self.transcript(h, "< 220\n> EHLO c" + "\n< 250" * 8 + "\n> MAIL FROM:<a@b.c>")
        h.clock.advance(60)
        self.assertFalse(h.closed)
        pending[0].callback(Continue())
        self.transcript(h, "< 250 2.1.0 Ok")
        h.clock.advance(9)
        self.assertFalse(h.closed)
        h.clock.advance(1)
        self.transcript(h, "< 421 4.4.2")
        self.assertTrue(h.closed)

    def test_command_deadline(self) -> None:
        """
        A command line dripped slowly closes the session at the deadline.
        """
        h = self.harness(idle_timeout=10, command_deadline=30)
        self.transcript(h, "< 220")
        for c in b"NOOP NOOP NOOP":
            h.send(bytes([c]))
            h.clock.advance(5)
            if h.closed:
                break
        self.transcript(h, "< 421 4.4.2 localhost Error: timeout exceeded")
        self.assertTrue(h.closed)

    def test_data_deadline(self) -> None:
        """
        A DATA phase longer than the deadline closes the session and the
        message is dropped.
        """
        h = self.harness(idle_timeout=10, command_deadline=30)
        self.transcript(h, MAIL_TXN)
        for _ in range(7):
            h.send("line\r\n")
            h.clock.advance(5)
        self.transcript(h, "< 421 4.4.2")
        self.assertTrue(h.closed)
        self.assertTrue(h.spool.writers[0].aborted)

    def test_timers_cancelled(self) -> None:
        """
        connectionLost cancels the timers and the session count goes down.
        """
        h = self.harness()
        self.transcript(h, "< 220")
        h.send("NO")
        h.disconnect()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.factory.sessions, 0)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class AuthTests(ServerTestCase):
    def auth_harness(self, **results: Any) -> ServerHarness:
        h = self.harness(
            Recorder(session_helo=Continue(advertise_auth=True), **results), auth_requires_tls=False
        )
        self.transcript(h, "< 220\n> EHLO c" + "\n< 250" * 9)
        return h

    def test_plain_allowed(self) -> None:
        """
        AUTH PLAIN with an initial response, allowed.
        """
        h = self.auth_harness()
        self.transcript(
            h,
            f"> AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'secret')}\n< 235 2.7.0 Authentication successful",
        )
        self.assertEqual(h.protocol.session.authenticated, "alice")
        self.transcript(h, "> AUTH PLAIN\n< 503 5.5.1")

    def test_plain_challenge_denied(self) -> None:
        """
        AUTH PLAIN without initial response, wrong password.
        """
        h = self.auth_harness()
        self.transcript(
            h,
            f"> AUTH PLAIN\n< 334\n> {b64(chr(0) + 'alice' + chr(0) + 'nope')}\n< 535 5.7.8 Authentication credentials invalid",
        )
        self.assertIsNone(h.protocol.session.authenticated)

    def test_login(self) -> None:
        """
        AUTH LOGIN, with and without the initial response.
        """
        h = self.auth_harness()
        self.transcript(
            h,
            f"> AUTH LOGIN\n< 334 VXNlcm5hbWU6\n> {b64('alice')}\n< 334 UGFzc3dvcmQ6\n> {b64('bad')}\n< 535 5.7.8",
        )
        self.transcript(
            h, f"> AUTH LOGIN {b64('alice')}\n< 334 UGFzc3dvcmQ6\n> {b64('secret')}\n< 235 2.7.0"
        )
        self.assertEqual(h.protocol.session.authenticated, "alice")

    def test_auth_async(self) -> None:
        """
        check_authentication_credentials may be a coroutine; a failure gives 454.
        """
        h = self.auth_harness(check_authentication_credentials=lambda log, u, p: async_value(Allow()))
        self.transcript(h, f"> AUTH PLAIN {b64(chr(0) + 'x' + chr(0) + 'y')}\n< 235")
        h = self.auth_harness(check_authentication_credentials=boom)
        self.transcript(
            h, f"> AUTH PLAIN {b64(chr(0) + 'x' + chr(0) + 'y')}\n< 454 4.7.0\n> NOOP\n< 250"
        )
        self.flushLoggedErrors(RuntimeError)

    def test_auth_errors(self) -> None:
        """
        Bad base64 is 501 5.5.2, '*' cancels with 501, unknown mechanism is
        504, AUTH during a transaction is 503.
        """
        h = self.auth_harness()
        self.transcript(
            h,
            """
            > AUTH PLAIN !!!notbase64
            < 501 5.5.2
            > AUTH LOGIN
            < 334
            > *
            < 501
            > AUTH CRAM-MD5
            < 504
            > MAIL FROM:<a@b.c>
            < 250
            > AUTH PLAIN AGFsaWNlAHNlY3JldA==
            < 503
            """,
        )
        self.assertNotIn("check_authentication_credentials", self.callbacks.names())

    def test_auth_not_offered(self) -> None:
        """
        AUTH when not advertised, or after HELO, is 503 5.5.1.
        """
        h = self.harness(auth_requires_tls=False)
        self.transcript(
            h,
            "< 220\n> EHLO c" + "\n< 250" * 8 + "\n> AUTH PLAIN AGFsaWNlAHNlY3JldA==\n< 503 5.5.1",
        )
        h = self.harness(
            Recorder(session_helo=Continue(advertise_auth=True)), auth_requires_tls=False
        )
        self.transcript(h, "< 220\n> HELO c\n< 250\n> AUTH PLAIN AGFsaWNlAHNlY3JldA==\n< 503 5.5.1")

    def test_received_esmtpa(self) -> None:
        """
        An authenticated session's Received header says ESMTPA.
        """
        h = self.auth_harness()
        self.transcript(h, f"> AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'secret')}\n< 235")
        self.transcript(h, "> MAIL FROM:<a@b.c>\n< 250\n> RCPT TO:<x@y.z>\n< 250\n> DATA\n< 354")
        h.send(MESSAGE)
        self.transcript(h, "< 250 2.0.0 Ok: queued")
        [data] = self.message_data(h)
        self.assertIn(b"with ESMTPA", data)


class StartTLSTests(ServerTestCase):
    def test_injection(self) -> None:
        """
        Commands sent with STARTTLS before the handshake are discarded
        (RFC 3207 4.2) and the session state is reset.
        """
        ctx = object()
        h = self.harness(
            Recorder(session_helo=Continue(advertise_auth=True)), tls_context_factory=ctx
        )
        self.transcript(h, "< 220\n> EHLO c" + "\n< 250" * 9)
        h.send("STARTTLS\r\nEHLO injected\r\nMAIL FROM:<evil@x.y>\r\n")
        self.transcript(h, "< 220 2.0.0 Ready to start TLS")
        self.assertIs(h.transport.tls_context, ctx)
        self.assertNotIn("injected", [c.helo for c in self.callbacks.calls_to(SessionHeloCall)])
        self.assertNotIn("process_sender", self.callbacks.names())
        session = h.protocol.session
        self.assertIsNone(session.helo)
        self.assertIsNotNone(session.tls)
        self.transcript(h, "> MAIL FROM:<a@b.c>\n< 503 5.5.1")
        # After TLS: no STARTTLS offered, AUTH offered.
        self.transcript(
            h, "> EHLO c\n< 250-localhost" + "\n< 250-" * 7 + "\n< 250 AUTH PLAIN LOGIN"
        )
        self.transcript(h, "> STARTTLS\n< 503 5.5.1")
        h.send("MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n" + MESSAGE)
        self.transcript(h, "< 250\n< 250\n< 354\n< 250 2.0.0 Ok: queued")
        [data] = self.message_data(h)
        self.assertIn(b"with ESMTPS", data)

    def test_starttls_errors(self) -> None:
        """
        STARTTLS not offered is 502; with an argument 501.
        """
        h = self.harness()
        self.transcript(h, "< 220\n> EHLO c" + "\n< 250" * 8 + "\n> STARTTLS\n< 454 4.7.0")
        h = self.harness(tls_context_factory=object())
        self.transcript(h, "< 220\n> EHLO c" + "\n< 250" * 9 + "\n> STARTTLS now\n< 501")


class BatchTests(ServerTestCase):
    def test_long_pipelined_batch(self) -> None:
        """
        A thousand pipelined RCPTs in one write are all answered, in order,
        without exhausting the stack.
        """
        h = self.harness(max_recipients=1000)
        self.transcript(h, "< 220\n> HELO c\n< 250\n> MAIL FROM:<a@b.c>\n< 250")
        h.send("".join(f"RCPT TO:<r{i}@y.z>\r\n" for i in range(1001)) + "DATA\r\n")
        lines = h.lines()
        self.assertEqual(lines[:1000], ["250 2.1.5 Ok"] * 1000)
        self.assertEqual(
            lines[1000:], ["452 4.5.3 Too many recipients", "354 End data with <CR><LF>.<CR><LF>"]
        )


class RealTLSTests(TestCase):
    """
    A real STARTTLS handshake over loopback TCP (the only test that uses
    the reactor; the server itself is still given it as its clock).
    """

    def test_starttls_handshake(self) -> Any:
        """
        A client upgrades with STARTTLS, sends a message, and the server
        records the negotiated cipher in the session and Received header.
        """
        from twisted.internet import reactor, ssl
        from twisted.internet.protocol import ClientFactory, Protocol

        key = ssl.KeyPair.generate(size=2048)
        cert = key.selfSignedCert(1, CN="localhost")
        server_ctx = ssl.PrivateCertificate.fromCertificateAndKeyPair(cert, key).options()
        # The test only needs the handshake, not certificate verification.
        client_ctx = ssl.CertificateOptions()

        callbacks = Recorder()
        spool = MemorySpool()
        factory = SMTPServerFactory(
            callbacks=callbacks, spool=spool, clock=reactor, tls_context_factory=server_ctx
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        done: Deferred[list[str]] = Deferred()

        class Client(Protocol):
            def connectionMade(self) -> None:
                self.buf = b""
                self.lines: list[str] = []
                self.step = 0

            def dataReceived(self, data: bytes) -> None:
                self.buf += data
                while b"\r\n" in self.buf:
                    line, self.buf = self.buf.split(b"\r\n", 1)
                    self.lines.append(line.decode())
                    if line[3:4] == b" ":
                        self.reply(line.decode())

            def reply(self, line: str) -> None:
                self.step += 1
                if self.step == 1:
                    self.transport.write(b"EHLO client.example\r\n")
                elif self.step == 2:
                    self.transport.write(b"STARTTLS\r\n")
                elif self.step == 3:
                    self.transport.startTLS(client_ctx)
                    self.transport.write(
                        b"EHLO client.example\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n"
                    )
                elif self.step == 7:
                    self.transport.write(MESSAGE.encode() + b"QUIT\r\n")

            def connectionLost(self, reason: Any) -> None:
                done.callback(self.lines)

        cf = ClientFactory.forProtocol(Client)
        reactor.connectTCP("127.0.0.1", port.getHost().port, cf)  # type: ignore[attr-defined]

        def check(lines: list[str]) -> None:
            self.assertIn("250 STARTTLS", lines)
            self.assertIn("220 2.0.0 Ready to start TLS", lines)
            after = lines[lines.index("220 2.0.0 Ready to start TLS") + 1 :]
            self.assertFalse([x for x in after if "STARTTLS" in x], after)
            self.assertTrue(any(x.startswith("250 2.0.0 Ok: queued as") for x in after), after)
            self.assertEqual(after[-1], "221 2.0.0 Bye")
            [data] = [m.data for m in spool.messages_by_id.values()]
            self.assertIn(b"with ESMTPS", data)
            self.assertIn(b"TLSv1.", data)
            session = callbacks.calls_to(ProcessEnvelopeCall)[-1].session
            self.assertIsNotNone(session.tls)
            self.assertNotEqual(session.tls.cipher, "unknown")

        return done.addCallback(check)


class AsyncPolicy(TestPolicy):
    """
    L{TestPolicy} with every callback written as C{async def}.
    """

    async def session_connect(self, log: Logger, session: Session) -> ConnectResult:  # type: ignore[override]
        return TestPolicy.session_connect(self, log, session)

    async def session_helo(self, log: Logger, session: Session, helo: str) -> HeloResult:
        return Continue()

    async def process_sender(self, log: Logger, session: Session, sender: Any, args: Any) -> SenderResult:
        return Continue()

    async def process_recipient(
        self, log: Logger, session: Session, sender: Any, args: Any, rcpt: Any
    ) -> RecipientResult:
        return Continue()

    async def process_envelope(self, log: Logger, session: Session, envelope: Envelope) -> EnvelopeResult:  # type: ignore[override]
        return TestPolicy.process_envelope(self, log, session, envelope)


class DeferredPolicy(TestPolicy):
    """
    L{TestPolicy} with every callback returning an (already fired) Deferred.
    """

    def session_connect(self, log: Logger, session: Session) -> Deferred[ConnectResult]:  # type: ignore[override]
        return defer.succeed(TestPolicy.session_connect(self, log, session))

    def session_helo(self, log: Logger, session: Session, helo: str) -> Deferred[HeloResult]:
        return defer.succeed(Continue())

    def process_sender(self, log: Logger, session: Session, sender: Any, args: Any) -> Deferred[SenderResult]:
        return defer.succeed(Continue())

    def process_recipient(
        self, log: Logger, session: Session, sender: Any, args: Any, rcpt: Any
    ) -> Deferred[RecipientResult]:
        return defer.succeed(Continue())

    def process_envelope(self, log: Logger, session: Session, envelope: Envelope) -> Deferred[EnvelopeResult]:  # type: ignore[override]
        return defer.succeed(TestPolicy.process_envelope(self, log, session, envelope))


class VariantTests(ServerTestCase):
    def test_async_and_deferred_callbacks(self) -> None:
        """
        A whole transaction works with async def callbacks and with
        Deferred-returning callbacks.
        """
        for policy in (AsyncPolicy(), DeferredPolicy()):
            h = self.harness(Recorder(policy))
            self.transcript(h, MAIL_TXN)
            h.send(MESSAGE)
            self.transcript(h, "< 250 2.0.0 Ok: queued")
            self.assertEqual(len(self.entries(h)), 1)

    def test_simple_plugin(self) -> None:
        """
        The default Simple plugin accepts and spools a message.
        """
        from relay.simple import Simple

        h = self.harness(Simple())
        self.transcript(h, MAIL_TXN.replace("< 220 test.example", "< 220 localhost"))
        h.send(MESSAGE)
        self.transcript(h, "< 250 2.0.0 Ok: queued")

    def test_disconnect_during_envelope(self) -> None:
        """
        If the client goes away while process_envelope is pending, the
        message is discarded, not spooled.
        """
        d: Deferred[Any] = Deferred()
        h = self.harness(Recorder(process_envelope=lambda log, s, e: d))
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE)
        h.disconnect()
        envelope = self.callbacks.calls_to(ProcessEnvelopeCall)[-1].envelope
        d.callback(Send([EnvelopeWithNextHop(envelope)]))
        self.assertEqual(self.entries(h), [])
        self.assertEqual(len(h.spool.discarded), 1)
        self.assertEqual(h.factory.sessions, 0)

    def test_writer_failure(self) -> None:
        """
        A writer that raises makes the message fail with 451 after the end
        of data, and the session goes on.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)

        def broken(data: bytes) -> bool:
            raise RuntimeError("write failed")

        h.spool.writers[0].write = broken  # type: ignore[method-assign]
        h.send(MESSAGE + "NOOP\r\n")
        self.transcript(h, "< 451 4.3.0\n< 250 2.0.0 Ok")
        self.assertEqual(self.entries(h), [])
        self.flushLoggedErrors(RuntimeError)


class HalfCloseTests(ServerTestCase):
    """
    A client that shuts down its sending side after its last command (as
    Exim does after pipelining QUIT) still gets every reply.
    """

    def test_pipelined_then_shut_down(self) -> None:
        """
        The message and QUIT, then the client's end of input: the message
        is queued and both replies are sent, then the connection closes.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE + "QUIT\r\n")
        h.protocol.readConnectionLost()
        self.transcript(h, "< 250 2.0.0 Ok: queued\n< 221 2.0.0 Bye")
        self.assertTrue(h.closed)
        self.assertEqual(len(self.entries(h)), 1)

    def test_shut_down_while_a_callback_waits(self) -> None:
        """
        The end of input while a callback is pending: the commands after it
        are answered once it fires, then the session closes (no QUIT
        needed).
        """
        envelope: Deferred[EnvelopeResult] = Deferred()
        h = self.harness(Recorder(process_envelope=lambda *args: envelope))
        self.transcript(h, MAIL_TXN)
        h.send(MESSAGE + "NOOP\r\n")
        h.protocol.readConnectionLost()
        self.assertFalse(h.closed)
        envelope.callback(Consume())
        self.transcript(h, "< 250 2.0.0 Ok\n< 250 2.0.0 Ok")
        self.assertTrue(h.closed)

    def test_shut_down_mid_message(self) -> None:
        """
        The end of input in the middle of DATA: the message can never end,
        so it is dropped and the session closed.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        h.send("Subject: half\r\n")
        h.protocol.readConnectionLost()
        self.assertTrue(h.closed)
        self.assertTrue(h.spool.writers[0].aborted)
        self.assertEqual(self.entries(h), [])


class DrainTests(ServerTestCase):
    """
    A draining server (a stopping receiver) lets a transaction under way
    finish and ends each session with 421 once it is between transactions.
    """

    def test_idle_session_ends(self) -> None:
        """
        A session waiting for a command between transactions gets 421 at
        once.
        """
        h = self.harness()
        script = MAIL_TXN.split("> MAIL")[0]
        self.transcript(h, script)
        h.protocol.factory.drain()
        self.transcript(h, "< 421 4.3.2 localhost Service shutting down")
        self.assertTrue(h.closed)

    def test_transaction_finishes(self) -> None:
        """
        Draining in the middle of a message: the message is spooled and
        acknowledged, then the session gets 421 without waiting for the
        client's next command.
        """
        h = self.harness()
        self.transcript(h, MAIL_TXN)
        h.protocol.factory.drain()
        self.assertFalse(h.closed)
        h.send(MESSAGE)
        self.transcript(h, "< 250 2.0.0 Ok: queued\n< 421 4.3.2 localhost Service shutting down")
        self.assertTrue(h.closed)
        self.assertEqual(len(self.entries(h)), 1)

    def test_envelope_finishes(self) -> None:
        """
        Draining between MAIL and DATA: the transaction goes on to its end;
        the next MAIL gets 421 (pipelined behind the message).
        """
        h = self.harness()
        self.transcript(
            h,
            "< 220\n> EHLO client.example\n" + ehlo_reply() + "> MAIL FROM:<a@example.org>\n"
            "< 250 2.1.0 Ok",
        )
        h.protocol.factory.drain()
        h.send("RCPT TO:<b@example.com>\r\nDATA\r\n" + MESSAGE + "MAIL FROM:<a@example.org>\r\n")
        self.transcript(
            h,
            "< 250 2.1.5 Ok\n< 354 End data with\n< 250 2.0.0 Ok: queued\n"
            "< 421 4.3.2 localhost Service shutting down",
        )
        self.assertTrue(h.closed)
        self.assertEqual(len(self.entries(h)), 1)


class ModeTests(ServerTestCase):
    """
    The session's state is one L{Mode}, moving as its docstring says.
    """

    def test_transitions(self) -> None:
        """
        GREETING until C{session_connect} answers, COMMAND between
        commands, WAITING while a callback is pending (input waits), DATA
        during the message, WAITING while it is finished, DISCARDING for
        the rest of an overlong line, and CLOSED after QUIT.
        """
        connect: Deferred[ConnectResult] = Deferred()
        sender: Deferred[SenderResult] = Deferred()
        envelope: Deferred[EnvelopeResult] = Deferred()
        h = self.harness(
            Recorder(
                session_connect=lambda log, s: connect,
                process_sender=lambda *args: sender,
                process_envelope=lambda *args: envelope,
            )
        )
        self.assertIs(h.protocol.mode, Mode.GREETING)
        connect.callback(Accept("test.example ESMTP"))
        self.assertIs(h.protocol.mode, Mode.COMMAND)
        h.send("EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\n")
        self.assertIs(h.protocol.mode, Mode.WAITING)
        sender.callback(Continue())
        self.assertIs(h.protocol.mode, Mode.COMMAND)
        h.send("RCPT TO:<b@example.com>\r\nDATA\r\n")
        self.assertIs(h.protocol.mode, Mode.DATA)
        h.send(MESSAGE)
        self.assertIs(h.protocol.mode, Mode.WAITING)
        envelope.callback(Consume())
        self.assertIs(h.protocol.mode, Mode.COMMAND)
        h.send("X" * 600)
        self.assertIs(h.protocol.mode, Mode.DISCARDING)
        h.send("X\r\nQUIT\r\n")
        self.assertIs(h.protocol.mode, Mode.CLOSED)
        codes = [line[:4] for line in h.lines() if line[3:4] == " "]
        self.assertEqual(
            codes, ["220 ", "250 ", "250 ", "250 ", "250 ", "354 ", "250 ", "500 ", "221 "]
        )

    def test_pregreet(self) -> None:
        """
        Input before the greeting moves GREETING to PREGREET; the greeting
        due then closes the session instead.
        """
        connect: Deferred[ConnectResult] = Deferred()
        h = self.harness(Recorder(session_connect=lambda log, s: connect))
        h.send("EHLO early.example\r\n")
        self.assertIs(h.protocol.mode, Mode.PREGREET)
        connect.callback(Accept("test.example ESMTP"))
        self.assertIs(h.protocol.mode, Mode.CLOSED)
        self.transcript(h, "< 554 5.5.0 SMTP synchronization error: input sent before the greeting")


class SettingsTests(SynchronousTestCase):
    def test_settings_and_changes(self) -> None:
        """
        The factory's settings are one frozen L{ServerSettings}: given
        whole, with keyword changes on top, or as keywords alone.
        """
        base = ServerSettings(hostname="mx.example", max_recipients=5)
        factory = SMTPServerFactory(TestPolicy(), MemorySpool(), Clock(), base, max_recipients=7)
        self.assertEqual(factory.settings, ServerSettings(hostname="mx.example", max_recipients=7))
        self.assertIs(SMTPServerFactory(TestPolicy(), MemorySpool(), Clock(), base).settings, base)
        self.assertEqual(
            SMTPServerFactory(TestPolicy(), MemorySpool(), Clock(), idle_timeout=5).settings,
            ServerSettings(idle_timeout=5),
        )
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, base, "hostname", "x")

    def test_unknown_setting(self) -> None:
        """
        A keyword that is not a setting is a TypeError, not ignored.
        """
        self.assertRaises(
            TypeError, SMTPServerFactory, TestPolicy(), MemorySpool(), Clock(), max_recipent=3
        )

    def test_sessions_read_the_settings(self) -> None:
        """
        Every session of a factory reads the factory's one settings object.
        """
        factory = SMTPServerFactory(TestPolicy(), MemorySpool(), Clock(), hostname="mx.example")
        one, two = factory.buildProtocol(None), factory.buildProtocol(None)
        self.assertIs(one.settings, factory.settings)
        self.assertIs(two.settings, factory.settings)


class CallCallbackTests(SynchronousTestCase):
    """
    L{relay.smtp.callbacks.call_callback}: every kind of answer a plugin
    callback gives becomes a L{Deferred} of the same outcome.
    """

    def test_answers(self) -> None:
        """
        A plain value, a L{Deferred}, a coroutine and a L{Deferred} that
        fires with a coroutine all give a L{Deferred} of the value.
        """
        from twisted.internet.defer import succeed

        from relay.smtp.callbacks import call_callback

        async def coroutine(x: int) -> int:
            return x + 1

        self.assertEqual(self.successResultOf(call_callback(lambda x: x, 1)), 1)
        self.assertEqual(self.successResultOf(call_callback(lambda x: succeed(x), 2)), 2)
        self.assertEqual(self.successResultOf(call_callback(coroutine, 2)), 3)
        self.assertEqual(
            self.successResultOf(call_callback(lambda x: succeed(coroutine(x)), 3)), 4
        )

    def test_failures(self) -> None:
        """
        A callback that raises, or answers a L{Failure}, gives a failed
        L{Deferred} with that error.
        """
        from twisted.python.failure import Failure

        from relay.smtp.callbacks import call_callback

        def raises() -> None:
            raise ValueError("no")

        self.failureResultOf(call_callback(raises), ValueError)
        self.failureResultOf(call_callback(lambda: Failure(KeyError("k"))), KeyError)
