"""
The C{twistd relay} command line: L{Options} and L{makeService}.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from typing import Any

from twisted.cred import strcred
from twisted.cred.credentials import IUsernamePassword
from twisted.python import usage

from relay.app._compat import check_server_endpoint
from relay.app.auth import bytes_users
from relay.app.settings import DEFAULT_SMTP as _DEFAULT_SMTP
from relay.app.settings import RELAY_TLS_MODES, Settings, SettingsError, tls_needed
from relay.model.retry import parse_duration, parse_interval, parse_retry_intervals
from relay.simple import CallbacksError, load_callbacks
from relay.spool.layout import control_in_spool

DEFAULT_SMTP = _DEFAULT_SMTP[0]
__all__ = ["Options", "makeService", "parse_interval", "parse_retry_intervals", "parse_smarthost"]

# A DNS host name (RFC 1123 labels; "_" is tolerated, as resolvers do).
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def _check_host(host: str, bracketed: bool) -> None:
    """
    @raise ValueError: unless C{host} is a host name or an IPv4 address,
        or (C{bracketed}) an IPv6 or IPv4 address.
    """
    if bracketed:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"not an IP address in brackets: [{host}]") from None
        return
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(
            f"not a host name, IPv4 address or bracketed IPv6 address: {host!r}"
        )


def parse_smarthost(text: str) -> str:
    """
    Normalise C{HOST[:PORT]} (IPv6 as C{[::1]:25}) to C{host:port}, the
    port defaulting to 25: the form the relay client's L{parse_hop} reads.

    @raise ValueError: if C{text} is not a host name, an IPv4 address or a
        bracketed IPv6 address, with an optional port.
    """
    from relay.delivery.nexthop import parse_hop

    text = text.strip()
    if not text:
        raise ValueError("empty host")
    if not text.startswith("[") and text.count(":") > 1:
        text = f"[{text}]"  # a bare IPv6 address: no port
    if text.startswith("[") and text.endswith("]"):
        text += ":25"
    host, port = parse_hop(text)
    _check_host(host, bracketed=text.startswith("["))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _positive(kind: type, name: str):  # type: ignore[no-untyped-def]
    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise usage.UsageError(
                f"--{name} must be a positive {'integer' if kind is int else 'number'}, "
                f"not {value!r}"
            ) from None
        if not number > 0 or number != number or number == float("inf"):
            raise usage.UsageError(
                f"--{name} must be a positive {'integer' if kind is int else 'number'}, "
                f"not {value!r}"
            )
        return number

    return coerce


def _duration(name: str):  # type: ignore[no-untyped-def]
    def coerce(value: Any) -> float:
        if isinstance(value, float):
            return value  # the default
        try:
            return parse_duration(value)
        except ValueError as e:
            raise usage.UsageError(f"--{name}: {e}") from None

    return coerce


def _port(name: str):  # type: ignore[no-untyped-def]
    def coerce(value: Any) -> int:
        if isinstance(value, int):
            return value  # the default
        if not str(value).isdigit() or not 0 < int(value) < 65536:
            raise usage.UsageError(f"--{name} must be a port number, not {value!r}")
        return int(value)

    return coerce


def _non_negative_int(name: str):  # type: ignore[no-untyped-def]
    def coerce(value: str) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = -1
        if number < 0:
            raise usage.UsageError(f"--{name} must be 0 or a positive integer, not {value!r}")
        return number

    return coerce


def auto_receivers(cores: int | None = None) -> int:
    """
    What C{--receivers auto} means: a receiving process per core, or none
    (this process receives) on a machine with one core, where another
    process has no core of its own to run on.
    """
    cores = os.cpu_count() if cores is None else cores
    return cores if cores and cores > 1 else 0


def _receivers(value: str) -> int:
    if value.strip().lower() == "auto":
        return auto_receivers()
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0:
        raise usage.UsageError(f"--receivers must be auto, 0 or a positive integer, not {value!r}")
    return number


def _shareable(endpoints: list[str]) -> bool:
    """
    Can receiver processes accept on every one of C{endpoints}?
    """
    from relay.app.listener import parse_listener

    try:
        for endpoint in endpoints:
            parse_listener(endpoint)
    except ValueError:
        return False
    return True


class Options(usage.Options, strcred.AuthOptionMixin):
    """
    The options of C{twistd relay}.
    """

    synopsis = "[options]"
    longdesc = (
        "A durable SMTP mail relay.  With no options it listens on "
        f"{DEFAULT_SMTP}, spools to ./spool, quarantines to ./quarantine and "
        "decides with relay.simple.Simple."
    )

    supportedInterfaces = (IUsernamePassword,)

    optFlags = [
        ["reject-bare-lf", None, "Reject messages with bare LF line endings."],
        ["allow-auth-without-tls", None, "Offer AUTH also on unencrypted sessions."],
        ["no-bounce", None,
         "Do not send bounce messages for failed deliveries (nor delay warnings or relayed notices)."],
        ["dnssec", None,
         "The --resolver servers validate DNSSEC: trust their AD bit (enables DANE)."],
    ]

    optParameters = [
        ["spool", None, "spool", "The spool directory."],
        ["quarantine", None, "quarantine", "The quarantine directory."],
        ["control", None, None,
         "The AMP control endpoint (default: unix:<spool>/control.sock; '' for none)."],
        ["metrics", None, None,
         "Serve Prometheus metrics at /metrics on this endpoint, e.g. tcp:9025:interface=127.0.0.1."],
        ["callbacks", None, "relay.simple.Simple",
         "Dotted name of a class or provider of IServerCallbacks."],
        ["smarthost", None, None, "Relay all mail through HOST[:PORT] (port 25 by default)."],
        ["retry-intervals", None, None, "Retry schedule, e.g. 1m,5m,1h,1d (plain numbers are seconds)."],
        ["max-message-size", None, 35_000_000, "Largest message accepted, in bytes.",
         _positive(int, "max-message-size")],
        ["max-recipients", None, 1000, "Most recipients per message.",
         _positive(int, "max-recipients")],
        ["max-sessions", None, 1000, "Most simultaneous SMTP sessions.",
         _positive(int, "max-sessions")],
        ["max-send-jobs", None, 10, "Most simultaneous outgoing deliveries.",
         _positive(int, "max-send-jobs")],
        ["bounced-lifetime", None, 7 * 86400.0,
         "Keep settled entries (every recipient delivered or bounced) frozen this long, "
         "e.g. 7d (0: delete at once).", _duration("bounced-lifetime")],
        ["delay-warning", None, 0.0,
         "Warn the sender, once, of mail still queued after this long, e.g. 4h "
         "(as Postfix's delay_warning_time; default 0: no warnings).",
         _duration("delay-warning")],
        ["removed-lifetime", None, 7 * 86400.0,
         "Keep removed entries this long, e.g. 7d (0: delete at the next expiry run).",
         _duration("removed-lifetime")],
        ["hostname", None, None, "The host name in the greeting (default: this host's FQDN)."],
        ["tls-cert", None, None,
         "PEM certificate file, the certificate followed by its intermediates (with --tls-key, "
         "enables STARTTLS and implicit-tls: listeners; SIGHUP reloads both files)."],
        ["tls-key", None, None, "PEM private key file (with --tls-cert)."],
        ["relay-tls", None, "may", "TLS when relaying: none, may, encrypt or verify."],
        ["tls-ca-file", None, None,
         "PEM file of more CAs to trust when verifying next hops and MTA-STS policy hosts."],
        ["tls-policy", None, None,
         "TLS policy per destination: lines of DOMAIN, .DOMAIN or [HOST]:PORT and one of none, "
         "may, encrypt, verify [match=NAMES], dane, dane-only, mta-sts."],
        ["shaping", None, None,
         "Traffic shaping file (TOML): limits per destination and provider, reply rules, "
         "source addresses; SIGHUP reloads it."],
        ["bind-address", None, None,
         "Make delivery connections from this local IP address (Postfix's smtp_bind_address)."],
        ["failure-classes", None, None,
         "Failure class rules tried before the built-in table: lines of CLASS status CODE, "
         "CLASS text REGEX or CLASS fallback CODE."],
        ["mx-port", None, 25, "The port of MX hosts (Postfix's smtp_tcp_port).",
         _port("mx-port")],
        ["idle-timeout", None, 300.0, "Seconds of client silence before the session is closed.",
         _positive(float, "idle-timeout")],
        ["dkim-keys", None, None,
         "DKIM-sign mail with the keys listed in FILE, one per line: DOMAIN SELECTOR KEYFILE "
         "[rsa|ed25519] (SIGHUP reloads it; relayctl dkim-record prints the DNS record)."],
        ["receivers", None, None,
         "Receive SMTP in this many separate processes (0: in this one; auto: one per core, "
         "none on one core). The main process then keeps the spool, delivery and control; "
         "--smtp must be tcp:, tcp6:, implicit-tls: or haproxy:. Default: auto when every "
         "--smtp listener can be shared so, else 0.",
         _receivers],
    ]

    compData = usage.Completions(
        optActions={
            "spool": usage.CompleteDirs(),
            "quarantine": usage.CompleteDirs(),
            "tls-cert": usage.CompleteFiles("*.pem"),
            "tls-key": usage.CompleteFiles("*.pem"),
            "dkim-keys": usage.CompleteFiles(),
            "relay-tls": usage.CompleteList(RELAY_TLS_MODES),
            "tls-ca-file": usage.CompleteFiles("*.pem"),
            "tls-policy": usage.CompleteFiles(),
            "failure-classes": usage.CompleteFiles(),
        }
    )

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["smtp"] = []
        self["auth-descriptions"] = []
        self["resolver"] = []

    def parseOptions(self, options: Any = None) -> None:
        """
        Parse the options.  Under C{twistd} (which sets C{parent}) a
        mistake ends the process with one line naming it, instead of
        twistd's whole usage text followed by the error.
        """
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            hint = " (twistd relay --help lists them)" if "not recognized" in str(e) else ""
            raise SystemExit(f"twistd relay: {e}{hint}") from None

    def opt_smtp(self, endpoint: str) -> None:
        """
        Listen for SMTP on this Twisted endpoint (repeatable; default
        tcp:8025:interface=127.0.0.1).  ssl: and implicit-tls:PORT (as
        tcp:, with the --tls-cert certificate) are implicit TLS.
        """
        if not endpoint.strip():
            raise usage.UsageError("--smtp needs an endpoint description")
        # Checked in postOptions: reading it imports Twisted's endpoints,
        # which must wait until we know whether TLS is needed.
        self["smtp"].append(endpoint)

    def opt_resolver(self, server: str) -> None:
        """
        Ask this DNS resolver, HOST[:PORT] (an IP address; [v6]:PORT),
        instead of the system's (repeatable: tried in order).
        """
        from relay.delivery.nexthop import parse_server

        try:
            host, port = parse_server(server)
        except ValueError as e:
            raise usage.UsageError(f"--resolver: {e}") from None
        self["resolver"].append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    def _check_outbound_tls(self) -> None:
        """
        The options of TLS towards next hops: files that exist and parse.
        """
        if self["dnssec"] and not self["resolver"]:
            raise usage.UsageError(
                "--dnssec needs --resolver: only a resolver you name is trusted to validate"
            )
        ca_file = self["tls-ca-file"]
        if ca_file is not None:
            if not os.path.isfile(ca_file):
                raise usage.UsageError(f"--tls-ca-file: no such file: {ca_file!r}")
            from relay.app.build import check_ca_file

            try:
                check_ca_file(ca_file)
            except ValueError as e:
                raise usage.UsageError(f"--tls-ca-file: {e}") from None
        if self["tls-policy"] is not None:
            from relay.delivery.tlspolicy import PolicyFile, PolicyFileError

            try:
                PolicyFile.load(self["tls-policy"])
            except PolicyFileError as e:
                raise usage.UsageError(f"--tls-policy: {e}") from None
        self._check_shaping()

    def _check_shaping(self) -> None:
        """
        The shaping file parses; the bind address is an IP address.
        """
        if self["bind-address"] is not None:
            import ipaddress

            try:
                self["bind-address"] = str(ipaddress.ip_address(self["bind-address"]))
            except ValueError:
                raise usage.UsageError(
                    f"--bind-address: not an IP address: {self['bind-address']!r}"
                ) from None
        if self["shaping"] is not None:
            from relay.shaping.config import ShapingFileError, load

            try:
                load(self["shaping"])
            except ShapingFileError as e:
                raise usage.UsageError(f"--shaping: {e}") from None
        if self["failure-classes"] is not None:
            from relay.delivery.failures import FailureRulesError, load_rules

            try:
                load_rules(self["failure-classes"])
            except FailureRulesError as e:
                raise usage.UsageError(f"--failure-classes: {e}") from None

    def postOptions(self) -> None:
        if not self["smtp"]:
            self["smtp"] = [DEFAULT_SMTP]
        if self["control"] is None:
            self["control"] = control_in_spool(self["spool"])

        # First, before anything imports the reactor: without TLS to
        # serve, Twisted's TCP transport comes without pyOpenSSL.
        from relay.app.build import import_twisted

        endpoints = (*self["smtp"], self["control"], self["metrics"])
        import_twisted(tls_needed(self["tls-cert"], endpoints), bool(self["control"]))

        from relay.smtp.tls import plain_description

        for endpoint in self["smtp"]:
            try:
                check_server_endpoint(plain_description(endpoint) or endpoint)
            except Exception as e:
                raise usage.UsageError(f"--smtp: bad endpoint {endpoint!r}: {e}") from None

        name = self["callbacks"]
        # As twistd -y users expect, a plugin module in the current
        # directory is found (after the installed packages, so that a stray
        # file there cannot shadow the standard library).
        here = os.getcwd()
        if here not in sys.path:
            sys.path.append(here)
        try:
            self["callbacks"] = load_callbacks(name)
        except CallbacksError as e:
            raise usage.UsageError(f"--callbacks {name}: {e}") from None
        self["callbacks-name"] = name

        if self["metrics"] is not None:
            try:
                check_server_endpoint(self["metrics"])
            except Exception as e:
                raise usage.UsageError(
                    f"--metrics: bad endpoint {self['metrics']!r}: {e}"
                ) from None

        if self["smarthost"] is not None:
            try:
                self["smarthost"] = parse_smarthost(self["smarthost"])
            except ValueError as e:
                raise usage.UsageError(f"--smarthost: {e}") from None

        if self["retry-intervals"] is not None:
            try:
                self["retry-intervals"] = parse_retry_intervals(self["retry-intervals"])
            except ValueError as e:
                raise usage.UsageError(f"--retry-intervals: {e}") from None
        else:
            self["retry-intervals"] = ()

        if self["relay-tls"] not in RELAY_TLS_MODES:
            raise usage.UsageError(
                f"--relay-tls must be one of {', '.join(RELAY_TLS_MODES)}, "
                f"not {self['relay-tls']!r}"
            )

        if self["hostname"] is None:
            self["hostname"] = socket.getfqdn()
        elif not self["hostname"].strip():
            raise usage.UsageError("--hostname must not be empty")

        cert, key = self["tls-cert"], self["tls-key"]
        if (cert is None) != (key is None):
            raise usage.UsageError("--tls-cert and --tls-key must be given together")
        for option, path in (("tls-cert", cert), ("tls-key", key)):
            if path is not None and not os.path.isfile(path):
                raise usage.UsageError(f"--{option}: no such file: {path!r}")
        if cert is None:
            from relay.smtp.tls import implicit_tls_needs_certificate, plain_description

            for endpoint in self["smtp"]:
                if plain_description(endpoint) is not None:
                    raise usage.UsageError(implicit_tls_needs_certificate(endpoint))
        else:
            from relay.app.build import load_tls_context

            try:
                self["tls-context"] = load_tls_context(cert, key)
            except Exception as e:
                raise usage.UsageError(f"--tls-cert/--tls-key: cannot load: {e}") from None

        if self["dkim-keys"] is not None:
            from relay.dkim.keys import DkimKeysError, load_keys

            try:
                load_keys(self["dkim-keys"])
            except DkimKeysError as e:
                raise usage.UsageError(f"--dkim-keys {e}") from None

        if self["receivers"] is None:
            # Not given: a receiving process per core, measured faster than
            # one process on 2 cores (bench/RESULTS.md, "Receivers"); a
            # listener receivers cannot share (unix:, ssl:) keeps the one
            # process, as before, rather than refusing a default.
            self["receivers"] = auto_receivers() if _shareable(self["smtp"]) else 0
        if self["receivers"]:
            from relay.app.listener import parse_listener

            for endpoint in self["smtp"]:
                try:
                    parse_listener(endpoint)
                except ValueError as e:
                    raise usage.UsageError(f"--smtp with --receivers: {e}") from None

        self._check_outbound_tls()

        checkers = self.get("credCheckers") or []
        self["checker"] = bytes_users(checkers[0]) if checkers else None

    def opt_auth(self, description: str) -> None:
        try:
            strcred.AuthOptionMixin.opt_auth(self, description)
        except usage.UsageError as e:
            raise usage.UsageError(f"--auth {description!r}: {e}") from None
        # Receiver processes make their own checker from the description.
        self["auth-descriptions"].append(description)

    opt_auth.__doc__ = strcred.AuthOptionMixin.opt_auth.__doc__


def makeService(options: Options):  # type: ignore[no-untyped-def]
    """
    Make the relay's service from parsed L{Options}.  Whatever stops it
    from starting (the spool directory, its lock, the plugin failing to
    start) ends the process here, before twistd starts logging or goes to
    the background, with one line naming the problem.
    """
    from relay.app.build import build_relay, default_reactor
    from relay.app.directories import StartupError, prepare_directories
    from relay.dkim import DkimKeysError
    from relay.spool.lock import SpoolLocked, check_unlocked

    try:
        prepare_directories(options["spool"], options["quarantine"])
        check_unlocked(options["spool"])
        settings = Settings.from_options(options)
        return build_relay(
            settings, default_reactor(settings), checker=options["checker"],
            # Loaded once, when the options were checked.
            tls_context=options.get("tls-context"),
        )  # fmt: skip
    except CallbacksError as e:
        raise SystemExit(f"twistd relay: --callbacks {options['callbacks-name']}: {e}") from None
    except DkimKeysError as e:
        # The file changed since the options were checked.
        raise SystemExit(f"twistd relay: --dkim-keys {e}") from None
    except (StartupError, SpoolLocked, SettingsError) as e:
        raise SystemExit(f"twistd relay: {e}") from None
