"""
python-slimta 5 for the benchmark: its own venv in a cache directory,
made when missing from PyPI, and the command that runs
L{slimta_relay} (an C{SmtpEdge}, a C{Queue} on C{DiskStorage}, a
C{StaticSmtpRelay} to the sink) in it.

The pins: C{DiskStorage} imports C{pyaio}, whose only release that
installs (0.4, marked yanked on PyPI but working on Python 3.11 here) is
asked for by name; slimta reads its version through C{pkg_resources},
which setuptools 81 removed, and which needs the zope distributions gevent
names.
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = [
    "python-slimta>=5,<6",
    "pyaio==0.4",
    "setuptools>=70,<81",
    "zope.interface",
    "zope.event",
]


def python(cache: str) -> str:
    return os.path.join(cache, "bin", "python")


def version(cache: str) -> str:
    try:
        out = subprocess.run(
            [python(cache), "-c", "import importlib.metadata as m; print(m.version('python-slimta'))"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return out.stdout.strip() or "not installed"


def _works(cache: str) -> bool:
    try:
        result = subprocess.run(
            [python(cache), "-W", "ignore", "-c", "import slimta.diskstorage, slimta.edge.smtp"],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def install(cache: str, log: object = print) -> str | None:
    """
    Make the venv in C{cache} unless it works already; answer why slimta
    cannot run, or C{None}.
    """
    if os.path.exists(python(cache)) and _works(cache):
        return None
    log(f"installing python-slimta 5 from PyPI into {cache}")  # type: ignore[operator]
    try:
        subprocess.run([sys.executable, "-m", "venv", cache], check=True, timeout=300)
        result = subprocess.run(
            [python(cache), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
            capture_output=True, text=True, timeout=900, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot make the slimta venv: {e}"
    if result.returncode != 0 or not _works(cache):
        lines = [
            line for line in (result.stdout + result.stderr).splitlines()
            if not line.startswith("WARNING: Location")
        ]  # fmt: skip
        return f"pip install python-slimta failed (PyPI unreachable?): {' | '.join(lines[-2:])}"
    return None


def command(cache: str, base: str, port: int, next_hop: int, max_size: int) -> list[str]:
    return [
        python(cache), "-W", "ignore", os.path.join(HERE, "slimta_relay.py"),
        "--port", str(port), "--next-hop", str(next_hop), "--dir", os.path.join(base, "slimta"),
        "--max-size", str(max_size),
    ]  # fmt: skip
