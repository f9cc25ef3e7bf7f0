"""
An accept-only aiosmtpd server for the benchmark: each message is written
to its own file and fsynced (in the default executor) before the 250 reply.

    python bench/peers/aiosmtpd_fsync.py --port PORT --dir DIR

Listens on 127.0.0.1 only and prints C{ready} once it does.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
from typing import Any

from aiosmtpd.smtp import SMTP


def write_synced(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class FsyncHandler:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.counter = itertools.count()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        path = os.path.join(self.directory, f"{next(self.counter)}.eml")
        data = envelope.original_content or envelope.content
        await asyncio.get_running_loop().run_in_executor(None, write_synced, path, data)
        return "250 OK stored"


async def main(args: argparse.Namespace) -> None:
    handler = FsyncHandler(args.dir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench.invalid", data_size_limit=args.max_size),
        "127.0.0.1",
        args.port,
        backlog=1024,
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--max-size", type=int, default=64 * 1024 * 1024)
    asyncio.run(main(parser.parse_args()))
