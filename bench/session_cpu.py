"""
The CPU time one SMTP session costs relay's server in Python, without the
kernel: a W1-like session (EHLO, MAIL, RCPT, DATA of 2 KiB, QUIT) through
L{SMTPServerProtocol} over a C{StringTransport}, with L{relay.Simple} and a
L{MemorySpool}; best of 3 loops of N sessions.  Process CPU time is far
less sensitive to a busy machine than a rate; C{--calls} counts the Python
function calls per session instead (cProfile), which does not vary at all.

    .venv/bin/python bench/session_cpu.py [--sessions 3000] [--calls]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from relay import Simple
from relay.smtp.server import SMTPServerFactory
from relay.testing import MemorySpool

BODY = (b"Subject: x\r\n\r\n" + b"y" * 70 + b"\r\n") * 28 + b".\r\n"
COMMANDS = (
    b"EHLO client.example\r\n",
    b"MAIL FROM:<a@example.com>\r\n",
    b"RCPT TO:<b@example.net>\r\n",
    b"DATA\r\n",
    BODY,
    b"QUIT\r\n",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--calls", action="store_true")
    args = parser.parse_args()
    globalLogPublisher.addObserver(lambda event: None)
    spool = MemorySpool()
    factory = SMTPServerFactory(
        callbacks=Simple(), spool=spool, clock=Clock(), hostname="relay.bench"
    )

    def session(i: int) -> bytes:
        peer = IPv4Address("TCP", "127.0.0.1", 4000 + i % 20000)
        transport = StringTransport(
            peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 25)
        )
        protocol = factory.buildProtocol(peer)
        protocol.makeConnection(transport)
        for data in COMMANDS:
            protocol.dataReceived(data)
        protocol.connectionLost(None)  # type: ignore[arg-type]
        return bytes(transport.value())

    assert b"250 2.0.0 Ok: queued" in session(0)
    if args.calls:
        profile = cProfile.Profile()
        profile.enable()
        for i in range(args.sessions):
            session(i)
        profile.disable()
        calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
        print(f"{calls / args.sessions:.0f} Python function calls per session")
        return
    best = float("inf")
    for _ in range(3):
        spool.entries_by_id.clear()
        spool.messages_by_id.clear()
        start = time.process_time()
        for i in range(args.sessions):
            session(i)
        best = min(best, time.process_time() - start)
    print(f"{best / args.sessions * 1e6:.0f} us CPU per session (best of 3 x {args.sessions})")


if __name__ == "__main__":
    main()
