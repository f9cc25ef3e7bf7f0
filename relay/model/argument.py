"""
ESMTP parameters of MAIL FROM and RCPT TO (RFC 5321 section 4.1.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.model import dsn
from relay.model.reply import Reply


class ArgumentError(ValueError):
    """
    A parameter the server cannot accept; C{reply} says why to the client.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")

MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "AUTH", "SMTPUTF8", "RET", "ENVID"})
RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})


@dataclass(frozen=True)
class Argument:
    """
    One ESMTP parameter, such as C{SIZE=1024} or C{SMTPUTF8} (no value).
    The keyword is upper case.
    """

    keyword: str
    value: str | None = None

    def __str__(self) -> str:
        return self.keyword if self.value is None else f"{self.keyword}={self.value}"


def find(args: tuple[Argument, ...] | list[Argument], keyword: str) -> Argument | None:
    """
    The argument named C{keyword} among C{args}, if present.
    """
    keyword = keyword.upper()
    for arg in args:
        if arg.keyword == keyword:
            return arg
    return None


def _split(text: str) -> list[Argument]:
    args = []
    seen = set()
    for token in text.split():
        keyword, eq, value = token.partition("=")
        if not _KEYWORD.match(keyword) or (eq and value == ""):
            raise ArgumentError(Reply.parameter_error(f"5.5.4 Malformed parameter {token!r}"))
        keyword = keyword.upper()
        if keyword in seen:
            raise ArgumentError(Reply.parameter_error(f"5.5.4 Duplicate parameter {keyword}"))
        seen.add(keyword)
        args.append(Argument(keyword, value if eq else None))
    return args


def _need_xtext(arg: Argument) -> None:
    if arg.value is None or not dsn.is_xtext(arg.value):
        raise ArgumentError(Reply.parameter_error(f"5.5.4 Bad value for {arg.keyword}"))


def parse_mail_parameters(text: str, smtputf8_offered: bool = True) -> tuple[Argument, ...]:
    """
    Parse and check the parameters of C{MAIL FROM:<path> PARAMS}.

    @raise ArgumentError: with a 501 for malformed values and a 555 for
        parameters that the server does not support.
    """
    args = _split(text)
    for arg in args:
        k, v = arg.keyword, arg.value
        if k == "SIZE":
            if v is None or not (v.isascii() and v.isdigit()) or len(v) > 20:
                raise ArgumentError(Reply.parameter_error("5.5.4 SIZE needs a number"))
        elif k == "BODY":
            if v is None or v.upper() not in ("7BIT", "8BITMIME"):
                raise ArgumentError(
                    Reply.parameters_not_recognized("5.5.4 BODY must be 7BIT or 8BITMIME")
                )
        elif k == "SMTPUTF8":
            if v is not None:
                raise ArgumentError(Reply.parameter_error("5.5.4 SMTPUTF8 takes no value"))
            if not smtputf8_offered:
                raise ArgumentError(Reply.parameters_not_recognized("5.5.4 SMTPUTF8 not offered"))
        elif k == "RET":
            if v is None or v.upper() not in ("FULL", "HDRS"):
                raise ArgumentError(Reply.parameter_error("5.5.4 RET must be FULL or HDRS"))
        elif k == "ENVID":
            problem = dsn.check_envid(v)
            if problem is not None:
                raise ArgumentError(Reply.parameter_error(f"5.5.4 {problem}"))
        elif k == "AUTH":
            if v != "<>":
                _need_xtext(arg)
        else:
            raise ArgumentError(
                Reply.parameters_not_recognized(f"5.5.4 Unsupported parameter {k}")
            )
    return tuple(args)


def parse_rcpt_parameters(text: str, smtputf8: bool = False) -> tuple[Argument, ...]:
    """
    Parse and check the parameters of C{RCPT TO:<path> PARAMS}: DSN's
    NOTIFY and ORCPT (RFC 3461) are accepted and carried with the recipient
    (as given: ORCPT stays xtext, see L{relay.model.dsn}).

    @param smtputf8: the transaction is SMTPUTF8: ORCPT may hold UTF-8
        (RFC 6533 section 3).
    @raise ArgumentError: with a 501 that says what is wrong with a value,
        and a 555 for parameters the server does not support.
    """
    args = _split(text)
    for arg in args:
        problem: str | None = None
        if arg.keyword == "NOTIFY":
            problem = dsn.check_notify(arg.value)
        elif arg.keyword == "ORCPT":
            problem = dsn.check_orcpt(arg.value, smtputf8)
        else:
            raise ArgumentError(
                Reply.parameters_not_recognized(f"5.5.4 Unsupported parameter {arg.keyword}")
            )
        if problem is not None:
            raise ArgumentError(Reply.parameter_error(f"5.5.4 {problem}"))
    return tuple(args)
