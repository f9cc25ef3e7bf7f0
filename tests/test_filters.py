"""
Tests for L{relay.control.filters}: which entries the operator's filters
admit, and what the id alone can decide.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from relay.control.filters import EntryFilter, held_recipients, normal_hop
from relay.model.entry import new_id
from tests.test_ctl import NOW, make_entry


def only(**kw: object) -> EntryFilter:
    return EntryFilter.build(NOW, **kw)  # type: ignore[arg-type]


class BuildTests(SynchronousTestCase):
    def test_bad_values(self) -> None:
        """
        Values that make no sense are a L{ValueError} naming the option.
        """
        cases = [
            ({"sender": "nobody"}, "--sender"),
            ({"recipient": "<>"}, "--recipient"),
            ({"via": "host:port"}, "--next-hop"),
            ({"via": "host:0"}, "--next-hop"),
            ({"younger": "soon"}, "--younger"),
            ({"older": -5.0}, "--older"),
        ]
        for kw, option in cases:
            e = self.assertRaises(ValueError, EntryFilter.build, NOW, **kw)
            self.assertIn(option, str(e))

    def test_wire_round_trip(self) -> None:
        """
        A filter's wire form builds the same filter; an empty one is empty
        and admits anything by its id.
        """
        f = only(sender="A@Example.org", recipient="@x.example", via="MX:26", younger="1h", older=60)
        self.assertEqual(EntryFilter.from_wire(NOW, None, f.to_wire()), f)
        self.assertEqual(f.to_wire()["via"], "mx:26")
        empty = only()
        self.assertTrue(empty.empty)
        self.assertEqual(empty.admits_id("anything-0"), True)
        self.assertFalse(f.empty)

    def test_normal_hop(self) -> None:
        """
        Hops compare by lower-cased host and port (25 when not given).
        """
        self.assertEqual(normal_hop("MX.Example.NET"), ("mx.example.net", 25))
        self.assertEqual(normal_hop("[2001:db8::1]:587"), ("2001:db8::1", 587))


class AdmitsTests(SynchronousTestCase):
    def test_sender(self) -> None:
        """
        C{--sender} matches the whole address or its domain, case aside;
        C{<>} the null sender only.
        """
        entry = make_entry("aaaa-0", sender="Bob@Example.org")
        null = make_entry("bbbb-0", sender="")
        self.assertTrue(only(sender="bob@example.ORG").admits(entry))
        self.assertTrue(only(sender="@EXAMPLE.org").admits(entry))
        self.assertFalse(only(sender="@org").admits(entry))
        self.assertFalse(only(sender="alice@example.org").admits(entry))
        self.assertFalse(only(sender="@example.org").admits(null))
        self.assertTrue(only(sender="<>").admits(null))
        self.assertFalse(only(sender="<>").admits(entry))

    def test_recipient(self) -> None:
        """
        C{--recipient} matches a pending or failed recipient, not a
        delivered one.
        """
        import dataclasses

        entry = dataclasses.replace(
            make_entry("aaaa-0", recipients=("p@pending.example",)),
            failed_recipients=(("f@failed.example", "550 no"),),
            delivered_recipients=("d@done.example",),
        )
        self.assertEqual(held_recipients(entry), ["p@pending.example", "f@failed.example"])
        self.assertTrue(only(recipient="@pending.example").admits(entry))
        self.assertTrue(only(recipient="F@failed.example").admits(entry))
        self.assertFalse(only(recipient="@done.example").admits(entry))

    def test_via(self) -> None:
        """
        C{--next-hop} matches any of the entry's hops; an entry on the
        default route matches C{default}, and the relay's smarthost when
        it is known.
        """
        own = make_entry("aaaa-0", hops=("mx1.example:25", "MX2.example:2525"))
        default = make_entry("bbbb-0", hops=())
        self.assertTrue(only(via="mx2.example:2525").admits(own))
        self.assertTrue(only(via="mx1.example").admits(own))
        self.assertFalse(only(via="mx2.example").admits(own))
        self.assertFalse(only(via="default").admits(own))
        self.assertTrue(only(via="default").admits(default))
        self.assertFalse(only(via="smart.example").admits(default))
        self.assertTrue(
            EntryFilter.build(NOW, via="smart.example", default_hop="Smart.Example:25").admits(default)
        )

    def test_age_from_the_id(self) -> None:
        """
        The age filters decide from an id that carries its time, with no
        need of the entry: C{False} when out, C{True} when in and nothing
        else is asked; C{None} (read the entry) otherwise.
        """
        hour_old = new_id(NOW - 3600)
        self.assertIs(only(older="30m").admits_id(hour_old), True)
        self.assertIs(only(older="2h").admits_id(hour_old), False)
        self.assertIs(only(younger="2h").admits_id(hour_old), True)
        self.assertIs(only(younger="30m").admits_id(hour_old), False)
        self.assertIs(only(older="30m", sender="@x.example").admits_id(hour_old), None)
        self.assertIs(only(older="2h", sender="@x.example").admits_id(hour_old), False)
        self.assertIs(only(older="30m").admits_id("plugin-id-0"), None)
        self.assertIs(only(sender="@x.example").admits_id(hour_old), None)

    def test_age_without_time_in_the_id(self) -> None:
        """
        An entry whose id carries no time is aged by its creation time;
        C{older} includes its bound, C{younger} excludes it.
        """
        entry = make_entry("plugin-0", created=NOW - 600)
        self.assertTrue(only(older=600).admits(entry))
        self.assertFalse(only(younger=600).admits(entry))
        self.assertTrue(only(younger=601, older=599).admits(entry))

    def test_and(self) -> None:
        """
        Every condition given must hold.
        """
        entry = make_entry("aaaa-0", sender="s@example.org", recipients=("a@example.com",))
        self.assertTrue(only(sender="@example.org", recipient="@example.com").admits(entry))
        self.assertFalse(only(sender="@example.org", recipient="@example.net").admits(entry))
