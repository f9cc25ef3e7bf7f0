"""
Tests for L{relay.tap}: the C{twistd relay} options.
"""

from __future__ import annotations

import os
import socket
import sys

from twisted.cred.credentials import UsernamePassword
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from relay.simple import Simple
from relay.tap import Options, auto_receivers, parse_retry_intervals, parse_smarthost
from relay.tap import makeService as tapMakeService


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


class TLSLoadedOnceTests(SynchronousTestCase):
    def test_tls_context_loaded_once(self) -> None:
        """
        The certificate and key are read once, when the options are
        checked: the relay serves that context.
        """
        from OpenSSL import crypto
        from twisted.internet import ssl

        from relay.app import build

        cert = ssl.KeyPair.generate(size=2048).selfSignedCert(1, CN="relay.test")
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        certfile, keyfile = os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")
        with open(certfile, "wb") as f:
            f.write(cert.dumpPEM())
        with open(keyfile, "wb") as f:
            f.write(cert.privateKey.dump(crypto.FILETYPE_PEM))
        loads: list[tuple[str, str]] = []
        original = build.load_tls_context

        def counting(cert_path: str, key_path: str) -> object:
            loads.append((cert_path, key_path))
            return original(cert_path, key_path)

        self.patch(build, "load_tls_context", counting)
        options = parse(
            "--tls-cert", certfile, "--tls-key", keyfile, "--hostname", "relay.test",
            "--spool", os.path.join(base, "spool"), "--quarantine", os.path.join(base, "q"),
            "--receivers", "0",
        )  # fmt: skip
        top = tapMakeService(options)
        self.assertIs(top.factory.settings.tls_context_factory, options["tls-context"])
        self.assertEqual(loads, [(certfile, keyfile)])


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
        """
        Not given, receivers are C{auto} (a process per core) when every
        listener can be shared with receiver processes, else none: a
        default never refuses a listener (given, it does).
        """
        self.assertEqual(parse()["receivers"], auto_receivers())
        self.assertEqual(parse("--smtp", "haproxy:tcp:2525")["receivers"], auto_receivers())
        self.assertEqual(parse("--smtp", "unix:/tmp/relay-smtp.sock")["receivers"], 0)
        self.assertEqual(
            parse("--smtp", "tcp:2525", "--smtp", "unix:/tmp/relay-smtp.sock")["receivers"], 0
        )
        self.assertEqual(parse("--receivers", "0")["receivers"], 0)
        with self.assertRaises(usage.UsageError) as cm:
            parse("--receivers", "2", "--smtp", "unix:/tmp/relay-smtp.sock")
        self.assertIn("--smtp with --receivers", str(cm.exception))

    def test_count(self) -> None:
        options = parse("--receivers", "2", "--smtp", "tcp:2525:interface=127.0.0.1",
                        "--smtp", "haproxy:tcp6:2526")  # fmt: skip
        self.assertEqual(options["receivers"], 2)

    def test_auto(self) -> None:
        """
        C{--receivers auto} is a receiver per core, and none (this process
        receives) on one core.
        """

        options = parse("--receivers", "auto", "--smtp", "tcp:2525:interface=127.0.0.1")
        self.assertEqual(options["receivers"], auto_receivers())
        self.assertEqual([auto_receivers(n) for n in (1, 2, 8)], [0, 2, 8])
        self.assertEqual(auto_receivers(0), 0)

    def test_bad_counts(self) -> None:
        for bad in ("-1", "x", "1.5", "", "automatic"):
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


class StartupErrorTests(SynchronousTestCase):
    """
    Every mistake that stops C{twistd relay} from starting ends it with one
    line naming the option or path and the cause, and a non-zero exit.
    """

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def exit_line(self, *argv: str) -> str:
        """
        Parse C{argv} as twistd does (with a parent) and build the service;
        the line C{SystemExit} carries (which Python prints, exit code 1).
        """
        argv = ("--spool", os.path.join(self.base, "spool"),
                "--quarantine", os.path.join(self.base, "quarantine"), *argv)  # fmt: skip
        options = Options()
        options.parent = usage.Options()  # as twistd's ServerOptions
        with self.assertRaises(SystemExit) as raised:
            options.parseOptions(list(argv))
            tapMakeService(options)
        code = raised.exception.code
        self.assertIsInstance(code, str)
        assert isinstance(code, str)
        self.assertNotIn("\n", code)
        return code

    def module(self, name: str, source: str) -> str:
        """
        Write module C{name} where imports find it, for this test only.
        """
        directory = os.path.join(self.base, "modules")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{name}.py"), "w") as f:
            f.write(source)
        sys.path.insert(0, directory)
        self.addCleanup(sys.path.remove, directory)
        self.addCleanup(sys.modules.pop, name, None)
        return name

    def test_unknown_option(self) -> None:
        """
        A misspelt option: one line, not twistd's usage text.
        """
        self.assertEqual(
            self.exit_line("--smarthots", "x"),
            "twistd relay: option --smarthots not recognized (twistd relay --help lists them)",
        )

    def test_bad_value(self) -> None:
        """
        A bad option value names the option.
        """
        self.assertEqual(
            self.exit_line("--max-sessions", "lots"),
            "twistd relay: --max-sessions must be a positive integer, not 'lots'",
        )

    def test_options_without_twistd(self) -> None:
        """
        Parsed outside twistd (no parent), a mistake stays a L{usage.UsageError}
        for the caller.
        """
        self.assertRaises(usage.UsageError, parse, "--smarthots", "x")

    def test_callbacks_no_module(self) -> None:
        """
        C{--callbacks} naming a module that does not exist says so.
        """
        self.assertEqual(
            self.exit_line("--callbacks", "nosuchmodule_xyz.Policy"),
            "twistd relay: --callbacks nosuchmodule_xyz.Policy: no module named 'nosuchmodule_xyz'",
        )
        self.assertEqual(
            self.exit_line("--callbacks", "relay.nosuchmodule.Policy"),
            "twistd relay: --callbacks relay.nosuchmodule.Policy: "
            "no module named 'relay.nosuchmodule'",
        )

    def test_callbacks_no_attribute(self) -> None:
        """
        C{--callbacks} naming an attribute the module lacks says which.
        """
        self.assertEqual(
            self.exit_line("--callbacks", "relay.simple.NoSuchPolicy"),
            "twistd relay: --callbacks relay.simple.NoSuchPolicy: "
            "module 'relay.simple' has no attribute 'NoSuchPolicy'",
        )

    def test_callbacks_raise_during_import(self) -> None:
        """
        A plugin module that raises while imported, or imports a module
        that is not installed, is told apart from a missing plugin module.
        """
        self.module("plugin_raises", "raise RuntimeError('no database')\n")
        self.assertEqual(
            self.exit_line("--callbacks", "plugin_raises.Policy"),
            "twistd relay: --callbacks plugin_raises.Policy: module 'plugin_raises' raised "
            "during import: RuntimeError: no database",
        )
        self.module("plugin_needs", "import nosuchdependency_xyz\n")
        self.assertEqual(
            self.exit_line("--callbacks", "plugin_needs.Policy"),
            "twistd relay: --callbacks plugin_needs.Policy: module 'plugin_needs' raised "
            "during import: ModuleNotFoundError: No module named 'nosuchdependency_xyz'",
        )

    def test_callbacks_raise_during_construction(self) -> None:
        """
        A plugin class whose construction or C{configure} raises is named,
        with the error.
        """
        self.module(
            "plugin_builds",
            "from relay import Simple\n"
            "class Broken(Simple):\n"
            "    def __init__(self):\n"
            "        raise ValueError('no API key')\n"
            "class Unconfigurable(Simple):\n"
            "    def configure(self, defaults):\n"
            "        raise KeyError('hostname')\n"
            "    def __repr__(self):\n"
            "        return '<Unconfigurable>'\n",
        )
        self.assertEqual(
            self.exit_line("--callbacks", "plugin_builds.Broken"),
            "twistd relay: --callbacks plugin_builds.Broken: plugin_builds.Broken raised "
            "during construction: ValueError: no API key",
        )
        self.assertEqual(
            self.exit_line("--callbacks", "plugin_builds.Unconfigurable"),
            "twistd relay: --callbacks plugin_builds.Unconfigurable: <Unconfigurable>.configure "
            "raised: KeyError: 'hostname'",
        )

    def test_plugin_in_current_directory(self) -> None:
        """
        A plugin module in the current directory is found, as twistd -y
        users expect, after the installed packages.
        """
        here = os.path.join(self.base, "here")
        os.makedirs(here)
        with open(os.path.join(here, "cwd_policy.py"), "w") as f:
            f.write("from relay import Simple\nclass Policy(Simple):\n    pass\n")
        self.addCleanup(os.chdir, os.getcwd())
        self.addCleanup(sys.modules.pop, "cwd_policy", None)
        saved = list(sys.path)
        self.addCleanup(sys.path.__setitem__, slice(None), saved)
        os.chdir(here)
        options = parse("--callbacks", "cwd_policy.Policy")
        self.assertEqual(options["callbacks"].__module__, "cwd_policy")
        self.assertEqual(sys.path[-1], here)

    def test_smarthost_not_a_host(self) -> None:
        """
        C{--smarthost} takes a host name, an IPv4 address or a bracketed
        IPv6 address, with an optional port, and nothing else.
        """
        self.assertEqual(
            self.exit_line("--smarthost", "::::"),
            "twistd relay: --smarthost: not an IP address in brackets: [::::]",
        )
        self.assertEqual(
            self.exit_line("--smarthost", "a b"),
            "twistd relay: --smarthost: not a host name, IPv4 address or bracketed IPv6 "
            "address: 'a b'",
        )
        for bad in ("-mx.example.com", "mx..example.com", "mx.example.com:25:25", "[mx]:25"):
            self.assertRaises(usage.UsageError, parse, "--smarthost", bad)
        self.assertEqual(parse("--smarthost", "192.0.2.1")["smarthost"], "192.0.2.1:25")
        self.assertEqual(parse("--smarthost", "mx_1.example.com.")["smarthost"], "mx_1.example.com.:25")

    def test_spool_created_private(self) -> None:
        """
        A missing spool directory is created with mode 0700 (parents too).
        """
        from relay.app.directories import prepare_directories

        spool = os.path.join(self.base, "var", "spool", "relay")
        prepare_directories(spool, os.path.join(self.base, "q"))
        self.assertEqual(os.stat(spool).st_mode & 0o777, 0o700)
        self.assertEqual(os.listdir(spool), [])

    def test_spool_not_a_directory(self) -> None:
        """
        A spool path that is a file, or under a file, is refused.
        """
        path = os.path.join(self.base, "file")
        with open(path, "w") as f:
            f.write("x")
        self.assertEqual(
            self.exit_line("--spool", path), f"twistd relay: --spool {path}: not a directory"
        )
        self.assertEqual(
            self.exit_line("--spool", os.path.join(path, "spool")),
            f"twistd relay: --spool {path}/spool: cannot create it: Not a directory",
        )

    def test_wrong_directory(self) -> None:
        """
        A directory that holds other things than a spool (or a quarantine)
        is refused, and nothing in it is touched.
        """
        home = os.path.join(self.base, "home")
        os.makedirs(os.path.join(home, "tmp"))
        with open(os.path.join(home, "tmp", "notes.txt"), "w") as f:
            f.write("mine")
        self.assertEqual(
            self.exit_line("--spool", home),
            f"twistd relay: --spool {home}: not a relay spool (it holds tmp); "
            "give a new or empty directory",
        )
        self.assertEqual(os.listdir(home), ["tmp"])
        self.assertEqual(os.listdir(os.path.join(home, "tmp")), ["notes.txt"])
        self.assertEqual(
            self.exit_line("--quarantine", home),
            f"twistd relay: --quarantine {home}: not a relay quarantine (it holds tmp); "
            "give a new or empty directory",
        )
        spool = os.path.join(self.base, "spool")
        self.assertEqual(
            self.exit_line("--quarantine", spool),
            f"twistd relay: --quarantine {spool}: must not be the spool directory",
        )

    def test_spool_not_writable(self) -> None:
        """
        A spool that cannot be written to (read-only filesystem, wrong
        owner) is reported with the system's reason.
        """
        import errno

        from relay.app import directories

        def refuse(directory: str) -> None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), directory)

        self.patch(directories, "_write_probe", refuse)
        spool = os.path.join(self.base, "spool")
        self.assertEqual(
            self.exit_line(), f"twistd relay: --spool {spool}: not writable: Read-only file system"
        )

    def test_spool_in_use(self) -> None:
        """
        A spool held by another relay names the holder's pid, and its
        entries are not touched.
        """
        from twisted.internet.task import Clock

        from relay.spool.disk import DiskSpool

        spool = os.path.join(self.base, "spool")
        holder = DiskSpool(spool, lambda f, *a: f(*a), Clock())
        holder.lock()
        self.addCleanup(holder.unlock)
        self.assertEqual(
            self.exit_line(),
            f"twistd relay: spool {spool} is in use by another relay (pid {os.getpid()})",
        )


class TwistdEntryTests(SynchronousTestCase):
    """
    What C{twistd relay} runs: the drop-in names L{relay.app.twistd}.
    """

    def test_drop_in(self) -> None:
        """
        The drop-in's C{relay} service maker takes L{relay.tap}'s options
        and makes its service with L{relay.app.twistd.makeService}.
        """
        import relay.app.twistd
        from twisted.plugins.relay_plugin import relay as maker

        self.assertEqual(maker.tapname, "relay")
        self.assertIs(maker.options, Options)
        self.assertEqual(maker.module, "relay.app.twistd")
        self.assertIs(relay.app.twistd.Options, Options)

    def test_process_only_steps(self) -> None:
        """
        L{relay.app.twistd.makeService} is L{relay.tap.makeService} plus
        what only the relay's own process does: the text log's time stamps
        cached, the heap settled once the reactor runs.
        """
        from twisted.internet import reactor

        import relay.app.twistd
        from relay import tap
        from relay.app import _compat, heap

        made: list[object] = []
        scheduled: list[object] = []
        cached: list[bool] = []
        sentinel = object()
        self.patch(tap, "makeService", lambda options: made.append(options) or sentinel)
        self.patch(reactor, "callWhenRunning", lambda f, *a, **kw: scheduled.append(f))
        self.patch(_compat, "cache_log_times", lambda: cached.append(True))
        options = Options()
        self.assertIs(relay.app.twistd.makeService(options), sentinel)
        self.assertEqual(made, [options])
        self.assertEqual(scheduled, [heap.settle_startup_heap])
        self.assertEqual(cached, [True])
