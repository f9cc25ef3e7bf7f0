"""
Next hops: where the recipients of an envelope go.

An envelope with C{next_hop_choices} goes there, all recipients at once.
Otherwise its recipients are grouped by domain and each domain's mail
exchangers are looked up (L{relay.delivery.dns}) and ordered by the rules
of RFC 5321 section 5.1 (L{relay.delivery.mx}): MX hosts by preference,
equal ones shuffled, those lately dead skipped while others remain, none
at or after the relay's own place in the list; the domain itself when it
has no MX, nowhere when it has a null MX (RFC 7505), the address itself
for an address literal.  Hops are C{host:port} strings (L{parse_hop}
splits them); each route says what its hops' TLS policy depends on
(L{Destination}).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred

from relay.delivery.mx import DeadHosts, MXHost, Myself, below_myself, mx_hosts, order_hosts
from relay.model.address import EmailAddress

if TYPE_CHECKING:
    from relay.delivery.dns import DNSLookup

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
    destination: Destination | None = None


@dataclass(frozen=True)
class Destination:
    """
    What the TLS policy of a route's hops depends on
    (L{relay.delivery.tlspolicy}).

    @ivar domain: the recipient domain, for a route by its MX; C{None}
        for next hops given (a smarthost, the plugin's choices).
    @ivar mx_authenticated: the MX answer was DNSSEC-validated (by a
        resolver declared with C{--dnssec}): DANE may apply (RFC 7672
        section 2.2).
    @ivar chosen: the policy the plugin chose for the envelope, if it did
        (C{EnvelopeWithNextHop.tls_policy}).
    """

    domain: str | None
    mx_authenticated: bool = False
    chosen: str | None = None

    @property
    def via_mx(self) -> bool:
        return self.domain is not None


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


def parse_server(text: str) -> tuple[str, int]:
    """
    C{HOST[:PORT]} of a C{--resolver} (an IP address; IPv6 in brackets
    with a port: C{[::1]:53}), the port defaulting to 53.

    @raise ValueError: if C{text} is not an IP address with an optional
        port.
    """
    text = text.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]")
        port = port[1:] if port.startswith(":") else (port or "53")
        if not sep:
            raise ValueError(f"bad resolver {text!r}")
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(
            f"a resolver is an IP address with an optional port, not {text!r}"
        ) from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in resolver {text!r}")
    return address, int(port)


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


async def resolve_domain(
    lookup: DNSLookup, domain: str, rules: MXRules | None = None
) -> tuple[tuple[str, ...], str | None, bool, Destination]:
    """
    The hops for one domain: C{(hops, error, permanent, destination)}.
    """
    rules = rules if rules is not None else MXRules()
    nowhere = Destination(domain)
    if not domain:
        return ((), "5.1.2 recipient has no domain", True, nowhere)
    literal = address_literal(domain)
    if literal is not None:
        return ((_hop(literal, rules.port),), None, False, Destination(None))
    if domain.startswith("["):
        return ((), f"5.1.2 bad address literal {domain}", True, nowhere)
    # Here, not at the top: a relay with a smarthost needs no twisted.names.
    from twisted.names import dns
    from twisted.names.error import AuthoritativeDomainError, DNSNameError

    try:
        answer = await lookup.lookup(domain, dns.MX)
    except (DNSNameError, AuthoritativeDomainError):
        return ((), f"5.1.2 domain {domain} not found", True, nowhere)
    except Exception as e:
        return ((), f"4.4.3 lookup of {domain} failed: {e}", False, nowhere)
    hosts = mx_hosts(answer.records)
    if hosts is None:
        # RFC 5321 section 5.1: no MX, the domain is its own exchanger.
        hosts = (MXHost(0, domain.lower()),)
    elif not hosts:
        return ((), f"5.1.10 domain {domain} accepts no mail (null MX)", True, nowhere)
    ordered = order_hosts(hosts, rules.rng)
    mine = {host.name for host in ordered if await rules.is_me(lookup, host.name)}
    kept = below_myself(ordered, mine)
    if kept is None:
        return ((), f"5.4.6 mail for {domain} loops back to myself", True, nowhere)
    if rules.dead is not None:
        kept = rules.dead.skip(kept)
    hops = tuple(_hop(host.name, rules.port) for host in kept)
    return (hops, None, False, Destination(domain, answer.authenticated))


@dataclass
class MXRules:
    """
    How MX answers become hops (L{relay.delivery.mx}).

    @ivar rng: shuffles hosts of equal preference.
    @ivar dead: hosts lately refused or timed out, skipped while others
        remain; C{None}: none are remembered.
    @ivar myself: how the relay knows itself among the hosts.
    @ivar port: the port of MX hosts (C{--mx-port}, 25).
    """

    rng: random.Random = field(default_factory=random.SystemRandom)
    dead: DeadHosts | None = None
    myself: Myself = Myself()
    port: int = SMTP_PORT

    async def is_me(self, lookup: DNSLookup, name: str) -> bool:
        """
        Is the MX host C{name} this relay?  Its addresses are looked up
        only when the relay listens on the MX port (else no address of
        it can be the relay's).
        """
        if self.myself.is_me(name):
            return True
        if not any(port == self.port for _, port in self.myself.listeners):
            return False
        from relay.delivery.dns import addresses

        return self.myself.is_me(name, await addresses(lookup, name), self.port)


def route_recipients(
    recipients: Sequence[EmailAddress],
    next_hop_choices: Sequence[str],
    lookup: DNSLookup | None,
    rules: MXRules | None = None,
) -> Deferred[list[Route]]:
    """
    The routes of C{recipients}: one for all of them when
    C{next_hop_choices} is given, else one per recipient domain.
    """
    if next_hop_choices:
        return defer.succeed(
            [Route(tuple(recipients), tuple(next_hop_choices), destination=Destination(None))]
        )
    assert lookup is not None
    groups = group_by_domain(recipients)
    ds = [Deferred.fromCoroutine(resolve_domain(lookup, domain, rules)) for domain, _ in groups]

    def combine(results: list[tuple[tuple[str, ...], str | None, bool, Destination]]) -> list[Route]:
        return [
            Route(rs, hops, error, permanent, destination)
            for (_, rs), (hops, error, permanent, destination) in zip(groups, results, strict=True)
        ]

    return defer.gatherResults(ds, consumeErrors=True).addCallback(combine)


def make_router(
    lookup: DNSLookup | Callable[[], Any],
    smarthost: str | None = None,
    rules: MXRules | None = None,
) -> Callable[..., Deferred[list[Route]]]:
    """
    A next-hop function: an entry's own next hops (a plugin chose them),
    else the default route as configured now: C{smarthost}, else the MX of
    each recipient domain.  Applied at each attempt, so that queued mail
    follows a routing fix (a corrected C{--smarthost}) after a restart.
    Mail to next hops asks nothing of DNS here (L{ResolverLookup} makes
    the system's resolver on first use: none is made, nor a resolv.conf
    watch scheduled, until mail needs DNS).

    @param lookup: a L{DNSLookup}, or a function making a twisted.names
        C{IResolver} (called on first use).
    """
    default = (smarthost,) if smarthost else ()
    if not hasattr(lookup, "lookup"):
        from relay.delivery.dns import ResolverLookup

        lookup = ResolverLookup(resolver_factory=lookup)

    def route(recipients: Sequence[EmailAddress], next_hop_choices: Sequence[str]) -> Deferred[list[Route]]:
        hops = tuple(next_hop_choices) or default
        if hops:
            return route_recipients(recipients, hops, None)
        return route_recipients(recipients, next_hop_choices, lookup, rules)

    return route
