"""
How the server calls the plugin: L{call_callback} accepts whatever a
callback returns (a value, a L{Deferred} or a coroutine) in one place, and
L{SessionLogger} is the log every callback gets, whose events name the
session (and the envelope).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

#: The namespace of every event of an SMTP session, whichever part of the
#: server logs it (operators filter on it).
LOG_NAMESPACE = "relay.smtp.server"


class SessionLogger(Logger):
    """
    A L{Logger} whose events carry extra fields (C{session_id},
    C{envelope_id}).
    """

    def __init__(self, namespace: str, fields: dict[str, Any], source: object = None) -> None:
        super().__init__(namespace=namespace, source=source)
        self.fields = dict(fields)

    def emit(self, level: Any, format: str | None = None, **kwargs: Any) -> None:  # noqa: A002
        for key, value in self.fields.items():
            kwargs.setdefault(key, value)
        if format is not None:
            # The text log names the session (and envelope), Postfix-style, so
            # that grep finds a whole mail flow; the fields stay structured.
            ids = " ".join(
                f"{key}={{{key}}}" for key in ("session_id", "envelope_id") if key in kwargs
            )
            if ids:
                format = f"[{ids}] {format}"
        super().emit(level, format, **kwargs)


def call_callback(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    Call a plugin callback and normalize its result (a value, a
    L{Deferred} or a coroutine) to a L{Deferred}.
    """

    def normalize(result: Any) -> Any:
        if inspect.iscoroutine(result):
            return Deferred.fromCoroutine(result)
        return result

    return defer.maybeDeferred(fn, *args).addCallback(normalize)
