"""
Tests for L{relay.delivery.dns}: the DNS client of C{--resolver} against
twisted.names' own server on 127.0.0.1 (L{tests.dnsserver}), and the
lookup over the system's resolver with a fake one.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from relay.delivery.dns import (
    DNSClient,
    DNSLookupError,
    NamesHostnameResolver,
    ResolverLookup,
    addresses,
)
from relay.delivery.nexthop import parse_server
from tests.dnsserver import FakeZone, start_dns_server


class _ClockedReactor:
    """
    The real reactor for sockets, a L{Clock} for the time the cache reads.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def seconds(self) -> float:
        return self.clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


def mx_zone() -> FakeZone:
    zone = FakeZone()
    zone.add("signed.test", dns.Record_MX(10, b"mx.signed.test"), secure=True)
    zone.add("plain.test", dns.Record_MX(10, b"mx.plain.test"))
    zone.add("mx.signed.test", dns.Record_A("127.0.0.1"), dns.Record_AAAA("::1"), secure=True)
    return zone


class DNSClientTests(TestCase):
    """
    L{DNSClient} asks the declared resolvers and reads the AD bit.
    """

    def client(self, zone: FakeZone, trust_ad: bool = True, **kwargs: Any) -> DNSClient:
        return DNSClient(kwargs.pop("reactor", reactor), [start_dns_server(self, zone)],
                         trust_ad=trust_ad, **kwargs)  # fmt: skip

    @defer.inlineCallbacks
    def test_records_and_ad(self) -> Any:
        """
        The answer holds the records of the type asked for; it is
        authenticated when the resolver set AD for it, and the query asked
        for AD (RFC 6840 section 5.7).
        """
        zone = mx_zone()
        client = self.client(zone)
        answer = yield client.lookup("signed.test", dns.MX)
        self.assertEqual([(r.preference, str(r.name)) for r in answer.records], [(10, "mx.signed.test")])
        self.assertTrue(answer.authenticated)
        answer = yield client.lookup("plain.test", dns.MX)
        self.assertFalse(answer.authenticated)
        self.assertEqual(zone.server.asked_ad, [True, True])

    @defer.inlineCallbacks
    def test_ad_ignored_without_dnssec(self) -> Any:
        """
        Without C{--dnssec} the AD bit counts for nothing.
        """
        answer = yield self.client(mx_zone(), trust_ad=False).lookup("signed.test", dns.MX)
        self.assertFalse(answer.authenticated)
        self.assertEqual(len(answer.records), 1)

    @defer.inlineCallbacks
    def test_no_such_name(self) -> Any:
        """
        NXDOMAIN is L{DNSNameError}; a name without records of the type is
        an empty answer.
        """
        client = self.client(mx_zone())
        yield self.assertFailure(client.lookup("nowhere.test", dns.MX), DNSNameError)
        answer = yield client.lookup("signed.test", dns.TXT)
        self.assertEqual(answer.records, ())

    @defer.inlineCallbacks
    def test_server_failure(self) -> Any:
        """
        SERVFAIL (what a validating resolver answers for a bogus name) is
        L{DNSLookupError}, naming the server.
        """
        zone = mx_zone()
        zone.failing.add("signed.test")
        error = yield self.assertFailure(self.client(zone).lookup("signed.test", dns.MX), DNSLookupError)
        self.assertIn("rcode 2", str(error))
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_next_server(self) -> Any:
        """
        When the first resolver fails, the next is asked.
        """
        broken = FakeZone()
        broken.add("signed.test")
        broken.failing.add("signed.test")
        client = DNSClient(
            reactor, [start_dns_server(self, broken), start_dns_server(self, mx_zone())], trust_ad=True
        )
        answer = yield client.lookup("signed.test", dns.MX)
        self.assertEqual(len(answer.records), 1)
        self.assertTrue(answer.authenticated)
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_truncated_answer_over_tcp(self) -> Any:
        """
        An answer too big for UDP comes truncated; the client asks again
        over TCP and gets it whole (RFC 7766).
        """
        zone = FakeZone()
        texts = [dns.Record_TXT(b"x" * 200) for _ in range(10)]
        zone.add("big.test", *texts)
        answer = yield self.client(zone).lookup("big.test", dns.TXT)
        self.assertEqual(len(answer.records), 10)

    @defer.inlineCallbacks
    def test_cache(self) -> Any:
        """
        Answers (and NXDOMAIN) are cached for their TTL, then asked again.
        """
        zone = mx_zone()
        clock = Clock()
        client = self.client(zone, reactor=_ClockedReactor(clock))
        yield client.lookup("signed.test", dns.MX)
        yield client.lookup("SIGNED.test.", dns.MX)
        yield self.assertFailure(client.lookup("nowhere.test", dns.MX), DNSNameError)
        yield self.assertFailure(client.lookup("nowhere.test", dns.MX), DNSNameError)
        self.assertEqual(zone.queries, [("signed.test", dns.MX), ("nowhere.test", dns.MX)])
        clock.advance(61)
        yield client.lookup("signed.test", dns.MX)
        self.assertEqual(len(zone.queries), 3)

    @defer.inlineCallbacks
    def test_hostname_resolver(self) -> Any:
        """
        L{NamesHostnameResolver} gives a host's AAAA and A addresses from
        the lookup, and an IP address as itself.
        """
        resolver = NamesHostnameResolver(self.client(mx_zone()))
        got: list[Any] = []
        done: defer.Deferred[None] = defer.Deferred()

        class Receiver:
            def resolutionBegan(self, resolution: Any) -> None:
                got.append(("began", resolution.name))

            def addressResolved(self, address: Any) -> None:
                got.append(address)

            def resolutionComplete(self) -> None:
                done.callback(None)

        resolver.resolveHostName(Receiver(), "mx.signed.test", 25)
        yield done
        self.assertEqual(
            got,
            [("began", "mx.signed.test"), IPv6Address("TCP", "::1", 25),
             IPv4Address("TCP", "127.0.0.1", 25)],
        )  # fmt: skip
        done = defer.Deferred()
        got.clear()
        resolver.resolveHostName(Receiver(), "192.0.2.7", 26)
        yield done
        self.assertEqual(got, [("began", "192.0.2.7"), IPv4Address("TCP", "192.0.2.7", 26)])

    @defer.inlineCallbacks
    def test_addresses(self) -> Any:
        """
        L{addresses} lists AAAA then A; a name that does not exist has none.
        """
        client = self.client(mx_zone())
        self.assertEqual((yield addresses(client, "mx.signed.test")), ["::1", "127.0.0.1"])
        self.assertEqual((yield addresses(client, "nowhere.test")), [])


class ParseServerTests(SynchronousTestCase):
    """
    C{--resolver HOST[:PORT]}.
    """

    def test_forms(self) -> None:
        """
        IPv4 with or without a port, IPv6 bare or bracketed with a port; a
        host name or a bad port is refused (the resolver is not looked up).
        """
        self.assertEqual(parse_server("127.0.0.1"), ("127.0.0.1", 53))
        self.assertEqual(parse_server("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parse_server("::1"), ("::1", 53))
        self.assertEqual(parse_server("[::1]:5353"), ("::1", 5353))
        for bad in ("resolver.example", "127.0.0.1:0", "127.0.0.1:x", "[::1", ""):
            self.assertRaises(ValueError, parse_server, bad)


class ResolverLookupTests(SynchronousTestCase):
    """
    L{ResolverLookup}: the system's resolver, never trusted.
    """

    def test_never_authenticated(self) -> None:
        """
        The records come through, unauthenticated; the resolver is made on
        first use; NXDOMAIN stays L{DNSNameError}, other failures become
        L{DNSLookupError}.
        """
        made: list[int] = []

        class Resolver:
            def lookupMailExchange(self, name: str) -> Any:
                if name == "gone.test":
                    return defer.fail(DNSNameError(name))
                if name == "broken.test":
                    return defer.fail(DNSServerError(name))
                rr = dns.RRHeader(name, dns.MX, dns.IN, 30, dns.Record_MX(5, b"mx." + name.encode()))
                return defer.succeed(([rr], [], []))

        def factory() -> Resolver:
            made.append(1)
            return Resolver()

        lookup = ResolverLookup(resolver_factory=factory)
        self.assertEqual(made, [])
        answer = self.successResultOf(lookup.lookup("x.test", dns.MX))
        self.assertFalse(answer.authenticated)
        self.assertEqual(answer.ttl, 30)
        self.assertEqual(str(answer.records[0].name), "mx.x.test")
        self.failureResultOf(lookup.lookup("gone.test", dns.MX), DNSNameError)
        self.failureResultOf(lookup.lookup("broken.test", dns.MX), DNSLookupError)
        self.assertEqual(made, [1])
