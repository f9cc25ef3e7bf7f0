"""
What an operator's action does to one spool entry: pure functions from
the entry to a L{Change} (or none), so that the rules read in one place
and the control endpoint only carries them out.

The rules agree with the delivery scheduler's:
  - a settled entry (no pending recipient) is left alone by C{send} and
    C{send-now} unless C{--retry-failed}, which puts its failed
    recipients back to pending and un-reports them (they are bounced
    again only if they fail again);
  - freeze and remove set C{moved_at} (when the entry came into its
    queue: removed entries expire from then);
  - C{send --next-hop HOST} reroutes (C{next_hop_choices=(HOST,)}) and
    makes the entry due now.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from relay.model.address import EmailAddress
from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, REMOVED, SpoolEntry

FROZEN_BY_OPERATOR = "frozen by operator"

#: the queues each action looks at with --all or a filter, and those an
#: id it is given may be in
SCANNED = {
    "freeze": (ACTIVE,),
    "send": (ACTIVE, FROZEN),
    "send-now": (ACTIVE, FROZEN),
    "remove": (ACTIVE, FROZEN),
}
ACCEPTED = {
    "freeze": (ACTIVE, FROZEN),
    "send": (ACTIVE, FROZEN),
    "send-now": (ACTIVE, FROZEN),
    "remove": (ACTIVE, FROZEN, QUARANTINE, REMOVED),
}


@dataclass(frozen=True)
class Change:
    """
    What to do to an entry: write C{entry} (its new metadata, in the queue
    it is in) unless it is C{None}, then move it to C{move_to} unless that
    is C{None}.
    """

    entry: SpoolEntry | None
    move_to: str | None = None


@dataclass(frozen=True)
class SendOptions:
    """
    How C{send} and C{send-now} treat each entry.

    @ivar schedule: a new retry schedule (from step 0), or C{None}.
    @ivar next_hop: reroute to this hop, or C{None}.
    @ivar retry_failed: put failed recipients back to pending.
    """

    schedule: Sequence[float] | None = None
    next_hop: str | None = None
    retry_failed: bool = False


def freeze(entry: SpoolEntry, now: float) -> Change | None:
    """
    An active entry is frozen (kept, not retried); a frozen one stays.
    """
    if entry.queue != ACTIVE:
        return None
    return Change(dataclasses.replace(entry, reason=FROZEN_BY_OPERATOR, moved_at=now), FROZEN)


def remove(entry: SpoolEntry, now: float) -> Change | None:
    """
    An entry goes to the removed queue (kept for C{recover}, expiring
    after C{--removed-lifetime} from now); a removed one stays.
    """
    if entry.queue == REMOVED:
        return None
    return Change(dataclasses.replace(entry, moved_at=now), REMOVED)


def recover(entry: SpoolEntry, now: float) -> Change:
    """
    A removed or quarantined entry comes back, frozen.
    """
    return Change(dataclasses.replace(entry, moved_at=now), FROZEN)


def retried(entry: SpoolEntry) -> SpoolEntry:
    """
    C{entry} with its failed recipients pending again and no longer
    reported (they are bounced again only if they fail again).
    """
    if not entry.failed_recipients:
        return entry
    failed = [r for r, _ in entry.failed_recipients]
    pending = list(entry.recipients)
    known = {str(r) for r in pending}
    for r in failed:
        if r not in known:
            pending.append(EmailAddress.parse(r, smtputf8=True))
            known.add(r)
    again = set(failed)
    return dataclasses.replace(
        entry,
        recipients=tuple(pending),
        failed_recipients=(),
        reported=tuple(r for r in entry.reported if r not in again),
    )


def send(entry: SpoolEntry, now: float, options: SendOptions) -> Change | None:
    """
    C{send}: the entry is due now (a frozen one goes back to the active
    queue), rerouted and given a new schedule if asked.  C{None} when
    nothing changes: it is settled (and no C{retry_failed}), or already
    due with nothing else to change.
    """
    new = retried(entry) if options.retry_failed else entry
    if new.settled:
        return None
    changes: dict[str, object] = {}
    if new.next_attempt_at > now or entry.queue == FROZEN:
        changes["next_attempt_at"] = now
    if options.schedule is not None and (
        tuple(new.schedule) != tuple(options.schedule) or new.step != 0
    ):
        changes["schedule"] = tuple(options.schedule)
        changes["step"] = 0
    if options.next_hop is not None and tuple(new.next_hop_choices) != (options.next_hop,):
        changes["next_hop_choices"] = (options.next_hop,)
        changes["next_attempt_at"] = now
    move_to = None
    if entry.queue == FROZEN:
        changes["reason"] = None
        changes["moved_at"] = now
        move_to = ACTIVE
    if changes:
        new = dataclasses.replace(new, **changes)  # type: ignore[arg-type]
    if new == entry:
        return None
    return Change(new, move_to)


def send_now(entry: SpoolEntry, now: float, options: SendOptions) -> Change | None:
    """
    C{send-now}: as L{send} (without a new schedule or hop), and the
    scheduler delivers it at once.  An entry with pending recipients is
    always tried (a change with no new metadata when it is active and
    due); a settled one only with C{retry_failed}.
    """
    change = send(entry, now, SendOptions(retry_failed=options.retry_failed))
    if change is not None:
        return change
    new = retried(entry) if options.retry_failed else entry
    if new.settled:
        return None
    return Change(None)
