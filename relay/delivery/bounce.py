"""
relay's own delivery status notifications (RFC 3464): bounces for
recipients that failed, warnings for recipients still being retried, and
"relayed" reports for recipients that asked for news of success when the
next hop could not take the request further (RFC 3461 section 4.2).

A report is built with the standard library's C{email} package: a
multipart/report of a human-readable part, a message/delivery-status part
(one block for the message, one per recipient), and the original message
(message/rfc822) or its header section (text/rfc822-headers) with the
bytes as received, folding and all.  The report of an SMTPUTF8 message
uses RFC 6533's message/global-delivery-status, message/global and
message/global-headers, and may hold UTF-8 as it is.

Whom to tell, and what (NOTIFY, RET), is the scheduler's to decide with
L{relay.model.dsn}; this module writes what it is given.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart
from email.message import Message as MIMEMessage
from typing import Any, Sequence

from relay.model import dsn
from relay.model.address import NULL_SENDER, EmailAddress
from relay.model.argument import Argument, find
from relay.model.entry import Attempt, SpoolEntry, new_id
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import Message, header_section

#: the actions of RFC 3464 section 2.3.3 that relay reports
FAILED = "failed"
DELAYED = "delayed"
RELAYED = "relayed"

#: Originals up to this size come back whole in a bounce (unless RET=HDRS);
#: bigger ones come back as their header section (Postfix's
#: C{bounce_size_limit}, 50 000 bytes, does the same).
RETURN_FULL_UP_TO = 50_000

_STATUS = re.compile(r"^\s*(?:\d{3}[\s-]+)?([245]\.\d{1,3}\.\d{1,3})\b")
_REPLY = re.compile(r"^\s*\d{3}\b")

_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    RELAYED: "Successful Mail Delivery Report",
}


@dataclass(frozen=True)
class RecipientStatus:
    """
    What one per-recipient block of a report says.

    @ivar recipient: the address, as C{str(address)}.
    @ivar action: L{FAILED}, L{DELAYED} or L{RELAYED}.
    @ivar diagnostic: the reply that settled it (C{"550 5.1.1 no such
        user"}), or relay's own words for a failure that had no reply
        (C{"connection refused"}).
    @ivar remote_mta: the host it was last sent to, if any.
    @ivar last_attempt_at: when it was last tried, if it was.
    @ivar remote: the diagnostic is a remote server's SMTP reply.
    @ivar will_retry_until: for a delayed recipient, when its last retry
        is due (RFC 3464 section 2.3.7), if known.
    """

    recipient: str
    action: str
    diagnostic: str
    remote_mta: str | None = None
    last_attempt_at: float | None = None
    remote: bool = False
    will_retry_until: float | None = None

    @property
    def status(self) -> str:
        """
        The enhanced status code (RFC 3463): the one in the reply, else
        one that its class implies.
        """
        match = _STATUS.match(self.diagnostic)
        if self.action == RELAYED:
            return match.group(1) if match and match.group(1).startswith("2") else "2.0.0"
        if match:
            return match.group(1)
        code = self.diagnostic.strip()[:3]
        return "4.4.7" if code.startswith("4") or self.action == DELAYED else "5.0.0"


def _host(hop: str) -> str | None:
    if not hop:
        return None
    host, colon, port = hop.rpartition(":")
    return host if colon and port.isdigit() else hop


def _last_attempt(entry: SpoolEntry, recipient: str) -> Attempt | None:
    for attempt in reversed(entry.attempts):
        if recipient in attempt.recipients:
            return attempt
    return None


def recipient_statuses(
    entry: SpoolEntry,
    recipients: Sequence[tuple[str, str]],
    action: str,
    will_retry_until: float | None = None,
) -> list[RecipientStatus]:
    """
    The per-recipient blocks for C{recipients} (C{(address, reply text)}
    pairs) of C{entry}, with the hop and time of each one's last attempt
    from the entry's attempt records.

    @param will_retry_until: for delayed recipients, when the last retry
        is due.
    """
    statuses = []
    for recipient, text in recipients:
        attempt = _last_attempt(entry, recipient)
        remote = attempt.code is not None if attempt is not None else bool(_REPLY.match(text))
        statuses.append(
            RecipientStatus(
                recipient,
                action,
                text,
                remote_mta=_host(attempt.hop) if attempt is not None else None,
                last_attempt_at=attempt.at if attempt is not None else None,
                remote=remote,
                will_retry_until=will_retry_until,
            )
        )
    return statuses


def is_smtputf8(entry: SpoolEntry) -> bool:
    """
    Was the message received as SMTPUTF8 (or does its envelope need it)?
    Its reports then take RFC 6533's global forms.
    """
    return (
        find(tuple(entry.sender_args), "SMTPUTF8") is not None
        or not str(entry.sender).isascii()
        or any(r.needs_smtputf8 for r in entry.recipients)
        or not all(r.isascii() for r, _ in entry.failed_recipients)
        or not all(r.isascii() for r in entry.delivered_recipients)
    )


def returns_full(entry: SpoolEntry, action: str) -> bool:
    """
    Does the report on C{entry} carry the whole original?  Only a
    bounce does (RFC 3461 section 4.3 ties RET to failures), unless the
    sender said C{RET=HDRS} or the original is larger than
    L{RETURN_FULL_UP_TO}.
    """
    return (
        action == FAILED
        and not dsn.returns_headers_only(entry.sender_args)
        and entry.message_size <= RETURN_FULL_UP_TO
    )


def _clean(text: str, limit: int = 900) -> str:
    """
    C{text} on one line, of at most C{limit} octets in UTF-8: a report's
    field stays within SMTP's line length.
    """
    line = " ".join(text.replace("\r", " ").replace("\n", " ").split())
    return line.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _address_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"


def _human_text(
    statuses: Sequence[RecipientStatus], reporting_mta: str, action: str, expired: bool, age: float
) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if action == FAILED:
        lines += [
            "I'm sorry to have to inform you that your message could not be",
            "delivered to one or more recipients"
            + (", as delivery kept failing for too long." if expired else "."),
        ]
    elif action == DELAYED:
        hours = max(1, round(age / 3600))
        lines += [
            "This is a warning only: you do not need to send your message again.",
            "",
            f"Your message could not be delivered for {hours} hour{'s' if hours != 1 else ''}"
            " to the recipients below.",
            "It is still being retried; you will be told if delivery fails for good.",
        ]
    else:
        lines += [
            "Your message was relayed to the recipients below, to a mail system",
            "that does not report delivery status: you will get no further",
            "notification of success, though you may still hear of failures.",
        ]
    lines.append("")
    lines += [f"<{s.recipient}>: {_clean(s.diagnostic)}" for s in statuses]
    return "\r\n".join(lines) + "\r\n"


def _field_block(
    fields: Sequence[tuple[str, str]], policy: email_policy.EmailPolicy[Any]
) -> MIMEMessage:
    block = MIMEMessage(policy=policy)
    for name, value in fields:
        block[name] = value
    return block


def _status_blocks(
    entry: SpoolEntry,
    statuses: Sequence[RecipientStatus],
    reporting_mta: str,
    policy: email_policy.EmailPolicy[Any],
) -> list[MIMEMessage]:
    per_message = [("Reporting-MTA", f"dns; {reporting_mta}")]
    envid = dsn.envelope_id(entry.sender_args)
    if envid is not None:
        per_message.append(("Original-Envelope-Id", envid))
    per_message.append(("X-Relay-Queue-ID", entry.id))
    if entry.received_from:
        per_message.append(("X-Received-From", _clean(entry.received_from)))
    per_message.append(("Arrival-Date", email.utils.formatdate(entry.created_at)))
    blocks = [_field_block(per_message, policy)]
    args = dict(entry.recipient_args)
    for s in statuses:
        fields = [("Final-Recipient", f"{_address_type(s.recipient)}; {s.recipient}")]
        original = dsn.original_recipient(args.get(s.recipient, ()))
        if original is not None:
            fields.append(("Original-Recipient", f"{original[0]}; {original[1]}"))
        fields += [("Action", s.action), ("Status", s.status)]
        if s.remote_mta:
            fields.append(("Remote-MTA", f"dns; {s.remote_mta}"))
        diagnostic_type = "smtp" if s.remote else "X-Relay"
        fields.append(("Diagnostic-Code", f"{diagnostic_type}; {_clean(s.diagnostic)}"))
        if s.last_attempt_at is not None:
            fields.append(("Last-Attempt-Date", email.utils.formatdate(s.last_attempt_at)))
        if s.action == DELAYED and s.will_retry_until is not None:
            fields.append(("Will-Retry-Until", email.utils.formatdate(s.will_retry_until)))
        blocks.append(_field_block(fields, policy))
    return blocks


class _Splices:
    """
    Bytes that go into a report as they are.  The generator writes a
    placeholder for each; L{apply} puts the bytes in its place.

    The C{email} package has no way to write the body of a message/ part
    byte for byte (BytesGenerator encodes a string body as strict ASCII,
    and a parsed message would be regenerated: unfolded and re-folded),
    so the bytes are put in after it has written the rest, between
    boundaries chosen to occur in none of them.
    """

    def __init__(self) -> None:
        self._parts: dict[bytes, bytes] = {}

    def add(self, part: MIMEPart, data: bytes) -> None:
        """
        C{part}'s body is C{data}, verbatim.
        """
        if not data.isascii():
            part["Content-Transfer-Encoding"] = "8bit"
        token = f"relay-splice-{new_id()}-{len(self._parts)}"
        self._parts[token.encode("ascii")] = data
        part.set_payload(token)

    def boundary(self) -> str:
        """
        A multipart boundary that no spliced body holds.
        """
        while True:
            boundary = f"=_{new_id()}"
            if not any(boundary.encode("ascii") in data for data in self._parts.values()):
                return boundary

    def apply(self, generated: bytes) -> bytes:
        for token, data in self._parts.items():
            generated = generated.replace(token, data, 1)
        return generated


def _status_part(
    blocks: list[MIMEMessage], utf8: bool, policy: email_policy.EmailPolicy[Any], splices: _Splices
) -> MIMEPart:
    part = MIMEPart(policy=policy)
    part["Content-Type"] = "message/global-delivery-status" if utf8 else "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    if not utf8:
        # The generator writes a message/delivery-status part's blocks
        # one after the other, as the parser reads them.
        part.set_payload(list[MIMEMessage | str](blocks))
        return part
    # message/global-delivery-status (RFC 6533 section 6) is the same text
    # in UTF-8, which the generator only knows as an opaque message/ type:
    # its body is the blocks, written here as the generator would.
    # (each block ends in the empty line that ends a header section)
    splices.add(part, b"\r\n".join(block.as_bytes(policy=policy)[:-2] for block in blocks))
    return part


def _original_part(
    original: bytes, full: bool, utf8: bool, policy: email_policy.EmailPolicy[Any], splices: _Splices
) -> MIMEPart:
    """
    The original message (C{full}) or its header section, with its bytes
    as they were received.
    """
    part = MIMEPart(policy=policy)
    if full:
        part["Content-Type"] = "message/global" if utf8 else "message/rfc822"
        part["Content-Description"] = "Undelivered Message"
    else:
        part["Content-Type"] = "message/global-headers" if utf8 else "text/rfc822-headers"
        part["Content-Description"] = "Message Headers"
    splices.add(part, original if full else header_section(original))
    return part


def build_report(
    entry: SpoolEntry,
    statuses: Sequence[RecipientStatus],
    original: bytes,
    reporting_mta: str,
    now: float,
    *,
    full: bool = False,
    expired: bool = False,
) -> bytes:
    """
    A multipart/report DSN (RFC 3464, or RFC 6533's global form for an
    SMTPUTF8 message) on C{statuses} of C{entry}, as CRLF bytes.

    @param statuses: the per-recipient blocks, all of one action.
    @param original: the original message from its start: at least its
        header section, the whole of it when C{full}.
    @param full: return the whole original (message/rfc822), else its
        header section (text/rfc822-headers).
    @param expired: failures because the retries ran out (for the text).
    """
    action = statuses[0].action if statuses else FAILED
    utf8 = is_smtputf8(entry)
    # Fields are not folded (the generator would put a long Diagnostic-Code
    # in RFC 2047 encoded words): one line each, within SMTP's limit.
    policy = (email_policy.SMTPUTF8 if utf8 else email_policy.SMTP).clone(max_line_length=998)
    report = EmailMessage(policy=policy)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{entry.sender}>"
    report["Subject"] = _SUBJECTS[action]
    report["Date"] = email.utils.formatdate(now)
    report["Message-ID"] = f"<{new_id()}@{reporting_mta}>"
    # RFC 3834 section 5: a DSN is an automatic response.
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    report["Content-Type"] = f"multipart/report; report-type={report_type}"
    text = MIMEPart(policy=policy)
    body = _human_text(statuses, reporting_mta, action, expired, now - entry.created_at)
    charset = "us-ascii" if body.isascii() else "utf-8"
    text.set_content(body, charset=charset, cte="7bit" if body.isascii() else "8bit")
    text["Content-Description"] = "Notification"
    blocks = _status_blocks(entry, statuses, reporting_mta, policy)
    splices = _Splices()
    report.set_payload(
        [
            text,
            _status_part(blocks, utf8, policy, splices),
            _original_part(original, full, utf8, policy, splices),
        ]
    )
    report.set_boundary(splices.boundary())
    return splices.apply(report.as_bytes(policy=policy))


def report_envelope(
    entry: SpoolEntry, report: bytes, next_hop_choices: Sequence[str] = ()
) -> EnvelopeWithNextHop | None:
    """
    The envelope of C{report}, from the null sender to C{entry}'s sender;
    C{None} when there is nobody to tell (a report never goes to the null
    sender: a bounce never bounces).
    """
    if entry.sender.is_null or entry.sender.address is None:
        return None
    rcpt: EmailAddress = entry.sender.address
    sender_args: list[Argument] = []
    if not report.isascii():
        sender_args.append(Argument("BODY", "8BITMIME"))
        if is_smtputf8(entry):
            sender_args.append(Argument("SMTPUTF8"))
    envelope = Envelope(
        id=new_id(),
        sender=NULL_SENDER,
        sender_args=tuple(sender_args),
        recipients=(rcpt,),
        message=Message.from_bytes(report),
    )
    return EnvelopeWithNextHop(envelope, next_hop_choices=tuple(next_hop_choices))


def make_report(
    entry: SpoolEntry,
    recipients: Sequence[tuple[str, str]],
    action: str,
    original: bytes,
    reporting_mta: str,
    now: float,
    next_hop_choices: Sequence[str] = (),
    expired: bool = False,
    will_retry_until: float | None = None,
) -> EnvelopeWithNextHop | None:
    """
    The report envelope on C{recipients} (C{(address, reply text)}) of
    C{entry}, all with C{action}; C{None} when there is nobody to tell
    (null sender) or nothing to say.

    @param original: the original message from its start: the whole of
        it when L{returns_full}, else at least its header section.
    @param will_retry_until: for a delay warning, when the last retry is
        due.
    """
    if entry.sender.is_null or not recipients:
        return None
    statuses = recipient_statuses(entry, recipients, action, will_retry_until)
    data = build_report(
        entry, statuses, original, reporting_mta, now,
        full=returns_full(entry, action), expired=expired,
    )  # fmt: skip
    return report_envelope(entry, data, next_hop_choices)


def make_bounce(
    entry: SpoolEntry,
    failed: Sequence[tuple[str, str]],
    original: bytes,
    reporting_mta: str,
    now: float,
    next_hop_choices: Sequence[str] = (),
    expired: bool = False,
) -> EnvelopeWithNextHop | None:
    """
    The bounce for C{failed} recipients (C{(address, reply text)}) of
    C{entry}: L{make_report} with L{FAILED}.
    """
    return make_report(
        entry, failed, FAILED, original, reporting_mta, now, next_hop_choices, expired
    )
