"""
Building the relay from its L{Settings}, once.

L{Parts} makes what every relay process makes the same way: the plugin
(made and configured), the AUTH checker, the server TLS context, the
thread pool, the disk spool and the SMTP server factory.  L{build_relay}
puts the relay's own process together from them (delivery, control,
metrics, the listeners or the receiver pool, SIGHUP), for
L{relay.service.makeService} and C{twistd relay}; a receiver process
(L{relay.app.receiver}) uses the same L{Parts}.

Modules are imported as the settings need them: TLS only to serve it
(see L{default_reactor}), twisted.cred only with AUTH, twisted.web and
prometheus_client only with metrics, twisted.names only once a domain's
MX is looked up.
"""

from __future__ import annotations

import functools
from functools import cached_property
from typing import Any, Callable, Sequence

from twisted.application.service import IService
from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from relay.app._compat import keep_openssl_out
from relay.app.endpoint import control_endpoint, listens_publicly
from relay.app.services import Relay, SpoolRecovery, SpoolService, ThreadPoolService
from relay.app.settings import Settings, SettingsError
from relay.simple import CallbacksError, Defaults, Simple, as_callbacks, load_callbacks

log = Logger()

# The spool's threads: enough for a batch of fsyncs and reads at once.
THREADS = 10


def import_twisted(tls: bool, control: bool) -> None:
    """
    Import what of Twisted would take pyOpenSSL whenever it can (the TCP
    transport, the endpoints, AMP for a C{control} endpoint) before
    anything else does: without it when no C{tls} is served
    (L{relay.app._compat.keep_openssl_out}).  For the entry points, before
    the reactor is imported.
    """
    if not tls:
        keep_openssl_out(*(["twisted.protocols.amp"] if control else []))


def default_reactor(settings: Settings) -> Any:
    """
    The global reactor, for the entry points that have none given
    (L{relay.service.makeService}, C{twistd relay}), imported after
    L{import_twisted}.
    """
    import_twisted(settings.needs_tls, bool(settings.control))
    from twisted.internet import reactor

    return reactor


def load_tls_context(cert: str, key: str) -> Any:
    """
    Load a PEM certificate (followed by its intermediates) and private key
    into the reloadable server TLS context, for STARTTLS and implicit TLS
    (see L{relay.smtp.tls.ServerTLSContext}).

    @raise relay.smtp.tls.TLSFilesError: naming the file that cannot be used.
    """
    from relay.smtp.tls import ServerTLSContext

    return ServerTLSContext.load(cert, key)


def resolve_callbacks(callbacks: Any) -> Any:
    """
    The plugin: C{callbacks} loaded by its dotted name if it is one, and
    made a full L{IServerCallbacks} provider.

    @raise CallbacksError: when it cannot be loaded or made.
    """
    if isinstance(callbacks, str):
        callbacks = load_callbacks(callbacks)
    return as_callbacks(callbacks)


def configure(plugin: Any, defaults: Defaults) -> None:
    """
    Give the plugin the relay's settings, when it takes them.

    @raise CallbacksError: when its C{configure} raises.
    """
    configure = getattr(plugin, "configure", None)
    if not callable(configure):
        return
    try:
        configure(defaults)
    except Exception as e:
        raise CallbacksError(f"{plugin!r}.configure raised: {type(e).__name__}: {e}") from e


class Parts:
    """
    The parts every relay process makes the same way from its settings,
    each made once, when first asked for.

    @param checker: the AUTH checker, when the caller has one; else one is
        made from C{settings.auth}.
    @param tls_context: the server TLS context, when the caller has it
        loaded; else it is loaded from C{settings.tls_cert}.
    @param run_in_thread: where blocking spool work runs; by default in
        L{thread_pool}, a pool of the relay's own (named C{pool_name}).
    @ivar thread_pool: that pool (to start and stop), or C{None}.
    """

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        *,
        checker: Any = None,
        tls_context: Any = None,
        run_in_thread: Callable[..., Any] | None = None,
        pool_name: str = "relay-spool",
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self._checker = checker
        self._tls_context = tls_context
        self.thread_pool: ThreadPool | None = None
        if run_in_thread is None:
            self.thread_pool = ThreadPool(minthreads=0, maxthreads=THREADS, name=pool_name)
            run_in_thread = functools.partial(threads.deferToThreadPool, reactor, self.thread_pool)
        self.run_in_thread: Callable[..., Any] = run_in_thread

    @cached_property
    def checker(self) -> Any:
        """
        The AUTH checker, or C{None} without AUTH.
        """
        if self._checker is None and self.settings.auth:
            from relay.app.auth import make_checker

            return make_checker(self.settings.auth[0])
        return self._checker

    @cached_property
    def plugin(self) -> Any:
        """
        The plugin, configured with the relay's settings.

        @raise CallbacksError: when it cannot be loaded, made or configured.
        """
        s = self.settings
        plugin = resolve_callbacks(s.callbacks)
        configure(
            plugin,
            Defaults(
                hostname=s.hostname,
                next_hop_choices=s.next_hop_choices,
                retry_intervals=s.retry_intervals,
                checker=self.checker,
                clock=self.reactor,
            ),
        )
        return plugin

    @cached_property
    def tls_context(self) -> Any:
        """
        The reloadable server TLS context, or C{None} without TLS.

        @raise relay.smtp.tls.TLSFilesError: when the files cannot be used.
        """
        s = self.settings
        if self._tls_context is None and s.tls_cert is not None and s.tls_key is not None:
            return load_tls_context(s.tls_cert, s.tls_key)
        return self._tls_context

    @cached_property
    def dkim_signer(self) -> Any:
        """
        The DKIM signer with the keys of C{settings.dkim_keys} (read now),
        or C{None} without them.

        @raise relay.dkim.DkimKeysError: naming the file and the line that
            cannot be used.
        """
        if self.settings.dkim_keys is None:
            return None
        from relay.dkim.signer import DkimSigner

        return DkimSigner.from_file(self.settings.dkim_keys, self.reactor, self.run_in_thread)

    @property
    def reloadables(self) -> list[Any]:
        """
        What SIGHUP reloads in a process that serves SMTP: the TLS
        certificate and the DKIM keys, those that are configured.
        """
        return [x for x in (self.tls_context, self.dkim_signer) if x is not None]

    def disk_spool(self, remember: bool = True) -> Any:
        """
        The spool in C{settings.spool} (quarantine in C{settings.quarantine}).

        @param remember: whether it keeps what it writes in memory for
            delivering it; a process that only receives does not.
        """
        from relay.spool.disk import DiskSpool

        s = self.settings
        if not remember:
            return DiskSpool(
                s.spool, self.run_in_thread, self.reactor, quarantine_path=s.quarantine,
                remember=False,
            )  # fmt: skip
        return DiskSpool(s.spool, self.run_in_thread, self.reactor, quarantine_path=s.quarantine)

    def server_factory(self, spool: Any, on_rejected: Callable[[], Any] | None = None) -> Any:
        """
        The SMTP server factory over C{spool}, with the plugin and the
        settings: the one place it is made.

        @param on_rejected: called when the plugin rejects a message.
        """
        from relay.smtp.server import SMTPServerFactory

        s = self.settings
        factory = SMTPServerFactory(
            callbacks=self.plugin,
            spool=spool,
            clock=self.reactor,
            hostname=s.hostname,
            max_message_size=s.max_message_size,
            max_recipients=s.max_recipients,
            max_sessions=s.max_sessions,
            idle_timeout=s.idle_timeout,
            tls_context_factory=self.tls_context,
            auth_requires_tls=s.auth_requires_tls,
            reject_bare_lf=s.reject_bare_lf,
            dkim_signer=self.dkim_signer,
        )
        # Not (yet) a parameter of SMTPServerFactory's constructor.
        factory.on_rejected = on_rejected
        return factory


def _check_collaborators(settings: Settings, checker: Any, tls_context: Any) -> None:
    """
    @raise SettingsError: for what the caller gives that the settings
        cannot use.
    """
    if settings.receivers:
        from relay.app.listener import parse_listener

        for endpoint in settings.smtp:
            try:
                parse_listener(endpoint)
            except ValueError as e:
                raise SettingsError(str(e)) from None
        if checker is not None and not settings.auth:
            raise SettingsError(
                "with receivers, give the AUTH checker as strcred descriptions (auth=[...])"
            )
        if tls_context is not None and settings.tls_cert is None:
            raise SettingsError("with receivers, give TLS as tls_cert and tls_key files")
    if settings.tls_cert is None and tls_context is None:
        from relay.smtp.tls import implicit_tls_needs_certificate, plain_description

        for endpoint in settings.smtp:
            if plain_description(endpoint) is not None:
                raise SettingsError(implicit_tls_needs_certificate(endpoint))


def build_relay(
    settings: Settings,
    reactor: Any,
    *,
    checker: Any = None,
    tls_context: Any = None,
    run_in_thread: Callable[..., Any] | None = None,
) -> Relay:
    """
    The relay of C{settings}: a L{Relay} with the thread pool, the spool
    and its delivery, the receiver pool (with C{settings.receivers}),
    metrics, control, the SMTP listeners (without receivers) and the
    SIGHUP service, in that order.

    @param checker: the AUTH checker (else made from C{settings.auth}).
    @param tls_context: the server TLS context, if loaded already.
    @param run_in_thread: where blocking spool work runs (a thread pool of
        the relay's own by default).
    @raise SettingsError: when the settings and what is given cannot work
        together.
    @raise CallbacksError: when the plugin cannot be made.
    """
    _check_collaborators(settings, checker, tls_context)
    parts = Parts(
        settings, reactor, checker=checker, tls_context=tls_context, run_in_thread=run_in_thread
    )
    plugin = parts.plugin
    # Read now, with or without receivers, so that a bad keys file stops
    # the start (receivers read it again: they sign).
    dkim_signer = parts.dkim_signer
    if dkim_signer is not None:
        log.info("Signing with {keys}", keys=dkim_signer.table.describe())
    disk = parts.disk_spool()
    recovery = SpoolRecovery(disk)
    delivery = delivery_scheduler(settings, disk, reactor, parts.run_in_thread, recovery, plugin)
    served = disk
    if delivery is not None:
        from relay.delivery.scheduler import SchedulerObserver
        from relay.spool.observed import ObservedSpool

        served = ObservedSpool(disk, SchedulerObserver(delivery))
    spool_service = SpoolService(disk, (settings.spool, settings.quarantine), recovery, delivery)
    services: list[IService] = []
    if parts.thread_pool is not None:
        services.append(ThreadPoolService(parts.thread_pool, stop_after=spool_service.stopping))
    services.append(spool_service)

    factory: Any = None
    pool: Any = None

    def open_sessions() -> int:
        # Read at scrape time, from what serves SMTP (made below: none yet
        # while the metrics are made).
        if pool is not None:
            return int(pool.sessions())
        return int(factory.sessions) if factory is not None else 0

    metrics: Any = None
    if settings.metrics:
        from relay.control.metrics import RelayMetrics

        metrics = RelayMetrics(sessions=open_sessions)
        counts = getattr(getattr(delivery, "client", None), "tls_counts", None)
        if counts is not None:
            from relay.delivery.tlspolicy import TLSCollector

            metrics.registry.register(TLSCollector(counts))
        if delivery is not None:
            metrics.shaping(delivery.shaper)
    on_rejected = metrics.rejected if metrics is not None else None
    if settings.receivers:
        pool = receiver_pool(settings, disk, delivery, recovery, reactor, on_rejected)
        services.append(pool)
        reloadables = [pool]
    else:
        factory = parts.server_factory(served, on_rejected)
        reloadables = parts.reloadables
    if settings.shaping is not None and delivery is not None:
        from relay.shaping.reloading import ShapingFile

        reloadables.append(ShapingFile(settings.shaping, delivery.shaper))
    if settings.metrics:
        from relay.control.metrics import metrics_service

        events = delivery.events if delivery is not None else None
        services.append(metrics_service(settings.metrics, metrics, disk, events, reactor))
    if settings.control:
        services.append(
            control_service(settings.control, served, delivery, plugin, reactor, dkim_signer)
        )
    if factory is not None:
        services.extend(smtp_listeners(settings.smtp, factory, parts.tls_context, reactor))
    services.append(reload_service(reloadables, reactor, parts.run_in_thread))
    warn_if_open_relay(plugin, settings.smtp)
    return Relay(
        services, callbacks=plugin, spool=served, delivery=delivery, factory=factory,
        receivers=pool, metrics=metrics,
    )  # fmt: skip


def delivery_scheduler(
    settings: Settings,
    disk: Any,
    reactor: Any,
    run_in_thread: Callable[..., Any],
    recovery: SpoolRecovery,
    plugin: Any = None,
) -> Any:
    """
    The delivery scheduler over C{disk} (it loads the active queue once
    C{recovery} is done), or C{None} for a spool that cannot deliver (not
    a full L{ISpool}); its traffic shaping comes from C{--shaping} and
    the plugin (when it provides L{relay.interfaces.IDestinationLimits}).
    Failures are classified with the plugin's rules (its
    C{failure_rules()}), then C{--failure-classes}, then the built-in
    table.

    @raise SettingsError: the shaping file or the failure rules cannot be
        used.
    """
    from relay.interfaces import ISpool

    if not ISpool.providedBy(disk):
        return None
    from relay.delivery.client import ClientSettings, RelayClient
    from relay.delivery.mx import DeadHosts, Myself, listeners_of
    from relay.delivery.nexthop import MXRules, make_router
    from relay.delivery.scheduler import DeliveryScheduler

    lookup, name_resolver = dns_lookup(settings, reactor)
    policies = tls_policies(settings, reactor, run_in_thread, lookup, name_resolver)
    dead = DeadHosts(reactor)
    rules = MXRules(
        dead=dead,
        myself=Myself(frozenset({settings.hostname.lower().rstrip(".")}), listeners_of(settings.smtp)),
        port=settings.mx_port,
    )
    client = RelayClient(
        reactor,
        ClientSettings(
            hostname=settings.hostname, tls=policies.default, bind_address=settings.bind_address
        ),
        run_in_thread=run_in_thread,
        policies=policies,
        dead_hosts=dead,
        name_resolver=name_resolver,
    )
    from relay.control.events import EventBus

    events = EventBus(reactor)
    return DeliveryScheduler(
        failure_classifier=failure_classifier(settings, plugin),
        spool=disk,
        client=client,
        clock=reactor,
        events=events,
        shaper=traffic_shaper(settings, reactor, run_in_thread, events, plugin),
        route=make_router(lookup, settings.smarthost, rules),
        max_send_jobs=settings.max_send_jobs,
        default_retry_intervals=settings.retry_intervals,
        bounced_lifetime=settings.bounced_lifetime,
        removed_lifetime=settings.removed_lifetime,
        delay_warning=settings.delay_warning or None,
        bounce=settings.bounce,
        hostname=settings.hostname,
        smarthost=settings.smarthost,
        wait_for=recovery.wait,
    )


def traffic_shaper(
    settings: Settings, reactor: Any, run_in_thread: Callable[..., Any], events: Any, plugin: Any
) -> Any:
    """
    The L{relay.shaping.Shaper} of delivery: the C{--shaping} file (or
    the default limits), the suspensions kept in the spool directory, the
    plugin's C{destination_limits}.

    @raise SettingsError: the shaping file cannot be used.
    """
    import os

    from relay.interfaces import IDestinationLimits
    from relay.shaping.config import ShapingConfig, ShapingFileError, load
    from relay.shaping.shaper import Shaper
    from relay.shaping.suspensions import FILE_NAME, Suspensions

    config = ShapingConfig()
    if settings.shaping is not None:
        try:
            config = load(settings.shaping)
        except ShapingFileError as e:
            raise SettingsError(f"shaping: {e}") from None
    suspensions = Suspensions(
        reactor, os.path.join(settings.spool, FILE_NAME), run_in_thread, events
    )
    suspensions.load()
    hook = plugin.destination_limits if IDestinationLimits.providedBy(plugin) else None
    return Shaper(config, reactor, suspensions, hook)


def failure_classifier(settings: Settings, plugin: Any) -> Any:
    """
    The classifier of failed attempts: the plugin's rules, then those of
    C{--failure-classes}, before the built-in table.

    @raise SettingsError: when a rule cannot be used.
    """
    from relay.delivery.failures import (
        FailureClassifier,
        FailureRulesError,
        load_rules,
        plugin_rules,
    )

    try:
        rules = list(plugin_rules(plugin))
        if settings.failure_classes:
            rules += load_rules(settings.failure_classes)
    except FailureRulesError as e:
        raise SettingsError(f"failure classes: {e}") from None
    return FailureClassifier(rules)


def dns_lookup(settings: Settings, reactor: Any) -> tuple[Any, Any]:
    """
    The DNS of delivery: the C{--resolver} servers (trusted to validate
    with C{--dnssec}), which also resolve the hops' addresses; else the
    system's resolver, made on first use, and the reactor's name resolver.

    @return: the L{relay.delivery.dns.DNSLookup}, and the C{IHostnameResolver}
        of the client's connections (C{None}: the reactor's).
    """
    if settings.resolver:
        from relay.delivery.dns import DNSClient, NamesHostnameResolver
        from relay.delivery.nexthop import parse_server

        client = DNSClient(
            reactor, [parse_server(s) for s in settings.resolver], trust_ad=settings.dnssec
        )
        return client, NamesHostnameResolver(client)
    from relay.delivery.dns import ResolverLookup

    def system() -> Any:
        from twisted.names import client as names_client

        return names_client.createResolver()

    return ResolverLookup(resolver_factory=system), None


def check_ca_file(path: str) -> None:
    """
    @raise ValueError: unless C{path} holds at least one PEM certificate.
    """
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            certificates = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load {path}: {e}") from None
    if not certificates:
        raise ValueError(f"no certificate in {path}")


def tls_policies(
    settings: Settings,
    reactor: Any,
    run_in_thread: Callable[..., Any],
    lookup: Any,
    name_resolver: Any = None,
) -> Any:
    """
    What chooses the TLS policy of each hop
    (L{relay.delivery.tlspolicy.TLSPolicies}): C{--relay-tls}, the
    C{--tls-policy} file, DANE with C{--dnssec}, MTA-STS (its policies
    cached in C{<spool>/mta-sts/}) unless all mail goes to the smarthost.

    @raise SettingsError: the policy file cannot be used.
    """
    import os

    from relay.delivery.client_tls import TLSContexts, TLSPolicy
    from relay.delivery.tlspolicy import PolicyFile, PolicyFileError, TLSCounts, TLSPolicies

    contexts = TLSContexts(ca_file=settings.tls_ca_file)
    default = TLSPolicy(settings.relay_tls, contexts=contexts)
    policy_file = None
    if settings.tls_policy is not None:
        try:
            policy_file = PolicyFile.load(settings.tls_policy)
        except PolicyFileError as e:
            raise SettingsError(f"tls_policy: {e}") from None
    # Made whatever the routing (cheaply: nothing is fetched or read until
    # mail routed by MX asks): with a smarthost, a plugin may still leave
    # some mail to the MX of its domains.
    from relay.delivery.mtasts import MTASTS, PolicyFetcher, PolicyStore

    store = PolicyStore(os.path.join(settings.spool, "mta-sts"), run_in_thread)
    fetcher = PolicyFetcher(reactor, contexts, name_resolver=name_resolver)
    counts = TLSCounts()
    sts = MTASTS(lookup, fetcher, store, reactor, on_problem=counts.sts_problem)
    return TLSPolicies(
        default,
        policy_file=policy_file,
        lookup=lookup if settings.dnssec else None,
        sts=sts,
        counts=counts,
    )


def receiver_pool(
    settings: Settings,
    disk: Any,
    delivery: Any,
    recovery: SpoolRecovery,
    reactor: Any,
    on_rejected: Callable[[], Any] | None = None,
) -> Any:
    """
    The receiver pool, the master's side of C{settings.receivers}: what
    receivers commit goes to C{delivery} (the scheduler, or C{None}) and
    its event stream as for mail received here; a restarted receiver makes
    the master look for entries it was not told about (L{DeliveryScheduler.rescan<relay.delivery.scheduler.DeliveryScheduler.rescan>}).
    """
    from relay.app.listener import parse_listener
    from relay.app.pool import ReceiverPool

    news: dict[str, Any] = {}
    if delivery is not None:
        news = dict(
            on_spooled=delivery.spooled,
            on_quarantined=delivery.quarantined,
            on_restart=delivery.rescan,
        )
    if on_rejected is not None:
        news["on_rejected"] = on_rejected
    return ReceiverPool(
        count=settings.receivers,
        listeners=[parse_listener(e) for e in settings.smtp],
        settings=settings.for_receivers(),
        reactor=reactor,
        remember=disk.remember,
        wait_for=recovery.wait,
        lock_fd=disk.lock_fileno,
        grace=settings.receiver_grace,
        **news,
    )


def control_service(
    description: str, spool: Any, delivery: Any, plugin: Any, reactor: Any, dkim_signer: Any = None
) -> Any:
    """
    The control endpoint (AMP, L{relay.control.server}) over C{spool} and
    C{delivery}, with the plugin's RPCs (and C{relayctl dkim-record} from
    C{dkim_signer}'s keys).
    """
    from twisted.application import strports

    from relay.control.server import ControlFactory, plugin_locators

    factory = ControlFactory(
        spool, delivery, plugin_locators(plugin), clock=reactor, dkim_signer=dkim_signer
    )
    service = strports.service(control_endpoint(description), factory, reactor=reactor)
    service.setName("control")
    return service


def smtp_listeners(
    endpoints: Sequence[str], factory: Any, tls_context: Any, reactor: Any
) -> list[IService]:
    """
    One SMTP listener service (C{smtp-0}, C{smtp-1}, ...) per endpoint.
    """
    from twisted.application.internet import StreamServerEndpointService

    from relay.smtp.tls import server_endpoint

    listeners: list[IService] = []
    for i, endpoint in enumerate(endpoints):
        listener = StreamServerEndpointService(
            server_endpoint(reactor, endpoint, tls_context), factory
        )
        listener.setName(f"smtp-{i}")
        listeners.append(listener)
    return listeners


def reload_service(candidates: Sequence[Any], reactor: Any, run_in_thread: Any) -> IService:
    """
    The service that reloads, on SIGHUP, those of C{candidates} that are
    L{IReloadable}.  It runs even with nothing to reload, so that a SIGHUP
    (C{systemctl reload}) never ends the relay.
    """
    from relay.app.reload import ReloadService
    from relay.interfaces import IReloadable

    reloadables = [c for c in candidates if IReloadable.providedBy(c)]
    return ReloadService(reloadables, reactor, run_in_thread)


def is_open_relay(callbacks: object) -> bool:
    """
    Is C{callbacks} the stock L{Simple} policy, that relays for anyone?
    """
    return type(callbacks) is Simple


def warn_if_open_relay(plugin: Any, smtp: Sequence[str]) -> None:
    """
    Log a warning for each endpoint that accepts other hosts' mail for the
    stock L{Simple} policy.
    """
    if not is_open_relay(plugin):
        return
    for endpoint in smtp:
        if listens_publicly(endpoint):
            log.warn(
                "OPEN RELAY: SMTP endpoint {endpoint!r} accepts connections from "
                "other hosts and the callbacks are the stock relay.simple.Simple, "
                "which relays mail from anyone to anywhere.  Restrict the endpoint "
                "with interface=127.0.0.1 or use --callbacks with a policy.",
                endpoint=endpoint,
                open_relay=True,
            )
