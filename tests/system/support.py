"""
Helpers of the system suites (C{tests.system.crash}, C{tests.system.interop}):
the real C{twistd relay} as a subprocess that can be killed and restarted on
the same spool, a recording SMTP sink on loopback, and a small SMTP client
that sends a message in chunks, all on the test's reactor.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Any, Callable, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from tests.test_integration import ROOT, files_under, free_port, listening

__all__ = [
    "ROOT",
    "ClientSession",
    "RelayProcess",
    "SinkFactory",
    "SinkMessage",
    "connect",
    "files_under",
    "free_port",
    "listening",
    "message_id",
    "pause",
    "poll",
    "received_prefix_ok",
    "stuff",
]

POLL = 0.05


def pause(seconds: float = 0.0) -> Deferred[None]:
    """
    A Deferred that fires after C{seconds} on the global reactor (0: the
    next reactor iteration).
    """
    return deferLater(reactor, seconds, lambda: None)


async def poll(
    condition: Callable[[], Any], what: str, timeout: float, interval: float = POLL
) -> Any:
    """
    Check C{condition} every C{interval} seconds until it is true; raise
    L{AssertionError} after C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while True:
        result = condition()
        if result:
            return result
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pause(interval)


class RelayProcess:
    """
    The real C{twistd -n relay} on a fixed loopback port and spool, which
    can be killed (SIGKILL) and started again any number of times; its
    output, all generations together, goes to C{log}.
    """

    def __init__(
        self, base: str, port: int, extra: Sequence[str] = (), spool: str | None = None
    ) -> None:
        self.base = base
        self.port = port
        self.spool = spool or os.path.join(base, "spool")
        self.quarantine = os.path.join(base, "quarantine")
        self.log = os.path.join(base, "relay.log")
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None
        self.generation = 0

    def argv(self) -> list[str]:
        return [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=",
            "relay",
            "--smtp", f"tcp:{self.port}:interface=127.0.0.1",
            "--spool", self.spool,
            "--quarantine", self.quarantine,
            "--control", "unix:" + os.path.join(self.base, "ctl.sock"),
            "--hostname", "relay.test",
            *self.extra,
        ]  # fmt: skip

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "still running"
        self.generation += 1
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        with open(self.log, "ab") as out:
            out.write(f"==== generation {self.generation}\n".encode())
            out.flush()
            # In a process group of its own, which kill(group=True) ends.
            self.process = subprocess.Popen(
                self.argv(), cwd=self.base, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, group: bool = False) -> None:
        """
        SIGKILL the relay and reap it.  With C{group}, its whole process
        group (its receivers too, as systemd or a power cut would): once
        this returns, its spool lock and listening socket are gone.
        Without, only the master: its receivers finish the transactions
        they are in and hold the spool's lock until they exit.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.send_signal(signal.SIGKILL)
        process.wait(30)

    async def stop(self, timeout: float = 10.0) -> None:
        """
        Stop the relay with SIGTERM, SIGKILL after C{timeout} seconds.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await poll(lambda: process.poll() is not None, "twistd to stop", timeout)
        except AssertionError:
            self.kill()

    def output(self) -> str:
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    async def wait_listening(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            process = self.process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise AssertionError(f"twistd exited with {code}:\n{self.tail()}")
            return listening(self.port)

        await poll(ready, f"twistd to listen on {self.port}", timeout)


# -- the recording sink ------------------------------------------------------

_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*<([^>\r\n]+)>", re.IGNORECASE | re.MULTILINE)


def message_id(data: bytes) -> str | None:
    """
    The Message-ID (without angle brackets) in the header section of
    C{data}, or C{None}.
    """
    header = data.split(b"\r\n\r\n", 1)[0]
    match = _MESSAGE_ID.search(header)
    return match.group(1).decode("ascii", "replace") if match else None


def received_prefix_ok(prefix: bytes) -> bool:
    """
    Whether C{prefix}, what the relay put before a message's own bytes,
    is exactly one C{Received} header (with its continuation lines).
    """
    if not prefix.endswith(b"\r\n"):
        return False
    lines = prefix[:-2].split(b"\r\n")
    return lines[0].startswith(b"Received: ") and all(
        line[:1] in (b" ", b"\t") for line in lines[1:]
    )


class SinkMessage:
    """
    One message the sink acknowledged: its bytes (dot-unstuffed, CRLF line
    ends), its Message-ID, and C{tag}, what L{SinkFactory.tag} said when
    the connection it came on was made.
    """

    def __init__(self, data: bytes, tag: Any) -> None:
        self.data = data
        self.message_id = message_id(data)
        self.tag = tag


class SinkProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20
    factory: SinkFactory

    def connectionMade(self) -> None:
        self.in_data = False
        self.dead = False
        self.lines: list[bytes] = []
        self.tag = self.factory.tag()
        self.factory.connections.add(self)
        self.sendLine(b"220 sink.test ESMTP recording sink")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.connections.discard(self)
        self.lines = []

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendLine(b"500 5.5.0 line too long")
        self.transport.loseConnection()  # type: ignore[union-attr]

    def kill(self) -> None:
        """
        Drop the connection at once and ignore whatever is still buffered.
        """
        self.dead = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    def lineReceived(self, line: bytes) -> None:
        if self.dead:
            return
        if self.in_data:
            if line == b".":
                self.in_data = False
                data = b"".join(part + b"\r\n" for part in self.lines)
                self.lines = []
                self.factory.end_of_data(self, data)
                return
            self.lines.append(line[1:] if line.startswith(b".") else line)
            self.factory.data_line(self, len(self.lines))
            return
        verb = line.split(b" ", 1)[0].upper()
        if verb in (b"EHLO", b"HELO"):
            self.sendLine(b"250 sink.test")
        elif verb == b"MAIL":
            self.sendLine(self.factory.mail_reply)
        elif verb in (b"RCPT", b"RSET", b"NOOP"):
            self.sendLine(b"250 2.0.0 OK")
        elif verb == b"DATA":
            self.in_data = True
            self.lines = []
            self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.sendLine(b"500 5.5.2 unknown command")

    def acknowledge(self, data: bytes) -> None:
        """
        Record C{data} as delivered and say 250: from now on the sink has it.
        """
        if self.dead or not self.connected:
            return
        self.factory.received.append(SinkMessage(data, self.tag))
        self.sendLine(b"250 2.0.0 recorded")


class SinkFactory(ServerFactory):
    """
    A next hop that records every message it says 250 to.

    @ivar mail_reply: the reply to MAIL FROM (set it to a 4xx line to make
        the sink refuse mail for a while).
    @ivar on_data_line: called with (protocol, number of lines so far)
        for every line of message data.
    @ivar on_end_of_data: called with (protocol, data) at the end of the
        data; it must eventually call C{protocol.acknowledge(data)} (or let
        the connection die); the default acknowledges at once.
    @ivar tag: called when a connection is made; its result is kept as
        the L{SinkMessage.tag} of every message acknowledged on it.
    """

    protocol = SinkProtocol  # type: ignore[assignment]

    def __init__(self) -> None:
        self.received: list[SinkMessage] = []
        self.connections: set[SinkProtocol] = set()
        self.mail_reply = b"250 2.1.0 OK"
        self.on_data_line: Callable[[SinkProtocol, int], None] | None = None
        self.on_end_of_data: Callable[[SinkProtocol, bytes], None] | None = None
        self.tag: Callable[[], Any] = lambda: None

    def data_line(self, proto: SinkProtocol, count: int) -> None:
        if self.on_data_line is not None:
            self.on_data_line(proto, count)

    def end_of_data(self, proto: SinkProtocol, data: bytes) -> None:
        if self.on_end_of_data is not None:
            self.on_end_of_data(proto, data)
        else:
            proto.acknowledge(data)

    def listen(self) -> Any:
        """
        Listen on an ephemeral loopback port; return the listening port.
        """
        return reactor.listenTCP(0, self, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]

    def close(self) -> None:
        """
        Drop every connection at once.
        """
        for proto in list(self.connections):
            proto.kill()


# -- the client ---------------------------------------------------------------


class ClientSession(LineReceiver):
    """
    The client side of one SMTP session, driven with C{await reply()} and
    C{command()}; a lost connection makes them raise L{ConnectionDone}.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 16

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._replies: list[tuple[int, str]] = []
        self._waiting: Deferred[tuple[int, str]] | None = None
        self.lost: Failure | None = None

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)
        if len(line) >= 4 and line[3:4] == b"-":
            return
        try:
            code = int(line[:3])
        except ValueError:
            code = 0
        text = b"\n".join(self._lines).decode("utf-8", "replace")
        self._lines = []
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback((code, text))
        else:
            self._replies.append((code, text))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason = reason or Failure(ConnectionDone())
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(ConnectionDone(f"connection lost: {reason.getErrorMessage()}"))

    def reply(self, timeout: float = 60.0) -> Deferred[tuple[int, str]]:
        if self._replies:
            return Deferred.fromCoroutine(_value(self._replies.pop(0)))
        if self.lost is not None:
            return Deferred.fromCoroutine(_raise(ConnectionDone("connection lost")))
        d: Deferred[tuple[int, str]] = Deferred()
        self._waiting = d
        d.addTimeout(timeout, reactor)
        return d

    def command(self, line: str, timeout: float = 60.0) -> Deferred[tuple[int, str]]:
        if self.lost is None:
            self.sendLine(line.encode("utf-8"))
        return self.reply(timeout)

    def write(self, data: bytes) -> None:
        if self.lost is None:
            self.transport.write(data)  # type: ignore[union-attr]

    def close(self) -> None:
        if self.lost is None:
            self.transport.abortConnection()  # type: ignore[union-attr]


async def _value(value: Any) -> Any:
    return value


async def _raise(exc: Exception) -> Any:
    raise exc


async def connect(port: int, timeout: float = 10.0) -> ClientSession:
    """
    Connect a L{ClientSession} to C{127.0.0.1:port}.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=timeout)
    proto: ClientSession = await connectProtocol(endpoint, ClientSession())
    return proto


def stuff(message: bytes) -> bytes:
    """
    C{message} (CRLF line ends, ending with CRLF) dot-stuffed for DATA.
    """
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed
