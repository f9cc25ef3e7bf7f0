"""
What the relay reads in an endpoint description without listening on it:
whether it needs TLS (L{needs_tls}), whether it accepts other hosts
(L{listens_publicly}), the control socket's mode (L{control_endpoint}).
"""

from __future__ import annotations

import ipaddress
import os

from relay.app._compat import parse_endpoint
from relay.spool.layout import quote_endpoint_value

HAPROXY = "haproxy"
# Endpoint types served without pyOpenSSL (implicit-tls: is TCP with the
# relay's own certificate: that needs it).
PLAIN_KINDS = frozenset({"tcp", "tcp6", "unix", "systemd"})
_NETWORK_KINDS = frozenset({"tcp", "tcp6", "ssl", "le", "lets", "implicit-tls"})
# The longest AF_UNIX socket path (sun_path less its terminating NUL).
_UNIX_PATH_MAX = 107


def kind(description: str) -> str:
    """
    The endpoint type of C{description}, lowercased, behind any
    C{haproxy:} prefix (C{"haproxy:tcp6:25"} is C{"tcp6"}).
    """
    head = description
    while head[: len(HAPROXY) + 1].lower() == HAPROXY + ":":
        head = head[len(HAPROXY) + 1 :]
    return head.split(":", 1)[0].strip().lower()


def needs_tls(description: str) -> bool:
    """
    Does listening on C{description} take pyOpenSSL?  Every type but the
    plain ones (an C{ssl:}, an C{implicit-tls:}, or one relay does not
    know, which might).
    """
    return kind(description) not in PLAIN_KINDS


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def listens_publicly(description: str) -> bool:
    """
    Does the server endpoint description C{description} accept connections
    from other hosts?  A TCP endpoint without C{interface=} listens on all
    interfaces.
    """
    try:
        args, kwargs = parse_endpoint(description)
    except Exception:
        return False
    if not args:
        return False
    endpoint_kind = str(args[0]).lower()
    if endpoint_kind in ("unix", "systemd"):
        return False
    if endpoint_kind not in _NETWORK_KINDS:
        # Unknown endpoint type: assume the worst only for network ones.
        return "interface" in kwargs and not _is_loopback(kwargs["interface"])
    interface = kwargs.get("interface")
    if interface is None:
        return True
    return not _is_loopback(interface)


def control_endpoint(description: str) -> str:
    """
    The control endpoint description C{description}, with C{mode=0600}
    added to a unix socket that does not say its mode: only the relay's
    user may manage it.
    """
    try:
        args, kwargs = parse_endpoint(description)
    except Exception:
        return description
    if not args or str(args[0]).lower() != "unix":
        return description
    if "mode" not in kwargs:
        kwargs["mode"] = "0600"
    path = str(args[1]) if len(args) > 1 else str(kwargs.pop("address", ""))
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        # A socket path longer than AF_UNIX allows cannot be bound; the
        # same socket relative to the current directory may fit.
        relative = os.path.relpath(path)
        if len(os.fsencode(relative)) < len(os.fsencode(path)):
            path = relative
    return ":".join(
        ["unix", quote_endpoint_value(path)]
        + [f"{k}={quote_endpoint_value(str(v))}" for k, v in kwargs.items()]
        + [quote_endpoint_value(str(a)) for a in args[2:]]
    )
