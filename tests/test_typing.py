"""
The plugin API as a type checker sees it: a plugin written the ways the
README and DESIGN.md show passes C{mypy --strict}.
"""

from __future__ import annotations

import os
import textwrap

from twisted.trial.unittest import SkipTest, SynchronousTestCase

try:
    from mypy import api as mypy_api
except ImportError:  # mypy is a dev dependency
    mypy_api = None

# Each override style a plugin author may pick: an async def, a Deferred,
# a plain value, and the README's unannotated example.
TYPED_PLUGIN = """
from typing import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from relay import (
    Answer, Argument, Continue, EmailAddress, Envelope, EnvelopeResult,
    EnvelopeWithNextHop, HeloResult, RecipientResult, Reject, Reply, Send, Sender,
    SenderResult, Session, Simple,
)


class Policy(Simple):
    async def process_envelope(
        self, log: Logger, session: Session, envelope: Envelope
    ) -> EnvelopeResult:
        return Send([
            EnvelopeWithNextHop(envelope, next_hop_choices=["mx1.example.com:25"], dkim=False),
            EnvelopeWithNextHop(envelope, dkim="example.com"),
        ])

    def process_recipient(
        self, log: Logger, session: Session, sender: Sender,
        sender_args: Sequence[Argument], recipient: EmailAddress,
    ) -> Deferred[RecipientResult]:
        return succeed(Continue())

    def process_sender(
        self, log: Logger, session: Session, sender: Sender, sender_args: Sequence[Argument]
    ) -> SenderResult:
        return Reject(Reply(550, "5.7.1 no"))

    def session_helo(self, log: Logger, session: Session, helo: str) -> Answer[HeloResult]:
        return Continue()
"""

README_PLUGIN = """
# mypy: allow-untyped-defs
from relay import Continue, EnvelopeWithNextHop, Reject, Reply, Send, Simple


class MyPolicy(Simple):
    def process_recipient(self, log, session, sender, sender_args, recipient):
        if recipient.domain != "example.com":
            return Reject(Reply(550, "5.7.1 relaying denied"))
        return Continue()

    async def process_envelope(self, log, session, envelope):
        return Send([EnvelopeWithNextHop(envelope,
                                         next_hop_choices=["mx1.example.com:25"],
                                         retry_intervals=[60, 300])])
"""

# The control: an override that returns the wrong thing must be caught,
# or the checks above would prove nothing.
WRONG_PLUGIN = """
from typing import Sequence

from twisted.logger import Logger

from relay import Argument, Sender, Session, Simple


class Wrong(Simple):
    async def process_sender(
        self, log: Logger, session: Session, sender: Sender, sender_args: Sequence[Argument]
    ) -> int:
        return 250
"""

CONFIG = """
[mypy]
plugins = mypy_zope:plugin
ignore_missing_imports = true
"""


class PluginTypingTests(SynchronousTestCase):
    def setUp(self) -> None:
        if mypy_api is None:
            raise SkipTest("mypy is not installed")
        self.base = self.mktemp()
        os.makedirs(self.base)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.base, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def test_overrides_type_check(self) -> None:
        """
        L{relay.Simple}'s callbacks return an L{relay.Answer}, so that an
        override may be an C{async def}, return a L{Deferred} or a plain
        result, annotated or not: C{mypy --strict} accepts all of them,
        and still rejects an override that returns something else.
        """
        files = [
            self.write("typed_plugin.py", TYPED_PLUGIN),
            self.write("readme_plugin.py", README_PLUGIN),
            self.write("wrong_plugin.py", WRONG_PLUGIN),
        ]
        config = self.write("mypy.ini", CONFIG)
        out, err, status = mypy_api.run(
            [
                "--strict",
                "--config-file",
                config,
                "--cache-dir",
                os.path.join(self.base, "cache"),
                "--no-error-summary",
                *files,
            ]
        )
        errors = [line for line in out.splitlines() if ": error:" in line]
        self.assertEqual(len(errors), 1, out + err)
        self.assertIn("wrong_plugin.py", errors[0])
        self.assertIn('Return type "Coroutine[Any, Any, int]" of "process_sender"', errors[0])
        self.assertEqual(status, 1)
