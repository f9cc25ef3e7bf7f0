"""
C{relayctl}'s end of the control connection: one command per connection,
and the pages a streaming command sends back (L{ControlClient}), taken
one at a time: each page is answered only once it is printed, which is
what holds the relay back (see L{relay.control.rpc}).  The only
networking of C{relayctl} but for C{events}.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.error import ConnectionDone
from twisted.protocols import amp

from relay.control import rpc

#: C{on_entries(entries, ids, unreadable)}: a page of a listing (JSON
#: Lines, or ids, and unreadable lines; each may be C{None})
EntriesHandler = Callable[[str | None, str | None, str | None], None]
#: C{on_data(data)}: the next bytes of a message
DataHandler = Callable[[bytes], None]


class ControlClient(amp.AMP):
    """
    A control connection that takes the pages of L{rpc.Status} and the
    chunks of L{rpc.ShowMessage}.  A handler that raises (say, stdout was
    closed under C{relayctl status | head}) ends the connection: the relay
    sees the client go and stops reading.

    @ivar failure: what a handler raised, if it did.
    """

    def __init__(
        self, on_entries: EntriesHandler | None = None, on_data: DataHandler | None = None
    ) -> None:
        amp.AMP.__init__(self)
        self.on_entries = on_entries
        self.on_data = on_data
        self.failure: BaseException | None = None
        self.pages = 0

    def _take(self, handler: Callable[..., None] | None, *args: Any) -> dict[str, Any]:
        if self.failure is not None:
            return {}
        try:
            if handler is not None:
                handler(*args)
        except Exception as e:
            self.failure = e
            if self.transport is not None:
                self.transport.loseConnection()
        self.pages += 1
        return {}

    @rpc.EntriesPage.responder
    def entries_page(
        self,
        stream: int,
        entries: str | None = None,
        ids: str | None = None,
        unreadable: str | None = None,
    ) -> dict[str, Any]:
        return self._take(self.on_entries, entries, ids, unreadable)

    @rpc.MessageChunk.responder
    def message_chunk(self, stream: int, data: bytes) -> dict[str, Any]:
        return self._take(self.on_data, data)


class CallFailed(Exception):
    """
    Connecting or the call failed; the message is for the operator (or
    C{cause} is what a page handler raised).
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        Exception.__init__(self, message)
        self.cause = cause


def call_server(
    control: str, command: Any, client: ControlClient | None = None, **kwargs: Any
) -> dict[str, Any]:
    """
    Connect to the AMP control endpoint C{control} with C{client} (a plain
    L{ControlClient} when C{None}), call C{command} with C{kwargs} and
    return its response.  Runs the reactor until done.

    @raise CallFailed: on a connection failure or an AMP error (the error
        as raised, for its class, is C{cause}).
    """
    from twisted.internet import defer
    from twisted.internet.endpoints import clientFromString, connectProtocol
    from twisted.internet.task import react

    proto = client if client is not None else ControlClient()
    outcome: dict[str, Any] = {}

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        try:
            endpoint = clientFromString(reactor, control)
            yield connectProtocol(endpoint, proto)
        except Exception as e:
            outcome["error"] = CallFailed(f"cannot connect to {control}: {e}")
            return
        try:
            outcome["result"] = yield proto.callRemote(command, **kwargs)
        except Exception as e:
            outcome["error"] = e
        finally:
            if proto.transport is not None:
                proto.transport.loseConnection()

    try:
        react(run)
    except SystemExit:
        pass
    if proto.failure is not None:
        raise CallFailed(str(proto.failure), proto.failure)
    if "result" in outcome:
        return dict(outcome["result"])
    error = outcome.get("error")
    if isinstance(error, CallFailed):
        raise error
    if isinstance(error, ConnectionDone):
        raise CallFailed("the relay closed the control connection", error)
    if error is None:
        raise CallFailed("the control connection failed")
    raise CallFailed(str(error), error)
