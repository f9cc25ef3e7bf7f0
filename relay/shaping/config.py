"""
The shaping file (C{--shaping FILE}, TOML): limits for all destinations,
per recipient domain and per provider, and the reply rules that suspend a
destination or slow it down.  L{load} reads it into a frozen
L{ShapingConfig}; anything wrong is a L{ShapingFileError} naming the
file, the line and the key.

A I{destination} is what one budget is kept for: a recipient domain with
a C{[domain."..."]} section of its own; else the provider whose
C{mx_suffix} matches one of the domain's MX hosts (every domain whose MX
ends in C{.google.com} shares the provider's budget, as KumoMTA's provider
rollups do); else the recipient domain itself, under the C{[default]}
limits.  Mail to given next hops (a smarthost, the plugin's choices)
counts under the host of its first hop.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from relay.model.retry import parse_interval
from relay.shaping.rate import Rate, parse_rate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the backport, with the same API
    import tomli as tomllib

#: connections in use at once per destination when nothing says otherwise
#: (the relay's per-next-hop concurrency before there were shaping files)
DEFAULT_MAX_CONNECTIONS = 20

SUSPEND = "suspend"
SLOW = "slow"
ACTIONS = (SUSPEND, SLOW)


class ShapingFileError(ValueError):
    """
    A shaping file that cannot be used; the message names the file, the
    line (when known) and the key.
    """


@dataclass(frozen=True)
class Limits:
    """
    The limits of one destination.  C{None}: no limit (for
    C{messages_per_connection}: the client's own, 100).

    @ivar max_connections: deliveries (connections in use) at once.
    @ivar messages_per_connection: transactions on one connection before
        it is closed.
    @ivar message_rate: messages that may start per interval.
    @ivar message_burst: how many of them may go at once (1: evenly
        spaced).
    @ivar connection_rate: new connections per interval.
    @ivar source: the local address new connections are made from.
    @ivar helo: the name given in EHLO on those connections.
    """

    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    messages_per_connection: int | None = None
    message_rate: Rate | None = None
    message_burst: int = 1
    connection_rate: Rate | None = None
    source: str | None = None
    helo: str | None = None


LIMIT_KEYS = tuple(f.name for f in fields(Limits))


@dataclass(frozen=True)
class Provider:
    """
    Domains that share one budget: those with an MX host ending in one of
    C{mx_suffixes}.
    """

    name: str
    mx_suffixes: tuple[str, ...]
    #: the provider's own limits, or C{None}: the C{[default]} ones
    limits: Limits | None = None

    def matches(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host.endswith(s) or host == s.lstrip(".") for s in self.mx_suffixes)


@dataclass(frozen=True)
class ReplyRule:
    """
    When a reply of a destination matches C{pattern} (searched in the
    reply as logged: C{"421 4.7.28 text"}), suspend the destination for
    C{duration} seconds (C{action} L{SUSPEND}) or lower its message rate
    to C{rate} for that long (L{SLOW}).

    @ivar destination: the only destination (domain or provider name) the
        rule applies to, or C{None} for all.
    """

    pattern: re.Pattern[str]
    action: str
    duration: float
    rate: Rate | None = None
    destination: str | None = None

    def matches(self, destination: str, reply_text: str) -> bool:
        if self.destination is not None and self.destination != destination:
            return False
        return self.pattern.search(reply_text) is not None


@dataclass(frozen=True)
class ShapingConfig:
    """
    A shaping file, read.
    """

    default: Limits = Limits()
    domains: Mapping[str, Limits] = field(default_factory=dict)
    providers: Sequence[Provider] = ()
    rules: Sequence[ReplyRule] = ()
    path: str | None = None

    def provider_named(self, name: str) -> Provider | None:
        for provider in self.providers:
            if provider.name == name:
                return provider
        return None


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """
    The line of each key and table of a TOML document, by key path (the
    first occurrence), for error messages: C{tomllib} gives no positions.
    Array-of-tables entries are numbered: C{("rule", "0", "match")}.
    """
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    arrays: dict[tuple[str, ...], int] = {}
    key_re = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            array = stripped.startswith("[[")
            try:
                parsed = tomllib.loads(stripped.split("#", 1)[0].strip() + "\n")
            except tomllib.TOMLDecodeError:
                continue
            path: tuple[str, ...] = ()
            node: Any = parsed
            while isinstance(node, dict) and node:
                name = next(iter(node))
                path += (name,)
                node = node[name]
                if isinstance(node, list):
                    break
            if array:
                index = arrays.get(path, -1) + 1
                arrays[path] = index
                path += (str(index),)
            table = path
            lines.setdefault(table, number)
            continue
        match = key_re.match(line)
        if match:
            try:
                parsed = tomllib.loads(match.group(1) + " = 0\n")
            except tomllib.TOMLDecodeError:
                continue
            key: tuple[str, ...] = ()
            node = parsed
            while isinstance(node, dict) and node:
                name = next(iter(node))
                key += (name,)
                node = node[name]
            lines.setdefault(table + key, number)
    return lines


class _Reader:
    """
    Turns the parsed document into a L{ShapingConfig}, naming the file,
    line and key of the first problem.
    """

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = _key_lines(text)

    def error(self, key: tuple[str, ...], problem: str) -> ShapingFileError:
        line = None
        for n in range(len(key), 0, -1):
            line = self.lines.get(key[:n])
            if line is not None:
                break
        where = f"{self.path}, line {line}" if line is not None else self.path
        shown = ".".join(k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else f'"{k}"' for k in key)
        if key[:1] == ("rule",) and len(key) > 1:
            shown = f"rule {int(key[1]) + 1}" + (f" key {key[2]}" if len(key) > 2 else "")
        return ShapingFileError(f"{where}: {shown}: {problem}")

    def table(self, value: Any, key: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        return value

    def limits(self, table: dict[str, Any], key: tuple[str, ...], base: Limits, extra: Sequence[str] = ()) -> Limits:
        values: dict[str, Any] = {}
        for name, value in table.items():
            here = key + (name,)
            if name in extra:
                continue
            if name not in LIMIT_KEYS:
                known = ", ".join(LIMIT_KEYS + tuple(extra))
                raise self.error(here, f"unknown key (known: {known})")
            if name in ("message_rate", "connection_rate"):
                try:
                    values[name] = parse_rate(value)
                except ValueError as e:
                    raise self.error(here, str(e)) from None
            elif name in ("max_connections", "messages_per_connection", "message_burst"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise self.error(here, f"must be a whole number at least 1, not {value!r}")
                values[name] = value
            else:
                if not isinstance(value, str) or not value:
                    raise self.error(here, f"must be a non-empty string, not {value!r}")
                if name == "source":
                    import ipaddress

                    try:
                        value = str(ipaddress.ip_address(value))
                    except ValueError:
                        raise self.error(here, f"not an IP address: {value!r}") from None
                values[name] = value
        import dataclasses

        return dataclasses.replace(base, **values)

    def duration(self, value: Any, key: tuple[str, ...]) -> float:
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            return parse_interval(value)
        except (TypeError, ValueError) as e:
            raise self.error(key, str(e)) from None

    def rule(self, table: dict[str, Any], key: tuple[str, ...]) -> ReplyRule:
        allowed = ("match", "action", "for", "rate", "destination")
        for name in table:
            if name not in allowed:
                raise self.error(key + (name,), f"unknown key (known: {', '.join(allowed)})")
        for name in ("match", "action", "for"):
            if name not in table:
                raise self.error(key, f"missing key {name!r}")
        match = table["match"]
        if not isinstance(match, str):
            raise self.error(key + ("match",), "must be a regular expression (a string)")
        try:
            pattern = re.compile(match, re.IGNORECASE)
        except re.error as e:
            raise self.error(key + ("match",), f"bad regular expression {match!r}: {e}") from None
        action = table["action"]
        if action not in ACTIONS:
            raise self.error(key + ("action",), f"must be one of {', '.join(ACTIONS)}, not {action!r}")
        rate = None
        if action == SLOW:
            if "rate" not in table:
                raise self.error(key, "action slow needs a rate")
            try:
                rate = parse_rate(table["rate"])
            except ValueError as e:
                raise self.error(key + ("rate",), str(e)) from None
        elif "rate" in table:
            raise self.error(key + ("rate",), "only action slow takes a rate")
        destination = table.get("destination")
        if destination is not None and (not isinstance(destination, str) or not destination):
            raise self.error(key + ("destination",), "must be a domain or provider name")
        return ReplyRule(
            pattern, action, self.duration(table["for"], key + ("for",)), rate,
            destination.lower() if destination else None,
        )  # fmt: skip

    def config(self, document: dict[str, Any], shipped: ShapingConfig | None) -> ShapingConfig:
        for name in document:
            if name not in ("shipped", "default", "domain", "provider", "rule"):
                raise self.error((name,), "unknown key (known: shipped, default, domain, provider, rule)")
        use_shipped = document.get("shipped", True)
        if not isinstance(use_shipped, bool):
            raise self.error(("shipped",), "must be true or false")
        base = shipped if (use_shipped and shipped is not None) else ShapingConfig()
        default = self.limits(
            self.table(document.get("default", {}), ("default",)), ("default",), base.default
        )
        providers = {p.name: p for p in base.providers}
        for name, value in self.table(document.get("provider", {}), ("provider",)).items():
            key = ("provider", name)
            table = self.table(value, key)
            old = providers.get(name)
            suffixes = table.get("mx_suffix", old.mx_suffixes if old is not None else None)
            if isinstance(suffixes, str):
                suffixes = [suffixes]
            if (
                not isinstance(suffixes, (list, tuple))
                or not suffixes
                or not all(isinstance(s, str) and s.strip(".") for s in suffixes)
            ):
                raise self.error(key + ("mx_suffix",), "a provider needs mx_suffix: a list of host name suffixes")
            limits = None
            if any(k != "mx_suffix" for k in table):
                limits = self.limits(table, key, default, extra=("mx_suffix",))
            providers[name] = Provider(
                name, tuple(s.lower().rstrip(".") for s in suffixes), limits
            )
        domains: dict[str, Limits] = dict(base.domains)
        for name, value in self.table(document.get("domain", {}), ("domain",)).items():
            key = ("domain", name)
            domains[name.lower().rstrip(".")] = self.limits(self.table(value, key), key, default)
        rules = list(base.rules)
        entries = document.get("rule", [])
        if not isinstance(entries, list):
            raise self.error(("rule",), "must be an array of tables ([[rule]])")
        for i, value in enumerate(entries):
            key = ("rule", str(i))
            rules.append(self.rule(self.table(value, key), key))
        return ShapingConfig(default, domains, tuple(providers.values()), tuple(rules), self.path)


_shipped: list[ShapingConfig] = []


def shipped_config() -> ShapingConfig:
    """
    The shipped providers and rules (L{relay.shaping.shipped}), read once.
    """
    if not _shipped:
        from relay.shaping.shipped import SHIPPED_TEXT

        _shipped.append(parse(SHIPPED_TEXT, "<shipped shaping defaults>", ShapingConfig()))
    return _shipped[0]


def parse(text: str, path: str = "<shaping>", shipped: ShapingConfig | None = None) -> ShapingConfig:
    """
    Read a shaping file's text.

    @param shipped: what the file is laid over (unless it says
        C{shipped = false}): by default the shipped providers and rules
        (L{relay.shaping.shipped}).
    @raise ShapingFileError: naming the file, line and key of the problem.
    """
    if shipped is None:
        shipped = shipped_config()
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ShapingFileError(f"{path}: not TOML: {e}") from None
    return _Reader(path, text).config(document, shipped)


def load(path: str) -> ShapingConfig:
    """
    Read the shaping file at C{path} (blocking: call it off the reactor
    thread once running).

    @raise ShapingFileError: the file cannot be read or used.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ShapingFileError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShapingFileError(f"{path}: not UTF-8: {e}") from None
    return parse(text, path)
