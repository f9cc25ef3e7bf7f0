"""
Drive the real SMTP server (L{SMTPServerProtocol}, made by
L{SMTPServerFactory}) with a plugin over an in-memory transport, with a
L{Clock} and a L{MemorySpool}, and check what the client sees against a
transcript.

A transcript is lines of text::

    < 220 mx.example.com      a line the server writes must start with this text
    < re:250[ -]SIZE \\d+      ... or match this regular expression, whole
    > EHLO client.example     a line the client sends (CRLF is added)
    # a comment; blank lines are skipped too

Client lines are sent as they come; each C{<} line takes the next line the
server wrote.  At the end of the script no server line may be left
unread, unless C{exhaustive=False}.  White space around each script line
is ignored (so a script may be indented); C{>} alone sends an empty
line and C{<} alone takes any line.

Nothing here needs a test framework: a mismatch raises
L{TranscriptMismatch}, an C{AssertionError} whose message shows the
session so far as a diff, and the rest is values a test asserts on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Mapping, TypedDict, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import FailTest

from relay.model.entry import ACTIVE, QUARANTINE, SpoolEntry
from relay.model.message import Message
from relay.model.reply import Reply
from relay.simple import Defaults, as_callbacks
from relay.smtp.protocol import SMTPServerProtocol
from relay.smtp.server import SMTPServerFactory
from relay.spool.memory import MemorySpool

if TYPE_CHECKING:
    from typing import Unpack

#: The address the test client connects to (TEST-NET-1, RFC 5737).
LOCAL_ADDRESS = IPv4Address("TCP", "192.0.2.25", 25)
#: The address the test client connects from (TEST-NET-2, RFC 5737).
REMOTE_ADDRESS = IPv4Address("TCP", "198.51.100.7", 40000)


class ServerOptions(TypedDict, total=False):
    """
    The settings of L{SMTPServerFactory} that a test may change: the
    fields of L{relay.smtp.server.ServerSettings}, as keyword arguments.
    """

    hostname: str
    max_message_size: int
    max_recipients: int
    max_sessions: int
    idle_timeout: float
    command_deadline: float
    # Whatever the transport's startTLS takes; L{TLSStringTransport} only
    # records it, so a test may pass any object to enable STARTTLS.
    tls_context_factory: object
    auth_requires_tls: bool
    reject_bare_lf: bool
    auth_failures_before_delay: int
    auth_failure_delay: float
    auth_max_failures: int
    chunking: bool
    # A relay.dkim.signer.DkimSigner: messages are signed before spooling.
    dkim_signer: object


class TranscriptMismatch(FailTest):
    """
    The server did not say what the transcript expected.

    An C{AssertionError}, as pytest and unittest expect of a failed check;
    it derives from trial's C{FailTest} so that trial too reports it as a
    failure, not an error.
    """


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} whose C{startTLS} records its context instead of
    negotiating: after STARTTLS the server goes on as if TLS were up.

    @ivar tls_context: what the server passed to C{startTLS}, if it did.
    """

    tls_context: object = None

    # Twisted's StringTransport is not annotated: the three methods below
    # only give types to what the harness uses.

    def __init__(
        self,
        hostAddress: IPv4Address | IPv6Address | None = None,
        peerAddress: IPv4Address | IPv6Address | None = None,
    ) -> None:
        super().__init__(hostAddress, peerAddress)  # type: ignore[no-untyped-call]

    def value(self) -> bytes:
        """
        Everything written to the transport since the last L{clear}.
        """
        data: bytes = super().value()  # type: ignore[no-untyped-call]
        return data

    def clear(self) -> None:
        """
        Forget what was written so far.
        """
        super().clear()  # type: ignore[no-untyped-call]

    def startTLS(self, context: object) -> None:
        self.tls_context = context


def _address(value: str | IPv4Address | IPv6Address, port: int) -> IPv4Address | IPv6Address:
    if not isinstance(value, str):
        return value
    if ":" in value:
        return IPv6Address("TCP", value, port)
    return IPv4Address("TCP", value, port)


def _group_replies(lines: tuple[str, ...]) -> tuple[Reply, ...]:
    """
    Group server lines into replies: C{NNN-} lines continue a reply.
    Lines that are not reply lines are left out.
    """
    replies: list[Reply] = []
    current: list[str] = []
    for line in lines:
        if not re.match(r"[2-5]\d\d([ -]|$)", line):
            current = []
            continue
        current.append(line)
        if line[3:4] != "-":
            replies.append(Reply(int(line[:3]), "\n".join(part[4:] for part in current)))
            current = []
    return tuple(replies)


@dataclass(frozen=True)
class TranscriptResult:
    """
    What happened in a session, for a test to assert on.

    @ivar transcript: every complete line of the session in the order
        sent and written, C{"> ..."} from the client and C{"< ..."} from
        the server (the format of the scripts).
    @ivar spooled: the entries the plugin sent, in the active queue (in the
        order they were spooled).
    @ivar quarantined: the entries the plugin quarantined (with their
        C{reason}), in the order quarantined.
    @ivar messages: the message of each entry, by entry id.
    @ivar closed: whether the server closed the connection.
    """

    transcript: tuple[str, ...]
    spooled: tuple[SpoolEntry, ...] = ()
    quarantined: tuple[SpoolEntry, ...] = ()
    messages: Mapping[str, Message] = field(default_factory=dict)
    closed: bool = False

    @property
    def server_lines(self) -> tuple[str, ...]:
        """
        The lines the server wrote: what the client saw.
        """
        return tuple(line[2:] for line in self.transcript if line.startswith("< "))

    @property
    def replies(self) -> tuple[Reply, ...]:
        """
        The server's replies, multi-line ones joined, the greeting first.
        """
        return _group_replies(self.server_lines)

    def message(self, entry: SpoolEntry) -> Message:
        """
        The message of a spooled or quarantined entry.
        """
        return self.messages[entry.id]

    def __str__(self) -> str:
        return "\n".join(self.transcript)


class ServerHarness:
    """
    One SMTP session between a test and the real server, over a
    L{TLSStringTransport}.

    The plugin goes through L{as_callbacks} and gets C{configure(defaults)}
    as it does in the relay, so a class, a partial provider and a
    L{relay.Simple} subclass all work.  Every call is synchronous: what a
    callback answers with a plain value, a fired L{Deferred} or a coroutine
    that does not wait is on the transport when L{send} returns.  A
    callback that waits on the clock waits until the test advances
    L{clock}.

    @ivar clock: the server's clock (and the spool's).
    @ivar spool: the server's spool.
    @ivar factory: the server.
    @ivar transport: the connection, as the server sees it.
    @ivar protocol: the server's side of the session.
    """

    def __init__(
        self,
        callbacks: object = None,
        *,
        defaults: Defaults | None = None,
        spool: MemorySpool | None = None,
        clock: Clock | None = None,
        factory: SMTPServerFactory | None = None,
        remote: str | IPv4Address | IPv6Address = REMOTE_ADDRESS,
        local: str | IPv4Address | IPv6Address = LOCAL_ADDRESS,
        transport: TLSStringTransport | None = None,
        **options: Unpack[ServerOptions],
    ) -> None:
        """
        @param callbacks: the plugin: an L{IServerCallbacks} provider, a
            class of one, or an object with some of the callbacks.
        @param defaults: what the plugin's C{configure} gets; by default
            the server's host name and nothing else.  Its clock, if
            C{None}, is replaced by the harness's.
        @param spool: by default a new L{MemorySpool} on C{clock}.
        @param clock: by default a new L{Clock}, at 0.
        @param factory: another session on this server (sharing its plugin,
            spool, clock and session count) instead of a new server; then
            no other argument but C{remote} and C{local} may be given.
            L{spooled} and L{quarantined} need its spool to be a
            L{MemorySpool}.
        @param remote: the client's address (a host, or an address object).
        @param local: the address the client connected to.
        @param transport: the connection, instead of a L{TLSStringTransport}
            between C{remote} and C{local} (e.g. one that is TLS from the
            start, to test an implicit-TLS listener).
        @param options: L{SMTPServerFactory} settings (L{ServerOptions}).
        """
        if factory is not None:
            if options or any(x is not None for x in (callbacks, defaults, spool, clock)):
                raise TypeError("with factory=, give only remote= and local=")
            self.factory = factory
            # factory= shares the server of another harness, on a Clock.
            self.clock: Clock = cast(Clock, factory.clock)
            self.spool: MemorySpool = factory.spool
        else:
            if callbacks is None:
                raise TypeError("give the plugin, or factory= to share a server")
            self.clock = clock if clock is not None else Clock()
            self.spool = spool if spool is not None else MemorySpool(self.clock)
            plugin = as_callbacks(callbacks)
            configure = getattr(plugin, "configure", None)
            if callable(configure):
                hostname = options.get("hostname", "localhost")
                given = defaults if defaults is not None else Defaults(hostname=hostname)
                if given.clock is None:
                    given = replace(given, clock=self.clock)
                configure(given)
            self.factory = SMTPServerFactory(
                callbacks=plugin, spool=self.spool, clock=self.clock, **options
            )
        self.transport = transport if transport is not None else TLSStringTransport(
            hostAddress=_address(local, 25), peerAddress=_address(remote, 40000)
        )
        self.protocol: SMTPServerProtocol = self.factory.buildProtocol(None)
        self._history: list[str] = []
        self._partial = {"<": b"", ">": b""}
        self._written = b""
        self._pending = b""
        self._unread: list[str] = []
        self._lost = False
        self.protocol.makeConnection(self.transport)  # type: ignore[no-untyped-call]

    # -- the wire -------------------------------------------------------

    def _record(self, direction: str, data: bytes) -> None:
        *complete, self._partial[direction] = (self._partial[direction] + data).split(b"\n")
        for raw in complete:
            text = raw.rstrip(b"\r").decode("utf-8", "replace")
            self._history.append(f"{direction} {text}".rstrip())

    def _drain(self) -> None:
        """
        Take what the server wrote from the transport, recording it in the
        transcript before whatever the client sends next.
        """
        data = self.transport.value()
        if data:
            self.transport.clear()
            self._record("<", data)
            self._written += data

    def send(self, data: bytes | str) -> None:
        """
        Send bytes (or text, as UTF-8) to the server as they are: no CRLF
        is added, and a line may come in pieces.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._drain()
        self._record(">", data)
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        """
        Everything the server wrote since the last call.
        """
        self._drain()
        data, self._written = self._written, b""
        return data

    def lines(self) -> list[str]:
        """
        The complete lines the server wrote that the test has not read yet
        (through L{lines} or L{play}).
        """
        self._pending += self.output()
        *complete, self._pending = self._pending.split(b"\r\n")
        lines = self._unread + [line.decode("utf-8", "replace") for line in complete]
        self._unread = []
        return lines

    @property
    def closed(self) -> bool:
        """
        Whether the server closed (or is closing) the connection.
        """
        return bool(self.transport.disconnecting)

    def disconnect(self) -> None:
        """
        End the connection, as the reactor would: after the server closed
        it (QUIT, an error) or, if it did not, as a client going away
        without QUIT.  The server then forgets the session (its count,
        timers and any message being received).  Safe to call more than
        once.
        """
        if self._lost:
            return
        self._lost = True
        self.transport.connected = False
        # The server does not look at the reason.
        self.protocol.connectionLost(connectionDone)

    # -- transcripts ----------------------------------------------------

    def _next_line(self) -> str | None:
        if not self._unread:
            self._unread = self.lines()
        return self._unread.pop(0) if self._unread else None

    def _silence(self) -> str:
        if self.closed:
            return "+ (nothing: the server closed the connection)"
        return "+ (nothing yet: the server waits for input, or for a callback's Deferred)"

    def _mismatch(
        self, number: int, shown: list[str], expected: str, *got: str
    ) -> TranscriptMismatch:
        lines = [f"SMTP transcript differs from the script at its line {number}:"]
        lines += [f"    {line}" for line in shown]
        lines.append(f"  - {expected}")
        lines += [f"  {line}" for line in got]
        lines.append("  (- the script, + the server)")
        return TranscriptMismatch("\n".join(lines))

    def play(self, script: str, *, exhaustive: bool = True) -> None:
        """
        Play a transcript (see the module docstring) against the server.

        @param exhaustive: fail if the server wrote lines the script did
            not read; with C{False} they are left for the next L{play} or
            L{lines}.
        @raise TranscriptMismatch: when a server line does not match, or
            the server said nothing when the script expected a line.
        @raise ValueError: for a script line that is neither C{<}, C{>}
            nor a comment.
        """
        shown: list[str] = []
        number = 0
        for number, raw in enumerate(script.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            kind, _, text = line.partition(" ")
            if kind == ">":
                self.send(text.encode("utf-8") + b"\r\n")
                shown.append(f"> {text}".rstrip())
            elif kind == "<":
                got = self._next_line()
                if got is None:
                    raise self._mismatch(number, shown, line, self._silence())
                if text.startswith("re:"):
                    ok = re.fullmatch(text[3:], got) is not None
                else:
                    ok = got.startswith(text)
                if not ok:
                    rest = [f"+ < {more}" for more in self.lines()]
                    raise self._mismatch(number, shown, line, f"+ < {got}", *rest)
                shown.append(f"< {got}")
            else:
                raise ValueError(f"transcript line {number} is not '< ...' or '> ...': {raw!r}")
        if exhaustive:
            extra = self.lines()
            if extra:
                raise self._mismatch(
                    number + 1, shown, "(the end of the script)", *[f"+ < {x}" for x in extra]
                )

    def result(self) -> TranscriptResult:
        """
        The session so far: its transcript, and what the spool holds (the
        spool must be a L{MemorySpool}).
        """
        # The transcript gets what the server wrote last; the test can
        # still read it with lines() and play().
        self._drain()
        return TranscriptResult(
            transcript=tuple(self._history),
            spooled=tuple(self._entries(ACTIVE)),
            quarantined=tuple(self._entries(QUARANTINE)),
            messages=dict(self.spool.messages_by_id),
            closed=self.closed,
        )

    def _entries(self, queue: str) -> list[SpoolEntry]:
        # In the order spooled: the memory spool's dict keeps it.
        return [e for e in self.spool.entries_by_id.values() if e.queue == queue]

    @property
    def spooled(self) -> list[SpoolEntry]:
        """
        The entries in the spool's active queue, in the order spooled.
        """
        return self._entries(ACTIVE)

    @property
    def quarantined(self) -> list[SpoolEntry]:
        """
        The entries in the spool's quarantine, in the order spooled.
        """
        return self._entries(QUARANTINE)


def run_transcript(
    callbacks: object,
    script: str,
    *,
    defaults: Defaults | None = None,
    spool: MemorySpool | None = None,
    clock: Clock | None = None,
    remote: str | IPv4Address | IPv6Address = REMOTE_ADDRESS,
    local: str | IPv4Address | IPv6Address = LOCAL_ADDRESS,
    exhaustive: bool = True,
    **options: Unpack[ServerOptions],
) -> TranscriptResult:
    """
    Run one whole session: connect the plugin to a new server (see
    L{ServerHarness} for the arguments), play C{script}, then disconnect if
    the script did not end with QUIT.

    @return: what the client saw and what was spooled or quarantined.
    @raise TranscriptMismatch: when the server did not say what the script
        expected.
    """
    harness = ServerHarness(
        callbacks,
        defaults=defaults,
        spool=spool,
        clock=clock,
        remote=remote,
        local=local,
        **options,
    )
    try:
        harness.play(script, exhaustive=exhaustive)
    finally:
        harness.disconnect()
    return harness.result()
