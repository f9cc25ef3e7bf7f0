"""
Tests for L{relay.model.retry}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from relay import tap
from relay.model.retry import (
    DEFAULT_RETRY_INTERVALS,
    backoff_schedule,
    effective_intervals,
    next_attempt,
    parse_retry_intervals,
)


class DefaultScheduleTests(SynchronousTestCase):
    """
    The default schedule is Postfix-like.
    """

    def test_shape(self) -> None:
        """
        5 minutes first, doubling up to 4000 s, then every 4000 s.
        """
        self.assertEqual(DEFAULT_RETRY_INTERVALS[:5], (300, 600, 1200, 2400, 4000))
        self.assertEqual(set(DEFAULT_RETRY_INTERVALS[4:]), {4000})

    def test_total_about_five_days(self) -> None:
        """
        The intervals add up to five days (and less than one more step).
        """
        total = sum(DEFAULT_RETRY_INTERVALS)
        self.assertGreaterEqual(total, 5 * 86400)
        self.assertLess(total, 5 * 86400 + 4000)

    def test_backoff_schedule(self) -> None:
        """
        A custom schedule stops once the lifetime is covered.
        """
        self.assertEqual(backoff_schedule(10, 40, 100), (10, 20, 40, 40))


class ConsumeTests(SynchronousTestCase):
    """
    Consuming intervals.
    """

    def test_next_attempt(self) -> None:
        """
        The first interval is used up, the rest returned.
        """
        self.assertEqual(next_attempt((60, 120), 1000), (1060, (120,)))
        self.assertEqual(next_attempt((60,), 1000), (1060, ()))

    def test_exhausted(self) -> None:
        """
        No intervals left: C{None}.
        """
        self.assertIsNone(next_attempt((), 1000))

    def test_effective(self) -> None:
        """
        Empty and never tried means "none given": the defaults apply;
        empty after attempts means exhausted.
        """
        self.assertEqual(effective_intervals((), 0, (5, 6)), (5, 6))
        self.assertEqual(effective_intervals((), 0, ()), DEFAULT_RETRY_INTERVALS)
        self.assertEqual(effective_intervals((), 2, (5, 6)), ())
        self.assertEqual(effective_intervals((7,), 0, (5, 6)), (7,))


class ParseTests(SynchronousTestCase):
    """
    Parsing C{--retry-intervals}.
    """

    def test_parse(self) -> None:
        """
        Units and plain seconds; L{relay.tap} uses the same function.
        """
        self.assertEqual(parse_retry_intervals("30s,5m,1h,1d,7"), (30, 300, 3600, 86400, 7))
        self.assertIs(tap.parse_retry_intervals, parse_retry_intervals)

    def test_bad(self) -> None:
        """
        Empty or non-positive durations are refused.
        """
        for text in ("", "1m,,2m", "0", "-1", "5x"):
            self.assertRaises(ValueError, parse_retry_intervals, text)
