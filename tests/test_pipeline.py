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
from typing import cast

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from clovisor.core.events import Protocol
from clovisor.pipeline import (
    LINGER_NS,
    LINGER_SPANS,
    SLICE_RECORDS,
    InterfaceTarget,
    Tracer,
    TracerSettings,
)
from clovisor.specs import PortSpec
from clovisor.stages import Pipe
from clovisor.topology import Topology, in_netns
from tests.conftest import wait_until

pytestmark = pytest.mark.kernel

PORT = 8080


class Collect:
    """An exporter that keeps what it is given."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> None:
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
def _tracer(topo: Topology, exporter: Collect, **kw: object) -> Iterator[Tracer]:
    t = Tracer(TracerSettings(), [exporter], **kw)  # type: ignore[arg-type]
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

    def flaky(spans: Sequence[ReadableSpan]) -> Sequence[ReadableSpan]:
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


def test_spans_linger_then_leave_in_slices() -> None:
    """Spans gather until LINGER_SPANS or LINGER_NS, then go on in slices; all go at the end."""
    tracer = Tracer(TracerSettings(), [])
    pipe: Pipe[list[ReadableSpan]] = Pipe(1 << 20, "spans", weigh=len)
    spans = [cast(ReadableSpan, object()) for _ in range(LINGER_SPANS + 10)]
    tracer._hand_on(pipe, spans[:10], 1_000)
    tracer._hand_on(pipe, [], 1_000 + LINGER_NS - 1)
    assert len(pipe) == 0  # neither enough nor old enough
    tracer._hand_on(pipe, [], 1_000 + LINGER_NS)
    out = pipe.get(0)
    assert out == spans[:10] and len(pipe) == 0  # the oldest waited LINGER_NS
    tracer._hand_on(pipe, spans[10:], 5 * LINGER_NS)  # LINGER_SPANS at once
    slices = [pipe.get(0) for _ in range(len(pipe))]
    assert [len(x or ()) for x in slices] == [SLICE_RECORDS] * (LINGER_SPANS // SLICE_RECORDS)
    tracer._hand_on(pipe, spans[:3], 6 * LINGER_NS)
    tracer._hand_on(pipe, [], 6 * LINGER_NS, everything=True)
    assert pipe.get(0) == spans[:3]
