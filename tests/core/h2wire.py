"""Real HTTP/2 byte streams: python-hyper's h2 client and server talking in memory.

Every write either side makes is kept in order, as the classifier would see
it, and can be turned into segments of a :class:`Conversation` cut as a
test likes (whole writes, one frame per segment, MSS-sized, one byte).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import h2.config
import h2.connection
import h2.events
import h2.settings

from clovisor.core.events import Direction, Segment
from clovisor.core.h2frames import H2_FRAME

from .wire import Conversation

REQ, RESP = Direction.REQUEST, Direction.RESPONSE
Headers = list[tuple[str, str]]


def grpc_request(path: str, *, tag: str = "", extra: Headers | None = None) -> Headers:
    h = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "greeter.default.svc:50051"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "grpc-python/1.66.0"),
        ("authorization", "Bearer secret"),
    ]
    if tag:
        h.append(("x-request-id", tag))
    return h + (extra or [])


def get(path: str, *, tag: str = "") -> Headers:
    h = [(":method", "GET"), (":scheme", "http"), (":path", path), (":authority", "web:8080"),
         ("user-agent", "curl/8.5.0")]  # fmt: skip
    if tag:
        h.append(("x-request-id", tag))
    return h


class H2Pair:
    """A client and a server h2 connection wired together; ``writes`` is the wire."""

    def __init__(self, *, window: int = 65535, preface: bool = True) -> None:
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="latin-1")
        )
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        )
        self.writes: list[tuple[Direction, bytes]] = []
        self.received: dict[int, list[h2.events.Event]] = {}
        if preface:
            self.client.initiate_connection()
            self.flush()
            self.server.initiate_connection()
            self.flush()
        if window > 65535:
            for conn in (self.client, self.server):
                conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
                conn.increment_flow_control_window(window)
            self.flush()

    def flush(self) -> None:
        """Deliver what each side wrote until both are quiet (acks, window updates)."""
        while True:
            moved = False
            for d, src, dst in ((REQ, self.client, self.server), (RESP, self.server, self.client)):
                data = src.data_to_send()
                if not data:
                    continue
                moved = True
                self.writes.append((d, data))
                for ev in dst.receive_data(data):
                    sid = getattr(ev, "stream_id", None)
                    if isinstance(ev, h2.events.DataReceived):
                        dst.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if sid is not None:
                        self.received.setdefault(sid, []).append(ev)
            if not moved:
                return

    def request(self, headers: Headers, body: bytes = b"", *, end: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end and not body)
        self.flush()
        if body:
            self.send_body(self.client, sid, body, end=end)
        return sid

    def respond(
        self, sid: int, status: int = 200, body: bytes = b"", *,
        headers: Headers | None = None, trailers: Headers | None = None,
    ) -> None:  # fmt: skip
        h = [(":status", str(status)), ("content-type", "application/grpc"), *(headers or [])]
        self.server.send_headers(sid, h, end_stream=not body and not trailers)
        self.flush()
        if body:
            self.send_body(self.server, sid, body, end=not trailers)
        if trailers:
            self.server.send_headers(sid, trailers, end_stream=True)
            self.flush()

    def send_body(
        self, conn: h2.connection.H2Connection, sid: int, body: bytes, *, end: bool,
        frame_writes: bool = True,
    ) -> None:  # fmt: skip
        """Each DATA frame its own write by default (as a writer flushing per frame)."""
        pos = 0
        while pos < len(body):
            n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size,
                    len(body) - pos)  # fmt: skip
            if n <= 0:
                self.flush()
                continue
            conn.send_data(sid, body[pos : pos + n], end_stream=end and pos + n == len(body))
            pos += n
            if frame_writes:
                self.flush()
        self.flush()

    def segments(
        self,
        conv: Conversation,
        cut: Callable[[Direction, bytes], Iterable[int] | None] = lambda d, b: None,
        start: int = 0,
    ) -> list[Segment]:
        """The writes from index ``start`` as segments of ``conv``, each cut by ``cut``."""
        out: list[Segment] = []
        for d, data in self.writes[start:]:
            out += conv.send(d, data, cut(d, data))
        return out

    def skip(self, conv: Conversation, start: int, stop: int) -> None:
        """Writes the tracer never saw (before it started): sequence numbers move on."""
        for d, data in self.writes[start:stop]:
            conv.seq[d] += len(data)


def frames(data: bytes) -> list[int]:
    """Sizes that cut a write at its frame boundaries (the preface is one piece)."""
    sizes = []
    pos = 0
    if data.startswith(b"PRI * HTTP/2.0"):
        sizes.append(24)
        pos = 24
    while pos + 9 <= len(data):
        n = 9 + int.from_bytes(data[pos : pos + 3], "big")
        sizes.append(n)
        pos += n
    return sizes


def with_kernel_frames(segs: list[Segment], capture: int, isn: dict[Direction, int],
                       *, skip: int = 0) -> list[Segment]:  # fmt: skip
    """The segments as the classifier reports them on a port declared HTTP/2:
    each carries the frame headers its captured prefix does not hold whole
    (``clv_h2_frame`` records), found by walking the direction's frames from
    its first byte (the client's after the preface). ``skip``: walk only
    segments from that index (the classifier had no state before)."""
    streams: dict[Direction, bytearray] = {REQ: bytearray(), RESP: bytearray()}
    placed: list[tuple[Segment, int]] = []
    for seg in segs:
        off = (seg.seq - isn[seg.direction] - 1) & 0xFFFFFFFF
        placed.append((seg, off))
    # Each direction's whole stream, from segments built with a full capture.
    heads: dict[Direction, list[int]] = {}
    for d in (REQ, RESP):
        data = streams[d]
        for seg, off in placed:
            if seg.direction is d and seg.payload_len:
                assert len(seg.payload) == seg.payload_len, "build with a full capture"
                if off == len(data):
                    data += seg.payload
        pos = 24 if d is REQ else 0
        heads[d] = []
        while pos + 9 <= len(data):
            heads[d].append(pos)
            pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
    out = []
    for i, (seg, off) in enumerate(placed):
        n = seg.payload_len
        data = streams[seg.direction]
        frames = b""
        if i >= skip and n:
            for h in heads[seg.direction]:
                if off <= h and h + 9 <= off + n and h + 9 > off + capture:
                    head = bytes(data[h : h + 9])
                    peek = b"" if head[3] == 0 else bytes(
                        data[h + 9 : min(h + 9 + int.from_bytes(head[:3], "big"), off + n)]
                    )[:48]
                    frames += H2_FRAME.pack(h - off, head, len(peek), peek)
        cap = seg.payload[:capture]
        tail = seg.payload[-min(16, n - len(cap)):] if n > len(cap) else b""
        out.append(seg._replace(payload=cap, tail=tail, frames=frames))
    return out
