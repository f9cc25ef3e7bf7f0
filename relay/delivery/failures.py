"""
Failure classes: what kind of failure a failed or deferred delivery attempt
was (a bad mailbox, a full one, a spam block, ...), so that operators can
count and alert by kind rather than read raw replies (KumoMTA's bounce
classification; the classes are RFC 3463's subjects made practical).

A class comes from a table of rules, data that a user extends: the
enhanced status code first (RFC 3463, C{5.1.1}), the reply's text second
(for the codes that say little: C{5.7.1} is a spam block at Gmail and
relaying denied at Postfix), then the status code's subject (C{X.7.*}:
policy).  Rules are lines of C{CLASS KIND PATTERN} (L{parse_rules}); the
built-in table is L{BUILTIN_RULES}, in the same form.

The classes of the built-in table are L{CLASSES}; a user's rules may name
others (lower-case words and hyphens), which then appear in logs and
metric labels like the built-in ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from relay.model.entry import Attempt, TLSOutcome

#: The classes of the built-in table, each with what it means.
CLASSES: dict[str, str] = {
    "bad-mailbox": "the recipient's mailbox does not exist, or is disabled",
    "bad-domain": "the recipient's domain does not exist, takes no mail, or cannot be routed to",
    "mailbox-full": "the recipient's mailbox is over its quota",
    "message-too-large": "the message is larger than the hop or the mailbox takes",
    "spam-block": "refused as spam, or the sender's address or IP is blocklisted or of poor "
    "reputation",
    "policy": "refused by the receiver's rules: authentication (SPF, DKIM, DMARC, reverse DNS), "
    "relaying, the sender, greylisting",
    "rate-limited": "too much mail, too fast, or too many connections: the hop throttles",
    "dns-failure": "a DNS lookup failed (for now)",
    "tls-failure": "TLS could not be had or verified as the policy requires",
    "connection-failure": "no connection, a lost one, or no reply in time",
    "protocol-error": "the conversation broke the protocol, or the hop lacks an extension the "
    "message needs",
    "other": "none of the above",
}

#: The class of an attempt that no rule matched.
OTHER = "other"

#: The rule kinds, in the order they are tried.
KINDS = ("status", "text", "fallback")

BUILTIN_RULES = r"""
# Specific enhanced status codes (RFC 3463, 7372, 7505; * is any number).
bad-mailbox         status    *.1.1
bad-mailbox         status    *.1.3
bad-mailbox         status    *.1.6
bad-domain          status    *.1.2
mailbox-full        status    *.2.2
message-too-large   status    *.2.3
message-too-large   status    *.3.4
dns-failure         status    *.4.3
tls-failure         status    *.7.5
tls-failure         status    *.7.10
policy              status    *.7.23
policy              status    *.7.24
policy              status    *.7.25
policy              status    *.7.26
policy              status    *.7.27

# The reply's text (Python regular expressions, case-insensitive, searched
# in the whole reply: its code and status too), first match wins.
tls-failure         text      \bstarttls\b|\btls\b|\bssl\b|certificate|encryption (is )?(needed|required)
spam-block          text      spam|unsolicited|block ?list|black ?list|\bdnsbl\b|\brbl\b|reputation|complaints
spam-block          text      \[(bl|ts|tss)\d+\]|\bS3\d{3}\b|banned sending ip|traffic not accepted from this ip
spam-block          text      blocked using|(?<!not )\blisted (at|on|in|by)\b
policy              text      \bspf\b|\bdkim\b|\bdmarc\b|unauthenticated|not authenticated|authentication required
policy              text      sender address rejected|sender domain
mailbox-full        text      over ?quota|quota (exceeded|full)|(mailbox|inbox|mail ?box storage) (is )?(full|exceeded)|exceeded storage allocation
message-too-large   text      (message|mail) (is )?too (big|large)|message size|size limit|message length exceeds
bad-mailbox         text      no such (user|mailbox|recipient|address)|(user|recipient|mailbox|address) (is )?(unknown|not found)|unknown (user|recipient|mailbox)
bad-mailbox         text      (account|address|mailbox|user)( that you tried to reach)? (does not|doesn't) exist|recipientnotfound|mailbox unavailable
bad-mailbox         text      (doesn't|does not) have an? [\w.-]+ account|(account|mailbox) (is )?(disabled|inactive|suspended|deactivated)
bad-mailbox         text      5\.4\.1 .*access denied
bad-mailbox         text      not listed in .*(directory|address book)
bad-domain          text      null mx|accepts no mail|(no such|nonexistent|non-existent|unknown) domain|domain (name )?(not found|does not exist)|unrout(e)?able
rate-limited        text      too (many|fast|quickly)|rate limit|ratelimit|throttl|busy|resources temporarily unavailable|relay limit exceeded|receiving mail at a rate
policy              text      greylist|graylist
dns-failure         text      \bdns\b|dnslookuperror|name service|nxdomain|servfail|could not resolve|unable to resolve|unresolvable
connection-failure  text      connection (was )?(refused|reset|timed out|lost|closed|dropped)|connect to .* failed|timed out|timeout|no reply within|no route to host|unreachable
protocol-error      text      syntax|command (not )?(recognized|implemented)|unrecognized command|bad sequence|need (mail|rcpt)|protocol (violation|error)|pipelin
other               text      system problem|internal (server )?error
policy              text      relay(ing)? (access )?denied|not permitted|not allowed|not authorized|access denied|prohibit|polic(y|ies)|rejected|refused|blocked|denied

# When no rule above matched: the subject of the status code.
policy              fallback  *.1.7
policy              fallback  *.1.8
bad-mailbox         fallback  *.1.*
bad-mailbox         fallback  *.2.1
connection-failure  fallback  *.4.1
connection-failure  fallback  *.4.2
bad-domain          fallback  *.4.4
rate-limited        fallback  *.4.5
connection-failure  fallback  *.4.0
protocol-error      fallback  *.5.*
protocol-error      fallback  *.6.*
policy              fallback  *.7.*
"""

_CLASS_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_STATUS_PATTERN = re.compile(r"([245*])\.(\d{1,3}|\*)\.(\d{1,3}|\*)")
# The enhanced status code at the start of a reply's text, after the
# reply code when there is one ("550 5.1.1 ...", or relay's own "5.1.2 ...").
_STATUS = re.compile(r"(?:[245]\d\d[ -])?([245]\.\d{1,3}\.\d{1,3})(?=\s|$|[;:,.)\]])")
# The reply code and status that begin each further line of a multi-line
# reply as an attempt holds it ("... / 550 5.1.1 ..."): text patterns see
# the lines joined into one.
_CONTINUATION = re.compile(r" / [245]\d\d(?: [245]\.\d{1,3}\.\d{1,3})?(?: |$)")


class FailureRulesError(ValueError):
    """
    A table of failure rules that cannot be used: the message names the
    source and line.
    """


@dataclass(frozen=True)
class FailureRule:
    """
    One row of the table: attempts that match C{pattern} are of class
    C{failure_class}.

    @ivar kind: C{status}: C{pattern} is an enhanced status code, each of
        its three numbers possibly C{*} (C{5.1.1}, C{*.2.2}, C{4.7.*});
        C{text}: a regular expression (Python's, case-insensitive)
        searched in the reply (its code and status code too, continuation
        lines joined); C{fallback}: a status code pattern tried only when
        no C{text} rule matched.
    """

    failure_class: str
    kind: str
    pattern: str
    _status: tuple[str, str, str] | None = field(default=None, init=False, repr=False, compare=False)
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _CLASS_NAME.fullmatch(self.failure_class):
            raise ValueError(
                f"bad class name {self.failure_class!r}: lower-case letters, digits and hyphens"
            )
        if self.kind not in KINDS:
            raise ValueError(f"bad kind {self.kind!r}: one of {', '.join(KINDS)}")
        if self.kind == "text":
            try:
                regex = re.compile(self.pattern, re.IGNORECASE)
            except re.error as e:
                raise ValueError(f"bad regular expression {self.pattern!r}: {e}") from None
            object.__setattr__(self, "_regex", regex)
            return
        m = _STATUS_PATTERN.fullmatch(self.pattern)
        if m is None:
            raise ValueError(
                f"bad status code pattern {self.pattern!r}: like 5.1.1, *.2.2 or 4.7.*"
            )
        object.__setattr__(self, "_status", m.groups())

    def matches_status(self, status: tuple[str, str, str]) -> bool:
        assert self._status is not None
        return all(p == "*" or p == s for p, s in zip(self._status, status, strict=True))

    def matches_text(self, text: str) -> bool:
        assert self._regex is not None
        return self._regex.search(text) is not None


def parse_rules(text: str, source: str = "<rules>") -> list[FailureRule]:
    """
    The rules of a table: one per line, C{CLASS KIND PATTERN} separated by
    white space (a C{text} pattern is the rest of the line); blank lines
    and lines beginning with C{#} are skipped.

    @raise FailureRulesError: naming C{source} and the line.
    """
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) != 3:
            raise FailureRulesError(f"{source}, line {number}: expected CLASS KIND PATTERN")
        try:
            rules.append(FailureRule(parts[0], parts[1], parts[2]))
        except ValueError as e:
            raise FailureRulesError(f"{source}, line {number}: {e}") from None
    return rules


def load_rules(path: str) -> list[FailureRule]:
    """
    The rules of the file at C{path} (C{--failure-classes}).

    @raise FailureRulesError: when it cannot be read or parsed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FailureRulesError(f"{path}: {e}") from None
    return parse_rules(text, path)


def enhanced_status(reply: str) -> tuple[str, str, str] | None:
    """
    The enhanced status code at the start of C{reply} (after its reply
    code, if any), as three strings; C{None} when it has none.
    """
    m = _STATUS.match(reply)
    if m is None:
        return None
    a, b, c = m.group(1).split(".")
    return a, b, c


class FailureClassifier:
    """
    Classify failed attempts with a table: the given rules before the
    built-in ones, within each kind (every C{status} rule, then every
    C{text} rule, then every C{fallback} rule; the first that matches
    wins).  An attempt whose TLS outcome failed its policy is a
    C{tls-failure} whatever the reply; one that matches no rule is a
    C{connection-failure} when no reply came, else C{other}.

    @param rules: the user's rules (a plugin's, then C{--failure-classes}).
    """

    def __init__(self, rules: Iterable[FailureRule] = ()) -> None:
        table = [*rules, *parse_rules(BUILTIN_RULES, "the built-in table")]
        self._status = [r for r in table if r.kind == "status"]
        self._text = [r for r in table if r.kind == "text"]
        self._fallback = [r for r in table if r.kind == "fallback"]
        #: Every class the table can give (for metric labels made up front).
        self.classes: tuple[str, ...] = tuple(
            dict.fromkeys([*CLASSES, *(r.failure_class for r in table)])
        )

    def classify(self, code: int | None, reply: str, tls: TLSOutcome | None = None) -> str:
        """
        The class of a failure with reply C{code} (C{None}: no reply came)
        and C{reply} (the reply as text, or what went wrong).
        """
        if tls is not None and tls.failed:
            return "tls-failure"
        status = enhanced_status(reply)
        if status is not None:
            for rule in self._status:
                if rule.matches_status(status):
                    return rule.failure_class
        text = _CONTINUATION.sub(" ", reply)
        for rule in self._text:
            if rule.matches_text(text):
                return rule.failure_class
        if status is not None:
            for rule in self._fallback:
                if rule.matches_status(status):
                    return rule.failure_class
        return "connection-failure" if code is None and status is None else OTHER

    def classify_attempt(self, attempt: Attempt) -> str:
        """
        The class of a failed attempt.
        """
        return self.classify(attempt.code, attempt.reply, attempt.tls)


def plugin_rules(plugin: object) -> Sequence[FailureRule]:
    """
    The rules a plugin adds (its optional C{failure_rules()} method: a
    sequence of L{FailureRule}, or of C{(class, kind, pattern)} tuples).

    @raise FailureRulesError: when it gives something else.
    """
    method = getattr(plugin, "failure_rules", None)
    if not callable(method):
        return ()
    rules = []
    try:
        for rule in method():
            rules.append(rule if isinstance(rule, FailureRule) else FailureRule(*rule))
    except (TypeError, ValueError) as e:
        raise FailureRulesError(f"{plugin!r}.failure_rules(): {e}") from None
    return rules
