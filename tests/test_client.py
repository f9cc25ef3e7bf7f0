"""
Tests for L{relay.delivery.client} and its parts (C{client_*}): the relay
client against a scripted fake next hop over a L{StringTransport}, with a
L{MemoryReactorClock}.  L{tests.test_client_memory} runs it against relay's
own server instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.client import (
    ClientSettings,
    DeliveryError,
    DeliveryResult,
    PoolLimits,
    RelayClient,
    TLSPolicy,
)
from relay.delivery.client_body import CHUNK_SIZE
from relay.model.address import EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.envelope import Envelope
from relay.model.message import Message
from relay.model.reply import Reply

BODY = b"Subject: hi\r\n\r\nhello\r\n"


def envelope(
    recipients: tuple[str, ...] = ("bob@example.com",),
    data: bytes = BODY,
    sender_args: tuple[Argument, ...] = (),
    sender: str = "alice@example.org",
) -> Envelope:
    return Envelope(
        id="E1",
        sender=Sender.of(sender),
        sender_args=sender_args,
        recipients=[EmailAddress.parse(r, smtputf8=not r.isascii()) for r in recipients],
        message=Message.from_bytes(data),
    )


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that records C{startTLS}.
    """

    tls_context: Any = None
    no_delay = False

    def startTLS(self, context: Any) -> None:
        self.tls_context = context

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


class Hop:
    """
    A scripted next hop: the client connects to it through a
    L{MemoryReactorClock}; the test reads what the client wrote and feeds
    replies.
    """

    def __init__(
        self,
        test: SynchronousTestCase,
        env: Envelope | None = None,
        run_in_thread: Any = None,
        **settings: Any,
    ) -> None:
        """
        @param settings: L{ClientSettings} fields that differ from the
            test's: no TLS, and one envelope per connection.
        """
        self.test = test
        self.reactor = MemoryReactorClock()
        base = ClientSettings(
            hostname="relay.test", tls=TLSPolicy("none"), pool=PoolLimits(max_idle_per_hop=0)
        )
        self.client = RelayClient(
            self.reactor, replace(base, **settings), run_in_thread=run_in_thread
        )
        self.result: list[Any] = []
        d = self.client.send("192.0.2.1:25", env or envelope())
        d.addBoth(self.result.append)
        # The peer: the address the hop's name led to.
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 25))
        self.protocol: Any = None
        test.addCleanup(self.finish)

    def finish(self) -> None:
        """
        End a conversation that a test left unfinished.
        """
        if not self.result and self.protocol is not None:
            self.protocol.connectionLost(Failure(Exception("test over")))

    def connect(self) -> None:
        host, port, factory, timeout, _ = self.reactor.tcpClients[0]
        self.test.assertEqual((host, port), ("192.0.2.1", 25))
        self.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.protocol.makeConnection(self.transport)

    def reply(self, *lines: str) -> None:
        self.protocol.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))

    def expect(self, data: bytes) -> None:
        self.test.assertEqual(self.transport.value(), data)
        self.transport.clear()

    def greet(self, *extensions: str) -> None:
        """
        Connect, greet and answer EHLO with C{extensions}.
        """
        self.connect()
        self.reply("220 hop.test ESMTP")
        self.expect(b"EHLO relay.test\r\n")
        lines = ["hop.test", *extensions]
        self.reply(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")

    def outcome(self) -> Any:
        self.test.assertEqual(len(self.result), 1, "no outcome yet")
        return self.result[0]

    def success(self) -> DeliveryResult:
        out = self.outcome()
        if isinstance(out, Failure):
            out.raiseException()
        self.test.assertIsInstance(out, DeliveryResult)
        return out  # type: ignore[no-any-return]

    def error(self) -> DeliveryError:
        out = self.outcome()
        self.test.assertIsInstance(out, Failure)
        out.trap(DeliveryError)
        return out.value  # type: ignore[no-any-return]


class SettingsTests(SynchronousTestCase):
    """
    L{ClientSettings} and its records refuse what cannot work, and say
    what each TLS mode asks.
    """

    def test_tls_modes(self) -> None:
        """
        Each mode's decisions: whether STARTTLS is tried, whether it is
        required; an unknown mode is a ValueError.
        """
        self.assertEqual(
            [(p.attempted, p.required) for p in map(TLSPolicy, ("none", "may", "encrypt", "verify"))],
            [(False, False), (True, False), (True, True), (True, True)],
        )
        self.assertRaises(ValueError, TLSPolicy, "sometimes")

    def test_pool_limits(self) -> None:
        """
        Negative pool sizes or timeouts and fewer than one transaction per
        connection are ValueErrors; zero idle connections is allowed (no
        reuse).
        """
        for bad in ({"max_idle_per_hop": -1}, {"idle_timeout": -1}, {"max_reuse": 0}):
            self.assertRaises(ValueError, PoolLimits, **bad)
        self.assertEqual(PoolLimits(max_idle_per_hop=0).max_idle_per_hop, 0)

    def test_records_are_frozen(self) -> None:
        """
        Settings are values: changed copies come from C{replace}.
        """
        settings = ClientSettings(hostname="relay.test")
        with self.assertRaises(AttributeError):
            settings.hostname = "other"  # type: ignore[misc]
        self.assertEqual(replace(settings, hostname="other").tls, TLSPolicy("may"))


class TransactionTests(SynchronousTestCase):
    """
    The SMTP conversation with the next hop.
    """

    def test_success_one_at_a_time(self) -> None:
        """
        Without PIPELINING each command waits for its reply; the body ends
        with the end marker; QUIT is sent at the end.
        """
        hop = Hop(self)
        hop.greet("8BITMIME")
        hop.expect(b"MAIL FROM:<alice@example.org>\r\n")
        hop.reply("250 ok")
        hop.expect(b"RCPT TO:<bob@example.com>\r\n")
        hop.reply("250 ok")
        hop.expect(b"DATA\r\n")
        hop.reply("354 go")
        hop.expect(BODY + b".\r\n")
        self.assertEqual(hop.result, [])
        hop.reply("250 2.0.0 queued as X")
        result = hop.success()
        self.assertEqual(result.hop, "192.0.2.1:25")
        self.assertEqual(result.replies, (("bob@example.com", Reply(250, "2.0.0 queued as X")),))
        hop.expect(b"QUIT\r\n")
        self.assertTrue(hop.transport.disconnecting)

    def test_pipelining(self) -> None:
        """
        With PIPELINING, MAIL, every RCPT and DATA go in one write and the
        replies are matched in order; a refused recipient keeps its RCPT
        reply, the others get the final reply.
        """
        hop = Hop(self, envelope(("bob@example.com", "carol@example.com", "dave@example.com")))
        hop.greet("PIPELINING", "SIZE 1000000")
        hop.expect(
            b"MAIL FROM:<alice@example.org> SIZE=%d\r\n" % len(BODY)
            + b"RCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\n"
            b"RCPT TO:<dave@example.com>\r\nDATA\r\n"
        )
        hop.reply("250 ok", "250 ok", "550 5.1.1 no carol", "450 4.2.0 later dave", "354 go")
        hop.expect(BODY + b".\r\n")
        hop.reply("250 done")
        self.assertEqual(
            hop.success().replies,
            (
                ("bob@example.com", Reply(250, "done")),
                ("carol@example.com", Reply(550, "5.1.1 no carol")),
                ("dave@example.com", Reply(450, "4.2.0 later dave")),
            ),
        )

    def test_partial_rcpt_failure(self) -> None:
        """
        Without PIPELINING too, refused recipients keep their RCPT reply.
        """
        hop = Hop(self, envelope(("bob@example.com", "carol@example.com")))
        hop.greet()
        hop.expect(b"MAIL FROM:<alice@example.org>\r\n")
        hop.reply("250 ok")
        hop.expect(b"RCPT TO:<bob@example.com>\r\n")
        hop.reply("550 5.1.1 no bob")
        hop.expect(b"RCPT TO:<carol@example.com>\r\n")
        hop.reply("250 ok")
        hop.expect(b"DATA\r\n")
        hop.reply("354 go")
        hop.transport.clear()
        hop.reply("250 done")
        self.assertEqual(
            hop.success().replies,
            (("bob@example.com", Reply(550, "5.1.1 no bob")), ("carol@example.com", Reply(250, "done"))),
        )

    def test_all_rcpt_rejected(self) -> None:
        """
        When every recipient is refused, no DATA is sent: RSET and QUIT, and
        the result holds the refusals.
        """
        hop = Hop(self, envelope(("bob@example.com", "carol@example.com")))
        hop.greet()
        hop.expect(b"MAIL FROM:<alice@example.org>\r\n")
        hop.reply("250 ok")
        hop.expect(b"RCPT TO:<bob@example.com>\r\n")
        hop.reply("550 no")
        hop.expect(b"RCPT TO:<carol@example.com>\r\n")
        hop.reply("450 later")
        hop.expect(b"RSET\r\nQUIT\r\n")
        self.assertEqual(
            hop.success().replies,
            (("bob@example.com", Reply(550, "no")), ("carol@example.com", Reply(450, "later"))),
        )

    def test_all_rcpt_rejected_pipelined_354(self) -> None:
        """
        A pipelining hop that answers DATA with 354 although every recipient
        was refused gets an empty message (just the end marker).
        """
        hop = Hop(self)
        hop.greet("PIPELINING")
        hop.transport.clear()
        hop.reply("250 ok", "550 no", "354 go")
        hop.expect(b".\r\n")
        hop.reply("554 no valid recipients")
        hop.expect(b"RSET\r\nQUIT\r\n")
        self.assertEqual(hop.success().replies, (("bob@example.com", Reply(550, "no")),))

    def test_helo_fallback(self) -> None:
        """
        A 5xx to EHLO makes the client fall back to HELO, with no extensions.
        """
        hop = Hop(self)
        hop.connect()
        hop.reply("220 hop.test SMTP")
        hop.expect(b"EHLO relay.test\r\n")
        hop.reply("502 5.5.1 what?")
        hop.expect(b"HELO relay.test\r\n")
        hop.reply("250 hop.test")
        hop.expect(b"MAIL FROM:<alice@example.org>\r\n")

    def test_greeting_refused(self) -> None:
        """
        A 554 greeting fails the attempt, transiently.
        """
        hop = Hop(self)
        hop.connect()
        hop.reply("554 go away")
        err = hop.error()
        self.assertEqual(err.reply, Reply(554, "go away"))
        self.assertFalse(err.permanent)

    def test_multiline_ehlo(self) -> None:
        """
        Multi-line replies arriving in pieces are reassembled.
        """
        hop = Hop(self)
        hop.connect()
        hop.reply("220 hop.test")
        hop.transport.clear()
        hop.protocol.dataReceived(b"250-hop.test\r\n250-PIPE")
        self.assertEqual(hop.transport.value(), b"")
        hop.protocol.dataReceived(b"LINING\r\n250 8BITMIME\r\n")
        hop.expect(
            b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
        )

    def test_mail_transient(self) -> None:
        """
        A 4xx to MAIL FROM is a transient L{DeliveryError}.
        """
        hop = Hop(self)
        hop.greet()
        hop.transport.clear()
        hop.reply("451 4.3.0 try later")
        err = hop.error()
        self.assertFalse(err.permanent)
        self.assertEqual(err.reply, Reply(451, "4.3.0 try later"))
        hop.expect(b"QUIT\r\n")

    def test_mail_permanent(self) -> None:
        """
        A 5xx to MAIL FROM is a permanent L{DeliveryError}, pipelined too.
        """
        hop = Hop(self)
        hop.greet("PIPELINING")
        hop.transport.clear()
        hop.reply("550 5.7.1 no", "503 no", "503 no")
        err = hop.error()
        self.assertTrue(err.permanent)
        self.assertEqual(err.reply, Reply(550, "5.7.1 no"))

    def test_data_command_refused(self) -> None:
        """
        A 5xx to DATA itself is a permanent error.
        """
        hop = Hop(self)
        hop.greet("PIPELINING")
        hop.transport.clear()
        hop.reply("250 ok", "250 ok", "554 no data")
        err = hop.error()
        self.assertTrue(err.permanent)
        self.assertEqual(err.reply, Reply(554, "no data"))

    def test_data_final_reply_per_recipient(self) -> None:
        """
        A 5xx or 4xx after the body applies to every accepted recipient.
        """
        for code in (554, 452):
            hop = Hop(self, envelope(("bob@example.com", "carol@example.com")))
            hop.greet("PIPELINING")
            hop.transport.clear()
            hop.reply("250 ok", "250 ok", "250 ok", "354 go")
            hop.reply(f"{code} x")
            self.assertEqual(
                hop.success().replies,
                (("bob@example.com", Reply(code, "x")), ("carol@example.com", Reply(code, "x"))),
            )

    def test_size_too_big(self) -> None:
        """
        A message larger than the hop's SIZE limit fails permanently with a
        552, without MAIL FROM.
        """
        hop = Hop(self)
        hop.greet("SIZE 10")
        err = hop.error()
        self.assertTrue(err.permanent)
        assert err.reply is not None
        self.assertEqual(err.reply.code, 552)
        hop.expect(b"QUIT\r\n")

    def test_parameters(self) -> None:
        """
        BODY=8BITMIME and SMTPUTF8 are passed when offered; DSN parameters
        only when DSN is offered.
        """
        args = (Argument("BODY", "8BITMIME"), Argument("RET", "HDRS"), Argument("SMTPUTF8"))
        hop = Hop(self, envelope(sender_args=args))
        hop.greet("8BITMIME", "SMTPUTF8", "DSN")
        hop.expect(b"MAIL FROM:<alice@example.org> BODY=8BITMIME SMTPUTF8 RET=HDRS\r\n")
        hop = Hop(self, envelope(sender_args=args))
        hop.greet("SMTPUTF8")
        hop.expect(b"MAIL FROM:<alice@example.org> SMTPUTF8\r\n")

    def test_smtputf8_not_offered(self) -> None:
        """
        A non-ASCII address to a hop without SMTPUTF8 fails permanently
        with 5.6.7.
        """
        hop = Hop(self, envelope(("j\u00f6rg@example.com",)))
        hop.greet("8BITMIME")
        err = hop.error()
        self.assertTrue(err.permanent)
        assert err.reply is not None
        self.assertEqual(err.reply.enhanced_status, "5.6.7")

    def test_reply_timeout(self) -> None:
        """
        No reply within the reply timeout: transient error, connection
        aborted.
        """
        hop = Hop(self, reply_timeout=60)
        hop.connect()
        hop.reactor.advance(59)
        self.assertEqual(hop.result, [])
        hop.reactor.advance(1)
        err = hop.error()
        self.assertFalse(err.permanent)
        self.assertIsNone(err.reply)
        self.assertTrue(hop.transport.disconnecting)

    def test_reply_timeout_counts_from_each_wait(self) -> None:
        """
        Each reply gets the whole reply timeout, counted from when the
        client starts waiting for it; one timer serves the connection's
        replies, and none is left once it is closed.
        """
        hop = Hop(self, reply_timeout=60)
        hop.connect()
        hop.reactor.advance(50)
        hop.reply("220 hop.test ESMTP")
        hop.expect(b"EHLO relay.test\r\n")
        hop.reply("250 hop.test")
        self.assertEqual(len(hop.reactor.getDelayedCalls()), 1)
        # The MAIL (and RCPT, DATA) wait started at 50: not over at 109.
        hop.reactor.advance(59)
        self.assertEqual(hop.result, [])
        hop.reactor.advance(1)
        self.assertFalse(hop.error().permanent)
        self.assertTrue(hop.transport.disconnecting)
        hop.protocol.connectionLost(Failure(Exception("aborted")))
        self.assertEqual(hop.reactor.getDelayedCalls(), [])

    def test_connection_lost(self) -> None:
        """
        The hop closing the connection mid-transaction is a transient error.
        """
        hop = Hop(self)
        hop.greet()
        hop.protocol.connectionLost(Failure(Exception("gone")))
        self.assertFalse(hop.error().permanent)

    def test_bad_reply(self) -> None:
        """
        A malformed reply fails the attempt.
        """
        hop = Hop(self)
        hop.connect()
        hop.protocol.dataReceived(b"hello there\r\n")
        self.assertFalse(hop.error().permanent)

    def test_connection_refused(self) -> None:
        """
        A failed connect is a transient error without a reply.
        """
        hop = Hop(self)
        connector = hop.reactor.connectors[0]
        _, _, factory, timeout, _ = hop.reactor.tcpClients[0]
        self.assertEqual(timeout, 30.0)
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        err = hop.error()
        self.assertFalse(err.permanent)
        self.assertIsNone(err.reply)


class PeerAddressTests(SynchronousTestCase):
    """
    The client reports the address it connected to, for the delivery
    logs, and leaves the logging of outcomes to whoever settles the entry.
    """

    def test_result_has_peer(self) -> None:
        """
        A result carries the peer's IP address and port.
        """
        hop = Hop(self)
        hop.transport = TLSStringTransport(peerAddress=IPv6Address("TCP", "2001:db8::25", 2525))
        hop.greet()
        hop.transport.clear()
        hop.reply("250 ok", "250 ok", "354 go", "250 2.0.0 queued")
        self.assertEqual(hop.success().address, ("2001:db8::25", 2525))

    def test_error_has_peer(self) -> None:
        """
        A refusal, a timeout and a lost connection after connecting carry
        the peer; a failed connect has none.
        """
        refused = Hop(self)
        refused.greet()
        refused.reply("451 4.3.0 busy")
        self.assertEqual(refused.error().address, ("192.0.2.1", 25))
        timeout = Hop(self, reply_timeout=60)
        timeout.connect()
        timeout.reactor.advance(60)
        self.assertEqual(timeout.error().address, ("192.0.2.1", 25))
        lost = Hop(self)
        lost.greet()
        lost.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(lost.error().address, ("192.0.2.1", 25))
        unreachable = Hop(self)
        connector = unreachable.reactor.connectors[0]
        _, _, factory, _, _ = unreachable.reactor.tcpClients[0]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.assertIsNone(unreachable.error().address)

    def test_reused_connection_has_peer(self) -> None:
        """
        An envelope sent on a reused connection reports that connection's
        peer.
        """
        hop = PooledHop(self)
        proto, transport = hop.first()
        result = hop.send()
        hop.transact(proto, transport, result)
        self.assertEqual(result[0].address, ("192.0.2.1", 25))

    def test_outcomes_not_logged(self) -> None:
        """
        Refused recipients, a refused transaction and a failed connect log
        nothing here: the scheduler's delivery line is the one line per
        outcome.
        """
        with capturedLogs() as events:
            partial = Hop(self, envelope(("bob@example.com", "carol@example.com")))
            partial.greet("PIPELINING")
            partial.transport.clear()
            partial.reply("250 ok", "550 5.1.1 no bob", "250 ok", "354 go", "250 done")
            partial.success()
            none = Hop(self)
            none.greet("PIPELINING")
            none.transport.clear()
            none.reply("250 ok", "550 no", "554 no valid recipients")
            none.success()
            refused = Hop(self)
            refused.greet()
            refused.reply("550 5.7.1 go away")
            refused.error()
            unreachable = Hop(self)
            connector = unreachable.reactor.connectors[0]
            _, _, factory, _, _ = unreachable.reactor.tcpClients[0]
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            unreachable.error()
        self.assertEqual(
            [e for e in events if e.get("log_namespace", "").startswith("relay.delivery.client")],
            [],
        )


class TLSTests(SynchronousTestCase):
    """
    STARTTLS and AUTH.
    """

    def test_encrypt_not_offered(self) -> None:
        """
        tls=TLSPolicy("encrypt") with a hop that does not offer STARTTLS: transient
        4.7.x error.
        """
        hop = Hop(self, tls=TLSPolicy("encrypt"))
        hop.greet("PIPELINING")
        err = hop.error()
        self.assertFalse(err.permanent)
        assert err.reply is not None
        self.assertTrue((err.reply.enhanced_status or "").startswith("4.7."))

    def test_may_not_offered(self) -> None:
        """
        tls=TLSPolicy("may") goes on in plain text when STARTTLS is not offered.
        """
        hop = Hop(self, tls=TLSPolicy("may"))
        hop.greet()
        hop.expect(b"MAIL FROM:<alice@example.org>\r\n")

    def test_starttls_then_ehlo_and_auth(self) -> None:
        """
        When offered, STARTTLS is used, EHLO is sent again, then AUTH PLAIN.
        """
        hop = Hop(self, tls=TLSPolicy("may"), auth=("user", "pw"))
        hop.greet("STARTTLS")
        hop.expect(b"STARTTLS\r\n")
        hop.reply("220 go ahead")
        self.assertIsNotNone(hop.transport.tls_context)
        hop.expect(b"EHLO relay.test\r\n")
        hop.reply("250-hop.test", "250 AUTH PLAIN LOGIN")
        hop.expect(b"AUTH PLAIN AHVzZXIAcHc=\r\n")
        hop.reply("235 ok")
        hop.expect(b"MAIL FROM:<alice@example.org>\r\n")

    def test_auth_login(self) -> None:
        """
        AUTH LOGIN when PLAIN is not offered.
        """
        hop = Hop(self, tls=TLSPolicy("encrypt"), auth=("user", "pw"))
        hop.greet("STARTTLS")
        hop.reply("220 go ahead")
        hop.transport.clear()
        hop.reply("250-hop.test", "250 AUTH LOGIN")
        hop.expect(b"AUTH LOGIN\r\n")
        hop.reply("334 VXNlcm5hbWU6")
        hop.expect(b"dXNlcg==\r\n")
        hop.reply("334 UGFzc3dvcmQ6")
        hop.expect(b"cHc=\r\n")
        hop.reply("535 bad")
        err = hop.error()
        self.assertFalse(err.permanent)

    def test_no_auth_without_tls(self) -> None:
        """
        Credentials are never sent in plain text.
        """
        hop = Hop(self, tls=TLSPolicy("may"), auth=("user", "pw"))
        hop.greet("AUTH PLAIN")
        err = hop.error()
        self.assertFalse(err.permanent)
        hop.expect(b"QUIT\r\n")


class BodyTests(SynchronousTestCase):
    """
    The exact bytes of the body on the wire.
    """

    def wire(self, data: bytes, path: bool = False, **kwargs: Any) -> bytes:
        env = envelope(data=data)
        if path:
            name = self.mktemp()
            with open(name, "wb") as f:
                f.write(data)
            msg = Message(env.message.headers, len(data), path=name)
            env = Envelope(env.id, env.sender, env.sender_args, env.recipients, msg)
        hop = Hop(self, env, **kwargs)
        hop.greet("PIPELINING")
        hop.transport.clear()
        hop.reply("250 ok", "250 ok", "354 go")
        out = hop.transport.value()
        hop.reply("250 done")
        hop.success()
        return out

    def test_edge_cases(self) -> None:
        """
        Leading dot, dot lines, lone CR and LF, no final line ending.
        """
        self.assertEqual(self.wire(b".start\n.\nmid\rend"), b"..start\r\n..\r\nmid\r\nend\r\n.\r\n")
        self.assertEqual(self.wire(b""), b".\r\n")
        self.assertEqual(self.wire(b"a\r\n.\r\n"), b"a\r\n..\r\n.\r\n")

    def test_flow_control(self) -> None:
        """
        The body waits while the transport is paused, goes on when it
        resumes, and a hop that never reads again times out.
        """
        size = CHUNK_SIZE
        for resume in (True, False):
            hop = Hop(self, envelope(data=b"a" * (3 * size)), reply_timeout=60)
            hop.greet("PIPELINING")
            producer: Any = hop.transport.producer
            producer.pauseProducing()
            hop.transport.clear()
            hop.reply("250 ok", "250 ok", "354 go")
            self.assertEqual(hop.transport.value(), b"a" * size)
            if resume:
                producer.resumeProducing()
                self.assertEqual(len(hop.transport.value()), 3 * size + 5)
                hop.reply("250 done")
                hop.success()
            else:
                hop.reactor.advance(60)
                self.assertIsNone(hop.error().reply)
                self.assertTrue(hop.transport.disconnecting)

    def test_unreadable_message(self) -> None:
        """
        A message file that cannot be read mid-body aborts the connection
        (no QUIT that the hop could take as body): transient error.
        """
        env = envelope()
        msg = Message(env.message.headers, 10, path=self.mktemp())
        env = Envelope(env.id, env.sender, env.sender_args, env.recipients, msg)
        hop = Hop(self, env)
        hop.greet("PIPELINING")
        hop.transport.clear()
        hop.reply("250 ok", "250 ok", "354 go")
        err = hop.error()
        self.assertFalse(err.permanent)
        self.assertEqual(hop.transport.value(), b"")
        self.assertTrue(hop.transport.disconnecting)
        self.flushLoggedErrors(FileNotFoundError)

    def test_chunk_boundaries(self) -> None:
        """
        A CRLF and a dot line split across chunks of CHUNK_SIZE are written as if
        whole, from a file read through C{run_in_thread} one trip per
        chunk (opening and closing the file ride along).
        """
        calls: list[Any] = []

        def run(f: Any, *args: Any) -> Any:
            calls.append(f)
            return f(*args)

        size = CHUNK_SIZE
        data = b"x" * (size - 1) + b"\r\n.y\n" + b"z" * size + b"\n."
        expected = b"x" * (size - 1) + b"\r\n..y\r\n" + b"z" * size + b"\r\n..\r\n.\r\n"
        self.assertEqual(self.wire(data, path=True, run_in_thread=run), expected)
        self.assertEqual(len(calls), 3)
        data2 = b"x" * (size - 1) + b"\r" + b".y"
        self.assertEqual(self.wire(data2, path=True), b"x" * (size - 1) + b"\r\n..y\r\n.\r\n")


    def test_small_file_one_trip(self) -> None:
        """
        A message file smaller than a chunk costs one trip to the thread
        pool, and its body goes out with the end-of-data marker in one
        write (a separate small write would wait for the hop's delayed ACK).
        """
        calls: list[Any] = []

        def run(f: Any, *args: Any) -> Any:
            calls.append(f)
            return f(*args)

        name = self.mktemp()
        with open(name, "wb") as f:
            f.write(b"Subject: hi\n\nbody\n")
        env = envelope()
        msg = Message(env.message.headers, 19, path=name)
        env = Envelope(env.id, env.sender, env.sender_args, env.recipients, msg)
        hop = Hop(self, env, run_in_thread=run)
        hop.greet("PIPELINING")
        writes: list[bytes] = []
        write = hop.transport.write
        hop.transport.write = lambda data: (writes.append(data), write(data))  # type: ignore[method-assign]
        hop.reply("250 ok", "250 ok", "354 go")
        self.assertEqual(writes, [b"Subject: hi\r\n\r\nbody\r\n.\r\n"])
        self.assertEqual(len(calls), 1)
        hop.reply("250 done")
        hop.success()

    def test_no_delay(self) -> None:
        """
        Connections to the hop turn off Nagle's algorithm.
        """
        hop = Hop(self)
        hop.greet("PIPELINING")
        self.assertTrue(hop.transport.no_delay)


class PooledHop:
    """
    A scripted next hop for connection reuse: every connection the client
    opens through the L{MemoryReactorClock} is built on demand with its own
    transport.
    """

    HOP = "192.0.2.1:25"

    def __init__(self, test: SynchronousTestCase, **settings: Any) -> None:
        """
        @param settings: L{ClientSettings} fields that differ from the
            test's: no TLS.
        """
        self.test = test
        self.reactor = MemoryReactorClock()
        base = ClientSettings(hostname="relay.test", tls=TLSPolicy("none"))
        self.client = RelayClient(self.reactor, replace(base, **settings))
        self.connections: list[tuple[Any, TLSStringTransport]] = []

    def send(self, env: Envelope | None = None) -> list[Any]:
        """
        Start a delivery; its outcome lands in the returned list.
        """
        result: list[Any] = []
        self.client.send(self.HOP, env or envelope()).addBoth(result.append)
        return result

    def connect(self) -> tuple[Any, TLSStringTransport]:
        """
        Accept the client's next connection attempt.
        """
        self.test.assertGreater(len(self.reactor.tcpClients), len(self.connections))
        host, port, factory, _, _ = self.reactor.tcpClients[len(self.connections)]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", host, port))
        proto.makeConnection(transport)
        self.connections.append((proto, transport))
        return proto, transport

    def reply(self, proto: Any, *lines: str) -> None:
        proto.dataReceived(b"".join(line.encode() + b"\r\n" for line in lines))

    def expect(self, transport: StringTransport, data: bytes) -> None:
        self.test.assertEqual(transport.value(), data)
        transport.clear()

    def greet(self, *extensions: str) -> tuple[Any, TLSStringTransport]:
        """
        Accept a connection, greet and answer EHLO.
        """
        proto, transport = self.connect()
        self.reply(proto, "220 hop.test ESMTP")
        self.expect(transport, b"EHLO relay.test\r\n")
        lines = ["hop.test", *extensions]
        self.reply(proto, *[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")
        return proto, transport

    def transact(self, proto: Any, transport: StringTransport, result: list[Any]) -> None:
        """
        Run one accepted transaction (no PIPELINING) to its end.
        """
        self.expect(transport, b"MAIL FROM:<alice@example.org>\r\n")
        self.reply(proto, "250 ok")
        self.expect(transport, b"RCPT TO:<bob@example.com>\r\n")
        self.reply(proto, "250 ok")
        self.expect(transport, b"DATA\r\n")
        self.reply(proto, "354 go")
        self.expect(transport, BODY + b".\r\n")
        self.reply(proto, "250 queued")
        self.test.assertEqual(len(result), 1)
        self.test.assertIsInstance(result[0], DeliveryResult)

    def first(self) -> tuple[Any, TLSStringTransport]:
        """
        Deliver one envelope on a fresh connection, which stays idle.
        """
        result = self.send()
        proto, transport = self.greet()
        self.transact(proto, transport, result)
        self.expect(transport, b"")
        self.test.assertFalse(transport.disconnecting)
        return proto, transport


class ReuseTests(SynchronousTestCase):
    """
    Connection reuse: idle connections are kept per hop for the next
    envelope to that hop.
    """

    def test_two_envelopes_one_connection(self) -> None:
        """
        Two envelopes to the same hop use one connection: one greeting and
        EHLO, two MAIL transactions, no QUIT in between.
        """
        hop = PooledHop(self)
        proto, transport = hop.first()
        result = hop.send()
        self.assertEqual(len(hop.reactor.tcpClients), 1)
        hop.transact(proto, transport, result)
        self.assertEqual(len(hop.reactor.tcpClients), 1)
        self.assertFalse(transport.disconnecting)

    def test_pipelined_reuse(self) -> None:
        """
        A reused PIPELINING connection sends MAIL, RCPT and DATA in one
        write at once, with the extensions learnt at EHLO.
        """
        hop = PooledHop(self)
        result = hop.send()
        proto, transport = hop.greet("PIPELINING")
        transport.clear()
        hop.reply(proto, "250 ok", "250 ok", "354 go")
        hop.expect(transport, BODY + b".\r\n")
        hop.reply(proto, "250 queued")
        self.assertIsInstance(result[0], DeliveryResult)
        result = hop.send()
        hop.expect(transport, b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        hop.reply(proto, "250 ok", "250 ok", "354 go")
        hop.expect(transport, BODY + b".\r\n")
        hop.reply(proto, "250 queued")
        self.assertIsInstance(result[0], DeliveryResult)
        self.assertEqual(len(hop.reactor.tcpClients), 1)

    def test_tls_carries_over(self) -> None:
        """
        STARTTLS and the second EHLO happen once per connection; the
        reused connection goes straight to MAIL.
        """
        hop = PooledHop(self, tls=TLSPolicy("encrypt"))
        result = hop.send()
        proto, transport = hop.greet("STARTTLS")
        hop.expect(transport, b"STARTTLS\r\n")
        hop.reply(proto, "220 go ahead")
        self.assertIsNotNone(transport.tls_context)
        hop.expect(transport, b"EHLO relay.test\r\n")
        hop.reply(proto, "250 hop.test")
        hop.transact(proto, transport, result)
        result = hop.send()
        hop.transact(proto, transport, result)
        self.assertEqual(len(hop.reactor.tcpClients), 1)

    def test_idle_timeout(self) -> None:
        """
        An idle connection is closed with QUIT after idle_timeout seconds;
        the next envelope connects afresh.
        """
        hop = PooledHop(self, pool=PoolLimits(idle_timeout=5))
        proto, transport = hop.first()
        hop.reactor.advance(4.9)
        hop.expect(transport, b"")
        self.assertFalse(transport.disconnecting)
        hop.reactor.advance(0.1)
        hop.expect(transport, b"QUIT\r\n")
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        result = hop.send()
        proto2, transport2 = hop.greet()
        hop.transact(proto2, transport2, result)

    def test_closed_while_idle(self) -> None:
        """
        A connection the hop closes while idle leaves the pool (and its
        timer is cancelled); the next envelope connects afresh.
        """
        hop = PooledHop(self)
        proto, transport = hop.first()
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(hop.reactor.getDelayedCalls(), [])
        result = hop.send()
        hop.expect(transport, b"")
        proto2, transport2 = hop.greet()
        hop.transact(proto2, transport2, result)

    def test_unsolicited_reply_while_idle(self) -> None:
        """
        A connection on which the hop said something while idle (such as
        a 421 before closing) is not reused.
        """
        hop = PooledHop(self)
        proto, transport = hop.first()
        hop.reply(proto, "421 4.4.2 idle too long")
        result = hop.send()
        hop.expect(transport, b"QUIT\r\n")
        self.assertTrue(transport.disconnecting)
        proto2, transport2 = hop.greet()
        hop.transact(proto2, transport2, result)

    def test_421_on_mail_retries_fresh(self) -> None:
        """
        A 421 to MAIL FROM on a reused connection retries the envelope once
        on a fresh connection, which delivers it.
        """
        hop = PooledHop(self)
        proto, transport = hop.first()
        result = hop.send()
        hop.expect(transport, b"MAIL FROM:<alice@example.org>\r\n")
        hop.reply(proto, "421 4.4.2 closing")
        self.assertEqual(result, [])
        self.assertTrue(transport.disconnecting)
        proto2, transport2 = hop.greet()
        hop.transact(proto2, transport2, result)

    def test_closed_at_mail_retries_fresh(self) -> None:
        """
        A reused connection that turns out closed while MAIL FROM awaits
        its reply retries once on a fresh connection.
        """
        hop = PooledHop(self)
        proto, transport = hop.first()
        result = hop.send()
        hop.expect(transport, b"MAIL FROM:<alice@example.org>\r\n")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(result, [])
        proto2, transport2 = hop.greet()
        hop.transact(proto2, transport2, result)

    def test_421_on_fresh_connection_not_retried(self) -> None:
        """
        A 421 to MAIL FROM on a fresh connection is an ordinary transient
        failure: no second connection.
        """
        hop = PooledHop(self)
        result = hop.send()
        proto, transport = hop.greet()
        hop.expect(transport, b"MAIL FROM:<alice@example.org>\r\n")
        hop.reply(proto, "421 4.4.2 closing")
        self.assertIsInstance(result[0], Failure)
        result[0].trap(DeliveryError)
        self.assertFalse(result[0].value.permanent)
        self.assertEqual(len(hop.reactor.tcpClients), 1)

    def test_max_reuse(self) -> None:
        """
        After max_reuse transactions the connection is closed with QUIT and
        the next envelope connects afresh.
        """
        hop = PooledHop(self, pool=PoolLimits(max_reuse=2))
        proto, transport = hop.first()
        result = hop.send()
        hop.transact(proto, transport, result)
        hop.expect(transport, b"QUIT\r\n")
        self.assertTrue(transport.disconnecting)
        result = hop.send()
        self.assertEqual(len(hop.reactor.tcpClients), 2)
        proto2, transport2 = hop.greet()
        hop.transact(proto2, transport2, result)

    def test_max_idle_per_hop(self) -> None:
        """
        At most max_idle_per_hop connections per hop stay idle; one more
        finishing is closed with QUIT.
        """
        hop = PooledHop(self, pool=PoolLimits(max_idle_per_hop=1))
        first, second = hop.send(), hop.send()
        proto1, transport1 = hop.greet()
        proto2, transport2 = hop.greet()
        hop.transact(proto1, transport1, first)
        hop.transact(proto2, transport2, second)
        hop.expect(transport1, b"")
        hop.expect(transport2, b"QUIT\r\n")
        self.assertTrue(transport2.disconnecting)

    def test_all_rejected_then_reused(self) -> None:
        """
        A transaction whose recipients were all refused is reused only once
        the hop answered RSET with 250.
        """
        hop = PooledHop(self)
        result = hop.send()
        proto, transport = hop.greet()
        hop.expect(transport, b"MAIL FROM:<alice@example.org>\r\n")
        hop.reply(proto, "250 ok")
        hop.expect(transport, b"RCPT TO:<bob@example.com>\r\n")
        hop.reply(proto, "550 no")
        hop.expect(transport, b"RSET\r\n")
        self.assertEqual(result, [])
        hop.reply(proto, "250 reset")
        self.assertEqual(result[0].replies, (("bob@example.com", Reply(550, "no")),))
        result = hop.send()
        hop.transact(proto, transport, result)
        self.assertEqual(len(hop.reactor.tcpClients), 1)

    def test_421_final_reply_not_reused(self) -> None:
        """
        A 421 to the end of data (the hop is closing) ends with QUIT, not
        in the pool.
        """
        hop = PooledHop(self)
        result = hop.send()
        proto, transport = hop.greet()
        hop.expect(transport, b"MAIL FROM:<alice@example.org>\r\n")
        hop.reply(proto, "250 ok")
        hop.expect(transport, b"RCPT TO:<bob@example.com>\r\n")
        hop.reply(proto, "250 ok")
        hop.expect(transport, b"DATA\r\n")
        hop.reply(proto, "354 go")
        hop.expect(transport, BODY + b".\r\n")
        hop.reply(proto, "421 4.3.2 shutting down")
        self.assertEqual(result[0].replies, (("bob@example.com", Reply(421, "4.3.2 shutting down")),))
        hop.expect(transport, b"QUIT\r\n")
        self.assertTrue(transport.disconnecting)

    def test_failed_transaction_not_reused(self) -> None:
        """
        A transaction that failed (here MAIL FROM refused) ends with QUIT,
        not in the pool.
        """
        hop = PooledHop(self)
        result = hop.send()
        proto, transport = hop.greet()
        hop.expect(transport, b"MAIL FROM:<alice@example.org>\r\n")
        hop.reply(proto, "451 later")
        self.assertIsInstance(result[0], Failure)
        hop.expect(transport, b"QUIT\r\n")
        self.assertTrue(transport.disconnecting)

    def test_close_idle(self) -> None:
        """
        close_idle QUITs every idle connection and fires once they are
        closed; the idle timers are cancelled.
        """
        hop = PooledHop(self)
        proto, transport = hop.first()
        done: list[Any] = []
        hop.client.close_idle().addBoth(done.append)
        hop.expect(transport, b"QUIT\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(done, [])
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(done, [None])
        self.assertEqual(hop.reactor.getDelayedCalls(), [])
        result = hop.send()
        self.assertEqual(len(hop.reactor.tcpClients), 2)
        proto2, transport2 = hop.greet()
        hop.transact(proto2, transport2, result)

    def test_close_idle_aborts_after_timeout(self) -> None:
        """
        close_idle aborts connections still open after its timeout, and
        fires with nothing idle at once.
        """
        hop = PooledHop(self)
        done: list[Any] = []
        hop.client.close_idle().addBoth(done.append)
        self.assertEqual(done, [None])
        proto, transport = hop.first()
        done = []
        hop.client.close_idle(timeout=2).addBoth(done.append)
        hop.reactor.advance(2)
        self.assertTrue(transport.disconnected)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(done, [None])


def file_envelope(test: SynchronousTestCase, data: bytes) -> Envelope:
    """
    An envelope whose message is read from a file holding C{data}.
    """
    name = test.mktemp()
    with open(name, "wb") as f:
        f.write(data)
    env = envelope()
    msg = Message(env.message.headers, len(data), path=name)
    return Envelope(env.id, env.sender, env.sender_args, env.recipients, msg)


class ChunkingTests(SynchronousTestCase):
    """
    CHUNKING offered (RFC 3030): the body goes in BDAT chunks, its bytes as
    stored (no dot-stuffing, no end marker; only lone CR or LF become
    CRLF).
    """

    def test_one_chunk_with_the_envelope(self) -> None:
        """
        With PIPELINING, a message in memory that fits one chunk goes as
        BDAT n LAST in the same write as MAIL and RCPT: one round trip; the
        reply to the chunk is the final reply; a dot line goes unstuffed.
        """
        data = b"Subject: hi\r\n\r\n.\r\n..dots\r\n"
        hop = Hop(self, envelope(("bob@example.com", "carol@example.com"), data=data))
        hop.greet("PIPELINING", "CHUNKING", "SIZE 1000")
        hop.expect(
            b"MAIL FROM:<alice@example.org> SIZE=%d\r\n" % len(data)
            + b"RCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\n"
            + b"BDAT %d LAST\r\n" % len(data) + data
        )
        hop.reply("250 ok", "250 ok", "550 5.1.1 no carol", "250 2.0.0 queued")
        self.assertEqual(
            hop.success().replies,
            (
                ("bob@example.com", Reply(250, "2.0.0 queued")),
                ("carol@example.com", Reply(550, "5.1.1 no carol")),
            ),
        )
        hop.expect(b"QUIT\r\n")

    def test_without_pipelining(self) -> None:
        """
        Without PIPELINING each command waits for its reply, the chunk too.
        """
        hop = Hop(self)
        hop.greet("CHUNKING")
        hop.expect(b"MAIL FROM:<alice@example.org>\r\n")
        hop.reply("250 ok")
        hop.expect(b"RCPT TO:<bob@example.com>\r\n")
        hop.reply("250 ok")
        hop.expect(b"BDAT %d LAST\r\n" % len(BODY) + BODY)
        hop.reply("250 done")
        self.assertEqual(hop.success().replies, (("bob@example.com", Reply(250, "done")),))

    def test_line_endings_made_canonical(self) -> None:
        """
        Lone LF and CR become CRLF (a chunk holds canonical text, RFC 3030
        section 2); a CRLF split between two reads goes as it is, one half
        in each chunk; a body without a final line ending gets none (there
        is no end marker).
        """
        data = b"a\nb\rc"
        hop = Hop(self, envelope(data=data))
        hop.greet("PIPELINING", "CHUNKING")
        self.assertTrue(hop.transport.value().endswith(b"BDAT 7 LAST\r\na\r\nb\r\nc"))
        size = CHUNK_SIZE
        data = b"x" * (size - 1) + b"\r" + b"\ny\n"
        hop = Hop(self, file_envelope(self, data))
        hop.greet("PIPELINING", "CHUNKING")
        hop.transport.clear()
        hop.reply("250 ok", "250 ok")
        self.assertEqual(
            hop.transport.value(),
            b"BDAT %d\r\n" % size + b"x" * (size - 1) + b"\r"
            + b"BDAT 4 LAST\r\n\ny\r\n",
        )  # fmt: skip

    def test_chunks_pipelined(self) -> None:
        """
        A message larger than a chunk: after the RCPT replies, one BDAT per
        CHUNK_SIZE read, written without waiting for their replies, the last
        with LAST; the replies are matched afterwards.
        """
        size = CHUNK_SIZE
        data = b"a" * size + b"b" * size + b"c" * 10
        hop = Hop(self, file_envelope(self, data))
        hop.greet("PIPELINING", "CHUNKING")
        hop.expect(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.com>\r\n")
        hop.reply("250 ok", "250 ok")
        hop.expect(
            b"BDAT %d\r\n" % CHUNK_SIZE + b"a" * size + b"BDAT %d\r\n" % CHUNK_SIZE + b"b" * size
            + b"BDAT 10 LAST\r\n" + b"c" * 10
        )  # fmt: skip
        self.assertEqual(hop.result, [])
        hop.reply("250 2.0.0 Ok: 65536 bytes", "250 2.0.0 Ok: 65536 bytes", "250 2.0.0 queued")
        self.assertEqual(hop.success().replies, (("bob@example.com", Reply(250, "2.0.0 queued")),))

    def test_flow_control(self) -> None:
        """
        The chunks wait while the transport is paused, and go on when it
        resumes.
        """
        size = CHUNK_SIZE
        hop = Hop(self, envelope(data=b"a" * (3 * size)))
        hop.greet("PIPELINING", "CHUNKING")
        producer: Any = hop.transport.producer
        producer.pauseProducing()
        hop.transport.clear()
        hop.reply("250 ok", "250 ok")
        self.assertEqual(hop.transport.value(), b"BDAT %d\r\n" % CHUNK_SIZE + b"a" * size)
        producer.resumeProducing()
        self.assertEqual(hop.transport.value().count(b"BDAT "), 3)
        hop.reply("250 ok", "250 ok", "250 done")
        hop.success()

    def test_refused_mid_message(self) -> None:
        """
        A chunk refused before the last (the hop's disk filled): no chunk
        is sent after that reply is seen, the replies owed are read, the
        refusal is each accepted recipient's reply, and the session is not
        reused (its state is indeterminate): QUIT.
        """
        size = CHUNK_SIZE
        hop = Hop(self, file_envelope(self, b"a" * (5 * size)), pool=PoolLimits())
        hop.greet("PIPELINING", "CHUNKING")
        producer: Any = hop.transport.producer
        producer.pauseProducing()
        hop.transport.clear()
        hop.reply("250 ok", "250 ok")
        self.assertEqual(hop.transport.value().count(b"BDAT "), 1)
        hop.transport.clear()
        hop.reply("452 4.3.1 Insufficient system storage")
        producer.resumeProducing()
        self.assertEqual(
            hop.success().replies,
            (("bob@example.com", Reply(452, "4.3.1 Insufficient system storage")),),
        )
        hop.expect(b"QUIT\r\n")
        self.assertTrue(hop.transport.disconnecting)

    def test_refusal_read_after_the_last(self) -> None:
        """
        A refusal of an earlier chunk read only after the last chunk went
        is still the message's reply (not the hop's answer to the last
        chunk, which it threw away).
        """
        size = CHUNK_SIZE
        hop = Hop(self, envelope(data=b"a" * (2 * size)))
        hop.greet("PIPELINING", "CHUNKING")
        hop.transport.clear()
        hop.reply("250 ok", "250 ok")
        self.assertEqual(hop.transport.value().count(b"BDAT "), 2)
        hop.reply("552 5.3.4 too big", "554 5.0.0 discarded")
        self.assertEqual(hop.success().replies, (("bob@example.com", Reply(552, "5.3.4 too big")),))

    def test_hop_lost_mid_chunk(self) -> None:
        """
        The hop closing the connection while chunks are owed: a transient
        error, nothing more written.
        """
        size = CHUNK_SIZE
        hop = Hop(self, envelope(data=b"a" * (3 * size)))
        hop.greet("PIPELINING", "CHUNKING")
        producer: Any = hop.transport.producer
        producer.pauseProducing()
        hop.reply("250 ok", "250 ok")
        hop.transport.clear()
        hop.protocol.connectionLost(Failure(ConnectionDone("gone")))
        err = hop.error()
        self.assertFalse(err.permanent)
        self.assertEqual(hop.transport.value(), b"")

    def test_every_recipient_refused(self) -> None:
        """
        Every recipient refused with the chunk pipelined behind them: the
        hop's reply to the chunk is read, RSET, and each recipient keeps
        its RCPT reply.
        """
        hop = Hop(self)
        hop.greet("PIPELINING", "CHUNKING")
        hop.transport.clear()
        hop.reply("250 ok", "550 5.1.1 no bob", "554 5.5.1 No valid recipients")
        hop.expect(b"RSET\r\nQUIT\r\n")
        self.assertEqual(hop.success().replies, (("bob@example.com", Reply(550, "5.1.1 no bob")),))

    def test_mail_refused(self) -> None:
        """
        MAIL refused with the chunk pipelined behind it: the MAIL reply is
        the error; the chunk's reply is read, nothing more is sent.
        """
        hop = Hop(self)
        hop.greet("PIPELINING", "CHUNKING")
        hop.transport.clear()
        hop.reply("550 5.7.1 go away", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL")
        err = hop.error()
        self.assertTrue(err.permanent)
        self.assertEqual(err.reply, Reply(550, "5.7.1 go away"))
        hop.expect(b"QUIT\r\n")

    def test_reused_after_chunks(self) -> None:
        """
        A session whose last chunk was answered 250 goes back to the pool
        and carries the next envelope.
        """
        pool = PooledHop(self)
        first = pool.send()
        proto, transport = pool.greet("PIPELINING", "CHUNKING")
        transport.clear()
        pool.reply(proto, "250 ok", "250 ok", "250 queued")
        self.assertIsInstance(first[0], DeliveryResult)
        second = pool.send()
        self.assertTrue(transport.value().endswith(b"BDAT %d LAST\r\n" % len(BODY) + BODY))
        pool.reply(proto, "250 ok", "250 ok", "250 queued")
        self.assertIsInstance(second[0], DeliveryResult)
        self.assertEqual(len(pool.connections), 1)


class DeadHostTests(SynchronousTestCase):
    """
    The client tells the MX rules which hosts refused (L{DeadHosts}).
    """

    def test_refused_host_remembered(self) -> None:
        """
        A host that refused the connection is marked dead; one that took a
        connection is alive again.
        """
        from relay.delivery.mx import DeadHosts

        reactor = MemoryReactorClock()
        dead = DeadHosts(reactor)
        client = RelayClient(
            reactor, ClientSettings(hostname="relay.test", tls=TLSPolicy("none")), dead_hosts=dead
        )
        result: list[Any] = []
        client.send("192.0.2.1:25", envelope()).addBoth(result.append)
        _, _, factory, _, _ = reactor.tcpClients[0]
        factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
        self.assertIsInstance(result[0], Failure)
        self.assertTrue(dead.is_dead("192.0.2.1"))
        client.send("192.0.2.1:25", envelope()).addBoth(result.append)
        _, _, factory, _, _ = reactor.tcpClients[1]
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 25))
        protocol.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 25)))
        self.assertFalse(dead.is_dead("192.0.2.1"))
        protocol.connectionLost(Failure(ConnectionDone()))
