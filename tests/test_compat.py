"""
Tests for L{relay.app._compat}: each Twisted private API relay uses is
pinned here, so that a Twisted release that changes one fails a test
that names it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from relay.app import _compat
from tests import test_integration
from tests.test_integration import ROOT


def run_python(test: SynchronousTestCase, code: str) -> str:
    """
    Run C{code} in a fresh interpreter (relay importable); answer its
    standard output, failing C{test} if it fails.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, timeout=120
    )
    test.assertEqual(result.returncode, 0, result.stderr.decode("utf-8", "replace"))
    return result.stdout.decode("utf-8")


class EndpointParserTests(SynchronousTestCase):
    """
    C{twisted.internet.endpoints._parse} and C{_parseServer}.
    """

    def test_parse(self) -> None:
        """
        A description splits into its positional and keyword parts, with
        backslash escapes undone.
        """
        self.assertEqual(
            _compat.parse_endpoint("unix:/a\\:b:mode=0600"), (["unix", "/a:b"], {"mode": "0600"})
        )
        self.assertEqual(
            _compat.parse_endpoint("haproxy:tcp6:25:interface=\\:\\:1"),
            (["haproxy", "tcp6", "25"], {"interface": "::1"}),
        )

    def test_check_server_endpoint(self) -> None:
        """
        Known server endpoints with good arguments pass; an unknown type or
        a bad argument raises, without anything listening.
        """
        _compat.check_server_endpoint("tcp:2525:interface=127.0.0.1")
        _compat.check_server_endpoint("unix:/tmp/x.sock:mode=0600")
        for bad, error in (
            ("nonsense:1", ValueError),
            ("tcp:notaport", ValueError),
            ("tcp:25:bogus=1", TypeError),
        ):
            self.assertRaises(error, _compat.check_server_endpoint, bad)


class KeepOpenSSLOutTests(SynchronousTestCase):
    """
    Twisted's TCP transport and endpoints without pyOpenSSL.
    """

    def test_too_late(self) -> None:
        """
        Here (trial has the reactor, with TLS) it is too late: nothing is
        blocked and L{_compat.keep_openssl_out} says so.
        """
        self.assertFalse(_compat.keep_openssl_out())
        self.assertFalse(_compat.tls_kept_out())
        self.assertIn("OpenSSL", sys.modules)

    def test_kept_out(self) -> None:
        """
        Run first, it imports the TCP transport (without C{startTLS}) and
        the endpoints without pyOpenSSL, and the reactor, the SMTP server
        and the relay client import without it too; pyOpenSSL imports
        afterwards as usual.
        """
        out = run_python(
            self,
            """
            import sys
            from relay.app import _compat
            assert _compat.keep_openssl_out()
            from twisted.internet import reactor, tcp
            import relay.smtp.server, relay.delivery.client, relay.smtp.proxy
            assert not hasattr(tcp.Connection, "startTLS")
            assert "OpenSSL" not in sys.modules, "OpenSSL loaded"
            assert _compat.keep_openssl_out() and _compat.tls_kept_out()
            import OpenSSL.SSL
            print("ok")
            """,
        )
        self.assertEqual(out, "ok\n")


def cryptography_loaded(pid: int) -> bool:
    """
    Has process C{pid} loaded pyOpenSSL's native half (cryptography's
    bindings)?  Linux: from its memory maps.
    """
    with open(f"/proc/{pid}/maps") as f:
        return "/cryptography/" in f.read()


class TwistdWithoutOpenSSLTests(TestCase):
    """
    The real C{twistd relay} without TLS to serve does without pyOpenSSL,
    delivering included (helpers of L{tests.test_integration}).
    """

    timeout = 2 * test_integration.TIMEOUT
    setUp = test_integration.TwistdRelayTests.setUp
    start_twistd = test_integration.TwistdRelayTests.start_twistd
    stop = test_integration.TwistdRelayTests.stop
    poll = test_integration.TwistdRelayTests.poll
    output = test_integration.TwistdRelayTests.output
    wait_listening = test_integration.TwistdRelayTests.wait_listening
    start_sink = test_integration.TwistdRelayTests.start_sink

    @inlineCallbacks
    def test_receives_and_delivers_without_openssl(self) -> Any:
        """
        A message received and relayed to a next hop that offers no
        STARTTLS leaves pyOpenSSL unloaded.
        """
        sink, sink_port = self.start_sink()
        port = test_integration.free_port()
        process, output = self.start_twistd("plain", port, f"127.0.0.1:{sink_port}")
        yield self.wait_listening(process, output, port)
        refused = yield deferToThread(test_integration.send_message, port)
        self.assertEqual(refused, {})
        yield self.poll(lambda: len(sink.envelopes) == 1, "the message at the sink")
        self.assertFalse(cryptography_loaded(process.pid), self.output(output))


class StartTLSTests(SynchronousTestCase):
    """
    L{_compat.start_tls}: C{twisted.internet._newtls} on a TCP transport
    made without TLS.
    """

    def test_transport_with_start_tls(self) -> None:
        """
        A transport that has C{startTLS} is simply asked.
        """
        started: list[Any] = []

        class Transport(StringTransport):
            def startTLS(self, creator: Any) -> None:
                started.append(creator)

        transport = Transport()
        _compat.start_tls(transport, "creator")
        self.assertEqual(started, ["creator"])
        self.assertIs(type(transport), Transport)

    def test_newtls(self) -> None:
        """
        What L{_compat.start_tls} takes from Twisted: the TLS mixins for
        connections, clients and servers, and C{startTLS} going through the
        connection's protocol.
        """
        from twisted.internet import _newtls

        self.assertTrue(callable(_newtls.ConnectionMixin.startTLS))
        for name in ("write", "writeSequence", "loseConnection", "registerProducer"):
            self.assertTrue(callable(getattr(_newtls.ConnectionMixin, name)), name)
        self.assertIs(_newtls.ClientMixin._tlsClientDefault, True)
        self.assertIs(_newtls.ServerMixin._tlsClientDefault, False)

    def test_starttls_without_openssl_at_start(self) -> None:
        """
        Over real loopback TCP in a process whose transports came without
        TLS, both ends start TLS and exchange bytes encrypted; pyOpenSSL is
        imported only then.
        """
        out = run_python(
            self,
            """
            import sys
            from relay.app import _compat
            assert _compat.keep_openssl_out()
            from twisted.internet import protocol, reactor
            assert "OpenSSL" not in sys.modules

            from twisted.internet import ssl
            from twisted.internet.interfaces import ISSLTransport
            key = ssl.KeyPair.generate(size=2048)
            cert = key.selfSignedCert(1, CN="relay.test")
            results = {}

            class Server(protocol.Protocol):
                def connectionMade(self):
                    self.transport.write(b"go\\n")
                    _compat.start_tls(self.transport, cert.options())
                def dataReceived(self, data):
                    results["server"] = ISSLTransport.providedBy(self.transport)
                    self.transport.write(data.upper())

            class Client(protocol.Protocol):
                def dataReceived(self, data):
                    if data == b"go\\n":
                        _compat.start_tls(self.transport, ssl.CertificateOptions(verify=False))
                        self.transport.write(b"hello over tls")
                        return
                    results["client"] = (data, ISSLTransport.providedBy(self.transport))
                    self.transport.loseConnection()
                def connectionLost(self, reason):
                    reactor.stop()

            port = reactor.listenTCP(0, protocol.Factory.forProtocol(Server), interface="127.0.0.1")
            protocol.ClientCreator(reactor, Client).connectTCP("127.0.0.1", port.getHost().port)
            reactor.callLater(30, reactor.stop)
            reactor.run()
            print(results)
            """,
        )
        self.assertEqual(out, "{'server': True, 'client': (b'HELLO OVER TLS', True)}\n")


class EagerWriteTests(SynchronousTestCase):
    """
    What L{_compat.eager_write} reads of a TCP transport.
    """

    def test_buffers(self) -> None:
        """
        A transport's C{write} queues in C{_tempDataBuffer} (and
        C{dataBuffer}) until the reactor writes it: what must be empty for
        a direct send to keep the order.
        """
        from twisted.internet import abstract

        class Descriptor(abstract.FileDescriptor):
            def fileno(self) -> int:
                return -1

        descriptor = Descriptor(reactor=MemoryReactor())
        self.assertEqual((descriptor.dataBuffer, descriptor._tempDataBuffer), (b"", []))
        descriptor.connected = True
        descriptor.write(b"queued")
        self.assertEqual(descriptor._tempDataBuffer, [b"queued"])

    def test_plain_classes(self) -> None:
        """
        The plain TCP connections are C{tcp.Server} and C{tcp.Client}, with
        their C{TLS}, C{socket}, C{connected} and C{disconnecting}.
        """
        from twisted.internet import tcp

        for cls in (tcp.Server, tcp.Client):
            self.assertTrue(issubclass(cls, tcp.Connection))
        self.assertFalse(tcp.Connection.TLS)
        self.assertFalse(tcp.Connection.disconnecting)

    def test_other_transport(self) -> None:
        """
        Any other transport gets C{write}.
        """
        transport = StringTransport()
        _compat.eager_write(transport, b"250 ok\r\n")
        self.assertEqual(transport.value(), b"250 ok\r\n")


class HAProxyTests(SynchronousTestCase):
    """
    C{twisted.protocols.haproxy}'s parsers and wrapper, which
    L{relay.smtp.proxy} extends.
    """

    def test_v1_parser(self) -> None:
        """
        C{feed} answers the header's addresses and what follows it.
        """
        parser = _compat.V1Parser()
        self.assertEqual(_compat.V1Parser.PROXYSTR, b"PROXY")
        info, rest = parser.feed(b"PROXY TCP4 192.0.2.1 198.51.100.2 1234 25\r\nEHLO")
        self.assertIsInstance(info, _compat.ProxyInfo)
        assert info is not None
        self.assertEqual((info.source.host, info.source.port), ("192.0.2.1", 1234))
        self.assertEqual(rest, b"EHLO")
        self.assertRaises(_compat.InvalidProxyHeader, _compat.V1Parser().feed, b"PROXY BOGUS\r\n")

    def test_v2_parser(self) -> None:
        """
        The v2 signature, and a v2 header parsed with what follows it.
        """
        import struct

        prefix = _compat.V2Parser.PREFIX
        self.assertEqual(prefix, b"\r\n\r\n\x00\r\nQUIT\n")
        header = prefix + b"\x21\x11" + struct.pack("!H", 12)
        header += bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 1234, 25)
        info, rest = _compat.V2Parser().feed(header + b"EHLO")
        assert info is not None
        self.assertEqual((info.source.host, info.destination.port), ("192.0.2.1", 25))
        self.assertEqual(rest, b"EHLO")

    def test_wrapper_reads_proxy_info(self) -> None:
        """
        The wrapper answers C{getPeer}/C{getHost} from its C{_proxyInfo},
        and starts without a C{_parser}.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.protocol import Factory, Protocol

        factory = _compat.HAProxyWrappingFactory(Factory.forProtocol(Protocol))
        wrapper = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.assertIsInstance(wrapper, _compat.HAProxyProtocolWrapper)
        self.assertIsNone(wrapper._parser)
        source = IPv4Address("TCP", "192.0.2.1", 1234)
        wrapper._proxyInfo = _compat.ProxyInfo(b"", source, IPv4Address("TCP", "198.51.100.2", 25))
        self.assertEqual(wrapper.getPeer(), source)
        self.assertEqual(wrapper.getHost().port, 25)

    def test_unknown_name(self) -> None:
        """
        Only the names above are made on access.
        """
        self.assertRaises(AttributeError, getattr, _compat, "NoSuchThing")


class LoggingTests(SynchronousTestCase):
    """
    C{twisted.logger._flatten} and twistd's C{AppLogger} attributes.
    """

    def test_flatten_event(self) -> None:
        """
        Flattening stores each format field's text under its key, as
        C{eventAsJSON} does.
        """
        event: dict[str, Any] = {"log_format": "{peer!r} {n}", "peer": "p", "n": 1}
        _compat.flatten_event(event)
        self.assertEqual(event["log_flattened"]["peer!r:"], "'p'")
        self.assertEqual(event["log_flattened"]["n!:"], 1)

    def test_twistd_log_file(self) -> None:
        """
        The factory twistd's C{AppLogger.start} calls learns C{--nodaemon}
        and C{--logfile} from its caller; anyone else gets standard output.
        """
        from twisted.application import app
        from twisted.logger import LogBeginner, LogPublisher

        seen: list[tuple[bool, str]] = []

        def factory() -> Any:
            seen.append(_compat.twistd_log_file(sys._getframe(1)))
            return lambda event: None

        self.patch(app.logger, "globalLogBeginner", _quiet_beginner(LogBeginner, LogPublisher))
        applogger = app.AppLogger({"logger": factory, "logfile": "relay.log"})
        applogger._nodaemon = False  # type: ignore[attr-defined]
        self.assertEqual(applogger._logfilename, "relay.log")  # type: ignore[attr-defined]
        applogger.start(None)
        applogger.stop()
        self.assertEqual(seen, [(False, "relay.log")])
        self.assertEqual(_compat.twistd_log_file(sys._getframe(0)), (True, ""))

    def test_cache_log_times(self) -> None:
        """
        With L{_compat.cache_log_times}, twistd's text log (Twisted's
        C{textFileLogObserver}) writes the same lines, its time stamps
        worked out once a second.
        """
        import io

        from twisted.logger import _file, formatTime, textFileLogObserver

        self.patch(_file, "formatTime", formatTime)
        events = [
            {"log_format": "one {n}", "n": n, "log_time": t}
            for n, t in enumerate([1796136587.1, 1796136587.9, 1796136588.0, 1796136500.5])
        ]

        def lines() -> list[str]:
            out = io.StringIO()
            observer = textFileLogObserver(out)
            for event in events:
                observer(dict(event))
            return out.getvalue().splitlines()

        plain = lines()
        calls: list[float | None] = []

        def counted(when: float | None, *args: Any) -> str:
            calls.append(when)
            return formatTime(when, *args)

        self.patch(_file, "formatTime", counted)
        _compat.cache_log_times()
        _compat.cache_log_times()  # once is enough
        self.assertEqual(lines(), plain)
        self.assertEqual(calls, [1796136587.1, 1796136588.0, 1796136500.5])
        # Formats with fractions of a second, and no time, are not cached.
        cached = _file.formatTime
        self.assertEqual(cached(1.25, "%S.%f"), formatTime(1.25, "%S.%f"))
        self.assertEqual(cached(1.5, "%S.%f"), formatTime(1.5, "%S.%f"))
        self.assertEqual(cached(None), "-")


def _quiet_beginner(beginner: Any, publisher: Any) -> Any:
    import io
    from types import SimpleNamespace

    stdio = SimpleNamespace(stdout=io.StringIO(), stderr=io.StringIO())
    return beginner(publisher(), io.StringIO(), stdio, SimpleNamespace(showwarning=None))
