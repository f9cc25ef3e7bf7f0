"""
One mail transaction on an open L{ClientSession}: MAIL FROM, RCPT TO for
every recipient and the body, with BDAT chunks when the hop offers
CHUNKING (RFC 3030), else with DATA; pipelined when the hop offers
PIPELINING (RFC 2920); and the reply that settled each recipient.

With PIPELINING and CHUNKING a message held in memory that fits one chunk
goes in the same write as MAIL and RCPT, as C{BDAT n LAST}: the whole
transaction is one round trip.  (If every recipient is refused the hop
reads the chunk and throws it away; for a larger message the chunks wait
for the RCPT replies, so that a refused message costs no more than that.)

The commands' parameters follow what the hop offered: SIZE (a message over
the hop's limit is refused here, permanently), BODY=8BITMIME, SMTPUTF8
(needed but not offered: refused permanently), and the DSN parameters.
"""

from __future__ import annotations

from relay.delivery.client_body import (
    RunInThread,
    fits_one_chunk,
    one_chunk,
    write_bdat_body,
    write_data_body,
)
from relay.delivery.client_protocol import ConnectionClosed, ReplyTimeout
from relay.delivery.client_result import DeliveryResult
from relay.delivery.client_session import ClientSession
from relay.model.argument import Argument, find
from relay.model.envelope import Envelope
from relay.model.reply import Reply, ReplyError


class StaleSession(Exception):
    """
    A session reused from the idle pool turned out closed (or answered
    MAIL with 421) before the transaction began: try once more on a fresh
    connection.
    """


def _xtext_ok(value: str | None) -> bool:
    return value is not None and value.isascii()


def mail_command(session: ClientSession, envelope: Envelope) -> str:
    """
    MAIL FROM for C{envelope} with the parameters that it has and the hop
    of C{session} offered.

    @raise DeliveryError: permanent, when the hop cannot take this
        message (too big, SMTPUTF8 not offered).
    """
    env, exts = envelope, session.extensions
    sender_args = tuple(env.sender_args)
    args: list[Argument] = []
    if "SIZE" in exts:
        limit = exts["SIZE"].split()[0] if exts["SIZE"] else ""
        if limit.isdigit() and int(limit) > 0 and env.message.size > int(limit):
            raise session.refused(
                "message too big",
                Reply(552, f"5.3.4 Message size {env.message.size} exceeds the hop's limit {limit}"),
                permanent=True,
            )
        args.append(Argument("SIZE", str(env.message.size)))
    body = find(sender_args, "BODY")
    if body is not None and (body.value or "").upper() == "8BITMIME" and "8BITMIME" in exts:
        args.append(Argument("BODY", "8BITMIME"))
    needs_utf8 = (
        find(sender_args, "SMTPUTF8") is not None
        or not str(env.sender).isascii()
        or any(r.needs_smtputf8 for r in env.recipients)
    )
    if needs_utf8:
        if "SMTPUTF8" not in exts:
            raise session.refused(
                "SMTPUTF8 needed",
                Reply(553, "5.6.7 The next hop does not support SMTPUTF8"),
                permanent=True,
            )
        args.append(Argument("SMTPUTF8"))
    if "DSN" in exts:
        for keyword in ("RET", "ENVID"):
            arg = find(sender_args, keyword)
            if arg is not None and _xtext_ok(arg.value):
                args.append(arg)
    return " ".join([f"MAIL FROM:<{env.sender}>"] + [str(a) for a in args])


def rcpt_commands(session: ClientSession, envelope: Envelope) -> list[str]:
    """
    RCPT TO for every recipient of C{envelope}, with its DSN parameters
    when the hop of C{session} offered DSN.
    """
    dsn = "DSN" in session.extensions
    commands = []
    for rcpt in envelope.recipients:
        args = []
        if dsn:
            for keyword in ("NOTIFY", "ORCPT"):
                arg = find(tuple(envelope.args_for(rcpt)), keyword)
                if arg is not None and _xtext_ok(arg.value):
                    args.append(str(arg))
        commands.append(" ".join([f"RCPT TO:<{rcpt}>"] + args))
    return commands


class Transaction:
    """
    Deliver one envelope in C{session}.

    @ivar in_data: the body is being written: the hop must not see a QUIT
        now (the connection is aborted instead).
    @ivar reusable: the transaction ended cleanly (the reply to the end of
        data, or every recipient refused and RSET answered 250): the
        session may carry another.
    """

    def __init__(
        self,
        session: ClientSession,
        envelope: Envelope,
        run_in_thread: RunInThread | None,
        keep: bool,
    ) -> None:
        """
        @param keep: the session is wanted afterwards (the idle pool has a
            place for it): worth waiting for the reply to RSET.
        """
        self.session = session
        self.envelope = envelope
        self._run_in_thread = run_in_thread
        self._keep = keep
        self.in_data = False
        self.reusable = False

    async def _mail_reply(self, reused: bool) -> Reply:
        """
        The reply to MAIL FROM; on a reused session, a closed connection
        or a 421 raises L{StaleSession}.
        """
        try:
            reply = await self.session.proto.next_reply()
        except ConnectionClosed as e:
            if reused:
                raise StaleSession(str(e)) from e
            raise
        if reused and reply.code == 421:
            raise StaleSession(str(reply))
        return reply

    async def run(self) -> DeliveryResult:
        """
        Send the envelope.

        @return: the reply that settled each recipient.
        @raise DeliveryError: when the hop took nothing.
        @raise StaleSession: a reused session was found unusable at MAIL.
        """
        session = self.session
        proto = session.proto
        mail = mail_command(session, self.envelope)
        rcpts = rcpt_commands(session, self.envelope)
        recipients = [str(r) for r in self.envelope.recipients]
        message = self.envelope.message
        pipelining = "PIPELINING" in session.extensions
        chunking = "CHUNKING" in session.extensions
        # The body in the envelope's write: a BDAT LAST, or DATA (its 354
        # comes back with the envelope's replies).
        with_envelope = (
            (one_chunk(message) if fits_one_chunk(message) else None) if chunking else b"DATA\r\n"
        )
        reused = session.transactions > 0
        session.transactions += 1
        # The reply to what went with the envelope: 354, or the message's.
        body_reply: Reply | None = None
        if pipelining:
            proto.write(
                b"".join(c.encode("utf-8") + b"\r\n" for c in (mail, *rcpts))
                + (with_envelope or b"")
            )
            mail_reply = await self._mail_reply(reused)
            rcpt_replies = [await proto.next_reply() for _ in rcpts]
            if with_envelope is not None:
                body_reply = await proto.next_reply()
            if not mail_reply.is_positive:
                if body_reply is not None and body_reply.code == 354:
                    proto.write(b".\r\n")
                    await proto.next_reply()
                raise session.refused("MAIL FROM refused", mail_reply, mail_reply.is_permanent)
        else:
            proto.send(mail)
            mail_reply = await self._mail_reply(reused)
            if not mail_reply.is_positive:
                raise session.refused("MAIL FROM refused", mail_reply, mail_reply.is_permanent)
            rcpt_replies = []
            for command in rcpts:
                rcpt_replies.append(await session.command(command))
        accepted = [r.is_positive for r in rcpt_replies]
        if not any(accepted):
            if body_reply is not None and body_reply.code == 354:
                # The hop took DATA with no recipient (RFC 2920 section 3.1):
                # send an empty message, which it must refuse.
                proto.write(b".\r\n")
                await proto.next_reply()
            # (A chunk sent with the envelope was thrown away, refused.)
            await self._reset()
            return DeliveryResult(
                session.hop, tuple(zip(recipients, rcpt_replies, strict=True)), proto.peer
            )
        if chunking:
            final = await self._chunks(body_reply, pipelining)
        else:
            final = await self._data(body_reply)
        replies = tuple(
            (address, final if ok else reply)
            for address, ok, reply in zip(recipients, accepted, rcpt_replies, strict=True)
        )
        # Every outcome, whole or partial, is logged by whoever settles the
        # entry: one line per outcome, none here.
        return DeliveryResult(session.hop, replies, proto.peer)

    async def _data(self, data_reply: Reply | None) -> Reply:
        """
        DATA (unless its 354 came with the envelope's replies), the body
        and the end marker.

        @return: the hop's reply to the message.
        """
        session, proto = self.session, self.session.proto
        if data_reply is None:
            data_reply = await session.command("DATA")
        if data_reply.code != 354:
            raise session.refused("DATA refused", data_reply, data_reply.is_permanent)
        self.in_data = True
        await write_data_body(proto, self.envelope.message, self._run_in_thread)
        self.in_data = False
        final = await proto.next_reply()
        # A 421 means the hop is closing the connection.
        self.reusable = final.code != 421
        return final

    async def _chunks(self, chunk_reply: Reply | None, pipelining: bool) -> Reply:
        """
        The body in BDAT chunks (unless its one chunk went with the
        envelope, and C{chunk_reply} answers it).  A chunk refused before
        the last is the message's reply, as a refusal after DATA would be.

        @return: the hop's reply to the message.
        """
        if chunk_reply is not None:
            self.reusable = chunk_reply.code != 421
            return chunk_reply
        sent = await write_bdat_body(
            self.session.proto, self.envelope.message, self._run_in_thread, pipelining
        )
        self.reusable = sent.complete and sent.reply.code != 421
        return sent.reply

    async def _reset(self) -> None:
        """
        RSET after every recipient was refused; the session is reusable
        only once the hop confirmed it.
        """
        proto = self.session.proto
        proto.send("RSET")
        if not self._keep:
            return
        try:
            rset = await proto.next_reply()
        except (ReplyTimeout, ConnectionClosed, ReplyError):
            return
        self.reusable = rset.code == 250
