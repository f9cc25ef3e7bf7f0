"""
The spool's lock: one relay at a time owns a spool directory.  The lock
is a C{flock} on C{<spool>/lock}, which holds the owner's pid so that a
second relay can say who has it.  Blocking: for start-up.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import IO

from relay.spool.layout import DIR_MODE, SpoolLayout


class SpoolLocked(Exception):
    """
    Another process (another relay) holds the spool's lock.
    """

    def __init__(self, path: str, pid: int | None) -> None:
        who = f" (pid {pid})" if pid is not None else ""
        super().__init__(f"spool {path} is in use by another relay{who}")
        self.path = path
        self.pid = pid


def _take_lock(layout: SpoolLayout) -> IO[str]:
    """
    Open and C{flock} the lock file of the spool.

    @raise SpoolLocked: naming the holder's pid, if another process has it.
    """
    f = open(layout.lock_path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        text = f.read().strip()
        f.close()
        raise SpoolLocked(
            os.path.abspath(layout.path), int(text) if text.isdigit() else None
        ) from None
    except BaseException:
        f.close()
        raise
    return f


def check_unlocked(path: str) -> None:
    """
    Check that no relay holds the spool at C{path} (taking and releasing
    its lock), so that C{twistd relay} can say so before it starts; the
    relay itself takes the lock with L{SpoolLock.acquire}.

    @raise SpoolLocked: if another process holds it.
    """
    _take_lock(SpoolLayout(path)).close()


class SpoolLock:
    """
    The lock of one spool, as its owner holds it.

    @ivar directory_fd: a descriptor of the spool directory, open while the
        lock is held, for C{syncfs(2)}: it then hears of every write-back
        error since the relay started (see
        L{FileSystem.syncfs<relay.spool.fs.FileSystem.syncfs>}).
    @ivar taken_at: a time (the system's, as file times are) before the
        lock was taken, by a margin for the filesystem's coarse clock:
        every file made in the spool since is the holder's own.
    """

    #: seconds the filesystem's timestamps may lag the system's time
    CLOCK_MARGIN = 2.0

    def __init__(self, layout: SpoolLayout) -> None:
        self.layout = layout
        self._file: IO[str] | None = None
        self.directory_fd: int | None = None
        self.taken_at: float | None = None

    def acquire(self) -> None:
        """
        Take the lock (non-blocking) and write our pid in it; nothing if
        it is held already.

        @raise SpoolLocked: if another process holds it.
        """
        if self._file is not None:
            return
        os.makedirs(self.layout.path, mode=DIR_MODE, exist_ok=True)
        f = _take_lock(self.layout)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        self.directory_fd = os.open(self.layout.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.taken_at = time.time() - self.CLOCK_MARGIN

    def release(self) -> None:
        """
        Release the lock taken by L{acquire}.
        """
        f, self._file = self._file, None
        fd, self.directory_fd = self.directory_fd, None
        if fd is not None:
            os.close(fd)
        if f is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            f.close()
