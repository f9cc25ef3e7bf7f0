"""
The relay's services: the thread pool (L{ThreadPoolService}), the spool
with its lock, recovery and the scheduler it feeds (L{SpoolService},
L{SpoolRecovery}), and the tree that holds them all (L{Relay}).

Each gets what it works with through its constructor.  The order they
stop in matters and is theirs to keep: the scheduler stops (letting
running deliveries finish) before the spool is unlocked, and the thread
pool, which those deliveries still use, stops last.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger(namespace="relay.service")


class ThreadPoolService(Service):
    """
    Start and stop a L{ThreadPool} with the service.

    @param stop_after: answers what to wait for before stopping the pool
        (the spool service's stop: deliveries finishing still write
        through the pool), a L{Deferred} or C{None}.
    """

    def __init__(
        self, pool: ThreadPool, stop_after: Callable[[], Deferred[Any] | None] | None = None
    ) -> None:
        self.pool = pool
        self.stop_after = stop_after
        self.setName("threadpool")

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> Deferred[Any] | None:
        Service.stopService(self)
        d = self.stop_after() if self.stop_after is not None else None
        if isinstance(d, Deferred) and not d.called:
            d.addBoth(lambda _: self.pool.stop())
            return d
        self.pool.stop()
        return None


class SpoolRecovery:
    """
    The spool's recovery at start-up (L{relay.interfaces.ISpool.recover}
    of a disk spool), run by L{SpoolService}; what must not begin before
    it is done (the scheduler loading the active queue, the receivers)
    waits on L{wait}.
    """

    def __init__(self, spool: Any) -> None:
        self.spool = spool
        self._done = False
        self._waiting: list[Deferred[None]] = []

    def run(self) -> Deferred[None]:
        """
        Recover the spool; the L{Deferred} fires (with C{None}, never
        failing: a failure is logged) when done.
        """
        self._done = False

        def recovered(_: object) -> None:
            log.info("Spool recovered")

        def failed(failure: Any) -> None:
            log.failure("Spool recovery failed", failure)

        d: Deferred[Any] = self.spool.recover()
        d.addCallbacks(recovered, failed)
        d.addCallback(self._finished)
        d.addCallback(lambda _: self._sweep())
        return d

    def _sweep(self) -> None:
        """
        The slow part of recovery, in the background: message files no
        entry refers to (in a spool of a million entries it takes seconds;
        nothing waits for it).
        """
        sweep = getattr(self.spool, "sweep", None)
        if sweep is None:
            return
        d: Deferred[Any] = sweep()
        d.addCallbacks(
            lambda n: log.info("Spool swept: {n} unreferenced message files removed", n=n),
            lambda f: log.failure("Sweeping the spool failed", f),
        )

    def _finished(self, _: object) -> None:
        self._done = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def wait(self) -> Deferred[None]:
        """
        A L{Deferred} that fires once the recovery under way (or done) is
        done.
        """
        if self._done:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d


class SpoolService(Service):
    """
    Own the spool: create its directories, hold its lock while running,
    recover it at start, and run the delivery scheduler (if any) in
    between: started with the spool (it loads the active queue once
    C{recovery} is done), stopped before the spool is unlocked.
    """

    def __init__(
        self,
        spool: Any,
        directories: Iterable[str],
        recovery: SpoolRecovery,
        delivery: IService | None = None,
    ) -> None:
        self.spool = spool
        self.directories = tuple(directories)
        self.recovery = recovery
        self.delivery = delivery
        self.locked = False
        self._stopping: Deferred[Any] | None = None
        self.setName("spool")

    def privilegedStartService(self) -> None:
        # Before the reactor runs and before anything listens: a relay that
        # cannot own its spool must not start at all.
        for directory in self.directories:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        self._lock()
        Service.privilegedStartService(self)

    def _lock(self) -> None:
        """
        Take the spool's lock, or end the process with one log line that
        says who holds it (C{twistd relay} checks this before it starts;
        this is for a relay that started meanwhile, and for C{.tac} files).
        """
        if self.locked:
            return
        try:
            self.spool.lock()
        except Exception as e:
            log.critical("Cannot start: {error}", error=e)
            raise SystemExit(1) from None
        self.locked = True

    def startService(self) -> None:
        self._lock()
        Service.startService(self)
        self.recovery.run()
        if self.delivery is not None:
            self.delivery.startService()

    def stopService(self) -> Deferred[Any] | None:
        Service.stopService(self)
        if self.delivery is not None and self.delivery.running:
            # Let running deliveries finish (up to a bound) before the
            # spool is unlocked.
            d: Deferred[Any] = self.delivery.stopService()
            d.addBoth(lambda _: self._unlock())
            self._stopping = d
            return d
        self._stopping = None
        self._unlock()
        return None

    def stopping(self) -> Deferred[Any] | None:
        """
        The stop under way: what the thread pool waits for (see
        L{ThreadPoolService}).
        """
        return self._stopping

    def _unlock(self) -> None:
        if self.locked:
            self.locked = False
            self.spool.unlock()


class Relay(MultiService):
    """
    The relay's service tree (named C{relay}): C{services}, started in
    order and stopped in reverse.  The parts it was built from are here
    for C{.tac} files and tests to reach.

    @ivar callbacks: the plugin (an L{IServerCallbacks} provider).
    @ivar spool: the spool the SMTP server writes to.
    @ivar delivery: the L{relay.delivery.scheduler.DeliveryScheduler}, or
        C{None} when the spool cannot deliver.
    @ivar factory: the SMTP server factory, or C{None} when receivers serve
        SMTP.
    @ivar receivers: the L{relay.app.pool.ReceiverPool}, or C{None}.
    @ivar metrics: the L{relay.control.metrics.RelayMetrics}, or C{None}.
    """

    def __init__(
        self,
        services: Iterable[IService],
        *,
        callbacks: Any,
        spool: Any,
        delivery: Any = None,
        factory: Any = None,
        receivers: Any = None,
        metrics: Any = None,
    ) -> None:
        MultiService.__init__(self)
        self.setName("relay")
        self.callbacks = callbacks
        self.spool = spool
        self.delivery = delivery
        self.factory = factory
        self.receivers = receivers
        self.metrics = metrics
        for service in services:
            service.setServiceParent(self)
