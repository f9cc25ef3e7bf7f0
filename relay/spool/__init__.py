"""
The durable spool, one module per job:

  - L{relay.spool.commit}: what is made durable, and when (the group
    commit, the batched finish, update, move, recovery).  Read its
    docstring first: it is the product's first promise.
  - L{relay.spool.disk}: L{DiskSpool<relay.spool.disk.DiskSpool>}, the
    L{ISpool<relay.interfaces.ISpool>} over a spool directory.
  - L{relay.spool.layout}: where everything is in a spool directory
    (shared with relayctl's reads of a spool no relay runs on).
  - L{relay.spool.codec}: the entries' format, versioned.
  - L{relay.spool.reader}: reading entries and messages (the disk spool
    and relayctl).
  - L{relay.spool.fs}: the file-system seam every change goes through.
  - L{relay.spool.lock}: one relay per spool.
  - L{relay.spool.writer}: receiving a message, spilling large ones.
  - L{relay.spool.recent}: the disk spool's read cache.
  - L{relay.spool.memory}: L{MemorySpool<relay.spool.memory.MemorySpool>},
    an in-memory L{ISpool<relay.interfaces.ISpool>}.
  - L{relay.spool.observed}: L{ObservedSpool<relay.spool.observed.ObservedSpool>},
    a spool that tells an L{ISpoolObserver<relay.interfaces.ISpoolObserver>}
    of its commits.
"""
