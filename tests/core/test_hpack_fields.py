"""HPACK blocks from the real ``hpack`` encoder, decoded by a passive observer."""

from __future__ import annotations

import tracemalloc

from hpack import Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from clovisor.core.budget import Budget
from clovisor.core.hpack_fields import MAX_TABLE_SIZE, FieldDecoder

WANTED = frozenset(
    {b":method", b":path", b":authority", b":status", b"user-agent", b"x-tag", b"x-new"}
)


def request(i: int, path: str = "/svc.Greeter/SayHello") -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "greeter.default.svc:50051"),
        ("content-type", "application/grpc"),
        ("user-agent", "grpc-python/1.66"),
        ("x-tag", f"call-{i}"),
        ("cookie", "secret=1"),
    ]


def wanted(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(n, v) for n, v in headers if n.encode() in WANTED]


def test_a_connection_seen_from_its_start_decodes_everything() -> None:
    enc, dec = Encoder(), FieldDecoder(synced=True)
    for i in range(20):
        h = request(i, f"/svc/M{i % 3}")
        out = dec.decode(enc.encode(h), WANTED, complete=True)
        assert list(out.fields) == wanted(h)
        assert not out.incomplete
    assert dec.entries > 0


def test_mid_stream_pickup_never_guesses_and_recovers() -> None:
    enc = Encoder()
    for i in range(5):
        enc.encode(request(i))  # before the tracer started: the table fills
    dec = FieldDecoder(synced=False)
    out = dec.decode(enc.encode(request(5)), WANTED, complete=True)
    # Static-table fields are known; everything that refers to the earlier
    # entries (x-tag's name among them) is not.
    assert list(out.fields) == [(":method", "POST")]
    assert out.unknown == 6 and out.incomplete
    # A field whose name and value are first sent after the pickup is known from then on.
    out = dec.decode(enc.encode([*request(6), ("x-new", "late")]), WANTED, complete=True)
    assert out.fields[-1] == ("x-new", "late")
    out = dec.decode(enc.encode([(":method", "GET"), ("x-new", "late")]), WANTED, complete=True)
    assert list(out.fields) == [(":method", "GET"), ("x-new", "late")] and not out.incomplete


def test_a_table_size_update_to_zero_makes_the_table_known() -> None:
    enc = Encoder()
    for i in range(3):
        enc.encode(request(i))
    dec = FieldDecoder(synced=False)
    enc.header_table_size = 0  # the next block starts with an update to 0
    block = enc.encode([(":method", "GET")])
    assert block[0] == 0x20
    assert dec.decode(block, WANTED, complete=True).fields == ((":method", "GET"),)
    enc.header_table_size = 4096  # back up: the table is empty and known, so all is literal
    out = dec.decode(enc.encode(request(9)), WANTED, complete=True)
    assert list(out.fields) == wanted(request(9)) and not out.incomplete
    out = dec.decode(enc.encode(request(10)), WANTED, complete=True)
    assert list(out.fields) == wanted(request(10)) and not out.incomplete


def test_lost_blocks_make_the_table_unknown() -> None:
    enc, dec = Encoder(), FieldDecoder(synced=True)
    dec.decode(enc.encode(request(0)), WANTED, complete=True)
    enc.encode([("user-agent", "other/2")])  # lost: it adds an entry at the front
    dec.lose()
    out = dec.decode(enc.encode(request(1)), WANTED, complete=True)
    assert out.incomplete
    truth = dict(wanted(request(1)))
    assert all(truth[n] == v for n, v in out.fields)


def test_a_cut_block_reports_what_it_holds_then_forgets_the_table() -> None:
    enc, dec = Encoder(), FieldDecoder(synced=True)
    block = enc.encode(request(0))
    out = dec.decode(block[:20], WANTED, complete=False)
    assert out.incomplete and not out.error
    assert list(out.fields) == wanted(request(0))[: len(out.fields)]
    assert dec.entries == 0


def test_secrets_are_never_reported() -> None:
    enc, dec = Encoder(), FieldDecoder(synced=True)
    out = dec.decode(enc.encode([("authorization", "Bearer x"), ("cookie", "a=b")]), WANTED,
                     complete=True)  # fmt: skip
    assert out.fields == () and not out.incomplete


def test_table_is_capped_and_budgeted() -> None:
    budget = Budget(1 << 30)
    enc, dec = Encoder(), FieldDecoder(synced=False, budget=budget)
    enc.header_table_size = 1 << 20  # the peer would allow a 1 MiB table
    for i in range(200):
        dec.decode(enc.encode([("x-tag", f"{i}" * 1000)]), WANTED, complete=True)
        assert dec.held_bytes <= MAX_TABLE_SIZE
        assert budget.used == dec.held_bytes
    dec.announce(4096)
    assert dec.held_bytes <= 4096 and budget.used == dec.held_bytes
    dec.release()
    assert budget.used == 0


def test_a_refused_budget_keeps_indices_aligned() -> None:
    budget = Budget(50)
    enc, dec = Encoder(), FieldDecoder(synced=True, budget=budget)
    big = [("x-tag", "v" * 100)]  # refused by the budget: a placeholder entry
    dec.decode(enc.encode(big), WANTED, complete=True)
    dec.decode(enc.encode([("user-agent", "ua/1")]), WANTED, complete=True)  # kept
    out = dec.decode(enc.encode([*big, ("user-agent", "ua/1")]), WANTED, complete=True)
    assert list(out.fields) == [("user-agent", "ua/1")] and out.unknown == 1
    assert budget.used <= 50


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_arbitrary_bytes_never_raise(blob: bytes, complete: bool) -> None:
    dec = FieldDecoder(synced=False, budget=Budget(1 << 20))
    out = dec.decode(blob, WANTED, complete=complete)
    out = dec.decode(blob[::-1], WANTED, complete=complete)
    assert len(out.fields) <= 32 and dec.held_bytes <= MAX_TABLE_SIZE


HEADER = st.tuples(
    st.sampled_from([":method", ":path", "user-agent", "x-tag", "cookie", "accept"]),
    st.text("abcdefgh/", max_size=40),
)


@settings(max_examples=200, deadline=None)
@given(
    blocks=st.lists(st.lists(HEADER, max_size=8), min_size=1, max_size=12),
    seen_from=st.integers(0, 5),
    lost=st.sets(st.integers(0, 11)),
    sizes=st.lists(st.sampled_from([None, 0, 64, 256, 4096]), min_size=12, max_size=12),
    cap=st.sampled_from([4096, 65536]),
)
def test_never_a_wrong_field(
    blocks: list[list[tuple[str, str]]], seen_from: int, lost: set[int],
    sizes: list[int | None], cap: int,
) -> None:
    """Whatever was missed, every reported field is the one the encoder sent, in order.

    Seen from the start with nothing lost, every field is reported.
    """
    enc = Encoder()
    dec = FieldDecoder(synced=seen_from == 0)
    dec.announce(cap)
    missed = False
    for i, headers in enumerate(blocks):
        if sizes[i] is not None:
            enc.header_table_size = sizes[i]
        block = enc.encode(headers)
        if i < seen_from:
            missed = True
            continue
        if i in lost:
            dec.lose()
            missed = True
            continue
        out = dec.decode(block, WANTED, complete=True)
        truth = wanted(headers)
        assert not out.error
        got = list(out.fields)
        it = iter(truth)
        assert all(any(g == t for t in it) for g in got), (got, truth)  # a subsequence
        assert len(got) + out.unknown >= len(truth)
        if not missed:
            assert got == truth and out.unknown == 0


def test_held_memory_is_what_the_budget_says() -> None:
    budget = Budget(1 << 30)
    dec = FieldDecoder(synced=True, budget=budget)
    enc = Encoder()
    blocks = [enc.encode([("x-tag", f"{i:05d}" * 200)]) for i in range(100)]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for b in blocks:
        dec.decode(b, WANTED, complete=True)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    # The default 4 KiB table: a few entries of 1 KiB, plus per-object overhead.
    assert budget.used <= 4096 and grown < 4096 + 16 * 1024
