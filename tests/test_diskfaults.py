"""
Disk faults (issue 6): a full disk (ENOSPC) or a failing one (EIO) at any
step of spooling a message, seen through the real L{SMTPServerProtocol}
over a real L{DiskSpool}: the client gets C{452 4.3.1} or C{451 4.3.0}, no
file of that message remains, the session carries on, and the next
message is accepted once the fault is gone.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Callable
from unittest import skipIf

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relay.model.entry import ACTIVE
from relay.model.envelope import EnvelopeWithNextHop
from relay.model.results import Send
from relay.simple import Simple
from relay.smtp.server import SMTPServerFactory
from relay.spool.disk import DiskSpool
from relay.spool.fs import FileSystem
from relay.testing import FaultyFileSystem, QueuedRunner, ServerHarness

BODY = "Subject: faults\r\n\r\n" + "line of the body\r\n" * 20

SESSION_START = """
< 220
> HELO client.example
< 250
"""

ONE_MESSAGE = """
> MAIL FROM:<a@example.org>
< 250 2.1.0 Ok
> RCPT TO:<b@example.com>
< 250 2.1.5 Ok
> DATA
< 354
"""

FULL = "452 4.3.1 Insufficient system storage"
FAILED = "451 4.3.0 Local error in processing, try again later"

#: where a fault can hit a message held in memory: (step, path pattern)
COMMIT_STEPS = [
    ("create", "*/messages/*.eml"),
    ("write", "*/messages/*.eml"),
    ("close", "*/messages/*.eml"),
    ("create", "*/tmp/*.json"),
    ("write", "*/tmp/*.json"),
    ("close", "*/tmp/*.json"),
    ("rename", "*/active/*.json"),
    ("fsync", "*/spool/active"),
]
SYNCFS_STEPS = [("syncfs", "*")]
FSYNC_STEPS = [
    ("fsync", "*/messages/*.eml"),
    ("fsync", "*/tmp/*.json"),
    ("fsync", "*/spool/messages"),
]
#: and a message that spilled to tmp/ while it was received
SPILLED_STEPS = [
    ("create", "*/tmp/*.eml"),
    ("write", "*/tmp/*.eml"),
    ("close", "*/tmp/*.eml"),
    ("link", "*/messages/*.eml"),
]


needs_syncfs = skipIf(not FileSystem.has_syncfs, "no syncfs(2) here")


class Relaying(Simple):
    """
    Callbacks that send every envelope to one next hop.
    """

    def process_envelope(self, log: Any, session: Any, envelope: Any) -> Any:
        return Send([EnvelopeWithNextHop(envelope, ["mx.example.com:25"])])


def synchronous(f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
    return defer.maybeDeferred(f, *args, **kw)


class DiskFaultTests(SynchronousTestCase):
    """
    Each fault, at each step, in a live session.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def make(
        self, use_syncfs: bool, spill_threshold: int = 256 * 1024, run: Any = synchronous
    ) -> tuple[DiskSpool, FaultyFileSystem, SMTPServerFactory]:
        self.root = os.path.abspath(self.mktemp())
        fs = FaultyFileSystem()
        spool = DiskSpool(
            os.path.join(self.root, "spool"),
            run,
            self.clock,
            spill_threshold=spill_threshold,
            fs=fs,
            use_syncfs=use_syncfs,
        )
        if run is synchronous:
            self.successResultOf(spool.recover())
        factory = SMTPServerFactory(callbacks=Relaying(), spool=spool, clock=self.clock)
        return spool, fs, factory

    def files(self, *parts: str) -> list[str]:
        return sorted(os.listdir(os.path.join(self.root, "spool", *parts)))

    def assertNoFiles(self, case: object) -> None:
        for d in ("tmp", "messages", ACTIVE):
            self.assertEqual(self.files(d), [], (case, d))

    def check(self, use_syncfs: bool, steps: list[tuple[str, str]], spill: bool = False) -> None:
        """
        For each step and each of ENOSPC and EIO: a session whose message
        hits the fault at that step gets the right reply and leaves no
        file; with the fault gone, its next message is spooled.
        """
        for step, pattern in steps:
            for code, reply in ((errno.ENOSPC, FULL), (errno.EIO, FAILED)):
                case = (use_syncfs, step, pattern, errno.errorcode[code])
                spool, fs, factory = self.make(use_syncfs, spill_threshold=64 if spill else 256 * 1024)
                fs.fail(step, code, pattern)
                harness = ServerHarness(factory=factory)
                harness.play(SESSION_START + ONE_MESSAGE)
                harness.send(BODY + ".\r\n")
                harness.play(f"< {reply}")
                self.assertFalse(harness.closed, case)
                self.assertIn(step, [name for name, _ in fs.steps], case)
                # the server logged the failure with its traceback
                [logged] = self.flushLoggedErrors(OSError)
                self.assertEqual(logged.value.errno, code, case)
                self.assertNoFiles(case)
                fs.heal()
                harness.play(ONE_MESSAGE)
                harness.send(BODY + ".\r\n")
                harness.play("< re:250 2\\.0\\.0 Ok: queued as \\S+")
                [entry] = self.successResultOf(spool.entries(ACTIVE))
                self.assertEqual(self.files(ACTIVE), [entry.id + ".json"], case)
                self.assertEqual(self.files("messages"), [entry.id + ".eml"], case)
                self.assertEqual(self.files("tmp"), [], case)

    @needs_syncfs
    def test_syncfs(self) -> None:
        """
        Committing with syncfs: a fault at any create, write, close,
        rename, fsync or the syncfs.
        """
        self.check(True, COMMIT_STEPS + SYNCFS_STEPS)

    def test_fsync_each(self) -> None:
        """
        Committing with an fsync per file and directory: a fault at any
        step, each fsync included.
        """
        self.check(False, COMMIT_STEPS + FSYNC_STEPS)

    def test_spilled(self) -> None:
        """
        A message large enough to go to C{tmp/} while it is received: a
        fault while writing it there, or linking it into C{messages/}.
        """
        if FileSystem.has_syncfs:
            self.check(True, SPILLED_STEPS, spill=True)
        self.check(False, SPILLED_STEPS + [("fsync", "*/tmp/*.eml")], spill=True)

    def batch(self, fail: Callable[[FaultyFileSystem], None]) -> tuple[list[str], DiskSpool]:
        """
        Four sessions end their message at once: the first one's commit
        runs alone, the other three pile up into the next batch, which
        runs with C{fail} applied.

        @return: each session's reply, and the spool.
        """
        runner = QueuedRunner()
        spool, fs, factory = self.make(True, run=runner)
        harnesses = [ServerHarness(factory=factory) for _ in range(4)]
        for harness in harnesses:
            harness.play(SESSION_START + ONE_MESSAGE)
        for harness in harnesses:
            harness.send(BODY + ".\r\n")
        [(d, f, args, kw)] = runner.calls
        self.assertEqual(len(args[0]), 1)  # the first commit, alone
        runner.calls = []
        defer.maybeDeferred(f, *args).chainDeferred(d)
        [(_, _, args, _)] = runner.calls
        self.assertEqual(len(args[0]), 3)  # the next three, together
        fail(fs)
        runner.run_all()
        replies = []
        for harness in harnesses:
            [line] = harness.lines()
            replies.append(line)
            self.assertFalse(harness.closed)
        return replies, spool

    @needs_syncfs
    def test_one_commit_of_a_batch_fails(self) -> None:
        """
        When one commit of a batch hits ENOSPC, that client gets 452 and
        the others of the batch are spooled.
        """

        def fail(fs: FaultyFileSystem) -> None:
            fs.fail("write", errno.ENOSPC, "*/messages/*.eml")

        replies, spool = self.batch(fail)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual([r.split(" ")[0] for r in replies], ["250", "452", "250", "250"])
        self.assertEqual(replies[1], FULL)
        ids = [name[: -len(".json")] for name in self.files(ACTIVE)]
        self.assertEqual(len(ids), 3)
        self.assertEqual(self.files("messages"), [i + ".eml" for i in ids])
        self.assertEqual(self.files("tmp"), [])

    @needs_syncfs
    def test_sync_of_a_batch_fails(self) -> None:
        """
        When the syncfs of a batch fails with EIO, every client of the
        batch gets 451 and none of their files remain.
        """

        def fail(fs: FaultyFileSystem) -> None:
            fs.fail("syncfs", errno.EIO)

        replies, spool = self.batch(fail)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 3)
        self.assertEqual(replies[0].split(" ")[:3], ["250", "2.0.0", "Ok:"])
        self.assertEqual(replies[1:], [FAILED, FAILED, FAILED])
        [entry] = self.files(ACTIVE)
        self.assertEqual(self.files("messages"), [entry.replace(".json", ".eml")])
        self.assertEqual(self.files("tmp"), [])
