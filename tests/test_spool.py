"""
Tests for the spools: the contract every L{ISpool} keeps (run against
L{relay.spool.disk.DiskSpool} with a synchronous runner and under a
L{relay.testing.QueuedRunner}, L{relay.spool.memory.MemorySpool}, and an
L{relay.spool.observed.ObservedSpool} over each), the disk spool's files
and durability, and the codec, layout and read cache it is made of.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import stat
import subprocess
import sys
from typing import Any, Callable, Sequence
from unittest import skipIf

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relay.interfaces import IMessageWriter, ISpool, ISpoolObserver
from relay.model.address import NULL_SENDER, EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, REMOVED, Attempt, SpoolEntry
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import Message
from relay.spool import lock as lock_module
from relay.spool.codec import (
    FILE_VERSION,
    decode_entry,
    encode_entry,
    entry_from_json,
    entry_to_json,
)
from relay.spool.disk import DiskSpool
from relay.spool.fs import FileSystem
from relay.spool.layout import NotASpool, SpoolLayout, control_in_spool, is_safe_id
from relay.spool.lock import SpoolLock, SpoolLocked
from relay.spool.observed import ObservedSpool
from relay.spool.recent import RecentEntries
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
    Tests that every L{ISpool} passes (as C{txacme}'s store tests do, one
    mixin for every implementation).  Subclasses define C{make_spool()},
    which may use C{self.clock}, and C{settle()} when the spool's work
    waits for the test (a L{ManualRunner}): the contract calls it before
    it looks at a result, so that every change requested before then has
    run, batched as it piled up.
    """

    clock: Clock
    successResultOf: Callable[..., Any]
    failureResultOf: Callable[..., Any]

    def make_spool(self) -> Any:
        raise NotImplementedError()

    def settle(self) -> None:
        """
        Run whatever the spool handed to its thread runner.
        """

    def spool(self) -> Any:
        self.clock = Clock()
        self.clock.advance(1000.5)
        return self.make_spool()

    def done(self, d: Deferred[Any]) -> Any:
        """
        The result of C{d}, once the spool's pending work has run.
        """
        self.settle()
        return self.successResultOf(d)

    def failed(self, d: Deferred[Any], *errors: type[BaseException]) -> Any:
        """
        The failure of C{d} (one of C{errors}), once the spool's pending
        work has run.
        """
        self.settle()
        return self.failureResultOf(d, *errors)

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
        [entry] = self.done(s.enqueue([make_envelope()], received_from="helo [1.2.3.4]"))
        self.assertEqual(entry.id, "env1-0")
        self.assertEqual(entry.queue, ACTIVE)
        self.assertEqual(entry.envelope_id, "env1")
        self.assertEqual(entry.created_at, 1000.5)
        self.assertEqual(entry.next_attempt_at, 1000.5)
        self.assertEqual(entry.message_size, len(DATA))
        self.assertEqual(entry.received_from, "helo [1.2.3.4]")
        self.assertEqual(entry.next_hop_choices, ("mx.example.net:25",))
        self.assertEqual((entry.schedule, entry.step), ((60.0, 300.5), 0))
        self.assertEqual(str(entry.sender), "s@example.org")
        self.assertEqual(entry.recipient_args, (("a@example.com", (Argument("NOTIFY", "FAILURE"),)),))
        self.assertEqual(self.done(s.entries(ACTIVE)), [entry])
        self.assertEqual(self.done(s.get(entry.id)), entry)
        message = self.done(s.message(entry.id))
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
        entries = self.done(
            s.enqueue(
                [
                    make_envelope(message=message, recipients=("a@example.com",)),
                    make_envelope(message=message, recipients=("b@example.net",)),
                ]
            )
        )
        self.assertEqual([e.id for e in entries], ["env1-0", "env1-1"])
        self.assertEqual(self.done(s.entries(ACTIVE)), entries)
        for e in entries:
            self.assertEqual(read_bytes(self.done(s.message(e.id))), DATA)

    def test_ids_bumped_when_taken(self) -> None:
        """
        Enqueuing the same envelope id again picks the next free number.
        """
        s = self.spool()
        [first] = self.done(s.enqueue([make_envelope()]))
        [second] = self.done(s.enqueue([make_envelope()]))
        self.assertEqual((first.id, second.id), ("env1-0", "env1-1"))

    def test_ids_counted_per_envelope_id(self) -> None:
        """
        Within one call the number counts from 0 for each envelope id.
        """
        s = self.spool()
        entries = self.done(
            s.enqueue([make_envelope("env1"), make_envelope("env2"), make_envelope("env1")])
        )
        self.assertEqual([e.id for e in entries], ["env1-0", "env2-0", "env1-1"])

    def test_move(self) -> None:
        """
        C{move} takes an entry from one queue to another and back.
        """
        s = self.spool()
        [entry] = self.done(s.enqueue([make_envelope()]))
        moved = self.done(s.move(entry.id, FROZEN))
        self.assertEqual(moved, dataclasses.replace(entry, queue=FROZEN))
        self.assertEqual(self.done(s.entries(ACTIVE)), [])
        self.assertEqual(self.done(s.entries(FROZEN)), [moved])
        self.assertEqual(self.done(s.get(entry.id)).queue, FROZEN)
        self.done(s.move(entry.id, REMOVED))
        back = self.done(s.move(entry.id, ACTIVE))
        self.assertEqual(back, entry)
        self.assertEqual(self.done(s.entries(REMOVED)), [])
        self.assertEqual(read_bytes(self.done(s.message(entry.id))), DATA)

    def test_move_through_quarantine(self) -> None:
        """
        An entry can be moved into the quarantine and out again, keeping
        its message.
        """
        s = self.spool()
        [entry] = self.done(s.enqueue([make_envelope()]))
        self.done(s.move(entry.id, QUARANTINE))
        self.assertEqual(
            [e.id for e in self.done(s.entries(QUARANTINE))], [entry.id]
        )
        self.assertEqual(self.done(s.move(entry.id, ACTIVE)), entry)
        self.assertEqual(self.done(s.entries(QUARANTINE)), [])
        self.assertEqual(read_bytes(self.done(s.message(entry.id))), DATA)

    def test_update(self) -> None:
        """
        C{update} replaces an entry's metadata, in the queue it is in.
        """
        s = self.spool()
        [entry] = self.done(s.enqueue([make_envelope()]))
        self.done(s.move(entry.id, FROZEN))
        changed = dataclasses.replace(
            entry,
            next_attempt_at=2000.25,
            schedule=(300.5,),
            step=1,
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
        updated = self.done(s.update(changed))
        self.assertEqual(updated, dataclasses.replace(changed, queue=FROZEN))
        self.assertEqual(self.done(s.get(entry.id)), updated)
        self.assertEqual(updated.last_error, "550 5.1.1 no")

    def test_finish(self) -> None:
        """
        A finished entry is gone, its message too; other entries sharing
        the message keep it.
        """
        s = self.spool()
        message = Message.from_bytes(DATA)
        first, second = self.done(
            s.enqueue([make_envelope(message=message), make_envelope(message=message)])
        )
        self.assertIsNone(self.done(s.finish(first.id)))
        self.failed(s.get(first.id), KeyError)
        self.failed(s.message(first.id), KeyError)
        self.assertEqual(self.done(s.entries(ACTIVE)), [second])
        self.assertEqual(read_bytes(self.done(s.message(second.id))), DATA)

    def test_unknown_id(self) -> None:
        """
        Every operation on an unknown id fails with L{KeyError}.
        """
        s = self.spool()
        [entry] = self.done(s.enqueue([make_envelope()]))
        self.failed(s.get("nope-0"), KeyError)
        self.failed(s.message("nope-0"), KeyError)
        self.failed(s.move("nope-0", FROZEN), KeyError)
        self.failed(s.finish("nope-0"), KeyError)
        self.failed(s.update(dataclasses.replace(entry, id="nope-0")), KeyError)
        self.failed(s.get("../active/env1-0"), KeyError)

    def test_quarantine_keeps_reason(self) -> None:
        """
        Quarantined envelopes are in the quarantine queue with their
        reason and message, not in the active queue.
        """
        s = self.spool()
        [entry] = self.done(
            s.quarantine([make_envelope()], "virus found", received_from="x [::1]")
        )
        self.assertEqual(entry.queue, QUARANTINE)
        self.assertEqual(entry.reason, "virus found")
        self.assertEqual(self.done(s.entries(ACTIVE)), [])
        self.assertEqual(self.done(s.entries(QUARANTINE)), [entry])
        self.assertEqual(self.done(s.get(entry.id)), entry)
        self.assertEqual(read_bytes(self.done(s.message(entry.id))), DATA)

    def test_null_sender_and_utf8(self) -> None:
        """
        The null sender and internationalized addresses survive the spool.
        """
        s = self.spool()
        [entry] = self.done(
            s.enqueue([make_envelope(sender=NULL_SENDER, recipients=("jörg@bücher.example",))])
        )
        got = self.done(s.get(entry.id))
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
        self.done(writer.drained())
        message = self.done(writer.finish([("Subject", "hello")]))
        self.assertEqual(message.headers, (("Subject", "hello"),))
        self.assertEqual(message.size, len(DATA))
        self.assertEqual(read_bytes(message), DATA)
        [entry] = self.done(s.enqueue([make_envelope(message=message)]))
        self.assertEqual(read_bytes(self.done(s.message(entry.id))), DATA)

    def test_unknown_queue(self) -> None:
        """
        Asking for a queue that does not exist fails with L{ValueError}.
        """
        s = self.spool()
        self.failed(s.entries("bogus"), ValueError)

    def test_shared_message_through_quarantine(self) -> None:
        """
        Two quarantined envelopes sharing one message: one moved to the
        active queue and the other finished in the quarantine, the moved
        one still reads the message; once it is finished too, nothing of
        either is left.
        """
        s = self.spool()
        message = Message.from_bytes(DATA)
        first, second = self.done(
            s.quarantine([make_envelope(message=message), make_envelope(message=message)], "spam")
        )
        moved = self.done(s.move(first.id, ACTIVE))
        self.assertEqual((moved.queue, moved.reason), (ACTIVE, "spam"))
        self.assertIsNone(self.done(s.finish(second.id)))
        self.assertEqual(self.done(s.entries(QUARANTINE)), [])
        self.assertEqual(self.done(s.entries(ACTIVE)), [moved])
        self.assertEqual(read_bytes(self.done(s.message(first.id))), DATA)
        self.done(s.finish(first.id))
        self.assertEqual(self.done(s.entries(ACTIVE)), [])
        self.failed(s.message(first.id), KeyError)
        self.failed(s.get(second.id), KeyError)

    def test_commits_requested_together(self) -> None:
        """
        Enqueues and a quarantine requested before any of them is done
        each get their own entries (ids counted past those the others
        took), and all of them are stored.
        """
        s = self.spool()
        ds = [s.enqueue([make_envelope()]) for _ in range(3)]
        ds.append(s.quarantine([make_envelope("env2")], "virus"))
        ids = [[e.id for e in self.done(d)] for d in ds]
        self.assertEqual(ids, [["env1-0"], ["env1-1"], ["env1-2"], ["env2-0"]])
        self.assertEqual(
            [e.id for e in self.done(s.entries(ACTIVE))], ["env1-0", "env1-1", "env1-2"]
        )
        self.assertEqual([e.id for e in self.done(s.entries(QUARANTINE))], ["env2-0"])

    def test_changes_requested_together_apply_in_order(self) -> None:
        """
        An update and then a move of one entry, requested together, both
        take effect: the moved entry has the updated metadata.
        """
        s = self.spool()
        [entry] = self.done(s.enqueue([make_envelope()]))
        updated = s.update(dataclasses.replace(entry, next_attempt_at=5.0))
        moved = s.move(entry.id, FROZEN)
        self.assertEqual(self.done(updated).queue, ACTIVE)
        expected = dataclasses.replace(entry, queue=FROZEN, next_attempt_at=5.0)
        self.assertEqual(self.done(moved), expected)
        self.assertEqual(self.done(s.get(entry.id)), expected)
        self.assertEqual(self.done(s.entries(FROZEN)), [expected])

    def test_entries_oldest_first(self) -> None:
        """
        C{entries} lists a queue oldest first, whatever the ids.
        """
        s = self.spool()
        self.done(s.enqueue([make_envelope("zzz")]))
        self.clock.advance(1)
        self.done(s.enqueue([make_envelope("aaa")]))
        self.assertEqual([e.id for e in self.done(s.entries(ACTIVE))], ["zzz-0", "aaa-0"])

    def test_move_to_its_own_queue(self) -> None:
        """
        Moving an entry to the queue it is in changes nothing; moving it to
        a queue that does not exist fails with L{ValueError}.
        """
        s = self.spool()
        [entry] = self.done(s.enqueue([make_envelope()]))
        self.assertEqual(self.done(s.move(entry.id, ACTIVE)), entry)
        self.failed(s.move(entry.id, "bogus"), ValueError)
        self.assertEqual(self.done(s.entries(ACTIVE)), [entry])

    def test_finish_twice(self) -> None:
        """
        Finishing an entry that is gone fails with L{KeyError}.
        """
        s = self.spool()
        [entry] = self.done(s.enqueue([make_envelope()]))
        self.done(s.finish(entry.id))
        self.failed(s.finish(entry.id), KeyError)

    def test_abort_and_discard(self) -> None:
        """
        A writer can be aborted, and a received message that is not spooled
        discarded; neither leaves an entry.
        """
        s = self.spool()
        writer = s.receive("m1")
        writer.write(DATA)
        self.settle()
        writer.abort()
        other = s.receive("m2")
        other.write(DATA)
        message = self.done(other.finish([]))
        self.assertIsNone(self.done(s.discard(message)))
        for queue in (ACTIVE, FROZEN, REMOVED, QUARANTINE):
            self.assertEqual(self.done(s.entries(queue)), [])


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
        self.assertEqual(data["version"], 2)
        self.assertEqual(data["sender"], "s@example.org")
        self.assertEqual(data["recipients"], ["a@example.com"])
        self.assertEqual(data["sender_args"], [["SIZE", "100"], ["SMTPUTF8", None]])
        self.assertEqual(entry_from_json(data), entry)
        with open(os.path.join(self.root, "spool", "messages", "env1-0.eml"), "rb") as f:
            self.assertEqual(f.read(), DATA)
        for d in ("tmp", "messages", "active", "frozen", "removed"):
            mode = os.stat(os.path.join(self.root, "spool", d)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o700)

    def test_stale_metadata_tmp_replaced(self) -> None:
        """
        A temporary metadata file a crash left under the id a commit takes
        (in C{tmp/}, or beside the quarantine) is replaced, not an error.
        """
        s = self.spool()
        s.recover()
        for queue, tmp in (
            (ACTIVE, os.path.join(self.root, "spool", "tmp", "env1-0.json")),
            (QUARANTINE, None),
        ):
            if tmp is None:
                tmp = s.layout.metadata_tmp(QUARANTINE, "env2-0")
            with open(tmp, "w") as f:
                f.write("half a file")
            if queue == ACTIVE:
                [entry] = self.successResultOf(s.enqueue([make_envelope()]))
                self.assertEqual(self.files("active"), ["env1-0.json"])
            else:
                [entry] = self.successResultOf(s.quarantine([make_envelope("env2")], "why"))
            self.assertFalse(os.path.exists(tmp))
            self.assertEqual(self.successResultOf(s.get(entry.id)), entry)

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

    def test_update_durable_before_rename(self) -> None:
        """
        C{update} makes the new metadata (with its mtime set to the next
        attempt) durable before renaming it over the old one: one syncfs,
        or an fsync of the file where there is no syncfs; the directory is
        left unsynced (losing that rename only brings the old state back).
        """
        head = [("create", "tmp/env1-0.json"), ("write", "tmp/env1-0.json"),
                ("set_mtime", "tmp/env1-0.json")]  # fmt: skip
        for use_syncfs, durable in (
            (True, [("close", "tmp/env1-0.json"), ("syncfs", ".")]),
            (False, [("fsync", "tmp/env1-0.json"), ("close", "tmp/env1-0.json")]),
        ):
            self.root = self.mktemp()
            base = os.path.join(os.path.abspath(self.root), "spool")
            fs = FaultyFileSystem()
            s = self.spool_with(fs, use_syncfs=use_syncfs)
            [entry] = self.successResultOf(s.enqueue([make_envelope()]))
            del fs.steps[:]
            self.successResultOf(s.update(dataclasses.replace(entry, next_attempt_at=5.0)))
            self.assertEqual(
                [(name, os.path.relpath(path, base)) for name, path in fs.steps if name != "unlink"],
                head + durable + [("rename", "active/env1-0.json")],
            )

    def test_updates_batched(self) -> None:
        """
        Updates requested while one batch runs go together into the next:
        one syncfs for all of them, then their renames.
        """
        runner = ManualRunner()
        fs = FaultyFileSystem()
        s = self.spool_with(fs, runner, use_syncfs=True)
        d = s.enqueue([make_envelope(f"env{i}") for i in range(4)])
        runner.run_all()
        entries = self.successResultOf(d)
        del fs.steps[:]
        first = s.update(dataclasses.replace(entries[0], next_attempt_at=7.0))
        rest = [s.update(dataclasses.replace(e, next_attempt_at=8.0)) for e in entries[1:]]
        runner.run_all()
        self.assertEqual([self.successResultOf(d).next_attempt_at for d in [first, *rest]],
                         [7.0, 8.0, 8.0, 8.0])  # fmt: skip
        self.assertEqual([name for name, _ in fs.steps].count("syncfs"), 2)

    def test_update_batch_sync_fails(self) -> None:
        """
        When the batch cannot be made durable, every update of it fails
        and the old metadata stands, with nothing left in tmp/.
        """
        runner = ManualRunner()
        fs = FaultyFileSystem()
        s = self.spool_with(fs, runner, use_syncfs=True)
        d = s.enqueue([make_envelope(f"env{i}") for i in range(2)])
        runner.run_all()
        entries = self.successResultOf(d)
        fs.fail("syncfs", errno.EIO, times=2)
        updates = [s.update(dataclasses.replace(e, next_attempt_at=9.0)) for e in entries]
        runner.run_all()
        for d in updates:
            self.failureResultOf(d, OSError)
        for entry in entries:
            d = s.get(entry.id)
            runner.run_all()
            self.assertEqual(self.successResultOf(d).next_attempt_at, entry.next_attempt_at)
        self.assertEqual(os.listdir(s.layout.tmp_dir), [])

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
        the sweep after the next start to remove.
        """
        fs = FaultyFileSystem()
        s = self.spool_with(fs)
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        fs.fail("fsync", errno.EIO, "*/active")
        self.successResultOf(s.finish(entry.id))
        self.assertEqual(self.files("active"), [])
        self.assertEqual(self.files("messages"), ["env1-0.eml"])
        self.assertEqual(self.successResultOf(s.sweep(before=float("inf"))), 1)
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
        self.assertEqual(message.path, os.path.join(s.layout.tmp_dir, "m1.eml"))
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
        C{recover} removes leftovers in C{tmp/}; the sweep removes
        messages no entry refers to that were made before the given time
        (a newer one may be a commit under way), and keeps everything
        acknowledged.
        """
        s = self.spool()
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        root = os.path.join(self.root, "spool")
        for name in ("tmp/m1.eml", "tmp/x-0.json", "messages/orphan-0.eml",
                     "messages/arriving-0.eml"):  # fmt: skip
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"junk")
        os.utime(os.path.join(root, "messages/orphan-0.eml"), (1000.0, 1000.0))
        os.utime(os.path.join(root, "messages/arriving-0.eml"), (3000.0, 3000.0))
        self.assertEqual(self.successResultOf(s.recover()), 2)
        self.assertEqual(self.files("tmp"), [])
        self.assertEqual(self.successResultOf(s.sweep(before=2000.0)), 1)
        self.assertEqual(self.files("messages"), ["arriving-0.eml", "env1-0.eml"])
        self.assertEqual(self.successResultOf(s.get(entry.id)), entry)
        self.assertEqual(self.successResultOf(s.recover()), 0)

    def test_sweep_after_lock(self) -> None:
        """
        By default the sweep spares every file made since the spool's lock
        was taken (minus the filesystem's clock margin): a relay does not
        remove what its own commits under way, or its receivers', made.
        """
        s = self.spool()
        s.lock()
        self.addCleanup(s.unlock)
        self.successResultOf(s.recover())  # makes the directories
        with open(os.path.join(self.root, "spool", "messages", "fresh-0.eml"), "wb") as f:
            f.write(b"in flight")
        self.assertEqual(self.successResultOf(s.sweep()), 0)
        self.assertEqual(self.files("messages"), ["fresh-0.eml"])

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


class QueuedDiskSpoolTests(SpoolContractMixin, SynchronousTestCase):
    """
    The contract, for L{DiskSpool} under a L{ManualRunner}: nothing runs
    until the contract looks at a result, so that changes requested
    together go through the batches (group commit, batched finish) and the
    per-entry serialization as they do under load.
    """

    def make_spool(self) -> DiskSpool:
        self.runner = ManualRunner()
        return DiskSpool(os.path.join(self.mktemp(), "spool"), self.runner, self.clock)

    def settle(self) -> None:
        self.runner.run_all()

    def test_waits_for_the_runner(self) -> None:
        """
        The spool's work waits for the runner here: without it nothing
        is committed (so that the contract's other tests do go through
        the queued paths).
        """
        s = self.spool()
        d = s.enqueue([make_envelope()])
        self.assertNoResult(d)
        self.assertEqual(len(self.runner.calls), 1)
        self.assertEqual([e.id for e in self.done(d)], ["env1-0"])


@implementer(ISpoolObserver)
class RecordingObserver:
    """
    An L{ISpoolObserver} that records what it is told.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def spooled(
        self, entries: Sequence[SpoolEntry], envelopes: Sequence[EnvelopeWithNextHop]
    ) -> None:
        self.calls.append(("spooled", list(entries), list(envelopes)))

    def quarantined(self, entries: Sequence[SpoolEntry], reason: str) -> None:
        self.calls.append(("quarantined", list(entries), reason))


class ObservedSpoolContractMixin(SpoolContractMixin):
    """
    The contract, for an L{ObservedSpool} over the spool of
    C{make_observed()}, and what the observer is told.
    """

    def make_observed(self) -> Any:
        raise NotImplementedError()

    def make_spool(self) -> ObservedSpool:
        self.observer = RecordingObserver()
        return ObservedSpool(self.make_observed(), self.observer)

    def test_observer_provides_interface(self) -> None:
        """
        The recording observer of these tests is a whole L{ISpoolObserver}.
        """
        verifyObject(ISpoolObserver, RecordingObserver())

    def test_observer_told_of_commits(self) -> None:
        """
        After an enqueue the observer hears of its entries with the
        envelopes they came from; after a quarantine, of its entries with
        the reason; other changes are not news.
        """
        s = self.spool()
        envelopes = [make_envelope(), make_envelope("env2")]
        entries = self.done(s.enqueue(iter(envelopes)))
        self.assertEqual(self.observer.calls, [("spooled", entries, envelopes)])
        del self.observer.calls[:]
        [q] = self.done(s.quarantine([make_envelope("env3")], "virus"))
        self.assertEqual(self.observer.calls, [("quarantined", [q], "virus")])
        del self.observer.calls[:]
        self.done(s.move(q.id, ACTIVE))
        self.done(s.update(dataclasses.replace(entries[0], next_attempt_at=5.0)))
        self.done(s.finish(entries[1].id))
        self.assertEqual(self.observer.calls, [])


class ObservedMemorySpoolTests(ObservedSpoolContractMixin, SynchronousTestCase):
    """
    The contract, for an L{ObservedSpool} over a L{MemorySpool}; and what
    happens when a commit or the observer fails.
    """

    def make_observed(self) -> MemorySpool:
        self.inner = MemorySpool(self.clock)
        return self.inner

    def test_failed_commit_not_reported(self) -> None:
        """
        A commit that fails is not reported, and fails as it did.
        """
        s = self.spool()
        self.inner.fail_next_write = OSError(errno.ENOSPC, "full")
        self.failureResultOf(s.enqueue([make_envelope()]), OSError)
        self.inner.fail_next_write = OSError(errno.EIO, "broken")
        self.failureResultOf(s.quarantine([make_envelope()], "spam"), OSError)
        self.assertEqual(self.observer.calls, [])

    def test_observer_failure_does_not_fail_the_commit(self) -> None:
        """
        An observer that raises is logged; the commit's L{Deferred} still
        fires with the entries, which are stored.
        """
        s = self.spool()

        def broken(*args: Any) -> None:
            raise RuntimeError("observer broke")

        self.observer.spooled = broken  # type: ignore[method-assign]
        self.observer.quarantined = broken  # type: ignore[method-assign]
        [entry] = self.successResultOf(s.enqueue([make_envelope()]))
        [q] = self.successResultOf(s.quarantine([make_envelope("env2")], "spam"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(self.successResultOf(s.get(entry.id)), entry)
        self.assertEqual(self.successResultOf(s.get(q.id)), q)


class ObservedDiskSpoolTests(ObservedSpoolContractMixin, SynchronousTestCase):
    """
    The contract, for an L{ObservedSpool} over a L{DiskSpool} with a
    synchronous runner.
    """

    def make_observed(self) -> DiskSpool:
        return DiskSpool(os.path.join(self.mktemp(), "spool"), synchronous, self.clock)


class ObservedQueuedDiskSpoolTests(ObservedSpoolContractMixin, SynchronousTestCase):
    """
    The contract, for an L{ObservedSpool} over a L{DiskSpool} under a
    L{ManualRunner}; and the observer hears only of what is committed.
    """

    def make_observed(self) -> DiskSpool:
        self.runner = ManualRunner()
        return DiskSpool(os.path.join(self.mktemp(), "spool"), self.runner, self.clock)

    def settle(self) -> None:
        self.runner.run_all()

    def test_observer_waits_for_the_commit(self) -> None:
        """
        Until the batch has run (the entries are durable) the observer
        hears nothing.
        """
        s = self.spool()
        d = s.enqueue([make_envelope()])
        self.assertEqual(self.observer.calls, [])
        self.runner.run_all()
        [entry] = self.successResultOf(d)
        self.assertEqual([c[:2] for c in self.observer.calls], [("spooled", [entry])])


class CodecTests(SynchronousTestCase):
    """
    Tests for L{relay.spool.codec}: the metadata file and the JSON form of
    an entry.
    """

    def entry(self) -> SpoolEntry:
        s = MemorySpool()
        [entry] = s.enqueue([make_envelope(sender=NULL_SENDER)]).result
        return dataclasses.replace(
            entry,
            attempts=(Attempt(1.5, "mx:25", None, "connection refused", address=("::1", 25)),),
            failed_recipients=(("b@example.com", "550 no"),),
            reason="why",
            message_canonical=True,
        )

    def test_round_trip(self) -> None:
        """
        Every field survives a trip through JSON text.
        """
        entry = self.entry()
        data = json.loads(json.dumps(entry_to_json(entry)))
        self.assertEqual(data["version"], 2)
        self.assertEqual(entry_from_json(data), entry)
        self.assertEqual(entry_from_json(data, FROZEN).queue, FROZEN)

    def test_canonical(self) -> None:
        """
        Whether the message is canonical is written only when it is, and
        an entry's envelope passes it on to its message.
        """
        entry = dataclasses.replace(self.entry(), message_canonical=False)
        self.assertNotIn("message_canonical", entry_to_json(entry))
        self.assertFalse(entry_from_json(entry_to_json(entry)).message_canonical)
        message = Message.from_bytes(b"Subject: x\r\n\r\nbody\r\n")
        self.assertFalse(entry.envelope(message).message.canonical)
        entry = dataclasses.replace(entry, message_canonical=True)
        self.assertTrue(entry_to_json(entry)["message_canonical"])
        self.assertTrue(entry.envelope(message).message.canonical)
        self.assertFalse(entry.envelope(message).message.dot_free)
        self.assertNotIn("message_dot_free", entry_to_json(entry))
        entry = dataclasses.replace(entry, message_dot_free=True)
        self.assertTrue(entry_to_json(entry)["message_dot_free"])
        self.assertTrue(entry_from_json(entry_to_json(entry)).message_dot_free)
        self.assertTrue(entry.envelope(message).message.dot_free)

    def test_file_round_trip(self) -> None:
        """
        A metadata file is one line of compact JSON in L{FILE_VERSION};
        it decodes to the entry, in the queue its directory says.
        """
        entry = self.entry()
        data = encode_entry(entry)
        self.assertEqual(data.count(b"\n"), 1)
        self.assertTrue(data.endswith(b"\n"))
        self.assertNotIn(b", ", data)
        self.assertEqual(json.loads(data)["version"], FILE_VERSION)
        self.assertEqual(decode_entry(data), entry)
        self.assertEqual(decode_entry(data, REMOVED), dataclasses.replace(entry, queue=REMOVED))

    def test_bad_version(self) -> None:
        """
        Metadata of another version, or of none, is refused, as is a file
        that is not a JSON object.
        """
        self.assertRaises(ValueError, entry_from_json, {"version": 3})
        self.assertRaises(ValueError, entry_from_json, {"version": True})
        self.assertRaises(ValueError, entry_from_json, {})
        self.assertRaises(ValueError, decode_entry, b"[1]\n")
        self.assertRaises(ValueError, decode_entry, b"{not json")


class LayoutTests(SynchronousTestCase):
    """
    Tests for L{relay.spool.layout}: where things are, shared by the disk
    spool and relayctl.
    """

    def test_paths(self) -> None:
        """
        Metadata is in its queue's directory (the quarantine elsewhere when
        given), messages in C{messages/}, and new metadata is written in
        C{tmp/}, or beside the quarantine.
        """
        layout = SpoolLayout("s")
        self.assertEqual(
            layout.metadata_path(ACTIVE, "e-0"), os.path.join("s", "active", "e-0.json")
        )
        self.assertEqual(layout.queue_dir(QUARANTINE), os.path.join("s", "quarantine"))
        self.assertEqual(layout.message_path("e-0"), os.path.join("s", "messages", "e-0.eml"))
        self.assertEqual(layout.metadata_tmp(FROZEN, "e-0"), os.path.join("s", "tmp", "e-0.json"))
        elsewhere = SpoolLayout("s", "q")
        self.assertEqual(elsewhere.metadata_tmp(QUARANTINE, "e-0"), os.path.join("q", "e-0.json.tmp"))
        self.assertEqual(elsewhere.quarantined_message_path("e-0"), os.path.join("q", "e-0.eml"))
        self.assertEqual(elsewhere.lock_path, os.path.join("s", "lock"))
        self.assertRaises(ValueError, layout.queue_dir, "bogus")

    def test_safe_ids(self) -> None:
        """
        An id is a plain file name: no separators, no leading dot, not
        empty, at most 200 characters.
        """
        for good in ("abc-0", "A_b.c-1", "x" * 200):
            self.assertTrue(is_safe_id(good), good)
        for bad in ("", ".hidden", "../active/x", "a/b", "x" * 201, "a b", "é"):
            self.assertFalse(is_safe_id(bad), bad)

    def test_control_in_spool(self) -> None:
        """
        The default control endpoint is the socket in the spool, relative
        paths kept relative, colons quoted for the endpoint parser.
        """
        self.assertEqual(control_in_spool("./spool"), "unix:./spool/control.sock")
        self.assertEqual(control_in_spool("spool"), "unix:./spool/control.sock")
        self.assertEqual(control_in_spool("/var/a:b"), "unix:/var/a\\:b/control.sock")

    def test_check(self) -> None:
        """
        A directory that is missing, or has no C{active/}, is not a spool;
        one that L{SpoolLayout.make_directories} made is.
        """
        missing = SpoolLayout(self.mktemp())
        self.assertRaises(NotASpool, missing.check)
        os.makedirs(missing.path)
        e = self.assertRaises(NotASpool, missing.check)
        self.assertIn("has no active/ directory", str(e))
        missing.make_directories()
        missing.check()
        self.assertFalse(missing.quarantine_elsewhere)


class RecentEntriesTests(SynchronousTestCase):
    """
    Tests for L{RecentEntries}, the disk spool's read cache: its bounds.
    """

    def test_bounded(self) -> None:
        """
        At most C{max_entries} entries are held (the oldest forgotten
        first), and messages only while they fit in C{max_bytes}; a message
        that is not in memory is not held.
        """
        s = MemorySpool()
        entries = s.enqueue([make_envelope(f"e{i}") for i in range(4)]).result
        recent = RecentEntries(max_entries=3, max_bytes=2 * len(DATA))
        for entry in entries[:3]:
            recent.remember(entry, Message.from_bytes(DATA))
        self.assertEqual(
            [recent.message(e.id) is not None for e in entries[:3]], [True, True, False]
        )
        recent.remember(entries[3], Message((), 10, path="/elsewhere.eml"))
        self.assertIsNone(recent.entry(entries[0].id))
        self.assertEqual(recent.entry(entries[3].id), entries[3])
        self.assertIsNone(recent.message(entries[3].id))
        recent.forget(entries[1].id)
        recent.remember(entries[0], Message.from_bytes(DATA))
        self.assertIsNotNone(recent.message(entries[0].id))
        off = RecentEntries(max_entries=0)
        off.remember(entries[0], None)
        self.assertIsNone(off.entry(entries[0].id))

    def test_last_change_wins(self) -> None:
        """
        Of two changes of one entry on their way to disk, the entry is held
        as the last one left it (with the message held before), not as the
        first; after a failure, not at all.
        """
        [entry] = MemorySpool().enqueue([make_envelope()]).result
        message = Message.from_bytes(DATA)
        recent = RecentEntries()
        recent.remember(entry, message)
        first: Deferred[Any] = Deferred()
        second: Deferred[Any] = Deferred()
        recent.changing(entry.id, first)
        recent.changing(entry.id, second)
        self.assertIsNone(recent.entry(entry.id))
        first.callback(dataclasses.replace(entry, next_attempt_at=5.0))
        self.assertIsNone(recent.entry(entry.id))
        frozen = dataclasses.replace(entry, queue=FROZEN, next_attempt_at=5.0)
        second.callback(frozen)
        self.assertEqual(recent.entry(entry.id), frozen)
        self.assertIs(recent.message(entry.id), message)
        failing: Deferred[Any] = Deferred()
        recent.changing(entry.id, failing)
        failing.errback(OSError(errno.EIO, "broken"))
        self.failureResultOf(failing, OSError)
        self.assertIsNone(recent.entry(entry.id))
        later: Deferred[Any] = Deferred()
        recent.changing(entry.id, later)
        later.callback(frozen)
        self.assertIsNone(recent.entry(entry.id))  # not held before: not held now


V1_ENTRY = {
    "version": 1,
    "id": "envv1-0",
    "queue": "active",
    "envelope_id": "envv1",
    "sender": "s@example.org",
    "sender_args": [["SIZE", "100"]],
    "recipients": ["a@example.com", "b@example.com"],
    "next_hop_choices": ["mx.example.net:25"],
    "retry_intervals": [600.0, 1200.0, 2400.0],
    "created_at": 1000.0,
    "next_attempt_at": 1900.0,
    "message_size": 2048,
    "recipient_args": [["a@example.com", [["NOTIFY", "FAILURE"]]]],
    "rejected_recipients": [],
    "failed_recipients": [["c@example.com", "550 5.1.1 no such user"]],
    "attempts": [
        {"at": 1000.0 + 100 * i, "hop": "mx.example.net:25", "code": 451,
         "reply": f"451 4.3.0 try {i}", "recipients": ["a@example.com"]}
        for i in range(9)
    ],  # fmt: skip
    "reason": None,
    "received_from": "client [192.0.2.1]",
}


class FormatMigrationTests(SynchronousTestCase):
    """
    Version 1 metadata (the whole remaining schedule and every attempt in
    each file) is read as version 2 with nothing lost that delivery needs,
    and written back as version 2.
    """

    def test_v1_carried_forward(self) -> None:
        """
        The remaining intervals become the entry's own schedule from step
        0; the first and the last five attempts are kept with the count of
        all nine; the failed recipient counts as reported (version 1
        bounced it when it froze the entry); the rest is as it was.
        """
        entry = entry_from_json(V1_ENTRY)
        self.assertEqual((entry.schedule, entry.step), ((600.0, 1200.0, 2400.0), 0))
        self.assertEqual(entry.intervals_left((60.0,)), (600.0, 1200.0, 2400.0))
        self.assertEqual(entry.attempt_count, 9)
        self.assertEqual([a.reply[-1] for a in entry.attempts], ["0", "4", "5", "6", "7", "8"])
        self.assertEqual(entry.failed_recipients, (("c@example.com", "550 5.1.1 no such user"),))
        self.assertEqual(entry.reported, ("c@example.com",))
        self.assertEqual(entry.unreported, ())
        self.assertEqual([str(r) for r in entry.recipients], ["a@example.com", "b@example.com"])
        self.assertEqual(entry.next_hop_choices, ("mx.example.net:25",))
        self.assertEqual(entry.sender_args, (Argument("SIZE", "100"),))
        self.assertEqual(entry.recipient_args, (("a@example.com", (Argument("NOTIFY", "FAILURE"),)),))
        self.assertEqual((entry.created_at, entry.next_attempt_at), (1000.0, 1900.0))
        self.assertEqual(entry.moved_at, 1800.0)  # the last attempt
        self.assertEqual(entry.received_from, "client [192.0.2.1]")
        written = json.loads(encode_entry(entry))
        self.assertEqual(written["version"], FILE_VERSION)
        self.assertEqual(decode_entry(encode_entry(entry)), entry)

    def test_v1_schedules(self) -> None:
        """
        A version 1 entry never tried and given no intervals uses the
        relay's default schedule; one tried with none left has used its
        schedule up, whatever the default is.
        """
        fresh = entry_from_json(dict(V1_ENTRY, retry_intervals=[], attempts=[]))
        self.assertEqual(fresh.intervals_left((60.0, 120.0)), (60.0, 120.0))
        used_up = entry_from_json(dict(V1_ENTRY, retry_intervals=[]))
        self.assertEqual(used_up.intervals_left((60.0, 120.0)), ())

    def test_v2_is_compact(self) -> None:
        """
        A version 2 file leaves out what is at its default, stores no copy
        of the default schedule, and keeps at most six attempt records
        whatever the number of attempts.
        """
        entry = entry_from_json(V1_ENTRY)
        for i in range(100):
            entry = entry.with_attempts(
                [Attempt(3000.0 + i, "mx:25", 451, "451 4.3.0 busy", ("a@example.com",))]
            )
        data = encode_entry(entry)
        self.assertEqual(entry.attempt_count, 109)
        self.assertEqual(len(entry.attempts), 6)
        self.assertLess(len(data), 1400)
        fresh = MemorySpool().enqueue([make_envelope()]).result[0]
        plain = json.loads(encode_entry(dataclasses.replace(fresh, schedule=())))
        self.assertNotIn("schedule", plain)
        self.assertNotIn("attempts", plain)
        self.assertNotIn("reason", plain)


class EntryReplaceTests(SynchronousTestCase):
    """
    L{SpoolEntry.replace} is C{dataclasses.replace}.
    """

    def test_same_as_dataclasses_replace(self) -> None:
        """
        The copy has the changes and the other fields; fields given as
        lists become tuples, as the constructor makes them; the original
        is untouched.
        """
        entry = entry_from_json(V1_ENTRY)
        changes: dict[str, Any] = dict(
            recipients=[EmailAddress("x", "example.org")], step=3, reason="r"
        )
        copy = entry.replace(**changes)
        self.assertEqual(copy, dataclasses.replace(entry, **changes))
        self.assertEqual(copy.recipients, (EmailAddress("x", "example.org"),))
        self.assertIsInstance(copy.recipients, tuple)
        self.assertEqual(entry, entry_from_json(V1_ENTRY))
        self.assertEqual(entry.replace(), entry)

    def test_unknown_field(self) -> None:
        """
        A name that is not a field is a C{TypeError}, as for
        C{dataclasses.replace}.
        """
        entry = entry_from_json(V1_ENTRY)
        self.assertRaises(TypeError, entry.replace, recipient=())
        self.assertRaises(TypeError, dataclasses.replace, entry, recipient=())


class IdTests(SynchronousTestCase):
    """
    Envelope ids carry their creation time and sort by it.
    """

    def test_time_round_trip(self) -> None:
        """
        L{id_time} reads back the time L{new_id} put in, to the
        millisecond, for an envelope id and an entry id.
        """
        from relay.model.entry import id_time, new_id

        made = new_id(1_700_000_123.456)
        self.assertEqual(len(made), 16)
        self.assertTrue(is_safe_id(made))
        self.assertEqual(id_time(made), 1_700_000_123.456)
        self.assertEqual(id_time(made + "-7"), 1_700_000_123.456)
        self.assertIsNone(id_time("env1-0"))
        self.assertIsNone(id_time("ABCDEFGHIJKLMNOP-0"))

    def test_sorted_by_time(self) -> None:
        """
        Ids sort as their times do (the alphabet is in ASCII order), and
        ids made in one millisecond differ.
        """
        from relay.model.entry import new_id

        times = [1e9, 1.5e9, 1.7e9, 1.7e9 + 0.001, 4e9]
        ids = [new_id(t) for t in times]
        self.assertEqual(sorted(ids), ids)
        self.assertEqual(len({new_id(1.7e9) for _ in range(1000)}), 1000)


class DueScanTests(SynchronousTestCase):
    """
    What comes due is found from the active queue's directory alone: file
    names and modification times, which the spool keeps equal to each
    waiting entry's next attempt.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.path = self.mktemp()
        self.spool = DiskSpool(self.path, synchronous, self.clock)

    def test_mtime_is_next_attempt(self) -> None:
        """
        An update of an active entry sets its file's mtime to its next
        attempt; L{DiskSpool.due} lists what is due before a time, soonest
        first, up to a limit, without reading any entry.
        """
        entries = self.successResultOf(
            self.spool.enqueue([make_envelope(f"e{i}") for i in range(5)])
        )
        for i, entry in enumerate(entries):
            self.successResultOf(
                self.spool.update(dataclasses.replace(entry, next_attempt_at=5000.0 + 10 * (4 - i)))
            )
        path = self.spool.layout.metadata_path(ACTIVE, entries[0].id)
        self.assertEqual(os.stat(path).st_mtime, 5040.0)
        due = self.successResultOf(self.spool.due(5031.0, 10))
        self.assertEqual(due, [(5000.0, entries[4].id), (5010.0, entries[3].id),
                               (5020.0, entries[2].id), (5030.0, entries[1].id)])  # fmt: skip
        self.assertEqual(self.successResultOf(self.spool.due(6000.0, 2)),
                         [(5000.0, entries[4].id), (5010.0, entries[3].id)])  # fmt: skip
        self.assertEqual(self.successResultOf(self.spool.due(5000.0, 10)), [])

    def test_count_reads_no_entry(self) -> None:
        """
        L{DiskSpool.count} counts a queue and reads the oldest creation
        time from the ids, even when every metadata file is unreadable.
        """
        from relay.model.entry import new_id

        old, young = new_id(1_600_000_000.0), new_id(1_700_000_000.0)
        self.successResultOf(self.spool.enqueue([make_envelope(young), make_envelope(old)]))
        for name in os.listdir(self.spool.layout.queue_dir(ACTIVE)):
            with open(os.path.join(self.spool.layout.queue_dir(ACTIVE), name), "w") as f:
                f.write("not json")
        count = self.successResultOf(self.spool.count(ACTIVE))
        self.assertEqual(count, (2, 1_600_000_000.0))
        self.assertEqual(self.successResultOf(self.spool.count(FROZEN)), (0, None))
        self.failureResultOf(self.spool.count("nowhere"), ValueError)


def dead_pid() -> int:
    """
    The pid of a process that has ended (and been reaped).
    """
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


class SpoolLockTests(SynchronousTestCase):
    """
    The lock lasts as long as any process holds the open lock file (the
    receivers inherit it), and a relay starting after one that is gone
    waits for its receivers.
    """

    def setUp(self) -> None:
        self.layout = SpoolLayout(os.path.abspath(self.mktemp()))

    def hold(self, pid: int) -> Any:
        """
        Hold the lock as a gone relay's receivers do: another open file,
        with C{pid} written in it.
        """
        os.makedirs(self.layout.path)
        f = open(self.layout.lock_path, "a+")
        self.addCleanup(f.close)
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(f"{pid}\n")
        f.flush()
        return f

    def test_release_leaves_inherited_lock(self) -> None:
        """
        Releasing closes our descriptor only: while a copy of it lives (a
        receiver's), nobody else takes the lock.
        """
        first = SpoolLock(self.layout)
        first.acquire()
        fd = first.fileno()
        assert fd is not None
        inherited = os.dup(fd)
        first.release()
        self.assertIsNone(first.fileno())
        e = self.assertRaises(SpoolLocked, SpoolLock(self.layout, orphan_wait=0).acquire)
        self.assertFalse(e.orphaned)
        os.close(inherited)
        second = SpoolLock(self.layout)
        second.acquire()
        second.release()

    def test_waits_for_receivers_of_gone_relay(self) -> None:
        """
        The pid in the lock is gone but the lock is held: the relay tries
        again until the receivers let go.
        """
        held = self.hold(dead_pid())
        waits: list[float] = []

        def sleep(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 3:
                held.close()

        self.patch(lock_module, "_sleep", sleep)
        lock = SpoolLock(self.layout)
        lock.acquire()
        self.addCleanup(lock.release)
        self.assertEqual(waits, [lock_module.ORPHAN_POLL] * 3)
        with open(self.layout.lock_path) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")

    def test_gives_up_on_receivers(self) -> None:
        """
        Receivers of a gone relay that hold the lock past the wait: the
        error says so.
        """
        pid = dead_pid()
        self.hold(pid)
        self.patch(lock_module, "_sleep", lambda seconds: None)
        e = self.assertRaises(SpoolLocked, SpoolLock(self.layout, orphan_wait=0).acquire)
        self.assertTrue(e.orphaned)
        self.assertEqual(
            str(e),
            f"spool {self.layout.path} is still in use by the receivers of relay pid {pid}, "
            "which is gone",
        )

    def test_live_holder_is_not_waited_for(self) -> None:
        """
        A lock held under a live pid is another relay: refused at once.
        """
        self.hold(os.getpid())
        self.patch(lock_module, "_sleep", lambda seconds: self.fail("waited"))
        e = self.assertRaises(SpoolLocked, SpoolLock(self.layout).acquire)
        self.assertFalse(e.orphaned)
        self.assertEqual(e.pid, os.getpid())
