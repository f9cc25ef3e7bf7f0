"""
Crash safety of the spool's commit: a process that dies at any step of
writing an envelope leaves, after restart and recovery, either no trace of
it or the whole envelope, never a half-written one.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

import relay.spool
from relay import EmailAddress, Envelope, EnvelopeWithNextHop, Message, Sender
from relay.entry import ACTIVE
from relay.spool import DiskSpool

MESSAGE = b"Subject: crash\r\nMessage-ID: <c@example.com>\r\n\r\n" + b"body line\r\n" * 50


class Crash(Exception):
    """
    The process died here.
    """


def synchronous(f: Any, *args: Any, **kw: Any) -> Any:
    return defer.maybeDeferred(f, *args, **kw)


class CommitCrashTests(SynchronousTestCase):
    """
    Kill the commit after each of its disk steps in turn (file writes,
    links, renames, directory fsyncs), with the clean-up a live process
    would do suppressed, then restart on the same directory.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.real = {
            name: getattr(relay.spool, name)
            for name in ("_write_file", "_fsync_file", "_fsync_dir", "_link_or_copy", "_unlink")
        }
        self.real["link"], self.real["rename"] = os.link, os.rename

    def envelopes(self, message: Message, count: int) -> list[EnvelopeWithNextHop]:
        envelope = Envelope(
            id="crashenvelope",
            sender=Sender.of("a@example.com"),
            sender_args=[],
            recipients=[EmailAddress.parse("b@example.org")],
            message=message,
        )
        return [EnvelopeWithNextHop(envelope, ["127.0.0.1:25"]) for _ in range(count)]

    def instrument(self, crash_at: int | None) -> list[str]:
        """
        Count the commit's disk steps; raise L{Crash} at step C{crash_at}
        and from then on make every clean-up a no-op, as death would.
        """
        steps: list[str] = []
        dead = []

        def step(name: str, real: Any) -> Any:
            def wrapped(*args: Any, **kw: Any) -> Any:
                if dead:
                    raise Crash(name)
                steps.append(name)
                if crash_at is not None and len(steps) == crash_at:
                    dead.append(name)
                    raise Crash(name)
                return real(*args, **kw)

            return wrapped

        for name in ("_write_file", "_fsync_file", "_fsync_dir", "_link_or_copy"):
            self.patch(relay.spool, name, step(name, self.real[name]))
        self.patch(relay.spool.os, "link", step("link", self.real["link"]))
        self.patch(relay.spool.os, "rename", step("rename", self.real["rename"]))
        real_unlink = self.real["_unlink"]
        self.patch(relay.spool, "_unlink", lambda path: False if dead else real_unlink(path))
        return steps

    def commit(self, root: str, message: Message, count: int) -> Any:
        spool = DiskSpool(os.path.join(root, "spool"), synchronous, self.clock)
        return spool.enqueue(self.envelopes(message, count))

    def restart(self, root: str) -> tuple[DiskSpool, list[Any]]:
        spool = DiskSpool(os.path.join(root, "spool"), synchronous, self.clock)
        self.successResultOf(spool.recover())
        return spool, self.successResultOf(spool.entries(ACTIVE))

    def check_every_step(self, message_for: Any, count: int) -> int:
        steps = self.instrument(None)
        root = self.mktemp()
        self.successResultOf(self.commit(root, message_for(root), count))
        total = len(steps)
        self.assertGreater(total, 4)
        outcomes = set()
        for crash_at in range(1, total + 1):
            self.instrument(crash_at)
            root = self.mktemp()
            self.failureResultOf(self.commit(root, message_for(root), count), Crash)
            self.instrument(None)
            spool, entries = self.restart(root)
            # Never half-written: each entry that survived is whole.
            for entry in entries:
                stored = self.successResultOf(spool.message(entry.id))
                with stored.open() as f:
                    self.assertEqual(f.read(), MESSAGE, (crash_at, entry.id))
                self.assertEqual([str(r) for r in entry.recipients], ["b@example.org"])
            # Recovery leaves no debris: no temporary files, no message
            # file without an entry.
            base = os.path.join(root, "spool")
            self.assertEqual(os.listdir(os.path.join(base, "tmp")), [], crash_at)
            names = {e.id for e in entries}
            emls = {n[: -len(".eml")] for n in os.listdir(os.path.join(base, "messages"))}
            self.assertEqual(emls, names, crash_at)
            outcomes.add(len(entries))
        # A crash before the first rename loses nothing acknowledged (no
        # 250 was sent); some crash points come after the commit point.
        self.assertIn(0, outcomes)
        self.assertIn(count, outcomes)
        return total

    def test_in_memory_message(self) -> None:
        """
        A small message (held in memory until the commit) with one envelope.
        """
        self.check_every_step(lambda root: Message.from_bytes(MESSAGE), 1)

    def test_shared_message(self) -> None:
        """
        One message that the plugin sent as three envelopes: every crash
        point leaves whole entries only.
        """
        self.check_every_step(lambda root: Message.from_bytes(MESSAGE), 3)

    def test_spilled_message(self) -> None:
        """
        A message already in a temporary spool file (as large ones are).
        """

        def spilled(root: str) -> Message:
            spool = DiskSpool(os.path.join(root, "spool"), synchronous, self.clock, spill_threshold=16)
            writer = spool.receive("spilledmessage")
            writer.write(MESSAGE)
            message = self.successResultOf(writer.finish(()))
            self.assertIsNotNone(message.path)
            return message

        self.check_every_step(spilled, 2)
