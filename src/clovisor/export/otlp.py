"""OTLP/protobuf export to Jaeger or an OpenTelemetry Collector (gRPC or HTTP).

``export()`` runs on the pipeline's exporter thread, which must never stall
behind the network: it only appends the spans to a bounded queue and
returns. One sender thread per exporter takes batches off the queue,
encodes them (:mod:`clovisor.export.otlp_encode`) and sends them, retrying
transient failures with exponential backoff while new spans keep queueing.

Failure policy
--------------
* Transient (gRPC ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
  ``RESOURCE_EXHAUSTED``, ``ABORTED``, ``CANCELLED``, ``OUT_OF_RANGE``,
  ``DATA_LOSS``; HTTP 429, 502, 503, 504; connection refused, reset or timed
  out): the batch is retried after ``backoff_initial`` seconds, doubling up
  to ``backoff_max``, each delay varied by ±``backoff_jitter`` so that a
  fleet of agents does not retry in step. A server's ``Retry-After`` or
  gRPC ``RetryInfo`` lengthens the delay (never beyond ``backoff_max``). A
  batch still failing after ``max_retry_time`` is given up (dropped).
* Permanent (any other gRPC status or HTTP status, e.g. ``INVALID_ARGUMENT``
  or 400, 401, 413): the batch is dropped and counted as failed; resending
  the same bytes cannot succeed.
* While a batch is being retried the queue fills; when it is full the
  *oldest* queued spans make room for new ones (the freshest data is worth
  most once the receiver is back) and are counted as dropped. Memory is
  bounded by ``queue_size`` spans plus one batch, however long the receiver
  stays away.
* ``shutdown(timeout)`` sends what is queued until the timeout, then stops;
  whatever is left is counted as dropped. It never waits longer.

The SDK's ``OTLPSpanExporter`` classes are not used for sending: their
``export()`` retries internally on its own schedule (up to its timeout,
blocking the caller), reports success or failure without saying whether a
failure was transient, and the single-attempt calls beneath it are private
and changed shape between releases. Transports here are the public gRPC
channel API (calling the official ``TraceService/Export`` method) and
``http.client``.

Configuration
-------------
The standard environment variables are honoured; for each setting the
order is: the ``--output`` flag, then ``OTEL_EXPORTER_OTLP_TRACES_<X>``,
then ``OTEL_EXPORTER_OTLP_<X>``, then the default.

``ENDPOINT``
    Used only by ``--output otlp`` (a flag's URL wins). For gRPC,
    ``http://`` means plaintext and ``https://`` TLS; without a scheme,
    ``INSECURE=true`` selects plaintext. For HTTP, the generic variable is a
    base URL to which ``/v1/traces`` is appended, the ``TRACES`` one is used
    as it is. Defaults: ``http://localhost:4317``, ``http://localhost:4318``.
``PROTOCOL``
    ``grpc`` or ``http/protobuf`` (the default), for ``--output otlp`` only.
``HEADERS``
    ``key=value,key2=value2`` (values URL-encoded), sent with every request:
    where credentials go. Never logged.
``TIMEOUT``
    Per-request timeout in **milliseconds**, as the OpenTelemetry
    specification says (the Python SDK reads seconds there, a known
    deviation). Default 10000.
``COMPRESSION``
    ``gzip`` or ``none`` (the default).
``CERTIFICATE``, ``CLIENT_KEY``, ``CLIENT_CERTIFICATE``
    PEM files: the CA to trust, and the client key and certificate for mTLS.
``INSECURE``
    ``true`` for plaintext gRPC to an endpoint written without a scheme.
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import http.client
import logging
import math
import os
import random
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from clovisor import __version__
from clovisor.export import ExporterConfigError
from clovisor.export.otlp_encode import ProtobufSpanEncoder
from clovisor.export.record import SpanRecord

__all__ = [
    "DEFAULT_BACKOFF_INITIAL",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_BATCH_INTERVAL",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_RETRY_TIME",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "STATS_KEYS",
    "OtlpConfig",
    "OtlpExporter",
    "resolve_config",
]

_logger = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE: Final = 20_000
DEFAULT_BATCH_SIZE: Final = 512
DEFAULT_BATCH_INTERVAL: Final = 1.0
DEFAULT_BACKOFF_INITIAL: Final = 0.5
DEFAULT_BACKOFF_MAX: Final = 30.0
DEFAULT_BACKOFF_JITTER: Final = 0.2
DEFAULT_MAX_RETRY_TIME: Final = 300.0  # the Collector's own retry_on_failure default
DEFAULT_SHUTDOWN_TIMEOUT: Final = 5.0
# The Collector's and Jaeger's gRPC receivers refuse messages over 4 MiB by
# default; larger batches are split before sending.
DEFAULT_MAX_REQUEST_BYTES: Final = 4_000_000
DEFAULT_TIMEOUT: Final = 10.0

STATS_KEYS: Final = (
    "spans_exported",
    "spans_failed",
    "spans_dropped",
    "queue_size",
    "send_retries",
)

_GRPC_DEFAULT = "http://localhost:4317"
_HTTP_DEFAULT_BASE = "http://localhost:4318"
_HTTP_PATH = "/v1/traces"
_USER_AGENT: Final = f"clovisor/{__version__}"
_LOG_INTERVAL: Final = 60.0  # at most one repeated warning per this many seconds
_MAX_RESPONSE_BYTES: Final = 1 << 20
_HEADER_KEY_RE: Final = re.compile(r"[0-9a-z!#$%&'*+.^_`|~-]+")
_HEADER_VALUE_RE: Final = re.compile(r"[\x20-\x7e]*")

OtlpProtocol = Literal["grpc", "http/protobuf"]


# --- configuration ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OtlpConfig:
    """Where and how to send; built by :func:`resolve_config`.

    ``endpoint`` is ``http(s)://HOST:PORT`` for gRPC (``insecure`` says
    whether it is plaintext) and the full URL POSTed to for HTTP.
    """

    protocol: OtlpProtocol
    endpoint: str
    insecure: bool = False
    # Header values are credentials more often than not: keep them out of
    # repr(), which ends up in logs and tracebacks.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    timeout: float = DEFAULT_TIMEOUT
    compression: Literal["none", "gzip"] = "none"
    certificate_file: str | None = None
    client_key_file: str | None = None
    client_certificate_file: str | None = None

    def describe(self) -> str:
        """``grpc http://host:4317``: safe to log and to use as a metric label."""
        return f"{self.protocol} {_redact_url(self.endpoint)}"


def _setting(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable, value) of the first non-blank of the TRACES and generic variables."""
    for var in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
        value = environ.get(var, "").strip()
        if value:
            return var, value
    return None


def _check_url(url: str, source: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ExporterConfigError(
            f"{source}: expected an http:// or https:// URL with a host, got {_redact_url(url)!r}"
        )
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise ExporterConfigError(f"{source}: {exc} in {_redact_url(url)!r}") from None


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc="***@" + host).geturl()


def _grpc_endpoint(url: str, source: str, environ: Mapping[str, str]) -> tuple[str, bool]:
    """(``scheme://host:port``, insecure) for a gRPC endpoint setting."""
    if "://" not in url:
        # host:port, as the gRPC world writes it: TLS unless told otherwise.
        insecure_setting = _setting(environ, "INSECURE")
        insecure = insecure_setting is not None and insecure_setting[1].lower() == "true"
        url = ("http://" if insecure else "https://") + url
    _check_url(url, source)
    parts = urlsplit(url)
    if parts.path.strip("/"):
        _logger.warning("%s: a gRPC endpoint has no path; ignoring %r", source, parts.path)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or 4317
    return f"{parts.scheme}://{host}:{port}", parts.scheme == "http"


def _parse_headers(var: str, text: str) -> tuple[tuple[str, str], ...]:
    """``key=value,...`` with URL-encoded values, as the specification writes them.

    Strict where the SDK only logs: a header silently lost is a credential
    silently missing, seen only as 401s later. Values are credentials: no
    message echoes them.
    """
    headers: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not _HEADER_KEY_RE.fullmatch(key):
            raise ExporterConfigError(
                f"{var}: invalid header name {key!r} (expected name=value,name2=value2)"
            )
        value = unquote(value.strip())
        # gRPC metadata and HTTP headers refuse anything else at send time.
        if not _HEADER_VALUE_RE.fullmatch(value):
            raise ExporterConfigError(f"{var}: the value of header {key!r} must be printable ASCII")
        headers[key] = value
    return tuple(headers.items())


def resolve_config(
    kind: str, target: str = "", environ: Mapping[str, str] | None = None
) -> OtlpConfig:
    """The configuration for an ``--output`` of ``kind`` (``otlp-grpc``,
    ``otlp-http`` or ``otlp``) and its ``target`` (as
    :func:`clovisor.specs.parse_output` returns them), completed from the
    ``OTEL_EXPORTER_OTLP_*`` variables in ``environ`` (default: the process
    environment). Raises :class:`ExporterConfigError` naming the bad setting.
    """
    env = os.environ if environ is None else environ

    protocol: OtlpProtocol
    if kind == "otlp-grpc":
        protocol = "grpc"
    elif kind == "otlp-http":
        protocol = "http/protobuf"
    elif kind == "otlp":
        setting = _setting(env, "PROTOCOL")
        value = setting[1].lower() if setting else "http/protobuf"
        if value == "grpc":
            protocol = "grpc"
        elif value == "http/protobuf":
            protocol = "http/protobuf"
        else:
            var = setting[0] if setting else "protocol"
            raise ExporterConfigError(
                f"{var}={value!r} is not supported (use grpc or http/protobuf; "
                f"for OTLP/JSON files use --output otlp-json:PATH)"
            )
    else:
        raise ExporterConfigError(f"not an OTLP output kind: {kind!r}")

    if protocol == "grpc":
        if target:
            endpoint, insecure = _grpc_endpoint(target, "--output", env)
        else:
            setting = _setting(env, "ENDPOINT")
            var, url = setting if setting else ("default endpoint", _GRPC_DEFAULT)
            endpoint, insecure = _grpc_endpoint(url, var, env)
    else:
        insecure = False
        if target:
            endpoint, source = target, "--output"
        elif url := env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
            endpoint, source = url, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        elif url := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
            endpoint, source = url.rstrip("/") + _HTTP_PATH, "OTEL_EXPORTER_OTLP_ENDPOINT"
        else:
            endpoint, source = _HTTP_DEFAULT_BASE + _HTTP_PATH, "default endpoint"
        _check_url(endpoint, source)

    headers: tuple[tuple[str, str], ...] = ()
    if setting := _setting(env, "HEADERS"):
        headers = _parse_headers(*setting)

    timeout = DEFAULT_TIMEOUT
    if setting := _setting(env, "TIMEOUT"):
        try:
            timeout = float(setting[1]) / 1000.0
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout > 0):
            raise ExporterConfigError(
                f"{setting[0]}={setting[1]!r}: expected a positive number of milliseconds"
            )

    compression: Literal["none", "gzip"] = "none"
    if setting := _setting(env, "COMPRESSION"):
        value = setting[1].lower()
        if value == "gzip":
            compression = "gzip"
        elif value != "none":
            raise ExporterConfigError(f"{setting[0]}={setting[1]!r}: expected gzip or none")

    files: dict[str, str | None] = {}
    for name in ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE"):
        setting = _setting(env, name)
        if setting is not None and not os.access(setting[1], os.R_OK):
            raise ExporterConfigError(f"{setting[0]}={setting[1]!r}: not a readable file")
        files[name] = setting[1] if setting else None
    if (files["CLIENT_KEY"] is None) != (files["CLIENT_CERTIFICATE"] is None):
        raise ExporterConfigError(
            "OTEL_EXPORTER_OTLP_CLIENT_KEY and OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE "
            "go together (mTLS needs both)"
        )

    return OtlpConfig(
        protocol=protocol,
        endpoint=endpoint,
        insecure=insecure,
        headers=headers,
        timeout=timeout,
        compression=compression,
        certificate_file=files["CERTIFICATE"],
        client_key_file=files["CLIENT_KEY"],
        client_certificate_file=files["CLIENT_CERTIFICATE"],
    )


# --- transports ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
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


class _GrpcTransport:
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

    def send(self, body: bytes, timeout: float) -> _Outcome:
        call = self._call
        if call is None:
            return _Outcome(ok=False, retryable=True, detail="exporter closed")
        try:
            response = call(body, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
            detail = f"{code.name}: {exc.details() or ''}".rstrip(": ")
            if code not in _GRPC_RETRYABLE:
                return _Outcome(ok=False, detail=detail)
            return _Outcome(
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
        return _Outcome(ok=True, rejected=rejected, detail=message)

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


def _printable(text: str, limit: int = 200) -> str:
    # Error bodies come from the network: keep them to one printable line.
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text


class _HttpTransport:
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

    def send(self, body: bytes, timeout: float) -> _Outcome:
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
                return _Outcome(ok=False, retryable=True, detail=f"{type(exc).__name__}: {exc}")
            return self._outcome(response, payload)
        return _Outcome(ok=False, retryable=True, detail="connection lost")

    def _outcome(self, response: http.client.HTTPResponse, payload: bytes) -> _Outcome:
        status = response.status
        protobuf = "protobuf" in (response.getheader("Content-Type") or "")
        if 200 <= status < 300:
            if payload and protobuf:
                reply = trace_service_pb2.ExportTraceServiceResponse()
                with contextlib.suppress(Exception):  # the spans got there
                    reply.ParseFromString(payload)
                    rejected, message = _partial(reply)
                    return _Outcome(ok=True, rejected=rejected, detail=message)
            return _Outcome(ok=True)
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
                detail += ": " + _printable(message)
        if status in _HTTP_RETRYABLE:
            return _Outcome(
                ok=False,
                retryable=True,
                detail=detail,
                retry_after=_retry_after(response.getheader("Retry-After")),
            )
        return _Outcome(ok=False, detail=detail)

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


_Transport = _GrpcTransport | _HttpTransport


# --- the exporter ----------------------------------------------------------


class _Throttle:
    """Lets a repeated warning through at most once per interval."""

    def __init__(self, interval: float = _LOG_INTERVAL) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        self._last[key] = now
        return True


class _GiveUp(Exception):
    """Shutdown's deadline passed: leave the rest to shutdown()'s accounting."""


class OtlpExporter:
    """Sends spans to an OTLP receiver from a background thread.

    ``export()`` never blocks on the network; ``shutdown(timeout)`` flushes
    for at most ``timeout`` seconds (default ``shutdown_timeout``).

    :meth:`stats` returns these counters (names are stable: they feed the
    agent's Prometheus metrics):

    ``spans_exported``
        accepted by the receiver.
    ``spans_failed``
        refused by the receiver for good (a permanent error, or rejected in a
        partial success), or unencodable: resending would not help.
    ``spans_dropped``
        given up without the receiver refusing them: pushed out of a full
        queue, a batch still failing after ``max_retry_time``, still unsent
        when shutdown's timeout ran out, or exported after shutdown.
    ``queue_size``
        spans waiting now (a gauge; excludes the batch being sent).
    ``send_retries``
        send attempts that failed transiently and were scheduled again.

    Every span given to ``export()`` ends up in exactly one of exported,
    failed or dropped once ``shutdown()`` has returned.
    """

    def __init__(
        self,
        config: OtlpConfig,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_interval: float = DEFAULT_BATCH_INTERVAL,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        backoff_jitter: float = DEFAULT_BACKOFF_JITTER,
        max_retry_time: float = DEFAULT_MAX_RETRY_TIME,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        encoder: ProtobufSpanEncoder | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1 or max_request_bytes < 1:
            raise ValueError("queue_size, batch_size and max_request_bytes must be positive")
        if not (0 < backoff_initial <= backoff_max) or not 0 <= backoff_jitter < 1:
            raise ValueError("need 0 < backoff_initial <= backoff_max and 0 <= backoff_jitter < 1")
        if batch_interval <= 0 or max_retry_time < 0 or shutdown_timeout < 0:
            raise ValueError("batch_interval must be positive, the timeouts non-negative")
        self.config = config
        self._capacity = queue_size
        self._batch_size = min(batch_size, queue_size)
        self._batch_interval = batch_interval
        self._backoff = (backoff_initial, backoff_max, backoff_jitter)
        self._max_retry_time = max_retry_time
        self._shutdown_timeout = shutdown_timeout
        self._max_request_bytes = max_request_bytes
        self._encoder = encoder or ProtobufSpanEncoder()
        self._transport: _Transport = (
            _GrpcTransport(config, reconnect_backoff=(backoff_initial, backoff_max))
            if config.protocol == "grpc"
            else _HttpTransport(config)
        )
        # Only for the jitter: not security-relevant.
        self._random = random.Random()
        self._throttle = _Throttle()

        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[SpanRecord] = deque(maxlen=queue_size)
        self._in_flight = 0  # spans taken by the sender and not yet accounted
        self._exported = 0
        self._failed = 0
        self._dropped = 0
        self._retries = 0
        self._flush_waiters = 0
        self._closing = False
        self._finished = False
        self._deadline = math.inf  # set by shutdown()
        self._wake = threading.Event()  # cuts a backoff sleep short
        self._failing_since: float | None = None

        self._thread = threading.Thread(
            target=self._run, name=f"clovisor-otlp {config.describe()}", daemon=True
        )
        self._thread.start()

    @classmethod
    def from_output(
        cls,
        kind: str,
        target: str = "",
        *,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> OtlpExporter:
        """An exporter for a parsed ``--output`` (see :func:`resolve_config`)."""
        return cls(resolve_config(kind, target, environ), **options)

    # --- the exporter thread's side ------------------------------------------

    def export(self, spans: Sequence[SpanRecord]) -> None:
        """Queue the spans and return at once; the oldest are dropped when full."""
        n = len(spans)
        if not n:
            return
        with self._cond:
            if self._closing:
                self._dropped += n
                return
            queue = self._queue
            before = len(queue)
            overflow = before + n - self._capacity
            if overflow > 0:
                self._dropped += overflow
                if self._throttle.allow("overflow"):
                    _logger.warning(
                        "OTLP %s: queue full (%d spans), dropping the oldest; %d dropped so far",
                        self.config.describe(),
                        self._capacity,
                        self._dropped,
                    )
            queue.extend(spans)  # deque(maxlen) discards from the left
            if before == 0 or len(queue) >= self._batch_size > before:
                # notify_all: flush() callers wait on the same condition and
                # must not swallow the sender's wake-up.
                self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """The counters described in the class docstring (keys: :data:`STATS_KEYS`)."""
        with self._cond:
            return {
                "spans_exported": self._exported,
                "spans_failed": self._failed,
                "spans_dropped": self._dropped,
                "queue_size": len(self._queue),
                "send_retries": self._retries,
            }

    def flush(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
        """Wait until everything queued has been sent or given up; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                while self._queue or self._in_flight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._finished:
                        return not (self._queue or self._in_flight)
                    self._cond.wait(remaining)
                return True
            finally:
                self._flush_waiters -= 1

    def shutdown(self, timeout: float | None = None) -> None:
        """Send what is queued for up to ``timeout`` seconds, then stop.

        What is still unsent then is counted in ``spans_dropped``. Later
        calls, and exports after this one, do nothing but count.
        """
        budget = self._shutdown_timeout if timeout is None else max(0.0, timeout)
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._deadline = time.monotonic() + budget
            self._cond.notify_all()
        self._wake.set()
        self._thread.join(max(0.0, self._deadline - time.monotonic()))
        # Stuck in a send (a receiver that accepts and never answers): closing
        # the transport wakes it; it then finds the deadline passed.
        self._transport.close()
        with self._cond:
            self._finished = True
            left = len(self._queue) + self._in_flight
            self._dropped += left
            self._queue.clear()
            self._in_flight = 0
            self._cond.notify_all()
            totals = (self._exported, self._failed, self._dropped)
        if left:
            _logger.warning(
                "OTLP %s: %d spans unsent at shutdown (receiver unreachable or too slow)",
                self.config.describe(),
                left,
            )
        _logger.debug(
            "OTLP %s: %d exported, %d failed, %d dropped", self.config.describe(), *totals
        )

    # --- the sender thread ---------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._deliver(batch)
            except _GiveUp:
                return  # shutdown() counts what is left
            except Exception:
                # A bug here must not end export for the agent's lifetime.
                _logger.exception("OTLP %s: sending a batch failed", self.config.describe())
                with self._cond:
                    if not self._finished:
                        self._failed += self._in_flight
                        self._in_flight = 0
            with self._cond:
                self._cond.notify_all()  # flush() waiters

    def _next_batch(self) -> list[SpanRecord] | None:
        with self._cond:
            queue = self._queue
            while not queue and not self._closing:
                self._cond.wait()
            if (
                queue
                and len(queue) < self._batch_size
                and not self._closing
                and not self._flush_waiters
            ):
                # Give a partial batch a moment to fill: one request of 512
                # spans costs far less than 512 requests of one.
                self._cond.wait_for(
                    lambda: len(queue) >= self._batch_size or self._closing or self._flush_waiters,
                    self._batch_interval,
                )
            if not queue or time.monotonic() >= self._deadline or self._finished:
                return None
            n = min(self._batch_size, len(queue))
            if n == len(queue):
                batch = list(queue)
                queue.clear()
            else:
                batch = [queue.popleft() for _ in range(n)]
            self._in_flight = n
            return batch

    def _account(self, *, of: int, exported: int = 0, failed: int = 0, dropped: int = 0) -> None:
        with self._cond:
            if self._finished:
                return  # shutdown() has counted these as dropped already
            self._exported += exported
            self._failed += failed
            self._dropped += dropped
            self._in_flight -= of

    def _deliver(self, batch: list[SpanRecord]) -> None:
        pending = [batch]
        while pending:
            spans = pending.pop()
            try:
                body = self._encoder.serialize(spans)
            except Exception:
                _logger.exception(
                    "OTLP %s: cannot encode %d spans", self.config.describe(), len(spans)
                )
                self._account(failed=len(spans), of=len(spans))
                continue
            if len(body) > self._max_request_bytes:
                if len(spans) > 1:
                    half = len(spans) // 2
                    pending.append(spans[half:])
                    pending.append(spans[:half])
                    continue
                _logger.error(
                    "OTLP %s: dropping a span of %d bytes encoded (limit %d)",
                    self.config.describe(),
                    len(body),
                    self._max_request_bytes,
                )
                self._account(failed=1, of=1)
                continue
            self._send(self._transport.prepare(body), len(spans))

    def _send(self, body: bytes, n: int) -> None:
        """Send one request until it is accepted, refused, or given up."""
        initial, cap, jitter = self._backoff
        first_try = time.monotonic()
        attempt = 0
        while True:
            timeout = self.config.timeout
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise _GiveUp
            outcome = self._transport.send(body, min(timeout, remaining))
            if outcome.ok:
                self._on_success(outcome, n)
                return
            if not outcome.retryable:
                self._account(failed=n, of=n)
                if self._throttle.allow("permanent"):
                    _logger.error(
                        "OTLP %s: receiver refused %d spans: %s (not retried)",
                        self.config.describe(),
                        n,
                        outcome.detail,
                    )
                return
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            if self._throttle.allow("transient"):
                _logger.warning(
                    "OTLP %s: %s; retrying (spans queue meanwhile)",
                    self.config.describe(),
                    outcome.detail,
                )
            if now - first_try >= self._max_retry_time:
                self._account(dropped=n, of=n)
                _logger.error(
                    "OTLP %s: gave up on %d spans after %.0f s of retries: %s",
                    self.config.describe(),
                    n,
                    now - first_try,
                    outcome.detail,
                )
                return
            delay = min(cap, initial * 2.0**attempt)
            delay *= self._random.uniform(1.0 - jitter, 1.0 + jitter)
            if outcome.retry_after is not None:
                delay = max(delay, min(outcome.retry_after, cap))
            attempt += 1
            with self._cond:
                self._retries += 1
            if outcome.reconnect:
                self._transport.reconnect()
            self._sleep(min(delay, self._deadline - time.monotonic()))

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._wake.wait(seconds):
            # Shutdown began (it sets the event once): retry at once, as the
            # receiver may be back, then keep the schedule, which the
            # shutdown deadline bounds.
            self._wake.clear()

    def _on_success(self, outcome: _Outcome, n: int) -> None:
        rejected = min(max(outcome.rejected, 0), n)
        self._account(exported=n - rejected, failed=rejected, of=n)
        if rejected and self._throttle.allow("partial"):
            _logger.error(
                "OTLP %s: receiver rejected %d of %d spans: %s",
                self.config.describe(),
                rejected,
                n,
                _printable(outcome.detail) or "no reason given",
            )
        if self._failing_since is not None:
            _logger.info(
                "OTLP %s: delivering again after %.1f s of failures",
                self.config.describe(),
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
