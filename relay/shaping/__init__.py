"""
Traffic shaping: per-destination limits, reply rules, suspensions and
source addresses (C{--shaping FILE}, C{--bind-address}).

The parts, one module each: C{config} (the file and its values:
L{Limits}, L{ShapingConfig}, L{load}), C{rate} (rates and token buckets),
C{shipped} (the providers and reply rules laid under every file),
C{shaper} (the budgets at run time: L{Shaper.admit}), C{suspensions}
(suspended destinations, kept in the spool directory), C{reloading}
(SIGHUP).  The delivery scheduler asks the shaper before each delivery;
the relay client applies the connection part (source, HELO name, messages
per connection, connection rate).
"""

from relay.shaping.config import Limits, ShapingConfig, ShapingFileError, load, parse
from relay.shaping.rate import Rate, parse_rate
from relay.shaping.shaper import Shaper, Wait
from relay.shaping.suspensions import Suspension, Suspensions

__all__ = [
    "Limits",
    "Rate",
    "ShapingConfig",
    "ShapingFileError",
    "Shaper",
    "Suspension",
    "Suspensions",
    "Wait",
    "load",
    "parse",
    "parse_rate",
]
