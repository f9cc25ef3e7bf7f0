"""
Spool doubles: L{MemorySpool}, an L{ISpool} that keeps everything in
memory and answers with already-fired L{Deferred}s; L{FaultyFileSystem}, a
disk under a L{relay.spool.disk.DiskSpool} that fails chosen steps (ENOSPC,
EIO, ...); and L{QueuedRunner}, a thread runner whose calls wait for the
test.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any, Callable, Container, Iterable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer

from relay.interfaces import IMessageWriter, ISpool
from relay.model.entry import ACTIVE, QUARANTINE, QUEUES, SpoolEntry
from relay.model.envelope import EnvelopeWithNextHop
from relay.model.message import Message
from relay.spool.disk import FileSystem, entry_for


def allocate_ids(
    envelopes: Sequence[EnvelopeWithNextHop], taken: Container[str]
) -> list[str]:
    """
    Spool ids C{<envelope id>-<n>} for C{envelopes}: for each envelope id,
    C{n} counts from 0 within one call, bumped past ids in C{taken}.
    """
    ids: list[str] = []
    counters: dict[str, int] = {}
    for e in envelopes:
        n = counters.get(e.envelope.id, 0)
        while f"{e.envelope.id}-{n}" in taken:
            n += 1
        ids.append(f"{e.envelope.id}-{n}")
        counters[e.envelope.id] = n + 1
    return ids


@implementer(IMessageWriter)
class MemoryMessageWriter:
    """
    An L{IMessageWriter} that keeps the whole message in memory.
    """

    def __init__(self, spool: MemorySpool, message_id: str) -> None:
        self.spool = spool
        self.message_id = message_id
        self.size = 0
        self.aborted = False
        self.finished = False
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> bool:
        self._chunks.append(bytes(data))
        self.size += len(data)
        return False

    def drained(self) -> Deferred[None]:
        return defer.succeed(None)

    def finish(self, headers: Iterable[tuple[str, str]]) -> Deferred[Message]:
        self.finished = True
        data = b"".join(self._chunks)
        self._chunks = []
        return defer.succeed(Message(headers=tuple(headers), size=len(data), data=data))

    def abort(self) -> None:
        self.aborted = True
        self._chunks = []


@implementer(ISpool)
class MemorySpool:
    """
    An L{ISpool} held in memory, for tests.

    @ivar entries_by_id: every L{SpoolEntry}, by id.
    @ivar messages_by_id: the L{Message} of each entry, by entry id.
    @ivar discarded: the messages passed to L{discard}, in order.
    @ivar writers: the L{MemoryMessageWriter}s handed out by L{receive}.
    @ivar fail_next_write: if set, the next L{enqueue} or L{quarantine}
        fails with this exception (and it is reset to C{None}).
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock: IReactorTime = clock if clock is not None else Clock()
        self.entries_by_id: dict[str, SpoolEntry] = {}
        self.messages_by_id: dict[str, Message] = {}
        self.discarded: list[Message] = []
        self.writers: list[MemoryMessageWriter] = []
        self.fail_next_write: Exception | None = None

    def receive(self, message_id: str) -> MemoryMessageWriter:
        writer = MemoryMessageWriter(self, message_id)
        self.writers.append(writer)
        return writer

    def discard(self, message: Message) -> Deferred[None]:
        self.discarded.append(message)
        return defer.succeed(None)

    def _add(
        self,
        envelopes: Iterable[EnvelopeWithNextHop],
        queue: str,
        reason: str | None,
        received_from: str | None,
    ) -> Deferred[list[SpoolEntry]]:
        envelopes = list(envelopes)
        if self.fail_next_write is not None:
            exc, self.fail_next_write = self.fail_next_write, None
            return defer.fail(exc)
        now = self.clock.seconds()
        ids = allocate_ids(envelopes, self.entries_by_id)
        entries = []
        for entry_id, e in zip(ids, envelopes, strict=True):
            entry = entry_for(entry_id, queue, e, now, reason, received_from)
            self.entries_by_id[entry_id] = entry
            self.messages_by_id[entry_id] = e.envelope.message
            entries.append(entry)
        return defer.succeed(entries)

    def enqueue(
        self, envelopes: Iterable[EnvelopeWithNextHop], received_from: str | None = None
    ) -> Deferred[list[SpoolEntry]]:
        return self._add(envelopes, ACTIVE, None, received_from)

    def quarantine(
        self,
        envelopes: Iterable[EnvelopeWithNextHop],
        reason: str,
        received_from: str | None = None,
    ) -> Deferred[list[SpoolEntry]]:
        return self._add(envelopes, QUARANTINE, reason, received_from)

    def entries(self, queue: str) -> Deferred[list[SpoolEntry]]:
        if queue not in QUEUES:
            return defer.fail(ValueError(f"no such queue {queue!r}"))
        return defer.succeed(
            sorted(
                (e for e in self.entries_by_id.values() if e.queue == queue),
                key=lambda e: (e.created_at, e.id),
            )
        )

    def get(self, entry_id: str) -> Deferred[SpoolEntry]:
        try:
            return defer.succeed(self.entries_by_id[entry_id])
        except KeyError:
            return defer.fail(KeyError(entry_id))

    def message(self, entry_id: str) -> Deferred[Message]:
        try:
            return defer.succeed(self.messages_by_id[entry_id])
        except KeyError:
            return defer.fail(KeyError(entry_id))

    def update(self, entry: SpoolEntry) -> Deferred[SpoolEntry]:
        old = self.entries_by_id.get(entry.id)
        if old is None:
            return defer.fail(KeyError(entry.id))
        if entry.queue != old.queue:
            entry = dataclasses.replace(entry, queue=old.queue)
        self.entries_by_id[entry.id] = entry
        return defer.succeed(entry)

    def move(self, entry_id: str, queue: str) -> Deferred[SpoolEntry]:
        if queue not in QUEUES:
            return defer.fail(ValueError(f"no such queue {queue!r}"))
        old = self.entries_by_id.get(entry_id)
        if old is None:
            return defer.fail(KeyError(entry_id))
        entry = dataclasses.replace(old, queue=queue)
        self.entries_by_id[entry_id] = entry
        return defer.succeed(entry)

    def finish(self, entry_id: str) -> Deferred[None]:
        if entry_id not in self.entries_by_id:
            return defer.fail(KeyError(entry_id))
        del self.entries_by_id[entry_id]
        self.messages_by_id.pop(entry_id, None)
        return defer.succeed(None)


@dataclasses.dataclass
class _Fault:
    step: str
    errno: int
    path: str
    times: int


class FaultyFileSystem(FileSystem):
    """
    A L{FileSystem} (the real disk) that records each step a
    L{relay.spool.disk.DiskSpool} takes and fails the ones a test chose, with
    an C{OSError} carrying the chosen errno, before the step is done.

    The steps are C{create}, C{write}, C{close} (which closes the
    descriptor before failing, as close(2) does), C{fsync} (of a
    descriptor or a path), C{syncfs}, C{link}, C{rename}, C{unlink} and
    C{copy}.

    @ivar steps: C{(step, path)} of every step tried, in order.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self._faults: list[_Fault] = []
        self._paths: dict[int, str] = {}

    def fail(self, step: str, error: int, path: str = "*", times: int = 1) -> None:
        """
        Make the next C{times} C{step}s on a path matching the glob C{path}
        fail with errno C{error}.
        """
        self._faults.append(_Fault(step, error, path, times))

    def heal(self) -> None:
        """
        Forget every fault still pending.
        """
        self._faults = []

    def step(self, name: str, path: str) -> None:
        """
        Called before each step: record it, and raise its fault if any.
        """
        self.steps.append((name, path))
        for fault in self._faults:
            if fault.step == name and fault.times > 0 and fnmatch.fnmatchcase(path, fault.path):
                fault.times -= 1
                raise OSError(fault.errno, os.strerror(fault.errno), path)

    def create(self, path: str) -> int:
        self.step("create", path)
        fd = super().create(path)
        self._paths[fd] = path
        return fd

    def write(self, fd: int, data: bytes) -> None:
        self.step("write", self._paths.get(fd, ""))
        super().write(fd, data)

    def close(self, fd: int) -> None:
        path = self._paths.pop(fd, "")
        super().close(fd)
        self.step("close", path)

    def fsync(self, fd: int) -> None:
        self.step("fsync", self._paths.get(fd, ""))
        super().fsync(fd)

    def fsync_path(self, path: str) -> None:
        self.step("fsync", path)
        super().fsync_path(path)

    def syncfs(self, path: str, fd: int | None = None) -> None:
        self.step("syncfs", path)
        super().syncfs(path, fd)

    def link(self, src: str, dst: str) -> None:
        self.step("link", dst)
        super().link(src, dst)

    def rename(self, src: str, dst: str) -> None:
        self.step("rename", dst)
        super().rename(src, dst)

    def unlink(self, path: str) -> None:
        self.step("unlink", path)
        super().unlink(path)

    def copy(self, src: str, dst: str) -> None:
        self.step("copy", dst)
        super().copy(src, dst)


class QueuedRunner:
    """
    A C{run_in_thread} for a spool under test: calls wait until the test
    runs them (L{run_one}, L{run_all}), so that several commits pile up
    into one batch, or a test can look between the steps.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((d, f, args, kw))
        return d

    def run_one(self) -> None:
        d, f, args, kw = self.calls.pop(0)
        defer.maybeDeferred(f, *args, **kw).chainDeferred(d)

    def run_all(self) -> None:
        while self.calls:
            self.run_one()
