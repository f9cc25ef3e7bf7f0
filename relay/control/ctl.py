"""
C{relayctl}: manage a running relay over its AMP control endpoint, or read
the spool straight from disk when no relay runs.

    relayctl [--control ENDPOINT | --spool DIR] COMMAND ...

Exit codes: 0 ok, 1 the operation failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Sequence, TextIO

from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, QUEUES, REMOVED, SpoolEntry
from relay.model.retry import parse_retry_intervals
from relay.spool.codec import entry_from_json, entry_to_json
from relay.spool.layout import NotASpool, SpoolLayout, control_in_spool, control_socket_path
from relay.spool.reader import read_queue

DEFAULT_SPOOL = "./spool"
DEFAULT_CONTROL = control_in_spool(DEFAULT_SPOOL)
LAST_ERROR_WIDTH = 40

OK = 0
FAILED = 1
USAGE = 2


class UsageError(Exception):
    """
    The command line makes no sense.
    """


class OperationFailed(Exception):
    """
    The operation failed; the message is for the operator.
    """


# -- reading the spool from disk ---------------------------------------------


def read_entries(
    spool_dir: str,
    queue: str,
    quarantine_dir: str | None = None,
    errors: list[tuple[str, str]] | None = None,
) -> list[SpoolEntry]:
    """
    The entries of C{queue} read from the spool directory, oldest first,
    with the disk spool's own reader.  Nothing is written; a missing queue
    directory is an empty queue.

    @param errors: if given, C{(path, error)} of unreadable files are
        appended to it; such files are left out.
    @raise OperationFailed: if C{spool_dir} is not a relay's spool.
    """
    layout = SpoolLayout(spool_dir, quarantine_dir)
    layout.queue_dir(queue)  # an unknown queue is a ValueError, spool or not
    try:
        layout.check()
    except NotASpool as e:
        raise OperationFailed(str(e)) from None
    entries, unreadable = read_queue(layout, queue)
    if errors is not None:
        errors.extend((path, str(error)) for path, error in unreadable)
    return entries


def count_entries(spool_dir: str, quarantine_dir: str | None = None) -> dict[str, int]:
    """
    How many entries each queue holds, read from disk.
    """
    return {queue: len(read_entries(spool_dir, queue, quarantine_dir)) for queue in QUEUES}


# -- formatting ----------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """
    A short human duration: C{45s}, C{5m}, C{2h}, C{3d} (rounded down).
    """
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def format_size(size: int) -> str:
    """
    A message size the way C{exim -bp} shows it: C{512}, C{1.5K}, C{2.0M}.
    """
    if size < 1024:
        return str(size)
    if size < 1024 * 1024:
        return f"{size / 1024:.1f}K"
    return f"{size / (1024 * 1024):.1f}M"


def _sender(entry: SpoolEntry) -> str:
    text = str(entry.sender)
    return f"<{text}>" if text else "<>"


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    return text[: width - 3] + "..."


def _next_attempt(entry: SpoolEntry, now: float) -> str:
    if entry.queue != ACTIVE:
        return "-"
    delta = entry.next_attempt_at - now
    if delta <= 0:
        return "now"
    return "in " + format_duration(delta)


TABLE_COLUMNS = ("ID", "SENDER", "RECIPIENTS", "AGE", "NEXT ATTEMPT", "NEXT HOP", "LAST ERROR")


def table_row(entry: SpoolEntry, now: float) -> tuple[str, ...]:
    """
    The cells of one entry's row in L{format_table}.
    """
    last_error = entry.last_error
    if last_error is None and entry.queue == QUARANTINE and entry.reason:
        last_error = entry.reason
    return (
        entry.id,
        _sender(entry),
        ",".join(str(r) for r in entry.recipients),
        format_duration(now - entry.created_at),
        _next_attempt(entry, now),
        entry.next_hop_choices[0] if entry.next_hop_choices else "MX",
        _truncate(last_error, LAST_ERROR_WIDTH) if last_error else "-",
    )


def format_table(entries: Sequence[SpoolEntry], now: float) -> str:
    """
    The entries as an aligned table with a header line.  The last error of
    a quarantined entry that was never tried is its quarantine reason.
    """
    rows = [TABLE_COLUMNS] + [table_row(e, now) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def format_exim(entries: Sequence[SpoolEntry], now: float) -> str:
    """
    The entries the way C{exim -bp} lists its queue: C{age size id <sender>}
    (with C{*** frozen ***} or the quarantine reason after it), then the
    recipients indented, and a blank line after each entry.
    """
    out = []
    for entry in entries:
        head = (
            f"{format_duration(now - entry.created_at):>3} "
            f"{format_size(entry.message_size):>5} {entry.id} {_sender(entry)}"
        )
        if entry.queue == FROZEN:
            head += " *** frozen ***"
        elif entry.queue == REMOVED:
            head += " *** removed ***"
        elif entry.queue == QUARANTINE:
            head += " *** quarantined ***"
            if entry.reason:
                head += f" ({_truncate(entry.reason, 60)})"
        out.append(head + "\n")
        for recipient in entry.recipients:
            out.append(f"          {recipient}\n")
        out.append("\n")
    return "".join(out)


def format_json(entries: Sequence[SpoolEntry]) -> str:
    """
    The entries as an indented JSON list of their metadata.
    """
    return json.dumps([entry_to_json(e) for e in entries], indent=2, sort_keys=True) + "\n"


def format_entries(entries: Sequence[SpoolEntry], fmt: str, now: float) -> str:
    if fmt == "json":
        return format_json(entries)
    if fmt == "exim":
        return format_exim(entries, now)
    return format_table(entries, now)


def format_count(counts: dict[str, int]) -> str:
    """
    One C{queue: n} line per queue.
    """
    return "".join(f"{queue}: {counts.get(queue, 0)}\n" for queue in QUEUES)


# -- talking to the server -------------------------------------------------------


def call_server(control: str, command: Any, **kwargs: Any) -> dict[str, Any]:
    """
    Connect to the AMP control endpoint C{control}, call C{command} with
    C{kwargs} and return its response.  The only networking in this module.

    @raise OperationFailed: on a connection failure or an AMP error.
    """
    from twisted.internet import defer
    from twisted.internet.endpoints import clientFromString, connectProtocol
    from twisted.internet.task import react
    from twisted.protocols import amp

    outcome: dict[str, Any] = {}

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        try:
            endpoint = clientFromString(reactor, control)
            proto = yield connectProtocol(endpoint, amp.AMP())
        except Exception as e:
            outcome["error"] = f"cannot connect to {control}: {e}"
            return
        try:
            outcome["result"] = yield proto.callRemote(command, **kwargs)
        except Exception as e:
            outcome["error"] = _describe(e)
        finally:
            proto.transport.loseConnection()

    try:
        react(run)
    except SystemExit:
        pass
    if "result" in outcome:
        return outcome["result"]
    raise OperationFailed(outcome.get("error", "the control connection failed"))


# overridable by tests
_call: Callable[..., dict[str, Any]] = call_server


def _remote(options: argparse.Namespace, name: str, **kwargs: Any) -> dict[str, Any]:
    from relay.control import rpc

    command = getattr(rpc, name)
    try:
        return _call(control_of(options), command, **kwargs)
    except OperationFailed:
        raise
    except Exception as e:  # an AMP error raised as its local class
        raise OperationFailed(_describe(e)) from None


def _describe(e: BaseException) -> str:
    name = e.__class__.__name__
    text = str(e)
    if name == "UnknownEntry":
        return f"unknown entry: {text}" if text else "unknown entry"
    if name == "BadArgument":
        return f"bad argument: {text}" if text else "bad argument"
    return f"{name}: {text}" if text else name


# -- the command line --------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    from relay import __version__

    parser = _Parser(prog="relayctl", description="Manage the relay's spool.")
    parser.add_argument("--version", action="version", version=f"relayctl (relay) {__version__}")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--control",
        metavar="ENDPOINT",
        help=f"the relay's AMP control endpoint (default: the socket in the spool, "
        f"{DEFAULT_CONTROL})",
    )
    where.add_argument(
        "--spool",
        metavar="DIR",
        help=f"the relay's spool (default {DEFAULT_SPOOL}): its control socket, or for "
        "status and count the directory itself when no relay runs on it",
    )
    parser.add_argument(
        "--quarantine",
        metavar="DIR",
        help="the quarantine directory, with --spool (default ./quarantine "
        "when the spool is ./spool, else DIR/quarantine)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    status = sub.add_parser("status", help="list the entries of a queue")
    status.add_argument("--queue", choices=QUEUES, default=ACTIVE)
    status.add_argument("--format", choices=("table", "exim", "json"), default="table")

    sub.add_parser("count", help="how many entries each queue holds")

    freeze = sub.add_parser("freeze", help="freeze entries")
    freeze.add_argument("ids", nargs="+", metavar="ID")

    send = sub.add_parser("send", help="make entries due now (unfreezing them)")
    send.add_argument("--all", action="store_true", help="every active and frozen entry")
    send.add_argument("--frozen", action="store_true", help="every frozen entry")
    send.add_argument("--retry-intervals", metavar="LIST", help="e.g. 1m,5m,1h")
    send.add_argument("ids", nargs="*", metavar="ID")

    send_now = sub.add_parser("send-now", help="try entries now")
    send_now.add_argument("ids", nargs="+", metavar="ID")

    remove = sub.add_parser("remove", help="move entries to the removed queue")
    remove.add_argument("ids", nargs="+", metavar="ID")

    recover = sub.add_parser("recover", help="bring removed or quarantined entries back, frozen")
    source = recover.add_mutually_exclusive_group(required=True)
    source.add_argument("--removed", action="store_true")
    source.add_argument("--quarantined", action="store_true")
    recover.add_argument("ids", nargs="+", metavar="ID")

    jobs = sub.add_parser("set-max-send-jobs", help="set how many deliveries run at once")
    jobs.add_argument("n", type=int, metavar="N")

    rpc_parser = sub.add_parser("rpc", help="call a plugin's AMP command")
    rpc_parser.add_argument("rpc_command", metavar="COMMAND", help="e.g. mypkg.rpcs.Ping")
    rpc_parser.add_argument("rpc_args", nargs="*", metavar="NAME=VALUE")

    sub.add_parser("events", help="follow the live event stream until interrupted")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """
    Parse and check the command line.

    @raise UsageError: if it makes no sense.
    """
    options = build_parser().parse_args(list(argv))
    if options.command == "send":
        chosen = sum(1 for x in (options.all, options.frozen, bool(options.ids)) if x)
        if chosen != 1:
            raise UsageError("relayctl send: error: give exactly one of --all, --frozen or IDs")
        options.intervals = None
        if options.retry_intervals is not None:
            try:
                options.intervals = list(parse_retry_intervals(options.retry_intervals))
            except ValueError as e:
                raise UsageError(f"relayctl send: error: --retry-intervals: {e}") from None
    if options.command == "set-max-send-jobs" and options.n < 1:
        raise UsageError("relayctl set-max-send-jobs: error: N must be at least 1")
    return options


def control_of(options: argparse.Namespace) -> str:
    """
    The control endpoint to talk to: C{--control}, else the socket in the
    spool (C{--spool}, or the default one).
    """
    if options.control is not None:
        return str(options.control)
    return control_in_spool(options.spool if options.spool is not None else DEFAULT_SPOOL)


def _no_relay_on(spool: str) -> bool:
    """
    Does no relay answer on the control socket in C{spool}?  True when the
    socket is missing or refuses connections (left behind by a relay that
    was killed).
    """
    import socket

    path = control_socket_path(spool)
    if not os.path.exists(path):
        return True
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False  # let the real call say what is wrong
    finally:
        probe.close()
    return False


def _local_spool(options: argparse.Namespace) -> tuple[str, str | None] | None:
    """
    C{(spool dir, quarantine dir)} when status and count read from disk:
    no C{--control} was given and no relay answers in the spool.
    """
    if options.control is not None:
        return None
    spool = options.spool if options.spool is not None else DEFAULT_SPOOL
    if not _no_relay_on(spool):
        return None
    quarantine = options.quarantine
    if quarantine is None and os.path.normpath(spool) == os.path.normpath(DEFAULT_SPOOL):
        quarantine = "./quarantine"
    return spool, quarantine


def run(options: argparse.Namespace, out: TextIO, now: float, err: TextIO | None = None) -> int:
    """
    Carry out the parsed command, writing its output to C{out}.

    @raise OperationFailed: if it fails.
    """
    command = options.command
    local = _local_spool(options) if command in ("status", "count") else None
    if command == "status":
        if local is not None:
            errors: list[tuple[str, str]] = []
            entries = read_entries(local[0], options.queue, local[1], errors)
            for path, error in errors:
                (err or sys.stderr).write(f"relayctl: unreadable entry {path}: {error}\n")
        else:
            result = _remote(options, "Status", queue=options.queue)
            entries = [
                entry_from_json(d, queue=d.get("queue")) for d in json.loads(result["entries"])
            ]
        out.write(format_entries(entries, options.format, now))
    elif command == "count":
        if local is not None:
            counts = count_entries(*local)
        else:
            counts = dict(_remote(options, "Count"))
        out.write(format_count(counts))
    elif command in ("freeze", "send-now", "remove"):
        name = {"freeze": "Freeze", "send-now": "SendNow", "remove": "Remove"}[command]
        result = _remote(options, name, ids=list(options.ids))
        _print_done(out, command, result["done"])
    elif command == "send":
        kwargs: dict[str, Any] = dict(ids=list(options.ids), all=options.all, frozen=options.frozen)
        if options.intervals is not None:
            kwargs["retry_intervals"] = options.intervals
        result = _remote(options, "SendFrozen", **kwargs)
        _print_done(out, command, result["done"])
    elif command == "recover":
        source = REMOVED if options.removed else QUARANTINE
        result = _remote(options, "Recover", ids=list(options.ids), source=source)
        _print_done(out, command, result["done"])
    elif command == "set-max-send-jobs":
        result = _remote(options, "SetMaxSendJobs", n=options.n)
        out.write(f"max send jobs: {options.n} (was {result['previous']})\n")
    elif command == "rpc":
        return _rpc(options, out, err or sys.stderr)
    elif command == "events":
        return _events(options, out)
    return OK


def _rpc(options: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    C{relayctl rpc COMMAND NAME=VALUE ...}: call a plugin's AMP command
    (named by its dotted name) and print its response as JSON.
    """
    from twisted.protocols import amp
    from twisted.python.reflect import namedAny

    def usage(message: str) -> int:
        err.write(f"relayctl rpc: error: {message}\n")
        return USAGE

    try:
        command = namedAny(options.rpc_command)
    except Exception as e:
        return usage(f"cannot find command {options.rpc_command!r}: {e}")
    if not (isinstance(command, type) and issubclass(command, amp.Command)):
        return usage(f"{options.rpc_command} is not an AMP Command class")
    types = {(n.decode() if isinstance(n, bytes) else n): a for n, a in command.arguments}
    kwargs: dict[str, Any] = {}
    for item in options.rpc_args:
        name, sep, value = item.partition("=")
        if not sep:
            return usage(f"expected NAME=VALUE, got {item!r}")
        argument = types.get(name)
        if argument is None:
            known = ", ".join(sorted(types)) or "none"
            return usage(f"{options.rpc_command} has no argument {name!r} (it has: {known})")
        try:
            if isinstance(argument, amp.Boolean):
                flags = {"true": True, "1": True, "yes": True}
                flags.update({"false": False, "0": False, "no": False})
                kwargs[name] = flags[value.lower()]
            elif isinstance(argument, (amp.Integer, amp.Float, amp.Unicode, amp.String)):
                kwargs[name] = argument.fromString(value.encode("utf-8"))
            else:
                return usage(f"argument {name!r}: unsupported type {type(argument).__name__}")
        except (KeyError, ValueError) as e:
            return usage(f"argument {name!r}: bad value {value!r} ({e!r})")
    try:
        result = _call(control_of(options), command, **kwargs)
    except OperationFailed:
        raise
    except Exception as e:  # an AMP error raised as its local class
        raise OperationFailed(_describe(e)) from None

    def plain(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        if isinstance(value, dict):
            return {plain(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    out.write(json.dumps(plain(dict(result)), sort_keys=True, default=str) + "\n")
    return OK


def _events(options: argparse.Namespace, out: TextIO) -> int:
    """
    C{relayctl events}: subscribe to the live event stream and print each
    event as one line (L{relay.control.events.format_event}) until interrupted or
    the connection closes.
    """
    from twisted.internet import defer
    from twisted.internet.endpoints import clientFromString, connectProtocol
    from twisted.internet.task import react
    from twisted.protocols import amp

    from relay.control import rpc
    from relay.control.events import format_event

    control = control_of(options)
    outcome: dict[str, str] = {}

    class Follower(amp.AMP):
        def __init__(self) -> None:
            amp.AMP.__init__(self)
            self.closed: defer.Deferred[None] = defer.Deferred()

        @rpc.Event.responder
        def event(
            self, kind: str, at: float, seq: int, fields: str, entry_id: str | None = None
        ) -> dict[str, Any]:
            out.write(format_event(kind, entry_id, at, fields) + "\n")
            out.flush()
            return {}

        def connectionLost(self, reason: Any = None) -> None:  # type: ignore[override]
            amp.AMP.connectionLost(self, reason)
            if not self.closed.called:
                self.closed.callback(None)

    @defer.inlineCallbacks
    def follow(reactor: Any) -> Any:
        try:
            proto = yield connectProtocol(clientFromString(reactor, control), Follower())
        except Exception as e:
            outcome["error"] = f"cannot connect to {control}: {e}"
            return
        try:
            yield proto.callRemote(rpc.Subscribe)
        except Exception as e:
            outcome["error"] = _describe(e)
            proto.transport.loseConnection()
            return
        yield proto.closed

    try:
        react(follow)
    except (SystemExit, KeyboardInterrupt):
        pass
    if "error" in outcome:
        raise OperationFailed(outcome["error"])
    return OK


def _print_done(out: TextIO, command: str, done: Sequence[str]) -> None:
    for entry_id in done:
        out.write(f"{command}: {entry_id}\n")
    if not done:
        out.write(f"{command}: nothing to do\n")


def main(
    argv: Sequence[str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    now: float | None = None,
) -> int:
    """
    The C{relayctl} console script.

    @return: the exit code: 0 ok, 1 the operation failed, 2 usage error.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if argv is None:
        argv = sys.argv[1:]
    try:
        options = parse_args(argv)
    except UsageError as e:
        err.write(f"{e}\n")
        return USAGE
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, int) else USAGE
    try:
        return run(options, out, time.time() if now is None else now, err)
    except OperationFailed as e:
        err.write(f"relayctl {options.command}: {e}\n")
        return FAILED
    except OSError as e:
        err.write(f"relayctl {options.command}: {e}\n")
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
