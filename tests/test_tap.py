"""
Tests for L{relay.tap}: the C{twistd relay} options.
"""

from __future__ import annotations

import socket

from twisted.cred.credentials import UsernamePassword
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from relay.simple import Simple
from relay.tap import Options, parse_retry_intervals, parse_smarthost


class Policy(Simple):
    """A plugin for --callbacks."""


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsDefaultsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["smtp"], ["tcp:8025:interface=127.0.0.1"])
        self.assertEqual(options["spool"], "spool")
        self.assertEqual(options["quarantine"], "quarantine")
        self.assertEqual(options["control"], "unix:./spool/control.sock")
        self.assertIs(options["callbacks"], Simple)
        self.assertIsNone(options["smarthost"])
        self.assertEqual(options["retry-intervals"], ())
        self.assertEqual(options["max-message-size"], 35_000_000)
        self.assertEqual(options["max-recipients"], 1000)
        self.assertEqual(options["max-sessions"], 1000)
        self.assertEqual(options["max-send-jobs"], 10)
        self.assertEqual(options["hostname"], socket.getfqdn())
        self.assertIsNone(options["tls-cert"])
        self.assertIsNone(options["tls-key"])
        self.assertEqual(options["relay-tls"], "may")
        self.assertIsNone(options["checker"])
        self.assertEqual(options["idle-timeout"], 300.0)
        self.assertFalse(options["reject-bare-lf"])
        self.assertFalse(options["allow-auth-without-tls"])
        self.assertFalse(options["no-bounce"])


class OptionsTests(SynchronousTestCase):
    def test_every_option(self) -> None:
        options = parse(
            "--smtp", "tcp:2525:interface=127.0.0.1",
            "--smtp", "unix:/tmp/relay.sock",
            "--spool", "/var/spool/relay",
            "--quarantine", "/var/spool/q",
            "--control", "unix:/tmp/control.sock",
            "--callbacks", f"{__name__}.Policy",
            "--smarthost", "mail.example.com",
            "--retry-intervals", "30,1m,2h,1d,10s",
            "--max-message-size", "1000",
            "--max-recipients", "5",
            "--max-sessions", "7",
            "--max-send-jobs", "3",
            "--hostname", "relay.example.com",
            "--relay-tls", "verify",
            "--idle-timeout", "1.5",
            "--reject-bare-lf",
            "--allow-auth-without-tls",
            "--no-bounce",
        )  # fmt: skip
        self.assertEqual(options["smtp"], ["tcp:2525:interface=127.0.0.1", "unix:/tmp/relay.sock"])
        self.assertEqual(options["spool"], "/var/spool/relay")
        self.assertEqual(options["quarantine"], "/var/spool/q")
        self.assertEqual(options["control"], "unix:/tmp/control.sock")
        self.assertIs(options["callbacks"], Policy)
        self.assertEqual(options["smarthost"], "mail.example.com:25")
        self.assertEqual(options["retry-intervals"], (30, 60, 7200, 86400, 10))
        self.assertEqual(options["max-message-size"], 1000)
        self.assertEqual(options["max-recipients"], 5)
        self.assertEqual(options["max-sessions"], 7)
        self.assertEqual(options["max-send-jobs"], 3)
        self.assertEqual(options["hostname"], "relay.example.com")
        self.assertEqual(options["relay-tls"], "verify")
        self.assertEqual(options["idle-timeout"], 1.5)
        self.assertTrue(options["reject-bare-lf"])
        self.assertTrue(options["allow-auth-without-tls"])
        self.assertTrue(options["no-bounce"])

    def test_smarthost_forms(self) -> None:
        self.assertEqual(parse_smarthost("mx.example.com:2525"), "mx.example.com:2525")
        self.assertEqual(parse_smarthost("10.0.0.1"), "10.0.0.1:25")
        self.assertEqual(parse_smarthost("[::1]:587"), "[::1]:587")
        self.assertEqual(parse_smarthost("[::1]"), "[::1]:25")
        self.assertEqual(parse_smarthost("::1"), "[::1]:25")

    def test_retry_intervals_units(self) -> None:
        self.assertEqual(parse_retry_intervals("1m,5m"), (60, 300))
        self.assertEqual(parse_retry_intervals("2H, 1D"), (7200, 86400))
        self.assertEqual(parse_retry_intervals("0.5s"), (0.5,))

    def test_auth_memory_gives_checker(self) -> None:
        options = parse("--auth", "memory:alice:secret")
        checker = options["checker"]
        self.assertIsNotNone(checker)
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        self.assertEqual(self.successResultOf(d), b"alice")
        d = checker.requestAvatarId(UsernamePassword(b"alice", b"wrong"))
        self.failureResultOf(d)

    def test_tls_files(self) -> None:
        from OpenSSL import crypto
        from twisted.internet import ssl

        cert = ssl.KeyPair.generate(size=2048).selfSignedCert(1, CN="relay.test")
        certfile, keyfile = self.mktemp(), self.mktemp()
        with open(certfile, "wb") as f:
            f.write(cert.dumpPEM())
        with open(keyfile, "wb") as f:
            f.write(cert.privateKey.dump(crypto.FILETYPE_PEM))
        options = parse("--tls-cert", certfile, "--tls-key", keyfile)
        self.assertEqual(options["tls-cert"], certfile)
        self.assertIsNotNone(options["tls-context"].getContext())


class BadOptionsTests(SynchronousTestCase):
    def assertBad(self, name: str, *argv: str) -> None:
        with self.assertRaises(usage.UsageError) as cm:
            parse(*argv)
        self.assertIn(name, str(cm.exception))

    def test_numbers(self) -> None:
        for name in (
            "max-message-size",
            "max-recipients",
            "max-sessions",
            "max-send-jobs",
            "idle-timeout",
        ):
            for bad in ("0", "-1", "many", "", "nan"):
                self.assertBad(f"--{name}", f"--{name}", bad)
        for name in ("max-message-size", "max-recipients", "max-sessions", "max-send-jobs"):
            self.assertBad(f"--{name}", f"--{name}", "1.5")

    def test_callbacks(self) -> None:
        self.assertBad("--callbacks", "--callbacks", "no.such.module.Thing")
        self.assertBad("--callbacks", "--callbacks", "relay.simple.NoSuchThing")

    def test_retry_intervals(self) -> None:
        for bad in ("1x", "", "1m,,5m", "-5", "0", "m", "1m,"):
            self.assertBad("--retry-intervals", "--retry-intervals", bad)

    def test_smarthost(self) -> None:
        for bad in ("host:port", "host:0", "host:70000", "[::1", "[::1]x", ":25", ""):
            self.assertBad("--smarthost", "--smarthost", bad)

    def test_relay_tls(self) -> None:
        self.assertBad("--relay-tls", "--relay-tls", "sometimes")

    def test_hostname(self) -> None:
        self.assertBad("--hostname", "--hostname", " ")

    def test_smtp(self) -> None:
        self.assertBad("--smtp", "--smtp", "")
        self.assertBad("--smtp", "--smtp", "tcp:notaport")
        self.assertBad("--smtp", "--smtp", "tcp:25:interface=::1")

    def test_tls_pair(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x")
        self.assertBad("--tls-key", "--tls-cert", path)
        self.assertBad("--tls-cert", "--tls-key", path)
        self.assertBad("--tls-cert", "--tls-cert", "/no/such/cert", "--tls-key", path)
        self.assertBad("--tls-key", "--tls-cert", path, "--tls-key", "/no/such/key")
        self.assertBad("--tls-cert", "--tls-cert", path, "--tls-key", path)

    def test_auth(self) -> None:
        self.assertBad("auth", "--auth", "nosuchchecker:x")


class ReceiversOptionTests(SynchronousTestCase):
    def test_default(self) -> None:
        self.assertEqual(parse()["receivers"], 0)

    def test_count(self) -> None:
        options = parse("--receivers", "2", "--smtp", "tcp:2525:interface=127.0.0.1",
                        "--smtp", "haproxy:tcp6:2526")  # fmt: skip
        self.assertEqual(options["receivers"], 2)

    def test_bad_counts(self) -> None:
        for bad in ("-1", "x", "1.5", ""):
            with self.assertRaises(usage.UsageError) as raised:
                parse("--receivers", bad)
            self.assertIn("--receivers", str(raised.exception))

    def test_endpoint_receivers_cannot_share(self) -> None:
        with self.assertRaises(usage.UsageError) as raised:
            parse("--receivers", "1", "--smtp", "unix:/tmp/relay.sock")
        self.assertIn("--smtp with --receivers", str(raised.exception))
        self.assertIn("only tcp:, tcp6: and haproxy:", str(raised.exception))
        # Without receivers the same endpoint is fine.
        self.assertEqual(parse("--smtp", "unix:/tmp/relay.sock")["smtp"], ["unix:/tmp/relay.sock"])

    def test_auth_descriptions_kept(self) -> None:
        options = parse("--auth", "memory:alice:secret")
        self.assertEqual(options["auth-descriptions"], ["memory:alice:secret"])
        self.assertEqual(parse()["auth-descriptions"], [])
