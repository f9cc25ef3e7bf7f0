"""
C{relayctl}: manage a running relay over its AMP control endpoint, or read
the spool straight from disk when no relay runs.

    relayctl [--control ENDPOINT | --spool DIR] COMMAND ...

Listings stream: C{status} prints its first page as soon as it comes,
from the relay (page by page, see L{relay.control.rpc}) or from the
spool directory (in the order the directory gives, each page in
creation order); C{count} without filters reads names only.  The filters
(C{--sender}, C{--recipient}, C{--next-hop}, C{--younger}, C{--older},
C{--queue}) are combined with AND and evaluated by the relay, or here
on a spool no relay runs on (L{relay.control.filters}).

C{dkim-record} prints the DNS record of a DKIM key: of the keys file
given with C{--dkim-keys} (no relay needed, L{relay.dkim.record}), else
of the keys the running relay signs with.

Exit codes: 0 ok, 1 the operation failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence, TextIO

from relay.control.filters import EntryFilter
from relay.control.formats import (
    END_MARK,
    FORMATS,
    HEADERS_MARK,
    LAST_ERROR_WIDTH,
    MESSAGE_MARK,
    TABLE_COLUMNS,
    EntryWriter,
    entry_writer,
    format_count,
    format_duration,
    format_entries,
    format_exim,
    format_json,
    format_show,
    format_size,
    format_suspended,
    format_table,
    format_wait,
    format_waiting,
    table_row,
)
from relay.control.summary import BY, BY_DOMAIN, QueueShape, format_summary
from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, QUEUES, REMOVED, SpoolEntry
from relay.model.message import MAX_HEADER_BYTES, header_end
from relay.model.retry import parse_interval, parse_retry_intervals
from relay.spool.codec import entry_from_json
from relay.spool.layout import NotASpool, SpoolLayout, control_in_spool, control_socket_path
from relay.spool.reader import (
    EntryPage,
    QueueScanner,
    count_queue,
    find_entry,
    read_message_chunk,
    read_queue,
)

__all__ = [
    "LAST_ERROR_WIDTH",
    "TABLE_COLUMNS",
    "format_count",
    "format_duration",
    "format_entries",
    "format_exim",
    "format_json",
    "format_show",
    "format_size",
    "format_table",
    "main",
    "table_row",
]

DEFAULT_SPOOL = "./spool"
DEFAULT_CONTROL = control_in_spool(DEFAULT_SPOOL)
#: rows of C{summary} by default
DEFAULT_TOP = 20
#: bytes read from a message file at a time (C{show} from disk)
READ_CHUNK = 64 * 1024

OK = 0
FAILED = 1
USAGE = 2

#: the commands that change entries, and their AMP commands
ACTIONS = {"freeze": "Freeze", "send": "SendFrozen", "send-now": "SendNow", "remove": "Remove"}
#: the commands that read the spool directory when no relay answers
READERS = ("status", "count", "summary", "show")


class UsageError(Exception):
    """
    The command line makes no sense.
    """


class OperationFailed(Exception):
    """
    The operation failed; the message is for the operator.
    """


# -- reading the spool from disk ---------------------------------------------


def _layout(spool_dir: str, quarantine_dir: str | None, queue: str | None = None) -> SpoolLayout:
    layout = SpoolLayout(spool_dir, quarantine_dir)
    if queue is not None:
        layout.queue_dir(queue)  # an unknown queue is a ValueError, spool or not
    try:
        layout.check()
    except NotASpool as e:
        raise OperationFailed(str(e)) from None
    return layout


def read_entries(
    spool_dir: str,
    queue: str,
    quarantine_dir: str | None = None,
    errors: list[tuple[str, str]] | None = None,
) -> list[SpoolEntry]:
    """
    The entries of C{queue} read from the spool directory, oldest first,
    with the disk spool's own reader: all of them in memory, for small
    queues (listings use L{scan_pages}).  Nothing is written; a missing
    queue directory is an empty queue.

    @param errors: if given, C{(path, error)} of unreadable files are
        appended to it; such files are left out.
    @raise OperationFailed: if C{spool_dir} is not a relay's spool.
    """
    layout = _layout(spool_dir, quarantine_dir, queue)
    entries, unreadable = read_queue(layout, queue)
    if errors is not None:
        errors.extend((path, str(error)) for path, error in unreadable)
    return entries


def scan_pages(
    spool_dir: str,
    queue: str,
    quarantine_dir: str | None = None,
    select: EntryFilter | None = None,
    parse: bool = True,
    page_size: int = 200,
) -> Iterator[EntryPage]:
    """
    The pages of C{queue} in the spool directory that C{select} admits
    (L{QueueScanner}: one page in memory at a time).

    @raise OperationFailed: if C{spool_dir} is not a relay's spool.
    """
    layout = _layout(spool_dir, quarantine_dir, queue)
    scanner = QueueScanner(
        layout, queue, None if select is None or select.empty else select, parse, page_size
    )
    try:
        while True:
            page = scanner.next_page()
            yield page
            if page.done:
                return
    finally:
        scanner.close()


def count_entries(
    spool_dir: str,
    quarantine_dir: str | None = None,
    select: EntryFilter | None = None,
    queues: Sequence[str] = QUEUES,
) -> dict[str, int]:
    """
    How many entries each queue holds, read from disk: from the names of
    the files alone unless a filter needs the entries.
    """
    layout = _layout(spool_dir, quarantine_dir)
    counts = {}
    for queue in queues:
        if select is None or select.empty:
            counts[queue] = count_queue(layout, queue).entries
        else:
            counts[queue] = sum(
                len(page.ids)
                for page in scan_pages(spool_dir, queue, quarantine_dir, select, False, 1000)
            )
    return counts


def read_head(layout: SpoolLayout, entry_id: str) -> bytes:
    """
    The header section of an entry's message as stored (empty when the
    message is gone).
    """
    head = b""
    while len(head) < MAX_HEADER_BYTES:
        try:
            chunk = read_message_chunk(layout, entry_id, len(head), READ_CHUNK)
        except KeyError:
            return b""
        if not chunk:
            break
        head += chunk
        end = header_end(head)
        if end >= 0:
            return head[:end]
    return head[:MAX_HEADER_BYTES]


# -- talking to the server -------------------------------------------------------


def call_server(control: str, command: Any, client: Any = None, **kwargs: Any) -> dict[str, Any]:
    """
    Connect to the AMP control endpoint C{control}, call C{command} with
    C{kwargs} (pages of a streaming command go to C{client}, a
    L{relay.control.client.ControlClient}) and return its response.

    @raise OperationFailed: on a connection failure or an AMP error.
    """
    from relay.control.client import CallFailed
    from relay.control.client import call_server as call

    try:
        return call(control, command, client, **kwargs)
    except CallFailed as e:
        if isinstance(e.cause, OSError):
            raise e.cause from None  # e.g. a broken pipe on stdout
        raise OperationFailed(_describe(e.cause) if e.cause is not None else str(e)) from None


# overridable by tests
_call: Callable[..., dict[str, Any]] = call_server


def _remote(options: argparse.Namespace, name: str, **kwargs: Any) -> dict[str, Any]:
    from relay.control import rpc

    command = getattr(rpc, name)
    try:
        return _call(control_of(options), command, **kwargs)
    except (OperationFailed, OSError):
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


def _add_filters(parser: argparse.ArgumentParser, next_hop: bool = True) -> None:
    """
    The filters, on a command that takes them.  On C{send}, C{--next-hop}
    is where the entries go from now on, so the filter by next hop is
    spelled C{--via} there (and may be everywhere).
    """
    group = parser.add_argument_group("filters (combined with AND)")
    group.add_argument("--sender", metavar="ADDR|@DOMAIN", help="the sender (<> for the null sender)")
    group.add_argument(
        "--recipient", metavar="ADDR|@DOMAIN", help="a recipient still held (pending or failed)"
    )
    hop_help = (
        "a next hop of the entry; an entry on the default route matches the relay's "
        "--smarthost, or 'default'"
    )
    if next_hop:
        group.add_argument("--next-hop", "--via", dest="via", metavar="HOST[:PORT]", help=hop_help)
    else:
        group.add_argument("--via", dest="via", metavar="HOST[:PORT]", help=hop_help)
    group.add_argument("--younger", metavar="DURATION", help="created less than DURATION ago (e.g. 30m)")
    group.add_argument("--older", metavar="DURATION", help="created at least DURATION ago (e.g. 2h)")


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
        "status, count, summary and show the directory itself when no relay runs on it",
    )
    parser.add_argument(
        "--quarantine",
        metavar="DIR",
        help="the quarantine directory, with --spool (default ./quarantine "
        "when the spool is ./spool, else DIR/quarantine)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    status = sub.add_parser(
        "status", help="list entries (streams)", description="List the entries of a queue that "
        "the filters admit, as they come (each page in creation order)."
    )  # fmt: skip
    status.add_argument("--queue", choices=QUEUES, default=ACTIVE, help="default: active")
    status.add_argument(
        "--format", choices=FORMATS, default="table",
        help="table (default), exim (like exim -bp), json (JSON Lines, like postqueue -j), "
        "ids (one id per line)",
    )  # fmt: skip
    _add_filters(status)

    count = sub.add_parser(
        "count", help="how many entries each queue holds",
        description="How many entries each queue holds (that the filters admit); without "
        "filters only the names of the files are read.",
    )  # fmt: skip
    count.add_argument("--queue", choices=QUEUES, help="only this queue")
    _add_filters(count)

    summary = sub.add_parser(
        "summary", help="entries per domain and age (like qshape)",
        description="Entries per recipient domain (or next hop) in age buckets, in minutes: "
        "T is the row's total; an entry with recipients in several domains counts in each row "
        "and once in TOTAL.",
    )  # fmt: skip
    summary.add_argument("--by", choices=BY, default=BY_DOMAIN, help="default: domain")
    summary.add_argument(
        "--top", type=int, default=DEFAULT_TOP, metavar="N",
        help=f"the N rows with the most entries (default {DEFAULT_TOP}; 0: all)",
    )  # fmt: skip
    summary.add_argument("--queue", choices=QUEUES, default=ACTIVE, help="default: active")
    _add_filters(summary)

    show = sub.add_parser(
        "show", help="one entry and its message headers (like postcat -q)",
        description="One entry: sender, recipients and their state, next hops, schedule, "
        "attempts; then its message headers, or with --body the whole message.",
    )  # fmt: skip
    show.add_argument("id", metavar="ID")
    show.add_argument("--body", action="store_true", help="the whole message, not only its headers")

    selection = "IDs, --all or at least one filter"
    freeze = sub.add_parser(
        "freeze", help="freeze entries", description=f"Freeze active entries: {selection}."
    )
    freeze.add_argument("--all", action="store_true", help="every active entry")
    freeze.add_argument("--queue", choices=QUEUES, help="only the entries of this queue (a filter)")
    _add_filters(freeze)
    freeze.add_argument("ids", nargs="*", metavar="ID")

    send = sub.add_parser(
        "send", help="make entries due now (unfreezing them)",
        description=f"Make active and frozen entries due now: {selection} (or --frozen). "
        "Settled entries (no pending recipient) are left alone unless --retry-failed.",
    )  # fmt: skip
    send.add_argument("--all", action="store_true", help="every active and frozen entry")
    send.add_argument("--frozen", action="store_true", help="every frozen entry")
    send.add_argument("--queue", choices=QUEUES, help="only the entries of this queue (a filter)")
    send.add_argument("--retry-intervals", metavar="LIST", help="a new schedule, e.g. 1m,5m,1h")
    send.add_argument(
        "--next-hop", dest="reroute", metavar="HOST[:PORT]",
        help="reroute: their only next hop from now on",
    )  # fmt: skip
    send.add_argument(
        "--retry-failed", action="store_true",
        help="put failed recipients back to pending (bounced again only if they fail again)",
    )  # fmt: skip
    _add_filters(send, next_hop=False)
    send.add_argument("ids", nargs="*", metavar="ID")

    send_now = sub.add_parser(
        "send-now", help="try entries now", description=f"Try entries now: {selection}."
    )
    send_now.add_argument("--all", action="store_true", help="every active and frozen entry")
    send_now.add_argument("--queue", choices=QUEUES, help="only the entries of this queue (a filter)")
    send_now.add_argument("--retry-failed", action="store_true",
                          help="put failed recipients back to pending")  # fmt: skip
    _add_filters(send_now)
    send_now.add_argument("ids", nargs="*", metavar="ID")

    remove = sub.add_parser(
        "remove", help="move entries to the removed queue",
        description=f"Move entries to the removed queue (recoverable): {selection}; "
        "--all is every active and frozen entry, --queue quarantine the quarantined ones.",
    )  # fmt: skip
    remove.add_argument("--all", action="store_true", help="every active and frozen entry")
    remove.add_argument("--queue", choices=QUEUES, help="only the entries of this queue (a filter)")
    _add_filters(remove)
    remove.add_argument("ids", nargs="*", metavar="ID")

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

    from relay.dkim.record import add_dkim_record_parser

    add_dkim_record_parser(sub)

    suspend = sub.add_parser(
        "suspend", help="hold mail to a domain or provider",
        description="Hold mail to a recipient domain, or to a provider of the shaping file, "
        "until resumed or for a while; the waiting uses up no retry intervals.",
    )  # fmt: skip
    suspend.add_argument("name", metavar="DOMAIN|PROVIDER")
    suspend.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 30m, 2h (default: until resumed)")
    suspend.add_argument("--reason", metavar="TEXT", help="shown by 'relayctl suspended'")
    resume = sub.add_parser("resume", help="end the suspension of a domain or provider")
    resume.add_argument("name", metavar="DOMAIN|PROVIDER")
    sub.add_parser("suspended", help="the suspended destinations, with their reasons and ends")
    return parser


FILTER_OPTIONS = ("sender", "recipient", "via", "younger", "older")


def _filters(options: argparse.Namespace) -> dict[str, Any]:
    """
    The filters given, as the control commands take them (durations in
    seconds).
    """
    wire: dict[str, Any] = {}
    for name in FILTER_OPTIONS:
        value = getattr(options, name, None)
        if value is None:
            continue
        wire[name] = parse_interval(value) if name in ("younger", "older") else value
    return wire


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """
    Parse and check the command line.

    @raise UsageError: if it makes no sense.
    """
    options = build_parser().parse_args(list(argv))
    command = options.command
    if hasattr(options, "sender"):
        try:
            options.filters = _filters(options)
            EntryFilter.from_wire(0.0, None, options.filters)
        except ValueError as e:
            raise UsageError(f"relayctl {command}: error: {e}") from None
    if command in ACTIONS:
        frozen = bool(getattr(options, "frozen", False))
        if options.all and (options.ids or frozen):
            raise UsageError(f"relayctl {command}: error: give --all, --frozen or IDs, not several")
        if frozen and options.ids:
            raise UsageError(f"relayctl {command}: error: give --frozen or IDs, not both")
        if frozen and options.queue not in (None, FROZEN):
            raise UsageError(f"relayctl {command}: error: --frozen is --queue frozen")
        if not (options.ids or options.all or frozen or options.filters or options.queue):
            raise UsageError(f"relayctl {command}: error: give IDs, --all or a filter")
    if command == "send":
        options.intervals = None
        if options.retry_intervals is not None:
            try:
                options.intervals = list(parse_retry_intervals(options.retry_intervals))
            except ValueError as e:
                raise UsageError(f"relayctl send: error: --retry-intervals: {e}") from None
        if options.reroute is not None:
            from relay.delivery.nexthop import parse_hop

            try:
                parse_hop(options.reroute)
            except ValueError:
                raise UsageError(
                    f"relayctl send: error: --next-hop: expected HOST[:PORT], not {options.reroute!r}"
                ) from None
    if command == "summary" and options.top < 0:
        raise UsageError("relayctl summary: error: --top N must not be negative")
    if command == "suspend" and options.duration is not None:
        try:
            options.seconds = parse_interval(options.duration)
        except ValueError as e:
            raise UsageError(f"relayctl suspend: error: --for: {e}") from None
    if command == "set-max-send-jobs" and options.n < 1:
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
    C{(spool dir, quarantine dir)} when a reading command reads from disk:
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


def _local_filter(options: argparse.Namespace, now: float) -> EntryFilter:
    # No relay runs: where its default route goes is not known, so only
    # --next-hop default matches the entries on it.
    return EntryFilter.from_wire(now, None, options.filters)


def _write_bytes(out: TextIO, data: bytes) -> None:
    """
    Message bytes as stored: raw on a real stream, decoded (bad bytes
    replaced) on a text-only one.
    """
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        out.flush()
        buffer.write(data)
        buffer.flush()
    else:
        out.write(data.decode("utf-8", "replace"))


def _report_unreadable(err: TextIO, lines: str | None) -> None:
    for line in (lines or "").splitlines():
        err.write(f"relayctl: unreadable entry {line}\n")


def run(options: argparse.Namespace, out: TextIO, now: float, err: TextIO | None = None) -> int:
    """
    Carry out the parsed command, writing its output to C{out}.

    @raise OperationFailed: if it fails.
    """
    err = err or sys.stderr
    command = options.command
    local = _local_spool(options) if command in READERS else None
    if command == "status":
        _status(options, out, err, now, local)
    elif command == "count":
        _count(options, out, now, local)
    elif command == "summary":
        _summary(options, out, err, now, local)
    elif command == "show":
        _show(options, out, now, local)
    elif command in ACTIONS:
        _act(options, out)
    elif command == "recover":
        source = REMOVED if options.removed else QUARANTINE
        result = _remote(options, "Recover", ids=list(options.ids), source=source)
        _print_done(out, command, result["done"])
    elif command == "set-max-send-jobs":
        result = _remote(options, "SetMaxSendJobs", n=options.n)
        out.write(f"max send jobs: {options.n} (was {result['previous']})\n")
    elif command == "rpc":
        return _rpc(options, out, err)
    elif command == "events":
        return _events(options, out)
    elif command == "dkim-record":
        _dkim_record(options, out)
    elif command in ("suspend", "resume", "suspended"):
        _suspensions(options, out, now)
    return OK


def _dkim_record(options: argparse.Namespace, out: TextIO) -> None:
    """
    Print the DNS record of a DKIM key (L{relay.dkim.record}): from the
    keys file of C{--dkim-keys} (no relay is asked), else the running
    relay's (its keys as last loaded).
    """
    from relay.dkim import DkimKeysError
    from relay.dkim.record import dkim_record

    if options.dkim_keys is None:
        answer = _remote(options, "DkimRecord", domain=options.domain, selector=options.selector)
        out.write(answer["value" if options.value else "zone"] + "\n")
        return
    try:
        out.write(dkim_record(options))
    except DkimKeysError as e:
        raise OperationFailed(str(e)) from None


def _suspensions(options: argparse.Namespace, out: TextIO, now: float) -> None:
    """
    C{suspend}, C{resume}, C{suspended}.
    """
    if options.command == "suspended":
        result = _remote(options, "Suspended")
        out.write(format_suspended(json.loads(result["suspensions"]), now))
        return
    if options.command == "resume":
        result = _remote(options, "Resume", destination=options.name)
        if not result["resumed"]:
            raise OperationFailed(f"{options.name} is not suspended")
        out.write(f"resumed {options.name} ({result['waiting']} entries waiting for it)\n")
        return
    kwargs: dict[str, Any] = {"destination": options.name}
    if options.duration is not None:
        kwargs["seconds"] = options.seconds
    if options.reason:
        kwargs["reason"] = options.reason
    result = _remote(options, "Suspend", **kwargs)
    what = "provider" if result["provider"] else "domain"
    # The duration asked, not the answer's end less our clock: the relay's
    # clock is the one that counts.
    end = "until resumed" if result.get("until") is None else f"for {format_duration(options.seconds)}"
    out.write(f"suspended {what} {options.name} {end}\n")


def _status(
    options: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    now: float,
    local: tuple[str, str | None] | None,
) -> None:
    """
    C{status}: each page printed as it comes.
    """
    writer: EntryWriter = entry_writer(options.format, out, now)
    ids_only = options.format == "ids"
    if local is not None:
        select = _local_filter(options, now)
        for page in scan_pages(local[0], options.queue, local[1], select, parse=not ids_only):
            for path, error in page.unreadable:
                err.write(f"relayctl: unreadable entry {path}: {error}\n")
            if ids_only:
                writer.write_ids(page.ids)
            else:
                writer.write(page.entries)
    else:
        from relay.control.client import ControlClient

        def take(entries: str | None, ids: str | None, unreadable: str | None) -> None:
            _report_unreadable(err, unreadable)
            if ids is not None:
                writer.write_ids(ids.splitlines())
            elif entries:
                writer.write_json_lines(entries)

        kwargs: dict[str, Any] = dict(options.filters, queue=options.queue)
        if ids_only:
            kwargs["ids_only"] = True
        _remote(options, "Status", client=ControlClient(on_entries=take), **kwargs)
    writer.finish()


def _count(
    options: argparse.Namespace, out: TextIO, now: float, local: tuple[str, str | None] | None
) -> None:
    queues = (options.queue,) if options.queue else QUEUES
    if local is not None:
        counts = count_entries(local[0], local[1], _local_filter(options, now), queues)
    else:
        kwargs = dict(options.filters)
        if options.queue:
            kwargs["queue"] = options.queue
        counts = {q: n for q, n in _remote(options, "Count", **kwargs).items() if n is not None}
    out.write(format_count(counts, queues))


def _summary(
    options: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    now: float,
    local: tuple[str, str | None] | None,
) -> None:
    waiting = None
    if local is not None:
        shape = QueueShape(now, options.by)
        select = _local_filter(options, now)
        for page in scan_pages(local[0], options.queue, local[1], select, page_size=1000):
            for path, error in page.unreadable:
                err.write(f"relayctl: unreadable entry {path}: {error}\n")
            shape.add_all(page.entries)
        rows, total = shape.top(options.top), shape.total
    else:
        result = _remote(
            options, "Summary", by=options.by, top=options.top, queue=options.queue,
            **options.filters,
        )  # fmt: skip
        rows = [(str(name), list(counts)) for name, counts in json.loads(result["rows"])]
        total = list(json.loads(result["total"]))
        waiting = result.get("waiting")
        if result.get("unreadable"):
            err.write(f"relayctl: {result['unreadable']} unreadable entries left out\n")
    out.write(format_summary(rows, total, options.by))
    if waiting:
        out.write(format_waiting(json.loads(waiting)))


def _show(
    options: argparse.Namespace, out: TextIO, now: float, local: tuple[str, str | None] | None
) -> None:
    """
    C{show ID}: the entry, then its headers or (C{--body}) its message.
    """
    if local is not None:
        layout = _layout(*local)
        try:
            entry = find_entry(layout, options.id)
        except KeyError:
            raise OperationFailed(f"no such entry: {options.id}") from None
        out.write(format_show(entry, now, route_known=False))
        if not options.body:
            out.write(HEADERS_MARK)
            _write_bytes(out, read_head(layout, options.id))
        else:
            out.write(MESSAGE_MARK)
            offset = 0
            while True:
                try:
                    chunk = read_message_chunk(layout, options.id, offset, READ_CHUNK)
                except KeyError:
                    break
                if not chunk:
                    break
                _write_bytes(out, chunk)
                offset += len(chunk)
        out.write(END_MARK)
        return
    result = _remote(options, "Show", id=options.id)
    data = json.loads(result["entry"])
    entry = entry_from_json(data, queue=data.get("queue"))
    out.write(format_show(entry, now, result.get("smarthost")))
    if result.get("waiting"):
        out.write(format_wait(json.loads(result["waiting"]), now))
    if not options.body:
        out.write(HEADERS_MARK)
        _write_bytes(out, result["headers"])
    else:
        from relay.control.client import ControlClient

        out.write(MESSAGE_MARK)
        _remote(
            options, "ShowMessage", id=options.id,
            client=ControlClient(on_data=lambda chunk: _write_bytes(out, chunk)),
        )  # fmt: skip
    out.write(END_MARK)


def _act(options: argparse.Namespace, out: TextIO) -> None:
    """
    C{freeze}, C{send}, C{send-now}, C{remove}: the relay does it; print
    the ids named that changed, and how many entries changed.
    """
    command = options.command
    kwargs: dict[str, Any] = dict(ids=list(options.ids), **options.filters)
    if options.queue:
        kwargs["queue"] = options.queue
    if command == "send":
        kwargs.update(all=options.all, frozen=options.frozen)
        if options.intervals is not None:
            kwargs["retry_intervals"] = options.intervals
        if options.reroute is not None:
            kwargs["next_hop"] = options.reroute
    elif options.all:
        kwargs["all"] = True
    if getattr(options, "retry_failed", False):
        kwargs["retry_failed"] = True
    result = _remote(options, ACTIONS[command], **kwargs)
    for entry_id in result["done"]:
        out.write(f"{command}: {entry_id}\n")
    out.write(format_changed(command, result))


def format_changed(command: str, result: dict[str, Any]) -> str:
    """
    The last line of an action: how many entries matched and how many it
    changed (and why some were left alone).
    """
    matched, changed, settled = result["matched"], result["changed"], result.get("settled", 0)
    noun = "entry" if matched == 1 else "entries"
    line = f"{command}: changed {changed} of {matched} matching {noun}"
    if settled:
        line += f" ({settled} settled: --retry-failed puts their failed recipients back)"
    return line + "\n"


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
    except BrokenPipeError:
        # the reader went away (relayctl status | head): stop quietly, and
        # let nothing more be flushed to the closed pipe at exit
        if out is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return FAILED
    except OSError as e:
        err.write(f"relayctl {options.command}: {e}\n")
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
