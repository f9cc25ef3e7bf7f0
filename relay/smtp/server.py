"""
The ESMTP server: L{SMTPServerFactory}, with its L{ServerSettings}.

The factory is what a listener serves: it makes one
L{relay.smtp.protocol.SMTPServerProtocol} per connection, all sharing one
plugin (an L{IServerCallbacks} provider), one L{ISpool}, one injected
C{IReactorTime} and one frozen L{ServerSettings}, and it counts the open
sessions for C{--max-sessions} and the metrics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import protocol
from twisted.internet.interfaces import IReactorTime

from relay.interfaces import IServerCallbacks
from relay.smtp.protocol import SMTPServerProtocol


@dataclass(frozen=True)
class ServerSettings:
    """
    The settings of an SMTP server, built once from the options (by
    L{relay.service.makeService}, or in a receiver process from what the
    master sent it) and read by every session.

    @ivar hostname: the name in the EHLO reply, the C{Received} header and
        the 421 replies.
    @ivar max_message_size: the SIZE advertised and enforced, in bytes.
    @ivar max_recipients: RCPT commands accepted per message; past it, 452.
    @ivar max_sessions: open sessions; past it a new one gets 421.
    @ivar idle_timeout: seconds the client may stay silent.
    @ivar command_deadline: seconds one command line (or one message's
        data) may take, however slowly the client trickles it.
    @ivar tls_context_factory: what C{transport.startTLS} takes for
        STARTTLS (a L{relay.smtp.tls.ServerTLSContext}, which SIGHUP
        reloads in place); C{None}: STARTTLS is not offered.
    @ivar auth_requires_tls: AUTH is offered only once the session is
        encrypted.
    @ivar reject_bare_lf: refuse a message whose data holds a bare LF
        (instead of normalizing it to CRLF).
    @ivar auth_failures_before_delay: failed AUTH attempts, per session,
        answered at once; later ones wait L{auth_failure_delay} seconds
        (input waits meanwhile).
    @ivar auth_failure_delay: that delay, in seconds.
    @ivar auth_max_failures: the failed attempt that closes the session
        with 421.
    @ivar chunking: CHUNKING (BDAT, RFC 3030) is offered and accepted;
        without it BDAT is an unknown command, as for a server that
        predates it.
    @ivar dkim_signer: what signs accepted messages before they are
        spooled (a L{relay.dkim.signer.DkimSigner}, which SIGHUP reloads in
        place); C{None}: nothing is signed.
    """

    hostname: str = "localhost"
    max_message_size: int = 35_000_000
    max_recipients: int = 1000
    max_sessions: int = 1000
    idle_timeout: float = 300.0
    command_deadline: float = 600.0
    tls_context_factory: Any = None
    auth_requires_tls: bool = True
    reject_bare_lf: bool = False
    auth_failures_before_delay: int = 2
    auth_failure_delay: float = 2.0
    auth_max_failures: int = 5
    chunking: bool = True
    dkim_signer: Any = None


class SMTPServerFactory(protocol.Factory):
    """
    Makes L{SMTPServerProtocol}s sharing one plugin, spool, clock and
    L{ServerSettings}.

    @ivar callbacks: the plugin.
    @ivar spool: where accepted mail goes.
    @ivar clock: the time of every timer of every session.
    @ivar settings: the server's settings.
    @ivar sessions: the number of open sessions (the protocol counts them).
    @ivar on_rejected: called (with no arguments) when C{process_envelope}
        rejects a message, for the metrics; C{None}: nobody counts.
    """

    def __init__(
        self,
        callbacks: IServerCallbacks,
        spool: Any,
        clock: IReactorTime,
        settings: ServerSettings | None = None,
        **changes: Any,
    ) -> None:
        """
        @param spool: an L{ISpool} provider (or a wrapper of one that
            delegates to it).
        @param settings: the settings (the defaults of L{ServerSettings}
            when C{None}).
        @param changes: fields of L{ServerSettings} that replace those of
            C{settings}: C{SMTPServerFactory(plugin, spool, clock,
            hostname="mx.example")}, as tests write it.
        @raise TypeError: for a keyword that is not a field of
            L{ServerSettings}.
        """
        base = settings if settings is not None else ServerSettings()
        self.callbacks = callbacks
        self.spool = spool
        self.clock = clock
        self.settings = dataclasses.replace(base, **changes) if changes else base
        self._sessions = 0
        self.on_rejected: Callable[[], object] | None = None
        #: Called with the number of open sessions whenever it changes (a
        #: receiver process stops accepting at its share, see
        #: L{relay.app.receiver.AcceptGate}); C{None}: nobody watches.
        self.on_sessions: Callable[[int], object] | None = None
        #: Set by L{drain}: no new mail transaction starts.
        self.draining = False
        #: The open sessions, for L{drain}.
        self.protocols: set[SMTPServerProtocol] = set()

    @property
    def sessions(self) -> int:
        return self._sessions

    @sessions.setter
    def sessions(self, n: int) -> None:
        self._sessions = n
        if self.on_sessions is not None:
            self.on_sessions(n)

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:  # type: ignore[override]
        return SMTPServerProtocol(self)

    def drain(self) -> None:
        """
        Take no new mail transactions: each session ends with 421 as soon
        as it is between transactions (now, if it is); one under way (its
        data, its commit) finishes and gets its reply first.  A stopping
        receiver drains, so that it is soon gone: until then the spool
        stays locked (L{relay.spool.lock}), and a new relay waits for it.
        """
        self.draining = True
        for proto in list(self.protocols):
            proto.end_if_draining()
