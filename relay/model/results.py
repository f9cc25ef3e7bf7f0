"""
What the plugin callbacks return (the variants of async_smtp's
C{Server_callbacks.S}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

from relay.model.envelope import EnvelopeWithNextHop
from relay.model.reply import Reply


@dataclass(frozen=True)
class Accept:
    """
    C{session_connect}: greet the client with C{220 greeting}.
    """

    greeting: str


@dataclass(frozen=True)
class Disconnect:
    """
    C{session_connect} or C{session_helo}: send C{reply} (if any) and close.
    """

    reply: Reply | None = None


@dataclass(frozen=True)
class Continue:
    """
    Go on.  From C{session_helo}, C{advertise_auth} offers AUTH in the EHLO
    reply.
    """

    advertise_auth: bool = False


@dataclass(frozen=True)
class Deny:
    """
    C{session_helo}: refuse with C{reply}, session stays open.
    C{check_authentication_credentials}: the credentials are wrong.
    """

    reply: Reply | None = None


@dataclass(frozen=True)
class Allow:
    """
    C{check_authentication_credentials}: the credentials are valid.
    """


@dataclass(frozen=True)
class Reject:
    """
    C{process_sender}: abort this message.  C{process_recipient}: leave this
    recipient out.  C{process_envelope}: refuse the message.
    """

    reply: Reply


@dataclass(frozen=True)
class Consume:
    """
    C{process_envelope}: the plugin handled the message; reply
    C{250 2.0.0 ok_msg} and relay nothing.
    """

    ok_msg: str = "Ok"


@dataclass(frozen=True)
class Send:
    """
    C{process_envelope}: spool these envelopes for delivery; the client gets
    250 once they are all durably on disk.
    """

    envelopes: Sequence[EnvelopeWithNextHop]

    def __post_init__(self) -> None:
        object.__setattr__(self, "envelopes", tuple(self.envelopes))


@dataclass(frozen=True)
class Quarantine:
    """
    C{process_envelope}: keep these envelopes in the quarantine directory for
    a person to inspect, recording C{reason}, and answer the client C{reply}.
    """

    envelopes: Sequence[EnvelopeWithNextHop]
    reply: Reply
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "envelopes", tuple(self.envelopes))


ConnectResult = Union[Accept, Disconnect]
HeloResult = Union[Continue, Deny, Disconnect]
SenderResult = Union[Continue, Reject]
RecipientResult = Union[Continue, Reject]
EnvelopeResult = Union[Consume, Reject, Send, Quarantine]
AuthResult = Union[Allow, Deny]
