"""
The relay client: deliver one envelope to one next hop over SMTP.

L{RelayClient.send} connects to a hop, speaks EHLO (or HELO), STARTTLS and
AUTH as configured, sends the transaction (pipelined when the hop offers
PIPELINING, RFC 2920) and reports, per recipient, the reply that settled
it.  The message body is written with CRLF line endings and exact
dot-stuffing (L{relay.smtp.stuffing.DotStuffer}) whatever the stored bytes hold.

A connection whose transaction ended cleanly (the reply to the end of
data, or every recipient refused and RSET answered 250) is kept idle in a
small per-hop pool and reused, with its EHLO/STARTTLS/AUTH state, for the
next envelope to that hop; L{RelayClient.close_idle} closes the pool.
"""

from __future__ import annotations

import base64
import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.app._compat import start_tls
from relay.model.argument import Argument, find
from relay.model.envelope import Envelope
from relay.model.reply import Reply, ReplyError
from relay.smtp import eager
from relay.smtp.stuffing import DotStuffer

CHUNK_SIZE = 64 * 1024
MAX_REPLY_BYTES = 64 * 1024

log = Logger()


@dataclass(frozen=True)
class DeliveryResult:
    """
    The outcome of one delivery attempt to one hop.

    @ivar hop: the hop, C{host:port}.
    @ivar replies: for each recipient (C{str(address)}), in envelope order,
        the reply that settled it: its RCPT TO rejection, else the reply to
        the end of data.
    @ivar address: the peer the connection went to, C{(ip, port)} (of the
        several addresses a host name may have, the one that answered).
    """

    hop: str
    replies: tuple[tuple[str, Reply], ...]
    address: tuple[str, int] | None = None


class DeliveryError(Exception):
    """
    The hop could not take the message at all.

    @ivar reply: the hop's reply (or one made up to describe the failure),
        C{None} for connection failures and timeouts.
    @ivar permanent: the hop refused the message permanently (a 5xx to
        MAIL FROM or DATA, a message too big, SMTPUTF8 needed but not
        offered); else try again later or elsewhere.
    @ivar address: the peer connected to, C{(ip, port)}; C{None} when no
        connection was made.
    """

    def __init__(
        self,
        message: str,
        reply: Reply | None = None,
        permanent: bool = False,
        address: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.reply = reply
        self.permanent = permanent
        self.address = address


class ReplyTimeout(Exception):
    """
    The hop did not reply in time.
    """


class ConnectionClosed(Exception):
    """
    The connection closed while a reply was awaited.
    """


class _Stale(Exception):
    """
    A reused connection turned out closed (or answered MAIL with 421)
    before the transaction began: try once more on a fresh connection.
    """


def parse_hop(hop: str) -> tuple[str, int]:
    """
    Split C{host:port} or C{[v6]:port} into host and port.

    @raise ValueError: if C{hop} is malformed.
    """
    if hop.startswith("["):
        end = hop.find("]")
        if end < 0 or hop[end + 1 : end + 2] != ":":
            raise ValueError(f"bad hop {hop!r}")
        host, port = hop[1:end], hop[end + 2 :]
        if host[:5].lower() == "ipv6:":
            host = host[5:]
    else:
        host, sep, port = hop.rpartition(":")
        if not sep:
            host, port = hop, "25"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad hop {hop!r}")
    return host, int(port)


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
    The wire side of the client: writes commands, parses (multi-line)
    replies and hands them out in order through L{next_reply}, each with a
    timeout.
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
        # Set once the greeting, EHLO/HELO, STARTTLS and AUTH are done: the
        # extensions the hop offered; kept for transactions on a reused
        # connection.
        self.extensions: dict[str, str] | None = None
        # Transactions begun on this connection.
        self.transactions = 0
        # Called once when the connection is lost (the idle pool's hook).
        self.on_lost: Callable[[], None] | None = None
        self._lost_waiters: list[Deferred[None]] = []
        # The peer, C{(ip, port)}, read once connected (for the logs).
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
        assert self.transport is not None
        start_tls(self.transport, creator)
        self.tls = True

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
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
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        return waiter

    def _set_error(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        waiter = self._take_waiter()
        if waiter is not None:
            waiter.errback(Failure(self._error))

    def _timed_out(self) -> None:
        self._timer = None
        self._set_error(ReplyTimeout(f"no reply within {self._reply_timeout} seconds"))
        self.abort()

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
        self._timer = self._clock.callLater(self._reply_timeout, self._timed_out)
        return d


class _ClientFactory(Factory):
    # One factory per connection: its start/stop lines would be noise.
    noisy = False

    def __init__(self, clock: Any, reply_timeout: float) -> None:
        self._clock = clock
        self._reply_timeout = reply_timeout

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        p = SMTPClientProtocol(self._clock, self._reply_timeout)
        p.factory = self
        return p


def _extensions(reply: Reply) -> dict[str, str]:
    exts = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            exts[keyword.upper()] = params.strip()
    return exts


def _xtext_ok(value: str | None) -> bool:
    return value is not None and value.isascii()


class RelayClient:
    """
    Deliver envelopes to next hops over SMTP.

    @param reactor: an C{IReactorTCP} and C{IReactorTime}.
    @param hostname: the name given in EHLO/HELO.
    @param tls: C{"none"} (never STARTTLS), C{"may"} (when offered),
        C{"encrypt"} (required, certificate not checked) or C{"verify"}
        (required, certificate and host name verified).
    @param trust_root: the C{trustRoot} for C{"verify"} (default: the
        platform's trust store).
    @param auth: C{(username, password)} for AUTH PLAIN/LOGIN, sent only
        over TLS.
    @param run_in_thread: C{f(callable, *args) -> Deferred} to read message
        files off the reactor thread; C{None} reads synchronously.
    @param max_idle_per_hop: how many connections per hop are kept idle
        after a transaction that ended cleanly, for the next envelope to
        that hop (C{0}: QUIT after every envelope).  The default matches
        the delivery scheduler's per-destination cap: a smaller pool
        closes connections that the next deliveries reopen at once.
    @param idle_timeout: seconds an idle connection is kept before QUIT.
    @param max_reuse: transactions per connection, after which it is QUIT.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        hostname: str,
        tls: str = "may",
        trust_root: Any = None,
        auth: tuple[str, str] | None = None,
        connect_timeout: float = 30.0,
        reply_timeout: float = 300.0,
        run_in_thread: Callable[..., Any] | None = None,
        max_idle_per_hop: int = 20,
        idle_timeout: float = 5.0,
        max_reuse: int = 100,
    ) -> None:
        if tls not in ("none", "may", "encrypt", "verify"):
            raise ValueError(f"tls must be none, may, encrypt or verify, not {tls!r}")
        self._reactor = reactor
        self.hostname = hostname
        self.tls = tls
        self._trust_root = trust_root
        self._auth = auth
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._run_in_thread = run_in_thread
        self.max_idle_per_hop = max_idle_per_hop
        self.idle_timeout = idle_timeout
        self.max_reuse = max_reuse
        # hop -> idle connections (most recently parked last), each with
        # its idle timer.
        self._idle: dict[str, list[tuple[SMTPClientProtocol, Any]]] = {}

    def send(self, hop: str, envelope: Envelope) -> Deferred[DeliveryResult]:
        """
        Deliver C{envelope} to C{hop} (C{host:port} or C{[v6]:port}).

        @return: a Deferred firing with a L{DeliveryResult}, or failing with
            L{DeliveryError} when the hop could not take the message at all.
        """
        return Deferred.fromCoroutine(self._send(hop, envelope))

    def _endpoint(self, host: str, port: int) -> Any:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(self._reactor, host, port, timeout=self._connect_timeout)
        if ip.version == 4:
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=self._connect_timeout)
        return TCP6ClientEndpoint(self._reactor, host, port, timeout=self._connect_timeout)

    # The idle pool

    def _take_idle(self, hop: str) -> SMTPClientProtocol | None:
        """
        An idle connection to C{hop} still fit for use, taken out of the
        pool, or C{None}.
        """
        pool = self._idle.get(hop)
        while pool:
            proto, timer = pool.pop()
            if timer.active():
                timer.cancel()
            proto.on_lost = None
            if proto.clean:
                if not pool:
                    del self._idle[hop]
                return proto
            # Something arrived while idle (such as a 421): not reusable.
            self._goodbye(proto)
        self._idle.pop(hop, None)
        return None

    def _park(self, hop: str, proto: SMTPClientProtocol) -> bool:
        """
        Keep C{proto} idle for the next envelope to C{hop}, if it may be
        reused and the pool has room.
        """
        if (
            not proto.clean
            or proto.transactions >= self.max_reuse
            or len(self._idle.get(hop, ())) >= self.max_idle_per_hop
        ):
            return False
        pool = self._idle.setdefault(hop, [])
        timer = self._reactor.callLater(self.idle_timeout, self._expire, hop, proto)
        entry = (proto, timer)
        pool.append(entry)

        def lost() -> None:
            # Closed by the hop while idle: drop it.
            self._forget(hop, entry)

        proto.on_lost = lost
        return True

    def _forget(self, hop: str, entry: tuple[SMTPClientProtocol, Any]) -> None:
        pool = self._idle.get(hop)
        if pool is not None and entry in pool:
            pool.remove(entry)
            if not pool:
                del self._idle[hop]
        if entry[1].active():
            entry[1].cancel()

    def _expire(self, hop: str, proto: SMTPClientProtocol) -> None:
        for entry in list(self._idle.get(hop, ())):
            if entry[0] is proto:
                self._forget(hop, entry)
        proto.on_lost = None
        self._goodbye(proto)

    @staticmethod
    def _goodbye(proto: SMTPClientProtocol) -> None:
        if not proto.closed:
            proto.send("QUIT")
        proto.close()

    def close_idle(self, timeout: float = 5.0) -> Deferred[None]:
        """
        QUIT and close every idle connection (for a graceful stop).

        @return: a Deferred firing once they are all closed; those still
            open after C{timeout} seconds are aborted.
        """
        protos = []
        for hop in list(self._idle):
            for entry in list(self._idle.get(hop, ())):
                self._forget(hop, entry)
                entry[0].on_lost = None
                protos.append(entry[0])
        if not protos:
            return succeed(None)
        for proto in protos:
            self._goodbye(proto)
        waiting = [p.when_lost() for p in protos]
        done: Deferred[None] = Deferred()

        def abort_rest() -> None:
            for proto in protos:
                proto.abort()

        timer = self._reactor.callLater(timeout, abort_rest)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
            done.callback(None)

        gatherResults(waiting).addCallback(finished)
        return done

    # Delivery

    async def _send(self, hop: str, envelope: Envelope) -> DeliveryResult:
        try:
            host, port = parse_hop(hop)
        except ValueError as e:
            raise DeliveryError(str(e)) from None
        proto = self._take_idle(hop)
        if proto is not None:
            try:
                return await self._attempt(hop, host, envelope, proto)
            except _Stale as e:
                log.info(
                    "reused connection to {hop} unusable for {envelope_id} ({error}); reconnecting",
                    hop=hop, envelope_id=envelope.id, error=str(e),
                )
        factory = _ClientFactory(self._reactor, self._reply_timeout)
        try:
            proto = await self._endpoint(host, port).connect(factory)
        except Exception as e:
            # Logged by whoever settles the entry, as the attempt's outcome.
            raise DeliveryError(f"connect to {hop} failed: {e}") from e
        return await self._attempt(hop, host, envelope, proto)

    async def _attempt(
        self, hop: str, host: str, envelope: Envelope, proto: SMTPClientProtocol
    ) -> DeliveryResult:
        """
        One transaction on C{proto} (fresh, or reused from the pool); park
        the connection afterwards when it ended cleanly, else QUIT.

        @raise _Stale: a reused connection was found closed (or said 421)
            at MAIL FROM.
        """
        quit = True
        session = _Session(self, proto, hop, host, envelope)
        try:
            return await session.run()
        except _Stale:
            quit = False
            raise
        except (ReplyTimeout, ConnectionClosed, ReplyError) as e:
            # Like every outcome, logged by whoever settles the entry.
            quit = False
            raise DeliveryError(f"{hop}: {e}", address=proto.peer) from e
        except DeliveryError as e:
            if e.address is None:
                e.address = proto.peer
            raise
        except Exception as e:
            # Such as the message file failing to read: never leave the hop
            # with a partial body it could take for a whole one.
            quit = False
            proto.abort()
            log.failure(
                "delivery of {envelope_id} to {hop} failed",
                hop=hop, envelope_id=envelope.id,
            )
            raise DeliveryError(f"{hop}: {type(e).__name__}: {e}", address=proto.peer) from e
        finally:
            if session.in_data:
                proto.abort()
            elif session.reusable and self._park(hop, proto):
                pass
            elif quit and not proto.closed:
                # Say goodbye, but do not wait for the reply.
                proto.send("QUIT")
                proto.close()
            else:
                proto.close()


class _Session:
    """
    One SMTP session delivering one envelope.
    """

    def __init__(
        self, client: RelayClient, proto: SMTPClientProtocol, hop: str, host: str, envelope: Envelope
    ) -> None:
        self.client = client
        self.proto = proto
        self.hop = hop
        self.host = host
        self.envelope = envelope
        self.extensions: dict[str, str] = {}
        # The body is being written: the hop must not see a QUIT now.
        self.in_data = False
        # The transaction ended cleanly: the connection may be reused.
        self.reusable = False

    def _fail(self, what: str, reply: Reply, permanent: bool = False) -> DeliveryError:
        return DeliveryError(f"{self.hop}: {what}: {reply}", reply, permanent, self.proto.peer)

    async def _command(self, command: str) -> Reply:
        self.proto.send(command)
        return await self.proto.next_reply()

    async def _hello(self) -> None:
        reply = await self._command(f"EHLO {self.client.hostname}")
        if reply.is_positive:
            self.extensions = _extensions(reply)
            return
        if reply.is_permanent:
            reply = await self._command(f"HELO {self.client.hostname}")
            if reply.is_positive:
                self.extensions = {}
                return
        raise self._fail("EHLO/HELO refused", reply)

    def _tls_creator(self) -> Any:
        # pyOpenSSL on first use: a relay whose next hops never offer
        # STARTTLS does without it (see relay.app._compat.keep_openssl_out).
        from twisted.internet import ssl

        if self.client.tls == "verify":
            return ssl.optionsForClientTLS(self.host, trustRoot=self.client._trust_root)
        return ssl.CertificateOptions(verify=False)

    async def _starttls(self) -> None:
        mode = self.client.tls
        if mode == "none":
            return
        if "STARTTLS" not in self.extensions:
            if mode == "may":
                return
            raise self._fail(
                "TLS required", Reply(454, f"4.7.0 {self.hop} does not offer STARTTLS")
            )
        reply = await self._command("STARTTLS")
        if reply.code != 220:
            raise self._fail("STARTTLS refused", reply)
        self.proto.start_tls(self._tls_creator())
        await self._hello()
        if mode == "verify":
            self._check_peer()

    def _check_peer(self) -> None:
        """
        Check the hop's certificate against its name once more: Twisted
        logs but does not fail on a certificate without subjectAltName
        (service_identity's C{CertificateError}), which would let any
        certificate from the trust root pass.
        """
        from service_identity import CertificateError, VerificationError
        from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
        from service_identity.pyopenssl import extract_patterns

        try:
            ipaddress.ip_address(self.host)
            svcid: Any = IPAddress_ID(self.host)
        except ValueError:
            svcid = DNS_ID(self.host)
        get_cert = getattr(self.proto.transport, "getPeerCertificate", None)
        cert = get_cert() if get_cert is not None else None
        try:
            if cert is None:
                raise CertificateError("no peer certificate")
            verify_service_identity(extract_patterns(cert), [svcid], [])
        except (CertificateError, VerificationError) as e:
            raise self._fail(
                "certificate verification failed",
                Reply(454, f"4.7.5 Certificate of {self.hop} does not match {self.host}: {e}"),
            ) from None

    async def _authenticate(self) -> None:
        auth = self.client._auth
        if auth is None:
            return
        if not self.proto.tls:
            raise self._fail(
                "AUTH needs TLS",
                Reply(454, "4.7.0 Not sending credentials without TLS"),
            )
        if "AUTH" not in self.extensions:
            raise self._fail("AUTH not offered", Reply(454, "4.7.0 The next hop does not offer AUTH"))
        user, password = auth
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms or "LOGIN" not in mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            reply = await self._command(f"AUTH PLAIN {token}")
        else:
            reply = await self._command("AUTH LOGIN")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self._command(base64.b64encode(secret.encode()).decode("ascii"))
        if reply.code != 235:
            raise self._fail("AUTH failed", reply)

    def _mail_command(self) -> str:
        env = self.envelope
        args: list[Argument] = []
        exts = self.extensions
        if "SIZE" in exts:
            limit = exts["SIZE"].split()[0] if exts["SIZE"] else ""
            if limit.isdigit() and int(limit) > 0 and env.message.size > int(limit):
                raise self._fail(
                    "message too big",
                    Reply(552, f"5.3.4 Message size {env.message.size} exceeds the hop's limit {limit}"),
                    permanent=True,
                )
            args.append(Argument("SIZE", str(env.message.size)))
        body = find(tuple(env.sender_args), "BODY")
        if body is not None and (body.value or "").upper() == "8BITMIME" and "8BITMIME" in exts:
            args.append(Argument("BODY", "8BITMIME"))
        needs_utf8 = (
            find(tuple(env.sender_args), "SMTPUTF8") is not None
            or not str(env.sender).isascii()
            or any(r.needs_smtputf8 for r in env.recipients)
        )
        if needs_utf8:
            if "SMTPUTF8" not in exts:
                raise self._fail(
                    "SMTPUTF8 needed",
                    Reply(553, "5.6.7 The next hop does not support SMTPUTF8"),
                    permanent=True,
                )
            args.append(Argument("SMTPUTF8"))
        if "DSN" in exts:
            for keyword in ("RET", "ENVID"):
                arg = find(tuple(env.sender_args), keyword)
                if arg is not None and _xtext_ok(arg.value):
                    args.append(arg)
        return " ".join([f"MAIL FROM:<{env.sender}>"] + [str(a) for a in args])

    def _rcpt_commands(self) -> list[str]:
        commands = []
        for rcpt in self.envelope.recipients:
            args = []
            if "DSN" in self.extensions:
                for keyword in ("NOTIFY", "ORCPT"):
                    arg = find(tuple(self.envelope.args_for(rcpt)), keyword)
                    if arg is not None and _xtext_ok(arg.value):
                        args.append(str(arg))
            commands.append(" ".join([f"RCPT TO:<{rcpt}>"] + args))
        return commands

    async def _mail_reply(self, reused: bool) -> Reply:
        """
        The reply to MAIL FROM; on a reused connection, a closed
        connection or a 421 raises L{_Stale}.
        """
        try:
            reply = await self.proto.next_reply()
        except ConnectionClosed as e:
            if reused:
                raise _Stale(str(e)) from e
            raise
        if reused and reply.code == 421:
            raise _Stale(str(reply))
        return reply

    async def run(self) -> DeliveryResult:
        proto = self.proto
        reused = proto.extensions is not None
        if proto.extensions is not None:
            self.extensions = proto.extensions
        else:
            greeting = await proto.next_reply()
            if greeting.code != 220:
                raise self._fail("greeting", greeting)
            await self._hello()
            await self._starttls()
            await self._authenticate()
            proto.extensions = self.extensions
        mail = self._mail_command()
        rcpts = self._rcpt_commands()
        recipients = [str(r) for r in self.envelope.recipients]
        pipelining = "PIPELINING" in self.extensions
        proto.transactions += 1
        if pipelining:
            proto.send(mail, *rcpts, "DATA")
            mail_reply = await self._mail_reply(reused)
            rcpt_replies = [await proto.next_reply() for _ in rcpts]
            data_reply = await proto.next_reply()
            if not mail_reply.is_positive:
                if data_reply.code == 354:
                    proto.write(b".\r\n")
                    await proto.next_reply()
                raise self._fail("MAIL FROM refused", mail_reply, mail_reply.is_permanent)
        else:
            proto.send(mail)
            mail_reply = await self._mail_reply(reused)
            if not mail_reply.is_positive:
                raise self._fail("MAIL FROM refused", mail_reply, mail_reply.is_permanent)
            rcpt_replies = []
            for command in rcpts:
                rcpt_replies.append(await self._command(command))
        accepted = [r.is_positive for r in rcpt_replies]
        if not any(accepted):
            if pipelining and data_reply.code == 354:
                # The hop took DATA with no recipient (RFC 2920 section 3.1):
                # send an empty message, which it must refuse.
                proto.write(b".\r\n")
                await proto.next_reply()
            proto.send("RSET")
            if self.client.max_idle_per_hop > 0:
                # Reuse the connection only once the hop confirmed RSET.
                try:
                    rset = await proto.next_reply()
                except (ReplyTimeout, ConnectionClosed, ReplyError):
                    pass
                else:
                    self.reusable = rset.code == 250
            return DeliveryResult(
                self.hop, tuple(zip(recipients, rcpt_replies, strict=True)), proto.peer
            )
        if not pipelining:
            data_reply = await self._command("DATA")
        if data_reply.code != 354:
            raise self._fail("DATA refused", data_reply, data_reply.is_permanent)
        self.in_data = True
        await self._write_body()
        self.in_data = False
        final = await proto.next_reply()
        # A 421 means the hop is closing the connection.
        self.reusable = final.code != 421
        replies = tuple(
            (address, final if ok else reply)
            for address, ok, reply in zip(recipients, accepted, rcpt_replies, strict=True)
        )
        # Every outcome, whole or partial, is logged by whoever settles the
        # entry: one line per outcome, none here.
        return DeliveryResult(self.hop, replies, proto.peer)

    async def _call(self, f: Callable[..., Any], *args: Any) -> Any:
        run = self.client._run_in_thread
        if run is None:
            return f(*args)
        result = run(f, *args)
        if isinstance(result, Deferred):
            result = await result
        return result

    async def _write_body(self) -> None:
        """
        Write the body and the end-of-data marker.  The last chunk and the
        marker go out in one write; a message file is read one chunk per
        trip to the thread pool, opening and closing included, so that a
        small message costs a single trip.
        """
        proto = self.proto
        stuffer = DotStuffer()
        message = self.envelope.message
        if message.data is not None:
            data = message.data
            last = max(len(data) - 1, 0) // CHUNK_SIZE * CHUNK_SIZE
            for start in range(0, last, CHUNK_SIZE):
                proto.write(stuffer.encode(data[start : start + CHUNK_SIZE]))
                await proto.writable()
            proto.write(stuffer.encode(data[last:]) + stuffer.finish())
            return
        assert message.path is not None
        reader = _FileReader(message.path)
        try:
            while True:
                chunk = await self._call(reader.read)
                if reader.done:
                    break
                proto.write(stuffer.encode(chunk))
                await proto.writable()
        finally:
            if not reader.done:
                await self._call(reader.close)
        proto.write(stuffer.encode(chunk) + stuffer.finish())


class _FileReader:
    """
    Read a message file in L{CHUNK_SIZE} chunks, opening it on the first
    read and closing it on the read that reaches its end.

    @ivar done: the end of the file was read (and the file is closed).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._file: Any = None
        self.done = False

    def read(self) -> bytes:
        if self._file is None:
            self._file = open(self._path, "rb")
        chunk: bytes = self._file.read(CHUNK_SIZE)
        # A buffered read of a regular file returns less than asked only
        # at its end.
        if len(chunk) < CHUNK_SIZE:
            self.close()
            self.done = True
        return chunk

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()
