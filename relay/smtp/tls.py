"""
Server TLS: the certificate chain and key of C{--tls-cert}/C{--tls-key}
(L{load_chain}), served to new sessions by L{ServerTLSContext} (for
STARTTLS and implicit TLS alike) which SIGHUP reloads, and implicit-TLS
listeners, C{implicit-tls:PORT} (L{server_endpoint}, L{tls_factory}).

The certificate file holds the server's certificate followed by its
intermediates, as Let's Encrypt's C{fullchain.pem} does: all of them are
sent, so that a client trusting only the root can verify the server.

pyOpenSSL is imported only when TLS is used: a receiver process without
C{--tls-cert} imports this module (for L{plain_description}) but must not
load OpenSSL (see L{relay.app._compat.keep_openssl_out}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
    IStreamServerEndpoint,
)
from zope.interface import implementer

from relay.app.reload import ReloadError
from relay.interfaces import IReloadable

IMPLICIT_TLS = "implicit-tls:"
_HAPROXY = "haproxy:"
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


class TLSFilesError(ReloadError):
    """
    The certificate or key file cannot be used; the message names the file
    and says why.
    """


@dataclass(frozen=True)
class CertificateChain:
    """
    One reading of the certificate and key files.

    @ivar options: the L{twisted.internet.ssl.CertificateOptions} serving
        the chain, its context already made (so checked).
    @ivar count: how many certificates the chain has (the server's first).
    @ivar subject: the server certificate's subject (RFC 4514).
    @ivar not_after: when the server certificate expires (text, UTC).
    """

    cert_path: str
    key_path: str
    options: Any
    count: int
    subject: str
    not_after: str

    def describe(self) -> str:
        """
        What the log says about it.
        """
        certificates = "1 certificate" if self.count == 1 else f"{self.count} certificates"
        return (
            f"{self.cert_path} ({certificates}, {self.subject}, valid until "
            f"{self.not_after}) and {self.key_path}"
        )


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSFilesError(f"{path}: {e.strerror or e}") from None


def load_chain(cert_path: str, key_path: str) -> CertificateChain:
    """
    Read and check the PEM certificate chain in C{cert_path} (the server's
    certificate first, then its intermediates) and the PEM private key in
    C{key_path}.  This blocks on the disk: call it at start-up or in a
    thread.

    @raise TLSFilesError: naming the file at fault and the reason.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from OpenSSL import SSL, crypto
    from twisted.internet import ssl

    cert_pem = _read(cert_path)
    key_pem = _read(key_path)
    if _PEM_CERTIFICATE not in cert_pem:
        raise TLSFilesError(f"{cert_path}: no PEM certificate in the file")
    try:
        certificates = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise TLSFilesError(f"{cert_path}: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise TLSFilesError(f"{key_path}: no usable PEM private key: {e}") from None
    leaf = certificates[0]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TLSFilesError(
            f"{key_path}: the private key does not match the first certificate of {cert_path}"
        )
    try:
        private_key = crypto.PKey.from_cryptography_key(key)  # type: ignore[arg-type]
    except TypeError:
        raise TLSFilesError(f"{key_path}: a {type(key).__name__} cannot sign for TLS") from None
    options = ssl.CertificateOptions(
        privateKey=private_key,
        certificate=crypto.X509.from_cryptography(leaf),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in certificates[1:]],
    )
    try:
        options.getContext()
    except SSL.Error as e:
        raise TLSFilesError(f"{cert_path}: OpenSSL refuses it: {e}") from None
    not_after = getattr(leaf, "not_valid_after_utc", None) or leaf.not_valid_after
    return CertificateChain(
        cert_path=cert_path,
        key_path=key_path,
        options=options,
        count=len(certificates),
        subject=leaf.subject.rfc4514_string(),
        not_after=not_after.strftime("%Y-%m-%d %H:%M:%S UTC"),
    )


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory, IReloadable)
class ServerTLSContext:
    """
    The server's TLS context: each new TLS connection (a STARTTLS or an
    implicit-TLS session) takes the chain loaded last.  L{reload} reads the
    files again; connections already made keep the chain they started
    with, and a failed reload keeps the one in use.
    """

    what = "TLS certificate"

    def __init__(self, chain: CertificateChain) -> None:
        self.chain = chain

    @classmethod
    def load(cls, cert_path: str, key_path: str) -> ServerTLSContext:
        """
        Load the files now (at start-up: this blocks on the disk).

        @raise TLSFilesError: if they cannot be used.
        """
        return cls(load_chain(cert_path, key_path))

    def getContext(self) -> Any:
        """
        The current L{OpenSSL.SSL.Context} (L{IOpenSSLContextFactory}).
        """
        return self.chain.options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        """
        A connection over the current context, as Twisted makes one for a
        context factory.
        """
        from OpenSSL.SSL import Connection

        return Connection(self.getContext(), None)

    def reload(self, run_in_thread: Callable[..., Deferred[Any]]) -> Deferred[str]:
        """
        Read the files again in C{run_in_thread} and serve them from now on.
        """
        d = run_in_thread(load_chain, self.chain.cert_path, self.chain.key_path)

        def use(chain: CertificateChain) -> str:
            self.chain = chain
            return f"TLS certificate reloaded from {chain.describe()}"

        return d.addCallback(use)


def plain_description(description: str) -> str | None:
    """
    For an implicit-TLS endpoint description, C{implicit-tls:PORT[:...]}
    (possibly behind C{haproxy:}), the C{tcp:} description of the socket it
    listens on (C{haproxy:} kept); C{None} for any other description.
    """
    head = ""
    rest = description
    if rest[: len(_HAPROXY)].lower() == _HAPROXY:
        head, rest = rest[: len(_HAPROXY)], rest[len(_HAPROXY) :]
    if rest[: len(IMPLICIT_TLS)].lower() != IMPLICIT_TLS:
        return None
    return f"{head}tcp:{rest[len(IMPLICIT_TLS):]}"


def tls_factory(context: Any, factory: Any) -> Any:
    """
    C{factory}'s protocols behind a TLS server layer made with C{context},
    from the connection's first byte (implicit TLS).  The SMTP session sees
    a TLS transport (L{twisted.internet.interfaces.INegotiated}) and starts
    as after STARTTLS.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    # The factory's clock (the SMTP server's) times the TLS layer's write
    # batching, rather than the global reactor.
    clock = getattr(factory, "clock", None)
    wrapped = TLSMemoryBIOFactory(context, False, factory, clock=clock)
    if clock is not None:
        # relay.smtp.proxy's PROXY header wrapper, when in front, takes its
        # clock from the factory it wraps.
        wrapped.clock = clock  # type: ignore[attr-defined]
    return wrapped


@implementer(IStreamServerEndpoint)
class ImplicitTLSEndpoint:
    """
    Listen on C{endpoint} with every connection in TLS from the start.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, context: Any) -> None:
        self.endpoint = endpoint
        self.context = context

    def listen(self, protocolFactory: Any) -> Any:
        return self.endpoint.listen(tls_factory(self.context, protocolFactory))


def server_endpoint(reactor: Any, description: str, context: Any) -> IStreamServerEndpoint:
    """
    The server endpoint for an C{--smtp} description: as
    L{relay.smtp.proxy.server_endpoint} reads it, and C{implicit-tls:PORT} (with
    C{interface=} and C{backlog=} as for C{tcp:}, possibly behind
    C{haproxy:}) in TLS with C{context}, the C{--tls-cert} one.

    @raise ValueError: for C{implicit-tls:} without a C{context}.
    """
    plain = plain_description(description)
    if plain is None and description[: len(_HAPROXY)].lower() != _HAPROXY:
        # Neither implicit TLS nor PROXY: Twisted's own (the PROXY
        # protocol's modules are imported only for haproxy: listeners).
        from twisted.internet.endpoints import serverFromString

        return serverFromString(reactor, description)
    from relay.smtp.proxy import server_endpoint as plain_endpoint

    if plain is None:
        return plain_endpoint(reactor, description)
    if context is None:
        raise ValueError(implicit_tls_needs_certificate(description))
    # The PROXY header comes before the TLS handshake: the header wrapper
    # goes in front of the TLS layer.
    return ImplicitTLSEndpoint(plain_endpoint(reactor, plain), context)


def implicit_tls_needs_certificate(description: str) -> str:
    """
    The error for an implicit-TLS listener without certificate.
    """
    return f"--smtp {description}: implicit TLS needs --tls-cert and --tls-key"
