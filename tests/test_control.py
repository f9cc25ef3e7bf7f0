"""
Tests for L{relay.control.server}: every command of L{relay.control.rpc} through an
in-memory AMP connection (L{twisted.test.iosim}), against a L{MemorySpool}
and a L{DiskSpool}, with a fake delivery scheduler.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from relay.control import rpc
from relay.control.client import ControlClient
from relay.control.server import (
    LIST_PAGE,
    ControlFactory,
    ControlLocator,
    ControlProtocol,
    plugin_locators,
)
from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, REMOVED, SpoolEntry, new_id
from relay.model.message import Message
from relay.spool.disk import DiskSpool
from relay.testing import MemorySpool
from tests.test_spool import DATA, make_envelope


def synchronous(f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
    """
    A C{run_in_thread} that runs C{f} at once.
    """
    return defer.maybeDeferred(f, *args, **kw)


class FakeScheduler:
    """
    Records what the control endpoint asks of the delivery scheduler.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.smarthost = "smart.example:2525"
        self.max_send_jobs = 10
        self.unscheduled: list[str] = []
        self.notified: list[SpoolEntry] = []
        self.sent_now: list[str] = []

    def unschedule(self, entry_id: str) -> None:
        self.unscheduled.append(entry_id)

    def notify(self, entries: Iterable[SpoolEntry]) -> None:
        self.notified.extend(entries)

    def send_now(self, entry_id: str) -> None:
        self.sent_now.append(entry_id)

    def set_max_send_jobs(self, n: int) -> None:
        self.max_send_jobs = n


class Echo(amp.Command):
    """
    A plugin's own RPC.
    """

    arguments = [(b"text", amp.Unicode())]
    response = [(b"echoed", amp.Unicode())]


class EchoLocator(amp.CommandLocator):
    """
    The plugin's responders.
    """

    @Echo.responder
    def echo(self, text: str) -> dict[str, str]:
        return {"echoed": text.upper()}


class Plugin:
    """
    A plugin serving L{Echo}.
    """

    def rpcs(self) -> list[Any]:
        return [EchoLocator()]


class ControlMixin:
    """
    The commands, over any spool: subclasses define C{make_spool}.
    """

    clock: Clock
    spool: Any

    def make_spool(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.spool = self.make_spool()
        self.scheduler = FakeScheduler(self.clock)
        self.connect(self.scheduler, [EchoLocator()])
        self.a, self.b = self.successResultOf(  # type: ignore[attr-defined]
            self.spool.enqueue([make_envelope("one"), make_envelope("two")])
        )

    def connect(self, scheduler: Any, locators: list[Any]) -> None:
        self.pages: list[dict[str, Any]] = []

        def server() -> ControlProtocol:
            return ControlProtocol(self.spool, scheduler, locators, self.clock)

        def client() -> ControlClient:
            return ControlClient(
                on_entries=lambda entries, ids, unreadable: self.pages.append(
                    {"entries": entries, "ids": ids, "unreadable": unreadable}
                ),
                on_data=lambda data: self.pages.append({"data": data}),
            )

        self.client, self.server, self.pump = iosim.connectedServerAndClient(server, client)

    def call(self, command: type[amp.Command], **kw: Any) -> Any:
        """
        Call C{command} and return its answer.
        """
        d = self.client.callRemote(command, **kw)
        self.pump.flush()
        return self.successResultOf(d)  # type: ignore[attr-defined]

    def fails(self, command: type[amp.Command], error: type[Exception], **kw: Any) -> str:
        """
        Call C{command}, which must fail with C{error}; return its message.
        """
        d = self.client.callRemote(command, **kw)
        # AMP reports an error nobody has handled by the time it arrives as
        # unhandled (and drops the connection): catch it before pumping.
        failures: list[Any] = []
        d.addErrback(failures.append)
        self.pump.flush()
        self.assertEqual(len(failures), 1)  # type: ignore[attr-defined]
        failures[0].trap(error)
        self.assertFalse(self.client.transport.disconnecting)  # type: ignore[attr-defined, union-attr]
        return str(failures[0].value)

    def queue_of(self, entry_id: str) -> str:
        return str(self.successResultOf(self.spool.get(entry_id)).queue)  # type: ignore[attr-defined]

    def listed(self, **kw: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """
        L{rpc.Status} with C{kw}: the entries of its pages (JSON) and its
        answer.
        """
        del self.pages[:]
        answer = self.call(rpc.Status, **kw)
        entries = [
            json.loads(line)
            for page in self.pages
            for line in (page["entries"] or "").splitlines()
        ]
        return entries, answer

    def counts(self, **kw: Any) -> dict[str, int]:
        """
        L{rpc.Count}'s answer, without the queues it left out.
        """
        return {q: n for q, n in self.call(rpc.Count, **kw).items() if n is not None}

    def entry(self, entry_id: str) -> SpoolEntry:
        return self.successResultOf(self.spool.get(entry_id))  # type: ignore[attr-defined, no-any-return]

    # -- Status, Count ------------------------------------------------

    def test_status(self) -> None:
        """
        L{rpc.Status} lists the active queue by default, in pages of JSON
        Lines (one entry per line, with its queue), and answers how many
        it listed.
        """
        entries, answer = self.listed()
        self.assertEqual(sorted(e["id"] for e in entries), sorted([self.a.id, self.b.id]))  # type: ignore[attr-defined]
        self.assertEqual(answer, {"entries": 2, "unreadable": 0})  # type: ignore[attr-defined]
        for e in entries:
            self.assertEqual(e["queue"], ACTIVE)  # type: ignore[attr-defined]
            self.assertEqual(e["recipients"], ["a@example.com"])  # type: ignore[attr-defined]

    def test_status_queue(self) -> None:
        """
        L{rpc.Status} with a queue lists that queue, quarantine reasons
        included; an empty queue sends no page.
        """
        [q] = self.successResultOf(  # type: ignore[attr-defined]
            self.spool.quarantine([make_envelope("bad")], "virus found")
        )
        entries, _ = self.listed(queue=QUARANTINE)
        self.assertEqual([(e["id"], e["queue"], e["reason"]) for e in entries],  # type: ignore[attr-defined]
                         [(q.id, QUARANTINE, "virus found")])
        entries, answer = self.listed(queue=FROZEN)
        self.assertEqual((entries, self.pages, answer["entries"]), ([], [], 0))  # type: ignore[attr-defined]

    def test_status_bad_queue(self) -> None:
        """
        An unknown queue is a L{rpc.BadArgument}.
        """
        message = self.fails(rpc.Status, rpc.BadArgument, queue="nowhere")
        self.assertIn("nowhere", message)  # type: ignore[attr-defined]

    def test_status_pages(self) -> None:
        """
        A listing longer than a page comes in several pages, each in
        creation order, every entry once; C{ids_only} pages carry ids.
        """
        more = [make_envelope(new_id(900.0 + i)) for i in range(LIST_PAGE + 50)]
        made = self.successResultOf(self.spool.enqueue(more))  # type: ignore[attr-defined]
        entries, answer = self.listed()
        self.assertGreaterEqual(len(self.pages), 2)  # type: ignore[attr-defined]
        self.assertEqual(answer["entries"], len(made) + 2)  # type: ignore[attr-defined]
        self.assertEqual(sorted(e["id"] for e in entries),  # type: ignore[attr-defined]
                         sorted([e.id for e in made] + [self.a.id, self.b.id]))
        for page in self.pages:
            lines = [json.loads(line) for line in page["entries"].splitlines()]
            order = [(e["created_at"], e["id"]) for e in lines]
            self.assertEqual(order, sorted(order))  # type: ignore[attr-defined]
        del self.pages[:]
        answer = self.call(rpc.Status, ids_only=True)
        ids = [i for page in self.pages for i in page["ids"].splitlines()]
        self.assertEqual(sorted(ids), sorted(e["id"] for e in entries))  # type: ignore[attr-defined]
        self.assertEqual([p["entries"] for p in self.pages], [None] * len(self.pages))  # type: ignore[attr-defined]

    def test_status_filters(self) -> None:
        """
        L{rpc.Status} lists only the entries every filter admits.
        """
        [c] = self.successResultOf(self.spool.enqueue(  # type: ignore[attr-defined]
            [make_envelope("three", recipients=("z@other.example",))]
        ))
        entries, _ = self.listed(recipient="@other.example")
        self.assertEqual([e["id"] for e in entries], [c.id])  # type: ignore[attr-defined]
        entries, _ = self.listed(recipient="@other.example", sender="nobody@example.org")
        self.assertEqual(entries, [])  # type: ignore[attr-defined]
        self.fails(rpc.Status, rpc.BadArgument, recipient="no-at-sign")
        self.fails(rpc.Status, rpc.BadArgument, via="host:notaport")

    def test_status_large_entry(self) -> None:
        """
        An entry whose JSON is larger than AMP's 64 KiB value limit is
        listed whole.
        """
        recipients = tuple(f"recipient{i:05}@example.com" for i in range(3000))
        [big] = self.successResultOf(  # type: ignore[attr-defined]
            self.spool.enqueue([make_envelope("big", recipients=recipients)])
        )
        entries, _ = self.listed(recipient="recipient02999@example.com")
        self.assertEqual([len(e["recipients"]) for e in entries], [3000])  # type: ignore[attr-defined]
        self.assertGreater(len(json.dumps(entries[0])), 65535)  # type: ignore[attr-defined]

    def test_count(self) -> None:
        """
        L{rpc.Count} counts every queue, or one, and with filters only the
        entries they admit.
        """
        self.successResultOf(self.spool.quarantine([make_envelope("bad")], "spam"))  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            self.call(rpc.Count), {"active": 2, "frozen": 0, "removed": 0, "quarantine": 1}
        )
        self.assertEqual(self.counts(queue=QUARANTINE), {"quarantine": 1})  # type: ignore[attr-defined]
        self.call(rpc.Freeze, ids=[self.a.id])
        self.assertEqual(  # type: ignore[attr-defined]
            self.call(rpc.Count, sender="s@example.org"),
            {"active": 1, "frozen": 1, "removed": 0, "quarantine": 1},
        )
        self.assertEqual(  # type: ignore[attr-defined]
            self.counts(sender="@elsewhere.example", queue=ACTIVE), {"active": 0}
        )

    # -- Summary, Show -------------------------------------------------

    def test_summary(self) -> None:
        """
        L{rpc.Summary} tallies the active queue per recipient domain in age
        buckets (the top rows, the total), or per next hop.
        """
        self.clock.advance(100000)
        now = self.clock.seconds()
        self.successResultOf(self.spool.enqueue([  # type: ignore[attr-defined]
            make_envelope(new_id(now - 7 * 60), recipients=("x@b.example", "y@a.example")),
            make_envelope(new_id(now - 400 * 60), recipients=("x@b.example",)),
        ]))
        result = self.call(rpc.Summary, top=2)
        rows = json.loads(result["rows"])
        # one-0 and two-0 (ids that carry no time) were created 100000 s ago
        self.assertEqual(rows, [["b.example", [0, 1, 0, 0, 0, 0, 0, 1]],  # type: ignore[attr-defined]
                                ["example.com", [0, 0, 0, 0, 0, 0, 0, 2]]])
        self.assertEqual(json.loads(result["total"]), [0, 1, 0, 0, 0, 0, 0, 3])  # type: ignore[attr-defined]
        self.assertEqual((result["entries"], result["groups"]), (4, 3))  # type: ignore[attr-defined]
        by_hop = self.call(rpc.Summary, by="next-hop")
        self.assertEqual(json.loads(by_hop["rows"]),  # type: ignore[attr-defined]
                         [["mx.example.net:25", [0, 1, 0, 0, 0, 0, 0, 3]]])
        self.fails(rpc.Summary, rpc.BadArgument, by="color")

    def test_show(self) -> None:
        """
        L{rpc.Show} answers the entry and its message's header section;
        L{rpc.ShowMessage} sends the whole message in chunks.
        """
        result = self.call(rpc.Show, id=self.a.id)
        self.assertEqual(json.loads(result["entry"])["id"], self.a.id)  # type: ignore[attr-defined]
        self.assertEqual(result["headers"], b"Subject: hello\r\nFrom: s@example.org\r\n\r\n")  # type: ignore[attr-defined]
        self.assertEqual(result["smarthost"], "smart.example:2525")  # type: ignore[attr-defined]
        del self.pages[:]
        self.assertEqual(self.call(rpc.ShowMessage, id=self.a.id), {"size": len(DATA)})  # type: ignore[attr-defined]
        self.assertEqual(b"".join(p["data"] for p in self.pages), DATA)  # type: ignore[attr-defined]
        self.fails(rpc.Show, rpc.UnknownEntry, id="nosuch")
        self.fails(rpc.ShowMessage, rpc.UnknownEntry, id="nosuch")

    def test_show_large_message(self) -> None:
        """
        A message of several chunks comes whole, in order, a chunk a page;
        its headers alone stay its header section.
        """
        body = b"".join(b"line %06d of a long message\r\n" % i for i in range(40000))
        data = b"Subject: big\r\n\r\n" + body
        [big] = self.successResultOf(self.spool.enqueue(  # type: ignore[attr-defined]
            [make_envelope("big", message=Message.from_bytes(data))]
        ))
        del self.pages[:]
        self.assertEqual(self.call(rpc.ShowMessage, id=big.id), {"size": len(data)})  # type: ignore[attr-defined]
        self.assertGreater(len(self.pages), 2)  # type: ignore[attr-defined]
        self.assertEqual(b"".join(p["data"] for p in self.pages), data)  # type: ignore[attr-defined]
        self.assertEqual(self.call(rpc.Show, id=big.id)["headers"], b"Subject: big\r\n\r\n")  # type: ignore[attr-defined]

    # -- Freeze, SendFrozen --------------------------------------------

    def test_freeze(self) -> None:
        """
        L{rpc.Freeze} moves active entries to the frozen queue and has the
        scheduler forget their next attempts.
        """
        self.assertEqual(self.call(rpc.Freeze, ids=[self.a.id])["done"], [self.a.id])  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(self.a.id), FROZEN)  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(self.b.id), ACTIVE)  # type: ignore[attr-defined]
        self.assertEqual(self.scheduler.unscheduled, [self.a.id])  # type: ignore[attr-defined]

    def test_unknown_id(self) -> None:
        """
        An unknown id is an L{rpc.UnknownEntry} naming it, and nothing is
        done to the known ones.
        """
        message = self.fails(rpc.Freeze, rpc.UnknownEntry, ids=[self.a.id, "nosuch"])
        self.assertIn("nosuch", message)  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(self.a.id), ACTIVE)  # type: ignore[attr-defined]

    def test_unknown_id_every_command(self) -> None:
        """
        Every command that takes ids answers L{rpc.UnknownEntry} for an
        unknown one.
        """
        cases: list[tuple[type[amp.Command], dict[str, Any]]] = [
            (rpc.Freeze, {}),
            (rpc.SendFrozen, {"all": False, "frozen": False}),
            (rpc.SendNow, {}),
            (rpc.Remove, {}),
            (rpc.Recover, {"source": REMOVED}),
        ]
        for command, kw in cases:
            message = self.fails(command, rpc.UnknownEntry, ids=["nosuch"], **kw)
            self.assertIn("nosuch", message)  # type: ignore[attr-defined]

    def test_send_frozen_ids(self) -> None:
        """
        L{rpc.SendFrozen} with ids makes them due now, unfreezing frozen
        ones, and tells the scheduler.
        """
        self.call(rpc.Freeze, ids=[self.a.id])
        done = self.call(rpc.SendFrozen, ids=[self.a.id], all=False, frozen=False)["done"]
        self.assertEqual(done, [self.a.id])  # type: ignore[attr-defined]
        entry = self.successResultOf(self.spool.get(self.a.id))  # type: ignore[attr-defined]
        self.assertEqual(entry.queue, ACTIVE)  # type: ignore[attr-defined]
        self.assertEqual(entry.next_attempt_at, 1000)  # type: ignore[attr-defined]
        self.assertIsNone(entry.reason)  # type: ignore[attr-defined]
        self.assertEqual([e.id for e in self.scheduler.notified], [self.a.id])  # type: ignore[attr-defined]
        self.assertEqual(self.scheduler.notified[0].queue, ACTIVE)  # type: ignore[attr-defined]

    def test_send_frozen_only(self) -> None:
        """
        L{rpc.SendFrozen} with C{frozen} sends only the frozen entries, with
        new retry intervals when given.
        """
        self.call(rpc.Freeze, ids=[self.b.id])
        result = self.call(
            rpc.SendFrozen, ids=[], all=False, frozen=True, retry_intervals=[5.0, 7.5]
        )
        self.assertEqual(result, {"done": [], "matched": 1, "changed": 1, "settled": 0})  # type: ignore[attr-defined]
        entry = self.entry(self.b.id)
        self.assertEqual((entry.queue, entry.schedule, entry.step), (ACTIVE, (5.0, 7.5), 0))  # type: ignore[attr-defined]
        untouched = self.entry(self.a.id)
        self.assertEqual(untouched.schedule, (60, 300.5))  # type: ignore[attr-defined]

    def test_send_all(self) -> None:
        """
        L{rpc.SendFrozen} with C{all} looks at every active and frozen
        entry: the frozen one goes back, the active one already due is
        matched but not changed.
        """
        self.call(rpc.Freeze, ids=[self.b.id])
        result = self.call(rpc.SendFrozen, ids=[], all=True, frozen=False)
        self.assertEqual((result["matched"], result["changed"]), (2, 1))  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(self.b.id), ACTIVE)  # type: ignore[attr-defined]
        self.assertEqual([e.id for e in self.scheduler.notified], [self.b.id])  # type: ignore[attr-defined]

    def test_action_needs_a_selection(self) -> None:
        """
        An action given no ids, no C{all} and no filter does nothing and
        is an L{rpc.BadArgument}; so are ids with C{all}, and a queue the
        action cannot act on.
        """
        self.fails(rpc.Freeze, rpc.BadArgument, ids=[])
        self.fails(rpc.Remove, rpc.BadArgument, ids=[])
        self.fails(rpc.SendNow, rpc.BadArgument, ids=[])
        self.fails(rpc.Freeze, rpc.BadArgument, ids=[self.a.id], all=True)
        self.fails(rpc.Freeze, rpc.BadArgument, ids=[], queue=REMOVED)
        self.fails(rpc.Freeze, rpc.BadArgument, ids=[], younger=-1.0)
        self.assertEqual((self.queue_of(self.a.id), self.queue_of(self.b.id)), (ACTIVE, ACTIVE))  # type: ignore[attr-defined]

    def test_freeze_by_filter(self) -> None:
        """
        L{rpc.Freeze} with a filter freezes the active entries it admits,
        and answers how many matched and changed (not their ids).
        """
        [c] = self.successResultOf(self.spool.enqueue(  # type: ignore[attr-defined]
            [make_envelope("three", recipients=("z@other.example",))]
        ))
        result = self.call(rpc.Freeze, ids=[], recipient="@example.com")
        self.assertEqual(result, {"done": [], "matched": 2, "changed": 2, "settled": 0})  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            [self.queue_of(i) for i in (self.a.id, self.b.id, c.id)], [FROZEN, FROZEN, ACTIVE]
        )
        self.assertEqual(sorted(self.scheduler.unscheduled), sorted([self.a.id, self.b.id]))  # type: ignore[attr-defined]
        frozen = self.entry(self.a.id)
        self.assertEqual((frozen.reason, frozen.moved_at), ("frozen by operator", 1000.0))  # type: ignore[attr-defined]
        # again: nothing active matches any more
        result = self.call(rpc.Freeze, ids=[], recipient="@example.com")
        self.assertEqual((result["matched"], result["changed"]), (0, 0))  # type: ignore[attr-defined]

    def test_freeze_ids_and_filter(self) -> None:
        """
        Ids and filters together: only the named entries the filters admit
        are changed; the ids changed are answered.
        """
        result = self.call(rpc.Freeze, ids=[self.a.id, self.b.id], sender="other@example.org")
        self.assertEqual(result, {"done": [], "matched": 0, "changed": 0, "settled": 0})  # type: ignore[attr-defined]
        result = self.call(rpc.Freeze, ids=[self.a.id], sender="S@Example.org")
        self.assertEqual(result, {"done": [self.a.id], "matched": 1, "changed": 1, "settled": 0})  # type: ignore[attr-defined]

    def test_remove_by_queue(self) -> None:
        """
        L{rpc.Remove} with C{all} takes the active and frozen entries (not
        the quarantine); C{queue} quarantine takes the quarantined ones.
        """
        [q] = self.successResultOf(self.spool.quarantine([make_envelope("bad")], "spam"))  # type: ignore[attr-defined]
        self.call(rpc.Freeze, ids=[self.b.id])
        result = self.call(rpc.Remove, ids=[], all=True)
        self.assertEqual((result["matched"], result["changed"]), (2, 2))  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(q.id), QUARANTINE)  # type: ignore[attr-defined]
        self.assertEqual(self.entry(self.a.id).moved_at, 1000.0)  # type: ignore[attr-defined]
        result = self.call(rpc.Remove, ids=[], queue=QUARANTINE)
        self.assertEqual((result["matched"], result["changed"]), (1, 1))  # type: ignore[attr-defined]
        self.assertEqual(self.counts(), {"active": 0, "frozen": 0, "removed": 3, "quarantine": 0})  # type: ignore[attr-defined]

    def test_age_filters(self) -> None:
        """
        C{younger} and C{older} measure from the relay's clock, by the time
        an id carries (entries whose ids carry none, by their creation).
        """
        self.clock.advance(3600)
        now = self.clock.seconds()
        [old, young] = self.successResultOf(self.spool.enqueue([  # type: ignore[attr-defined]
            make_envelope(new_id(now - 3000)), make_envelope(new_id(now - 60)),
        ]))
        result = self.call(rpc.Freeze, ids=[], older=1800.0, younger=3500.0)
        self.assertEqual(result["changed"], 1)  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(old.id), FROZEN)  # type: ignore[attr-defined]
        # one-0 and two-0 were created at 1000: an hour old
        self.assertEqual(self.counts(older=3600.0, queue=ACTIVE), {"active": 2})  # type: ignore[attr-defined]
        self.assertEqual(self.counts(younger=120.0, queue=ACTIVE), {"active": 1})  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(young.id), ACTIVE)  # type: ignore[attr-defined]

    def settle(self, entry: SpoolEntry, failed: tuple[str, ...], delivered: tuple[str, ...] = ()) -> SpoolEntry:
        """
        Make C{entry} settled (its recipients failed or delivered, the
        failures reported) and frozen, as the scheduler leaves it.
        """
        settled = dataclasses.replace(
            entry,
            recipients=(),
            failed_recipients=tuple((r, "550 5.1.1 no such user") for r in failed),
            reported=failed,
            delivered_recipients=delivered,
        )
        self.successResultOf(self.spool.update(settled))  # type: ignore[attr-defined]
        return self.successResultOf(self.spool.move(entry.id, FROZEN))  # type: ignore[attr-defined, no-any-return]

    def test_send_settled(self) -> None:
        """
        C{send} of a settled entry changes nothing (it is counted as
        settled); with C{retry_failed} its failed recipients are pending
        again and no longer reported, and it is due now.
        """
        self.settle(self.a, ("a@example.com",))
        result = self.call(rpc.SendFrozen, ids=[self.a.id], all=False, frozen=False)
        self.assertEqual(result, {"done": [], "matched": 1, "changed": 0, "settled": 1})  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(self.a.id), FROZEN)  # type: ignore[attr-defined]
        result = self.call(rpc.SendFrozen, ids=[], all=False, frozen=True)
        self.assertEqual((result["changed"], result["settled"]), (0, 1))  # type: ignore[attr-defined]
        result = self.call(
            rpc.SendFrozen, ids=[self.a.id], all=False, frozen=False, retry_failed=True
        )
        self.assertEqual(result, {"done": [self.a.id], "matched": 1, "changed": 1, "settled": 0})  # type: ignore[attr-defined]
        entry = self.entry(self.a.id)
        self.assertEqual(  # type: ignore[attr-defined]
            (entry.queue, [str(r) for r in entry.recipients], entry.failed_recipients,
             entry.reported, entry.next_attempt_at),
            (ACTIVE, ["a@example.com"], (), (), 1000.0),
        )  # fmt: skip

    def test_send_now_settled(self) -> None:
        """
        C{send-now} leaves a settled entry alone unless C{retry_failed}; a
        pending one is tried now.
        """
        self.settle(self.a, ("a@example.com",))
        result = self.call(rpc.SendNow, ids=[], all=True)
        self.assertEqual((result["matched"], result["changed"], result["settled"]), (2, 1, 1))  # type: ignore[attr-defined]
        self.assertEqual(self.scheduler.sent_now, [self.b.id])  # type: ignore[attr-defined]
        result = self.call(rpc.SendNow, ids=[self.a.id], retry_failed=True)
        self.assertEqual(result["done"], [self.a.id])  # type: ignore[attr-defined]
        self.assertEqual(self.scheduler.sent_now, [self.b.id, self.a.id])  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(self.a.id), ACTIVE)  # type: ignore[attr-defined]

    def test_retry_failed_keeps_delivered(self) -> None:
        """
        C{retry_failed} puts back the failed recipients only: the delivered
        ones stay delivered.
        """
        [c] = self.successResultOf(self.spool.enqueue(  # type: ignore[attr-defined]
            [make_envelope("three", recipients=("x@example.com", "y@example.com"))]
        ))
        self.settle(c, ("y@example.com",), delivered=("x@example.com",))
        self.call(rpc.SendFrozen, ids=[c.id], all=False, frozen=False, retry_failed=True)
        entry = self.entry(c.id)
        self.assertEqual(  # type: ignore[attr-defined]
            ([str(r) for r in entry.recipients], entry.delivered_recipients),
            (["y@example.com"], ("x@example.com",)),
        )

    def test_send_reroute(self) -> None:
        """
        C{send} with C{next_hop} sets the entries' only next hop and makes
        them due now; a bad hop is an L{rpc.BadArgument}.
        """
        later = dataclasses.replace(self.entry(self.a.id), next_attempt_at=5000.0)
        self.successResultOf(self.spool.update(later))  # type: ignore[attr-defined]
        result = self.call(
            rpc.SendFrozen, ids=[], all=False, frozen=False, via="MX.example.net", next_hop="new.example:2525"
        )
        self.assertEqual((result["matched"], result["changed"]), (2, 2))  # type: ignore[attr-defined]
        for entry_id in (self.a.id, self.b.id):
            entry = self.entry(entry_id)
            self.assertEqual(  # type: ignore[attr-defined]
                (entry.next_hop_choices, entry.next_attempt_at), (("new.example:2525",), 1000.0)
            )
        # again: they are already there
        result = self.call(rpc.SendFrozen, ids=[], all=True, frozen=False, next_hop="new.example:2525")
        self.assertEqual((result["matched"], result["changed"]), (2, 0))  # type: ignore[attr-defined]
        self.fails(rpc.SendFrozen, rpc.BadArgument, ids=[], all=True, frozen=False, next_hop="x:y")

    def test_next_hop_filter_default_route(self) -> None:
        """
        An entry on the default route matches the relay's smarthost, and
        C{default}; one with its own hops matches them.
        """
        [c] = self.successResultOf(self.spool.enqueue([  # type: ignore[attr-defined]
            dataclasses.replace(make_envelope("three"), next_hop_choices=())
        ]))
        self.assertEqual(self.counts(via="smart.example:2525", queue=ACTIVE), {"active": 1})  # type: ignore[attr-defined]
        self.assertEqual(self.counts(via="default", queue=ACTIVE), {"active": 1})  # type: ignore[attr-defined]
        self.assertEqual(self.counts(via="mx.example.net", queue=ACTIVE), {"active": 2})  # type: ignore[attr-defined]
        entries, _ = self.listed(via="smart.example:2525")
        self.assertEqual([e["id"] for e in entries], [c.id])  # type: ignore[attr-defined]

    # -- SendNow -------------------------------------------------------

    def test_send_now(self) -> None:
        """
        L{rpc.SendNow} asks the scheduler to deliver the entries at once.
        """
        self.assertEqual(self.call(rpc.SendNow, ids=[self.b.id])["done"], [self.b.id])  # type: ignore[attr-defined]
        self.assertEqual(self.scheduler.sent_now, [self.b.id])  # type: ignore[attr-defined]

    def test_send_now_no_scheduler(self) -> None:
        """
        Without a scheduler, L{rpc.SendNow} and L{rpc.SetMaxSendJobs} are
        L{rpc.BadArgument}s.
        """
        self.connect(None, [])
        self.fails(rpc.SendNow, rpc.BadArgument, ids=[self.a.id])
        self.fails(rpc.SetMaxSendJobs, rpc.BadArgument, n=3)

    # -- Remove, Recover -----------------------------------------------

    def test_remove_and_recover(self) -> None:
        """
        L{rpc.Remove} moves entries to the removed queue, keeping them;
        L{rpc.Recover} brings them back frozen.
        """
        self.assertEqual(self.call(rpc.Remove, ids=[self.a.id])["done"], [self.a.id])  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(self.a.id), REMOVED)  # type: ignore[attr-defined]
        self.assertEqual(self.call(rpc.Count)["removed"], 1)  # type: ignore[attr-defined]
        done = self.call(rpc.Recover, ids=[self.a.id], source=REMOVED)["done"]
        self.assertEqual(done, [self.a.id])  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(self.a.id), FROZEN)  # type: ignore[attr-defined]

    def test_recover_quarantine(self) -> None:
        """
        L{rpc.Recover} from the quarantine brings entries back frozen.
        """
        [q] = self.successResultOf(self.spool.quarantine([make_envelope("bad")], "spam"))  # type: ignore[attr-defined]
        self.assertEqual(self.call(rpc.Recover, ids=[q.id], source=QUARANTINE)["done"], [q.id])  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(q.id), FROZEN)  # type: ignore[attr-defined]

    def test_recover_wrong_queue(self) -> None:
        """
        Recovering an entry that is not in the source queue is an
        L{rpc.UnknownEntry}; an unknown source is an L{rpc.BadArgument}.
        """
        message = self.fails(rpc.Recover, rpc.UnknownEntry, ids=[self.a.id], source=REMOVED)
        self.assertIn(self.a.id, message)  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(self.a.id), ACTIVE)  # type: ignore[attr-defined]
        self.fails(rpc.Recover, rpc.BadArgument, ids=[self.a.id], source="active")

    # -- SetMaxSendJobs ------------------------------------------------

    def test_set_max_send_jobs(self) -> None:
        """
        L{rpc.SetMaxSendJobs} changes the limit and answers the previous
        one; less than 1 is an L{rpc.BadArgument}.
        """
        self.assertEqual(self.call(rpc.SetMaxSendJobs, n=3), {"previous": 10})  # type: ignore[attr-defined]
        self.assertEqual(self.scheduler.max_send_jobs, 3)  # type: ignore[attr-defined]
        self.fails(rpc.SetMaxSendJobs, rpc.BadArgument, n=0)
        self.assertEqual(self.scheduler.max_send_jobs, 3)  # type: ignore[attr-defined]

    # -- plugin RPCs ---------------------------------------------------

    def test_plugin_rpc(self) -> None:
        """
        The plugin's own commands are served beside relay's.
        """
        self.assertEqual(self.call(Echo, text="hi"), {"echoed": "HI"})  # type: ignore[attr-defined]

    def test_unknown_command(self) -> None:
        """
        A command nobody serves fails cleanly on the client.
        """
        self.connect(self.scheduler, [])
        self.fails(Echo, amp.UnhandledCommand, text="hi")


class MemorySpoolControlTests(ControlMixin, SynchronousTestCase):
    """
    The control commands over a L{MemorySpool}.
    """

    def make_spool(self) -> Any:
        return MemorySpool(self.clock)


class DiskSpoolControlTests(ControlMixin, SynchronousTestCase):
    """
    The control commands over a L{DiskSpool}.
    """

    def make_spool(self) -> Any:
        root = self.mktemp()
        return DiskSpool(os.path.join(root, "spool"), synchronous, self.clock,
                         quarantine_path=os.path.join(root, "quarantine"))


class FactoryTests(SynchronousTestCase):
    """
    L{ControlFactory} and L{plugin_locators}.
    """

    def test_factory(self) -> None:
        """
        The factory's protocols share one locator that serves the plugin's
        RPCs.
        """
        clock = Clock()
        spool = MemorySpool(clock)
        factory = ControlFactory(spool, None, plugin_locators(Plugin()), clock)
        p1, p2 = factory.buildProtocol(None), factory.buildProtocol(None)
        self.assertIsInstance(p1, ControlProtocol)
        self.assertIs(p1.control, p2.control)
        self.assertIsInstance(factory.locator, ControlLocator)
        self.assertIsNotNone(factory.locator.locateResponder(b"Echo"))
        self.assertIsNotNone(factory.locator.locateResponder(b"Count"))
        self.assertIsNone(factory.locator.locateResponder(b"Nothing"))

    def test_plugin_without_rpcs(self) -> None:
        """
        A plugin without C{rpcs} has no RPCs.
        """
        self.assertEqual(plugin_locators(object()), [])


class ServiceTests(SynchronousTestCase):
    """
    L{relay.service.makeService} serves the control endpoint.
    """

    def test_wired(self) -> None:
        """
        The C{control} service listens on the control endpoint, with mode
        0600 for a unix socket, over the relay's spool and scheduler, and
        serves the plugin's RPCs.
        """
        from twisted.internet.testing import MemoryReactorClock

        from relay.service import makeService

        base = os.path.abspath(self.mktemp())
        top = makeService(
            smtp=["tcp:2525:interface=127.0.0.1"],
            spool=os.path.join(base, "spool"),
            quarantine=os.path.join(base, "quarantine"),
            control="unix:" + os.path.join(base, "c.sock"),
            callbacks=Plugin(),
            hostname="relay.test",
            reactor=MemoryReactorClock(),
            run_in_thread=synchronous,
        )
        service = top.getServiceNamed("control")
        self.assertEqual(service.endpoint._mode, 0o600)  # type: ignore[attr-defined]
        locator = service.factory.locator  # type: ignore[attr-defined]
        self.assertIs(locator.spool, top.spool)  # type: ignore[attr-defined]
        self.assertIs(locator.scheduler, top.delivery)  # type: ignore[attr-defined]
        self.assertIsNotNone(locator.locateResponder(b"Echo"))

    def test_control_endpoint(self) -> None:
        """
        L{control_endpoint} adds mode 0600 to a unix endpoint that has no
        mode, keeps an explicit one, and leaves other endpoints alone.
        """
        from relay.app.endpoint import control_endpoint

        self.assertEqual(control_endpoint("unix:./c.sock"), "unix:./c.sock:mode=0600")
        self.assertEqual(control_endpoint("unix:/c.sock:mode=0660"), "unix:/c.sock:mode=0660")
        self.assertEqual(control_endpoint("tcp:1234:interface=127.0.0.1"),
                         "tcp:1234:interface=127.0.0.1")


class RecordingSpool(MemorySpool):
    """
    A L{MemorySpool} that keeps the streams it hands out, and whether
    each was closed.
    """

    def __init__(self, clock: Clock) -> None:
        MemorySpool.__init__(self, clock)
        self.streams: list[Any] = []
        self.closed: list[Any] = []

    def stream(self, queue: str, select: Any = None, parse: bool = True, page_size: int = 200) -> Any:
        stream = MemorySpool.stream(self, queue, select, parse, page_size)
        close = stream.close

        def closing() -> Any:
            self.closed.append(stream)
            return close()

        stream.close = closing  # type: ignore[method-assign]
        self.streams.append(stream)
        return stream


class HeldClient(amp.AMP):
    """
    A client that answers each page only when the test says so.
    """

    def __init__(self) -> None:
        amp.AMP.__init__(self)
        self.waiting: list[tuple[Deferred[dict[str, Any]], str]] = []

    @rpc.EntriesPage.responder
    def entries_page(
        self, stream: int, entries: str | None = None, ids: str | None = None,
        unreadable: str | None = None,
    ) -> Deferred[dict[str, Any]]:  # fmt: skip
        d: Deferred[dict[str, Any]] = Deferred()
        self.waiting.append((d, entries or ""))
        return d


class FlowControlTests(SynchronousTestCase):
    """
    A listing goes a page at a time, the next read only when the client
    answered the last (one page read ahead): the relay holds at most two
    pages, whatever the queue's length.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.spool = RecordingSpool(self.clock)
        self.made = self.successResultOf(
            self.spool.enqueue([make_envelope(f"e{i:04}") for i in range(5 * LIST_PAGE)])
        )
        self.client, self.server, self.pump = iosim.connectedServerAndClient(
            lambda: ControlProtocol(self.spool, None, (), self.clock), HeldClient
        )

    def test_waits_for_the_client(self) -> None:
        """
        The server sends the first page and reads one more, then waits; each
        answer lets one more page go; the answer comes after the last page,
        and the stream is closed.
        """
        d = self.client.callRemote(rpc.Status, stream=7)
        self.pump.flush()
        [stream] = self.spool.streams
        self.assertEqual((len(self.client.waiting), stream.pages), (1, 2))
        self.pump.flush()
        self.assertEqual((len(self.client.waiting), stream.pages), (1, 2))
        self.assertNoResult(d)
        seen = 0
        while self.client.waiting:
            answer, entries = self.client.waiting.pop(0)
            seen += len(entries.splitlines())
            answer.callback({})
            self.pump.flush()
            self.assertLessEqual(stream.pages - (seen // LIST_PAGE), 2)
        self.assertEqual(seen, len(self.made))
        self.assertEqual(self.successResultOf(d), {"entries": len(self.made), "unreadable": 0})
        self.assertEqual(self.spool.closed, [stream])

    def test_client_goes_away(self) -> None:
        """
        A client that goes away mid-listing ends it: the stream is closed,
        nothing more is read, nothing is logged as an error.
        """
        self.client.callRemote(rpc.Status).addErrback(lambda _: None)
        self.pump.flush()
        [stream] = self.spool.streams
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.spool.closed, [stream])
        self.assertEqual(stream.pages, 2)
        self.assertEqual(self.flushLoggedErrors(), [])


class ChunkedTests(SynchronousTestCase):
    """
    L{rpc.Chunked} spreads a long value over keys each under AMP's limit.
    """

    def round_trip(self, argument: rpc.Chunked, value: Any) -> tuple[dict[bytes, bytes], Any]:
        strings: dict[bytes, bytes] = {}
        argument.toBox(b"v", strings, {"v": value}, None)
        objects: dict[str, Any] = {}
        argument.fromBox(b"v", dict(strings), objects, None)
        return strings, objects["v"]

    def test_long_text(self) -> None:
        """
        Text of 200 KB (multi-byte characters split across keys) comes back
        whole; every key holds at most L{rpc.CHUNK} bytes.
        """
        text = "é" * 100_000 + "end"
        strings, back = self.round_trip(rpc.Chunked(), text)
        self.assertEqual(back, text)
        self.assertEqual(sorted(strings), [b"v", b"v.1", b"v.2", b"v.3"])
        self.assertLessEqual(max(len(v) for v in strings.values()), rpc.CHUNK)

    def test_bytes_and_short(self) -> None:
        """
        Bytes stay bytes; a short value is one key; an optional one that
        is absent is C{None}.
        """
        strings, back = self.round_trip(rpc.Chunked(binary=True), b"\x00\xff")
        self.assertEqual((strings, back), ({b"v": b"\x00\xff"}, b"\x00\xff"))
        objects: dict[str, Any] = {}
        rpc.Chunked(optional=True).fromBox(b"v", {}, objects, None)
        self.assertEqual(objects, {"v": None})
        self.assertRaises(KeyError, rpc.Chunked().toBox, b"v", {}, {}, None)
