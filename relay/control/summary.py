"""
C{relayctl summary}: where a backlog sits, like Postfix's C{qshape}.
Entries are counted per recipient domain (or per next hop) in age
buckets, with a total line; the tally holds one row per domain, never
the entries, so that its memory is bounded by the number of domains.

An entry with recipients in several domains counts once in each of their
rows and once in the total: rows may add up to more than the total.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from relay.control.filters import creation_time, held_recipients
from relay.model.entry import SpoolEntry

#: the upper bounds of the age buckets, in minutes; the last bucket is
#: everything older
BUCKET_MINUTES = (5, 10, 20, 40, 80, 160, 320)
BUCKETS = len(BUCKET_MINUTES) + 1
BY_DOMAIN = "domain"
BY_NEXT_HOP = "next-hop"
BY = (BY_DOMAIN, BY_NEXT_HOP)
#: the row of entries on the default route when no smarthost is known
DEFAULT_ROUTE_ROW = "(default route)"
#: the row of entries whose recipients are all delivered
NO_RECIPIENT_ROW = "(none)"
TOTAL_ROW = "TOTAL"

Row = tuple[str, list[int]]


def bucket(age: float) -> int:
    """
    The bucket of an entry C{age} seconds old.
    """
    minutes = age / 60.0
    for i, bound in enumerate(BUCKET_MINUTES):
        if minutes < bound:
            return i
    return len(BUCKET_MINUTES)


class QueueShape:
    """
    The tally: entries by row and age bucket.

    @param now: the time ages are measured from.
    @param by: L{BY_DOMAIN} or L{BY_NEXT_HOP}.
    @param default_hop: where the default route goes now (the relay's
        smarthost), or C{None}: then those entries have their own row.
    """

    def __init__(self, now: float, by: str = BY_DOMAIN, default_hop: str | None = None) -> None:
        if by not in BY:
            raise ValueError(f"summary by {by!r}: use {' or '.join(BY)}")
        self.now = now
        self.by = by
        self.default_hop = default_hop
        self.rows: dict[str, list[int]] = {}
        self.total = [0] * BUCKETS

    @property
    def entries(self) -> int:
        return sum(self.total)

    def keys(self, entry: SpoolEntry) -> set[str]:
        """
        The rows an entry counts in: its first next hop (the default
        route's current hop, when known), or the domains of the
        recipients it still holds (pending and failed).
        """
        if self.by == BY_NEXT_HOP:
            if entry.next_hop_choices:
                return {str(entry.next_hop_choices[0]).lower()}
            return {self.default_hop or DEFAULT_ROUTE_ROW}
        domains = {r.rpartition("@")[2].lower() for r in held_recipients(entry)}
        return domains or {NO_RECIPIENT_ROW}

    def add(self, entry: SpoolEntry) -> None:
        """
        Count one entry, in the bucket of its age.
        """
        created = creation_time(entry.id, entry)
        i = bucket(self.now - created) if created is not None else BUCKETS - 1
        self.total[i] += 1
        for key in self.keys(entry):
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = [0] * BUCKETS
            row[i] += 1

    def add_all(self, entries: Iterable[SpoolEntry]) -> None:
        for entry in entries:
            self.add(entry)

    def top(self, n: int) -> list[Row]:
        """
        The C{n} rows with the most entries (all when C{n} is 0), most
        first, then by name.
        """
        ordered = sorted(self.rows.items(), key=lambda item: (-sum(item[1]), item[0]))
        return ordered[:n] if n > 0 else ordered


def format_summary(rows: Sequence[Row], total: Sequence[int], by: str = BY_DOMAIN) -> str:
    """
    The tally as C{qshape} prints it: a header of bucket bounds in minutes
    (C{T} the row's total), the total line, then one line per row.
    """
    head = "DOMAIN" if by == BY_DOMAIN else "NEXT HOP"
    labels = ["T"] + [str(m) for m in BUCKET_MINUTES] + [f"{BUCKET_MINUTES[-1]}+"]
    table = [(TOTAL_ROW, list(total))] + [(name, list(counts)) for name, counts in rows]
    cells = [[str(sum(counts))] + [str(c) for c in counts] for _, counts in table]
    name_width = max([len(head)] + [len(name) for name, _ in table])
    widths = [max([len(labels[i])] + [len(row[i]) for row in cells]) for i in range(len(labels))]

    def line(name: str, values: Sequence[str]) -> str:
        return " ".join([name.ljust(name_width)] + [v.rjust(w) for v, w in zip(values, widths, strict=True)])

    out = [line(head, labels)]
    out.extend(line(name, row) for (name, _), row in zip(table, cells, strict=True))
    return "\n".join(out) + "\n"
