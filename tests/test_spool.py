"""
Tests for L{relay.spool.disk.DiskSpool} and L{relay.testing.MemorySpool}.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from typing import Any, Callable
from unittest import skipIf

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relay.interfaces import IMessageWriter, ISpool
from relay.model.address import NULL_SENDER, EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, REMOVED, Attempt
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import Message
from relay.spool.disk import DiskSpool, FileSystem, SpoolLocked, entry_from_json, entry_to_json
from relay.testing import FaultyFileSystem, MemorySpool
from relay.testing import QueuedRunner as ManualRunner

DATA = b"Subject: hello\r\nFrom: s@example.org\r\n\r\nbody\r\n"


def make_envelope(
    envelope_id: str = "env1",
    message: Message | None = None,
    recipients: tuple[str, ...] = ("a@example.com",),
    sender: Sender | None = None,
) -> EnvelopeWithNextHop:
    """
    An envelope with next hops and retry intervals, for spooling.
    """
    if message is None:
        message = Message.from_bytes(DATA)
    env = Envelope(
        id=envelope_id,
        sender=sender if sender is not None else Sender.of("s@example.org"),
        sender_args=(Argument("SIZE", "100"), Argument("SMTPUTF8")),
        recipients=[EmailAddress.parse(r, smtputf8=True) for r in recipients],
        message=message,
        rejected_recipients=[EmailAddress.parse("no@example.com")],
        recipient_args=[(recipients[0], (Argument("NOTIFY", "FAILURE"),))],
    )
    return EnvelopeWithNextHop(env, ["mx.example.net:25"], [60, 300.5])


def read_bytes(message: Message) -> bytes:
    """
    The bytes of C{message}, wherever they are.
    """
    with message.open() as f:
        return f.read()


def synchronous(f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
    """
    A C{run_in_thread} that runs C{f} at once, for tests.
    """
    return defer.maybeDeferred(f, *args, **kw)


class SpoolContractMixin:
    """
    Tests that every L{ISpool} passes.  Subclasses define C{make_spool()}
    and set C{self.clock}.
    """

    clock: Clock

    def make_spool(self) -> Any:
        raise NotImplementedError()

    def spool(self) -> Any:
        self.clock = Clock()
        self.clock.advance(1000.5)
        return self.make_spool()

    def test_interface(self) -> None:
        """
        The spool provides L{ISpool}, its writers L{IMessageWriter}.
        """
        s = self.spool()
        verifyObject(ISpool, s)
        verifyObject(IMessageWriter, s.receive("m1"))

    def test_enqueue_round_trip(self) -> None:
        """
        An enqueued envelope comes back from C{entries}, C{get} and
        C{message} as it went in, active and due now.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()], received_from="helo [1.2.3.4]"))
        self.assertEqual(entry.id, "env1-0")
        self.assertEqual(entry.queue, ACTIVE)
        self.assertEqual(entry.envelope_id, "env1")
        self.assertEqual(entry.created_at, 1000.5)
        self.assertEqual(entry.next_attempt_at, 1000.5)
        self.assertEqual(entry.message_size, len(DATA))
        self.assertEqual(entry.received_from, "helo [1.2.3.4]")
        self.assertEqual(entry.next_hop_choices, ("mx.example.net:25",))
        self.assertEqual(entry.retry_intervals, (60.0, 300.5))
        self.assertEqual(str(entry.sender), "s@example.org")
        self.assertEqual(entry.recipient_args, (("a@example.com", (Argument("NOTIFY", "FAILURE"),)),))
        self.assertEqual(self.successResultOf(s.entries(ACTIVE)), [entry])
        self.assertEqual(self.successResultOf(s.get(entry.id)), entry)
        message = self.successResultOf(s.message(entry.id))
        self.assertEqual(read_bytes(message), DATA)
        self.assertEqual(message.size, len(DATA))
        self.assertEqual(message.header("subject"), "hello")

    def test_several_envelopes_one_message(self) -> None:
        """
        Several envelopes sharing one message get distinct ids and each
        reads the message back.
        """
        s = self.spool()
        message = Message.from_bytes(DATA)
        entries = self.successResultOf(
            s.enqueue(
                [
                    make_envelope(message=message, recipients=("a@example.com",)),
                    make_envelope(message=message, recipients=("b@example.net",)),
                ]
            )
        )
        self.assertEqual([e.id for e in entries], ["env1-0", "env1-1"])
        self.assertEqual(self.successResultOf(s.entries(ACTIVE)), entries)
        for e in entries:
            self.assertEqual(read_bytes(self.successResultOf(s.message(e.id))), DATA)

    def test_ids_bumped_when_taken(self) -> None:
        """
        Enqueuing the same envelope id again picks the next free number.
        """
        s = self.spool()
        [first] = self.successResultOf(s.enqueue([make_envelope()]))
        [second] = self.successResultOf(s.enqueue([make_envelope()]))
        self.assertEqual((first.id, second.id), ("env1-0", "env1-1"))

    def test_ids_counted_per_envelope_id(self) -> None:
        """
        Within one call the number counts from 0 for each envelope id.
        """
        s = self.spool()
        entries = self.successResultOf(
            s.enqueue([make_envelope("env1"), make_envelope("env2"), make_envelope("env1")])
        )
        self.assertEqual([e.id for e in entries], ["env1-0", "env2-0", "env1-1"])

    def test_move(self) -> None:
        """
        C{move} takes an entry from one queue to another and back.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        moved = self.successResultOf(s.move(entry.id, FROZEN))
        self.assertEqual(moved, dataclasses.replace(entry, queue=FROZEN))
        self.assertEqual(self.successResultOf(s.entries(ACTIVE)), [])
        self.assertEqual(self.successResultOf(s.entries(FROZEN)), [moved])
        self.assertEqual(self.successResultOf(s.get(entry.id)).queue, FROZEN)
        self.successResultOf(s.move(entry.id, REMOVED))
        back = self.successResultOf(s.move(entry.id, ACTIVE))
        self.assertEqual(back, entry)
        self.assertEqual(self.successResultOf(s.entries(REMOVED)), [])
        self.assertEqual(read_bytes(self.successResultOf(s.message(entry.id))), DATA)

    def test_move_through_quarantine(self) -> None:
        """
        An entry can be moved into the quarantine and out again, keeping
        its message.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        self.successResultOf(s.move(entry.id, QUARANTINE))
        self.assertEqual(
            [e.id for e in self.successResultOf(s.entries(QUARANTINE))], [entry.id]
        )
        self.assertEqual(self.successResultOf(s.move(entry.id, ACTIVE)), entry)
        self.assertEqual(self.successResultOf(s.entries(QUARANTINE)), [])
        self.assertEqual(read_bytes(self.successResultOf(s.message(entry.id))), DATA)

    def test_update(self) -> None:
        """
        C{update} replaces an entry's metadata, in the queue it is in.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        self.successResultOf(s.move(entry.id, FROZEN))
        changed = dataclasses.replace(
            entry,
            next_attempt_at=2000.25,
            retry_intervals=(300.5,),
            recipients=(),
            failed_recipients=(("a@example.com", "550 5.1.1 no such user"),),
            attempts=(
                Attempt(999.5, "mx2.example.net:25", None, "connect failed", ("a@example.com",)),
                Attempt(
                    1000.5, "mx.example.net:25", 550, "550 5.1.1 no", ("a@example.com",),
                    ("192.0.2.1", 25),
                ),
            ),
            reason="frozen by test",
        )
        updated = self.successResultOf(s.update(changed))
        self.assertEqual(updated, dataclasses.replace(changed, queue=FROZEN))
        self.assertEqual(self.successResultOf(s.get(entry.id)), updated)
        self.assertEqual(updated.last_error, "550 5.1.1 no")

    def test_finish(self) -> None:
        """
        A finished entry is gone, its message too; other entries sharing
        the message keep it.
        """
        s = self.spool()
        message = Message.from_bytes(DATA)
        first, second = self.successResultOf(
            s.enqueue([make_envelope(message=message), make_envelope(message=message)])
        )
        self.assertIsNone(self.successResultOf(s.finish(first.id)))
        self.failureResultOf(s.get(first.id), KeyError)
        self.failureResultOf(s.message(first.id), KeyError)
        self.assertEqual(self.successResultOf(s.entries(ACTIVE)), [second])
        self.assertEqual(read_bytes(self.successResultOf(s.message(second.id))), DATA)

    def test_unknown_id(self) -> None:
        """
        Every operation on an unknown id fails with L{KeyError}.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        self.failureResultOf(s.get("nope-0"), KeyError)
        self.failureResultOf(s.message("nope-0"), KeyError)
        self.failureResultOf(s.move("nope-0", FROZEN), KeyError)
        self.failureResultOf(s.finish("nope-0"), KeyError)
        self.failureResultOf(s.update(dataclasses.replace(entry, id="nope-0")), KeyError)
        self.failureResultOf(s.get("../active/env1-0"), KeyError)

    def test_quarantine_keeps_reason(self) -> None:
        """
        Quarantined envelopes are in the quarantine queue with their
        reason and message, not in the active queue.
        """
        s = self.spool()
        [entry] = self.successResultOf(
            s.quarantine([make_envelope()], "virus found", received_from="x [::1]")
        )
        self.assertEqual(entry.queue, QUARANTINE)
        self.assertEqual(entry.reason, "virus found")
        self.assertEqual(self.successResultOf(s.entries(ACTIVE)), [])
        self.assertEqual(self.successResultOf(s.entries(QUARANTINE)), [entry])
        self.assertEqual(self.successResultOf(s.get(entry.id)), entry)
        self.assertEqual(read_bytes(self.successResultOf(s.message(entry.id))), DATA)

    def test_null_sender_and_utf8(self) -> None:
        """
        The null sender and internationalized addresses survive the spool.
        """
        s = self.spool()
        [entry] = self.successResultOf(
            s.enqueue([make_envelope(sender=NULL_SENDER, recipients=("jörg@bücher.example",))])
        )
        got = self.successResultOf(s.get(entry.id))
        self.assertEqual(got, entry)
        self.assertTrue(got.sender.is_null)
        self.assertEqual(str(got.recipients[0]), "jörg@bücher.example")

    def test_receive_and_enqueue(self) -> None:
        """
        A message received through C{receive} can be enqueued and read back.
        """
        s = self.spool()
        writer = s.receive("m1")
        self.assertFalse(writer.write(DATA[:10]))
        self.assertFalse(writer.write(DATA[10:]))
        self.assertEqual(writer.size, len(DATA))
        self.successResultOf(writer.drained())
        message = self.successResultOf(writer.finish([("Subject", "hello")]))
        self.assertEqual(message.headers, (("Subject", "hello"),))
        self.assertEqual(message.size, len(DATA))
        self.assertEqual(read_bytes(message), DATA)
        [entry] = self.successResultOf(s.enqueue([make_envelope(message=message)]))
        self.assertEqual(read_bytes(self.successResultOf(s.message(entry.id))), DATA)

    def test_unknown_queue(self) -> None:
        """
        Asking for a queue that does not exist fails with L{ValueError}.
        """
        s = self.spool()
        self.failureResultOf(s.entries("bogus"), ValueError)


class MemorySpoolTests(SpoolContractMixin, SynchronousTestCase):
    """
    The contract, for L{MemorySpool}.
    """

    def make_spool(self) -> MemorySpool:
        return MemorySpool(self.clock)

    def test_fail_next_write(self) -> None:
        """
        C{fail_next_write} makes the next enqueue fail, once.
        """
        s = self.spool()
        s.fail_next_write = OSError(errno.ENOSPC, "full")
        self.failureResultOf(s.enqueue([make_envelope()]), OSError)
        self.assertEqual(s.entries_by_id, {})
        self.successResultOf(s.enqueue([make_envelope()]))
        self.assertEqual(list(s.entries_by_id), ["env1-0"])

    def test_discarded(self) -> None:
        """
        Discarded messages are recorded.
        """
        s = self.spool()
        message = Message.from_bytes(DATA)
        self.successResultOf(s.discard(message))
        self.assertEqual(s.discarded, [message])

    def test_default_clock(self) -> None:
        """
        Without a clock, a L{Clock} at 0 is used.
        """
        s = MemorySpool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        self.assertEqual(entry.created_at, 0.0)


class DiskSpoolTests(SpoolContractMixin, SynchronousTestCase):
    """
    The contract, and the files, for L{DiskSpool}.
    """

    def make_spool(self, run: Callable[..., Deferred[Any]] = synchronous, **kw: Any) -> DiskSpool:
        if not hasattr(self, "root"):
            self.root = self.mktemp()
        return DiskSpool(os.path.join(self.root, "spool"), run, self.clock, **kw)

    def files(self, *parts: str) -> list[str]:
        path = os.path.join(self.root, "spool", *parts)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def test_files_after_enqueue(self) -> None:
        """
        After enqueue the metadata is readable JSON in C{active/}, the
        message is in C{messages/}, and C{tmp/} is empty.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        self.assertEqual(self.files("active"), ["env1-0.json"])
        self.assertEqual(self.files("messages"), ["env1-0.eml"])
        self.assertEqual(self.files("tmp"), [])
        with open(os.path.join(self.root, "spool", "active", "env1-0.json")) as f:
            data = json.load(f)
        self.assertEqual(data["version"], 1)
        self.assertEqual(data["sender"], "s@example.org")
        self.assertEqual(data["recipients"], ["a@example.com"])
        self.assertEqual(data["sender_args"], [["SIZE", "100"], ["SMTPUTF8", None]])
        self.assertEqual(entry_from_json(data), entry)
        with open(os.path.join(self.root, "spool", "messages", "env1-0.eml"), "rb") as f:
            self.assertEqual(f.read(), DATA)
        for d in ("tmp", "messages", "active", "frozen", "removed"):
            mode = os.stat(os.path.join(self.root, "spool", d)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o700)

    def test_attempt_address_in_json(self) -> None:
        """
        An attempt's peer address is stored as C{[ip, port]}; an attempt
        written before addresses were recorded reads back without one.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        attempt = Attempt(1000.5, "mx:25", 451, "451 4.3.0 later", ("a@example.com",), ("::1", 25))
        self.successResultOf(s.update(dataclasses.replace(entry, attempts=(attempt,))))
        with open(os.path.join(self.root, "spool", "active", "env1-0.json")) as f:
            data = json.load(f)
        self.assertEqual(data["attempts"][0]["address"], ["::1", 25])
        del data["attempts"][0]["address"]
        [old] = entry_from_json(data).attempts
        self.assertEqual(old, dataclasses.replace(attempt, address=None))

    def test_message_stored_once(self) -> None:
        """
        A message shared by two envelopes is one inode, linked twice.
        """
        s = self.spool()
        message = Message.from_bytes(DATA)
        self.successResultOf(
            s.enqueue([make_envelope(message=message), make_envelope("env2", message=message)])
        )
        a = os.stat(os.path.join(self.root, "spool", "messages", "env1-0.eml"))
        b = os.stat(os.path.join(self.root, "spool", "messages", "env2-0.eml"))
        self.assertEqual(a.st_ino, b.st_ino)
        self.assertEqual(a.st_nlink, 2)

    def test_fsync_each(self) -> None:
        """
        Without syncfs, enqueue fsyncs the body and the metadata, then
        C{messages/}, before renaming the metadata into C{active/}; then
        C{active/} once, before the L{Deferred} fires.
        """
        fs = FaultyFileSystem()
        s = self.spool_with(fs, use_syncfs=False)
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        base = os.path.join(os.path.abspath(self.root), "spool")
        steps = [(name, os.path.relpath(path, base)) for name, path in fs.steps]
        self.assertEqual(
            [step for step in steps if step[0] in ("fsync", "syncfs", "rename")],
            [
                ("fsync", "messages/env1-0.eml"),
                ("fsync", "tmp/env1-0.json"),
                ("fsync", "messages"),
                ("rename", "active/env1-0.json"),
                ("fsync", "active"),
            ],
        )

    @skipIf(not FileSystem.has_syncfs, "no syncfs(2) here")
    def test_syncfs(self) -> None:
        """
        With syncfs, a commit writes its files unsynced, makes them all
        durable with one syncfs, then renames and fsyncs C{active/} once.
        """
        fs = FaultyFileSystem()
        s = self.spool_with(fs, use_syncfs=True)
        self.successResultOf(s.enqueue([make_envelope(), make_envelope("env2")]))
        base = os.path.join(os.path.abspath(self.root), "spool")
        steps = [(name, os.path.relpath(path, base)) for name, path in fs.steps]
        self.assertEqual(
            [step for step in steps if step[0] in ("fsync", "syncfs", "rename")],
            [
                ("syncfs", "."),
                ("rename", "active/env1-0.json"),
                ("rename", "active/env2-0.json"),
                ("fsync", "active"),
            ],
        )

    @skipIf(not FileSystem.has_syncfs, "no syncfs(2) here")
    def test_syncfs_through_descriptor_held_with_lock(self) -> None:
        """
        While the spool is locked, syncfs goes through a descriptor of the
        spool directory opened at lock time (so that it hears of every
        write-back error since then); without the lock, through a new one.
        """
        seen: list[tuple[int, int] | None] = []

        class Recording(FaultyFileSystem):
            def syncfs(self, path: str, fd: int | None = None) -> None:
                seen.append(None if fd is None else (os.fstat(fd).st_dev, os.fstat(fd).st_ino))
                super().syncfs(path, fd)

        s = self.spool_with(Recording(), use_syncfs=True)
        s.lock()
        self.addCleanup(s.unlock)
        self.successResultOf(s.enqueue([make_envelope()]))
        st = os.stat(s.path)
        self.assertEqual(seen, [(st.st_dev, st.st_ino)])
        s.unlock()
        self.successResultOf(s.enqueue([make_envelope("env2")]))
        self.assertEqual(seen[1:], [None])

    def test_syncfs_by_default_where_there_is_one(self) -> None:
        """
        A spool uses syncfs when the platform has it, unless told not to.
        """
        self.clock = Clock()
        self.assertEqual(self.make_spool().use_syncfs, FileSystem.has_syncfs)
        self.assertFalse(self.make_spool(use_syncfs=False).use_syncfs)
        if FileSystem.has_syncfs:
            FileSystem().syncfs(".")  # the call works here

    def spool_with(self, fs: FileSystem, run: Any = synchronous, **kw: Any) -> DiskSpool:
        self.clock = Clock()
        self.clock.advance(1000.5)
        s = self.make_spool(run, fs=fs, **kw)
        d = s.entries(ACTIVE)  # creates the directories
        if isinstance(run, ManualRunner):
            run.run_all()
        self.successResultOf(d)
        del fs.steps[:]
        return s

    @skipIf(not FileSystem.has_syncfs, "no syncfs(2) here")
    def test_group_commit(self) -> None:
        """
        Commits requested while a batch runs wait for it and then go
        together, in one call to the thread pool with one syncfs.
        """
        runner = ManualRunner()
        fs = FaultyFileSystem()
        s = self.spool_with(fs, runner, use_syncfs=True)
        first = s.enqueue([make_envelope("e1")])
        later = [s.enqueue([make_envelope(f"e{i}")]) for i in (2, 3)]
        later.append(s.quarantine([make_envelope("e4")], "spam"))
        self.assertEqual(len(runner.calls), 1)
        runner.run_one()
        self.assertEqual([e.id for e in self.successResultOf(first)], ["e1-0"])
        for d in later:
            self.assertNoResult(d)
        self.assertEqual(len(runner.calls), 1)
        runner.run_one()
        self.assertEqual(runner.calls, [])
        self.assertEqual(
            [[e.id for e in self.successResultOf(d)] for d in later], [["e2-0"], ["e3-0"], ["e4-0"]]
        )
        self.assertEqual([name for name, _ in fs.steps].count("syncfs"), 2)
        self.assertEqual(self.files("active"), ["e1-0.json", "e2-0.json", "e3-0.json"])
        self.assertEqual(self.files("quarantine"), ["e4-0.eml", "e4-0.json"])

    def test_one_commit_of_a_batch_fails(self) -> None:
        """
        A commit that fails while its files are written (ENOSPC) fails
        alone and leaves nothing; the rest of its batch is committed.
        """
        runner = ManualRunner()
        fs = FaultyFileSystem()
        s = self.spool_with(fs, runner)
        s.enqueue([make_envelope("e1")])
        ds = [s.enqueue([make_envelope(f"e{i}")]) for i in (2, 3, 4)]
        runner.run_one()
        fs.fail("create", errno.ENOSPC, "*/tmp/e3-0.json")
        runner.run_all()
        self.successResultOf(ds[0])
        f = self.failureResultOf(ds[1], OSError)
        self.assertEqual(f.value.errno, errno.ENOSPC)
        self.successResultOf(ds[2])
        self.assertEqual(self.files("active"), ["e1-0.json", "e2-0.json", "e4-0.json"])
        self.assertEqual(self.files("messages"), ["e1-0.eml", "e2-0.eml", "e4-0.eml"])
        self.assertEqual(self.files("tmp"), [])

    @skipIf(not FileSystem.has_syncfs, "no syncfs(2) here")
    def test_sync_fails_the_batch(self) -> None:
        """
        When the syncfs of a batch fails (EIO), every commit of the batch
        fails and none of their files remain.
        """
        runner = ManualRunner()
        fs = FaultyFileSystem()
        s = self.spool_with(fs, runner, use_syncfs=True)
        s.enqueue([make_envelope("e1")])
        ds = [s.enqueue([make_envelope(f"e{i}")]) for i in (2, 3)]
        runner.run_one()
        fs.fail("syncfs", errno.EIO)
        runner.run_all()
        for d in ds:
            self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.EIO)
        self.assertEqual(self.files("active"), ["e1-0.json"])
        self.assertEqual(self.files("messages"), ["e1-0.eml"])
        self.assertEqual(self.files("tmp"), [])

    def test_rename_fails_half_way(self) -> None:
        """
        When the second rename of a two-envelope commit fails, the first
        one's metadata is taken back out of C{active/}; the other commit of
        the batch stands.
        """
        runner = ManualRunner()
        fs = FaultyFileSystem()
        s = self.spool_with(fs, runner)
        s.enqueue([make_envelope("e0")])
        message = Message.from_bytes(DATA)
        two = s.enqueue([make_envelope("e1", message=message), make_envelope("e2", message=message)])
        other = s.enqueue([make_envelope("e3")])
        runner.run_one()
        fs.fail("rename", errno.ENOSPC, "*/active/e2-0.json")
        runner.run_all()
        self.failureResultOf(two, OSError)
        self.successResultOf(other)
        self.assertEqual(self.files("active"), ["e0-0.json", "e3-0.json"])
        self.assertEqual(self.files("messages"), ["e0-0.eml", "e3-0.eml"])
        self.assertEqual(self.files("tmp"), [])

    def test_update_fsyncs_before_rename(self) -> None:
        """
        C{update} fsyncs the new metadata before renaming it over the old
        one, and leaves the directory unsynced (losing that rename only
        brings the old state back).
        """
        fs = FaultyFileSystem()
        s = self.spool_with(fs)
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        del fs.steps[:]
        self.successResultOf(s.update(dataclasses.replace(entry, next_attempt_at=5.0)))
        base = os.path.join(os.path.abspath(self.root), "spool")
        self.assertEqual(
            [(name, os.path.relpath(path, base)) for name, path in fs.steps if name != "unlink"],
            [
                ("create", "tmp/env1-0.json"),
                ("write", "tmp/env1-0.json"),
                ("fsync", "tmp/env1-0.json"),
                ("close", "tmp/env1-0.json"),
                ("rename", "active/env1-0.json"),
            ],
        )

    def test_finish_batched(self) -> None:
        """
        Finishes requested while one runs go together as one batch: the
        metadata files go, their directory is fsynced once, and only then
        the messages go.
        """
        runner = ManualRunner()
        fs = FaultyFileSystem()
        s = self.spool_with(fs, runner)
        d = s.enqueue([make_envelope(f"e{i}") for i in range(3)])
        runner.run_all()
        entries = self.successResultOf(d)
        del fs.steps[:]
        ds = [s.finish(e.id) for e in entries]
        self.assertEqual(len(runner.calls), 1)  # the first, alone
        runner.run_one()
        self.assertEqual(len(runner.calls), 1)  # the other two, together
        runner.run_one()
        for d in ds:
            self.successResultOf(d)
        base = os.path.join(os.path.abspath(self.root), "spool")
        steps = [(name, os.path.relpath(path, base)) for name, path in fs.steps]
        self.assertEqual(
            steps,
            [("unlink", "active/e0-0.json"), ("fsync", "active"), ("unlink", "messages/e0-0.eml")]
            + [("unlink", f"active/e{i}-0.json") for i in (1, 2)]
            + [("fsync", "active")]
            + [("unlink", f"messages/e{i}-0.eml") for i in (1, 2)],
        )
        self.assertEqual(self.files("active") + self.files("messages"), [])

    def test_finish_keeps_message_when_sync_fails(self) -> None:
        """
        If the directory cannot be fsynced after the metadata went, the
        message file stays (a power loss could bring the entry back), for
        C{recover} to remove at the next start.
        """
        fs = FaultyFileSystem()
        s = self.spool_with(fs)
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        fs.fail("fsync", errno.EIO, "*/active")
        self.successResultOf(s.finish(entry.id))
        self.assertEqual(self.files("active"), [])
        self.assertEqual(self.files("messages"), ["env1-0.eml"])
        self.assertEqual(self.successResultOf(s.recover()), 1)
        self.assertEqual(self.files("messages"), [])

    def test_fresh_entries_need_no_disk_reads(self) -> None:
        """
        Right after enqueue, C{get} and C{message} answer from memory what
        is on disk; after C{update} the new state, after C{finish} nothing.
        """
        runner = ManualRunner()
        s = self.spool_with(FaultyFileSystem(), runner)
        d = s.enqueue([make_envelope()])
        runner.run_all()
        [entry] = self.successResultOf(d)
        self.assertEqual(self.successResultOf(s.get(entry.id)), entry)
        self.assertEqual(read_bytes(self.successResultOf(s.message(entry.id))), DATA)
        self.assertEqual(runner.calls, [])
        again = self.make_spool()  # reads the disk
        self.assertEqual(self.successResultOf(again.get(entry.id)), entry)
        d = s.update(dataclasses.replace(entry, next_attempt_at=5.0))
        runner.run_all()
        updated = self.successResultOf(d)
        self.assertEqual(self.successResultOf(s.get(entry.id)), updated)
        self.assertEqual(self.successResultOf(again.get(entry.id)), updated)
        d = s.finish(entry.id)
        runner.run_all()
        self.successResultOf(d)
        d = s.get(entry.id)
        runner.run_all()
        self.failureResultOf(d, KeyError)

    def test_remember_handed_over(self) -> None:
        """
        An entry another process wrote, handed over with its message by
        C{remember}, is answered from memory; with C{remember=False} it is
        not kept.
        """
        runner = ManualRunner()
        s = self.spool_with(FaultyFileSystem(), runner)
        writer = self.make_spool()
        [entry] = self.successResultOf(writer.enqueue([make_envelope()]))
        s.remember(entry, Message.from_bytes(DATA))
        self.assertEqual(self.successResultOf(s.get(entry.id)), entry)
        self.assertEqual(read_bytes(self.successResultOf(s.message(entry.id))), DATA)
        self.assertEqual(runner.calls, [])
        off = self.spool_with(FaultyFileSystem(), runner, remember=False)
        off.remember(entry, Message.from_bytes(DATA))
        off.get(entry.id)
        self.assertEqual(len(runner.calls), 1)

    def test_remember_off(self) -> None:
        """
        A spool made with C{remember=False} (a receiving process) keeps
        nothing of what it wrote: C{get} reads the disk.
        """
        runner = ManualRunner()
        s = self.spool_with(FaultyFileSystem(), runner, remember=False)
        d = s.enqueue([make_envelope()])
        runner.run_all()
        [entry] = self.successResultOf(d)
        d = s.get(entry.id)
        self.assertEqual(len(runner.calls), 1)
        runner.run_all()
        self.assertEqual(self.successResultOf(d), entry)

    def test_message_read_into_memory_when_small(self) -> None:
        """
        C{message} of a stored entry holds a small message in memory (so
        sending it needs no more disk reads) and refers to the file of a
        large one.
        """
        s = self.spool()
        small, = self.successResultOf(s.enqueue([make_envelope()]))
        big_data = DATA + b"x" * 300_000
        big, = self.successResultOf(s.enqueue([make_envelope("env2", Message.from_bytes(big_data))]))
        again = self.make_spool()
        m = self.successResultOf(again.message(small.id))
        self.assertEqual((m.data, m.size, m.header("subject")), (DATA, len(DATA), "hello"))
        m = self.successResultOf(again.message(big.id))
        self.assertIsNone(m.data)
        self.assertEqual((read_bytes(m), m.size, m.header("subject")), (big_data, len(big_data), "hello"))

    def test_failure_mid_enqueue_leaves_nothing(self) -> None:
        """
        When a rename fails half-way through, the enqueue fails and no
        metadata or message file of it remains.
        """
        s = self.spool()
        real_rename = os.rename
        calls = []

        def rename(src: str, dst: str) -> None:
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_rename(src, dst)

        self.patch(os, "rename", rename)
        message = Message.from_bytes(DATA)
        f = self.failureResultOf(
            s.enqueue([make_envelope(message=message), make_envelope("env2", message=message)]),
            OSError,
        )
        self.assertEqual(f.value.errno, errno.ENOSPC)
        self.assertEqual(len(calls), 2)
        self.assertEqual(self.files("active"), [])
        self.assertEqual(self.files("messages"), [])
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.successResultOf(s.entries(ACTIVE)), [])

    def test_failure_writing_body(self) -> None:
        """
        When writing the body fails (disk full), nothing is left behind.
        """
        s = self.spool()
        self.successResultOf(s.entries(ACTIVE))

        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "fsync", fsync)
        self.failureResultOf(s.enqueue([make_envelope()]), OSError)
        self.assertEqual(self.files("tmp") + self.files("messages") + self.files("active"), [])

    def test_spill_and_backpressure(self) -> None:
        """
        A large message spills to C{tmp/<id>.eml}; while the disk lags,
        C{write} asks the caller to pause past 1 MiB and C{drained} fires
        once the writes are done.
        """
        runner = ManualRunner()
        self.clock = Clock()
        s = self.make_spool(runner, spill_threshold=1024)
        writer = s.receive("m1")
        self.assertFalse(writer.write(b"x" * 600))
        self.assertEqual(runner.calls, [])
        self.assertFalse(writer.write(b"y" * 600))
        self.assertTrue(writer.spilled)
        self.assertEqual(len(runner.calls), 1)  # one write in flight
        chunk = b"z" * 65536
        paused = [writer.write(chunk) for _ in range(20)]
        self.assertEqual(len(runner.calls), 1)
        self.assertTrue(paused[-1])
        self.assertFalse(paused[0])
        d = writer.drained()
        self.assertNoResult(d)
        runner.run_all()
        self.successResultOf(d)
        self.assertEqual(writer.buffered, 0)
        finished = writer.finish([("Subject", "big")])
        runner.run_all()
        message = self.successResultOf(finished)
        expected = b"x" * 600 + b"y" * 600 + chunk * 20
        self.assertIsNone(message.data)
        self.assertEqual(message.path, os.path.join(s.tmp_dir, "m1.eml"))
        self.assertEqual(message.size, len(expected))
        self.assertEqual(read_bytes(message), expected)
        # enqueueing it consumes the temporary file
        d2 = s.enqueue([make_envelope(message=message)])
        runner.run_all()
        [entry] = self.successResultOf(d2)
        self.assertEqual(self.files("tmp"), [])
        d3 = s.message(entry.id)
        runner.run_all()
        stored = self.successResultOf(d3)
        self.assertEqual(stored.size, len(expected))
        self.assertEqual(stored.header("subject"), None)

    def test_drained_before_idle(self) -> None:
        """
        C{drained} fires as soon as the backlog is back under 1 MiB, even
        while writes go on; C{abort} after C{finish} leaves the file.
        """
        runner = ManualRunner()
        self.clock = Clock()
        s = self.make_spool(runner, spill_threshold=1024)
        writer = s.receive("m1")
        writer.write(b"x" * 1200)
        self.assertTrue(writer.write(b"y" * 1024 * 1024))
        d = writer.drained()
        self.assertNoResult(d)
        runner.run_one()
        self.successResultOf(d)
        self.assertEqual(len(runner.calls), 1)  # the next write is in flight
        finished = writer.finish([])
        runner.run_all()
        message = self.successResultOf(finished)
        self.successResultOf(writer.abort())
        runner.run_all()
        self.assertEqual(os.path.getsize(message.path), 1200 + 1024 * 1024)

    def test_changes_to_one_entry_serialized(self) -> None:
        """
        An update and a move of one entry do not run in the thread pool at
        the same time; changes to other entries are not held up.
        """
        runner = ManualRunner()
        self.clock = Clock()
        s = self.make_spool(runner)
        d = s.enqueue([make_envelope(), make_envelope("env2")])
        runner.run_all()
        first, second = self.successResultOf(d)
        updated = s.update(dataclasses.replace(first, next_attempt_at=5.0))
        moved = s.move(first.id, FROZEN)
        other = s.move(second.id, FROZEN)
        self.assertEqual(len(runner.calls), 2)  # first's update, second's move
        runner.run_all()
        self.assertEqual(self.successResultOf(updated).queue, ACTIVE)
        self.assertEqual(self.successResultOf(moved).next_attempt_at, 5.0)
        self.successResultOf(other)
        self.assertEqual(self.files("active"), [])
        self.assertEqual(self.files("frozen"), ["env1-0.json", "env2-0.json"])
        self.assertEqual(s._entry_locks, {})

    def test_memory_bounded(self) -> None:
        """
        With a disk that keeps up, a large message never holds more than
        one chunk in memory once it spilled.
        """
        s = self.spool()
        writer = s.receive("m2")
        chunk = b"a" * 65536
        peak = 0
        for _ in range(64):
            self.assertFalse(writer.write(chunk))
            peak = max(peak, writer.buffered)
        self.assertLessEqual(peak, 256 * 1024 + len(chunk))
        self.assertEqual(writer.buffered, 0)
        message = self.successResultOf(writer.finish([]))
        self.assertEqual(os.path.getsize(message.path), 64 * 65536)

    def test_abort_and_discard(self) -> None:
        """
        C{abort} removes a spilled writer's file; C{discard} removes a
        received message's file.
        """
        self.clock = Clock()
        s = self.make_spool(synchronous, spill_threshold=10)
        w1 = s.receive("m1")
        w1.write(b"0123456789abc")
        self.assertEqual(self.files("tmp"), ["m1.eml"])
        self.successResultOf(w1.abort())
        self.assertEqual(self.files("tmp"), [])
        w2 = s.receive("m2")
        w2.write(b"0123456789abc")
        message = self.successResultOf(w2.finish([]))
        self.assertEqual(self.files("tmp"), ["m2.eml"])
        self.successResultOf(s.discard(message))
        self.assertEqual(self.files("tmp"), [])
        self.successResultOf(s.discard(Message.from_bytes(DATA)))

    def test_abort_during_write(self) -> None:
        """
        Aborting while a write is in flight removes the file once the
        write is done.
        """
        runner = ManualRunner()
        self.clock = Clock()
        s = self.make_spool(runner, spill_threshold=10)
        w = s.receive("m1")
        w.write(b"0123456789abc")
        d = w.abort()
        self.assertNoResult(d)
        runner.run_all()
        self.successResultOf(d)
        self.assertEqual(w.buffered, 0)
        self.assertEqual(self.files("tmp"), [])

    def test_write_failure_reported_by_finish(self) -> None:
        """
        A failed disk write makes C{finish} fail and leaves no file.
        """
        self.clock = Clock()
        s = self.make_spool(synchronous, spill_threshold=10)
        w = s.receive("m1")
        w.write(b"0123456789abc")

        def fail(data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(w, "_write_sync", fail)
        w.write(b"more")
        self.successResultOf(w.drained())
        self.failureResultOf(w.finish([]), OSError)
        self.assertEqual(self.files("tmp"), [])

    def test_quarantine_files(self) -> None:
        """
        The quarantine directory holds the metadata with its reason and a
        link to the message.
        """
        self.clock = Clock()
        self.root = self.mktemp()
        qpath = os.path.join(self.root, "q")
        s = self.make_spool(quarantine_path=qpath)
        [entry] = self.successResultOf(s.quarantine([make_envelope()], "spam"))
        self.assertEqual(sorted(os.listdir(qpath)), ["env1-0.eml", "env1-0.json"])
        with open(os.path.join(qpath, "env1-0.json")) as f:
            self.assertEqual(json.load(f)["reason"], "spam")
        self.assertEqual(
            os.stat(os.path.join(qpath, "env1-0.eml")).st_ino,
            os.stat(os.path.join(self.root, "spool", "messages", "env1-0.eml")).st_ino,
        )
        self.successResultOf(s.move(entry.id, ACTIVE))
        self.assertEqual(os.listdir(qpath), [])
        self.successResultOf(s.move(entry.id, QUARANTINE))
        self.successResultOf(s.finish(entry.id))
        self.assertEqual(os.listdir(qpath), [])
        self.assertEqual(self.files("messages"), [])

    def test_lock(self) -> None:
        """
        A second spool on the same directory cannot take the lock while
        the first holds it.
        """
        first = self.spool()
        second = self.make_spool()
        first.lock()
        self.addCleanup(first.unlock)
        e = self.assertRaises(SpoolLocked, second.lock)
        self.assertEqual(e.pid, os.getpid())
        self.assertIn(f"(pid {os.getpid()})", str(e))
        self.assertIn("in use by another relay", str(e))
        first.unlock()
        second.lock()
        second.unlock()

    def test_recover(self) -> None:
        """
        C{recover} removes leftovers in C{tmp/} and messages no entry
        refers to, and keeps everything acknowledged.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        root = os.path.join(self.root, "spool")
        for name in ("tmp/m1.eml", "tmp/x-0.json", "messages/orphan-0.eml"):
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"junk")
        self.assertEqual(self.successResultOf(s.recover()), 3)
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.files("messages"), ["env1-0.eml"])
        self.assertEqual(self.successResultOf(s.get(entry.id)), entry)
        self.assertEqual(self.successResultOf(s.recover()), 0)

    def test_restart(self) -> None:
        """
        A new spool on the same directory sees the entries of the old one.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        self.successResultOf(s.move(entry.id, FROZEN))
        again = self.make_spool()
        self.assertEqual(self.successResultOf(again.recover()), 0)
        self.assertEqual(
            self.successResultOf(again.entries(FROZEN)), [dataclasses.replace(entry, queue=FROZEN)]
        )

    def test_corrupt_entry_skipped(self) -> None:
        """
        An unreadable metadata file is logged and skipped by C{entries}.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        with open(os.path.join(self.root, "spool", "active", "bad-0.json"), "w") as f:
            f.write("{not json")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(self.successResultOf(s.entries(ACTIVE)), [entry])
        [event] = [e for e in events if e.get("log_namespace") == "relay.spool.disk"]
        self.assertIn("bad-0.json", event["path"])


class EntryJSONTests(SynchronousTestCase):
    """
    Tests for L{entry_to_json} and L{entry_from_json}.
    """

    def test_round_trip(self) -> None:
        """
        Every field survives a trip through JSON text.
        """
        s = MemorySpool()
        [entry] = s.enqueue([make_envelope(sender=NULL_SENDER)]).result
        entry = dataclasses.replace(
            entry,
            attempts=(Attempt(1.5, "mx:25", None, "connection refused"),),
            failed_recipients=(("b@example.com", "550 no"),),
            reason="why",
        )
        data = json.loads(json.dumps(entry_to_json(entry)))
        self.assertEqual(data["version"], 1)
        self.assertEqual(entry_from_json(data), entry)
        self.assertEqual(entry_from_json(data, FROZEN).queue, FROZEN)

    def test_bad_version(self) -> None:
        """
        Metadata of another version is refused.
        """
        self.assertRaises(ValueError, entry_from_json, {"version": 2})
