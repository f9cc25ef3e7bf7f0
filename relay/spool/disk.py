"""
The on-disk spool: durable storage of envelopes waiting for delivery.

Layout under the spool directory::

    lock                    held (flock) by the running relay, with its pid
    tmp/                    bodies being received, metadata being written
    messages/<id>.eml       message bytes; hard links to one inode when one
                            message is shared by several envelopes
    active/<id>.json        metadata of entries waiting for delivery
    frozen/<id>.json        metadata of frozen entries
    removed/<id>.json       metadata of entries removed by an operator

and in the quarantine directory C{<id>.json} (with the reason) beside
C{<id>.eml} (a hard link to the message, or a copy on another filesystem).

The queue an entry is in is the directory its metadata is in.  All file
I/O runs through C{run_in_thread}, never on the reactor thread (except
L{DiskSpool.lock}, meant for start-up), and every change to the disk goes
through one L{FileSystem} object, so that tests can fail any step.

What is made durable, and when
------------------------------

The promise is that nothing acknowledged is lost, whether the process is
killed or the machine loses power; anything else may at worst come back
as a duplicate delivery after a power loss (which Postfix accepts too).

C{enqueue} and C{quarantine} are group commits: one committer runs in the
thread pool at a time and takes every commit requested while the
previous batch ran (no timer, so a lone message waits for nothing).  Per
batch:

 1. For each commit, the message is written to a new C{messages/<id>.eml}
    (created exclusively: taking the name is what makes the id ours), or
    the file it spilled to in C{tmp/} is hard-linked there; further
    envelopes of the same message are hard links to it.  The metadata is
    written to C{tmp/<id>.json} (C{<quarantine>/<id>.json.tmp} for the
    quarantine, which may be another filesystem).  A failure here (say
    ENOSPC) fails that commit only, and removes every file it made.
 2. All of that is made durable at once: one C{syncfs(2)} of the spool's
    filesystem (and of the quarantine's, when elsewhere); where there is
    no syncfs, each file was fsynced in step 1 and C{messages/} (and the
    quarantine directory) are fsynced here.  A failure here (EIO) fails
    every commit of the batch and removes all their files.
 3. The commit point: each metadata file is renamed into its queue
    directory, and each queue directory touched is fsynced once.  Only
    then do the commits' L{Deferred}s fire (and the server says 250).

Because step 2 ends before step 3 begins, nothing becomes visible in
C{active/} or the quarantine before its message and metadata are durable.

C{update} fsyncs the new metadata before renaming it over the old (else a
power loss could leave an empty file where an acknowledged entry was),
but not the directory: a lost rename brings back the previous state, which
only repeats a delivery attempt.  C{move} (operator commands, freezing) is
rare and fsyncs both directories.  C{finish} is batched like commits: the
metadata files are unlinked and their directories fsynced once per batch,
and only then the message files unlinked, unsynced (a message file that
comes back is removed by L{DiskSpool.recover}).  Without that fsync a
power loss could bring back an entry whose message is gone.

Trips to the thread pool: a message costs a share of one commit batch and
of one finish batch.  The spool remembers (up to L{RECENT_ENTRIES}, with at
most L{RECENT_BYTES} of in-memory messages) the entries it wrote, so that
C{get} and C{message} of a fresh entry answer without reading the disk;
and C{message} of a stored small message reads it whole, so that sending
it needs no further reads.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import sys
from collections import OrderedDict
from typing import IO, Any, Callable, Iterable, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.interfaces import IMessageWriter, ISpool
from relay.model.address import NULL_SENDER, EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, QUEUES, REMOVED, Attempt, SpoolEntry
from relay.model.envelope import EnvelopeWithNextHop
from relay.model.message import MAX_HEADER_BYTES, Message, header_section, parse_header_block

log = Logger()

VERSION = 1
SPILL_THRESHOLD = 256 * 1024
HIGH_WATER = 1024 * 1024
#: entries L{DiskSpool} remembers after writing them, and the most message
#: bytes it keeps with them
RECENT_ENTRIES = 4096
RECENT_BYTES = 32 * 1024 * 1024
DIR_MODE = 0o700
#: the control socket's name in the spool directory
CONTROL_SOCKET = "control.sock"

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")


class SpoolLocked(Exception):
    """
    Another process (another relay) holds the spool's lock.
    """

    def __init__(self, path: str, pid: int | None) -> None:
        who = f" (pid {pid})" if pid is not None else ""
        super().__init__(f"spool {path} is in use by another relay{who}")
        self.path = path
        self.pid = pid


def quote_endpoint_value(text: str) -> str:
    """
    C{text} quoted for a Twisted endpoint description (C{\\}, C{:} and
    C{=} escaped with a backslash).
    """
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def control_in_spool(spool: str) -> str:
    """
    The default control endpoint: a unix socket inside the spool, so that
    each spool has its own and C{relayctl --spool DIR} finds it
    (C{unix:./spool/control.sock} for the default spool).
    """
    path = os.path.join(spool, CONTROL_SOCKET)
    if not os.path.isabs(path) and not path.startswith(("./", "../")):
        path = "./" + path
    return "unix:" + quote_endpoint_value(path)


def _take_lock(path: str) -> IO[str]:
    """
    Open and C{flock} the lock file of the spool at C{path}.

    @raise SpoolLocked: naming the holder's pid, if another process has it.
    """
    f = open(os.path.join(path, "lock"), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        text = f.read().strip()
        f.close()
        raise SpoolLocked(os.path.abspath(path), int(text) if text.isdigit() else None) from None
    except BaseException:
        f.close()
        raise
    return f


def check_unlocked(path: str) -> None:
    """
    Check that no relay holds the spool at C{path} (taking and releasing
    its lock), so that C{twistd relay} can say so before it starts; the
    relay itself takes the lock with L{DiskSpool.lock}.  Blocking.

    @raise SpoolLocked: if another process holds it.
    """
    _take_lock(path).close()


# -- metadata ----------------------------------------------------------------


def _args_to_json(args: Iterable[Argument]) -> list[list[str | None]]:
    return [[a.keyword, a.value] for a in args]


def _args_from_json(value: Iterable[list[str | None]]) -> tuple[Argument, ...]:
    return tuple(Argument(str(k), v) for k, v in value)


def _address(text: str) -> EmailAddress:
    return EmailAddress.parse(text, smtputf8=True)


def entry_to_json(entry: SpoolEntry) -> dict[str, Any]:
    """
    The JSON-able form of a L{SpoolEntry} (see L{entry_from_json}).
    """
    return {
        "version": VERSION,
        "id": entry.id,
        "queue": entry.queue,
        "envelope_id": entry.envelope_id,
        "sender": str(entry.sender),
        "sender_args": _args_to_json(entry.sender_args),
        "recipients": [str(r) for r in entry.recipients],
        "next_hop_choices": list(entry.next_hop_choices),
        "retry_intervals": list(entry.retry_intervals),
        "created_at": entry.created_at,
        "next_attempt_at": entry.next_attempt_at,
        "message_size": entry.message_size,
        "recipient_args": [[addr, _args_to_json(args)] for addr, args in entry.recipient_args],
        "rejected_recipients": [str(r) for r in entry.rejected_recipients],
        "failed_recipients": [[r, text] for r, text in entry.failed_recipients],
        "attempts": [
            {
                "at": a.at,
                "hop": a.hop,
                "code": a.code,
                "reply": a.reply,
                "recipients": list(a.recipients),
                "address": list(a.address) if a.address is not None else None,
            }
            for a in entry.attempts
        ],
        "reason": entry.reason,
        "received_from": entry.received_from,
    }


def _peer_from_json(data: Any) -> tuple[str, int] | None:
    """
    An attempt's C{address} as L{entry_to_json} wrote it; C{None} when
    absent (entries written before attempts recorded it).
    """
    if data is None:
        return None
    host, port = data
    return str(host), int(port)


def entry_from_json(data: dict[str, Any], queue: str | None = None) -> SpoolEntry:
    """
    The L{SpoolEntry} that L{entry_to_json} made C{data} from.

    @param queue: the queue the entry is in (the directory its file is in),
        which wins over the C{"queue"} recorded in C{data}.
    @raise ValueError: if C{data} is not a spool entry this code can read.
    """
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported spool entry version {data.get('version')!r}")
    sender_text = data["sender"]
    sender = NULL_SENDER if not sender_text else Sender(_address(sender_text))
    return SpoolEntry(
        id=data["id"],
        queue=queue if queue is not None else data["queue"],
        envelope_id=data["envelope_id"],
        sender=sender,
        sender_args=_args_from_json(data.get("sender_args", ())),
        recipients=tuple(_address(r) for r in data["recipients"]),
        next_hop_choices=tuple(data.get("next_hop_choices", ())),
        retry_intervals=tuple(float(i) for i in data.get("retry_intervals", ())),
        created_at=float(data["created_at"]),
        next_attempt_at=float(data["next_attempt_at"]),
        message_size=int(data["message_size"]),
        recipient_args=tuple(
            (str(addr), _args_from_json(args)) for addr, args in data.get("recipient_args", ())
        ),
        rejected_recipients=tuple(_address(r) for r in data.get("rejected_recipients", ())),
        failed_recipients=tuple((str(r), str(t)) for r, t in data.get("failed_recipients", ())),
        attempts=tuple(
            Attempt(
                at=float(a["at"]),
                hop=a["hop"],
                code=a.get("code"),
                reply=a["reply"],
                recipients=tuple(a.get("recipients", ())),
                address=_peer_from_json(a.get("address")),
            )
            for a in data.get("attempts", ())
        ),
        reason=data.get("reason"),
        received_from=data.get("received_from"),
    )


def entry_for(
    entry_id: str,
    queue: str,
    envelope: EnvelopeWithNextHop,
    now: float,
    reason: str | None = None,
    received_from: str | None = None,
) -> SpoolEntry:
    """
    The L{SpoolEntry} for a freshly spooled L{EnvelopeWithNextHop}, due at
    C{now}.
    """
    env = envelope.envelope
    return SpoolEntry(
        id=entry_id,
        queue=queue,
        envelope_id=env.id,
        sender=env.sender,
        sender_args=env.sender_args,
        recipients=env.recipients,
        next_hop_choices=envelope.next_hop_choices,
        retry_intervals=envelope.retry_intervals,
        created_at=now,
        next_attempt_at=now,
        message_size=env.message.size,
        recipient_args=env.recipient_args,
        rejected_recipients=env.rejected_recipients,
        reason=reason,
        received_from=received_from,
    )


# -- the file system --------------------------------------------------------------


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return cast(Callable[[int], int], syncfs)


_SYNCFS = _load_syncfs() if sys.platform.startswith("linux") else None


class FileSystem:
    """
    The spool's disk operations that change anything, one method per step,
    so that tests can fail or kill any step (see
    L{relay.testing.FaultyFileSystem}).  Reads go straight to C{os}.
    Errors are C{OSError}s with their C{errno}, as the OS gave them.
    """

    #: whether L{syncfs} works here (Linux)
    has_syncfs = _SYNCFS is not None

    def create(self, path: str) -> int:
        """
        Create C{path}, which must not exist (C{FileExistsError}), for
        writing; return its descriptor.
        """
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write(self, fd: int, data: bytes) -> None:
        """
        Write all of C{data} to C{fd}.
        """
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def close(self, fd: int) -> None:
        os.close(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fsync_path(self, path: str) -> None:
        """
        fsync the file or directory C{path}.
        """
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def syncfs(self, path: str, fd: int | None = None) -> None:
        """
        Make everything written to the filesystem holding C{path} durable
        (Linux C{syncfs(2)}, which reports write-back errors since 5.8).

        @param fd: a descriptor of C{path} kept open since before the
            writes, if there is one: syncfs reports an error to each open
            descriptor once, so an error another process already saw
            still reaches this one.
        """
        if _SYNCFS is None:
            raise OSError(errno.ENOSYS, "syncfs is not available", path)
        own = fd is None
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _SYNCFS(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), path)
        finally:
            if own:
                os.close(fd)

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def copy(self, src: str, dst: str) -> None:
        """
        Copy C{src} to a new file C{dst} (not fsynced).
        """
        shutil.copyfile(src, dst)


# -- blocking helpers (run in the thread pool) --------------------------------


def _write_new(fs: FileSystem, path: str, data: bytes, sync: bool) -> None:
    """
    Create C{path} (it must not exist) with C{data}, fsynced if C{sync}.
    """
    fd = fs.create(path)
    try:
        fs.write(fd, data)
        if sync:
            fs.fsync(fd)
    finally:
        fs.close(fd)


def _unlink(fs: FileSystem, path: str) -> bool:
    try:
        fs.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _remove_all(fs: FileSystem, paths: Iterable[str]) -> None:
    """
    Remove C{paths} (last first) after a failure; whatever cannot be
    removed now is left to L{DiskSpool.recover}.
    """
    for path in reversed(list(paths)):
        try:
            fs.unlink(path)
        except FileNotFoundError:
            pass
        except Exception as e:
            log.warn("cannot remove {path}: {error}", path=path, error=repr(e))


def _link_or_copy(fs: FileSystem, src: str, dst: str) -> None:
    """
    Hard-link C{src} to C{dst}, or copy it (fsynced) across filesystems.
    """
    try:
        fs.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        tmp = dst + ".tmp"
        try:
            fs.copy(src, tmp)
            fs.fsync_path(tmp)
            fs.rename(tmp, dst)
        except BaseException:
            _unlink(fs, tmp)
            raise


def _encode(entry: SpoolEntry) -> bytes:
    # compact: json's C encoder does not indent
    text = json.dumps(entry_to_json(entry), sort_keys=True, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


# -- batches ------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Job:
    """
    One request in a L{_Batcher}: the thread side sets C{result} or
    C{error}.
    """

    done: Deferred[Any] = dataclasses.field(default_factory=Deferred, init=False)
    result: Any = dataclasses.field(default=None, init=False)
    error: BaseException | None = dataclasses.field(default=None, init=False)

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error


class _Batcher:
    """
    Group commit: C{process(jobs)} runs in the thread pool with every job
    submitted since the previous call started, one call at a time.  No
    timer: a batch is whatever piled up while the previous one ran, so a
    lone request is not delayed and a busy spool syncs once per batch.
    """

    def __init__(self, run: Callable[..., Deferred[Any]], process: Callable[[list[Any]], None]) -> None:
        self._run = run
        self._process = process
        self._pending: list[_Job] = []
        self._busy = False

    def submit(self, job: _Job) -> Deferred[Any]:
        self._pending.append(job)
        if not self._busy:
            self._next()
        return job.done

    def _next(self) -> None:
        batch, self._pending = self._pending, []
        self._busy = True
        self._run(self._process, batch).addBoth(self._finished, batch)

    def _finished(self, result: object, batch: list[_Job]) -> None:
        for job in batch:
            if isinstance(result, Failure):
                # the batch died as a whole (process removed what it could)
                job.fail(result.value)
            if job.error is not None:
                error = job.error
                job.done.errback(Failure(error, type(error), error.__traceback__))
            else:
                job.done.callback(job.result)
        # requests made by those callbacks waited for this batch to end
        self._busy = False
        if self._pending:
            self._next()


@dataclasses.dataclass(eq=False)
class _Commit(_Job):
    envelopes: list[EnvelopeWithNextHop] = dataclasses.field(default_factory=list)
    queue: str = ACTIVE
    reason: str | None = None
    received_from: str | None = None
    now: float = 0.0
    #: files this commit made, removed if it fails
    created: list[str] = dataclasses.field(default_factory=list)
    #: spilled bodies in tmp/, removed once committed
    consumed: list[str] = dataclasses.field(default_factory=list)
    #: (metadata in tmp, its place in the queue directory)
    renames: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class _Finish(_Job):
    entry_id: str = ""
    queue: str = ""


# -- the message writer ---------------------------------------------------------


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

    def __init__(self, spool: DiskSpool, message_id: str, spill_threshold: int) -> None:
        self._spool = spool
        self._run = spool._run
        self._fs = spool.fs
        self.message_id = message_id
        self.path = os.path.join(spool.tmp_dir, message_id + ".eml")
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
            self._spool._ensure_dirs()
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
            _unlink(self._fs, self.path)

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

    @defer.inlineCallbacks
    def finish(self, headers: Iterable[tuple[str, str]]):  # type: ignore[no-untyped-def]
        if self._aborted or self._done:
            raise RuntimeError("message writer is closed")
        self._done = True
        headers = tuple(headers)
        if not self.spilled:
            data = b"".join(self._chunks)
            self._chunks = []
            self.buffered = 0
            return Message(headers=headers, size=len(data), data=data)
        yield self._idle()
        if self._failure is not None:
            failure = self._failure
            yield self._run(self._remove_sync)
            failure.raiseException()
        try:
            yield self._run(self._close_sync)
        except BaseException:
            yield self._run(self._remove_sync)
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
        d.addErrback(
            lambda f: log.failure("removing {path}", failure=f, path=self.path)
        )
        return d


# -- the spool ------------------------------------------------------------------


@implementer(ISpool)
class DiskSpool:
    """
    An L{ISpool} in a directory.

    @param run_in_thread: C{run_in_thread(f, *args, **kw)} runs C{f} off the
        reactor thread and returns a L{Deferred} with its result, e.g.
        C{partial(deferToThreadPool, reactor, threadpool)}.
    @param clock: the time of new entries.
    @param quarantine_path: the quarantine directory; C{<path>/quarantine}
        when C{None}.
    @param fs: the L{FileSystem} every change goes through.
    @param use_syncfs: make a commit batch durable with one C{syncfs(2)}
        per filesystem (C{True}) or with an fsync of each file and
        directory (C{False}); C{None} uses syncfs where there is one.
    @param remember: keep the entries (and small messages) this spool
        writes in memory for delivering them (see L{RECENT_BYTES}); a
        process that only receives has no use for that.
    """

    def __init__(
        self,
        path: str,
        run_in_thread: Callable[..., Deferred[Any]],
        clock: IReactorTime,
        quarantine_path: str | None = None,
        spill_threshold: int = SPILL_THRESHOLD,
        fs: FileSystem | None = None,
        use_syncfs: bool | None = None,
        remember: bool = True,
    ) -> None:
        self.path = os.path.abspath(path)
        self.remember_entries = remember
        self._run = run_in_thread
        self.clock = clock
        self.fs = fs if fs is not None else FileSystem()
        self.use_syncfs = self.fs.has_syncfs if use_syncfs is None else use_syncfs
        self.quarantine_path = os.path.abspath(
            quarantine_path if quarantine_path is not None else os.path.join(path, "quarantine")
        )
        self.spill_threshold = spill_threshold
        self.tmp_dir = os.path.join(self.path, "tmp")
        self.messages_dir = os.path.join(self.path, "messages")
        self._queue_dirs = {
            ACTIVE: os.path.join(self.path, ACTIVE),
            FROZEN: os.path.join(self.path, FROZEN),
            REMOVED: os.path.join(self.path, REMOVED),
            QUARANTINE: self.quarantine_path,
        }
        self._dirs_ready = False
        self._quarantine_elsewhere = False
        self._lock_file: IO[str] | None = None
        # the spool directory, open while the lock is held, for syncfs
        self._sync_fd: int | None = None
        self._entry_locks: dict[str, defer.DeferredLock] = {}
        self._committer = _Batcher(run_in_thread, self._commit_batch_sync)
        self._finisher = _Batcher(run_in_thread, self._finish_batch_sync)
        # entries as this spool last wrote them, with their message when
        # it is in memory, so that delivering a fresh entry needs no trip
        # to the disk to read back what was just written
        self._recent: OrderedDict[str, tuple[SpoolEntry, Message | None]] = OrderedDict()
        self._recent_bytes = 0

    def queue_dir(self, queue: str) -> str:
        """
        The directory holding the metadata of C{queue}'s entries.
        """
        try:
            return self._queue_dirs[queue]
        except KeyError:
            raise ValueError(f"no such queue {queue!r}") from None

    # -- lock -----------------------------------------------------------------

    def lock(self) -> None:
        """
        Take the spool's lock (C{<path>/lock}, non-blocking C{flock}) and
        write our pid in it.  Blocking I/O: call it at start-up.

        @raise SpoolLocked: if another process holds it.
        """
        if self._lock_file is not None:
            return
        os.makedirs(self.path, mode=DIR_MODE, exist_ok=True)
        f = _take_lock(self.path)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f
        self._sync_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def unlock(self) -> None:
        """
        Release the lock taken by L{lock}.
        """
        f, self._lock_file = self._lock_file, None
        fd, self._sync_fd = self._sync_fd, None
        if fd is not None:
            os.close(fd)
        if f is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    # -- blocking helpers (thread side) -----------------------------------------

    def _ensure_dirs(self) -> None:
        if self._dirs_ready:
            return
        for d in (self.path, self.tmp_dir, self.messages_dir, *self._queue_dirs.values()):
            os.makedirs(d, mode=DIR_MODE, exist_ok=True)
        self._quarantine_elsewhere = (
            os.stat(self.quarantine_path).st_dev != os.stat(self.path).st_dev
        )
        self._dirs_ready = True

    def _json_path(self, queue: str, entry_id: str) -> str:
        return os.path.join(self.queue_dir(queue), entry_id + ".json")

    def _eml_path(self, entry_id: str) -> str:
        return os.path.join(self.messages_dir, entry_id + ".eml")

    def _quarantine_eml(self, entry_id: str) -> str:
        return os.path.join(self.quarantine_path, entry_id + ".eml")

    def _find(self, entry_id: str) -> str:
        """
        The queue C{entry_id} is in.

        @raise KeyError: if there is no such entry.
        """
        if not _SAFE_ID.match(entry_id):
            raise KeyError(entry_id)
        for _ in range(2):  # a second look, in case a move ran in between
            for queue in QUEUES:
                if os.path.exists(self._json_path(queue, entry_id)):
                    return queue
        raise KeyError(entry_id)

    def _read(self, queue: str, entry_id: str) -> SpoolEntry:
        with open(self._json_path(queue, entry_id), "rb") as f:
            return entry_from_json(json.load(f), queue)

    def _json_tmp(self, queue: str, entry_id: str) -> str:
        """
        Where new metadata for C{queue} is written before its rename: in
        C{tmp/}, or beside the quarantine (which may be another filesystem).
        """
        if queue == QUARANTINE:
            return self._json_path(queue, entry_id) + ".tmp"
        return os.path.join(self.tmp_dir, entry_id + ".json")

    def _is_tmp(self, path: str) -> bool:
        return os.path.dirname(os.path.abspath(path)) == self.tmp_dir

    def _claim_fresh(
        self, envelope: EnvelopeWithNextHop, n: int, claim: Callable[[str], None]
    ) -> tuple[str, str, int]:
        """
        Claim the first free id C{<envelope id>-<m>}, C{m >= n}: C{claim(path)}
        creates C{messages/<id>.eml} or raises C{FileExistsError}; taking the
        name is what makes the id ours.

        @return: the id, the path of the message file, and C{m + 1}.
        """
        if _SAFE_ID.match(f"{envelope.envelope.id}-{n}") is None:
            raise ValueError(f"bad envelope id {envelope.envelope.id!r}")
        while True:
            entry_id = f"{envelope.envelope.id}-{n}"
            eml = self._eml_path(entry_id)
            try:
                claim(eml)
            except FileExistsError:
                n += 1
                continue
            return entry_id, eml, n + 1

    def _link_fresh(
        self, body: str, envelope: EnvelopeWithNextHop, n: int
    ) -> tuple[str, str, int]:
        """
        Hard-link C{body} into C{messages/} under a fresh id (see
        L{_claim_fresh}).
        """
        return self._claim_fresh(envelope, n, lambda eml: self.fs.link(body, eml))

    def _write_fresh(
        self, data: bytes, envelope: EnvelopeWithNextHop, n: int, created: list[str]
    ) -> tuple[str, str, int]:
        """
        Write C{data} as a new C{messages/<id>.eml} under a fresh id (see
        L{_claim_fresh}), fsynced unless syncfs will do it.
        """
        fs = self.fs

        def claim(eml: str) -> None:
            fd = fs.create(eml)
            created.append(eml)
            try:
                fs.write(fd, data)
                if not self.use_syncfs:
                    fs.fsync(fd)
            finally:
                fs.close(fd)

        return self._claim_fresh(envelope, n, claim)

    def _prepare_sync(self, c: _Commit) -> None:
        """
        Phase 1 of a commit: the message files and the metadata, not yet
        visible in a queue.  With C{use_syncfs} nothing is synced here.
        """
        fs = self.fs
        sync_each = not self.use_syncfs
        # the message files: the first envelope of each message writes it
        # (or links the file it spilled to), the others link to that
        first: dict[int, str] = {}
        ids: list[str] = []
        counters: dict[str, int] = {}
        for e in c.envelopes:
            message = e.envelope.message
            n = counters.get(e.envelope.id, 0)
            if id(message) in first:
                entry_id, eml, n = self._link_fresh(first[id(message)], e, n)
                c.created.append(eml)
            elif message.data is not None:
                entry_id, eml, n = self._write_fresh(message.data, e, n, c.created)
            elif message.path is not None:
                if sync_each:
                    fs.fsync_path(message.path)
                entry_id, eml, n = self._link_fresh(message.path, e, n)
                c.created.append(eml)
                if self._is_tmp(message.path):
                    c.consumed.append(message.path)
            else:
                raise ValueError("message has neither data nor path")
            first.setdefault(id(message), eml)
            counters[e.envelope.id] = n
            ids.append(entry_id)
            if c.queue == QUARANTINE:
                q_eml = self._quarantine_eml(entry_id)
                _unlink(fs, q_eml)
                c.created.append(q_eml)
                _link_or_copy(fs, eml, q_eml)
        # the metadata, beside its queue
        entries = []
        for entry_id, e in zip(ids, c.envelopes, strict=True):
            entry = entry_for(entry_id, c.queue, e, c.now, c.reason, c.received_from)
            tmp = self._json_tmp(c.queue, entry_id)
            _unlink(fs, tmp)
            c.created.append(tmp)
            _write_new(fs, tmp, _encode(entry), sync_each)
            c.renames.append((tmp, self._json_path(c.queue, entry_id)))
            entries.append(entry)
        c.result = entries

    def _make_durable_sync(self, commits: list[_Commit]) -> None:
        """
        Between the phases: everything phase 1 wrote, durable.
        """
        quarantine = any(c.queue == QUARANTINE for c in commits)
        if self.use_syncfs:
            self.fs.syncfs(self.path, self._sync_fd)
            if quarantine and self._quarantine_elsewhere:
                self.fs.syncfs(self.quarantine_path)
        else:
            # the files were fsynced in phase 1; their names:
            self.fs.fsync_path(self.messages_dir)
            if quarantine:
                self.fs.fsync_path(self.quarantine_path)

    def _commit_batch_sync(self, commits: list[_Commit]) -> None:
        """
        Commit a batch of enqueues and quarantines (see the module
        docstring), setting each one's C{result} or C{error}.
        """
        fs = self.fs
        try:
            self._ensure_dirs()
            ok: list[_Commit] = []
            for c in commits:
                try:
                    self._prepare_sync(c)
                except Exception as e:
                    c.fail(e)
                    _remove_all(fs, c.created)
                else:
                    ok.append(c)
            if ok:
                try:
                    self._make_durable_sync(ok)
                except Exception as e:
                    for c in ok:
                        c.fail(e)
                    raise
            # phase 2: the commit point
            renamed: list[_Commit] = []
            for c in ok:
                try:
                    for tmp, dest in c.renames:
                        c.created.append(dest)
                        fs.rename(tmp, dest)
                        c.created.remove(tmp)
                except Exception as e:
                    c.fail(e)
                    _remove_all(fs, c.created)
                else:
                    renamed.append(c)
            try:
                for directory in sorted({self.queue_dir(c.queue) for c in renamed}):
                    fs.fsync_path(directory)
            except Exception as e:
                for c in renamed:
                    c.fail(e)
                raise
        except BaseException as e:
            for c in commits:
                c.fail(e)
                _remove_all(fs, c.created)
            if isinstance(e, Exception):
                return
            raise
        # committed: the spilled bodies are not needed any more
        for c in renamed:
            _remove_all(fs, c.consumed)

    def _finish_batch_sync(self, jobs: list[_Finish]) -> None:
        """
        Remove delivered entries: the metadata, then (once that is durable,
        lest an entry come back without its message) the message files.
        """
        fs = self.fs
        gone: list[_Finish] = []
        for job in jobs:
            try:
                job.queue = self._find(job.entry_id)
                fs.unlink(self._json_path(job.queue, job.entry_id))
            except Exception as e:
                job.fail(e)
            else:
                gone.append(job)
        try:
            for directory in sorted({self.queue_dir(job.queue) for job in gone}):
                fs.fsync_path(directory)
        except Exception as e:
            # The entries are gone; a power loss might bring them back (a
            # duplicate, not a loss), so keep their messages for that.
            log.warn("finishing {n} entries: {error}", n=len(gone), error=repr(e))
            return
        for job in gone:
            paths = [self._eml_path(job.entry_id)]
            if job.queue == QUARANTINE:
                paths.append(self._quarantine_eml(job.entry_id))
            _remove_all(fs, paths)

    def _entries_sync(self, queue: str) -> tuple[list[SpoolEntry], list[tuple[str, str]]]:
        self._ensure_dirs()
        directory = self.queue_dir(queue)
        entries = []
        errors = []
        for name in os.listdir(directory):
            if not name.endswith(".json"):
                continue
            try:
                entries.append(self._read(queue, name[: -len(".json")]))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                errors.append((os.path.join(directory, name), repr(e)))
        entries.sort(key=lambda e: (e.created_at, e.id))
        return entries, errors

    def _get_sync(self, entry_id: str) -> SpoolEntry:
        return self._read(self._find(entry_id), entry_id)

    def _message_sync(self, entry_id: str) -> Message:
        self._find(entry_id)
        path = self._eml_path(entry_id)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise KeyError(entry_id) from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size <= self.spill_threshold:
                # small: in memory, so that sending it needs no more trips
                # to the thread pool
                data = f.read()
                return Message(parse_header_block(header_section(data)), len(data), data=data)
            head = f.read(MAX_HEADER_BYTES)
        return Message(parse_header_block(header_section(head)), size, path=path)

    def _update_sync(self, entry: SpoolEntry) -> SpoolEntry:
        fs = self.fs
        queue = self._find(entry.id)
        if entry.queue != queue:
            entry = _replace_queue(entry, queue)
        tmp = self._json_tmp(queue, entry.id)
        _unlink(fs, tmp)
        try:
            # fsynced before it replaces acknowledged metadata; the
            # directory is not: a lost rename only brings the old state back
            _write_new(fs, tmp, _encode(entry), sync=True)
            fs.rename(tmp, self._json_path(queue, entry.id))
        except BaseException:
            # the old metadata stands
            _remove_all(fs, [tmp])
            raise
        return entry

    def _move_sync(self, entry_id: str, queue: str) -> SpoolEntry:
        fs = self.fs
        source = self._find(entry_id)
        entry = self._read(source, entry_id)
        if source == queue:
            return entry
        moved = _replace_queue(entry, queue)
        if queue == QUARANTINE:
            q_eml = self._quarantine_eml(entry_id)
            _unlink(fs, q_eml)
            _link_or_copy(fs, self._eml_path(entry_id), q_eml)
            fs.fsync_path(self.quarantine_path)
        src = self._json_path(source, entry_id)
        try:
            fs.rename(src, self._json_path(queue, entry_id))
        except OSError as e:
            if e.errno != errno.EXDEV:
                if queue == QUARANTINE:
                    _unlink(fs, self._quarantine_eml(entry_id))
                raise
            # the quarantine is on another filesystem: copy, then remove
            tmp = self._json_tmp(queue, entry_id)
            _unlink(fs, tmp)
            try:
                _write_new(fs, tmp, _encode(moved), sync=True)
                fs.rename(tmp, self._json_path(queue, entry_id))
            except BaseException:
                _remove_all(fs, [tmp])
                raise
            fs.fsync_path(self.queue_dir(queue))
            fs.unlink(src)
        fs.fsync_path(self.queue_dir(queue))
        fs.fsync_path(self.queue_dir(source))
        if source == QUARANTINE:
            _unlink(fs, self._quarantine_eml(entry_id))
        return moved

    def _recover_sync(self) -> list[str]:
        self._ensure_dirs()
        fs = self.fs
        removed = []
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                fs.unlink(path)
            removed.append(path)
        for name in os.listdir(self.quarantine_path):
            if name.endswith(".tmp"):
                path = os.path.join(self.quarantine_path, name)
                fs.unlink(path)
                removed.append(path)
        referenced = set()
        for queue in QUEUES:
            for name in os.listdir(self.queue_dir(queue)):
                if name.endswith(".json"):
                    referenced.add((queue, name[: -len(".json")]))
        ids = {entry_id for _, entry_id in referenced}
        for name in os.listdir(self.messages_dir):
            if name.endswith(".eml") and name[: -len(".eml")] not in ids:
                path = os.path.join(self.messages_dir, name)
                fs.unlink(path)
                removed.append(path)
        for name in os.listdir(self.quarantine_path):
            if name.endswith(".eml") and (QUARANTINE, name[: -len(".eml")]) not in referenced:
                path = os.path.join(self.quarantine_path, name)
                fs.unlink(path)
                removed.append(path)
        for d in (self.tmp_dir, self.messages_dir, self.quarantine_path):
            fs.fsync_path(d)
        return removed

    def _serialized(self, entry_id: str, f: Callable[..., Deferred[Any]], *args: Any) -> Deferred[Any]:
        """
        Run C{f(*args)} once earlier changes to the same entry are done, so
        that e.g. an update and a move of one entry cannot interleave in
        the thread pool.
        """
        lock = self._entry_locks.get(entry_id)
        if lock is None:
            lock = self._entry_locks[entry_id] = defer.DeferredLock()

        def release(result: object) -> object:
            if not lock.locked and not lock.waiting:
                self._entry_locks.pop(entry_id, None)
            return result

        return lock.run(f, *args).addBoth(release)

    # -- entries this spool wrote (reactor side) -------------------------------

    def _remember(self, entry: SpoolEntry, message: Message | None) -> None:
        self._forget(entry.id)
        if message is not None and (
            message.data is None or self._recent_bytes + message.size > RECENT_BYTES
        ):
            message = None
        self._recent[entry.id] = (entry, message)
        if message is not None:
            self._recent_bytes += message.size
        while len(self._recent) > RECENT_ENTRIES:
            self._forget(next(iter(self._recent)))

    def remember(self, entry: SpoolEntry, message: Message | None) -> None:
        """
        Hold C{entry} (and C{message}, when it is in memory and small
        enough) as if this spool had just written it: another process
        (a receiver) did, and handed both over.
        """
        if self.remember_entries:
            self._remember(entry, message)

    def _forget(self, entry_id: str) -> None:
        _, message = self._recent.pop(entry_id, (None, None))
        if message is not None:
            self._recent_bytes -= message.size

    def _committed(self, entries: list[SpoolEntry], envelopes: list[EnvelopeWithNextHop]) -> list[SpoolEntry]:
        if self.remember_entries:
            for entry, e in zip(entries, envelopes, strict=True):
                self._remember(entry, e.envelope.message)
        return entries

    def _changed(self, entry_id: str, d: Deferred[Any]) -> Deferred[Any]:
        """
        Keep what L{_recent} knows of C{entry_id} true while C{d} changes
        it on disk: forgotten until then, and after a failure.
        """
        old = self._recent.get(entry_id)
        self._forget(entry_id)

        def changed(result: object) -> object:
            if isinstance(result, SpoolEntry) and old is not None:
                self._remember(result, old[1])
            return result

        return d.addCallback(changed)

    # -- ISpool -----------------------------------------------------------------

    def receive(self, message_id: str) -> DiskMessageWriter:
        if not _SAFE_ID.match(message_id):
            raise ValueError(f"bad message id {message_id!r}")
        return DiskMessageWriter(self, message_id, self.spill_threshold)

    def discard(self, message: Message) -> Deferred[None]:
        if message.path is None or not self._is_tmp(message.path):
            return defer.succeed(None)
        d = self._run(_unlink, self.fs, message.path)
        d.addCallback(lambda _: None)
        return d

    def _commit(
        self,
        envelopes: Iterable[EnvelopeWithNextHop],
        queue: str,
        reason: str | None,
        received_from: str | None,
    ) -> Deferred[list[SpoolEntry]]:
        job = _Commit(
            envelopes=list(envelopes),
            queue=queue,
            reason=reason,
            received_from=received_from,
            now=self.clock.seconds(),
        )
        return self._committer.submit(job).addCallback(self._committed, job.envelopes)

    def enqueue(
        self, envelopes: Iterable[EnvelopeWithNextHop], received_from: str | None = None
    ) -> Deferred[list[SpoolEntry]]:
        return self._commit(envelopes, ACTIVE, None, received_from)

    def quarantine(
        self,
        envelopes: Iterable[EnvelopeWithNextHop],
        reason: str,
        received_from: str | None = None,
    ) -> Deferred[list[SpoolEntry]]:
        return self._commit(envelopes, QUARANTINE, reason, received_from)

    def entries(self, queue: str) -> Deferred[list[SpoolEntry]]:
        try:
            self.queue_dir(queue)
        except ValueError:
            return defer.fail()

        def report(result: tuple[list[SpoolEntry], list[tuple[str, str]]]) -> list[SpoolEntry]:
            entries, errors = result
            for path, error in errors:
                log.error("unreadable spool entry {path}: {error}", path=path, error=error)
            return entries

        return self._run(self._entries_sync, queue).addCallback(report)

    def get(self, entry_id: str) -> Deferred[SpoolEntry]:
        recent = self._recent.get(entry_id)
        if recent is not None:
            return defer.succeed(recent[0])
        return self._run(self._get_sync, entry_id)

    def message(self, entry_id: str) -> Deferred[Message]:
        recent = self._recent.get(entry_id)
        if recent is not None and recent[1] is not None:
            return defer.succeed(recent[1])
        return self._run(self._message_sync, entry_id)

    def update(self, entry: SpoolEntry) -> Deferred[SpoolEntry]:
        return self._changed(
            entry.id, self._serialized(entry.id, self._run, self._update_sync, entry)
        )

    def move(self, entry_id: str, queue: str) -> Deferred[SpoolEntry]:
        try:
            self.queue_dir(queue)
        except ValueError:
            return defer.fail()
        return self._changed(
            entry_id, self._serialized(entry_id, self._run, self._move_sync, entry_id, queue)
        )

    def finish(self, entry_id: str) -> Deferred[None]:
        def submit() -> Deferred[None]:
            return self._finisher.submit(_Finish(entry_id=entry_id))

        return self._changed(entry_id, self._serialized(entry_id, submit))

    def recover(self) -> Deferred[int]:
        """
        At start-up, before anything else uses the spool: remove what no
        acknowledged entry needs (everything in C{tmp/}, and message files
        that no metadata refers to), logging each.

        @return: a L{Deferred} firing with how many files were removed.
        """

        def report(removed: list[str]) -> int:
            for path in removed:
                log.info("spool recovery: removed unacknowledged {path}", path=path)
            return len(removed)

        return self._run(self._recover_sync).addCallback(report)


def _replace_queue(entry: SpoolEntry, queue: str) -> SpoolEntry:
    return dataclasses.replace(entry, queue=queue)
