"""Real OTLP receivers for tests: gRPC and HTTP, on loopback, ephemeral ports.

Both decode what they receive with the official ``ExportTraceServiceRequest``
message, record it with the request's headers (gRPC metadata), and answer
the way a Collector or Jaeger would. Switches make them misbehave:

* ``fail(mode, times=None, retry_after=None)``: answer the next ``times``
  requests (all, if None) with ``"unavailable"`` (gRPC UNAVAILABLE / HTTP
  503), ``"throttled"`` (RESOURCE_EXHAUSTED / 429), ``"invalid"``
  (INVALID_ARGUMENT / 400) or ``"hang"`` (never answer until ``heal()`` or
  ``stop()``). ``retry_after`` adds a gRPC ``RetryInfo`` / HTTP
  ``Retry-After``. ``heal()`` ends it.
* ``reject(n)``: accept requests but report ``n`` spans rejected (partial success).
* ``stop()`` / ``start()``: stop listening (live connections are cut too),
  and listen again on the *same* port.

``tls=Pki`` (:mod:`tests.export.certs`) makes either one a TLS server that
also requires a client certificate signed by the same CA (mutual TLS).

Use as context managers, or call ``close()``. Nothing here is global: every
receiver owns its server, threads and port.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from tests.export.certs import Pki

__all__ = ["FailMode", "GrpcReceiver", "HttpReceiver", "Received", "Receiver"]

FailMode = Literal["unavailable", "throttled", "invalid", "hang"]

_GRPC_CODES: dict[str, Any] = {
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "throttled": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
}
_HTTP_CODES = {"unavailable": 503, "throttled": 429, "invalid": 400}


@dataclass(frozen=True)
class Received:
    request: ExportTraceServiceRequest
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    at: float = 0.0  # time.monotonic()


class Receiver:
    """What both transports share: recording, failure switches, waiting."""

    def __init__(self, host: str = "127.0.0.1", *, keep: bool = True,
                 tls: Pki | None = None) -> None:
        self.host = host
        self.port = 0
        self.tls = tls
        self._keep = keep  # False: count spans only (benchmarks)
        self._span_total = 0
        self._cond = threading.Condition()
        self._received: list[Received] = []
        self.attempts = 0  # requests seen, answered or not
        self._fail: FailMode | None = None
        self._fail_left: int | None = None
        self._retry_after: float | None = None
        self._reject = 0
        self._release = threading.Event()
        self.running = False

    # --- switches ----------------------------------------------------------

    def fail(
        self, mode: FailMode, times: int | None = None, *, retry_after: float | None = None
    ) -> None:
        with self._cond:
            self._fail, self._fail_left, self._retry_after = mode, times, retry_after
            self._release.clear()

    def heal(self) -> None:
        with self._cond:
            self._fail = None
            self._release.set()

    def reject(self, spans: int) -> None:
        with self._cond:
            self._reject = spans

    # --- results -----------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    def requests(self) -> list[ExportTraceServiceRequest]:
        return [r.request for r in self.received]

    def spans(self) -> list[PbSpan]:
        return [
            span
            for request in self.requests()
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def span_count(self) -> int:
        with self._cond:
            return self._span_total

    def wait_for_spans(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._span_total >= n, timeout)

    def wait_for_attempts(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.attempts >= n, timeout)

    # --- for the transports ------------------------------------------------

    def _decide(self) -> tuple[FailMode | None, float | None]:
        """Count an attempt; the failure to answer it with, if any."""
        with self._cond:
            self.attempts += 1
            self._cond.notify_all()
            mode = self._fail
            if mode is not None and self._fail_left is not None:
                self._fail_left -= 1
                if self._fail_left <= 0:
                    self._fail = None
            return mode, self._retry_after

    def _record(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> int:
        n = _count(request)
        with self._cond:
            if self._keep:
                self._received.append(Received(request, headers, time.monotonic()))
            self._span_total += n
            self._cond.notify_all()
            return min(self._reject, n)

    def _hang(self) -> None:
        self._release.wait(30.0)

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.heal()
        if self.running:
            self.stop()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _count(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


# --- gRPC --------------------------------------------------------------------


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, owner: GrpcReceiver) -> None:
        self._owner = owner

    def Export(self, request: ExportTraceServiceRequest, context: Any) -> Any:
        owner = self._owner
        mode, retry_after = owner._decide()
        if mode == "hang":
            owner._hang()
            context.abort(grpc.StatusCode.UNAVAILABLE, "receiver released a hung call")
        elif mode is not None:
            if retry_after is not None:
                info = error_details_pb2.RetryInfo(
                    retry_delay=Duration(
                        seconds=int(retry_after), nanos=int((retry_after % 1) * 1e9)
                    )
                )
                context.set_trailing_metadata(
                    (("google.rpc.retryinfo-bin", info.SerializeToString()),)
                )
            context.abort(_GRPC_CODES[mode], f"test receiver: {mode}")
        headers = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        rejected = owner._record(request, headers)
        if rejected:
            return ExportTraceServiceResponse(
                partial_success=ExportTracePartialSuccess(
                    rejected_spans=rejected, error_message="test receiver: rejected"
                )
            )
        return ExportTraceServiceResponse()


class GrpcReceiver(Receiver):
    """An OTLP/gRPC receiver (``TraceService/Export``), started at construction."""

    def __init__(self, host: str = "127.0.0.1", *, keep: bool = True,
                 tls: Pki | None = None) -> None:
        super().__init__(host, keep=keep, tls=tls)
        self._server: Any = None
        self.start()

    def start(self) -> None:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="otlp-grpc-receiver"),
            # Exclusive port: a restarted receiver must really own it.
            options=[("grpc.so_reuseport", 0)],
        )
        add = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add(_Servicer(self), server)  # type: ignore[no-untyped-call]
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.tls is None:
            port = server.add_insecure_port(f"{host}:{self.port}")
        else:
            credentials = grpc.ssl_server_credentials(
                [(self.tls.server_key.read_bytes(), self.tls.server_cert.read_bytes())],
                root_certificates=self.tls.ca.read_bytes(),
                require_client_auth=True,
            )
            port = server.add_secure_port(f"{host}:{self.port}", credentials)
        if not port:
            raise OSError(f"cannot listen on {host}:{self.port}")
        self.port = port
        server.start()
        self._server = server
        self.running = True

    def stop(self) -> None:
        self._release.set()  # hung calls return, so the pool can stop
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        self.running = False
        self._release.clear()


# --- HTTP --------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as exporters use it
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a test's output is not the place for access logs

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path != owner.path:
            self._reply(404, b"not found", "text/plain")
            return
        mode, retry_after = owner._decide()
        if mode == "hang":
            owner._hang()
            self.close_connection = True
            return
        if mode is not None:
            status = status_pb2.Status(code=0, message=f"test receiver: {mode}")
            extra = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
            self._reply(
                _HTTP_CODES[mode], status.SerializeToString(), "application/x-protobuf", extra
            )
            return
        if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception:
            self._reply(400, b"undecodable ExportTraceServiceRequest", "text/plain")
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        rejected = owner._record(request, headers)
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = "test receiver: rejected"
        self._reply(200, response.SerializeToString(), "application/x-protobuf")

    def _reply(
        self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: HttpReceiver) -> None:
        self.owner = owner
        if ":" in owner.host:
            self.address_family = socket.AF_INET6
        super().__init__((owner.host, owner.port), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        tls = self.owner.tls
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
            ctx.load_cert_chain(str(tls.server_cert), str(tls.server_key))
            ctx.verify_mode = ssl.CERT_REQUIRED
            # The handshake happens in the handler's thread, at its first read.
            conn = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        self.owner._track(conn)
        return conn, addr


class HttpReceiver(Receiver):
    """An OTLP/HTTP receiver (``POST /v1/traces``, protobuf), started at construction."""

    def __init__(
        self, host: str = "127.0.0.1", path: str = "/v1/traces", *, keep: bool = True,
        tls: Pki | None = None,
    ) -> None:
        super().__init__(host, keep=keep, tls=tls)
        self.path = path
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.start()

    @property
    def url(self) -> str:
        return self.endpoint + self.path

    def _track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns = {c for c in self._conns if c.fileno() != -1}
            self._conns.add(conn)

    def start(self) -> None:
        server = _HttpServer(self)
        self.port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-http-receiver",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        self.running = True

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        # Keep-alive connections outlive the listener: cut them, as a
        # restarting receiver would.
        with self._conns_lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None
        self.running = False
        self._release.clear()


def receivers() -> Iterator[type[Receiver]]:
    """Both receiver classes, for parametrised tests."""
    yield GrpcReceiver
    yield HttpReceiver


def main() -> None:
    """``python -m tests.export.receiver grpc|http``: a receiver in its own process.

    Prints the endpoint on the first line, then, for every line read from
    stdin, the number of spans received so far; exits at end of input. The
    benchmark uses it so that decoding on the receiving side does not share
    a core (and a GIL) with the exporter it measures.
    """
    import sys

    kind = sys.argv[1] if len(sys.argv) > 1 else "grpc"
    r: Receiver = GrpcReceiver(keep=False) if kind == "grpc" else HttpReceiver(keep=False)
    with r:
        endpoint = r.endpoint if kind == "grpc" else r.endpoint + "/v1/traces"
        print(endpoint, flush=True)
        for _ in sys.stdin:
            print(r.span_count(), flush=True)


if __name__ == "__main__":
    main()
