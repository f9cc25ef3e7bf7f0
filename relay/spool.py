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

The queue an entry is in is the directory its metadata is in.  Every change
is written to a temporary file, fsynced, renamed into place and the
directory fsynced, so that a crash leaves either the old or the new state.
All file I/O runs through C{run_in_thread}, never on the reactor thread
(except L{DiskSpool.lock}, meant for start-up).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
from typing import IO, Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.address import NULL_SENDER, EmailAddress, Sender
from relay.argument import Argument
from relay.entry import ACTIVE, FROZEN, QUARANTINE, QUEUES, REMOVED, Attempt, SpoolEntry, new_id
from relay.envelope import EnvelopeWithNextHop
from relay.interfaces import IMessageWriter, ISpool
from relay.message import MAX_HEADER_BYTES, Message, header_section, parse_header_block

log = Logger()

VERSION = 1
SPILL_THRESHOLD = 256 * 1024
HIGH_WATER = 1024 * 1024
DIR_MODE = 0o700

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
            }
            for a in entry.attempts
        ],
        "reason": entry.reason,
        "received_from": entry.received_from,
    }


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


# -- blocking helpers (run in the thread pool) --------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_file(path: str, data: bytes) -> None:
    """
    Create C{path} (it must not exist) with C{data}, fsynced.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _link_or_copy(src: str, dst: str) -> None:
    """
    Hard-link C{src} to C{dst}, or copy it (fsynced) across filesystems.
    """
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        tmp = dst + ".tmp"
        try:
            shutil.copyfile(src, tmp)
            _fsync_file(tmp)
            os.rename(tmp, dst)
        except BaseException:
            _unlink(tmp)
            raise


def _encode(entry: SpoolEntry) -> bytes:
    return json.dumps(entry_to_json(entry), indent=1, sort_keys=True).encode("utf-8")


# -- the message writer ---------------------------------------------------------


@implementer(IMessageWriter)
class DiskMessageWriter:
    """
    Receives one message: in memory up to C{spill_threshold} bytes, then
    into C{tmp/<message_id>.eml}, one write in flight at a time.

    @ivar buffered: bytes held in memory (not yet on their way to disk, or
        in flight).
    """

    def __init__(self, spool: DiskSpool, message_id: str, spill_threshold: int) -> None:
        self._spool = spool
        self._run = spool._run
        self.message_id = message_id
        self.path = os.path.join(spool.tmp_dir, message_id + ".eml")
        self._threshold = spill_threshold
        self.size = 0
        self.buffered = 0
        self.spilled = False
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self._in_flight = False
        self._failure: Failure | None = None
        self._aborted = False
        self._done = False
        self._drain_waiters: list[Deferred[None]] = []
        self._idle_waiters: list[Deferred[None]] = []

    # thread side

    def _write_sync(self, data: bytes) -> None:
        if self._file is None:
            self._spool._ensure_dirs()
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._file = open(fd, "wb")
        self._file.write(data)

    def _close_sync(self, fsync: bool) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                f.close()

    def _remove_sync(self) -> None:
        try:
            self._close_sync(fsync=False)
        finally:
            _unlink(self.path)

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
            yield self._run(self._close_sync, True)
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
    """

    def __init__(
        self,
        path: str,
        run_in_thread: Callable[..., Deferred[Any]],
        clock: IReactorTime,
        quarantine_path: str | None = None,
        spill_threshold: int = SPILL_THRESHOLD,
    ) -> None:
        self.path = os.path.abspath(path)
        self._run = run_in_thread
        self.clock = clock
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
        self._lock_file: IO[str] | None = None
        self._entry_locks: dict[str, defer.DeferredLock] = {}

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
        f = open(os.path.join(self.path, "lock"), "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
            f.close()
            raise SpoolLocked(self.path, int(text) if text.isdigit() else None) from None
        except BaseException:
            f.close()
            raise
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        """
        Release the lock taken by L{lock}.
        """
        f, self._lock_file = self._lock_file, None
        if f is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()

    # -- blocking helpers (thread side) -----------------------------------------

    def _ensure_dirs(self) -> None:
        if self._dirs_ready:
            return
        for d in (self.path, self.tmp_dir, self.messages_dir, *self._queue_dirs.values()):
            os.makedirs(d, mode=DIR_MODE, exist_ok=True)
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

    def _install_json(self, entry: SpoolEntry, queue: str, created: list[str]) -> None:
        """
        Write C{entry}'s metadata into C{queue}: temporary file, fsync,
        rename.  Paths that exist because of this are added to C{created}.
        The caller fsyncs the queue directory.
        """
        dest = self._json_path(queue, entry.id)
        if queue == QUARANTINE:
            tmp = dest + ".tmp"
        else:
            tmp = os.path.join(self.tmp_dir, entry.id + ".json")
        created.append(tmp)
        _unlink(tmp)
        _write_file(tmp, _encode(entry))
        created.append(dest)
        os.rename(tmp, dest)
        created.remove(tmp)

    def _is_tmp(self, path: str) -> bool:
        return os.path.dirname(os.path.abspath(path)) == self.tmp_dir

    def _link_fresh(
        self, body: str, envelope: EnvelopeWithNextHop, n: int
    ) -> tuple[str, str, int]:
        """
        Link C{body} into C{messages/} under the first free id
        C{<envelope id>-<m>}, C{m >= n}; the link taking the name is what
        makes the id ours.

        @return: the id, the path of the link, and C{m + 1}.
        """
        if _SAFE_ID.match(f"{envelope.envelope.id}-{n}") is None:
            raise ValueError(f"bad envelope id {envelope.envelope.id!r}")
        while True:
            entry_id = f"{envelope.envelope.id}-{n}"
            eml = self._eml_path(entry_id)
            try:
                os.link(body, eml)
            except FileExistsError:
                n += 1
                continue
            return entry_id, eml, n + 1

    def _commit_sync(
        self,
        envelopes: list[EnvelopeWithNextHop],
        queue: str,
        reason: str | None,
        received_from: str | None,
        now: float,
    ) -> list[SpoolEntry]:
        self._ensure_dirs()
        created: list[str] = []
        consumed: list[str] = []
        bodies: dict[int, str] = {}
        try:
            # 1. every message body durably in a file
            for e in envelopes:
                message = e.envelope.message
                if id(message) in bodies:
                    continue
                if message.data is not None:
                    body = os.path.join(self.tmp_dir, new_id() + ".eml")
                    created.append(body)
                    _write_file(body, message.data)
                    consumed.append(body)
                elif message.path is not None:
                    body = message.path
                    _fsync_file(body)
                    if self._is_tmp(body):
                        consumed.append(body)
                else:
                    raise ValueError("message has neither data nor path")
                bodies[id(message)] = body
            # 2. link each body into messages/ under a fresh entry id
            ids: list[str] = []
            counters: dict[str, int] = {}
            for e in envelopes:
                entry_id, eml, counters[e.envelope.id] = self._link_fresh(
                    bodies[id(e.envelope.message)], e, counters.get(e.envelope.id, 0)
                )
                created.append(eml)
                ids.append(entry_id)
                if queue == QUARANTINE:
                    q_eml = self._quarantine_eml(entry_id)
                    _unlink(q_eml)
                    created.append(q_eml)
                    _link_or_copy(eml, q_eml)
            _fsync_dir(self.messages_dir)
            if queue == QUARANTINE:
                _fsync_dir(self.quarantine_path)
            # 3. the metadata, renamed into the queue
            entries = []
            for entry_id, e in zip(ids, envelopes, strict=True):
                entry = entry_for(entry_id, queue, e, now, reason, received_from)
                self._install_json(entry, queue, created)
                entries.append(entry)
            _fsync_dir(self.queue_dir(queue))
        except BaseException:
            for path in reversed(created):
                try:
                    _unlink(path)
                except OSError:
                    pass
            raise
        # 4. committed: the temporary bodies are not needed any more
        for body in consumed:
            _unlink(body)
        return entries

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
            head = f.read(MAX_HEADER_BYTES)
        return Message(parse_header_block(header_section(head)), size, path=path)

    def _update_sync(self, entry: SpoolEntry) -> SpoolEntry:
        queue = self._find(entry.id)
        if entry.queue != queue:
            entry = _replace_queue(entry, queue)
        created: list[str] = []
        try:
            self._install_json(entry, queue, created)
        except BaseException:
            # only the temporary file may be left; the old metadata stands
            for path in created:
                if not path.endswith(".json") or os.path.dirname(path) != self.queue_dir(queue):
                    _unlink(path)
            raise
        _fsync_dir(self.queue_dir(queue))
        return entry

    def _move_sync(self, entry_id: str, queue: str) -> SpoolEntry:
        source = self._find(entry_id)
        entry = self._read(source, entry_id)
        if source == queue:
            return entry
        moved = _replace_queue(entry, queue)
        if queue == QUARANTINE:
            q_eml = self._quarantine_eml(entry_id)
            _unlink(q_eml)
            _link_or_copy(self._eml_path(entry_id), q_eml)
            _fsync_dir(self.quarantine_path)
        src = self._json_path(source, entry_id)
        try:
            os.rename(src, self._json_path(queue, entry_id))
        except OSError as e:
            if e.errno != errno.EXDEV:
                if queue == QUARANTINE:
                    _unlink(self._quarantine_eml(entry_id))
                raise
            # the quarantine is on another filesystem: copy, then remove
            created: list[str] = []
            self._install_json(moved, queue, created)
            _fsync_dir(self.queue_dir(queue))
            os.unlink(src)
        _fsync_dir(self.queue_dir(queue))
        _fsync_dir(self.queue_dir(source))
        if source == QUARANTINE:
            _unlink(self._quarantine_eml(entry_id))
            _fsync_dir(self.quarantine_path)
        return moved

    def _finish_sync(self, entry_id: str) -> None:
        queue = self._find(entry_id)
        os.unlink(self._json_path(queue, entry_id))
        _fsync_dir(self.queue_dir(queue))
        _unlink(self._eml_path(entry_id))
        _fsync_dir(self.messages_dir)
        if queue == QUARANTINE:
            _unlink(self._quarantine_eml(entry_id))
            _fsync_dir(self.quarantine_path)

    def _recover_sync(self) -> list[str]:
        self._ensure_dirs()
        removed = []
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        for name in os.listdir(self.quarantine_path):
            if name.endswith(".tmp"):
                path = os.path.join(self.quarantine_path, name)
                os.unlink(path)
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
                os.unlink(path)
                removed.append(path)
        for name in os.listdir(self.quarantine_path):
            if name.endswith(".eml") and (QUARANTINE, name[: -len(".eml")]) not in referenced:
                path = os.path.join(self.quarantine_path, name)
                os.unlink(path)
                removed.append(path)
        for d in (self.tmp_dir, self.messages_dir, self.quarantine_path):
            _fsync_dir(d)
        return removed

    def _serialized(self, entry_id: str, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run C{f(*args)} in the thread once earlier changes to the same
        entry are done, so that e.g. an update and a move of one entry
        cannot interleave in the thread pool.
        """
        lock = self._entry_locks.get(entry_id)
        if lock is None:
            lock = self._entry_locks[entry_id] = defer.DeferredLock()

        def release(result: object) -> object:
            if not lock.locked and not lock.waiting:
                self._entry_locks.pop(entry_id, None)
            return result

        return lock.run(self._run, f, *args).addBoth(release)

    # -- ISpool -----------------------------------------------------------------

    def receive(self, message_id: str) -> DiskMessageWriter:
        if not _SAFE_ID.match(message_id):
            raise ValueError(f"bad message id {message_id!r}")
        return DiskMessageWriter(self, message_id, self.spill_threshold)

    def discard(self, message: Message) -> Deferred[None]:
        if message.path is None or not self._is_tmp(message.path):
            return defer.succeed(None)
        d = self._run(_unlink, message.path)
        d.addCallback(lambda _: None)
        return d

    def enqueue(
        self, envelopes: Iterable[EnvelopeWithNextHop], received_from: str | None = None
    ) -> Deferred[list[SpoolEntry]]:
        return self._run(
            self._commit_sync, list(envelopes), ACTIVE, None, received_from, self.clock.seconds()
        )

    def quarantine(
        self,
        envelopes: Iterable[EnvelopeWithNextHop],
        reason: str,
        received_from: str | None = None,
    ) -> Deferred[list[SpoolEntry]]:
        return self._run(
            self._commit_sync,
            list(envelopes),
            QUARANTINE,
            reason,
            received_from,
            self.clock.seconds(),
        )

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
        return self._run(self._get_sync, entry_id)

    def message(self, entry_id: str) -> Deferred[Message]:
        return self._run(self._message_sync, entry_id)

    def update(self, entry: SpoolEntry) -> Deferred[SpoolEntry]:
        return self._serialized(entry.id, self._update_sync, entry)

    def move(self, entry_id: str, queue: str) -> Deferred[SpoolEntry]:
        try:
            self.queue_dir(queue)
        except ValueError:
            return defer.fail()
        return self._serialized(entry_id, self._move_sync, entry_id, queue)

    def finish(self, entry_id: str) -> Deferred[None]:
        return self._serialized(entry_id, self._finish_sync, entry_id)

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
