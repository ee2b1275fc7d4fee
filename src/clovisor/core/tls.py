"""TLS on a traced port: the ClientHello's SNI and offered ALPN, one session per connection.

What follows the ClientHello is encrypted, so a TLS connection gives one
connection-level session (``protocol_name`` ``tls``) with
``tls.client.server_name`` (SNI) and the offered ALPN protocols
(``clovisor.tls.alpn``, comma-separated, as offered), counted as
``encrypted`` rather than as a parse error.

The ClientHello may be split over TLS records and TCP segments; it is
gathered up to :data:`MAX_HELLO_BYTES`, and given up (the session still
counts the connection) when it is longer, not captured, or not a
ClientHello. Parsing is by length fields, each checked against what is
there, so no input raises.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .budget import UNLIMITED, Budget
from .events import Outcome, Session
from .reassembly import Chunk, ReassemblyLimits
from .sessions import Connection, Endpoints, Stats

MAX_HELLO_BYTES = 16384
"""The most ClientHello bytes gathered (post-quantum key shares make it about 1.8 KiB)."""

# Its records' headers too (a hello split into many records is legal, if odd).
_MAX_GATHERED = MAX_HELLO_BYTES + 4 + 5 * 8
MAX_NAME = 255  # characters of SNI kept (a DNS name is at most 253)
MAX_ALPN = 16  # protocols of the ALPN list kept

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16


def looks_like_tls(data: bytes) -> bool:
    """Whether captured bytes at a connection's start are a TLS handshake record.

    A record header (type 22, version 3.x, a length a record may have) and,
    when captured, a ClientHello handshake type: no HTTP/1.x request starts
    with byte 22, nor does the HTTP/2 preface.
    """
    if len(data) < 1 or data[0] != _HANDSHAKE:
        return False
    if len(data) >= 2 and data[1] != 3:
        return False
    if len(data) >= 3 and data[2] > 4:
        return False
    if len(data) >= 5 and not 0 < int.from_bytes(data[3:5], "big") <= 16384 + 2048:
        return False
    return len(data) < 6 or data[5] == _CLIENT_HELLO


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHello:
    server_name: str | None
    alpn: tuple[str, ...]


class HelloState(enum.Enum):
    GATHERING = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()  # not captured, too long, or not a ClientHello


_TRANSITIONS = {
    (HelloState.GATHERING, HelloState.DONE),
    (HelloState.GATHERING, HelloState.FAILED),
}


class HelloReader:
    """Gathers the handshake bytes of the client's first records; sans-I/O."""

    __slots__ = ("_budget", "_handshake", "_held", "_record", "hello", "reason", "state")

    def __init__(self, budget: Budget = UNLIMITED) -> None:
        self._budget = budget
        self._record = bytearray()  # the stream's bytes not yet split into records
        self._handshake = bytearray()  # handshake bytes from the records so far
        self._held = 0
        self.state = HelloState.GATHERING
        self.hello: ClientHello | None = None
        self.reason = ""

    def _to(self, state: HelloState, reason: str = "") -> None:
        if (self.state, state) not in _TRANSITIONS:
            return  # already decided: later bytes change nothing
        self.state = state
        self.reason = reason
        self.release()

    def feed(self, chunk: Chunk) -> None:
        if self.state is not HelloState.GATHERING:
            return
        if chunk.lost or len(chunk.data) < chunk.length:
            self._to(HelloState.FAILED, "ClientHello not captured")
            return
        # Only what a ClientHello can need: what follows it (0-RTT data) is not gathered.
        room = _MAX_GATHERED - self._held
        data = chunk.data[: min(chunk.length, room)]
        if not self._budget.take(len(data)):
            self._to(HelloState.FAILED, "over the byte budget")
            return
        self._held += len(data)
        self._record += data
        self._records()
        if self.state is HelloState.GATHERING and self._held >= _MAX_GATHERED:
            self._to(HelloState.FAILED, "ClientHello longer than the limit")

    def _records(self) -> None:
        buf = self._record
        while len(buf) >= 5:
            if buf[0] != _HANDSHAKE or buf[1] != 3:
                self._to(HelloState.FAILED, "not a TLS handshake record")
                return
            n = int.from_bytes(buf[3:5], "big")
            if n == 0 or n > 16384 + 2048:
                self._to(HelloState.FAILED, "bad TLS record length")
                return
            if len(buf) < 5 + n:
                return
            self._handshake += buf[5 : 5 + n]
            del buf[: 5 + n]
            if len(self._handshake) >= 4:
                if self._handshake[0] != _CLIENT_HELLO:
                    self._to(HelloState.FAILED, "not a ClientHello")
                    return
                size = int.from_bytes(self._handshake[1:4], "big")
                if size > MAX_HELLO_BYTES:
                    self._to(HelloState.FAILED, "ClientHello longer than the limit")
                    return
                if len(self._handshake) >= 4 + size:
                    hello = parse_client_hello(bytes(self._handshake[4 : 4 + size]))
                    if hello is None:
                        self._to(HelloState.FAILED, "malformed ClientHello")
                    else:
                        self.hello = hello
                        self._to(HelloState.DONE)
                    return

    def release(self) -> None:
        self._budget.give(self._held)
        self._held = 0
        self._record = bytearray()
        self._handshake = bytearray()


def parse_client_hello(body: bytes) -> ClientHello | None:
    """SNI and ALPN from a ClientHello's body (after its 4-byte header); None if malformed."""
    pos = 2 + 32  # legacy_version, random
    if len(body) < pos + 1:
        return None
    pos += 1 + body[pos]  # legacy_session_id
    if len(body) < pos + 2:
        return None
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher_suites
    if len(body) < pos + 1:
        return None
    pos += 1 + body[pos]  # legacy_compression_methods
    if len(body) < pos:
        return None
    if len(body) == pos:
        return ClientHello(server_name=None, alpn=())  # no extensions (SSL 3 style)
    if len(body) < pos + 2:
        return None
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    if end > len(body):
        return None
    pos += 2
    name: str | None = None
    alpn: tuple[str, ...] = ()
    while pos + 4 <= end:
        etype = int.from_bytes(body[pos : pos + 2], "big")
        elen = int.from_bytes(body[pos + 2 : pos + 4], "big")
        ext = body[pos + 4 : pos + 4 + elen]
        if len(ext) < elen:
            return None
        pos += 4 + elen
        if etype == _EXT_SERVER_NAME:
            name = _server_name(ext)
        elif etype == _EXT_ALPN:
            alpn = _alpn(ext)
    return ClientHello(server_name=name, alpn=alpn)


def _server_name(ext: bytes) -> str | None:
    pos, end = 2, min(len(ext), 2 + int.from_bytes(ext[0:2], "big"))
    while pos + 3 <= end:
        kind = ext[pos]
        n = int.from_bytes(ext[pos + 1 : pos + 3], "big")
        value = ext[pos + 3 : pos + 3 + n]
        pos += 3 + n
        if kind == 0 and len(value) == n and value:
            # A host name is ASCII; anything else is kept visible, never trusted.
            return value[:MAX_NAME].decode("ascii", "backslashreplace")
    return None


def _alpn(ext: bytes) -> tuple[str, ...]:
    out: list[str] = []
    pos, end = 2, min(len(ext), 2 + int.from_bytes(ext[0:2], "big"))
    while pos < end and len(out) < MAX_ALPN:
        n = ext[pos]
        value = ext[pos + 1 : pos + 1 + n]
        pos += 1 + n
        if len(value) == n and value:
            out.append(value.decode("ascii", "backslashreplace").replace(",", "\\x2c"))
    return tuple(out)


class TlsSession:
    """One TLS connection: bytes and packets counted, the ClientHello read; sans-I/O."""

    __slots__ = ("_counts", "_emitted", "_endpoints", "_out", "_start_ns", "reader")

    def __init__(self, endpoints: Endpoints, out: list[Session], budget: Budget) -> None:
        self._endpoints = endpoints
        self._out = out
        self._start_ns = 0
        self._counts = [0, 0, 0, 0]  # req packets, req bytes, resp packets, resp bytes
        self._emitted = False
        self.reader = HelloReader(budget)

    def feed(self, is_req: bool, chunk: Chunk) -> None:
        if not self._start_ns:
            self._start_ns = chunk.ts_ns
        i = 0 if is_req else 2
        self._counts[i] += chunk.packets
        self._counts[i + 1] += chunk.length
        if is_req:
            self.reader.feed(chunk)

    def add(self, is_req: bool, packets: int, nbytes: int, start_ns: int) -> None:
        """Bytes that went by before the connection was known to be TLS."""
        if start_ns and (not self._start_ns or start_ns < self._start_ns):
            self._start_ns = start_ns
        i = 0 if is_req else 2
        self._counts[i] += packets
        self._counts[i + 1] += nbytes

    def end(self, outcome: Outcome, ts_ns: int) -> None:
        if self._emitted:
            return
        self._emitted = True
        self.reader.release()
        attrs: list[tuple[str, str | int | float | bool]] = [("tls.protocol.name", "tls")]
        hello = self.reader.hello
        if hello is not None:
            if hello.server_name is not None:
                attrs.append(("tls.client.server_name", hello.server_name))
            if hello.alpn:
                attrs.append(("clovisor.tls.alpn", ",".join(hello.alpn)))
        start = self._start_ns or ts_ns
        self._out.append(
            self._endpoints.session(
                start_ns=start,
                end_ns=max(ts_ns, start),
                outcome=Outcome.COMPLETE if outcome is Outcome.CLOSED else outcome,
                request_packets=self._counts[0],
                request_bytes=self._counts[1],
                response_packets=self._counts[2],
                response_bytes=self._counts[3],
                protocol_name="tls",
                attributes=tuple(attrs),
            )
        )

    def release(self) -> None:
        self.reader.release()


class TlsConnection(Connection):
    """A connection whose first bytes were a TLS ClientHello."""

    __slots__ = ("tls",)

    def __init__(
        self, endpoints: Endpoints, limits: ReassemblyLimits, stats: Stats, out: list[Session]
    ) -> None:
        super().__init__(endpoints, limits, stats, out)
        self.tls = TlsSession(endpoints, out, stats.budget)
        stats.encrypted += 1

    def on_chunk(self, is_req: bool, chunk: Chunk, ack: int) -> None:
        self.tls.feed(is_req, chunk)

    def on_fin(self, is_req: bool, ts_ns: int) -> None:
        return None

    def on_end(self, outcome: Outcome, ts_ns: int) -> None:
        self.tls.end(outcome, ts_ns)

    def release(self) -> None:
        super().release()
        self.tls.release()


def tls_connection(
    endpoints: Endpoints,
    limits: ReassemblyLimits,
    stats: Stats,
    out: list[Session],
    /,
    *,
    synced: bool,
) -> Connection:
    """A :class:`~clovisor.core.sessions.ConnectionFactory` for a port declared TLS."""
    return TlsConnection(endpoints, limits, stats, out)


__all__ = [
    "MAX_HELLO_BYTES",
    "ClientHello",
    "HelloReader",
    "TlsConnection",
    "TlsSession",
    "looks_like_tls",
    "parse_client_hello",
    "tls_connection",
]
