"""
Interop with real MTAs, everything on loopback (C{make interop}).

Real C{twistd relay} processes talk to:

  - a private Postfix instance (its own configuration, queue and data
    directories in a temporary directory; the system Postfix is never
    configured or started): Postfix relays to relay over STARTTLS (with and
    without SASL AUTH), and relay delivers to Postfix, which stores the
    message in a maildir: in BDAT chunks (Postfix offers CHUNKING), and
    with DATA when Postfix is told not to offer it;
  - Exim (Debian's package unpacked by C{make exim}, never installed: it
    conflicts with postfix) as a client only, with its own configuration:
    its smtp transport sends BDAT to relay, which offers CHUNKING;
  - a client on a plain socket sending pipelined BDAT chunks (whatever
    else is installed);
  - swaks: STARTTLS, AUTH PLAIN and AUTH LOGIN (a wrong password is
    refused), PIPELINING and 8-bit bodies, and PROXY protocol v1 and v2
    headers to relay's C{haproxy:} listener;
  - Python's L{smtplib}: SMTPUTF8 addresses and C{BODY=8BITMIME}.

Relay delivers to a recording sink in this process (relay's own
L{SMTPServerFactory} with a consuming policy) unless Postfix is the next
hop.  External programs run through the reactor's process API; each is
stopped at cleanup and each wait is bounded.
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import socket
import sys
import tempfile
from typing import Any, Sequence

from twisted.internet import error, protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from relay.delivery.client_body import CHUNK_SIZE
from tests import test_integration as integration
from tests.test_integration import (
    ROOT,
    TIMEOUT,
    SinkCallbacks,
    files_under,
    free_port,
    listening,
)

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
SWAKS = shutil.which("swaks") or "/usr/bin/swaks"
# Where `make exim` unpacks Debian's exim4-daemon-light (and libidn12).
EXIM_ROOT = os.environ.get("RELAY_EXIM_ROOT", os.path.join(ROOT, "build", "exim"))
# How long one external command (swaks, postfix start/stop) may take.
COMMAND_TIMEOUT = 60.0

SENDER = "alice@example.com"
RECIPIENT = "bob@example.net"


def make_certificate(directory: str) -> tuple[str, str]:
    """
    Write a self-signed certificate for C{localhost} and C{127.0.0.1} and
    its key as PEM files in C{directory}; return their paths.
    """
    from tests.pki import certificate

    pem = certificate("localhost", "127.0.0.1")
    split = pem.index(b"-----BEGIN", pem.index(b"-----END CERTIFICATE-----"))
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(pem[:split])
    with open(key_path, "wb") as f:
        f.write(pem[split:])
    os.chmod(key_path, 0o600)
    return cert_path, key_path


class Child(protocol.ProcessProtocol):
    """
    A child process whose output goes to a file: a L{Deferred} that fires
    with its exit code (minus the signal that killed it) when it has ended.
    """

    def __init__(self) -> None:
        self.code: int | None = None
        self.ended: Deferred[int | None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        value = reason.value
        if isinstance(value, error.ProcessTerminated) and value.exitCode is None:
            self.code = -(value.signal or 0)
        else:
            self.code = getattr(value, "exitCode", 0) or 0
        self.ended.callback(self.code)

    @property
    def running(self) -> bool:
        return not self.ended.called

    def signal(self, name: str) -> None:
        if self.running and self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass


def env_with_root() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


class InteropCase(TestCase):
    """
    Starts and stops the pieces: the sink, relays, Postfix, commands.
    """

    timeout = 4 * TIMEOUT

    def setUp(self) -> Any:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.cert, self.key = make_certificate(self.base)

    # -- waiting ------------------------------------------------------------

    poll = integration.TwistdRelayTests.poll

    # -- processes ------------------------------------------------------------

    def spawn(self, argv: Sequence[str], output: str, env: dict[str, str] | None = None) -> Child:
        """
        Start C{argv} with its stdout and stderr appended to the file
        C{output}.  It is stopped at cleanup if it is still running.
        """
        child = Child()
        with open(output, "ab") as out:
            reactor.spawnProcess(
                child, argv[0], list(argv), env=env if env is not None else env_with_root(),
                path=self.base, childFDs={0: "w", 1: out.fileno(), 2: out.fileno()},
            )  # fmt: skip
        assert child.transport is not None
        child.transport.closeStdin()
        self.addCleanup(self.stop, child)
        return child

    @inlineCallbacks
    def stop(self, child: Child, grace: float = TIMEOUT / 3) -> Any:
        """
        Stop C{child}: SIGTERM, then SIGKILL after C{grace} seconds.
        """
        if not child.running:
            return
        child.signal("TERM")
        done = yield self.wait(child, grace)
        if not done:
            child.signal("KILL")
            yield self.wait(child, grace)

    def wait(self, child: Child, timeout: float) -> Deferred[bool]:
        """
        Wait up to C{timeout} seconds for C{child} to end; is it done?
        """
        done: Deferred[bool] = Deferred()
        if not child.running:
            done.callback(True)
            return done

        def out_of_time() -> None:
            if not done.called:
                done.callback(False)

        call = reactor.callLater(timeout, out_of_time)

        def ended(result: Any) -> Any:
            if call.active():
                call.cancel()
            if not done.called:
                done.callback(True)
            return result

        child.ended.addBoth(ended)
        return done

    @inlineCallbacks
    def command(
        self,
        argv: Sequence[str],
        timeout: float = COMMAND_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> Any:
        """
        Run C{argv} to completion (killed after C{timeout} seconds); return
        its output (stdout and stderr, as text) and exit code.  The output
        goes through a file, not a pipe: a daemon that the command starts
        (Postfix's master) may keep its descriptors.
        """
        self.commands = getattr(self, "commands", 0) + 1
        output = os.path.join(self.base, f"command-{self.commands}.out")
        child = self.spawn(argv, output=output, env=env)
        done = yield self.wait(child, timeout)
        if not done:
            yield self.stop(child, 5.0)
            self.fail(f"{argv[0]} did not finish in {timeout}s:\n{self.read(output)}")
        return self.read(output), child.code

    # -- the sink --------------------------------------------------------------

    start_sink = integration.TwistdRelayTests.start_sink

    # -- relay ----------------------------------------------------------------

    @inlineCallbacks
    def start_relay(self, name: str, smarthost: str, *extra: str, certificate: bool = True) -> Any:
        """
        Start C{twistd -n relay} with STARTTLS (this test's certificate,
        unless not C{certificate}), AUTH for alice (password C{secret}) and
        C{smarthost} as its next hop; wait until it listens and return its
        port.
        """
        port = free_port()
        directory = os.path.join(self.base, name)
        os.makedirs(directory)
        output = os.path.join(self.base, f"{name}.log")
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "relay",
            "--smtp", f"tcp:{port}:interface=127.0.0.1",
            "--spool", os.path.join(directory, "spool"),
            "--quarantine", os.path.join(directory, "quarantine"),
            "--control", "unix:" + os.path.join(directory, "ctl.sock"),
            "--hostname", f"{name}.test",
            "--smarthost", smarthost,
            "--retry-intervals", "1m",
            *(["--tls-cert", self.cert, "--tls-key", self.key] if certificate else []),
            "--auth", "memory:alice:secret",
            *extra,
        ]  # fmt: skip
        child = self.spawn(argv, output=output)
        self.relay_logs = getattr(self, "relay_logs", {})
        self.relay_logs[name] = output
        self.relays = getattr(self, "relays", {})
        self.relays[name] = child

        def ready() -> bool:
            if not child.running:
                self.fail(f"relay {name} exited with {child.code}:\n{self.read(output)}")
            return listening(port)

        yield self.poll(ready, f"relay {name} to listen on {port}")
        return port

    def read(self, path: str) -> str:
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def spool_files(self, name: str) -> list[str]:
        active = os.path.join(self.base, name, "spool", "active")
        return [p for p in files_under(active) if not os.path.basename(p).startswith(".")]

    @inlineCallbacks
    def at_sink(self, sink: SinkCallbacks, count: int = 1) -> Any:
        """
        Wait for C{count} messages at C{sink}; return them.
        """
        logs = getattr(self, "relay_logs", {})
        yield self.poll(
            lambda: len(sink.envelopes) >= count,
            lambda: (
                f"{count} message(s) at the sink; relay logs:\n"
                + "\n".join(self.read(p)[-3000:] for p in logs.values())
            ),
        )
        self.assertEqual(len(sink.envelopes), count)
        return list(sink.envelopes)


def received_headers(data: bytes) -> list[str]:
    """
    The unfolded C{Received} headers of the message C{data}, in order.
    """
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    headers = BytesHeaderParser(policy=compat32).parsebytes(data)
    return [" ".join(value.split()) for value in headers.get_all("Received") or []]


class SwaksTests(InteropCase):
    """
    swaks against a relay with STARTTLS and AUTH, delivering to the sink.
    """

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        if not os.access(SWAKS, os.X_OK):
            raise SkipTest(f"swaks is not installed ({SWAKS}); `make deb-tools` installs it")
        InteropCase.setUp(self)
        self.sink, sink_port = self.start_sink()
        self.port = yield self.start_relay("relay", f"127.0.0.1:{sink_port}")

    def swaks(self, *args: str, to: Sequence[str] = (RECIPIENT,)) -> Deferred[Any]:
        return self.command(
            [SWAKS, "--server", f"127.0.0.1:{self.port}", "--ehlo", "swaks.example.com",
             "--from", SENDER, "--to", ",".join(to), "--timeout", str(int(TIMEOUT)), *args]
        )  # fmt: skip

    @inlineCallbacks
    def authenticated(self, mechanism: str) -> Any:
        out, code = yield self.swaks(
            "--tls", "--auth", mechanism, "--auth-user", "alice", "--auth-password", "secret",
            "--h-Subject", f"swaks {mechanism}", "--body", f"Sent with AUTH {mechanism}.",
        )  # fmt: skip
        self.assertEqual(code, 0, out)
        self.assertIn("<-  220 2.0.0 Ready to start TLS", out)
        self.assertIn("=== TLS started with cipher", out)
        self.assertIn(f"~> AUTH {mechanism}", out)
        self.assertIn("<~  235 2.7.0 Authentication successful", out)
        self.assertIn("<~  250 2.0.0 Ok: queued as", out)
        [envelope] = yield self.at_sink(self.sink)
        self.assertEqual(str(envelope.sender), SENDER)
        self.assertEqual([str(r) for r in envelope.recipients], [RECIPIENT])
        data = envelope.message.data
        self.assertIn(f"Sent with AUTH {mechanism}.".encode(), data)
        # The relay's own Received header: TLS, authenticated.
        received = [r for r in received_headers(data) if "by relay.test (relay)" in r]
        self.assertEqual(len(received), 1, received_headers(data))
        self.assertIn("with ESMTPSA", received[0])
        self.assertIn("(using TLS", received[0])
        return out

    def test_starttls_auth_plain(self) -> Any:
        """
        swaks negotiates STARTTLS, authenticates with AUTH PLAIN and sends
        a message, which the relay delivers to the sink; the relay's
        Received header says ESMTPSA and names the TLS version and cipher.
        """
        return self.authenticated("PLAIN")

    @inlineCallbacks
    def test_starttls_auth_login(self) -> Any:
        """
        The same with AUTH LOGIN and its two challenges.
        """
        out = yield self.authenticated("LOGIN")
        self.assertIn("<~  334 VXNlcm5hbWU6", out)
        self.assertIn("<~  334 UGFzc3dvcmQ6", out)

    @inlineCallbacks
    def test_wrong_password_refused(self) -> Any:
        """
        A wrong password is refused with 535; swaks fails and no mail is
        accepted.
        """
        out, code = yield self.swaks(
            "--tls", "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "wrong"
        )
        self.assertNotEqual(code, 0, out)
        self.assertIn("<~* 535 5.7.8 Authentication credentials invalid", out)
        self.assertNotIn("MAIL FROM", out)
        self.assertEqual(self.spool_files("relay"), [])
        self.assertEqual(self.sink.envelopes, [])

    @inlineCallbacks
    def test_no_auth_without_tls(self) -> Any:
        """
        Without STARTTLS the relay does not offer AUTH: swaks, asked to
        authenticate, gives up.
        """
        out, code = yield self.swaks("--auth", "PLAIN", "--auth-user", "alice",
                                          "--auth-password", "secret")  # fmt: skip
        self.assertNotEqual(code, 0, out)
        self.assertRegex(out, r"<-  250[- ]STARTTLS\n")
        self.assertNotIn("AUTH PLAIN LOGIN", out)
        self.assertEqual(self.spool_files("relay"), [])

    @inlineCallbacks
    def test_pipelining(self) -> Any:
        """
        With --pipeline swaks sends MAIL, both RCPTs and DATA in one batch;
        the relay answers each in order and the message reaches the sink
        for both recipients.
        """
        recipients = (RECIPIENT, "carol@example.net")
        out, code = yield self.swaks("--pipeline", "--h-Subject", "pipelined", to=recipients)
        self.assertEqual(code, 0, out)
        self.assertIn("250-PIPELINING", out)
        lines = out.splitlines()
        # The batch: three commands sent before the first reply is read.
        mail = next(i for i, line in enumerate(lines) if line.startswith(" -> MAIL FROM:"))
        self.assertEqual(
            [line.split(":")[0] for line in lines[mail : mail + 4]],
            [" -> MAIL FROM", " -> RCPT TO", " -> RCPT TO", " -> DATA"],
            out,
        )
        self.assertEqual(
            [line[:8] for line in lines[mail + 4 : mail + 8]],
            ["<-  250 ", "<-  250 ", "<-  250 ", "<-  354 "],
            out,
        )
        [envelope] = yield self.at_sink(self.sink)
        self.assertEqual([str(r) for r in envelope.recipients], list(recipients))

    @inlineCallbacks
    def test_8bit_body(self) -> Any:
        """
        The relay advertises 8BITMIME, and a body of raw 8-bit (UTF-8)
        bytes that swaks sends arrives at the sink byte for byte.
        """
        body = "Grüße aus Köln — ½ € ✓\r\nZweite Zeile: naïve façade\r\n".encode()
        data = (
            b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: 8bit\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body
        )
        path = os.path.join(self.base, "8bit.eml")
        with open(path, "wb") as f:
            f.write(data)
        out, code = yield self.swaks("--data", "@" + path)
        self.assertEqual(code, 0, out)
        self.assertIn("250-8BITMIME", out)
        [envelope] = yield self.at_sink(self.sink)
        # After the Received headers, what swaks read from the file (and
        # the CRLF swaks adds before the final dot).
        message = envelope.message.data
        self.assertEqual(message[message.index(b"From: alice") :], data + b"\r\n")


class SmtplibTests(InteropCase):
    """
    Python's smtplib: SMTPUTF8 and BODY=8BITMIME, through the relay to the
    sink, which advertises both.
    """

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        InteropCase.setUp(self)
        self.sink, sink_port = self.start_sink()
        self.port = yield self.start_relay("relay", f"127.0.0.1:{sink_port}")

    def send(self, sender: str, recipients: list[str], data: bytes, options: list[str]) -> Any:
        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=TIMEOUT) as client:
                client.ehlo("smtplib.example.com")
                return client.sendmail(sender, recipients, data, mail_options=options)

        return deferToThread(send)

    @inlineCallbacks
    def test_smtputf8(self) -> Any:
        """
        A UTF-8 sender and recipient with SMTPUTF8 reach the sink intact,
        with the UTF-8 headers and body.
        """
        sender, recipient = "δοκιμή@παράδειγμα.example", "χρήστης@παράδειγμα.example"
        data = (
            f"From: {sender}\r\nTo: {recipient}\r\nSubject: Δοκιμή SMTPUTF8\r\n"
            "\r\nΓειά σου κόσμε.\r\n"
        ).encode()
        refused = yield self.send(sender, [recipient], data, ["SMTPUTF8"])
        self.assertEqual(refused, {})
        [envelope] = yield self.at_sink(self.sink)
        self.assertEqual(str(envelope.sender), sender)
        self.assertEqual([str(r) for r in envelope.recipients], [recipient])
        self.assertTrue(any(a.keyword.upper() == "SMTPUTF8" for a in envelope.sender_args))
        self.assertTrue(envelope.message.data.endswith(data), envelope.message.data)

    @inlineCallbacks
    def test_body_8bitmime(self) -> Any:
        """
        MAIL FROM with BODY=8BITMIME: the relay passes the parameter on to
        the next hop along with the 8-bit bytes.
        """
        data = "Subject: 8bit\r\n\r\nCafé crème.\r\n".encode()
        refused = yield self.send(SENDER, [RECIPIENT], data, ["BODY=8BITMIME"])
        self.assertEqual(refused, {})
        [envelope] = yield self.at_sink(self.sink)
        body = [a for a in envelope.sender_args if a.keyword.upper() == "BODY"]
        self.assertEqual([(a.value or "").upper() for a in body], ["8BITMIME"])
        self.assertTrue(envelope.message.data.endswith(data), envelope.message.data)


MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
virtual   unix - n n - - virtual
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixTests(InteropCase):
    """
    A private Postfix on loopback: it relays to relay, and relay delivers
    to it.

    Its configuration directory, queue, data directory, maillog and
    mailboxes are all under the test's temporary directory; it listens only
    on 127.0.0.1 at a free port, delivers mail for example.net to a maildir
    (as C{nobody}) and everything else to C{relayhost}.
    """

    def setUp(self) -> Any:
        if not os.access(POSTFIX, os.X_OK):
            raise SkipTest(f"Postfix is not installed ({POSTFIX}); `make deb-tools` installs it")
        if os.geteuid() != 0:
            raise SkipTest("a private Postfix instance must be started as root")
        for user in ("postfix", "nobody"):
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise SkipTest(f"no {user!r} user for Postfix") from None
        InteropCase.setUp(self)

    @inlineCallbacks
    def start_postfix(
        self, relayhost: str | None = None, auth: bool = False, chunking: bool = True
    ) -> Any:
        """
        Configure and start the private Postfix; return its SMTP port.
        With C{auth}, its SMTP client authenticates (as alice) to
        C{relayhost}; without C{chunking}, its smtpd does not offer
        CHUNKING (C{smtpd_discard_ehlo_keywords}).
        """
        # Postfix's sockets live in its queue directory: the trial temporary
        # directory makes their paths longer than AF_UNIX allows.
        directory = tempfile.mkdtemp(prefix="relay-interop-postfix-")
        self.addCleanup(shutil.rmtree, directory, True)
        os.chmod(directory, 0o755)
        self.postfix_etc = os.path.join(directory, "etc")
        self.maillog = os.path.join(directory, "maillog")
        self.maildir = os.path.join(directory, "mail")
        queue = os.path.join(directory, "queue")
        data = os.path.join(directory, "data")
        for d in (self.postfix_etc, queue, data, self.maildir):
            os.makedirs(d)
        postfix = pwd.getpwnam("postfix")
        nobody = pwd.getpwnam("nobody")
        os.chown(data, postfix.pw_uid, postfix.pw_gid)
        os.chown(self.maildir, nobody.pw_uid, nobody.pw_gid)
        port = free_port()
        settings = {
            "compatibility_level": "3.6",
            "myhostname": "postfix.test",
            "mydomain": "postfix.test",
            "myorigin": "postfix.test",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "queue_directory": queue,
            "data_directory": data,
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": directory,
            "smtp_dns_support_level": "disabled",
            "virtual_mailbox_domains": "example.net",
            "virtual_mailbox_base": self.maildir,
            "virtual_mailbox_maps": "static:bob/",
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "smtpd_tls_cert_file": self.cert,
            "smtpd_tls_key_file": self.key,
            "smtpd_tls_security_level": "may",
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_loglevel": "1",
            "smtp_tls_loglevel": "1",
        }
        if not chunking:
            settings["smtpd_discard_ehlo_keywords"] = "chunking"
        if relayhost is not None:
            settings["relayhost"] = relayhost
            settings["smtp_tls_security_level"] = "encrypt"
        if auth:
            settings["smtp_sasl_auth_enable"] = "yes"
            settings["smtp_sasl_password_maps"] = "static:alice:secret"
            settings["smtp_sasl_security_options"] = "noanonymous"
            settings["smtp_sasl_tls_security_options"] = "noanonymous"
        with open(os.path.join(self.postfix_etc, "main.cf"), "w") as f:
            f.writelines(f"{key} = {value}\n" for key, value in settings.items())
        with open(os.path.join(self.postfix_etc, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(port=port))
        self.master_pid = os.path.join(queue, "pid", "master.pid")

        out, code = yield self.postfix("start")
        self.addCleanup(self.stop_postfix, port)
        self.assertEqual(code, 0, f"postfix start failed:\n{out}\n{self.read(self.maillog)}")
        yield self.poll(
            lambda: listening(port),
            lambda: f"Postfix to listen on {port}:\n{self.read(self.maillog)}",
        )
        return port

    def postfix(self, action: str) -> Deferred[Any]:
        """
        Run C{postfix -c <config> action}.  Postfix reports fatal errors on
        stderr only when it is a terminal: run it under script(1), when
        there is one, to have them in the output.
        """
        argv = [POSTFIX, "-c", self.postfix_etc, action]
        script = shutil.which("script")
        if script is not None:
            argv = [script, "-qec", shlex.join(argv), "/dev/null"]
        return self.command(argv)

    @inlineCallbacks
    def stop_postfix(self, port: int) -> Any:
        """
        C{postfix stop}; then, should its master still run, kill it (the
        process this test started, by the pid it wrote).
        """
        yield self.postfix("stop")
        try:
            yield self.poll(lambda: not listening(port), "Postfix to stop", TIMEOUT / 3)
        except self.failureException:
            try:
                with open(self.master_pid) as f:
                    os.kill(int(f.read().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
            raise

    def send(self, port: int, data: bytes, recipients: Sequence[str] = (RECIPIENT,)) -> Any:
        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
                client.ehlo("client.example.com")
                return client.sendmail(SENDER, list(recipients), data)

        return deferToThread(send)

    @inlineCallbacks
    def postfix_to_relay(self, auth: bool) -> Any:
        """
        Postfix, with relay as its relayhost and TLS required
        (smtp_tls_security_level = encrypt), hands a message to relay over
        STARTTLS; relay delivers it to the sink.  Return relay's Received
        header and Postfix's log.
        """
        sink, sink_port = self.start_sink()
        relay_port = yield self.start_relay("relay", f"127.0.0.1:{sink_port}")
        postfix_port = yield self.start_postfix(f"[127.0.0.1]:{relay_port}", auth=auth)
        data = (
            b"From: alice@example.com\r\nTo: dave@example.org\r\nSubject: via Postfix\r\n"
            b"Message-ID: <postfix-to-relay@example.com>\r\n\r\nFrom Postfix to relay.\r\n"
        )
        refused = yield self.send(postfix_port, data, ["dave@example.org"])
        self.assertEqual(refused, {})
        [envelope] = yield self.at_sink(sink)
        self.assertEqual(str(envelope.sender), SENDER)
        self.assertEqual([str(r) for r in envelope.recipients], ["dave@example.org"])
        message = envelope.message.data
        self.assertIn(b"\r\n\r\nFrom Postfix to relay.\r\n", message)
        self.assertEqual(envelope.message.header("Message-ID"), "<postfix-to-relay@example.com>")
        received = received_headers(message)
        by_relay = [r for r in received if "by relay.test (relay)" in r]
        self.assertEqual(len(by_relay), 1, received)
        self.assertIn("from postfix.test ([127.0.0.1])", by_relay[0])
        self.assertRegex(by_relay[0], r"\(using TLSv1\.[23] with cipher \S+")
        self.assertTrue(any("by postfix.test (Postfix)" in r for r in received), received)
        log = yield self.poll(
            lambda: "status=sent" in self.read(self.maillog) and self.read(self.maillog),
            "Postfix to log the delivery",
        )
        self.assertRegex(
            log,
            rf"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{relay_port}: TLSv1\.[23]",
        )
        self.assertRegex(log, rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{relay_port},.* status=sent")
        return by_relay[0], log

    @inlineCallbacks
    def test_postfix_relays_to_relay(self) -> Any:
        """
        Postfix relays to relay over STARTTLS: Postfix's log shows the TLS
        connection and the delivery; relay's Received header shows ESMTPS
        with the TLS version and cipher.
        """
        received, log = yield self.postfix_to_relay(auth=False)
        self.assertIn("with ESMTPS id", received)

    @inlineCallbacks
    def test_postfix_authenticates_to_relay(self) -> Any:
        """
        Postfix's SMTP client authenticates to relay (SASL over STARTTLS,
        as alice): relay's Received header says ESMTPSA.
        """
        if not glob.glob("/usr/lib/*/sasl2/libplain.so*") and not glob.glob(
            "/usr/lib/sasl2/libplain.so*"
        ):
            raise SkipTest("Cyrus SASL's PLAIN plugin (libsasl2-modules) is not installed")
        received, log = yield self.postfix_to_relay(auth=True)
        self.assertIn("with ESMTPSA id", received)

    @inlineCallbacks
    def test_relay_delivers_to_postfix(self) -> Any:
        """
        relay, with Postfix as its smarthost, delivers a message (over
        STARTTLS, which Postfix offers) and Postfix stores it in the
        maildir: the bytes sent to relay are there, after relay's and
        Postfix's Received headers; relay's spool is empty afterwards.
        """
        body = b"From relay to Postfix.\r\n.leading dot\r\n8-bit: caf\xc3\xa9\r\n"
        data = (
            b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: via relay\r\n"
            b"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\n"
            b"Message-ID: <relay-to-postfix@example.com>\r\n\r\n" + body
        )
        stored, session = yield self.relay_to_postfix(data, chunking=True)
        # Postfix stores LF line endings in a maildir.
        self.assertTrue(stored.endswith(data.replace(b"\r\n", b"\n")), stored)
        received = received_headers(stored)
        self.assertEqual(len(received), 2, received)
        self.assertIn("by postfix.test (Postfix) with ESMTPS", received[0])
        self.assertIn("from relay.test", received[0])
        self.assertIn("by relay.test (relay) with ESMTP", received[1])
        self.assertIn("status=sent (delivered to maildir)", self.read(self.maillog))
        yield self.poll(lambda: not self.spool_files("relay"), "relay's spool to empty")
        # Postfix offers CHUNKING: the message went as one BDAT.
        self.assertRegex(session, r"\bbdat=1\b")

    @inlineCallbacks
    def relay_to_postfix(self, data: bytes, chunking: bool) -> Any:
        """
        Send C{data} to a relay whose smarthost is Postfix (offering
        CHUNKING or not); return what Postfix stored in the maildir and
        Postfix's smtpd line for relay's session (its command counts).
        """
        postfix_port = yield self.start_postfix(chunking=chunking)
        with smtplib.SMTP("127.0.0.1", postfix_port, timeout=TIMEOUT) as probe:
            probe.ehlo("probe.example.com")
            self.assertEqual(probe.has_extn("chunking"), chunking)
        relay_port = yield self.start_relay("relay", f"127.0.0.1:{postfix_port}")
        refused = yield self.send(relay_port, data)
        self.assertEqual(refused, {})
        new = os.path.join(self.maildir, "bob", "new")
        [path] = yield self.poll(
            lambda: files_under(new),
            lambda: (
                f"the message in {new}:\n{self.read(self.maillog)}\n"
                + self.read(self.relay_logs["relay"])[-3000:]
            ),
        )
        with open(path, "rb") as f:
            stored = f.read()
        session = yield self.relay_session()
        return stored, session

    @inlineCallbacks
    def relay_session(self) -> Any:
        """
        Stop relay (which QUITs its idle connection to Postfix) and return
        Postfix's smtpd line for that session, with its command counts (the
        one session with a MAIL: the probe of EHLO has none).
        """
        yield self.stop(self.relays["relay"])
        log = yield self.poll(
            lambda: re.search(r"disconnect from \S+ .*\bmail=1\b.*", self.read(self.maillog)),
            lambda: f"Postfix to log relay's session:\n{self.read(self.maillog)[-3000:]}",
        )
        return log.group()

    @inlineCallbacks
    def test_relay_sends_chunks_to_postfix(self) -> Any:
        """
        A message of four chunks and a bit (so relay keeps it in a file
        and sends it in chunks of CHUNK_SIZE, pipelined, a CRLF and a dot
        line across chunk boundaries) reaches Postfix's maildir intact;
        Postfix's log counts the BDAT commands and no DATA.
        """
        size = CHUNK_SIZE
        head = (
            b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: chunks\r\n"
            b"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\nMessage-ID: <chunks@example.com>\r\n\r\n"
        )
        line = b"0123456789" * 7 + b"\r\n"
        body = line * (4 * size // len(line)) + b".\r\n..two\r\n.lead\r\ncaf\xc3\xa9\r\n"
        data = head + body
        stored, session = yield self.relay_to_postfix(data, chunking=True)
        # Postfix stores LF line endings in a maildir.
        self.assertTrue(stored.endswith(data.replace(b"\r\n", b"\n")), stored[-200:])
        bdat = int(re.search(r"\bbdat=(\d+)", session).group(1))  # type: ignore[union-attr]
        self.assertGreaterEqual(bdat, 4, session)
        self.assertNotIn("data=", session)

    @inlineCallbacks
    def test_relay_sends_data_to_postfix_without_chunking(self) -> Any:
        """
        Postfix told not to offer CHUNKING: relay sends DATA, and the
        message (dot lines stuffed on the wire) arrives intact.
        """
        data = (
            b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: data\r\n"
            b"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\nMessage-ID: <data@example.com>\r\n\r\n.\r\n..two\r\nend\r\n"
        )
        stored, session = yield self.relay_to_postfix(data, chunking=False)
        self.assertTrue(stored.endswith(data.replace(b"\r\n", b"\n")), stored)
        self.assertIn("data=1", session)
        self.assertNotIn("bdat=", session)


    @inlineCallbacks
    def test_dsn_parameters_go_on_to_postfix(self) -> Any:
        """
        A recipient's NOTIFY=SUCCESS (with ORCPT, RET and ENVID) reaches
        Postfix, which offers DSN: Postfix, not relay, reports the
        delivery to the sender ("sender delivery status notification"),
        and relay sends no report of its own (its spool empties).
        """
        postfix_port = yield self.start_postfix()
        relay_port = yield self.start_relay("relay", f"127.0.0.1:{postfix_port}")
        data = (
            b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: DSN via relay\r\n"
            b"Message-ID: <relay-dsn@example.com>\r\n\r\nAsk for success.\r\n"
        )

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", relay_port, timeout=TIMEOUT) as client:
                client.ehlo("client.example.com")
                self.assertTrue(client.has_extn("DSN"))
                return client.sendmail(
                    SENDER, [RECIPIENT], data, mail_options=["RET=HDRS", "ENVID=interop+2B1"],
                    rcpt_options=["NOTIFY=SUCCESS", f"ORCPT=rfc822;{RECIPIENT}"],
                )  # fmt: skip

        refused = yield deferToThread(send)
        self.assertEqual(refused, {})
        log = yield self.poll(
            lambda: "sender delivery status notification" in self.read(self.maillog)
            and self.read(self.maillog),
            lambda: "Postfix's success notification:\n" + self.read(self.maillog),
        )
        self.assertIn("status=sent (delivered to maildir)", log)
        yield self.poll(lambda: not self.spool_files("relay"), "relay's spool to empty")
        relay_log = self.read(self.relay_logs["relay"])
        self.assertNotIn("notification", relay_log)

    @inlineCallbacks
    def test_relay_without_certificate_starttls_to_postfix(self) -> Any:
        """
        A relay without a certificate of its own (so started without
        pyOpenSSL) still delivers to Postfix over the STARTTLS Postfix
        offers: pyOpenSSL loads when the first next hop offers it.
        """
        postfix_port = yield self.start_postfix()
        relay_port = yield self.start_relay(
            "plain", f"127.0.0.1:{postfix_port}", certificate=False
        )
        data = (
            b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: lazy TLS\r\n"
            b"Message-ID: <lazy-tls@example.com>\r\n\r\nhello\r\n"
        )
        refused = yield self.send(relay_port, data)
        self.assertEqual(refused, {})
        new = os.path.join(self.maildir, "bob", "new")
        [path] = yield self.poll(
            lambda: files_under(new),
            lambda: f"the message in {new}:\n{self.read(self.relay_logs['plain'])[-3000:]}",
        )
        with open(path, "rb") as f:
            received = received_headers(f.read())
        self.assertIn("by postfix.test (Postfix) with ESMTPS", received[0])


class ProxyProtocolTests(InteropCase):
    """
    swaks as the load balancer: PROXY v1 and v2 headers to a relay that
    listens with C{--smtp haproxy:tcp:...} (besides a plain listener).
    """

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        if not os.access(SWAKS, os.X_OK):
            raise SkipTest(f"swaks is not installed ({SWAKS}); `make deb-tools` installs it")
        InteropCase.setUp(self)
        self.sink, sink_port = self.start_sink()
        self.proxied = free_port()
        yield self.start_relay(
            "relay", f"127.0.0.1:{sink_port}",
            "--smtp", f"haproxy:tcp:{self.proxied}:interface=127.0.0.1",
        )  # fmt: skip
        yield self.poll(lambda: listening(self.proxied), "relay's PROXY listener")

    @inlineCallbacks
    def proxied_message(self, version: str, family: str, source: str, dest: str) -> Any:
        out, code = yield self.command(
            [SWAKS, "--server", f"127.0.0.1:{self.proxied}", "--ehlo", "swaks.example.com",
             "--from", SENDER, "--to", RECIPIENT, "--timeout", str(int(TIMEOUT)),
             "--proxy-version", version, "--proxy-family", family,
             "--proxy-source", source, "--proxy-source-port", "40000",
             "--proxy-dest", dest, "--proxy-dest-port", "25",
             "--h-Subject", f"PROXY v{version}"]
        )  # fmt: skip
        self.assertEqual(code, 0, out)
        self.assertIn("<-  250 2.0.0 Ok: queued as", out)
        [envelope] = yield self.at_sink(self.sink)
        self.assertEqual(envelope.message.header("Subject"), f"PROXY v{version}")
        received = [
            r for r in received_headers(envelope.message.data) if "by relay.test (relay)" in r
        ]
        self.assertEqual(len(received), 1, received)
        return received[0]

    def test_v1(self) -> Any:
        """
        A v1 header (TCP4): the session behind it delivers.
        """
        return self.proxied_message("1", "TCP4", "203.0.113.7", "192.0.2.25")

    def test_v2(self) -> Any:
        """
        A v2 header (AF_INET6): the session behind it delivers.
        """
        return self.proxied_message("2", "AF_INET6", "2001:db8::7", "2001:db8::25")

    @inlineCallbacks
    def test_received_names_proxied_client(self) -> Any:
        """
        relay's Received header names the client the proxy reported, not
        the proxy (127.0.0.1).
        """
        received = yield self.proxied_message("1", "TCP4", "203.0.113.7", "192.0.2.25")
        self.assertIn("from swaks.example.com ([203.0.113.7])", received)



EXIM_CONFIGURATION = """\
exim_path = {wrapper}
exim_user = {user}
exim_group = {group}
spool_directory = {directory}/spool
log_file_path = {directory}/log/%slog
primary_hostname = exim.test
keep_environment =

begin routers

to_relay:
  driver = manualroute
  route_list = * 127.0.0.1::{port} byname
  transport = relay_smtp
  self = send

begin transports

relay_smtp:
  driver = smtp
  hosts_try_chunking = *
  hosts_avoid_tls = {avoid_tls}
"""


class EximTests(InteropCase):
    """
    Exim's smtp transport as a client of relay: it sends BDAT when relay
    offers CHUNKING.

    Exim is Debian's exim4-daemon-light, unpacked by C{make exim} and run
    from a copy in a temporary directory as C{nobody} with its own
    configuration (C{-C}), delivering one message in the foreground
    (C{-odf}) through a manualroute router to relay.  The binary looks up
    the user it was built for (C{Debian-exim}) by name, so it runs in a
    private mount namespace (C{unshare -m}) in which a copy of
    /etc/passwd and /etc/group that names it is bind-mounted: nothing on
    the system changes.
    """

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        exim = os.path.join(EXIM_ROOT, "usr", "sbin", "exim4")
        if not os.path.isfile(exim):
            raise SkipTest(f"Exim is not unpacked in {EXIM_ROOT}; `make exim` unpacks it")
        if os.geteuid() != 0:
            raise SkipTest("Exim runs in a mount namespace of its own, which needs root")
        for tool in ("unshare", "setpriv"):
            if shutil.which(tool) is None:
                raise SkipTest(f"{tool} (util-linux) is not installed")
        InteropCase.setUp(self)
        self.sink, sink_port = self.start_sink()
        self.port = yield self.start_relay("relay", f"127.0.0.1:{sink_port}")
        self.exim_dir = self.exim_directory(exim)

    def exim_directory(self, exim: str) -> str:
        """
        A directory that C{nobody} can use: Exim's binary and library, a
        wrapper that points the library path at them, its configuration,
        spool and log, and the passwd and group files of its namespace.
        """
        nobody = pwd.getpwnam("nobody")
        group = grp.getgrgid(nobody.pw_gid).gr_name
        directory = tempfile.mkdtemp(prefix="relay-interop-exim-")
        self.addCleanup(shutil.rmtree, directory, True)
        os.chmod(directory, 0o755)
        lib = os.path.join(directory, "lib")
        os.makedirs(lib)
        for name in glob.glob(os.path.join(EXIM_ROOT, "usr", "lib", "*", "libidn.so*")):
            shutil.copy(name, lib)
        shutil.copy(exim, os.path.join(directory, "exim4"))
        os.chmod(os.path.join(directory, "exim4"), 0o755)
        wrapper = os.path.join(directory, "exim")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nLD_LIBRARY_PATH={lib} exec {directory}/exim4 "$@"\n')
        os.chmod(wrapper, 0o755)
        for sub in ("spool", "log"):
            os.makedirs(os.path.join(directory, sub))
            os.chown(os.path.join(directory, sub), nobody.pw_uid, nobody.pw_gid)
        with open(os.path.join(directory, "exim.conf"), "w") as f:
            f.write(EXIM_CONFIGURATION.format(
                wrapper=wrapper, user="nobody", group=group, directory=directory, port=self.port,
                avoid_tls="${if exists{" + directory + "/no-tls}{*}{}}",
            ))  # fmt: skip
        for name, line in (
            ("passwd", f"Debian-exim:x:{nobody.pw_uid}:{nobody.pw_gid}::/nonexistent:/bin/false\n"),
            ("group", f"Debian-exim:x:{nobody.pw_gid}:\n"),
        ):
            with open(f"/etc/{name}") as system, open(os.path.join(directory, name), "w") as f:
                f.write(system.read() + line)
        return directory

    def exim(self, message: str, *args: str) -> Deferred[Any]:
        """
        Run Exim (as C{nobody}, in its namespace) on the message file
        C{message} with C{args}; return its output and exit code.
        """
        d = self.exim_dir
        exim = shlex.join([
            "setpriv", "--reuid", "nobody", "--regid", str(pwd.getpwnam("nobody").pw_gid),
            "--clear-groups", os.path.join(d, "exim"), "-C", os.path.join(d, "exim.conf"), *args,
        ])  # fmt: skip
        script = (
            f"mount --bind {d}/passwd /etc/passwd && mount --bind {d}/group /etc/group"
            f" && exec {exim} < {shlex.quote(message)}"
        )
        return self.command(["unshare", "--mount", "sh", "-c", script])

    @inlineCallbacks
    def exim_to_relay(self, tls: bool) -> Any:
        """
        Have Exim send a message to relay (over STARTTLS or in clear);
        check that it went with BDAT and reached the sink intact; return
        Exim's output and relay's Received header.
        """
        if not tls:
            open(os.path.join(self.exim_dir, "no-tls"), "w").close()
        body = b"Sent by Exim.\n.\n..two dots\n.lead\ncaf\xc3\xa9\n" + b"x" * 70 + b"\n"
        message = os.path.join(self.exim_dir, "message.eml")
        with open(message, "wb") as f:
            f.write(
                b"From: alice@example.com\nTo: bob@example.net\nSubject: from Exim\n"
                b"Message-ID: <exim-bdat@example.com>\n\n" + body
            )
        os.chmod(message, 0o644)
        out, code = yield self.exim(message, "-odf", "-oi", "-v", "-f", SENDER, RECIPIENT)
        self.assertEqual(code, 0, out)
        # Exim's -v transcript: the EHLO reply's lines, then "SMTP+>" for a
        # command it pipelines; its delivery log line has K for CHUNKING.
        self.assertRegex(out, r"\n\s+250[- ]CHUNKING\n")
        self.assertRegex(out, r"SMTP[>|+]> BDAT \d+ LAST\n")
        self.assertNotRegex(out, r"SMTP[>|+]> DATA")
        self.assertRegex(out, r"=> bob@example\.net .* K C=\"250 2\.0\.0 Ok: queued as ")
        [envelope] = yield self.at_sink(self.sink)
        self.assertEqual(str(envelope.sender), SENDER)
        self.assertEqual([str(r) for r in envelope.recipients], [RECIPIENT])
        self.assertEqual(envelope.message.header("Message-ID"), "<exim-bdat@example.com>")
        data = envelope.message.data
        self.assertTrue(data.endswith(b"\r\n\r\n" + body.replace(b"\n", b"\r\n")), data[-300:])
        received = received_headers(data)
        [by_relay] = [r for r in received if "by relay.test (relay)" in r]
        self.assertIn("from exim.test ([127.0.0.1])", by_relay)
        self.assertTrue(any("by exim.test" in r for r in received), received)
        return out, by_relay

    @inlineCallbacks
    def test_exim_sends_bdat(self) -> Any:
        """
        Exim takes the STARTTLS relay offers, sees CHUNKING in relay's
        second EHLO reply and sends the message with BDAT, pipelined with
        MAIL and RCPT; relay queues it and delivers it to the sink with the
        body intact (dot lines, 8-bit, a line that is a lone dot) after
        Exim's and relay's Received headers.
        """
        out, by_relay = yield self.exim_to_relay(tls=True)
        self.assertRegex(out, r"SMTP>> STARTTLS")
        self.assertIn("with ESMTPS", by_relay)

    @inlineCallbacks
    def test_exim_sends_bdat_and_shuts_down(self) -> Any:
        """
        In clear text Exim pipelines QUIT behind the last chunk and shuts
        down its side of the connection before reading the replies: relay
        still answers everything (the queued reply, then 221).
        """
        out, by_relay = yield self.exim_to_relay(tls=False)
        self.assertRegex(out, r"SMTP\+> BDAT \d+ LAST\n\s+SMTP\+> QUIT\n\s+SMTP\(shutdown\)>>")
        self.assertRegex(out, r"SMTP<< 221 2\.0\.0 Bye")
        self.assertIn("with ESMTP id", by_relay)


class SocketChunkingTests(InteropCase):
    """
    BDAT from a client on a plain socket (this test's own bytes, whatever
    is installed): pipelined chunks, and the refusals that keep a session
    usable.
    """

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        InteropCase.setUp(self)
        self.sink, sink_port = self.start_sink()
        self.port = yield self.start_relay("relay", f"127.0.0.1:{sink_port}", certificate=False)

    def talk(self, script: list[bytes], replies: int) -> Deferred[list[str]]:
        """
        Send every piece of C{script} at once (pipelined), after the
        greeting and EHLO; return the greeting, the EHLO reply and the
        next C{replies} replies, one string each.
        """

        def run() -> list[str]:
            with socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as sock:
                reader = sock.makefile("rb")

                def reply() -> str:
                    lines = []
                    while True:
                        line = reader.readline().decode("utf-8", "replace").rstrip("\r\n")
                        if not line:
                            return " / ".join(lines) or "EOF"
                        lines.append(line)
                        if line[3:4] != "-":
                            return " / ".join(lines)

                out = [reply()]
                sock.sendall(b"EHLO socket.example\r\n")
                out.append(reply())
                sock.sendall(b"".join(script))
                out += [reply() for _ in range(replies)]
                sock.sendall(b"QUIT\r\n")
                out.append(reply())
                return out

        return deferToThread(run)

    @inlineCallbacks
    def test_pipelined_chunks(self) -> Any:
        """
        MAIL, RCPT and three chunks (the last one BDAT 0 LAST) in one
        write, then a chunk without MAIL (holding "QUIT"), refused with 503
        once it is read: the session goes on and QUIT ends it.  The message
        reaches the sink with its dot line as sent (and the lone LF made
        CRLF by relay's client: a chunk holds canonical text).
        """
        first = b"Subject: socket\r\nMessage-ID: <socket@example.com>\r\n\r\n.\r\n"
        second = b"bare\nlf and the end\r\n"
        script = [
            b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.net>\r\n",
            b"BDAT %d\r\n" % len(first), first,
            b"BDAT %d\r\n" % len(second), second,
            b"BDAT 0 LAST\r\n",
            b"BDAT 6 LAST\r\nQUIT\r\n",
        ]  # fmt: skip
        replies = yield self.talk(script, 6)
        self.assertIn("250 CHUNKING", replies[1])
        self.assertEqual(
            replies[2:7],
            [
                "250 2.1.0 Ok",
                "250 2.1.5 Ok",
                f"250 2.0.0 Ok: {len(first)} bytes",
                f"250 2.0.0 Ok: {len(second)} bytes",
                replies[6],
            ],
        )
        self.assertRegex(replies[6], r"^250 2\.0\.0 Ok: queued as ")
        self.assertEqual(replies[7:], ["503 5.5.1 Error: need MAIL command", "221 2.0.0 Bye"])
        [envelope] = yield self.at_sink(self.sink)
        self.assertEqual(envelope.message.header("Message-ID"), "<socket@example.com>")
        self.assertTrue(
            envelope.message.data.endswith(first + b"bare\r\nlf and the end\r\n"),
            envelope.message.data,
        )
