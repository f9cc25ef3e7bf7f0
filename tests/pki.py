"""
Test certificates: a root CA and an intermediate that signs server
certificates (L{PKI}), and self-signed ones (L{certificate}), made with
C{cryptography} in the test, for the TLS tests of the server, the relay
client and the interop suite.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.trial.unittest import SynchronousTestCase


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, public_key: Any, issuer: str, issuer_key: Any, *, ca: bool,
    expired: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    if expired:
        now -= datetime.timedelta(days=60)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    )
    if not ca:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(subject), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Any, password: bytes | None = None) -> bytes:
    encryption: Any = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


class PKI:
    """
    A root CA and an intermediate CA it signed; L{write} makes server
    certificates signed by the intermediate.
    """

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _certificate(
            "Relay Test Root", self.root_key.public_key(), "Relay Test Root", self.root_key, ca=True
        )
        self.intermediate_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = _certificate(
            "Relay Test Intermediate", self.intermediate_key.public_key(), "Relay Test Root",
            self.root_key, ca=True,
        )  # fmt: skip

    def write(
        self, cert_path: str, key_path: str, name: str = "relay.test", chain: bool = True
    ) -> None:
        """
        Write a server certificate for C{name} (followed by the
        intermediate when C{chain}) and its key.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = _certificate(name, key.public_key(), "Relay Test Intermediate",
                            self.intermediate_key, ca=False)  # fmt: skip
        with open(cert_path, "wb") as f:
            f.write(_pem(leaf) + (_pem(self.intermediate) if chain else b""))
        with open(key_path, "wb") as f:
            f.write(key_pem(key))

    def leaf(self, name: str = "relay.test", expired: bool = False) -> tuple[x509.Certificate, Any]:
        """
        A server certificate for C{name} signed by the intermediate (one
        whose validity ended a month ago when C{expired}), and its key.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = _certificate(name, key.public_key(), "Relay Test Intermediate",
                            self.intermediate_key, ca=False, expired=expired)  # fmt: skip
        return leaf, key

    def server_pem(self, name: str = "relay.test", expired: bool = False) -> bytes:
        """
        The PEM of a server certificate for C{name}, the intermediate and
        the key: what C{ssl.PrivateCertificate.loadPEM} takes (and a server
        presents the intermediate with it only if given as a chain).
        """
        leaf, key = self.leaf(name, expired)
        return _pem(leaf) + key_pem(key)

    def trust_root(self) -> ssl.Certificate:
        return ssl.Certificate.loadPEM(_pem(self.root))

    def write_root(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(_pem(self.root))

    def write_intermediate(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(_pem(self.intermediate))


_pki: PKI | None = None


def pki() -> PKI:
    """
    The CAs, made once for the module (the server certificates are made
    per test).
    """
    global _pki
    if _pki is None:
        _pki = PKI()
    return _pki


class CertificateFiles:
    """
    A test's certificate and key files, in its temporary directory.
    """

    def __init__(self, test: SynchronousTestCase) -> None:
        base = os.path.abspath(test.mktemp())
        os.makedirs(base)
        self.base = base
        self.cert = os.path.join(base, "fullchain.pem")
        self.key = os.path.join(base, "privkey.pem")

    def write(self, name: str = "relay.test", chain: bool = True) -> CertificateFiles:
        pki().write(self.cert, self.key, name, chain)
        return self


def certificate(*names: str, san: bool = True) -> bytes:
    """
    A self-signed certificate (a CA of its own) and its key, PEM: its
    common name is the first of C{names}, its subjectAltName (unless not
    C{san}) all of them, DNS names or IP addresses.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if san:
        entries: list[x509.GeneralName] = []
        for name in names:
            try:
                entries.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                entries.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def server_options(name: str, *, expired: bool = False, self_signed: bool = False) -> Any:
    """
    A server's TLS options (C{CertificateOptions}): a certificate for
    C{name} from the test PKI presented with its intermediate (one that
    expired a month ago when C{expired}), or a self-signed one.
    """
    from OpenSSL import crypto

    if self_signed:
        return ssl.PrivateCertificate.loadPEM(certificate(name)).options()
    leaf, key = pki().leaf(name, expired)
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(leaf),
        extraCertChain=[crypto.X509.from_cryptography(pki().intermediate)],
    )
