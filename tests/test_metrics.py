"""
Tests for L{relay.control.metrics}: the Prometheus metrics of a relay.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from relay.control.events import EventBus
from relay.control.metrics import (
    MAX_SPOOL_INTERVAL,
    SPOOL_INTERVAL,
    RelayMetrics,
    metrics_resource,
    metrics_service,
    next_count_in,
)
from relay.model.entry import QueueCount
from relay.tap import Options


def lines(metrics: RelayMetrics) -> list[str]:
    """
    The non-comment lines of the registry's text exposition.
    """
    text = generate_latest(metrics.registry).decode("utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


class FakeSpool:
    """
    A spool answering fixed counts per queue, counting calls; it has no
    C{entries}, so the metrics cannot read entries.
    """

    def __init__(self, sizes: dict[str, int], oldest: dict[str, float] | None = None) -> None:
        self.sizes = sizes
        self.oldest = oldest or {}
        self.calls = 0
        self.pending: list[Deferred[QueueCount]] = []
        self.hold = False

    def count(self, queue: str) -> Deferred[QueueCount]:
        self.calls += 1
        count = QueueCount(self.sizes.get(queue, 0), self.oldest.get(queue))
        if self.hold:
            d: Deferred[QueueCount] = Deferred()
            self.pending.append(d)
            d.addCallback(lambda _: count)
            return d
        return succeed(count)


class CollectorTests(SynchronousTestCase):
    def test_outcomes_from_events(self) -> None:
        """
        Events on the bus count as outcomes; kinds without an outcome are
        ignored; rejections come from L{RelayMetrics.rejected}.
        """
        clock = Clock()
        bus = EventBus(clock)
        metrics = RelayMetrics()
        bus.subscribe(metrics.observe)
        for kind in ("spooled", "spooled", "quarantined", "deferred", "bounced", "frozen",
                     "heartbeat", "removed"):
            bus.emit(kind, "id1")
        metrics.rejected()
        out = lines(metrics)
        self.assertIn('relay_messages_total{outcome="accepted"} 2.0', out)
        self.assertIn('relay_messages_total{outcome="rejected"} 1.0', out)
        self.assertIn('relay_messages_total{outcome="quarantined"} 1.0', out)
        self.assertIn('relay_messages_total{outcome="deferred"} 1.0', out)
        self.assertIn('relay_messages_total{outcome="bounced"} 1.0', out)
        self.assertIn('relay_messages_total{outcome="frozen"} 1.0', out)
        self.assertIn('relay_messages_total{outcome="delivered"} 0.0', out)

    def test_expired_counted(self) -> None:
        """
        Each entry deleted by expiry counts under its queue.
        """
        bus = EventBus(Clock())
        metrics = RelayMetrics()
        bus.subscribe(metrics.observe)
        bus.emit("expired", "a-0", queue="frozen")
        bus.emit("expired", "b-0", queue="frozen")
        bus.emit("expired", "c-0", queue="removed")
        out = lines(metrics)
        self.assertIn('relay_spool_expired_total{queue="frozen"} 2.0', out)
        self.assertIn('relay_spool_expired_total{queue="removed"} 1.0', out)

    def test_delivery_latency(self) -> None:
        """
        A delivered event with C{created_at} observes its age in the
        latency histogram; one without it is counted but not observed.
        """
        clock = Clock()
        clock.advance(1000)
        bus = EventBus(clock)
        metrics = RelayMetrics()
        bus.subscribe(metrics.observe)
        bus.emit("delivered", "a", created_at=990.0)
        bus.emit("delivered", "b")
        out = lines(metrics)
        self.assertIn('relay_messages_total{outcome="delivered"} 2.0', out)
        self.assertIn("relay_delivery_latency_seconds_count 1.0", out)
        self.assertIn("relay_delivery_latency_seconds_sum 10.0", out)
        self.assertIn('relay_delivery_latency_seconds_bucket{le="5.0"} 0.0', out)
        self.assertIn('relay_delivery_latency_seconds_bucket{le="15.0"} 1.0', out)

    def test_sessions_and_spool(self) -> None:
        """
        C{relay_sessions} reads the callable at scrape time;
        C{relay_spool_entries} shows the last counts per queue (from
        C{ISpool.count}: no entry is read).
        """
        state = {"sessions": 3}
        metrics = RelayMetrics(sessions=lambda: state["sessions"])
        self.successResultOf(metrics.count_spool(FakeSpool({"active": 4, "frozen": 1})))
        out = lines(metrics)
        self.assertIn("relay_sessions 3.0", out)
        self.assertIn('relay_spool_entries{queue="active"} 4.0', out)
        self.assertIn('relay_spool_entries{queue="frozen"} 1.0', out)
        self.assertIn('relay_spool_entries{queue="quarantine"} 0.0', out)
        state["sessions"] = 0
        self.assertIn("relay_sessions 0.0", lines(metrics))

    def test_oldest_age(self) -> None:
        """
        C{relay_spool_oldest_age_seconds} is the age of each queue's oldest
        entry at scrape time (it grows between counts), 0 for an empty
        queue, and absent for a queue whose ids say no age.
        """
        clock = Clock()
        clock.advance(10_000)
        metrics = RelayMetrics(clock=clock)
        spool = FakeSpool({"active": 2, "frozen": 1, "removed": 0}, {"active": 9_000.0})
        self.successResultOf(metrics.count_spool(spool))
        out = lines(metrics)
        self.assertIn('relay_spool_oldest_age_seconds{queue="active"} 1000.0', out)
        self.assertIn('relay_spool_oldest_age_seconds{queue="removed"} 0.0', out)
        self.assertNotIn("frozen", " ".join(line for line in out if "oldest" in line))
        clock.advance(500)
        self.assertIn('relay_spool_oldest_age_seconds{queue="active"} 1500.0', lines(metrics))

    def test_next_count_in(self) -> None:
        """
        The wait before the next count is 100 times what the last count
        took, within 30 s and 10 min.
        """
        self.assertEqual(
            [next_count_in(t) for t in (0.0, 0.2, 0.5, 2.0, 60.0)],
            [SPOOL_INTERVAL, SPOOL_INTERVAL, 50.0, 200.0, MAX_SPOOL_INTERVAL],
        )

    def test_slow_count_waits_longer(self) -> None:
        """
        A count that takes long (a large spool) puts the next one further
        off, and no count starts while one runs.
        """
        reactor = MemoryReactorClock()
        spool = FakeSpool({"active": 2})
        spool.hold = True
        metrics = RelayMetrics()
        service = metrics_service("tcp:9025:interface=127.0.0.1", metrics, spool, None, reactor)
        service.startService()
        self.assertEqual(spool.calls, 4)
        reactor.advance(2.0)
        self.assertEqual(spool.calls, 4)
        for d in spool.pending:
            d.callback(None)
        del spool.pending[:]
        reactor.advance(199.0)
        self.assertEqual(spool.calls, 4)
        reactor.advance(1.0)
        self.assertEqual(spool.calls, 8)
        service.stopService()

    def test_own_registry(self) -> None:
        """
        Each L{RelayMetrics} has its own registry: two do not collide.
        """
        first, second = RelayMetrics(), RelayMetrics()
        first.rejected()
        self.assertIn('relay_messages_total{outcome="rejected"} 0.0', lines(second))
        self.assertIsNot(first.registry, second.registry)

    def test_resource(self) -> None:
        """
        The web root has the metrics at C{/metrics}.
        """
        from twisted.web.resource import IResource

        root = metrics_resource(RelayMetrics())
        self.assertTrue(IResource.providedBy(root.children[b"metrics"]))

    def test_service_counts_periodically(self) -> None:
        """
        The metrics service listens on its endpoint, counts the spool at
        start and every L{SPOOL_INTERVAL} seconds, and follows the bus.
        """
        reactor = MemoryReactorClock()
        bus = EventBus(reactor)
        spool = FakeSpool({"active": 2})
        metrics = RelayMetrics()
        service = metrics_service("tcp:9025:interface=127.0.0.1", metrics, spool, bus, reactor)
        service.startService()
        self.assertEqual([p[0] for p in reactor.tcpServers], [9025])
        self.assertEqual(spool.calls, 4)
        spool.sizes["active"] = 5
        reactor.advance(SPOOL_INTERVAL)
        self.assertEqual(spool.calls, 8)
        bus.emit("spooled", "x")
        out = lines(metrics)
        self.assertIn('relay_spool_entries{queue="active"} 5.0', out)
        self.assertIn('relay_messages_total{outcome="accepted"} 1.0', out)
        service.stopService()
        reactor.advance(SPOOL_INTERVAL)
        self.assertEqual(spool.calls, 8)


class OptionsTests(SynchronousTestCase):
    def test_default_none(self) -> None:
        """
        Without C{--metrics} there is no metrics endpoint.
        """
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options["metrics"])

    def test_metrics(self) -> None:
        """
        C{--metrics} takes an endpoint description.
        """
        options = Options()
        options.parseOptions(["--metrics", "tcp:9025:interface=127.0.0.1"])
        self.assertEqual(options["metrics"], "tcp:9025:interface=127.0.0.1")

    def test_bad_endpoint(self) -> None:
        """
        A bad endpoint is a usage error.
        """
        from twisted.python.usage import UsageError

        options = Options()
        self.assertRaises(UsageError, options.parseOptions, ["--metrics", "nonsense:1"])


class MakeServiceTests(SynchronousTestCase):
    def make(self, **kwargs: Any) -> Any:
        from relay.service import makeService

        base = os.path.abspath(self.mktemp())
        return makeService(
            smtp=["tcp:2525:interface=127.0.0.1"],
            spool=os.path.join(base, "spool"),
            quarantine=os.path.join(base, "quarantine"),
            control=None,
            hostname="relay.test",
            reactor=MemoryReactorClock(),
            run_in_thread=lambda f, *a, **kw: succeed(f(*a, **kw)),
            **kwargs,
        )

    def test_no_metrics_by_default(self) -> None:
        """
        Without C{metrics} there is no metrics child.
        """
        top = self.make()
        self.assertNotIn("metrics", [s.name for s in top])
        self.assertIsNone(top.metrics)
        self.assertIsNone(top.factory.on_rejected)

    def test_metrics_child(self) -> None:
        """
        With C{metrics} a metrics child is added; the factory's rejections
        and sessions reach its registry.
        """
        top = self.make(metrics="tcp:9025:interface=127.0.0.1")
        self.assertIn("metrics", [s.name for s in top])
        top.factory.sessions = 2
        top.factory.on_rejected()
        out = lines(top.metrics)
        self.assertIn("relay_sessions 2.0", out)
        self.assertIn('relay_messages_total{outcome="rejected"} 1.0', out)
