"""
The SMTP server side: the factory and its settings (L{relay.smtp.server}),
the session's core (L{relay.smtp.protocol}) and its parts (commands,
transaction, incoming, auth, starttls, timers, callbacks), the DATA decoder
and dot-stuffing, the PROXY protocol, server TLS and the eager writer.
"""
