"""
The shaping of deliveries at run time: which destination a route belongs
to, whether a delivery to it may start now, and the state that keeps its
limits (L{DestinationState}).

The delivery scheduler asks L{Shaper.admit} before it sends to a route.
The answer is an L{Admission} (go; L{Shaper.release} it afterwards) or a
L{Wait}: the route's recipients wait, and that is not an attempt (no retry
interval is used up).  A L{Wait} says when to look again: at a time (the
message rate's next unit, reserved for this entry so that waiting messages
are spread instead of all waking at once; a suspension's end; the next
new connection the connection rate allows), or, waiting for one of the
destination's connections, when a delivery to it ends (C{on_wake}).

Memory: a destination's state lives while it has deliveries, waiters,
reservations, a lowered rate or a bucket not yet full; L{Shaper.sweep}
(every L{SWEEP_INTERVAL} seconds) drops the rest, so a relay that has
mailed a million domains holds state only for those with mail under way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relay.shaping.config import SLOW, SUSPEND, Limits, ShapingConfig
from relay.shaping.rate import Rate, TokenBucket

#: seconds between sweeps of idle destination state
SWEEP_INTERVAL = 60.0

SUSPENDED = "suspended"
MAX_CONNECTIONS = "max_connections"
MESSAGE_RATE = "message_rate"
CONNECTION_RATE = "connection_rate"
#: what a route can wait for
REASONS = (SUSPENDED, MAX_CONNECTIONS, MESSAGE_RATE, CONNECTION_RATE)

#: C{f(destination, limits) -> Limits} (a value, a Deferred or a
#: coroutine): the plugin's limits for a destination
LimitsHook = Callable[[str, Limits], Any]


@dataclass(frozen=True)
class Wait:
    """
    A route that may not be delivered now.

    @ivar destination: the destination (domain or provider) it waits for.
    @ivar reason: one of L{REASONS}.
    @ivar until: when to look again, or C{None}: when woken.
    @ivar detail: for the operator (a suspension's reason).
    """

    destination: str
    reason: str
    until: float | None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class LimitWait(Exception):
    """
    Raised by the relay client when a new connection must wait for the
    destination's connection rate: the recipients wait; not an attempt.
    """

    def __init__(self, wait: Wait) -> None:
        Exception.__init__(self, f"{wait.destination}: waiting for {wait.reason}")
        self.wait = wait


@dataclass(frozen=True, eq=False)
class ConnectionShaping:
    """
    What the relay client is told of a destination's connections (on the
    route's L{Destination<relay.delivery.nexthop.Destination>}).

    @ivar connect: called before a new connection is made: C{None} when
        it may be made (a unit of the connection rate is taken), else the
        L{Wait}.
    """

    destination: str
    messages_per_connection: int | None = None
    source: str | None = None
    helo: str | None = None
    connect: Callable[[], Wait | None] = field(default=lambda: None)


class DestinationState:
    """
    The budget of one destination.

    @ivar in_use: deliveries under way.
    @ivar waiting: entries waiting for one of its connections, in order.
    @ivar reserved: entry id -> the time of the message-rate unit it holds.
    """

    def __init__(self, key: str, limits: Limits, clock: IReactorTime, generation: int) -> None:
        self.key = key
        self.clock = clock
        self.generation = generation
        self.in_use = 0
        self.waiting: dict[str, None] = {}
        self.reserved: dict[str, float] = {}
        self.slowed_until: float | None = None
        self.limits = limits
        self.messages = self._bucket(limits.message_rate, limits.message_burst)
        self.connections = self._bucket(limits.connection_rate)

    def _bucket(self, rate: Rate | None, burst: int = 1) -> TokenBucket | None:
        return TokenBucket(rate, self.clock, burst) if rate is not None else None

    def relimit(self, limits: Limits, generation: int) -> None:
        """
        New limits (a reloaded file); buckets whose rate is unchanged are
        kept, so a reload does not give a burst.
        """
        self.generation = generation
        old, self.limits = self.limits, limits
        if (old.message_rate, old.message_burst) != (limits.message_rate, limits.message_burst):
            if self.slowed_until is None:
                self.messages = self._bucket(limits.message_rate, limits.message_burst)
        if old.connection_rate != limits.connection_rate:
            self.connections = self._bucket(limits.connection_rate)

    def slow(self, rate: Rate, until: float) -> None:
        self.messages = TokenBucket(rate, self.clock)
        self.slowed_until = until

    def unslow_if_over(self, now: float) -> None:
        if self.slowed_until is not None and now >= self.slowed_until:
            self.slowed_until = None
            self.messages = self._bucket(self.limits.message_rate, self.limits.message_burst)

    def idle(self) -> bool:
        return (
            self.in_use == 0
            and not self.waiting
            and not self.reserved
            and self.slowed_until is None
            and (self.messages is None or self.messages.idle())
            and (self.connections is None or self.connections.idle())
        )


@dataclass(frozen=True, eq=False)
class Admission:
    """
    A delivery to a destination that may go now; L{Shaper.release} it when
    it ends.
    """

    state: DestinationState
    domain: str
    shaping: ConnectionShaping


class Shaper:
    """
    The destinations' budgets, and the reply rules.

    @param config: the shaping file read (or the defaults).
    @param suspensions: the L{Suspensions<relay.shaping.suspensions.Suspensions>}.
    @param limits_hook: the plugin's L{LimitsHook}, or C{None}.
    @param on_wake: called with an entry id when a connection it waits
        for is free.
    """

    log = Logger(namespace="relay.shaping")

    def __init__(
        self,
        config: ShapingConfig,
        clock: IReactorTime,
        suspensions: Any,
        limits_hook: LimitsHook | None = None,
        on_wake: Callable[[str], object] = lambda entry_id: None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.suspensions = suspensions
        self.limits_hook = limits_hook
        self.on_wake = on_wake
        self.states: dict[str, DestinationState] = {}
        #: entry id -> why it waits (for C{relayctl show} and C{summary})
        self.waits: dict[str, Wait] = {}
        self.generation = 0
        self._sweep: LoopingCall | None = None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        self._sweep = LoopingCall(self.sweep)
        self._sweep.clock = self.clock
        self._sweep.start(SWEEP_INTERVAL, now=False)

    def stop(self) -> None:
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None

    def configure(self, config: ShapingConfig) -> None:
        """
        Use C{config} from now on (a reloaded file): each destination's
        limits are worked out again at its next delivery.
        """
        self.config = config
        self.generation += 1

    def sweep(self) -> None:
        """
        Forget the state of destinations with nothing under way.
        """
        now = self.clock.seconds()
        for key, state in list(self.states.items()):
            state.unslow_if_over(now)
            if state.idle():
                del self.states[key]

    # -- which destination -----------------------------------------------

    def destination_of(self, route: Any) -> tuple[str, str, Limits]:
        """
        C{(key, domain, limits)} of C{route}: the key its budget is kept
        by (the domain, or the provider's name), its domain (for mail to
        given next hops: the first hop's host).
        """
        from relay.delivery.nexthop import parse_hop

        hosts = []
        for hop in route.hops:
            try:
                hosts.append(parse_hop(hop)[0].lower())
            except ValueError:
                continue
        destination = getattr(route, "destination", None)
        domain = getattr(destination, "domain", None)
        if not domain:
            domain = hosts[0] if hosts else ""
        domain = domain.lower().rstrip(".")
        config = self.config
        own = config.domains.get(domain)
        if own is not None:
            return domain, domain, own
        for provider in config.providers:
            if any(provider.matches(h) for h in hosts):
                return provider.name, domain, provider.limits or config.default
        return domain, domain, config.default

    # -- admission -------------------------------------------------------

    async def _state(self, key: str, limits: Limits) -> DestinationState:
        state = self.states.get(key)
        if state is not None and state.generation == self.generation:
            return state
        if self.limits_hook is not None:
            from relay.smtp.callbacks import call_callback

            try:
                chosen = await call_callback(self.limits_hook, key, limits)
            except Exception:
                self.log.failure("The plugin's destination_limits failed for {destination}", destination=key)
            else:
                if isinstance(chosen, Limits):
                    limits = chosen
                elif chosen is not None:
                    self.log.error(
                        "destination_limits returned {value!r} for {destination}, not Limits",
                        value=chosen, destination=key,
                    )  # fmt: skip
        # Looked up again: another delivery may have made it meanwhile.
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = DestinationState(key, limits, self.clock, self.generation)
        elif state.generation != self.generation:
            state.relimit(limits, self.generation)
        return state

    def _wait(self, entry_id: str, wait: Wait) -> Wait:
        self.waits[entry_id] = wait
        return wait

    def note_wait(self, entry_id: str, wait: Wait) -> Wait:
        """
        C{entry_id} waits for C{wait} (the client found that a new
        connection must wait).
        """
        return self._wait(entry_id, wait)

    async def admit(self, entry_id: str, route: Any) -> Admission | Wait:
        """
        May the delivery of C{entry_id} to C{route} start now?
        """
        key, domain, limits = self.destination_of(route)
        suspension = self.suspensions.get(domain) or self.suspensions.get(key)
        if suspension is not None:
            return self._wait(entry_id, Wait(suspension.name, SUSPENDED, suspension.until, suspension.reason))
        state = await self._state(key, limits)
        now = self.clock.seconds()
        state.unslow_if_over(now)
        limits = state.limits
        reserved = state.reserved.get(entry_id)
        if reserved is not None and reserved > now + 1e-9:
            return self._wait(entry_id, Wait(key, MESSAGE_RATE, reserved))
        if limits.max_connections is not None and state.in_use >= limits.max_connections:
            state.waiting[entry_id] = None
            return self._wait(entry_id, Wait(key, MAX_CONNECTIONS, None))
        if reserved is None and state.messages is not None and not state.messages.take():
            at = state.reserved[entry_id] = state.messages.reserve()
            return self._wait(entry_id, Wait(key, MESSAGE_RATE, at))
        state.reserved.pop(entry_id, None)
        state.waiting.pop(entry_id, None)
        self.waits.pop(entry_id, None)
        state.in_use += 1
        shaping = ConnectionShaping(
            key, limits.messages_per_connection, limits.source, limits.helo,
            lambda: self._connect(state),
        )  # fmt: skip
        return Admission(state, domain, shaping)

    def _connect(self, state: DestinationState) -> Wait | None:
        bucket = state.connections
        if bucket is None or bucket.take():
            return None
        return Wait(state.key, CONNECTION_RATE, bucket.next_free())

    def release(self, admission: Admission) -> None:
        """
        A delivery admitted has ended: wake the first entry waiting for a
        connection of its destination.
        """
        state = admission.state
        state.in_use -= 1
        while state.waiting:
            entry_id = next(iter(state.waiting))
            del state.waiting[entry_id]
            wait = self.waits.get(entry_id)
            if wait is not None and wait.reason == MAX_CONNECTIONS:
                self.on_wake(entry_id)
                break
        if state.idle() and self.states.get(state.key) is state:
            del self.states[state.key]

    def forget(self, entry_id: str) -> None:
        """
        C{entry_id} is settled, removed or frozen: it waits for nothing.
        """
        wait = self.waits.pop(entry_id, None)
        if wait is None:
            return
        state = self.states.get(wait.destination)
        if state is not None:
            state.waiting.pop(entry_id, None)
            state.reserved.pop(entry_id, None)

    def waiting_for(self, destination: str) -> list[str]:
        """
        The entries waiting for C{destination} (a key or domain).
        """
        return [i for i, w in self.waits.items() if w.destination == destination]

    def counts(self) -> dict[str, int]:
        """
        Entries waiting, by reason.
        """
        counts = dict.fromkeys(REASONS, 0)
        for wait in self.waits.values():
            counts[wait.reason] += 1
        return counts

    def by_destination(self) -> Iterable[tuple[str, str, int]]:
        """
        C{(destination, reason, entries)} for what waits, by destination.
        """
        tally: dict[tuple[str, str], int] = {}
        for wait in self.waits.values():
            tally[(wait.destination, wait.reason)] = tally.get((wait.destination, wait.reason), 0) + 1
        return sorted((d, r, n) for (d, r), n in tally.items())

    # -- reply rules -----------------------------------------------------

    def observe(self, admission: Admission, reply: Any) -> None:
        """
        A reply from the destination of C{admission}: the first reply rule
        that matches it acts.
        """
        code = getattr(reply, "code", None)
        if code is None or code < 400:
            return
        text = str(reply)
        state = admission.state
        for rule in self.config.rules:
            if not (rule.matches(state.key, text) or rule.matches(admission.domain, text)):
                continue
            now = self.clock.seconds()
            if rule.action == SUSPEND:
                self.suspensions.suspend(
                    state.key, now + rule.duration, f"reply rule: {text}", automatic=True
                )
            elif rule.action == SLOW and rule.rate is not None:
                state.slow(rule.rate, now + rule.duration)
                self.log.warn(
                    "{destination}: message rate lowered to {rate} for {duration} s: {reply}",
                    destination=state.key, rate=str(rule.rate), duration=rule.duration,
                    reply=text, event="slowed",
                )  # fmt: skip
            return

