"""
The rules of RFC 5321 section 5.1 for a domain's mail exchangers, apart
from the lookup: the order they are tried in (by preference, equal
preferences in random order), the hosts lately found dead (skipped for a
while when others remain), and the relay itself listed as an MX (only
the hosts it prefers to itself, or a bounce: mail would loop).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

#: Seconds a host that refused a connection or timed out is skipped for.
DEAD_HOST_PERIOD = 300.0


@dataclass(frozen=True)
class MXHost:
    """
    One MX record: a host and its preference (lower is tried first).
    """

    preference: int
    name: str


def mx_hosts(records: Sequence[Any]) -> tuple[MXHost, ...] | None:
    """
    The hosts of an MX answer's records: C{None} when there are none (the
    domain itself is then its mail exchanger), C{()} for a null MX (RFC
    7505: the domain takes no mail).
    """
    hosts = tuple(
        MXHost(int(r.preference), str(r.name).rstrip(".").lower())
        for r in records
        if hasattr(r, "preference")
    )
    if not hosts:
        return None
    if any(host.name == "" for host in hosts):
        return ()
    return hosts


def order_hosts(hosts: Iterable[MXHost], rng: random.Random) -> list[MXHost]:
    """
    C{hosts} by preference, those of equal preference shuffled (RFC 5321
    section 5.1: the sender MUST randomise them, to spread the load).
    """
    keyed = [(host.preference, rng.random(), host) for host in hosts]
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [host for _, _, host in keyed]


class DeadHosts:
    """
    Hosts that lately refused a connection or did not answer, remembered
    for L{DEAD_HOST_PERIOD} seconds: a domain's other MX hosts are tried
    instead of waiting on them again at every attempt.

    @param clock: an C{IReactorTime}.
    """

    def __init__(self, clock: Any, period: float = DEAD_HOST_PERIOD) -> None:
        self._clock = clock
        self._period = period
        self._until: dict[str, float] = {}

    def failed(self, host: str) -> None:
        """
        C{host} refused or timed out just now.
        """
        self._until[host.lower()] = self._clock.seconds() + self._period

    def alive(self, host: str) -> None:
        """
        C{host} took a connection: forget that it failed.
        """
        self._until.pop(host.lower(), None)

    def is_dead(self, host: str) -> bool:
        until = self._until.get(host.lower())
        if until is None:
            return False
        if until <= self._clock.seconds():
            del self._until[host.lower()]
            return False
        return True

    def skip(self, hosts: Sequence[MXHost]) -> list[MXHost]:
        """
        C{hosts} without the dead ones, unless that leaves none: then all
        of them (a dead host may have come back; there is nothing else).
        """
        alive = [host for host in hosts if not self.is_dead(host.name)]
        return alive or list(hosts)


@dataclass(frozen=True)
class Myself:
    """
    How the relay knows itself in a list of MX hosts: by its host names
    (C{--hostname}), or by the addresses and ports it listens on.

    @ivar names: lower-case host names without the trailing dot.
    @ivar listeners: C{(ip, port)} the relay listens on; an unspecified
        address (C{0.0.0.0}, C{::}) stands for the loopback addresses
        (the relay does not enumerate its interfaces).
    """

    names: frozenset[str] = frozenset()
    listeners: frozenset[tuple[str, int]] = frozenset()

    def is_me(self, name: str, addresses: Iterable[str] = (), port: int = 25) -> bool:
        """
        Is the host C{name}, at C{addresses} on C{port}, this relay?
        """
        if name.lower().rstrip(".") in self.names:
            return True
        for address in addresses:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                continue
            for listen, listen_port in self.listeners:
                if listen_port != port:
                    continue
                if str(ip) == listen:
                    return True
                if listen in ("0.0.0.0", "::", "") and ip.is_loopback:
                    return True
        return False


def below_myself(ordered: Sequence[MXHost], mine: set[str]) -> list[MXHost] | None:
    """
    The hosts of C{ordered} (by preference) that the relay may use when
    the hosts named in C{mine} are itself: those of lower preference than
    its own best (RFC 5321 section 5.1), or C{None} when it is listed and
    none remain (mail for the domain would loop back to itself).
    """
    mine_prefs = [host.preference for host in ordered if host.name in mine]
    if not mine_prefs:
        return list(ordered)
    best = min(mine_prefs)
    kept = [host for host in ordered if host.preference < best]
    return kept or None


def listeners_of(endpoints: Iterable[str]) -> frozenset[tuple[str, int]]:
    """
    The C{(ip, port)} that SMTP listener descriptions (C{tcp:}, C{tcp6:},
    C{implicit-tls:}, C{haproxy:tcp:}) listen on: an unspecified address for
    those without C{interface=}; others (C{unix:}, ...) are left out.
    """
    from relay.app._compat import parse_endpoint

    found = set()
    for description in endpoints:
        try:
            args, kwargs = parse_endpoint(description)
        except ValueError:
            continue
        if args and str(args[0]).lower() == "haproxy":
            args = args[1:]
        if len(args) < 2 or str(args[0]).lower() not in ("tcp", "tcp6", "implicit-tls"):
            continue
        default = "::" if str(args[0]).lower() == "tcp6" else "0.0.0.0"
        interface = str(kwargs.get("interface", args[2] if len(args) > 2 else default))
        if str(args[1]).isdigit():
            found.add((interface, int(args[1])))
    return frozenset(found)
