"""
Tests for C{--receivers N}: the listeners (L{relay.app.listener}), the
master's receiver pool (L{relay.app.pool}), the master<->receiver messages
(L{relay.app.channel}), a receiver's own side (L{relay.app.receiver}), and
the real C{twistd relay --receivers 2}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from relay.app.channel import (
    CHANNEL_FD,
    FIRST_LISTENER_FD,
    MessageReader,
    StartMessage,
    encode_message,
    portable_event,
)
from relay.app.listener import Listener, parse_listener
from relay.app.pool import ReceiverPool
from relay.app.receiver import MasterReport, Receiver
from relay.app.settings import Settings, callbacks_name
from relay.interfaces import ISpoolObserver
from relay.model.address import EmailAddress, Sender
from relay.model.entry import ACTIVE, QUARANTINE, entry_for
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import Message
from relay.simple import Simple
from relay.spool.observed import ObservedSpool
from tests import test_integration
from tests.test_integration import ROOT, free_port


class Policy(Simple):
    """A plugin importable by name."""

    configured: Any = None

    def configure(self, defaults: Any) -> None:
        super().configure(defaults)
        self.configured = defaults


def make_entry(entry_id: str = "e1", queue: str = ACTIVE, reason: str | None = None) -> Any:
    envelope = Envelope(
        id=entry_id,
        sender=Sender(EmailAddress.parse("alice@example.com")),
        sender_args=(),
        recipients=(EmailAddress.parse("bob@example.net"),),
        message=Message(headers=(), size=5, data=b"hello"),
    )
    hop = EnvelopeWithNextHop(envelope, next_hop_choices=("mx.example.net:25",), retry_intervals=(60,))
    return entry_for(f"{entry_id}-0", queue, hop, 1000.0, reason=reason, received_from="c [::1]")


class ListenerTests(SynchronousTestCase):
    def test_tcp(self) -> None:
        listener = parse_listener("tcp:2525:interface=127.0.0.1:backlog=100")
        self.assertEqual(
            (listener.family, listener.host, listener.port, listener.backlog, listener.haproxy),
            (socket.AF_INET, "127.0.0.1", 2525, 100, False),
        )

    def test_defaults(self) -> None:
        self.assertEqual(parse_listener("tcp:25").host, "0.0.0.0")
        self.assertEqual(parse_listener("tcp:25").backlog, 50)
        six = parse_listener("tcp6:port=2525")
        self.assertEqual((six.family, six.host, six.port), (socket.AF_INET6, "::", 2525))

    def test_haproxy(self) -> None:
        listener = parse_listener("haproxy:tcp6:2525:interface=\\:\\:1")
        self.assertEqual(
            (listener.family, listener.host, listener.port, listener.haproxy),
            (socket.AF_INET6, "::1", 2525, True),
        )

    def test_refused(self) -> None:
        for endpoint in (
            "unix:/tmp/relay.sock",
            "ssl:465",
            "haproxy:unix:/tmp/x",
            "tcp:notaport",
            "tcp:25:interface=127.0.0.1:reuse=1",
            "tcp:2525:interface=\\:\\:1",
        ):
            with self.assertRaises(ValueError, msg=endpoint) as raised:
                parse_listener(endpoint)
            self.assertIn(repr(endpoint), str(raised.exception))

    def test_json_round_trip(self) -> None:
        for endpoint in ("tcp:0:interface=127.0.0.1", "haproxy:tcp6:25:interface=\\:\\:1"):
            listener = parse_listener(endpoint)
            data = json.loads(json.dumps(listener.to_json()))
            self.assertEqual(Listener.from_json(data), listener)


class CallbacksNameTests(SynchronousTestCase):
    def test_names(self) -> None:
        self.assertEqual(callbacks_name("some.module.Policy"), "some.module.Policy")
        self.assertEqual(callbacks_name(Policy), f"{__name__}.Policy")

    def test_unnamed(self) -> None:
        class Local(Simple):
            pass

        for callbacks in (Policy(), Local):
            with self.assertRaises(ValueError) as raised:
                callbacks_name(callbacks)
            self.assertIn("dotted name", str(raised.exception))


class FakeProcessTransport:
    """
    The parts of an L{IProcessTransport} the pool uses.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written = b""
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.spawned: list[tuple[Any, ...]] = []
        self.spooled: list[Any] = []
        self.quarantined: list[Any] = []
        self.rejected: list[None] = []
        self.restarted: list[None] = []
        self.logged: list[dict[str, Any]] = []
        self.settings = Settings(spool="/s", hostname="relay.test", receiver_grace=7.0)

    def spawn(self, protocol: Any, executable: str, argv: list[str], env: Any, childFDs: Any) -> Any:
        transport = FakeProcessTransport(100 + len(self.spawned))
        self.spawned.append((protocol, executable, argv, env, childFDs))
        protocol.makeConnection(transport)
        return transport

    def make(self, count: int = 2, wait_for: Any = None, **kw: Any) -> ReceiverPool:
        pool = ReceiverPool(
            count=count,
            listeners=[parse_listener("tcp:0:interface=127.0.0.1")],
            settings=self.settings,
            reactor=self.clock,
            on_spooled=self.spooled.append,
            on_quarantined=lambda entries, reason: self.quarantined.append((entries, reason)),
            on_rejected=lambda: self.rejected.append(None),
            on_restart=lambda: self.restarted.append(None),
            wait_for=wait_for,
            spawn=self.spawn,
            executable="/usr/bin/python-for-test",
            publisher=self.logged.append,
            grace=7.0,
            **kw,
        )
        self.addCleanup(pool._close_sockets)
        return pool

    def test_needs_a_receiver(self) -> None:
        self.assertRaises(
            ValueError, ReceiverPool, count=0, listeners=[], settings=Settings(), reactor=self.clock
        )

    def test_starts_receivers_with_sockets_and_settings(self) -> None:
        pool = self.make()
        pool.privilegedStartService()
        pool.startService()
        self.assertEqual(len(self.spawned), 2)
        sock = pool.sockets[0]
        port = sock.getsockname()[1]
        self.assertNotEqual(port, 0)
        for number, (protocol, executable, argv, env, fds) in enumerate(self.spawned, 1):
            self.assertEqual(executable, "/usr/bin/python-for-test")
            self.assertEqual(argv, [executable, "-m", "relay.app.receiver", str(number)])
            self.assertEqual(
                fds, {0: "w", 1: "r", 2: "r", CHANNEL_FD: "r", FIRST_LISTENER_FD: sock.fileno()}
            )
            self.assertIn(ROOT, env["PYTHONPATH"].split(os.pathsep))
            line = protocol.transport.written
            self.assertTrue(line.endswith(b"\n"))
            self.assertEqual(line.count(b"\n"), 1)
            start = StartMessage.from_line(line)
            self.assertEqual(start.number, number)
            self.assertEqual(start.settings, self.settings)
            self.assertEqual(start.settings.receiver_grace, 7.0)
            self.assertEqual(list(start.path), [p for p in sys.path if isinstance(p, str)])
            [listener] = start.listeners
            self.assertEqual(listener.port, 0)
        # The socket listens: a client connects (it waits in the backlog).
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass

    def test_receivers_inherit_the_spool_lock(self) -> None:
        """
        Each receiver gets the spool's lock file after the listening
        sockets, so the spool stays locked while any of them lives.
        """
        pool = self.make(lock_fd=lambda: 42)
        pool.startService()
        for _, _, _, _, fds in self.spawned:
            self.assertEqual(fds[FIRST_LISTENER_FD + 1], 42)

    def test_waits_for_recovery(self) -> None:
        recovered: Deferred[None] = Deferred()
        pool = self.make(wait_for=lambda: recovered)
        pool.startService()
        self.assertEqual(self.spawned, [])
        recovered.callback(None)
        self.assertEqual(len(self.spawned), 2)

    def started(self, count: int = 2) -> ReceiverPool:
        pool = self.make(count)
        pool.startService()
        return pool

    def test_messages(self) -> None:
        pool = self.started()
        first = self.spawned[0][0]
        entry = make_entry("a")
        quarantined = make_entry("q", QUARANTINE, reason="virus")
        frames = b"".join(
            encode_message(m)
            for m in (
                {"t": "spooled", "entries": [entry]},
                {"t": "quarantined", "reason": "virus", "entries": [quarantined]},
                {"t": "rejected"},
                {"t": "sessions", "n": 3},
            )
        )
        # Split anywhere: frames are reassembled.
        for i in range(0, len(frames), 7):
            first.childDataReceived(CHANNEL_FD, frames[i : i + 7])
        self.assertEqual(self.spooled, [[entry]])
        self.assertEqual(self.quarantined, [([quarantined], "virus")])
        self.assertEqual(self.rejected, [None])
        self.assertEqual(pool.sessions(), 3)
        self.spawned[1][0].childDataReceived(CHANNEL_FD, encode_message({"t": "sessions", "n": 2}))
        self.assertEqual(pool.sessions(), 5)

    def test_messages_handed_over(self) -> None:
        """
        Messages that came along with C{spooled} reach C{remember} with
        their entries, before C{on_spooled}; an entry without one gets
        C{None}.
        """
        remembered: list[tuple[str, tuple[Any, ...] | None, int]] = []
        pool = self.make(
            1,
            remember=lambda entry, message: remembered.append(
                (entry.id, message and dataclasses.astuple(message), len(self.spooled))
            ),
        )
        pool.startService()
        a, b = make_entry("a"), make_entry("b")
        message = dataclasses.replace(
            Message.from_bytes(b"Subject: hi\r\n\r\nhello\r\n"), canonical=True
        )
        frame = encode_message({"t": "spooled", "entries": [a, b], "messages": [message, None]})
        self.spawned[0][0].childDataReceived(CHANNEL_FD, frame)
        self.assertEqual(
            remembered, [("a-0", dataclasses.astuple(message), 0), ("b-0", None, 0)]
        )
        self.assertEqual(self.spooled, [[a, b]])

    def test_bad_message_logged(self) -> None:
        """
        A frame that does not unpickle to a message, one of an unknown
        kind and one over the limit are logged, and the frames after them
        are read.
        """
        errors: list[Any] = []
        self.make(1, log=Logger(observer=errors.append)).startService()
        del errors[:]  # the start's own lines
        protocol = self.spawned[0][0]
        protocol._channel.limit = 1000
        garbage = b"not a pickle"
        protocol.childDataReceived(
            CHANNEL_FD,
            struct.pack(">I", len(garbage)) + garbage
            + encode_message({"t": "nonsense"})
            + encode_message({"t": "sessions", "n": 1, "padding": "x" * 2000})[:500],
        )  # fmt: skip
        self.assertEqual([e["receiver"] for e in errors], [1, 1, 1])
        self.assertTrue(all(e["log_failure"] is not None for e in errors))
        # The rest of the long frame is skipped; what follows is read.
        tail = encode_message({"t": "sessions", "n": 1, "padding": "x" * 2000})[500:]
        protocol.childDataReceived(CHANNEL_FD, tail + encode_message({"t": "sessions", "n": 4}))
        self.assertEqual(len(errors), 3)
        self.assertEqual(protocol.sessions, 4)
        self.assertEqual(self.spooled, [])

    def test_log_events_forwarded(self) -> None:
        """
        A receiver's log event reaches the master's observers with its
        fields, its level and message, and the receiver named.
        """
        self.started()
        events: list[dict[str, Any]] = []
        Logger(namespace="relay.smtp.server", observer=events.append).warn("queued {id}", id="x1")
        frame = encode_message({"t": "log", "event": portable_event(events[0])})
        self.spawned[1][0].childDataReceived(CHANNEL_FD, frame)
        [event] = self.logged
        self.assertEqual(event["receiver"], 2)
        self.assertEqual(event["id"], "x1")
        self.assertEqual(event["log_namespace"], "relay.smtp.server")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["log_system"], "receiver-2 relay.smtp.server#warn")
        self.assertEqual(formatEvent(event), "queued x1")
        self.assertNotIn("log_logger", event)

    def test_log_event_text_as_in_receiver(self) -> None:
        """
        An event of plain fields (sent as it is) and one with an object
        (flattened first) read in the master as they would have in the
        receiver, conversions and format specs included.
        """
        self.started()
        events: list[dict[str, Any]] = []
        log = Logger(observer=events.append)
        log.info("{s!r} {n:03d} {f:.1f} {none}", s="x", n=5, f=2.25, none=None)
        log.info("{peer!r} {peer}", peer=IPv4Address("TCP", "192.0.2.1", 25))
        for event in events:
            frame = encode_message({"t": "log", "event": portable_event(event)})
            self.spawned[0][0].childDataReceived(CHANNEL_FD, frame)
        self.assertEqual(
            [formatEvent(e) for e in self.logged], [formatEvent(e) for e in events]
        )

    def test_log_failures_forwarded(self) -> None:
        """
        A receiver's failure reaches the master with its traceback and
        exception text.
        """
        self.started()
        events: list[dict[str, Any]] = []
        try:
            raise ZeroDivisionError("by zero")
        except ZeroDivisionError:
            Logger(observer=events.append).failure("it broke")
        frame = encode_message({"t": "log", "event": portable_event(events[0])})
        self.spawned[0][0].childDataReceived(CHANNEL_FD, frame)
        [event] = self.logged
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertIn("by zero", event["log_failure"].getTraceback())

    def test_output_logged(self) -> None:
        events: list[dict[str, Any]] = []
        self.make(1, log=Logger(observer=events.append)).startService()
        del events[:]  # the start's own lines
        protocol = self.spawned[0][0]
        protocol.childDataReceived(2, b"Traceback (most recent\ncall last)")
        protocol.childConnectionLost(2)
        protocol.childDataReceived(1, b"printed\n")
        self.assertEqual(
            [(e["log_level"].name, e["line"], e["receiver"]) for e in events],
            [("warn", "Traceback (most recent", 1), ("warn", "call last)", 1), ("info", "printed", 1)],
        )

    def test_restart_with_backoff(self) -> None:
        pool = self.started(1)
        for expected in (1.0, 2.0, 4.0):
            protocol = self.spawned[-1][0]
            protocol.processEnded(Failure(ProcessTerminated(signal=9)))
            self.assertNotIn(1, pool.processes)
            self.clock.advance(expected - 0.5)
            self.assertIs(self.spawned[-1][0], protocol)
            self.clock.advance(0.5)
            self.assertIsNot(self.spawned[-1][0], protocol)
            self.assertIn(1, pool.processes)
        self.assertEqual(len(self.restarted), 3)
        # One that ran for a while is restarted after the shortest delay.
        self.clock.advance(3600)
        protocol = self.spawned[-1][0]
        protocol.processEnded(Failure(ProcessDone(0)))
        self.clock.advance(1.0)
        self.assertIsNot(self.spawned[-1][0], protocol)

    def test_reload_while_waiting(self) -> None:
        """
        A receiver waiting to be restarted is not running for SIGHUP (it
        reads the files when it starts); once restarted and listening it
        gets the next one.
        """
        pool = self.started(1)
        self.spawned[0][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertEqual(
            self.successResultOf(pool.reload(None)),
            "No receiver runs: each reads the files when it starts",
        )
        self.clock.advance(1.0)
        restarted = self.spawned[-1][0]
        restarted.childDataReceived(CHANNEL_FD, encode_message({"t": "listening"}))
        self.assertEqual(
            self.successResultOf(pool.reload(None)), "SIGHUP passed on to receivers 1"
        )
        self.assertEqual(restarted.transport.signals, ["HUP"])
        self.assertEqual(self.spawned[0][0].transport.signals, [])

    def test_stop(self) -> None:
        pool = self.started()
        socket_fd = pool.sockets[0]
        d = pool.stopService()
        transports = [s[0].transport for s in self.spawned]
        self.assertEqual([t.signals for t in transports], [["TERM"], ["TERM"]])
        self.assertNoResult(d)
        self.spawned[0][0].processEnded(Failure(ProcessDone(0)))
        self.assertNoResult(d)
        self.spawned[1][0].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(d)
        self.assertEqual(pool.sockets, [])
        self.assertEqual(socket_fd.fileno(), -1)
        # Not restarted, and nothing left to kill.
        self.clock.advance(100)
        self.assertEqual(len(self.spawned), 2)
        self.assertEqual([t.signals for t in transports], [["TERM"], ["TERM"]])

    def test_stop_kills_after_grace(self) -> None:
        pool = self.started(1)
        d = pool.stopService()
        transport = self.spawned[0][0].transport
        self.clock.advance(7.0 + 4.9)
        self.assertEqual(transport.signals, ["TERM"])
        self.clock.advance(0.1)
        self.assertEqual(transport.signals, ["TERM", "KILL"])
        self.spawned[0][0].processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(d)

    def test_stop_cancels_restart(self) -> None:
        pool = self.started(1)
        self.spawned[0][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.successResultOf(pool.stopService())
        self.clock.advance(100)
        self.assertEqual(len(self.spawned), 1)


class FakeSpool:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def enqueue(self, envelopes: Any, received_from: Any = None) -> Deferred[Any]:
        self.calls.append(("enqueue", received_from))
        return succeed([make_entry("a"), make_entry("b")])

    def quarantine(self, envelopes: Any, reason: str, received_from: Any = None) -> Deferred[Any]:
        self.calls.append(("quarantine", reason, received_from))
        return succeed([make_entry("q", QUARANTINE, reason)])

    def receive(self, message_id: str) -> str:
        return f"writer {message_id}"

    def discard(self, message: Any) -> str:
        return f"discarded {message}"

    def entries(self, queue: str) -> str:
        return f"entries of {queue}"


class MasterReportTests(SynchronousTestCase):
    def test_interface(self) -> None:
        """
        L{MasterReport} is an L{ISpoolObserver}.
        """
        from zope.interface.verify import verifyObject


        verifyObject(ISpoolObserver, MasterReport(lambda m: None))

    def test_reports_commits(self) -> None:
        sent: list[dict[str, Any]] = []
        spool = ObservedSpool(FakeSpool(), MasterReport(sent.append))  # type: ignore[arg-type]
        from tests.test_spool import make_envelope

        small = make_envelope("a", Message.from_bytes(b"Subject: hi\r\n\r\nhello\r\n"))
        spilled = make_envelope("b", Message((), 10, path="/nonexistent/b.eml"))
        entries = self.successResultOf(spool.enqueue([small, spilled], received_from="h [1.2.3.4]"))
        self.assertEqual([e.id for e in entries], ["a-0", "b-0"])
        self.assertEqual(
            sent,
            [
                {
                    "t": "spooled",
                    "entries": entries,
                    # the message in memory goes along, the spilled one not
                    "messages": [small.envelope.message, None],
                }
            ],
        )
        # What the master reads is the same entries and message.
        [read] = MessageReader().feed(encode_message(sent[0]))
        assert isinstance(read, dict)
        self.assertEqual(read["entries"], entries)
        self.assertEqual(
            [m and dataclasses.astuple(m) for m in read["messages"]],
            [dataclasses.astuple(small.envelope.message), None],
        )
        del sent[:]
        [q] = self.successResultOf(spool.quarantine([], "spam", received_from="h"))
        self.assertEqual(sent, [{"t": "quarantined", "reason": "spam", "entries": [q]}])

    def test_passes_the_rest(self) -> None:
        spool = ObservedSpool(FakeSpool(), MasterReport(lambda m: None))  # type: ignore[arg-type]
        self.assertEqual(spool.receive("m1"), "writer m1")
        self.assertEqual(spool.discard("x"), "discarded x")
        self.assertEqual(spool.entries("active"), "entries of active")

    def test_send_failure_does_not_fail_the_commit(self) -> None:
        def broken(message: Any) -> None:
            raise OSError("pipe closed")

        spool = ObservedSpool(FakeSpool(), MasterReport(broken))  # type: ignore[arg-type]
        self.assertEqual(len(self.successResultOf(spool.enqueue([]))), 2)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class ReceiverMainTests(SynchronousTestCase):
    def test_settle_startup_heap(self) -> None:
        """
        L{settle_startup_heap} (a receiver, once it serves) freezes what
        exists and collects the youngest generation less often; in a
        process of its own, not this test run's.
        """
        code = (
            "import gc; from relay.app.heap import YOUNG_THRESHOLD, settle_startup_heap;"
            "before = gc.get_freeze_count(); settle_startup_heap();"
            "print(before, gc.get_freeze_count() > 1000, gc.get_threshold()[0] == YOUNG_THRESHOLD)"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=60, cwd=ROOT, check=True
        )
        self.assertEqual(done.stdout.split(), [b"0", b"True", b"True"])

    def test_refuses_another_version(self) -> None:
        """
        A receiver started by a master of another relay version (one
        upgraded on disk while it ran) exits with one line saying so,
        before it serves: their messages to each other are pickles of
        their own classes.
        """
        start = StartMessage(number=1, settings=Settings(), listeners=(), version="0.0.0-other")
        done = subprocess.run(
            [sys.executable, "-m", "relay.app.receiver", "1"],
            input=start.to_line(), capture_output=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(b"its master 0.0.0-other: restart the relay", done.stderr)
        self.assertEqual(done.stderr.count(b"\n"), 1, done.stderr)


class FakeListeningPort:
    """
    A listening port that records being paused and resumed.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def stopReading(self) -> None:
        self.calls.append("stop")

    def startReading(self) -> None:
        self.calls.append("start")

    def stopListening(self) -> None:
        self.calls.append("close")


def synchronous(f: Any, *args: Any, **kw: Any) -> Deferred[Any]:
    return defer.maybeDeferred(f, *args, **kw)


class ReceiverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.sent: list[dict[str, Any]] = []
        base = os.path.abspath(self.mktemp())
        self.settings = Settings(
            spool=os.path.join(base, "spool"),
            quarantine=os.path.join(base, "quarantine"),
            callbacks=f"{__name__}.Policy",
            hostname="relay.test",
            smarthost="mx.example.net:25",
            retry_intervals=(60, 120),
            max_message_size=1000,
            max_recipients=3,
            max_sessions=4,
            idle_timeout=9.0,
            reject_bare_lf=True,
            auth_requires_tls=False,
            auth=("memory:alice:secret",),
            receiver_grace=5.0,
        )
        self.start = StartMessage(
            number=2,
            settings=self.settings,
            listeners=(
                parse_listener("tcp:2525:interface=127.0.0.1"),
                parse_listener("haproxy:tcp6:2526"),
            ),
        )

    def make(self) -> Receiver:
        fds = []
        for _ in range(2):
            s = socket.socket()
            self.addCleanup(s.close)
            fds.append(os.dup(s.fileno()))
        return Receiver(self.start, self.reactor, self.sent.append, fds, run_in_thread=synchronous)

    def test_configured_like_the_master(self) -> None:
        receiver = self.make()
        factory = receiver.factory
        plugin = factory.callbacks
        self.assertIsInstance(plugin, Policy)
        defaults = plugin.configured
        self.assertEqual(defaults.hostname, "relay.test")
        self.assertEqual(tuple(defaults.next_hop_choices), ("mx.example.net:25",))
        self.assertEqual(tuple(defaults.retry_intervals), (60, 120))
        self.assertIs(defaults.clock, self.reactor)
        from twisted.cred.credentials import UsernamePassword

        d = defaults.checker.requestAvatarId(UsernamePassword(b"alice", b"secret"))
        self.assertEqual(self.successResultOf(d), b"alice")
        self.assertEqual(factory.settings.hostname, "relay.test")
        self.assertEqual(factory.settings.max_message_size, 1000)
        self.assertEqual(factory.settings.max_recipients, 3)
        self.assertEqual(factory.settings.max_sessions, 4)
        self.assertEqual(factory.settings.idle_timeout, 9.0)
        self.assertTrue(factory.settings.reject_bare_lf)
        self.assertFalse(factory.settings.auth_requires_tls)
        self.assertIsNone(factory.settings.tls_context_factory)
        self.assertIsInstance(factory.spool, ObservedSpool)
        self.assertIsInstance(factory.spool.observer, MasterReport)
        self.assertEqual(factory.spool.spool.path, self.settings.spool)
        factory.on_rejected()
        self.assertEqual(self.sent, [{"t": "rejected"}])

    def test_adopts_sockets(self) -> None:
        from relay.app._compat import HAProxyWrappingFactory

        receiver = self.make()
        fds = list(receiver.fds)
        receiver.start()
        [(fd1, family1, f1), (fd2, family2, f2)] = self.reactor.adoptedPorts
        self.assertEqual((fd1, family1), (fds[0], socket.AF_INET))
        self.assertEqual((fd2, family2), (fds[1], socket.AF_INET6))
        self.assertIs(f1, receiver.factory)
        self.assertIsInstance(f2, HAProxyWrappingFactory)
        self.assertIs(f2.wrappedFactory, receiver.factory)
        # The port has a duplicate: ours is closed.
        for fd in fds:
            self.assertRaises(OSError, os.fstat, fd)
        self.assertEqual(self.sent, [{"t": "listening"}])

    def test_reports_sessions_when_changed(self) -> None:
        receiver = self.make()
        receiver.start()
        del self.sent[:]
        receiver.factory.sessions = 2
        self.reactor.advance(1.0)
        self.reactor.advance(1.0)
        receiver.factory.sessions = 0
        self.reactor.advance(1.0)
        self.assertEqual(self.sent, [{"t": "sessions", "n": 2}, {"t": "sessions", "n": 0}])

    def test_full_receiver_stops_accepting(self) -> None:
        """
        A receiver whose sessions reach its share of max_sessions stops
        reading its listening ports (the other receivers take the
        connections from the shared queue) and reads them again once a
        session ends; below the share nothing changes.
        """
        self.start = dataclasses.replace(
            self.start, settings=dataclasses.replace(self.settings, max_sessions=5, receivers=2)
        )
        receiver = self.make()
        receiver.start()
        ports = [FakeListeningPort(), FakeListeningPort()]
        receiver.ports[:] = ports
        self.assertEqual(receiver.gate.share, 3)
        factory = receiver.factory
        calls = lambda: [p.calls for p in ports]  # noqa: E731
        factory.sessions = 2
        self.assertEqual(calls(), [[], []])
        factory.sessions = 3
        factory.sessions = 4  # accepted in the same batch: still paused, once
        self.assertEqual(calls(), [["stop"], ["stop"]])
        factory.sessions = 3
        self.assertEqual(calls(), [["stop"], ["stop"]])
        factory.sessions = 2
        self.assertEqual(calls(), [["stop", "start"], ["stop", "start"]])
        # Once stopping, the ports are closed, not resumed.
        factory.sessions = 3
        receiver.stop()
        factory.sessions = 0
        after = ["stop", "start", "stop", "close"]
        self.assertEqual(calls(), [after, after])

    def test_no_421_below_max_sessions(self) -> None:
        """
        A receiver answers 421 too many connections only past the whole
        max_sessions, not past its share: a connection it accepted after
        it filled its share (in the same accept batch) is served.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        self.start = dataclasses.replace(
            self.start, settings=dataclasses.replace(self.settings, max_sessions=3, receivers=2)
        )
        receiver = self.make()
        receiver.start()
        receiver.ports[:] = [FakeListeningPort()]
        replies = []
        for n in range(4):
            protocol = receiver.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000 + n))
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4000 + n))
            protocol.makeConnection(transport)
            replies.append(transport.value()[:3])
        self.assertEqual(replies, [b"220", b"220", b"220", b"421"])
        self.assertTrue(receiver.gate.paused)

    def test_stop_waits_for_sessions(self) -> None:
        receiver = self.make()
        receiver.start()
        stopped: list[int] = []
        for i, port in enumerate(receiver.ports):
            port.stopListening = lambda i=i: stopped.append(i)  # type: ignore[method-assign]
        receiver.factory.sessions = 1
        d = receiver.stop()
        self.assertEqual(stopped, [0, 1])
        # Its sessions end once out of their transactions.
        self.assertTrue(receiver.factory.draining)
        self.reactor.advance(3.0)
        self.assertNoResult(d)
        receiver.factory.sessions = 0
        self.reactor.advance(0.1)
        self.successResultOf(d)
        self.assertIs(receiver.stop(), d)

    def test_stop_after_grace(self) -> None:
        receiver = self.make()
        receiver.start()
        receiver.factory.sessions = 1
        d = receiver.stop()
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.successResultOf(d)


class ReceiversTwistdTests(TestCase):
    """
    The real C{twistd relay --receivers 2}, with the helpers of
    L{tests.test_integration}.
    """

    timeout = 4 * test_integration.TIMEOUT
    setUp = test_integration.TwistdRelayTests.setUp
    stop = test_integration.TwistdRelayTests.stop
    poll = test_integration.TwistdRelayTests.poll
    output = test_integration.TwistdRelayTests.output
    wait_listening = test_integration.TwistdRelayTests.wait_listening
    start_sink = test_integration.TwistdRelayTests.start_sink

    def start_twistd(self, port: int, smarthost: str) -> tuple[subprocess.Popen[bytes], str]:
        return test_integration.TwistdRelayTests.start_twistd(
            self, "relay", port, smarthost, extra=("--receivers", "2", "--retry-intervals", "1m")
        )

    def receiver_pids(self, text: str) -> dict[int, int]:
        import re

        found = re.findall(r"Receiver (\d+) started \(pid (\d+)\)", text)
        return {int(n): int(pid) for n, pid in found}

    @inlineCallbacks
    def test_receives_and_delivers(self) -> Any:
        """
        Two receivers accept mail over several connections; the master
        delivers every message to the smarthost and stops cleanly, its
        receivers with it.
        """
        sink, sink_port = self.start_sink()
        port = free_port()
        process, output = self.start_twistd(port, f"127.0.0.1:{sink_port}")
        pids = yield self.poll(
            lambda: len(self.receiver_pids(self.output(output))) == 2
            and self.receiver_pids(self.output(output)),
            "two receivers",
        )
        for pid in pids.values():
            self.addCleanup(_kill_if_alive, pid)
        yield self.wait_listening(process, output, port)
        # Without --tls-cert, neither the master nor a receiver loads pyOpenSSL.
        from tests.test_compat import cryptography_loaded

        for pid in (process.pid, *pids.values()):
            self.assertFalse(cryptography_loaded(pid), pid)

        count = 8
        bodies = [
            test_integration.MESSAGE.replace(b"integration\r\n", f"number {i}\r\n".encode())
            for i in range(count)
        ]
        results = yield defer.gatherResults(
            [deferToThread(test_integration.send_message, port, body) for body in bodies]
        )
        self.assertEqual(results, [{}] * count)
        yield self.poll(lambda: len(sink.envelopes) == count, f"{count} messages at the sink")
        subjects = sorted(
            line
            for envelope in sink.envelopes
            for line in envelope.message.data.split(b"\r\n")
            if line.startswith(b"Subject: ")
        )
        self.assertEqual(subjects, sorted(f"Subject: number {i}".encode() for i in range(count)))
        yield self.poll(
            lambda: not test_integration.files_under(os.path.join(self.spool, "active")),
            "the spool's active queue to empty",
        )
        text = self.output(output)
        self.assertIn("receiver-", text)  # receivers' log lines reach the master's log
        self.assertNotIn("Traceback", text)

        process.send_signal(signal.SIGTERM)
        yield self.poll(lambda: process.poll() is not None, "twistd to stop")
        # twistd ends itself with the signal that stopped it.
        self.assertEqual(process.returncode, -signal.SIGTERM, self.output(output))
        for pid in pids.values():
            self.assertFalse(_alive(pid), f"receiver pid {pid} still runs")
        self.assertIn("Receiver 1 stopped", self.output(output))
        self.assertIn("Receiver 2 stopped", self.output(output))

    @inlineCallbacks
    def test_refuses_unix_endpoint(self) -> Any:
        """
        With receivers, an endpoint type they cannot share is a usage
        error, before anything starts.
        """
        from twisted.internet.utils import getProcessOutputAndValue

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "--nodaemon",
             "--pidfile", "", "relay", "--receivers", "1",
             "--smtp", "unix:" + os.path.join(self.base, "s.sock"), "--spool", self.spool],
            env=env, path=self.base,
        )  # fmt: skip
        self.assertNotEqual(code, 0)
        self.assertIn(b"only tcp:, tcp6: and haproxy:", out + err)
        self.assertFalse(os.path.exists(self.spool))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not running any more.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _kill_if_alive(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = b"relay.app.receiver" in f.read()
    except OSError:
        return
    if ours and _alive(pid):
        os.kill(pid, signal.SIGKILL)
