"""
The packaging check (C{make dist-check}): relay installed as a user installs
it, from the wheel that C{pip wheel} builds, into a fresh virtualenv outside
the checkout, and run from a directory outside the checkout.

The editable virtualenv of the Makefile puts the checkout on C{sys.path}, so
it cannot show that the wheel carries everything (the twistd drop-in in
C{twisted/plugins/}, C{py.typed}, the licence): this check does not use it
for anything but building the wheel.  Every command and its output go to
C{dist-check-transcript.txt} in trial's working directory.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Sequence

from twisted.trial.unittest import TestCase

from tests.system.support import ROOT, free_port, listening, poll

# .ci/run names a file outside _trial_temp, which the next trial run empties.
TRANSCRIPT_VARIABLE = "DIST_CHECK_TRANSCRIPT"
TIMEOUT = 60.0
# Lines of a command's output kept in the transcript.
MAX_LINES = 8


class Installed:
    """
    The wheel built from the checkout and a fresh virtualenv with it
    installed, in a temporary directory outside the checkout (made once
    for the whole module, removed when the process exits).
    """

    def __init__(self) -> None:
        self.transcript = os.path.abspath(
            os.environ.get(TRANSCRIPT_VARIABLE, "dist-check-transcript.txt")
        )
        self.root = tempfile.mkdtemp(prefix="relay-dist-check-")
        atexit.register(shutil.rmtree, self.root, True)
        self.work = os.path.join(self.root, "work")
        os.makedirs(self.work)
        with open(self.transcript, "w") as f:
            f.write(f"# relay packaging check; checkout {ROOT}, outside it {self.root}\n")
        wheels = os.path.join(self.root, "wheel")
        self.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, ROOT])
        [self.wheel] = glob.glob(os.path.join(wheels, "relay-*.whl"))
        self.venv = os.path.join(self.root, "venv")
        base = getattr(sys, "_base_executable", sys.executable)
        self.run([base, "-m", "venv", self.venv])
        self.bin = os.path.join(self.venv, "bin")
        self.run([self.tool("pip"), "install", "--quiet", "--disable-pip-version-check", self.wheel])

    def tool(self, name: str) -> str:
        return os.path.join(self.bin, name)

    def env(self) -> dict[str, str]:
        """
        The environment of a user's shell: no PYTHONPATH pointing into the
        checkout, the virtualenv's tools first on PATH.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = os.pathsep.join([self.bin, env.get("PATH", "")])
        return env

    def note(self, text: str) -> None:
        with open(self.transcript, "a") as f:
            f.write(text)

    def run(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        """
        Run C{argv} in the work directory, recording it and its output.
        """
        self.note("$ " + " ".join(argv) + "\n")
        done = subprocess.run(
            list(argv), cwd=getattr(self, "work", None), env=self.env() if hasattr(self, "bin") else None,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        output = (done.stdout + done.stderr).rstrip()
        # pip's complaints about this machine's unreachable extra indexes
        # are noise here.
        lines = [x for x in output.splitlines() if not x.startswith("WARNING: Location 'file:")]
        if len(lines) > MAX_LINES:
            lines = lines[:MAX_LINES] + [f"... ({len(lines) - MAX_LINES} more lines)"]
        self.note("".join(line + "\n" for line in lines) + f"# exit {done.returncode}\n")
        if check and done.returncode != 0:
            raise AssertionError(f"{argv[0]} exited with {done.returncode}:\n{output}")
        return done


_installed: Installed | None = None


def installed() -> Installed:
    global _installed
    if _installed is None:
        _installed = Installed()
    return _installed


POLICY = '''\
from relay import Continue, Reject, Reply, Simple


class Policy(Simple):
    """Accept mail for example.net only."""

    def process_recipient(self, log, session, sender, sender_args, recipient):
        if recipient.domain != "example.net":
            return Reject(Reply(550, "5.7.1 not here"))
        return Continue()
'''


class WheelTests(TestCase):
    """
    relay from its wheel, in a fresh virtualenv, used from outside the
    checkout.
    """

    timeout = 900

    def setUp(self) -> None:
        self.dist = installed()

    def test_wheel_contents(self) -> None:
        """
        The wheel carries the twistd drop-in, the type marker and the
        licence, and none of the checkout's tests or benchmarks.
        """
        names = zipfile.ZipFile(self.dist.wheel).namelist()
        self.assertIn("twisted/plugins/relay_plugin.py", names)
        self.assertIn("relay/py.typed", names)
        self.assertTrue(any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names)
        self.assertFalse([n for n in names if n.startswith(("tests/", "bench/", "examples/"))])
        self.assertFalse([n for n in names if n.startswith("twisted/") and "relay" not in n])

    def test_commands(self) -> None:
        """
        C{twistd relay --help} lists relay's options and C{relayctl
        --version} gives the package's version, from the installed copy.
        """
        import relay

        help_text = self.dist.run([self.dist.tool("twistd"), "relay", "--help"]).stdout
        self.assertIn("--smarthost", help_text)
        version = self.dist.run([self.dist.tool("relayctl"), "--version"]).stdout.strip()
        self.assertEqual(version, f"relayctl (relay) {relay.__version__}")
        where = self.dist.run(
            [self.dist.tool("python"), "-c", "import relay; print(relay.__file__)"]
        ).stdout.strip()
        self.assertTrue(where.startswith(self.dist.venv), where)

    async def test_serves_mail(self) -> None:
        """
        C{twistd -n relay} from the wheel, with a plugin from the current
        directory, accepts a message over SMTP, and C{relayctl --spool DIR
        count} sees it, while the relay runs (over the control socket in the
        spool) and after it stopped (from the directory).
        """
        dist = self.dist
        with open(os.path.join(dist.work, "policy.py"), "w") as f:
            f.write(POLICY)
        port = free_port()
        spool = os.path.join(dist.root, "spool")
        argv = [
            dist.tool("twistd"), "--nodaemon", "--pidfile=", "relay",
            "--smtp", f"tcp:{port}:interface=127.0.0.1", "--spool", spool,
            "--quarantine", os.path.join(dist.root, "quarantine"),
            "--callbacks", "policy.Policy", "--hostname", "dist-check.test",
            # Nothing listens there: the message stays queued.
            "--smarthost", f"127.0.0.1:{free_port()}", "--retry-intervals", "1h",
        ]  # fmt: skip
        dist.note("$ " + " ".join(argv) + " &\n")
        log_path = os.path.join(dist.root, "twistd.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv, cwd=dist.work, env=dist.env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.addCleanup(self._stop, process)
        await poll(lambda: listening(port) or process.poll() is not None, "the relay", TIMEOUT)
        self.assertIsNone(process.poll(), open(log_path).read())

        dist.note(f"# smtplib: MAIL FROM:<alice@example.com> RCPT TO:<bob@example.net>,"
                  f"<carol@example.org> on 127.0.0.1:{port}\n")  # fmt: skip
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
            refused = client.sendmail(
                "alice@example.com", ["bob@example.net", "carol@example.org"],
                b"Subject: dist check\r\n\r\nHello.\r\n",
            )  # fmt: skip
        dist.note(f"# refused: {refused}\n")
        self.assertEqual(refused, {"carol@example.org": (550, b"5.7.1 not here")})

        count = dist.run([dist.tool("relayctl"), "--spool", spool, "count"]).stdout
        self.assertEqual(count.splitlines()[0], "active: 1")

        process.send_signal(signal.SIGTERM)
        await poll(lambda: process.poll() is not None, "the relay to stop", TIMEOUT)
        dist.note("# twistd's log:\n" + "".join("#   " + line for line in open(log_path)))
        # twistd ends with the signal that stopped it, once shut down.
        self.assertIn(process.returncode, (0, -signal.SIGTERM))
        count = dist.run([dist.tool("relayctl"), "--spool", spool, "count"]).stdout
        self.assertEqual(count.splitlines()[0], "active: 1")

    def _stop(self, process: subprocess.Popen[Any]) -> None:
        if process.poll() is None:
            process.kill()
            process.wait()
