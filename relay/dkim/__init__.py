"""
DKIM signing (RFC 6376; Ed25519 keys per RFC 8463): the keys file of
C{--dkim-keys} (L{relay.dkim.keys}), the body hash computed in chunks
(L{relay.dkim.canonical}), the C{DKIM-Signature} header field
(L{relay.dkim.signature}), the signer the SMTP server calls before a
message is spooled (L{relay.dkim.signer}) and the DNS record to publish
(L{relay.dkim.record}, C{relayctl dkim-record}).
"""


class DkimKeysError(ValueError):
    """
    The keys file cannot be used; the message names the file (and the
    line) and says why, for the operator: C{dkim.keys line 3: ...}.  Here,
    not in L{relay.dkim.keys}, so that catching it imports nothing heavy.
    """
