"""
Drive the real relay client (L{RelayClient}) against the real SMTP server
(L{SMTPServerFactory}) with a plugin, in memory: every connection the
client opens is completed with L{twisted.test.iosim} to a new session of
the server, on one L{MemoryReactorClock} that is both sides' clock.

    harness = ClientHarness(MyPolicy(), settings=ClientSettings(hostname="relay.test"))
    result = harness.deliver(make_envelope("a@example.org", "b@example.com"))
    harness.connections[0].check('''
        < 220
        > EHLO relay.test
        ...
    ''')

STARTTLS negotiates real TLS (pyOpenSSL over memory BIOs, as Twisted's
TCP transports do), so certificates and their verification are what they
are on a socket; the transcript shows what each side wrote before
encryption.  Nothing here needs a test framework: a mismatch raises
L{TranscriptMismatch}, an C{AssertionError}.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IReactorTime, ISSLTransport
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump
from twisted.test.iosim import connect as iosim_connect
from zope.interface import directlyProvides

from relay.delivery.client import ClientSettings, DeliveryResult, RelayClient
from relay.delivery.client_body import RunInThread
from relay.model.entry import ACTIVE, QUARANTINE, SpoolEntry
from relay.model.envelope import Envelope
from relay.model.message import Message
from relay.simple import Defaults, Simple, as_callbacks
from relay.smtp.server import SMTPServerFactory, SMTPServerProtocol
from relay.spool.memory import MemorySpool
from relay.testing.transcript import REMOTE_ADDRESS, ServerOptions, TranscriptMismatch

if TYPE_CHECKING:
    from typing import Unpack

#: The hop the harness's client delivers to unless told otherwise
#: (TEST-NET-1, RFC 5737).  A host name works too: the memory reactor
#: resolves every name to 127.0.0.1.
HOP = "192.0.2.25:25"


class _Lines:
    """
    The lines two sides of a connection wrote, in the order written.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._partial = {"<": b"", ">": b""}

    def record(self, direction: str, data: bytes) -> None:
        *complete, self._partial[direction] = (self._partial[direction] + data).split(b"\n")
        for raw in complete:
            text = raw.rstrip(b"\r").decode("utf-8", "replace")
            self.lines.append(f"{direction} {text}".rstrip())


class _Raw:
    """
    What the TLS layer writes to: the transport below it, bypassing the
    layer itself and the transcript (as Twisted's C{_BypassTLS}).
    """

    def __init__(self, transport: MemoryTransport) -> None:
        self._transport = transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        FakeTransport.write(self._transport, data)  # type: ignore[no-untyped-call]

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        FakeTransport.loseConnection(self._transport)  # type: ignore[no-untyped-call]

    def abortConnection(self) -> None:
        FakeTransport.abortConnection(self._transport)  # type: ignore[no-untyped-call]


class MemoryTransport(FakeTransport):
    """
    An iosim L{FakeTransport} whose C{startTLS} puts a real TLS layer (a
    L{TLSMemoryBIOProtocol}) between the wire and its protocol, as
    Twisted's TCP transports do, and which records what its protocol
    writes (the clear text) in a transcript.

    @ivar handle: once TLS started, the layer's pyOpenSSL connection.
    """

    def __init__(
        self,
        protocol: IProtocol,
        is_server: bool,
        host: IPv4Address | IPv6Address,
        peer: IPv4Address | IPv6Address,
        record: Callable[[bytes], None],
        clock: IReactorTime,
    ) -> None:
        """
        @param record: called with what the protocol writes.
        @param clock: the TLS layer's clock (it gathers small writes until
            the next turn of the clock).
        """
        super().__init__(protocol, is_server, host, peer)  # type: ignore[no-untyped-call]
        self._record = record
        self._clock = clock
        self._tls_layer: TLSMemoryBIOProtocol | None = None

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        self._record(data)
        if self._tls_layer is not None:
            self._tls_layer.write(data)  # type: ignore[no-untyped-call]
        else:
            super().write(data)  # type: ignore[no-untyped-call]

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.write(b"".join(iovec))

    def loseConnection(self) -> None:
        if self._tls_layer is not None:
            self._tls_layer.loseConnection()  # type: ignore[no-untyped-call]
        else:
            super().loseConnection()  # type: ignore[no-untyped-call]

    def abortConnection(self) -> None:
        if self._tls_layer is not None:
            self._tls_layer.abortConnection()  # type: ignore[no-untyped-call]
        else:
            super().abortConnection()  # type: ignore[no-untyped-call]

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        client = not self.isServer if beNormal else self.isServer
        # No wrapped factory: the layer goes under an existing protocol, as
        # in Twisted's own startTLS (twisted.internet._newtls).
        factory = TLSMemoryBIOFactory(
            contextFactory, client, None, clock=self._clock  # type: ignore[arg-type]
        )
        layer: TLSMemoryBIOProtocol = factory.protocol(factory, self.protocol, False)
        self._tls_layer = layer
        # Bytes from the wire go through TLS to the protocol from now on.
        self.protocol = layer
        self.getPeerCertificate = layer.getPeerCertificate
        self.getHandle = layer.getHandle
        directlyProvides(self, ISSLTransport)
        layer.makeConnection(_Raw(self))  # type: ignore[no-untyped-call]


def match_transcript(lines: list[str], script: str) -> None:
    """
    Check recorded C{lines} against C{script}: one C{< ...} or C{> ...}
    line per recorded line, in order, each the start of the recorded line
    (or, after C{re:}, a regular expression it matches whole); blank lines
    and C{#} comments are skipped.  Every recorded line must be matched.

    @raise TranscriptMismatch: where they differ.
    """
    expected = [
        line.strip()
        for line in script.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for number, want in enumerate(expected):
        got = lines[number] if number < len(lines) else None
        if got is not None:
            direction, _, text = want.partition(" ")
            if text.startswith("re:"):
                ok = got[:2] == f"{direction} " and re.fullmatch(text[3:], got[2:]) is not None
            else:
                ok = got.startswith(want)
            if ok:
                continue
        shown = [f"    {line}" for line in lines[:number]]
        rest = [f"  + {line}" for line in lines[number:]] or ["  + (nothing more)"]
        raise TranscriptMismatch(
            "\n".join(
                [f"SMTP transcript differs from the script at its line {number + 1}:"]
                + shown + [f"  - {want}"] + rest + ["  (- the script, + the session)"]
            )
        )
    if len(lines) > len(expected):
        raise TranscriptMismatch(
            "SMTP transcript goes on after the script:\n"
            + "\n".join(f"  + {line}" for line in lines[len(expected) :])
        )


class HarnessConnection:
    """
    One connection the client opened, with the server session it reached.

    @ivar server: the server's side of the session.
    @ivar client_transport: the client's end of the connection.
    @ivar server_transport: the server's end.
    @ivar pump: moves bytes between the two (L{twisted.test.iosim}).
    """

    def __init__(
        self,
        server: SMTPServerProtocol,
        client_transport: MemoryTransport,
        server_transport: MemoryTransport,
        pump: IOPump,
        lines: _Lines,
    ) -> None:
        self.server = server
        self.client_transport = client_transport
        self.server_transport = server_transport
        self.pump = pump
        self._lines = lines

    @property
    def transcript(self) -> tuple[str, ...]:
        """
        Every complete line of the session in the order written: C{"> ..."}
        from the client (commands and the body, as sent: dot-stuffed),
        C{"< ..."} from the server.
        """
        return tuple(self._lines.lines)

    @property
    def closed(self) -> bool:
        """
        Whether the connection is closed.
        """
        return bool(self.client_transport.disconnected or self.server_transport.disconnected)

    def check(self, script: str) -> None:
        """
        Check the whole transcript against C{script} (see
        L{match_transcript}).
        """
        match_transcript(list(self.transcript), script)

    def __str__(self) -> str:
        return "\n".join(self.transcript)


class ClientHarness:
    """
    A L{RelayClient} whose every connection reaches a session of relay's
    own SMTP server, in memory.

    The plugin goes through L{as_callbacks} and gets C{configure(defaults)}
    as it does in the relay, as in L{relay.testing.ServerHarness}.

    @ivar reactor: the client's reactor and both sides' clock.
    @ivar client: the client.
    @ivar factory: the server.
    @ivar spool: the server's spool.
    @ivar connections: every connection the client opened, in order.
    """

    def __init__(
        self,
        callbacks: object = None,
        *,
        settings: ClientSettings | None = None,
        run_in_thread: RunInThread | None = None,
        defaults: Defaults | None = None,
        spool: MemorySpool | None = None,
        factory: SMTPServerFactory | None = None,
        **options: Unpack[ServerOptions],
    ) -> None:
        """
        @param callbacks: the server's plugin (default L{relay.Simple}).
        @param settings: the client's settings; by default
            C{ClientSettings(hostname="relay.test")}.
        @param run_in_thread: as L{RelayClient} takes it.
        @param defaults: what the plugin's C{configure} gets; by default
            the server's host name (its clock is the harness's).
        @param spool: the server's spool; by default a new L{MemorySpool}.
        @param factory: a server made by the test (on L{reactor}'s clock),
            instead of one made of the other arguments.
        @param options: L{SMTPServerFactory} settings (L{ServerOptions}).
        """
        self.reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
        if factory is not None:
            if options or any(x is not None for x in (callbacks, defaults, spool)):
                raise TypeError("with factory=, give no server arguments")
            self.factory = factory
        else:
            plugin = as_callbacks(callbacks if callbacks is not None else Simple)
            configure = getattr(plugin, "configure", None)
            if callable(configure):
                hostname = options.get("hostname", "localhost")
                given = defaults if defaults is not None else Defaults(hostname=hostname)
                if given.clock is None:
                    given = replace(given, clock=self.reactor)
                configure(given)
            self.factory = SMTPServerFactory(
                callbacks=plugin,
                spool=spool if spool is not None else MemorySpool(self.reactor),
                clock=self.reactor,
                **options,
            )
        self.client = RelayClient(
            self.reactor,
            settings if settings is not None else ClientSettings(hostname="relay.test"),
            run_in_thread=run_in_thread,
        )
        self.connections: list[HarnessConnection] = []

    @property
    def spool(self) -> MemorySpool:
        spool = self.factory.spool
        if not isinstance(spool, MemorySpool):
            raise TypeError("the server's spool is not a MemorySpool")
        return spool

    # -- moving bytes ---------------------------------------------------

    def _accept(self) -> bool:
        """
        Complete every connection attempt of the client to a new server
        session.
        """
        accepted = False
        while self.reactor.tcpClients:
            host, port, client_factory, _, _ = self.reactor.tcpClients.pop(0)
            self.reactor.connectors.pop(0)
            address = IPv6Address if ":" in host else IPv4Address
            hop_address = address("TCP", host, port)
            client_address = address(
                "TCP",
                REMOTE_ADDRESS.host if address is IPv4Address else "2001:db8::7",
                REMOTE_ADDRESS.port + len(self.connections),
            )
            lines = _Lines()
            client = client_factory.buildProtocol(hop_address)
            assert client is not None, "the client's factory refused to connect"
            server = self.factory.buildProtocol(client_address)
            client_transport = MemoryTransport(
                client, False, client_address, hop_address, partial(lines.record, ">"),
                self.reactor,
            )
            server_transport = MemoryTransport(
                server, True, hop_address, client_address, partial(lines.record, "<"),
                self.reactor,
            )
            pump = iosim_connect(  # type: ignore[no-untyped-call]
                server, server_transport, client, client_transport, greet=False, clock=self.reactor
            )
            self.connections.append(
                HarnessConnection(server, client_transport, server_transport, pump, lines)
            )
            accepted = True
        return accepted

    def pump(self) -> None:
        """
        Move everything that can move now: connect the client's attempts,
        carry bytes both ways and run the calls due (without advancing
        time), until nothing moves.
        """
        for _ in range(10_000):
            moved = self._accept()
            for connection in self.connections:
                if connection.pump.flush():  # type: ignore[no-untyped-call]
                    moved = True
            if not moved:
                return
        raise AssertionError("the client and the server do not stop talking")

    def advance(self, seconds: float) -> None:
        """
        Let C{seconds} pass on both sides' clock, then L{pump}.
        """
        self.pump()
        self.reactor.advance(seconds)
        self.pump()

    # -- delivering -----------------------------------------------------

    def send(self, envelope: Envelope, hop: str = HOP) -> Deferred[DeliveryResult]:
        """
        Start delivering C{envelope} to C{hop} and L{pump}: the Deferred
        has fired unless the delivery waits for time to pass.
        """
        d = self.client.send(hop, envelope)
        self.pump()
        return d

    def deliver(self, envelope: Envelope, hop: str = HOP) -> DeliveryResult:
        """
        Deliver C{envelope} to C{hop} to the end.

        @return: the reply that settled each recipient.
        @raise relay.delivery.client.DeliveryError: when the hop took
            nothing.
        @raise AssertionError: when the delivery waits for time to pass.
        """
        outcome: list[DeliveryResult | Failure] = []
        self.send(envelope, hop).addBoth(outcome.append)
        if not outcome:
            last = str(self.connections[-1]) if self.connections else "(no connection)"
            raise AssertionError(f"the delivery did not finish; the session so far:\n{last}")
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        assert isinstance(result, DeliveryResult)
        return result

    def close(self) -> None:
        """
        Close the client's idle connections (QUIT) and finish them.
        """
        self.client.close_idle()
        self.pump()

    # -- what the server got ---------------------------------------------

    def _entries(self, queue: str) -> list[SpoolEntry]:
        return [e for e in self.spool.entries_by_id.values() if e.queue == queue]

    @property
    def spooled(self) -> list[SpoolEntry]:
        """
        The entries the server's plugin sent, in the order spooled.
        """
        return self._entries(ACTIVE)

    @property
    def quarantined(self) -> list[SpoolEntry]:
        """
        The entries the server's plugin quarantined, in the order spooled.
        """
        return self._entries(QUARANTINE)

    def message(self, entry: SpoolEntry) -> Message:
        """
        The message the server stored for C{entry}.
        """
        return self.spool.messages_by_id[entry.id]
