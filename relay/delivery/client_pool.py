"""
Where the relay client's connections come from: new ones to a hop, and
those kept idle per hop after a transaction that ended cleanly, reused with
their EHLO/STARTTLS/AUTH state for the next envelope to that hop.

The pool applies each hop's L{PoolLimits} (L{ConnectionPool.limits_for});
per-destination traffic shaping (connection limits, messages per
connection, the source address of new connections) belongs here too.
"""

from __future__ import annotations

import ipaddress
from typing import Any, cast

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

from relay.delivery.client_protocol import SMTPClientFactory, SMTPClientProtocol
from relay.delivery.client_result import DeliveryError
from relay.delivery.client_session import ClientSession
from relay.delivery.client_settings import ClientSettings, PoolLimits
from relay.delivery.dns import ResolvingReactor


class ConnectionPool:
    """
    New connections to hops, and idle sessions per hop.

    @param reactor: an C{IReactorTCP} and C{IReactorTime}.
    @param settings: the client's settings (timeouts, L{PoolLimits}).
    @param name_resolver: the C{IHostnameResolver} of host names (the
        C{--resolver} servers, L{relay.delivery.dns.NamesHostnameResolver});
        C{None}: the reactor's (the system's C{getaddrinfo}).
    """

    def __init__(self, reactor: Any, settings: ClientSettings, name_resolver: Any = None) -> None:
        self._reactor = reactor
        self._resolving = (
            ResolvingReactor(reactor, name_resolver) if name_resolver is not None else reactor
        )
        self._settings = settings
        # hop -> idle sessions (most recently parked last), each with its
        # idle timer.
        self._idle: dict[str, list[tuple[ClientSession, Any]]] = {}

    def limits_for(self, hop: str) -> PoolLimits:
        """
        The limits that apply to connections to C{hop}.
        """
        return self._settings.pool

    # New connections

    def _endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        timeout = self._settings.connect_timeout
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(self._resolving, host, port, timeout=timeout)
        if ip.version == 4:
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=timeout)
        return TCP6ClientEndpoint(self._reactor, host, port, timeout=timeout)

    async def connect(self, hop: str, host: str, port: int) -> SMTPClientProtocol:
        """
        A new connection to C{host} at C{port} (the hop C{hop}).

        @raise DeliveryError: the connection could not be made.
        """
        factory = SMTPClientFactory(self._reactor, self._settings.reply_timeout)
        try:
            proto = await self._endpoint(host, port).connect(factory)
        except Exception as e:
            # Logged by whoever settles the entry, as the attempt's outcome.
            raise DeliveryError(f"connect to {hop} failed: {e}") from e
        return cast(SMTPClientProtocol, proto)

    # Idle sessions

    def take(self, hop: str) -> ClientSession | None:
        """
        An idle session with C{hop} still fit for use, taken out of the
        pool, or C{None}.

        @param hop: the hop, or the L{ClientSession.pool_key} of sessions
            opened under a TLS policy of their own.
        """
        pool = self._idle.get(hop)
        while pool:
            session, timer = pool.pop()
            if timer.active():
                timer.cancel()
            session.proto.on_lost = None
            if session.proto.clean:
                if not pool:
                    del self._idle[hop]
                return session
            # Something arrived while idle (such as a 421): not reusable.
            session.proto.quit()
        self._idle.pop(hop, None)
        return None

    def park(self, session: ClientSession) -> bool:
        """
        Keep C{session} idle for the next envelope to its hop, if its
        connection may be reused and the pool has room.
        """
        hop = session.pool_key
        limits = self.limits_for(session.hop)
        if (
            not session.proto.clean
            or session.transactions >= limits.max_reuse
            or len(self._idle.get(hop, ())) >= limits.max_idle_per_hop
        ):
            return False
        pool = self._idle.setdefault(hop, [])
        timer = self._reactor.callLater(limits.idle_timeout, self._expire, session)
        entry = (session, timer)
        pool.append(entry)

        def lost() -> None:
            # Closed by the hop while idle: drop it.
            self._forget(hop, entry)

        session.proto.on_lost = lost
        return True

    def _forget(self, hop: str, entry: tuple[ClientSession, Any]) -> None:
        pool = self._idle.get(hop)
        if pool is not None and entry in pool:
            pool.remove(entry)
            if not pool:
                del self._idle[hop]
        if entry[1].active():
            entry[1].cancel()

    def _expire(self, session: ClientSession) -> None:
        for entry in list(self._idle.get(session.pool_key, ())):
            if entry[0] is session:
                self._forget(session.pool_key, entry)
        session.proto.on_lost = None
        session.proto.quit()

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
                entry[0].proto.on_lost = None
                protos.append(entry[0].proto)
        if not protos:
            return succeed(None)
        for proto in protos:
            proto.quit()
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
