"""
An SMTP session with a next hop, from the client's side: the greeting,
EHLO (or HELO), STARTTLS and AUTH that a connection goes through once,
before its first mail transaction.

A L{ClientSession} keeps what they established (the extensions the hop
offered after TLS, how many transactions the connection carried) for every
transaction on the connection, the first and those after it is taken from
the idle pool.  What TLS to ask for is not decided here: the session does
what its L{TLSPolicy} says.
"""

from __future__ import annotations

import base64

from relay.delivery.client_protocol import SMTPClientProtocol
from relay.delivery.client_result import DeliveryError, refused
from relay.delivery.client_settings import ClientSettings
from relay.delivery.client_tls import TLSPolicy
from relay.model.entry import TLSOutcome
from relay.model.reply import Reply


def extensions_of(reply: Reply) -> dict[str, str]:
    """
    The service extensions of an EHLO reply: keyword (upper case) to its
    parameters (RFC 5321 section 4.1.1.1).
    """
    exts = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            exts[keyword.upper()] = params.strip()
    return exts


class ClientSession:
    """
    One connection's SMTP session with C{hop}.

    @ivar proto: the connection.
    @ivar hop: the hop, C{host:port}, for errors and the idle pool.
    @ivar host: the hop's host, the name its certificate must show.
    @ivar extensions: what the hop offered in its last EHLO (after TLS);
        empty after HELO.
    @ivar transactions: mail transactions begun in this session.
    @ivar pool_key: what the idle pool keeps the session by: the hop, and
        the TLS policy it was opened under when that is not the default.
    @ivar tls: what came of the session's TLS policy, once it is open
        (C{None} before, or when it was opened without one).
    """

    def __init__(
        self, proto: SMTPClientProtocol, hop: str, host: str, pool_key: str | None = None
    ) -> None:
        self.proto = proto
        self.hop = hop
        self.host = host
        self.pool_key = pool_key if pool_key is not None else hop
        self.extensions: dict[str, str] = {}
        self.transactions = 0
        self.tls: TLSOutcome | None = None

    def refused(self, what: str, reply: Reply, permanent: bool = False) -> DeliveryError:
        """
        The error for a step that the hop refused with C{reply}.
        """
        error = refused(self.hop, what, reply, self.proto.peer, permanent)
        error.tls = self.tls
        return error

    async def command(self, command: str) -> Reply:
        """
        Send one command and wait for its reply.
        """
        self.proto.send(command)
        return await self.proto.next_reply()

    async def open(self, settings: ClientSettings, tls: TLSPolicy) -> None:
        """
        Take the greeting, then EHLO, STARTTLS and AUTH as C{tls} and
        C{settings} say.

        @raise DeliveryError: when the hop refused a step, or offered too
            little (no STARTTLS where TLS is required, no AUTH where
            credentials are configured).
        """
        greeting = await self.proto.next_reply()
        if greeting.code != 220:
            raise self.refused("greeting", greeting)
        await self._hello(settings.hostname)
        await self._starttls(settings.hostname, tls)
        if settings.auth is not None:
            await self._authenticate(*settings.auth)

    async def _hello(self, hostname: str) -> None:
        reply = await self.command(f"EHLO {hostname}")
        if reply.is_positive:
            self.extensions = extensions_of(reply)
            return
        if reply.is_permanent:
            reply = await self.command(f"HELO {hostname}")
            if reply.is_positive:
                self.extensions = {}
                return
        raise self.refused("EHLO/HELO refused", reply)

    async def _starttls(self, hostname: str, tls: TLSPolicy) -> None:
        plain = tls.outcome(*tls.note) if tls.note is not None else tls.outcome("plain")
        if not tls.attempted:
            self.tls = plain
            return
        if "STARTTLS" not in self.extensions:
            if tls.mode in ("encrypt", "verify", "dane"):
                self.tls = tls.outcome(
                    "starttls-not-supported", f"{self.hop} does not offer STARTTLS"
                )
            else:
                self.tls = plain
            if not tls.required:
                return
            raise self.refused(
                "TLS required", Reply(454, f"4.7.0 {self.hop} does not offer STARTTLS")
            )
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            if tls.mode in ("encrypt", "verify", "dane"):
                self.tls = tls.outcome("starttls-not-supported", f"STARTTLS refused: {reply}")
            raise self.refused("STARTTLS refused", reply)
        creator = tls.connection_creator(self.host)
        self.proto.start_tls(creator)
        # RFC 3207 section 4.2: what the hop said before TLS counts no more.
        try:
            await self._hello(hostname)
        except Exception:
            # Most often the handshake itself failed.
            self.tls = tls.outcome("validation-failure", "TLS negotiation failed")
            raise
        problem = tls.problem(self.host, creator)
        if problem is None:
            self.tls = tls.outcome(*tls.note) if tls.note is not None else tls.outcome("ok")
            return
        self.tls = tls.outcome(*problem)
        if tls.enforced:
            raise self.refused(
                "certificate verification failed",
                Reply(454, f"4.7.5 Certificate of {self.hop} not accepted for {self.host} "
                           f"({tls.label}): {problem[0]}: {problem[1]}"),
            )  # fmt: skip

    async def _authenticate(self, user: str, password: str) -> None:
        if not self.proto.tls:
            raise self.refused(
                "AUTH needs TLS", Reply(454, "4.7.0 Not sending credentials without TLS")
            )
        if "AUTH" not in self.extensions:
            raise self.refused(
                "AUTH not offered", Reply(454, "4.7.0 The next hop does not offer AUTH")
            )
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms or "LOGIN" not in mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
            reply = await self.command(f"AUTH PLAIN {token}")
        else:
            reply = await self.command("AUTH LOGIN")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self.command(base64.b64encode(secret.encode()).decode("ascii"))
        if reply.code != 235:
            raise self.refused("AUTH failed", reply)
