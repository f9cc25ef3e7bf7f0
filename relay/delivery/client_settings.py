"""
The relay client's settings: one frozen L{ClientSettings} built once from
the options (L{relay.service}) and read by every part of the client that
needs it, as async_smtp's C{Client_config}, instead of keyword arguments
passed along from part to part.

Each part reads its own record: the session its host name, TLS policy and
credentials, the wire its reply timeout, the pool its L{PoolLimits}.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.delivery.client_tls import TLSPolicy


@dataclass(frozen=True)
class PoolLimits:
    """
    How the client keeps connections to a hop for later envelopes.

    Per-destination traffic shaping (connection limits, messages per
    connection) is a L{PoolLimits} per hop; today one serves them all.

    @ivar max_idle_per_hop: how many connections per hop are kept idle
        after a transaction that ended cleanly, for the next envelope to
        that hop (C{0}: QUIT after every envelope).  The default matches
        the delivery scheduler's per-destination cap: a smaller pool closes
        connections that the next deliveries reopen at once.
    @ivar idle_timeout: seconds an idle connection is kept before QUIT.
    @ivar max_reuse: transactions per connection, after which it is QUIT.
    """

    max_idle_per_hop: int = 20
    idle_timeout: float = 5.0
    max_reuse: int = 100

    def __post_init__(self) -> None:
        if self.max_idle_per_hop < 0 or self.idle_timeout < 0 or self.max_reuse < 1:
            raise ValueError(f"bad pool limits: {self}")


@dataclass(frozen=True)
class ClientSettings:
    """
    Everything the relay client is told, as one value.

    @ivar hostname: the name given in EHLO/HELO.
    @ivar tls: what TLS to ask of hops.
    @ivar auth: C{(username, password)} for AUTH PLAIN/LOGIN, sent only
        over TLS.
    @ivar connect_timeout: seconds a connection attempt may take.
    @ivar reply_timeout: seconds the hop may take for each reply (and to
        read the body while it holds the client back).
    @ivar pool: how connections are kept for reuse.
    @ivar bind_address: the local address connections are made from
        (C{--bind-address}), unless the destination's shaping names its
        own source; C{None}: the system chooses.
    """

    hostname: str
    tls: TLSPolicy = TLSPolicy()
    auth: tuple[str, str] | None = None
    connect_timeout: float = 30.0
    reply_timeout: float = 300.0
    pool: PoolLimits = PoolLimits()
    bind_address: str | None = None
