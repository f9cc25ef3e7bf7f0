"""
The core of an ESMTP session: L{SMTPServerProtocol} owns the connection
and what flows over it, and hands each command line to the session's
parts, one module each:

  - L{relay.smtp.commands}: command dispatch, HELO/EHLO and the commands
    that need no state (NOOP, RSET, QUIT, ...);
  - L{relay.smtp.transaction}: MAIL, RCPT, DATA and BDAT, up to the
    message in the spool and the plugin's C{process_envelope};
  - L{relay.smtp.auth}: AUTH PLAIN and LOGIN, with the brute-force delay;
  - L{relay.smtp.starttls}: STARTTLS and implicit TLS;
  - L{relay.smtp.timers}: the idle timeout and the per-command deadline.

The core keeps what they share: the L{Session}, the session's state (one
L{Mode}), the framing of the input (command lines, DATA up to its end
marker, BDAT chunks by count), flow control, the protocol-error limit, and
how a command that waits (on a callback, on the spool) holds the input
back.
"""

from __future__ import annotations

import dataclasses
import inspect
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Protocol

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.model.entry import new_id
from relay.model.reply import Reply
from relay.model.results import Accept, Disconnect
from relay.model.session import Session
from relay.smtp import eager
from relay.smtp.auth import Authentication
from relay.smtp.bdat import ChunkReader
from relay.smtp.callbacks import LOG_NAMESPACE, SessionLogger, call_callback
from relay.smtp.commands import Commands
from relay.smtp.data import DataReader
from relay.smtp.starttls import StartTLS, TLSState
from relay.smtp.timers import SessionTimers
from relay.smtp.transaction import MailTransaction

if TYPE_CHECKING:
    from relay.smtp.server import ServerSettings, SMTPServerFactory

MAX_LINE = 512
# Input waiting while a command is pending: past this the transport is
# paused, so that a client pipelining without reading cannot grow memory.
MAX_PENDING_INPUT = 64 * 1024
# Replies that mean the client spoke bad SMTP (not a policy refusal); after
# MAX_PROTOCOL_ERRORS of them the session is closed, as Postfix's
# smtpd_hard_error_limit does.
PROTOCOL_ERRORS = frozenset({500, 501, 502, 503, 504, 555})
MAX_PROTOCOL_ERRORS = 20

_log = Logger(namespace=LOG_NAMESPACE)

_LINE_TOO_LONG = Reply.syntax_error("5.5.2 Line too long")
_BARE_CR = Reply.syntax_error("5.5.2 Bare CR not allowed in commands")
_BAD_UTF8 = Reply.syntax_error("5.5.2 Invalid UTF-8 in command")


class BodyReader(Protocol):
    """
    What reads a message's bytes off the input in DATA or CHUNK mode
    (L{DataReader}, L{ChunkReader}).
    """

    def feed(self, data: bytes) -> bytes | None:
        """
        Take C{data}; C{None} while the body goes on, else the input past
        its end (for the commands).
        """


class Mode(Enum):
    """
    What the session does with the client's input: the state of a
    session, one value rather than flags that must agree with each other.
    The transitions::

        GREETING --session_connect accepts: 220--> COMMAND
        GREETING --input arrives--> PREGREET --session_connect accepts--> CLOSED (554)
        COMMAND --a command that waits--> WAITING --it is done--> COMMAND
        COMMAND --an unfinished line past MAX_LINE: 500--> DISCARDING --its end--> COMMAND
        COMMAND --DATA: 354--> DATA --end of data--> WAITING (the message is finished)
        COMMAND --BDAT n (n > 0)--> CHUNK --n bytes read--> WAITING (the chunk's reply)
        any --QUIT, a refusal, a limit, a timeout, the connection lost--> CLOSED

    A command is the next line in COMMAND mode; after a 334 challenge of
    AUTH it is the client's response instead (L{expect_response}).
    Orthogonal to the mode: flow control (L{SMTPServerProtocol}'s three
    reasons to stop reading) and TLS (L{relay.smtp.starttls.TLSState}).
    """

    #: C{session_connect} is pending: input is early (a spambot's habit).
    GREETING = "greeting"
    #: Input came before the greeting: refused once the greeting is due.
    PREGREET = "pregreet"
    #: Reading command lines.
    COMMAND = "command"
    #: Skipping the rest of a line that is too long.
    DISCARDING = "discarding"
    #: Reading the message, up to the end-of-data marker.
    DATA = "data"
    #: Reading a BDAT chunk: raw bytes, up to its announced size.
    CHUNK = "chunk"
    #: A command waits (on a callback, the spool, the AUTH delay): input waits.
    WAITING = "waiting"
    #: Closing or closed: nothing more is read or written.
    CLOSED = "closed"


# The hot path compares modes with "is" against these (an enum class's
# attribute costs four times a global's).
_GREETING = Mode.GREETING
_PREGREET = Mode.PREGREET
_COMMAND = Mode.COMMAND
_DISCARDING = Mode.DISCARDING
_DATA = Mode.DATA
_CHUNK = Mode.CHUNK
_WAITING = Mode.WAITING
_CLOSED = Mode.CLOSED
_TLS_HANDSHAKE = TLSState.HANDSHAKE


@implementer(IPushProducer, IHandshakeListener, IHalfCloseableProtocol)
class SMTPServerProtocol(protocol.Protocol):
    """
    One ESMTP session: the connection, the framing of command lines, flow
    control, the error limit, and the session's parts (see the module
    docstring) that answer the commands.

    It is the push producer of its own transport: while the client does not
    read our replies (and they fill the transport's buffer) its commands
    wait unprocessed, and past L{MAX_PENDING_INPUT} of them we stop reading,
    so that a client pipelining without reading cannot make us buffer
    replies without end.  (Reading goes on below that: a TLS layer pauses
    us during its handshake, which needs to read.)  Reading also stops
    while the spool's message writer asks it to.

    A client may shut down its sending side once it has sent everything
    (Exim does, after pipelining QUIT behind the message): what it sent is
    still answered, then the session ends (L{readConnectionLost}).

    @ivar factory: the server.
    @ivar settings: the server's settings.
    @ivar session: what the plugin is told about the session.
    @ivar log: the logger of the session, or of the current envelope; the
        plugin's callbacks get it.
    @ivar commands: dispatch, HELO/EHLO and the stateless commands.
    @ivar mail: the mail transaction.
    @ivar auth: AUTH.
    @ivar starttls: STARTTLS and the TLS state.
    @ivar timers: the idle timeout and the command deadline.
    """

    # A TCP or TLS transport: also a push producer with startTLS and getHandle.
    transport: Any

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self.settings: ServerSettings = factory.settings
        self.session = Session(id=new_id()[:10])
        self.log: Logger = _log
        self._session_log: Logger = _log
        self._mode = _GREETING
        self._buffer = b""
        # The message (DATA mode) or the chunk (CHUNK mode) being read,
        # and what runs once it is.
        self._reader: BodyReader | None = None
        self._end_of_body: Callable[[], Coroutine[Any, Any, None]] | None = None
        # Where the next line goes instead of the commands: the client's
        # response to an AUTH challenge.
        self._response_handler: Callable[[str], Any] | None = None
        # _process is not re-entrant (see there).
        self._processing = False
        # Whether this session holds one of the factory's max_sessions.
        self._counted = False
        self._protocol_errors = 0
        # The client shut down its sending side: nothing more will come.
        self._input_ended = False
        # Flow control: we are the transport's producer (_producing); it
        # paused us (_output_full); reading from it is paused while the
        # spool's writer asks (_writer_full) or too much input waits
        # (_input_full).
        self._producing = False
        self._output_full = False
        self._writer_full = False
        self._input_full = False
        self.timers = SessionTimers(
            factory.clock,
            self.settings.idle_timeout,
            self.settings.command_deadline,
            on_idle=self._timed_out,
            on_deadline=self._deadline_passed,
        )
        self.starttls = StartTLS(self)
        self.mail = MailTransaction(self)
        self.auth = Authentication(self)
        self.commands = Commands(self)

    # -- for the session's parts -----------------------------------------

    @property
    def mode(self) -> Mode:
        """
        The session's state.
        """
        return self._mode

    @property
    def closed(self) -> bool:
        """
        Whether the session is closing or closed.
        """
        return self._mode is _CLOSED

    def reply(self, reply: Reply) -> None:
        """
        Send C{reply}, unless the session is closed; the
        L{MAX_PROTOCOL_ERRORS}th reply that says the client spoke bad SMTP
        closes it.
        """
        if self._mode is _CLOSED:
            return
        eager.write(self.transport, reply.to_bytes())
        if reply.code in PROTOCOL_ERRORS:
            self._protocol_errors += 1
            if self._protocol_errors >= MAX_PROTOCOL_ERRORS:
                self.log.warn("too many errors from {remote}", remote=self.session.remote_host)
                self.mail.abort_message()
                self.close(
                    Reply.service_unavailable(
                        f"4.7.0 {self.settings.hostname} Error: too many errors"
                    )
                )

    def close(self, reply: Reply | None = None) -> None:
        """
        Send C{reply} (if any) and close the connection: no more input is
        read, no more replies are sent.
        """
        if self._mode is _CLOSED:
            return
        if reply is not None:
            self.reply(reply)
        self._mode = _CLOSED
        # Nothing more is read: what waits would only hold memory.
        self._buffer = b""
        self._cancel_timers()
        if self._producing:
            # A transport does not close while a producer is registered.
            self._producing = False
            self.transport.unregisterProducer()
        if self.starttls.handshaking:
            # A client silent since it connected to an implicit-TLS port (or
            # since STARTTLS) cannot be sent a reply, and a clean TLS close
            # would wait for its handshake forever, holding the session.
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def synchronization_error(self, where: str) -> None:
        """
        The client sent input it had to wait for a reply before sending
        (RFC 5321 section 4.3.1, RFC 2920 section 3.1): what it sent cannot
        be trusted to be commands, so none of it runs.  Exim answers the
        same way.
        """
        self.log.warn(
            "SMTP synchronization error {where} from {remote}",
            where=where,
            remote=self.session.remote_host,
        )
        self._buffer = b""
        self.mail.abort_message()
        self.close(
            Reply.transaction_failed(f"5.5.0 SMTP synchronization error: input sent {where}")
        )

    def update_session(self, **changes: Any) -> None:
        """
        Replace fields of L{session} (a frozen value the plugin may keep).
        """
        self.session = dataclasses.replace(self.session, **changes)

    def callback(self, name: str, *args: Any) -> Deferred[Any]:
        """
        Call the plugin's callback C{name} with L{log} and C{args}.
        """
        return call_callback(getattr(self.factory.callbacks, name), self.log, *args)

    def log_envelope(self, envelope_id: str) -> None:
        """
        From now on L{log} names C{envelope_id} too.
        """
        self.log = self._make_log(envelope_id)

    def log_session(self) -> None:
        """
        From now on L{log} names the session only.  (The session's logger
        is made once: a L{Logger} per transaction costs.)
        """
        self.log = self._session_log

    def has_pending_input(self) -> bool:
        """
        Whether input waits unread (sent without waiting for our reply).
        """
        return bool(self._buffer)

    def discard_input(self) -> None:
        """
        Forget the input not read yet.
        """
        self._buffer = b""

    def expect_response(self, handler: Callable[[str], Any]) -> None:
        """
        The next line is not a command but the client's response to a
        challenge: give it to C{handler} (which may return a coroutine,
        run as a command is).
        """
        self._response_handler = handler

    def read_data(self, reader: DataReader) -> None:
        """
        Enter DATA mode: input goes to C{reader} until it sees the
        end-of-data marker, then the transaction finishes the message.
        """
        self._read_body(_DATA, reader, self.mail.end_of_data)

    def read_chunk(self, reader: ChunkReader) -> None:
        """
        Enter CHUNK mode: the next C{reader.remaining} bytes of input,
        whatever they hold, go to C{reader}; then its C{on_end} runs as a
        command does (input waits until it is done).  The chunk's bytes
        must arrive within the command deadline, as DATA's.
        """
        self._read_body(_CHUNK, reader, reader.on_end)

    def _read_body(
        self,
        mode: Mode,
        reader: BodyReader,
        end: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self._reader = reader
        self._end_of_body = end
        self._mode = mode
        self.timers.start_deadline()

    def pause_for_writer(self, drained: Callable[[], Deferred[Any]]) -> None:
        """
        The spool's message writer is full: stop reading until the
        L{Deferred} that C{drained} returns fires (or the message is
        aborted, L{writer_done}).
        """
        if self._writer_full:
            return
        self._writer_full = True
        self._set_producing()
        drained().addBoth(self._writer_drained)

    def writer_done(self) -> None:
        """
        The message writer is gone: reading no longer waits for it.
        """
        if self._writer_full:
            self._writer_full = False
            self._set_producing()

    def _writer_drained(self, result: object) -> None:
        self.writer_done()

    # -- plumbing ---------------------------------------------------------

    def _make_log(self, envelope_id: str | None = None) -> SessionLogger:
        fields: dict[str, Any] = {"session_id": self.session.id}
        if envelope_id is not None:
            fields["envelope_id"] = envelope_id
        return SessionLogger(LOG_NAMESPACE, fields, source=self)

    def _cancel_timers(self) -> None:
        self.timers.cancel()
        self.auth.cancel_delay()

    def _set_producing(self) -> None:
        """
        Pause reading from the client while the message writer asks us to
        (C{_writer_full}) or too much input waits (C{_input_full}).
        """
        if self._mode is _CLOSED:
            return
        if self._writer_full or self._input_full:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def _check_pending_input(self) -> None:
        full = (self._mode is _WAITING or self._output_full) and len(
            self._buffer
        ) > MAX_PENDING_INPUT
        if full != self._input_full:
            self._input_full = full
            self._set_producing()

    def _timeout_reply(self) -> Reply:
        return Reply.service_unavailable(f"4.4.2 {self.settings.hostname} Error: timeout exceeded")

    def _timed_out(self) -> None:
        self.log.info("session timed out")
        self.mail.abort_message()
        self.close(self._timeout_reply())

    def _deadline_passed(self) -> None:
        self.log.info("command deadline exceeded")
        self.mail.abort_message()
        self.close(self._timeout_reply())

    # -- connection -------------------------------------------------------

    # IPushProducer, for the transport: see the class docstring.

    def pauseProducing(self) -> None:
        self._output_full = True

    def resumeProducing(self) -> None:
        self._output_full = False
        mode = self._mode
        if mode is _COMMAND or mode is _DISCARDING or mode is _DATA or mode is _CHUNK:
            self._process()
            self._check_pending_input()

    def stopProducing(self) -> None:
        pass

    # IHalfCloseableProtocol, for the transport.

    def readConnectionLost(self) -> None:
        """
        The client will send nothing more: answer what it sent, then close
        (see L{_end_if_input_done}).
        """
        self._input_ended = True
        self._end_if_input_done()

    def writeConnectionLost(self) -> None:
        # We never shut down our own side alone.
        pass

    def _end_if_input_done(self) -> None:
        """
        After the client's end of input: once what it sent has been read
        as far as it goes (no command waits on a callback, the client reads
        our replies), close; a message it did not finish is dropped.
        """
        if not self._input_ended or self._output_full:
            return
        mode = self._mode
        if mode is _CLOSED or mode is _WAITING or mode is _GREETING or mode is _PREGREET:
            # Closed already, or the rest comes once the callback answers.
            return
        self.mail.abort_message()
        self.close()

    def handshakeCompleted(self) -> None:
        # IHandshakeListener: the negotiated version and cipher are known.
        self.starttls.handshake_completed()

    def connectionMade(self) -> None:
        try:
            self.transport.registerProducer(self, True)
        except (AttributeError, RuntimeError):
            # A transport without producer support, or one that already has
            # a producer: replies are then buffered as before.
            pass
        else:
            self._producing = True
        self.session = Session(
            id=self.session.id, local=self.transport.getHost(), remote=self.transport.getPeer()
        )
        self.log = self._session_log = self._make_log()
        self.starttls.connection_made()
        f = self.factory
        if f.sessions >= self.settings.max_sessions:
            self.log.warn("too many connections from {remote}", remote=self.session.remote_host)
            self.close(
                Reply.service_unavailable(
                    f"4.7.0 {self.settings.hostname} Error: too many connections"
                )
            )
            return
        f.sessions += 1
        self._counted = True
        f.protocols.add(self)
        self.timers.reset_idle()
        d = self.callback("session_connect", self.session)
        d.addCallback(self._connected).addErrback(self._connect_failed)

    def _connected(self, result: object) -> None:
        if isinstance(result, Accept):
            if self._mode is _PREGREET:
                self.synchronization_error("before the greeting")
            elif self._mode is _GREETING:
                self.reply(Reply(220, result.greeting))
                self._resume()
        elif isinstance(result, Disconnect):
            self.close(result.reply or Reply.service_unavailable())
        else:
            raise TypeError(f"session_connect returned {result!r}")

    def _connect_failed(self, failure: Failure) -> None:
        self.log.failure("session_connect failed", failure)
        self.close(Reply.service_unavailable())

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._mode = _CLOSED
        self._cancel_timers()
        self.mail.abort_message()
        if self._counted:
            self._counted = False
            self.factory.sessions -= 1
            self.factory.protocols.discard(self)

    def dataReceived(self, data: bytes) -> None:
        mode = self._mode
        if mode is _CLOSED:
            return
        if self.starttls.state is _TLS_HANDSHAKE:
            # Data in TLS comes only after the handshake, whether or not the
            # transport says so through handshakeCompleted.  (Tested here:
            # a call per read costs.)
            self.starttls.handshake_completed()
        self.timers.reset_idle()
        if mode is _GREETING or mode is _PREGREET:
            # Talking before the greeting is a spambot's habit (Postfix's
            # postscreen "pregreet" test); the input is dropped unread and
            # refused once the greeting is due.
            self._mode = _PREGREET
            return
        self._buffer += data
        if mode is not _WAITING:
            self._process()
        if self._mode is _WAITING or self._output_full:
            self._check_pending_input()

    def _resume(self) -> None:
        """
        What the session waited for is done: read on.
        """
        if self._mode is _CLOSED:
            return
        self._mode = _COMMAND
        self.timers.reset_idle()
        self._process()
        self._check_pending_input()

    def end_if_draining(self) -> bool:
        """
        If the server drains (L{SMTPServerFactory.drain}) and this session
        is between mail transactions, waiting for a command, end it with
        421; answer whether it ended.
        """
        if (
            self.factory.draining
            and self._mode is _COMMAND
            and self.mail.transaction is None
            and self._response_handler is None
        ):
            self.close(
                Reply.service_unavailable(f"4.3.2 {self.settings.hostname} Service shutting down")
            )
            return True
        return False

    def _run(self, coro: Coroutine[Any, Any, Any]) -> None:
        """
        Run a command handler; while it is pending, input waits.
        """
        self._mode = _WAITING
        d = Deferred.fromCoroutine(coro)
        d.addErrback(self._command_failed)
        if d.called:
            # Done synchronously: the loop in _process goes on (no recursion,
            # so a long pipelined batch cannot exhaust the stack).
            if self._mode is _WAITING:
                self._mode = _COMMAND
            return
        # The idle timeout measures the client's silence; while a plugin
        # callback is pending the silence is ours.
        self.timers.pause_idle()
        d.addBoth(self._command_done)

    def _command_failed(self, failure: Failure) -> None:
        self.log.failure("command failed", failure)
        self.mail.reset()
        self.reply(Reply.local_error())

    def _command_done(self, result: object) -> None:
        self._resume()

    def _process(self) -> None:
        # Not re-entrant: a transport may resume us (resumeProducing) from
        # inside a write; the loop below then simply goes on.
        if self._processing:
            return
        self._processing = True
        try:
            self._process_input()
        finally:
            self._processing = False
        if self.factory.draining and self.end_if_draining():
            return
        self._end_if_input_done()

    def _process_input(self) -> None:
        while self._buffer and not self._output_full:
            mode = self._mode
            if mode is _DATA or mode is _CHUNK:
                reader, end = self._reader, self._end_of_body
                assert reader is not None and end is not None
                data, self._buffer = self._buffer, b""
                leftover = reader.feed(data)
                if leftover is None:
                    return
                self._buffer = leftover
                self._reader = self._end_of_body = None
                self.timers.stop_deadline()
                self._run(end())
                continue
            if mode is _DISCARDING:
                idx = self._buffer.find(b"\n")
                if idx < 0:
                    self._buffer = b""
                    return
                self._buffer = self._buffer[idx + 1 :]
                self._mode = _COMMAND
                self.timers.stop_deadline()
                continue
            if mode is not _COMMAND:
                # WAITING, CLOSED: input waits, or is dropped with the session.
                return
            if self.factory.draining and self.end_if_draining():
                return
            idx = self._buffer.find(b"\n")
            if idx < 0:
                if len(self._buffer) > MAX_LINE:
                    self._buffer = b""
                    self._mode = _DISCARDING
                    self.reply(_LINE_TOO_LONG)
                self.timers.start_deadline()
                return
            self.timers.stop_deadline()
            raw, self._buffer = self._buffer[: idx + 1], self._buffer[idx + 1 :]
            if len(raw) > MAX_LINE:
                self.reply(_LINE_TOO_LONG)
                continue
            line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if b"\r" in line:
                self.reply(_BARE_CR)
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                self.reply(_BAD_UTF8)
                continue
            handler = self._response_handler
            if handler is None:
                result = self.commands.dispatch(text)
            else:
                self._response_handler = None
                result = handler(text)
            if inspect.iscoroutine(result):
                self._run(result)
