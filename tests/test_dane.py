"""
Tests for L{relay.delivery.dane}: TLSA records and the check of a
presented chain against them, with certificates from L{tests.pki}.
"""

from __future__ import annotations

import datetime
import hashlib

from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.dane import TLSARecord, check_chain, parse_tlsa, tlsa_name, tlsa_records
from tests.pki import certificate, pki

NOW = datetime.datetime.now(datetime.timezone.utc)


def content(cert, selector: int) -> bytes:  # type: ignore[no-untyped-def]
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)  # type: ignore[no-any-return]
    return cert.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def record(usage: int, selector: int, matching: int, cert) -> TLSARecord:  # type: ignore[no-untyped-def]
    data = content(cert, selector)
    if matching == 1:
        data = hashlib.sha256(data).digest()
    elif matching == 2:
        data = hashlib.sha512(data).digest()
    return TLSARecord(usage, selector, matching, data)


def self_signed(name: str):  # type: ignore[no-untyped-def]
    from cryptography import x509

    return x509.load_pem_x509_certificate(certificate(name))


class RecordTests(SynchronousTestCase):
    """
    Parsing TLSA records and telling the usable ones.
    """

    def test_usable(self) -> None:
        """
        Usages 2 and 3, selectors 0 and 1, matching types 0, 1 and 2 with
        digests of the right length are usable; PKIX usages (0, 1), other
        selectors and matching types, short digests and short RDATA are not.
        """
        good = [TLSARecord(u, s, 1, b"x" * 32) for u in (2, 3) for s in (0, 1)]
        good += [TLSARecord(3, 1, 2, b"x" * 64), TLSARecord(3, 0, 0, b"der")]
        for r in good:
            self.assertTrue(r.usable, r)
        bad = [TLSARecord(0, 0, 1, b"x" * 32), TLSARecord(1, 0, 1, b"x" * 32),
               TLSARecord(3, 2, 1, b"x" * 32), TLSARecord(3, 1, 3, b"x" * 32),
               TLSARecord(3, 1, 1, b"x" * 31), TLSARecord(3, 0, 0, b"")]  # fmt: skip
        for r in bad:
            self.assertFalse(r.usable, r)
        self.assertIsNone(parse_tlsa(b"\x03\x01"))
        self.assertEqual(parse_tlsa(b"\x03\x01\x01" + b"y" * 32), TLSARecord(3, 1, 1, b"y" * 32))

    def test_tlsa_records(self) -> None:
        """
        The usable records of an answer, and how many were not.
        """

        class Unknown:
            def __init__(self, data: bytes) -> None:
                self.data = data

        usable, unusable = tlsa_records(
            [Unknown(b"\x03\x01\x01" + b"y" * 32), Unknown(b"\x01\x01\x01" + b"y" * 32), Unknown(b"\x03")]
        )
        self.assertEqual(usable, (TLSARecord(3, 1, 1, b"y" * 32),))
        self.assertEqual(unusable, 2)
        self.assertEqual(tlsa_name("mx.example.test.", 25), "_25._tcp.mx.example.test")


class CheckChainTests(SynchronousTestCase):
    """
    L{check_chain}: a presented chain against usable records.
    """

    def test_dane_ee_every_selector_and_matching_type(self) -> None:
        """
        DANE-EE: the server's certificate (or key) matches with each
        selector and matching type; another certificate does not.
        """
        leaf, _ = pki().leaf("mx.example.test")
        other, _ = pki().leaf("mx.example.test")
        for selector in (0, 1):
            for matching in (0, 1, 2):
                r = record(3, selector, matching, leaf)
                self.assertIsNone(check_chain([r], [leaf], "mx.example.test", NOW), (selector, matching))
                problem = check_chain([r], [other], "mx.example.test", NOW)
                self.assertEqual(problem and problem[0], "validation-failure", (selector, matching))

    def test_dane_ee_ignores_names_and_dates(self) -> None:
        """
        RFC 7672 section 3.1.1: a DANE-EE match holds whatever names the
        certificate shows and whether it has expired, self-signed or not.
        """
        expired, _ = pki().leaf("elsewhere.test", expired=True)
        self.assertIsNone(check_chain([record(3, 1, 1, expired)], [expired], "mx.example.test", NOW))
        own = self_signed("whatever.test")
        self.assertIsNone(check_chain([record(3, 0, 1, own)], [own], "mx.example.test", NOW))

    def test_dane_ta(self) -> None:
        """
        DANE-TA: the intermediate in the chain matches (each selector and
        matching type) and issues a valid chain for the MX host name.
        """
        leaf, _ = pki().leaf("mx.example.test")
        chain = [leaf, pki().intermediate]
        for selector in (0, 1):
            for matching in (0, 1, 2):
                r = record(2, selector, matching, pki().intermediate)
                self.assertIsNone(check_chain([r], chain, "mx.example.test", NOW), (selector, matching))

    def test_dane_ta_checks_name_and_dates(self) -> None:
        """
        DANE-TA: a certificate for another name is a host mismatch, an
        expired one is expired; a trust anchor not in the chain (the root,
        not presented) matches nothing.
        """
        ta = record(2, 1, 1, pki().intermediate)
        leaf, _ = pki().leaf("other.example.test")
        problem = check_chain([ta], [leaf, pki().intermediate], "mx.example.test", NOW)
        self.assertEqual(problem and problem[0], "certificate-host-mismatch")
        leaf, _ = pki().leaf("mx.example.test", expired=True)
        problem = check_chain([ta], [leaf, pki().intermediate], "mx.example.test", NOW)
        self.assertEqual(problem and problem[0], "certificate-expired")
        leaf, _ = pki().leaf("mx.example.test")
        root = record(2, 0, 1, pki().root)
        problem = check_chain([root], [leaf, pki().intermediate], "mx.example.test", NOW)
        self.assertEqual(problem and problem[0], "validation-failure")

    def test_any_record_matches(self) -> None:
        """
        One matching record of several is enough; no chain at all fails.
        """
        leaf, _ = pki().leaf("mx.example.test")
        other = self_signed("x.test")
        records = [record(3, 1, 1, other), record(3, 1, 2, leaf)]
        self.assertIsNone(check_chain(records, [leaf], "mx.example.test", NOW))
        self.assertEqual(check_chain(records, [], "mx.example.test", NOW)[0], "validation-failure")  # type: ignore[index]
