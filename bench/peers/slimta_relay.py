"""
A python-slimta 5 relay for the benchmark, built as slimta's documentation
builds a relay (its "Relaying" and queue chapters): an C{SmtpEdge} on a
loopback port hands each message to a C{Queue} backed by C{DiskStorage}
(the envelope and its metadata as files in a spool directory), which
relays it with a C{StaticSmtpRelay} to the next hop (the sink).

    SLIMTA_VENV/bin/python bench/peers/slimta_relay.py --port P --next-hop N --dir D

It runs in its own venv (python-slimta pins gevent and old setuptools);
L{peers.slimta_venv} makes that venv.  DiskStorage writes each file and renames
it into place, without fsync: it is measured as slimta ships it.  Listens
on 127.0.0.1 only and prints C{ready} once it does.
"""

from __future__ import annotations

import argparse
import os
import warnings

warnings.filterwarnings("ignore")  # pkg_resources' deprecation, at import

import gevent  # noqa: E402
from slimta.diskstorage import DiskStorage  # noqa: E402
from slimta.edge.smtp import SmtpEdge  # noqa: E402
from slimta.queue import Queue  # noqa: E402
from slimta.relay.smtp.static import StaticSmtpRelay  # noqa: E402


def main(args: argparse.Namespace) -> None:
    env_dir, meta_dir, tmp_dir = (os.path.join(args.dir, d) for d in ("env", "meta", "tmp"))
    for d in (env_dir, meta_dir, tmp_dir):
        os.makedirs(d, exist_ok=True)
    relay = StaticSmtpRelay("127.0.0.1", args.next_hop, pool_size=args.pool_size)
    queue = Queue(DiskStorage(env_dir, meta_dir, tmp_dir), relay)
    queue.start()
    edge = SmtpEdge(
        ("127.0.0.1", args.port), queue, max_size=args.max_size, hostname="slimta.bench.invalid"
    )
    edge.start()
    print("ready", flush=True)
    gevent.joinall([edge, queue])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--next-hop", type=int, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--max-size", type=int, default=64 * 1024 * 1024)
    main(parser.parse_args())
