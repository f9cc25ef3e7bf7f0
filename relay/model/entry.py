"""
Spool entries: an envelope as it waits in the spool, with its route, its
retry schedule and the record of its delivery attempts.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Sequence

from relay.model.address import EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import Message

ACTIVE = "active"
FROZEN = "frozen"
REMOVED = "removed"
QUARANTINE = "quarantine"
QUEUES = (ACTIVE, FROZEN, REMOVED, QUARANTINE)


def new_id() -> str:
    """
    A fresh id for an envelope: 16 lower-case base32 characters (80 random
    bits), safe in file names and log lines.
    """
    return base64.b32encode(os.urandom(10)).decode("ascii").lower()


@dataclass(frozen=True)
class Attempt:
    """
    One delivery attempt: when, to which hop, and what came of it.

    @ivar reply: the reply that settled the attempt, as text
        (C{"451 4.3.0 try later"}), or a description of the failure
        (C{"connection refused"}).
    @ivar code: the reply code, or C{None} when no reply was read.
    @ivar address: the peer connected to, C{(ip, port)}, or C{None} when
        no connection was made (or it is not known).
    """

    at: float
    hop: str
    code: int | None
    reply: str
    recipients: tuple[str, ...] = ()
    address: tuple[str, int] | None = None


@dataclass(frozen=True)
class SpoolEntry:
    """
    One envelope in the spool.

    @ivar id: the spool id, unique in the spool (C{<envelope_id>-<n>}).
    @ivar queue: one of L{QUEUES}.
    @ivar envelope_id: the id of the received envelope it came from.
    @ivar recipients: recipients still to be delivered.
    @ivar failed_recipients: C{(recipient, reply text)} for recipients that
        failed permanently (the material for a bounce).
    @ivar retry_intervals: the retry intervals not used yet.
    @ivar next_attempt_at: when delivery is due (seconds since the epoch,
        from the injected clock).
    @ivar reason: why it is quarantined or frozen, if it is.
    @ivar received_from: who sent it (C{helo [address]}), for logs and DSNs.
    """

    id: str
    queue: str
    envelope_id: str
    sender: Sender
    sender_args: Sequence[Argument]
    recipients: Sequence[EmailAddress]
    next_hop_choices: Sequence[str]
    retry_intervals: Sequence[float]
    created_at: float
    next_attempt_at: float
    message_size: int
    recipient_args: Sequence[tuple[str, tuple[Argument, ...]]] = ()
    rejected_recipients: Sequence[EmailAddress] = ()
    failed_recipients: Sequence[tuple[str, str]] = ()
    attempts: Sequence[Attempt] = field(default=())
    reason: str | None = None
    received_from: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "sender_args",
            "recipients",
            "next_hop_choices",
            "retry_intervals",
            "recipient_args",
            "rejected_recipients",
            "failed_recipients",
            "attempts",
        ):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @property
    def last_error(self) -> str | None:
        for attempt in reversed(self.attempts):
            if attempt.code is None or attempt.code >= 400:
                return attempt.reply
        return None

    def envelope(self, message: Message) -> Envelope:
        """
        The envelope this entry holds, with its message.
        """
        return Envelope(
            id=self.envelope_id,
            sender=self.sender,
            sender_args=self.sender_args,
            recipients=self.recipients,
            message=message,
            rejected_recipients=self.rejected_recipients,
            recipient_args=self.recipient_args,
        )


def entry_for(
    entry_id: str,
    queue: str,
    envelope: EnvelopeWithNextHop,
    now: float,
    reason: str | None = None,
    received_from: str | None = None,
) -> SpoolEntry:
    """
    The L{SpoolEntry} a freshly spooled L{EnvelopeWithNextHop} becomes
    (in any spool), due at C{now}.
    """
    env = envelope.envelope
    return SpoolEntry(
        id=entry_id,
        queue=queue,
        envelope_id=env.id,
        sender=env.sender,
        sender_args=env.sender_args,
        recipients=env.recipients,
        next_hop_choices=envelope.next_hop_choices,
        retry_intervals=envelope.retry_intervals,
        created_at=now,
        next_attempt_at=now,
        message_size=env.message.size,
        recipient_args=env.recipient_args,
        rejected_recipients=env.rejected_recipients,
        reason=reason,
        received_from=received_from,
    )
