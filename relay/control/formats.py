"""
How C{relayctl} prints entries: the C{status} formats (C{table},
C{exim}, C{json} Lines, C{ids}), written a page at a time as a listing
streams in, the counts, and C{show}'s view of one entry (like Postfix's
C{postcat -q}).
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from typing import Sequence, TextIO

from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, QUEUES, REMOVED, SpoolEntry
from relay.spool.codec import entry_to_json

LAST_ERROR_WIDTH = 40
FORMATS = ("table", "exim", "json", "ids")


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


def format_time(at: float) -> str:
    """
    A time as ISO 8601 in UTC, to the second.
    """
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")


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
    The cells of one entry's row in the table.
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
        # the default route is decided at each attempt (--smarthost or MX)
        entry.next_hop_choices[0] if entry.next_hop_choices else "default",
        _truncate(last_error, LAST_ERROR_WIDTH) if last_error else "-",
    )


class EntryWriter:
    """
    Prints a listing as it streams in: L{write} for each page (entries,
    or ids for the C{ids} format), L{finish} at the end.
    """

    def __init__(self, out: TextIO, now: float) -> None:
        self.out = out
        self.now = now

    def write(self, entries: Sequence[SpoolEntry]) -> None:
        raise NotImplementedError

    def write_ids(self, ids: Sequence[str]) -> None:
        """
        A page of ids only (C{status --format ids}).
        """
        raise NotImplementedError

    def write_json_lines(self, text: str) -> None:
        """
        A page as the relay sent it, JSON Lines (see L{rpc.EntriesPage}).
        """
        from relay.spool.codec import entry_from_json

        entries = [
            entry_from_json(data, queue=data.get("queue"))
            for data in (json.loads(line) for line in text.splitlines() if line)
        ]
        self.write(entries)

    def finish(self) -> None:
        self.out.flush()


class TableWriter(EntryWriter):
    """
    An aligned table with a header line.  The columns fit the first page;
    a later page with wider cells widens them from there on (a listing
    that streams cannot know its widest cell before it ends).  The last
    error of a quarantined entry that was never tried is its quarantine
    reason.
    """

    def __init__(self, out: TextIO, now: float) -> None:
        EntryWriter.__init__(self, out, now)
        self.widths: list[int] | None = None

    def write(self, entries: Sequence[SpoolEntry]) -> None:
        if not entries:
            return
        rows = [table_row(e, self.now) for e in entries]
        widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
        lines = []
        if self.widths is None:
            self.widths = [max(w, len(c)) for w, c in zip(widths, TABLE_COLUMNS, strict=True)]
            lines.append(self._line(TABLE_COLUMNS))
        else:
            self.widths = [max(a, b) for a, b in zip(self.widths, widths, strict=True)]
        lines.extend(self._line(row) for row in rows)
        self.out.write("".join(lines))
        self.out.flush()

    def _line(self, row: Sequence[str]) -> str:
        assert self.widths is not None
        cells = [cell.ljust(width) for cell, width in zip(row, self.widths, strict=True)]
        return "  ".join(cells).rstrip() + "\n"

    def finish(self) -> None:
        if self.widths is None:
            self.widths = [len(c) for c in TABLE_COLUMNS]
            self.out.write(self._line(TABLE_COLUMNS))
        self.out.flush()


class EximWriter(EntryWriter):
    """
    The way C{exim -bp} lists its queue: C{age size id <sender>} (with
    C{*** frozen ***} or the quarantine reason after it), then the
    recipients indented, and a blank line after each entry.
    """

    def write(self, entries: Sequence[SpoolEntry]) -> None:
        out = []
        for entry in entries:
            head = (
                f"{format_duration(self.now - entry.created_at):>3} "
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
        self.out.write("".join(out))
        self.out.flush()


def json_line(entry: SpoolEntry) -> str:
    """
    One entry of the C{json} format: its metadata document (the current
    version, with its queue) on one line, keys sorted.
    """
    return json.dumps(entry_to_json(entry), sort_keys=True) + "\n"


class JSONLinesWriter(EntryWriter):
    """
    JSON Lines, one object per entry, like C{postqueue -j}.
    """

    def write(self, entries: Sequence[SpoolEntry]) -> None:
        self.out.write("".join(json_line(e) for e in entries))
        self.out.flush()

    def write_json_lines(self, text: str) -> None:
        # the relay's lines are this format's lines already
        self.out.write(text)
        self.out.flush()


class IdsWriter(EntryWriter):
    """
    One id per line (async_smtp's C{id} format), for scripts.
    """

    def write(self, entries: Sequence[SpoolEntry]) -> None:
        self.write_ids([e.id for e in entries])

    def write_ids(self, ids: Sequence[str]) -> None:
        self.out.write("".join(entry_id + "\n" for entry_id in ids))
        self.out.flush()


WRITERS: dict[str, type[EntryWriter]] = {
    "table": TableWriter,
    "exim": EximWriter,
    "json": JSONLinesWriter,
    "ids": IdsWriter,
}


def entry_writer(fmt: str, out: TextIO, now: float) -> EntryWriter:
    """
    The writer of format C{fmt} (one of L{FORMATS}).
    """
    return WRITERS[fmt](out, now)


def _render(fmt: str, entries: Sequence[SpoolEntry], now: float) -> str:
    out = io.StringIO()
    writer = entry_writer(fmt, out, now)
    writer.write(entries)
    writer.finish()
    return out.getvalue()


def format_table(entries: Sequence[SpoolEntry], now: float) -> str:
    """
    The entries as an aligned table with a header line (L{TableWriter}).
    """
    return _render("table", entries, now)


def format_exim(entries: Sequence[SpoolEntry], now: float) -> str:
    """
    The entries in the C{exim -bp} layout (L{EximWriter}).
    """
    return _render("exim", entries, now)


def format_json(entries: Sequence[SpoolEntry]) -> str:
    """
    The entries as JSON Lines (L{JSONLinesWriter}).
    """
    return "".join(json_line(e) for e in entries)


def format_entries(entries: Sequence[SpoolEntry], fmt: str, now: float) -> str:
    return _render(fmt, entries, now)


def format_count(counts: dict[str, int], queues: Sequence[str] = QUEUES) -> str:
    """
    One C{queue: n} line per queue.
    """
    return "".join(f"{queue}: {counts.get(queue, 0)}\n" for queue in queues)


# -- show ----------------------------------------------------------------------


def _when(at: float, now: float) -> str:
    delta = at - now
    if delta > 0:
        return f"{format_time(at)} (in {format_duration(delta)})"
    return f"{format_time(at)} ({format_duration(-delta)} ago)"


def _seconds(intervals: Sequence[float]) -> str:
    return ",".join(f"{i:g}s" for i in intervals)


def format_show(
    entry: SpoolEntry, now: float, smarthost: str | None = None, route_known: bool = True
) -> str:
    """
    One entry's metadata, the way an operator reads it: sender, each
    recipient with its state (pending, delivered, failed with the reply,
    and whether the failure was reported), the next hops (or the default
    route and where it goes now), the schedule and how much of it is
    used, and the attempts kept, with their count.

    @param smarthost: where the relay's default route goes now.
    @param route_known: whether C{smarthost} is known (C{False} when read
        from disk with no relay running).
    """
    lines = [
        f"id: {entry.id}",
        f"queue: {entry.queue}",
        f"envelope id: {entry.envelope_id}",
        f"sender: {_sender(entry)}",
        f"size: {entry.message_size}",
        f"created: {_when(entry.created_at, now)}",
    ]
    if entry.received_from:
        lines.append(f"received from: {entry.received_from}")
    if entry.moved_at is not None and entry.moved_at != entry.created_at:
        lines.append(f"in {entry.queue} since: {_when(entry.moved_at, now)}")
    if entry.reason:
        lines.append(f"reason: {entry.reason}")
    if entry.next_hop_choices:
        lines.append("next hops: " + ", ".join(entry.next_hop_choices))
    elif not route_known:
        lines.append("next hops: default route (the relay's --smarthost, else MX)")
    elif smarthost:
        lines.append(f"next hops: default route (now {smarthost})")
    else:
        lines.append("next hops: default route (now the MX of each domain)")
    schedule = _seconds(entry.schedule) if entry.schedule else "the relay's default"
    lines.append(f"schedule: {schedule}, step {entry.step}")
    if entry.tls_policy:
        lines.append(f"tls policy: {entry.tls_policy} (chosen by the plugin)")
    if entry.queue == ACTIVE:
        lines.append(f"next attempt: {_when(entry.next_attempt_at, now)}")
    lines.append("recipients:")
    reported = set(entry.reported)
    lines.extend(f"  pending    {r}" for r in entry.recipients)
    lines.extend(f"  delivered  {r}" for r in entry.delivered_recipients)
    for r, text in entry.failed_recipients:
        told = "reported" if r in reported else "not reported yet"
        lines.append(f"  failed     {r}: {' '.join(text.split())} ({told})")
    lines.extend(f"  rejected   {r} (at RCPT, never spooled)" for r in entry.rejected_recipients)
    kept = len(entry.attempts)
    if entry.attempt_count > kept >= 2:
        lines.append(f"attempts: {entry.attempt_count} (the first and the last {kept - 1} kept)")
    elif entry.attempt_count > kept:
        lines.append(f"attempts: {entry.attempt_count} ({kept} kept)")
    else:
        lines.append(f"attempts: {entry.attempt_count}")
    for a in entry.attempts:
        peer = f" [{a.address[0]}]:{a.address[1]}" if a.address else ""
        who = f" ({', '.join(a.recipients)})" if a.recipients else ""
        lines.append(f"  {format_time(a.at)}  {a.hop}{peer}  {' '.join(a.reply.split())}{who}")
        if a.tls is not None:
            lines.append(f"    tls: {a.tls}")
    return "\n".join(lines) + "\n"


HEADERS_MARK = "*** MESSAGE HEADERS ***\n"
MESSAGE_MARK = "*** MESSAGE ***\n"
END_MARK = "*** END ***\n"
