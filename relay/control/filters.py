"""
Which spool entries an operator means: the filters of C{relayctl status},
C{count}, C{summary} and the bulk actions (async_smtp's C{spool}
filters), combined with AND.  One L{EntryFilter} is evaluated by the
relay (over its control endpoint) or by C{relayctl} itself on a spool no
relay runs on, in the thread that reads the spool: it is a frozen value
with pure methods.

An entry's age is its creation time, which its id carries
(L{relay.model.entry.id_time}): the age filters decide from the name of
the entry's file alone, and its file is opened only when another filter
needs what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable

from relay.delivery.nexthop import parse_hop
from relay.model.entry import SpoolEntry, id_time
from relay.model.retry import parse_interval

#: the C{--next-hop} value that means the default route (the relay's
#: current C{--smarthost}, else the MX of each recipient domain)
DEFAULT_ROUTE = "default"
#: the C{--sender} value that means the null sender
NULL_SENDER = "<>"

#: what L{EntryFilter.from_wire} reads, as the control commands name it
WIRE_NAMES = ("sender", "recipient", "via", "younger", "older")


def creation_time(entry_id: str, entry: SpoolEntry | None = None) -> float | None:
    """
    When an entry was created: what its id says, else (an id of another
    form) its C{created_at} when the entry is at hand.
    """
    at = id_time(entry_id)
    if at is None and entry is not None:
        return entry.created_at
    return at


def normal_hop(text: str) -> tuple[str, int]:
    """
    C{HOST[:PORT]} as a comparable C{(host, port)}: the host lower-cased,
    the port 25 when not given.

    @raise ValueError: if C{text} is not a hop.
    """
    host, port = parse_hop(text.strip())
    return host.lower(), port


def _address_pattern(text: str, option: str, null_ok: bool) -> str:
    value = text.strip()
    if null_ok and value in (NULL_SENDER, ""):
        return NULL_SENDER
    local, at, domain = value.rpartition("@")
    if not at or not domain or "@" in domain:
        raise ValueError(f"{option}: expected ADDR or @DOMAIN, not {text!r}")
    return value.lower()


def _address_matches(pattern: str, address: str) -> bool:
    if pattern.startswith("@"):
        return address.lower().rpartition("@")[2] == pattern[1:]
    return address.lower() == pattern


def held_recipients(entry: SpoolEntry) -> list[str]:
    """
    The recipients an entry still holds: pending, then failed (delivered
    ones are done with).  What C{--recipient} and the summary look at.
    """
    return [str(r) for r in entry.recipients] + [r for r, _ in entry.failed_recipients]


@dataclass(frozen=True)
class EntryFilter:
    """
    A selection of spool entries: every condition given must hold.

    @ivar sender: C{ADDR} (the whole address), C{@DOMAIN}, or C{<>} (the
        null sender); lower-cased.
    @ivar recipient: C{ADDR} or C{@DOMAIN}: some recipient the entry
        still holds (L{held_recipients}) matches.
    @ivar via: C{(host, port)}: one of the entry's next hop choices is
        it, or the entry is on the default route and C{default_hop} is
        it; or L{DEFAULT_ROUTE}: the entry is on the default route.
    @ivar younger: created less than this many seconds before C{now}.
    @ivar older: created at least this many seconds before C{now}.
    @ivar now: the time ages are measured from.
    @ivar default_hop: where the default route goes now (the relay's
        C{--smarthost}), or C{None} (the MX of each domain, or not known):
        then only C{--next-hop default} matches entries on it.
    """

    sender: str | None = None
    recipient: str | None = None
    via: tuple[str, int] | str | None = None
    younger: float | None = None
    older: float | None = None
    now: float = 0.0
    default_hop: tuple[str, int] | None = None

    @classmethod
    def build(
        cls,
        now: float,
        sender: str | None = None,
        recipient: str | None = None,
        via: str | None = None,
        younger: float | str | None = None,
        older: float | str | None = None,
        default_hop: str | None = None,
    ) -> EntryFilter:
        """
        A filter from the operator's words: addresses, a hop, durations
        (seconds, or text such as C{30m}).

        @raise ValueError: naming the option that makes no sense.
        """
        hop: tuple[str, int] | str | None = None
        if via is not None:
            if via.strip().lower() == DEFAULT_ROUTE:
                hop = DEFAULT_ROUTE
            else:
                try:
                    hop = normal_hop(via)
                except ValueError:
                    raise ValueError(f"--next-hop: expected HOST[:PORT], not {via!r}") from None
        default = None
        if default_hop:
            try:
                default = normal_hop(default_hop)
            except ValueError:
                default = None
        return cls(
            sender=_address_pattern(sender, "--sender", True) if sender is not None else None,
            recipient=(
                _address_pattern(recipient, "--recipient", False) if recipient is not None else None
            ),
            via=hop,
            younger=_duration(younger, "--younger"),
            older=_duration(older, "--older"),
            now=now,
            default_hop=default,
        )

    @classmethod
    def from_wire(cls, now: float, default_hop: str | None, arguments: dict[str, Any]) -> EntryFilter:
        """
        The filter the arguments of a control command describe (see
        L{relay.control.rpc.FILTER_ARGUMENTS}).

        @raise ValueError: as L{build}.
        """
        given = {name: arguments.get(name) for name in WIRE_NAMES}
        return cls.build(now, default_hop=default_hop, **given)

    def to_wire(self) -> dict[str, Any]:
        """
        The arguments of a control command for this filter (the inverse of
        L{from_wire}: only the conditions given).
        """
        wire: dict[str, Any] = {}
        if self.sender is not None:
            wire["sender"] = self.sender
        if self.recipient is not None:
            wire["recipient"] = self.recipient
        if self.via is not None:
            wire["via"] = self.via if isinstance(self.via, str) else _hop_text(self.via)
        if self.younger is not None:
            wire["younger"] = self.younger
        if self.older is not None:
            wire["older"] = self.older
        return wire

    @property
    def empty(self) -> bool:
        """
        No condition: every entry is admitted.
        """
        return all(
            getattr(self, f.name) is None
            for f in fields(self)
            if f.name not in ("now", "default_hop")
        )

    @property
    def needs_entry(self) -> bool:
        """
        Whether a condition needs the entry's metadata (not only its id).
        """
        return self.sender is not None or self.recipient is not None or self.via is not None

    def admits_id(self, entry_id: str) -> bool | None:
        """
        What the id alone says (see L{relay.spool.reader.EntrySelector}).
        """
        if self.younger is None and self.older is None:
            return None if self.needs_entry else True
        at = id_time(entry_id)
        if at is None:
            return None  # an id of another form: the entry says its age
        if not self._age_admits(at):
            return False
        return None if self.needs_entry else True

    def admits(self, entry: SpoolEntry) -> bool:
        """
        Does C{entry} meet every condition?
        """
        if self.younger is not None or self.older is not None:
            at = creation_time(entry.id, entry)
            if at is None or not self._age_admits(at):
                return False
        if self.sender is not None:
            sender = str(entry.sender)
            if self.sender == NULL_SENDER:
                if sender:
                    return False
            elif not sender or not _address_matches(self.sender, sender):
                return False
        if self.recipient is not None:
            pattern = self.recipient
            if not any(_address_matches(pattern, r) for r in held_recipients(entry)):
                return False
        if self.via is not None and not self._via_admits(entry):
            return False
        return True

    def _age_admits(self, created: float) -> bool:
        age = self.now - created
        if self.younger is not None and not age < self.younger:
            return False
        if self.older is not None and not age >= self.older:
            return False
        return True

    def _via_admits(self, entry: SpoolEntry) -> bool:
        if entry.uses_default_route:
            return self.via == DEFAULT_ROUTE or (
                self.default_hop is not None and self.via == self.default_hop
            )
        if self.via == DEFAULT_ROUTE:
            return False
        return any(_same_hop(hop, self.via) for hop in entry.next_hop_choices)


def _same_hop(hop: str, wanted: Any) -> bool:
    try:
        return normal_hop(hop) == wanted
    except ValueError:
        return False


def _hop_text(hop: tuple[str, int]) -> str:
    host, port = hop
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _duration(value: float | str | None, option: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_interval(value)
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None
    if value < 0:
        raise ValueError(f"{option}: a duration is not negative")
    return float(value)


def describe(entry_filter: EntryFilter, extra: Iterable[str] = ()) -> str:
    """
    The filter in words, for logs: C{sender=@example.com older=3600s}.
    """
    parts = [f"{name}={value}" for name, value in entry_filter.to_wire().items()]
    parts.extend(extra)
    return " ".join(parts) or "all"
