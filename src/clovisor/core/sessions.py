"""Connections: pair each HTTP request with its response, or account a TCP flow.

A connection owns the two half-streams (reassembly) and, for HTTP, a framer
per direction. It turns framed messages into :class:`Session` records and
decides what an ending connection (FIN, RST, idle, shutdown) means for
requests still waiting for an answer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from .budget import UNLIMITED, Budget
from .events import (
    ACK,
    FIN,
    RST,
    SYN,
    Direction,
    HttpRequest,
    HttpResponse,
    Outcome,
    Role,
    Segment,
    Session,
)
from .frozen import builder
from .http1 import Framer, Head, Kind
from .reassembly import Chunk, HalfStream, ReassemblyLimits, known_bytes, seq_diff


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoints:
    """Who is who on a connection, resolved once when it is first seen."""

    role: Role
    protocol: int
    ifindex: int
    family: int
    client_addr: str
    client_port: int
    server_addr: str
    server_port: int

    def session(
        self,
        *,
        start_ns: int,
        end_ns: int,
        outcome: Outcome,
        request_packets: int = 0,
        request_bytes: int = 0,
        response_packets: int = 0,
        response_bytes: int = 0,
        protocol_name: str = "",
        attributes: tuple[tuple[str, str | int | float | bool], ...] = (),
    ) -> Session:
        """A session on these endpoints: what a parser plugin emits (HTTP, once per
        exchange, uses a faster positional builder)."""
        return Session(
            role=self.role,
            protocol=self.protocol,
            ifindex=self.ifindex,
            family=self.family,
            client_addr=self.client_addr,
            client_port=self.client_port,
            server_addr=self.server_addr,
            server_port=self.server_port,
            start_ns=start_ns,
            end_ns=end_ns,
            outcome=outcome,
            request_packets=request_packets,
            request_bytes=request_bytes,
            response_packets=response_packets,
            response_bytes=response_bytes,
            protocol_name=protocol_name,
            attributes=attributes,
        )


class ConnectionFactory(TypingProtocol):
    """Builds the per-connection parser: the interface of parser plugins."""

    def __call__(
        self,
        endpoints: Endpoints,
        limits: ReassemblyLimits,
        stats: Stats,
        out: list[Session],
        /,
        *,
        synced: bool,
    ) -> Connection: ...


class Switched(TypingProtocol):
    """What an HTTP/1.x connection switched to (HTTP/2, TLS; see :mod:`switch`)."""

    def feed(self, is_req: bool, chunk: Chunk) -> None: ...
    def end(self, outcome: Outcome, ts_ns: int) -> None: ...
    def release(self) -> None: ...


class _Pending:
    """A request seen on the wire that has no complete response yet."""

    __slots__ = (
        "answered",
        "body_size",
        "bytes",
        "ended",
        "head",
        "packets",
        "resp_ack",
        "start_seq",
        "start_ts",
    )

    def __init__(self, head: Head, start_ts: int, start_seq: int, resp_ack: int) -> None:
        self.head = head
        self.start_ts = start_ts
        self.start_seq = start_seq  # 32-bit sequence number of its first byte
        # The client's ack when it sent the request: how much of the response
        # stream it had (its response starts at or after this).
        self.resp_ack = resp_ack
        self.ended = False
        self.answered = False  # a response head was paired with it
        # Content-Length states the size before the body is seen; answered
        # early (a 413, say), the request still had that body.
        self.body_size: int | None = head.content_length if not head.chunked else None
        self.packets = 0
        self.bytes = 0


# Why traffic was not traced as its declared protocol (Stats.untraced):
ENCRYPTED = "encrypted"  # a connection that began with a TLS ClientHello
UNRECOGNIZED = "unrecognized"  # a connection whose first bytes are not its port's protocol
PARSE_ERROR = "parse_error"  # a message (or an HTTP/2 direction) the parser rejected
TRUNCATED = "truncated"  # a header block or HTTP/2 frame header beyond the capture
LOST = "lost"  # records the ring lost: a request's response, HTTP/2 frames
UNTRACED_REASONS = (ENCRYPTED, UNRECOGNIZED, PARSE_ERROR, TRUNCATED, LOST)

MAX_SAMPLES = 16  # unrecognized first bytes kept until the runtime logs them
SAMPLE_BYTES = 32


class Stats:
    """What all connections of a tracker share: counters and the byte budget."""

    __slots__ = (
        "budget",
        "dropped_requests",
        "encrypted",
        "framing_lost",
        "lost_responses",
        "parse_errors",
        "samples",
        "unpaired_responses",
        "untraced",
    )

    def __init__(self, budget: Budget | None = None) -> None:
        self.budget = budget or Budget(UNLIMITED.limit)
        self.parse_errors = 0
        self.unpaired_responses = 0  # responses to requests we never saw
        self.dropped_requests = 0  # pending requests beyond the per-connection limit
        self.lost_responses = 0  # requests whose response the tracer lost (ring full)
        self.encrypted = 0  # connections that began with a TLS ClientHello (not parse errors)
        self.framing_lost = 0  # times an HTTP/2 direction lost its frame boundaries
        # (reason, server port) -> count, the reasons of UNTRACED_REASONS.
        self.untraced: dict[tuple[str, int], int] = {}
        # (server port, first bytes) of unrecognized connections, for the
        # runtime's debug log (the core does no I/O); at most MAX_SAMPLES.
        self.samples: list[tuple[int, bytes]] = []

    def not_traced(self, reason: str, port: int, first: bytes = b"") -> None:
        """Count traffic of a server port not traced, and why (a cold path)."""
        key = (reason, port)
        self.untraced[key] = self.untraced.get(key, 0) + 1
        if reason == PARSE_ERROR:
            self.parse_errors += 1
        elif reason == ENCRYPTED:
            self.encrypted += 1
        if first and len(self.samples) < MAX_SAMPLES:
            self.samples.append((port, first[:SAMPLE_BYTES]))


_SYN_FIN_RST = SYN | FIN | RST


class Connection:
    """Base: two half-streams and the bookkeeping of how the connection ends."""

    __slots__ = (
        "endpoints",
        "fin_client",
        "fin_server",
        "last_ts",
        "out",
        "req",
        "reset",
        "resp",
        "stats",
    )

    def __init__(
        self, endpoints: Endpoints, limits: ReassemblyLimits, stats: Stats, out: list[Session]
    ) -> None:
        self.endpoints = endpoints
        self.req = HalfStream(limits, stats.budget)
        self.resp = HalfStream(limits, stats.budget)
        self.fin_client = False
        self.fin_server = False
        self.reset = False
        self.last_ts = 0
        self.stats = stats
        self.out = out

    @property
    def finished(self) -> bool:
        return self.reset or (self.fin_client and self.fin_server)

    def feed(self, seg: Segment) -> None:
        self.last_ts = seg.ts_ns
        is_req = seg.direction is Direction.REQUEST
        stream, other = (self.req, self.resp) if is_req else (self.resp, self.req)
        flags = seg.flags
        if flags & ACK:
            # First what the peer's ack says is lost on the other side: the
            # exchanges there go before what this segment brings.
            for chunk in other.peer_acked(seg.ack):
                self.on_chunk(not is_req, chunk, chunk.ack)
        if flags & SYN:
            stream.syn(seg.seq)
        if seg.payload_len:
            seq = (seg.seq + 1) if flags & SYN else seg.seq
            chunks = stream.push(
                seq & 0xFFFFFFFF,
                seg.payload_len,
                seg.payload,
                seg.tail,
                seg.ts_ns,
                seg.packets,
                seg.ack,
            )
            for chunk in chunks:
                self.on_chunk(is_req, chunk, chunk.ack)
        if flags & RST:
            self.reset = True
            self.on_end(Outcome.RESET, seg.ts_ns)
        elif flags & FIN:
            for chunk in stream.flush():
                self.on_chunk(is_req, chunk, chunk.ack)
            if is_req:
                self.fin_client = True
            else:
                self.fin_server = True
            self.on_fin(is_req, seg.ts_ns)
            if self.finished:
                self.on_end(Outcome.CLOSED, seg.ts_ns)

    def expire(self, now_ns: int) -> None:
        """Give up on holes that waited too long."""
        for chunk in self.req.expire(now_ns):
            self.on_chunk(True, chunk, chunk.ack)
        for chunk in self.resp.expire(now_ns):
            self.on_chunk(False, chunk, chunk.ack)

    def flush_and_end(self, outcome: Outcome, ts_ns: int) -> None:
        """The connection is being dropped (idle, evicted, shutdown)."""
        for chunk in self.req.flush():
            self.on_chunk(True, chunk, chunk.ack)
        for chunk in self.resp.flush():
            self.on_chunk(False, chunk, chunk.ack)
        self.on_end(outcome, ts_ns)
        self.release()

    def release(self) -> None:
        """Return every held byte to the budget (the connection is dropped)."""
        self.req.flush()
        self.resp.flush()

    # Subclass hooks.
    def on_chunk(self, is_req: bool, chunk: Chunk, ack: int) -> None:
        raise NotImplementedError

    def on_fin(self, is_req: bool, ts_ns: int) -> None:
        raise NotImplementedError

    def on_end(self, outcome: Outcome, ts_ns: int) -> None:
        raise NotImplementedError


class TcpConnection(Connection):
    """Connection-level sessions: one session per TCP connection."""

    __slots__ = ("_counts", "_emitted", "_start_ts")

    def __init__(
        self, endpoints: Endpoints, limits: ReassemblyLimits, stats: Stats, out: list[Session]
    ) -> None:
        super().__init__(endpoints, limits, stats, out)
        self._start_ts = 0
        self._counts = [0, 0, 0, 0]  # req packets, req bytes, resp packets, resp bytes
        self._emitted = False

    def feed(self, seg: Segment) -> None:
        if not self._start_ts:
            self._start_ts = seg.ts_ns
        super().feed(seg)

    def on_chunk(self, is_req: bool, chunk: Chunk, ack: int) -> None:
        i = 0 if is_req else 2
        self._counts[i] += chunk.packets
        self._counts[i + 1] += chunk.length

    def on_fin(self, is_req: bool, ts_ns: int) -> None:
        return None

    def on_end(self, outcome: Outcome, ts_ns: int) -> None:
        if self._emitted:
            return
        self._emitted = True
        self.out.append(
            self.endpoints.session(
                start_ns=self._start_ts,
                end_ns=ts_ns,
                outcome=Outcome.COMPLETE if outcome is Outcome.CLOSED else outcome,
                request_packets=self._counts[0],
                request_bytes=self._counts[1],
                response_packets=self._counts[2],
                response_bytes=self._counts[3],
            )
        )


class HttpConnection(Connection):
    """HTTP/1.x: a FIFO of requests, each paired with the next response."""

    __slots__ = (
        "_current",
        "_fast",
        "_max_pending",
        "_pending",
        "_req_framer",
        "_resp_framer",
        "_resync",
        "_switched",
    )

    def __init__(
        self,
        endpoints: Endpoints,
        limits: ReassemblyLimits,
        stats: Stats,
        out: list[Session],
        *,
        synced: bool,
        max_pending: int = 64,
        max_header_bytes: int = 65536,
        fast_path: bool = True,
        synced_response: bool | None = None,
    ) -> None:
        super().__init__(endpoints, limits, stats, out)
        self._fast = fast_path
        self._req_framer = Framer(
            Kind.REQUEST,
            self,
            synced=synced,
            max_header_bytes=max_header_bytes,
            budget=stats.budget,
        )
        self._resp_framer = Framer(
            Kind.RESPONSE,
            self,
            synced=synced if synced_response is None else synced_response,
            max_header_bytes=max_header_bytes,
            budget=stats.budget,
        )
        self._pending: deque[_Pending] = deque()
        self._current: tuple[_Pending, Head, int] | None = None  # request, response head, ts
        self._max_pending = max_pending
        # A response went unpaired: requests that surface later (from behind
        # a hole) may already have had theirs.
        self._resync = False
        self._switched: Switched | None = None

    def feed(self, seg: Segment) -> None:
        # The common segment: payload, next in order, no SYN/FIN/RST. It skips
        # the reassembler's queue and the Chunk objects; anything else, or a
        # connection built with fast_path=False (the tests' reference), takes
        # the general path.
        length = seg.payload_len
        if not self._fast or not length or seg.flags & _SYN_FIN_RST:
            super().feed(seg)
            return
        is_req = seg.direction is Direction.REQUEST
        stream, other = (self.req, self.resp) if is_req else (self.resp, self.req)
        if other.has_pending or not seg.flags & ACK:
            super().feed(seg)
            return
        offset = stream.take_next(seg.seq & 0xFFFFFFFF, length)
        if offset is None:
            super().feed(seg)
            return
        other.note_peer_ack(seg.ack)
        self.last_ts = seg.ts_ns
        tail = seg.tail
        (self._req_framer if is_req else self._resp_framer).feed_run(
            offset, length, known_bytes(seg.payload, tail, length), tail, seg.ts_ns,
            seg.packets, seg.ack,
        )  # fmt: skip

    def on_chunk(self, is_req: bool, chunk: Chunk, ack: int) -> None:
        framer = self._req_framer if is_req else self._resp_framer
        framer.feed(chunk, ack)

    # -- MessageSink ---------------------------------------------------------------

    def message_head(self, kind: Kind, head: Head, ts_ns: int, ack: int) -> str | None:
        if kind is Kind.REQUEST:
            if len(self._pending) >= self._max_pending:
                self._pending.popleft()
                self.stats.dropped_requests += 1
            start_seq = self.req.seq_at(self._req_framer.start_offset)
            self._pending.append(_Pending(head, ts_ns, start_seq, ack))
            return None
        if self._resp_framer.lost_start or self._resync:
            self._resp_framer.lost_start = self._resync = False
            self._drop_unanswered()
        if 100 <= head.status_code < 200 and head.status_code != 101:
            return None  # interim: the final response answers the request
        request = self._pair(ack)
        if request is None:
            self.stats.unpaired_responses += 1
            self._resync = True
            self._current = None
            return None
        request.answered = True
        self._current = (request, head, ts_ns)
        if head.status_code == 101 or (
            request.head.method == "CONNECT" and 200 <= head.status_code < 300
        ):
            self._req_framer.upgraded()
            if head.status_code == 101:
                self._upgraded(request, head)
        return request.head.method

    def message_end(self, kind: Kind, ts_ns: int, body_size: int | None) -> None:
        if kind is Kind.REQUEST:
            for p in reversed(self._pending):
                if not p.ended:
                    # The framer ends messages in order: this is the newest open one.
                    p.ended = True
                    p.body_size = body_size
                    p.packets = max(1, self._req_framer.message_packets)
                    p.bytes = self._req_framer.message_bytes
                    break
            return
        current = self._current
        if current is None:
            return
        self._current = None
        request, head, _ = current
        self._take(request)
        framer = self._resp_framer
        self._emit(
            request,
            head,
            ts_ns,
            Outcome.COMPLETE,
            body_size,
            max(1, framer.message_packets),
            framer.message_bytes,
        )

    def message_error(self, kind: Kind, reason: str) -> None:
        self.stats.not_traced(PARSE_ERROR, self.endpoints.server_port)

    def message_truncated(self, kind: Kind) -> None:
        self.stats.not_traced(TRUNCATED, self.endpoints.server_port)

    # -- protocol switches (see switch.py) --------------------------------------------

    def foreign(self, kind: Kind, chunk: Chunk) -> bool:
        from . import switch  # (it builds on this module)

        if kind is not Kind.REQUEST:
            return False
        if self._switched is None:
            self._switched = switch.detect(
                self.endpoints, self.stats, self.out, chunk,
                server_started=self.resp.position > 0,
                max_header_bytes=self._req_framer.max_header_bytes,
            )  # fmt: skip
            if self._switched is None:
                if not (
                    chunk.offset == 0
                    and self.req.syn_seen
                    and chunk.data
                    and not self._req_framer.could_start(chunk.data)
                ):
                    return False  # HTTP/1.x gone wrong: a parse error
                # A connection's first bytes that are no protocol of the port:
                # nothing more of it is parsed.
                self.stats.not_traced(UNRECOGNIZED, self.endpoints.server_port, chunk.data)
                self._switched = switch.Ignored()
            self._fast = False
            self._resp_framer.upgraded()
            return True
        self._switched.feed(True, chunk)  # the preface after an Upgrade request's body
        return True

    def tunnel(self, kind: Kind, chunk: Chunk) -> None:
        if self._switched is not None:
            self._switched.feed(kind is Kind.REQUEST, chunk)

    def _upgraded(self, request: _Pending, head: Head) -> None:
        """A 101 to h2c: the request is stream 1 of the HTTP/2 connection that follows."""
        from . import switch

        if not switch.is_h2c(head.headers) or self._switched is not None:
            return
        streams = switch.h2c(
            self.endpoints, self.stats, self.out,
            max_header_bytes=self._req_framer.max_header_bytes,
        )  # fmt: skip
        self._current = None
        self._take(request)
        rh = request.head
        streams.upgraded(
            request.start_ts, rh.method, rh.target, rh.headers, request.body_size,
            max(1, request.packets), request.bytes,
        )  # fmt: skip
        self._switched = streams
        self._fast = False

    # -- endings -------------------------------------------------------------------

    def on_fin(self, is_req: bool, ts_ns: int) -> None:
        if not is_req:
            self._resp_framer.close(ts_ns)
        else:
            self._req_framer.close(ts_ns)

    def release(self) -> None:
        super().release()
        self._req_framer.release()
        self._resp_framer.release()
        if self._switched is not None:
            self._switched.release()

    def on_end(self, outcome: Outcome, ts_ns: int) -> None:
        """Requests still open when the connection ends become error sessions."""
        current = self._current
        self._current = None
        if current is not None:
            request, head, _ = current
            self._take(request)
            framer = self._resp_framer
            self._emit(
                request,
                head,
                ts_ns,
                outcome,
                None,
                max(1, framer.message_packets),
                framer.message_bytes,
            )
        while self._pending:
            request = self._pending[0]
            self._take(request)
            self._emit(request, None, ts_ns, outcome, None, 0, 0)
        if self._switched is not None:
            self._switched.end(outcome, ts_ns)

    # -- helpers ---------------------------------------------------------------------

    def _take(self, request: _Pending) -> None:
        """Remove a request from the FIFO, keeping what was seen of it."""
        if not request.ended and self._pending and self._pending[-1] is request:
            # Answered (or cut off) before its body was complete: count what we saw.
            request.packets = max(1, self._req_framer.message_packets)
            request.bytes = self._req_framer.message_bytes
        pending = self._pending
        if pending and pending[0] is request:
            pending.popleft()  # the usual case: answered in order
        elif request in pending:
            pending.remove(request)

    def _drop_unanswered(self) -> None:
        """A response was lost or unpaired: drop the requests it answered.

        A request's response starts at or after the client's ack when it
        sent it, and a client that waits for each response acks all of the
        previous one. So a request whose ack lies before the response
        starting now was answered in the lost bytes. Pairing it with this
        response would be wrong; it is counted and dropped. (A pipelining
        client sends requests before earlier responses arrive: a loss then
        costs the requests in flight, never a wrong pairing.)
        """
        pending = self._pending
        at = self.resp.seq_at(self._resp_framer.start_offset)
        while pending:
            q = pending[0]
            if q.answered or not q.resp_ack or seq_diff(q.resp_ack, at) >= 0:
                return
            pending.popleft()
            self.stats.lost_responses += 1
            self.stats.not_traced(LOST, self.endpoints.server_port)

    def _pair(self, ack: int) -> _Pending | None:
        """The oldest unanswered request this response can answer.

        A server answers only what it has begun to receive, so a response whose
        ack does not pass a request's first byte answers an earlier request we
        never saw (tracing started between the two).
        """
        for p in self._pending:
            if p.answered:
                continue
            if ack and seq_diff(ack, p.start_seq) <= 0:
                return None
            return p
        return None

    def _emit(
        self,
        request: _Pending,
        head: Head | None,
        end_ts: int,
        outcome: Outcome,
        body_size: int | None,
        packets: int,
        nbytes: int,
    ) -> None:
        e = self.endpoints
        rh = request.head
        response = None
        if head is not None:
            response = _build_response(
                head.status_code, head.reason, head.version, head.headers, body_size,
                head.truncated,
            )  # fmt: skip
        self.out.append(
            _build_session(
                e.role, e.protocol, e.ifindex, e.family,
                e.client_addr, e.client_port, e.server_addr, e.server_port,
                request.start_ts, max(end_ts, request.start_ts), outcome,
                _build_request(
                    rh.method, rh.target, rh.version, rh.headers, request.body_size,
                    rh.truncated,
                ),
                response,
                request.packets, request.bytes,
                packets if head is not None else 0, nbytes if head is not None else 0,
                "", (),
            )
        )  # fmt: skip


# One to three per exchange: positional builders (see frozen.py), field order.
_build_session = builder(Session)
_build_request = builder(HttpRequest)
_build_response = builder(HttpResponse)
