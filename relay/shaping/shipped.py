"""
The providers and reply rules a shaping file is laid over (unless it says
C{shipped = false}): the MX suffixes of the largest mailbox providers, and
rules for the replies they are known to give a sender they want slower.

These are examples, not truth: providers change their words and their
limits without notice, and what one sender gets is not what another does.
They limit nothing by themselves (the providers take the C{[default]}
limits); they only group each provider's domains into one budget and act
on the replies below.  A file overrides a provider by naming it, adds its
own rules after these, or starts empty with C{shipped = false}.
"""

from __future__ import annotations

#: the shipped defaults, in the shaping file's own form
SHIPPED_TEXT = r"""
[provider.google]
mx_suffix = [".google.com", ".googlemail.com"]

[provider.yahoo]
mx_suffix = [".yahoodns.net"]

[provider.microsoft]
mx_suffix = [".protection.outlook.com", ".olc.protection.outlook.com"]

# Gmail: "421-4.7.28 ... unusual rate of unsolicited mail originating
# from your IP address": send slower for a while.
[[rule]]
destination = "google"
match = '^4\d\d 4\.7\.28 '
action = "slow"
rate = "60/min"
for = "30m"

# Yahoo: "421 4.7.0 [TS01] / [TSS04] Messages from ... temporarily
# deferred due to unexpected volume or user complaints".
[[rule]]
destination = "yahoo"
match = '\[TSS?0[1-4]\]'
action = "suspend"
for = "1h"

# Microsoft: "451 4.7.650 The mail server [...] has been temporarily rate
# limited due to IP reputation".
[[rule]]
destination = "microsoft"
match = '4\.7\.650'
action = "suspend"
for = "30m"
"""
