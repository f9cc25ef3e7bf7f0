"""
A private Postfix instance for the benchmark: its own configuration, queue
and data directories under a temporary directory, started with
C{postfix -c DIR}, listening on one 127.0.0.1 port only and relaying
everything to one loopback next hop.

Postfix's rules this has to satisfy: a configuration directory other than
/etc/postfix is accepted from root without C{alternate_config_directories};
the queue and data directories must be owned by C{mail_owner} (C{postfix}),
which C{postfix -c DIR set-permissions} arranges (C{postfix check} creates the
queue subdirectories); C{maillog_file} must lie under C{maillog_file_prefixes};
and no service is chrooted, so the queue directory needs no copy of /etc.
Postfix prints its fatal errors to a terminal only, so failures are reported
with the tail of the private maillog.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Mapping

#: The master.cf services a relay-only instance needs, none chrooted.  The
#: SMTP service line is added with the loopback address and port.
MASTER_CF = """\
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
local      unix  - n n -     - local
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


class PostfixError(Exception):
    """
    Postfix could not be configured, started or stopped.
    """


def available() -> str | None:
    """
    Why a private Postfix cannot run here, or C{None} if it can.
    """
    if shutil.which("postfix") is None or shutil.which("postconf") is None:
        return "postfix is not installed (make deb-tools)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    return None


def version() -> str:
    try:
        out = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


class Postfix:
    """
    One private Postfix instance in C{base}.

    @ivar port: the loopback port its smtpd listens on.
    @ivar next_hop: the loopback port of the relayhost (the sink).
    """

    def __init__(
        self,
        base: str,
        port: int,
        next_hop: int,
        message_size_limit: int,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """
        @param settings: main.cf parameters added to (or replacing) the
            relay-only ones, e.g. C{defer_transports} to hold mail.
        """
        self.base = os.path.abspath(base)
        self.port = port
        self.next_hop = next_hop
        self.config = os.path.join(self.base, "etc")
        self.queue = os.path.join(self.base, "queue")
        self.data = os.path.join(self.base, "data")
        self.maillog = os.path.join(self.base, "maillog")
        self.message_size_limit = message_size_limit
        self.settings = dict(settings or {})

    def write_config(self) -> None:
        for path in (self.config, self.queue, self.data):
            os.makedirs(path, exist_ok=True)
        # The data directory (master.lock, caches) belongs to mail_owner,
        # which must also be able to reach it.
        os.chmod(self.base, 0o755)
        owner = pwd.getpwnam("postfix")
        os.chown(self.data, owner.pw_uid, owner.pw_gid)
        os.chmod(self.data, 0o700)
        main_cf = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            # Loopback only: the master.cf service is bound to 127.0.0.1 too.
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.bench.invalid",
            "mydestination": "",
            "local_transport": "error:local delivery is disabled",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{self.next_hop}",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtpd_peername_lookup": "no",
            "smtp_host_lookup": "native",
            "disable_dns_lookups": "yes",
            "message_size_limit": str(self.message_size_limit),
            "mailbox_size_limit": "0",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.base,
            "alias_maps": "",
            "alias_database": "",
        }
        main_cf.update(self.settings)
        with open(os.path.join(self.config, "main.cf"), "w") as f:
            f.writelines(f"{key} = {value}\n" for key, value in main_cf.items())
        with open(os.path.join(self.config, "master.cf"), "w") as f:
            f.write(f"127.0.0.1:{self.port} inet n - n - - smtpd\n")
            f.write(MASTER_CF)

    def _postfix(self, *command: str, timeout: float = 60) -> None:
        try:
            result = subprocess.run(
                ["postfix", "-c", self.config, *command],
                capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise PostfixError(f"postfix {' '.join(command)}: no answer in {timeout} s") from e
        if result.returncode != 0:
            raise PostfixError(
                f"postfix {' '.join(command)} exited {result.returncode}: "
                f"{(result.stdout + result.stderr).strip()} {self.log_tail()}"
            )

    def queue_files(self, queue: str) -> int:
        """
        How many files the queue C{queue} (C{deferred}, C{active}, ...)
        holds, in its hashed subdirectories too: names only.
        """
        total = 0
        for _, _, files in os.walk(os.path.join(self.queue, queue)):
            total += len(files)
        return total

    def command(self, name: str, *args: str) -> list[str]:
        """
        The command line of the Postfix tool C{name} (C{postqueue},
        C{postsuper}, C{qshape}) for this instance.
        """
        return [name, "-c", self.config, *args]

    def log_tail(self, lines: int = 8) -> str:
        try:
            with open(self.maillog, errors="replace") as f:
                return " | ".join(f.read().splitlines()[-lines:])
        except OSError:
            return "(no maillog)"

    def check_loopback_only(self) -> None:
        """
        Refuse to start unless the effective configuration listens on
        loopback only.
        """
        out = subprocess.run(
            ["postconf", "-c", self.config, "-h", "inet_interfaces"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        services = subprocess.run(
            ["postconf", "-c", self.config, "-F", "*/inet/service"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        listen = [line.partition("=")[2].strip() for line in services.stdout.splitlines()]
        if (
            out.stdout.strip() != "127.0.0.1"
            or not listen
            or any(not s.startswith("127.0.0.1:") for s in listen)
        ):
            raise PostfixError(
                f"refusing to start: inet_interfaces={out.stdout.strip()!r}, services={listen}"
            )

    def start(self, prepare: bool = True) -> int:
        """
        Configure and start the instance; return the master's pid.

        @param prepare: create the queue directories and set their
            permissions first; C{False} to start an instance that ran
            before (C{set-permissions} walks the queue, slow when it holds
            a backlog).
        """
        self.write_config()
        self.check_loopback_only()
        if prepare:
            self._postfix("check")
            self._postfix("set-permissions")
        self._postfix("start")
        pidfile = os.path.join(self.queue, "pid", "master.pid")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with open(pidfile) as f:
                    return int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
        raise PostfixError(f"no master pid in {pidfile} after 30 s {self.log_tail()}")

    def stop(self, master: int | None) -> None:
        """
        Stop the instance, forcibly if it does not stop within 30 seconds.
        """
        try:
            self._postfix("stop", timeout=30)
        except PostfixError:
            try:
                self._postfix("abort", timeout=30)
            except PostfixError:
                pass
        if master is None:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(master):
            time.sleep(0.1)
