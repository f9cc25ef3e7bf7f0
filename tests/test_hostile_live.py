"""
Hostile input against the real C{twistd relay} over 127.0.0.1: a
representative subset of L{tests.test_hostile}, each while a well-behaved
client (L{smtplib}) is served, with the relay's memory (C{VmHWM}, its peak
resident size) kept within a generous bound.

The outbound wire check: the relay delivers to an in-test sink that records
the raw bytes it receives, which must hold no bare CR or LF and, with DATA,
no unstuffed dot line, although the stored message holds lone CRs and dot
lines; with BDAT (the sink offers CHUNKING) the chunks hold the stored
bytes, dot lines as they are.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from relay.smtp.protocol import SMTPServerProtocol
from relay.smtp.server import SMTPServerFactory
from relay.testing import MemorySpool
from tests import test_integration as integration
from tests.test_integration import (
    TIMEOUT,
    SinkCallbacks,
    files_under,
    free_port,
    send_message,
)

# Generous: the relay idles at about 40 MB; buffering a 10 MB line (or 1000
# sessions' worth of input) would show as tens of MB more.
MAX_RSS_GROWTH = 48 * 1024 * 1024

SMUGGLING = [
    b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\n", b"\r.\r\n",
    b"\r\n\x00.\r\n", b"\n..\n", b"\r\n.\r\r\n",
]  # fmt: skip
SMUGGLED = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"


def memory_kib(pid: int, field: str = "VmHWM") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SkipTest(f"no {field} in /proc/{pid}/status")


class RawClient:
    """
    A blocking SMTP client that sends exactly the bytes it is given.
    """

    def __init__(self, port: int, buffers: int | None = None) -> None:
        """
        Connect to C{port}; with C{buffers}, make the socket's kernel
        buffers that small (before connecting, so that the window is small).
        """
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        if buffers is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
        self.sock.connect(("127.0.0.1", port))
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """
        The next complete reply, its lines joined by " / "; "EOF" when the
        relay has closed the connection.
        """
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.pending:
                data = self.sock.recv(65536)
                if not data:
                    return " / ".join(lines) if lines else "EOF"
                self.pending += data
            line, self.pending = self.pending.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return " / ".join(lines)

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        self.sock.close()


def parse_bdat_wire(wire: bytes) -> list[bytes]:
    """
    The messages a client sent in BDAT chunks, each its chunks up to the
    LAST one (its other commands skipped).
    """
    messages, chunks, pos = [], [], 0
    while (start := wire.find(b"BDAT ", pos)) >= 0:
        end = wire.index(b"\r\n", start)
        size, *last = wire[start + 5 : end].split()
        pos = end + 2 + int(size)
        chunks.append(wire[end + 2 : pos])
        if last:
            messages.append(b"".join(chunks))
            chunks = []
    return messages


class RecordingSinkFactory(SMTPServerFactory):
    """
    The next hop: an in-process relay server that records every byte the
    relay sends it; with C{chunking}, it offers CHUNKING.
    """

    def __init__(self, chunking: bool = True) -> None:
        self.sink = SinkCallbacks()
        super().__init__(
            callbacks=self.sink,
            spool=MemorySpool(),
            clock=reactor,
            hostname="sink.test",
            chunking=chunking,
        )
        # The bytes received, one list per connection.
        self.received: list[list[bytes]] = []

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:  # type: ignore[override]
        protocol = super().buildProtocol(addr)
        original = protocol.dataReceived
        received: list[bytes] = []
        self.received.append(received)

        def record(data: bytes) -> None:
            received.append(data)
            original(data)

        protocol.dataReceived = record  # type: ignore[method-assign]
        return protocol


class HostileLiveTests(TestCase):
    timeout = 4 * TIMEOUT

    # The integration tests' plumbing (not their tests: the class itself is
    # not imported here, or trial would run them again).
    setUp: Any = integration.TwistdRelayTests.setUp
    stop: Any = integration.TwistdRelayTests.stop
    poll: Any = integration.TwistdRelayTests.poll
    output: Any = integration.TwistdRelayTests.output
    wait_listening: Any = integration.TwistdRelayTests.wait_listening
    # Set by setUp.
    base: str
    spool: str
    quarantine: str

    @inlineCallbacks
    def start_relay(self, *extra: str, smarthost: str = "127.0.0.1:9", listen: str = "") -> Any:
        """
        Start C{twistd -n relay} with C{extra} options on a free port (with
        C{listen} appended to its endpoint string), wait until it listens;
        it is stopped at cleanup.

        @return: a L{Deferred} firing with (process, port).
        """
        port = free_port()
        process, output = integration.TwistdRelayTests.start_twistd(
            self, "relay", port, smarthost, extra=extra, listen=listen
        )
        self.relay_output = output
        yield self.wait_listening(process, output, port)
        return process, port

    @inlineCallbacks
    def during_attack(self, port: int, attack: Any, *args: Any) -> Any:
        """
        Run C{attack(*args)} in a thread while a well-behaved client sends a
        message; both must succeed.

        @return: a L{Deferred} firing with what C{attack} returned.
        """
        attacked = deferToThread(attack, *args)
        served = deferToThread(send_message, port)
        results = yield DeferredList([attacked, served], consumeErrors=True)
        for ok, value in results:
            if not ok:
                value.raiseException()
        self.assertEqual(results[1][1], {}, self.output(self.relay_output))
        return results[0][1]

    @inlineCallbacks
    def test_smuggling_and_outbound_wire(self) -> Any:
        """
        Every smuggling sequence in one DATA gives one message (the relay's
        replies: one 250 queued); the stored message keeps lone CRs and a
        lone dot line; the relay's bytes at a next hop without CHUNKING have
        no bare CR or LF and every dot line stuffed, and the sink gets
        exactly one message.
        """
        sink, bodies = yield self.smuggle_and_deliver(chunking=False)
        for chunks in sink.received:
            wire = b"".join(chunks)
            pos = 0
            while (start := wire.find(b"DATA\r\n", pos)) >= 0:
                start += len(b"DATA\r\n")
                pos = wire.index(b"\r\n.\r\n", start) + 2
                bodies.append(wire[start:pos])
        self.assertEqual(len(bodies), 2)
        for body in bodies:
            for line in body.split(b"\r\n"):
                if line.startswith(b"."):
                    self.assertTrue(line.startswith(b".."), line)
        [attack] = [b for b in bodies if b"smuggling" in b]
        self.assertEqual(attack.count(SMUGGLED), len(SMUGGLING))
        self.assertIn(b"\r\n..\r\n", attack)
        self.assertIn(b"\r\n..leading dot\r\n", attack)

    @inlineCallbacks
    def test_smuggling_and_outbound_chunks(self) -> Any:
        """
        The same message to a next hop that offers CHUNKING goes in BDAT
        chunks: still no bare CR or LF on the wire, the dot lines as they
        are (a chunk has no end marker to guard), and the sink stores the
        message the relay stored, lone CRs made CRLF.
        """
        sink, bodies = yield self.smuggle_and_deliver(chunking=True)
        for chunks in sink.received:
            wire = b"".join(chunks)
            self.assertNotIn(b"DATA\r\n", wire.replace(SMUGGLED, b""))
            bodies += parse_bdat_wire(wire)
        self.assertEqual(len(bodies), 2)
        [attack] = [b for b in bodies if b"smuggling" in b]
        self.assertEqual(attack.count(SMUGGLED), len(SMUGGLING))
        self.assertIn(b"\r\n.\r\n", attack)
        self.assertIn(b"\r\n.leading dot\r\n", attack)
        [stored] = [e for e in sink.sink.envelopes if b"smuggling" in e.message.data]
        self.assertTrue(stored.message.data.endswith(attack))

    @inlineCallbacks
    def smuggle_and_deliver(self, chunking: bool) -> Any:
        """
        Send the relay a message holding every smuggling sequence (and a
        well-behaved client's), then let it deliver both to a recording
        sink (offering CHUNKING or not).

        @return: a Deferred firing with the sink and an empty list (for
            the bodies the test finds on the wire); every connection's
            wire has been checked for bare CR and LF.
        """
        sink_port = free_port()
        process, port = yield self.start_relay(
            "--retry-intervals", "1", smarthost=f"127.0.0.1:{sink_port}"
        )
        body = b"Subject: smuggling\r\n\r\n"
        for seq in SMUGGLING:
            body += b"x" + seq + SMUGGLED + b"Smuggled\r\n"
        body += b"..leading dot\r\nbare\nlf\r\nend"

        def smuggle() -> list[str]:
            c = RawClient(port)
            replies = [c.reply()]
            c.send(b"EHLO attacker.example\r\n")
            replies.append(c.reply())
            c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            replies += [c.reply(), c.reply(), c.reply()]
            c.send(body + b"\r\n.\r\nQUIT\r\n")
            replies += [c.reply(), c.reply(), c.reply()]
            c.close()
            return replies

        replies = yield self.during_attack(port, smuggle)
        self.assertEqual(
            replies[2:5], ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
        )
        self.assertRegex(replies[5], r"^250 2\.0\.0 Ok: queued as \S+$")
        self.assertEqual(replies[6:], ["221 2.0.0 Bye", "EOF"])

        messages = os.path.join(self.spool, "messages")
        stored_paths = yield self.poll(
            lambda: [p for p in files_under(messages) if b"smuggling" in open(p, "rb").read()],
            "the stored message",
        )
        stored = open(stored_paths[0], "rb").read()
        self.assertRegex(stored, rb"\r(?!\n)")
        self.assertIn(b"\r\n.\r\n", stored)
        self.assertIn(b"\r\n.leading dot\r\n", stored)

        sink = RecordingSinkFactory(chunking=chunking)
        listener = reactor.listenTCP(sink_port, sink, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(listener.stopListening)
        # Two messages: the attacker's and the well-behaved client's.
        yield self.poll(lambda: len(sink.sink.envelopes) >= 2, "the messages at the sink")
        yield self.poll(
            lambda: not files_under(os.path.join(self.spool, "active")),
            "the spool's active queue to empty",
        )
        self.assertEqual(len(sink.sink.envelopes), 2)
        smuggled = [e for e in sink.sink.envelopes if b"smuggling" in e.message.data]
        self.assertEqual(len(smuggled), 1)
        self.assertEqual(smuggled[0].message.data.count(SMUGGLED), len(SMUGGLING))
        for chunks in sink.received:
            wire = b"".join(chunks)
            self.assertIsNone(re.search(rb"\r(?!\n)|(?<!\r)\n", wire), wire)
        return sink, []

    @inlineCallbacks
    def test_refused_data_pipelining_and_bare_cr(self) -> Any:
        """
        A message pipelined behind a refused DATA is never run: 503, then
        554 5.5.0 and the close; a bare CR command is 500 and the session
        goes on.
        """
        process, port = yield self.start_relay()

        def attack() -> list[str]:
            c = RawClient(port)
            replies = [c.reply()]
            c.send(b"EHLO attacker.example\r\n")
            replies.append(c.reply())
            c.send(b"NOOP\rQUIT\r\n")
            replies.append(c.reply())
            c.send(b"DATA\r\n" + SMUGGLED + b"x\r\n.\r\n")
            replies += [c.reply(), c.reply(), c.reply()]
            c.close()
            return replies

        replies = yield self.during_attack(port, attack)
        self.assertEqual(
            replies[2:],
            [
                "500 5.5.2 Bare CR not allowed in commands",
                "503 5.5.1 Error: need MAIL command",
                "554 5.5.0 SMTP synchronization error: input sent after a refused DATA",
                "EOF",
            ],
        )

    @inlineCallbacks
    def test_starttls_injection(self) -> Any:
        """
        "STARTTLS\\r\\nRSET\\r\\n" in one packet: the relay answers 220 only;
        inside TLS the first reply is the one to our EHLO, not RSET's 250.
        """
        from OpenSSL import crypto
        from twisted.internet import ssl as tssl

        cert = tssl.KeyPair.generate(size=2048).selfSignedCert(1, CN="relay.test")
        certfile, keyfile = os.path.join(self.base, "cert.pem"), os.path.join(self.base, "key.pem")
        with open(certfile, "wb") as f:
            f.write(cert.dumpPEM())
        with open(keyfile, "wb") as f:
            f.write(cert.privateKey.dump(crypto.FILETYPE_PEM))
        process, port = yield self.start_relay("--tls-cert", certfile, "--tls-key", keyfile)

        def inject() -> list[str]:
            import ssl

            c = RawClient(port)
            replies = [c.reply()]
            c.send(b"EHLO attacker.example\r\n")
            replies.append(c.reply())
            c.send(b"STARTTLS\r\nRSET\r\n")
            replies.append(c.reply())
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            c.sock = context.wrap_socket(c.sock)
            c.send(b"EHLO attacker.example\r\n")
            replies.append(c.reply())
            c.send(b"QUIT\r\n")
            replies.append(c.reply())
            c.close()
            return replies

        replies = yield self.during_attack(port, inject)
        self.assertIn("250 STARTTLS", replies[1])
        self.assertEqual(replies[2], "220 2.0.0 Ready to start TLS")
        self.assertTrue(replies[3].startswith("250-relay.test / 250-PIPELINING"), replies[3])
        self.assertNotIn("STARTTLS", replies[3])
        self.assertEqual(replies[4], "221 2.0.0 Bye")

    @inlineCallbacks
    def test_ten_megabyte_lines(self) -> Any:
        """
        A 10 MB command line gets one 500 5.5.2 and the session goes on; a
        10 MB line in DATA is one message; the relay's peak memory grows by
        less than MAX_RSS_GROWTH.
        """
        process, port = yield self.start_relay()
        before = memory_kib(process.pid, "VmRSS")

        def attack() -> list[str]:
            c = RawClient(port)
            replies = [c.reply()]
            c.send(b"EHLO attacker.example\r\n")
            replies.append(c.reply())
            c.send(b"A" * 10_000_000)
            replies.append(c.reply())
            c.send(b"\r\nNOOP\r\n")
            replies.append(c.reply())
            c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            replies += [c.reply(), c.reply(), c.reply()]
            c.send(b"Subject: long\r\n\r\n" + b"B" * 10_000_000 + b"\r\n.\r\n")
            replies.append(c.reply())
            c.close()
            return replies

        replies = yield self.during_attack(port, attack)
        self.assertEqual(replies[2:4], ["500 5.5.2 Line too long", "250 2.0.0 Ok"])
        self.assertEqual(
            replies[4:7], ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
        )
        self.assertRegex(replies[7], r"^250 2\.0\.0 Ok: queued as ")
        peak = memory_kib(process.pid, "VmHWM")
        self.assertLess((peak - before) * 1024, MAX_RSS_GROWTH, (before, peak))

    @inlineCallbacks
    def test_client_not_reading_replies(self) -> Any:
        """
        A client that pipelines HELPs and never reads the replies: the relay
        stops reading from it (flow control) well before it has sent 20 MB,
        its memory stays bounded, and a well-behaved client is served.
        """
        process, port = yield self.start_relay()
        before = memory_kib(process.pid, "VmRSS")

        def flood() -> int:
            c = RawClient(port, buffers=16384)
            c.reply()
            c.sock.settimeout(1)
            chunk = b"HELP\r\n" * 10_000
            sent = 0
            try:
                while sent < 20_000_000:
                    c.sock.sendall(chunk)
                    sent += len(chunk)
            except TimeoutError:
                pass
            c.close(reset=True)
            return sent

        sent = yield self.during_attack(port, flood)
        self.assertLess(sent, 20_000_000)
        peak = memory_kib(process.pid, "VmHWM")
        self.assertLess((peak - before) * 1024, MAX_RSS_GROWTH, (before, peak))

    @inlineCallbacks
    def test_thousand_connections_dropped(self) -> Any:
        """
        1000 connections opened and dropped mid-command (half closed, half
        reset) leave the relay's open session count (its metrics) at 0, its
        memory bounded, and a well-behaved client served meanwhile.
        """
        metrics_port = free_port()
        # Twisted's default listen backlog, 50, overflows under a burst of
        # connects when the relay is not scheduled at once (a busy 2-core
        # machine): the kernel drops SYNs and each retry costs 1 s.
        process, port = yield self.start_relay(
            "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1", listen=":backlog=1024"
        )
        before = memory_kib(process.pid, "VmRSS")
        stages = [
            b"EH",
            b"EHLO x\r\nMAIL FROM:<a@exa",
            b"EHLO x\r\nMAIL FROM:<a@example.com>\r\n",
            b"A" * 4000,
        ]

        def attack() -> int:
            dropped = 0
            for _ in range(10):
                clients = [RawClient(port) for _ in range(100)]
                for i, c in enumerate(clients):
                    c.send(stages[i % len(stages)])
                for i, c in enumerate(clients):
                    c.close(reset=bool(i % 2))
                    dropped += 1
            return dropped

        dropped = yield self.during_attack(port, attack)
        self.assertEqual(dropped, 1000)

        def sessions() -> float:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                text = response.read().decode("utf-8")
            [value] = re.findall(r"^relay_sessions (\S+)$", text, re.M)
            return float(value)

        @inlineCallbacks
        def no_sessions() -> Any:
            for _ in range(int(TIMEOUT / 0.1)):
                count = yield deferToThread(sessions)
                if count == 0:
                    return count
                yield deferLater(reactor, 0.1, lambda: None)
            return count

        count = yield no_sessions()
        self.assertEqual(count, 0)
        peak = memory_kib(process.pid, "VmHWM")
        self.assertLess((peak - before) * 1024, MAX_RSS_GROWTH, (before, peak))

    @inlineCallbacks
    def test_auth_brute_force(self) -> Any:
        """
        Five wrong passwords in one session: four 535 (the last two after
        the 2 s delay) and then 421 4.7.0 with the close; the right
        password on another connection works meanwhile.
        """
        process, port = yield self.start_relay(
            "--auth", "memory:alice:secret", "--allow-auth-without-tls"
        )

        def brute_force() -> list[str]:
            c = RawClient(port)
            replies = [c.reply()]
            c.send(b"EHLO attacker.example\r\n")
            replies.append(c.reply())
            for _ in range(5):
                c.send(b"AUTH PLAIN AGFsaWNlAGd1ZXNz\r\n")  # alice / guess
                replies.append(c.reply())
            replies.append(c.reply())
            c.close()
            return replies

        def well_behaved() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
                client.ehlo("client.example.com")
                client.login("alice", "secret")
                return client.sendmail(
                    "alice@example.com", ["bob@example.net"], b"Subject: x\r\n\r\nx\r\n"
                )

        replies = yield self.during_attack(port, brute_force)
        self.assertIn("AUTH PLAIN LOGIN", replies[1])
        self.assertEqual(
            replies[2:],
            ["535 5.7.8 Authentication credentials invalid"] * 4
            + ["421 4.7.0 relay.test Error: too many failed authentication attempts", "EOF"],
        )
        refused = yield deferToThread(well_behaved)
        self.assertEqual(refused, {})

    @inlineCallbacks
    def test_slow_client(self) -> Any:
        """
        A client that sends one byte every 2 s with --idle-timeout 1 is
        closed with 421 4.4.2 after its first silence, while a well-behaved
        client is served.
        """
        process, port = yield self.start_relay("--idle-timeout", "1")

        def drip() -> list[str]:
            c = RawClient(port)
            replies = [c.reply()]
            c.sock.settimeout(2)
            for byte in b"EHLO slow.example\r\n":
                c.send(bytes([byte]))
                try:
                    replies.append(c.reply())
                    break
                except TimeoutError:
                    continue
            c.sock.settimeout(TIMEOUT)
            replies.append(c.reply())
            c.close()
            return replies

        replies = yield self.during_attack(port, drip)
        self.assertEqual(replies[1:], ["421 4.4.2 relay.test Error: timeout exceeded", "EOF"])

    @inlineCallbacks
    def test_chunking_attacks(self) -> Any:
        """
        BDAT against the real relay while a well-behaved client is served:
        a 50 MB message in 1 MB chunks, pipelined, is queued with the
        relay's peak memory growing by less than MAX_RSS_GROWTH (the chunks
        stream to disk); a chunk of 10**20 bytes gets 552 5.3.4 and the
        close; a client that announces a chunk and falls silent is closed
        by the idle timeout.
        """
        process, port = yield self.start_relay(
            "--max-message-size", str(60 * 1024 * 1024), "--idle-timeout", "3"
        )
        before = memory_kib(process.pid, "VmRSS")
        envelope = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"

        def big() -> list[str]:
            c = RawClient(port)
            replies = [c.reply()]
            c.send(b"EHLO big.example\r\n")
            replies.append(c.reply())
            c.send(envelope)
            replies += [c.reply(), c.reply()]
            chunk = b"Subject: big\r\n\r\n".ljust(1024 * 1024 - 2, b"x") + b"\r\n"
            for n in range(50):
                c.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if n == 49 else b"") + chunk)
            replies += [c.reply() for _ in range(50)]
            c.close()
            return replies

        replies = yield self.during_attack(port, big)
        self.assertIn("CHUNKING", replies[1])
        self.assertEqual(replies[4:53], ["250 2.0.0 Ok: 1048576 bytes"] * 49)
        self.assertRegex(replies[53], r"^250 2\.0\.0 Ok: queued as ")
        peak = memory_kib(process.pid, "VmHWM")
        self.assertLess((peak - before) * 1024, MAX_RSS_GROWTH, (before, peak))

        def huge_and_silent() -> list[str]:
            replies = []
            for command in (b"BDAT 100000000000000000000 LAST\r\nxyz", b"BDAT 1000\r\nsome"):
                c = RawClient(port)
                c.reply()
                c.send(b"EHLO attacker.example\r\n")
                c.reply()
                c.send(envelope)
                c.reply(), c.reply()
                c.send(command)
                replies += [c.reply(), c.reply()]
                c.close()
            return replies

        replies = yield self.during_attack(port, huge_and_silent)
        self.assertEqual(
            replies,
            [
                "552 5.3.4 Message size exceeds fixed limit",
                "EOF",
                "421 4.4.2 relay.test Error: timeout exceeded",
                "EOF",
            ],
        )
