"""
The PROXY protocol (v1 and v2) in front of the relay, through Twisted's
C{haproxy:} endpoint prefix: C{--smtp haproxy:tcp:...} as L{makeService}
builds it, with a real listener on loopback and L{smtplib} clients in a
thread.
"""

from __future__ import annotations

import ipaddress
import os
import re
import smtplib
import socket
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from relay import Consume, Simple

TIMEOUT = 30.0

MESSAGE = (
    b"From: alice@example.com\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: proxied\r\n"
    b"Message-ID: <proxied@example.com>\r\n"
    b"\r\n"
    b"Hello through the proxy.\r\n"
)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

def proxy_v1(source: str, source_port: int, dest: str, dest_port: int) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {dest} {source_port} {dest_port}\r\n".encode("ascii")


def proxy_v2(source: str, source_port: int, dest: str, dest_port: int) -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    family = 0x21 if src.version == 6 else 0x11  # AF_INET6 / AF_INET, STREAM
    body = src.packed + dst.packed + struct.pack("!HH", source_port, dest_port)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


class ProxiedSMTP(smtplib.SMTP):
    """
    An L{smtplib.SMTP} client that sends a PROXY header as soon as it is
    connected, as a load balancer in front of the relay would.
    """

    def __init__(self, header: bytes, *args: Any, **kwargs: Any) -> None:
        self.proxy_header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout)
        sock.sendall(self.proxy_header)
        return sock


def send_proxied(port: int, header: bytes, message: bytes = MESSAGE) -> dict[str, Any]:
    with ProxiedSMTP(header, "127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo("client.example.com")
        return client.sendmail("alice@example.com", ["bob@example.net"], message)


def talk_raw(port: int, data: bytes) -> bytes:
    """
    Connect, send C{data} and read until the server closes the connection;
    a server that does not close it within L{TIMEOUT} seconds raises
    C{socket.timeout}.
    """
    received = b""
    with socket.create_connection(("127.0.0.1", port), TIMEOUT) as sock:
        sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received


class Recorder(Simple):
    """
    The policy under test: records every session it is shown and consumes
    every message.
    """

    def __init__(self) -> None:
        self.connects: list[Any] = []
        self.envelopes: list[tuple[Any, Any]] = []

    def session_connect(self, log: Any, session: Any) -> Any:
        self.connects.append(session)
        return super().session_connect(log, session)

    def process_envelope(self, log: Any, session: Any, envelope: Any) -> Any:
        self.envelopes.append((session, envelope))
        return Consume("recorded")


class ProxyProtocolTests(TestCase):
    """
    The relay listening on C{haproxy:tcp:0:interface=127.0.0.1}.
    """

    timeout = 4 * TIMEOUT

    def setUp(self) -> None:
        from relay.service import makeService

        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.recorder = Recorder()
        service = makeService(
            smtp=["haproxy:tcp:0:interface=127.0.0.1"],
            spool=os.path.join(base, "spool"),
            quarantine=os.path.join(base, "quarantine"),
            control="",
            callbacks=self.recorder,
            hostname="relay.test",
            reactor=reactor,
        )
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        # A TCP endpoint listens at once; the service keeps the port (its
        # Deferred's result) to stop listening at cleanup.
        ports: list[Any] = []

        def keep(port: Any) -> Any:
            ports.append(port)
            return port

        service.getServiceNamed("smtp-0")._waitingForPort.addCallback(keep)
        [port] = ports
        self.port = port.getHost().port

    @inlineCallbacks
    def deliver(self, header: bytes) -> Any:
        """
        Send L{MESSAGE} through the proxy header C{header}; return the
        session and envelope the policy saw.
        """
        refused = yield deferToThread(send_proxied, self.port, header)
        self.assertEqual(refused, {})
        [(session, envelope)] = self.recorder.envelopes
        return session, envelope

    def assertAddress(self, host: str, port: int | None, source: str, source_port: int) -> None:
        # Twisted's v2 parser writes IPv6 addresses uncompressed.
        self.assertEqual(
            (ipaddress.ip_address(host), port), (ipaddress.ip_address(source), source_port)
        )

    def assertProxied(self, session: Any, envelope: Any, source: str, source_port: int) -> None:
        self.assertAddress(session.remote_host, session.remote_port, source, source_port)
        [connected] = self.recorder.connects
        self.assertAddress(connected.remote_host, connected.remote_port, source, source_port)
        [received] = envelope.header_values("Received")
        match = re.search(r"from client\.example\.com \(\[([^\]]+)\]\)", received)
        self.assertIsNotNone(match, received)
        assert match is not None
        self.assertAddress(match.group(1), source_port, source, source_port)

    @inlineCallbacks
    def test_v1_mail_goes_through(self) -> Any:
        """
        After a v1 header the session is ordinary SMTP: the header is not
        taken for a command and the message arrives intact.
        """
        session, envelope = yield self.deliver(proxy_v1("203.0.113.7", 40000, "192.0.2.25", 25))
        self.assertEqual(str(envelope.sender), "alice@example.com")
        self.assertEqual([str(r) for r in envelope.recipients], ["bob@example.net"])
        self.assertEqual(envelope.header("Subject"), "proxied")
        self.assertEqual(session.helo, "client.example.com")

    @inlineCallbacks
    def test_v2_mail_goes_through(self) -> Any:
        """
        After a binary v2 header the session is ordinary SMTP too.
        """
        session, envelope = yield self.deliver(proxy_v2("2001:db8::7", 40001, "2001:db8::25", 25))
        self.assertEqual([str(r) for r in envelope.recipients], ["bob@example.net"])
        self.assertEqual(envelope.header("Message-ID"), "<proxied@example.com>")

    @inlineCallbacks
    def test_v1_remote_is_the_proxied_client(self) -> Any:
        """
        With a v1 header, the session's remote and local addresses (seen
        by session_connect and process_envelope) and the Received header
        are the proxied client's and destination's, not the proxy's.
        """
        session, envelope = yield self.deliver(proxy_v1("203.0.113.7", 40000, "192.0.2.25", 25))
        self.assertProxied(session, envelope, "203.0.113.7", 40000)
        self.assertEqual(session.local_host, "192.0.2.25")


    @inlineCallbacks
    def test_v2_remote_is_the_proxied_client(self) -> Any:
        """
        With a v2 header (IPv6 here) too.
        """
        session, envelope = yield self.deliver(proxy_v2("2001:db8::7", 40001, "2001:db8::25", 25))
        self.assertProxied(session, envelope, "2001:db8::7", 40001)
        self.assertEqual(
            ipaddress.ip_address(session.local_host), ipaddress.ip_address("2001:db8::25")
        )


    @inlineCallbacks
    def test_malformed_header_is_refused(self) -> Any:
        """
        A connection that does not start with a valid PROXY header (plain
        SMTP, a garbled v1 line, a v2 header of an unknown version) is
        closed without any command being answered, and the listener goes
        on serving proxied clients.
        """
        bad = [
            b"EHLO client.example.com\r\nMAIL FROM:<alice@example.com>\r\n",
            b"PROXY NONSENSE\r\nEHLO client.example.com\r\n",
            V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12) + b"EHLO client.example.com\r\n",
        ]
        yield self.assertRefused(bad)

    @inlineCallbacks
    def assertRefused(self, bad: list[bytes]) -> Any:
        for data in bad:
            received = yield deferToThread(talk_raw, self.port, data)
            # At most the greeting; never an answer to EHLO or MAIL.
            for line in received.splitlines():
                self.assertTrue(line.startswith(b"220 "), (data, received))
        self.assertEqual(self.recorder.envelopes, [])
        yield self.deliver(proxy_v1("203.0.113.7", 40000, "192.0.2.25", 25))

    @inlineCallbacks
    def test_v1_bad_port_is_refused_cleanly(self) -> Any:
        """
        A v1 header whose port is not a number is refused like any other
        malformed header, without an unhandled error in the log.
        """
        yield self.assertRefused(
            [b"PROXY TCP4 203.0.113.7 192.0.2.25 notaport 25\r\nEHLO client.example.com\r\n"]
        )
        # The server logged the error before it closed the connection.
        unhandled = self.flushLoggedErrors()
        self.assertEqual(unhandled, [], [f.getErrorMessage() for f in unhandled])



class _Recording:
    """
    A protocol that records its connection and the bytes it gets.
    """

    def __init__(self) -> None:
        self.transport: Any = None
        self.data = b""

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        pass


class _RecordingFactory:
    def __init__(self) -> None:
        self.protocols: list[_Recording] = []

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: Any) -> _Recording:
        p = _Recording()
        self.protocols.append(p)
        return p


class ProxyHeaderWrapperTests(TestCase):
    """
    L{relay.smtp.proxy.ProxyHeaderWrapper} on a L{StringTransport} with a
    L{Clock}: the wrapped protocol is connected only after the header.
    """

    def setUp(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from relay.smtp.proxy import ProxyHeaderWrappingFactory

        self.clock = Clock()
        self.inner = _RecordingFactory()
        self.factory = ProxyHeaderWrappingFactory(self.inner, clock=self.clock)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.wrapper = self.factory.buildProtocol(self.transport.getPeer())
        self.wrapper.makeConnection(self.transport)

    def test_split_header(self) -> None:
        """
        A header arriving in pieces connects the wrapped protocol once it
        is whole, with the proxied peer, and passes on what follows it.
        """
        header = proxy_v1("203.0.113.7", 5555, "192.0.2.25", 25)
        for i in range(len(header)):
            self.wrapper.dataReceived(header[i : i + 1])
            if i < len(header) - 1:
                self.assertEqual(self.inner.protocols[0].transport, None)
        self.wrapper.dataReceived(b"EHLO x\r\n")
        inner = self.inner.protocols[0]
        self.assertEqual(inner.transport.getPeer().host, "203.0.113.7")
        self.assertEqual(inner.transport.getPeer().port, 5555)
        self.assertEqual(inner.data, b"EHLO x\r\n")
        self.clock.advance(60)
        self.assertFalse(self.transport.disconnecting)

    def test_no_header_in_time(self) -> None:
        """
        A client that sends no header within the timeout is disconnected
        without the wrapped protocol ever being connected.
        """
        from relay.smtp.proxy import HEADER_TIMEOUT

        self.wrapper.dataReceived(b"PROXY TCP4 ")
        self.clock.advance(HEADER_TIMEOUT - 0.1)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.inner.protocols[0].transport, None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_header_too_long(self) -> None:
        """
        A v1 line that never ends is refused once it exceeds any real
        header's length.
        """
        self.wrapper.dataReceived(b"PROXY TCP4 " + b"1" * 600)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.inner.protocols[0].transport, None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_a_header(self) -> None:
        """
        Plain SMTP where a header is due closes the connection at once.
        """
        self.wrapper.dataReceived(b"EHLO client.example.com\r\n")
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.inner.protocols[0].transport, None)
