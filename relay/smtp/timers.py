"""
The two timers of an SMTP session, on the server's injected clock.

The idle timeout measures the client's silence (reset by every byte it
sends, paused while the session waits on the plugin or the spool); the
command deadline bounds how long one command line, or one message's data,
may take however slowly it trickles in (Postfix's
C{smtpd_per_record_deadline}).  Either one ending closes the session with
421 4.4.2.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class SessionTimers:
    """
    The idle timeout and the command deadline of one session.  Once
    L{cancel}led (the session is closing) neither starts again.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float,
        command_deadline: float,
        on_idle: Callable[[], object],
        on_deadline: Callable[[], object],
    ) -> None:
        """
        @param on_idle: called when the client was silent for
            C{idle_timeout} seconds.
        @param on_deadline: called when a command took C{command_deadline}
            seconds.
        """
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._command_deadline = command_deadline
        self._on_idle = on_idle
        self._on_deadline = on_deadline
        self._idle: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._cancelled = False

    def reset_idle(self) -> None:
        """
        The client spoke, or the session reads again: the idle timeout
        starts over.
        """
        if self._cancelled:
            return
        idle = self._idle
        if idle is not None and idle.active():
            idle.reset(self._idle_timeout)
        else:
            self._idle = self._clock.callLater(self._idle_timeout, self._idle_passed)

    def pause_idle(self) -> None:
        """
        The session waits on a callback or the spool: the silence is ours,
        not the client's, until L{reset_idle}.
        """
        idle, self._idle = self._idle, None
        if idle is not None and idle.active():
            idle.cancel()

    def start_deadline(self) -> None:
        """
        A command (or a message's data) has begun, if it had not already.
        """
        if self._deadline is None and not self._cancelled:
            self._deadline = self._clock.callLater(self._command_deadline, self._deadline_passed)

    def stop_deadline(self) -> None:
        """
        The command (or the data) is complete.
        """
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def cancel(self) -> None:
        """
        Stop both for good: the session is closing.
        """
        self._cancelled = True
        self.pause_idle()
        self.stop_deadline()

    def _idle_passed(self) -> None:
        self._idle = None
        self._on_idle()

    def _deadline_passed(self) -> None:
        self._deadline = None
        self._on_deadline()
