"""
Tests for L{relay.delivery.scheduler.DeliveryScheduler} and L{SchedulerObserver}.
"""

from __future__ import annotations

import email
import os
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.nexthop import Route, route_recipients
from relay.delivery.scheduler import DeliveryScheduler, SchedulerObserver
from relay.model.address import NULL_SENDER, EmailAddress, Sender
from relay.model.entry import ACTIVE, FROZEN
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import Message
from relay.model.reply import Reply
from relay.model.retry import DEFAULT_RETRY_INTERVALS
from relay.spool.disk import DiskSpool
from relay.spool.observed import ObservedSpool
from relay.testing import MemorySpool

DATA = b"Subject: hello\r\nFrom: s@example.org\r\nMessage-ID: <m1@example.org>\r\n\r\nbody\r\n"


@dataclass(frozen=True)
class DeliveryResult:
    hop: str
    replies: tuple[tuple[str, Reply], ...]
    address: tuple[str, int] | None = None


class DeliveryError(Exception):
    def __init__(
        self, reply: Reply | None, permanent: bool, address: tuple[str, int] | None = None
    ) -> None:
        Exception.__init__(self, str(reply) if reply else "connection refused")
        self.reply = reply
        self.permanent = permanent
        self.address = address


class FakeClient:
    """
    A relay client whose answers the test scripts per hop: a L{Reply} for
    every recipient, a per-recipient dict, an exception, or C{None} for a
    L{Deferred} that the test fires.  A hop in C{addresses} answers from
    that peer address.
    """

    def __init__(self) -> None:
        self.behaviour: dict[str, Any] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        self.sent: list[tuple[str, Envelope]] = []
        self.pending: list[Deferred[Any]] = []

    def send(self, hop: str, envelope: Envelope) -> Deferred[DeliveryResult]:
        self.sent.append((hop, envelope))
        b = self.behaviour.get(hop, Reply(250, "2.0.0 ok"))
        if b is None:
            d: Deferred[DeliveryResult] = Deferred()
            self.pending.append(d)
            return d
        if isinstance(b, Exception):
            return defer.fail(b)
        address = self.addresses.get(hop)
        if isinstance(b, dict):
            return defer.succeed(
                DeliveryResult(
                    hop, tuple((str(r), b[str(r)]) for r in envelope.recipients), address
                )
            )
        return defer.succeed(
            DeliveryResult(hop, tuple((str(r), b) for r in envelope.recipients), address)
        )


def make_envelope(
    recipients: Sequence[str] = ("a@example.com",),
    hops: Sequence[str] = ("mx1:25",),
    intervals: Sequence[float] = (60, 120),
    sender: Sender | None = None,
    envelope_id: str = "env1",
) -> EnvelopeWithNextHop:
    """
    An envelope ready for spooling.
    """
    env = Envelope(
        id=envelope_id,
        sender=sender if sender is not None else Sender.of("s@example.org"),
        sender_args=(),
        recipients=[EmailAddress.parse(r) for r in recipients],
        message=Message.from_bytes(DATA),
    )
    return EnvelopeWithNextHop(env, hops, intervals)


def no_dns(recipients: Any, hops: Any) -> Deferred[Any]:
    """
    Routes without DNS: an envelope without hops (a bounce) goes to
    C{bounce-hop:25}.
    """
    return route_recipients(recipients, hops or ("bounce-hop:25",), None)


class SchedulerTests(SynchronousTestCase):
    """
    The scheduler over a L{MemorySpool} with a fake client and a Clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.spool = MemorySpool(self.clock)
        self.client = FakeClient()

    def make(self, **kw: Any) -> DeliveryScheduler:
        kw.setdefault("route", no_dns)
        s = DeliveryScheduler(
            spool=self.spool, client=self.client, clock=self.clock, hostname="relay.test", **kw
        )
        s.startService()
        self.addCleanup(lambda: s.stopService() if s.running else None)
        return s

    def enqueue(self, scheduler: DeliveryScheduler, *envelopes: EnvelopeWithNextHop) -> list[Any]:
        served = ObservedSpool(self.spool, SchedulerObserver(scheduler))
        entries = self.successResultOf(served.enqueue(list(envelopes)))
        self.clock.advance(0)
        return entries

    def test_delivered_end_to_end(self) -> None:
        """
        A new envelope goes out at once to its hop and leaves the spool.
        """
        s = self.make()
        self.enqueue(s, make_envelope(recipients=("a@example.com", "b@example.com")))
        [(hop, env)] = self.client.sent
        self.assertEqual(hop, "mx1:25")
        self.assertEqual([str(r) for r in env.recipients], ["a@example.com", "b@example.com"])
        self.assertEqual(env.message.data, DATA)
        self.assertEqual(self.spool.entries_by_id, {})

    def test_loads_active_at_start(self) -> None:
        """
        Entries already in the active queue are delivered when the
        scheduler starts, at their due time.
        """
        self.successResultOf(self.spool.enqueue([make_envelope()]))
        self.make()
        self.clock.advance(0)
        self.assertEqual(len(self.client.sent), 1)
        self.assertEqual(self.spool.entries_by_id, {})

    def test_fallback_to_next_hop(self) -> None:
        """
        A transient failure at the first hop moves on to the next one.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(None, permanent=False)
        s = self.make()
        self.enqueue(s, make_envelope(hops=("mx1:25", "mx2:25")))
        self.assertEqual([h for h, _ in self.client.sent], ["mx1:25", "mx2:25"])
        self.assertEqual(self.spool.entries_by_id, {})

    def test_retry_timing(self) -> None:
        """
        After a transient failure nothing happens before the first retry
        interval; the attempt comes right at it, and is recorded.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(Reply(421, "4.3.2 busy"), False)
        s = self.make()
        [entry] = self.enqueue(s, make_envelope(intervals=(60, 120)))
        self.assertEqual(len(self.client.sent), 1)
        stored = self.spool.entries_by_id[entry.id]
        self.assertEqual(stored.next_attempt_at, 1060)
        self.assertEqual((stored.schedule, stored.step), ((60, 120), 1))
        self.assertEqual(stored.attempts[0].code, 421)
        self.assertEqual(stored.attempts[0].hop, "mx1:25")
        self.clock.advance(59.9)
        self.assertEqual(len(self.client.sent), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.sent), 2)
        self.assertEqual(len(self.spool.entries_by_id[entry.id].attempts), 2)

    def test_spool_failure_retried(self) -> None:
        """
        A delivery that fails on our side (the spool cannot record the
        attempt, e.g. the disk is full) is tried again after
        L{AFTER_FAILURE} seconds rather than left until a restart.
        """
        from relay.delivery.scheduler import AFTER_FAILURE

        self.client.behaviour["mx1:25"] = DeliveryError(Reply(451, "4.3.0 later"), False)
        s = self.make()
        update = self.spool.update
        failures = [OSError(28, "No space left on device")]

        def full_disk(entry: Any) -> Any:
            if failures:
                return defer.fail(failures.pop())
            return update(entry)

        self.spool.update = full_disk  # type: ignore[method-assign]
        with capturedLogs() as events:
            [entry] = self.enqueue(s, make_envelope(intervals=(600,)))
        self.assertEqual(len(self.client.sent), 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue([e for e in events if "tried again in" in formatEvent(e)])
        self.client.behaviour["mx1:25"] = Reply(250, "2.0.0 ok")
        self.clock.advance(AFTER_FAILURE - 0.1)
        self.assertEqual(len(self.client.sent), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.sent), 2)
        self.assertNotIn(entry.id, self.spool.entries_by_id)

    def test_freeze_on_exhaustion(self) -> None:
        """
        When the retry intervals run out the entry is frozen with a reason
        and the sender gets a bounce for the expired recipients.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(Reply(451, "4.3.0 later"), False)
        self.client.behaviour["bounce-hop:25"] = None
        s = self.make()
        [entry] = self.enqueue(s, make_envelope(intervals=(60,)))
        self.clock.advance(60)
        frozen = self.spool.entries_by_id[entry.id]
        self.assertEqual(frozen.queue, FROZEN)
        self.assertIn("exhausted", frozen.reason or "")
        self.assertEqual(len(frozen.attempts), 2)
        bounces = [e for e in self.spool.entries_by_id.values() if e.sender.is_null]
        self.assertEqual(len(bounces), 1)
        self.assertEqual([str(r) for r in bounces[0].recipients], ["s@example.org"])

    def test_permanent_failure_bounces_and_freezes(self) -> None:
        """
        A 5xx at MAIL fails every recipient: the next hop is not tried, a
        bounce goes to the sender, and the entry is frozen (kept for the
        operator, not retried) with the failure recorded.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(Reply(550, "5.7.1 no"), True)
        s = self.make()
        [entry] = self.enqueue(s, make_envelope(hops=("mx1:25", "mx2:25")))
        self.assertEqual([h for h, _ in self.client.sent][:1], ["mx1:25"])
        self.assertNotIn("mx2:25", [h for h, _ in self.client.sent])
        frozen = self.spool.entries_by_id[entry.id]
        self.assertEqual(frozen.queue, FROZEN)
        self.assertEqual(frozen.reason, "permanent failure: 550 5.7.1 no (bounced)")
        self.assertEqual(frozen.failed_recipients, (("a@example.com", "550 5.7.1 no"),))
        # The bounce itself was delivered at once through the fake client.
        self.assertEqual(self.client.sent[-1][1].sender, NULL_SENDER)
        self.assertEqual([str(r) for r in self.client.sent[-1][1].recipients], ["s@example.org"])

    def test_freeze_on_5xx_without_bounce(self) -> None:
        """
        With bounces off, a permanently failed entry is frozen, not lost.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(Reply(554, "5.0.0 go away"), True)
        s = self.make(bounce=False)
        [entry] = self.enqueue(s, make_envelope())
        frozen = self.spool.entries_by_id[entry.id]
        self.assertEqual(frozen.queue, FROZEN)
        self.assertEqual(frozen.failed_recipients, (("a@example.com", "554 5.0.0 go away"),))
        self.assertEqual(len(self.client.sent), 1)

    def test_null_sender_never_bounced(self) -> None:
        """
        A failed bounce (null sender) is frozen and not bounced again.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(Reply(550, "5.1.1 unknown"), True)
        s = self.make()
        [entry] = self.enqueue(s, make_envelope(sender=NULL_SENDER))
        self.assertEqual(list(self.spool.entries_by_id), [entry.id])
        self.assertEqual(self.spool.entries_by_id[entry.id].queue, FROZEN)

    def test_partial_failure(self) -> None:
        """
        Per-recipient outcomes: the delivered recipient is gone, the 5xx
        one is recorded as failed, only the 4xx one stays for retry.
        """
        self.client.behaviour["mx1:25"] = {
            "a@example.com": Reply(250, "2.0.0 ok"),
            "b@example.com": Reply(550, "5.1.1 no such user"),
            "c@example.com": Reply(452, "4.2.2 mailbox full"),
        }
        s = self.make(bounce=False)
        [entry] = self.enqueue(
            s, make_envelope(recipients=("a@example.com", "b@example.com", "c@example.com"))
        )
        stored = self.spool.entries_by_id[entry.id]
        self.assertEqual(stored.queue, ACTIVE)
        self.assertEqual([str(r) for r in stored.recipients], ["c@example.com"])
        self.assertEqual(stored.failed_recipients, (("b@example.com", "550 5.1.1 no such user"),))
        self.assertEqual({a.code for a in stored.attempts}, {250, 550, 452})
        self.client.behaviour["mx1:25"] = Reply(250, "2.0.0 ok")
        self.clock.advance(60)
        self.assertEqual([str(r) for r in self.client.sent[-1][1].recipients], ["c@example.com"])
        # b failed and no bounce is possible: kept, frozen.
        self.assertEqual(self.spool.entries_by_id[entry.id].queue, FROZEN)

    def test_default_intervals(self) -> None:
        """
        An entry without retry intervals gets the configured defaults on
        its first failure; an entry that used up its intervals is frozen.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(None, False)
        s = self.make(default_retry_intervals=(30, 90))
        [entry] = self.enqueue(s, make_envelope(intervals=()))
        stored = self.spool.entries_by_id[entry.id]
        self.assertEqual(stored.next_attempt_at, 1030)
        self.assertEqual((stored.schedule, stored.step), ((), 1))
        self.clock.advance(30)
        self.clock.advance(90)
        self.assertEqual(self.spool.entries_by_id[entry.id].queue, FROZEN)
        self.assertEqual(len(self.client.sent), 3 + 1)  # and the bounce

    def test_builtin_defaults(self) -> None:
        """
        Without configured defaults the Postfix-like schedule applies.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(None, False)
        s = self.make()
        [entry] = self.enqueue(s, make_envelope(intervals=()))
        stored = self.spool.entries_by_id[entry.id]
        self.assertEqual(stored.next_attempt_at, 1000 + DEFAULT_RETRY_INTERVALS[0])

    def test_mx_routing(self) -> None:
        """
        Without next hops each recipient domain goes to its own MX hosts,
        by preference; a null MX domain fails permanently.
        """
        from relay.delivery.nexthop import make_router
        from tests.test_nexthop import FakeResolver, mx

        resolver = FakeResolver({
            "x.test": [mx(20, "b.x.test"), mx(10, "a.x.test")],
            "null.test": [mx(0, "")],
        })
        self.client.behaviour["a.x.test:25"] = DeliveryError(None, False)
        s = self.make(route=make_router(lambda: resolver), bounce=False)
        [entry] = self.enqueue(
            s, make_envelope(recipients=("u@x.test", "v@y.test", "w@null.test"), hops=())
        )
        self.assertEqual(
            [(h, [str(r) for r in e.recipients]) for h, e in self.client.sent],
            [("a.x.test:25", ["u@x.test"]), ("b.x.test:25", ["u@x.test"]),
             ("y.test:25", ["v@y.test"])],
        )
        frozen = self.spool.entries_by_id[entry.id]
        self.assertEqual(frozen.queue, FROZEN)
        self.assertEqual([r for r, _ in frozen.failed_recipients], ["w@null.test"])

    def test_max_send_jobs(self) -> None:
        """
        No more than C{max_send_jobs} deliveries run at once; the others
        start as running ones finish.
        """
        self.client.behaviour["mx1:25"] = None
        s = self.make(max_send_jobs=2)
        self.enqueue(s, *[make_envelope(envelope_id=f"e{i}") for i in range(5)])
        self.assertEqual(len(self.client.sent), 2)
        self.client.pending[0].callback(
            DeliveryResult("mx1:25", (("a@example.com", Reply(250, "ok")),))
        )
        self.assertEqual(len(self.client.sent), 3)
        s.set_max_send_jobs(4)
        self.assertEqual(len(self.client.sent), 5)

    def test_settling_gives_up_its_slot(self) -> None:
        """
        A delivery whose outcome the spool is still recording holds no
        send slot: the next one starts; the entry being settled is not
        delivered again meanwhile, and settling ones are bounded by as many
        again as the slots.
        """
        self.client.behaviour["mx1:25"] = Reply(250, "2.0.0 ok")
        finishing: dict[str, Deferred[None]] = {}
        finish = self.spool.finish

        def slow_finish(entry_id: str) -> Deferred[None]:
            d: Deferred[None] = Deferred()
            d.addCallback(lambda _: finish(entry_id))
            finishing[entry_id] = d
            return d

        self.spool.finish = slow_finish  # type: ignore[method-assign]
        s = self.make(max_send_jobs=1)
        first, second, *_ = self.enqueue(
            s, *[make_envelope(envelope_id=f"e{i}") for i in range(4)]
        )
        self.assertEqual([env.id for _, env in self.client.sent], ["e0", "e1"])
        self.assertEqual((set(s.jobs), s.on_wire), ({first.id, second.id}, set()))
        s.send_now(first.id)
        self.clock.advance(0)
        self.assertEqual(len(self.client.sent), 2)
        # Two settling (as many again as the one slot): e2 waits for one.
        finishing.pop(first.id).callback(None)
        self.assertNotIn(first.id, self.spool.entries_by_id)
        self.assertEqual([env.id for _, env in self.client.sent], ["e0", "e1", "e2"])
        while finishing:
            finishing.pop(next(iter(finishing))).callback(None)
        self.assertEqual([env.id for _, env in self.client.sent], ["e0", "e1", "e2", "e3"])
        self.assertEqual((s.jobs, s.on_wire, self.spool.entries_by_id), ({}, set(), {}))

    def test_per_destination_cap(self) -> None:
        """
        At most C{per_destination} sends to one destination at once; the
        others wait for a connection without holding a send job (so that
        mail to other destinations is not held up behind them).
        """
        self.client.behaviour["mx1:25"] = None
        s = self.make(max_send_jobs=10, per_destination=1)
        self.enqueue(s, *[make_envelope(envelope_id=f"e{i}") for i in range(3)])
        self.assertEqual(len(self.client.sent), 1)
        self.assertEqual(len(s.jobs), 1)
        self.assertEqual(
            sorted(w.reason for w in s.shaper.waits.values()), ["max_connections"] * 2
        )

    def test_send_now(self) -> None:
        """
        C{send_now} delivers a deferred entry at once.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(None, False)
        s = self.make()
        [entry] = self.enqueue(s, make_envelope(intervals=(3600,)))
        del self.client.behaviour["mx1:25"]
        s.send_now(entry.id)
        self.clock.advance(0)
        self.assertEqual(len(self.client.sent), 2)
        self.assertEqual(self.spool.entries_by_id, {})

    def logged(self, **kw: Any) -> tuple[DeliveryScheduler, list[dict[str, Any]]]:
        """
        A scheduler whose log events the test reads.
        """
        events: list[dict[str, Any]] = []
        return self.make(log=Logger(observer=events.append), **kw), events

    def test_one_log_line_per_delivery(self) -> None:
        """
        A delivered entry is logged once, Postfix-style: the entry id, the
        recipients, the hop with the address connected to, the delay since
        it was spooled, the enhanced status and the reply, and the same as
        structured fields.
        """
        self.client.addresses["mx1.example.org:25"] = ("192.0.2.1", 25)
        self.client.behaviour["mx1.example.org:25"] = None
        s, events = self.logged()
        [entry] = self.enqueue(
            s, make_envelope(recipients=("b@example.org",), hops=("mx1.example.org:25",))
        )
        self.clock.advance(1.25)
        self.client.pending[0].callback(
            DeliveryResult(
                "mx1.example.org:25",
                (("b@example.org", Reply(250, "2.0.0 Ok: queued as X")),),
                ("192.0.2.1", 25),
            )
        )
        [event] = events
        self.assertEqual(
            formatEvent(event),
            f"{entry.id}: to=<b@example.org>, relay=mx1.example.org[192.0.2.1]:25, "
            "delay=1.25, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X)",
        )
        self.assertEqual(event["log_level"], LogLevel.info)
        fields = {k: v for k, v in event.items() if not k.startswith("log_")}
        self.assertEqual(
            fields,
            {
                "event": "delivery",
                "outcome": "sent",
                "entry_id": entry.id,
                "envelope_id": "env1",
                "recipients": ["b@example.org"],
                "nrcpt": 1,
                "to": "<b@example.org>",
                "hop": "mx1.example.org:25",
                "address": "192.0.2.1:25",
                "relay": "mx1.example.org[192.0.2.1]:25",
                "code": 250,
                "dsn": "2.0.0",
                "delay": 1.25,
                "reply": "250 2.0.0 Ok: queued as X",
            },
        )

    def test_deferred_line(self) -> None:
        """
        A temporary failure is one C{deferred} line with the hop's reply
        and when the entry is tried again; the connection failure that
        reached no peer has the hop alone as its relay and Postfix's
        C{4.4.1}; the next try that connected but got no reply, C{4.4.2}.
        Each line has its failure class (C{class=}, C{failure_class}).
        """
        self.client.behaviour["mx1:25"] = DeliveryError(
            Reply(451, "4.3.0 try later"), False, ("2001:db8::1", 25)
        )
        s, events = self.logged(bounce=False)
        [entry] = self.enqueue(s, make_envelope(intervals=(60, 120)))
        [event] = events
        self.assertEqual(
            formatEvent(event),
            f"{entry.id}: to=<a@example.com>, relay=mx1[2001:db8::1]:25, delay=0.0, "
            "dsn=4.3.0, class=other, status=deferred (451 4.3.0 try later)",
        )
        self.assertEqual(
            (event["outcome"], event["code"], event["address"], event["retry_at"]),
            ("deferred", 451, "[2001:db8::1]:25", "1970-01-01T00:17:40.000Z"),
        )
        self.client.behaviour["mx1:25"] = DeliveryError(None, False)
        self.clock.advance(60)
        self.client.behaviour["mx1:25"] = DeliveryError(None, False, ("192.0.2.1", 25))
        self.clock.advance(120)
        failures = [e for e in events if e.get("event") == "delivery"]
        self.assertEqual(
            [
                (e["outcome"], e["relay"], e["dsn"], e["code"], e["delay"], e["failure_class"])
                for e in failures
            ],
            [
                ("deferred", "mx1[2001:db8::1]:25", "4.3.0", 451, 0.0, "other"),
                ("deferred", "mx1:25", "4.4.1", None, 60.0, "connection-failure"),
                ("expired", "mx1[192.0.2.1]:25", "4.4.2", None, 180.0, "connection-failure"),
            ],
        )

    def test_bounced_line(self) -> None:
        """
        A recipient refused for good is C{bounced} (a warning), then the
        bounce to the sender and the freezing are one line each.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(Reply(550, "5.7.1 no"), True)
        self.client.behaviour["bounce-hop:25"] = None
        s, events = self.logged()
        [entry] = self.enqueue(s, make_envelope())
        delivery, bounce, frozen = events
        self.assertEqual(
            formatEvent(delivery),
            f"{entry.id}: to=<a@example.com>, relay=mx1:25, delay=0.0, dsn=5.7.1, "
            "class=policy, status=bounced (550 5.7.1 no)",
        )
        self.assertEqual(delivery["log_level"], LogLevel.warn)
        [dsn] = [e for e in self.spool.entries_by_id.values() if e.sender.is_null]
        self.assertEqual(
            formatEvent(bounce), f"{entry.id}: sender non-delivery notification: {dsn.id}"
        )
        self.assertEqual((bounce["event"], bounce["bounce_id"]), ("bounce", dsn.id))
        self.assertEqual(frozen["event"], "frozen")
        self.assertEqual(
            formatEvent(frozen), f"{entry.id}: frozen: permanent failure: 550 5.7.1 no (bounced)"
        )

    def test_expired_line(self) -> None:
        """
        When the retry intervals run out, the last temporary failure is
        C{expired} (a warning), not C{deferred}; the first one was
        C{deferred}.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(Reply(421, "4.4.2 gone"), False)
        s, events = self.logged(bounce=False)
        [entry] = self.enqueue(s, make_envelope(intervals=(60,)))
        self.clock.advance(60)
        lines = [e for e in events if e.get("event") == "delivery"]
        self.assertEqual([e["outcome"] for e in lines], ["deferred", "expired"])
        self.assertEqual(
            formatEvent(lines[1]),
            f"{entry.id}: to=<a@example.com>, relay=mx1:25, delay=60.0, dsn=4.4.2, "
            "class=connection-failure, status=expired (421 4.4.2 gone)",
        )
        self.assertEqual(lines[1]["log_level"], LogLevel.warn)
        self.assertNotIn("retry_at", lines[1])

    def test_one_line_per_outcome_group(self) -> None:
        """
        Recipients of one attempt are grouped by the reply they got: one
        line per group, each with its own outcome and status.
        """
        self.client.behaviour["mx1:25"] = {
            "a@example.com": Reply(250, "2.0.0 ok"),
            "b@example.com": Reply(550, "5.1.1 no such user"),
            "c@example.com": Reply(452, "4.2.2 mailbox full"),
            "d@example.com": Reply(250, "2.0.0 ok"),
        }
        s, events = self.logged(bounce=False)
        self.enqueue(
            s,
            make_envelope(
                recipients=("a@example.com", "b@example.com", "c@example.com", "d@example.com")
            ),
        )
        self.assertEqual(
            [(e["outcome"], e["to"], e["nrcpt"], e["dsn"]) for e in events],
            [
                ("sent", "<a@example.com>,<d@example.com>", 2, "2.0.0"),
                ("bounced", "<b@example.com>", 1, "5.1.1"),
                ("deferred", "<c@example.com>", 1, "4.2.2"),
            ],
        )

    def test_many_recipients_counted(self) -> None:
        """
        A line names the first five recipients of its group and counts the
        rest; the structured field has them all.
        """
        recipients = tuple(f"r{i}@example.com" for i in range(12))
        s, events = self.logged()
        self.enqueue(s, make_envelope(recipients=recipients))
        [event] = events
        self.assertEqual(
            event["to"],
            "<r0@example.com>,<r1@example.com>,<r2@example.com>,<r3@example.com>,"
            "<r4@example.com> and 7 more",
        )
        self.assertEqual((event["recipients"], event["nrcpt"]), (list(recipients), 12))

    def test_next_hop_lines(self) -> None:
        """
        A hop that fails for now is a C{deferred} line and the next hop's
        outcome another; when the retries run out, only the last hop's
        failure is C{expired}.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(None, False)
        s, events = self.logged(bounce=False)
        self.enqueue(s, make_envelope(hops=("mx1:25", "mx2:25"), intervals=(60,)))
        self.assertEqual(
            [(e["hop"], e["outcome"]) for e in events], [("mx1:25", "deferred"), ("mx2:25", "sent")]
        )
        del events[:]
        self.client.behaviour["mx2:25"] = DeliveryError(Reply(451, "4.3.0 later"), False)
        self.enqueue(s, make_envelope(hops=("mx1:25", "mx2:25"), intervals=(60,)))
        self.clock.advance(60)
        lines = [(e["hop"], e["outcome"]) for e in events if e.get("event") == "delivery"]
        self.assertEqual(
            lines,
            [
                ("mx1:25", "deferred"), ("mx2:25", "deferred"),
                ("mx1:25", "deferred"), ("mx2:25", "expired"),
            ],
        )  # fmt: skip

    def test_failure_class_recorded(self) -> None:
        """
        Each failed attempt is stored with its class (per reply: a bad
        mailbox and a full one in one attempt), a delivered one with none;
        the deferred event names the class of the last failure.
        """
        self.client.behaviour["mx1:25"] = {
            "a@example.com": Reply(450, "4.2.2 mailbox full"),
            "b@example.com": Reply(250, "2.0.0 ok"),
        }
        s = self.make()
        heard: list[Any] = []
        s.events.subscribe(heard.append)
        [entry] = self.enqueue(s, make_envelope(recipients=("a@example.com", "b@example.com")))
        stored = self.successResultOf(self.spool.get(entry.id))
        self.assertEqual(
            sorted((a.recipients, a.failure_class) for a in stored.attempts),
            [(("a@example.com",), "mailbox-full"), (("b@example.com",), None)],
        )
        [deferred] = [e for e in heard if e.kind == "deferred"]
        self.assertEqual(deferred.fields["failure_class"], "mailbox-full")

    def test_failure_classifier_fails(self) -> None:
        """
        A classifier that raises (a user's table gone wrong) leaves the
        attempt without a class and is logged; delivery goes on.
        """

        class Broken:
            def classify_attempt(self, attempt: Any) -> str:
                raise RuntimeError("broken table")

        self.client.behaviour["mx1:25"] = DeliveryError(Reply(451, "4.3.0 later"), False)
        s = self.make(failure_classifier=Broken())
        [entry] = self.enqueue(s, make_envelope(intervals=(60,)))
        stored = self.successResultOf(self.spool.get(entry.id))
        self.assertEqual([a.failure_class for a in stored.attempts], [None])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_route_failure_line(self) -> None:
        """
        Recipients that could not be routed (their domain has no MX nor
        address) have no relay, and their status comes from the error.
        """

        def unroutable(recipients: Any, hops: Any) -> Deferred[Any]:
            return defer.succeed(
                [Route(tuple(recipients), (), "5.1.2 domain example.com not found", True)]
            )

        s, events = self.logged(route=unroutable, bounce=False)
        [entry] = self.enqueue(s, make_envelope(hops=()))
        [delivery, _frozen] = events
        self.assertEqual(
            formatEvent(delivery),
            f"{entry.id}: to=<a@example.com>, relay=none, delay=0.0, dsn=5.1.2, "
            "class=bad-domain, status=bounced (5.1.2 domain example.com not found)",
        )
        self.assertEqual((delivery["hop"], delivery["address"], delivery["code"]), (None, None, None))

    def test_attempt_records_address(self) -> None:
        """
        The address a hop answered from is recorded with the attempt.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(
            Reply(451, "4.3.0 later"), False, ("192.0.2.7", 2525)
        )
        s = self.make()
        [entry] = self.enqueue(s, make_envelope())
        [attempt] = self.spool.entries_by_id[entry.id].attempts
        self.assertEqual(attempt.address, ("192.0.2.7", 2525))

    def test_gone_before_its_turn(self) -> None:
        """
        An entry settled or removed while it waited for a delivery slot is
        skipped without an error, as is one frozen meanwhile; the message
        read that went out beside the entry's is dropped quietly.
        """
        s = self.make(max_send_jobs=1)
        self.client.behaviour["mx1:25"] = None
        first, gone, frozen = self.enqueue(
            s, *[make_envelope(envelope_id=f"e{i}") for i in range(3)]
        )
        self.assertEqual((len(s.queue), gone.id in s.queue, frozen.id in s.queue), (2, True, True))
        del self.spool.entries_by_id[gone.id]
        del self.spool.messages_by_id[gone.id]
        self.successResultOf(self.spool.move(frozen.id, FROZEN))
        self.client.pending.pop().callback(
            DeliveryResult("mx1:25", (("a@example.com", Reply(250, "ok")),))
        )
        self.assertEqual(len(self.client.sent), 1)
        self.assertEqual(s.jobs, {})
        self.assertEqual(len(s.queue), 0)
        self.assertEqual(self.spool.entries_by_id[frozen.id].queue, FROZEN)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_due_once(self) -> None:
        """
        An entry that becomes due again while it waits is queued once.
        """
        s = self.make(max_send_jobs=1)
        self.client.behaviour["mx1:25"] = None
        _, waiting = self.enqueue(s, *[make_envelope(envelope_id=f"e{i}") for i in range(2)])
        s.send_now(waiting.id)
        s.send_now(waiting.id)
        self.assertEqual((len(s.queue), waiting.id in s.queue), (1, True))
        self.clock.advance(0)
        self.client.pending.pop().callback(
            DeliveryResult("mx1:25", (("a@example.com", Reply(250, "ok")),))
        )
        self.assertEqual([env.id for _, env in self.client.sent], ["e0", "e1"])

    def test_known_and_unscheduled(self) -> None:
        """
        L{DeliveryScheduler.is_known} is true for an entry being delivered,
        due, or scheduled later, and false for one it never heard of;
        L{DeliveryScheduler.unschedule} forgets a scheduled attempt.
        """
        s = self.make(max_send_jobs=1)
        self.client.behaviour["mx1:25"] = None
        delivering, due = self.enqueue(s, *[make_envelope(envelope_id=f"e{i}") for i in range(2)])
        s.schedule("later-0", self.clock.seconds() + 60)
        self.assertEqual(
            [s.is_known(i) for i in (delivering.id, due.id, "later-0", "nosuch-0")],
            [True, True, True, False],
        )
        s.unschedule("later-0")
        s.unschedule("nosuch-0")
        self.assertFalse(s.is_known("later-0"))
        self.clock.advance(60)
        self.assertEqual(len(self.client.sent), 1)

    def test_update_failure_keeps_entry(self) -> None:
        """
        A spool error while recording the outcome is logged and the entry
        stays in the active queue.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(None, False)
        s = self.make()
        self.spool.update = lambda entry: defer.fail(OSError("disk full"))  # type: ignore[method-assign]
        [entry] = self.enqueue(s, make_envelope())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.spool.entries_by_id[entry.id].queue, ACTIVE)

    def test_stop_waits_for_running(self) -> None:
        """
        Stopping waits for running deliveries up to a bound, and starts no
        new ones.
        """
        self.client.behaviour["mx1:25"] = None
        s = self.make(max_send_jobs=1, stop_timeout=30)
        self.enqueue(s, make_envelope(envelope_id="e1"), make_envelope(envelope_id="e2"))
        d = s.stopService()
        self.assertNoResult(d)
        self.client.pending[0].callback(
            DeliveryResult("mx1:25", (("a@example.com", Reply(250, "ok")),))
        )
        self.successResultOf(d)
        self.assertEqual(len(self.client.sent), 1)
        s2 = self.make(max_send_jobs=1, stop_timeout=30)
        self.enqueue(s2, make_envelope(envelope_id="e3"))
        d2 = s2.stopService()
        self.assertNoResult(d2)
        self.clock.advance(30)
        self.successResultOf(d2)

    def test_stop_closes_idle_connections(self) -> None:
        """
        Once running deliveries are done, stopping closes the connections
        the client keeps for reuse, and waits for that.
        """
        closing: Deferred[None] = Deferred()
        self.client.close_idle = lambda: closing  # type: ignore[attr-defined]
        self.client.behaviour["mx1:25"] = None
        s = self.make(stop_timeout=30)
        self.enqueue(s, make_envelope())
        d = s.stopService()
        self.client.pending[0].callback(
            DeliveryResult("mx1:25", (("a@example.com", Reply(250, "ok")),))
        )
        self.assertNoResult(d)
        closing.callback(None)
        self.successResultOf(d)


class RestartTests(SynchronousTestCase):
    """
    A new scheduler over a L{DiskSpool} picks up where the old one left.
    """

    def test_restart_picks_up_active_only(self) -> None:
        """
        Active entries are delivered after a restart; frozen ones are not.
        """
        clock = Clock()
        root = self.mktemp()
        spool = DiskSpool(os.path.join(root, "spool"), defer.maybeDeferred, clock)
        self.successResultOf(spool.recover())
        [a] = self.successResultOf(spool.enqueue([make_envelope(envelope_id="act")]))
        [f] = self.successResultOf(spool.enqueue([make_envelope(envelope_id="frz")]))
        self.successResultOf(spool.move(f.id, FROZEN))
        spool2 = DiskSpool(os.path.join(root, "spool"), defer.maybeDeferred, clock)
        client = FakeClient()
        s = DeliveryScheduler(spool=spool2, client=client, clock=clock, route=no_dns)
        s.startService()
        clock.advance(0)
        self.assertEqual([e.id for _, e in client.sent], ["act"])
        self.assertEqual(self.successResultOf(spool2.entries(ACTIVE)), [])
        self.assertEqual([e.id for e in self.successResultOf(spool2.entries(FROZEN))], [f.id])
        del a


    def test_crash_during_delivery(self) -> None:
        """
        An entry whose delivery was under way when the relay died (the
        hop's answer never came) is delivered again after restart; so is
        one whose retry was recorded; quarantined and removed ones are not.
        """
        from relay.model.entry import REMOVED

        clock = Clock()
        root = self.mktemp()
        path = os.path.join(root, "spool")
        spool = DiskSpool(path, defer.maybeDeferred, clock)
        self.successResultOf(spool.recover())
        client = FakeClient()
        client.behaviour["mx1:25"] = None
        client.behaviour["mx2:25"] = DeliveryError(None, False)
        s = DeliveryScheduler(spool=spool, client=client, clock=clock, route=no_dns)
        s.startService()
        served = ObservedSpool(spool, SchedulerObserver(s))
        self.successResultOf(served.enqueue([make_envelope(envelope_id="busy")]))
        self.successResultOf(served.enqueue([make_envelope(envelope_id="later", hops=("mx2:25",))]))
        self.successResultOf(spool.quarantine([make_envelope(envelope_id="quar")], "spam"))
        [r] = self.successResultOf(spool.enqueue([make_envelope(envelope_id="gone")]))
        self.successResultOf(spool.move(r.id, REMOVED))
        clock.advance(0)
        self.assertEqual(sorted(e.id for _, e in client.sent), ["busy", "later"])
        # "Crash": the first scheduler is abandoned (its clock goes on, so
        # its due queue is stopped: a dead process schedules nothing).
        s.queue.stop()
        spool2 = DiskSpool(path, defer.maybeDeferred, clock)
        self.successResultOf(spool2.recover())
        client2 = FakeClient()
        s2 = DeliveryScheduler(spool=spool2, client=client2, clock=clock, route=no_dns)
        s2.startService()
        clock.advance(0)
        self.assertEqual([e.id for _, e in client2.sent], ["busy"])
        clock.advance(60)
        self.assertEqual(sorted(e.id for _, e in client2.sent), ["busy", "later"])
        self.assertEqual(self.successResultOf(spool2.entries(ACTIVE)), [])


class BounceContentTests(SynchronousTestCase):
    """
    The bounce spooled by the scheduler is a well-formed DSN.
    """

    def test_bounce_parses(self) -> None:
        """
        The DSN is multipart/report with a delivery-status part naming the
        failed recipient and the original headers.
        """
        clock = Clock()
        spool = MemorySpool(clock)
        client = FakeClient()
        client.behaviour["mx1:25"] = DeliveryError(Reply(550, "5.1.1 unknown user"), True)
        client.behaviour["bounce-hop:25"] = None
        s = DeliveryScheduler(
            spool=spool, client=client, clock=clock, route=no_dns,
            hostname="relay.test", smarthost="smart:25",
        )
        s.startService()
        self.successResultOf(ObservedSpool(spool, SchedulerObserver(s)).enqueue([make_envelope()]))
        clock.advance(0)
        [bounce] = [e for e in spool.entries_by_id.values() if e.sender.is_null]
        # The default route: decided when the bounce is delivered.
        self.assertEqual(bounce.next_hop_choices, ())
        data = spool.messages_by_id[bounce.id].data
        assert data is not None
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        msg = email.message_from_bytes(data)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        parts = msg.get_payload()
        assert isinstance(parts, list)
        self.assertEqual(
            [p.get_content_type() for p in parts],
            # without RET, a small original comes back whole
            ["text/plain", "message/delivery-status", "message/rfc822"],
        )
        status = parts[1].get_payload()
        assert isinstance(status, list)
        self.assertEqual(status[0]["Reporting-MTA"], "dns; relay.test")
        self.assertEqual(status[1]["Final-Recipient"], "rfc822; a@example.com")
        self.assertEqual(status[1]["Action"], "failed")
        self.assertEqual(status[1]["Status"], "5.1.1")
        self.assertIn("unknown user", status[1]["Diagnostic-Code"])
        self.assertIn(b"\r\n\r\n" + DATA + b"\r\n--", data)


class SchedulerObserverTests(SynchronousTestCase):
    """
    L{SchedulerObserver} passes the spool's news on to the scheduler.
    """

    def test_told(self) -> None:
        """
        It is an L{ISpoolObserver}; spooled entries are scheduled at once,
        quarantined ones only make an event.
        """
        from zope.interface.verify import verifyObject

        from relay.interfaces import ISpoolObserver

        clock = Clock()
        spool = MemorySpool(clock)
        client = FakeClient()
        s = DeliveryScheduler(spool=spool, client=client, clock=clock, route=no_dns)
        s.startService()
        observer = SchedulerObserver(s)
        verifyObject(ISpoolObserver, observer)
        events: list[tuple[str, Any]] = []
        s.events.subscribe(lambda event: events.append((event.kind, event.entry_id)))
        [entry] = self.successResultOf(spool.enqueue([make_envelope()]))
        [q] = self.successResultOf(spool.quarantine([make_envelope(envelope_id="q")], "virus"))
        observer.spooled([entry], [])
        observer.quarantined([q], "virus")
        clock.advance(0)
        self.assertEqual([e.id for _, e in client.sent], [entry.envelope_id])
        self.assertEqual(events[:2], [("spooled", entry.id), ("quarantined", q.id)])


class WiringTests(SynchronousTestCase):
    """
    L{relay.service.makeService} builds and runs the scheduler.
    """

    def test_make_service(self) -> None:
        """
        The scheduler is started with the spool (after recovery), the SMTP
        server writes through an L{ObservedSpool} telling the scheduler,
        settings are passed on, and stopping waits for it before unlocking
        the spool.
        """
        from twisted.internet.testing import MemoryReactorClock

        from relay.service import makeService

        reactor = MemoryReactorClock()
        base = self.mktemp()
        top = makeService(
            smtp=["tcp:0:interface=127.0.0.1"],
            spool=os.path.join(base, "spool"),
            quarantine=os.path.join(base, "q"),
            reactor=reactor,
            hostname="relay.test",
            max_send_jobs=3,
            retry_intervals=(10.0,),
            bounce=False,
            smarthost="smart:25",
            run_in_thread=defer.maybeDeferred,
        )
        scheduler = top.delivery  # type: ignore[attr-defined]
        self.assertIsInstance(scheduler, DeliveryScheduler)
        self.assertIsInstance(top.factory.spool, ObservedSpool)  # type: ignore[attr-defined]
        self.assertIsInstance(top.factory.spool.observer, SchedulerObserver)  # type: ignore[attr-defined]
        self.assertEqual(scheduler.max_send_jobs, 3)
        self.assertEqual(scheduler.default_retry_intervals, (10.0,))
        self.assertFalse(scheduler.bounce)
        self.assertEqual(scheduler.smarthost, "smart:25")
        top.privilegedStartService()
        top.startService()
        self.assertTrue(scheduler.running)
        self.successResultOf(defer.maybeDeferred(top.stopService))
        self.assertFalse(scheduler.running)

    def test_stop_waits_for_deliveries_before_pool(self) -> None:
        """
        On stop the thread pool is stopped only after the spool service
        (waiting for running deliveries) is done, so that deliveries can
        still record their outcome.
        """
        from relay.app.services import ThreadPoolService

        class FakePool:
            started = True

            def stop(self) -> None:
                self.started = False

        pool = FakePool()
        blocker: Deferred[None] = Deferred()
        service = ThreadPoolService(pool, stop_after=lambda: blocker)  # type: ignore[arg-type]
        service.running = 1
        d = defer.maybeDeferred(service.stopService)
        self.assertNoResult(d)
        self.assertTrue(pool.started)
        blocker.callback(None)
        self.successResultOf(d)
        self.assertFalse(pool.started)
