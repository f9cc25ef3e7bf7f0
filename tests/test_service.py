"""
Tests for L{relay.service.makeService}, with stand-ins for the SMTP server
factory and the disk spool so that only the service tree is under test.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from relay import service as relay_service
from relay.app.channel import CHANNEL_FD, encode_message
from relay.delivery.scheduler import DeliveryScheduler
from relay.simple import Simple
from relay.tap import Options
from relay.tap import makeService as tapMakeService
from tests.test_receivers import FakeProcessTransport


class FakeFactory(Factory):
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeSpoolLocked(Exception):
    pass


class FakeDiskSpool:
    held: set[str] = set()

    def __init__(self, path: str, run_in_thread: Any, clock: Any, quarantine_path: Any = None):
        self.path = path
        self.run_in_thread = run_in_thread
        self.clock = clock
        self.quarantine_path = quarantine_path
        self.calls: list[str] = []

    def lock(self) -> None:
        self.calls.append("lock")
        if self.path in self.held:
            raise FakeSpoolLocked(f"spool {self.path} is locked by another relay")
        self.held.add(self.path)

    def unlock(self) -> None:
        self.calls.append("unlock")
        self.held.discard(self.path)

    def recover(self) -> Any:
        self.calls.append("recover")
        return succeed(None)

    def lock_fileno(self) -> int | None:
        return None

    def remember(self, entry: Any, message: Any) -> None:
        self.calls.append("remember")


class Policy(Simple):
    configured: Any = None

    def configure(self, defaults: Any) -> None:
        super().configure(defaults)
        self.configured = defaults


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        server = types.ModuleType("relay.smtp.server")
        server.SMTPServerFactory = FakeFactory  # type: ignore[attr-defined]
        spool = types.ModuleType("relay.spool.disk")
        spool.DiskSpool = FakeDiskSpool  # type: ignore[attr-defined]
        for name, module in (("relay.smtp.server", server), ("relay.spool.disk", spool)):
            self.addCleanup(self._restore, name, sys.modules.get(name))
            sys.modules[name] = module
        self.reactor = MemoryReactorClock()
        self.base = os.path.abspath(self.mktemp())

    def _restore(self, name: str, module: Any) -> None:
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module

    def make(self, **kwargs: Any) -> MultiService:
        kwargs.setdefault("spool", os.path.join(self.base, "spool"))
        kwargs.setdefault("quarantine", os.path.join(self.base, "quarantine"))
        kwargs.setdefault("hostname", "relay.test")
        return relay_service.makeService(reactor=self.reactor, **kwargs)

    def test_tree(self) -> None:
        top = self.make(smtp=["tcp:2525:interface=127.0.0.1", "tcp:2526:interface=\\:\\:1"])
        self.assertIsInstance(top, MultiService)
        names = [s.name for s in top]
        self.assertEqual(names, ["threadpool", "spool", "control", "smtp-0", "smtp-1", "reload"])
        smtp = top.getServiceNamed("smtp-0")
        self.assertIsInstance(smtp, StreamServerEndpointService)
        self.assertIs(smtp.factory, top.factory)
        kwargs = top.factory.kwargs
        self.assertIs(kwargs["spool"], top.spool)
        self.assertIs(kwargs["clock"], self.reactor)
        self.assertEqual(kwargs["hostname"], "relay.test")
        self.assertEqual(kwargs["max_message_size"], 35_000_000)
        self.assertTrue(kwargs["auth_requires_tls"])
        self.assertIsNone(kwargs["tls_context_factory"])
        self.assertEqual(top.spool.quarantine_path, os.path.join(self.base, "quarantine"))
        self.assertIs(top.spool.clock, self.reactor)

    def test_start_stop(self) -> None:
        top = self.make(smtp=["tcp:2525:interface=127.0.0.1"])
        top.privilegedStartService()
        top.startService()
        try:
            self.assertTrue(os.path.isdir(os.path.join(self.base, "spool")))
            self.assertTrue(os.path.isdir(os.path.join(self.base, "quarantine")))
            self.assertEqual(os.stat(os.path.join(self.base, "spool")).st_mode & 0o777, 0o700)
            self.assertEqual(top.spool.calls, ["lock", "recover"])
            self.assertEqual([p[0] for p in self.reactor.tcpServers], [2525])
            self.assertEqual(self.reactor.tcpServers[0][3], "127.0.0.1")
            self.assertTrue(top.getServiceNamed("threadpool").pool.started)
        finally:
            self.successResultOf(top.stopService())
        self.assertEqual(top.spool.calls, ["lock", "recover", "unlock"])
        self.assertFalse(top.getServiceNamed("threadpool").pool.started)

    def test_locked_spool_refuses(self) -> None:
        first = self.make()
        first.privilegedStartService()
        self.addCleanup(first.stopService)
        listening = len(self.reactor.tcpServers)
        second = self.make()
        with capturedLogs() as events:
            raised = self.assertRaises(SystemExit, second.privilegedStartService)
        self.assertEqual(raised.code, 1)
        self.assertEqual(len(self.reactor.tcpServers), listening)
        self.assertTrue(
            any("locked by another relay" in str(e.get("error")) for e in events), events
        )

    def test_settings(self) -> None:
        from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        top = self.make(
            callbacks=Policy,
            smarthost="mx.example.com:25",
            retry_intervals=[60, 300],
            checker=checker,
            max_recipients=3,
            max_sessions=4,
            idle_timeout=9.0,
            reject_bare_lf=True,
            auth_requires_tls=False,
        )
        plugin = top.callbacks
        self.assertIsInstance(plugin, Policy)
        self.assertEqual(plugin.configured.hostname, "relay.test")
        self.assertEqual(tuple(plugin.configured.next_hop_choices), ("mx.example.com:25",))
        self.assertEqual(tuple(plugin.configured.retry_intervals), (60, 300))
        self.assertIs(plugin.configured.checker, checker)
        self.assertIs(plugin.configured.clock, self.reactor)
        kwargs = top.factory.kwargs
        self.assertIs(kwargs["callbacks"], plugin)
        self.assertEqual(kwargs["max_recipients"], 3)
        self.assertEqual(kwargs["max_sessions"], 4)
        self.assertEqual(kwargs["idle_timeout"], 9.0)
        self.assertTrue(kwargs["reject_bare_lf"])
        self.assertFalse(kwargs["auth_requires_tls"])

    def test_callbacks_by_name_and_partial(self) -> None:
        top = self.make(callbacks=f"{__name__}.Policy")
        self.assertIsInstance(top.callbacks, Policy)

        class OnlyEnvelope:
            def process_envelope(self, log: Any, session: Any, envelope: Any) -> None:
                pass

        top = self.make(callbacks=OnlyEnvelope())
        self.assertIsInstance(top.callbacks, Simple)

    def assertOpenRelayWarning(self, endpoint: str, expected: bool, callbacks: Any = Simple) -> None:
        with capturedLogs() as events:
            self.make(smtp=[endpoint], callbacks=callbacks)
        warned = [e for e in events if e.get("open_relay")]
        self.assertEqual(bool(warned), expected, (endpoint, events))
        if warned:
            self.assertEqual(warned[0]["log_level"].name, "warn")
            self.assertEqual(warned[0]["endpoint"], endpoint)

    def test_open_relay_warning(self) -> None:
        self.assertOpenRelayWarning("tcp:2525:interface=0.0.0.0", True)
        self.assertOpenRelayWarning("tcp:2525", True)
        self.assertOpenRelayWarning("tcp6:2525", True)
        self.assertOpenRelayWarning("tcp:2525:interface=192.0.2.1", True)
        self.assertOpenRelayWarning("tcp:2525:interface=127.0.0.1", False)
        self.assertOpenRelayWarning("tcp6:2525:interface=\\:\\:1", False)
        self.assertOpenRelayWarning("unix:/tmp/relay.sock", False)
        # A plugin (a subclass) makes its own decisions: no warning.
        self.assertOpenRelayWarning("tcp:2525:interface=0.0.0.0", False, callbacks=Policy)

    def test_tap_makeService(self) -> None:
        options = Options()
        options.parseOptions(
            [
                "--smtp", "tcp:2525:interface=127.0.0.1",
                "--receivers", "0",
                "--spool", os.path.join(self.base, "s"),
                "--quarantine", os.path.join(self.base, "q"),
                "--hostname", "tap.test",
                "--max-message-size", "1234",
                "--allow-auth-without-tls",
                "--auth", "memory:alice:secret",
            ]
        )  # fmt: skip
        from twisted.internet import reactor

        top = tapMakeService(options)
        self.assertTrue(IService.providedBy(top))
        self.assertEqual([s.name for s in top if s.name.startswith("smtp-")], ["smtp-0"])
        kwargs = top.factory.kwargs
        self.assertIs(kwargs["clock"], reactor)
        self.assertEqual(kwargs["hostname"], "tap.test")
        self.assertEqual(kwargs["max_message_size"], 1234)
        self.assertFalse(kwargs["auth_requires_tls"])
        self.assertIsNotNone(top.callbacks.defaults.checker)
        self.assertEqual(top.spool.path, os.path.join(self.base, "s"))

    def test_tac(self) -> None:
        """
        The example .tac file builds an application with the relay in it.
        """
        from twisted.application import service

        tac = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "relay.tac")
        namespace: dict[str, Any] = {}
        with open(tac) as f:
            code = compile(f.read(), tac, "exec")
        original = relay_service.makeService
        here = dict(
            reactor=self.reactor,
            spool=os.path.join(self.base, "spool"),
            quarantine=os.path.join(self.base, "quarantine"),
        )
        self.patch(relay_service, "makeService", lambda **kw: original(**{**kw, **here}))
        exec(code, namespace)
        services = list(service.IServiceCollection(namespace["application"]))
        self.assertEqual(len(services), 1)
        self.assertIsInstance(services[0], MultiService)


class SpawningReactor(MemoryReactorClock):
    """
    A memory reactor that records the processes it is asked to spawn
    (L{IReactorProcess}), connecting each protocol to a fake transport.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Any] = []

    def spawnProcess(self, protocol: Any, executable: str, args: Any, **kw: Any) -> Any:
        transport = FakeProcessTransport(100 + len(self.spawned))
        self.spawned.append(protocol)
        protocol.makeConnection(transport)
        return transport


class ReceiversServiceTests(SynchronousTestCase):
    """
    L{relay_service.makeService} with C{receivers}: the master's tree.
    """

    _restore = MakeServiceTests._restore
    make = MakeServiceTests.make

    def setUp(self) -> None:
        MakeServiceTests.setUp(self)  # type: ignore[arg-type]
        self.reactor = SpawningReactor()

    def test_tree(self) -> None:
        """
        The master opens no SMTP listener of its own: a receiver pool has
        the endpoints, and the settings the receivers get (max_sessions
        and their number, absolute paths, the plugin and AUTH by name).
        """
        from relay.app.pool import ReceiverPool

        top = self.make(
            smtp=["tcp:0:interface=127.0.0.1", "haproxy:tcp6:0:interface=\\:\\:1"],
            receivers=3,
            callbacks=f"{__name__}.Policy",
            auth=["memory:alice:secret"],
            max_sessions=10,
            smarthost="mx.example.com:25",
            retry_intervals=[60],
        )
        names = [s.name for s in top]
        self.assertEqual(names, ["threadpool", "spool", "receivers", "control", "reload"])
        pool = top.receivers
        self.assertIsInstance(pool, ReceiverPool)
        self.assertIsNone(top.factory)
        self.assertEqual(pool.count, 3)
        self.assertEqual([x.haproxy for x in pool.listeners], [False, True])
        settings = pool.settings
        self.assertEqual(settings.callbacks, f"{__name__}.Policy")
        self.assertEqual(settings.auth, ("memory:alice:secret",))
        # The whole limit: each receiver takes its share (AcceptGate).
        self.assertEqual((settings.max_sessions, settings.receivers), (10, 3))
        self.assertEqual(settings.hostname, "relay.test")
        self.assertEqual(settings.smarthost, "mx.example.com:25")
        self.assertEqual(settings.retry_intervals, (60,))
        self.assertEqual(settings.spool, os.path.join(self.base, "spool"))
        self.assertEqual(settings.quarantine, os.path.join(self.base, "quarantine"))
        # The master's own plugin (for its RPCs) is configured as before,
        # with a checker made from the description.
        self.assertIsInstance(top.callbacks, Policy)
        self.assertIsNotNone(top.callbacks.configured.checker)
        self.assertEqual(self.reactor.tcpServers, [])

    def test_start_stop(self) -> None:
        """
        The receivers start once the spool is recovered; the sockets are
        the master's, closed when the pool stops.
        """
        top = self.make(smtp=["tcp:0:interface=127.0.0.1"], receivers=1)
        top.privilegedStartService()
        top.startService()
        spawned = self.reactor.spawned
        try:
            self.assertEqual(top.spool.calls, ["lock", "recover"])
            # After recovery, the receiver is started; nothing listens here.
            self.assertEqual(len(spawned), 1)
            self.assertEqual(self.reactor.tcpServers, [])
            self.assertEqual(len(top.receivers.sockets), 1)
        finally:
            d = top.stopService()
            spawned[0].processEnded(Failure(ProcessDone(0)))
            self.successResultOf(d)
        self.assertEqual(top.receivers.sockets, [])

    def test_refusals(self) -> None:
        """
        What receivers cannot work with is refused when the relay is made,
        with the reason.
        """
        for kwargs, text in (
            (dict(smtp=["unix:/tmp/relay.sock"]), "only tcp:, tcp6: and haproxy:"),
            (dict(callbacks=Policy()), "dotted name"),
            (dict(checker=object()), "strcred descriptions"),
            (dict(tls_context_factory=object()), "tls_cert and tls_key"),
        ):
            with self.assertRaises(ValueError, msg=kwargs) as raised:
                self.make(receivers=2, **kwargs)
            self.assertIn(text, str(raised.exception))
        self.assertRaises(ValueError, self.make, receivers=-1)

    def test_receivers_news(self) -> None:
        """
        Entries that receivers spooled or quarantined reach the event
        stream and the scheduler like locally received ones; a restart
        makes the scheduler look at the active queue at once (for entries
        a dying receiver could not tell about).
        """
        from relay.app.build import receiver_pool
        from relay.app.services import SpoolRecovery
        from relay.app.settings import Settings
        from relay.control.events import EventBus

        class Scheduler:
            running = True

            def __init__(self) -> None:
                self.events = EventBus(Clock())
                self.notified: list[Any] = []

            def notify(self, entries: Any) -> None:
                self.notified.append([e.id for e in entries])

            def rescan(self) -> None:
                self.notified.append(["rescanned"])

            # The news the master passes on, as the real scheduler takes it.
            spooled = DeliveryScheduler.spooled
            quarantined = DeliveryScheduler.quarantined

        scheduler = Scheduler()
        disk = FakeDiskSpool(os.path.join(self.base, "spool"), None, self.reactor)
        settings = Settings(smtp=("tcp:0:interface=127.0.0.1",), receivers=1, hostname="relay.test")
        pool = receiver_pool(settings, disk, scheduler, SpoolRecovery(disk), self.reactor)
        seen: list[Any] = []
        scheduler.events.subscribe(lambda e: seen.append((e.kind, e.entry_id, e.fields)))
        a, b = Entry("a-0"), Entry("b-0")
        pool.on_spooled([a, b])
        pool.on_quarantined([Entry("q-0")], "spam")
        self.assertEqual(
            seen,
            [("spooled", "a-0", {}), ("spooled", "b-0", {}), ("quarantined", "q-0", {"reason": "spam"})],
        )
        self.assertEqual(scheduler.notified, [["a-0", "b-0"]])

        pool.on_restart()
        self.assertEqual(scheduler.notified[-1], ["rescanned"])

    def test_metrics_count_receivers(self) -> None:
        """
        With metrics, the receivers' policy rejections and open sessions
        (as they report them) are the relay's.
        """
        top = self.make(
            smtp=["tcp:0:interface=127.0.0.1"], receivers=2, metrics="tcp:0:interface=127.0.0.1"
        )
        pool = top.receivers
        pool.on_rejected()
        value = top.metrics.registry.get_sample_value("relay_messages_total", {"outcome": "rejected"})
        self.assertEqual(value, 1.0)

        top.privilegedStartService()
        top.startService()
        for process in self.reactor.spawned:
            process.childDataReceived(CHANNEL_FD, encode_message({"t": "sessions", "n": 2}))
        self.assertEqual(top.metrics.registry.get_sample_value("relay_sessions"), 4.0)
        d = top.stopService()
        for process in self.reactor.spawned:
            process.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(d)


class Entry:
    def __init__(self, entry_id: str) -> None:
        self.id = entry_id


class SpoolRecoveryTests(SynchronousTestCase):
    """
    L{SpoolRecovery}: what waits for the spool's recovery.
    """

    def test_waiters(self) -> None:
        """
        Waiting before and during the recovery fires once it is done;
        waiting afterwards fires at once.
        """
        from twisted.internet.defer import Deferred

        from relay.app.services import SpoolRecovery

        recovering: Deferred[None] = Deferred()

        class Spool:
            def recover(self) -> Deferred[None]:
                return recovering

        recovery = SpoolRecovery(Spool())
        early = recovery.wait()
        recovery.run()
        during = recovery.wait()
        self.assertNoResult(early)
        self.assertNoResult(during)
        recovering.callback(None)
        self.successResultOf(early)
        self.successResultOf(during)
        self.successResultOf(recovery.wait())

    def test_failure_logged_waiters_go_on(self) -> None:
        """
        A failed recovery is logged; what waits for it goes on (the
        scheduler loads what is there).
        """
        from twisted.internet.defer import fail

        from relay.app.services import SpoolRecovery

        class Spool:
            def recover(self) -> Any:
                return fail(OSError("disk gone"))

        recovery = SpoolRecovery(Spool())
        waiting = recovery.wait()
        with capturedLogs() as events:
            recovery.run()
        self.successResultOf(waiting)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(any("recovery failed" in str(e.get("log_format")) for e in events))
