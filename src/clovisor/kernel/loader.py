"""Load the classifier object and edit its configuration maps.

One :class:`BpfObject` per node (per agent): the programs are attached to
every traced interface and all per-interface state lives in its maps.
Attaching is ``attach.py``'s job; this module only hands out program fds.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import mmap
import threading
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, TypeVar

from ..core.events import Exchange, Protocol
from . import libbpf
from .abi import (
    CLV_CAPTURE_MAX,
    CLV_EGRESS_ANY,
    CLV_EGRESS_V4,
    CLV_EGRESS_V6,
    CLV_MODE_PAIRED,
    CLV_RED_BUCKETS,
    CLV_WAKEUP_NEVER,
    Counter,
    clv_conn,
    clv_conn_key,
    clv_egress_key,
    clv_match,
    clv_port_key,
    clv_red,
    clv_red_key,
    clv_settings,
    decode_exchange_at,
)
from .errors import KernelError

log = logging.getLogger(__name__)

DEFAULT_OBJECT = Path(__file__).with_name("clovisor.bpf.o")
PROGRAMS = ("clv_tc_ingress", "clv_tc_egress")
DEFAULT_RING_BYTES = 4 << 20
DEFAULT_CAPTURE_BYTES = 512
DEFAULT_WAKEUP_BYTES = 64 << 10
DEFAULT_MAX_CONNECTIONS = 16384  # entries of `conns`, like the core's Limits.max_connections

_p = ctypes.c_void_p
_int = ctypes.c_int
_u32 = ctypes.c_uint32
_size = ctypes.c_size_t

# enum libbpf_print_level
_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2
_LOG_LEVELS = {_LIBBPF_WARN: logging.WARNING, _LIBBPF_INFO: logging.INFO}

# va_list is an array (x86-64) or a >16-byte struct passed by reference
# (arm64) in the callback's arguments: either way a pointer reaches us and is
# passed on unchanged.  vasprintf, not vsnprintf: the verifier log arrives as
# one multi-megabyte "%s" and a va_list cannot be replayed after a too-small
# first attempt.
_PRINT_FN = ctypes.CFUNCTYPE(_int, _int, ctypes.c_char_p, _p)
_libc = ctypes.CDLL(None)
_vasprintf = _libc.vasprintf
_vasprintf.restype = _int
_vasprintf.argtypes = [ctypes.POINTER(_p), ctypes.c_char_p, _p]
_free = _libc.free
_free.restype = None
_free.argtypes = [_p]

_set_print = libbpf.bind("libbpf_set_print", _p, _p)
_open_file = libbpf.bind("bpf_object__open_file", _p, ctypes.c_char_p, _p)
_object_load = libbpf.bind("bpf_object__load", _int, _p)
_object_close = libbpf.bind("bpf_object__close", None, _p)
_next_map = libbpf.bind("bpf_object__next_map", _p, _p, _p)
_map_name = libbpf.bind("bpf_map__name", ctypes.c_char_p, _p)
_map_is_internal = libbpf.bind("bpf_map__is_internal", ctypes.c_bool, _p)
_find_map = libbpf.bind("bpf_object__find_map_by_name", _p, _p, ctypes.c_char_p)
_map_fd = libbpf.bind("bpf_map__fd", _int, _p)
_initial_value = libbpf.bind("bpf_map__initial_value", _p, _p, ctypes.POINTER(_size))
_set_initial_value = libbpf.bind("bpf_map__set_initial_value", _int, _p, _p, _size)
_set_max_entries = libbpf.bind("bpf_map__set_max_entries", _int, _p, _u32)
_find_program = libbpf.bind("bpf_object__find_program_by_name", _p, _p, ctypes.c_char_p)
_program_fd = libbpf.bind("bpf_program__fd", _int, _p)
_update_elem = libbpf.bind("bpf_map_update_elem", _int, _int, _p, _p, ctypes.c_uint64)
_lookup_elem = libbpf.bind("bpf_map_lookup_elem", _int, _int, _p, _p)
_delete_elem = libbpf.bind("bpf_map_delete_elem", _int, _int, _p)
_get_next_key = libbpf.bind("bpf_map_get_next_key", _int, _int, _p, _p)
_lookup_and_delete = libbpf.bind("bpf_map_lookup_and_delete_elem", _int, _int, _p, _p)
_num_possible_cpus = libbpf.bind("libbpf_num_possible_cpus", _int)

_BPF_ANY = 0
_BPF_NOEXIST = 1
_K = TypeVar("_K", bound=ctypes.Structure)
# Lines of libbpf's output kept for the error message of a failed load: the
# verifier's verdict is at the end of its log.
_LOG_TAIL = 40

# libbpf's print hook is process-wide: one capture at a time.
_print_lock = threading.Lock()


class _LibbpfLog:
    """libbpf's diagnostics during one operation, also sent to Python logging."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        # Kept referenced: libbpf holds only the raw function pointer.
        self._fn = _PRINT_FN(self._print)
        self._previous: int | None = None

    def _print(self, level: int, fmt: bytes | None, args: int | None) -> int:
        out = _p()
        n = _vasprintf(ctypes.byref(out), fmt, args)
        if n < 0:
            return 0
        try:
            text = ctypes.string_at(out, n).decode(errors="replace").rstrip("\n")
        finally:
            _free(out)
        lines = text.splitlines()
        self.lines.extend(lines)
        # A verifier log is thousands of lines in one message: keep it one
        # DEBUG record (its tail goes into the KernelError), warn in one line.
        pylevel = _LOG_LEVELS.get(level, logging.DEBUG)
        if len(lines) > _LOG_TAIL and pylevel > logging.DEBUG:
            log.log(pylevel, "%s (%d more lines at DEBUG level)", lines[0], len(lines) - 1)
            pylevel = logging.DEBUG
        log.log(pylevel, "%s", text)
        return int(n)

    def __enter__(self) -> _LibbpfLog:
        _print_lock.acquire()
        self._previous = _set_print(ctypes.cast(self._fn, _p).value)
        return self

    def __exit__(self, *exc: object) -> None:
        _set_print(self._previous)
        _print_lock.release()

    def tail(self) -> str:
        return "\n".join(self.lines[-_LOG_TAIL:])


def _check_ring_bytes(ring_bytes: int) -> None:
    page = mmap.PAGESIZE
    if ring_bytes < page or ring_bytes & (ring_bytes - 1):
        raise ValueError(f"ring buffer size {ring_bytes}: must be a power of two >= {page}")


def _proto_id(proto: int) -> int:
    """A kernel protocol id: a built-in Protocol or a parser plugin's id (5-255)."""
    if not 1 <= int(proto) <= 255:
        raise ValueError(f"protocol id {proto} out of range 1-255")
    return int(proto)


def _proto_of(value: int) -> int:
    try:
        return Protocol(value)
    except ValueError:
        return value  # a parser plugin's id


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")


def _check_ifindex(ifindex: int) -> None:
    if not 0 < ifindex < 2**32:
        raise ValueError(f"ifindex {ifindex} out of range")


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _egress_key(ifindex: int, port: int, addr: IPAddress | None) -> clv_egress_key:
    key = clv_egress_key(ifindex=ifindex, port=port)
    if addr is not None:
        key.family = addr.version
        ctypes.memmove(key.addr, addr.packed, len(addr.packed))
    return key


def _egress_bit(family: int) -> int:
    return {0: CLV_EGRESS_ANY, 4: CLV_EGRESS_V4, 6: CLV_EGRESS_V6}[family]


class BpfObject:
    """The loaded classifier: program fds, configuration maps, counters.

    ``capture_bytes`` is the payload prefix copied per segment (at most
    CLV_CAPTURE_MAX); ``wakeup_bytes`` how much unread ring data wakes the
    reader (0: every record; ``CLV_WAKEUP_NEVER``: nothing does, the reader
    drains on a timer); ``ring_bytes`` the ring buffer size. ``pair_http``
    lets the classifier pair HTTP/1.x exchanges itself (one record per
    exchange, see ``bpf/clovisor.h``), following at most ``max_connections``
    connections; ``shed_bytes``: exchange records are shed (and only counted
    in the RED map) while less ring space than this is free.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        capture_bytes: int = DEFAULT_CAPTURE_BYTES,
        wakeup_bytes: int = DEFAULT_WAKEUP_BYTES,
        ring_bytes: int = DEFAULT_RING_BYTES,
        pair_http: bool = True,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        shed_bytes: int = 0,
    ) -> None:
        if not 0 <= capture_bytes <= CLV_CAPTURE_MAX:
            raise ValueError(f"capture_bytes {capture_bytes} out of range 0-{CLV_CAPTURE_MAX}")
        _check_ring_bytes(ring_bytes)
        if not (0 <= wakeup_bytes < ring_bytes or wakeup_bytes == CLV_WAKEUP_NEVER):
            raise ValueError(
                f"wakeup_bytes {wakeup_bytes} must be below the ring size (or CLV_WAKEUP_NEVER)"
            )
        if not 0 <= shed_bytes < ring_bytes:
            raise ValueError(f"shed_bytes {shed_bytes} must be below the ring size")
        if not 1 <= max_connections < 2**31:
            raise ValueError(f"max_connections {max_connections} out of range")
        self.path = path or DEFAULT_OBJECT
        self.capture_bytes = capture_bytes
        self.wakeup_bytes = wakeup_bytes
        self.ring_bytes = ring_bytes
        self.pair_http = pair_http
        self.max_connections = max_connections
        self.shed_bytes = shed_bytes
        self.conn_value_size = ctypes.sizeof(clv_conn)
        self._conn_cursor: clv_conn_key | None = None  # where the idle scan goes on
        self._obj: int | None = None
        self._ncpus = libbpf.check(_num_possible_cpus(), "libbpf_num_possible_cpus")
        self._open()
        try:
            self._configure()
            self._load()
            self._fds = {name: self._find_map_fd(name) for name in self._MAPS}
        except BaseException:
            self.close()
            raise

    _MAPS = ("ports", "egress", "port_bits", "events", "counters", "conns", "syns", "red")

    # -- lifecycle ---------------------------------------------------------

    def _open(self) -> None:
        if not self.path.is_file():
            raise KernelError(f"BPF object {self.path} not found (run `make bpf`)", errno.ENOENT)
        with _LibbpfLog() as libbpf_log:
            obj = _open_file(str(self.path).encode(), None)
        if not obj:
            raise KernelError(
                f"cannot open BPF object {self.path}\n{libbpf_log.tail()}",
                ctypes.get_errno() or errno.EINVAL,
            )
        self._obj = obj

    def _configure(self) -> None:
        rodata = self._rodata_map()
        settings = clv_settings(
            capture_bytes=self.capture_bytes,
            wakeup_bytes=self.wakeup_bytes,
            pair_http=int(self.pair_http),
            shed_bytes=self.shed_bytes,
        )
        size = _size()
        if not _initial_value(rodata, ctypes.byref(size)):
            raise KernelError(".rodata has no initial value", errno.EINVAL)
        if size.value != ctypes.sizeof(settings):
            # Another .rodata variable (a string constant, a second const)
            # would be overwritten by the settings: refuse, it is a build bug.
            raise KernelError(
                f".rodata is {size.value} bytes, clv_settings {ctypes.sizeof(settings)}",
                errno.EINVAL,
            )
        libbpf.check(
            _set_initial_value(rodata, ctypes.byref(settings), ctypes.sizeof(settings)),
            "bpf_map__set_initial_value(.rodata)",
        )
        libbpf.check(
            _set_max_entries(self._map("events"), self.ring_bytes),
            "bpf_map__set_max_entries(events)",
        )
        for name in ("conns", "syns"):
            libbpf.check(
                _set_max_entries(self._map(name), self.max_connections),
                f"bpf_map__set_max_entries({name})",
            )

    def _load(self) -> None:
        with _LibbpfLog() as libbpf_log:
            rc = _object_load(self._obj)
        if rc < 0:
            raise KernelError(
                f"loading {self.path} failed; libbpf/verifier log tail:\n{libbpf_log.tail()}\n"
                "(the full log is in the clovisor.kernel.loader logger)",
                rc,
            )

    def close(self) -> None:
        """Free the object: maps and programs go away with their last fd."""
        if self._obj is not None:
            _object_close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- lookups -----------------------------------------------------------

    def _live(self) -> int:
        if self._obj is None:
            raise KernelError("BPF object is closed", errno.EBADF)
        return self._obj

    def _map(self, name: str) -> int:
        ptr: int | None = _find_map(self._live(), name.encode())
        return libbpf.check_ptr(ptr, f"map {name!r} not in {self.path}")

    def _find_map_fd(self, name: str) -> int:
        return libbpf.check(_map_fd(self._map(name)), f"bpf_map__fd({name})")

    def _rodata_map(self) -> int:
        # libbpf names it "<object name prefix>.rodata": match the suffix.
        m: int | None = _next_map(self._live(), None)
        while m:
            name: bytes = _map_name(m)
            if _map_is_internal(m) and name.endswith(b".rodata"):
                return m
            m = _next_map(self._live(), m)
        raise KernelError(f"{self.path} has no .rodata (settings) map", errno.ENOENT)

    def map_fd(self, name: str) -> int:
        """The fd of one of the object's maps (``events`` for the reader)."""
        self._live()
        try:
            return self._fds[name]
        except KeyError:
            raise KernelError(f"no map {name!r}", errno.ENOENT) from None

    def prog_fd(self, name: str) -> int:
        """The fd of ``clv_tc_ingress`` or ``clv_tc_egress`` for attaching."""
        prog: int | None = _find_program(self._live(), name.encode())
        libbpf.check_ptr(prog, f"program {name!r} not in {self.path}")
        return libbpf.check(_program_fd(prog), f"bpf_program__fd({name})")

    # -- raw map access ----------------------------------------------------

    def _update(self, name: str, key: ctypes.Structure, value: ctypes.Structure) -> None:
        rc = _update_elem(self.map_fd(name), ctypes.byref(key), ctypes.byref(value), _BPF_ANY)
        if rc == -errno.E2BIG:
            raise KernelError(f"map {name!r} is full", rc)
        libbpf.check(rc, f"update of map {name!r}")

    def _lookup_match(self, name: str, key: ctypes.Structure) -> clv_match | None:
        value = clv_match()
        rc = _lookup_elem(self.map_fd(name), ctypes.byref(key), ctypes.byref(value))
        if rc == -errno.ENOENT:
            return None
        libbpf.check(rc, f"lookup in map {name!r}")
        return value

    def _delete(self, name: str, key: ctypes.Structure) -> bool:
        rc = _delete_elem(self.map_fd(name), ctypes.byref(key))
        if rc == -errno.ENOENT:
            return False
        libbpf.check(rc, f"delete from map {name!r}")
        return True

    def _keys(self, name: str, key_type: type[_K]) -> list[_K]:
        """All keys of a hash map, collected before the caller changes it."""
        fd = self.map_fd(name)
        keys: list[_K] = []
        prev: _K | None = None
        while True:
            nxt = key_type()
            rc = _get_next_key(fd, None if prev is None else ctypes.byref(prev), ctypes.byref(nxt))
            if rc == -errno.ENOENT:
                return keys
            libbpf.check(rc, f"iteration of map {name!r}")
            keys.append(nxt)
            prev = nxt

    # -- configuration -----------------------------------------------------
    #
    # Three levels, each a filter for the next: `port_bits` says some
    # interface has a `ports` entry for the port; the `ports` entry of
    # {ifindex, port} carries the server protocol (0: not a server port) and
    # which `egress` rules exist for that port.  Writes are ordered so that
    # the datapath never sees a bit without what it stands for (a bit without
    # a rule only costs a lookup).  One writer at a time: the agent's
    # reconciler.

    def _port_entry(self, ifindex: int, port: int) -> tuple[clv_port_key, clv_match]:
        key = clv_port_key(ifindex=ifindex, port=port)
        return key, self._lookup_match("ports", key) or clv_match()

    def _store_port_entry(self, key: clv_port_key, value: clv_match) -> None:
        if value.proto or value.egress:
            self._update("ports", key, value)
            self._set_port_bit(key.port, True)
        elif self._delete("ports", key):
            self._sync_port_bits({key.port})

    def _set_port_bit(self, port: int, on: bool) -> None:
        fd = self.map_fd("port_bits")
        index = ctypes.c_uint32(port >> 6)
        word = ctypes.c_uint64()
        libbpf.check(_lookup_elem(fd, ctypes.byref(index), ctypes.byref(word)), "port_bits")
        bit = 1 << (port & 63)
        new = word.value | bit if on else word.value & ~bit
        if new != word.value:
            word.value = new
            rc = _update_elem(fd, ctypes.byref(index), ctypes.byref(word), _BPF_ANY)
            libbpf.check(rc, "update of port_bits")

    def _sync_port_bits(self, ports: set[int]) -> None:
        """Clear the bits of ``ports`` that no interface uses any more."""
        used = {k.port for k in self._keys("ports", clv_port_key)}
        for port in ports - used:
            self._set_port_bit(port, False)

    def set_server_port(self, ifindex: int, port: int, proto: int) -> None:
        """Trace ``port`` as a server port of the workload behind ``ifindex``."""
        _check_ifindex(ifindex)
        _check_port(port)
        key, value = self._port_entry(ifindex, port)
        value.proto = _proto_id(proto)
        self._store_port_entry(key, value)

    def remove_server_port(self, ifindex: int, port: int) -> bool:
        """Stop tracing a server port; False if it was not traced."""
        _check_ifindex(ifindex)
        _check_port(port)
        key, value = self._port_entry(ifindex, port)
        if not value.proto:
            return False
        value.proto = 0
        self._store_port_entry(key, value)
        return True

    def set_egress(self, ifindex: int, port: int, addr: IPAddress | None, proto: int) -> None:
        """Trace connections from ``ifindex``'s workload to ``addr``:``port``.

        ``addr`` None matches any address (an exact rule wins over it).
        """
        _check_ifindex(ifindex)
        _check_port(port)
        key = _egress_key(ifindex, port, addr)
        self._update("egress", key, clv_match(proto=_proto_id(proto)))
        pkey, value = self._port_entry(ifindex, port)
        bit = _egress_bit(key.family)
        if not value.egress & bit:
            value.egress |= bit
            self._store_port_entry(pkey, value)

    def remove_egress(self, ifindex: int, port: int, addr: IPAddress | None) -> bool:
        """Remove one egress rule; False if it did not exist."""
        _check_ifindex(ifindex)
        _check_port(port)
        key = _egress_key(ifindex, port, addr)
        if not self._delete("egress", key):
            return False
        pkey, value = self._port_entry(ifindex, port)
        families = {
            k.family for k in self._keys("egress", clv_egress_key)
            if k.ifindex == ifindex and k.port == port
        }  # fmt: skip
        value.egress = 0
        for family in families:
            value.egress |= _egress_bit(family)
        self._store_port_entry(pkey, value)
        return True

    def clear_ifindex(self, ifindex: int) -> int:
        """Remove every rule of an interface (it went away); how many entries."""
        removed = 0
        freed: set[int] = set()
        # `ports` first: its bits are what send the datapath into `egress`.
        for pkey in self._keys("ports", clv_port_key):
            if pkey.ifindex == ifindex and self._delete("ports", pkey):
                removed += 1
                freed.add(pkey.port)
        self._sync_port_bits(freed)
        for ekey in self._keys("egress", clv_egress_key):
            if ekey.ifindex == ifindex:
                removed += self._delete("egress", ekey)
        return removed

    def server_ports(self) -> dict[tuple[int, int], int]:
        """{(ifindex, port): protocol} of the traced server ports, as in the map."""
        result = {}
        for key in self._keys("ports", clv_port_key):
            value = self._lookup_match("ports", key)
            if value is not None and value.proto:
                result[key.ifindex, key.port] = _proto_of(value.proto)
        return result

    def egress_rules(self) -> dict[tuple[int, int, IPAddress | None], int]:
        """{(ifindex, port, addr or None): protocol} of the egress rules, as in the map."""
        result: dict[tuple[int, int, IPAddress | None], int] = {}
        for key in self._keys("egress", clv_egress_key):
            value = self._lookup_match("egress", key)
            if value is None:
                continue
            raw = bytes(key.addr)
            addr: IPAddress | None = None
            if key.family == 4:
                addr = ipaddress.IPv4Address(raw[:4])
            elif key.family == 6:
                addr = ipaddress.IPv6Address(raw)
            result[key.ifindex, key.port, addr] = _proto_of(value.proto)
        return result

    # -- counters ----------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """The kernel counters summed over CPUs, by lower-case enum name."""
        fd = self.map_fd("counters")
        # per-CPU values come as one 8-byte slot per possible CPU
        values = (ctypes.c_uint64 * self._ncpus)()
        result = {}
        for counter in Counter:
            key = ctypes.c_uint32(counter.value)
            libbpf.check(
                _lookup_elem(fd, ctypes.byref(key), ctypes.byref(values)), "lookup of counters"
            )
            result[counter.name.lower()] = sum(values)
        return result

    # -- HTTP exchanges held in the kernel ------------------------------------

    def _conn_value(self, key: clv_conn_key, *, delete: bool = False) -> bytes | None:
        buf = ctypes.create_string_buffer(self.conn_value_size)
        fn = _lookup_and_delete if delete else _lookup_elem
        rc = fn(self.map_fd("conns"), ctypes.byref(key), buf)
        if rc == -errno.ENOENT:
            return None
        libbpf.check(rc, "lookup in map 'conns'")
        return buf.raw

    def _next_conn_key(self, prev: clv_conn_key | None) -> clv_conn_key | None:
        nxt = clv_conn_key()
        rc = _get_next_key(
            self.map_fd("conns"), None if prev is None else ctypes.byref(prev), ctypes.byref(nxt)
        )
        if rc == -errno.ENOENT:
            return None
        libbpf.check(rc, "iteration of map 'conns'")
        return nxt

    @staticmethod
    def _pending(value: bytes) -> clv_conn | None:
        """The entry's state if it holds an exchange (paired and pending)."""
        conn = clv_conn.from_buffer_copy(value)
        return conn if conn.mode == CLV_MODE_PAIRED and conn.phase != 0 else None

    @staticmethod
    def _exchange(value: bytes) -> Exchange | None:
        try:
            return decode_exchange_at(value, clv_conn.ex.offset, len(value) - clv_conn.ex.offset,
                                      held=True)
        except KernelError:
            return None  # torn by a concurrent update: the next pass sees it whole

    def held_exchanges(self) -> list[Exchange]:
        """Every exchange held in the kernel (at shutdown, after detaching)."""
        out: list[Exchange] = []
        key = self._next_conn_key(None)
        while key is not None:
            value = self._conn_value(key)
            if value is not None and self._pending(value) is not None:
                ex = self._exchange(value)
                if ex is not None:
                    out.append(ex)
            key = self._next_conn_key(key)
        return out

    def take_idle_exchanges(self, now_ns: int, idle_ns: int, max_keys: int) -> list[Exchange]:
        """Held exchanges with no segment for more than ``idle_ns``, removed from the kernel.

        Looks at up to ``max_keys`` entries per call, going on where the last
        call stopped, so that one call costs a bounded number of syscalls.
        An entry is taken with lookup-and-delete; if it changed meanwhile (a
        segment came), it is put back.
        """
        out: list[Exchange] = []
        key = self._conn_cursor
        state = clv_conn.ex.offset  # the bytes before the exchange: lock, phase, last segment
        for _ in range(max_keys):
            key = self._next_conn_key(key)
            if key is None:
                break
            value = self._conn_value(key)
            conn = self._pending(value) if value is not None else None
            if conn is None or now_ns - conn.last_ns <= idle_ns:
                continue
            assert value is not None
            taken = self._conn_value(key, delete=True)
            if taken is None:
                continue
            if taken[:state] == value[:state]:
                ex = self._exchange(taken)
                if ex is not None:
                    out.append(ex)
                continue
            buf = ctypes.create_string_buffer(taken, len(taken))
            rc = _update_elem(self.map_fd("conns"), ctypes.byref(key), buf, _BPF_NOEXIST)
            if rc not in (0, -errno.EEXIST):
                libbpf.check(rc, "update of map 'conns'")
        self._conn_cursor = key
        return out

    # -- RED metrics of exchanges user space did not see ----------------------

    def red_metrics(self) -> dict[RedKey, RedValue]:
        """The `red` map summed over CPUs: exchanges whose record was lost or shed."""
        fd = self.map_fd("red")
        size = (ctypes.sizeof(clv_red) + 7) & ~7
        buf = ctypes.create_string_buffer(size * self._ncpus)
        out: dict[RedKey, RedValue] = {}
        for key in self._keys("red", clv_red_key):
            rc = _lookup_elem(fd, ctypes.byref(key), buf)
            if rc == -errno.ENOENT:
                continue
            libbpf.check(rc, "lookup in map 'red'")
            count = sum_ns = 0
            buckets = [0] * CLV_RED_BUCKETS
            for cpu in range(self._ncpus):
                v = clv_red.from_buffer_copy(buf, cpu * size)
                count += v.count
                sum_ns += v.sum_ns
                for i in range(CLV_RED_BUCKETS):
                    buckets[i] += v.buckets[i]
            out[RedKey(key.ifindex, key.port, key.role, key.method, key.status)] = RedValue(
                count, sum_ns, tuple(buckets)
            )
        return out


class RedKey(NamedTuple):
    """A series of the kernel's RED map (clv_red_key)."""

    ifindex: int
    port: int  # the server port
    role: int  # clv_role
    method: int  # clv_method
    status: int


class RedValue(NamedTuple):
    """Exchanges of one series whose record never reached user space."""

    exchanges: int
    sum_ns: int
    buckets: tuple[int, ...]  # per OTel bucket (5 ms .. 10 s, then +Inf), not cumulative
