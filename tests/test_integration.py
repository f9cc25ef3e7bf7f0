"""
End-to-end tests: the real C{twistd relay} in a subprocess, fed by
L{smtplib}.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
from typing import Any, Callable, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from relay import Consume, Simple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30.0
POLL = 0.1

MESSAGE = (
    b"From: alice@example.com\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: integration\r\n"
    b"Message-ID: <integration@example.com>\r\n"
    b"\r\n"
    b"Hello from the integration test.\r\n"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def files_under(path: str) -> list[str]:
    found = []
    for directory, _, names in os.walk(path):
        found.extend(os.path.join(directory, name) for name in names)
    return found


def send_message(port: int, message: bytes = MESSAGE) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo("client.example.com")
        return client.sendmail("alice@example.com", ["bob@example.net"], message)


class SinkCallbacks(Simple):
    """
    The next hop of the delivery test: consumes every message, keeping it.
    """

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    def process_envelope(self, log: Any, session: Any, envelope: Any) -> Any:
        self.envelopes.append(envelope)
        return Consume("delivered to the sink")


class TwistdTestCase(TestCase):
    """
    Helpers to run the real C{twistd relay} (and C{relayctl}) in
    subprocesses on loopback.
    """

    timeout = 4 * TIMEOUT

    def setUp(self) -> None:
        for name in ("relay.smtp.server", "relay.spool.disk"):
            try:
                __import__(name)
            except ImportError as e:
                raise SkipTest(f"{name} is not importable yet: {e}") from None
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.spool = os.path.join(self.base, "spool")
        self.quarantine = os.path.join(self.base, "quarantine")

    def start_twistd(
        self,
        name: str,
        port: int,
        smarthost: str | None = "127.0.0.1:9",
        extra: Sequence[str] = ("--retry-intervals", "1m"),
        listen: str = "",
    ) -> tuple[subprocess.Popen[bytes], str]:
        """
        Start C{twistd -n relay} on C{port} (C{listen} appended to its
        endpoint string) with this test's spool and the C{extra} options;
        it is killed at cleanup whatever happens.  With C{smarthost=None}
        mail goes to the recipients' MX.
        """
        output = os.path.join(self.base, f"{name}.out")
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile", os.path.join(self.base, f"{name}.pid"),
            "relay",
            "--smtp", f"tcp:{port}:interface=127.0.0.1{listen}",
            "--spool", self.spool,
            "--quarantine", self.quarantine,
            "--control", "unix:" + os.path.join(self.base, f"{name}.sock"),
            "--hostname", "relay.test",
            *(("--smarthost", smarthost) if smarthost is not None else ()),
            *extra,
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        with open(output, "wb") as out:
            process = subprocess.Popen(
                argv, cwd=self.base, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.addCleanup(self.stop, process)
        return process, output

    def stop(self, process: subprocess.Popen[bytes]) -> Deferred[None] | None:
        if process.poll() is not None:
            return None
        process.send_signal(signal.SIGTERM)
        return self.poll(lambda: process.poll() is not None, "twistd to stop", TIMEOUT / 3).addErrback(
            lambda _: (process.kill(), process.wait(5)) and None
        )

    @inlineCallbacks
    def poll(
        self, condition: Callable[[], Any], what: str | Callable[[], str], timeout: float = TIMEOUT
    ) -> Any:
        """
        Check C{condition} every L{POLL} seconds until it is true, failing
        after C{timeout} seconds with C{what} (or what it returns).
        """
        for _ in range(int(timeout / POLL)):
            result = condition()
            if result:
                return result
            yield deferLater(reactor, POLL, lambda: None)
        result = condition()
        if not result:
            self.fail(
                f"timed out after {timeout}s waiting for {what() if callable(what) else what}"
            )
        return result

    def start_sink(self, tls_context_factory: Any = None) -> tuple[SinkCallbacks, int]:
        """
        Listen on loopback with relay's own server and a policy that keeps
        every message (offering STARTTLS with C{tls_context_factory});
        return the policy and the port.
        """
        from relay.smtp.server import SMTPServerFactory
        from relay.testing import MemorySpool

        sink = SinkCallbacks()
        factory = SMTPServerFactory(
            callbacks=sink, spool=MemorySpool(), clock=reactor, hostname="sink.test",
            tls_context_factory=tls_context_factory,
        )  # fmt: skip
        listener: Any = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(listener.stopListening)
        return sink, listener.getHost().port

    def output(self, path: str) -> str:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    @inlineCallbacks
    def wait_listening(self, process: subprocess.Popen[bytes], output: str, port: int) -> Any:
        def ready() -> bool:
            if process.poll() is not None:
                self.fail(f"twistd exited with {process.returncode}:\n{self.output(output)}")
            return listening(port)

        yield self.poll(ready, f"twistd to listen on {port}")



    def relayctl_for(self, sock: str) -> Callable[..., Deferred[tuple[str, str, int]]]:
        """
        A function running the real C{relayctl} in a subprocess against the
        control socket C{sock}: C{(stdout, stderr, exit code)}.
        """
        from twisted.internet.utils import getProcessOutputAndValue

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))

        @inlineCallbacks
        def relayctl(*argv: str) -> Any:
            d = getProcessOutputAndValue(
                sys.executable,
                ["-c", "from relay.control.ctl import main; import sys; sys.exit(main())",
                 "--control", "unix:" + sock, *argv],
                env=env, path=self.base,
            )  # fmt: skip
            d.addTimeout(TIMEOUT, reactor)
            out, err, code = yield d
            return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code

        return relayctl


class TwistdRelayTests(TwistdTestCase):
    """
    The relay as an operator runs it: accepting, spooling, delivering,
    managed by C{relayctl}.
    """

    @inlineCallbacks
    def test_spools_a_message(self) -> Any:
        """
        A message sent to the running relay is acknowledged and its
        envelope is in the spool's active queue.
        """
        port = free_port()
        process, output = self.start_twistd("first", port)
        yield self.wait_listening(process, output, port)
        refused = yield deferToThread(send_message, port)
        self.assertEqual(refused, {})
        active = os.path.join(self.spool, "active")
        found = yield self.poll(
            lambda: [p for p in files_under(active) if not os.path.basename(p).startswith(".")],
            "the envelope in spool/active",
        )
        envelopes = [p for p in found if p.endswith(".json")] or found
        contents = b"".join(open(p, "rb").read() for p in envelopes)
        self.assertIn(b"bob@example.net", contents, (found, self.output(output)))

    @inlineCallbacks
    def test_second_relay_refuses_locked_spool(self) -> Any:
        """
        A second relay on a spool that a running relay holds exits at once
        with a message that says so, and does not listen.
        """
        port = free_port()
        process, output = self.start_twistd("first", port)
        yield self.wait_listening(process, output, port)

        port2 = free_port()
        second, output2 = self.start_twistd("second", port2)
        yield self.poll(lambda: second.poll() is not None, "the second twistd to exit")
        text = self.output(output2)
        self.assertNotEqual(second.returncode, 0, text)
        # One line, naming the spool and the holder, and no traceback.
        self.assertEqual(
            text.strip(),
            f"twistd relay: spool {self.spool} is in use by another relay (pid {process.pid})",
        )
        self.assertFalse(listening(port2))
        # The first relay carries on.
        self.assertIsNone(process.poll())
        self.assertTrue(listening(port))

    @inlineCallbacks
    def test_delivers_to_next_hop(self) -> Any:
        """
        The running relay delivers an accepted message to its smarthost (a
        real SMTP server on loopback) with the bytes intact, dot lines and
        bare LF included, and its spool is empty afterwards.
        """
        sink, sink_port = self.start_sink()
        port = free_port()
        process, output = self.start_twistd("first", port, smarthost=f"127.0.0.1:{sink_port}")
        yield self.wait_listening(process, output, port)
        body = MESSAGE + b".leading dot\r\n..two dots\r\n.\r\nbare\nlf\r\nend\r\n"
        refused = yield deferToThread(send_message, port, body)
        self.assertEqual(refused, {})
        yield self.poll(lambda: sink.envelopes, "the message at the sink")
        [envelope] = sink.envelopes
        self.assertEqual(str(envelope.sender), "alice@example.com")
        self.assertEqual([str(r) for r in envelope.recipients], ["bob@example.net"])
        data = envelope.message.data
        # smtplib normalizes line endings; what it sent is what arrives,
        # after the two Received headers.
        expected = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self.assertTrue(data.endswith(expected), data)
        self.assertEqual(data.count(b"Received: "), 2)
        yield self.poll(
            lambda: not files_under(os.path.join(self.spool, "active")),
            "the spool's active queue to empty",
        )

    @inlineCallbacks
    def test_relayctl_against_running_relay(self) -> Any:
        """
        The real C{relayctl}, in a subprocess, manages the running relay over
        its unix control socket: count, freeze, status, remove, recover, and
        an unknown id exits with 1.
        """

        port = free_port()
        process, output = self.start_twistd("first", port)
        yield self.wait_listening(process, output, port)
        sock = os.path.join(self.base, "first.sock")
        if len(os.fsencode(sock)) > 107:
            sock = "first.sock"  # as relay.service.control_endpoint binds it
        yield self.poll(lambda: os.path.exists(os.path.join(self.base, "first.sock")), "the socket")
        refused = yield deferToThread(send_message, port)
        self.assertEqual(refused, {})
        relayctl = self.relayctl_for(sock)

        def counted(result: Any) -> bool:
            return result[2] == 0 and "active: 1\n" in result[0]

        for _ in range(int(TIMEOUT / POLL)):
            result = yield relayctl("count")
            if counted(result) or result[2] != 0:
                break
            yield deferLater(reactor, POLL, lambda: None)
        self.assertTrue(counted(result), (result, self.output(output)))
        self.assertIn("frozen: 0\n", result[0])

        out, err, code = yield relayctl("status", "--format", "json")
        self.assertEqual(code, 0, err)
        [entry] = [json.loads(line) for line in out.splitlines()]
        entry_id = entry["id"]

        out, err, code = yield relayctl("freeze", entry_id)
        self.assertEqual(
            (out, err, code),
            (f"freeze: {entry_id}\nfreeze: changed 1 of 1 matching entry\n", "", 0),
        )
        out, err, code = yield relayctl("status", "--queue", "frozen", "--format", "ids")
        self.assertEqual((out, err, code), (entry_id + "\n", "", 0))

        out, err, code = yield relayctl("remove", entry_id)
        self.assertEqual(
            (out, err, code),
            (f"remove: {entry_id}\nremove: changed 1 of 1 matching entry\n", "", 0),
        )
        out, err, code = yield relayctl("recover", "--removed", entry_id)
        self.assertEqual((out, err, code), (f"recover: {entry_id}\n", "", 0))
        out, err, code = yield relayctl("count")
        self.assertEqual(code, 0, err)
        self.assertIn("frozen: 1\n", out)
        self.assertIn("removed: 0\n", out)

        out, err, code = yield relayctl("freeze", "nosuchid")
        self.assertEqual((out, code), ("", 1))
        self.assertIn("nosuchid", err)
        self.assertNotIn("Traceback", err)


def fill_spool(path: str, n: int, domains: int, batch: int = 500) -> list[str]:
    """
    Put C{n} entries in the spool at C{path} through the spool's own
    writer (L{DiskSpool.enqueue}, in batches), recipients over C{domains}
    domains (C{u<i>@d<i % domains>.example}), every other one on the
    default route, and each due in a day: a backlog that stays.  Blocking.

    @return: the ids, in the order they were made.
    """
    import dataclasses
    import time

    from twisted.internet import defer
    from twisted.internet.task import Clock

    from relay.model.entry import new_id
    from relay.spool.disk import DiskSpool
    from tests.test_spool import make_envelope

    clock = Clock()
    clock.advance(time.time())
    spool = DiskSpool(path, lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw), clock)
    ids = []
    for start in range(0, n, batch):
        envelopes = []
        for i in range(start, min(n, start + batch)):
            envelope = make_envelope(new_id(), recipients=(f"u{i}@d{i % domains}.example",))
            if i % 2:
                envelope = dataclasses.replace(envelope, next_hop_choices=())
            envelopes.append(envelope)
        d = spool.enqueue(envelopes)
        for entry in d.result:  # type: ignore[attr-defined]
            spool.update(dataclasses.replace(entry, next_attempt_at=entry.created_at + 86400))
            ids.append(entry.id)
    return ids


class LargeQueueTests(TwistdTestCase):
    """
    C{relayctl} against a real relay holding 5,000 entries: every listing
    streams whole, the filters and the summary see them all.
    """

    ENTRIES = 5000
    DOMAINS = 50

    @inlineCallbacks
    def test_relayctl_at_5000_entries(self) -> Any:
        """
        With 5,000 deferred entries, C{relayctl status} lists each once in
        every format, C{count} and C{summary} see them all, a filtered
        C{freeze} freezes the 100 entries of one domain and says so, and
        C{show} shows one of them.
        """
        ids = yield deferToThread(fill_spool, self.spool, self.ENTRIES, self.DOMAINS)
        port = free_port()
        process, output = self.start_twistd(
            "large", port, smarthost="127.0.0.1:9", extra=("--retry-intervals", "1d")
        )
        yield self.wait_listening(process, output, port)
        sock = os.path.join(self.base, "large.sock")
        if len(os.fsencode(sock)) > 107:
            sock = "large.sock"
        relayctl = self.relayctl_for(sock)

        out, err, code = yield relayctl("count")
        self.assertEqual((out, err, code), (
            f"active: {self.ENTRIES}\nfrozen: 0\nremoved: 0\nquarantine: 0\n", "", 0,
        ), self.output(output))  # fmt: skip

        out, err, code = yield relayctl("status", "--format", "ids")
        self.assertEqual((err, code), ("", 0))
        self.assertEqual(sorted(out.splitlines()), sorted(ids))
        out, err, code = yield relayctl("status")
        self.assertEqual((err, code), ("", 0))
        lines = out.splitlines()
        self.assertEqual((len(lines), lines[0].split()[0]), (self.ENTRIES + 1, "ID"))
        out, err, code = yield relayctl("status", "--format", "exim")
        self.assertEqual((err, code), ("", 0))
        self.assertEqual(out.count("\n\n"), self.ENTRIES)
        out, err, code = yield relayctl("status", "--format", "json")
        self.assertEqual((err, code), ("", 0))
        self.assertEqual(sorted(json.loads(line)["id"] for line in out.splitlines()), sorted(ids))

        out, err, code = yield relayctl("summary", "--top", "3")
        self.assertEqual((err, code), ("", 0))
        total, *rows = out.splitlines()[1:]
        self.assertEqual(total.split()[:3], ["TOTAL", str(self.ENTRIES), str(self.ENTRIES)])
        self.assertEqual([row.split()[:2] for row in rows],
                         [["d0.example", "100"], ["d1.example", "100"], ["d10.example", "100"]])  # fmt: skip
        out, err, code = yield relayctl("count", "--next-hop", "127.0.0.1:9", "--queue", "active")
        self.assertEqual((out, code), (f"active: {self.ENTRIES // 2}\n", 0))

        out, err, code = yield relayctl("freeze", "--recipient", "@d7.example")
        self.assertEqual((out, err, code), ("freeze: changed 100 of 100 matching entries\n", "", 0))
        out, err, code = yield relayctl("count")
        self.assertEqual(out, f"active: {self.ENTRIES - 100}\nfrozen: 100\nremoved: 0\nquarantine: 0\n")
        out, err, code = yield relayctl("status", "--queue", "frozen", "--format", "json")
        frozen = [json.loads(line) for line in out.splitlines()]
        self.assertEqual({e["recipients"][0].split("@")[1] for e in frozen}, {"d7.example"})

        out, err, code = yield relayctl("show", frozen[0]["id"])
        self.assertEqual((err, code), ("", 0))
        self.assertIn(f"id: {frozen[0]['id']}\nqueue: frozen\n", out)
        self.assertIn("reason: frozen by operator\n", out)
        self.assertIn("*** MESSAGE HEADERS ***\nSubject: hello\r\n", out)


class DANEDeliveryTests(TwistdTestCase):
    """
    The relay routing by MX through the DNS server it is given
    (C{--resolver}, C{--dnssec}), with DANE towards the MX host.
    """

    def dane_relay(self, matching: bool) -> Any:
        """
        A sink offering STARTTLS with a certificate for mx.example.net, a
        DNS server (in this process) whose signed zone makes it the MX of
        example.net with a DANE-EE record that matches its key or not, and
        the real relay asking that server (C{--resolver}, C{--dnssec}),
        delivering to MX hosts on the sink's port (C{--mx-port}).
        """
        import hashlib

        from cryptography.hazmat.primitives import serialization
        from OpenSSL import crypto
        from twisted.internet import ssl
        from twisted.names import dns

        from tests.dnsserver import FakeZone, start_dns_server
        from tests.pki import pki

        leaf, key = pki().leaf("mx.example.net")
        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(leaf),
            extraCertChain=[crypto.X509.from_cryptography(pki().intermediate)],
        )
        sink, sink_port = self.start_sink(options)
        spki = leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        digest = hashlib.sha256(spki).digest()
        if not matching:
            digest = hashlib.sha256(b"another key").digest()
        zone = FakeZone()
        zone.add("example.net", dns.Record_MX(10, b"mx.example.net"), secure=True)
        zone.add("mx.example.net", dns.Record_A("127.0.0.1"), secure=True)
        zone.add_tlsa(f"_{sink_port}._tcp.mx.example.net", 3, 1, 1, digest)
        dns_host, dns_port = start_dns_server(self, zone)
        port = free_port()
        process, output = self.start_twistd(
            "first", port, smarthost=None,
            extra=("--retry-intervals", "1h", "--resolver", f"{dns_host}:{dns_port}", "--dnssec",
                   "--mx-port", str(sink_port)),
        )  # fmt: skip
        return sink, zone, process, output, port, sink_port

    @inlineCallbacks
    def test_delivers_over_dane(self) -> Any:
        """
        The running relay, asking the DNS server it is given, routes mail
        for example.net to its validated MX and delivers over TLS verified
        by the MX host's TLSA record (DANE-EE); the delivery line says
        C{tls=dane/dane/ok}; the system's resolver is never asked.
        """
        sink, zone, process, output, port, sink_port = self.dane_relay(matching=True)
        yield self.wait_listening(process, output, port)
        refused = yield deferToThread(send_message, port)
        self.assertEqual(refused, {})
        yield self.poll(lambda: sink.envelopes, lambda: "the message at the sink:\n" + self.output(output))
        [envelope] = sink.envelopes
        self.assertEqual([str(r) for r in envelope.recipients], ["bob@example.net"])
        self.assertIn(b" with ESMTPS id ", envelope.message.data)
        yield self.poll(lambda: "tls=dane/dane/ok" in self.output(output), "the delivery line")
        self.assertIn(("_" + str(sink_port) + "._tcp.mx.example.net", 52), zone.queries)

    @inlineCallbacks
    def test_defers_on_tlsa_mismatch(self) -> Any:
        """
        When the TLSA record does not match the MX host's certificate, the
        relay does not deliver: the attempt is deferred (4.7.5) with
        C{tls=dane/dane/validation-failure}, and the message stays queued.
        """
        sink, zone, process, output, port, _ = self.dane_relay(matching=False)
        yield self.wait_listening(process, output, port)
        refused = yield deferToThread(send_message, port)
        self.assertEqual(refused, {})
        yield self.poll(
            lambda: "tls=dane/dane/validation-failure, status=deferred" in self.output(output),
            lambda: "the deferred delivery line:\n" + self.output(output),
        )
        self.assertIn("4.7.5", self.output(output))
        self.assertEqual(sink.envelopes, [])
        active = os.path.join(self.spool, "active")
        self.assertTrue([p for p in files_under(active) if p.endswith(".json")], files_under(active))
