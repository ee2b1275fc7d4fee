"""The runtime on the real kernel: the ring drained in slices, every session exported.

One in-process :class:`Tracer` on a pod's host veth, traffic from another pod
(keep-alive, so many sessions per connection and per slice), spans collected
by an exporter of the test's own.
"""

from __future__ import annotations

import contextlib
import http.client
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

import pytest

from clovisor.core.events import Protocol
from clovisor.export.record import SpanRecord
from clovisor.pipeline import SLICE_RECORDS, InterfaceTarget, Tracer, TracerSettings
from clovisor.specs import PortSpec
from clovisor.topology import Topology, in_netns
from tests.conftest import wait_until

pytestmark = pytest.mark.kernel

PORT = 8080


class Collect:
    """An exporter that keeps what it is given."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.lock = threading.Lock()

    def export(self, spans: Sequence[SpanRecord]) -> None:
        with self.lock:
            self.spans.extend(spans)

    def shutdown(self) -> None:
        return None

    def targets(self) -> list[str]:
        with self.lock:
            return [str(s.attributes.get("url.path")) for s in self.spans if s.attributes]


@pytest.fixture
def server(topology: Topology) -> Topology:
    pod = topology.pods["server"]
    topology.spawn(pod.netns, [sys.executable, "-m", "clovisor.demo_server", "--port", str(PORT)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    topology.wait_for_port(pod.netns, pod.ipv4, PORT)  # from inside: never crosses the veth
    return topology


@contextlib.contextmanager
def _tracer(topo: Topology, exporter: Collect, settings: TracerSettings | None = None,
            **kw: object) -> Iterator[Tracer]:
    t = Tracer(settings or TracerSettings(), [exporter], **kw)  # type: ignore[arg-type]
    t.start()
    try:
        with in_netns(topo.node_ns):
            t.set_interface(InterfaceTarget(
                ifname=topo.pods["server"].host_ifname,
                ports=(PortSpec(port=PORT, protocol=Protocol.HTTP),),
            ))
        yield t
    finally:
        with in_netns(topo.node_ns):
            t.stop()


def _get(topo: Topology, paths: Sequence[str]) -> None:
    """One keep-alive connection from the client pod, one request per path."""
    conn = http.client.HTTPConnection(topo.pods["server"].ipv4, PORT, timeout=10)
    with in_netns(topo.pods["client"].netns):
        conn.connect()  # the socket belongs to the namespace it is made in
    try:
        for path in paths:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 404
    finally:
        conn.close()


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    return wait_until(cond, timeout, interval=0.05)


def test_many_slices_every_session_exported(server: Topology) -> None:
    exporter = Collect()
    with _tracer(server, exporter) as tracer:
        n = 4 * SLICE_RECORDS  # 2 records per exchange: several slices' worth
        paths = [f"/n/{i}" for i in range(n)]
        _get(server, paths)
        assert _wait(lambda: len(exporter.targets()) >= n)
        assert sorted(exporter.targets()) == sorted(paths)
        assert tracer.totals().events_lost == 0 and tracer.tracker_errors == 0


def test_a_failing_slice_is_counted_and_the_tracer_goes_on(server: Topology) -> None:
    exporter = Collect()
    failures: list[int] = []

    def flaky(spans: Sequence[SpanRecord]) -> Sequence[SpanRecord]:
        if not failures:
            failures.append(len(spans))
            raise RuntimeError("a broken span filter")
        return spans

    with _tracer(server, exporter, span_filter=flaky) as tracer:
        _get(server, ["/first"])
        assert _wait(lambda: tracer.tracker_errors == 1)
        _get(server, ["/second", "/third"])
        assert _wait(lambda: len(exporter.targets()) >= 2)
        assert exporter.targets() == ["/second", "/third"]
        assert failures == [1]


def test_shed_exchanges_are_spans_shed_on_the_totals_line(server: Topology) -> None:
    # less than the whole ring is always free: the classifier sheds every exchange record
    ring = 1 << 16
    exporter = Collect()
    settings = TracerSettings(ring_bytes=ring, shed_bytes=ring - 1)
    with _tracer(server, exporter, settings) as tracer:
        _get(server, [f"/shed/{i}" for i in range(20)])
        assert _wait(lambda: tracer.totals().spans_shed >= 20)
        totals = tracer.totals()
        assert (totals.spans_shed, totals.exchanges_shed, totals.sessions) == (20, 20, 0)
        assert "spans shed 20" in str(totals)
        assert tracer.health_stats()["spans_shed"] == 20
    assert exporter.spans == []
