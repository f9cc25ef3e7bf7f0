"""
What the server knows about one SMTP connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TLSInfo:
    """
    The negotiated TLS parameters of a session.
    """

    version: str
    cipher: str
    bits: int | None = None


@dataclass(frozen=True)
class Session:
    """
    One SMTP session, as the plugin callbacks see it.

    @ivar id: a short id unique to this server run, carried by every log event.
    @ivar local: the address the client connected to (an L{IAddress}).
    @ivar remote: the client's address (an L{IAddress}).
    @ivar helo: the name given with HELO or EHLO, once given.
    @ivar esmtp: whether the client said EHLO.
    @ivar tls: the TLS parameters, once STARTTLS completed.
    @ivar authenticated: the user name, once AUTH succeeded.
    @ivar advertised_extensions: the EHLO keywords offered to the client.
    """

    id: str
    local: object = None
    remote: object = None
    helo: str | None = None
    esmtp: bool = False
    tls: TLSInfo | None = None
    authenticated: str | None = None
    advertised_extensions: tuple[str, ...] = field(default=())

    @property
    def remote_host(self) -> str:
        return str(getattr(self.remote, "host", self.remote or "unknown"))

    @property
    def remote_port(self) -> int | None:
        return getattr(self.remote, "port", None)

    @property
    def local_host(self) -> str:
        return str(getattr(self.local, "host", self.local or "unknown"))
