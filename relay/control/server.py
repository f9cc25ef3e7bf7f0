"""
The control endpoint: an AMP server (L{ControlProtocol}) answering the
commands of L{relay.control.rpc} over the spool and the delivery scheduler, and the
plugin's own RPCs (C{IServerCallbacks.rpcs}) beside them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from relay.control import rpc
from relay.control.events import Event, EventBus
from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, QUEUES, REMOVED, SpoolEntry

log = Logger()

T = TypeVar("T")

HEARTBEAT_INTERVAL = 30.0

# Names relayctl may use for the queues entries are recovered from.
RECOVER_SOURCES = {REMOVED: REMOVED, QUARANTINE: QUARANTINE, "quarantined": QUARANTINE}


def _deferred(f: Callable[..., Awaitable[T]]) -> Callable[..., Deferred[T]]:
    """
    Make an C{async def} responder return a L{Deferred}, as AMP wants.
    """

    def wrapper(*args: Any, **kwargs: Any) -> Deferred[T]:
        return Deferred.fromCoroutine(f(*args, **kwargs))  # type: ignore[arg-type]

    wrapper.__name__ = f.__name__
    wrapper.__doc__ = f.__doc__
    return wrapper


class ControlLocator(amp.CommandLocator):
    """
    The responders for L{relay.control.rpc}'s commands.

    @param spool: the L{ISpool}.
    @param scheduler: the L{relay.delivery.scheduler.DeliveryScheduler}, or C{None}
        when the relay does not deliver (then L{rpc.SendNow} and
        L{rpc.SetMaxSendJobs} fail with L{rpc.BadArgument}).
    @param plugin_locators: the plugin's L{amp.CommandLocator}s, asked for
        a responder when relay has none for a command.
    @param clock: the clock that says what "now" is; by default the
        scheduler's, else the spool's.
    """

    def __init__(
        self,
        spool: Any,
        scheduler: Any = None,
        plugin_locators: Iterable[Any] = (),
        clock: Any = None,
    ) -> None:
        self.spool = spool
        self.scheduler = scheduler
        self.plugin_locators = tuple(plugin_locators)
        if clock is None:
            clock = getattr(scheduler, "clock", None) or getattr(spool, "clock", None)
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        self.clock = clock
        bus = getattr(scheduler, "events", None)
        self.events: EventBus = bus if bus is not None else EventBus(clock)

    def locateResponder(self, name: bytes) -> Any:
        responder = super().locateResponder(name)
        if responder is not None:
            return responder
        for locator in self.plugin_locators:
            responder = locator.locateResponder(name)
            if responder is not None:
                return responder
        return None

    # -- helpers ---------------------------------------------------------

    async def _entries(self, ids: Sequence[str], queues: Sequence[str]) -> list[SpoolEntry]:
        """
        The entries named by C{ids}, all of which must be in one of
        C{queues}; otherwise nothing is done and L{rpc.UnknownEntry} names
        every offending id.
        """
        found: list[SpoolEntry] = []
        missing: list[str] = []
        misplaced: list[str] = []
        for entry_id in dict.fromkeys(ids):
            try:
                entry: SpoolEntry = await self.spool.get(entry_id)
            except KeyError:
                missing.append(entry_id)
                continue
            if entry.queue not in queues:
                misplaced.append(f"{entry_id} (in {entry.queue})")
                continue
            found.append(entry)
        problems = []
        if missing:
            problems.append("no such entry: " + ", ".join(missing))
        if misplaced:
            problems.append(
                "not in " + " or ".join(queues) + ": " + ", ".join(misplaced)
            )
        if problems:
            raise rpc.UnknownEntry("; ".join(problems))
        return found

    def _unschedule(self, entry_id: str) -> None:
        if self.scheduler is not None:
            self.scheduler.unschedule(entry_id)

    def _require_scheduler(self) -> Any:
        if self.scheduler is None:
            raise rpc.BadArgument("delivery is not running in this relay")
        return self.scheduler

    # -- responders ------------------------------------------------------

    @rpc.Status.responder
    @_deferred
    async def status(self, queue: str | None = None) -> dict[str, Any]:
        if queue is None:
            queue = ACTIVE
        if queue not in QUEUES:
            raise rpc.BadArgument(f"no such queue {queue!r}; queues: {', '.join(QUEUES)}")
        from relay.spool.codec import entry_to_json

        entries: list[SpoolEntry] = await self.spool.entries(queue)
        data = []
        for entry in entries:
            item = entry_to_json(entry)
            item["queue"] = entry.queue or queue
            data.append(item)
        return {"entries": json.dumps(data)}

    @rpc.Count.responder
    @_deferred
    async def count(self) -> dict[str, Any]:
        result = {}
        for queue in QUEUES:
            result[queue] = len(await self.spool.entries(queue))
        return result

    @rpc.Freeze.responder
    @_deferred
    async def freeze(self, ids: list[str]) -> dict[str, Any]:
        entries = await self._entries(ids, (ACTIVE, FROZEN))
        done = []
        for entry in entries:
            if entry.queue == ACTIVE:
                self._unschedule(entry.id)
                await self.spool.update(dataclasses.replace(entry, reason="frozen by operator"))
                await self.spool.move(entry.id, FROZEN)
                log.info("{id} frozen by operator", id=entry.id)
                self.events.emit("frozen", entry.id, reason="frozen by operator")
            done.append(entry.id)
        return {"done": done}

    @rpc.SendFrozen.responder
    @_deferred
    async def send_frozen(
        self,
        ids: list[str],
        all: bool,
        frozen: bool,
        retry_intervals: list[float] | None = None,
    ) -> dict[str, Any]:
        if retry_intervals is not None and any(i < 0 for i in retry_intervals):
            raise rpc.BadArgument("retry intervals must not be negative")
        if ids and (all or frozen):
            raise rpc.BadArgument("give ids, or all, or frozen, not several")
        if all:
            entries = list(await self.spool.entries(ACTIVE)) + list(await self.spool.entries(FROZEN))
        elif frozen:
            entries = list(await self.spool.entries(FROZEN))
        elif ids:
            entries = await self._entries(ids, (ACTIVE, FROZEN))
        else:
            raise rpc.BadArgument("nothing to send: give ids, all or frozen")
        now = self.clock.seconds()
        done = []
        sent = []
        for entry in entries:
            changes: dict[str, Any] = {"next_attempt_at": now}
            if retry_intervals is not None:
                changes["schedule"] = tuple(retry_intervals)
                changes["step"] = 0
            if entry.queue == FROZEN:
                changes["reason"] = None
            updated = await self.spool.update(dataclasses.replace(entry, **changes))
            if entry.queue == FROZEN:
                updated = await self.spool.move(entry.id, ACTIVE)
                log.info("{id} unfrozen by operator", id=entry.id)
                self.events.emit("unfrozen", entry.id)
            sent.append(updated)
            done.append(entry.id)
        if self.scheduler is not None:
            self.scheduler.notify(sent)
        return {"done": done}

    @rpc.SendNow.responder
    @_deferred
    async def send_now(self, ids: list[str]) -> dict[str, Any]:
        scheduler = self._require_scheduler()
        entries = await self._entries(ids, (ACTIVE, FROZEN))
        done = []
        for entry in entries:
            if entry.queue == FROZEN:
                await self.spool.update(dataclasses.replace(entry, reason=None))
                await self.spool.move(entry.id, ACTIVE)
                log.info("{id} unfrozen by operator", id=entry.id)
                self.events.emit("unfrozen", entry.id)
            scheduler.send_now(entry.id)
            done.append(entry.id)
        return {"done": done}

    @rpc.Remove.responder
    @_deferred
    async def remove(self, ids: list[str]) -> dict[str, Any]:
        entries = await self._entries(ids, (ACTIVE, FROZEN, QUARANTINE, REMOVED))
        done = []
        for entry in entries:
            if entry.queue != REMOVED:
                self._unschedule(entry.id)
                await self.spool.move(entry.id, REMOVED)
                log.info("{id} removed by operator", id=entry.id)
                self.events.emit("removed", entry.id, queue=entry.queue)
            done.append(entry.id)
        return {"done": done}

    @rpc.Recover.responder
    @_deferred
    async def recover(self, ids: list[str], source: str) -> dict[str, Any]:
        queue = RECOVER_SOURCES.get(source)
        if queue is None:
            raise rpc.BadArgument(f"cannot recover from {source!r}: use removed or quarantine")
        entries = await self._entries(ids, (queue,))
        done = []
        for entry in entries:
            await self.spool.move(entry.id, FROZEN)
            log.info("{id} recovered from {queue}, frozen", id=entry.id, queue=queue)
            self.events.emit("recovered", entry.id, source=queue)
            done.append(entry.id)
        return {"done": done}

    @rpc.SetMaxSendJobs.responder
    def set_max_send_jobs(self, n: int) -> dict[str, Any]:
        scheduler = self._require_scheduler()
        if n < 1:
            raise rpc.BadArgument(f"max send jobs must be at least 1, not {n}")
        previous = int(scheduler.max_send_jobs)
        scheduler.set_max_send_jobs(n)
        return {"previous": previous}


class ControlProtocol(amp.AMP):
    """
    One control connection: relay's commands and the plugin's.
    """

    def __init__(
        self,
        spool: Any = None,
        scheduler: Any = None,
        plugin_locators: Iterable[Any] = (),
        clock: Any = None,
        locator: ControlLocator | None = None,
    ) -> None:
        if locator is None:
            locator = ControlLocator(spool, scheduler, plugin_locators, clock)
        amp.AMP.__init__(self)
        self.control = locator
        self._unsubscribe: Callable[[], None] | None = None
        self._heartbeat: Any = None

    def locateResponder(self, name: bytes) -> Any:
        """
        C{Subscribe} is this connection's own; the rest are the shared
        locator's.
        """
        responder = super().locateResponder(name)
        if responder is not None:
            return responder
        return self.control.locateResponder(name)

    @rpc.Subscribe.responder
    def subscribe(self) -> dict[str, Any]:
        if self._unsubscribe is None:
            self._unsubscribe = self.control.events.subscribe(self._send_event)
            self._schedule_heartbeat()
        return {}

    def _send_event(self, event: Event) -> None:
        arguments: dict[str, Any] = {
            "kind": event.kind,
            "at": event.at,
            "seq": event.seq,
            "fields": json.dumps(event.fields, sort_keys=True, default=str),
        }
        if event.entry_id is not None:
            arguments["entry_id"] = event.entry_id
        self.callRemote(rpc.Event, **arguments)

    def _schedule_heartbeat(self) -> None:
        self._heartbeat = self.control.clock.callLater(HEARTBEAT_INTERVAL, self._beat)

    def _beat(self) -> None:
        self._heartbeat = None
        if self._unsubscribe is None:
            return
        # Only to this connection: each subscriber has its own heartbeat.
        bus = self.control.events
        self._send_event(Event("heartbeat", None, float(self.control.clock.seconds()), bus.seq))
        self._schedule_heartbeat()

    def connectionLost(self, reason: Any = None) -> None:  # type: ignore[override]
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None
        amp.AMP.connectionLost(self, reason)


class ControlFactory(Factory):
    """
    Make L{ControlProtocol}s sharing one L{ControlLocator}.
    """

    protocol = ControlProtocol  # type: ignore[assignment]

    def __init__(
        self,
        spool: Any,
        scheduler: Any = None,
        plugin_locators: Iterable[Any] = (),
        clock: Any = None,
    ) -> None:
        self.locator = ControlLocator(spool, scheduler, plugin_locators, clock)

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        p = ControlProtocol(locator=self.locator)
        p.factory = self
        return p


def plugin_locators(plugin: Any) -> list[Any]:
    """
    The plugin's RPC locators: what its C{rpcs()} returns, if it has one.
    """
    rpcs = getattr(plugin, "rpcs", None)
    if not callable(rpcs):
        return []
    return list(rpcs() or ())
