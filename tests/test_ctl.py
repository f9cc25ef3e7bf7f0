"""
Tests for L{relay.control.ctl}, the C{relayctl} command: argument parsing, the
output formats (golden outputs), and status / count read from a disk spool
with no server running.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from relay.control import ctl
from relay.model.address import EmailAddress, Sender
from relay.model.entry import FROZEN, REMOVED, Attempt, SpoolEntry
from relay.spool.codec import entry_to_json
from relay.spool.disk import DiskSpool
from tests.test_spool import make_envelope, synchronous

NOW = 1_700_000_000.0


def make_entry(
    entry_id: str,
    queue: str = "active",
    sender: str = "s@example.org",
    recipients: tuple[str, ...] = ("a@example.com",),
    hops: tuple[str, ...] = ("mx.example.net:25",),
    created: float = NOW - 300,
    next_attempt: float = NOW + 120,
    size: int = 1536,
    attempts: tuple[Attempt, ...] = (),
    reason: str | None = None,
) -> SpoolEntry:
    """
    A L{SpoolEntry} with fixed times relative to L{NOW}.
    """
    return SpoolEntry(
        id=entry_id,
        queue=queue,
        envelope_id=entry_id.split("-")[0],
        sender=Sender.of(sender),
        sender_args=(),
        recipients=[EmailAddress.parse(r) for r in recipients],
        next_hop_choices=hops,
        schedule=(60.0,),
        created_at=created,
        next_attempt_at=next_attempt,
        message_size=size,
        attempts=attempts,
        reason=reason,
    )


ENTRIES = [
    make_entry("aaaa-0"),
    make_entry(
        "bbbb-0",
        sender="",
        recipients=("x@example.com", "y@example.com"),
        hops=(),
        created=NOW - 7200,
        next_attempt=NOW - 5,
        size=200,
        attempts=(
            Attempt(
                NOW - 3600,
                "mx:25",
                451,
                "451 4.3.0 mailbox temporarily unavailable, please try again much later",
            ),
        ),
    ),
    make_entry("cccc-1", queue="frozen", created=NOW - 3 * 86400, size=3 * 1024 * 1024),
]

TABLE = (
    "ID      SENDER           RECIPIENTS                   AGE  NEXT ATTEMPT  NEXT HOP"
    "           LAST ERROR\n"
    "aaaa-0  <s@example.org>  a@example.com                5m   in 2m         mx.example.net:25"
    "  -\n"
    "bbbb-0  <>               x@example.com,y@example.com  2h   now           MX"
    "                 451 4.3.0 mailbox temporarily unavail...\n"
    "cccc-1  <s@example.org>  a@example.com                3d   -             mx.example.net:25"
    "  -\n"
)

EXIM = (
    " 5m  1.5K aaaa-0 <s@example.org>\n"
    "          a@example.com\n"
    "\n"
    " 2h   200 bbbb-0 <>\n"
    "          x@example.com\n"
    "          y@example.com\n"
    "\n"
    " 3d  3.0M cccc-1 <s@example.org> *** frozen ***\n"
    "          a@example.com\n"
    "\n"
)

JSON = """\
[
  {
    "created_at": 1699999700.0,
    "envelope_id": "aaaa",
    "id": "aaaa-0",
    "message_size": 1536,
    "next_attempt_at": 1700000120.0,
    "next_hop_choices": [
      "mx.example.net:25"
    ],
    "queue": "active",
    "recipients": [
      "a@example.com"
    ],
    "schedule": [
      60.0
    ],
    "sender": "s@example.org",
    "version": 2
  }
]
"""


def run_main(*argv: str) -> tuple[int, str, str]:
    """
    Run L{ctl.main} with C{argv} at L{NOW}: C{(exit code, stdout, stderr)}.
    """
    out, err = io.StringIO(), io.StringIO()
    code = ctl.main(list(argv), out=out, err=err, now=NOW)
    return code, out.getvalue(), err.getvalue()


class FormatTests(SynchronousTestCase):
    """
    The output formats, as golden outputs over fixed entries and time.
    """

    def test_table(self) -> None:
        """
        The table has a header and one aligned row per entry: the null
        sender is C{<>}, recipients are comma-joined, the next hop is C{MX}
        when none is given, the next attempt is C{-} unless active, and the
        last error is truncated.
        """
        self.assertEqual(ctl.format_table(ENTRIES, NOW), TABLE)

    def test_table_empty(self) -> None:
        """
        An empty queue gives only the header.
        """
        self.assertEqual(
            ctl.format_table([], NOW),
            "ID  SENDER  RECIPIENTS  AGE  NEXT ATTEMPT  NEXT HOP  LAST ERROR\n",
        )

    def test_table_quarantine_reason(self) -> None:
        """
        A quarantined entry never tried shows its reason as its last error.
        """
        entry = make_entry("dddd-0", queue="quarantine", reason="virus found")
        self.assertEqual(ctl.table_row(entry, NOW)[4:], ("-", "mx.example.net:25", "virus found"))

    def test_exim(self) -> None:
        """
        The exim format is C{age size id <sender>}, recipients indented, a
        blank line after each entry; frozen entries are marked.
        """
        self.assertEqual(ctl.format_exim(ENTRIES, NOW), EXIM)

    def test_json(self) -> None:
        """
        The JSON format is the entries' metadata, indented and sorted.
        """
        self.assertEqual(ctl.format_json(ENTRIES[:1]), JSON)
        self.assertEqual(json.loads(ctl.format_json(ENTRIES)), [entry_to_json(e) for e in ENTRIES])

    def test_duration(self) -> None:
        """
        Durations are rounded down to their largest unit.
        """
        self.assertEqual(
            [ctl.format_duration(s) for s in (-3, 0, 59, 60, 3599, 3600, 86399, 86400, 10**6)],
            ["0s", "0s", "59s", "1m", "59m", "1h", "23h", "1d", "11d"],
        )

    def test_size(self) -> None:
        """
        Sizes are bytes, then K and M with one decimal.
        """
        self.assertEqual(
            [ctl.format_size(s) for s in (0, 1023, 1024, 1536, 1024 * 1024)],
            ["0", "1023", "1.0K", "1.5K", "1.0M"],
        )

    def test_count(self) -> None:
        """
        Count prints one line per queue.
        """
        self.assertEqual(
            ctl.format_count({"active": 2, "frozen": 1}),
            "active: 2\nfrozen: 1\nremoved: 0\nquarantine: 0\n",
        )


class ParseTests(SynchronousTestCase):
    """
    Command-line parsing; usage errors exit with 2.
    """

    def assertUsage(self, *argv: str) -> str:
        code, out, err = run_main(*argv)
        self.assertEqual((code, out), (ctl.USAGE, ""))
        self.assertTrue(err.startswith("relayctl"), err)
        return err

    def test_usage_errors(self) -> None:
        """
        Missing or unknown commands, missing ids, bad options and
        conflicting choices are usage errors.
        """
        for argv in [
            (),
            ("bogus",),
            ("freeze",),
            ("remove",),
            ("send-now",),
            ("send",),
            ("send", "--all", "--frozen"),
            ("send", "--all", "id1"),
            ("send", "--all", "--retry-intervals", "1m,,5m"),
            ("send", "--all", "--retry-intervals", "soon"),
            ("recover", "id1"),
            ("recover", "--removed", "--quarantined", "id1"),
            ("recover", "--removed"),
            ("set-max-send-jobs", "x"),
            ("set-max-send-jobs", "0"),
            ("status", "--format", "xml"),
            ("status", "--queue", "nowhere"),
            ("--control", "unix:x", "--spool", "y", "count"),
        ]:
            self.assertUsage(*argv)

    def test_send(self) -> None:
        """
        C{send} takes exactly one of C{--all}, C{--frozen} or ids, and
        parses C{--retry-intervals}.
        """
        options = ctl.parse_args(["send", "--frozen", "--retry-intervals", "1m,5m,1h"])
        self.assertEqual((options.frozen, options.all, options.ids), (True, False, []))
        self.assertEqual(options.intervals, [60.0, 300.0, 3600.0])
        options = ctl.parse_args(["--control", "unix:/x", "send", "a", "b"])
        self.assertEqual(
            (options.control, options.ids, options.intervals), ("unix:/x", ["a", "b"], None)
        )

    def test_status_defaults(self) -> None:
        """
        C{status} lists the active queue as a table by default.
        """
        options = ctl.parse_args(["status"])
        self.assertEqual((options.queue, options.format), ("active", "table"))


class RemoteTests(SynchronousTestCase):
    """
    Commands that talk to a server call the AMP command of L{relay.control.rpc}
    (the networking replaced by a fake).
    """

    def setUp(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.response: dict[str, Any] = {"done": []}
        self.error: Exception | None = None

        def fake(control: str, command: Any, **kwargs: Any) -> dict[str, Any]:
            self.calls.append((control, command.__name__, kwargs))
            if self.error is not None:
                raise self.error
            return self.response

        self.patch(ctl, "_call", fake)

    def test_control_socket_in_spool(self) -> None:
        """
        Without C{--control}, commands talk to the control socket inside
        the spool: C{--spool DIR}'s, else the default spool's.
        """
        self.response = {"done": ["id1"]}
        run_main("--spool", "/var/spool/relay", "freeze", "id1")
        run_main("freeze", "id1")
        run_main("--control", "tcp:127.0.0.1:9999", "freeze", "id1")
        self.assertEqual(
            [control for control, _, _ in self.calls],
            ["unix:/var/spool/relay/control.sock", "unix:./spool/control.sock", "tcp:127.0.0.1:9999"],
        )

    def test_commands(self) -> None:
        """
        Each subcommand calls its AMP command with its arguments.
        """
        self.response = {"done": ["id1"]}
        cases = [
            (("freeze", "id1", "id2"), "Freeze", {"ids": ["id1", "id2"]}),
            (("send-now", "id1"), "SendNow", {"ids": ["id1"]}),
            (("remove", "id1"), "Remove", {"ids": ["id1"]}),
            (("recover", "--removed", "id1"), "Recover", {"ids": ["id1"], "source": REMOVED}),
            (
                ("recover", "--quarantined", "id1"),
                "Recover",
                {"ids": ["id1"], "source": "quarantine"},
            ),
            (("send", "--all"), "SendFrozen", {"ids": [], "all": True, "frozen": False}),
            (
                ("send", "--frozen", "--retry-intervals", "1m,5m"),
                "SendFrozen",
                {"ids": [], "all": False, "frozen": True, "retry_intervals": [60.0, 300.0]},
            ),
            (("send", "id1"), "SendFrozen", {"ids": ["id1"], "all": False, "frozen": False}),
        ]
        for argv, name, kwargs in cases:
            del self.calls[:]
            code, out, err = run_main("--control", "unix:/c.sock", *argv)
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(self.calls, [("unix:/c.sock", name, kwargs)])
            self.assertEqual(out, f"{argv[0]}: id1\n")

    def test_set_max_send_jobs(self) -> None:
        """
        C{set-max-send-jobs} prints the new and the previous value.
        """
        self.response = {"previous": 10}
        code, out, err = run_main("--control", "tcp:127.0.0.1:1", "set-max-send-jobs", "4")
        self.assertEqual((code, out, err), (0, "max send jobs: 4 (was 10)\n", ""))
        self.assertEqual(self.calls, [("tcp:127.0.0.1:1", "SetMaxSendJobs", {"n": 4})])

    def test_status_and_count(self) -> None:
        """
        With C{--control}, status and count ask the server.
        """
        self.response = {
            "entries": json.dumps([entry_to_json(e) for e in ENTRIES]),
        }
        code, out, err = run_main("--control", "unix:/c", "status", "--format", "exim")
        self.assertEqual((code, out, err), (0, EXIM, ""))
        self.assertEqual(self.calls, [("unix:/c", "Status", {"queue": "active"})])
        self.response = {"active": 3, "frozen": 1, "removed": 0, "quarantine": 2}
        code, out, err = run_main("--control", "unix:/c", "count")
        self.assertEqual((code, out), (0, "active: 3\nfrozen: 1\nremoved: 0\nquarantine: 2\n"))

    def test_unknown_entry(self) -> None:
        """
        An AMP error exits with 1 and one clear line on stderr.
        """
        from relay.control import rpc

        self.error = rpc.UnknownEntry("nosuch")
        code, out, err = run_main("--control", "unix:/c", "freeze", "nosuch")
        self.assertEqual((code, out), (ctl.FAILED, ""))
        self.assertEqual(err, "relayctl freeze: unknown entry: nosuch\n")

    def test_operation_failed(self) -> None:
        """
        A connection failure exits with 1.
        """
        self.error = ctl.OperationFailed("cannot connect to unix:/c: refused")
        code, out, err = run_main("--control", "unix:/c", "count")
        self.assertEqual((code, err), (1, "relayctl count: cannot connect to unix:/c: refused\n"))


class DiskTests(SynchronousTestCase):
    """
    C{status} and C{count} straight from a spool directory, no server.
    """

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        self.quarantine = os.path.join(self.path, "q")
        clock = Clock()
        clock.advance(NOW - 600)
        spool = DiskSpool(self.path, synchronous, clock, quarantine_path=self.quarantine)
        [self.a] = self.successResultOf(spool.enqueue([make_envelope("enva")]))
        clock.advance(60)
        [self.b] = self.successResultOf(spool.enqueue([make_envelope("envb")]))
        self.successResultOf(spool.move(self.b.id, FROZEN))
        [self.q] = self.successResultOf(
            spool.quarantine([make_envelope("envq")], reason="looks like spam")
        )
        with open(os.path.join(self.path, "active", "junk.json"), "w") as f:
            f.write("{not json")

    def test_read_entries(self) -> None:
        """
        L{ctl.read_entries} reads a queue's entries, oldest first, and
        reports unreadable files.
        """
        errors: list[tuple[str, str]] = []
        active = ctl.read_entries(self.path, "active", self.quarantine, errors)
        self.assertEqual([e.id for e in active], [self.a.id])
        self.assertEqual(active[0], self.a)
        self.assertEqual([os.path.basename(p) for p, _ in errors], ["junk.json"])
        frozen = ctl.read_entries(self.path, "frozen", self.quarantine)
        self.assertEqual([(e.id, e.queue) for e in frozen], [(self.b.id, FROZEN)])
        self.assertEqual(ctl.read_entries(self.path, "removed", self.quarantine), [])

    def test_not_a_spool(self) -> None:
        """
        C{status} and C{count} on a directory that is missing or is not a
        spool fail (exit 1) and say why, rather than show an empty queue.
        """
        missing = self.mktemp()
        other = self.mktemp()
        os.makedirs(os.path.join(other, "photos"))
        for command in ("status", "count"):
            code, out, err = run_main("--spool", missing, command)
            self.assertEqual((code, out), (ctl.FAILED, ""))
            self.assertEqual(err, f"relayctl {command}: no spool at {missing}: no such directory\n")
            code, out, err = run_main("--spool", other, command)
            self.assertEqual((code, out), (ctl.FAILED, ""))
            self.assertEqual(
                err, f"relayctl {command}: {other} is not a relay spool (it has no active/ directory)\n"
            )

    def test_stale_socket_reads_disk(self) -> None:
        """
        A control socket left behind by a relay that was killed (nothing
        listens on it) does not stop C{status} and C{count} from reading
        the spool directory.
        """
        import socket

        # relative: the absolute path of a test directory may be longer
        # than AF_UNIX allows
        spool = os.path.relpath(self.path)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(stale.close)
        stale.bind(os.path.join(spool, "control.sock"))  # bound, never listening
        self.patch(ctl, "_call", lambda *a, **kw: self.fail("no relay to call"))
        code, out, err = run_main("--spool", spool, "--quarantine", self.quarantine, "count")
        self.assertEqual((code, out), (0, "active: 1\nfrozen: 1\nremoved: 0\nquarantine: 1\n"))

    def test_count(self) -> None:
        """
        C{relayctl --spool DIR count} counts every queue from disk.
        """
        code, out, err = run_main("--spool", self.path, "--quarantine", self.quarantine, "count")
        self.assertEqual(code, 0)
        self.assertEqual(out, "active: 1\nfrozen: 1\nremoved: 0\nquarantine: 1\n")

    def test_status(self) -> None:
        """
        C{relayctl --spool DIR status} lists entries from disk in each
        format, the quarantine with its reasons.
        """
        code, out, err = run_main("--spool", self.path, "status", "--format", "exim")
        self.assertEqual(code, 0)
        self.assertEqual(
            out,
            f"10m {self.a.message_size:>5} {self.a.id} <s@example.org>\n"
            "          a@example.com\n\n",
        )
        self.assertIn("junk.json", err)
        code, out, err = run_main(
            "--spool",
            self.path,
            "--quarantine",
            self.quarantine,
            "status",
            "--queue",
            "quarantine",
            "--format",
            "json",
        )
        self.assertEqual(code, 0)
        [data] = json.loads(out)
        self.assertEqual((data["id"], data["reason"]), (self.q.id, "looks like spam"))
        code, out, err = run_main(
            "--spool",
            self.path,
            "--quarantine",
            self.quarantine,
            "status",
            "--queue",
            "quarantine",
        )
        self.assertIn("looks like spam", out)
        self.assertIn(self.q.id, out)


class PingRPC(amp.Command):
    """
    A plugin RPC for L{RPCTests}.
    """

    arguments = [
        (b"text", amp.Unicode()),
        (b"n", amp.Integer(optional=True)),
        (b"x", amp.Float(optional=True)),
        (b"flag", amp.Boolean(optional=True)),
        (b"raw", amp.String(optional=True)),
        (b"ids", amp.ListOf(amp.Unicode(), optional=True)),
    ]
    response = [(b"text", amp.Unicode()), (b"raw", amp.String())]


class RPCTests(SynchronousTestCase):
    """
    C{relayctl rpc} calls a plugin's AMP command named by its dotted name.
    """

    def setUp(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        self.response: dict[str, Any] = {"text": "pong", "raw": b"\x00b"}
        self.error: Exception | None = None

        def fake(control: str, command: Any, **kwargs: Any) -> dict[str, Any]:
            self.calls.append((control, command, kwargs))
            if self.error is not None:
                raise self.error
            return self.response

        self.patch(ctl, "_call", fake)

    def test_call(self) -> None:
        """
        Each C{NAME=VALUE} is converted with the argument's type; the response
        is printed as JSON with sorted keys and bytes decoded.
        """
        code, out, err = run_main(
            "--control", "unix:/c", "rpc", "tests.test_ctl.PingRPC",
            "text=héllo", "n=42", "x=1.5", "flag=true", "raw=abc",
        )  # fmt: skip
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, '{"raw": "\\u0000b", "text": "pong"}\n')
        self.assertEqual(
            self.calls,
            [
                (
                    "unix:/c",
                    PingRPC,
                    {"text": "héllo", "n": 42, "x": 1.5, "flag": True, "raw": b"abc"},
                )
            ],
        )

    def test_boolean_false(self) -> None:
        code, out, err = run_main("rpc", "tests.test_ctl.PingRPC", "text=", "flag=no")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.calls, [(ctl.DEFAULT_CONTROL, PingRPC, {"text": "", "flag": False})])

    def test_usage_errors(self) -> None:
        """
        An unknown command, a name that is not a command, an unknown
        argument, a bad value or a missing C{=} exit with 2, calling nothing.
        """
        cases = [
            (("no.such.module.Cmd",), "cannot find command"),
            (("tests.test_ctl.RPCTests",), "is not an AMP Command class"),
            (("tests.test_ctl.PingRPC", "nope=1"), "has no argument 'nope'"),
            (("tests.test_ctl.PingRPC", "n=abc"), "argument 'n': bad value 'abc'"),
            (("tests.test_ctl.PingRPC", "flag=maybe"), "argument 'flag': bad value"),
            (("tests.test_ctl.PingRPC", "text"), "expected NAME=VALUE"),
            (("tests.test_ctl.PingRPC", "ids=a"), "unsupported type ListOf"),
        ]
        for argv, message in cases:
            code, out, err = run_main("--control", "unix:/c", "rpc", *argv)
            self.assertEqual((code, out), (ctl.USAGE, ""), argv)
            self.assertTrue(err.startswith("relayctl rpc: error: "), err)
            self.assertIn(message, err)
        self.assertEqual(self.calls, [])
        code, out, err = run_main("rpc")
        self.assertEqual(code, ctl.USAGE)

    def test_amp_error(self) -> None:
        """
        An AMP error exits with 1 and its text.
        """
        self.error = amp.RemoteAmpError(b"UNKNOWN", "it broke")
        code, out, err = run_main("--control", "unix:/c", "rpc", "tests.test_ctl.PingRPC", "text=x")
        self.assertEqual((code, out), (ctl.FAILED, ""))
        self.assertIn("it broke", err)
        self.assertTrue(err.startswith("relayctl rpc: "), err)
        self.error = ctl.OperationFailed("cannot connect to unix:/c: refused")
        code, out, err = run_main("--control", "unix:/c", "rpc", "tests.test_ctl.PingRPC", "text=x")
        self.assertEqual((code, err), (1, "relayctl rpc: cannot connect to unix:/c: refused\n"))
