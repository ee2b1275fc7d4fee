"""Attach the classifier to an interface's ingress and egress, and take it off again.

Two mechanisms, one contract ("leave everything else exactly as it was"):

* **TCX links** (Linux >= 6.6), preferred: ``bpf_link_create`` with
  ``BPF_TCX_INGRESS``/``BPF_TCX_EGRESS``.  The link lives as long as its fd,
  so an agent that dies (even by SIGKILL) leaves nothing attached.  Ours
  goes *first* (``BPF_F_BEFORE`` with no relative program): an agent's
  program that ends the chain (``TCX_PASS``, a redirect) would otherwise
  hide the traffic from us, and since the classifier only observes and
  returns ``TC_ACT_UNSPEC`` (TCX "next"), every program after it still runs
  on exactly the packet it would have seen.
* **clsact + tc filter**, the fallback for older kernels (or ``mode="clsact"``):
  the qdisc may belong to another agent (Cilium, Calico...), so it is created
  only when absent, our filter sits at a fixed and distinctive handle and
  priority, detach removes only that filter, and the qdisc is deleted only if
  *we* created it and nothing else hangs off it.  tc filters outlive the
  process that attached them, so a killed agent leaves them behind;
  :func:`cleanup` removes them (identified by handle + priority *and* the
  ``clv_`` program-name prefix) and nothing else.

Everything here acts on the network namespace of the *calling thread* (the
netlink sockets libbpf opens and the ifindex both belong to it), except
:meth:`Attachment.detach`, which returns to the namespace of the attach.

Debian 12's libbpf is 1.1, which predates ``bpf_program__attach_tcx`` (1.3),
so TCX goes through the raw ``bpf_link_create``; attach types it does not
know are passed through to the kernel unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from .errors import KernelError
from .libbpf import bind, check

__all__ = [
    "CLSACT_HANDLE",
    "CLSACT_PRIORITY",
    "PROG_PREFIX",
    "Attachment",
    "Direction",
    "Hook",
    "Mode",
    "attach",
    "cleanup",
    "clsact_present",
    "list_hooks",
    "prog_name",
    "tcx_supported",
]

Mode = Literal["tcx", "clsact"]
Direction = Literal["ingress", "egress"]

# Our filter's place in a clsact hook.  0xc10f reads "clo(visor)"; a priority
# this high (runs late) mirrors the TCX "append" placement and keeps clear of
# the low priorities other agents use (Cilium uses 1).
CLSACT_HANDLE = 0xC10F
CLSACT_PRIORITY = 0xC10F
PROG_PREFIX = "clv_"

# enum bpf_attach_type (uapi/linux/bpf.h, Linux 6.6)
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
# enum bpf_tc_attach_point / bpf_tc_flags (libbpf.h)
_BPF_TC_INGRESS = 1
_BPF_TC_EGRESS = 2
_BPF_TC_F_REPLACE = 1

# rtnetlink
_NETLINK_ROUTE = 0
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_RTM_GETQDISC = 38
_RTM_GETTFILTER = 46
_TCA_KIND = 1
_TCA_OPTIONS = 2
_TCA_CHAIN = 11
_TCA_BPF_NAME = 7
_TCA_BPF_ID = 11
_NLA_TYPE_MASK = 0x3FFF
_TC_H_CLSACT = 0xFFFFFFF1
_TC_H_INGRESS_PARENT = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)
_TC_H_EGRESS_PARENT = 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)
_NLHDR = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=B3xiIII")
_NLA = struct.Struct("=HH")

# struct bpf_prog_info: name[16] follows type, id, tag[8], two lens, three
# u64 pointers/times, uid, nr_map_ids and the map_ids pointer.
_PROG_INFO_NAME_OFF = 64
_PROG_INFO_BUF = 512  # larger than any kernel's struct; the tail stays zero

STATE_DIR = Path(os.environ.get("CLOVISOR_RUN_DIR", "/run/clovisor"))

_DIRS: tuple[Direction, Direction] = ("ingress", "egress")
_TCX_TYPE = {"ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}
_TC_POINT = {"ingress": _BPF_TC_INGRESS, "egress": _BPF_TC_EGRESS}
_TC_PARENT = {"ingress": _TC_H_INGRESS_PARENT, "egress": _TC_H_EGRESS_PARENT}


# --- libbpf bindings -------------------------------------------------------------


class _TcHook(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
    ]


class _TcOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


class _ProgQueryOpts(ctypes.Structure):
    # The libbpf 1.1 layout; newer libbpf versions accept a shorter sz.
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.POINTER(ctypes.c_uint32)),
        ("prog_cnt", ctypes.c_uint32),
        ("prog_attach_flags", ctypes.POINTER(ctypes.c_uint32)),
    ]


_BPF_F_BEFORE = 1 << 3


class _LinkCreateOpts(ctypes.Structure):
    """libbpf 1.1's ``struct bpf_link_create_opts`` up to ``flags``.

    ``sz`` says how much of it we pass; libbpf forwards ``flags`` to the
    kernel for attach types it does not know (TCX), with relative_fd 0:
    "before every program", i.e. first.
    """

    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class _Lib:
    """libbpf functions, bound on first use so importing never needs libbpf."""

    def __init__(self) -> None:
        p, i, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
        self.link_create = bind("bpf_link_create", i, i, i, i, p)
        self.link_detach = bind("bpf_link_detach", i, i)
        self.prog_query_opts = bind("bpf_prog_query_opts", i, i, i, p)
        self.prog_get_fd_by_id = bind("bpf_prog_get_fd_by_id", i, u32)
        self.obj_get_info_by_fd = bind("bpf_obj_get_info_by_fd", i, i, p, p)
        self.tc_hook_create = bind("bpf_tc_hook_create", i, p)
        self.tc_hook_destroy = bind("bpf_tc_hook_destroy", i, p)
        self.tc_attach = bind("bpf_tc_attach", i, p, p)
        self.tc_detach = bind("bpf_tc_detach", i, p, p)


@functools.cache
def _lib() -> _Lib:
    return _Lib()


def _hook(ifindex: int, point: int) -> _TcHook:
    return _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=point, parent=0)


def _neg_errno(rc: int) -> int:
    # libbpf >= 1.0 returns -errno; keep errno as a fallback for odd builds.
    return rc if rc < 0 else -(ctypes.get_errno() or errno.EINVAL)


# --- namespaces and interfaces -------------------------------------------------------


def _thread_netns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, 0x40000000)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise KernelError("setns(CLONE_NEWNET)", ctypes.get_errno())


@contextlib.contextmanager
def _in_netns_fd(fd: int) -> Iterator[None]:
    """Move the calling thread into the namespace ``fd`` for the block, if not already there."""
    if os.fstat(fd).st_ino == _thread_netns_ino():
        yield
        return
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
        try:
            yield
        finally:
            _setns(orig)
    finally:
        os.close(orig)


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        raise KernelError(
            f"no network interface with ifindex {ifindex} in this network namespace "
            f"(netns inode {_thread_netns_ino()}); attach from inside the namespace "
            "that owns the interface",
            errno.ENODEV,
        ) from None


def _ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise KernelError(
            f"no network interface named {ifname!r} in this network namespace "
            f"(netns inode {_thread_netns_ino()})",
            errno.ENODEV,
        ) from None


# --- program identity ------------------------------------------------------------------


def prog_name(prog_id: int) -> str | None:
    """The kernel's name of BPF program ``prog_id`` (<= 15 chars); None if it is gone."""
    lib = _lib()
    fd = lib.prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        buf = ctypes.create_string_buffer(_PROG_INFO_BUF)
        size = ctypes.c_uint32(_PROG_INFO_BUF)
        check(lib.obj_get_info_by_fd(fd, buf, ctypes.byref(size)), f"info of BPF prog {prog_id}")
        raw = buf.raw[_PROG_INFO_NAME_OFF : _PROG_INFO_NAME_OFF + 16]
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")
    finally:
        os.close(fd)


def _prog_id_of_fd(fd: int) -> int:
    buf = ctypes.create_string_buffer(_PROG_INFO_BUF)
    size = ctypes.c_uint32(_PROG_INFO_BUF)
    check(_lib().obj_get_info_by_fd(fd, buf, ctypes.byref(size)), f"info of BPF prog fd {fd}")
    return int(struct.unpack_from("=I", buf.raw, 4)[0])


# --- rtnetlink dumps (libbpf has no API to list tc filters or qdiscs) ---------------------


def _nl_attrs(buf: bytes, off: int = 0) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + _NLA.size <= len(buf):
        length, typ = _NLA.unpack_from(buf, off)
        if length < _NLA.size:
            break
        out[typ & _NLA_TYPE_MASK] = buf[off + _NLA.size : off + length]
        off += (length + 3) & ~3
    return out


def _nl_dump(msg_type: int, tcmsg: bytes) -> Iterator[bytes]:
    """Send one rtnetlink dump request and yield each reply's payload."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       _NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        seq = 1
        sock.send(_NLHDR.pack(_NLHDR.size + len(tcmsg), msg_type,
                              _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + tcmsg)
        while True:
            data = sock.recv(1 << 20)
            off = 0
            while off + _NLHDR.size <= len(data):
                length, typ, _flags, rseq, _pid = _NLHDR.unpack_from(data, off)
                if length < _NLHDR.size:
                    raise KernelError("malformed rtnetlink reply", errno.EPROTO)
                payload = data[off + _NLHDR.size : off + length]
                off += (length + 3) & ~3
                if rseq != seq:
                    continue
                if typ == _NLMSG_DONE:
                    if len(payload) >= 4 and struct.unpack_from("=i", payload)[0] < 0:
                        raise KernelError("rtnetlink dump", struct.unpack_from("=i", payload)[0])
                    return
                if typ == _NLMSG_ERROR:
                    err = struct.unpack_from("=i", payload)[0]
                    if err:
                        raise KernelError("rtnetlink dump", err)
                    return
                yield payload


@dataclass(frozen=True)
class _Filter:
    direction: Direction
    kind: str
    priority: int
    handle: int
    chain: int
    prog_id: int
    bpf_name: str  # TCA_BPF_NAME as the attacher set it ("name:[id]" from libbpf)


def _dump_filters(ifindex: int, direction: Direction) -> list[_Filter]:
    req = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, _TC_PARENT[direction], 0)
    out = []
    for payload in _nl_dump(_RTM_GETTFILTER, req):
        _family, idx, handle, _parent, info = _TCMSG.unpack_from(payload)
        if idx != ifindex:
            continue
        attrs = _nl_attrs(payload, _TCMSG.size)
        kind = attrs.get(_TCA_KIND, b"").rstrip(b"\0").decode("ascii", "replace")
        chain = struct.unpack("=I", attrs[_TCA_CHAIN])[0] if _TCA_CHAIN in attrs else 0
        prog_id, bpf_name = 0, ""
        if kind == "bpf" and _TCA_OPTIONS in attrs:
            opts = _nl_attrs(attrs[_TCA_OPTIONS])
            if _TCA_BPF_ID in opts:
                prog_id = struct.unpack("=I", opts[_TCA_BPF_ID][:4])[0]
            bpf_name = opts.get(_TCA_BPF_NAME, b"").rstrip(b"\0").decode("ascii", "replace")
        out.append(_Filter(direction, kind, info >> 16, handle, chain, prog_id, bpf_name))
    return out


def clsact_present(ifindex: int) -> bool:
    """Whether interface ``ifindex`` has a clsact qdisc (in the calling thread's netns)."""
    for payload in _nl_dump(_RTM_GETQDISC, _TCMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        _family, idx, _handle, parent, _info = _TCMSG.unpack_from(payload)
        if idx != ifindex or parent != _TC_H_CLSACT:
            continue
        kind = _nl_attrs(payload, _TCMSG.size).get(_TCA_KIND, b"").rstrip(b"\0")
        if kind == b"clsact":
            return True
    return False


def _foreign(f: _Filter) -> bool:
    """Not a Clovisor filter (nor the kernel's per-priority header of one)."""
    if f.kind == "bpf" and f.priority == CLSACT_PRIORITY and f.handle == 0:
        return False
    return not _is_ours(f)


def _is_ours(f: _Filter) -> bool:
    if f.kind != "bpf" or f.handle != CLSACT_HANDLE or f.priority != CLSACT_PRIORITY:
        return False
    name = prog_name(f.prog_id) if f.prog_id else None
    if name is None:  # no CAP_SYS_ADMIN for GET_FD_BY_ID: trust the filter's label
        name = f.bpf_name
    return name.startswith(PROG_PREFIX)


# --- TCX ---------------------------------------------------------------------------------


def _tcx_prog_ids(ifindex: int, direction: Direction) -> list[int]:
    cnt = 16
    while True:
        ids = (ctypes.c_uint32 * cnt)()
        opts = _ProgQueryOpts(sz=ctypes.sizeof(_ProgQueryOpts), prog_ids=ids, prog_cnt=cnt)
        rc = _lib().prog_query_opts(ifindex, _TCX_TYPE[direction], ctypes.byref(opts))
        if rc == -errno.ENOSPC:  # programs were added since we sized the buffer
            cnt = max(cnt * 2, opts.prog_cnt)
            continue
        check(rc, f"query TCX {direction} programs of ifindex {ifindex}")
        return list(ids[: opts.prog_cnt])


def tcx_supported() -> bool:
    """Whether this kernel has TCX: a TCX query on loopback (ifindex 1 in every netns)."""
    rc = _lib().prog_query_opts(1, BPF_TCX_INGRESS, ctypes.byref(
        _ProgQueryOpts(sz=ctypes.sizeof(_ProgQueryOpts))))
    if rc in (-errno.EINVAL, -errno.EOPNOTSUPP):
        return False
    check(rc, "query TCX programs of lo")
    return True


# --- listing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hook:
    """One program or filter on an interface hook, as ``list_hooks`` reports it."""

    mode: Mode
    direction: Direction
    kind: str  # "bpf", or the tc classifier kind of a foreign filter ("matchall", "u32"...)
    prog_id: int  # 0 when not a BPF program
    prog_name: str
    position: int = 0  # run order within a TCX hook (0 runs first)
    priority: int = 0  # clsact only
    handle: int = 0
    chain: int = 0

    @property
    def ours(self) -> bool:
        """Placed by Clovisor (program name prefix, and our handle/priority for tc)."""
        if not self.prog_name.startswith(PROG_PREFIX):
            return False
        return self.mode == "tcx" or (
            self.handle == CLSACT_HANDLE and self.priority == CLSACT_PRIORITY
        )


def list_hooks(ifindex: int | str) -> list[Hook]:
    """Everything on the interface's TCX and clsact hooks, in run order per hook."""
    idx = _ifindex(ifindex) if isinstance(ifindex, str) else ifindex
    _ifname(idx)
    hooks: list[Hook] = []
    if tcx_supported():
        for d in _DIRS:
            for pos, pid in enumerate(_tcx_prog_ids(idx, d)):
                hooks.append(Hook("tcx", d, "bpf", pid, prog_name(pid) or "", position=pos))
    for d in _DIRS:
        for f in _dump_filters(idx, d):
            if f.handle == 0:
                continue  # the per-priority header the kernel emits before its filters
            name = (prog_name(f.prog_id) if f.prog_id else None) or f.bpf_name.split(":")[0]
            hooks.append(Hook("clsact", d, f.kind, f.prog_id, name,
                              priority=f.priority, handle=f.handle, chain=f.chain))
    return hooks


# --- ownership of a clsact qdisc across restarts -------------------------------------------
# A killed agent cannot remember that it created a qdisc, so a marker file in
# /run (cleared at boot) says so.  It is keyed by the namespace's cookie, which
# unlike its inode number is never reused, and holds the interface name as a
# guard against ifindex reuse.

_SO_NETNS_COOKIE = 71


def _netns_key() -> str:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            cookie = struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8))[0]
        return f"netns{cookie}"
    except OSError:  # Linux < 5.14
        return f"netnsino{_thread_netns_ino()}"


def _marker(ifindex: int) -> Path:
    return STATE_DIR / "clsact" / f"{_netns_key()}-if{ifindex}"


def _mark_created(ifindex: int, ifname: str) -> None:
    path = _marker(ifindex)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(ifname + "\n")
    except OSError:
        pass  # only cleanup() after a crash needs it; detach() remembers in memory


def _marked_created(ifindex: int, ifname: str) -> bool:
    try:
        return _marker(ifindex).read_text().strip() == ifname
    except OSError:
        return False


def _unmark(ifindex: int) -> None:
    with contextlib.suppress(OSError):
        _marker(ifindex).unlink()


def _prune_markers() -> None:
    prefix = f"{_netns_key()}-if"
    with contextlib.suppress(OSError):
        for path in (STATE_DIR / "clsact").iterdir():
            if not path.name.startswith(prefix):
                continue
            try:
                name = socket.if_indextoname(int(path.name[len(prefix):]))
            except (OSError, ValueError):
                name = None
            with contextlib.suppress(OSError):
                if name is None or path.read_text().strip() != name:
                    path.unlink()


def _tc_detach(ifindex: int, direction: Direction) -> None:
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=CLSACT_HANDLE, priority=CLSACT_PRIORITY)
    rc = _lib().tc_detach(ctypes.byref(_hook(ifindex, _TC_POINT[direction])), ctypes.byref(opts))
    if rc not in (0, -errno.ENOENT):
        check(_neg_errno(rc), f"remove Clovisor tc {direction} filter from ifindex {ifindex}")


def _release_qdisc(ifindex: int, ifname: str, created: bool) -> bool:
    """Delete the clsact qdisc if we created it and nothing else is attached to it."""
    if not (created or _marked_created(ifindex, ifname)):
        return False
    remaining = [f for d in _DIRS for f in _dump_filters(ifindex, d)]
    if remaining:
        if any(_foreign(f) for f in remaining):
            # Someone attached to "our" qdisc meanwhile: it is theirs now too.
            _unmark(ifindex)
        # else another Attachment of ours still uses it and will release it.
        return False
    # netlink has no "delete if empty", so a filter added between the dump and
    # this call would go with the qdisc; the window is a few microseconds.
    rc = _lib().tc_hook_destroy(ctypes.byref(_hook(ifindex, _BPF_TC_INGRESS | _BPF_TC_EGRESS)))
    _unmark(ifindex)
    if rc not in (0, -errno.ENOENT, -errno.EINVAL):
        check(_neg_errno(rc), f"delete clsact qdisc of {ifname}")
    return bool(rc == 0)


# --- attach / detach -----------------------------------------------------------------------


class Attachment:
    """Our programs on one interface; :meth:`detach` takes them off (idempotent)."""

    def __init__(self, ifindex: int, ifname: str, mode: Mode) -> None:
        self.ifindex = ifindex
        self.ifname = ifname
        self.mode: Mode = mode
        self.prog_ids: dict[Direction, int] = {}
        self._links: dict[Direction, int] = {}  # TCX link fds
        self._created_qdisc = False
        # Kept so that detach() finds the interface even when called from a
        # thread in another namespace.
        self._netns_fd: int | None = os.open(
            "/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC
        )

    @property
    def attached(self) -> bool:
        return self._netns_fd is not None

    @property
    def directions(self) -> tuple[Direction, ...]:
        return tuple(d for d in _DIRS if d in self.prog_ids)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (f"Attachment({self.ifname}#{self.ifindex}, {self.mode}, "
                f"{'+'.join(self.directions)}, {state})")

    def __enter__(self) -> Attachment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()

    def detach(self) -> None:
        """Remove exactly what :func:`attach` added."""
        if self._netns_fd is None:
            return
        errors: list[KernelError] = []
        try:
            if self.mode == "tcx":
                for d, fd in list(self._links.items()):
                    # Detach explicitly: a forked child may still hold a copy
                    # of the fd, which would keep the link alive after close.
                    rc = _lib().link_detach(fd)
                    os.close(fd)
                    del self._links[d]
                    if rc < 0 and rc != -errno.ENOLINK:
                        errors.append(KernelError(f"detach TCX {d} link of {self.ifname}", rc))
            else:
                with _in_netns_fd(self._netns_fd):
                    errors.extend(self._detach_clsact())
        finally:
            os.close(self._netns_fd)
            self._netns_fd = None
        if errors:
            raise errors[0]

    def _detach_clsact(self) -> list[KernelError]:
        errors: list[KernelError] = []
        try:
            current = socket.if_indextoname(self.ifindex)
        except OSError:
            current = None
        if current != self.ifname:
            # The interface is gone, and our filters and qdisc with it (or its
            # ifindex now names a new interface, which holds nothing of ours).
            if _marked_created(self.ifindex, self.ifname):
                _unmark(self.ifindex)
            return errors
        for d in self.directions:
            for f in _dump_filters(self.ifindex, d):
                # Remove it only if it is still the program we put there: a
                # newer attach to this interface may have replaced it.
                if (f.handle == CLSACT_HANDLE and f.priority == CLSACT_PRIORITY
                        and f.prog_id == self.prog_ids[d]):
                    try:
                        _tc_detach(self.ifindex, d)
                    except KernelError as exc:
                        errors.append(exc)
                    break
        try:
            _release_qdisc(self.ifindex, self.ifname, self._created_qdisc)
        except KernelError as exc:
            errors.append(exc)
        return errors


def attach(
    ifindex: int | str,
    ingress_fd: int | None,
    egress_fd: int | None,
    mode: Literal["auto", "tcx", "clsact"] = "auto",
) -> Attachment:
    """Attach ``ingress_fd``/``egress_fd`` (SCHED_CLS programs; None skips a side).

    ``mode="auto"`` uses TCX when the kernel has it and clsact otherwise.
    Must run in the network namespace that owns the interface.
    """
    if ingress_fd is None and egress_fd is None:
        raise ValueError("attach needs an ingress or an egress program")
    idx = _ifindex(ifindex) if isinstance(ifindex, str) else ifindex
    name = _ifname(idx)
    if mode == "auto":
        mode = "tcx" if tcx_supported() else "clsact"
    progs: dict[Direction, int] = {}
    if ingress_fd is not None:
        progs["ingress"] = ingress_fd
    if egress_fd is not None:
        progs["egress"] = egress_fd
    att = Attachment(idx, name, mode)
    try:
        if mode == "tcx":
            _attach_tcx(att, progs)
        elif mode == "clsact":
            _attach_clsact(att, progs)
        else:
            raise ValueError(f"unknown attach mode {mode!r}")
    except BaseException:
        # Leave nothing half-attached.
        with contextlib.suppress(KernelError):
            att.detach()
        raise
    return att


def _attach_tcx(att: Attachment, progs: dict[Direction, int]) -> None:
    for d, fd in progs.items():
        att.prog_ids[d] = _prog_id_of_fd(fd)
        opts = _LinkCreateOpts(sz=ctypes.sizeof(_LinkCreateOpts), flags=_BPF_F_BEFORE)
        rc = _lib().link_create(fd, att.ifindex, _TCX_TYPE[d], ctypes.byref(opts))
        if rc < 0:
            hint = ""
            if rc == -errno.EINVAL:
                hint = " (kernel without TCX, or not a SCHED_CLS program; try mode='clsact')"
            elif rc == -errno.EPERM:
                hint = " (needs CAP_BPF and CAP_NET_ADMIN)"
            raise KernelError(f"attach TCX {d} to {att.ifname}{hint}", _neg_errno(rc))
        att._links[d] = rc


def _attach_clsact(att: Attachment, progs: dict[Direction, int]) -> None:
    lib = _lib()
    rc = lib.tc_hook_create(ctypes.byref(_hook(att.ifindex, _BPF_TC_INGRESS | _BPF_TC_EGRESS)))
    if rc == 0:
        att._created_qdisc = True
        _mark_created(att.ifindex, att.ifname)
    elif rc != -errno.EEXIST:  # someone else's clsact (or ingress) qdisc: share it
        check(_neg_errno(rc), f"create clsact qdisc on {att.ifname}")
    for d, fd in progs.items():
        flags = 0
        for f in _dump_filters(att.ifindex, d):
            if f.handle == CLSACT_HANDLE and f.priority == CLSACT_PRIORITY:
                if not _is_ours(f):
                    raise KernelError(
                        f"{att.ifname} {d}: tc filter at handle {CLSACT_HANDLE:#x} priority "
                        f"{CLSACT_PRIORITY} belongs to another program ({f.kind} "
                        f"{f.bpf_name or f.prog_id}); not replacing it",
                        errno.EEXIST,
                    )
                flags = _BPF_TC_F_REPLACE  # ours from an earlier run: take it over
        opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=fd, flags=flags,
                       handle=CLSACT_HANDLE, priority=CLSACT_PRIORITY)
        rc = lib.tc_attach(ctypes.byref(_hook(att.ifindex, _TC_POINT[d])), ctypes.byref(opts))
        if rc:
            check(_neg_errno(rc), f"attach tc {d} filter to {att.ifname}")
        att.prog_ids[d] = int(opts.prog_id)


def cleanup(ifnames: Iterable[str] | None = None) -> list[str]:
    """Remove clsact filters a killed Clovisor left behind; returns what was removed.

    Only filters at our handle and priority whose program is named ``clv_*``
    go, and a clsact qdisc only when Clovisor created it and it is now empty.
    TCX links need no cleanup: they died with their process.  Acts on the
    calling thread's network namespace; ``None`` means every interface.
    """
    explicit = ifnames is not None
    names = list(ifnames) if ifnames is not None else [n for _, n in socket.if_nameindex()]
    removed: list[str] = []
    for name in names:
        try:
            idx = socket.if_nametoindex(name)
        except OSError:
            if explicit:
                _ifindex(name)  # raises the clear error
            continue
        for d in _DIRS:
            for f in _dump_filters(idx, d):
                if _is_ours(f):
                    _tc_detach(idx, d)
                    label = prog_name(f.prog_id) or f.bpf_name
                    removed.append(
                        f"{name} {d} tc filter handle {f.handle:#x} prio {f.priority} "
                        f"({label}, prog id {f.prog_id})"
                    )
        if _release_qdisc(idx, name, created=False):
            removed.append(f"{name} clsact qdisc")
    _prune_markers()
    return removed

