"""Session builders shared by the export tests."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

from clovisor.core.events import HttpRequest, HttpResponse, Outcome, Protocol, Role, Session
from clovisor.export.ids import FastIdGenerator
from clovisor.export.record import SpanRecord
from clovisor.export.spans import session_to_span

# Monotonic -> wall: a fixed offset so expected times are exact.
OFFSET = 1_795_000_000_000_000_000
RESOURCE = Resource(
    {"service.name": "web", "k8s.pod.name": "web-0", "k8s.namespace.name": "default"}
)


def to_wall(mono_ns: int) -> int:
    return mono_ns + OFFSET


def request(
    method: str = "GET",
    target: str = "/index.html?x=1",
    *,
    version: str = "1.1",
    headers: tuple[tuple[str, str], ...] = (("host", "10.200.0.2"),),
    body_size: int | None = 0,
) -> HttpRequest:
    return HttpRequest(
        method=method, target=target, version=version, headers=headers, body_size=body_size
    )


def response(
    status: int = 200,
    reason: str = "OK",
    *,
    headers: tuple[tuple[str, str], ...] = (),
    body_size: int | None = 1500,
) -> HttpResponse:
    return HttpResponse(
        status_code=status, reason=reason, version="1.1", headers=headers, body_size=body_size
    )


def session(**overrides: Any) -> Session:
    fields: dict[str, Any] = {
        "role": Role.SERVER,
        "protocol": Protocol.HTTP,
        "ifindex": 7,
        "family": 4,
        "client_addr": "10.200.1.2",
        "client_port": 51234,
        "server_addr": "10.200.0.2",
        "server_port": 80,
        "start_ns": 1_000_000_000,
        "end_ns": 1_012_300_000,
        "outcome": Outcome.COMPLETE,
        "request": request(),
        "response": response(),
        "request_packets": 1,
        "request_bytes": 78,
        "response_packets": 2,
        "response_bytes": 1600,
    }
    fields.update(overrides)
    return Session(**fields)


def span(s: Session | None = None, **kwargs: Any) -> SpanRecord:
    kwargs.setdefault("resource", RESOURCE)
    kwargs.setdefault("to_wall", to_wall)
    kwargs.setdefault("ids", FastIdGenerator(seed=1))
    return session_to_span(s if s is not None else session(), **kwargs)


def record(
    attributes: dict[str, Any] | None = None,
    *,
    trace_id: int = 0x4BF92F3577B34DA6A3CE929D0E0E4736,
    span_id: int = 0x1122334455667788,
    parent: SpanContext | None = None,
    trace_state: str = "",
    kind: SpanKind = SpanKind.CLIENT,
    status: StatusCode = StatusCode.UNSET,
    message: str | None = None,
    resource: Resource = RESOURCE,
) -> SpanRecord:
    """A span record made by hand, for shapes no session gives."""
    return SpanRecord(
        "op", kind, trace_id, span_id, parent, trace_state, 1, 2,
        attributes if attributes is not None else {}, status, message, resource,
    )  # fmt: skip
