"""
The life of an entry after its delivery attempts (issue 12): failures
reported once, settled entries that expire, removed entries that expire,
routing decided at each attempt, and version 1 spools carried forward.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.nexthop import make_router
from relay.delivery.scheduler import DeliveryScheduler, SchedulerObserver
from relay.model.entry import ACTIVE, FROZEN, REMOVED
from relay.model.reply import Reply
from relay.spool.codec import FILE_VERSION
from relay.spool.disk import DiskSpool
from relay.spool.memory import MemorySpool
from relay.spool.observed import ObservedSpool
from tests.test_delivery import DeliveryError, FakeClient, make_envelope, no_dns
from tests.test_spool import V1_ENTRY

DAY = 86400.0


class LifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.spool = MemorySpool(self.clock)
        self.client = FakeClient()
        self.events: list[tuple[str, Any]] = []

    def make(self, **kw: Any) -> DeliveryScheduler:
        kw.setdefault("route", no_dns)
        s = DeliveryScheduler(
            spool=self.spool, client=self.client, clock=self.clock, hostname="relay.test", **kw
        )
        s.events.subscribe(lambda e: self.events.append((e.kind, e.entry_id)))
        s.startService()
        self.addCleanup(lambda: s.stopService() if s.running else None)
        return s

    def enqueue(self, s: DeliveryScheduler, *envelopes: Any) -> list[Any]:
        entries = self.successResultOf(
            ObservedSpool(self.spool, SchedulerObserver(s)).enqueue(list(envelopes))
        )
        self.clock.advance(0)
        return entries

    def bounces(self) -> list[Any]:
        return [e for e in self.spool.entries_by_id.values() if e.sender.is_null]

    def resend(self, entry_id: str) -> None:
        """
        What C{relayctl send} does to a frozen entry: due now, active.
        """
        entry = self.spool.entries_by_id[entry_id]
        self.successResultOf(
            self.spool.update(dataclasses.replace(entry, next_attempt_at=self.clock.seconds()))
        )
        self.successResultOf(self.spool.move(entry_id, ACTIVE))

    def test_bounced_once(self) -> None:
        """
        A recipient that failed for good is reported once: sending the
        frozen entry again, however often, sends no second bounce, and the
        recipient delivered meanwhile is not tried again.
        """
        self.client.behaviour["mx1:25"] = {
            "a@example.com": Reply(250, "2.0.0 ok"),
            "b@example.com": Reply(550, "5.1.1 no such user"),
        }
        self.client.behaviour["bounce-hop:25"] = None  # the bounce waits
        s = self.make()
        [entry] = self.enqueue(s, make_envelope(recipients=("a@example.com", "b@example.com")))
        frozen = self.spool.entries_by_id[entry.id]
        self.assertEqual(frozen.queue, FROZEN)
        self.assertTrue(frozen.settled)
        self.assertEqual(frozen.delivered_recipients, ("a@example.com",))
        self.assertEqual(frozen.reported, ("b@example.com",))
        self.assertEqual(len(self.bounces()), 1)
        for _ in range(3):
            self.resend(entry.id)
            s.schedule(entry.id, self.clock.seconds())
            self.clock.advance(0)
            self.assertEqual(self.spool.entries_by_id[entry.id].queue, FROZEN)
        self.assertEqual(len(self.bounces()), 1)
        self.assertEqual(
            [str(r) for _, env in self.client.sent if not env.sender.is_null for r in env.recipients],
            ["a@example.com", "b@example.com"],
        )

    def test_retried_failures_bounce_only_if_they_fail_again(self) -> None:
        """
        A failed recipient put back to pending (C{--retry-failed}) is tried
        again: delivered, nobody is told twice; failing again, the sender
        hears of it once more.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(Reply(550, "5.1.1 no such user"), True)
        self.client.behaviour["bounce-hop:25"] = None
        s = self.make()
        [entry] = self.enqueue(s, make_envelope())
        self.assertEqual(len(self.bounces()), 1)
        frozen = self.spool.entries_by_id[entry.id]
        retried = dataclasses.replace(
            frozen, recipients=(make_envelope().envelope.recipients[0],),
            failed_recipients=(), reported=(),
        )  # fmt: skip
        self.successResultOf(self.spool.update(retried))
        self.resend(entry.id)
        s.schedule(entry.id, self.clock.seconds())
        self.clock.advance(0)
        self.assertEqual(len(self.bounces()), 2)

    def test_settled_entries_expire(self) -> None:
        """
        A settled frozen entry is deleted once it has been frozen for
        C{--bounced-lifetime}, with a log line and an C{expired} event; an
        entry an operator froze (recipients pending) is never deleted.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(Reply(550, "5.1.1 no"), True)
        self.client.behaviour["bounce-hop:25"] = None
        s = self.make(bounced_lifetime=2 * DAY)
        settled, held = self.enqueue(s, make_envelope(envelope_id="s"), make_envelope(envelope_id="h"))
        held_entry = self.spool.entries_by_id[held.id]
        self.successResultOf(
            self.spool.update(
                dataclasses.replace(
                    held_entry, recipients=make_envelope().envelope.recipients,
                    failed_recipients=(), reported=(), moved_at=self.clock.seconds(),
                    reason="frozen by operator",
                )
            )
        )  # fmt: skip
        self.assertEqual(self.spool.entries_by_id[settled.id].queue, FROZEN)
        with capturedLogs() as logged:
            self.clock.advance(2 * DAY - 3600)
            self.assertIn(settled.id, self.spool.entries_by_id)
            self.clock.advance(3601)
        self.assertNotIn(settled.id, self.spool.entries_by_id)
        self.assertIn(held.id, self.spool.entries_by_id)
        self.assertIn(("expired", settled.id), self.events)
        self.assertTrue([e for e in logged if e.get("event") == "expired"])
        self.clock.advance(30 * DAY)
        self.assertIn(held.id, self.spool.entries_by_id)

    def test_removed_entries_expire(self) -> None:
        """
        A removed entry is deleted after C{--removed-lifetime} in the
        removed queue.
        """
        s = self.make(removed_lifetime=DAY)
        self.client.behaviour["mx1:25"] = None
        [entry] = self.enqueue(s, make_envelope())
        removed = dataclasses.replace(
            self.spool.entries_by_id[entry.id], moved_at=self.clock.seconds()
        )
        self.successResultOf(self.spool.update(removed))
        self.successResultOf(self.spool.move(entry.id, REMOVED))
        self.clock.advance(DAY - 1)
        self.clock.advance(3600)
        self.assertNotIn(entry.id, self.spool.entries_by_id)
        self.assertIn(("expired", entry.id), self.events)

    def test_bounced_lifetime_zero(self) -> None:
        """
        With C{--bounced-lifetime 0} a settled entry leaves the spool at
        once, after its bounce.
        """
        self.client.behaviour["mx1:25"] = DeliveryError(Reply(550, "5.1.1 no"), True)
        self.client.behaviour["bounce-hop:25"] = None
        s = self.make(bounced_lifetime=0)
        [entry] = self.enqueue(s, make_envelope())
        self.assertNotIn(entry.id, self.spool.entries_by_id)
        self.assertEqual(len(self.bounces()), 1)
        self.assertIn(("expired", entry.id), self.events)


class RoutingAtDeliveryTests(SynchronousTestCase):
    """
    An entry on the default route goes where the relay routes mail when
    it delivers it, not where it did when the mail was accepted.
    """

    def test_smarthost_fixed_after_restart(self) -> None:
        """
        Queued while --smarthost was wrong, delivered to the right one
        after a restart with the fix; a plugin's own hops stay.
        """
        clock = Clock()
        clock.advance(1000)
        spool = MemorySpool(clock)
        client = FakeClient()
        client.behaviour["wrong.example:25"] = DeliveryError(Reply(421, "4.4.1 no"), False)
        client.behaviour["plugin.example:25"] = DeliveryError(Reply(421, "4.4.1 no"), False)
        old = DeliveryScheduler(
            spool=spool, client=client, clock=clock,
            route=make_router(lambda: None, "wrong.example:25"),
        )  # fmt: skip
        old.startService()
        served = ObservedSpool(spool, SchedulerObserver(old))
        [default] = self.successResultOf(served.enqueue([make_envelope(hops=(), envelope_id="d")]))
        [chosen] = self.successResultOf(
            served.enqueue([make_envelope(hops=("plugin.example:25",), envelope_id="p")])
        )
        clock.advance(0)
        self.assertEqual(spool.entries_by_id[default.id].next_hop_choices, ())
        self.successResultOf(old.stopService())
        client.sent.clear()
        del client.behaviour["plugin.example:25"]
        new = DeliveryScheduler(
            spool=spool, client=client, clock=clock,
            route=make_router(lambda: None, "right.example:25"),
        )  # fmt: skip
        new.startService()
        self.addCleanup(new.stopService)
        clock.advance(3600)
        self.assertEqual(
            sorted((hop, env.id) for hop, env in client.sent),
            [("plugin.example:25", "p"), ("right.example:25", "d")],
        )


class VersionOneSpoolTests(SynchronousTestCase):
    """
    A spool written by a relay of format version 1 is delivered from, and
    written forward as version 2, with nothing lost.
    """

    def test_v1_entry_delivered_and_rewritten(self) -> None:
        """
        A version 1 entry (its remaining schedule and every attempt in the
        file) is picked up, its pending recipients tried with its own
        schedule, and its file rewritten as version 2 when deferred.
        """
        clock = Clock()
        clock.advance(5000)
        path = self.mktemp()
        spool = DiskSpool(path, defer.maybeDeferred, clock)
        self.successResultOf(spool.recover())
        layout = spool.layout
        data = dict(V1_ENTRY, next_attempt_at=5000.0)
        with open(layout.message_path(data["id"]), "wb") as f:
            f.write(b"Subject: old\r\n\r\nfrom an old relay\r\n")
        metadata = layout.metadata_path(ACTIVE, data["id"])
        with open(metadata, "w") as f:
            json.dump(data, f)
        os.utime(metadata, (5000.0, 5000.0))
        client = FakeClient()
        client.behaviour["mx.example.net:25"] = DeliveryError(Reply(451, "4.3.0 later"), False)
        s = DeliveryScheduler(spool=spool, client=client, clock=clock, route=no_dns)
        s.startService()
        self.addCleanup(s.stopService)
        clock.advance(0)
        [(hop, envelope)] = client.sent
        self.assertEqual(hop, "mx.example.net:25")
        self.assertEqual([str(r) for r in envelope.recipients], ["a@example.com", "b@example.com"])
        self.assertEqual(envelope.message.data, b"Subject: old\r\n\r\nfrom an old relay\r\n")
        with open(metadata) as f:
            written = json.load(f)
        self.assertEqual(written["version"], FILE_VERSION)
        # its own schedule: the first of its three remaining intervals used
        self.assertEqual((written["schedule"], written["step"]), ([600.0, 1200.0, 2400.0], 1))
        self.assertEqual(written["next_attempt_at"], 5600.0)
        self.assertEqual(written["attempt_count"], 10)
        self.assertEqual(written["reported"], ["c@example.com"])
        self.assertEqual(os.stat(metadata).st_mtime, 5600.0)
