"""
Signing accepted mail before it is spooled: L{DkimSigner}, which the SMTP
server calls with the envelopes C{process_envelope} answered with (see
L{relay.smtp.incoming}), once per message and before the commit, so that
the bytes stored are the bytes that go out (and a receiver process signs
what it receives).

Which keys sign: by default those of the C{From:} domain, or of its
nearest parent domain in the keys file (L{relay.dkim.keys.KeyTable.keys_for});
a plugin decides otherwise per envelope with
C{EnvelopeWithNextHop(..., dkim=False)} (not signed) or C{dkim="example.com"}
(signed with that domain's keys).

The reactor only decides; the work is done in the thread pool.  A message
held in memory (up to the spool's spill threshold, 256 KiB) is signed in
one trip there, the signature fields put before its bytes.  A message
spilled to a file is read twice, a chunk at a time: once to hash it and
sign, once to copy it, after the signature fields, into a new message of
the spool (its writer, with back-pressure), so that memory stays flat
whatever its size.  The signed message has CRLF line endings throughout
and a final CRLF, as the relay client sends it (L{relay.smtp.stuffing.CRLFLines}).
"""

from __future__ import annotations

import dataclasses
import email.utils
from typing import Any, BinaryIO, Callable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.app.reload import ReloadError
from relay.dkim.canonical import HeaderSectionTooLarge, SigningInput
from relay.dkim.keys import DkimKey, DkimKeysError, KeyTable, load_keys, normalize_domain
from relay.dkim.signature import Unsignable, signature_fields
from relay.dkim.signing import Signing
from relay.interfaces import IReloadable
from relay.model.envelope import EnvelopeWithNextHop
from relay.model.message import Message, parse_header_block
from relay.smtp.stuffing import CRLFLines

#: Bytes read from a message file per trip to the thread pool.
CHUNK_SIZE = 256 * 1024


def from_domain(message: Message) -> str | None:
    """
    The domain of the (first) address in the message's C{From:} field,
    as L{normalize_domain} makes it, or C{None} when there is none.
    """
    value = message.header("From")
    if value is None:
        return None
    for _, address in email.utils.getaddresses([value]):
        local, at, domain = address.rpartition("@")
        if at and local and domain:
            try:
                return normalize_domain(domain)
            except ValueError:
                return None
    return None


def sign_bytes(
    keys: Sequence[DkimKey], data: bytes, timestamp: int
) -> tuple[bytes, bytes]:
    """
    Sign a message held in memory.  Blocking: in the thread pool.

    @return: the signature fields and the message with its line endings
        made CRLF (what follows the fields).
    @raise Unsignable: when it cannot be signed.
    """
    endings = CRLFLines()
    data = endings.encode(data) + endings.finish()
    message = SigningInput()
    try:
        message.update(data)
        header_section, body_hash = message.finish()
    except HeaderSectionTooLarge as e:
        raise Unsignable(str(e)) from None
    return signature_fields(keys, header_section, body_hash, timestamp), data


def sign_file(keys: Sequence[DkimKey], path: str, timestamp: int) -> bytes:
    """
    Sign a message held in a file, reading it a chunk at a time.
    Blocking: in the thread pool.

    @return: the signature fields.
    @raise Unsignable: when it cannot be signed.
    """
    endings = CRLFLines()
    message = SigningInput()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                message.update(endings.encode(chunk))
        message.update(endings.finish())
        header_section, body_hash = message.finish()
    except HeaderSectionTooLarge as e:
        raise Unsignable(str(e)) from None
    return signature_fields(keys, header_section, body_hash, timestamp)


class _Reader:
    """
    A message file read a chunk at a time, each read a trip to the thread
    pool (opening on the first).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._file: BinaryIO | None = None

    def read(self) -> bytes:
        if self._file is None:
            self._file = open(self._path, "rb")
        return self._file.read(CHUNK_SIZE)

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()


@implementer(IReloadable)
class DkimSigner:
    """
    Signs the messages of accepted envelopes with the keys of a keys file,
    which SIGHUP reads again (L{IReloadable}).

    @ivar table: the keys in use.
    @ivar path: the keys file (C{None}: a table made in code, not
        reloaded).
    """

    what = "DKIM keys"

    def __init__(
        self,
        table: KeyTable,
        clock: IReactorTime,
        run_in_thread: Callable[..., Deferred[Any]],
    ) -> None:
        """
        @param clock: the time of the signatures' C{t=} tag.
        @param run_in_thread: where the signing and the reading run
            (C{deferToThreadPool}'s signature without the reactor and pool).
        """
        self.table = table
        self.path = table.path
        self._clock = clock
        self._run = run_in_thread

    @classmethod
    def from_file(
        cls, path: str, clock: IReactorTime, run_in_thread: Callable[..., Deferred[Any]]
    ) -> DkimSigner:
        """
        A signer with the keys of the keys file C{path}, read now (blocking:
        at start-up).

        @raise DkimKeysError: naming the file and the line that cannot be used.
        """
        return cls(load_keys(path), clock, run_in_thread)

    def keys_for(self, envelope: EnvelopeWithNextHop, log: Logger | None = None) -> tuple[DkimKey, ...]:
        """
        The keys that sign C{envelope}'s message: none when the plugin said
        C{dkim=False} or no listed domain matches.
        """
        choice = envelope.dkim
        if choice is False:
            return ()
        if choice is True:
            domain = from_domain(envelope.envelope.message)
            return self.table.keys_for(domain) if domain is not None else ()
        try:
            keys = self.table.keys_for(normalize_domain(choice))
        except ValueError:
            keys = ()
        if not keys and log is not None:
            log.warn(
                "Not DKIM-signed: no keys for {dkim_domain}, which the plugin chose",
                dkim_domain=choice,
            )
        return keys

    async def sign(
        self, envelopes: Sequence[EnvelopeWithNextHop], spool: Any, log: Logger
    ) -> Signing:
        """
        Sign the messages of C{envelopes} that have keys, each message
        once for each set of keys.  A message that cannot be signed (see
        L{Unsignable}) goes as it is, with a warning in the log.

        @param spool: the L{ISpool} whose writer takes the signed copy of a
            message held in a file.
        @raise Exception: when reading or writing fails (the client is
            told to try again later); the copies made are discarded.
        """
        signing = Signing(tuple(envelopes))
        # (message, keys) -> the signed message; None: not signed.
        done: dict[tuple[int, tuple[int, ...]], Message | None] = {}
        results: list[EnvelopeWithNextHop] = []
        timestamp = int(self._clock.seconds())
        try:
            for e in envelopes:
                keys = self.keys_for(e, log)
                message = e.envelope.message
                if not keys:
                    results.append(e)
                    continue
                group = (id(message), tuple(id(k) for k in keys))
                if group not in done:
                    done[group] = await self._signed(message, keys, timestamp, spool, e, signing, log)
                signed = done[group]
                if signed is None:
                    results.append(e)
                else:
                    results.append(
                        dataclasses.replace(e, envelope=dataclasses.replace(e.envelope, message=signed))
                    )
        except BaseException:
            for made in signing.made:
                _discard(spool, made, log)
            raise
        kept = {id(e.envelope.message) for e in results}
        originals = {id(e.envelope.message): e.envelope.message for e in envelopes}
        signing.replaced = [m for key, m in originals.items() if key not in kept]
        signing.envelopes = tuple(results)
        return signing

    async def _signed(
        self,
        message: Message,
        keys: tuple[DkimKey, ...],
        timestamp: int,
        spool: Any,
        envelope: EnvelopeWithNextHop,
        signing: Signing,
        log: Logger,
    ) -> Message | None:
        """
        C{message} signed with C{keys}, or C{None} when it cannot be.
        """
        try:
            if message.data is not None:
                fields, data = await self._run(sign_bytes, keys, message.data, timestamp)
            else:
                assert message.path is not None
                fields = await self._run(sign_file, keys, message.path, timestamp)
        except Unsignable as e:
            log.warn("Not DKIM-signed: {reason}", reason=str(e))
            return None
        headers = parse_header_block(fields) + message.headers
        if message.data is not None:
            signed = Message(headers=headers, size=len(fields) + len(data), data=fields + data)
        else:
            n = len(signing.made)
            signed = await self._copy(fields, message, headers, spool, f"{envelope.envelope.id}.dkim{n}")
        signing.made.append(signed)
        signing.signed_as.extend(f"d={k.domain} s={k.selector}" for k in keys)
        return signed

    async def _copy(
        self,
        fields: bytes,
        message: Message,
        headers: tuple[tuple[str, str], ...],
        spool: Any,
        message_id: str,
    ) -> Message:
        """
        A new message of the spool: C{fields}, then C{message} read from
        its file a chunk at a time, with CRLF line endings.
        """
        assert message.path is not None
        writer = spool.receive(message_id)
        reader = _Reader(message.path)
        try:
            writer.write(fields)
            endings = CRLFLines()
            while chunk := await self._run(reader.read):
                if writer.write(endings.encode(chunk)):
                    await writer.drained()
            writer.write(endings.finish())
        except BaseException:
            writer.abort()
            raise
        finally:
            await self._run(reader.close)
        signed: Message = await writer.finish(headers)
        return signed

    def reload(self, run_in_thread: Callable[..., Deferred[Any]]) -> Deferred[str]:
        """
        Read the keys file again and sign with what it holds from now on;
        a file that cannot be used leaves the keys in use.
        """
        path = self.path
        if path is None:
            return defer.succeed("DKIM keys made in code: nothing to reload")
        d: Deferred[KeyTable] = run_in_thread(load_keys, path)

        def loaded(table: KeyTable) -> str:
            self.table = table
            return f"Signing with {table.describe()}"

        def failed(failure: Failure) -> Failure:
            failure.trap(DkimKeysError)
            return Failure(ReloadError(str(failure.value)))

        return d.addCallbacks(loaded, failed)


def _discard(spool: Any, message: Message, log: Logger) -> None:
    try:
        d = spool.discard(message)
    except Exception:
        log.failure("discard failed")
        return
    if isinstance(d, Deferred):
        d.addErrback(lambda f: log.failure("discard failed", f))
