"""Flag strings: ports and egress rules with their declared protocols."""

from __future__ import annotations

import ipaddress

import pytest

from clovisor.core.events import Protocol
from clovisor.specs import EgressSpec, PortSpec, SpecError, parse_egress, parse_port


@pytest.mark.parametrize(
    ("text", "protocol"),
    [
        ("8080", Protocol.HTTP),
        ("8080:http", Protocol.HTTP),
        ("8080:tcp", Protocol.TCP),
        ("50051:grpc", Protocol.GRPC),
        ("8080:http2", Protocol.HTTP2),
        ("8080:HTTP2", Protocol.HTTP2),
    ],
)
def test_port_protocols(text: str, protocol: Protocol) -> None:
    assert parse_port(text) == PortSpec(port=int(text.split(":")[0]), protocol=protocol)


@pytest.mark.parametrize("text", ["8080:h3", "8080:", "0:grpc", "x:grpc"])
def test_bad_ports(text: str) -> None:
    with pytest.raises(SpecError):
        parse_port(text)


def test_egress_protocol_on_the_cli_and_pod_prefix_in_redis() -> None:
    addr = ipaddress.ip_address("10.200.0.10")
    assert parse_egress("10.200.0.10:50051:grpc") == EgressSpec(
        addr=addr, port=50051, protocol=Protocol.GRPC
    )
    assert parse_egress("[fd00:200::a]:80:http2").protocol == Protocol.HTTP2
    assert parse_egress("0:80").protocol == Protocol.HTTP
    # In Redis the third field is a pod name prefix, never a protocol.
    redis = parse_egress("10.200.0.10:50051:grpc", allow_prefix=True)
    assert (redis.protocol, redis.pod_prefix) == (Protocol.HTTP, "grpc")
    for bad in ("10.200.0.10:80:nope", "10.200.0.10:80:"):
        with pytest.raises(SpecError, match="egress"):
            parse_egress(bad)
    with pytest.raises(SpecError, match="pod prefix"):
        parse_egress("10.200.0.10:80:", allow_prefix=True)
