"""
What one delivery attempt to one hop comes to: a L{DeliveryResult} (a reply
for every recipient) or a L{DeliveryError} (the hop took nothing).

They are the relay client's whole answer to the scheduler, which settles
the spool entry from them; every part of the client raises or returns
these, so they live apart from all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.model.entry import TLSOutcome
from relay.model.reply import Reply


@dataclass(frozen=True)
class DeliveryResult:
    """
    The outcome of one delivery attempt to one hop.

    @ivar hop: the hop, C{host:port}.
    @ivar replies: for each recipient (C{str(address)}), in envelope order,
        the reply that settled it: its RCPT TO rejection, else the reply to
        the end of data.
    @ivar address: the peer the connection went to, C{(ip, port)} (of the
        several addresses a host name may have, the one that answered).
    @ivar tls: the TLS policy of the session and what came of it.
    """

    hop: str
    replies: tuple[tuple[str, Reply], ...]
    address: tuple[str, int] | None = None
    tls: TLSOutcome | None = None


class DeliveryError(Exception):
    """
    The hop could not take the message at all.

    @ivar reply: the hop's reply (or one made up to describe the failure),
        C{None} for connection failures and timeouts.
    @ivar permanent: the hop refused the message permanently (a 5xx to
        MAIL FROM or DATA, a message too big, SMTPUTF8 needed but not
        offered); else try again later or elsewhere.
    @ivar address: the peer connected to, C{(ip, port)}; C{None} when no
        connection was made.
    @ivar tls: the TLS policy and what came of it, when one was chosen.
    """

    def __init__(
        self,
        message: str,
        reply: Reply | None = None,
        permanent: bool = False,
        address: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.reply = reply
        self.permanent = permanent
        self.address = address
        self.tls: TLSOutcome | None = None


def refused(
    hop: str,
    what: str,
    reply: Reply,
    address: tuple[str, int] | None,
    permanent: bool = False,
) -> DeliveryError:
    """
    The L{DeliveryError} for a step of the conversation that C{hop} (at
    C{address}) answered with C{reply}, or that the client gave up on with
    a C{reply} of its own making (TLS required but not offered, ...).
    """
    return DeliveryError(f"{hop}: {what}: {reply}", reply, permanent, address)
