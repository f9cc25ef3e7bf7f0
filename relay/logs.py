"""
Logs for operators: one JSON object per line.

C{twistd --logger relay.logs.json_observer relay ...} replaces twistd's
text log with JSON Lines, the form that systemd's journal, container
runtimes and log shippers take without a parser of their own.  Each line
holds C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{system} (when the
event has one), C{message} (the formatted text), every structured field of
the event (C{session_id}, C{envelope_id}, C{entry_id}, C{event}, ...) and,
for a failure, its C{traceback}.

The same module writes the delivery lines (L{DELIVERY_FORMAT},
L{delivery_fields}): one per outcome of a delivery attempt, in the style of
Postfix's C{status=sent} lines, with the same as structured fields.

Written with the standard library's C{json} over C{twisted.logger}: the
JSON logging libraries serve the standard C{logging} module
(python-json-logger) or their own loggers (structlog), and twisted.logger
events are already structured; what is left is rendering values JSON
cannot hold without ever raising or losing the line.
"""

from __future__ import annotations

import json
import math
import re
import sys
from datetime import datetime, timezone
from typing import IO, Any

from constantly import NamedConstant
from twisted.logger import ILogObserver, LogEvent, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.app._compat import flatten_event, twistd_log_file
from relay.model.entry import Attempt, SpoolEntry

# The keys every line has (or may have); a structured field of the same name
# is kept with a trailing underscore (C{message_}).
FIXED_KEYS = ("time", "level", "namespace", "system", "message", "traceback")

# Nesting deeper than this is shown as text: a log line is no place for a
# deep structure, and a cycle must not recurse forever.
_MAX_DEPTH = 8


def _text(value: object) -> str:
    """
    C{value} as text, whatever it is: C{str}, else C{repr}, else its type.
    """
    try:
        return str(value)
    except Exception:
        pass
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def jsonable(value: object, depth: int = 0) -> Any:
    """
    C{value} as something C{json.dumps} takes: strings, finite numbers,
    booleans and C{None} as they are; lists, tuples and sets as lists;
    dicts with their keys as text; bytes decoded as UTF-8 (bad bytes as
    C{\\xNN}); anything else (an address, an exception, NaN) as its text.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _text(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, (list, tuple, set, frozenset)):
            return [jsonable(v, depth + 1) for v in value]
        if isinstance(value, dict):
            return {_text(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, NamedConstant):
        return value.name
    return _text(value)


def iso_time(when: object) -> str:
    """
    Seconds since the epoch as ISO 8601 in UTC, to the millisecond
    (C{2024-05-01T12:00:00.250Z}); a value that is no time, as its text.
    """
    try:
        stamp = datetime.fromtimestamp(float(when), timezone.utc)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return _text(when)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _legacy_mirrors(event: LogEvent) -> frozenset[str]:
    """
    The keys of C{event} that C{twisted.python.log}'s bridge wrote: it
    copies the C{log_*} keys into legacy ones (C{message}, C{time},
    C{system}, C{isError}, ...) for legacy observers, in the same event
    dict that this observer sees, or made the event from a legacy
    C{log.msg}.  Its mark is a C{message} tuple (a list once it came from a
    receiver as JSON) beside a C{time} equal to C{log_time}; fields of the
    event's own are everything else.
    """
    if not (
        isinstance(event.get("message"), (tuple, list))
        and "time" in event
        and event.get("time") == event.get("log_time")
    ):
        return frozenset()
    keys = {"message", "time", "isError", "printed", "format"}
    # A system other than the default is context that log_system may no
    # longer hold (the master names the receiver there): kept.
    if event.get("system") in ("-", event.get("log_system")):
        keys.add("system")
    if "log_failure" in event:
        keys.add("why")
        if isinstance(event.get("failure"), Failure):
            keys.add("failure")
    return frozenset(keys)


def _traceback(failure: object) -> str:
    get = getattr(failure, "getTraceback", None)
    if get is None:
        return _text(failure)
    try:
        return str(get())
    except Exception:
        return _text(failure)


def json_record(event: LogEvent) -> dict[str, Any]:
    """
    The JSON line's object for C{event}: the fixed keys (L{FIXED_KEYS}),
    then the event's structured fields in the order they were given.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": iso_time(event.get("log_time")),
        "level": level.name if isinstance(level, NamedConstant) else _text(level or "info"),
        "namespace": _text(event.get("log_namespace", "-")),
    }
    if event.get("log_system") is not None:
        record["system"] = _text(event["log_system"])
    text = formatEvent(event) if event.get("log_format") is not None else ""
    record["message"] = text
    mirrors = _legacy_mirrors(event)
    for key, value in event.items():
        key = _text(key)
        if key.startswith("log_") or key in mirrors:
            continue
        if key in FIXED_KEYS:
            key += "_"
        record[key] = jsonable(value)
    if "log_failure" in event:
        record["traceback"] = _traceback(event["log_failure"])
    return record


def json_line(event: LogEvent) -> str:
    """
    C{event} as one line of JSON (without the newline); never raises.  An
    event that cannot be rendered at all still gives a line, saying so.
    """
    try:
        return json.dumps(json_record(event), ensure_ascii=False, allow_nan=False)
    except Exception as e:
        return json.dumps(
            {
                "time": iso_time(event.get("log_time")),
                "level": "error",
                "namespace": "relay.logs",
                "message": f"unloggable event: {_text(e)}",
                "event_text": _text(event),
            },
            ensure_ascii=False,
            default=_text,
        )


def portable(event: LogEvent) -> LogEvent:
    """
    A copy of C{event} that C{twisted.logger.eventAsJSON} carries to another
    process whole: a field JSON cannot hold becomes its text (C{eventAsJSON}
    alone would make it C{{"unpersistable": true}}), and so does a failure's
    exception, so that its traceback ends with the message.  The message is
    flattened from the original values first, so that it reads as it would
    have here (C{{peer!r}} is the address's C{repr}, not its text's).

    Uses twisted.logger's private C{flattenEvent} (what C{eventAsJSON} does
    itself), through L{relay.app._compat}.
    """
    flat = dict(event)
    flatten_event(flat)
    copy: LogEvent = {}
    for key, value in flat.items():
        if key == "log_failure" and isinstance(value, Failure):
            copy[key] = _portable_failure(value)
        elif key == "log_flattened":
            copy[key] = jsonable(value)
        elif key.startswith("log_"):
            copy[key] = value
        else:
            copy[key] = jsonable(value)
    return copy


def _portable_failure(failure: Failure) -> Failure:
    state = failure.__getstate__()
    state["value"] = _text(failure.value)
    copy = Failure.__new__(Failure)
    copy.__setstate__(state)
    return copy


@implementer(ILogObserver)
class JSONLogObserver:
    """
    Write each event to C{out} as a line of JSON (L{json_line}), flushed at
    once so that a journal or a pipe sees it as it happens.

    Never raises: twisted.logger would report the error to the other
    observers, and under twistd there are none; a line that cannot be
    rendered is still written (L{json_line}).  Text that the stream cannot
    encode (an ASCII or Latin-1 terminal) is written with C{\\u} escapes
    instead.
    """

    def __init__(self, out: IO[Any]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        line = json_line(event) + "\n"
        try:
            try:
                self._write(line)
            except UnicodeEncodeError:
                self._write(json.dumps(json.loads(line)) + "\n")
            self._out.flush()
        except Exception:
            # Nowhere left to report it: stderr is redirected to this log.
            pass

    def _write(self, line: str) -> None:
        try:
            self._out.write(line)
        except TypeError:
            # A binary stream (twisted.python.logfile.LogFile is one).
            self._out.write(line.encode("utf-8"))


def json_observer() -> JSONLogObserver:
    """
    The factory for C{twistd --logger relay.logs.json_observer}: JSON lines
    where twistd would have written its text log.

    twistd calls it with no arguments, before it daemonises and before
    standard output is redirected to the log, and ignores C{--logfile} and
    C{--nodaemon} for a custom logger.  So this reads them from the twistd
    logger that called (L{relay.app._compat.twistd_log_file}) and chooses as twistd does:
    standard output with C{--nodaemon} (C{-n}) or C{--logfile -}, else the
    C{--logfile} file (C{twistd.log} by default), rotated on C{SIGUSR1}.  A
    daemon has no standard output (twistd points it at C{/dev/null}).
    """
    nodaemon, path = twistd_log_file(sys._getframe(1))
    if path == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return JSONLogObserver(sys.stdout)
    if nodaemon and not path:
        return JSONLogObserver(sys.stdout)
    return JSONLogObserver(_log_file(path or "twistd.log"))


def _log_file(path: str) -> Any:
    """
    The log file twistd itself would write for C{--logfile path}, rotated
    on C{SIGUSR1} as twistd does.
    """
    import signal

    from twisted.python.logfile import LogFile

    log_file = LogFile.fromFullPath(path)
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            # An entry point's handler, the reactor twistd runs: rotate
            # between events, not in the middle of a write.
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return log_file


# -- delivery lines ----------------------------------------------------------

DELIVERY_FORMAT = (
    "{entry_id}: to={to}, relay={relay}, delay={delay}, dsn={dsn}, status={outcome} ({reply})"
)
"""
The text of a delivery line, in the style of Postfix's C{smtp} lines, so
that tools written for those (C{pflogsumm}, a C{grep status=deferred})
read it.
"""

DELIVERY_TLS_FORMAT = (
    "{entry_id}: to={to}, relay={relay}, delay={delay}, dsn={dsn}, "
    "tls={tls_policy}/{tls_source}/{tls_result}, status={outcome} ({reply})"
)
"""
The text of a delivery line of an attempt with a TLS policy: C{tls=} says
the policy, where it came from and the result (C{tls=dane/dane/ok},
C{tls=mta-sts/mta-sts/certificate-host-mismatch}, C{tls=may/default/plain}).
"""


def delivery_format(fields: dict[str, Any]) -> str:
    """
    The format of the delivery line with C{fields} (L{delivery_fields}).
    """
    return DELIVERY_TLS_FORMAT if "tls_policy" in fields else DELIVERY_FORMAT

SENT = "sent"
DEFERRED = "deferred"
BOUNCED = "bounced"
EXPIRED = "expired"
OUTCOMES = (SENT, DEFERRED, BOUNCED, EXPIRED)

# A line names at most this many recipients and counts the rest; the
# structured C{recipients} field has them all.
LISTED_RECIPIENTS = 5

_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


def delivery_fields(entry: SpoolEntry, attempt: Attempt, outcome: str) -> dict[str, Any]:
    """
    The fields of the delivery line (L{DELIVERY_FORMAT}) for the
    recipients of one attempt that shared one outcome.

    @param outcome: one of L{OUTCOMES}: C{sent} (the hop took them),
        C{bounced} (refused for good), C{deferred} (failed for now: tried
        again later, or at the next hop), C{expired} (failed for now, and
        their retry intervals have run out).
    @return: C{event="delivery"}, C{outcome}, C{entry_id},
        C{envelope_id}, C{recipients} (all of them), C{nrcpt}, C{to} (the
        line's list), C{hop} (or C{None} when none was found), C{address}
        (C{ip:port} connected to, or C{None}), C{relay} (the line's
        C{host[ip]:port}), C{code} (or C{None} when no reply came),
        C{dsn} (the enhanced status), C{delay} (seconds since the entry
        was spooled) and C{reply} (the reply, or what went wrong); with a
        TLS policy, C{tls_policy}, C{tls_source}, C{tls_result} and
        C{tls_detail} (see L{relay.model.entry.TLSOutcome}; the line's
        format is then L{DELIVERY_TLS_FORMAT}, see L{delivery_format}).
    """
    recipients = list(attempt.recipients)
    to = ",".join(f"<{r}>" for r in recipients[:LISTED_RECIPIENTS])
    if len(recipients) > LISTED_RECIPIENTS:
        to += f" and {len(recipients) - LISTED_RECIPIENTS} more"
    address = attempt.address
    tls = getattr(attempt, "tls", None)
    fields: dict[str, Any] = {
        "event": "delivery",
        "outcome": outcome,
        "entry_id": entry.id,
        "envelope_id": entry.envelope_id,
        "recipients": recipients,
        "nrcpt": len(recipients),
        "to": to,
        "hop": attempt.hop or None,
        "address": _host_port(*address) if address is not None else None,
        "relay": _relay(attempt.hop, address),
        "code": attempt.code,
        "dsn": delivery_status(attempt, outcome),
        "delay": round(max(0.0, attempt.at - entry.created_at), 2),
        "reply": attempt.reply,
    }
    if tls is not None:
        fields.update(
            tls_policy=tls.policy, tls_source=tls.source, tls_result=tls.result,
            tls_detail=tls.detail,
        )  # fmt: skip
    return fields


def delivery_status(attempt: Attempt, outcome: str) -> str:
    """
    The RFC 3463 status of an attempt: the reply's enhanced status code,
    else one from the reply code's class; without a reply, Postfix's
    choice: C{4.4.1} (no connection), C{4.4.2} (the connection failed).
    """
    text = attempt.reply
    if attempt.code is not None and text.startswith(str(attempt.code)):
        text = text[3:].lstrip()
    m = _ENHANCED.match(text)
    if m is not None:
        return m.group(1)
    if attempt.code is not None:
        return f"{attempt.code // 100}.0.0"
    if outcome == BOUNCED:
        return "5.0.0"
    return "4.4.2" if attempt.address is not None else "4.4.1"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _relay(hop: str, address: tuple[str, int] | None) -> str:
    """
    Postfix's C{relay=}: C{host[ip]:port} once connected, the hop alone
    when no connection was made, C{none} when there was no hop to try.
    """
    if not hop:
        return "none"
    if address is None:
        return hop
    if hop.startswith("[") and "]" in hop:
        host = hop[1 : hop.index("]")]
    else:
        host = hop.rpartition(":")[0] or hop
    ip, port = address
    return f"{host}[{ip}]:{port}"
