"""Parsing of the user's configuration strings (flags now, Redis values later).

Every parser is strict and raises :class:`SpecError` with one line that
names the offending value; callers decide whether that ends the program (the
CLI: exit code 2) or skips the entry (the agent: logged, the rest applies).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .core.events import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS = {"http": Protocol.HTTP, "tcp": Protocol.TCP}


class SpecError(ValueError):
    """A configuration string that does not parse."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PortSpec:
    port: int
    protocol: Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressSpec:
    addr: IPAddress | None  # None: any address (the original's "0")
    port: int
    protocol: Protocol = Protocol.HTTP
    pod_prefix: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSpec:
    kind: str  # "console" or "otlp-json"
    target: str = ""  # file path or "-" for otlp-json


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
    """``IP:PORT`` (``0:PORT`` = any address; ``[v6]:PORT`` for IPv6).

    With ``allow_prefix`` (Redis ``clovisor_egress_match``), an optional
    third field ``:POD_PREFIX`` limits the rule to pods whose name starts
    with it.
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
    port_s, sep, prefix = rest.partition(":")
    if sep and not allow_prefix:
        raise SpecError(f"egress {text!r}: expected IP:PORT")
    if sep and not prefix:
        raise SpecError(f"egress {text!r}: empty pod prefix")
    try:
        addr = parse_address(addr_s)
        port = parse_port_number(port_s, "port")
    except SpecError as exc:
        raise SpecError(f"egress {text!r}: {exc}") from None
    return EgressSpec(addr=addr, port=port, pod_prefix=prefix)


def parse_output(text: str) -> OutputSpec:
    """``console`` or ``otlp-json:PATH`` (``-`` is stdout)."""
    kind, sep, target = text.partition(":")
    if kind == "console" and not sep:
        return OutputSpec(kind="console")
    if kind == "otlp-json":
        if not target:
            raise SpecError(f"output {text!r}: otlp-json needs a path (or - for stdout)")
        return OutputSpec(kind="otlp-json", target=target)
    raise SpecError(f"unknown output {text!r} (use console or otlp-json:PATH)")


def parse_resource_attr(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"resource attribute {text!r}: expected KEY=VALUE")
    return key.strip(), value
