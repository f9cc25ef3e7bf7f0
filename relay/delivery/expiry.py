"""
The expiry of entries nobody needs any more: frozen entries that are
settled (every recipient delivered or failed, the failures reported)
after C{--bounced-lifetime}, and removed entries after
C{--removed-lifetime}.  An entry frozen by an operator (or a plugin) still
has pending recipients: it never expires.

Frozen and removed queues only grew before; Postfix removes bounced mail
at once and keeps nothing removed.  The lifetimes keep both around long
enough for an operator to look (7 days by default).

Each deletion is logged and announced as an C{expired} event (which the
metrics count).  The candidates are found from the queue directory alone
(entries unchanged for a lifetime, L{ISpool.unchanged_since}), so that a
large frozen queue is not read whole every hour; each candidate is then
read to check it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relay.control.events import EventBus
from relay.model.entry import FROZEN, REMOVED, SpoolEntry

#: the default lifetimes (7 days), and how often expiry runs
BOUNCED_LIFETIME = 7 * 86400.0
REMOVED_LIFETIME = 7 * 86400.0
INTERVAL = 3600.0
#: candidates looked at per queue in one run (the next run takes the rest)
BATCH = 10_000

log = Logger()


class Expiry:
    """
    Delete settled frozen entries and removed entries past their
    lifetimes, at start and every L{INTERVAL} seconds.

    @param bounced_lifetime: seconds a settled entry is kept frozen.
    @param removed_lifetime: seconds a removed entry is kept.
    """

    def __init__(
        self,
        spool: Any,
        clock: IReactorTime,
        events: EventBus,
        bounced_lifetime: float = BOUNCED_LIFETIME,
        removed_lifetime: float = REMOVED_LIFETIME,
        interval: float = INTERVAL,
    ) -> None:
        self.spool = spool
        self.clock = clock
        self.events = events
        self.lifetimes = {FROZEN: bounced_lifetime, REMOVED: removed_lifetime}
        self.interval = interval
        self._loop: LoopingCall | None = None
        self._running: Deferred[None] | None = None

    def start(self) -> None:
        loop = self._loop = LoopingCall(self.run)
        loop.clock = self.clock
        loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("Expiry stopped", f)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def run(self) -> Deferred[None]:
        """
        One pass over both queues; a pass already under way is not
        started twice.
        """
        if self._running is None:
            d = Deferred.fromCoroutine(self._pass())
            d.addErrback(lambda f: log.failure("Expiring entries failed", f))

            def done(result: object) -> None:
                self._running = None

            d.addBoth(done)
            if not d.called:
                self._running = d
            return d
        return self._running

    async def _pass(self) -> None:
        for queue, lifetime in self.lifetimes.items():
            before = self.clock.seconds() - lifetime
            candidates = await self.spool.unchanged_since(queue, before, BATCH)
            for _, entry_id in candidates:
                try:
                    entry: SpoolEntry = await self.spool.get(entry_id)
                except KeyError:
                    continue
                if expires(entry, queue, before):
                    await self.remove(entry, lifetime)

    async def remove(self, entry: SpoolEntry, lifetime: float) -> None:
        """
        Delete C{entry}, logged and announced.
        """
        await self.spool.finish(entry.id)
        what = "settled" if entry.queue == FROZEN else "removed"
        log.info(
            "{entry_id}: expired: {what} {age} days ago",
            event="expired", entry_id=entry.id, envelope_id=entry.envelope_id,
            queue=entry.queue, what=what,
            age=round((self.clock.seconds() - (entry.moved_at or entry.created_at)) / 86400, 1),
        )  # fmt: skip
        self.events.emit("expired", entry.id, queue=entry.queue)


def expires(entry: SpoolEntry, queue: str, before: float) -> bool:
    """
    Is C{entry}, found in C{queue}, past its lifetime (in its queue since
    before C{before})?  A frozen entry expires only when it is settled.
    """
    if entry.queue != queue or (entry.moved_at or entry.created_at) >= before:
        return False
    if queue == FROZEN:
        return entry.settled and not entry.unreported
    return queue == REMOVED
