"""
Prometheus metrics for a running relay (C{--metrics ENDPOINT}): served as
text at C{/metrics} through twisted.web, from a registry of its own.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from twisted.application.service import MultiService
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relay.model.entry import QUEUES

log = Logger()

OUTCOMES = ("accepted", "rejected", "quarantined", "delivered", "deferred", "bounced", "frozen")
# Event kinds counted as outcomes, by the outcome they count.
EVENT_OUTCOMES = {
    "spooled": "accepted",
    "quarantined": "quarantined",
    "delivered": "delivered",
    "deferred": "deferred",
    "bounced": "bounced",
    "frozen": "frozen",
}
LATENCY_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 5 * 86400.0)
SPOOL_INTERVAL = 30.0


class _StateCollector:
    """
    Gauges read at scrape time: open sessions and the last spool counts.
    """

    def __init__(self, sessions: Callable[[], int], spool_counts: Callable[[], dict[str, int]]):
        self._sessions = sessions
        self._spool_counts = spool_counts

    def collect(self) -> Iterable[Any]:
        sessions = GaugeMetricFamily("relay_sessions", "Open SMTP sessions.")
        sessions.add_metric([], float(self._sessions()))
        yield sessions
        entries = GaugeMetricFamily(
            "relay_spool_entries", "Spool entries per queue.", labels=["queue"]
        )
        for queue, count in sorted(self._spool_counts().items()):
            entries.add_metric([queue], float(count))
        yield entries


class RelayMetrics:
    """
    The relay's metrics in their own L{CollectorRegistry}.

    @ivar spool_counts: the last counted spool entries, by queue.
    """

    def __init__(self, sessions: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.spool_counts: dict[str, int] = {}
        self.messages = Counter(
            "relay_messages",
            "Messages by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.messages.labels(outcome=outcome)
        self.latency = Histogram(
            "relay_delivery_latency_seconds",
            "Seconds from spooling to delivery.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(sessions, lambda: self.spool_counts))

    def rejected(self) -> None:
        """
        Count a message rejected by the policy.
        """
        self.messages.labels(outcome="rejected").inc()

    def observe(self, event: Any) -> None:
        """
        Count one L{relay.control.events.Event}; a delivery also observes its
        latency when the event carries C{created_at}.
        """
        outcome = EVENT_OUTCOMES.get(event.kind)
        if outcome is None:
            return
        self.messages.labels(outcome=outcome).inc()
        if event.kind == "delivered":
            created = event.fields.get("created_at")
            if created is not None:
                self.latency.observe(max(0.0, event.at - float(created)))

    def count_spool(self, spool: Any) -> Any:
        """
        Count each queue of C{spool} (with C{entries(queue)}) into
        C{spool_counts}; answer a Deferred that fires when done.
        """
        from twisted.internet.defer import gatherResults, maybeDeferred, succeed

        if not callable(getattr(spool, "entries", None)):
            return succeed(None)

        def one(queue: str) -> Any:
            d = maybeDeferred(spool.entries, queue)

            def store(entries: Any) -> None:
                self.spool_counts[queue] = len(entries)

            def failed(failure: Any) -> None:
                log.warn(
                    "Counting the {queue} queue failed: {error}",
                    queue=queue, error=failure.getErrorMessage(),
                )

            return d.addCallbacks(store, failed)

        return gatherResults([one(q) for q in QUEUES])


def metrics_resource(metrics: RelayMetrics) -> Any:
    """
    A twisted.web root with the Prometheus text at C{/metrics}.
    """
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    return root


class _SpoolCounting(MultiService):
    def __init__(self, metrics: RelayMetrics, spool: Any, clock: Any) -> None:
        MultiService.__init__(self)
        self.loop = LoopingCall(metrics.count_spool, spool)
        self.loop.clock = clock

    def startService(self) -> None:
        MultiService.startService(self)
        self.loop.start(SPOOL_INTERVAL, now=True).addErrback(
            lambda f: log.failure("Spool counting stopped", f)
        )

    def stopService(self) -> Any:
        if self.loop.running:
            self.loop.stop()
        return MultiService.stopService(self)


def metrics_service(
    endpoint: str, metrics: RelayMetrics, spool: Any, events: Any, clock: Any
) -> MultiService:
    """
    A service listening on C{endpoint} with the metrics, counting C{spool}
    every L{SPOOL_INTERVAL} seconds and the events of C{events} (an
    L{relay.control.events.EventBus}, or C{None}).
    """
    from twisted.application import strports
    from twisted.web.server import Site

    top = _SpoolCounting(metrics, spool, clock)
    top.setName("metrics")
    if events is not None:
        events.subscribe(metrics.observe)
    listener = strports.service(endpoint, Site(metrics_resource(metrics)), reactor=clock)
    listener.setName("metrics-http")
    listener.setServiceParent(top)
    return top
