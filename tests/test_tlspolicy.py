"""
Tests for L{relay.delivery.tlspolicy}: the policy file, the plugin's
words, and the order in which a hop's policy is chosen (plugin, file,
DANE, MTA-STS, C{--relay-tls}).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.client_tls import TLSPolicy
from relay.delivery.dane import TLSARecord
from relay.delivery.dns import TLSA, DNSAnswer, DNSLookupError
from relay.delivery.mtasts import STSPolicy, STSResult
from relay.delivery.nexthop import Destination
from relay.delivery.tlspolicy import (
    PolicyFile,
    PolicyFileError,
    PolicyRefused,
    PolicyRule,
    TLSCollector,
    TLSCounts,
    TLSPolicies,
    parse_policy,
    tls_destination,
)
from relay.model.entry import TLSOutcome
from relay.model.envelope import EnvelopeWithNextHop

TLSA_DATA = b"\x03\x01\x01" + b"k" * 32


class FakeLookup:
    """
    TLSA answers by name: records and whether validated, or an exception.
    """

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        self.answers = answers or {}
        self.queries: list[tuple[str, int]] = []

    def lookup(self, name: str, rrtype: int) -> defer.Deferred[DNSAnswer]:
        self.queries.append((name, rrtype))
        found = self.answers.get(name, DNSAnswer((), True))
        if isinstance(found, Exception):
            return defer.fail(found)
        return defer.succeed(found)


def tlsa(*rdata: bytes, authenticated: bool = True) -> DNSAnswer:
    return DNSAnswer(tuple(dns.UnknownRecord(r) for r in rdata), authenticated)


class FakeSTS:
    def __init__(self, result: STSResult | None = None) -> None:
        self.result = result if result is not None else STSResult(None)
        self.asked: list[str] = []

    def policy(self, domain: str) -> defer.Deferred[STSResult]:
        self.asked.append(domain)
        return defer.succeed(self.result)


def sts(mode: str, *mx: str) -> STSResult:
    return STSResult(STSPolicy("id", mode, mx, 86400, 0.0))


MX = Destination("example.test", mx_authenticated=True)
UNSIGNED_MX = Destination("example.test")
NEXT_HOP = Destination(None)


class ParseTests(SynchronousTestCase):
    """
    The words of a policy.
    """

    def test_words(self) -> None:
        """
        Each name, and C{verify} with C{match=} names (colons or commas).
        """
        for name in ("none", "may", "encrypt", "verify", "dane", "dane-only", "mta-sts"):
            self.assertEqual(parse_policy(name), PolicyRule(name))
        self.assertEqual(
            parse_policy("verify match=A.test:b.test,c.test."),
            PolicyRule("verify", ("a.test", "b.test", "c.test")),
        )
        for bad in ("", "sometimes", "may match=x.test", "verify match=", "verify strict"):
            self.assertRaises(ValueError, parse_policy, bad)

    def test_envelope_field(self) -> None:
        """
        A plugin's C{tls_policy} is checked when it makes the envelope.
        """
        from relay.testing import make_envelope

        envelope = make_envelope("a@example.org", "b@example.com")
        self.assertEqual(EnvelopeWithNextHop(envelope, tls_policy="dane-only").tls_policy, "dane-only")
        self.assertIsNone(EnvelopeWithNextHop(envelope).tls_policy)
        self.assertRaises(ValueError, EnvelopeWithNextHop, envelope, tls_policy="maybe")


class PolicyFileTests(SynchronousTestCase):
    """
    The C{--tls-policy} file.
    """

    def test_lookups(self) -> None:
        """
        A domain's own line, else the nearest parent pattern; a next hop by
        C{[host]:port} (C{[host]} is port 25); comments and blank lines.
        """
        policies = PolicyFile([
            "# outbound TLS", "", "example.test verify match=mx.example.test",
            ".example.test encrypt  # subdomains", ".test may", "[Smart.test]:587 verify",
            "[relay.test] dane-only",
        ])  # fmt: skip
        self.assertEqual(policies.for_domain("EXAMPLE.test."), PolicyRule("verify", ("mx.example.test",)))
        self.assertEqual(policies.for_domain("a.b.example.test"), PolicyRule("encrypt"))
        self.assertEqual(policies.for_domain("other.test"), PolicyRule("may"))
        self.assertIsNone(policies.for_domain("example.org"))
        self.assertEqual(policies.for_hop("smart.test", 587), PolicyRule("verify"))
        self.assertIsNone(policies.for_hop("smart.test", 25))
        self.assertEqual(policies.for_hop("relay.test", 25), PolicyRule("dane-only"))

    def test_bad_line_named(self) -> None:
        """
        A bad line is an error naming the file and the line.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("example.test verify\n[broken verify\n")
        with self.assertRaises(PolicyFileError) as caught:
            PolicyFile.load(path)
        self.assertIn(f"{path}:2", str(caught.exception))
        for line in ("example.test sometimes", "example.test", ". may", "exa/mple may"):
            self.assertRaises(PolicyFileError, PolicyFile, [line])
        self.assertRaises(PolicyFileError, PolicyFile.load, path + ".missing")


class ChooseTests(SynchronousTestCase):
    """
    L{TLSPolicies.choose}: the order of the policies.
    """

    def choose(self, policies: TLSPolicies, hop: str, destination: Destination | None) -> TLSPolicy:
        return self.successResultOf(defer.Deferred.fromCoroutine(policies.choose(hop, destination)))

    def refused(self, policies: TLSPolicies, hop: str, destination: Destination) -> TLSOutcome:
        failure = self.failureResultOf(
            defer.Deferred.fromCoroutine(policies.choose(hop, destination)), PolicyRefused
        )
        return failure.value.outcome  # type: ignore[no-any-return]

    def test_next_hop_default_asks_nothing(self) -> None:
        """
        Mail to a next hop (a smarthost) without a file entry gets
        C{--relay-tls} at once: no DNS, no MTA-STS.
        """
        lookup, fake_sts = FakeLookup(), FakeSTS()
        default = TLSPolicy("encrypt")
        policies = TLSPolicies(default, lookup=lookup, sts=fake_sts)
        self.assertIs(self.choose(policies, "smart.test:25", NEXT_HOP), default)
        self.assertIs(self.choose(policies, "smart.test:25", None), default)
        self.assertEqual((lookup.queries, fake_sts.asked), ([], []))

    def test_file_and_plugin(self) -> None:
        """
        The file names next hops and domains; the plugin's choice wins
        over it.
        """
        file = PolicyFile(["[smart.test]:587 verify match=alt.test", "example.test none"])
        policies = TLSPolicies(TLSPolicy(), policy_file=file, lookup=FakeLookup(), sts=FakeSTS())
        policy = self.choose(policies, "smart.test:587", NEXT_HOP)
        self.assertEqual((policy.mode, policy.match, policy.source), ("verify", ("alt.test",), "file"))
        policy = self.choose(policies, "mx.example.test:25", MX)
        self.assertEqual((policy.mode, policy.source), ("none", "file"))
        policy = self.choose(policies, "mx.example.test:25", Destination("example.test", True, "encrypt"))
        self.assertEqual((policy.mode, policy.source), ("encrypt", "plugin"))

    def test_dane_wins_over_mta_sts(self) -> None:
        """
        Usable TLSA records under a validated MX answer make the policy
        DANE (the MX host's C{_25._tcp} name), whatever MTA-STS says.
        """
        lookup = FakeLookup({"_25._tcp.mx.example.test": tlsa(TLSA_DATA)})
        fake_sts = FakeSTS(sts("enforce", "other.test"))
        policies = TLSPolicies(TLSPolicy(), lookup=lookup, sts=fake_sts)
        policy = self.choose(policies, "mx.example.test:25", MX)
        self.assertEqual((policy.mode, policy.source, policy.label), ("dane", "dane", "dane"))
        self.assertEqual(policy.tlsa, (TLSARecord(3, 1, 1, b"k" * 32),))
        self.assertEqual(lookup.queries, [("_25._tcp.mx.example.test", TLSA)])
        self.assertEqual(fake_sts.asked, [])

    def test_dane_needs_validation(self) -> None:
        """
        An MX answer that is not validated: no TLSA lookup.  A TLSA answer
        that is not validated, or none at all: no DANE.  Without a
        validating resolver: no DANE either.  Then MTA-STS, or the default.
        """
        lookup = FakeLookup({"_25._tcp.mx.example.test": tlsa(TLSA_DATA, authenticated=False)})
        default = TLSPolicy()
        policies = TLSPolicies(default, lookup=lookup, sts=FakeSTS())
        self.assertIs(self.choose(policies, "mx.example.test:25", UNSIGNED_MX), default)
        self.assertEqual(lookup.queries, [])
        self.assertIs(self.choose(policies, "mx.example.test:25", MX), default)
        self.assertIs(self.choose(policies, "mx2.example.test:25", MX), default)
        self.assertIs(self.choose(TLSPolicies(default, sts=FakeSTS()), "mx.example.test:25", MX), default)

    def test_tlsa_failures(self) -> None:
        """
        A TLSA lookup that fails (bogus: SERVFAIL) is a temporary failure
        for that MX; TLSA records none of which is usable make TLS
        mandatory without authentication (RFC 7672 section 2.2), noted as
        tlsa-invalid.
        """
        lookup = FakeLookup({
            "_25._tcp.bogus.example.test": DNSLookupError("SERVFAIL"),
            "_25._tcp.odd.example.test": tlsa(b"\x01\x01\x01" + b"k" * 32, b"\x03"),
        })  # fmt: skip
        counts = TLSCounts()
        policies = TLSPolicies(TLSPolicy(), lookup=lookup, counts=counts)
        outcome = self.refused(policies, "bogus.example.test:25", MX)
        self.assertEqual((outcome.policy, outcome.source, outcome.result), ("dane", "dane", "dnssec-invalid"))
        policy = self.choose(policies, "odd.example.test:25", MX)
        self.assertEqual((policy.mode, policy.source), ("encrypt", "dane"))
        self.assertEqual(policy.note and policy.note[0], "tlsa-invalid")
        self.assertEqual(counts.failures, {("dane", "dnssec-invalid"): 1})

    def test_dane_only_and_dane(self) -> None:
        """
        C{dane-only} without usable TLSA records: nothing goes (dane-required);
        C{dane} without them: the default; with them, the file is the source.
        """
        file = PolicyFile(["example.test dane-only", "[smart.test]:25 dane"])
        lookup = FakeLookup({"_25._tcp.smart.test": tlsa(TLSA_DATA)})
        default = TLSPolicy()
        policies = TLSPolicies(default, policy_file=file, lookup=lookup, sts=FakeSTS())
        outcome = self.refused(policies, "mx.example.test:25", UNSIGNED_MX)
        self.assertEqual((outcome.policy, outcome.source, outcome.result), ("dane-only", "file", "dane-required"))
        policy = self.choose(policies, "smart.test:25", NEXT_HOP)
        self.assertEqual((policy.mode, policy.source, policy.label), ("dane", "file", "dane"))
        file = PolicyFile(["[smart.test]:25 dane"])
        policies = TLSPolicies(default, policy_file=file, lookup=FakeLookup(), sts=FakeSTS())
        self.assertIs(self.choose(policies, "smart.test:25", NEXT_HOP), default)

    def test_mta_sts_modes(self) -> None:
        """
        C{enforce}: an MX host the policy names gets C{verify} (from
        MTA-STS); one it does not name is refused before connecting.
        C{testing}: enforced never, the mismatch noted.  C{none}: the default.
        """
        default = TLSPolicy()
        policies = TLSPolicies(default, sts=FakeSTS(sts("enforce", "*.example.test")))
        policy = self.choose(policies, "mx.example.test:25", UNSIGNED_MX)
        self.assertEqual((policy.mode, policy.source, policy.label, policy.enforced),
                         ("verify", "mta-sts", "mta-sts", True))  # fmt: skip
        outcome = self.refused(policies, "mx.elsewhere.test:25", UNSIGNED_MX)
        self.assertEqual((outcome.policy, outcome.result), ("mta-sts", "validation-failure"))
        policies = TLSPolicies(default, sts=FakeSTS(sts("testing", "*.example.test")))
        policy = self.choose(policies, "mx.example.test:25", UNSIGNED_MX)
        self.assertEqual((policy.mode, policy.enforced, policy.required), ("verify", False, False))
        policy = self.choose(policies, "mx.elsewhere.test:25", UNSIGNED_MX)
        self.assertEqual((policy.mode, policy.label), ("may", "mta-sts"))
        self.assertEqual(policy.note and policy.note[0], "validation-failure")
        policies = TLSPolicies(default, sts=FakeSTS(sts("none")))
        self.assertIs(self.choose(policies, "mx.example.test:25", UNSIGNED_MX), default)

    def test_mta_sts_problem_noted(self) -> None:
        """
        An MTA-STS policy that could not be fetched, with none cached, is
        noted on the default policy (the attempt records it).
        """
        problem = STSResult(None, ("sts-policy-fetch-error", "host down"))
        policies = TLSPolicies(TLSPolicy(), sts=FakeSTS(problem))
        policy = self.choose(policies, "mx.example.test:25", UNSIGNED_MX)
        self.assertEqual((policy.mode, policy.note), ("may", ("sts-policy-fetch-error", "host down")))

    def test_tls_destination(self) -> None:
        """
        The scheduler's destination for a route: the route's, with the
        plugin's choice.
        """
        from relay.delivery.nexthop import Route

        route = Route((), ("h:25",), destination=MX)
        self.assertIs(tls_destination(route, None), MX)
        self.assertEqual(tls_destination(route, "encrypt"), Destination("example.test", True, "encrypt"))
        self.assertIsNone(tls_destination(Route((), ("h:25",)), None))
        self.assertEqual(tls_destination(Route((), ("h:25",)), "may"), Destination(None, chosen="may"))


class CollectorTests(SynchronousTestCase):
    """
    The metrics of TLS.
    """

    def test_families(self) -> None:
        """
        Sessions by policy, source and result; failures by policy and
        TLS-RPT result type; MTA-STS problems by result type.
        """
        from prometheus_client import CollectorRegistry, generate_latest

        counts = TLSCounts()
        counts.count(TLSOutcome("dane", "dane", "ok"))
        counts.count(TLSOutcome("mta-sts", "mta-sts", "certificate-host-mismatch", "x"))
        counts.count(TLSOutcome("mta-sts", "mta-sts", "certificate-host-mismatch", "y"))
        counts.sts_problem("sts-policy-fetch-error")
        registry = CollectorRegistry()
        registry.register(TLSCollector(counts))
        text = generate_latest(registry).decode()
        self.assertIn('relay_tls_sessions_total{policy="dane",result="ok",source="dane"} 1.0', text)
        self.assertIn(
            'relay_tls_failures_total{policy="mta-sts",result="certificate-host-mismatch"} 2.0', text
        )
        self.assertNotIn('relay_tls_failures_total{policy="dane"', text)
        self.assertIn('relay_mta_sts_problems_total{result="sts-policy-fetch-error"} 1.0', text)
