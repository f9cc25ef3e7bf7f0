"""
The fan-out workload (W3) of C{bench/run.py}: a sender and a sink that
counts recipients, both plain asyncio, each its own process.

    python bench/fanout.py send --port P --messages M --sessions S \\
        --size 20480 --recipients 50 --domains 10
    python bench/fanout.py sink --port P

C{smtp-source} sends to one address (C{-r} numbers the local part, so
every recipient has one domain) and C{smtp-sink} counts messages, not
recipients; a relay may split a message by domain (Haraka does), so the
sink here counts what matters: the recipients it accepted.

The sender keeps C{S} sessions open, each sending its share of the
messages one after the other, a command at a time (no pipelining: every
peer then sees the same conversation), recipients
C{rcpt<n>@d<k>.fanout.example} spread over the domains.  It exits 0 once
every message got its 250, else 1 with the first bad reply.

The sink accepts every command (it advertises PIPELINING, so replies go
out per line as commands arrive) and prints C{rcpt=N mesg=M} when its
counts changed, at most every 10 ms.  Both listen and connect on
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time


class SinkProtocol(asyncio.Protocol):
    counts = {"rcpt": 0, "mesg": 0}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.in_data = False
        self.transport.write(b"220 fanout-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while self.buffer:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    # Keep only what may hold the start of the marker.
                    self.buffer = self.buffer[-4:]
                    break
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self.counts["mesg"] += 1
                out.append(b"250 2.0.0 Ok\r\n")
                continue
            end = self.buffer.find(b"\n")
            if end < 0:
                break
            line, self.buffer = self.buffer[:end].rstrip(b"\r"), self.buffer[end + 1 :]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                out.append(b"250-fanout-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
            elif verb == b"RCPT":
                self.counts["rcpt"] += 1
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                # The marker may follow the DATA line directly: "\r\n" of the
                # DATA line starts it.
                self.buffer = b"\r\n" + self.buffer
                self.in_data = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))


async def sink(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(SinkProtocol, "127.0.0.1", args.port, backlog=1024)
    print("ready", flush=True)
    shown = None
    while True:
        await asyncio.sleep(0.01)
        now = (SinkProtocol.counts["rcpt"], SinkProtocol.counts["mesg"])
        if now != shown:
            shown = now
            sys.stdout.write(f"rcpt={now[0]} mesg={now[1]}\n")
            sys.stdout.flush()


class BadReply(Exception):
    pass


async def session(
    port: int, messages: list[int], body: bytes, recipients: int, domains: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply(expect: bytes) -> None:
        while True:
            line = await reader.readline()
            if not line:
                raise BadReply(f"connection closed, expecting {expect.decode()}")
            if line[3:4] != b"-":
                if not line.startswith(expect):
                    raise BadReply(line.decode(errors="replace").strip())
                return

    async def command(line: bytes, expect: bytes) -> None:
        writer.write(line)
        await reply(expect)

    try:
        await reply(b"220")
        await command(b"EHLO fanout.bench.invalid\r\n", b"250")
        for n in messages:
            await command(b"MAIL FROM:<bench@example.com>\r\n", b"250")
            for r in range(recipients):
                address = f"rcpt{n}-{r}@d{r % domains}.fanout.example"
                await command(f"RCPT TO:<{address}>\r\n".encode(), b"250")
            await command(b"DATA\r\n", b"354")
            await command(body, b"250")
        await command(b"QUIT\r\n", b"221")
    finally:
        writer.close()


async def send(args: argparse.Namespace) -> int:
    line = b"x" * 76 + b"\r\n"
    headers = (
        b"From: <bench@example.com>\r\nTo: <fanout@fanout.example>\r\nSubject: fan-out\r\n\r\n"
    )
    body = headers + line * max(1, (args.size - len(headers)) // len(line)) + b".\r\n"
    shares = [list(range(i, args.messages, args.sessions)) for i in range(args.sessions)]
    start = time.monotonic()
    try:
        await asyncio.gather(
            *(session(args.port, s, body, args.recipients, args.domains) for s in shares if s)
        )
    except (BadReply, OSError) as e:
        print(f"fanout send: {e}", file=sys.stderr)
        return 1
    print(f"sent {args.messages} in {time.monotonic() - start:.2f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sink")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("send")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--messages", type=int, default=200)
    c.add_argument("--sessions", type=int, default=10)
    c.add_argument("--size", type=int, default=20 * 1024)
    c.add_argument("--recipients", type=int, default=50)
    c.add_argument("--domains", type=int, default=10)
    args = parser.parse_args()
    if args.what == "sink":
        asyncio.run(sink(args))
        return 0
    return asyncio.run(send(args))


if __name__ == "__main__":
    sys.exit(main())
