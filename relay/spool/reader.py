"""
Reading a spool directory: entries and messages, through its
L{SpoolLayout} and the L{codec<relay.spool.codec>}.  Nothing here writes,
so that C{relayctl} reads a spool no relay runs on with the same code as
the disk spool's thread side.  Everything here blocks.
"""

from __future__ import annotations

import os

from relay.model.entry import QUEUES, SpoolEntry
from relay.model.message import MAX_HEADER_BYTES, Message, header_section, parse_header_block
from relay.spool.codec import decode_entry
from relay.spool.layout import SpoolLayout, is_safe_id

#: what makes a metadata file unreadable (besides its absence)
UNREADABLE = (OSError, ValueError, KeyError, TypeError)

#: a queue's entries, and C{(path, error)} of its unreadable files
QueueListing = tuple[list[SpoolEntry], list[tuple[str, Exception]]]


def read_entry(layout: SpoolLayout, queue: str, entry_id: str) -> SpoolEntry:
    """
    The entry whose metadata is in C{queue}.

    @raise FileNotFoundError: if it is not there.
    @raise ValueError: (or C{KeyError}, C{TypeError}) if the file is not
        an entry this code can read.
    """
    with open(layout.metadata_path(queue, entry_id), "rb") as f:
        return decode_entry(f.read(), queue)


def read_queue(layout: SpoolLayout, queue: str) -> QueueListing:
    """
    The entries of C{queue}, oldest first, and C{(path, error)} of each
    metadata file that could not be read (left out).  A queue directory
    that does not exist is an empty queue.

    @raise ValueError: if there is no such queue.
    """
    try:
        ids = layout.entry_ids(queue)
    except FileNotFoundError:
        return [], []
    entries = []
    errors: list[tuple[str, Exception]] = []
    for entry_id in ids:
        try:
            entries.append(read_entry(layout, queue, entry_id))
        except FileNotFoundError:
            continue  # moved or finished while we looked
        except UNREADABLE as e:
            errors.append((layout.metadata_path(queue, entry_id), e))
    entries.sort(key=lambda e: (e.created_at, e.id))
    return entries, errors


def find_queue(layout: SpoolLayout, entry_id: str) -> str:
    """
    The queue C{entry_id} is in.

    @raise KeyError: if there is no such entry.
    """
    if not is_safe_id(entry_id):
        raise KeyError(entry_id)
    for _ in range(2):  # a second look, in case a move ran in between
        for queue in QUEUES:
            if os.path.exists(layout.metadata_path(queue, entry_id)):
                return queue
    raise KeyError(entry_id)


def read_message(layout: SpoolLayout, entry_id: str, in_memory_up_to: int) -> Message:
    """
    The message of entry C{entry_id}: read whole when it is at most
    C{in_memory_up_to} bytes (so that sending it needs no more trips to the
    thread pool), else its header section only, with the file's path.

    @raise KeyError: if there is no such entry, or its message is gone.
    """
    find_queue(layout, entry_id)
    path = layout.message_path(entry_id)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise KeyError(entry_id) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size <= in_memory_up_to:
            data = f.read()
            return Message(parse_header_block(header_section(data)), len(data), data=data)
        head = f.read(MAX_HEADER_BYTES)
    return Message(parse_header_block(header_section(head)), size, path=path)


def find_entry(layout: SpoolLayout, entry_id: str) -> SpoolEntry:
    """
    The entry C{entry_id}, in whatever queue it is.

    @raise KeyError: if there is no such entry.
    """
    return read_entry(layout, find_queue(layout, entry_id), entry_id)
