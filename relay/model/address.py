"""
Email addresses (RFC 5321 section 4.1.2, RFC 6531 for SMTPUTF8) and the
envelope sender, which may be the null sender C{<>}.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass


class AddressError(ValueError):
    """
    Text that is not a valid RFC 5321 path or mailbox.
    """


# atext of RFC 5322; with SMTPUTF8, any non-ASCII character too (RFC 6531).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"^[{_ATEXT}]+(?:\.[{_ATEXT}]+)*$")
_DOT_STRING_UTF8 = re.compile(rf"^[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*$")
_SUB_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
_SUB_DOMAIN_UTF8 = re.compile(r"^[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*[A-Za-z0-9\u0080-\U0010ffff])?$")
_GENERAL_LITERAL = re.compile(r"^[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+$")

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


def _validate_domain(domain: str, smtputf8: bool) -> None:
    if not domain or len(domain) > MAX_DOMAIN:
        raise AddressError("domain missing or too long")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("unterminated address literal")
        literal = domain[1:-1]
        if literal[:5].lower() == "ipv6:":
            try:
                ipaddress.IPv6Address(literal[5:])
            except ValueError:
                raise AddressError(f"bad IPv6 address literal {domain}") from None
            return
        try:
            ipaddress.IPv4Address(literal)
            return
        except ValueError:
            pass
        if _GENERAL_LITERAL.match(literal) and not literal[:5].lower() == "ipv6:":
            return
        raise AddressError(f"bad address literal {domain}")
    pattern = _SUB_DOMAIN_UTF8 if smtputf8 else _SUB_DOMAIN
    labels = domain.split(".")
    for label in labels:
        if len(label) > 63 or not pattern.match(label):
            raise AddressError(f"bad domain {domain!r}")


def _quote_local(local: str) -> str:
    if _DOT_STRING_UTF8.match(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _parse_local(text: str, smtputf8: bool) -> tuple[str, str]:
    """
    Split C{local@domain} into an unquoted local part and the rest after C{@}.
    """
    if text.startswith('"'):
        out = []
        i = 1
        while i < len(text):
            c = text[i]
            if c == "\\":
                if i + 1 >= len(text):
                    raise AddressError("quoted pair at end of address")
                nxt = text[i + 1]
                if not (" " <= nxt <= "~" or (smtputf8 and nxt >= "\x80")):
                    raise AddressError("bad quoted pair")
                out.append(nxt)
                i += 2
                continue
            if c == '"':
                rest = text[i + 1 :]
                return "".join(out), rest
            if not (c in " !" or "#" <= c <= "[" or "]" <= c <= "~" or (smtputf8 and c >= "\x80")):
                raise AddressError("bad character in quoted local part")
            out.append(c)
            i += 1
        raise AddressError("unterminated quoted local part")
    at = text.rfind("@")
    if at < 0:
        return text, ""
    local = text[:at]
    pattern = _DOT_STRING_UTF8 if smtputf8 else _DOT_STRING
    if not pattern.match(local):
        raise AddressError(f"bad local part {local!r}")
    return local, text[at:]


@dataclass(frozen=True)
class EmailAddress:
    """
    A mailbox: an unquoted local part and a domain (a host name, or an
    address literal such as C{[192.0.2.1]} or C{[IPv6:2001:db8::1]}).

    The special recipient C{<Postmaster>} (RFC 5321 section 4.5.1) has no
    domain: C{domain} is C{None}.

    C{str(address)} is C{local@domain} with the local part quoted when it
    needs to be.
    """

    local_part: str
    domain: str | None

    def __str__(self) -> str:
        local = _quote_local(self.local_part)
        return local if self.domain is None else f"{local}@{self.domain}"

    @property
    def is_postmaster(self) -> bool:
        return self.local_part.lower() == "postmaster"

    @property
    def needs_smtputf8(self) -> bool:
        """
        True if this address cannot be sent without the SMTPUTF8 extension.
        """
        return not str(self).isascii()

    @classmethod
    def parse(cls, text: str, smtputf8: bool = False) -> EmailAddress:
        """
        Parse a mailbox C{local@domain} (without angle brackets).

        @param smtputf8: allow UTF-8 in local part and domain (RFC 6531).
        @raise AddressError: if C{text} is not a valid mailbox.
        """
        if not smtputf8 and not text.isascii():
            raise AddressError("non-ASCII address without SMTPUTF8")
        if len(text.encode("utf-8")) > MAX_PATH:
            raise AddressError("address too long")
        local, rest = _parse_local(text, smtputf8)
        if rest == "":
            if local.lower() == "postmaster":
                return cls("Postmaster", None)
            raise AddressError("address has no domain")
        if not rest.startswith("@"):
            raise AddressError("garbage after local part")
        if not local or len(local.encode("utf-8")) > MAX_LOCAL_PART:
            raise AddressError("local part empty or too long")
        domain = rest[1:]
        _validate_domain(domain, smtputf8)
        return cls(local, domain)

    @classmethod
    def parse_path(cls, path: str, smtputf8: bool = False) -> EmailAddress:
        """
        Parse an RFC 5321 C{Path}: C{<mailbox>}, ignoring a source route
        (C{<@a,@b:user@c>}) as section 4.1.1.3 asks.
        """
        if not (path.startswith("<") and path.endswith(">")):
            raise AddressError("path must be enclosed in <>")
        inner = path[1:-1]
        if inner.startswith("@"):
            colon = inner.find(":")
            if colon < 0:
                raise AddressError("bad source route")
            for hop in inner[:colon].split(","):
                if not hop.startswith("@"):
                    raise AddressError("bad source route")
                _validate_domain(hop[1:], smtputf8)
            inner = inner[colon + 1 :]
        return cls.parse(inner, smtputf8)


@dataclass(frozen=True)
class Sender:
    """
    The envelope sender (MAIL FROM): a mailbox, or the null sender C{<>}
    used by bounces (C{address is None}).  C{str()} of the null sender is
    C{""}.
    """

    address: EmailAddress | None

    @property
    def is_null(self) -> bool:
        return self.address is None

    @property
    def local_part(self) -> str | None:
        return None if self.address is None else self.address.local_part

    @property
    def domain(self) -> str | None:
        return None if self.address is None else self.address.domain

    def __str__(self) -> str:
        return "" if self.address is None else str(self.address)

    @classmethod
    def parse_path(cls, path: str, smtputf8: bool = False) -> Sender:
        """
        Parse a MAIL FROM reverse-path: C{<>} or a path.
        """
        if path == "<>":
            return NULL_SENDER
        return cls(EmailAddress.parse_path(path, smtputf8))

    @classmethod
    def of(cls, address: str | EmailAddress | None) -> Sender:
        """
        A sender from a string (C{""} is the null sender) or an address.
        """
        if address is None or address == "":
            return NULL_SENDER
        if isinstance(address, str):
            address = EmailAddress.parse(address, smtputf8=not address.isascii())
        return cls(address)


NULL_SENDER = Sender(None)
