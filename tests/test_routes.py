"""Route folding: patterns first, a bounded heuristic after, idempotent."""

from __future__ import annotations

import string
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clovisor.routes import OTHER_ROUTE, RouteFolder, parse_route
from clovisor.specs import SpecError

PATTERNS = ["/users/{id}", "/api/{version}/items/{item}", "/static/{path...}", "/files/*"]

segment_chars = string.ascii_letters + string.digits + "-_.~%:=+,@!$&'()"
segments = st.one_of(
    st.text(segment_chars, min_size=0, max_size=24),
    st.integers(0, 10**12).map(str),
    st.uuids().map(str),
    st.sampled_from(["users", "api", "v1", "items", "static", "files", "{id}", "*", "{x...}"]),
    st.text(min_size=1, max_size=8),  # anything, non-ASCII and controls included
)
paths = st.lists(segments, min_size=0, max_size=6).map(lambda segs: "/" + "/".join(segs))
raw_paths = st.one_of(
    paths,
    st.tuples(paths, st.text(max_size=20)).map(lambda t: t[0] + "?" + t[1]),
    st.tuples(paths, st.text(max_size=20)).map(lambda t: t[0] + ";" + t[1]),
    st.text(max_size=40),
)


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/users/42", "/users/{id}"),
        ("/users/alice", "/users/{id}"),  # a pattern placeholder takes any segment
        ("/users/42/orders", "/users/{id}/orders"),  # no pattern: heuristic
        ("/api/v2/items/abc", "/api/{version}/items/{item}"),
        ("/static/", "/static/{path...}"),
        ("/static/css/site.css", "/static/{path...}"),
        ("/files/a/b/c", "/files/*"),
        ("/orders/123/lines/7", "/orders/{id}/lines/{id}"),
        ("/o/3FA85F64-5717-4562-B3FC-2C963F66AFA6", "/o/{id}"),
        ("/commit/0123456789abcdef", "/commit/{id}"),  # 16 hex
        ("/commit/0123456789abcde", "/commit/0123456789abcde"),  # 15 hex: a word?
        ("/t/01ARZ3NDEKTSV4RRFFQ69G5FAV", "/t/{id}"),  # ULID
        ("/pods/web-7d9f8c6b5-x2x7k", "/pods/{id}"),
        ("/reset-password", "/reset-password"),
        ("/getUserProfileV2", "/getUserProfileV2"),
        ("/api/v1/health", "/api/v1/health"),
        ("/day/2024-05-01", "/day/{id}"),
        ("/release/1.2.3", "/release/{id}"),
        ("/avatars/123.png", "/avatars/{id}.png"),
        ("/index.html", "/index.html"),
        ("/x/" + "a" * 40, "/x/{id}"),
        ("/caf\u00e9", "/{id}"),
        ("/a\x00b", "/{id}"),
        ("/login;jsessionid=ABC123", "/login"),
        ("/search?q=secret&token=abc", "/search"),
        ("/", "/"),
        ("/users/", "/users/"),
        ("", OTHER_ROUTE),
    ],
)
def test_fold(path: str, route: str) -> None:
    assert RouteFolder(PATTERNS).fold(path) == route


def test_first_pattern_wins() -> None:
    folder = RouteFolder(["/users/me", "/users/{id}", "/{a}/{b}"])
    assert folder.fold("/users/me") == "/users/me"
    assert folder.fold("/users/7") == "/users/{id}"
    assert folder.fold("/orders/7") == "/{a}/{b}"


def test_fold_target_forms() -> None:
    folder = RouteFolder(["/users/{id}"])
    assert folder.fold_target("/users/1?x=1") == "/users/{id}"
    assert folder.fold_target("http://example.com/users/1?x=1") == "/users/{id}"
    assert folder.fold_target("http://example.com") == "/"
    assert folder.fold_target("http://example.com?u=/users/1") == "/"
    assert folder.fold_target("*") == "*"
    assert folder.fold_target("example.com:443") == ""


def test_cap() -> None:
    folder = RouteFolder(max_routes=3)
    assert [folder.fold(f"/{w}") for w in ("a", "b", "c", "d", "e")] == [
        "/a",
        "/b",
        "/c",
        OTHER_ROUTE,
        OTHER_ROUTE,
    ]
    assert folder.fold("/b") == "/b"  # known routes keep working
    assert folder.fold("/b/1") == OTHER_ROUTE
    assert folder.known_routes == 3


def test_long_route_is_other() -> None:
    assert RouteFolder(max_route_length=20).fold("/abcdefghij/abcdefghij/x") == OTHER_ROUTE


def test_scanner_cannot_explode_cardinality() -> None:
    folder = RouteFolder(max_routes=100)
    routes = {folder.fold(f"/probe-{uuid.uuid4().hex[:8]}x/admin") for _ in range(5000)}
    assert len(routes) <= 101
    assert OTHER_ROUTE in routes


@given(st.lists(raw_paths, max_size=200), st.integers(1, 20))
def test_cardinality_bounded(raw: list[str], max_routes: int) -> None:
    folder = RouteFolder(PATTERNS, max_routes=max_routes)
    out = {folder.fold(p) for p in raw}
    assert len(out - set(PATTERNS) - {OTHER_ROUTE}) <= max_routes


@given(st.lists(raw_paths, min_size=1, max_size=50))
def test_idempotent(raw: list[str]) -> None:
    folder = RouteFolder(PATTERNS, max_routes=10)
    for p in raw:
        route = folder.fold(p)
        assert folder.fold(route) == route
        assert RouteFolder(PATTERNS).fold(route) == route  # whatever folded it


@given(
    st.lists(st.sampled_from(["a", "orders", "x-y", "v1"]), max_size=3),
    st.one_of(st.integers(0, 10**30).map(str), st.uuids().map(str)),
    st.lists(st.sampled_from(["b", "lines", "index.html"]), max_size=3),
)
def test_ids_always_folded(before: list[str], ident: str, after: list[str]) -> None:
    path = "/" + "/".join([*before, ident, *after])
    route = RouteFolder().fold(path)
    assert route == "/" + "/".join([*before, "{id}", *after])


@given(
    st.lists(st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=20), max_size=4)
)
def test_patterns_win(segs: list[str]) -> None:
    folder = RouteFolder(["/p/{x}/{y...}", "/p/{z}"])
    path = "/p/seg/" + "/".join(segs)
    assert folder.fold(path) == "/p/{x}/{y...}"


@given(raw_paths)
@settings(max_examples=300)
def test_route_is_label_safe(path: str) -> None:
    route = RouteFolder(PATTERNS).fold(path)
    assert route.isascii() and route.isprintable()
    assert "?" not in route and ";" not in route


@pytest.mark.parametrize(
    "bad",
    [
        "users/{id}",
        "/users/{id",
        "/users/{id}x",
        "/a/{x...}/b",
        "/a/*/b",
        "/{x}/{x}",
        "/a//b",
        "/a b",
        "/a?b",
        "/{1x}",
        "",
    ],
)
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_route(bad)
    assert "\n" not in str(exc.value)
    assert repr(bad) in str(exc.value)
    with pytest.raises(SpecError):
        RouteFolder([bad])


@pytest.mark.parametrize("good", ["/", "/users/{id}", "/a/{rest...}", "/a/*", "/a/", "/v1.2/x"])
def test_good_patterns(good: str) -> None:
    assert parse_route(good) == good
