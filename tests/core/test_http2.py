"""HTTP/2 streams from real h2 byte streams: every stream one correct session."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import pytest

from clovisor.core.events import Direction, Outcome, Protocol, Segment, Session
from clovisor.core.http2 import Http2Connection, grpc_connection, http2_connection
from clovisor.core.tracker import Limits, Tracker

from .h2wire import RESP, H2Pair, frames, get, grpc_request, with_kernel_frames
from .wire import Conversation, bytewise

H2 = 200  # a protocol id the test's lookup maps to the HTTP/2 connection


def tracker(limits: Limits | None = None) -> Tracker:
    return Tracker(limits, parsers=lambda pid: http2_connection if pid == H2 else None)


def run(segs: list[Segment], limits: Limits | None = None) -> tuple[list[Session], Tracker]:
    t = tracker(limits)
    out = t.feed_many(segs)
    out += t.close()
    return out, t


def conv(capture: int = 4096) -> Conversation:
    return Conversation(capture=capture, protocol=H2, sport=50051)  # type: ignore[arg-type]


MODES = ["whole", "frames", "bytewise"]


def cutter(mode: str) -> Callable[[Direction, bytes], Iterable[int] | None]:
    if mode == "whole":
        return lambda d, b: None
    if mode == "frames":
        return lambda d, b: frames(b)
    return lambda d, b: bytewise(b)


def attrs(s: Session) -> dict[str, object]:
    return dict(s.attributes)


@pytest.mark.parametrize("mode", MODES)
def test_unary_grpc_calls(mode: str) -> None:
    p = H2Pair()
    for i in range(3):
        req = grpc_request("/helloworld.Greeter/SayHello", tag=f"r{i}")
        sid = p.request(req, b"\0\0\0\0\x05hello")
        p.respond(sid, body=b"\0\0\0\0\x07greeted" * (i + 1), trailers=[("grpc-status", "0")])
    c = conv()
    out, t = run(c.handshake() + p.segments(c, cutter(mode)) + c.close())
    assert len(out) == 3 and t.stats.parse_errors == 0
    for i, s in enumerate(out):
        assert s.outcome is Outcome.COMPLETE
        assert s.request is not None and s.response is not None
        assert (s.request.method, s.request.target, s.request.version) == (
            "POST", "/helloworld.Greeter/SayHello", "2")
        h = dict(s.request.headers)
        assert h["host"] == "greeter.default.svc:50051" and h["x-request-id"] == f"r{i}"
        assert h["content-type"] == "application/grpc" and "authorization" not in h
        assert s.request.body_size == 10
        assert s.response.status_code == 200 and s.response.version == "2"
        assert s.response.body_size == 12 * (i + 1)
        a = attrs(s)
        assert a["rpc.system"] == "grpc" and a["rpc.grpc.status_code"] == 0
        assert (a["rpc.service"], a["rpc.method"]) == ("helloworld.Greeter", "SayHello")
        assert "clovisor.http2.headers_incomplete" not in a
        assert s.start_ns < s.end_ns


def test_bytes_are_the_streams_frames() -> None:
    p = H2Pair()
    sid = p.request(get("/a"))
    p.respond(sid, body=b"x" * 1000)
    c = conv()
    out, _ = run(c.handshake() + p.segments(c) + c.close())
    (s,) = out
    # HEADERS (9 + block) for the request; HEADERS + one DATA frame for the response.
    assert s.response is not None and s.response.body_size == 1000
    assert s.response_bytes > 1000 + 18 and s.request_bytes > 9
    assert s.request is not None and s.request.body_size == 0


@pytest.mark.parametrize("mode", MODES)
def test_interleaved_concurrent_streams_pair_by_id(mode: str) -> None:
    p = H2Pair()
    sids = [p.request(get(f"/item/{i}", tag=f"t{i}")) for i in range(6)]
    # The server answers in reverse order, interleaving the bodies' DATA frames.
    for sid in reversed(sids):
        p.server.send_headers(sid, [(":status", "200"), ("x-request-id", f"s{sid}")])
    p.flush()
    for chunk in range(3):
        for sid in sids:
            p.server.send_data(sid, b"d" * (100 + sid), end_stream=chunk == 2)
            p.flush()
    c = conv()
    out, _ = run(c.handshake() + p.segments(c, cutter(mode)) + c.close())
    assert len(out) == 6
    for s in out:
        assert s.request is not None and s.response is not None
        sid = attrs(s)["clovisor.http2.stream_id"]
        assert isinstance(sid, int) and s.request.target == f"/item/{sids.index(sid)}"
        assert dict(s.response.headers)["x-request-id"] == f"s{sid}"
        assert s.response.body_size == 3 * (100 + sid)


@pytest.mark.parametrize("capture", [256, 128])
def test_megabyte_bodies_with_a_short_capture(capture: int) -> None:
    p = H2Pair(window=1 << 24)
    body = b"m" * (1 << 20)
    sid = p.request(grpc_request("/bulk.Store/Put"), body)
    p.respond(sid, body=body, trailers=[("grpc-status", "0")])
    sid2 = p.request(grpc_request("/bulk.Store/Get"))
    p.respond(sid2, body=b"ok", trailers=[("grpc-status", "0")])
    c = conv(capture)
    # Each DATA frame is its own write: its header starts a segment.
    out, t = run(c.handshake() + p.segments(c) + c.close())
    assert [s.request.target for s in out if s.request] == ["/bulk.Store/Put", "/bulk.Store/Get"]
    assert out[0].request is not None and out[0].request.body_size == 1 << 20
    assert out[0].response is not None and out[0].response.body_size == 1 << 20
    assert all(attrs(s)["rpc.grpc.status_code"] == 0 for s in out)
    assert t.stats.parse_errors == 0


def test_frame_headers_beyond_the_capture_lose_framing_then_resync() -> None:
    """MSS-sized segments put DATA frame headers mid-segment, beyond a 256-byte capture."""
    p = H2Pair(window=1 << 24)
    sid = p.request(get("/big"))
    p.server.send_headers(sid, [(":status", "200")])
    p.send_body(p.server, sid, b"b" * 200_000, end=True, frame_writes=False)  # one write
    sid2 = p.request(get("/after"))
    p.respond(sid2, body=b"small")
    c = conv(256)
    segs = c.handshake() + p.segments(c, lambda d, b: [1448] * (len(b) // 1448 + 1))
    t = tracker()
    out = t.feed_many(segs + c.close()) + t.close()
    by_target = {s.request.target: s for s in out if s.request}
    assert set(by_target) == {"/big", "/after"}
    big = by_target["/big"]
    # Its end went by unseen: it ends with the connection, its body size unknown.
    assert big.response is not None and big.response.status_code == 200
    assert big.outcome is Outcome.CLOSED and big.response.body_size is None
    after = by_target["/after"]
    assert after.outcome is Outcome.COMPLETE and after.response is not None


def test_reset_stream() -> None:
    p = H2Pair()
    sid = p.request(get("/slow"))
    p.server.reset_stream(sid, error_code=8)  # CANCEL
    p.flush()
    sid2 = p.request(get("/fine"))
    p.respond(sid2)
    c = conv()
    out, _ = run(c.handshake() + p.segments(c) + c.close())
    assert [(s.request.target, s.outcome) for s in out if s.request] == [
        ("/slow", Outcome.RESET), ("/fine", Outcome.COMPLETE)]
    assert attrs(out[0])["clovisor.http2.error_code"] == 8 and out[0].response is None


def test_goaway_ends_the_streams_above_its_last_id() -> None:
    p = H2Pair()
    s1 = p.request(get("/1"))
    s3 = p.request(get("/3"))
    s5 = p.request(get("/5"))
    # GOAWAY(last_stream_id=s3, NO_ERROR), written straight to the wire: the h2
    # server would refuse to answer after sending it, and real servers do not.
    p.writes.append((RESP, b"\0\0\x08\x07\0\0\0\0\0" + s3.to_bytes(4, "big") + bytes(4)))
    p.respond(s1)
    p.respond(s3)
    del s5
    c = conv()
    t = tracker()
    out = t.feed_many(c.handshake() + p.segments(c))
    assert [(s.request.target, s.outcome) for s in out if s.request] == [
        ("/5", Outcome.CLOSED), ("/1", Outcome.COMPLETE), ("/3", Outcome.COMPLETE)]
    assert t.feed_many(c.close()) + t.close() == []


@pytest.mark.parametrize("ending", ["fin", "rst", "shutdown"])
def test_open_streams_end_with_the_connection(ending: str) -> None:
    p = H2Pair()
    p.request(get("/pending-1"))
    sid = p.request(get("/pending-2"))
    p.server.send_headers(sid, [(":status", "200")])
    p.flush()
    c = conv()
    segs = c.handshake() + p.segments(c)
    if ending == "fin":
        segs += c.close()
    elif ending == "rst":
        segs += c.rst(RESP)
    t = tracker()
    out = t.feed_many(segs) + t.close()
    want = {"fin": Outcome.CLOSED, "rst": Outcome.RESET, "shutdown": Outcome.SHUTDOWN}[ending]
    assert sorted((s.request.target, s.outcome) for s in out if s.request) == [
        ("/pending-1", want), ("/pending-2", want)]
    assert [s.response is not None for s in out] == [False, True]
    assert t.stats.buffered_bytes == 0


def test_trailers_only_grpc_error() -> None:
    p = H2Pair()
    sid = p.request(grpc_request("/pkg.Svc/Fail"), b"\0\0\0\0\0")
    p.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                ("grpc-status", "14"), ("grpc-message", "no%20backend")],
                          end_stream=True)  # fmt: skip
    p.flush()
    c = conv()
    (s,), _ = run(c.handshake() + p.segments(c) + c.close())
    a = attrs(s)
    assert a["rpc.grpc.status_code"] == 14 and a["clovisor.grpc.message"] == "no backend"
    assert s.response is not None and s.response.body_size == 0
    assert all(k != "grpc-status" for k, _ in s.response.headers)


def test_plain_http2_has_no_rpc_attributes() -> None:
    p = H2Pair()
    p.respond(p.request(get("/index.html")), 404, b"nope")
    c = conv()
    (s,), _ = run(c.handshake() + p.segments(c) + c.close())
    assert s.response is not None and s.response.status_code == 404
    assert not any(k.startswith("rpc.") for k in attrs(s))


def test_client_streaming_and_bidi() -> None:
    p = H2Pair()
    sid = p.request(grpc_request("/chat.Chat/Talk"), end=False)
    for i in range(5):
        p.client.send_data(sid, b"\0\0\0\0\x03abc")
        p.flush()
        if i == 0:
            p.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        p.server.send_data(sid, b"\0\0\0\0\x02ok")
        p.flush()
    p.client.end_stream(sid)
    p.flush()
    p.server.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    p.flush()
    c = conv()
    (s,), _ = run(c.handshake() + p.segments(c) + c.close())
    assert s.request is not None and s.request.body_size == 40
    assert s.response is not None and s.response.body_size == 35
    assert attrs(s)["rpc.grpc.status_code"] == 0


def test_lost_segment_inside_a_body_is_counted_through() -> None:
    p = H2Pair(window=1 << 20)
    sid = p.request(get("/x"))
    p.server.send_headers(sid, [(":status", "200")])
    p.server.send_data(sid, b"z" * 10000, end_stream=True)
    p.flush()
    c = conv(256)
    segs = c.handshake() + p.segments(c, lambda d, b: [1000] * 20)
    # Drop the response segment that holds bytes 2000-3000 of the DATA payload.
    resp = [i for i, s in enumerate(segs) if s.direction is RESP and s.payload_len == 1000]
    del segs[resp[3]]
    out, t = run(segs + c.close())
    (s,) = out
    assert s.outcome is Outcome.COMPLETE and s.response is not None
    assert s.response.body_size == 10000
    assert t.stats.parse_errors == 0


def test_picked_up_mid_stream() -> None:
    p = H2Pair()
    for i in range(3):  # before the tracer: the HPACK tables fill
        p.respond(p.request(grpc_request("/pkg.Svc/Old", tag=f"old{i}")), body=b"r",
                  trailers=[("grpc-status", "0")])  # fmt: skip
    mark = len(p.writes)
    for i in range(2):
        p.respond(p.request(grpc_request("/pkg.Svc/Old", tag=f"new{i}")), body=b"r",
                  trailers=[("grpc-status", "0")])  # fmt: skip
    p.respond(p.request(grpc_request("/pkg.Svc/Brand", extra=[("traceparent", "00-" + "a" * 32
              + "-" + "b" * 16 + "-01")])), body=b"r", trailers=[("grpc-status", "0")])  # fmt: skip
    c = conv()
    c.handshake()
    p.skip(c, 0, mark)
    t = Tracker(parsers=lambda pid: grpc_connection if pid == H2 else None)
    out = t.feed_many(p.segments(c, start=mark) + c.close()) + t.close()
    assert len(out) == 3 and t.stats.parse_errors == 0
    old = out[:2]
    for s in old:
        assert s.request is not None and s.request.method == "POST"  # the static table
        assert s.request.target == ""  # indexed before the pickup: unknown, not guessed
        assert attrs(s)["clovisor.http2.headers_incomplete"] is True
        assert dict(s.request.headers).get("x-request-id", "new").startswith("new")
    brand = out[2]
    assert brand.request is not None and brand.request.target == "/pkg.Svc/Brand"
    assert dict(brand.request.headers)["traceparent"].startswith("00-aaaa")
    assert attrs(brand)["rpc.method"] == "Brand"
    assert all(s.response is not None and s.response.status_code == 200 for s in out)


def test_streams_over_the_limit_are_dropped_newest_first() -> None:
    p = H2Pair()
    sids = [p.request(get(f"/{i}")) for i in range(10)]
    for sid in sids:
        p.respond(sid)
    c = conv()
    four = functools.partial(Http2Connection, max_streams=4)
    t = Tracker(parsers=lambda pid: four if pid == H2 else None)
    out = t.feed_many(c.handshake() + p.segments(c) + c.close()) + t.close()
    # Requests all arrive before any response: only the first four are kept.
    assert [s.request.target for s in out if s.request] == ["/0", "/1", "/2", "/3"]
    assert t.stats.dropped_requests == 6 and t.stats.unpaired_responses == 0


def test_budget_counts_held_bytes_and_gets_them_back() -> None:
    p = H2Pair()
    for i in range(50):
        p.request(get(f"/{i}", tag="x" * 500))
    c = conv()
    t = tracker(Limits(max_buffered_bytes=20_000))
    t.feed_many(c.handshake() + p.segments(c))
    assert 0 < t.stats.buffered_bytes <= 20_000
    assert t.stats.dropped_requests > 0
    t.close()
    assert t.stats.buffered_bytes == 0



def test_server_push_keeps_the_tables_in_step_and_gives_no_session() -> None:
    p = H2Pair()
    sid = p.request(get("/index.html"))
    pushed = p.server.get_next_available_stream_id()
    p.server.push_stream(sid, pushed, [(":method", "GET"), (":scheme", "http"),
                                       (":path", "/style.css"), (":authority", "web:8080")])
    p.server.send_headers(pushed, [(":status", "200"), ("content-type", "text/css")])
    p.server.send_data(pushed, b"body{}", end_stream=True)
    p.flush()
    p.respond(sid, body=b"<html>", headers=[("content-type", "text/html")])
    p.respond(p.request(get("/next")), body=b"n", headers=[("content-type", "text/css")])
    c = conv()
    out, t = run(c.handshake() + p.segments(c) + c.close())
    assert [s.request.target for s in out if s.request] == ["/index.html", "/next"]
    # (respond() sends application/grpc first; the last value wins in a dict)
    assert [dict(s.response.headers)["content-type"] for s in out if s.response] == [
        "text/html", "text/css"]
    assert not any("clovisor.http2.headers_incomplete" in attrs(s) for s in out)
    assert t.stats.unpaired_responses == 0


def test_request_trailers_after_an_early_response_open_no_stream() -> None:
    p = H2Pair()
    sid = p.request(grpc_request("/up.Load/Stream"), end=False)
    p.respond(sid, trailers=[("grpc-status", "3")])  # answered before the request ended
    p.client.send_data(sid, b"\0\0\0\0\0")
    p.client.send_headers(sid, [("x-checksum", "1")], end_stream=True)
    p.flush()
    c = conv()
    out, _ = run(c.handshake() + p.segments(c) + c.close())
    assert len(out) == 1 and attrs(out[0])["rpc.grpc.status_code"] == 3


@pytest.mark.parametrize("protocol", [Protocol.HTTP2, Protocol.GRPC])
def test_declared_ports_are_http2_in_the_tracker_without_a_parser_lookup(
    protocol: Protocol,
) -> None:
    p = H2Pair()
    # No content-type recorded: only a port declared gRPC makes the stream an RPC.
    sid = p.request([(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Do"),
                     (":authority", "svc")], b"\0\0\0\0\0")  # fmt: skip
    p.respond(sid, body=b"\0\0\0\0\0", trailers=[("grpc-status", "5")])
    c = Conversation(protocol=protocol, sport=50051)
    t = Tracker(Limits(max_http2_streams=8))  # no parser lookup at all
    out = t.feed_many(c.handshake() + p.segments(c) + c.close()) + t.close()
    assert len(out) == 1 and out[0].protocol == protocol
    assert out[0].outcome is Outcome.COMPLETE
    a = attrs(out[0])
    if protocol is Protocol.GRPC:
        assert (a["rpc.system"], a["rpc.service"], a["rpc.method"]) == ("grpc", "pkg.Svc", "Do")
        assert a["rpc.grpc.status_code"] == 5
    else:
        assert "rpc.system" not in a


@pytest.mark.parametrize("capture", [64, 256, 1024])
def test_frame_headers_from_the_classifier_keep_framing_beyond_the_capture(capture: int) -> None:
    """GSO-sized segments of many frames each: the classifier's frame headers
    keep the framing, the body sizes and the trailers' status."""
    p = H2Pair(window=1 << 24)
    body = bytes(range(256)) * 4096  # 1 MiB
    # Each body one write of many frames, as a writer hands a message to TCP.
    sid = p.request(grpc_request("/bulk.Store/Put"), end=False)
    p.send_body(p.client, sid, body, end=True, frame_writes=False)
    p.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    p.send_body(p.server, sid, body, end=False, frame_writes=False)
    p.server.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    p.flush()
    sid2 = p.request(grpc_request("/bulk.Store/Get"), b"\0\0\0\0\x02hi")
    p.respond(sid2, body=b"\0\0\0\0\x02ok", trailers=[("grpc-status", "5"),
                                                    ("grpc-message", "no such key")])
    c = Conversation(capture=1 << 30, protocol=Protocol.GRPC, sport=50051)
    isn = dict(c.seq)
    # Whole writes cut into 64 KB segments, as GSO hands them to the hook.
    segs = c.handshake() + p.segments(c, lambda d, b: [65000] * (len(b) // 65000 + 1))
    segs = with_kernel_frames(segs + c.close(), capture, isn)
    assert sum(len(s.frames) for s in segs) > 0
    t = Tracker()
    out = t.feed_many(segs) + t.close()
    assert [s.request.target for s in out if s.request] == ["/bulk.Store/Put", "/bulk.Store/Get"]
    put, get_ = out
    assert put.outcome is Outcome.COMPLETE and get_.outcome is Outcome.COMPLETE
    assert put.request is not None and put.request.body_size == 1 << 20
    assert put.response is not None and put.response.body_size == 1 << 20
    assert attrs(put)["rpc.grpc.status_code"] == 0
    assert attrs(get_)["rpc.grpc.status_code"] == 5
    assert attrs(get_)["clovisor.grpc.message"] == "no such key"
    assert t.stats.parse_errors == 0 and t.stats.framing_lost == 0
    assert t.stats.buffered_bytes == 0


def test_without_the_classifiers_frame_headers_framing_is_lost_there() -> None:
    p = H2Pair(window=1 << 24)
    sid = p.request(grpc_request("/bulk.Store/Put"), end=False)
    p.send_body(p.client, sid, b"x" * 300_000, end=True, frame_writes=False)
    p.respond(sid, body=b"ok", trailers=[("grpc-status", "0")])
    c = Conversation(capture=1 << 30, protocol=Protocol.GRPC, sport=50051)
    isn = dict(c.seq)
    segs = c.handshake() + p.segments(c, lambda d, b: [65000] * (len(b) // 65000 + 1))
    # The classifier had no state for the flow (picked up late): no frame headers.
    segs = with_kernel_frames(segs + c.close(), 256, isn, skip=len(segs) + 2)
    t = Tracker()
    out = t.feed_many(segs) + t.close()
    assert len(out) == 1 and t.stats.framing_lost >= 1
    assert t.stats.untraced.get(("truncated", 50051), 0) >= 1
