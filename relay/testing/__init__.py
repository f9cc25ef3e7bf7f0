"""
The test kit of relay, for plugin authors and for relay's own tests.  It
needs no test framework: failures are C{AssertionError}s, the rest are
values to assert on, so trial, pytest and unittest all work.

Run a plugin in the real server, over an in-memory connection:
L{run_transcript} (one whole session) and L{ServerHarness} (a session a
test drives step by step), which check L{TranscriptResult}s against
C{< 250 ...} / C{> EHLO ...} transcripts.

Call one callback by hand: L{call_callback} with a L{make_session} and a
L{make_envelope}; record what the server asks a plugin with
L{RecordingCallbacks}.

Doubles of the spool: L{MemorySpool} (an in-memory L{ISpool<relay.interfaces.ISpool>},
from L{relay.spool.memory}), and for the disk spool L{FaultyFileSystem}
and L{QueuedRunner}.

Run the relay client against the real server (with a plugin) in memory:
L{ClientHarness}, each of whose L{HarnessConnection}s checks its transcript.
"""

from relay.interfaces import Answer
from relay.spool.memory import MemoryMessageWriter, MemorySpool, allocate_ids
from relay.testing.callbacks import (
    CallbackCall,
    CheckAuthenticationCredentialsCall,
    ProcessEnvelopeCall,
    ProcessRecipientCall,
    ProcessSenderCall,
    RecordingCallbacks,
    RpcsCall,
    SessionConnectCall,
    SessionHeloCall,
    call_callback,
    call_callback_deferred,
    make_envelope,
    make_session,
)
from relay.testing.client import ClientHarness, HarnessConnection, MemoryTransport
from relay.testing.spool import FaultyFileSystem, QueuedRunner
from relay.testing.transcript import (
    LOCAL_ADDRESS,
    REMOTE_ADDRESS,
    ServerHarness,
    ServerOptions,
    TLSStringTransport,
    TranscriptMismatch,
    TranscriptResult,
    run_transcript,
)

__all__ = [
    "Answer",
    "CallbackCall",
    "CheckAuthenticationCredentialsCall",
    "ClientHarness",
    "FaultyFileSystem",
    "HarnessConnection",
    "LOCAL_ADDRESS",
    "MemoryMessageWriter",
    "MemorySpool",
    "MemoryTransport",
    "ProcessEnvelopeCall",
    "ProcessRecipientCall",
    "ProcessSenderCall",
    "QueuedRunner",
    "REMOTE_ADDRESS",
    "RecordingCallbacks",
    "RpcsCall",
    "ServerHarness",
    "ServerOptions",
    "SessionConnectCall",
    "SessionHeloCall",
    "TLSStringTransport",
    "TranscriptMismatch",
    "TranscriptResult",
    "allocate_ids",
    "call_callback",
    "call_callback_deferred",
    "make_envelope",
    "make_session",
    "run_transcript",
]
