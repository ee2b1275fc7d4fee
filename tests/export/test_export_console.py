from __future__ import annotations

import io

from clovisor.core.events import Outcome, Protocol, Role
from clovisor.export import Exporter
from clovisor.export.console import ConsoleExporter, format_span

from .sessions import request, response, session, span

# sessions.OFFSET + 1 s
STAMP = "2026-11-18T11:06:41.000Z"


def test_line_for_a_get() -> None:
    sp = span()
    assert format_span(sp) == (
        f"{STAMP} SERVER GET /index.html?x=1 HTTP/1.1 -> 200 OK "
        "10.200.1.2:51234 -> 10.200.0.2:80 12.3ms req 1p/78B resp 2p/1.6kB "
        f"trace={sp.trace_id:032x}"
    )


def test_line_for_a_reset_without_response() -> None:
    line = format_span(
        span(session(outcome=Outcome.RESET, response=None, response_packets=0, response_bytes=0))
    )
    assert " GET /index.html?x=1 HTTP/1.1 -> (no response) " in line
    assert "resp 0p/0B [reset: connection reset before response] trace=" in line


def test_line_for_ipv6_client_and_other_method() -> None:
    s = session(
        role=Role.CLIENT,
        family=6,
        client_addr="fd00:200::2",
        server_addr="fd00:200::1",
        request=request("PROPFIND", "/dav"),
        response=response(599, "Odd", body_size=2_500_000),
        start_ns=0,
        end_ns=1_500_000_000,
        response_bytes=2_500_000,
    )
    line = format_span(span(s))
    assert (
        " CLIENT PROPFIND /dav HTTP/1.1 -> 599 [fd00:200::2]:51234 -> [fd00:200::1]:80 1.50s "
        in line
    )
    assert "resp 2p/2.5MB trace=" in line


def test_line_for_tcp_and_short_durations() -> None:
    s = session(protocol=Protocol.TCP, request=None, response=None, start_ns=0, end_ns=850_000)
    line = format_span(span(s))
    assert " SERVER TCP 10.200.1.2:51234 -> 10.200.0.2:80 850us req 1p/78B " in line


def test_wire_text_cannot_break_the_line() -> None:
    s = session(request=request("GET", "/a\r\nFAKE 200\x1b[2J"))
    line = format_span(span(s))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "/a\\x0d\\x0aFAKE 200\\x1b[2J" in line


class CountingStream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_exporter_writes_one_line_per_span_and_flushes_per_batch() -> None:
    stream = CountingStream()
    exporter = ConsoleExporter(stream, batch_interval=60)
    assert isinstance(exporter, Exporter)
    exporter.export([span(), span()])
    exporter.export([])
    exporter.export([span()])
    assert exporter.flush(5)
    assert stream.flushes == 1  # both calls' spans went out as one batch
    assert len(stream.getvalue().splitlines()) == 3
    exporter.shutdown()
    exporter.export([span()])  # ignored after shutdown, and counted
    assert len(stream.getvalue().splitlines()) == 3
    assert exporter.stats()["spans_exported"] == 3
    assert exporter.stats()["spans_dropped"] == 1


def test_a_closed_stream_fails_the_batch_and_the_exporter_goes_on() -> None:
    stream = io.StringIO()
    exporter = ConsoleExporter(stream)
    stream.close()
    exporter.export([span()])  # never raises: the sender thread writes
    assert exporter.flush(5)
    assert exporter.stats()["spans_failed"] == 1
    exporter.shutdown()
