"""
Tests for L{relay.delivery.mtasts}: the TXT record and policy parsers, the
fetch from an in-process HTTPS server (twisted.web, a certificate from
L{tests.pki}, trusted through the C{--tls-ca-file} path), and the cache in
memory and on disk.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Site
from twisted.web.util import Redirect

from relay.delivery.client_tls import TLSContexts
from relay.delivery.dns import NamesHostnameResolver
from relay.delivery.mtasts import (
    MAX_POLICY_BYTES,
    MTASTS,
    PolicyError,
    PolicyFetcher,
    PolicyStore,
    STSPolicy,
    parse_policy,
    parse_txt,
)
from tests.pki import pki, server_options
from tests.test_mx import FakeLookup

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mx.example.test\r\nmax_age: 86400\r\n"


class ParseTests(SynchronousTestCase):
    """
    The TXT record and the policy, as RFC 8461 sections 3.1 and 3.2 say.
    """

    def test_txt(self) -> None:
        """
        One C{v=STSv1} record gives its id; none gives C{None}; two, a bad
        id or a malformed field are errors (the domain then has no policy).
        """
        self.assertEqual(parse_txt(["v=STSv1; id=20240101T000000;"]), "20240101T000000")
        self.assertEqual(parse_txt(["v=STSv1;id=abc"]), "abc")
        self.assertIsNone(parse_txt(["v=spf1 -all"]))
        for bad in (["v=STSv1; id=a", "v=STSv1; id=b"], ["v=STSv1; id=no-dashes"],
                    ["v=STSv1; id"], ["v=STSv1; "]):  # fmt: skip
            self.assertRaises(PolicyError, parse_txt, bad)

    def test_policy(self) -> None:
        """
        A policy's mode, patterns and max_age; CRLF or LF lines.
        """
        policy = parse_policy(POLICY, "id1", 100.0)
        self.assertEqual(
            (policy.id, policy.mode, policy.mx, policy.max_age, policy.fetched_at),
            ("id1", "enforce", ("mx1.example.test", "*.mx.example.test"), 86400, 100.0),
        )
        self.assertTrue(policy.fresh(86499.0))
        self.assertFalse(policy.fresh(86500.0))
        lf = parse_policy(POLICY.replace("\r\n", "\n").replace("86400", "99999999999"[:10]), "i", 0)
        self.assertEqual(lf.max_age, 31_557_600)

    def test_bad_policies(self) -> None:
        """
        A wrong version, an unknown mode, a missing max_age, no mx patterns
        (except for mode none) or a line without a colon is invalid.
        """
        for body in (POLICY.replace("STSv1", "STSv2"), POLICY.replace("enforce", "strict"),
                     POLICY.replace("max_age: 86400\r\n", ""),
                     "version: STSv1\nmode: enforce\nmax_age: 5\n", POLICY + "garbage\n"):  # fmt: skip
            with self.assertRaises(PolicyError) as caught:
                parse_policy(body, "i", 0)
            self.assertEqual(caught.exception.result, "sts-policy-invalid")
        self.assertEqual(parse_policy("version: STSv1\nmode: none\nmax_age: 5\n", "i", 0).mode, "none")

    def test_matching(self) -> None:
        """
        A pattern matches its name; C{*.} stands for exactly one label.
        """
        policy = parse_policy(POLICY, "id1", 0)
        self.assertTrue(policy.matches("MX1.example.test."))
        self.assertTrue(policy.matches("a.mx.example.test"))
        self.assertFalse(policy.matches("a.b.mx.example.test"))
        self.assertFalse(policy.matches("mx.example.test"))
        self.assertFalse(policy.matches("mx2.example.test"))


class Policy(Resource):
    isLeaf = True

    def __init__(self, body: bytes, content_type: bytes = b"text/plain") -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type
        self.requests: list[bytes] = []

    def render_GET(self, request: Any) -> bytes:
        self.requests.append(request.uri)
        request.setHeader(b"content-type", self.content_type)
        return self.body


class CountingSite(Site):
    """
    A site that counts its open connections.
    """

    open = 0

    def buildProtocol(self, addr: Any) -> Any:
        protocol = Site.buildProtocol(self, addr)
        lost = protocol.connectionLost
        self.open += 1

        def connectionLost(reason: Any) -> None:
            self.open -= 1
            lost(reason)

        protocol.connectionLost = connectionLost
        return protocol


class FetcherTests(TestCase):
    """
    L{PolicyFetcher} against an HTTPS server on 127.0.0.1.
    """

    def serve(self, resource: Resource, name: str = "mta-sts.example.test", **tls: Any) -> PolicyFetcher:
        root = Resource()
        wk = Resource()
        root.putChild(b".well-known", wk)
        wk.putChild(b"mta-sts.txt", resource)
        self.site = CountingSite(root)
        port = reactor.listenSSL(0, self.site, server_options(name, **tls), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        ca = os.path.abspath(self.mktemp())
        pki().write_root(ca)
        lookup = FakeLookup({("mta-sts.example.test", dns.A): [dns.Record_A("127.0.0.1")]})
        fetcher = PolicyFetcher(
            reactor, TLSContexts(ca_file=ca), port=port.getHost().port,
            name_resolver=NamesHostnameResolver(lookup),
        )  # fmt: skip
        return fetcher

    @defer.inlineCallbacks
    def test_fetch(self) -> Any:
        """
        The policy comes from the well-known URL, over verified TLS (the
        CA added with C{--tls-ca-file}).
        """
        resource = Policy(POLICY.encode())
        body = yield self.serve(resource).fetch("example.test")
        self.assertEqual(body, POLICY)
        self.assertEqual(resource.requests, [b"/.well-known/mta-sts.txt"])

    @defer.inlineCallbacks
    def test_too_big(self) -> Any:
        """
        A body past 64 KiB is refused.
        """
        fetcher = self.serve(Policy(b"x" * (MAX_POLICY_BYTES + 1)))
        error = yield self.assertFailure(fetcher.fetch("example.test"), PolicyError)
        self.assertEqual(error.result, "sts-policy-fetch-error")
        self.assertIn("larger than", str(error))
        # The client closed; the server's end closes on a later turn.
        for _ in range(1000):
            if not self.site.open:
                break
            yield deferLater(reactor, 0, lambda: None)

    @defer.inlineCallbacks
    def test_not_found_redirect_and_type(self) -> Any:
        """
        Another status (a redirect is not followed) is a fetch error; a
        body that is not text/plain is invalid.
        """
        error = yield self.assertFailure(self.serve(NoResource()).fetch("example.test"), PolicyError)
        self.assertIn("404", str(error))
        error = yield self.assertFailure(
            self.serve(Redirect(b"https://elsewhere.test/")).fetch("example.test"), PolicyError
        )
        self.assertIn("302", str(error))
        error = yield self.assertFailure(
            self.serve(Policy(b"{}", b"application/json")).fetch("example.test"), PolicyError
        )
        self.assertEqual(error.result, "sts-policy-invalid")

    @defer.inlineCallbacks
    def test_certificate_checked(self) -> Any:
        """
        A policy host whose certificate is for another name, or not from a
        trusted CA, gives no policy.
        """
        for tls in ({"name": "other.example.test"}, {"self_signed": True}):
            fetcher = self.serve(Policy(POLICY.encode()), **tls)
            error = yield self.assertFailure(fetcher.fetch("example.test"), PolicyError)
            self.assertEqual(error.result, "sts-policy-fetch-error", tls)

    def test_timeout(self) -> None:
        """
        A policy host that does not answer is given up after the timeout.
        """
        clock = MemoryReactorClock()
        lookup = FakeLookup({("mta-sts.example.test", dns.A): [dns.Record_A("192.0.2.9")]})
        fetcher = PolicyFetcher(
            clock, TLSContexts(), timeout=10.0, name_resolver=NamesHostnameResolver(lookup)
        )
        d = fetcher.fetch("example.test")
        clock.advance(9)
        self.assertNoResult(d)
        clock.advance(1)
        error = self.failureResultOf(d, PolicyError).value
        self.assertIn("within 10.0 seconds", str(error))


class FakeFetcher:
    """
    Policies by domain: text, or an exception to fail with.
    """

    def __init__(self) -> None:
        self.bodies: dict[str, Any] = {}
        self.fetches: list[str] = []
        self.pending: list[defer.Deferred[str]] = []

    def fetch(self, domain: str) -> defer.Deferred[str]:
        self.fetches.append(domain)
        body = self.bodies.get(domain)
        if body is None:
            d: defer.Deferred[str] = defer.Deferred()
            self.pending.append(d)
            return d
        if isinstance(body, Exception):
            return defer.fail(body)
        return defer.succeed(body)


def txt(ident: str) -> dict[tuple[str, int], list[Any]]:
    return {("_mta-sts.example.test", dns.TXT): [dns.Record_TXT(f"v=STSv1; id={ident};".encode())]}


class CacheTests(SynchronousTestCase):
    """
    L{MTASTS}: what policy is in force, with the cache in memory and on disk.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.directory = os.path.abspath(self.mktemp())
        self.fetcher = FakeFetcher()
        self.fetcher.bodies["example.test"] = POLICY
        self.lookup = FakeLookup(txt("one"))

    def sts(self) -> MTASTS:
        store = PolicyStore(self.directory, lambda f, *a: defer.maybeDeferred(f, *a))
        self.problems: list[str] = []
        return MTASTS(self.lookup, self.fetcher, store, self.clock, self.problems.append)

    def policy(self, sts: MTASTS, domain: str = "example.test") -> Any:
        return self.successResultOf(sts.policy(domain))

    def test_cached_until_id_changes(self) -> None:
        """
        A policy is fetched once; asked again with the same TXT id it comes
        from the cache; a new id fetches it again.
        """
        sts = self.sts()
        first = self.policy(sts)
        self.assertEqual((first.policy.mode, first.policy.id, first.problem), ("enforce", "one", None))
        self.assertEqual(self.policy(sts).policy, first.policy)
        self.assertEqual(self.fetcher.fetches, ["example.test"])
        self.lookup.records.update(txt("two"))
        self.assertEqual(self.policy(sts).policy.id, "two")
        self.assertEqual(len(self.fetcher.fetches), 2)

    def test_survives_restart(self) -> None:
        """
        The policy is on disk in the spool's mta-sts directory: a new
        instance (a restart) uses it without fetching, even when the TXT
        record is gone (RFC 8461 section 5.1).
        """
        self.policy(self.sts())
        self.assertTrue(os.path.exists(os.path.join(self.directory, "example.test.json")))
        self.fetcher.fetches.clear()
        self.lookup.records.clear()
        found = self.policy(self.sts())
        self.assertEqual(found.policy.id, "one")
        self.assertEqual(self.fetcher.fetches, [])

    def test_expired_policy_fetched_again(self) -> None:
        """
        Once max_age has passed the policy is fetched again.
        """
        sts = self.sts()
        self.policy(sts)
        self.clock.advance(86400)
        self.fetcher.bodies["example.test"] = POLICY.replace("enforce", "testing")
        self.assertEqual(self.policy(sts).policy.mode, "testing")
        self.assertEqual(len(self.fetcher.fetches), 2)

    def test_failed_refresh_keeps_cached(self) -> None:
        """
        A refresh that fails (a changed id, the host down) keeps the cached
        policy in force, and says what went wrong.
        """
        sts = self.sts()
        self.policy(sts)
        self.lookup.records.update(txt("two"))
        self.fetcher.bodies["example.test"] = PolicyError("host down", "sts-policy-fetch-error")
        found = self.policy(sts)
        self.assertEqual(found.policy.id, "one")
        self.assertEqual(found.problem, ("sts-policy-fetch-error", "host down"))
        # Not asked again for a while, and counted once.
        self.assertEqual(self.policy(sts).policy.id, "one")
        self.assertEqual(len(self.fetcher.fetches), 2)
        self.assertEqual(self.problems, ["sts-policy-fetch-error"])

    def test_no_policy(self) -> None:
        """
        No TXT record and nothing cached: no policy, no fetch.  A malformed
        policy: no policy, and the problem said (sts-policy-invalid).
        """
        self.lookup.records.clear()
        self.assertEqual(self.policy(self.sts()).policy, None)
        self.assertEqual(self.fetcher.fetches, [])
        self.lookup.records.update(txt("one"))
        self.fetcher.bodies["example.test"] = "version: STSv1\nmode: sometimes\n"
        found = self.policy(self.sts())
        self.assertIsNone(found.policy)
        self.assertEqual(found.problem[0], "sts-policy-invalid")

    def test_one_fetch_at_a_time(self) -> None:
        """
        Deliveries asking at once for a domain's policy share one fetch.
        """
        del self.fetcher.bodies["example.test"]
        sts = self.sts()
        a, b = sts.policy("example.test"), sts.policy("Example.Test")
        self.assertEqual(self.fetcher.fetches, ["example.test"])
        self.fetcher.pending[0].callback(POLICY)
        self.assertEqual(self.successResultOf(a), self.successResultOf(b))

    def test_store_round_trip(self) -> None:
        """
        The store writes what it reads back; an unreadable or unsafe name
        is no policy.
        """
        store = PolicyStore(self.directory, lambda f, *a: defer.maybeDeferred(f, *a))
        policy = STSPolicy("x", "testing", ("a.test",), 60, 5.0)
        self.successResultOf(store.save("example.test", policy))
        self.assertEqual(self.successResultOf(store.load("example.test")), policy)
        self.assertIsNone(self.successResultOf(store.load("../etc")))
        with open(os.path.join(self.directory, "bad.test.json"), "w") as f:
            f.write("{")
        self.assertIsNone(self.successResultOf(store.load("bad.test")))
