"""
The disk spool's read cache: the entries it wrote lately, so that
delivering a fresh entry needs no trip to the disk to read back what was
just written.  Reactor side only.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred

from relay.model.entry import SpoolEntry
from relay.model.message import Message

#: entries remembered at most, and the most message bytes kept with them
RECENT_ENTRIES = 4096
RECENT_BYTES = 32 * 1024 * 1024


class RecentEntries:
    """
    Entries as the spool last wrote them, oldest forgotten first, each with
    its message when that is in memory and fits in C{max_bytes} (at most
    C{max_entries} entries and C{max_bytes} of messages: a number known in
    advance, whatever the load).
    """

    def __init__(self, max_entries: int = RECENT_ENTRIES, max_bytes: int = RECENT_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._recent: OrderedDict[str, tuple[SpoolEntry, Message | None]] = OrderedDict()
        self._bytes = 0
        # changes on their way to disk, by entry id: the number of the last
        # one asked for, and whether (and with which message) the entry was
        # held before the first of them
        self._changes: dict[str, tuple[int, bool, Message | None]] = {}

    def remember(self, entry: SpoolEntry, message: Message | None) -> None:
        """
        Hold C{entry}, and C{message} if it is in memory and small enough.
        """
        if self.max_entries <= 0:
            return
        self.forget(entry.id)
        if message is not None and (
            message.data is None or self._bytes + message.size > self.max_bytes
        ):
            message = None
        self._recent[entry.id] = (entry, message)
        if message is not None:
            self._bytes += message.size
        while len(self._recent) > self.max_entries:
            self.forget(next(iter(self._recent)))

    def forget(self, entry_id: str) -> None:
        _, message = self._recent.pop(entry_id, (None, None))
        if message is not None:
            self._bytes -= message.size

    def entry(self, entry_id: str) -> SpoolEntry | None:
        recent = self._recent.get(entry_id)
        return recent[0] if recent is not None else None

    def message(self, entry_id: str) -> Message | None:
        recent = self._recent.get(entry_id)
        return recent[1] if recent is not None else None

    def changing(self, entry_id: str, d: Deferred[Any]) -> Deferred[Any]:
        """
        Keep what is held of C{entry_id} true while C{d} changes it on
        disk: forgotten until then, and after a failure.  When C{d} fires
        with the new L{SpoolEntry}, that is held (with the message held
        before), unless another change of the entry was asked for
        meanwhile: the last change asked for is the one whose result is
        held, since it is the last to reach the disk.
        """
        held = self._recent.get(entry_id)
        pending = self._changes.get(entry_id)
        if held is not None:
            message: Message | None = held[1]
            known = True
        elif pending is not None:
            # an earlier change, still running, carries what was held
            _, known, message = pending
        else:
            known, message = False, None
        generation = pending[0] + 1 if pending is not None else 0
        self._changes[entry_id] = (generation, known, message)
        self.forget(entry_id)

        def changed(result: object) -> object:
            current = self._changes.get(entry_id)
            if current is None or current[0] != generation:
                return result  # a later change will say
            del self._changes[entry_id]
            if known and isinstance(result, SpoolEntry):
                self.remember(result, message)
            return result

        return d.addBoth(changed)
