"""
The C{DKIM-Signature} header field (RFC 6376 section 3.5) of a message,
from its header section and its body hash.

dkimpy does what it does well: it parses the header section, picks the
recommended header fields (RFC 6376 section 5.4.1: From, Subject, Date,
To, Cc, Message-ID, MIME fields, the List- fields, ...) with From signed
once more than it occurs (oversigned: no From can be added), canonicalises
them (relaxed) and folds the field as its own C{DKIM.sign} does.  It signs
with an RSA written in Python, some 40 ms a signature for a 2048-bit key:
the signature is made here by C{cryptography} (OpenSSL) instead, well
under a millisecond (L{relay.dkim.keys.DkimKey.sign}).  And dkimpy hashes
a body it holds whole: the body hash is ours, in chunks
(L{relay.dkim.canonical}).

This is the one module that uses dkimpy's functions below C{DKIM.sign}
(C{rfc822_parse} through C{DKIM}, C{hash_headers}, C{fold}, C{RE_BTAG});
C{tests/test_dkim.py} checks that the field made here is byte for byte
the one dkimpy's own C{DKIM.sign} makes, so that a change in them shows.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Sequence

import dkim
from dkim.canonicalization import CanonicalizationPolicy

from relay.dkim.keys import DkimKey

HEADER_NAME = b"DKIM-Signature"
#: relaxed/relaxed: survives the re-folding and whitespace changes that
#: relays make (simple breaks on them).
CANONICALIZATION = (b"relaxed", b"relaxed")


class Unsignable(ValueError):
    """
    The message cannot be signed (no From field, a header section dkimpy
    cannot parse); it goes out unsigned, and the reason is logged.
    """


class HeaderFields:
    """
    A header section as dkimpy parsed it, with the fields to sign.

    @ivar include: the names signed (C{h=}), in dkimpy's order, From
        twice.
    """

    def __init__(self, header_section: bytes) -> None:
        """
        @param header_section: the header fields, each with its CRLF.
        @raise Unsignable: when dkimpy cannot parse them or there is no
            From field.
        """
        try:
            self._dkim = dkim.DKIM(header_section + b"\r\n" if header_section else None)
        except dkim.MessageFormatError as e:
            raise Unsignable(f"header section not signable: {e}") from None
        include = tuple(name.lower() for name in self._dkim.default_sign_headers())
        if b"from" not in include:
            raise Unsignable("no From header field")
        self.include = include
        self._policy = CanonicalizationPolicy.from_c_value(b"/".join(CANONICALIZATION))
        # Only the fields signed are canonicalised (dkimpy does all, then
        # picks): the same fields in the same order, for less work.
        signed = set(include)
        self._canonical = self._policy.canonicalize_headers(
            [h for h in self._dkim.headers if h[0].lower() in signed]
        )

    def sign(self, key: DkimKey, body_hash: bytes, timestamp: int) -> bytes:
        """
        The C{DKIM-Signature} field of C{key} for these header fields and
        C{body_hash}, folded, ending with CRLF.
        """
        domain = key.domain.encode("ascii")
        fields = [
            (b"v", b"1"),
            (b"a", key.signature_algorithm),
            (b"c", b"/".join(CANONICALIZATION)),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", key.selector.encode("ascii")),
            (b"t", str(timestamp).encode("ascii")),
            (b"h", b" : ".join(self.include)),
            (b"bh", base64.b64encode(body_hash)),
            # As dkimpy does: b= folds onto lines of its own, so that
            # filling it in does not move the other tags.
            (b"b", b"0" * 60),
        ]
        # RFC 6376 section 3.7: the header hash covers the signed fields,
        # then this field with an empty b= and without its final CRLF.
        value = dkim.fold(
            b"; ".join(b"=".join(f) for f in fields), namelen=len(HEADER_NAME), linesep=b"\r\n"
        )
        value = dkim.RE_BTAG.sub(b"\\1", value)
        header_hash = hashlib.sha256()
        dkim.hash_headers(
            header_hash, self._policy, self._canonical, list(self.include),
            (HEADER_NAME, b" " + value), dict(fields),
        )  # fmt: skip
        fields[-1] = (b"b", base64.b64encode(key.sign(header_hash.digest())))
        value = dkim.fold(
            b"; ".join(b"=".join(f) for f in fields) + b"\r\n",
            namelen=len(HEADER_NAME),
            linesep=b"\r\n",
        )
        return HEADER_NAME + b": " + value


def signature_fields(
    keys: Sequence[DkimKey], header_section: bytes, body_hash: bytes, timestamp: int
) -> bytes:
    """
    The C{DKIM-Signature} fields of a message, one per key in C{keys}, to
    put before its header section (RFC 6376 section 5.6).  Blocking (the
    signatures): called in the thread pool.

    @raise Unsignable: when the message cannot be signed.
    """
    fields = HeaderFields(header_section)
    return b"".join(fields.sign(key, body_hash, timestamp) for key in keys)
