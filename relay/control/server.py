"""
The control endpoint: an AMP server (L{ControlProtocol}) answering the
commands of L{relay.control.rpc} over the spool and the delivery scheduler, and the
plugin's own RPCs (C{IServerCallbacks.rpcs}) beside them.

Listings stream (see L{relay.control.rpc}): the spool is read a page at a
time (L{relay.interfaces.ISpool.stream}), one page ahead of the page the
client is taking, so that a listing of a million entries holds two pages
in the relay and one in the client.  Bulk actions go through the spool a
page at a time too.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionClosed
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from relay.control import actions, rpc
from relay.control.actions import Change, SendOptions
from relay.control.events import Event, EventBus
from relay.control.filters import EntryFilter, describe
from relay.control.summary import BY, BY_DOMAIN, QueueShape
from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, QUEUES, REMOVED, SpoolEntry
from relay.model.message import MAX_HEADER_BYTES, header_end
from relay.spool.codec import entry_to_json
from relay.spool.reader import EntryPage

log = Logger()

T = TypeVar("T")

HEARTBEAT_INTERVAL = 30.0
#: entries per page of a listing sent to a client (a page of JSON is a few
#: AMP keys)
LIST_PAGE = 200
#: entries per page read by a count or a summary (nothing waits for a
#: client between them)
SCAN_PAGE = 1000
#: entries changed together by a bulk action: their writes wait in the
#: spool's thread pool beside the commits of incoming mail, so a page is
#: kept short
ACTION_PAGE = 100
#: bytes of a message per L{rpc.MessageChunk}
MESSAGE_CHUNK = 4 * rpc.CHUNK

# Names relayctl may use for the queues entries are recovered from.
RECOVER_SOURCES = {REMOVED: REMOVED, QUARANTINE: QUARANTINE, "quarantined": QUARANTINE}

#: a page for the client: C{send(page)} fires when the client answered
PageSender = Callable[[EntryPage], "Deferred[Any]"]


def _deferred(f: Callable[..., Awaitable[T]]) -> Callable[..., Deferred[T]]:
    """
    Make an C{async def} responder return a L{Deferred}, as AMP wants.
    """

    def wrapper(*args: Any, **kwargs: Any) -> Deferred[T]:
        return Deferred.fromCoroutine(f(*args, **kwargs))  # type: ignore[arg-type]

    wrapper.__name__ = f.__name__
    wrapper.__doc__ = f.__doc__
    return wrapper


def entries_page_arguments(stream: int, page: EntryPage, ids_only: bool) -> dict[str, Any]:
    """
    The arguments of the L{rpc.EntriesPage} that carries C{page}.
    """
    arguments: dict[str, Any] = {"stream": stream}
    if ids_only:
        arguments["ids"] = "".join(entry_id + "\n" for entry_id in page.ids)
    else:
        arguments["entries"] = "".join(
            json.dumps(entry_to_json(entry), sort_keys=True) + "\n" for entry in page.entries
        )
    if page.unreadable:
        arguments["unreadable"] = "".join(
            f"{path}: {' '.join(error.split())}\n" for path, error in page.unreadable
        )
    return arguments


class _Tally:
    """
    What an action did: matched, changed (and the given ids among them),
    and left alone for being settled.
    """

    def __init__(self) -> None:
        self.matched = 0
        self.changed = 0
        self.settled = 0
        self.done: list[str] = []

    def answer(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "matched": self.matched,
            "changed": self.changed,
            "settled": self.settled,
        }


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
        dkim_signer: Any = None,
    ) -> None:
        self.spool = spool
        self.scheduler = scheduler
        # The DKIM signer (relay.dkim.signer), whose keys table is the one
        # in use, reloads included: None when the relay signs nothing.
        self.dkim_signer = dkim_signer
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

    @property
    def smarthost(self) -> str | None:
        """
        Where the default route goes now: the scheduler's smarthost, or
        C{None} (the MX of each domain).
        """
        smarthost = getattr(self.scheduler, "smarthost", None)
        return str(smarthost) if smarthost else None

    def now(self) -> float:
        return float(self.clock.seconds())

    def entry_filter(self, arguments: dict[str, Any]) -> EntryFilter:
        """
        The filter a command's L{rpc.FILTER_ARGUMENTS} describe, measured
        from now.

        @raise rpc.BadArgument: if they make no sense.
        """
        try:
            return EntryFilter.from_wire(self.now(), self.smarthost, arguments)
        except ValueError as e:
            raise rpc.BadArgument(str(e)) from None

    def _queue(self, queue: str | None, default: str | None = None) -> str | None:
        if queue is None:
            return default
        if queue not in QUEUES:
            raise rpc.BadArgument(f"no such queue {queue!r}; queues: {', '.join(QUEUES)}")
        return queue

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

    async def _scan(
        self,
        queue: str,
        select: EntryFilter,
        on_page: Callable[[EntryPage], Awaitable[None]],
        parse: bool = True,
        page_size: int = SCAN_PAGE,
    ) -> None:
        """
        Hand each page of C{queue} that C{select} admits to C{on_page},
        reading the next once it is done with the last, and let go of the
        queue however it ends.
        """
        stream = self.spool.stream(queue, None if select.empty else select, parse, page_size)
        try:
            while True:
                page: EntryPage = await stream.next_page()
                await on_page(page)
                if page.done:
                    return
        finally:
            await stream.close()

    def _unschedule(self, entry_id: str) -> None:
        if self.scheduler is not None:
            self.scheduler.unschedule(entry_id)

    def _require_scheduler(self) -> Any:
        if self.scheduler is None:
            raise rpc.BadArgument("delivery is not running in this relay")
        return self.scheduler

    # -- listing ---------------------------------------------------------

    async def list_entries(
        self, send: PageSender, ids_only: bool, arguments: dict[str, Any]
    ) -> dict[str, Any]:
        """
        L{rpc.Status}: the pages of the queue, each handed to C{send} (which
        fires when the client answered); the next page is read while the
        client takes the last, and read no further than that.
        """
        queue = self._queue(arguments.get("queue"), ACTIVE)
        assert queue is not None
        select = self.entry_filter(arguments)
        stream = self.spool.stream(queue, None if select.empty else select, not ids_only, LIST_PAGE)
        listed = unreadable = 0
        reading: Deferred[EntryPage] | None = stream.next_page()
        try:
            while reading is not None:
                page: EntryPage = await reading
                reading = None if page.done else stream.next_page()
                if page.ids or page.unreadable:
                    try:
                        await send(page)
                    except ConnectionClosed:
                        log.info("A listing of {queue} ended: the client went away", queue=queue)
                        break
                listed += len(page.ids)
                unreadable += len(page.unreadable)
        finally:
            if reading is not None:
                reading.addErrback(lambda _: None)
            await stream.close()
        return {"entries": listed, "unreadable": unreadable}

    @rpc.Count.responder
    @_deferred
    async def count(self, **arguments: Any) -> dict[str, Any]:
        queue = self._queue(arguments.get("queue"))
        select = self.entry_filter(arguments)
        result = {}
        for q in (queue,) if queue is not None else QUEUES:
            if select.empty:
                result[q] = (await self.spool.count(q)).entries
            else:
                result[q] = await self._count_matching(q, select)
        return result

    async def _count_matching(self, queue: str, select: EntryFilter) -> int:
        counted = 0

        async def add(page: EntryPage) -> None:
            nonlocal counted
            counted += len(page.ids)

        await self._scan(queue, select, add, parse=False)
        return counted

    @rpc.Summary.responder
    @_deferred
    async def summary(
        self, by: str | None = None, top: int | None = None, **arguments: Any
    ) -> dict[str, Any]:
        by = by or BY_DOMAIN
        if by not in BY:
            raise rpc.BadArgument(f"summary by {by!r}: use {' or '.join(BY)}")
        if top is not None and top < 0:
            raise rpc.BadArgument(f"top must not be negative, not {top}")
        queue = self._queue(arguments.get("queue"), ACTIVE)
        assert queue is not None
        select = self.entry_filter(arguments)
        shape = QueueShape(self.now(), by, self.smarthost)
        unreadable = [0]

        async def add(page: EntryPage) -> None:
            shape.add_all(page.entries)
            unreadable[0] += len(page.unreadable)

        await self._scan(queue, select, add)
        return {
            "rows": json.dumps(shape.top(top or 0)),
            "total": json.dumps(shape.total),
            "entries": shape.entries,
            "groups": len(shape.rows),
            "unreadable": unreadable[0],
            **self._waiting_summary(),
        }

    def _waiting_summary(self) -> dict[str, Any]:
        """
        What waits for a limit, by destination and reason (for
        C{summary}): kept by the scheduler, not in the entries.
        """
        shaper = getattr(self.scheduler, "shaper", None)
        if shaper is None:
            return {}
        return {"waiting": json.dumps([list(row) for row in shaper.by_destination()])}

    @rpc.Show.responder
    @_deferred
    async def show(self, id: str) -> dict[str, Any]:
        try:
            entry: SpoolEntry = await self.spool.get(id)
        except KeyError:
            raise rpc.UnknownEntry(f"no such entry: {id}") from None
        result: dict[str, Any] = {
            "entry": json.dumps(entry_to_json(entry), sort_keys=True),
            "headers": await self._headers(id),
        }
        if self.smarthost is not None:
            result["smarthost"] = self.smarthost
        shaper = getattr(self.scheduler, "shaper", None)
        wait = shaper.waits.get(id) if shaper is not None else None
        if wait is not None:
            result["waiting"] = json.dumps(wait.to_json())
        return result

    async def _headers(self, entry_id: str) -> bytes:
        """
        The header section of an entry's message as stored (up to the
        blank line, at most L{MAX_HEADER_BYTES}); empty when the message
        is gone.
        """
        head = b""
        while len(head) < MAX_HEADER_BYTES:
            try:
                chunk: bytes = await self.spool.message_chunk(entry_id, len(head), rpc.CHUNK)
            except KeyError:
                return b""
            if not chunk:
                break
            head += chunk
            end = header_end(head)
            if end >= 0:
                return head[:end]
        return head[:MAX_HEADER_BYTES]

    async def send_message(self, send: Callable[[bytes], Deferred[Any]], entry_id: str) -> dict[str, Any]:
        """
        L{rpc.ShowMessage}: the message in chunks, each handed to C{send}
        (which fires when the client answered), the next read meanwhile.
        """
        try:
            await self.spool.get(entry_id)
        except KeyError:
            raise rpc.UnknownEntry(f"no such entry: {entry_id}") from None
        size = 0
        reading: Deferred[bytes] | None = self.spool.message_chunk(entry_id, 0, MESSAGE_CHUNK)
        try:
            while reading is not None:
                try:
                    chunk: bytes = await reading
                except KeyError:
                    raise rpc.UnknownEntry(f"the message of {entry_id} is gone") from None
                reading = (
                    self.spool.message_chunk(entry_id, size + len(chunk), MESSAGE_CHUNK)
                    if chunk
                    else None
                )
                if not chunk:
                    break
                try:
                    await send(chunk)
                except ConnectionClosed:
                    break
                size += len(chunk)
        finally:
            if reading is not None:
                reading.addErrback(lambda _: None)
        return {"size": size}

    # -- actions ---------------------------------------------------------

    async def _act(
        self,
        action: str,
        ids: Sequence[str],
        every: bool,
        arguments: dict[str, Any],
        decide: Callable[[SpoolEntry], Change | None],
        apply: Callable[[SpoolEntry, Change], Awaitable[SpoolEntry]],
        settled_if_unchanged: bool = False,
    ) -> dict[str, Any]:
        """
        Carry out C{action} on the entries named by C{ids}, or on every
        entry of its queues (C{every}), or on those the filters admit:
        C{decide} says what changes for each (L{relay.control.actions}),
        C{apply} makes the change.  Pages of entries are changed together
        (the spool may commit them as one batch).

        @param settled_if_unchanged: count an unchanged settled entry as
            left alone for being settled.
        """
        select = self.entry_filter(arguments)
        queue = self._queue(arguments.get("queue"))
        if ids and every:
            raise rpc.BadArgument("give ids or all, not both")
        if not ids and not every and select.empty and queue is None:
            raise rpc.BadArgument(f"nothing to {action}: give ids, all or a filter")
        if queue is not None and queue not in actions.ACCEPTED[action]:
            raise rpc.BadArgument(f"cannot {action} entries in {queue}")
        tally = _Tally()

        async def one(entry: SpoolEntry, named: bool) -> None:
            change = decide(entry)
            if change is None:
                if settled_if_unchanged and entry.settled:
                    tally.settled += 1
                return
            try:
                if not named:
                    # The page was read a while ago (the rest of it may
                    # have been written since): decide again on the entry
                    # as it is now, lest a delivery's record be overwritten.
                    fresh: SpoolEntry = await self.spool.get(entry.id)
                    if fresh != entry:
                        change = decide(fresh) if fresh.queue == entry.queue else None
                        if change is None:
                            return
                        entry = fresh
                await apply(entry, change)
            except KeyError:
                return  # delivered or removed meanwhile: nothing left to change
            tally.changed += 1
            if named:
                tally.done.append(entry.id)

        if ids:
            for entry in await self._entries(ids, actions.ACCEPTED[action]):
                if (queue is None or entry.queue == queue) and select.admits(entry):
                    tally.matched += 1
                    await one(entry, True)
            return tally.answer()
        log.info("{action} by operator: {selection}", action=action,
                 selection=describe(select, [f"queue={queue}"] if queue else []))  # fmt: skip

        async def change_page(page: EntryPage) -> None:
            tally.matched += len(page.entries)
            await defer.gatherResults(
                [Deferred.fromCoroutine(one(entry, False)) for entry in page.entries],
                consumeErrors=True,
            ).addErrback(lambda f: f.value.subFailure)

        for q in (queue,) if queue is not None else actions.SCANNED[action]:
            await self._scan(q, select, change_page, page_size=ACTION_PAGE)
        return tally.answer()

    async def _write(self, entry: SpoolEntry, change: Change) -> SpoolEntry:
        """
        Write the change's metadata, then move the entry.
        """
        current = entry
        if change.entry is not None:
            current = await self.spool.update(change.entry)
        if change.move_to is not None:
            current = await self.spool.move(entry.id, change.move_to)
        return current

    @rpc.Freeze.responder
    @_deferred
    async def freeze(self, ids: list[str], all: bool | None = None, **arguments: Any) -> dict[str, Any]:
        now = self.now()

        async def apply(entry: SpoolEntry, change: Change) -> SpoolEntry:
            self._unschedule(entry.id)
            frozen = await self._write(entry, change)
            log.info("{id} frozen by operator", id=entry.id)
            self.events.emit("frozen", entry.id, reason=actions.FROZEN_BY_OPERATOR)
            return frozen

        return await self._act(
            "freeze", ids, bool(all), arguments, lambda e: actions.freeze(e, now), apply
        )

    @rpc.SendFrozen.responder
    @_deferred
    async def send_frozen(
        self,
        ids: list[str],
        all: bool,
        frozen: bool,
        retry_intervals: list[float] | None = None,
        next_hop: str | None = None,
        retry_failed: bool | None = None,
        **arguments: Any,
    ) -> dict[str, Any]:
        if retry_intervals is not None and any(i < 0 for i in retry_intervals):
            raise rpc.BadArgument("retry intervals must not be negative")
        if ids and (all or frozen):
            raise rpc.BadArgument("give ids, or all, or frozen, not several")
        if all and frozen:
            raise rpc.BadArgument("give all or frozen, not both")
        if next_hop is not None:
            from relay.delivery.nexthop import parse_hop

            try:
                parse_hop(next_hop)
            except ValueError:
                raise rpc.BadArgument(f"next hop: expected HOST[:PORT], not {next_hop!r}") from None
        if frozen:
            if arguments.get("queue") not in (None, FROZEN):
                raise rpc.BadArgument("frozen means the frozen queue")
            arguments = dict(arguments, queue=FROZEN)
        options = SendOptions(
            schedule=tuple(retry_intervals) if retry_intervals is not None else None,
            next_hop=next_hop,
            retry_failed=bool(retry_failed),
        )
        now = self.now()

        async def apply(entry: SpoolEntry, change: Change) -> SpoolEntry:
            sent = await self._write(entry, change)
            if entry.queue == FROZEN:
                log.info("{id} unfrozen by operator", id=entry.id)
                self.events.emit("unfrozen", entry.id)
            if next_hop is not None and change.entry is not None:
                log.info("{id} rerouted by operator to {hop}", id=entry.id, hop=next_hop)
            if self.scheduler is not None:
                self.scheduler.notify([sent])
            return sent

        return await self._act(
            "send", ids, bool(all), arguments, lambda e: actions.send(e, now, options), apply,
            settled_if_unchanged=True,
        )  # fmt: skip

    @rpc.SendNow.responder
    @_deferred
    async def send_now(
        self,
        ids: list[str],
        all: bool | None = None,
        retry_failed: bool | None = None,
        **arguments: Any,
    ) -> dict[str, Any]:
        scheduler = self._require_scheduler()
        options = SendOptions(retry_failed=bool(retry_failed))
        now = self.now()

        async def apply(entry: SpoolEntry, change: Change) -> SpoolEntry:
            sent = await self._write(entry, change)
            if entry.queue == FROZEN:
                log.info("{id} unfrozen by operator", id=entry.id)
                self.events.emit("unfrozen", entry.id)
            scheduler.send_now(entry.id)
            return sent

        return await self._act(
            "send-now", ids, bool(all), arguments, lambda e: actions.send_now(e, now, options),
            apply, settled_if_unchanged=True,
        )  # fmt: skip

    @rpc.Remove.responder
    @_deferred
    async def remove(self, ids: list[str], all: bool | None = None, **arguments: Any) -> dict[str, Any]:
        now = self.now()

        async def apply(entry: SpoolEntry, change: Change) -> SpoolEntry:
            self._unschedule(entry.id)
            removed = await self._write(entry, change)
            log.info("{id} removed by operator", id=entry.id)
            self.events.emit("removed", entry.id, queue=entry.queue)
            return removed

        return await self._act(
            "remove", ids, bool(all), arguments, lambda e: actions.remove(e, now), apply
        )

    @rpc.Recover.responder
    @_deferred
    async def recover(self, ids: list[str], source: str) -> dict[str, Any]:
        queue = RECOVER_SOURCES.get(source)
        if queue is None:
            raise rpc.BadArgument(f"cannot recover from {source!r}: use removed or quarantine")
        entries = await self._entries(ids, (queue,))
        done = []
        now = self.now()
        for entry in entries:
            await self._write(entry, actions.recover(entry, now))
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


    # -- suspensions (relay.shaping) -------------------------------------

    def _shaper(self) -> Any:
        shaper = getattr(self._require_scheduler(), "shaper", None)
        if shaper is None:
            raise rpc.BadArgument("this relay does no traffic shaping")
        return shaper

    @rpc.Suspend.responder
    def suspend(
        self, destination: str, seconds: float | None = None, reason: str | None = None
    ) -> dict[str, Any]:
        shaper = self._shaper()
        name = destination.strip().lower().rstrip(".")
        if not name or any(c.isspace() for c in name):
            raise rpc.BadArgument(f"not a domain or provider name: {name!r}")
        if seconds is not None and seconds <= 0:
            raise rpc.BadArgument(f"a suspension lasts a positive time, not {seconds}")
        until = self.now() + seconds if seconds is not None else None
        shaper.suspensions.suspend(name, until, reason or "suspended by relayctl")
        provider = shaper.config.provider_named(name) is not None
        return {"until": until, "provider": provider}

    @rpc.Resume.responder
    def resume(self, destination: str) -> dict[str, Any]:
        shaper = self._shaper()
        name = destination.strip().lower().rstrip(".")
        waiting = len(shaper.waiting_for(name))
        return {"resumed": shaper.suspensions.resume(name), "waiting": waiting}

    @rpc.Suspended.responder
    def suspended(self) -> dict[str, Any]:
        shaper = self._shaper()
        rows = []
        for suspension in shaper.suspensions.all():
            row = suspension.to_json()
            row["waiting"] = len(shaper.waiting_for(suspension.name))
            rows.append(row)
        return {"suspensions": json.dumps(rows)}


    # -- DKIM (relay.dkim) ------------------------------------------------

    @rpc.DkimRecord.responder
    def dkim_record(self, domain: str, selector: str) -> dict[str, Any]:
        from relay.dkim import DkimKeysError
        from relay.dkim.record import record_value, table_key, zone_record

        if self.dkim_signer is None:
            raise rpc.BadArgument("this relay signs nothing (it was started without --dkim-keys)")
        try:
            key = table_key(self.dkim_signer.table, domain, selector, "the relay's --dkim-keys")
        except DkimKeysError as e:
            raise rpc.BadArgument(str(e)) from None
        return {"zone": zone_record(key), "value": record_value(key)}


class ControlProtocol(amp.AMP):
    """
    One control connection: relay's commands and the plugin's.  The
    commands that stream (L{rpc.Status}, L{rpc.ShowMessage}) and the event
    stream are answered here, since they call the client back on this
    connection; the rest are the shared L{ControlLocator}'s.
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
        C{Subscribe} and the streaming commands are this connection's own;
        the rest are the shared locator's.
        """
        responder = super().locateResponder(name)
        if responder is not None:
            return responder
        return self.control.locateResponder(name)

    @rpc.Status.responder
    def status(
        self, stream: int | None = None, ids_only: bool | None = None, **arguments: Any
    ) -> Deferred[dict[str, Any]]:
        tag = stream or 0

        def send(page: EntryPage) -> Deferred[Any]:
            return self.callRemote(rpc.EntriesPage, **entries_page_arguments(tag, page, bool(ids_only)))

        return Deferred.fromCoroutine(self.control.list_entries(send, bool(ids_only), arguments))

    @rpc.ShowMessage.responder
    def show_message(self, id: str, stream: int | None = None) -> Deferred[dict[str, Any]]:
        tag = stream or 0

        def send(data: bytes) -> Deferred[Any]:
            return self.callRemote(rpc.MessageChunk, stream=tag, data=data)

        return Deferred.fromCoroutine(self.control.send_message(send, id))

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
        dkim_signer: Any = None,
    ) -> None:
        self.locator = ControlLocator(spool, scheduler, plugin_locators, clock, dkim_signer)

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
