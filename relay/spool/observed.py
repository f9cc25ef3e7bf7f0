"""
The observed spool: L{ObservedSpool}, any L{ISpool} that tells an
L{ISpoolObserver} about each commit once it is durable.  The server
writes through one so that whoever needs news of new mail (the delivery
scheduler; in a receiver process, the master) hears of it without the
server or the spool knowing who that is.
"""

from __future__ import annotations

from typing import Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from relay.interfaces import IEntryStream, IMessageWriter, ISpool, ISpoolObserver
from relay.model.entry import QueueCount, SpoolEntry
from relay.model.envelope import EnvelopeWithNextHop
from relay.model.message import Message
from relay.spool.reader import PAGE_SIZE, EntrySelector

log = Logger()


@implementer(ISpool)
class ObservedSpool:
    """
    An L{ISpool} that is C{spool}, and calls C{observer} after each
    C{enqueue} (L{ISpoolObserver.spooled}) and C{quarantine}
    (L{ISpoolObserver.quarantined}) that succeeded.  A commit that fails
    is not reported; an observer that raises is logged, and the commit's
    L{Deferred} still fires with the new entries: they are on disk, and
    failing it would make the client send the message again.

    Every other method is C{spool}'s own, passed through as it is.

    @ivar spool: the spool written to.
    @ivar observer: the L{ISpoolObserver} told of commits.
    """

    def __init__(self, spool: ISpool, observer: ISpoolObserver) -> None:
        self.spool = spool
        self.observer = observer

    def receive(self, message_id: str) -> IMessageWriter:
        writer: IMessageWriter = self.spool.receive(message_id)
        return writer

    def discard(self, message: Message) -> Deferred[None]:
        d: Deferred[None] = self.spool.discard(message)
        return d

    def enqueue(
        self, envelopes: Iterable[EnvelopeWithNextHop], received_from: str | None = None
    ) -> Deferred[list[SpoolEntry]]:
        envelopes = list(envelopes)
        d: Deferred[list[SpoolEntry]] = self.spool.enqueue(envelopes, received_from=received_from)
        return d.addCallback(self._spooled, envelopes)

    def quarantine(
        self,
        envelopes: Iterable[EnvelopeWithNextHop],
        reason: str,
        received_from: str | None = None,
    ) -> Deferred[list[SpoolEntry]]:
        d: Deferred[list[SpoolEntry]] = self.spool.quarantine(
            envelopes, reason, received_from=received_from
        )
        return d.addCallback(self._quarantined, reason)

    def entries(self, queue: str) -> Deferred[list[SpoolEntry]]:
        d: Deferred[list[SpoolEntry]] = self.spool.entries(queue)
        return d

    def count(self, queue: str) -> Deferred[QueueCount]:
        d: Deferred[QueueCount] = self.spool.count(queue)
        return d

    def due(self, before: float, limit: int) -> Deferred[list[tuple[float, str]]]:
        d: Deferred[list[tuple[float, str]]] = self.spool.due(before, limit)
        return d

    def stream(
        self,
        queue: str,
        select: EntrySelector | None = None,
        parse: bool = True,
        page_size: int = PAGE_SIZE,
    ) -> IEntryStream:
        stream: IEntryStream = self.spool.stream(queue, select, parse, page_size)
        return stream

    def message_chunk(self, entry_id: str, offset: int, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = self.spool.message_chunk(entry_id, offset, size)
        return d

    def unchanged_since(
        self, queue: str, before: float, limit: int
    ) -> Deferred[list[tuple[float, str]]]:
        d: Deferred[list[tuple[float, str]]] = self.spool.unchanged_since(queue, before, limit)
        return d

    def get(self, entry_id: str) -> Deferred[SpoolEntry]:
        d: Deferred[SpoolEntry] = self.spool.get(entry_id)
        return d

    def message(self, entry_id: str) -> Deferred[Message]:
        d: Deferred[Message] = self.spool.message(entry_id)
        return d

    def update(self, entry: SpoolEntry) -> Deferred[SpoolEntry]:
        d: Deferred[SpoolEntry] = self.spool.update(entry)
        return d

    def move(self, entry_id: str, queue: str) -> Deferred[SpoolEntry]:
        d: Deferred[SpoolEntry] = self.spool.move(entry_id, queue)
        return d

    def finish(self, entry_id: str) -> Deferred[None]:
        d: Deferred[None] = self.spool.finish(entry_id)
        return d

    def _spooled(
        self, entries: list[SpoolEntry], envelopes: list[EnvelopeWithNextHop]
    ) -> list[SpoolEntry]:
        try:
            self.observer.spooled(entries, envelopes)
        except Exception:
            log.failure(
                "Telling {observer!r} of {n} spooled entries failed",
                observer=self.observer, n=len(entries),
            )  # fmt: skip
        return entries

    def _quarantined(self, entries: list[SpoolEntry], reason: str) -> list[SpoolEntry]:
        try:
            self.observer.quarantined(entries, reason)
        except Exception:
            log.failure(
                "Telling {observer!r} of {n} quarantined entries failed",
                observer=self.observer, n=len(entries),
            )  # fmt: skip
        return entries
