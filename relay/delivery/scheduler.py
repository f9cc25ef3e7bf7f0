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
from relay.delivery.bounce import DELAYED, FAILED, RELAYED, make_report, returns_full
from relay.delivery.due import DueQueue
from relay.delivery.expiry import BOUNCED_LIFETIME, REMOVED_LIFETIME, Expiry
from relay.delivery.failures import FailureClassifier
from relay.delivery.nexthop import Destination, Route
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
from relay.model import dsn
from relay.model.address import EmailAddress
from relay.model.entry import ACTIVE, FROZEN, Attempt, SpoolEntry
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import MAX_HEADER_BYTES, Message
from relay.model.retry import DEFAULT_RETRY_INTERVALS, next_attempt
from relay.shaping.config import Limits, ShapingConfig
from relay.shaping.shaper import MAX_CONNECTIONS, SUSPENDED, Admission, LimitWait, Shaper, Wait
from relay.shaping.suspensions import Suspensions

Router = Callable[[Sequence[EmailAddress], Sequence[str]], "Deferred[list[Route]]"]


def _code(reply: Any) -> int | None:
    code = getattr(reply, "code", None)
    return code if isinstance(code, int) else None


#: seconds before an entry whose delivery failed on our side is tried again
AFTER_FAILURE = 30.0


class DeliveryScheduler(Service):
    """
    Drain the active queue of C{spool} through C{client}.

    @param failure_classifier: gives each failed attempt its class
        (L{relay.delivery.failures}); the built-in table when C{None}.
    @ivar jobs: the ids being delivered, with their L{Deferred}s.
    """

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
        shaper: Shaper | None = None,
        delay_warning: float | None = None,
        failure_classifier: FailureClassifier | None = None,
    ) -> None:
        """
        @param bounce: send relay's own reports to senders (bounces, and
            delay warnings and "relayed" reports where asked for).
        @param delay_warning: seconds after which an entry still waiting
            warns its sender, once (C{--delay-warning}); C{None}: never.
        """
        self.spool = spool
        self.failure_classifier = (
            failure_classifier if failure_classifier is not None else FailureClassifier()
        )
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
        # Made once: a Logger class attribute makes a new Logger at every
        # self.log (its __get__), several times a message delivered.
        self.log: Logger = log if log is not None else Logger(
            namespace=f"{__name__}.{type(self).__name__}", source=self
        )
        self.jobs: dict[str, Deferred[None]] = {}
        # The jobs that hold one of the max_send_jobs slots: those not yet
        # recording their outcome in the spool (see _pump).  The others are
        # still busy (not delivered again meanwhile).
        self.on_wire: set[str] = set()
        self.queue = due(spool, clock, self._pump, busy=self.jobs.__contains__)
        # sent now by an operator, whatever their schedule says
        self._forced: set[str] = set()
        self.bounced_lifetime = bounced_lifetime
        self.delay_warning = delay_warning or None
        self.expiry = Expiry(spool, clock, self.events, bounced_lifetime, removed_lifetime)
        self.again: set[str] = set()
        self.stopping = False
        self._hop_locks: dict[str, DeferredSemaphore] = {}
        if shaper is None:
            shaper = Shaper(
                ShapingConfig(Limits(max_connections=per_destination)), clock, Suspensions(clock)
            )
        self.shaper = shaper
        # The shaper wakes an entry when a connection it waits for is free,
        # and those of a destination whose suspension ends.
        shaper.on_wake = self.wake
        shaper.suspensions.on_resumed = self.resumed

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
        self.shaper.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.stopping = True
        self.queue.stop()
        self.expiry.stop()
        self.shaper.stop()
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
        # A slot is for a delivery on the wire.  One whose outcome is being
        # recorded gives its slot up: a finish waits for the spool's
        # directory fsync, which queues behind every other writer of the
        # filesystem, and measured with W1 (3000 messages, 20 sessions),
        # delivery fell behind acceptance with 10 slots held until then
        # (e2e 443-469 msg/s against 476 with 30).  Settling jobs are
        # bounded too (as many again), lest a stalled disk pile them up.
        while (
            not self.stopping
            and len(self.on_wire) < self.max_send_jobs
            and len(self.jobs) < 2 * self.max_send_jobs
        ):
            entry_id = self.queue.pop_due()
            if entry_id is None:
                return
            if entry_id in self.jobs:
                self.again.add(entry_id)
                continue
            # Counted before it runs: it may reach its settling, and pump
            # again, before fromCoroutine returns.
            job: Deferred[None] = Deferred()
            self.jobs[entry_id] = job
            self.on_wire.add(entry_id)
            d = Deferred.fromCoroutine(self._deliver(entry_id))
            d.addErrback(self._log_failure, entry_id)
            d.addBoth(self._done, entry_id)
            d.chainDeferred(job)

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
        self.on_wire.discard(entry_id)
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
        self.shaper.forget(entry_id)

    def wake(self, entry_id: str) -> None:
        """
        C{entry_id} waited for a limit that no longer holds it back: look
        at it now, whatever its schedule says (waiting used none of it).
        """
        self._forced.add(entry_id)
        self.schedule(entry_id, self.clock.seconds())

    def resumed(self, name: str) -> None:
        """
        The suspension of C{name} ended: wake what waits for it (the
        message rate then spreads them).
        """
        for entry_id in self.shaper.waiting_for(name):
            if self.shaper.waits[entry_id].reason == SUSPENDED:
                self.wake(entry_id)

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

    def _still_waiting(self, entry_id: str) -> bool:
        """
        Is C{entry_id} (found due by a scan) known to wait for a limit
        still?  Then it goes back to wait without a read of the spool.
        """
        wait = self.shaper.waits.get(entry_id)
        if wait is None:
            return False
        if wait.until is not None and wait.until > self.clock.seconds():
            self.queue.push(entry_id, wait.until)
            return True
        if wait.reason == SUSPENDED and wait.until is None:
            return self.shaper.suspensions.get(wait.destination) is not None
        return False

    async def _deliver(self, entry_id: str) -> None:
        forced = entry_id in self._forced
        self._forced.discard(entry_id)
        if not forced and self._still_waiting(entry_id):
            return
        # The entry and its message are read side by side: two trips to
        # the spool's thread pool in the time of one.
        got: Deferred[SpoolEntry] = self.spool.get(entry_id)
        read: Deferred[Message] = self.spool.message(entry_id)
        try:
            entry: SpoolEntry = await got
        except KeyError:
            # Settled or removed before its turn came.
            read.addErrback(lambda _: None)
            self.shaper.forget(entry_id)
            return
        except BaseException:
            read.addErrback(lambda _: None)
            raise
        if entry.queue != ACTIVE:
            read.addErrback(lambda _: None)
            self.shaper.forget(entry_id)
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
        # delivered to a hop that could not take their DSN requests on
        relayed: list[tuple[str, str]] = []
        remaining: list[EmailAddress] = []
        # Routes held back by a limit: their recipients wait, and that is
        # no attempt.
        waits: list[Wait] = []
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
            admission = await self.shaper.admit(entry.id, route)
            if isinstance(admission, Wait):
                waits.append(admission)
                remaining += route.recipients
                continue
            try:
                envelope, pending, wait = await self._deliver_route(
                    entry, envelope, route, admission, outcomes, failed, delivered, relayed
                )
            finally:
                self.shaper.release(admission)
            if wait is not None:
                waits.append(self.shaper.note_wait(entry.id, wait))
            remaining += pending
        outcomes = [(self._classified(attempt, outcome), outcome) for attempt, outcome in outcomes]
        if not waits:
            self.shaper.forget(entry.id)
        if entry.id in self.on_wire:
            self.on_wire.discard(entry.id)
            self._pump()
        await self._settle(
            entry, message, outcomes, failed, delivered, remaining, waits, relayed
        )

    async def _deliver_route(
        self,
        entry: SpoolEntry,
        envelope: Envelope,
        route: Route,
        admission: Admission,
        outcomes: list[tuple[Attempt, str]],
        failed: list[tuple[str, str]],
        delivered: list[str],
        relayed: list[tuple[str, str]],
    ) -> tuple[Envelope, list[EmailAddress], Wait | None]:
        """
        Try the hops of C{route} in order until its recipients are settled
        or the hops run out, recording each attempt in C{outcomes},
        C{failed}, C{delivered} and C{relayed} (delivered to a hop that
        could not take their DSN requests on), and showing each refusal to the reply
        rules.

        @return: the envelope as last sent, the recipients still pending,
            and the L{Wait} that stopped the route (a new connection had
            to wait for the connection rate), if one did.
        """
        pending = list(route.recipients)
        destination = tls_destination(route, entry.tls_policy)
        destination = dataclasses.replace(
            destination if destination is not None else Destination(None),
            shaping=admission.shaping,
        )
        for hop in route.hops:
            if not pending:
                break
            names = tuple(str(r) for r in pending)
            recipients = tuple(pending)
            if recipients != tuple(envelope.recipients):
                envelope = dataclasses.replace(envelope, recipients=recipients)
            try:
                result = await self._send(hop, envelope, destination)
            except LimitWait as e:
                return envelope, pending, e.wait
            except Exception as e:
                reply = getattr(e, "reply", None)
                if reply is not None:
                    self.shaper.observe(admission, reply)
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
            refusals: dict[str, Any] = {}
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
                    if not getattr(result, "dsn", False):
                        relayed.append((str(r), str(reply)))
                elif reply.is_permanent:
                    outcome = BOUNCED
                    failed.append((str(r), str(reply)))
                else:
                    outcome = DEFERRED
                    left.append(r)
                if not reply.is_positive:
                    refusals.setdefault(str(reply), reply)
                by_reply.setdefault((_code(reply), str(reply), outcome), []).append(str(r))
            for reply in refusals.values():
                self.shaper.observe(admission, reply)
            at = self.clock.seconds()
            hop_name = getattr(result, "hop", hop)
            address = getattr(result, "address", None)
            tls = getattr(result, "tls", None)
            for (code, text, outcome), rcpts in by_reply.items():
                attempt = Attempt(at, hop_name, code, text, tuple(rcpts), address, tls)
                outcomes.append((attempt, outcome))
            pending = left
        return envelope, pending, None

    def _classified(self, attempt: Attempt, outcome: str) -> Attempt:
        """
        C{attempt} with its failure class, when it failed.
        """
        if outcome == SENT:
            return attempt
        try:
            failure_class = self.failure_classifier.classify_attempt(attempt)
        except Exception:
            # A user's table must not stop deliveries being recorded.
            self.log.failure("Cannot classify a failure of {hop}", hop=attempt.hop)
            return attempt
        return dataclasses.replace(attempt, failure_class=failure_class)

    async def _settle(
        self,
        entry: SpoolEntry,
        message: Message,
        outcomes: list[tuple[Attempt, str]],
        failed: list[tuple[str, str]],
        delivered: list[str],
        remaining: list[EmailAddress],
        waits: Sequence[Wait] = (),
        relayed: Sequence[tuple[str, str]] = (),
    ) -> None:
        """
        Record what came of a delivery of C{entry} and what follows: done,
        tried again later, or settled with failures; the reports the
        sender asked for go out first (a crash then repeats a report
        rather than lose it).

        Recipients held back by a limit (C{waits}) wait: when no attempt
        of this delivery failed temporarily, no retry interval is used up
        (the step stays) and the entry is looked at again when the limit
        allows (or when woken); when nothing was tried at all, the spool
        is not even written.

        @param relayed: recipients delivered to hops without DSN, with the
            reply: those whose NOTIFY has SUCCESS get a "relayed" report.
        """
        now = self.clock.seconds()
        step: tuple[float, Sequence[float]] | None = None
        tried = any(outcome == DEFERRED for _, outcome in outcomes)
        wake = min((w.until for w in waits if w.until is not None), default=None)
        if waits and not outcomes:
            self._wait(entry, waits, wake)
            return
        if remaining and (tried or not waits):
            step = next_attempt(entry.intervals_left(self.default_retry_intervals), now)
        # Recipients that wait for a limit do not expire with the others.
        expired = bool(remaining) and step is None and not waits
        # The lines say what happened on the wire, so they come before the
        # spool records it: a recipient that was sent stays logged as sent
        # even if recording that fails (and it goes out again).
        self._log_outcomes(
            entry, outcomes, expired=expired, retry_at=step[0] if step is not None else None
        )
        attempts = [attempt for attempt, _ in outcomes]
        updated = entry.replace(
            recipients=tuple(remaining),
            failed_recipients=tuple(entry.failed_recipients) + tuple(failed),
            delivered_recipients=tuple(entry.delivered_recipients) + tuple(delivered),
        ).with_attempts(attempts)
        if expired:
            # The retries ran out: what is left failed for good.
            last = updated.last_error or "no reply"
            updated = updated.replace(
                recipients=(),
                failed_recipients=tuple(updated.failed_recipients)
                + tuple((str(r), last) for r in remaining),
            )
        relayed = [(r, text) for r, text in relayed if self._asked(updated, r, dsn.SUCCESS)]
        if relayed:
            await self._report(updated, relayed, RELAYED, message, now)
        if updated.settled:
            if not updated.failed_recipients:
                await self.spool.finish(entry.id)
                self.events.emit("delivered", entry.id, created_at=entry.created_at)
                return
            await self._settled(updated, message, now, expired)
            return
        if step is None or (wake is not None and wake < step[0]) or (waits and not tried):
            # Some recipients were settled, the others wait for a limit.
            at = wake if wake is not None else now
            if step is not None:
                at = min(at, step[0])
            new_step = entry.step + 1 if step is not None and tried else entry.step
            updated = updated.replace(step=new_step, next_attempt_at=at)
            await self.spool.update(updated)
            self._wait(updated, waits, wake)
            return
        at, later = step
        if self._warning_due(updated, now):
            await self._warn(updated, message, now, at + sum(later))
            updated = updated.replace(warned_at=now)
        updated = updated.replace(step=entry.step + 1, next_attempt_at=at)
        updated = await self.spool.update(updated)
        last_class = next(
            (a.failure_class for a in reversed(attempts) if a.failure_class is not None), None
        )
        self.events.emit(
            "deferred", entry.id, until=at, recipients=len(remaining), error=updated.last_error,
            failure_class=last_class,
        )  # fmt: skip
        self.schedule(entry.id, at)

    def _wait(self, entry: SpoolEntry, waits: Sequence[Wait], wake: float | None) -> None:
        """
        C{entry} waits for a limit: looked at again at C{wake}, or when
        the shaper wakes it (a connection of its destination is free, its
        suspension ends).
        """
        first = waits[0]
        self.log.debug(
            "{entry_id}: waiting for {destination} ({reason})",
            entry_id=entry.id, destination=first.destination, reason=first.reason,
            event="waiting", until=wake,
        )  # fmt: skip
        if wake is not None:
            self.schedule(entry.id, wake)
        elif first.reason not in (MAX_CONNECTIONS, SUSPENDED):
            self.schedule(entry.id, self.clock.seconds() + AFTER_FAILURE)

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
        # NOTIFY without FAILURE (or NEVER): no bounce, RFC 3461 section 4.1.
        tell = [(r, text) for r, text in unreported if self._asked(entry, r, dsn.FAILURE)]
        bounced = bool(tell) and await self._bounce(entry, tell, message, now, expired)
        if unreported:
            entry = entry.replace(
                reported=tuple(entry.reported) + tuple(r for r, _ in unreported)
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
            await self.expiry.remove(entry.replace(queue=FROZEN, reason=reason), 0)
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
        records; and a C{failed} event for each that failed, with its
        class (which the metrics count).  Grouped, not one line per recipient as Postfix has it: a
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
            if attempt.failure_class is not None:
                # The event stream's (and so the metrics') count by class.
                self.events.emit(
                    "failed", entry.id, outcome=outcome, failure_class=attempt.failure_class,
                    hop=attempt.hop, code=attempt.code, recipients=len(attempt.recipients),
                )  # fmt: skip
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
        await self.spool.update(entry.replace(reason=reason, moved_at=now))
        await self.spool.move(entry.id, FROZEN)
        self.log.warn(
            "{entry_id}: frozen: {reason}",
            event="frozen", entry_id=entry.id, envelope_id=entry.envelope_id, reason=reason,
        )  # fmt: skip
        self.events.emit("frozen", entry.id, reason=reason)

    # -- reports to the sender -------------------------------------------

    @staticmethod
    def _asked(entry: SpoolEntry, recipient: str, what: str) -> bool:
        """
        Does C{recipient}'s NOTIFY let relay report C{what} to the sender?
        """
        return dsn.notify_allows(dict(entry.recipient_args).get(recipient, ()), what)

    def _warning_due(self, entry: SpoolEntry, now: float) -> bool:
        """
        Is C{entry}, deferred again, due its one delay warning?
        """
        return (
            self.delay_warning is not None
            and entry.warned_at is None
            and now - entry.created_at >= self.delay_warning
        )

    async def _warn(
        self, entry: SpoolEntry, message: Message, now: float, retry_until: float
    ) -> None:
        """
        Warn the sender of C{entry} that its pending recipients (those
        whose NOTIFY allows DELAY) are late, and will be retried until
        C{retry_until}.
        """
        last = {r: a.reply for a in entry.attempts for r in a.recipients}
        late = [
            (str(r), last.get(str(r)) or entry.last_error or "delivery deferred")
            for r in entry.recipients
            if self._asked(entry, str(r), dsn.DELAY)
        ]
        if late:
            await self._report(entry, late, DELAYED, message, now, retry_until=retry_until)

    async def _original(self, entry: SpoolEntry, message: Message, full: bool) -> bytes:
        """
        The start of C{entry}'s message for a report: all of it when
        C{full}, else enough to hold its header section.
        """
        want = message.size if full else min(message.size, MAX_HEADER_BYTES)
        if message.data is not None:
            return message.data[:want]
        data: bytes = await self.spool.message_chunk(entry.id, 0, want)
        return data

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
        return await self._report(entry, failed, FAILED, message, now, expired)

    async def _report(
        self,
        entry: SpoolEntry,
        recipients: Sequence[tuple[str, str]],
        action: str,
        message: Message,
        now: float,
        expired: bool = False,
        retry_until: float | None = None,
    ) -> bool:
        """
        Spool a report (C{action}: failed, delayed or relayed) on
        C{recipients} to the sender of C{entry}; C{True} if one was
        spooled (none with C{--no-bounce}, nor to the null sender).
        """
        if not self.bounce or not recipients or entry.sender.is_null:
            return False
        original = await self._original(entry, message, returns_full(entry, action))
        # The default route: the report goes wherever mail goes when it
        # is sent, not where it went when the original was accepted.
        report = make_report(
            entry, recipients, action, original, self.hostname, now, (), expired, retry_until
        )
        if report is None:
            return False
        new = await self.spool.enqueue([report])
        report_ids = ", ".join(e.id for e in new)
        if action == FAILED:
            # Postfix's words for the same event, naming the bounce's own entry.
            self.log.info(
                "{entry_id}: sender non-delivery notification: {bounce_id}",
                event="bounce", entry_id=entry.id, envelope_id=entry.envelope_id,
                sender=str(entry.sender), bounce_id=report_ids,
            )  # fmt: skip
            self.events.emit("bounced", entry.id, sender=str(entry.sender))
        else:
            what = "delay" if action == DELAYED else "delivery status"
            self.log.info(
                "{entry_id}: sender {what} notification: {report_id}",
                event="report", entry_id=entry.id, envelope_id=entry.envelope_id,
                sender=str(entry.sender), what=what, action=action, report_id=report_ids,
                recipients=[r for r, _ in recipients],
            )  # fmt: skip
            self.events.emit("reported", entry.id, sender=str(entry.sender), action=action)
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
