"""
DNS for delivery: lookups that say whether the answer was validated.

Routing, DANE and MTA-STS ask one thing of DNS, L{DNSLookup.lookup}: the
records of one type at one name, and whether the resolver vouched for them
with the AD bit (RFC 4035 section 3.2.3).  The AD bit means something only
when the operator said that the resolver validates (C{--resolver} with
C{--dnssec}, as Postfix's C{smtp_dns_support_level = dnssec}); from any other
resolver it is ignored (RFC 6698 section 4.1: the path to the resolver must
be trusted too).

Two lookups provide it:

 - L{ResolverLookup}: the system's resolver (C{twisted.names.client.createResolver},
   C{/etc/resolv.conf} and C{/etc/hosts}, with its cache), never
   authenticated.  It is the default, as before.
 - L{DNSClient}: the resolvers named by C{--resolver}, asked over UDP (then
   TCP when the answer is truncated) with the AD bit set in the query (RFC
   6840 section 5.7: a validating resolver sets AD in its answer only when
   asked so), with a cache that honours the records' TTL.  twisted.names'
   own client returns records without the header, where the AD bit is;
   this one is built on its public message and protocol classes.

L{NamesHostnameResolver} makes a L{DNSClient} the name resolver of the relay
client's connections, so that with C{--resolver} the addresses of next hops
come from there too, not from the system's C{getaddrinfo}.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

log = Logger()

#: RFC 6698: the TLSA record type (twisted.names has no class for it: its
#: records arrive as L{dns.UnknownRecord} with the raw RDATA).
TLSA = 52

#: Seconds one server gets to answer before the next is asked.
QUERY_TIMEOUT = 5.0

#: Seconds an answer is cached at most, whatever its TTL; and a negative
#: answer (no such name, no such records) when the server gave no SOA.
MAX_TTL = 3600
NEGATIVE_TTL = 300

#: Answers kept in the cache at most (the oldest go first).
CACHE_SIZE = 10_000


class DNSLookupError(Exception):
    """
    The lookup failed for now (the servers failed, refused or did not
    answer): try again later.  For a validating resolver, a SERVFAIL is
    also what an answer that failed validation looks like (RFC 4035
    section 5.5).
    """


@dataclass(frozen=True)
class DNSAnswer:
    """
    The records of one type at one name.

    @ivar records: the payloads (C{dns.Record_MX}, C{dns.Record_A}, ...,
        C{dns.UnknownRecord} for TLSA), in the order of the answer; empty
        when the name has none of that type.
    @ivar authenticated: a trusted resolver said the answer is validated
        (the AD bit, from a resolver declared with C{--dnssec}).
    @ivar ttl: seconds the answer may be kept.
    """

    records: tuple[Any, ...]
    authenticated: bool = False
    ttl: int = NEGATIVE_TTL


class DNSLookup(Protocol):
    """
    What delivery asks of DNS.
    """

    def lookup(self, name: str, rrtype: int) -> Deferred[DNSAnswer]:
        """
        The C{rrtype} records at C{name}.

        @return: a Deferred failing with L{DNSNameError} when the name does
            not exist, L{DNSLookupError} when the lookup failed for now.
        """


def _records(answers: Sequence[Any], rrtype: int) -> tuple[Any, ...]:
    # A recursive resolver gives the CNAME chain and what it ends in: the
    # records of the type asked for are the answer, whatever name they
    # carry.
    return tuple(rr.payload for rr in answers if rr.type == rrtype)


def _ttl(answers: Sequence[Any], authority: Sequence[Any]) -> int:
    ttls = [rr.ttl for rr in answers]
    if not ttls:
        # RFC 2308: a negative answer lives as long as the SOA says.
        ttls = [min(rr.ttl, rr.payload.minimum) for rr in authority if rr.type == dns.SOA]
    return max(0, min(ttls + [MAX_TTL])) if ttls else NEGATIVE_TTL


#: The C{IResolver} method of each record type (those it has one for).
_METHODS = {
    dns.MX: "lookupMailExchange",
    dns.TXT: "lookupText",
    dns.A: "lookupAddress",
    dns.AAAA: "lookupIPV6Address",
}


class ResolverLookup:
    """
    L{DNSLookup} over a twisted.names C{IResolver} (the system's): never
    authenticated, since nobody declared that resolver validating.

    @param resolver: an C{IResolver}; made on first use by
        C{resolver_factory} when that is given instead (a relay that routes
        everything to a smarthost never makes one).
    """

    def __init__(self, resolver: Any = None, resolver_factory: Any = None) -> None:
        self._resolver = resolver
        self._factory = resolver_factory

    def lookup(self, name: str, rrtype: int) -> Deferred[DNSAnswer]:
        if self._resolver is None:
            self._resolver = self._factory()
        method = _METHODS.get(rrtype)
        if method is not None:
            d: Deferred[Any] = defer.maybeDeferred(getattr(self._resolver, method), name)
        else:
            d = defer.maybeDeferred(self._resolver.query, dns.Query(name, rrtype, dns.IN))

        def found(result: Any) -> DNSAnswer:
            answers, authority, _ = result
            return DNSAnswer(_records(answers, rrtype), False, _ttl(answers, authority))

        def failed(failure: Any) -> Any:
            if failure.check(DNSNameError):
                return failure
            from twisted.names.error import AuthoritativeDomainError

            if failure.check(AuthoritativeDomainError):
                # /etc/hosts knows the name but has no such records.
                return DNSAnswer(())
            raise DNSLookupError(f"lookup of {name} failed: {failure.getErrorMessage()}")

        return d.addCallbacks(found, failed)


class _ADQueries:
    """
    Makes twisted.names' UDP and TCP protocols set the AD bit in the
    queries they write, and ignores messages nobody asked for.
    """

    def messageReceived(self, message: Any, protocol: Any, address: Any = None) -> None:
        pass

    def connectionMade(self, protocol: Any) -> None:
        pass

    def connectionLost(self, protocol: Any) -> None:
        pass


class _UDPQuery(dns.DNSDatagramProtocol):
    def writeMessage(self, message: dns.Message, address: tuple[str, int]) -> None:
        message.authenticData = 1
        super().writeMessage(message, address)


class _TCPQuery(dns.DNSProtocol):
    def writeMessage(self, message: dns.Message) -> None:
        message.authenticData = 1
        super().writeMessage(message)


class _TCPQueryFactory(Factory):
    noisy = False

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def buildProtocol(self, addr: Any) -> _TCPQuery:
        return _TCPQuery(_ADQueries(), self._reactor)


class DNSClient:
    """
    L{DNSLookup} asking the resolvers the operator named, in order (the
    next when one does not answer or fails), with a cache.

    @param reactor: an C{IReactorUDP}, C{IReactorTCP} and C{IReactorTime}.
    @param servers: C{(ip, port)} of each resolver.
    @param trust_ad: the resolvers validate DNSSEC (C{--dnssec}): their AD
        bit makes an answer authenticated.
    """

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[tuple[str, int]],
        *,
        trust_ad: bool = False,
        timeout: float = QUERY_TIMEOUT,
    ) -> None:
        if not servers:
            raise ValueError("DNSClient needs at least one server")
        self._reactor = reactor
        self._servers = tuple(servers)
        self._trust_ad = trust_ad
        self._timeout = timeout
        # (name, type) -> (expires, answer or the name error)
        self._cache: dict[tuple[str, int], tuple[float, DNSAnswer | None]] = {}

    def lookup(self, name: str, rrtype: int) -> Deferred[DNSAnswer]:
        key = (name.lower().rstrip("."), rrtype)
        cached = self._cache.get(key)
        if cached is not None:
            expires, answer = cached
            if expires > self._reactor.seconds():
                if answer is None:
                    return defer.fail(DNSNameError(name))
                return defer.succeed(answer)
            del self._cache[key]
        return Deferred.fromCoroutine(self._lookup(key))

    async def _lookup(self, key: tuple[str, int]) -> DNSAnswer:
        name, rrtype = key
        query = dns.Query(name, rrtype, dns.IN)
        problems = []
        for server in self._servers:
            try:
                message = await self._ask(server, query)
            except Exception as e:
                problems.append(f"{server[0]}:{server[1]}: {type(e).__name__} {e}".strip())
                continue
            if message.rCode == dns.ENAME:
                self._store(key, None, _ttl((), message.authority))
                raise DNSNameError(name)
            if message.rCode != dns.OK:
                problems.append(f"{server[0]}:{server[1]}: rcode {message.rCode}")
                continue
            answer = DNSAnswer(
                _records(message.answers, rrtype),
                self._trust_ad and bool(message.authenticData),
                _ttl(message.answers, message.authority),
            )
            self._store(key, answer, answer.ttl)
            return answer
        raise DNSLookupError(f"lookup of {name} failed: " + "; ".join(problems))

    def _store(self, key: tuple[str, int], answer: DNSAnswer | None, ttl: int) -> None:
        if ttl <= 0:
            return
        if len(self._cache) >= CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = (self._reactor.seconds() + ttl, answer)

    async def _ask(self, server: tuple[str, int], query: dns.Query) -> dns.Message:
        protocol = _UDPQuery(_ADQueries(), self._reactor)
        interface = "::" if ":" in server[0] else ""
        port = self._reactor.listenUDP(0, protocol, interface=interface)
        try:
            message: dns.Message = await protocol.query(server, [query], self._timeout)
        finally:
            port.stopListening()
        if message.trunc:
            # RFC 7766: the whole answer is had over TCP.
            message = await self._ask_tcp(server, query)
        return message

    async def _ask_tcp(self, server: tuple[str, int], query: dns.Query) -> dns.Message:
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

        kind = TCP6ClientEndpoint if ":" in server[0] else TCP4ClientEndpoint
        endpoint = kind(self._reactor, server[0], server[1], timeout=self._timeout)
        protocol = cast(_TCPQuery, await endpoint.connect(_TCPQueryFactory(self._reactor)))
        try:
            return await protocol.query([query], self._timeout)
        finally:
            assert protocol.transport is not None
            protocol.transport.loseConnection()


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class NamesHostnameResolver:
    """
    An C{IHostnameResolver} (what C{HostnameEndpoint} asks for a host's
    addresses) over a L{DNSLookup}: A and AAAA records, asked at once.
    """

    def __init__(self, lookup: DNSLookup) -> None:
        self._lookup = lookup

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        kinds = [
            (rrtype, kind)
            for rrtype, kind in ((dns.AAAA, IPv6Address), (dns.A, IPv4Address))
            if addressTypes is None or kind in addressTypes
        ]
        try:
            literal = ipaddress.ip_address(hostName)
        except ValueError:
            literal = None
        if literal is not None:
            kind = IPv6Address if literal.version == 6 else IPv4Address
            if addressTypes is None or kind in addressTypes:
                resolutionReceiver.addressResolved(kind("TCP", str(literal), portNumber))
            resolutionReceiver.resolutionComplete()
            return resolution

        def found(results: list[tuple[bool, Any]]) -> None:
            for (ok, answer), (_, kind) in zip(results, kinds, strict=True):
                if not ok:
                    continue
                for record in answer.records:
                    resolutionReceiver.addressResolved(
                        kind("TCP", record.dottedQuad() if kind is IPv4Address
                             else _ipv6(record.address), portNumber)
                    )  # fmt: skip
            resolutionReceiver.resolutionComplete()

        ds = [self._lookup.lookup(hostName, rrtype) for rrtype, _ in kinds]
        defer.DeferredList(ds, consumeErrors=True).addCallback(found).addErrback(
            lambda f: log.failure("resolving {name} failed", f, name=hostName)
        )
        return resolution


def _ipv6(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))


async def addresses(lookup: DNSLookup, name: str) -> list[str]:
    """
    The IP addresses (AAAA, then A) of C{name}; those of a lookup that
    failed are left out.
    """
    found: list[str] = []
    for rrtype in (dns.AAAA, dns.A):
        try:
            answer = await lookup.lookup(name, rrtype)
        except Exception:
            continue
        for record in answer.records:
            if rrtype == dns.A:
                found.append(record.dottedQuad())
            else:
                found.append(_ipv6(record.address))
    return found


@implementer(IReactorPluggableNameResolver)
class ResolvingReactor:
    """
    A reactor with another name resolver: what C{HostnameEndpoint} (and so
    twisted.web's C{Agent}) resolves host names with, since it takes the
    resolver from its reactor.
    """

    def __init__(self, reactor: Any, resolver: Any) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: Any) -> Any:
        raise NotImplementedError("this name resolver is fixed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
