"""
Tests for L{relay.control.actions}: what freeze, send, send-now, remove
and recover do to one entry.
"""

from __future__ import annotations

import dataclasses

from twisted.trial.unittest import SynchronousTestCase

from relay.control import actions
from relay.control.actions import Change, SendOptions
from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, REMOVED
from tests.test_ctl import NOW, make_entry


def settled(queue: str = FROZEN) -> object:
    return dataclasses.replace(
        make_entry("aaaa-0", queue=queue, recipients=()),
        failed_recipients=(("a@example.com", "550 5.1.1 no such user"),),
        reported=("a@example.com",),
        delivered_recipients=("b@example.com",),
    )


class ActionTests(SynchronousTestCase):
    def test_freeze(self) -> None:
        """
        An active entry is frozen by the operator from now; a frozen one
        is left as it is.
        """
        entry = make_entry("aaaa-0")
        change = actions.freeze(entry, NOW)
        assert change is not None and change.entry is not None
        self.assertEqual((change.move_to, change.entry.reason, change.entry.moved_at),
                         (FROZEN, "frozen by operator", NOW))  # fmt: skip
        self.assertIsNone(actions.freeze(make_entry("aaaa-0", queue=FROZEN), NOW))

    def test_remove_and_recover(self) -> None:
        """
        Remove takes any entry but a removed one to the removed queue from
        now; recover brings one back frozen.
        """
        for queue in (ACTIVE, FROZEN, QUARANTINE):
            change = actions.remove(make_entry("aaaa-0", queue=queue), NOW)
            assert change is not None and change.entry is not None
            self.assertEqual((change.move_to, change.entry.moved_at), (REMOVED, NOW))
        self.assertIsNone(actions.remove(make_entry("aaaa-0", queue=REMOVED), NOW))
        self.assertEqual(actions.recover(make_entry("aaaa-0", queue=REMOVED), NOW).move_to, FROZEN)

    def test_send_active(self) -> None:
        """
        An active entry not yet due is made due now; one already due, with
        nothing else to change, is left alone.
        """
        waiting = make_entry("aaaa-0", next_attempt=NOW + 120)
        change = actions.send(waiting, NOW, SendOptions())
        assert change is not None and change.entry is not None
        self.assertEqual((change.entry.next_attempt_at, change.move_to), (NOW, None))
        due = make_entry("aaaa-0", next_attempt=NOW - 5)
        self.assertIsNone(actions.send(due, NOW, SendOptions()))

    def test_send_frozen(self) -> None:
        """
        A frozen entry goes back to the active queue, due now, its reason
        gone.
        """
        frozen = make_entry("aaaa-0", queue=FROZEN, reason="frozen by operator")
        change = actions.send(frozen, NOW, SendOptions(schedule=(5.0,)))
        assert change is not None and change.entry is not None
        self.assertEqual(
            (change.move_to, change.entry.reason, change.entry.next_attempt_at,
             change.entry.schedule, change.entry.step, change.entry.moved_at),
            (ACTIVE, None, NOW, (5.0,), 0, NOW),
        )  # fmt: skip

    def test_send_settled(self) -> None:
        """
        A settled entry is left alone by send (whatever else is asked) and
        by send-now; C{retry_failed} puts its failed recipients back to
        pending, un-reported, its delivered ones staying delivered.
        """
        entry = settled()
        self.assertIsNone(actions.send(entry, NOW, SendOptions()))  # type: ignore[arg-type]
        self.assertIsNone(actions.send(entry, NOW, SendOptions(next_hop="x:25")))  # type: ignore[arg-type]
        self.assertIsNone(actions.send_now(entry, NOW, SendOptions()))  # type: ignore[arg-type]
        change = actions.send(entry, NOW, SendOptions(retry_failed=True))  # type: ignore[arg-type]
        assert change is not None and change.entry is not None
        new = change.entry
        self.assertEqual(
            ([str(r) for r in new.recipients], new.failed_recipients, new.reported,
             new.delivered_recipients, change.move_to),
            (["a@example.com"], (), (), ("b@example.com",), ACTIVE),
        )  # fmt: skip

    def test_reroute(self) -> None:
        """
        C{next_hop} makes the hop the entry's only one, due now; an entry
        already routed there is unchanged.
        """
        change = actions.send(make_entry("aaaa-0", next_attempt=NOW - 1), NOW,
                              SendOptions(next_hop="new.example:25"))  # fmt: skip
        assert change is not None and change.entry is not None
        self.assertEqual((change.entry.next_hop_choices, change.entry.next_attempt_at),
                         (("new.example:25",), NOW))  # fmt: skip
        there = make_entry("aaaa-0", hops=("new.example:25",), next_attempt=NOW - 1)
        self.assertIsNone(actions.send(there, NOW, SendOptions(next_hop="new.example:25")))

    def test_send_now(self) -> None:
        """
        send-now of a pending active entry that is due changes no metadata
        but is a change (it is tried now).
        """
        self.assertEqual(
            actions.send_now(make_entry("aaaa-0", next_attempt=NOW - 1), NOW, SendOptions()),
            Change(None),
        )
