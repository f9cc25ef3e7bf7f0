"""
Crash safety of the spool's group commit: a process that dies at any step
of a batch leaves, after restart and recovery, either no trace of each
commit or the whole of it, never a half-written entry; and a model of
what a power loss keeps shows that nothing is renamed into a queue before
its message and metadata are durable, and nothing is acknowledged before
that rename is durable.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relay import EmailAddress, Envelope, EnvelopeWithNextHop, Message, Sender
from relay.model.entry import ACTIVE, QUARANTINE
from relay.spool.disk import DiskSpool
from relay.spool.fs import FileSystem
from relay.testing import FaultyFileSystem, QueuedRunner

MESSAGE = b"Subject: crash\r\nMessage-ID: <c@example.com>\r\n\r\n" + b"body line\r\n" * 50


class Crash(Exception):
    """
    The process died here.
    """


class CrashingFileSystem(FaultyFileSystem):
    """
    A disk under a process that dies before step C{crash_at} (counted from
    1; C{None}: never): that step and every later one (the clean-up a live
    process would do) raise L{Crash}.

    It also keeps a model of what a power loss would keep: which inodes
    have data not yet fsynced, and which directory entries (created,
    linked, renamed, unlinked) are not yet durable.  C{violations} lists
    every metadata rename into a queue made while the message or the
    metadata it refers to could still be lost.
    """

    def __init__(self, crash_at: int | None, queue_dirs: list[str], messages_dir: str) -> None:
        super().__init__()
        self.crash_at = crash_at
        self.dead = False
        self.queue_dirs = queue_dirs
        self.messages_dir = messages_dir
        self.dirty_data: set[int] = set()
        self.dirty_names: set[tuple[str, str]] = set()
        self.inodes: dict[int, int] = {}
        self.violations: list[str] = []

    def step(self, name: str, path: str) -> None:
        if self.dead:
            raise Crash(name)
        super().step(name, path)
        if self.crash_at is not None and len(self.steps) == self.crash_at:
            self.dead = True
            raise Crash(name)

    def _name_changed(self, path: str) -> None:
        self.dirty_names.add((os.path.dirname(path), os.path.basename(path)))

    def durable_name(self, path: str) -> bool:
        return (os.path.dirname(path), os.path.basename(path)) not in self.dirty_names

    def create(self, path: str) -> int:
        fd = super().create(path)
        self.inodes[fd] = os.fstat(fd).st_ino
        self._name_changed(path)
        return fd

    def write(self, fd: int, data: bytes) -> None:
        super().write(fd, data)
        self.dirty_data.add(self.inodes[fd])

    def close(self, fd: int) -> None:
        self.inodes.pop(fd, None)
        super().close(fd)

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self.dirty_data.discard(self.inodes[fd])

    def fsync_path(self, path: str) -> None:
        super().fsync_path(path)
        if os.path.isdir(path):
            self.dirty_names = {(d, n) for d, n in self.dirty_names if d != path}
        else:
            self.dirty_data.discard(os.stat(path).st_ino)

    def syncfs(self, path: str, fd: int | None = None) -> None:
        super().syncfs(path, fd)
        self.dirty_data.clear()
        self.dirty_names.clear()

    def link(self, src: str, dst: str) -> None:
        super().link(src, dst)
        self._name_changed(dst)

    def unlink(self, path: str) -> None:
        super().unlink(path)
        self._name_changed(path)

    def copy(self, src: str, dst: str) -> None:
        super().copy(src, dst)
        self.dirty_data.add(os.stat(dst).st_ino)
        self._name_changed(dst)

    def rename(self, src: str, dst: str) -> None:
        if os.path.dirname(dst) in self.queue_dirs and dst.endswith(".json"):
            entry_id = os.path.basename(dst)[: -len(".json")]
            eml = os.path.join(self.messages_dir, entry_id + ".eml")
            if os.stat(src).st_ino in self.dirty_data:
                self.violations.append(f"{dst}: metadata not durable")
            if not os.path.exists(eml) or not self.durable_name(eml):
                self.violations.append(f"{dst}: {eml} not durable")
            elif os.stat(eml).st_ino in self.dirty_data:
                self.violations.append(f"{dst}: message data not durable")
        super().rename(src, dst)
        self._name_changed(src)
        self._name_changed(dst)


def synchronous(f: Any, *args: Any, **kw: Any) -> Any:
    return defer.maybeDeferred(f, *args, **kw)


def envelopes(message: Message, count: int, envelope_id: str = "crashenvelope") -> list[EnvelopeWithNextHop]:
    envelope = Envelope(
        id=envelope_id,
        sender=Sender.of("a@example.com"),
        sender_args=[],
        recipients=[EmailAddress.parse("b@example.org")],
        message=message,
    )
    return [EnvelopeWithNextHop(envelope, ["127.0.0.1:25"]) for _ in range(count)]


class CommitCrashTests(SynchronousTestCase):
    """
    Kill a commit batch before each of its disk steps in turn (creates,
    writes, closes, links, renames, fsyncs, syncfs), with the clean-up a
    live process would do failing too, then restart on the same directory.
    Each test runs with syncfs and with an fsync per file.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def spool(self, root: str, fs: Any = None, run: Any = synchronous, use_syncfs: bool = True) -> DiskSpool:
        return DiskSpool(
            os.path.join(root, "spool"),
            run,
            self.clock,
            quarantine_path=os.path.join(root, "quarantine"),
            fs=fs,
            use_syncfs=use_syncfs,
        )

    def filesystem(self, root: str, crash_at: int | None) -> CrashingFileSystem:
        root = os.path.abspath(root)
        base = os.path.join(root, "spool")
        return CrashingFileSystem(
            crash_at,
            [os.path.join(base, ACTIVE), os.path.join(root, "quarantine")],
            os.path.join(base, "messages"),
        )

    def restart(self, root: str) -> tuple[DiskSpool, list[Any]]:
        spool = self.spool(root)
        self.successResultOf(spool.recover())
        # nothing else writes: every unreferenced message is an orphan
        self.successResultOf(spool.sweep(before=float("inf")))
        entries = self.successResultOf(spool.entries(ACTIVE))
        entries += self.successResultOf(spool.entries(QUARANTINE))
        return spool, entries

    def check_every_step(
        self, commit: Callable[[DiskSpool, str], list[Deferred[Any]]], use_syncfs: bool
    ) -> None:
        """
        Run C{commit(spool, root)} (which returns the Deferreds of its
        commits) once to count its steps, then once per step with a crash
        before that step.
        """
        root = self.mktemp()
        fs = self.filesystem(root, None)
        runner = QueuedRunner()
        ds = commit(self.spool(root, fs, runner, use_syncfs), root)
        runner.run_all()
        for d in ds:
            for entry in self.successResultOf(d):
                # acknowledged only once the rename into the queue is durable
                self.assertTrue(
                    fs.durable_name(self.spool(root).layout.metadata_path(entry.queue, entry.id))
                )
        self.assertEqual(fs.violations, [])
        total = len(fs.steps)
        self.assertGreater(total, 6)
        outcomes = set()
        for crash_at in range(1, total + 1):
            root = self.mktemp()
            fs = self.filesystem(root, crash_at)
            runner = QueuedRunner()
            ds = commit(self.spool(root, fs, runner, use_syncfs), root)
            runner.run_all()
            self.assertEqual(fs.violations, [], crash_at)
            acknowledged = set()
            for d in ds:
                result = self.successResultOf(d.addErrback(lambda f: f.trap(Crash) and []))
                acknowledged |= {e.id for e in result}
            spool, entries = self.restart(root)
            survivors = {e.id for e in entries}
            # nothing acknowledged is lost
            self.assertLessEqual(acknowledged, survivors, crash_at)
            # never half-written: each entry that survived is whole
            for entry in entries:
                stored = self.successResultOf(spool.message(entry.id))
                with stored.open() as f:
                    self.assertEqual(f.read(), MESSAGE, (crash_at, entry.id))
                self.assertEqual([str(r) for r in entry.recipients], ["b@example.org"])
            # recovery leaves no debris: no temporary file, no message file
            # without an entry
            base = os.path.join(root, "spool")
            self.assertEqual(os.listdir(os.path.join(base, "tmp")), [], crash_at)
            emls = {n[: -len(".eml")] for n in os.listdir(os.path.join(base, "messages"))}
            self.assertEqual(emls, survivors, crash_at)
            quarantined = {e.id for e in entries if e.queue == QUARANTINE}
            self.assertEqual(
                sorted(os.listdir(os.path.join(root, "quarantine"))),
                sorted([i + ".eml" for i in quarantined] + [i + ".json" for i in quarantined]),
                crash_at,
            )
            outcomes.add(len(entries))
        # crash points before the first rename leave nothing (no 250 was
        # sent), later ones leave whole entries
        self.assertIn(0, outcomes)
        self.assertGreater(max(outcomes), 0)

    def spilled(self, root: str) -> Message:
        """
        A message already in a temporary spool file (as large ones are).
        """
        spool = DiskSpool(os.path.join(root, "spool"), synchronous, self.clock, spill_threshold=16)
        writer = spool.receive("spilledmessage")
        writer.write(MESSAGE)
        message = self.successResultOf(writer.finish(()))
        self.assertIsNotNone(message.path)
        return message

    def both_ways(self, commit: Callable[[DiskSpool, str], list[Deferred[Any]]]) -> None:
        if FileSystem.has_syncfs:
            self.check_every_step(commit, use_syncfs=True)
        self.check_every_step(commit, use_syncfs=False)

    def test_in_memory_message(self) -> None:
        """
        A small message (held in memory until the commit) with one envelope.
        """
        self.both_ways(lambda spool, root: [spool.enqueue(envelopes(Message.from_bytes(MESSAGE), 1))])

    def test_shared_message(self) -> None:
        """
        One message that the plugin sent as three envelopes: every crash
        point leaves whole entries only.
        """
        self.both_ways(lambda spool, root: [spool.enqueue(envelopes(Message.from_bytes(MESSAGE), 3))])

    def test_spilled_message(self) -> None:
        """
        A message already in a temporary spool file, sent as two envelopes.
        """
        self.both_ways(lambda spool, root: [spool.enqueue(envelopes(self.spilled(root), 2))])

    def test_batch(self) -> None:
        """
        Several commits in one batch (an enqueue of a shared message, a
        spilled message, a quarantine) behind a first one: a crash anywhere
        in either batch loses nothing acknowledged and leaves whole entries.
        """

        def commit(spool: DiskSpool, root: str) -> list[Deferred[Any]]:
            spilled = self.spilled(root)
            return [
                spool.enqueue(envelopes(Message.from_bytes(MESSAGE), 1, "first")),
                spool.enqueue(envelopes(Message.from_bytes(MESSAGE), 2, "second")),
                spool.enqueue(envelopes(spilled, 1, "third")),
                spool.quarantine(envelopes(Message.from_bytes(MESSAGE), 1, "fourth"), "spam"),
            ]

        self.both_ways(commit)

    def test_batches_counted(self) -> None:
        """
        The commits above run as two batches: the first alone, the three
        requested while it ran together, with one syncfs each (or one
        fsync of C{messages/} each, without syncfs).
        """
        root = self.mktemp()
        fs = self.filesystem(root, None)
        runner = QueuedRunner()
        spool = self.spool(root, fs, runner, use_syncfs=FileSystem.has_syncfs)
        ds = [spool.enqueue(envelopes(Message.from_bytes(MESSAGE), 1, f"e{i}")) for i in range(4)]
        self.assertEqual(len(runner.calls), 1)
        runner.run_all()
        for d in ds:
            self.successResultOf(d)
        if FileSystem.has_syncfs:
            self.assertEqual([name for name, _ in fs.steps].count("syncfs"), 2)
        else:
            self.assertEqual(fs.steps.count(("fsync", spool.layout.messages_dir)), 2)
        self.assertEqual(fs.violations, [])
