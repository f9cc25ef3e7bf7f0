"""
The message of one mail transaction, from its first byte to the reply,
whether it came with DATA or in BDAT chunks.

While the client sends it, L{IncomingMessage} streams the message's bytes
(DATA's decoded by L{relay.smtp.data.DataReader}, or the chunks as sent)
into the spool's message writer (memory stays flat; reading pauses while
the writer is full), keeps the header section for the checks, and stops
keeping data past the size limit.  At its end it is finished: the limits
are checked, the message is completed in the spool, the plugin's
C{process_envelope} decides, the messages to spool are DKIM-signed (with
C{--dkim-keys}, L{relay.dkim.signer}), and they are spooled (or
quarantined, or thrown away) before the client is told: 250 only once
they are on disk.

Signing is here, between the plugin's answer and the commit, because
that is where the messages to store are known (the plugin may have
rewritten them, and says per envelope whether to sign) and not yet
stored: signed once, the stored bytes are what goes out, and a failure
is still the client's 451.  The spool stays about durability.
"""

from __future__ import annotations

import dataclasses
import errno
from typing import TYPE_CHECKING, Any, Sequence

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relay.dkim.signing import Signing
from relay.interfaces import IMessageWriter
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import MAX_HEADER_BYTES, header_section, parse_header_block
from relay.model.reply import Reply
from relay.model.results import Consume, Quarantine, Reject, Send

if TYPE_CHECKING:
    from relay.smtp.protocol import SMTPServerProtocol
    from relay.smtp.transaction import Transaction

#: More C{Received} fields than this is a mail loop (RFC 5321 section 6.3).
MAX_RECEIVED = 50


def spool_error(failure: Failure) -> Reply:
    """
    The reply for a spool that failed: 452 when the disk is full (the
    client tries again later, perhaps elsewhere), else 451.
    """
    exc = failure.value
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Reply.insufficient_storage()
    return Reply.local_error()


class IncomingMessage:
    """
    One message being received, then finished.

    @ivar size: the message's bytes received so far (ours, the C{Received}
        header, not counted).
    """

    def __init__(
        self, protocol: SMTPServerProtocol, writer: IMessageWriter, received: bytes
    ) -> None:
        """
        Begin the message with C{received}, the C{Received} header field
        this server adds.

        @param writer: where the spool receives the data.
        """
        self._protocol = protocol
        self._writer: IMessageWriter | None = writer
        self._received = received
        # The start of the data, up to the end of the header section.
        self._head = b""
        self._head_done = False
        # Past the size limit: the rest of the data is read and dropped.
        self._too_big = False
        self._write_failure: Failure | None = None
        self.size = 0
        self._write(received)

    def receive(self, data: bytes) -> None:
        """
        The message's next bytes (the sink of DATA's decoder, or of a
        BDAT chunk).
        """
        if not self._head_done:
            self._head += data[:MAX_HEADER_BYTES]
            if (
                b"\r\n\r\n" in self._head
                or self._head.startswith(b"\r\n")
                or len(self._head) >= MAX_HEADER_BYTES
            ):
                self._head_done = True
        self.size += len(data)
        if self._too_big:
            return
        if self.size > self._protocol.settings.max_message_size:
            self._too_big = True
            self.abort()
            return
        self._write(data)

    def abort(self) -> None:
        """
        Throw the message away: the writer is aborted, later data ignored.
        """
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.abort()
            except Exception:
                self._protocol.log.failure("aborting the message writer failed")
        self._protocol.writer_done()

    def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            stop = writer.write(data)
        except Exception:
            self._write_failure = Failure()
            self._protocol.log.failure("writing the message failed", self._write_failure)
            self.abort()
            return
        if stop:
            self._protocol.pause_for_writer(writer.drained)

    def refusal(self) -> Reply | None:
        """
        The reply that refuses the message so far, if a limit already
        refuses it: the spool failed, or it is too big.
        """
        if self._write_failure is not None:
            return spool_error(self._write_failure)
        if self._too_big or self.size > self._protocol.settings.max_message_size:
            return Reply.exceeded_storage()
        return None

    async def finish(
        self,
        t: Transaction,
        bare_lf_seen: bool = False,
        canonical: bool = False,
        dot_free: bool = False,
    ) -> None:
        """
        The message ended: check it, complete it in the spool, ask the
        plugin, do what it says, and reply.

        @param bare_lf_seen: the message holds a bare LF (refused with
            C{--reject-bare-lf}).
        @param canonical: the bytes stored are canonical
            (L{Message.canonical<relay.model.message.Message.canonical>}).
        @param dot_free: and no line of them begins with a dot
            (L{Message.dot_free<relay.model.message.Message.dot_free>}).
        """
        protocol = self._protocol
        headers = self._checked_headers(bare_lf_seen)
        if headers is None:
            return
        try:
            writer, self._writer = self._writer, None
            assert writer is not None
            message = await writer.finish(headers)
            if canonical:
                message = dataclasses.replace(message, canonical=True, dot_free=dot_free)
        except Exception:
            protocol.log.failure("finishing the message failed")
            protocol.reply(spool_error(Failure()))
            return
        envelope = Envelope(
            id=t.id,
            sender=t.sender,
            sender_args=t.sender_args,
            recipients=t.recipients,
            message=message,
            rejected_recipients=t.rejected,
            recipient_args=t.recipient_args,
        )
        try:
            result = await protocol.callback("process_envelope", protocol.session, envelope)
        except Exception:
            protocol.log.failure("process_envelope failed")
            self._discard(message)
            protocol.reply(Reply.local_error())
            return
        if protocol.closed:
            # The client is gone and will retry: do not keep a copy it was
            # never told about.
            self._discard(message)
            return
        await self._carry_out(result, message, t)

    def _checked_headers(self, bare_lf_seen: bool) -> tuple[tuple[str, str], ...] | None:
        """
        The message's header fields, ours first, if it passes the checks
        that need no plugin; else the refusal is sent, and C{None}.
        """
        protocol = self._protocol
        refusal = self.refusal()
        if refusal is None and bare_lf_seen and protocol.settings.reject_bare_lf:
            refusal = Reply.mailbox_unavailable("5.6.2 Bare LF not allowed")
        if refusal is None:
            headers = parse_header_block(self._received) + parse_header_block(
                header_section(self._head)
            )
            received = sum(1 for name, _ in headers if name.lower() == "received")
            if received <= MAX_RECEIVED:
                return headers
            refusal = Reply.transaction_failed("5.4.6 Too many Received headers: mail loop")
        self.abort()
        protocol.reply(refusal)
        return None

    async def _carry_out(self, result: object, message: Any, t: Transaction) -> None:
        """
        Do what C{process_envelope} answered, then tell the client.
        """
        protocol = self._protocol
        received_from = f"{protocol.session.helo} [{protocol.session.remote_host}]"
        spool = protocol.factory.spool
        if isinstance(result, Consume):
            self._discard(message)
            protocol.reply(Reply.ok(f"2.0.0 {result.ok_msg}"))
        elif isinstance(result, Reject):
            self._discard(message)
            on_rejected = protocol.factory.on_rejected
            if on_rejected is not None:
                on_rejected()
            protocol.reply(result.reply)
        elif isinstance(result, (Send, Quarantine)):
            signing = await self._sign(result.envelopes, message)
            if signing is None:
                return
            envelopes = signing.envelopes
            try:
                if isinstance(result, Send):
                    await spool.enqueue(envelopes, received_from=received_from)
                else:
                    await spool.quarantine(envelopes, result.reason, received_from=received_from)
            except Exception:
                failure = Failure()
                protocol.log.failure("spooling failed", failure)
                self._discard(message)
                for m in (*signing.made, *signing.replaced):
                    if m is not message:
                        self._discard(m)
                protocol.reply(spool_error(failure))
                return
            for m in signing.replaced:
                self._discard(m)
            if isinstance(result, Send):
                protocol.log.info(
                    "queued {envelope_id}", count=len(envelopes), dkim=signing.signed_as or None
                )
                protocol.reply(Reply.ok(f"2.0.0 Ok: queued as {t.id}"))
            else:
                protocol.log.info("quarantined: {reason}", reason=result.reason)
                protocol.reply(result.reply)
        else:
            protocol.log.error("process_envelope returned {result!r}", result=result)
            self._discard(message)
            protocol.reply(Reply.local_error())

    async def _sign(self, envelopes: Sequence[EnvelopeWithNextHop], message: Any) -> Signing | None:
        """
        Sign the messages of C{envelopes} (with C{--dkim-keys}), before they
        are spooled: what is stored is what goes out.  If that fails, or
        the client left meanwhile, the client is answered (if still there),
        the received C{message} discarded, and C{None} returned.
        """
        protocol = self._protocol
        signer = protocol.settings.dkim_signer
        if signer is None:
            return Signing(tuple(envelopes))
        try:
            signing: Signing = await signer.sign(envelopes, protocol.factory.spool, protocol.log)
        except Exception:
            failure = Failure()
            protocol.log.failure("DKIM signing failed", failure)
            self._discard(message)
            protocol.reply(spool_error(failure))
            return None
        if protocol.closed:
            # As after process_envelope: the client will send it again.
            self._discard(message)
            for m in signing.made:
                self._discard(m)
            return None
        return signing

    def _discard(self, message: Any) -> None:
        protocol = self._protocol
        try:
            d = protocol.factory.spool.discard(message)
        except Exception:
            protocol.log.failure("discard failed")
            return
        if isinstance(d, Deferred):
            d.addErrback(lambda f: protocol.log.failure("discard failed", f))
