"""
Prometheus metrics for a running relay (C{--metrics ENDPOINT}): served as
text at C{/metrics} through twisted.web, from a registry of its own.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger

from relay.model.entry import QUEUES, QueueCount

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
#: seconds between two counts of the spool, at least
SPOOL_INTERVAL = 30.0
#: seconds between two counts of the spool, at most
MAX_SPOOL_INTERVAL = 600.0
#: a count that took C{t} seconds waits C{COUNT_COST_FACTOR * t} before the
#: next (within the two bounds above): counting a large spool, which costs
#: a directory listing per queue, takes at most 1% of the time
COUNT_COST_FACTOR = 100.0


def next_count_in(took: float) -> float:
    """
    Seconds until the next count of the spool, after one that took
    C{took} seconds.
    """
    return min(MAX_SPOOL_INTERVAL, max(SPOOL_INTERVAL, COUNT_COST_FACTOR * took))


class _StateCollector:
    """
    Gauges read at scrape time: open sessions, the last spool counts and
    the age of each queue's oldest entry (as of now: it grows between
    counts).
    """

    def __init__(
        self,
        sessions: Callable[[], int],
        spool_counts: Callable[[], dict[str, QueueCount]],
        now: Callable[[], float],
    ):
        self._sessions = sessions
        self._spool_counts = spool_counts
        self._now = now

    def collect(self) -> Iterable[Any]:
        sessions = GaugeMetricFamily("relay_sessions", "Open SMTP sessions.")
        sessions.add_metric([], float(self._sessions()))
        yield sessions
        counts = sorted(self._spool_counts().items())
        entries = GaugeMetricFamily(
            "relay_spool_entries", "Spool entries per queue.", labels=["queue"]
        )
        for queue, count in counts:
            entries.add_metric([queue], float(count.entries))
        yield entries
        oldest = GaugeMetricFamily(
            "relay_spool_oldest_age_seconds",
            "Age of the oldest entry per queue (0 when the queue is empty).",
            labels=["queue"],
        )
        now = self._now()
        for queue, count in counts:
            if count.oldest is not None:
                oldest.add_metric([queue], max(0.0, now - count.oldest))
            elif count.entries == 0:
                oldest.add_metric([queue], 0.0)
            # else: its entries' ids say no age (a plugin's own ids)
        yield oldest


class RelayMetrics:
    """
    The relay's metrics in their own L{CollectorRegistry}.

    @param clock: what the age of the oldest entries is measured with;
        the system's time when C{None} (entry ids carry the system's time).
    @ivar spool_counts: the last L{QueueCount} of each queue.
    """

    def __init__(self, sessions: Callable[[], int] = lambda: 0, clock: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.spool_counts: dict[str, QueueCount] = {}
        self.clock = clock
        self.messages = Counter(
            "relay_messages",
            "Messages by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.expired = Counter(
            "relay_spool_expired",
            "Entries deleted because their lifetime in the frozen (settled) or removed "
            "queue ran out.",
            ["queue"],
            registry=self.registry,
        )
        for queue in ("frozen", "removed"):
            self.expired.labels(queue=queue)
        for outcome in OUTCOMES:
            self.messages.labels(outcome=outcome)
        self.latency = Histogram(
            "relay_delivery_latency_seconds",
            "Seconds from spooling to delivery.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(sessions, lambda: self.spool_counts, self._now))

    def _now(self) -> float:
        if self.clock is None:
            import time

            return time.time()
        return float(self.clock.seconds())

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
        if event.kind == "expired":
            self.expired.labels(queue=str(event.fields.get("queue", "frozen"))).inc()
            return
        outcome = EVENT_OUTCOMES.get(event.kind)
        if outcome is None:
            return
        self.messages.labels(outcome=outcome).inc()
        if event.kind == "delivered":
            created = event.fields.get("created_at")
            if created is not None:
                self.latency.observe(max(0.0, event.at - float(created)))

    def count_spool(self, spool: Any) -> Deferred[Any]:
        """
        Count each queue of C{spool} (L{ISpool.count<relay.interfaces.ISpool.count>}:
        the names of its files, no entry is read) into C{spool_counts};
        answer a Deferred that fires when done.
        """
        if not callable(getattr(spool, "count", None)):
            return succeed(None)

        def one(queue: str) -> Deferred[None]:
            d: Deferred[QueueCount] = maybeDeferred(spool.count, queue)

            def store(count: QueueCount) -> None:
                self.spool_counts[queue] = count

            def failed(failure: Any) -> None:
                log.warn(
                    "Counting the {queue} queue failed: {error}",
                    queue=queue, error=failure.getErrorMessage(),
                )  # fmt: skip

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
    """
    Count the spool at start, then again L{next_count_in} seconds after
    each count ends (never two at once).

    @ivar interval: the wait before the next count.
    """

    def __init__(self, metrics: RelayMetrics, spool: Any, clock: Any) -> None:
        MultiService.__init__(self)
        self.metrics = metrics
        self.spool = spool
        self.clock = clock
        self.interval = SPOOL_INTERVAL
        self._next: Any = None

    def startService(self) -> None:
        MultiService.startService(self)
        self._count()

    def _count(self) -> None:
        self._next = None
        started = self.clock.seconds()
        d = self.metrics.count_spool(self.spool)
        d.addErrback(lambda f: log.failure("Counting the spool failed", f))
        d.addCallback(self._counted, started)

    def _counted(self, _: object, started: float) -> None:
        self.interval = next_count_in(self.clock.seconds() - started)
        if self.running:
            self._next = self.clock.callLater(self.interval, self._count)

    def stopService(self) -> Any:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        return MultiService.stopService(self)


def metrics_service(
    endpoint: str, metrics: RelayMetrics, spool: Any, events: Any, clock: Any
) -> MultiService:
    """
    A service listening on C{endpoint} with the metrics, counting C{spool}
    every L{SPOOL_INTERVAL} seconds or more (L{next_count_in}: longer when
    a count is slow, at a large queue) and the events of C{events} (an
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
