"""
The crash suite (C{make crash}): the real relay, killed with SIGKILL at
random moments and restarted on the same spool, must deliver every message
it acknowledged, byte for byte; and a full disk under its spool must give
the client a 4xx, leave no half-written entry and not stop the relay.
The SIGKILL run goes twice: as one process (C{--receivers 0}), and as a
master with two receiving processes, which are killed with it or left to
finish the transactions they are in (L{Crasher}).

Each test prints one summary line (and appends it to C{crash-summary.txt}
in trial's working directory, or to C{$CRASH_SUMMARY}).  The random choices
(message sizes and contents, which moments the kills hit) come from
C{$CRASH_SEED} when set, a fresh seed otherwise; the seed is in the summary
so that a run can be replayed (as far as the timing of the processes
allows).  C{$CRASH_MESSAGES} (500) and C{$CRASH_KILLS} (100) change the
scale.

In the summary, C{acknowledged} messages got 250 after their data; C{cut}
ones lost their session between DATA and the reply (they may or may not
arrive, but never altered); C{duplicates} are second deliveries, each of
which must come from a later relay process than the first (a kill hit
between the sink's 250 and the relay recording it); C{lost},
C{corrupted} (bytes differ from what the client sent) and C{unexpected}
(a message the client never sent) must be 0.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import time
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.trial.unittest import SkipTest, TestCase

from relay.model.entry import ACTIVE, FROZEN, REMOVED
from relay.spool.layout import SpoolLayout
from relay.spool.lock import SpoolLock
from tests.system.support import (
    ClientSession,
    RelayProcess,
    SinkFactory,
    SinkProtocol,
    connect,
    free_port,
    pause,
    poll,
    received_prefix_ok,
    stuff,
)

SENDER = "alice@example.com"
RECIPIENT = "bob@example.net"
SESSIONS = 4
MAX_SEND_JOBS = 4
CHUNK = 2048
RETRY = ",".join(["1"] * 30)
LOST = (ConnectionDone, ConnectionLost, defer.TimeoutError)

#: What a kill is triggered by, with its weight: the client's DATA
#: (mid-message), the spool write (just after the client's final dot),
#: right after a 250 to the client, the delivery's DATA at the sink
#: (mid-message), a delivered message before the sink's 250, just after the
#: sink's 250 (the duplicate window), and a plain random delay.
KINDS = {
    "data": 22,
    "spool": 22,
    "ack": 8,
    "delivery-data": 14,
    "delivery-eod": 10,
    "delivery-ack": 16,
    "timer": 8,
}
CLIENT_KINDS = ("data", "spool", "ack")
DELIVERY_KINDS = ("delivery-data", "delivery-eod", "delivery-ack")
#: A kill whose event does not come within this many seconds happens anyway.
FALLBACK = 1.0


def seed() -> int:
    text = os.environ.get("CRASH_SEED", "").strip()
    return int(text) if text else random.SystemRandom().randrange(1, 1 << 31)


def setting(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    return int(text) if text else default


def summarize(line: str) -> None:
    """
    Print the summary C{line} and append it to the summary file.
    """
    print("\n" + line)
    path = os.environ.get("CRASH_SUMMARY") or os.path.abspath("crash-summary.txt")
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def make_message(rng: random.Random, tag: str, size: int) -> bytes:
    """
    A message of about C{size} bytes with Message-ID C{<tag@client.test>}:
    CRLF lines of random lengths, some starting with a dot, some empty.
    """
    header = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@client.test>\r\n\r\n"
    ).encode()
    text = rng.randbytes(size // 2 + 1).hex()
    lines = []
    at = 0
    while at < size:
        n = rng.randrange(0, 200)
        line = text[at : at + n]
        at += n + 1
        roll = rng.random()
        if roll < 0.03:
            line = "." + line
        elif roll < 0.04:
            line = "."
        lines.append(line)
    return header + "".join(line + "\r\n" for line in lines).encode()


def spool_files(spool: str, *queues: str) -> list[str]:
    found: list[str] = []
    for queue in queues:
        path = os.path.join(spool, queue)
        if os.path.isdir(path):
            found.extend(os.path.join(queue, name) for name in os.listdir(path))
    return sorted(found)


class Crasher:
    """
    Kills the relay (SIGKILL) when the event of the armed kind comes, and
    restarts it at once on the same spool, C{wanted} times.

    With C{receivers}, a kill that a client's message triggers ends the
    whole process group (the receiver in the middle of that message too);
    any other ends the master alone or the group, at random: a master's
    receivers then finish the transactions they are in while the new
    relay waits for them (the spool's lock).
    """

    def __init__(
        self, relay: RelayProcess, rng: random.Random, wanted: int, receivers: bool = False
    ) -> None:
        self.relay = relay
        self.rng = rng
        self.wanted = wanted
        self.receivers = receivers
        self.kills: list[str] = []
        #: when the last kill came (the system's clock, as file times)
        self.last_kill = 0.0
        self.armed: dict[str, Any] | None = None
        self.fallback: Any = None
        self.clients_done = False
        self.finished: Deferred[None] = Deferred()
        self.error: BaseException | None = None

    def arm(self) -> None:
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        if self.clients_done:
            # Nothing new to send or deliver: kill during start-up and
            # recovery, or whatever the relay is doing then.
            kind = "late"
        rng = self.rng
        delay = 0.0
        if kind == "data":
            count = rng.randint(1, 20)
        elif kind == "spool":
            count, delay = rng.randint(1, 4), rng.uniform(0.0005, 0.03)
        elif kind == "ack":
            count = rng.randint(1, 4)
        elif kind == "delivery-data":
            count = rng.randint(1, 300)
        elif kind in ("delivery-eod", "delivery-ack"):
            count = rng.randint(1, 3)
            if kind == "delivery-ack":
                delay = rng.choice([0.0, rng.uniform(0.0, 0.01)])
        elif kind == "late":
            count, delay = 1, rng.uniform(0.0, 0.3)
        else:
            count, delay = 1, rng.uniform(0.0, 1.0)
        self.armed = {"kind": kind, "count": count, "delay": delay, "seen": 0}
        if kind in ("timer", "late"):
            self.fallback = reactor.callLater(delay, self.kill, kind)  # type: ignore[attr-defined]
        else:
            self.fallback = reactor.callLater(FALLBACK, self.kill, f"{kind}-fallback")  # type: ignore[attr-defined]

    def may_send(self, started: int, total: int) -> bool:
        """
        Whether the clients may start another message: they keep pace with
        the kills (about C{total / (wanted + 1)} messages for each relay
        process), and a few more for a kill that waits for them or for
        deliveries.
        """
        armed = self.armed
        if len(self.kills) >= self.wanted:
            return True
        share = total / (self.wanted + 1)
        if armed is not None and armed["kind"] in CLIENT_KINDS + DELIVERY_KINDS:
            # A kill waiting for messages or deliveries gets a few of its own.
            base = armed.setdefault("base", started)
            if started < base + max(6, 2 * share):
                return True
        return started < (len(self.kills) + 1) * share

    def event(self, kind: str, weight: int = 1) -> bool:
        """
        Count an event of C{kind}; return whether it killed the relay now.
        """
        armed = self.armed
        if armed is None or armed["kind"] != kind:
            return False
        armed["seen"] += weight
        if armed["seen"] < armed["count"]:
            return False
        if armed["delay"]:
            self._disarm()
            reactor.callLater(armed["delay"], self.kill, kind)  # type: ignore[attr-defined]
            return False
        self.kill(kind)
        return True

    def _disarm(self) -> None:
        self.armed = None
        if self.fallback is not None and self.fallback.active():
            self.fallback.cancel()
        self.fallback = None

    def kill(self, kind: str) -> None:
        self._disarm()
        if not self.relay.running:
            return
        if self.receivers:
            group = kind.removesuffix("-fallback") in CLIENT_KINDS or self.rng.random() < 0.5
            self.relay.kill(group=group)
            kind += "/group" if group else "/master"
        else:
            self.relay.kill()
        self.last_kill = time.time()
        self.kills.append(kind)
        Deferred.fromCoroutine(self.restart())

    async def restart(self) -> None:
        try:
            self.relay.start()
            await self.relay.wait_listening()
        except BaseException as e:
            self.error = e
            if not self.finished.called:
                self.finished.errback(e)
            return
        if len(self.kills) < self.wanted:
            self.arm()
        elif not self.finished.called:
            self.finished.callback(None)

    def stop(self) -> None:
        self._disarm()


class CrashTests(TestCase):
    """
    SIGKILL the real relay at random moments while clients send and it
    delivers, restarting it each time.
    """

    timeout = 280

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def test_sigkill(self) -> Deferred[None]:
        """
        One process (C{--receivers 0}): each kill hits the process that
        receives, spools and delivers.
        """
        total, wanted = setting("CRASH_MESSAGES", 500), setting("CRASH_KILLS", 100)
        return Deferred.fromCoroutine(self.sigkill(0, total, wanted))

    def test_sigkill_receivers(self) -> Deferred[None]:
        """
        A master and two receivers (C{--receivers 2}), killed together or
        the master alone (see L{Crasher}); a quarter of the scale, since
        each start begins three processes.
        """
        total, wanted = setting("CRASH_MESSAGES", 500), setting("CRASH_KILLS", 100)
        return Deferred.fromCoroutine(self.sigkill(2, max(1, total // 4), max(1, wanted // 4)))

    async def sigkill(self, receivers: int, total: int, wanted: int) -> None:
        started = time.monotonic()
        run_seed = seed()
        rng = random.Random(run_seed)
        messages: dict[str, bytes] = {}
        order: list[str] = []
        for i in range(total):
            tag = f"crash-{run_seed}-{i}"
            key = f"{tag}@client.test"
            size = (
                rng.randint(300_000, 400_000)
                if rng.random() < 0.02
                else int(rng.lognormvariate(8, 1.2)) + 100
            )
            messages[key] = make_message(rng, tag, min(size, 400_000))
            order.append(key)

        sink = SinkFactory()
        listener = sink.listen()
        self.addCleanup(listener.stopListening)
        self.addCleanup(sink.close)
        port = free_port()
        relay = RelayProcess(
            self.base, port,
            ["--smarthost", f"127.0.0.1:{listener.getHost().port}", "--relay-tls", "none",
             "--retry-intervals", RETRY, "--max-send-jobs", str(MAX_SEND_JOBS),
             "--receivers", str(receivers)],
        )  # fmt: skip
        self.addCleanup(lambda: Deferred.fromCoroutine(relay.stop()))
        crasher = Crasher(relay, random.Random(run_seed + 1), wanted, receivers=receivers > 0)
        self.addCleanup(crasher.stop)
        sink.tag = lambda: relay.generation

        def data_line(proto: SinkProtocol, count: int) -> None:
            if crasher.event("delivery-data"):
                proto.kill()

        def end_of_data(proto: SinkProtocol, data: bytes) -> None:
            if crasher.event("delivery-eod"):
                proto.kill()
                return
            proto.acknowledge(data)
            crasher.event("delivery-ack")

        sink.on_data_line = data_line
        sink.on_end_of_data = end_of_data

        relay.start()
        await relay.wait_listening()
        crasher.arm()

        status: dict[str, str] = {}
        queue = list(order)
        client_rng = random.Random(run_seed + 2)
        deadline = time.monotonic() + 220

        async def transaction(proto: ClientSession, tag: str) -> bool:
            status[tag] = "cut"
            try:
                code, text = await proto.command(f"MAIL FROM:<{SENDER}>")
                if code == 250:
                    code, text = await proto.command(f"RCPT TO:<{RECIPIENT}>")
                if code == 250:
                    code, text = await proto.command("DATA")
            except LOST:
                # Lost before any of the message was sent: send it later.
                del status[tag]
                queue.insert(0, tag)
                raise
            if code == 421:
                # A receiver whose master is gone ends its sessions: the
                # message goes again, later.
                del status[tag]
                queue.insert(0, tag)
                return False
            if code != 354:
                status[tag] = f"refused {code}"
                return False
            data = stuff(messages[tag])
            for at in range(0, len(data), CHUNK):
                proto.write(data[at : at + CHUNK])
                crasher.event("data")
                await pause()
            proto.write(b".\r\n")
            crasher.event("spool")
            code, text = await proto.reply()
            if code == 250:
                status[tag] = "acknowledged"
                crasher.event("ack")
                return True
            status[tag] = f"refused {code}"
            return False

        async def client() -> None:
            while queue:
                if crasher.error is not None:
                    raise crasher.error
                if time.monotonic() > deadline:
                    raise AssertionError("clients did not finish in time")
                try:
                    proto = await connect(port)
                except Exception:
                    await pause(0.05)
                    continue
                try:
                    code, _ = await proto.reply()
                    if code == 220:
                        code, _ = await proto.command("EHLO client.test")
                    if code != 250:
                        proto.close()
                        continue
                    for _ in range(client_rng.randint(1, 20)):
                        while queue and not crasher.may_send(len(status), total):
                            if crasher.error is not None or time.monotonic() > deadline:
                                break
                            await pause(0.02)
                        if not queue or proto.lost is not None:
                            break
                        if not await transaction(proto, queue.pop(0)):
                            break
                    await proto.command("QUIT")
                except LOST:
                    pass
                finally:
                    proto.close()

        await defer.gatherResults(
            [Deferred.fromCoroutine(client()) for _ in range(SESSIONS)], consumeErrors=True
        ).addErrback(lambda f: f.value.subFailure)
        crasher.clients_done = True
        if crasher.armed is not None and crasher.armed["kind"] != "timer":
            crasher.kill("late")
        sent_done = time.monotonic() - started
        await crasher.finished
        crasher.stop()

        acknowledged = {tag for tag, s in status.items() if s == "acknowledged"}
        spool = relay.spool

        empty_since: list[float] = []
        layout = SpoolLayout(spool)

        def leftover(name: str) -> bool:
            # A message file that no entry refers to (see below).
            queue, _, file = name.partition(os.sep)
            entry_id = file.removesuffix(".eml")
            return queue == "messages" and not any(
                os.path.exists(layout.metadata_path(q, entry_id)) for q in (ACTIVE, FROZEN, REMOVED)
            )

        def drained() -> bool:
            # Done when everything acknowledged is at the sink and the spool
            # is empty (but for leftover message files), or when it has
            # stayed so for a while with messages missing (they are lost:
            # nothing is left to deliver).
            if not all(leftover(f) for f in spool_files(spool, "active", "tmp", "messages")):
                del empty_since[:]
                return False
            if acknowledged <= {m.message_id for m in sink.received}:
                return True
            empty_since.append(time.monotonic())
            return empty_since[-1] - empty_since[0] > 3

        try:
            await poll(
                drained, "every acknowledged message at the sink and an empty spool", 90, 0.1
            )
        except AssertionError as e:
            missing = sorted(acknowledged - {m.message_id for m in sink.received})
            self.fail(
                f"{e}; seed={run_seed}; missing={missing[:10]} ({len(missing)}); "
                f"spool={spool_files(spool, 'active', 'tmp', 'messages')[:10]}\n{relay.tail()}"
            )

        # A commit killed within the lock's clock margin before the last
        # start leaves a message file that start's sweep must keep (it
        # could be a commit of the new relay's own); the next start removes
        # it.  Check that it does.
        leftovers = spool_files(spool, "messages")
        if leftovers:
            await poll(
                lambda: time.time() > crasher.last_kill + SpoolLock.CLOCK_MARGIN + 0.5,
                "the clock margin since the last kill", 10, 0.1,
            )  # fmt: skip
            await relay.stop()
            relay.start()
            await relay.wait_listening()
            try:
                await poll(
                    lambda: not spool_files(spool, "active", "tmp", "messages"),
                    "the next start to sweep the leftover message files", 30, 0.1,
                )  # fmt: skip
            except AssertionError as e:
                self.fail(f"{e}; seed={run_seed}; leftovers={leftovers}\n{relay.tail()}")

        copies: dict[str, list[Any]] = {}
        corrupted, unexpected, unexplained = [], [], []
        for m in sink.received:
            sent = messages.get(m.message_id or "")
            if sent is None:
                unexpected.append(m.data[:200])
                continue
            copies.setdefault(m.message_id or "", []).append(m)
            if not (m.data.endswith(sent) and received_prefix_ok(m.data[: -len(sent)])):
                corrupted.append(m.message_id)
        for tag, got in copies.items():
            for first, second in zip(got, got[1:], strict=False):
                # A second delivery is explained only by a kill between the
                # sink's 250 and the relay recording it: the copies must
                # come from different relay processes.
                if second.tag <= first.tag:
                    unexplained.append((tag, first.tag, second.tag))
        duplicates = sum(len(got) - 1 for got in copies.values())
        lost = sorted(acknowledged - set(copies))
        cut = sum(1 for s in status.values() if s == "cut")
        refusals = sorted(s.split()[1] for s in status.values() if s.startswith("refused"))
        refused = len(refusals)
        kinds: dict[str, int] = {}
        for kind in crasher.kills:
            kinds[kind] = kinds.get(kind, 0) + 1
        elapsed = time.monotonic() - started
        summarize(
            f"crash: receivers={receivers} messages={total} kills={len(crasher.kills)} acknowledged={len(acknowledged)} "
            f"cut={cut} refused={refused}{'(' + ','.join(refusals) + ')' if refusals else ''} "
            f"delivered={len(copies)} duplicates={duplicates} "
            f"lost={len(lost)} corrupted={len(corrupted)} unexpected={len(unexpected)} "
            f"swept_at_next_start={len(leftovers)} "
            f"seed={run_seed} sending={sent_done:.1f}s total={elapsed:.1f}s "
            f"kinds={','.join(f'{k}:{n}' for k, n in sorted(kinds.items()))}"
        )
        context = f"seed={run_seed}"
        self.assertEqual(lost, [], context)
        self.assertEqual(corrupted, [], context)
        self.assertEqual(unexpected, [], context)
        self.assertEqual(unexplained, [], context)
        self.assertEqual(len(crasher.kills), wanted, context)
        self.assertEqual(len(status), total, context)
        # A kill cuts at most the message each session has in flight.
        self.assertLessEqual(cut, SESSIONS * len(crasher.kills), context)
        # A kill duplicates at most the deliveries in flight.
        self.assertLessEqual(duplicates, MAX_SEND_JOBS * len(crasher.kills), context)
        self.assertEqual(spool_files(spool, "active", "frozen", "tmp", "messages"), [], context)


async def send_one(port: int, message: bytes) -> tuple[int, str]:
    """
    Send C{message} in a session of its own; the reply that ended the
    transaction (250 when accepted).
    """
    proto = await connect(port)
    try:
        code, text = await proto.reply()
        for line in ("EHLO client.test", f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RECIPIENT}>", "DATA"):
            if code not in (220, 250):
                return code, text
            code, text = await proto.command(line)
        if code != 354:
            return code, text
        proto.write(stuff(message) + b".\r\n")
        code, text = await proto.reply()
        await proto.command("QUIT")
        return code, text
    finally:
        proto.close()


def mount_tmpfs(path: str, size: str) -> Callable[[], None]:
    """
    Mount a tmpfs of C{size} on C{path}; return the function that unmounts
    it.  Skip the test where that is not allowed.
    """
    if os.geteuid() != 0:
        raise SkipTest("mounting a tmpfs needs root")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
            capture_output=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SkipTest(f"cannot mount a tmpfs here: {e}") from None
    if done.returncode != 0:
        raise SkipTest(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")

    def unmount() -> None:
        if subprocess.run(["umount", path], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)

    return unmount


def fill(path: str, leave: int) -> int:
    """
    Write the file C{path} so that C{leave} bytes stay free on its
    filesystem; return its size.
    """
    st = os.statvfs(os.path.dirname(path))
    size = max(0, st.f_bavail * st.f_frsize - leave)
    block = b"\0" * 65536
    written = 0
    with open(path, "wb") as f:
        try:
            while written < size:
                written += f.write(block[: min(len(block), size - written)])
            f.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return written


def is_storage_refusal(code: int, text: str) -> bool:
    return (code == 452 and "4.3.1" in text) or (code == 451 and "4.3.0" in text)


class DiskFullTests(TestCase):
    """
    The relay's spool on a tiny tmpfs that fills up.
    """

    timeout = 120

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        self.mnt = os.path.join(self.base, "mnt")
        os.makedirs(self.mnt)
        self.addCleanup(mount_tmpfs(self.mnt, "1m"))

    def test_disk_full(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.disk_full())

    async def disk_full(self) -> None:
        """
        With the disk full, messages (held in memory or spilled to disk)
        get 452 4.3.1 (or 451 4.3.0), the spool holds only whole entries of
        accepted messages and the relay keeps serving; once space is freed
        it accepts again and delivers everything it accepted.
        """
        run_seed = seed()
        rng = random.Random(run_seed)
        sink = SinkFactory()
        sink.mail_reply = b"451 4.3.2 not yet"
        listener = sink.listen()
        self.addCleanup(listener.stopListening)
        self.addCleanup(sink.close)
        port = free_port()
        relay = RelayProcess(
            self.base, port,
            ["--smarthost", f"127.0.0.1:{listener.getHost().port}", "--relay-tls", "none",
             "--retry-intervals", ",".join(["1"] * 120)],
            spool=os.path.join(self.mnt, "spool"),
        )  # fmt: skip
        self.addCleanup(lambda: Deferred.fromCoroutine(relay.stop()))
        relay.start()
        await relay.wait_listening()
        filler = os.path.join(self.mnt, "filler")
        fill(filler, 200 * 1024)

        accepted: dict[str, bytes] = {}
        refusals: list[tuple[int, str]] = []
        for i in range(40):
            tag = f"full-{run_seed}-{i}"
            message = make_message(rng, tag, rng.randint(20_000, 40_000))
            code, text = await send_one(port, message)
            if code == 250:
                accepted[f"{tag}@client.test"] = message
            else:
                refusals.append((code, text))
                break
        self.assertTrue(refusals, f"the disk never filled up; seed={run_seed}")
        # A message big enough to be spilled to disk while it arrives.
        big = make_message(rng, f"full-{run_seed}-big", 400_000)
        refusals.append(await send_one(port, big))
        for code, text in refusals:
            self.assertTrue(is_storage_refusal(code, text), (code, text, relay.tail()))

        spool = relay.spool
        await poll(lambda: not spool_files(spool, "tmp"), "spool/tmp to empty", 10)
        entries = {name[: -len(".json")] for name in os.listdir(os.path.join(spool, "active"))}
        bodies = {name[: -len(".eml")] for name in os.listdir(os.path.join(spool, "messages"))}
        self.assertEqual(entries, bodies, spool_files(spool, "active", "messages"))
        stored = []
        for entry_id in sorted(entries):
            with open(os.path.join(spool, "active", entry_id + ".json"), "rb") as f:
                json.loads(f.read())
            with open(os.path.join(spool, "messages", entry_id + ".eml"), "rb") as f:
                data = f.read()
            matches = [k for k, m in accepted.items() if data.endswith(m)]
            self.assertEqual(len(matches), 1, entry_id)
            stored.extend(matches)
        self.assertEqual(sorted(stored), sorted(accepted))

        # Still serving while full.
        self.assertTrue(relay.running)
        proto = await connect(port)
        try:
            self.assertEqual((await proto.reply())[0], 220)
            self.assertEqual((await proto.command("NOOP"))[0], 250)
        finally:
            proto.close()

        os.unlink(filler)
        after = []
        for name, size in (("after", 30_000), ("after-big", 400_000)):
            tag = f"full-{run_seed}-{name}"
            message = make_message(rng, tag, size)
            code, text = await send_one(port, message)
            after.append(code)
            self.assertEqual(code, 250, (text, relay.tail()))
            accepted[f"{tag}@client.test"] = message

        sink.mail_reply = b"250 2.1.0 OK"
        await poll(
            lambda: set(accepted) <= {m.message_id for m in sink.received}
            and not spool_files(spool, "active", "tmp", "messages"),
            "the accepted messages at the sink and an empty spool", 60, 0.1,
        )  # fmt: skip
        self.assertEqual(len(sink.received), len(accepted))
        for m in sink.received:
            sent = accepted[m.message_id or ""]
            self.assertTrue(m.data.endswith(sent) and received_prefix_ok(m.data[: -len(sent)]))
        summarize(
            f"disk-full: tmpfs=1M accepted_while_filling={len(accepted) - len(after)} "
            f"refusals={';'.join(f'{c} {t.split()[1] if len(t.split()) > 1 else t}' for c, t in refusals)} "
            f"after_freeing={','.join(map(str, after))} delivered={len(sink.received)} "
            f"half_written=0 seed={run_seed}"
        )
