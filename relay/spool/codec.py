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
L{entry_to_json} stays version 1: it is what operators and the other
processes read, and it does not change with the file format.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from relay.model.address import NULL_SENDER, EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.entry import Attempt, SpoolEntry

#: the version L{encode_entry} writes
FILE_VERSION = 1


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


def _to_v1(entry: SpoolEntry) -> dict[str, Any]:
    return {
        "version": 1,
        "id": entry.id,
        "queue": entry.queue,
        "envelope_id": entry.envelope_id,
        "sender": str(entry.sender),
        "sender_args": _args_to_json(entry.sender_args),
        "recipients": [str(r) for r in entry.recipients],
        "next_hop_choices": list(entry.next_hop_choices),
        "retry_intervals": list(entry.retry_intervals),
        "created_at": entry.created_at,
        "next_attempt_at": entry.next_attempt_at,
        "message_size": entry.message_size,
        "recipient_args": [[addr, _args_to_json(args)] for addr, args in entry.recipient_args],
        "rejected_recipients": [str(r) for r in entry.rejected_recipients],
        "failed_recipients": [[r, text] for r, text in entry.failed_recipients],
        "attempts": [
            {
                "at": a.at,
                "hop": a.hop,
                "code": a.code,
                "reply": a.reply,
                "recipients": list(a.recipients),
                "address": list(a.address) if a.address is not None else None,
            }
            for a in entry.attempts
        ],
        "reason": entry.reason,
        "received_from": entry.received_from,
    }


def _from_v1(data: dict[str, Any], queue: str | None) -> SpoolEntry:
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
        retry_intervals=tuple(float(i) for i in data.get("retry_intervals", ())),
        created_at=float(data["created_at"]),
        next_attempt_at=float(data["next_attempt_at"]),
        message_size=int(data["message_size"]),
        recipient_args=tuple(
            (str(addr), _args_from_json(args)) for addr, args in data.get("recipient_args", ())
        ),
        rejected_recipients=tuple(_address(r) for r in data.get("rejected_recipients", ())),
        failed_recipients=tuple((str(r), str(t)) for r, t in data.get("failed_recipients", ())),
        attempts=tuple(
            Attempt(
                at=float(a["at"]),
                hop=a["hop"],
                code=a.get("code"),
                reply=a["reply"],
                recipients=tuple(a.get("recipients", ())),
                address=_peer_from_json(a.get("address")),
            )
            for a in data.get("attempts", ())
        ),
        reason=data.get("reason"),
        received_from=data.get("received_from"),
    )


#: the document of an entry, by the version it is written in
_ENCODERS: dict[int, Callable[[SpoolEntry], dict[str, Any]]] = {1: _to_v1}
#: the entry a document holds, by the version the document says it is in
_DECODERS: dict[int, Callable[[dict[str, Any], str | None], SpoolEntry]] = {1: _from_v1}


def entry_to_json(entry: SpoolEntry) -> dict[str, Any]:
    """
    The JSON-able form of a L{SpoolEntry} (version 1; see
    L{entry_from_json}).
    """
    return _to_v1(entry)


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
