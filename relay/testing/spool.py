"""
Doubles for the disk spool's tests: L{FaultyFileSystem}, a disk under a
L{relay.spool.disk.DiskSpool} that fails chosen steps (ENOSPC, EIO, ...);
and L{QueuedRunner}, a thread runner whose calls wait for the test.  (The
in-memory spool is L{relay.spool.memory.MemorySpool}.)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred

from relay.spool.fs import FileSystem


@dataclasses.dataclass
class _Fault:
    step: str
    errno: int
    path: str
    times: int


class FaultyFileSystem(FileSystem):
    """
    A L{FileSystem} (the real disk) that records each step a
    L{relay.spool.disk.DiskSpool} takes and fails the ones a test chose, with
    an C{OSError} carrying the chosen errno, before the step is done.

    The steps are C{create}, C{write}, C{close} (which closes the
    descriptor before failing, as close(2) does), C{fsync} (of a
    descriptor or a path), C{syncfs}, C{set_mtime}, C{link}, C{rename}, C{unlink} and
    C{copy}.

    @ivar steps: C{(step, path)} of every step tried, in order.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self._faults: list[_Fault] = []
        self._paths: dict[int, str] = {}

    def fail(self, step: str, error: int, path: str = "*", times: int = 1) -> None:
        """
        Make the next C{times} C{step}s on a path matching the glob C{path}
        fail with errno C{error}.
        """
        self._faults.append(_Fault(step, error, path, times))

    def heal(self) -> None:
        """
        Forget every fault still pending.
        """
        self._faults = []

    def step(self, name: str, path: str) -> None:
        """
        Called before each step: record it, and raise its fault if any.
        """
        self.steps.append((name, path))
        for fault in self._faults:
            if fault.step == name and fault.times > 0 and fnmatch.fnmatchcase(path, fault.path):
                fault.times -= 1
                raise OSError(fault.errno, os.strerror(fault.errno), path)

    def create(self, path: str) -> int:
        self.step("create", path)
        fd = super().create(path)
        self._paths[fd] = path
        return fd

    def write(self, fd: int, data: bytes) -> None:
        self.step("write", self._paths.get(fd, ""))
        super().write(fd, data)

    def close(self, fd: int) -> None:
        path = self._paths.pop(fd, "")
        super().close(fd)
        self.step("close", path)

    def set_mtime(self, fd: int, when: float) -> None:
        self.step("set_mtime", self._paths.get(fd, ""))
        super().set_mtime(fd, when)

    def fsync(self, fd: int) -> None:
        self.step("fsync", self._paths.get(fd, ""))
        super().fsync(fd)

    def fsync_path(self, path: str) -> None:
        self.step("fsync", path)
        super().fsync_path(path)

    def syncfs(self, path: str, fd: int | None = None) -> None:
        self.step("syncfs", path)
        super().syncfs(path, fd)

    def link(self, src: str, dst: str) -> None:
        self.step("link", dst)
        super().link(src, dst)

    def rename(self, src: str, dst: str) -> None:
        self.step("rename", dst)
        super().rename(src, dst)

    def unlink(self, path: str) -> None:
        self.step("unlink", path)
        super().unlink(path)

    def copy(self, src: str, dst: str) -> None:
        self.step("copy", dst)
        super().copy(src, dst)


class QueuedRunner:
    """
    A C{run_in_thread} for a spool under test: calls wait until the test
    runs them (L{run_one}, L{run_all}), so that several commits pile up
    into one batch, or a test can look between the steps.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((d, f, args, kw))
        return d

    def run_one(self) -> None:
        d, f, args, kw = self.calls.pop(0)
        defer.maybeDeferred(f, *args, **kw).chainDeferred(d)

    def run_all(self) -> None:
        while self.calls:
            self.run_one()
