"""
DANE for SMTP (RFC 7672): TLSA records, and whether the certificate chain
a next hop presented matches one of them.

Only the usages RFC 7672 section 3.1 keeps for SMTP are usable: DANE-TA(2)
(a trust anchor in the chain, which must issue a chain valid for the MX
host name) and DANE-EE(3) (the server's own certificate or key, whatever
its names and dates, section 3.1.1); selectors 0 (the whole certificate)
and 1 (its SubjectPublicKeyInfo); matching types 0 (exact), 1 (SHA-256)
and 2 (SHA-512).  A record that cannot be parsed, or of another usage,
selector or matching type, is unusable (section 2.2: TLSA records none of
which is usable make TLS mandatory without authentication).

The chain is checked with C{cryptography} after the handshake (the
connection's C{get_peer_cert_chain}); DANE-TA's path validation is
C{cryptography.x509.verification} with the matched trust anchor as the only
root.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from cryptography import x509

DANE_TA = 2
DANE_EE = 3

#: The length of the digest of each matching type (0: the whole data).
_DIGEST_SIZE = {0: None, 1: 32, 2: 64}


@dataclass(frozen=True)
class TLSARecord:
    """
    One TLSA record (RFC 6698 section 2.1).
    """

    usage: int
    selector: int
    matching: int
    data: bytes

    @property
    def usable(self) -> bool:
        """
        Usable for SMTP (RFC 7672 section 3.1): DANE-TA or DANE-EE, a known
        selector and matching type, data of the right length.
        """
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (0, 1):
            return False
        if self.matching not in _DIGEST_SIZE:
            return False
        size = _DIGEST_SIZE[self.matching]
        return bool(self.data) if size is None else len(self.data) == size

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"

    def matches(self, certificate: x509.Certificate) -> bool:
        """
        Does C{certificate} (its DER, or its key's) have this record's data?
        """
        from cryptography.hazmat.primitives import serialization

        if self.selector == 0:
            content = certificate.public_bytes(serialization.Encoding.DER)
        else:
            content = certificate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        if self.matching == 1:
            content = hashlib.sha256(content).digest()
        elif self.matching == 2:
            content = hashlib.sha512(content).digest()
        return content == self.data


def parse_tlsa(rdata: bytes) -> TLSARecord | None:
    """
    The TLSA record in C{rdata} (the wire form: usage, selector, matching
    type, then the data), or C{None} when it is too short to be one.
    """
    if len(rdata) < 4:
        return None
    return TLSARecord(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))


def tlsa_records(payloads: Iterable[Any]) -> tuple[tuple[TLSARecord, ...], int]:
    """
    The usable TLSA records among the payloads of a TLSA answer
    (C{dns.UnknownRecord}s, whose C{data} is the RDATA), and how many were
    unusable.
    """
    usable = []
    unusable = 0
    for payload in payloads:
        record = parse_tlsa(getattr(payload, "data", b""))
        if record is not None and record.usable:
            usable.append(record)
        else:
            unusable += 1
    return tuple(usable), unusable


def tlsa_name(host: str, port: int) -> str:
    """
    Where the TLSA records of the SMTP server C{host} on C{port} are
    (RFC 7672 section 2.2.3: the MX host name, port 25).
    """
    return f"_{port}._tcp.{host.rstrip('.')}"


def check_chain(
    records: Sequence[TLSARecord],
    chain: Sequence[x509.Certificate],
    host: str,
    now: datetime.datetime,
) -> tuple[str, str] | None:
    """
    Why C{chain} (the server's certificate first) matches none of
    C{records}, as C{(TLS-RPT result type, detail)}, or C{None} when one
    matches: a DANE-EE record the server's certificate, a DANE-TA record a
    certificate of the chain that issues a chain valid for C{host} at
    C{now}.
    """
    if not chain:
        return ("validation-failure", "the server presented no certificate")
    leaf = chain[0]
    problems: list[tuple[str, str]] = []
    for record in records:
        if record.usage == DANE_EE:
            if record.matches(leaf):
                return None
            continue
        for anchor in chain:
            if not record.matches(anchor):
                continue
            problem = _valid_below(anchor, leaf, chain[1:], host, now)
            if problem is None:
                return None
            problems.append(problem)
    if problems:
        return problems[0]
    return ("validation-failure", "no TLSA record matches the certificate chain")


def _valid_below(
    anchor: x509.Certificate,
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    host: str,
    now: datetime.datetime,
) -> tuple[str, str] | None:
    """
    Why the chain from C{leaf} to C{anchor} is not valid for C{host} at
    C{now}, or C{None} if it is (RFC 7672 section 3.1.2: with DANE-TA the
    names and dates count).
    """
    from cryptography.x509 import DNSName
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    if leaf.not_valid_after_utc < now or leaf.not_valid_before_utc > now:
        return ("certificate-expired", "the server certificate is outside its validity period")
    if anchor == leaf:
        # The anchor is the server's own certificate: nothing to chain.
        return None if _names_match(leaf, host) else _mismatch(host)
    try:
        verifier = PolicyBuilder().store(Store([anchor])).time(now).build_server_verifier(
            DNSName(host)
        )
        verifier.verify(leaf, list(intermediates))
    except VerificationError as e:
        if not _names_match(leaf, host):
            return _mismatch(host)
        return ("validation-failure", f"chain to the TLSA trust anchor: {e}")
    except ValueError as e:
        return ("validation-failure", f"chain to the TLSA trust anchor: {e}")
    return None


def _mismatch(host: str) -> tuple[str, str]:
    return ("certificate-host-mismatch", f"the server certificate does not name {host}")


def _names_match(certificate: x509.Certificate, host: str) -> bool:
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname

    try:
        verify_certificate_hostname(certificate, host)
    except (CertificateError, VerificationError):
        return False
    return True
