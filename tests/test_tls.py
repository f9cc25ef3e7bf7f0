"""
Tests for L{relay.smtp.tls} (the certificate chain, the reloadable server
context, implicit-TLS listeners), L{relay.app.reload} (SIGHUP), and implicit
TLS in the server, the options, the service and the receivers.

Certificates are made here with C{cryptography}: a root CA, an
intermediate signed by it, and server certificates signed by the
intermediate.  Handshakes run in memory (L{TLSMemoryBIOFactory} over
L{twisted.test.iosim}); only the C{twistd} tests at the end use loopback.
"""

from __future__ import annotations

import os
import signal
import smtplib
import ssl as stdlib_ssl
import subprocess
import sys
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import ssl
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relay.app.build import load_tls_context
from relay.app.channel import CHANNEL_FD, StartMessage, encode_message
from relay.app.listener import Listener, parse_listener
from relay.app.pool import ReceiverPool
from relay.app.receiver import Receiver
from relay.app.reload import ReloadError, ReloadService
from relay.app.settings import Settings
from relay.interfaces import IReloadable
from relay.model.results import Continue
from relay.service import makeService
from relay.smtp.proxy import ProxyHeaderWrappingFactory
from relay.smtp.server import SMTPServerFactory
from relay.smtp.tls import (
    ImplicitTLSEndpoint,
    ServerTLSContext,
    TLSFilesError,
    load_chain,
    plain_description,
    server_endpoint,
    tls_factory,
)
from relay.tap import Options
from relay.testing import (
    MemorySpool,
    ProcessEnvelopeCall,
    QueuedRunner,
    ServerHarness,
    SessionConnectCall,
    TLSStringTransport,
)
from tests import test_integration
from tests.pki import CertificateFiles, key_pem, pki
from tests.test_integration import ROOT, free_port
from tests.test_receivers import FakeProcessTransport
from tests.test_server import MESSAGE, Recorder
from tests.transcripts import ehlo_reply

# -- in-memory TLS ----------------------------------------------------------------


@implementer(IHandshakeListener)
class Peer(Protocol):
    """
    The client end of an in-memory TLS connection: what it received, and
    how the handshake went.
    """

    def __init__(self) -> None:
        self.received = b""
        self.handshake_done = False
        self.lost: Any = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


def connect(
    server_factory: Any, client: Protocol, clock: Clock, hostname: str = "relay.test"
) -> tuple[Any, Any, Any]:
    """
    Connect C{client} in TLS (trusting only the test root, checking
    C{hostname}) to a protocol of C{server_factory}; answer the client's
    TLS protocol, the server's protocol, and the pump.
    """
    options = ssl.optionsForClientTLS(hostname, trustRoot=pki().trust_root())
    client_factory = TLSMemoryBIOFactory(
        options, True, Factory.forProtocol(lambda: client), clock=clock
    )
    client_tls, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
    )
    return client_tls, server, pump


def served_names(client_tls: Any) -> list[str]:
    """
    The common names of the certificates the server sent.
    """
    chain = client_tls.getHandle().get_peer_cert_chain() or []
    return [c.to_cryptography().subject.rfc4514_string() for c in chain]


def plain_server() -> Factory:
    return Factory.forProtocol(Protocol)


class ChainTests(SynchronousTestCase):
    """
    L{load_chain}: the certificate file's intermediates are served.
    """

    def test_client_trusting_the_root_verifies(self) -> None:
        """
        A server certificate followed by its intermediate: both are sent,
        and a client that trusts only the root completes the handshake.
        """
        files = CertificateFiles(self).write()
        context = load_tls_context(files.cert, files.key)
        clock = Clock()
        client = Peer()
        client_tls, _, pump = connect(tls_factory(context, plain_server()), client, clock)
        pump.flush()
        self.assertTrue(client.handshake_done, client.lost)
        self.assertIsNone(client.lost)
        self.assertEqual(served_names(client_tls), ["CN=relay.test", "CN=Relay Test Intermediate"])

    def test_without_intermediate_the_client_fails(self) -> None:
        """
        The control: with the server certificate alone in the file, the
        same client cannot verify it.
        """
        files = CertificateFiles(self).write(chain=False)
        context = load_tls_context(files.cert, files.key)
        client = Peer()
        _, _, pump = connect(tls_factory(context, plain_server()), client, Clock())
        pump.flush()
        self.assertFalse(client.handshake_done)
        self.assertIn("certificate verify failed", str(client.lost.value))

    def test_what_was_loaded(self) -> None:
        """
        The chain says what it holds, for the log: the files, the number
        of certificates, the subject and the expiry.
        """
        files = CertificateFiles(self).write("mail.example.test")
        chain = load_chain(files.cert, files.key)
        self.assertEqual((chain.count, chain.subject), (2, "CN=mail.example.test"))
        text = chain.describe()
        self.assertTrue(text.startswith(f"{files.cert} (2 certificates, CN=mail.example.test, "))
        self.assertRegex(text, r"valid until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\) and ")
        self.assertTrue(text.endswith(files.key))

    def test_bad_files_name_the_file(self) -> None:
        """
        Every file that cannot be used gives a L{TLSFilesError} naming it
        and the reason.
        """
        files = CertificateFiles(self).write()
        other = CertificateFiles(self).write("other.test")
        garbage = os.path.join(files.base, "garbage.pem")
        with open(garbage, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        empty = os.path.join(files.base, "empty.pem")
        open(empty, "wb").close()
        encrypted = os.path.join(files.base, "encrypted.pem")
        with open(encrypted, "wb") as f:
            f.write(key_pem(ec.generate_private_key(ec.SECP256R1()), b"secret"))
        missing = os.path.join(files.base, "missing.pem")
        for cert, key, named, reason in (
            (missing, files.key, missing, "No such file"),
            (files.cert, missing, missing, "No such file"),
            (empty, files.key, empty, "no PEM certificate"),
            (files.key, files.key, files.key, "no PEM certificate"),
            (garbage, files.key, garbage, "Unable to load PEM"),
            (files.cert, empty, empty, "no usable PEM private key"),
            (files.cert, encrypted, encrypted, "encrypted"),
            (files.cert, other.key, other.key, f"does not match the first certificate of {files.cert}"),
        ):
            with self.assertRaises(TLSFilesError, msg=(cert, key)) as raised:
                load_chain(cert, key)
            message = str(raised.exception)
            self.assertTrue(message.startswith(named + ": "), message)
            self.assertIn(reason, message)
            self.assertIsInstance(raised.exception, ReloadError)

    def test_context_interfaces(self) -> None:
        """
        The server context is an L{IReloadable} and a Twisted server
        connection creator (and, for older callers, a context factory).
        """
        files = CertificateFiles(self).write()
        context = ServerTLSContext.load(files.cert, files.key)
        verifyObject(IReloadable, context)
        verifyObject(IOpenSSLServerConnectionCreator, context)
        self.assertIs(context.getContext(), context.chain.options.getContext())


class ReloadTests(SynchronousTestCase):
    """
    L{ServerTLSContext.reload}: new connections get the new files, open
    ones keep theirs, a failure keeps the old chain.
    """

    def setUp(self) -> None:
        self.files = CertificateFiles(self).write("old.test")
        self.context = ServerTLSContext.load(self.files.cert, self.files.key)
        self.clock = Clock()
        self.runner = QueuedRunner()

    def names_of_new_connection(self, hostname: str) -> list[str]:
        client = Peer()
        client_tls, _, pump = connect(tls_factory(self.context, plain_server()), client, self.clock,
                                      hostname)  # fmt: skip
        pump.flush()
        self.assertTrue(client.handshake_done, client.lost)
        return served_names(client_tls)

    def test_new_connections_get_the_new_files(self) -> None:
        """
        The files are read in the thread runner; once read, new
        connections get the new chain and an open session carries on
        with the old one.
        """
        class Echo(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(data)

        server_factory = Factory.forProtocol(Echo)
        # The TLS layer batches writes on the wrapped factory's clock.
        server_factory.clock = self.clock  # type: ignore[attr-defined]
        old_client = Peer()
        old_tls, _, old_pump = connect(tls_factory(self.context, server_factory), old_client,
                                       self.clock, "old.test")  # fmt: skip
        old_pump.flush()
        self.assertTrue(old_client.handshake_done)

        self.files.write("new.test")
        d = self.context.reload(self.runner)
        # Nothing read yet: the reactor thread did not touch the files.
        self.assertNoResult(d)
        self.assertEqual(len(self.runner.calls), 1)
        self.assertEqual(self.names_of_new_connection("old.test")[0], "CN=old.test")
        self.runner.run_one()
        self.assertEqual(
            self.successResultOf(d),
            f"TLS certificate reloaded from {self.files.cert} (2 certificates, CN=new.test, "
            f"valid until {self.context.chain.not_after}) and {self.files.key}",
        )
        self.assertEqual(self.names_of_new_connection("new.test"), ["CN=new.test", "CN=Relay Test Intermediate"])
        # The session opened before the reload goes on.
        old_tls.write(b"still here")
        old_pump.flush()
        self.assertEqual(old_client.received, b"still here")
        self.assertIsNone(old_client.lost)
        self.assertEqual(served_names(old_tls)[0], "CN=old.test")

    def test_failed_reload_keeps_the_old_chain(self) -> None:
        """
        A reload of files that cannot be used fails with the reason, and
        the chain in use stays.
        """
        with open(self.files.cert, "wb") as f:
            f.write(b"half a certificate\n")
        d = self.context.reload(self.runner)
        self.runner.run_one()
        error = self.failureResultOf(d, TLSFilesError).value
        self.assertEqual(str(error), f"{self.files.cert}: no PEM certificate in the file")
        self.assertEqual(self.names_of_new_connection("old.test")[0], "CN=old.test")


# -- the SIGHUP service -------------------------------------------------------------


class FakeSignals:
    """
    C{signal.signal} for tests: keeps the handlers, never touches the
    process's.
    """

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {signal.SIGHUP: "the previous handler"}

    def __call__(self, signum: int, handler: Any) -> Any:
        previous = self.handlers.get(signum)
        self.handlers[signum] = handler
        return previous

    def send(self, signum: int = signal.SIGHUP) -> None:
        """
        What the interpreter does on a signal: call the handler.
        """
        self.handlers[signum](signum, None)


class ThreadsReactor:
    """
    C{callFromThread} that waits for L{run}, as the real one waits for the
    reactor's next iteration.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.append((f, args))

    def run(self) -> None:
        while self.calls:
            f, args = self.calls.pop(0)
            f(*args)


class Reloadable:
    """
    An L{IReloadable} that answers what it is told to.
    """

    what = "test file"

    def __init__(self, *results: Any) -> None:
        self.results = list(results)
        self.runners: list[Any] = []

    def reload(self, run_in_thread: Any) -> Deferred[str]:
        self.runners.append(run_in_thread)
        result = self.results.pop(0)
        if isinstance(result, Deferred):
            return result
        if isinstance(result, Exception):
            raise result
        return succeed(result)


class ReloadServiceTests(SynchronousTestCase):
    """
    L{ReloadService}: SIGHUP while running, one log line per reloadable.
    """

    def setUp(self) -> None:
        self.signals = FakeSignals()
        self.reactor = ThreadsReactor()
        self.runner = QueuedRunner()

    def make(self, *reloadables: Any) -> ReloadService:
        return ReloadService(reloadables, self.reactor, self.runner, install=self.signals)

    def test_handler_installed_while_running(self) -> None:
        """
        The handler is installed at start and the previous one put back at
        stop.
        """
        service = self.make()
        self.assertEqual(service.name, "reload")
        self.assertEqual(self.signals.handlers[signal.SIGHUP], "the previous handler")
        service.startService()
        self.assertTrue(callable(self.signals.handlers[signal.SIGHUP]))
        service.stopService()
        self.assertEqual(self.signals.handlers[signal.SIGHUP], "the previous handler")

    def test_handler_defers_to_the_reactor(self) -> None:
        """
        The handler only asks the reactor to reload: nothing is reloaded
        inside the signal handler.
        """
        reloadable = Reloadable("reloaded")
        self.make(reloadable).startService()
        self.signals.send()
        self.assertEqual(reloadable.runners, [])
        self.reactor.run()
        self.assertEqual(reloadable.runners, [self.runner])

    def test_good_and_failed_reloads_logged(self) -> None:
        """
        The real TLS context: a good reload logs what is now served, a
        failed one a single error line naming the file and the reason, and
        the old chain stays in use.
        """
        files = CertificateFiles(self).write("first.test")
        context = ServerTLSContext.load(files.cert, files.key)
        self.make(context).startService()
        files.write("second.test")
        with capturedLogs() as events:
            self.signals.send()
            self.reactor.run()
            self.runner.run_all()
        texts = [formatEvent(e) for e in events]
        self.assertEqual(
            texts,
            [
                "SIGHUP received: reloading TLS certificate",
                f"TLS certificate reloaded from {files.cert} (2 certificates, CN=second.test, "
                f"valid until {context.chain.not_after}) and {files.key}",
            ],
        )
        self.assertEqual(context.chain.subject, "CN=second.test")

        with open(files.key, "wb") as f:
            f.write(b"")
        with capturedLogs() as events:
            self.signals.send()
            self.reactor.run()
            self.runner.run_all()
        [failed] = [e for e in events if e.get("reload_failed")]
        self.assertEqual(failed["log_level"].name, "error")
        self.assertEqual(
            formatEvent(failed),
            f"TLS certificate not reloaded, keeping the one in use: {files.key}: no usable PEM "
            f"private key: {failed['error'].split(': ', 3)[-1]}",
        )
        self.assertIn("Unable to load PEM", failed["error"])
        self.assertIsNone(failed.get("log_failure"))
        self.assertEqual(context.chain.subject, "CN=second.test")

    def test_bug_logged_with_traceback(self) -> None:
        """
        An exception that is not a L{ReloadError} is a bug: logged with its
        traceback; the next reloadable still reloads.
        """
        broken = Reloadable(ZeroDivisionError("oops"))
        fine = Reloadable("fine reloaded")
        service = self.make(broken, fine)
        with capturedLogs() as events:
            self.successResultOf(service.reload())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["test file not reloaded, keeping the one in use", "fine reloaded"],
        )

    def test_sighup_during_a_reload_reloads_again(self) -> None:
        """
        A SIGHUP while a reload is under way makes one more reload after
        it (the files may have changed after they were read), not two at
        once.
        """
        first: Deferred[str] = Deferred()
        reloadable = Reloadable(first, "second", "third")
        service = self.make(reloadable)
        d1 = service.reload()
        d2 = service.reload()
        d3 = service.reload()
        self.assertEqual(len(reloadable.runners), 1)
        self.assertNoResult(d1)
        first.callback("first")
        self.assertEqual(len(reloadable.runners), 2)
        for d in (d1, d2, d3):
            self.successResultOf(d)
        self.assertEqual(reloadable.results, ["third"])

    def test_nothing_to_reload(self) -> None:
        """
        With nothing to reload a SIGHUP is logged and changes nothing (and
        does not end the process, as its default action would).
        """
        self.make().startService()
        with capturedLogs() as events:
            self.signals.send()
            self.reactor.run()
        self.assertEqual([formatEvent(e) for e in events], ["SIGHUP received: reloading nothing"])


# -- implicit TLS in the server -------------------------------------------------------


@implementer(ISSLTransport)
class SSLStringTransport(TLSStringTransport):
    """
    A transport that says it is TLS, as Twisted's C{ssl:} ones do.
    """

    def getHandle(self) -> Any:
        raise AttributeError("no OpenSSL connection in this test")


class ImplicitTLSTranscriptTests(SynchronousTestCase):
    """
    A session on a transport that is TLS from the start.
    """

    def test_session_starts_as_after_starttls(self) -> None:
        """
        The session has TLS at connect, AUTH is offered (auth_requires_tls
        is met), STARTTLS is neither offered nor accepted (503, even with
        no context of our own, as on an ssl: listener without --tls-cert),
        and Received says ESMTPSA.
        """
        from twisted.internet.address import IPv4Address

        transport = SSLStringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.25", 465),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        callbacks = Recorder(session_helo=Continue(advertise_auth=True))
        h = ServerHarness(callbacks, transport=transport)
        self.assertIsNotNone(callbacks.calls_to(SessionConnectCall)[0].session.tls)
        h.play(
            f"""
            < 220 test.example
            > EHLO client.example
            {ehlo_reply("AUTH PLAIN LOGIN")}
            > STARTTLS
            < 503 5.5.1 TLS already active
            > AUTH PLAIN AGFsaWNlAHNlY3JldA==
            < 235
            > MAIL FROM:<a@example.org>
            < 250
            > RCPT TO:<b@example.com>
            < 250
            > DATA
            < 354
            """,
        )
        h.send(MESSAGE)
        h.play("< 250 2.0.0 Ok: queued")
        [data] = [m.data for m in h.spool.messages_by_id.values()]
        self.assertIn(b"with ESMTPSA", data)

    def test_plain_transport_unchanged(self) -> None:
        """
        The control: on a plain transport the session has no TLS and AUTH
        is not offered.
        """
        callbacks = Recorder(session_helo=Continue(advertise_auth=True))
        h = ServerHarness(callbacks)
        self.assertIsNone(callbacks.calls_to(SessionConnectCall)[0].session.tls)
        h.play("< 220\n> EHLO c" + "\n< 250-" * 7 + "\n< 250 CHUNKING")


class ScriptedClient(Peer):
    """
    An SMTP client: sends the next line of C{script} after each complete
    reply, and keeps the reply lines.
    """

    def __init__(self, script: list[bytes]) -> None:
        super().__init__()
        self.script = list(script)
        self.lines: list[str] = []
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            self.lines.append(line.decode())
            if line[3:4] == b" " and self.script:
                self.transport.write(self.script.pop(0))


class ImplicitTLSSessionTests(SynchronousTestCase):
    """
    A whole SMTP session in implicit TLS, in memory.
    """

    def test_session(self) -> None:
        """
        The server's greeting comes inside TLS; the session knows the
        negotiated version and cipher, offers AUTH and not STARTTLS,
        refuses STARTTLS, and Received names the cipher with ESMTPSA.
        """
        files = CertificateFiles(self).write()
        context = load_tls_context(files.cert, files.key)
        clock = Clock()
        callbacks = Recorder(session_helo=Continue(advertise_auth=True))
        spool = MemorySpool(clock)
        factory = SMTPServerFactory(
            callbacks=callbacks, spool=spool, clock=clock, hostname="relay.test",
            tls_context_factory=context,
        )  # fmt: skip
        client = ScriptedClient(
            [
                b"EHLO client.example\r\n",
                b"STARTTLS\r\n",
                b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
                b"MAIL FROM:<a@example.org>\r\n",
                b"RCPT TO:<b@example.com>\r\n",
                b"DATA\r\n",
                MESSAGE.encode(),
                b"QUIT\r\n",
            ]
        )
        _, _, pump = connect(tls_factory(context, factory), client, clock)
        pump.flush()
        self.assertTrue(client.handshake_done)
        self.assertEqual(client.lines[0], "220 test.example ESMTP")
        ehlo = client.lines[1 : client.lines.index("250 AUTH PLAIN LOGIN") + 1]
        self.assertFalse([x for x in ehlo if "STARTTLS" in x], ehlo)
        self.assertIn("503 5.5.1 TLS already active", client.lines)
        self.assertTrue(any(x.startswith("250 2.0.0 Ok: queued") for x in client.lines), client.lines)
        self.assertEqual(client.lines[-1], "221 2.0.0 Bye")
        [session] = [c.session for c in callbacks.calls_to(ProcessEnvelopeCall)]
        self.assertEqual(session.authenticated, "alice")
        self.assertTrue(session.tls.version.startswith("TLSv1."), session.tls)
        self.assertNotEqual(session.tls.cipher, "unknown")
        [data] = [m.data for m in spool.messages_by_id.values()]
        self.assertIn(b"with ESMTPSA", data)
        self.assertIn(f"(using {session.tls.version} with cipher {session.tls.cipher}".encode(), data)

    def make_factory(self, clock: Clock) -> tuple[Any, SMTPServerFactory]:
        files = CertificateFiles(self).write()
        context = load_tls_context(files.cert, files.key)
        factory = SMTPServerFactory(
            callbacks=Recorder(), spool=MemorySpool(clock), clock=clock, idle_timeout=10.0
        )
        return tls_factory(context, factory), factory

    def test_silent_client_dropped(self) -> None:
        """
        A client that connects and never starts its handshake is dropped
        at the idle timeout, freeing its session (a clean TLS close would
        wait for the handshake forever).
        """
        clock = Clock()
        server_factory, factory = self.make_factory(clock)
        client = Peer()
        _, server, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client, clock=clock
        )
        pump.flush()
        self.assertEqual(factory.sessions, 1)
        clock.advance(10.0)
        pump.flush()
        self.assertEqual(factory.sessions, 0)
        self.assertIsNotNone(client.lost)

    def test_idle_client_told_after_handshake(self) -> None:
        """
        The control: once the handshake is done, the idle timeout's 421
        reaches the client in TLS before the connection closes.
        """
        clock = Clock()
        server_factory, factory = self.make_factory(clock)
        client = ScriptedClient([])
        _, _, pump = connect(server_factory, client, clock)
        pump.flush()
        self.assertTrue(client.handshake_done)
        self.assertEqual(factory.sessions, 1)
        clock.advance(10.0)
        pump.flush()
        self.assertEqual(
            client.lines, ["220 test.example ESMTP", "421 4.4.2 localhost Error: timeout exceeded"]
        )
        self.assertEqual(factory.sessions, 0)
        self.assertIsNotNone(client.lost)


# -- endpoints ----------------------------------------------------------------------------


class EndpointTests(SynchronousTestCase):
    """
    C{implicit-tls:PORT} listeners.
    """

    def setUp(self) -> None:
        files = CertificateFiles(self).write()
        self.context = ServerTLSContext.load(files.cert, files.key)
        self.reactor = MemoryReactorClock()
        self.factory = SMTPServerFactory(callbacks=Recorder(), spool=MemorySpool(), clock=self.reactor)

    def test_plain_description(self) -> None:
        """
        An implicit-TLS description listens as the same C{tcp:} one (any
        C{haproxy:} in front kept); others are not implicit TLS.
        """
        for description, plain in (
            ("implicit-tls:465", "tcp:465"),
            ("Implicit-TLS:465:interface=127.0.0.1", "tcp:465:interface=127.0.0.1"),
            ("implicit-tls:port=465:interface=\\:\\:1", "tcp:port=465:interface=\\:\\:1"),
            ("haproxy:implicit-tls:465", "haproxy:tcp:465"),
            ("tcp:25", None),
            ("ssl:465", None),
            ("haproxy:tcp:25", None),
        ):
            self.assertEqual(plain_description(description), plain, description)

    def test_listens_in_tls(self) -> None:
        """
        The TCP port gets the server factory behind a TLS layer with the
        context.
        """
        endpoint = server_endpoint(self.reactor, "implicit-tls:465:interface=127.0.0.1", self.context)
        self.assertIsInstance(endpoint, ImplicitTLSEndpoint)
        endpoint.listen(self.factory)
        [(port, served, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, backlog, interface), (465, 50, "127.0.0.1"))
        self.assertIsInstance(served, TLSMemoryBIOFactory)
        self.assertIs(served.wrappedFactory, self.factory)

    def test_haproxy_in_front_of_tls(self) -> None:
        """
        Behind C{haproxy:}, the PROXY header comes before the TLS
        handshake: the header wrapper is in front, on the server's clock.
        """
        server_endpoint(self.reactor, "haproxy:implicit-tls:465", self.context).listen(self.factory)
        [(_, served, _, _)] = self.reactor.tcpServers
        self.assertIsInstance(served, ProxyHeaderWrappingFactory)
        self.assertIs(served.clock, self.reactor)
        self.assertIsInstance(served.wrappedFactory, TLSMemoryBIOFactory)
        self.assertIs(served.wrappedFactory.wrappedFactory, self.factory)

    def test_other_descriptions(self) -> None:
        """
        Other descriptions are read as before.
        """
        server_endpoint(self.reactor, "tcp:2525:interface=127.0.0.1", None).listen(self.factory)
        [(port, served, _, _)] = self.reactor.tcpServers
        self.assertEqual(port, 2525)
        self.assertIs(served, self.factory)

    def test_needs_a_certificate(self) -> None:
        """
        Without a context, an implicit-TLS listener is refused naming the
        options.
        """
        with self.assertRaises(ValueError) as raised:
            server_endpoint(self.reactor, "implicit-tls:465", None)
        self.assertEqual(
            str(raised.exception), "--smtp implicit-tls:465: implicit TLS needs --tls-cert and --tls-key"
        )


# -- options, service, receivers ------------------------------------------------------------


class OptionsTests(SynchronousTestCase):
    """
    C{twistd relay} options for implicit TLS.
    """

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_implicit_tls(self) -> None:
        """
        C{--smtp implicit-tls:PORT} is accepted with a certificate, alone
        and with receivers.
        """
        files = CertificateFiles(self).write()
        tls = ("--tls-cert", files.cert, "--tls-key", files.key)
        options = self.parse("--smtp", "implicit-tls:465:interface=127.0.0.1", *tls)
        self.assertEqual(options["smtp"], ["implicit-tls:465:interface=127.0.0.1"])
        self.assertIsInstance(options["tls-context"], ServerTLSContext)
        self.parse("--receivers", "2", "--smtp", "haproxy:implicit-tls:465", *tls)

    def test_refused(self) -> None:
        """
        Implicit TLS without certificate, a bad implicit-TLS description,
        and C{ssl:} with receivers are usage errors that say what to do.
        """
        files = CertificateFiles(self).write()
        tls = ("--tls-cert", files.cert, "--tls-key", files.key)
        for argv, text in (
            (("--smtp", "implicit-tls:465"), "--smtp implicit-tls:465: implicit TLS needs --tls-cert"),
            (("--smtp", "implicit-tls:465:bogus=1", *tls), "--smtp: bad endpoint"),
            (("--smtp", "implicit-tls:port", *tls), "--smtp: bad endpoint"),
            (
                ("--receivers", "1", "--smtp",
                 f"ssl:465:privateKey={files.key}:certKey={files.cert}", *tls),
                "use implicit-tls:PORT",
            ),
        ):
            with self.assertRaises(usage.UsageError, msg=argv) as raised:
                self.parse(*argv)
            self.assertIn(text, str(raised.exception))


class ServiceTests(SynchronousTestCase):
    """
    L{makeService} with implicit TLS and SIGHUP.
    """

    def setUp(self) -> None:
        self.files = CertificateFiles(self).write()
        self.reactor = MemoryReactorClock()
        base = os.path.abspath(self.mktemp())
        self.kwargs = dict(
            spool=os.path.join(base, "spool"), quarantine=os.path.join(base, "quarantine"),
            control="", hostname="relay.test", reactor=self.reactor,
        )  # fmt: skip

    def test_implicit_tls_listener(self) -> None:
        """
        The implicit-TLS listener and STARTTLS share the reloadable context
        that the SIGHUP service reloads.
        """
        top = makeService(
            smtp=["tcp:2525:interface=127.0.0.1", "implicit-tls:4650:interface=127.0.0.1"],
            tls_cert=self.files.cert, tls_key=self.files.key, **self.kwargs,
        )  # fmt: skip
        context = top.factory.settings.tls_context_factory
        self.assertIsInstance(context, ServerTLSContext)
        endpoint = top.getServiceNamed("smtp-1").endpoint
        self.assertIsInstance(endpoint, ImplicitTLSEndpoint)
        self.assertIs(endpoint.context, context)
        self.assertEqual(top.getServiceNamed("reload").reloadables, (context,))

    def test_implicit_tls_needs_certificate(self) -> None:
        """
        Without tls_cert, an implicit-TLS listener is refused.
        """
        for receivers in (0, 1):
            with self.assertRaises(ValueError) as raised:
                makeService(smtp=["implicit-tls:465"], receivers=receivers, **self.kwargs)
            self.assertIn("implicit TLS needs --tls-cert and --tls-key", str(raised.exception))

    def test_no_certificate_nothing_to_reload(self) -> None:
        """
        Without TLS the SIGHUP service still runs, with nothing to reload.
        """
        top = makeService(smtp=["tcp:2525:interface=127.0.0.1"], **self.kwargs)
        self.assertEqual(top.getServiceNamed("reload").reloadables, ())

    def test_receivers(self) -> None:
        """
        With receivers, the implicit-TLS listener is passed on marked TLS,
        and SIGHUP goes to the receiver pool.
        """
        top = makeService(
            smtp=["implicit-tls:0:interface=127.0.0.1"], receivers=2, tls_cert=self.files.cert,
            tls_key=self.files.key, callbacks="relay.simple.Simple", **self.kwargs,
        )  # fmt: skip
        pool = top.receivers
        self.assertEqual([x.tls for x in pool.listeners], [True])
        self.assertEqual(pool.settings.tls_cert, self.files.cert)
        self.assertEqual(top.getServiceNamed("reload").reloadables, (pool,))


class ListenerTests(SynchronousTestCase):
    """
    L{parse_listener} for implicit TLS.
    """

    def test_implicit_tls(self) -> None:
        """
        C{implicit-tls:} listens as C{tcp:} does (IPv6 on an IPv6
        interface), marked TLS, through JSON too.
        """
        import socket

        for endpoint, family, host, haproxy in (
            ("implicit-tls:465", socket.AF_INET, "0.0.0.0", False),
            ("implicit-tls:465:interface=\\:\\:1", socket.AF_INET6, "::1", False),
            ("haproxy:implicit-tls:465:interface=127.0.0.1", socket.AF_INET, "127.0.0.1", True),
        ):
            listener = parse_listener(endpoint)
            self.assertEqual(
                (listener.family, listener.host, listener.port, listener.haproxy, listener.tls),
                (family, host, 465, haproxy, True),
            )
            self.assertEqual(Listener.from_json(listener.to_json()), listener)
        self.assertFalse(parse_listener("tcp:25").tls)

    def test_ssl_refused(self) -> None:
        """
        C{ssl:} cannot be shared with receivers: the error says what to
        use instead.
        """
        with self.assertRaises(ValueError) as raised:
            parse_listener("ssl:465:privateKey=key.pem")
        self.assertIn("use implicit-tls:PORT[:interface=...] with --tls-cert", str(raised.exception))


class ReceiverTLSTests(SynchronousTestCase):
    """
    A receiver serves implicit TLS itself and reloads its certificate.
    """

    def make(self, cert: str | None, key: str | None) -> Receiver:
        import socket

        base = os.path.abspath(self.mktemp())
        settings = Settings(
            spool=os.path.join(base, "spool"), quarantine=os.path.join(base, "quarantine"),
            callbacks="relay.simple.Simple", hostname="relay.test", max_message_size=1000,
            max_recipients=3, max_sessions=4, idle_timeout=9.0, reject_bare_lf=False,
            auth_requires_tls=True, tls_cert=cert, tls_key=key,
        )  # fmt: skip
        listeners = (
            parse_listener("implicit-tls:465:interface=127.0.0.1"),
            parse_listener("haproxy:implicit-tls:466"),
            parse_listener("tcp:25"),
        )
        fds = []
        for _ in range(3):
            s = socket.socket()
            self.addCleanup(s.close)
            fds.append(os.dup(s.fileno()))
        self.reactor = MemoryReactorClock()
        start = StartMessage(number=1, settings=settings, listeners=listeners)
        return Receiver(start, self.reactor, lambda message: None, fds, run_in_thread=QueuedRunner())

    def test_wraps_in_tls(self) -> None:
        """
        Each implicit-TLS socket gets the factory behind TLS (behind the
        PROXY header wrapper for C{haproxy:}); the plain one is plain; the
        context is what SIGHUP reloads.
        """
        files = CertificateFiles(self).write()
        receiver = self.make(files.cert, files.key)
        receiver.start()
        [(_, _, tls), (_, _, proxied), (_, _, plain)] = self.reactor.adoptedPorts
        context = receiver.factory.settings.tls_context_factory
        self.assertIsInstance(context, ServerTLSContext)
        self.assertIsInstance(tls, TLSMemoryBIOFactory)
        self.assertIs(tls.wrappedFactory, receiver.factory)
        self.assertIsInstance(proxied, ProxyHeaderWrappingFactory)
        self.assertIs(proxied.clock, self.reactor)
        self.assertIs(proxied.wrappedFactory.wrappedFactory, receiver.factory)
        self.assertIs(plain, receiver.factory)
        self.assertEqual(receiver.reloadables, [context])

    def test_tls_listener_without_certificate(self) -> None:
        """
        An implicit-TLS socket without certificate is not served.
        """
        receiver = self.make(None, None)
        with self.assertRaises(ValueError) as raised:
            receiver.start()
        self.assertIn("implicit TLS needs --tls-cert", str(raised.exception))


class PoolReloadTests(SynchronousTestCase):
    """
    The master passes SIGHUP on to its receivers.
    """

    def setUp(self) -> None:
        self.spawned: list[Any] = []

        def spawn(protocol: Any, *args: Any, **kw: Any) -> None:
            self.spawned.append(protocol)
            protocol.makeConnection(FakeProcessTransport(100 + len(self.spawned)))

        self.pool = ReceiverPool(
            count=2, listeners=[parse_listener("tcp:0:interface=127.0.0.1")],
            settings=Settings(), reactor=Clock(), spawn=spawn,
        )  # fmt: skip
        self.addCleanup(self.pool._close_sockets)

    def test_interface(self) -> None:
        """
        The pool is an L{IReloadable}.
        """
        verifyObject(IReloadable, self.pool)

    def test_passed_on(self) -> None:
        """
        A listening receiver gets SIGHUP at once; one still starting gets
        it once it says it listens (it may have read the old files).
        """
        self.assertEqual(
            self.successResultOf(self.pool.reload(None)),
            "No receiver runs: each reads the files when it starts",
        )
        self.pool.startService()
        first, second = self.spawned
        first.childDataReceived(CHANNEL_FD, encode_message({"t": "listening"}))
        text = self.successResultOf(self.pool.reload(None))
        self.assertEqual(
            text, "SIGHUP passed on to receivers 1; receivers 2 get it once they are listening"
        )
        self.assertEqual(first.transport.signals, ["HUP"])
        self.assertEqual(second.transport.signals, [])
        second.childDataReceived(CHANNEL_FD, encode_message({"t": "listening"}))
        self.assertEqual(second.transport.signals, ["HUP"])
        second.childDataReceived(CHANNEL_FD, encode_message({"t": "listening"}))
        self.assertEqual(second.transport.signals, ["HUP"])


class WithoutOpenSSLTests(SynchronousTestCase):
    """
    A receiver without C{--tls-cert} keeps pyOpenSSL out.
    """

    def test_modules_import_without_openssl(self) -> None:
        """
        The modules a receiver without TLS imports (the reload service and
        the TLS helpers included) import with pyOpenSSL blocked, as
        L{relay.app._compat.keep_openssl_out} blocks it.
        """
        code = (
            "import sys; sys.modules['OpenSSL'] = None\n"
            "from twisted.internet import reactor\n"
            "import relay.app.receiver, relay.app.reload, relay.smtp.server, relay.smtp.tls\n"
            "assert relay.smtp.tls.plain_description('implicit-tls:465') == 'tcp:465'\n"
            "print('ok')\n"
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, timeout=60
        )
        self.assertEqual((result.returncode, result.stdout), (0, b"ok\n"), result.stderr)


# -- the real twistd ------------------------------------------------------------------------


class TwistdTLSTests(TestCase):
    """
    The real C{twistd relay} with implicit TLS, reloading its certificate
    on SIGHUP, alone and with receivers (helpers of L{tests.test_integration}).
    """

    timeout = 4 * test_integration.TIMEOUT
    setUp = test_integration.TwistdRelayTests.setUp
    start_twistd = test_integration.TwistdRelayTests.start_twistd
    stop = test_integration.TwistdRelayTests.stop
    poll = test_integration.TwistdRelayTests.poll
    output = test_integration.TwistdRelayTests.output
    wait_listening = test_integration.TwistdRelayTests.wait_listening

    def client_context(self) -> stdlib_ssl.SSLContext:
        root = os.path.join(self.base, "root.pem")
        pki().write_root(root)
        return stdlib_ssl.create_default_context(cafile=root)

    def session(self, port: int) -> tuple[str, list[str], int, int]:
        """
        Connect in implicit TLS, verifying against the root alone; answer
        the server certificate's name, the EHLO keywords, and the replies
        to STARTTLS and AUTH.
        """
        with smtplib.SMTP_SSL("127.0.0.1", port, context=self.client_context(),
                              timeout=test_integration.TIMEOUT) as client:  # fmt: skip
            cert = client.sock.getpeercert()
            client.ehlo("client.example")
            keywords = sorted(client.esmtp_features)
            starttls, _ = client.docmd("STARTTLS")
            auth, _ = client.login("alice", "secret")
        return str(dict(x[0] for x in cert["subject"])["commonName"]), keywords, starttls, auth

    @inlineCallbacks
    def served_name(self, port: int) -> Any:
        """
        The server certificate's name, once the session was checked: AUTH
        offered and accepted, STARTTLS neither offered nor accepted.
        """
        name, keywords, starttls, auth = yield deferToThread(self.session, port)
        self.assertIn("auth", keywords)
        self.assertNotIn("starttls", keywords)
        self.assertEqual((starttls, auth), (503, 235))
        return name

    @inlineCallbacks
    def check_reload(self, receivers: int) -> Any:
        files = CertificateFiles(self).write("first.test")
        port = free_port()
        tls_port = free_port()
        extra = [
            "--smtp", f"implicit-tls:{tls_port}:interface=127.0.0.1",
            "--tls-cert", files.cert, "--tls-key", files.key,
            "--auth", "memory:alice:secret", "--retry-intervals", "1m",
        ]  # fmt: skip
        ssl_port = free_port()
        if receivers:
            extra += ["--receivers", str(receivers)]
        else:
            # Twisted's own ssl: endpoint, its intermediate given apart.
            intermediate = os.path.join(files.base, "intermediate.pem")
            pki().write_intermediate(intermediate)
            leaf = os.path.join(files.base, "leaf.pem")
            with open(files.cert, "rb") as f:
                first_pem = f.read().split(b"-----END CERTIFICATE-----")[0]
            with open(leaf, "wb") as f:
                f.write(first_pem + b"-----END CERTIFICATE-----\n")
            extra += ["--smtp", f"ssl:{ssl_port}:interface=127.0.0.1:privateKey={files.key}:"
                      f"certKey={leaf}:extraCertChain={intermediate}"]  # fmt: skip
        process, output = self.start_twistd("tls", port, extra=extra)
        yield self.wait_listening(process, output, tls_port)
        name = yield self.served_name(tls_port)
        self.assertEqual(name, "first.test")
        if not receivers:
            name = yield self.served_name(ssl_port)
            self.assertEqual(name, "first.test")

        def reloaded(text: str, count: int) -> Callable[[], bool]:
            return lambda: self.output(output).count(text) >= count

        files.write("second.test")
        process.send_signal(signal.SIGHUP)
        yield self.poll(reloaded("TLS certificate reloaded from", max(1, receivers)),
                        lambda: self.output(output))  # fmt: skip
        for _ in range(max(1, 2 * receivers)):
            name = yield self.served_name(tls_port)
            self.assertEqual(name, "second.test")

        with open(files.cert, "wb") as f:
            f.write(b"truncated")
        process.send_signal(signal.SIGHUP)
        yield self.poll(reloaded("TLS certificate not reloaded, keeping the one in use: "
                                 f"{files.cert}: no PEM certificate in the file", max(1, receivers)),
                        lambda: self.output(output))  # fmt: skip
        name = yield self.served_name(tls_port)
        self.assertEqual(name, "second.test")
        self.assertIsNone(process.poll())
        self.assertNotIn("Traceback", self.output(output))

    def test_reload(self) -> Any:
        """
        One process: the implicit-TLS listener serves the chain (a client
        trusting the root verifies it), with AUTH and without STARTTLS, as
        an ssl: listener does; SIGHUP reloads the certificate; a broken
        file keeps the old one.
        """
        return self.check_reload(0)

    def test_reload_with_receivers(self) -> Any:
        """
        The same with two receivers: the master passes SIGHUP on and each
        receiver reloads its own context.
        """
        return self.check_reload(2)
