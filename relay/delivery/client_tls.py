"""
The relay client's TLS decision for a hop: whether to STARTTLS, whether a
hop without it may have the message in plain text, and what certificate
it must show.

A L{TLSPolicy} is the one object the session asks
(L{relay.delivery.client_session}); it holds the decision, the session
only carries it out.  C{--relay-tls} gives the default policy; a policy
per destination (the C{--tls-policy} file, DANE, MTA-STS, the plugin's
choice) is a different L{TLSPolicy} for each hop, chosen by
L{relay.delivery.tlspolicy.TLSPolicies} before the session starts.

The handshake never fails for the certificate: the client completes it
(with the host name as SNI), then checks what the hop presented
(L{TLSPolicy.problem}), so that a refusal says why in TLS-RPT's words
(RFC 8460 section 4.3: C{certificate-expired}, C{certificate-host-mismatch},
...) and the session QUITs instead of dropping the connection.  The SSL
contexts are made once (L{TLSContexts}), not per connection.
"""

from __future__ import annotations

import datetime
import ipaddress
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from relay.delivery.dane import TLSARecord
from relay.model.entry import TLSOutcome

#: The C{--relay-tls} modes, weakest first.
TLS_MODES = ("none", "may", "encrypt", "verify")
#: Every mode a L{TLSPolicy} may have: DANE is chosen per hop, never
#: configured as the default.
POLICY_MODES = (*TLS_MODES, "dane")

# OpenSSL's X509_V_ERR_* codes that say the certificate's dates are wrong,
# and those that say it is not from a trusted issuer.
_EXPIRED = {9, 10, 13, 14}
_UNTRUSTED = {2, 18, 19, 20, 21, 27}


class TLSContexts:
    """
    The relay client's SSL contexts, each made once, on first use: one
    that checks nothing (C{may}, C{encrypt}, DANE, whose checks are the
    client's own) and one that verifies the chain against the trust roots
    (C{verify}, MTA-STS, policy hosts), recording what OpenSSL found
    wrong rather than failing the handshake.

    @param trust_root: a C{twisted.internet.ssl.Certificate} to trust
        instead of the platform's trust store (tests).
    @param ca_file: a PEM file of more CAs to trust (C{--tls-ca-file}).
    """

    def __init__(self, trust_root: Any = None, ca_file: str | None = None) -> None:
        self.trust_root = trust_root
        self.ca_file = ca_file
        self._plain: Any = None
        self._verifying: Any = None
        self._errors: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()

    def plain(self) -> Any:
        if self._plain is None:
            from twisted.internet import ssl

            self._plain = ssl.CertificateOptions(verify=False).getContext()
        return self._plain

    def verifying(self) -> Any:
        if self._verifying is None:
            from OpenSSL import SSL
            from twisted.internet import ssl

            context = ssl.CertificateOptions(verify=False).getContext()
            context.set_verify(SSL.VERIFY_PEER, self._verified)
            if self.trust_root is not None:
                store = context.get_cert_store()
                assert store is not None
                store.add_cert(self.trust_root.original)
            else:
                context.set_default_verify_paths()
            if self.ca_file is not None:
                context.load_verify_locations(self.ca_file)
            self._verifying = context
        return self._verifying

    def _verified(self, connection: Any, certificate: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            self._errors.setdefault(connection, []).append(errno)
        # Completed whatever OpenSSL found: the session decides, and says why.
        return True

    def chain_errors(self, connection: Any) -> list[int]:
        """
        The X509_V_ERR codes OpenSSL found in C{connection}'s peer chain.
        """
        return list(self._errors.get(connection, ()))


#: The contexts of policies made without any (trusting the platform's store).
_DEFAULT_CONTEXTS = TLSContexts()


@implementer(IOpenSSLClientConnectionCreator)
class HopConnectionCreator:
    """
    The TLS connection to one host: SNI with its name (not for an IP
    address, RFC 6066 section 3), on one of the shared L{TLSContexts}.

    @ivar connection: the C{OpenSSL.SSL.Connection}, once made: what the
        checks after the handshake read the peer's chain from.
    @param on_handshake: called with the connection once the handshake is
        done; a string it returns fails the connection (for HTTPS, where
        the request would go out at once).
    """

    def __init__(self, context: Any, host: str, on_handshake: Any = None) -> None:
        self._context = context
        self._host = host
        self._on_handshake = on_handshake
        self.connection: Any = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL import SSL

        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if not _is_ip(self._host):
            connection.set_tlsext_host_name(self._host.encode("idna"))
        connection.set_connect_state()
        if self._on_handshake is not None:
            check = self._on_handshake

            def info(conn: Any, where: int, ret: int) -> None:
                if where & SSL.SSL_CB_HANDSHAKE_DONE:
                    problem = check(conn)
                    if problem is not None:
                        from twisted.internet.ssl import VerificationError
                        from twisted.python.failure import Failure

                        conn.get_app_data().failVerification(
                            Failure(VerificationError(problem))
                        )

            connection.set_info_callback(info)
        self.connection = connection
        return connection


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def name_problem(certificate: Any, names: Sequence[str]) -> str | None:
    """
    Why C{certificate} (a C{cryptography} certificate) is valid for none
    of C{names} (host names or IP addresses), or C{None}.  A certificate
    without subjectAltName matches nothing (RFC 6125; Twisted only logs
    that).
    """
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import (
        verify_certificate_hostname,
        verify_certificate_ip_address,
    )

    problem = "no name to check"
    for name in names:
        try:
            if _is_ip(name):
                verify_certificate_ip_address(certificate, name)
            else:
                verify_certificate_hostname(certificate, name)
        except (CertificateError, VerificationError) as e:
            problem = str(e)
            continue
        return None
    return problem


def webpki_problem(contexts: TLSContexts, connection: Any, names: Sequence[str]) -> tuple[str, str] | None:
    """
    Why the chain C{connection}'s peer presented is not good for
    C{names} under the trust roots of C{contexts}, as C{(TLS-RPT result
    type, detail)}, or C{None}.
    """
    certificate = connection.get_peer_certificate(as_cryptography=True) if connection else None
    if certificate is None:
        return ("validation-failure", "no peer certificate")
    errors = contexts.chain_errors(connection)
    if any(e in _EXPIRED for e in errors):
        return ("certificate-expired", "a certificate of the chain is outside its validity period")
    if any(e in _UNTRUSTED for e in errors):
        return ("certificate-not-trusted", "the chain is not from a trusted CA")
    if errors:
        return ("validation-failure", f"certificate chain error {errors[0]}")
    problem = name_problem(certificate, names)
    if problem is not None:
        return ("certificate-host-mismatch", problem)
    return None


@dataclass(frozen=True)
class TLSPolicy:
    """
    What TLS the client asks of a hop.

    @ivar mode: C{"none"} (never STARTTLS), C{"may"} (when offered),
        C{"encrypt"} (required, certificate not checked), C{"verify"}
        (required, a chain from the trust roots valid for the host name or
        a C{match} name) or C{"dane"} (required, the chain matches one of
        the C{tlsa} records).
    @ivar trust_root: the C{trustRoot} for C{"verify"} (C{None}: the
        platform's trust store, and C{--tls-ca-file}).
    @ivar match: more names a C{"verify"} certificate may show.
    @ivar tlsa: the usable TLSA records of C{"dane"}.
    @ivar name: the policy's name for logs and metrics (C{"mta-sts"},
        C{"dane-only"}, ...); by default the mode.
    @ivar source: where it came from: C{"default"} (C{--relay-tls}),
        C{"file"} (C{--tls-policy}), C{"plugin"}, C{"dane"}, C{"mta-sts"}.
    @ivar enforced: a failure keeps the message back; C{False} (MTA-STS
        C{testing}): it is recorded and the message goes as with C{may}.
    @ivar note: a problem found while choosing it that did not stop
        delivery, as C{(TLS-RPT result type, detail)} (TLSA records none
        of which is usable, an MTA-STS policy that could not be fetched).
    @ivar contexts: the SSL contexts to use.
    """

    mode: str = "may"
    trust_root: Any = None
    match: tuple[str, ...] = ()
    tlsa: tuple[TLSARecord, ...] = ()
    name: str | None = None
    source: str = "default"
    enforced: bool = True
    note: tuple[str, str] | None = None
    contexts: TLSContexts | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in POLICY_MODES:
            raise ValueError(
                f"tls must be none, may, encrypt, verify or dane, not {self.mode!r}"
            )
        if self.contexts is None:
            contexts = _DEFAULT_CONTEXTS if self.trust_root is None else TLSContexts(self.trust_root)
            object.__setattr__(self, "contexts", contexts)
        object.__setattr__(self, "match", tuple(self.match))
        object.__setattr__(self, "tlsa", tuple(self.tlsa))

    @property
    def label(self) -> str:
        """
        The policy's name in logs and metrics.
        """
        return self.name or self.mode

    @property
    def attempted(self) -> bool:
        """
        STARTTLS is sent when the hop offers it.
        """
        return self.mode != "none"

    @property
    def required(self) -> bool:
        """
        A hop that does not offer STARTTLS does not get the message.
        """
        return self.enforced and self.mode in ("encrypt", "verify", "dane")

    @property
    def key(self) -> str:
        """
        What a connection made under this policy is kept idle by: a session
        is reused only for mail that asks no more of it.
        """
        if self.mode in ("none", "may", "encrypt") and self.enforced:
            return self.mode
        return repr((self.mode, self.match, self.tlsa, self.enforced, self.trust_root))

    def outcome(self, result: str, detail: str | None = None) -> TLSOutcome:
        """
        What came of this policy for an attempt.
        """
        return TLSOutcome(self.label, self.source, result, detail)

    def connection_creator(self, host: str) -> HopConnectionCreator:
        """
        The C{IOpenSSLClientConnectionCreator} for STARTTLS to C{host}.
        """
        # pyOpenSSL on first use: a relay whose next hops never offer
        # STARTTLS does without it (see relay.app._compat.keep_openssl_out).
        assert self.contexts is not None
        if self.mode == "verify":
            return HopConnectionCreator(self.contexts.verifying(), host)
        return HopConnectionCreator(self.contexts.plain(), host)

    def problem(self, host: str, creator: Any) -> tuple[str, str] | None:
        """
        Why the certificate chain the peer of C{creator}'s connection showed
        after the handshake is not good enough for C{host}, as C{(TLS-RPT
        result type, detail)}, or C{None} if it is.
        """
        connection = getattr(creator, "connection", None)
        if self.mode == "verify":
            assert self.contexts is not None
            return webpki_problem(self.contexts, connection, (host, *self.match))
        if self.mode == "dane":
            from relay.delivery.dane import check_chain

            chain = connection.get_peer_cert_chain(as_cryptography=True) if connection else None
            now = datetime.datetime.now(datetime.timezone.utc)
            return check_chain(self.tlsa, chain or [], host, now)
        return None
