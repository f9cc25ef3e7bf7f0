"""
The DKIM keys file of C{--dkim-keys}: which domains sign, with which
selectors and private keys.

One key per line, C{DOMAIN SELECTOR KEYFILE [rsa|ed25519]}; blank lines
and lines starting with C{#} are skipped.  C{KEYFILE} is a PEM private key
(PKCS#1 or PKCS#8, as C{openssl genpkey} writes them) or, for Ed25519, the
base64 seed that dkimpy's C{dknewkey} writes; a relative path is taken from
the directory of the keys file.  The algorithm, when given, must be the
key's.  A domain may have several keys (an RSA and an Ed25519 one, as RFC
8463 suggests): a message is signed with each.

Everything that is wrong with the file is an error naming the file and the
line (L{DkimKeysError}): at start-up the relay does not start, on SIGHUP
the keys in use stay.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from relay.dkim import DkimKeysError

__all__ = ["DkimKey", "DkimKeysError", "KeyTable", "load_keys", "normalize_domain"]

#: The algorithms a keys file may name (the DNS record's C{k=}).
ALGORITHMS = ("rsa", "ed25519")
#: RFC 8301 section 3.2: verifiers ignore RSA keys under 1024 bits.
MIN_RSA_BITS = 1024

PrivateKey = Union[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]

# A DNS label (RFC 1123; "_" is tolerated, as in selectors).
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def normalize_domain(text: str) -> str:
    """
    A domain as DKIM's C{d=} holds it: lower case, no final dot, a
    non-ASCII name in its IDNA (A-label) form.

    @raise ValueError: if C{text} is not a DNS name.
    """
    name = text.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ValueError(f"not a domain name: {text!r} ({e})") from None
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"not a domain name: {text!r}")
    return name


@dataclass(frozen=True, eq=False)
class DkimKey:
    """
    One signing key: the domain (C{d=}) and selector (C{s=}) it signs as,
    and the private key.

    @ivar algorithm: C{"rsa"} or C{"ed25519"}.
    @ivar path: the key file it was read from.
    @ivar line: its line in the keys file.
    """

    domain: str
    selector: str
    algorithm: str
    private_key: PrivateKey = field(repr=False)
    path: str = ""
    line: int = 0

    @property
    def signature_algorithm(self) -> bytes:
        """
        The signature's C{a=} tag.
        """
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"

    def sign(self, digest: bytes) -> bytes:
        """
        Sign the SHA-256 C{digest} of the canonical header fields: RSASSA-
        PKCS1-v1_5 for RSA (RFC 6376 section 3.3.1), Ed25519 of the digest
        for Ed25519 (RFC 8463 section 3).  Blocking (a fraction of a
        millisecond): called in the thread pool.
        """
        key = self.private_key
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return key.sign(digest)

    def public_key_data(self) -> bytes:
        """
        The public key as the DNS record's C{p=} holds it (before base64):
        the DER SubjectPublicKeyInfo for RSA, the 32 raw bytes for Ed25519.
        """
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            return public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class KeyTable:
    """
    The keys of a keys file, by domain.

    @ivar path: the file they were read from (C{None}: made in code).
    @ivar keys: every key, in the file's order.
    """

    def __init__(self, keys: Iterable[DkimKey], path: str | None = None) -> None:
        self.path = path
        self.keys = tuple(keys)
        self._by_domain: dict[str, list[DkimKey]] = {}
        for key in self.keys:
            self._by_domain.setdefault(key.domain, []).append(key)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def domains(self) -> tuple[str, ...]:
        """
        The domains that have keys, in the file's order.
        """
        return tuple(self._by_domain)

    def keys_for(self, domain: str) -> tuple[DkimKey, ...]:
        """
        The keys a message from C{domain} is signed with: those of
        C{domain} itself, else of its nearest parent domain that has keys
        (C{news.example.com} signs as C{example.com} when only that is
        listed); none when no such domain is listed.

        @param domain: a name as L{normalize_domain} makes it.
        """
        labels = domain.split(".")
        for start in range(len(labels)):
            keys = self._by_domain.get(".".join(labels[start:]))
            if keys:
                return tuple(keys)
        return ()

    def find(self, domain: str, selector: str) -> DkimKey | None:
        """
        The key of C{domain} with C{selector}, if the file lists it.
        """
        for key in self._by_domain.get(domain, ()):
            if key.selector == selector:
                return key
        return None

    def describe(self) -> str:
        """
        What the table holds, in a few words for the log.
        """
        where = f" from {self.path}" if self.path else ""
        return (
            f"{len(self.keys)} DKIM key{'s' if len(self.keys) != 1 else ''} for "
            f"{len(self._by_domain)} domain{'s' if len(self._by_domain) != 1 else ''}{where}"
        )


def load_private_key(path: str) -> tuple[str, PrivateKey]:
    """
    Read a private key file: PEM (RSA or Ed25519, PKCS#1 or PKCS#8), or
    the base64 Ed25519 seed of dkimpy's C{dknewkey}.

    @return: the algorithm (C{"rsa"} or C{"ed25519"}) and the key.
    @raise ValueError: saying what is wrong with the file.
    @raise OSError: when it cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read(1024 * 1024)
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise ValueError(f"{path} is encrypted: give the key without a passphrase") from None
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ValueError(f"{path} is not a usable PEM private key: {e}") from None
    else:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise ValueError(
                f"{path} is neither a PEM private key nor a base64 Ed25519 seed (dknewkey's)"
            )
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"{path} is an RSA key of {key.key_size} bits: DKIM needs at least {MIN_RSA_BITS}"
            )
        return "rsa", key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519", key
    raise ValueError(
        f"{path} is a {type(key).__name__.lstrip('_')}: DKIM signs with rsa or ed25519 keys"
    )


def parse_keys(text: str, path: str) -> KeyTable:
    """
    Read the keys listed in C{text}, the content of the keys file
    C{path}, loading each key file (blocking).

    @raise DkimKeysError: for the first line that cannot be used.
    """
    base = os.path.dirname(os.path.abspath(path))
    keys: list[DkimKey] = []
    seen: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def bad(why: str, number: int = number) -> DkimKeysError:
            return DkimKeysError(f"{path} line {number}: {why}")

        fields = line.split()
        if len(fields) not in (3, 4):
            raise bad(f"expected DOMAIN SELECTOR KEYFILE [rsa|ed25519], not {line!r}")
        try:
            domain = normalize_domain(fields[0])
        except ValueError as e:
            raise bad(str(e)) from None
        selector = fields[1].lower()
        if not all(_LABEL.match(label) for label in selector.split(".")):
            raise bad(f"not a selector (DNS labels): {fields[1]!r}")
        given = fields[3].lower() if len(fields) == 4 else None
        if given is not None and given not in ALGORITHMS:
            raise bad(f"the algorithm must be rsa or ed25519, not {fields[3]!r}")
        if (domain, selector) in seen:
            raise bad(f"{domain} selector {selector} is listed already (line {seen[domain, selector]})")
        key_path = os.path.join(base, os.path.expanduser(fields[2]))
        try:
            algorithm, private_key = load_private_key(key_path)
        except OSError as e:
            raise bad(f"cannot read key file {key_path}: {e.strerror or e}") from None
        except ValueError as e:
            raise bad(str(e)) from None
        if given is not None and given != algorithm:
            raise bad(f"{key_path} is an {algorithm} key, not {given}")
        seen[domain, selector] = number
        keys.append(DkimKey(domain, selector, algorithm, private_key, key_path, number))
    return KeyTable(keys, path)


def load_keys(path: str) -> KeyTable:
    """
    Read the keys file C{path} and every key file it lists (blocking: in
    the thread pool, or at start-up).

    @raise DkimKeysError: naming the file and the line that cannot be used.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DkimKeysError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DkimKeysError(f"{path}: not UTF-8 text: {e.reason}") from None
    return parse_keys(text, path)
