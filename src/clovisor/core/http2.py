"""HTTP/2 connections: one session per stream, paired by stream id.

:class:`Http2Streams` reads both directions with a :class:`FrameReader`
each and follows the client's streams: a stream's session runs from the
first byte of its request HEADERS to the END_STREAM of its response
(trailers included), or to a RST_STREAM (outcome ``reset``). A GOAWAY
from the server ends the streams above its last stream id (outcome
``closed``); the others finish as they do. When the connection ends, every
open stream becomes a session with that ending's outcome. Frames of
streams interleave as they like: they are paired by id, never by order.

Bodies are the DATA frames' payload lengths from their headers, so a body
need not be captured. A header field that cannot be decoded (a dynamic
table entry from before a mid-stream pickup or a loss) is left out, never
guessed, and the session says ``clovisor.http2.headers_incomplete``.

gRPC (a request content-type ``application/grpc*``) adds to
``Session.attributes``: ``rpc.system`` ``grpc``, ``rpc.service`` and
``rpc.method`` from ``:path``, ``rpc.grpc.status_code`` from the trailers
(or a trailers-only response) and ``clovisor.grpc.message`` from
``grpc-message``.

:class:`Http2Connection` is the :class:`~clovisor.core.sessions.Connection`
for a port declared HTTP/2 or gRPC; an HTTP/1.x connection that switches
(the connection preface, or ``Upgrade: h2c``) embeds an
:class:`Http2Streams` from that point on.

Bounds, per connection: ``max_streams`` open streams (a new stream beyond
them is dropped and counted in ``stats.dropped_requests``); header blocks
of ``max_header_bytes``; the HPACK tables (see :mod:`hpack_fields`). Every
byte held (header blocks being gathered, HPACK tables, recorded fields and
a fixed cost per open stream) is taken from the byte budget; a stream the
budget refuses is dropped and counted like one over the limit.
"""

from __future__ import annotations

from urllib.parse import unquote

from .events import SYN, Direction, HttpRequest, HttpResponse, Outcome, Segment, Session
from .h2frames import (
    NOT_PREFACE,
    PREFACE,
    Data,
    Event,
    FrameReader,
    FramingLost,
    GoAway,
    Headers,
    Reset,
    Settings,
    Stopped,
    frame_hints,
)
from .http1 import RECORDED_HEADERS
from .reassembly import Chunk, ReassemblyLimits
from .sessions import (
    ENCRYPTED,
    LOST,
    PARSE_ERROR,
    TRUNCATED,
    UNRECOGNIZED,
    Connection,
    Endpoints,
    Stats,
)
from .tls import TlsSession, looks_like_tls

_PSEUDO = frozenset({b":method", b":path", b":authority", b":status"})
_GRPC = frozenset({b"grpc-status", b"grpc-message"})
WANTED = frozenset(n.encode("ascii") for n in RECORDED_HEADERS) | _PSEUDO | _GRPC
"""Header fields a session may carry: HTTP/1.x's recorded set, pseudo-headers, gRPC status."""

STREAM_COST = 256
"""Bytes a tracked stream counts against the budget beyond its recorded fields
(its object, about 200 bytes measured with tracemalloc, and its slot)."""

MAX_DROPPED_IDS = 1024  # ids of dropped streams remembered, so their answers are not unpaired
MAX_GRPC_MESSAGE = 256  # characters of grpc-message kept
# What a stream keeps when the budget refuses its recorded fields.
_ESSENTIAL = frozenset({":method", ":path", ":authority", ":status", "content-type",
                        "grpc-status", "grpc-message"})  # fmt: skip
MAX_ESSENTIAL = 256

Fields = tuple[tuple[str, str], ...]

Attributes = tuple[tuple[str, str | int | float | bool], ...]


class _Stream:
    """A client stream seen from its request HEADERS."""

    __slots__ = (
        "held",
        "incomplete",
        "req_body",
        "req_bytes",
        "req_ended",
        "req_fields",
        "req_packets",
        "req_truncated",
        "req_version",
        "resp_body",
        "resp_bytes",
        "resp_fields",
        "resp_packets",
        "resp_truncated",
        "start_ns",
        "stream_id",
        "trailers",
    )

    def __init__(self, stream_id: int, start_ns: int) -> None:
        self.stream_id = stream_id
        self.start_ns = start_ns
        self.req_version = "2"
        self.req_fields: Fields = ()
        self.req_truncated = False
        self.req_ended = False
        self.req_body: int | None = 0  # None: frames of it may have gone by unseen
        self.req_bytes = 0
        self.req_packets = 0
        self.resp_fields: Fields | None = None  # the final response head
        self.resp_truncated = False
        self.trailers: Fields = ()
        self.resp_body: int | None = 0
        self.resp_bytes = 0
        self.resp_packets = 0
        self.incomplete = False  # a header field could not be decoded
        self.held = 0  # bytes taken from the budget for it


class Http2Streams:
    """The streams of one HTTP/2 connection; sans-I/O, fed chunks per direction."""

    __slots__ = (
        "_client",
        "_dropped",
        "_endpoints",
        "_goaway",
        "_grpc",
        "_last_client_stream",
        "_max_streams",
        "_out",
        "_server",
        "_stats",
        "_streams",
        "bad_frames",
        "framing_lost",
    )

    def __init__(
        self,
        endpoints: Endpoints,
        stats: Stats,
        out: list[Session],
        *,
        synced: bool,
        server_synced: bool | None = None,
        preface: bool = True,
        grpc: bool = False,
        max_streams: int = 256,
        max_header_bytes: int = 65536,
    ) -> None:
        """``synced``: both directions are read from their first frame (``preface``:
        the client's starts with the connection preface); ``server_synced``, when
        given, says so for the server's direction alone. ``grpc``: the port is
        declared gRPC, so a stream whose content-type could not be decoded is
        taken to be gRPC too."""
        self._endpoints = endpoints
        self._grpc = grpc
        self._stats = stats
        self._out = out
        budget = stats.budget
        self._client = FrameReader(
            client=preface, synced=synced, wanted=WANTED, max_block_bytes=max_header_bytes,
            budget=budget,
        )  # fmt: skip
        self._server = FrameReader(
            client=False, synced=synced if server_synced is None else server_synced,
            wanted=WANTED, max_block_bytes=max_header_bytes, budget=budget,
        )  # fmt: skip
        self._streams: dict[int, _Stream] = {}
        self._dropped: set[int] = set()  # streams over the limit (bounded like _streams)
        self._max_streams = max_streams
        self._goaway: int | None = None  # the server's last stream id, once it said GOAWAY
        self._last_client_stream = 0  # client stream ids only grow (RFC 9113, 5.1.1)
        self.bad_frames = 0
        self.framing_lost = 0

    def reader(self, is_req: bool) -> FrameReader:
        """The frame reader of one direction."""
        return self._client if is_req else self._server

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def held_bytes(self) -> int:
        held = sum(s.held for s in self._streams.values())
        return held + self._client.held_bytes + self._server.held_bytes

    def feed(self, is_req: bool, chunk: Chunk) -> None:
        events: list[Event] = []
        (self._client if is_req else self._server).feed(chunk, events)
        for event in events:
            self._event(is_req, event)

    def upgraded(
        self, start_ns: int, method: str, target: str, headers: Fields,
        body_size: int | None, packets: int, nbytes: int,
    ) -> None:
        """The HTTP/1.1 request that asked for ``Upgrade: h2c``: it is stream 1 (RFC 7540, 3.2)."""
        stream = self._open(1, start_ns)
        self._last_client_stream = 1
        if stream is None:
            return
        stream.req_fields = self._hold(stream, ((":method", method), (":path", target), *headers))
        stream.req_version = "1.1"
        stream.req_ended = True
        stream.req_body = body_size
        stream.req_packets = packets
        stream.req_bytes = nbytes

    def end(self, outcome: Outcome, ts_ns: int) -> None:
        """The connection ended: every open stream becomes a session."""
        for stream in list(self._streams.values()):
            self._emit(stream, ts_ns, outcome)

    def release(self) -> None:
        for stream in list(self._streams.values()):
            self._forget(stream)
        self._client.release()
        self._server.release()

    # -- events ------------------------------------------------------------------

    def _event(self, is_req: bool, event: Event) -> None:
        if isinstance(event, Data):
            self._data(is_req, event)
        elif isinstance(event, Headers):
            if is_req:
                self._request_headers(event)
            else:
                self._response_headers(event)
        elif isinstance(event, Reset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                self._count(stream, is_req, event.wire_bytes, event.packets)
                attrs: Attributes = ()
                if event.error_code is not None:
                    attrs = (("clovisor.http2.error_code", event.error_code),)
                self._emit(stream, event.ts_ns, Outcome.RESET, attrs)
        elif isinstance(event, Settings):
            if not event.ack:
                (self._server if is_req else self._client).announce(event)
        elif isinstance(event, GoAway):
            last = event.last_stream_id
            # Only a lower last id ends streams: a repeated GOAWAY costs nothing.
            if not is_req and last is not None and (self._goaway is None or last < self._goaway):
                self._goaway = last
                for stream in list(self._streams.values()):
                    if stream.stream_id > last:
                        self._emit(stream, event.ts_ns, Outcome.CLOSED)
        elif isinstance(event, FramingLost):
            self.framing_lost += 1
            self._stats.framing_lost += 1
            if event.truncated:
                self._stats.not_traced(TRUNCATED, self._endpoints.server_port)
            elif event.reason.startswith("lost"):
                self._stats.not_traced(LOST, self._endpoints.server_port)
            self._lost(is_req)
        elif isinstance(event, Stopped):
            self.bad_frames += 1
            reason = UNRECOGNIZED if event.reason == NOT_PREFACE else PARSE_ERROR
            self._stats.not_traced(reason, self._endpoints.server_port)
            self._lost(is_req)

    def _lost(self, is_req: bool) -> None:
        """Frames of this direction went by unseen: open streams' bodies are unknown."""
        for stream in self._streams.values():
            if is_req:
                stream.req_body = None
            else:
                stream.resp_body = None

    def _request_headers(self, event: Headers) -> None:
        sid = event.stream_id
        if event.push or not sid & 1:
            return  # not a client stream
        stream = self._streams.get(sid)
        block = event.block
        if stream is None:
            if sid <= self._last_client_stream:
                return  # a stream that ended (its request's trailers), or one we dropped
            self._last_client_stream = sid
            if self._goaway is not None and sid > self._goaway:
                return  # the server said it will not process it
            stream = self._open(sid, event.start_ns)
            if stream is None:
                return
            stream.req_fields = self._hold(stream, block.fields)
            stream.req_truncated = event.truncated
        # else: trailers of the request; their fields are not recorded
        stream.incomplete = stream.incomplete or block.incomplete
        self._count(stream, True, event.wire_bytes, event.packets)
        if event.end_stream:
            stream.req_ended = True

    def _response_headers(self, event: Headers) -> None:
        if event.push:
            return  # decoded for the HPACK table; pushed responses are not traced
        stream = self._streams.get(event.stream_id)
        if stream is None:
            if event.stream_id & 1 and event.stream_id not in self._dropped:
                self._stats.unpaired_responses += 1
            return
        block = event.block
        self._count(stream, False, event.wire_bytes, event.packets)
        stream.incomplete = stream.incomplete or block.incomplete
        if stream.resp_fields is None:
            status = _field(block.fields, ":status")
            if status is not None and len(status) == 3 and status.startswith("1"):
                return  # an interim response; the final one follows
            stream.resp_fields = self._hold(stream, block.fields)
            stream.resp_truncated = event.truncated
            if event.end_stream:
                stream.trailers = stream.resp_fields  # trailers-only (gRPC errors)
        else:
            stream.trailers = self._hold(stream, _trailers(block.fields))
        if event.end_stream:
            self._emit(stream, event.ts_ns, Outcome.COMPLETE)

    def _data(self, is_req: bool, event: Data) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        self._count(stream, is_req, event.wire_bytes, event.packets)
        if is_req:
            if stream.req_body is not None:
                stream.req_body += event.length
            if event.end_stream:
                stream.req_ended = True
        else:
            if stream.resp_body is not None:
                stream.resp_body += event.length
            if event.end_stream:
                self._emit(stream, event.ts_ns, Outcome.COMPLETE)

    # -- streams -----------------------------------------------------------------

    def _open(self, sid: int, start_ns: int) -> _Stream | None:
        if len(self._streams) >= self._max_streams or not self._stats.budget.take(STREAM_COST):
            self._stats.dropped_requests += 1
            if len(self._dropped) >= MAX_DROPPED_IDS:
                self._dropped.clear()
            self._dropped.add(sid)
            return None
        stream = _Stream(sid, start_ns)
        stream.held = STREAM_COST
        self._streams[sid] = stream
        return stream

    def _hold(self, stream: _Stream, fields: Fields) -> Fields:
        """The fields to keep for a stream, their bytes taken from the budget.

        When the budget refuses them, only the essential ones are kept, cut to
        ``MAX_ESSENTIAL`` characters each: at most about 1.5 KiB per stream,
        which ``max_streams`` bounds per connection.
        """
        n = sum(len(k) + len(v) for k, v in fields)
        if self._stats.budget.take(n):
            stream.held += n
            return fields
        return tuple((k, v[:MAX_ESSENTIAL]) for k, v in fields if k in _ESSENTIAL)

    def _forget(self, stream: _Stream) -> None:
        del self._streams[stream.stream_id]
        self._stats.budget.give(stream.held)
        stream.held = 0

    @staticmethod
    def _count(stream: _Stream, is_req: bool, nbytes: int, packets: int) -> None:
        if is_req:
            stream.req_bytes += nbytes
            stream.req_packets += packets
        else:
            stream.resp_bytes += nbytes
            stream.resp_packets += packets

    def _emit(
        self, stream: _Stream, end_ns: int, outcome: Outcome, extra: Attributes = ()
    ) -> None:
        self._forget(stream)
        e = self._endpoints
        req_fields = stream.req_fields
        method = _field(req_fields, ":method") or ""
        authority = _field(req_fields, ":authority")
        target = _field(req_fields, ":path")
        if target is None:
            target = authority if method == "CONNECT" and authority else ""
        headers = _recorded(req_fields)
        if authority is not None and not any(k == "host" for k, _ in headers):
            headers = (("host", authority), *headers)
        request = HttpRequest(
            method=method,
            target=target,
            version=stream.req_version,
            headers=headers,
            body_size=stream.req_body,
            header_truncated=stream.req_truncated,
        )
        response = None
        if stream.resp_fields is not None:
            status_s = _field(stream.resp_fields, ":status")
            status = int(status_s) if status_s and status_s.isdigit() else 0
            if not 100 <= status <= 599:
                status = 0  # unknown (not decoded) or not a status at all
            response = HttpResponse(
                status_code=status,
                reason="",
                version="2",
                headers=_recorded(stream.resp_fields),
                body_size=stream.resp_body if outcome is Outcome.COMPLETE else None,
                header_truncated=stream.resp_truncated,
            )
        attrs: list[tuple[str, str | int | float | bool]] = []
        content_type = _field(req_fields, "content-type")
        if (
            content_type.startswith("application/grpc")
            if content_type is not None
            else self._grpc and (method == "POST" or not method)
        ):
            attrs.append(("rpc.system", "grpc"))
            service, _, rpc_method = target.lstrip("/").partition("/")
            if target.startswith("/") and service and rpc_method and "/" not in rpc_method:
                attrs.append(("rpc.service", service))
                attrs.append(("rpc.method", rpc_method))
            code = _field(stream.trailers, "grpc-status")
            if code is not None and code.isdigit() and len(code) <= 2:
                attrs.append(("rpc.grpc.status_code", int(code)))
            message = _field(stream.trailers, "grpc-message")
            if message:
                attrs.append(("clovisor.grpc.message", unquote(message)[:MAX_GRPC_MESSAGE]))
        if stream.incomplete:
            attrs.append(("clovisor.http2.headers_incomplete", True))
        attrs.append(("clovisor.http2.stream_id", stream.stream_id))
        attrs.extend(extra)
        self._out.append(
            Session(
                role=e.role,
                protocol=e.protocol,
                ifindex=e.ifindex,
                family=e.family,
                client_addr=e.client_addr,
                client_port=e.client_port,
                server_addr=e.server_addr,
                server_port=e.server_port,
                start_ns=stream.start_ns,
                end_ns=max(end_ns, stream.start_ns),
                outcome=outcome,
                request=request,
                response=response,
                request_packets=max(1, stream.req_packets),
                request_bytes=stream.req_bytes,
                response_packets=stream.resp_packets if response is not None else 0,
                response_bytes=stream.resp_bytes if response is not None else 0,
                attributes=tuple(attrs),
            )
        )


def _field(fields: Fields, name: str) -> str | None:
    for k, v in fields:
        if k == name:
            return v
    return None


def _trailers(fields: Fields) -> Fields:
    """What trailers are kept for: the gRPC status."""
    return tuple((k, v) for k, v in fields if k == "grpc-status" or k == "grpc-message")


def _recorded(fields: Fields) -> Fields:
    """The fields a session records as headers: no pseudo-headers, no gRPC status."""
    return tuple((k, v) for k, v in fields if k in RECORDED_HEADERS)


class Http2Connection(Connection):
    """A connection on a port declared HTTP/2 (or gRPC): every byte is HTTP/2.

    Unless its first bytes are a TLS ClientHello: then it is one TLS session.
    """

    __slots__ = ("_ignored", "_synced", "streams", "tls")

    def __init__(
        self,
        endpoints: Endpoints,
        limits: ReassemblyLimits,
        stats: Stats,
        out: list[Session],
        *,
        synced: bool,
        grpc: bool = False,
        max_streams: int = 256,
        max_header_bytes: int = 65536,
    ) -> None:
        super().__init__(endpoints, limits, stats, out)
        self._synced = synced
        self.streams = Http2Streams(
            endpoints, stats, out, synced=synced, grpc=grpc, max_streams=max_streams,
            max_header_bytes=max_header_bytes,
        )  # fmt: skip
        self.tls: TlsSession | None = None
        self._ignored = False  # an unrecognized connection: nothing of it is parsed

    def feed(self, seg: Segment) -> None:
        if seg.frames and self.tls is None and not self._ignored:
            # Frame headers the classifier found beyond the capture: where they
            # are in the half-stream, for its frame reader.
            is_req = seg.direction is Direction.REQUEST
            stream = self.req if is_req else self.resp
            seq = (seg.seq + 1) & 0xFFFFFFFF if seg.flags & SYN else seg.seq
            base = stream.absolute(seq) if stream.started else 0
            reader = self.streams.reader(is_req)
            for offset, data in frame_hints(seg.frames):
                reader.hint(base + offset, data)
        super().feed(seg)

    def on_chunk(self, is_req: bool, chunk: Chunk, ack: int) -> None:
        if self.tls is not None:
            self.tls.feed(is_req, chunk)
        elif self._ignored:
            return
        elif is_req and self._synced and chunk.offset == 0 and chunk.data:
            data = chunk.data
            if looks_like_tls(data):
                self.stats.not_traced(ENCRYPTED, self.endpoints.server_port)
                self.tls = TlsSession(self.endpoints, self.out, self.stats.budget)
                self.tls.feed(is_req, chunk)
            elif not PREFACE.startswith(data[: len(PREFACE)]):
                self.stats.not_traced(UNRECOGNIZED, self.endpoints.server_port, data)
                self._ignored = True
            else:
                self.streams.feed(is_req, chunk)
        else:
            self.streams.feed(is_req, chunk)

    def on_fin(self, is_req: bool, ts_ns: int) -> None:
        return None  # streams end with both FINs (on_end), a RST or their own END_STREAM

    def on_end(self, outcome: Outcome, ts_ns: int) -> None:
        if self.tls is not None:
            self.tls.end(outcome, ts_ns)
        self.streams.end(outcome, ts_ns)

    def release(self) -> None:
        super().release()
        self.streams.release()
        if self.tls is not None:
            self.tls.release()


def http2_connection(
    endpoints: Endpoints,
    limits: ReassemblyLimits,
    stats: Stats,
    out: list[Session],
    /,
    *,
    synced: bool,
) -> Connection:
    """A :class:`~clovisor.core.sessions.ConnectionFactory` for HTTP/2 and gRPC ports."""
    return Http2Connection(endpoints, limits, stats, out, synced=synced)


def grpc_connection(
    endpoints: Endpoints,
    limits: ReassemblyLimits,
    stats: Stats,
    out: list[Session],
    /,
    *,
    synced: bool,
) -> Connection:
    """The same for a port declared gRPC."""
    return Http2Connection(endpoints, limits, stats, out, synced=synced, grpc=True)


__all__ = ["WANTED", "Http2Connection", "Http2Streams", "grpc_connection", "http2_connection"]
