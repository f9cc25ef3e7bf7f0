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

Receiver-to-master messages on fd 3: frames of a 4-byte big-endian
length and that many bytes of a pickle (L{encode_message},
L{MessageReader}) of a dict whose C{"t"} says what it is::

    {"t": "spooled", "entries": [SpoolEntry, ...],
     "messages": [the Message held in memory, or None, per entry]}
    {"t": "quarantined", "reason": "...", "entries": [SpoolEntry, ...]}
    {"t": "rejected"}                        (a policy rejection: metrics)
    {"t": "sessions", "n": 3}                (open sessions, when changed)
    {"t": "log", "event": {...}}             (L{portable_event})
    {"t": "listening"}

C{spooled} and C{quarantined} are written once the entries are committed
(fsynced, renamed into place), before the client gets its reply; the master
emits the same events as for mail it received itself and hands new active
entries to the scheduler.  A message that was held in memory (up to
L{HANDOVER_BYTES}) travels along, so that the master delivers it without
reading back the file the receiver just wrote.

Why pickle, not JSON: every message a receiver takes costs one C{spooled}
and one C{log} message, and the master decodes them on the reactor thread
that also delivers.  Measured (timeit, a W1 message: one entry, 3 KiB in
memory) JSON with the spool's entry codec and base64 cost 42 us to write
and 67 us to read (the header fields parsed again), pickle 14 and 17 us;
with the log event (C{eventAsJSON} inside JSON) that was some 6% of the
relay's CPU per message under W1.  Both ends are the same code (the master
starts C{python -m relay.app.receiver} from its own C{sys.path}, and a
receiver whose C{relay.__version__} differs refuses to start), and only a
process of the relay's own user can write to the pipe, so pickle's trust in
its input is the trust the master already puts in its receivers.
"""

from __future__ import annotations

import json
import pickle
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import LogLevel

import relay
from relay.app.listener import Listener
from relay.app.settings import Settings
from relay.logs import portable

CHANNEL_FD = 3
FIRST_LISTENER_FD = 4
# The longest line (stdout, stderr) or message the master reads from a
# receiver (a spooled message with many entries).
MAX_LINE = 64 * 1024 * 1024
# The length before each message on fd 3.
_LENGTH = struct.Struct(">I")
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
    #: the master's C{relay.__version__}: a receiver of another refuses
    version: str = relay.__version__

    def to_line(self) -> bytes:
        """
        The message as the one line the master writes to the child's stdin.
        """
        data = {
            "number": self.number,
            "settings": self.settings.to_json(),
            "listeners": [x.to_json() for x in self.listeners],
            "path": list(self.path),
            "version": self.version,
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
            version=str(data.get("version")),
        )


# What of a log event's own keys crosses to the master (the logger, the
# source object and the like stay behind).
_LOG_KEYS = frozenset(
    ("log_format", "log_flattened", "log_time", "log_namespace", "log_failure", "log_text")
)


# Field values that read the same in the master as here, whatever the format.
_PLAIN = frozenset((str, int, float, bool, type(None)))


def portable_event(event: dict[str, Any]) -> dict[str, Any]:
    """
    A receiver's log event as it travels to the master: its message
    flattened and its fields as text where needed (L{relay.logs.portable}),
    the level by name.  An event whose fields are all plain values (text,
    numbers), as the line each message logs, goes as it is: flattening
    would change nothing, and cost a receiver 20 us a line (timeit).
    """
    plain = "log_failure" not in event and all(
        type(value) in _PLAIN for key, value in event.items() if not key.startswith("log_")
    )
    copy = {
        key: value
        for key, value in (event if plain else portable(event)).items()
        if not key.startswith("log_") or key in _LOG_KEYS
    }
    copy["log_level"] = getattr(event.get("log_level"), "name", "info")
    return copy


def event_from_portable(event: dict[str, Any]) -> dict[str, Any]:
    """
    The master's log event for one that L{portable_event} made.
    """
    try:
        event["log_level"] = LogLevel.levelWithName(str(event.get("log_level")))
    except Exception:
        event["log_level"] = LogLevel.info
    return event


class ChannelError(ValueError):
    """
    A receiver's message that cannot be read.
    """


def encode_message(message: dict[str, Any]) -> bytes:
    """
    The frame that carries C{message} on fd 3.
    """
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class MessageReader:
    """
    The master's side of fd 3: bytes in as they arrive, whole messages out.

    @param limit: the largest frame accepted; a longer one is skipped
        (L{feed} reports it once, then goes on with the next frame).
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._skip = 0

    def feed(self, data: bytes) -> list[dict[str, Any] | ChannelError]:
        """
        The messages C{data} completes, in order; one that cannot be read
        is a L{ChannelError} in its place.
        """
        out: list[dict[str, Any] | ChannelError] = []
        if self._skip:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        buffer = self._buffer
        buffer += data
        start = 0
        header = _LENGTH.size
        while len(buffer) - start >= header:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if size > self.limit:
                out.append(ChannelError(f"a message of {size} bytes (limit {self.limit})"))
                left = len(buffer) - start - header
                self._skip = max(0, size - left)
                start = min(len(buffer), start + header + size)
                continue
            end = start + header + size
            if end > len(buffer):
                break
            try:
                message = pickle.loads(buffer[start + header : end])
                if not isinstance(message, dict):
                    raise ChannelError(f"not a message: {type(message).__name__}")
                out.append(message)
            except Exception as e:
                out.append(e if isinstance(e, ChannelError) else ChannelError(repr(e)))
            start = end
        del buffer[:start]
        return out
