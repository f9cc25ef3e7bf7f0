"""
Reading a spool directory: entries and messages, through its
L{SpoolLayout} and the L{codec<relay.spool.codec>}.  Nothing here writes,
so that C{relayctl} reads a spool no relay runs on with the same code as
the disk spool's thread side.  Everything here blocks.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import Iterator, Protocol

from relay.model.entry import ACTIVE, QUEUES, QueueCount, SpoolEntry, id_time
from relay.model.message import MAX_HEADER_BYTES, Message, header_section, parse_header_block
from relay.spool.codec import decode_entry
from relay.spool.layout import METADATA, SpoolLayout, is_safe_id

#: what makes a metadata file unreadable (besides its absence)
UNREADABLE = (OSError, ValueError, KeyError, TypeError)

#: a queue's entries, and C{(path, error)} of its unreadable files
QueueListing = tuple[list[SpoolEntry], list[tuple[str, Exception]]]


def read_entry(layout: SpoolLayout, queue: str, entry_id: str) -> SpoolEntry:
    """
    The entry whose metadata is in C{queue}.

    @raise FileNotFoundError: if it is not there.
    @raise ValueError: (or C{KeyError}, C{TypeError}) if the file is not
        an entry this code can read.
    """
    with open(layout.metadata_path(queue, entry_id), "rb") as f:
        return decode_entry(f.read(), queue)


def read_queue(layout: SpoolLayout, queue: str) -> QueueListing:
    """
    The entries of C{queue}, oldest first, and C{(path, error)} of each
    metadata file that could not be read (left out).  A queue directory
    that does not exist is an empty queue.

    @raise ValueError: if there is no such queue.
    """
    try:
        ids = layout.entry_ids(queue)
    except FileNotFoundError:
        return [], []
    entries = []
    errors: list[tuple[str, Exception]] = []
    for entry_id in ids:
        try:
            entries.append(read_entry(layout, queue, entry_id))
        except FileNotFoundError:
            continue  # moved or finished while we looked
        except UNREADABLE as e:
            errors.append((layout.metadata_path(queue, entry_id), e))
    entries.sort(key=lambda e: (e.created_at, e.id))
    return entries, errors


def count_queue(layout: SpoolLayout, queue: str) -> QueueCount:
    """
    How many entries C{queue} holds and when the oldest was created, from
    the names of its metadata files alone: nothing is opened or parsed, so
    that counting a million entries costs a directory listing.  The oldest
    creation time is what the entry ids say (L{relay.model.entry.id_time});
    entries whose ids do not say it (a plugin's own envelope ids) are
    counted but give no age.

    @raise ValueError: if there is no such queue.
    """
    directory = layout.queue_dir(queue)
    count = 0
    oldest: str | None = None
    try:
        with os.scandir(directory) as names:
            for item in names:
                name = item.name
                if not name.endswith(".json"):
                    continue
                count += 1
                if oldest is None or name < oldest:
                    oldest = name
    except FileNotFoundError:
        return QueueCount(0, None)
    # Ids sort by their time, so the smallest name is the oldest id; one
    # whose id says no time is no evidence of age.
    return QueueCount(count, id_time(oldest[: -len(".json")]) if oldest else None)


def due_entries(layout: SpoolLayout, before: float, limit: int) -> list[tuple[float, str]]:
    """
    The active entries due before C{before}, soonest first, at most
    C{limit} of them: C{(due time, entry id)} from the names and the
    modification times of the metadata files (the spool sets a waiting
    entry's mtime to its next attempt time), so that finding what comes
    due among a million entries opens none of them and keeps only
    C{limit} in memory.  The time is a hint: the entry itself says when it
    is due, and the scheduler checks when it reads it.
    """
    return oldest_by_mtime(layout, ACTIVE, before, limit)


def oldest_by_mtime(
    layout: SpoolLayout, queue: str, before: float, limit: int
) -> list[tuple[float, str]]:
    """
    The entries of C{queue} whose metadata files were last changed before
    C{before} (for the active queue: whose next attempt is due), oldest
    first, at most C{limit}: C{(mtime, entry id)}, from the directory
    alone, keeping only C{limit} in memory.
    """
    directory = layout.queue_dir(queue)
    found: list[tuple[float, str]] = []  # a max-heap of the soonest, negated
    try:
        with os.scandir(directory) as names:
            for item in names:
                name = item.name
                if not name.endswith(".json"):
                    continue
                try:
                    at = item.stat().st_mtime
                except FileNotFoundError:
                    continue  # delivered or moved while we looked
                if at >= before:
                    continue
                if len(found) < limit:
                    heapq.heappush(found, (-at, name))
                elif -found[0][0] > at:
                    heapq.heapreplace(found, (-at, name))
    except FileNotFoundError:
        return []
    return sorted((-at, name[: -len(".json")]) for at, name in found)


def find_queue(layout: SpoolLayout, entry_id: str) -> str:
    """
    The queue C{entry_id} is in.

    @raise KeyError: if there is no such entry.
    """
    if not is_safe_id(entry_id):
        raise KeyError(entry_id)
    for _ in range(2):  # a second look, in case a move ran in between
        for queue in QUEUES:
            if os.path.exists(layout.metadata_path(queue, entry_id)):
                return queue
    raise KeyError(entry_id)


def read_message(layout: SpoolLayout, entry_id: str, in_memory_up_to: int) -> Message:
    """
    The message of entry C{entry_id}: read whole when it is at most
    C{in_memory_up_to} bytes (so that sending it needs no more trips to the
    thread pool), else its header section only, with the file's path.

    @raise KeyError: if there is no such entry, or its message is gone.
    """
    find_queue(layout, entry_id)
    path = layout.message_path(entry_id)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise KeyError(entry_id) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size <= in_memory_up_to:
            data = f.read()
            return Message(parse_header_block(header_section(data)), len(data), data=data)
        head = f.read(MAX_HEADER_BYTES)
    return Message(parse_header_block(header_section(head)), size, path=path)


def find_entry(layout: SpoolLayout, entry_id: str) -> SpoolEntry:
    """
    The entry C{entry_id}, in whatever queue it is.

    @raise KeyError: if there is no such entry.
    """
    return read_entry(layout, find_queue(layout, entry_id), entry_id)


# -- streaming a queue ----------------------------------------------------------

#: entries (or ids) per page of a L{QueueScanner}, by default
PAGE_SIZE = 200
#: names looked at, at most, for one page: a filter that matches little
#: still hands back (an empty page) within a bounded time
SCAN_LIMIT = 5000


class EntrySelector(Protocol):
    """
    Which entries a listing keeps (L{relay.control.filters.EntryFilter} is
    one).  Called in the thread that reads the spool: it must be pure.
    """

    def admits_id(self, entry_id: str) -> bool | None:
        """
        What the id alone says: C{False} (left out, its file is never
        opened), C{True} (kept, whatever the entry holds), or C{None} (the
        entry must be read to tell: L{admits} decides).
        """

    def admits(self, entry: SpoolEntry) -> bool:
        """
        Is C{entry} kept?  (Asked only when L{admits_id} said C{None}.)
        """


@dataclass(frozen=True)
class EntryPage:
    """
    One page of a queue's listing.

    @ivar ids: the ids of the entries kept, in creation order (ids sort
        by their creation time).
    @ivar entries: the entries themselves, in the same order, when the
        listing reads them (else empty).
    @ivar unreadable: C{(path, error)} of metadata files that could not be
        read (left out).
    @ivar done: whether this is the last page.
    """

    ids: tuple[str, ...]
    entries: tuple[SpoolEntry, ...]
    unreadable: tuple[tuple[str, str], ...]
    done: bool


class QueueScanner:
    """
    A queue's entries page by page, in the order the directory gives its
    names (no sort of the whole queue: a million entries cost one open
    directory and one page in memory), each page in creation order.
    Blocking: the disk spool runs each L{next_page} in its thread pool;
    C{relayctl} calls it directly on a spool no relay runs on.

    @param select: which entries to keep; all when C{None}.
    @param parse: whether pages carry the entries; when C{False} only ids
        are handed back, and a file is opened only when C{select} needs
        it to decide.
    @param page_size: ids kept per page, at most.
    @param scan_limit: names looked at per page, at most.
    """

    def __init__(
        self,
        layout: SpoolLayout,
        queue: str,
        select: EntrySelector | None = None,
        parse: bool = True,
        page_size: int = PAGE_SIZE,
        scan_limit: int = SCAN_LIMIT,
    ) -> None:
        self.layout = layout
        self.queue = queue
        self.directory = layout.queue_dir(queue)
        self.select = select
        self.parse = parse
        self.page_size = max(1, page_size)
        self.scan_limit = max(self.page_size, scan_limit)
        self._names: Iterator[os.DirEntry[str]] | None = None
        self._opened = False
        self.done = False

    def next_page(self) -> EntryPage:
        """
        The next page (with C{done} set on the last; an empty page that is
        not the last means the names looked at matched nothing).
        """
        if self.done:
            return EntryPage((), (), (), True)
        if not self._opened:
            self._opened = True
            try:
                self._names = os.scandir(self.directory)
            except FileNotFoundError:
                self.done = True
                return EntryPage((), (), (), True)
        assert self._names is not None
        kept: list[tuple[str, SpoolEntry | None]] = []
        unreadable: list[tuple[str, str]] = []
        looked = 0
        for item in self._names:
            name = item.name
            if not name.endswith(METADATA):
                continue
            looked += 1
            entry_id = name[: -len(METADATA)]
            self._consider(entry_id, kept, unreadable)
            if len(kept) >= self.page_size or looked >= self.scan_limit:
                break
        else:
            self.close()
        kept.sort(key=_creation_order)
        return EntryPage(
            ids=tuple(entry_id for entry_id, _ in kept),
            entries=tuple(entry for _, entry in kept if entry is not None) if self.parse else (),
            unreadable=tuple(unreadable),
            done=self.done,
        )

    def _consider(
        self,
        entry_id: str,
        kept: list[tuple[str, SpoolEntry | None]],
        unreadable: list[tuple[str, str]],
    ) -> None:
        verdict = self.select.admits_id(entry_id) if self.select is not None else True
        if verdict is False:
            return
        if verdict is True and not self.parse:
            kept.append((entry_id, None))
            return
        try:
            entry = read_entry(self.layout, self.queue, entry_id)
        except FileNotFoundError:
            return  # moved or finished while we looked
        except UNREADABLE as e:
            unreadable.append((self.layout.metadata_path(self.queue, entry_id), str(e)))
            return
        if verdict is None and self.select is not None and not self.select.admits(entry):
            return
        kept.append((entry_id, entry if self.parse else None))

    def close(self) -> None:
        """
        Let go of the directory; later pages are empty and last.
        """
        self.done = True
        names, self._names = self._names, None
        if names is not None:
            names.close()  # type: ignore[attr-defined]


def _creation_order(item: tuple[str, SpoolEntry | None]) -> tuple[float, str]:
    entry_id, entry = item
    if entry is not None:
        return (entry.created_at, entry_id)
    at = id_time(entry_id)
    return (at if at is not None else 0.0, entry_id)


def read_message_chunk(layout: SpoolLayout, entry_id: str, offset: int, size: int) -> bytes:
    """
    Up to C{size} bytes of entry C{entry_id}'s message from C{offset}
    (C{b""} past its end), the file opened and closed for each chunk so
    that a reader that stops half-way holds nothing open.

    @raise KeyError: if there is no such entry, or its message is gone.
    """
    find_queue(layout, entry_id)
    try:
        f = open(layout.message_path(entry_id), "rb")
    except FileNotFoundError:
        raise KeyError(entry_id) from None
    with f:
        f.seek(offset)
        return f.read(size)
