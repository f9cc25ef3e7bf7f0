"""
The control plane, one module per job:

  - L{relay.control.rpc}: the AMP commands (listings stream: read its
    docstring for the flow control).
  - L{relay.control.server}: their responders, over the spool and the
    scheduler.
  - L{relay.control.filters}: which entries an operator means.
  - L{relay.control.actions}: what freeze, send, send-now, remove and
    recover do to one entry.
  - L{relay.control.summary}: the qshape-like tally.
  - L{relay.control.formats}: how relayctl prints entries, counts and one
    entry.
  - L{relay.control.client}: relayctl's end of the connection.
  - L{relay.control.ctl}: relayctl itself.
  - L{relay.control.events}: the live event stream.
  - L{relay.control.metrics}: the Prometheus metrics.
"""
