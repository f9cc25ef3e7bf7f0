"""
What comes due soon, in memory; everything else waits on disk.

Postfix's queue manager keeps at most 20,000 messages in its active queue
and leaves the rest in the deferred queue, which it scans from time to
time.  L{DueQueue} does the same without a second queue directory: the
spool keeps each waiting entry's next attempt time as the modification
time of its metadata file, so that L{ISpool.due<relay.interfaces.ISpool>}
lists what comes due from the directory alone, opening no entry.  Held in
memory are only the entries due within L{WINDOW} seconds (at most
L{BACKLOG} of them, for a backlog that comes due at once): a million
deferred entries cost the relay nothing until their time comes, and a
scan every L{SCAN_INTERVAL} seconds finds them.

The entries the relay itself schedules (new mail, a deferral to within the
window, C{send-now}) go straight into memory; one whose next attempt is
farther off is left to a later scan.  The due times held are hints, like
the mtimes they come from: the scheduler reads each entry when its turn
comes, and an entry that says it is not due yet goes back with its own
time.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: seconds ahead: entries due sooner are held in memory
WINDOW = 300.0
#: seconds between scans of the active queue (less than L{WINDOW}, so that
#: every entry is found before it is due)
SCAN_INTERVAL = 120.0
#: the most entries held at once: the rest of a backlog that comes due at
#: once waits on disk for the next scan
BACKLOG = 20_000

log = Logger()


class DueQueue:
    """
    The entries due within the window, soonest first, and the scans that
    find them on disk.

    @param spool: the L{ISpool}, asked for C{due(before, limit)}.
    @param clock: when things are due.
    @param on_due: called (with no arguments) when entries have come due:
        the scheduler then takes them with L{pop_due} while it has room.
    @param busy: whether an entry is being delivered (a scan finds those
        too, until they are settled or deferred).
    """

    def __init__(
        self,
        spool: Any,
        clock: IReactorTime,
        on_due: Callable[[], object],
        busy: Callable[[str], bool] = lambda entry_id: False,
        window: float = WINDOW,
        scan_interval: float = SCAN_INTERVAL,
        backlog: int = BACKLOG,
    ) -> None:
        self._spool = spool
        self._clock = clock
        self._on_due = on_due
        self._busy = busy
        self.window = window
        self.scan_interval = scan_interval
        self.backlog = backlog
        # (due time, id); an item is live when _at[id] is its time, else
        # stale (the entry was rescheduled or forgotten) and skipped
        self._heap: list[tuple[float, str]] = []
        self._at: dict[str, float] = {}
        self._timer: IDelayedCall | None = None
        self._loop: LoopingCall | None = None
        self._scanning: Deferred[None] | None = None
        # the last scan found as many as it could take: there is more
        self._more_on_disk = False
        self.running = False

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._at

    # -- the life of the queue -------------------------------------------

    def start(self) -> None:
        """
        Scan now, and every L{SCAN_INTERVAL} seconds.
        """
        self.running = True
        loop = self._loop = LoopingCall(self.scan)
        loop.clock = self._clock
        loop.start(self.scan_interval, now=True).addErrback(
            lambda f: log.failure("The scans of the active queue stopped", f)
        )

    def stop(self) -> None:
        """
        Forget everything held (it is all on disk) and stop scanning.
        """
        self.running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._heap = []
        self._at = {}

    # -- what the scheduler says -----------------------------------------

    def push(self, entry_id: str, at: float) -> None:
        """
        C{entry_id} is next due at C{at}: held if that is within the
        window and there is room (at most C{backlog} entries), else
        forgotten until a scan finds it.
        """
        if not self.running:
            return
        if at > self._clock.seconds() + self.window:
            self._at.pop(entry_id, None)
            return
        if self._at.get(entry_id) == at:
            return
        if entry_id not in self._at and len(self._at) >= self.backlog:
            # Full (C{send --all} on a million entries pushes each as it
            # rewrites it, faster than they are delivered): the entry waits
            # on disk, its mtime saying it is due, for the scan that
            # L{pop_due} starts once half the room is free.  As Postfix's
            # full active queue leaves new mail in incoming.
            self._more_on_disk = True
            return
        self._at[entry_id] = at
        heapq.heappush(self._heap, (at, entry_id))
        self._compact()
        self._arm()

    def remove(self, entry_id: str) -> None:
        """
        Forget C{entry_id} (frozen, removed): it is not handed out.
        """
        self._at.pop(entry_id, None)

    def pop_due(self) -> str | None:
        """
        The next entry that is due, or C{None}.
        """
        now = self._clock.seconds()
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, entry_id = heapq.heappop(heap)
            if self._at.get(entry_id) != at:
                continue  # stale
            del self._at[entry_id]
            if self._more_on_disk and len(self._at) < self.backlog // 2:
                # On a later turn: by then the entry handed out now is
                # being delivered (and left out), not found again.
                self._more_on_disk = False
                self._clock.callLater(0, self.scan)
            return entry_id
        self._arm()
        return None

    # -- scans -------------------------------------------------------------

    def scan(self) -> Deferred[None]:
        """
        Take from the spool what comes due within the window, up to the
        backlog (entries held or being delivered are left out).
        """
        if self._scanning is not None:
            return self._scanning
        room = self.backlog - len(self._at)
        if not self.running or room <= 0:
            self._more_on_disk = room <= 0
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        horizon = self._clock.seconds() + self.window
        # Asked for more than there is room for: what is held or being
        # delivered comes back too, and is skipped.
        limit = room + len(self._at)
        found: Deferred[list[tuple[float, str]]] = self._spool.due(horizon, limit)

        def take(due: list[tuple[float, str]]) -> None:
            self._more_on_disk = len(due) >= limit
            for at, entry_id in due:
                if entry_id in self._at or self._busy(entry_id):
                    continue
                self.push(entry_id, at)

        def failed(failure: Any) -> None:
            log.failure("Scanning the active queue failed", failure)

        def done(result: object) -> None:
            self._scanning = None
            # Entries that were due before the scan (a backlog at
            # start-up) are handed out now.
            self._arm()

        scanning = found.addCallbacks(take, failed)
        scanning.addBoth(done)
        if not scanning.called:
            self._scanning = scanning
        return scanning

    # -- the timer ---------------------------------------------------------

    def _arm(self) -> None:
        """
        One timer, for the soonest live entry (none while entries that are
        already due wait for the scheduler to have room).
        """
        heap = self._heap
        while heap and self._at.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        if not heap or not self.running:
            return
        delay = max(0.0, heap[0][0] - self._clock.seconds())
        timer = self._timer
        if timer is not None and timer.active():
            if abs(timer.getTime() - (self._clock.seconds() + delay)) < 1e-6:
                return
            timer.cancel()
        self._timer = self._clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.running:
            self._on_due()

    def _compact(self) -> None:
        """
        Drop stale items when they are most of the heap (entries
        rescheduled again and again within the window).
        """
        if len(self._heap) > 2 * len(self._at) + 1024:
            self._heap = [(at, entry_id) for entry_id, at in self._at.items()]
            heapq.heapify(self._heap)
