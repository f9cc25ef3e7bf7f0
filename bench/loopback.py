"""
End-to-end loopback run: N messages through a real C{twistd relay} to a
sink, reporting accepted and delivered messages per second.

    .venv/bin/python bench/loopback.py --messages 500 --concurrency 10

The sink is relay's own ESMTP server with a plugin that consumes each
message, in this process; the clients are smtplib in threads, one
connection per message.  Everything is on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relay import Consume, Simple  # noqa: E402
from relay.smtp.server import SMTPServerFactory  # noqa: E402
from relay.testing import MemorySpool  # noqa: E402


class Sink(Simple):
    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0

    def process_envelope(self, log, session, envelope):  # type: ignore[no-untyped-def]
        self.count += 1
        self.last = time.monotonic()
        return Consume("sunk")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send_all(port: int, count: int, concurrency: int, size: int) -> float:
    body = b"Subject: bench\r\n\r\n" + (b"x" * 70 + b"\r\n") * max(1, size // 72)

    def one(i: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
            c.sendmail("bench@example.com", [f"rcpt{i}@example.net"], body)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    return time.monotonic()


async def main(args: argparse.Namespace) -> None:
    sink = Sink()
    listener = reactor.listenTCP(
        0, SMTPServerFactory(callbacks=sink, spool=MemorySpool(), clock=reactor), interface="127.0.0.1"
    )
    base = tempfile.mkdtemp(prefix="relay-bench-")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile", os.path.join(base, "pid"), "--logfile", os.path.join(base, "log"), "relay",
         "--smtp", f"tcp:{port}:interface=127.0.0.1", "--spool", os.path.join(base, "spool"),
         "--quarantine", os.path.join(base, "q"), "--smarthost", f"127.0.0.1:{listener.getHost().port}",
         "--relay-tls", "none", "--max-send-jobs", str(args.send_jobs)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                await task.deferLater(reactor, 0.1, lambda: None)
        start = time.monotonic()
        accepted = await threads.deferToThread(send_all, port, args.messages, args.concurrency, args.size)
        for _ in range(int(args.timeout * 10)):
            if sink.count >= args.messages:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        print(f"messages={args.messages} size={args.size} concurrency={args.concurrency} "
              f"send_jobs={args.send_jobs}")
        print(f"accepted: {args.messages / (accepted - start):.0f} msg/s ({accepted - start:.2f} s)")
        if sink.count >= args.messages:
            print(f"end-to-end: {args.messages / (sink.last - start):.0f} msg/s ({sink.last - start:.2f} s)")
        else:
            print(f"end-to-end: only {sink.count} of {args.messages} reached the sink in {args.timeout}s")
    finally:
        process.terminate()
        process.wait(30)
        await listener.stopListening()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--send-jobs", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120)
    task.react(lambda _reactor, args: Deferred.fromCoroutine(main(args)), [parser.parse_args()])
