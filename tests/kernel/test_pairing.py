"""HTTP/1.x exchanges paired in the classifier (``pair_http``).

Hand-made packets through BPF_PROG_TEST_RUN, each conversation twice: once
to an object that pairs, once to one that sends every segment (the
user-space framer is the truth). Both record streams go through the
tracker, and the sessions must be the same, only the timestamps differ
(they are taken when the packets run). What the classifier sent is checked
too: exchanges only where it can frame the traffic exactly, a handover
with its reason everywhere else.

Real traffic through veths is in ``test_pairing_live.py``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

from clovisor.core.events import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    Exchange,
    Handover,
    Outcome,
    Phase,
    Protocol,
    Record,
    Role,
    Segment,
    Session,
)
from clovisor.core.tracker import Limits, Tracker
from clovisor.kernel.abi import HandoverReason, Method
from clovisor.kernel.loader import BpfObject, RedKey
from clovisor.kernel.ringbuf import RingReader

from .conftest import TC_ACT_UNSPEC, test_run
from .test_datapath import CLIENT4, CLIENT6, LO, SERVER4, SERVER6, eth4, eth6, ipv4, ipv6, tcp

pytestmark = pytest.mark.kernel

Factory = Callable[..., BpfObject]
PORT = 8080
R = HandoverReason


class Wire:
    """Frames of one TCP connection between a client and the traced port."""

    def __init__(self, cport: int = 40000, *, v6: bool = False, client_isn: int = 1000,
                 server_isn: int = 5000) -> None:
        self.cport, self.v6 = cport, v6
        self.cseq, self.sseq = client_isn, server_isn

    def _frame(self, client: bool, payload: bytes, seq: int, ack: int, flags: int) -> bytes:
        sport, dport = (self.cport, PORT) if client else (PORT, self.cport)
        seg = tcp(sport, dport, payload, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF, flags=flags)
        if self.v6:
            src, dst = (CLIENT6, SERVER6) if client else (SERVER6, CLIENT6)
            return eth6(ipv6(seg, src=src, dst=dst))
        src, dst = (CLIENT4, SERVER4) if client else (SERVER4, CLIENT4)
        return eth4(ipv4(seg, src=src, dst=dst))

    def handshake(self) -> list[bytes]:
        out = [self._frame(True, b"", self.cseq, 0, SYN),
               self._frame(False, b"", self.sseq, self.cseq + 1, SYN | ACK)]
        self.cseq += 1
        self.sseq += 1
        return out

    def send(self, client: bool, data: bytes, sizes: Sequence[int] = (), flags: int = ACK | PSH,
             ) -> list[bytes]:
        """Segments carrying data, cut at the given sizes (the rest in one)."""
        out, pos = [], 0
        for n in [*sizes, len(data)]:
            piece = data[pos : pos + n]
            if not piece:
                break
            seq, ack = (self.cseq, self.sseq) if client else (self.sseq, self.cseq)
            out.append(self._frame(client, piece, seq, ack, flags))
            pos += len(piece)
            if client:
                self.cseq += len(piece)
            else:
                self.sseq += len(piece)
        return out

    def req(self, data: bytes, sizes: Sequence[int] = ()) -> list[bytes]:
        return self.send(True, data, sizes)

    def resp(self, data: bytes, sizes: Sequence[int] = ()) -> list[bytes]:
        return self.send(False, data, sizes)

    def fin(self, client: bool) -> list[bytes]:
        seq, ack = (self.cseq, self.sseq) if client else (self.sseq, self.cseq)
        if client:
            self.cseq += 1
        else:
            self.sseq += 1
        return [self._frame(client, b"", seq, ack, FIN | ACK)]

    def rst(self, client: bool) -> list[bytes]:
        seq, ack = (self.cseq, self.sseq) if client else (self.sseq, self.cseq)
        return [self._frame(client, b"", seq, ack, RST | ACK)]

    def close(self) -> list[bytes]:
        return self.fin(True) + self.fin(False)


def get(path: str = "/", extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: svc\r\nUser-Agent: t/1\r\nX-Request-Id: r-1\r\n"
            f"Authorization: Bearer secret\r\n{extra}\r\n").encode()


def ok(body: bytes = b"hello", status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nServer: t\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: text/plain\r\n{extra}\r\n").encode() + body


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: svc\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


@dataclass
class Side:
    """One loaded object and what its records give."""

    obj: BpfObject
    reader: RingReader
    records: list[Record] = dataclasses.field(default_factory=list)

    def run(self, frames: Sequence[bytes]) -> list[Record]:
        got: list[Record] = []
        for f in frames:
            assert test_run(self.obj.prog_fd("clv_tc_ingress"), f).retval == TC_ACT_UNSPEC
            got += self.reader.poll(0)
        self.records += got
        return got

    def sessions(self) -> list[Session]:
        t = Tracker()
        held = self.obj.held_exchanges() if self.obj.pair_http else []
        return t.feed_many(self.records) + t.close(held)


@dataclass
class Both:
    paired: Side
    framed: Side

    def run(self, frames: Sequence[bytes]) -> list[Record]:
        """Both objects see the frames; the paired object's records come back."""
        self.framed.run(frames)
        return self.paired.run(frames)

    def sessions(self) -> list[Session]:
        """The sessions, the same both ways but for the timestamps."""
        now = time.monotonic_ns()
        paired, framed = self.paired.sessions(), self.framed.sessions()
        assert [untimed(s) for s in paired] == [untimed(s) for s in framed]
        assert all(0 < s.start_ns <= s.end_ns <= now for s in paired)
        return paired

    def of_type(self, kind: type) -> list[Record]:
        return [r for r in self.paired.records if type(r) is kind]


def untimed(s: Session) -> Session:
    return dataclasses.replace(s, start_ns=0, end_ns=0)


@pytest.fixture
def both(bpf_object: Factory) -> Iterator[Both]:
    sides = []
    for pair in (True, False):
        obj = bpf_object(capture_bytes=1024, wakeup_bytes=0, pair_http=pair)
        obj.set_server_port(LO, PORT, Protocol.HTTP)
        sides.append(Side(obj, RingReader(obj)))
    try:
        yield Both(*sides)
    finally:
        for side in sides:
            side.reader.close()


def conns_entries(obj: BpfObject) -> int:
    return len(obj._keys("conns", _conn_key_type()))


def _conn_key_type() -> type:
    from clovisor.kernel.abi import clv_conn_key

    return clv_conn_key


# --- exchanges it frames -------------------------------------------------------------


def test_keep_alive_exchanges_are_one_record_each(both: Both) -> None:
    w = Wire()
    frames = w.handshake()
    frames += w.req(get("/a?x=1")) + w.resp(ok(b"x" * 300))
    created = ok(b"c" * 500, "201 Created")
    frames += w.req(post("/up", b"p" * 3000), [60, 1000]) + w.resp(created, [len(created) - 400])
    frames += w.req(b"HEAD /big HTTP/1.1\r\nHost: svc\r\n\r\n")
    frames += w.resp(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
    frames += w.req(get("/none")) + w.resp(b"HTTP/1.1 204 No Content\r\n\r\n")
    frames += w.req(get("/cached"))
    frames += w.resp(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n")
    frames += w.req(b"DELETE /x HTTP/1.0\r\ncontent-length:\t3 \r\n\r\nabc")
    frames += w.resp(b"HTTP/1.0 202\r\nCONTENT-LENGTH: 0\r\n\r\n")
    frames += w.close()
    records = both.run(frames)
    assert all(type(r) is Exchange for r in records) and len(records) == 6
    ex = records[0]
    assert isinstance(ex, Exchange)
    assert (ex.method, ex.status, ex.role, ex.family) == (Method.GET, 200, Role.SERVER, 4)
    assert (ex.client_port, ex.server_port, ex.ifindex) == (40000, PORT, LO)
    assert ex.req_seq == 1001 and ex.req_ack == 5001
    assert ex.request_head == get("/a?x=1") and ex.response_head == ok(b"x" * 300)[:-300]
    assert (ex.request_bytes, ex.request_packets) == (len(get("/a?x=1")), 1)
    assert (ex.response_bytes, ex.response_packets) == (len(ok(b"x" * 300)), 1)
    upload = records[1]
    assert isinstance(upload, Exchange)
    assert upload.request_packets == 3 and upload.response_packets == 2
    assert upload.request_bytes == len(post("/up", b"p" * 3000))
    assert [r.method for r in records if isinstance(r, Exchange)] == [
        Method.GET, Method.POST, Method.HEAD, Method.GET, Method.GET, Method.DELETE]
    sessions = both.sessions()
    assert [s.response.status_code if s.response else 0 for s in sessions] == [
        200, 201, 200, 204, 304, 202]
    assert sessions[0].request and sessions[0].request.target == "/a?x=1"
    counters = both.paired.obj.counters()
    assert counters["exchanges"] == counters["events"] == 6 and counters["handovers"] == 0
    assert conns_entries(both.paired.obj) == 0  # the FINs ended the connection


def test_ipv6_and_a_connection_picked_up_mid_stream(both: Both) -> None:
    w = Wire(v6=True)  # no handshake: tracing started while it was open
    both.run(w.req(get("/mid")) + w.resp(ok(b"y" * 10)) + w.req(get("/next")) + w.resp(ok()))
    assert [type(r) for r in both.paired.records] == [Exchange, Exchange]
    ex = both.paired.records[0]
    assert isinstance(ex, Exchange) and ex.family == 6 and len(ex.client_addr) == 16
    assert [s.request.target for s in both.sessions() if s.request] == ["/mid", "/next"]


@pytest.mark.parametrize("first", [
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40),  # a TLS hello
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    bytes(range(7, 64)),  # garbage
], ids=["tls", "h2-preface", "garbage"])
def test_a_new_connection_whose_first_bytes_are_no_request_is_handed_over_at_its_start(
    both: Both, first: bytes
) -> None:
    """After its SYN, the first bytes of a connection are its stream's start:
    user space must know it to tell a TLS hello, an HTTP/2 preface or garbage
    from the middle of a connection picked up late."""
    w = Wire()
    records = both.run(w.handshake() + w.req(first) + w.resp(b"\x15\x03\x01\x00\x02\x02\x28"))
    assert [type(r) for r in records] == [Handover, Segment, Segment]
    ho = records[0]
    assert isinstance(ho, Handover)
    assert (ho.req_seq, ho.resp_seq, ho.at_start) == (1001, 5001, True)
    t = Tracker()
    t.feed_many(records)
    stats = t.stats.as_dict()
    if first.startswith(b"\x16"):
        assert stats["encrypted"] == 1
    elif first.startswith(bytes(range(7, 10))):
        assert stats["unrecognized"] == 1 and stats["parse_errors"] == 0
    assert conns_entries(both.paired.obj) == 1
    assert not both.paired.obj._keys("syns", _conn_key_type())  # the SYN's entry is gone


def test_no_start_is_claimed_without_the_syn(both: Both) -> None:
    w = Wire()  # no handshake: picked up mid-stream
    records = both.run(w.req(bytes(range(7, 64))))
    assert [type(r) for r in records] == [Segment]
    t = Tracker()
    t.feed_many(records)
    assert t.stats.as_dict()["unrecognized"] == 0  # the middle of something, not its start


def test_a_response_to_a_request_never_seen_is_not_paired(both: Both) -> None:
    w = Wire()
    earlier = w.resp(ok(b"earlier"))  # answers a request from before tracing began
    request = w.req(get("/seen"))
    # the earlier answer's segments may still pass after our request: their ack
    # does not pass its first byte, so they answer something else
    both.run(request + earlier + w.resp(ok(b"ours")))
    assert [type(r) for r in both.paired.records] == [Exchange]
    [s] = both.sessions()
    assert s.response is not None and s.response.body_size == len(b"ours")


def test_retransmissions_are_dropped_and_overlaps_trimmed(both: Both) -> None:
    w = Wire()
    frames = w.handshake()
    req = w.req(get("/r"))
    resp = w.resp(ok(b"z" * 3000), [200, 1000, 1000])
    # the head again, then the second body segment twice, the second time
    # overlapping the third (a retransmission that brings new bytes)
    start = w.sseq - 3000 - len(ok(b""))
    overlap = Wire(server_isn=start + 700)
    overlap.cseq = w.cseq
    late = overlap.resp((ok(b"z" * 3000))[700:1700])
    frames += req + req + resp[:3] + late + resp[3:] + req
    records = both.run(frames)
    assert [type(r) for r in records] == [Exchange]
    [s] = both.sessions()
    assert s.response_bytes == len(ok(b"z" * 3000)) and s.outcome is Outcome.COMPLETE


# --- and what it hands over ---------------------------------------------------------


def _expect_100(w: Wire) -> list[bytes]:
    head = b"POST /e HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    return (w.req(head) + w.resp(b"HTTP/1.1 100 Continue\r\n\r\n") + w.req(b"hello")
            + w.resp(ok(b"done")))


def _reordered(w: Wire) -> list[bytes]:
    frames = w.req(get("/o"))
    resp = w.resp(ok(b"o" * 2000), [100, 900])
    return [*frames, resp[0], resp[2], resp[1]]


def _early(w: Wire) -> list[bytes]:
    return (w.req(post("/early", b"e" * 5000)[:200]) + w.resp(ok(b"no", "413 Too Large"))
            + w.req(b"e" * 100))


def _reuse(w: Wire) -> list[bytes]:
    frames = w.req(get("/pending"))
    again = Wire(client_isn=77777, server_isn=88888)
    return frames + again.handshake() + again.req(get("/new")) + again.resp(ok())


def _split_head(w: Wire) -> list[bytes]:
    return w.req(get("/split"), [20]) + w.resp(ok())


HANDOVERS: dict[str, tuple[Callable[[Wire], list[bytes]], HandoverReason]] = {
    "chunked response": (lambda w: w.req(get("/c")) + w.resp(CHUNKED, [30]), R.RESPONSE),
    "close-delimited": (
        lambda w: w.req(get("/old")) + w.resp(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        + w.fin(False), R.RESPONSE),
    "101 upgrade": (lambda w: w.req(get("/ws", "Upgrade: websocket\r\nConnection: Upgrade\r\n"))
                    + w.resp(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
                    + w.req(b"\x81\x05hello"), R.RESPONSE),
    "status 600": (lambda w: w.req(get("/s")) + w.resp(ok(b"x", "600 Odd")), R.RESPONSE),
    "status 099": (lambda w: w.req(get("/s")) + w.resp(ok(b"x", "099 Odd")), R.RESPONSE),
    "response head beyond 512": (
        lambda w: w.req(get("/h")) + w.resp(ok(b"x", extra="X-Pad: " + "p" * 600 + "\r\n")),
        R.RESPONSE),
    "chunked request": (
        lambda w: w.req(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\n\r\n") + w.resp(ok()), R.REQUEST),
    "connect": (lambda w: w.req(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
                + w.resp(b"HTTP/1.1 200 Connection established\r\n\r\n"), R.REQUEST),
    "head split over segments": (_split_head, R.REQUEST),
    "two content-lengths": (
        lambda w: w.req(post("/d", b"ab", "Content-Length: 2\r\n")) + w.resp(ok()), R.REQUEST),
    "content-length of 19 digits": (
        lambda w: w.req(b"POST /big HTTP/1.1\r\nContent-Length: 1000000000000000000\r\n\r\nx")
        + w.resp(ok()), R.REQUEST),
    "content-length not a number": (
        lambda w: w.req(b"POST /n HTTP/1.1\r\nContent-Length: 12a\r\n\r\n") + w.resp(ok()),
        R.REQUEST),
    "unknown method": (lambda w: w.req(b"PROPFIND /dav HTTP/1.1\r\nDepth: 1\r\n\r\n")
                       + w.resp(ok(b"<xml/>", "207 Multi-Status")), R.REQUEST),
    "space in the target": (lambda w: w.req(b"GET /a b HTTP/1.1\r\n\r\n") + w.resp(ok()),
                            R.REQUEST),
    "pipelined in one segment": (
        lambda w: w.req(get("/1") + get("/2")) + w.resp(ok(b"one") + ok(b"two")), R.PIPELINE),
    "pipelined before the answer": (
        lambda w: w.req(get("/1")) + w.req(get("/2")) + w.resp(ok(b"one")) + w.resp(ok(b"two")),
        R.PIPELINE),
    "expect 100-continue": (_expect_100, R.EARLY),
    "early response": (_early, R.EARLY),
    "out of order": (_reordered, R.ORDER),
    "reset while waiting": (lambda w: w.req(get("/slow")) + w.rst(False), R.END),
    "fin with a response pending": (
        lambda w: w.req(get("/f")) + w.resp(ok(b"f" * 100)[:-60]) + w.fin(False), R.END),
    "port reused with a request pending": (_reuse, R.REUSE),
}


@pytest.mark.parametrize("case", sorted(HANDOVERS))
def test_what_it_cannot_frame_is_handed_over(both: Both, case: str) -> None:
    build, reason = HANDOVERS[case]
    w = Wire()
    frames = w.handshake() + w.req(get("/before")) + w.resp(ok(b"paired"))
    frames += build(w)
    both.run(frames)
    [handover] = both.of_type(Handover)
    assert isinstance(handover, Handover) and handover.reason == reason, handover
    assert len(both.of_type(Exchange)) >= 1  # the exchange before it was paired
    both.sessions()
    counters = both.paired.obj.counters()
    assert counters["handovers"] == 1 and counters[f"ho_{reason.name.lower()}"] == 1


def test_after_a_handover_every_segment_crosses(both: Both) -> None:
    w = Wire()
    frames = w.handshake() + w.req(get("/c")) + w.resp(CHUNKED)
    frames += w.req(get("/after")) + w.resp(ok(b"after"))
    records = both.run(frames)
    assert [type(r) for r in records] == [Handover, Segment, Segment, Segment, Segment]
    handover = records[0]
    assert isinstance(handover, Handover)
    assert (handover.req_seq, handover.resp_seq) == (1001, 5001)
    assert [s.response.status_code for s in both.sessions() if s.response] == [200, 200]


def test_a_handover_resends_what_it_held(both: Both) -> None:
    w = Wire()
    frames = w.handshake() + w.req(post("/up", b"u" * 4000), [100, 1500])
    frames += w.resp(ok(b"r" * 6000)[:300]) + w.resp(ok(b"r" * 6000)[300:1300])
    before = len(both.run(frames))
    assert before == 0  # all held: the request, the response head and body so far
    records = both.run(w.rst(False))
    kinds = [type(r) for r in records]
    assert kinds == [Handover] + [Segment] * 5, kinds
    held = [r for r in records if isinstance(r, Segment)]
    # the request head's segment with its head bytes, its body by length only,
    # the response head's likewise, then the RST
    request = post("/up", b"u" * 4000)
    head = request[: len(request) - 4000]
    assert held[0].payload == head and held[0].payload_len == 100
    assert held[1].payload == b"" and held[1].payload_len == len(request) - 100
    assert held[1].packets == 2
    assert held[2].payload.startswith(b"HTTP/1.1 200 OK")
    assert held[3].payload_len == 1000 and held[4].flags & RST
    [s] = both.sessions()
    assert s.outcome is Outcome.RESET and s.response_bytes == 1300


def test_a_bad_packet_costs_only_its_own_connection(both: Both) -> None:
    a, b = Wire(40001), Wire(40002)
    frames = a.handshake() + b.handshake()
    frames += a.req(get("/a1")) + b.req(b"GET / HTTP/1.1\r\nContent-Length: 1e9\r\n\r\n")
    frames += a.resp(ok(b"a1")) + b.resp(ok(b"b")) + a.req(get("/a2")) + a.resp(ok(b"a2"))
    both.run(frames)
    exchanges = both.of_type(Exchange)
    assert [e.client_port for e in exchanges if isinstance(e, Exchange)] == [40001, 40001]
    assert {h.client_port for h in both.of_type(Handover) if isinstance(h, Handover)} == {40002}
    assert {s.sport for s in both.of_type(Segment) if isinstance(s, Segment)} <= {40002, PORT}
    both.sessions()


# --- exchanges it holds ---------------------------------------------------------------


HELD = {
    Phase.WAIT: lambda w: w.req(get("/wait")),
    Phase.REQUEST: lambda w: w.req(post("/body", b"b" * 5000)[:400]),
    Phase.RESPONSE: lambda w: w.req(get("/resp")) + w.resp(ok(b"r" * 5000)[:400]),
}


@pytest.mark.parametrize("phase", sorted(HELD), ids=lambda p: p.name)
def test_a_held_exchange_times_out_like_a_framed_one(both: Both, phase: Phase) -> None:
    w = Wire()
    both.run(w.handshake() + HELD[phase](w))
    obj = both.paired.obj
    [held] = obj.held_exchanges()
    assert held.phase is phase
    now = time.monotonic_ns()
    assert obj.take_idle_exchanges(now, 60_000_000_000, 100) == []  # not idle yet
    [taken] = obj.take_idle_exchanges(now + 2_000_000_000, 1_000_000_000, 100)
    assert taken == held and conns_entries(obj) == 0
    # the user-space framer, given the same segments, times out the same way
    lim = Limits(idle_timeout_ns=1_000_000_000)
    framer = Tracker(lim)
    framer.feed_many(both.framed.records)
    [framed] = framer.advance(now + 2_000_000_000)
    [paired] = Tracker(lim).end_held([taken], Outcome.TIMEOUT, now + 2_000_000_000)
    assert untimed(paired) == untimed(framed) and paired.outcome is Outcome.TIMEOUT
    assert paired.end_ns == framed.end_ns == now + 2_000_000_000


def test_the_idle_scan_is_bounded_and_goes_on_where_it_stopped(both: Both) -> None:
    wires = [Wire(41000 + i) for i in range(6)]
    for w in wires:
        both.run(w.handshake() + w.req(get("/idle")))
    obj = both.paired.obj
    later = time.monotonic_ns() + 10_000_000_000
    taken = [obj.take_idle_exchanges(later, 1, 4) for _ in range(3)]
    assert [len(t) for t in taken][:2] == [4, 2]
    assert conns_entries(obj) == 0


def test_held_exchanges_end_at_shutdown(both: Both) -> None:
    w = Wire()
    both.run(w.handshake() + w.req(get("/never")))
    [s] = both.sessions()
    assert s.outcome is Outcome.SHUTDOWN and s.response is None


# --- past capacity ---------------------------------------------------------------------


def _exchanges(n: int) -> list[bytes]:
    w = Wire()
    frames = w.handshake()
    for i in range(n):
        frames += w.req(get(f"/{i}")) + w.resp(ok(b"x" if i % 3 else b"", "404 Nope" if i % 3
                                                   else "200 OK"))
    return frames


def test_shed_exchanges_are_counted_in_the_red_map(bpf_object: Factory) -> None:
    # less than the whole ring free, always: every exchange is shed
    obj = bpf_object(capture_bytes=1024, wakeup_bytes=0, ring_bytes=16384, shed_bytes=16383)
    obj.set_server_port(LO, PORT, Protocol.HTTP)
    with RingReader(obj) as reader:
        side = Side(obj, reader)
        assert side.run(_exchanges(30)) == []
    counters = obj.counters()
    assert counters["shed"] == 30 and counters["exchanges"] == counters["events"] == 0
    red = obj.red_metrics()
    assert set(red) == {RedKey(LO, PORT, Role.SERVER, Method.GET, 200),
                        RedKey(LO, PORT, Role.SERVER, Method.GET, 404)}
    assert red[RedKey(LO, PORT, Role.SERVER, Method.GET, 200)].exchanges == 10
    assert red[RedKey(LO, PORT, Role.SERVER, Method.GET, 404)].exchanges == 20
    for value in red.values():
        assert sum(value.buckets) == value.exchanges and value.buckets[0] == value.exchanges
        assert 0 < value.sum_ns < value.exchanges * 5_000_000  # all under the first bound


def test_exchanges_the_full_ring_lost_are_counted_too(bpf_object: Factory) -> None:
    # one page of ring, nobody reading: delivered + counted = sent
    obj = bpf_object(capture_bytes=1024, wakeup_bytes=0, ring_bytes=4096)
    obj.set_server_port(LO, PORT, Protocol.HTTP)
    for f in _exchanges(40):
        test_run(obj.prog_fd("clv_tc_ingress"), f)
    counters = obj.counters()
    counted = sum(v.exchanges for v in obj.red_metrics().values())
    assert counters["lost"] > 0 and counted == counters["lost"]
    with RingReader(obj) as reader:
        delivered = [r for r in reader.poll(0) if isinstance(r, Exchange)]
    assert len(delivered) == counters["exchanges"] and len(delivered) + counted == 40


def test_per_packet_cost(bpf_object: Factory, capsys: pytest.CaptureFixture[str]) -> None:
    """BPF_PROG_TEST_RUN time of each packet of an exchange, pairing off and on
    (medians over fresh connections; printed, with a loose bound)."""
    names = ("SYN", "SYN-ACK", "request", "response", "FIN", "FIN")
    medians = {}
    for pair in (False, True):
        obj = bpf_object(capture_bytes=1024, ring_bytes=64 << 20, pair_http=pair)
        obj.set_server_port(LO, PORT, Protocol.HTTP)
        times: list[list[int]] = [[] for _ in names]
        with RingReader(obj) as reader:
            for i in range(400):
                w = Wire(20000 + i)
                frames = w.handshake() + w.req(get("/cost")) + w.resp(ok(b"x" * 17)) + w.close()
                for k, f in enumerate(frames):
                    times[k].append(test_run(obj.prog_fd("clv_tc_ingress"), f).duration_ns)
                if i % 50 == 0:
                    reader.poll(0)
        medians[pair] = [sorted(t)[len(t) // 2] for t in times]
    with capsys.disabled():
        for pair, m in medians.items():
            print(f"\nper-packet, pairing {'on ' if pair else 'off'} (BPF_PROG_TEST_RUN medians): "
                  + ", ".join(f"{n} {v} ns" for n, v in zip(names, m, strict=True))
                  + f"; exchange {sum(m)} ns")
    assert all(v < 20000 for m in medians.values() for v in m)
