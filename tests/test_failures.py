"""
Tests for L{relay.delivery.failures}: the class of each failed delivery
attempt, from real replies of Gmail, Outlook (Microsoft 365 and
Outlook.com), Yahoo and Postfix, and from relay's own descriptions of
failures; the user's rules (a file, a plugin); and the class where
operators see it: the spool entry, the delivery line, C{relayctl show},
the event stream and the metrics.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from prometheus_client import generate_latest
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from relay.app.settings import Settings, SettingsError
from relay.control.events import EventBus
from relay.control.formats import format_show
from relay.control.metrics import RelayMetrics
from relay.delivery.failures import (
    BUILTIN_RULES,
    CLASSES,
    FailureClassifier,
    FailureRule,
    FailureRulesError,
    enhanced_status,
    load_rules,
    parse_rules,
    plugin_rules,
)
from relay.logs import BOUNCED, DEFERRED, delivery_fields, delivery_format
from relay.model.entry import Attempt, TLSOutcome, entry_for
from relay.model.envelope import EnvelopeWithNextHop
from relay.spool.codec import decode_entry, encode_entry, entry_from_json, entry_to_json
from relay.tap import Options
from relay.testing import make_envelope

#: Replies as relay's client records them (a multi-line reply's lines
#: joined with " / "), from the providers' public documentation and
#: postmaster pages, with the class each must get.  Addresses and hosts
#: are the documentation's placeholders.
REAL_REPLIES: list[tuple[str, str, str]] = [
    # Gmail: support.google.com/a/answer/3726730 ("Gmail SMTP errors and codes").
    ("gmail", "550 5.1.1 The email account that you tried to reach does not exist. Please try"
     " / 550 5.1.1 double-checking the recipient's email address for typos or / 550 5.1.1"
     " unnecessary spaces. For more information, go to / 550 5.1.1"
     " https://support.google.com/mail/?p=NoSuchUser - gsmtp", "bad-mailbox"),
    ("gmail", "550 5.2.1 The email account that you tried to reach is disabled. - gsmtp",
     "bad-mailbox"),
    ("gmail", "452 4.2.2 The email account that you tried to reach is over quota. Please direct"
     " the recipient to https://support.google.com/mail/?p=OverQuotaTemp - gsmtp",
     "mailbox-full"),
    ("gmail", "552 5.2.2 The email account that you tried to reach is over quota and inactive."
     " - gsmtp", "mailbox-full"),
    ("gmail", "552 5.3.4 Your message exceeded Google's message size limits. - gsmtp",
     "message-too-large"),
    ("gmail", "450 4.2.1 The user you are trying to contact is receiving mail too quickly."
     " Please resend your message at a later time. - gsmtp", "rate-limited"),
    ("gmail", "450 4.2.1 Peak SMTP relay limit exceeded for customer. - gsmtp", "rate-limited"),
    ("gmail", "421 4.4.5 Server busy, try again later. - gsmtp", "rate-limited"),
    ("gmail", "421 4.7.0 Our system has detected an unusual rate of unsolicited mail"
     " originating from your IP address. To protect our users from spam, mail sent from your"
     " IP address has been temporarily blocked. - gsmtp", "spam-block"),
    ("gmail", "550 5.7.1 Our system has detected that this message is likely unsolicited mail."
     " To reduce the amount of spam sent to Gmail, this message has been blocked. - gsmtp",
     "spam-block"),
    ("gmail", "550 5.7.26 This mail is unauthenticated, which poses a security risk to the"
     " sender and Gmail users, and has been blocked. The sender must authenticate with at"
     " least one of SPF or DKIM. - gsmtp", "policy"),
    ("gmail", "550 5.7.25 The IP address sending this message does not have a PTR record"
     " setup, or the corresponding forward DNS entry does not point to the sending IP. - gsmtp",
     "policy"),
    ("gmail", "550 5.7.1 The IP you're using to send mail is not authorized to send email"
     " directly to our servers. Please use the SMTP relay at your service provider instead."
     " - gsmtp", "policy"),
    ("gmail", "550 5.7.1 This message violates example.com email policy. - gcdp <sessionid>"
     " - gsmtp", "policy"),
    ("gmail", "421 4.7.0 TLS required for RCPT domain, closing connection. - gsmtp",
     "tls-failure"),
    ("gmail", "451 4.4.2 Timeout - closing connection. - gsmtp", "connection-failure"),
    ("gmail", "555 5.5.2 Syntax error. - gsmtp", "protocol-error"),
    ("gmail", "452 4.5.3 Your message has too many recipients. - gsmtp", "rate-limited"),
    ("gmail", "421 4.7.0 Temporary System Problem. Try again later. - gsmtp", "other"),
    # Outlook.com and Microsoft 365 (Exchange Online NDR reference, and the
    # replies Microsoft's postmaster pages quote).
    ("outlook", "550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please"
     " contact your Internet service provider since part of their network is on our block list"
     " (S3150). You can also refer your provider to"
     " http://mail.live.com/mail/troubleshooting.aspx#errors.", "spam-block"),
    ("outlook", "550 5.7.606 Access denied, banned sending IP [192.0.2.1]. To request removal"
     " from this list please visit https://sender.office.com/ and follow the directions.",
     "spam-block"),
    ("outlook", "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this"
     " IP.", "spam-block"),
    ("outlook", "550 5.7.1 Service unavailable, Client host [192.0.2.1] blocked using Spamhaus."
     " To request removal from this list see https://www.spamhaus.org/query/ip/192.0.2.1",
     "spam-block"),
    ("outlook", "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address"
     " lookup", "bad-mailbox"),
    ("outlook", "550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302).",
     "bad-mailbox"),
    ("outlook", "550 5.4.1 Recipient address rejected: Access denied."
     " [AM0PR01MB1234.eurprd01.prod.exchangelabs.com]", "bad-mailbox"),
    ("outlook", "554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException",
     "mailbox-full"),
    ("outlook", "550 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain", "bad-domain"),
    ("outlook", "451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77714)",
     "rate-limited"),
    ("outlook", "530 5.7.57 Client not authenticated to send mail.", "policy"),
    ("outlook", "552 5.3.4 Message size exceeds fixed maximum message size", "message-too-large"),
    ("outlook", "452 4.3.1 Insufficient system resources", "other"),
    # Yahoo (help.yahoo.com and senders.yahooinc.com/smtp-error-codes).
    ("yahoo", "554 delivery error: dd This user doesn't have a yahoo.com account"
     " (someone@yahoo.com) [0] - mta1010.mail.gq1.yahoo.com", "bad-mailbox"),
    ("yahoo", "554 delivery error: dd Sorry, your message to someone@yahoo.com cannot be"
     " delivered. This account is over quota.", "mailbox-full"),
    ("yahoo", "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected"
     " volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
     "spam-block"),
    ("yahoo", "553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.1, because the ip"
     " is in Spamhaus's list; see https://postmaster.yahooinc.com/error-codes", "spam-block"),
    ("yahoo", "554 5.7.9 Message not accepted for policy reasons.  See"
     " https://postmaster.yahooinc.com/error-codes", "policy"),
    ("yahoo", "421 Resources temporarily unavailable. Please try again later", "rate-limited"),
    ("yahoo", "451 Message temporarily deferred - [160]", "other"),
    # Postfix's smtpd (its documented reject replies, and postgrey's).
    ("postfix", "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in"
     " virtual mailbox table", "bad-mailbox"),
    ("postfix", "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown in local"
     " recipient table", "bad-mailbox"),
    ("postfix", "450 4.1.2 <bob@nowhere.example>: Recipient address rejected: Domain not found",
     "bad-domain"),
    ("postfix", "450 4.1.8 <alice@nowhere.example>: Sender address rejected: Domain not found",
     "policy"),
    ("postfix", "554 5.7.1 <bob@example.net>: Relay access denied", "policy"),
    ("postfix", "554 5.7.1 <bob@example.com>: Recipient address rejected: Access denied",
     "policy"),
    ("postfix", "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using"
     " zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1", "spam-block"),
    ("postfix", "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using"
     " b.barracudacentral.org; http://www.barracudanetworks.com/reputation/?pr=1&ip=192.0.2.1",
     "spam-block"),
    ("postfix", "554 5.7.1 Service unavailable; Sender address [alice@example.org] blocked"
     " using dbl.example.net", "spam-block"),
    ("postfix", "450 4.7.1 Client host rejected: cannot find your hostname, [192.0.2.1]",
     "policy"),
    ("postfix", "450 4.2.0 <bob@example.com>: Recipient address rejected: Greylisted, see"
     " http://postgrey.schweikert.ch/help/example.com.html", "policy"),
    ("postfix", "552 5.3.4 Message size exceeds fixed limit", "message-too-large"),
    ("postfix", "452 4.3.1 Insufficient system storage", "other"),
    ("postfix", "421 4.7.0 mx.example.com Error: too many connections from 192.0.2.1",
     "rate-limited"),
    ("postfix", "503 5.5.1 Error: need RCPT command", "protocol-error"),
    ("postfix", "502 5.5.2 Error: command not recognized", "protocol-error"),
    ("postfix", "554 5.5.1 Error: no valid recipients", "protocol-error"),
    ("postfix", "454 4.7.0 TLS not available due to local problem", "tls-failure"),
    ("postfix", "530 5.7.0 Must issue a STARTTLS command first", "tls-failure"),
    ("postfix", "552 5.2.2 <bob@example.com>: Quota exceeded (mailbox for user is full)",
     "mailbox-full"),
]  # fmt: skip

#: relay's own descriptions of failures (no reply code): the router's, the
#: client's, and the replies the client makes up.
RELAY_FAILURES: list[tuple[int | None, str, str]] = [
    (None, "5.1.2 domain nowhere.example not found", "bad-domain"),
    (None, "5.1.2 recipient has no domain", "bad-domain"),
    (None, "5.1.10 domain example.com accepts no mail (null MX)", "bad-domain"),
    (None, "4.4.3 lookup of example.com failed: DNS query timeout", "dns-failure"),
    (None, "5.4.6 mail for example.com loops back to myself", "other"),
    (None, "connect to 192.0.2.1:25 failed: Connection was refused by other side: 111:"
     " Connection refused.", "connection-failure"),
    (None, "connect to mx.example.com:25 failed: DNS lookup failed: no results for hostname"
     " lookup: mx.example.com.", "dns-failure"),
    (None, "mx.example.com:25: connection closed: Connection to the other side was lost in a"
     " non-clean fashion.", "connection-failure"),
    (None, "mx.example.com:25: no reply within 300 seconds", "connection-failure"),
    (None, "mx.example.com:25: hop did not read for 300 seconds", "connection-failure"),
    (454, "454 4.7.0 mx.example.com does not offer STARTTLS", "tls-failure"),
    (454, "454 4.7.5 TLS policy dane (dane) for mx.example.com: tlsa-invalid: no TLSA record"
     " matched", "tls-failure"),
    (552, "552 5.3.4 Message size 2000000 exceeds the hop's limit 1000000", "message-too-large"),
    (553, "553 5.6.7 The next hop does not support SMTPUTF8", "protocol-error"),
]  # fmt: skip


def code_of(reply: str) -> int | None:
    head = reply[:3]
    return int(head) if head.isdigit() else None


class RealRepliesTests(SynchronousTestCase):
    """
    The built-in table on replies seen in the wild.
    """

    def test_providers(self) -> None:
        """
        Every reply of the table of Gmail's, Outlook's, Yahoo's and
        Postfix's replies gets its class.
        """
        classifier = FailureClassifier()
        got = [
            (provider, reply, classifier.classify(code_of(reply), reply))
            for provider, reply, _ in REAL_REPLIES
        ]
        self.assertEqual(got, REAL_REPLIES)
        self.assertEqual({p for p, _, _ in REAL_REPLIES}, {"gmail", "outlook", "yahoo", "postfix"})

    def test_relay_failures(self) -> None:
        """
        relay's own words for the failures it sees (no route, no
        connection, no reply, the hop lacks what the policy or the message
        needs) get their classes.
        """
        classifier = FailureClassifier()
        got = [(code, text, classifier.classify(code, text)) for code, text, _ in RELAY_FAILURES]
        self.assertEqual(got, RELAY_FAILURES)

    def test_every_class_reached(self) -> None:
        """
        The tables above reach every class of the built-in table.
        """
        classes = {c for _, _, c in REAL_REPLIES} | {c for _, _, c in RELAY_FAILURES}
        self.assertEqual(classes, set(CLASSES))


class OrderTests(SynchronousTestCase):
    """
    The order of the table: status code, then text, then the status code's
    subject.
    """

    def setUp(self) -> None:
        self.classifier = FailureClassifier()

    def test_status_before_text(self) -> None:
        """
        A specific status code wins over words that other rules know: a
        5.1.1 that mentions spam is a bad mailbox.
        """
        self.assertEqual(
            self.classifier.classify(550, "550 5.1.1 no such user (spam trap retired)"),
            "bad-mailbox",
        )

    def test_text_before_subject(self) -> None:
        """
        A generic code (4.2.1 is "mailbox disabled" by RFC 3463) defers to
        the text; without telling words, the subject decides.
        """
        self.assertEqual(
            self.classifier.classify(450, "450 4.2.1 receiving mail too quickly"), "rate-limited"
        )
        self.assertEqual(self.classifier.classify(550, "550 5.2.1 gone away"), "bad-mailbox")
        self.assertEqual(self.classifier.classify(550, "550 5.7.0 go away"), "policy")
        self.assertEqual(self.classifier.classify(501, "501 5.5.4 what?"), "protocol-error")

    def test_listed(self) -> None:
        """
        "Listed at" a blocklist is a spam block; "not listed in" a
        directory (Lotus Domino's unknown user) is a bad mailbox.
        """
        self.assertEqual(
            self.classifier.classify(554, "554 Your IP 192.0.2.1 is listed at bl.example.net"),
            "spam-block",
        )
        self.assertEqual(
            self.classifier.classify(550, "550 bob@example.com is not listed in Domino Directory"),
            "bad-mailbox",
        )

    def test_no_rule(self) -> None:
        """
        A reply nothing matches is C{other}; no reply at all (nothing the
        rules know) is a C{connection-failure}.
        """
        self.assertEqual(self.classifier.classify(451, "451 4.3.0 try later"), "other")
        self.assertEqual(self.classifier.classify(451, "451 come back"), "other")
        self.assertEqual(self.classifier.classify(None, "gave up"), "connection-failure")

    def test_tls_outcome(self) -> None:
        """
        An attempt whose TLS outcome failed its policy is a C{tls-failure}
        whatever the words; one that went as the policy allows is
        classified by its reply.
        """
        failed = TLSOutcome("verify", "file", "certificate-host-mismatch")
        plain = TLSOutcome("may", "default", "plain")
        self.assertEqual(
            self.classifier.classify(None, "connection closed", failed), "tls-failure"
        )
        self.assertEqual(
            self.classifier.classify(550, "550 5.1.1 unknown", plain), "bad-mailbox"
        )
        attempt = Attempt(0, "mx:25", None, "closed", tls=failed)
        self.assertEqual(self.classifier.classify_attempt(attempt), "tls-failure")

    def test_continuation_lines(self) -> None:
        """
        The lines of a multi-line reply are read as one text: words split
        across two lines match.
        """
        self.assertEqual(
            self.classifier.classify(550, "550 5.0.0 the mailbox is / 550 5.0.0 full"),
            "mailbox-full",
        )

    def test_enhanced_status(self) -> None:
        """
        The status code is read after the reply code, or alone at the
        start (relay's own descriptions); never from the middle.
        """
        self.assertEqual(enhanced_status("550 5.1.1 x"), ("5", "1", "1"))
        self.assertEqual(enhanced_status("550-5.7.26 x"), ("5", "7", "26"))
        self.assertEqual(enhanced_status("4.4.3 lookup failed"), ("4", "4", "3"))
        self.assertEqual(enhanced_status("550 5.2.2; full"), ("5", "2", "2"))
        self.assertIsNone(enhanced_status("550 mailbox 5.1.1"))
        self.assertIsNone(enhanced_status("550 5.1.1x"))
        self.assertIsNone(enhanced_status("connection refused"))


class RulesTests(SynchronousTestCase):
    """
    The table as data: its form, and the user's rules before the built-in
    ones.
    """

    def test_builtin_table_parses(self) -> None:
        """
        The built-in table is in the form users write, and names every
        documented class and no other.
        """
        rules = parse_rules(BUILTIN_RULES)
        self.assertEqual({r.kind for r in rules}, {"status", "text", "fallback"})
        self.assertEqual({r.failure_class for r in rules}, set(CLASSES))

    def test_user_rules_first(self) -> None:
        """
        A user's status rule wins over the built-in one, a user's text rule
        over the built-in text rules (but not over a built-in status rule);
        a new class name is used as given and listed.
        """
        rules = parse_rules(
            "# ours\n\nquota-soft  status  4.2.2\n"
            "greylisted  text    greylist(ed|ing)\n"
            "banana      text    unknown\n"
        )
        classifier = FailureClassifier(rules)
        self.assertEqual(classifier.classify(452, "452 4.2.2 over quota"), "quota-soft")
        self.assertEqual(classifier.classify(552, "552 5.2.2 over quota"), "mailbox-full")
        self.assertEqual(classifier.classify(450, "450 4.2.0 Greylisted, see"), "greylisted")
        self.assertEqual(classifier.classify(550, "550 5.1.1 User unknown"), "bad-mailbox")
        self.assertEqual(classifier.classify(550, "550 user unknown"), "banana")
        self.assertIn("greylisted", classifier.classes)
        self.assertEqual(classifier.classes[: len(CLASSES)], tuple(CLASSES))

    def test_wildcards_and_text_of_the_code(self) -> None:
        """
        A status pattern may leave any number out (C{*}); a text pattern
        sees the reply's code and status too.
        """
        rules = parse_rules("vendor-x  status  5.7.*\nvendor-y  text  ^421 .*mx\\d\\.example")
        classifier = FailureClassifier(rules)
        self.assertEqual(classifier.classify(550, "550 5.7.26 unauthenticated"), "vendor-x")
        self.assertEqual(classifier.classify(421, "421 4.3.0 mx2.example busy"), "vendor-y")
        self.assertEqual(classifier.classify(421, "421 4.3.0 busy"), "rate-limited")

    def test_bad_rules(self) -> None:
        """
        A bad line is refused with its number and what is wrong.
        """
        for text, words in (
            ("x status", "line 1: expected CLASS KIND PATTERN"),
            ("\nBad_Class status 5.1.1", "line 2: bad class name 'Bad_Class'"),
            ("x sometimes 5.1.1", "line 1: bad kind 'sometimes'"),
            ("x status 5.1", "line 1: bad status code pattern '5.1'"),
            ("x fallback 6.1.1", "line 1: bad status code pattern '6.1.1'"),
            ("x text (unclosed", "line 1: bad regular expression '(unclosed'"),
        ):
            with self.assertRaises(FailureRulesError) as caught:
                parse_rules(text, "rules.txt")
            self.assertIn("rules.txt, " + words, str(caught.exception))

    def test_load_rules(self) -> None:
        """
        A file's rules load; a missing file is one clear error naming it.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("soft-bounce  status  4.*.*\n")
        self.assertEqual(load_rules(path), [FailureRule("soft-bounce", "status", "4.*.*")])
        with self.assertRaises(FailureRulesError) as caught:
            load_rules(path + ".missing")
        self.assertIn(path + ".missing", str(caught.exception))

    def test_plugin_rules(self) -> None:
        """
        A plugin's C{failure_rules()} may give rules or C{(class, kind,
        pattern)} tuples; a plugin without it adds none; a bad one is an
        error naming the plugin.
        """

        class Plugin:
            def failure_rules(self) -> list[Any]:
                return [FailureRule("a", "status", "5.1.1"), ("b", "text", "nope")]

        class Bad:
            def failure_rules(self) -> list[Any]:
                return [("b", "text")]

        self.assertEqual(
            list(plugin_rules(Plugin())),
            [FailureRule("a", "status", "5.1.1"), FailureRule("b", "text", "nope")],
        )
        self.assertEqual(list(plugin_rules(object())), [])
        self.assertRaises(FailureRulesError, plugin_rules, Bad())


class RecordedTests(SynchronousTestCase):
    """
    The class where operators see it.
    """

    def entry(self, *attempts: Attempt) -> Any:
        envelope = EnvelopeWithNextHop(make_envelope("a@example.org", "a@example.com"), ("mx:25",))
        entry = entry_for("e1-0", "active", envelope, 0.0)
        return dataclasses.replace(entry, attempts=attempts, attempt_count=len(attempts))

    def test_codec(self) -> None:
        """
        An attempt's class is stored with it and read back; an entry
        written before attempts had one reads with none (and a relay of
        that time ignores the new key).
        """
        failed = Attempt(10.0, "mx:25", 550, "550 5.1.1 unknown", ("a@example.com",),
                         failure_class="bad-mailbox")  # fmt: skip
        sent = Attempt(20.0, "mx:25", 250, "250 ok", ("b@example.com",))
        entry = self.entry(failed, sent)
        self.assertEqual(decode_entry(encode_entry(entry)), entry)
        self.assertEqual(entry_from_json(entry_to_json(entry)), entry)
        data = entry_to_json(entry)
        self.assertEqual(data["attempts"][0]["class"], "bad-mailbox")
        self.assertNotIn("class", data["attempts"][1])
        del data["attempts"][0]["class"]
        self.assertIsNone(entry_from_json(data).attempts[0].failure_class)

    def test_delivery_line(self) -> None:
        """
        A failed attempt's delivery line says C{class=} before C{status=}
        and has the C{failure_class} field, with or without TLS; a
        delivered one has neither.
        """
        entry = self.entry()
        failed = Attempt(0.0, "mx:25", 550, "550 5.7.1 spam", ("a@example.com",),
                         failure_class="spam-block")  # fmt: skip
        fields = delivery_fields(entry, failed, BOUNCED)
        self.assertEqual(fields["failure_class"], "spam-block")
        self.assertIn(
            "dsn=5.7.1, class=spam-block, status=bounced (550 5.7.1 spam)",
            formatEvent({"log_format": delivery_format(fields), **fields}),
        )
        tls = dataclasses.replace(failed, tls=TLSOutcome("may", "default", "plain"))
        fields = delivery_fields(entry, tls, DEFERRED)
        self.assertIn(
            "tls=may/default/plain, class=spam-block, status=deferred",
            formatEvent({"log_format": delivery_format(fields), **fields}),
        )
        fields = delivery_fields(entry, Attempt(0.0, "mx:25", 250, "250 ok"), "sent")
        self.assertNotIn("failure_class", fields)
        self.assertNotIn("class=", delivery_format(fields))

    def test_show(self) -> None:
        """
        C{relayctl show} gives each failed attempt's class under it.
        """
        entry = self.entry(
            Attempt(0.0, "mx:25", 452, "452 4.2.2 over quota", failure_class="mailbox-full"),
            Attempt(60.0, "mx:25", 250, "250 ok"),
        )
        text = format_show(entry, 100.0)
        self.assertIn("452 4.2.2 over quota\n    failure class: mailbox-full\n", text)
        self.assertEqual(text.count("failure class:"), 1)

    def test_metrics(self) -> None:
        """
        Each C{failed} event counts its recipients under its outcome and
        class.
        """
        bus = EventBus(Clock())
        metrics = RelayMetrics()
        bus.subscribe(metrics.observe)
        bus.emit("failed", "a-0", outcome="deferred", failure_class="rate-limited", recipients=3)
        bus.emit("failed", "b-0", outcome="deferred", failure_class="rate-limited", recipients=1)
        bus.emit("failed", "c-0", outcome="bounced", failure_class="bad-mailbox", recipients=1)
        out = generate_latest(metrics.registry).decode()
        self.assertIn(
            'relay_delivery_failures_total{failure_class="rate-limited",outcome="deferred"} 4.0',
            out,
        )
        self.assertIn(
            'relay_delivery_failures_total{failure_class="bad-mailbox",outcome="bounced"} 1.0', out
        )


class OptionTests(SynchronousTestCase):
    """
    C{--failure-classes FILE} and the plugin's rules, to the scheduler.
    """

    def rules_file(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_option(self) -> None:
        """
        The option reaches L{Settings} (and the JSON a receiver gets); a
        file with a bad line is one clear usage error naming it.
        """
        path = self.rules_file("soft  status  4.*.*\n")
        options = Options()
        options.parseOptions(["--failure-classes", path])
        settings = Settings.from_options(options)
        self.assertEqual(settings.failure_classes, path)
        self.assertEqual(settings.to_json()["failure_classes"], path)
        bad = self.rules_file("soft  status\n")
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--failure-classes", bad])
        self.assertIn(f"--failure-classes: {bad}, line 1", str(caught.exception))

    def test_classifier_built(self) -> None:
        """
        The scheduler's classifier tries the plugin's rules, then the
        file's, then the built-in table; bad rules stop the build with a
        L{SettingsError}.
        """
        from relay.app.build import failure_classifier

        class Plugin:
            def failure_rules(self) -> list[Any]:
                return [("from-plugin", "status", "4.2.2")]

        path = self.rules_file("from-file  status  4.2.*\n")
        classifier = failure_classifier(Settings(hostname="relay.test", failure_classes=path), Plugin())
        self.assertEqual(classifier.classify(452, "452 4.2.2 full"), "from-plugin")
        self.assertEqual(classifier.classify(450, "450 4.2.1 slow"), "from-file")
        self.assertEqual(classifier.classify(550, "550 5.1.1 unknown"), "bad-mailbox")
        bad = self.rules_file("x text (\n")
        self.assertRaises(
            SettingsError,
            failure_classifier, Settings(hostname="relay.test", failure_classes=bad), None,
        )  # fmt: skip
