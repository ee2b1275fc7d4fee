"""HTTP/2 under hostile and arbitrary input: nothing escapes, memory is bounded."""

from __future__ import annotations

import random

import h2.settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clovisor.core.events import Outcome, Session
from clovisor.core.h2frames import PREFACE
from clovisor.core.tracker import Limits

from .h2wire import REQ, RESP, H2Pair, frames, get, grpc_request
from .test_http2 import attrs, conv, run, tracker


def frame(ftype: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return n.to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


def started() -> tuple[H2Pair, int]:
    """A connection with one good exchange on it; returns the pair and the stream id."""
    p = H2Pair()
    sid = p.request(get("/good"))
    p.respond(sid, body=b"ok")
    return p, sid


def sessions_after(extra_req: bytes = b"", extra_resp: bytes = b"") -> tuple[list[Session], int]:
    p, _ = started()
    if extra_req:
        p.writes.append((REQ, extra_req))
    if extra_resp:
        p.writes.append((RESP, extra_resp))
    c = conv()
    out, t = run(c.handshake() + p.segments(c) + c.close())
    assert t.stats.buffered_bytes == 0 and len(t) == 0
    return out, t.stats.parse_errors


def test_a_frame_larger_than_the_maximum_stops_that_direction() -> None:
    out, errors = sessions_after(frame(0, 0, 3, b"", length=20000) + b"x" * 20000)
    assert [s.request.target for s in out if s.request] == ["/good"] and errors == 1


def test_unknown_frame_types_are_skipped() -> None:
    p, _ = started()
    p.writes.append((REQ, frame(0x42, 0xFF, 0, b"whatever" * 10)))
    p.writes.append((RESP, frame(0xBE, 0, 7, b"?" * 100)))
    sid = p.request(get("/after"))
    p.respond(sid)
    c = conv()
    out, t = run(c.handshake() + p.segments(c) + c.close())
    assert [s.request.target for s in out if s.request] == ["/good", "/after"]
    assert t.stats.parse_errors == 0


def test_bad_padding_stops_that_direction() -> None:
    out, errors = sessions_after(extra_resp=frame(0, 0x8, 1, bytes([200]) + b"p" * 50))
    assert len(out) == 1 and errors == 1


def test_an_interrupted_header_block_stops_that_direction() -> None:
    headers = frame(1, 0, 3, b"\x82\x84")  # no END_HEADERS: CONTINUATION must follow
    out, errors = sessions_after(headers + frame(0, 1, 3, b"data"))
    assert errors == 1
    # The cut-off block still opened its stream: it ends with the connection.
    assert [(s.request.method, s.outcome) for s in out if s.request] == [
        ("GET", Outcome.COMPLETE), ("GET", Outcome.CLOSED)]


def test_not_a_preface_is_unrecognized_not_a_parse_error() -> None:
    c = conv()
    segs = c.handshake() + c.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    segs += c.response(b"HTTP/1.1 400 Bad Request\r\n\r\n") + c.close()
    out, t = run(segs)
    assert out == [] and t.stats.parse_errors == 0
    assert t.stats.untraced == {("unrecognized", 50051): 1}
    assert t.take_samples() == [(50051, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")]
    assert t.take_samples() == []


def test_a_preface_then_a_bad_frame_is_a_parse_error() -> None:
    c = conv()
    bad_settings = frame(4, 0, 0, b"12345")  # SETTINGS of a length no multiple of 6
    segs = c.handshake() + c.request(PREFACE + bad_settings) + c.close()
    out, t = run(segs)
    assert out == [] and t.stats.parse_errors == 1
    assert t.stats.untraced == {("parse_error", 50051): 1}


def test_a_header_block_over_the_bound_is_cut_not_held() -> None:
    p, _ = started()
    big = frame(1, 0, 3, b"\x82\x84" + b"\x00\x05x-pad\x7f\x81\x7f" + b"a" * 16000)
    cont = b"".join(frame(9, 0, 3, b"b" * 16000) for _ in range(8)) + frame(9, 4, 3, b"")
    p.writes.append((REQ, big + cont))
    c = conv(1 << 20)
    t = tracker(Limits(max_header_bytes=32768))
    out = t.feed_many(c.handshake() + p.segments(c))
    assert t.stats.buffered_bytes < 32768 + 8192
    out += t.feed_many(c.close()) + t.close()
    cut = [s for s in out if s.request and s.request.target != "/good"]
    assert len(cut) == 1 and cut[0].request is not None
    assert cut[0].request.method == "GET" and cut[0].request.target == "/"
    assert cut[0].request.header_truncated
    assert attrs(cut[0])["clovisor.http2.headers_incomplete"] is True
    assert t.stats.buffered_bytes == 0


def test_settings_max_frame_size_out_of_range() -> None:
    out, errors = sessions_after(extra_resp=frame(4, 0, 0, b"\x00\x05" + (100).to_bytes(4, "big")))
    assert errors == 1 and len(out) == 1


def test_many_goaways_and_pings_cost_nothing_and_break_nothing() -> None:
    p, _ = started()
    noise = b"".join(frame(7, 0, 0, (99).to_bytes(4, "big") + bytes(4)) + frame(6, 0, 0, bytes(8))
                     for _ in range(500))  # fmt: skip
    p.writes.append((RESP, noise))
    sid = p.request(get("/still"))
    p.respond(sid)
    c = conv(1 << 20)
    out, _ = run(c.handshake() + p.segments(c) + c.close())
    assert [s.request.target for s in out if s.request] == ["/good", "/still"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    req=st.binary(max_size=2000),
    resp=st.binary(max_size=2000),
    preface=st.booleans(),
    capture=st.sampled_from([8, 64, 4096]),
    data=st.data(),
)
def test_arbitrary_bytes_never_raise(
    req: bytes, resp: bytes, preface: bool, capture: int, data: st.DataObject
) -> None:
    c = conv(capture)
    segs = c.handshake()
    blob = (PREFACE + req) if preface else req
    if blob:
        segs += c.request(blob, data.draw(st.lists(st.integers(1, 300), max_size=20)))
    if resp:
        segs += c.response(resp, data.draw(st.lists(st.integers(1, 300), max_size=20)))
    t = tracker(Limits(max_buffered_bytes=1 << 16))
    out = t.feed_many(segs)
    assert t.stats.buffered_bytes <= 1 << 16
    out += t.feed_many(c.close()) + t.close()
    assert len(t) == 0 and t.stats.buffered_bytes == 0
    assert all(s.end_ns >= s.start_ns for s in out)


@st.composite
def exchanges(draw: st.DrawFn) -> list[dict[str, object]]:
    out = []
    for i in range(draw(st.integers(1, 5))):
        grpc = draw(st.booleans())
        out.append({
            "path": f"/pkg.Svc/M{draw(st.integers(0, 3))}" if grpc else f"/p/{i}",
            "grpc": grpc,
            "tag": f"t{i}",
            "req_body": draw(st.integers(0, 3000)) if grpc else 0,
            "status": draw(st.sampled_from([200, 404, 503])),
            "resp_body": draw(st.integers(0, 40000)),
            "trailers": grpc or draw(st.booleans()),
        })  # fmt: skip
    return out


def converse(ex: list[dict[str, object]], order: random.Random) -> H2Pair:
    """All requests first (concurrent streams), then answers in a shuffled order."""
    p = H2Pair(window=1 << 20)
    sids = []
    for e in ex:
        path, tag = str(e["path"]), str(e["tag"])
        headers = grpc_request(path, tag=tag) if e["grpc"] else get(path, tag=tag)
        body = b"q" * int(str(e["req_body"]))
        sids.append(p.request(headers, body))
    todo = list(zip(sids, ex, strict=True))
    order.shuffle(todo)
    for sid, e in todo:
        trailers = [("grpc-status", "0")] if e["trailers"] else None
        p.respond(sid, int(str(e["status"])), b"r" * int(str(e["resp_body"])),
                  headers=[("x-request-id", str(e["tag"]))], trailers=trailers)  # fmt: skip
    return p


def summary(out: list[Session]) -> list[tuple[object, ...]]:
    return sorted(
        (
            s.request.target if s.request else None,
            dict(s.request.headers).get("x-request-id") if s.request else None,
            s.request.body_size if s.request else None,
            s.response.status_code if s.response else None,
            dict(s.response.headers).get("x-request-id") if s.response else None,
            s.response.body_size if s.response else None,
            s.request_bytes, s.response_bytes, s.outcome, s.attributes,
        )
        for s in out
    )  # fmt: skip


def cuts(draw: st.DrawFn, n: int) -> list[int]:
    return draw(st.lists(st.integers(1, max(1, n)), max_size=30))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ex=exchanges(), seed=st.integers(0, 2**32), data=st.data())
def test_same_sessions_however_the_bytes_are_cut(
    ex: list[dict[str, object]], seed: int, data: st.DataObject
) -> None:
    p = converse(ex, random.Random(seed))
    c = conv(1 << 20)
    whole, _ = run(c.handshake() + p.segments(c) + c.close())
    assert len(whole) == len(ex)
    for s in whole:
        assert s.outcome is Outcome.COMPLETE and s.request is not None and s.response is not None
        assert dict(s.request.headers)["x-request-id"] == dict(s.response.headers)["x-request-id"]
    c = conv(1 << 20)
    cut, t = run(c.handshake() + p.segments(c, lambda d, b: cuts(data.draw, len(b))) + c.close())
    assert summary(cut) == summary(whole) and t.stats.parse_errors == 0
    # Frame-aligned segments with a short capture give the same sessions.
    c = conv(256)
    short, _ = run(c.handshake() + p.segments(c, lambda d, b: frames(b)) + c.close())
    assert summary(short) == summary(whole)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ex=exchanges(), seed=st.integers(0, 2**32), data=st.data())
def test_lost_segments_never_mispair(
    ex: list[dict[str, object]], seed: int, data: st.DataObject
) -> None:
    """Whatever the ring loses, a session's request and response are one stream's."""
    p = converse(ex, random.Random(seed))
    c = conv(512)
    segs = c.handshake() + p.segments(c, lambda d, b: [1000] * (len(b) // 1000 + 1))
    keep = [s for s in segs if not s.payload_len or data.draw(st.integers(0, 5)) != 0]
    t = tracker()
    out = t.feed_many(keep + c.close()) + t.close()
    assert len(t) == 0 and t.stats.buffered_bytes == 0
    for s in out:
        if s.request is None or s.response is None:
            continue
        sent = dict(s.request.headers).get("x-request-id")
        answered = dict(s.response.headers).get("x-request-id")
        if sent is not None and answered is not None:
            assert sent == answered
        assert s.end_ns >= s.start_ns


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ex=exchanges(), seed=st.integers(0, 2**32), flips=st.integers(1, 20),
       synced=st.booleans(), capture=st.sampled_from([64, 256, 4096]))  # fmt: skip
def test_mutated_conversations_never_raise(
    ex: list[dict[str, object]], seed: int, flips: int, synced: bool, capture: int
) -> None:
    """Real conversations with bytes flipped, seen from the start or picked up."""
    rnd = random.Random(seed)
    p = converse(ex, rnd)
    writes = []
    for d, w in p.writes:
        b = bytearray(w)
        for _ in range(flips if rnd.random() < 0.3 else 0):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        writes.append((d, bytes(b)))
    p.writes = writes
    c = conv(capture)
    segs = c.handshake() if synced else []
    segs += p.segments(c, lambda d, b: [rnd.randrange(1, 3000) for _ in range(len(b) // 500 + 1)])
    t = tracker(Limits(max_buffered_bytes=1 << 18))
    out = t.feed_many(segs)
    assert t.stats.buffered_bytes <= 1 << 18
    out += t.close()
    assert len(t) == 0 and t.stats.buffered_bytes == 0
    assert all(s.end_ns >= s.start_ns for s in out)
    assert all(s.response is None or s.response.status_code == 0 or
               100 <= s.response.status_code <= 599 for s in out)  # fmt: skip


def test_held_memory_is_what_the_budget_counts() -> None:
    """Open streams with big recorded fields: tracemalloc agrees with the budget."""
    import tracemalloc

    p = H2Pair(window=1 << 20)
    p.server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
    p.flush()
    for i in range(200):
        p.request(get(f"/{i}", tag=f"{i:04d}" * 2000))  # 8 KB recorded per stream, never answered
    c = conv(1 << 20)
    segs = c.handshake() + p.segments(c)
    t = tracker()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    t.feed_many(segs)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(d.size_diff for d in after.compare_to(before, "filename"))
    held = t.stats.buffered_bytes
    assert held > 200 * 8000
    # Python objects cost more than their bytes: each field's str, tuple and the
    # stream's object; about 1 KiB per stream beyond what the budget counts.
    print(f"held {held} B, tracemalloc grew {grown} B")
    assert grown <= held + 200 * 1024, (grown, held)
    t.close()
    assert t.stats.buffered_bytes == 0
