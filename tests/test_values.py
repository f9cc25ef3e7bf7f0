"""
Tests for the plugin API's value types and L{relay.simple.Simple}.
"""

import dataclasses
from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.exceptions import BrokenImplementation
from zope.interface.verify import verifyObject

from relay import (
    NULL_SENDER,
    Accept,
    Allow,
    Consume,
    Continue,
    Deny,
    EmailAddress,
    Envelope,
    EnvelopeWithNextHop,
    IServerCallbacks,
    Message,
    Reply,
    Send,
    Sender,
    Session,
    Simple,
    as_callbacks,
)
from relay.model.address import AddressError
from relay.model.argument import (
    Argument,
    ArgumentError,
    parse_mail_parameters,
    parse_rcpt_parameters,
)
from relay.model.reply import ReplyError
from relay.simple import CallbacksError, Defaults
from relay.testing import run_transcript

LOG = Logger()


def envelope(**kw):
    values = dict(
        id="e1",
        sender=Sender.of("a@example.com"),
        sender_args=[],
        recipients=[EmailAddress.parse("b@example.org")],
        message=Message.from_bytes(b"Subject: hi\r\nX-A: 1\r\n\tcont\r\n\r\nbody\r\n"),
    )
    values.update(kw)
    return Envelope(**values)


class ReplyTests(SynchronousTestCase):
    def test_single_line(self):
        """
        A one-line reply renders as code, space, text, CRLF.
        """
        self.assertEqual(Reply(250, "2.0.0 Ok").to_bytes(), b"250 2.0.0 Ok\r\n")

    def test_multi_line(self):
        """
        Lines of a multi-line reply but the last are joined with C{-}.
        """
        self.assertEqual(Reply(250, "a\nb\nc").to_bytes(), b"250-a\r\n250-b\r\n250 c\r\n")

    def test_no_injection(self):
        """
        CR or LF in the text can never start a reply of its own: each
        becomes a continuation line with the same code.
        """
        data = Reply(550, "no\r\n250 ok").to_bytes()
        self.assertEqual(data, b"550-no\r\n550 250 ok\r\n")

    def test_enhanced_status(self):
        """
        The enhanced status code of the first line is parsed out.
        """
        self.assertEqual(Reply(550, "5.7.1 relaying denied").enhanced_status, "5.7.1")
        self.assertIsNone(Reply(250, "hello").enhanced_status)

    def test_bad_code(self):
        """
        Codes outside 200..599 are refused.
        """
        self.assertRaises(ValueError, Reply, 199, "x")
        self.assertRaises(ValueError, Reply, 600, "x")

    def test_classes(self):
        """
        Positive, transient and permanent replies are told apart.
        """
        self.assertTrue(Reply(250).is_positive)
        self.assertTrue(Reply(451).is_transient)
        self.assertTrue(Reply(554).is_permanent)

    def test_parse_rejects_garbage(self):
        """
        The reply parser refuses malformed replies with L{ReplyError}.
        """
        for bad in [b"", b"hello\r\n", b"250-a\r\n251 b\r\n", b"250-a\r\n", b"700 x\r\n"]:
            self.assertRaises(ReplyError, Reply.parse, bad)

    @given(
        st.integers(200, 599),
        st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30), min_size=1, max_size=4),
    )
    def test_round_trip(self, code, lines):
        """
        Rendering then parsing a reply gives it back (text lines trimmed of
        line breaks, which cannot be carried).
        """
        reply = Reply(code, "\n".join(lines))
        self.assertEqual(Reply.parse(reply.to_bytes()), reply)


class AddressTests(SynchronousTestCase):
    def test_simple(self):
        """
        C{local@domain} parses and prints back.
        """
        address = EmailAddress.parse("user.name+tag@example.com")
        self.assertEqual((address.local_part, address.domain), ("user.name+tag", "example.com"))
        self.assertEqual(str(address), "user.name+tag@example.com")

    def test_quoted_local_part(self):
        """
        A quoted local part is unquoted in C{local_part} and quoted again by C{str}.
        """
        address = EmailAddress.parse('"john \\"j\\" doe"@example.com')
        self.assertEqual(address.local_part, 'john "j" doe')
        self.assertEqual(str(address), '"john \\"j\\" doe"@example.com')
        self.assertEqual(EmailAddress.parse(str(address)), address)

    def test_literals(self):
        """
        IPv4 and IPv6 address literals are domains.
        """
        self.assertEqual(EmailAddress.parse("u@[192.0.2.1]").domain, "[192.0.2.1]")
        self.assertEqual(EmailAddress.parse("u@[IPv6:2001:db8::1]").domain, "[IPv6:2001:db8::1]")
        self.assertRaises(AddressError, EmailAddress.parse, "u@[300.1.1.1]")
        self.assertRaises(AddressError, EmailAddress.parse, "u@[IPv6:zz]")

    def test_postmaster(self):
        """
        C{<Postmaster>} without a domain is a valid recipient (RFC 5321 4.5.1).
        """
        address = EmailAddress.parse_path("<Postmaster>")
        self.assertTrue(address.is_postmaster)
        self.assertIsNone(address.domain)
        self.assertRaises(AddressError, EmailAddress.parse_path, "<bob>")

    def test_utf8(self):
        """
        UTF-8 addresses parse only with SMTPUTF8.
        """
        self.assertRaises(AddressError, EmailAddress.parse, "δοκιμή@example.com")
        address = EmailAddress.parse("δοκιμή@παράδειγμα.δοκιμή", smtputf8=True)
        self.assertTrue(address.needs_smtputf8)

    def test_source_route_ignored(self):
        """
        A source route is accepted and ignored (RFC 5321 4.1.1.3).
        """
        self.assertEqual(str(EmailAddress.parse_path("<@a.example,@b.example:u@c.example>")), "u@c.example")

    def test_invalid(self):
        """
        Malformed mailboxes are refused with L{AddressError}.
        """
        for bad in ["", "a", "a@", "@b", ".a@b", "a.@b", "a..b@c", "a@-b", "a@b-", "a b@c", "a@b@c",
                    '"unterminated@b', "x" * 65 + "@b.c", "a@" + "b" * 64 + ".c"]:
            self.assertRaises(AddressError, EmailAddress.parse, bad)
        self.assertRaises(AddressError, EmailAddress.parse_path, "a@b.c")

    def test_null_sender(self):
        """
        C{<>} is the null sender, whose C{str} is empty.
        """
        sender = Sender.parse_path("<>")
        self.assertIs(sender, NULL_SENDER)
        self.assertTrue(sender.is_null)
        self.assertEqual(str(sender), "")
        self.assertEqual(str(Sender.parse_path("<a@b.c>")), "a@b.c")
        self.assertEqual(Sender.of(""), NULL_SENDER)

    @given(st.from_regex(r"[a-z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True),
           st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{2,6}){1,3}", fullmatch=True))
    def test_round_trip(self, local, domain):
        """
        Printing then parsing any valid address gives it back.
        """
        address = EmailAddress(local, domain)
        self.assertEqual(EmailAddress.parse(str(address)), address)

    @given(st.text(max_size=80))
    def test_never_crashes(self, text):
        """
        Arbitrary text either parses or raises L{AddressError}, nothing else.
        """
        try:
            EmailAddress.parse_path(text, smtputf8=True)
        except AddressError:
            pass


class ArgumentTests(SynchronousTestCase):
    def test_mail_parameters(self):
        """
        The MAIL parameters the server offers are parsed, keywords upper-cased.
        """
        args = parse_mail_parameters("size=100 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x+2By AUTH=<>")
        self.assertEqual(
            [str(a) for a in args],
            ["SIZE=100", "BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=x+2By", "AUTH=<>"],
        )

    def test_mail_parameter_errors(self):
        """
        Malformed values get 501, unsupported parameters 555.
        """
        cases = {"SIZE=abc": 501, "BODY=BINARYMIME": 555, "FOO=1": 555, "SMTPUTF8=1": 501,
                 "SIZE=1 SIZE=2": 501, "=x": 501, "RET=ALL": 501}
        for text, code in cases.items():
            with self.assertRaises(ArgumentError) as e:
                parse_mail_parameters(text)
            self.assertEqual(e.exception.reply.code, code, text)

    def test_rcpt_parameters(self):
        """
        NOTIFY and ORCPT are accepted and carried; others are 555.
        """
        args = parse_rcpt_parameters("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b.c")
        self.assertEqual(args, (Argument("NOTIFY", "SUCCESS,FAILURE"), Argument("ORCPT", "rfc822;a@b.c")))
        with self.assertRaises(ArgumentError) as e:
            parse_rcpt_parameters("XFOO")
        self.assertEqual(e.exception.reply.code, 555)
        self.assertRaises(ArgumentError, parse_rcpt_parameters, "NOTIFY=NEVER,DELAY")


class EnvelopeTests(SynchronousTestCase):
    def test_immutable_copy(self):
        """
        Envelopes are frozen; C{dataclasses.replace} makes a changed copy
        whose sequences are tuples.
        """
        original = envelope()
        changed = dataclasses.replace(original, recipients=[EmailAddress.parse("c@d.e")])
        self.assertEqual(str(changed.recipients[0]), "c@d.e")
        self.assertIsInstance(changed.recipients, tuple)
        self.assertEqual(str(original.recipients[0]), "b@example.org")
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, original, "id", "x")

    def test_headers(self):
        """
        Header helpers read the message's header section, unfolded.
        """
        e = envelope()
        self.assertEqual(e.header("subject"), "hi")
        self.assertEqual(e.header_values("X-A"), ["1 cont"])
        self.assertIsNone(e.header("Missing"))

    def test_next_hop_normalised(self):
        """
        Retry intervals become seconds and next hops C{host:port} strings.
        """
        class Addr:
            host, port = "::1", 2525

        routed = EnvelopeWithNextHop(envelope(), ["mx.example.com:25", Addr()], [60, timedelta(minutes=5)])
        self.assertEqual(routed.next_hop_choices, ("mx.example.com:25", "[::1]:2525"))
        self.assertEqual(routed.retry_intervals, (60.0, 300.0))
        self.assertRaises(TypeError, EnvelopeWithNextHop, envelope(), [], [-1])


class SimpleTests(SynchronousTestCase):
    def test_verify(self):
        """
        L{Simple} provides L{IServerCallbacks}.
        """
        self.assertTrue(verifyObject(IServerCallbacks, Simple()))

    def test_interface_names(self):
        """
        L{IServerCallbacks} declares every callback the relay calls,
        C{configure} included.
        """
        self.assertEqual(
            set(IServerCallbacks.names()),
            {
                "configure",
                "session_connect",
                "session_helo",
                "process_sender",
                "process_recipient",
                "process_envelope",
                "check_authentication_credentials",
                "rpcs",
            },
        )

    def test_provider_without_configure(self):
        """
        A provider written without L{Simple} may leave out C{configure}:
        C{verifyObject} then says so, but L{as_callbacks} keeps it as it is
        and the relay serves it (C{configure} is called only when present).
        """

        @implementer(IServerCallbacks)
        class Bare:
            def session_connect(self, log, session):
                return Accept("bare.example ESMTP")

            def session_helo(self, log, session, helo):
                return Continue()

            def process_sender(self, log, session, sender, sender_args):
                return Continue()

            def process_recipient(self, log, session, sender, sender_args, recipient):
                return Continue()

            def process_envelope(self, log, session, envelope):
                return Consume("taken")

            def check_authentication_credentials(self, log, username, password):
                return Deny()

            def rpcs(self):
                return []

        bare = Bare()
        self.assertRaises(BrokenImplementation, verifyObject, IServerCallbacks, bare)
        self.assertIs(as_callbacks(bare), bare)
        result = run_transcript(
            bare,
            """
            < 220 bare.example ESMTP
            > HELO client.example
            < 250 localhost
            > MAIL FROM:<a@example.com>
            < 250
            > RCPT TO:<b@example.org>
            < 250
            > DATA
            < 354
            > Subject: hi
            >
            > .
            < 250 2.0.0 taken
            """,
        )
        self.assertEqual(result.spooled, ())

    def test_partial_adapted(self):
        """
        An object with only some callbacks is completed by L{Simple}.
        """
        class OnlyRecipient:
            def process_recipient(self, log, session, sender, sender_args, recipient):
                return Deny()

        callbacks = as_callbacks(OnlyRecipient)
        self.assertTrue(verifyObject(IServerCallbacks, callbacks))
        self.assertEqual(callbacks.process_recipient(LOG, None, None, [], None), Deny())
        self.assertEqual(callbacks.process_sender(LOG, None, None, []), Continue())
        self.assertRaises(CallbacksError, as_callbacks, object())

    def test_greeting(self):
        """
        The greeting names the host and the time from the injected clock.
        """
        simple = Simple()
        clock = Clock()
        clock.advance(86400)
        simple.configure(Defaults(hostname="mx.example.com", clock=clock))
        result = simple.session_connect(LOG, Session("s1"))
        self.assertIsInstance(result, Accept)
        self.assertIn("mx.example.com", result.greeting)
        self.assertIn("2 Jan 1970", result.greeting)

    def test_default_route(self):
        """
        C{process_envelope} sends on the default route and schedule, by
        reference (no hops, no intervals): the relay applies the ones
        configured when it delivers, not those of the day it accepted.
        """
        simple = Simple()
        simple.configure(Defaults(next_hop_choices=("smart.example:25",), retry_intervals=(60,)))
        received = envelope()
        result = simple.process_envelope(LOG, Session("s1"), received)
        self.assertEqual(result, Send([EnvelopeWithNextHop(received, [], [])]))

    def test_auth_without_checker(self):
        """
        Without a checker, AUTH is not advertised and every login is denied.
        """
        simple = Simple()
        self.assertEqual(simple.session_helo(LOG, Session("s1"), "x"), Continue(False))
        self.assertEqual(simple.check_authentication_credentials(LOG, "a", "b"), Deny())
        self.assertEqual(simple.rpcs(), [])

    def test_auth_with_checker(self):
        """
        With a cred checker, AUTH is advertised and credentials are checked.
        """
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        simple = Simple()
        simple.configure(Defaults(checker=checker))
        self.assertEqual(simple.session_helo(LOG, Session("s1"), "x"), Continue(True))
        good = simple.check_authentication_credentials(LOG, "alice", "secret")
        bad = simple.check_authentication_credentials(LOG, "alice", "wrong")
        self.assertIsInstance(good, Deferred)
        self.assertEqual(self.successResultOf(good), Allow())
        self.assertEqual(self.successResultOf(bad), Deny())
