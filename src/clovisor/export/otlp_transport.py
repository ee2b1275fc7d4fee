"""The two OTLP transports: unary gRPC ``TraceService/Export`` calls and HTTP POSTs.

Each sends one already-encoded request and says how it went (an
:class:`Outcome`: accepted, transient or permanent failure, the receiver's
retry hint); the retry policy is the exporter's (:mod:`clovisor.export.otlp`).
Both are the public APIs: the gRPC channel calling the official
``TraceService/Export`` method, and ``http.client``.
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import http.client
import math
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from clovisor import __version__
from clovisor.export import ExporterConfigError
from clovisor.export.otlp_config import OtlpConfig

__all__ = ["GrpcTransport", "HttpTransport", "Outcome", "Transport", "printable"]

_USER_AGENT: Final = f"clovisor/{__version__}"
_MAX_RESPONSE_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    retryable: bool = False
    detail: str = ""
    retry_after: float | None = None
    rejected: int = 0  # spans the receiver refused in a partial success
    reconnect: bool = False  # start over with a fresh connection


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ExporterConfigError(f"cannot read {path!r}: {exc.strerror or exc}") from exc


def _partial(response: Any) -> tuple[int, str]:
    partial = response.partial_success
    return int(partial.rejected_spans), str(partial.error_message)


_EXPORT_METHOD: Final = (
    "/" + trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name + "/Export"
)

# The OTLP specification's retryable codes. RESOURCE_EXHAUSTED is retried
# even without RetryInfo: it is what an overloaded Collector answers.
_GRPC_RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_HTTP_RETRYABLE: Final = frozenset({429, 502, 503, 504})


class GrpcTransport:
    """Unary ``TraceService/Export`` calls on one channel, rebuilt after UNAVAILABLE."""

    def __init__(self, config: OtlpConfig, *, reconnect_backoff: tuple[float, float]) -> None:
        parts = urlsplit(config.endpoint)
        self._target = parts.netloc
        self._metadata = config.headers
        self._credentials = None
        if not config.insecure:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(config.certificate_file),
                private_key=_read(config.client_key_file),
                certificate_chain=_read(config.client_certificate_file),
            )
        self._compression = (
            grpc.Compression.Gzip
            if config.compression == "gzip"
            else grpc.Compression.NoCompression
        )
        initial_ms = max(1, int(reconnect_backoff[0] * 1000))
        self._options = [
            ("grpc.primary_user_agent", _USER_AGENT),
            # Our loop owns retries: a channel-level retry would spend the
            # budget twice and hide failures from the counters.
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", initial_ms),
            ("grpc.min_reconnect_backoff_ms", initial_ms),
            ("grpc.max_reconnect_backoff_ms", max(initial_ms, int(reconnect_backoff[1] * 1000))),
        ]
        self._lock = threading.Lock()
        self._closed = False
        self._channel: Any = None
        self._call: Any = None
        self._open()

    def _open(self) -> None:
        if self._credentials is None:
            channel = grpc.insecure_channel(
                self._target, options=self._options, compression=self._compression
            )
        else:
            channel = grpc.secure_channel(
                self._target,
                self._credentials,
                options=self._options,
                compression=self._compression,
            )
        # The body is already serialised: no request serializer.
        call = channel.unary_unary(
            _EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
        )
        with self._lock:
            if self._closed:
                channel.close()
                return
            self._channel, self._call = channel, call

    def prepare(self, body: bytes) -> bytes:
        return body  # gRPC compresses per call, on the channel

    def send(self, body: bytes, timeout: float) -> Outcome:
        call = self._call
        if call is None:
            return Outcome(ok=False, retryable=True, detail="exporter closed")
        try:
            response = call(body, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
            detail = f"{code.name}: {exc.details() or ''}".rstrip(": ")
            if code not in _GRPC_RETRYABLE:
                return Outcome(ok=False, detail=detail)
            return Outcome(
                ok=False,
                retryable=True,
                detail=detail,
                retry_after=_grpc_retry_delay(exc),
                # A channel in TRANSIENT_FAILURE fails calls at once until its
                # own reconnect timer fires: a fresh one connects right away,
                # so recovery follows our schedule alone.
                reconnect=code is grpc.StatusCode.UNAVAILABLE,
            )
        rejected, message = _partial(response)
        return Outcome(ok=True, rejected=rejected, detail=message)

    def reconnect(self) -> None:
        with self._lock:
            old, self._channel, self._call = self._channel, None, None
        if old is not None:
            old.close()
        self._open()

    def close(self) -> None:
        """Also from another thread: cancels a call in progress."""
        with self._lock:
            self._closed = True
            old, self._channel, self._call = self._channel, None, None
        if old is not None:
            old.close()


def _grpc_retry_delay(exc: Any) -> float | None:
    try:
        trailers = dict(exc.trailing_metadata() or ())
    except Exception:  # a call without trailers (e.g. cancelled)
        return None
    raw = trailers.get("google.rpc.retryinfo-bin")
    if not isinstance(raw, bytes):
        return None
    info = error_details_pb2.RetryInfo()
    try:
        info.ParseFromString(raw)
    except Exception:  # a malformed hint is no hint
        return None
    return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)


def _retry_after(value: str | None) -> float | None:
    """Seconds from an HTTP ``Retry-After`` (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def printable(text: str, limit: int = 200) -> str:
    # Error bodies come from the network: keep them to one printable line.
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text


class HttpTransport:
    """POSTs to the endpoint on one keep-alive connection."""

    def __init__(self, config: OtlpConfig) -> None:
        parts = urlsplit(config.endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._context: ssl.SSLContext | None = None
        if self._https:
            try:
                self._context = ssl.create_default_context(cafile=config.certificate_file)
                if config.client_certificate_file:
                    self._context.load_cert_chain(
                        config.client_certificate_file, config.client_key_file
                    )
            except (OSError, ssl.SSLError) as exc:
                raise ExporterConfigError(f"OTLP TLS setup failed: {exc}") from exc
        self._headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": _USER_AGENT,
            **dict(config.headers),
        }
        self._gzip = config.compression == "gzip"
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._closed = False

    def prepare(self, body: bytes) -> bytes:
        # Compressed once per batch, not once per attempt.
        return gzip.compress(body, compresslevel=6) if self._gzip else body

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._context
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        conn.connect()
        with self._lock:
            if self._closed:
                conn.close()
                raise ConnectionAbortedError("exporter closed")
            self._conn = conn
        return conn

    def _drop(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def send(self, body: bytes, timeout: float) -> Outcome:
        for _ in range(2):
            conn = self._conn
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._connect(timeout)
                elif conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request("POST", self._path, body=body, headers=self._headers)
                response = conn.getresponse()
                payload = response.read(_MAX_RESPONSE_BYTES)
                if response.will_close or not response.isclosed():
                    self._drop()  # closing, or more body than we read
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if reused and not isinstance(exc, TimeoutError):
                    # The server may have closed an idle keep-alive connection:
                    # try once more on a new one before calling it a failure.
                    continue
                return Outcome(ok=False, retryable=True, detail=f"{type(exc).__name__}: {exc}")
            return self._outcome(response, payload)
        return Outcome(ok=False, retryable=True, detail="connection lost")

    def _outcome(self, response: http.client.HTTPResponse, payload: bytes) -> Outcome:
        status = response.status
        protobuf = "protobuf" in (response.getheader("Content-Type") or "")
        if 200 <= status < 300:
            if payload and protobuf:
                reply = trace_service_pb2.ExportTraceServiceResponse()
                with contextlib.suppress(Exception):  # the spans got there
                    reply.ParseFromString(payload)
                    rejected, message = _partial(reply)
                    return Outcome(ok=True, rejected=rejected, detail=message)
            return Outcome(ok=True)
        detail = f"HTTP {status} {response.reason}"
        if payload:
            message = ""
            if protobuf:
                rpc_status = status_pb2.Status()
                with contextlib.suppress(Exception):
                    rpc_status.ParseFromString(payload)
                    message = rpc_status.message
            else:
                message = payload.decode("utf-8", "replace")
            if message:
                detail += ": " + printable(message)
        if status in _HTTP_RETRYABLE:
            return Outcome(
                ok=False,
                retryable=True,
                detail=detail,
                retry_after=_retry_after(response.getheader("Retry-After")),
            )
        return Outcome(ok=False, detail=detail)

    def reconnect(self) -> None:
        self._drop()

    def close(self) -> None:
        """Also from another thread: wakes a send blocked on the socket."""
        with self._lock:
            self._closed = True
            conn = self._conn
        if conn is not None and conn.sock is not None:
            # shutdown() rather than close(): the sender thread may be inside
            # this connection, and it closes it itself once woken.
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)


Transport = GrpcTransport | HttpTransport
