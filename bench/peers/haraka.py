"""
Haraka 3 for the benchmark: installed from the npm registry into a cache
directory when missing, and run as its documentation describes a relay
with its own durable queue.

The instance (C{haraka -c DIR}) has: C{smtp.ini} listening on one loopback
port, one process (C{nodes} unset: no cluster); the C{relay} plugin with
its ACL (C{relay.ini} C{acl=true}, C{relay_acl_allow} 127.0.0.1/32), so
that loopback clients relay: Haraka then hands each message to its
outbound queue (C{queue_outbound} without a plugin taking it), which
writes it to C{DIR/queue} with an fsync before the 250 (haraka-utils'
fsync write stream) and delivers it from there; and one C{get_mx} hook
plugin of ours (Haraka's documented way to route outbound mail,
C{docs/Outbound.md}) naming the sink as every domain's mail exchanger, and
answering C{lookup_rdns} for the client, so that no DNS is involved.  Outbound TLS is off (the sink has none), the log
level is C{warn}.
"""

from __future__ import annotations

import os
import shutil
import subprocess

#: The Haraka major version measured.
SPEC = "Haraka@3"

#: Our get_mx plugin: every domain's mail goes to the sink.
GET_MX_PLUGIN = """\
// bench: route every outbound domain to the benchmark's sink, and name
// loopback clients without a reverse DNS lookup
exports.register = function () {
    this.register_hook('get_mx', 'sink_mx')
    this.register_hook('lookup_rdns', 'no_rdns')
}
exports.no_rdns = function (next, connection) {
    next(OK, 'localhost')
}
exports.sink_mx = function (next, hmail, domain) {
    next(OK, { priority: 0, exchange: '127.0.0.1', port: %d })
}
"""


class HarakaError(Exception):
    """
    Haraka could not be installed or configured.
    """


def executable(cache: str) -> str:
    return os.path.join(cache, "node_modules", ".bin", "haraka")


def version(cache: str) -> str:
    try:
        import json

        with open(os.path.join(cache, "node_modules", "Haraka", "package.json")) as f:
            return str(json.load(f)["version"])
    except (OSError, ValueError, KeyError):
        return "not installed"


def install(cache: str, log: object = print) -> str | None:
    """
    Install Haraka into C{cache} unless it is there; answer why it cannot
    run, or C{None}.
    """
    if os.path.exists(executable(cache)):
        return None
    if shutil.which("npm") is None or shutil.which("node") is None:
        return "node and npm are not installed"
    os.makedirs(cache, exist_ok=True)
    log(f"installing {SPEC} from the npm registry into {cache}")  # type: ignore[operator]
    try:
        result = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", cache, SPEC],
            capture_output=True, text=True, timeout=600, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "npm install did not finish within 600 s (registry unreachable?)"
    if result.returncode != 0 or not os.path.exists(executable(cache)):
        tail = (result.stdout + result.stderr).strip().splitlines()[-2:]
        return f"npm install {SPEC} failed (registry unreachable?): {' | '.join(tail)}"
    return None


def configure(cache: str, base: str, port: int, next_hop: int, max_size: int) -> list[str]:
    """
    Make an instance in C{base}/haraka; answer the command that runs it.
    """
    instance = os.path.join(base, "haraka")
    # haraka -i makes an instance with Haraka's default configuration
    # (connection.ini and the rest), which the files below then change.
    made = subprocess.run(
        [executable(cache), "-i", instance],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if made.returncode != 0:
        raise HarakaError(f"haraka -i failed: {(made.stdout + made.stderr).strip()[-300:]}")
    config = os.path.join(instance, "config")
    plugins = os.path.join(instance, "plugins")
    for d in (config, plugins, os.path.join(instance, "queue")):
        os.makedirs(d, exist_ok=True)
    files = {
        "smtp.ini": f"listen=127.0.0.1:{port}\n",
        "me": "haraka.bench.invalid\n",
        "plugins": "relay\nbench_sink_mx\n",
        "relay.ini": "[relay]\nacl=true\n",
        "relay_acl_allow": "127.0.0.1/32\n",
        "outbound.ini": "enable_tls=false\nreceived_header=Haraka outbound\n",
        "log.ini": "[main]\nlevel=warn\n",
        "databytes": f"{max_size}\n",
        "host_list": "",
    }
    for name, text in files.items():
        with open(os.path.join(config, name), "w") as f:
            f.write(text)
    with open(os.path.join(plugins, "bench_sink_mx.js"), "w") as f:
        f.write(GET_MX_PLUGIN % next_hop)
    return [executable(cache), "-c", instance]
