"""
L{relay.smtp.eager.write} over a real loopback TCP connection.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from relay.smtp import eager


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.waiting: list[tuple[int, defer.Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for n, d in list(self.waiting):
            if len(self.data) >= n:
                self.waiting.remove((n, d))
                d.callback(self.data)

    def until(self, n: int) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiting.append((n, d))
        self.dataReceived(b"")
        return d


class _Socket:
    """
    A socket whose C{send} takes at most C{limit} bytes, or raises.
    """

    def __init__(self, real: Any, limit: int | None = None, error: int | None = None) -> None:
        self.real = real
        self.limit = limit
        self.error = error
        self.calls = 0

    def send(self, data: bytes) -> int:
        self.calls += 1
        if self.error is not None and self.calls == 1:
            raise OSError(self.error, "injected")
        if self.limit is not None and self.calls == 1:
            data = data[: self.limit]
        return int(self.real.send(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class EagerWriteTests(TestCase):
    @defer.inlineCallbacks
    def connect(self) -> Any:
        server: defer.Deferred[protocol.Protocol] = defer.Deferred()

        class Server(protocol.Protocol):
            def connectionMade(self) -> None:
                server.callback(self)

        factory = protocol.Factory.forProtocol(Server)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = _Collect()
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", port.getHost().port
        )
        proto = yield server
        self.addCleanup(proto.transport.loseConnection)
        self.addCleanup(client.transport.loseConnection)
        return proto.transport, client

    def test_not_tcp(self) -> None:
        """
        Any other transport gets a plain C{write}.
        """
        t = StringTransport()
        eager.write(t, b"220 hello\r\n")
        self.assertEqual(t.value(), b"220 hello\r\n")

    @defer.inlineCallbacks
    def test_sent_at_once(self) -> Any:
        """
        On an idle TCP connection the bytes go to the socket during the
        call: nothing is buffered and the socket is not watched for
        writability.
        """
        transport, client = yield self.connect()
        eager.write(transport, b"250 ok\r\n")
        self.assertEqual(transport.dataBuffer, b"")
        self.assertEqual(transport._tempDataBuffer, [])
        self.assertNotIn(transport, reactor.getWriters())  # type: ignore[attr-defined]
        data = yield client.until(8)
        self.assertEqual(data, b"250 ok\r\n")

    @defer.inlineCallbacks
    def test_partial_send(self) -> Any:
        """
        What the kernel does not take goes through C{transport.write}, in
        order.
        """
        transport, client = yield self.connect()
        transport.socket = _Socket(transport.socket, limit=3)
        eager.write(transport, b"250 first\r\n")
        eager.write(transport, b"250 second\r\n")  # behind the buffered rest
        data = yield client.until(23)
        self.assertEqual(data, b"250 first\r\n250 second\r\n")

    @defer.inlineCallbacks
    def test_would_block(self) -> Any:
        """
        EAGAIN leaves it all to C{transport.write}.
        """
        transport, client = yield self.connect()
        transport.socket = _Socket(transport.socket, error=errno.EAGAIN)
        eager.write(transport, b"354 go ahead\r\n")
        self.assertEqual(transport._tempDataBuffer, [b"354 go ahead\r\n"])
        data = yield client.until(14)
        self.assertEqual(data, b"354 go ahead\r\n")

    @defer.inlineCallbacks
    def test_other_error(self) -> Any:
        """
        Another error is left for Twisted to find: the write is buffered,
        not lost or raised.
        """
        transport, client = yield self.connect()
        transport.socket = _Socket(transport.socket, error=errno.EPIPE)
        eager.write(transport, b"221 bye\r\n")
        self.assertEqual(transport._tempDataBuffer, [b"221 bye\r\n"])

    @defer.inlineCallbacks
    def test_disconnecting(self) -> Any:
        """
        After C{loseConnection} writes are Twisted's to refuse.
        """
        transport, client = yield self.connect()
        sock = transport.socket = _Socket(transport.socket)
        transport.loseConnection()
        eager.write(transport, b"late\r\n")
        self.assertEqual(sock.calls, 0)
