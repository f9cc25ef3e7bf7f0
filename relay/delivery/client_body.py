"""
The message body on the wire: read in L{CHUNK_SIZE} chunks (from memory,
or from its spool file off the reactor thread) and framed either for DATA,
with CRLF line endings and exact dot-stuffing
(L{relay.smtp.stuffing.DotStuffer}), or as BDAT chunks (RFC 3030), the
bytes as stored (only a lone CR or LF becomes CRLF,
L{relay.smtp.stuffing.LineEndings}): no end marker, so no pass over the
body to stuff dots.

Reading (L{message_chunks}) and framing (L{write_data_body},
L{write_bdat_body}) are apart so that a change to the bytes on their way
(a signature header) reads the same chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncGenerator, Callable

from twisted.internet.defer import Deferred

from relay.delivery.client_protocol import SMTPClientProtocol
from relay.model.message import Message
from relay.model.reply import Reply
from relay.smtp.stuffing import DotStuffer, LineEndings

# A trip to the thread pool per chunk read from a file: with 64 KiB
# chunks the hand-offs were a sixth of the master's Python time on 1 MiB
# messages; 256 KiB took its CPU per message from 8.0-8.9 ms to 6.8-7.5 ms
# (W4, 4 sessions, 100 messages, two runs each).  Up to a few of them per
# delivery in memory (read, framed).
CHUNK_SIZE = 256 * 1024

#: C{f(callable, *args) -> Deferred}: runs C{callable} off the reactor
#: thread (a thread pool); C{None} where the client reads synchronously.
RunInThread = Callable[..., Any]


async def _call(run_in_thread: RunInThread | None, f: Callable[..., Any], *args: Any) -> Any:
    if run_in_thread is None:
        return f(*args)
    result = run_in_thread(f, *args)
    if isinstance(result, Deferred):
        result = await result
    return result


async def message_chunks(
    message: Message, run_in_thread: RunInThread | None
) -> AsyncGenerator[tuple[bytes, bool], None]:
    """
    The bytes of C{message} as stored, in chunks of L{CHUNK_SIZE} (the last
    maybe shorter or empty), each with whether it is the last.

    A message file is read one chunk per trip to the thread pool, opening
    and closing included, so that a small message costs a single trip.
    """
    if message.data is not None:
        data = message.data
        last = max(len(data) - 1, 0) // CHUNK_SIZE * CHUNK_SIZE
        for start in range(0, last, CHUNK_SIZE):
            yield data[start : start + CHUNK_SIZE], False
        yield data[last:], True
        return
    assert message.path is not None
    reader = _FileReader(message.path)
    try:
        while True:
            chunk = await _call(run_in_thread, reader.read)
            yield chunk, reader.done
            if reader.done:
                return
    finally:
        if not reader.done:
            await _call(run_in_thread, reader.close)


async def write_data_body(
    proto: SMTPClientProtocol, message: Message, run_in_thread: RunInThread | None
) -> None:
    """
    Write the body of C{message} after a 354 and the end-of-data marker,
    waiting while the hop does not read.  The last chunk and the marker go
    out in one write: a separate small write would wait for the hop's
    delayed ACK.
    """
    stuffer = DotStuffer(canonical=message.canonical, dot_free=message.dot_free)
    data = message.data
    if data is not None and len(data) <= CHUNK_SIZE:
        # The common case (the spool keeps small messages in memory): one
        # write, without the chunk reader's cost per message.
        proto.write(stuffer.encode(data) + stuffer.finish())
        return
    chunks = message_chunks(message, run_in_thread)
    try:
        async for chunk, last in chunks:
            if last:
                proto.write(stuffer.encode(chunk) + stuffer.finish())
            else:
                proto.write(stuffer.encode(chunk))
                await proto.writable()
    finally:
        # Closes the message file at once when the loop did not end.
        await chunks.aclose()


def bdat_command(chunk: bytes, last: bool) -> bytes:
    """
    C{chunk} as it goes on the wire: its BDAT command, then its bytes.
    """
    return b"BDAT %d%s\r\n%s" % (len(chunk), b" LAST" if last else b"", chunk)


def fits_one_chunk(message: Message) -> bool:
    """
    Whether C{message} goes as one chunk read from memory (what
    L{write_bdat_body} would send as a single C{BDAT n LAST}), so that it
    can go in the same write as the envelope's commands.
    """
    return message.data is not None and len(message.data) <= CHUNK_SIZE


def one_chunk(message: Message) -> bytes:
    """
    The whole of a message that L{fits_one_chunk}, as a C{BDAT n LAST}.
    """
    assert message.data is not None
    encoder = LineEndings(canonical=message.canonical)
    return bdat_command(encoder.encode(message.data) + encoder.finish(), last=True)


@dataclass(frozen=True)
class ChunksSent:
    """
    How the BDAT chunks of a message fared.

    @ivar reply: the reply that settles the message: the one to the last
        chunk, or the first refusal of an earlier one.
    @ivar complete: the last chunk was sent, so the hop's transaction is
        over; after a refusal it is not, and the session is not reused
        (RFC 3030 section 2: its state is "indeterminate").
    """

    reply: Reply
    complete: bool


async def write_bdat_body(
    proto: SMTPClientProtocol,
    message: Message,
    run_in_thread: RunInThread | None,
    pipelining: bool,
) -> ChunksSent:
    """
    Send the body of C{message} as BDAT chunks, one per chunk read (so a
    chunk's size is always that of the bytes in hand), the last with LAST,
    waiting while the hop does not read.  With PIPELINING the chunks go
    without waiting for their replies, which are read as they come; without
    it each chunk waits for its 250.  After a refusal no chunk is sent
    (RFC 3030 section 2) and the replies owed are read.

    Each chunk goes out in one write with its command: a failure between
    writes leaves the hop at a command boundary, never inside a chunk, and
    a message without its last chunk is never taken for whole.
    """
    encoder = LineEndings(canonical=message.canonical)
    owed = 0
    refusal: Reply | None = None
    complete = False
    chunks = message_chunks(message, run_in_thread)
    try:
        async for chunk, last in chunks:
            data = encoder.encode(chunk)
            if last:
                data += encoder.finish()
            proto.write(bdat_command(data, last))
            owed += 1
            if last:
                complete = True
                break
            if pipelining:
                await proto.writable()
                while proto.has_reply() and refusal is None:
                    owed -= 1
                    reply = await proto.next_reply()
                    if not reply.is_positive:
                        refusal = reply
            else:
                owed -= 1
                reply = await proto.next_reply()
                if not reply.is_positive:
                    refusal = reply
            if refusal is not None:
                break
    finally:
        # Closes the message file at once when the loop did not end.
        await chunks.aclose()
    final: Reply | None = refusal
    while owed:
        owed -= 1
        reply = await proto.next_reply()
        if final is None and (not reply.is_positive or not owed):
            final = reply
    assert final is not None
    return ChunksSent(final, complete)


class _FileReader:
    """
    Read a message file in L{CHUNK_SIZE} chunks, opening it on the first
    read and closing it on the read that reaches its end.

    @ivar done: the end of the file was read (and the file is closed).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._file: Any = None
        self.done = False

    def read(self) -> bytes:
        if self._file is None:
            self._file = open(self._path, "rb")
        chunk: bytes = self._file.read(CHUNK_SIZE)
        # A buffered read of a regular file returns less than asked only
        # at its end.
        if len(chunk) < CHUNK_SIZE:
            self.close()
            self.done = True
        return chunk

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()
