"""
Drive an L{SMTPServerProtocol} over a L{StringTransport} with a
L{Clock}, and check SMTP transcripts against it.

A transcript is lines of text::

    < 220 test           expected server line (prefix match)
    < re:250[ -].*       expected server line (regular expression, full match)
    > EHLO client        client line, sent with CRLF

Client lines are sent as they come; each C{<} line takes the next line the
server wrote.  At the end no server line may remain unread.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from relay.server import SMTPServerFactory, SMTPServerProtocol
from relay.testing import MemorySpool


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} with a C{startTLS} that records its context.
    """

    tls_context: Any = None

    def startTLS(self, context: Any) -> None:
        self.tls_context = context


class Harness:
    """
    One server session over a L{TLSStringTransport} (or the C{transport}
    given).
    """

    def __init__(
        self,
        callbacks: Any,
        spool: Any = None,
        clock: Clock | None = None,
        factory: SMTPServerFactory | None = None,
        transport: StringTransport | None = None,
        **factory_kwargs: Any,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        if factory is None:
            self.spool = spool if spool is not None else MemorySpool(self.clock)
            factory = SMTPServerFactory(
                callbacks=callbacks, spool=self.spool, clock=self.clock, **factory_kwargs
            )
        else:
            self.spool = factory.spool
        self.factory = factory
        self.transport = transport if transport is not None else TLSStringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.25", 25),
            peerAddress=IPv4Address("TCP", "198.51.100.7", 40000),
        )
        self.protocol: SMTPServerProtocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self._pending = b""

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.protocol.dataReceived(data)

    def output(self) -> bytes:
        """
        Everything the server wrote since the last call.
        """
        data = self.transport.value()
        self.transport.clear()
        return data

    def lines(self) -> list[str]:
        """
        The complete lines the server wrote since the last call.
        """
        self._pending += self.output()
        *lines, self._pending = self._pending.split(b"\r\n")
        return [line.decode("utf-8", "replace") for line in lines]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def run_transcript(
    test: SynchronousTestCase, harness: Harness, script: str, exhaustive: bool = True
) -> None:
    """
    Play C{script} against C{harness}, failing C{test} on a mismatch.
    """
    queue: list[str] = []
    for raw in script.strip("\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, text = line.partition(" ")
        if kind == ">":
            harness.send(text.encode("utf-8") + b"\r\n")
        elif kind == "<":
            queue.extend(harness.lines())
            if not queue:
                test.fail(f"expected {text!r}, the server said nothing")
            got = queue.pop(0)
            if text.startswith("re:"):
                if re.fullmatch(text[3:], got) is None:
                    test.fail(f"expected /{text[3:]}/, got {got!r}")
            elif not got.startswith(text):
                test.fail(f"expected {text!r}, got {got!r}")
        else:
            raise ValueError(f"bad transcript line {raw!r}")
    if exhaustive:
        queue.extend(harness.lines())
        if queue:
            test.fail(f"unexpected server lines {queue!r}")
