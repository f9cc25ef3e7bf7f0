"""
The relay's configuration as one frozen value, L{Settings}: built from the
C{twistd relay} options (L{Settings.from_options}), from the keyword
arguments of L{relay.service.makeService} (its fields, named like the
options), and from the JSON the master sends each receiver process
(L{Settings.from_json}).  Everything that builds the relay reads it
(L{relay.app.build}); nothing is passed along field by field.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from relay.app.endpoint import needs_tls
from relay.spool.layout import control_in_spool

DEFAULT_SMTP = ("tcp:8025:interface=127.0.0.1",)
RELAY_TLS_MODES = ("none", "may", "encrypt", "verify")


class SettingsError(ValueError):
    """
    The settings cannot work together; the message says which and why.
    """


def callbacks_name(callbacks: Any) -> str:
    """
    The dotted name a receiver imports the plugin by.

    @raise SettingsError: if C{callbacks} is an object that no dotted name
        finds (an instance, a class defined in a function).
    """
    from twisted.python import reflect

    if isinstance(callbacks, str):
        return callbacks
    name = f"{getattr(callbacks, '__module__', '')}.{getattr(callbacks, '__qualname__', '')}"
    try:
        found = reflect.namedAny(name) if "<" not in name else None
    except Exception:
        found = None
    if found is not callbacks:
        raise SettingsError(
            f"with receivers the callbacks must be given by dotted name (a class or a "
            f"provider a receiver process can import), not {callbacks!r}"
        )
    return name


def tls_needed(tls_cert: str | None, endpoints: Iterable[str | None]) -> bool:
    """
    Does a relay with this certificate and these endpoints need pyOpenSSL
    from the start?  Only to serve TLS: outgoing STARTTLS loads it when a
    next hop first offers it (L{relay.app._compat.start_tls}).
    """
    return tls_cert is not None or any(needs_tls(e) for e in endpoints if e)


@dataclass(frozen=True)
class Settings:
    """
    Everything C{twistd relay}'s options say, checked and with the defaults
    filled in.  The fields are the options, with C{_} for C{-}; the
    opposite flags are said positively (C{--no-bounce} is C{bounce=False},
    C{--allow-auth-without-tls} is C{auth_requires_tls=False}).

    @ivar smtp: the SMTP listeners' endpoint descriptions.
    @ivar control: the AMP control endpoint (by default the spool's
        C{control.sock}); C{""} for none.
    @ivar callbacks: the policy: a dotted name, or (for L{makeService}
        alone) a class or an object providing (some of)
        L{relay.interfaces.IServerCallbacks}.  With receivers it must be
        one a dotted name finds.
    @ivar smarthost: C{host:port} every message goes to, or C{None} for the
        recipients' MX.
    @ivar retry_intervals: the default retry schedule in seconds (empty:
        the relay's own).
    @ivar hostname: the name in the greeting (empty or C{None}: this
        host's FQDN).
    @ivar tls_cert: the PEM certificate file (the certificate, then its
        intermediates) for STARTTLS and C{implicit-tls:} listeners, with
        the private key file C{tls_key}.
    @ivar relay_tls: TLS when relaying: one of L{RELAY_TLS_MODES}.
    @ivar auth: C{twisted.cred.strcred} descriptions of the AUTH checker
        (C{"memory:alice:secret"}); the first one is used.
    @ivar metrics: the endpoint serving Prometheus metrics, or C{None}.
    @ivar receivers: with 0 this process serves SMTP; with N it runs N
        receiver processes on the C{smtp} sockets (L{relay.app.pool}).
    @ivar receiver_grace: seconds a stopping receiver lets its open
        sessions finish.
    @ivar resolver: C{ip:port} of the DNS resolvers to ask instead of the
        system's (C{--resolver}); empty: the system's.
    @ivar dnssec: those resolvers validate DNSSEC: their AD bit is trusted
        (DANE applies).
    @ivar tls_ca_file: a PEM file of more CAs for verifying next hops and
        MTA-STS policy hosts.
    @ivar tls_policy: the TLS policy file (L{relay.delivery.tlspolicy}).
    @ivar mx_port: the port of MX hosts.
    """

    smtp: tuple[str, ...] = DEFAULT_SMTP
    spool: str = "spool"
    quarantine: str = "quarantine"
    control: str | None = None
    callbacks: Any = "relay.simple.Simple"
    smarthost: str | None = None
    retry_intervals: tuple[float, ...] = ()
    max_message_size: int = 35_000_000
    max_recipients: int = 1000
    max_sessions: int = 1000
    max_send_jobs: int = 10
    hostname: str = ""
    tls_cert: str | None = None
    tls_key: str | None = None
    relay_tls: str = "may"
    auth: tuple[str, ...] = ()
    idle_timeout: float = 300.0
    reject_bare_lf: bool = False
    auth_requires_tls: bool = True
    bounce: bool = True
    bounced_lifetime: float = 7 * 86400.0
    removed_lifetime: float = 7 * 86400.0
    metrics: str | None = None
    receivers: int = 0
    receiver_grace: float = 30.0
    resolver: tuple[str, ...] = ()
    dnssec: bool = False
    tls_ca_file: str | None = None
    tls_policy: str | None = None
    mx_port: int = 25

    def __post_init__(self) -> None:
        # Sequences become tuples (the value stays frozen all the way
        # down), the defaults that depend on others are filled in.
        smtp = (self.smtp,) if isinstance(self.smtp, str) else tuple(self.smtp)
        self._set("smtp", smtp)
        self._set("retry_intervals", tuple(self.retry_intervals))
        self._set("auth", tuple(self.auth))
        resolver = (self.resolver,) if isinstance(self.resolver, str) else tuple(self.resolver)
        self._set("resolver", resolver)
        self._set("receivers", int(self.receivers))
        if self.control is None:
            self._set("control", control_in_spool(self.spool))
        if not self.hostname:
            self._set("hostname", socket.getfqdn())
        self._check()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check(self) -> None:
        """
        @raise SettingsError: for settings that cannot work together.
        """
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("tls_cert and tls_key must be given together")
        if self.relay_tls not in RELAY_TLS_MODES:
            raise SettingsError(
                f"relay_tls must be one of {', '.join(RELAY_TLS_MODES)}, not {self.relay_tls!r}"
            )
        if self.receivers < 0:
            raise SettingsError("receivers must be 0 or more")
        if self.dnssec and not self.resolver:
            raise SettingsError(
                "dnssec needs resolver: only a resolver you name is trusted to validate"
            )
        for server in self.resolver:
            from relay.delivery.nexthop import parse_server

            try:
                parse_server(server)
            except ValueError as e:
                raise SettingsError(f"resolver: {e}") from None
        if not 0 < int(self.mx_port) < 65536:
            raise SettingsError(f"mx_port must be a port number, not {self.mx_port!r}")
        if self.receivers:
            # (Whether receivers can share the smtp endpoints is for the
            # receiver pool to say: reading endpoints imports Twisted's,
            # which must wait for the TLS decision, see relay.app.build.)
            callbacks_name(self.callbacks)

    # -- what follows from them ---------------------------------------------

    @property
    def needs_tls(self) -> bool:
        """
        Does this relay need pyOpenSSL from the start (L{tls_needed})?
        """
        return tls_needed(self.tls_cert, (*self.smtp, self.control, self.metrics))

    @property
    def next_hop_choices(self) -> tuple[str, ...]:
        """
        The default route: the smarthost, or none (the MX of each domain).
        """
        return (self.smarthost,) if self.smarthost else ()

    def for_receivers(self) -> Settings:
        """
        The settings each receiver process gets: the plugin by name, the
        paths absolute, and C{max_sessions} shared among them (rounded up).
        """

        def absolute(path: str | None) -> str | None:
            return os.path.abspath(path) if path is not None else None

        return dataclasses.replace(
            self,
            callbacks=callbacks_name(self.callbacks),
            spool=os.path.abspath(self.spool),
            quarantine=os.path.abspath(self.quarantine),
            tls_cert=absolute(self.tls_cert),
            tls_key=absolute(self.tls_key),
            max_sessions=-(-self.max_sessions // max(1, self.receivers)),
        )

    # -- other forms ----------------------------------------------------------

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Settings:
        """
        The settings of parsed C{twistd relay} options
        (L{relay.tap.Options}).
        """
        receivers = int(options["receivers"])
        return cls(
            smtp=tuple(options["smtp"]),
            spool=options["spool"],
            quarantine=options["quarantine"],
            control=options["control"],
            # Receivers import the plugin by its name.
            callbacks=options["callbacks-name"] if receivers else options["callbacks"],
            smarthost=options["smarthost"],
            retry_intervals=options["retry-intervals"],
            max_message_size=options["max-message-size"],
            max_recipients=options["max-recipients"],
            max_sessions=options["max-sessions"],
            max_send_jobs=options["max-send-jobs"],
            hostname=options["hostname"],
            tls_cert=options["tls-cert"],
            tls_key=options["tls-key"],
            relay_tls=options["relay-tls"],
            auth=tuple(options["auth-descriptions"]),
            idle_timeout=options["idle-timeout"],
            reject_bare_lf=bool(options["reject-bare-lf"]),
            auth_requires_tls=not options["allow-auth-without-tls"],
            bounce=not options["no-bounce"],
            bounced_lifetime=options["bounced-lifetime"],
            removed_lifetime=options["removed-lifetime"],
            metrics=options["metrics"],
            receivers=receivers,
            resolver=tuple(options["resolver"]),
            dnssec=bool(options["dnssec"]),
            tls_ca_file=options["tls-ca-file"],
            tls_policy=options["tls-policy"],
            mx_port=options["mx-port"],
        )

    def to_json(self) -> dict[str, Any]:
        """
        The settings as JSON-able values, for a receiver process.

        @raise SettingsError: if the callbacks have no dotted name.
        """
        data = dataclasses.asdict(self)
        data["callbacks"] = callbacks_name(self.callbacks)
        for name in ("smtp", "retry_intervals", "auth", "resolver"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Settings:
        """
        The settings L{to_json} made.  Unknown names are an error: master
        and receivers run the same code.
        """
        return cls(**data)

