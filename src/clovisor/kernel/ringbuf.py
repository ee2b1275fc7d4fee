"""Read the classifier's ring buffer in bounded batches.

The reader waits on the map fd with epoll (the classifier wakes it only when
enough data is queued, see ``wakeup_bytes``), then decodes at most
``max_records`` records per :meth:`RingReader.poll`; the rest stays in the
ring for the next call. So what user space holds is bounded by records,
whatever the traffic: a reader that falls behind lets the ring fill, and the
kernel counts what it could not queue (``events lost``).

Two ways to walk the ring, same records out:

* ``mapped`` (x86-64): the ring's pages mapped into this process, the way
  libbpf and cilium/ebpf read it, with every record decoded straight from
  the mapping by ``struct.unpack_from``. No callback, no copy per record:
  measured here about 1 µs per record in all, against about 2 µs for the
  libbpf walk below.
* ``libbpf`` (everywhere else): ``ring_buffer__consume``, one ctypes callback
  per record that copies it out. The mapped walk needs loads and stores
  that the CPU keeps in program order, which x86-64 guarantees for plain
  ones (TSO) and Python cannot ask for elsewhere; libbpf's C has the
  barriers.

The ring layout (kernel/bpf/ringbuf.c, as libbpf reads it): the consumer
position in the first page (ours to write), the producer position in the
second, then the data pages, mapped twice in a row so a record that wraps
reads as one. Each record starts with an 8-byte header whose first word is
its length with two flag bits (busy: not committed yet; discarded); records
are 8-byte aligned.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import platform
import select
from typing import Literal

from ..core.events import Record
from . import libbpf
from .abi import decode_at
from .errors import KernelError
from .loader import BpfObject

DEFAULT_MAX_RECORDS = 4096
Walk = Literal["auto", "mapped", "libbpf"]

# Architectures whose plain loads and stores are not reordered with each
# other in the ways that matter here (x86 TSO): the mapped walk is safe.
_TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})

_BUSY = 1 << 31
_DISCARD = 1 << 30
_FLAGS = _BUSY | _DISCARD
_HDR = 8

_p = ctypes.c_void_p
_int = ctypes.c_int

# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
_SAMPLE_FN = ctypes.CFUNCTYPE(_int, _p, _p, ctypes.c_size_t)

_rb_new = libbpf.bind("ring_buffer__new", _p, _int, _SAMPLE_FN, _p, _p)
_rb_consume = libbpf.bind("ring_buffer__consume", _int, _p)
_rb_free = libbpf.bind("ring_buffer__free", None, _p)

_STOP = -errno.EAGAIN  # our callback's "batch full": libbpf stops after this record


def default_walk() -> Literal["mapped", "libbpf"]:
    return "mapped" if platform.machine().lower() in _TSO_MACHINES else "libbpf"


class RingReader:
    """Decoded batches of records (segments, exchanges, handovers) from the ``events`` map.

    Not thread-safe: one reader thread per ring. ``malformed`` counts the
    records that did not decode (they are dropped, never raised); ``more``
    says whether the last :meth:`poll` stopped at ``max_records``.
    """

    def __init__(
        self, obj: BpfObject, *, max_records: int = DEFAULT_MAX_RECORDS, walk: Walk = "auto"
    ) -> None:
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        self.max_records = max_records
        self.malformed = 0
        self.more = False
        self.walk: Literal["mapped", "libbpf"] = default_walk() if walk == "auto" else walk
        fd = obj.map_fd("events")
        self._epoll: select.epoll | None = select.epoll()
        self._mapped: _MappedRing | None = None
        self._libbpf: _LibbpfRing | None = None
        try:
            self._epoll.register(fd, select.EPOLLIN)
            if self.walk == "mapped":
                self._mapped = _MappedRing(fd, obj.ring_bytes)
            else:
                self._libbpf = _LibbpfRing(fd)
        except BaseException:
            self.close()
            raise

    def poll(self, timeout_ms: int) -> list[Record]:
        """Wait up to ``timeout_ms`` for a wake-up, then drain up to ``max_records``.

        The drain is unconditional: on a timeout it collects what arrived
        below the wake-up threshold. After a drain that stopped at the limit
        there is no wait at all: what is queued would not wake the reader
        again (only a record that crosses the threshold does), so waiting
        could leave a full ring unread until the timeout.
        """
        ep = self._live()
        if not self.more:
            # (epoll.poll retries on EINTR by itself, PEP 475)
            ep.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1, 1)
        return self.drain()

    def drain(self) -> list[Record]:
        """Up to ``max_records`` records, without waiting."""
        self._live()
        if self._mapped is not None:
            segments, bad, self.more = self._mapped.drain(self.max_records)
        else:
            assert self._libbpf is not None
            segments, bad, self.more = self._libbpf.drain(self.max_records)
        self.malformed += bad
        return segments

    def backlog(self) -> int | None:
        """Bytes queued in the ring right now (mapped walk; None with libbpf's)."""
        self._live()
        return self._mapped.backlog() if self._mapped is not None else None

    def epoll_fd(self) -> int:
        """An fd that turns readable when the classifier wakes the reader."""
        return self._live().fileno()

    def _live(self) -> select.epoll:
        if self._epoll is None:
            raise KernelError("ring reader is closed", errno.EBADF)
        return self._epoll

    def close(self) -> None:
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        if self._libbpf is not None:
            self._libbpf.close()
            self._libbpf = None
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def walk_records(
    data: mmap.mmap | bytes,
    words: memoryview,
    data_off: int,
    cons: int,
    prod: int,
    mask: int,
    limit: int,
) -> tuple[list[Record], int, int]:
    """Decode the committed records between ``cons`` and ``prod``, at most ``limit``.

    ``data[data_off:]`` is the ring's data area, mapped twice in a row, and
    ``words`` the same memory as 32-bit words; ``mask`` is the data size - 1.
    Returns the segments, the new consumer position and how many records
    did not decode; stops early at a record that is not committed yet.
    Pure: the tests run it on a ring laid out in bytes.
    """
    out: list[Record] = []
    append = out.append
    decode = decode_at
    bad = 0
    while cons < prod and limit > 0:
        pos = data_off + (cons & mask)
        # One aligned 32-bit load: the kernel commits the length word in one store.
        word: int = words[pos >> 2]
        if word & _FLAGS:
            if word & _BUSY:
                break  # not committed yet: the next walk starts here
            cons += ((word & ~_FLAGS) + _HDR + 7) & ~7  # discarded
            continue
        cons += (word + _HDR + 7) & ~7
        limit -= 1
        try:
            append(decode(data, pos + _HDR, word))
        except KernelError:
            bad += 1
    return out, cons, bad


class _MappedRing:
    """The ring's pages in this process; see the module docstring."""

    def __init__(self, fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self._page = page
        self._mask = size - 1
        try:
            self._cons_map = mmap.mmap(
                fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
            )
            self._data = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        except OSError as exc:
            raise KernelError(f"mapping the ring buffer failed: {exc}", exc.errno or 0) from exc
        # 64-bit positions read and written whole, as one aligned load or
        # store each (struct.pack_into writes byte by byte: the kernel could
        # see a torn consumer position).
        self._cons = memoryview(self._cons_map).cast("Q")
        self._prod = memoryview(self._data).cast("Q")
        self._words = memoryview(self._data).cast("I")

    def drain(self, limit: int) -> tuple[list[Record], int, bool]:
        prod = self._prod[0]
        out, cons, bad = walk_records(
            self._data, self._words, self._page, self._cons[0], prod, self._mask, limit
        )
        # After every record is copied out: the kernel may overwrite from here.
        self._cons[0] = cons
        return out, bad, cons < prod

    def backlog(self) -> int:
        return int(self._prod[0] - self._cons[0])

    def close(self) -> None:
        self._cons.release()
        self._prod.release()
        self._words.release()
        self._cons_map.close()
        self._data.close()


class _LibbpfRing:
    """libbpf's ring walk: a callback per record copies it; decoding follows."""

    def __init__(self, fd: int) -> None:
        self._raw: list[bytes] = []
        self._limit = DEFAULT_MAX_RECORDS
        # Kept referenced for the ring's lifetime: libbpf holds only the pointer.
        self._callback = _SAMPLE_FN(self._on_sample)
        rb: int | None = _rb_new(fd, self._callback, None, None)
        self._rb: int | None = libbpf.check_ptr(rb, "ring_buffer__new(events)")

    def _on_sample(self, _ctx: int | None, data: int, size: int) -> int:
        raw = self._raw
        raw.append(ctypes.string_at(data, size))
        # This record is consumed either way; a negative return stops the walk after it.
        return _STOP if len(raw) >= self._limit else 0

    def drain(self, limit: int) -> tuple[list[Record], int, bool]:
        assert self._rb is not None
        self._limit = limit
        rc = _rb_consume(self._rb)
        if rc < 0 and rc != _STOP:
            libbpf.check(rc, "ring_buffer__consume")
        raw, self._raw = self._raw, []
        out: list[Record] = []
        bad = 0
        for record in raw:
            try:
                out.append(decode_at(record, 0, len(record)))
            except KernelError:
                bad += 1
        return out, bad, rc == _STOP

    def close(self) -> None:
        if self._rb is not None:
            _rb_free(self._rb)
            self._rb = None
