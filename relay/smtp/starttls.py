"""
TLS in an SMTP session: the STARTTLS command (RFC 3207), the sessions that
are TLS from the start (an C{ssl:} or C{implicit-tls:} listener), and the
negotiated version and cipher the plugin sees in L{Session.tls}.

The TLS layer itself is Twisted's (C{transport.startTLS}, or a
L{twisted.protocols.tls.TLSMemoryBIOProtocol} around the session); the
certificate is L{relay.smtp.tls}'s.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import INegotiated, ISSLTransport

from relay.model.reply import Reply
from relay.model.session import TLSInfo

if TYPE_CHECKING:
    from relay.smtp.protocol import SMTPServerProtocol

_UNKNOWN = TLSInfo(version="TLS", cipher="unknown")


def is_tls(transport: Any) -> bool:
    """
    Is C{transport} TLS already?  Twisted's C{ssl:} transports provide
    L{ISSLTransport}; a L{twisted.protocols.tls.TLSMemoryBIOProtocol} over
    any transport (C{implicit-tls:}, or another TLS endpoint), only
    L{INegotiated}.
    """
    return ISSLTransport.providedBy(transport) or INegotiated.providedBy(transport)


class TLSState(Enum):
    """
    The TLS state of a session::

        NONE --STARTTLS: 220--> HANDSHAKE --handshake done, or data--> ACTIVE
        (TLS from the start) HANDSHAKE --handshake done, or data--> ACTIVE
    """

    #: Plain text.
    NONE = "none"
    #: TLS started, its handshake not done yet: the client cannot be sent
    #: a reply, and a clean close would wait for the handshake.
    HANDSHAKE = "handshake"
    #: Encrypted; the negotiated parameters are in the session (when the
    #: transport tells them).
    ACTIVE = "active"


_NONE = TLSState.NONE
_HANDSHAKE = TLSState.HANDSHAKE
_ACTIVE = TLSState.ACTIVE


class StartTLS:
    """
    The TLS state of one session and the STARTTLS command.

    @ivar state: the L{TLSState}.
    """

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol
        self.state = _NONE

    @property
    def active(self) -> bool:
        """
        Whether the session is (or is becoming) encrypted: STARTTLS is no
        longer offered, and AUTH may be.
        """
        return self.state is not _NONE

    @property
    def handshaking(self) -> bool:
        """
        Whether TLS started and its handshake is not done.
        """
        return self.state is _HANDSHAKE

    def connection_made(self) -> None:
        """
        The session began: on a TLS transport it is encrypted from the
        start, as after STARTTLS.
        """
        protocol = self._protocol
        if is_tls(protocol.transport):
            self.state = _HANDSHAKE
            protocol.update_session(tls=_UNKNOWN)

    def handshake_completed(self) -> None:
        """
        The handshake is done (the transport said so, or data came through
        it): the negotiated version and cipher are known.
        """
        self.state = _ACTIVE
        try:
            conn = self._protocol.transport.getHandle()
            cipher = conn.get_cipher_name()
            version = conn.get_protocol_version_name()
            bits = conn.get_cipher_bits()
        except Exception:
            return
        if cipher:
            self._protocol.update_session(
                tls=TLSInfo(version=str(version), cipher=str(cipher), bits=bits)
            )

    def smtp_STARTTLS(self, arg: str) -> None:
        protocol = self._protocol
        context = protocol.settings.tls_context_factory
        if self.state is not _NONE:
            protocol.reply(Reply.bad_sequence("5.5.1 TLS already active"))
            return
        if context is None:
            protocol.reply(Reply(454, "4.7.0 TLS not available"))
            return
        if arg:
            protocol.reply(Reply.parameter_error("5.5.4 Syntax: STARTTLS"))
            return
        if protocol.mail.transaction is not None:
            protocol.reply(
                Reply.bad_sequence("5.5.1 STARTTLS not allowed during a mail transaction")
            )
            return
        protocol.reply(Reply(220, "2.0.0 Ready to start TLS"))
        # RFC 3207 section 4.2: nothing sent before the handshake counts.
        protocol.discard_input()
        try:
            protocol.transport.startTLS(context)
        except Exception:
            protocol.log.failure("startTLS failed")
            protocol.close(Reply(454, "4.7.0 TLS not available due to temporary reason"))
            return
        self.state = _HANDSHAKE
        protocol.mail.reset()
        # RFC 3207 section 4.2: the client starts over, with EHLO.
        protocol.update_session(
            helo=None,
            esmtp=False,
            authenticated=None,
            advertised_extensions=(),
            tls=_UNKNOWN,
        )
