"""
A plugin's callbacks, seen and called by a test.

L{RecordingCallbacks} is a plugin that records every callback call with
its arguments and answers as it is told, or as the plugin it wraps does.
L{make_session} and L{make_envelope} make up the values a callback takes,
and L{call_callback} calls one and gives what it answered, whether it
returned a value, a L{Deferred} or a coroutine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import (
    Any,
    Callable,
    ClassVar,
    Coroutine,
    ParamSpec,
    Sequence,
    TypeVar,
    overload,
)

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols.amp import CommandLocator
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest
from zope.interface import implementer

from relay.interfaces import Answer, IServerCallbacks
from relay.model.address import EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.envelope import Envelope
from relay.model.message import Message
from relay.model.results import (
    AuthResult,
    ConnectResult,
    EnvelopeResult,
    HeloResult,
    RecipientResult,
    SenderResult,
)
from relay.model.session import Session, TLSInfo
from relay.simple import Defaults, Simple, as_callbacks
from relay.smtp.callbacks import call_callback as _call_callback
from relay.testing.transcript import LOCAL_ADDRESS, REMOTE_ADDRESS, _address

T = TypeVar("T")
P = ParamSpec("P")


# -- what RecordingCallbacks records ------------------------------------


@dataclass(frozen=True)
class CallbackCall:
    """
    One call of a callback, with its arguments.  Each callback has its
    subclass, whose fields are the callback's parameters.

    @cvar name: the callback's name.
    """

    name: ClassVar[str]

    @property
    def args(self) -> tuple[object, ...]:
        """
        The arguments after C{log}, in order.
        """
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "log")


@dataclass(frozen=True)
class SessionConnectCall(CallbackCall):
    name: ClassVar[str] = "session_connect"
    log: Logger
    session: Session


@dataclass(frozen=True)
class SessionHeloCall(CallbackCall):
    name: ClassVar[str] = "session_helo"
    log: Logger
    session: Session
    helo: str


@dataclass(frozen=True)
class ProcessSenderCall(CallbackCall):
    name: ClassVar[str] = "process_sender"
    log: Logger
    session: Session
    sender: Sender
    sender_args: Sequence[Argument]


@dataclass(frozen=True)
class ProcessRecipientCall(CallbackCall):
    name: ClassVar[str] = "process_recipient"
    log: Logger
    session: Session
    sender: Sender
    sender_args: Sequence[Argument]
    recipient: EmailAddress


@dataclass(frozen=True)
class ProcessEnvelopeCall(CallbackCall):
    name: ClassVar[str] = "process_envelope"
    log: Logger
    session: Session
    envelope: Envelope


@dataclass(frozen=True)
class CheckAuthenticationCredentialsCall(CallbackCall):
    name: ClassVar[str] = "check_authentication_credentials"
    log: Logger
    username: str
    password: str


@dataclass(frozen=True)
class RpcsCall(CallbackCall):
    name: ClassVar[str] = "rpcs"


C = TypeVar("C", bound=CallbackCall)


@implementer(IServerCallbacks)
class RecordingCallbacks:
    """
    A plugin that records every callback call, then answers it.

    Each callback answers with what was given for it to the constructor:
    a result (or a L{Deferred}), or a function called with the callback's
    own arguments, C{log} first, that returns a result, a L{Deferred} or
    a coroutine.  Callbacks given nothing are passed on to the wrapped
    plugin, so that C{RecordingCallbacks(MyPolicy())} is C{MyPolicy} with
    a record of what the server asked it.

    @ivar calls: every call so far, in order.
    @ivar wrapped: the plugin answering the callbacks given nothing.
    @ivar defaults: what L{configure} was given, if it was called.
    """

    def __init__(
        self,
        wrapped: object = None,
        *,
        session_connect: Answer[ConnectResult]
        | Callable[[Logger, Session], Answer[ConnectResult]]
        | None = None,
        session_helo: Answer[HeloResult]
        | Callable[[Logger, Session, str], Answer[HeloResult]]
        | None = None,
        process_sender: Answer[SenderResult]
        | Callable[[Logger, Session, Sender, Sequence[Argument]], Answer[SenderResult]]
        | None = None,
        process_recipient: Answer[RecipientResult]
        | Callable[
            [Logger, Session, Sender, Sequence[Argument], EmailAddress], Answer[RecipientResult]
        ]
        | None = None,
        process_envelope: Answer[EnvelopeResult]
        | Callable[[Logger, Session, Envelope], Answer[EnvelopeResult]]
        | None = None,
        check_authentication_credentials: Answer[AuthResult]
        | Callable[[Logger, str, str], Answer[AuthResult]]
        | None = None,
        rpcs: Sequence[CommandLocator] | Callable[[], Sequence[CommandLocator]] | None = None,
    ) -> None:
        """
        @param wrapped: the plugin that answers the other callbacks (a
            provider, a class of one, or an object with some callbacks;
            see L{as_callbacks}); by default L{Simple}.
        """
        self.wrapped: object = as_callbacks(wrapped) if wrapped is not None else Simple()
        self.calls: list[CallbackCall] = []
        self.defaults: Defaults | None = None
        self._session_connect = session_connect
        self._session_helo = session_helo
        self._process_sender = process_sender
        self._process_recipient = process_recipient
        self._process_envelope = process_envelope
        self._check_authentication_credentials = check_authentication_credentials
        self._rpcs = rpcs

    def __repr__(self) -> str:
        return f"<RecordingCallbacks around {self.wrapped!r}>"

    def names(self) -> list[str]:
        """
        The name of each callback called, in order.
        """
        return [call.name for call in self.calls]

    def calls_to(self, kind: type[C]) -> list[C]:
        """
        The calls of one callback, in order: C{calls_to(ProcessEnvelopeCall)}.
        """
        return [call for call in self.calls if isinstance(call, kind)]

    def configure(self, defaults: Defaults) -> None:
        """
        Keep the relay's settings and pass them on to the wrapped plugin.
        """
        self.defaults = defaults
        configure = getattr(self.wrapped, "configure", None)
        if callable(configure):
            configure(defaults)

    def _answer(
        self,
        name: str,
        given: Answer[T] | Callable[..., Answer[T]] | None,
        *args: object,
    ) -> Answer[T]:
        if given is None:
            callback: Callable[..., Answer[T]] = getattr(self.wrapped, name)
            return callback(*args)
        if callable(given):
            answer: Answer[T] = given(*args)
            return answer
        return given

    def session_connect(self, log: Logger, session: Session) -> Answer[ConnectResult]:
        self.calls.append(SessionConnectCall(log, session))
        return self._answer("session_connect", self._session_connect, log, session)

    def session_helo(self, log: Logger, session: Session, helo: str) -> Answer[HeloResult]:
        self.calls.append(SessionHeloCall(log, session, helo))
        return self._answer("session_helo", self._session_helo, log, session, helo)

    def process_sender(
        self, log: Logger, session: Session, sender: Sender, sender_args: Sequence[Argument]
    ) -> Answer[SenderResult]:
        self.calls.append(ProcessSenderCall(log, session, sender, sender_args))
        return self._answer(
            "process_sender", self._process_sender, log, session, sender, sender_args
        )

    def process_recipient(
        self,
        log: Logger,
        session: Session,
        sender: Sender,
        sender_args: Sequence[Argument],
        recipient: EmailAddress,
    ) -> Answer[RecipientResult]:
        self.calls.append(ProcessRecipientCall(log, session, sender, sender_args, recipient))
        return self._answer(
            "process_recipient",
            self._process_recipient,
            log,
            session,
            sender,
            sender_args,
            recipient,
        )

    def process_envelope(
        self, log: Logger, session: Session, envelope: Envelope
    ) -> Answer[EnvelopeResult]:
        self.calls.append(ProcessEnvelopeCall(log, session, envelope))
        return self._answer("process_envelope", self._process_envelope, log, session, envelope)

    def check_authentication_credentials(
        self, log: Logger, username: str, password: str
    ) -> Answer[AuthResult]:
        self.calls.append(CheckAuthenticationCredentialsCall(log, username, password))
        return self._answer(
            "check_authentication_credentials",
            self._check_authentication_credentials,
            log,
            username,
            password,
        )

    def rpcs(self) -> list[CommandLocator]:
        self.calls.append(RpcsCall())
        given = self._rpcs
        if given is None:
            wrapped: Callable[[], Sequence[CommandLocator]] = getattr(self.wrapped, RpcsCall.name)
            return list(wrapped())
        return list(given() if callable(given) else given)


# -- made-up arguments ---------------------------------------------------


def make_session(
    *,
    remote: str | IPv4Address | IPv6Address = REMOTE_ADDRESS,
    local: str | IPv4Address | IPv6Address = LOCAL_ADDRESS,
    helo: str | None = "client.example",
    esmtp: bool = True,
    tls: TLSInfo | None = None,
    authenticated: str | None = None,
    advertised_extensions: Sequence[str] = (),
    id: str = "test-session",
) -> Session:
    """
    A L{Session} as a callback would get it after EHLO (give C{helo=None}
    for one that has just connected).

    @param remote: the client's address: a host (port 40000) or an
        address object.
    @param local: the address it connected to.
    @param authenticated: the user name, for a session that passed AUTH.
    """
    return Session(
        id=id,
        local=_address(local, 25),
        remote=_address(remote, 40000),
        helo=helo,
        esmtp=esmtp,
        tls=tls,
        authenticated=authenticated,
        advertised_extensions=tuple(advertised_extensions),
    )


def _mailbox(text: str) -> EmailAddress:
    return EmailAddress.parse(text, smtputf8=not text.isascii())


def make_envelope(
    sender: str,
    recipients: str | Sequence[str],
    message: bytes = b"Subject: test\r\n\r\nA test message.\r\n",
    *,
    sender_args: Sequence[Argument] = (),
    rejected_recipients: Sequence[str] = (),
    id: str = "test-envelope",
) -> Envelope:
    """
    An L{Envelope} as C{process_envelope} would get it.

    @param sender: C{local@domain}, or C{""} for the null sender.
    @param recipients: one address or several.
    @param message: the message as it arrives (CRLF line endings, no
        dot-stuffing); its header fields are parsed.
    @raise relay.model.address.AddressError: for an address that is not valid.
    """
    if isinstance(recipients, str):
        recipients = [recipients]
    return Envelope(
        id=id,
        sender=Sender.of(sender),
        sender_args=tuple(sender_args),
        recipients=[_mailbox(r) for r in recipients],
        message=Message.from_bytes(message),
        rejected_recipients=[_mailbox(r) for r in rejected_recipients],
    )


# -- calling one callback ------------------------------------------------


@overload
def call_callback_deferred(
    callback: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
) -> Deferred[T]: ...


@overload
def call_callback_deferred(
    callback: Callable[P, Deferred[T]], *args: P.args, **kwargs: P.kwargs
) -> Deferred[T]: ...


@overload
def call_callback_deferred(
    callback: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> Deferred[T]: ...


def call_callback_deferred(
    callback: Callable[P, Answer[T]], *args: P.args, **kwargs: P.kwargs
) -> Deferred[T]:
    """
    Call a callback as the server does: a L{Deferred} firing with its
    result, whether it returned a value, a L{Deferred} or a coroutine, or
    failing with what it raised.  For a callback that waits on the clock
    or on a L{Deferred} the test fires.
    """
    return _call_callback(functools.partial(callback, *args, **kwargs))


# The overloads give the result type of each kind of callback: matched
# against Answer[T], a union such as RecipientResult would be joined into
# object.  (A callback annotated with a mixed union, such as
# Simple.check_authentication_credentials, keeps its whole union.)


@overload
def call_callback(
    callback: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
) -> T: ...


@overload
def call_callback(callback: Callable[P, Deferred[T]], *args: P.args, **kwargs: P.kwargs) -> T: ...


@overload
def call_callback(callback: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T: ...


def call_callback(callback: Callable[P, Answer[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """
    Call a callback and give its result now, whether it returned a value,
    a L{Deferred} that has fired or a coroutine that did not wait::

        result = call_callback(policy.process_recipient, Logger(), session,
                               sender, [], recipient)

    @raise Exception: what the callback raised (or its Deferred failed with).
    @raise FailTest: (an C{AssertionError}) when the callback has not
        answered yet; use L{call_callback_deferred} for one that waits.
    """
    outcome: list[T] = []
    failed: list[Failure] = []
    call_callback_deferred(callback, *args, **kwargs).addCallbacks(outcome.append, failed.append)
    if failed:
        failed[0].raiseException()
    if not outcome:
        name = getattr(callback, "__qualname__", repr(callback))
        raise FailTest(
            f"{name} has not answered yet: it waits on a Deferred or the clock"
            " (use call_callback_deferred)"
        )
    return outcome[0]
