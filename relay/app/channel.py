"""
What the master and its receiver processes say to each other
(C{twistd relay --receivers N}): the child's file descriptors, the start
message, and the messages a receiver sends.

Child file descriptors::

    0   stdin, a pipe from the master: first one line of JSON, the
        L{StartMessage}; then nothing.  Its end of file means the master
        is gone, and the receiver stops.
    1   stdout  } pipes to the master, each line logged there as text
    2   stderr  }  (what escapes the log: tracebacks at interpreter exit)
    3   messages to the master (below)
    4.. the listening sockets, in the order of the start message's
        C{listeners}
    then the spool's lock file, held open and never touched: the spool
        stays locked while any receiver lives, even if its master was
        killed (L{relay.spool.lock})

Receiver-to-master messages on fd 3: one JSON object per line (UTF-8,
C{"\\n"} ends it), its C{"t"} saying what it is::

    {"t": "spooled", "entries": [entry_to_json(entry), ...],
     "messages": [base64 of the message, or null, per entry]}
    {"t": "quarantined", "reason": "...", "entries": [...]}
    {"t": "rejected"}                        (a policy rejection: metrics)
    {"t": "sessions", "n": 3}                (open sessions, when changed)
    {"t": "log", "event": "<twisted.logger.eventAsJSON text>"}
    {"t": "listening"}

C{spooled} and C{quarantined} are written once the entries are committed
(fsynced, renamed into place), before the client gets its reply; the master
emits the same events as for mail it received itself and hands new active
entries to the scheduler.  A message that was held in memory (up to
L{HANDOVER_BYTES}) travels along, so that the master delivers it without
reading back the file the receiver just wrote.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from relay.app.listener import Listener
from relay.app.settings import Settings

CHANNEL_FD = 3
FIRST_LISTENER_FD = 4
# The longest line either side reads (a spooled message with many entries).
MAX_LINE = 64 * 1024 * 1024
# Messages up to this size travel to the master with their entries.
HANDOVER_BYTES = 64 * 1024
# How often a receiver says how many sessions it has open (if that changed).
SESSIONS_INTERVAL = 1.0
# The module a receiver process runs (python -m ...).
RECEIVER_MODULE = "relay.app.receiver"


def python_path() -> list[str]:
    """
    This process's C{sys.path}, for a receiver to import the plugin the
    way the master does.
    """
    return [p for p in sys.path if isinstance(p, str)]


@dataclass(frozen=True)
class StartMessage:
    """
    What the master tells a receiver it starts: its number, the settings
    (L{Settings.for_receivers}), the sockets it gets and the master's
    C{sys.path}.
    """

    number: int
    settings: Settings
    listeners: tuple[Listener, ...]
    path: tuple[str, ...] = field(default_factory=lambda: tuple(python_path()))

    def to_line(self) -> bytes:
        """
        The message as the one line the master writes to the child's stdin.
        """
        data = {
            "number": self.number,
            "settings": self.settings.to_json(),
            "listeners": [x.to_json() for x in self.listeners],
            "path": list(self.path),
        }
        return json.dumps(data).encode("utf-8") + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> StartMessage:
        data: dict[str, Any] = json.loads(line)
        return cls(
            number=int(data["number"]),
            settings=Settings.from_json(data["settings"]),
            listeners=tuple(Listener.from_json(x) for x in data["listeners"]),
            path=tuple(data["path"]),
        )
