"""Find the host-side interface of a local pod from its IP, without exec into the pod.

The original Clovisor exec'd ``cat /sys/class/net/eth0/iflink`` in every pod,
which needs ``pods/exec`` RBAC and a shell in every image.  Here the node's
own routing and bridging tables answer the question, read with iproute2's
JSON output (``ip -j``, ``bridge -j``) in the network namespace of the
*calling thread* (the agent runs with ``hostNetwork: true``, so that is the
node's; tests call it inside :func:`clovisor.topology.in_netns`).

Two CNI families are covered:

* **Routed** (Calico, kindnet/ptp, AWS VPC CNI, Cilium with
  ``endpointRoutes.enabled``): the node has a ``/32`` (``/128``) route to the
  pod through its host-side veth.  ``ip route get <pod IP>`` names that veth.
* **Bridged** (flannel's ``cni0``, the reference ``bridge`` plugin, Docker's
  ``docker0``): the route names a Linux bridge.  The pod's MAC comes from the
  bridge's neighbour table and the bridge port from its forwarding database
  (FDB); that port is the veth.

Decision: the answer is accepted only when the interface is a **veth**.  A
route through a gateway means the pod is behind another host; a route to a
tunnel (vxlan, ipip), to Cilium's ``cilium_host``, to an OVS bridge, or to the
node's uplink means the pod is not behind a veth of this node that we could
trace.  In all of these cases the answer is ``None``, never a guess: attaching
the classifier to ``eth0`` or ``flannel.1`` would trace the wrong traffic.
(A "not the default-route device" rule would accept all of those.)

On a bridge, a pod whose neighbour entry is missing or failed (nothing has
talked to it yet, or the entry expired) can be resolved with
``ip neigh replace <ip> dev <bridge> use``: the kernel sends one ARP request
(IPv6: one neighbour solicitation) on the bridge, exactly what the node's
stack does before its first packet to the pod, and the pod's reply teaches
both the neighbour table and the bridge FDB.  No packet goes to any address
other than the pod IP being looked up, and only on the bridge that routes to
it.  ``resolve=False`` turns this off.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "HostLink",
    "IfaceError",
    "InterfaceCache",
    "Runner",
    "host_interface",
    "host_link",
]

log = logging.getLogger(__name__)


class HostLink(NamedTuple):
    """A pod's host-side interface, in the namespace the lookup ran in."""

    name: str
    ifindex: int


class IfaceError(RuntimeError):
    """iproute2 is missing, hung, or answered something that is not its JSON."""


# One command in, (exit code, stdout, stderr) out: the seam that unit tests
# replace with recorded iproute2 answers.
Runner = Callable[[Sequence[str]], tuple[int, str, str]]

_COMMAND_TIMEOUT = 5.0
# Neighbour states that carry no usable link-layer address.
_UNRESOLVED = frozenset({"INCOMPLETE", "FAILED", "NONE"})
_POLL_INTERVAL = 0.02


def _run(argv: Sequence[str]) -> tuple[int, str, str]:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, check=False, timeout=_COMMAND_TIMEOUT
        )
    except FileNotFoundError as exc:
        raise IfaceError(f"{argv[0]} not found: install iproute2") from exc
    except subprocess.TimeoutExpired as exc:
        raise IfaceError(f"{' '.join(argv)}: no answer in {_COMMAND_TIMEOUT:g}s") from exc
    return proc.returncode, proc.stdout, proc.stderr


def host_interface(pod_ip: str, *, resolve: bool = True, timeout: float = 1.0,
                   runner: Runner | None = None) -> str | None:
    """The name of the host-side veth of the local pod with ``pod_ip``, or None.

    See :func:`host_link`.
    """
    link = host_link(pod_ip, resolve=resolve, timeout=timeout, runner=runner)
    return None if link is None else link.name


def host_link(pod_ip: str, *, resolve: bool = True, timeout: float = 1.0,
              runner: Runner | None = None) -> HostLink | None:
    """``(name, ifindex)`` of the host-side veth of the local pod with ``pod_ip``, or None.

    None means "not a pod behind a veth of this node": no route, a route via
    a gateway, the node's own address (hostNetwork pods), a non-veth device,
    or, on a bridge, a MAC that no veth port has (after the optional ARP/ND
    probe, waiting up to ``timeout`` seconds).

    Raises ValueError for a string that is not an IP address and
    :class:`IfaceError` when iproute2 itself fails.
    """
    addr = ipaddress.ip_address(pod_ip)  # ValueError on garbage: a caller bug, not "not local"
    if addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr.is_link_local:
        return None
    return _Lookup(runner or _run, str(addr), addr.version).find(resolve, timeout)


class _Lookup:
    def __init__(self, run: Runner, ip: str, version: int) -> None:
        self._run = run
        self._ip = ip
        self._family = f"-{version}"

    def _json(self, argv: Sequence[str]) -> list[dict[str, Any]] | None:
        """Parsed output of an iproute2 command; None if it exited non-zero."""
        rc, out, _ = self._run(argv)
        if rc != 0:
            return None
        try:
            data = json.loads(out) if out.strip() else []
        except json.JSONDecodeError as exc:
            raise IfaceError(f"{' '.join(argv)}: not JSON: {out[:200]!r}") from exc
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            raise IfaceError(f"{' '.join(argv)}: unexpected JSON: {out[:200]!r}")
        return data

    def _link(self, name: str) -> tuple[int, str] | None:
        """(ifindex, kind) of interface ``name``; kind is "" for plain devices."""
        links = self._json(["ip", "-j", "-d", "link", "show", "dev", name])
        if not links:
            return None  # vanished between two commands
        link = links[0]
        info = link.get("linkinfo")
        kind = info.get("info_kind", "") if isinstance(info, dict) else ""
        try:
            return int(link["ifindex"]), str(kind)
        except (KeyError, TypeError, ValueError) as exc:
            raise IfaceError(f"ip link show {name}: no ifindex in {link!r}") from exc

    def find(self, resolve: bool, timeout: float) -> HostLink | None:
        # A failed route lookup ("Network is unreachable", a blackhole or
        # prohibit route) just means the address is not reachable from here.
        routes = self._json(["ip", "-j", self._family, "route", "get", self._ip])
        if not routes:
            return None
        route = routes[0]
        dev = route.get("dev")
        # type "local": the node's own address (a hostNetwork pod); a gateway:
        # the pod lives behind another host.  Neither has a veth to trace here.
        if (not isinstance(dev, str) or route.get("gateway")
                or route.get("type", "unicast") != "unicast"):
            return None
        link = self._link(dev)
        if link is None:
            return None
        ifindex, kind = link
        if kind == "veth":
            return HostLink(dev, ifindex)
        if kind == "bridge":
            return self._via_bridge(dev, resolve, timeout)
        return None

    # --- bridged CNIs ---------------------------------------------------------------

    def _neighbour_mac(self, bridge: str) -> str | None:
        entries = self._json(["ip", "-j", self._family, "neigh", "show", "to", self._ip,
                              "dev", bridge]) or []
        for e in entries:
            mac = e.get("lladdr")
            states = e.get("state") or []
            if e.get("dst") == self._ip and isinstance(mac, str) and not _UNRESOLVED & set(states):
                return mac.lower()
        return None

    def _port_of(self, bridge: str, mac: str) -> HostLink | None:
        fdb = self._json(["bridge", "-j", "fdb", "show", "br", bridge]) or []
        for e in fdb:
            # "self" entries are a device's own address list, not what the
            # bridge learned; master == bridge entries are the forwarding table.
            if (str(e.get("mac", "")).lower() != mac or e.get("master") != bridge
                    or "self" in (e.get("flags") or [])):
                continue
            port = e.get("ifname")
            if not isinstance(port, str):
                continue
            link = self._link(port)
            # The MAC behind a vxlan or uplink port is a pod on another host.
            if link is not None and link[1] == "veth":
                return HostLink(port, link[0])
        return None

    def _via_bridge(self, bridge: str, resolve: bool, timeout: float) -> HostLink | None:
        mac = self._neighbour_mac(bridge)
        if mac is not None:
            found = self._port_of(bridge, mac)
            # A stale entry can name the MAC of a deleted pod whose IP was
            # reused, or a port whose FDB entry aged out: re-resolve then.
            if found is not None or not resolve:
                return found
        elif not resolve:
            return None
        # NTF_USE: the kernel (re)starts resolution without changing the entry;
        # "replace" rather than "add" so an existing entry is not an error.
        self._run(["ip", self._family, "neigh", "replace", self._ip, "dev", bridge, "use"])
        deadline = time.monotonic() + timeout
        while True:
            mac = self._neighbour_mac(bridge)
            if mac is not None:
                found = self._port_of(bridge, mac)
                if found is not None:
                    return found
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_INTERVAL)


# --- memory across reconcile passes ---------------------------------------------------


class InterfaceCache:
    """:func:`host_link` for the reconciler, which asks about every pod on every pass.

    A veth found once is re-checked with one ``if_nametoindex`` (no process
    forked): the same name with the same ifindex is the same veth, since a
    pod's IP cannot move to another live veth.  When it is gone or renumbered
    (the pod's sandbox was recreated) the lookup runs again.  A miss is
    retried after ``retry_initial`` seconds, doubling up to ``retry_max``,
    so a pod that is not behind a veth of this node (Cilium without endpoint
    routes, say) costs a few lookups a minute, not a few per second.
    iproute2 failures count as misses and are logged once per streak.
    """

    def __init__(
        self,
        lookup: Callable[[str], HostLink | None] = host_link,
        *,
        index_of: Callable[[str], int] = socket.if_nametoindex,
        clock: Callable[[], float] = time.monotonic,
        retry_initial: float = 0.2,
        retry_max: float = 10.0,
    ) -> None:
        self._lookup = lookup
        self._index_of = index_of
        self._clock = clock
        self._retry = (retry_initial, retry_max)
        self._found: dict[str, HostLink] = {}
        self._missed: dict[str, tuple[float, float]] = {}  # ip -> (next try, delay)
        self._failing = False

    def __call__(self, pod_ip: str) -> HostLink | None:
        link = self._found.get(pod_ip)
        if link is not None:
            try:
                if self._index_of(link.name) == link.ifindex:
                    return link
            except OSError:
                pass
            del self._found[pod_ip]
        now = self._clock()
        missed = self._missed.get(pod_ip)
        if missed is not None and now < missed[0]:
            return None
        try:
            link = self._lookup(pod_ip)
            self._failing = False
        except (IfaceError, ValueError) as exc:
            if not self._failing:
                log.warning("cannot look up the interface of pod IP %s: %s", pod_ip, exc)
            self._failing = True
            link = None
        if link is None:
            delay = self._retry[0] if missed is None else min(self._retry[1], missed[1] * 2)
            self._missed[pod_ip] = (now + delay, delay)
            return None
        self._missed.pop(pod_ip, None)
        self._found[pod_ip] = link
        return link

    def retain(self, pod_ips: Iterable[str]) -> None:
        """Forget every address but these (the pods that are still wanted)."""
        keep = set(pod_ips)
        for table in (self._found, self._missed):
            for ip in [ip for ip in table if ip not in keep]:
                del table[ip]

    def next_retry(self) -> float | None:
        """When (``clock()`` time) the earliest pending miss is due again; None if none."""
        return min((t for t, _ in self._missed.values()), default=None)
