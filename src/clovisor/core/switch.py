"""Protocol switches on an HTTP/1.x port, by signatures that cannot be mistaken.

The protocol of a port is declared, never guessed; these are the
exceptions, each a signature no HTTP/1.x message can start with:

- the HTTP/2 client connection preface ``PRI * HTTP/2.0`` (prior
  knowledge, RFC 9113 3.3): from it on, the connection is HTTP/2;
- ``101 Switching Protocols`` with ``Upgrade: h2c`` (RFC 7540 3.2): the
  request that asked for it is stream 1, and both directions are HTTP/2
  after their HTTP/1.1 messages;
- a TLS ClientHello as the connection's first bytes: one connection-level
  session, counted as encrypted.

:class:`~clovisor.core.sessions.HttpConnection` asks :func:`detect` when
its framer meets bytes that are not HTTP/1.x at a message boundary, and
:func:`h2c` when a response switches protocols; what they return takes
every later byte of the connection.
"""

from __future__ import annotations

from .events import Outcome, Session
from .h2frames import PREFACE
from .http2 import Http2Streams
from .reassembly import Chunk
from .sessions import ENCRYPTED, Endpoints, Stats
from .tls import TlsSession, looks_like_tls

PREFACE_LINE = PREFACE[:16]  # b"PRI * HTTP/2.0\r\n"


def detect(
    endpoints: Endpoints,
    stats: Stats,
    out: list[Session],
    chunk: Chunk,
    *,
    server_started: bool,
    max_header_bytes: int = 65536,
) -> Http2Streams | TlsSession | None:
    """What the client's bytes at a message boundary switch the connection to, fed with them.

    ``server_started``: the server has sent bytes already (an HTTP/2 server
    may send its SETTINGS before the preface arrives); its direction is
    then picked up at the next segment whose frames chain.
    """
    data = chunk.data
    if data.startswith(PREFACE_LINE):
        streams = Http2Streams(
            endpoints, stats, out, synced=True, server_synced=not server_started,
            max_header_bytes=max_header_bytes,
        )  # fmt: skip
        streams.feed(True, chunk)
        return streams
    if chunk.offset == 0 and looks_like_tls(data):
        stats.not_traced(ENCRYPTED, endpoints.server_port)
        tls = TlsSession(endpoints, out, stats.budget)
        tls.feed(True, chunk)
        return tls
    return None


def is_h2c(headers: tuple[tuple[str, str], ...]) -> bool:
    """Whether a 101 response's recorded headers switch to HTTP/2 in cleartext."""
    return any(k == "upgrade" and v.strip().lower() == "h2c" for k, v in headers)


def h2c(
    endpoints: Endpoints,
    stats: Stats,
    out: list[Session],
    *,
    max_header_bytes: int = 65536,
) -> Http2Streams:
    """The HTTP/2 connection after ``101 Switching Protocols`` to h2c.

    The server's frames start right after the 101; the client's with the
    connection preface, after its request.
    """
    return Http2Streams(endpoints, stats, out, synced=True, max_header_bytes=max_header_bytes)


class Ignored:
    """What an unrecognized connection switches to: every later byte is ignored."""

    __slots__ = ()

    def feed(self, is_req: bool, chunk: Chunk) -> None:
        return None

    def end(self, outcome: Outcome, ts_ns: int) -> None:
        return None

    def release(self) -> None:
        return None


__all__ = ["PREFACE_LINE", "Ignored", "detect", "h2c", "is_h2c"]
