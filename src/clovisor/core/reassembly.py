"""TCP half-stream reassembly by sequence number.

Only a prefix of each segment reaches user space, so the reassembler never
joins payload bytes: it orders segments, trims retransmitted overlap, and
hands on *chunks* that carry an absolute stream offset, the real length and
whatever prefix was captured. Bytes that never arrive become a chunk with no
data, so the layers above can keep counting by offset across the hole.
"""

from __future__ import annotations

from dataclasses import dataclass

from .budget import UNLIMITED, Budget

_MOD = 1 << 32
_HALF = 1 << 31


def seq_diff(a: int, b: int) -> int:
    """Signed distance a - b in 32-bit sequence space (RFC 1982 style)."""
    return ((a - b + _HALF) % _MOD) - _HALF


def known_bytes(prefix: bytes, tail: bytes, length: int) -> bytes:
    """The prefix, made whole when prefix and tail together cover ``length``."""
    missing = length - len(prefix)
    if 0 < missing <= len(tail):
        return prefix + tail[len(tail) - missing :]
    return prefix


@dataclass(slots=True)
class Chunk:
    """A contiguous run of stream bytes, possibly only partly captured.

    ``offset`` is the absolute position in the half-stream (unwrapped, so it
    keeps growing past 4 GiB). ``data`` is a prefix of the ``length`` bytes;
    ``tail`` is a suffix of them when the prefix does not reach the end.
    ``lost``: a hole, bytes the hook never reported (a full ring), as opposed
    to bytes that went by beyond the captured prefix. ``ack``: the ack number
    of the segment that brought the bytes (0 for a hole).
    """

    offset: int
    length: int
    data: bytes
    tail: bytes
    ts_ns: int
    packets: int
    lost: bool = False
    ack: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def complete(self) -> bool:
        return len(self.data) >= self.length

    def split(self, n: int) -> tuple[Chunk, Chunk]:
        """The first n bytes and the rest (the rest counts no packets)."""
        head = Chunk(
            self.offset, n, self.data[:n], b"", self.ts_ns, self.packets, self.lost, self.ack
        )
        rest_len = self.length - n
        rest_data = self.data[n:] if n < len(self.data) else b""
        rest_data = known_bytes(rest_data, self.tail, rest_len)
        rest = Chunk(
            self.offset + n, rest_len, rest_data, self.tail, self.ts_ns, 0, self.lost, self.ack
        )
        return head, rest

    def ends_with(self, suffix: bytes) -> bool:
        """Whether the chunk's last bytes are known and equal ``suffix``."""
        if self.complete:
            return self.data[: self.length].endswith(suffix)
        return len(self.tail) >= len(suffix) and self.tail.endswith(suffix)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReassemblyLimits:
    max_pending_segments: int = 64  # out-of-order segments held per half-stream
    gap_timeout_ns: int = 1_000_000_000  # how long a hole may wait for a retransmission


class HalfStream:
    """One direction of a TCP connection: segments in, ordered chunks out."""

    __slots__ = (
        "_budget",
        "_limits",
        "_next_abs",
        "_next_seq",
        "_peer_ack",
        "_pending",
        "duplicates",
        "gap_bytes",
        "syn_seen",
    )

    def __init__(self, limits: ReassemblyLimits, budget: Budget = UNLIMITED) -> None:
        self._budget = budget
        self._limits = limits
        self._next_seq: int | None = None  # 32-bit sequence of the next byte
        self._next_abs = 0  # the same position, unwrapped
        self._pending: dict[int, Chunk] = {}  # by absolute offset, out of order
        # The highest ack of the peer (32-bit): what the receiver has, and so
        # what has passed the hook. A hole below it will never be filled.
        self._peer_ack: int | None = None
        self.syn_seen = False
        self.duplicates = 0
        self.gap_bytes = 0

    @property
    def started(self) -> bool:
        return self._next_seq is not None

    @property
    def position(self) -> int:
        """Absolute offset of the next expected byte."""
        return self._next_abs

    def absolute(self, seq: int) -> int:
        """The absolute offset of a 32-bit sequence number near the cursor."""
        if self._next_seq is None:
            return 0
        return self._next_abs + seq_diff(seq, self._next_seq)

    def seq_at(self, offset: int) -> int:
        """The 32-bit sequence number of an absolute offset."""
        if self._next_seq is None:
            return 0
        return (self._next_seq - (self._next_abs - offset)) % _MOD

    def syn(self, seq: int) -> None:
        """A SYN fixes where the stream starts: its data begins at seq + 1."""
        if self._next_seq is None:
            self._next_seq = (seq + 1) % _MOD
            self._next_abs = 0
            self.syn_seen = True

    def anchor(self, seq: int, *, at_start: bool = False) -> None:
        """The stream's data at offset 0 begins at ``seq`` (a message boundary the
        classifier reported when it handed the connection over); ``at_start``:
        it is the stream's very first byte, as after a SYN."""
        if self._next_seq is None:
            self._next_seq = seq % _MOD
            self._next_abs = 0
            self.syn_seen = at_start

    def take_next(self, seq: int, length: int) -> int | None:
        """The offset of a segment that is next in order with nothing held, else None.

        Such a segment (the common case) needs none of :meth:`push`'s
        bookkeeping: the cursor moves past it and the caller frames its
        bytes as the one chunk ``push`` would have returned.
        """
        if seq != self._next_seq or self._pending:
            return None
        offset = self._next_abs
        self._next_seq = (seq + length) % _MOD
        self._next_abs = offset + length
        return offset

    def push(
        self,
        seq: int,
        length: int,
        data: bytes,
        tail: bytes,
        ts_ns: int,
        packets: int,
        ack: int = 0,
    ) -> list[Chunk]:
        """Add a payload segment; return the chunks that are now in order."""
        if self._next_seq is None:
            # Picked up mid-stream: whatever arrives first is the start.
            self._next_seq = seq
            self._next_abs = 0
        offset = self._next_abs + seq_diff(seq, self._next_seq)
        end = offset + length
        if end <= self._next_abs:
            self.duplicates += 1
            return []
        if offset < self._next_abs:
            # A retransmission that overlaps what we already delivered.
            trim = self._next_abs - offset
            data = data[trim:] if trim < len(data) else b""
            offset, length = self._next_abs, length - trim
        chunk = Chunk(
            offset, length, known_bytes(data, tail, length), tail, ts_ns, packets, False, ack
        )
        if offset == self._next_abs:
            self._advance(end)
            if not self._pending:
                return [chunk]
            out = [chunk]
            out.extend(self._drain())
            return out
        held = self._pending.get(offset)
        if held is None or held.length < length:
            if held is not None:
                self._budget.give(len(held.data))
            if not self._budget.take(len(chunk.data)):
                # Over budget: keep the segment by length; its bytes are lost.
                chunk.data = b""
                chunk.tail = b""
            self._pending[offset] = chunk
        else:
            self.duplicates += 1
        out = self._drain()
        if self._pending and self._peer_ack is not None:
            out.extend(self._skip_acked())
        if len(self._pending) > self._limits.max_pending_segments:
            out.extend(self.skip_gap())
        elif self._pending:
            oldest = min(c.ts_ns for c in self._pending.values())
            if ts_ns - oldest > self._limits.gap_timeout_ns:
                out.extend(self.skip_gap())
        return out

    def peer_acked(self, ack: int) -> list[Chunk]:
        """The receiver acknowledged everything before ``ack``: holes there are lost.

        The classifier sits on the path, so bytes the receiver has passed it:
        if their record is missing, the ring lost it and no retransmission
        will bring it. Skipping such a hole at once (rather than holding what
        follows it for the gap timeout) keeps the exchanges after it.
        """
        if self._next_seq is None:
            return []
        if self._peer_ack is None or seq_diff(ack, self._peer_ack) > 0:
            self._peer_ack = ack
        if self._pending:
            return self._skip_acked()
        return []

    def note_peer_ack(self, ack: int) -> None:
        """:meth:`peer_acked` for a stream with no hole (the fast path)."""
        if self._next_seq is not None:
            self._peer_ack = ack

    def _skip_acked(self) -> list[Chunk]:
        assert self._peer_ack is not None
        out: list[Chunk] = []
        while self._pending:
            assert self._next_seq is not None
            acked = seq_diff(self._peer_ack, self._next_seq)
            if acked <= 0:
                break
            first = min(self._pending)
            out.extend(self._lose(min(self._next_abs + acked, first), first))
        return out

    def expire(self, now_ns: int) -> list[Chunk]:
        """Give up on a hole that has waited longer than the gap timeout."""
        if self._pending and now_ns - min(c.ts_ns for c in self._pending.values()) > (
            self._limits.gap_timeout_ns
        ):
            return self.skip_gap()
        return []

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def skip_gap(self) -> list[Chunk]:
        """Declare the first hole lost: an empty chunk spans it, then drain."""
        if not self._pending:
            return []
        first = min(self._pending)
        return self._lose(first, first)

    def _lose(self, end: int, first: int) -> list[Chunk]:
        """Bytes from the cursor to ``end`` are lost: a hole chunk spans them, then drain.

        ``first`` is the first held offset; the hole takes its timestamp.
        """
        hole = end - self._next_abs
        self.gap_bytes += hole
        out = [Chunk(self._next_abs, hole, b"", b"", self._pending[first].ts_ns, 0, True)]
        self._advance(end)
        out.extend(self._drain())
        return out

    def flush(self) -> list[Chunk]:
        """Deliver everything held, holes included (the connection is ending)."""
        out: list[Chunk] = []
        while self._pending:
            out.extend(self.skip_gap())
        return out

    def _drain(self) -> list[Chunk]:
        out: list[Chunk] = []
        pending = self._pending
        while pending:
            # Held chunks may start before the cursor once a longer one landed.
            ready = [o for o in pending if o <= self._next_abs]
            if not ready:
                break
            for o in sorted(ready):
                chunk = pending.pop(o)
                self._budget.give(len(chunk.data))
                if chunk.end <= self._next_abs:
                    self.duplicates += 1
                    continue
                if chunk.offset < self._next_abs:
                    trim = self._next_abs - chunk.offset
                    chunk = chunk.split(trim)[1]
                out.append(chunk)
                self._advance(chunk.end)
        return out

    def _advance(self, end_abs: int) -> None:
        assert self._next_seq is not None
        self._next_seq = (self._next_seq + (end_abs - self._next_abs)) % _MOD
        self._next_abs = end_abs
