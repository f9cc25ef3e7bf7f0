"""
Tests for L{relay.app.settings.Settings}, the relay's configuration as one
value, and for what L{relay.app.endpoint} reads in endpoint descriptions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket

from twisted.trial.unittest import SynchronousTestCase

from relay.app.endpoint import kind, needs_tls
from relay.app.settings import Settings, SettingsError, tls_needed
from relay.simple import Simple
from relay.tap import Options


class Policy(Simple):
    """A plugin importable by name."""


class SettingsTests(SynchronousTestCase):
    """
    Defaults, normalisation and checks.
    """

    def test_defaults(self) -> None:
        """
        The defaults are those of C{twistd relay} with no options; the
        control socket goes in the spool, the host name is this host's.
        """
        settings = Settings()
        self.assertEqual(settings.smtp, ("tcp:8025:interface=127.0.0.1",))
        self.assertEqual(settings.control, "unix:./spool/control.sock")
        self.assertEqual(settings.hostname, socket.getfqdn())
        self.assertEqual(settings.callbacks, "relay.simple.Simple")
        self.assertEqual((settings.receivers, settings.relay_tls), (0, "may"))
        self.assertEqual(Settings(spool="/var/spool/r").control, "unix:/var/spool/r/control.sock")
        self.assertEqual(Settings(control="").control, "")

    def test_frozen_tuples(self) -> None:
        """
        Sequences given as lists (or one endpoint as a string) become
        tuples, and the value cannot be changed.
        """
        settings = Settings(
            smtp="tcp:25", retry_intervals=[60, 300], auth=["memory:a:b"], hostname="h"
        )
        self.assertEqual(
            (settings.smtp, settings.retry_intervals, settings.auth),
            (("tcp:25",), (60, 300), ("memory:a:b",)),
        )
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, settings, "spool", "x")
        self.assertEqual(hash(settings), hash(Settings(smtp=("tcp:25",), retry_intervals=(60, 300),
                                                       auth=("memory:a:b",), hostname="h")))

    def test_refused(self) -> None:
        """
        Settings that cannot work together are a L{SettingsError} (a
        L{ValueError}) saying why.
        """
        for kwargs, text in (
            (dict(tls_cert="c.pem"), "tls_cert and tls_key must be given together"),
            (dict(relay_tls="sometimes"), "relay_tls must be one of none, may"),
            (dict(receivers=-1), "receivers must be 0 or more"),
            (dict(receivers=2, callbacks=Policy()), "dotted name"),
        ):
            with self.assertRaises(SettingsError, msg=kwargs) as raised:
                Settings(**kwargs)  # type: ignore[arg-type]
            self.assertIn(text, str(raised.exception))
        self.assertRaises(TypeError, Settings, no_such_setting=1)

    def test_next_hop_choices(self) -> None:
        """
        The default route is the smarthost, or none.
        """
        self.assertEqual(Settings(smarthost="mx:25").next_hop_choices, ("mx:25",))
        self.assertEqual(Settings().next_hop_choices, ())

    def test_for_receivers(self) -> None:
        """
        Receivers get the plugin by name and absolute paths; the rest as it
        is (max_sessions too: each takes its share of it, rounded up).
        """
        settings = Settings(
            spool="sp", quarantine="q", callbacks=Policy, tls_cert="c.pem", tls_key="k.pem",
            max_sessions=10, receivers=3, hostname="relay.test",
        )  # fmt: skip
        shared = settings.for_receivers()
        self.assertEqual(shared.callbacks, f"{__name__}.Policy")
        self.assertEqual(shared.spool, os.path.abspath("sp"))
        self.assertEqual(shared.quarantine, os.path.abspath("q"))
        self.assertEqual((shared.tls_cert, shared.tls_key), (os.path.abspath("c.pem"), os.path.abspath("k.pem")))
        self.assertEqual((shared.max_sessions, shared.receivers), (10, 3))
        self.assertEqual(shared.hostname, "relay.test")
        from relay.app.receiver import session_share

        self.assertEqual(session_share(shared.max_sessions, shared.receivers), 4)

    def test_json_round_trip(self) -> None:
        """
        What the master sends is JSON, and makes the same settings again.
        """
        settings = Settings(
            smtp=("tcp:0", "haproxy:tcp6:0"), retry_intervals=(60.0, 300.0), auth=("memory:a:b",),
            smarthost="mx:25", hostname="relay.test", receivers=2, metrics="tcp:9025",
        )  # fmt: skip
        data = json.loads(json.dumps(settings.to_json()))
        self.assertEqual(Settings.from_json(data), settings)
        self.assertRaises(SettingsError, Settings(callbacks=Policy()).to_json)

    def test_from_options(self) -> None:
        """
        Every option reaches its setting; the opposite flags are said
        positively.
        """
        options = Options()
        options.parseOptions([
            "--smtp", "tcp:2525:interface=127.0.0.1", "--spool", "/s", "--quarantine", "/q",
            "--control", "unix:/c.sock", "--callbacks", f"{__name__}.Policy",
            "--smarthost", "mx.example.com", "--retry-intervals", "1m,1h",
            "--max-message-size", "1000", "--max-recipients", "5", "--max-sessions", "7",
            "--max-send-jobs", "3", "--hostname", "relay.example.com", "--relay-tls", "verify",
            "--idle-timeout", "1.5", "--reject-bare-lf", "--allow-auth-without-tls",
            "--no-bounce", "--metrics", "tcp:9025:interface=127.0.0.1",
            "--auth", "memory:alice:secret", "--receivers", "0",
        ])  # fmt: skip
        self.assertEqual(
            Settings.from_options(options),
            Settings(
                smtp=("tcp:2525:interface=127.0.0.1",), spool="/s", quarantine="/q",
                control="unix:/c.sock", callbacks=Policy, smarthost="mx.example.com:25",
                retry_intervals=(60, 3600), max_message_size=1000, max_recipients=5,
                max_sessions=7, max_send_jobs=3, hostname="relay.example.com",
                relay_tls="verify", auth=("memory:alice:secret",), idle_timeout=1.5,
                reject_bare_lf=True, auth_requires_tls=False, bounce=False,
                metrics="tcp:9025:interface=127.0.0.1",
            ),
        )  # fmt: skip

    def test_from_options_receivers_by_name(self) -> None:
        """
        With receivers the plugin goes by the name it was given.
        """
        options = Options()
        options.parseOptions(["--receivers", "2", "--callbacks", f"{__name__}.Policy"])
        settings = Settings.from_options(options)
        self.assertEqual((settings.receivers, settings.callbacks), (2, f"{__name__}.Policy"))


class TLSNeededTests(SynchronousTestCase):
    """
    When pyOpenSSL is needed from the start.
    """

    def test_endpoints(self) -> None:
        """
        Plain endpoints (behind C{haproxy:} too) do without; C{ssl:},
        C{implicit-tls:} and types relay does not know need it.
        """
        self.assertEqual(kind("haproxy:TCP6:25"), "tcp6")
        for plain in ("tcp:25", "tcp6:25", "unix:/s", "systemd:domain=INET:index=0", "haproxy:tcp:25"):
            self.assertFalse(needs_tls(plain), plain)
        for tls in ("ssl:465", "implicit-tls:465", "haproxy:implicit-tls:465", "le:/certs:tcp:443"):
            self.assertTrue(needs_tls(tls), tls)

    def test_settings(self) -> None:
        """
        A certificate, or any endpoint that needs TLS (SMTP, control or
        metrics), makes the relay need it; outgoing TLS does not.
        """
        self.assertFalse(Settings(relay_tls="verify").needs_tls)
        self.assertTrue(Settings(tls_cert="c", tls_key="k").needs_tls)
        self.assertTrue(Settings(smtp=("tcp:25", "ssl:465")).needs_tls)
        self.assertTrue(Settings(metrics="ssl:9025").needs_tls)
        self.assertFalse(Settings(control="").needs_tls)
        self.assertFalse(tls_needed(None, ["tcp:25", None, ""]))
