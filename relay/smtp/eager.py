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

Knowing that nothing is buffered takes the TCP transport's private
buffers: the function itself lives with relay's other uses of Twisted
internals, in L{relay.app._compat} (as C{eager_write}).
"""

from __future__ import annotations

from relay.app._compat import eager_write as write

__all__ = ["write"]
