"""HPACK header blocks to header fields, for a passive observer.

A real HPACK decoder (``hpack.Decoder``) has seen every header block of its
direction since the connection began, so any index it is sent is in its
table, and one it does not have is a fatal error. A tracer is not so lucky:
it may pick a connection up mid-stream, and lose segments (a full ring)
that carried header blocks. The dynamic table it knows is then only the
newest part of the real one, or nothing.

This module keeps its own dynamic table for that reason, and uses the
``hpack`` library for everything else: the static table, integer and
Huffman decoding, and entry sizes. The table holds what we know of the
real one, newest first, and is always a prefix of it or the real one a
prefix of ours: both add the same entries at the front and evict only at
the back, so index *i* means the same entry on both sides whenever we
have an *i*-th entry. An index past our end is reported as unknown, never
guessed. An entry whose name we could not resolve, or whose bytes the
budget refused, stays in the table as a placeholder, so the entries after
it keep their indices.

When the sizes we track differ from the real ones (a table size we never
saw announced, an entry with an unknown name), we keep entries too long or
drop them too early; either way the prefix property holds, so that costs
only decoding, never correctness. Lost bytes clear the table: a header
block in them may have added entries at the front. Decoding resumes as new
entries arrive, or at once after a dynamic table size update to 0.

Work is linear in the block; held bytes (the table's names and values) are
taken from the core's :class:`~clovisor.core.budget.Budget`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hpack import HPACKDecodingError
from hpack.hpack import decode_integer
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable, table_entry_size

from .budget import UNLIMITED, Budget

_STATIC = HeaderTable.STATIC_TABLE
_N_STATIC = len(_STATIC)

MAX_TABLE_SIZE = 65536
"""The largest dynamic table kept per connection and direction, whatever the peer announced."""

DEFAULT_TABLE_SIZE = 4096
"""SETTINGS_HEADER_TABLE_SIZE until a peer announces another (RFC 9113, 6.5.2)."""

MAX_RECORDED_FIELDS = 32
"""Fields of interest kept from one header block; the rest are counted as dropped."""

# An entry: name and value, or None where unknown; its size as HPACK counts it.
_Entry = tuple[bytes | None, bytes | None, int]
_UNKNOWN: _Entry = (None, None, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodedBlock:
    """What one header block said, as far as it could be known."""

    fields: tuple[tuple[str, str], ...]  # the fields asked for, in order (names lower-case)
    unknown: int = 0  # fields whose name (so also whether they were wanted) is unknown
    dropped: int = 0  # wanted fields beyond MAX_RECORDED_FIELDS
    error: bool = False  # not valid HPACK: the rest of the block is unknown

    @property
    def incomplete(self) -> bool:
        return self.unknown > 0 or self.error


class FieldDecoder:
    """One direction's HPACK state: header blocks in, known fields out. Never raises."""

    __slots__ = ("_budget", "_cap", "_entries", "_held", "_max", "_size", "errors")

    def __init__(self, *, synced: bool, budget: Budget = UNLIMITED) -> None:
        self._budget = budget
        self._entries: deque[_Entry] = deque()  # newest first
        self._size = 0  # HPACK size of the entries
        self._held = 0  # name and value bytes taken from the budget
        self._cap = MAX_TABLE_SIZE
        # Seen from its start, the table's maximum is the protocol's default
        # until the encoder changes it; picked up mid-stream it is unknown,
        # and keeping too much is the safe side (see the module docstring).
        self._max = DEFAULT_TABLE_SIZE if synced else MAX_TABLE_SIZE
        self.errors = 0  # blocks that were not valid HPACK

    @property
    def held_bytes(self) -> int:
        return self._held

    @property
    def entries(self) -> int:
        return len(self._entries)

    def announce(self, table_size: int) -> None:
        """The decoding endpoint's SETTINGS_HEADER_TABLE_SIZE: an upper bound for the table."""
        self._cap = max(0, min(table_size, MAX_TABLE_SIZE))
        if self._max > self._cap:
            self._max = self._cap
            self._evict()

    def lose(self) -> None:
        """Header blocks may have gone by unseen: nothing we hold is known to be in place."""
        self._entries.clear()
        self._size = 0
        self._budget.give(self._held)
        self._held = 0

    release = lose

    def decode(self, block: bytes, wanted: frozenset[bytes], *, complete: bool) -> DecodedBlock:
        """Decode a header block; report the fields named in ``wanted``.

        ``complete`` is False for a block cut short (beyond the capture, or
        over the size bound): what it holds is decoded, and since the rest
        may have added entries, the table is lost after it.
        """
        out: list[tuple[str, str]] = []
        unknown = dropped = 0
        error = False
        mv = memoryview(block)
        n = len(block)
        pos = 0
        fields_seen = False
        try:
            while pos < n:
                first = block[pos]
                name: bytes | None
                value: bytes | None
                if first & 0x80:  # indexed field
                    index, used = _integer(mv, pos, 7)
                    pos += used
                    if index == 0:
                        raise HPACKDecodingError("index 0")
                    name, value, _ = self._entry(index)
                elif first & 0x20 and not first & 0x40:  # dynamic table size update
                    if fields_seen:
                        raise HPACKDecodingError("table size update after a field")
                    size, used = _integer(mv, pos, 5)
                    pos += used
                    self._resize(size)
                    continue
                else:  # a literal: with incremental indexing (01), without (0000) or never (0001)
                    indexing = bool(first & 0x40)
                    index, used = _integer(mv, pos, 6 if indexing else 4)
                    pos += used
                    if index:
                        name = self._entry(index)[0]
                    else:
                        name, pos = _string(block, mv, pos, decode=True)
                    # Only a value we report or keep is worth its Huffman decoding.
                    keep = indexing or (name is not None and name in wanted)
                    value, pos = _string(block, mv, pos, decode=keep)
                    if indexing:
                        self._add(name, value)
                fields_seen = True
                if name is None:
                    unknown += 1
                elif name in wanted:
                    if value is None:
                        unknown += 1
                    elif len(out) < MAX_RECORDED_FIELDS:
                        out.append((name.decode("latin-1"), value.decode("latin-1")))
                    else:
                        dropped += 1
        except _CutOff:
            error = complete
        except (HPACKDecodingError, ValueError, IndexError):
            error = True
        if error:
            self.errors += 1
        if error or not complete:
            unknown += 1  # the rest of the block
            self.lose()
        return DecodedBlock(fields=tuple(out), unknown=unknown, dropped=dropped, error=error)

    # -- the table --------------------------------------------------------------

    def _entry(self, index: int) -> _Entry:
        if index <= _N_STATIC:
            name, value = _STATIC[index - 1]
            return name, value, 0
        i = index - _N_STATIC - 1
        if i < len(self._entries):
            return self._entries[i]
        return _UNKNOWN

    def _add(self, name: bytes | None, value: bytes | None) -> None:
        if name is None or value is None:
            # Its size is at least this; too little only keeps entries longer (safe).
            entry: _Entry = (None, None, 32 + (len(value) if value is not None else 0))
        else:
            size = table_entry_size(name, value)
            if size > self._max:
                self.lose()  # RFC 7541, 4.4: an entry larger than the table empties it
                return
            held = len(name) + len(value)
            if self._budget.take(held):
                self._held += held
                entry = (name, value, size)
            else:
                entry = (None, None, size)
        self._entries.appendleft(entry)
        self._size += entry[2]
        self._evict()

    def _resize(self, size: int) -> None:
        # Beyond what was announced (or our ceiling) we keep less: safe, see above.
        self._max = min(size, self._cap)
        if size == 0:
            self.lose()  # the real table is empty too: it is known again
        self._evict()

    def _evict(self) -> None:
        entries = self._entries
        while self._size > self._max and entries:
            name, value, size = entries.pop()
            self._size -= size
            if name is not None and value is not None:
                held = len(name) + len(value)
                self._held -= held
                self._budget.give(held)


class _CutOff(Exception):
    """The block ends inside a field."""


def _integer(mv: memoryview, pos: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer at ``pos`` (at most 5 bytes, as ``hpack`` allows) and its length."""
    mask = (1 << prefix_bits) - 1
    small = mv[pos] & mask
    if small != mask:
        return small, 1  # fits its prefix: most indices and lengths (hpack logs each call)
    try:
        return decode_integer(mv[pos:], prefix_bits)
    except HPACKDecodingError:
        rest = mv[pos + 1 : pos + 5]
        if len(mv) - pos < 5 and all(b & 0x80 for b in rest):
            raise _CutOff from None  # the block ends inside the integer
        raise


def _string(block: bytes, mv: memoryview, pos: int, *, decode: bool) -> tuple[bytes | None, int]:
    """A string literal at ``pos``: its bytes (None when not decoded) and the next position."""
    if pos >= len(block):
        raise _CutOff
    huffman = block[pos] & 0x80
    length, used = _integer(mv, pos, 7)
    start = pos + used
    end = start + length
    if end > len(block):
        raise _CutOff
    if not decode:
        return None, end
    raw = block[start:end]
    return (decode_huffman(raw) if huffman else raw), end


__all__ = ["DEFAULT_TABLE_SIZE", "MAX_TABLE_SIZE", "DecodedBlock", "FieldDecoder"]
