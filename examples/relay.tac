# A relay deployed from a .tac file:  twistd -n -y examples/relay.tac
#
# Every option of `twistd relay` is a keyword of relay.service.makeService.
from twisted.application import service

from relay.service import makeService

application = service.Application("relay")

makeService(
    smtp=["tcp:8025:interface=127.0.0.1"],
    spool="spool",
    quarantine="quarantine",
    callbacks="relay.simple.Simple",
    # smarthost="mail.example.com:25",
    retry_intervals=[60, 300, 1800, 3600, 4 * 3600],
    max_message_size=35_000_000,
    idle_timeout=300.0,
).setServiceParent(application)
