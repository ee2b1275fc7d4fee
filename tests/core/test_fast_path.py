"""The fast path (whole messages in one segment) against the general path.

``Tracker(fast_path=False)`` frames every segment the general way (Chunks,
the reassembler's queue, one state-machine step at a time); the default
tracker takes the fast path where it can. On any traffic, cut any way,
both must emit equal sessions and equal counters. The header parser's
one-pass fast path is held to its line-by-line loop the same way.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clovisor.core import http1
from clovisor.core.events import Direction, Outcome, Segment, Session
from clovisor.core.http1 import Head, Kind, parse_head
from clovisor.core.tracker import Tracker

from .test_properties import _cuts, _mess
from .wire import Conversation, bytewise

# -- traffic: plain, odd and broken messages, as a parser meets them -----------------

HEADER_NAMES = ["Host", "host", "HOST", "User-Agent", "X-Request-Id", "Content-Type",
                "Accept", "Traceparent", "X-Whatever", "b3", "Cookie"]
SPACES = ["", " ", "  ", "\t", " \t"]


@st.composite
def fields(draw: st.DrawFn) -> list[bytes]:
    out = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(HEADER_NAMES))
        value = draw(st.text("abcXYZ019 -/:;,=\t", max_size=20))
        out.append(f"{name}:{draw(st.sampled_from(SPACES))}{value}".encode())
    return out


def _eol(draw: st.DrawFn) -> bytes:
    # Mostly CRLF; now and then what real stacks also send.
    return draw(st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r\r\n"]))


@st.composite
def framing(draw: st.DrawFn, body: bytes, request: bool) -> tuple[list[bytes], bytes]:
    """Framing header lines and the body bytes as they go on the wire."""
    how = draw(st.sampled_from(["length", "length", "chunked", "none", "odd"]))
    if how == "length":
        return [b"Content-Length: %d" % len(body)], body
    if how == "chunked" and body:
        cut = draw(st.integers(1, len(body)))
        wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]) if p)
        return [b"Transfer-Encoding: chunked"], wire + b"0\r\n\r\n"
    if how == "odd":
        line = draw(st.sampled_from([
            b"Content-Length: 12x", b"Content-Length: 3", b"Transfer-Encoding: gzip",
            b"Connection: close", b"Connection: Upgrade, keep-alive", b"content-length:0",
            b"Content-Length: 2\r\nContent-Length: 3", b"  folded continuation",
            b"Bad Header: x", b"NoColon",
        ]))
        return [line], body if request is False else b""
    return [], b""


@st.composite
def message(draw: st.DrawFn, request: bool) -> bytes:
    if request:
        method = draw(st.sampled_from(["GET", "POST", "HEAD", "PUT", "OPTIONS", "CONNECT"]))
        start = f"{method} /{draw(st.text('ab/?=&', max_size=8))} HTTP/1.{draw(st.integers(0, 1))}"
    else:
        code = draw(st.sampled_from([200, 200, 201, 204, 304, 404, 500, 100, 101]))
        reason = draw(st.sampled_from(["OK", "", "X Y"]))
        start = f"HTTP/1.{draw(st.integers(0, 1))} {code} {reason}"
    body = b"b" * draw(st.sampled_from([0, 0, 1, 17, 300, 2000]))
    lines, wire_body = draw(framing(body, request))
    all_lines = draw(fields()) + lines
    draw(st.randoms()).shuffle(all_lines)
    eol = _eol(draw)
    head = start.encode() + eol + b"".join(line + eol for line in all_lines) + eol
    return head + wire_body


@st.composite
def traffic(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(draw(st.integers(1, 5))):
        req = draw(message(True))
        resp = draw(message(False))
        if draw(st.integers(0, 9)) == 0:
            resp = draw(st.binary(max_size=40))  # not HTTP at all
        out.append((req, resp))
    return out


def _segments(ex: list[tuple[bytes, bytes]], data: st.DataObject) -> list[Segment]:
    capture = data.draw(st.sampled_from([1 << 20, 1 << 20, 256, 64]))
    mode = data.draw(st.sampled_from(["whole", "whole", "cut", "bytewise", "messy"]))
    pipelined = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**32))
    c = Conversation(capture=capture)
    segs = c.handshake() if data.draw(st.integers(0, 5)) else []  # sometimes mid-stream
    reqs: list[Segment] = []
    resps: list[Segment] = []
    if data.draw(st.integers(0, 3)) == 0:
        # Pipelined and written together: several messages per segment.
        ex = [(b"".join(r for r, _ in ex), b"".join(r for _, r in ex))]
    for req, resp in ex:
        pair = []
        for msg, send in ((req, c.request), (resp, c.response)):
            sizes = None
            if mode in ("cut", "messy") and msg:
                sizes = _cuts(data.draw, msg)  # type: ignore[arg-type]
            elif mode == "bytewise" and msg:
                sizes = bytewise(msg)
            got = send(msg, sizes) if msg else []
            if mode == "messy":
                got = _mess(got, random.Random(seed))
            pair.append(got)
        if pipelined:
            reqs += pair[0]
            resps += pair[1]
        else:
            segs += pair[0] + pair[1]
    if data.draw(st.booleans()):
        # Responses that acknowledge less than was sent: pairing goes by ack numbers.
        segs = [s._replace(ack=(s.ack - data.draw(st.integers(0, 400))) & 0xFFFFFFFF)
                if s.direction is Direction.RESPONSE and s.payload_len else s for s in segs]
    if data.draw(st.booleans()):  # GSO: one segment may stand for several packets
        segs = [s._replace(packets=data.draw(st.integers(1, 4))) for s in segs]
    ending = data.draw(st.sampled_from(["close", "rst", "none"]))
    tail = c.close() if ending == "close" else c.rst(Direction.RESPONSE) if ending == "rst" else []
    return [*segs, *reqs, *resps, *tail]


def _both(segs: list[Segment]) -> tuple[tuple[list[Session], dict[str, int], int], ...]:
    out = []
    for fast in (True, False):
        t = Tracker(fast_path=fast)
        sessions = t.feed_many(segs)
        if segs:  # just not idle for long enough: only a stale last_ts would time out
            sessions += t.advance(max(s.ts_ns for s in segs) + t.limits.idle_timeout_ns)
        sessions += t.advance(10**12)
        sessions += t.close()
        out.append((sessions, t.stats.as_dict(), len(t)))
    return tuple(out)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ex=traffic(), data=st.data())
def test_fast_path_emits_what_the_general_path_emits(
    ex: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    fast, general = _both(_segments(ex, data))
    assert fast == general


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=2000), data=st.data())
def test_fast_path_on_arbitrary_bytes(blob: bytes, data: st.DataObject) -> None:
    c = Conversation(capture=data.draw(st.sampled_from([8, 64, 4096])))
    segs = c.handshake() + c.request(b"GET / HTTP/1.1\r\n\r\n" + blob)
    segs += c.response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc" + blob[::-1])
    fast, general = _both([*segs, *c.close()])
    assert fast == general


def test_fast_path_is_taken_for_whole_messages() -> None:
    """The common case really takes it: no Chunk is built for a whole exchange."""
    c = Conversation()
    segs = c.handshake()
    for i in range(3):
        segs += c.request(f"GET /{i} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        segs += c.response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    t = Tracker()
    calls = []
    original = http1.Framer.feed
    try:
        http1.Framer.feed = lambda self, chunk, ack: calls.append(chunk)  # type: ignore[method-assign]
        sessions = t.feed_many(segs)
    finally:
        http1.Framer.feed = original  # type: ignore[method-assign]
    assert calls == []
    assert [s.request.target for s in sessions if s.request] == ["/0", "/1", "/2"]
    assert all(s.outcome is Outcome.COMPLETE and s.response_bytes == 40 for s in sessions)


@pytest.mark.parametrize("sizes", [None, [1] * 200, [30, 2, 500]])
def test_body_after_a_fast_head_continues_by_length(sizes: list[int] | None) -> None:
    c = Conversation(capture=64)
    body = b"x" * 5000
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + body
    segs = c.handshake() + c.request(b"GET /big HTTP/1.1\r\n\r\n") + c.response(resp, sizes)
    segs += c.request(b"GET /next HTTP/1.1\r\n\r\n") + c.response(resp)
    fast, general = _both([*segs, *c.close()])
    assert fast == general
    sessions = fast[0]
    assert [s.response.body_size for s in sessions if s.response] == [5000, 5000]


# -- the header parser ---------------------------------------------------------------


@st.composite
def head_blocks(draw: st.DrawFn) -> tuple[Kind, bytes]:
    request = draw(st.booleans())
    msg = draw(message(request))
    end = msg.find(b"\r\n\r\n")
    block = msg[: end + 4] if end >= 0 else msg
    if draw(st.integers(0, 4)) == 0:
        block = draw(st.binary(max_size=60)) + block[draw(st.integers(0, len(block))):]
    return (Kind.REQUEST if request else Kind.RESPONSE), block


def _slow_parse(kind: Kind, block: bytes, truncated: bool) -> Head | None:
    saved = http1._CLEAN_FIELDS
    try:
        http1._CLEAN_FIELDS = _NEVER  # type: ignore[assignment]
        return parse_head(kind, block, truncated=truncated, header_bytes=len(block))
    finally:
        http1._CLEAN_FIELDS = saved


class _Never:
    @staticmethod
    def fullmatch(_block: bytes, _pos: int) -> None:
        return None


_NEVER = _Never()


@settings(max_examples=1000, deadline=None)
@given(case=head_blocks(), truncated=st.booleans())
def test_one_pass_fields_equal_the_line_loop(case: tuple[Kind, bytes], truncated: bool) -> None:
    kind, block = case
    assert parse_head(kind, block, truncated=truncated, header_bytes=len(block)) == _slow_parse(
        kind, block, truncated
    )


def test_one_pass_fields_on_a_common_block() -> None:
    block = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type:  text/plain \r\n"
             b"content-length: 17\r\nConnection: keep-alive\r\n\r\n")
    head = parse_head(Kind.RESPONSE, block, truncated=False, header_bytes=len(block))
    assert head == _slow_parse(Kind.RESPONSE, block, False)
    assert head is not None
    assert (head.status_code, head.content_length, head.headers) == (
        200, 17, (("content-type", "text/plain"),))


def test_pipelined_requests_in_one_segment_keep_their_own_start() -> None:
    """Each message of a run starts at its own offset: pairing by ack depends on it."""
    c = Conversation()
    req1, req2 = b"GET /1 HTTP/1.1\r\n\r\n", b"GET /2 HTTP/1.1\r\n\r\n"
    segs = c.handshake()
    start = c.seq[Direction.REQUEST]
    segs += c.request(req1 + req2)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    # Both answers acknowledge only the first request: the second cannot be theirs.
    stale = (start + len(req1)) & 0xFFFFFFFF
    segs += [s._replace(ack=stale) for s in c.response(ok) + c.response(ok)]
    fast, general = _both(segs)
    assert fast == general
    sessions, stats, _ = fast
    assert stats["unpaired_responses"] == 1
    done = [s for s in sessions if s.response is not None]
    assert [s.request.target for s in done if s.request] == ["/1"]
