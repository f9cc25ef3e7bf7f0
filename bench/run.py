"""
Benchmark relay against Postfix, Haraka, python-slimta, aiosmtpd and
twisted.mail with Postfix's own load tools; writes bench/RESULTS.md and
bench/ratios.png.

    .venv/bin/python bench/run.py            # the full run (make bench)
    .venv/bin/python bench/run.py --quick    # fewer messages, 1 round (about a minute and a half)

Load: C{smtp-source} is the client, C{smtp-sink} the next hop.  W1 sends
3000 messages of 2 KiB over 20 concurrent sessions, one connection per
message (C{smtp-source -c -m 3000 -s 20 -l 2048}); W2 is the same with
C{-d} (connections kept open).  W3 is fan-out: 20 KiB messages to 50
recipients over 10 domains (L{fanout}'s sender, and its sink that counts
recipients); W4 is 1 MiB messages over 4 sessions.  The peers run
interleaved, each started afresh for every measurement, in every round:
relay (C{twistd relay}, Simple, C{--smarthost} the sink, no other flag), a
private Postfix relaying to the sink, Haraka 3 with its outbound queue and
python-slimta 5 with its DiskStorage queue (both installed into a cache
directory when missing, L{peers.haraka}, L{peers.slimta_venv}; skipped with the
reason when their registry cannot be reached), and two accept-only servers
that write and fsync each message before replying (aiosmtpd,
twisted.mail).  Separately: the peak memory while one 50 MB message goes
through, the memory with 1000 idle sessions open, and W1 while those
sessions stay open, and W1 with every message DKIM-signed by relay
(C{--dkim-keys} with one RSA 2048 key for smtp-source's From: domain) as
a ratio of relay's unsigned W1 of the same round.  Everything listens on 127.0.0.1 only and every process
started here is stopped in a C{finally} block.

Server figures cover the whole process tree of the server (the Postfix
master and all its children; twistd and any receiver processes): CPU
seconds from /proc (own plus reaped children's times, so short-lived
children count), per 1000 messages; peak memory as the largest sum of the
tree's RSS seen by polling every 50 ms and of its PSS polled every 0.5 s
(the RSS sum counts shared pages once per process, which overstates
Postfix's many processes).  Each measurement's directory is removed after
the server stopped, outside the timed window.  Ratios relay/peer are taken
per round, then summarised.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)

import results  # noqa: E402
from peers import haraka, postfix, slimta_venv  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024
SENDER = "bench@example.com"
RECIPIENT = "sink@example.net"
PEERS = ("relay", "postfix", "haraka", "slimta", "aiosmtpd", "twisted.mail")
FORWARDING = ("relay", "postfix", "haraka", "slimta")
#: Where Haraka (npm) and python-slimta (its own venv) are installed.
CACHE = os.path.join(tempfile.gettempdir(), "relay-bench-cache")
IDLE_PEERS = ("relay", "aiosmtpd", "twisted.mail")
#: The section of RESULTS.md that bench/chunking.py writes: kept as it is
#: when this script rewrites the file.
CHUNKING_BEGIN, CHUNKING_END = "<!-- chunking -->", "<!-- /chunking -->"
BIG_PEERS = ("relay", "postfix", "aiosmtpd", "twisted.mail")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the server's process tree -------------------------------------------------


def _all_stats() -> dict[int, tuple[int, int, int]]:
    """
    Every process's (parent, CPU ticks incl. reaped children, RSS pages).
    """
    stats = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        stats[int(name)] = (int(fields[1]), ticks, int(fields[21]))
    return stats


def tree(root: int) -> dict[int, tuple[int, int]]:
    """
    The process tree under C{root}: pid to (CPU ticks, RSS pages).
    """
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {}, [root] if root in stats else []
    while todo:
        pid = todo.pop()
        found[pid] = stats[pid][1:]
        todo.extend(children.get(pid, ()))
    return found


def tree_pids(root: int) -> list[int]:
    return list(tree(root))


def quiet_after(
    root: int, started: float, timeout: float, window: float = 3.0, busy: float = 0.1
) -> float | None:
    """
    Seconds from C{started} until the tree under C{root} used less than
    C{busy} of a core over C{window} seconds (its start-up work done), or
    C{None} if that did not happen within C{timeout}.
    """
    samples: deque[tuple[float, int]] = deque()
    deadline = started + timeout
    while time.monotonic() < deadline:
        procs = tree(root)
        if not procs:
            return None
        now = time.monotonic()
        samples.append((now, sum(ticks for ticks, _ in procs.values())))
        while len(samples) > 2 and now - samples[1][0] >= window:
            samples.popleft()
        t0, ticks0 = samples[0]
        if now - t0 >= window and (samples[-1][1] - ticks0) / CLOCK_TICKS < busy * (now - t0):
            return t0 - started
        time.sleep(min(0.25, window / 5))
    return None


class TreeMonitor:
    """
    CPU seconds, peak RSS and peak PSS of a process tree between L{start}
    and L{stop}.

    CPU time of a process that exits moves into its parent's reaped-children
    times, so the sum over the live tree of own plus children's times only
    grows, and the difference between two snapshots is the tree's CPU use.

    RSS (from /proc/PID/stat, cheap) is polled every C{interval} seconds; its
    sum counts pages shared between the tree's processes once per process.
    PSS (from /proc/PID/smaps_rollup, dearer) shares them out and is polled
    every C{pss_every} polls.
    """

    def __init__(self, root: int, interval: float = 0.05, pss_every: int = 10) -> None:
        self.root = root
        self.interval = interval
        self.pss_every = pss_every
        self.peak_rss = 0
        self.peak_single = 0
        self.peak_pss = 0
        self._pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._start_ticks = 0
        self.cpu = 0.0

    def sample(self) -> tuple[int, int]:
        procs = tree(self.root)
        self._pids = list(procs)
        rss = sum(pages for _, pages in procs.values()) * PAGE_SIZE
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_single = max(
            [self.peak_single, *(pages * PAGE_SIZE for _, pages in procs.values())]
        )
        return sum(ticks for ticks, _ in procs.values()), rss

    def sample_pss(self) -> int:
        total = 0
        for pid in self._pids:
            try:
                with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                    for line in f:
                        if line.startswith(b"Pss:"):
                            total += int(line.split()[1]) * 1024
                            break
            except (OSError, ValueError, IndexError):
                continue
        self.peak_pss = max(self.peak_pss, total)
        return total

    def rss_now(self) -> tuple[int, int]:
        rss = self.sample()[1]
        return rss, self.sample_pss()

    def _poll(self) -> None:
        polls = 0
        while not self._stop.wait(self.interval):
            self.sample()
            polls += 1
            if polls % self.pss_every == 0:
                self.sample_pss()

    def start(self) -> TreeMonitor:
        self._start_ticks = self.sample()[0]
        self.sample_pss()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.cpu = (self.sample()[0] - self._start_ticks) / CLOCK_TICKS
        self.sample_pss()


def alive(pid: int) -> bool:
    """
    Whether C{pid} runs (a zombie waiting to be reaped does not).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def kill_tree(root: int, grace: float = 10) -> None:
    """
    SIGTERM the tree under C{root}, then SIGKILL whatever is left after
    C{grace} seconds.
    """
    pids = tree_pids(root)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in tree_pids(root) + pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def wait_for_greeting(port: int, alive: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server on port {port} exited before it listened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"no 220 greeting on port {port} within {timeout} s ({last})")


# -- load and next hop -----------------------------------------------------------


class Sink:
    """
    C{smtp-sink -c} on a loopback port (or, with C{recipients}, the
    fan-out sink of L{fanout}, which counts recipients); a thread reads its
    running C{mesg=N} (C{rcpt=N}) counter and records when each count was
    reached.
    """

    def __init__(self, base: str, recipients: bool = False) -> None:
        self.port = free_port()
        self.pattern = rb"rcpt=(\d+)" if recipients else rb"mesg=(\d+)"
        if recipients:
            command = [
                sys.executable,
                os.path.join(HERE, "fanout.py"),
                "sink",
                "--port",
                str(self.port),
            ]
        else:
            command = ["smtp-sink", "-c"]
            if os.geteuid() == 0:
                command += ["-u", "postfix"]
            command += [f"127.0.0.1:{self.port}", "1024"]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE, stderr=open(os.path.join(base, "sink.err"), "wb"),  # noqa: SIM115
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.count = 0
        self.changed = threading.Condition()
        self.reached: dict[int, float] = {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            wait_for_greeting(self.port, lambda: self.process.poll() is None, 30)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.process.stdout is not None
        tail = b""
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            now = time.monotonic()
            tail = (tail + chunk)[-256:]
            counts = re.findall(self.pattern, tail)
            if counts:
                with self.changed:
                    self.count = int(counts[-1])
                    self.counted(now)
                    self.changed.notify_all()

    def counted(self, now: float) -> None:
        """
        The sink's count changed (at the monotonic time C{now}); called
        holding C{changed}.
        """
        self.reached.setdefault(self.count, now)

    def wait_for(self, count: int, timeout: float) -> float | None:
        """
        The monotonic time at which the sink had C{count} messages, or
        C{None} if it did not get them within C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.count < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(min(left, 1))
            return min(t for n, t in self.reached.items() if n >= count)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.reader.join(5)


@dataclass
class Load:
    """
    One workload: C{smtp-source}, or with C{recipients} the fan-out
    sender of L{fanout} (that many recipients over C{domains} domains).
    """

    messages: int
    sessions: int
    size: int
    keep_open: bool = False
    recipients: int = 0
    domains: int = 0

    @property
    def delivered(self) -> int:
        "What the sink counts once all is delivered (messages or recipients)."
        return self.messages * self.recipients if self.recipients else self.messages

    def command(self, port: int) -> list[str]:
        if self.recipients:
            return [
                sys.executable, os.path.join(HERE, "fanout.py"), "send", "--port", str(port),
                "--messages", str(self.messages), "--sessions", str(self.sessions),
                "--size", str(self.size), "--recipients", str(self.recipients),
                "--domains", str(self.domains),
            ]  # fmt: skip
        flags = ["-c", "-d"] if self.keep_open else ["-c"]
        return [
            "smtp-source", *flags, "-m", str(self.messages), "-s", str(self.sessions), "-l", str(self.size),
            "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}",
        ]  # fmt: skip


def run_source(load: Load, port: int, base: str, timeout: float) -> tuple[float, float]:
    """
    Run C{smtp-source}; return its (start, end) monotonic times.
    """
    out_path = os.path.join(
        base, f"source-{load.messages}-{int(load.keep_open)}-{load.recipients}.out"
    )
    with open(out_path, "wb") as out:
        start = time.monotonic()
        process = subprocess.Popen(
            load.command(port), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"smtp-source did not finish within {timeout:.0f} s") from None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        end = time.monotonic()
    if code != 0:
        with open(out_path, "rb") as f:
            tail = (
                f.read()[-300:].replace(b"\r", b"\n").decode(errors="replace").strip().splitlines()
            )
        raise RuntimeError(f"{load.command(port)[0]} exited {code}: {' | '.join(tail[-3:])}")
    return start, end


class IdleSessions:
    """
    C{count} SMTP sessions that said EHLO and then stay silent.
    """

    def __init__(self, port: int, count: int, timeout: float = 120) -> None:
        self.sockets: list[socket.socket] = []
        deadline = time.monotonic() + timeout
        try:
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                self.sockets.append(s)
                self._expect(s, b"220")
                s.sendall(b"EHLO idle.bench.invalid\r\n")
                self._expect(s, b"250")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"opening {count} idle sessions took over {timeout} s")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _expect(s: socket.socket, code: bytes) -> None:
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError(f"idle session closed by the server: {data!r}")
            data += chunk
            last = data.rstrip(b"\r\n").split(b"\r\n")[-1]
            if data.endswith(b"\n") and last[3:4] == b" ":
                if not last.startswith(code):
                    raise RuntimeError(f"idle session got {last!r}")
                return

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()
        self.sockets = []


# -- the peers -------------------------------------------------------------------


def relay_has(option: str) -> bool:
    """
    Does this relay's C{twistd relay --help} list C{option}?
    """
    try:
        out = subprocess.run(
            [os.path.join(BIN, "twistd"), "relay", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in out.stdout


def relay_has_receivers() -> bool:
    return relay_has("--receivers")


#: The domain of smtp-source's From: (C{-f SENDER}), which the DKIM run signs.
DKIM_DOMAIN = SENDER.rpartition("@")[2]


def make_dkim_keys(base: str) -> str:
    """
    A keys file for C{--dkim-keys} in C{base}: one new RSA 2048 key for
    L{DKIM_DOMAIN}.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_path = os.path.join(base, "dkim-rsa.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    path = os.path.join(base, "dkim.keys")
    with open(path, "w") as f:
        f.write(f"{DKIM_DOMAIN} bench {key_path} rsa\n")
    return path


@dataclass
class Options:
    receivers: int | None
    max_message_size: int | None = None
    max_sessions: int | None = None
    dkim_keys: str | None = None


class Server:
    """
    One peer started for one measurement.
    """

    def __init__(self, name: str, base: str, sink_port: int | None, options: Options) -> None:
        self.name = name
        self.base = base
        self.port = free_port()
        self.root: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.postfix: postfix.Postfix | None = None
        os.makedirs(base, exist_ok=True)
        try:
            self._start(name, sink_port, options)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, sink_port: int | None, options: Options) -> None:
        base = self.base
        if name == "postfix":
            assert sink_port is not None
            self.postfix = postfix.Postfix(base, self.port, sink_port, 64 * MB)
            self.root = self.postfix.start()
            wait_for_greeting(self.port, lambda: self.root is not None and alive(self.root))
            return
        if name == "relay":
            command = [
                os.path.join(BIN, "twistd"), "-n", "--pidfile=", "relay",
                "--smtp", f"tcp:{self.port}:interface=127.0.0.1",
                "--spool", os.path.join(base, "sp"), "--quarantine", os.path.join(base, "q"),
                "--control", f"unix:{os.path.join(base, 'ctl.sock')}", "--smarthost", f"127.0.0.1:{sink_port}",
            ]  # fmt: skip
            if options.receivers is not None:
                command += ["--receivers", str(options.receivers)]
            if options.max_message_size:
                command += ["--max-message-size", str(options.max_message_size)]
            if options.max_sessions:
                command += ["--max-sessions", str(options.max_sessions)]
            if options.dkim_keys:
                command += ["--dkim-keys", options.dkim_keys]
        elif name == "haraka":
            assert sink_port is not None
            command = haraka.configure(
                os.path.join(CACHE, "haraka"), base, self.port, sink_port,
                options.max_message_size or 64 * MB,
            )  # fmt: skip
        elif name == "slimta":
            assert sink_port is not None
            command = slimta_venv.command(
                os.path.join(CACHE, "slimta"), base, self.port, sink_port,
                options.max_message_size or 64 * MB,
            )  # fmt: skip
        else:
            script = {"aiosmtpd": "aiosmtpd_fsync.py", "twisted.mail": "twisted_mail_fsync.py"}[
                name
            ]
            os.makedirs(os.path.join(base, "messages"))
            command = [
                sys.executable, os.path.join(HERE, "peers", script),
                "--port", str(self.port), "--dir", os.path.join(base, "messages"),
            ]  # fmt: skip
        with open(os.path.join(base, "server.log"), "wb") as out:
            self.process = subprocess.Popen(
                command, cwd=base, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.root = self.process.pid
        wait_for_greeting(
            self.port, lambda: self.process is not None and self.process.poll() is None
        )

    def settle(self, timeout: float = 20.0) -> None:
        """
        Wait until the server has done its start-up work (its tree under a
        tenth of a core for half a second), so that a load measures the
        running server: relay's second receiver may still be importing
        when the first one greets, and W1 lasts some six seconds.
        """
        if self.root is not None:
            quiet_after(self.root, time.monotonic(), timeout, window=0.5)

    def check_stored(self, count: int, min_size: int = 0) -> None:
        """
        For the accept-only peers: fail unless C{count} messages of at least
        C{min_size} bytes were written (smtp-source can succeed while the
        server drops messages).
        """
        directory = os.path.join(self.base, "messages")
        if not os.path.isdir(directory):
            return
        sizes = [entry.stat().st_size for entry in os.scandir(directory)]
        stored = sum(1 for size in sizes if size >= min_size)
        if stored < count:
            raise RuntimeError(
                f"{self.name} stored {stored} of {count} messages: {self.log_tail()}"
            )

    def log_tail(self) -> str:
        if self.postfix:
            return self.postfix.log_tail()
        try:
            with open(os.path.join(self.base, "server.log"), errors="replace") as f:
                return " | ".join(f.read().splitlines()[-5:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.postfix is not None:
            self.postfix.stop(self.root)
        if self.root is not None:
            kill_tree(self.root)
        if self.process is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)


def dirty_kib() -> int:
    """
    The kernel's dirty and under-writeback page cache, KiB (/proc/meminfo).
    """
    total = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Dirty", "Writeback"):
                total += int(rest.split()[0])
    return total


def settle_disk(limit_kib: int = 1024, timeout: float = 20.0) -> None:
    """
    Write out what the previous measurement left for the disk (the files
    it wrote, the thousands its removal unlinked) before the next server
    starts: with one filesystem for all, a server that makes its commits
    durable with C{syncfs} (relay) would otherwise write the previous
    peer's dirty data too.  It is not all that the fsync-per-file peers
    leave behind: in the recorded run relay's W1 was still 675 msg/s
    first in its round and 513-527 right after them.
    """
    os.sync()
    deadline = time.monotonic() + timeout
    while dirty_kib() > limit_kib and time.monotonic() < deadline:
        time.sleep(0.1)


@contextlib.contextmanager
def running(
    name: str, base: str, options: Options, forwarding: bool, recipients: bool = False
) -> Iterator[tuple[Server, Sink | None]]:
    settle_disk()
    os.makedirs(base, exist_ok=True)
    sink = Sink(base, recipients) if forwarding else None
    server = None
    try:
        server = Server(name, base, sink.port if sink else None, options)
        server.settle()
        yield server, sink
    finally:
        try:
            if server is not None:
                server.stop()
        finally:
            try:
                if sink is not None:
                    sink.stop()
            finally:
                # Outside the timed window; thousands of stored messages
                # would otherwise pile up until the end of the run.
                shutil.rmtree(base, ignore_errors=True)


# -- measurements ----------------------------------------------------------------


@dataclass
class Figures:
    """
    Every figure, per peer, one value per round (None: that round failed).
    """

    values: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: peers not measured, and why (e.g. their registry was unreachable)
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, figure: str, peer: str, value: float | None) -> None:
        self.values.setdefault(figure, {}).setdefault(peer, []).append(value)


def timeout_for(load: Load) -> float:
    """
    Generous: 20 messages (or 1000 recipients, or 2 MB) a second at least.
    """
    return (
        60
        + load.messages / 20
        + load.delivered / 1000 * (load.recipients > 0)
        + (load.messages * load.size / MB / 2)
    )


def rate_unit(load: Load) -> str:
    """
    What a load's rates count: recipients (fan-out), MB (large messages)
    or messages.
    """
    if load.recipients:
        return "rcpt/s"
    if load.size >= MB:
        return "MB/s"
    return "msg/s"


def measure_load(
    figures: Figures, prefix: str, peer: str, base: str, load: Load, options: Options, idle: int = 0
) -> None:
    forwarding = peer in FORWARDING
    unit = rate_unit(load)
    # Rates in the load's unit: recipients, MB (of message data) or messages.
    per_rate = {"rcpt/s": load.delivered, "MB/s": load.messages * load.size / MB}.get(
        unit, load.messages
    )
    names = [
        f"{prefix} accept {unit}",
        f"{prefix} e2e {unit}",
        f"{prefix} CPU s/1000 msg",
        f"{prefix} peak RSS MB",
        f"{prefix} peak PSS MB",
    ]
    if unit == "MB/s":
        names.append(f"{prefix} RSS growth MB")
    if idle:
        names += ["idle sessions RSS MB", "idle sessions PSS MB"]
    results: dict[str, float | None] = dict.fromkeys(names)
    try:
        with running(peer, base, options, forwarding, recipients=bool(load.recipients)) as (
            server,
            sink,
        ):
            assert server.root is not None
            sessions = None
            try:
                if idle:
                    sessions = IdleSessions(server.port, idle)
                    time.sleep(1)
                    rss, pss = TreeMonitor(server.root).rss_now()
                    results[names[-2]], results[names[-1]] = rss / MB, pss / MB
                monitor = TreeMonitor(server.root).start()
                before = monitor.peak_rss
                try:
                    start, end = run_source(load, server.port, base, timeout_for(load))
                    results[names[0]] = per_rate / (end - start)
                    server.check_stored(load.messages)
                    if sink is not None:
                        done = sink.wait_for(load.delivered, timeout_for(load))
                        if done is None:
                            raise RuntimeError(
                                f"the sink got {sink.count} of {load.delivered} "
                                f"within {timeout_for(load):.0f} s: {server.log_tail()}"
                            )
                        results[names[1]] = per_rate / (done - start)
                finally:
                    monitor.stop()
                results[names[2]] = monitor.cpu / load.messages * 1000
                results[names[3]] = monitor.peak_rss / MB
                results[names[4]] = monitor.peak_pss / MB
                if unit == "MB/s":
                    results[names[5]] = (monitor.peak_rss - before) / MB
            finally:
                if sessions is not None:
                    sessions.close()
    except Exception as e:
        figures.errors.append(f"{prefix} {peer}: {e}")
        log(f"  FAILED {prefix} {peer}: {e}")
    for name in names:
        if " e2e " in name and not forwarding:
            continue
        figures.add(name, peer, results[name])
    shown = ", ".join(f"{n}={v:.1f}" for n, v in results.items() if v is not None)
    log(f"  {prefix} {peer}: {shown}")


def receiving_peak(root: int) -> float | None:
    """
    The peak RSS (VmHWM, MB) of relay's receiving process under C{root}:
    the largest of its C{relay.app.receiver} processes, or C{root} itself when
    it has none (a single-process relay).
    """
    peaks: dict[int, float] = {}
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        if pid == root or b"relay.app.receiver" in cmdline:
            for line in status.splitlines():
                if line.startswith(b"VmHWM:"):
                    peaks[pid] = int(line.split()[1]) * 1024 / MB
    receivers = [v for pid, v in peaks.items() if pid != root]
    if receivers:
        return max(receivers)
    return peaks.get(root)


def measure_big(figures: Figures, peer: str, base: str, size: int, options: Options) -> None:
    forwarding = peer in FORWARDING
    peak = single = pss = receiving = None
    try:
        with running(peer, base, options, forwarding) as (server, sink):
            assert server.root is not None
            monitor = TreeMonitor(server.root).start()
            try:
                run_source(Load(1, 1, size), server.port, base, 300)
                server.check_stored(1, size)
                if sink is not None and sink.wait_for(1, 300) is None:
                    raise RuntimeError(
                        f"the {size // MB} MB message did not reach the sink: {server.log_tail()}"
                    )
            finally:
                monitor.stop()
            peak, single = monitor.peak_rss / MB, monitor.peak_single / MB
            pss = monitor.peak_pss / MB
            if peer == "relay":
                receiving = receiving_peak(server.root)
    except Exception as e:
        figures.errors.append(f"big message {peer}: {e}")
        log(f"  FAILED big message {peer}: {e}")
    figures.add("big msg peak RSS MB", peer, peak)
    figures.add("big msg largest process MB", peer, single)
    figures.add("big msg peak PSS MB", peer, pss)
    if peer == "relay":
        figures.add("big msg receiving process VmHWM MB", peer, receiving)
    if peak is not None:
        log(f"  big message {peer}: peak RSS {peak:.1f} MB (largest process {single:.1f} MB)")


def disk_figures(base: str, files: int, size: int, batch: int) -> dict[str, float]:
    """
    Small files per second with an fsync per file, and with one syncfs per
    batch of C{batch} files, in C{base}.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    data = os.urandom(size)
    directory = tempfile.mkdtemp(prefix="disk-", dir=base)
    try:
        start = time.monotonic()
        for i in range(files):
            fd = os.open(
                os.path.join(directory, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
            )
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
        per_file = files / (time.monotonic() - start)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            start = time.monotonic()
            for i in range(files):
                fd = os.open(
                    os.path.join(directory, f"g{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
                )
                os.write(fd, data)
                os.close(fd)
                if (i + 1) % batch == 0 or i + 1 == files:
                    if libc.syncfs(dir_fd) != 0:
                        raise OSError(ctypes.get_errno(), "syncfs")
            batched = files / (time.monotonic() - start)
        finally:
            os.close(dir_fd)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"fsync per file": per_file, f"syncfs per {batch} files": batched}


# -- report ----------------------------------------------------------------------


def median_range(values: list[float | None]) -> tuple[float, float, float] | None:
    good = [v for v in values if v is not None]
    if not good:
        return None
    return statistics.median(good), min(good), max(good)


def fmt(stats: tuple[float, float, float] | None, digits: int = 0) -> str:
    if stats is None:
        return "failed"
    m, lo, hi = stats
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def paired_ratios(figures: Figures, figure: str, peer: str) -> list[float | None]:
    """
    relay/peer per round, both measured in the same round.
    """
    per_peer = figures.values.get(figure, {})
    relay, other = per_peer.get("relay", []), per_peer.get(peer, [])
    return [r / o if r is not None and o else None for r, o in zip(relay, other, strict=False)]


@dataclass
class Target:
    text: str
    value: float | None
    limit: float
    higher_is_better: bool = True
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


def targets(figures: Figures, w1: str) -> list[Target]:
    """
    Issue 16's targets (and the memory ones before them), each a median of
    per-round ratios.
    """

    def med(values: list[float | None]) -> float | None:
        stats = median_range(values)
        return stats[0] if stats else None

    def relay_med(figure: str) -> float | None:
        return med(figures.values.get(figure, {}).get("relay", []))

    def ratio(figure: str, peer: str) -> float | None:
        return med(paired_ratios(figures, figure, peer))

    def show(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    def show_ratio(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}x"

    def relay_ratio(figure: str, base: str) -> float | None:
        """
        The median of relay's C{figure} / C{base}, per round.
        """
        top = figures.values.get(figure, {}).get("relay", [])
        bottom = figures.values.get(base, {}).get("relay", [])
        return med([a / b if a and b else None for a, b in zip(top, bottom, strict=False)])

    accept = f"{w1} accept msg/s"
    idle_ratio = relay_ratio(f"{w1} + idle accept msg/s", accept)
    dkim_e2e = relay_ratio(f"{w1} DKIM e2e msg/s", f"{w1} e2e msg/s")
    dkim_cpu = relay_ratio(f"{w1} DKIM CPU s", f"{w1} CPU s")
    found = [
        Target(f"{w} {kind} >= 1.2x Postfix", ratio(f"{w} {kind} msg/s", "postfix"), 1.2)
        for w in ("W1", "W2")
        for kind in ("accept", "e2e")
    ]
    found += [
        Target(
            "W3 fan-out: recipients delivered/s >= 1.2x Postfix",
            ratio("W3 e2e rcpt/s", "postfix"),
            1.2,
        ),
        Target(
            "W4 1 MiB messages: MB/s end to end >= 1.0x Postfix",
            ratio("W4 e2e MB/s", "postfix"),
            1.0,
        ),
        Target(
            "W4: relay RSS flat (growth during the load <= 32 MB)",
            relay_med("W4 RSS growth MB"),
            32,
            higher_is_better=False,
            detail=f"peak {show(relay_med('W4 peak RSS MB'))} MB",
        ),
    ]
    found += [
        Target(f"W1 {kind} >= 2x {peer}", ratio(f"W1 {kind} msg/s", peer), 2.0)
        for peer in ("haraka", "slimta")
        for kind in ("accept", "e2e")
    ]
    found += [
        Target(
            "W1 CPU s per 1000 messages <= 0.8x Postfix's process tree",
            ratio("W1 CPU s/1000 msg", "postfix"),
            0.8,
            higher_is_better=False,
            detail=f"relay {show(relay_med('W1 CPU s/1000 msg'))} s",
        ),
        Target(
            "big message: relay peak RSS <= 40 MB",
            relay_med("big msg peak RSS MB"),
            40,
            higher_is_better=False,
            detail=f"largest process {show(relay_med('big msg largest process MB'))}, "
            f"PSS {show(relay_med('big msg peak PSS MB'))}, the receiving process's own peak "
            f"(VmHWM) {show(relay_med('big msg receiving process VmHWM MB'))}",
        ),
        Target(
            "idle sessions: relay RSS <= 150 MB",
            relay_med("idle sessions RSS MB"),
            150,
            higher_is_better=False,
            detail=f"PSS {show(relay_med('idle sessions PSS MB'))}",
        ),
        Target(
            "relay W1 accept with the idle sessions >= 0.8x without (per-round ratio)",
            idle_ratio,
            0.8,
        ),
        Target(
            "relay W1 accept with every message DKIM-signed (RSA 2048) >= 0.85x unsigned "
            "(per-round ratio)",
            relay_ratio(f"{w1} DKIM accept msg/s", accept),
            0.85,
            detail=f"end-to-end {show_ratio(dkim_e2e)}, CPU {show_ratio(dkim_cpu)}",
        ),
    ]
    return found


def chart(figures: Figures, path: str) -> None:
    """
    Bar chart of the median relay/peer ratios: rates in the upper panel
    (higher is better), CPU and memory in the lower one (lower is better).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    others = [p for p in PEERS if p != "relay"]
    medians: dict[str, dict[str, float]] = {}
    for name in figures.values:
        for peer in others:
            stats = median_range(paired_ratios(figures, name, peer))
            if stats:
                medians.setdefault(name, {})[peer] = stats[0]
    panels = [
        ("rates: relay / peer, higher is better", [n for n in medians if n.endswith("/s")]),
        (
            "CPU and memory: relay / peer, lower is better",
            [n for n in medians if not n.endswith("/s")],
        ),
    ]
    panels = [(title, names) for title, names in panels if names]
    if not panels:
        return
    width_in = max(8.0, 0.75 * max(len(names) for _, names in panels) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 4.2 * len(panels)), squeeze=False)
    width = 0.8 / len(others)
    for ax, (title, names) in zip(axes[:, 0], panels, strict=True):
        for i, peer in enumerate(others):
            xs, heights = [], []
            for j, name in enumerate(names):
                if peer in medians[name]:
                    xs.append(j + (i - (len(others) - 1) / 2) * width)
                    heights.append(medians[name][peer])
            bars = ax.bar(xs, heights, width, label=f"relay / {peer}")
            ax.bar_label(bars, labels=[f"{h:.2f}" for h in heights], fontsize=6, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        values = [v for name in names for v in medians[name].values()]
        ax.set_ylim(min([1.0, *values]) / 1.4, max([1.0, *values]) * 1.4)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"{title} (median of rounds, log scale)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def relay_commit() -> str:
    """
    The checkout's commit as C{git describe} says it, for a report.
    """
    try:
        commit = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return commit or "unknown"


def versions() -> dict[str, str]:
    import twisted

    try:
        import aiosmtpd

        aio = aiosmtpd.__version__
    except ImportError:
        aio = "not installed"
    return {
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "postfix": postfix.version(),
        "aiosmtpd": aio,
        "haraka": haraka.version(os.path.join(CACHE, "haraka")),
        "python-slimta": slimta_venv.version(os.path.join(CACHE, "slimta")),
        "relay commit": relay_commit(),
    }


def report(
    args: argparse.Namespace,
    figures: Figures,
    info: dict[str, str],
    disk: dict[str, float],
    wall: float,
    path: str,
) -> str:
    w1 = "W1"
    lines = [
        "# relay benchmark results",
        "",
        "Generated by `bench/run.py` (the queue backlog section at the end by "
        "`bench/bench_queue.py`, which this keeps); do not edit by hand.",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- command: `{' '.join(['.venv/bin/python', 'bench/run.py', *sys.argv[1:]])}`",
        f"- rounds: {args.rounds} (peers interleaved, order rotated each round, each server started afresh "
        "for every measurement, after the disk has written out what the one before left: `settle_disk`)",
        f"- W1: `smtp-source -c -m {args.messages} -s {args.sessions} -l {args.size}`; W2: the same with `-d`",
        f"- W3 (fan-out): {args.fanout_messages} messages of 20 KiB, each to 50 recipients over 10 domains, "
        "10 sessions kept open, a command at a time (`bench/fanout.py send`); the next hop is "
        "`bench/fanout.py sink`, which counts recipients: rates are recipients per second",
        f"- W4 (large): `smtp-source -c -m {args.large_messages} -s 4 -l 1048576`; rates are MB (MiB) of "
        "message per second; 'RSS growth' is the tree's peak RSS during the load less its RSS before",
        "- relay: `twistd -n --pidfile= relay --smtp tcp:PORT:interface=127.0.0.1 --spool D/sp --quarantine D/q "
        "--control unix:D/ctl.sock --smarthost 127.0.0.1:SINK`"
        + (
            f" `--receivers {args.receivers}`"
            if args.receivers is not None
            else " and nothing more: the defaults a user gets"
        ),
        "- postfix: a private instance (`postfix -c DIR`, `bench/peers/postfix.py`): Debian's defaults but "
        "loopback only, `relayhost = [127.0.0.1]:SINK`, no DNS, no TLS, `smtpd_peername_lookup = no`",
        "- haraka: `haraka -c DIR` of an instance made by `haraka -i` (`bench/peers/haraka.py`): one process, "
        "the `relay` plugin with its ACL for 127.0.0.1 (relaying clients go to Haraka's outbound queue: "
        "written and fsynced before the 250, delivered from disk), a `get_mx` hook naming the sink for every "
        "domain and a `lookup_rdns` hook (no DNS), outbound TLS off, log level warn",
        "- slimta: python-slimta's `SmtpEdge` -> `Queue(DiskStorage)` -> `StaticSmtpRelay(sink, pool_size=20)` "
        "(`bench/peers/slimta_relay.py`, in its own venv); DiskStorage writes and renames files without fsync",
        "- aiosmtpd, twisted.mail: accept-only, each message written to its own file and fsynced before the 250",
        f"- big message: one of {args.big} bytes (`smtp-source -m 1 -s 1 -l {args.big}`), "
        "relay with `--max-message-size` raised above it, Postfix with `message_size_limit` 64 MiB",
        f"- idle sessions: {args.idle} (EHLO then silent; relay with `--max-sessions {args.idle + 500}`), "
        "not run against Postfix (one smtpd process per session)",
        "- W1 DKIM: relay's W1 with `--dkim-keys` listing one RSA 2048 key for "
        f"{DKIM_DOMAIN} (smtp-source's From: domain), so that every message is signed"
        + ("" if args.dkim else " (not run: no `--dkim-keys` option in this relay, or `--no-dkim`)"),
        f"- load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(the machine may be shared; compare ratios, not absolute rates)",
        f"- wall time: {wall:.0f} s",
        "",
        "CPU is the whole server process tree's user+system seconds from the start of smtp-source until the "
        "sink had every message (accept-only peers: until smtp-source finished). Peak RSS is the largest sum "
        "of the tree's RSS seen by polling every 50 ms (pages shared between the tree's processes count once "
        "per process: this overstates multi-process servers such as Postfix); peak PSS is the same sum of "
        "proportional set sizes, polled every 0.5 s; 'largest process' is the peak RSS of the biggest single "
        "process. aiosmtpd and twisted.mail only accept (write and fsync each message), so they have no "
        "end-to-end rate. Cells: median (min–max) over rounds.",
        "",
        "| figure | " + " | ".join(PEERS) + " |",
        "|---|" + "---|" * len(PEERS),
    ]
    for name, per_peer in figures.values.items():
        digits = 2 if "CPU" in name else (1 if "MB" in name else 0)
        cells = [
            fmt(median_range(per_peer[p]), digits)
            if p in per_peer
            else ("skipped" if p in figures.skipped else "–")
            for p in PEERS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Ratios relay / peer",
        "",
        "Per round (both measured in the same round), median (min–max). Rates: higher is better; CPU and RSS: "
        "lower is better.",
        "",
        "| figure | " + " | ".join(f"relay / {p}" for p in PEERS[1:]) + " |",
        "|---|" + "---|" * (len(PEERS) - 1),
    ]
    for name, per_peer in figures.values.items():
        if "relay" not in per_peer:
            continue
        cells = [
            fmt(median_range(paired_ratios(figures, name, p)), 2) if p in per_peer else "–"
            for p in PEERS[1:]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![ratios relay / peer](ratios.png)", "", "## Targets", ""]
    for target in targets(figures, w1):
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[target.met]
        value = "–" if target.value is None else f"{target.value:.2f}"
        detail = f"; {target.detail}" if target.detail else ""
        lines.append(f"- {verdict}: {target.text} (measured {value}{detail})")
    notes = os.path.join(HERE, "NOTES.md")
    if os.path.exists(notes):
        # Written by hand (the profile, what the misses need): kept with
        # every run's figures.
        with open(notes) as f:
            lines += ["", f.read().rstrip()]
    lines += ["", "## Disk, for context", ""]
    lines += [f"- {args.size}-byte files, {k}: {v:.0f} files/s" for k, v in disk.items()]
    if figures.skipped:
        lines += ["", "## Skipped peers", ""]
        lines += [f"- {peer}: {why}" for peer, why in figures.skipped.items()]
    if figures.errors:
        lines += ["", "## Failures", ""] + [f"- {e}" for e in figures.errors]
    text = "\n".join(lines) + "\n"
    try:
        with open(path) as f:
            previous = f.read()
    except FileNotFoundError:
        previous = ""
    kept = re.search(re.escape(CHUNKING_BEGIN) + ".*?" + re.escape(CHUNKING_END), previous, re.S)
    # bench/chunking.py's block, then the sections of the other writers
    # (bench/bench_queue.py, hand-written notes), all kept
    results.write_head(path, text + ("\n" + kept.group() + "\n" if kept else ""))
    return text


# -- main ------------------------------------------------------------------------


def peers_to_run(parser: argparse.ArgumentParser, wanted: str, known: Sequence[str]) -> list[str]:
    """
    The peers of C{known} named in C{wanted} (comma-separated), in
    C{known}'s order, less Postfix when it cannot run here (said in the
    log); the parser's error when Postfix's load tools are missing.
    """
    peers = [p for p in known if p in wanted.split(",")]
    for tool in ("smtp-source", "smtp-sink"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (make deb-tools)")
    if "postfix" in peers and (why := postfix.available()):
        log(f"skipping Postfix: {why}")
        peers.remove("postfix")
    return peers


def stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer messages, 1 round (about a minute and a half)"
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument(
        "--messages", type=int, help="messages per W1/W2 run (default 3000, quick 500)"
    )
    parser.add_argument("--sessions", type=int, default=20, help="concurrent smtp-source sessions")
    parser.add_argument("--size", type=int, default=2048, help="message size in bytes")
    parser.add_argument("--idle", type=int, help="idle sessions (default 1000)")
    parser.add_argument("--big", type=int, default=50 * MB, help="size of the big message in bytes")
    parser.add_argument(
        "--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS)
    )
    parser.add_argument("--fanout-messages", type=int, help="W3 messages (default 300, quick 40)")
    parser.add_argument(
        "--large-messages", type=int, help="W4 messages of 1 MiB (default 100, quick 12)"
    )
    parser.add_argument(
        "--no-dkim",
        dest="dkim",
        action="store_false",
        help="skip relay's W1 with every message DKIM-signed",
    )
    parser.add_argument(
        "--receivers", type=int,
        help="relay --receivers N (default: none given, relay as a user starts it)",
    )  # fmt: skip
    parser.add_argument(
        "--tmpdir", help="where the servers' directories go (default: the system's temp dir)"
    )
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--chart", default=os.path.join(HERE, "ratios.png"))
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.messages = args.messages or (500 if args.quick else 3000)
    args.fanout_messages = args.fanout_messages or (40 if args.quick else 300)
    args.large_messages = args.large_messages or (12 if args.quick else 100)
    args.idle = args.idle if args.idle is not None else (200 if args.quick else 1000)
    if args.quick and args.big == 50 * MB:
        args.big = 10 * MB
    peers = peers_to_run(parser, args.peers, PEERS)
    figures = Figures()
    for name, module in (("haraka", haraka), ("slimta", slimta_venv)):
        if name in peers and (why := module.install(os.path.join(CACHE, name), log)):
            log(f"skipping {name}: {why}")
            figures.skipped[name] = why
            peers.remove(name)
    log(f"relay --receivers: {'not given' if args.receivers is None else args.receivers}")
    args.dkim = args.dkim and "relay" in peers and relay_has("--dkim-keys")

    began = time.monotonic()
    info = versions()
    base = tempfile.mkdtemp(prefix="relay-bench-", dir=args.tmpdir)
    os.chmod(base, 0o755)  # Postfix's daemons run as mail_owner and must reach their directories
    plain = Options(args.receivers)
    try:
        signed = Options(args.receivers, dkim_keys=make_dkim_keys(base) if args.dkim else None)
        disk = disk_figures(base, 200 if args.quick else 1000, args.size, 100)
        log("disk: " + ", ".join(f"{k} {v:.0f} files/s" for k, v in disk.items()))
        w1 = Load(args.messages, args.sessions, args.size)
        w2 = Load(args.messages, args.sessions, args.size, keep_open=True)
        w3 = Load(args.fanout_messages, 10, 20 * 1024, recipients=50, domains=10)
        w4 = Load(args.large_messages, 4, MB)
        for round_ in range(args.rounds):
            order = peers[round_ % len(peers) :] + peers[: round_ % len(peers)]
            log(f"round {round_ + 1}/{args.rounds}: {', '.join(order)}")
            for peer in order:
                loads = [("W1", w1), ("W2", w2)]
                if peer in FORWARDING:
                    loads += [("W3", w3), ("W4", w4)]
                for prefix, load in loads:
                    directory = os.path.join(base, f"r{round_}-{peer}-{prefix}")
                    measure_load(figures, prefix, peer, directory, load, plain)
                if peer == "relay" and args.dkim:
                    directory = os.path.join(base, f"r{round_}-{peer}-W1-dkim")
                    measure_load(figures, "W1 DKIM", peer, directory, w1, signed)
            for peer in [p for p in order if p in BIG_PEERS]:
                big = Options(args.receivers, max_message_size=args.big + MB)
                measure_big(
                    figures, peer, os.path.join(base, f"r{round_}-{peer}-big"), args.big, big
                )
            for peer in [p for p in order if p in IDLE_PEERS and args.idle]:
                idle = Options(args.receivers, max_sessions=args.idle + 500)
                directory = os.path.join(base, f"r{round_}-{peer}-idle")
                measure_load(figures, "W1 + idle", peer, directory, w1, idle, idle=args.idle)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    wall = time.monotonic() - began
    text = report(args, figures, info, disk, wall, args.output)
    try:
        chart(figures, args.chart)
    except Exception as e:  # the table matters more than the picture
        log(f"no chart: {e}")
    print(text, flush=True)
    log(f"wrote {args.output} and {args.chart} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
