"""
Tests for the test kit, L{relay.testing}: the transcript harness, the
recording plugin and the helpers that call one callback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import relay
from relay import (
    NULL_SENDER,
    Accept,
    Allow,
    Argument,
    Consume,
    Continue,
    Defaults,
    Deny,
    Disconnect,
    EmailAddress,
    EnvelopeWithNextHop,
    IServerCallbacks,
    Quarantine,
    Reject,
    Reply,
    Send,
    Simple,
    TLSInfo,
)
from relay.smtp.server import ServerSettings, SMTPServerFactory
from relay.testing import (
    CheckAuthenticationCredentialsCall,
    MemorySpool,
    ProcessEnvelopeCall,
    ProcessRecipientCall,
    ProcessSenderCall,
    RecordingCallbacks,
    RpcsCall,
    ServerHarness,
    ServerOptions,
    SessionConnectCall,
    SessionHeloCall,
    TranscriptMismatch,
    call_callback,
    call_callback_deferred,
    make_envelope,
    make_session,
    run_transcript,
)
from tests.transcripts import ehlo_reply

log = Logger()

EHLO = """
< 220 localhost ESMTP
> EHLO client.example
< 250-localhost
< 250-PIPELINING
< 250-SIZE 35000000
< 250-8BITMIME
< 250-DSN
< 250-ENHANCEDSTATUSCODES
< 250-SMTPUTF8
< 250 CHUNKING
"""

ONE_MESSAGE = """
> MAIL FROM:<a@example.org>
< 250 2.1.0 Ok
> RCPT TO:<b@example.com>
< 250 2.1.5 Ok
> DATA
< 354
> Subject: hi
>
> hello
> .
< 250 2.0.0 Ok: queued as
"""


class Quarantining(Simple):
    def process_envelope(self, log: Logger, session: Any, envelope: Any) -> Any:
        return Quarantine([EnvelopeWithNextHop(envelope)], Reply(250, "2.0.0 held"), reason="odd")


class ExportTests(SynchronousTestCase):
    def test_relay_exports(self) -> None:
        """
        C{relay} exports L{Defaults} and the union of results of each
        callback, beside the result types.
        """
        from relay import simple
        from relay.model import results

        for name in (
            "ConnectResult",
            "HeloResult",
            "SenderResult",
            "RecipientResult",
            "EnvelopeResult",
            "AuthResult",
        ):
            self.assertIs(getattr(relay, name), getattr(results, name))
            self.assertIn(name, relay.__all__)
        self.assertIs(relay.Defaults, simple.Defaults)

    def test_server_options_match_the_factory(self) -> None:
        """
        L{ServerOptions} names exactly the fields of L{ServerSettings}, the
        settings of L{SMTPServerFactory} (so that a new server setting
        cannot be forgotten by the kit).
        """
        settings = {field.name for field in dataclasses.fields(ServerSettings)}
        self.assertEqual(set(ServerOptions.__annotations__), settings)


class RunTranscriptTests(SynchronousTestCase):
    def test_whole_session(self) -> None:
        """
        A whole session with L{Simple}: the result has the transcript both
        ways, the replies, the spooled entry with its message, and the
        server closed after QUIT.
        """
        result = run_transcript(Simple, EHLO + ONE_MESSAGE + "> QUIT\n< 221 2.0.0 Bye")
        self.assertEqual(result.transcript[1], "> EHLO client.example")
        self.assertEqual(result.transcript[-1], "< 221 2.0.0 Bye")
        self.assertIn("> Subject: hi", result.transcript)
        self.assertEqual(str(result).splitlines(), list(result.transcript))
        self.assertEqual([r.code for r in result.replies], [220, 250, 250, 250, 354, 250, 221])
        self.assertEqual(result.replies[1].lines[1], "PIPELINING")
        self.assertEqual(result.server_lines[0][:4], "220 ")
        [entry] = result.spooled
        self.assertEqual([str(r) for r in entry.recipients], ["b@example.com"])
        data = result.message(entry).data
        assert data is not None
        self.assertTrue(data.startswith(b"Received: from client.example"))
        self.assertTrue(data.endswith(b"Subject: hi\r\n\r\nhello\r\n"))
        self.assertEqual(result.quarantined, ())
        self.assertTrue(result.closed)

    def test_quarantined(self) -> None:
        """
        What the plugin quarantined is in C{quarantined}, with its reason.
        """
        result = run_transcript(Quarantining(), EHLO + ONE_MESSAGE.replace("Ok: queued as", "held"))
        self.assertEqual(result.spooled, ())
        [entry] = result.quarantined
        self.assertEqual(entry.reason, "odd")
        self.assertFalse(result.closed)

    def test_configures_the_plugin(self) -> None:
        """
        The plugin gets C{configure} with the server's host name and the
        harness's clock (so Simple's greeting has a fixed date), or with
        the given L{Defaults}, clock added.
        """
        run_transcript(
            Simple(),
            "< 220 mx.test ESMTP relay ready Thu, 01 Jan 1970 00:00:00 -0000",
            hostname="mx.test",
        )
        clock = Clock()
        clock.advance(86400)
        recorder = RecordingCallbacks()
        run_transcript(
            recorder,
            "< 220 smtp.test ESMTP relay ready Fri, 02 Jan 1970",
            clock=clock,
            defaults=Defaults(hostname="smtp.test", next_hop_choices=["hop.test:25"]),
        )
        assert recorder.defaults is not None
        self.assertIs(recorder.defaults.clock, clock)
        self.assertEqual(recorder.defaults.next_hop_choices, ["hop.test:25"])

    def test_auth_with_a_checker(self) -> None:
        """
        With a checker in the defaults, Simple offers and checks AUTH.
        """
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        result = run_transcript(
            Simple,
            f"""
            < 220
            > EHLO c
            {ehlo_reply("AUTH PLAIN LOGIN")}
            > AUTH PLAIN AGFsaWNlAHdyb25n
            < 535 5.7.8
            > AUTH PLAIN AGFsaWNlAHNlY3JldA==
            < 235 2.7.0
            """,
            defaults=Defaults(checker=checker),
            auth_requires_tls=False,
        )
        self.assertEqual([r.code for r in result.replies][-2:], [535, 235])

    def test_partial_plugin_and_addresses(self) -> None:
        """
        An object with only some callbacks is completed by Simple; the
        client's address may be an IPv6 host.
        """

        class Greeter:
            def session_connect(self, log: Logger, session: Any) -> Accept:
                return Accept(f"hello {session.remote_host}")

        run_transcript(Greeter(), "< 220 hello 2001:db8::5\n> QUIT\n< 221", remote="2001:db8::5")

    def test_disconnects_at_the_end(self) -> None:
        """
        A script that does not QUIT ends with the client going away: the
        server forgets the session and drops the message being received.
        """
        spool = MemorySpool()
        clock = Clock()
        result = run_transcript(
            Simple, EHLO + ONE_MESSAGE.split("> Subject")[0], spool=spool, clock=clock
        )
        self.assertFalse(result.closed)
        [writer] = spool.writers
        self.assertTrue(writer.aborted)
        self.assertEqual(clock.getDelayedCalls(), [])


class MismatchTests(SynchronousTestCase):
    def test_wrong_line(self) -> None:
        """
        A server line that does not match raises L{TranscriptMismatch}, an
        AssertionError showing the session so far, the line expected and
        what the server said.
        """
        plugin = RecordingCallbacks(process_recipient=Reject(Reply(550, "5.1.1 no such user")))
        with self.assertRaises(AssertionError) as caught:
            run_transcript(plugin, EHLO + ONE_MESSAGE)
        self.assertIsInstance(caught.exception, TranscriptMismatch)
        lines = str(caught.exception).splitlines()
        self.assertEqual(lines[0], "SMTP transcript differs from the script at its line 16:")
        self.assertEqual(lines[1][:10], "    < 220 ")
        self.assertEqual(
            lines[-4:],
            [
                "    > RCPT TO:<b@example.com>",
                "  - < 250 2.1.5 Ok",
                "  + < 550 5.1.1 no such user",
                "  (- the script, + the server)",
            ],
        )

    def test_regular_expression(self) -> None:
        """
        C{< re:...} lines match the whole server line.
        """
        run_transcript(Simple, r"< re:220 localhost ESMTP relay ready .* -0000")
        with self.assertRaises(TranscriptMismatch):
            run_transcript(Simple, "< re:220 localhost")

    def test_silence(self) -> None:
        """
        A line expected when the server said nothing: the message says
        whether the server closed or waits.
        """
        waiting: Deferred[Any] = Deferred()
        with self.assertRaises(TranscriptMismatch) as caught:
            run_transcript(RecordingCallbacks(session_connect=waiting), "< 220")
        self.assertIn("  + (nothing yet: the server waits", str(caught.exception))
        with self.assertRaises(TranscriptMismatch) as caught:
            run_transcript(RecordingCallbacks(session_connect=Disconnect()), "< 421\n< 220")
        self.assertIn("  + (nothing: the server closed the connection)", str(caught.exception))

    def test_lines_left_over(self) -> None:
        """
        By default every server line must be read; C{exhaustive=False}
        leaves the rest for the next L{ServerHarness.play} or
        L{ServerHarness.lines}.
        """
        with self.assertRaises(TranscriptMismatch) as caught:
            run_transcript(Simple, "< 220\n> NOOP\n> NOOP")
        message = str(caught.exception)
        self.assertIn(
            "  - (the end of the script)\n  + < 250 2.0.0 Ok\n  + < 250 2.0.0 Ok", message
        )
        h = ServerHarness(Simple)
        h.play("> NOOP\n> NOOP", exhaustive=False)
        h.play("< 220\n< 250", exhaustive=False)
        self.assertEqual(h.lines(), ["250 2.0.0 Ok"])
        h.disconnect()

    def test_bad_script_line(self) -> None:
        """
        A script line that is not C{<}, C{>} or a comment is a ValueError
        naming the line.
        """
        h = ServerHarness(Simple)
        self.addCleanup(h.disconnect)
        with self.assertRaises(ValueError) as caught:
            h.play("# greeting\n\n<220 ok")
        self.assertIn("transcript line 3", str(caught.exception))


class HarnessTests(SynchronousTestCase):
    def test_shared_server(self) -> None:
        """
        C{factory=} opens another session on the same server, which then
        counts both; a disconnect is counted once, however often called.
        """
        h1 = ServerHarness(Simple, max_sessions=2)
        h2 = ServerHarness(factory=h1.factory)
        self.assertIs(h2.spool, h1.spool)
        self.assertIs(h2.clock, h1.clock)
        self.assertEqual(h1.factory.sessions, 2)
        h2.disconnect()
        h2.disconnect()
        self.assertEqual(h1.factory.sessions, 1)
        h1.disconnect()
        self.assertEqual(h1.factory.sessions, 0)

    def test_bad_arguments(self) -> None:
        """
        The harness needs a plugin or a factory, not both.
        """
        self.assertRaises(TypeError, ServerHarness)
        factory = SMTPServerFactory(Simple(), MemorySpool(), Clock())
        self.assertRaises(TypeError, ServerHarness, Simple, factory=factory)
        self.assertRaises(TypeError, ServerHarness, factory=factory, hostname="x")

    def test_step_by_step(self) -> None:
        """
        A test may send raw bytes, advance the clock and read lines; the
        transcript records it all, and STARTTLS records its context.
        """
        context = object()
        h = ServerHarness(Simple, tls_context_factory=context, idle_timeout=30)
        h.send(b"EHLO c\r\nSTART")
        h.send("TLS\r\n")
        self.assertEqual(h.lines()[-1], "220 2.0.0 Ready to start TLS")
        self.assertIs(h.transport.tls_context, context)
        h.clock.advance(30)
        self.assertEqual(h.lines(), ["421 4.4.2 localhost Error: timeout exceeded"])
        self.assertTrue(h.closed)
        transcript = h.result().transcript
        self.assertEqual(transcript[0][:6], "< 220 ")
        self.assertEqual(transcript[1:3], ("> EHLO c", "< 250-localhost"))
        self.assertIn("> STARTTLS", transcript)
        self.assertEqual(transcript[-1], "< 421 4.4.2 localhost Error: timeout exceeded")
        h.disconnect()
        self.assertEqual(h.factory.sessions, 0)


class RecordingCallbacksTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """
        L{RecordingCallbacks} provides L{IServerCallbacks}.
        """
        self.assertTrue(verifyObject(IServerCallbacks, RecordingCallbacks()))

    def test_records_and_delegates(self) -> None:
        """
        Every callback call is recorded with its arguments, in order, and
        answered by the wrapped plugin (Simple by default).
        """
        recorder = RecordingCallbacks()
        run_transcript(recorder, EHLO + ONE_MESSAGE + "> QUIT\n< 221")
        self.assertEqual(
            recorder.names(),
            [
                "session_connect",
                "session_helo",
                "process_sender",
                "process_recipient",
                "process_envelope",
            ],
        )
        [connect] = recorder.calls_to(SessionConnectCall)
        self.assertEqual(connect.session.remote_host, "198.51.100.7")
        [helo] = recorder.calls_to(SessionHeloCall)
        self.assertEqual(helo.helo, "client.example")
        [sender] = recorder.calls_to(ProcessSenderCall)
        self.assertEqual((str(sender.sender), tuple(sender.sender_args)), ("a@example.org", ()))
        [recipient] = recorder.calls_to(ProcessRecipientCall)
        self.assertEqual(recipient.args[-1], EmailAddress("b", "example.com"))
        [envelope] = recorder.calls_to(ProcessEnvelopeCall)
        self.assertEqual(envelope.envelope.header("Subject"), "hi")
        self.assertEqual(envelope.session.helo, "client.example")
        self.assertIsInstance(envelope.log, Logger)

    def test_answers(self) -> None:
        """
        An answer given is returned as it is; a function is called with
        the callback's arguments, log first; the other callbacks go to
        the wrapped plugin.
        """
        seen: list[tuple[Any, ...]] = []

        def helo(log: Logger, session: Any, name: str) -> Any:
            seen.append((log, session, name))
            return Deny(Reply(550, "5.7.1 not you"))

        recorder = RecordingCallbacks(
            Quarantining(), session_helo=helo, process_sender=defer.succeed(Continue())
        )
        result = run_transcript(recorder, "< 220\n> HELO x\n< 550 5.7.1 not you\n> QUIT\n< 221")
        [(log_given, session, name)] = seen
        self.assertIsInstance(log_given, Logger)
        self.assertEqual((session.helo, name), (None, "x"))
        self.assertTrue(result.closed)
        envelope = make_envelope("a@example.org", "b@example.com")
        answer = call_callback(recorder.process_envelope, log, make_session(), envelope)
        self.assertIsInstance(answer, Quarantine)
        self.assertEqual(
            call_callback(recorder.process_sender, log, make_session(), NULL_SENDER, []), Continue()
        )

    def test_auth_and_rpcs(self) -> None:
        """
        check_authentication_credentials and rpcs are recorded and
        answered too; configure passes the defaults on.
        """
        wrapped = Simple()
        recorder = RecordingCallbacks(wrapped, rpcs=lambda: [])
        defaults = Defaults(hostname="h.test")
        recorder.configure(defaults)
        self.assertIs(wrapped.defaults, defaults)
        self.assertEqual(
            call_callback(recorder.check_authentication_credentials, log, "u", "p"), Deny()
        )
        self.assertEqual(recorder.rpcs(), [])
        self.assertEqual(RecordingCallbacks().rpcs(), [])
        [auth] = recorder.calls_to(CheckAuthenticationCredentialsCall)
        self.assertEqual(auth.args, ("u", "p"))
        self.assertEqual(recorder.calls_to(RpcsCall), [RpcsCall()])


class HelperTests(SynchronousTestCase):
    def test_make_session(self) -> None:
        """
        L{make_session} makes a session after EHLO from the test address,
        or as told.
        """
        session = make_session()
        self.assertEqual(
            (session.remote_host, session.helo, session.esmtp),
            ("198.51.100.7", "client.example", True),
        )
        tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", 128)
        session = make_session(remote="::1", helo=None, tls=tls, authenticated="alice")
        self.assertIsInstance(session.remote, IPv6Address)
        self.assertEqual(
            (session.remote_host, session.helo, session.tls, session.authenticated),
            ("::1", None, tls, "alice"),
        )

    def test_make_envelope(self) -> None:
        """
        L{make_envelope} parses the addresses (C{""} is the null sender)
        and the message's header.
        """
        envelope = make_envelope(
            "",
            ["b@example.com", "rené@exämple.com"],
            b"Subject: x\r\nX-A: 1\r\n\r\nbody\r\n",
            sender_args=[Argument("BODY", "8BITMIME")],
            rejected_recipients=["c@example.com"],
        )
        self.assertIs(envelope.sender, NULL_SENDER)
        self.assertEqual(
            [str(r) for r in envelope.recipients], ["b@example.com", "rené@exämple.com"]
        )
        self.assertEqual(envelope.header("x-a"), "1")
        self.assertEqual(envelope.message.size, 28)
        self.assertEqual(envelope.sender_args, (Argument("BODY", "8BITMIME"),))
        self.assertEqual([str(r) for r in envelope.rejected_recipients], ["c@example.com"])
        self.assertEqual(
            make_envelope("a@b.example", "c@d.example").recipients,
            (EmailAddress("c", "d.example"),),
        )

    def test_call_callback(self) -> None:
        """
        L{call_callback} gives the result of a callback that returned a
        value, a fired Deferred or a coroutine that did not wait, and
        raises what it raised or failed with.
        """

        async def coroutine(log: Logger) -> Consume:
            return await defer.succeed(Consume("done"))

        def failing(log: Logger) -> Deferred[Consume]:
            return defer.fail(KeyError("nope"))

        def raising(log: Logger) -> Consume:
            raise ZeroDivisionError()

        self.assertEqual(call_callback(lambda log: Allow(), log), Allow())
        self.assertEqual(call_callback(lambda log: defer.succeed(Allow()), log), Allow())
        self.assertEqual(call_callback(coroutine, log), Consume("done"))
        self.assertRaises(KeyError, call_callback, failing, log)
        self.assertRaises(ZeroDivisionError, call_callback, raising, log)

    def test_call_callback_waiting(self) -> None:
        """
        A callback still waiting makes L{call_callback} fail clearly;
        L{call_callback_deferred} gives its Deferred.
        """
        clock = Clock()

        async def slow(log: Logger, session: Any) -> Accept:
            await deferLater(clock, 5, lambda: None)
            return Accept("late")

        with self.assertRaises(AssertionError) as caught:
            call_callback(slow, log, make_session())
        self.assertIn("has not answered yet", str(caught.exception))
        clock.advance(5)
        d = call_callback_deferred(slow, log, make_session())
        self.assertNoResult(d)
        clock.advance(5)
        self.assertEqual(self.successResultOf(d), Accept("late"))

    def test_send_from_simple(self) -> None:
        """
        The helpers make values a real plugin accepts: Simple sends a
        made-up envelope on the default route.
        """
        plugin = Simple()
        plugin.configure(Defaults(next_hop_choices=["smart.test:25"]))
        envelope = make_envelope("a@example.org", "b@example.com")
        result = call_callback(plugin.process_envelope, log, make_session(), envelope)
        self.assertEqual(result, Send([EnvelopeWithNextHop(envelope)]))
