"""
Tests for the deployment examples in C{examples/}: what they tell an
operator to run must be a command relay accepts.
"""

from __future__ import annotations

import configparser
import os
import shlex

from twisted.python import reflect
from twisted.trial.unittest import SynchronousTestCase

from tests.pki import CertificateFiles

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def unit(name: str) -> configparser.RawConfigParser:
    """
    A systemd unit file, read as INI (continuation lines joined).
    """
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    with open(os.path.join(EXAMPLES, name)) as f:
        parser.read_string(f.read().replace("\\\n", " "))
    return parser


class SystemdUnitTests(SynchronousTestCase):
    """
    C{examples/relay.service} runs the relay as its own user, in the
    foreground, with JSON logs, and reloads with SIGHUP.
    """

    def setUp(self) -> None:
        self.service = unit("relay.service")["Service"]
        self.argv = shlex.split(self.service["ExecStart"])

    def test_service_settings(self) -> None:
        """
        A dedicated user, the spool as its working directory and only
        writable path, SIGHUP for reload, room for relay's 30 s of
        delivery at stop.
        """
        self.assertEqual(self.service["User"], "relay")
        self.assertEqual(self.service["WorkingDirectory"], "/var/spool/relay")
        self.assertEqual(self.service["ReadWritePaths"], "/var/spool/relay")
        self.assertEqual(self.service["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertGreater(int(self.service["TimeoutStopSec"]), 30)

    def test_exec_start_parses(self) -> None:
        """
        C{ExecStart} is a command line twistd and relay accept: foreground,
        no pid file, the JSON logger, the spool under /var/spool/relay.
        """
        from twisted.scripts.twistd import ServerOptions

        argv = self.argv[1:]
        self.assertTrue(self.argv[0].endswith("/bin/twistd"))
        self.assertIn("--nodaemon", argv)
        self.assertIn("--pidfile=", argv)
        logger = argv[argv.index("--logger") + 1]
        self.assertTrue(callable(reflect.namedAny(logger)))
        # What must exist on this machine: test TLS files, a plugin the
        # test can import.
        files = CertificateFiles(self).write()
        replace = {
            "/etc/relay/fullchain.pem": files.cert,
            "/etc/relay/privkey.pem": files.key,
            "mypolicy.Policy": "examples.policy.LocalPolicy",
        }
        options = ServerOptions()
        options.parseOptions([replace.get(arg, arg) for arg in argv])
        relay = options.subOptions
        self.assertEqual(options.subCommand, "relay")
        self.assertEqual(relay["spool"], "/var/spool/relay")
        self.assertEqual(relay["control"], "unix:/var/spool/relay/control.sock")
        self.assertEqual(
            relay["smtp"], ["tcp:25", "implicit-tls:465", "tcp:587"]
        )
