"""Parsing of the user's configuration strings (flags now, Redis values later).

Every parser is strict and raises :class:`SpecError` with one line that
names the offending value; callers decide whether that ends the program (the
CLI: exit code 2) or skips the entry (the agent: logged, the rest applies).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .core.events import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS = {
    "http": Protocol.HTTP,
    "tcp": Protocol.TCP,
    "http2": Protocol.HTTP2,
    "grpc": Protocol.GRPC,
}
DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
# Kubernetes object names (pods, nodes) and label key prefixes.
DNS_SUBDOMAIN = re.compile(
    r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
)


class SpecError(ValueError):
    """A configuration string that does not parse."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PortSpec:
    port: int
    protocol: int  # a Protocol member, or a parser plugin's kernel id


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressSpec:
    addr: IPAddress | None  # None: any address (the original's "0")
    port: int
    protocol: int = Protocol.HTTP
    pod_prefix: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSpec:
    """Where spans go. ``kind`` and what ``target`` holds for it:

    - ``console``: nothing;
    - ``json``: a file path, or ``-`` for stdout (one flat JSON object per session);
    - ``otlp-json``: a file path, or ``-`` for stdout;
    - ``otlp-grpc``: ``http://HOST:PORT`` (plaintext) or ``https://HOST:PORT``
      (TLS), the form ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes for gRPC;
    - ``otlp-http``: the full URL POSTed to, e.g. ``http://HOST:4318/v1/traces``;
    - ``otlp``: nothing; endpoint and protocol come from the standard
      ``OTEL_EXPORTER_OTLP_*`` environment variables.
    """

    kind: str
    target: str = ""


def parse_port_number(text: str, what: str = "port") -> int:
    if not text.isdigit():
        raise SpecError(f"{what} {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise SpecError(f"{what} {port} is out of range 1-65535")
    return port


def parse_protocol(text: str) -> Protocol:
    proto = PROTOCOLS.get(text.lower())
    if proto is None:
        known = ", ".join(sorted(PROTOCOLS))
        raise SpecError(f"unknown protocol {text!r} (known: {known})")
    return proto


def parse_port(text: str) -> PortSpec:
    """``PORT[:PROTOCOL]``, protocol ``http`` by default."""
    port_s, sep, proto_s = text.partition(":")
    proto = parse_protocol(proto_s) if sep else Protocol.HTTP
    return PortSpec(port=parse_port_number(port_s.strip(), "port"), protocol=proto)


def parse_address(text: str) -> IPAddress | None:
    """An IPv4/IPv6 address; ``0`` (the original's wildcard) is any address."""
    if text in ("0", "*", ""):
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise SpecError(f"{text!r} is not an IP address (use 0 for any address)") from None
    if addr.is_unspecified:
        return None
    return addr


def parse_egress(text: str, *, allow_prefix: bool = False) -> EgressSpec:
    """``IP:PORT[:PROTOCOL]`` (``0:PORT`` = any address; ``[v6]:PORT`` for IPv6).

    The protocol is ``http`` by default. With ``allow_prefix`` (Redis
    ``clovisor_egress_match``), the optional third field is ``:POD_PREFIX``
    instead, which limits the rule to pods whose name starts with it.
    """
    rest = text.strip()
    if rest.startswith("["):
        addr_s, bracket, rest = rest[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise SpecError(f"egress {text!r}: expected [IPv6]:PORT")
        rest = rest[1:]
    else:
        addr_s, sep, rest = rest.partition(":")
        if not sep:
            raise SpecError(f"egress {text!r}: expected IP:PORT")
    port_s, sep, third = rest.partition(":")
    if sep and not third:
        what = "pod prefix" if allow_prefix else "protocol"
        raise SpecError(f"egress {text!r}: empty {what}")
    try:
        addr = parse_address(addr_s)
        port = parse_port_number(port_s, "port")
        proto = parse_protocol(third) if sep and not allow_prefix else Protocol.HTTP
    except SpecError as exc:
        raise SpecError(f"egress {text!r}: {exc}") from None
    return EgressSpec(addr=addr, port=port, protocol=proto,
                      pod_prefix=third if allow_prefix else "")


# Scheme of an ``otlp:`` output -> (kind, scheme of the target URL, default port).
_OTLP_SCHEMES = {
    "grpc": ("otlp-grpc", "http", 4317),
    "grpcs": ("otlp-grpc", "https", 4317),
    "http": ("otlp-http", "http", 4318),
    "https": ("otlp-http", "https", 4318),
}
OTLP_HTTP_PATH = "/v1/traces"
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_OUTPUT_FORMS = (
    "console, json[:PATH], otlp-json:PATH, otlp:grpc://HOST:PORT, otlp:http://HOST:PORT[/PATH], "
    "otlp:grpcs://... or otlp:https://... for TLS, or otlp (endpoint from OTEL_EXPORTER_OTLP_*)"
)


def _parse_otlp_target(text: str, url: str) -> OutputSpec:
    scheme, sep, rest = url.partition("://")
    known = _OTLP_SCHEMES.get(scheme.lower()) if sep else None
    if known is None:
        raise SpecError(
            f"output {text!r}: expected otlp:grpc://HOST:PORT or otlp:http://HOST:PORT "
            f"(grpcs/https for TLS)"
        )
    kind, target_scheme, default_port = known
    if not rest:
        raise SpecError(f"output {text!r}: missing host")
    if any(c.isspace() for c in rest):
        raise SpecError(f"output {text!r}: blank space in the endpoint")
    if any(c in rest for c in "?#"):
        raise SpecError(f"output {text!r}: no query or fragment allowed in an OTLP endpoint")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        # A password in a flag ends up in ps output and logs: headers are the
        # place for credentials.
        raise SpecError(
            f"output {text!r}: no user info in the URL; "
            f"put credentials in OTEL_EXPORTER_OTLP_HEADERS"
        )
    if authority.startswith("["):
        host, bracket, port_part = authority[1:].partition("]")
        if not bracket:
            raise SpecError(f"output {text!r}: unclosed [ in IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SpecError(f"output {text!r}: {host!r} is not an IPv6 address") from None
        host = f"[{host}]"
    else:
        host, colon, port_part = authority.partition(":")
        port_part = colon + port_part
        if not host:
            raise SpecError(f"output {text!r}: missing host")
        if not _HOST_RE.fullmatch(host):
            raise SpecError(f"output {text!r}: {host!r} is not a host name or IPv4 address")
    if port_part:
        if not port_part.startswith(":"):
            raise SpecError(f"output {text!r}: expected :PORT after the host")
        try:
            port = parse_port_number(port_part[1:], "port")
        except SpecError as exc:
            raise SpecError(f"output {text!r}: {exc}") from None
    else:
        port = default_port
    if kind == "otlp-grpc":
        if path.strip("/"):
            raise SpecError(f"output {text!r}: a gRPC endpoint has no path")
        return OutputSpec(kind=kind, target=f"{target_scheme}://{host}:{port}")
    # OTLP/HTTP: a bare host gets the standard signal path; any other path is
    # taken as given (a gateway may route traces elsewhere).
    full_path = "/" + path if slash and path else OTLP_HTTP_PATH
    return OutputSpec(kind=kind, target=f"{target_scheme}://{host}:{port}{full_path}")


def parse_output(text: str) -> OutputSpec:
    """One ``--output`` value.

    ``console``; ``json[:PATH]`` (one flat JSON object per session, stdout
    by default); ``otlp-json:PATH`` (``-`` is stdout); ``otlp:grpc://HOST:PORT``
    or ``otlp:http://HOST:PORT[/PATH]`` (``grpcs``/``https`` for TLS; the port
    defaults to 4317/4318, the OTLP/HTTP path to ``/v1/traces``); ``otlp``
    alone takes endpoint and protocol from ``OTEL_EXPORTER_OTLP_*``.
    """
    kind, sep, target = text.partition(":")
    if kind == "console" and not sep:
        return OutputSpec(kind="console")
    if kind == "json":
        if sep and not target:
            raise SpecError(f"output {text!r}: json: needs a path (or - for stdout)")
        return OutputSpec(kind="json", target=target or "-")
    if kind == "otlp-json":
        if not target:
            raise SpecError(f"output {text!r}: otlp-json needs a path (or - for stdout)")
        return OutputSpec(kind="otlp-json", target=target)
    if kind == "otlp":
        if not sep:
            return OutputSpec(kind="otlp")
        return _parse_otlp_target(text, target)
    raise SpecError(f"unknown output {text!r} (use {_OUTPUT_FORMS})")


def parse_resource_attr(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"resource attribute {text!r}: expected KEY=VALUE")
    return key.strip(), value


def check_namespace(text: str) -> str:
    """A Kubernetes namespace name (a DNS-1123 label)."""
    if len(text) > 63 or not DNS_LABEL.fullmatch(text):
        raise SpecError(f"namespace {text!r} is not a valid DNS-1123 label")
    return text


def parse_pod_ref(text: str) -> tuple[str, str]:
    """``NAMESPACE/NAME`` (``clovisor trace --pod``) -> (namespace, name)."""
    namespace, slash, name = text.strip().partition("/")
    if not slash or not name:
        raise SpecError(f"pod {text!r}: expected NAMESPACE/NAME")
    try:
        check_namespace(namespace)
    except SpecError as exc:
        raise SpecError(f"pod {text!r}: {exc}") from None
    if len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        raise SpecError(f"pod {text!r}: {name!r} is not a valid pod name")
    return namespace, name
