"""
Command dispatch: which part of the session answers each SMTP verb, and
the commands of the session itself: HELO and EHLO (with the extensions
advertised), NOOP, HELP, VRFY, RSET and QUIT.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

from relay.model.reply import Reply
from relay.model.results import Continue, Deny, Disconnect
from relay.smtp import auth, bdat

if TYPE_CHECKING:
    from relay.smtp.protocol import SMTPServerProtocol

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_OK = Reply.ok()
_UNRECOGNIZED = Reply.syntax_error("5.5.2 Command unrecognized")
_HELP = Reply(214, "2.0.0 See RFC 5321 (https://www.rfc-editor.org/rfc/rfc5321)")
_VRFY = Reply(252, "2.5.0 Cannot VRFY user, but will accept message and attempt delivery")
_BYE = Reply(221, "2.0.0 Bye")
_HELO_DENIED = Reply.mailbox_unavailable("5.7.1 HELO denied")

#: The verbs whose argument keeps its trailing white space (a parameter
#: list, parsed by the transaction).
_KEEP_TRAILING = frozenset({"MAIL", "RCPT"})


class Commands:
    """
    Dispatch of one session's command lines, and the commands that belong
    to no other part: HELO/EHLO, NOOP, HELP, VRFY, RSET, QUIT.

    A handler takes the argument (the line after the verb) and answers
    with replies on the session; it may return a coroutine, which the
    session runs while its input waits.
    """

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol
        mail = protocol.mail
        self._handlers: dict[str, Callable[[str], Any]] = {
            "HELO": self.smtp_HELO,
            "EHLO": self.smtp_EHLO,
            "MAIL": mail.smtp_MAIL,
            "RCPT": mail.smtp_RCPT,
            "DATA": mail.smtp_DATA,
            "RSET": self.smtp_RSET,
            "NOOP": self.smtp_NOOP,
            "QUIT": self.smtp_QUIT,
            "HELP": self.smtp_HELP,
            "VRFY": self.smtp_VRFY,
            "STARTTLS": protocol.starttls.smtp_STARTTLS,
            "AUTH": protocol.auth.smtp_AUTH,
        }
        if protocol.settings.chunking:
            self._handlers["BDAT"] = mail.smtp_BDAT

    def dispatch(self, line: str) -> Any:
        """
        Answer one command line.

        @return: what its handler returned (C{None}, or a coroutine).
        """
        verb, _, arg = line.partition(" ")
        # isascii first: Unicode case mapping must not make a verb
        # ("quıt".upper() is "QUIT").
        handler = None
        if verb.isascii() and verb.isalpha():
            verb = verb.upper()
            handler = self._handlers.get(verb)
        if handler is None:
            self._protocol.reply(_UNRECOGNIZED)
            return None
        return handler(arg.lstrip() if verb in _KEEP_TRAILING else arg.strip())

    def smtp_NOOP(self, arg: str) -> None:
        self._protocol.reply(_OK)

    def smtp_HELP(self, arg: str) -> None:
        self._protocol.reply(_HELP)

    def smtp_VRFY(self, arg: str) -> None:
        self._protocol.reply(_VRFY)

    def smtp_RSET(self, arg: str) -> None:
        self._protocol.mail.reset()
        self._protocol.reply(_OK)

    def smtp_QUIT(self, arg: str) -> None:
        self._protocol.close(_BYE)

    def smtp_HELO(self, arg: str) -> Any:
        return self._helo(arg, esmtp=False)

    def smtp_EHLO(self, arg: str) -> Any:
        return self._helo(arg, esmtp=True)

    def _extensions(self, advertise_auth: bool) -> list[str]:
        """
        The EHLO keywords: AUTH when the plugin's C{session_helo} asked for
        it and the session is encrypted (or AUTH does not require TLS).
        CHUNKING without BINARYMIME (as Postfix): a chunk holds text.
        """
        settings = self._protocol.settings
        tls = self._protocol.starttls.active
        ext = [
            "PIPELINING",
            f"SIZE {settings.max_message_size}",
            "8BITMIME",
            # RFC 3461: NOTIFY, RET, ENVID and ORCPT, honoured in relay's
            # own reports and passed on to hops that offer DSN.
            "DSN",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if settings.chunking:
            ext.append(bdat.EXTENSION)
        if settings.tls_context_factory is not None and not tls:
            ext.append("STARTTLS")
        if advertise_auth and (tls or not settings.auth_requires_tls):
            ext.append(auth.EXTENSION)
        return ext

    async def _helo(self, arg: str, esmtp: bool) -> None:
        protocol = self._protocol
        if not arg or " " in arg or _CONTROL.search(arg) is not None:
            protocol.reply(
                Reply.parameter_error(f"5.5.4 Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            )
            return
        protocol.mail.reset()
        try:
            result = await protocol.callback("session_helo", protocol.session, arg)
        except Exception:
            protocol.log.failure("session_helo failed")
            protocol.close(Reply.service_unavailable())
            return
        if isinstance(result, Continue):
            ext = self._extensions(result.advertise_auth) if esmtp else []
            protocol.update_session(helo=arg, esmtp=esmtp, advertised_extensions=tuple(ext))
            protocol.reply(Reply.ok("\n".join([protocol.settings.hostname, *ext])))
        elif isinstance(result, Deny):
            protocol.reply(result.reply or _HELO_DENIED)
        elif isinstance(result, Disconnect):
            protocol.close(result.reply or Reply.service_unavailable())
        else:
            protocol.log.error("session_helo returned {result!r}", result=result)
            protocol.close(Reply.service_unavailable())
