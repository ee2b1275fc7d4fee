"""Chunked bodies whose chunk-size lines fall beyond the captured prefix: sizes on the wire."""

from __future__ import annotations

import pytest

from clovisor.core.events import Direction, Outcome

from .test_tracker import chunked, get, run
from .wire import Conversation, bytewise


def with_trailers(parts: list[bytes]) -> bytes:
    """A chunked response whose last chunk carries trailer fields (no bare 0 CRLF CRLF)."""
    return chunked(parts)[:-2] + b"X-Checksum: 5eb63bbbe01eeed\r\n\r\n"


CUTS = {
    "head-then-body": lambda head, n: [head, n - head],
    "one-segment": lambda head, n: [n],
    "trailer-alone": lambda head, n: [head, n - head - 33, 33],
    "mss": lambda head, n: [1448] * (n // 1448 + 1),
}


@pytest.mark.parametrize("capture", [64, 1024])
@pytest.mark.parametrize("cut", list(CUTS))
def test_chunked_with_trailers_beyond_the_capture(capture: int, cut: str) -> None:
    body = with_trailers([b"a" * 3000, b"b" * 5000, b"c" * 10])
    head = body.index(b"\r\n\r\n") + 4
    c = Conversation(capture=capture)
    segs = c.handshake() + c.request(get("/1")) + c.response(body, CUTS[cut](head, len(body)))
    segs += c.request(get("/2")) + c.response(chunked([b"x"]))
    out, t = run(segs + c.close())
    assert [(s.request.target, s.response.body_size, s.outcome) for s in out
            if s.request and s.response] == [
        ("/1", len(body) - head, Outcome.COMPLETE), ("/2", 11, Outcome.COMPLETE)]  # fmt: skip
    assert t.stats.parse_errors == 0


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_chunked_with_trailers_fully_captured(mode: str) -> None:
    body = with_trailers([b"a" * 30, b"b" * 50])
    head = body.index(b"\r\n\r\n") + 4
    c = Conversation(capture=1 << 20)
    sizes = bytewise(body) if mode == "bytewise" else None
    segs = c.handshake() + c.request(get("/1")) + c.response(body, sizes)
    segs += c.request(get("/2")) + c.response(chunked([b"x"]))
    out, _ = run(segs + c.close())
    assert [s.response.body_size for s in out if s.response] == [len(body) - head, 11]


def test_chunked_without_a_visible_end_ends_at_the_fin() -> None:
    body = with_trailers([b"z" * 20000])
    head = body.index(b"\r\n\r\n") + 4
    c = Conversation(capture=256)
    segs = c.handshake() + c.request(get("/last")) + c.response(body, [head, 10000, 10000])
    segs += c.fin(Direction.RESPONSE)
    out, _ = run(segs + c.fin(Direction.REQUEST))
    assert len(out) == 1 and out[0].response is not None
    assert out[0].response.body_size == len(body) - head
    assert out[0].outcome is Outcome.COMPLETE


def test_chunked_request_with_trailers_beyond_the_capture() -> None:
    body = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (b"u" * 4000, b"v" * 900))
    body += b"0\r\nX-Digest: abc\r\n\r\n"
    req = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    c = Conversation(capture=128)
    segs = c.handshake() + c.request(req + body, [len(req), len(body)])
    segs += c.request(get("/next"))
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    segs += c.response(ok) + c.response(ok)
    out, _ = run(segs + c.close())
    assert [(s.request.target, s.request.body_size) for s in out if s.request] == [
        ("/up", len(body)), ("/next", 0)]
