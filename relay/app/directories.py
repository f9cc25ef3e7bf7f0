"""
The spool and quarantine directories at start-up: created when missing,
refused when they hold something else (L{prepare_directories}), before the
relay is built, so that a mistake ends C{twistd relay} with one line.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence


class StartupError(Exception):
    """
    The relay cannot start as configured.  The message is one line for
    the operator that names the option or path and the cause.
    """


def _looks_like_spool(names: Sequence[str]) -> bool:
    return "lock" in names or "active" in names


def _looks_like_quarantine(names: Sequence[str]) -> bool:
    return all(name.endswith((".json", ".eml", ".tmp")) for name in names)


def prepare_directories(spool: str, quarantine: str) -> None:
    """
    Create the spool and quarantine directories (mode 0700) when missing,
    and check that those that exist are ours and writable: a relay started
    on the wrong directory must not make it its own (recovery empties a
    spool's C{tmp/}).  Blocking: for start-up, before the reactor runs.

    @raise StartupError: naming the option, the path and the cause.
    """
    if os.path.abspath(spool) == os.path.abspath(quarantine):
        raise StartupError(f"--quarantine {quarantine}: must not be the spool directory")
    _prepare_directory("--spool", spool, "spool", _looks_like_spool)
    _prepare_directory("--quarantine", quarantine, "quarantine", _looks_like_quarantine)


def _prepare_directory(
    option: str, path: str, what: str, looks_right: Callable[[Sequence[str]], bool]
) -> None:
    try:
        names = [name for name in os.listdir(path) if not name.startswith(".")]
    except FileNotFoundError:
        try:
            os.makedirs(path, mode=0o700)
        except OSError as e:
            raise StartupError(f"{option} {path}: cannot create it: {e.strerror}") from None
        names = []
    except NotADirectoryError as e:
        if os.path.exists(path):
            raise StartupError(f"{option} {path}: not a directory") from None
        raise StartupError(f"{option} {path}: cannot create it: {e.strerror}") from None
    except OSError as e:
        raise StartupError(f"{option} {path}: cannot read it: {e.strerror}") from None
    if names and not looks_right(names):
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise StartupError(
            f"{option} {path}: not a relay {what} (it holds {shown}); "
            "give a new or empty directory"
        )
    try:
        _write_probe(path)
    except OSError as e:
        raise StartupError(f"{option} {path}: not writable: {e.strerror}") from None


def _write_probe(directory: str) -> None:
    """
    Create and remove a file in C{directory}: C{os.access} says yes to
    root even on a read-only filesystem, so try it.
    """
    probe = os.path.join(directory, f".write-check-{os.getpid()}")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    os.unlink(probe)
