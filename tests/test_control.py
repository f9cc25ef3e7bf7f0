"""
Tests for L{relay.control.server}: every command of L{relay.control.rpc} through an
in-memory AMP connection (L{twisted.test.iosim}), against a L{MemorySpool}
and a L{DiskSpool}, with a fake delivery scheduler.
"""

from __future__ import annotations

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
from relay.control.server import ControlFactory, ControlLocator, ControlProtocol, plugin_locators
from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, REMOVED, SpoolEntry
from relay.spool.disk import DiskSpool
from relay.testing import MemorySpool
from tests.test_spool import make_envelope


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
        def server() -> ControlProtocol:
            return ControlProtocol(self.spool, scheduler, locators, self.clock)

        self.client, self.server, self.pump = iosim.connectedServerAndClient(server, amp.AMP)

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

    # -- Status, Count ------------------------------------------------

    def test_status(self) -> None:
        """
        L{rpc.Status} answers the active queue by default, as JSON entries
        with their queue.
        """
        entries = json.loads(self.call(rpc.Status)["entries"])
        self.assertEqual(sorted(e["id"] for e in entries), sorted([self.a.id, self.b.id]))  # type: ignore[attr-defined]
        for e in entries:
            self.assertEqual(e["queue"], ACTIVE)  # type: ignore[attr-defined]
            self.assertEqual(e["recipients"], ["a@example.com"])  # type: ignore[attr-defined]

    def test_status_queue(self) -> None:
        """
        L{rpc.Status} with a queue lists that queue, quarantine reasons
        included.
        """
        [q] = self.successResultOf(  # type: ignore[attr-defined]
            self.spool.quarantine([make_envelope("bad")], "virus found")
        )
        entries = json.loads(self.call(rpc.Status, queue=QUARANTINE)["entries"])
        self.assertEqual([(e["id"], e["queue"], e["reason"]) for e in entries],  # type: ignore[attr-defined]
                         [(q.id, QUARANTINE, "virus found")])
        self.assertEqual(json.loads(self.call(rpc.Status, queue=FROZEN)["entries"]), [])  # type: ignore[attr-defined]

    def test_status_bad_queue(self) -> None:
        """
        An unknown queue is a L{rpc.BadArgument}.
        """
        message = self.fails(rpc.Status, rpc.BadArgument, queue="nowhere")
        self.assertIn("nowhere", message)  # type: ignore[attr-defined]

    def test_count(self) -> None:
        """
        L{rpc.Count} counts every queue.
        """
        self.successResultOf(self.spool.quarantine([make_envelope("bad")], "spam"))  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            self.call(rpc.Count), {"active": 2, "frozen": 0, "removed": 0, "quarantine": 1}
        )

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
        done = self.call(
            rpc.SendFrozen, ids=[], all=False, frozen=True, retry_intervals=[5.0, 7.5]
        )["done"]
        self.assertEqual(done, [self.b.id])  # type: ignore[attr-defined]
        entry = self.successResultOf(self.spool.get(self.b.id))  # type: ignore[attr-defined]
        self.assertEqual((entry.queue, entry.schedule, entry.step), (ACTIVE, (5.0, 7.5), 0))  # type: ignore[attr-defined]
        untouched = self.successResultOf(self.spool.get(self.a.id))  # type: ignore[attr-defined]
        self.assertEqual(untouched.schedule, (60, 300.5))  # type: ignore[attr-defined]

    def test_send_all(self) -> None:
        """
        L{rpc.SendFrozen} with C{all} sends every active and frozen entry.
        """
        self.call(rpc.Freeze, ids=[self.b.id])
        done = self.call(rpc.SendFrozen, ids=[], all=True, frozen=False)["done"]
        self.assertEqual(sorted(done), sorted([self.a.id, self.b.id]))  # type: ignore[attr-defined]
        self.assertEqual(self.queue_of(self.b.id), ACTIVE)  # type: ignore[attr-defined]
        self.assertEqual(len(self.scheduler.notified), 2)  # type: ignore[attr-defined]

    def test_send_frozen_bad_arguments(self) -> None:
        """
        Nothing to send, ids with C{all}, or negative retry intervals are
        L{rpc.BadArgument}s.
        """
        self.fails(rpc.SendFrozen, rpc.BadArgument, ids=[], all=False, frozen=False)
        self.fails(rpc.SendFrozen, rpc.BadArgument, ids=[self.a.id], all=True, frozen=False)
        self.fails(
            rpc.SendFrozen, rpc.BadArgument, ids=[self.a.id], all=False, frozen=False,
            retry_intervals=[-1.0],
        )

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
