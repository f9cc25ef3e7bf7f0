"""
The peers that C{bench/run.py} measures relay against: a private Postfix
instance (L{peers.postfix}) and two accept-only servers that write and fsync
each message before replying (run as their own processes).
"""
