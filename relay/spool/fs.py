"""
The file-system seam: every change the spool makes to the disk goes
through one L{FileSystem}, one method per step, so that tests can fail or
kill any step (L{relay.testing.FaultyFileSystem}, and the crash tests'
model of what a power loss keeps).  Reads go straight to C{os}.

Also the few blocking steps built from them that the spool's modules
share.  Everything here blocks: it runs in the thread pool.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from typing import Callable, Iterable, cast

from twisted.logger import Logger

log = Logger()


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return cast(Callable[[int], int], syncfs)


_SYNCFS = _load_syncfs() if sys.platform.startswith("linux") else None


class FileSystem:
    """
    The spool's disk operations that change anything, one method per step.
    Errors are C{OSError}s with their C{errno}, as the OS gave them.
    """

    #: whether L{syncfs} works here (Linux)
    has_syncfs = _SYNCFS is not None

    def create(self, path: str) -> int:
        """
        Create C{path}, which must not exist (C{FileExistsError}), for
        writing; return its descriptor.
        """
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write(self, fd: int, data: bytes) -> None:
        """
        Write all of C{data} to C{fd}.
        """
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def close(self, fd: int) -> None:
        os.close(fd)

    def set_mtime(self, fd: int, when: float) -> None:
        """
        Set the modification time of the open file C{fd} (a waiting
        entry's metadata carries its next attempt time there: see
        L{relay.spool.reader.due_entries}).
        """
        os.utime(fd, (when, when))

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fsync_path(self, path: str) -> None:
        """
        fsync the file or directory C{path}.
        """
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def syncfs(self, path: str, fd: int | None = None) -> None:
        """
        Make everything written to the filesystem holding C{path} durable
        (Linux C{syncfs(2)}, which reports write-back errors since 5.8).

        @param fd: a descriptor of C{path} kept open since before the
            writes, if there is one: syncfs reports an error to each open
            descriptor once, so an error another process already saw
            still reaches this one.
        """
        if _SYNCFS is None:
            raise OSError(errno.ENOSYS, "syncfs is not available", path)
        own = fd is None
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _SYNCFS(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), path)
        finally:
            if own:
                os.close(fd)

    def link(self, src: str, dst: str) -> None:
        os.link(src, dst)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def copy(self, src: str, dst: str) -> None:
        """
        Copy C{src} to a new file C{dst} (not fsynced).
        """
        shutil.copyfile(src, dst)


def write_new(
    fs: FileSystem, path: str, data: bytes, sync: bool, mtime: float | None = None
) -> None:
    """
    Create C{path} (it must not exist) with C{data}, fsynced if C{sync},
    with the modification time C{mtime} if given (set before the fsync, so
    that it is as durable as the data).
    """
    fd = fs.create(path)
    try:
        fs.write(fd, data)
        if mtime is not None:
            fs.set_mtime(fd, mtime)
        if sync:
            fs.fsync(fd)
    finally:
        fs.close(fd)


def unlink_if_present(fs: FileSystem, path: str) -> bool:
    """
    Remove C{path}; C{False} if there was nothing to remove.
    """
    try:
        fs.unlink(path)
    except FileNotFoundError:
        return False
    return True


def remove_all(fs: FileSystem, paths: Iterable[str]) -> None:
    """
    Remove C{paths} (last first) after a failure; whatever cannot be
    removed now is left to L{DiskSpool.recover<relay.spool.disk.DiskSpool.recover>}.
    """
    for path in reversed(list(paths)):
        try:
            fs.unlink(path)
        except FileNotFoundError:
            pass
        except Exception as e:
            log.warn("cannot remove {path}: {error}", path=path, error=repr(e))


def link_or_copy(fs: FileSystem, src: str, dst: str) -> None:
    """
    Hard-link C{src} to C{dst}, or copy it (fsynced, through C{<dst>.tmp})
    across filesystems.
    """
    try:
        fs.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        tmp = dst + ".tmp"
        try:
            fs.copy(src, tmp)
            fs.fsync_path(tmp)
            fs.rename(tmp, dst)
        except BaseException:
            unlink_if_present(fs, tmp)
            raise
