"""
A DNS server for tests: twisted.names' own server (L{DNSServerFactory})
answering from fake zones on 127.0.0.1, UDP and TCP on one port, setting
the AD bit for the names a test calls validated, so that the relay's DNS
client (L{relay.delivery.dns.DNSClient}) is tested against real messages
on a real socket, never the system's resolver.

    zone = FakeZone()
    zone.add("example.test", dns.Record_MX(10, b"mx.example.test"), secure=True)
    server = start_dns_server(test, zone)   # (host, port), stopped at cleanup
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer
from twisted.names import common, dns, server
from twisted.names.error import DNSNameError
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.dns import TLSA


class FakeZone(common.ResolverBase):
    """
    Records by name and type; the names whose answers are "validated"
    (the AD bit), those that fail (SERVFAIL, as a validating resolver
    answers a bogus name) and how many queries came for each.
    """

    def __init__(self) -> None:
        common.ResolverBase.__init__(self)
        self.records: dict[tuple[str, int], list[Any]] = {}
        self.names: set[str] = set()
        self.secure: set[str] = set()
        self.failing: set[str] = set()
        self.queries: list[tuple[str, int]] = []
        self.server: Any = None

    def add(self, name: str, *payloads: Any, secure: bool = False, rrtype: int | None = None) -> None:
        """
        Add C{payloads} at C{name} (their type from the payload, or
        C{rrtype} for unknown records such as TLSA).
        """
        name = name.lower()
        self.names.add(name)
        for payload in payloads:
            kind = rrtype if rrtype is not None else payload.TYPE
            self.records.setdefault((name, kind), []).append(payload)
        if secure:
            self.secure.add(name)

    def add_name(self, name: str, secure: bool = False) -> None:
        """
        C{name} exists (with no records of its own yet).
        """
        self.names.add(name.lower())
        if secure:
            self.secure.add(name.lower())

    def add_tlsa(self, name: str, usage: int, selector: int, matching: int, data: bytes,
                 secure: bool = True) -> None:  # fmt: skip
        self.add(name, dns.UnknownRecord(bytes([usage, selector, matching]) + data, ttl=60),
                 secure=secure, rrtype=TLSA)  # fmt: skip

    def _lookup(self, name: Any, cls: int, type: int, timeout: Any) -> Any:
        text = (name.decode("ascii") if isinstance(name, bytes) else str(name)).lower()
        self.queries.append((text, type))
        if text in self.failing:
            # Not a DomainError: the server answers SERVFAIL.
            return defer.fail(RuntimeError(f"{text} is bogus"))
        if text not in self.names:
            return defer.fail(DNSNameError(text))
        answers = [
            dns.RRHeader(text, type, dns.IN, 60, payload, auth=True)
            for payload in self.records.get((text, type), [])
        ]
        return defer.succeed((answers, [], []))


class _ADServer(server.DNSServerFactory):
    """
    The server, setting the AD bit in answers about the zone's secure names.
    """

    def __init__(self, zone: FakeZone) -> None:
        server.DNSServerFactory.__init__(self, authorities=[zone])
        self.zone = zone
        #: the AD bit of each query received
        self.asked_ad: list[bool] = []

    def messageReceived(self, message: Any, proto: Any, address: Any = None) -> None:
        self.asked_ad.append(bool(message.authenticData))
        server.DNSServerFactory.messageReceived(self, message, proto, address)

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:
        names = [q.name.name.decode("ascii").lower() for q in message.queries]
        message.authenticData = bool(names) and all(n in self.zone.secure for n in names)
        server.DNSServerFactory.sendReply(self, protocol, message, address)


def start_dns_server(test: SynchronousTestCase, zone: FakeZone, reactor: Any = None) -> tuple[str, int]:
    """
    Serve C{zone} on 127.0.0.1 (UDP and TCP on the same port) until the
    end of C{test}; the server factory is C{zone.server}.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    factory = _ADServer(zone)
    factory.noisy = False
    zone.server = factory
    for _ in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
        except Exception:
            udp.stopListening()
            continue
        test.addCleanup(udp.stopListening)
        test.addCleanup(tcp.stopListening)
        return "127.0.0.1", port
    raise RuntimeError("no port free for both UDP and TCP")


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
