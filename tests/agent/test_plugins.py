"""Parser plugins: only installed parsers load, broken ones are disabled, never fatal."""

from __future__ import annotations

import importlib
import logging
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import clovisor.parsers
from clovisor.agent.plugins import (
    GuardedConnection,
    ParserFactory,
    ParserRegistry,
    check_reference,
)
from clovisor.core.events import Outcome, Protocol, Role, Segment, Session
from clovisor.core.reassembly import ReassemblyLimits
from clovisor.core.sessions import Connection, Endpoints, HttpConnection, Stats, TcpConnection
from clovisor.parsers.lineproto import LineConnection
from clovisor.specs import SpecError
from tests.core.wire import Conversation

LOGGER = "clovisor.agent.plugins"


def endpoints(port: int = 11211) -> Endpoints:
    return Endpoints(
        role=Role.SERVER,
        protocol=Protocol.TCP,
        ifindex=7,
        family=4,
        client_addr="10.200.1.2",
        client_port=40000,
        server_addr="10.200.0.2",
        server_port=port,
    )


def run(
    factory: ParserFactory,
    segments: list[Segment],
    *,
    synced: bool = True,
    stats: Stats | None = None,
    port: int = 11211,
) -> tuple[Connection, list[Session]]:
    """Feed one connection's segments the way the Tracker does."""
    out: list[Session] = []
    conn = factory(endpoints(port), ReassemblyLimits(), stats or Stats(), out, synced=synced)
    for seg in segments:
        conn.feed(seg)
        if conn.finished:
            break
    if not conn.finished:
        conn.flush_and_end(Outcome.SHUTDOWN, segments[-1].ts_ns + 1)
    return conn, out


def conversation() -> Conversation:
    return Conversation(sport=11211, protocol=Protocol.TCP)


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER)


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[
    Callable[[str, str], str]
]:
    """Write modules into a temp dir that is part of ``clovisor.parsers`` for this test only.

    Returns ``write(stem, source) -> unique module name``. No bytecode is
    written, so a rewrite is never shadowed by a stale .pyc of the same size
    and mtime second.
    """
    pkg = tmp_path / "plugins"
    pkg.mkdir()
    monkeypatch.setattr(clovisor.parsers, "__path__", [*clovisor.parsers.__path__, str(pkg)])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    names: list[str] = []

    def write(stem: str, source: str) -> str:
        name = stem if stem in names else f"{stem}_{uuid.uuid4().hex[:8]}"
        (pkg / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        if name not in names:
            names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(f"clovisor.parsers.{name}", None)


# --- built-ins -------------------------------------------------------------------------------


def test_builtins_present_and_work() -> None:
    reg = ParserRegistry()
    assert reg.names() == ("grpc", "http", "http2", "tcp")
    assert reg.enabled("http") and reg.enabled("tcp")
    assert reg.enabled_names() == frozenset({"http", "tcp", "http2", "grpc"})
    http, tcp = reg.get("http"), reg.get("tcp")
    assert http is not None and tcp is not None

    c = Conversation()
    segs = c.handshake() + c.request(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    segs += c.response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") + c.close()
    conn, out = run(http, segs)
    assert isinstance(conn, HttpConnection)  # built-ins are not wrapped
    assert [(s.request.method, s.response.status_code) for s in out  # type: ignore[union-attr]
            ] == [("GET", 200)]

    conn, out = run(tcp, segs)
    assert isinstance(conn, TcpConnection)
    assert len(out) == 1 and out[0].outcome is Outcome.COMPLETE and out[0].request is None

    with pytest.raises(ValueError):
        reg.register("http", tcp)  # built-ins cannot be replaced from code either
    assert reg.reload("http") is False


def test_kernel_ids_are_given_once_and_kept() -> None:
    reg = ParserRegistry()
    assert reg.kernel_id("http") == Protocol.HTTP and reg.kernel_id("tcp") == Protocol.TCP
    assert reg.kernel_id("http2") == Protocol.HTTP2 and reg.kernel_id("grpc") == Protocol.GRPC
    assert reg.kernel_id("lineproto") == 5 and reg.kernel_id("other") == 6
    assert reg.kernel_id("lineproto") == 5
    assert reg.name_of(5) == "lineproto" and reg.name_of(99) is None
    assert reg.by_id(5) is None  # an id, but no parser loaded for it yet
    assert reg.load("lineproto", "lineproto") is True
    factory = reg.by_id(5)
    assert factory is not None and factory is reg.get("lineproto")
    reg.unload("lineproto")
    assert reg.by_id(5) is None and reg.kernel_id("lineproto") == 5  # never reused
    for i in range(7, 256):
        assert reg.kernel_id(f"p{i}") == i
    assert reg.kernel_id("one_too_many") is None


def test_register_checks_name_and_interface() -> None:
    reg = ParserRegistry()
    with pytest.raises(SpecError):
        reg.register("Bad-Name", LineConnection)
    with pytest.raises(TypeError, match="does not take"):
        reg.register("bad", lambda: None)  # type: ignore[arg-type]
    reg.register("line", LineConnection)
    assert reg.enabled("line")


# --- the example plugin, end to end ------------------------------------------------------------


@pytest.mark.parametrize("reference", ["lineproto", "clovisor.parsers.lineproto"])
def test_lineproto_loads_and_pairs_lines(reference: str) -> None:
    reg = ParserRegistry()
    assert reg.load("lineproto", reference) is True
    assert reg.enabled("lineproto") and reg.error("lineproto") is None
    factory = reg.get("lineproto")
    assert factory is not None

    c = conversation()
    segs = c.handshake()
    segs += c.request(b"get a\r\nget bb\r\n", sizes=[3, 5, 100])  # pipelined, split mid-line
    segs += c.response(b"VALUE a\r\n")
    segs += c.response(b"VAL", ) + c.response(b"UE bb\r\n")
    segs += c.request(b"quit\r\n") + c.close()
    conn, out = run(factory, segs)
    assert isinstance(conn, GuardedConnection) and isinstance(conn.inner, LineConnection)
    assert [(s.outcome, s.request_bytes, s.response_bytes) for s in out] == [
        (Outcome.COMPLETE, 7, 9),
        (Outcome.COMPLETE, 8, 10),
        (Outcome.CLOSED, 6, 0),  # "quit" is never answered: the close decides
    ]
    first, second, _ = out
    assert first.start_ns < first.end_ns <= second.end_ns
    # A packet counts for the first line it carries bytes of.
    assert first.request_packets == 2 and second.request_packets == 1
    assert second.response_packets == 2
    assert (first.server_port, first.client_addr) == (11211, "10.200.1.2")


def test_lineproto_mid_stream_and_limits() -> None:
    c = conversation()
    # Picked up mid-connection: "t a\r\n" ends a request we never saw and
    # "UE a\r\n" its answer; both are skipped, the next exchange pairs.
    segs = c.request(b"t a\r\nget b\r\n") + c.response(b"UE a\r\nEND\r\n")
    stats = Stats()
    _, out = run(LineConnection, segs, synced=False, stats=stats)
    assert [(s.request_bytes, s.response_bytes) for s in out] == [(7, 5)]

    # Responses to nothing are counted; more pending than the limit are dropped.
    c = conversation()
    stats = Stats()
    out2: list[Session] = []
    conn = LineConnection(endpoints(), ReassemblyLimits(), stats, out2, synced=True,
                          max_pending=2)
    for seg in c.handshake() + c.response(b"hello\r\n") + c.request(b"a\nb\nc\n"):
        conn.feed(seg)
    conn.flush_and_end(Outcome.TIMEOUT, c.ts + 1)
    assert stats.unpaired_responses == 1 and stats.dropped_requests == 1
    assert [(s.outcome, s.request_bytes) for s in out2] == [(Outcome.TIMEOUT, 2)] * 2


def test_lineproto_newline_in_uncaptured_tail() -> None:
    # Capture 8 bytes + 4 tail bytes: the newline at the end of a long line is seen.
    c = Conversation(sport=11211, protocol=Protocol.TCP, capture=8, tail=4)
    long_line = b"set k " + b"v" * 1000 + b"\r\n"
    segs = c.handshake() + c.request(long_line) + c.response(b"STORED\r\n") + c.close()
    _, out = run(LineConnection, segs)
    assert [(s.outcome, s.request_bytes, s.response_bytes) for s in out] == [
        (Outcome.COMPLETE, len(long_line), 8)
    ]


# --- what must never load ---------------------------------------------------------------------


@pytest.fixture
def evil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path, Path]:
    """A top-level module (on sys.path) that leaves a marker when imported."""
    name = f"clvt_evil_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "site"
    root.mkdir()
    marker = tmp_path / "imported"
    path = root / f"{name}.py"
    path.write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from clovisor.parsers.lineproto import LineConnection as PARSER\n"
    )
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return name, path, marker


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("{path}", "looks like a file path"),
        ("{dir}/../{name}.py", "looks like a file path"),
        ("..{name}", "looks like a file path"),
        ("{name}.py", "looks like a file path"),
        ("{name}", "not installed"),  # resolved inside clovisor.parsers only
        ("clovisor.parsers.{name}", "not installed"),
        ("clovisor.demo", "outside clovisor.parsers"),
        ("clovisor.core.sessions", "outside clovisor.parsers"),
        ("clovisor", "outside clovisor.parsers"),
        ("clovisor.parsers", "outside clovisor.parsers"),
        ("_private", "not a module or entry point name"),
        ("a.__init__", "not a module or entry point name"),
        ("mod:attr", "not a module or entry point name"),
        ("", "empty"),
    ],
)
def test_references_outside_the_package_never_import(
    evil: tuple[str, Path, Path],
    template: str,
    why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name, path, marker = evil
    reference = template.format(name=name, path=path, dir=path.parent)
    reg = ParserRegistry()
    already = set(sys.modules)
    assert reg.load("evil", reference) is False
    assert not marker.exists(), "a rejected reference was imported"
    assert name not in sys.modules
    assert "clovisor.demo" not in set(sys.modules) - already
    assert not reg.enabled("evil") and reg.get("evil") is None
    assert why in (reg.error("evil") or "")
    assert "parser plugin 'evil' disabled" in logged(caplog)
    assert reg.enabled("http")  # the agent's own parsers go on


def test_check_reference_is_strict() -> None:
    for good in ("lineproto", "clovisor.parsers.lineproto", "vendor_x.proto2"):
        assert check_reference(good) == good
    for bad in ("/x", "x/y", "x\\y", "..", "x..y", "x.py", "os.", ".x", "1x", "x-y", "x" * 201):
        with pytest.raises(SpecError):
            check_reference(bad)


def test_missing_broken_and_wrong_interface(
    plugin_dir: Callable[[str, str], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=LOGGER)
    cases = {
        "missing": ("clovisor.parsers.no_such_parser", "not installed"),
        "raises": (plugin_dir("raises", "raise RuntimeError('boom at import')\n"),
                   "import failed: RuntimeError: boom at import"),
        "exits": (plugin_dir("exits", "import sys\nsys.exit(3)\n"), "import failed: SystemExit"),
        "deps": (plugin_dir("deps", "import clvt_no_such_dependency\n"),
                 "import failed: No module named 'clvt_no_such_dependency'"),
        "syntax": (plugin_dir("syntax", "def (:\n"), "import failed: SyntaxError"),
        "noattr": (plugin_dir("noattr", "X = 1\n"), "has no PARSER"),
        "notcallable": (plugin_dir("notcallable", "PARSER = 42\n"), "not a parser factory"),
        "signature": (plugin_dir("signature", "def PARSER(a, b):\n    return None\n"),
                      "does not take (endpoints, limits, stats, out, *, synced)"),
        "returns": (plugin_dir("returns", "def PARSER(e, l, s, o, *, synced):\n"
                                          "    return object()\n"),
                    "returned object, not a clovisor.core.sessions.Connection"),
        "ctor": (plugin_dir("ctor", "def PARSER(e, l, s, o, *, synced):\n"
                                    "    raise ValueError('nope')\n"),
                 "raised ValueError: nope"),
    }
    reg = ParserRegistry()
    for proto, (reference, _why) in cases.items():
        assert reg.load(proto, reference) is False, proto
    for proto, (_reference, why) in cases.items():
        assert not reg.enabled(proto)
        assert why in (reg.error(proto) or ""), (proto, reg.error(proto))
        assert f"parser plugin {proto!r} disabled" in logged(caplog)
    assert reg.enabled_names() == frozenset({"http", "tcp", "http2", "grpc"})
    assert reg.load("lineproto", "lineproto") is True  # and the next plugin still loads


def test_builtin_names_cannot_be_taken(caplog: pytest.LogCaptureFixture) -> None:
    reg = ParserRegistry()
    assert reg.load("http", "lineproto") is False
    assert "built-in protocol" in logged(caplog)
    assert reg.load("Bad-Name", "lineproto") is False
    http = reg.get("http")
    assert http is not None and http.__name__ == "http_parser"  # type: ignore[attr-defined]


# --- reload ------------------------------------------------------------------------------------

PLUGIN_V = """
from clovisor.parsers.lineproto import LineConnection

class PARSER(LineConnection):
    __slots__ = ()
    VERSION = {version}
"""


def test_reload_after_the_module_changed_on_disk(
    plugin_dir: Callable[[str, str], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    mod = plugin_dir("versioned", PLUGIN_V.format(version=1))
    reg = ParserRegistry()
    assert reg.load("vers", mod) is True

    def version() -> int:
        factory = reg.get("vers")
        assert factory is not None
        conn = factory(endpoints(), ReassemblyLimits(), Stats(), [], synced=True)
        assert isinstance(conn, GuardedConnection)
        return int(conn.inner.VERSION)  # type: ignore[union-attr]

    assert version() == 1
    plugin_dir(mod, PLUGIN_V.format(version=2))
    assert reg.reload("vers") is True
    assert version() == 2
    assert "parser plugin 'vers' reloaded" in logged(caplog)

    # A broken update keeps the working version.
    plugin_dir(mod, "raise ImportError('half-written file')\n")
    assert reg.reload("vers") is False
    assert reg.enabled("vers") and version() == 2
    assert "keeping the loaded version" in logged(caplog)
    plugin_dir(mod, "PARSER = 'not a factory'\n")
    assert reg.reload("vers") is False and version() == 2

    plugin_dir(mod, PLUGIN_V.format(version=3))
    assert reg.reload("vers") is True and version() == 3

    assert reg.reload("nosuch") is False
    assert "no parser is configured" in logged(caplog)


def test_reload_retries_a_plugin_that_never_loaded(plugin_dir: Callable[[str, str], str]) -> None:
    mod = plugin_dir("late", "raise RuntimeError('not ready')\n")
    reg = ParserRegistry()
    assert reg.load("late", mod) is False
    plugin_dir(mod, PLUGIN_V.format(version=7))
    assert reg.reload("late") is True and reg.enabled("late")


def test_entry_point_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A package installed next to the agent: a dist-info with the entry point.
    root = tmp_path / "site"
    dist = root / "clvt_vendor_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clvt-vendor-plugin\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[clovisor.parsers]\nclvt_vendor = clvt_vendor_mod:VendorParser\n"
        "clvt_vendor_module = clvt_vendor_mod\n"
    )
    (root / "clvt_vendor_mod.py").write_text(
        "from clovisor.parsers.lineproto import LineConnection\n"
        "class VendorParser(LineConnection):\n    __slots__ = ()\n"
        "PARSER = VendorParser\n"
    )
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    importlib.invalidate_caches()
    try:
        reg = ParserRegistry()
        assert reg.load("vendor", "clvt_vendor") is True
        assert reg.load("vendor2", "clvt_vendor_module") is True  # a module: its PARSER
        assert reg.reload("vendor") is True
        c = conversation()
        factory = reg.get("vendor")
        assert factory is not None
        _, out = run(factory, c.handshake() + c.request(b"x\n") + c.response(b"y\n"))
        assert [s.outcome for s in out] == [Outcome.COMPLETE]
    finally:
        sys.modules.pop("clvt_vendor_mod", None)


# --- a plugin that fails on packets ------------------------------------------------------------

FAILING = """
from clovisor.parsers.lineproto import LineConnection

class PARSER(LineConnection):
    __slots__ = ()

    def on_chunk(self, is_req, chunk, ack):
        if b"boom" in chunk.data:
            raise ValueError("Authorization: Bearer secret-token " + chunk.data.decode())
        super().on_chunk(is_req, chunk, ack)
"""


def test_runtime_failures_end_the_connection_not_the_tracer(
    plugin_dir: Callable[[str, str], str], caplog: pytest.LogCaptureFixture
) -> None:
    mod = plugin_dir("failing", FAILING)
    reg = ParserRegistry(max_faults=3)
    assert reg.load("fragile", mod)
    factory = reg.get("fragile")
    assert factory is not None

    c = conversation()
    stats = Stats()
    segs = c.handshake() + c.request(b"ok\n") + c.response(b"fine\n") + c.request(b"boom\n")
    segs += c.response(b"never\n")
    conn, out = run(factory, segs, stats=stats)
    assert conn.finished and conn.reset  # the tracker drops it
    assert [s.outcome for s in out] == [Outcome.COMPLETE]  # what came before the failure stays
    assert stats.parse_errors == 1
    assert stats.budget.used == 0
    text = logged(caplog)
    assert "parser plugin 'fragile' failed on a connection" in text
    assert "ValueError at" in text and "on_chunk" in text
    assert "secret-token" not in text  # packet bytes in a message never reach the log

    for _ in range(2):
        c = conversation()
        run(factory, c.handshake() + c.request(b"boom\n"), stats=stats)
    assert not reg.enabled("fragile") and reg.get("fragile") is None
    assert "3 connections failed" in (reg.error("fragile") or "")
    assert stats.parse_errors == 3
    # Connections already handed out stay fenced after the plugin is disabled.
    c = conversation()
    conn, _ = run(factory, c.handshake() + c.request(b"boom\n"))
    assert conn.finished
    assert reg.load("fragile", mod) is True  # loading again re-enables it


def test_factory_failing_at_runtime_gives_a_dead_connection(
    plugin_dir: Callable[[str, str], str]
) -> None:
    mod = plugin_dir("picky", """
        from clovisor.parsers.lineproto import LineConnection
        def PARSER(e, l, s, o, *, synced):
            if e.server_port == 6666:
                raise RuntimeError("not this port")
            return LineConnection(e, l, s, o, synced=synced)
    """)
    reg = ParserRegistry()
    assert reg.load("picky", mod)
    factory = reg.get("picky")
    assert factory is not None
    stats = Stats()
    c = conversation()
    conn, out = run(factory, c.handshake() + c.request(b"x\n"), stats=stats, port=6666)
    assert conn.finished and out == [] and stats.parse_errors == 1
    conn.release()  # the tracker releases what it drops: must not raise


def test_apply_follows_the_redis_hash(plugin_dir: Callable[[str, str], str]) -> None:
    reg = ParserRegistry()
    reg.apply([("lineproto", "lineproto"), ("broken", "clovisor.parsers.nope")])
    assert reg.names() == ("broken", "grpc", "http", "http2", "lineproto", "tcp")
    assert reg.enabled_names() == frozenset({"http", "tcp", "http2", "grpc", "lineproto"})
    first = reg.get("lineproto")
    reg.apply([("lineproto", "lineproto")])  # unchanged: not reloaded
    assert reg.get("lineproto") is first
    assert reg.names() == ("grpc", "http", "http2", "lineproto", "tcp")
    reg.apply([])
    assert reg.names() == ("grpc", "http", "http2", "tcp")

