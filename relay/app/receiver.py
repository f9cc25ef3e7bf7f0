"""
Receiving processes: C{twistd relay --receivers N} (issue 5, "use both
cores").

The main process (the I{master}) keeps the spool lock, recovery, the
delivery scheduler, the control endpoint and the metrics.  It opens the
listening sockets of every C{--smtp} endpoint (C{tcp:}, C{tcp6:},
C{implicit-tls:}, any of them behind C{haproxy:}) and starts N receivers with
C{python -m relay.app.receiver NUMBER} (L{ReceiverPool}).  Each receiver
(L{Receiver}) adopts the sockets, serves SMTP with the configured plugin
and writes to the same spool directory (no lock, no recovery: the master
owns those), and tells the master about every commit.

Child file descriptors::

    0   stdin, a pipe from the master: first one line of JSON, the
        settings (L{receiver_settings}); then nothing.  Its end of file
        means the master is gone, and the receiver stops.
    1   stdout  } pipes to the master, each line logged there as text
    2   stderr  }  (what escapes the log: tracebacks at interpreter exit)
    3   messages to the master (below)
    4.. the listening sockets, in the order of C{settings["listeners"]}

Receiver-to-master messages on fd 3: one JSON object per line (UTF-8,
C{"\\n"} ends it), its C{"t"} saying what it is::

    {"t": "spooled", "entries": [entry_to_json(entry), ...],
     "messages": [base64 of the message, or null, per entry]}
    {"t": "quarantined", "reason": "...", "entries": [...]}
    {"t": "rejected"}                        (a policy rejection: metrics)
    {"t": "sessions", "n": 3}                (open sessions, when changed)
    {"t": "log", "event": "<twisted.logger.eventAsJSON text>"}
    {"t": "listening"}

C{spooled} and C{quarantined} are written once the entries are committed
(fsynced, renamed into place), before the client gets its reply; the master
emits the same events as for mail it received itself and hands new active
entries to the scheduler.  A message that was held in memory (up to
L{HANDOVER_BYTES}) travels along, so that the master delivers it without
reading back the file the receiver just wrote.  A message lost with a dying receiver costs only
latency: the entry is on disk and the master rescans the active queue
when it restarts the receiver.

On SIGTERM a receiver stops listening, lets its open sessions finish for
up to C{settings["grace"]} seconds, and exits.  SIGINT is ignored (the
master, in the same process group, decides).  SIGHUP, which the master
passes on (L{ReceiverPool.reload}), makes it reload its TLS certificate
(L{relay.app.reload.ReloadService}); an C{implicit-tls:} listener is served in
TLS by the receiver itself, with the C{tls_cert} and C{tls_key} files.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from zope.interface import implementer

from relay.interfaces import IReloadable, ISpoolObserver

CHANNEL_FD = 3
FIRST_LISTENER_FD = 4
MAX_LINE = 64 * 1024 * 1024
DEFAULT_GRACE = 30.0
SESSIONS_INTERVAL = 1.0
# Messages up to this size travel to the master with their entries.
HANDOVER_BYTES = 64 * 1024
RESTART_BACKOFF = (1.0, 60.0)
STABLE_AFTER = 60.0
IMPLICIT_TLS = "implicit-tls"  # relay.smtp.tls.IMPLICIT_TLS, without its colon
SUPPORTED = ("tcp", "tcp6", IMPLICIT_TLS)


@dataclass(frozen=True)
class Listener:
    """
    A listening socket the master opens and the receivers adopt.
    """

    endpoint: str
    family: int
    host: str
    port: int
    backlog: int = 50
    haproxy: bool = False
    tls: bool = False  # implicit TLS, with the relay's certificate

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "family": "inet6" if self.family == socket.AF_INET6 else "inet",
            "host": self.host,
            "port": self.port,
            "backlog": self.backlog,
            "haproxy": self.haproxy,
            "tls": self.tls,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Listener:
        family = socket.AF_INET6 if data["family"] == "inet6" else socket.AF_INET
        return cls(
            data["endpoint"], family, data["host"], int(data["port"]),
            int(data["backlog"]), bool(data["haproxy"]), bool(data.get("tls", False)),
        )  # fmt: skip


def parse_listener(endpoint: str) -> Listener:
    """
    The L{Listener} of an endpoint description: C{tcp:PORT}, C{tcp6:PORT}
    or C{implicit-tls:PORT} (with C{interface=} and C{backlog=}; IPv6 for
    C{implicit-tls:} when the interface is an IPv6 address), optionally
    behind C{haproxy:}.

    @raise ValueError: for any other endpoint, with a message for the user.
    """
    from twisted.internet.endpoints import _parse  # type: ignore[attr-defined]

    try:
        args, kwargs = _parse(endpoint)
    except Exception as e:
        raise ValueError(f"bad endpoint {endpoint!r}: {e}") from None
    args = [str(a) for a in args]
    haproxy = bool(args) and args[0].lower() == "haproxy"
    if haproxy:
        args = args[1:]
    if args and args[0].lower() == "ssl":
        raise ValueError(
            f"endpoint {endpoint!r}: receivers cannot serve ssl: endpoints; use "
            f"{IMPLICIT_TLS}:PORT[:interface=...] with --tls-cert and --tls-key"
        )
    if not args or args[0].lower() not in SUPPORTED:
        raise ValueError(
            f"endpoint {endpoint!r}: with receivers, only tcp:, tcp6: and haproxy: "
            f"over them are supported (and {IMPLICIT_TLS}: for implicit TLS)"
        )
    kind = args[0].lower()
    port_text = kwargs.pop("port", args[1] if len(args) > 1 else None)
    unknown = set(kwargs) - {"interface", "backlog"}
    if port_text is None or len(args) > 2 or unknown:
        raise ValueError(f"endpoint {endpoint!r}: expected {kind}:PORT[:interface=...][:backlog=N]")
    try:
        port = int(port_text)
        backlog = int(kwargs.get("backlog", 50))
    except ValueError:
        raise ValueError(f"endpoint {endpoint!r}: port and backlog must be numbers") from None
    if not 0 <= port <= 65535 or backlog < 1:
        raise ValueError(f"endpoint {endpoint!r}: bad port or backlog")
    host = str(kwargs.get("interface", "::" if kind == "tcp6" else "0.0.0.0"))
    tls = kind == IMPLICIT_TLS
    # implicit-tls: listens as Twisted's tcp: does: IPv6 on an IPv6 interface.
    family = socket.AF_INET6 if kind == "tcp6" or (tls and ":" in host) else socket.AF_INET
    if family == socket.AF_INET and ":" in host:
        raise ValueError(f"endpoint {endpoint!r}: an IPv6 interface needs tcp6:")
    return Listener(endpoint, family, host, port, backlog, haproxy, tls)


def open_listener(listener: Listener) -> socket.socket:
    """
    Bind and listen as Twisted's TCP port would (non-blocking,
    C{SO_REUSEADDR}).
    """
    sock = socket.socket(listener.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listener.family == socket.AF_INET6:
            address: tuple[Any, ...] = socket.getaddrinfo(
                listener.host, listener.port, socket.AF_INET6, socket.SOCK_STREAM
            )[0][4]
        else:
            address = (listener.host, listener.port)
        sock.bind(address)
        sock.listen(listener.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def callbacks_name(callbacks: Any) -> str:
    """
    The dotted name a receiver imports the plugin by.

    @raise ValueError: if C{callbacks} is an object that no dotted name
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
        raise ValueError(
            f"with receivers the callbacks must be given by dotted name (a class or a "
            f"provider a receiver process can import), not {callbacks!r}"
        )
    return name


def receiver_settings(**settings: Any) -> dict[str, Any]:
    """
    The settings a receiver is started with: JSON-able keyword settings
    (see L{Receiver}), plus the master's C{sys.path} so that the plugin
    imports the same way.
    """
    settings.setdefault("path", [p for p in sys.path if isinstance(p, str)])
    settings.setdefault("grace", DEFAULT_GRACE)
    json.dumps(settings)  # fails early if something is not JSON-able
    return settings


# -- the master side ----------------------------------------------------------


class ReceiverProcess(ProcessProtocol):
    """
    The master's L{IProcessProtocol} for one receiver: reads its messages,
    and its stdout/stderr as log text.
    """

    def __init__(self, pool: ReceiverPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.transport: Any = None
        self.started_at = 0.0
        self.sessions = 0
        self.ended: Any = None  # a Deferred while stopping
        # A receiver gets SIGHUP once it serves (and so has its handler).
        self.listening = False
        self.reload_pending = False
        self._buffers: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        line = json.dumps(self.pool.settings_for(self.number)) + "\n"
        self.transport.write(line.encode("utf-8"))

    def childDataReceived(self, fd: int, data: bytes) -> None:
        buffer = self._buffers.get(fd, b"") + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > MAX_LINE:
            self.pool.log.error(
                "receiver {receiver}: line too long on fd {fd}; dropped", receiver=self.number, fd=fd
            )
            rest = b""
        self._buffers[fd] = rest
        for line in lines:
            if fd == CHANNEL_FD:
                self.pool.message(self, line)
            elif line.strip():
                self.pool.output(self, fd, line)

    def childConnectionLost(self, fd: int) -> None:
        rest = self._buffers.pop(fd, b"")
        if rest:
            self.childDataReceived(fd, rest + b"\n")

    def processEnded(self, reason: Any) -> None:
        for fd in list(self._buffers):
            self.childConnectionLost(fd)
        self.pool.ended(self, reason)


@implementer(IReloadable)
class ReceiverPool(Service):
    """
    The master's service that runs C{count} receivers over the sockets of
    C{listeners}, restarting one that dies (after a backoff) and stopping
    them with the relay.  Its L{reload} passes SIGHUP on to them.

    @param on_spooled: called with the L{SpoolEntry}s a receiver enqueued.
    @param on_quarantined: called with quarantined entries and the reason.
    @param on_rejected: called when a receiver's policy rejected a message.
    @param on_restart: called when a receiver that died is restarted.
    @param remember: called with each entry a receiver spooled and its
        L{Message} when that came along (else C{None}), before
        C{on_spooled}: the master's spool keeps them for delivery.
    @param wait_for: a callable answering a Deferred to wait for before
        starting receivers (the spool's recovery).
    @param spawn: C{reactor.spawnProcess}'s signature; the reactor's by
        default.
    @param publisher: where receivers' log events go (the global log
        publisher by default).
    """

    def __init__(
        self,
        *,
        count: int,
        listeners: Sequence[Listener],
        settings: dict[str, Any],
        reactor: Any,
        on_spooled: Callable[[list[Any]], Any] = lambda entries: None,
        on_quarantined: Callable[[list[Any], str], Any] = lambda entries, reason: None,
        on_rejected: Callable[[], Any] = lambda: None,
        on_restart: Callable[[], Any] = lambda: None,
        remember: Callable[[Any, Any], Any] | None = None,
        wait_for: Callable[[], Any] | None = None,
        spawn: Callable[..., Any] | None = None,
        executable: str = sys.executable,
        publisher: Callable[[dict[str, Any]], None] | None = None,
        grace: float = DEFAULT_GRACE,
        backoff: tuple[float, float] = RESTART_BACKOFF,
    ) -> None:
        if count < 1:
            raise ValueError("a receiver pool needs at least one receiver")
        self.count = count
        self.listeners = tuple(listeners)
        self.settings = settings
        self.reactor = reactor
        self.on_spooled = on_spooled
        self.on_quarantined = on_quarantined
        self.on_rejected = on_rejected
        self.on_restart = on_restart
        self.remember = remember
        self.wait_for = wait_for
        self.spawn = spawn
        self.executable = executable
        self.publisher = publisher
        self.grace = grace
        self.backoff = backoff
        self.log = Logger(namespace="relay.app.receiver")
        self.sockets: list[socket.socket] = []
        self.processes: dict[int, ReceiverProcess] = {}
        self.restarts: dict[int, Any] = {}
        self.delays: dict[int, float] = {}
        self.stopping = False
        self.started: Any = None
        self.setName("receivers")

    def privilegedStartService(self) -> None:
        # Bind before privileges are dropped, like twistd's own ports.
        if not self.sockets:
            for listener in self.listeners:
                self.sockets.append(open_listener(listener))
        Service.privilegedStartService(self)

    def startService(self) -> None:
        from twisted.internet import defer

        if not self.sockets:
            for listener in self.listeners:
                self.sockets.append(open_listener(listener))
        Service.startService(self)
        self.stopping = False
        d = defer.maybeDeferred(self.wait_for) if self.wait_for else defer.succeed(None)

        def start(_: object) -> None:
            if self.stopping:
                return
            for listener, sock in zip(self.listeners, self.sockets, strict=True):
                self.log.info(
                    "Receivers listen on {endpoint} ({host} port {port})",
                    endpoint=listener.endpoint, host=sock.getsockname()[0],
                    port=sock.getsockname()[1],
                )  # fmt: skip
            for number in range(1, self.count + 1):
                self.start(number)

        d.addCallback(start)
        d.addErrback(lambda f: self.log.failure("Cannot start the receivers", f))
        self.started = d

    def settings_for(self, number: int) -> dict[str, Any]:
        return dict(self.settings, number=number, listeners=[x.to_json() for x in self.listeners])

    def start(self, number: int) -> ReceiverProcess:
        """
        Start receiver C{number}.
        """
        import relay

        self.restarts.pop(number, None)
        process = ReceiverProcess(self, number)
        process.started_at = self.reactor.seconds()
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", CHANNEL_FD: "r"}
        for i, sock in enumerate(self.sockets):
            child_fds[FIRST_LISTENER_FD + i] = sock.fileno()
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(relay.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        argv = [self.executable, "-m", "relay.app.receiver", str(number)]
        self.processes[number] = process
        spawn = self.spawn if self.spawn is not None else self.reactor.spawnProcess
        spawn(process, self.executable, argv, env=env, childFDs=child_fds)
        pid = getattr(process.transport, "pid", None)
        self.log.info("Receiver {receiver} started (pid {pid})", receiver=number, pid=pid)
        return process

    def sessions(self) -> int:
        """
        The open SMTP sessions of all receivers, as they last said.
        """
        return sum(p.sessions for p in self.processes.values())

    what = "receivers"

    def reload(self, run_in_thread: Any) -> Deferred[str]:
        """
        L{IReloadable}: send SIGHUP to every receiver, which reloads its own
        files and logs how it went.  One still starting gets it once it
        says it is listening: it may have read the files before they
        changed.
        """
        told: list[str] = []
        later: list[str] = []
        for number, process in sorted(self.processes.items()):
            if process.listening:
                self._signal(process, "HUP")
                told.append(str(number))
            else:
                process.reload_pending = True
                later.append(str(number))
        if not told and not later:
            return succeed("No receiver runs: each reads the files when it starts")
        parts = []
        if told:
            parts.append(f"SIGHUP passed on to receivers {', '.join(told)}")
        if later:
            parts.append(f"receivers {', '.join(later)} get it once they are listening")
        text = "; ".join(parts)
        return succeed(text[0].upper() + text[1:])

    # -- from the receivers ------------------------------------------------

    def message(self, process: ReceiverProcess, line: bytes) -> None:
        from relay.spool.codec import entry_from_json

        try:
            data = json.loads(line)
            kind = data["t"]
            if kind == "log":
                self._log_event(process, data["event"])
            elif kind == "spooled":
                entries = [entry_from_json(e) for e in data["entries"]]
                if self.remember is not None:
                    from relay.model.message import Message

                    bodies = data.get("messages") or [None] * len(entries)
                    for entry, body in zip(entries, bodies, strict=True):
                        self.remember(
                            entry, Message.from_bytes(base64.b64decode(body)) if body else None
                        )
                self.on_spooled(entries)
            elif kind == "quarantined":
                self.on_quarantined(
                    [entry_from_json(e) for e in data["entries"]], str(data["reason"])
                )
            elif kind == "rejected":
                self.on_rejected()
            elif kind == "sessions":
                process.sessions = int(data["n"])
            elif kind == "listening":
                self.log.info("Receiver {receiver} is listening", receiver=process.number)
                process.listening = True
                if process.reload_pending:
                    process.reload_pending = False
                    self._signal(process, "HUP")
            else:
                raise ValueError(f"unknown message {kind!r}")
        except Exception:
            self.log.failure(
                "Bad message from receiver {receiver}: {line!r}",
                receiver=process.number, line=line[:200],
            )  # fmt: skip

    def _log_event(self, process: ReceiverProcess, text: str) -> None:
        from twisted.logger import eventFromJSON, globalLogPublisher

        event = eventFromJSON(text)
        event["receiver"] = process.number
        level = getattr(event.get("log_level"), "name", "info")
        namespace = event.get("log_namespace", "-")
        event["log_system"] = f"receiver-{process.number} {namespace}#{level}"
        (self.publisher or globalLogPublisher)(event)

    def output(self, process: ReceiverProcess, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if fd == 2:
            self.log.warn("receiver {receiver} stderr: {line}", receiver=process.number, line=text)
        else:
            self.log.info("receiver {receiver} stdout: {line}", receiver=process.number, line=text)

    def ended(self, process: ReceiverProcess, reason: Any) -> None:
        number = process.number
        if self.processes.get(number) is process:
            del self.processes[number]
        if process.ended is not None:
            d, process.ended = process.ended, None
            d.callback(None)
        if self.stopping:
            self.log.info(
                "Receiver {receiver} stopped: {why}", receiver=number, why=reason.getErrorMessage()
            )
            return
        lived = self.reactor.seconds() - process.started_at
        low, high = self.backoff
        delay = low if lived >= STABLE_AFTER else min(high, self.delays.get(number, low / 2) * 2)
        self.delays[number] = delay
        self.log.error(
            "Receiver {receiver} died ({why}); restarting it in {delay} s",
            receiver=number, why=reason.getErrorMessage(), delay=delay,
        )  # fmt: skip
        self.restarts[number] = self.reactor.callLater(delay, self._restart, number)

    def _restart(self, number: int) -> None:
        self.restarts.pop(number, None)
        if self.stopping:
            return
        self.start(number)
        try:
            self.on_restart()
        except Exception:
            self.log.failure("After restarting receiver {receiver}", receiver=number)

    # -- stopping ---------------------------------------------------------

    def stopService(self) -> Any:
        from twisted.internet import defer

        Service.stopService(self)
        self.stopping = True
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        waiting = []
        for process in list(self.processes.values()):
            process.ended = defer.Deferred()
            waiting.append(process.ended)
            self._signal(process, "TERM")
        done = defer.DeferredList(waiting)
        if waiting:
            kill = self.reactor.callLater(self.grace + 5.0, self._kill)

            def finished(result: object) -> object:
                if kill.active():
                    kill.cancel()
                return result

            done.addBoth(finished)
        done.addBoth(lambda _: self._close_sockets())
        return done

    def _kill(self) -> None:
        for process in list(self.processes.values()):
            self.log.warn(
                "Receiver {receiver} did not stop in time: killing it", receiver=process.number
            )
            self._signal(process, "KILL")

    def _signal(self, process: ReceiverProcess, name: str) -> None:
        try:
            process.transport.signalProcess(name)
        except Exception as e:  # already gone
            self.log.debug("signal {name} to receiver: {e}", name=name, e=e)

    def _close_sockets(self) -> None:
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            sock.close()


# -- the receiver side ---------------------------------------------------------


@implementer(ISpoolObserver)
class MasterReport:
    """
    The receiver's news for the master: what the spool committed, sent
    with C{send(message)} (the receiver writes through an
    L{relay.spool.observed.ObservedSpool} with one of these).
    """

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self._send = send

    def spooled(self, entries: Sequence[Any], envelopes: Sequence[Any]) -> None:
        from relay.spool.codec import entry_to_json

        # Small messages go along (base64), so that the master delivers
        # them without reading back what was just written.
        bodies: list[str | None] = []
        for e in envelopes:
            data = e.envelope.message.data
            if data is not None and len(data) <= HANDOVER_BYTES:
                bodies.append(base64.b64encode(data).decode("ascii"))
            else:
                bodies.append(None)
        self._send(dict(t="spooled", entries=[entry_to_json(e) for e in entries], messages=bodies))

    def quarantined(self, entries: Sequence[Any], reason: str) -> None:
        from relay.spool.codec import entry_to_json

        self._send(dict(t="quarantined", entries=[entry_to_json(e) for e in entries], reason=reason))


class Receiver:
    """
    One receiving process: SMTP on the adopted sockets, mail into the
    spool, news to the master through C{send}.

    @param settings: as L{receiver_settings} made them, with C{number} and
        C{listeners}.
    @param send: writes one message (a JSON-able dict) to the master.
    @param fds: the file descriptors of the listening sockets.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        reactor: Any,
        send: Callable[[dict[str, Any]], None],
        fds: Sequence[int],
        run_in_thread: Callable[..., Any] | None = None,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.send = send
        self.number = int(settings["number"])
        self.listeners = [Listener.from_json(x) for x in settings["listeners"]]
        self.fds = list(fds)
        self.grace = float(settings.get("grace", DEFAULT_GRACE))
        self.log = Logger(namespace="relay.app.receiver")
        self.pool: Any = None
        self.run_in_thread = run_in_thread
        self.ports: list[Any] = []
        self.factory: Any = None
        # What SIGHUP reloads here (L{relay.app.reload.ReloadService}).
        self.reloadables: list[Any] = []
        self._sessions_reported = 0
        self._sessions_loop: Any = None
        self.stopped: Any = None

    def build(self) -> Any:
        """
        Make the plugin, the spool and the SMTP server factory, configured
        as the master's L{relay.service.makeService} would.
        """
        import functools

        from twisted.internet import threads
        from twisted.python import reflect

        from relay.simple import Defaults, as_callbacks
        from relay.smtp.server import SMTPServerFactory
        from relay.spool.disk import DiskSpool
        from relay.spool.observed import ObservedSpool

        s = self.settings
        if self.run_in_thread is None:
            from twisted.python.threadpool import ThreadPool

            self.pool = ThreadPool(minthreads=0, maxthreads=10, name=f"relay-receiver-{self.number}")
            self.run_in_thread = functools.partial(threads.deferToThreadPool, self.reactor, self.pool)
        checker = None
        if s.get("auth"):
            from twisted.cred import strcred

            from relay.tap import _bytes_users

            checker = _bytes_users(strcred.makeChecker(s["auth"][0]))
        plugin = as_callbacks(reflect.namedAny(s["callbacks"]))
        configure = getattr(plugin, "configure", None)
        if callable(configure):
            smarthost = s.get("smarthost")
            configure(
                Defaults(
                    hostname=s["hostname"],
                    next_hop_choices=(smarthost,) if smarthost else (),
                    retry_intervals=tuple(s.get("retry_intervals", ())),
                    checker=checker,
                    clock=self.reactor,
                )
            )
        tls = None
        if s.get("tls_cert"):
            from relay.smtp.tls import ServerTLSContext

            tls = ServerTLSContext.load(s["tls_cert"], s["tls_key"])
            self.reloadables.append(tls)
        # receivers never deliver: no memory of what they wrote
        disk = DiskSpool(
            s["spool"], self.run_in_thread, self.reactor, quarantine_path=s["quarantine"],
            remember=False,
        )  # fmt: skip
        factory = SMTPServerFactory(
            callbacks=plugin,
            spool=ObservedSpool(disk, MasterReport(self.send)),
            clock=self.reactor,
            hostname=s["hostname"],
            max_message_size=int(s["max_message_size"]),
            max_recipients=int(s["max_recipients"]),
            max_sessions=int(s["max_sessions"]),
            idle_timeout=float(s["idle_timeout"]),
            tls_context_factory=tls,
            auth_requires_tls=bool(s["auth_requires_tls"]),
            reject_bare_lf=bool(s["reject_bare_lf"]),
        )
        factory.on_rejected = lambda: self.send({"t": "rejected"})
        self.factory = factory
        return factory

    def start(self) -> None:
        """
        Build, then listen on every adopted socket.
        """
        from twisted.internet.task import LoopingCall

        factory = self.factory if self.factory is not None else self.build()
        if self.pool is not None:
            self.pool.start()
        for listener, fd in zip(self.listeners, self.fds, strict=True):
            served: Any = factory
            if listener.tls:
                from relay.smtp.tls import implicit_tls_needs_certificate, tls_factory

                context = factory.settings.tls_context_factory
                if context is None:
                    raise ValueError(implicit_tls_needs_certificate(listener.endpoint))
                served = tls_factory(context, served)
            if listener.haproxy:
                from relay.smtp.proxy import ProxyHeaderWrappingFactory

                # The PROXY header comes first, then the TLS handshake.
                served = ProxyHeaderWrappingFactory(served, clock=self.reactor)
            self.ports.append(self.reactor.adoptStreamPort(fd, listener.family, served))
            # The port has its own duplicate of the socket.
            os.close(fd)
        self._sessions_loop = LoopingCall(self._report_sessions)
        self._sessions_loop.clock = self.reactor
        self._sessions_loop.start(SESSIONS_INTERVAL, now=False)
        self.send({"t": "listening"})
        self.log.info("Receiver {receiver} serving", receiver=self.number)

    def _report_sessions(self) -> None:
        if self.factory is None:
            return
        n = self.factory.sessions
        if n != self._sessions_reported:
            self._sessions_reported = n
            self.send({"t": "sessions", "n": n})

    def stop(self) -> Any:
        """
        Stop listening, let the open sessions finish (up to the grace),
        stop the thread pool.  Answer a Deferred that fires when done.
        """
        from twisted.internet import defer
        from twisted.internet.task import LoopingCall

        if self.stopped is not None:
            return self.stopped
        if self._sessions_loop is not None and self._sessions_loop.running:
            self._sessions_loop.stop()
        stopping = [defer.maybeDeferred(p.stopListening) for p in self.ports]
        self.ports = []
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self.reactor.seconds() + self.grace

        def check() -> None:
            n = self.factory.sessions if self.factory is not None else 0
            if n and self.reactor.seconds() < deadline:
                return
            if n:
                self.log.warn(
                    "Receiver {receiver} stops with {n} sessions open", receiver=self.number, n=n
                )
            loop.stop()

        loop = LoopingCall(check)
        loop.clock = self.reactor

        def drained(_: object) -> None:
            self._report_sessions()
            if self.pool is not None and self.pool.started:
                self.pool.stop()
            done.callback(None)

        d = defer.DeferredList(stopping)
        d.addCallback(lambda _: loop.start(0.1, now=True))
        d.addCallback(drained)
        self.stopped = done
        return done


class _Channel:
    """
    The receiver's end of the pipes: fd 0 (the master's stdin pipe, only
    watched for end of file) and fd 3 (messages to the master).
    """

    def __init__(self, reactor: Any, on_master_gone: Callable[[], None]) -> None:
        from twisted.internet import defer, interfaces, protocol, stdio
        from zope.interface import implementer

        channel = self
        self.closed = False
        self.flushed: defer.Deferred[None] = defer.Deferred()
        self.reactor = reactor

        @implementer(interfaces.IHalfCloseableProtocol)
        class _Watch(protocol.Protocol):
            def readConnectionLost(self) -> None:
                on_master_gone()

            def writeConnectionLost(self) -> None:
                channel.closed = True
                if not channel.flushed.called:
                    channel.flushed.callback(None)

            def connectionLost(self, reason: Any = None) -> None:
                self.writeConnectionLost()
                on_master_gone()

        self.protocol = _Watch()
        self.io = stdio.StandardIO(self.protocol, stdin=0, stdout=CHANNEL_FD, reactor=reactor)  # type: ignore[call-arg]

    def send(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self.io.write(json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n")

    def close(self, timeout: float = 5.0) -> Any:
        """
        Write what is buffered for the master, then close fd 3; answer a
        Deferred that fires when done (or after C{timeout} seconds).
        """
        if not self.closed:
            self.io.loseWriteConnection()  # type: ignore[attr-defined]
        call = self.reactor.callLater(timeout, lambda: self.protocol.writeConnectionLost())
        self.flushed.addBoth(lambda _: call.cancel() if call.active() else None)
        return self.flushed


def _read_settings(fd: int = 0) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("relay.app.receiver: no settings on stdin (run by the relay master)")
        data += chunk
    settings: dict[str, Any] = json.loads(data)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """
    The receiver process: read the settings, serve until SIGTERM or the
    master's end.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until the reload service takes SIGHUP over: its default would end us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = _read_settings()
    for entry in reversed(settings.get("path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    blocked = _without_tls() if not settings.get("tls_cert") else []
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    for name in blocked:
        # Plugins may import pyOpenSSL themselves: only the TCP transport
        # was to do without it.
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]
    from twisted.logger import eventAsJSON, globalLogBeginner

    stopping: list[bool] = []

    def stop_once() -> None:
        if not stopping:
            stopping.append(True)
            reactor.stop()

    def master_gone() -> None:
        if not stopping:
            Logger(namespace="relay.app.receiver").warn("The master is gone: stopping")
        stop_once()

    def terminated(signum: int, frame: Any) -> None:
        # SIGTERM may come twice (from the master and, e.g., from systemd
        # to the whole control group): stop once.
        reactor.callFromThread(stop_once)

    signal.signal(signal.SIGTERM, terminated)

    channel = _Channel(reactor, master_gone)

    from relay.logs import portable

    def forward(event: dict[str, Any]) -> None:
        try:
            # portable: fields JSON cannot hold travel as their text, not as
            # eventAsJSON's {"unpersistable": true}.
            channel.send({"t": "log", "event": eventAsJSON(portable(event))})
        except Exception:
            pass

    globalLogBeginner.beginLoggingTo([forward], redirectStandardIO=False)  # type: ignore[list-item]
    fds = [FIRST_LISTENER_FD + i for i in range(len(settings["listeners"]))]
    receiver = Receiver(settings, reactor, channel.send, fds)
    exit_code = [0]
    reloading: list[Any] = []

    def start() -> None:
        from relay.app.reload import ReloadService

        try:
            receiver.build()
            # Before the master hears we listen (and may pass SIGHUP on).
            run_in_thread = receiver.run_in_thread
            assert run_in_thread is not None  # build() made it
            service = ReloadService(receiver.reloadables, reactor, run_in_thread)
            service.startService()
            reloading.append(service)
            receiver.start()
        except Exception:
            # Not serving: exit, so that the master sees it (and retries
            # after its backoff) rather than a receiver that does nothing.
            Logger(namespace="relay.app.receiver").failure("Receiver {n} cannot start", n=receiver.number)
            exit_code[0] = 1
            stop_once()

    reactor.callWhenRunning(start)

    def shutdown() -> Any:
        for service in reloading:
            service.stopService()
        d = receiver.stop()
        d.addBoth(lambda _: channel.close())
        return d

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run(installSignalHandlers=False)
    # Done, and everything for the master written: exit now, before the
    # interpreter's finalization puts back the default signal handlers (a
    # second SIGTERM, e.g. systemd's to the whole group, would then end
    # the process "by signal").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code[0])


def _without_tls() -> list[str]:
    """
    Keep pyOpenSSL (and cryptography) out of a receiver that serves no
    TLS while the reactor is imported: Twisted's TCP transport then comes
    without C{startTLS}, which such a receiver never calls, and the
    process is some 13 MB smaller.  Answer the module names blocked, to
    be unblocked once the reactor is imported.
    """
    if "twisted.internet.tcp" in sys.modules or "OpenSSL" in sys.modules:
        return []
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
    return ["OpenSSL"]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
