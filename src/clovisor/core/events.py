"""The data that crosses the core's boundary: segments in, sessions out.

Timestamps are kernel CLOCK_MONOTONIC nanoseconds; converting them to wall
clock is the runtime's job, never the core's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class Role(enum.IntEnum):
    """Which side of the exchange the traced workload is (clv_role)."""

    SERVER = 1
    CLIENT = 2


class Direction(enum.IntEnum):
    """Which half of the connection a segment belongs to (clv_dir)."""

    REQUEST = 0
    RESPONSE = 1


class Protocol(enum.IntEnum):
    """What the core parses on a flow (clv_proto)."""

    TCP = 1
    HTTP = 2  # HTTP/1.x (and HTTP/2 after the preface or an h2c upgrade)
    HTTP2 = 3  # a port declared HTTP/2 (h2c, prior knowledge)
    GRPC = 4  # a port declared gRPC: HTTP/2 whose streams are RPCs


# TCP flag bits as in clv_segment.tcp_flags.
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10


class Segment(NamedTuple):
    """One TCP segment of a traced flow, as the classifier reported it.

    ``payload`` is a prefix of the segment's payload (at most the capture
    length); ``payload_len`` is the real length, so byte accounting works by
    sequence numbers even when most of the payload never crossed to user
    space. ``tail`` holds the last bytes of the payload when the prefix does
    not reach them (empty otherwise). ``frames``: on flows of ports declared
    HTTP/2 or gRPC, the HTTP/2 frame headers the prefix does not hold whole,
    as the classifier found them (``clv_h2_frame`` records; see
    :func:`clovisor.core.h2frames.frame_hints`).

    A NamedTuple rather than a frozen dataclass: one is built per ring-buffer
    record, and on the reference machine a frozen 17-field dataclass costs
    3.4 µs to construct against 0.5 µs for this immutable tuple.
    """

    ts_ns: int
    ifindex: int
    role: Role
    direction: Direction
    protocol: int  # a Protocol member, or a parser plugin's id (5-255)
    family: int  # 4 or 6
    saddr: bytes  # 4 or 16 bytes
    daddr: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload_len: int
    payload: bytes = b""
    tail: bytes = b""
    packets: int = 1  # wire packets this segment stands for (GSO)
    frames: bytes = b""


class Phase(enum.IntEnum):
    """Where an exchange held in the kernel stands (clv_phase); COMPLETE once paired."""

    COMPLETE = 0
    REQUEST = 1  # request head seen, body bytes to come
    WAIT = 2  # request complete, no response yet
    RESPONSE = 3  # response head seen, body bytes to come


class Exchange(NamedTuple):
    """An HTTP/1.x exchange the classifier paired itself (a clv_exchange record).

    ``request_head`` and ``response_head`` are the whole header blocks; bytes
    and packets are counted by sequence number like a :class:`Segment`'s.
    ``phase`` is COMPLETE for a ring record; an exchange still held in the
    kernel (read for the idle timeout or at shutdown) says how far it got.
    """

    start_ns: int  # first request byte
    end_ns: int  # last response byte (held: the last segment so far)
    ifindex: int
    role: Role
    family: int
    client_addr: bytes  # 4 or 16 bytes
    client_port: int
    server_addr: bytes
    server_port: int
    method: int  # clv_method: 0 none, 1 GET, 2 HEAD, 3 POST, 4 PUT, 5 DELETE, ...
    status: int  # 0: no response head
    req_seq: int  # sequence number of the first request byte
    req_ack: int  # the ack number the request carried
    request_bytes: int
    request_packets: int
    response_bytes: int
    response_packets: int
    request_head: bytes
    response_head: bytes = b""
    phase: Phase = Phase.COMPLETE


class Handover(NamedTuple):
    """The classifier stopped pairing a connection (a clv_handover record).

    Its segments follow, from the boundaries given here: the first byte of
    the pending (or next) message of each direction, None where unknown.
    """

    ts_ns: int
    ifindex: int
    role: Role
    family: int
    client_addr: bytes
    client_port: int
    server_addr: bytes
    server_port: int
    reason: int  # clv_handover_reason
    req_seq: int | None
    resp_seq: int | None
    at_start: bool = False  # req_seq is the connection's first byte (its SYN was seen)


# What the ring carries, and the tracker takes.
Record = Segment | Exchange | Handover


class Outcome(enum.Enum):
    """How a session ended."""

    COMPLETE = "complete"  # a full response was seen
    RESET = "reset"  # the connection was reset before the response ended
    CLOSED = "closed"  # closed (FIN) before a complete response
    TIMEOUT = "timeout"  # no progress for the idle timeout
    SHUTDOWN = "shutdown"  # the tracer stopped while it was pending


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequest:
    method: str
    target: str  # the request-target as sent (path and query)
    version: str  # "1.0" or "1.1"
    headers: tuple[tuple[str, str], ...]  # recorded headers, names lower-case
    body_size: int | None  # bytes on the wire after the header block
    header_truncated: bool = False  # header block not fully captured


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpResponse:
    status_code: int
    reason: str
    version: str
    headers: tuple[tuple[str, str], ...]
    body_size: int | None
    header_truncated: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """One request/response exchange (HTTP) or one connection (TCP).

    Parser plugins fill ``protocol_name`` and ``attributes`` (low-cardinality
    names; the exporter adds them to the span as they are).
    """

    role: Role
    protocol: int  # a Protocol member, or a parser plugin's id
    ifindex: int
    family: int
    client_addr: str
    client_port: int
    server_addr: str
    server_port: int
    start_ns: int  # first request byte seen
    end_ns: int  # last response byte seen (or when the outcome was decided)
    outcome: Outcome
    request: HttpRequest | None = None
    response: HttpResponse | None = None
    request_packets: int = 0
    request_bytes: int = 0
    response_packets: int = 0
    response_bytes: int = 0
    protocol_name: str = ""
    attributes: tuple[tuple[str, str | int | float | bool], ...] = ()
