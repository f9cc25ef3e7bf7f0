"""
The values of relay: immutable dataclasses for what the plugin API and the
spool pass around (addresses, ESMTP arguments, replies, sessions, envelopes,
messages, callback results, spool entries, retry schedules).
"""
