"""
Bounces: RFC 3464 delivery status notifications for recipients that
failed permanently or whose retries ran out.
"""

from __future__ import annotations

import email.utils
from typing import Sequence

from relay.model.address import NULL_SENDER, EmailAddress
from relay.model.entry import SpoolEntry, new_id
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import Message

_STATUS = __import__("re").compile(r"^\s*(?:\d{3}\s+)?([245]\.\d{1,3}\.\d{1,3})\b")


def _status(diagnostic: str) -> str:
    match = _STATUS.match(diagnostic)
    if match:
        return match.group(1)
    code = diagnostic.strip()[:3]
    return "4.4.7" if code.startswith("4") else "5.0.0"


def _clean(text: str) -> str:
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def original_headers(message: Message) -> bytes:
    """
    The header section of C{message}, as CRLF lines.
    """
    return b"".join(
        f"{name}: {_clean(value)}\r\n".encode("utf-8", "surrogateescape")
        for name, value in message.headers
    )


def build_dsn(
    entry: SpoolEntry,
    failed: Sequence[tuple[str, str]],
    message: Message,
    reporting_mta: str,
    now: float,
    expired: bool = False,
) -> bytes:
    """
    A multipart/report DSN (RFC 3464) for C{failed} recipients
    (C{(address, diagnostic)} pairs) of C{entry}, as CRLF bytes.
    """
    boundary = f"=_{new_id()}"
    sender = str(entry.sender)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: <{new_id()}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
        "I'm sorry to have to inform you that your message could not be",
        "delivered to one or more recipients"
        + (", as delivery kept failing for too long." if expired else "."),
        "",
    ]
    for rcpt, diagnostic in failed:
        lines.append(f"<{rcpt}>: {_clean(diagnostic)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Relay-Queue-ID: {entry.id}",
        f"Arrival-Date: {email.utils.formatdate(entry.created_at)}",
    ]
    if entry.received_from:
        lines.append(f"X-Received-From: {_clean(entry.received_from)}")
    for rcpt, diagnostic in failed:
        lines += [
            "",
            f"Final-Recipient: rfc822; {rcpt}",
            "Action: failed",
            f"Status: {_status(diagnostic)}",
            f"Diagnostic-Code: smtp; {_clean(diagnostic)}",
        ]
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered Message Headers",
        "",
    ]
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    return head + original_headers(message) + tail


def make_bounce(
    entry: SpoolEntry,
    failed: Sequence[tuple[str, str]],
    message: Message,
    reporting_mta: str,
    now: float,
    next_hop_choices: Sequence[str] = (),
    expired: bool = False,
) -> EnvelopeWithNextHop | None:
    """
    The bounce envelope for C{failed} recipients of C{entry}, from the
    null sender to the original sender; C{None} when there is nobody to
    tell (null sender: a bounce never bounces) or nothing failed.
    """
    if entry.sender.is_null or not failed or entry.sender.address is None:
        return None
    rcpt: EmailAddress = entry.sender.address
    dsn = build_dsn(entry, failed, message, reporting_mta, now, expired)
    envelope = Envelope(
        id=new_id(),
        sender=NULL_SENDER,
        sender_args=(),
        recipients=(rcpt,),
        message=Message.from_bytes(dsn),
    )
    return EnvelopeWithNextHop(envelope, next_hop_choices=tuple(next_hop_choices))
