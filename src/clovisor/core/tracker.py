"""The core's entry point: segments of many connections in, sessions out.

With pairing in the kernel, the records also carry exchanges the classifier
paired (each one a session at once) and handovers: the classifier stops
pairing a connection, and its segments follow from the boundaries given.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .budget import Budget
from .events import (
    SYN,
    Direction,
    Exchange,
    Handover,
    Outcome,
    Protocol,
    Record,
    Role,
    Segment,
    Session,
)
from .exchange import exchange_session
from .http2 import Http2Connection
from .reassembly import ReassemblyLimits, seq_diff
from .sessions import (
    UNRECOGNIZED,
    Connection,
    ConnectionFactory,
    Endpoints,
    HttpConnection,
    Stats,
    TcpConnection,
)

ParserLookup = Callable[[int], ConnectionFactory | None]

ConnKey = tuple[int, int, bytes, int, bytes, int]  # ifindex, role, client, cport, server, sport


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Memory and time bounds of the core (documented in the README)."""

    max_connections: int = 16384
    max_pending_requests: int = 64  # per connection (pipelining depth kept)
    max_header_bytes: int = 65536  # a header block larger than this is an error
    idle_timeout_ns: int = 30_000_000_000  # a pending request then becomes a TIMEOUT
    max_buffered_bytes: int = 32 << 20  # payload bytes held across segments, all connections
    max_http2_streams: int = 256  # open streams kept per HTTP/2 connection
    reassembly: ReassemblyLimits = field(default_factory=ReassemblyLimits)


class TrackerStats:
    """Totals for the operator (``clovisor trace`` prints them at exit)."""

    __slots__ = (
        "_conn_stats",
        "connections",
        "evicted",
        "exchanges",
        "handovers",
        "segments",
        "sessions",
    )

    def __init__(self, conn_stats: Stats) -> None:
        self.segments = 0
        self.exchanges = 0  # exchanges paired in the kernel (records, and held ones ended here)
        self.handovers = 0  # connections the kernel handed over
        self.sessions = 0
        self.connections = 0  # connections ever tracked
        self.evicted = 0  # dropped because the table was full
        self._conn_stats = conn_stats

    @property
    def parse_errors(self) -> int:
        return self._conn_stats.parse_errors

    @property
    def unpaired_responses(self) -> int:
        return self._conn_stats.unpaired_responses

    @property
    def dropped_requests(self) -> int:
        return self._conn_stats.dropped_requests

    @property
    def lost_responses(self) -> int:
        """Requests dropped because their response was among lost records."""
        return self._conn_stats.lost_responses

    @property
    def encrypted(self) -> int:
        """Connections that began with a TLS ClientHello."""
        return self._conn_stats.encrypted

    @property
    def framing_lost(self) -> int:
        """Times an HTTP/2 direction lost its frame boundaries (capture or loss)."""
        return self._conn_stats.framing_lost

    @property
    def untraced(self) -> dict[tuple[str, int], int]:
        """(reason, server port) -> count of what was not traced, and why (a copy)."""
        return dict(self._conn_stats.untraced)

    @property
    def unrecognized(self) -> int:
        return sum(n for (r, _), n in self._conn_stats.untraced.items() if r == UNRECOGNIZED)

    @property
    def buffered_bytes(self) -> int:
        return self._conn_stats.budget.used

    @property
    def budget_refusals(self) -> int:
        return self._conn_stats.budget.refused

    def as_dict(self) -> dict[str, int]:
        return {
            "segments": self.segments,
            "exchanges": self.exchanges,
            "handovers": self.handovers,
            "sessions": self.sessions,
            "connections": self.connections,
            "evicted": self.evicted,
            "parse_errors": self.parse_errors,
            "unpaired_responses": self.unpaired_responses,
            "dropped_requests": self.dropped_requests,
            "lost_responses": self.lost_responses,
            "encrypted": self.encrypted,
            "unrecognized": self.unrecognized,
            "http2_framing_lost": self.framing_lost,
            "buffered_bytes": self.buffered_bytes,
            "budget_refusals": self.budget_refusals,
        }


class Tracker:
    """Tracks every traced connection; sans-I/O, single-threaded.

    Time only moves with the data: segment timestamps and the ``now_ns`` the
    caller passes to :meth:`advance` (both kernel CLOCK_MONOTONIC).
    """

    def __init__(
        self,
        limits: Limits | None = None,
        parsers: ParserLookup | None = None,
        *,
        fast_path: bool = True,
    ) -> None:
        self.limits = limits or Limits()
        self._fast_path = fast_path  # False: only the general path (a reference for tests)
        self._parsers = parsers
        self._conns: OrderedDict[ConnKey, Connection] = OrderedDict()
        self._conn_stats = Stats(Budget(self.limits.max_buffered_bytes))
        self.stats = TrackerStats(self._conn_stats)
        self._out: list[Session] = []
        self._addr_cache: dict[bytes, str] = {}
        self._now = 0

    def __len__(self) -> int:
        return len(self._conns)

    def take_samples(self) -> list[tuple[int, bytes]]:
        """(server port, first bytes) of the unrecognized connections since the last call."""
        samples = self._conn_stats.samples
        if not samples:
            return []
        out = samples[:]
        samples.clear()
        return out

    def feed(self, record: Record) -> list[Session]:
        """Process one record; return the sessions it completed."""
        return self.feed_many((record,))

    def feed_many(self, records: Iterable[Record]) -> list[Session]:
        for rec in records:
            if type(rec) is Segment:
                self._feed(rec)
            elif type(rec) is Exchange:
                self._exchange(rec, Outcome.COMPLETE, None)
            else:
                assert type(rec) is Handover
                self._handover(rec)
        return self._take()

    def end_held(self, held: Iterable[Exchange], outcome: Outcome, now_ns: int) -> list[Session]:
        """Exchanges the kernel held and gave up on (``outcome``, decided at ``now_ns``)."""
        for ex in held:
            self._exchange(ex, outcome, now_ns)
        return self._take()

    def advance(self, now_ns: int) -> list[Session]:
        """Let time pass: idle connections end, stale holes are skipped."""
        self._now = max(self._now, now_ns)
        timeout = self.limits.idle_timeout_ns
        conns = self._conns
        while conns:
            key, conn = next(iter(conns.items()))
            if now_ns - conn.last_ts <= timeout:
                break
            del conns[key]
            conn.flush_and_end(Outcome.TIMEOUT, now_ns)
        gap = self.limits.reassembly.gap_timeout_ns
        for conn in list(conns.values()):
            if now_ns - conn.last_ts > gap and (conn.req.has_pending or conn.resp.has_pending):
                conn.expire(now_ns)
        return self._take()

    def close(self, held: Iterable[Exchange] = ()) -> list[Session]:
        """The tracer is stopping: every pending request becomes a session,
        the ones the kernel still ``held`` too."""
        for conn in self._conns.values():
            conn.flush_and_end(Outcome.SHUTDOWN, max(self._now, conn.last_ts))
        self._conns.clear()
        for ex in held:
            self._exchange(ex, Outcome.SHUTDOWN, max(self._now, ex.end_ns))
        return self._take()

    # -- internals ---------------------------------------------------------------

    def _take(self) -> list[Session]:
        # Connections append to self._out, so it is emptied, never replaced.
        if not self._out:
            return []
        out = self._out[:]
        self._out.clear()
        self.stats.sessions += len(out)
        return out

    def _feed(self, seg: Segment) -> None:
        self.stats.segments += 1
        if seg.ts_ns > self._now:
            self._now = seg.ts_ns
        if seg.direction is Direction.REQUEST:
            key = (seg.ifindex, seg.role, seg.saddr, seg.sport, seg.daddr, seg.dport)
        else:
            key = (seg.ifindex, seg.role, seg.daddr, seg.dport, seg.saddr, seg.sport)
        conns = self._conns
        conn = conns.get(key)
        if (
            conn is not None
            and seg.flags & SYN
            and seg.direction is Direction.REQUEST
            and seq_diff((seg.seq + 1) & 0xFFFFFFFF, conn.req.seq_at(0)) != 0
        ):
            # A new SYN on a known 4-tuple: the port was reused; start afresh.
            del conns[key]
            conn.flush_and_end(Outcome.CLOSED, seg.ts_ns)
            conn = None
        if conn is None:
            if not seg.payload_len and not seg.flags & SYN:
                return  # a bare FIN/RST of a connection we never saw: nothing to say
            conn = self._new_connection(key, seg)
        else:
            conns.move_to_end(key)
        conn.feed(seg)
        if conn.finished:
            conns.pop(key, None)
            conn.release()

    def _exchange(self, ex: Exchange, outcome: Outcome, end_ns: int | None) -> None:
        self.stats.exchanges += 1
        if ex.end_ns > self._now:
            self._now = ex.end_ns
        session = exchange_session(
            ex, self._addr(ex.client_addr), self._addr(ex.server_addr),
            outcome=outcome, end_ns=end_ns,
        )  # fmt: skip
        if session is None:
            self._conn_stats.parse_errors += 1
        else:
            self._out.append(session)

    def _handover(self, h: Handover) -> None:
        """The kernel stops pairing a connection: frame it here from its boundaries."""
        self.stats.handovers += 1
        if h.ts_ns > self._now:
            self._now = h.ts_ns
        key = (h.ifindex, h.role, h.client_addr, h.client_port, h.server_addr, h.server_port)
        stale = self._conns.pop(key, None)
        if stale is not None:
            stale.flush_and_end(Outcome.CLOSED, h.ts_ns)
        self._make_room(h.ts_ns)
        lim = self.limits
        conn = HttpConnection(
            self._endpoints(key, h.role, Protocol.HTTP, h.family),
            lim.reassembly,
            self._conn_stats,
            self._out,
            synced=h.req_seq is not None,
            synced_response=h.resp_seq is not None,
            max_pending=lim.max_pending_requests,
            max_header_bytes=lim.max_header_bytes,
            fast_path=self._fast_path,
        )
        if h.req_seq is not None:
            conn.req.anchor(h.req_seq, at_start=h.at_start)
        if h.resp_seq is not None:
            conn.resp.anchor(h.resp_seq)
        conn.last_ts = h.ts_ns
        self._conns[key] = conn
        self.stats.connections += 1

    def _make_room(self, ts_ns: int) -> None:
        conns = self._conns
        if len(conns) >= self.limits.max_connections:
            old_key, old = next(iter(conns.items()))
            del conns[old_key]
            old.flush_and_end(Outcome.TIMEOUT, ts_ns)
            self.stats.evicted += 1

    def _endpoints(self, key: ConnKey, role: Role, protocol: int, family: int) -> Endpoints:
        ifindex, _role, client, cport, server, sport = key
        return Endpoints(
            role=role,
            protocol=protocol,
            ifindex=ifindex,
            family=family,
            client_addr=self._addr(client),
            client_port=cport,
            server_addr=self._addr(server),
            server_port=sport,
        )

    def _new_connection(self, key: ConnKey, seg: Segment) -> Connection:
        conns = self._conns
        self._make_room(seg.ts_ns)
        endpoints = self._endpoints(key, seg.role, seg.protocol, seg.family)
        lim = self.limits
        conn: Connection
        if seg.protocol == Protocol.HTTP:
            # Only a connection seen from its SYN is known to be at a message boundary.
            conn = HttpConnection(
                endpoints,
                lim.reassembly,
                self._conn_stats,
                self._out,
                synced=bool(seg.flags & SYN),
                max_pending=lim.max_pending_requests,
                max_header_bytes=lim.max_header_bytes,
                fast_path=self._fast_path,
            )
        elif seg.protocol == Protocol.TCP:
            conn = TcpConnection(endpoints, lim.reassembly, self._conn_stats, self._out)
        elif seg.protocol == Protocol.HTTP2 or seg.protocol == Protocol.GRPC:
            conn = Http2Connection(
                endpoints,
                lim.reassembly,
                self._conn_stats,
                self._out,
                synced=bool(seg.flags & SYN),
                grpc=seg.protocol == Protocol.GRPC,
                max_streams=lim.max_http2_streams,
                max_header_bytes=lim.max_header_bytes,
            )
        else:
            conn = self._plugin_connection(endpoints, seg)
        conns[key] = conn
        self.stats.connections += 1
        return conn

    def _plugin_connection(self, endpoints: Endpoints, seg: Segment) -> Connection:
        lim = self.limits
        factory = self._parsers(seg.protocol) if self._parsers is not None else None
        if factory is not None:
            try:
                return factory(
                    endpoints, lim.reassembly, self._conn_stats, self._out,
                    synced=bool(seg.flags & SYN),
                )
            except Exception:
                self._conn_stats.parse_errors += 1  # a broken plugin costs its connection
        # No parser (unloaded or disabled): connection-level accounting still works.
        return TcpConnection(endpoints, lim.reassembly, self._conn_stats, self._out)

    def _addr(self, raw: bytes) -> str:
        s = self._addr_cache.get(raw)
        if s is None:
            s = str(ipaddress.ip_address(raw))
            if len(self._addr_cache) > 4096:
                self._addr_cache.clear()
            self._addr_cache[raw] = s
        return s
