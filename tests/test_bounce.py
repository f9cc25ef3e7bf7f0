"""
Tests for L{relay.delivery.bounce}: relay's own delivery status
notifications, parsed back with the standard library's C{email} package.
"""

from __future__ import annotations

import email
import email.policy
from email.message import Message as MIMEMessage
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.bounce import (
    DELAYED,
    FAILED,
    RELAYED,
    RETURN_FULL_UP_TO,
    build_report,
    make_bounce,
    make_report,
    recipient_statuses,
    returns_full,
)
from relay.model.address import NULL_SENDER, EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.entry import Attempt, SpoolEntry
from relay.model.message import header_section

# A folded References: header (and a folded Received:), as a client sent them.
HEADERS = (
    b"Received: from client.example ([192.0.2.9])\r\n"
    b"\tby relay.test (relay) with ESMTP id e;\r\n"
    b"\tTue, 01 Dec 2026 09:00:00 -0000\r\n"
    b"References: <1@example.org>\r\n <2@example.org>\r\n\t<3@example.org>\r\n"
    b"Subject: hi\r\n"
    b"Message-ID: <x@example.org>\r\n"
)
DATA = HEADERS + b"\r\nbody\r\n.\r\nFrom the end\r\n"


def entry(
    sender: Sender | None = None,
    sender_args: tuple[Argument, ...] = (),
    recipient_args: tuple[tuple[str, tuple[Argument, ...]], ...] = (),
    size: int = len(DATA),
    attempts: tuple[Attempt, ...] = (),
) -> SpoolEntry:
    return SpoolEntry(
        id="e-0", queue="active", envelope_id="e",
        sender=sender if sender is not None else Sender.of("s@example.org"),
        sender_args=sender_args, recipients=(), next_hop_choices=(), created_at=0.0,
        next_attempt_at=0.0, message_size=size, received_from="helo [192.0.2.9]",
        recipient_args=recipient_args, attempts=attempts,
    )  # fmt: skip


def parse(data: bytes) -> tuple[MIMEMessage, list[Any]]:
    """
    The report and its three parts; the line endings are checked first.
    """
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF in the report"
    msg = email.message_from_bytes(data, policy=email.policy.default)
    parts = msg.get_payload()
    assert isinstance(parts, list)
    return msg, parts


class FailureReportTests(SynchronousTestCase):
    """
    A bounce, field by field.
    """

    def test_fields(self) -> None:
        """
        The per-message block has Reporting-MTA, Original-Envelope-Id
        (ENVID decoded) and Arrival-Date; each per-recipient block has
        Final-Recipient, Original-Recipient (ORCPT decoded), Action,
        Status, Remote-MTA, Diagnostic-Code and Last-Attempt-Date from
        the recipient's last attempt.
        """
        e = entry(
            sender_args=(Argument("ENVID", "QQ+2B314"),),
            recipient_args=(("a@x.test", (Argument("ORCPT", "rfc822;A+2Bb@x.test"),)),),
            attempts=(
                Attempt(60.0, "mx.x.test:25", 550, "550 5.1.1 no such user", ("a@x.test",)),
                Attempt(70.0, "", None, "domain y.test not found", ("b@y.test",)),
            ),
        )
        failed = [("a@x.test", "550 5.1.1 no such user"), ("b@y.test", "domain y.test not found")]
        statuses = recipient_statuses(e, failed, FAILED)
        msg, (text, status, original) = parse(
            build_report(e, statuses, DATA, "relay.test", 86400.0)
        )
        self.assertEqual(msg["To"].addresses[0].addr_spec, "s@example.org")
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        self.assertEqual(text.get_content_type(), "text/plain")
        self.assertIn("<a@x.test>: 550 5.1.1 no such user", text.get_content())
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        per_message, a, b = status.get_payload()
        self.assertEqual(per_message["Reporting-MTA"], "dns; relay.test")
        self.assertEqual(per_message["Original-Envelope-Id"], "QQ+314")
        self.assertEqual(per_message["Arrival-Date"], "Thu, 01 Jan 1970 00:00:00 -0000")
        self.assertEqual(a["Final-Recipient"], "rfc822; a@x.test")
        self.assertEqual(a["Original-Recipient"], "rfc822; A+b@x.test")
        self.assertEqual(a["Action"], "failed")
        self.assertEqual(a["Status"], "5.1.1")
        self.assertEqual(a["Remote-MTA"], "dns; mx.x.test")
        self.assertEqual(a["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        self.assertEqual(a["Last-Attempt-Date"], "Thu, 01 Jan 1970 00:01:00 -0000")
        self.assertEqual(b["Final-Recipient"], "rfc822; b@y.test")
        self.assertIsNone(b["Original-Recipient"])
        self.assertIsNone(b["Remote-MTA"])
        self.assertEqual(b["Status"], "5.0.0")
        self.assertEqual(b["Diagnostic-Code"], "X-Relay; domain y.test not found")
        # build_report returns the header section unless told otherwise
        self.assertEqual(original.get_content_type(), "text/rfc822-headers")

    def test_no_envid(self) -> None:
        """
        Without ENVID there is no Original-Envelope-Id.
        """
        e = entry()
        _, (_, status, _) = parse(
            build_report(e, recipient_statuses(e, [("a@x.test", "550 no")], FAILED), DATA, "r", 0)
        )
        self.assertIsNone(status.get_payload()[0]["Original-Envelope-Id"])

    def test_whole_original_byte_for_byte(self) -> None:
        """
        Without RET (or with RET=FULL) a small original comes back whole
        as message/rfc822, its bytes as received: folded header fields
        stay folded, the body is not dot-stuffed or From-mangled.
        """
        for args in [(), (Argument("RET", "FULL"),)]:
            e = entry(sender_args=args)
            self.assertTrue(returns_full(e, FAILED))
            data = build_report(
                e, recipient_statuses(e, [("a@x.test", "550 no")], FAILED), DATA, "r", 0, full=True
            )
            self.assertIn(b"\r\n\r\n" + DATA + b"\r\n--", data)
            _, (_, _, original) = parse(data)
            self.assertEqual(original.get_content_type(), "message/rfc822")
            inner = original.get_payload()[0]
            self.assertEqual(inner["Subject"], "hi")
            self.assertEqual(inner.get_content(), "body\r\n.\r\nFrom the end\r\n")

    def test_headers_only(self) -> None:
        """
        With RET=HDRS, and for an original larger than
        L{RETURN_FULL_UP_TO}, only the header section comes back
        (text/rfc822-headers), its bytes as received: the folded
        References: header keeps its three lines.
        """
        self.assertFalse(returns_full(entry(sender_args=(Argument("RET", "HDRS"),)), FAILED))
        self.assertFalse(returns_full(entry(size=RETURN_FULL_UP_TO + 1), FAILED))
        e = entry(sender_args=(Argument("RET", "HDRS"),))
        data = build_report(e, recipient_statuses(e, [("a@x.test", "550 no")], FAILED), DATA, "r", 0)
        self.assertIn(b"\r\n\r\n" + HEADERS + b"\r\n--", data)
        self.assertNotIn(b"body", data)
        self.assertIn(b"References: <1@example.org>\r\n <2@example.org>\r\n\t<3@example.org>\r\n", data)
        _, (_, _, headers) = parse(data)
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertEqual(header_section(DATA), HEADERS)

    def test_long_diagnostic_one_line(self) -> None:
        """
        A long reply is one Diagnostic-Code line, not RFC 2047 words.
        """
        reply = "550 5.7.1 " + "x" * 300 + " blocked"
        e = entry()
        data = build_report(e, recipient_statuses(e, [("a@x.test", reply)], FAILED), DATA, "r", 0)
        self.assertIn(f"Diagnostic-Code: smtp; {reply}\r\n".encode(), data)
        self.assertNotIn(b"=?", data)


class OtherActionsTests(SynchronousTestCase):
    """
    Delay warnings and "relayed" reports.
    """

    def test_delayed(self) -> None:
        """
        A delay warning: Action delayed, the 4xx status of the last
        reply, headers only whatever RET says.
        """
        e = entry(attempts=(Attempt(10.0, "mx:25", 451, "451 4.3.0 try later", ("a@x.test",)),))
        self.assertFalse(returns_full(e, DELAYED))
        statuses = recipient_statuses(e, [("a@x.test", "451 4.3.0 try later")], DELAYED)
        msg, (text, status, headers) = parse(build_report(e, statuses, DATA, "r", 4 * 3600.0))
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        self.assertIn("for 4 hours", text.get_content())
        block = status.get_payload()[1]
        self.assertEqual((block["Action"], block["Status"]), ("delayed", "4.3.0"))
        self.assertEqual(block["Remote-MTA"], "dns; mx")
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")

    def test_relayed(self) -> None:
        """
        A "relayed" report: Action relayed, Status 2.x.x, the hop's reply
        as the diagnostic.
        """
        e = entry(
            attempts=(Attempt(10.0, "[192.0.2.5]:25", 250, "250 2.0.0 Ok: queued", ("a@x.test",)),)
        )
        statuses = recipient_statuses(e, [("a@x.test", "250 2.0.0 Ok: queued")], RELAYED)
        msg, (_, status, headers) = parse(build_report(e, statuses, DATA, "r", 20.0))
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        block = status.get_payload()[1]
        self.assertEqual((block["Action"], block["Status"]), ("relayed", "2.0.0"))
        self.assertEqual(block["Remote-MTA"], "dns; [192.0.2.5]")
        self.assertEqual(block["Diagnostic-Code"], "smtp; 250 2.0.0 Ok: queued")
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")


class GlobalFormTests(SynchronousTestCase):
    """
    The report on an SMTPUTF8 message (RFC 6533).
    """

    UTF8_HEADERS = "Subject: café\r\nFrom: élève@example.org\r\n".encode()
    UTF8_DATA = UTF8_HEADERS + "\r\nbonjour ça va\r\n".encode()

    def utf8_entry(self, args: tuple[Argument, ...] = ()) -> SpoolEntry:
        return entry(
            sender=Sender.of(EmailAddress.parse("élève@example.org", smtputf8=True)),
            sender_args=(Argument("SMTPUTF8"),) + args,
            recipient_args=(("ü@x.test", (Argument("ORCPT", "utf-8;\\x{FC}@x.test"),)),),
            size=len(self.UTF8_DATA),
        )

    def test_global_types(self) -> None:
        """
        message/global-delivery-status with UTF-8 fields (utf-8 address
        type), message/global with the original's bytes, and the report
        envelope asks for SMTPUTF8 and 8BITMIME.
        """
        e = self.utf8_entry()
        report = make_report(e, [("ü@x.test", "550 5.1.1 nein")], FAILED, self.UTF8_DATA, "r", 0)
        assert report is not None
        self.assertEqual(
            [str(a) for a in report.envelope.sender_args], ["BODY=8BITMIME", "SMTPUTF8"]
        )
        data = report.envelope.message.data
        assert data is not None
        self.assertIn(b"\r\n\r\n" + self.UTF8_DATA + b"\r\n--", data)
        msg, (_, status, original) = parse(data)
        self.assertEqual(msg.get_param("report-type"), "global-delivery-status")
        self.assertIn("\r\nTo: <élève@example.org>\r\n".encode(), data)
        self.assertEqual(status.get_content_type(), "message/global-delivery-status")
        self.assertEqual(original.get_content_type(), "message/global")
        # The parser knows message/global-delivery-status as an opaque
        # body: its blocks are read back with the parser too.
        raw = data.split(b"Content-Type: message/global-delivery-status")[1]
        raw = raw.split(b"\r\n\r\n", 1)[1].split(b"\r\n--")[0]
        per_message, rcpt = [
            email.message_from_bytes(b, policy=email.policy.SMTPUTF8) for b in raw.split(b"\r\n\r\n")
        ]
        self.assertEqual(per_message["Reporting-MTA"], "dns; r")
        self.assertEqual(rcpt["Final-Recipient"], "utf-8; ü@x.test")
        self.assertEqual(rcpt["Original-Recipient"], "utf-8; ü@x.test")
        self.assertEqual(rcpt["Action"], "failed")
        self.assertEqual(rcpt["Status"], "5.1.1")
        self.assertEqual(rcpt["Diagnostic-Code"], "smtp; 550 5.1.1 nein")

    def test_global_headers(self) -> None:
        """
        Headers only (RET=HDRS): message/global-headers, bytes as received.
        """
        e = self.utf8_entry((Argument("RET", "HDRS"),))
        report = make_report(e, [("ü@x.test", "550 5.1.1 nein")], FAILED, self.UTF8_DATA, "r", 0)
        assert report is not None and report.envelope.message.data is not None
        data = report.envelope.message.data
        self.assertIn(b"\r\n\r\n" + self.UTF8_HEADERS + b"\r\n--", data)
        _, (_, _, headers) = parse(data)
        self.assertEqual(headers.get_content_type(), "message/global-headers")


class EnvelopeTests(SynchronousTestCase):
    """
    Who gets a report.
    """

    def test_envelope(self) -> None:
        """
        The bounce goes from the null sender to the original sender, to
        the hops given; an ASCII report needs no parameters.
        """
        b = make_bounce(entry(), [("a@x.test", "550 no")], DATA, "relay.test", 0.0, ("smart:25",))
        assert b is not None
        self.assertEqual(b.envelope.sender, NULL_SENDER)
        self.assertEqual(b.envelope.sender_args, ())
        self.assertEqual(b.envelope.recipients, (EmailAddress.parse("s@example.org"),))
        self.assertEqual(b.next_hop_choices, ("smart:25",))

    def test_null_sender(self) -> None:
        """
        A report never goes to the null sender (a bounce never bounces),
        whatever its action; nothing for nothing failed.
        """
        for action in (FAILED, DELAYED, RELAYED):
            self.assertIsNone(make_report(entry(NULL_SENDER), [("a@x.test", "5")], action, DATA, "r", 0))
        self.assertIsNone(make_bounce(entry(), [], DATA, "r", 0.0))
