"""
Receiving a message into the disk spool: small messages stay in memory,
large ones spill to C{tmp/} in chunks, one write in flight at a time,
with back-pressure, so that memory stays flat with message size.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.interfaces import IMessageWriter
from relay.model.message import Message
from relay.spool.fs import FileSystem, unlink_if_present
from relay.spool.layout import SpoolLayout

log = Logger()

#: a message larger than this spills to disk while it arrives
SPILL_THRESHOLD = 256 * 1024
#: past this many bytes waiting for the disk, the writer asks its caller
#: to pause
HIGH_WATER = 1024 * 1024


@implementer(IMessageWriter)
class DiskMessageWriter:
    """
    Receives one message: in memory up to C{spill_threshold} bytes, then
    into C{tmp/<message_id>.eml}, one write in flight at a time.  The file
    is not fsynced here: the commit that spools the message makes it
    durable along with the rest of its batch.

    @ivar buffered: bytes held in memory (not yet on their way to disk, or
        in flight).
    """

    def __init__(
        self,
        layout: SpoolLayout,
        fs: FileSystem,
        run_in_thread: Callable[..., Deferred[Any]],
        message_id: str,
        spill_threshold: int = SPILL_THRESHOLD,
    ) -> None:
        self._layout = layout
        self._fs = fs
        self._run = run_in_thread
        self.message_id = message_id
        self.path = layout.spilled_path(message_id)
        self._threshold = spill_threshold
        self.size = 0
        self.buffered = 0
        self.spilled = False
        self._chunks: list[bytes] = []
        self._fd: int | None = None
        self._in_flight = False
        self._failure: Failure | None = None
        self._aborted = False
        self._done = False
        self._drain_waiters: list[Deferred[None]] = []
        self._idle_waiters: list[Deferred[None]] = []

    # thread side

    def _write_sync(self, data: bytes) -> None:
        if self._fd is None:
            self._layout.make_directories()
            self._fd = self._fs.create(self.path)
        self._fs.write(self._fd, data)

    def _close_sync(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self._fs.close(fd)

    def _remove_sync(self) -> None:
        try:
            self._close_sync()
        finally:
            unlink_if_present(self._fs, self.path)

    # reactor side

    def write(self, data: bytes) -> bool:
        if self._aborted or self._done:
            raise RuntimeError("message writer is closed")
        self.size += len(data)
        if self._failure is not None:
            return False
        self._chunks.append(bytes(data))
        self.buffered += len(data)
        if not self.spilled:
            if self.buffered <= self._threshold:
                return False
            self.spilled = True
        self._pump()
        return self.buffered > HIGH_WATER

    def drained(self) -> Deferred[None]:
        if self.buffered <= HIGH_WATER or self._failure is not None or self._aborted:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def _pump(self) -> None:
        if self._in_flight:
            return
        if self._aborted:
            self._chunks = []
            self.buffered = 0
        if not self._chunks or self._failure is not None:
            self._went_idle()
            return
        data = b"".join(self._chunks)
        self._chunks = []
        self._in_flight = True
        d = self._run(self._write_sync, data)

        def written(result: object) -> None:
            self._in_flight = False
            self.buffered = max(0, self.buffered - len(data))  # abort zeroes it
            if isinstance(result, Failure):
                self._failure = result
                self._chunks = []
                self.buffered = 0
            self._fire_drained()
            self._pump()

        d.addBoth(written)

    def _fire_drained(self) -> None:
        if self.buffered <= HIGH_WATER or self._failure is not None or self._aborted:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    def _went_idle(self) -> None:
        self._fire_drained()
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    def _idle(self) -> Deferred[None]:
        if not self._in_flight:
            self._pump()
        if not self._in_flight:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def finish(self, headers: Iterable[tuple[str, str]]) -> Deferred[Message]:
        return Deferred.fromCoroutine(self._finish(tuple(headers)))

    async def _finish(self, headers: tuple[tuple[str, str], ...]) -> Message:
        if self._aborted or self._done:
            raise RuntimeError("message writer is closed")
        self._done = True
        if not self.spilled:
            data = b"".join(self._chunks)
            self._chunks = []
            self.buffered = 0
            return Message(headers=headers, size=len(data), data=data)
        await self._idle()
        if self._failure is not None:
            failure = self._failure
            await self._run(self._remove_sync)
            failure.raiseException()
        try:
            await self._run(self._close_sync)
        except BaseException:
            await self._run(self._remove_sync)
            raise
        return Message(headers=headers, size=self.size, path=self.path)

    def abort(self) -> Deferred[None]:
        """
        Throw the message away; its temporary file, if any, is removed.
        """
        if self._aborted or self._done:
            # once finished, the message is disposed of with ISpool.discard
            return defer.succeed(None)
        self._aborted = True
        self._chunks = []
        self.buffered = 0
        self._fire_drained()
        if not self.spilled:
            return defer.succeed(None)
        d = self._idle()
        d.addCallback(lambda _: self._run(self._remove_sync))
        d.addErrback(lambda f: log.failure("removing {path}", failure=f, path=self.path))
        return d
