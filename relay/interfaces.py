"""
The interfaces of relay: what a plugin provides (L{IServerCallbacks}) and
what the server and the delivery side rely on (L{ISpool}, L{IMessageWriter}),
who hears of the spool's commits (L{ISpoolObserver}), and what SIGHUP
reloads (L{IReloadable}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Coroutine, Sequence, TypeVar, Union

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.logger import Logger
    from twisted.protocols.amp import CommandLocator

    from relay.model.address import EmailAddress, Sender
    from relay.model.argument import Argument
    from relay.model.entry import SpoolEntry
    from relay.model.envelope import Envelope, EnvelopeWithNextHop
    from relay.model.results import (
        AuthResult,
        ConnectResult,
        EnvelopeResult,
        HeloResult,
        RecipientResult,
        SenderResult,
    )
    from relay.model.session import Session
    from relay.simple import Defaults

T = TypeVar("T")

#: What a callback may return: its result, a L{Deferred} firing with it, or
#: a coroutine returning it (an C{async def} callback).  The server accepts
#: all three in one place (L{relay.smtp.callbacks.call_callback}).
Answer = Union[T, Deferred[T], Coroutine[Any, Any, T]]


class IServerCallbacks(Interface):
    """
    The policy of a relay: every decision about mail (async_smtp's
    C{Server_callbacks.S}).  Each callback may return its result, a
    L{Deferred} firing with it, or a coroutine (an L{Answer}).  A callback
    that raises or fails makes the server answer with a transient error
    (421 and close at connect and HELO, 451 elsewhere) and log the failure.

    C{log} is a L{twisted.logger.Logger} whose events carry the session id
    (and the envelope id, once there is one).

    L{relay.simple.Simple} provides all of it; a plugin subclasses it and
    overrides what needs a decision.
    """

    def configure(defaults: Defaults) -> None:
        """
        Take the relay's settings (host name, default route, AUTH checker,
        clock), once, after the plugin is made and before any session.

        The relay calls it only when the plugin has it, so a provider
        written without L{relay.simple.Simple} that needs no settings runs
        without one (it is declared here so that C{verifyObject} checks
        the providers that have it: L{Simple} and those made from it).
        """

    def session_connect(log: Logger, session: Session) -> Answer[ConnectResult]:
        """
        A client connected.

        @return: L{relay.Accept} (greeting) or L{relay.Disconnect}.
        """

    def session_helo(log: Logger, session: Session, helo: str) -> Answer[HeloResult]:
        """
        The client said HELO or EHLO C{helo}.

        @return: L{relay.Continue} (optionally advertising AUTH),
            L{relay.Deny} (session stays open) or L{relay.Disconnect}.
        """

    def process_sender(
        log: Logger, session: Session, sender: Sender, sender_args: Sequence[Argument]
    ) -> Answer[SenderResult]:
        """
        MAIL FROM.

        @return: L{relay.Continue} or L{relay.Reject} (aborts this message).
        """

    def process_recipient(
        log: Logger,
        session: Session,
        sender: Sender,
        sender_args: Sequence[Argument],
        recipient: EmailAddress,
    ) -> Answer[RecipientResult]:
        """
        RCPT TO.

        @return: L{relay.Continue} or L{relay.Reject} (this recipient is
            left out; the envelope goes on).
        """

    def process_envelope(log: Logger, session: Session, envelope: Envelope) -> Answer[EnvelopeResult]:
        """
        The message data was received.

        @return: L{relay.Consume}, L{relay.Reject}, L{relay.Send} or
            L{relay.Quarantine}.
        """

    def check_authentication_credentials(
        log: Logger, username: str, password: str
    ) -> Answer[AuthResult]:
        """
        AUTH: are these credentials valid?

        @return: L{relay.Allow} or L{relay.Deny}.
        """

    def rpcs() -> Sequence[CommandLocator]:
        """
        Called once, as the relay is made; it returns a plain value, not
        an L{Answer}.

        @return: the AMP responders (L{twisted.protocols.amp.CommandLocator}
            instances) served on the control endpoint beside relay's own.
        """


class IMessageWriter(Interface):
    """
    Receives the bytes of one message into the spool, in chunks: small
    messages stay in memory, larger ones spill to a temporary file so that
    memory stays flat.
    """

    size = Attribute("Bytes written so far.")

    def write(data):  # type: ignore[no-untyped-def]
        """
        Append C{data}.

        @return: C{True} if the caller should stop reading (pause its
            producer) until L{drained} fires.
        """

    def drained():  # type: ignore[no-untyped-def]
        """
        @return: a L{Deferred} that fires when buffered bytes are on their
            way to disk and writing may go on.
        """

    def finish(headers):  # type: ignore[no-untyped-def]
        """
        All bytes are written.

        @param headers: the parsed header fields.
        @return: a L{Deferred} firing with the L{relay.model.message.Message}.
        """

    def abort():  # type: ignore[no-untyped-def]
        """
        Throw the message away (the transaction failed or was reset).
        """


class ISpool(Interface):
    """
    The durable store of envelopes.  Every method that changes the spool
    returns a L{Deferred} that fires only once the change is on disk
    (fsynced, file and directory); none of them blocks the reactor.

    Queues: C{active} (waiting for delivery), C{frozen} (kept, not retried
    until an operator says so), C{removed} (taken out by an operator, kept
    for recovery), C{quarantine} (kept for inspection, with a reason).
    """

    def receive(message_id):  # type: ignore[no-untyped-def]
        """
        @return: an L{IMessageWriter} for the data of a new message.
        """

    def discard(message):  # type: ignore[no-untyped-def]
        """
        Forget a received L{Message} that was not spooled (consumed,
        rejected, or failed).

        @return: a L{Deferred} that fires when its temporary file is gone.
        """

    def enqueue(envelopes, received_from=None):  # type: ignore[no-untyped-def]
        """
        Durably add L{EnvelopeWithNextHop}s to the active queue, due now.
        A message shared by several envelopes is stored once.  All or
        nothing: on failure no part of any of them remains.

        @return: a L{Deferred} firing with the new L{SpoolEntry}s.
        """

    def quarantine(envelopes, reason, received_from=None):  # type: ignore[no-untyped-def]
        """
        Durably store L{EnvelopeWithNextHop}s for inspection, with C{reason}.

        @return: a L{Deferred} firing with the new L{SpoolEntry}s.
        """

    def entries(queue):  # type: ignore[no-untyped-def]
        """
        Every entry of C{queue}, read whole: for small queues and tests;
        listings stream instead.

        @return: a L{Deferred} firing with the L{SpoolEntry}s of C{queue}.
        """

    def count(queue):  # type: ignore[no-untyped-def]
        """
        How many entries C{queue} holds, and the creation time of its
        oldest, without reading them (a million entries cost a directory
        listing).

        @return: a L{Deferred} firing with a
            L{relay.spool.reader.QueueCount}.
        """

    def due(before, limit):  # type: ignore[no-untyped-def]
        """
        The active entries due before C{before}, soonest first, at most
        C{limit}, without reading them: what the scheduler takes into
        memory (the rest wait on disk).

        @return: a L{Deferred} firing with C{(due time, entry id)} pairs.
        """

    def stream(queue, select=None, parse=True, page_size=200):  # type: ignore[no-untyped-def]
        """
        The entries of C{queue}, a page at a time, in the order the queue
        gives them (each page in creation order): a listing of any length
        with one page in memory.

        @param select: an L{relay.spool.reader.EntrySelector} saying which
            entries are kept (all when C{None}); asked off the reactor
            thread.
        @param parse: whether the pages carry the entries, or only their
            ids (then an entry is read only when C{select} needs it).
        @param page_size: entries per page, at most.
        @return: an L{IEntryStream}.
        @raise ValueError: if there is no such queue.
        """

    def message_chunk(entry_id, offset, size):  # type: ignore[no-untyped-def]
        """
        Part of an entry's message, for reading one of any size in chunks.

        @return: a L{Deferred} firing with up to C{size} bytes from
            C{offset} (C{b""} past the end), or failing with L{KeyError}
            when there is no such entry.
        """

    def unchanged_since(queue, before, limit):  # type: ignore[no-untyped-def]
        """
        The entries of C{queue} not changed since C{before} (a frozen or
        removed entry is changed when it comes into its queue), oldest
        first, at most C{limit}, without reading them: the candidates for
        expiry.

        @return: a L{Deferred} firing with C{(time, entry id)} pairs.
        """

    def get(entry_id):  # type: ignore[no-untyped-def]
        """
        @return: a L{Deferred} firing with the L{SpoolEntry}, or failing
            with L{KeyError} when there is none with that id.
        """

    def message(entry_id):  # type: ignore[no-untyped-def]
        """
        @return: a L{Deferred} firing with the L{Message} of an entry.
        """

    def update(entry):  # type: ignore[no-untyped-def]
        """
        Durably replace an entry's metadata (in the queue it is in).

        @return: a L{Deferred} firing with the entry.
        """

    def move(entry_id, queue):  # type: ignore[no-untyped-def]
        """
        Durably move an entry to another queue.

        @return: a L{Deferred} firing with the moved L{SpoolEntry}.
        """

    def finish(entry_id):  # type: ignore[no-untyped-def]
        """
        The entry is settled (delivered or bounced): it leaves the spool, and
        its message with it once no other entry shares it.

        @return: a L{Deferred} that fires when it is gone.
        """


class IEntryStream(Interface):
    """
    A listing of one queue in pages (L{ISpool.stream}): the reader asks
    for the next page when it has dealt with the last, so that neither
    side holds more than a page.
    """

    def next_page():  # type: ignore[no-untyped-def]
        """
        @return: a L{Deferred} firing with the next
            L{relay.spool.reader.EntryPage}; the last has C{done} set, and
            after it every page is empty and last.
        """

    def close():  # type: ignore[no-untyped-def]
        """
        Stop reading (a reader that stops early must call it), once a
        page being read is done.

        @return: a L{Deferred} that fires when the queue is let go of.
        """


class ISpoolObserver(Interface):
    """
    Told what a spool committed, once it is durable (by
    L{relay.spool.observed.ObservedSpool}): the delivery scheduler, so
    that new mail goes out at once; in a receiver process, the master.

    Called in the reactor thread, right after the commit: an observer must
    not block.  What it raises is logged, and the commit stands (the
    client has its 250 either way).
    """

    def spooled(
        entries: Sequence[SpoolEntry], envelopes: Sequence[EnvelopeWithNextHop]
    ) -> None:
        """
        New entries are in the active queue, due now.

        @param entries: the new L{SpoolEntry}s.
        @param envelopes: the L{EnvelopeWithNextHop}s they were made of,
            in the same order (with their messages, which may be in
            memory).
        """

    def quarantined(entries: Sequence[SpoolEntry], reason: str) -> None:
        """
        New entries are in the quarantine, for C{reason}.
        """


class IReloadable(Interface):
    """
    Something read from files that SIGHUP reloads (L{relay.app.reload.ReloadService}):
    the TLS certificate, and later a DKIM key file or a traffic-shaping file.
    """

    what = Attribute("What it is, for the log: e.g. C{'TLS certificate'}.")

    def reload(run_in_thread):  # type: ignore[no-untyped-def]
        """
        Read the files again, in C{run_in_thread} (C{deferToThreadPool}'s
        signature without the reactor and pool: the reactor thread must not
        wait for the disk), and use what they hold from now on.

        @return: a L{Deferred} firing with one line for the log saying what
            is now in use, or failing (best with a L{relay.app.reload.ReloadError}
            naming the file and the reason) while what was in use stays.
        """
