"""
Tests for the live event stream: L{relay.control.events.EventBus}, the
C{Subscribe}/C{Event} commands of L{relay.control.server.ControlProtocol} through
an in-memory AMP connection, and the line format of C{relayctl events}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from relay.control import rpc
from relay.control.events import EventBus, format_event
from relay.control.server import ControlProtocol
from relay.delivery.scheduler import DeliveryScheduler, SchedulerObserver
from relay.spool.observed import ObservedSpool
from relay.testing import MemorySpool
from tests.test_delivery import DeliveryError, FakeClient, make_envelope, no_dns


class Follower(amp.AMP):
    """
    A client recording the events it is sent.
    """

    def __init__(self) -> None:
        amp.AMP.__init__(self)
        self.events: list[dict[str, Any]] = []

    @rpc.Event.responder
    def event(
        self, kind: str, at: float, seq: int, fields: str, entry_id: str | None = None
    ) -> dict[str, Any]:
        self.events.append(
            {"kind": kind, "id": entry_id, "at": at, "seq": seq, "fields": json.loads(fields)}
        )
        return {}


class EventBusTests(SynchronousTestCase):
    """
    L{EventBus} on its own.
    """

    def test_emit_stamps_and_keeps(self) -> None:
        """
        Events get the clock's time and increasing sequence numbers; only
        the last 100 are kept; an unsubscribed callable hears no more.
        """
        clock = Clock()
        clock.advance(5)
        bus = EventBus(clock)
        heard: list[Any] = []
        unsubscribe = bus.subscribe(heard.append)
        bus.emit("spooled", "a", size=3)
        unsubscribe()
        for i in range(120):
            bus.emit("delivered", str(i))
        self.assertEqual(
            [(e.kind, e.entry_id, e.at, e.seq) for e in heard], [("spooled", "a", 5.0, 1)]
        )
        self.assertEqual(heard[0].fields, {"size": 3})
        self.assertEqual(len(bus.recent), 100)
        self.assertEqual(bus.recent[-1].seq, 121)

    def test_unknown_kind(self) -> None:
        """
        An unknown kind is a programming error.
        """
        self.assertRaises(ValueError, EventBus(Clock()).emit, "exploded", None)


class StreamTests(SynchronousTestCase):
    """
    The event stream over AMP, with a real scheduler on a memory spool.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.spool = MemorySpool(self.clock)
        self.client = FakeClient()
        self.client.behaviour["mx1:25"] = DeliveryError(None, False)
        self.scheduler = DeliveryScheduler(
            spool=self.spool,
            client=self.client,
            clock=self.clock,
            route=no_dns,
            hostname="relay.test",
        )
        self.scheduler.startService()
        self.addCleanup(lambda: self.scheduler.stopService() if self.scheduler.running else None)

        def server() -> ControlProtocol:
            return ControlProtocol(self.spool, self.scheduler, (), self.clock)

        self.follower, self.server, self.pump = iosim.connectedServerAndClient(server, Follower)

    def call(self, command: type[amp.Command], **kw: Any) -> Any:
        d = self.follower.callRemote(command, **kw)
        self.pump.flush()
        return self.successResultOf(d)

    def test_events_in_order(self) -> None:
        """
        A subscribed client hears spooled, deferred, frozen, unfrozen,
        removed and recovered for one entry, in that order, with
        increasing sequence numbers.
        """
        self.call(rpc.Subscribe)
        [entry] = self.successResultOf(
            ObservedSpool(self.spool, SchedulerObserver(self.scheduler)).enqueue([make_envelope()])
        )
        self.clock.advance(0)
        self.call(rpc.Freeze, ids=[entry.id])
        self.call(rpc.SendFrozen, ids=[entry.id], all=False, frozen=False)
        self.call(rpc.Remove, ids=[entry.id])
        self.call(rpc.Recover, ids=[entry.id], source="removed")
        self.pump.flush()
        events = self.follower.events
        self.assertEqual(
            [e["kind"] for e in events],
            ["spooled", "deferred", "frozen", "unfrozen", "removed", "recovered"],
        )
        self.assertEqual({e["id"] for e in events}, {entry.id})
        seqs = [e["seq"] for e in events]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(events[0]["at"], 1000.0)
        self.assertEqual(events[1]["fields"]["until"], 1060.0)

    def test_heartbeat(self) -> None:
        """
        A subscribed client gets a heartbeat every 30 seconds, and an
        unsubscribed one none.
        """
        self.clock.advance(30)
        self.pump.flush()
        self.assertEqual(self.follower.events, [])
        self.call(rpc.Subscribe)
        self.clock.advance(29)
        self.pump.flush()
        self.assertEqual(self.follower.events, [])
        self.clock.advance(1)
        self.pump.flush()
        self.assertEqual(
            [(e["kind"], e["id"]) for e in self.follower.events], [("heartbeat", None)]
        )
        self.clock.advance(30)
        self.pump.flush()
        self.assertEqual(len(self.follower.events), 2)

    def test_unsubscribe_on_disconnect(self) -> None:
        """
        When the connection closes the server unsubscribes it and stops
        its heartbeat.
        """
        def heartbeats() -> list[object]:
            return [c for c in self.clock.getDelayedCalls() if "_beat" in repr(c.func)]

        self.call(rpc.Subscribe)
        self.assertEqual(len(self.scheduler.events._subscribers), 1)
        self.assertEqual(len(heartbeats()), 1)
        self.follower.transport.loseConnection()  # type: ignore[union-attr]
        self.pump.flush()
        self.assertEqual(self.scheduler.events._subscribers, [])
        # The scheduler's own calls (its scans) stay; the heartbeat went.
        self.assertEqual(heartbeats(), [])
        self.scheduler.events.emit("delivered", "x")


class FormatTests(SynchronousTestCase):
    """
    The line C{relayctl events} prints for each event.
    """

    def test_line(self) -> None:
        """
        ISO time (UTC), kind, id, then the fields as sorted key=value.
        """
        self.assertEqual(
            format_event("deferred", "abc", 0.0, json.dumps({"until": 60.0, "error": "451"})),
            "1970-01-01T00:00:00+00:00 deferred abc error=451 until=60.0",
        )

    def test_no_id(self) -> None:
        """
        An event without an entry shows C{-} in its place.
        """
        self.assertEqual(
            format_event("heartbeat", None, 86400.0, "{}"),
            "1970-01-02T00:00:00+00:00 heartbeat -",
        )
