"""HTTP/1.x ports that switch: the HTTP/2 preface, Upgrade: h2c, a TLS ClientHello."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest

from clovisor.core.events import Outcome, Protocol
from clovisor.core.tracker import Tracker

from .h2wire import REQ, RESP, H2Pair, frames, get
from .test_http2 import MODES, attrs, cutter, run
from .test_tls import client_hello
from .wire import Conversation


def http_conv(capture: int = 4096) -> Conversation:
    return Conversation(capture=capture, protocol=Protocol.HTTP, sport=8080)


@pytest.mark.parametrize("mode", MODES)
def test_prior_knowledge_on_an_http_port(mode: str) -> None:
    p = H2Pair()
    for i in range(3):
        p.respond(p.request(get(f"/h2/{i}", tag=f"t{i}")), body=b"x" * (10 * i + 1),
                  headers=[("x-request-id", f"t{i}")])  # fmt: skip
    c = http_conv()
    out, t = run(c.handshake() + p.segments(c, cutter(mode)) + c.close())
    assert [(s.request.target, s.request.version) for s in out if s.request] == [
        ("/h2/0", "2"), ("/h2/1", "2"), ("/h2/2", "2")]
    assert [s.response.body_size for s in out if s.response] == [1, 11, 21]
    assert all(s.protocol == Protocol.HTTP and s.outcome is Outcome.COMPLETE for s in out)
    assert t.stats.parse_errors == 0


def test_a_server_that_speaks_first_is_picked_up() -> None:
    """An h2c server may send its SETTINGS before the client's preface reaches it."""
    p = H2Pair(preface=False)
    p.server.initiate_connection()
    settings = p.server.data_to_send()
    p.writes.append((RESP, settings))  # on the wire first
    p.client.initiate_connection()
    p.client.receive_data(settings)
    p.flush()
    for i in range(2):
        p.respond(p.request(get(f"/{i}")), body=b"y")
    c = http_conv()
    out, t = run(c.handshake() + p.segments(c, lambda d, b: frames(b)) + c.close())
    assert [s.request.target for s in out if s.request] == ["/0", "/1"]
    assert all(s.response is not None and s.response.status_code == 200 for s in out)
    assert t.stats.parse_errors == 1  # the SETTINGS, before the switch, as HTTP/1.x


def upgrade_pair() -> tuple[H2Pair, bytes, bytes]:
    """An h2c upgrade: the HTTP/1.1 request and 101, and the two h2 connections after them."""
    p = H2Pair(preface=False)
    p.client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="latin-1"))
    p.server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="latin-1"))
    settings = p.client.initiate_upgrade_connection()
    request = (b"GET /upgrade-me HTTP/1.1\r\nHost: web:8080\r\nUser-Agent: curl/8\r\n"
               b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: " + settings + b"\r\n\r\n")  # fmt: skip
    p.server.initiate_upgrade_connection(settings)
    switching = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    return p, request, switching


@pytest.mark.parametrize("mode", MODES)
def test_upgrade_to_h2c(mode: str) -> None:
    p, request, switching = upgrade_pair()
    p.writes.append((REQ, request))
    server_preface = p.server.data_to_send()
    p.writes.append((RESP, switching + server_preface))
    p.client.receive_data(server_preface)
    p.flush()
    p.server.send_headers(1, [(":status", "200"), ("x-request-id", "first")])
    p.server.send_data(1, b"upgraded body", end_stream=True)
    p.flush()
    p.respond(p.request(get("/second")), body=b"2")
    c = http_conv()
    out, t = run(c.handshake() + p.segments(c, cutter(mode)) + c.close())
    assert [(s.request.method, s.request.target, s.request.version) for s in out if s.request] == [
        ("GET", "/upgrade-me", "1.1"), ("GET", "/second", "2")]
    first = out[0]
    assert first.response is not None and first.response.status_code == 200
    assert first.response.version == "2" and first.response.body_size == 13
    assert dict(first.request.headers if first.request else ())["host"] == "web:8080"
    assert attrs(first)["clovisor.http2.stream_id"] == 1
    assert all(s.outcome is Outcome.COMPLETE for s in out) and t.stats.parse_errors == 0


def test_a_websocket_upgrade_still_tunnels() -> None:
    c = http_conv()
    req = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    segs = c.handshake() + c.request(req) + c.response(resp)
    segs += c.request(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") + c.response(b"\x81\x05hello")
    out, t = run(segs + c.close())
    assert len(out) == 1 and out[0].response is not None
    assert out[0].response.status_code == 101 and t.stats.parse_errors == 0


@pytest.mark.parametrize("port", ["http", "h2"])
def test_tls_on_a_traced_port(port: str) -> None:
    proto = Protocol.HTTP if port == "http" else 200
    c = Conversation(capture=4096, protocol=proto, sport=8443)  # type: ignore[arg-type]
    hello = client_hello(alpn=["h2", "http/1.1"])
    segs = c.handshake() + c.request(hello, [5, 100, len(hello)])
    segs += c.response(b"\x16\x03\x03\x00\x7a" + b"s" * 2000)
    segs += c.request(b"\x17\x03\x03" + b"e" * 99)
    out, t = run(segs + c.close())
    (s,) = out
    a = dict(s.attributes)
    assert s.protocol_name == "tls" and a["tls.client.server_name"] == "api.example.svc"
    assert a["clovisor.tls.alpn"] == "h2,http/1.1"
    assert (s.request_bytes, s.response_bytes) == (len(hello) + 102, 2005)
    assert t.stats.parse_errors == 0 and t.stats.encrypted == 1
    assert t.stats.untraced == {("encrypted", c.sport): 1}


def test_http1_keeps_its_fast_path() -> None:
    """Nothing switches an ordinary HTTP/1.1 connection."""
    c = http_conv()
    segs = c.handshake() + c.request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    segs += c.response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") + c.close()
    t = Tracker()
    out = t.feed_many(segs) + t.close()
    assert len(out) == 1 and out[0].request is not None and out[0].request.version == "1.1"


def test_signatures_that_were_garbage_before() -> None:
    """A malformed ClientHello is still TLS; a preface with a TLS alert back is HTTP/2."""
    c = http_conv()
    blob = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 10
    segs = c.handshake() + c.request(blob) + c.response(b"\x15\x03\x01\x00\x02\x02\x28")
    out, t = run(segs + c.close())
    assert [s.protocol_name for s in out] == ["tls"] and "tls.client.server_name" not in dict(
        out[0].attributes)
    assert t.stats.parse_errors == 0 and t._conn_stats.encrypted == 1
    c = http_conv()
    segs = c.handshake() + c.request(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    segs += c.response(b"\x15\x03\x01\x00\x02\x02\x28" * 2)  # not a frame a server sends
    out, t = run(segs + c.close())
    assert out == [] and t.stats.parse_errors == 1
