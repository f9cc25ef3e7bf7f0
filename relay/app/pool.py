"""
The master's side of C{twistd relay --receivers N}: L{ReceiverPool} opens
the listening sockets of every C{--smtp} endpoint and runs N receiver
processes on them (C{python -m relay.app.receiver}), passes what they say
on (L{relay.app.channel}), restarts one that dies, passes SIGHUP on, and
stops them with the relay.

The master keeps the spool lock, recovery, the delivery scheduler, the
control endpoint and the metrics.  A message lost with a dying receiver
costs only latency: its entry is on disk, and the master rescans the
active queue when it restarts the receiver (C{on_restart}).

Each receiver's life is an explicit state machine (Automat, as Twisted's
C{ClientService}), since what an event means depends on where it is::

    idle --start--> starting --listening--> serving
    starting --reload--> starting, reload pending --listening--> serving (+ SIGHUP)
    starting, serving --ended--> waiting --restart (after the backoff)--> starting
    starting, serving --stop (SIGTERM)--> stopping --ended--> stopped
    waiting --stop--> stopped                      stopping --kill--> SIGKILL

The restart delay is L{RESTART_POLICY} of the number of quick deaths in a
row (Twisted's C{backoffPolicy}): a receiver that lived L{STABLE_AFTER}
seconds starts the count again.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from automat import TypeMachineBuilder
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.app.channel import (
    CHANNEL_FD,
    FIRST_LISTENER_FD,
    MAX_LINE,
    RECEIVER_MODULE,
    ChannelError,
    MessageReader,
    StartMessage,
    event_from_portable,
)
from relay.app.listener import Listener, open_listener
from relay.app.settings import Settings
from relay.interfaces import IReloadable

# Seconds before restarting a receiver that died after N quick deaths in a
# row (N from 0): 1 s doubling up to 60 s, without jitter (one machine).
RESTART_POLICY = backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0, jitter=lambda: 0.0)
# A receiver that ran this long was not dying quickly.
STABLE_AFTER = 60.0
# After its grace, a stopping receiver gets this long before SIGKILL.
KILL_AFTER_GRACE = 5.0


class ReceiverProcess(ProcessProtocol):
    """
    The master's L{IProcessProtocol} for one receiver process: writes it
    its start message, reads its messages and its stdout/stderr (as log
    text) and tells the pool.

    @ivar sessions: its open sessions, as it last said.
    """

    def __init__(self, pool: ReceiverPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.transport: Any = None
        self.started_at = 0.0
        self.sessions = 0
        self._buffers: dict[int, bytes] = {}
        self._channel = MessageReader()

    def connectionMade(self) -> None:
        self.transport.write(self.pool.start_message(self.number).to_line())

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == CHANNEL_FD:
            for message in self._channel.feed(data):
                self.pool.message(self, message)
            return
        buffer = self._buffers.get(fd, b"") + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > MAX_LINE:
            self.pool.log.error(
                "receiver {receiver}: line too long on fd {fd}; dropped", receiver=self.number, fd=fd
            )
            rest = b""
        self._buffers[fd] = rest
        for line in lines:
            if line.strip():
                self.pool.output(self, fd, line)

    def childConnectionLost(self, fd: int) -> None:
        rest = self._buffers.pop(fd, b"")
        if rest:
            self.childDataReceived(fd, rest + b"\n")

    def processEnded(self, reason: Failure) -> None:
        for fd in list(self._buffers):
            self.childConnectionLost(fd)
        self.pool.ended(self, reason)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except Exception as e:  # already gone
            self.pool.log.debug("signal {name} to receiver: {e}", name=name, e=e)


# -- one receiver's life -----------------------------------------------------


class _Life(Protocol):
    """
    What happens to one receiver (the inputs of its state machine).
    """

    def start(self) -> None:
        "Start its process."

    def listening(self) -> None:
        "Its process said it listens."

    def ended(self, reason: Failure) -> None:
        "Its process ended."

    def restart(self) -> None:
        "The wait after it died is over."

    def reload(self) -> str:
        "SIGHUP: answer C{told}, C{later} (once it listens) or C{""} (not running)."

    def stop(self) -> Deferred[None]:
        "Stop it; the Deferred fires once its process has ended."

    def kill(self) -> None:
        "It did not stop in time."


@dataclass
class _Receiver:
    """
    One receiver: its number, its process (while one runs) and what its
    machine remembers.
    """

    pool: ReceiverPool
    number: int
    process: ReceiverProcess | None = None
    restart_call: IDelayedCall | None = None
    quick_deaths: int = 0
    stop_waiters: list[Deferred[None]] = field(default_factory=list)


def _life_machine() -> Callable[[_Receiver], _Life]:
    machine = TypeMachineBuilder(_Life, _Receiver)
    idle = machine.state("idle")
    starting = machine.state("starting")
    reload_pending = machine.state("starting, reload pending")
    serving = machine.state("serving")
    waiting = machine.state("waiting")
    stopping = machine.state("stopping")
    stopped = machine.state("stopped")
    running = (starting, reload_pending, serving)

    @idle.upon(_Life.start).to(starting)
    @stopped.upon(_Life.start).to(starting)
    def spawn(life: _Life, r: _Receiver) -> None:
        r.pool.spawn(r)

    @waiting.upon(_Life.restart).to(starting)
    def respawn(life: _Life, r: _Receiver) -> None:
        r.restart_call = None
        r.pool.spawn(r)
        r.pool.restarted(r.number)

    @starting.upon(_Life.listening).to(serving)
    def listens(life: _Life, r: _Receiver) -> None:
        r.pool.log.info("Receiver {receiver} is listening", receiver=r.number)

    @reload_pending.upon(_Life.listening).to(serving)
    def listens_then_reloads(life: _Life, r: _Receiver) -> None:
        listens(life, r)
        # It may have read the files before they changed.
        assert r.process is not None
        r.process.signal("HUP")

    serving.upon(_Life.listening).loop().returns(None)
    for state in (idle, waiting, stopping, stopped):
        state.upon(_Life.listening).loop().returns(None)

    @serving.upon(_Life.reload).loop()
    def pass_sighup(life: _Life, r: _Receiver) -> str:
        assert r.process is not None
        r.process.signal("HUP")
        return "told"

    starting.upon(_Life.reload).to(reload_pending).returns("later")
    reload_pending.upon(_Life.reload).loop().returns("later")
    for state in (idle, waiting, stopping, stopped):
        state.upon(_Life.reload).loop().returns("")

    for state in running:

        @state.upon(_Life.ended).to(waiting)
        def died(life: _Life, r: _Receiver, reason: Failure) -> None:
            r.pool.died(r, reason, life.restart)

        @state.upon(_Life.stop).to(stopping)
        def terminate(life: _Life, r: _Receiver) -> Deferred[None]:
            assert r.process is not None
            r.process.signal("TERM")
            return _stop_waiter(r)

        state.upon(_Life.kill).loop().returns(None)

    @stopping.upon(_Life.ended).to(stopped)
    def finished(life: _Life, r: _Receiver, reason: Failure) -> None:
        r.pool.finished(r, reason)
        waiters, r.stop_waiters = r.stop_waiters, []
        for d in waiters:
            d.callback(None)

    stopping.upon(_Life.stop).loop()(lambda life, r: _stop_waiter(r))

    @stopping.upon(_Life.kill).loop()
    def kill(life: _Life, r: _Receiver) -> None:
        r.pool.log.warn("Receiver {receiver} did not stop in time: killing it", receiver=r.number)
        assert r.process is not None
        r.process.signal("KILL")

    @waiting.upon(_Life.stop).to(stopped)
    def cancel_restart(life: _Life, r: _Receiver) -> Deferred[None]:
        if r.restart_call is not None and r.restart_call.active():
            r.restart_call.cancel()
        r.restart_call = None
        return succeed(None)

    for state in (idle, stopped):
        state.upon(_Life.stop).loop()(lambda life, r: succeed(None))
    for state in (idle, waiting, stopped):
        state.upon(_Life.kill).loop().returns(None)

    return machine.build()


def _stop_waiter(r: _Receiver) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    r.stop_waiters.append(d)
    return d


_LIFE = _life_machine()


# -- the pool --------------------------------------------------------------------


@implementer(IReloadable)
class ReceiverPool(Service):
    """
    The master's service that runs C{count} receivers over the sockets of
    C{listeners}, restarting one that dies (after L{RESTART_POLICY}) and
    stopping them with the relay.  Its L{reload} passes SIGHUP on to them.

    @param settings: the settings receivers get (L{Settings.for_receivers}).
    @param on_spooled: called with the L{SpoolEntry}s a receiver enqueued.
    @param on_quarantined: called with quarantined entries and the reason.
    @param on_rejected: called when a receiver's policy rejected a message.
    @param on_restart: called when a receiver that died is restarted.
    @param remember: called with each entry a receiver spooled and its
        L{Message} when that came along (else C{None}), before
        C{on_spooled}: the master's spool keeps them for delivery.
    @param wait_for: a callable answering a Deferred to wait for before
        starting receivers (the spool's recovery).
    @param lock_fd: answers the descriptor of the spool's lock, which each
        receiver inherits (after the listening sockets), or C{None}.
    @param spawn: C{reactor.spawnProcess}'s signature; the reactor's by
        default.
    @param publisher: where receivers' log events go (the global log
        publisher by default).
    @param restart_policy: the delay before restarting a receiver, from
        the number of quick deaths before this one.
    """

    what = "receivers"

    def __init__(
        self,
        *,
        count: int,
        listeners: Sequence[Listener],
        settings: Settings,
        reactor: Any,
        on_spooled: Callable[[list[Any]], Any] = lambda entries: None,
        on_quarantined: Callable[[list[Any], str], Any] = lambda entries, reason: None,
        on_rejected: Callable[[], Any] = lambda: None,
        on_restart: Callable[[], Any] = lambda: None,
        remember: Callable[[Any, Any], Any] | None = None,
        wait_for: Callable[[], Any] | None = None,
        lock_fd: Callable[[], int | None] = lambda: None,
        spawn: Callable[..., Any] | None = None,
        executable: str = sys.executable,
        publisher: Callable[[dict[str, Any]], None] | None = None,
        grace: float = 30.0,
        restart_policy: Callable[[int], float] = RESTART_POLICY,
        log: Logger | None = None,
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
        self.lock_fd = lock_fd
        self._spawn = spawn
        self.executable = executable
        self.publisher = publisher
        self.grace = grace
        self.restart_policy = restart_policy
        self.log = log if log is not None else Logger(namespace="relay.app.pool")
        self.sockets: list[socket.socket] = []
        self.processes: dict[int, ReceiverProcess] = {}
        self._receivers = {n: _Receiver(self, n) for n in range(1, count + 1)}
        self._lives = {n: _LIFE(r) for n, r in self._receivers.items()}
        self.started: Deferred[Any] | None = None
        self.setName("receivers")

    # -- service ------------------------------------------------------------

    def _open_sockets(self) -> None:
        if not self.sockets:
            for listener in self.listeners:
                self.sockets.append(open_listener(listener))

    def privilegedStartService(self) -> None:
        # Bind before privileges are dropped, like twistd's own ports.
        self._open_sockets()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        self._open_sockets()
        Service.startService(self)
        d: Deferred[Any] = maybeDeferred(self.wait_for) if self.wait_for else succeed(None)

        def start(_: object) -> None:
            if not self.running:
                return
            for listener, sock in zip(self.listeners, self.sockets, strict=True):
                self.log.info(
                    "Receivers listen on {endpoint} ({host} port {port})",
                    endpoint=listener.endpoint, host=sock.getsockname()[0],
                    port=sock.getsockname()[1],
                )  # fmt: skip
            for life in self._lives.values():
                life.start()

        d.addCallback(start)
        d.addErrback(lambda f: self.log.failure("Cannot start the receivers", f))
        self.started = d

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        done = DeferredList([life.stop() for life in self._lives.values()])
        kill = self.reactor.callLater(self.grace + KILL_AFTER_GRACE, self._kill)

        def finished(result: object) -> object:
            if kill.active():
                kill.cancel()
            self._close_sockets()
            return result

        return done.addBoth(finished)

    def _kill(self) -> None:
        for life in self._lives.values():
            life.kill()

    def _close_sockets(self) -> None:
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            sock.close()

    # -- what the machines do ---------------------------------------------------

    def start_message(self, number: int) -> StartMessage:
        return StartMessage(number=number, settings=self.settings, listeners=self.listeners)

    def spawn(self, receiver: _Receiver) -> None:
        """
        Start receiver C{receiver.number}'s process on the sockets.
        """
        import relay

        number = receiver.number
        process = ReceiverProcess(self, number)
        process.started_at = self.reactor.seconds()
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", CHANNEL_FD: "r"}
        for i, sock in enumerate(self.sockets):
            child_fds[FIRST_LISTENER_FD + i] = sock.fileno()
        lock = self.lock_fd()
        if lock is not None:
            child_fds[FIRST_LISTENER_FD + len(self.sockets)] = lock
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(relay.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        argv = [self.executable, "-m", RECEIVER_MODULE, str(number)]
        receiver.process = self.processes[number] = process
        spawn = self._spawn if self._spawn is not None else self.reactor.spawnProcess
        spawn(process, self.executable, argv, env=env, childFDs=child_fds)
        pid = getattr(process.transport, "pid", None)
        self.log.info("Receiver {receiver} started (pid {pid})", receiver=number, pid=pid)

    def died(self, receiver: _Receiver, reason: Failure, restart: Callable[[], None]) -> None:
        """
        Receiver C{receiver} died: call C{restart} after the backoff.
        """
        process = self._forget(receiver)
        lived = self.reactor.seconds() - process.started_at
        receiver.quick_deaths = 1 if lived >= STABLE_AFTER else receiver.quick_deaths + 1
        delay = self.restart_policy(receiver.quick_deaths - 1)
        self.log.error(
            "Receiver {receiver} died ({why}); restarting it in {delay} s",
            receiver=receiver.number, why=reason.getErrorMessage(), delay=delay,
        )  # fmt: skip
        receiver.restart_call = self.reactor.callLater(delay, restart)

    def restarted(self, number: int) -> None:
        try:
            self.on_restart()
        except Exception:
            self.log.failure("After restarting receiver {receiver}", receiver=number)

    def finished(self, receiver: _Receiver, reason: Failure) -> None:
        """
        Receiver C{receiver} stopped as asked.
        """
        self._forget(receiver)
        self.log.info(
            "Receiver {receiver} stopped: {why}",
            receiver=receiver.number, why=reason.getErrorMessage(),
        )  # fmt: skip

    def _forget(self, receiver: _Receiver) -> ReceiverProcess:
        process, receiver.process = receiver.process, None
        assert process is not None
        self.processes.pop(receiver.number, None)
        return process

    # -- from the receivers ------------------------------------------------------

    def sessions(self) -> int:
        """
        The open SMTP sessions of all receivers, as they last said.
        """
        return sum(p.sessions for p in self.processes.values())

    def reload(self, run_in_thread: Any) -> Deferred[str]:
        """
        L{IReloadable}: send SIGHUP to every receiver, which reloads its own
        files and logs how it went.  One still starting gets it once it
        says it is listening: it may have read the files before they
        changed.
        """
        answers = {number: life.reload() for number, life in sorted(self._lives.items())}
        told = [str(n) for n, answer in answers.items() if answer == "told"]
        later = [str(n) for n, answer in answers.items() if answer == "later"]
        if not told and not later:
            return succeed("No receiver runs: each reads the files when it starts")
        parts = []
        if told:
            parts.append(f"SIGHUP passed on to receivers {', '.join(told)}")
        if later:
            parts.append(f"receivers {', '.join(later)} get it once they are listening")
        text = "; ".join(parts)
        return succeed(text[0].upper() + text[1:])

    def ended(self, process: ReceiverProcess, reason: Failure) -> None:
        life = self._lives.get(process.number)
        if life is not None and self._receivers[process.number].process is process:
            life.ended(reason)

    def message(self, process: ReceiverProcess, data: dict[str, Any] | ChannelError) -> None:
        """
        One message from receiver C{process} (see L{relay.app.channel}).
        """
        try:
            if isinstance(data, ChannelError):
                raise data
            kind = data["t"]
            if kind == "log":
                self._log_event(process, data["event"])
            elif kind == "spooled":
                entries = data["entries"]
                if self.remember is not None:
                    messages = data.get("messages") or [None] * len(entries)
                    for entry, message in zip(entries, messages, strict=True):
                        self.remember(entry, message)
                self.on_spooled(entries)
            elif kind == "quarantined":
                self.on_quarantined(data["entries"], str(data["reason"]))
            elif kind == "rejected":
                self.on_rejected()
            elif kind == "sessions":
                process.sessions = int(data["n"])
            elif kind == "listening":
                life = self._lives.get(process.number)
                if life is not None and self._receivers[process.number].process is process:
                    life.listening()
            else:
                raise ValueError(f"unknown message {kind!r}")
        except Exception:
            self.log.failure(
                "Bad message from receiver {receiver}: {message!r}",
                receiver=process.number, message=str(data)[:200],
            )  # fmt: skip

    def _log_event(self, process: ReceiverProcess, event: dict[str, Any]) -> None:
        from twisted.logger import globalLogPublisher

        event = event_from_portable(event)
        event["receiver"] = process.number
        level = event["log_level"].name
        namespace = event.get("log_namespace", "-")
        event["log_system"] = f"receiver-{process.number} {namespace}#{level}"
        (self.publisher or globalLogPublisher)(event)

    def output(self, process: ReceiverProcess, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if fd == 2:
            self.log.warn("receiver {receiver} stderr: {line}", receiver=process.number, line=text)
        else:
            self.log.info("receiver {receiver} stdout: {line}", receiver=process.number, line=text)
