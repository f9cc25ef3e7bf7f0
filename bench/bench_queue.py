"""
The queue benchmark (issue 12, C{make bench-queue}): relay and Postfix each
holding the backlog an outage leaves behind, deferred, then drained into the
same C{smtp-sink}; writes its section of bench/RESULTS.md.

    .venv/bin/python bench/bench_queue.py                 # 100,000 entries
    .venv/bin/python bench/bench_queue.py --million       # then 1,000,000
    .venv/bin/python bench/bench_queue.py --entries 5000  # a quick look

(Not C{bench/queue.py}: a script's directory comes first on C{sys.path}, and
a C{queue.py} there would stand in for the standard library's C{queue},
which Twisted's thread pool imports, in this script and in C{bench/run.py}.)

For each size N, in one run, with one C{smtp-sink -c} on loopback as every
next hop:

relay.  C{bench/fill_spool.py} fills a fresh spool through the spool's own
writer (L{relay.spool.disk.DiskSpool}: C{enqueue} in batches of 1000, one
group commit each, then C{update} of each entry to one 451 attempt and a
next attempt a day ahead): N entries of one recipient each,
C{user<n>@d<n % 1000>.test}, routed to the sink, each with its own message
of 2 KiB of payload.  C{relayctl --spool DIR count}, C{status} (and
C{summary}, where there is one) are timed straight from the disk, then the
real C{twistd -n relay --spool DIR --smarthost 127.0.0.1:SINK} from this
checkout's venv is started and measured: the time from its start to the
first 220 greeting on its SMTP port, the time until its CPU falls quiet
(its start-up scan done), its RSS then, C{relayctl count}, C{relayctl
status} (time to the first entry line and to the end, the relay's peak RSS
meanwhile), C{relayctl summary}, C{relayctl remove --recipient @d7.test}
(where the relay has them: C{relayctl --help}), then C{relayctl send --all}
and the drain: messages per second from the command until the sink has
counted every active entry, and the relay's peak RSS meanwhile.  Should
C{send --all} move nothing, the relay is stopped, every entry made due
through C{DiskSpool.update} (C{fill_spool.py --due-now}) and the relay
started again, and the drain is timed from that start (the table says
which).

Postfix.  A private instance (L{peers.postfix}) with C{relayhost} the same
sink and C{defer_transports = smtp, relay}, Postfix's own way to hold mail
until someone flushes it: C{smtp-source -d -s 5 -l 2048} injects N/1000
messages for each of the 1000 domains (C{-N} numbers the recipients), four
runs at a time, and qmgr moves every message to the deferred queue (with its
defer log) without any delivery attempt.  Once incoming and active are
empty, Postfix is restarted and measured the same way (C{postqueue -p} as
status, C{qshape deferred} as summary, C{postqueue -j | grep | postsuper -d
-} as the filtered remove), then C{postqueue -f} (which overrides
C{defer_transports}) drains it into the sink.

Every failure of a command, a crash, a timeout or a memory cap hit is a
cell that says so, never the end of the run; every process started here is
stopped, and every directory removed (C{--keep} keeps them), in C{finally}
blocks.  Everything is on 127.0.0.1 and bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import results
import run
from peers import postfix

HERE = run.HERE
ROOT = run.ROOT
BIN = run.BIN
MB = run.MB
log = run.log

DOMAINS = 1000
#: the domain whose entries the filtered remove takes
REMOVED_DOMAIN = "d7.test"
#: what the relay's entry ids look like (L{relay.model.entry.new_id})
RELAY_ENTRY = re.compile(rb"\b[2-7a-z]{16}-\d+\b")
#: a message's first line in C{postqueue -p} (short or long queue ids)
POSTFIX_ENTRY = re.compile(rb"^[0-9A-Za-z]{6,}[*!]?\s+\d+\s")
#: Postfix's files per deferred message (queue file, defer log) and their
#: blocks, for the disk check before anything is filled
POSTFIX_BYTES = 2 * 4096
POSTFIX_INODES = 2
PROBE_ENTRIES = 1000
SECTION = "queue"
PEERS = ("relay", "postfix")


# -- figures ---------------------------------------------------------------------


@dataclass
class Cell:
    """
    One figure of one peer: a value (with a note), or why there is none.
    """

    value: float | None = None
    note: str = ""
    failure: str | None = None


@dataclass
class Figures:
    """
    Everything measured for one backlog size.
    """

    entries: int
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    phases: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def set(self, figure: str, peer: str, value: float | None, note: str = "") -> None:
        self.cells.setdefault(figure, {})[peer] = Cell(value, note)
        # in the log as well: a run killed outright still leaves its figures
        shown = "-" if value is None else f"{value:,.2f}"
        log(f"  {peer}, {figure}: {shown}{(' (' + note + ')') if note else ''}")

    def fail(self, figure: str, peer: str, why: str, detail: str = "") -> None:
        """
        Record that C{figure} could not be measured for C{peer}: a short
        reason in the table, the detail under it.
        """
        self.cells.setdefault(figure, {})[peer] = Cell(None, "", why)
        self.failures.append(f"{peer}, {figure}: {why}{(': ' + detail) if detail else ''}")
        log(f"  FAILED {peer}, {figure}: {why} {detail}")

    def value(self, figure: str, peer: str) -> float | None:
        cell = self.cells.get(figure, {}).get(peer)
        return cell.value if cell else None

    @contextlib.contextmanager
    def phase(self, name: str) -> Any:
        start = time.monotonic()
        log(f"{name} ...")
        try:
            yield
        finally:
            took = time.monotonic() - start
            self.phases.append((name, took))
            log(f"{name}: {took:.1f} s")


#: the rows of the table, in order, with the digits shown
ROWS: list[tuple[str, int]] = [
    ("backlog filled (s)", 0),
    ("backlog on disk (MB)", 0),
    ("count from disk, no server (s)", 2),
    ("status from disk: first entry line (s)", 2),
    ("status from disk: all (s)", 1),
    ("status from disk: client peak RSS (MB)", 0),
    ("summary from disk (s)", 2),
    ("show ID from disk (s)", 2),
    ("SMTP served after start (s)", 2),
    ("start-up done, CPU quiet after (s)", 1),
    ("RSS at rest (MB)", 0),
    ("peak RSS during start-up (MB)", 0),
    ("count (s)", 2),
    ("status: first entry line (s)", 2),
    ("status: all (s)", 1),
    ("RSS while status streams (MB)", 0),
    ("status: client peak RSS (MB)", 0),
    ("summary (s)", 2),
    ("show ID (s)", 2),
    (f"remove @{REMOVED_DOMAIN} (s)", 2),
    ("make all due: command (s)", 1),
    ("drain (msg/s)", 0),
    ("peak RSS while draining (MB)", 0),
]


# -- processes -------------------------------------------------------------------


class CappedMonitor(run.TreeMonitor):
    """
    A L{run.TreeMonitor} that kills the tree if its RSS goes above C{cap}
    bytes (0: no cap), lest a relay that holds every entry in memory take
    the machine down with a million of them.
    """

    def __init__(self, root: int, cap: int, interval: float = 0.05) -> None:
        super().__init__(root, interval=interval)
        self.cap = cap
        self.exceeded = 0

    def start(self) -> CappedMonitor:
        super().start()
        return self

    def sample(self) -> tuple[int, int]:
        ticks, rss = super().sample()
        if self.cap and rss > self.cap and not self.exceeded:
            self.exceeded = rss
            run.kill_tree(self.root, grace=2)
        return ticks, rss


@dataclass
class Outcome:
    """
    How a command went.

    @ivar code: its exit status; C{None} when it was killed (timeout, cap).
    @ivar first: seconds from its start to its first entry line.
    @ivar entries: how many of its output lines were entry lines.
    """

    code: int | None
    total: float
    first: float | None
    lines: int
    entries: int
    out_tail: list[str]
    err_tail: str
    peak_rss: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


class Command:
    """
    A command run with its output read as it comes (when its first entry
    line arrived, how many lines), its memory watched and capped, and a
    time limit.
    """

    def __init__(
        self,
        argv: list[str] | str,
        base: str,
        entry_line: re.Pattern[bytes] | None = None,
        cap: int = 0,
        stdin: IO[bytes] | int | None = subprocess.DEVNULL,
    ) -> None:
        self.argv = argv
        self.entry_line = entry_line
        self.lines = 0
        self.entries = 0
        self.first: float | None = None
        self.tail: deque[str] = deque(maxlen=5)
        fd, self._err_path = tempfile.mkstemp(prefix="cmd-", suffix=".err", dir=base)
        self._err = os.fdopen(fd, "w+b")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            argv, shell=isinstance(argv, str), stdin=stdin, stdout=subprocess.PIPE,
            stderr=self._err, cwd=base, start_new_session=True,
        )  # fmt: skip
        #: when it exited (C{None} while it runs)
        self.ended: float | None = None
        self.monitor = CappedMonitor(self.process.pid, cap).start()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._waiter = threading.Thread(target=self._wait_exit, daemon=True)
        self._waiter.start()

    def _wait_exit(self) -> None:
        self.process.wait()
        self.ended = time.monotonic()

    def _read(self) -> None:
        assert self.process.stdout is not None
        pattern = self.entry_line
        for line in self.process.stdout:
            self.lines += 1
            if pattern is not None and pattern.search(line):
                self.entries += 1
                if self.first is None:
                    self.first = time.monotonic() - self.started
            self.tail.append(line.decode("utf-8", "replace").rstrip())

    def running(self) -> bool:
        return self.ended is None

    def wait(self, timeout: float) -> Outcome:
        """
        Wait until C{timeout} seconds after its start (then kill it), and
        say how it went.
        """
        error = None
        self._waiter.join(max(0.0, timeout - (time.monotonic() - self.started)))
        took = (self.ended or time.monotonic()) - self.started
        if self.ended is None:
            error = f"no end within {timeout:.0f} s"
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self._waiter.join(30)
        code = None if error else self.process.returncode
        self._reader.join(30)
        self.monitor.stop()
        self._err.seek(0)
        err = self._err.read()[-2000:].decode("utf-8", "replace").strip()
        self._err.close()
        os.unlink(self._err_path)
        if self.monitor.exceeded:
            error = f"killed at {self.monitor.exceeded / MB:.0f} MB RSS (the cap)"
        elif error is None and code != 0:
            last = err.splitlines()[-1] if err else ""
            error = f"exit {code}" + (f": {last[:160]}" if last else "")
        return Outcome(
            code, took, self.first, self.lines, self.entries,
            list(self.tail), err, self.monitor.peak_rss, error,
        )  # fmt: skip


def run_command(argv: list[str] | str, base: str, timeout: float, **kw: Any) -> Outcome:
    return Command(argv, base, **kw).wait(timeout)


def serving_after(port: int, started: float, alive: Callable[[], bool], timeout: float) -> float:
    """
    Seconds from C{started} until the server on C{port} sent its 220
    greeting, polled every 10 ms.

    @raise RuntimeError: if it exits or does not greet within C{timeout}.
    """
    deadline = started + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited before it greeted")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(b"220"):
                    at = time.monotonic() - started
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                    return at
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"no 220 greeting within {timeout:.0f} s")




def vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class CountingSink(run.Sink):
    """
    The sink, counting the messages of one drain at a time: L{begin} marks
    the start, and the reader notes when the first message after it came
    and when the goal was reached (without keeping a time for every count,
    which would be a million entries).
    """

    def __init__(self, base: str) -> None:
        self.base_count = 0
        self.goal: int | None = None
        self.first_at: float | None = None
        self.done_at: float | None = None
        super().__init__(base)

    def counted(self, now: float) -> None:
        # Not every count, only the first after begin() and the goal's.
        if self.count > self.base_count and self.first_at is None:
            self.first_at = now
        if self.goal is not None and self.count >= self.goal and self.done_at is None:
            self.done_at = now

    def begin(self, messages: int) -> None:
        with self.changed:
            self.base_count = self.count
            self.goal = self.count + messages
            self.first_at = None
            self.done_at = time.monotonic() if messages <= 0 else None

    def got(self) -> int:
        return self.count - self.base_count


# -- the disk --------------------------------------------------------------------


def disk_use(path: str) -> tuple[int, int]:
    """
    The bytes allocated (blocks) and the inodes used under C{path}.
    """
    blocks = inodes = 0
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(directory, name))
                blocks += st.st_blocks
                inodes += 1
    return blocks * 512, inodes


def free_space(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_favail


def remove_tree(path: str, keep: bool, figures: Figures | None = None) -> None:
    if keep:
        log(f"kept {path}")
        return
    start = time.monotonic()
    shutil.rmtree(path, ignore_errors=True)
    if figures is not None:
        figures.phases.append((f"remove {os.path.basename(path)}", time.monotonic() - start))


# -- relay -----------------------------------------------------------------------


def relayctl(spool: str, *args: str) -> list[str]:
    return [os.path.join(BIN, "relayctl"), "--spool", spool, *args]


@dataclass
class Abilities:
    """
    What today's relayctl can do, from its help.
    """

    summary: bool
    remove_filter: bool
    send_all: bool
    show: bool

    @classmethod
    def detect(cls) -> Abilities:
        def helps(*args: str) -> str:
            try:
                out = subprocess.run(
                    [os.path.join(BIN, "relayctl"), *args, "--help"],
                    capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
            except (OSError, subprocess.TimeoutExpired):
                return ""
            return out.stdout + out.stderr

        top = helps()
        commands = set(re.findall(r"^\s{4}(\S+)", top, re.M))
        return cls(
            summary="summary" in commands,
            remove_filter="--recipient" in helps("remove"),
            send_all="--all" in helps("send"),
            show="show" in commands,
        )


def active_entries(spool: str, quarantine: str) -> int:
    """
    How many entries the active queue holds, by the spool's own count
    (names only).
    """
    from twisted.internet import defer

    from relay.model.entry import ACTIVE
    from relay.spool.disk import DiskSpool

    class WallClock:
        def seconds(self) -> float:
            return time.time()

    clock: Any = WallClock()  # the spool reads only seconds() of it
    spool_ = DiskSpool(spool, defer.maybeDeferred, clock, quarantine_path=quarantine)
    got: list[Any] = []
    spool_.count(ACTIVE).addBoth(got.append)
    if not got or not hasattr(got[0], "entries"):
        raise RuntimeError(f"cannot count the active queue: {got[0] if got else 'no answer'}")
    return int(got[0].entries)


def fill_relay(
    spool: str, quarantine: str, entries: int, hop: str, base: str, timeout: float,
    batch: int = 1000,
) -> dict[str, Any]:  # fmt: skip
    """
    Run C{fill_spool.py}; return its figures.
    """
    command = [
        sys.executable, os.path.join(HERE, "fill_spool.py"), "--spool", spool,
        "--quarantine", quarantine, "--entries", str(entries), "--domains", str(DOMAINS),
        "--next-hop", hop, "--batch", str(batch),
    ]  # fmt: skip
    outcome = run_command(command, base, timeout)
    if not outcome.ok or not outcome.out_tail:
        raise RuntimeError(f"fill_spool.py: {outcome.error}: {outcome.err_tail[-500:]}")
    return dict(json.loads(outcome.out_tail[-1]))


class Relay:
    """
    The real C{twistd -n relay} on the filled spool.
    """

    def __init__(
        self, base: str, spool: str, quarantine: str, sink_port: int, extra: list[str]
    ) -> None:
        self.base = base
        self.spool = spool
        self.port = run.free_port()
        self.log_path = os.path.join(base, "relay.log")
        self.command = [
            os.path.join(BIN, "twistd"), "-n", "--pidfile=", "relay",
            "--smtp", f"tcp:{self.port}:interface=127.0.0.1", "--spool", spool,
            "--quarantine", quarantine, "--smarthost", f"127.0.0.1:{sink_port}", *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                self.command, cwd=self.base, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.alive():
            run.kill_tree(self.process.pid, grace=60)
        with contextlib.suppress(OSError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        self.process = None

    def log_tail(self, lines: int = 3) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return " | ".join(line.strip()[:200] for line in f.readlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Settings:
    """
    One run's choices, from the command line.
    """

    base: str
    keep: bool
    cap: int
    stall: float
    relay_args: list[str]
    drain_timeout: float | None
    command_timeout: float | None
    abilities: Abilities
    make_due: str
    fill_batch: int = 1000

    def timeout(self, entries: int) -> float:
        """
        The limit for one command or start-up on a backlog of C{entries}.
        """
        return self.command_timeout or 120 + entries / 1000

    def drain_limit(self, entries: int) -> float:
        return self.drain_timeout or 300 + entries / 200


def command_figures(
    figures: Figures, peer: str, outcome: Outcome, total: str, first: str | None = None,
    client_rss: str | None = None, expected: int | None = None,
) -> None:  # fmt: skip
    """
    Record a command's times (and its own peak RSS), or its failure.
    """
    if not outcome.ok:
        tail = " ".join(outcome.err_tail.splitlines()[-1:] or outcome.out_tail[-1:])[:300]
        error = outcome.error or "failed"
        figures.fail(total, peer, error, "" if tail in error else tail)
        if first:
            # the same failure: in the table, not twice in the list
            figures.cells.setdefault(first, {})[peer] = Cell(
                outcome.first, "", None if outcome.first is not None else "the command failed"
            )
        return
    listed = f"{outcome.entries} listed" if first else ""
    figures.set(total, peer, outcome.total, listed)
    if first:
        if outcome.first is None:
            figures.fail(first, peer, "no entry line", " | ".join(outcome.out_tail[-2:])[:300])
        else:
            figures.set(first, peer, outcome.first)
        if expected is not None and outcome.entries != expected:
            figures.notes.append(f"{peer}: {total} listed {outcome.entries} entries of {expected}")
    if client_rss:
        figures.set(client_rss, peer, outcome.peak_rss / MB)


def watch_drain(
    sink: CountingSink, started: float, limit: float, stall: float, alive: Callable[[], bool],
    command: Command | None = None,
) -> str | None:  # fmt: skip
    """
    Wait until the sink has every message of the drain begun at
    C{started}; return why it stopped otherwise (a time limit, no progress
    for C{stall} seconds once the command ended, the server gone).
    """
    last_count, last_change = 0, started
    quiet_since: float | None = None  # when the command was first seen ended
    while sink.done_at is None:
        now = time.monotonic()
        got = sink.got()
        if got != last_count:
            last_count, last_change = got, now
        if now - started > limit:
            return f"time limit ({limit:.0f} s)"
        if not alive():
            return "the server exited"
        if command is None or not command.running():
            if quiet_since is None:
                quiet_since = now
            if now - max(last_change, quiet_since) > stall:
                return f"no progress for {stall:.0f} s"
        time.sleep(0.2)
    return None


def drain_figures(
    figures: Figures, peer: str, sink: CountingSink, started: float, target: int,
    stopped: str | None, monitor: CappedMonitor, how: str,
) -> None:  # fmt: skip
    figure = "drain (msg/s)"
    if monitor.exceeded:
        stopped = f"killed at {monitor.exceeded / MB:.0f} MB RSS (the cap)"
    if stopped is None and sink.done_at is not None:
        took = sink.done_at - started
        first = (sink.first_at - started) if sink.first_at else 0.0
        after_first = sink.done_at - sink.first_at if sink.first_at else 0.0
        rate = f"{(target - 1) / after_first:.0f} msg/s" if after_first > 0 else "–"
        figures.set(
            figure, peer, target / took if took > 0 else None,
            f"{target} in {took:.0f} s, first after {first:.1f} s, then {rate}; {how}",
        )  # fmt: skip
    else:
        got = sink.got()
        took = time.monotonic() - started
        figures.fail(
            figure, peer, f"{got} of {target} in {took:.0f} s ({got / took:.0f} msg/s)",
            f"{stopped}; {how}",
        )  # fmt: skip
    figures.set(
        "peak RSS while draining (MB)",
        peer,
        monitor.peak_rss / MB,
        f"PSS {monitor.peak_pss / MB:.0f}",
    )


def relay_phase(figures: Figures, settings: Settings, sink: CountingSink) -> None:
    n = figures.entries
    abilities = settings.abilities
    base = os.path.join(settings.base, f"relay-{n}")
    spool = os.path.join(base, "spool")
    quarantine = os.path.join(base, "quarantine")
    os.makedirs(base)
    relay: Relay | None = None
    watchdog: CappedMonitor | None = None
    limit = settings.timeout(n)
    try:
        with figures.phase(f"relay {n}: fill the spool"):
            start = time.monotonic()
            try:
                filled = fill_relay(
                    spool, quarantine, n, f"127.0.0.1:{sink.port}", base, 600 + n / 20,
                    settings.fill_batch,
                )  # fmt: skip
            except Exception as e:
                figures.fail("backlog filled (s)", "relay", "fill failed", str(e))
                return
            figures.set(
                "backlog filled (s)", "relay", time.monotonic() - start,
                f"enqueue {filled['enqueue_s']:.0f} s + defer {filled['defer_s']:.0f} s",
            )  # fmt: skip
            size, inodes = disk_use(spool)
            figures.set("backlog on disk (MB)", "relay", size / MB, f"{inodes} inodes")

        with figures.phase(f"relay {n}: relayctl from disk"):
            outcome = run_command(relayctl(spool, "count"), base, limit, cap=settings.cap)
            command_figures(figures, "relay", outcome, "count from disk, no server (s)")
            outcome = run_command(
                relayctl(spool, "status"), base, limit, entry_line=RELAY_ENTRY, cap=settings.cap
            )
            command_figures(
                figures, "relay", outcome, "status from disk: all (s)",
                "status from disk: first entry line (s)",
                "status from disk: client peak RSS (MB)", expected=n,
            )  # fmt: skip
            if abilities.summary:
                outcome = run_command(relayctl(spool, "summary"), base, limit, cap=settings.cap)
                command_figures(figures, "relay", outcome, "summary from disk (s)")
            else:
                figures.set("summary from disk (s)", "relay", None, "no relayctl summary")
            show_figure(figures, settings, spool, base, limit, "show ID from disk (s)")

        with figures.phase(f"relay {n}: start"):
            relay = Relay(base, spool, quarantine, sink.port, settings.relay_args)
            relay.start()
            watchdog = CappedMonitor(relay.pid, settings.cap, interval=0.2).start()
            try:
                figures.set(
                    "SMTP served after start (s)", "relay",
                    serving_after(relay.port, relay.started, relay.alive, limit),
                )  # fmt: skip
            except RuntimeError as e:
                figures.fail("SMTP served after start (s)", "relay", str(e), relay.log_tail())
            quiet = run.quiet_after(relay.pid, relay.started, limit)
            if quiet is None:
                why = "relay exited" if not relay.alive() else f"not within {limit:.0f} s"
                figures.fail("start-up done, CPU quiet after (s)", "relay", why, relay.log_tail())
            else:
                figures.set("start-up done, CPU quiet after (s)", "relay", quiet)
            if relay.alive():
                rss, pss = run.TreeMonitor(relay.pid).rss_now()
                figures.set("RSS at rest (MB)", "relay", rss / MB, f"PSS {pss / MB:.0f}")
                figures.set("peak RSS during start-up (MB)", "relay", vm_hwm(relay.pid) / MB)

        with figures.phase(f"relay {n}: relayctl on the running relay"):
            outcome = run_command(relayctl(spool, "count"), base, limit, cap=settings.cap)
            command_figures(figures, "relay", outcome, "count (s)")
            server = CappedMonitor(relay.pid, settings.cap).start()
            outcome = run_command(
                relayctl(spool, "status"), base, limit, entry_line=RELAY_ENTRY, cap=settings.cap
            )
            server.stop()
            command_figures(
                figures, "relay", outcome, "status: all (s)", "status: first entry line (s)",
                "status: client peak RSS (MB)", expected=n,
            )  # fmt: skip
            figures.set("RSS while status streams (MB)", "relay", server.peak_rss / MB)
            if abilities.summary:
                outcome = run_command(relayctl(spool, "summary"), base, limit, cap=settings.cap)
                command_figures(figures, "relay", outcome, "summary (s)")
            else:
                figures.set("summary (s)", "relay", None, "no relayctl summary")
            show_figure(figures, settings, spool, base, limit, "show ID (s)")
            figure = f"remove @{REMOVED_DOMAIN} (s)"
            if abilities.remove_filter:
                before = active_entries(spool, quarantine)
                outcome = run_command(
                    relayctl(spool, "remove", "--recipient", "@" + REMOVED_DOMAIN), base, limit
                )
                command_figures(figures, "relay", outcome, figure)
                removed = before - active_entries(spool, quarantine)
                if outcome.ok:
                    figures.cells[figure]["relay"].note = f"{removed} removed"
            else:
                figures.set(figure, "relay", None, "no remove --recipient")

        with figures.phase(f"relay {n}: drain"):
            if not relay.alive():
                figures.fail("drain (msg/s)", "relay", "relay not running", relay.log_tail())
                return
            drain_relay(figures, settings, sink, relay, spool, quarantine, base)
    finally:
        if watchdog is not None:
            watchdog.stop()
            if watchdog.exceeded:
                figures.failures.append(
                    f"relay: killed at {watchdog.exceeded / MB:.0f} MB RSS (the cap, --max-rss)"
                )
        if relay is not None:
            if relay.process is not None and not relay.alive():
                code = relay.process.returncode
                if code != 0 and not (watchdog and watchdog.exceeded):
                    figures.failures.append(f"relay exited {code}: {relay.log_tail()}")
            relay.stop()
        remove_tree(base, settings.keep, figures)


def some_entry(spool: str) -> str | None:
    """
    The id of one entry of the active queue (the first name the directory
    gives: no listing of the whole queue).
    """
    with os.scandir(os.path.join(spool, "active")) as names:
        for name in names:
            if name.name.endswith(".json"):
                return name.name[: -len(".json")]
    return None


def show_figure(
    figures: Figures, settings: Settings, spool: str, base: str, limit: float, figure: str
) -> None:
    """
    Time C{relayctl show ID} (metadata and headers) of one entry.
    """
    if not settings.abilities.show:
        figures.set(figure, "relay", None, "no relayctl show")
        return
    entry_id = some_entry(spool)
    if entry_id is None:
        figures.fail(figure, "relay", "no entry to show")
        return
    outcome = run_command(relayctl(spool, "show", entry_id), base, limit, cap=settings.cap)
    command_figures(figures, "relay", outcome, figure)
    if outcome.ok and not any("Message-Id" in line or "Subject" in line or "To:" in line
                              for line in outcome.out_tail):  # fmt: skip
        figures.notes.append(f"relay: {figure}: no header in its last lines: {outcome.out_tail}")


def drain_relay(
    figures: Figures, settings: Settings, sink: CountingSink, relay: Relay, spool: str,
    quarantine: str, base: str,
) -> None:  # fmt: skip
    """
    Make every entry due and time the drain: with C{relayctl send --all}
    (C{--make-due send}), or by stopping the relay, making the entries due
    on disk and starting it again (C{--make-due restart}, and the fallback
    when C{send --all} is missing or delivered nothing).
    """
    n = figures.entries
    target = active_entries(spool, quarantine)
    limit = settings.drain_limit(n)
    figure = "make all due: command (s)"
    stopped: str | None = "not tried"
    how = ""
    monitor: CappedMonitor | None = None
    started = time.monotonic()
    if settings.make_due == "send" and settings.abilities.send_all:
        sink.begin(target)
        monitor = CappedMonitor(relay.pid, settings.cap).start()
        started = time.monotonic()
        send = Command(relayctl(spool, "send", "--all"), base, cap=settings.cap)
        stopped = watch_drain(sink, started, limit, settings.stall, relay.alive, send)
        outcome = send.wait(max(1.0, limit - (time.monotonic() - started)))
        if outcome.ok:
            figures.set(figure, "relay", outcome.total, "send --all")
        else:
            detail = outcome.err_tail.splitlines()[-1:] or [""]
            figures.fail(
                figure, "relay", outcome.error or "failed",
                "" if detail[0] in (outcome.error or "") else detail[0][:300],
            )  # fmt: skip
        how = "send --all"
    elif settings.make_due == "send":
        how = "relayctl send has no --all; "
    if stopped is not None and sink.got() == 0 and relay.alive():
        # Nothing moved: make every entry due on disk and restart the relay.
        if monitor is not None:
            monitor.stop()
            log(
                f"  relay: {how}: nothing delivered ({stopped}); restarting it with every entry due"
            )
            how = f"restarted: {how} delivered nothing; "
        relay.stop()
        start = time.monotonic()
        outcome = run_command(
            [sys.executable, os.path.join(HERE, "fill_spool.py"), "--spool", spool,
             "--quarantine", quarantine, "--due-now"], base, settings.timeout(n) + n / 200,
        )  # fmt: skip
        if not outcome.ok:
            figures.fail(
                "drain (msg/s)", "relay", "fill_spool.py --due-now failed", outcome.err_tail[-300:]
            )
            return
        figures.set(
            figure, "relay", time.monotonic() - start,
            "relay stopped, DiskSpool.update of each entry",
        )  # fmt: skip
        sink.begin(target)
        relay.start()
        monitor = CappedMonitor(relay.pid, settings.cap).start()
        started = relay.started
        how += "relay started on the due entries, timed from its start"
        stopped = watch_drain(sink, started, limit, settings.stall, relay.alive)
    if monitor is None:
        figures.fail("drain (msg/s)", "relay", "relay not running", relay.log_tail())
        return
    monitor.stop()
    drain_figures(figures, "relay", sink, started, target, stopped, monitor, how)


# -- Postfix ---------------------------------------------------------------------


def postfix_inject(
    pf: postfix.Postfix, entries: int, base: str, limit: float, lanes: int = 4
) -> list[str]:
    """
    C{smtp-source} runs, one per domain, C{lanes} at a time, that send
    C{entries} messages over the domains; return the errors.
    """
    per, extra = divmod(entries, DOMAINS)
    todo = deque((d, per + (1 if d < extra else 0)) for d in range(DOMAINS))
    todo = deque(item for item in todo if item[1] > 0)
    running: list[tuple[subprocess.Popen[bytes], str]] = []
    errors: list[str] = []
    deadline = time.monotonic() + limit
    out = open(os.path.join(base, "smtp-source.out"), "ab")  # noqa: SIM115
    try:
        while todo or running:
            while todo and len(running) < lanes:
                domain, count = todo.popleft()
                sessions = min(5, count)
                command = [
                    "smtp-source", "-d", "-s", str(sessions), "-m", str(count), "-l", "2048",
                    "-f", "bench@example.com", "-t", f"user@d{domain}.test", "-N",
                    f"127.0.0.1:{pf.port}",
                ]  # fmt: skip
                running.append(
                    (subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL), f"d{domain}.test"),
                )  # fmt: skip
            for item in list(running):
                process, name = item
                code = process.poll()
                if code is not None:
                    running.remove(item)
                    if code != 0:
                        errors.append(f"smtp-source for {name} exited {code}")
            if time.monotonic() > deadline:
                errors.append(f"injection not done within {limit:.0f} s")
                break
            time.sleep(0.01)
    finally:
        for process, _ in running:
            process.kill()
            process.wait(10)
        out.close()
    return errors


def wait_all_deferred(pf: postfix.Postfix, expected: int, limit: float) -> str | None:
    """
    Wait until every injected message is in the deferred queue (incoming,
    active and maildrop empty); return what is wrong otherwise.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        busy = sum(pf.queue_files(q) for q in ("maildrop", "incoming", "active"))
        deferred = pf.queue_files("deferred")
        if busy == 0 and deferred >= expected:
            return None
        time.sleep(1)
    return f"after {limit:.0f} s: {pf.queue_files('deferred')} deferred of {expected}"


def postfix_entry(queue: str) -> str | None:
    """
    The queue id of one deferred message (its file's name, under the hash
    directories).
    """
    for _, _, files in os.walk(os.path.join(queue, "deferred")):
        if files:
            return files[0]
    return None


def postfix_phase(figures: Figures, settings: Settings, sink: CountingSink) -> None:
    n = figures.entries
    base = os.path.join(settings.base, f"postfix-{n}")
    os.makedirs(base)
    os.chmod(base, 0o755)
    limit = settings.timeout(n)
    pf = postfix.Postfix(
        base, run.free_port(), sink.port, 64 * MB, {"defer_transports": "smtp, relay"}
    )
    master: int | None = None
    sink_before = sink.count
    try:
        with figures.phase(f"postfix {n}: fill the deferred queue"):
            start = time.monotonic()
            try:
                master = pf.start()
                run.wait_for_greeting(pf.port, lambda: master is not None and run.alive(master))
            except Exception as e:
                figures.fail("backlog filled (s)", "postfix", "Postfix did not start", str(e))
                return
            errors = postfix_inject(pf, n, base, 600 + n / 50)
            waited = wait_all_deferred(pf, n, 120 + n / 500)
            if waited:
                errors.append(waited)
            deferred = pf.queue_files("deferred")
            if errors:
                figures.fail(
                    "backlog filled (s)",
                    "postfix",
                    f"{deferred} of {n} deferred",
                    "; ".join(errors[:5]),
                )
            else:
                figures.set(
                    "backlog filled (s)", "postfix", time.monotonic() - start,
                    "smtp-source, defer_transports",
                )  # fmt: skip
            size, inodes = disk_use(pf.queue)
            figures.set("backlog on disk (MB)", "postfix", size / MB, f"{inodes} inodes")
            if sink.count != sink_before:
                figures.notes.append(
                    f"postfix: {sink.count - sink_before} messages reached the sink before the flush"
                )
            pf.stop(master)
            master = None

        with figures.phase(f"postfix {n}: start"):
            started = time.monotonic()
            try:
                master = pf.start(prepare=False)
                figures.set(
                    "SMTP served after start (s)", "postfix",
                    serving_after(pf.port, started, lambda: True, limit), "from `postfix start`",
                )  # fmt: skip
            except Exception as e:
                figures.fail("SMTP served after start (s)", "postfix", str(e), pf.log_tail())
                return
            quiet = run.quiet_after(master, started, limit)
            if quiet is None:
                figures.fail(
                    "start-up done, CPU quiet after (s)", "postfix", f"not within {limit:.0f} s"
                )
            else:
                figures.set("start-up done, CPU quiet after (s)", "postfix", quiet)
            rss, pss = run.TreeMonitor(master).rss_now()
            figures.set("RSS at rest (MB)", "postfix", rss / MB, f"PSS {pss / MB:.0f}")

        with figures.phase(f"postfix {n}: queue tools"):
            figures.set("count (s)", "postfix", None, "no count command")
            server = CappedMonitor(master, settings.cap).start()
            outcome = run_command(
                pf.command("postqueue", "-p"),
                base,
                limit,
                entry_line=POSTFIX_ENTRY,
                cap=settings.cap,
            )
            server.stop()
            command_figures(
                figures, "postfix", outcome, "status: all (s)", "status: first entry line (s)",
                "status: client peak RSS (MB)", expected=n,
            )  # fmt: skip
            figures.cells["status: all (s)"]["postfix"].note += ", postqueue -p"
            figures.set("RSS while status streams (MB)", "postfix", server.peak_rss / MB)
            outcome = run_command(pf.command("qshape", "deferred"), base, limit, cap=settings.cap)
            command_figures(figures, "postfix", outcome, "summary (s)")
            if outcome.ok:
                figures.cells["summary (s)"]["postfix"].note = "qshape deferred"
            queue_id = postfix_entry(pf.queue)
            if queue_id is None:
                figures.fail("show ID (s)", "postfix", "no deferred message to show")
            else:
                outcome = run_command(
                    pf.command("postcat", "-e", "-h", "-q", queue_id), base, limit
                )
                command_figures(figures, "postfix", outcome, "show ID (s)")
                if outcome.ok:
                    figures.cells["show ID (s)"]["postfix"].note = "postcat -e -h -q"
            before = pf.queue_files("deferred")
            pipeline = (
                f"{shlex.join(pf.command('postqueue', '-j'))} | grep -F '@{REMOVED_DOMAIN}\"' "
                '| sed -n \'s/.*"queue_id": *"\\([0-9A-Za-z]*\\)".*/\\1/p\' '
                f"| {shlex.join(pf.command('postsuper', '-d', '-'))}"
            )
            outcome = run_command(pipeline, base, limit)
            figure = f"remove @{REMOVED_DOMAIN} (s)"
            command_figures(figures, "postfix", outcome, figure)
            if outcome.ok:
                removed = before - pf.queue_files("deferred")
                figures.cells[figure][
                    "postfix"
                ].note = f"{removed} removed, postqueue -j | postsuper -d -"

        with figures.phase(f"postfix {n}: drain"):
            target = pf.queue_files("deferred")
            sink.begin(target)
            monitor = CappedMonitor(master, settings.cap).start()
            started = time.monotonic()
            flush = Command(pf.command("postqueue", "-f"), base)
            master_pid = master
            stopped = watch_drain(
                sink, started, settings.drain_limit(n), settings.stall,
                lambda: run.alive(master_pid), flush,
            )  # fmt: skip
            outcome = flush.wait(settings.drain_limit(n))
            monitor.stop()
            if outcome.ok:
                figures.set("make all due: command (s)", "postfix", outcome.total, "postqueue -f")
            else:
                figures.fail("make all due: command (s)", "postfix", outcome.error or "failed")
            drain_figures(
                figures, "postfix", sink, started, target, stopped, monitor, "postqueue -f"
            )
    finally:
        try:
            pf.stop(master)
        except Exception as e:
            figures.failures.append(f"postfix stop: {e}")
        if master is not None:
            run.kill_tree(master)
        remove_tree(base, settings.keep, figures)


# -- the report ------------------------------------------------------------------


@dataclass
class Target:
    text: str
    figure: str
    limit: float
    higher_is_better: bool = False


TARGETS = [
    Target("RSS at rest <= 250 MB", "RSS at rest (MB)", 250),
    Target("RSS while status streams <= 250 MB", "RSS while status streams (MB)", 250),
    Target("RSS while draining <= 250 MB", "peak RSS while draining (MB)", 250),
    Target("SMTP served within 2 s of start", "SMTP served after start (s)", 2),
    Target("`count` <= 2 s", "count (s)", 2),
    Target("first status line <= 1 s", "status: first entry line (s)", 1),
    Target("drain rate >= 1.0x Postfix's", "drain relay / postfix", 1.0, higher_is_better=True),
]
TARGET_SIZE = 1_000_000


def ratio(figures: Figures) -> float | None:
    relay, pf = figures.value("drain (msg/s)", "relay"), figures.value("drain (msg/s)", "postfix")
    return relay / pf if relay and pf else None


def cell_text(cell: Cell | None, digits: int) -> str:
    if cell is None:
        return "–"
    if cell.failure is not None:
        return f"**FAILED**: {cell.failure}"
    text = "–" if cell.value is None else f"{cell.value:,.{digits}f}"
    return f"{text} ({cell.note})" if cell.note else text


def size_table(figures: Figures) -> list[str]:
    targets = {t.figure: t for t in TARGETS}
    lines = [
        f"### {figures.entries:,} entries",
        "",
        "| figure | relay | postfix | target (at 1,000,000) |",
        "|---|---|---|---|",
    ]
    for name, digits in ROWS:
        per_peer = figures.cells.get(name, {})
        target = targets.get(name)
        goal = target.text if target else ""
        lines.append(
            f"| {name} | {cell_text(per_peer.get('relay'), digits)} | "
            f"{cell_text(per_peer.get('postfix'), digits)} | {goal} |"
        )
    r = ratio(figures)
    lines.append(
        f"| drain relay / postfix | {'–' if r is None else f'{r:.2f}'} | | "
        f"{targets['drain relay / postfix'].text} |"
    )
    lines += [
        "",
        "Phases: " + "; ".join(f"{name} {took:.0f} s" for name, took in figures.phases) + ".",
    ]
    if figures.notes:
        lines += ["", *(f"- note: {n}" for n in figures.notes)]
    if figures.failures:
        lines += ["", "Failures:", "", *(f"- {f}" for f in figures.failures)]
    return lines


def target_lines(all_figures: list[Figures]) -> list[str]:
    at = next((f for f in all_figures if f.entries == TARGET_SIZE), None)
    largest = max(all_figures, key=lambda f: f.entries)
    source = at or largest
    lines = [f"### Targets (at {TARGET_SIZE:,} entries)", ""]
    if at is None:
        lines += [f"Not run at {TARGET_SIZE:,} entries (`--million`); at {largest.entries:,}:", ""]
    for t in TARGETS:
        where = ""
        if t.figure == "drain relay / postfix":
            value = ratio(source)
            both = [f for f in all_figures if ratio(f) is not None]
            if value is None and both:
                # Postfix not run at this size (--postfix-up-to)
                largest_both = max(both, key=lambda f: f.entries)
                value = ratio(largest_both)
                where = (
                    f" at {largest_both.entries:,} entries, Postfix not run at {source.entries:,}"
                )
        else:
            value = source.value(t.figure, "relay")
        if value is None:
            verdict = "not measured"
        else:
            met = value >= t.limit if t.higher_is_better else value <= t.limit
            verdict = "met" if met else "NOT MET"
        shown = "–" if value is None else f"{value:.2f}"
        lines.append(f"- {verdict}: {t.text} (measured {shown}{where})")
    return lines


def file_system(path: str) -> str:
    """
    The type of the file system C{path} is on, from /proc/mounts.
    """
    path = os.path.realpath(path)
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1]
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, f"{fields[2]} ({fields[0]} on {point})"
    return kind


def info(base: str) -> dict[str, str]:
    import twisted

    fs = file_system(base)
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{total / 1024 / 1024:.0f} GiB",
        "kernel": platform.release(),
        "file system": fs or "unknown",
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "postfix": postfix.version(),
        "relay commit": run.relay_commit(),
    }


def report(args: argparse.Namespace, settings: Settings, facts: dict[str, str],
           all_figures: list[Figures], wall: float) -> str:  # fmt: skip
    a = settings.abilities
    lines = [
        f"## Queue backlog (`make bench-queue`{'' if args.section == SECTION else ', ' + args.section})",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        *(f"- {k}: {v}" for k, v in facts.items()),
        f"- command: `{shlex.join(['.venv/bin/python', 'bench/bench_queue.py', *sys.argv[1:]])}`",
        f"- relay: `{shlex.join(['twistd', '-n', 'relay', '--smtp', 'tcp:PORT:interface=127.0.0.1', '--spool', 'D', '--quarantine', 'Q', '--smarthost', '127.0.0.1:SINK', *settings.relay_args])}`; "
        f"relayctl has: summary {'yes' if a.summary else 'no'}, remove --recipient "
        f"{'yes' if a.remove_filter else 'no'}, send --all {'yes' if a.send_all else 'no'}, "
        f"show {'yes' if a.show else 'no'}",
        "- backlog: one recipient per entry, `user<n>@d<n % 1000>.test`, 2 KiB of payload "
        f"(as `smtp-source -l 2048`); relay: through `DiskSpool.enqueue` ({settings.fill_batch} per group commit) "
        "and `DiskSpool.update` (one 451 attempt, next attempt in a day), by `bench/fill_spool.py`; "
        "Postfix: `smtp-source -d -s 5 -l 2048 -N` per domain into a private instance with "
        "`defer_transports = smtp, relay` (held, deferred without an attempt), relayhost the sink",
        "- next hop: one `smtp-sink -c` on loopback for both; drain = messages per second from "
        "`relayctl send --all` / `postqueue -f` until the sink counted every queued message",
        f"- memory cap per process tree: {settings.cap / MB:.0f} MB (killed above it); "
        f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(a shared machine: compare within a run)",
        f"- wall time: {wall:.0f} s",
        "",
        "Times are wall seconds from the command's start (the server's start for 'SMTP served': "
        "the first 220 greeting; 'CPU quiet': the tree used under 10% of a core for 3 s). "
        "'First entry line' is the first output line that names an entry. RSS is the sum over "
        "the server's process tree (Postfix: master and all its daemons, which counts shared "
        "pages once per process; the PSS sum in the note), 'client' the command's own. "
        "From disk: relayctl with no relay running on the spool. Postfix has no count command.",
        "",
    ]
    for figures in all_figures:
        lines += size_table(figures) + [""]
    lines += target_lines(all_figures)
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------


def check_disk(base: str, sizes: list[int], keep: bool, probe: tuple[int, int]) -> str | None:
    """
    Why the disk under C{base} cannot take the backlogs, or C{None}.
    C{probe}: bytes and inodes of L{PROBE_ENTRIES} relay entries.
    """
    per_bytes = probe[0] / PROBE_ENTRIES + POSTFIX_BYTES
    per_inodes = probe[1] / PROBE_ENTRIES + POSTFIX_INODES
    entries = sum(sizes) if keep else max(sizes)
    need_bytes = int(entries * per_bytes * 1.25) + 1024 * MB
    need_inodes = int(entries * per_inodes * 1.25) + 10_000
    free_bytes, free_inodes = free_space(base)
    log(
        f"disk: {entries:,} entries need ~{need_bytes / 1024**3:.1f} GiB and {need_inodes:,} inodes; "
        f"free {free_bytes / 1024**3:.1f} GiB and {free_inodes:,} inodes"
    )
    if need_bytes > free_bytes or need_inodes > free_inodes:
        return (
            f"not enough disk under {base}: {entries:,} entries need ~{need_bytes / 1024**3:.1f} GiB "
            f"and {need_inodes:,} inodes, free are {free_bytes / 1024**3:.1f} GiB and "
            f"{free_inodes:,} inodes (use --tmpdir elsewhere, or fewer --entries)"
        )
    return None


def default_cap() -> int:
    with open("/proc/meminfo") as f:
        available = next(
            int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
        )
    return int(min(16 * 1024 * MB, available * 0.6))


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, run.stop_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--entries", default="100000", help="backlog sizes, comma-separated (default 100000)"
    )
    parser.add_argument(
        "--million", action="store_true", help="1,000,000 entries too, after the other sizes"
    )
    parser.add_argument("--peers", default="relay,postfix", help="relay, postfix or both")
    parser.add_argument(
        "--postfix-up-to", type=int, default=100_000,
        help="run Postfix only on backlogs of at most this many entries (default 100000)",
    )  # fmt: skip
    parser.add_argument(
        "--fill-batch", type=int, default=1000,
        help="envelopes per DiskSpool.enqueue in the relay's fill (one group commit each; "
        "default 1000)",
    )  # fmt: skip
    parser.add_argument(
        "--relay-args", default="", help="more `twistd relay` options, e.g. '--max-send-jobs 20'"
    )
    parser.add_argument(
        "--max-rss", type=int, help="MB a server or command may use before it is killed "
        "(default: 60%% of the available memory, at most 16 GiB)",
    )  # fmt: skip
    parser.add_argument(
        "--command-timeout", type=float, help="seconds per command (default 120 + entries/1000)"
    )
    parser.add_argument(
        "--drain-timeout", type=float, help="seconds per drain (default 300 + entries/200)"
    )
    parser.add_argument(
        "--stall", type=float, default=120, help="a drain with no progress this long stops"
    )
    parser.add_argument(
        "--make-due", choices=("send", "restart"), default="send",
        help="how the relay's backlog is made due: relayctl send --all (restarting it if that "
        "delivers nothing), or a restart on entries made due on disk",
    )  # fmt: skip
    parser.add_argument("--tmpdir", help="where the spools go (default: the system's temp dir)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the spools, queues and logs (and say where)"
    )
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument(
        "--section", default=SECTION,
        help=f"the section of the output this run writes (default {SECTION}; e.g. queue-1m for "
        "a run of its own at 1,000,000 that keeps the other's figures)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.entries.split(",") if s]
    except ValueError:
        parser.error(f"--entries: not a list of numbers: {args.entries!r}")
    if args.million and TARGET_SIZE not in sizes:
        sizes.append(TARGET_SIZE)
    if not sizes or min(sizes) < 1:
        parser.error("--entries: give at least one positive size")
    peers = run.peers_to_run(parser, args.peers, PEERS)

    began = time.monotonic()
    base = tempfile.mkdtemp(prefix="relay-queue-bench-", dir=args.tmpdir)
    os.chmod(base, 0o755)  # Postfix's daemons must reach their directories
    settings = Settings(
        base=base, keep=args.keep,
        cap=(args.max_rss * MB) if args.max_rss else default_cap(),
        stall=args.stall, relay_args=shlex.split(args.relay_args),
        drain_timeout=args.drain_timeout, command_timeout=args.command_timeout,
        abilities=Abilities.detect(), make_due=args.make_due, fill_batch=args.fill_batch,
    )  # fmt: skip
    log(f"relayctl: {settings.abilities}; memory cap {settings.cap / MB:.0f} MB; in {base}")
    facts = info(base)
    all_figures: list[Figures] = []
    sink: CountingSink | None = None
    try:
        probe_dir = os.path.join(base, "probe")
        start = time.monotonic()
        fill_relay(
            os.path.join(probe_dir, "spool"), os.path.join(probe_dir, "q"), PROBE_ENTRIES,
            "127.0.0.1:9", base, 300,
        )  # fmt: skip
        probe_rate = PROBE_ENTRIES / (time.monotonic() - start)
        probe = disk_use(probe_dir)
        shutil.rmtree(probe_dir, ignore_errors=True)
        if why := check_disk(base, sizes, args.keep, probe):
            log(f"refusing: {why}")
            print(f"bench_queue: {why}", file=sys.stderr)
            return 1
        for n in sizes:
            log(
                f"{n:,} entries: filling the relay's spool takes ~{n / probe_rate / 60:.0f} min at the probe's rate"
            )
        sink = CountingSink(base)
        for n in sizes:
            figures = Figures(n)
            all_figures.append(figures)
            try:
                if "relay" in peers:
                    relay_phase(figures, settings, sink)
                if "postfix" in peers and n <= args.postfix_up_to:
                    postfix_phase(figures, settings, sink)
            except (SystemExit, KeyboardInterrupt) as e:
                # Stopped (SIGTERM, ^C) in the middle of a size: what it had
                # measured goes in the report all the same.
                done = ", ".join(name for name, _ in figures.phases) or "nothing"
                figures.notes.append(
                    f"interrupted ({e or type(e).__name__}; phases begun: {done}): the cells are "
                    "what it had measured by then"
                )
                text = report(args, settings, facts, all_figures, time.monotonic() - began)
                results.write_section(
                    args.output, args.section, text, "bench/bench_queue.py",
                    "relay benchmark results",
                )  # fmt: skip
                raise
            if "postfix" in peers and n > args.postfix_up_to:
                figures.notes.append(
                    f"postfix: not run at {n:,} (--postfix-up-to {args.postfix_up_to:,}: its fill "
                    "through smtp-source takes ~40 min at 1,000,000); the ratio is from the "
                    "largest size both ran"
                )
            # after each size, so that an interrupted million keeps the rest
            text = report(args, settings, facts, all_figures, time.monotonic() - began)
            results.write_section(
                args.output, args.section, text, "bench/bench_queue.py", "relay benchmark results"
            )
    finally:
        if sink is not None:
            sink.stop()
        remove_tree(base, args.keep)
    text = report(args, settings, facts, all_figures, time.monotonic() - began)
    if all_figures:
        results.write_section(
            args.output, args.section, text, "bench/bench_queue.py", "relay benchmark results"
        )
    print(text, flush=True)
    log(f"wrote the {args.section} section of {args.output} in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
