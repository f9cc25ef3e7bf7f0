"""
An accept-only twisted.mail ESMTP server for the benchmark: each message's
lines go to its own file, which is flushed and fsynced (in the reactor's
thread pool) at the end of the message, before the 250 reply.

    python bench/peers/twisted_mail_fsync.py --port PORT --dir DIR

Listens on 127.0.0.1 only and prints C{ready} once it does.
"""

from __future__ import annotations

import argparse
import itertools
import os
from typing import Any, BinaryIO

from twisted.internet import endpoints, reactor, threads
from twisted.internet.defer import Deferred
from twisted.mail import smtp
from zope.interface import implementer


def flush_and_sync(handle: BinaryIO) -> None:
    try:
        handle.flush()
        os.fsync(handle.fileno())
    finally:
        handle.close()


@implementer(smtp.IMessage)
class FsyncMessage:
    def __init__(self, path: str) -> None:
        self.handle: BinaryIO = open(path, "xb", buffering=65536)  # noqa: SIM115

    def lineReceived(self, line: bytes) -> None:
        self.handle.write(line + b"\r\n")

    def eomReceived(self) -> Deferred[str]:
        return threads.deferToThread(flush_and_sync, self.handle).addCallback(lambda _: "stored")

    def connectionLost(self) -> None:
        self.handle.close()


@implementer(smtp.IMessageDelivery)
class FsyncDelivery:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.counter = itertools.count()

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return lambda: FsyncMessage(os.path.join(self.directory, f"{next(self.counter)}.eml"))


class FsyncFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    domain = b"twisted-mail.bench.invalid"

    def __init__(self, delivery: FsyncDelivery) -> None:
        super().__init__()
        self.delivery = delivery

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        protocol.delivery = self.delivery
        return protocol


def main(args: argparse.Namespace) -> None:
    endpoint = endpoints.serverFromString(
        reactor, f"tcp:{args.port}:interface=127.0.0.1:backlog=1024"
    )
    listening = endpoint.listen(FsyncFactory(FsyncDelivery(args.dir)))
    listening.addCallback(lambda _: print("ready", flush=True))
    listening.addErrback(lambda failure: (print(failure), reactor.stop()))
    reactor.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    main(parser.parse_args())
