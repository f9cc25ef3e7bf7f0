"""
Reloading files on SIGHUP without a restart: L{ReloadService} installs the
handler while it runs and asks each L{IReloadable} (the TLS certificate;
with C{--receivers}, the receiver pool, which passes the signal on) to
reload, logging one line for each: what is now in use, or why the old one
stays.

Open sessions are not disturbed: a reloadable changes what new sessions
get.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

SignalInstaller = Callable[[int, Any], Any]


class ReloadError(Exception):
    """
    A reload failed for a reason the operator can fix (a file missing,
    unreadable or malformed): its message names the file and says why.  Any
    other exception is a bug, logged with its traceback.
    """


class ReloadService(Service):
    """
    While running, reload C{reloadables} on SIGHUP.

    A signal handler may run between any two bytecodes of the reactor
    thread: it only asks the reactor (C{callFromThread}, which is safe
    there) to call L{reload}.  A SIGHUP that comes while a reload is under
    way makes one more after it, since the files may have changed after
    they were read.

    @param reloadables: the L{IReloadable}s, reloaded one after the other.
    @param reactor: an L{IReactorFromThreads}.
    @param run_in_thread: where reloadables read their files.
    @param install: C{signal.signal}'s signature (tests give their own).
    """

    def __init__(
        self,
        reloadables: Sequence[Any],
        reactor: Any,
        run_in_thread: Callable[..., Deferred[Any]],
        install: SignalInstaller = signal.signal,
        signum: int = signal.SIGHUP,
    ) -> None:
        self.reloadables = tuple(reloadables)
        self.reactor = reactor
        self.run_in_thread = run_in_thread
        self.install = install
        self.signum = signum
        self.log = Logger(namespace="relay.app.reload")
        self._previous: Any = None
        self._installed = False
        self._reloading = False
        self._waiting: list[Deferred[None]] = []
        self.setName("reload")

    def startService(self) -> None:
        Service.startService(self)
        self._previous = self.install(self.signum, self._received)
        self._installed = True

    def stopService(self) -> Any:
        Service.stopService(self)
        if self._installed:
            self._installed = False
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            self.install(self.signum, previous)
        return None

    def _received(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._signalled)

    def _signalled(self) -> None:
        self.log.info(
            "{signal} received: reloading {what}",
            signal=signal.Signals(self.signum).name,
            what=", ".join(r.what for r in self.reloadables) or "nothing",
        )
        self.reload()

    def reload(self) -> Deferred[None]:
        """
        Reload everything now, or after the reload under way.

        @return: a L{Deferred} that fires (with C{None}, never failing)
            once a reload begun after this call is done.
        """
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        if not self._reloading:
            self._reloading = True
            Deferred.fromCoroutine(self._reload_while_asked()).addErrback(
                lambda f: self.log.failure("Reloading failed", f)
            )
        return d

    async def _reload_while_asked(self) -> None:
        try:
            while self._waiting:
                waiting, self._waiting = self._waiting, []
                for reloadable in self.reloadables:
                    # One after the other: their log lines come in order and
                    # only one file set is read at a time.
                    await self._reload_one(reloadable)
                for d in waiting:
                    d.callback(None)
        finally:
            self._reloading = False

    async def _reload_one(self, reloadable: Any) -> None:
        try:
            done = await maybeDeferred(reloadable.reload, self.run_in_thread)
        except ReloadError as e:
            self.log.error(
                "{what} not reloaded, keeping the one in use: {error}",
                what=reloadable.what, error=str(e), reload_failed=True,
            )  # fmt: skip
        except Exception:
            self.log.failure(
                "{what} not reloaded, keeping the one in use", what=reloadable.what,
                reload_failed=True,
            )  # fmt: skip
        else:
            self.log.info("{done}", done=done, what=reloadable.what)
