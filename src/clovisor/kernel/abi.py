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

from ..core.events import Direction, Exchange, Handover, Phase, Protocol, Record, Role, Segment
from .errors import KernelError

CLV_CAPTURE_MAX = 8192
CLV_TAIL_LEN = 16

CLV_EV_SEGMENT = 1
CLV_EV_EXCHANGE = 2
CLV_EV_HANDOVER = 3

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

CLV_MODE_PAIRED = 1
CLV_MODE_SEGMENTS = 2
CLV_MODE_DEAD = 3

CLV_SYNC_REQUEST = 0x01
CLV_SYNC_RESPONSE = 0x02
CLV_SYNC_START = 0x04

CLV_RESP_HEAD_MAX = 672
CLV_REQ_HEAD_MAX = 1024
CLV_SCAN_SLACK = 32
CLV_HELD_BYTES = CLV_REQ_HEAD_MAX + CLV_RESP_HEAD_MAX + CLV_SCAN_SLACK
CLV_BODY_MAX = 1 << 30

CLV_CONN_RESP_KNOWN = 0x01
CLV_CONN_FIN_REQ = 0x02
CLV_CONN_FIN_RESP = 0x04
CLV_CONN_AT_START = 0x08

CLV_RED_BUCKETS = 15


class Method(enum.IntEnum):
    """enum clv_method: the request methods the classifier pairs."""

    NONE = 0
    GET = 1
    HEAD = 2
    POST = 3
    PUT = 4
    DELETE = 5
    OPTIONS = 6
    PATCH = 7
    TRACE = 8


class HandoverReason(enum.IntEnum):
    """enum clv_handover_reason."""

    REQUEST = 1
    RESPONSE = 2
    PIPELINE = 3
    EARLY = 4
    ORDER = 5
    END = 6
    REUSE = 7
    CONTENDED = 8


CLV_HO__MAX = len(HandoverReason) + 1


class Counter(enum.IntEnum):
    """enum clv_counter: indexes of the per-CPU ``counters`` array."""

    PACKETS = 0
    MATCHED = 1
    EVENTS = 2
    LOST = 3
    MALFORMED = 4
    EXCHANGES = 5
    SHED = 6
    HANDOVERS = 7
    HO_REQUEST = 8
    HO_RESPONSE = 9
    HO_PIPELINE = 10
    HO_EARLY = 11
    HO_ORDER = 12
    HO_END = 13
    HO_REUSE = 14
    HO_CONTENDED = 15


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
        ("pair_http", _u32),
        ("shed_bytes", _u32),
    ]


class clv_exchange(ctypes.Structure):
    _fields_ = [
        ("type", _u8),
        ("role", _u8),
        ("family", _u8),
        ("method", _u8),
        ("phase", _u8),
        ("pad", _u8),
        ("status", _u16),
        ("req_head_len", _u16),
        ("resp_head_len", _u16),
        ("cport", _u16),
        ("sport", _u16),
        ("ifindex", _u32),
        ("req_seq", _u32),
        ("req_ack", _u32),
        ("req_packets", _u32),
        ("resp_packets", _u32),
        ("pad2", _u32),
        ("start_ns", _u64),
        ("end_ns", _u64),
        ("req_bytes", _u64),
        ("resp_bytes", _u64),
        ("caddr", _u8 * 16),
        ("saddr", _u8 * 16),
    ]


class clv_handover(ctypes.Structure):
    _fields_ = [
        ("type", _u8),
        ("role", _u8),
        ("family", _u8),
        ("reason", _u8),
        ("synced", _u8),
        ("pad", _u8),
        ("cport", _u16),
        ("sport", _u16),
        ("pad2", _u16),
        ("ifindex", _u32),
        ("req_seq", _u32),
        ("resp_seq", _u32),
        ("ts_ns", _u64),
        ("caddr", _u8 * 16),
        ("saddr", _u8 * 16),
    ]


class clv_conn_key(ctypes.Structure):
    _fields_ = [
        ("ifindex", _u32),
        ("role", _u8),
        ("family", _u8),
        ("cport", _u16),
        ("sport", _u16),
        ("pad", _u16),
        ("caddr", _u8 * 16),
        ("saddr", _u8 * 16),
    ]


class clv_held_seg(ctypes.Structure):
    _fields_ = [
        ("ts_ns", _u64),
        ("seq", _u32),
        ("ack", _u32),
        ("payload_len", _u32),
        ("gso_segs", _u16),
        ("tcp_flags", _u8),
        ("hook", _u8),
    ]


class clv_conn(ctypes.Structure):
    _fields_ = [
        ("lock", _u64),
        ("mode", _u8),
        ("phase", _u8),
        ("flags", _u8),
        ("pad", _u8),
        ("req_next", _u32),
        ("resp_next", _u32),
        ("req_body_ack", _u32),
        ("req_left", _u64),
        ("resp_left", _u64),
        ("last_ns", _u64),
        ("req_body_ts", _u64),
        ("resp_body_ts", _u64),
        ("resp_body_ack", _u32),
        ("pad2", _u32),
        ("req_seg", clv_held_seg),
        ("resp_seg", clv_held_seg),
        ("ex", clv_exchange),
        ("data", _u8 * CLV_HELD_BYTES),
    ]


CLV_SYN_REQUEST = 0x01
CLV_SYN_RESPONSE = 0x02


class clv_syn(ctypes.Structure):
    _fields_ = [
        ("req_next", _u32),
        ("resp_next", _u32),
        ("flags", _u32),
        ("pad", _u32),
    ]


class clv_red_key(ctypes.Structure):
    _fields_ = [
        ("ifindex", _u32),
        ("port", _u16),
        ("role", _u8),
        ("method", _u8),
        ("status", _u16),
        ("pad", _u16),
    ]


class clv_red(ctypes.Structure):
    _fields_ = [
        ("count", _u64),
        ("sum_ns", _u64),
        ("buckets", _u64 * CLV_RED_BUCKETS),
    ]


# Every structure of the header, for the layout tests.
STRUCTS: tuple[type[ctypes.Structure], ...] = (
    clv_segment,
    clv_port_key,
    clv_egress_key,
    clv_match,
    clv_settings,
    clv_exchange,
    clv_handover,
    clv_conn_key,
    clv_held_seg,
    clv_conn,
    clv_syn,
    clv_red_key,
    clv_red,
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


# clv_exchange and clv_handover, field for field.
EXCHANGE_HEADER = struct.Struct("<6B5H6I4Q16s16s")
EXCHANGE_HEADER_SIZE = EXCHANGE_HEADER.size
HANDOVER = struct.Struct("<6B3H3IQ16s16s")
assert EXCHANGE_HEADER_SIZE == 104 and HANDOVER.size == 64


class MalformedRecord(KernelError):
    """A ring buffer record that is not a record as this ABI defines it."""


# Enum members looked up by value once, not constructed per record.
_DIRECTIONS = {d.value: d for d in Direction}
_ROLES = {r.value: r for r in Role}
_PROTOCOLS = {p.value: p for p in Protocol}
_PHASES = {p.value: p for p in Phase}
_FIRST_PLUGIN_ID = max(_PROTOCOLS) + 1

# What decode_at reads from: bytes, or the ring's mapped memory, both of
# which slice to bytes.
RecordSource = bytes | mmap.mmap


def decode_segment(buf: bytes | bytearray | memoryview) -> Segment:
    """Decode one clv_segment record; :class:`MalformedRecord` if it is not one."""
    data = buf if type(buf) is bytes else bytes(buf)
    return _decode_segment(data, 0, len(data))


def decode_record(buf: bytes | bytearray | memoryview) -> Record:
    """Decode one ring buffer record of any type; :class:`MalformedRecord` if it is not one."""
    data = buf if type(buf) is bytes else bytes(buf)
    return decode_at(data, 0, len(data))


def decode_at(buf: RecordSource, off: int, size: int) -> Record:
    """Decode the ``size``-byte record at ``buf[off:]`` (the hot path).

    Measured here (2 vCPUs, shared): about 1 µs per segment record, of which
    the Segment tuple is about half (``tests/kernel/test_abi.py`` prints it).
    """
    if size > 0:
        rtype = buf[off]
        if rtype == CLV_EV_EXCHANGE:
            return decode_exchange_at(buf, off, size)
        if rtype == CLV_EV_HANDOVER:
            return _decode_handover(buf, off, size)
    return _decode_segment(buf, off, size)


def _addr(raw: bytes, family: int) -> bytes:
    return raw[:4] if family == 4 else raw


def decode_exchange_at(buf: RecordSource, off: int, size: int, *, held: bool = False) -> Exchange:
    """A clv_exchange: a ring record, or (``held``) one read from a `conns` entry."""
    if size < EXCHANGE_HEADER_SIZE:
        raise MalformedRecord(f"exchange record of {size} bytes, header needs "
                              f"{EXCHANGE_HEADER_SIZE}")
    (
        rtype, role, family, method, phase, _pad, status, req_head_len, resp_head_len,
        cport, sport, ifindex, req_seq, req_ack, req_packets, resp_packets, _pad2,
        start_ns, end_ns, req_bytes, resp_bytes, caddr, saddr,
    ) = EXCHANGE_HEADER.unpack_from(buf, off)  # fmt: skip
    role_ = _ROLES.get(role)
    start = off + EXCHANGE_HEADER_SIZE
    mid = start + req_head_len
    if (
        rtype != CLV_EV_EXCHANGE
        or EXCHANGE_HEADER_SIZE + req_head_len + resp_head_len > size
        or family not in (4, 6)
        or role_ is None
        or not (phase in _PHASES and (phase == 0) != held)
        or req_head_len > req_bytes
        or resp_head_len > resp_bytes
    ):
        raise MalformedRecord(
            f"bad exchange record: type={rtype} size={size} family={family} role={role}"
            f" phase={phase} heads={req_head_len}/{resp_head_len}"
        )
    return Exchange(
        start_ns, end_ns, ifindex, role_, family, _addr(caddr, family), cport,
        _addr(saddr, family), sport, method, status, req_seq, req_ack,
        req_bytes, req_packets, resp_bytes, resp_packets,
        bytes(buf[start:mid]), bytes(buf[mid : mid + resp_head_len]), _PHASES[phase],
    )  # fmt: skip


def _decode_handover(buf: RecordSource, off: int, size: int) -> Handover:
    if size < HANDOVER.size:
        raise MalformedRecord(f"handover record of {size} bytes, needs {HANDOVER.size}")
    (
        _type, role, family, reason, synced, _pad, cport, sport, _pad2,
        ifindex, req_seq, resp_seq, ts_ns, caddr, saddr,
    ) = HANDOVER.unpack_from(buf, off)  # fmt: skip
    role_ = _ROLES.get(role)
    if family not in (4, 6) or role_ is None:
        raise MalformedRecord(f"bad handover record: family={family} role={role}")
    return Handover(
        ts_ns, ifindex, role_, family, _addr(caddr, family), cport, _addr(saddr, family), sport,
        reason, req_seq if synced & CLV_SYNC_REQUEST else None,
        resp_seq if synced & CLV_SYNC_RESPONSE else None, bool(synced & CLV_SYNC_START),
    )  # fmt: skip


def _decode_segment(buf: RecordSource, off: int, size: int) -> Segment:
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
