"""
The AUTH checker from a C{twisted.cred.strcred} description (C{--auth
memory:alice:secret}), made the same way by C{twistd relay}'s options, by
L{relay.service.makeService} and by each receiver process.  twisted.cred
is imported only when AUTH is configured.
"""

from __future__ import annotations

from typing import Any


def make_checker(description: str) -> Any:
    """
    The L{twisted.cred.checkers.ICredentialsChecker} C{description} names.

    @raise Exception: strcred's error for a bad description.
    """
    from twisted.cred import strcred

    return bytes_users(strcred.makeChecker(description))


def bytes_users(checker: Any) -> Any:
    """
    The C{memory:} strcred checker keeps user names and passwords as text,
    but the relay (like L{twisted.cred.credentials.UsernamePassword} users
    generally) checks bytes: store them as UTF-8 bytes.
    """
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {
            (k.encode("utf-8") if isinstance(k, str) else k): (
                v.encode("utf-8") if isinstance(v, str) else v
            )
            for k, v in checker.users.items()
        }
    return checker
