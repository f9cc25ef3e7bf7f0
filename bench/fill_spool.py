"""
Fill a relay spool with a backlog of deferred entries through the spool's
own writer, for C{bench/bench_queue.py}; or make every active entry of a
spool due now.

    .venv/bin/python bench/fill_spool.py --spool DIR --entries 100000 \\
        --next-hop 127.0.0.1:2525
    .venv/bin/python bench/fill_spool.py --spool DIR --due-now

Each entry is one envelope with one recipient, C{user<n>@d<n % domains>.test},
and its own message (2 KiB of payload under the headers C{smtp-source -l
2048} sends), enqueued with L{DiskSpool.enqueue} in batches (one group
commit each), then deferred with L{DiskSpool.update}: one failed attempt
(451) recorded, the first retry interval used, the next attempt a day
ahead, as an outage would leave it.  Nothing here writes a spool file
itself, so the backlog is in whatever format and layout the relay's spool
writes today.

The spool runs on a real reactor and thread pool, as in the relay: the
updates of one batch are all in flight at once, so that a spool that
batches its updates does so here too, and one that does not still has its
fsyncs running side by side in the pool's threads.

The last line on stdout is a JSON object with the figures (seconds spent
enqueueing and deferring, entries written); progress goes to stderr.  The
relay must not run on the spool (the spool's lock is taken).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from email.utils import formatdate
from functools import partial
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.threads import deferToThreadPool  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from relay.model.address import EmailAddress, Sender  # noqa: E402
from relay.model.entry import Attempt, SpoolEntry, new_id  # noqa: E402
from relay.model.envelope import Envelope, EnvelopeWithNextHop  # noqa: E402
from relay.model.message import Message  # noqa: E402
from relay.spool.disk import DiskSpool  # noqa: E402

SENDER = "bench@example.com"
DAY = 86400.0
DEFERRAL = "451 4.3.0 bench: next hop unreachable"


def recipient(n: int, domains: int) -> str:
    return f"user{n}@d{n % domains}.test"


def payload(size: int) -> bytes:
    """
    C{size} bytes of numbered lines of X, as C{smtp-source -l SIZE} sends.
    """
    lines = []
    total = 0
    n = 1
    while total < size:
        line = (str(n) + "X" * 78)[:78] + "\r\n"
        lines.append(line)
        total += len(line)
        n += 1
    return "".join(lines).encode("ascii")[:size]


def message(rcpt: str, number: int, body: bytes) -> Message:
    head = (
        f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nDate: {formatdate()}\r\n"
        f"Message-Id: <{number}.bench@fill.invalid>\r\n\r\n"
    )
    return Message.from_bytes(head.encode("ascii") + body)


def envelopes(first: int, count: int, domains: int, body: bytes, hop: str | None) -> list[Any]:
    sender = Sender.of(SENDER)
    result = []
    for n in range(first, first + count):
        rcpt = recipient(n, domains)
        envelope = Envelope(
            id=new_id(),
            sender=sender,
            sender_args=(),
            recipients=(EmailAddress.parse(rcpt),),
            message=message(rcpt, n, body),
        )
        result.append(EnvelopeWithNextHop(envelope, (hop,) if hop else ()))
    return result


def deferred(entry: SpoolEntry, now: float, hop: str) -> SpoolEntry:
    """
    C{entry} after one attempt that the next hop deferred: due in a day.
    """
    attempt = Attempt(now, hop, 451, DEFERRAL, tuple(str(r) for r in entry.recipients))
    return dataclasses.replace(entry.with_attempts([attempt]), step=1, next_attempt_at=now + DAY)


async def all_of(ds: list[defer.Deferred[Any]]) -> None:
    """
    Wait for every one of C{ds}; raise the first failure.
    """
    results = await defer.DeferredList(ds, consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()


def progress(message: str) -> None:
    print(f"fill_spool: {message}", file=sys.stderr, flush=True)


async def fill(spool: DiskSpool, args: argparse.Namespace) -> dict[str, Any]:
    body = payload(args.size)
    enqueue_s = defer_s = 0.0
    step = max(1, args.entries // 10)
    reported = 0
    for first in range(0, args.entries, args.batch):
        count = min(args.batch, args.entries - first)
        batch = envelopes(first, count, args.domains, body, args.next_hop)
        start = time.monotonic()
        entries = await spool.enqueue(batch)
        enqueue_s += time.monotonic() - start
        now = time.time()
        start = time.monotonic()
        await all_of([spool.update(deferred(e, now, args.next_hop or "MX")) for e in entries])
        defer_s += time.monotonic() - start
        if first + count >= reported + step:
            reported = first + count
            progress(
                f"{reported} of {args.entries} ({enqueue_s:.0f} s enqueue, {defer_s:.0f} s defer)"
            )
    return {"entries": args.entries, "enqueue_s": enqueue_s, "defer_s": defer_s}


async def due_now(spool: DiskSpool, args: argparse.Namespace) -> dict[str, Any]:
    """
    Make every active entry due now (for a relay that cannot be told to
    send them all: it is restarted on the spool afterwards).
    """
    start = time.monotonic()
    found = await spool.due(time.time() + 100 * 365 * DAY, 1 << 31)
    ids = [entry_id for _, entry_id in found]
    del found
    now = time.time()

    async def one(entry_id: str) -> None:
        entry = await spool.get(entry_id)
        await spool.update(dataclasses.replace(entry, next_attempt_at=now))

    for first in range(0, len(ids), args.batch):
        await all_of(
            [defer.Deferred.fromCoroutine(one(i)) for i in ids[first : first + args.batch]]
        )
    return {"entries": len(ids), "due_s": time.monotonic() - start}


async def main(reactor: Any, args: argparse.Namespace) -> None:
    pool = ThreadPool(minthreads=1, maxthreads=args.threads, name="fill_spool")
    pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    spool = DiskSpool(
        args.spool,
        partial(deferToThreadPool, reactor, pool),
        reactor,
        quarantine_path=args.quarantine,
        remember=False,
    )
    os.makedirs(args.spool, mode=0o700, exist_ok=True)
    spool.lock()
    try:
        figures = await (due_now(spool, args) if args.due_now else fill(spool, args))
    finally:
        spool.unlock()
    print(json.dumps(figures), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spool", required=True, help="the spool directory")
    parser.add_argument("--quarantine", help="its quarantine (default: SPOOL/quarantine)")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--domains", type=int, default=1000, help="recipient domains")
    parser.add_argument("--size", type=int, default=2048, help="payload bytes per message")
    parser.add_argument(
        "--next-hop", help="HOST:PORT each entry is routed to (default: the default route)"
    )
    parser.add_argument(
        "--batch", type=int, default=1000, help="envelopes per enqueue (one group commit)"
    )
    parser.add_argument("--threads", type=int, default=8, help="the spool's thread pool")
    parser.add_argument(
        "--due-now", action="store_true", help="make every active entry due now, and fill nothing"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, options)))
