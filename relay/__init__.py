"""
relay: a durable SMTP mail relay on Twisted.

The plugin API: subclass L{Simple} and return the result types below
(C{ConnectResult} and the other unions name what each callback may
return).  L{Defaults} is what the relay passes to a plugin's
C{configure}.  The test kit is L{relay.testing}.
"""

#: The version of relay (the package metadata reads it from here).
__version__ = "0.2.0"

from relay.address import NULL_SENDER, EmailAddress, Sender
from relay.argument import Argument
from relay.envelope import Envelope, EnvelopeWithNextHop
from relay.interfaces import IServerCallbacks
from relay.message import Message
from relay.reply import Reply
from relay.results import (
    Accept,
    Allow,
    AuthResult,
    ConnectResult,
    Consume,
    Continue,
    Deny,
    Disconnect,
    EnvelopeResult,
    HeloResult,
    Quarantine,
    RecipientResult,
    Reject,
    Send,
    SenderResult,
)
from relay.session import Session, TLSInfo
from relay.simple import Defaults, Simple, as_callbacks

__all__ = [
    "Accept",
    "Allow",
    "Argument",
    "AuthResult",
    "ConnectResult",
    "Consume",
    "Continue",
    "Defaults",
    "Deny",
    "Disconnect",
    "EmailAddress",
    "Envelope",
    "EnvelopeResult",
    "EnvelopeWithNextHop",
    "HeloResult",
    "IServerCallbacks",
    "Message",
    "NULL_SENDER",
    "Quarantine",
    "RecipientResult",
    "Reject",
    "Reply",
    "Send",
    "Sender",
    "SenderResult",
    "Session",
    "Simple",
    "TLSInfo",
    "as_callbacks",
]
