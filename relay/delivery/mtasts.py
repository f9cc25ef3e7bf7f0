"""
MTA-STS (RFC 8461): a domain's published TLS policy for the mail sent to
it, found through DNS (C{_mta-sts.DOMAIN} TXT, whose C{id} says when the
policy changed) and fetched over HTTPS
(C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt}).

L{MTASTS.policy} gives the policy in force for a domain: the cached one
while it is fresh (its C{max_age} not passed) and the TXT record's id has
not changed, else a newly fetched one; a fetch that fails keeps the cached
policy (section 5.1), and with none cached the domain has no policy.
Policies are cached in memory and on disk (L{PolicyStore}: one JSON file
per domain in C{<spool>/mta-sts/}), so that a restart does not forget a
domain's policy, which is what makes MTA-STS resist an attacker who hides
the TXT record.

The fetch (L{PolicyFetcher}) uses twisted.web's C{Agent}: the policy host's
certificate is verified (the platform's trust store and C{--tls-ca-file}),
redirects are not followed (section 3.3), the body is cut off past
L{MAX_POLICY_BYTES} and the whole fetch past L{FETCH_TIMEOUT} seconds.
treq would add a dependency for the size limit and timeout written here
in a few lines.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: RFC 8461 section 3.3: a policy body larger than this is refused.
MAX_POLICY_BYTES = 64 * 1024
#: Seconds the whole fetch may take (connection, TLS, headers and body).
FETCH_TIMEOUT = 30.0
#: RFC 8461 section 3.2: max_age is at most a year.
MAX_AGE_LIMIT = 31_557_600
#: Seconds a domain whose policy could not be had is not asked again for.
RETRY_AFTER_FAILURE = 300.0
#: Domains kept in memory at most (the disk keeps them all).
MEMORY_SIZE = 10_000

MODES = ("enforce", "testing", "none")


class PolicyError(Exception):
    """
    A policy, or a TXT record, that does not parse; or a fetch that failed.

    @ivar result: TLS-RPT's result type: C{sts-policy-invalid} or
        C{sts-policy-fetch-error}.
    """

    def __init__(self, message: str, result: str = "sts-policy-invalid") -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class STSPolicy:
    """
    A domain's MTA-STS policy.

    @ivar id: the TXT record's id when it was fetched.
    @ivar mode: C{enforce}, C{testing} or C{none}.
    @ivar mx: the MX host patterns (C{mx.example.com}, C{*.example.com}).
    @ivar max_age: seconds it may be cached.
    @ivar fetched_at: when it was fetched.
    """

    id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float

    def fresh(self, now: float) -> bool:
        return now < self.fetched_at + self.max_age

    def matches(self, host: str) -> bool:
        """
        Does the MX host C{host} match one of the patterns (RFC 8461
        section 4.1: a C{*.} wildcard stands for one leftmost label)?
        """
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                head, _, rest = host.partition(".")
                if head and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "mode": self.mode, "mx": list(self.mx),
            "max_age": self.max_age, "fetched_at": self.fetched_at,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> STSPolicy:
        return cls(
            str(data["id"]), str(data["mode"]), tuple(str(m) for m in data["mx"]),
            int(data["max_age"]), float(data["fetched_at"]),
        )  # fmt: skip


_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


def parse_txt(texts: Sequence[str]) -> str | None:
    """
    The policy id of a domain's C{_mta-sts} TXT records (the strings of
    each record joined), or C{None} when there is no MTA-STS record.

    @raise PolicyError: when there is more than one, or it is malformed
        (RFC 8461 section 3.1: then the domain has no policy, as with none).
    """
    records = [t for t in texts if t.startswith("v=STSv1")]
    if not records:
        return None
    if len(records) > 1:
        raise PolicyError("more than one STSv1 TXT record")
    fields: dict[str, str] = {}
    for item in records[0].split(";"):
        key, sep, value = item.strip().partition("=")
        if not key and not sep:
            continue
        if not sep:
            raise PolicyError(f"malformed TXT record field {item.strip()!r}")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("v") != "STSv1":
        raise PolicyError("the TXT record does not start with v=STSv1")
    ident = fields.get("id", "")
    if not _ID.match(ident):
        raise PolicyError(f"bad policy id {ident!r} in the TXT record")
    return ident


def parse_policy(body: str, ident: str, now: float) -> STSPolicy:
    """
    The policy in C{body} (RFC 8461 section 3.2: C{key: value} lines).

    @raise PolicyError: when a required field is missing or bad.
    """
    version = mode = max_age = None
    mx: list[str] = []
    for line in body.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"malformed policy line {line!r}")
        key, value = key.strip(), value.strip()
        if key == "version" and version is None:
            version = value
        elif key == "mode" and mode is None:
            mode = value
        elif key == "max_age" and max_age is None:
            max_age = value
        elif key == "mx":
            mx.append(value.lower().rstrip("."))
    if version != "STSv1":
        raise PolicyError(f"policy version {version!r}, not STSv1")
    if mode not in MODES:
        raise PolicyError(f"policy mode {mode!r}")
    if max_age is None or not max_age.isdigit() or len(max_age) > 10:
        raise PolicyError(f"policy max_age {max_age!r}")
    if mode != "none" and not mx:
        raise PolicyError("policy without mx patterns")
    return STSPolicy(ident, mode, tuple(mx), min(int(max_age), MAX_AGE_LIMIT), now)


class _LimitedBody(Protocol):
    """
    Collects a response body up to a limit; more fails the fetch.
    """

    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self._done = done
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._error: PolicyError | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._error = PolicyError(
                f"policy larger than {self._limit} bytes", "sts-policy-fetch-error"
            )
            # The fetch fails once the connection is gone (connectionLost).
            assert self.transport is not None
            self.transport.loseConnection()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._done.called:
            return
        if self._error is not None:
            self._done.errback(self._error)
            return
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(PolicyError(
                f"policy body: {reason.getErrorMessage()}", "sts-policy-fetch-error"
            ))  # fmt: skip


class _VerifiedHTTPS:
    """
    twisted.web's C{IPolicyForHTTPS}: the policy host's certificate must be
    from the trust roots and name the host; the handshake fails otherwise.
    """

    def __init__(self, contexts: Any) -> None:
        self._contexts = contexts

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        from relay.delivery.client_tls import HopConnectionCreator, webpki_problem

        host = hostname.decode("ascii")

        def check(connection: Any) -> str | None:
            problem = webpki_problem(self._contexts, connection, (host,))
            return None if problem is None else f"{problem[0]}: {problem[1]}"

        return HopConnectionCreator(self._contexts.verifying(), host, on_handshake=check)


class PolicyFetcher:
    """
    Fetches policies over HTTPS with twisted.web's C{Agent}.

    @param reactor: the reactor (TCP, time).
    @param contexts: the client's L{relay.delivery.client_tls.TLSContexts}
        (their trust roots verify the policy host).
    @param port: the HTTPS port (443; tests use another).
    @param name_resolver: the C{IHostnameResolver} of policy hosts (the
        C{--resolver} servers); C{None}: the reactor's.
    """

    def __init__(
        self,
        reactor: Any,
        contexts: Any,
        *,
        port: int = 443,
        name_resolver: Any = None,
        timeout: float = FETCH_TIMEOUT,
        limit: int = MAX_POLICY_BYTES,
    ) -> None:
        from zope.interface import directlyProvides

        from relay.delivery.dns import ResolvingReactor

        self._reactor = reactor
        self._connecting = (
            ResolvingReactor(reactor, name_resolver) if name_resolver is not None else reactor
        )
        self._port = port
        self._timeout = timeout
        self._limit = limit
        self._https = _VerifiedHTTPS(contexts)
        from twisted.web.iweb import IPolicyForHTTPS

        directlyProvides(self._https, IPolicyForHTTPS)
        self._agent: Any = None

    def url(self, domain: str) -> str:
        port = "" if self._port == 443 else f":{self._port}"
        return f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt"

    def fetch(self, domain: str) -> Deferred[str]:
        """
        The body of C{domain}'s policy.

        @return: a Deferred failing with L{PolicyError}
            (C{sts-policy-fetch-error}) for any failure.
        """
        d = Deferred.fromCoroutine(self._fetch(domain))
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._reactor.callLater(self._timeout, expire)

        def failed(failure: Failure) -> Failure:
            if timed_out:
                # Cancelling shows as whatever was under way (the
                # connection, the body): the reason is the timeout.
                raise PolicyError(
                    f"no policy from {self.url(domain)} within {self._timeout} seconds",
                    "sts-policy-fetch-error",
                )
            if failure.check(PolicyError):
                return failure
            raise PolicyError(
                f"fetching {self.url(domain)}: {failure.getErrorMessage() or failure.type.__name__}",
                "sts-policy-fetch-error",
            )

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done).addErrback(failed)

    async def _fetch(self, domain: str) -> str:
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.http_headers import Headers

        if self._agent is None:
            # A policy is fetched once a day or so: no connection is kept.
            pool = HTTPConnectionPool(self._connecting, persistent=False)
            self._agent = Agent(self._connecting, contextFactory=self._https, pool=pool)
        response = await self._agent.request(
            b"GET", self.url(domain).encode("ascii"), Headers({b"User-Agent": [b"relay"]})
        )
        if response.code != 200:
            response.deliverBody(_Discard())
            raise PolicyError(f"{self.url(domain)} answered {response.code}", "sts-policy-fetch-error")
        kinds = response.headers.getRawHeaders(b"content-type") or [b""]
        if not kinds[0].split(b";")[0].strip().lower() == b"text/plain":
            response.deliverBody(_Discard())
            raise PolicyError(
                f"{self.url(domain)} is {kinds[0].decode('latin-1')!r}, not text/plain",
                "sts-policy-invalid",
            )
        if response.length is not None and isinstance(response.length, int) and response.length > self._limit:
            response.deliverBody(_Discard())
            raise PolicyError(f"policy larger than {self._limit} bytes", "sts-policy-fetch-error")
        done: Deferred[bytes] = Deferred()
        response.deliverBody(_LimitedBody(done, self._limit))
        body = await done
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError("policy is not UTF-8", "sts-policy-invalid") from None


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


_SAFE_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class PolicyStore:
    """
    The policies on disk: C{<directory>/<domain>.json}, written to a
    temporary file and renamed (a crash leaves the old policy or the new),
    read and written through C{run_in_thread}.
    """

    def __init__(self, directory: str, run_in_thread: Callable[..., Deferred[Any]]) -> None:
        self.directory = directory
        self._run = run_in_thread

    def _path(self, domain: str) -> str | None:
        if not _SAFE_DOMAIN.match(domain) or ".." in domain:
            return None
        return os.path.join(self.directory, domain + ".json")

    def load(self, domain: str) -> Deferred[STSPolicy | None]:
        return self._run(self._load, domain)

    def _load(self, domain: str) -> STSPolicy | None:
        path = self._path(domain)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                return STSPolicy.from_json(json.loads(f.read()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warn("Cached MTA-STS policy {path} unreadable: {error}", path=path, error=str(e))
            return None

    def save(self, domain: str, policy: STSPolicy) -> Deferred[None]:
        return self._run(self._save, domain, policy)

    def _save(self, domain: str, policy: STSPolicy) -> None:
        path = self._path(domain)
        if path is None:
            return
        os.makedirs(self.directory, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(policy.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@dataclass(frozen=True)
class STSResult:
    """
    What L{MTASTS.policy} found for a domain.

    @ivar policy: the policy in force, or C{None}.
    @ivar problem: what went wrong on the way, as C{(TLS-RPT result type,
        detail)}, even when a cached policy stays in force.
    """

    policy: STSPolicy | None
    problem: tuple[str, str] | None = None


class MTASTS:
    """
    The MTA-STS policies of recipient domains.

    @param lookup: a L{relay.delivery.dns.DNSLookup} (for the TXT record).
    @param fetcher: a L{PolicyFetcher}.
    @param store: a L{PolicyStore}, or C{None} to keep policies in memory
        only.
    @param clock: an C{IReactorTime}.
    @param on_problem: called with the TLS-RPT result type of each policy
        that could not be had (for the metrics).
    """

    def __init__(
        self,
        lookup: Any,
        fetcher: Any,
        store: PolicyStore | None,
        clock: Any,
        on_problem: Callable[[str], None] | None = None,
    ) -> None:
        self._on_problem = on_problem
        self._lookup = lookup
        self._fetcher = fetcher
        self._store = store
        self._clock = clock
        self._memory: dict[str, STSPolicy | None] = {}
        self._failed_until: dict[str, tuple[float, STSResult]] = {}
        # One fetch per domain at a time: the others wait for it.
        self._pending: dict[str, list[Deferred[STSResult]]] = {}

    def policy(self, domain: str) -> Deferred[STSResult]:
        """
        The policy in force for C{domain}.
        """
        domain = domain.lower().rstrip(".")
        waiting: Deferred[STSResult] = Deferred()
        waiters = self._pending.get(domain)
        if waiters is not None:
            waiters.append(waiting)
            return waiting
        self._pending[domain] = [waiting]
        Deferred.fromCoroutine(self._policy(domain)).addBoth(self._settled, domain)
        return waiting

    def _settled(self, result: STSResult | Failure, domain: str) -> None:
        for waiting in self._pending.pop(domain, []):
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)

    async def _cached(self, domain: str) -> STSPolicy | None:
        if domain in self._memory:
            return self._memory[domain]
        policy = await self._store.load(domain) if self._store is not None else None
        if len(self._memory) >= MEMORY_SIZE:
            del self._memory[next(iter(self._memory))]
        self._memory[domain] = policy
        return policy

    async def _policy(self, domain: str) -> STSResult:
        now = self._clock.seconds()
        cached = await self._cached(domain)
        if cached is not None and not cached.fresh(now):
            cached = None
        failed = self._failed_until.get(domain)
        if failed is not None:
            if failed[0] > now:
                return STSResult(cached, failed[1].problem) if cached else failed[1]
            del self._failed_until[domain]
        try:
            ident = await self._txt(domain)
        except PolicyError as e:
            return self._failure(domain, cached, (e.result, str(e)))
        if ident is None or (cached is not None and cached.id == ident):
            # No record (an attacker may hide it: a fresh policy stays in
            # force, section 5.1), or the policy did not change.
            return STSResult(cached)
        try:
            body = await self._fetcher.fetch(domain)
            policy = parse_policy(body, ident, self._clock.seconds())
        except PolicyError as e:
            return self._failure(domain, cached, (e.result, str(e)))
        self._memory[domain] = policy
        if self._store is not None:
            try:
                await self._store.save(domain, policy)
            except Exception:
                log.failure("Cannot cache the MTA-STS policy of {domain}", domain=domain)
        return STSResult(policy)

    def _failure(self, domain: str, cached: STSPolicy | None, problem: tuple[str, str]) -> STSResult:
        log.info(
            "MTA-STS policy of {domain}: {result}: {detail}{kept}",
            domain=domain, result=problem[0], detail=problem[1],
            kept="; the cached policy stays in force" if cached else "",
            event="mta-sts", tls_result=problem[0],
        )  # fmt: skip
        if self._on_problem is not None:
            self._on_problem(problem[0])
        result = STSResult(None, problem)
        self._failed_until[domain] = (self._clock.seconds() + RETRY_AFTER_FAILURE, result)
        return STSResult(cached, problem)

    async def _txt(self, domain: str) -> str | None:
        from twisted.names import dns
        from twisted.names.error import DNSNameError

        try:
            answer = await self._lookup.lookup(f"_mta-sts.{domain}", dns.TXT)
        except DNSNameError:
            return None
        except Exception as e:
            raise PolicyError(f"TXT lookup: {e}", "sts-policy-fetch-error") from None
        texts = []
        for record in answer.records:
            data = getattr(record, "data", ())
            texts.append(b"".join(data).decode("utf-8", "replace"))
        return parse_txt(texts)
