"""
The live event stream of a relay: spool and delivery happenings, fanned out
to subscribers (the control endpoint's C{Subscribe} command).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

KINDS = frozenset(
    {
        "spooled",
        "delivered",
        "deferred",
        "frozen",
        "unfrozen",
        "removed",
        "recovered",
        "quarantined",
        "bounced",
        "expired",
        "heartbeat",
    }
)


@dataclass(frozen=True)
class Event:
    """
    One happening: its C{kind}, the entry it concerns (if any), when
    (C{at}, seconds since the epoch) and its sequence number.
    """

    kind: str
    entry_id: str | None
    at: float
    seq: int
    fields: dict[str, Any] = field(default_factory=dict)


class EventBus:
    """
    Stamp events with the time and a sequence number, keep the last
    C{keep} of them, and hand each to every subscriber.
    """

    def __init__(self, clock: Any = None, keep: int = 100) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        self.clock = clock
        self.recent: deque[Event] = deque(maxlen=keep)
        self._subscribers: list[Callable[[Event], object]] = []
        self._seq = 0

    @property
    def seq(self) -> int:
        """
        The sequence number of the last event (0 before any).
        """
        return self._seq

    def subscribe(self, subscriber: Callable[[Event], object]) -> Callable[[], None]:
        """
        Call C{subscriber} with every later event; answer a callable that
        unsubscribes it.
        """
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def emit(self, kind: str, entry_id: str | None, **fields: Any) -> Event:
        """
        Record an event and tell the subscribers; a failing subscriber
        does not stop the others.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        self._seq += 1
        event = Event(kind, entry_id, float(self.clock.seconds()), self._seq, dict(fields))
        self.recent.append(event)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                from twisted.logger import Logger

                Logger().failure("Event subscriber failed")
        return event


def format_event(kind: str, entry_id: str | None, at: float, fields: str | dict[str, Any]) -> str:
    """
    One line for C{relayctl events}: C{ISO-time kind id key=value...}
    (C{-} when there is no id; C{fields} as a dict or its JSON).
    """
    if isinstance(fields, str):
        fields = json.loads(fields) if fields else {}
    when = datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")
    parts = [when, kind, entry_id or "-"]
    parts.extend(f"{key}={fields[key]}" for key in sorted(fields))
    return " ".join(parts)
