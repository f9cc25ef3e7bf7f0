"""
Where everything is in a spool directory: one place for the disk spool
(L{relay.spool.disk}) and for C{relayctl}'s reads of a spool no relay
runs on (L{relay.control.ctl}).

Under the spool directory::

    lock                    held (flock) by the running relay, with its pid
    control.sock            the control socket (the default --control)
    tmp/                    bodies being received, metadata being written
    messages/<id>.eml       message bytes; hard links to one inode when one
                            message is shared by several envelopes
    active/<id>.json        metadata of entries waiting for delivery
    frozen/<id>.json        metadata of frozen entries
    removed/<id>.json       metadata of entries removed by an operator

and in the quarantine directory (C{<spool>/quarantine} unless given)
C{<id>.json} (with the reason) beside C{<id>.eml} (a hard link to the
message, or a copy on another filesystem); C{*.tmp} there are files being
written.

The queue an entry is in is the directory its metadata is in.  Entry ids
and message ids are L{safe<is_safe_id>} file names, so that no id names a
file elsewhere.
"""

from __future__ import annotations

import os
import re

from relay.model.entry import ACTIVE, FROZEN, QUARANTINE, REMOVED

#: the mode of every directory the spool makes
DIR_MODE = 0o700
#: the control socket's name in the spool directory
CONTROL_SOCKET = "control.sock"
LOCK_FILE = "lock"
METADATA = ".json"
MESSAGE = ".eml"
#: the suffix of files being written beside the quarantine
PARTIAL = ".tmp"

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$")


def is_safe_id(text: str) -> bool:
    """
    Can C{text} be an entry's or a message's id: a file name of letters,
    digits, C{.}, C{_} and C{-} that does not start with a dot?
    """
    return _SAFE_ID.match(text) is not None


def quote_endpoint_value(text: str) -> str:
    """
    C{text} quoted for a Twisted endpoint description (C{\\}, C{:} and
    C{=} escaped with a backslash).
    """
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def control_socket_path(spool: str) -> str:
    """
    The control socket in the spool at C{spool}, relative if C{spool} is
    (an C{AF_UNIX} path is short: a relative one may fit where the
    absolute one does not).
    """
    return os.path.join(spool, CONTROL_SOCKET)


def control_in_spool(spool: str) -> str:
    """
    The default control endpoint: a unix socket inside the spool, so that
    each spool has its own and C{relayctl --spool DIR} finds it
    (C{unix:./spool/control.sock} for the default spool).
    """
    path = control_socket_path(spool)
    if not os.path.isabs(path) and not path.startswith(("./", "../")):
        path = "./" + path
    return "unix:" + quote_endpoint_value(path)


class NotASpool(Exception):
    """
    The directory is missing, or is not a relay's spool.
    """


class SpoolLayout:
    """
    The paths of one spool directory and its quarantine (see the module
    docstring), and the one step that changes the layout itself: making
    its directories.

    @ivar quarantine_elsewhere: whether the quarantine is on another
        filesystem than the spool (known once L{make_directories} ran):
        then its files are copies, and it needs its own sync.
    """

    def __init__(self, path: str, quarantine_path: str | None = None) -> None:
        """
        @param path: the spool directory, as given (relative paths stay
            relative, so that error messages name what the operator typed).
        @param quarantine_path: the quarantine; C{<path>/quarantine} when
            C{None}.
        """
        self.path = path
        self.quarantine_path = (
            quarantine_path if quarantine_path is not None else os.path.join(path, QUARANTINE)
        )
        self.tmp_dir = os.path.join(path, "tmp")
        self.messages_dir = os.path.join(path, "messages")
        self.lock_path = os.path.join(path, LOCK_FILE)
        self._queue_dirs = {
            ACTIVE: os.path.join(path, ACTIVE),
            FROZEN: os.path.join(path, FROZEN),
            REMOVED: os.path.join(path, REMOVED),
            QUARANTINE: self.quarantine_path,
        }
        self._tmp_dir_absolute = os.path.abspath(self.tmp_dir)
        self._made = False
        self.quarantine_elsewhere = False

    def queue_dir(self, queue: str) -> str:
        """
        The directory holding the metadata of C{queue}'s entries.

        @raise ValueError: if there is no such queue.
        """
        try:
            return self._queue_dirs[queue]
        except KeyError:
            raise ValueError(f"no such queue {queue!r}") from None

    def metadata_path(self, queue: str, entry_id: str) -> str:
        return os.path.join(self.queue_dir(queue), entry_id + METADATA)

    def metadata_tmp(self, queue: str, entry_id: str) -> str:
        """
        Where new metadata for C{queue} is written before its rename: in
        C{tmp/}, or beside the quarantine (which may be another filesystem:
        a rename does not cross filesystems).
        """
        if queue == QUARANTINE:
            return self.metadata_path(queue, entry_id) + PARTIAL
        return os.path.join(self.tmp_dir, entry_id + METADATA)

    def message_path(self, entry_id: str) -> str:
        return os.path.join(self.messages_dir, entry_id + MESSAGE)

    def quarantined_message_path(self, entry_id: str) -> str:
        """
        The link to (or copy of) a quarantined entry's message, beside its
        metadata, so that the quarantine can be inspected on its own.
        """
        return os.path.join(self.quarantine_path, entry_id + MESSAGE)

    def spilled_path(self, message_id: str) -> str:
        """
        The file a message being received spills to once it is large.
        """
        return os.path.join(self.tmp_dir, message_id + MESSAGE)

    def is_tmp(self, path: str) -> bool:
        """
        Is C{path} a file in C{tmp/} (which the spool may remove)?
        """
        return os.path.dirname(os.path.abspath(path)) == self._tmp_dir_absolute

    def entry_ids(self, queue: str) -> list[str]:
        """
        The ids of the entries whose metadata is in C{queue}'s directory,
        in no order.  Blocking.

        @raise FileNotFoundError: if the directory does not exist.
        """
        return _ids(self.queue_dir(queue), METADATA)

    def message_ids(self) -> list[str]:
        """
        The ids of the message files in C{messages/}.  Blocking.
        """
        return _ids(self.messages_dir, MESSAGE)

    def quarantined_message_ids(self) -> list[str]:
        """
        The ids of the message files in the quarantine.  Blocking.
        """
        return _ids(self.quarantine_path, MESSAGE)

    def partial_quarantine_files(self) -> list[str]:
        """
        The paths of the files being written beside the quarantine (left
        behind by a crash).  Blocking.
        """
        return [
            os.path.join(self.quarantine_path, name)
            for name in os.listdir(self.quarantine_path)
            if name.endswith(PARTIAL)
        ]

    def make_directories(self) -> None:
        """
        Make the spool's directories (mode 0700) unless this layout did
        already, and find out whether the quarantine is on another
        filesystem.  Blocking: from the thread pool, or at start-up.
        """
        if self._made:
            return
        for d in (self.path, self.tmp_dir, self.messages_dir, *self._queue_dirs.values()):
            os.makedirs(d, mode=DIR_MODE, exist_ok=True)
        self.quarantine_elsewhere = (
            os.stat(self.quarantine_path).st_dev != os.stat(self.path).st_dev
        )
        self._made = True

    def check(self) -> None:
        """
        Check that the spool directory is a relay's spool, so that a wrong
        directory is an error rather than an empty queue.  Blocking.

        @raise NotASpool: naming the directory and what is wrong.
        """
        if not os.path.isdir(self.path):
            raise NotASpool(f"no spool at {self.path}: no such directory")
        if not os.path.isdir(self._queue_dirs[ACTIVE]):
            raise NotASpool(f"{self.path} is not a relay spool (it has no {ACTIVE}/ directory)")


def _ids(directory: str, suffix: str) -> list[str]:
    return [name[: -len(suffix)] for name in os.listdir(directory) if name.endswith(suffix)]

