"""
Tests for L{relay.delivery.mx} and the MX rules as routing applies them
(L{relay.delivery.nexthop.resolve_domain}): equal preferences shuffled,
dead hosts skipped for a while, the relay itself in the list.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.dns import DNSAnswer
from relay.delivery.mx import (
    DEAD_HOST_PERIOD,
    DeadHosts,
    MXHost,
    Myself,
    below_myself,
    listeners_of,
    mx_hosts,
    order_hosts,
)
from relay.delivery.nexthop import MXRules, resolve_domain


class FakeLookup:
    """
    A L{relay.delivery.dns.DNSLookup} from a dict of (name, type) ->
    records; names not in it do not exist.
    """

    def __init__(self, records: dict[tuple[str, int], list[Any]], authenticated: bool = False) -> None:
        self.records = records
        self.authenticated = authenticated
        self.queries: list[tuple[str, int]] = []

    def lookup(self, name: str, rrtype: int) -> defer.Deferred[DNSAnswer]:
        self.queries.append((name, rrtype))
        if not any(n == name for n, _ in self.records):
            return defer.fail(DNSNameError(name))
        return defer.succeed(DNSAnswer(tuple(self.records.get((name, rrtype), ())), self.authenticated))


def mx(preference: int, name: str) -> dns.Record_MX:
    return dns.Record_MX(preference, name.encode())


hosts_strategy = st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from("abcdefgh")), min_size=1, max_size=8, unique_by=lambda t: t[1]
).map(lambda items: [MXHost(p, f"{n}.example.test") for p, n in items])


class OrderTests(SynchronousTestCase):
    """
    L{order_hosts}: by preference, ties in random order.
    """

    @settings(deadline=None)
    @given(hosts_strategy, st.integers(0, 2**32))
    def test_preferences_respected(self, hosts: list[MXHost], seed: int) -> None:
        """
        Whatever the random choices, the order is by preference and holds
        every host once.
        """
        ordered = order_hosts(hosts, random.Random(seed))
        self.assertEqual(sorted(ordered, key=lambda h: h.name), sorted(hosts, key=lambda h: h.name))
        prefs = [h.preference for h in ordered]
        self.assertEqual(prefs, sorted(prefs))

    def test_every_order_appears(self) -> None:
        """
        Over many draws every order of three equal hosts appears, and the
        host of higher preference value is always last (RFC 5321 section
        5.1: equal preferences MUST be randomised).
        """
        hosts = [MXHost(10, "a"), MXHost(10, "b"), MXHost(10, "c"), MXHost(20, "z")]
        rng = random.Random(1)
        seen = set()
        for _ in range(300):
            ordered = order_hosts(hosts, rng)
            self.assertEqual(ordered[-1].name, "z")
            seen.add(tuple(h.name for h in ordered[:3]))
        self.assertEqual(seen, set(itertools.permutations("abc")))

    def test_mx_hosts(self) -> None:
        """
        No MX record is C{None}, a null MX is C{()}, names lose the dot.
        """
        self.assertIsNone(mx_hosts([]))
        self.assertEqual(mx_hosts([mx(0, "")]), ())
        self.assertEqual(mx_hosts([mx(5, "MX.Example.test.")]), (MXHost(5, "mx.example.test"),))


class DeadHostsTests(SynchronousTestCase):
    """
    L{DeadHosts} remembers failures for a while.
    """

    def test_skipped_while_others_remain(self) -> None:
        """
        A host that failed is left out for L{DEAD_HOST_PERIOD} seconds
        while others remain; if all failed, all are kept; a host that took
        a connection is forgotten at once.
        """
        clock = Clock()
        dead = DeadHosts(clock)
        hosts = [MXHost(10, "a"), MXHost(20, "b")]
        dead.failed("A")
        self.assertEqual(dead.skip(hosts), [MXHost(20, "b")])
        dead.failed("b")
        self.assertEqual(dead.skip(hosts), hosts)
        clock.advance(DEAD_HOST_PERIOD)
        self.assertEqual(dead.skip(hosts), hosts)
        self.assertFalse(dead.is_dead("a"))
        dead.failed("a")
        dead.alive("a")
        self.assertFalse(dead.is_dead("a"))


class MyselfTests(SynchronousTestCase):
    """
    How the relay knows itself among MX hosts.
    """

    def test_by_name_and_address(self) -> None:
        """
        By its host name (any case, trailing dot), or by an address and
        port it listens on (an unspecified address standing for loopback).
        """
        me = Myself(frozenset({"relay.example.test"}), frozenset({("192.0.2.1", 25), ("::", 2525)}))
        self.assertTrue(me.is_me("Relay.Example.Test."))
        self.assertFalse(me.is_me("other.example.test"))
        self.assertTrue(me.is_me("x", ["192.0.2.1"], 25))
        self.assertFalse(me.is_me("x", ["192.0.2.1"], 26))
        self.assertTrue(me.is_me("x", ["::1"], 2525))
        self.assertFalse(me.is_me("x", ["192.0.2.9"], 2525))

    def test_below_myself(self) -> None:
        """
        Listed as an MX, the relay keeps only the hosts it prefers to
        itself; when none remain, C{None} (a loop).
        """
        ordered = [MXHost(5, "a"), MXHost(10, "me"), MXHost(10, "b"), MXHost(20, "c")]
        self.assertEqual(below_myself(ordered, {"me"}), [MXHost(5, "a")])
        self.assertEqual(below_myself(ordered, set()), ordered)
        self.assertIsNone(below_myself(ordered, {"a"}))

    def test_listeners_of(self) -> None:
        """
        The listeners' addresses and ports, from endpoint descriptions.
        """
        self.assertEqual(
            listeners_of(["tcp:25:interface=192.0.2.1", "tcp6:2525:interface=\\:\\:1", "tcp:26",
                          "haproxy:tcp:27", "unix:/x"]),
            {("192.0.2.1", 25), ("::1", 2525), ("0.0.0.0", 26), ("0.0.0.0", 27)},
        )  # fmt: skip


class RoutingTests(SynchronousTestCase):
    """
    The MX rules as routing applies them.
    """

    def route(self, lookup: Any, domain: str, rules: MXRules) -> Any:
        return self.successResultOf(defer.Deferred.fromCoroutine(resolve_domain(lookup, domain, rules)))

    def test_self_loop_bounces(self) -> None:
        """
        The relay as the best MX of a domain (by --hostname) with no host
        preferred to it: a permanent 5.4.6 failure naming the domain.
        """
        lookup = FakeLookup({("example.test", dns.MX): [mx(10, "relay.test"), mx(20, "backup.test")]})
        rules = MXRules(rng=random.Random(0), myself=Myself(frozenset({"relay.test"})))
        hops, error, permanent, _ = self.route(lookup, "example.test", rules)
        self.assertEqual((hops, permanent), ((), True))
        self.assertEqual(error, "5.4.6 mail for example.test loops back to myself")

    def test_self_as_backup(self) -> None:
        """
        The relay as a backup MX delivers to the hosts preferred to it only.
        """
        lookup = FakeLookup({("example.test", dns.MX): [
            mx(10, "primary.test"), mx(20, "relay.test"), mx(30, "third.test")]})  # fmt: skip
        rules = MXRules(rng=random.Random(0), myself=Myself(frozenset({"relay.test"})))
        hops, error, _, _ = self.route(lookup, "example.test", rules)
        self.assertEqual((hops, error), (("primary.test:25",), None))

    def test_self_by_address(self) -> None:
        """
        An MX host whose address is one the relay listens on, on the MX
        port, is the relay; with another port it is not (and its addresses
        are not even looked up).
        """
        records = {
            ("example.test", dns.MX): [mx(10, "alias.test"), mx(20, "other.test")],
            ("alias.test", dns.A): [dns.Record_A("192.0.2.1")],
            ("other.test", dns.A): [dns.Record_A("192.0.2.2")],
        }
        lookup = FakeLookup(records)
        rules = MXRules(rng=random.Random(0), myself=Myself(listeners=frozenset({("192.0.2.1", 25)})))
        hops, error, permanent, _ = self.route(lookup, "example.test", rules)
        self.assertEqual((hops, permanent), ((), True))
        self.assertIn("5.4.6", error)
        lookup = FakeLookup(records)
        rules = MXRules(rng=random.Random(0), myself=Myself(listeners=frozenset({("192.0.2.1", 8025)})))
        hops, error, _, _ = self.route(lookup, "example.test", rules)
        self.assertEqual(hops, ("alias.test:25", "other.test:25"))
        self.assertEqual(lookup.queries, [("example.test", dns.MX)])

    def test_dead_host_skipped(self) -> None:
        """
        A host that refused lately is not tried while another remains.
        """
        clock = Clock()
        dead = DeadHosts(clock)
        dead.failed("a.test")
        lookup = FakeLookup({("example.test", dns.MX): [mx(10, "a.test"), mx(20, "b.test")]})
        rules = MXRules(rng=random.Random(0), dead=dead)
        self.assertEqual(self.route(lookup, "example.test", rules)[0], ("b.test:25",))
        clock.advance(DEAD_HOST_PERIOD)
        self.assertEqual(self.route(lookup, "example.test", rules)[0], ("a.test:25", "b.test:25"))

    def test_no_mx_and_null_mx(self) -> None:
        """
        No MX: the domain itself (on the MX port); a null MX: 5.1.10; the
        destination says whether the MX answer was validated.
        """
        lookup = FakeLookup({("plain.test", dns.A): [dns.Record_A("192.0.2.3")],
                             ("null.test", dns.MX): [mx(0, "")]}, authenticated=True)  # fmt: skip
        hops, error, _, destination = self.route(lookup, "plain.test", MXRules(port=2525))
        self.assertEqual((hops, error), (("plain.test:2525",), None))
        self.assertEqual((destination.domain, destination.mx_authenticated), ("plain.test", True))
        hops, error, permanent, _ = self.route(lookup, "null.test", MXRules())
        self.assertEqual((hops, permanent), ((), True))
        self.assertIn("5.1.10", error)
