"""
The AMP commands of relay's control endpoint (served by
L{relay.control.server.ControlProtocol}, called by C{relayctl}).

Ids are spool entry ids.  A command naming an id the spool does not hold
fails with L{UnknownEntry} (AMP error code C{UNKNOWN_ENTRY}); a command
with arguments that make no sense fails with L{BadArgument}
(C{BAD_ARGUMENT}).

Listings stream.  L{Status} and L{ShowMessage} answer only at the end
(with totals); before that the server calls the client, once per page
(L{EntriesPage}, L{MessageChunk}), and reads the next page only when the
client has answered the last: that answer is the flow control, and
neither side ever holds more than a page or two.  Each value stays under
AMP's 64 KiB limit: text that could be longer (a page, a summary, an
entry with many recipients) is a L{Chunked} argument, spread over as
many keys as it needs.

Filters (L{FILTER_ARGUMENTS}, on L{Status}, L{Count}, L{Summary} and the
actions) are combined with AND and evaluated by the relay: see
L{relay.control.filters}.  An action (L{Freeze}, L{SendFrozen},
L{SendNow}, L{Remove}) takes ids, C{all}, or at least one filter, and
answers how many entries matched and how many it changed.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols.amp import (
    Argument,
    Boolean,
    Command,
    Float,
    Integer,
    ListOf,
    Unicode,
)

#: the most bytes one L{Chunked} key holds (AMP's limit is 65535)
CHUNK = 60000


class Chunked(Argument):
    """
    A value of any length, as UTF-8 text (or bytes, with C{binary}) split
    over keys C{name}, C{name.1}, C{name.2}, ... of at most L{CHUNK}
    bytes each, so that no AMP value passes its 64 KiB limit.
    """

    def __init__(self, optional: bool = False, binary: bool = False) -> None:
        Argument.__init__(self, optional)
        self.binary = binary

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = objects.get(name.decode("ascii"))
        if value is None:
            if not self.optional:
                raise KeyError(name)
            return
        data = bytes(value) if self.binary else value.encode("utf-8")
        strings[name] = data[:CHUNK]
        for i, start in enumerate(range(CHUNK, len(data), CHUNK), start=1):
            strings[name + b".%d" % i] = data[start : start + CHUNK]

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        key = name.decode("ascii")
        first = strings.get(name)
        if first is None:
            if not self.optional:
                raise KeyError(name)
            objects[key] = None
            return
        parts = [first]
        i = 1
        while (name + b".%d" % i) in strings:
            parts.append(strings[name + b".%d" % i])
            i += 1
        data = b"".join(parts)
        objects[key] = data if self.binary else data.decode("utf-8")


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

#: The filters (see L{relay.control.filters.EntryFilter}): C{sender} and
#: C{recipient} are C{ADDR} or C{@DOMAIN} (C{<>}: the null sender);
#: C{via} is C{HOST[:PORT]} or C{default}; C{younger} and C{older} are
#: seconds; C{queue} narrows the queues the command looks at.
FILTER_ARGUMENTS: list[tuple[bytes, Argument]] = [
    (b"sender", Unicode(optional=True)),
    (b"recipient", Unicode(optional=True)),
    (b"via", Unicode(optional=True)),
    (b"younger", Float(optional=True)),
    (b"older", Float(optional=True)),
    (b"queue", Unicode(optional=True)),
]

#: What an action answers: the ids it was given that it changed, how
#: many entries matched, how many it changed, and how many it left alone
#: because they are settled (no pending recipient; C{retry_failed} puts
#: their failed recipients back).
ACTION_RESPONSE: list[tuple[bytes, Argument]] = [
    (b"done", ListOf(Unicode())),
    (b"matched", Integer()),
    (b"changed", Integer()),
    (b"settled", Integer()),
]


class Status(Command):
    """
    List the entries of one queue (C{active} unless given) that the
    filters admit.  The entries come as L{EntriesPage} calls to the client,
    tagged with C{stream}, each sent once the client answered the last;
    the answer says how many entries were listed and how many files could
    not be read.  With C{ids_only} the pages carry ids only (and the
    entries are read only when a filter needs them).
    """

    arguments = [
        (b"stream", Integer(optional=True)),
        (b"ids_only", Boolean(optional=True)),
        *FILTER_ARGUMENTS,
    ]
    response = [(b"entries", Integer()), (b"unreadable", Integer())]
    errors = ERRORS


class EntriesPage(Command):
    """
    Server to client: one page of a L{Status} listing, in creation order.
    C{entries} is JSON Lines (one L{relay.spool.codec.entry_to_json}
    object per line, C{"queue"} included), or C{ids} one id per line;
    C{unreadable} has one C{path: error} line per metadata file that
    could not be read.  The server waits for the (empty) answer before it
    sends the next page.
    """

    arguments = [
        (b"stream", Integer()),
        (b"entries", Chunked(optional=True)),
        (b"ids", Chunked(optional=True)),
        (b"unreadable", Chunked(optional=True)),
    ]
    response = []  # type: ignore[var-annotated]


class Count(Command):
    """
    How many entries each queue holds (or C{queue} only), counting those
    the filters admit.  Without a filter nothing is read but the names of
    the files.
    """

    arguments = list(FILTER_ARGUMENTS)
    response = [
        (b"active", Integer(optional=True)),
        (b"frozen", Integer(optional=True)),
        (b"removed", Integer(optional=True)),
        (b"quarantine", Integer(optional=True)),
    ]
    errors = ERRORS


class Summary(Command):
    """
    Entries per recipient domain (C{by} C{domain}, the default) or per
    next hop (C{next-hop}) in age buckets (see
    L{relay.control.summary}), of the active queue unless C{queue} is
    given.  C{rows} is a JSON list of C{[name, [counts...]]}, the C{top}
    rows with the most entries (all when 0); C{total} the JSON list of
    the counts of all entries; C{groups} how many rows there were in all.
    """

    arguments = [
        (b"by", Unicode(optional=True)),
        (b"top", Integer(optional=True)),
        *FILTER_ARGUMENTS,
    ]
    response = [
        (b"rows", Chunked()),
        (b"total", Unicode()),
        (b"entries", Integer()),
        (b"groups", Integer()),
        (b"unreadable", Integer()),
        (b"waiting", Chunked(optional=True)),
    ]
    errors = ERRORS


class Show(Command):
    """
    One entry, in any queue: C{entry} its JSON (with C{"queue"}),
    C{headers} its message's header section as stored; C{smarthost} where
    the relay's default route goes now (absent: the MX of each domain).
    """

    arguments = [(b"id", Unicode())]
    response = [
        (b"entry", Chunked()),
        (b"headers", Chunked(binary=True)),
        (b"smarthost", Unicode(optional=True)),
        (b"waiting", Unicode(optional=True)),
    ]
    errors = ERRORS


class ShowMessage(Command):
    """
    An entry's whole message, as L{MessageChunk} calls to the client (each
    sent once the client answered the last); the answer has its size.
    """

    arguments = [(b"id", Unicode()), (b"stream", Integer(optional=True))]
    response = [(b"size", Integer())]
    errors = ERRORS


class MessageChunk(Command):
    """
    Server to client: the next bytes of a L{ShowMessage}.
    """

    arguments = [(b"stream", Integer()), (b"data", Chunked(binary=True))]
    response = []  # type: ignore[var-annotated]


class Freeze(Command):
    """
    Move active entries to the frozen queue (kept, not retried): those
    named by C{ids}, every active one (C{all}), or those the filters
    admit.
    """

    arguments = [
        (b"ids", ListOf(Unicode())),
        (b"all", Boolean(optional=True)),
        *FILTER_ARGUMENTS,
    ]
    response = ACTION_RESPONSE
    errors = ERRORS


class SendFrozen(Command):
    """
    Make entries due now: every active and frozen entry (C{all}), only the
    frozen ones (C{frozen}), those named by C{ids}, or those the filters
    admit.  Frozen entries move back to the active queue;
    C{retry_intervals}, when given, replace their schedule; C{next_hop}
    reroutes them (their only next hop from now on).  Settled entries (no
    pending recipient) are left alone unless C{retry_failed}, which puts
    their failed recipients back to pending.
    """

    arguments = [
        (b"ids", ListOf(Unicode())),
        (b"all", Boolean()),
        (b"frozen", Boolean()),
        (b"retry_intervals", ListOf(Float(), optional=True)),
        (b"next_hop", Unicode(optional=True)),
        (b"retry_failed", Boolean(optional=True)),
        *FILTER_ARGUMENTS,
    ]
    response = ACTION_RESPONSE
    errors = ERRORS


class SendNow(Command):
    """
    Attempt delivery of entries now (frozen ones are unfrozen): those
    named by C{ids}, every active and frozen one (C{all}), or those the
    filters admit; settled ones only with C{retry_failed}.
    """

    arguments = [
        (b"ids", ListOf(Unicode())),
        (b"all", Boolean(optional=True)),
        (b"retry_failed", Boolean(optional=True)),
        *FILTER_ARGUMENTS,
    ]
    response = ACTION_RESPONSE
    errors = ERRORS


class Remove(Command):
    """
    Move entries to the removed queue (kept for L{Recover} until
    C{--removed-lifetime} runs out): those named by C{ids}, every active
    and frozen one (C{all}), or those the filters admit (C{queue}
    C{quarantine} for quarantined ones).
    """

    arguments = [
        (b"ids", ListOf(Unicode())),
        (b"all", Boolean(optional=True)),
        *FILTER_ARGUMENTS,
    ]
    response = ACTION_RESPONSE
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


class Suspend(Command):
    """
    Suspend a destination (a recipient domain, or a provider of the
    shaping file) for C{seconds} (absent: until resumed).  Answers when it
    ends and whether C{name} is a provider.
    """

    arguments = [
        (b"destination", Unicode()),
        (b"seconds", Float(optional=True)),
        (b"reason", Unicode(optional=True)),
    ]
    response = [(b"until", Float(optional=True)), (b"provider", Boolean())]
    errors = ERRORS


class Resume(Command):
    """
    End the suspension of a destination; C{resumed} is false when it was
    not suspended.
    """

    arguments = [(b"destination", Unicode())]
    response = [(b"resumed", Boolean()), (b"waiting", Integer())]
    errors = ERRORS


class Suspended(Command):
    """
    The suspensions in force: C{suspensions} is a JSON list of objects
    (C{name}, C{since}, C{until}, C{reason}, C{automatic}, C{waiting}:
    the entries known to wait for it).
    """

    arguments = []  # type: ignore[var-annotated]
    response = [(b"suspensions", Chunked())]
    errors = ERRORS


class DkimRecord(Command):
    """
    The DNS record of the DKIM key the relay signs with for C{domain} and
    C{selector} (its C{--dkim-keys} file as last loaded): C{zone} (a zone
    file line) and C{value} (the record's text alone).
    """

    arguments = [(b"domain", Unicode()), (b"selector", Unicode())]
    response = [(b"zone", Unicode()), (b"value", Unicode())]
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
    "ACTION_RESPONSE",
    "BadArgument",
    "Chunked",
    "Count",
    "ERRORS",
    "EntriesPage",
    "Event",
    "FILTER_ARGUMENTS",
    "Freeze",
    "MessageChunk",
    "Recover",
    "Remove",
    "SendFrozen",
    "SendNow",
    "SetMaxSendJobs",
    "Show",
    "ShowMessage",
    "Status",
    "Subscribe",
    "Summary",
    "Suspend",
    "Suspended",
    "Resume",
    "UnknownEntry",
]
