"""
The listening sockets of C{--receivers}: the master opens each C{--smtp}
endpoint itself (L{parse_listener}, L{open_listener}) and its receivers
adopt the sockets, so that they all accept on the same ports.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from relay.app._compat import parse_endpoint

IMPLICIT_TLS = "implicit-tls"  # relay.smtp.tls.IMPLICIT_TLS, without its colon
SUPPORTED = ("tcp", "tcp6", IMPLICIT_TLS)


@dataclass(frozen=True)
class Listener:
    """
    A listening socket the master opens and the receivers adopt.
    """

    endpoint: str
    family: int
    host: str
    port: int
    backlog: int = 50
    haproxy: bool = False
    tls: bool = False  # implicit TLS, with the relay's certificate

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "family": "inet6" if self.family == socket.AF_INET6 else "inet",
            "host": self.host,
            "port": self.port,
            "backlog": self.backlog,
            "haproxy": self.haproxy,
            "tls": self.tls,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Listener:
        family = socket.AF_INET6 if data["family"] == "inet6" else socket.AF_INET
        return cls(
            data["endpoint"], family, data["host"], int(data["port"]),
            int(data["backlog"]), bool(data["haproxy"]), bool(data.get("tls", False)),
        )  # fmt: skip


def parse_listener(endpoint: str) -> Listener:
    """
    The L{Listener} of an endpoint description: C{tcp:PORT}, C{tcp6:PORT}
    or C{implicit-tls:PORT} (with C{interface=} and C{backlog=}; IPv6 for
    C{implicit-tls:} when the interface is an IPv6 address), optionally
    behind C{haproxy:}.

    @raise ValueError: for any other endpoint, with a message for the user.
    """
    try:
        args, kwargs = parse_endpoint(endpoint)
    except Exception as e:
        raise ValueError(f"bad endpoint {endpoint!r}: {e}") from None
    args = [str(a) for a in args]
    haproxy = bool(args) and args[0].lower() == "haproxy"
    if haproxy:
        args = args[1:]
    if args and args[0].lower() == "ssl":
        raise ValueError(
            f"endpoint {endpoint!r}: receivers cannot serve ssl: endpoints; use "
            f"{IMPLICIT_TLS}:PORT[:interface=...] with --tls-cert and --tls-key"
        )
    if not args or args[0].lower() not in SUPPORTED:
        raise ValueError(
            f"endpoint {endpoint!r}: with receivers, only tcp:, tcp6: and haproxy: "
            f"over them are supported (and {IMPLICIT_TLS}: for implicit TLS)"
        )
    kind = args[0].lower()
    port_text = kwargs.pop("port", args[1] if len(args) > 1 else None)
    unknown = set(kwargs) - {"interface", "backlog"}
    if port_text is None or len(args) > 2 or unknown:
        raise ValueError(f"endpoint {endpoint!r}: expected {kind}:PORT[:interface=...][:backlog=N]")
    try:
        port = int(port_text)
        backlog = int(kwargs.get("backlog", 50))
    except ValueError:
        raise ValueError(f"endpoint {endpoint!r}: port and backlog must be numbers") from None
    if not 0 <= port <= 65535 or backlog < 1:
        raise ValueError(f"endpoint {endpoint!r}: bad port or backlog")
    host = str(kwargs.get("interface", "::" if kind == "tcp6" else "0.0.0.0"))
    tls = kind == IMPLICIT_TLS
    # implicit-tls: listens as Twisted's tcp: does: IPv6 on an IPv6 interface.
    family = socket.AF_INET6 if kind == "tcp6" or (tls and ":" in host) else socket.AF_INET
    if family == socket.AF_INET and ":" in host:
        raise ValueError(f"endpoint {endpoint!r}: an IPv6 interface needs tcp6:")
    return Listener(endpoint, family, host, port, backlog, haproxy, tls)


def open_listener(listener: Listener) -> socket.socket:
    """
    Bind and listen as Twisted's TCP port would (non-blocking,
    C{SO_REUSEADDR}).
    """
    sock = socket.socket(listener.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listener.family == socket.AF_INET6:
            address: tuple[Any, ...] = socket.getaddrinfo(
                listener.host, listener.port, socket.AF_INET6, socket.SOCK_STREAM
            )[0][4]
        else:
            address = (listener.host, listener.port)
        sock.bind(address)
        sock.listen(listener.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
