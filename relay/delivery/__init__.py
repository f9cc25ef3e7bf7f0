"""
Delivery: the scheduler that drains the active queue (C{scheduler}), the
relay client that speaks SMTP to next hops (C{client}, with its parts in
the C{client_*} modules), next-hop resolution (C{nexthop}) and bounces
(C{bounce}).
"""
