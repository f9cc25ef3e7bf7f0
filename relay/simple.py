"""
L{Simple}: the default policy, and the base class a plugin overrides.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Sequence

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relay.interfaces import Answer, IServerCallbacks
from relay.model.address import EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.results import (
    Accept,
    Allow,
    AuthResult,
    ConnectResult,
    Continue,
    Deny,
    EnvelopeResult,
    HeloResult,
    RecipientResult,
    Send,
    SenderResult,
)
from relay.model.session import Session

if TYPE_CHECKING:
    from twisted.protocols.amp import CommandLocator


@dataclass
class Defaults:
    """
    The relay's configuration that L{Simple}'s answers depend on.

    @ivar hostname: the name in the greeting.
    @ivar next_hop_choices: the default route (the smarthost); empty means
        the delivery side looks up each recipient domain's MX.  For the
        plugin's information: an envelope sent with no next hops takes the
        default route as it is configured when the mail is delivered.
    @ivar retry_intervals: the default retry schedule (empty: the
        relay's); likewise applied to envelopes that give none.
    @ivar checker: the L{ICredentialsChecker} for AUTH, or C{None}.
    @ivar clock: the relay's clock, for the greeting's date (C{None}: the
        system time).
    """

    hostname: str = "localhost"
    next_hop_choices: Sequence[str] = ()
    retry_intervals: Sequence[float] = ()
    checker: ICredentialsChecker | None = None
    clock: IReactorTime | None = field(default=None)


@implementer(IServerCallbacks)
class Simple:
    """
    The callbacks of async_smtp's C{Server_callbacks.Simple}: greet with the
    host name and the time, accept every sender and recipient, and send
    every envelope on the default route.  AUTH is offered (and checked) only
    when a credentials checker is configured.

    Subclass it and override only the callbacks that need a decision.  The
    relay calls L{configure} with its settings after making the instance,
    so a subclass may have an C{__init__} of its own without arguments.

    Each callback is annotated as returning an L{Answer} (a result, a
    L{Deferred} of one, or a coroutine) so that an override may be a plain
    method, return a L{Deferred}, or be an C{async def}; Simple's own
    return plain results.
    """

    defaults: Defaults = Defaults()

    def configure(self, defaults: Defaults) -> None:
        """
        Take the relay's settings (host name, default route, AUTH checker).
        """
        self.defaults = defaults

    def session_connect(self, log: Logger, session: Session) -> Answer[ConnectResult]:
        clock = self.defaults.clock
        now = clock.seconds() if clock is not None else None
        return Accept(f"{self.defaults.hostname} ESMTP relay ready {formatdate(now)}")

    def session_helo(self, log: Logger, session: Session, helo: str) -> Answer[HeloResult]:
        return Continue(advertise_auth=self.defaults.checker is not None)

    def process_sender(
        self, log: Logger, session: Session, sender: Sender, sender_args: Sequence[Argument]
    ) -> Answer[SenderResult]:
        return Continue()

    def process_recipient(
        self,
        log: Logger,
        session: Session,
        sender: Sender,
        sender_args: Sequence[Argument],
        recipient: EmailAddress,
    ) -> Answer[RecipientResult]:
        return Continue()

    def process_envelope(
        self, log: Logger, session: Session, envelope: Envelope
    ) -> Answer[EnvelopeResult]:
        return Send(
            [
                EnvelopeWithNextHop(
                    envelope,
                    # The default route and schedule, by reference: the
                    # relay applies the ones configured when it delivers.
                    next_hop_choices=(),
                    retry_intervals=(),
                )
            ]
        )

    def check_authentication_credentials(
        self, log: Logger, username: str, password: str
    ) -> Answer[AuthResult]:
        checker = self.defaults.checker
        if checker is None:
            return Deny()
        credentials = UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
        d = maybeDeferred(checker.requestAvatarId, credentials)

        def denied(failure: Any) -> Deny:
            if not failure.check(UnauthorizedLogin):
                log.failure("AUTH checker failed", failure)
            return Deny()

        return d.addCallbacks(lambda _: Allow(), denied)

    def rpcs(self) -> Sequence[CommandLocator]:
        return []


_CALLBACKS = tuple(IServerCallbacks.names())


@implementer(IServerCallbacks)
class _Partial(Simple):
    """
    A plugin object that provides only some callbacks, completed by
    L{Simple} for the rest.
    """

    def __init__(self, provider: object) -> None:
        self._provider = provider
        for name in _CALLBACKS:
            method = getattr(provider, name, None)
            if callable(method):
                setattr(self, name, method)

    def configure(self, defaults: Defaults) -> None:
        super().configure(defaults)
        configure = getattr(self._provider, "configure", None)
        if callable(configure):
            configure(defaults)

    def __repr__(self) -> str:
        return f"<Simple completing {self._provider!r}>"


class CallbacksError(Exception):
    """
    The plugin named by C{--callbacks} cannot be loaded or made; the
    message says why in one line, for the operator.
    """


def load_callbacks(name: str) -> object:
    """
    Import the object a dotted name (C{package.module.Class}) names.

    Unlike L{twisted.python.reflect.namedAny}, the error says which of the
    usual mistakes it is: no such module, no such attribute in the module,
    or the module failing while it is imported (a missing dependency of the
    plugin, a syntax error).

    @raise CallbacksError: with that message.
    """
    parts = name.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise CallbacksError(f"{name!r} is not a dotted name such as mypackage.MyPolicy")
    missing: set[str] = set()
    for end in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:end])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only a missing module of this name (or of a package above it)
            # means "try a shorter prefix"; any other missing module was
            # imported by the plugin's own code.
            if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
                missing.add(e.name)
                continue
            raise CallbacksError(f"module {module_name!r} raised during import: {_describe(e)}") from e
        except Exception as e:
            raise CallbacksError(f"module {module_name!r} raised during import: {_describe(e)}") from e
        for depth, part in enumerate(parts[end:]):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                owner = ".".join(parts[: end + depth])
                if depth == 0 and f"{owner}.{part}" in missing:
                    raise CallbacksError(f"no module named {owner + '.' + part!r}") from None
                raise CallbacksError(f"module {owner!r} has no attribute {part!r}") from None
        return obj
    raise CallbacksError(f"no module named {min(missing, key=len)!r}")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def as_callbacks(provider: object) -> IServerCallbacks:
    """
    Make an L{IServerCallbacks} provider of C{provider}: itself if it
    provides the interface, an instance if it is a class, else an adapter
    that takes the callbacks it has and L{Simple}'s for the others.

    @raise CallbacksError: if a class raises while it is instantiated, or
        if C{provider} has none of the callbacks.
    """
    if inspect.isclass(provider):
        cls: type = provider
        try:
            provider = cls()
        except Exception as e:
            name = f"{cls.__module__}.{cls.__qualname__}"
            raise CallbacksError(f"{name} raised during construction: {_describe(e)}") from e
    if IServerCallbacks.providedBy(provider):
        return provider
    if not any(callable(getattr(provider, name, None)) for name in _CALLBACKS):
        raise CallbacksError(f"{provider!r} provides none of the IServerCallbacks callbacks")
    return _Partial(provider)
