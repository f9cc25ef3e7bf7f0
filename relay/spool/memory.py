"""
The memory spool: L{MemorySpool}, an L{ISpool} that holds everything in
memory and answers with L{Deferred}s that have already fired.  Nothing
survives the process: it is for tests (relay's, and plugin authors',
through L{relay.testing}) and for trying a plugin out, and it is the
second implementation that the spool contract tests hold to the same
behaviour as the disk spool.
"""

from __future__ import annotations

import dataclasses
from typing import Container, Iterable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from relay.interfaces import IEntryStream, IMessageWriter, ISpool
from relay.model.entry import (
    ACTIVE,
    QUARANTINE,
    QUEUES,
    QueueCount,
    SpoolEntry,
    entry_for,
    id_time,
)
from relay.model.envelope import EnvelopeWithNextHop
from relay.model.message import Message
from relay.spool.reader import PAGE_SIZE, EntryPage, EntrySelector


def allocate_ids(
    envelopes: Sequence[EnvelopeWithNextHop], taken: Container[str]
) -> list[str]:
    """
    Spool ids C{<envelope id>-<n>} for C{envelopes}: for each envelope id,
    C{n} counts from 0 within one call, bumped past ids in C{taken}.
    """
    ids: list[str] = []
    counters: dict[str, int] = {}
    for e in envelopes:
        n = counters.get(e.envelope.id, 0)
        while f"{e.envelope.id}-{n}" in taken:
            n += 1
        ids.append(f"{e.envelope.id}-{n}")
        counters[e.envelope.id] = n + 1
    return ids


@implementer(IMessageWriter)
class MemoryMessageWriter:
    """
    An L{IMessageWriter} that keeps the whole message in memory.
    """

    def __init__(self, spool: MemorySpool, message_id: str) -> None:
        self.spool = spool
        self.message_id = message_id
        self.size = 0
        self.aborted = False
        self.finished = False
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> bool:
        self._chunks.append(bytes(data))
        self.size += len(data)
        return False

    def drained(self) -> Deferred[None]:
        return defer.succeed(None)

    def finish(self, headers: Iterable[tuple[str, str]]) -> Deferred[Message]:
        self.finished = True
        data = b"".join(self._chunks)
        self._chunks = []
        return defer.succeed(Message(headers=tuple(headers), size=len(data), data=data))

    def abort(self) -> None:
        self.aborted = True
        self._chunks = []


@implementer(ISpool)
class MemorySpool:
    """
    An L{ISpool} held in memory, for tests.

    @ivar entries_by_id: every L{SpoolEntry}, by id.
    @ivar messages_by_id: the L{Message} of each entry, by entry id.
    @ivar discarded: the messages passed to L{discard}, in order.
    @ivar writers: the L{MemoryMessageWriter}s handed out by L{receive}.
    @ivar fail_next_write: if set, the next L{enqueue} or L{quarantine}
        fails with this exception (and it is reset to C{None}).
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock: IReactorTime = clock if clock is not None else Clock()
        self.entries_by_id: dict[str, SpoolEntry] = {}
        self.messages_by_id: dict[str, Message] = {}
        self.discarded: list[Message] = []
        self.writers: list[MemoryMessageWriter] = []
        self.fail_next_write: Exception | None = None

    def receive(self, message_id: str) -> MemoryMessageWriter:
        writer = MemoryMessageWriter(self, message_id)
        self.writers.append(writer)
        return writer

    def discard(self, message: Message) -> Deferred[None]:
        self.discarded.append(message)
        return defer.succeed(None)

    def _add(
        self,
        envelopes: Iterable[EnvelopeWithNextHop],
        queue: str,
        reason: str | None,
        received_from: str | None,
    ) -> Deferred[list[SpoolEntry]]:
        envelopes = list(envelopes)
        if self.fail_next_write is not None:
            exc, self.fail_next_write = self.fail_next_write, None
            return defer.fail(exc)
        now = self.clock.seconds()
        ids = allocate_ids(envelopes, self.entries_by_id)
        entries = []
        for entry_id, e in zip(ids, envelopes, strict=True):
            entry = entry_for(entry_id, queue, e, now, reason, received_from)
            self.entries_by_id[entry_id] = entry
            self.messages_by_id[entry_id] = e.envelope.message
            entries.append(entry)
        return defer.succeed(entries)

    def enqueue(
        self, envelopes: Iterable[EnvelopeWithNextHop], received_from: str | None = None
    ) -> Deferred[list[SpoolEntry]]:
        return self._add(envelopes, ACTIVE, None, received_from)

    def quarantine(
        self,
        envelopes: Iterable[EnvelopeWithNextHop],
        reason: str,
        received_from: str | None = None,
    ) -> Deferred[list[SpoolEntry]]:
        return self._add(envelopes, QUARANTINE, reason, received_from)

    def entries(self, queue: str) -> Deferred[list[SpoolEntry]]:
        if queue not in QUEUES:
            return defer.fail(ValueError(f"no such queue {queue!r}"))
        return defer.succeed(
            sorted(
                (e for e in self.entries_by_id.values() if e.queue == queue),
                key=lambda e: (e.created_at, e.id),
            )
        )

    def count(self, queue: str) -> Deferred[QueueCount]:
        if queue not in QUEUES:
            return defer.fail(ValueError(f"no such queue {queue!r}"))
        entries = [e for e in self.entries_by_id.values() if e.queue == queue]
        times = [t for t in (id_time(e.id) for e in entries) if t is not None]
        return defer.succeed(QueueCount(len(entries), min(times) if times else None))

    def due(self, before: float, limit: int) -> Deferred[list[tuple[float, str]]]:
        waiting = sorted(
            (e.next_attempt_at, e.id)
            for e in self.entries_by_id.values()
            if e.queue == ACTIVE and e.next_attempt_at < before
        )
        return defer.succeed(waiting[:limit])

    def stream(
        self,
        queue: str,
        select: EntrySelector | None = None,
        parse: bool = True,
        page_size: int = PAGE_SIZE,
    ) -> MemoryEntryStream:
        if queue not in QUEUES:
            raise ValueError(f"no such queue {queue!r}")
        return MemoryEntryStream(self, queue, select, parse, page_size)

    def message_chunk(self, entry_id: str, offset: int, size: int) -> Deferred[bytes]:
        message = self.messages_by_id.get(entry_id)
        if message is None or entry_id not in self.entries_by_id:
            return defer.fail(KeyError(entry_id))
        if message.data is not None:
            return defer.succeed(bytes(message.data[offset : offset + size]))
        with message.open() as f:
            f.seek(offset)
            return defer.succeed(f.read(size))

    def unchanged_since(
        self, queue: str, before: float, limit: int
    ) -> Deferred[list[tuple[float, str]]]:
        if queue not in QUEUES:
            return defer.fail(ValueError(f"no such queue {queue!r}"))
        # What a file's mtime would say: when the entry came into the queue.
        old = sorted(
            (e.moved_at or e.created_at, e.id)
            for e in self.entries_by_id.values()
            if e.queue == queue and (e.moved_at or e.created_at) < before
        )
        return defer.succeed(old[:limit])

    def get(self, entry_id: str) -> Deferred[SpoolEntry]:
        try:
            return defer.succeed(self.entries_by_id[entry_id])
        except KeyError:
            return defer.fail(KeyError(entry_id))

    def message(self, entry_id: str) -> Deferred[Message]:
        try:
            return defer.succeed(self.messages_by_id[entry_id])
        except KeyError:
            return defer.fail(KeyError(entry_id))

    def update(self, entry: SpoolEntry) -> Deferred[SpoolEntry]:
        old = self.entries_by_id.get(entry.id)
        if old is None:
            return defer.fail(KeyError(entry.id))
        if entry.queue != old.queue:
            entry = dataclasses.replace(entry, queue=old.queue)
        self.entries_by_id[entry.id] = entry
        return defer.succeed(entry)

    def move(self, entry_id: str, queue: str) -> Deferred[SpoolEntry]:
        if queue not in QUEUES:
            return defer.fail(ValueError(f"no such queue {queue!r}"))
        old = self.entries_by_id.get(entry_id)
        if old is None:
            return defer.fail(KeyError(entry_id))
        entry = dataclasses.replace(old, queue=queue)
        self.entries_by_id[entry_id] = entry
        return defer.succeed(entry)

    def finish(self, entry_id: str) -> Deferred[None]:
        if entry_id not in self.entries_by_id:
            return defer.fail(KeyError(entry_id))
        del self.entries_by_id[entry_id]
        self.messages_by_id.pop(entry_id, None)
        return defer.succeed(None)


@implementer(IEntryStream)
class MemoryEntryStream:
    """
    The L{IEntryStream} of a L{MemorySpool}: the ids the queue held when
    the stream began, in creation order; each is looked at when its page
    is read (an entry that left the queue meanwhile is left out, as on
    disk).
    """

    def __init__(
        self,
        spool: MemorySpool,
        queue: str,
        select: EntrySelector | None,
        parse: bool,
        page_size: int,
    ) -> None:
        self._spool = spool
        self._queue = queue
        self._select = select
        self._parse = parse
        self._page_size = max(1, page_size)
        waiting = sorted(
            (e.created_at, e.id) for e in spool.entries_by_id.values() if e.queue == queue
        )
        self._ids = [entry_id for _, entry_id in waiting]
        self._next = 0
        #: pages handed out, for tests of paging
        self.pages = 0

    def next_page(self) -> Deferred[EntryPage]:
        kept: list[SpoolEntry] = []
        while self._next < len(self._ids) and len(kept) < self._page_size:
            entry = self._spool.entries_by_id.get(self._ids[self._next])
            self._next += 1
            if entry is None or entry.queue != self._queue:
                continue
            if self._select is not None:
                verdict = self._select.admits_id(entry.id)
                if verdict is False or (verdict is None and not self._select.admits(entry)):
                    continue
            kept.append(entry)
        self.pages += 1
        return defer.succeed(
            EntryPage(
                ids=tuple(e.id for e in kept),
                entries=tuple(kept) if self._parse else (),
                unreadable=(),
                done=self._next >= len(self._ids),
            )
        )

    def close(self) -> Deferred[None]:
        self._next = len(self._ids)
        return defer.succeed(None)
