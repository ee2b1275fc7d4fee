"""The agent's Kubernetes edge: credentials, and an informer for pods and services.

:class:`KubeWatcher` keeps a local cache of this node's pods and of the
cluster's services, the way client-go's reflector does: LIST (remember the
collection's resourceVersion), then WATCH from it and apply each event; on
``410 Gone`` list again and emit what changed while we were away; on any other
failure back off (exponential, jittered, capped) and resume the watch from the
last resourceVersion seen, so nothing is listed twice. While the API server is
unreachable the cache keeps its last state: the agent keeps tracing what it
traces.

Scope, and the RBAC it needs (a ClusterRole, because both are cluster-wide):

- pods: ``list``, ``watch`` with ``fieldSelector=spec.nodeName=<node>`` across
  all namespaces. The API server filters, so a node's agent receives only its
  own pods however large the cluster is.
- services: ``list``, ``watch`` across all namespaces. Watching only the
  selected namespaces would need one watch per namespace, restarted whenever
  Redis changes ``clovisor_labels``; services are small and few, so one
  cluster-wide watch is simpler and cheaper. The optional ``namespaces``
  callable filters what :meth:`KubeWatcher.pods`/:meth:`KubeWatcher.services`
  return and which changes wake ``on_change``; the cache keeps everything, so
  a new namespace selection needs no relist.

We stream the watch ourselves (``_preload_content=False``) instead of using
``kubernetes.watch.Watch.stream``: that helper deserialises every event into
the client's models (slow, and we want plain data), silently retries once on
410 with the same too-old resourceVersion, and crashes with a ``KeyError`` on
ERROR events when ``deserialize=False``. Here every line is plain JSON and the
410, bookmark and resourceVersion handling is explicit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from .model import ContainerPort, PodInfo, ServiceInfo, ServicePort

ApiClient = k8s_client.ApiClient
# The config loaders and the serializer are untyped (and the whole client is,
# before v35); calling them through Any keeps --strict meaningful everywhere else.
_config: Any = k8s_config

log = logging.getLogger(__name__)

USER_AGENT = "clovisor-agent"
HTTP_GONE = 410


class KubeError(Exception):
    """The agent cannot talk to Kubernetes at all; the message is one line."""


# --- credentials -------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def api_client(kubeconfig: str | None = None, *, retries: int | None = None) -> ApiClient:
    """An API client from ``kubeconfig``, ``$KUBECONFIG``, the pod's service account
    or ``~/.kube/config``, in that order (controller-runtime's order: an
    explicit file beats the in-cluster account, which beats the default file).

    ``retries`` replaces urllib3's own (3, each logged) for a caller that
    reports failures itself. Raises :class:`KubeError` with a one-line reason
    when none of them works.
    """
    cfg = k8s_client.Configuration()
    env_file = os.environ.get("KUBECONFIG", "").strip()
    # persist_config=False: the agent must never rewrite an operator's kubeconfig
    # (the loader would, to store refreshed tokens).
    if kubeconfig:
        try:
            _config.load_kube_config(
                config_file=kubeconfig, client_configuration=cfg, persist_config=False
            )
        except Exception as exc:
            raise KubeError(f"kubeconfig {kubeconfig}: {_one_line(exc)}") from None
    elif env_file:
        try:
            # Passed explicitly: the loader reads $KUBECONFIG once, at import.
            # A list of files (colon-separated) is merged, as kubectl does.
            _config.load_kube_config(
                config_file=env_file, client_configuration=cfg, persist_config=False
            )
        except Exception as exc:
            raise KubeError(f"KUBECONFIG={env_file}: {_one_line(exc)}") from None
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            # try_refresh_token: bound service-account tokens expire (1 h by
            # default); the loader re-reads the projected file before each use.
            _config.load_incluster_config(client_configuration=cfg, try_refresh_token=True)
        except Exception as exc:
            raise KubeError(f"in-cluster credentials: {_one_line(exc)}") from None
    else:
        # Not the loader's KUBE_CONFIG_DEFAULT_LOCATION: that is $KUBECONFIG as
        # it was at import time.
        default = os.path.expanduser("~/.kube/config")
        if not os.path.exists(default):
            raise KubeError(
                "no Kubernetes credentials: not running in a pod (KUBERNETES_SERVICE_HOST "
                f"unset), no --kubeconfig, KUBECONFIG unset and no {default}"
            )
        try:
            _config.load_kube_config(
                config_file=default, client_configuration=cfg, persist_config=False
            )
        except Exception as exc:
            raise KubeError(f"kubeconfig {default}: {_one_line(exc)}") from None
    if retries is not None:
        cfg.retries = retries
    api = ApiClient(cfg)
    api.user_agent = USER_AGENT
    return api


# --- conversion --------------------------------------------------------------

_serializer: Any = None  # an ApiClient, made on first use


def _as_dict(obj: object) -> Mapping[str, Any]:
    """The API JSON (camelCase keys) of a client model, or ``obj`` if it is already a dict."""
    global _serializer
    if isinstance(obj, Mapping):
        return obj
    if _serializer is None:
        _serializer = ApiClient(k8s_client.Configuration())
    data = _serializer.sanitize_for_serialization(obj)
    if not isinstance(data, Mapping):
        raise TypeError(f"not a Kubernetes object: {type(obj).__name__}")
    return data


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _port_number(value: object) -> int | None:
    # bool is an int subclass; a port is never True.
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    return None


def _labels(value: object) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in _map(value).items()))


def pod_info(obj: object) -> PodInfo:
    """A :class:`PodInfo` from a ``V1Pod`` or the pod's API JSON (a dict).

    Tolerant by design: a field that is missing or of the wrong type gives the
    default rather than an exception, so one odd object never stops the watch.
    """
    d = _as_dict(obj)
    meta, spec, status = _map(d.get("metadata")), _map(d.get("spec")), _map(d.get("status"))
    containers = _list(spec.get("containers"))
    # Native sidecars (init containers with restartPolicy Always) run for the
    # pod's whole life and may serve the ports a service targets.
    containers += [
        c for c in _list(spec.get("initContainers")) if _map(c).get("restartPolicy") == "Always"
    ]
    ports: list[ContainerPort] = []
    for c in containers:
        c = _map(c)
        for p in _list(c.get("ports")):
            p = _map(p)
            number = _port_number(p.get("containerPort"))
            if number is None:
                continue
            ports.append(
                ContainerPort(
                    container=_str(c.get("name")),
                    port=number,
                    name=_str(p.get("name")),
                    protocol=_str(p.get("protocol")) or "TCP",
                )
            )
    ip = _str(status.get("podIP"))
    ips = tuple(a for a in (_str(_map(e).get("ip")) for e in _list(status.get("podIPs"))) if a)
    if not ips and ip:
        ips = (ip,)
    if not ip and ips:
        ip = ips[0]
    return PodInfo(
        namespace=_str(meta.get("namespace")),
        name=_str(meta.get("name")),
        uid=_str(meta.get("uid")),
        node_name=_str(spec.get("nodeName")),
        ip=ip,
        ips=ips,
        phase=_str(status.get("phase")),
        host_network=spec.get("hostNetwork") is True,
        labels=_labels(meta.get("labels")),
        container_ports=tuple(ports),
        deleting=meta.get("deletionTimestamp") is not None,
    )


def _target_port(value: object, port: int) -> int | str:
    if isinstance(value, bool):
        return port
    if isinstance(value, int):
        return value if value > 0 else port
    if isinstance(value, str) and value:
        # IntOrString arrives as a JSON string only for names; a numeric string
        # can only come from a hand-built object, and means the number.
        return int(value) if value.isdigit() else value
    return port  # unset: the API server's default is the service port itself


def service_info(obj: object) -> ServiceInfo:
    """A :class:`ServiceInfo` from a ``V1Service`` or the service's API JSON (a dict)."""
    d = _as_dict(obj)
    meta, spec = _map(d.get("metadata")), _map(d.get("spec"))
    ports: list[ServicePort] = []
    for p in _list(spec.get("ports")):
        p = _map(p)
        number = _port_number(p.get("port"))
        if number is None:
            continue
        ports.append(
            ServicePort(
                port=number,
                target_port=_target_port(p.get("targetPort"), number),
                name=_str(p.get("name")),
                protocol=_str(p.get("protocol")) or "TCP",
                app_protocol=_str(p.get("appProtocol")),
            )
        )
    return ServiceInfo(
        namespace=_str(meta.get("namespace")),
        name=_str(meta.get("name")),
        selector=_labels(spec.get("selector")),
        ports=tuple(ports),
    )


# --- the informer ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeStats:
    lists: int = 0  # LIST calls that completed (all pages), initial ones included
    relists: int = 0  # lists after the initial one: 410 Gone, or the first list failed midway
    watches: int = 0  # WATCH requests the server accepted
    watch_restarts: int = 0  # watches opened after the first (timeouts, errors, 410s)
    events: int = 0  # ADDED/MODIFIED/DELETED events applied
    bookmarks: int = 0
    expired: int = 0  # 410 Gone seen (as an ERROR event or an HTTP status)
    errors: int = 0  # failed requests (connection, 5xx, 4xx other than 410, bad JSON)
    last_error: str = ""  # "" once a request succeeds again


class _Expired(Exception):
    """410 Gone: our resourceVersion left the server's history; list again."""


class _Stopped(Exception):
    """stop() was called: unwind the watcher thread."""


class _Backoff:
    """Exponential backoff with "equal jitter": half fixed, half random, so many
    agents restarted together do not hammer a recovering API server in step."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial, self.cap, self.attempt = initial, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.initial * (2.0**self.attempt))
        self.attempt = min(self.attempt + 1, 64)
        return delay / 2 + random.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0


def describe_error(exc: BaseException) -> str:
    """One line for a failed API call: the HTTP status, or the connection error."""
    if isinstance(exc, ApiException):
        text = f"HTTP {exc.status} {exc.reason or ''}".strip()
        if exc.status in (401, 403):
            text += " (check the agent's ServiceAccount and ClusterRole: list/watch pods, services)"
        return text
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return describe_error(exc.reason)
    return f"{type(exc).__name__}: {_one_line(exc)}"


def _abort(resp: Any) -> None:
    """Unblock a thread reading ``resp`` (a urllib3 response) by shutting its socket down."""
    shutdown = getattr(resp, "shutdown", None)  # urllib3 >= 2.3
    if callable(shutdown):
        with contextlib.suppress(Exception):
            shutdown()
            return
    conn = getattr(resp, "connection", None) or getattr(resp, "_connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _lines(resp: Any) -> Iterator[bytes]:
    """Complete newline-terminated lines of a chunked watch response, as they arrive."""
    buf = bytearray()
    for chunk in resp.stream(amt=None, decode_content=False):
        buf += chunk
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[start:nl])
            start = nl + 1
            if line.strip():
                yield line
        del buf[:start]
    if buf.strip():
        yield bytes(buf)


class _Reflector:
    """List+watch of one resource into ``cache``; one thread."""

    def __init__(
        self,
        owner: KubeWatcher,
        resource: str,
        list_fn: Callable[..., Any],
        convert: Callable[[Mapping[str, Any]], PodInfo | ServiceInfo],
        selector: Mapping[str, str],
    ) -> None:
        self.owner = owner
        self.resource = resource
        self.list_fn = list_fn
        self.convert = convert
        self.selector = dict(selector)
        self.cache: dict[str, PodInfo | ServiceInfo] = {}
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.thread: threading.Thread | None = None
        self._resp: Any = None  # the in-flight response, for stop() to abort
        self._resp_lock = threading.Lock()
        self._backoff = _Backoff(owner.backoff_initial, owner.backoff_max)
        self._failing = 0  # consecutive failures, for log-once-then-quiet
        self._list_started = -1e9
        self.n = dict.fromkeys(
            (
                "lists",
                "relists",
                "watches",
                "watch_restarts",
                "events",
                "bookmarks",
                "expired",
                "errors",
            ),
            0,
        )
        self.last_error = ""

    # -- plumbing

    def _call(self, **kwargs: Any) -> Any:
        if self.owner._stopping.is_set():
            raise _Stopped
        resp = self.list_fn(**self.selector, _preload_content=False, **kwargs)
        with self._resp_lock:
            self._resp = resp
        if self.owner._stopping.is_set():  # stop() ran between the request and here
            # Closed, not only shut down for reading: urllib3 shuts down SHUT_RD,
            # which the server never sees, and the watch would stay open on it
            # until the socket is garbage-collected.
            self._done(resp, clean=False)
            raise _Stopped
        return resp

    def _done(self, resp: Any, *, clean: bool) -> None:
        with self._resp_lock:
            self._resp = None
        with contextlib.suppress(Exception):
            if not clean:
                # Half-read or cut: the connection must not go back to the pool
                # for reuse, and closing it tells the server we are gone.
                resp.close()
            resp.release_conn()

    def abort(self) -> None:
        with self._resp_lock:
            resp = self._resp
        if resp is not None:
            _abort(resp)

    def _ok(self, *, reset_backoff: bool = True) -> None:
        if self._failing:
            log.info(
                "kube %s: API server reachable again after %d failures",
                self.resource,
                self._failing,
            )
        self._failing = 0
        self.last_error = ""
        if reset_backoff:
            self._backoff.reset()

    def _fail(self, exc: BaseException) -> None:
        self.n["errors"] += 1
        self.last_error = describe_error(exc)
        self._failing += 1
        delay = self._backoff.next()
        # The first failure of a streak is news; the next hundred are not.
        level = logging.WARNING if self._failing == 1 else logging.DEBUG
        log.log(
            level,
            "kube %s: %s; retrying in %.1fs (resourceVersion %s)",
            self.resource,
            self.last_error,
            delay,
            self.resource_version or "none: will list",
        )
        self.owner._stopping.wait(delay)

    # -- the loop

    def run(self) -> None:
        stopping = self.owner._stopping
        while not stopping.is_set():
            try:
                if self.resource_version is None:
                    self._list()
                    # Not yet healthy: only a working watch resets the backoff,
                    # or a server that 410s every watch would get a list per loop.
                    self._ok(reset_backoff=False)
                self._watch()
            except _Stopped:
                break
            except _Expired:
                self._expired()
            except ApiException as exc:
                if exc.status == HTTP_GONE:  # as a status: watch start, or a stale continue token
                    self._expired()
                elif not stopping.is_set():
                    self._fail(exc)
            except Exception as exc:
                # urllib3 connection/protocol/timeout errors, OSError, bad JSON:
                # the cache stays as it was and we resume from resource_version.
                if not stopping.is_set():
                    self._fail(exc)

    def _expired(self) -> None:
        self.n["expired"] += 1
        log.info(
            "kube %s: resourceVersion %s expired (410 Gone); listing again",
            self.resource,
            self.resource_version or "(list in progress)",
        )
        self.resource_version = None
        # Relist at once, unless the last list was a moment ago: a server that
        # answers 410 to what it just listed must not get a list per loop.
        if time.monotonic() - self._list_started < 1.0:
            self.owner._stopping.wait(self._backoff.next())

    def _list(self) -> None:
        self._list_started = time.monotonic()
        items: list[Any] = []
        cont: str | None = None
        rv = ""
        while True:
            kwargs: dict[str, Any] = {"_request_timeout": self.owner._timeouts()}
            if self.owner.page_size:
                kwargs["limit"] = self.owner.page_size
            if cont:
                kwargs["_continue"] = cont
            resp = self._call(**kwargs)
            clean = False
            try:
                data = resp.data
                clean = True
            finally:
                self._done(resp, clean=clean)
            body = json.loads(data)
            meta = _map(body.get("metadata"))
            # Pages of one list share a snapshot; a 410 on a continue token
            # (raised as ApiException) restarts the whole list from run().
            rv = _str(meta.get("resourceVersion")) or rv
            items.extend(_list(body.get("items")))
            cont = _str(meta.get("continue")) or None
            if cont is None:
                break
        if not rv:
            raise ValueError(f"{self.resource} list without metadata.resourceVersion")
        fresh: dict[str, PodInfo | ServiceInfo] = {}
        for item in items:
            info = self._convert(item)
            if info is not None:
                fresh[info.key] = info
        with self.owner._lock:
            old = self.cache
            self.cache = fresh
        changed = {k for k in old.keys() | fresh.keys() if old.get(k) != fresh.get(k)}
        self.resource_version = rv
        self.n["lists"] += 1
        if self.synced.is_set():
            self.n["relists"] += 1
        log.debug(
            "kube %s: listed %d at resourceVersion %s (%d changed)",
            self.resource,
            len(fresh),
            rv,
            len(changed),
        )
        self.synced.set()
        self.owner._notify(changed, initial=self.n["lists"] == 1)

    def _convert(self, obj: object) -> PodInfo | ServiceInfo | None:
        try:
            return self.convert(_map(obj))
        except Exception as exc:  # a converter bug must not stop the informer
            self.n["errors"] += 1
            log.warning("kube %s: cannot convert object: %s", self.resource, _one_line(exc))
            return None

    def _watch(self) -> None:
        owner = self.owner
        # client-go picks timeoutSeconds in [min, 2*min) for the same reason:
        # agents on every node must not all reconnect in the same second.
        timeout = max(1, int(owner.watch_timeout * random.uniform(1.0, 2.0)))
        started = time.monotonic()
        got_events = clean = False
        resp = self._call(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            # Read timeout past the server's own: a silent half-open connection
            # (API server VIP moved, node partitioned) is noticed and retried.
            _request_timeout=owner._timeouts(extra=timeout),
        )
        try:
            self.n["watches"] += 1
            if self.n["watches"] > 1:
                self.n["watch_restarts"] += 1
            # Accepted is not yet healthy: a server that takes the watch and
            # drops it at once must not reset the backoff into a tight loop.
            self._ok(reset_backoff=False)
            for line in _lines(resp):
                if owner._stopping.is_set():
                    raise _Stopped
                if self._event(json.loads(line)) and not got_events:
                    got_events = True
                    self._backoff.reset()
            clean = True
        finally:
            self._done(resp, clean=clean)
        if owner._stopping.is_set():
            raise _Stopped
        if got_events or time.monotonic() - started >= 1.0:
            self._backoff.reset()
        else:
            # Ended at once with nothing in it (a proxy cutting long requests,
            # a broken server): pause, or this would be a tight loop.
            owner._stopping.wait(self._backoff.next())

    def _event(self, event: object) -> bool:
        """Apply one watch event; True if it carried news (an object or a bookmark)."""
        ev = _map(event)
        kind = ev.get("type")
        obj = _map(ev.get("object"))
        if kind == "ERROR":
            code = obj.get("code")
            if code == HTTP_GONE:
                raise _Expired
            raise ApiException(
                status=code if isinstance(code, int) else 500,
                reason=f"{_str(obj.get('reason'))}: {_str(obj.get('message'))}",
            )
        rv = _str(_map(obj.get("metadata")).get("resourceVersion"))
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = rv
            self.n["bookmarks"] += 1
            return True
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            log.debug("kube %s: ignoring watch event type %r", self.resource, kind)
            return False
        info = self._convert(obj)
        if rv:
            # Advance even past an object we could not convert: re-reading it
            # after a reconnect would fail the same way.
            self.resource_version = rv
        if info is None:
            return True
        self.n["events"] += 1
        key = info.key
        with self.owner._lock:
            old = self.cache.get(key)
            if kind == "DELETED":
                self.cache.pop(key, None)
                changed = old is not None
            else:
                self.cache[key] = info
                changed = old != info
        if changed:
            # Status churn (conditions, restarts) leaves PodInfo equal: no wake-up.
            self.owner._notify({key})
        return True


class KubeWatcher:
    """Informer for this node's pods and the cluster's services.

    ``on_change()`` is called from a watcher thread after the cache changed
    (once per list, once per changing event); it must be quick and must not
    block, e.g. set an event the reconciler waits on. Exceptions it raises are
    logged and ignored.
    """

    def __init__(
        self,
        api: ApiClient,
        node_name: str,
        on_change: Callable[[], None],
        *,
        namespaces: Callable[[], set[str]] | None = None,
        watch_timeout: float = 300.0,
        request_timeout: float = 30.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
        page_size: int = 500,
    ) -> None:
        if not node_name:
            raise ValueError("node name is empty (set MY_NODE_NAME from spec.nodeName)")
        self.node_name = node_name
        self.on_change = on_change
        self.namespaces = namespaces
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.page_size = page_size
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = False
        core = k8s_client.CoreV1Api(api)
        self._pods = _Reflector(
            self,
            "pods",
            core.list_pod_for_all_namespaces,
            pod_info,
            {"field_selector": f"spec.nodeName={node_name}"},
        )
        self._services = _Reflector(
            self, "services", core.list_service_for_all_namespaces, service_info, {}
        )
        self._reflectors = (self._pods, self._services)

    def _timeouts(self, extra: float = 0.0) -> tuple[float, float]:
        return (self.request_timeout, self.request_timeout + extra)

    # -- lifecycle

    def start(self) -> None:
        if self._started:
            raise RuntimeError("KubeWatcher.start() called twice")
        self._started = True
        for r in self._reflectors:
            r.thread = threading.Thread(target=r.run, name=f"kube-{r.resource}", daemon=True)
            r.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both watches and join their threads (at most ``timeout`` seconds)."""
        self._stopping.set()
        for r in self._reflectors:
            r.abort()
        deadline = time.monotonic() + timeout
        for r in self._reflectors:
            if r.thread is not None:
                r.thread.join(max(0.0, deadline - time.monotonic()))
                if r.thread.is_alive():
                    # Only a connect() to a black-holed address can hold it
                    # this long; the thread is a daemon and exits with us.
                    log.warning(
                        "kube %s: watcher thread did not stop in %.1fs", r.resource, timeout
                    )

    def __enter__(self) -> KubeWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def synced(self) -> bool:
        """Both initial lists are done (until then the caches are not the cluster's state)."""
        return all(r.synced.is_set() for r in self._reflectors)

    def wait_synced(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in self._reflectors:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not r.synced.wait(left):
                return False
        return True

    # -- reads

    def _selected(self) -> set[str] | None:
        return None if self.namespaces is None else set(self.namespaces())

    def pods(self) -> list[PodInfo]:
        """This node's pods (in the selected namespaces, if a selection was given), by key."""
        selected = self._selected()
        with self._lock:
            items = list(self._pods.cache.values())
        return sorted(
            (
                p
                for p in items
                if isinstance(p, PodInfo) and (selected is None or p.namespace in selected)
            ),
            key=lambda p: p.key,
        )

    def services(self) -> list[ServiceInfo]:
        """The cluster's services (in the selected namespaces, if a selection was given), by key."""
        selected = self._selected()
        with self._lock:
            items = list(self._services.cache.values())
        return sorted(
            (
                s
                for s in items
                if isinstance(s, ServiceInfo) and (selected is None or s.namespace in selected)
            ),
            key=lambda s: s.key,
        )

    @property
    def stats(self) -> KubeStats:
        totals = dict.fromkeys(self._pods.n, 0)
        for r in self._reflectors:
            for k, v in r.n.items():
                totals[k] += v
        last = "; ".join(f"{r.resource}: {r.last_error}" for r in self._reflectors if r.last_error)
        return KubeStats(
            lists=totals["lists"],
            relists=totals["relists"],
            watches=totals["watches"],
            watch_restarts=totals["watch_restarts"],
            events=totals["events"],
            bookmarks=totals["bookmarks"],
            expired=totals["expired"],
            errors=totals["errors"],
            last_error=last,
        )

    # -- notification

    def _notify(self, keys: set[str], *, initial: bool = False) -> None:
        # A reflector's first list always notifies, even when empty: it is how
        # the caller learns that the cache now reflects the cluster.
        if not initial:
            if not keys:
                return
            if self.namespaces is not None:
                try:
                    selected: set[str] | None = set(self.namespaces())
                except Exception as exc:
                    log.warning("kube: namespaces() failed: %s", _one_line(exc))
                    selected = None  # when unsure, wake the caller
                if selected is not None and not any(k.split("/", 1)[0] in selected for k in keys):
                    return
        try:
            self.on_change()
        except Exception:
            log.exception("kube: on_change callback failed")
