"""
Suspended destinations: mail to them waits (without using up retry
intervals) until the suspension ends or an operator resumes it.

A suspension names a recipient domain or a provider of the shaping file;
it is set by C{relayctl suspend} or by a reply rule, and kept in
C{<spool>/suspensions.json} so that it survives a restart.  The file is
rewritten whole (to a temporary file, fsynced, renamed) in the relay's
thread pool, one write after the other; what is in memory is the truth
while the relay runs, and the file is what it starts from.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

FILE_NAME = "suspensions.json"


@dataclass(frozen=True)
class Suspension:
    """
    One suspended destination.

    @ivar name: the domain or provider.
    @ivar until: when it ends (seconds since the epoch), or C{None}: when
        resumed.
    @ivar automatic: set by a reply rule (else by an operator).
    """

    name: str
    since: float
    until: float | None
    reason: str = ""
    automatic: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Suspension:
        until = value.get("until")
        return cls(
            str(value["name"]), float(value["since"]), None if until is None else float(until),
            str(value.get("reason", "")), bool(value.get("automatic", False)),
        )  # fmt: skip


def read_file(path: str) -> list[Suspension]:
    """
    The suspensions kept at C{path} (none when there is no file).

    @raise ValueError: the file is not one this module wrote.
    """
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return []
    return [Suspension.from_json(v) for v in data["suspensions"]]


def write_file(path: str, suspensions: list[Suspension]) -> None:
    """
    Replace the file at C{path} atomically (blocking: in a thread).
    """
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"suspensions": [s.to_json() for s in suspensions]}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class Suspensions:
    """
    The suspended destinations, in memory and on disk.

    @param path: the file, or C{None} to keep them in memory only.
    @param run_in_thread: C{f(callable, *args) -> Deferred}, for writes.
    @param events: an L{EventBus<relay.control.events.EventBus>}, told of
        each suspension and resumption, or C{None}.
    @param on_resumed: called with a name when its suspension ends.
    """

    log = Logger(namespace="relay.shaping")

    def __init__(
        self,
        clock: IReactorTime,
        path: str | None = None,
        run_in_thread: Callable[..., Deferred[Any]] | None = None,
        events: Any = None,
        on_resumed: Callable[[str], object] = lambda name: None,
    ) -> None:
        self.clock = clock
        self.path = path
        self.run_in_thread = run_in_thread
        self.events = events
        self.on_resumed = on_resumed
        self._by_name: dict[str, Suspension] = {}
        self._writing: Deferred[None] | None = None
        self._dirty = False

    def load(self) -> None:
        """
        Read the file (at start-up, before the reactor runs); an
        unreadable file is logged and left alone until the next change.
        """
        if self.path is None:
            return
        try:
            kept = read_file(self.path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log.error("Suspensions in {path} unreadable: {error}", path=self.path, error=str(e))
            return
        now = self.clock.seconds()
        self._by_name = {s.name: s for s in kept if s.until is None or s.until > now}

    def get(self, name: str) -> Suspension | None:
        """
        The suspension of C{name} in force now, if any; one that has run
        out ends here.
        """
        suspension = self._by_name.get(name)
        if suspension is None:
            return None
        if suspension.until is not None and suspension.until <= self.clock.seconds():
            self._end(suspension, "expired")
            return None
        return suspension

    def all(self) -> list[Suspension]:
        """
        The suspensions in force, by name.
        """
        return [s for s in (self.get(n) for n in sorted(self._by_name)) if s is not None]

    def suspend(
        self, name: str, until: float | None, reason: str = "", automatic: bool = False
    ) -> Suspension:
        """
        Suspend C{name} until C{until} (C{None}: until resumed); a
        suspension in force is replaced.
        """
        name = name.lower().rstrip(".")
        suspension = Suspension(name, self.clock.seconds(), until, reason, automatic)
        self._by_name[name] = suspension
        self.log.warn(
            "{destination}: suspended until {until}: {reason}",
            destination=name, until="resumed" if until is None else until, reason=reason,
            event="suspended", automatic=automatic,
        )  # fmt: skip
        if self.events is not None:
            self.events.emit(
                "suspended", None, destination=name, until=until, reason=reason, automatic=automatic
            )
        self._save()
        return suspension

    def resume(self, name: str) -> bool:
        """
        End the suspension of C{name}; C{False} if there was none.
        """
        suspension = self._by_name.get(name.lower().rstrip("."))
        if suspension is None:
            return False
        self._end(suspension, "resumed")
        return True

    def _end(self, suspension: Suspension, how: str) -> None:
        del self._by_name[suspension.name]
        self.log.info(
            "{destination}: suspension {how}", destination=suspension.name, how=how, event="resumed"
        )
        if self.events is not None:
            self.events.emit("resumed", None, destination=suspension.name, how=how)
        self._save()
        self.on_resumed(suspension.name)

    def _save(self) -> Deferred[None]:
        """
        Write the file after the write under way, if any (writes coalesce:
        the latest state is what is written).
        """
        if self.path is None:
            return succeed(None)
        self._dirty = True
        if self._writing is None:
            writing = self._write_while_dirty()
            if writing.called:
                return writing
            self._writing = writing
        return self._writing

    def flushed(self) -> Deferred[None]:
        """
        Fires once what was changed so far is on disk.
        """
        if self._writing is None:
            return succeed(None)
        done: Deferred[None] = Deferred()

        def fire(result: object) -> object:
            done.callback(None)
            return result

        self._writing.addBoth(fire)
        return done

    def _write_while_dirty(self) -> Deferred[None]:
        async def write() -> None:
            assert self.path is not None
            try:
                while self._dirty:
                    self._dirty = False
                    kept = sorted(self._by_name.values(), key=lambda s: s.name)
                    try:
                        if self.run_in_thread is None:
                            write_file(self.path, kept)
                        else:
                            await self.run_in_thread(write_file, self.path, kept)
                    except OSError as e:
                        self.log.error(
                            "Cannot keep suspensions in {path}: {error}",
                            path=self.path, error=str(e),
                        )  # fmt: skip
            finally:
                self._writing = None

        return Deferred.fromCoroutine(write())
