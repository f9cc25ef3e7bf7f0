"""
The relay client's TLS decision for a hop: whether to STARTTLS, whether a
hop without it may have the message in plain text, and what certificate
it must show.

A L{TLSPolicy} is the one object the session asks
(L{relay.delivery.client_session}); it holds the decision, the session
only carries it out.  Today one policy (C{--relay-tls}) serves every hop;
a policy per destination (MTA-STS, DANE) is a different L{TLSPolicy} for
each, chosen by L{relay.delivery.client.RelayClient} before the session
starts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

#: The C{--relay-tls} modes, weakest first.
TLS_MODES = ("none", "may", "encrypt", "verify")


@dataclass(frozen=True)
class TLSPolicy:
    """
    What TLS the client asks of a hop.

    @ivar mode: C{"none"} (never STARTTLS), C{"may"} (when offered),
        C{"encrypt"} (required, certificate not checked) or C{"verify"}
        (required, certificate and host name verified).
    @ivar trust_root: the C{trustRoot} for C{"verify"} (C{None}: the
        platform's trust store).
    """

    mode: str = "may"
    trust_root: Any = None

    def __post_init__(self) -> None:
        if self.mode not in TLS_MODES:
            raise ValueError(f"tls must be none, may, encrypt or verify, not {self.mode!r}")

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
        return self.mode in ("encrypt", "verify")

    def connection_creator(self, host: str) -> Any:
        """
        The C{IOpenSSLClientConnectionCreator} for STARTTLS to C{host}.
        """
        # pyOpenSSL on first use: a relay whose next hops never offer
        # STARTTLS does without it (see relay.app._compat.keep_openssl_out).
        from twisted.internet import ssl

        if self.mode == "verify":
            return ssl.optionsForClientTLS(host, trustRoot=self.trust_root)
        return ssl.CertificateOptions(verify=False)

    def refusal(self, host: str, transport: Any) -> str | None:
        """
        Why the certificate C{transport}'s peer showed after the handshake
        is not good enough for C{host}, or C{None} if it is.

        In C{"verify"} mode this checks the name once more: Twisted logs
        but does not fail on a certificate without subjectAltName
        (service_identity's C{CertificateError}), which would let any
        certificate from the trust root pass.
        """
        if self.mode != "verify":
            return None
        from service_identity import CertificateError, VerificationError
        from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
        from service_identity.pyopenssl import extract_patterns

        try:
            ipaddress.ip_address(host)
            svcid: Any = IPAddress_ID(host)
        except ValueError:
            svcid = DNS_ID(host)
        get_cert = getattr(transport, "getPeerCertificate", None)
        cert = get_cert() if get_cert is not None else None
        try:
            if cert is None:
                raise CertificateError("no peer certificate")
            verify_service_identity(extract_patterns(cert), [svcid], [])
        except (CertificateError, VerificationError) as e:
            return str(e)
        return None
