"""
The spool's lock: one relay at a time owns a spool directory.  The lock
is a C{flock} on C{<spool>/lock}, which holds the owner's pid so that a
second relay can say who has it.  Blocking: for start-up.

The receiving processes of C{--receivers N} inherit the open lock file
(L{relay.app.channel}), so the lock lasts until the last process of a
relay is gone, not only its master: receivers whose master was killed
(SIGKILL, the OOM killer) still commit the transactions they were in.  A
relay starting while they do waits for them (up to L{ORPHAN_WAIT}
seconds) rather than scanning the spool before their entries are there:
it sees that the pid in the file is gone.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import IO

from twisted.logger import Logger

from relay.spool.layout import DIR_MODE, SpoolLayout

log = Logger()

#: Seconds a starting relay waits for the receivers of a relay that is
#: gone: a stopping receiver's grace for its sessions (30 s by default)
#: and its master's time before SIGKILL (5 s), with a margin.
ORPHAN_WAIT = 40.0
#: How often the lock is tried again meanwhile.
ORPHAN_POLL = 0.05
#: How it waits (blocking: at start-up, before the reactor runs); tests
#: replace it.
_sleep = time.sleep


class SpoolLocked(Exception):
    """
    Another process (another relay) holds the spool's lock.
    """

    def __init__(self, path: str, pid: int | None, orphaned: bool = False) -> None:
        who = f" (pid {pid})" if pid is not None else ""
        if orphaned:
            text = f"spool {path} is still in use by the receivers of relay pid {pid}, which is gone"
        else:
            text = f"spool {path} is in use by another relay{who}"
        super().__init__(text)
        self.path = path
        self.pid = pid
        self.orphaned = orphaned


def _holder(f: IO[str]) -> int | None:
    f.seek(0)
    text = f.read().strip()
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _take_lock(layout: SpoolLayout, orphan_wait: float = ORPHAN_WAIT) -> IO[str]:
    """
    Open and C{flock} the lock file of the spool; if the relay whose pid
    it holds is gone, wait up to C{orphan_wait} seconds for its receivers.

    @raise SpoolLocked: naming the holder's pid, if another process has it.
    """
    f = open(layout.lock_path, "a+")
    deadline: float | None = None
    try:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return f
            except BlockingIOError:
                pid = _holder(f)
                if pid is None or _alive(pid):
                    raise SpoolLocked(os.path.abspath(layout.path), pid) from None
            now = time.monotonic()
            if deadline is None:
                deadline = now + orphan_wait
                log.warn(
                    "Spool {path}: relay pid {pid} is gone but its receivers still hold the "
                    "lock; waiting up to {wait} s for them to finish",
                    path=os.path.abspath(layout.path), pid=pid, wait=orphan_wait,
                )  # fmt: skip
            if now >= deadline:
                raise SpoolLocked(os.path.abspath(layout.path), pid, orphaned=True)
            _sleep(ORPHAN_POLL)
    except BaseException:
        f.close()
        raise


def check_unlocked(path: str, orphan_wait: float = ORPHAN_WAIT) -> None:
    """
    Check that no relay holds the spool at C{path} (taking and releasing
    its lock), so that C{twistd relay} can say so before it starts; the
    relay itself takes the lock with L{SpoolLock.acquire}.

    @raise SpoolLocked: if another process holds it.
    """
    _take_lock(SpoolLayout(path), orphan_wait).close()


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

    def __init__(self, layout: SpoolLayout, orphan_wait: float = ORPHAN_WAIT) -> None:
        self.layout = layout
        self.orphan_wait = orphan_wait
        self._file: IO[str] | None = None
        self.directory_fd: int | None = None
        self.taken_at: float | None = None

    def acquire(self) -> None:
        """
        Take the lock and write our pid in it; nothing if it is held
        already.  It does not wait for another relay, only for the
        receivers of one that is gone (up to C{orphan_wait} seconds).

        @raise SpoolLocked: if another process holds it.
        """
        if self._file is not None:
            return
        os.makedirs(self.layout.path, mode=DIR_MODE, exist_ok=True)
        f = _take_lock(self.layout, self.orphan_wait)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        self.directory_fd = os.open(self.layout.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.taken_at = time.time() - self.CLOCK_MARGIN

    def release(self) -> None:
        """
        Release the lock taken by L{acquire}: close our descriptor.  Not
        C{LOCK_UN}, which would release it for the receivers that share the
        open file too: the lock stays until the last of them is gone.
        """
        f, self._file = self._file, None
        fd, self.directory_fd = self.directory_fd, None
        if fd is not None:
            os.close(fd)
        if f is not None:
            f.close()

    def fileno(self) -> int | None:
        """
        The descriptor of the held lock file, which receivers inherit
        (L{relay.app.channel}); C{None} when not held.
        """
        return None if self._file is None else self._file.fileno()
