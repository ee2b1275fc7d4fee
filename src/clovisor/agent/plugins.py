"""Protocol parser plugins (the original's Hunter release), safe by design.

Where a parser may come from
----------------------------
Redis hash ``clovisor_proto_cfg`` maps a protocol name to a parser
*reference*. Whoever can write Redis must not get code execution on every
node, so a reference is only ever looked up among parsers installed with
the agent:

* an entry point in the group ``clovisor.parsers`` (a package installed next
  to the agent declares ``[project.entry-points."clovisor.parsers"]
  myproto = "my_package.myproto:PARSER"``); the reference is the entry
  point's name, ``myproto``;
* a module inside the agent's own plugin package :mod:`clovisor.parsers`,
  named ``clovisor.parsers.myproto`` or just ``myproto``; the module exports
  the factory as ``PARSER``.

A reference that looks like a file path (``/``, ``\\``, ``..``, ``.py``) or
names any module outside ``clovisor.parsers.`` is rejected and logged; it
is never imported. Names are checked before anything is imported, and the
import itself only ever searches the plugin package's own directory.

The parser interface
--------------------
A parser is a factory (usually the class itself)::

    PARSER(endpoints: Endpoints, limits: ReassemblyLimits, stats: Stats,
           out: list[Session], *, synced: bool) -> Connection

called once per new TCP connection of a port traced with that protocol
(:mod:`clovisor.core.sessions`). It returns a subclass of
:class:`~clovisor.core.sessions.Connection`, whose base class already does
the TCP work: it reassembles each direction by sequence number (order,
retransmissions, holes) and calls three hooks:

``on_chunk(is_req, chunk, ack)``
    The next in-order run of bytes of one direction (``is_req``: client to
    server). ``chunk.offset``/``chunk.length`` are exact stream positions;
    ``chunk.data`` holds only the *captured prefix* of those bytes and
    ``chunk.tail`` a few of the last ones when the prefix does not reach
    them; a hole the retransmission never filled arrives as a chunk with
    no data. ``chunk.ts_ns`` is the kernel timestamp (CLOCK_MONOTONIC),
    ``chunk.packets`` the wire packets it stands for. ``ack`` is the
    segment's acknowledgement number (0 when unknown).
``on_fin(is_req, ts_ns)``
    That direction was closed (FIN).
``on_end(outcome, ts_ns)``
    The connection is over (``Outcome.CLOSED`` after both FINs,
    ``RESET``, ``TIMEOUT`` when idle or evicted, ``SHUTDOWN`` when the
    tracer stops); called once. Whatever is still pending becomes a
    session with that outcome.

``synced`` is true when the connection was seen from its SYN, so the first
byte of each direction starts a message; otherwise tracing began in the
middle of the connection and the parser must find a message boundary
itself (or give up on the connection).

What a parser emits: it appends :class:`~clovisor.core.events.Session`
records to ``out``, one per exchange, with ``start_ns`` (first request
byte) and ``end_ns`` (last response byte), an ``outcome``, and request and
response packet/byte counts; ``endpoints.session(...)`` fills in the
address fields.
The exporters turn each into one span. ``Session.request``/``response``
are HTTP-shaped today, so a non-HTTP plugin leaves them ``None``.

Its limits: it runs on the tracer's hot path, single-threaded, with no
I/O, no clock (time comes only from the timestamps it is given), no
threads. It must bound what it keeps per connection (a fixed number of
pending requests, say) and count what it drops in ``stats``
(``dropped_requests``, ``unpaired_responses``, ``parse_errors``); payload
bytes it wants to hold across chunks must be taken from ``stats.budget``
and given back in ``release()``. Packets are hostile: any byte sequence
may arrive. An exception raised by a plugin's connection ends that
connection (its pending exchanges are lost, ``stats.parse_errors`` counts
it) and never the tracer; after ``max_faults`` such failures the plugin is
disabled until it is loaded again. A plugin that fails to import, raises
while importing, or does not satisfy the interface (checked by building
one connection at load time) is logged and disabled; the agent goes on
with its other parsers.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

from ..core.events import Outcome, Role, Segment, Session
from ..core.events import Protocol as WireProtocol
from ..core.http2 import grpc_connection, http2_connection
from ..core.reassembly import Chunk, ReassemblyLimits
from ..core.sessions import (
    Connection,
    ConnectionFactory,
    Endpoints,
    HttpConnection,
    Stats,
    TcpConnection,
)
from ..specs import PROTOCOLS, SpecError

log = logging.getLogger(__name__)

# What plugin code may throw at us. SystemExit too: a plugin calling
# sys.exit() must not end the thread that loaded it. KeyboardInterrupt is
# the operator's and passes.
_PLUGIN_ERRORS = (Exception, SystemExit)

PLUGIN_PACKAGE = "clovisor.parsers"
ENTRY_POINT_GROUP = "clovisor.parsers"
FACTORY_ATTRIBUTE = "PARSER"
BUILTINS = ("http", "tcp", "http2", "grpc")
# Kernel protocol ids (clv_proto) of plugins: the built-ins own 1 to 4.
FIRST_PLUGIN_ID = 5
MAX_PROTOCOL_ID = 255

# Protocol names meet service port names (Istio style ``<proto>[-suffix]``),
# so no ``-``; lower case like the names they are compared with.
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Dotted identifiers only; no segment may start with ``_`` (no dunder modules).
_REF_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)*")
MAX_REFERENCE_LEN = 200


# What a parser plugin provides (see the module docstring): the tracker's own interface.
ParserFactory = ConnectionFactory


def http_parser(
    endpoints: Endpoints,
    limits: ReassemblyLimits,
    stats: Stats,
    out: list[Session],
    /,
    *,
    synced: bool,
) -> Connection:
    """Built-in HTTP/1.x (request/response pairing, pipelining, chunked bodies)."""
    return HttpConnection(endpoints, limits, stats, out, synced=synced)


def tcp_parser(
    endpoints: Endpoints,
    limits: ReassemblyLimits,
    stats: Stats,
    out: list[Session],
    /,
    *,
    synced: bool,
) -> Connection:
    """Built-in TCP: one session per connection (no L7 parsing, so ``synced`` is moot)."""
    return TcpConnection(endpoints, limits, stats, out)


def check_protocol_name(text: str) -> str:
    """A protocol name as used in ``clovisor_proto_cfg`` and on the pub/sub channel."""
    if not _NAME_RE.fullmatch(text):
        raise SpecError(
            f"protocol name {_show(text)} is not valid "
            "(lower-case letters, digits and _, starting with a letter, at most 32)"
        )
    return text


def check_reference(text: str) -> str:
    """A parser reference: an installed entry point name or a module of ``clovisor.parsers``.

    Rejects (before anything is imported) whatever looks like a file path or
    names a module elsewhere. Returns the reference unchanged.
    """
    if not text:
        raise SpecError("parser reference is empty")
    if len(text) > MAX_REFERENCE_LEN:
        raise SpecError(f"parser reference {_show(text)} is too long")
    if "/" in text or "\\" in text or ".." in text or text.endswith(".py"):
        raise SpecError(
            f"parser reference {_show(text)} looks like a file path; only parsers installed "
            f"with the agent can be used (entry point group {ENTRY_POINT_GROUP!r} or a module "
            f"of {PLUGIN_PACKAGE})"
        )
    if not _REF_RE.fullmatch(text):
        raise SpecError(f"parser reference {_show(text)} is not a module or entry point name")
    inside_agent = text == "clovisor" or text.startswith("clovisor.")
    if inside_agent and not text.startswith(PLUGIN_PACKAGE + "."):
        raise SpecError(
            f"parser reference {_show(text)} is outside {PLUGIN_PACKAGE}: "
            "only the agent's plugin package may be named"
        )
    return text


def _show(text: str, limit: int = 120) -> str:
    """A value for a log line: quoted, bounded (values come from Redis)."""
    if len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text)} chars)"
    return repr(text)


# -- the fence around plugin code --------------------------------------------------------


class GuardedConnection(Connection):
    """A plugin's connection behind a fence: its exceptions end it, never the tracker.

    It shares the plugin connection's half-streams and mirrors its state, so
    the tracker sees an ordinary :class:`Connection`. Built-in parsers are not
    wrapped: they are the core's own code, and the wrapper costs a call per
    segment.
    """

    __slots__ = ("_inner", "_name", "_registry")

    def __init__(
        self,
        registry: ParserRegistry,
        name: str,
        factory: ParserFactory,
        endpoints: Endpoints,
        limits: ReassemblyLimits,
        stats: Stats,
        out: list[Session],
        synced: bool,
    ) -> None:
        self._registry = registry
        self._name = name
        self._inner: Connection | None = None
        try:
            inner = factory(endpoints, limits, stats, out, synced=synced)
            if not isinstance(inner, Connection):
                raise TypeError(f"factory returned {type(inner).__name__}, not a Connection")
        except _PLUGIN_ERRORS as exc:
            # A connection that is over before it began: the tracker drops it.
            super().__init__(endpoints, limits, stats, out)
            self.reset = True
            registry.fault(name, exc, stats)
            return
        self._inner = inner
        self.endpoints = inner.endpoints
        self.req = inner.req
        self.resp = inner.resp
        self.stats = inner.stats
        self.out = inner.out
        self._mirror(inner)

    @property
    def inner(self) -> Connection | None:
        return self._inner

    def _mirror(self, inner: Connection) -> None:
        self.last_ts = inner.last_ts
        self.fin_client = inner.fin_client
        self.fin_server = inner.fin_server
        self.reset = inner.reset

    def _failed(self, exc: BaseException) -> None:
        inner, self._inner = self._inner, None
        self.reset = True  # finished: the tracker forgets the connection
        self._registry.fault(self._name, exc, self.stats)
        if inner is not None:
            try:
                inner.release()
            except _PLUGIN_ERRORS:
                # Its half-streams are the base class's; give their bytes back directly.
                self.req.flush()
                self.resp.flush()

    def feed(self, seg: Segment) -> None:
        inner = self._inner
        if inner is None:
            self.last_ts = seg.ts_ns
            return
        try:
            inner.feed(seg)
        except _PLUGIN_ERRORS as exc:
            self.last_ts = seg.ts_ns
            self._failed(exc)
            return
        self._mirror(inner)

    def expire(self, now_ns: int) -> None:
        inner = self._inner
        if inner is None:
            return
        try:
            inner.expire(now_ns)
        except _PLUGIN_ERRORS as exc:
            self._failed(exc)

    def flush_and_end(self, outcome: Outcome, ts_ns: int) -> None:
        inner = self._inner
        if inner is None:
            return
        try:
            inner.flush_and_end(outcome, ts_ns)
        except _PLUGIN_ERRORS as exc:
            self._failed(exc)

    def release(self) -> None:
        inner = self._inner
        if inner is None:
            self.req.flush()
            self.resp.flush()
            return
        try:
            inner.release()
        except _PLUGIN_ERRORS as exc:
            self._failed(exc)

    # The hooks belong to the inner connection; the guard never reassembles itself.
    def on_chunk(self, is_req: bool, chunk: Chunk, ack: int) -> None:
        return None

    def on_fin(self, is_req: bool, ts_ns: int) -> None:
        return None

    def on_end(self, outcome: Outcome, ts_ns: int) -> None:
        return None


# -- the registry ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    name: str
    reference: str  # "" for built-ins and register()
    factory: ParserFactory | None  # None: disabled
    guarded: ParserFactory | None  # what get() hands out
    builtin: bool = False
    module: str = ""  # the module to reload
    entry_point: importlib.metadata.EntryPoint | None = None
    error: str = ""  # why it is disabled
    faults: int = 0


class _Rejected(Exception):
    """A plugin that cannot be used; the message is the log line."""


def _smoke_endpoints() -> Endpoints:
    return Endpoints(
        role=Role.SERVER,
        protocol=WireProtocol.TCP,
        ifindex=0,
        family=4,
        client_addr="127.0.0.1",
        client_port=1,
        server_addr="127.0.0.1",
        server_port=2,
    )


def check_factory(obj: object, what: str) -> ParserFactory:
    """``obj`` as a :class:`ParserFactory`, or :class:`_Rejected` saying why not.

    The signature is checked, then one connection is built and released:
    a factory that returns something else, or raises, is caught here at load
    time rather than on the first packet.
    """
    if not callable(obj):
        raise _Rejected(f"{what} is {type(obj).__name__}, not a parser factory")
    endpoints, limits, stats = _smoke_endpoints(), ReassemblyLimits(), Stats()
    out: list[Session] = []
    try:
        inspect.signature(obj).bind(endpoints, limits, stats, out, synced=True)
    except TypeError as exc:
        raise _Rejected(
            f"{what} does not take (endpoints, limits, stats, out, *, synced): {exc}"
        ) from None
    except ValueError:
        pass  # no introspectable signature (some builtins): the trial call decides
    try:
        conn = obj(endpoints, limits, stats, out, synced=True)
    except _PLUGIN_ERRORS as exc:
        raise _Rejected(f"{what} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(conn, Connection):
        raise _Rejected(
            f"{what} returned {type(conn).__name__}, not a clovisor.core.sessions.Connection"
        )
    try:
        conn.release()
    except _PLUGIN_ERRORS as exc:
        raise _Rejected(f"{what}: release() raised {type(exc).__name__}: {exc}") from None
    return obj


def _where(exc: BaseException) -> str:
    """Where an exception was raised (file:line in function), without its message.

    A plugin's exception message may quote packet bytes (a header, a
    password), and those never reach a log line.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    f = frames[-1]
    return f"{type(exc).__name__} at {f.filename}:{f.lineno} in {f.name}"


class ParserRegistry:
    """Protocol name -> parser factory: the built-ins and the plugins Redis names.

    Thread-safe: the Redis thread loads and reloads while the tracer thread
    calls :meth:`get`. :meth:`load` and :meth:`reload` never raise; a broken
    plugin is logged and disabled.
    """

    def __init__(self, *, max_faults: int = 20) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self.max_faults = max_faults
        self._ids: dict[str, int] = {name: int(p) for name, p in PROTOCOLS.items()}
        self._names_by_id: dict[int, str] = {i: name for name, i in self._ids.items()}
        self.register("http", http_parser, builtin=True)
        self.register("tcp", tcp_parser, builtin=True)
        self.register("http2", http2_connection, builtin=True)
        self.register("grpc", grpc_connection, builtin=True)

    # -- lookup (hot path: no lock, one dict read) ---------------------------------

    def get(self, name: str) -> ParserFactory | None:
        """The factory for a protocol, or None if unknown or disabled."""
        entry = self._entries.get(name)
        return None if entry is None else entry.guarded

    def by_id(self, protocol_id: int) -> ParserFactory | None:
        """The factory for a kernel protocol id (the tracker's parser lookup)."""
        name = self._names_by_id.get(protocol_id)
        return None if name is None else self.get(name)

    def name_of(self, protocol_id: int) -> str | None:
        """The protocol a kernel id was given to (see :meth:`kernel_id`)."""
        return self._names_by_id.get(protocol_id)

    def kernel_id(self, name: str) -> int | None:
        """The id the classifier tags ``name``'s ports with; None when all are taken.

        Given on first use and kept for the agent's lifetime, even when the
        plugin is removed: a port entry or a connection still carrying an old
        id must never reach another protocol's parser (an unknown id gets
        connection-level sessions).
        """
        with self._lock:
            pid = self._ids.get(name)
            if pid is None:
                pid = FIRST_PLUGIN_ID + len(self._ids) - len(PROTOCOLS)
                if pid > MAX_PROTOCOL_ID:
                    return None
                self._ids[name] = pid
                self._names_by_id[pid] = name
            return pid

    def names(self) -> tuple[str, ...]:
        """Every protocol name known, enabled or not."""
        return tuple(sorted(self._entries))

    def enabled(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.guarded is not None

    def enabled_names(self) -> frozenset[str]:
        """The protocols that can be traced now (``known_protocols`` of the desired state)."""
        return frozenset(n for n, e in list(self._entries.items()) if e.guarded is not None)

    def error(self, name: str) -> str | None:
        """Why a protocol is disabled (None if it is enabled or unknown)."""
        entry = self._entries.get(name)
        if entry is None or entry.guarded is not None:
            return None
        return entry.error

    def reference(self, name: str) -> str | None:
        entry = self._entries.get(name)
        return None if entry is None else entry.reference

    # -- changes -------------------------------------------------------------------

    def register(self, name: str, factory: ParserFactory, *, builtin: bool = False) -> None:
        """Add a parser from code (trusted: it raises on a bad name or factory)."""
        check_protocol_name(name)
        try:
            checked = check_factory(factory, f"parser {name!r}")
        except _Rejected as exc:
            raise TypeError(str(exc)) from None
        with self._lock:
            old = self._entries.get(name)
            if old is not None and old.builtin:
                raise ValueError(f"protocol {name!r} is built in")
            self._entries[name] = _Entry(
                name=name,
                reference="",
                factory=checked,
                guarded=checked if builtin else self._guard(name, checked),
                builtin=builtin,
            )

    def load(self, name: str, reference: str) -> bool:
        """Load the parser ``reference`` for protocol ``name``; False (logged) if unusable."""
        with self._lock:
            try:
                check_protocol_name(name)
            except SpecError as exc:
                log.error("parser plugin not loaded: %s", exc)
                return False
            old = self._entries.get(name)
            if old is not None and old.builtin:
                log.error(
                    "parser plugin %r -> %s not loaded: %r is a built-in protocol",
                    name, _show(reference), name,
                )
                return False
            entry = _Entry(name=name, reference=reference, factory=None, guarded=None)
            self._entries[name] = entry
            try:
                check_reference(reference)
                self._import(entry, reload=False)
            except (SpecError, _Rejected) as exc:
                return self._disable(entry, str(exc))
            log.info("parser plugin %r loaded from %s", name, self._origin(entry))
            return True

    def reload(self, name: str) -> bool:
        """Import a plugin's code again (the pub/sub message); False (logged) on failure.

        A plugin that worked keeps its previous version when the new one
        fails: a bad rollout must not take down a working parser.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                log.warning("reload of protocol %s ignored: no parser is configured for it",
                            _show(name))
                return False
            if entry.builtin or not entry.reference:
                log.info("reload of protocol %r ignored: built in or registered in code", name)
                return False
            if entry.factory is None:
                # Never worked (or was disabled): try afresh, as a first load.
                return self.load(name, entry.reference)
            try:
                self._import(entry, reload=True)
            except _Rejected as exc:
                log.error(
                    "parser plugin %r: reload from %s failed, keeping the loaded version: %s",
                    name, _show(entry.reference), exc,
                )
                return False
            entry.faults = 0
            log.info("parser plugin %r reloaded from %s", name, self._origin(entry))
            return True

    def unload(self, name: str) -> None:
        """Forget a plugin (built-ins stay). Its module stays imported: Python cannot unload."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and not entry.builtin:
                del self._entries[name]
                log.info("parser plugin %r removed", name)

    def apply(self, proto_cfg: Iterable[tuple[str, str]]) -> None:
        """Make the plugins match ``AgentConfig.proto_cfg`` (load new or changed, drop removed)."""
        wanted = dict(proto_cfg)
        with self._lock:
            for name, entry in list(self._entries.items()):
                if not entry.builtin and name not in wanted:
                    self.unload(name)
            for name, reference in wanted.items():
                current = self._entries.get(name)
                if current is not None and current.reference == reference:
                    continue
                self.load(name, reference)

    def fault(self, name: str, exc: BaseException, stats: Stats | None = None) -> None:
        """A plugin's connection raised; disable the plugin after ``max_faults``."""
        if stats is not None:
            stats.parse_errors += 1
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            entry.faults += 1
            if entry.faults == 1:
                log.error("parser plugin %r failed on a connection (dropped): %s",
                          name, _where(exc))
            if entry.faults >= self.max_faults and entry.guarded is not None:
                self._disable(entry, f"{entry.faults} connections failed, last: {_where(exc)}")

    # -- internals -------------------------------------------------------------------

    def _guard(self, name: str, factory: ParserFactory) -> ParserFactory:
        def guarded(
            endpoints: Endpoints,
            limits: ReassemblyLimits,
            stats: Stats,
            out: list[Session],
            /,
            *,
            synced: bool,
        ) -> Connection:
            return GuardedConnection(self, name, factory, endpoints, limits, stats, out, synced)

        return guarded

    def _disable(self, entry: _Entry, why: str) -> bool:
        entry.factory = None
        entry.guarded = None
        entry.error = why
        log.error("parser plugin %r disabled: %s", entry.name, why)
        return False

    def _origin(self, entry: _Entry) -> str:
        if entry.entry_point is not None:
            return f"entry point {entry.entry_point.name} = {entry.entry_point.value}"
        return f"module {entry.module}"

    def _import(self, entry: _Entry, *, reload: bool) -> None:
        """Resolve, import and check ``entry.reference``; fill the entry or raise _Rejected."""
        what = f"parser plugin {entry.name!r} -> {_show(entry.reference)}"
        importlib.invalidate_caches()  # a plugin written since the last import must be found
        ep = None if reload else _entry_point(entry.reference)
        if reload:
            ep = entry.entry_point
        try:
            if ep is not None:
                if reload:
                    _reload_module(ep.module)
                obj = ep.load()
                module_name = ep.module
                if isinstance(obj, ModuleType):
                    obj = getattr(obj, FACTORY_ATTRIBUTE, None)
                    if obj is None:
                        raise _Rejected(f"{what}: module {ep.module} has no {FACTORY_ATTRIBUTE}")
            else:
                module_name = _module_name(entry.reference)
                module = _reload_module(module_name) if reload else _import_module(module_name)
                obj = getattr(module, FACTORY_ATTRIBUTE, None)
                if obj is None:
                    raise _Rejected(f"{what}: module {module_name} has no {FACTORY_ATTRIBUTE}")
        except _Rejected:
            raise
        except ModuleNotFoundError as exc:
            wanted = _module_name(entry.reference)
            missing = exc.name is not None and (
                wanted == exc.name or wanted.startswith(exc.name + ".")
            )
            if ep is not None or not missing:
                # The plugin is there but imports something that is not.
                raise _Rejected(f"{what}: import failed: {exc}") from None
            raise _Rejected(
                f"{what}: not installed (no entry point {entry.reference!r} in group "
                f"{ENTRY_POINT_GROUP!r}, no module {_module_name(entry.reference)})"
            ) from None
        except _PLUGIN_ERRORS as exc:
            raise _Rejected(
                f"{what}: import failed: {type(exc).__name__}: {exc}"
            ) from None
        factory = check_factory(obj, what)
        entry.factory = factory
        entry.guarded = self._guard(entry.name, factory)
        entry.module = module_name
        entry.entry_point = ep
        entry.error = ""


def _module_name(reference: str) -> str:
    if reference.startswith(PLUGIN_PACKAGE + "."):
        return reference
    return f"{PLUGIN_PACKAGE}.{reference}"


def _entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    if name.startswith(PLUGIN_PACKAGE + "."):
        return None  # a module path of the plugin package, not an entry point name
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep
    return None


def _import_module(module_name: str) -> ModuleType:
    # check_reference() and _module_name() guarantee this; re-checked here
    # because it is the one line that must never import anything else.
    if not module_name.startswith(PLUGIN_PACKAGE + "."):
        raise _Rejected(f"module {module_name} is outside {PLUGIN_PACKAGE}")
    return importlib.import_module(module_name)


def _reload_module(module_name: str) -> ModuleType:
    module = sys.modules.get(module_name)
    if module is None:
        return importlib.import_module(module_name)
    return importlib.reload(module)
