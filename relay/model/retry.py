"""
Retry schedules: parsing them, the default one, and consuming them.

All functions here are pure: time is passed in, nothing is scheduled.
"""

from __future__ import annotations

import re
from typing import Sequence

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)

#: Like Postfix's C{minimal_backoff_time}, C{maximal_backoff_time} and
#: C{maximal_queue_lifetime}.
MINIMAL_BACKOFF = 300.0
MAXIMAL_BACKOFF = 4000.0
MAXIMAL_LIFETIME = 5 * 86400.0


def backoff_schedule(
    minimal: float = MINIMAL_BACKOFF,
    maximal: float = MAXIMAL_BACKOFF,
    lifetime: float = MAXIMAL_LIFETIME,
) -> tuple[float, ...]:
    """
    A Postfix-like schedule: C{minimal}, doubling up to C{maximal}, then
    every C{maximal}, until the intervals add up to at least C{lifetime}.
    """
    intervals: list[float] = []
    total = 0.0
    interval = minimal
    while total < lifetime:
        intervals.append(interval)
        total += interval
        interval = min(interval * 2, maximal)
    return tuple(intervals)


#: The retry schedule of an envelope whose plugin gave none and when no
#: C{--retry-intervals} is configured: 5 minutes, doubling up to 4000
#: seconds, then every 4000 seconds, five days in all.
DEFAULT_RETRY_INTERVALS: tuple[float, ...] = backoff_schedule()


def parse_interval(text: str) -> float:
    """
    Parse one duration: a positive number of seconds, or a number with a
    unit C{s}, C{m}, C{h} or C{d}.

    @raise ValueError: when C{text} is not such a duration.
    """
    match = _INTERVAL.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 2h, 1d)")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
    if value <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return value


def parse_duration(text: str) -> float:
    """
    Parse a duration that may be zero (C{0}, C{0s}, C{7d}), e.g. a
    lifetime where 0 means "at once".

    @raise ValueError: when C{text} is not such a duration.
    """
    match = _INTERVAL.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 0, 30s, 5m, 2h, 7d)")
    return float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]


def parse_retry_intervals(text: str) -> tuple[float, ...]:
    """
    Parse a comma-separated list of durations, e.g. C{1m,5m,1h}.
    """
    parts = [part for part in text.split(",")]
    if not parts or any(not part.strip() for part in parts):
        raise ValueError(f"empty duration in {text!r}")
    return tuple(parse_interval(part) for part in parts)


def effective_intervals(
    intervals: Sequence[float],
    attempts_made: int,
    defaults: Sequence[float] = DEFAULT_RETRY_INTERVALS,
) -> tuple[float, ...]:
    """
    The intervals left for an entry.  An entry that has never been tried
    and has no intervals was given none (by its plugin): it gets
    C{defaults}.  An entry that has been tried and has none left has
    exhausted its schedule.
    """
    if not intervals and attempts_made == 0:
        return tuple(defaults) or DEFAULT_RETRY_INTERVALS
    return tuple(intervals)


def next_attempt(
    intervals: Sequence[float], now: float
) -> tuple[float, tuple[float, ...]] | None:
    """
    Consume the first interval: C{(when the next attempt is due, the
    intervals left)}, or C{None} when there are none left.
    """
    if not intervals:
        return None
    return now + float(intervals[0]), tuple(float(i) for i in intervals[1:])
