"""Example plugin: newline-delimited request/response protocols.

Each line the client sends is a request; each line the server sends answers
the oldest unanswered request (memcached's and Redis's inline text
commands, many health-check and chat-style protocols). One session per
request line, from its first byte to the newline of its answer.

Enable it with ``HSET clovisor_proto_cfg lineproto lineproto`` and name
the service port ``lineproto`` (or ``lineproto-<anything>``).

Limits, as every plugin should state them:

* Lines are found by their ``\\n`` in the captured bytes (the segment's
  prefix and its last bytes); a newline in the uncaptured middle of a long
  segment is not seen, and that line runs on into the next one.
* At most ``max_pending`` (64) unanswered requests are kept per connection;
  older ones are dropped and counted in ``stats.dropped_requests``.
* It holds no payload bytes between chunks, so it needs nothing from the
  byte budget.
* A connection picked up mid-stream (``synced`` false) skips each
  direction up to its first newline; answers to requests it never saw are
  counted in ``stats.unpaired_responses``.
"""

from __future__ import annotations

from collections import deque

from ..core.events import Outcome, Session
from ..core.reassembly import Chunk, ReassemblyLimits
from ..core.sessions import Connection, Endpoints, Stats


class _Line:
    """The line being received in one direction."""

    __slots__ = ("bytes", "packets", "start_ts", "started")

    def __init__(self) -> None:
        self.started = False
        self.start_ts = 0
        self.bytes = 0
        self.packets = 0

    def add(self, n: int, ts_ns: int, packets: int) -> None:
        if not self.started:
            self.started = True
            self.start_ts = ts_ns
        self.bytes += n
        self.packets += packets

    def take(self) -> tuple[int, int, int]:
        """(start_ts, bytes, packets) of the finished line; starts the next one."""
        done = (self.start_ts, self.bytes, max(1, self.packets))
        self.started = False
        self.start_ts = self.bytes = self.packets = 0
        return done


def newlines(chunk: Chunk) -> list[int]:
    """Offsets (within the chunk) of every ``\\n`` among its captured bytes."""
    out: list[int] = []
    data = chunk.data
    complete = len(data) >= chunk.length
    if complete:
        data = data[: chunk.length]
    i = data.find(b"\n")
    while i >= 0:
        out.append(i)
        i = data.find(b"\n", i + 1)
    if not complete and chunk.tail:
        base = chunk.length - len(chunk.tail)
        i = chunk.tail.find(b"\n")
        while i >= 0:
            if base + i >= len(data):  # not already seen in the prefix
                out.append(base + i)
            i = chunk.tail.find(b"\n", i + 1)
    return out


class LineConnection(Connection):
    """Pairs the n-th request line with the n-th response line."""

    __slots__ = ("_max_pending", "_pending", "_req_line", "_resp_line", "_skip")

    def __init__(
        self,
        endpoints: Endpoints,
        limits: ReassemblyLimits,
        stats: Stats,
        out: list[Session],
        *,
        synced: bool,
        max_pending: int = 64,
    ) -> None:
        super().__init__(endpoints, limits, stats, out)
        self._req_line = _Line()
        self._resp_line = _Line()
        self._pending: deque[tuple[int, int, int]] = deque()  # (start_ts, bytes, packets)
        self._max_pending = max_pending
        # Mid-stream, the first bytes of each direction are the end of a line
        # whose start we missed: [request, response] skip up to a newline.
        self._skip = [not synced, not synced]

    def on_chunk(self, is_req: bool, chunk: Chunk, ack: int) -> None:
        line = self._req_line if is_req else self._resp_line
        side = 0 if is_req else 1
        packets = chunk.packets  # credited to the first line the chunk touches
        pos = 0
        for nl in newlines(chunk):
            end = nl + 1
            if self._skip[side]:
                self._skip[side] = False
            else:
                line.add(end - pos, chunk.ts_ns, packets)
                packets = 0
                if is_req:
                    self._request_done(line.take())
                else:
                    self._response_done(line.take(), chunk.ts_ns)
            pos = end
        if pos < chunk.length and not self._skip[side]:
            line.add(chunk.length - pos, chunk.ts_ns, packets)

    def _request_done(self, request: tuple[int, int, int]) -> None:
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.stats.dropped_requests += 1
        self._pending.append(request)

    def _response_done(self, response: tuple[int, int, int], ts_ns: int) -> None:
        if not self._pending:
            self.stats.unpaired_responses += 1
            return
        self._emit(self._pending.popleft(), response, ts_ns, Outcome.COMPLETE)

    def on_fin(self, is_req: bool, ts_ns: int) -> None:
        return None  # on_end decides: a half-closed connection may still answer

    def on_end(self, outcome: Outcome, ts_ns: int) -> None:
        if self._req_line.started:
            # A request cut off before its newline still happened.
            self._request_done(self._req_line.take())
        partial = self._resp_line.take() if self._resp_line.started else None
        while self._pending:
            request = self._pending.popleft()
            self._emit(request, partial, ts_ns, outcome)
            partial = None  # a partial answer belongs to the oldest request only

    def _emit(
        self,
        request: tuple[int, int, int],
        response: tuple[int, int, int] | None,
        end_ns: int,
        outcome: Outcome,
    ) -> None:
        start_ns, req_bytes, req_packets = request
        _, resp_bytes, resp_packets = response or (0, 0, 0)
        self.out.append(
            self.endpoints.session(
                start_ns=start_ns,
                end_ns=max(end_ns, start_ns),
                outcome=outcome,
                request_packets=req_packets,
                request_bytes=req_bytes,
                response_packets=resp_packets,
                response_bytes=resp_bytes,
                protocol_name="lineproto",
            )
        )


PARSER = LineConnection
