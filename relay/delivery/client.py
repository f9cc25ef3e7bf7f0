"""
The relay client: deliver one envelope to one next hop over SMTP.

L{RelayClient.send} takes a session with the hop from the idle pool or
opens one (EHLO or HELO, STARTTLS and AUTH as its L{ClientSettings} say),
runs the transaction and reports, per recipient, the reply that settled it.
A session whose transaction ended cleanly goes back to the pool for the
next envelope to that hop; L{RelayClient.close_idle} closes the pool.

The parts, one module each, all named C{relay.delivery.client_*}:
C{client_settings} (what the client is told), C{client_tls} (the TLS
decision), C{client_protocol} (the wire), C{client_session} (greeting to
AUTH), C{client_transaction} (MAIL to the end of data), C{client_body} (the
body's bytes), C{client_pool} (connections per hop), C{client_result}
(what an attempt comes to).  The TLS policy of each hop is chosen before
the session by L{relay.delivery.tlspolicy.TLSPolicies} (the policy file,
DANE, MTA-STS, the plugin's choice), from the route's L{Destination}; what
came of it goes back with the result (C{tls}).  Tests drive the client against relay's own
server in memory with L{relay.testing.ClientHarness}.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relay.delivery.client_body import RunInThread
from relay.delivery.client_pool import ConnectionPool
from relay.delivery.client_protocol import ConnectionClosed, ReplyTimeout, SMTPClientProtocol
from relay.delivery.client_result import DeliveryError, DeliveryResult
from relay.delivery.client_session import ClientSession
from relay.delivery.client_settings import ClientSettings, PoolLimits
from relay.delivery.client_tls import TLSPolicy
from relay.delivery.client_transaction import StaleSession, Transaction
from relay.delivery.nexthop import parse_hop
from relay.model.envelope import Envelope
from relay.model.reply import Reply, ReplyError

if TYPE_CHECKING:
    from relay.delivery.mx import DeadHosts
    from relay.delivery.nexthop import Destination
    from relay.delivery.tlspolicy import TLSPolicies

__all__ = [
    "ClientSettings",
    "DeliveryError",
    "DeliveryResult",
    "PoolLimits",
    "RelayClient",
    "TLSPolicy",
]

log = Logger()


class RelayClient:
    """
    Deliver envelopes to next hops over SMTP.

    @param reactor: an C{IReactorTCP} and C{IReactorTime}.
    @param settings: what the client is told.
    @param run_in_thread: C{f(callable, *args) -> Deferred} to read message
        files off the reactor thread; C{None} reads synchronously.
    @param policies: chooses the TLS policy of each hop (the policy file,
        DANE, MTA-STS); C{None}: C{settings.tls} for every hop.
    @param dead_hosts: where hosts that refused a connection or timed out
        are remembered (for the MX order), or C{None}.
    @param name_resolver: the C{IHostnameResolver} of hop names, or
        C{None} for the reactor's.
    """

    #: L{send} takes the route's L{Destination} (the scheduler asks).
    per_destination_tls = True

    def __init__(
        self,
        reactor: Any,
        settings: ClientSettings,
        *,
        run_in_thread: RunInThread | None = None,
        policies: TLSPolicies | None = None,
        dead_hosts: DeadHosts | None = None,
        name_resolver: Any = None,
    ) -> None:
        self.settings = settings
        self._run_in_thread = run_in_thread
        self._pool = ConnectionPool(reactor, settings, name_resolver)
        self._policies = policies
        self._dead = dead_hosts

    def send(
        self, hop: str, envelope: Envelope, destination: Destination | None = None
    ) -> Deferred[DeliveryResult]:
        """
        Deliver C{envelope} to C{hop} (C{host:port} or C{[v6]:port}).

        @param destination: what the hop's TLS policy depends on (the
            route's L{Destination}); C{None}: the default policy.
        @return: a Deferred firing with a L{DeliveryResult}, or failing with
            L{DeliveryError} when the hop could not take the message at all;
            either says what came of the TLS policy (C{tls}).
        """
        return Deferred.fromCoroutine(self._send(hop, envelope, destination))

    @property
    def tls_counts(self) -> Any:
        """
        How TLS went (L{relay.delivery.tlspolicy.TLSCounts}), or C{None}
        without per-destination policies.
        """
        return self._policies.counts if self._policies is not None else None

    def close_idle(self, timeout: float = 5.0) -> Deferred[None]:
        """
        QUIT and close every idle connection (for a graceful stop).

        @return: a Deferred firing once they are all closed; those still
            open after C{timeout} seconds are aborted.
        """
        return self._pool.close_idle(timeout)

    async def tls_policy(self, hop: str, destination: Destination | None = None) -> TLSPolicy:
        """
        The TLS policy for a session with C{hop}, for mail to
        C{destination}: the configured one, unless the policy file, DANE,
        MTA-STS or the plugin choose another
        (L{relay.delivery.tlspolicy.TLSPolicies}).

        @raise relay.delivery.tlspolicy.PolicyRefused: the policy keeps
            the message from this hop.
        """
        if self._policies is None:
            return self.settings.tls
        return await self._policies.choose(hop, destination)

    async def _send(
        self, hop: str, envelope: Envelope, destination: Destination | None = None
    ) -> DeliveryResult:
        from relay.delivery.tlspolicy import PolicyRefused

        try:
            host, port = parse_hop(hop)
        except ValueError as e:
            raise DeliveryError(str(e)) from None
        try:
            tls = await self.tls_policy(hop, destination)
        except PolicyRefused as e:
            error = DeliveryError(
                f"{hop}: TLS policy: {e}",
                Reply(454, f"4.7.5 TLS policy {e.outcome.policy} ({e.outcome.source}) for "
                           f"{host}: {e.outcome.result}: {e.outcome.detail}"),
            )  # fmt: skip
            error.tls = e.outcome
            raise error from None
        key = hop if tls is self.settings.tls else f"{hop} {tls.key}"
        session = self._pool.take(key)
        if session is not None:
            try:
                return await self._attempt(session.proto, hop, host, envelope, session, tls, key)
            except StaleSession as e:
                log.info(
                    "reused connection to {hop} unusable for {envelope_id} ({error}); reconnecting",
                    hop=hop, envelope_id=envelope.id, error=str(e),
                )
        try:
            proto = await self._pool.connect(hop, host, port)
        except DeliveryError as e:
            if self._dead is not None:
                self._dead.failed(host)
            e.tls = tls.outcome("no-connection") if self._policies is not None else None
            raise
        if self._dead is not None:
            self._dead.alive(host)
        return await self._attempt(proto, hop, host, envelope, None, tls, key)

    async def _attempt(
        self,
        proto: SMTPClientProtocol,
        hop: str,
        host: str,
        envelope: Envelope,
        session: ClientSession | None,
        tls: TLSPolicy,
        key: str,
    ) -> DeliveryResult:
        """
        One transaction on C{proto}: in C{session} when it comes from the
        pool, else in a session opened first.  Park the session afterwards
        when the transaction ended cleanly, else QUIT (or, after an error
        of the connection, just close).

        @raise StaleSession: a reused session was found closed (or said
            421) at MAIL FROM.
        """
        quit = True
        transaction: Transaction | None = None
        try:
            if session is None:
                session = ClientSession(proto, hop, host, key)
                try:
                    await session.open(self.settings, tls)
                finally:
                    self._count(session)
            keep = self._pool.limits_for(hop).max_idle_per_hop > 0
            transaction = Transaction(session, envelope, self._run_in_thread, keep)
            result = await transaction.run()
            if session.tls is not None:
                result = dataclasses.replace(result, tls=session.tls)
            return result
        except StaleSession:
            quit = False
            raise
        except (ReplyTimeout, ConnectionClosed, ReplyError) as e:
            # Like every outcome, logged by whoever settles the entry.
            quit = False
            error = DeliveryError(f"{hop}: {e}", address=proto.peer)
            error.tls = session.tls if session is not None else None
            raise error from e
        except DeliveryError as e:
            if e.address is None:
                e.address = proto.peer
            if e.tls is None and session is not None:
                e.tls = session.tls
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
            if transaction is not None and transaction.in_data:
                proto.abort()
            elif (
                transaction is not None
                and transaction.reusable
                and self._pool.park(transaction.session)
            ):
                pass  # idle in the pool, for the next envelope to the hop
            elif quit:
                proto.quit()
            else:
                proto.close()

    def _count(self, session: ClientSession) -> None:
        """
        Count what came of a new session's TLS policy, for the metrics.
        """
        if self._policies is not None and session.tls is not None:
            self._policies.counts.count(session.tls)
