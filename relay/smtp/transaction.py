"""
The mail transaction of an SMTP session (RFC 5321 section 3.3): MAIL FROM,
RCPT TO and DATA, each asked of the plugin (C{process_sender},
C{process_recipient}), up to the C{Received} header that begins the
message; L{relay.smtp.incoming} takes the message from there.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from typing import TYPE_CHECKING

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
from relay.smtp.incoming import IncomingMessage

if TYPE_CHECKING:
    from relay.smtp.protocol import SMTPServerProtocol

_MAIL = re.compile(r"^FROM: ?(<[^>]*>)(?: +(.*))?$", re.I | re.S)
_RCPT = re.compile(r"^TO: ?(<[^>]*>)(?: +(.*))?$", re.I | re.S)

_SENDER_OK = Reply.ok("2.1.0 Ok")
_RECIPIENT_OK = Reply.ok("2.1.5 Ok")
_NEED_MAIL = Reply.bad_sequence("5.5.1 Error: need MAIL command")


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
    MAIL, RCPT and DATA in one session, and the transaction they build.

    @ivar transaction: the transaction in progress, if any.
    """

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol
        self.transaction: Transaction | None = None
        # The message of the DATA command in progress (or just ended).
        self._incoming: IncomingMessage | None = None

    def reset(self) -> None:
        """
        Forget the transaction (RSET, HELO, STARTTLS, the end of DATA),
        and the message being received with it.
        """
        self.abort_message()
        self.transaction = None
        self._incoming = None
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
        if not t.recipients:
            self._refuse_data(Reply.transaction_failed("5.5.1 No valid recipients"))
            return
        try:
            writer = protocol.factory.spool.receive(t.id)
        except Exception:
            protocol.log.failure("spool receive failed")
            self._refuse_data(Reply.local_error())
            return
        incoming = self._incoming = IncomingMessage(protocol, writer, self._received_header(t))
        protocol.read_data(incoming.reader)
        protocol.reply(Reply.start_mail_input())

    async def end_of_data(self) -> None:
        """
        The client ended the message: finish it (see L{IncomingMessage}),
        then the transaction is over, whatever the outcome.
        """
        t, incoming = self.transaction, self._incoming
        assert t is not None and incoming is not None
        try:
            await incoming.finish(t)
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
