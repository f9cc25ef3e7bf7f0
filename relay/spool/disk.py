"""
The disk spool: L{DiskSpool}, the L{ISpool} over a spool directory.

It is the reactor side of the package's pieces: where the files are
(L{relay.spool.layout}), what they hold (L{relay.spool.codec}), how each
change is made durable (L{relay.spool.commit}: read its docstring before
changing anything that writes), the file-system seam (L{relay.spool.fs}),
the lock (L{relay.spool.lock}), the message writer
(L{relay.spool.writer}) and the read cache (L{relay.spool.recent}).  All
file I/O runs through C{run_in_thread}, never on the reactor thread
(except L{DiskSpool.lock}, meant for start-up).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relay.interfaces import IEntryStream, ISpool
from relay.model.entry import ACTIVE, QUARANTINE, QueueCount, SpoolEntry
from relay.model.envelope import EnvelopeWithNextHop
from relay.model.message import Message
from relay.spool.commit import Batcher, Commit, Committer, Finish, Update
from relay.spool.fs import FileSystem, unlink_if_present
from relay.spool.layout import SpoolLayout, is_safe_id
from relay.spool.lock import SpoolLock
from relay.spool.reader import (
    PAGE_SIZE,
    EntryPage,
    EntrySelector,
    QueueListing,
    QueueScanner,
    count_queue,
    due_entries,
    find_entry,
    oldest_by_mtime,
    read_message,
    read_message_chunk,
    read_queue,
)
from relay.spool.recent import RecentEntries
from relay.spool.writer import SPILL_THRESHOLD, DiskMessageWriter

log = Logger()


@implementer(ISpool)
class DiskSpool:
    """
    An L{ISpool} in a directory.

    @param run_in_thread: C{run_in_thread(f, *args, **kw)} runs C{f} off the
        reactor thread and returns a L{Deferred} with its result, e.g.
        C{partial(deferToThreadPool, reactor, threadpool)}.
    @param clock: the time of new entries.
    @param quarantine_path: the quarantine directory; C{<path>/quarantine}
        when C{None}.
    @param spill_threshold: messages larger than this spill to disk while
        they arrive, and are not read whole into memory to be sent.
    @param fs: the L{FileSystem} every change goes through.
    @param use_syncfs: make a commit batch durable with one C{syncfs(2)}
        per filesystem (C{True}) or with an fsync of each file and
        directory (C{False}); C{None} uses syncfs where there is one.
    @param remember: keep the entries (and small messages) this spool
        writes in memory for delivering them (see L{RecentEntries}); a
        process that only receives has no use for that.

    @ivar layout: where its files are.
    """

    def __init__(
        self,
        path: str,
        run_in_thread: Callable[..., Deferred[Any]],
        clock: IReactorTime,
        quarantine_path: str | None = None,
        spill_threshold: int = SPILL_THRESHOLD,
        fs: FileSystem | None = None,
        use_syncfs: bool | None = None,
        remember: bool = True,
    ) -> None:
        self.path = os.path.abspath(path)
        self.layout = SpoolLayout(
            self.path, os.path.abspath(quarantine_path) if quarantine_path is not None else None
        )
        self._run = run_in_thread
        self.clock = clock
        self.spill_threshold = spill_threshold
        self._fs = fs if fs is not None else FileSystem()
        self._lock = SpoolLock(self.layout)
        self._committer = Committer(
            self.layout,
            self._fs,
            self._lock,
            self._fs.has_syncfs if use_syncfs is None else use_syncfs,
        )
        self._commits = Batcher(run_in_thread, self._committer.commit_batch)
        self._finishes = Batcher(run_in_thread, self._committer.finish_batch)
        self._updates = Batcher(run_in_thread, self._committer.update_batch)
        self._entry_locks: dict[str, defer.DeferredLock] = {}
        self._recent = RecentEntries() if remember else RecentEntries(max_entries=0)

    @property
    def use_syncfs(self) -> bool:
        return self._committer.use_syncfs

    # -- owning the directory (blocking, for start-up) -------------------------

    def lock(self) -> None:
        """
        Take the spool's lock and write our pid in it.  Blocking I/O: call
        it at start-up.

        @raise relay.spool.lock.SpoolLocked: if another process holds it.
        """
        self._lock.acquire()

    def unlock(self) -> None:
        """
        Release the lock taken by L{lock}.
        """
        self._lock.release()

    def lock_fileno(self) -> int | None:
        """
        The descriptor of the held lock, for the receivers to inherit
        (L{relay.spool.lock}); C{None} when not held.
        """
        return self._lock.fileno()

    def recover(self) -> Deferred[int]:
        """
        At start-up, before deliveries and receivers begin: remove what no
        acknowledged entry needs and is quick to find (what the previous
        process left in C{tmp/}), logging each.  The message files that no
        metadata refers to are left to L{sweep}, which may take long in a
        large spool and need not be waited for.

        @return: a L{Deferred} firing with how many files were removed.
        """
        return self._run(self._committer.recover).addCallback(_report)

    def sweep(self, before: float | None = None) -> Deferred[int]:
        """
        Remove the message files that no metadata refers to, made before
        C{before} (by default: before this relay took the lock, so that
        what a commit under way made stays), logging each (see
        L{Committer.sweep}).

        @return: a L{Deferred} firing with how many files were removed.
        """
        if before is None:
            taken_at = self._lock.taken_at
            before = taken_at if taken_at is not None else time.time() - SpoolLock.CLOCK_MARGIN
        return self._run(self._committer.sweep, before).addCallback(_report)

    def remember(self, entry: SpoolEntry, message: Message | None) -> None:
        """
        Hold C{entry} (and C{message}, when it is in memory and small
        enough) as if this spool had just written it: another process
        (a receiver) did, and handed both over.
        """
        self._recent.remember(entry, message)

    # -- ISpool ----------------------------------------------------------------

    def receive(self, message_id: str) -> DiskMessageWriter:
        if not is_safe_id(message_id):
            raise ValueError(f"bad message id {message_id!r}")
        return DiskMessageWriter(self.layout, self._fs, self._run, message_id, self.spill_threshold)

    def discard(self, message: Message) -> Deferred[None]:
        if message.path is None or not self.layout.is_tmp(message.path):
            return defer.succeed(None)
        d = self._run(unlink_if_present, self._fs, message.path)
        d.addCallback(lambda _: None)
        return d

    def enqueue(
        self, envelopes: Iterable[EnvelopeWithNextHop], received_from: str | None = None
    ) -> Deferred[list[SpoolEntry]]:
        return self._commit(envelopes, ACTIVE, None, received_from)

    def quarantine(
        self,
        envelopes: Iterable[EnvelopeWithNextHop],
        reason: str,
        received_from: str | None = None,
    ) -> Deferred[list[SpoolEntry]]:
        return self._commit(envelopes, QUARANTINE, reason, received_from)

    def entries(self, queue: str) -> Deferred[list[SpoolEntry]]:
        try:
            self.layout.queue_dir(queue)
        except ValueError:
            return defer.fail()

        def report(result: QueueListing) -> list[SpoolEntry]:
            entries, errors = result
            for path, error in errors:
                log.error("unreadable spool entry {path}: {error}", path=path, error=repr(error))
            return entries

        return self._run(self._entries_sync, queue).addCallback(report)

    def count(self, queue: str) -> Deferred[QueueCount]:
        try:
            self.layout.queue_dir(queue)
        except ValueError:
            return defer.fail()
        return self._run(count_queue, self.layout, queue)

    def due(self, before: float, limit: int) -> Deferred[list[tuple[float, str]]]:
        return self._run(due_entries, self.layout, before, limit)

    def stream(
        self,
        queue: str,
        select: EntrySelector | None = None,
        parse: bool = True,
        page_size: int = PAGE_SIZE,
    ) -> DiskEntryStream:
        return DiskEntryStream(
            self._run, QueueScanner(self.layout, queue, select, parse, page_size)
        )

    def message_chunk(self, entry_id: str, offset: int, size: int) -> Deferred[bytes]:
        message = self._recent.message(entry_id)
        if message is not None and message.data is not None:
            return defer.succeed(bytes(message.data[offset : offset + size]))
        return self._run(read_message_chunk, self.layout, entry_id, offset, size)

    def unchanged_since(
        self, queue: str, before: float, limit: int
    ) -> Deferred[list[tuple[float, str]]]:
        try:
            self.layout.queue_dir(queue)
        except ValueError:
            return defer.fail()
        return self._run(oldest_by_mtime, self.layout, queue, before, limit)

    def get(self, entry_id: str) -> Deferred[SpoolEntry]:
        entry = self._recent.entry(entry_id)
        if entry is not None:
            return defer.succeed(entry)
        return self._run(find_entry, self.layout, entry_id)

    def message(self, entry_id: str) -> Deferred[Message]:
        message = self._recent.message(entry_id)
        if message is not None:
            return defer.succeed(message)
        return self._run(read_message, self.layout, entry_id, self.spill_threshold)

    def update(self, entry: SpoolEntry) -> Deferred[SpoolEntry]:
        def submit() -> Deferred[SpoolEntry]:
            return self._updates.submit(Update(entry=entry))

        return self._recent.changing(entry.id, self._serialized(entry.id, submit))

    def move(self, entry_id: str, queue: str) -> Deferred[SpoolEntry]:
        try:
            self.layout.queue_dir(queue)
        except ValueError:
            return defer.fail()
        return self._recent.changing(
            entry_id,
            self._serialized(entry_id, self._run, self._committer.move, entry_id, queue),
        )

    def finish(self, entry_id: str) -> Deferred[None]:
        def submit() -> Deferred[None]:
            return self._finishes.submit(Finish(entry_id=entry_id))

        return self._recent.changing(entry_id, self._serialized(entry_id, submit))

    # -- helpers (reactor side) ------------------------------------------------

    def _commit(
        self,
        envelopes: Iterable[EnvelopeWithNextHop],
        queue: str,
        reason: str | None,
        received_from: str | None,
    ) -> Deferred[list[SpoolEntry]]:
        job = Commit(
            envelopes=list(envelopes),
            queue=queue,
            reason=reason,
            received_from=received_from,
            now=self.clock.seconds(),
        )
        return self._commits.submit(job).addCallback(self._committed, job.envelopes)

    def _committed(
        self, entries: list[SpoolEntry], envelopes: list[EnvelopeWithNextHop]
    ) -> list[SpoolEntry]:
        for entry, e in zip(entries, envelopes, strict=True):
            self._recent.remember(entry, e.envelope.message)
        return entries

    def _entries_sync(self, queue: str) -> QueueListing:
        self.layout.make_directories()
        return read_queue(self.layout, queue)

    def _serialized(
        self, entry_id: str, f: Callable[..., Deferred[Any]], *args: Any
    ) -> Deferred[Any]:
        """
        Run C{f(*args)} once earlier changes to the same entry are done, so
        that e.g. an update and a move of one entry cannot interleave in
        the thread pool.
        """
        lock = self._entry_locks.get(entry_id)
        if lock is None:
            lock = self._entry_locks[entry_id] = defer.DeferredLock()

        def release(result: object) -> object:
            if not lock.locked and not lock.waiting:
                self._entry_locks.pop(entry_id, None)
            return result

        return lock.run(f, *args).addBoth(release)


@implementer(IEntryStream)
class DiskEntryStream:
    """
    The L{IEntryStream} of a L{DiskSpool}: a L{QueueScanner} whose pages
    are read in the thread pool, one at a time (the scanner's open
    directory is never used by two threads at once).
    """

    def __init__(self, run_in_thread: Callable[..., Deferred[Any]], scanner: QueueScanner) -> None:
        self._run = run_in_thread
        self._scanner = scanner
        self._lock = defer.DeferredLock()

    def next_page(self) -> Deferred[EntryPage]:
        d: Deferred[EntryPage] = self._lock.run(self._run, self._scanner.next_page)
        return d

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self._lock.run(self._run, self._scanner.close)
        return d


def _report(removed: list[str]) -> int:
    for path in removed:
        log.info("spool recovery: removed unacknowledged {path}", path=path)
    return len(removed)
