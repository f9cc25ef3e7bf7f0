"""
The DNS record that publishes a DKIM key (RFC 6376 section 3.6.1; RFC
8463 for Ed25519), made from the keys file: C{relayctl dkim-record
--dkim-keys FILE DOMAIN SELECTOR}.

    $ relayctl dkim-record --dkim-keys /etc/relay/dkim.keys example.com s2025
    s2025._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=MIIBIjANBgkqh..."
        "...IDAQAB" )

The record's text is longer than one DNS character-string (255 bytes)
for an RSA key of 2048 bits: it is given as several strings, which DNS
joins.  C{--value} prints the text alone, on one line, for DNS providers'
forms that take it whole.
"""

from __future__ import annotations

import argparse
import base64
from typing import TYPE_CHECKING, Any

from relay.dkim import DkimKeysError

if TYPE_CHECKING:
    # (Only for the annotations: relayctl imports this module to build its
    # parser, and need not load cryptography for its other commands.)
    from relay.dkim.keys import DkimKey

#: The longest DNS character-string (RFC 1035 section 3.3).
MAX_STRING = 255


def record_name(key: DkimKey) -> str:
    """
    Where the record goes: C{SELECTOR._domainkey.DOMAIN.}
    """
    return f"{key.selector}._domainkey.{key.domain}."


def record_value(key: DkimKey) -> str:
    """
    The record's text: C{v=DKIM1; k=rsa|ed25519; p=BASE64}.
    """
    public = base64.b64encode(key.public_key_data()).decode("ascii")
    return f"v=DKIM1; k={key.algorithm}; p={public}"


def zone_record(key: DkimKey) -> str:
    """
    The record as a zone file line (BIND's syntax), its text cut into
    strings of at most 255 bytes.
    """
    value = record_value(key)
    strings = [value[i : i + MAX_STRING] for i in range(0, len(value), MAX_STRING)]
    quoted = "\n    ".join(f'"{s}"' for s in strings)
    return f"{record_name(key)} IN TXT ( {quoted} )"


def find_key(path: str, domain: str, selector: str) -> DkimKey:
    """
    The key the keys file C{path} lists for C{domain} and C{selector}
    (reading every key of the file: one bad line is an error here too).

    @raise DkimKeysError: when the file cannot be used or lists no such key.
    """
    from relay.dkim.keys import load_keys

    return table_key(load_keys(path), domain, selector, path)


def table_key(table: Any, domain: str, selector: str, origin: str) -> DkimKey:
    """
    The key of a loaded keys table (L{relay.dkim.keys}) for C{domain} and
    C{selector}; C{origin} names the table in the error.

    @raise DkimKeysError: when the table has no such key.
    """
    from relay.dkim.keys import normalize_domain

    try:
        name = normalize_domain(domain)
    except ValueError as e:
        raise DkimKeysError(str(e)) from None
    key: DkimKey | None = table.find(name, selector.lower())
    if key is None:
        listed = ", ".join(f"{k.domain} {k.selector}" for k in table.keys) or "none"
        raise DkimKeysError(
            f"{origin} lists no key for {name} selector {selector} (it lists: {listed})"
        )
    return key


def add_dkim_record_parser(subparsers: Any) -> argparse.ArgumentParser:
    """
    Add the C{dkim-record} command to C{relayctl}'s subparsers (what
    C{argparse}'s C{add_subparsers} returned).

    @return: its parser.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dkim-record",
        help="print the DNS TXT record that publishes a DKIM key",
        description="Print the DNS TXT record to publish for the key that the keys file lists "
        "for DOMAIN and SELECTOR: read from --dkim-keys FILE (no relay needed), else asked of "
        "the running relay (the keys it signs with).",
    )
    parser.add_argument(
        "--dkim-keys",
        metavar="FILE",
        help="the keys file twistd relay reads (default: ask the running relay)",
    )
    parser.add_argument(
        "--value", action="store_true", help="print only the record's text, on one line"
    )
    parser.add_argument("domain", metavar="DOMAIN")
    parser.add_argument("selector", metavar="SELECTOR")
    return parser


def dkim_record(options: argparse.Namespace) -> str:
    """
    What C{relayctl dkim-record --dkim-keys FILE} prints, for parsed
    C{options}.

    @raise DkimKeysError: when the keys file cannot be used or lists no
        such key.
    """
    key = find_key(options.dkim_keys, options.domain, options.selector)
    return (record_value(key) if options.value else zone_record(key)) + "\n"
