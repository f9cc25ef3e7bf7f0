"""
SMTP AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms: the
exchange of challenges and responses, the plugin's
C{check_authentication_credentials}, and the brute-force throttling.

Failures are counted per session: the first
C{auth_failures_before_delay} are answered at once, later ones after
C{auth_failure_delay} seconds (the session's input waits meanwhile), and
failure number C{auth_max_failures} closes the session with 421.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.internet.task import deferLater

from relay.model.reply import Reply
from relay.model.results import Allow

if TYPE_CHECKING:
    from relay.smtp.protocol import SMTPServerProtocol

#: The EHLO keyword; AUTH is refused unless it was advertised.
EXTENSION = "AUTH PLAIN LOGIN"

_USERNAME = "VXNlcm5hbWU6"  # base64 "Username:"
_PASSWORD = "UGFzc3dvcmQ6"  # base64 "Password:"
_CANNOT_DECODE = Reply.parameter_error("5.5.2 Cannot decode response")


class Authentication:
    """
    AUTH in one session, and the count of its failed attempts.
    """

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol
        self._failures = 0
        # The wait before answering a failed attempt, while it runs.
        self._delay: defer.Deferred[None] | None = None

    def cancel_delay(self) -> None:
        """
        The session is closing: a failed attempt waiting for its answer
        gets none.
        """
        if self._delay is not None:
            delay, self._delay = self._delay, None
            delay.cancel()

    def smtp_AUTH(self, arg: str) -> Any:
        protocol = self._protocol
        session = protocol.session
        if not session.esmtp:
            protocol.reply(Reply.bad_sequence("5.5.1 Error: send EHLO first"))
            return None
        if EXTENSION not in session.advertised_extensions:
            protocol.reply(Reply.bad_sequence("5.5.1 Error: authentication not enabled"))
            return None
        if session.authenticated is not None:
            protocol.reply(Reply.bad_sequence("5.5.1 Error: already authenticated"))
            return None
        if protocol.mail.transaction is not None:
            protocol.reply(Reply.bad_sequence("5.5.1 Error: MAIL transaction in progress"))
            return None
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if mechanism == "PLAIN":
            if initial:
                return self._plain(initial)
            self._challenge("", self._plain)
            return None
        if mechanism == "LOGIN":
            if initial:
                return self._login_user(initial)
            self._challenge(_USERNAME, self._login_user)
            return None
        protocol.reply(Reply.parameter_not_implemented("5.5.4 Unrecognized authentication mechanism"))
        return None

    def _challenge(self, challenge: str, handler: Callable[[str], Any]) -> None:
        """
        Send a 334 challenge; the client's next line is its response, for
        C{handler} (or C{*}, which cancels the exchange).
        """
        self._protocol.reply(Reply(334, challenge))

        def on_line(line: str) -> Any:
            if line.strip() == "*":
                self._protocol.reply(Reply.parameter_error("5.7.0 Authentication cancelled"))
                return None
            return handler(line.strip())

        self._protocol.expect_response(on_line)

    def _b64(self, text: str) -> str | None:
        if text == "=":
            return ""
        try:
            return base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            self._protocol.reply(_CANNOT_DECODE)
            return None

    def _plain(self, text: str) -> Any:
        decoded = self._b64(text)
        if decoded is None:
            return None
        parts = decoded.split("\0")
        if len(parts) != 3:
            self._protocol.reply(Reply.parameter_error("5.5.2 Malformed PLAIN response"))
            return None
        _authzid, username, password = parts
        return self._check(username, password)

    def _login_user(self, text: str) -> Any:
        username = self._b64(text)
        if username is None:
            return None

        def password(line: str) -> Any:
            pw = self._b64(line)
            if pw is None:
                return None
            return self._check(username, pw)

        self._challenge(_PASSWORD, password)
        return None

    async def _check(self, username: str, password: str) -> None:
        protocol = self._protocol
        try:
            result = await protocol.callback("check_authentication_credentials", username, password)
        except Exception:
            protocol.log.failure("check_authentication_credentials failed")
            protocol.reply(Reply(454, "4.7.0 Temporary authentication failure"))
            return
        if isinstance(result, Allow):
            protocol.update_session(authenticated=username)
            protocol.log.info("authenticated as {username}", username=username)
            protocol.reply(Reply(235, "2.7.0 Authentication successful"))
            return
        settings = protocol.settings
        self._failures += 1
        protocol.log.info(
            "authentication failed for {username} ({failures} in this session)",
            username=username,
            failures=self._failures,
        )
        if self._failures >= settings.auth_max_failures:
            protocol.close(
                Reply.service_unavailable(
                    f"4.7.0 {settings.hostname} Error: too many failed authentication attempts"
                )
            )
            return
        if self._failures > settings.auth_failures_before_delay and settings.auth_failure_delay > 0:
            self._delay = deferLater(protocol.factory.clock, settings.auth_failure_delay, lambda: None)
            try:
                await self._delay
            except defer.CancelledError:
                return
            finally:
                self._delay = None
        protocol.reply(Reply(535, "5.7.8 Authentication credentials invalid"))
