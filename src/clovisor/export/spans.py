"""Session records -> span records (:class:`clovisor.export.record.SpanRecord`).

No OpenTelemetry Tracer and no SDK span: a session is already finished when
we learn of it, its times come from the kernel rather than from "now", and a
Tracer would add a context switch, a sampler, a span processor and a lock
per span for nothing. The encoders write OTLP straight from the record;
:func:`to_readable_span` builds the SDK's ``ReadableSpan`` for the places
that want one (the SDK's reference encoder, in tests).

This runs once per session on the agent's hot path, so it touches few
objects: one dict of attributes, one tuple, and string work only for the
fields that are present.

Everything that came off the wire (method, target, headers, reason) is
hostile: it may hold lone surrogates, control characters or credentials.
Strings are made UTF-8-encodable (protobuf refuses anything else), and
credentials are dropped or redacted here even though the parser is expected
not to record them, because a leaked token in a trace store is hard to undo.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Final
from urllib.parse import unquote_plus

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode
from opentelemetry.util.types import AttributeValue

from clovisor import __version__
from clovisor.core.events import Outcome, Protocol, Role, Session
from clovisor.export.propagation import b3_trace_flags, jaeger_parent
from clovisor.export.record import SpanRecord

__all__ = [
    "DEFAULT_SENSITIVE_QUERY_KEYS",
    "GRPC_CODES",
    "GRPC_SERVER_ERRORS",
    "KNOWN_METHODS",
    "SCOPE",
    "SENSITIVE_HEADERS",
    "redact_query",
    "session_to_span",
    "to_readable_span",
]

SCOPE: Final = InstrumentationScope("clovisor", __version__)

# Semconv: http.request.method is one of these exact (case-sensitive) names,
# anything else becomes _OTHER with the original kept beside it.
KNOWN_METHODS: Final = frozenset(
    ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
)

# Never exported, whatever the parser was configured to record.
SENSITIVE_HEADERS: Final = frozenset(
    (
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
        "x-amz-security-token",
    )
)

# Query parameters whose values are credentials. The semconv defaults
# (AWSAccessKeyId, Signature, sig, X-Goog-Signature) plus the common OAuth,
# API-key and presigned-URL names. Compared lower-case.
DEFAULT_SENSITIVE_QUERY_KEYS: Final = frozenset(
    k.lower()
    for k in (
        "AWSAccessKeyId",
        "Signature",
        "sig",
        "X-Goog-Signature",
        "X-Goog-Credential",
        "X-Amz-Signature",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "auth",
        "authorization",
        "api_key",
        "apikey",
        "api-key",
        "key",
        "password",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
        "code",
        "session",
        "sessionid",
        "session_id",
    )
)

# gRPC status codes by number (grpc/doc/statuscodes.md): rpc.response.status_code.
GRPC_CODES: Final = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip
# Semconv: the codes that fail a SERVER span (UNKNOWN, DEADLINE_EXCEEDED,
# UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS); a CLIENT span fails on any
# code but OK.
GRPC_SERVER_ERRORS: Final = frozenset((2, 4, 12, 13, 14, 15))

_REDACTED: Final = "REDACTED"
_UNSET: Final = StatusCode.UNSET
_ERROR: Final = StatusCode.ERROR

_TRACEPARENT_RE: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_B3_ID_RE: Final = re.compile(r"[0-9a-fA-F]{16}|[0-9a-fA-F]{32}")
_QUERY_SPLIT_RE: Final = re.compile(r"([&;])")
_JSESSIONID_RE: Final = re.compile(r"(;jsessionid=)[^/;?]*", re.IGNORECASE)

# Outcome -> (error.type, description without a response, with a partial one).
_FAILED_OUTCOMES: Final[dict[Outcome, tuple[str, str, str | None]]] = {
    Outcome.RESET: (
        "reset",
        "connection reset before response",
        "connection reset during response",
    ),
    Outcome.CLOSED: (
        "closed",
        "connection closed before response",
        "connection closed during response",
    ),
    Outcome.TIMEOUT: (
        "timeout",
        "no response before the idle timeout",
        "response stalled until the idle timeout",
    ),
    # The tracer stopping is not the workload's fault once a response has
    # started, but a request that never got any answer still reads as failed.
    Outcome.SHUTDOWN: ("shutdown", "tracer stopped before response", None),
}

# Pre-built keys: string concatenation per header per span adds up.
_req_header_keys: dict[str, str] = {}
_resp_header_keys: dict[str, str] = {}
_HEADER_KEY_CACHE_MAX: Final = 1024


def _clean(s: str) -> str:
    """Make a wire-derived string safe for protobuf (valid UTF-8)."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates, typically raw bytes smuggled by a surrogateescape
        # decode; protobuf would raise. Restore the bytes, so valid UTF-8
        # sequences survive, and mark the rest with U+FFFD.
        try:
            raw = s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = s.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "replace")
    return s


def redact_query(
    query: str, keys: frozenset[str] = DEFAULT_SENSITIVE_QUERY_KEYS, *, all_values: bool = False
) -> str:
    """Replace the values of credential-bearing query parameters by REDACTED.

    Keeps everything else byte-for-byte, so the query stays recognisable.
    Splits on ``;`` as well as ``&``: some servers accept both. With
    ``all_values`` (``--redact-query all``) every value is replaced, and so is
    a part without ``=``, which may be a bare token; only names remain.
    """
    if "=" not in query and not all_values:
        return query
    # Odd indices hold the separators, so joining restores the original.
    parts = _QUERY_SPLIT_RE.split(query)
    changed = False
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition("=")
        if all_values:
            if value or (name and not eq):
                parts[i] = name + "=" + _REDACTED if eq else _REDACTED
                changed = True
            continue
        if not eq or not value:
            continue
        # Decode first: "%41ccess_token" must match too.
        name_key = (unquote_plus(name) if "%" in name or "+" in name else name).lower()
        if name_key in keys:
            parts[i] = name + "=" + _REDACTED
            changed = True
    return "".join(parts) if changed else query


def _redact_path(path: str) -> str:
    # Servlet containers put the session id in a path parameter.
    if ";" in path:
        return _JSESSIONID_RE.sub(r"\g<1>" + _REDACTED, path)
    return path


def _split_target(target: str) -> tuple[str | None, str | None, str | None, str | None]:
    """request-target -> (scheme, authority, path, query) for the four RFC 9112 forms."""
    if target.startswith("/"):  # origin-form, the common case
        path, q, query = target.partition("?")
        return None, None, path, (query if q else None)
    if target == "*":  # asterisk-form (OPTIONS *)
        return None, None, "*", None
    scheme, sep, rest = target.partition("://")
    if sep and scheme and scheme.isalnum():  # absolute-form (to proxies)
        end = len(rest)
        for ch in "/?#":
            idx = rest.find(ch)
            if 0 <= idx < end:
                end = idx
        authority, tail = rest[:end], rest[end:]
        tail = tail.partition("#")[0]
        path, q, query = tail.partition("?")
        return scheme.lower(), authority, (path or "/"), (query if q else None)
    return None, target, None, None  # authority-form (CONNECT host:port)


def _redact_authority(authority: str) -> str:
    # Semconv: credentials in a URL become REDACTED:REDACTED.
    if "@" in authority:
        return "REDACTED:REDACTED@" + authority.rpartition("@")[2]
    return authority


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _b3_trace_id(value: str) -> int | None:
    value = value.strip()
    if _B3_ID_RE.fullmatch(value) is None:
        return None
    # 64-bit B3 trace ids are left-padded to 128 bits (B3 spec interop rule).
    tid = int(value, 16)
    return tid or None


def _b3_span_id(value: str) -> int | None:
    value = value.strip()
    if len(value) != 16 or _B3_ID_RE.fullmatch(value) is None:
        return None
    sid = int(value, 16)
    return sid or None


# W3C tracestate member grammar (the SDK's TraceState.from_header has the
# same rules but logs a warning per bad header: a hostile client could then
# flood the agent's log at its request rate).
_TRACESTATE_MEMBER_RE: Final = re.compile(
    r"([a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])"
)
_TRACESTATE_MAX_MEMBERS: Final = 32
_TRACESTATE_MAX_LENGTH: Final = 8192


def _parse_tracestate(value: str) -> str:
    """A valid tracestate as it goes on the wire, or "": W3C says drop it whole
    if any part is bad."""
    if len(value) > _TRACESTATE_MAX_LENGTH:
        return ""
    pairs: dict[str, str] = {}
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        m = _TRACESTATE_MEMBER_RE.fullmatch(member)
        if m is None or m.group(1) in pairs or len(pairs) >= _TRACESTATE_MAX_MEMBERS:
            return ""
        pairs[m.group(1)] = m.group(2)
    return ",".join(f"{k}={v}" for k, v in pairs.items())


def _remote_parent(
    traceparent: str | None,
    tracestate: str | None,
    b3: str | None,
    b3_trace: str | None,
    b3_span: str | None,
    b3_sampled: str | None = None,
    b3_flags: str | None = None,
) -> tuple[int | None, SpanContext | None, str]:
    """(trace id to join, parent context, tracestate) from W3C or B3 headers, if valid.

    Joining the caller's trace puts the network span inside the
    application's own trace in Jaeger. W3C wins over B3 when both are sent.
    """
    if traceparent is not None:
        m = _TRACEPARENT_RE.match(traceparent.strip())
        if m is not None:
            version, tid_hex, sid_hex, flags_hex = m.groups()
            rest = traceparent.strip()[m.end() :]
            # Version 00 has exactly four fields; later versions may add more.
            if version != "ff" and (rest == "" if version == "00" else rest[:1] in ("", "-")):
                tid = int(tid_hex, 16)
                sid = int(sid_hex, 16)
                if tid and sid:
                    state = _parse_tracestate(tracestate) if tracestate else ""
                    parent = SpanContext(
                        tid, sid, is_remote=True, trace_flags=TraceFlags(int(flags_hex, 16))
                    )
                    return tid, parent, state
    if b3 is not None:
        fields = b3.strip().split("-")
        if len(fields) >= 2:
            tid_b3 = _b3_trace_id(fields[0])
            sid_b3 = _b3_span_id(fields[1])
            if tid_b3 is not None and sid_b3 is not None:
                flags = b3_trace_flags(fields[2] if len(fields) >= 3 else None)
                return tid_b3, SpanContext(tid_b3, sid_b3, is_remote=True, trace_flags=flags), ""
    if b3_trace is not None:
        tid_b3 = _b3_trace_id(b3_trace)
        if tid_b3 is not None:
            sid_b3 = _b3_span_id(b3_span) if b3_span is not None else None
            if sid_b3 is None:
                # Only the trace id was recorded: still join the trace, as a
                # root, rather than scatter the session into a trace of its own.
                return tid_b3, None, ""
            flags = b3_trace_flags(b3_sampled, b3_flags)
            return tid_b3, SpanContext(tid_b3, sid_b3, is_remote=True, trace_flags=flags), ""
    return None, None, ""


def _header_key(cache: dict[str, str], prefix: str, name: str) -> str:
    key = cache.get(name)
    if key is None:
        key = prefix + _clean(name)
        # Header names come off the wire; bound the cache against a flood of
        # distinct names (only recorded headers reach us, but be safe).
        if len(cache) < _HEADER_KEY_CACHE_MAX:
            cache[name] = key
    return key


# Headers that already have a dedicated semconv attribute; repeating them as
# http.*.header.* would only cost encoding time.
_DEDICATED_HEADERS: Final = frozenset(("user-agent",))
_SKIPPED_HEADERS: Final = SENSITIVE_HEADERS | _DEDICATED_HEADERS


def _add_headers(
    attrs: dict[str, AttributeValue],
    headers: tuple[tuple[str, str], ...],
    cache: dict[str, str],
    prefix: str,
) -> None:
    for name, value in headers:
        if name in _SKIPPED_HEADERS:
            continue
        if not name.islower():
            # The parser lower-cases names; if one slips through, neither
            # the secret filter nor the semconv key may depend on that.
            name = name.lower()
            if name in _SKIPPED_HEADERS:
                continue
        key = _header_key(cache, prefix, name)
        existing = attrs.get(key)
        # Semconv: header attributes are string arrays, one entry per
        # occurrence of the header.
        if isinstance(existing, list):
            existing.append(_clean(value))
        else:
            attrs[key] = [_clean(value)]


def session_to_span(
    session: Session,
    *,
    resource: Resource,
    to_wall: Callable[[int], int],
    ids: IdGenerator,
    interface_names: Mapping[int, str] | None = None,
    sensitive_query_keys: frozenset[str] = DEFAULT_SENSITIVE_QUERY_KEYS,
    redact_all_query: bool = False,
) -> SpanRecord:
    """One finished span for one session.

    ``to_wall`` maps kernel CLOCK_MONOTONIC ns to epoch ns (see
    :class:`clovisor.clock.MonotonicToWall`); ``resource`` carries the pod's
    identity (service.name, k8s.*). ``interface_names`` maps ifindex to the
    veth name for ``clovisor.interface`` when the caller knows it.
    ``redact_all_query`` (``--redact-query all``) redacts every query value,
    not only the ``sensitive_query_keys`` ones.
    """
    attrs: dict[str, AttributeValue] = {}
    is_server = session.role is Role.SERVER
    req = session.request
    resp = session.response
    # An HTTP port's connection that turned out to be TLS names its own protocol.
    proto = session.protocol
    is_http = (
        proto == Protocol.HTTP or proto == Protocol.HTTP2 or proto == Protocol.GRPC
    ) and not session.protocol_name
    grpc_code = -1  # a gRPC stream's status code, once known
    grpc_message: str | None = None

    name = "TCP"
    scheme: str | None = None
    authority: str | None = None
    path: str | None = None
    query: str | None = None
    host_header: str | None = None
    traceparent = tracestate = b3 = b3_trace = b3_span = None
    b3_sampled = b3_flags = uber = None

    if is_http:
        name = "HTTP"
        if req is not None:
            method = req.method
            if not method:
                pass  # the request's header block was never captured
            elif method in KNOWN_METHODS:
                attrs["http.request.method"] = method
                name = method
            else:
                attrs["http.request.method"] = "_OTHER"
                attrs["http.request.method_original"] = _clean(method)
                # Semconv: unknown methods never become span names, which
                # would let any client blow up span-name cardinality.

            if req.target:
                scheme, authority, path, query = _split_target(_clean(req.target))
            if path is not None:
                path = _redact_path(path)
                attrs["url.path"] = path
            if query is not None:
                query = redact_query(query, sensitive_query_keys, all_values=redact_all_query)
                if query:
                    attrs["url.query"] = query
            attrs["url.scheme"] = scheme or "http"

            for hname, hvalue in req.headers:
                # Only the few names we act on; _add_headers copies them all.
                if hname == "host":
                    host_header = hvalue
                elif hname == "user-agent":
                    attrs["user_agent.original"] = _clean(hvalue)
                elif hname == "traceparent":
                    traceparent = hvalue
                elif hname == "tracestate":
                    tracestate = hvalue
                elif hname == "b3":
                    b3 = hvalue
                elif hname == "x-b3-traceid":
                    b3_trace = hvalue
                elif hname == "x-b3-spanid":
                    b3_span = hvalue
                elif hname == "x-b3-sampled":
                    b3_sampled = hvalue
                elif hname == "x-b3-flags":
                    b3_flags = hvalue
                elif hname == "uber-trace-id":
                    uber = hvalue
            _add_headers(attrs, req.headers, _req_header_keys, "http.request.header.")
            if req.body_size is not None:
                attrs["http.request.body.size"] = req.body_size
            if req.header_truncated:
                attrs["clovisor.request.header_truncated"] = True

        attrs["network.protocol.name"] = "http"
        version = req.version if req is not None else (resp.version if resp else None)
        if version:
            attrs["network.protocol.version"] = _clean(version)

        if resp is not None:
            if resp.status_code:  # 0: the status line was never captured
                attrs["http.response.status_code"] = resp.status_code
            _add_headers(attrs, resp.headers, _resp_header_keys, "http.response.header.")
            if resp.body_size is not None:
                attrs["http.response.body.size"] = resp.body_size
            if resp.header_truncated:
                attrs["clovisor.response.header_truncated"] = True

        if session.attributes:
            # HTTP/2 streams: rpc.* for gRPC, clovisor.http2.*.
            rpc_service = rpc_method = None
            for akey, avalue in session.attributes:
                if akey == "rpc.service":
                    rpc_service = avalue
                elif akey == "rpc.method":
                    rpc_method = avalue
                elif akey == "rpc.grpc.status_code" and isinstance(avalue, int):
                    grpc_code = avalue
                elif akey == "clovisor.grpc.message":
                    grpc_message = _clean(str(avalue))  # also the status description
                attrs[akey] = _clean(avalue) if isinstance(avalue, str) else avalue
            if attrs.get("rpc.system") == "grpc":
                attrs["rpc.system.name"] = "grpc"
                # Semconv: the span name is the full method, package.Service/Method.
                name = f"{rpc_service}/{rpc_method}" if rpc_service and rpc_method else "grpc"
                if 0 <= grpc_code < len(GRPC_CODES):
                    attrs["rpc.response.status_code"] = GRPC_CODES[grpc_code]
                elif grpc_code >= 0:
                    attrs["rpc.response.status_code"] = str(grpc_code)

    elif session.protocol_name:
        # A parser plugin's session: its protocol names the span.
        name = session.protocol_name
        attrs["network.protocol.name"] = session.protocol_name
        for akey, avalue in session.attributes:
            attrs[akey] = avalue

    client_addr = session.client_addr
    server_addr = session.server_addr
    attrs["client.address"] = client_addr
    attrs["client.port"] = session.client_port
    attrs["server.address"] = server_addr
    attrs["server.port"] = session.server_port
    # network.local.* would only repeat server.*/client.*; every attribute
    # costs ~2.5 µs in the SDK's OTLP encoder, so it is left out.
    if is_server:
        kind = SpanKind.SERVER
        attrs["network.peer.address"] = client_addr
        attrs["network.peer.port"] = session.client_port
    else:
        kind = SpanKind.CLIENT
        attrs["network.peer.address"] = server_addr
        attrs["network.peer.port"] = session.server_port
        if is_http and path is not None:
            # Semconv requires url.full on HTTP client spans. The host is the
            # proxy-form authority, else the Host header, else the address.
            host = authority or (_clean(host_header) if host_header else None)
            if not host:
                host = _hostport(server_addr, session.server_port)
            attrs["url.full"] = f"{scheme or 'http'}://{_redact_authority(host)}{path}" + (
                f"?{query}" if query else ""
            )
    attrs["network.transport"] = "tcp"
    family = session.family
    if family == 4:
        attrs["network.type"] = "ipv4"
    elif family == 6:
        attrs["network.type"] = "ipv6"

    outcome = session.outcome
    attrs["clovisor.outcome"] = outcome.value
    ifindex = session.ifindex
    ifname = interface_names.get(ifindex) if interface_names is not None else None
    # Always a string, so backends that index by type see one type per key.
    attrs["clovisor.interface"] = ifname if ifname is not None else str(ifindex)
    attrs["clovisor.request.packets"] = session.request_packets
    attrs["clovisor.request.bytes"] = session.request_bytes
    attrs["clovisor.response.packets"] = session.response_packets
    attrs["clovisor.response.bytes"] = session.response_bytes

    status = _UNSET
    message: str | None = None
    if grpc_code > 0 and (not is_server or grpc_code in GRPC_SERVER_ERRORS):
        code_name = attrs["rpc.response.status_code"]
        attrs["error.type"] = code_name
        status, message = _ERROR, grpc_message or str(code_name)
    elif grpc_code == 0:
        pass  # OK, whatever the outcome of the connection after the trailers
    elif is_http:
        code = resp.status_code if resp is not None else 0
        # Semconv: 5xx fails a server span; 4xx/5xx fail a client span (the
        # server is allowed to refuse, the client's operation still failed).
        if code >= 500 or (code >= 400 and not is_server):
            attrs["error.type"] = str(code)
            # No description: the status code already says it all (semconv).
            status = _ERROR
        elif outcome is not Outcome.COMPLETE:
            failed = _FAILED_OUTCOMES.get(outcome)
            if failed is not None:
                desc = failed[1] if resp is None else failed[2]
                if desc is not None:
                    if outcome is Outcome.RESET and "clovisor.http2.stream_id" in attrs:
                        desc = desc.replace("connection", "stream")  # RST_STREAM
                    attrs["error.type"] = failed[0]
                    status, message = _ERROR, desc
    elif outcome is Outcome.RESET:
        # A raw TCP connection ends by FIN, idle or our shutdown normally;
        # only a reset is abnormal.
        attrs["error.type"] = "reset"
        status, message = _ERROR, "connection reset"

    parent: SpanContext | None = None
    trace_id: int | None = None
    state = ""
    if traceparent is not None or b3 is not None or b3_trace is not None:
        trace_id, parent, state = _remote_parent(
            traceparent, tracestate, b3, b3_trace, b3_span, b3_sampled, b3_flags
        )
    if trace_id is None and uber is not None:
        trace_id, parent = jaeger_parent(uber)
    if trace_id is None:
        trace_id = ids.generate_trace_id()
    start = to_wall(session.start_ns)
    end = to_wall(session.end_ns)
    return SpanRecord(
        name,
        kind,
        trace_id,
        ids.generate_span_id(),
        parent,
        state,
        start,
        # A span must not end before it starts, whatever the core reported.
        end if end >= start else start,
        attrs,
        status,
        message,
        resource,
    )


_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)


def to_readable_span(record: SpanRecord, scope: InstrumentationScope = SCOPE) -> ReadableSpan:
    """The SDK's view of a record: what ``encode_spans`` and SDK exporters take.

    Off the hot path (the encoders write OTLP from the record itself); it is
    the bridge to the SDK's reference encoders the tests compare against.
    """
    state = (
        TraceState([tuple(m.split("=", 1)) for m in record.trace_state.split(",")])  # type: ignore[misc]
        if record.trace_state
        else None
    )
    context = SpanContext(
        record.trace_id, record.span_id, is_remote=False, trace_flags=_SAMPLED, trace_state=state
    )
    return ReadableSpan(
        name=record.name,
        context=context,
        parent=record.parent,
        resource=record.resource,
        attributes=record.attributes,
        kind=record.kind,
        status=Status(record.status_code, record.status_message),
        start_time=record.start_time,
        end_time=record.end_time,
        instrumentation_scope=scope,
    )
