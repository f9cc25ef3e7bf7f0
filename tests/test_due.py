"""
Tests for L{relay.delivery.due}: only what comes due soon is held in
memory; the rest is found on disk by scans.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.due import DueQueue
from relay.delivery.scheduler import DeliveryScheduler
from relay.model.reply import Reply
from relay.spool.memory import MemorySpool
from tests.test_delivery import (
    DeliveryError,
    DeliveryResult,
    FakeClient,
    make_envelope,
    no_dns,
)


class DueQueueTests(SynchronousTestCase):
    """
    L{DueQueue} over a L{MemorySpool} and a Clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.spool = MemorySpool(self.clock)
        self.woken = 0

    def wake(self) -> None:
        self.woken += 1

    def queue(self, **kw: Any) -> DueQueue:
        kw.setdefault("window", 300.0)
        kw.setdefault("scan_interval", 120.0)
        q = DueQueue(self.spool, self.clock, self.wake, **kw)
        self.addCleanup(q.stop)
        return q

    def waiting(self, *delays: float) -> list[str]:
        """
        Entries in the active queue, due after C{delays} seconds each.
        """
        ids = []
        for i, delay in enumerate(delays):
            [entry] = self.successResultOf(self.spool.enqueue([make_envelope(envelope_id=f"w{i}")]))
            self.successResultOf(
                self.spool.update(
                    dataclasses.replace(entry, next_attempt_at=self.clock.seconds() + delay)
                )
            )
            ids.append(entry.id)
        return ids

    def drain(self, q: DueQueue, deliver: bool = True) -> list[str]:
        """
        Take what is due, as the scheduler would, and (C{deliver}) deliver
        it: it leaves the active queue.
        """
        out = []
        while (entry_id := q.pop_due()) is not None:
            out.append(entry_id)
            if deliver:
                self.successResultOf(self.spool.finish(entry_id))
        return out

    def test_holds_only_the_window(self) -> None:
        """
        The first scan takes what is due within the window; an entry due
        later costs nothing in memory until a later scan finds it, before
        its time.
        """
        soon, later, much_later = self.waiting(10, 400, 86400)
        q = self.queue()
        q.start()
        self.assertEqual((soon in q, later in q, much_later in q), (True, False, False))
        self.assertEqual(len(q), 1)
        self.clock.advance(10)
        self.assertEqual(self.woken, 1)
        self.assertEqual(self.drain(q), [soon])
        self.clock.advance(120)  # a scan at 1130 sees up to 1430: later (1400)
        self.assertIn(later, q)
        self.assertNotIn(much_later, q)
        self.clock.advance(270)
        self.assertEqual(self.drain(q), [later])
        handed_at = None
        while handed_at is None:
            self.clock.advance(60)
            self.assertLessEqual(len(q), 1)
            if self.drain(q) == [much_later]:
                handed_at = self.clock.seconds()
        # handed out in the minute its time fell in, not before
        self.assertTrue(handed_at - 60 < 1000 + 86400 <= handed_at, handed_at)

    def test_push_inside_and_outside_the_window(self) -> None:
        """
        What the relay schedules itself goes into memory when it is due
        within the window; farther off it is forgotten (a scan finds it),
        and a reschedule makes the old time stale.
        """
        q = self.queue()
        q.start()
        q.push("a-0", 1005.0)
        q.push("b-0", 1000.0 + 301)
        self.assertEqual((len(q), "a-0" in q, "b-0" in q), (1, True, False))
        q.push("a-0", 1010.0)
        self.clock.advance(5)
        self.assertEqual(self.drain(q, deliver=False), [])
        self.clock.advance(5)
        self.assertEqual(self.drain(q, deliver=False), ["a-0"])
        q.push("c-0", 1020.0)
        q.remove("c-0")
        self.clock.advance(20)
        self.assertEqual(self.drain(q, deliver=False), [])

    def test_backlog_bounded(self) -> None:
        """
        A backlog that comes due at once is held at most C{backlog}
        entries at a time; as they are handed out, scans take the rest.
        """
        ids = self.waiting(*([0] * 50))
        q = self.queue(backlog=10)
        q.start()
        self.assertEqual(len(q), 10)
        handed: list[str] = []
        while len(handed) < 50:
            self.clock.advance(0)
            entry_id = q.pop_due()
            self.assertIsNotNone(entry_id, handed)
            assert entry_id is not None
            handed.append(entry_id)
            # delivered: it leaves the active queue
            self.successResultOf(self.spool.finish(entry_id))
            self.assertLessEqual(len(q), 10)
        self.assertEqual(sorted(handed), sorted(ids))

    def test_push_bounded_by_the_backlog(self) -> None:
        """
        Entries pushed one by one (C{send --all} makes each due as it
        rewrites it) are held at most C{backlog} at a time too; the rest
        wait on disk and are found by the scans that handing out the held
        ones starts, so that every one is handed out once.
        """
        q = self.queue(backlog=10)
        q.start()
        ids = self.waiting(*([0] * 50))
        for entry_id in ids:
            q.push(entry_id, self.clock.seconds())
        self.assertEqual(len(q), 10)
        handed: list[str] = []
        while len(handed) < 50:
            self.clock.advance(0)
            entry_id = q.pop_due()
            self.assertIsNotNone(entry_id, handed)
            assert entry_id is not None
            handed.append(entry_id)
            self.successResultOf(self.spool.finish(entry_id))
            self.assertLessEqual(len(q), 10)
        self.assertEqual(sorted(handed), sorted(ids))
        self.assertEqual(len(set(handed)), 50)

    def test_busy_left_out(self) -> None:
        """
        A scan leaves out the entries being delivered.
        """
        a, b = self.waiting(0, 0)
        q = DueQueue(self.spool, self.clock, self.wake, busy=lambda entry_id: entry_id == a)
        self.addCleanup(q.stop)
        q.start()
        self.assertEqual((a in q, b in q), (False, True))


class SchedulerBacklogTests(SynchronousTestCase):
    """
    The scheduler with a backlog many times its memory.
    """

    def test_drained_at_the_send_job_limit(self) -> None:
        """
        500 entries due at once are all delivered, never more than
        C{max_send_jobs} at a time and never more than the backlog held in
        memory.
        """
        clock = Clock()
        clock.advance(1000)
        spool = MemorySpool(clock)
        client = FakeClient()
        client.behaviour["mx1:25"] = None
        for i in range(500):
            self.successResultOf(spool.enqueue([make_envelope(envelope_id=f"b{i}")]))
        s = DeliveryScheduler(
            spool=spool, client=client, clock=clock, route=no_dns, max_send_jobs=5,
            due=lambda *a, **kw: DueQueue(*a, backlog=40, **kw),
        )  # fmt: skip
        s.startService()
        self.addCleanup(s.stopService)
        clock.advance(0)
        peak_jobs = peak_held = answered = 0
        while client.pending:
            peak_jobs = max(peak_jobs, len(s.jobs))
            peak_held = max(peak_held, len(s.queue))
            d = client.pending.pop(0)
            _, envelope = client.sent[answered]
            answered += 1
            d.callback(
                DeliveryResult(
                    "mx1:25", tuple((str(r), Reply(250, "ok")) for r in envelope.recipients)
                )
            )
            clock.advance(0)
        self.assertEqual(len(client.sent), 500)
        self.assertEqual(spool.entries_by_id, {})
        self.assertEqual(peak_jobs, 5)
        self.assertLessEqual(peak_held, 40)

    def test_not_due_when_read(self) -> None:
        """
        An entry handed out on a hint (a scan of mtimes) whose own next
        attempt is later goes back with its own time, and no attempt is
        made before it.
        """
        clock = Clock()
        clock.advance(1000)
        spool = MemorySpool(clock)
        client = FakeClient()
        client.behaviour["mx1:25"] = DeliveryError(Reply(451, "4.3.0 later"), False)
        s = DeliveryScheduler(spool=spool, client=client, clock=clock, route=no_dns)
        s.startService()
        self.addCleanup(s.stopService)
        [entry] = self.successResultOf(spool.enqueue([make_envelope()]))
        self.successResultOf(spool.update(dataclasses.replace(entry, next_attempt_at=1100.0)))
        s.queue.push(entry.id, 1000.0)  # the hint says now
        clock.advance(0)
        self.assertEqual(client.sent, [])
        self.assertIn(entry.id, s.queue)
        clock.advance(99)
        self.assertEqual(client.sent, [])
        clock.advance(1)
        self.assertEqual(len(client.sent), 1)
