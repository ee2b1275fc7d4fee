"""A real gRPC server and client (grpcio) for the demo, the tests and the benchmark.

No generated stubs: the service ``demo.Echo`` is made of grpcio's generic
handlers over raw bytes, so messages are whatever the client sends.

``python -m clovisor.demo_grpc server --port P --log FILE`` serves
it; every call the servicer finishes is one JSON line in FILE (the oracle
of the tests): method, status code name, peer, request and response bytes.

``python -m clovisor.demo_grpc client --target ADDR:PORT SCENARIO``
runs one scenario and prints one JSON line per call it made (its own view:
code, and the local port of its channel). Run both inside the network
namespaces of a test, never in the root namespace.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "demo.Echo"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI = f"/{SERVICE}/Bidi"
OTHER = f"/{SERVICE}/Other"
BIG = 1 << 20  # the 1 MiB message
MAX_MESSAGE = 8 << 20

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


class Journal:
    """The servicer's own record of calls: one JSON line per finished call."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives with the server

    def record(self, peer: str, method: str, code: grpc.StatusCode, req: int, resp: int) -> None:
        line = json.dumps({"method": method, "code": code.name, "peer": peer,
                           "request_bytes": req, "response_bytes": resp,
                           "time": time.time()})  # fmt: skip
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()


def _command(message: bytes) -> tuple[str, str]:
    """``b"verb:arg"`` -> (verb, arg); anything else is an echo."""
    verb, sep, arg = message.partition(b":")
    return (verb.decode(), arg.decode()) if sep else ("echo", "")


def handlers(journal: Journal) -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        peer = context.peer()  # (read first: a cancelled call may not say it)
        verb, arg = _command(request[:64].split(b"\0", 1)[0])
        if verb == "fail":
            code_name, _, text = arg.partition(":")
            code = grpc.StatusCode[code_name]
            journal.record(peer, UNARY, code, len(request), 0)
            context.abort(code, text)
        if verb == "sleep":
            deadline = time.monotonic() + int(arg) / 1000
            while time.monotonic() < deadline and context.is_active():
                time.sleep(0.01)
            if not context.is_active():
                journal.record(peer, UNARY, grpc.StatusCode.DEADLINE_EXCEEDED, len(request), 0)
                return b""
        reply = b"B" * int(arg) if verb == "big" else request
        journal.record(peer, UNARY, grpc.StatusCode.OK, len(request), len(reply))
        return reply

    def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        peer = context.peer()
        n = int(request.decode() or "0")
        for i in range(n):
            yield b"item-%d" % i
        journal.record(peer, SERVER_STREAM, grpc.StatusCode.OK, len(request),
                       sum(len(b"item-%d" % i) for i in range(n)))  # fmt: skip

    def client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        peer = context.peer()
        total = sum(len(r) for r in requests)
        reply = b"got %d" % total
        journal.record(peer, CLIENT_STREAM, grpc.StatusCode.OK, total, len(reply))
        return reply

    def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        peer = context.peer()
        got = sent = 0
        for r in requests:
            got += len(r)
            sent += len(r) + 3
            yield b"re:" + r
        journal.record(peer, BIDI, grpc.StatusCode.OK, got, sent)

    def other(request: bytes, context: grpc.ServicerContext) -> bytes:
        peer = context.peer()
        journal.record(peer, OTHER, grpc.StatusCode.OK, len(request), len(request))
        return request

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Other": grpc.unary_unary_rpc_method_handler(other),
    })  # fmt: skip


def serve(port: int, log: str) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=128), options=_OPTIONS)
    server.add_generic_rpc_handlers((handlers(Journal(log)),))
    server.add_insecure_port(f"[::]:{port}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


# -- the client -------------------------------------------------------------------


class Client:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=_OPTIONS)
        grpc.channel_ready_future(self.channel).result(timeout=10)

    def unary(self, message: bytes, timeout: float | None = 10, method: str = UNARY,
              metadata: tuple[tuple[str, str], ...] = ()) -> str:  # fmt: skip
        call = self.channel.unary_unary(method)
        try:
            call(message, timeout=timeout, metadata=metadata or None)
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return "OK"

    def close(self) -> None:
        self.channel.close()


def _report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def paced(client: Client, rate: float, duration: float, max_in_flight: int = 256) -> None:
    """Unary calls at ``rate`` per second for ``duration`` seconds (the benchmark's
    load): one JSON summary line with the calls, errors and latency percentiles."""
    call = client.channel.unary_unary(UNARY)
    lock = threading.Lock()
    slots = threading.Semaphore(max_in_flight)
    latencies: list[float] = []
    errors = 0

    def done(started: float, f: grpc.Future) -> None:
        nonlocal errors
        took = time.monotonic() - started
        with lock:
            if f.exception() is None:
                latencies.append(took)
            else:
                errors += 1
        slots.release()

    total = int(rate * duration)
    t0 = time.monotonic()
    for i in range(total):
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        slots.acquire()
        started = time.monotonic()
        future = call.future(b"x" * 32, timeout=10)
        future.add_done_callback(lambda f, started=started: done(started, f))
    for _ in range(max_in_flight):
        slots.acquire()
    seconds = time.monotonic() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else None

    _report(calls=total, errors=errors, seconds=seconds, p50_ms=pct(0.5), p99_ms=pct(0.99))


def run_scenario(target: str, scenario: str, count: int, rate: float = 100.0,
                 duration: float = 10.0) -> None:  # fmt: skip
    client = Client(target)
    if scenario == "unary":
        for i in range(count):
            _report(code=client.unary(b"hello %d" % i))
    elif scenario == "traced":
        # The caller's trace context in metadata: W3C, then B3, alternately.
        for i in range(count):
            trace_id, span_id = f"{i + 1:032x}", f"{i + 1:016x}"
            md = ((("traceparent", f"00-{trace_id}-{span_id}-01"),) if i % 2 == 0
                  else (("b3", f"{trace_id}-{span_id}-1"),))  # fmt: skip
            _report(code=client.unary(b"traced %d" % i, metadata=md), trace_id=trace_id,
                    parent=span_id)
    elif scenario == "streams":
        list(client.channel.unary_stream(SERVER_STREAM)(b"%d" % count, timeout=10))
        _report(code="OK", method=SERVER_STREAM)
        reply = client.channel.stream_unary(CLIENT_STREAM)(
            iter([b"part-%d" % i for i in range(count)]), timeout=10)
        _report(code="OK", method=CLIENT_STREAM, reply=reply.decode())
        replies = list(client.channel.stream_stream(BIDI)(
            iter([b"ping-%d" % i for i in range(count)]), timeout=10))
        _report(code="OK", method=BIDI, replies=len(replies))
    elif scenario == "errors":
        for name in ("INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL", "UNAVAILABLE",
                     "PERMISSION_DENIED"):
            _report(code=client.unary(f"fail:{name}:it went {name.lower()}".encode()))
        _report(code=client.unary(b"sleep:2000", timeout=0.3), deadline=True)
    elif scenario == "big":
        head = b"big:%d" % BIG
        _report(code=client.unary(head + b"\0" * (BIG - len(head))))  # 1 MiB each way
    elif scenario == "concurrent":
        call = client.channel.unary_unary(UNARY)
        pending = [call.future(b"sleep:%d" % 200) for _ in range(count)]
        for f in pending:
            try:
                f.result(timeout=30)
                _report(code="OK")
            except grpc.RpcError as exc:
                _report(code=str(exc.code().name))
    elif scenario == "before":
        # Calls on a channel opened before the tracer: warm the HPACK tables, say
        # so, wait for a line on stdin, then call the same method and a new one.
        for i in range(3):
            client.unary(b"warm %d" % i)
        _report(ready=True)
        sys.stdin.readline()
        for i in range(count):
            _report(code=client.unary(b"after %d" % i), method=UNARY)
        for i in range(count):
            _report(code=client.unary(b"other %d" % i, method=OTHER), method=OTHER)
    elif scenario == "bench":
        paced(client, rate, duration)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    client.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="clovisor.demo_grpc")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--count", type=int, default=10)
    c.add_argument("--rate", type=float, default=100.0, help="bench: calls per second")
    c.add_argument("--duration", type=float, default=10.0, help="bench: seconds")
    c.add_argument("scenario")
    args = p.parse_args(argv)
    if args.cmd == "server":
        serve(args.port, args.log)
    else:
        run_scenario(args.target, args.scenario, args.count, args.rate, args.duration)


if __name__ == "__main__":
    main()
