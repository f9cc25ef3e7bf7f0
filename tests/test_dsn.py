"""
Tests for delivery status notifications (RFC 3461, 3464, 6533): the DSN
parameters as the server takes them (L{relay.model.dsn},
L{relay.model.argument}) and keeps them in the spool entry.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import itertools
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relay.delivery.client_result import DeliveryResult
from relay.delivery.nexthop import route_recipients
from relay.delivery.scheduler import DeliveryScheduler, SchedulerObserver
from relay.model import dsn
from relay.model.address import EmailAddress, Sender
from relay.model.argument import Argument
from relay.model.entry import ACTIVE, FROZEN, SpoolEntry
from relay.model.envelope import Envelope, EnvelopeWithNextHop
from relay.model.message import Message
from relay.model.reply import Reply
from relay.simple import Simple
from relay.smtp.server import SMTPServerFactory, SMTPServerProtocol
from relay.spool.codec import decode_entry, encode_entry
from relay.spool.disk import DiskSpool
from relay.spool.observed import ObservedSpool
from relay.testing import ClientHarness, MemorySpool, ServerHarness
from relay.testing.client import HOP
from tests.test_delivery import FakeClient, no_dns
from tests.transcripts import ehlo_reply

EHLO = f"""
< 220
> EHLO client.example
{ehlo_reply()}
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


# -- relay's own reports, as the scheduler sends them ----------------------

DATA = (
    b"Subject: hello\r\nReferences: <1@example.org>\r\n <2@example.org>\r\n"
    b"Message-ID: <m1@example.org>\r\n\r\nbody\r\n"
)


def dsn_envelope(
    notify: dict[str, str | None],
    sender_args: tuple[Argument, ...] = (),
    hops: tuple[str, ...] = ("mx1:25",),
    intervals: tuple[float, ...] = (60, 120),
    sender: str = "s@example.org",
    envelope_id: str = "env1",
) -> EnvelopeWithNextHop:
    """
    An envelope whose recipients (the keys of C{notify}) were given with
    that NOTIFY (or none, for C{None}).
    """
    env = Envelope(
        id=envelope_id,
        sender=Sender.of(sender),
        sender_args=sender_args,
        recipients=[EmailAddress.parse(r) for r in notify],
        message=Message.from_bytes(DATA),
        recipient_args=[
            (r, (Argument("NOTIFY", n),) if n is not None else ()) for r, n in notify.items()
        ],
    )
    return EnvelopeWithNextHop(env, hops, intervals)


def reports(spool: MemorySpool) -> list[tuple[SpoolEntry, Any, list[Any]]]:
    """
    The reports spooled (from the null sender, multipart/report), each
    with its parsed message and its blocks.
    """
    found = []
    for entry in spool.entries_by_id.values():
        if not entry.sender.is_null or entry.envelope_id.startswith("env"):
            continue
        data = spool.messages_by_id[entry.id].data
        assert data is not None
        msg = email.message_from_bytes(data, policy=email.policy.default)
        parts = msg.get_payload()
        assert isinstance(parts, list)
        found.append((entry, msg, parts[1].get_payload()))
    return found


class ReportingClient(FakeClient):
    """
    L{FakeClient} whose hops offer DSN when C{dsn} says so (as the real
    client tells in L{DeliveryResult.dsn}).
    """

    dsn = False

    def send(self, hop: str, envelope: Envelope) -> Deferred[DeliveryResult]:
        d = super().send(hop, envelope)
        return d.addCallback(lambda r: DeliveryResult(r.hop, r.replies, r.address, dsn=self.dsn))


class SchedulerReportTests(SynchronousTestCase):
    """
    Which reports the scheduler sends, for which recipients.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.spool = MemorySpool(self.clock)
        self.client = ReportingClient()
        # reports wait at their hop: they stay in the spool to be read
        self.client.behaviour["bounce-hop:25"] = None

    def make(self, **kw: Any) -> DeliveryScheduler:
        s = DeliveryScheduler(
            spool=self.spool, client=self.client, clock=self.clock, route=no_dns,
            hostname="relay.test", **kw,
        )  # fmt: skip
        s.startService()
        self.addCleanup(lambda: s.stopService() if s.running else None)
        return s

    def enqueue(self, s: DeliveryScheduler, envelope: EnvelopeWithNextHop) -> SpoolEntry:
        [entry] = self.successResultOf(
            ObservedSpool(self.spool, SchedulerObserver(s)).enqueue([envelope])
        )
        self.clock.advance(0)
        return entry

    def test_failure_by_notify(self) -> None:
        """
        A permanent failure is bounced for the recipients whose NOTIFY
        allows FAILURE (or who gave none), for no other; every failed
        recipient counts as reported, and the entry is frozen.
        """
        notify = {f"r{i}@example.com": n for i, n in enumerate(NOTIFY_CHOICES)}
        self.client.behaviour["mx1:25"] = Reply(550, "5.1.1 no such user")
        s = self.make()
        entry = self.enqueue(s, dsn_envelope(notify))
        [(bounce, msg, blocks)] = reports(self.spool)
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        told = [b["Final-Recipient"].split("; ")[1] for b in blocks[1:]]
        want = [r for r, n in notify.items() if n is None or "FAILURE" in n]
        self.assertEqual(told, want)
        self.assertEqual({b["Action"] for b in blocks[1:]}, {"failed"})
        frozen = self.spool.entries_by_id[entry.id]
        self.assertEqual((frozen.queue, sorted(frozen.reported)), (FROZEN, sorted(notify)))

    def test_never_no_report(self) -> None:
        """
        NOTIFY=NEVER for every recipient: no report at all, and the entry
        is frozen without "(bounced)".
        """
        self.client.behaviour["mx1:25"] = Reply(550, "5.1.1 no such user")
        s = self.make()
        entry = self.enqueue(s, dsn_envelope({"a@example.com": "NEVER"}))
        self.assertEqual(reports(self.spool), [])
        frozen = self.spool.entries_by_id[entry.id]
        self.assertEqual(frozen.reason, "permanent failure: 550 5.1.1 no such user")

    def test_success_by_notify_and_hop(self) -> None:
        """
        Delivered to a hop without DSN, the recipients whose NOTIFY has
        SUCCESS get a "relayed" report; through a hop with DSN none do
        (the next hop reports).
        """
        notify = {f"r{i}@example.com": n for i, n in enumerate(NOTIFY_CHOICES)}
        s = self.make()
        self.enqueue(s, dsn_envelope(notify))
        [(report, msg, blocks)] = reports(self.spool)
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        told = [b["Final-Recipient"].split("; ")[1] for b in blocks[1:]]
        self.assertEqual(told, [r for r, n in notify.items() if n and "SUCCESS" in n])
        self.assertEqual({(b["Action"], b["Status"]) for b in blocks[1:]}, {("relayed", "2.0.0")})
        self.assertEqual({b["Remote-MTA"] for b in blocks[1:]}, {"dns; mx1"})
        self.successResultOf(self.spool.finish(report.id))
        self.client.dsn = True
        self.enqueue(s, dsn_envelope(notify, envelope_id="env2"))
        self.assertEqual(reports(self.spool), [])

    def test_null_sender_never_reported(self) -> None:
        """
        A message from the null sender gets no report of any kind.
        """
        self.client.behaviour["mx1:25"] = {
            "a@example.com": Reply(550, "5.1.1 no"), "b@example.com": Reply(250, "2.0.0 ok")
        }
        s = self.make()
        self.enqueue(s, dsn_envelope({"a@example.com": None, "b@example.com": "SUCCESS"}, sender=""))
        self.assertEqual(reports(self.spool), [])

    def test_ret_hdrs(self) -> None:
        """
        RET=HDRS: the bounce holds the header section only, folded as it
        came; without it, the whole message.
        """
        self.client.behaviour["mx1:25"] = Reply(550, "5.1.1 no")
        s = self.make()
        self.enqueue(s, dsn_envelope({"a@example.com": None}, (Argument("RET", "HDRS"),)))
        [(bounce, _, _)] = reports(self.spool)
        data = self.spool.messages_by_id[bounce.id].data
        assert data is not None
        self.assertIn(b"Content-Type: text/rfc822-headers", data)
        self.assertIn(b"\r\n\r\n" + DATA.split(b"\r\n\r\n")[0] + b"\r\n\r\n--", data)
        self.assertNotIn(b"body", data)
        self.successResultOf(self.spool.finish(bounce.id))
        self.enqueue(s, dsn_envelope({"a@example.com": None}, envelope_id="env2"))
        [(bounce, _, _)] = reports(self.spool)
        data = self.spool.messages_by_id[bounce.id].data
        assert data is not None
        self.assertIn(b"Content-Type: message/rfc822", data)
        self.assertIn(b"\r\n\r\n" + DATA + b"\r\n--", data)

    def test_envid_and_orcpt_in_bounce(self) -> None:
        """
        The bounce carries the ENVID and ORCPT the sender gave, decoded.
        """
        self.client.behaviour["mx1:25"] = Reply(550, "5.1.1 no")
        s = self.make()
        envelope = dsn_envelope({"a@example.com": None}, (Argument("ENVID", "ID+2B7"),))
        envelope = dataclasses.replace(
            envelope,
            envelope=dataclasses.replace(
                envelope.envelope,
                recipient_args=[("a@example.com", (Argument("ORCPT", "rfc822;A+2B1@example.com"),))],
            ),
        )
        self.enqueue(s, envelope)
        [(_, _, blocks)] = reports(self.spool)
        self.assertEqual(blocks[0]["Original-Envelope-Id"], "ID+7")
        self.assertEqual(blocks[0]["Reporting-MTA"], "dns; relay.test")
        self.assertEqual(blocks[1]["Original-Recipient"], "rfc822; A+1@example.com")
        self.assertEqual(blocks[1]["Diagnostic-Code"], "smtp; 550 5.1.1 no")


class DelayWarningTests(SynchronousTestCase):
    """
    C{--delay-warning}: one warning per entry, once it has waited that long.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.client = FakeClient()
        self.client.behaviour["mx1:25"] = Reply(451, "4.3.0 try later")
        self.client.behaviour["bounce-hop:25"] = None

    def make(self, spool: Any, **kw: Any) -> DeliveryScheduler:
        s = DeliveryScheduler(
            spool=spool, client=self.client, clock=self.clock, route=no_dns,
            hostname="relay.test", **kw,
        )  # fmt: skip
        s.startService()
        self.addCleanup(lambda: s.stopService() if s.running else None)
        return s

    def test_once_after_the_delay(self) -> None:
        """
        No warning before the entry has waited C{delay_warning} seconds;
        at the first attempt after that, one warning (Action delayed) for
        the recipients whose NOTIFY allows DELAY; none at later attempts.
        The entry remembers it (C{warned_at}).
        """
        spool = MemorySpool(self.clock)
        s = self.make(spool, delay_warning=3600.0)
        notify = {f"r{i}@example.com": n for i, n in enumerate(NOTIFY_CHOICES)}
        [entry] = self.successResultOf(
            ObservedSpool(spool, SchedulerObserver(s)).enqueue(
                [dsn_envelope(notify, intervals=(1800,) * 10)]
            )
        )
        self.clock.advance(0)
        self.clock.advance(1800)
        self.assertEqual(reports(spool), [])
        self.assertIsNone(spool.entries_by_id[entry.id].warned_at)
        self.clock.advance(1800)
        [(warning, msg, blocks)] = reports(spool)
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        told = [b["Final-Recipient"].split("; ")[1] for b in blocks[1:]]
        self.assertEqual(told, [r for r, n in notify.items() if n is None or "DELAY" in n])
        self.assertEqual({(b["Action"], b["Status"]) for b in blocks[1:]}, {("delayed", "4.3.0")})
        # tried at 1000, 2800 and 4600: eight intervals of 1800 s are left
        until = email.utils.formatdate(4600.0 + 8 * 1800)
        self.assertEqual({b["Will-Retry-Until"] for b in blocks[1:]}, {until})
        self.assertEqual(spool.entries_by_id[entry.id].warned_at, 4600.0)
        for _ in range(5):
            self.clock.advance(1800)
        self.assertEqual(len(reports(spool)), 1)
        self.assertEqual(spool.entries_by_id[entry.id].attempt_count, 8)

    def test_remembered_across_restarts(self) -> None:
        """
        The warning is recorded in the entry on disk: after a restart the
        entry, tried again, warns no more.
        """
        path = os.path.join(self.mktemp(), "spool")
        spool = DiskSpool(path, defer.maybeDeferred, self.clock)
        self.successResultOf(spool.recover())
        s = self.make(spool, delay_warning=60.0)
        [entry] = self.successResultOf(
            ObservedSpool(spool, SchedulerObserver(s)).enqueue(
                [dsn_envelope({"a@example.com": None}, intervals=(60,) * 10)]
            )
        )
        self.clock.advance(0)
        self.clock.advance(60)
        warnings = [e for e in self.successResultOf(spool.entries(ACTIVE)) if e.sender.is_null]
        self.assertEqual(len(warnings), 1)
        self.successResultOf(spool.finish(warnings[0].id))
        s.queue.stop()
        s.expiry.stop()
        spool2 = DiskSpool(path, defer.maybeDeferred, self.clock)
        self.successResultOf(spool2.recover())
        self.assertEqual(self.successResultOf(spool2.get(entry.id)).warned_at, 1060.0)
        s2 = self.make(spool2, delay_warning=60.0)
        self.clock.advance(0)
        for _ in range(3):
            self.clock.advance(60)
        active = self.successResultOf(spool2.entries(ACTIVE))
        self.assertEqual([e.id for e in active], [entry.id])
        self.assertGreater(active[0].attempt_count, 3)
        del s2

    def test_off_by_default(self) -> None:
        """
        Without C{delay_warning}, an entry waits without a warning.
        """
        spool = MemorySpool(self.clock)
        s = self.make(spool)
        ObservedSpool(spool, SchedulerObserver(s)).enqueue(
            [dsn_envelope({"a@example.com": "DELAY"}, intervals=(3600,) * 10)]
        )
        for _ in range(6):
            self.clock.advance(3600)
        self.assertEqual(reports(spool), [])


class NoDSNServer(SMTPServerFactory):
    """
    relay's server as a next hop that does not offer DSN (relay's own
    always does): its EHLO leaves the keyword out.
    """

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        protocol = super().buildProtocol(addr)
        offered = protocol.commands._extensions
        protocol.commands._extensions = (  # type: ignore[method-assign]
            lambda advertise_auth: [e for e in offered(advertise_auth) if e != "DSN"]
        )
        return protocol


class EndToEndTests(SynchronousTestCase):
    """
    The scheduler with the real client, delivering to relay's own server
    in memory (L{ClientHarness}): NOTIFY=SUCCESS through a next hop with
    DSN and through one without.
    """

    def deliver(self, harness: ClientHarness) -> MemorySpool:
        """
        Deliver a message whose recipient asked NOTIFY=SUCCESS (with
        ORCPT, and RET and ENVID) through C{harness}; reports go the same
        way.  The relay's own spool is returned.
        """
        spool = MemorySpool(harness.reactor)

        def route(recipients: Any, hops: Any) -> Any:
            return route_recipients(recipients, (HOP,), None)

        s = DeliveryScheduler(
            spool=spool, client=harness.client, clock=harness.reactor, route=route,
            hostname="relay.test",
        )  # fmt: skip
        s.startService()
        env = dataclasses.replace(
            dsn_envelope(
                {"a@example.com": "SUCCESS,FAILURE"},
                (Argument("RET", "HDRS"), Argument("ENVID", "E+2B1")),
            ).envelope,
            recipient_args=[
                (
                    "a@example.com",
                    (Argument("NOTIFY", "SUCCESS,FAILURE"), Argument("ORCPT", "rfc822;a@example.com")),
                )
            ],
        )
        self.successResultOf(
            ObservedSpool(spool, SchedulerObserver(s)).enqueue([EnvelopeWithNextHop(env)])
        )
        for _ in range(5):
            harness.advance(0)
        self.assertEqual(list(spool.entries_by_id), [])
        harness.close()
        s.stopService()
        return spool

    def test_dsn_capable_hop(self) -> None:
        """
        The hop offers DSN: the parameters go on as given, and relay
        sends no report (the hop has the request now).
        """
        harness = ClientHarness()
        self.deliver(harness)
        [session] = harness.connections
        self.assertIn("< 250-DSN", session.transcript)
        self.assertIn(f"> MAIL FROM:<s@example.org> SIZE={len(DATA)} RET=HDRS ENVID=E+2B1", session.transcript)
        self.assertIn(
            "> RCPT TO:<a@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@example.com",
            session.transcript,
        )
        [got] = harness.spooled
        self.assertFalse(got.sender.is_null)
        self.assertEqual(
            [str(a) for a in dict(got.recipient_args)["a@example.com"]],
            ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@example.com"],
        )

    def test_hop_without_dsn(self) -> None:
        """
        The hop does not offer DSN: the parameters stay behind, and the
        sender gets a "relayed" report (RFC 3461 section 4.2), delivered
        the same way, from the null sender.
        """
        harness = ClientHarness()
        plain = NoDSNServer(
            callbacks=harness.factory.callbacks, spool=harness.spool, clock=harness.reactor
        )
        harness.factory = plain
        self.deliver(harness)
        original, report = harness.spooled
        first = harness.connections[0].transcript
        self.assertNotIn("< 250-DSN", first)
        self.assertIn(f"> MAIL FROM:<s@example.org> SIZE={len(DATA)}\n", "\n".join(first) + "\n")
        self.assertIn("> RCPT TO:<a@example.com>", first)
        self.assertTrue(report.sender.is_null)
        self.assertEqual([str(r) for r in report.recipients], ["s@example.org"])
        data = harness.message(report).data
        assert data is not None
        msg = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        _, status, headers = msg.get_payload()  # type: ignore[misc]
        per_message, block = status.get_payload()
        self.assertEqual(per_message["Original-Envelope-Id"], "E+1")
        self.assertEqual(block["Final-Recipient"], "rfc822; a@example.com")
        self.assertEqual(block["Original-Recipient"], "rfc822; a@example.com")
        self.assertEqual(block["Action"], "relayed")
        self.assertEqual(block["Status"], "2.0.0")
        self.assertEqual(block["Remote-MTA"], "dns; 192.0.2.25")
        self.assertTrue(block["Diagnostic-Code"].startswith("smtp; 250 2.0.0 Ok: queued as"))
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn(b"References: <1@example.org>\r\n <2@example.org>\r\n", data)


class DelayWarningOptionTests(SynchronousTestCase):
    """
    C{--delay-warning DURATION} reaches the scheduler.
    """

    def test_option(self) -> None:
        """
        Off (0) by default; a duration with a unit, e.g. 4h; a bad value
        is a usage error naming the option.
        """
        from twisted.python import usage

        from relay.app.settings import Settings
        from relay.tap import Options

        options = Options()
        options.parseOptions([])
        self.assertEqual(Settings.from_options(options).delay_warning, 0.0)
        options = Options()
        options.parseOptions(["--delay-warning", "4h"])
        self.assertEqual(Settings.from_options(options).delay_warning, 4 * 3600.0)
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--delay-warning", "soon"])
        self.assertIn("--delay-warning", str(caught.exception))

    def test_make_service(self) -> None:
        """
        makeService gives the scheduler the delay (none when 0).
        """
        from twisted.internet.testing import MemoryReactorClock

        from relay.service import makeService

        for given, want in [(0.0, None), (3600.0, 3600.0)]:
            base = self.mktemp()
            top = makeService(
                smtp=["tcp:0:interface=127.0.0.1"], spool=os.path.join(base, "spool"),
                quarantine=os.path.join(base, "q"), reactor=MemoryReactorClock(),
                hostname="relay.test", delay_warning=given, run_in_thread=defer.maybeDeferred,
            )  # fmt: skip
            self.assertEqual(top.delivery.delay_warning, want)  # type: ignore[attr-defined]


class ShowTests(SynchronousTestCase):
    """
    C{relayctl show} says when the delay warning went out.
    """

    def test_warned(self) -> None:
        """
        An entry that warned its sender shows when; one that did not
        has no such line.
        """
        from relay.control.formats import format_show

        entry = SpoolEntry(
            id="e-0", queue=ACTIVE, envelope_id="e", sender=Sender.of("s@example.org"),
            sender_args=(), recipients=(), next_hop_choices=(), created_at=0.0,
            next_attempt_at=0.0, message_size=1,
        )  # fmt: skip
        self.assertNotIn("delay warning", format_show(entry, 100.0))
        shown = format_show(dataclasses.replace(entry, warned_at=40.0), 100.0)
        self.assertIn("delay warning sent: 1970-01-01", shown)
        self.assertIn("(1m ago)", shown)
