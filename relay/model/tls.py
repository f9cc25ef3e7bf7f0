"""
TLS policies in words: what the C{--tls-policy} file says per destination,
and what a plugin may choose for an envelope
(C{EnvelopeWithNextHop.tls_policy}): L{parse_policy}.  What each policy
does is L{relay.delivery.tlspolicy}'s business; here is only its syntax, so
that an envelope can be checked when the plugin makes it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The words of a policy, in the file and from the plugin.
POLICY_NAMES = ("none", "may", "encrypt", "verify", "dane", "dane-only", "mta-sts")


@dataclass(frozen=True)
class PolicyRule:
    """
    A policy as the file or the plugin says it.

    @ivar name: one of L{POLICY_NAMES}.
    @ivar match: the names a C{verify} certificate may show instead of the
        host's.
    """

    name: str
    match: tuple[str, ...] = ()


def parse_policy(text: str) -> PolicyRule:
    """
    The policy C{text} says: a name of L{POLICY_NAMES}, then for C{verify}
    an optional C{match=NAME[:NAME...]} (Postfix's form; commas work too).

    @raise ValueError: naming what is wrong.
    """
    words = text.split()
    if not words or words[0].lower() not in POLICY_NAMES:
        raise ValueError(
            f"TLS policy must be one of {', '.join(POLICY_NAMES)}, not {text.strip()!r}"
        )
    name = words[0].lower()
    match: list[str] = []
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if key.lower() != "match" or not sep or name != "verify":
            raise ValueError(f"unexpected {word!r} after {name} (only verify takes match=)")
        names = [n.strip().lower().rstrip(".") for n in value.replace(",", ":").split(":")]
        if not all(names):
            raise ValueError(f"empty name in {word!r}")
        match += names
    return PolicyRule(name, tuple(match))


