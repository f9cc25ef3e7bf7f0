"""
Rates (C{"100/min"}) and the token buckets that keep them.

A L{TokenBucket} is kept as the generic cell rate algorithm (GCRA, the
algorithm of redis-cell, which KumoMTA's throttles use): one number, the
theoretical arrival time of the next unit, instead of a token count topped
up by a timer.  A unit may go at once when that time is no later than now
plus the burst allowance; taking it moves the time on by one emission
interval (the interval of the rate divided by its count).  A bucket of
burst 1 spaces units evenly: at C{"600/min"} one every 0.1 seconds.

A bucket can also I{reserve} a unit in the future, which is how waiting
messages are spread: each waiting message gets a time of its own, instead
of all of them waking at the next free unit and all but one waiting again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

#: seconds per unit of a rate
UNITS = {"sec": 1.0, "s": 1.0, "min": 60.0, "m": 60.0, "hour": 3600.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(sec|min|hour|s|m|h)\s*$")
# Float drift: a clock advanced by 0.1 ten times is not at exactly 1.0.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Rate:
    """
    C{count} units per C{per} seconds.
    """

    count: int
    per: float

    def __post_init__(self) -> None:
        if self.count < 1 or self.per <= 0:
            raise ValueError(f"a rate is at least 1 per a positive interval, not {self}")

    @property
    def interval(self) -> float:
        """
        Seconds between units when they are spaced evenly.
        """
        return self.per / self.count

    def __str__(self) -> str:
        unit = {1.0: "sec", 60.0: "min", 3600.0: "hour"}.get(self.per)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.per:g}s"


def parse_rate(text: str) -> Rate:
    """
    Parse C{"N/sec"}, C{"N/min"} or C{"N/hour"} (also C{s}, C{m}, C{h}).

    @raise ValueError: when C{text} is not such a rate.
    """
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"not a rate: {text!r} (use N/sec, N/min or N/hour, N at least 1)")
    return Rate(int(match.group(1)), UNITS[match.group(2)])


class TokenBucket:
    """
    Keep C{rate}, allowing C{burst} units at once, by the injected C{clock}.

    @ivar tat: the theoretical arrival time of the next unit.
    """

    def __init__(self, rate: Rate, clock: IReactorTime, burst: int = 1) -> None:
        if burst < 1:
            raise ValueError(f"a burst is at least 1, not {burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self.tat = clock.seconds()

    @property
    def _tolerance(self) -> float:
        return (self.burst - 1) * self.rate.interval

    def next_free(self) -> float:
        """
        When a unit may be taken next (now or later).
        """
        return max(self._clock.seconds(), self.tat - self._tolerance)

    def take(self) -> bool:
        """
        Take a unit now, if one is free.
        """
        now = self._clock.seconds()
        if self.tat - self._tolerance > now + _EPSILON:
            return False
        self.tat = max(self.tat, now) + self.rate.interval
        return True

    def reserve(self) -> float:
        """
        Take the next free unit, now or in the future.

        @return: the time the unit is for (now, if one is free now).
        """
        at = self.next_free()
        self.tat = max(self.tat, self._clock.seconds()) + self.rate.interval
        return at

    def idle(self) -> bool:
        """
        Is the bucket as full as a new one?  (Then forgetting it changes
        nothing.)
        """
        return self.tat <= self._clock.seconds() + _EPSILON
