"""Where and how OTLP is sent: :class:`OtlpConfig` from flags and ``OTEL_EXPORTER_OTLP_*``.

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
    ``true`` for plaintext gRPC to an endpoint written without a scheme
    (``true`` or ``false``, anything else is an error). For the agent's
    ``host:port`` endpoints see :func:`grpc_host_config`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import unquote, urlsplit

from clovisor.export import ExporterConfigError

__all__ = [
    "DEFAULT_TIMEOUT",
    "OtlpConfig",
    "OtlpProtocol",
    "env_setting",
    "grpc_host_config",
    "redact_url",
    "resolve_config",
]

_logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT: Final = 10.0

_GRPC_DEFAULT = "http://localhost:4317"
_HTTP_DEFAULT_BASE = "http://localhost:4318"
_HTTP_PATH = "/v1/traces"
_HEADER_KEY_RE: Final = re.compile(r"[0-9a-z!#$%&'*+.^_`|~-]+")
_HEADER_VALUE_RE: Final = re.compile(r"[\x20-\x7e]*")

OtlpProtocol = Literal["grpc", "http/protobuf"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OtlpConfig:
    """Where and how to send; built by :func:`resolve_config`.

    ``endpoint`` is ``http(s)://HOST:PORT`` for gRPC (``insecure`` says
    whether it is plaintext) and the full URL POSTed to for HTTP.
    """

    protocol: OtlpProtocol
    endpoint: str
    insecure: bool = False
    # Header values are credentials more often than not: __repr__ (which
    # ends up in logs and tracebacks) shows their names only.
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    compression: Literal["none", "gzip"] = "none"
    certificate_file: str | None = None
    client_key_file: str | None = None
    client_certificate_file: str | None = None

    def describe(self) -> str:
        """``grpc http://host:4317``: safe to log and to use as a metric label."""
        return f"{self.protocol} {redact_url(self.endpoint)}"

    def __repr__(self) -> str:
        # User info in the endpoint and header values are credentials.
        return (
            f"OtlpConfig({self.describe()!r}, insecure={self.insecure}, "
            f"headers={[k for k, _ in self.headers]}, timeout={self.timeout}, "
            f"compression={self.compression!r}, certificate_file={self.certificate_file!r}, "
            f"client_key_file={self.client_key_file!r}, "
            f"client_certificate_file={self.client_certificate_file!r})"
        )


def env_setting(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable, value) of the first non-blank of ``OTEL_EXPORTER_OTLP_TRACES_<name>``
    and ``OTEL_EXPORTER_OTLP_<name>``; None when neither is set."""
    for var in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
        value = environ.get(var, "").strip()
        if value:
            return var, value
    return None


def _check_url(url: str, source: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ExporterConfigError(
            f"{source}: expected an http:// or https:// URL with a host, got {redact_url(url)!r}"
        )
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise ExporterConfigError(f"{source}: {exc} in {redact_url(url)!r}") from None


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc="***@" + host).geturl()


def _grpc_endpoint(url: str, source: str, environ: Mapping[str, str]) -> tuple[str, bool]:
    """(``scheme://host:port``, insecure) for a gRPC endpoint setting."""
    if "://" not in url:
        # host:port, as the gRPC world writes it: TLS unless told otherwise.
        insecure = _insecure(environ) is True
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


def _insecure(environ: Mapping[str, str]) -> bool | None:
    """``INSECURE`` as a boolean; None when unset. Anything but true/false is an error."""
    setting = env_setting(environ, "INSECURE")
    if setting is None:
        return None
    value = setting[1].lower()
    if value not in ("true", "false"):
        raise ExporterConfigError(f"{setting[0]}={setting[1]!r}: expected true or false")
    return value == "true"


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
        setting = env_setting(env, "PROTOCOL")
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
            setting = env_setting(env, "ENDPOINT")
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

    _insecure(env)  # checked even where no endpoint needs it: a typo must not wait
    headers: tuple[tuple[str, str], ...] = ()
    if setting := env_setting(env, "HEADERS"):
        headers = _parse_headers(*setting)

    timeout = DEFAULT_TIMEOUT
    if setting := env_setting(env, "TIMEOUT"):
        try:
            timeout = float(setting[1]) / 1000.0
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout > 0):
            raise ExporterConfigError(
                f"{setting[0]}={setting[1]!r}: expected a positive number of milliseconds"
            )

    compression: Literal["none", "gzip"] = "none"
    if setting := env_setting(env, "COMPRESSION"):
        value = setting[1].lower()
        if value == "gzip":
            compression = "gzip"
        elif value != "none":
            raise ExporterConfigError(f"{setting[0]}={setting[1]!r}: expected gzip or none")

    files: dict[str, str | None] = {}
    for name in ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE"):
        setting = env_setting(env, name)
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


def grpc_host_config(host: str, port: int, environ: Mapping[str, str] | None = None) -> OtlpConfig:
    """OTLP/gRPC to ``host:port`` written without a scheme (the agent's Redis key
    ``clovisor_jaeger_server`` and ``--jaeger``), completed from the
    ``OTEL_EXPORTER_OTLP_*`` variables like any other endpoint (headers,
    timeout, compression, certificate files).

    Plaintext unless TLS is asked for, as the original Clovisor and Jaeger's
    own port 4317 have it: TLS with ``INSECURE=false``, or when a
    ``CERTIFICATE`` or ``CLIENT_CERTIFICATE`` is given (``INSECURE=true``
    keeps plaintext even then). Raises :class:`ExporterConfigError` naming a
    bad variable.
    """
    env = os.environ if environ is None else environ
    insecure = _insecure(env)
    if insecure is None:
        tls = any(env_setting(env, name) for name in ("CERTIFICATE", "CLIENT_CERTIFICATE"))
    else:
        tls = not insecure
    bracketed = f"[{host}]" if ":" in host else host
    return resolve_config("otlp-grpc", f"{'https' if tls else 'http'}://{bracketed}:{port}", env)
