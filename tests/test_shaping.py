"""
Tests for L{relay.shaping}: the shaping file, rates, the scheduler keeping
each limit, reply rules, suspensions, source addresses and the memory of
per-destination state.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relay.app.reload import ReloadError
from relay.delivery.nexthop import Destination, Route
from relay.delivery.scheduler import DeliveryScheduler
from relay.interfaces import IDestinationLimits, IReloadable
from relay.model.address import EmailAddress
from relay.model.reply import Reply
from relay.shaping import (
    Limits,
    Shaper,
    ShapingFileError,
    Suspensions,
    parse,
    parse_rate,
)
from relay.shaping.rate import Rate, TokenBucket
from relay.shaping.reloading import ShapingFile
from relay.shaping.shaper import (
    MAX_CONNECTIONS,
    MESSAGE_RATE,
    SUSPENDED,
    ConnectionShaping,
    LimitWait,
    Wait,
)
from relay.simple import Simple
from relay.testing import ClientHarness, MemorySpool
from tests.test_client import envelope
from tests.test_delivery import FakeClient, make_envelope

#: MX hosts of the test's domains (what a DNS answer would give)
MX = {
    "gmail.com": ("gmail-smtp-in.l.google.com:25",),
    "googlemail.com": ("alt1.gmail-smtp-in.l.google.com:25",),
    "yahoo.com": ("mta5.am0.yahoodns.net:25",),
    "example.com": ("mx1.example.com:25",),
    "example.net": ("mx1.example.net:25",),
}


def by_mx(recipients: Sequence[EmailAddress], hops: Sequence[str]) -> Deferred[list[Route]]:
    """
    Routes by recipient domain through L{MX} (C{mx.DOMAIN:25} for others),
    as the relay routes mail without a smarthost.
    """
    groups: dict[str, list[EmailAddress]] = {}
    for r in recipients:
        groups.setdefault(r.domain.lower(), []).append(r)
    return defer.succeed(
        [
            Route(tuple(rs), MX.get(d, (f"mx.{d}:25",)), destination=Destination(d))
            for d, rs in groups.items()
        ]
    )


def to(*recipients: str, n: int = 0) -> Any:
    """
    An envelope to C{recipients}, routed by MX (no next hops of its own).
    """
    return make_envelope(recipients=recipients, hops=(), envelope_id=f"e{n}", intervals=(600, 600))


class RateTests(SynchronousTestCase):
    """
    Rates and the token bucket that keeps them.
    """

    def test_parse(self) -> None:
        """
        C{N/sec}, C{N/min}, C{N/hour} (and C{s}, C{m}, C{h}) are rates;
        anything else is refused with the forms to use.
        """
        self.assertEqual(parse_rate("600/min"), Rate(600, 60.0))
        self.assertEqual(parse_rate("5/sec"), Rate(5, 1.0))
        self.assertEqual(parse_rate(" 2 / hour "), Rate(2, 3600.0))
        for bad in ("10/day", "0/min", "min", "-1/sec", "1.5/sec"):
            with self.assertRaises(ValueError) as caught:
                parse_rate(bad)
            self.assertIn("N/sec, N/min or N/hour", str(caught.exception))

    def test_even_spacing(self) -> None:
        """
        A bucket of burst 1 lets one unit go per interval, to the tick:
        at 600/min one every 0.1 s, none in between.
        """
        clock = Clock()
        bucket = TokenBucket(parse_rate("600/min"), clock)
        taken = []
        for tick in range(100):
            while bucket.take():
                taken.append(tick)
            clock.advance(0.05)
        # 100 ticks of 0.05 s: 5 s, 50 units, one on every other tick.
        self.assertEqual(taken, list(range(0, 100, 2)))

    def test_burst_and_reserve(self) -> None:
        """
        A burst of N lets N go at once; a reservation gives each later
        unit its own time, one interval apart.
        """
        clock = Clock()
        bucket = TokenBucket(parse_rate("60/min"), clock, burst=3)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        self.assertEqual([bucket.reserve() for _ in range(3)], [1.0, 2.0, 3.0])
        self.assertFalse(bucket.idle())
        clock.advance(6)
        self.assertTrue(bucket.idle())


FILE = """\
[default]
max_connections = 4
message_rate = "600/min"

[domain."example.com"]
max_connections = 2
source = "127.0.0.1"
helo = "out1.relay.test"

[provider.google]
max_connections = 3

[provider.mine]
mx_suffix = [".example.net"]
messages_per_connection = 5

[[rule]]
match = '^421 4\\.7\\.0 slow down'
action = "suspend"
for = "10m"
"""


class ShapingFileTests(SynchronousTestCase):
    """
    The shaping file: what it says, and errors that name file, line, key.
    """

    def test_read(self) -> None:
        """
        Domains and providers take the [default] limits and override
        some; the shipped providers (google) take the file's limits when
        it names them; the file's rules come after the shipped ones.
        """
        config = parse(FILE, "s.toml")
        self.assertEqual(config.default.max_connections, 4)
        self.assertEqual(config.domains["example.com"], Limits(
            max_connections=2, message_rate=Rate(600, 60.0), source="127.0.0.1",
            helo="out1.relay.test",
        ))  # fmt: skip
        google = config.provider_named("google")
        assert google is not None and google.limits is not None
        self.assertEqual(google.mx_suffixes, (".google.com", ".googlemail.com"))
        self.assertEqual(google.limits.max_connections, 3)
        self.assertIsNone(config.provider_named("yahoo").limits)  # type: ignore[union-attr]
        mine = config.provider_named("mine")
        assert mine is not None and mine.limits is not None
        self.assertEqual(mine.limits.messages_per_connection, 5)
        self.assertEqual(config.rules[-1].action, "suspend")
        self.assertEqual(config.rules[-1].duration, 600.0)
        self.assertGreater(len(config.rules), 1)

    def test_example_file(self) -> None:
        """
        The example file of the README (C{examples/shaping.toml}) is a
        good shaping file, and says what it shows.
        """
        from relay.shaping import load

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        config = load(os.path.join(root, "examples", "shaping.toml"))
        self.assertEqual(config.default.message_rate, Rate(600, 60.0))
        self.assertEqual(config.domains["example.com"].source, "192.0.2.11")
        self.assertEqual([p.name for p in config.providers], ["google", "yahoo", "microsoft", "fastmail"])
        self.assertEqual([r.action for r in config.rules[-2:]], ["slow", "suspend"])

    def test_not_shipped(self) -> None:
        """
        C{shipped = false} starts from nothing: no providers, no rules.
        """
        config = parse("shipped = false\n", "s.toml")
        self.assertEqual((config.providers, config.rules), ((), ()))

    def test_errors(self) -> None:
        """
        Each problem is one message naming the file, the line and the key.
        """
        cases = {
            "[default]\nmax_conections = 3\n": "s.toml, line 2: default.max_conections: unknown key",
            '\n[domain."a.example"]\nmessage_rate = "5/day"\n':
                's.toml, line 3: domain."a.example".message_rate: not a rate',
            "[[rule]]\nmatch = 'x'\naction = 'suspend'\nfor = '1m'\n[[rule]]\nmatch = '(('\n"
            "action = 'suspend'\nfor = '1m'\n": "s.toml, line 6: rule 2 key match: bad regular expression",
            "[[rule]]\nmatch = 'x'\naction = 'explode'\nfor = '1m'\n":
                "s.toml, line 3: rule 1 key action: must be one of suspend, slow",
            "[provider.acme]\nmax_connections = 2\n": "s.toml, line 1: provider.acme.mx_suffix",
            "[default]\nsource = 'not-an-ip'\n": "s.toml, line 2: default.source: not an IP address",
            "limits = 3\n": "s.toml, line 1: limits: unknown key",
            "[default\n": "s.toml: not TOML",
        }
        for text, expected in cases.items():
            with self.assertRaises(ShapingFileError) as caught:
                parse(text, "s.toml")
            self.assertIn(expected, str(caught.exception), text)

    def test_start_up_error(self) -> None:
        """
        C{twistd relay --shaping} with a bad file stops at start-up with
        the file's problem; a missing file too.
        """
        from relay.tap import Options

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[default]\nmessage_rate = 'fast'\n")
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--shaping", path])
        self.assertIn(f"--shaping: {path}, line 2: default.message_rate: not a rate", str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--shaping", path + ".missing"])
        self.assertIn("cannot read", str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--bind-address", "example.com"])
        self.assertIn("--bind-address: not an IP address", str(caught.exception))

    def test_reload(self) -> None:
        """
        SIGHUP's reload uses a good new file, and keeps the old one (with
        a L{ReloadError} naming the problem) when the new one is bad.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[default]\nmax_connections = 1\n")
        clock = Clock()
        shaper = Shaper(parse("", path), clock, Suspensions(clock))
        reloadable = ShapingFile(path, shaper)
        verifyObject(IReloadable, reloadable)
        run = lambda f, *a: defer.maybeDeferred(f, *a)  # noqa: E731
        self.assertIn("shaping file", self.successResultOf(reloadable.reload(run)))
        self.assertEqual(shaper.config.default.max_connections, 1)
        with open(path, "w") as f:
            f.write("[default]\nmax_connections = 'many'\n")
        failure = self.failureResultOf(reloadable.reload(run), ReloadError)
        self.assertIn("line 2: default.max_connections", str(failure.value))
        self.assertEqual(shaper.config.default.max_connections, 1)


class ShapedSchedulerTests(SynchronousTestCase):
    """
    The scheduler keeps each limit, by the Clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.spool = MemorySpool(self.clock)
        self.client = FakeClient()

    def make(self, text: str = "", hook: Any = None, **kw: Any) -> DeliveryScheduler:
        self.suspensions = Suspensions(self.clock)
        shaper = Shaper(parse(text, "s.toml"), self.clock, self.suspensions, hook)
        s = DeliveryScheduler(
            spool=self.spool, client=self.client, clock=self.clock, hostname="relay.test",
            route=by_mx, shaper=shaper, max_send_jobs=kw.pop("max_send_jobs", 50), **kw,
        )  # fmt: skip
        s.startService()
        self.addCleanup(lambda: s.stopService() if s.running else None)
        return s

    def enqueue(self, s: DeliveryScheduler, *envelopes: Any) -> list[Any]:
        from relay.delivery.scheduler import SchedulerObserver
        from relay.spool.observed import ObservedSpool

        served = ObservedSpool(self.spool, SchedulerObserver(s))
        entries = self.successResultOf(served.enqueue(list(envelopes)))
        self.clock.advance(0)
        return entries

    def sent_by(self, seconds: float, step: float = 0.5) -> list[int]:
        """
        How many messages have gone out after each C{step} until
        C{seconds}.
        """
        counts = []
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
            counts.append(len(self.client.sent))
        return counts

    def test_message_rate(self) -> None:
        """
        C{message_rate = "60/min"}: one message a second, exactly, however
        many are due at once.
        """
        s = self.make('[default]\nmessage_rate = "60/min"\n')
        self.enqueue(s, *[to("a@example.com", n=i) for i in range(6)])
        self.assertEqual(len(self.client.sent), 1)
        self.assertEqual(self.sent_by(6), [1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6])
        self.assertEqual(self.spool.entries_by_id, {})

    def test_waiting_is_no_attempt(self) -> None:
        """
        An entry held back by a limit keeps its retry step and records no
        attempt: the wait uses up none of its retry intervals, and it is
        shown as waiting (for C{relayctl show} and C{summary}).
        """
        s = self.make('[default]\nmessage_rate = "1/min"\n')
        entries = self.enqueue(s, to("a@example.com", n=0), to("b@example.com", n=1))
        waiting = self.spool.entries_by_id[entries[1].id]
        self.assertEqual((waiting.step, waiting.attempts), (0, ()))
        self.assertEqual(s.shaper.waits[entries[1].id], Wait("example.com", MESSAGE_RATE, 1060.0))
        self.assertEqual(list(s.shaper.by_destination()), [("example.com", MESSAGE_RATE, 1)])
        self.clock.advance(59)
        self.assertEqual(len(self.client.sent), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.client.sent), 2)
        self.assertEqual((self.spool.entries_by_id, s.shaper.waits), ({}, {}))

    def test_max_connections(self) -> None:
        """
        C{max_connections = 2}: two deliveries at once to the domain; the
        next starts as soon as one ends, and other domains are not held
        up meanwhile.
        """
        for hop in MX["example.com"]:
            self.client.behaviour[hop] = None
        s = self.make('[domain."example.com"]\nmax_connections = 2\n')
        self.enqueue(s, *[to("a@example.com", n=i) for i in range(5)], to("b@example.net", n=9))
        self.assertEqual(
            sorted(h for h, _ in self.client.sent),
            ["mx1.example.com:25", "mx1.example.com:25", "mx1.example.net:25"],
        )
        self.assertEqual(
            [w.reason for w in s.shaper.waits.values()], [MAX_CONNECTIONS] * 3
        )
        from tests.test_delivery import DeliveryResult

        first = self.client.pending.pop(0)
        env = self.client.sent[0][1]
        first.callback(DeliveryResult("mx1.example.com:25", ((str(env.recipients[0]), Reply(250, "ok")),)))
        self.clock.advance(0)
        self.assertEqual(len(self.client.sent), 4)
        self.assertEqual(len(self.client.pending), 2)

    def test_provider_budget_shared(self) -> None:
        """
        Domains whose MX hosts end in the provider's suffix share one
        budget: with google's max_connections = 1, gmail.com and
        googlemail.com get one delivery at once between them.
        """
        for hops in MX.values():
            for hop in hops:
                self.client.behaviour[hop] = None
        s = self.make("[provider.google]\nmax_connections = 1\n")
        self.enqueue(
            s, to("a@gmail.com", n=1), to("b@googlemail.com", n=2), to("c@gmail.com", n=3),
            to("d@example.com", n=4),
        )  # fmt: skip
        self.assertEqual(
            [h for h, _ in self.client.sent],
            ["gmail-smtp-in.l.google.com:25", "mx1.example.com:25"],
        )
        self.assertEqual(
            sorted((w.destination, w.reason) for w in s.shaper.waits.values()),
            [("google", MAX_CONNECTIONS)] * 2,
        )

    def test_provider_message_rate_shared(self) -> None:
        """
        A provider's message rate is one budget for all its domains.
        """
        s = self.make('[provider.google]\nmessage_rate = "2/sec"\n')
        self.enqueue(
            s, *[to(f"x{i}@gmail.com" if i % 2 else f"x{i}@googlemail.com", n=i) for i in range(6)]
        )
        self.assertEqual(len(self.client.sent), 1)
        self.assertEqual(self.sent_by(3), [2, 3, 4, 5, 6, 6])

    def test_messages_per_connection_passed(self) -> None:
        """
        The client is told the destination's connection shaping: its
        messages per connection, source and HELO name.
        """
        seen: list[Any] = []

        class Client(FakeClient):
            per_destination_tls = True

            def send(self, hop: str, env: Any, destination: Any = None) -> Any:
                seen.append(destination)
                return FakeClient.send(self, hop, env)

        self.client = Client()
        s = self.make(
            '[domain."example.com"]\nmessages_per_connection = 3\nsource = "127.0.0.2"\n'
            'helo = "out.relay.test"\n'
        )
        self.enqueue(s, to("a@example.com"))
        [destination] = seen
        shaping = destination.shaping
        self.assertEqual(
            (destination.domain, shaping.destination, shaping.messages_per_connection,
             shaping.source, shaping.helo),
            ("example.com", "example.com", 3, "127.0.0.2", "out.relay.test"),
        )  # fmt: skip

    def test_connection_rate_wait(self) -> None:
        """
        A new connection that must wait for the connection rate
        (L{LimitWait} from the client) is no attempt: the entry waits
        until the rate allows, then goes.
        """
        class Client(FakeClient):
            per_destination_tls = True

            def send(self, hop: str, env: Any, destination: Any = None) -> Any:
                wait = destination.shaping.connect()
                if wait is not None:
                    return defer.fail(LimitWait(wait))
                return FakeClient.send(self, hop, env)

        self.client = Client()
        s = self.make('[default]\nconnection_rate = "6/min"\n')
        entries = self.enqueue(s, to("a@example.com", n=1), to("b@example.com", n=2))
        self.assertEqual(len(self.client.sent), 1)
        entry = self.spool.entries_by_id[entries[1].id]
        self.assertEqual((entry.step, entry.attempts), (0, ()))
        self.clock.advance(10)
        self.assertEqual(len(self.client.sent), 2)
        self.assertEqual(self.spool.entries_by_id, {})

    def test_reply_rule_suspends_and_resumes(self) -> None:
        """
        A reply that a rule matches suspends the destination: that
        delivery was an attempt (deferred), the mail after it waits
        without attempts, and all of it goes when the suspension ends.
        """
        self.client.behaviour["mta5.am0.yahoodns.net:25"] = Reply(
            421, "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred"
        )
        s = self.make()
        first = self.enqueue(s, to("a@yahoo.com", n=1))[0]
        self.assertEqual(self.spool.entries_by_id[first.id].step, 1)
        [suspension] = self.suspensions.all()
        self.assertEqual((suspension.name, suspension.until, suspension.automatic), ("yahoo", 4600.0, True))
        self.assertIn("TSS04", suspension.reason)
        del self.client.behaviour["mta5.am0.yahoodns.net:25"]
        second = self.enqueue(s, to("b@yahoo.com", n=2))[0]
        self.assertEqual(len(self.client.sent), 1)
        self.assertEqual(s.shaper.waits[second.id].reason, SUSPENDED)
        self.assertEqual(self.spool.entries_by_id[second.id].attempts, ())
        self.clock.advance(3600)
        self.assertEqual(self.suspensions.all(), [])
        self.assertEqual(len(self.client.sent), 3)
        self.assertEqual(self.spool.entries_by_id, {})

    def test_operator_suspension(self) -> None:
        """
        A suspension until resumed holds mail to the domain until
        C{resume}; mail elsewhere goes on.
        """
        s = self.make()
        self.suspensions.suspend("example.com", None, "maintenance")
        self.enqueue(s, to("a@example.com", n=1), to("b@example.net", n=2))
        self.assertEqual([h for h, _ in self.client.sent], ["mx1.example.net:25"])
        self.clock.advance(86400)
        self.assertEqual(len(self.client.sent), 1)
        self.assertTrue(self.suspensions.resume("example.com"))
        self.clock.advance(0)
        self.assertEqual(len(self.client.sent), 2)
        self.assertFalse(self.suspensions.resume("example.com"))

    def test_slow_rule(self) -> None:
        """
        A C{slow} rule lowers the destination's message rate for its
        duration, after which the file's rate applies again.
        """
        s = self.make(
            '[default]\nmessage_rate = "10/sec"\n'
            "[[rule]]\nmatch = '4\\.7\\.28'\naction = 'slow'\nrate = '1/sec'\nfor = '10s'\n"
        )
        self.client.behaviour["mx1.example.com:25"] = Reply(421, "4.7.28 unusual rate")
        self.enqueue(s, to("a@example.com", n=0))
        del self.client.behaviour["mx1.example.com:25"]
        self.enqueue(s, *[to("a@example.com", n=i) for i in range(1, 6)])
        self.assertEqual(self.sent_by(4, 1.0), [3, 4, 5, 6])
        self.clock.advance(10)
        self.enqueue(s, *[to("a@example.com", n=i) for i in range(10, 15)])
        self.assertEqual(self.sent_by(0.5, 0.1), [8, 9, 10, 11, 11])

    def test_plugin_limits(self) -> None:
        """
        A plugin providing L{IDestinationLimits} chooses a destination's
        limits from those of the file (here: one connection for
        example.com only).
        """
        @implementer(IDestinationLimits)
        class Policy(Simple):
            def destination_limits(self, destination: str, limits: Limits) -> Limits | None:
                if destination == "example.com":
                    return dataclasses.replace(limits, max_connections=1)
                return None

        policy = Policy()
        verifyObject(IDestinationLimits, policy)
        for hops in MX.values():
            for hop in hops:
                self.client.behaviour[hop] = None
        s = self.make(hook=policy.destination_limits)
        self.enqueue(s, *[to("a@example.com", n=i) for i in range(3)], *[to("b@example.net", n=10 + i) for i in range(3)])
        hops = [h for h, _ in self.client.sent]
        self.assertEqual((hops.count("mx1.example.com:25"), hops.count("mx1.example.net:25")), (1, 3))

    def test_state_bounded(self) -> None:
        """
        Per-destination state lives only while a destination has mail
        under way: after mail to 150 domains is delivered and a sweep has
        run, none is held.
        """
        s = self.make('[default]\nmessage_rate = "100/min"\n')
        self.enqueue(s, *[to(f"a@d{i}.example", n=i) for i in range(150)])
        self.assertEqual(len(self.client.sent), 150)
        self.assertLessEqual(len(s.shaper.states), 150)
        self.clock.advance(60)
        self.assertEqual((s.shaper.states, s.shaper.waits), ({}, {}))


class SuspensionFileTests(SynchronousTestCase):
    """
    Suspensions survive a restart through C{<spool>/suspensions.json}.
    """

    def test_survive_restart(self) -> None:
        """
        What one L{Suspensions} wrote, the next one reads; those that ran
        out meanwhile are gone.
        """
        clock = Clock()
        clock.advance(1000)
        path = os.path.join(self.mktemp(), "suspensions.json")
        os.makedirs(os.path.dirname(path))
        events: list[Any] = []
        from relay.control.events import EventBus

        bus = EventBus(clock)
        bus.subscribe(events.append)
        first = Suspensions(clock, path, events=bus)
        first.suspend("Example.COM", None, "by hand")
        first.suspend("yahoo", 2000.0, "reply rule", automatic=True)
        self.successResultOf(first.flushed())
        self.assertEqual([(e.kind, e.fields["destination"]) for e in events], [("suspended", "example.com"), ("suspended", "yahoo")])
        again = Suspensions(clock, path)
        again.load()
        self.assertEqual([s.to_json() for s in again.all()], [s.to_json() for s in first.all()])
        clock.advance(1000)
        later = Suspensions(clock, path)
        later.load()
        self.assertEqual([s.name for s in later.all()], ["example.com"])


class ConnectionShapingTests(SynchronousTestCase):
    """
    The relay client applies a destination's connection shaping.
    """

    def test_source_helo_and_reuse(self) -> None:
        """
        Connections are made from the destination's source address, say
        its HELO name, and carry at most C{messages_per_connection}
        transactions.
        """
        harness = ClientHarness()
        shaping = ConnectionShaping("example.com", 2, "127.0.0.5", "out5.relay.test")
        destination = Destination("example.com", shaping=shaping)
        binds = []
        for _ in range(3):
            d = harness.client.send("192.0.2.25:25", envelope(), destination)
            binds += [c[4] for c in harness.reactor.tcpClients]
            harness.pump()
            self.assertEqual(self.successResultOf(d).replies[0][1].code, 250)
        self.assertEqual(binds, [("127.0.0.5", 0), ("127.0.0.5", 0)])
        self.assertEqual(len(harness.connections), 2)
        self.assertIn("> EHLO out5.relay.test", str(harness.connections[0]))

    def test_bind_address(self) -> None:
        """
        C{--bind-address} (the client's C{bind_address}) is the source of
        every connection whose destination names none.
        """
        from relay.delivery.client import ClientSettings

        harness = ClientHarness(settings=ClientSettings(hostname="relay.test", bind_address="127.0.0.9"))
        d = harness.client.send("192.0.2.25:25", envelope())
        self.assertEqual([c[4] for c in harness.reactor.tcpClients], [("127.0.0.9", 0)])
        harness.pump()
        self.successResultOf(d)

    def test_connection_rate_gate(self) -> None:
        """
        The connection shaping's C{connect} takes a unit of the
        connection rate, and says when the next is free once they are
        used up.
        """
        clock = Clock()
        shaper = Shaper(parse('[default]\nconnection_rate = "2/min"\n'), clock, Suspensions(clock))
        route = Route((EmailAddress.parse("a@example.com"),), ("mx1.example.com:25",), destination=Destination("example.com"))
        admission = self.successResultOf(Deferred.fromCoroutine(shaper.admit("e1", route)))
        assert not isinstance(admission, Wait)
        self.assertIsNone(admission.shaping.connect())
        self.assertEqual(admission.shaping.connect(), Wait("example.com", "connection_rate", 30.0))


class ControlTests(SynchronousTestCase):
    """
    C{relayctl suspend/resume/suspended}, and what waits in C{show} and
    C{summary}, over the control protocol of a real scheduler.
    """

    def setUp(self) -> None:
        from twisted.test import iosim

        from relay.control.client import ControlClient
        from relay.control.server import ControlProtocol

        self.clock = Clock()
        self.clock.advance(1000)
        self.spool = MemorySpool(self.clock)
        self.fake = FakeClient()
        self.suspensions = Suspensions(self.clock)
        shaper = Shaper(parse('[default]\nmessage_rate = "1/min"\n'), self.clock, self.suspensions)
        self.scheduler = DeliveryScheduler(
            spool=self.spool, client=self.fake, clock=self.clock, route=by_mx, shaper=shaper
        )
        self.scheduler.startService()
        self.addCleanup(self.scheduler.stopService)
        self.client, _, self.pump = iosim.connectedServerAndClient(
            lambda: ControlProtocol(self.spool, self.scheduler, [], self.clock), ControlClient
        )

    def call(self, command: Any, **kw: Any) -> Any:
        d = self.client.callRemote(command, **kw)
        self.pump.flush()
        return self.successResultOf(d)

    def test_suspend_resume_list(self) -> None:
        """
        Suspend answers the end and whether the name is a provider;
        Suspended lists reasons, ends and what waits; Resume ends it and
        the mail goes.
        """
        import json

        from relay.control import rpc
        from relay.delivery.scheduler import SchedulerObserver
        from relay.spool.observed import ObservedSpool

        self.assertEqual(
            self.call(rpc.Suspend, destination="yahoo", seconds=600.0, reason="complaints"),
            {"until": 1600.0, "provider": True},
        )
        self.assertEqual(self.call(rpc.Suspend, destination="Example.com"), {"until": None, "provider": False})
        served = ObservedSpool(self.spool, SchedulerObserver(self.scheduler))
        self.successResultOf(served.enqueue([to("a@example.com", n=1)]))
        self.clock.advance(0)
        rows = json.loads(self.call(rpc.Suspended)["suspensions"])
        self.assertEqual(
            [(r["name"], r["until"], r["reason"], r["waiting"]) for r in rows],
            [("example.com", None, "suspended by relayctl", 1), ("yahoo", 1600.0, "complaints", 0)],
        )
        self.assertEqual(self.call(rpc.Resume, destination="example.com"), {"resumed": True, "waiting": 1})
        self.clock.advance(0)
        self.assertEqual(len(self.fake.sent), 1)
        self.assertEqual(self.call(rpc.Resume, destination="example.com")["resumed"], False)

    def test_show_and_summary_waiting(self) -> None:
        """
        An entry waiting for the message rate says so in C{show}, and
        C{summary} counts it under its destination and limit.
        """
        import json

        from relay.control import rpc
        from relay.delivery.scheduler import SchedulerObserver
        from relay.spool.observed import ObservedSpool

        served = ObservedSpool(self.spool, SchedulerObserver(self.scheduler))
        _, second = self.successResultOf(served.enqueue([to("a@example.com", n=1), to("b@example.com", n=2)]))
        self.clock.advance(0)
        shown = self.call(rpc.Show, id=second.id)
        self.assertEqual(
            json.loads(shown["waiting"]),
            {"destination": "example.com", "reason": "message_rate", "until": 1060.0, "detail": ""},
        )
        summary = self.call(rpc.Summary)
        self.assertEqual(json.loads(summary["waiting"]), [["example.com", "message_rate", 1]])

    def test_metrics(self) -> None:
        """
        The metrics show suspended destinations, entries waiting by limit
        and suspensions counted by who made them.
        """
        from prometheus_client import generate_latest

        from relay.control.events import Event
        from relay.control.metrics import RelayMetrics

        metrics = RelayMetrics(clock=self.clock)
        metrics.shaping(self.scheduler.shaper)
        self.suspensions.suspend("example.com", None)
        metrics.observe(Event("suspended", None, 0.0, 1, {"automatic": True}))
        text = generate_latest(metrics.registry).decode()
        self.assertIn("relay_suspended_destinations 1.0", text)
        self.assertIn('relay_waiting_for_limit{limit="suspended"} 0.0', text)
        self.assertIn('relay_suspensions_total{by="rule"} 1.0', text)


class RelayctlTests(SynchronousTestCase):
    """
    C{relayctl suspend}, C{resume} and C{suspended} call their AMP
    commands and print one line each (the network replaced by a fake).
    """

    def setUp(self) -> None:
        from relay.control import ctl

        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.response: dict[str, Any] = {}

        def fake(control: str, command: Any, **kwargs: Any) -> dict[str, Any]:
            self.calls.append((command.__name__, kwargs))
            return self.response

        self.patch(ctl, "_call", fake)

    def test_suspend(self) -> None:
        """
        C{suspend NAME --for 30m --reason TEXT} sends seconds and reason;
        a bad duration is a usage error naming --for.
        """
        from tests.test_ctl import run_main

        self.response = {"until": 2800.0, "provider": True}
        code, out, err = run_main("suspend", "google", "--for", "30m", "--reason", "warm-up")
        self.assertEqual((code, out, err), (0, "suspended provider google for 30m\n", ""))
        self.assertEqual(self.calls, [("Suspend", {"destination": "google", "seconds": 1800.0, "reason": "warm-up"})])
        code, out, err = run_main("suspend", "google", "--for", "soon")
        self.assertNotEqual(code, 0)
        self.assertIn("--for: not a duration", err)

    def test_resume_and_list(self) -> None:
        """
        C{resume} says how many entries waited, and fails (non-zero) for
        a destination not suspended; C{suspended} lists one per line.
        """
        from tests.test_ctl import run_main

        self.response = {"resumed": True, "waiting": 3}
        self.assertEqual(run_main("resume", "example.com"), (0, "resumed example.com (3 entries waiting for it)\n", ""))
        self.response = {"resumed": False, "waiting": 0}
        code, out, err = run_main("resume", "example.com")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("example.com is not suspended", err)
        self.response = {"suspensions": '[{"name": "yahoo", "since": 900, "until": null, '
                         '"reason": "complaints", "automatic": false, "waiting": 2}]'}  # fmt: skip
        code, out, err = run_main("suspended")
        self.assertEqual(out, "yahoo  until resumed  by operator  waiting 2  complaints\n")


class BuildTests(SynchronousTestCase):
    """
    C{makeService} (and so C{twistd relay}) with C{shaping} and
    C{bind_address}.
    """

    def make(self, **kwargs: Any) -> Any:
        from twisted.internet.testing import MemoryReactorClock

        from relay import service

        base = os.path.abspath(self.mktemp())
        self.spool_dir = os.path.join(base, "spool")
        return service.makeService(
            reactor=MemoryReactorClock(), spool=self.spool_dir,
            quarantine=os.path.join(base, "quarantine"), hostname="relay.test", control="",
            smtp=["tcp:0:interface=127.0.0.1"], **kwargs,
        )  # fmt: skip

    def test_wired(self) -> None:
        """
        The shaping file is what the scheduler's shaper uses, SIGHUP
        reloads it, suspensions are kept in the spool directory, and the
        client connects from C{bind_address}.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[default]\nmessage_rate = "5/sec"\n')
        top = self.make(shaping=path, bind_address="127.0.0.1")
        shaper = top.delivery.shaper
        self.assertEqual(shaper.config.default.message_rate, Rate(5, 1.0))
        self.assertEqual(shaper.suspensions.path, os.path.join(self.spool_dir, "suspensions.json"))
        [reloadable] = [r for r in top.getServiceNamed("reload").reloadables if isinstance(r, ShapingFile)]
        self.assertIs(reloadable.shaper, shaper)
        self.assertEqual(top.delivery.client.settings.bind_address, "127.0.0.1")

    def test_bad_file(self) -> None:
        """
        A shaping file that cannot be used stops the build with its file,
        line and key; so does a bind address that is no IP address.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[default]\nmax_connections = -1\n")
        with self.assertRaises(ValueError) as caught:
            self.make(shaping=path)
        self.assertIn(f"{path}, line 2: default.max_connections", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            self.make(bind_address="mx.example.com")
        self.assertIn("bind_address must be an IP address", str(caught.exception))


class FormatTests(SynchronousTestCase):
    """
    How C{relayctl show} and C{summary} print what waits for a limit.
    """

    def test_wait_and_waiting(self) -> None:
        """
        C{show} gets one line naming destination, limit and when the
        entry is looked at again; C{summary} a table by destination.
        """
        from relay.control.formats import format_wait, format_waiting

        wait = Wait("google", MESSAGE_RATE, 1090.0).to_json()
        line = format_wait(wait, 1000.0)
        self.assertEqual(line, "waiting: for google (message_rate) until 1970-01-01T00:18:10+00:00 (in 1m)\n")
        suspended = format_wait(Wait("yahoo", SUSPENDED, None, "complaints").to_json(), 1000.0)
        self.assertEqual(suspended, "waiting: for yahoo (suspended) until woken: complaints\n")
        self.assertEqual(
            format_waiting([["example.com", "max_connections", 3], ["google", "message_rate", 12]]),
            "waiting for a limit (not attempts):\n"
            "  example.com  max_connections  3\n"
            "  google       message_rate     12\n",
        )
        self.assertEqual(format_waiting([]), "")
