"""
The options of TLS towards next hops (C{--resolver}, C{--dnssec},
C{--tls-ca-file}, C{--tls-policy}, C{--mx-port}) from the command line to
the relay client, and the TLS outcome of attempts in the spool entry and
the delivery line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from relay.app.settings import Settings, SettingsError
from relay.logs import SENT, delivery_fields, delivery_format
from relay.model.entry import Attempt, TLSOutcome, entry_for
from relay.model.envelope import EnvelopeWithNextHop
from relay.spool.codec import decode_entry, encode_entry, entry_from_json, entry_to_json
from relay.tap import Options
from relay.testing import make_envelope
from tests.pki import pki


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    """
    The new options of C{twistd relay}.
    """

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.ca = os.path.join(self.base, "ca.pem")
        pki().write_root(self.ca)
        self.policy = os.path.join(self.base, "tls-policy")
        with open(self.policy, "w") as f:
            f.write("example.test dane-only\n")

    def test_options_to_settings(self) -> None:
        """
        Each option reaches L{Settings}; resolvers keep their order and
        default to port 53; the defaults are the system's resolver, no
        DNSSEC, no file, port 25.
        """
        options = parse(
            "--resolver", "127.0.0.1:5353", "--resolver", "::1", "--dnssec",
            "--tls-ca-file", self.ca, "--tls-policy", self.policy, "--mx-port", "2525",
        )  # fmt: skip
        settings = Settings.from_options(options)
        self.assertEqual(settings.resolver, ("127.0.0.1:5353", "[::1]:53"))
        self.assertEqual(
            (settings.dnssec, settings.tls_ca_file, settings.tls_policy, settings.mx_port),
            (True, self.ca, self.policy, 2525),
        )
        again = Settings.from_json(json.loads(json.dumps(settings.to_json())))
        self.assertEqual(again, dataclasses.replace(settings, callbacks="relay.simple.Simple"))
        defaults = Settings.from_options(parse())
        self.assertEqual(
            (defaults.resolver, defaults.dnssec, defaults.tls_ca_file, defaults.tls_policy,
             defaults.mx_port), ((), False, None, None, 25),
        )  # fmt: skip

    def test_bad_options(self) -> None:
        """
        One clear line for each mistake: DNSSEC trusted of no declared
        resolver, a resolver that is not an address, a CA file missing or
        without a certificate, a policy file with a bad line (named), a bad
        port.
        """
        bad_ca = os.path.join(self.base, "bad.pem")
        with open(bad_ca, "w") as f:
            f.write("not a certificate\n")
        bad_policy = os.path.join(self.base, "bad-policy")
        with open(bad_policy, "w") as f:
            f.write("# fine\nexample.test sometimes\n")
        for argv, words in (
            (["--dnssec"], "--dnssec needs --resolver"),
            (["--resolver", "dns.example"], "--resolver"),
            (["--tls-ca-file", self.ca + ".missing"], "--tls-ca-file: no such file"),
            (["--tls-ca-file", bad_ca], "--tls-ca-file"),
            (["--tls-policy", bad_policy], f"{bad_policy}:2"),
            (["--mx-port", "0"], "--mx-port"),
        ):
            with self.assertRaises(usage.UsageError) as caught:
                parse(*argv)
            self.assertIn(words, str(caught.exception))

    def test_settings_checks(self) -> None:
        """
        L{Settings} (what a .tac file gives) checks the same.
        """
        self.assertRaises(SettingsError, Settings, dnssec=True, hostname="relay.test")
        self.assertRaises(SettingsError, Settings, resolver=["nowhere"], hostname="relay.test")
        self.assertEqual(Settings(resolver="127.0.0.1", hostname="relay.test").resolver, ("127.0.0.1",))


class BuildTests(SynchronousTestCase):
    """
    L{relay.app.build} makes the client's DNS and policies from settings.
    """

    def settings(self, **kwargs: Any) -> Settings:
        base = os.path.abspath(self.mktemp())
        return Settings(spool=os.path.join(base, "spool"), hostname="relay.test", **kwargs)

    def test_default_dns(self) -> None:
        """
        Without --resolver: the system's resolver, made on first use only,
        and the reactor's name resolver; no DANE.
        """
        from relay.app.build import dns_lookup, tls_policies
        from relay.delivery.dns import ResolverLookup

        settings = self.settings()
        lookup, name_resolver = dns_lookup(settings, MemoryReactorClock())
        self.assertIsInstance(lookup, ResolverLookup)
        self.assertIsNone(lookup._resolver)
        self.assertIsNone(name_resolver)
        policies = tls_policies(settings, MemoryReactorClock(), lambda f, *a: f(*a), lookup)
        self.assertIsNone(policies._lookup)
        self.assertEqual(policies.default.mode, "may")

    def test_resolver_dns(self) -> None:
        """
        With --resolver and --dnssec: the DNS client trusting AD, which
        also resolves the hops' names; DANE possible; the policy file read.
        """
        from relay.app.build import dns_lookup, tls_policies
        from relay.delivery.dns import DNSClient, NamesHostnameResolver

        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("[smart.test]:587 verify\n")
        settings = self.settings(resolver=("127.0.0.1:5353",), dnssec=True, tls_policy=path)
        lookup, name_resolver = dns_lookup(settings, MemoryReactorClock())
        self.assertIsInstance(lookup, DNSClient)
        self.assertEqual((lookup._servers, lookup._trust_ad), ((("127.0.0.1", 5353),), True))
        self.assertIsInstance(name_resolver, NamesHostnameResolver)
        policies = tls_policies(settings, MemoryReactorClock(), lambda f, *a: f(*a), lookup)
        self.assertIs(policies._lookup, lookup)
        assert policies.file is not None
        self.assertEqual(policies.file.for_hop("smart.test", 587).name, "verify")

    def test_metrics_collector_registered(self) -> None:
        """
        With --metrics the TLS counters are in the relay's registry.
        """
        from prometheus_client import generate_latest

        from relay.app.directories import prepare_directories
        from relay.delivery.tlspolicy import TLSCounts
        from relay.service import makeService

        base = os.path.abspath(self.mktemp())
        spool, quarantine = os.path.join(base, "spool"), os.path.join(base, "quarantine")
        prepare_directories(spool, quarantine)
        relay = makeService(
            reactor=MemoryReactorClock(), spool=spool, quarantine=quarantine, control="",
            smtp=["tcp:0:interface=127.0.0.1"], metrics="tcp:0:interface=127.0.0.1",
            hostname="relay.test",
        )  # fmt: skip
        counts = relay.delivery.client.tls_counts
        self.assertIsInstance(counts, TLSCounts)
        counts.count(TLSOutcome("dane", "dane", "validation-failure", "no match"))
        text = generate_latest(relay.metrics.registry).decode()
        self.assertIn('relay_tls_failures_total{policy="dane",result="validation-failure"} 1.0', text)


class RecordTests(SynchronousTestCase):
    """
    The TLS outcome of an attempt, and the plugin's policy, in the entry
    and in the delivery line.
    """

    def entry(self) -> Any:
        envelope = EnvelopeWithNextHop(make_envelope("a@example.org", "b@example.com"),
                                       tls_policy="verify match=mx.example.com")  # fmt: skip
        entry = entry_for("e1-0", "active", envelope, 100.0)
        tls = TLSOutcome("mta-sts", "mta-sts", "certificate-host-mismatch", "names mx9.example.com")
        attempt = Attempt(101.0, "mx.example.com:25", 454, "454 4.7.5 no", ("b@example.com",),
                          ("192.0.2.1", 25), tls)  # fmt: skip
        return entry.with_attempts([attempt])

    def test_round_trip(self) -> None:
        """
        The outcome and the plugin's policy survive the file and the JSON
        form (what C{relayctl show} reads).
        """
        entry = self.entry()
        self.assertEqual(entry.tls_policy, "verify match=mx.example.com")
        self.assertEqual(decode_entry(encode_entry(entry)), entry)
        data = entry_to_json(entry)
        self.assertEqual(
            data["attempts"][0]["tls"],
            {"policy": "mta-sts", "source": "mta-sts", "result": "certificate-host-mismatch",
             "detail": "names mx9.example.com"},
        )  # fmt: skip
        self.assertEqual(data["tls_policy"], "verify match=mx.example.com")

    def test_older_entries(self) -> None:
        """
        Entries written before attempts recorded TLS read with none.
        """
        data = entry_to_json(self.entry())
        del data["attempts"][0]["tls"]
        del data["tls_policy"]
        entry = entry_from_json(data)
        self.assertIsNone(entry.attempts[0].tls)
        self.assertIsNone(entry.tls_policy)
        self.assertEqual(entry, dataclasses.replace(
            self.entry(), tls_policy=None,
            attempts=(dataclasses.replace(self.entry().attempts[0], tls=None),),
        ))  # fmt: skip

    def test_delivery_line(self) -> None:
        """
        The line says C{tls=POLICY/SOURCE/RESULT} before the status, and
        the structured fields hold the detail; without TLS, as before.
        """
        from twisted.logger import formatEvent

        entry = self.entry()
        fields = delivery_fields(entry, entry.attempts[0], SENT)
        self.assertEqual(
            (fields["tls_policy"], fields["tls_source"], fields["tls_result"], fields["tls_detail"]),
            ("mta-sts", "mta-sts", "certificate-host-mismatch", "names mx9.example.com"),
        )
        text = formatEvent(dict(fields, log_format=delivery_format(fields)))
        self.assertIn(", tls=mta-sts/mta-sts/certificate-host-mismatch, status=sent (", text)
        plain = dataclasses.replace(entry.attempts[0], tls=None)
        fields = delivery_fields(entry, plain, SENT)
        self.assertNotIn("tls_policy", fields)
        self.assertNotIn("tls=", formatEvent(dict(fields, log_format=delivery_format(fields))))
