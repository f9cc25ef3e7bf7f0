"""
Tests for L{relay.delivery.nexthop}, with a fake resolver.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.names import dns
from twisted.names.error import DNSNameError, DNSServerError
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.dns import ResolverLookup
from relay.delivery.nexthop import address_literal, make_router, parse_hop, route_recipients
from relay.model.address import EmailAddress


def mx(preference: int, name: str) -> dns.RRHeader:
    return dns.RRHeader(name="x", type=dns.MX, payload=dns.Record_MX(preference, name))


class FakeResolver:
    """
    A twisted.names resolver that answers C{lookupMailExchange} from a dict
    of domain -> answers or exception (and has no other records).
    """

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.queries: list[str] = []

    def lookupMailExchange(self, name: str) -> Deferred[Any]:
        self.queries.append(name)
        a = self.answers.get(name, [])
        if isinstance(a, Exception):
            return defer.fail(a)
        return defer.succeed((a, [], []))

    def lookupAddress(self, name: str) -> Deferred[Any]:
        return defer.succeed(([], [], []))

    lookupIPV6Address = lookupAddress


def rcpts(*texts: str) -> list[EmailAddress]:
    return [EmailAddress.parse(t) for t in texts]


class RouteTests(SynchronousTestCase):
    """
    Routing recipients.
    """

    def route(self, resolver: Any, *recipients: str, hops: tuple[str, ...] = ()) -> Any:
        lookup = ResolverLookup(resolver)
        return self.successResultOf(route_recipients(rcpts(*recipients), hops, lookup))

    def test_next_hop_choices(self) -> None:
        """
        Given next hops are used for all recipients, without DNS.
        """
        r = FakeResolver({})
        [route] = self.route(r, "a@x.test", "b@y.test", hops=("smart:2525",))
        self.assertEqual(route.hops, ("smart:2525",))
        self.assertEqual(len(route.recipients), 2)
        self.assertEqual(r.queries, [])

    def test_mx_preference(self) -> None:
        """
        MX hosts are tried by preference, lowest first, on port 25.
        """
        r = FakeResolver({"x.test": [mx(20, "b.x.test"), mx(5, "a.x.test"), mx(10, "c.x.test")]})
        [route] = self.route(r, "a@x.test")
        self.assertEqual(route.hops, ("a.x.test:25", "c.x.test:25", "b.x.test:25"))
        self.assertIsNone(route.error)

    def test_no_mx(self) -> None:
        """
        Without MX records the domain itself is the hop.
        """
        [route] = self.route(FakeResolver({}), "a@x.test")
        self.assertEqual(route.hops, ("x.test:25",))

    def test_null_mx(self) -> None:
        """
        A null MX is a permanent failure.
        """
        [route] = self.route(FakeResolver({"x.test": [mx(0, "")]}), "a@x.test")
        self.assertEqual(route.hops, ())
        self.assertTrue(route.permanent)
        self.assertIn("null MX", route.error)

    def test_nxdomain(self) -> None:
        """
        A domain that does not exist is a permanent failure; a server
        failure is transient.
        """
        [route] = self.route(FakeResolver({"x.test": DNSNameError()}), "a@x.test")
        self.assertTrue(route.permanent)
        [route] = self.route(FakeResolver({"x.test": DNSServerError()}), "a@x.test")
        self.assertFalse(route.permanent)
        self.assertTrue(route.error.startswith("4."))

    def test_address_literal(self) -> None:
        """
        Address literals go straight to the address.
        """
        r = FakeResolver({})
        [v4, v6] = self.route(r, "a@[192.0.2.1]", "b@[IPv6:2001:db8::1]")
        self.assertEqual(v4.hops, ("192.0.2.1:25",))
        self.assertEqual(v6.hops, ("[2001:db8::1]:25",))
        self.assertEqual(r.queries, [])
        self.assertIsNone(address_literal("example.com"))

    def test_grouped_by_domain(self) -> None:
        """
        Recipients are grouped by domain, each group with its own hops.
        """
        r = FakeResolver({"x.test": [mx(10, "mx.x.test")]})
        routes = self.route(r, "a@x.test", "b@y.test", "c@X.test")
        self.assertEqual(
            [([str(a) for a in rt.recipients], rt.hops) for rt in routes],
            [(["a@x.test", "c@X.test"], ("mx.x.test:25",)), (["b@y.test"], ("y.test:25",))],
        )
        self.assertEqual(r.queries, ["x.test", "y.test"])

    def test_router_builds_resolver_lazily(self) -> None:
        """
        L{make_router} builds its resolver only when DNS is needed, once.
        """
        made: list[FakeResolver] = []

        def factory() -> FakeResolver:
            made.append(FakeResolver({}))
            return made[-1]

        route = make_router(factory)
        self.successResultOf(route(rcpts("a@x.test"), ("h:25",)))
        self.assertEqual(made, [])
        self.successResultOf(route(rcpts("a@x.test"), ()))
        self.successResultOf(route(rcpts("a@y.test"), ()))
        self.assertEqual(len(made), 1)


class DestinationTests(SynchronousTestCase):
    """
    Each route says what its hops' TLS policy depends on.
    """

    def test_destinations(self) -> None:
        """
        Next hops given: a destination without domain; by MX: the domain,
        and whether the MX answer was validated (never, from the system's
        resolver).
        """
        from relay.delivery.nexthop import Destination

        r = FakeResolver({"x.test": [mx(10, "mx.x.test")]})
        route = make_router(lambda: r)
        [smart] = self.successResultOf(route(rcpts("a@x.test"), ("smart.test:25",)))
        self.assertEqual(smart.destination, Destination(None))
        self.assertFalse(smart.destination.via_mx)
        [by_mx] = self.successResultOf(route(rcpts("a@x.test"), ()))
        self.assertEqual(by_mx.destination, Destination("x.test", mx_authenticated=False))
        self.assertTrue(by_mx.destination.via_mx)


class ParseHopTests(SynchronousTestCase):
    """
    L{parse_hop} splits hops.
    """

    def test_forms(self) -> None:
        """
        Names, IPv4 and bracketed IPv6 (with or without the C{IPv6:} tag)
        with ports; the port defaults to 25.
        """
        self.assertEqual(parse_hop("mx.example.com:2525"), ("mx.example.com", 2525))
        self.assertEqual(parse_hop("192.0.2.1:25"), ("192.0.2.1", 25))
        self.assertEqual(parse_hop("[2001:db8::1]:25"), ("2001:db8::1", 25))
        self.assertEqual(parse_hop("[IPv6:2001:db8::1]:26"), ("2001:db8::1", 26))
        self.assertEqual(parse_hop("mx.example.com"), ("mx.example.com", 25))

    def test_malformed(self) -> None:
        """
        A bad port, an empty host or an unclosed bracket is a ValueError.
        """
        for hop in ("host:x", ":25", "host:0", "host:65536", "[2001:db8::1", "[::1]25"):
            self.assertRaises(ValueError, parse_hop, hop)
