"""
relay: a durable SMTP mail relay on Twisted.

The plugin API: subclass L{Simple} and return the result types below
(C{ConnectResult} and the other unions name what each callback may
return; C{Answer[ConnectResult]} is that, a L{Deferred} of it, or a
coroutine of it).  L{Defaults} is what the relay passes to a plugin's
C{configure}.  The test kit is L{relay.testing}.
"""

#: The version of relay (the package metadata reads it from here).
__version__ = "0.2.0"

from relay.interfaces import Answer, IServerCallbacks
from relay.model.address import NULL_SENDER, EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import Message
from relay.model.reply import Reply
from relay.model.results import (
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
from relay.model.session import Session, TLSInfo
from relay.simple import Defaults, Simple, as_callbacks

__all__ = [
    "Accept",
    "Allow",
    "Answer",
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
