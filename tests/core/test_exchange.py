"""Exchanges the kernel paired give the sessions the user-space framer gives.

``kernel_exchange`` is what the classifier sends for an exchange it frames
(bpf/clovisor.bpf.c): one record from the in-order segments of one request
and its response. The kernel tests check the classifier against the same
sessions on real packets.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clovisor.core.events import (
    Direction,
    Exchange,
    Handover,
    Outcome,
    Phase,
    Segment,
    Session,
)
from clovisor.core.tracker import Limits, Tracker

from .test_tracker import get, ok
from .wire import SERVER, Conversation

REQ, RESP = Direction.REQUEST, Direction.RESPONSE
METHODS = {b"GET": 1, b"HEAD": 2, b"POST": 3, b"PUT": 4, b"DELETE": 5}


def head_of(seg: Segment) -> bytes:
    return seg.payload[: seg.payload.index(b"\r\n\r\n") + 4]


def kernel_exchange(
    req: list[Segment], resp: list[Segment], phase: Phase = Phase.COMPLETE
) -> Exchange:
    """The classifier's record (or held exchange) for these in-order segments."""
    first = req[0]
    request_head = head_of(first)
    response_head = head_of(resp[0]) if resp else b""
    last = (resp or req)[-1]
    return Exchange(
        start_ns=first.ts_ns,
        end_ns=last.ts_ns,
        ifindex=first.ifindex,
        role=first.role,
        family=first.family,
        client_addr=first.saddr,
        client_port=first.sport,
        server_addr=first.daddr,
        server_port=first.dport,
        method=METHODS.get(request_head.split(b" ", 1)[0], 0),
        status=int(response_head[9:12]) if resp else 0,
        req_seq=first.seq,
        req_ack=first.ack,
        request_bytes=sum(s.payload_len for s in req),
        request_packets=sum(s.packets for s in req),
        response_bytes=sum(s.payload_len for s in resp),
        response_packets=sum(s.packets for s in resp),
        request_head=request_head,
        response_head=response_head,
        phase=phase,
    )


def both_ways(
    handshake: list[Segment], req: list[Segment], resp: list[Segment]
) -> tuple[list[Session], list[Session]]:
    """Sessions of the same traffic as segments, and as the kernel's exchange record."""
    framed = Tracker().feed_many(handshake + req + resp)
    paired = Tracker().feed_many([kernel_exchange(req, resp)])
    return framed, paired


def split(data: bytes, mode: str, head: int) -> list[int] | None:
    """Segment sizes: whole, or the head whole and the rest in pieces."""
    if mode == "whole" or len(data) <= head:
        return None
    return [head] + [max(1, (len(data) - head) // 3)] * 3


CASES = {
    "get": (get("/a/b?x=1"), ok(b"x" * 300)),
    "post": (
        b"POST /upload?name=blob HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000\r\n"
        b"Content-Type: application/octet-stream\r\ntraceparent: "
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n" + b"p" * 1000,
        ok(b"created", status="201 Created", extra="Content-Type: text/plain\r\n"),
    ),
    "head": (
        b"HEAD /big HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",
    ),
    "204": (get("/nothing"), b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"),
    "304": (get("/cached"), b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
    "empty": (get("/empty"), ok(b"", status="503 Unavailable")),
    "http10": (
        get("/old", version="1.0"),
        b"HTTP/1.0 404 Not Found\r\nContent-Length: 4\r\n\r\nnope",
    ),
    "lower-case": (
        b"DELETE /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 202\r\ncontent-length:  2 \r\n\r\nok",
    ),
}


@pytest.mark.parametrize("mode", ["whole", "split"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_paired_exchange_is_the_framed_session(case: str, mode: str) -> None:
    request, response = CASES[case]
    c = Conversation()
    hs = c.handshake()
    req = c.request(request, split(request, mode, len(head_of_bytes(request))))
    resp = c.response(response, split(response, mode, len(head_of_bytes(response))))
    framed, paired = both_ways(hs, req, resp)
    assert len(framed) == 1 and framed[0].outcome is Outcome.COMPLETE
    assert paired == framed


def head_of_bytes(data: bytes) -> bytes:
    return data[: data.index(b"\r\n\r\n") + 4]


def test_ipv6_and_keep_alive() -> None:
    c = Conversation(client=bytes(range(16)), server=bytes(range(16, 32)))
    framed = Tracker()
    paired = Tracker()
    got_framed: list[Session] = []
    got_paired: list[Session] = []
    got_framed += framed.feed_many(c.handshake())
    for i in range(3):
        req, resp = c.request(get(f"/{i}")), c.response(ok(b"y" * i))
        got_framed += framed.feed_many(req + resp)
        got_paired += paired.feed_many([kernel_exchange(req, resp)])
    assert len(got_framed) == 3 and got_paired == got_framed
    assert got_paired[0].client_addr == "1:203:405:607:809:a0b:c0d:e0f"


@pytest.mark.parametrize(
    ("name", "phase"),
    [("wait", Phase.WAIT), ("request-body", Phase.REQUEST), ("response-body", Phase.RESPONSE)],
)
def test_a_held_exchange_times_out_as_the_framer_times_out(name: str, phase: Phase) -> None:
    c = Conversation()
    hs = c.handshake()
    body = b"b" * 4000
    request = CASES["post"][0] if phase is not Phase.REQUEST else (
        b"POST /slow HTTP/1.1\r\nContent-Length: 4000\r\n\r\n" + body[:100]
    )
    req = c.request(request, split(request, "split", len(head_of_bytes(request))))
    resp: list[Segment] = []
    if phase is Phase.RESPONSE:
        resp = c.response(ok(body)[:500], [300, 200])
    lim = Limits(idle_timeout_ns=1_000_000)
    framer = Tracker(lim)
    framer.feed_many(hs + req + resp)
    now = (resp or req)[-1].ts_ns + 2_000_000
    [framed] = framer.advance(now)
    held = kernel_exchange(req, resp, phase)
    [paired] = Tracker(lim).end_held([held], Outcome.TIMEOUT, now)
    assert framed.outcome is Outcome.TIMEOUT
    assert paired == framed, name


def test_held_exchanges_end_at_shutdown() -> None:
    c = Conversation()
    hs = c.handshake()
    req = c.request(get("/never"))
    framer = Tracker()
    framer.feed_many(hs + req)
    [framed] = framer.close()
    tracker = Tracker()
    [paired] = tracker.close([kernel_exchange(req, [], Phase.WAIT)])
    assert framed.outcome is paired.outcome is Outcome.SHUTDOWN
    assert paired == framed
    assert tracker.stats.exchanges == 1


def test_a_head_that_does_not_parse_is_a_parse_error() -> None:
    c = Conversation()
    c.handshake()
    req, resp = c.request(get("/x")), c.response(ok())
    ex = kernel_exchange(req, resp)._replace(response_head=b"HTTP/9 x\r\n\r\n")
    t = Tracker()
    assert t.feed_many([ex]) == []
    assert t.stats.parse_errors == 1 and t.stats.exchanges == 1


# --- handovers -----------------------------------------------------------------


def handover(c: Conversation, first: Segment, resp_seq: int | None, reason: int = 2) -> Handover:
    return Handover(
        ts_ns=first.ts_ns,
        ifindex=first.ifindex,
        role=first.role,
        family=first.family,
        client_addr=first.saddr,
        client_port=first.sport,
        server_addr=first.daddr,
        server_port=first.dport,
        reason=reason,
        req_seq=first.seq,
        resp_seq=resp_seq,
    )


def chunked_ok() -> bytes:
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


def test_after_a_handover_the_connection_is_framed_from_its_boundaries() -> None:
    c = Conversation()
    hs = c.handshake()
    first = c.request(get("/1")), c.response(ok(b"one"))
    resp_at = c.seq[RESP]
    second = c.request(get("/2")), c.response(chunked_ok(), [60, 5])
    third = c.request(get("/3")), c.response(ok(b"three"))
    framed = Tracker().feed_many(hs + [s for pair in (first, second, third) for x in pair
                                       for s in x])
    # the kernel: the first exchange paired; the second's response is chunked
    t = Tracker()
    got = t.feed_many([kernel_exchange(*first)])
    got += t.feed_many([handover(c, second[0][0], resp_at), *second[0], *second[1],
                        *third[0], *third[1]])
    assert len(framed) == 3
    assert got == framed
    assert t.stats.handovers == 1


def test_a_handover_ends_a_stale_connection_of_the_same_key() -> None:
    c = Conversation()
    t = Tracker()
    t.feed_many(c.handshake() + c.request(get("/stale")))  # a leftover, never answered
    req = c.request(get("/live"))
    resp_at = c.seq[RESP]
    resp = c.response(chunked_ok())
    out = t.feed_many([handover(c, req[0], resp_at), *req, *resp])
    assert [(s.request.target if s.request else None, s.outcome) for s in out] == [
        ("/stale", Outcome.CLOSED),
        ("/live", Outcome.COMPLETE),
    ]


def test_a_handover_with_an_unknown_response_boundary_seeks_a_response_start() -> None:
    c = Conversation()
    c.handshake()
    req = c.request(get("/mid"))
    resp = c.response(chunked_ok())
    out = Tracker().feed_many([handover(c, req[0], None), *req, *resp])
    assert [(s.response.status_code if s.response else 0) for s in out] == [200]


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=0, max_value=2**32 - 1))
def test_boundaries_anywhere_in_sequence_space(client_isn: int, server_isn: int) -> None:
    c = Conversation(client_isn=client_isn, server_isn=server_isn)
    c.handshake()
    req = c.request(get("/w"))
    resp_at = c.seq[RESP]
    resp = c.response(chunked_ok(), [30, 30])
    [s] = Tracker().feed_many([handover(c, req[0], resp_at), *req, *resp])
    assert s.outcome is Outcome.COMPLETE and s.response is not None
    assert s.server_addr == ".".join(str(b) for b in SERVER)


# --- any head the kernel frames ---------------------------------------------------------

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                 min_size=1, max_size=12)
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
_RECORDED = st.sampled_from(["Host", "user-agent", "X-Request-Id", "traceparent",
                             "Content-Type", "b3", "Cookie", "Authorization"])


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[bytes, bytes]:
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    target = "/" + draw(st.text(alphabet="abcxyz0189/?=&%._~-", max_size=40))
    version = draw(st.sampled_from(["1.0", "1.1"]))
    fields = draw(st.lists(st.tuples(st.one_of(_RECORDED, _TOKEN), _VALUE), max_size=6))
    body = draw(st.binary(max_size=300)) if method in ("POST", "PUT", "PATCH") else b""
    head = f"{method} {target} HTTP/{version}\r\n" + "".join(
        f"{n}:{draw(st.sampled_from(['', ' ', '  ']))}{v}\r\n" for n, v in fields
        if n.lower() not in ("content-length", "transfer-encoding"))
    if body or draw(st.booleans()):
        head += f"content-LENGTH: {len(body)}\r\n"
    request = (head + "\r\n").encode() + body
    status = draw(st.integers(min_value=200, max_value=599))
    rbody = b"" if method == "HEAD" or status in (204, 304) else draw(st.binary(max_size=300))
    reason = draw(st.sampled_from(["", " OK", " Whatever It Says"]))
    rfields = draw(st.lists(st.tuples(st.one_of(_RECORDED, _TOKEN), _VALUE), max_size=5))
    rhead = f"HTTP/{version} {status}{reason}\r\n" + "".join(
        f"{n}: {v}\r\n" for n, v in rfields
        if n.lower() not in ("content-length", "transfer-encoding"))
    rhead += f"Content-Length: {len(rbody) if rbody or method != 'HEAD' else 5}\r\n\r\n"
    return request, rhead.encode() + rbody


@given(exchanges(), st.integers(min_value=1, max_value=4))
def test_any_framed_exchange_is_the_framed_session(exchange: tuple[bytes, bytes],
                                                   pieces: int) -> None:
    request, response = exchange
    c = Conversation()
    hs = c.handshake()
    req_head = len(head_of_bytes(request))
    resp_head = len(head_of_bytes(response))
    req = c.request(request, [req_head] + [max(1, (len(request) - req_head) // pieces)] * pieces)
    resp = c.response(response,
                      [resp_head] + [max(1, (len(response) - resp_head) // pieces)] * pieces)
    framed, paired = both_ways(hs, req, resp)
    assert len(framed) == 1
    assert paired == framed
