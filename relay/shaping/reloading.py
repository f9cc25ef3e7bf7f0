"""
SIGHUP for the shaping file: read it again off the reactor thread and hand
it to the shaper, or keep the one in use when the new one is bad.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from zope.interface import implementer

from relay.app.reload import ReloadError
from relay.interfaces import IReloadable
from relay.shaping.config import ShapingFileError, load
from relay.shaping.shaper import Shaper


@implementer(IReloadable)
class ShapingFile:
    """
    The shaping file at C{path}, in use by C{shaper}.
    """

    what = "shaping file"

    def __init__(self, path: str, shaper: Shaper) -> None:
        self.path = path
        self.shaper = shaper

    def reload(self, run_in_thread: Callable[..., Deferred[Any]]) -> Deferred[str]:
        async def reload() -> str:
            try:
                config = await run_in_thread(load, self.path)
            except ShapingFileError as e:
                raise ReloadError(str(e)) from None
            self.shaper.configure(config)
            return (
                f"shaping file {self.path}: {len(config.domains)} domains, "
                f"{len(config.providers)} providers, {len(config.rules)} reply rules"
            )

        return Deferred.fromCoroutine(reload())
