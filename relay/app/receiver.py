"""
A receiving process of C{twistd relay --receivers N}, the child side: the
master (L{relay.app.pool}) starts it as C{python -m relay.app.receiver
NUMBER} with the listening sockets and a start message
(L{relay.app.channel}).  It adopts the sockets, serves SMTP with the
configured plugin, writes to the same spool directory (no lock, no
recovery: the master owns those), and tells the master about every commit
(L{MasterReport}).

It is built by the same code as the relay itself (L{relay.app.build.Parts}):
the same plugin configuration, thread pool, spool and SMTP server factory.

On SIGTERM, or when its master is gone, a receiver stops listening, lets
its open sessions finish the transactions they are in (each then gets 421)
for up to C{receiver_grace} seconds, and exits.  SIGINT is ignored (the
master, in the same process group, decides).  SIGHUP, which the master
passes on, makes it reload its TLS certificate and DKIM keys
(L{relay.app.reload.ReloadService}); an C{implicit-tls:} listener is served in
TLS by the receiver itself, with the C{tls_cert} and C{tls_key} files.
Without C{tls_cert} it does without pyOpenSSL
(L{relay.app._compat.keep_openssl_out}).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, Sequence

from twisted.logger import Logger
from zope.interface import implementer

import relay
from relay.app._compat import keep_openssl_out
from relay.app.build import Parts
from relay.app.channel import (
    CHANNEL_FD,
    FIRST_LISTENER_FD,
    HANDOVER_BYTES,
    SESSIONS_INTERVAL,
    StartMessage,
    encode_message,
    portable_event,
)
from relay.interfaces import ISpoolObserver
from relay.spool.observed import ObservedSpool


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
        # Small messages go along, so that the master delivers them
        # without reading back what was just written.
        messages: list[Any] = []
        for e in envelopes:
            message = e.envelope.message
            small = message.data is not None and len(message.data) <= HANDOVER_BYTES
            messages.append(message if small else None)
        self._send(dict(t="spooled", entries=list(entries), messages=messages))

    def quarantined(self, entries: Sequence[Any], reason: str) -> None:
        self._send(dict(t="quarantined", entries=list(entries), reason=reason))


class AcceptGate:
    """
    A receiver's share of C{--max-sessions}: once its open sessions reach
    C{share} it stops accepting (its listening ports stop reading), and
    starts again once one ends.

    The receivers accept from the same listening sockets, and which of
    them the kernel wakes for a connection is not even: a receiver that
    answered "421 too many connections" at its share would refuse clients
    while the others had room.  A paused receiver leaves its connections in
    the shared accept queue for the others; when every receiver is at its
    share the clients wait in the queue (as Postfix's do when every smtpd
    is busy) until a session ends.  The hard limit that answers 421 is the
    whole C{--max-sessions} (one receiver's factory can only pass its share
    by the few connections one accept batch takes after it filled up).

    @param ports: the listening ports (C{stopReading}/C{startReading}).
    """

    def __init__(self, share: int, ports: list[Any]) -> None:
        self.share = max(1, share)
        self.ports = ports
        self.paused = False

    def sessions_changed(self, n: int) -> None:
        if n >= self.share and not self.paused:
            self.paused = True
            for port in self.ports:
                port.stopReading()
        elif n < self.share and self.paused:
            self.paused = False
            for port in self.ports:
                port.startReading()


def session_share(max_sessions: int, receivers: int) -> int:
    """
    One receiver's share of C{max_sessions}, rounded up.
    """
    return -(-max_sessions // max(1, receivers))


class Receiver:
    """
    One receiving process: SMTP on the adopted sockets, mail into the
    spool, news to the master through C{send}.  Made complete (plugin,
    spool, SMTP server factory) by its constructor; L{start} listens.

    @param start: what the master said: the receiver's number, settings
        and sockets.
    @param send: writes one message (a JSON-able dict) to the master.
    @param fds: the file descriptors of the listening sockets.
    @param run_in_thread: where the spool's blocking work runs (a thread
        pool of the receiver's own by default).

    @raise relay.simple.CallbacksError: when the plugin cannot be made.
    @raise relay.smtp.tls.TLSFilesError: when the TLS files cannot be used.
    """

    def __init__(
        self,
        start: StartMessage,
        reactor: Any,
        send: Callable[[dict[str, Any]], None],
        fds: Sequence[int],
        run_in_thread: Callable[..., Any] | None = None,
    ) -> None:
        self.number = start.number
        self.settings = start.settings
        self.listeners = start.listeners
        self.reactor = reactor
        self.send = send
        self.fds = list(fds)
        self.grace = self.settings.receiver_grace
        self.log = Logger(namespace="relay.app.receiver")
        self.parts = Parts(
            self.settings, reactor, run_in_thread=run_in_thread,
            pool_name=f"relay-receiver-{self.number}",
        )  # fmt: skip
        # Receivers never deliver: no memory of what they wrote.
        disk = self.parts.disk_spool(remember=False)
        self.factory = self.parts.server_factory(
            ObservedSpool(disk, MasterReport(send)), on_rejected=lambda: send({"t": "rejected"})
        )
        # What SIGHUP reloads here (L{relay.app.reload.ReloadService}).
        self.reloadables: list[Any] = self.parts.reloadables
        self.ports: list[Any] = []
        self.gate = AcceptGate(
            session_share(self.settings.max_sessions, self.settings.receivers), self.ports
        )
        self.factory.on_sessions = self.gate.sessions_changed
        self._sessions_reported = 0
        self._sessions_loop: Any = None
        self.stopped: Any = None

    @property
    def run_in_thread(self) -> Callable[..., Any]:
        return self.parts.run_in_thread

    def start(self) -> None:
        """
        Listen on every adopted socket.
        """
        from twisted.internet.task import LoopingCall

        factory = self.factory
        if self.parts.thread_pool is not None:
            self.parts.thread_pool.start()
        for listener, fd in zip(self.listeners, self.fds, strict=True):
            served: Any = factory
            if listener.tls:
                from relay.smtp.tls import implicit_tls_needs_certificate, tls_factory

                if factory.settings.tls_context_factory is None:
                    raise ValueError(implicit_tls_needs_certificate(listener.endpoint))
                served = tls_factory(factory.settings.tls_context_factory, served)
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
        n = self.factory.sessions
        if n != self._sessions_reported:
            self._sessions_reported = n
            self.send({"t": "sessions", "n": n})

    def stop(self) -> Any:
        """
        Stop listening, let the open sessions finish the transactions they
        are in (up to the grace; L{SMTPServerFactory.drain<relay.smtp.server.SMTPServerFactory.drain>}),
        stop the thread pool.  Answer a Deferred that fires when done.
        """
        from twisted.internet import defer
        from twisted.internet.task import LoopingCall

        if self.stopped is not None:
            return self.stopped
        if self._sessions_loop is not None and self._sessions_loop.running:
            self._sessions_loop.stop()
        self.factory.on_sessions = None
        stopping = [defer.maybeDeferred(p.stopListening) for p in self.ports]
        self.factory.drain()
        del self.ports[:]
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self.reactor.seconds() + self.grace

        def check() -> None:
            n = self.factory.sessions
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
            pool = self.parts.thread_pool
            if pool is not None and pool.started:
                pool.stop()
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
            self.io.write(encode_message(message))

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



def _read_start(fd: int = 0) -> StartMessage:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("relay.app.receiver: no settings on stdin (run by the relay master)")
        data += chunk
    return StartMessage.from_line(data)


def main(argv: Sequence[str] | None = None) -> int:
    """
    The receiver process: read the start message, serve until SIGTERM or
    the master's end.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until the reload service takes SIGHUP over: its default would end us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    start_message = _read_start()
    if start_message.version != relay.__version__:
        raise SystemExit(
            f"relay.app.receiver: this is relay {relay.__version__}, its master"
            f" {start_message.version}: restart the relay after an upgrade"
        )
    for entry in reversed(start_message.path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if start_message.settings.tls_cert is None:
        # Before the reactor: Twisted's TCP transport then comes without
        # pyOpenSSL, some 13 MB less.
        keep_openssl_out()
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    from twisted.logger import globalLogBeginner

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

    def forward(event: dict[str, Any]) -> None:
        try:
            channel.send({"t": "log", "event": portable_event(event)})
        except Exception:
            pass

    globalLogBeginner.beginLoggingTo([forward], redirectStandardIO=False)  # type: ignore[list-item]
    fds = [FIRST_LISTENER_FD + i for i in range(len(start_message.listeners))]
    exit_code = [0]
    running: list[Receiver] = []
    reloading: list[Any] = []

    def start() -> None:
        from relay.app.heap import settle_startup_heap
        from relay.app.reload import ReloadService

        try:
            receiver = Receiver(start_message, reactor, channel.send, fds)
            running.append(receiver)
            # Before the master hears we listen (and may pass SIGHUP on).
            service = ReloadService(receiver.reloadables, reactor, receiver.run_in_thread)
            service.startService()
            reloading.append(service)
            receiver.start()
            settle_startup_heap()
        except Exception:
            # Not serving: exit, so that the master sees it (and retries
            # after its backoff) rather than a receiver that does nothing.
            Logger(namespace="relay.app.receiver").failure(
                "Receiver {n} cannot start", n=start_message.number
            )
            exit_code[0] = 1
            stop_once()

    reactor.callWhenRunning(start)

    def shutdown() -> Any:
        from twisted.internet import defer

        for service in reloading:
            service.stopService()
        d = running[0].stop() if running else defer.succeed(None)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv))
