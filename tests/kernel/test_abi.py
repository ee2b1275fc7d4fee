"""The Python mirrors of bpf/clovisor.h agree with C, with the BPF object's BTF,
and the record decoder reads exactly what the kernel writes."""

from __future__ import annotations

import contextlib
import ctypes
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clovisor.core.events import Direction, Phase, Protocol, Role, Segment
from clovisor.kernel import abi
from clovisor.kernel.loader import DEFAULT_OBJECT

from .conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "bpf" / "clovisor.h"

# Constants of the header, by C name, and their Python mirror.
CONSTANTS = {
    "CLV_CAPTURE_MAX": abi.CLV_CAPTURE_MAX,
    "CLV_TAIL_LEN": abi.CLV_TAIL_LEN,
    "CLV_EV_SEGMENT": abi.CLV_EV_SEGMENT,
    "CLV_EV_EXCHANGE": abi.CLV_EV_EXCHANGE,
    "CLV_EV_HANDOVER": abi.CLV_EV_HANDOVER,
    "CLV_DIR_REQUEST": Direction.REQUEST,
    "CLV_DIR_RESPONSE": Direction.RESPONSE,
    "CLV_ROLE_SERVER": Role.SERVER,
    "CLV_ROLE_CLIENT": Role.CLIENT,
    "CLV_PROTO_TCP": Protocol.TCP,
    "CLV_PROTO_HTTP": Protocol.HTTP,
    "CLV_PROTO_HTTP2": Protocol.HTTP2,
    "CLV_PROTO_GRPC": Protocol.GRPC,
    "CLV_HOOK_INGRESS": abi.CLV_HOOK_INGRESS,
    "CLV_HOOK_EGRESS": abi.CLV_HOOK_EGRESS,
    "CLV_TCP_FIN": abi.CLV_TCP_FIN,
    "CLV_TCP_SYN": abi.CLV_TCP_SYN,
    "CLV_TCP_RST": abi.CLV_TCP_RST,
    "CLV_TCP_PSH": abi.CLV_TCP_PSH,
    "CLV_TCP_ACK": abi.CLV_TCP_ACK,
    "CLV_PORT_WORDS": abi.CLV_PORT_WORDS,
    "CLV_EGRESS_ANY": abi.CLV_EGRESS_ANY,
    "CLV_EGRESS_V4": abi.CLV_EGRESS_V4,
    "CLV_EGRESS_V6": abi.CLV_EGRESS_V6,
    "CLV_CNT__MAX": abi.CLV_CNT__MAX,
    "CLV_WAKEUP_NEVER": abi.CLV_WAKEUP_NEVER,
    **{f"CLV_CNT_{c.name}": c.value for c in abi.Counter},
    **{f"CLV_METHOD_{m.name}": m.value for m in abi.Method},
    **{f"CLV_HO_{r.name}": r.value for r in abi.HandoverReason},
    "CLV_HO__MAX": abi.CLV_HO__MAX,
    **{f"CLV_PHASE_{p.name}": p.value for p in Phase if p is not Phase.COMPLETE},
    "CLV_MODE_PAIRED": abi.CLV_MODE_PAIRED,
    "CLV_MODE_SEGMENTS": abi.CLV_MODE_SEGMENTS,
    "CLV_MODE_DEAD": abi.CLV_MODE_DEAD,
    "CLV_SYNC_REQUEST": abi.CLV_SYNC_REQUEST,
    "CLV_SYNC_RESPONSE": abi.CLV_SYNC_RESPONSE,
    "CLV_RESP_HEAD_MAX": abi.CLV_RESP_HEAD_MAX,
    "CLV_REQ_HEAD_MAX": abi.CLV_REQ_HEAD_MAX,
    "CLV_SCAN_SLACK": abi.CLV_SCAN_SLACK,
    "CLV_HELD_BYTES": abi.CLV_HELD_BYTES,
    "CLV_BODY_MAX": abi.CLV_BODY_MAX,
    "CLV_CONN_RESP_KNOWN": abi.CLV_CONN_RESP_KNOWN,
    "CLV_CONN_FIN_REQ": abi.CLV_CONN_FIN_REQ,
    "CLV_CONN_FIN_RESP": abi.CLV_CONN_FIN_RESP,
    "CLV_RED_BUCKETS": abi.CLV_RED_BUCKETS,
}


def _layout_program() -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        '#include "clovisor.h"',
        "int main(void) {",
    ]
    for s in abi.STRUCTS:
        name = s.__name__
        lines.append(
            f'printf("{name} %zu %zu\\n", sizeof(struct {name}), _Alignof(struct {name}));'
        )
        for field, _ctype in s._fields_:
            lines.append(
                f'printf("{name}.{field} %zu %zu\\n", offsetof(struct {name}, {field}), '
                f"sizeof(((struct {name} *)0)->{field}));"
            )
    for const in CONSTANTS:
        lines.append(f'printf("{const} %lld\\n", (long long){const});')
    lines.append("return 0; }")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, ...]]:
    """What the system C compiler says about every struct, field and constant."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        unavailable("no C compiler to check the header's layout")
    tmp = tmp_path_factory.mktemp("abi")
    src, exe = tmp / "layout.c", tmp / "layout"
    src.write_text(_layout_program())
    subprocess.run(
        [gcc, "-Wall", "-Werror", "-I", str(HEADER.parent), "-o", str(exe), str(src)],
        check=True,
        capture_output=True,
        text=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: tuple(int(v) for v in rest) for k, *rest in (ln.split() for ln in out.splitlines())}


@pytest.mark.parametrize("struct", abi.STRUCTS, ids=lambda s: s.__name__)
def test_struct_layout_matches_c(
    struct: type[ctypes.Structure], c_layout: dict[str, tuple[int, ...]]
) -> None:
    name = struct.__name__
    assert c_layout[name] == (ctypes.sizeof(struct), ctypes.alignment(struct))
    for field, ctype in struct._fields_:
        assert c_layout[f"{name}.{field}"] == (
            getattr(struct, field).offset,
            ctypes.sizeof(ctype),
        ), field


def test_constants_match_c(c_layout: dict[str, tuple[int, ...]]) -> None:
    for const, value in CONSTANTS.items():
        assert c_layout[const] == (int(value),), const


def test_decoder_format_covers_the_whole_header() -> None:
    assert abi.SEGMENT_HEADER.size == ctypes.sizeof(abi.clv_segment) == 88
    # one struct item per C field, in the same order (the arrays are one "16s" each)
    assert len(abi.SEGMENT_HEADER.unpack(bytes(88))) == len(abi.clv_segment._fields_)


def _btf_structs(obj: Path) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """{struct name: (size, [(member, bit offset)])} from the object's BTF."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run(
        [bpftool, "btf", "dump", "file", str(obj), "format", "raw"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    structs: dict[str, tuple[int, list[tuple[str, int]]]] = {}
    current: list[tuple[str, int]] | None = None
    for line in out.splitlines():
        head = re.match(r"\[\d+\] STRUCT '(\w+)' size=(\d+)", line)
        if head:
            current = []
            structs[head.group(1)] = (int(head.group(2)), current)
            continue
        member = re.match(r"\s+'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
        if member and current is not None:
            current.append((member.group(1), int(member.group(2))))
        elif not line.startswith((" ", "\t")):
            current = None
    return structs


def test_btf_of_the_object_matches() -> None:
    if not DEFAULT_OBJECT.is_file():
        unavailable("object not built (make bpf)")
    if not (shutil.which("bpftool") or Path("/usr/sbin/bpftool").exists()):
        unavailable("no bpftool")
    btf = _btf_structs(DEFAULT_OBJECT)
    for struct in abi.STRUCTS:
        name = struct.__name__
        if name not in btf:
            continue  # a key type used only by user space is not in the object's BTF
        size, members = btf[name]
        assert size == ctypes.sizeof(struct), name
        assert members == [(f, getattr(struct, f).offset * 8) for f, _ in struct._fields_], name
    # the ring record, the maps' keys and values and the settings must all be there
    # (the exchange and handover records are built in map values and ring memory;
    # the C compiler checks them above)
    for must in ("clv_segment", "clv_port_key", "clv_egress_key", "clv_match", "clv_settings",
                 "clv_conn_key", "clv_conn", "clv_held_seg", "clv_exchange", "clv_red_key",
                 "clv_red"):
        assert must in btf, must


# --- the decoder ---------------------------------------------------------------


def _record(payload: bytes = b"", **fields: object) -> bytes:
    seg = abi.clv_segment(
        type=abi.CLV_EV_SEGMENT,
        dir=1,
        role=2,
        proto=2,
        family=6,
        tcp_flags=0x19,
        hook=1,
        ts_ns=123456789012,
        ifindex=7,
        seq=0xFFFFFFF0,
        ack=42,
        payload_len=len(payload) + 100,
        sport=8080,
        dport=54321,
        cap_len=len(payload),
        gso_segs=3,
    )
    for k, v in fields.items():
        setattr(seg, k, v)
    return bytes(seg) + payload


def test_decode_reads_every_field_where_c_puts_it() -> None:
    rec = abi.clv_segment.from_buffer_copy(_record(b"HTTP/1.1 200 OK\r\n"))
    ctypes.memmove(rec.saddr, bytes(range(1, 17)), 16)
    ctypes.memmove(rec.daddr, bytes(range(17, 33)), 16)
    ctypes.memmove(rec.tail, b"\r\n0\r\n\r\n" + bytes(9), 16)
    rec.tail_len = 7
    seg = abi.decode_segment(bytes(rec) + b"HTTP/1.1 200 OK\r\n")
    assert seg == Segment(
        ts_ns=123456789012,
        ifindex=7,
        role=Role.CLIENT,
        direction=Direction.RESPONSE,
        protocol=Protocol.HTTP,
        family=6,
        saddr=bytes(range(1, 17)),
        daddr=bytes(range(17, 33)),
        sport=8080,
        dport=54321,
        seq=0xFFFFFFF0,
        ack=42,
        flags=0x19,
        payload_len=117,
        payload=b"HTTP/1.1 200 OK\r\n",
        tail=b"\r\n0\r\n\r\n",
        packets=3,
    )
    assert type(seg) is Segment
    with pytest.raises(AttributeError):
        seg.seq = 1  # type: ignore[misc]  # still frozen


def test_decode_ipv4_keeps_four_address_bytes() -> None:
    rec = abi.clv_segment.from_buffer_copy(_record(family=4))
    ctypes.memmove(rec.saddr, b"\x0a\xc8\x00\x0a", 4)
    ctypes.memmove(rec.daddr, b"\x0a\xc8\x00\x0b", 4)
    seg = abi.decode_segment(memoryview(bytes(rec)))
    assert (seg.saddr, seg.daddr) == (b"\x0a\xc8\x00\x0a", b"\x0a\xc8\x00\x0b")
    assert seg.tail == b"" and seg.payload == b""


def test_decode_zero_gso_segs_means_one_packet() -> None:
    assert abi.decode_segment(_record(gso_segs=0)).packets == 1


@pytest.mark.parametrize(
    "record",
    [
        b"",
        _record()[:87],
        _record(type=2),
        _record(b"abc")[:-1],  # cap_len says 3, 2 follow
        _record(b"abc", payload_len=2),  # more captured than the segment holds
        _record(tail_len=17),
        _record(family=5),
        _record(dir=2),
        _record(role=0),
        _record(proto=0),
    ],
    ids=[
        "empty",
        "short",
        "type",
        "cut-payload",
        "cap>len",
        "tail",
        "family",
        "dir",
        "role",
        "proto",
    ],
)
def test_decode_rejects_malformed(record: bytes) -> None:
    with pytest.raises(abi.MalformedRecord):
        abi.decode_segment(record)


@given(st.binary(min_size=0, max_size=200))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    with contextlib.suppress(abi.MalformedRecord):
        abi.decode_segment(data)


@given(st.binary(min_size=88, max_size=120))
def test_decode_valid_type_byte_fuzz(data: bytes) -> None:
    try:
        seg = abi.decode_segment(b"\x01" + data[1:])
    except abi.MalformedRecord:
        return
    assert len(seg.payload) <= seg.payload_len and len(seg.tail) <= abi.CLV_TAIL_LEN


def test_decode_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """Report the per-record decode cost; assert only a generous bound (CI machines vary)."""
    rec = _record(b"x" * 256, family=4)
    n = 20000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            abi.decode_segment(rec)
        best = min(best, (time.perf_counter() - start) / n)
    with capsys.disabled():
        print(f"\ndecode_segment: {best * 1e9:.0f} ns/record")
    assert best < 20e-6


def test_decode_keeps_a_parser_plugins_protocol_id() -> None:
    seg = abi.decode_segment(_record(proto=9))
    assert seg.protocol == 9 and not isinstance(seg.protocol, Protocol)
    assert abi.decode_segment(_record(proto=2)).protocol is Protocol.HTTP


def test_h2_frame_records_follow_the_payload() -> None:
    from clovisor.core.h2frames import H2_FRAME, frame_hints

    assert H2_FRAME.size == ctypes.sizeof(abi.clv_h2_frame)
    frame = abi.clv_h2_frame(offset=1500, peek_len=3)
    frame.head[:] = list(b"\x00\x00\x05\x01\x05\x00\x00\x00\x03")
    frame.peek[:3] = list(b"\x88\xc0\xbf")
    rec = _record(b"p" * 10, proto=abi.CLV_PROTO_GRPC) + bytes(frame)
    seg = abi.decode_segment(rec)
    assert seg.payload == b"p" * 10 and seg.protocol is Protocol.GRPC
    assert frame_hints(seg.frames) == [(1500, b"\x00\x00\x05\x01\x05\x00\x00\x00\x03\x88\xc0\xbf")]
    assert abi.decode_segment(_record(b"p" * 10)).frames == b""
