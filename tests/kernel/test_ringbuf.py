"""The ring reader: bounded batches, and both walks of the ring agree.

``walk_records`` is pure, so the ring layout itself (headers, flag bits,
8-byte alignment, the data area mapped twice so a record can wrap) is
checked on rings laid out in bytes; the real ring is checked through
BPF_PROG_TEST_RUN, with the mapped walk and with libbpf's.
"""

from __future__ import annotations

import select
import struct
from collections.abc import Callable

import pytest

from clovisor.core.events import Handover, Protocol, Segment
from clovisor.kernel import abi
from clovisor.kernel.loader import BpfObject
from clovisor.kernel.ringbuf import RingReader, default_walk, walk_records

from .conftest import test_run
from .test_abi import _record
from .test_datapath import LO, eth4, ipv4, tcp

Factory = Callable[..., BpfObject]
BUSY, DISCARD = 1 << 31, 1 << 30


class FakeRing:
    """A ring's data area in bytes, written the way the kernel writes it."""

    def __init__(self, size: int = 1024, start: int = 0) -> None:
        self.size = size
        self.area = bytearray(size)
        self.prod = self.cons = start

    def put(self, record: bytes, flags: int = 0) -> None:
        total = (len(record) + 8 + 7) & ~7
        assert self.prod + total - self.cons <= self.size
        blob = struct.pack("<II", len(record) | flags, 0) + record
        for i, b in enumerate(blob):
            self.area[(self.prod + i) % self.size] = b
        self.prod += total

    def walk(self, limit: int = 1000) -> tuple[list[object], int, int]:
        data = bytes(self.area) * 2  # the data pages, mapped twice in a row
        words = memoryview(data).cast("I")
        out, cons, bad = walk_records(data, words, 0, self.cons, self.prod, self.size - 1, limit)
        self.cons = cons
        return list(out), cons, bad


def test_walk_decodes_committed_records_in_order() -> None:
    ring = FakeRing()
    for payload in (b"one", b"", b"three!!"):
        ring.put(_record(payload))
    out, cons, bad = ring.walk()
    assert [s.payload for s in out] == [b"one", b"", b"three!!"]  # type: ignore[attr-defined]
    assert cons == ring.prod and bad == 0


def test_walk_skips_discarded_counts_malformed_and_stops_at_busy() -> None:
    ring = FakeRing()
    ring.put(_record(b"kept"))
    ring.put(_record(b"dropped by the program"), DISCARD)
    ring.put(b"\x07" * 100)  # not a clv_segment
    ring.put(_record(b"after"))
    ring.put(_record(b"not committed yet"), BUSY)
    ring.put(_record(b"behind it"))
    out, cons, bad = ring.walk()
    assert [s.payload for s in out] == [b"kept", b"after"]  # type: ignore[attr-defined]
    assert bad == 1 and cons < ring.prod  # stopped at the busy record, not past it


def test_walk_reads_a_record_that_wraps_around_the_end() -> None:
    ring = FakeRing(size=256, start=200)
    ring.put(_record(b"w" * 40))  # 8 + 88 + 40 bytes from offset 200: wraps
    [seg], cons, bad = ring.walk()
    assert seg.payload == b"w" * 40 and bad == 0  # type: ignore[attr-defined]
    assert cons == ring.prod and cons & 255 < 200


def test_walk_stops_at_the_limit_and_resumes() -> None:
    ring = FakeRing(size=4096)
    for i in range(7):
        ring.put(_record(bytes([65 + i])))
    batches = []
    while ring.cons < ring.prod:
        out, _, _ = ring.walk(limit=3)
        batches.append(b"".join(s.payload for s in out))  # type: ignore[attr-defined]
    assert batches == [b"ABC", b"DEF", b"G"]


# --- the real ring ------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("walk", ["mapped", "libbpf"])
def test_poll_is_bounded_by_max_records(bpf_object: Factory, walk: str) -> None:
    obj = bpf_object(capture_bytes=64, wakeup_bytes=0)
    obj.set_server_port(LO, 8080, Protocol.HTTP)
    with RingReader(obj, max_records=4, walk=walk) as reader:  # type: ignore[arg-type]
        for i in range(10):
            test_run(obj.prog_fd("clv_tc_ingress"), eth4(ipv4(tcp(40000, 8080, b"%d" % i))))
        sizes = []
        more = []
        for _ in range(10):  # bounded: a reader that never advanced would loop forever
            got = reader.poll(0)
            if not got:
                break
            sizes.append(len(got))
            more.append(reader.more)
        assert sizes == [4, 4, 2] and more == [True, True, False]
        assert reader.backlog() == (0 if walk == "mapped" else None)
        # nothing left, and the fd says so: a level-triggered wait times out
        ready, _, _ = select.select([reader.epoll_fd()], [], [], 0.1)
        assert not ready


@pytest.mark.kernel
def test_both_walks_decode_the_same_records(bpf_object: Factory) -> None:
    # Each connection starts with a method but no whole head: the classifier
    # hands it over (a handover record, then the segment), except the first,
    # too short to be a head at all (a segment alone).
    frames = [eth4(ipv4(tcp(40000 + i, 8080, b"GET /%d HTTP/1.1\r\n" % i * (i + 1))))
              for i in range(20)]
    seen = []
    for walk in ("mapped", "libbpf"):
        obj = bpf_object(capture_bytes=200, wakeup_bytes=0)
        obj.set_server_port(LO, 8080, Protocol.HTTP)
        with RingReader(obj, walk=walk) as reader:  # type: ignore[arg-type]
            for f in frames:
                test_run(obj.prog_fd("clv_tc_ingress"), f)
            records = reader.poll(0)
        seen.append([r._replace(ts_ns=0) if isinstance(r, Segment | Handover) else r
                     for r in records])
    kinds = [type(r) for r in seen[0]]
    assert kinds.count(Segment) == 20 and kinds.count(Handover) == 19
    assert seen[0] == seen[1]


@pytest.mark.kernel
def test_mapped_walk_frees_ring_space(bpf_object: Factory) -> None:
    """The consumer position is written back: a small ring keeps taking records."""
    obj = bpf_object(ring_bytes=4096, capture_bytes=64, wakeup_bytes=0)
    obj.set_server_port(LO, 8080, Protocol.HTTP)
    frame = eth4(ipv4(tcp(40000, 8080, b"x" * 64)))
    with RingReader(obj, walk="mapped") as reader:
        got = 0
        for _ in range(20):  # 20 x 16 records of 160 bytes: 12 rings' worth
            test_run(obj.prog_fd("clv_tc_ingress"), frame, repeat=16)
            got += len(reader.poll(0))
    assert got == 320 and obj.counters()["lost"] == 0


def test_default_walk_is_mapped_only_where_plain_loads_are_ordered() -> None:
    import platform

    expected = "mapped" if platform.machine().lower() in ("x86_64", "amd64") else "libbpf"
    assert default_walk() == expected or platform.machine().lower() in ("i386", "i686")
    assert abi.SEGMENT_HEADER_SIZE % 8 == 0  # records stay 8-byte aligned in the ring


class _NoWait:
    """Stands in for the reader's epoll: any wait is a failure."""

    def __init__(self, real: object) -> None:
        self.real = real

    def poll(self, *_args: object) -> list[tuple[int, int]]:
        raise AssertionError("waited although records were left in the ring")

    def fileno(self) -> int:
        return self.real.fileno()  # type: ignore[attr-defined, no-any-return]


@pytest.mark.kernel
def test_a_cut_batch_is_continued_without_waiting(bpf_object: Factory) -> None:
    """Records left behind by max_records may never wake the reader: do not wait for them."""
    obj = bpf_object(capture_bytes=64, wakeup_bytes=60_000)  # never crossed here
    obj.set_server_port(LO, 8080, Protocol.HTTP)
    with RingReader(obj, max_records=4) as reader:
        test_run(obj.prog_fd("clv_tc_ingress"), eth4(ipv4(tcp(40000, 8080, b"x"))), repeat=10)
        assert len(reader.poll(0)) == 4 and reader.more
        # 6 records of 88 + 1 bytes, each with an 8-byte header, 8-byte aligned
        assert reader.backlog() == 6 * ((88 + 1 + 8 + 7) & ~7)
        real, reader._epoll = reader._epoll, _NoWait(reader._epoll)  # type: ignore[assignment]
        try:
            assert len(reader.poll(60_000)) == 4 and reader.more
            assert len(reader.poll(60_000)) == 2 and not reader.more
        finally:
            reader._epoll = real
