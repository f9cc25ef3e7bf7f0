"""
Next hops: where the recipients of an envelope go.

An envelope with C{next_hop_choices} goes there, all recipients at once.
Otherwise its recipients are grouped by domain and each domain's mail
exchangers are looked up with C{twisted.names} (RFC 5321 section 5.1):
MX hosts by preference, the domain itself when it has no MX, nowhere when
it has a null MX (RFC 7505), the address itself for an address literal.
Hops are C{host:port} strings (L{parse_hop} splits them).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred

from relay.model.address import EmailAddress

SMTP_PORT = 25


@dataclass(frozen=True)
class Route:
    """
    Where a group of recipients goes.

    @ivar hops: C{host:port} strings to try in order.
    @ivar error: when the group cannot be routed, why, as reply text.
    @ivar permanent: whether C{error} is permanent (else: retry later).
    """

    recipients: tuple[EmailAddress, ...]
    hops: tuple[str, ...]
    error: str | None = None
    permanent: bool = False


def _hop(host: str, port: int = SMTP_PORT) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hop(hop: str) -> tuple[str, int]:
    """
    Split C{host:port} or C{[v6]:port} (also C{[IPv6:v6]:port}) into host
    and port, the port defaulting to 25: the inverse of the hops this
    module makes, and the form C{--smarthost} and C{next_hop_choices} take.

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
            host, port = hop, str(SMTP_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad hop {hop!r}")
    return host, int(port)


def address_literal(domain: str) -> str | None:
    """
    The IP address of an address literal domain (C{[192.0.2.1]},
    C{[IPv6:2001:db8::1]}), or C{None} if C{domain} is not one.
    """
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def hops_from_mx(answers: Sequence[Any], domain: str) -> tuple[str, ...] | None:
    """
    The hops for C{domain} from the answers of an MX query, by preference
    (ties keep the order of the answer).  C{()} for a null MX, C{None}
    when there is no MX record at all.
    """
    records = []
    for i, answer in enumerate(answers):
        payload = getattr(answer, "payload", None)
        if payload is None or not hasattr(payload, "preference"):
            continue
        name = str(payload.name).rstrip(".")
        records.append((payload.preference, i, name))
    if not records:
        return None
    records.sort()
    if any(name == "" for _, _, name in records):
        # RFC 7505: a null MX ("0 .") says the domain accepts no mail.
        return ()
    return tuple(_hop(name) for _, _, name in records)


def group_by_domain(
    recipients: Sequence[EmailAddress],
) -> list[tuple[str, tuple[EmailAddress, ...]]]:
    """
    Recipients grouped by (case-folded) domain, in order of first
    appearance.
    """
    groups: dict[str, list[EmailAddress]] = {}
    for r in recipients:
        groups.setdefault((r.domain or "").lower(), []).append(r)
    return [(d, tuple(rs)) for d, rs in groups.items()]


def resolve_domain(resolver: Any, domain: str) -> Deferred[tuple[tuple[str, ...], str | None, bool]]:
    """
    The hops for one domain: C{(hops, error, permanent)}.
    """
    if not domain:
        return defer.succeed(((), "5.1.2 recipient has no domain", True))
    literal = address_literal(domain)
    if literal is not None:
        return defer.succeed(((_hop(literal),), None, False))
    if domain.startswith("["):
        return defer.succeed(((), f"5.1.2 bad address literal {domain}", True))

    def found(result: Any) -> tuple[tuple[str, ...], str | None, bool]:
        answers = result[0] if isinstance(result, tuple) else result
        hops = hops_from_mx(answers, domain)
        if hops is None:
            return ((_hop(domain),), None, False)
        if not hops:
            return ((), f"5.1.10 domain {domain} accepts no mail (null MX)", True)
        return (hops, None, False)

    def failed(failure: Any) -> tuple[tuple[str, ...], str | None, bool]:
        # Here, not at the top: a relay with a smarthost needs no twisted.names.
        from twisted.names import error as dns_error

        if failure.check(dns_error.DNSNameError, dns_error.AuthoritativeDomainError):
            return ((), f"5.1.2 domain {domain} not found", True)
        return ((), f"4.4.3 lookup of {domain} failed: {failure.getErrorMessage()}", False)

    d = defer.maybeDeferred(resolver.lookupMailExchange, domain)
    d.addCallbacks(found, failed)
    return d


def route_recipients(
    recipients: Sequence[EmailAddress],
    next_hop_choices: Sequence[str],
    resolver: Any,
) -> Deferred[list[Route]]:
    """
    The routes of C{recipients}: one for all of them when
    C{next_hop_choices} is given, else one per recipient domain.
    """
    if next_hop_choices:
        return defer.succeed([Route(tuple(recipients), tuple(next_hop_choices))])
    groups = group_by_domain(recipients)
    ds = [resolve_domain(resolver, domain) for domain, _ in groups]

    def combine(results: list[tuple[tuple[str, ...], str | None, bool]]) -> list[Route]:
        return [
            Route(rs, hops, error, permanent)
            for (_, rs), (hops, error, permanent) in zip(groups, results, strict=True)
        ]

    return defer.gatherResults(ds, consumeErrors=True).addCallback(combine)


def make_router(
    resolver_factory: Callable[[], Any], smarthost: str | None = None
) -> Callable[..., Deferred[list[Route]]]:
    """
    A next-hop function: an entry's own next hops (a plugin chose them),
    else the default route as configured now: C{smarthost}, else the MX of
    each recipient domain.  Applied at each attempt, so that queued mail
    follows a routing fix (a corrected C{--smarthost}) after a restart.
    The resolver is built on first use (so that none is made, nor a
    resolv.conf watch scheduled, until mail needs DNS).
    """
    resolver: list[Any] = []
    default = (smarthost,) if smarthost else ()

    def route(recipients: Sequence[EmailAddress], next_hop_choices: Sequence[str]) -> Deferred[list[Route]]:
        hops = tuple(next_hop_choices) or default
        if hops:
            return route_recipients(recipients, hops, None)
        if not resolver:
            resolver.append(resolver_factory())
        return route_recipients(recipients, next_hop_choices, resolver[0])

    return route
