"""
An example plugin: the policy of a small organisation's mail relay.

    twistd -n relay --callbacks examples.policy.LocalPolicy

- Mail for the organisation's own domains is accepted from anyone and
  goes to its mail store.
- Mail for anywhere else is relayed only for authenticated users and for
  clients on the local networks; others get C{554 5.7.1 Relay access
  denied} for that recipient (the envelope goes on with the others).
- A message that a content filter upstream marked (C{X-Spam-Flag: YES})
  is quarantined for a person to look at; the client is told it was
  accepted, so that no bounce goes back to a forged sender.

C{examples/test_policy.py} tests it with L{relay.testing}.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Iterable, Sequence

from twisted.logger import Logger

from relay import (
    Argument,
    Continue,
    EmailAddress,
    Envelope,
    EnvelopeResult,
    EnvelopeWithNextHop,
    Quarantine,
    RecipientResult,
    Reject,
    Reply,
    Send,
    Sender,
    Session,
    Simple,
)


class LocalPolicy(Simple):
    """
    Accept mail for our domains, relay for our users and networks,
    quarantine what the content filter flagged.

    The relay makes the plugin with no arguments: the defaults below are
    the configuration (subclass, or make it with arguments in a C{.tac}).
    """

    def __init__(
        self,
        local_domains: Iterable[str] = ("example.com", "example.net"),
        trusted_networks: Iterable[str] = ("127.0.0.0/8", "::1/128", "10.0.0.0/8"),
        mail_store: str = "mailstore.example.com:25",
        quarantine_header: tuple[str, str] = ("X-Spam-Flag", "YES"),
    ) -> None:
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.trusted_networks = tuple(ipaddress.ip_network(n) for n in trusted_networks)
        self.mail_store = mail_store
        self.quarantine_header = quarantine_header

    def is_local(self, address: EmailAddress) -> bool:
        """
        Whether C{address} is in one of our domains.
        """
        return address.domain is not None and address.domain.lower() in self.local_domains

    def may_relay(self, session: Session) -> bool:
        """
        Whether this client may send mail to other domains: it logged in,
        or it connects from a trusted network.
        """
        if session.authenticated is not None:
            return True
        try:
            remote = ipaddress.ip_address(session.remote_host)
        except ValueError:
            return False
        return any(remote in network for network in self.trusted_networks)

    def process_recipient(
        self,
        log: Logger,
        session: Session,
        sender: Sender,
        sender_args: Sequence[Argument],
        recipient: EmailAddress,
    ) -> RecipientResult:
        if self.is_local(recipient) or self.may_relay(session):
            return Continue()
        log.info(
            "relay denied for {recipient} from {remote}",
            recipient=str(recipient),
            remote=session.remote_host,
        )
        return Reject(Reply(554, f"5.7.1 <{recipient}>: Relay access denied"))

    def process_envelope(self, log: Logger, session: Session, envelope: Envelope) -> EnvelopeResult:
        name, flagged = self.quarantine_header
        if (envelope.header(name) or "").strip().upper() == flagged.upper():
            return Quarantine(
                [EnvelopeWithNextHop(envelope)],
                Reply(250, f"2.0.0 Ok: queued as {envelope.id}"),
                reason=f"{name}: {flagged}",
            )
        local = [r for r in envelope.recipients if self.is_local(r)]
        remote = [r for r in envelope.recipients if not self.is_local(r)]
        routes = []
        if local:
            routes.append(
                EnvelopeWithNextHop(
                    dataclasses.replace(envelope, recipients=local),
                    next_hop_choices=[self.mail_store],
                    retry_intervals=self.defaults.retry_intervals,
                )
            )
        if remote:
            # The relay's default route: its smarthost, or each domain's MX.
            routes.append(
                EnvelopeWithNextHop(
                    dataclasses.replace(envelope, recipients=remote),
                    next_hop_choices=self.defaults.next_hop_choices,
                    retry_intervals=self.defaults.retry_intervals,
                )
            )
        return Send(routes)
