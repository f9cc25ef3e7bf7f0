"""
The relay as a Twisted service: L{makeService} builds it from keyword
settings, for C{.tac} files (and C{twistd relay}, see L{relay.tap})::

    from twisted.application import service
    from relay.service import makeService

    application = service.Application("relay")
    makeService(smtp=["tcp:2525:interface=127.0.0.1"],
                spool="/var/spool/relay").setServiceParent(application)
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred

from relay.app.build import build_relay, default_reactor
from relay.app.services import Relay
from relay.app.settings import Settings

__all__ = ["Relay", "Settings", "makeService"]


def makeService(
    *,
    reactor: Any = None,
    checker: Any = None,
    tls_context_factory: Any = None,
    run_in_thread: Callable[..., Deferred[Any]] | None = None,
    **settings: Any,
) -> Relay:
    """
    Build the relay: a L{Relay} service with a thread pool, the spool and
    its delivery, control, and one SMTP listener per endpoint description
    in C{smtp} (or, with C{receivers=N}, N receiving processes on them).

    @param settings: the settings, named like the C{twistd relay} options
        with C{_} for C{-}: C{smtp}, C{spool}, C{quarantine}, C{control},
        C{callbacks}, C{smarthost}, C{retry_intervals}, C{max_message_size},
        C{max_recipients}, C{max_sessions}, C{max_send_jobs}, C{hostname},
        C{tls_cert}, C{tls_key}, C{relay_tls}, C{auth}, C{idle_timeout},
        C{reject_bare_lf}, C{auth_requires_tls}, C{bounce}, C{metrics},
        C{receivers}, C{receiver_grace}: see L{Settings}, which they make.
    @param reactor: the reactor; the global one when C{None}.
    @param checker: the AUTH L{ICredentialsChecker}, instead of one made
        from C{auth} (without receivers).
    @param tls_context_factory: the server TLS context, instead of one
        loaded from C{tls_cert}/C{tls_key} (without receivers).
    @param run_in_thread: where blocking spool work runs (a thread pool of
        the relay's own by default).

    @raise ValueError: for settings that cannot work (a
        L{relay.app.settings.SettingsError}).
    @raise relay.simple.CallbacksError: when the plugin cannot be made.
    """
    config = Settings(**settings)
    if reactor is None:
        reactor = default_reactor(config)
    return build_relay(
        config, reactor, checker=checker, tls_context=tls_context_factory,
        run_in_thread=run_in_thread,
    )  # fmt: skip
