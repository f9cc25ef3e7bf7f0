"""
relay: a durable SMTP mail relay on Twisted.

The plugin API: subclass L{Simple} and return the result types below.
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
    Consume,
    Continue,
    Deny,
    Disconnect,
    Quarantine,
    Reject,
    Send,
)
from relay.session import Session, TLSInfo
from relay.simple import Simple, as_callbacks

__all__ = [
    "Accept",
    "Allow",
    "Argument",
    "Consume",
    "Continue",
    "Deny",
    "Disconnect",
    "EmailAddress",
    "Envelope",
    "EnvelopeWithNextHop",
    "IServerCallbacks",
    "Message",
    "NULL_SENDER",
    "Quarantine",
    "Reject",
    "Reply",
    "Send",
    "Sender",
    "Session",
    "Simple",
    "TLSInfo",
    "as_callbacks",
]
