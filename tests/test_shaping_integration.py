"""
Traffic shaping end to end: the real C{twistd relay} keeps a message rate
towards a real SMTP sink on loopback, as the sink's own clock sees it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from relay import Consume
from tests.test_integration import SinkCallbacks, TwistdTestCase, free_port


class TimedSink(SinkCallbacks):
    """
    A sink that notes, by its own clock, when each message arrived.
    """

    def __init__(self) -> None:
        SinkCallbacks.__init__(self)
        self.arrivals: list[tuple[float, int]] = []

    def process_envelope(self, log: Any, session: Any, envelope: Any) -> Any:
        for recipient in envelope.recipients:
            self.arrivals.append((reactor.seconds(), int(str(recipient).split("@")[0][1:])))
        return Consume("delivered to the sink")


def spool_due_now(path: str, n: int) -> list[str]:
    """
    Put C{n} entries due at once in the spool at C{path} (through the
    spool's own writer), to C{u<i>@example.net} in order, on the default
    route.  Blocking.
    """
    import time

    from twisted.internet import defer
    from twisted.internet.task import Clock

    from relay.model.entry import new_id
    from relay.spool.disk import DiskSpool
    from tests.test_spool import make_envelope

    clock = Clock()
    clock.advance(time.time())
    spool = DiskSpool(path, lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw), clock)
    envelopes = [
        dataclasses.replace(
            make_envelope(new_id(), recipients=(f"u{i}@example.net",)), next_hop_choices=()
        )
        for i in range(n)
    ]
    return [entry.id for entry in spool.enqueue(envelopes).result]  # type: ignore[attr-defined]


class MessageRateTests(TwistdTestCase):
    """
    C{message_rate = "600/min"} in a real relay.
    """

    MESSAGES = 300
    #: the rate's interval: 600/min
    INTERVAL = 0.1

    @inlineCallbacks
    def test_spreads_300_messages(self) -> Any:
        """
        300 messages due at once reach the sink spread at 600/min: the
        sink's first and last arrivals are at least (nearly) 299 intervals
        apart, no 5 seconds of its clock see much more than 50, they come
        in about their spool order, and while they wait C{relayctl
        summary} shows them as waiting for the message rate (not as
        attempts).
        """
        yield deferToThread(spool_due_now, self.spool, self.MESSAGES)
        shaping = os.path.join(self.base, "shaping.toml")
        with open(shaping, "w") as f:
            f.write('[default]\nmessage_rate = "600/min"\n')
        sink, sink_port = self.start_sink()
        sink.__class__ = TimedSink
        sink.arrivals = []  # type: ignore[attr-defined]
        port = free_port()
        process, output = self.start_twistd(
            "shaped", port, smarthost=f"127.0.0.1:{sink_port}",
            extra=("--retry-intervals", "1h", "--shaping", shaping),
        )  # fmt: skip
        yield self.wait_listening(process, output, port)
        sock = os.path.join(self.base, "shaped.sock")
        if len(os.fsencode(sock)) > 107:
            sock = "shaped.sock"  # relative to relayctl's directory: the base
        relayctl = self.relayctl_for(sock)

        out, err, code = yield relayctl("summary")
        self.assertEqual((err, code), ("", 0))
        if len(sink.arrivals) < self.MESSAGES * 3 // 4:  # type: ignore[attr-defined]
            self.assertIn("waiting for a limit (not attempts):\n  127.0.0.1  message_rate", out)

        arrivals: list[tuple[float, int]] = yield self.poll(
            lambda: len(sink.arrivals) >= self.MESSAGES and sink.arrivals,  # type: ignore[attr-defined]
            lambda: f"{self.MESSAGES} messages at the sink, {len(sink.arrivals)} so far:\n"  # type: ignore[attr-defined]
            + self.output(output)[-3000:],
            timeout=3 * self.MESSAGES * self.INTERVAL + 30,
        )
        times = [t for t, _ in arrivals]
        order = [i for _, i in arrivals]
        self.assertEqual(sorted(order), list(range(self.MESSAGES)))
        # The rate: never faster (the margin is for the sink's own
        # timestamps, taken after the network).
        self.assertGreaterEqual(times[-1] - times[0], 0.8 * (self.MESSAGES - 1) * self.INTERVAL)
        # Bounded bursts: 5 s hold 50 at the rate; a stalled reactor may
        # let a few of the late ones bunch up, no more.
        for k, start in enumerate(times):
            within = sum(1 for t in times[k:] if t < start + 5.0)
            self.assertLessEqual(within, 75, f"{within} messages in 5 s from {start}")
        # Order: roughly as spooled (entries made in the same millisecond
        # have ids, and due times, in no particular order; deliveries run
        # side by side).
        self.assertLessEqual(max(abs(i - rank) for rank, i in enumerate(order)), 60)
        yield self.poll(
            lambda: not [p for p in os.listdir(os.path.join(self.spool, "active")) if p.endswith(".json")],
            "the spool to empty",
        )
