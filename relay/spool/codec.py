"""
The spool's format: a L{SpoolEntry} as the bytes of its metadata file, and
as the JSON-able dict that entries travel in (the control endpoint's
C{Status}, a receiver's reports to the master, C{relayctl status --format
json}).

Versions.  Every metadata file says which version of the format it is in.
L{encode_entry} writes L{FILE_VERSION}; L{decode_entry} and
L{entry_from_json} read every version in L{_DECODERS}, so that a spool an
older relay wrote stays readable after an upgrade.  A new format is one
encoder (in L{_ENCODERS}) and one decoder (in L{_DECODERS}) here, and a
bump of L{FILE_VERSION}; nothing outside this module changes (a format
that is not a JSON object would be told apart by its first byte, in
L{decode_entry}).
L{entry_to_json} is the current version too (it is what travels to
the master, over the control endpoint and out of C{relayctl status
--format json}).

Version 2 (the current one) is compact: fields at their default are left
out, the retry schedule is stored by reference (none: the relay's default)
and position (C{step}), and only the first and the last few attempt
records are kept, with their count.  Version 1 files (which repeated the
whole remaining schedule and every attempt) are read and carried forward
(see L{_from_v1}); they are written as version 2 at their next change.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from relay.model.address import NULL_SENDER, EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.entry import Attempt, SpoolEntry, TLSOutcome

#: the version L{encode_entry} writes
FILE_VERSION = 2

#: C{step} of a version 1 entry whose schedule was used up: past the end
#: of any schedule
_EXHAUSTED = 1 << 30


def _args_to_json(args: Iterable[Argument]) -> list[list[str | None]]:
    return [[a.keyword, a.value] for a in args]


def _args_from_json(value: Iterable[list[str | None]]) -> tuple[Argument, ...]:
    return tuple(Argument(str(k), v) for k, v in value)


def _address(text: str) -> EmailAddress:
    return EmailAddress.parse(text, smtputf8=True)


def _peer_from_json(data: Any) -> tuple[str, int] | None:
    """
    An attempt's C{address} as version 1 writes it; C{None} when absent
    (entries written before attempts recorded it).
    """
    if data is None:
        return None
    host, port = data
    return str(host), int(port)


def _attempt_to_json(a: Attempt) -> dict[str, Any]:
    data: dict[str, Any] = {"at": a.at, "hop": a.hop, "code": a.code, "reply": a.reply}
    if a.recipients:
        data["recipients"] = list(a.recipients)
    if a.address is not None:
        data["address"] = list(a.address)
    if a.tls is not None:
        tls = {"policy": a.tls.policy, "source": a.tls.source, "result": a.tls.result}
        if a.tls.detail:
            tls["detail"] = a.tls.detail
        data["tls"] = tls
    if a.failure_class is not None:
        data["class"] = a.failure_class
    return data


def _tls_from_json(data: Any) -> TLSOutcome | None:
    """
    An attempt's C{tls} outcome; C{None} when absent (entries written
    before attempts recorded it).
    """
    if data is None:
        return None
    return TLSOutcome(
        str(data["policy"]), str(data["source"]), str(data["result"]), data.get("detail")
    )


def _attempt_from_json(a: dict[str, Any]) -> Attempt:
    return Attempt(
        at=float(a["at"]),
        hop=a["hop"],
        code=a.get("code"),
        reply=a["reply"],
        recipients=tuple(a.get("recipients", ())),
        address=_peer_from_json(a.get("address")),
        tls=_tls_from_json(a.get("tls")),
        # Absent from entries written before attempts recorded it.
        failure_class=a.get("class"),
    )


def _to_v2(entry: SpoolEntry) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 2,
        "id": entry.id,
        "queue": entry.queue,
        "envelope_id": entry.envelope_id,
        "sender": str(entry.sender),
        "recipients": [str(r) for r in entry.recipients],
        "created_at": entry.created_at,
        "next_attempt_at": entry.next_attempt_at,
        "message_size": entry.message_size,
    }
    optional: dict[str, Any] = {
        "sender_args": _args_to_json(entry.sender_args),
        "next_hop_choices": list(entry.next_hop_choices),
        "schedule": list(entry.schedule),
        "step": entry.step,
        "recipient_args": [[addr, _args_to_json(args)] for addr, args in entry.recipient_args],
        "rejected_recipients": [str(r) for r in entry.rejected_recipients],
        "failed_recipients": [[r, text] for r, text in entry.failed_recipients],
        "reported": list(entry.reported),
        "delivered_recipients": list(entry.delivered_recipients),
        "attempts": [_attempt_to_json(a) for a in entry.attempts],
        "attempt_count": entry.attempt_count if entry.attempt_count != len(entry.attempts) else 0,
        "reason": entry.reason,
        "received_from": entry.received_from,
        "tls_policy": entry.tls_policy,
        "warned_at": entry.warned_at,
        "message_canonical": entry.message_canonical,
        "message_dot_free": entry.message_dot_free,
        "moved_at": entry.moved_at if entry.moved_at != entry.created_at else None,
    }
    data.update((key, value) for key, value in optional.items() if value)
    return data


def _from_v2(data: dict[str, Any], queue: str | None) -> SpoolEntry:
    sender_text = data["sender"]
    sender = NULL_SENDER if not sender_text else Sender(_address(sender_text))
    return SpoolEntry(
        id=data["id"],
        queue=queue if queue is not None else data["queue"],
        envelope_id=data["envelope_id"],
        sender=sender,
        sender_args=_args_from_json(data.get("sender_args", ())),
        recipients=tuple(_address(r) for r in data["recipients"]),
        next_hop_choices=tuple(data.get("next_hop_choices", ())),
        schedule=tuple(float(i) for i in data.get("schedule", ())),
        step=int(data.get("step", 0)),
        created_at=float(data["created_at"]),
        next_attempt_at=float(data["next_attempt_at"]),
        moved_at=float(data["moved_at"]) if data.get("moved_at") is not None else None,
        message_size=int(data["message_size"]),
        recipient_args=tuple(
            (str(addr), _args_from_json(args)) for addr, args in data.get("recipient_args", ())
        ),
        rejected_recipients=tuple(_address(r) for r in data.get("rejected_recipients", ())),
        failed_recipients=tuple((str(r), str(t)) for r, t in data.get("failed_recipients", ())),
        reported=tuple(str(r) for r in data.get("reported", ())),
        delivered_recipients=tuple(str(r) for r in data.get("delivered_recipients", ())),
        attempts=tuple(_attempt_from_json(a) for a in data.get("attempts", ())),
        attempt_count=int(data.get("attempt_count", 0)),
        reason=data.get("reason"),
        received_from=data.get("received_from"),
        tls_policy=data.get("tls_policy"),
        warned_at=float(data["warned_at"]) if data.get("warned_at") is not None else None,
        # Absent from entries written before it was recorded: normalized.
        message_canonical=bool(data.get("message_canonical", False)),
        message_dot_free=bool(data.get("message_dot_free", False)),
    )


def _from_v1(data: dict[str, Any], queue: str | None) -> SpoolEntry:
    """
    A version 1 document, carried forward: its remaining retry intervals
    become the entry's own schedule from step 0 (or the default schedule
    when it was never tried and had none, or a used-up one when it was
    tried and had none left, as version 1 read them); of its attempts the
    first and the last few are kept with their count; its failed
    recipients count as reported (version 1 bounced them when it froze
    the entry, and its repeated bounces were the bug version 2 mends).
    """
    intervals = tuple(float(i) for i in data.get("retry_intervals", ()))
    attempts = tuple(_attempt_from_json(a) for a in data.get("attempts", ()))
    if intervals:
        schedule, step = intervals, 0
    else:
        schedule, step = (), (_EXHAUSTED if attempts else 0)
    failed = tuple((str(r), str(t)) for r, t in data.get("failed_recipients", ()))
    created_at = float(data["created_at"])
    document = dict(
        data,
        version=2,
        schedule=list(schedule),
        step=step,
        attempts=[],
        reported=[r for r, _ in failed],
        moved_at=max([created_at] + [a.at for a in attempts]),
    )
    entry = _from_v2(document, queue)
    return entry.with_attempts(attempts)


#: the document of an entry, by the version it is written in
_ENCODERS: dict[int, Callable[[SpoolEntry], dict[str, Any]]] = {2: _to_v2}
#: the entry a document holds, by the version the document says it is in
_DECODERS: dict[int, Callable[[dict[str, Any], str | None], SpoolEntry]] = {
    1: _from_v1,
    2: _from_v2,
}


def entry_to_json(entry: SpoolEntry) -> dict[str, Any]:
    """
    The JSON-able form of a L{SpoolEntry} (the current version; see
    L{entry_from_json}).
    """
    return _ENCODERS[FILE_VERSION](entry)


def entry_from_json(data: dict[str, Any], queue: str | None = None) -> SpoolEntry:
    """
    The L{SpoolEntry} that C{data} (a metadata document of any version this
    code reads) holds.

    @param queue: the queue the entry is in (the directory its file is in),
        which wins over the C{"queue"} recorded in C{data}.
    @raise ValueError: if C{data} is not a spool entry this code can read
        (C{KeyError} or C{TypeError} when a field is missing or mistyped).
    """
    version = data.get("version")
    decode = _DECODERS.get(version) if type(version) is int else None
    if decode is None:
        raise ValueError(f"unsupported spool entry version {version!r}")
    return decode(data, queue)


def encode_entry(entry: SpoolEntry) -> bytes:
    """
    The bytes of C{entry}'s metadata file, in L{FILE_VERSION}.
    """
    # compact: json's C encoder does not indent
    text = json.dumps(_ENCODERS[FILE_VERSION](entry), sort_keys=True, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


def decode_entry(data: bytes, queue: str | None = None) -> SpoolEntry:
    """
    The L{SpoolEntry} that the metadata file holding C{data} describes.

    @param queue: as for L{entry_from_json}.
    @raise ValueError: if C{data} is not a spool entry this code can read
        (C{KeyError} or C{TypeError} when a field is missing or mistyped).
    """
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("a spool entry is a JSON object")
    return entry_from_json(document, queue)
