"""
The TLS policy of each hop, and where it came from.

The order (the first that applies wins):

 1. the plugin's choice for the envelope (C{EnvelopeWithNextHop.tls_policy});
 2. the C{--tls-policy} file: for mail routed by MX the recipient domain
    (C{example.com}, then its parents' C{.example.com} patterns), for a
    next hop (C{--smarthost}, the plugin's hops) C{[host]:port};
 3. DANE (RFC 7672), for MX hosts of a DNSSEC-validated MX answer with
    usable TLSA records (it wins over MTA-STS, RFC 8461 section 2);
 4. MTA-STS (RFC 8461), for mail routed by MX, mode C{enforce} or
    C{testing};
 5. C{--relay-tls} (C{may} by default).

The file and the plugin speak the same words (L{parse_policy}): C{none},
C{may}, C{encrypt}, C{verify} (with C{match=} names), C{dane} (DANE when
usable TLSA records are published, else on down the list), C{dane-only}
(DANE or nothing), C{mta-sts} (the domain's MTA-STS policy, else
C{--relay-tls}).

Mail to a next hop with no entry in the file costs nothing here: no DNS,
no fetch; DANE and MTA-STS are looked up for mail routed by MX only, and
for named next hops whose file entry says C{dane}, C{dane-only}.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from relay.delivery.client_tls import TLSPolicy
from relay.delivery.nexthop import Destination, parse_hop
from relay.model.entry import TLSOutcome
from relay.model.tls import POLICY_NAMES, PolicyRule, parse_policy

__all__ = [
    "POLICY_NAMES",
    "PolicyFile",
    "PolicyFileError",
    "PolicyRefused",
    "PolicyRule",
    "TLSCollector",
    "TLSCounts",
    "TLSPolicies",
    "parse_policy",
    "tls_destination",
]

#: The sources a policy comes from.
SOURCES = ("default", "file", "plugin", "dane", "mta-sts")


class PolicyFileError(ValueError):
    """
    The C{--tls-policy} file cannot be used; the message names the line.
    """


class PolicyFile:
    """
    The C{--tls-policy} file: one destination and its policy per line,
    C{#} comments, as Postfix's C{smtp_tls_policy_maps}::

        example.com         verify match=mx1.example.com:mx2.example.com
        .example.net        encrypt
        [smtp.corp]:587     verify
        legacy.example.org  may

    @ivar domains: exact domain -> rule.
    @ivar parents: C{.suffix} pattern (without the dot) -> rule.
    @ivar hops: C{host:port} -> rule.
    """

    def __init__(self, lines: Iterable[str] = (), origin: str = "tls-policy") -> None:
        self.domains: dict[str, PolicyRule] = {}
        self.parents: dict[str, PolicyRule] = {}
        self.hops: dict[str, PolicyRule] = {}
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            key, _, policy = text.replace("\t", " ").partition(" ")
            where = f"{origin}:{number}"
            try:
                rule = parse_policy(policy)
            except ValueError as e:
                raise PolicyFileError(f"{where}: {e}") from None
            key = key.lower().rstrip(".")
            if key.startswith("["):
                try:
                    host, port = parse_hop(key if "]:" in key else key + ":25")
                except ValueError:
                    raise PolicyFileError(f"{where}: bad next hop {key!r}") from None
                self.hops[_hop_key(host, port)] = rule
            elif key.startswith("."):
                if len(key) < 2:
                    raise PolicyFileError(f"{where}: bad pattern {key!r}")
                self.parents[key[1:]] = rule
            elif "." in key or key.isalnum():
                if "/" in key or ":" in key:
                    raise PolicyFileError(f"{where}: bad domain {key!r}")
                self.domains[key] = rule
            else:
                raise PolicyFileError(f"{where}: bad destination {key!r}")

    @classmethod
    def load(cls, path: str) -> PolicyFile:
        """
        @raise PolicyFileError: the file cannot be read, or a line is bad.
        """
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyFileError(f"{path}: {e}") from None
        return cls(lines, origin=path)

    def for_domain(self, domain: str) -> PolicyRule | None:
        """
        The rule of a recipient domain: its own, else the nearest parent
        pattern's (C{.example.com} covers C{a.b.example.com}, not
        C{example.com}).
        """
        domain = domain.lower().rstrip(".")
        rule = self.domains.get(domain)
        if rule is not None:
            return rule
        labels = domain.split(".")
        for i in range(1, len(labels)):
            rule = self.parents.get(".".join(labels[i:]))
            if rule is not None:
                return rule
        return None

    def for_hop(self, host: str, port: int) -> PolicyRule | None:
        return self.hops.get(_hop_key(host, port))

    def __bool__(self) -> bool:
        return bool(self.domains or self.parents or self.hops)


def _hop_key(host: str, port: int) -> str:
    return f"{host.lower().rstrip('.')}:{port}"


class PolicyRefused(Exception):
    """
    The policy keeps the message from this hop before any connection (an
    MX host not in the domain's MTA-STS policy, C{dane-only} without
    usable TLSA records, a TLSA lookup that failed).

    @ivar outcome: the attempt's L{TLSOutcome}.
    """

    def __init__(self, outcome: TLSOutcome) -> None:
        super().__init__(outcome.detail or outcome.result)
        self.outcome = outcome


class TLSCounts:
    """
    How TLS went, per policy, source and result: what the metrics show
    (L{TLSCollector}) and an operator alerts on.  Always counted (a dict
    increment per session), whether metrics are served or not.
    """

    def __init__(self) -> None:
        self.sessions: dict[tuple[str, str, str], int] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.sts_fetch: dict[str, int] = {}

    def count(self, outcome: TLSOutcome) -> None:
        key = (outcome.policy, outcome.source, outcome.result)
        self.sessions[key] = self.sessions.get(key, 0) + 1
        if outcome.failed:
            failure = (outcome.policy, outcome.result)
            self.failures[failure] = self.failures.get(failure, 0) + 1

    def sts_problem(self, result: str) -> None:
        self.sts_fetch[result] = self.sts_fetch.get(result, 0) + 1


class TLSCollector:
    """
    A C{prometheus_client} collector of L{TLSCounts}, for the relay's
    metrics registry:

     - C{relay_tls_sessions_total{policy,source,result}}: delivery
       attempts by the TLS policy that applied, where it came from, and
       the result (C{ok}, C{plain}, or a TLS-RPT result type);
     - C{relay_tls_failures_total{policy,result}}: the failures alone, by
       policy type and TLS-RPT result type (what to alert on);
     - C{relay_mta_sts_problems_total{result}}: MTA-STS policies that could
       not be had (C{sts-policy-fetch-error}, C{sts-policy-invalid}).
    """

    def __init__(self, counts: TLSCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        sessions = CounterMetricFamily(
            "relay_tls_sessions", "Delivery attempts by TLS policy, source and result.",
            labels=["policy", "source", "result"],
        )  # fmt: skip
        for (policy, source, result), n in sorted(self._counts.sessions.items()):
            sessions.add_metric([policy, source, result], float(n))
        yield sessions
        failures = CounterMetricFamily(
            "relay_tls_failures", "TLS policy failures by policy type and TLS-RPT result type.",
            labels=["policy", "result"],
        )  # fmt: skip
        for (policy, result), n in sorted(self._counts.failures.items()):
            failures.add_metric([policy, result], float(n))
        yield failures
        sts = CounterMetricFamily(
            "relay_mta_sts_problems", "MTA-STS policies that could not be had, by result type.",
            labels=["result"],
        )
        for result, n in sorted(self._counts.sts_fetch.items()):
            sts.add_metric([result], float(n))
        yield sts


def tls_destination(route: Any, tls_policy: str | None) -> Destination | None:
    """
    The L{Destination} of a route's hops, with the policy the plugin chose
    for the entry: what the scheduler hands the client with each hop.
    """
    destination = getattr(route, "destination", None)
    if destination is None:
        return Destination(None, chosen=tls_policy) if tls_policy else None
    if tls_policy is None:
        return destination  # type: ignore[no-any-return]
    return dataclasses.replace(destination, chosen=tls_policy)


class TLSPolicies:
    """
    Chooses the L{TLSPolicy} of each hop (the order is the module's).

    @param default: the C{--relay-tls} policy.
    @param policy_file: the C{--tls-policy} file, or C{None}.
    @param lookup: a L{relay.delivery.dns.DNSLookup} for TLSA records,
        when DANE is possible (a resolver declared with C{--dnssec}); else
        C{None} (DANE never applies).
    @param sts: an L{relay.delivery.mtasts.MTASTS}, or C{None}.
    @param counts: where outcomes are counted.
    """

    def __init__(
        self,
        default: TLSPolicy,
        *,
        policy_file: PolicyFile | None = None,
        lookup: Any = None,
        sts: Any = None,
        counts: TLSCounts | None = None,
    ) -> None:
        self.default = default
        self.file = policy_file if policy_file else None
        self._lookup = lookup
        self._sts = sts
        self.counts = counts if counts is not None else TLSCounts()

    def _policy(self, mode: str, source: str, name: str | None = None, **more: Any) -> TLSPolicy:
        return TLSPolicy(
            mode, self.default.trust_root, name=name, source=source,
            contexts=self.default.contexts, **more,
        )  # fmt: skip

    def _refuse(self, name: str, source: str, result: str, detail: str) -> PolicyRefused:
        outcome = TLSOutcome(name, source, result, detail)
        self.counts.count(outcome)
        return PolicyRefused(outcome)

    async def choose(self, hop: str, destination: Destination | None) -> TLSPolicy:
        """
        The policy of C{hop} for mail to C{destination}.

        @raise PolicyRefused: the policy says not to deliver to this hop.
        """
        if destination is None or (not destination.via_mx and self.file is None and not destination.chosen):
            return self.default
        host, port = parse_hop(hop)
        rule: PolicyRule | None = None
        source = "default"
        if destination.chosen:
            rule, source = parse_policy(destination.chosen), "plugin"
        elif self.file is not None:
            found = (
                self.file.for_domain(destination.domain)
                if destination.domain is not None
                else self.file.for_hop(host, port)
            )
            if found is not None:
                rule, source = found, "file"
        if rule is not None and rule.name in ("none", "may", "encrypt", "verify"):
            return self._policy(rule.name, source, match=rule.match)
        if rule is None and not destination.via_mx:
            return self.default
        if rule is None or rule.name in ("dane", "dane-only"):
            name = rule.name if rule is not None else "dane"
            dane, why_not = await self._dane(host, port, destination, name, source)
            if dane is not None:
                return dane
            if rule is not None and rule.name == "dane-only":
                raise self._refuse(
                    name, source, "dane-required",
                    why_not or f"no usable TLSA records for {host}",
                )  # fmt: skip
            if rule is not None:
                return self.default
        if destination.via_mx and self._sts is not None:
            sts = await self._mta_sts(host, destination.domain or "", source)
            if sts is not None:
                return sts
        return self.default

    async def _dane(
        self, host: str, port: int, destination: Destination, name: str, source: str
    ) -> tuple[TLSPolicy | None, str | None]:
        """
        The DANE policy of C{host}, or C{None} and why DANE does not apply.

        @raise PolicyRefused: the TLSA lookup failed (RFC 7672 section
            2.2: a temporary failure for this MX host).
        """
        if self._lookup is None:
            return None, "no DNSSEC-validating resolver (--resolver, --dnssec)"
        if destination.via_mx and not destination.mx_authenticated:
            # RFC 7672 section 2.2.1: TLSA records only count beneath a
            # validated MX answer.
            return None, f"the MX answer of {destination.domain} is not validated"
        from twisted.names.error import DNSNameError

        from relay.delivery.dane import tlsa_name, tlsa_records
        from relay.delivery.dns import TLSA

        dane_source = source if source != "default" else "dane"
        try:
            answer = await self._lookup.lookup(tlsa_name(host, port), TLSA)
        except DNSNameError:
            return None, f"no TLSA records for {host}"
        except Exception as e:
            raise self._refuse(
                name, dane_source, "dnssec-invalid", f"TLSA lookup for {host}: {e}"
            ) from None
        if not answer.authenticated:
            return None, f"the TLSA answer for {host} is not validated"
        if not answer.records:
            return None, f"no TLSA records for {host}"
        usable, unusable = tlsa_records(answer.records)
        if not usable:
            # RFC 7672 section 2.2: TLS, but no authentication.
            note = ("tlsa-invalid", f"none of the {unusable} TLSA records of {host} is usable")
            return self._policy("encrypt", dane_source, name=name, note=note), None
        return self._policy("dane", dane_source, name=name, tlsa=usable), None

    async def _mta_sts(self, host: str, domain: str, source: str) -> TLSPolicy | None:
        found = await self._sts.policy(domain)
        note = found.problem
        policy = found.policy
        if policy is None or policy.mode == "none":
            return dataclasses.replace(self.default, note=note) if note else None
        source = "mta-sts" if source == "default" else source
        enforced = policy.mode == "enforce"
        if not policy.matches(host):
            detail = f"MX host {host} is not in the MTA-STS policy of {domain}"
            if enforced:
                raise self._refuse("mta-sts", source, "validation-failure", detail)
            return dataclasses.replace(
                self.default, name="mta-sts", source=source, note=("validation-failure", detail)
            )
        return self._policy("verify", source, name="mta-sts", enforced=enforced, note=note)
