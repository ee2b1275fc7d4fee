"""Python mirrors of ``bpf/clovisor.h`` and the ring buffer record decoder.

The ctypes structures are for the control path (map keys and values, load
settings); the decoder is the hot path and uses one precompiled
:class:`struct.Struct` instead, because a ctypes field access costs several
times a ``unpack_from`` of the whole header. ``tests/kernel/test_abi.py``
proves that both agree with the C layout and with the object's BTF.
"""

from __future__ import annotations

import ctypes
import enum
import mmap
import struct

from ..core.events import Direction, Protocol, Role, Segment
from .errors import KernelError

CLV_CAPTURE_MAX = 8192
CLV_TAIL_LEN = 16

CLV_EV_SEGMENT = 1

CLV_DIR_REQUEST = 0
CLV_DIR_RESPONSE = 1

CLV_ROLE_SERVER = 1
CLV_ROLE_CLIENT = 2

CLV_PROTO_TCP = 1
CLV_PROTO_HTTP = 2
CLV_PROTO_HTTP2 = 3
CLV_PROTO_GRPC = 4

CLV_HOOK_INGRESS = 0
CLV_HOOK_EGRESS = 1

CLV_TCP_FIN = 0x01
CLV_TCP_SYN = 0x02
CLV_TCP_RST = 0x04
CLV_TCP_PSH = 0x08
CLV_TCP_ACK = 0x10

CLV_PORT_WORDS = 1024

CLV_H2_FRAMES_MAX = 256
CLV_H2_PEEK = 48

CLV_WAKEUP_NEVER = 0xFFFFFFFF

CLV_EGRESS_ANY = 0x01
CLV_EGRESS_V4 = 0x02
CLV_EGRESS_V6 = 0x04


class Counter(enum.IntEnum):
    """enum clv_counter: indexes of the per-CPU ``counters`` array."""

    PACKETS = 0
    MATCHED = 1
    EVENTS = 2
    LOST = 3
    MALFORMED = 4


CLV_CNT__MAX = len(Counter)

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class clv_segment(ctypes.Structure):
    _fields_ = [
        ("type", _u8),
        ("dir", _u8),
        ("role", _u8),
        ("proto", _u8),
        ("family", _u8),
        ("tcp_flags", _u8),
        ("hook", _u8),
        ("tail_len", _u8),
        ("ts_ns", _u64),
        ("ifindex", _u32),
        ("seq", _u32),
        ("ack", _u32),
        ("payload_len", _u32),
        ("saddr", _u8 * 16),
        ("daddr", _u8 * 16),
        ("sport", _u16),
        ("dport", _u16),
        ("cap_len", _u16),
        ("gso_segs", _u16),
        ("tail", _u8 * CLV_TAIL_LEN),
    ]


class clv_h2_frame(ctypes.Structure):
    _fields_ = [
        ("offset", _u32),
        ("head", _u8 * 9),
        ("peek_len", _u8),
        ("pad", _u8 * 2),
        ("peek", _u8 * CLV_H2_PEEK),
    ]


class clv_h2_key(ctypes.Structure):
    _fields_ = [
        ("ifindex", _u32),
        ("sport", _u16),
        ("dport", _u16),
        ("saddr", _u8 * 16),
        ("daddr", _u8 * 16),
    ]


class clv_h2_state(ctypes.Structure):
    _fields_ = [
        ("next_seq", _u32),
        ("have", _u8),
        ("pad", _u8 * 3),
        ("part", _u8 * 8),
    ]


class clv_port_key(ctypes.Structure):
    _fields_ = [
        ("ifindex", _u32),
        ("port", _u16),
        ("pad", _u16),
    ]


class clv_egress_key(ctypes.Structure):
    _fields_ = [
        ("ifindex", _u32),
        ("port", _u16),
        ("family", _u8),
        ("pad", _u8),
        ("addr", _u8 * 16),
    ]


class clv_match(ctypes.Structure):
    _fields_ = [
        ("proto", _u8),
        ("egress", _u8),
        ("pad", _u8 * 2),
    ]


class clv_settings(ctypes.Structure):
    _fields_ = [
        ("capture_bytes", _u32),
        ("wakeup_bytes", _u32),
    ]


# Every structure of the header, for the layout tests.
STRUCTS: tuple[type[ctypes.Structure], ...] = (
    clv_segment,
    clv_port_key,
    clv_egress_key,
    clv_match,
    clv_settings,
    clv_h2_frame,
    clv_h2_key,
    clv_h2_state,
)

# The fixed part of clv_segment, field for field (little-endian: BPF runs in
# the host's byte order and every supported host is little-endian).
SEGMENT_HEADER = struct.Struct("<8BQ4I16s16s4H16s")
SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size
# The same, as the decoder reads it: an IPv4 record's addresses are the first
# 4 of their 16 bytes, and the tail is sliced only when there is one.
_HEADER_V4 = struct.Struct("<8BQ4I4s12x4s12x4H16x")
_HEADER_V6 = struct.Struct("<8BQ4I16s16s4H16x")
_FAMILY_OFFSET = 4
_TAIL_OFFSET = SEGMENT_HEADER_SIZE - CLV_TAIL_LEN
assert _HEADER_V4.size == _HEADER_V6.size == SEGMENT_HEADER_SIZE


class MalformedRecord(KernelError):
    """A ring buffer record that is not a clv_segment as this ABI defines it."""


# Enum members looked up by value once, not constructed per record.
_DIRECTIONS = {d.value: d for d in Direction}
_ROLES = {r.value: r for r in Role}
_PROTOCOLS = {p.value: p for p in Protocol}
_FIRST_PLUGIN_ID = max(_PROTOCOLS) + 1

# What decode_at reads from: bytes, or the ring's mapped memory, both of
# which slice to bytes.
RecordSource = bytes | mmap.mmap


def decode_segment(buf: bytes | bytearray | memoryview) -> Segment:
    """Decode one ring buffer record; :class:`MalformedRecord` if it is not one."""
    data = buf if type(buf) is bytes else bytes(buf)
    return decode_at(data, 0, len(data))


def decode_at(buf: RecordSource, off: int, size: int) -> Segment:
    """Decode the ``size``-byte record at ``buf[off:]`` (the hot path).

    Measured here (2 vCPUs, shared): about 1 µs per record, of which the
    Segment tuple is about half (``tests/kernel/test_abi.py`` prints it).
    """
    if size < SEGMENT_HEADER_SIZE:
        raise MalformedRecord(f"record of {size} bytes, header needs {SEGMENT_HEADER_SIZE}")
    family = buf[off + _FAMILY_OFFSET]
    if family == 4:
        header = _HEADER_V4
    elif family == 6:
        header = _HEADER_V6
    else:
        raise MalformedRecord(f"address family {family}")
    (
        rtype, rdir, role, proto, _family, flags, _hook, tail_len,
        ts_ns, ifindex, seq, ack, payload_len,
        saddr, daddr, sport, dport, cap_len, gso_segs,
    ) = header.unpack_from(buf, off)  # fmt: skip
    direction = _DIRECTIONS.get(rdir)
    role_ = _ROLES.get(role)
    # Built-in protocols decode to their enum member; plugin ids (5-255) stay ints.
    protocol = _PROTOCOLS.get(proto) or (proto if proto >= _FIRST_PLUGIN_ID else None)
    if (
        rtype != CLV_EV_SEGMENT
        or SEGMENT_HEADER_SIZE + cap_len > size
        or cap_len > payload_len
        or tail_len > CLV_TAIL_LEN
        or direction is None
        or role_ is None
        or protocol is None
    ):
        raise MalformedRecord(
            f"bad record: type={rtype} size={size} cap_len={cap_len} payload_len={payload_len}"
            f" tail_len={tail_len} dir={rdir} role={role} proto={proto}"
        )
    start = off + SEGMENT_HEADER_SIZE
    if size > SEGMENT_HEADER_SIZE + cap_len:
        # HTTP/2 frame headers the capture missed follow the payload.
        end = start + cap_len
        return Segment(
            ts_ns, ifindex, role_, direction, protocol, family,
            saddr, daddr, sport, dport, seq, ack, flags, payload_len,
            buf[start:end] if cap_len else b"",
            buf[off + _TAIL_OFFSET : off + _TAIL_OFFSET + tail_len] if tail_len else b"",
            gso_segs or 1, buf[end : off + size],
        )  # fmt: skip
    return Segment(
        ts_ns, ifindex, role_, direction, protocol, family,
        saddr, daddr, sport, dport, seq, ack, flags, payload_len,
        buf[start : start + cap_len] if cap_len else b"",
        buf[off + _TAIL_OFFSET : off + _TAIL_OFFSET + tail_len] if tail_len else b"",
        gso_segs or 1,
    )  # fmt: skip
