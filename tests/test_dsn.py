"""
Tests for delivery status notifications (RFC 3461, 3464, 6533): the DSN
parameters as the server takes them (L{relay.model.dsn},
L{relay.model.argument}) and keeps them in the spool entry.
"""

from __future__ import annotations

import itertools

from twisted.trial.unittest import SynchronousTestCase

from relay.model import dsn
from relay.model.argument import Argument
from relay.simple import Simple
from relay.spool.codec import decode_entry, encode_entry
from relay.testing import ServerHarness

EHLO = """
< 220
> EHLO client.example
< 250-localhost
< 250-PIPELINING
< 250-SIZE
< 250-8BITMIME
< 250-DSN
< 250-ENHANCEDSTATUSCODES
< 250 SMTPUTF8
"""

NOTIFY_CHOICES: list[str | None] = [None, "NEVER"] + [
    ",".join(c)
    for n in (1, 2, 3)
    for c in itertools.combinations(("SUCCESS", "FAILURE", "DELAY"), n)
]


class XtextTests(SynchronousTestCase):
    """
    xtext (RFC 3461 section 4), which ENVID and ORCPT are written in.
    """

    def test_round_trip(self) -> None:
        """
        Encoding writes "+", "=", spaces, controls and every non-ASCII
        octet as +XX in upper case; decoding gives the text back.
        """
        for text in ["a@b", "a+b=c@x", "sp ace\t", "ü@é.example", "", "+2B"]:
            encoded = dsn.xtext_encode(text)
            self.assertTrue(dsn.is_xtext(encoded), encoded)
            self.assertEqual(dsn.xtext_decode(encoded), text)
        self.assertEqual(dsn.xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d")
        self.assertEqual(dsn.xtext_encode("é"), "+C3+A9")

    def test_malformed(self) -> None:
        """
        A "+" not followed by two upper-case hex digits, a bare "=", a
        space or a control is not xtext.
        """
        for bad in ["a+", "a+2b", "a+zz", "a=b", "a b", "a\x01"]:
            self.assertFalse(dsn.is_xtext(bad), bad)
            self.assertRaises(ValueError, dsn.xtext_decode, bad)
        self.assertFalse(dsn.is_xtext("ü"))
        self.assertTrue(dsn.is_xtext("ü", unicode=True))


class NotifyTests(SynchronousTestCase):
    """
    What NOTIFY lets relay report (RFC 3461 section 4.1).
    """

    def test_default(self) -> None:
        """
        Without NOTIFY, failures and delays are reported, success is not.
        """
        self.assertTrue(dsn.notify_allows((), dsn.FAILURE))
        self.assertTrue(dsn.notify_allows((), dsn.DELAY))
        self.assertFalse(dsn.notify_allows((), dsn.SUCCESS))

    def test_every_combination(self) -> None:
        """
        With NOTIFY, exactly the values named are reported; NEVER allows
        nothing; the values are case-insensitive.
        """
        for choice in NOTIFY_CHOICES[1:]:
            assert choice is not None
            args = (Argument("NOTIFY", choice.lower()),)
            for what in (dsn.SUCCESS, dsn.FAILURE, dsn.DELAY):
                self.assertEqual(dsn.notify_allows(args, what), what in choice, (choice, what))

    def test_orcpt_and_envid_decoded(self) -> None:
        """
        ORCPT and ENVID are decoded from xtext for the report; a utf-8
        ORCPT's \\x{HEX} escapes (RFC 6533) are decoded too.
        """
        self.assertEqual(
            dsn.original_recipient((Argument("ORCPT", "rfc822;a+2Bb@x.example"),)),
            ("rfc822", "a+b@x.example"),
        )
        self.assertEqual(
            dsn.original_recipient((Argument("ORCPT", "utf-8;\\x{E9}l\\x{E8}ve@x.example"),)),
            ("utf-8", "élève@x.example"),
        )
        self.assertIsNone(dsn.original_recipient(()))
        self.assertEqual(dsn.envelope_id((Argument("ENVID", "QQ+2B1+3D"),)), "QQ+1=")
        self.assertIsNone(dsn.envelope_id(()))
        self.assertTrue(dsn.returns_headers_only((Argument("RET", "hdrs"),)))
        self.assertFalse(dsn.returns_headers_only((Argument("RET", "FULL"),)))


class ServerParameterTests(SynchronousTestCase):
    """
    The server advertises DSN and keeps every parameter, as given, with
    its recipient (or the envelope) in the spool entry.
    """

    def session(self, mail_params: str, rcpt_params: str) -> ServerHarness:
        h = ServerHarness(Simple)
        h.play(
            EHLO
            + f"""
            > MAIL FROM:<s@example.org>{mail_params}
            < 250 2.1.0 Ok
            > RCPT TO:<a@example.com>{rcpt_params}
            < 250 2.1.5 Ok
            > RCPT TO:<b@example.com>
            < 250 2.1.5 Ok
            > DATA
            < 354
            > Subject: hi
            >
            > body
            > .
            < 250 2.0.0 Ok: queued as
            """
        )
        return h

    def test_every_combination(self) -> None:
        """
        Every NOTIFY choice with every RET, with and without ENVID and
        ORCPT, is accepted and stored as given: per recipient (NOTIFY,
        ORCPT; none for the recipient given without them) and per
        envelope (RET, ENVID), and the spool's codec keeps them.
        """
        sessions = 0
        for notify, ret, envid, orcpt in itertools.product(
            NOTIFY_CHOICES, [None, "FULL", "HDRS"], [None, "ID+2B1"], [None, "rfc822;a@example.com"]
        ):
            mail = "".join(f" {k}={v}" for k, v in (("RET", ret), ("ENVID", envid)) if v)
            rcpt = "".join(f" {k}={v}" for k, v in (("NOTIFY", notify), ("ORCPT", orcpt)) if v)
            h = self.session(mail, rcpt)
            [entry] = h.spooled
            entry = decode_entry(encode_entry(entry))
            want_mail = [str(Argument(k, v)) for k, v in (("RET", ret), ("ENVID", envid)) if v]
            self.assertEqual([str(a) for a in entry.sender_args], want_mail)
            args = dict(entry.recipient_args)
            want_rcpt = [str(Argument(k, v)) for k, v in (("NOTIFY", notify), ("ORCPT", orcpt)) if v]
            self.assertEqual([str(a) for a in args["a@example.com"]], want_rcpt)
            self.assertEqual(args["b@example.com"], ())
            sessions += 1
        self.assertEqual(sessions, 9 * 3 * 2 * 2)

    def test_bad_values(self) -> None:
        """
        A malformed DSN value gets a 501 that says what is wrong; the
        transaction goes on.
        """
        h = ServerHarness(Simple)
        h.play(
            EHLO
            + """
            > MAIL FROM:<s@example.org> RET=BODY
            < 501 5.5.4 RET must be FULL or HDRS
            > MAIL FROM:<s@example.org> ENVID=a=b
            < 501 5.5.4 ENVID must be xtext (+XX for '+', '=', spaces and controls)
            > MAIL FROM:<s@example.org> RET=HDRS ENVID=abc
            < 250 2.1.0 Ok
            > RCPT TO:<a@example.com> NOTIFY=ALWAYS
            < 501 5.5.4 NOTIFY must be NEVER, or one or more of SUCCESS,FAILURE,DELAY
            > RCPT TO:<a@example.com> NOTIFY=NEVER,SUCCESS
            < 501 5.5.4 NOTIFY=NEVER cannot be combined with other values
            > RCPT TO:<a@example.com> ORCPT=a@example.com
            < 501 5.5.4 ORCPT must be addr-type;xtext, e.g. rfc822;user@example.com
            > RCPT TO:<a@example.com> ORCPT=rfc822;a+b@example.com
            < 501 5.5.4 ORCPT address must be xtext (+XX for '+', '=', spaces and controls)
            > RCPT TO:<a@example.com> ORCPT=rfc822;élève@example.com
            < 501 5.5.4 ORCPT address must be xtext
            > RCPT TO:<a@example.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;a+2Bb@example.com
            < 250 2.1.5 Ok
            """
        )

    def test_utf8_orcpt_in_smtputf8_transaction(self) -> None:
        """
        In an SMTPUTF8 transaction ORCPT may hold UTF-8 as it is (RFC
        6533 section 3); it is stored as given.
        """
        h = ServerHarness(Simple)
        h.play(
            EHLO
            + """
            > MAIL FROM:<s@example.org> SMTPUTF8
            < 250 2.1.0 Ok
            > RCPT TO:<élève@example.com> ORCPT=utf-8;élève@example.com
            < 250 2.1.5 Ok
            > DATA
            < 354
            > Subject: hi
            >
            > .
            < 250 2.0.0 Ok
            """
        )
        [entry] = h.spooled
        self.assertEqual(
            dict(entry.recipient_args)["élève@example.com"],
            (Argument("ORCPT", "utf-8;élève@example.com"),),
        )
