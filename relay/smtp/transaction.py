"""
The mail transaction of an SMTP session (RFC 5321 section 3.3): MAIL FROM,
RCPT TO and the message, with DATA or in BDAT chunks (RFC 3030), each
asked of the plugin (C{process_sender}, C{process_recipient}), up to the
C{Received} header that begins the message; L{relay.smtp.incoming} takes
the message from there.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Coroutine

from relay.model.address import AddressError, EmailAddress, Sender
from relay.model.argument import (
    Argument,
    ArgumentError,
    find,
    parse_mail_parameters,
    parse_rcpt_parameters,
)
from relay.model.entry import new_id
from relay.model.reply import Reply
from relay.model.results import Continue, Reject
from relay.smtp.bdat import SYNTAX_ERROR_TEXT, ChunkedBody, ChunkReader, discard, parse_bdat
from relay.smtp.data import DataReader
from relay.smtp.incoming import IncomingMessage

if TYPE_CHECKING:
    from relay.smtp.protocol import SMTPServerProtocol

_MAIL = re.compile(r"^FROM: ?(<[^>]*>)(?: +(.*))?$", re.I | re.S)
_RCPT = re.compile(r"^TO: ?(<[^>]*>)(?: +(.*))?$", re.I | re.S)

_SENDER_OK = Reply.ok("2.1.0 Ok")
_RECIPIENT_OK = Reply.ok("2.1.5 Ok")
_NEED_MAIL = Reply.bad_sequence("5.5.1 Error: need MAIL command")
_NO_RECIPIENTS = Reply.transaction_failed("5.5.1 No valid recipients")

#: A BDAT transaction may announce this many times the message size limit
#: in all (stored, and read to be thrown away after a refusal) before the
#: session is closed instead of reading on: staying in step with a client
#: means reading every byte it announced, and beyond this it is not worth
#: it (Postfix's bound too).
DISCARD_FACTOR = 1.5


class Transaction:
    """
    The state of one mail transaction (MAIL FROM to end of DATA).

    @ivar id: the envelope id, chosen at MAIL FROM.
    @ivar recipient_args: each accepted recipient (as text) with its RCPT
        parameters.
    @ivar rejected: the recipients the plugin refused.
    """

    def __init__(self, envelope_id: str, sender: Sender, sender_args: tuple[Argument, ...]) -> None:
        self.id = envelope_id
        self.sender = sender
        self.sender_args = sender_args
        self.recipients: list[EmailAddress] = []
        self.recipient_args: list[tuple[str, tuple[Argument, ...]]] = []
        self.rejected: list[EmailAddress] = []


class MailTransaction:
    """
    MAIL, RCPT, DATA and BDAT in one session, and the transaction they
    build.

    @ivar transaction: the transaction in progress, if any.
    """

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol
        self.transaction: Transaction | None = None
        # The message being received (or just ended), with DATA or BDAT.
        self._incoming: IncomingMessage | None = None
        # DATA's decoder, while the message comes with DATA.
        self._data: DataReader | None = None
        # Once the transaction's first BDAT came: its chunks' common state.
        self._chunks: ChunkedBody | None = None

    def reset(self) -> None:
        """
        Forget the transaction (RSET, HELO, STARTTLS, the end of the
        message), and the message being received with it.
        """
        self.abort_message()
        self.transaction = None
        self._incoming = None
        self._data = None
        self._chunks = None
        self._protocol.log_session()

    def abort_message(self) -> None:
        """
        Throw away the message being received, if any (its data is ignored
        from now on), and stop waiting on its writer.
        """
        if self._incoming is not None:
            self._incoming.abort()
        self._protocol.writer_done()

    async def smtp_MAIL(self, arg: str) -> None:
        protocol = self._protocol
        if protocol.session.helo is None:
            protocol.reply(Reply.bad_sequence("5.5.1 Error: send HELO/EHLO first"))
            return
        if self.transaction is not None:
            protocol.reply(Reply.bad_sequence("5.5.1 Error: nested MAIL command"))
            return
        m = _MAIL.match(arg)
        if m is None:
            protocol.reply(Reply.parameter_error("5.5.4 Syntax: MAIL FROM:<address> [parameters]"))
            return
        path, params = m.group(1), m.group(2) or ""
        try:
            args = parse_mail_parameters(params)
        except ArgumentError as e:
            protocol.reply(e.reply)
            return
        smtputf8 = find(args, "SMTPUTF8") is not None
        try:
            sender = Sender.parse_path(path, smtputf8=smtputf8)
        except AddressError as e:
            protocol.reply(Reply(553, f"5.1.7 Bad sender address syntax: {e}"))
            return
        size = find(args, "SIZE")
        if (
            size is not None
            and size.value is not None
            and int(size.value) > protocol.settings.max_message_size
        ):
            protocol.reply(Reply.exceeded_storage())
            return
        envelope_id = new_id()
        protocol.log_envelope(envelope_id)
        try:
            result = await protocol.callback("process_sender", protocol.session, sender, args)
        except Exception:
            protocol.log.failure("process_sender failed")
            protocol.reply(Reply.local_error())
            return
        if isinstance(result, Continue):
            self.transaction = Transaction(envelope_id, sender, args)
            protocol.reply(_SENDER_OK)
        elif isinstance(result, Reject):
            protocol.reply(result.reply)
        else:
            protocol.log.error("process_sender returned {result!r}", result=result)
            protocol.reply(Reply.local_error())

    async def smtp_RCPT(self, arg: str) -> None:
        protocol = self._protocol
        t = self.transaction
        if t is None:
            protocol.reply(_NEED_MAIL)
            return
        if self._chunks is not None:
            # RFC 3030 section 2: the chunks come after every RCPT.
            protocol.reply(Reply.bad_sequence("5.5.1 Error: RCPT after BDAT"))
            return
        m = _RCPT.match(arg)
        if m is None:
            protocol.reply(Reply.parameter_error("5.5.4 Syntax: RCPT TO:<address> [parameters]"))
            return
        path, params = m.group(1), m.group(2) or ""
        smtputf8 = find(t.sender_args, "SMTPUTF8") is not None
        try:
            args = parse_rcpt_parameters(params, smtputf8=smtputf8)
        except ArgumentError as e:
            protocol.reply(e.reply)
            return
        try:
            recipient = EmailAddress.parse_path(path, smtputf8=smtputf8)
        except AddressError as e:
            protocol.reply(Reply(553, f"5.1.3 Bad recipient address syntax: {e}"))
            return
        if len(t.recipients) >= protocol.settings.max_recipients:
            # RFC 5321 section 4.5.3.1.10: too many recipients is a 452.
            protocol.reply(Reply.insufficient_storage("4.5.3 Too many recipients"))
            return
        try:
            result = await protocol.callback(
                "process_recipient", protocol.session, t.sender, t.sender_args, recipient
            )
        except Exception:
            protocol.log.failure("process_recipient failed")
            protocol.reply(Reply.local_error())
            return
        if self.transaction is not t:
            return
        if isinstance(result, Continue):
            t.recipients.append(recipient)
            t.recipient_args.append((str(recipient), args))
            protocol.reply(_RECIPIENT_OK)
        elif isinstance(result, Reject):
            t.rejected.append(recipient)
            protocol.reply(result.reply)
        else:
            protocol.log.error("process_recipient returned {result!r}", result=result)
            protocol.reply(Reply.local_error())

    def _refuse_data(self, reply: Reply) -> None:
        protocol = self._protocol
        protocol.reply(reply)
        if protocol.has_pending_input():
            # Sent without waiting for the 354: it is the message, and must
            # not run as commands now that DATA failed.
            protocol.synchronization_error("after a refused DATA")

    def smtp_DATA(self, arg: str) -> None:
        protocol = self._protocol
        t = self.transaction
        if arg:
            self._refuse_data(Reply.parameter_error("5.5.4 Syntax: DATA"))
            return
        if t is None:
            self._refuse_data(_NEED_MAIL)
            return
        if self._chunks is not None:
            # RFC 3030 section 2: DATA and BDAT do not mix in a transaction;
            # the client must RSET (the chunks so far are kept until then).
            self._refuse_data(Reply.bad_sequence("5.5.1 Error: DATA after BDAT"))
            return
        if not t.recipients:
            self._refuse_data(_NO_RECIPIENTS)
            return
        incoming = self._begin_message(t)
        if incoming is None:
            self._refuse_data(Reply.local_error())
            return
        self._data = DataReader(incoming.receive, reject_bare_lf=protocol.settings.reject_bare_lf)
        protocol.read_data(self._data)
        protocol.reply(Reply.start_mail_input())

    async def end_of_data(self) -> None:
        """
        The client ended the message: finish it (see L{IncomingMessage}),
        then the transaction is over, whatever the outcome.
        """
        t, incoming, data = self.transaction, self._incoming, self._data
        assert t is not None and incoming is not None and data is not None
        try:
            await incoming.finish(
                t,
                bare_lf_seen=data.bare_lf_seen,
                canonical=not data.lone_cr_seen,
                dot_free=not data.dot_seen,
            )
        finally:
            self.reset()

    def _begin_message(self, t: Transaction) -> IncomingMessage | None:
        """
        Open the transaction's message in the spool, beginning with our
        C{Received} header; C{None} (logged) if the spool cannot.
        """
        protocol = self._protocol
        try:
            writer = protocol.factory.spool.receive(t.id)
        except Exception:
            protocol.log.failure("spool receive failed")
            return None
        self._incoming = IncomingMessage(protocol, writer, self._received_header(t))
        return self._incoming

    # -- BDAT (RFC 3030) ---------------------------------------------------

    def smtp_BDAT(self, arg: str) -> Coroutine[Any, Any, None] | None:
        """
        C{BDAT size [LAST]}: the chunk of C{size} bytes that follows at once
        is stored as sent (or, when the command is refused, read and thrown
        away: the reply comes only after it, RFC 3030 section 2).  A chunk
        gets 250 with its size; the last one the message's reply, as DATA's
        end does.
        """
        protocol = self._protocol
        try:
            size, last = parse_bdat(arg)
        except ValueError:
            # Where the chunk ends is unknown: its bytes would run as
            # commands.
            protocol.log.warn("malformed BDAT from {remote}", remote=protocol.session.remote_host)
            self.abort_message()
            protocol.close(Reply(521, SYNTAX_ERROR_TEXT))
            return None
        t = self.transaction
        if t is None:
            # After BDAT LAST too (RFC 3030 section 2: 503).
            return self._skip(size, last, _NEED_MAIL)
        chunks = self._chunks
        if chunks is None:
            if not t.recipients:
                return self._skip(size, last, _NO_RECIPIENTS)
            if self._begin_message(t) is None:
                return self._skip(size, last, Reply.local_error())
            chunks = self._chunks = ChunkedBody()
        elif chunks.failed:
            discarded = f"5.0.0 Error: {size} bytes discarded after an earlier error"
            return self._skip(size, last, Reply(554, discarded))
        incoming = self._incoming
        assert incoming is not None
        if incoming.size + size > protocol.settings.max_message_size:
            incoming.abort()
            return self._skip(size, last, Reply.exceeded_storage())
        chunks.announced += size
        store: Callable[[bytes], None] = incoming.receive
        if protocol.settings.reject_bare_lf:
            # Only then is a bare LF worth looking for: stored either way.
            def store(data: bytes) -> None:
                chunks.note(data)
                incoming.receive(data)

        return self._read(
            size, store, self._end_of_message if last else partial(self._end_of_chunk, size)
        )

    def _read(
        self,
        size: int,
        sink: Callable[[bytes], object],
        on_end: Callable[[], Coroutine[Any, Any, None]],
    ) -> Coroutine[Any, Any, None] | None:
        """
        Read a chunk of C{size} bytes into C{sink}, then run C{on_end}
        (at once for an empty chunk: no input is awaited).
        """
        if size == 0:
            return on_end()
        self._protocol.read_chunk(ChunkReader(size, sink, on_end))
        return None

    def _skip(self, size: int, last: bool, reply: Reply) -> Coroutine[Any, Any, None] | None:
        """
        Refuse a chunk with C{reply} once it is read and thrown away.  The
        transaction, if any, failed: its later chunks are thrown away too
        until the last one (or RSET) ends it.  A chunk too big to be worth
        reading closes the session after the reply.
        """
        protocol = self._protocol
        if self.transaction is not None:
            if self._chunks is None:
                self._chunks = ChunkedBody(failed=True)
            chunks = self._chunks
            chunks.failed = True
            chunks.announced += size
            announced = chunks.announced
        else:
            announced = size
        if announced > protocol.settings.max_message_size * DISCARD_FACTOR:
            # RFC 3030 section 2: a chunk cannot be cut short except by
            # closing the connection.
            protocol.log.warn(
                "BDAT of {size} bytes from {remote} refused: too big to read",
                size=size,
                remote=protocol.session.remote_host,
            )
            self.abort_message()
            protocol.close(reply)
            return None

        async def refuse() -> None:
            protocol.reply(reply)
            if last and self.transaction is not None:
                self.reset()

        return self._read(size, discard, refuse)

    async def _end_of_chunk(self, size: int) -> None:
        """
        A chunk of C{size} bytes that is not the last one is stored: 250
        with its size, or the spool's failure (the transaction failed).
        """
        incoming, chunks = self._incoming, self._chunks
        assert incoming is not None and chunks is not None
        refusal = incoming.refusal()
        if refusal is None:
            self._protocol.reply(Reply.ok(f"2.0.0 Ok: {size} bytes"))
            return
        incoming.abort()
        chunks.failed = True
        self._protocol.reply(refusal)

    async def _end_of_message(self) -> None:
        """
        The last chunk is stored: finish the message as at DATA's end,
        then the transaction is over, whatever the outcome.
        """
        t, incoming, chunks = self.transaction, self._incoming, self._chunks
        assert t is not None and incoming is not None and chunks is not None
        try:
            await incoming.finish(t, bare_lf_seen=chunks.bare_lf_seen)
        finally:
            self.reset()

    def _received_header(self, t: Transaction) -> bytes:
        """
        The C{Received} header field this server adds (RFC 5321 section
        4.4), in Postfix's form.
        """
        protocol = self._protocol
        s = protocol.session
        if s.authenticated is not None:
            proto = "ESMTPSA" if s.tls else "ESMTPA"
        elif s.tls:
            proto = "ESMTPS"
        else:
            proto = "ESMTP" if s.esmtp else "SMTP"
        tls = ""
        if s.tls is not None:
            bits = f" ({s.tls.bits} bits)" if s.tls.bits else ""
            tls = f"\r\n\t(using {s.tls.version} with cipher {s.tls.cipher}{bits})"
        for_ = f"\r\n\tfor <{t.recipients[0]}>" if len(t.recipients) == 1 else ""
        date = formatdate(protocol.factory.clock.seconds())
        text = (
            f"Received: from {s.helo} ([{s.remote_host}]){tls}\r\n"
            f"\tby {protocol.settings.hostname} (relay) with {proto} id {t.id}{for_};\r\n"
            f"\t{date}\r\n"
        )
        return text.encode("utf-8", "replace")
