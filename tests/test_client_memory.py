"""
The relay client (L{relay.delivery.client.RelayClient}) against relay's own
SMTP server with a plugin, in memory, through L{relay.testing.ClientHarness}
(L{twisted.test.iosim}, real TLS over memory BIOs): the two halves of relay
agree on the wire.

The scripted-hop tests in L{tests.test_client} pin down what the client
writes for each reply; these show that what it writes is what a real
server takes, byte for byte.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import ssl
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.client import ClientSettings, DeliveryError, PoolLimits, TLSPolicy
from relay.delivery.client_body import CHUNK_SIZE
from relay.model.address import EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.envelope import Envelope
from relay.model.message import Message
from relay.model.reply import Reply
from relay.model.results import Continue, Reject
from relay.simple import Defaults, Simple
from relay.spool.memory import MemoryMessageWriter, MemorySpool
from relay.testing import ClientHarness, TranscriptMismatch, make_envelope
from tests.pki import certificate
from tests.transcripts import ehlo_reply

SETTINGS = ClientSettings(hostname="relay.test", tls=TLSPolicy("none"))


def received(harness: ClientHarness, index: int = 0) -> bytes:
    """
    The bytes the server stored for its C{index}th spooled entry, without
    the Received header it put on top.
    """
    data = harness.message(harness.spooled[index]).data
    assert data is not None
    head, _, rest = data.partition(b"\r\nSubject:")
    assert head.startswith(b"Received: "), data
    return b"Subject:" + rest


class Unknown(Simple):
    """
    Refuses recipients whose local part is C{nobody}, and senders at
    C{spam.example}.
    """

    def process_sender(self, log: Any, session: Any, sender: Sender, sender_args: Any) -> Any:
        if sender.address is not None and sender.address.domain == "spam.example":
            return Reject(Reply(550, "5.7.1 no spam, thanks"))
        return Continue()

    def process_recipient(
        self, log: Any, session: Any, sender: Any, sender_args: Any, recipient: EmailAddress
    ) -> Any:
        if recipient.local_part == "nobody":
            return Reject(Reply(550, "5.1.1 no such user"))
        return Continue()


class DeliveryTests(SynchronousTestCase):
    """
    Plain-text transactions.
    """

    def test_bytes_arrive_exactly(self) -> None:
        """
        With DATA (a server without CHUNKING) the body arrives as sent,
        whatever it holds: dot lines and leading dots are stuffed on the
        wire and unstuffed by the server, lone LF and CR become CRLF, a
        body without a final line ending gets one.
        """
        body = b"Subject: dots\r\n\r\n.\r\n..two\r\n.lead\nbare lf\rbare cr\r\nend."
        harness = ClientHarness(settings=SETTINGS, chunking=False)
        result = harness.deliver(make_envelope("a@example.org", "b@example.com", body))
        self.assertEqual([r.code for _, r in result.replies], [250])
        self.assertEqual(
            received(harness),
            b"Subject: dots\r\n\r\n.\r\n..two\r\n.lead\r\nbare lf\r\nbare cr\r\nend.\r\n",
        )
        self.assertIn("> ...two", harness.connections[0].transcript)

    def test_bytes_arrive_exactly_in_chunks(self) -> None:
        """
        With BDAT (relay's server offers CHUNKING) the body arrives as
        sent too, with nothing stuffed on the wire: lone LF and CR become
        CRLF, and a body without a final line ending stays so.
        """
        body = b"Subject: dots\r\n\r\n.\r\n..two\r\n.lead\nbare lf\rbare cr\r\nend."
        harness = ClientHarness(settings=SETTINGS)
        result = harness.deliver(make_envelope("a@example.org", "b@example.com", body))
        self.assertEqual([r.code for _, r in result.replies], [250])
        self.assertEqual(
            received(harness),
            b"Subject: dots\r\n\r\n.\r\n..two\r\n.lead\r\nbare lf\r\nbare cr\r\nend.",
        )
        transcript = harness.connections[0].transcript
        self.assertIn("> ..two", transcript)
        self.assertNotIn("> DATA", transcript)

    def test_large_body(self) -> None:
        """
        A body of several chunks of CHUNK_SIZE, with a dot line across a chunk
        boundary, arrives whole.
        """
        size = CHUNK_SIZE
        body = b"Subject: big\r\n\r\n" + b"x" * (size - 18) + b"\r\n.y\r\n" + b"z" * (2 * size) + b"\r\n"
        harness = ClientHarness(settings=SETTINGS)
        harness.deliver(make_envelope("a@example.org", "b@example.com", body))
        self.assertEqual(received(harness), body)

    def test_pipelining(self) -> None:
        """
        The server offers PIPELINING and CHUNKING: MAIL, both RCPTs and the
        message as BDAT LAST go in one write, before any reply; the
        transaction ends with one spooled entry for both recipients, and
        QUIT without the pool.
        """
        harness = ClientHarness(settings=replace(SETTINGS, pool=PoolLimits(max_idle_per_hop=0)))
        harness.deliver(make_envelope("a@example.org", ["b@example.com", "c@example.com"]))
        harness.connections[0].check(
            f"""
            < 220 localhost ESMTP
            > EHLO relay.test
            {ehlo_reply()}
            > MAIL FROM:<a@example.org> SIZE=34
            > RCPT TO:<b@example.com>
            > RCPT TO:<c@example.com>
            > BDAT 34 LAST
            > Subject: test
            >
            > A test message.
            < 250 2.1.0
            < 250 2.1.5
            < 250 2.1.5
            < 250 2.0.0 Ok: queued as
            > QUIT
            < 221
            """
        )
        (entry,) = harness.spooled
        self.assertEqual([str(r) for r in entry.recipients], ["b@example.com", "c@example.com"])
        self.assertTrue(harness.connections[0].closed)

    def test_pipelining_data(self) -> None:
        """
        A server that offers PIPELINING but not CHUNKING: MAIL, both RCPTs
        and DATA go in one write, the body after the 354.
        """
        harness = ClientHarness(
            settings=replace(SETTINGS, pool=PoolLimits(max_idle_per_hop=0)), chunking=False
        )
        harness.deliver(make_envelope("a@example.org", ["b@example.com", "c@example.com"]))
        harness.connections[0].check(
            """
            < 220 localhost ESMTP
            > EHLO relay.test
            < 250-localhost
            < 250-PIPELINING
            < 250-SIZE
            < 250-8BITMIME
            < 250-DSN
            < 250-ENHANCEDSTATUSCODES
            < 250 SMTPUTF8
            > MAIL FROM:<a@example.org> SIZE=
            > RCPT TO:<b@example.com>
            > RCPT TO:<c@example.com>
            > DATA
            < 250 2.1.0
            < 250 2.1.5
            < 250 2.1.5
            < 354
            > Subject: test
            >
            > A test message.
            > .
            < 250 2.0.0 Ok: queued as
            > QUIT
            < 221
            """
        )
        (entry,) = harness.spooled
        self.assertEqual([str(r) for r in entry.recipients], ["b@example.com", "c@example.com"])
        self.assertTrue(harness.connections[0].closed)

    def test_recipient_refused(self) -> None:
        """
        A recipient the plugin refuses keeps the server's 550; the others
        get the reply to the end of data, and only they are spooled.
        """
        harness = ClientHarness(Unknown(), settings=SETTINGS)
        result = harness.deliver(
            make_envelope("a@example.org", ["b@example.com", "nobody@example.com"])
        )
        self.assertEqual(result.replies[1], ("nobody@example.com", Reply(550, "5.1.1 no such user")))
        self.assertEqual(result.replies[0][1].code, 250)
        (entry,) = harness.spooled
        self.assertEqual([str(r) for r in entry.recipients], ["b@example.com"])

    def test_every_recipient_refused(self) -> None:
        """
        Every recipient refused: the server refuses the pipelined chunk
        (554 5.5.1, having read it), the client RSETs, nothing is spooled,
        and the session is reused.
        """
        harness = ClientHarness(Unknown(), settings=SETTINGS)
        result = harness.deliver(make_envelope("a@example.org", "nobody@example.com"))
        self.assertEqual(result.replies, (("nobody@example.com", Reply(550, "5.1.1 no such user")),))
        self.assertEqual(harness.spooled, [])
        self.assertIn("< 554 5.5.1 No valid recipients", harness.connections[0].transcript)
        self.assertIn("> RSET", harness.connections[0].transcript)
        harness.deliver(make_envelope("a@example.org", "b@example.com"))
        self.assertEqual(len(harness.connections), 1)
        self.assertEqual(len(harness.spooled), 1)

    def test_mail_refused(self) -> None:
        """
        A 5xx to MAIL FROM from the plugin is a permanent L{DeliveryError}
        carrying the server's reply; the client ends with QUIT.
        """
        harness = ClientHarness(Unknown(), settings=SETTINGS)
        with self.assertRaises(DeliveryError) as caught:
            harness.deliver(make_envelope("bot@spam.example", "b@example.com"))
        self.assertTrue(caught.exception.permanent)
        self.assertEqual(caught.exception.reply, Reply(550, "5.7.1 no spam, thanks"))
        self.assertEqual(caught.exception.address, ("192.0.2.25", 25))
        self.assertEqual(harness.spooled, [])
        self.assertEqual(harness.connections[0].transcript[-2:], ("> QUIT", "< 221 2.0.0 Bye"))

    def test_connection_reused(self) -> None:
        """
        A second envelope to the same hop goes on the first one's
        connection: one greeting and EHLO, two transactions; close QUITs.
        """
        harness = ClientHarness(settings=SETTINGS)
        harness.deliver(make_envelope("a@example.org", "b@example.com", id="one"))
        harness.deliver(make_envelope("a@example.org", "c@example.com", id="two"))
        self.assertEqual(len(harness.connections), 1)
        self.assertEqual(len(harness.spooled), 2)
        transcript = harness.connections[0].transcript
        self.assertEqual(sum(line.startswith("> EHLO") for line in transcript), 1)
        self.assertEqual(sum(line.startswith("> MAIL FROM") for line in transcript), 2)
        self.assertFalse(harness.connections[0].closed)
        harness.close()
        self.assertEqual(transcript[-1], "< 250 2.0.0 Ok: queued as " + harness.spooled[1].envelope_id)
        self.assertEqual(harness.connections[0].transcript[-2:], ("> QUIT", "< 221 2.0.0 Bye"))
        self.assertTrue(harness.connections[0].closed)

    def test_closed_by_server_while_idle(self) -> None:
        """
        The server's idle timeout closes a pooled connection (421): the
        next envelope opens a new one.
        """
        settings = replace(SETTINGS, pool=PoolLimits(idle_timeout=600))
        harness = ClientHarness(settings=settings, idle_timeout=60)
        harness.deliver(make_envelope("a@example.org", "b@example.com"))
        harness.advance(60)
        self.assertTrue(harness.connections[0].closed)
        harness.deliver(make_envelope("a@example.org", "b@example.com"))
        self.assertEqual(len(harness.connections), 2)
        self.assertEqual(len(harness.spooled), 2)

    def test_smtputf8(self) -> None:
        """
        A non-ASCII recipient goes with SMTPUTF8, which the server offers,
        and arrives as the same address.
        """
        harness = ClientHarness(settings=SETTINGS)
        harness.deliver(make_envelope("a@example.org", "j\u00f6rg@b\u00fccher.example"))
        mail = [x for x in harness.connections[0].transcript if x.startswith("> MAIL")]
        self.assertEqual(mail, ["> MAIL FROM:<a@example.org> SIZE=34 SMTPUTF8"])
        (entry,) = harness.spooled
        self.assertEqual([str(r) for r in entry.recipients], ["j\u00f6rg@b\u00fccher.example"])
        self.assertIn(Argument("SMTPUTF8"), entry.sender_args)

    def test_size_limit(self) -> None:
        """
        A message over the server's advertised SIZE is refused by the
        client, permanently, without MAIL FROM.
        """
        harness = ClientHarness(settings=SETTINGS, max_message_size=100)
        with self.assertRaises(DeliveryError) as caught:
            harness.deliver(make_envelope("a@example.org", "b@example.com", b"Subject: x\r\n\r\n" + b"y" * 200))
        self.assertTrue(caught.exception.permanent)
        self.assertFalse(any(x.startswith("> MAIL") for x in harness.connections[0].transcript))

    def test_transcript_mismatch(self) -> None:
        """
        A script that does not match the session says where.
        """
        harness = ClientHarness(settings=SETTINGS)
        harness.deliver(make_envelope("a@example.org", "b@example.com"))
        with self.assertRaises(TranscriptMismatch) as caught:
            harness.connections[0].check("< 220\n> HELO relay.test\n")
        self.assertIn("line 2", str(caught.exception))
        self.assertIn("- > HELO relay.test", str(caught.exception))
        with self.assertRaises(TranscriptMismatch):
            harness.connections[0].check("< 220\n")


class FailingSpool(MemorySpool):
    """
    A memory spool whose message writers fail from their third write on
    (our Received header and a first chunk get in).
    """

    def receive(self, message_id: str) -> MemoryMessageWriter:
        writer = super().receive(message_id)
        write, calls = writer.write, [0]

        def failing(data: bytes) -> bool:
            calls[0] += 1
            if calls[0] > 2:
                raise OSError(28, "No space left on device")
            return write(data)

        writer.write = failing  # type: ignore[method-assign]
        return writer


class ChunkingTests(SynchronousTestCase):
    """
    BDAT between relay's client and relay's server.
    """

    def file_envelope(self, data: bytes) -> Envelope:
        name = self.mktemp()
        with open(name, "wb") as f:
            f.write(data)
        env = make_envelope("a@example.org", "b@example.com")
        return replace(env, message=Message(env.message.headers, len(data), path=name))

    def test_message_file_in_chunks(self) -> None:
        """
        A message read from a file goes in one chunk per CHUNK_SIZE read,
        pipelined, each answered 250 with its size; the server stores the
        bytes as they were in the file (a dot line, a CRLF across a read
        boundary).
        """
        size = CHUNK_SIZE
        data = b"Subject: file\r\n\r\n" + b"x" * (size - 18) + b"\r\n.\r\n" + b"y" * size + b"\r\n"
        harness = ClientHarness(settings=SETTINGS)
        result = harness.deliver(self.file_envelope(data))
        self.assertEqual([r.code for _, r in result.replies], [250])
        self.assertEqual(received(harness), data)
        transcript = harness.connections[0].transcript
        # (The transcript's lines are split at LF: a chunk's bytes run into
        # the BDAT command after them.)
        self.assertEqual(
            [line.rpartition("BDAT")[2] for line in transcript if "BDAT" in line],
            [f" {CHUNK_SIZE}", f" {CHUNK_SIZE}", " 6 LAST"],
        )
        self.assertEqual(
            [line for line in transcript if line.startswith("< 250 2.0.0")],
            [
                f"< 250 2.0.0 Ok: {CHUNK_SIZE} bytes",
                f"< 250 2.0.0 Ok: {CHUNK_SIZE} bytes",
                f"< 250 2.0.0 Ok: queued as {harness.spooled[0].envelope_id}",
            ],
        )

    def test_server_fails_mid_message(self) -> None:
        """
        The server's spool failing under a chunk: the server answers that
        chunk 452 and throws the rest away; the client takes the 452 as the
        recipient's (temporary) reply; nothing is spooled, and the session,
        whose transaction the last chunk ended, carries the next message.
        """
        size = CHUNK_SIZE
        harness = ClientHarness(settings=SETTINGS, spool=FailingSpool())
        result = harness.deliver(self.file_envelope(b"z" * (3 * size)))
        self.assertEqual(
            result.replies, (("b@example.com", Reply(452, "4.3.1 Insufficient system storage")),)
        )
        self.assertEqual(harness.spooled, [])
        transcript = harness.connections[0].transcript
        self.assertIn(f"< 554 5.0.0 Error: {CHUNK_SIZE} bytes discarded after an earlier error", transcript)
        self.flushLoggedErrors(OSError)
        harness.factory.spool = MemorySpool(harness.reactor)
        harness.deliver(make_envelope("a@example.org", "b@example.com"))
        self.assertEqual(len(harness.connections), 1)

    def test_server_without_chunking(self) -> None:
        """
        A server that does not offer CHUNKING gets DATA, and the same bytes.
        """
        size = CHUNK_SIZE
        data = b"Subject: file\r\n\r\n" + b"x" * (2 * size) + b"\r\n"
        harness = ClientHarness(settings=SETTINGS, chunking=False)
        harness.deliver(self.file_envelope(data))
        self.assertEqual(received(harness), data)
        transcript = harness.connections[0].transcript
        self.assertIn("> DATA", transcript)
        self.assertFalse(any(line.startswith("> BDAT") for line in transcript))


# -- TLS ------------------------------------------------------------------------------


def tls_harness(
    pem: bytes, tls: TLSPolicy, callbacks: object = None, **kwargs: Any
) -> ClientHarness:
    """
    A harness whose server offers STARTTLS with the certificate C{pem}.
    """
    server_context = ssl.PrivateCertificate.loadPEM(pem).options()
    return ClientHarness(
        callbacks,
        settings=replace(SETTINGS, tls=tls, **kwargs),
        tls_context_factory=server_context,
    )


class TLSTests(SynchronousTestCase):
    """
    STARTTLS with a real handshake, and AUTH over it.
    """

    def test_encrypt(self) -> None:
        """
        tls="encrypt" takes STARTTLS, says EHLO again and delivers over
        TLS: the server's Received header says ESMTPS with the negotiated
        cipher; the reused connection stays encrypted.
        """
        harness = tls_harness(certificate("mx.example.test"), TLSPolicy("encrypt"))
        harness.deliver(make_envelope("a@example.org", "b@example.com"))
        harness.deliver(make_envelope("a@example.org", "c@example.com"))
        harness.connections[0].check(
            f"""
            < 220
            > EHLO relay.test
            {ehlo_reply("STARTTLS")}
            > STARTTLS
            < 220 2.0.0 Ready to start TLS
            > EHLO relay.test
            {ehlo_reply()}
            > MAIL FROM:<a@example.org>
            > RCPT TO:<b@example.com>
            > BDAT 34 LAST
            > Subject: test
            >
            > A test message.
            < 250
            < 250
            < 250
            > MAIL FROM:<a@example.org>
            > RCPT TO:<c@example.com>
            > BDAT 34 LAST
            > Subject: test
            >
            > A test message.
            < 250
            < 250
            < 250
            """
        )
        for index in (0, 1):
            data = harness.message(harness.spooled[index]).data or b""
            self.assertRegex(data, rb"\(using TLS\S+ with cipher \S+")
            self.assertIn(b" with ESMTPS id ", data)

    def test_verify(self) -> None:
        """
        tls="verify" delivers to a hop whose certificate, from the trust
        root, names it: a host name, then an IP address.
        """
        for hop, name in (("mx.example.test:25", "mx.example.test"), ("192.0.2.25:25", "192.0.2.25")):
            pem = certificate(name)
            policy = TLSPolicy("verify", trust_root=ssl.Certificate.loadPEM(pem))
            harness = tls_harness(pem, policy)
            harness.deliver(make_envelope("a@example.org", "b@example.com"), hop)
            self.assertEqual(len(harness.spooled), 1, hop)

    def test_verify_wrong_name(self) -> None:
        """
        tls="verify" refuses a certificate for another name: the handshake
        fails, the error is transient, nothing is delivered.
        """
        pem = certificate("other.example.test")
        policy = TLSPolicy("verify", trust_root=ssl.Certificate.loadPEM(pem))
        harness = tls_harness(pem, policy)
        with self.assertRaises(DeliveryError) as caught:
            harness.deliver(make_envelope("a@example.org", "b@example.com"), "mx.example.test:25")
        self.assertFalse(caught.exception.permanent)
        self.assertEqual(harness.spooled, [])
        self.assertFalse(any(x.startswith("> MAIL") for x in harness.connections[0].transcript))

    def test_verify_without_subject_alt_name(self) -> None:
        """
        A certificate from the trust root with the hop's name only as its
        common name, which Twisted lets through with a logged complaint,
        is refused by the client's own check: 4.7.5, nothing delivered.
        """
        from service_identity import CertificateError

        pem = certificate("mx.example.test", san=False)
        policy = TLSPolicy("verify", trust_root=ssl.Certificate.loadPEM(pem))
        harness = tls_harness(pem, policy)
        with self.assertRaises(DeliveryError) as caught:
            harness.deliver(make_envelope("a@example.org", "b@example.com"), "mx.example.test:25")
        self.assertFalse(caught.exception.permanent)
        assert caught.exception.reply is not None
        self.assertEqual(caught.exception.reply.enhanced_status, "4.7.5")
        self.assertEqual(harness.spooled, [])
        self.flushLoggedErrors(CertificateError)

    def test_verify_untrusted(self) -> None:
        """
        tls="verify" refuses a certificate that names the hop but is not
        from the trust root.
        """
        pem = certificate("mx.example.test")
        other = certificate("mx.example.test")
        policy = TLSPolicy("verify", trust_root=ssl.Certificate.loadPEM(other))
        harness = tls_harness(pem, policy)
        with self.assertRaises(DeliveryError):
            harness.deliver(make_envelope("a@example.org", "b@example.com"), "mx.example.test:25")
        self.assertEqual(harness.spooled, [])

    def test_auth(self) -> None:
        """
        With credentials the client authenticates after STARTTLS (the
        server offers AUTH only then); the server's plugin sees the user,
        and the Received header says ESMTPSA.
        """
        defaults = Defaults(
            hostname="localhost",
            checker=InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret"),
        )
        server_context = ssl.PrivateCertificate.loadPEM(certificate("mx.example.test")).options()
        harness = ClientHarness(
            Simple(),
            defaults=defaults,
            settings=replace(SETTINGS, tls=TLSPolicy("encrypt"), auth=("alice", "secret")),
            tls_context_factory=server_context,
        )
        harness.deliver(make_envelope("a@example.org", "b@example.com"))
        transcript = harness.connections[0].transcript
        self.assertIn("> AUTH PLAIN AGFsaWNlAHNlY3JldA==", transcript)
        self.assertIn("< 235 2.7.0 Authentication successful", transcript)
        self.assertIn(b" with ESMTPSA id ", harness.message(harness.spooled[0]).data or b"")

    def test_auth_refused(self) -> None:
        """
        Wrong credentials: the server's 535 fails the attempt, transiently.
        """
        defaults = Defaults(
            hostname="localhost",
            checker=InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret"),
        )
        server_context = ssl.PrivateCertificate.loadPEM(certificate("mx.example.test")).options()
        harness = ClientHarness(
            Simple(),
            defaults=defaults,
            settings=replace(SETTINGS, tls=TLSPolicy("encrypt"), auth=("alice", "wrong")),
            tls_context_factory=server_context,
        )
        with self.assertRaises(DeliveryError) as caught:
            harness.deliver(make_envelope("a@example.org", "b@example.com"))
        assert caught.exception.reply is not None
        self.assertEqual(caught.exception.reply.code, 535)
        self.assertFalse(caught.exception.permanent)
        self.assertEqual(harness.spooled, [])


# -- TLS per destination ----------------------------------------------------------


def dane_ee(cert: Any, selector: int = 1) -> Any:
    """
    The DANE-EE(3) SHA-256 record of C{cert} (its key, or the whole
    certificate with C{selector} 0).
    """
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from relay.delivery.dane import TLSARecord

    if selector == 0:
        data = cert.public_bytes(serialization.Encoding.DER)
    else:
        data = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return TLSARecord(3, selector, 1, hashlib.sha256(data).digest())


class DestinationTLSTests(SynchronousTestCase):
    """
    The policies chosen per destination, over real TLS: DANE, verify with
    match= names, MTA-STS in testing mode, SNI, and what the attempt says.
    """

    def setUp(self) -> None:
        from tests.pki import pki

        self.leaf, self.key = pki().leaf("mx.example.test")

    def harness(self, tls: TLSPolicy, leaf: Any = None) -> ClientHarness:
        """
        A server presenting C{leaf} (this test's certificate for
        mx.example.test by default) with the intermediate.
        """
        from OpenSSL import crypto

        from tests.pki import pki

        leaf, key = (self.leaf, self.key) if leaf is None else leaf
        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(leaf),
            extraCertChain=[crypto.X509.from_cryptography(pki().intermediate)],
        )
        return ClientHarness(settings=replace(SETTINGS, tls=tls), tls_context_factory=options)

    def test_dane_ee_delivers(self) -> None:
        """
        A DANE-EE record of the server's key: delivered over TLS, SNI the
        MX host name, the attempt's TLS outcome C{dane from dane: ok}.
        """
        from relay.model.entry import TLSOutcome

        policy = TLSPolicy("dane", tlsa=(dane_ee(self.leaf),), source="dane")
        harness = self.harness(policy)
        result = harness.deliver(make_envelope("a@example.org", "b@example.com"), "mx.example.test:25")
        self.assertEqual(result.tls, TLSOutcome("dane", "dane", "ok"))
        self.assertEqual(len(harness.spooled), 1)
        server = harness.connections[0].server_transport.getHandle()
        self.assertEqual(server.get_servername(), b"mx.example.test")

    def test_dane_mismatch_defers(self) -> None:
        """
        TLSA records the chain does not match: 4.7.5, temporary, QUIT
        without MAIL; the outcome says validation-failure.
        """
        from tests.pki import pki

        other, _ = pki().leaf("mx.example.test")
        policy = TLSPolicy("dane", tlsa=(dane_ee(other, 0),), source="dane")
        harness = self.harness(policy)
        with self.assertRaises(DeliveryError) as caught:
            harness.deliver(make_envelope("a@example.org", "b@example.com"), "mx.example.test:25")
        error = caught.exception
        self.assertFalse(error.permanent)
        assert error.reply is not None and error.tls is not None
        self.assertEqual(error.reply.enhanced_status, "4.7.5")
        self.assertEqual((error.tls.policy, error.tls.result), ("dane", "validation-failure"))
        self.assertEqual(harness.spooled, [])
        transcript = harness.connections[0].transcript
        self.assertFalse(any(x.startswith("> MAIL") for x in transcript))
        self.assertEqual(transcript[-2:], ("> QUIT", "< 221 2.0.0 Bye"))

    def test_dane_ta(self) -> None:
        """
        DANE-TA: the intermediate, presented in the chain, as trust anchor
        for the MX host name; another host name is a host mismatch.
        """
        import hashlib

        from cryptography.hazmat.primitives.serialization import Encoding

        from relay.delivery.dane import TLSARecord
        from tests.pki import pki

        digest = hashlib.sha256(pki().intermediate.public_bytes(Encoding.DER)).digest()
        policy = TLSPolicy("dane", tlsa=(TLSARecord(2, 0, 1, digest),), source="dane")
        result = self.harness(policy).deliver(
            make_envelope("a@example.org", "b@example.com"), "mx.example.test:25"
        )
        self.assertEqual(result.tls and result.tls.result, "ok")
        with self.assertRaises(DeliveryError) as caught:
            self.harness(policy).deliver(
                make_envelope("a@example.org", "b@example.com"), "mx2.example.test:25"
            )
        self.assertEqual(caught.exception.tls and caught.exception.tls.result, "certificate-host-mismatch")

    def test_verify_match_names_and_expiry(self) -> None:
        """
        C{verify} accepts a certificate for a C{match=} name; an expired
        certificate from the trusted CA is certificate-expired.
        """
        from tests.pki import pki

        root = pki().trust_root()
        alt = pki().leaf("alt.example.test")
        policy = TLSPolicy("verify", trust_root=root, match=("alt.example.test",), source="file")
        result = self.harness(policy, alt).deliver(
            make_envelope("a@example.org", "b@example.com"), "mx.example.test:25"
        )
        self.assertEqual(result.tls and (result.tls.policy, result.tls.source, result.tls.result),
                         ("verify", "file", "ok"))  # fmt: skip
        with self.assertRaises(DeliveryError) as caught:
            self.harness(TLSPolicy("verify", trust_root=root), alt).deliver(
                make_envelope("a@example.org", "b@example.com"), "mx.example.test:25"
            )
        self.assertEqual(caught.exception.tls and caught.exception.tls.result, "certificate-host-mismatch")
        expired = pki().leaf("mx.example.test", expired=True)
        with self.assertRaises(DeliveryError) as caught:
            self.harness(TLSPolicy("verify", trust_root=root), expired).deliver(
                make_envelope("a@example.org", "b@example.com"), "mx.example.test:25"
            )
        self.assertEqual(caught.exception.tls and caught.exception.tls.result, "certificate-expired")

    def test_mta_sts_testing_records_and_delivers(self) -> None:
        """
        MTA-STS in testing mode: a certificate for another name is recorded
        (certificate-host-mismatch) and the message goes all the same.
        """
        from tests.pki import pki

        policy = TLSPolicy("verify", trust_root=pki().trust_root(), name="mta-sts",
                           source="mta-sts", enforced=False)  # fmt: skip
        result = self.harness(policy, pki().leaf("other.example.test")).deliver(
            make_envelope("a@example.org", "b@example.com"), "mx.example.test:25"
        )
        self.assertEqual(result.tls and (result.tls.policy, result.tls.result),
                         ("mta-sts", "certificate-host-mismatch"))  # fmt: skip

    def test_required_tls_not_offered(self) -> None:
        """
        DANE with a hop that offers no STARTTLS: 4.7.0, starttls-not-supported.
        """
        harness = ClientHarness(settings=replace(SETTINGS, tls=TLSPolicy("dane", tlsa=(dane_ee(self.leaf),))))
        with self.assertRaises(DeliveryError) as caught:
            harness.deliver(make_envelope("a@example.org", "b@example.com"), "mx.example.test:25")
        self.assertEqual(caught.exception.tls and caught.exception.tls.result, "starttls-not-supported")

    def test_sessions_kept_per_policy(self) -> None:
        """
        With policies per destination, a connection opened under one policy
        is not reused for mail that asks another; a policy that refuses the
        hop makes no connection at all.
        """
        from relay.delivery.client import RelayClient
        from relay.delivery.nexthop import Destination
        from relay.delivery.tlspolicy import PolicyFile, TLSPolicies

        policies = TLSPolicies(
            TLSPolicy("encrypt"), policy_file=PolicyFile(["strict.test dane-only"])
        )
        harness = self.harness(TLSPolicy("encrypt"))
        harness.client = RelayClient(harness.reactor, replace(SETTINGS, tls=TLSPolicy("encrypt")),
                                     policies=policies)  # fmt: skip
        hop = "mx.example.test:25"
        for destination in (Destination(None), Destination(None, chosen="may"), Destination(None)):
            d = harness.client.send(hop, make_envelope("a@example.org", "b@example.com"), destination)
            harness.pump()
            self.assertEqual(self.successResultOf(d).tls.policy, destination.chosen or "encrypt")  # type: ignore[union-attr]
        self.assertEqual(len(harness.connections), 2)
        d = harness.client.send(hop, make_envelope("a@example.org", "b@strict.test"),
                                Destination("strict.test"))  # fmt: skip
        harness.pump()
        error = self.failureResultOf(d, DeliveryError).value
        self.assertEqual(error.tls.result, "dane-required")
        self.assertEqual(len(harness.connections), 2)
