"""
The delivery scheduler (the "queue manager"): it takes what comes due from
the L{DueQueue<relay.delivery.due.DueQueue>} (which holds only the entries
due soon; the rest wait on disk), runs at most C{max_send_jobs} deliveries
at once, records every attempt, and then finishes, reschedules, freezes or
bounces each entry.

Recipients are settled once: a delivered recipient is not tried again, a
failed one is reported to the sender once (C{reported}); an entry with no
pending recipient left is settled, and frozen for the operator (to expire
after C{--bounced-lifetime}) when any recipient failed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.control.events import EventBus
from relay.delivery.bounce import make_bounce
from relay.delivery.due import DueQueue
from relay.delivery.expiry import BOUNCED_LIFETIME, REMOVED_LIFETIME, Expiry
from relay.delivery.nexthop import Route
from relay.delivery.tlspolicy import tls_destination
from relay.interfaces import ISpoolObserver
from relay.logs import (
    BOUNCED,
    DEFERRED,
    EXPIRED,
    SENT,
    delivery_fields,
    delivery_format,
    iso_time,
)
from relay.model.address import EmailAddress
from relay.model.entry import ACTIVE, FROZEN, Attempt, SpoolEntry
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import Message
from relay.model.retry import DEFAULT_RETRY_INTERVALS, next_attempt

Router = Callable[[Sequence[EmailAddress], Sequence[str]], "Deferred[list[Route]]"]


def _code(reply: Any) -> int | None:
    code = getattr(reply, "code", None)
    return code if isinstance(code, int) else None


#: seconds before an entry whose delivery failed on our side is tried again
AFTER_FAILURE = 30.0


class DeliveryScheduler(Service):
    """
    Drain the active queue of C{spool} through C{client}.

    @ivar jobs: the ids being delivered, with their L{Deferred}s.
    """

    log = Logger()

    def __init__(
        self,
        *,
        spool: Any,
        client: Any,
        clock: IReactorTime,
        route: Router,
        max_send_jobs: int = 10,
        per_destination: int = 20,
        default_retry_intervals: Sequence[float] = (),
        bounce: bool = True,
        hostname: str = "localhost",
        smarthost: str | None = None,
        stop_timeout: float = 30.0,
        wait_for: Callable[[], Any] | None = None,
        log: Logger | None = None,
        events: EventBus | None = None,
        due: Callable[..., DueQueue] = DueQueue,
        bounced_lifetime: float = BOUNCED_LIFETIME,
        removed_lifetime: float = REMOVED_LIFETIME,
    ) -> None:
        self.spool = spool
        self.events = events if events is not None else EventBus(clock)
        self.client = client
        self.clock = clock
        self.route = route
        self.max_send_jobs = max_send_jobs
        self.per_destination = per_destination
        self.default_retry_intervals = tuple(default_retry_intervals) or DEFAULT_RETRY_INTERVALS
        self.bounce = bounce
        self.hostname = hostname
        self.smarthost = smarthost
        self.stop_timeout = stop_timeout
        self.wait_for = wait_for
        if log is not None:
            self.log = log
        self.jobs: dict[str, Deferred[None]] = {}
        self.queue = due(spool, clock, self._pump, busy=self.jobs.__contains__)
        # sent now by an operator, whatever their schedule says
        self._forced: set[str] = set()
        self.bounced_lifetime = bounced_lifetime
        self.expiry = Expiry(spool, clock, self.events, bounced_lifetime, removed_lifetime)
        self.again: set[str] = set()
        self.stopping = False
        self._hop_locks: dict[str, DeferredSemaphore] = {}

    # -- service ---------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self.stopping = False
        d: Deferred[Any] = defer.maybeDeferred(self.wait_for) if self.wait_for else defer.succeed(None)
        # No loading of the active queue: the due queue's first scan finds
        # what is due (and only that), however many entries wait.
        d.addCallback(lambda _: None if self.stopping else self._start_queues())
        d.addErrback(lambda f: self.log.failure("Cannot start delivering", f))

    def _start_queues(self) -> None:
        self.queue.start()
        self.expiry.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.stopping = True
        self.queue.stop()
        self.expiry.stop()
        done: Deferred[None] = Deferred()
        done.addCallback(self._close_idle_connections)
        if not self.jobs:
            done.callback(None)
            return done
        waiting = defer.DeferredList(list(self.jobs.values()), consumeErrors=True)

        def finished(_: object) -> None:
            if timeout.active():
                timeout.cancel()
            if not done.called:
                done.callback(None)

        def timed_out() -> None:
            self.log.warn(
                "Stopping with {n} deliveries still running; they stay in the spool",
                n=len(self.jobs),
            )
            if not done.called:
                done.callback(None)

        timeout = self.clock.callLater(self.stop_timeout, timed_out)
        waiting.addCallback(finished)
        return done

    def _close_idle_connections(self, _: object) -> Deferred[None] | None:
        """
        Say QUIT on the connections kept open for reuse, once no delivery
        needs them.
        """
        close_idle = getattr(self.client, "close_idle", None)
        if close_idle is None:
            return None
        d: Deferred[None] = defer.maybeDeferred(close_idle)
        return d.addErrback(lambda f: self.log.failure("Closing idle connections failed", f))

    # -- scheduling ------------------------------------------------------

    def notify(self, entries: Iterable[SpoolEntry]) -> None:
        """
        Schedule C{entries} (new or loaded) at their next attempt time.
        """
        for entry in entries:
            if entry.queue == ACTIVE:
                self.schedule(entry.id, entry.next_attempt_at)

    def schedule(self, entry_id: str, at: float) -> None:
        """
        C{entry_id} is next due at C{at}.
        """
        if self.stopping:
            return
        if entry_id in self.jobs and at <= self.clock.seconds():
            # Due again while it is being delivered: once more after that.
            self.again.add(entry_id)
            return
        # Taken by the due queue's timer, on a later turn of the reactor:
        # news of a commit does not make the client's 250 wait for the
        # start of a delivery.
        self.queue.push(entry_id, at)

    def _pump(self) -> None:
        while not self.stopping and len(self.jobs) < self.max_send_jobs:
            entry_id = self.queue.pop_due()
            if entry_id is None:
                return
            if entry_id in self.jobs:
                self.again.add(entry_id)
                continue
            d = Deferred.fromCoroutine(self._deliver(entry_id))
            self.jobs[entry_id] = d
            d.addErrback(self._log_failure, entry_id)
            d.addBoth(self._done, entry_id)

    def _log_failure(self, failure: Failure, entry_id: str) -> None:
        """
        A delivery that failed on our side (say the spool could not record
        the attempt: a full disk) is tried again after
        L{AFTER_FAILURE} seconds, lest the entry wait for the next restart.
        """
        self.log.failure(
            "Delivery of {id} failed; it stays in the spool and is tried again in {delay} s",
            failure, id=entry_id, delay=AFTER_FAILURE,
        )  # fmt: skip
        self.schedule(entry_id, self.clock.seconds() + AFTER_FAILURE)

    def _done(self, _: object, entry_id: str) -> None:
        self.jobs.pop(entry_id, None)
        if entry_id in self.again:
            self.again.discard(entry_id)
            self.queue.push(entry_id, self.clock.seconds())
        self._pump()

    def spooled(self, entries: Iterable[SpoolEntry]) -> None:
        """
        News of newly spooled entries (received here or by a receiver):
        an event each, and they are scheduled at once.
        """
        entries = list(entries)
        for entry in entries:
            self.events.emit("spooled", entry.id)
        try:
            self.notify(entries)
        except Exception:
            self.log.failure("Cannot schedule new entries")

    def quarantined(self, entries: Iterable[SpoolEntry], reason: str) -> None:
        """
        News of newly quarantined entries: an event each.
        """
        for entry in entries:
            self.events.emit("quarantined", getattr(entry, "id", None), reason=reason)

    def set_max_send_jobs(self, n: int) -> None:
        """
        Change the number of simultaneous deliveries.
        """
        if n < 1:
            raise ValueError("max_send_jobs must be at least 1")
        self.max_send_jobs = n
        self._pump()

    def send_now(self, entry_id: str) -> None:
        """
        Deliver C{entry_id} at once, whatever its schedule.
        """
        self._forced.add(entry_id)
        self.schedule(entry_id, self.clock.seconds())

    def unschedule(self, entry_id: str) -> None:
        """
        Forget the next attempt held for C{entry_id} (it is being frozen or
        removed); a delivery under way goes on.
        """
        self.queue.remove(entry_id)

    def is_known(self, entry_id: str) -> bool:
        """
        Is C{entry_id} held as due soon, or being delivered?
        """
        return entry_id in self.queue or entry_id in self.jobs

    def rescan(self) -> Deferred[None] | None:
        """
        Look at the active queue's directory now rather than at the next
        scan (a receiver that died may have committed entries it could not
        tell about).
        """
        if not self.running or self.stopping:
            return None
        return self.queue.scan()

    # -- one delivery ----------------------------------------------------

    def _hop_lock(self, hop: str) -> DeferredSemaphore:
        lock = self._hop_locks.get(hop)
        if lock is None:
            lock = self._hop_locks[hop] = DeferredSemaphore(self.per_destination)
        return lock

    def _send(self, hop: str, envelope: Envelope, destination: Any = None) -> Deferred[Any]:
        lock = self._hop_lock(hop)
        # The route's TLS context goes to a client that chooses TLS per
        # destination (RelayClient says so); any client of two arguments
        # still serves.
        extra = (destination,) if getattr(self.client, "per_destination_tls", False) else ()
        d: Deferred[Any] = lock.run(self.client.send, hop, envelope, *extra)

        def forget(result: object) -> object:
            if not lock.waiting and lock.tokens == lock.limit:
                self._hop_locks.pop(hop, None)
            return result

        return d.addBoth(forget)

    async def _deliver(self, entry_id: str) -> None:
        forced = entry_id in self._forced
        self._forced.discard(entry_id)
        # The entry and its message are read side by side: two trips to
        # the spool's thread pool in the time of one.
        got: Deferred[SpoolEntry] = self.spool.get(entry_id)
        read: Deferred[Message] = self.spool.message(entry_id)
        try:
            entry: SpoolEntry = await got
        except KeyError:
            # Settled or removed before its turn came.
            read.addErrback(lambda _: None)
            return
        except BaseException:
            read.addErrback(lambda _: None)
            raise
        if entry.queue != ACTIVE:
            read.addErrback(lambda _: None)
            return
        if entry.next_attempt_at > self.clock.seconds() + 0.001 and not forced:
            # Not due: the time it was held for was a hint (a scan found a
            # file whose mtime someone changed), or an operator deferred it.
            read.addErrback(lambda _: None)
            self.queue.push(entry.id, entry.next_attempt_at)
            return
        message: Message = await read
        envelope = entry.envelope(message)
        now = self.clock.seconds()
        # Each attempt with its outcome for the log: SENT, BOUNCED or
        # DEFERRED (which _settle may make EXPIRED).
        outcomes: list[tuple[Attempt, str]] = []
        failed: list[tuple[str, str]] = []
        delivered: list[str] = []
        remaining: list[EmailAddress] = []
        routes: list[Route] = await self.route(entry.recipients, entry.next_hop_choices)
        for route in routes:
            names = tuple(str(r) for r in route.recipients)
            if route.error is not None:
                outcome = BOUNCED if route.permanent else DEFERRED
                outcomes.append((Attempt(now, "", None, route.error, names), outcome))
                if route.permanent:
                    failed += [(n, route.error) for n in names]
                else:
                    remaining += route.recipients
                continue
            pending = list(route.recipients)
            destination = tls_destination(route, entry.tls_policy)
            for hop in route.hops:
                if not pending:
                    break
                names = tuple(str(r) for r in pending)
                recipients = tuple(pending)
                if recipients != tuple(envelope.recipients):
                    envelope = dataclasses.replace(envelope, recipients=recipients)
                try:
                    result = await self._send(hop, envelope, destination)
                except Exception as e:
                    reply = getattr(e, "reply", None)
                    text = str(reply) if reply is not None else (str(e) or type(e).__name__)
                    permanent = bool(getattr(e, "permanent", False))
                    attempt = Attempt(
                        self.clock.seconds(), hop, _code(reply), text, names,
                        getattr(e, "address", None), getattr(e, "tls", None),
                    )  # fmt: skip
                    outcomes.append((attempt, BOUNCED if permanent else DEFERRED))
                    if permanent:
                        failed += [(n, text) for n in names]
                        pending = []
                        break
                    continue
                replies = dict(result.replies)
                left: list[EmailAddress] = []
                by_reply: dict[tuple[int | None, str, str], list[str]] = {}
                for r in pending:
                    reply = replies.get(str(r))
                    if reply is None:
                        left.append(r)
                        key = (None, "no reply for recipient", DEFERRED)
                        by_reply.setdefault(key, []).append(str(r))
                        continue
                    if reply.is_positive:
                        outcome = SENT
                        delivered.append(str(r))
                    elif reply.is_permanent:
                        outcome = BOUNCED
                        failed.append((str(r), str(reply)))
                    else:
                        outcome = DEFERRED
                        left.append(r)
                    by_reply.setdefault((_code(reply), str(reply), outcome), []).append(str(r))
                at = self.clock.seconds()
                hop_name = getattr(result, "hop", hop)
                address = getattr(result, "address", None)
                tls = getattr(result, "tls", None)
                for (code, text, outcome), rcpts in by_reply.items():
                    attempt = Attempt(at, hop_name, code, text, tuple(rcpts), address, tls)
                    outcomes.append((attempt, outcome))
                pending = left
            remaining += pending
        await self._settle(entry, message, outcomes, failed, delivered, remaining)

    async def _settle(
        self,
        entry: SpoolEntry,
        message: Message,
        outcomes: list[tuple[Attempt, str]],
        failed: list[tuple[str, str]],
        delivered: list[str],
        remaining: list[EmailAddress],
    ) -> None:
        now = self.clock.seconds()
        step: tuple[float, Sequence[float]] | None = None
        if remaining:
            step = next_attempt(entry.intervals_left(self.default_retry_intervals), now)
        expired = bool(remaining) and step is None
        # The lines say what happened on the wire, so they come before the
        # spool records it: a recipient that was sent stays logged as sent
        # even if recording that fails (and it goes out again).
        self._log_outcomes(
            entry, outcomes, expired=expired, retry_at=step[0] if step is not None else None
        )
        attempts = [attempt for attempt, _ in outcomes]
        updated = dataclasses.replace(
            entry,
            recipients=tuple(remaining),
            failed_recipients=tuple(entry.failed_recipients) + tuple(failed),
            delivered_recipients=tuple(entry.delivered_recipients) + tuple(delivered),
        ).with_attempts(attempts)
        if expired:
            # The retries ran out: what is left failed for good.
            last = updated.last_error or "no reply"
            updated = dataclasses.replace(
                updated,
                recipients=(),
                failed_recipients=tuple(updated.failed_recipients)
                + tuple((str(r), last) for r in remaining),
            )
        if updated.settled:
            if not updated.failed_recipients:
                await self.spool.finish(entry.id)
                self.events.emit("delivered", entry.id, created_at=entry.created_at)
                return
            await self._settled(updated, message, now, expired)
            return
        assert step is not None
        at, _ = step
        updated = dataclasses.replace(updated, step=entry.step + 1, next_attempt_at=at)
        updated = await self.spool.update(updated)
        self.events.emit(
            "deferred", entry.id, until=at, recipients=len(remaining), error=updated.last_error
        )
        self.schedule(entry.id, at)

    async def _settled(
        self, entry: SpoolEntry, message: Message, now: float, expired: bool
    ) -> None:
        """
        Every recipient of C{entry} is delivered or failed, and some
        failed: the sender hears of the failures not yet reported (once:
        they are then C{reported}, also when no report can be sent), and
        the entry is frozen, kept for the operator until it expires.
        """
        unreported = entry.unreported
        bounced = bool(unreported) and await self._bounce(entry, unreported, message, now, expired)
        if unreported:
            entry = dataclasses.replace(
                entry, reported=tuple(entry.reported) + tuple(r for r, _ in unreported)
            )
        last = entry.failed_recipients[-1][1]
        if expired:
            reason = f"retry intervals exhausted; last error: {last}"
        else:
            reason = "permanent failure: " + last
        if bounced:
            reason += " (bounced)"
        if self.bounced_lifetime <= 0:
            # --bounced-lifetime 0: nothing is kept once settled.
            await self.expiry.remove(dataclasses.replace(entry, queue=FROZEN, reason=reason), 0)
            return
        await self._freeze(entry, reason)

    def _log_outcomes(
        self,
        entry: SpoolEntry,
        outcomes: Sequence[tuple[Attempt, str]],
        expired: bool,
        retry_at: float | None,
    ) -> None:
        """
        One line per attempt of this delivery (recipients at one hop that
        got one reply): the log counterpart of the attempts the entry
        records.  Grouped, not one line per recipient as Postfix has it: a
        message to a hundred recipients that one reply accepts is one line,
        and the line's cost is paid per message, not per recipient.

        @param expired: the entry's retry intervals have run out: a
            temporary failure that was the last try for its recipients is
            C{expired}, not C{deferred}.
        @param retry_at: when the entry is tried again, if it is: the
            C{retry_at} field (ISO 8601) of its C{deferred} lines.
        """
        # The recipients of a temporary failure that went on to the next
        # hop are tried again in this delivery: that failure was not their
        # last, and does not expire them.
        tried_later: set[str] = set()
        last: list[bool] = []
        for attempt, _ in reversed(outcomes):
            last.append(tried_later.isdisjoint(attempt.recipients))
            tried_later.update(attempt.recipients)
        last.reverse()
        for (attempt, outcome), final in zip(outcomes, last, strict=True):
            if outcome == DEFERRED and expired and final:
                outcome = EXPIRED
            try:
                fields = delivery_fields(entry, attempt, outcome)
                if outcome == DEFERRED and retry_at is not None:
                    fields["retry_at"] = iso_time(retry_at)
            except Exception:
                self.log.failure("Cannot log an attempt of {entry_id}", entry_id=entry.id)
                continue
            level = LogLevel.info if outcome in (SENT, DEFERRED) else LogLevel.warn
            self.log.emit(level, delivery_format(fields), **fields)

    async def _freeze(self, entry: SpoolEntry, reason: str) -> None:
        now = self.clock.seconds()
        await self.spool.update(dataclasses.replace(entry, reason=reason, moved_at=now))
        await self.spool.move(entry.id, FROZEN)
        self.log.warn(
            "{entry_id}: frozen: {reason}",
            event="frozen", entry_id=entry.id, envelope_id=entry.envelope_id, reason=reason,
        )  # fmt: skip
        self.events.emit("frozen", entry.id, reason=reason)

    async def _bounce(
        self,
        entry: SpoolEntry,
        failed: Sequence[tuple[str, str]],
        message: Message,
        now: float,
        expired: bool,
    ) -> bool:
        """
        Spool a DSN for C{failed}; C{True} if one was spooled.
        """
        if not self.bounce or not failed:
            return False
        # The default route: the bounce goes wherever mail goes when it
        # is sent, not where it went when the original was accepted.
        bounce = make_bounce(entry, failed, message, self.hostname, now, (), expired)
        if bounce is None:
            return False
        new = await self.spool.enqueue([bounce])
        # Postfix's words for the same event, naming the bounce's own entry.
        self.log.info(
            "{entry_id}: sender non-delivery notification: {bounce_id}",
            event="bounce", entry_id=entry.id, envelope_id=entry.envelope_id,
            sender=str(entry.sender), bounce_id=", ".join(e.id for e in new),
        )  # fmt: skip
        self.events.emit("bounced", entry.id, sender=str(entry.sender))
        self.notify(new)
        return True


@implementer(ISpoolObserver)
class SchedulerObserver:
    """
    Tells the scheduler what the spool committed (through
    L{relay.spool.observed.ObservedSpool}, which the server writes to), so
    that new mail goes out at once.
    """

    def __init__(self, scheduler: DeliveryScheduler) -> None:
        self.scheduler = scheduler

    def spooled(
        self, entries: Sequence[SpoolEntry], envelopes: Sequence[EnvelopeWithNextHop]
    ) -> None:
        self.scheduler.spooled(entries)

    def quarantined(self, entries: Sequence[SpoolEntry], reason: str) -> None:
        self.scheduler.quarantined(entries, reason)
