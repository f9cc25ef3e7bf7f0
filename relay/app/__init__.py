"""
The process wiring: the configuration as one value (L{settings}), building
the relay from it once (L{build}, L{services}), the receiver processes
(L{pool} on the master's side, L{receiver} the child, L{channel} what they
say), SIGHUP reloads (L{reload}), and every use of a Twisted private API
(L{_compat}).
"""
