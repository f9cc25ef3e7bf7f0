"""
The ESMTP server: L{SMTPServerFactory} and L{SMTPServerProtocol}.

Every decision is made by an L{IServerCallbacks} plugin; accepted mail is
written to an L{ISpool}.  Time comes from an injected C{IReactorTime}.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import errno
import inspect
import re
from email.utils import formatdate
from typing import Any, Callable, Coroutine

from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    INegotiated,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.model.address import AddressError, EmailAddress, Sender
from relay.model.argument import (
    Argument,
    ArgumentError,
    find,
    parse_mail_parameters,
    parse_rcpt_parameters,
)
from relay.model.entry import new_id
from relay.model.envelope import Envelope
from relay.model.message import MAX_HEADER_BYTES, header_section, parse_header_block
from relay.model.reply import Reply
from relay.model.results import (
    Accept,
    Allow,
    Consume,
    Continue,
    Deny,
    Disconnect,
    Quarantine,
    Reject,
    Send,
)
from relay.model.session import Session, TLSInfo
from relay.smtp import eager
from relay.smtp.data import DataReader

MAX_LINE = 512
MAX_RECEIVED = 50
# Input waiting while a command is pending: past this the transport is
# paused, so that a client pipelining without reading cannot grow memory.
MAX_PENDING_INPUT = 64 * 1024
# Replies that mean the client spoke bad SMTP (not a policy refusal); after
# MAX_PROTOCOL_ERRORS of them the session is closed, as Postfix's
# smtpd_hard_error_limit does.
PROTOCOL_ERRORS = frozenset({500, 501, 502, 503, 504, 555})
MAX_PROTOCOL_ERRORS = 20

_MAIL = re.compile(r"^FROM: ?(<[^>]*>)(?: +(.*))?$", re.I | re.S)
_RCPT = re.compile(r"^TO: ?(<[^>]*>)(?: +(.*))?$", re.I | re.S)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_log = Logger(namespace="relay.smtp.server")


def _is_tls(transport: Any) -> bool:
    """
    Is C{transport} TLS already?  Twisted's C{ssl:} transports provide
    L{ISSLTransport}; a L{twisted.protocols.tls.TLSMemoryBIOProtocol} over
    any transport (C{implicit-tls:}, or another TLS endpoint), only
    L{INegotiated}.
    """
    return ISSLTransport.providedBy(transport) or INegotiated.providedBy(transport)


class SessionLogger(Logger):
    """
    A L{Logger} whose events carry extra fields (C{session_id},
    C{envelope_id}).
    """

    def __init__(self, namespace: str, fields: dict[str, Any], source: object = None) -> None:
        super().__init__(namespace=namespace, source=source)
        self.fields = dict(fields)

    def emit(self, level: Any, format: str | None = None, **kwargs: Any) -> None:  # noqa: A002
        for key, value in self.fields.items():
            kwargs.setdefault(key, value)
        if format is not None:
            # The text log names the session (and envelope), Postfix-style, so
            # that grep finds a whole mail flow; the fields stay structured.
            ids = " ".join(
                f"{key}={{{key}}}" for key in ("session_id", "envelope_id") if key in kwargs
            )
            if ids:
                format = f"[{ids}] {format}"
        super().emit(level, format, **kwargs)


def call_callback(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    Call a plugin callback and normalize its result (a value, a
    L{Deferred} or a coroutine) to a L{Deferred}.
    """

    def normalize(result: Any) -> Any:
        if inspect.iscoroutine(result):
            return Deferred.fromCoroutine(result)
        return result

    return defer.maybeDeferred(fn, *args).addCallback(normalize)


class SMTPServerFactory(protocol.Factory):
    """
    Makes L{SMTPServerProtocol}s sharing one plugin, spool and settings.

    @ivar sessions: the number of open sessions.
    """

    def __init__(
        self,
        callbacks: Any,
        spool: Any,
        clock: Any,
        hostname: str = "localhost",
        max_message_size: int = 35_000_000,
        max_recipients: int = 1000,
        max_sessions: int = 1000,
        idle_timeout: float = 300.0,
        command_deadline: float = 600.0,
        tls_context_factory: Any = None,
        auth_requires_tls: bool = True,
        reject_bare_lf: bool = False,
        auth_failures_before_delay: int = 2,
        auth_failure_delay: float = 2.0,
        auth_max_failures: int = 5,
    ) -> None:
        self.callbacks = callbacks
        self.spool = spool
        self.clock = clock
        self.hostname = hostname
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.command_deadline = command_deadline
        self.tls_context_factory = tls_context_factory
        self.auth_requires_tls = auth_requires_tls
        self.reject_bare_lf = reject_bare_lf
        # AUTH brute force, counted per session: the first
        # auth_failures_before_delay failures are answered at once, later
        # ones after auth_failure_delay seconds (input waits meanwhile), and
        # failure number auth_max_failures closes the session with 421.
        self.auth_failures_before_delay = auth_failures_before_delay
        self.auth_failure_delay = auth_failure_delay
        self.auth_max_failures = auth_max_failures
        self.sessions = 0
        # Called (with no arguments) when process_envelope rejects a message.
        self.on_rejected: Any = None

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:  # type: ignore[override]
        p = SMTPServerProtocol()
        p.factory = self
        return p


class _Transaction:
    """
    The state of one mail transaction (MAIL FROM to end of DATA).
    """

    def __init__(self, envelope_id: str, sender: Sender, sender_args: tuple[Argument, ...]) -> None:
        self.id = envelope_id
        self.sender = sender
        self.sender_args = sender_args
        self.recipients: list[EmailAddress] = []
        self.recipient_args: list[tuple[str, tuple[Argument, ...]]] = []
        self.rejected: list[EmailAddress] = []


@implementer(IPushProducer, IHandshakeListener)
class SMTPServerProtocol(protocol.Protocol):
    """
    One ESMTP session.

    It is the push producer of its own transport: while the client does not
    read our replies (and they fill the transport's buffer) its commands
    wait unprocessed, and past L{MAX_PENDING_INPUT} of them we stop reading,
    so that a client pipelining without reading cannot make us buffer
    replies without end.  (Reading goes on below that: a TLS layer pauses
    us during its handshake, which needs to read.)

    On a TLS transport (an C{ssl:} or C{implicit-tls:} listener) the
    session is encrypted from the start: as after STARTTLS, AUTH may be
    offered and STARTTLS is not.
    """

    factory: SMTPServerFactory
    # A TCP or TLS transport: also a push producer with startTLS and getHandle.
    transport: Any

    def __init__(self) -> None:
        self._buffer = b""
        self._busy = False
        self._closed = False
        self._counted = False
        self._discarding = False
        self._mode = "command"
        self._line_handler: Callable[[str], Any] | None = None
        self._idle_call: Any = None
        self._deadline_call: Any = None
        self._transaction: _Transaction | None = None
        self._reader: DataReader | None = None
        self._writer: Any = None
        self._paused = False
        self._input_paused = False
        self._output_full = False
        self._producing = False
        self._processing = False
        self._greeted = False
        self._early_input = False
        self._protocol_errors = 0
        self._auth_failures = 0
        self._auth_delay: Deferred[None] | None = None
        self._advertise_auth = False
        self._tls = False
        self._tls_info_checked = False
        # TLS started, its handshake not done yet (see _close).
        self._handshake_pending = False
        self.session: Session = Session(id=new_id()[:10])
        self.log: Logger = _log
        self._session_log: Logger = _log

    # -- plumbing ---------------------------------------------------------

    def _make_log(self, envelope_id: str | None = None) -> SessionLogger:
        fields: dict[str, Any] = {"session_id": self.session.id}
        if envelope_id is not None:
            fields["envelope_id"] = envelope_id
        return SessionLogger("relay.smtp.server", fields, source=self)

    def _callback(self, name: str, *args: Any) -> Deferred[Any]:
        return call_callback(getattr(self.factory.callbacks, name), self.log, *args)

    def _reply(self, reply: Reply) -> None:
        if self._closed:
            return
        eager.write(self.transport, reply.to_bytes())
        if reply.code in PROTOCOL_ERRORS:
            self._protocol_errors += 1
            if self._protocol_errors >= MAX_PROTOCOL_ERRORS:
                self.log.warn("too many errors from {remote}", remote=self.session.remote_host)
                self._abort_writer()
                self._close(Reply(421, f"4.7.0 {self.factory.hostname} Error: too many errors"))

    def _synchronization_error(self, where: str) -> None:
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
        self._abort_writer()
        self._close(Reply(554, f"5.5.0 SMTP synchronization error: input sent {where}"))

    def _close(self, reply: Reply | None = None) -> None:
        if self._closed:
            return
        if reply is not None:
            self._reply(reply)
        self._closed = True
        self._cancel_timers()
        if self._producing:
            # A transport does not close while a producer is registered.
            self._producing = False
            self.transport.unregisterProducer()
        if self._handshake_pending:
            # A client silent since it connected to an implicit-TLS port (or
            # since STARTTLS) cannot be sent a reply, and a clean TLS close
            # would wait for its handshake forever, holding the session.
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def _cancel_timers(self) -> None:
        for name in ("_idle_call", "_deadline_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        if self._auth_delay is not None:
            delay, self._auth_delay = self._auth_delay, None
            delay.cancel()

    def _set_producing(self) -> None:
        """
        Pause reading from the client while the message writer asks us to
        (L{_paused}) or too much input waits (L{_input_paused}).
        """
        if self._closed:
            return
        if self._paused or self._input_paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def _check_pending_input(self) -> None:
        pause = (self._busy or self._output_full) and len(self._buffer) > MAX_PENDING_INPUT
        if pause != self._input_paused:
            self._input_paused = pause
            self._set_producing()

    def _timeout_reply(self) -> Reply:
        return Reply(421, f"4.4.2 {self.factory.hostname} Error: timeout exceeded")

    def _reset_idle(self) -> None:
        if self._closed:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.factory.idle_timeout)
        else:
            self._idle_call = self.factory.clock.callLater(
                self.factory.idle_timeout, self._timed_out
            )

    def _timed_out(self) -> None:
        self._idle_call = None
        self.log.info("session timed out")
        self._abort_writer()
        self._close(self._timeout_reply())

    def _start_deadline(self) -> None:
        if self._deadline_call is None and not self._closed:
            self._deadline_call = self.factory.clock.callLater(
                self.factory.command_deadline, self._deadline_passed
            )

    def _stop_deadline(self) -> None:
        if self._deadline_call is not None:
            if self._deadline_call.active():
                self._deadline_call.cancel()
            self._deadline_call = None

    def _deadline_passed(self) -> None:
        self._deadline_call = None
        self.log.info("command deadline exceeded")
        self._abort_writer()
        self._close(self._timeout_reply())

    def _update(self, **changes: Any) -> None:
        self.session = dataclasses.replace(self.session, **changes)

    # -- connection -------------------------------------------------------

    # IPushProducer, for the transport: see the class docstring.

    def pauseProducing(self) -> None:
        self._output_full = True

    def resumeProducing(self) -> None:
        self._output_full = False
        if not self._busy and not self._closed:
            self._process()
            self._check_pending_input()

    def stopProducing(self) -> None:
        pass

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
        if _is_tls(self.transport):
            self._tls = True
            self._handshake_pending = True
            self._update(tls=TLSInfo(version="TLS", cipher="unknown"))
        f = self.factory
        if f.sessions >= f.max_sessions:
            self.log.warn("too many connections from {remote}", remote=self.session.remote_host)
            self._close(Reply(421, f"4.7.0 {f.hostname} Error: too many connections"))
            return
        f.sessions += 1
        self._counted = True
        self._reset_idle()
        self._busy = True
        d = self._callback("session_connect", self.session)

        def connected(result: Any) -> None:
            if isinstance(result, Accept):
                if self._early_input:
                    self._synchronization_error("before the greeting")
                    return
                self._greeted = True
                self._reply(Reply(220, result.greeting))
                self._resume()
            elif isinstance(result, Disconnect):
                self._close(result.reply or Reply.service_unavailable())
            else:
                raise TypeError(f"session_connect returned {result!r}")

        def failed(failure: Failure) -> None:
            self.log.failure("session_connect failed", failure)
            self._close(Reply.service_unavailable())

        d.addCallback(connected).addErrback(failed)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closed = True
        self._cancel_timers()
        self._abort_writer()
        if self._counted:
            self._counted = False
            self.factory.sessions -= 1

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        # Data in TLS comes only after the handshake, whether or not the
        # transport says so through handshakeCompleted.
        self._handshake_pending = False
        if self._tls and not self._tls_info_checked:
            self._check_tls_info()
        self._reset_idle()
        if not self._greeted:
            # Talking before the greeting is a spambot's habit (Postfix's
            # postscreen "pregreet" test); the input is dropped unread and
            # refused once the greeting is due.
            self._early_input = True
            return
        self._buffer += data
        if not self._busy:
            self._process()
        if self._busy or self._output_full:
            self._check_pending_input()

    def _pause_idle(self) -> None:
        # The idle timeout measures the client's silence; while a plugin
        # callback is pending the silence is ours.
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _resume(self) -> None:
        self._busy = False
        if not self._closed:
            self._reset_idle()
            self._process()
            self._check_pending_input()

    def _run(self, coro: Coroutine[Any, Any, Any]) -> None:
        """
        Run a command handler; while it is pending, input waits.
        """
        self._busy = True
        d = Deferred.fromCoroutine(coro)

        def failed(failure: Failure) -> None:
            self.log.failure("command failed", failure)
            self._reset_transaction()
            self._reply(Reply.local_error())

        d.addErrback(failed)
        if d.called:
            # Done synchronously: the loop in _process goes on (no recursion,
            # so a long pipelined batch cannot exhaust the stack).
            self._busy = False
            return
        self._pause_idle()
        d.addBoth(lambda _: self._resume())

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

    def _process_input(self) -> None:
        while not self._busy and not self._output_full and not self._closed and self._buffer:
            if self._mode == "data":
                assert self._reader is not None
                data, self._buffer = self._buffer, b""
                leftover = self._reader.feed(data)
                if leftover is None:
                    return
                self._buffer = leftover
                self._stop_deadline()
                self._run(self._end_of_data())
                continue
            if self._discarding:
                idx = self._buffer.find(b"\n")
                if idx < 0:
                    self._buffer = b""
                    return
                self._buffer = self._buffer[idx + 1 :]
                self._discarding = False
                self._stop_deadline()
                continue
            idx = self._buffer.find(b"\n")
            if idx < 0:
                if len(self._buffer) > MAX_LINE:
                    self._buffer = b""
                    self._discarding = True
                    self._reply(Reply(500, "5.5.2 Line too long"))
                self._start_deadline()
                return
            self._stop_deadline()
            raw, self._buffer = self._buffer[: idx + 1], self._buffer[idx + 1 :]
            if len(raw) > MAX_LINE:
                self._reply(Reply(500, "5.5.2 Line too long"))
                continue
            line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if b"\r" in line:
                self._reply(Reply(500, "5.5.2 Bare CR not allowed in commands"))
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                self._reply(Reply(500, "5.5.2 Invalid UTF-8 in command"))
                continue
            handler = self._line_handler or self._command
            result = handler(text)
            if inspect.iscoroutine(result):
                self._run(result)

    # -- commands ---------------------------------------------------------

    def _command(self, line: str) -> Any:
        verb, _, arg = line.partition(" ")
        # isascii first: Unicode case mapping must not make a verb
        # ("quıt".upper() is "QUIT").
        ok = verb.isascii() and verb.isalpha()
        verb = verb.upper()
        method = getattr(self, "smtp_" + verb, None) if ok else None
        if method is None:
            self._reply(Reply(500, "5.5.2 Command unrecognized"))
            return None
        return method(arg.strip() if verb not in ("MAIL", "RCPT") else arg.lstrip())

    def _reset_transaction(self) -> None:
        self._abort_writer()
        self._transaction = None
        self._reader = None
        self._mode = "command"
        # The session's logger (made once: a Logger per transaction costs).
        self.log = self._session_log

    def _abort_writer(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.abort()
            except Exception:
                self.log.failure("aborting the message writer failed")
        if self._paused:
            self._paused = False
            self._set_producing()

    def smtp_NOOP(self, arg: str) -> None:
        self._reply(Reply(250, "2.0.0 Ok"))

    def smtp_HELP(self, arg: str) -> None:
        self._reply(Reply(214, "2.0.0 See RFC 5321 (https://www.rfc-editor.org/rfc/rfc5321)"))

    def smtp_VRFY(self, arg: str) -> None:
        self._reply(
            Reply(252, "2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
        )

    def smtp_RSET(self, arg: str) -> None:
        self._reset_transaction()
        self._reply(Reply(250, "2.0.0 Ok"))

    def smtp_QUIT(self, arg: str) -> None:
        self._close(Reply(221, "2.0.0 Bye"))

    def smtp_HELO(self, arg: str) -> Any:
        return self._helo(arg, esmtp=False)

    def smtp_EHLO(self, arg: str) -> Any:
        return self._helo(arg, esmtp=True)

    def _extensions(self) -> list[str]:
        f = self.factory
        ext = [
            "PIPELINING",
            f"SIZE {f.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if f.tls_context_factory is not None and not self._tls:
            ext.append("STARTTLS")
        if self._advertise_auth and (self._tls or not f.auth_requires_tls):
            ext.append("AUTH PLAIN LOGIN")
        return ext

    async def _helo(self, arg: str, esmtp: bool) -> None:
        if not arg or " " in arg or _CONTROL.search(arg) is not None:
            self._reply(Reply(501, f"5.5.4 Syntax: {'EHLO' if esmtp else 'HELO'} hostname"))
            return
        self._reset_transaction()
        try:
            result = await self._callback("session_helo", self.session, arg)
        except Exception:
            self.log.failure("session_helo failed")
            self._close(Reply.service_unavailable())
            return
        if isinstance(result, Continue):
            self._advertise_auth = result.advertise_auth
            ext = self._extensions() if esmtp else []
            self._update(helo=arg, esmtp=esmtp, advertised_extensions=tuple(ext))
            self._reply(Reply(250, "\n".join([self.factory.hostname, *ext])))
        elif isinstance(result, Deny):
            self._reply(result.reply or Reply(550, "5.7.1 HELO denied"))
        elif isinstance(result, Disconnect):
            self._close(result.reply or Reply.service_unavailable())
        else:
            self.log.error("session_helo returned {result!r}", result=result)
            self._close(Reply.service_unavailable())

    async def smtp_MAIL(self, arg: str) -> None:
        if self.session.helo is None:
            self._reply(Reply(503, "5.5.1 Error: send HELO/EHLO first"))
            return
        if self._transaction is not None:
            self._reply(Reply(503, "5.5.1 Error: nested MAIL command"))
            return
        m = _MAIL.match(arg)
        if m is None:
            self._reply(Reply(501, "5.5.4 Syntax: MAIL FROM:<address> [parameters]"))
            return
        path, params = m.group(1), m.group(2) or ""
        try:
            args = parse_mail_parameters(params)
        except ArgumentError as e:
            self._reply(e.reply)
            return
        smtputf8 = find(args, "SMTPUTF8") is not None
        try:
            sender = Sender.parse_path(path, smtputf8=smtputf8)
        except AddressError as e:
            self._reply(Reply(553, f"5.1.7 Bad sender address syntax: {e}"))
            return
        size = find(args, "SIZE")
        if (
            size is not None
            and size.value is not None
            and int(size.value) > self.factory.max_message_size
        ):
            self._reply(Reply(552, "5.3.4 Message size exceeds fixed limit"))
            return
        envelope_id = new_id()
        self.log = self._make_log(envelope_id)
        try:
            result = await self._callback("process_sender", self.session, sender, args)
        except Exception:
            self.log.failure("process_sender failed")
            self._reply(Reply.local_error())
            return
        if isinstance(result, Continue):
            self._transaction = _Transaction(envelope_id, sender, args)
            self._reply(Reply(250, "2.1.0 Ok"))
        elif isinstance(result, Reject):
            self._reply(result.reply)
        else:
            self.log.error("process_sender returned {result!r}", result=result)
            self._reply(Reply.local_error())

    async def smtp_RCPT(self, arg: str) -> None:
        t = self._transaction
        if t is None:
            self._reply(Reply(503, "5.5.1 Error: need MAIL command"))
            return
        m = _RCPT.match(arg)
        if m is None:
            self._reply(Reply(501, "5.5.4 Syntax: RCPT TO:<address> [parameters]"))
            return
        path, params = m.group(1), m.group(2) or ""
        try:
            args = parse_rcpt_parameters(params)
        except ArgumentError as e:
            self._reply(e.reply)
            return
        smtputf8 = find(t.sender_args, "SMTPUTF8") is not None
        try:
            recipient = EmailAddress.parse_path(path, smtputf8=smtputf8)
        except AddressError as e:
            self._reply(Reply(553, f"5.1.3 Bad recipient address syntax: {e}"))
            return
        if len(t.recipients) >= self.factory.max_recipients:
            self._reply(Reply(452, "4.5.3 Too many recipients"))
            return
        try:
            result = await self._callback(
                "process_recipient", self.session, t.sender, t.sender_args, recipient
            )
        except Exception:
            self.log.failure("process_recipient failed")
            self._reply(Reply.local_error())
            return
        if self._transaction is not t:
            return
        if isinstance(result, Continue):
            t.recipients.append(recipient)
            t.recipient_args.append((str(recipient), args))
            self._reply(Reply(250, "2.1.5 Ok"))
        elif isinstance(result, Reject):
            t.rejected.append(recipient)
            self._reply(result.reply)
        else:
            self.log.error("process_recipient returned {result!r}", result=result)
            self._reply(Reply.local_error())

    def _refuse_data(self, reply: Reply) -> None:
        self._reply(reply)
        if self._buffer:
            # Sent without waiting for the 354: it is the message, and must
            # not run as commands now that DATA failed.
            self._synchronization_error("after a refused DATA")

    def smtp_DATA(self, arg: str) -> None:
        t = self._transaction
        if arg:
            self._refuse_data(Reply(501, "5.5.4 Syntax: DATA"))
            return
        if t is None:
            self._refuse_data(Reply(503, "5.5.1 Error: need MAIL command"))
            return
        if not t.recipients:
            self._refuse_data(Reply(554, "5.5.1 No valid recipients"))
            return
        try:
            self._writer = self.factory.spool.receive(t.id)
        except Exception:
            self.log.failure("spool receive failed")
            self._refuse_data(Reply.local_error())
            return
        self._too_big = False
        self._write_failure: Failure | None = None
        self._head = b""
        self._head_done = False
        received = self._received_header(t)
        self._received_line = received
        self._write(received)
        self._reader = DataReader(self._sink, reject_bare_lf=self.factory.reject_bare_lf)
        self._mode = "data"
        self._start_deadline()
        self._reply(Reply(354, "End data with <CR><LF>.<CR><LF>"))

    def _received_header(self, t: _Transaction) -> bytes:
        s = self.session
        if s.authenticated is not None:
            proto = "ESMTPSA" if s.tls else "ESMTPA"
        elif s.tls:
            proto = "ESMTPS"
        else:
            proto = "ESMTP" if s.esmtp else "SMTP"
        tls = ""
        if s.tls is not None:
            bits = f" ({s.tls.bits} bits)" if s.tls.bits else ""
            tls = f"\r\n\t(using {s.tls.version} with cipher {s.tls.cipher}{bits})"
        for_ = f"\r\n\tfor <{t.recipients[0]}>" if len(t.recipients) == 1 else ""
        date = formatdate(self.factory.clock.seconds())
        text = (
            f"Received: from {s.helo} ([{s.remote_host}]){tls}\r\n"
            f"\tby {self.factory.hostname} (relay) with {proto} id {t.id}{for_};\r\n"
            f"\t{date}\r\n"
        )
        return text.encode("utf-8", "replace")

    def _write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            stop = writer.write(data)
        except Exception:
            self._write_failure = Failure()
            self.log.failure("writing the message failed", self._write_failure)
            self._abort_writer()
            return
        if stop and not self._paused:
            self._paused = True
            self._set_producing()
            writer.drained().addBoth(self._drained)

    def _drained(self, result: Any) -> Any:
        if self._paused:
            self._paused = False
            self._set_producing()
        return None

    def _sink(self, data: bytes) -> None:
        if not self._head_done:
            self._head += data[:MAX_HEADER_BYTES]
            if (
                b"\r\n\r\n" in self._head
                or self._head.startswith(b"\r\n")
                or len(self._head) >= MAX_HEADER_BYTES
            ):
                self._head_done = True
        if self._too_big:
            return
        assert self._reader is not None
        if self._reader.size > self.factory.max_message_size:
            self._too_big = True
            self._abort_writer()
            return
        self._write(data)

    async def _end_of_data(self) -> None:
        t = self._transaction
        reader = self._reader
        assert t is not None and reader is not None
        self._mode = "command"
        self._reader = None
        try:
            await self._finish_data(t, reader)
        finally:
            self._reset_transaction()

    async def _finish_data(self, t: _Transaction, reader: DataReader) -> None:
        if self._write_failure is not None:
            self._abort_writer()
            self._reply(self._spool_error(self._write_failure))
            return
        if self._too_big or reader.size > self.factory.max_message_size:
            self._abort_writer()
            self._reply(Reply(552, "5.3.4 Message size exceeds fixed limit"))
            return
        if reader.bare_lf_seen and self.factory.reject_bare_lf:
            self._abort_writer()
            self._reply(Reply(550, "5.6.2 Bare LF not allowed"))
            return
        headers = parse_header_block(self._received_line) + parse_header_block(
            header_section(self._head)
        )
        received = sum(1 for name, _ in headers if name.lower() == "received")
        if received > MAX_RECEIVED:
            self._abort_writer()
            self._reply(Reply(554, "5.4.6 Too many Received headers: mail loop"))
            return
        writer, self._writer = self._writer, None
        try:
            message = await writer.finish(headers)
        except Exception:
            self.log.failure("finishing the message failed")
            self._reply(self._spool_error(Failure()))
            return
        envelope = Envelope(
            id=t.id,
            sender=t.sender,
            sender_args=t.sender_args,
            recipients=t.recipients,
            message=message,
            rejected_recipients=t.rejected,
            recipient_args=t.recipient_args,
        )
        try:
            result = await self._callback("process_envelope", self.session, envelope)
        except Exception:
            self.log.failure("process_envelope failed")
            self._discard(message)
            self._reply(Reply.local_error())
            return
        if self._closed:
            # The client is gone and will retry: do not keep a copy it was
            # never told about.
            self._discard(message)
            return
        received_from = f"{self.session.helo} [{self.session.remote_host}]"
        spool = self.factory.spool
        if isinstance(result, Consume):
            self._discard(message)
            self._reply(Reply(250, f"2.0.0 {result.ok_msg}"))
        elif isinstance(result, Reject):
            self._discard(message)
            if self.factory.on_rejected is not None:
                self.factory.on_rejected()
            self._reply(result.reply)
        elif isinstance(result, (Send, Quarantine)):
            try:
                if isinstance(result, Send):
                    await spool.enqueue(result.envelopes, received_from=received_from)
                else:
                    await spool.quarantine(
                        result.envelopes, result.reason, received_from=received_from
                    )
            except Exception:
                failure = Failure()
                self.log.failure("spooling failed", failure)
                self._discard(message)
                self._reply(self._spool_error(failure))
                return
            if isinstance(result, Send):
                self.log.info("queued {envelope_id}", count=len(result.envelopes))
                self._reply(Reply(250, f"2.0.0 Ok: queued as {t.id}"))
            else:
                self.log.info("quarantined: {reason}", reason=result.reason)
                self._reply(result.reply)
        else:
            self.log.error("process_envelope returned {result!r}", result=result)
            self._discard(message)
            self._reply(Reply.local_error())

    def _spool_error(self, failure: Failure) -> Reply:
        exc = failure.value
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return Reply(452, "4.3.1 Insufficient system storage")
        return Reply(451, "4.3.0 Local error in processing, try again later")

    def _discard(self, message: Any) -> None:
        try:
            d = self.factory.spool.discard(message)
        except Exception:
            self.log.failure("discard failed")
            return
        if isinstance(d, Deferred):
            d.addErrback(lambda f: self.log.failure("discard failed", f))

    # -- STARTTLS and AUTH -----------------------------------------------

    def smtp_STARTTLS(self, arg: str) -> None:
        f = self.factory
        if self._tls:
            self._reply(Reply(503, "5.5.1 TLS already active"))
            return
        if f.tls_context_factory is None:
            self._reply(Reply(454, "4.7.0 TLS not available"))
            return
        if arg:
            self._reply(Reply(501, "5.5.4 Syntax: STARTTLS"))
            return
        if self._transaction is not None:
            self._reply(Reply(503, "5.5.1 STARTTLS not allowed during a mail transaction"))
            return
        self._reply(Reply(220, "2.0.0 Ready to start TLS"))
        # RFC 3207 section 4.2: nothing sent before the handshake counts.
        self._buffer = b""
        try:
            self.transport.startTLS(f.tls_context_factory)
        except Exception:
            self.log.failure("startTLS failed")
            self._close(Reply(454, "4.7.0 TLS not available due to temporary reason"))
            return
        self._tls = True
        self._tls_info_checked = False
        self._handshake_pending = True
        self._advertise_auth = False
        self._reset_transaction()
        self._update(
            helo=None,
            esmtp=False,
            authenticated=None,
            advertised_extensions=(),
            tls=TLSInfo(version="TLS", cipher="unknown"),
        )

    def handshakeCompleted(self) -> None:
        # IHandshakeListener: the negotiated version and cipher are known.
        self._handshake_pending = False
        self._check_tls_info()

    def _check_tls_info(self) -> None:
        self._tls_info_checked = True
        try:
            conn = self.transport.getHandle()
            cipher = conn.get_cipher_name()
            version = conn.get_protocol_version_name()
            bits = conn.get_cipher_bits()
        except Exception:
            return
        if cipher:
            self._update(tls=TLSInfo(version=str(version), cipher=str(cipher), bits=bits))

    def smtp_AUTH(self, arg: str) -> Any:
        if not self.session.esmtp:
            self._reply(Reply(503, "5.5.1 Error: send EHLO first"))
            return None
        if "AUTH PLAIN LOGIN" not in self.session.advertised_extensions:
            self._reply(Reply(503, "5.5.1 Error: authentication not enabled"))
            return None
        if self.session.authenticated is not None:
            self._reply(Reply(503, "5.5.1 Error: already authenticated"))
            return None
        if self._transaction is not None:
            self._reply(Reply(503, "5.5.1 Error: MAIL transaction in progress"))
            return None
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if mechanism == "PLAIN":
            if initial:
                return self._auth_plain(initial)
            self._auth_continue("", self._auth_plain)
            return None
        if mechanism == "LOGIN":
            if initial:
                return self._auth_login_user(initial)
            self._auth_continue("VXNlcm5hbWU6", self._auth_login_user)
            return None
        self._reply(Reply(504, "5.5.4 Unrecognized authentication mechanism"))
        return None

    def _auth_continue(self, challenge: str, handler: Callable[[str], Any]) -> None:
        self._reply(Reply(334, challenge))

        def on_line(line: str) -> Any:
            self._line_handler = None
            if line.strip() == "*":
                self._reply(Reply(501, "5.7.0 Authentication cancelled"))
                return None
            return handler(line.strip())

        self._line_handler = on_line

    def _b64(self, text: str) -> str | None:
        if text == "=":
            return ""
        try:
            return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            self._reply(Reply(501, "5.5.2 Cannot decode response"))
            return None

    def _auth_plain(self, text: str) -> Any:
        decoded = self._b64(text)
        if decoded is None:
            return None
        parts = decoded.split("\0")
        if len(parts) != 3:
            self._reply(Reply(501, "5.5.2 Malformed PLAIN response"))
            return None
        _authzid, username, password = parts
        return self._auth_check(username, password)

    def _auth_login_user(self, text: str) -> Any:
        username = self._b64(text)
        if username is None:
            return None

        def password(line: str) -> Any:
            pw = self._b64(line)
            if pw is None:
                return None
            return self._auth_check(username, pw)

        self._auth_continue("UGFzc3dvcmQ6", password)
        return None

    async def _auth_check(self, username: str, password: str) -> None:
        try:
            result = await call_callback(
                self.factory.callbacks.check_authentication_credentials,
                self.log,
                username,
                password,
            )
        except Exception:
            self.log.failure("check_authentication_credentials failed")
            self._reply(Reply(454, "4.7.0 Temporary authentication failure"))
            return
        if isinstance(result, Allow):
            self._update(authenticated=username)
            self.log.info("authenticated as {username}", username=username)
            self._reply(Reply(235, "2.7.0 Authentication successful"))
            return
        f = self.factory
        self._auth_failures += 1
        self.log.info(
            "authentication failed for {username} ({failures} in this session)",
            username=username,
            failures=self._auth_failures,
        )
        if self._auth_failures >= f.auth_max_failures:
            self._close(
                Reply(421, f"4.7.0 {f.hostname} Error: too many failed authentication attempts")
            )
            return
        if self._auth_failures > f.auth_failures_before_delay and f.auth_failure_delay > 0:
            self._auth_delay = deferLater(f.clock, f.auth_failure_delay, lambda: None)
            try:
                await self._auth_delay
            except defer.CancelledError:
                return
            finally:
                self._auth_delay = None
        self._reply(Reply(535, "5.7.8 Authentication credentials invalid"))
