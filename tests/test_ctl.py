"""
Tests for L{relay.control.ctl}, the C{relayctl} command: argument parsing, the
output formats (golden outputs), and status / count read from a disk spool
with no server running.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from typing import Any

from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from relay.control import ctl
from relay.control.client import ControlClient
from relay.control.formats import TableWriter
from relay.control.server import LIST_PAGE, ControlProtocol
from relay.model.address import EmailAddress, Sender
from relay.model.entry import FROZEN, REMOVED, Attempt, SpoolEntry, TLSOutcome, new_id
from relay.spool.codec import entry_to_json
from relay.spool.disk import DiskSpool
from tests.test_control import FakeScheduler
from tests.test_spool import DATA, make_envelope, synchronous

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
    "bbbb-0  <>               x@example.com,y@example.com  2h   now           default"
    "            451 4.3.0 mailbox temporarily unavail...\n"
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

JSON = (
    '{"created_at": 1699999700.0, "envelope_id": "aaaa", "id": "aaaa-0", "message_size": 1536, '
    '"next_attempt_at": 1700000120.0, "next_hop_choices": ["mx.example.net:25"], '
    '"queue": "active", "recipients": ["a@example.com"], "schedule": [60.0], '
    '"sender": "s@example.org", "version": 2}\n'
)


SHOW = """\
id: bbbb-0
queue: active
envelope id: bbbb
sender: <>
size: 200
created: 2023-11-14T20:13:20+00:00 (2h ago)
received from: client.example [192.0.2.7]
next hops: default route (now smart.example:25)
schedule: 60s, step 0
next attempt: 2023-11-14T22:13:15+00:00 (5s ago)
recipients:
  pending    x@example.com
  pending    y@example.com
  delivered  d@example.com
  failed     f@example.com: 550 5.1.1 no such user (reported)
attempts: 9 (1 kept)
  2023-11-14T21:13:20+00:00  mx:25  451 4.3.0 mailbox temporarily unavailable, please try again much later
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
        sender is C{<>}, recipients are comma-joined, the next hop is C{default}
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
        The JSON format is JSON Lines (like C{postqueue -j}): one object
        per entry, its metadata document with keys sorted.
        """
        self.assertEqual(ctl.format_json(ENTRIES[:1]), JSON)
        self.assertEqual(
            [json.loads(line) for line in ctl.format_json(ENTRIES).splitlines()],
            [entry_to_json(e) for e in ENTRIES],
        )

    def test_table_streams(self) -> None:
        """
        Written a page at a time, the table has one header, its columns
        fit the first page and widen for a later page with wider cells.
        """
        out = io.StringIO()
        writer = TableWriter(out, NOW)
        writer.write(ENTRIES[:1])
        writer.write(ENTRIES[1:])
        writer.finish()
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[:2], ctl.format_table(ENTRIES[:1], NOW).splitlines())
        self.assertEqual(len(lines), 4)
        self.assertEqual([line.startswith("ID") for line in lines], [True, False, False, False])
        self.assertIn("451 4.3.0", lines[2])

    def test_show(self) -> None:
        """
        C{show} prints the entry's metadata: sender, each recipient with
        its state, the next hops or the default route and where it goes
        now, the schedule, and the attempts with their count.
        """
        entry = dataclasses.replace(
            ENTRIES[1],
            delivered_recipients=("d@example.com",),
            failed_recipients=(("f@example.com", "550 5.1.1 no\r\n such user"),),
            reported=("f@example.com",),
            attempt_count=9,
            received_from="client.example [192.0.2.7]",
        )
        self.assertEqual(ctl.format_show(entry, NOW, "smart.example:25"), SHOW)
        self.assertIn("next hops: default route (now the MX of each domain)",
                      ctl.format_show(entry, NOW))  # fmt: skip
        self.assertIn("next hops: default route (the relay's --smarthost, else MX)",
                      ctl.format_show(entry, NOW, route_known=False))  # fmt: skip
        self.assertIn("next hops: mx.example.net:25\nschedule: 60s, step 0\n",
                      ctl.format_show(ENTRIES[2], NOW))  # fmt: skip

    def test_show_tls(self) -> None:
        """
        C{show} names the TLS policy a plugin chose for the entry and, under
        each attempt, the policy that applied, its source and its result.
        """
        attempt = dataclasses.replace(
            ENTRIES[1].attempts[0],
            tls=TLSOutcome("dane", "dane", "tlsa-invalid", "no TLSA record matched"),
        )
        entry = dataclasses.replace(ENTRIES[1], tls_policy="verify", attempts=(attempt,))
        text = ctl.format_show(entry, NOW, "smart.example:25")
        self.assertIn("schedule: 60s, step 0\ntls policy: verify (chosen by the plugin)\n", text)
        self.assertIn(
            "please try again much later\n    tls: dane from dane: tlsa-invalid (no TLSA record matched)\n",
            text,
        )
        self.assertNotIn("tls", ctl.format_show(ENTRIES[1], NOW, "smart.example:25"))

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
            ("freeze", "--all", "id1"),
            ("remove", "--queue", "bogus"),
            ("send", "--frozen", "id1"),
            ("send", "--frozen", "--queue", "active"),
            ("send", "--all", "--next-hop", "host:port"),
            ("status", "--younger", "soon"),
            ("count", "--older", "0"),
            ("status", "--sender", "bob"),
            ("status", "--recipient", "<>"),
            ("status", "--next-hop", "host:0"),
            ("send", "--next-hop", "x:25"),
            ("summary", "--top", "-1"),
            ("summary", "--by", "color"),
            ("show",),
        ]:
            self.assertUsage(*argv)

    def test_action_selection(self) -> None:
        """
        An action takes IDs, C{--all}, or at least one filter (C{--queue}
        among them); the filters are passed on in seconds.
        """
        for argv in [
            ("freeze", "--sender", "@example.com"),
            ("remove", "--queue", "frozen"),
            ("send-now", "--older", "1h"),
            ("send", "--via", "old.example", "--next-hop", "new.example:2525"),
            ("remove", "--all"),
            ("freeze", "id1"),
        ]:
            options = ctl.parse_args(list(argv))
            self.assertEqual(options.command, argv[0])
        options = ctl.parse_args(["send-now", "--older", "1h", "--younger", "90"])
        self.assertEqual(options.filters, {"older": 3600.0, "younger": 90.0})
        options = ctl.parse_args(["send", "--via", "old.example", "--next-hop", "new.example:2525"])
        self.assertEqual((options.filters, options.reroute), ({"via": "old.example"}, "new.example:2525"))

    def test_help(self) -> None:
        """
        C{--help} of each command exits with 0 and names its options.
        """
        for command, option in [("status", "--format"), ("summary", "--top"), ("show", "--body"),
                                ("send", "--retry-failed"), ("freeze", "--recipient")]:  # fmt: skip
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            code, _, _ = run_main(command, "--help")
            self.assertEqual(code, 0)
            self.assertIn(option, out.getvalue())

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
        self.response: dict[str, Any] = {"done": [], "matched": 0, "changed": 0, "settled": 0}
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
        self.response = {"done": ["id1"], "matched": 1, "changed": 1, "settled": 0}
        run_main("--spool", "/var/spool/relay", "freeze", "id1")
        run_main("freeze", "id1")
        run_main("--control", "tcp:127.0.0.1:9999", "freeze", "id1")
        self.assertEqual(
            [control for control, _, _ in self.calls],
            ["unix:/var/spool/relay/control.sock", "unix:./spool/control.sock", "tcp:127.0.0.1:9999"],
        )

    def test_commands(self) -> None:
        """
        Each action calls its AMP command with its arguments, and prints
        the ids named that changed, then how many entries changed.
        """
        self.response = {"done": ["id1"], "matched": 2, "changed": 1, "settled": 0}
        cases = [
            (("freeze", "id1", "id2"), "Freeze", {"ids": ["id1", "id2"]}),
            (("send-now", "id1"), "SendNow", {"ids": ["id1"]}),
            (("remove", "id1"), "Remove", {"ids": ["id1"]}),
            (("send", "--all"), "SendFrozen", {"ids": [], "all": True, "frozen": False}),
            (
                ("send", "--frozen", "--retry-intervals", "1m,5m"),
                "SendFrozen",
                {"ids": [], "all": False, "frozen": True, "retry_intervals": [60.0, 300.0]},
            ),
            (("send", "id1"), "SendFrozen", {"ids": ["id1"], "all": False, "frozen": False}),
            (
                ("send", "--via", "old:25", "--next-hop", "new:25", "--retry-failed"),
                "SendFrozen",
                {"ids": [], "all": False, "frozen": False, "via": "old:25", "next_hop": "new:25",
                 "retry_failed": True},
            ),  # fmt: skip
            (
                ("freeze", "--sender", "@x.example", "--recipient", "b@y.example", "--older", "1h",
                 "--younger", "2d", "--queue", "active"),
                "Freeze",
                {"ids": [], "sender": "@x.example", "recipient": "b@y.example", "older": 3600.0,
                 "younger": 172800.0, "queue": "active"},
            ),  # fmt: skip
            (("remove", "--all", "--next-hop", "mx:25"), "Remove", {"ids": [], "all": True, "via": "mx:25"}),
            (("send-now", "--all", "--retry-failed"), "SendNow",
             {"ids": [], "all": True, "retry_failed": True}),  # fmt: skip
        ]
        for argv, name, kwargs in cases:
            del self.calls[:]
            code, out, err = run_main("--control", "unix:/c.sock", *argv)
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(self.calls, [("unix:/c.sock", name, kwargs)])
            self.assertEqual(out, f"{argv[0]}: id1\n{argv[0]}: changed 1 of 2 matching entries\n")

    def test_recover(self) -> None:
        """
        C{recover} calls L{rpc.Recover} with its ids and source, and prints
        each id recovered.
        """
        self.response = {"done": ["id1"]}
        for argv, source in [(("--removed", "id1"), REMOVED), (("--quarantined", "id1"), "quarantine")]:
            del self.calls[:]
            code, out, err = run_main("--control", "unix:/c.sock", "recover", *argv)
            self.assertEqual((code, out, err), (0, "recover: id1\n", ""))
            self.assertEqual(self.calls, [("unix:/c.sock", "Recover", {"ids": ["id1"], "source": source})])

    def test_settled_hint(self) -> None:
        """
        When settled entries were left alone, the count line says so and
        how to retry them.
        """
        self.response = {"done": [], "matched": 1, "changed": 0, "settled": 1}
        code, out, err = run_main("--control", "unix:/c", "send", "id1")
        self.assertEqual(out, "send: changed 0 of 1 matching entry "
                              "(1 settled: --retry-failed puts their failed recipients back)\n")  # fmt: skip

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
        With C{--control}, status asks the server, printing each page as
        it comes; count asks the server and prints the queues it answers.
        """

        def streaming(control: str, command: Any, client: Any = None, **kwargs: Any) -> dict[str, Any]:
            self.calls.append((control, command.__name__, kwargs))
            for entry in ENTRIES:
                client.on_entries(ctl.format_json([entry]), None, None)
            return {"entries": len(ENTRIES), "unreadable": 0}

        self.patch(ctl, "_call", streaming)
        code, out, err = run_main("--control", "unix:/c", "status", "--format", "exim")
        self.assertEqual((code, out, err), (0, EXIM, ""))
        self.assertEqual(self.calls, [("unix:/c", "Status", {"queue": "active"})])
        code, out, err = run_main("--control", "unix:/c", "status")
        self.assertEqual([line.split()[0] for line in out.splitlines()],
                         ["ID", "aaaa-0", "bbbb-0", "cccc-1"])  # fmt: skip
        self.patch(ctl, "_call", lambda control, command, **kw: self.response)
        self.response = {"active": 3, "frozen": 1, "removed": 0, "quarantine": 2}
        code, out, err = run_main("--control", "unix:/c", "count")
        self.assertEqual((code, out), (0, "active: 3\nfrozen: 1\nremoved: 0\nquarantine: 2\n"))
        self.response = {"active": None, "frozen": 1, "removed": None, "quarantine": None}
        code, out, err = run_main("--control", "unix:/c", "count", "--queue", "frozen")
        self.assertEqual((code, out), (0, "frozen: 1\n"))

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
        the spool directory (count reads names only: the unreadable
        junk.json counts).
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
        self.assertEqual((code, out), (0, "active: 2\nfrozen: 1\nremoved: 0\nquarantine: 1\n"))

    def test_count(self) -> None:
        """
        C{relayctl --spool DIR count} counts every queue from disk, from
        the names of the files (the unreadable junk.json is named like an
        entry, so it counts); with a filter, the entries it admits.
        """
        code, out, err = run_main("--spool", self.path, "--quarantine", self.quarantine, "count")
        self.assertEqual(code, 0)
        self.assertEqual(out, "active: 2\nfrozen: 1\nremoved: 0\nquarantine: 1\n")
        code, out, err = run_main("--spool", self.path, "--quarantine", self.quarantine, "count",
                                  "--queue", "frozen", "--sender", "S@example.org")  # fmt: skip
        self.assertEqual((code, out), (0, "frozen: 1\n"))
        code, out, err = run_main("--spool", self.path, "count", "--recipient", "@nowhere.example")
        self.assertEqual(out, "active: 0\nfrozen: 0\nremoved: 0\nquarantine: 0\n")

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
        [data] = [json.loads(line) for line in out.splitlines()]
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


class InMemoryRelay:
    """
    What C{relayctl} calls, for tests: each call goes over an in-memory
    connection (iosim) to a real L{ControlProtocol} over C{spool}, with
    the client protocol relayctl uses.
    """

    def __init__(self, spool: Any, scheduler: Any, clock: Clock) -> None:
        self.spool = spool
        self.scheduler = scheduler
        self.clock = clock
        self.clients: list[ControlClient] = []

    def __call__(self, control: str, command: Any, client: Any = None, **kwargs: Any) -> Any:
        client = client if client is not None else ControlClient()
        self.clients.append(client)
        c, _, pump = iosim.connectedServerAndClient(
            lambda: ControlProtocol(self.spool, self.scheduler, (), self.clock), lambda: client
        )
        outcome: list[Any] = []
        c.callRemote(command, **kwargs).addBoth(outcome.append)
        pump.flush()
        [result] = outcome
        if isinstance(result, Failure):
            raise result.value
        return result


class QueueToolsTests(SynchronousTestCase):
    """
    C{relayctl}'s status, count, summary, show and the bulk actions, end to
    end over a disk spool: through a relay (a real control endpoint in
    memory) and straight from the directory, which print the same.
    """

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        self.clock = Clock()
        self.spool = DiskSpool(self.path, synchronous, self.clock)
        self.scheduler = FakeScheduler(self.clock)
        self.relay = InMemoryRelay(self.spool, self.scheduler, self.clock)
        self.patch(ctl, "_call", self.relay)
        made = [
            (3, make_envelope(new_id(NOW - 3 * 60), recipients=("a@a.example",))),
            (30, make_envelope(new_id(NOW - 30 * 60), recipients=("b@b.example", "c@a.example"))),
            (400, make_envelope(new_id(NOW - 400 * 60), recipients=("d@b.example",))),
            (7, dataclasses.replace(
                make_envelope(new_id(NOW - 7 * 60), recipients=("e@c.example",)),
                next_hop_choices=(),
            )),
        ]  # fmt: skip
        self.ids = []
        for minutes, envelope in made:
            # accepted when its id says it was, as in a relay
            self.clock.advance(NOW - minutes * 60 - self.clock.seconds())
            [entry] = self.successResultOf(self.spool.enqueue([envelope]))
            self.ids.append(entry.id)
        self.clock.advance(NOW - self.clock.seconds())
        self.oldest_first = [self.ids[i] for i in (2, 1, 3, 0)]

    def both(self, *argv: str) -> str:
        """
        Run C{relayctl argv} through the relay and from disk; both must
        succeed and print the same: return what they print.
        """
        code, remote, err = run_main("--control", "unix:/c", *argv)
        self.assertEqual((code, err), (0, ""))
        self.patch(ctl, "_call", lambda *a, **kw: self.fail("no relay to call"))
        code, local, err = run_main("--spool", self.path, *argv)
        self.patch(ctl, "_call", self.relay)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(local, remote)
        return remote

    def test_status_formats(self) -> None:
        """
        C{status} in each format, with and without filters: a table, the
        exim layout, JSON Lines and ids, oldest first.
        """
        table = self.both("status").splitlines()
        self.assertEqual(table[0].split()[:3], ["ID", "SENDER", "RECIPIENTS"])
        self.assertEqual([line.split()[0] for line in table[1:]], self.oldest_first)
        exim = self.both("status", "--format", "exim")
        self.assertIn(f" 6h    {len(DATA)} {self.ids[2]} <s@example.org>\n          d@b.example\n", exim)
        lines = self.both("status", "--format", "json").splitlines()
        self.assertEqual([json.loads(line)["id"] for line in lines], self.oldest_first)
        ids = self.both("status", "--format", "ids")
        self.assertEqual(ids, "".join(i + "\n" for i in self.oldest_first))
        filtered = self.both("status", "--format", "ids", "--recipient", "@b.example", "--older", "1h")
        self.assertEqual(filtered, self.ids[2] + "\n")
        self.assertEqual(self.both("status", "--format", "ids", "--younger", "5m"), self.ids[0] + "\n")
        self.assertEqual(self.both("status", "--format", "ids", "--next-hop", "default"),
                         self.ids[3] + "\n")  # fmt: skip

    def test_count(self) -> None:
        """
        C{count}, all queues or one, with filters.
        """
        self.assertEqual(self.both("count"), "active: 4\nfrozen: 0\nremoved: 0\nquarantine: 0\n")
        self.assertEqual(self.both("count", "--queue", "active", "--recipient", "@a.example"),
                         "active: 2\n")  # fmt: skip

    def test_summary(self) -> None:
        """
        C{summary}: entries per recipient domain in age buckets, the total
        first; by next hop, entries on the default route under the
        relay's smarthost (a row of their own from disk).
        """
        self.assertEqual(self.both("summary"), (
            "DOMAIN    T 5 10 20 40 80 160 320 320+\n"
            "TOTAL     4 1  1  0  1  0   0   0    1\n"
            "a.example 2 1  0  0  1  0   0   0    0\n"
            "b.example 2 0  0  0  1  0   0   0    1\n"
            "c.example 1 0  1  0  0  0   0   0    0\n"
        ))  # fmt: skip
        self.assertEqual(self.both("summary", "--top", "1").splitlines()[2].split()[0], "a.example")
        code, out, err = run_main("--control", "unix:/c", "summary", "--by", "next-hop")
        self.assertEqual(out.splitlines()[2:], [
            "mx.example.net:25  3 1  0  0  1  0   0   0    1",
            "smart.example:2525 1 0  1  0  0  0   0   0    0",
        ])  # fmt: skip
        code, out, err = run_main("--spool", self.path, "summary", "--by", "next-hop")
        self.assertIn("(default route)   1 0  1", out)

    def test_show(self) -> None:
        """
        C{show ID}: the entry and its headers, or with C{--body} the whole
        message; the relay says where the default route goes now.
        """
        code, remote, err = run_main("--control", "unix:/c", "show", self.ids[3])
        self.assertEqual((code, err), (0, ""))
        code, local, err = run_main("--spool", self.path, "show", self.ids[3])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("next hops: default route (now smart.example:2525)\n", remote)
        self.assertIn("next hops: default route (the relay's --smarthost, else MX)\n", local)
        self.assertEqual(remote.replace("now smart.example:2525", "the relay's --smarthost, else MX"),
                         local)  # fmt: skip
        self.assertTrue(remote.startswith(f"id: {self.ids[3]}\nqueue: active\n"))
        self.assertIn("  pending    e@c.example\n", remote)
        self.assertTrue(remote.endswith(
            "*** MESSAGE HEADERS ***\nSubject: hello\r\nFrom: s@example.org\r\n\r\n*** END ***\n"
        ))
        body = self.both("show", "--body", self.ids[0])
        self.assertTrue(body.endswith("*** MESSAGE ***\n" + DATA.decode() + "*** END ***\n"))

    def test_show_unknown(self) -> None:
        """
        C{show} of an unknown id exits with 1 and says so.
        """
        code, out, err = run_main("--control", "unix:/c", "show", "nosuch")
        self.assertEqual((code, out, err), (1, "", "relayctl show: unknown entry: no such entry: nosuch\n"))
        code, out, err = run_main("--spool", self.path, "show", "nosuch")
        self.assertEqual((code, out, err), (1, "", "relayctl show: no such entry: nosuch\n"))

    def test_bulk_freeze_and_send(self) -> None:
        """
        A filtered freeze freezes what matches and says how many; C{send}
        by filter brings them back, rerouted.
        """
        code, out, err = run_main("--control", "unix:/c", "freeze", "--recipient", "@b.example")
        self.assertEqual((code, out, err), (0, "freeze: changed 2 of 2 matching entries\n", ""))
        self.assertEqual(self.both("count"), "active: 2\nfrozen: 2\nremoved: 0\nquarantine: 0\n")
        code, out, err = run_main("--control", "unix:/c", "send", "--frozen", "--next-hop", "new.example")
        self.assertEqual(out, "send: changed 2 of 2 matching entries\n")
        self.assertEqual(self.both("status", "--format", "ids", "--next-hop", "new.example:25"),
                         "".join(i + "\n" for i in (self.ids[2], self.ids[1])))  # fmt: skip
        code, out, err = run_main("--control", "unix:/c", "freeze")
        self.assertEqual((code, out), (ctl.USAGE, ""))
        self.assertIn("give IDs, --all or a filter", err)

    def test_listing_pages(self) -> None:
        """
        Through the relay a long listing comes in several pages, printed as
        they come.
        """
        more = [make_envelope(new_id(NOW - 10)) for _ in range(LIST_PAGE + 1)]
        self.successResultOf(self.spool.enqueue(more))
        out = self.both("status", "--format", "ids")
        self.assertEqual(len(out.splitlines()), LIST_PAGE + 5)
        self.assertEqual(self.relay.clients[0].pages, 2)
