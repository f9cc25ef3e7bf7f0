"""
The durable spool: the on-disk format of entries, the directory layout
(shared with relayctl's offline reads), the group commit, the file-system
seam, the disk spool and the message writer.
"""
