"""
Tests for L{relay.control.summary}: the qshape-like tally and its text.
"""

from __future__ import annotations

import dataclasses

from twisted.trial.unittest import SynchronousTestCase

from relay.control.summary import QueueShape, bucket, format_summary
from tests.test_ctl import NOW, make_entry


class SummaryTests(SynchronousTestCase):
    def test_buckets(self) -> None:
        """
        The buckets are 0-5, 5-10, 10-20, ... 160-320 minutes and 320+.
        """
        self.assertEqual([bucket(m * 60) for m in (0, 4.9, 5, 10, 19, 20, 40, 80, 160, 319, 320, 9999)],
                         [0, 0, 1, 2, 2, 3, 4, 5, 6, 6, 7, 7])  # fmt: skip

    def test_by_domain(self) -> None:
        """
        An entry counts once in each domain it still holds recipients in
        (failed ones included) and once in the total; rows come most
        first, then by name; C{top} keeps the first N.
        """
        shape = QueueShape(NOW)
        shape.add(make_entry("aaaa-0", recipients=("x@a.example", "y@b.example", "z@B.example"),
                             created=NOW - 60))  # fmt: skip
        shape.add(make_entry("bbbb-0", recipients=("x@b.example",), created=NOW - 700))
        shape.add(dataclasses.replace(make_entry("cccc-0", recipients=(), created=NOW - 30000),
                                      failed_recipients=(("q@c.example", "550"),)))  # fmt: skip
        shape.add(dataclasses.replace(make_entry("dddd-0", recipients=(), created=NOW - 10),
                                      delivered_recipients=("w@d",)))  # fmt: skip
        self.assertEqual(shape.entries, 4)
        self.assertEqual(shape.total, [2, 0, 1, 0, 0, 0, 0, 1])
        self.assertEqual(shape.top(0), [
            ("b.example", [1, 0, 1, 0, 0, 0, 0, 0]),
            ("(none)", [1, 0, 0, 0, 0, 0, 0, 0]),
            ("a.example", [1, 0, 0, 0, 0, 0, 0, 0]),
            ("c.example", [0, 0, 0, 0, 0, 0, 0, 1]),
        ])  # fmt: skip
        self.assertEqual([name for name, _ in shape.top(2)], ["b.example", "(none)"])

    def test_by_next_hop(self) -> None:
        """
        By next hop: the entry's first hop, or the default route's current
        hop when known, else its own row.
        """
        entries = [make_entry("aaaa-0", hops=("MX1:25", "mx2:25")), make_entry("bbbb-0", hops=())]
        shape = QueueShape(NOW, "next-hop")
        shape.add_all(entries)
        self.assertEqual([name for name, _ in shape.top(0)], ["(default route)", "mx1:25"])
        shape = QueueShape(NOW, "next-hop", default_hop="smart:25")
        shape.add_all(entries)
        self.assertEqual([name for name, _ in shape.top(0)], ["mx1:25", "smart:25"])
        self.assertRaises(ValueError, QueueShape, NOW, "color")

    def test_format(self) -> None:
        """
        The text: a header of bucket bounds in minutes with T the total,
        the TOTAL line first, columns right-aligned.
        """
        text = format_summary(
            [("example.com", [3, 0, 0, 0, 0, 0, 0, 120]), ("b.example", [1, 0, 0, 0, 0, 0, 0, 0])],
            [4, 0, 0, 0, 0, 0, 0, 120],
        )
        self.assertEqual(text, (
            "DOMAIN        T 5 10 20 40 80 160 320 320+\n"
            "TOTAL       124 4  0  0  0  0   0   0  120\n"
            "example.com 123 3  0  0  0  0   0   0  120\n"
            "b.example     1 1  0  0  0  0   0   0    0\n"
        ))  # fmt: skip
        self.assertTrue(format_summary([], [0] * 8, "next-hop").startswith("NEXT HOP T 5"))
