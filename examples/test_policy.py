"""
Tests for L{examples.policy.LocalPolicy}, written with L{relay.testing}.

They use the standard library's C{unittest} to show that the kit needs no
particular framework: C{trial examples}, C{python -m unittest
examples.test_policy} and pytest all run them.
"""

from __future__ import annotations

import unittest

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.logger import Logger

from examples.policy import LocalPolicy
from relay import (
    NULL_SENDER,
    Continue,
    Defaults,
    EmailAddress,
    Quarantine,
    Reject,
    Reply,
    Send,
    Session,
)
from relay.testing import (
    ProcessEnvelopeCall,
    RecordingCallbacks,
    call_callback,
    make_envelope,
    make_session,
    run_transcript,
)

log = Logger()

GREETING = """
< 220 mx.example.com ESMTP
> EHLO client.example
< 250-mx.example.com
< re:250-.*
< re:250-.*
< re:250-.*
< re:250-.*
< re:250-.*
< 250-SMTPUTF8
< 250 CHUNKING
"""


def rcpt(address: str) -> EmailAddress:
    return EmailAddress.parse(address)


class RecipientTests(unittest.TestCase):
    """
    C{process_recipient}, called directly with made-up sessions.
    """

    def setUp(self) -> None:
        self.policy = LocalPolicy()

    def check(self, session: Session, recipient: str) -> Continue | Reject:
        return call_callback(
            self.policy.process_recipient, log, session, NULL_SENDER, [], rcpt(recipient)
        )

    def test_own_domain_from_anywhere(self) -> None:
        """
        Anyone may send to our domains, whatever the case of the domain.
        """
        self.assertEqual(
            self.check(make_session(remote="203.0.113.9"), "bob@Example.NET"), Continue()
        )

    def test_stranger_may_not_relay(self) -> None:
        """
        A client neither authenticated nor on a trusted network gets 554
        for a recipient elsewhere.
        """
        result = self.check(make_session(remote="203.0.113.9"), "carol@elsewhere.example")
        self.assertEqual(
            result, Reject(Reply(554, "5.7.1 <carol@elsewhere.example>: Relay access denied"))
        )

    def test_trusted_network_relays(self) -> None:
        """
        Clients on the local networks, IPv4 or IPv6 loopback, may relay.
        """
        for host in ("10.1.2.3", "127.0.0.1", "::1"):
            with self.subTest(host=host):
                result = self.check(make_session(remote=host), "carol@elsewhere.example")
                self.assertEqual(result, Continue())

    def test_authenticated_user_relays(self) -> None:
        """
        An authenticated user may relay from anywhere.
        """
        result = self.check(
            make_session(remote="203.0.113.9", authenticated="alice"), "carol@elsewhere.example"
        )
        self.assertEqual(result, Continue())


class EnvelopeTests(unittest.TestCase):
    """
    C{process_envelope}, called directly with made-up envelopes.
    """

    def setUp(self) -> None:
        self.policy = LocalPolicy()
        self.policy.configure(Defaults(next_hop_choices=["smarthost.example.com:25"]))

    def test_flagged_message_is_quarantined(self) -> None:
        """
        A message with C{X-Spam-Flag: YES} is quarantined, whole, with the
        reason; the client is told it was queued.
        """
        envelope = make_envelope(
            "eve@spam.example",
            ["bob@example.com"],
            b"X-Spam-Flag: yes\r\nSubject: cheap\r\n\r\nbuy\r\n",
        )
        result = call_callback(self.policy.process_envelope, log, make_session(), envelope)
        if not isinstance(result, Quarantine):
            self.fail(f"not quarantined: {result!r}")
        self.assertEqual([e.envelope for e in result.envelopes], [envelope])
        self.assertEqual(result.reason, "X-Spam-Flag: YES")
        self.assertEqual(result.reply.code, 250)

    def test_local_and_remote_recipients_split(self) -> None:
        """
        Local recipients go to the mail store, the others on the default
        route, as two envelopes of the same message.
        """
        envelope = make_envelope(
            "alice@example.com", ["bob@example.com", "carol@elsewhere.example", "dan@example.net"]
        )
        result = call_callback(
            self.policy.process_envelope, log, make_session(authenticated="alice"), envelope
        )
        if not isinstance(result, Send):
            self.fail(f"not sent: {result!r}")
        routes = [
            ([str(r) for r in e.envelope.recipients], e.next_hop_choices) for e in result.envelopes
        ]
        self.assertEqual(
            routes,
            [
                (["bob@example.com", "dan@example.net"], ("mailstore.example.com:25",)),
                (["carol@elsewhere.example"], ("smarthost.example.com:25",)),
            ],
        )
        self.assertEqual({e.envelope.message for e in result.envelopes}, {envelope.message})


class SessionTests(unittest.TestCase):
    """
    Whole SMTP sessions through the real server, with the policy plugged in.
    """

    def test_stranger_delivers_locally_only(self) -> None:
        """
        A stranger's recipient elsewhere is refused at RCPT; the message
        is spooled for the local one, to the mail store.
        """
        result = run_transcript(
            LocalPolicy,
            GREETING
            + """
            > MAIL FROM:<someone@elsewhere.example>
            < 250 2.1.0 Ok
            > RCPT TO:<carol@elsewhere.example>
            < 554 5.7.1 <carol@elsewhere.example>: Relay access denied
            > RCPT TO:<bob@example.com>
            < 250 2.1.5 Ok
            > DATA
            < 354
            > Subject: hello
            >
            > Hi Bob.
            > .
            < re:250 2\\.0\\.0 Ok: queued as \\w+
            > QUIT
            < 221
            """,
            remote="203.0.113.9",
            hostname="mx.example.com",
        )
        [entry] = result.spooled
        self.assertEqual([str(r) for r in entry.recipients], ["bob@example.com"])
        self.assertEqual(entry.rejected_recipients, (rcpt("carol@elsewhere.example"),))
        self.assertEqual(entry.next_hop_choices, ("mailstore.example.com:25",))
        self.assertEqual(result.message(entry).header("Subject"), "hello")
        self.assertEqual(result.quarantined, ())
        self.assertTrue(result.closed)

    def test_flagged_message_quarantined(self) -> None:
        """
        A flagged message is acknowledged like any other, and lands in
        the quarantine, not the active queue.
        """
        result = run_transcript(
            LocalPolicy,
            GREETING
            + """
            > MAIL FROM:<eve@spam.example>
            < 250
            > RCPT TO:<bob@example.com>
            < 250
            > DATA
            < 354
            > X-Spam-Flag: YES
            >
            > buy now
            > .
            < re:250 2\\.0\\.0 Ok: queued as \\w+
            """,
            hostname="mx.example.com",
        )
        self.assertEqual(result.spooled, ())
        [entry] = result.quarantined
        self.assertEqual(entry.reason, "X-Spam-Flag: YES")
        self.assertEqual(result.replies[-1].code, 250)

    def test_authenticated_user_relays(self) -> None:
        """
        After AUTH a user relays anywhere, on the relay's default route;
        the policy sees the user name in the session.
        """
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        plugin = RecordingCallbacks(LocalPolicy())
        run_transcript(
            plugin,
            """
            < 220
            > EHLO laptop.example
            < 250-mx.example.com
            < re:250-.*
            < re:250-.*
            < re:250-.*
            < re:250-.*
            < re:250-.*
            < 250-SMTPUTF8
            < 250-CHUNKING
            < 250 AUTH PLAIN LOGIN
            > AUTH PLAIN AGFsaWNlAHNlY3JldA==
            < 235 2.7.0 Authentication successful
            > MAIL FROM:<alice@example.com>
            < 250
            > RCPT TO:<carol@elsewhere.example>
            < 250
            > DATA
            < 354
            > Subject: lunch?
            >
            > .
            < 250 2.0.0 Ok: queued as
            > QUIT
            < 221
            """,
            remote="203.0.113.9",
            hostname="mx.example.com",
            defaults=Defaults(hostname="mx.example.com", checker=checker),
            # Over TLS only, in production; the test transport has none.
            auth_requires_tls=False,
        )
        [call] = plugin.calls_to(ProcessEnvelopeCall)
        self.assertEqual(call.session.authenticated, "alice")
        self.assertEqual(plugin.names()[-1], "process_envelope")


if __name__ == "__main__":
    unittest.main()
