"""
Tests for the spool's streaming reads: L{ISpool.stream} (an
L{IEntryStream} of pages) and L{ISpool.message_chunk}, the same contract
for the disk, memory and observed spools; and L{QueueScanner}, the disk
side that C{relayctl} also reads a spool with.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relay.interfaces import IEntryStream
from relay.model.entry import ACTIVE, FROZEN, SpoolEntry, id_time, new_id
from relay.model.message import Message
from relay.spool.disk import DiskSpool
from relay.spool.layout import SpoolLayout
from relay.spool.observed import ObservedSpool
from relay.spool.reader import EntryPage, QueueScanner
from relay.testing import MemorySpool
from tests.test_spool import DATA, make_envelope, synchronous

NOW = 1_700_000_000.0


class OnlyOld:
    """
    An L{EntrySelector} keeping entries whose ids say they are older than
    C{before}, and counting what it was asked.
    """

    def __init__(self, before: float, sender: str | None = None) -> None:
        self.before = before
        self.sender = sender
        self.asked: list[str] = []

    def admits_id(self, entry_id: str) -> bool | None:
        at = id_time(entry_id)
        if at is not None and at >= self.before:
            return False
        return None if self.sender is not None else True

    def admits(self, entry: SpoolEntry) -> bool:
        self.asked.append(entry.id)
        return str(entry.sender) == self.sender


class Nobody:
    """
    A selector that admits nothing.
    """

    def admits_id(self, entry_id: str) -> bool | None:
        return None

    def admits(self, entry: SpoolEntry) -> bool:
        return False


class StreamContractMixin:
    """
    What every spool's L{ISpool.stream} and L{ISpool.message_chunk} do.
    """

    clock: Clock
    successResultOf: Callable[..., Any]
    failureResultOf: Callable[..., Any]
    assertEqual: Callable[..., None]
    assertTrue: Callable[..., None]
    assertRaises: Callable[..., Any]
    assertLessEqual: Callable[..., None]

    def make_spool(self) -> Any:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.spool = self.make_spool()
        self.made: list[SpoolEntry] = self.successResultOf(
            self.spool.enqueue([make_envelope(new_id(NOW - 1000 + i)) for i in range(25)])
        )

    def read_all(self, stream: Any) -> list[EntryPage]:
        pages = []
        while True:
            page = self.successResultOf(stream.next_page())
            pages.append(page)
            if page.done:
                return pages

    def test_interface(self) -> None:
        """
        A stream provides L{IEntryStream}.
        """
        verifyObject(IEntryStream, self.spool.stream(ACTIVE))

    def test_pages(self) -> None:
        """
        Every entry comes once, in pages of at most C{page_size}, each in
        creation order; the last page says it is the last, and pages after
        it are empty and last too.
        """
        stream = self.spool.stream(ACTIVE, page_size=10)
        pages = self.read_all(stream)
        self.assertEqual([p.done for p in pages][-1], True)
        self.assertTrue(all(len(p.ids) <= 10 for p in pages))
        ids = [i for p in pages for i in p.ids]
        self.assertEqual(sorted(ids), sorted(e.id for e in self.made))
        for page in pages:
            self.assertEqual(list(page.ids), sorted(page.ids))
            self.assertEqual([e.id for e in page.entries], list(page.ids))
        self.assertEqual(self.successResultOf(stream.next_page()), EntryPage((), (), (), True))
        self.successResultOf(stream.close())

    def test_select(self) -> None:
        """
        Only what the selector admits is kept; an entry the id rules out is
        never shown to C{admits}.
        """
        select = OnlyOld(NOW - 1000 + 10, sender="s@example.org")
        pages = self.read_all(self.spool.stream(ACTIVE, select))
        ids = [i for p in pages for i in p.ids]
        self.assertEqual(sorted(ids), sorted(e.id for e in self.made[:10]))
        self.assertEqual(sorted(select.asked), sorted(ids))
        self.assertEqual(self.read_all(self.spool.stream(ACTIVE, Nobody()))[-1].ids, ())

    def test_ids_only(self) -> None:
        """
        Without C{parse} the pages carry ids only.
        """
        pages = self.read_all(self.spool.stream(ACTIVE, OnlyOld(NOW), parse=False))
        self.assertEqual(sum(len(p.ids) for p in pages), 25)
        self.assertEqual([p.entries for p in pages], [()] * len(pages))

    def test_other_queue_and_close(self) -> None:
        """
        A stream reads only its queue; one closed early hands back no more.
        """
        self.successResultOf(self.spool.move(self.made[0].id, FROZEN))
        [page] = self.read_all(self.spool.stream(FROZEN))
        self.assertEqual(page.ids, (self.made[0].id,))
        stream = self.spool.stream(ACTIVE, page_size=5)
        first = self.successResultOf(stream.next_page())
        self.assertEqual(len(first.ids), 5)
        self.successResultOf(stream.close())
        self.assertEqual(self.successResultOf(stream.next_page()).ids, ())
        self.assertRaises(ValueError, self.spool.stream, "nowhere")

    def test_message_chunk(self) -> None:
        """
        A message is read in chunks from any offset; past its end is
        C{b""}; an unknown entry is a L{KeyError}.
        """
        entry_id = self.made[3].id
        chunks = [self.successResultOf(self.spool.message_chunk(entry_id, o, 10))
                  for o in range(0, len(DATA) + 10, 10)]  # fmt: skip
        self.assertEqual(b"".join(chunks), DATA)
        self.assertEqual(chunks[-1], b"")
        self.failureResultOf(self.spool.message_chunk("nosuch", 0, 10), KeyError)


class MemoryStreamTests(StreamContractMixin, SynchronousTestCase):
    def make_spool(self) -> Any:
        return MemorySpool(self.clock)


class Observer:
    def spooled(self, entries: Any, envelopes: Any) -> None:
        pass

    def quarantined(self, entries: Any, reason: str) -> None:
        pass


class ObservedStreamTests(StreamContractMixin, SynchronousTestCase):
    def make_spool(self) -> Any:
        return ObservedSpool(MemorySpool(self.clock), Observer())


class DiskStreamTests(StreamContractMixin, SynchronousTestCase):
    def make_spool(self, run: Callable[..., Deferred[Any]] = synchronous) -> Any:
        self.root = os.path.abspath(self.mktemp())
        return DiskSpool(os.path.join(self.root, "spool"), run, self.clock)

    def junk(self, name: str) -> str:
        path = os.path.join(self.root, "spool", "active", name)
        with open(path, "w") as f:
            f.write("{not json")
        return path

    def test_unreadable(self) -> None:
        """
        A metadata file that cannot be read is reported with the page and
        left out; one that the selector rules out by its id is never
        opened, so it is not reported.
        """
        bad = self.junk(new_id(NOW + 5000) + "-0.json")
        pages = self.read_all(self.spool.stream(ACTIVE))
        self.assertEqual([path for p in pages for path, _ in p.unreadable], [bad])
        self.assertEqual(sum(len(p.ids) for p in pages), 25)
        pages = self.read_all(self.spool.stream(ACTIVE, OnlyOld(NOW - 2000)))
        self.assertEqual([(p.ids, p.unreadable) for p in pages], [((), ())])
        os.unlink(bad)

    def test_recent_message_chunk(self) -> None:
        """
        A message the spool holds in memory (just written) is read from
        there, in chunks all the same.
        """
        [entry] = self.successResultOf(
            self.spool.enqueue([make_envelope("mem", message=Message.from_bytes(DATA))])
        )
        self.assertEqual(self.successResultOf(self.spool.message_chunk(entry.id, 5, 4)), DATA[5:9])

    def test_in_the_thread_pool(self) -> None:
        """
        Each page is read in the thread runner, one at a time: a page asked
        for while one is being read waits for it.
        """
        jobs: list[tuple[Callable[..., Any], Deferred[Any]]] = []

        def queued(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            jobs.append((lambda: f(*args), d))
            return d

        spool = DiskSpool(os.path.join(self.root, "spool"), queued, self.clock)
        stream = spool.stream(ACTIVE, page_size=10)
        first, second = stream.next_page(), stream.next_page()
        self.assertEqual(len(jobs), 1)
        job, d = jobs.pop()
        d.callback(job())
        self.assertEqual(len(self.successResultOf(first).ids), 10)
        self.assertEqual(len(jobs), 1)
        job, d = jobs.pop()
        d.callback(job())
        self.assertEqual(len(self.successResultOf(second).ids), 10)


class ScannerTests(SynchronousTestCase):
    """
    L{QueueScanner} on its own: the blocking reader.
    """

    def test_missing_directory(self) -> None:
        """
        A queue whose directory does not exist is one empty, last page.
        """
        scanner = QueueScanner(SpoolLayout(self.mktemp()), ACTIVE)
        self.assertEqual(scanner.next_page(), EntryPage((), (), (), True))

    def test_scan_limit(self) -> None:
        """
        A page ends after C{scan_limit} names looked at, even when few of
        them were kept, so that a rare match still answers soon.
        """
        clock = Clock()
        clock.advance(NOW)
        root = self.mktemp()
        spool = DiskSpool(root, synchronous, clock)
        self.successResultOf(spool.enqueue([make_envelope(f"e{i:03}") for i in range(30)]))
        scanner = QueueScanner(SpoolLayout(root), ACTIVE, Nobody(), page_size=1, scan_limit=10)
        pages = []
        while not scanner.done:
            pages.append(scanner.next_page())
        self.assertEqual([(len(p.ids), p.done) for p in pages],
                         [(0, False), (0, False), (0, False), (0, True)])  # fmt: skip
