"""
Tests for L{relay.delivery.bounce}.
"""

from __future__ import annotations

import email

from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.bounce import build_dsn, make_bounce
from relay.model.address import NULL_SENDER, EmailAddress, Sender
from relay.model.entry import SpoolEntry
from relay.model.message import Message

DATA = b"Subject: hi\r\nMessage-ID: <x@example.org>\r\n\r\nbody\r\n"


def entry(sender: Sender) -> SpoolEntry:
    return SpoolEntry(
        id="e-0", queue="active", envelope_id="e", sender=sender, sender_args=(),
        recipients=(), next_hop_choices=(), created_at=0.0,
        next_attempt_at=0.0, message_size=len(DATA), received_from="helo [192.0.2.9]",
    )


class BounceTests(SynchronousTestCase):
    """
    DSN content and the null-sender rule.
    """

    def test_dsn(self) -> None:
        """
        The DSN is an RFC 3464 report with CRLF line endings, one
        per-recipient block per failed recipient.
        """
        failed = [("a@x.test", "550 5.1.1 no such user"), ("b@x.test", "451 4.3.0 later")]
        data = build_dsn(entry(Sender.of("s@example.org")), failed, Message.from_bytes(DATA),
                         "relay.test", 86400.0, expired=True)
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        msg = email.message_from_bytes(data)
        self.assertEqual(msg["To"], "<s@example.org>")
        self.assertEqual(msg.get_content_type(), "multipart/report")
        text, status, headers = msg.get_payload()  # type: ignore[misc]
        self.assertIn("<a@x.test>: 550 5.1.1 no such user", text.get_payload())
        blocks = status.get_payload()
        self.assertEqual(blocks[0]["Reporting-MTA"], "dns; relay.test")
        self.assertIn("1970", blocks[0]["Arrival-Date"])
        self.assertEqual([b["Status"] for b in blocks[1:]], ["5.1.1", "4.3.0"])
        self.assertEqual([b["Action"] for b in blocks[1:]], ["failed", "failed"])
        self.assertEqual(blocks[2]["Final-Recipient"], "rfc822; b@x.test")
        self.assertIn("Message-ID: <x@example.org>", headers.get_payload())

    def test_envelope(self) -> None:
        """
        The bounce goes from the null sender to the original sender.
        """
        b = make_bounce(entry(Sender.of("s@example.org")), [("a@x.test", "550 no")],
                        Message.from_bytes(DATA), "relay.test", 0.0, ("smart:25",))
        assert b is not None
        self.assertEqual(b.envelope.sender, NULL_SENDER)
        self.assertEqual(b.envelope.recipients, (EmailAddress.parse("s@example.org"),))
        self.assertEqual(b.next_hop_choices, ("smart:25",))

    def test_null_sender(self) -> None:
        """
        A bounce never bounces: nothing for a null sender, nor for nothing
        failed.
        """
        m = Message.from_bytes(DATA)
        self.assertIsNone(make_bounce(entry(NULL_SENDER), [("a@x.test", "550 no")], m, "r", 0.0))
        self.assertIsNone(make_bounce(entry(Sender.of("s@example.org")), [], m, "r", 0.0))
