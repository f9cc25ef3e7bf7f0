"""
The SMTP server side: the ESMTP protocol that drives the plugin callbacks,
the DATA decoder and dot-stuffing, the PROXY protocol, server TLS and the
eager writer.
"""
