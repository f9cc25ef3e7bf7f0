"""
Delivery: the scheduler that drains the active queue, the relay client that
speaks SMTP to next hops, next-hop resolution and bounces.
"""
