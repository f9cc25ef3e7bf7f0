"""
What signing did to the envelopes of one message transaction
(L{relay.dkim.signer.DkimSigner.sign}), for the server to spool and clean
up after.  Apart from the signer so that the server reads it without
importing dkimpy and C{cryptography} when nothing is signed.
"""

from __future__ import annotations

import dataclasses

from relay.model.envelope import EnvelopeWithNextHop
from relay.model.message import Message


@dataclasses.dataclass
class Signing:
    """
    What L{relay.dkim.signer.DkimSigner.sign} did to a set of envelopes.

    @ivar envelopes: the envelopes to spool, carrying signed messages
        where they are signed.
    @ivar made: the signed messages made (to discard if they are not
        spooled).
    @ivar replaced: the messages that no envelope carries any more (to
        discard once the envelopes are spooled, or are not).
    @ivar signed_as: C{"d=DOMAIN s=SELECTOR"} of each signature, for the
        log.
    """

    envelopes: tuple[EnvelopeWithNextHop, ...]
    made: list[Message] = dataclasses.field(default_factory=list)
    replaced: list[Message] = dataclasses.field(default_factory=list)
    signed_as: list[str] = dataclasses.field(default_factory=list)
