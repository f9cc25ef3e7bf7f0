"""
Envelopes: a sender, recipients and a message, and the envelope together
with the route it takes (L{EnvelopeWithNextHop}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterable, Sequence

from relay.model.address import EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.message import Message


def _tuple(value: Iterable) -> tuple:  # type: ignore[type-arg]
    return value if isinstance(value, tuple) else tuple(value)


@dataclass(frozen=True)
class Envelope:
    """
    One message transaction: C{MAIL FROM}, the accepted C{RCPT TO}s and the
    data.  Immutable: C{dataclasses.replace(envelope, recipients=[...])}
    makes a changed copy.

    @ivar id: the envelope id, also used in logs and the C{Received} header.
    @ivar recipient_args: for each recipient (as C{str(address)}) the
        parameters given with its RCPT TO (NOTIFY, ORCPT).
    @ivar rejected_recipients: recipients that the plugin rejected.
    """

    id: str
    sender: Sender
    sender_args: Sequence[Argument]
    recipients: Sequence[EmailAddress]
    message: Message
    rejected_recipients: Sequence[EmailAddress] = ()
    recipient_args: Sequence[tuple[str, tuple[Argument, ...]]] = ()

    def __post_init__(self) -> None:
        for name in ("sender_args", "recipients", "rejected_recipients", "recipient_args"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return self.message.headers

    def header(self, name: str) -> str | None:
        """
        The first value of the message's header field C{name}, if any.
        """
        return self.message.header(name)

    def header_values(self, name: str) -> list[str]:
        return self.message.header_values(name)

    def args_for(self, recipient: EmailAddress) -> tuple[Argument, ...]:
        """
        The RCPT TO parameters given with C{recipient}.
        """
        key = str(recipient)
        for address, args in self.recipient_args:
            if address == key:
                return args
        return ()


def _hop(value: object) -> str:
    if isinstance(value, str):
        return value
    host = getattr(value, "host", None)
    port = getattr(value, "port", None)
    if host is None or port is None:
        raise TypeError(f"next hop must be 'host:port' or an address, not {value!r}")
    host = str(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _seconds(value: object) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise TypeError(f"retry interval must be seconds or a timedelta, not {value!r}")


@dataclass(frozen=True)
class EnvelopeWithNextHop:
    """
    An envelope and where to send it.

    @ivar next_hop_choices: C{host:port} strings tried in order; empty
        means "look up the MX of each recipient domain".
    @ivar retry_intervals: seconds to wait before each further attempt;
        when they run out the envelope is frozen.  Empty means the relay's
        default schedule.
    @ivar tls_policy: the TLS policy of the delivery, in the words of the
        C{--tls-policy} file (C{"verify match=mx.example.com"},
        C{"dane-only"}, C{"encrypt"}, ...); it wins over the file and the
        published policies.  C{None}: chosen as for any mail.
    """

    envelope: Envelope
    next_hop_choices: Sequence[str] = ()
    retry_intervals: Sequence[float] = field(default=())
    tls_policy: str | None = None

    def __post_init__(self) -> None:
        if self.tls_policy is not None:
            # Checked here, so that a plugin's mistake fails its Send.
            from relay.model.tls import parse_policy

            parse_policy(self.tls_policy)
        object.__setattr__(self, "next_hop_choices", tuple(_hop(h) for h in self.next_hop_choices))
        object.__setattr__(
            self, "retry_intervals", tuple(_seconds(i) for i in self.retry_intervals)
        )
