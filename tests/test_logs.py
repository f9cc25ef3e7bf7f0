"""
Tests for L{relay.logs}: the JSON log observer (events in, lines parsed
back with C{json}), events that come from receiver processes, the
C{twistd --logger} factory, and the real C{twistd} writing JSON lines.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import (
    ILogObserver,
    LegacyLogObserverWrapper,
    LogBeginner,
    Logger,
    LogLevel,
    LogPublisher,
    eventAsJSON,
)
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from relay.app.channel import MessageReader, encode_message, portable_event
from relay.app.pool import ReceiverPool, ReceiverProcess
from relay.app.settings import Settings
from relay.logs import (
    FIXED_KEYS,
    JSONLogObserver,
    delivery_fields,
    delivery_status,
    iso_time,
    json_line,
    json_observer,
    portable,
)
from relay.model.entry import Attempt
from tests import test_integration

# 2024-05-01T12:00:00.250Z
WHEN = 1714564800.25


def strict_loads(line: str) -> Any:
    """
    Parse one line as strict JSON: NaN and Infinity are not JSON.
    """

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def event(**fields: Any) -> dict[str, Any]:
    """
    A log event as a L{Logger} makes it, at L{WHEN}.
    """
    base = {
        "log_time": WHEN,
        "log_level": LogLevel.info,
        "log_namespace": "relay.test",
        "log_format": "hello",
    }
    base.update(fields)
    return base


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class Reprable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        return "<Reprable>"


class ObserverTests(SynchronousTestCase):
    """
    L{JSONLogObserver}: one line of JSON per event, structured fields kept.
    """

    def setUp(self) -> None:
        self.out = io.StringIO()
        self.observer = JSONLogObserver(self.out)

    def lines(self) -> list[Any]:
        text = self.out.getvalue()
        self.assertTrue(text.endswith("\n"), text)
        return [strict_loads(line) for line in text.splitlines()]

    def test_interface(self) -> None:
        """
        The observer is an L{ILogObserver}.
        """
        self.assertTrue(verifyObject(ILogObserver, self.observer))

    def test_fixed_keys_and_fields(self) -> None:
        """
        A line has the time (ISO 8601, UTC, milliseconds), the level, the
        namespace, the formatted message, then every structured field in
        the order the event has them.
        """
        self.observer(
            event(
                log_level=LogLevel.warn,
                log_namespace="relay.smtp.server",
                log_format="queued {envelope_id} for {n} recipient(s)",
                envelope_id="e1",
                n=2,
                session_id="s1",
                ratio=0.5,
                ok=True,
                nothing=None,
            )
        )
        [line] = self.lines()
        self.assertEqual(
            list(line.items()),
            [
                ("time", "2024-05-01T12:00:00.250Z"),
                ("level", "warn"),
                ("namespace", "relay.smtp.server"),
                ("message", "queued e1 for 2 recipient(s)"),
                ("envelope_id", "e1"),
                ("n", 2),
                ("session_id", "s1"),
                ("ratio", 0.5),
                ("ok", True),
                ("nothing", None),
            ],
        )

    def test_one_line_per_event(self) -> None:
        """
        Each event is one line, newlines in its text and fields escaped,
        and flushed at once.
        """
        flushed: list[int] = []
        self.out.flush = lambda: flushed.append(len(self.out.getvalue()))  # type: ignore[method-assign]
        self.observer(event(log_format="two\nlines {x}", x="and\nmore"))
        self.observer(event())
        first, second = self.lines()
        self.assertEqual((first["message"], first["x"]), ("two\nlines and\nmore", "and\nmore"))
        self.assertEqual(second["message"], "hello")
        self.assertEqual(len(flushed), 2)

    def test_values_json_cannot_hold(self) -> None:
        """
        Values JSON cannot hold are rendered as text: an address object,
        bytes (bad UTF-8 escaped), NaN and infinity, a set; tuples become
        lists, dict keys text; an object without C{str} its C{repr}, one
        without either its type.
        """
        cyclic: list[Any] = []
        cyclic.append(cyclic)
        self.observer(
            event(
                peer=IPv4Address("TCP", "192.0.2.1", 25),
                data=b"ok \xff",
                nan=float("nan"),
                inf=float("inf"),
                both={1},
                pair=("a", 1),
                mapping={1: (b"x", None)},
                level_constant=LogLevel.error,
                reprable=Reprable(),
                unprintable=Unprintable(),
                cyclic=cyclic,
            )
        )
        [line] = self.lines()
        self.assertEqual(line["peer"], "IPv4Address(type='TCP', host='192.0.2.1', port=25)")
        self.assertEqual(line["data"], "ok \\xff")
        self.assertEqual((line["nan"], line["inf"]), ("nan", "inf"))
        self.assertEqual(line["both"], [1])
        self.assertEqual(line["pair"], ["a", 1])
        self.assertEqual(line["mapping"], {"1": ["x", None]})
        self.assertEqual(line["level_constant"], "error")
        self.assertEqual(line["reprable"], "<Reprable>")
        self.assertEqual(line["unprintable"], "<unprintable Unprintable>")
        depth = line["cyclic"]
        for _ in range(8):
            depth = depth[0]
        self.assertEqual(depth, "[[...]]")

    def test_failure_traceback(self) -> None:
        """
        A failure's traceback is a field of its own; the message stays the
        log text.
        """
        log = Logger(observer=self.observer, namespace="relay.delivery.scheduler")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("Delivery of {entry_id} failed", entry_id="x-0")
        [line] = self.lines()
        self.assertEqual(line["message"], "Delivery of x-0 failed")
        self.assertEqual((line["level"], line["entry_id"]), ("critical", "x-0"))
        self.assertTrue(line["traceback"].startswith("Traceback (most recent call last):"))
        self.assertIn("ZeroDivisionError: division by zero", line["traceback"])

    def test_field_named_like_a_fixed_key(self) -> None:
        """
        A structured field named like a fixed key is kept under that name
        with an underscore; the fixed key keeps its meaning.
        """
        self.observer(event(**{key: f"mine-{key}" for key in FIXED_KEYS}))
        [line] = self.lines()
        self.assertEqual(line["message"], "hello")
        self.assertEqual(line["time"], "2024-05-01T12:00:00.250Z")
        for key in FIXED_KEYS:
            self.assertEqual(line[key + "_"], f"mine-{key}")

    def test_legacy_mirrors_left_out(self) -> None:
        """
        The keys that C{twisted.python.log}'s bridge copies the event's own
        into (for a legacy observer that saw the event first) are not
        fields; a legacy event's text is its message.
        """
        legacy_seen: list[Any] = []
        publisher = LogPublisher(LegacyLogObserverWrapper(legacy_seen.append), self.observer)
        log = Logger(observer=publisher, namespace="relay.test")
        log.info("plain {x}", x=1)
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("failed {x}", x=2)
        self.observer(
            {
                "message": ("old", "style"),
                "isError": 0,
                "time": WHEN,
                "system": "-",
                "log_time": WHEN,
                "log_text": "old style",
                "log_format": "{log_text}",
                "log_level": LogLevel.info,
                "log_namespace": "log_legacy",
                "custom": "kept",
            }
        )
        self.assertEqual(len(legacy_seen), 2)
        plain, failed, old = self.lines()
        self.assertEqual(set(plain) - {"time", "level", "namespace", "message"}, {"x"})
        self.assertEqual(
            set(failed) - {"time", "level", "namespace", "message", "traceback"}, {"x"}
        )
        self.assertEqual((old["message"], old["custom"]), ("old style", "kept"))
        self.assertEqual(
            set(old), {"time", "level", "namespace", "message", "custom"}
        )

    def test_system(self) -> None:
        """
        An event's C{log_system} is the C{system} key.
        """
        self.observer(event(log_system="receiver-2 relay.smtp.server#info"))
        [line] = self.lines()
        self.assertEqual(line["system"], "receiver-2 relay.smtp.server#info")

    def test_bad_format_keeps_the_line(self) -> None:
        """
        An event whose format cannot be filled still gives its line, with
        Twisted's note in the message and the fields it has.
        """
        self.observer(event(log_format="{missing} {x.nope}", x=1))
        [line] = self.lines()
        self.assertIn("Unable to format event", line["message"])
        self.assertEqual(line["x"], 1)

    def test_odd_events(self) -> None:
        """
        An event without time, level or format, or with a time that is no
        time, still gives a line.
        """
        self.observer({"log_format": None, "only": "this"})
        self.observer(event(log_time="yesterday", log_level=None))
        first, second = self.lines()
        self.assertEqual((first["level"], first["message"], first["only"]), ("info", "", "this"))
        self.assertEqual((second["time"], second["level"]), ("yesterday", "info"))

    def test_unprintable_key_and_level(self) -> None:
        """
        A key or a level without text is shown as its type.
        """
        odd = event(x=1)
        odd[Unprintable()] = 1  # type: ignore[index]
        odd["log_level"] = Unprintable()
        line = strict_loads(json_line(odd))
        self.assertEqual(line["level"], "<unprintable Unprintable>")
        self.assertEqual((line["x"], line["<unprintable Unprintable>"]), (1, 1))

    def test_unrenderable_event(self) -> None:
        """
        An event that cannot be rendered at all is still a line: an error
        that says so, with the event as text.
        """

        class Exploding(dict):  # type: ignore[type-arg]
            def items(self) -> Any:
                raise RuntimeError("boom")

        self.observer(Exploding(event(x=1)))
        [line] = self.lines()
        self.assertEqual(
            (line["time"], line["level"], line["namespace"], line["message"]),
            ("2024-05-01T12:00:00.250Z", "error", "relay.logs", "unloggable event: boom"),
        )
        self.assertIn("'x': 1", line["event_text"])

    def test_never_raises(self) -> None:
        """
        A stream that fails to write or flush does not make the observer
        raise.
        """

        class Broken:
            def write(self, data: Any) -> None:
                raise OSError("EPIPE")

            def flush(self) -> None:
                raise OSError("EPIPE")

        JSONLogObserver(Broken())(event())  # type: ignore[arg-type]
        out = io.StringIO()
        out.flush = lambda: (_ for _ in ()).throw(OSError("EBADF"))  # type: ignore[method-assign]
        JSONLogObserver(out)(event())
        self.assertEqual(strict_loads(out.getvalue())["message"], "hello")

    def test_ascii_stream(self) -> None:
        """
        Text a stream cannot encode is written with C{\\u} escapes: the
        same JSON.
        """
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="ascii")
        JSONLogObserver(stream)(event(log_format="caf\u00e9 {who}", who="j\u00fcrgen"))
        stream.flush()
        text = raw.getvalue().decode("ascii")
        self.assertIn("\\u00e9", text)
        line = strict_loads(text)
        self.assertEqual((line["message"], line["who"]), ("caf\u00e9 j\u00fcrgen", "j\u00fcrgen"))

    def test_binary_stream(self) -> None:
        """
        A binary stream (twisted.python.logfile.LogFile is one) gets the
        line in UTF-8.
        """
        out = io.BytesIO()
        JSONLogObserver(out)(event(log_format="caf\u00e9"))  # type: ignore[arg-type]
        self.assertEqual(strict_loads(out.getvalue().decode("utf-8"))["message"], "caf\u00e9")


class ReceiverEventTests(SynchronousTestCase):
    """
    Events logged in a receiver process reach the master's JSON log with
    their fields.
    """

    def test_receiver_event_fields(self) -> None:
        """
        A receiver's event, sent as the receiver sends it (L{portable_event},
        in a frame of the channel) and re-emitted by the master's pool, keeps its
        structured fields (an address as its text), names its receiver,
        and its failure's traceback ends with the exception's message; its
        message reads as in the receiver.
        """
        logged: list[dict[str, Any]] = []
        log = Logger(namespace="relay.smtp.server", observer=logged.append)
        peer = IPv4Address("TCP", "192.0.2.9", 40000)
        try:
            raise ValueError("bad plugin")
        except ValueError:
            log.failure(
                "[session_id={session_id}] callback failed for {peer} ({peer!r})",
                session_id="s1", envelope_id="e1", peer=peer, sizes=(1, 2),
            )  # fmt: skip
        [original] = logged
        frame = encode_message({"t": "log", "event": portable_event(original)})
        # The receiver's event itself is untouched.
        self.assertIs(original["peer"], peer)
        self.assertIsInstance(original["log_failure"].value, ValueError)

        out = io.StringIO()
        pool = ReceiverPool(
            count=1, listeners=[], settings=Settings(), reactor=Clock(),
            publisher=JSONLogObserver(out),
        )
        [message] = MessageReader().feed(frame)
        pool.message(ReceiverProcess(pool, 1), message)
        [line] = [strict_loads(x) for x in out.getvalue().splitlines()]
        self.assertEqual(
            line["message"], f"[session_id=s1] callback failed for {peer} ({peer!r})"
        )
        self.assertEqual(line["level"], "critical")
        self.assertEqual(line["namespace"], "relay.smtp.server")
        self.assertEqual(line["system"], "receiver-1 relay.smtp.server#critical")
        self.assertEqual(
            (line["session_id"], line["envelope_id"], line["peer"], line["sizes"], line["receiver"]),
            ("s1", "e1", str(peer), [1, 2], 1),
        )
        self.assertEqual(line["time"], iso_time(original["log_time"]))
        self.assertTrue(line["traceback"].rstrip().endswith("ValueError: bad plugin"), line)

    def test_plain_event_json_loses_fields(self) -> None:
        """
        Why L{portable}: C{eventAsJSON} alone turns such fields into
        C{{"unpersistable": true}}, and pickle refuses some (a lock, a
        transport); made portable they travel as their text.
        """
        logged: list[dict[str, Any]] = []
        lock = threading.Lock()
        Logger(observer=logged.append).info(
            "x", peer=IPv4Address("TCP", "192.0.2.9", 1), lock=lock
        )
        self.assertEqual(json.loads(eventAsJSON(logged[0]))["peer"], {"unpersistable": True})
        self.assertEqual(
            json.loads(eventAsJSON(portable(logged[0])))["peer"],
            "IPv4Address(type='TCP', host='192.0.2.9', port=1)",
        )
        self.assertRaises(TypeError, pickle.dumps, logged[0]["lock"])
        [message] = MessageReader().feed(
            encode_message({"t": "log", "event": portable_event(logged[0])})
        )
        assert isinstance(message, dict)
        self.assertEqual(message["event"]["lock"], repr(lock))


class DeliveryFieldsTests(SynchronousTestCase):
    """
    L{delivery_fields} and L{delivery_status}, the material of the
    delivery lines.
    """

    def test_status_codes(self) -> None:
        """
        The enhanced status comes from the reply, else from the reply
        code's class, else from whether a connection was made.
        """
        cases = [
            (Attempt(0, "h:25", 250, "250 2.1.5 Ok"), "sent", "2.1.5"),
            (Attempt(0, "h:25", 250, "250 Ok"), "sent", "2.0.0"),
            (Attempt(0, "h:25", 550, "550 no such user"), "bounced", "5.0.0"),
            (Attempt(0, "h:25", 451, "451 4.7.1 greylisted / 451 come back"), "deferred", "4.7.1"),
            (Attempt(0, "", None, "4.4.3 lookup of x failed"), "deferred", "4.4.3"),
            (Attempt(0, "h:25", None, "connect failed"), "deferred", "4.4.1"),
            (Attempt(0, "h:25", None, "timeout", (), ("192.0.2.1", 25)), "expired", "4.4.2"),
            (Attempt(0, "", None, "no route"), "bounced", "5.0.0"),
        ]
        for attempt, outcome, dsn in cases:
            self.assertEqual(delivery_status(attempt, outcome), dsn, attempt)

    def test_relay_forms(self) -> None:
        """
        C{relay} is C{host[ip]:port} once connected (an IPv6 hop's host
        without brackets), the hop without a connection, C{none} without
        a hop; C{address} is the peer in hop syntax.
        """
        from relay.testing import MemorySpool
        from tests.test_delivery import make_envelope

        spool = MemorySpool(Clock())
        [entry] = SynchronousTestCase().successResultOf(spool.enqueue([make_envelope()]))
        cases = [
            ("mx.example.org:25", ("192.0.2.1", 25), "mx.example.org[192.0.2.1]:25", "192.0.2.1:25"),
            ("[2001:db8::1]:25", ("2001:db8::1", 25), "2001:db8::1[2001:db8::1]:25",
             "[2001:db8::1]:25"),
            ("mx.example.org:25", None, "mx.example.org:25", None),
            ("", None, "none", None),
        ]  # fmt: skip
        for hop, address, relay, text in cases:
            fields = delivery_fields(
                entry, Attempt(10, hop, 250, "250 ok", ("a@example.com",), address), "sent"
            )
            self.assertEqual((fields["relay"], fields["address"]), (relay, text), hop)


class TwistdFactoryTests(SynchronousTestCase):
    """
    L{json_observer} under twistd's own logger: where twistd calls it,
    with the options twistd has.  These fail if twistd changes the private
    attributes that L{relay.logs} reads.
    """

    def start(self, **options: Any) -> Any:
        """
        Run twistd's Unix logger as C{twistd --logger
        relay.logs.json_observer} does, logging to a publisher of the
        test's own; return the publisher, with the observer started.
        """
        from twisted.application import app
        from twisted.scripts._twistd_unix import UnixAppLogger

        publisher = LogPublisher()
        stdio = SimpleNamespace(stdout=io.StringIO(), stderr=io.StringIO())
        warnings = SimpleNamespace(showwarning=lambda *a, **k: None)
        self.patch(
            app.logger, "globalLogBeginner", LogBeginner(publisher, io.StringIO(), stdio, warnings)
        )
        options.setdefault("logger", json_observer)
        applogger = UnixAppLogger(options)
        applogger.start(None)
        self.addCleanup(applogger._observer._out.close)
        self.assertIsInstance(applogger._observer, JSONLogObserver)
        return publisher

    def test_nodaemon_writes_stdout(self) -> None:
        """
        With C{--nodaemon} and no C{--logfile} the lines go to standard
        output as it was when twistd called the factory.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        publisher = self.start(nodaemon=True, logfile="")
        publisher(event(log_format="on stdout"))
        self.assertIn("on stdout", [strict_loads(x)["message"] for x in out.getvalue().splitlines()])

    def test_daemon_writes_logfile(self) -> None:
        """
        A daemon writes its lines to the C{--logfile} file, whose SIGUSR1
        rotation is set up as twistd does.
        """
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        path = self.mktemp()
        publisher = self.start(nodaemon=False, logfile=path)
        publisher(event(log_format="in the file"))
        with open(path, encoding="utf-8") as f:
            messages = [strict_loads(x)["message"] for x in f]
        self.assertIn("in the file", messages)
        self.assertNotIn(signal.getsignal(signal.SIGUSR1), (signal.SIG_DFL, None))

    def test_daemon_to_stdout_refused(self) -> None:
        """
        A daemon cannot log to standard output (C{--logfile -}): twistd's
        own refusal.
        """
        self.assertRaises(SystemExit, self.start, nodaemon=False, logfile="-")

    def test_outside_twistd(self) -> None:
        """
        Called by anything but twistd, the factory writes to standard
        output.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        json_observer()(event())
        self.assertEqual(strict_loads(out.getvalue())["message"], "hello")


class TwistdJSONLogTests(TestCase):
    """
    The real C{twistd --logger relay.logs.json_observer relay}, in the
    foreground with a receiver and as a daemon: every line of its log is
    JSON, receivers' events and delivery lines with their fields.
    """

    timeout = 4 * test_integration.TIMEOUT
    setUp = test_integration.TwistdRelayTests.setUp
    stop = test_integration.TwistdRelayTests.stop
    poll = test_integration.TwistdRelayTests.poll
    output = test_integration.TwistdRelayTests.output
    start_sink = test_integration.TwistdRelayTests.start_sink

    def run_twistd(self, twistd_options: list[str], port: int, sink_port: int, extra: list[str]) -> Any:
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--logger", "relay.logs.json_observer",
            "--pidfile", os.path.join(self.base, "twistd.pid"),
            *twistd_options,
            "relay",
            "--smtp", f"tcp:{port}:interface=127.0.0.1",
            "--spool", self.spool,
            "--quarantine", self.quarantine,
            "--control", "unix:" + os.path.join(self.base, "control.sock"),
            "--hostname", "relay.test",
            "--smarthost", f"127.0.0.1:{sink_port}",
            *extra,
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [test_integration.ROOT, env.get("PYTHONPATH")])
        )
        output = os.path.join(self.base, "twistd.out")
        with open(output, "wb") as out:
            process = subprocess.Popen(
                argv, cwd=self.base, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        return process, output

    def json_lines(self, path: str) -> list[Any]:
        """
        The complete lines written so far, each parsed as JSON.
        """
        text = self.output(path)
        lines = []
        # The last line may be being written.
        for line in text.split("\n")[:-1]:
            try:
                lines.append(strict_loads(line))
            except ValueError:
                self.fail(f"not a JSON line: {line!r} in\n{text}")
        return lines

    def delivered(self, path: str) -> Any:
        return [
            line for line in self.json_lines(path)
            if line.get("event") == "delivery" and line.get("outcome") == "sent"
        ]  # fmt: skip

    def check_delivery_line(self, line: Any, sink_port: int) -> None:
        self.assertEqual(line["relay"], f"127.0.0.1[127.0.0.1]:{sink_port}")
        self.assertEqual(line["address"], f"127.0.0.1:{sink_port}")
        self.assertEqual((line["code"], line["recipients"]), (250, ["bob@example.net"]))
        self.assertIn(f"status=sent ({line['reply']})", line["message"])

    @inlineCallbacks
    def test_foreground_with_receiver(self) -> Any:
        """
        Under C{twistd -n} the JSON lines go to standard output, those of
        a receiver's sessions too, with their session ids.
        """
        sink, sink_port = self.start_sink()
        port = test_integration.free_port()
        process, output = self.run_twistd(["--nodaemon"], port, sink_port, ["--receivers", "1"])
        self.addCleanup(self.stop, process)
        yield self.poll(lambda: test_integration.listening(port), "twistd to listen")
        refused = yield deferToThread(test_integration.send_message, port)
        self.assertEqual(refused, {})
        [line] = yield self.poll(lambda: self.delivered(output), "a delivery line")
        self.check_delivery_line(line, sink_port)
        lines = self.json_lines(output)
        from_receiver = [x for x in lines if x.get("system", "").startswith("receiver-1 ")]
        self.assertTrue(all(x["receiver"] == 1 for x in from_receiver), from_receiver)
        queued = [x for x in from_receiver if x["namespace"] == "relay.smtp.server"]
        self.assertTrue(queued and all("session_id" in x for x in queued), from_receiver)
        # A receiver's twisted.python.log events are as plain as the master's.
        legacy = [x for x in from_receiver if x["namespace"] == "log_legacy"]
        self.assertTrue(legacy, from_receiver)
        self.assertEqual(
            {key for x in legacy for key in x},
            {"time", "level", "namespace", "system", "message", "receiver"},
        )

    @inlineCallbacks
    def test_daemon_logfile(self) -> Any:
        """
        Daemonised, twistd writes the JSON lines to its C{--logfile}, also
        after it has forked away from the terminal.
        """
        sink, sink_port = self.start_sink()
        port = test_integration.free_port()
        logfile = os.path.join(self.base, "relay.json")
        process, output = self.run_twistd(["--logfile", logfile], port, sink_port, [])
        pidfile = os.path.join(self.base, "twistd.pid")
        self.addCleanup(self.stop_daemon, pidfile)
        yield self.poll(lambda: process.poll() is not None, "twistd to daemonise")
        self.assertEqual(process.returncode, 0, self.output(output))
        yield self.poll(lambda: test_integration.listening(port), "the daemon to listen")
        refused = yield deferToThread(test_integration.send_message, port)
        self.assertEqual(refused, {})
        [line] = yield self.poll(lambda: self.delivered(logfile), "a delivery line")
        self.check_delivery_line(line, sink_port)
        self.assertEqual(self.output(output), "")

    def stop_daemon(self, pidfile: str) -> Any:
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        os.kill(pid, signal.SIGTERM)

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        return self.poll(gone, "the daemon to stop", test_integration.TIMEOUT / 3).addErrback(
            lambda _: os.kill(pid, signal.SIGKILL)
        )

