"""
DKIM signing (L{relay.dkim}): every signature made is checked with
dkimpy's verifier against the record C{relayctl dkim-record} prints,
served by a DNS stub (dkimpy's C{dnsfunc}: no DNS is asked).

From the parts up: the chunked body hash against dkimpy's own
canonicalisation, the signature field against dkimpy's own C{DKIM.sign},
the keys file and its errors, the record, the signer (with the spool's
writer for spilled messages), the server signing before it spools, the
relay client delivering signed bytes to a second server, SIGHUP, and the
start-up options.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import os
import re
import time
from typing import Any, Callable

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dkim.canonicalization import Relaxed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relay import EnvelopeWithNextHop, Send, Simple
from relay.app.reload import ReloadError, ReloadService
from relay.control import ctl, rpc
from relay.control.server import ControlLocator
from relay.dkim import DkimKeysError, canonical
from relay.dkim.canonical import (
    HeaderSectionTooLarge,
    RelaxedBodyHash,
    SigningInput,
)
from relay.dkim.keys import DkimKey, KeyTable, load_keys, normalize_domain
from relay.dkim.record import (
    MAX_STRING,
    add_dkim_record_parser,
    dkim_record,
    record_name,
    record_value,
    zone_record,
)
from relay.dkim.signature import HeaderFields, Unsignable, signature_fields
from relay.dkim.signer import CHUNK_SIZE, DkimSigner, from_domain, sign_bytes
from relay.interfaces import IReloadable
from relay.model.message import Message
from relay.smtp.stuffing import CRLFLines
from relay.spool.memory import MemorySpool
from relay.testing import ClientHarness, ServerHarness, make_envelope

# -- keys and the DNS stub ---------------------------------------------------------

_PRIVATE: dict[str, Any] = {}


def private_key(name: str) -> Any:
    """
    A key made once for the whole module (RSA keys take a while to make):
    C{rsa} (2048 bits), C{rsa1024}, C{ed25519}, C{ed25519-b}, C{ec}.
    """
    if name not in _PRIVATE:
        if name.startswith("rsa"):
            bits = int(name[3:] or 2048)
            _PRIVATE[name] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        elif name.startswith("ed25519"):
            _PRIVATE[name] = ed25519.Ed25519PrivateKey.generate()
        else:
            _PRIVATE[name] = ec.generate_private_key(ec.SECP256R1())
    return _PRIVATE[name]


def pem(key: Any, pkcs1: bool = False) -> bytes:
    form = serialization.PrivateFormat.TraditionalOpenSSL if pkcs1 else serialization.PrivateFormat.PKCS8
    data: bytes = key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())
    return data


# An RSA key of 512 bits (cryptography no longer makes them), made with
# `openssl genrsa 512`: too small for DKIM.
RSA_512 = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEAt1OTDJNX2oj4FoB0
uMYQmgke3Oywx8xH7YEJNjNMSCw70rIpNA3PR2TZCritEX9wTWPQ+nLLCzZC5pyv
bB/JswIDAQABAkEAl0Ct50c9ycEOJsqPAs/vbJcvzoi+BepGQe8fYYeLXVMz5ucv
clzcbWX/Ztir746Du7FFDIJqhh7zz5iCCC4BIQIhAN4D9mutDoupZBqqzZIFJEuV
GAR8MJOnWi5vGQYIOV7jAiEA02OFFCW+dYXCmqTfHANVq0FCyRcSiiWZOpnM1xIA
kvECIEXNXyOZhHI6rsOHohxfy3qMBMIcPbWer0bcHTT9TvRbAiAP32QpvB/OAUo4
hHLATrvLDS5vnQzmVKZp0QyhhZeHcQIgSGNUZLTLJooJyOQCkn/Vn64eimJXn7rn
NlIZBf5s0Ug=
-----END PRIVATE KEY-----
"""


class KeyFiles:
    """
    A directory of key files and a keys file listing them, for one test.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(self.directory, "dkim.keys")

    def key_file(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def write(self, text: str) -> str:
        with open(self.path, "w") as f:
            f.write(text)
        return self.path


def standard_keys(test: SynchronousTestCase) -> KeyFiles:
    """
    A keys file with an RSA and an Ed25519 key for example.com and an RSA
    key for example.org.
    """
    files = KeyFiles(test.mktemp())
    files.key_file("rsa.pem", pem(private_key("rsa")))
    files.key_file("ed.pem", pem(private_key("ed25519")))
    files.key_file("org.pem", pem(private_key("rsa1024")))
    files.write(
        "# the relay's DKIM keys\n"
        "example.com  s1  rsa.pem  rsa\n"
        "example.com  e1  ed.pem\n"
        "\n"
        "example.org  o1  org.pem\n"
    )
    return files


class DNSStub:
    """
    The TXT records of the keys in a table as C{relayctl dkim-record}
    prints them (its zone-file form, the strings joined as DNS does), for
    dkimpy's C{dnsfunc}.
    """

    def __init__(self, table: KeyTable) -> None:
        self.records: dict[bytes, bytes] = {}
        self.asked: list[bytes] = []
        for key in table.keys:
            name, strings = record_strings(zone_record(key))
            self.records[name.encode("ascii")] = "".join(strings).encode("ascii")

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.asked.append(name)
        return self.records.get(name)


def record_strings(line: str) -> tuple[str, list[str]]:
    """
    The owner name and the character-strings of a zone line as
    C{relayctl dkim-record} prints it.
    """
    name, _, rest = line.partition(" IN TXT ")
    return name, re.findall(r'"([^"]*)"', rest)


def published_zone(lines: list[str]) -> Any:
    """
    A zone of L{tests.dnsserver} holding the TXT records of the zone
    lines C{relayctl dkim-record} printed, each as its several strings
    (as a DNS server holds them after reading the zone file).
    """
    from twisted.names import dns as names

    from tests.dnsserver import FakeZone

    zone = FakeZone()
    for line in lines:
        name, strings = record_strings(line)
        zone.add(name.rstrip("."), names.Record_TXT(*(s.encode("ascii") for s in strings), ttl=60))
    return zone


class DNSServerLookup:
    """
    dkimpy's C{dnsfunc} asking a DNS server on loopback (one of
    L{tests.dnsserver}) with dnspython, never the system's resolver: the
    strings of the TXT record joined, as dkimpy's own lookup does.
    Blocking: called in a thread while the reactor serves the zone.
    """

    def __init__(self, host: str, port: int) -> None:
        import dns.resolver

        self._resolver = dns.resolver.Resolver(configure=False)
        self._resolver.nameservers = [host]
        self._resolver.port = port
        self.asked: list[bytes] = []

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        import dns.exception
        import dns.resolver

        self.asked.append(name)
        try:
            answer = self._resolver.resolve(name.decode("ascii"), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(rdata.strings) for rdata in answer)


def signatures(data: bytes) -> list[dict[bytes, bytes]]:
    """
    The tags of every DKIM-Signature field of a message, top first.
    """
    parsed = dkim.DKIM(data)
    return [
        dkim.util.parse_tag_value(value)
        for name, value in parsed.headers
        if name.lower() == b"dkim-signature"
    ]


def verified(
    test: SynchronousTestCase, data: bytes, dns: Callable[..., bytes | None]
) -> list[tuple[str, str, str]]:
    """
    Check that every DKIM-Signature of C{data} verifies; return
    C{(d, s, a)} of each, top first.
    """
    found = signatures(data)
    test.assertTrue(found, "no DKIM-Signature")
    for i in range(len(found)):
        test.assertTrue(dkim.DKIM(data).verify(idx=i, dnsfunc=dns), f"signature {i} fails")
    return [(f[b"d"].decode(), f[b"s"].decode(), f[b"a"].decode()) for f in found]


def synchronous(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args, **kwargs)


MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: DKIM test\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <dkim-test@example.com>\r\n"
    b"\r\n"
    b"Hello,  world. \r\n"
    b"\r\n"
    b"Bye.\r\n"
)

FOLDED = (
    b"Received: from client.example (client.example [192.0.2.7])\r\n"
    b"\tby relay.test (relay) with ESMTP id 1;\r\n"
    b"\tMon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"From: \"Alice  Example\"\r\n"
    b"  <alice@example.com>\r\n"
    b"To: bob@example.net,\r\n"
    b"\tcarol@example.net\r\n"
    b"Subject: a subject folded\r\n"
    b"   over two lines\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"8-bit: \xc3\xa9t\xc3\xa9 \xe2\x82\xac \xff\xfe\r\n"
    b"\t tabs \t and spaces \t \r\n"
    b"\r\n"
    b"\r\n"
)


# -- the body hash ------------------------------------------------------------------

_BODY_PIECES = st.sampled_from(
    [b"a", b"Z", b" ", b"\t", b"  ", b"\r\n", b"\r\n", b"\r\n", b"\r", b"\n", b"\x80\xff", b"."]
)


def _cuts(draw: Any, data: bytes) -> list[bytes]:
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@st.composite
def cut_bodies(draw: Any) -> tuple[bytes, list[bytes]]:
    """
    A body of CRLF-only lines (some maybe unfinished), cut anywhere.
    """
    raw = b"".join(draw(st.lists(_BODY_PIECES, max_size=60)))
    body = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return body, _cuts(draw, body)


@st.composite
def cut_raw(draw: Any) -> tuple[bytes, list[bytes]]:
    """
    Any bytes with any line endings, cut anywhere.
    """
    raw = b"".join(draw(st.lists(_BODY_PIECES, max_size=60)))
    return raw, _cuts(draw, raw)


class BodyHashTests(SynchronousTestCase):
    """
    L{RelaxedBodyHash} in chunks gives the digest of dkimpy's relaxed
    canonicalisation of the whole body.
    """

    @settings(suppress_health_check=[HealthCheck.too_slow], max_examples=400, deadline=None)
    @given(cut_bodies(), st.sampled_from([4, canonical.MAX_PENDING_LINE]))
    def test_any_cut_is_dkimpy(self, body_and_cuts: tuple[bytes, list[bytes]], pending: int) -> None:
        """
        However the body is cut, and with long unfinished lines hashed in
        parts (a small L{canonical.MAX_PENDING_LINE}), the digest is that of
        dkimpy's C{Relaxed.canonicalize_body} of the whole.
        """
        body, pieces = body_and_cuts
        self.patch(canonical, "MAX_PENDING_LINE", pending)
        hasher = RelaxedBodyHash()
        for piece in pieces:
            hasher.update(piece)
        self.assertEqual(hasher.digest(), hashlib.sha256(Relaxed.canonicalize_body(body)).digest())

    def test_rfc_examples(self) -> None:
        """
        The cases RFC 6376 section 3.4 names: trailing whitespace and runs of
        it, empty lines at the end (dropped), an empty body (empty).
        """
        cases = [
            (b" C \r\nD \t E\r\n\r\n\r\n", b" C\r\nD E\r\n"),
            (b"", b""),
            (b"\r\n\r\n", b""),
            (b"x\r\n\r\n  \r\ny\r\n", b"x\r\n\r\n\r\ny\r\n"),
        ]
        for body, canonical_form in cases:
            hasher = RelaxedBodyHash()
            hasher.update(body)
            self.assertEqual(hasher.digest(), hashlib.sha256(canonical_form).digest(), body)

    def test_long_line_memory(self) -> None:
        """
        A body of one 1 MB line without a line end keeps at most
        L{canonical.MAX_PENDING_LINE} bytes of it, and hashes as dkimpy does.
        """
        body = (b"word \t " * 150_000) + b"\r\n"
        hasher = RelaxedBodyHash()
        for start in range(0, len(body), 4096):
            hasher.update(body[start : start + 4096])
            self.assertLessEqual(len(hasher._line), canonical.MAX_PENDING_LINE + 4096)
        self.assertEqual(hasher.digest(), hashlib.sha256(Relaxed.canonicalize_body(body)).digest())


class LineEndingsTests(SynchronousTestCase):
    """
    L{CRLFLines} makes what the relay client puts on the wire.
    """

    @settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300, deadline=None)
    @given(cut_raw())
    def test_as_the_wire(self, raw_and_cuts: tuple[bytes, list[bytes]]) -> None:
        """
        Any bytes, cut anywhere, come out with CRLF for every CRLF, lone CR
        and lone LF, and a final CRLF when they had no line end there: the
        relay client's L{relay.smtp.stuffing.DotStuffer} without its dots.
        """
        raw, pieces = raw_and_cuts
        endings = CRLFLines()
        out = b"".join(endings.encode(p) for p in pieces) + endings.finish()
        want = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if want and not want.endswith(b"\r\n"):
            want += b"\r\n"
        self.assertEqual(out, want)


class SigningInputTests(SynchronousTestCase):
    """
    L{SigningInput} keeps the header section and hashes the body.
    """

    def feed(self, data: bytes, size: int = 3) -> tuple[bytes, bytes]:
        message = SigningInput()
        for start in range(0, len(data), size):
            message.update(data[start : start + size])
        return message.finish()

    def test_split(self) -> None:
        """
        The header section is everything before the first empty line (the
        fields with their CRLFs), the body everything after it.
        """
        head, body_hash = self.feed(MESSAGE)
        self.assertEqual(head, MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n")
        body = MESSAGE.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(body_hash, hashlib.sha256(Relaxed.canonicalize_body(body)).digest())

    def test_no_body(self) -> None:
        """
        A message of header fields only has an empty body; one that starts
        with an empty line has no header fields.
        """
        self.assertEqual(self.feed(b"Subject: x\r\n"), (b"Subject: x\r\n", hashlib.sha256(b"").digest()))
        head, body_hash = self.feed(b"\r\nbody\r\n")
        self.assertEqual((head, body_hash), (b"", hashlib.sha256(b"body\r\n").digest()))

    def test_header_section_too_large(self) -> None:
        """
        A header section past the limit is refused (the message goes
        unsigned) as soon as it is past it, in one chunk or several; one
        that ends within it is kept.
        """
        message = SigningInput(max_header_bytes=100)
        with self.assertRaises(HeaderSectionTooLarge):
            message.update(b"X-Long: " + b"y" * 200)
        message = SigningInput(max_header_bytes=100)
        message.update(b"X-Long: " + b"y" * 50)
        with self.assertRaises(HeaderSectionTooLarge):
            message.update(b"y" * 60)
        message = SigningInput(max_header_bytes=100)
        message.update(b"X-Long: " + b"y" * 80 + b"\r\n\r\n" + b"body " * 100)
        self.assertEqual(message.finish()[0], b"X-Long: " + b"y" * 80 + b"\r\n")


# -- the signature field ------------------------------------------------------------


class SignatureTests(SynchronousTestCase):
    """
    The DKIM-Signature field: dkimpy's, signed by cryptography.
    """

    def key(self, algorithm: str, name: str | None = None) -> DkimKey:
        return DkimKey("example.com", "s1", algorithm, private_key(name or algorithm))

    def test_same_as_dkimpy(self) -> None:
        """
        For RSA and Ed25519 the field is byte for byte the one dkimpy's own
        C{DKIM.sign} makes (relaxed/relaxed, its default header set, the
        same time), folded headers and an 8-bit body included: this pins
        the dkimpy functions L{relay.dkim.signature} uses.
        """
        self.patch(dkim.time, "time", lambda: 1700000000)
        for algorithm in ("rsa", "ed25519"):
            key = self.key(algorithm)
            for message in (MESSAGE, FOLDED):
                signer = SigningInput()
                signer.update(message)
                head, body_hash = signer.finish()
                ours = signature_fields([key], head, body_hash, 1700000000)
                if algorithm == "rsa":
                    theirs = dkim.DKIM(message).sign(
                        b"s1", b"example.com", pem(key.private_key, pkcs1=True),
                        canonicalize=(b"relaxed", b"relaxed"),
                    )  # fmt: skip
                else:
                    seed = key.private_key.private_bytes(
                        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                        serialization.NoEncryption(),
                    )  # fmt: skip
                    theirs = dkim.DKIM(message).sign(
                        b"s1", b"example.com", base64.b64encode(seed),
                        signature_algorithm=b"ed25519-sha256",
                        canonicalize=(b"relaxed", b"relaxed"),
                    )  # fmt: skip
                self.assertEqual(ours, theirs, (algorithm, message))

    def test_header_set(self) -> None:
        """
        The recommended fields present are signed, From once more than it
        occurs (oversigned), trace fields (Received) not.
        """
        fields = HeaderFields(FOLDED.split(b"\r\n\r\n")[0] + b"\r\n")
        self.assertEqual(
            fields.include,
            (b"from", b"to", b"subject", b"date", b"mime-version", b"content-type",
             b"content-transfer-encoding", b"from"),
        )  # fmt: skip

    def test_unsignable(self) -> None:
        """
        No From field, or a header section dkimpy cannot read: not signable.
        """
        with self.assertRaises(Unsignable) as raised:
            HeaderFields(b"Subject: no sender\r\n")
        self.assertIn("no From", str(raised.exception))
        with self.assertRaises(Unsignable):
            HeaderFields(b"From: a@example.com\r\nnot a header line\r\n")

    def test_tags(self) -> None:
        """
        The tags: version 1, the key's algorithm, relaxed/relaxed, the
        domain and selector, the clock's time, the body hash.
        """
        data, normalized = sign_bytes([self.key("ed25519")], MESSAGE, 1234)
        [tags] = signatures(data + normalized)
        self.assertEqual(
            {k: tags[k] for k in (b"v", b"a", b"c", b"d", b"s", b"t")},
            {b"v": b"1", b"a": b"ed25519-sha256", b"c": b"relaxed/relaxed", b"d": b"example.com",
             b"s": b"s1", b"t": b"1234"},
        )  # fmt: skip


# -- the keys file ------------------------------------------------------------------


class KeysFileTests(SynchronousTestCase):
    """
    C{--dkim-keys FILE}: what it may hold, and every way it can be wrong,
    named with its line.
    """

    def setUp(self) -> None:
        self.files = KeyFiles(self.mktemp())
        self.files.key_file("rsa.pem", pem(private_key("rsa")))
        self.files.key_file("ed.pem", pem(private_key("ed25519")))

    def bad(self, text: str) -> str:
        path = self.files.write(text)
        with self.assertRaises(DkimKeysError) as raised:
            load_keys(path)
        message = str(raised.exception)
        self.assertTrue(message.startswith(path), message)
        return message[len(path) :]

    def test_good(self) -> None:
        """
        Comments and blank lines are skipped; key files are found beside
        the keys file; the algorithm is the key's when not given; PKCS#1,
        PKCS#8 and dknewkey's base64 Ed25519 seed are read; an IDNA domain
        is held in its A-label form.
        """
        self.files.key_file("pkcs1.pem", pem(private_key("rsa1024"), pkcs1=True))
        seed = private_key("ed25519-b").private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )  # fmt: skip
        self.files.key_file("dknewkey.key", base64.b64encode(seed) + b"\n")
        table = load_keys(
            self.files.write(
                "# comment\n\n"
                "Example.COM. s1 rsa.pem RSA\n"
                "example.com e1 ed.pem\n"
                "bücher.example b1 pkcs1.pem\n"
                f"example.org d1 {os.path.join(self.files.directory, 'dknewkey.key')} ed25519\n"
            )
        )
        self.assertEqual(
            [(k.domain, k.selector, k.algorithm, k.line) for k in table.keys],
            [("example.com", "s1", "rsa", 3), ("example.com", "e1", "ed25519", 4),
             ("xn--bcher-kva.example", "b1", "rsa", 5), ("example.org", "d1", "ed25519", 6)],
        )  # fmt: skip
        self.assertEqual(table.describe(), f"4 DKIM keys for 3 domains from {self.files.path}")

    def test_parent_domains(self) -> None:
        """
        A domain signs with its own keys, else with those of its nearest
        listed parent; an unlisted one with none.
        """
        table = load_keys(self.files.write("example.com s1 rsa.pem\nnews.example.com e1 ed.pem\n"))
        self.assertEqual([k.selector for k in table.keys_for("example.com")], ["s1"])
        self.assertEqual([k.selector for k in table.keys_for("mail.example.com")], ["s1"])
        self.assertEqual([k.selector for k in table.keys_for("a.news.example.com")], ["e1"])
        self.assertEqual(table.keys_for("example.net"), ())
        self.assertEqual(table.keys_for("com"), ())

    def test_bad_lines(self) -> None:
        """
        Each bad line is an error naming the file, the line number and
        what is wrong.
        """
        cases = {
            "example.com s1\n": "line 1: expected DOMAIN SELECTOR KEYFILE [rsa|ed25519]",
            "\n# x\nexample.com s1 rsa.pem rsa extra\n": "line 3: expected",
            "exa_mple..com s1 rsa.pem\n": "line 1: not a domain name",
            "example.com s/1 rsa.pem\n": "line 1: not a selector",
            "example.com s1 rsa.pem dsa\n": "line 1: the algorithm must be rsa or ed25519",
            "example.com s1 rsa.pem ed25519\n": "line 1: ",
            "example.com s1 rsa.pem\nexample.com S1 ed.pem\n": "line 2: example.com selector s1 is listed already (line 1)",
            "example.com s1 missing.pem\n": "line 1: cannot read key file",
        }
        for text, expected in cases.items():
            self.assertIn(expected, self.bad(text), text)
        self.assertIn("is an rsa key, not ed25519", self.bad("example.com s1 rsa.pem ed25519\n"))
        self.assertIn("No such file or directory", self.bad("example.com s1 missing.pem\n"))

    def test_bad_keys(self) -> None:
        """
        An RSA key under 1024 bits, an encrypted key, a key that is neither
        RSA nor Ed25519, and a file that is no key are errors naming the
        line and the key file.
        """
        self.files.key_file("small.pem", RSA_512)
        self.files.key_file(
            "encrypted.pem",
            private_key("rsa").private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )  # fmt: skip
        self.files.key_file("ec.pem", pem(private_key("ec")))
        self.files.key_file("garbage.pem", b"this is not a key\n")
        self.files.key_file("broken.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        cases = {
            "small.pem": "RSA key of 512 bits: DKIM needs at least 1024",
            "encrypted.pem": "is encrypted: give the key without a passphrase",
            "ec.pem": "DKIM signs with rsa or ed25519 keys",
            "garbage.pem": "neither a PEM private key nor a base64 Ed25519 seed",
            "broken.pem": "is not a usable PEM private key",
        }
        for name, expected in cases.items():
            message = self.bad(f"# keys\nexample.com s1 {name}\n")
            self.assertTrue(message.startswith(" line 2: "), message)
            self.assertIn(name, message)
            self.assertIn(expected, message)

    def test_unreadable_file(self) -> None:
        """
        A keys file that cannot be read: an error naming it.
        """
        path = os.path.join(self.files.directory, "none.keys")
        with self.assertRaises(DkimKeysError) as raised:
            load_keys(path)
        self.assertEqual(str(raised.exception), f"{path}: cannot read: No such file or directory")

    def test_normalize_domain(self) -> None:
        """
        Domains compare in lower case, without a final dot, as A-labels.
        """
        self.assertEqual(normalize_domain(" Mail.Example.COM. "), "mail.example.com")
        self.assertEqual(normalize_domain("bücher.example"), "xn--bcher-kva.example")
        for bad in ("", "a..b", "-a.example", "a b.example", "x" * 64 + ".example"):
            self.assertRaises(ValueError, normalize_domain, bad)


# -- the record ---------------------------------------------------------------------


class RecordTests(SynchronousTestCase):
    """
    The TXT record that publishes a key, and C{relayctl dkim-record}.
    """

    def setUp(self) -> None:
        self.files = standard_keys(self)
        self.table = load_keys(self.files.path)

    def test_rsa(self) -> None:
        """
        An RSA key's record holds its SubjectPublicKeyInfo; its zone form
        cuts the text into strings of at most 255 bytes that join to it.
        """
        key = self.table.find("example.com", "s1")
        assert key is not None
        value = record_value(key)
        public = private_key("rsa").public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.assertEqual(value, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())
        self.assertEqual(record_name(key), "s1._domainkey.example.com.")
        line = zone_record(key)
        strings = re.findall(r'"([^"]*)"', line)
        self.assertGreater(len(strings), 1)
        self.assertTrue(all(len(s) <= MAX_STRING for s in strings))
        self.assertEqual("".join(strings), value)
        self.assertTrue(line.startswith('s1._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p='))
        self.assertTrue(line.endswith('" )'))

    def test_ed25519(self) -> None:
        """
        An Ed25519 key's record holds its 32 raw bytes (RFC 8463).
        """
        key = self.table.find("example.com", "e1")
        assert key is not None
        raw = private_key("ed25519").public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.assertEqual(record_value(key), "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode())
        self.assertEqual(zone_record(key), f'e1._domainkey.example.com. IN TXT ( "{record_value(key)}" )')

    def parse(self, *argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser(prog="relayctl")
        sub = parser.add_subparsers(dest="command")
        add_dkim_record_parser(sub)
        return parser.parse_args(list(argv))

    def test_command(self) -> None:
        """
        C{dkim-record --dkim-keys FILE DOMAIN SELECTOR} prints the zone
        line; with C{--value}, the text alone; domain and selector in any
        case.
        """
        key = self.table.find("example.com", "s1")
        assert key is not None
        options = self.parse("dkim-record", "--dkim-keys", self.files.path, "Example.com", "S1")
        self.assertEqual(options.command, "dkim-record")
        self.assertEqual(dkim_record(options), zone_record(key) + "\n")
        options = self.parse("dkim-record", "--dkim-keys", self.files.path, "--value", "example.com", "s1")
        self.assertEqual(dkim_record(options), record_value(key) + "\n")

    def test_command_errors(self) -> None:
        """
        A key the file does not list, or a bad keys file: an error saying
        so (the keys it lists, the line).
        """
        options = self.parse("dkim-record", "--dkim-keys", self.files.path, "example.com", "s9")
        with self.assertRaises(DkimKeysError) as raised:
            dkim_record(options)
        self.assertEqual(
            str(raised.exception),
            f"{self.files.path} lists no key for example.com selector s9 "
            "(it lists: example.com s1, example.com e1, example.org o1)",
        )
        self.files.write("example.com s1\n")
        with self.assertRaises(DkimKeysError) as raised:
            dkim_record(self.parse("dkim-record", "--dkim-keys", self.files.path, "example.com", "s1"))
        self.assertIn("line 1: expected", str(raised.exception))

    def relayctl(self, *argv: str) -> tuple[str, str, int]:
        out, err = io.StringIO(), io.StringIO()
        code = ctl.main(list(argv), out=out, err=err)
        return out.getvalue(), err.getvalue(), code

    def test_relayctl(self) -> None:
        """
        C{relayctl dkim-record} prints the record and exits 0, without a
        relay (no control socket is asked).
        """
        key = self.table.find("example.com", "e1")
        assert key is not None
        self.assertEqual(
            self.relayctl("--control", "unix:/nonexistent/ctl.sock", "dkim-record",
                          "--dkim-keys", self.files.path, "example.com", "e1"),
            (zone_record(key) + "\n", "", 0),
        )  # fmt: skip
        self.assertEqual(
            self.relayctl("dkim-record", "--dkim-keys", self.files.path, "--value", "example.com", "e1"),
            (record_value(key) + "\n", "", 0),
        )

    def test_relayctl_errors(self) -> None:
        """
        A key not listed, a keys file that cannot be read, a key under 1024
        bits or a bad line: one line on stderr naming the file (and the
        line), exit 1.
        """
        path = self.files.path
        out, err, code = self.relayctl("dkim-record", "--dkim-keys", path, "example.net", "s1")
        self.assertEqual((out, code), ("", 1))
        self.assertEqual(err, f"relayctl dkim-record: {path} lists no key for example.net selector s1 "
                         "(it lists: example.com s1, example.com e1, example.org o1)\n")  # fmt: skip
        missing = os.path.join(self.files.directory, "missing.keys")
        self.assertEqual(
            self.relayctl("dkim-record", "--dkim-keys", missing, "example.com", "s1"),
            ("", f"relayctl dkim-record: {missing}: cannot read: No such file or directory\n", 1),
        )
        small = self.files.key_file("small.pem", RSA_512)
        self.files.write("example.com s1 rsa.pem\nexample.com s2 small.pem\n")
        self.assertEqual(
            self.relayctl("dkim-record", "--dkim-keys", path, "example.com", "s1"),
            ("", f"relayctl dkim-record: {path} line 2: {small} is an RSA key of 512 bits: "
                 "DKIM needs at least 1024\n", 1),
        )  # fmt: skip
        self.files.write("example.com s1 rsa.pem extra words\n")
        out, err, code = self.relayctl("dkim-record", "--dkim-keys", path, "example.com", "s1")
        self.assertEqual((out, code, err.count("\n")), ("", 1, 1))
        self.assertTrue(err.startswith(f"relayctl dkim-record: {path} line 1: expected DOMAIN"), err)

    def test_relay_asked_without_keys_file(self) -> None:
        """
        Without C{--dkim-keys}, C{relayctl dkim-record} asks the running
        relay, which answers from the keys it signs with (L{rpc.DkimRecord}
        through the real control locator); a key it does not have, or a
        relay that signs nothing, is one line and exit 1.
        """
        key = self.table.find("example.com", "e1")
        assert key is not None
        clock = Clock()
        signing = ControlLocator(MemorySpool(clock), clock=clock,
                                 dkim_signer=DkimSigner(self.table, clock, synchronous))  # fmt: skip
        calls: list[tuple[str, str, dict[str, Any]]] = []

        def call(locator: ControlLocator) -> Callable[..., dict[str, Any]]:
            # The AMP round trip is the control tests' business: here the
            # responder is called as the server calls it, and its errors
            # reach relayctl as the AMP client raises them (the same class).
            def remote(control: str, command: Any, **kwargs: Any) -> dict[str, Any]:
                calls.append((control, command.__name__, kwargs))
                self.assertIs(command, rpc.DkimRecord)
                return locator.dkim_record(**kwargs)

            return remote

        self.patch(ctl, "_call", call(signing))
        self.assertEqual(
            self.relayctl("--control", "unix:/c.sock", "dkim-record", "example.com", "e1"),
            (zone_record(key) + "\n", "", 0),
        )
        self.assertEqual(
            calls, [("unix:/c.sock", "DkimRecord", {"domain": "example.com", "selector": "e1"})]
        )
        self.assertEqual(
            self.relayctl("--control", "unix:/c.sock", "dkim-record", "--value", "example.com", "e1"),
            (record_value(key) + "\n", "", 0),
        )
        out, err, code = self.relayctl("--control", "unix:/c.sock", "dkim-record", "example.net", "s1")
        self.assertEqual((out, code), ("", 1))
        self.assertEqual(err, "relayctl dkim-record: bad argument: the relay's --dkim-keys lists no key "
                         "for example.net selector s1 (it lists: example.com s1, example.com e1, "
                         "example.org o1)\n")  # fmt: skip
        self.patch(ctl, "_call", call(ControlLocator(MemorySpool(clock), clock=clock)))
        self.assertEqual(
            self.relayctl("--control", "unix:/c.sock", "dkim-record", "example.com", "e1"),
            ("", "relayctl dkim-record: bad argument: this relay signs nothing (it was started "
                 "without --dkim-keys)\n", 1),
        )  # fmt: skip


# -- the signer ---------------------------------------------------------------------


class SignerTests(SynchronousTestCase):
    """
    L{DkimSigner}: which envelopes are signed with which keys, and the
    signed messages.
    """

    def setUp(self) -> None:
        self.files = standard_keys(self)
        self.table = load_keys(self.files.path)
        self.dns = DNSStub(self.table)
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.signer = DkimSigner(self.table, self.clock, synchronous)
        self.spool = MemorySpool(self.clock)
        self.events: list[dict[str, Any]] = []
        self.log = Logger(observer=self.events.append)

    def sign(self, *envelopes: EnvelopeWithNextHop) -> Any:
        return self.successResultOf(
            defer.Deferred.fromCoroutine(self.signer.sign(envelopes, self.spool, self.log))
        )

    def envelope(self, message: bytes | Message = MESSAGE, **kwargs: Any) -> EnvelopeWithNextHop:
        e = make_envelope("alice@example.com", "bob@example.net", b"")
        if isinstance(message, bytes):
            message = Message.from_bytes(message)
        return EnvelopeWithNextHop(dataclasses.replace(e, message=message), **kwargs)

    def data(self, e: EnvelopeWithNextHop) -> bytes:
        message = e.envelope.message
        if message.data is not None:
            return message.data
        with message.open() as f:
            return f.read()

    def test_interface(self) -> None:
        """
        The signer is something SIGHUP reloads.
        """
        self.assertTrue(verifyObject(IReloadable, self.signer))

    def test_rsa_and_ed25519(self) -> None:
        """
        A message from a domain with an RSA and an Ed25519 key is signed
        with both, as listed; both verify against the published records;
        the signed message's parsed headers have the new fields first.
        """
        signing = self.sign(self.envelope())
        [e] = signing.envelopes
        data = self.data(e)
        self.assertTrue(data.endswith(MESSAGE))
        self.assertEqual(
            verified(self, data, self.dns),
            [("example.com", "s1", "rsa-sha256"), ("example.com", "e1", "ed25519-sha256")],
        )
        self.assertEqual([n for n, _ in e.envelope.message.headers[:3]],
                         ["DKIM-Signature", "DKIM-Signature", "From"])  # fmt: skip
        self.assertEqual(e.envelope.message.size, len(data))
        self.assertEqual(signing.signed_as, ["d=example.com s=s1", "d=example.com s=e1"])
        self.assertEqual(len(signing.made), 1)
        self.assertEqual(signatures(data)[0][b"t"], b"1700000000")

    def test_parent_domain(self) -> None:
        """
        A From: in a subdomain signs as the listed parent (d=example.org).
        """
        message = MESSAGE.replace(b"alice@example.com", b"news@lists.example.org")
        [e] = self.sign(self.envelope(message)).envelopes
        self.assertEqual(verified(self, self.data(e), self.dns), [("example.org", "o1", "rsa-sha256")])

    def test_not_listed(self) -> None:
        """
        A message from a domain without keys, or without a From address,
        is left as it is (the same message).
        """
        for message in (
            MESSAGE.replace(b"alice@example.com", b"alice@example.net"),
            MESSAGE.replace(b"From: Alice <alice@example.com>\r\n", b""),
            MESSAGE.replace(b"<alice@example.com>", b"undisclosed-sender:;"),
        ):
            original = self.envelope(message)
            signing = self.sign(original)
            self.assertIs(signing.envelopes[0], original)
            self.assertEqual((signing.made, signing.replaced, signing.signed_as), ([], [], []))

    def test_plugin_choice(self) -> None:
        """
        C{dkim=False} leaves the message unsigned; C{dkim="example.org"}
        signs with example.org's keys whatever the From: says; a domain
        without keys leaves it unsigned, with a warning.
        """
        original = self.envelope(dkim=False)
        self.assertIs(self.sign(original).envelopes[0], original)
        [e] = self.sign(self.envelope(dkim="Example.ORG")).envelopes
        self.assertEqual(verified(self, self.data(e), self.dns), [("example.org", "o1", "rsa-sha256")])
        original = self.envelope(dkim="nokeys.example")
        self.assertIs(self.sign(original).envelopes[0], original)
        [warning] = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["dkim_domain"], "nokeys.example")

    def test_bad_choice(self) -> None:
        """
        C{dkim} is True, False or a domain: anything else is refused when
        the envelope is made.
        """
        self.assertRaises(TypeError, self.envelope, dkim=None)
        self.assertRaises(TypeError, self.envelope, dkim=1)
        self.assertRaises(ValueError, self.envelope, dkim=" ")

    def test_messages_that_verify(self) -> None:
        """
        Folded and unfolded headers, 8-bit bodies, a body without a final
        CRLF and bare LF line endings (a message a plugin made) are signed
        so that the signature verifies; the stored bytes end with CRLF and
        have CRLF line endings, as the relay client sends them.
        """
        cases = [
            MESSAGE,
            FOLDED,
            MESSAGE + b"no final line end",
            MESSAGE + b"trailing blanks  \t",
            MESSAGE.replace(b"\r\n", b"\n"),
            MESSAGE + b"a lone\rCR\r\n",
        ]
        for message in cases:
            [e] = self.sign(self.envelope(message)).envelopes
            data = self.data(e)
            self.assertEqual(len(verified(self, data, self.dns)), 2, message)
            self.assertTrue(data.endswith(b"\r\n"))
            self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
            self.assertNotIn(b"\r", data.replace(b"\r\n", b""))

    def test_shared_message(self) -> None:
        """
        Envelopes sharing a message share one signed copy; the original,
        carried by none of them now, is to be discarded after the commit.
        """
        first = self.envelope()
        second = dataclasses.replace(first, next_hop_choices=["mx.example.net:25"])
        signing = self.sign(first, second)
        a, b = signing.envelopes
        self.assertIs(a.envelope.message, b.envelope.message)
        self.assertEqual(signing.made, [a.envelope.message])
        self.assertEqual(signing.replaced, [first.envelope.message])
        self.assertEqual(b.next_hop_choices, ("mx.example.net:25",))

    def test_mixed_choices(self) -> None:
        """
        Of two envelopes of one message, one signed and one not: the
        original stays (not to be discarded) for the unsigned one.
        """
        first = self.envelope()
        second = dataclasses.replace(first, dkim=False)
        signing = self.sign(first, second)
        self.assertIsNot(signing.envelopes[0].envelope.message, first.envelope.message)
        self.assertIs(signing.envelopes[1], second)
        self.assertEqual(signing.replaced, [])

    def test_unsignable_goes_unsigned(self) -> None:
        """
        A message whose header section dkimpy cannot read goes unsigned,
        with a warning saying why.
        """
        original = self.envelope(b"From: alice@example.com\r\nnot a header\r\n\r\nbody\r\n")
        self.assertIs(self.sign(original).envelopes[0], original)
        [warning] = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertIn("not signable", warning["reason"])

    def spilled(self, message: bytes) -> Message:
        path = os.path.join(self.mktemp())
        with open(path, "wb") as f:
            f.write(message)
        base = Message.from_bytes(message)
        return Message(headers=base.headers, size=len(message), path=path)

    def test_file_message(self) -> None:
        """
        A message held in a file is read a chunk at a time and copied,
        after the signature fields, into a new message of the spool's
        writer, chunk by chunk: never more than a chunk in one write; the
        copy verifies.
        """
        body = b"".join(b"line %d of a large message,  with  blanks \r\n" % i for i in range(40_000))
        message = self.spilled(FOLDED + body)
        self.assertGreater(message.size, 4 * CHUNK_SIZE)
        signing = self.sign(self.envelope(message))
        [e] = signing.envelopes
        [writer] = self.spool.writers
        self.assertEqual(writer.message_id, "test-envelope.dkim0")
        self.assertTrue(writer.finished)
        data = self.data(e)
        self.assertTrue(data.endswith(FOLDED + body))
        self.assertEqual(len(verified(self, data, self.dns)), 2)
        self.assertEqual(signing.replaced, [message])

    def test_file_message_chunks(self) -> None:
        """
        The spool's writer gets the message in chunks of at most
        L{CHUNK_SIZE} (memory stays flat with message size).
        """
        writes: list[int] = []
        original_receive = self.spool.receive

        def receive(message_id: str) -> Any:
            writer = original_receive(message_id)
            write = writer.write

            def recording(data: bytes) -> bool:
                writes.append(len(data))
                return write(data)

            writer.write = recording  # type: ignore[method-assign]
            return writer

        self.patch(self.spool, "receive", receive)
        body = b"x" * 100 + b"\r\n"
        message = self.spilled(MESSAGE + body * 20_000)
        self.sign(self.envelope(message))
        self.assertGreater(len(writes), 4)
        self.assertLessEqual(max(writes[1:]), CHUNK_SIZE)

    def test_reload(self) -> None:
        """
        SIGHUP's reload reads the keys file again: a good file's keys sign
        from then on; a bad one is a L{ReloadError} naming the line, and
        the keys in use stay.
        """
        self.files.write("example.net n1 rsa.pem\n")
        done = self.successResultOf(self.signer.reload(synchronous))
        self.assertEqual(done, f"Signing with 1 DKIM key for 1 domain from {self.files.path}")
        self.assertEqual(self.signer.table.domains, ("example.net",))
        in_use = self.signer.table
        self.files.write("example.net n1 rsa.pem\nexample.net n2\n")
        failure = self.failureResultOf(self.signer.reload(synchronous), ReloadError)
        self.assertEqual(str(failure.value), f"{self.files.path} line 2: expected DOMAIN SELECTOR "
                         "KEYFILE [rsa|ed25519], not 'example.net n2'")  # fmt: skip
        self.assertIs(self.signer.table, in_use)

    def test_reload_logged(self) -> None:
        """
        Through the SIGHUP service: a bad file is logged as not reloaded,
        with the line, and the old keys still sign.
        """
        service = ReloadService([self.signer], self.clock, synchronous, install=lambda *a: None)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        os.remove(os.path.join(self.files.directory, "ed.pem"))
        self.successResultOf(service.reload())
        [event] = [e for e in events if e.get("reload_failed")]
        self.assertEqual(event["what"], "DKIM keys")
        self.assertIn("line 3: cannot read key file", event["error"])
        [e] = self.sign(self.envelope()).envelopes
        self.assertEqual(len(verified(self, self.data(e), self.dns)), 2)

    def test_from_domain(self) -> None:
        """
        The From: domain is the first address's, normalised.
        """
        cases = {
            b"From: Alice <alice@Mail.Example.COM>\r\n\r\n": "mail.example.com",
            b"From: a@example.org, b@example.net\r\n\r\n": "example.org",
            b"From: =?utf-8?q?J=C3=B6rg?= <j@b\xc3\xbccher.example>\r\n\r\n": "xn--bcher-kva.example",
            b"From: nobody\r\n\r\n": None,
            b"Subject: x\r\n\r\n": None,
        }
        for message, domain in cases.items():
            self.assertEqual(from_domain(Message.from_bytes(message)), domain, message)


# -- the server and the relay client ------------------------------------------------


class ServerSigningTests(SynchronousTestCase):
    """
    The server signs what the plugin sends before it is spooled; the relay
    client delivers those bytes, and they verify at the next hop.
    """

    SESSION = """
        < 220
        > EHLO client.example
        < 250-
        < re:250.*
        < re:250.*
        < re:250.*
        < re:250.*
        < re:250.*
        < re:250.*
        < re:250.*
        > MAIL FROM:<alice@example.com> BODY=8BITMIME
        < 250
        > RCPT TO:<bob@example.net>
        < 250
        > DATA
        < 354
    """

    def setUp(self) -> None:
        self.files = standard_keys(self)
        self.table = load_keys(self.files.path)
        self.dns = DNSStub(self.table)

    def session(self, callbacks: object, message: bytes, spool: Any = None) -> Any:
        clock = Clock()
        signer = DkimSigner(self.table, clock, synchronous)
        harness = ServerHarness(
            callbacks, clock=clock, dkim_signer=signer, hostname="relay.test",
            **({"spool": spool} if spool is not None else {}),
        )  # fmt: skip
        harness.play(self.SESSION, exhaustive=False)
        harness.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        return harness

    def test_signed_before_spooling(self) -> None:
        """
        The spooled message carries the signatures (above the server's
        Received field, which they do not sign) and verifies; the client
        got its 250 once it was spooled.
        """
        harness = self.session(Simple, FOLDED)
        self.assertTrue(harness.lines()[-1].startswith("250 2.0.0 Ok: queued as "))
        [entry] = harness.spooled
        data = harness.spool.messages_by_id[entry.id].data
        self.assertEqual(len(verified(self, data, self.dns)), 2)
        names = [n for n, _ in Message.from_bytes(data).headers[:3]]
        self.assertEqual(names, ["DKIM-Signature", "DKIM-Signature", "Received"])

    def test_signed_from_chunks(self) -> None:
        """
        A message sent in BDAT chunks (RFC 3030) is signed like one sent
        with DATA: the same signatures, which verify.
        """
        clock = Clock()
        harness = ServerHarness(
            Simple, clock=clock, dkim_signer=DkimSigner(self.table, clock, synchronous),
            hostname="relay.test",
        )  # fmt: skip
        harness.play(self.SESSION.split("        > DATA")[0], exhaustive=False)
        half = len(FOLDED) // 2
        harness.send(
            b"BDAT %d\r\n" % half + FOLDED[:half]
            + b"BDAT %d LAST\r\n" % (len(FOLDED) - half) + FOLDED[half:]
        )  # fmt: skip
        self.assertTrue(harness.lines()[-1].startswith("250 2.0.0 Ok: queued as "))
        [entry] = harness.spooled
        data = harness.spool.messages_by_id[entry.id].data
        self.assertEqual(len(verified(self, data, self.dns)), 2)

    def test_plugin_skips(self) -> None:
        """
        A plugin that answers C{dkim=False} gets its message spooled as
        received, unsigned.
        """

        class Unsigned(Simple):
            def process_envelope(self, log: Any, session: Any, envelope: Any) -> Any:
                return Send([EnvelopeWithNextHop(envelope, dkim=False)])

        harness = self.session(Unsigned, MESSAGE)
        [entry] = harness.spooled
        self.assertEqual(signatures(harness.spool.messages_by_id[entry.id].data), [])

    def test_unlisted_domain(self) -> None:
        """
        A message from a domain without keys is spooled unsigned.
        """
        harness = self.session(Simple, MESSAGE.replace(b"alice@example.com", b"alice@example.net"))
        [entry] = harness.spooled
        self.assertEqual(signatures(harness.spool.messages_by_id[entry.id].data), [])

    def test_signing_fails(self) -> None:
        """
        When signing fails (say the disk), the client is told to try again
        later (451) and nothing is spooled; the received message is
        discarded.
        """

        def broken(*args: Any) -> defer.Deferred[Any]:
            return defer.fail(OSError(5, "Input/output error"))

        clock = Clock()
        signer = DkimSigner(self.table, clock, broken)
        harness = ServerHarness(Simple, clock=clock, dkim_signer=signer)
        harness.play(self.SESSION, exhaustive=False)
        harness.send(MESSAGE + b".\r\n")
        self.assertTrue(harness.lines()[-1].startswith("451 "), harness.lines())
        self.assertEqual(harness.spooled, [])
        self.assertEqual(len(harness.spool.discarded), 1)
        self.flushLoggedErrors(OSError)

    def test_after_relaying(self) -> None:
        """
        The relay client delivers the spooled, signed message to a second
        server (over an in-memory connection): the bytes that server
        received verify, dot lines and 8-bit bytes included.
        """
        body = FOLDED + b".a line with a dot\r\n..two\r\n8-bit \xe9\r\n"
        harness = self.session(Simple, body)
        [entry] = harness.spooled
        stored = harness.spool.messages_by_id[entry.id]
        hop = ClientHarness(Simple, hostname="sink.test")
        envelope = make_envelope("alice@example.com", "bob@example.net")
        hop.deliver(dataclasses.replace(envelope, message=stored))
        [received] = hop.spool.entries_by_id
        data = hop.spool.messages_by_id[received].data
        assert data is not None
        # The message's own, the relay's, the hop's.
        self.assertEqual(data.count(b"Received: "), 3)
        self.assertEqual(len(verified(self, data, self.dns)), 2)

    def test_spilled_through_disk_spool(self) -> None:
        """
        With the disk spool, a message large enough to spill to C{tmp/} is
        signed into a new file that the commit takes; the received file is
        removed; what is in C{messages/} verifies.
        """
        from relay.spool.disk import DiskSpool

        clock = Clock()
        root = os.path.abspath(self.mktemp())
        spool = DiskSpool(os.path.join(root, "spool"), synchronous, clock, spill_threshold=1024)
        body = b"".join(b"line %d\r\n" % i for i in range(2000))
        signer = DkimSigner(self.table, clock, synchronous)
        harness = ServerHarness(Simple, clock=clock, spool=spool, dkim_signer=signer)
        harness.play(self.SESSION, exhaustive=False)
        harness.send(MESSAGE + body + b".\r\n")
        self.assertTrue(harness.lines()[-1].startswith("250 "), harness.lines())
        self.assertEqual(os.listdir(os.path.join(root, "spool", "tmp")), [])
        [name] = os.listdir(os.path.join(root, "spool", "messages"))
        with open(os.path.join(root, "spool", "messages", name), "rb") as f:
            data = f.read()
        self.assertTrue(data.endswith(MESSAGE + body))
        self.assertEqual(len(verified(self, data, self.dns)), 2)


# -- the options --------------------------------------------------------------------


class OptionsTests(SynchronousTestCase):
    """
    C{twistd relay --dkim-keys FILE}, the settings and the builder.
    """

    def setUp(self) -> None:
        self.files = standard_keys(self)
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def options(self, *argv: str) -> Any:
        from relay.tap import Options

        options = Options()
        options.parent = usage.Options()  # as twistd's
        options.parseOptions(
            ["--spool", os.path.join(self.base, "spool"), "--receivers", "0",
             "--quarantine", os.path.join(self.base, "q"), *argv]
        )  # fmt: skip
        return options

    def test_bad_file_stops_start(self) -> None:
        """
        A bad keys file ends C{twistd relay} with one line naming the
        option, the file and the line.
        """
        self.files.write("example.com s1 rsa.pem\nexample.com\n")
        with self.assertRaises(SystemExit) as raised:
            self.options("--dkim-keys", self.files.path)
        self.assertEqual(
            raised.exception.code,
            f"twistd relay: --dkim-keys {self.files.path} line 2: expected DOMAIN SELECTOR "
            "KEYFILE [rsa|ed25519], not 'example.com'",
        )
        with self.assertRaises(SystemExit) as raised:
            self.options("--dkim-keys", os.path.join(self.base, "nothing"))
        self.assertEqual(
            raised.exception.code,
            f"twistd relay: --dkim-keys {os.path.join(self.base, 'nothing')}: cannot read: "
            "No such file or directory",
        )

    def test_file_gone_bad_before_build(self) -> None:
        """
        A keys file that goes bad between the options and the build still
        ends the start with one line.
        """
        from relay.tap import makeService

        options = self.options("--dkim-keys", self.files.path)
        self.files.write("nonsense\n")
        with self.assertRaises(SystemExit) as raised:
            makeService(options)
        self.assertEqual(
            raised.exception.code,
            f"twistd relay: --dkim-keys {self.files.path} line 1: expected DOMAIN SELECTOR "
            "KEYFILE [rsa|ed25519], not 'nonsense'",
        )

    def test_settings(self) -> None:
        """
        The settings carry the file, absolute for receivers, through JSON.
        """
        from relay.app.settings import Settings

        settings = Settings.from_options(self.options("--dkim-keys", self.files.path))
        self.assertEqual(settings.dkim_keys, self.files.path)
        receivers = Settings(dkim_keys="dkim.keys", hostname="relay.test").for_receivers()
        self.assertEqual(receivers.dkim_keys, os.path.abspath("dkim.keys"))
        self.assertEqual(Settings.from_json(receivers.to_json()), receivers)
        self.assertIsNone(Settings(hostname="relay.test").dkim_keys)

    def test_built(self) -> None:
        """
        The relay built with the option gives its SMTP server the signer
        and reloads it on SIGHUP.
        """
        from relay.tap import makeService

        relay = makeService(self.options("--dkim-keys", self.files.path))
        signer = relay.factory.settings.dkim_signer
        self.assertIsInstance(signer, DkimSigner)
        self.assertEqual(signer.table.domains, ("example.com", "example.org"))
        [reload] = [s for s in relay if s.name == "reload"]
        self.assertIn(signer, reload.reloadables)

    def test_not_given(self) -> None:
        """
        Without the option nothing signs and dkimpy is not needed to build
        the server.
        """
        from relay.tap import makeService

        relay = makeService(self.options())
        self.assertIsNone(relay.factory.settings.dkim_signer)


class CostTests(SynchronousTestCase):
    """
    What signing costs is measured by the benchmark (bench/run.py, W1
    DKIM), not here; this only pins that the signature is made by
    cryptography and not by dkimpy's Python RSA.
    """

    def test_not_dkimpys_rsa(self) -> None:
        """
        dkimpy's own RSA is never called while signing.
        """
        calls: list[object] = []
        self.patch(dkim, "RSASSA_PKCS1_v1_5_sign", lambda *a: calls.append(a) or b"")
        key = DkimKey("example.com", "s1", "rsa", private_key("rsa"))
        data, normalized = sign_bytes([key], MESSAGE, int(time.time()))
        self.assertEqual(calls, [])
        self.assertTrue(data.startswith(b"DKIM-Signature: "))
