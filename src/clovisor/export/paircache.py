"""Encoded attribute pairs that repeat from span to span, bounded.

Most of a Clovisor span's attribute *pairs* recur (``http.request.method=GET``,
``server.port=8080``, ``network.transport=tcp``, the status, the interface),
so an encoder encodes each distinct pair once and reuses the fragment. The
OTLP/protobuf and OTLP/JSON encoders share this policy:

* only small values with an exact, hashable identity are cached: str, int
  and bool (keyed with their type, since ``True == 1``) and lists or tuples
  of strings (header values arrive as one-element lists, keyed as a tuple),
  up to ``max_value_length`` characters;
* a key that has shown more than ``max_values_per_key`` distinct values (a
  client port, a request id) becomes *volatile*: caching it would only churn
  the cache, so its pairs are encoded every time (its cached ones stay valid);
* past ``max_pairs`` entries the cache starts over rather than pay for LRU
  bookkeeping on every hit.

:meth:`lookup` walks a span's attributes (one dict and one set lookup per
attribute) and hands back fragments, in order, with the pairs it could not
cache left for the encoder. Not thread-safe on its own: an encoder owns
one, or callers share it under the GIL knowing that a lost insert only
costs a re-encode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

F = TypeVar("F")

PairKey = tuple[str, type, object]

__all__ = ["PairCache", "PairKey"]


class PairCache(Generic[F]):
    """Fragments by (key, value type, value); see the module docstring for the policy."""

    __slots__ = ("_max_len", "_max_pairs", "_max_per_key", "_per_key", "pairs", "volatile")

    def __init__(
        self,
        *,
        max_pairs: int = 16_384,
        max_values_per_key: int = 512,
        max_value_length: int = 256,
    ) -> None:
        self._max_pairs = max_pairs
        self._max_per_key = max_values_per_key
        self._max_len = max_value_length
        self.pairs: dict[PairKey, F] = {}
        self.volatile: set[str] = set()  # keys past max_values_per_key
        self._per_key: dict[str, int] = {}  # distinct values cached per key

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def keys(self) -> int:
        return len(self._per_key)

    def lookup(
        self,
        attributes: Mapping[str, Any],
        encode: Callable[[str, Any], F],
        errors: tuple[type[Exception], ...],
        drop: Callable[[str, Exception], None],
        *,
        encode_uncached: bool = False,
    ) -> list[F | tuple[str, Any]]:
        """Every attribute as its fragment, in order; pairs not cached as (key, value).

        Encodes and caches the pairs it may on the way; with
        ``encode_uncached`` the others are encoded too (not cached), so the
        list holds fragments only. A pair whose encoding raises one of
        ``errors`` is left out and reported to ``drop``. (One loop for both
        encoders, run once per span: a call per attribute would cost more
        than the lookup it makes.)
        """
        pairs = self.pairs
        volatile = self.volatile
        out: list[F | tuple[str, Any]] = []
        append = out.append
        value: Any
        for key, value in attributes.items():
            vtype = type(value)
            if vtype is str or vtype is int or vtype is bool:
                fragment = pairs.get((key, vtype, value))
            elif vtype is list or vtype is tuple:
                try:
                    fragment = pairs.get((key, vtype, tuple(value)))
                except TypeError:  # unhashable items: never cached
                    fragment = None
            else:
                fragment = None
            if fragment is None:
                try:
                    if key not in volatile:
                        fragment = self.miss(key, vtype, value, encode)
                    if fragment is None and encode_uncached:
                        fragment = encode(key, value)
                except errors as exc:
                    drop(key, exc)
                    continue
            append((key, value) if fragment is None else fragment)
        return out

    def miss(
        self, key: str, vtype: type, value: Any, encode: Callable[[str, Any], F]
    ) -> F | None:
        """The fragment for a pair not found in :attr:`pairs`, cached if it may be.

        ``encode(key, value)`` makes the fragment; it may raise (an unencodable value),
        and then nothing is cached. None: the pair is not cacheable, encode
        it directly.
        """
        if key in self.volatile:
            return None
        hkey: PairKey
        if vtype is str:
            if len(value) > self._max_len:
                return None
            hkey = (key, vtype, value)
        elif vtype is int or vtype is bool:
            hkey = (key, vtype, value)
        elif vtype is list or vtype is tuple:
            items = tuple(value)
            if not all(type(v) is str for v in items) or sum(map(len, items)) > self._max_len:
                return None
            hkey = (key, vtype, items)
        else:
            # Floats (0.0 == -0.0, NaN != NaN), bytes, mappings: not worth it.
            return None
        seen = self._per_key.get(key, 0)
        if seen >= self._max_per_key:
            # A high-cardinality key (a port, an id): caching it would only
            # evict useful pairs. Its cached values stay valid.
            self.volatile.add(key)
            return None
        if len(self.pairs) >= self._max_pairs:
            # Rare (thousands of distinct cacheable pairs): start over rather
            # than pay for LRU bookkeeping on every hit.
            self.pairs.clear()
            self._per_key.clear()
            self.volatile.clear()
            seen = 0
        fragment = encode(key, value)
        self.pairs[hkey] = fragment
        self._per_key[key] = seen + 1
        return fragment
