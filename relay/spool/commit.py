"""
Making the spool's changes durable: the group commit of enqueues and
quarantines, the batched finish, C{update}, C{move}, and the recovery
after a crash.  This is the text to read before changing anything that
writes to a spool directory (the layout is in L{relay.spool.layout}).

What is made durable, and when
------------------------------

The promise is that nothing acknowledged is lost, whether the process is
killed or the machine loses power; anything else may at worst come back
as a duplicate delivery after a power loss (which Postfix accepts too).

C{enqueue} and C{quarantine} are group commits: one committer runs in the
thread pool at a time and takes every commit requested while the
previous batch ran (no timer, so a lone message waits for nothing; see
L{Batcher}).  Per batch (L{Committer.commit_batch}):

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

C{update} is batched too (L{Committer.update_batch}): the new metadata of
every update requested while the previous batch ran is written beside
its queue, made durable at once (one C{syncfs}, or an fsync of each file)
and only then renamed over the old (else a power loss could leave an
empty file where an acknowledged entry was); the directory is not
fsynced: a lost rename brings back the previous state, which only repeats
a delivery attempt.  (A destination that is down defers every entry for
it: a thousand deferrals a second cost a handful of syncs, not a thousand
fsyncs.)  C{move} (operator commands, freezing) is
rare and fsyncs both directories.  C{finish} is batched like commits: the
metadata files are unlinked and their directories fsynced once per batch,
and only then the message files unlinked, unsynced (a message file that
comes back is removed by L{Committer.recover}).  Without that fsync a
power loss could bring back an entry whose message is gone.

Trips to the thread pool: a message costs a share of one commit batch and
of one finish batch (the disk spool's read cache,
L{relay.spool.recent}, spares it the reads).

Everything in L{Committer} blocks: it runs in the thread pool, and every
change goes through the L{FileSystem} seam, so that tests can fail or
kill any step (C{tests/test_crash.py} kills each in turn).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.model.entry import ACTIVE, QUARANTINE, QUEUES, SpoolEntry, entry_for
from relay.model.envelope import EnvelopeWithNextHop
from relay.spool.codec import encode_entry
from relay.spool.fs import FileSystem, link_or_copy, remove_all, unlink_if_present, write_new
from relay.spool.layout import SpoolLayout, is_safe_id
from relay.spool.lock import SpoolLock
from relay.spool.reader import find_queue, read_entry

log = Logger()


# -- batches (reactor side) ----------------------------------------------------


@dataclasses.dataclass(eq=False)
class Job:
    """
    One request in a L{Batcher}: the thread side sets C{result} or
    C{error}.
    """

    done: Deferred[Any] = dataclasses.field(default_factory=Deferred, init=False)
    result: Any = dataclasses.field(default=None, init=False)
    error: BaseException | None = dataclasses.field(default=None, init=False)

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error


class Batcher:
    """
    Group commit: C{process(jobs)} runs in the thread pool with every job
    submitted since the previous call started, one call at a time.  No
    timer: a batch is whatever piled up while the previous one ran, so a
    lone request is not delayed and a busy spool syncs once per batch.
    """

    def __init__(
        self, run: Callable[..., Deferred[Any]], process: Callable[[list[Any]], None]
    ) -> None:
        self._run = run
        self._process = process
        self._pending: list[Job] = []
        self._busy = False

    def submit(self, job: Job) -> Deferred[Any]:
        self._pending.append(job)
        if not self._busy:
            self._next()
        return job.done

    def _next(self) -> None:
        batch, self._pending = self._pending, []
        self._busy = True
        self._run(self._process, batch).addBoth(self._finished, batch)

    def _finished(self, result: object, batch: list[Job]) -> None:
        for job in batch:
            if isinstance(result, Failure):
                # the batch died as a whole (process removed what it could)
                job.fail(result.value)
            if job.error is not None:
                error = job.error
                failure = Failure(error, type(error), error.__traceback__)  # type: ignore[no-untyped-call]
                job.done.errback(failure)
            else:
                job.done.callback(job.result)
        # requests made by those callbacks waited for this batch to end
        self._busy = False
        if self._pending:
            self._next()


@dataclasses.dataclass(eq=False)
class Commit(Job):
    """
    One C{enqueue} or C{quarantine}: its C{result} is the new entries.
    """

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
class Update(Job):
    """
    One C{update}: its C{result} is the entry as written (in the queue it
    is in).
    """

    entry: SpoolEntry | None = None
    #: (the new metadata beside its queue, its place in the queue directory)
    rename: tuple[str, str] | None = None


@dataclasses.dataclass(eq=False)
class Finish(Job):
    """
    One C{finish}: the entry leaves the spool.
    """

    entry_id: str = ""
    queue: str = ""


# -- the changes (thread side) ---------------------------------------------------


class Committer:
    """
    Every change to one spool directory, each made durable as the module
    docstring says.  Blocking: each method runs in the thread pool.

    @param lock: the spool's lock; while it is held, syncfs goes through
        its descriptor of the spool directory.
    @param use_syncfs: make a commit batch durable with one C{syncfs(2)}
        per filesystem (C{True}) or with an fsync of each file and
        directory (C{False}).
    """

    def __init__(
        self, layout: SpoolLayout, fs: FileSystem, lock: SpoolLock, use_syncfs: bool
    ) -> None:
        self.layout = layout
        self.fs = fs
        self.lock = lock
        self.use_syncfs = use_syncfs

    # -- enqueue and quarantine ------------------------------------------------

    def commit_batch(self, commits: list[Commit]) -> None:
        """
        Commit a batch of enqueues and quarantines, setting each one's
        C{result} or C{error}.
        """
        fs = self.fs
        try:
            self.layout.make_directories()
            ok: list[Commit] = []
            for c in commits:
                try:
                    self._prepare(c)
                except Exception as e:
                    c.fail(e)
                    remove_all(fs, c.created)
                else:
                    ok.append(c)
            if ok:
                try:
                    self._make_durable(ok)
                except Exception as e:
                    for c in ok:
                        c.fail(e)
                    raise
            # step 3: the commit point
            renamed: list[Commit] = []
            for c in ok:
                try:
                    for tmp, dest in c.renames:
                        c.created.append(dest)
                        fs.rename(tmp, dest)
                        c.created.remove(tmp)
                except Exception as e:
                    c.fail(e)
                    remove_all(fs, c.created)
                else:
                    renamed.append(c)
            try:
                for directory in sorted({self.layout.queue_dir(c.queue) for c in renamed}):
                    fs.fsync_path(directory)
            except Exception as e:
                for c in renamed:
                    c.fail(e)
                raise
        except BaseException as e:
            for c in commits:
                c.fail(e)
                remove_all(fs, c.created)
            if isinstance(e, Exception):
                return
            raise
        # committed: the spilled bodies are not needed any more
        for c in renamed:
            remove_all(fs, c.consumed)

    def _prepare(self, c: Commit) -> None:
        """
        Step 1 of a commit: the message files and the metadata, not yet
        visible in a queue.  With C{use_syncfs} nothing is synced here.
        """
        fs = self.fs
        layout = self.layout
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
                if layout.is_tmp(message.path):
                    c.consumed.append(message.path)
            else:
                raise ValueError("message has neither data nor path")
            first.setdefault(id(message), eml)
            counters[e.envelope.id] = n
            ids.append(entry_id)
            if c.queue == QUARANTINE:
                q_eml = layout.quarantined_message_path(entry_id)
                unlink_if_present(fs, q_eml)
                c.created.append(q_eml)
                link_or_copy(fs, eml, q_eml)
        # the metadata, beside its queue
        entries = []
        for entry_id, e in zip(ids, c.envelopes, strict=True):
            entry = entry_for(entry_id, c.queue, e, c.now, c.reason, c.received_from)
            tmp = layout.metadata_tmp(c.queue, entry_id)
            c.created.append(tmp)
            # mtime = next attempt (see update_batch): due now, by the
            # spool's clock, which need not be the system's
            mtime = entry.next_attempt_at if c.queue == ACTIVE else None
            data = encode_entry(entry)
            try:
                write_new(fs, tmp, data, sync_each, mtime=mtime)
            except FileExistsError:
                # Left by a crash (the id is fresh: nothing else has it).
                # Removed only then: an unlink that finds nothing was a
                # failing system call for every message.
                fs.unlink(tmp)
                write_new(fs, tmp, data, sync_each, mtime=mtime)
            c.renames.append((tmp, layout.metadata_path(c.queue, entry_id)))
            entries.append(entry)
        c.result = entries

    def _claim_fresh(
        self, envelope: EnvelopeWithNextHop, n: int, claim: Callable[[str], None]
    ) -> tuple[str, str, int]:
        """
        Claim the first free id C{<envelope id>-<m>}, C{m >= n}: C{claim(path)}
        creates C{messages/<id>.eml} or raises C{FileExistsError}; taking the
        name is what makes the id ours.

        @return: the id, the path of the message file, and C{m + 1}.
        """
        if not is_safe_id(f"{envelope.envelope.id}-{n}"):
            raise ValueError(f"bad envelope id {envelope.envelope.id!r}")
        while True:
            entry_id = f"{envelope.envelope.id}-{n}"
            eml = self.layout.message_path(entry_id)
            try:
                claim(eml)
            except FileExistsError:
                n += 1
                continue
            return entry_id, eml, n + 1

    def _link_fresh(self, body: str, envelope: EnvelopeWithNextHop, n: int) -> tuple[str, str, int]:
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

    def _make_durable(self, commits: list[Commit]) -> None:
        """
        Step 2: everything step 1 wrote, durable.
        """
        layout = self.layout
        quarantine = any(c.queue == QUARANTINE for c in commits)
        if self.use_syncfs:
            self.fs.syncfs(layout.path, self.lock.directory_fd)
            if quarantine and layout.quarantine_elsewhere:
                self.fs.syncfs(layout.quarantine_path)
        else:
            # the files were fsynced in step 1; their names:
            self.fs.fsync_path(layout.messages_dir)
            if quarantine:
                self.fs.fsync_path(layout.quarantine_path)

    # -- finish ----------------------------------------------------------------

    def finish_batch(self, jobs: list[Finish]) -> None:
        """
        Remove delivered entries: the metadata, then (once that is durable,
        lest an entry come back without its message) the message files.
        """
        fs = self.fs
        layout = self.layout
        gone: list[Finish] = []
        for job in jobs:
            try:
                job.queue = find_queue(layout, job.entry_id)
                fs.unlink(layout.metadata_path(job.queue, job.entry_id))
            except Exception as e:
                job.fail(e)
            else:
                gone.append(job)
        try:
            for directory in sorted({layout.queue_dir(job.queue) for job in gone}):
                fs.fsync_path(directory)
        except Exception as e:
            # The entries are gone; a power loss might bring them back (a
            # duplicate, not a loss), so keep their messages for that.
            log.warn("finishing {n} entries: {error}", n=len(gone), error=repr(e))
            return
        for job in gone:
            paths = [layout.message_path(job.entry_id)]
            if job.queue == QUARANTINE:
                paths.append(layout.quarantined_message_path(job.entry_id))
            remove_all(fs, paths)

    # -- update and move -------------------------------------------------------

    def update_batch(self, jobs: list[Update]) -> None:
        """
        Replace the metadata of a batch of entries, each in the queue it is
        in (see the module docstring), setting each job's C{result} or
        C{error}.
        """
        fs = self.fs
        layout = self.layout
        written: list[Update] = []
        for job in jobs:
            assert job.entry is not None
            entry = job.entry
            try:
                queue = find_queue(layout, entry.id)
                if entry.queue != queue:
                    entry = entry.replace(queue=queue)
                tmp = layout.metadata_tmp(queue, entry.id)
                unlink_if_present(fs, tmp)
                # A waiting entry's mtime is its next attempt: the scheduler
                # finds what comes due from the directory alone.
                mtime = entry.next_attempt_at if queue == ACTIVE else None
                job.rename = (tmp, layout.metadata_path(queue, entry.id))
                write_new(fs, tmp, encode_entry(entry), sync=not self.use_syncfs, mtime=mtime)
            except Exception as e:
                job.fail(e)
                if job.rename is not None:
                    remove_all(fs, [job.rename[0]])
            else:
                job.result = entry
                written.append(job)
        if not written:
            return
        if self.use_syncfs:
            try:
                fs.syncfs(layout.path, self.lock.directory_fd)
                if layout.quarantine_elsewhere and any(
                    job.result.queue == QUARANTINE for job in written
                ):
                    fs.syncfs(layout.quarantine_path)
            except Exception as e:
                # the old metadata stands, for every entry of the batch
                for job in written:
                    job.fail(e)
                remove_all(fs, [job.rename[0] for job in written if job.rename])
                return
        for job in written:
            assert job.rename is not None
            tmp, dest = job.rename
            try:
                fs.rename(tmp, dest)
            except Exception as e:
                job.fail(e)
                remove_all(fs, [tmp])

    def move(self, entry_id: str, queue: str) -> SpoolEntry:
        """
        Move an entry to C{queue}, through a copy when the quarantine is
        on another filesystem.

        @return: the moved entry.
        """
        fs = self.fs
        layout = self.layout
        source = find_queue(layout, entry_id)
        entry = read_entry(layout, source, entry_id)
        if source == queue:
            return entry
        moved = entry.replace(queue=queue)
        if queue == QUARANTINE:
            q_eml = layout.quarantined_message_path(entry_id)
            unlink_if_present(fs, q_eml)
            link_or_copy(fs, layout.message_path(entry_id), q_eml)
            fs.fsync_path(layout.quarantine_path)
        src = layout.metadata_path(source, entry_id)
        try:
            fs.rename(src, layout.metadata_path(queue, entry_id))
        except OSError as e:
            if e.errno != errno.EXDEV:
                if queue == QUARANTINE:
                    unlink_if_present(fs, layout.quarantined_message_path(entry_id))
                raise
            # the quarantine is on another filesystem: copy, then remove
            tmp = layout.metadata_tmp(queue, entry_id)
            unlink_if_present(fs, tmp)
            try:
                write_new(fs, tmp, encode_entry(moved), sync=True)
                fs.rename(tmp, layout.metadata_path(queue, entry_id))
            except BaseException:
                remove_all(fs, [tmp])
                raise
            fs.fsync_path(layout.queue_dir(queue))
            fs.unlink(src)
        fs.fsync_path(layout.queue_dir(queue))
        fs.fsync_path(layout.queue_dir(source))
        if source == QUARANTINE:
            unlink_if_present(fs, layout.quarantined_message_path(entry_id))
        return moved

    # -- after a crash ---------------------------------------------------------

    def recover(self) -> list[str]:
        """
        At start-up, before anything else writes to the spool, remove what
        no acknowledged entry needs and that is quick to find: everything
        in C{tmp/}, and partial files beside the quarantine.

        @return: the paths removed.
        """
        layout = self.layout
        layout.make_directories()
        fs = self.fs
        removed = []
        for name in os.listdir(layout.tmp_dir):
            path = os.path.join(layout.tmp_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                fs.unlink(path)
            removed.append(path)
        for path in layout.partial_quarantine_files():
            fs.unlink(path)
            removed.append(path)
        for d in (layout.tmp_dir, layout.quarantine_path):
            fs.fsync_path(d)
        return removed

    def sweep(self, before: float) -> list[str]:
        """
        Remove message files that no metadata refers to (a crash between
        a commit's steps, or after a finish removed the metadata), made
        before C{before}: a message file made since may belong to a commit
        under way (here or in a receiver), whose metadata is not in its
        queue yet.  It
        looks each message up in the queues rather than holding every
        id, so that a million entries cost time in a background thread,
        not memory; nothing waits for it.

        @return: the paths removed.
        """
        layout = self.layout
        fs = self.fs
        removed = []

        def orphaned(entry_id: str, queues: tuple[str, ...]) -> bool:
            return not any(os.path.exists(layout.metadata_path(q, entry_id)) for q in queues)

        for directory, queues in (
            (layout.messages_dir, QUEUES),
            (layout.quarantine_path, (QUARANTINE,)),
        ):
            try:
                names = os.scandir(directory)
            except FileNotFoundError:
                continue
            with names:
                for item in names:
                    if not item.name.endswith(".eml"):
                        continue
                    entry_id = item.name[: -len(".eml")]
                    path = item.path
                    if _newer(path, before) or not orphaned(entry_id, queues):
                        continue
                    # a second look: a move between queues may have been
                    # under way
                    if orphaned(entry_id, queues):
                        unlink_if_present(fs, path)
                        removed.append(path)
        if removed:
            fs.fsync_path(layout.messages_dir)
        return removed


def _newer(path: str, since: float) -> bool:
    """
    Was C{path} made (or changed) since C{since}?  Gone counts as new:
    there is nothing to remove.
    """
    try:
        return os.lstat(path).st_mtime >= since
    except FileNotFoundError:
        return True
