"""
CHUNKING to the next hop (RFC 3030): W1 through relay to a private Postfix
whose smtpd offers CHUNKING, and to the same Postfix told not to offer it
(C{smtpd_discard_ehlo_keywords = chunking}); writes its section of
bench/RESULTS.md (between the C{chunking} markers, which C{bench/run.py}
keeps when it rewrites the file).

    .venv/bin/python bench/chunking.py                 # 3 rounds of 2000 messages
    .venv/bin/python bench/chunking.py --rounds 1 --messages 500

Postfix, the next hop here, discards what it receives (C{default_transport
= discard}): it still writes and fsyncs each message in its queue, as a
real next hop would.  Figures: relay's end-to-end rate (from smtp-source's
start until Postfix logged the last discard) and the CPU seconds of relay's
process tree (C{twistd} and its receivers) over the same window, which is
where the client's framing costs show (DATA's dot-stuffing pass and its
extra round trip per message, against BDAT's count).  The two modes run
interleaved, the order rotated each round; ratios are taken per round.
Postfix's own smtpd log line (its C{bdat=} or C{data=} command counts)
checks that each mode really used the framing it is named for.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402
from peers import postfix  # noqa: E402

MODES = ("CHUNKING", "DATA")
BEGIN, END = run.CHUNKING_BEGIN, run.CHUNKING_END


class DiscardingPostfix(postfix.Postfix):
    """
    The benchmark's private Postfix as a final hop: it discards every
    message it queued, and offers CHUNKING or not.
    """

    def __init__(self, base: str, port: int, chunking: bool) -> None:
        postfix.Postfix.__init__(self, base, port, next_hop=9, message_size_limit=64 * run.MB)
        self.chunking = chunking

    def write_config(self) -> None:
        postfix.Postfix.write_config(self)
        extra = {
            "relayhost": "",
            "default_transport": "discard:bench",
            "relay_transport": "discard:bench",
        }
        if not self.chunking:
            extra["smtpd_discard_ehlo_keywords"] = "chunking"
        with open(os.path.join(self.config, "main.cf"), "a") as f:
            f.writelines(f"{key} = {value}\n" for key, value in extra.items())

    def read_log(self) -> str:
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def discarded(self) -> int:
        return self.read_log().count("status=sent (bench)")

    def wait_for(self, count: int, timeout: float) -> float | None:
        """
        The monotonic time by which C{count} messages were discarded
        (polled every 50 ms), or C{None} after C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.discarded() >= count:
                return time.monotonic()
            time.sleep(0.05)
        return None

    def commands(self) -> dict[str, int]:
        """
        The BDAT and DATA commands smtpd counted over all its sessions.
        """
        totals = {"bdat": 0, "data": 0}
        for name, count in re.findall(r"\b(bdat|data)=(\d+)", self.read_log()):
            totals[name] += int(count)
        return totals


def measure(mode: str, base: str, load: run.Load, receivers: int) -> tuple[float, float]:
    """
    One run of C{load} through relay to Postfix in C{mode}: relay's
    end-to-end rate and CPU seconds.
    """
    os.makedirs(base)
    os.chmod(base, 0o755)
    sink = DiscardingPostfix(os.path.join(base, "postfix"), run.free_port(), mode == "CHUNKING")
    master = None
    relay = None
    try:
        master = sink.start()
        run.wait_for_greeting(sink.port, lambda: master is not None and run.alive(master))
        relay = run.Server("relay", os.path.join(base, "relay"), sink.port, run.Options(receivers))
        assert relay.root is not None
        monitor = run.TreeMonitor(relay.root).start()
        try:
            start, _ = run.run_source(load, relay.port, base, run.timeout_for(load.messages))
            done = sink.wait_for(load.messages, run.timeout_for(load.messages))
        finally:
            monitor.stop()
        if done is None:
            raise RuntimeError(f"Postfix discarded {sink.discarded()} of {load.messages}")
        relay.stop()
        relay = None
        # relay's idle connections to Postfix are closed: every session is logged.
        time.sleep(1)
        counts = sink.commands()
        used = "bdat" if mode == "CHUNKING" else "data"
        other = "data" if mode == "CHUNKING" else "bdat"
        if counts[used] < load.messages or counts[other]:
            raise RuntimeError(f"{mode}: Postfix counted {counts}")
        return load.messages / (done - start), monitor.cpu
    finally:
        if relay is not None:
            relay.stop()
        sink.stop(master)
        shutil.rmtree(base, ignore_errors=True)


def section(
    args: argparse.Namespace,
    loads: list[run.Load],
    results: dict[tuple[int, str], list[tuple[float, float]]],
) -> str:
    def cell(values: list[float], digits: int) -> str:
        return run.fmt(run.median_range(list(values)), digits)

    sources = "; ".join(
        f"`smtp-source -c -m {load.messages} -s {load.sessions} -l {load.size}`" for load in loads
    )
    lines = [
        BEGIN,
        "## CHUNKING to the next hop",
        "",
        f"Generated by `bench/chunking.py` ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}).",
        "",
        f"- command: `.venv/bin/python bench/chunking.py --rounds {args.rounds}"
        f" --messages {args.messages} --big-size {args.big_size}`",
        f"- loads: {sources}, to relay (`--receivers {args.receivers}`, `--smarthost` a private"
        f" Postfix {postfix.version()} that discards what it queued); the same Postfix offering"
        " CHUNKING, or not (`smtpd_discard_ehlo_keywords = chunking`): relay sends BDAT or DATA",
        f"- rounds: {args.rounds}, the two modes interleaved, the order rotated each round;"
        " Postfix's smtpd command counts checked the framing of every run",
        "- e2e: from smtp-source's start until Postfix logged the last discard (Postfix's own"
        " queue, with its fsyncs, bounds it); relay CPU: relay's process tree over that window",
        f"- load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        " (shared machine: compare the ratios)",
        "",
        "| figure | with CHUNKING (BDAT) | without (DATA) | BDAT / DATA per round |",
        "|---|---|---|---|",
    ]
    for load in loads:
        chunked, plain = results[(load.size, "CHUNKING")], results[(load.size, "DATA")]
        for name, index, digits in (("e2e msg/s", 0, 0), ("relay CPU s", 1, 2)):
            a = [r[index] for r in chunked]
            b = [r[index] for r in plain]
            ratio = [x / y for x, y in zip(a, b, strict=True)]
            lines.append(
                f"| {load.size} B: {name} | {cell(a, digits)} | {cell(b, digits)} |"
                f" {cell(ratio, 2)} |"
            )
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: str, text: str) -> None:
    """
    Put C{text} in place of the marked section of C{path}, or at its end.
    """
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    if pattern.search(old):
        new = pattern.sub(lambda m: text, old)
    else:
        new = old.rstrip("\n") + "\n\n" + text if old else text
    with open(path, "w") as f:
        f.write(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument(
        "--big-size",
        type=int,
        default=100 * 1024,
        help="a second load of a tenth as many messages of this size (0: none)",
    )
    parser.add_argument("--receivers", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args(argv)
    if why := postfix.available():
        parser.error(f"Postfix is needed: {why}")
    loads = [run.Load(args.messages, args.sessions, args.size)]
    if args.big_size:
        loads.append(run.Load(max(1, args.messages // 10), args.sessions, args.big_size))
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    base = tempfile.mkdtemp(prefix="relay-bench-chunking-")
    os.chmod(base, 0o755)
    try:
        for round_ in range(args.rounds):
            order = MODES[round_ % 2 :] + MODES[: round_ % 2]
            for load in loads:
                for mode in order:
                    directory = os.path.join(base, f"r{round_}-{load.size}-{mode}")
                    rate, cpu = measure(mode, directory, load, args.receivers)
                    run.log(
                        f"round {round_ + 1} {load.size} B {mode}: {rate:.0f} msg/s, "
                        f"relay CPU {cpu:.2f} s"
                    )
                    results.setdefault((load.size, mode), []).append((rate, cpu))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = section(args, loads, results)
    write_section(args.output, text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
