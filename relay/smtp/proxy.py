"""
The PROXY protocol (v1 and v2, as HAProxy sends it) in front of the SMTP
server, for listeners given as C{haproxy:<endpoint>}.

Twisted's own wrapper connects the wrapped protocol as soon as the TCP
connection is made, before the header has arrived: the SMTP session, which
takes its addresses when it is connected, would see the proxy's address and
send its greeting before knowing who the client is.  L{ProxyHeaderWrapper}
connects the SMTP protocol only once the header is parsed (like Postfix's
C{smtpd_upstream_proxy_protocol}), so the session, the plugin's
C{session_connect} and the C{Received} header all see the proxied client.
A malformed header, or none within L{HEADER_TIMEOUT} seconds, closes the
connection before the SMTP protocol ever sees it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

# Twisted's PROXY-protocol parsers and wrapper are private (see relay.app._compat).
from relay.app._compat import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
    InvalidProxyHeader,
    ProxyInfo,
    V1Parser,
    V2Parser,
)

PREFIX = "haproxy:"
HEADER_TIMEOUT = 5.0  # Postfix's smtpd_upstream_proxy_timeout
MAX_HEADER = 536  # a v1 header is at most 107 bytes; v2 with TLVs stays small

_log = Logger(namespace="relay.smtp.proxy")


class ProxyHeaderWrapper(HAProxyProtocolWrapper):
    """
    Read a PROXY header, then connect the wrapped protocol with
    C{getPeer()}/C{getHost()} answering the proxied addresses.
    """

    _connected_wrapped = False
    _buffer = b""
    _seen = 0  # header bytes so far
    _timeout: Any = None
    _proxyInfo: ProxyInfo | None

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection, except that the wrapped protocol
        # waits for the header.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timeout = self.factory.clock.callLater(
            self.factory.header_timeout, self._no_header
        )

    def _no_header(self) -> None:
        self._timeout = None
        transport: Any = self.transport
        _log.info("PROXY header not received in time from {peer}", peer=transport.getPeer())
        transport.abortConnection()

    def _refuse(self, why: str) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        transport: Any = self.transport
        _log.info("bad PROXY header from {peer}: {why}", peer=transport.getPeer(), why=why)
        transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._connected_wrapped:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            head = self._buffer = self._buffer + data
            if head[:5] == V1Parser.PROXYSTR:
                self._parser = V1Parser()
            elif len(head) >= 13 and head[:12] == V2Parser.PREFIX and head[12] & 0xF0 == 0x20:
                self._parser = V2Parser()
            elif V1Parser.PROXYSTR.startswith(head[:5]) or V2Parser.PREFIX.startswith(head[:12]):
                if len(head) < 13:
                    return  # too short to tell yet
                self._refuse("unknown version")
                return
            else:
                self._refuse("not a PROXY header")
                return
            data, self._buffer = head, b""
        self._seen += len(data)
        try:
            info, remaining = self._parser.feed(data)
        except (InvalidProxyHeader, ValueError) as e:
            self._refuse(repr(e))
            return
        if info is None:
            if self._seen > MAX_HEADER:
                self._refuse("header too long")
            return
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        self._proxyInfo = info
        self._connected_wrapped = True
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None
        if self._connected_wrapped:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)
            self.wrappedProtocol = None  # type: ignore[assignment]


class ProxyHeaderWrappingFactory(HAProxyWrappingFactory):
    """
    Wrap C{wrappedFactory}'s protocols in L{ProxyHeaderWrapper}; time comes
    from C{clock} (by default the wrapped factory's C{clock}).
    """

    protocol = ProxyHeaderWrapper  # type: ignore[assignment]

    def __init__(
        self,
        wrappedFactory: Any,
        clock: IReactorTime | None = None,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        super().__init__(wrappedFactory)
        if clock is None:
            clock = getattr(wrappedFactory, "clock", None)
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        self.clock = clock
        self.header_timeout = header_timeout


@implementer(IStreamServerEndpoint)
class ProxyServerEndpoint:
    """
    Listen on C{endpoint}, each connection starting with a PROXY header.
    """

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self.endpoint = endpoint

    def listen(self, protocolFactory: Any) -> Any:
        return self.endpoint.listen(ProxyHeaderWrappingFactory(protocolFactory))


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    The server endpoint for C{description}: C{haproxy:<endpoint>} with
    L{ProxyHeaderWrappingFactory} rather than Twisted's wrapper, anything
    else as L{serverFromString} reads it.
    """
    if description[: len(PREFIX)].lower() == PREFIX:
        return ProxyServerEndpoint(serverFromString(reactor, description[len(PREFIX) :]))
    return serverFromString(reactor, description)
