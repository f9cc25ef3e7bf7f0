"""
What C{twistd relay} runs (C{twisted/plugins/relay_plugin.py} names this
module): L{relay.tap}'s options and service, and what only a process that
is the relay should do, not a test that builds one with
L{relay.tap.makeService}: twistd's text log made cheaper
(L{relay.app._compat.cache_log_times}) and, once the reactor runs, the
startup heap settled (L{relay.app.heap}).
"""

from __future__ import annotations

from typing import Any

from relay.tap import Options

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> Any:
    """
    L{relay.tap.makeService}, in the twistd process.
    """
    from relay import tap
    from relay.app._compat import cache_log_times
    from relay.app.heap import settle_startup_heap

    # The text log writes a line or two a message.
    cache_log_times()
    service = tap.makeService(options)
    # Imported by the service's making, in the order it needs.
    from twisted.internet import reactor

    reactor.callWhenRunning(settle_startup_heap)  # type: ignore[attr-defined]
    return service
