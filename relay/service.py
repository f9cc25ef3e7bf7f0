"""
The relay as a Twisted service: L{makeService} builds it from keyword
settings, for C{twistd relay} (see L{relay.tap}) and for C{.tac} files::

    from twisted.application import service
    from relay.service import makeService

    application = service.Application("relay")
    makeService(smtp=["tcp:2525:interface=127.0.0.1"],
                spool="/var/spool/relay").setServiceParent(application)
"""

from __future__ import annotations

import functools
import ipaddress
import os
from typing import Any, Callable, Iterable, Sequence

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from relay.simple import CallbacksError, Defaults, Simple, as_callbacks, load_callbacks
from relay.smtp.tls import server_endpoint as tls_server_endpoint
from relay.spool.layout import control_in_spool, quote_endpoint_value

log = Logger()

DEFAULT_SMTP = ("tcp:8025:interface=127.0.0.1",)


class StartupError(Exception):
    """
    The relay cannot start as configured.  The message is one line for
    the operator that names the option or path and the cause.
    """


def _looks_like_spool(names: Sequence[str]) -> bool:
    return "lock" in names or "active" in names


def _looks_like_quarantine(names: Sequence[str]) -> bool:
    return all(name.endswith((".json", ".eml", ".tmp")) for name in names)


def prepare_directories(spool: str, quarantine: str) -> None:
    """
    Create the spool and quarantine directories (mode 0700) when missing,
    and check that those that exist are ours and writable: a relay started
    on the wrong directory must not make it its own (recovery empties a
    spool's C{tmp/}).  Blocking: for start-up, before the reactor runs.

    @raise StartupError: naming the option, the path and the cause.
    """
    if os.path.abspath(spool) == os.path.abspath(quarantine):
        raise StartupError(f"--quarantine {quarantine}: must not be the spool directory")
    _prepare_directory("--spool", spool, "spool", _looks_like_spool)
    _prepare_directory("--quarantine", quarantine, "quarantine", _looks_like_quarantine)


def _prepare_directory(
    option: str, path: str, what: str, looks_right: Callable[[Sequence[str]], bool]
) -> None:
    try:
        names = [name for name in os.listdir(path) if not name.startswith(".")]
    except FileNotFoundError:
        try:
            os.makedirs(path, mode=0o700)
        except OSError as e:
            raise StartupError(f"{option} {path}: cannot create it: {e.strerror}") from None
        names = []
    except NotADirectoryError as e:
        if os.path.exists(path):
            raise StartupError(f"{option} {path}: not a directory") from None
        raise StartupError(f"{option} {path}: cannot create it: {e.strerror}") from None
    except OSError as e:
        raise StartupError(f"{option} {path}: cannot read it: {e.strerror}") from None
    if names and not looks_right(names):
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise StartupError(
            f"{option} {path}: not a relay {what} (it holds {shown}); "
            "give a new or empty directory"
        )
    try:
        _write_probe(path)
    except OSError as e:
        raise StartupError(f"{option} {path}: not writable: {e.strerror}") from None


def _write_probe(directory: str) -> None:
    """
    Create and remove a file in C{directory}: C{os.access} says yes to
    root even on a read-only filesystem, so try it.
    """
    probe = os.path.join(directory, f".write-check-{os.getpid()}")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    os.unlink(probe)


def load_tls_context(cert: str, key: str) -> Any:
    """
    Load a PEM certificate (followed by its intermediates) and private key
    into the reloadable server TLS context, for STARTTLS and implicit TLS
    (see L{relay.smtp.tls.ServerTLSContext}).

    @raise relay.smtp.tls.TLSFilesError: naming the file that cannot be used.
    """
    from relay.smtp.tls import ServerTLSContext

    return ServerTLSContext.load(cert, key)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


def listens_publicly(endpoint: str) -> bool:
    """
    Does the server endpoint description C{endpoint} accept connections
    from other hosts?  A TCP endpoint without C{interface=} listens on all
    interfaces.
    """
    from twisted.internet.endpoints import _parse  # type: ignore[attr-defined]

    try:
        args, kwargs = _parse(endpoint)
    except Exception:
        return False
    if not args:
        return False
    kind = str(args[0]).lower()
    if kind in ("unix", "systemd"):
        return False
    if kind not in ("tcp", "tcp6", "ssl", "le", "lets", "implicit-tls"):
        # Unknown endpoint type: assume the worst only for network ones.
        return "interface" in kwargs and not _is_loopback(kwargs["interface"])
    interface = kwargs.get("interface")
    if interface is None:
        return True
    return not _is_loopback(interface)


def control_endpoint(endpoint: str) -> str:
    """
    The control endpoint description C{endpoint}, with C{mode=0600} added
    to a unix socket that does not say its mode: only the relay's user may
    manage it.
    """
    from twisted.internet.endpoints import _parse  # type: ignore[attr-defined]

    try:
        args, kwargs = _parse(endpoint)
    except Exception:
        return endpoint
    if not args or str(args[0]).lower() != "unix":
        return endpoint
    if "mode" not in kwargs:
        kwargs["mode"] = "0600"
    path = str(args[1]) if len(args) > 1 else str(kwargs.pop("address", ""))
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        # A socket path longer than AF_UNIX allows cannot be bound; the
        # same socket relative to the current directory may fit.
        relative = os.path.relpath(path)
        if len(os.fsencode(relative)) < len(os.fsencode(path)):
            path = relative
    return ":".join(
        ["unix", quote_endpoint_value(path)]
        + [f"{k}={quote_endpoint_value(str(v))}" for k, v in kwargs.items()]
        + [quote_endpoint_value(str(a)) for a in args[2:]]
    )


_UNIX_PATH_MAX = 107




def is_open_relay(callbacks: object) -> bool:
    """
    Is C{callbacks} the stock L{Simple} policy, that relays for anyone?
    """
    return type(callbacks) is Simple


class ThreadPoolService(Service):
    """
    Start and stop a L{ThreadPool} with the service.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> Any:
        Service.stopService(self)
        # Services stopped before us (the spool, waiting for deliveries)
        # may still need the pool: stop it once they are done.
        before = getattr(self, "stop_after", None)
        d = before() if before is not None else None
        if isinstance(d, Deferred) and not d.called:
            d.addBoth(lambda _: self.pool.stop())
            return d
        self.pool.stop()
        return None


class SpoolService(Service):
    """
    Own the spool: create its directories, hold its lock while running, and
    recover it at start.
    """

    def __init__(self, spool: Any, directories: Iterable[str]) -> None:
        self.spool = spool
        self.directories = tuple(directories)
        self.locked = False
        self.recovered: Deferred[Any] | None = None
        self.stopped: Deferred[Any] | None = None

    def privilegedStartService(self) -> None:
        # Before the reactor runs and before anything listens: a relay that
        # cannot own its spool must not start at all.
        for directory in self.directories:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        self._lock()
        Service.privilegedStartService(self)

    def _lock(self) -> None:
        """
        Take the spool's lock, or end the process with one log line that
        says who holds it (C{twistd relay} checks this before it starts;
        this is for a relay that started meanwhile, and for C{.tac} files).
        """
        if self.locked:
            return
        try:
            self.spool.lock()
        except Exception as e:
            log.critical("Cannot start: {error}", error=e)
            raise SystemExit(1) from None
        self.locked = True

    def startService(self) -> None:
        self._lock()
        Service.startService(self)
        def recovered(result: Any) -> Any:
            log.info("Spool recovered")
            return result

        def failed(failure: Any) -> None:
            log.failure("Spool recovery failed", failure)

        d: Deferred[Any] = self.spool.recover()
        d.addCallbacks(recovered, failed)
        self.recovered = d
        delivery = getattr(self, "delivery", None)
        if delivery is not None:
            # The scheduler loads the active queue once recovery is done.
            delivery.wait_for = lambda: self.recovered
            delivery.startService()

    def stopService(self) -> Any:
        Service.stopService(self)
        delivery = getattr(self, "delivery", None)
        if delivery is not None and delivery.running:
            # Let running deliveries finish (up to a bound) before the
            # spool is unlocked.
            d: Deferred[Any] = delivery.stopService()
            d.addBoth(lambda _: self._unlock())
            self.stopped = d
            return d
        self.stopped = None
        self._unlock()
        return None

    def _unlock(self) -> None:
        if self.locked:
            self.locked = False
            self.spool.unlock()


def _resolve_callbacks(callbacks: Any) -> Any:
    """
    The plugin: C{callbacks} loaded by its dotted name if it is one, and
    made a full L{IServerCallbacks} provider.

    @raise CallbacksError: when it cannot be loaded or made.
    """
    if isinstance(callbacks, str):
        callbacks = load_callbacks(callbacks)
    return as_callbacks(callbacks)


def _configure(plugin: Any, defaults: Defaults) -> None:
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


def _delivery(
    top: Any,
    spool_service: SpoolService,
    disk: Any,
    reactor: Any,
    hostname: str,
    smarthost: str | None,
    retry_intervals: Sequence[float],
    max_send_jobs: int,
    relay_tls: str,
    bounce: bool,
    run_in_thread: Any,
) -> Any:
    """
    Build the delivery scheduler over C{disk}, started and stopped with the
    spool service (after recovery, before unlocking), and return the spool
    the SMTP server writes to: one that wakes the scheduler on enqueue.
    Without a full L{ISpool} or without the relay client, no delivery.
    """
    from relay.interfaces import ISpool

    if not ISpool.providedBy(disk):
        return disk
    try:
        from relay.delivery.client import ClientSettings, RelayClient, TLSPolicy
    except ImportError:
        log.warn("relay.delivery.client is missing: mail is spooled but not delivered")
        return disk
    from relay.delivery.nexthop import make_router
    from relay.delivery.scheduler import DeliveryScheduler, SchedulerObserver
    from relay.spool.observed import ObservedSpool

    def resolver() -> Any:
        from twisted.names import client as names_client

        return names_client.createResolver()

    client = RelayClient(
        reactor,
        ClientSettings(hostname=hostname, tls=TLSPolicy(relay_tls)),
        run_in_thread=run_in_thread,
    )
    scheduler = DeliveryScheduler(
        spool=disk,
        client=client,
        clock=reactor,
        route=make_router(resolver),
        max_send_jobs=max_send_jobs,
        default_retry_intervals=tuple(retry_intervals),
        bounce=bounce,
        hostname=hostname,
        smarthost=smarthost,
    )
    spool_service.delivery = scheduler  # type: ignore[attr-defined]
    top.delivery = scheduler
    served = ObservedSpool(disk, SchedulerObserver(scheduler))
    top.spool = served
    return served


def makeService(
    *,
    smtp: Sequence[str] = DEFAULT_SMTP,
    spool: str = "spool",
    quarantine: str = "quarantine",
    control: str | None = None,
    callbacks: Any = "relay.simple.Simple",
    smarthost: str | None = None,
    retry_intervals: Sequence[float] = (),
    max_message_size: int = 35_000_000,
    max_recipients: int = 1000,
    max_sessions: int = 1000,
    max_send_jobs: int = 10,
    hostname: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    relay_tls: str = "may",
    checker: Any = None,
    idle_timeout: float = 300.0,
    reject_bare_lf: bool = False,
    auth_requires_tls: bool = True,
    bounce: bool = True,
    reactor: Any = None,
    tls_context_factory: Any = None,
    run_in_thread: Callable[..., Deferred[Any]] | None = None,
    metrics: str | None = None,
    receivers: int = 0,
    auth: Sequence[str] = (),
    receiver_grace: float = 30.0,
) -> MultiService:
    """
    Build the relay: a L{MultiService} with a thread pool, the spool, and
    one SMTP listener per endpoint description in C{smtp}.

    @param callbacks: the policy: a dotted name, a class, or an object
        providing (some of) L{IServerCallbacks}.
    @param tls_cert: the PEM certificate file (the server's certificate,
        then its intermediates) for STARTTLS and C{implicit-tls:PORT}
        listeners, with the PEM private key file C{tls_key}; SIGHUP reloads
        them.
    @param reactor: the reactor; the global one when C{None}.
    @param metrics: an endpoint description to serve Prometheus metrics on
        (at C{/metrics}), or C{None} for none.
    @param receivers: with 0, this process serves SMTP itself.  With N >= 1
        it does not: it opens the C{smtp} sockets (C{tcp:}, C{tcp6:},
        C{implicit-tls:}, or C{haproxy:} over one of them) and runs N
        receiving processes on them (L{relay.app.receiver}), each with at most
        C{max_sessions / N} sessions; the plugin must then be named by a
        dotted path.
    @param auth: C{twisted.cred.strcred} descriptions of the AUTH checker
        (e.g. C{"memory:alice:secret"}), the form receivers need; the
        checker is made from the first one when C{checker} is C{None}.
    @param receiver_grace: seconds a stopping receiver lets its open
        sessions finish.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    if isinstance(smtp, str):
        smtp = (smtp,)
    if hostname is None:
        import socket

        hostname = socket.getfqdn()
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key must be given together")
    if tls_cert is None and tls_context_factory is None:
        from relay.smtp.tls import implicit_tls_needs_certificate, plain_description

        for endpoint in smtp:
            if plain_description(endpoint) is not None:
                raise ValueError(implicit_tls_needs_certificate(endpoint))
    receivers = int(receivers)
    if receivers < 0:
        raise ValueError("receivers must be 0 or more")
    auth = tuple(auth)
    if auth and checker is None:
        from twisted.cred import strcred

        from relay.tap import _bytes_users

        checker = _bytes_users(strcred.makeChecker(auth[0]))
    receiver_setup: dict[str, Any] = {}
    if receivers:
        from relay.app.receiver import callbacks_name, parse_listener

        receiver_setup["listeners"] = [parse_listener(e) for e in smtp]
        receiver_setup["callbacks"] = callbacks_name(callbacks)
        if checker is not None and not auth:
            raise ValueError(
                "with receivers, give the AUTH checker as strcred descriptions (auth=[...])"
            )
        if tls_context_factory is not None and tls_cert is None:
            raise ValueError("with receivers, give TLS as tls_cert and tls_key files")
    if tls_context_factory is None and tls_cert is not None:
        tls_context_factory = load_tls_context(tls_cert, tls_key)  # type: ignore[arg-type]

    # Imported here so that importing this module (and parsing options)
    # does not depend on them.
    from relay.smtp.server import SMTPServerFactory
    from relay.spool.disk import DiskSpool

    if control is None:
        control = control_in_spool(spool)
    plugin = _resolve_callbacks(callbacks)
    _configure(
        plugin,
        Defaults(
            hostname=hostname,
            next_hop_choices=(smarthost,) if smarthost else (),
            retry_intervals=tuple(retry_intervals),
            checker=checker,
            clock=reactor,
        ),
    )

    top = MultiService()
    top.setName("relay")
    # Settings for the services added by later issues (delivery, control).
    top.settings = dict(  # type: ignore[attr-defined]
        control=control,
        smarthost=smarthost,
        retry_intervals=tuple(retry_intervals),
        max_send_jobs=max_send_jobs,
        relay_tls=relay_tls,
        bounce=bounce,
    )
    top.callbacks = plugin  # type: ignore[attr-defined]
    top.receivers = None  # type: ignore[attr-defined]

    pool_service: ThreadPoolService | None = None
    if run_in_thread is None:
        pool = ThreadPool(minthreads=0, maxthreads=10, name="relay-spool")
        pool_service = ThreadPoolService(pool)
        pool_service.setName("threadpool")
        pool_service.setServiceParent(top)
        run_in_thread = functools.partial(threads.deferToThreadPool, reactor, pool)

    disk = DiskSpool(spool, run_in_thread, reactor, quarantine_path=quarantine)
    spool_service = SpoolService(disk, (spool, quarantine))
    spool_service.setName("spool")
    spool_service.setServiceParent(top)
    top.spool = disk  # type: ignore[attr-defined]
    if pool_service is not None:
        pool_service.stop_after = lambda: getattr(spool_service, "stopped", None)  # type: ignore[attr-defined]
    top.delivery = None  # type: ignore[attr-defined]
    served = _delivery(
        top, spool_service, disk, reactor, hostname, smarthost, retry_intervals,
        max_send_jobs, relay_tls, bounce, run_in_thread,
    )

    if receivers:
        top.factory = None  # type: ignore[attr-defined]
        _receivers(
            top, receivers, receiver_setup, disk, spool_service, reactor,
            spool=os.path.abspath(spool),
            quarantine=os.path.abspath(quarantine),
            hostname=hostname,
            smarthost=smarthost,
            retry_intervals=list(retry_intervals),
            max_message_size=max_message_size,
            max_recipients=max_recipients,
            max_sessions=-(-max_sessions // receivers),
            idle_timeout=idle_timeout,
            reject_bare_lf=reject_bare_lf,
            auth_requires_tls=auth_requires_tls,
            tls_cert=os.path.abspath(tls_cert) if tls_cert else None,
            tls_key=os.path.abspath(tls_key) if tls_key else None,
            auth=list(auth),
            grace=receiver_grace,
        )  # fmt: skip
        _metrics_and_control(top, plugin, disk, reactor, metrics, control, None)
        _reload_on_sighup(top, [top.receivers], reactor, run_in_thread)  # type: ignore[attr-defined]
        _warn_open_relay(plugin, smtp)
        return top

    factory = SMTPServerFactory(
        callbacks=plugin,
        spool=served,
        clock=reactor,
        hostname=hostname,
        max_message_size=max_message_size,
        max_recipients=max_recipients,
        max_sessions=max_sessions,
        idle_timeout=idle_timeout,
        tls_context_factory=tls_context_factory,
        auth_requires_tls=auth_requires_tls,
        reject_bare_lf=reject_bare_lf,
    )
    top.factory = factory  # type: ignore[attr-defined]
    _metrics_and_control(top, plugin, disk, reactor, metrics, control, factory)
    for i, endpoint in enumerate(smtp):
        listener = StreamServerEndpointService(
            tls_server_endpoint(reactor, endpoint, tls_context_factory), factory
        )
        listener.setName(f"smtp-{i}")
        listener.setServiceParent(top)
    _reload_on_sighup(top, [tls_context_factory], reactor, run_in_thread)
    _warn_open_relay(plugin, smtp)
    return top


def _reload_on_sighup(top: Any, candidates: Sequence[Any], reactor: Any, run_in_thread: Any) -> None:
    """
    Add the service that reloads, on SIGHUP, those of C{candidates} that
    are L{IReloadable}.  It runs even with nothing to reload, so that a
    SIGHUP (C{systemctl reload}) never ends the relay.
    """
    from relay.app.reload import ReloadService
    from relay.interfaces import IReloadable

    reloadables = [c for c in candidates if IReloadable.providedBy(c)]
    ReloadService(reloadables, reactor, run_in_thread).setServiceParent(top)


def _metrics_and_control(
    top: Any, plugin: Any, disk: Any, reactor: Any, metrics: str | None, control: str,
    factory: Any,
) -> None:
    """
    Add the metrics and control services to C{top}.  The metrics count the
    sessions and policy rejections of C{factory}, or of the receivers when
    there is none.
    """
    top.metrics = None
    if metrics:
        from relay.control.metrics import RelayMetrics, metrics_service

        if factory is not None:
            relay_metrics = RelayMetrics(sessions=lambda: factory.sessions)
            factory.on_rejected = relay_metrics.rejected
        else:
            pool = top.receivers
            relay_metrics = RelayMetrics(sessions=pool.sessions)
            pool.on_rejected = relay_metrics.rejected
        delivery = top.delivery
        metrics_service(
            metrics, relay_metrics, disk,
            delivery.events if delivery is not None else None, reactor,
        ).setServiceParent(top)
        top.metrics = relay_metrics

    if control:
        from relay.control.server import ControlFactory, plugin_locators

        control_factory = ControlFactory(
            top.spool, top.delivery, plugin_locators(plugin), clock=reactor
        )
        top.control_factory = control_factory
        control_service = strports.service(
            control_endpoint(control), control_factory, reactor=reactor
        )
        control_service.setName("control")
        control_service.setServiceParent(top)


def _warn_open_relay(plugin: Any, smtp: Sequence[str]) -> None:
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


def _receivers(
    top: Any,
    count: int,
    setup: dict[str, Any],
    disk: Any,
    spool_service: SpoolService,
    reactor: Any,
    **settings: Any,
) -> None:
    """
    Add the receiver pool to C{top}: the master's side of
    C{--receivers}.  What receivers commit goes to the scheduler and the
    event stream as for mail received here (see
    L{relay.delivery.scheduler.SchedulerObserver}).
    """
    from relay.app.receiver import ReceiverPool, receiver_settings
    from relay.model.entry import ACTIVE

    def spooled(entries: list[Any]) -> None:
        if top.delivery is not None:
            top.delivery.spooled(entries)

    def quarantined(entries: list[Any], reason: str) -> None:
        if top.delivery is not None:
            top.delivery.quarantined(entries, reason)

    def rescan() -> None:
        # A receiver that died may have committed entries it could not
        # tell us about: schedule what the scheduler does not know of.
        delivery = top.delivery
        if delivery is None or not delivery.running:
            return

        def found(entries: list[Any]) -> None:
            known = set(delivery.timers) | set(delivery.jobs) | set(delivery.due)
            delivery.notify([e for e in entries if e.id not in known])

        d = disk.entries(ACTIVE)
        d.addCallbacks(found, lambda f: log.failure("Rescanning the active queue failed", f))

    pool = ReceiverPool(
        count=count,
        listeners=setup["listeners"],
        settings=receiver_settings(callbacks=setup["callbacks"], **settings),
        reactor=reactor,
        on_spooled=spooled,
        on_quarantined=quarantined,
        on_restart=rescan,
        remember=disk.remember,
        wait_for=lambda: spool_service.recovered,
        grace=settings["grace"],
    )
    pool.setServiceParent(top)
    top.receivers = pool
