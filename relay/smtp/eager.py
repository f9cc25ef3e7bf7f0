"""
Eager writes to a plain TCP transport.

Twisted buffers every C{write} and sends it on the next reactor iteration,
after registering the socket for writability and before unregistering it
again: for a protocol that writes one short reply per round trip, as SMTP
does, that is two C{epoll_ctl} calls and a reactor iteration per reply
(about a fifth of a receiving process's CPU time in the benchmark, see
bench/RESULTS.md).  L{write} sends at once when the transport is a plain
TCP connection with nothing buffered, and hands whatever the kernel did not
take (or any transport it does not know) to C{transport.write}, so that
ordering, producers and errors stay Twisted's.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import tcp

_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS)


def write(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}: straight to its socket when that is safe
    (a L{tcp.Connection}, connected, not TLS, nothing waiting in its
    buffers), else through C{transport.write}.
    """
    if (
        type(transport) in _PLAIN
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError as e:
            if e.errno not in _RETRY:
                # Let Twisted find and report the error on its own path.
                transport.write(data)
                return
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


_PLAIN = frozenset({tcp.Server, tcp.Client})
