"""The Kubernetes edge against an in-test API server speaking the real wire format.

The official ``kubernetes`` client does the HTTP; :mod:`tests.agent.kube_server`
plays kube-apiserver (list, watch, bookmarks, 410 Expired, paging, going down).
Timeouts and backoffs are shrunk through the watcher's constructor so the
whole file runs in a few seconds.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from clovisor.agent.kube import (
    KubeError,
    KubeWatcher,
    _Backoff,
    api_client,
    pod_info,
    service_info,
)
from clovisor.agent.model import ContainerPort, PodInfo, ServicePort
from tests.conftest import wait_until as poll

from .kube_server import KubeServer, make_pod, make_service

NODE = "node-a"
FAST: dict[str, Any] = {
    "watch_timeout": 30.0,  # tests end watches with end_watches() when they need to
    "request_timeout": 2.0,
    "backoff_initial": 0.05,
    "backoff_max": 0.4,
}


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    return poll(predicate, timeout)


class Changes:
    """on_change recorder: how many calls, and when."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.times.append(time.monotonic())

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.times)

    def after(self, t: float) -> list[float]:
        with self._lock:
            return [x for x in self.times if x >= t]


@pytest.fixture
def server() -> Iterator[KubeServer]:
    with KubeServer() as srv:
        yield srv


@pytest.fixture
def kubeconfig(server: KubeServer, tmp_path: Path) -> Path:
    return server.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def api(kubeconfig: Path) -> k8s_client.ApiClient:
    return api_client(str(kubeconfig))


WatcherFactory = Callable[..., tuple[KubeWatcher, Changes]]


@pytest.fixture
def watcher(api: k8s_client.ApiClient) -> Iterator[WatcherFactory]:
    made: list[KubeWatcher] = []

    def make(**kwargs: Any) -> tuple[KubeWatcher, Changes]:
        changes = Changes()
        w = KubeWatcher(api, NODE, changes, **{**FAST, **kwargs})
        made.append(w)
        w.start()
        assert w.wait_synced(3.0), "initial lists did not complete"
        return w, changes

    yield make
    for w in made:
        w.stop()


def names(w: KubeWatcher) -> list[str]:
    return [p.key for p in w.pods()]


# --- credentials ---------------------------------------------------------------


def test_api_client_from_kubeconfig_flag(server: KubeServer, kubeconfig: Path) -> None:
    api = api_client(str(kubeconfig))
    assert api.configuration.host == server.url
    pods = k8s_client.CoreV1Api(api).list_pod_for_all_namespaces()
    assert pods.items == []


def test_api_client_from_kubeconfig_env(
    server: KubeServer, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # An explicit kubeconfig wins over the pod's service account.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert api_client(None).configuration.host == server.url


def test_api_client_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config

    with pytest.raises(KubeError, match="no Kubernetes credentials") as none:
        api_client(None)
    with pytest.raises(KubeError, match=r"kubeconfig .*missing") as missing:
        api_client(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    with pytest.raises(KubeError, match=r"kubeconfig .*bad") as broken:
        api_client(str(bad))
    # In a pod without a mounted service-account token.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubeError, match="in-cluster credentials") as incluster:
        api_client(None)
    for err in (none, missing, broken, incluster):
        assert "\n" not in str(err.value)


# --- list and watch ------------------------------------------------------------


def test_initial_list(server: KubeServer, watcher: WatcherFactory) -> None:
    server.add_pod(make_pod("web-1", labels={"app": "web"}, ports=[("http", 8080)]))
    server.add_pod(make_pod("db-1", namespace="data", ip="10.200.0.11"))
    server.add_service(make_service("web", selector={"app": "web"}, ports=[("http", 80, "http")]))
    server.add_service(make_service("kubernetes", ports=[("https", 443, 6443)]))

    w, changes = watcher()

    assert w.synced
    assert names(w) == ["data/db-1", "default/web-1"]
    web = w.pods()[1]
    assert web.ip == "10.200.0.10" and web.phase == "Running" and web.node_name == NODE
    assert web.container_ports == (ContainerPort(container="app", port=8080, name="http"),)
    assert [s.key for s in w.services()] == ["default/kubernetes", "default/web"]
    assert w.services()[1].ports == (ServicePort(port=80, target_port="http", name="http"),)
    assert changes.count >= 1  # the first list says "the cache is the cluster now"
    # Only this node's pods are asked for; services cluster-wide.
    pods_list = server.list_requests("pods")[0]
    assert pods_list.path == "/api/v1/pods"
    assert pods_list.query["fieldSelector"] == f"spec.nodeName={NODE}"
    assert server.list_requests("services")[0].path == "/api/v1/services"
    # Each watch starts where its list left off, with bookmarks on.
    assert server.wait_for(lambda: len(server.watch_requests("pods")) == 1)
    first = server.watch_requests("pods")[0]
    assert first.query["allowWatchBookmarks"].lower() == "true"  # older clients send "True"
    assert first.query["resourceVersion"] == server.resource_version
    assert first.query["fieldSelector"] == f"spec.nodeName={NODE}"
    assert int(first.query["timeoutSeconds"]) >= FAST["watch_timeout"]


def test_add_modify_delete_reach_cache_and_on_change(
    server: KubeServer, watcher: WatcherFactory
) -> None:
    w, changes = watcher()

    t0 = time.monotonic()
    server.add_pod(make_pod("web-1", phase="Pending", ip=None))
    assert wait_until(lambda: names(w) == ["default/web-1"])
    assert wait_until(lambda: bool(changes.after(t0)))
    assert changes.after(t0)[0] - t0 < 2.0
    assert w.pods()[0].phase == "Pending" and w.pods()[0].ip == ""

    t1 = time.monotonic()
    server.update_pod(make_pod("web-1", ip="10.200.0.20", ips=["10.200.0.20", "fd00:200::20"]))
    assert wait_until(lambda: w.pods()[0].ip == "10.200.0.20")
    assert w.pods()[0].ips == ("10.200.0.20", "fd00:200::20")
    assert wait_until(lambda: bool(changes.after(t1)))

    t2 = time.monotonic()
    server.update_pod(make_pod("web-1", ip="10.200.0.20", deleting=True))
    assert wait_until(lambda: w.pods()[0].deleting)
    server.delete_pod("web-1")
    assert wait_until(lambda: w.pods() == [])
    assert len(changes.after(t2)) >= 2

    t3 = time.monotonic()
    server.add_service(make_service("web", selector={"app": "web"}, ports=[("http", 80, 8080)]))
    assert wait_until(lambda: [s.name for s in w.services()] == ["web"])
    server.delete_service("web")
    assert wait_until(lambda: w.services() == [])
    assert len(changes.after(t3)) >= 2
    assert w.stats.events >= 6 and w.stats.errors == 0


def test_irrelevant_updates_advance_but_do_not_wake(
    server: KubeServer, watcher: WatcherFactory
) -> None:
    server.add_pod(make_pod("web-1"))
    w, changes = watcher()
    before = changes.count
    pod = server.get_pod("web-1")
    pod["status"]["conditions"] = [{"type": "Ready", "status": "True"}]  # not in PodInfo
    server.update_pod(pod)
    assert wait_until(lambda: w.stats.events >= 1)
    time.sleep(0.1)
    assert changes.count == before


def test_only_this_nodes_pods(server: KubeServer, watcher: WatcherFactory) -> None:
    server.add_pod(make_pod("here"))
    server.add_pod(make_pod("there", node="node-b"))
    w, _ = watcher()
    assert names(w) == ["default/here"]

    server.add_pod(make_pod("elsewhere", node="node-b"))
    # Unscheduled, then bound to this node: the field-selected watch sees ADDED.
    server.add_pod(make_pod("late", node="", phase="Pending", ip=None))
    time.sleep(0.1)
    assert names(w) == ["default/here"]
    server.update_pod(make_pod("late", phase="Pending", ip=None))
    assert wait_until(lambda: names(w) == ["default/here", "default/late"])
    assert all(p.node_name == NODE for p in w.pods())


def test_bookmark_advances_resource_version(server: KubeServer, watcher: WatcherFactory) -> None:
    server.add_pod(make_pod("web-1"))
    w, _ = watcher()
    assert server.wait_for(lambda: len(server.watch_requests("pods")) == 1)
    listed = server.watch_requests("pods")[0].resource_version

    # Services move the shared counter; the pod watch hears only a bookmark.
    for i in range(3):
        server.add_service(make_service(f"svc-{i}"))
    mark = server.bookmark("pods")
    assert int(mark) > int(listed or 0)
    assert wait_until(lambda: w.stats.bookmarks >= 1)

    server.end_watches()
    assert server.wait_for(lambda: len(server.watch_requests("pods")) >= 2)
    assert server.watch_requests("pods")[1].resource_version == mark
    assert len(server.list_requests("pods")) == 1  # resumed, not relisted
    assert w.stats.watch_restarts >= 1


def test_watch_resumes_from_last_event(server: KubeServer, watcher: WatcherFactory) -> None:
    w, _ = watcher()
    added = server.add_pod(make_pod("web-1"))
    assert wait_until(lambda: len(w.pods()) == 1)
    server.end_watches()
    assert server.wait_for(lambda: len(server.watch_requests("pods")) >= 2)
    assert server.watch_requests("pods")[1].resource_version == added["metadata"]["resourceVersion"]


def test_410_error_event_while_watching_relists(
    server: KubeServer, watcher: WatcherFactory
) -> None:
    server.add_pod(make_pod("web-1"))
    w, _changes = watcher()
    assert server.wait_for(lambda: len(server.watch_requests("pods")) == 1)

    fresh = server.expire_history()
    assert wait_until(lambda: len(server.list_requests("pods")) == 2)
    assert server.wait_for(
        lambda: any(r.resource_version == fresh for r in server.watch_requests("pods"))
    )
    assert names(w) == ["default/web-1"]
    # Pods and services both; the second may still be in its relist pause.
    assert wait_until(lambda: w.stats.relists >= 2)
    stats = w.stats
    assert stats.expired >= 2
    assert stats.errors == 0


@pytest.mark.parametrize("as_status", [False, True], ids=["error-event", "http-410"])
def test_410_after_gap_relists_and_emits_deletions(
    as_status: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with KubeServer(expired_as_status=as_status) as server:
        api = api_client(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
        server.add_pod(make_pod("stays"))
        server.add_pod(make_pod("goes", ip="10.200.0.11"))
        server.add_service(make_service("goes"))
        changes = Changes()
        with KubeWatcher(api, NODE, changes, **FAST) as w:
            assert w.wait_synced(3.0)
            assert names(w) == ["default/goes", "default/stays"]

            server.stop()  # API server down; meanwhile etcd compacts
            server.delete_pod("goes")
            server.delete_service("goes")
            server.add_pod(make_pod("new", ip="10.200.0.12"))
            server.expire_history()
            t0 = time.monotonic()
            server.restart()

            assert wait_until(lambda: names(w) == ["default/new", "default/stays"], 3.0)
            assert wait_until(lambda: w.services() == [])
            assert changes.after(t0)
            assert w.stats.expired >= 2 and w.stats.relists >= 2


def test_api_down_keeps_cache_backs_off_and_resumes(
    server: KubeServer, watcher: WatcherFactory
) -> None:
    server.add_pod(make_pod("web-1"))
    w, changes = watcher()
    assert server.wait_for(lambda: len(server.watch_requests("pods")) == 1)
    lists_before = len(server.list_requests("pods"))

    server.stop()
    down = time.monotonic()
    server.update_pod(make_pod("web-1", ip="10.200.0.30"))  # made while we cannot see
    server.add_pod(make_pod("web-2", ip="10.200.0.31"))
    time.sleep(1.5)
    # Still tracing what we traced: the last known state, not an empty cache.
    assert names(w) == ["default/web-1"] and w.pods()[0].ip == "10.200.0.10"
    stats = w.stats
    assert stats.errors >= 2 and stats.last_error
    # Backoff: 0.05 s doubling to 0.4 s gives a handful of attempts per
    # resource in 1.5 s, not hundreds.
    assert stats.errors < 30, stats

    t0 = time.monotonic()
    server.restart()
    assert wait_until(lambda: names(w) == ["default/web-1", "default/web-2"], 3.0)
    assert w.pods()[0].ip == "10.200.0.30"
    assert changes.after(t0)
    assert wait_until(lambda: w.stats.last_error == "")
    # Resumed from the last resourceVersion: history was kept, so no relist.
    assert len(server.list_requests("pods")) == lists_before
    assert time.monotonic() - down < 6


def test_server_errors_back_off_exponentially(server: KubeServer, watcher: WatcherFactory) -> None:
    w, _ = watcher(backoff_initial=0.1, backoff_max=5.0)
    assert server.wait_for(lambda: len(server.watch_requests("pods")) == 1)
    server.fail_next(500, 4, resource="pods", watch=True)
    server.end_watches()
    assert server.wait_for(lambda: len(server.watch_requests("pods")) >= 6, 5.0)
    times = [r.at for r in server.watch_requests("pods")[1:6]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Delays drawn from [d/2, d] with d = 0.1, 0.2, 0.4, 0.8 s. Only the lower
    # bounds are checked here (a loaded machine lengthens gaps, never shortens
    # them); the draws themselves are test_backoff_draws.
    for gap, d in zip(gaps, (0.1, 0.2, 0.4, 0.8), strict=True):
        assert gap >= d / 2 - 0.01, gaps
    assert w.stats.errors == 4
    assert wait_until(lambda: w.stats.last_error == "")
    server.add_pod(make_pod("after"))
    assert wait_until(lambda: names(w) == ["default/after"])


def test_backoff_draws() -> None:
    b = _Backoff(0.1, 1.0)
    for d in (0.1, 0.2, 0.4, 0.8, 1.0, 1.0):  # doubling up to the cap
        delay = b.next()
        assert d / 2 <= delay <= d, (d, delay)
    b.reset()
    assert 0.05 <= b.next() <= 0.1
    draws = [_Backoff(0.1, 1.0).next() for _ in range(200)]
    assert all(0.05 <= x <= 0.1 for x in draws) and len(set(draws)) > 100  # jittered


def test_forbidden_is_reported_and_retried(server: KubeServer, watcher: WatcherFactory) -> None:
    w, _ = watcher()
    assert server.wait_for(lambda: len(server.watch_requests("services")) == 1)
    server.fail_next(403, 2, resource="services", watch=True, message="forbidden by RBAC")
    server.end_watches()
    assert wait_until(lambda: "403" in w.stats.last_error)
    assert "ClusterRole" in w.stats.last_error
    server.add_service(make_service("web"))
    assert wait_until(lambda: [s.name for s in w.services()] == ["web"])


def test_paged_list(server: KubeServer, watcher: WatcherFactory) -> None:
    for i in range(7):
        server.add_service(make_service(f"svc-{i}", namespace=f"ns-{i % 3}"))
    w, _ = watcher(page_size=3)
    assert len(w.services()) == 7
    pages = server.list_requests("services")
    assert [r.query.get("limit") for r in pages] == ["3", "3", "3"]
    assert "continue" not in pages[0].query and all("continue" in r.query for r in pages[1:])


def test_expired_continue_token_restarts_the_list(
    server: KubeServer, watcher: WatcherFactory
) -> None:
    for i in range(5):
        server.add_service(make_service(f"svc-{i}"))
    server.fail_next(
        410, resource="services", when=lambda r: "continue" in r.query, message="continue expired"
    )
    w, _ = watcher(page_size=2)
    assert [s.name for s in w.services()] == [f"svc-{i}" for i in range(5)]
    pages = ["continue" in r.query for r in server.list_requests("services")]
    assert pages == [False, True, False, True, True]  # the consistent list starts over
    assert w.stats.lists == 2 and w.stats.expired == 1


def test_410_storm_does_not_make_a_list_loop(server: KubeServer, watcher: WatcherFactory) -> None:
    """A server answering 410 to every watch, even from what it just listed,
    gets lists at backoff pace, not as fast as the loop can go."""
    w, _ = watcher(backoff_initial=0.1, backoff_max=0.4)
    server.fail_next(410, 1000, resource="pods", watch=True)
    server.end_watches()
    time.sleep(1.5)
    lists = len(server.list_requests("pods"))
    assert 2 <= lists <= 10, lists
    assert w.synced and w.stats.errors == 0


def test_garbage_in_the_stream_resumes_without_relist(
    server: KubeServer, watcher: WatcherFactory
) -> None:
    w, _ = watcher()
    added = server.add_pod(make_pod("web-1"))
    assert wait_until(lambda: len(w.pods()) == 1)
    server.send_raw("pods", '{"type": "SOMETHING_NEW", "object": {}}')  # ignored
    server.send_raw("pods", "this is not json")  # a broken stream: reconnect
    assert wait_until(lambda: w.stats.errors == 1)
    assert server.wait_for(lambda: len(server.watch_requests("pods")) >= 2)
    again = server.watch_requests("pods")[1]
    assert again.resource_version == added["metadata"]["resourceVersion"]
    server.add_pod(make_pod("web-2"))
    assert wait_until(lambda: len(w.pods()) == 2)
    assert len(server.list_requests("pods")) == 1


def test_namespace_selection_filters_reads_and_wakeups(
    server: KubeServer, watcher: WatcherFactory
) -> None:
    selected = {"default"}
    server.add_pod(make_pod("a"))
    server.add_pod(make_pod("b", namespace="other"))
    w, changes = watcher(namespaces=lambda: set(selected))
    assert names(w) == ["default/a"]

    before = changes.count
    server.add_pod(make_pod("c", namespace="other"))
    server.add_service(make_service("s", namespace="other"))
    assert wait_until(lambda: w.stats.events >= 2)
    time.sleep(0.1)
    assert changes.count == before  # churn elsewhere does not wake the reconciler

    selected.add("other")  # a new selection needs no relist: the cache has it all
    assert names(w) == ["default/a", "other/b", "other/c"]
    assert [s.key for s in w.services()] == ["other/s"]


def test_on_change_exception_does_not_stop_the_watch(
    server: KubeServer, api: k8s_client.ApiClient
) -> None:
    calls: list[int] = []

    def boom() -> None:
        calls.append(1)
        raise RuntimeError("reconciler bug")

    with KubeWatcher(api, NODE, boom, **FAST) as w:
        assert w.wait_synced(3.0)
        server.add_pod(make_pod("web-1"))
        assert wait_until(lambda: names(w) == ["default/web-1"])
        server.add_pod(make_pod("web-2"))
        assert wait_until(lambda: len(w.pods()) == 2)
    assert len(calls) >= 4


def test_stop_is_prompt(server: KubeServer, api: k8s_client.ApiClient) -> None:
    w = KubeWatcher(api, NODE, lambda: None, watch_timeout=300.0)
    w.start()
    assert w.wait_synced(3.0)
    assert server.wait_for(lambda: len(server.watch_requests("services")) == 1)
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 2.0  # not the 300 s watch
    assert all(r.thread is not None and not r.thread.is_alive() for r in w._reflectors)
    # The watch connections were closed, not left for the server to time out.
    assert server.wait_for(lambda: server.active_watches() == 0, 1.0)


def test_stop_while_api_down_is_prompt(server: KubeServer, api: k8s_client.ApiClient) -> None:
    w = KubeWatcher(api, NODE, lambda: None, **{**FAST, "backoff_initial": 5.0})
    w.start()
    assert w.wait_synced(3.0)
    server.stop()
    assert wait_until(lambda: w.stats.errors >= 2)  # both now sleeping in backoff
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 2.0  # not the 5 s backoff


def test_rejects_empty_node_name(api: k8s_client.ApiClient) -> None:
    with pytest.raises(ValueError, match="MY_NODE_NAME"):
        KubeWatcher(api, "", lambda: None)


# --- the server speaks the client's own dialect --------------------------------


def test_client_watch_helper_agrees_with_server(
    server: KubeServer, api: k8s_client.ApiClient
) -> None:
    """``kubernetes.watch.Watch`` (the client's own helper) parses our stream:
    typed objects, bookmarks, and 410 raised as ApiException."""
    core = k8s_client.CoreV1Api(api)
    server.add_pod(make_pod("web-1"))
    listed = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE}")
    assert listed.metadata is not None
    rv = listed.metadata.resource_version
    server.add_pod(make_pod("web-2"))
    server.bookmark("pods")
    server.end_watches()
    w: Any = k8s_watch.Watch()  # type: ignore[no-untyped-call]
    events = list(
        w.stream(
            core.list_pod_for_all_namespaces,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=1,
        )
    )
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[0]["object"].metadata.name == "web-2"
    assert w.resource_version == server.resource_version
    server.expire_history()
    with pytest.raises(ApiException) as gone:
        list(w.stream(core.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=1))
    assert gone.value.status == 410


# --- conversion ----------------------------------------------------------------


def test_pod_info_odd_objects() -> None:
    bare = pod_info({"metadata": {"name": "p", "namespace": "ns"}})
    assert bare == PodInfo(namespace="ns", name="p")

    pending = pod_info(make_pod("p", phase="Pending", ip=None, node=""))
    assert (pending.phase, pending.ip, pending.ips, pending.node_name) == ("Pending", "", (), "")

    host = pod_info(make_pod("h", host_network=True, ip="192.0.2.1", ports=[9100]))
    assert host.host_network and host.container_ports == (
        ContainerPort(container="app", port=9100),
    )

    raw = make_pod(
        "multi",
        labels={"b": "2", "a": "1"},
        containers=[
            {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]},
            {"name": "nothing"},
            {"name": "udp", "ports": [{"containerPort": 53, "protocol": "UDP"}]},
            {"name": "bad", "ports": [{"containerPort": "x"}, {"containerPort": 0}, "junk"]},
        ],
        deleting=True,
    )
    raw["spec"]["initContainers"] = [
        {"name": "init", "ports": [{"containerPort": 1}]},  # runs to completion: not serving
        {"name": "proxy", "restartPolicy": "Always", "ports": [{"containerPort": 15001}]},
    ]
    raw["status"] = {"podIPs": [{"ip": "fd00:200::5"}], "phase": "Running"}
    multi = pod_info(raw)
    assert multi.labels == (("a", "1"), ("b", "2"))
    assert multi.container_ports == (
        ContainerPort(container="app", port=8080, name="http"),
        ContainerPort(container="udp", port=53, protocol="UDP"),
        ContainerPort(container="proxy", port=15001),
    )
    assert multi.deleting and multi.ip == "fd00:200::5" and multi.ips == ("fd00:200::5",)

    garbage = pod_info({"metadata": None, "spec": [], "status": "x"})
    assert garbage == PodInfo(namespace="", name="")


def test_service_info_odd_objects() -> None:
    svc = service_info(
        make_service(
            "web",
            selector={"app": "web"},
            ports=[
                {"name": "http", "port": 80, "targetPort": "http-alt"},  # a container port name
                {"port": 81},  # targetPort unset: the port itself
                {
                    "name": "grpc",
                    "port": 9000,
                    "targetPort": 9001,
                    "appProtocol": "kubernetes.io/h2c",
                },
                {"port": 53, "targetPort": "53", "protocol": "UDP"},
                {"port": "junk"},
            ],
        )
    )
    assert svc.selector == (("app", "web"),)
    assert svc.ports == (
        ServicePort(port=80, target_port="http-alt", name="http"),
        ServicePort(port=81, target_port=81),
        ServicePort(port=9000, target_port=9001, name="grpc", app_protocol="kubernetes.io/h2c"),
        ServicePort(port=53, target_port=53, protocol="UDP"),
    )
    headless = service_info({"metadata": {"name": "x", "namespace": "n"}, "spec": {}})
    assert headless.selector == () and headless.ports == ()


def test_conversion_from_client_models() -> None:
    m = k8s_client
    pod = m.V1Pod(
        metadata=m.V1ObjectMeta(name="p", namespace="ns", labels={"app": "x"}, uid="u-1"),
        spec=m.V1PodSpec(
            node_name=NODE,
            host_network=False,
            containers=[
                m.V1Container(name="c", ports=[m.V1ContainerPort(container_port=8080, name="http")])
            ],
        ),
        status=m.V1PodStatus(phase="Running", pod_ip="10.200.0.9"),
    )
    info = pod_info(pod)
    assert info.key == "ns/p" and info.uid == "u-1" and info.ip == "10.200.0.9"
    assert info.ips == ("10.200.0.9",) and info.label_map() == {"app": "x"}
    assert info.container_ports == (ContainerPort(container="c", port=8080, name="http"),)
    svc = m.V1Service(
        metadata=m.V1ObjectMeta(name="s", namespace="ns"),
        spec=m.V1ServiceSpec(
            selector={"app": "x"},
            ports=[m.V1ServicePort(port=80, target_port="http", name="http", app_protocol="http")],
        ),
    )
    assert service_info(svc).ports == (
        ServicePort(port=80, target_port="http", name="http", app_protocol="http"),
    )
