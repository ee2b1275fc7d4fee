"""TLS ClientHellos from Python's own ssl module: SNI and ALPN, one session per connection."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clovisor.core.budget import Budget
from clovisor.core.events import Outcome, Segment, Session
from clovisor.core.reassembly import Chunk
from clovisor.core.tls import (
    MAX_HELLO_BYTES,
    HelloReader,
    HelloState,
    looks_like_tls,
    parse_client_hello,
    tls_connection,
)
from clovisor.core.tracker import Tracker

from .wire import Conversation, bytewise

TLS = 201


def client_hello(sni: str | None = "api.example.svc", alpn: list[str] | None = None) -> bytes:
    """The first flight of a real TLS client (OpenSSL through the ssl module)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def chunks(data: bytes, sizes: list[int] | None) -> list[Chunk]:
    out, pos = [], 0
    for n in sizes or [len(data)]:
        out.append(Chunk(pos, n, data[pos : pos + n], b"", 1000 + pos, 1))
        pos += n
    return out


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_sni_and_alpn_from_a_real_client_hello(mode: str) -> None:
    hello = client_hello(alpn=["h2", "http/1.1"])
    assert looks_like_tls(hello) and looks_like_tls(hello[:1])
    r = HelloReader()
    for c in chunks(hello, bytewise(hello) if mode == "bytewise" else None):
        r.feed(c)
    assert r.state is HelloState.DONE and r.hello is not None
    assert r.hello.server_name == "api.example.svc" and r.hello.alpn == ("h2", "http/1.1")


def test_no_sni_no_alpn() -> None:
    r = HelloReader()
    r.feed(chunks(client_hello(sni=None), None)[0])
    assert r.hello is not None and r.hello.server_name is None and r.hello.alpn == ()


def test_a_hello_split_over_records() -> None:
    hello = client_hello(alpn=["grpc-exp", "h2"])
    body = hello[5:]
    records = b"".join(b"\x16\x03\x01" + len(p).to_bytes(2, "big") + p
                       for p in (body[:40], body[40:41], body[41:]))  # fmt: skip
    r = HelloReader()
    for c in chunks(records, [3, 100, len(records) - 103]):
        r.feed(c)
    assert r.hello is not None and r.hello.alpn == ("grpc-exp", "h2")


@pytest.mark.parametrize("blob", [b"GET / HTTP/1.1\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                                  b"\x16\x03\x09", b"\x16\x03\x01\x00\x00", b""])
def test_what_is_not_tls(blob: bytes) -> None:
    assert not looks_like_tls(blob)


def run(segs: list[Segment]) -> tuple[list[Session], Tracker]:
    t = Tracker(parsers=lambda pid: tls_connection if pid == TLS else None)
    out = t.feed_many(segs) + t.close()
    return out, t


@pytest.mark.parametrize("capture", [4096, 64])
def test_a_tls_connection_is_one_session(capture: int) -> None:
    c = Conversation(capture=capture, protocol=TLS, sport=443)  # type: ignore[arg-type]
    hello = client_hello(alpn=["h2"])
    segs = c.handshake() + c.request(hello) + c.response(b"\x16\x03\x03" + b"s" * 3000)
    segs += c.request(b"\x17\x03\x03" + b"e" * 500) + c.close()
    out, t = run(segs)
    (s,) = out
    a = dict(s.attributes)
    assert s.protocol_name == "tls" and s.outcome is Outcome.COMPLETE
    assert (s.request_bytes, s.response_bytes) == (len(hello) + 503, 3003)
    assert t.stats.parse_errors == 0 and t._conn_stats.encrypted == 1
    if capture > len(hello):
        assert a["tls.client.server_name"] == "api.example.svc" and a["clovisor.tls.alpn"] == "h2"
    else:
        assert "tls.client.server_name" not in a  # not captured: not guessed
    assert t.stats.buffered_bytes == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 100), max_size=10))
def test_arbitrary_bytes_never_raise(blob: bytes, sizes: list[int]) -> None:
    parse_client_hello(blob)
    r = HelloReader()
    data = b"\x16\x03\x01" + len(blob).to_bytes(2, "big") + blob
    pos = 0
    for n in [*sizes, len(data)]:
        if pos >= len(data):
            break
        r.feed(Chunk(pos, min(n, len(data) - pos), data[pos : pos + n], b"", 1, 1))
        pos += n
    r.release()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_hellos_never_raise(data: st.DataObject) -> None:
    hello = bytearray(client_hello(alpn=["h2", "http/1.1"]))
    for _ in range(data.draw(st.integers(1, 8))):
        hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    budget = Budget(1 << 20)
    r = HelloReader(budget)
    r.feed(Chunk(0, len(hello), bytes(hello), b"", 1, 1))
    assert budget.used <= MAX_HELLO_BYTES + 64
    r.release()
    assert budget.used == 0
