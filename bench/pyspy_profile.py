"""
Profile relay under one load with py-spy: where each process's time goes.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/pyspy_profile.py                       # W1, relay's defaults
    .venv/bin/python bench/pyspy_profile.py --keep-open -- --receivers 2

Starts C{smtp-sink}, C{twistd relay --smarthost} the sink (plus the relay
arguments after C{--}) and C{py-spy record} on the relay's master and on
each receiver process, runs C{smtp-source} (3000 messages of 2 KiB over 20
sessions, C{-c}, with C{--keep-open} C{-d}), waits for the sink, and
prints per process and per thread (the reactor; the thread pool) the
functions with the most samples (self, then inclusive), as a share of that
thread's samples and in microseconds per message (py-spy samples threads
that run or block in a system call, not those that wait for work).
Everything listens on 127.0.0.1 only; the processes started here are
stopped at the end.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import Sink, kill_tree, tree_pids, wait_for_greeting  # noqa: E402

BIN = os.path.dirname(sys.executable)


def short(frame: str) -> str:
    m = re.match(r"(.*) \((.*):\d+\)", frame)
    if not m:
        return frame
    function, path = m.groups()
    return f"{function} ({path.split('site-packages/')[-1].split('/relay/')[-1]})"


def summarise(path: str, messages: int, rate: int, top: int) -> None:
    threads: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            kind = "reactor" if any("mainLoop" in x for x in frames) else "thread pool / other"
            body = [short(x) for x in frames if not x.startswith(("process ", "thread "))]
            if body:
                threads[kind].append((body, int(n)))
    for kind, stacks in threads.items():
        total = sum(n for _, n in stacks)
        own: collections.Counter[str] = collections.Counter()
        inclusive: collections.Counter[str] = collections.Counter()
        for body, n in stacks:
            own[body[-1]] += n
            for x in set(body):
                inclusive[x] += n
        per_message = 1e6 / rate / messages
        print(f"  {kind}: {total} samples, {total * per_message:.0f} us per message")
        for title, counter in (("self", own), ("inclusive", inclusive)):
            print(f"    -- {title}")
            for name, n in counter.most_common(top):
                print(f"    {100 * n / total:5.1f}% {n * per_message:6.0f} us  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--keep-open", action="store_true", help="smtp-source -d (W2)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("relay_args", nargs="*", help="more twistd relay arguments (after --)")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="relay-profile-")
    os.chmod(base, 0o755)
    sink = Sink(base)
    port = sink.port + 1 if sink.port < 65535 else sink.port - 1
    relay = subprocess.Popen(
        [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile", os.path.join(base, "log"),
         "relay", "--smtp", f"tcp:{port}:interface=127.0.0.1", "--spool", os.path.join(base, "sp"),
         "--quarantine", os.path.join(base, "q"), "--control", f"unix:{os.path.join(base, 'ctl')}",
         "--smarthost", f"127.0.0.1:{sink.port}", *args.relay_args],
        cwd=base, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    spies: list[tuple[int, str, subprocess.Popen[bytes]]] = []
    try:
        wait_for_greeting(port, lambda: relay.poll() is None)
        time.sleep(1)
        for pid in tree_pids(relay.pid):
            out = os.path.join(base, f"spy-{pid}.txt")
            command = [os.path.join(BIN, "py-spy"), "record", "--nonblocking", "--rate",
                       str(args.rate), "--format", "raw", "-o", out, "--pid", str(pid)]  # fmt: skip
            spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            spies.append((pid, out, spy))
        time.sleep(1)
        flags = ["-c", "-d"] if args.keep_open else ["-c"]
        start = time.monotonic()
        subprocess.run(
            ["smtp-source", *flags, "-m", str(args.messages), "-s", "20", "-l", "2048",
             "-f", "bench@example.com", "-t", "sink@example.net", f"127.0.0.1:{port}"],
            check=True, stdout=subprocess.DEVNULL, timeout=600,
        )  # fmt: skip
        accepted = time.monotonic()
        done = sink.wait_for(args.messages, 300) or time.monotonic()
        print(
            f"{args.messages} messages: accept {args.messages / (accepted - start):.0f} msg/s, "
            f"end to end {args.messages / (done - start):.0f} msg/s; load {os.getloadavg()[0]:.2f}"
        )
    finally:
        for _, _, spy in spies:
            spy.send_signal(2)
        for _, _, spy in spies:
            spy.wait(60)
        kill_tree(relay.pid)
        sink.stop()
    for pid, out, _ in spies:
        print(f"process {pid} ({'the master' if pid == relay.pid else 'a receiver'}):")
        if os.path.exists(out):
            summarise(out, args.messages, args.rate, args.top)
    print(f"(raw py-spy output and the relay's log in {base})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
