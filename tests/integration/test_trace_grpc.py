"""End to end: a real gRPC server and client (grpcio) on a port declared ``grpc``.

The servicer (``clovisor.demo_grpc``) writes its own record of every call it
finished; that journal is the oracle. Every call it records must have
exactly one span, with the right method, status and peer port, and no span
may be left over. Clients run in the client pod's namespace.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clovisor import demo_grpc
from clovisor.topology import Topology, in_netns
from tests.conftest import wait_until

from .conftest import (
    SPAN_KIND_SERVER,
    STATUS_ERROR,
    STATUS_UNSET,
    Span,
    TracerRun,
    _need_kernel,
    assert_recent,
    start_tracer,
)

GRPC_PORT = 50051


@dataclass
class GrpcNet:
    topo: Topology
    tmp: Path
    journal: Path

    @property
    def server(self) -> Any:
        return self.topo.pods["grpc"]

    @property
    def client(self) -> Any:
        return self.topo.pods["client"]

    @property
    def target(self) -> str:
        return f"{self.server.ipv4}:{GRPC_PORT}"

    def calls(self) -> list[dict[str, Any]]:
        """The servicer's journal: one record per call it finished."""
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines() if line]

    def client_run(self, scenario: str, count: int = 10,
                   timeout: float = 60) -> list[dict[str, Any]]:  # fmt: skip
        proc = self.topo.run(self.client.netns, [
            sys.executable, "-m", "clovisor.demo_grpc", "client", "--target", self.target,
            "--count", str(count), scenario,
        ], timeout=timeout)  # fmt: skip
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def gnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcNet]:
    _need_kernel()
    tmp = tmp_path_factory.mktemp("grpc")
    with Topology(prefix="clvg", pods=("grpc", "client")) as topo:
        n = GrpcNet(topo, tmp, tmp / "calls.jsonl")
        topo.spawn(n.server.netns, [sys.executable, "-m", "clovisor.demo_grpc", "server",
                                    "--port", str(GRPC_PORT), "--log", str(n.journal)],
                   stdout=subprocess.DEVNULL, stderr=open(tmp / "server.err", "wb"))  # noqa: SIM115
        topo.wait_for_port(n.client.netns, n.server.ipv4, GRPC_PORT, timeout=20)
        yield n


@pytest.fixture
def traced(gnet: GrpcNet, tmp_path: Path) -> Iterator[list[TracerRun]]:
    runs: list[TracerRun] = []
    yield runs
    for run in runs:
        run.kill()


def trace(gnet: GrpcNet, runs: list[TracerRun], tmp: Path, *extra: str,
          spec: str = f"{GRPC_PORT}:grpc") -> TracerRun:  # fmt: skip
    run = start_tracer(gnet.topo, tmp, gnet.server.host_ifname, "--port", spec, *extra,
                       port=None, name=f"spans-{len(runs)}.jsonl")  # fmt: skip
    runs.append(run)
    return run


def peer_port(call: dict[str, Any]) -> int:
    return int(call["peer"].rsplit(":", 1)[1])  # ipv4:10.200.0.11:40312


def journal_since(gnet: GrpcNet, before: int) -> list[dict[str, Any]]:
    return gnet.calls()[before:]


def stop_and_spans(run: TracerRun, n: int) -> list[Span]:
    run.wait_for_spans(n, timeout=20)
    assert run.stop() == 0, run.stderr
    return run.spans()


def assert_one_span_per_call(spans: list[Span], calls: list[dict[str, Any]]) -> dict[int, Span]:
    """Exactly one span per recorded call, matched by method and peer port; none left over."""
    assert len(spans) == len(calls), (spans, calls)
    want = Counter((c["method"].lstrip("/"), peer_port(c)) for c in calls)
    got = Counter((s.name, s["client.port"]) for s in spans)
    assert got == want
    return {i: s for i, s in enumerate(spans)}


def test_unary_calls(gnet: GrpcNet, traced: list[TracerRun], tmp_path: Path) -> None:
    before = len(gnet.calls())
    run = trace(gnet, traced, tmp_path)
    replies = gnet.client_run("unary", 20)
    assert [r["code"] for r in replies] == ["OK"] * 20
    calls = journal_since(gnet, before)
    spans = stop_and_spans(run, len(calls))
    assert_one_span_per_call(spans, calls)
    for s in spans:
        assert s.name == "demo.Echo/Unary" and s.kind == SPAN_KIND_SERVER
        assert (s["rpc.system"], s["rpc.service"], s["rpc.method"]) == ("grpc", "demo.Echo",
                                                                        "Unary")
        assert s["rpc.grpc.status_code"] == 0 and s["rpc.response.status_code"] == "OK"
        assert s["network.protocol.version"] == "2" and s["http.response.status_code"] == 200
        assert s["clovisor.outcome"] == "complete" and s.status_code == STATUS_UNSET
        assert s["server.port"] == GRPC_PORT and s["client.address"] == gnet.client.ipv4
        # One gRPC message each way: a 5-byte prefix and "hello N".
        n = len(b"hello %d" % 0)
        assert s["http.request.body.size"] in range(5 + n, 5 + n + 2)
        assert s["http.response.body.size"] == s["http.request.body.size"]
        assert "clovisor.http2.headers_incomplete" not in s.attrs
        assert_recent(s, run.t0)
    assert len({s["clovisor.http2.stream_id"] for s in spans}) == 20
    assert run.totals["parse_errors"] == 0


def test_streaming_calls(gnet: GrpcNet, traced: list[TracerRun], tmp_path: Path) -> None:
    before = len(gnet.calls())
    run = trace(gnet, traced, tmp_path)
    replies = gnet.client_run("streams", 7)
    assert [r["method"] for r in replies] == [demo_grpc.SERVER_STREAM, demo_grpc.CLIENT_STREAM,
                                              demo_grpc.BIDI]
    calls = journal_since(gnet, before)
    spans = stop_and_spans(run, len(calls))
    assert_one_span_per_call(spans, calls)
    by_name = {s.name: s for s in spans}
    # Seven messages, each with its 5-byte prefix, on the streaming side of each call.
    items = sum(5 + len(b"item-%d" % i) for i in range(7))
    parts = sum(5 + len(b"part-%d" % i) for i in range(7))
    pings = sum(5 + len(b"ping-%d" % i) for i in range(7))
    assert by_name["demo.Echo/ServerStream"]["http.response.body.size"] == items
    assert by_name["demo.Echo/ClientStream"]["http.request.body.size"] == parts
    assert by_name["demo.Echo/Bidi"]["http.request.body.size"] == pings
    assert by_name["demo.Echo/Bidi"]["http.response.body.size"] == pings + 7 * 3
    for s in spans:
        assert s["rpc.grpc.status_code"] == 0 and s["clovisor.outcome"] == "complete"


def test_errors_and_deadlines(gnet: GrpcNet, traced: list[TracerRun], tmp_path: Path) -> None:
    before = len(gnet.calls())
    run = trace(gnet, traced, tmp_path)
    replies = gnet.client_run("errors")
    assert [r["code"] for r in replies] == ["INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL",
                                            "UNAVAILABLE", "PERMISSION_DENIED",
                                            "DEADLINE_EXCEEDED"]
    # The servicer records the deadline call once it notices the cancellation.
    wait_until(lambda: len(journal_since(gnet, before)) == 6, timeout=10)
    calls = journal_since(gnet, before)
    spans = stop_and_spans(run, 6)
    assert_one_span_per_call(spans, calls)
    by_port_order = sorted(spans, key=lambda s: s.start_ns)
    want = [(3, "INVALID_ARGUMENT", False), (5, "NOT_FOUND", False), (13, "INTERNAL", True),
            (14, "UNAVAILABLE", True), (7, "PERMISSION_DENIED", False)]  # fmt: skip
    for s, (code, name, error) in zip(by_port_order, want, strict=False):
        assert s["rpc.grpc.status_code"] == code and s["rpc.response.status_code"] == name
        assert (s.status_code == STATUS_ERROR) is error, s
        if error:
            assert s["error.type"] == name and s.status_message == f"it went {name.lower()}"
        assert s["clovisor.grpc.message"] == f"it went {name.lower()}"
    deadline = by_port_order[5]
    # The client gives up (RST_STREAM) or the server answers DEADLINE_EXCEEDED
    # first: either way one failed span, never an OK.
    assert deadline.status_code == STATUS_ERROR
    assert (deadline.get("rpc.grpc.status_code") == 4
            or deadline["clovisor.outcome"] == "reset"), deadline  # fmt: skip
    assert 0.25e9 <= deadline.end_ns - deadline.start_ns <= 5e9


def test_a_one_mebibyte_message(gnet: GrpcNet, traced: list[TracerRun], tmp_path: Path) -> None:
    before = len(gnet.calls())
    run = trace(gnet, traced, tmp_path)
    assert [r["code"] for r in gnet.client_run("big")] == ["OK"]
    calls = journal_since(gnet, before)
    spans = stop_and_spans(run, 1)
    assert_one_span_per_call(spans, calls)
    (s,) = spans
    assert s["clovisor.outcome"] == "complete" and s["rpc.grpc.status_code"] == 0
    # Bodies far beyond the capture are counted from the frame headers.
    assert s["http.request.body.size"] == 5 + demo_grpc.BIG
    assert s["http.response.body.size"] == 5 + demo_grpc.BIG
    assert s["clovisor.request.bytes"] > demo_grpc.BIG
    assert run.totals["parse_errors"] == 0


def test_a_hundred_concurrent_calls_on_one_channel(
    gnet: GrpcNet, traced: list[TracerRun], tmp_path: Path
) -> None:
    before = len(gnet.calls())
    run = trace(gnet, traced, tmp_path)
    replies = gnet.client_run("concurrent", 100)
    assert [r["code"] for r in replies] == ["OK"] * 100
    calls = journal_since(gnet, before)
    assert len({peer_port(c) for c in calls}) == 1  # one channel, one connection
    spans = stop_and_spans(run, 100)
    assert_one_span_per_call(spans, calls)
    assert len({s["clovisor.http2.stream_id"] for s in spans}) == 100
    # They overlapped: the servicer sleeps 200 ms per call.
    first_end = min(s.end_ns for s in spans)
    assert sum(s.start_ns < first_end for s in spans) > 10
    for s in spans:
        assert s["rpc.grpc.status_code"] == 0 and s.end_ns - s.start_ns >= 0.2e9


def test_a_channel_opened_before_the_tracer(
    gnet: GrpcNet, traced: list[TracerRun], tmp_path: Path
) -> None:
    client = gnet.topo.spawn(gnet.client.netns, [
        sys.executable, "-m", "clovisor.demo_grpc", "client", "--target", gnet.target,
        "--count", "5", "before"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    assert json.loads(client.stdout.readline()) == {"ready": True}
    before = len(gnet.calls())
    run = trace(gnet, traced, tmp_path)
    client.stdin.write("go\n")
    client.stdin.flush()
    out, _ = client.communicate(timeout=60)
    assert [json.loads(line)["code"] for line in out.splitlines()] == ["OK"] * 10
    calls = journal_since(gnet, before)
    spans = stop_and_spans(run, 10)
    assert len(spans) == len(calls) == 10
    assert {s["client.port"] for s in spans} == {peer_port(c) for c in calls}
    for s in spans:
        # Every call is traced, and the port says it is gRPC.
        assert s["rpc.system"] == "grpc" and s["clovisor.outcome"] == "complete"
    named = Counter(s.name for s in spans)
    # demo.Echo/Other was first called after the tracer started: its :path is
    # a literal we saw, then a table entry we know.
    assert named["demo.Echo/Other"] == 5
    for s in spans:
        if s.get("clovisor.http2.headers_incomplete"):
            # A field indexed before the tracer started is never guessed: the
            # :path of demo.Echo/Unary, the trailers' grpc-status: 0.
            assert s.name in ("grpc", "demo.Echo/Other", "demo.Echo/Unary")
            assert s.get("rpc.grpc.status_code") in (None, 0)
        else:
            assert s.get("rpc.grpc.status_code") == 0
        if s.name == "grpc":
            assert s["clovisor.http2.headers_incomplete"] is True
            assert "rpc.method" not in s.attrs


def test_tls_client_on_the_grpc_port(
    gnet: GrpcNet, traced: list[TracerRun], tmp_path: Path
) -> None:
    run = trace(gnet, traced, tmp_path)
    name = "api.demo.svc"
    gnet.topo.run(gnet.client.netns, [
        "curl", "-sS", "-k", "--max-time", "5", "--http2", "--resolve",
        f"{name}:{GRPC_PORT}:{gnet.server.ipv4}", f"https://{name}:{GRPC_PORT}/"], check=False)
    spans = stop_and_spans(run, 1)
    assert len(spans) == 1, spans
    (s,) = spans
    assert s.name == "tls" and s["tls.client.server_name"] == name
    assert s["clovisor.tls.alpn"] == "h2,http/1.1"
    assert s["network.protocol.name"] == "tls"
    assert run.totals["parse_errors"] == 0
    assert "encrypted 1" in run.stderr


def test_garbage_on_the_grpc_port(gnet: GrpcNet, traced: list[TracerRun], tmp_path: Path) -> None:
    run = trace(gnet, traced, tmp_path, "--log-level", "debug")
    garbage = b"\x00\x01hello, this is not HTTP/2\r\n"
    with in_netns(gnet.client.netns):
        sock = socket.create_connection((gnet.server.ipv4, GRPC_PORT), timeout=5)
    with sock:
        sock.sendall(garbage)
        sock.settimeout(5)
        try:  # the server closes (or resets) a connection without the preface
            while sock.recv(4096):
                pass
        except OSError:
            pass
    # A real client after it is traced as usual.
    before = len(gnet.calls())
    assert [r["code"] for r in gnet.client_run("unary", 2)] == ["OK", "OK"]
    spans = stop_and_spans(run, 2)
    assert_one_span_per_call(spans, journal_since(gnet, before))
    assert run.totals["parse_errors"] == 0
    assert "unrecognized 1" in run.stderr
    assert f"port {GRPC_PORT}: a connection whose first bytes" in run.stderr
    assert repr(garbage[:32]) in run.stderr


def test_grpc_on_an_http_port_and_client_spans_by_egress(
    gnet: GrpcNet, traced: list[TracerRun], tmp_path: Path
) -> None:
    """An http port follows the preface; an egress rule on the client's veth gives
    CLIENT spans of the same calls."""
    before = len(gnet.calls())
    server = trace(gnet, traced, tmp_path, spec=f"{GRPC_PORT}")
    client = start_tracer(gnet.topo, tmp_path, gnet.client.host_ifname,
                          "--egress", f"{gnet.server.ipv4}:{GRPC_PORT}:grpc", port=None,
                          name="client-spans.jsonl")  # fmt: skip
    traced.append(client)
    assert [r["code"] for r in gnet.client_run("errors")][:3] == [
        "INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL"]
    wait_until(lambda: len(journal_since(gnet, before)) == 6, timeout=10)
    calls = journal_since(gnet, before)
    for run, kind in ((server, SPAN_KIND_SERVER), (client, 3)):
        spans = stop_and_spans(run, 6)
        assert_one_span_per_call(spans, calls)
        assert {s.kind for s in spans} == {kind}
        codes = {s.get("rpc.grpc.status_code") for s in spans}
        assert {3, 5, 13, 14, 7} <= codes
        for s in spans:
            code = s.get("rpc.grpc.status_code")
            if code in (3, 5, 7):
                # Semconv: a client fails on any code but OK, a server only on some.
                assert (s.status_code == STATUS_ERROR) is (kind != SPAN_KIND_SERVER)


def test_the_callers_trace_context_in_metadata_is_joined(
    gnet: GrpcNet, traced: list[TracerRun], tmp_path: Path
) -> None:
    before = len(gnet.calls())
    run = trace(gnet, traced, tmp_path)
    replies = gnet.client_run("traced", 4)
    assert [r["code"] for r in replies] == ["OK"] * 4
    calls = journal_since(gnet, before)
    spans = stop_and_spans(run, 4)
    assert_one_span_per_call(spans, calls)
    # W3C traceparent and B3, as for HTTP/1: each span is a child of its caller.
    want = {(r["trace_id"], r["parent"]) for r in replies}
    assert {(s.trace_id.hex(), s.parent_span_id.hex()) for s in spans} == want
