"""``--output json``: one flat JSON object per session per line, parsed back."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from clovisor.core.events import Outcome, Protocol, Role
from clovisor.export import Exporter, ExporterConfigError
from clovisor.export.jsonlines import FIELDS, JsonLinesExporter, session_record

from .sessions import request, response, session, span

# sessions.OFFSET + 1 s, with the microseconds
TIME = "2026-11-18T11:06:41.000000Z"


def _lines(spans: list) -> list[dict]:  # type: ignore[type-arg]
    out = io.StringIO()
    exporter = JsonLinesExporter(out)
    assert isinstance(exporter, Exporter)
    exporter.export(spans)
    exporter.shutdown()
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_a_get_is_one_flat_object_with_every_field() -> None:
    sp = span()
    (record,) = _lines([sp])
    assert list(record) == list(FIELDS)
    assert record == {
        "time": TIME,
        "kind": "server",
        "service": "web",
        "namespace": "default",
        "pod": "web-0",
        "protocol": "http",
        "method": "GET",
        "url": "/index.html?x=1",
        "status": 200,
        "duration_ms": 12.3,
        "client_address": "10.200.1.2",
        "client_port": 51234,
        "server_address": "10.200.0.2",
        "server_port": 80,
        "request_bytes": 78,
        "response_bytes": 1600,
        "outcome": "complete",
        "trace_id": f"{sp.trace_id:032x}",
    }
    assert not any(isinstance(v, dict | list) for v in record.values())  # flat


def test_reset_without_response_tcp_and_client_sessions() -> None:
    reset, tcp, client = _lines([
        span(session(outcome=Outcome.RESET, response=None, response_packets=0,
                     response_bytes=0)),
        span(session(protocol=Protocol.TCP, request=None, response=None, start_ns=0,
                     end_ns=850_000)),
        span(session(role=Role.CLIENT, family=6, client_addr="fd00:200::2",
                     server_addr="fd00:200::1", request=request("PROPFIND", "/dav"),
                     response=response(599, "Odd"))),
    ])
    assert reset["status"] is None and reset["outcome"] == "reset"
    assert reset["method"] == "GET" and reset["response_bytes"] == 0
    assert tcp["protocol"] == "tcp" and tcp["method"] is None and tcp["url"] is None
    assert tcp["duration_ms"] == 0.85
    assert client["kind"] == "client" and client["method"] == "PROPFIND"
    assert client["url"] == "http://10.200.0.2/dav"  # the full URL on client spans
    assert client["client_address"] == "fd00:200::2" and client["status"] == 599


def test_wire_text_cannot_break_a_line() -> None:
    hostile = "/a\nb\r\x1b[31m\u2028\"}"
    (record,) = _lines([span(session(request=request("GET", hostile)))])
    assert record["url"].startswith("/a")  # parsed back whole
    assert "\n" not in json.dumps(record)


def test_session_record_matches_the_line() -> None:
    sp = span()
    assert _lines([sp]) == [session_record(sp)]


def test_file_output_appends_lines(tmp_path: Path) -> None:
    path = tmp_path / "sessions.jsonl"
    for _ in range(2):
        exporter = JsonLinesExporter(str(path))
        exporter.export([span(), span()])
        exporter.shutdown()
        exporter.export([span()])  # after shutdown: ignored
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 4 and {r["method"] for r in records} == {"GET"}


def test_unwritable_path_fails_at_construction() -> None:
    with pytest.raises(ExporterConfigError, match="/proc/nope/x"):
        JsonLinesExporter("/proc/nope/x")
