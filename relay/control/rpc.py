"""
The AMP commands of relay's control endpoint (served by
L{relay.control.server.ControlProtocol}, called by C{relayctl}).

Ids are spool entry ids.  A command naming an id the spool does not hold
fails with L{UnknownEntry} (AMP error code C{UNKNOWN_ENTRY}); a command
with arguments that make no sense fails with L{BadArgument}
(C{BAD_ARGUMENT}).
"""

from __future__ import annotations

from twisted.protocols.amp import (
    Boolean,
    Command,
    Float,
    Integer,
    ListOf,
    Unicode,
)


class UnknownEntry(Exception):
    """
    One or more ids name no entry in the spool (or not in the queue the
    command needs); the message names them.
    """


class BadArgument(Exception):
    """
    The arguments of a command make no sense (an unknown queue, a negative
    count, ...).
    """


ERRORS: dict[type[Exception], bytes] = {
    UnknownEntry: b"UNKNOWN_ENTRY",
    BadArgument: b"BAD_ARGUMENT",
}


class Status(Command):
    """
    The entries of one queue.

    C{entries} is a JSON list of L{relay.spool.codec.entry_to_json} dicts, each
    with C{"queue"} set.
    """

    arguments = [(b"queue", Unicode(optional=True))]
    response = [(b"entries", Unicode())]
    errors = ERRORS


class Count(Command):
    """
    How many entries each queue holds.
    """

    arguments = []  # type: ignore[var-annotated]
    response = [
        (b"active", Integer()),
        (b"frozen", Integer()),
        (b"removed", Integer()),
        (b"quarantine", Integer()),
    ]
    errors = ERRORS


class Freeze(Command):
    """
    Move active entries to the frozen queue: kept, not retried.
    """

    arguments = [(b"ids", ListOf(Unicode()))]
    response = [(b"done", ListOf(Unicode()))]
    errors = ERRORS


class SendFrozen(Command):
    """
    Make entries due now: every active and frozen entry (C{all}), only the
    frozen ones (C{frozen}), or those named by C{ids}.  Frozen entries move
    back to the active queue; C{retry_intervals}, when given, replace theirs.
    """

    arguments = [
        (b"ids", ListOf(Unicode())),
        (b"all", Boolean()),
        (b"frozen", Boolean()),
        (b"retry_intervals", ListOf(Float(), optional=True)),
    ]
    response = [(b"done", ListOf(Unicode()))]
    errors = ERRORS


class SendNow(Command):
    """
    Attempt delivery of the given active entries now.
    """

    arguments = [(b"ids", ListOf(Unicode()))]
    response = [(b"done", ListOf(Unicode()))]
    errors = ERRORS


class Remove(Command):
    """
    Move entries to the removed queue (kept for L{Recover}, never deleted).
    """

    arguments = [(b"ids", ListOf(Unicode()))]
    response = [(b"done", ListOf(Unicode()))]
    errors = ERRORS


class Recover(Command):
    """
    Bring entries from the C{removed} or C{quarantine} queue (C{source})
    back into the spool, frozen.
    """

    arguments = [
        (b"ids", ListOf(Unicode())),
        (b"source", Unicode()),
    ]
    response = [(b"done", ListOf(Unicode()))]
    errors = ERRORS


class SetMaxSendJobs(Command):
    """
    Change how many deliveries may run at once; answers the previous limit.
    """

    arguments = [(b"n", Integer())]
    response = [(b"previous", Integer())]
    errors = ERRORS


class Subscribe(Command):
    """
    Follow the live event stream: the server then sends an L{Event} for
    every event, and a C{heartbeat} one every 30 seconds, until the
    connection closes.
    """

    arguments = []  # type: ignore[var-annotated]
    response = []  # type: ignore[var-annotated]
    errors = ERRORS


class Event(Command):
    """
    Server to client: one event of the stream; C{fields} is a JSON object.
    """

    arguments = [
        (b"kind", Unicode()),
        (b"entry_id", Unicode(optional=True)),
        (b"at", Float()),
        (b"seq", Integer()),
        (b"fields", Unicode()),
    ]
    response = []  # type: ignore[var-annotated]
    requiresAnswer = False


__all__ = [
    "BadArgument",
    "Count",
    "ERRORS",
    "Event",
    "Subscribe",
    "Freeze",
    "Recover",
    "Remove",
    "SendFrozen",
    "SendNow",
    "SetMaxSendJobs",
    "Status",
    "UnknownEntry",
]
