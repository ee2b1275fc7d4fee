"""An in-test Kubernetes API server: the real list/watch wire format, for the real client.

No API server can be installed on these machines, so the watch path is tested
against this one. It speaks what kube-apiserver speaks to ``kubernetes``'s
``CoreV1Api`` over plain HTTP on 127.0.0.1:

- ``GET /api/v1/{pods,services}`` and ``/api/v1/namespaces/<ns>/{pods,services}``:
  a ``PodList``/``ServiceList`` with ``metadata.resourceVersion``; paging with
  ``limit``/``continue`` (a consistent snapshot, ``410 Expired`` once the
  token is expired); ``fieldSelector`` (``spec.nodeName``, ``metadata.*``,
  ``status.phase``, ``status.podIP``) and equality ``labelSelector``s; items
  carry no kind/apiVersion, as in a real list.
- the same with ``watch=true``: a chunked stream of newline-delimited
  ``{"type": ..., "object": ...}`` events from ``resourceVersion`` on. The
  resourceVersion is one counter for every resource (like etcd's revision), so
  a pod watch's BOOKMARK can carry a version past its last pod event. With a
  field selector, an object that starts matching arrives as ADDED and one
  that stops matching as DELETED, like the watch cache does. A watch from
  before the history window gets ``ERROR`` ``410 Expired`` (or, with
  ``expired_as_status=True``, an HTTP 410 response); ``resourceVersion``
  unset or ``"0"`` starts with synthetic ADDED events for the current state;
  ``timeoutSeconds`` ends the stream cleanly.
- ``GET /api/v1/namespaces/<ns>/{pods,services}/<name>``: one object.

Test controls: ``add_pod``/``update_pod``/``delete_pod``/``get_pod`` (and the
same for services), ``bookmark()``, ``expire_history()`` (every older
resourceVersion becomes 410, live watches get the ERROR event),
``end_watches()`` (as if every watch hit its timeout), ``fail_next()`` (HTTP
errors), ``stop()``/``restart()`` on the same port (the API server down and up:
connections are cut, not ended), ``requests`` (what the client asked), and
``write_kubeconfig()`` for ``config.load_kube_config``.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.conftest import wait_until

Obj = dict[str, Any]

KINDS = {"pods": "Pod", "services": "Service"}

# Fields kube-apiserver lets a fieldSelector use, per resource (a subset).
FIELDS = {
    "pods": (
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "status.phase",
        "status.podIP",
    ),
    "services": ("metadata.name", "metadata.namespace"),
}

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    410: "Expired",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status_object(code: int, message: str, reason: str | None = None) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or REASONS.get(code, "Unknown"),
        "code": code,
    }


# --- object builders -----------------------------------------------------------


def make_pod(
    name: str,
    *,
    namespace: str = "default",
    node: str = "node-a",
    ip: str | None = "10.200.0.10",
    ips: Sequence[str] | None = None,
    phase: str = "Running",
    labels: Mapping[str, str] | None = None,
    ports: Iterable[int | tuple[str, int] | Mapping[str, Any]] = (),
    container: str = "app",
    containers: list[Obj] | None = None,
    host_network: bool = False,
    deleting: bool = False,
) -> Obj:
    """A pod in API JSON shape. ``ports`` go to one container named ``container``:
    a number, ``(name, number)``, or a raw ``{"containerPort": ...}`` dict."""
    port_list: list[Obj] = []
    for p in ports:
        if isinstance(p, int):
            port_list.append({"containerPort": p, "protocol": "TCP"})
        elif isinstance(p, tuple):
            port_list.append({"name": p[0], "containerPort": p[1], "protocol": "TCP"})
        else:
            port_list.append(dict(p))
    spec: Obj = {
        "containers": containers
        if containers is not None
        else [
            {
                "name": container,
                "image": "nginx:1.27",
                **({"ports": port_list} if port_list else {}),
            }
        ],
        "restartPolicy": "Always",
    }
    if node:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    status: Obj = {"phase": phase}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": a} for a in (ips or [ip])]
    meta: Obj = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        meta["deletionGracePeriodSeconds"] = 30
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def make_service(
    name: str,
    *,
    namespace: str = "default",
    selector: Mapping[str, str] | None = None,
    ports: Iterable[Mapping[str, Any] | tuple[str, int, int | str]] = (),
) -> Obj:
    """A ClusterIP service in API JSON shape; ``ports`` are raw dicts or
    ``(name, port, targetPort)``."""
    port_list: list[Obj] = []
    for p in ports:
        if isinstance(p, tuple):
            port_list.append({"name": p[0], "port": p[1], "targetPort": p[2]})
        else:
            port_list.append(dict(p))
    spec: Obj = {"type": "ClusterIP", "clusterIP": "10.96.0.10", "ports": port_list}
    if selector is not None:
        spec["selector"] = dict(selector)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


# --- selectors -----------------------------------------------------------------


def _terms(text: str) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            continue
        for op in ("!=", "==", "="):
            if op in term:
                key, value = term.split(op, 1)
                out.append((key.strip(), "!=" if op == "!=" else "=", value.strip()))
                break
        else:
            if term.startswith("!"):
                out.append((term[1:].strip(), "!", ""))
            elif " in " in term or " notin " in term:
                raise ValueError(f"set-based selector not supported here: {term}")
            else:
                out.append((term, "exists", ""))
    return out


def _field(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    return "" if cur is None else str(cur)


class _Selector:
    def __init__(self, resource: str, namespace: str | None, query: Mapping[str, str]) -> None:
        self.namespace = namespace
        self.fields = _terms(query.get("fieldSelector", ""))
        for key, op, _ in self.fields:
            if op not in ("=", "!=") or key not in FIELDS[resource]:
                raise ValueError(f'field label not supported: "{key}"')
        self.labels = _terms(query.get("labelSelector", ""))

    def __call__(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        for key, op, value in self.fields:
            if (_field(obj, key) == value) != (op == "="):
                return False
        labels = meta.get("labels") or {}
        for key, op, value in self.labels:
            if op == "exists" and key not in labels:
                return False
            if op == "!" and key in labels:
                return False
            if op == "=" and labels.get(key) != value:
                return False
            if op == "!=" and labels.get(key) == value:
                return False
        return True


# --- the server ----------------------------------------------------------------


def _true(value: str | None) -> bool:
    # Go's strconv.ParseBool: older python clients send "True", newer "true".
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _hung_up(conn: socket.socket) -> bool:
    """The peer closed its end (readable, and a peek reads nothing)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    at: float = field(default_factory=time.monotonic)

    @property
    def watch(self) -> bool:
        return _true(self.query.get("watch"))

    @property
    def resource(self) -> str:
        parts = self.path.strip("/").split("/")
        if len(parts) == 3 and parts[:2] == ["api", "v1"]:
            return parts[2]
        if len(parts) >= 5 and parts[:3] == ["api", "v1", "namespaces"]:
            return parts[4]
        return ""

    @property
    def resource_version(self) -> str | None:
        return self.query.get("resourceVersion")


@dataclass(frozen=True, slots=True)
class _Event:
    rv: int
    resource: str
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK, RAW
    old: Obj | None = None
    new: Obj | None = None
    raw: bytes = b""


@dataclass(slots=True)
class _Failure:
    code: int
    resource: str | None
    watch: bool | None
    message: str
    when: Callable[[Request], bool] | None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    kube: KubeServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watches, as the client expects
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.kube._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.kube._track(self.connection, add=False)

    def do_GET(self) -> None:
        try:
            self.server.kube._serve(self)
        except (OSError, ValueError):
            # The client went away, or stop() cut the connection.
            self.close_connection = True

    def _refuse(self) -> None:
        self.server.kube._send_json(self, 405, status_object(405, "only GET is served here"))

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse


class KubeServer:
    """See the module docstring. Use as a context manager, or start()/close()."""

    def __init__(self, *, expired_as_status: bool = False, first_rv: int = 1000) -> None:
        self.expired_as_status = expired_as_status
        self._cond = threading.Condition()
        self._rv = first_rv
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {r: {} for r in KINDS}
        self._history: list[_Event] = []
        self._history_rvs: list[int] = []
        self._oldest = first_rv  # a watch from a version below this gets 410
        self._epoch = 0  # bumped by expire_history(): live watches end with 410
        self._ends = 0  # bumped by end_watches()
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}
        self._failures: list[_Failure] = []
        self._requests: list[Request] = []
        self._conns: set[socket.socket] = set()
        self._watching = 0  # open watch streams
        self._down = True
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle

    def start(self) -> KubeServer:
        with self._cond:
            self._down = False
        httpd = _HTTPServer(("127.0.0.1", self.port), _Handler)
        httpd.kube = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"kube-api-{self.port}",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """The API server goes down: stop listening, cut every connection (no clean end)."""
        with self._cond:
            self._down = True
            self._cond.notify_all()
            conns = list(self._conns)
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 2.0
        with self._cond:
            while self._conns and time.monotonic() < deadline:
                self._cond.wait(0.05)
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def restart(self) -> None:
        """Up again on the same port, with the same objects and history."""
        if self._httpd is not None:
            raise RuntimeError("already running")
        self.start()

    close = stop

    def __enter__(self) -> KubeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: str | Path) -> Path:
        """A kubeconfig for ``config.load_kube_config``: plain http, no credentials."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        }
        out = Path(path)
        out.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
        return out

    # -- state controls

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    def add(self, resource: str, obj: Mapping[str, Any]) -> Obj:
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        with self._cond:
            if key in self._objects[resource]:
                raise KeyError(f"{resource} {key[0]}/{key[1]} already exists")
            meta["uid"] = meta.get("uid") or str(uuid.uuid4())
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self._store(resource, key, None, self._default(resource, new))
        return copy.deepcopy(new)

    def update(self, resource: str, obj: Mapping[str, Any]) -> Obj:
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        with self._cond:
            old = self._objects[resource].get(key)
            if old is None:
                raise KeyError(f"{resource} {key[0]}/{key[1]} not found")
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            self._store(resource, key, old, self._default(resource, new))
        return copy.deepcopy(new)

    def delete(self, resource: str, name: str, namespace: str = "default") -> Obj:
        key = (namespace, name)
        with self._cond:
            old = self._objects[resource].get(key)
            if old is None:
                raise KeyError(f"{resource} {namespace}/{name} not found")
            final = copy.deepcopy(old)
            self._store(resource, key, old, None, final=final)
        return copy.deepcopy(final)

    def get(self, resource: str, name: str, namespace: str = "default") -> Obj:
        with self._cond:
            return copy.deepcopy(self._objects[resource][(namespace, name)])

    def add_pod(self, pod: Mapping[str, Any]) -> Obj:
        return self.add("pods", pod)

    def update_pod(self, pod: Mapping[str, Any]) -> Obj:
        return self.update("pods", pod)

    def delete_pod(self, name: str, namespace: str = "default") -> Obj:
        return self.delete("pods", name, namespace)

    def get_pod(self, name: str, namespace: str = "default") -> Obj:
        return self.get("pods", name, namespace)

    def add_service(self, svc: Mapping[str, Any]) -> Obj:
        return self.add("services", svc)

    def update_service(self, svc: Mapping[str, Any]) -> Obj:
        return self.update("services", svc)

    def delete_service(self, name: str, namespace: str = "default") -> Obj:
        return self.delete("services", name, namespace)

    def get_service(self, name: str, namespace: str = "default") -> Obj:
        return self.get("services", name, namespace)

    def bookmark(self, resource: str | None = None) -> str:
        """Send a BOOKMARK at the current resourceVersion to the watches of
        ``resource`` (all if None) that asked for bookmarks; returns the version."""
        with self._cond:
            for r in [resource] if resource else list(KINDS):
                self._append(_Event(self._rv, r, "BOOKMARK"))
            self._cond.notify_all()
            return str(self._rv)

    def expire_history(self) -> str:
        """Compact: every resourceVersion up to now is too old to watch from (410),
        live watches get an ERROR 410 event, continue tokens expire. Returns
        the first version that is still watchable (what a new list returns)."""
        with self._cond:
            self._rv += 1  # a fresh list must give a version we can watch from
            self._oldest = self._rv
            self._history.clear()
            self._history_rvs.clear()
            self._snapshots.clear()
            self._epoch += 1
            self._cond.notify_all()
            return str(self._rv)

    def end_watches(self) -> None:
        """End every open watch cleanly, as its timeoutSeconds would."""
        with self._cond:
            self._ends += 1
            self._cond.notify_all()

    def fail_next(
        self,
        code: int,
        count: int = 1,
        *,
        resource: str | None = None,
        watch: bool | None = None,
        when: Callable[[Request], bool] | None = None,
        message: str = "injected failure",
    ) -> None:
        """Answer the next ``count`` matching requests with HTTP ``code`` and a Status body."""
        with self._cond:
            self._failures.extend(
                _Failure(code, resource, watch, message, when) for _ in range(count)
            )

    def send_raw(self, resource: str, line: str | bytes) -> None:
        """Put ``line`` as it is into the watch streams of ``resource`` (garbage, odd events)."""
        raw = line.encode() if isinstance(line, str) else line
        with self._cond:
            self._append(_Event(self._rv, resource, "RAW", raw=raw))
            self._cond.notify_all()

    @property
    def requests(self) -> list[Request]:
        with self._cond:
            return list(self._requests)

    def watch_requests(self, resource: str) -> list[Request]:
        return [r for r in self.requests if r.watch and r.resource == resource]

    def list_requests(self, resource: str) -> list[Request]:
        return [r for r in self.requests if not r.watch and r.resource == resource]

    def active_connections(self) -> int:
        with self._cond:
            return len(self._conns)

    def active_watches(self) -> int:
        with self._cond:
            return self._watching

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate`` until true (for waits on the request log)."""
        return wait_until(predicate, timeout)

    # -- internals (called with self._cond held unless noted)

    def _default(self, resource: str, obj: Obj) -> Obj:
        # What the API server's defaulting does to the fields we care about.
        obj["apiVersion"], obj["kind"] = "v1", KINDS[resource]
        spec = obj.setdefault("spec", {})
        if resource == "pods":
            for c in spec.get("containers") or []:
                for p in c.get("ports") or []:
                    p.setdefault("protocol", "TCP")
        else:
            for p in spec.get("ports") or []:
                p.setdefault("protocol", "TCP")
                p.setdefault("targetPort", p.get("port"))
        return obj

    def _append(self, ev: _Event) -> None:
        self._history.append(ev)
        self._history_rvs.append(ev.rv)

    def _store(
        self,
        resource: str,
        key: tuple[str, str],
        old: Obj | None,
        new: Obj | None,
        final: Obj | None = None,
    ) -> None:
        self._rv += 1
        if new is not None:
            new["metadata"]["resourceVersion"] = str(self._rv)
            self._objects[resource][key] = new
            self._append(
                _Event(self._rv, resource, "ADDED" if old is None else "MODIFIED", old, new)
            )
        else:
            assert final is not None
            final["metadata"]["resourceVersion"] = str(self._rv)
            del self._objects[resource][key]
            self._append(_Event(self._rv, resource, "DELETED", old, final))
        self._cond.notify_all()

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._cond:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)
            self._cond.notify_all()

    # -- HTTP (handler threads; take the lock themselves)

    def _send_json(self, h: _Handler, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _send_status(self, h: _Handler, code: int, message: str, reason: str | None = None) -> None:
        self._send_json(h, code, status_object(code, message, reason))

    def _serve(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        req = Request("GET", url.path, query)
        with self._cond:
            self._requests.append(req)
            failure = next(
                (
                    f
                    for f in self._failures
                    if (f.resource is None or f.resource == req.resource)
                    and (f.watch is None or f.watch == req.watch)
                    and (f.when is None or f.when(req))
                ),
                None,
            )
            if failure is not None:
                self._failures.remove(failure)
        if failure is not None:
            self._send_status(h, failure.code, failure.message)
            return
        parts = url.path.strip("/").split("/")
        namespace: str | None = None
        name: str | None = None
        if len(parts) == 3 and parts[:2] == ["api", "v1"]:
            resource = parts[2]
        elif len(parts) in (5, 6) and parts[:3] == ["api", "v1", "namespaces"]:
            namespace, resource = parts[3], parts[4]
            name = parts[5] if len(parts) == 6 else None
        else:
            self._send_status(h, 404, "the server could not find the requested resource")
            return
        if resource not in KINDS:
            self._send_status(h, 404, "the server could not find the requested resource")
            return
        if name is not None:
            assert namespace is not None
            with self._cond:
                obj = self._objects[resource].get((namespace, name))
            if obj is None:
                self._send_status(h, 404, f'{resource} "{name}" not found')
            else:
                self._send_json(h, 200, obj)
            return
        try:
            selector = _Selector(resource, namespace, query)
        except ValueError as exc:
            self._send_status(h, 400, str(exc))
            return
        if req.watch:
            self._watch(h, resource, selector, query)
        else:
            self._list(h, resource, selector, query)

    def _list(self, h: _Handler, resource: str, match: _Selector, query: Mapping[str, str]) -> None:
        try:
            limit = int(query.get("limit") or 0)
        except ValueError:
            self._send_status(h, 400, "limit must be an integer")
            return
        token = query.get("continue", "")
        with self._cond:
            if token:
                try:
                    snap_id, start_s = base64.urlsafe_b64decode(token.encode()).decode().split(":")
                    start = int(start_s)
                except (ValueError, UnicodeDecodeError):
                    self._send_status(h, 400, "invalid continue token")
                    return
                snap = self._snapshots.get(snap_id)
                if snap is None:
                    self._send_status(
                        h,
                        410,
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter.",
                    )
                    return
                rv, items = snap
            else:
                rv = self._rv
                items = [o for _, o in sorted(self._objects[resource].items()) if match(o)]
                start, snap_id = 0, uuid.uuid4().hex
                if limit and len(items) > limit:
                    self._snapshots[snap_id] = (rv, items)
        page = items[start : start + limit] if limit else items[start:]
        nxt = start + len(page)
        meta: Obj = {"resourceVersion": str(rv)}
        if nxt < len(items):
            meta["continue"] = base64.urlsafe_b64encode(f"{snap_id}:{nxt}".encode()).decode()
            meta["remainingItemCount"] = len(items) - nxt
        body = {
            "kind": KINDS[resource] + "List",
            "apiVersion": "v1",
            "metadata": meta,
            # Items of a typed list carry no kind/apiVersion on the wire.
            "items": [
                {k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in page
            ],
        }
        self._send_json(h, 200, body)

    def _view(
        self, ev: _Event, resource: str, match: _Selector, bookmarks: bool
    ) -> Obj | bytes | None:
        """The event as this watch sees it (None: not for it)."""
        if ev.resource != resource:
            return None
        if ev.type == "RAW":
            return ev.raw
        if ev.type == "BOOKMARK":
            if not bookmarks:
                return None
            return {
                "type": "BOOKMARK",
                "object": {
                    "kind": KINDS[resource],
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(ev.rv)},
                },
            }
        was, now = match(ev.old), ev.type != "DELETED" and match(ev.new)
        if was and now:
            kind = "MODIFIED"
        elif now:
            kind = "ADDED"
        elif was:
            kind = "DELETED"
        else:
            return None
        return {"type": kind, "object": ev.new}

    def _watch(
        self, h: _Handler, resource: str, match: _Selector, query: Mapping[str, str]
    ) -> None:
        rv_param = query.get("resourceVersion", "")
        bookmarks = _true(query.get("allowWatchBookmarks"))
        try:
            timeout = float(query.get("timeoutSeconds") or 1800)
            since = int(rv_param) if rv_param not in ("", "0") else None
        except ValueError:
            self._send_status(h, 400, f"invalid resourceVersion or timeoutSeconds: {rv_param!r}")
            return
        deadline = time.monotonic() + timeout
        pending: list[Obj] = []
        expired = False
        with self._cond:
            epoch, ends = self._epoch, self._ends
            if since is None:
                # "Get state and start at most recent": synthetic ADDED first.
                pending = [
                    {"type": "ADDED", "object": o}
                    for _, o in sorted(self._objects[resource].items())
                    if match(o)
                ]
                cursor = len(self._history)
            elif since < self._oldest:
                expired = True
                cursor = 0
            else:
                cursor = bisect.bisect_right(self._history_rvs, since)
        gone = status_object(
            410, f"too old resource version: {rv_param} ({self._oldest})", "Expired"
        )
        if expired and self.expired_as_status:
            self._send_json(h, 410, gone)
            return
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def send(events: Sequence[Obj | bytes]) -> None:
            if events:
                data = b"".join(
                    (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n" for e in events
                )
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        with self._cond:
            self._watching += 1
        try:
            send(pending)
            while not expired:
                with self._cond:
                    while (
                        cursor >= len(self._history)
                        and not self._down
                        and epoch == self._epoch
                        and ends == self._ends
                        and time.monotonic() < deadline
                    ):
                        # Wake now and then to notice a client that hung up, as
                        # kube-apiserver does, so the handler does not linger.
                        self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
                        if _hung_up(h.connection):
                            h.close_connection = True
                            return
                    if self._down:
                        # Cut, not ended: the client must see a broken stream.
                        h.close_connection = True
                        with contextlib.suppress(OSError):
                            h.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if epoch != self._epoch:
                        expired = True
                        break
                    batch = self._history[cursor:]
                    cursor = len(self._history)
                    finished = ends != self._ends or time.monotonic() >= deadline
                send([v for v in (self._view(e, resource, match, bookmarks) for e in batch) if v])
                if finished:
                    break
            if expired:
                send([{"type": "ERROR", "object": gone}])
            h.wfile.write(b"0\r\n\r\n")  # a clean end, as at timeoutSeconds
        finally:
            with self._cond:
                self._watching -= 1
                self._cond.notify_all()
