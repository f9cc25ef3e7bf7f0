"""
Every use relay makes of Twisted's private APIs, in one place.

Twisted does not promise to keep these; each is here, and only here, so
that a Twisted release that changes one breaks one module, and
C{tests.test_compat} pins each (it fails when Twisted changes it):

 - L{parse_endpoint}, L{check_server_endpoint}: the endpoint description
   parser (C{twisted.internet.endpoints._parse}, C{_parseServer}), for
   reading descriptions without listening on them.
 - L{keep_openssl_out}: Twisted's TCP transport and endpoints import
   pyOpenSSL if they can, and do without it (no C{startTLS}, no C{ssl:})
   if they cannot; that costs some 13 MB a process that serves no TLS
   need not pay.
 - L{start_tls}: C{startTLS} on a TCP transport made without it
   (C{twisted.internet._newtls}), so that outgoing STARTTLS (C{--relay-tls
   may}, the default) loads pyOpenSSL on first use rather than at start.
 - L{eager_write}: the TCP transport's buffers (C{_tempDataBuffer}), to
   write a reply at once when nothing waits before it
   (L{relay.smtp.eager}).
 - The PROXY protocol parsers and wrapper (C{twisted.protocols.haproxy._*})
   that L{relay.smtp.proxy} builds on.
 - L{flatten_event}: C{twisted.logger._flatten.flattenEvent}, for log
   events that travel between processes (L{relay.logs.portable}).
 - L{twistd_log_file}: twistd's C{--nodaemon} and C{--logfile} as its
   C{AppLogger} keeps them (C{_nodaemon}, C{_logfilename}), for
   L{relay.logs.json_observer}.
 - L{cache_log_times}: the C{formatTime} that twistd's text log
   (C{twisted.logger._file.textFileLogObserver}) calls for every line.

Importing this module imports neither the TCP transport nor the endpoints:
L{keep_openssl_out} must be able to run before them.  The PROXY-protocol
names and L{eager_write} are made on first access for that reason (they
need those modules).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any, Callable

from twisted.logger import LogEvent, timeFormatRFC3339
from twisted.logger._flatten import flattenEvent

if TYPE_CHECKING:
    from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
    from twisted.protocols.haproxy._info import ProxyInfo
    from twisted.protocols.haproxy._v1parser import V1Parser
    from twisted.protocols.haproxy._v2parser import V2Parser
    from twisted.protocols.haproxy._wrapper import (
        HAProxyProtocolWrapper,
        HAProxyWrappingFactory,
    )

    def eager_write(transport: Any, data: bytes) -> None: ...


__all__ = [
    "HAProxyProtocolWrapper",
    "HAProxyWrappingFactory",
    "InvalidProxyHeader",
    "ProxyInfo",
    "V1Parser",
    "V2Parser",
    "check_server_endpoint",
    "eager_write",
    "flatten_event",
    "keep_openssl_out",
    "parse_endpoint",
    "start_tls",
    "tls_kept_out",
    "twistd_log_file",
]


# -- endpoint descriptions ---------------------------------------------------


def parse_endpoint(description: str) -> tuple[list[Any], dict[str, Any]]:
    """
    The positional and keyword parts of an endpoint description, unquoted
    (C{"unix:/a\\:b:mode=0600"} is C{(["unix", "/a:b"], {"mode": "0600"})}).

    @raise ValueError: if C{description} cannot be parsed.
    """
    from twisted.internet.endpoints import _parse  # type: ignore[attr-defined]

    args, kwargs = _parse(description)
    return list(args), dict(kwargs)


def check_server_endpoint(description: str) -> None:
    """
    Check that C{description} is a server endpoint Twisted knows (its type
    and its arguments), without making or listening on it.

    @raise Exception: Twisted's own error for a bad description (a
        L{ValueError}, L{KeyError}, L{TypeError}...): its text is for the
        operator.
    """
    from twisted.internet.endpoints import _parseServer  # type: ignore[attr-defined]

    _parseServer(description, None)


# -- pyOpenSSL only when needed -----------------------------------------------


def tls_kept_out() -> bool:
    """
    Did Twisted's TCP transport come without TLS (L{keep_openssl_out})?
    """
    tcp = sys.modules.get("twisted.internet.tcp")
    return tcp is not None and not hasattr(tcp.Connection, "startTLS")


def keep_openssl_out(*also: str) -> bool:
    """
    Import Twisted's TCP transport, endpoints and reactor base (and the
    modules named in C{also}, which would take pyOpenSSL too, such as
    C{twisted.protocols.amp}) without pyOpenSSL, when none of them nor
    pyOpenSSL are imported yet: call it before anything imports the
    reactor.  Afterwards pyOpenSSL imports as usual (a plugin,
    L{start_tls}, an implicit-TLS listener may need it).

    Then the reactor has no C{listenSSL}/C{connectSSL}, the endpoints no
    C{ssl:} and AMP no C{StartTLS}; TLS over TCP (L{start_tls},
    C{TLSMemoryBIOFactory}) still works.

    @return: whether they came without it (C{False}: too late, they or
        pyOpenSSL were imported already).
    """
    modules = (
        "twisted.internet.tcp", "twisted.internet.posixbase", "twisted.internet.endpoints", *also
    )
    if "OpenSSL" in sys.modules or any(name in sys.modules for name in modules):
        return tls_kept_out()
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        if sys.modules.get("OpenSSL", 0) is None:
            del sys.modules["OpenSSL"]
    return tls_kept_out()


# Transport classes with startTLS, made on first use, by the class they extend.
_WITH_TLS: dict[type, type] = {}


def start_tls(transport: Any, creator: Any) -> None:
    """
    C{transport.startTLS(creator)}, also for a TCP transport made without
    it (see L{keep_openssl_out}): the transport then becomes what Twisted
    makes when pyOpenSSL is there, the same class with Twisted's own TLS
    mixins (C{twisted.internet._newtls}), and TLS starts as usual.
    """
    if not hasattr(transport, "startTLS"):
        transport.__class__ = _with_tls(type(transport))
    transport.startTLS(creator)


def _with_tls(cls: type) -> type:
    found = _WITH_TLS.get(cls)
    if found is None:
        from twisted.internet import _newtls, tcp
        from twisted.internet.interfaces import ITLSTransport
        from zope.interface import classImplements

        role = _newtls.ServerMixin if issubclass(cls, tcp.Server) else _newtls.ClientMixin
        found = type(cls.__name__, (role, _newtls.ConnectionMixin, cls), {})
        classImplements(found, ITLSTransport)  # type: ignore[misc]
        _WITH_TLS[cls] = found
    return found


# -- names made on first access ------------------------------------------------


def _make_eager_write() -> Callable[[Any, bytes], None]:
    import errno

    from twisted.internet import tcp

    retry = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS)
    plain = frozenset({tcp.Server, tcp.Client})

    def eager_write(transport: Any, data: bytes) -> None:
        """
        Write C{data} to C{transport}: straight to its socket when that is
        safe (a plain L{tcp.Connection}, connected, not TLS, nothing
        waiting in its buffers), else through C{transport.write}.
        """
        if (
            type(transport) in plain
            and transport.connected
            and not transport.disconnecting
            and not transport.TLS
            and not transport.dataBuffer
            and not transport._tempDataBuffer
        ):
            try:
                sent = transport.socket.send(data)
            except OSError as e:
                if e.errno not in retry:
                    # Let Twisted find and report the error on its own path.
                    transport.write(data)
                    return
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    return eager_write


def _haproxy(name: str) -> Any:
    from twisted.protocols.haproxy import _exceptions, _info, _v1parser, _v2parser, _wrapper

    where = {
        "InvalidProxyHeader": _exceptions,
        "ProxyInfo": _info,
        "V1Parser": _v1parser,
        "V2Parser": _v2parser,
        "HAProxyProtocolWrapper": _wrapper,
        "HAProxyWrappingFactory": _wrapper,
    }
    return getattr(where[name], name)


_HAPROXY_NAMES = frozenset(
    {
        "InvalidProxyHeader",
        "ProxyInfo",
        "V1Parser",
        "V2Parser",
        "HAProxyProtocolWrapper",
        "HAProxyWrappingFactory",
    }
)


def __getattr__(name: str) -> Any:
    """
    The names that need the TCP transport or the endpoints, made when first
    imported (so that importing this module does not import those).
    """
    if name == "eager_write":
        value: Any = _make_eager_write()
    elif name in _HAPROXY_NAMES:
        value = _haproxy(name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


# -- logging -------------------------------------------------------------------


def flatten_event(event: LogEvent) -> None:
    """
    Format each of the event's format fields into C{log_flattened}, as
    C{twisted.logger.eventAsJSON} does before it drops what JSON cannot
    hold.
    """
    flattenEvent(event)


def twistd_log_file(frame: Any) -> tuple[bool, str]:
    """
    C{(nodaemon, logfile)} of the twistd C{AppLogger} whose method runs in
    C{frame}, the frame that called a C{--logger} factory (twistd calls it
    from C{AppLogger.start}); C{(True, "")} (standard output)
    when that is not twistd.
    """
    from twisted.application.app import AppLogger

    caller = frame.f_locals.get("self") if frame is not None else None
    if not isinstance(caller, AppLogger):
        return True, ""
    # Twisted's non-Unix AppLogger never daemonises.
    nodaemon = bool(getattr(caller, "_nodaemon", True))
    return nodaemon, str(getattr(caller, "_logfilename", "") or "")


class _CachedFormatTime:
    """
    C{twisted.logger.formatTime}, remembering its last answer for the
    second it was asked about: the text log's time stamps have whole
    seconds, and Twisted works each one out afresh (a time zone object, a
    datetime, C{strftime}: measured 10 us alone, 30 to 45 us in py-spy's
    samples of the master under W1, whose two lines a message make it 3%
    of the master's CPU).  Formats with fractions of a second (C{%f}) are
    not cached.
    """

    def __init__(self, format_time: Callable[..., str]) -> None:
        self.format_time = format_time
        # (second, format) and its text, replaced as one: a line logged
        # from another thread never pairs one second's key with another's
        # text.
        self._last: tuple[tuple[int, str], str] | None = None

    def __call__(self, when: float | None, timeFormat: str | None = None, default: str = "-") -> str:
        if timeFormat is None:
            # formatTime's own default
            timeFormat = timeFormatRFC3339
        if when is None or "%f" in timeFormat:
            return self.format_time(when, timeFormat, default)
        key = (int(when // 1), timeFormat)
        last = self._last
        if last is None or last[0] != key:
            last = self._last = (key, self.format_time(when, timeFormat, default))
        return last[1]


def cache_log_times() -> None:
    """
    Make twistd's text log format each second's time stamp once
    (L{_CachedFormatTime}); the lines are the same.
    """
    from twisted.logger import _file

    if not isinstance(_file.formatTime, _CachedFormatTime):
        _file.formatTime = _CachedFormatTime(_file.formatTime)  # type: ignore[assignment]
