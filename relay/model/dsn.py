"""
The delivery status notification requests of an envelope (RFC 3461): the
NOTIFY and ORCPT parameters of each RCPT TO, the RET and ENVID parameters
of MAIL FROM, and xtext, the encoding ENVID and ORCPT travel in.

The parameters are kept in the envelope (and the spool entry) as they were
received, still encoded, so that they go on to a next hop that offers DSN
unchanged and entries already on disk read as before; they are decoded
here when relay writes a report of its own.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    # relay.model.argument checks the parameters with this module.
    from relay.model.argument import Argument

NEVER = "NEVER"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
DELAY = "DELAY"
NOTIFY_VALUES = frozenset({SUCCESS, FAILURE, DELAY})

#: RET=FULL and RET=HDRS
FULL = "FULL"
HDRS = "HDRS"

#: RFC 3461 sections 4.2 and 4.4: the longest ORCPT and ENVID values
MAX_ORCPT = 500
MAX_ENVID = 100

# xtext (RFC 3461 section 4): printable ASCII but "+" and "=", or "+"
# and two upper-case hexadecimal digits.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
# The same, with any non-ASCII character too: utf-8-addr-unitext, which an
# SMTPUTF8 transaction may use in ORCPT (RFC 6533 section 3).
_UNITEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e\x80-\U0010ffff]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# utf-8-addr-xtext (RFC 6533 section 3): a character as "\x{HEX}".
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")


def is_xtext(text: str, unicode: bool = False) -> bool:
    """
    Is C{text} well-formed xtext (or, with C{unicode}, xtext that may hold
    non-ASCII characters as they are, RFC 6533's unitext)?
    """
    return (_UNITEXT if unicode else _XTEXT).fullmatch(text) is not None


def xtext_decode(text: str) -> str:
    """
    The text that xtext C{text} encodes.  The octets are read as UTF-8 (an
    address is ASCII, or UTF-8 in an SMTPUTF8 transaction).

    @raise ValueError: if C{text} is not xtext.
    """
    if not is_xtext(text, unicode=True):
        raise ValueError(f"not xtext: {text!r}")
    out = bytearray()
    pos = 0
    for m in _HEXCHAR.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        out.append(int(m.group(1), 16))
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return out.decode("utf-8", "replace")


def xtext_encode(text: str) -> str:
    """
    C{text} as xtext: its UTF-8 octets, "+", "=" and every octet outside
    printable ASCII as "+XX".
    """
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in text.encode("utf-8")
    )


def find(args: Iterable[Argument], keyword: str) -> Argument | None:
    """
    The argument named C{keyword} (upper case) among C{args}, if present.
    """
    for arg in args:
        if arg.keyword == keyword:
            return arg
    return None


def notify(args: Iterable[Argument]) -> frozenset[str] | None:
    """
    The NOTIFY values among a recipient's C{args} (upper case): empty for
    NEVER, C{None} when NOTIFY was not given.
    """
    arg = find(args, "NOTIFY")
    if arg is None:
        return None
    values = frozenset(v.strip().upper() for v in (arg.value or "").split(","))
    return frozenset() if NEVER in values else values & NOTIFY_VALUES


def notify_allows(args: Iterable[Argument], what: str) -> bool:
    """
    May relay report C{what} (L{SUCCESS}, L{FAILURE} or L{DELAY}) for a
    recipient given with C{args}?  Without NOTIFY, failures and delays
    are reported and successes are not (RFC 3461 section 4.1).
    """
    values = notify(args)
    if values is None:
        return what in (FAILURE, DELAY)
    return what in values


def original_recipient(args: Iterable[Argument]) -> tuple[str, str] | None:
    """
    The ORCPT among a recipient's C{args}, decoded: C{(address type,
    address)}, e.g. C{("rfc822", "user@example.com")}; C{None} when absent
    (or unreadable: the report then goes without it).
    """
    arg = find(args, "ORCPT")
    if arg is None or arg.value is None:
        return None
    addr_type, semi, encoded = arg.value.partition(";")
    if not semi:
        return None
    try:
        address = xtext_decode(encoded)
    except ValueError:
        return None
    if addr_type.lower() == "utf-8":
        address = _UTF8_ESCAPE.sub(lambda m: _chr(m.group(1)), address)
    return addr_type, address


def _chr(hex_point: str) -> str:
    point = int(hex_point, 16)
    return chr(point) if point <= 0x10FFFF else "\ufffd"


def envelope_id(sender_args: Iterable[Argument]) -> str | None:
    """
    The ENVID of MAIL FROM, decoded; C{None} when absent.
    """
    arg = find(sender_args, "ENVID")
    if arg is None or arg.value is None:
        return None
    try:
        return xtext_decode(arg.value)
    except ValueError:
        return None


def returns_headers_only(sender_args: Iterable[Argument]) -> bool:
    """
    Did MAIL FROM say C{RET=HDRS}?
    """
    arg = find(sender_args, "RET")
    return arg is not None and (arg.value or "").upper() == HDRS


def check_notify(value: str | None) -> str | None:
    """
    What is wrong with C{NOTIFY=value}, in words for a 501 reply; C{None}
    when it is well-formed.
    """
    values = [v.upper() for v in (value or "").split(",")]
    if not value or not set(values) <= NOTIFY_VALUES | {NEVER}:
        return "NOTIFY must be NEVER, or one or more of SUCCESS,FAILURE,DELAY"
    if NEVER in values and len(values) > 1:
        return "NOTIFY=NEVER cannot be combined with other values"
    return None


def check_orcpt(value: str | None, smtputf8: bool = False) -> str | None:
    """
    What is wrong with C{ORCPT=value}, in words for a 501 reply; C{None}
    when it is well-formed (C{addr-type;xtext}, at most 500 characters;
    with C{smtputf8} the address may hold UTF-8 as it is).
    """
    addr_type, semi, address = (value or "").partition(";")
    if not semi or _ADDR_TYPE.fullmatch(addr_type) is None or not address:
        return "ORCPT must be addr-type;xtext, e.g. rfc822;user@example.com"
    if not is_xtext(address, unicode=smtputf8):
        return "ORCPT address must be xtext (+XX for '+', '=', spaces and controls)"
    if len(value or "") > MAX_ORCPT:
        return f"ORCPT is longer than {MAX_ORCPT} characters"
    return None


def check_envid(value: str | None) -> str | None:
    """
    What is wrong with C{ENVID=value}, in words for a 501 reply; C{None}
    when it is well-formed (xtext, at most 100 characters).
    """
    if not value or not is_xtext(value):
        return "ENVID must be xtext (+XX for '+', '=', spaces and controls)"
    if len(value) > MAX_ENVID:
        return f"ENVID is longer than {MAX_ENVID} characters"
    return None
