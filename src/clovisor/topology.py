"""A Kubernetes-like network made of network namespaces, for the demo, tests and benchmark.

One "node" namespace routes between N "pod" namespaces, each joined to the node
by a veth pair, the way ptp/Calico-style CNIs wire pods: the pod sees ``eth0``
with a /32 (/128) address and a default route to a gateway address that lives
on every host-side veth; the node has one host route per pod.  Nothing is
created in the caller's own namespace, so a topology never touches the
machine's real interfaces.

Only ``10.200.0.0/16`` and ``fd00:200::/64`` are used, and everything is made
through iproute2 so the same commands can be replayed by hand when debugging.

Names carry the creating process id (``<prefix>-<pid>-<seq>-<role>``): several
test runs may share a machine at once, so "stale" means "same prefix and the
creating process is gone", never merely "same prefix".
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "GATEWAY4",
    "GATEWAY6",
    "NETNS_DIR",
    "Pod",
    "Topology",
    "TopologyError",
    "http_get",
    "in_netns",
    "nsenter_prefix",
    "remove_stale",
    "wait_for_port",
]

NETNS_DIR = Path("/run/netns")
# The node-side address of every host veth (ptp CNI style): pods route
# everything to it, so pod-to-pod traffic always crosses the node's veths,
# which is where the tracer attaches.
GATEWAY4 = "10.200.0.1"
GATEWAY6 = "fd00:200::1"
_POD_HOST_BASE = 10  # pod n gets 10.200.0.(10+n) and fd00:200::(10+n)
_MAX_PODS = 200
_CLONE_NEWNET = 0x40000000
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_seq = itertools.count()


class TopologyError(RuntimeError):
    """Creating or using the namespace topology failed."""


@dataclass(frozen=True)
class Pod:
    """One pod: its namespace, addresses and the host-side veth in the node namespace."""

    name: str
    netns: str
    ipv4: str
    ipv6: str
    host_ifname: str
    host_ifindex: int  # in the node namespace, where the tracer attaches
    ifname: str = "eth0"


# --- namespace switching ------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    # os.setns only exists from Python 3.12; the project supports 3.11.
    setns = getattr(os, "setns", None)
    if setns is not None:
        setns(fd, _CLONE_NEWNET)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _netns_path(name: str) -> str:
    return name if name.startswith("/") else str(NETNS_DIR / name)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the with-block with the calling *thread* in network namespace ``name``.

    ``name`` is a name under /run/netns or an absolute path to a netns file.
    Only this thread moves (setns affects the calling task), so other threads
    keep their namespace (threads and processes started inside the block
    inherit it); sockets, netlink requests and BPF attach-by-ifindex
    made inside the block act on ``name``.  Sockets keep the namespace they
    were created in after the block ends.
    """
    # thread-self, not self: /proc/self/ns/net is the main thread's namespace.
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            target = os.open(_netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise TopologyError(f"network namespace {name!r} does not exist") from exc
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            # A thread left in the wrong namespace would silently act on the
            # wrong interfaces later; failing loudly is the lesser evil.
            _setns(orig)
    finally:
        os.close(orig)


def nsenter_prefix(ns: str) -> list[str]:
    """The argv prefix that runs a command inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns]


def http_get(ns: str, host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``path`` from inside ``ns``: (status, body), or (0, "") if nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        with in_netns(ns):
            conn.connect()  # the socket is made here, so it lives in ``ns``
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    except OSError:
        return 0, ""
    finally:
        conn.close()


def wait_for_port(ns: str, addr: str, port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP connect to ``addr:port`` from inside ``ns`` succeeds."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        with in_netns(ns):
            # Created inside the block, so the socket belongs to ``ns``.
            sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            sock.connect((addr, port))
            return
        except OSError as exc:
            last = exc
        finally:
            sock.close()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{addr}:{port} in netns {ns} not reachable: {last}")
        time.sleep(0.05)


# --- stale leftovers ------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise TopologyError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def remove_stale(prefix: str) -> list[str]:
    """Delete namespaces named ``<prefix>-<pid>-...`` whose creating process is gone.

    A topology whose owner was SIGKILLed cannot clean up after itself; the
    next one with the same prefix does it.  Namespaces of live processes (a
    concurrent test run) are left alone.
    """
    removed = []
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+-[a-z0-9]+$")
    for name in _list_netns():
        m = pat.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if _ip("netns", "delete", name, check=False).returncode == 0:
            removed.append(name)
    return removed


# --- the topology ---------------------------------------------------------------


class Topology:
    """Node + pods network, created on ``__enter__`` and removed on ``__exit__``.

    >>> with Topology(prefix="clv", pods=("server", "client")) as topo:
    ...     topo.run(topo.pods["client"].netns, ["curl", "http://10.200.0.10:8080/"])
    """

    def __init__(self, prefix: str = "clv", pods: Sequence[str] = ("server", "client")) -> None:
        if not _PREFIX_RE.match(prefix):
            # The prefix also names the host veths, which are limited to 15 bytes.
            raise ValueError(f"prefix {prefix!r}: 1-8 lowercase letters/digits, letter first")
        if not pods or len(set(pods)) != len(pods) or len(pods) > _MAX_PODS:
            raise ValueError(f"pods must be 1..{_MAX_PODS} distinct names, got {pods!r}")
        for p in pods:
            if not re.match(r"^[a-z0-9]{1,20}$", p):
                raise ValueError(f"pod name {p!r}: 1-20 lowercase letters/digits")
        self.prefix = prefix
        self.instance = f"{prefix}-{os.getpid()}-{next(_seq)}"
        self.node_ns = f"{self.instance}-node"
        self.pod_names = tuple(pods)
        self.pods: dict[str, Pod] = {}
        self.gateway4 = GATEWAY4
        self.gateway6 = GATEWAY6
        self._created_ns: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._group_leaders: set[int] = set()  # pids spawned as leaders of a new session

    # context management

    def __enter__(self) -> Topology:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except TopologyError:
            # Do not hide the with-block's own exception behind a teardown one.
            if exc is None:
                raise

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this topology owns (node first)."""
        return [self.node_ns, *(self._pod_ns(p) for p in self.pod_names)]

    def _pod_ns(self, pod: str) -> str:
        return f"{self.instance}-{pod}"

    def _create(self) -> None:
        remove_stale(self.prefix)
        self._add_ns(self.node_ns)
        node = self.node_ns
        self._sysctl(node, "net.ipv4.ip_forward", "1")
        self._sysctl(node, "net.ipv6.conf.all.forwarding", "1")
        self._ns_ip(node, "link", "set", "lo", "up")
        for n, pod in enumerate(self.pod_names):
            pns = self._pod_ns(pod)
            self._add_ns(pns)
            host_if = f"{self.prefix}{n}"
            ipv4 = f"10.200.0.{_POD_HOST_BASE + n}"
            ipv6 = f"fd00:200::{_POD_HOST_BASE + n:x}"
            # Both ends are created directly in their namespaces, so the
            # caller's namespace never sees them, not even briefly.
            self._ns_ip(node, "link", "add", host_if, "type", "veth",
                        "peer", "name", "eth0", "netns", pns)
            self._ns_ip(node, "link", "set", host_if, "up")
            # The same gateway /32 on every host veth: pods ARP/ND for it on
            # their own link and the node answers.
            self._ns_ip(node, "addr", "add", f"{GATEWAY4}/32", "dev", host_if)
            self._ns_ip(node, "-6", "addr", "add", f"{GATEWAY6}/128", "dev", host_if, "nodad")
            self._ns_ip(node, "route", "add", f"{ipv4}/32", "dev", host_if, "src", GATEWAY4)
            self._ns_ip(node, "-6", "route", "add", f"{ipv6}/128", "dev", host_if, "src", GATEWAY6)

            self._ns_ip(pns, "link", "set", "lo", "up")
            self._ns_ip(pns, "link", "set", "eth0", "up")
            self._ns_ip(pns, "addr", "add", f"{ipv4}/32", "dev", "eth0")
            self._ns_ip(pns, "-6", "addr", "add", f"{ipv6}/128", "dev", "eth0", "nodad")
            self._ns_ip(pns, "route", "add", GATEWAY4, "dev", "eth0", "scope", "link")
            self._ns_ip(pns, "route", "add", "default", "via", GATEWAY4, "dev", "eth0")
            self._ns_ip(pns, "-6", "route", "add", GATEWAY6, "dev", "eth0")
            self._ns_ip(pns, "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0")

            self.pods[pod] = Pod(
                name=pod,
                netns=pns,
                ipv4=ipv4,
                ipv6=ipv6,
                host_ifname=host_if,
                host_ifindex=self._ifindex(node, host_if),
            )

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created_ns.append(ns)
        # DAD would keep fresh IPv6 addresses tentative for a second or more;
        # set it off before any interface appears so they inherit the default.
        self._sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
        self._sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        # /proc/sys/net resolves against the opening thread's namespace, so
        # this needs no child process.
        path = "/proc/sys/" + key.replace(".", "/")
        with in_netns(ns), open(path, "w") as f:
            f.write(value)

    def _ns_ip(self, ns: str, *args: str) -> None:
        _ip("-n", ns, *args)

    def _ifindex(self, ns: str, ifname: str) -> int:
        out = _ip("-n", ns, "-j", "link", "show", "dev", ifname).stdout
        return int(json.loads(out)[0]["ifindex"])

    # running things inside

    def nsenter_prefix(self, ns: str) -> list[str]:
        """The argv prefix that runs a command inside ``ns``."""
        return nsenter_prefix(ns)

    def run(
        self, ns: str, argv: Sequence[str], *, check: bool = True, **popen_kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``ns`` (text mode, output captured by default)."""
        popen_kw.setdefault("capture_output", True)
        popen_kw.setdefault("text", True)
        proc: subprocess.CompletedProcess[str] = subprocess.run(
            [*nsenter_prefix(ns), *argv], check=False, **popen_kw
        )
        if check and proc.returncode != 0:
            raise TopologyError(
                f"in {ns}: {' '.join(argv)} exited {proc.returncode}: {proc.stderr!s}".strip()
            )
        return proc

    def spawn(self, ns: str, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``ns``; ``close()`` stops it (SIGTERM, then SIGKILL).

        The child gets its own session, so stopping it also stops whatever it
        started and nothing else.
        """
        popen_kw.setdefault("start_new_session", True)
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen([*nsenter_prefix(ns), *argv], **popen_kw)
        self._procs.append(proc)
        if popen_kw["start_new_session"]:
            self._group_leaders.add(proc.pid)
        return proc

    def wait_for_port(self, ns: str, addr: str, port: int, timeout: float = 10.0) -> None:
        """See :func:`wait_for_port`."""
        wait_for_port(ns, addr, port, timeout)

    # teardown

    def _signal(self, proc: subprocess.Popen[Any], sig: int) -> None:
        try:
            # ip netns exec execs the command, so proc.pid is the command and,
            # when spawn() gave it a session, the id of its process group.
            if proc.pid in self._group_leaders:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop_processes(self, grace: float = 3.0) -> None:
        """Stop every process started by :meth:`spawn`, by pid."""
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            self._signal(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(p, signal.SIGKILL)
                p.wait()
        # A leader can exit before its children.  The kernel does not reuse a
        # pid while it names a live group, and we reaped these leaders just
        # now, so this reaches our leftovers or nobody.  (Leaders that exited
        # earlier are skipped: their pid may since name someone else.)
        for p in live:
            if p.pid in self._group_leaders:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if self._group_alive(p.pid):
                        os.killpg(p.pid, signal.SIGKILL)
        self._procs.clear()
        self._group_leaders.clear()

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        """Stop our processes and delete our namespaces (and with them the veths)."""
        errors: list[str] = []
        try:
            self.stop_processes()
        except Exception as exc:  # teardown must go on to the namespaces
            errors.append(f"stopping processes: {exc}")
        for ns in reversed(self._created_ns):
            proc = _ip("netns", "delete", ns, check=False)
            if proc.returncode != 0 and os.path.exists(_netns_path(ns)):
                errors.append(f"ip netns delete {ns}: {proc.stderr.strip()}")
        self._created_ns.clear()
        self.pods.clear()
        if errors:
            raise TopologyError("; ".join(errors))
