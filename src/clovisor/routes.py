"""Request paths -> low-cardinality ``http.route`` values for metric labels.

A metric label that takes the raw path gets one time series per user id,
per session token, per scanner probe: Prometheus falls over long before the
agent does. So every path is *folded* into a route template:

1. **User patterns** (``--route``), tried in order, first match wins. A
   pattern is a path of ``/``-separated segments:

   - a literal segment matches itself exactly (case-sensitive);
   - ``{name}`` matches exactly one non-empty segment;
   - ``{name...}`` or ``*``, only as the last segment, matches the rest of
     the path (zero or more segments, slashes included), as in Go 1.22's
     ``net/http`` patterns.

   The route is the pattern text itself: ``/users/{id}`` for ``/users/42``.

2. **The heuristic**, for paths no pattern matches. A segment becomes
   ``{id}`` when it is

   - a number, or digit groups joined by ``-_.:,`` (``42``, ``2024-05-01``,
     ``1.2.3``, ``10.0.0.1``, ``12:30:00``);
   - a UUID (8-4-4-4-12 hex digits, any case);
   - 16 or more hex digits (hashes, object ids, trace ids);
   - a token of 16 or more URL-safe characters (``A-Z a-z 0-9 - _ . ~ + = %``)
     with at least two digits (ULIDs, base64url tokens, pod names). Readable
     words such as ``reset-password`` or ``getUserProfileV2`` (one digit)
     stay;
   - 40 characters or longer, whatever it holds;
   - anything but printable ASCII (a valid request-target is ASCII; the rest
     is noise or an attack, and it must not reach a label).

   A segment ``STEM.EXT`` with a short alphabetic extension keeps the
   extension when the stem is an id: ``/avatars/123.png`` ->
   ``/avatars/{id}.png``.

3. **A cap**: the heuristic's distinct outputs are counted, and once
   ``max_routes`` (default 1,000) are known, any *new* one becomes
   ``/{other}``; routes already known keep working. A route longer than
   ``max_route_length`` (default 200 characters) is ``/{other}`` too.

So the labels one folder can produce are at most ``max_routes`` + the number
of patterns + ``/{other}``, ``*`` (``OPTIONS *``) and the empty route (a
CONNECT target, which has no path), whatever the traffic.

Before matching, the query and fragment are cut off, and so are path
parameters (``;jsessionid=...``), which carry session ids.

Folding is idempotent (a route folds to itself) and cached per path; the
cache is cleared when it fills, which bounds its memory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from .specs import SpecError

__all__ = [
    "DEFAULT_MAX_ROUTES",
    "OTHER_ROUTE",
    "RouteFolder",
    "parse_route",
]

OTHER_ROUTE: Final = "/{other}"
ID: Final = "{id}"
DEFAULT_MAX_ROUTES: Final = 1000
DEFAULT_MAX_ROUTE_LENGTH: Final = 200
_CACHE_SIZE: Final = 8192

_PLACEHOLDER_RE: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}")
# Literal pattern segments: printable ASCII without the characters that have
# a meaning in a pattern or that never reach a path (query, fragment, params).
_LITERAL_RE: Final = re.compile(r"[!$&'()+,\-.0-9:=@A-Z_a-z~%]+")

_ID_SEGMENT_RE: Final = re.compile(
    r"\d+(?:[-_.:,]\d+)*"
    r"|[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
    r"|[0-9A-Fa-f]{16,}"
    r"|(?=(?:[^0-9]*[0-9]){2})[A-Za-z0-9\-_.~+=%]{16,}"
)
_LONG_SEGMENT: Final = 40
_EXTENSION_RE: Final = re.compile(r"(.+)(\.[A-Za-z][A-Za-z0-9]{0,4})")


def parse_route(text: str) -> str:
    """Validate one ``--route`` pattern; returns it unchanged.

    Raises :class:`SpecError` with one line naming the pattern and the fault.
    """
    _compile_pattern(text)
    return text


def _compile_pattern(text: str) -> str:
    """A pattern -> regex source (without anchors); SpecError if malformed."""
    if not text.startswith("/"):
        raise SpecError(f"route {text!r}: must start with /")
    segments = text[1:].split("/")
    names: set[str] = set()
    parts: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        m = _PLACEHOLDER_RE.fullmatch(seg)
        if m is not None or seg == "*":
            rest = seg == "*" or (m is not None and m.group(2) is not None)
            if m is not None:
                name = m.group(1)
                if name in names:
                    raise SpecError(f"route {text!r}: placeholder {{{name}}} appears twice")
                names.add(name)
            if rest:
                if i != last:
                    raise SpecError(f"route {text!r}: {seg} must be the last segment")
                parts.append(".*")
            else:
                parts.append("[^/]+")
        elif "{" in seg or "}" in seg or "*" in seg:
            raise SpecError(
                f"route {text!r}: bad segment {seg!r} (use {{name}}, {{name...}} or * "
                "as a whole segment)"
            )
        elif seg == "" and i != last:
            raise SpecError(f"route {text!r}: empty segment (//)")
        elif seg and _LITERAL_RE.fullmatch(seg) is None:
            raise SpecError(f"route {text!r}: segment {seg!r} has characters a path cannot hold")
        else:
            parts.append(re.escape(seg))
    return "/" + "/".join(parts)


def _is_id(seg: str) -> bool:
    if len(seg) >= _LONG_SEGMENT or not (seg.isascii() and seg.isprintable()):
        return True
    return _ID_SEGMENT_RE.fullmatch(seg) is not None


def _fold_segment(seg: str) -> str:
    if _is_id(seg):
        return ID
    if "." in seg:
        m = _EXTENSION_RE.fullmatch(seg)
        if m is not None and _is_id(m.group(1)):
            return ID + m.group(2)
    return seg


def _normalise(path: str) -> str:
    """Cut what never belongs in a route: query, fragment, path parameters."""
    for sep in "?#":
        if sep in path:
            path = path.partition(sep)[0]
    if ";" in path:
        path = "/".join(seg.partition(";")[0] for seg in path.split("/"))
    return path


class RouteFolder:
    """Folds paths (or request-targets) into a bounded set of routes.

    Not thread-safe: one folder belongs to the one stage that observes
    sessions (its cache and cap are plain dicts and sets).
    """

    __slots__ = (
        "_cache",
        "_fixed",
        "_known",
        "_matcher",
        "_max_length",
        "_max_routes",
        "patterns",
    )

    def __init__(
        self,
        patterns: Sequence[str] = (),
        *,
        max_routes: int = DEFAULT_MAX_ROUTES,
        max_route_length: int = DEFAULT_MAX_ROUTE_LENGTH,
    ) -> None:
        if max_routes < 1:
            raise ValueError("max_routes must be >= 1")
        self.patterns: tuple[str, ...] = tuple(patterns)
        # One alternation of anchored groups: the regex engine tries them in
        # order, so the first pattern that matches wins, in one C-level call.
        # Placeholders are non-capturing, so lastindex names the pattern.
        sources = [f"({_compile_pattern(p)})" for p in self.patterns]
        self._matcher = re.compile("|".join(sources)) if sources else None
        # Outputs that are not heuristic routes fold to themselves. Checked
        # first because a route text may match an earlier, broader pattern
        # that the original path did not ("/a/*" matches "/{x}/{y}").
        self._fixed = frozenset((*self.patterns, OTHER_ROUTE))
        self._max_routes = max_routes
        self._max_length = max_route_length
        self._known: set[str] = set()
        self._cache: dict[str, str] = {}

    def fold(self, path: str) -> str:
        """The route for a path (a query, if any, is ignored)."""
        if "?" in path:
            # Cut before the cache lookup: cache-busting queries would
            # otherwise make every request a miss.
            path = path.partition("?")[0]
        route = self._cache.get(path)
        if route is None:
            route = self._fold(path)
            if len(self._cache) >= _CACHE_SIZE:
                # A scanner sending unique paths would otherwise grow the
                # cache without bound; refilling it is cheap.
                self._cache.clear()
            self._cache[path] = route
        return route

    def fold_target(self, target: str) -> str:
        """The route for an HTTP request-target in any of its four forms."""
        if target.startswith("/"):  # origin-form: the common case, no copy
            return self.fold(target)
        if target == "*":  # OPTIONS *
            return "*"
        scheme, sep, rest = target.partition("://")
        if sep and scheme.isalnum():  # absolute-form (requests to a proxy)
            end = len(rest)
            for ch in "/?#":  # the authority ends at the first of these
                idx = rest.find(ch)
                if 0 <= idx < end:
                    end = idx
            if end == len(rest) or rest[end] != "/":
                return self.fold("/")
            return self.fold(rest[end:])
        return ""  # authority-form (CONNECT host:port) has no path

    @property
    def known_routes(self) -> int:
        """Distinct heuristic routes seen so far (patterns not included)."""
        return len(self._known)

    def _fold(self, raw: str) -> str:
        path = _normalise(raw)
        if path in self._fixed:
            return path
        matcher = self._matcher
        if matcher is not None:
            m = matcher.fullmatch(path)
            if m is not None and m.lastindex is not None:
                return self.patterns[m.lastindex - 1]
        if not path.startswith("/"):
            return OTHER_ROUTE
        route = "/".join([_fold_segment(seg) if seg else seg for seg in path.split("/")])
        if route in self._known:
            return route
        if len(route) > self._max_length:
            return OTHER_ROUTE
        if len(self._known) >= self._max_routes:
            return OTHER_ROUTE
        self._known.add(route)
        return route
