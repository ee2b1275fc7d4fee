"""The core on scripted conversations: every case whole and one byte at a time."""

from __future__ import annotations

import pytest

from clovisor.core.events import Direction, Outcome, Protocol, Segment, Session
from clovisor.core.tracker import Limits, Tracker

from .wire import Conversation, bytewise

REQ, RESP = Direction.REQUEST, Direction.RESPONSE


def get(path: str = "/", extra: str = "", version: str = "1.1") -> bytes:
    return (
        f"GET {path} HTTP/{version}\r\nHost: svc\r\nUser-Agent: curl/8\r\n"
        f"X-Request-Id: r-1\r\nAuthorization: Bearer secret\r\n{extra}\r\n"
    ).encode()


def ok(body: bytes = b"hello", status: str = "200 OK", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
    )


def chunked(parts: list[bytes]) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for p in parts:
        out += f"{len(p):x}\r\n".encode() + p + b"\r\n"
    return out + b"0\r\n\r\n"


def run(segments: list[Segment], limits: Limits | None = None) -> tuple[list[Session], Tracker]:
    t = Tracker(limits)
    out = t.feed_many(segments)
    out += t.close()
    return out, t


SEGMENTATIONS = ["whole", "bytewise", "small"]


def sizes(mode: str, data: bytes) -> list[int] | None:
    if mode == "whole":
        return None
    if mode == "bytewise":
        return bytewise(data)
    return [7] * (len(data) // 7 + 1)


@pytest.mark.parametrize("mode", SEGMENTATIONS)
def test_one_request_per_connection(mode: str) -> None:
    c = Conversation()
    req, resp = get("/a/b?x=1"), ok(b"x" * 300)
    segs = c.handshake() + c.request(req, sizes(mode, req)) + c.response(resp, sizes(mode, resp))
    segs += c.close()
    out, t = run(segs)
    assert len(out) == 1
    s = out[0]
    assert s.outcome is Outcome.COMPLETE
    assert s.request is not None and s.response is not None
    assert (s.request.method, s.request.target, s.request.version) == ("GET", "/a/b?x=1", "1.1")
    assert s.response.status_code == 200 and s.response.reason == "OK"
    assert s.response.body_size == 300 and s.request.body_size == 0
    assert s.request_bytes == len(req) and s.response_bytes == len(resp)
    assert dict(s.request.headers)["host"] == "svc"
    assert "authorization" not in dict(s.request.headers)
    assert (s.client_addr, s.client_port, s.server_addr, s.server_port) == (
        "10.200.1.2", 40000, "10.200.0.2", 80)
    # Start is the first request byte, end the last response byte.
    first_req = next(x for x in segs if x.direction is REQ and x.payload_len)
    last_resp = [x for x in segs if x.direction is RESP and x.payload_len][-1]
    assert (s.start_ns, s.end_ns) == (first_req.ts_ns, last_resp.ts_ns)
    assert t.stats.parse_errors == 0


@pytest.mark.parametrize("mode", SEGMENTATIONS)
def test_keep_alive_many_sessions(mode: str) -> None:
    c = Conversation()
    segs = c.handshake()
    for i in range(5):
        req, resp = get(f"/item/{i}"), ok(str(i).encode() * (i + 1))
        segs += c.request(req, sizes(mode, req)) + c.response(resp, sizes(mode, resp))
    out, _ = run(segs + c.close())
    assert [s.request.target for s in out if s.request] == [f"/item/{i}" for i in range(5)]
    assert [s.response.body_size for s in out if s.response] == [1, 2, 3, 4, 5]
    assert all(s.outcome is Outcome.COMPLETE for s in out)


@pytest.mark.parametrize("mode", SEGMENTATIONS)
def test_pipelining(mode: str) -> None:
    c = Conversation()
    reqs = get("/1") + get("/2") + b"HEAD /3 HTTP/1.1\r\nHost: h\r\n\r\n"
    resps = ok(b"one") + ok(b"second") + ok(b"", extra="").replace(
        b"Content-Length: 0", b"Content-Length: 999")
    segs = c.handshake() + c.request(reqs, sizes(mode, reqs))
    segs += c.response(resps, sizes(mode, resps))
    out, _ = run(segs + c.close())
    assert [(s.request.target, s.response.body_size) for s in out if s.request and s.response] == [
        ("/1", 3), ("/2", 6), ("/3", 0)]


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_bodiless_statuses(status: str) -> None:
    c = Conversation()
    resp = f"HTTP/1.1 {status}\r\nContent-Length: 42\r\n\r\n".encode()
    segs = c.handshake() + c.request(get()) + c.response(resp) + c.request(get("/next"))
    segs += c.response(ok(b"abc"))
    out, _ = run(segs + c.close())
    assert [s.response.status_code for s in out if s.response] == [int(status[:3]), 200]
    assert out[0].response is not None and out[0].response.body_size == 0


@pytest.mark.parametrize("capture", [16, 64, 1024])
def test_large_bodies_beyond_capture(capture: int) -> None:
    c = Conversation(capture=capture)
    body = b"B" * 3_000_000
    req = b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body)
    segs = c.handshake() + c.request(req + body, [len(req) + 100] + [65000] * 60)
    segs += c.response(ok(b"R" * 2_000_000), [65000] * 40)
    segs += c.request(get("/after")) + c.response(ok(b"k"))
    out, t = run(segs + c.close())
    if capture < len(req):
        # The header block did not fit: the message is kept, its size is unknown.
        assert out[0].request is not None and out[0].request.header_truncated
        assert t.stats.untraced[("truncated", 80)] >= 1
    else:
        assert out[0].request is not None and out[0].request.body_size == 3_000_000
        assert out[0].response is not None and out[0].response.body_size == 2_000_000
        assert out[0].request_bytes == len(req) + len(body)
    assert out[-1].request is not None and out[-1].request.target == "/after"
    assert out[-1].response is not None and out[-1].response.status_code == 200


@pytest.mark.parametrize("capture", [48, 52, 1024])
def test_chunked_response(capture: int) -> None:
    c = Conversation(capture=capture)
    body = chunked([b"a" * 10, b"b" * 70_000, b"c" * 5])
    # Cut so that chunk-size lines fall inside segments beyond the capture.
    segs = c.handshake() + c.request(get()) + c.response(body, [60, 40_000, 40_000])
    segs += c.request(get("/2")) + c.response(chunked([b"x"]))
    out, _t = run(segs + c.close())
    assert len(out) == 2
    header_len = body.index(b"\r\n\r\n") + 4
    assert out[0].response is not None and out[0].response.body_size == len(body) - header_len
    assert out[1].response is not None and out[1].response.status_code == 200
    assert all(s.outcome is Outcome.COMPLETE for s in out)


def test_chunked_last_chunk_alone() -> None:
    c = Conversation(capture=64)
    body = chunked([b"z" * 5000])
    head_end = body.index(b"\r\n\r\n") + 4
    parts = [head_end, len(body) - head_end - 5, 5]  # nginx writes "0\r\n\r\n" alone
    segs = c.handshake() + c.request(get()) + c.response(body, parts)
    out, _ = run(segs + c.response(b""))
    assert len(out) == 1 and out[0].outcome is Outcome.COMPLETE


@pytest.mark.parametrize("mode", SEGMENTATIONS)
def test_headers_larger_than_a_segment(mode: str) -> None:
    c = Conversation(capture=1024)
    big = get("/h", extra="X-Pad: " + "p" * 3000 + "\r\n")
    segs = c.handshake() + c.request(big, sizes(mode, big) or [900, 900, 900, 900])
    segs += c.response(ok())
    out, _ = run(segs + c.close())
    assert len(out) == 1 and out[0].request is not None
    assert out[0].request.target == "/h" and not out[0].request.header_truncated
    assert out[0].request_bytes == len(big)


def test_http10_close_delimited() -> None:
    c = Conversation()
    resp = b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n" + b"d" * 5000
    segs = c.handshake() + c.request(get(version="1.0")) + c.response(resp, [100, 2000, 4000])
    segs += c.fin(RESP)
    out, _ = run(segs + c.fin(REQ))
    assert len(out) == 1
    s = out[0]
    assert s.outcome is Outcome.COMPLETE and s.response is not None
    assert s.response.version == "1.0" and s.response.body_size == 5000 - 0
    assert s.request is not None and s.request.version == "1.0"


def test_retransmission_duplicates_and_reordering() -> None:
    c = Conversation()
    hs = c.handshake()
    req, resp = get("/r"), ok(b"y" * 1000)
    rq = c.request(req, [10, 10, 10, 1000])
    rs = c.response(resp, [50, 300, 300, 1000])
    segs = [*hs, rq[1], rq[0], rq[0], rq[3], rq[2], rq[1]]
    segs += [rs[2], rs[0], rs[3], rs[1], rs[1], rs[3]]
    out, _t = run(segs + c.close())
    assert len(out) == 1 and out[0].response is not None
    assert out[0].response.body_size == 1000
    assert out[0].request_bytes == len(req) and out[0].response_bytes == len(resp)


def test_overlapping_retransmission() -> None:
    c = Conversation()
    req = get("/overlap")
    segs = c.handshake() + c.request(req, [20, 1000])
    # A retransmission that covers the first segment and part of the second.
    again = Conversation()
    again.seq = {REQ: 1001, RESP: 5001}
    again.ts = c.ts
    segs.insert(3, again.request(req[:40])[0])
    segs += c.response(ok())
    out, _ = run(segs + c.close())
    assert len(out) == 1 and out[0].request_bytes == len(req)


def test_connection_open_before_tracing_starts() -> None:
    c = Conversation()
    c.handshake()  # not seen
    c.request(get("/missed"))  # not seen
    segs = c.response(ok(b"old") [:30])  # tail of an old response: not paired
    c.seq[RESP] += len(ok(b"old")) - 30
    segs += c.request(get("/seen")) + c.response(ok(b"new"))
    out, _t = run(segs + c.close())
    assert [s.request.target for s in out if s.request] == ["/seen"]
    assert out[0].outcome is Outcome.COMPLETE


def test_response_to_unseen_request_is_not_paired() -> None:
    c = Conversation()
    c.handshake()
    c.request(get("/unseen"))  # the server has it; we do not
    segs = c.response(ok(b"for-unseen"))
    # A response cannot answer a request whose first byte the server has not acked.
    early = c.request(get("/seen"))
    out, _ = run(segs + early + c.response(ok(b"for-seen")) + c.close())
    assert [(s.request.target, s.response.body_size) for s in out if s.request and s.response] == [
        ("/seen", 8)]


def test_reset_makes_error_session() -> None:
    c = Conversation()
    segs = c.handshake() + c.request(get("/slow")) + c.rst(RESP)
    out, _ = run(segs)
    assert len(out) == 1 and out[0].outcome is Outcome.RESET and out[0].response is None
    assert out[0].end_ns == segs[-1].ts_ns


def test_idle_request_times_out() -> None:
    c = Conversation()
    segs = c.handshake() + c.request(get("/hang"))
    t = Tracker(Limits(idle_timeout_ns=5_000_000_000))
    assert t.feed_many(segs) == []
    assert t.advance(segs[-1].ts_ns + 1_000_000_000) == []
    out = t.advance(segs[-1].ts_ns + 6_000_000_000)
    assert len(out) == 1 and out[0].outcome is Outcome.TIMEOUT
    assert len(t) == 0


def test_closed_without_response() -> None:
    c = Conversation()
    out, _ = run(c.handshake() + c.request(get()) + c.fin(RESP) + c.fin(REQ))
    assert len(out) == 1 and out[0].outcome is Outcome.CLOSED


@pytest.mark.parametrize(
    ("garbage", "reason"),
    # (A TLS record and the HTTP/2 preface are not garbage: see test_switch.py.)
    [
        # First bytes that cannot start a request: the port's protocol is not spoken.
        (b"\x00" * 100, "unrecognized"),
        (b"GET\r\n\r\n", "unrecognized"),
        # A request that goes wrong is HTTP/1.x all the same.
        (b"GET / HTTP/1.1\r\nbad header line\r\n\r\n", "parse_error"),
    ],
)
def test_garbage_is_counted_not_raised(garbage: bytes, reason: str) -> None:
    c = Conversation()
    segs = c.handshake() + c.request(garbage) + c.response(b"\x15\x03\x01\x00\x02\x02\x28")
    out, t = run(segs + c.close())
    assert out == []
    assert t.stats.untraced.get((reason, 80), 0) >= 1
    assert (t.stats.parse_errors >= 1) is (reason == "parse_error")
    assert [port for port, _ in t.take_samples()] == ([80] if reason == "unrecognized" else [])


def test_garbage_then_recovery_on_new_connection() -> None:
    bad = Conversation(cport=1)
    good = Conversation(cport=2)
    segs = bad.handshake() + bad.request(b"\xff" * 50) + good.handshake()
    segs += good.request(get("/fine")) + good.response(ok())
    out, _ = run(segs)
    assert [s.request.target for s in out if s.request] == ["/fine"]


def test_ipv6() -> None:
    c = Conversation(client=bytes.fromhex("fd000200" + "0" * 23 + "2"),
                     server=bytes.fromhex("fd000200" + "0" * 23 + "1"))
    out, _ = run(c.handshake() + c.request(get()) + c.response(ok()) + c.close())
    assert out[0].family == 6 and out[0].client_addr == "fd00:200::2"


def test_tcp_protocol_gives_connection_sessions() -> None:
    c = Conversation(protocol=Protocol.TCP)
    segs = c.handshake() + c.request(b"ping" * 10) + c.response(b"pong" * 100) + c.close()
    out, _ = run(segs)
    assert len(out) == 1
    s = out[0]
    assert s.request is None and s.outcome is Outcome.COMPLETE
    assert (s.request_bytes, s.response_bytes) == (40, 400)
    assert s.start_ns == segs[0].ts_ns


def test_100_continue_then_final_response() -> None:
    c = Conversation()
    req = b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    segs = c.handshake() + c.request(req) + c.response(b"HTTP/1.1 100 Continue\r\n\r\n")
    segs += c.request(b"data") + c.response(ok(b"done", status="201 Created"))
    out, _ = run(segs + c.close())
    assert len(out) == 1 and out[0].response is not None
    assert out[0].response.status_code == 201 and out[0].request is not None
    assert out[0].request.body_size == 4


def test_upgrade_stops_parsing_both_sides() -> None:
    c = Conversation()
    req = get("/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n")
    resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    segs = c.handshake() + c.request(req) + c.response(resp)
    segs += c.request(b"\x81\x85frame") + c.response(b"\x81\x05hello")
    out, t = run(segs + c.close())
    assert len(out) == 1 and out[0].response is not None and out[0].response.status_code == 101
    assert t.stats.parse_errors == 0


def test_server_error_and_early_response() -> None:
    c = Conversation()
    head = b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n"
    segs = c.handshake() + c.request(head + b"x" * 1000)
    segs += c.response(ok(b"too large", status="413 Payload Too Large")) + c.rst(RESP)
    out, _ = run(segs)
    assert len(out) == 1 and out[0].response is not None
    assert out[0].response.status_code == 413 and out[0].outcome is Outcome.COMPLETE


def test_connection_table_is_bounded() -> None:
    t = Tracker(Limits(max_connections=10))
    out = []
    for port in range(50):
        c = Conversation(cport=10000 + port)
        out += t.feed_many(c.handshake() + c.request(get()))
    assert len(t) == 10 and t.stats.evicted == 40
    assert len(out) == 40 and all(s.outcome is Outcome.TIMEOUT for s in out)


def test_port_reuse_after_close() -> None:
    c1 = Conversation(client_isn=100)
    c2 = Conversation(client_isn=900000, ts=5_000_000_000)
    segs = c1.handshake() + c1.request(get("/first")) + c1.response(ok()) + c1.close()
    segs += c2.handshake() + c2.request(get("/second")) + c2.response(ok()) + c2.close()
    out, _ = run(segs)
    assert [s.request.target for s in out if s.request] == ["/first", "/second"]


def test_sequence_wraparound() -> None:
    c = Conversation(client_isn=0xFFFFFF00, server_isn=0xFFFFFFF0)
    segs = c.handshake() + c.request(get("/wrap") + b"", [100, 1000])
    segs += c.response(ok(b"w" * 2000), [10, 500, 5000])
    out, _ = run(segs + c.close())
    assert len(out) == 1 and out[0].response is not None and out[0].response.body_size == 2000


def test_byte_budget_caps_held_bytes_and_is_returned() -> None:
    limits = Limits(max_buffered_bytes=4096)
    t = Tracker(limits)
    out = []
    for port in range(20):
        c = Conversation(cport=20000 + port)
        # A header block that never ends, 1000 bytes per connection: held bytes.
        out += t.feed_many(c.handshake() + c.request(b"GET /" + b"a" * 995))
        assert t.stats.buffered_bytes <= 4096
    assert t.stats.budget_refusals > 0
    out += t.close()
    assert t.stats.buffered_bytes == 0
    assert all(s.outcome is Outcome.SHUTDOWN for s in out)


def test_out_of_order_bytes_are_budgeted() -> None:
    t = Tracker(Limits(max_buffered_bytes=100))
    c = Conversation()
    hs = c.handshake()
    segs = c.request(get("/ooo") + b"", [10, 40, 40, 1000])
    t.feed_many(hs + segs[1:])  # the first segment is missing: everything is held
    assert t.stats.buffered_bytes <= 100
    t.feed(segs[0])
    assert t.stats.buffered_bytes == 0
    out = t.feed_many(c.response(ok())) + t.close()
    assert len(out) == 1 and out[0].request is not None and out[0].request.target == "/ooo"


def test_request_behind_a_body_beyond_the_capture_is_still_a_session() -> None:
    """A pipelined request whose head lies beyond the captured prefix of one segment."""
    c = Conversation(capture=128)
    body = b"b" * 3000
    post = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 3000\r\n\r\n" + body
    segs = c.handshake() + c.request(post + get("/hidden"))  # one segment: head, body, GET
    segs += c.response(ok(b"up")) + c.response(ok(b"hidden!"))
    segs += c.request(get("/visible")) + c.response(ok(b"v"))
    out, _ = run(segs + c.close())
    assert [(s.request.method, s.request.target) for s in out if s.request] == [
        ("POST", "/up"), ("", ""), ("GET", "/visible")]
    hidden = out[1]
    assert hidden.request is not None and hidden.request.header_truncated
    assert hidden.response is not None and hidden.response.body_size == 7
    assert out[0].request is not None and out[0].request.body_size == 3000


def test_early_response_keeps_the_declared_body_size() -> None:
    c = Conversation()
    head = b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n"
    segs = c.handshake() + c.request(head + b"x" * 100)
    segs += c.response(ok(b"nope", status="413 Payload Too Large"))
    out, _ = run(segs)
    assert out[0].request is not None and out[0].request.body_size == 100_000


def test_parser_plugin_is_reached_through_the_lookup() -> None:
    from clovisor.parsers.lineproto import PARSER

    c = Conversation(protocol=9)  # type: ignore[arg-type]
    segs = c.handshake() + c.request(b"GET key\n") + c.response(b"VALUE 1\n") + c.close()
    t = Tracker(parsers=lambda pid: PARSER if pid == 9 else None)
    out = t.feed_many(segs) + t.close()
    assert len(out) == 1 and out[0].protocol_name == "lineproto" and out[0].protocol == 9
    # No parser for id 9 (unloaded, disabled): connection-level accounting instead.
    c = Conversation(protocol=9)  # type: ignore[arg-type]
    segs = c.handshake() + c.request(b"GET key\n") + c.response(b"VALUE 1\n") + c.close()
    (s,) = run(segs)[0]
    assert s.protocol == 9 and s.protocol_name == "" and (s.request_bytes, s.response_bytes) == (
        8, 8)


@pytest.mark.parametrize("head_at", [None, 1], ids=["get", "head"])
@pytest.mark.parametrize("keep", range(1 << 8))
def test_every_pattern_of_lost_records(keep: int, head_at: int | None) -> None:
    """Four keep-alive exchanges, any of their eight records lost (a full ring).

    The receiver's ack shows what passed the hook, so a hole below it is
    skipped at once, not held for the gap timeout; no response is paired
    with another exchange's request; every exchange whose request and
    response both arrived is a complete session. With ``head_at``, that
    exchange is a HEAD whose answer announces 4096 body bytes it never sends:
    when the HEAD is lost, what follows its answer is still seen.
    """
    c = Conversation()
    segs = c.handshake()
    delivered = []
    for i in range(4):
        if i == head_at:
            head_ok = f"HTTP/1.1 200 X{i}\r\nContent-Length: 4096\r\n\r\n".encode()
            req, resp = c.request(b"HEAD" + get(f"/{i}")[3:]), c.response(head_ok)
        else:
            req, resp = c.request(get(f"/{i}")), c.response(ok(status=f"200 X{i}"))
        kept_req, kept_resp = bool(keep >> (2 * i) & 1), bool(keep >> (2 * i + 1) & 1)
        segs += (req if kept_req else []) + (resp if kept_resp else [])
        delivered.append(kept_req and kept_resp)
    out, _ = run(segs + c.close())
    paired = {
        s.request.target: s.response.reason for s in out if s.request and s.response
    }
    assert all(reason == f"X{target[1:]}" for target, reason in paired.items()), paired
    assert {f"/{i}" for i, d in enumerate(delivered) if d} <= set(paired)


def test_the_answer_to_a_lost_head_does_not_swallow_the_next_response() -> None:
    """It announces a body it never sends; the response right after it is not that body."""
    c = Conversation()
    segs = c.handshake()
    c.request(b"HEAD" + get("/lost-head")[3:])  # the ring lost it
    segs += c.response(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for i in range(3):
        segs += c.request(get(f"/{i}")) + c.response(ok(b"x" * i))
    t = Tracker()
    out = t.feed_many(segs)
    assert [(s.request.target, s.response.body_size) for s in out if s.request and s.response] == [
        ("/0", 0), ("/1", 1), ("/2", 2)]
    assert t.stats.unpaired_responses == 1 and t.stats.parse_errors == 0


def test_the_answer_to_a_lost_get_keeps_its_body() -> None:
    """Its body is counted as announced, so the response after it is found where it starts."""
    c = Conversation()
    segs = c.handshake()
    c.request(get("/lost-get"))  # the ring lost it
    segs += c.response(ok(b"y" * 1000))
    segs += c.request(get("/next")) + c.response(ok(b"two"))
    out = Tracker().feed_many(segs)
    assert [(s.request.target, s.response.body_size) for s in out if s.request and s.response] == [
        ("/next", 3)]


def test_hole_below_the_peers_ack_is_not_held() -> None:
    """A lost request is skipped when the response acks it, not after the gap timeout."""
    c = Conversation()
    segs = c.handshake() + c.request(get("/0")) + c.response(ok())
    c.request(get("/lost"))  # the ring lost it
    segs += c.response(ok(b"for-lost"))  # its response acks it
    segs += c.request(get("/2"))
    t = Tracker()
    out = t.feed_many(segs + c.response(ok(b"two")))
    # No close, no timeout: /2 paired as soon as its response came.
    assert [(s.request.target, s.response.body_size) for s in out if s.request and s.response] == [
        ("/0", 5), ("/2", 3)]
    assert t.stats.unpaired_responses == 1
