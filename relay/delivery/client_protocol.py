"""
The wire side of the relay client: one TCP (then perhaps TLS) connection to
a next hop.

L{SMTPClientProtocol} writes commands and body bytes, parses the hop's
replies (multi-line ones too, RFC 5321 section 4.2.1) and hands them out in
order through L{SMTPClientProtocol.next_reply}, each with its timeout on the
injected clock; it knows nothing of what the commands mean.  It is the push
producer of its own transport, so that the body waits while the hop does
not read.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.app._compat import start_tls
from relay.model.reply import Reply, ReplyError
from relay.smtp import eager

#: The longest reply (all its lines) a hop may send.
MAX_REPLY_BYTES = 64 * 1024


class ReplyTimeout(Exception):
    """
    The hop did not reply in time.
    """


class ConnectionClosed(Exception):
    """
    The connection closed while a reply was awaited.
    """


def peer_address(transport: Any) -> tuple[str, int] | None:
    """
    The IP address and port that C{transport} is connected to, or C{None}
    when it has none (a UNIX socket, a test transport without one).
    """
    try:
        peer = transport.getPeer()
    except Exception:
        return None
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return host, port
    return None


@implementer(IPushProducer)
class SMTPClientProtocol(Protocol):
    """
    One connection to a hop: writes commands, parses (multi-line) replies
    and hands them out in order through L{next_reply}, each with a timeout.

    What the conversation means (the session's extensions, how many
    transactions it carried) is the business of
    L{relay.delivery.client_session.ClientSession}; this class holds only
    what the wire shows: replies, TLS, whether it is closed.

    @ivar tls: STARTTLS was begun on this connection.
    @ivar closed: the connection is lost.
    @ivar peer: the peer, C{(ip, port)}, read once connected (for the logs).
    @ivar on_lost: called once when the connection is lost (the idle pool's
        hook).
    """

    def __init__(self, clock: Any, reply_timeout: float) -> None:
        self._clock = clock
        self._reply_timeout = reply_timeout
        self._buffer = b""
        self._lines: list[bytes] = []
        self._replies: deque[Reply] = deque()
        self._waiter: Deferred[Reply] | None = None
        self._timer: Any = None
        self._error: Exception | None = None
        self._paused: Deferred[None] | None = None
        self.tls = False
        self.closed = False
        self.on_lost: Callable[[], None] | None = None
        self._lost_waiters: list[Deferred[None]] = []
        self.peer: tuple[str, int] | None = None

    # Connection and flow control

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = peer_address(self.transport)
        # Commands and the body go out in few, deliberate writes and each
        # waits for a reply: Nagle's algorithm would hold a small write
        # (the end of data after the body) until the hop's delayed ACK,
        # some 40 ms per message on loopback.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            try:
                no_delay(True)
            except OSError:
                pass
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    async def writable(self) -> None:
        """
        Wait until the transport wants more data.
        """
        if self._paused is None or self.closed:
            return
        # A hop that stops reading gets as long as it would for a reply.
        timer = self._clock.callLater(self._reply_timeout, self._write_timed_out)
        try:
            while self._paused is not None and not self.closed:
                await self._paused
        finally:
            if timer.active():
                timer.cancel()

    def _write_timed_out(self) -> None:
        self._set_error(ReplyTimeout(f"hop did not read for {self._reply_timeout} seconds"))
        self.abort()
        self.resumeProducing()

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        assert self.transport is not None
        eager.write(self.transport, data)

    def send(self, *commands: str) -> None:
        """
        Write the commands in one write (pipelined if several).
        """
        self.write(b"".join(c.encode("utf-8") + b"\r\n" for c in commands))

    def start_tls(self, creator: Any) -> None:
        """
        Begin TLS on the connection, as the client, with C{creator} (an
        C{IOpenSSLClientConnectionCreator}).
        """
        assert self.transport is not None
        start_tls(self.transport, creator)
        self.tls = True

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.loseConnection()

    def quit(self) -> None:
        """
        Say goodbye (QUIT, without waiting for the reply) and close.
        """
        if not self.closed:
            self.send("QUIT")
        self.close()

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._set_error(ConnectionClosed(f"connection closed: {why}"))
        self.resumeProducing()
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def when_lost(self) -> Deferred[None]:
        """
        A Deferred firing once the connection is lost.
        """
        if self.closed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    @property
    def clean(self) -> bool:
        """
        Nothing unasked-for arrived and nothing failed: fit for another
        transaction.
        """
        return not self.closed and self._error is None and not self._replies and not self._lines

    # Replies

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self._error is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_BYTES:
                    self._protocol_error("reply line too long")
                return
            line, self._buffer = self._buffer[:end].rstrip(b"\r"), self._buffer[end + 1 :]
            self._lines.append(line)
            if line[3:4] == b"-" and sum(len(x) for x in self._lines) < MAX_REPLY_BYTES:
                continue
            raw = b"".join(x + b"\r\n" for x in self._lines)
            self._lines = []
            try:
                reply = Reply.parse(raw)
            except ReplyError as e:
                self._protocol_error(f"bad reply: {e}")
                return
            self._deliver(reply)

    def _protocol_error(self, message: str) -> None:
        self._set_error(ReplyError(message))
        self.abort()

    def _deliver(self, reply: Reply) -> None:
        waiter = self._take_waiter()
        if waiter is None:
            self._replies.append(reply)
        else:
            waiter.callback(reply)

    def _take_waiter(self) -> Deferred[Reply] | None:
        # The reply timer stays set: the next wait pushes it back
        # (DelayedCall.reset, cheap when it moves later) rather than a
        # cancel and a callLater for every reply (measured: 7 us a pair,
        # four replies a message); it lapses harmlessly when nothing waits.
        waiter, self._waiter = self._waiter, None
        return waiter

    def _set_error(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        waiter = self._take_waiter()
        if waiter is not None:
            waiter.errback(Failure(self._error))

    def _timed_out(self) -> None:
        self._timer = None
        if self._waiter is None:
            return
        self._set_error(ReplyTimeout(f"no reply within {self._reply_timeout} seconds"))
        self.abort()

    def has_reply(self) -> bool:
        """
        Whether a reply has arrived that L{next_reply} would return at
        once (for a sender that reads replies only when they are there,
        as BDAT chunks with PIPELINING do).
        """
        return bool(self._replies)

    def next_reply(self) -> Deferred[Reply]:
        """
        The next reply from the hop; fails with L{ReplyTimeout} if it does
        not come within the reply timeout, L{ConnectionClosed} or
        L{ReplyError}.
        """
        if self._replies:
            return succeed(self._replies.popleft())
        if self._error is not None:
            return fail(self._error)
        assert self._waiter is None, "one reply at a time"
        d: Deferred[Reply] = Deferred()
        self._waiter = d
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._reply_timeout)
        else:
            self._timer = self._clock.callLater(self._reply_timeout, self._timed_out)
        return d


class SMTPClientFactory(Factory):
    """
    Makes the L{SMTPClientProtocol} of one connection.
    """

    # One factory per connection: its start/stop lines would be noise.
    noisy = False

    def __init__(self, clock: Any, reply_timeout: float) -> None:
        self._clock = clock
        self._reply_timeout = reply_timeout

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        p = SMTPClientProtocol(self._clock, self._reply_timeout)
        p.factory = self
        return p
