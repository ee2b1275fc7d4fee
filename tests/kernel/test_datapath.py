"""The classifier in the real kernel.

Two kinds of tests:

* hand-made packets through BPF_PROG_TEST_RUN (exact control of IP options,
  IPv6 extension headers, fragments, padding, malformed headers);
* real traffic: curl and an HTTP server in network namespaces joined by
  veths (``clovisor.topology``), the programs attached with TCX.

They check the segment records, so HTTP pairing in the kernel is off here
(``pair_http=False``: every segment of a traced flow crosses, as it does for a
``tcp`` port or a connection handed over). ``test_pairing.py`` checks the
paired path on the same kinds of traffic.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clovisor.core.events import ACK, FIN, PSH, RST, SYN, Direction, Protocol, Role, Segment
from clovisor.kernel import libbpf
from clovisor.kernel.abi import CLV_WAKEUP_NEVER
from clovisor.kernel.loader import BpfObject
from clovisor.kernel.ringbuf import RingReader
from clovisor.topology import Topology

from .conftest import TC_ACT_UNSPEC, tcx_attached, test_run

pytestmark = pytest.mark.kernel

Factory = Callable[..., BpfObject]

# --- hand-made packets -------------------------------------------------------------

CLIENT4, SERVER4 = "10.200.1.1", "10.200.1.2"
CLIENT6, SERVER6 = "fd00:200::1:1", "fd00:200::1:2"
PROTO_TCP, PROTO_UDP = 6, 17
NH_HOP, NH_ROUTING, NH_FRAG, NH_DSTOPTS = 0, 43, 44, 60


def tcp(
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    seq: int = 1000,
    ack: int = 2000,
    flags: int = ACK | PSH,
    options: bytes = b"",
    doff: int | None = None,
) -> bytes:
    hlen = 20 + len(options)
    doff = hlen // 4 if doff is None else doff
    return (
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 65535, 0, 0)
        + options
        + payload
    )


def ipv4(
    l4: bytes,
    *,
    src: str = CLIENT4,
    dst: str = SERVER4,
    proto: int = PROTO_TCP,
    options: bytes = b"",
    frag: int = 0,
    tot_len: int | None = None,
    ihl: int | None = None,
) -> bytes:
    hlen = 20 + len(options)
    ihl = hlen // 4 if ihl is None else ihl
    total = hlen + len(l4) if tot_len is None else tot_len
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            total,
            1,
            frag,
            64,
            proto,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
        + options
        + l4
    )


def ipv6(
    l4: bytes, *, src: str = CLIENT6, dst: str = SERVER6, nexthdr: int = PROTO_TCP, ext: bytes = b""
) -> bytes:
    return (
        struct.pack(
            "!IHBB16s16s",
            0x60000000,
            len(ext) + len(l4),
            nexthdr,
            64,
            socket.inet_pton(socket.AF_INET6, src),
            socket.inet_pton(socket.AF_INET6, dst),
        )
        + ext
        + l4
    )


def ext_opts(nexthdr: int, units: int = 0) -> bytes:
    """A hop-by-hop or destination-options header of (units + 1) * 8 bytes (PadN)."""
    size = (units + 1) * 8
    return bytes([nexthdr, units, 1, size - 4]) + bytes(size - 4)


def ext_routing(nexthdr: int) -> bytes:
    # type 4 (SRH) with no segments left, 8 bytes
    return bytes([nexthdr, 0, 4, 0, 0, 0, 0, 0])


def ext_frag(nexthdr: int, offset: int, more: bool) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, (offset << 3) | int(more), 0x1234)


def ether(l3: bytes, ethertype: int, pad_to: int = 0) -> bytes:
    frame = (
        b"\x02\x00\x00\x00\x00\x02"
        + b"\x02\x00\x00\x00\x00\x01"
        + struct.pack("!H", ethertype)
        + l3
    )
    # real Ethernet padding is zeros; garbage here proves it is never read as payload
    return frame + b"\xee" * max(0, pad_to - len(frame))


def eth4(l3: bytes, pad_to: int = 0) -> bytes:
    return ether(l3, 0x0800, pad_to)


def eth6(l3: bytes) -> bytes:
    return ether(l3, 0x86DD)


LO = socket.if_nametoindex("lo")  # test runs execute on the caller's loopback


@dataclass
class Rig:
    """A loaded object with its reader, for BPF_PROG_TEST_RUN tests."""

    obj: BpfObject
    reader: RingReader

    def run(self, frame: bytes, hook: str = "clv_tc_ingress") -> list[Segment]:
        result = test_run(self.obj.prog_fd(hook), frame)
        assert result.retval == TC_ACT_UNSPEC  # never drops, never ends the chain
        return self.reader.poll(0)


@pytest.fixture(params=["mapped", "libbpf"])
def rig(bpf_object: Factory, request: pytest.FixtureRequest) -> Iterator[Rig]:
    """Both ways of walking the ring see every hand-made packet (ringbuf.py)."""
    obj = bpf_object(capture_bytes=64, wakeup_bytes=0, pair_http=False)
    obj.set_server_port(LO, 8080, Protocol.HTTP)
    with RingReader(obj, walk=request.param) as reader:
        yield Rig(obj, reader)


def test_ipv4_request_is_reported(rig: Rig) -> None:
    payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    [seg] = rig.run(eth4(ipv4(tcp(40000, 8080, payload, seq=0xFFFFFFFF, ack=7))))
    assert (seg.direction, seg.role, seg.protocol) == (
        Direction.REQUEST,
        Role.SERVER,
        Protocol.HTTP,
    )
    assert (seg.family, seg.saddr, seg.daddr) == (
        4,
        socket.inet_aton(CLIENT4),
        socket.inet_aton(SERVER4),
    )
    assert (seg.sport, seg.dport, seg.seq, seg.ack) == (40000, 8080, 0xFFFFFFFF, 7)
    assert seg.flags == ACK | PSH
    assert (seg.payload_len, seg.payload, seg.tail, seg.packets) == (len(payload), payload, b"", 1)
    assert seg.ifindex == LO
    assert seg.ts_ns <= time.monotonic_ns()


def test_response_direction_from_source_port(rig: Rig) -> None:
    [seg] = rig.run(
        eth4(ipv4(tcp(8080, 40000, b"HTTP/1.1 200 OK\r\n"), src=SERVER4, dst=CLIENT4)),
        hook="clv_tc_egress",
    )
    assert (seg.direction, seg.role, seg.sport) == (Direction.RESPONSE, Role.SERVER, 8080)


def test_ipv4_options_are_skipped(rig: Rig) -> None:
    options = b"\x01" * 11 + b"\x00"  # NOPs + EOL: ihl 8
    tcp_opts = b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps: doff 8
    [seg] = rig.run(eth4(ipv4(tcp(40000, 8080, b"hello", options=tcp_opts), options=options)))
    assert (seg.payload_len, seg.payload) == (5, b"hello")


def test_ethernet_padding_is_not_payload(rig: Rig) -> None:
    [seg] = rig.run(eth4(ipv4(tcp(40000, 8080, b"abc")), pad_to=60))
    assert (seg.payload_len, seg.payload) == (3, b"abc")
    [fin] = rig.run(eth4(ipv4(tcp(40000, 8080, flags=FIN | ACK)), pad_to=60))
    assert (fin.payload_len, fin.payload, fin.flags) == (0, b"", FIN | ACK)


def test_pure_ack_never_crosses(rig: Rig) -> None:
    assert rig.run(eth4(ipv4(tcp(40000, 8080, flags=ACK)), pad_to=60)) == []
    assert rig.run(eth6(ipv6(tcp(40000, 8080, flags=ACK)))) == []
    assert rig.obj.counters()["matched"] == 0


@pytest.mark.parametrize("flag", [SYN, SYN | ACK, RST, RST | ACK, FIN | ACK])
def test_control_segments_cross(rig: Rig, flag: int) -> None:
    [seg] = rig.run(eth4(ipv4(tcp(40000, 8080, flags=flag))))
    assert seg.flags == flag and seg.payload_len == 0


def test_ipv4_fragments(rig: Rig) -> None:
    first = eth4(ipv4(tcp(40000, 8080, b"first"), frag=0x2000))  # MF, offset 0
    assert [s.payload for s in rig.run(first)] == [b"first"]
    later = eth4(ipv4(b"continuation of the datagram", frag=0x2000 | 3))  # offset 24
    assert rig.run(later) == []
    assert rig.obj.counters()["malformed"] == 0


def test_ipv6_plain(rig: Rig) -> None:
    [seg] = rig.run(eth6(ipv6(tcp(40000, 8080, b"GET / HTTP/1.1\r\n"))))
    assert (seg.family, seg.saddr, seg.daddr) == (
        6,
        socket.inet_pton(socket.AF_INET6, CLIENT6),
        socket.inet_pton(socket.AF_INET6, SERVER6),
    )
    assert seg.payload == b"GET / HTTP/1.1\r\n"


def test_ipv6_extension_headers_are_walked(rig: Rig) -> None:
    ext = (
        ext_opts(NH_ROUTING, 1)
        + ext_routing(NH_DSTOPTS)
        + ext_opts(NH_FRAG)
        + ext_frag(PROTO_TCP, 0, more=True)
    )
    [seg] = rig.run(eth6(ipv6(tcp(40000, 8080, b"behind four headers"), nexthdr=NH_HOP, ext=ext)))
    assert (seg.payload_len, seg.payload) == (19, b"behind four headers")


def test_ipv6_non_first_fragment_and_other_protocols_are_skipped(rig: Rig) -> None:
    later = eth6(ipv6(b"x" * 40, nexthdr=NH_FRAG, ext=ext_frag(PROTO_TCP, 8, more=False)))
    udp = eth6(ipv6(struct.pack("!HHHH", 40000, 8080, 8, 0), nexthdr=PROTO_UDP))
    udp4 = eth4(ipv4(struct.pack("!HHHH", 40000, 8080, 8, 0), proto=PROTO_UDP))
    too_deep = eth6(
        ipv6(
            tcp(40000, 8080, b"x"),
            nexthdr=NH_DSTOPTS,
            ext=b"".join(ext_opts(NH_DSTOPTS) for _ in range(6)) + ext_opts(6),
        )
    )
    for frame in (later, udp, udp4, too_deep):
        assert rig.run(frame) == []
    assert rig.obj.counters()["malformed"] == 0


@pytest.mark.parametrize(
    "frame",
    [
        eth4(ipv4(tcp(40000, 8080, b"x"), ihl=4)),  # header shorter than 20
        eth4(ipv4(tcp(40000, 8080, b"x", doff=4))),  # TCP header shorter than 20
        eth4(ipv4(tcp(40000, 8080, b"x"), tot_len=30)),  # IP length ends inside TCP
        eth4(ipv4(tcp(40000, 8080, b"abcdef"), tot_len=60)),  # IP length beyond the data
        eth4(ipv4(tcp(40000, 8080))[:30]),  # cut inside the TCP header
        eth6(ipv6(tcp(40000, 8080, b"x"))[:50]),  # cut inside the TCP header
        eth6(ipv6(tcp(40000, 8080, b"x"), nexthdr=NH_HOP, ext=b"\x06")),  # cut ext header
        eth4(bytes([0x60]) + ipv4(tcp(40000, 8080, b"x"))[1:]),  # version 6 as IPv4
    ],
    ids=[
        "ihl",
        "doff",
        "short-tot-len",
        "long-tot-len",
        "cut-tcp",
        "cut-tcp6",
        "cut-ext",
        "version",
    ],
)
def test_malformed_is_counted_not_reported(rig: Rig, frame: bytes) -> None:
    assert rig.run(frame) == []
    assert rig.obj.counters()["malformed"] == 1


def test_capture_prefix_and_tail(rig: Rig) -> None:
    big = bytes(range(256)) * 4  # 1024 bytes, capture_bytes is 64
    [seg] = rig.run(eth4(ipv4(tcp(8080, 40000, big), src=SERVER4, dst=CLIENT4)))
    assert (seg.payload_len, seg.payload, seg.tail) == (1024, big[:64], big[-16:])
    [seg] = rig.run(eth4(ipv4(tcp(8080, 40000, big[:70]), src=SERVER4, dst=CLIENT4)))
    assert (seg.payload, seg.tail) == (big[:64], big[64:70])  # the tail never overlaps
    [seg] = rig.run(eth4(ipv4(tcp(8080, 40000, big[:64]), src=SERVER4, dst=CLIENT4)))
    assert (seg.payload, seg.tail) == (big[:64], b"")


def test_capture_zero_sends_headers_and_tail_only(bpf_object: Factory) -> None:
    obj = bpf_object(capture_bytes=0, wakeup_bytes=0, pair_http=False)
    obj.set_server_port(LO, 8080, Protocol.HTTP)
    with RingReader(obj) as reader:
        test_run(obj.prog_fd("clv_tc_ingress"), eth4(ipv4(tcp(40000, 8080, b"0123456789" * 3))))
        [seg] = reader.poll(0)
    assert (seg.payload_len, seg.payload, seg.tail) == (30, b"", b"456789" + b"0123456789")


def test_unconfigured_port_and_interface_cost_nothing(rig: Rig) -> None:
    assert rig.run(eth4(ipv4(tcp(40000, 9090, b"GET /")))) == []
    rig.obj.set_server_port(LO + 1000, 9090, Protocol.HTTP)  # same port, other interface
    assert rig.run(eth4(ipv4(tcp(40000, 9090, b"GET /")))) == []
    counters = rig.obj.counters()
    assert counters["packets"] == 2
    assert set(counters.values()) == {0, 2}  # every other counter stayed 0


def test_egress_rules(rig: Rig) -> None:
    obj, other = rig.obj, ipaddress.ip_address("10.200.9.9")
    request = eth4(ipv4(tcp(40000, 443, b"GET /")))
    response = eth4(ipv4(tcp(443, 40000, b"HTTP/1.1 200"), src=SERVER4, dst=CLIENT4))
    obj.set_egress(LO, 443, other, Protocol.TCP)
    assert rig.run(request) == []  # another address only
    obj.set_egress(LO, 443, None, Protocol.HTTP)
    [seg] = rig.run(request)  # the any-address rule
    assert (seg.direction, seg.role, seg.protocol) == (
        Direction.REQUEST,
        Role.CLIENT,
        Protocol.HTTP,
    )
    obj.set_egress(LO, 443, ipaddress.ip_address(SERVER4), Protocol.TCP)
    [seg] = rig.run(response)  # the exact rule wins over the any rule
    assert (seg.direction, seg.role, seg.protocol) == (
        Direction.RESPONSE,
        Role.CLIENT,
        Protocol.TCP,
    )
    assert obj.remove_egress(LO, 443, None)
    assert not obj.remove_egress(LO, 443, None)
    [seg] = rig.run(request)  # the SERVER4 rule still matches, through the v4 bit
    assert seg.protocol == Protocol.TCP
    assert obj.remove_egress(LO, 443, ipaddress.ip_address(SERVER4))
    assert rig.run(response) == rig.run(request) == []  # only 10.200.9.9's rule is left
    # an IPv6 exact rule on the same port
    obj.set_egress(LO, 443, ipaddress.ip_address(SERVER6), Protocol.HTTP)
    [seg] = rig.run(eth6(ipv6(tcp(40000, 443, b"GET /"))))
    assert seg.role == Role.CLIENT and seg.family == 6
    assert rig.run(request) == []  # no v4 rule for SERVER4


def test_server_port_and_egress_rules_share_the_ports_entry(rig: Rig) -> None:
    obj = rig.obj
    obj.set_egress(LO, 8080, None, Protocol.TCP)
    [seg] = rig.run(eth4(ipv4(tcp(40000, 8080, b"x"))))
    assert seg.role == Role.SERVER  # a server port wins over an egress rule
    assert obj.remove_server_port(LO, 8080)
    assert not obj.remove_server_port(LO, 8080)
    [seg] = rig.run(eth4(ipv4(tcp(40000, 8080, b"x"))))
    assert (seg.role, seg.protocol) == (Role.CLIENT, Protocol.TCP)  # the egress bit stayed
    assert obj.server_ports() == {}
    assert obj.egress_rules() == {(LO, 8080, None): Protocol.TCP}


def test_clear_ifindex_removes_only_that_interface(rig: Rig) -> None:
    obj = rig.obj
    obj.set_egress(LO, 443, ipaddress.ip_address(SERVER6), Protocol.HTTP)
    obj.set_server_port(LO + 1000, 80, Protocol.TCP)
    obj.set_egress(LO + 1000, 443, None, Protocol.TCP)
    assert obj.clear_ifindex(LO) == 3  # 8080, 443 in ports; one egress rule
    assert obj.server_ports() == {(LO + 1000, 80): Protocol.TCP}
    assert obj.egress_rules() == {(LO + 1000, 443, None): Protocol.TCP}
    assert rig.run(eth4(ipv4(tcp(40000, 8080, b"x")))) == []


def test_map_arguments_are_checked(rig: Rig) -> None:
    with pytest.raises(ValueError):
        rig.obj.set_server_port(LO, 0, Protocol.HTTP)
    with pytest.raises(ValueError):
        rig.obj.set_server_port(0, 80, Protocol.HTTP)
    with pytest.raises(ValueError):
        rig.obj.set_egress(LO, 70000, None, Protocol.HTTP)


def test_loader_rejects_bad_settings(kernel_ok: None) -> None:
    with pytest.raises(ValueError):
        BpfObject(capture_bytes=8193)
    with pytest.raises(ValueError):
        BpfObject(ring_bytes=3 << 20)
    with pytest.raises(ValueError):
        BpfObject(ring_bytes=1 << 20, wakeup_bytes=1 << 20)


def test_per_packet_cost(bpf_object: Factory, capsys: pytest.CaptureFixture[str]) -> None:
    """Average run time per packet from BPF_PROG_TEST_RUN (printed; loose bound)."""
    obj = bpf_object(capture_bytes=256, ring_bytes=64 << 20)
    obj.set_server_port(LO, 8080, Protocol.HTTP)
    cases = {
        "untraced": eth4(ipv4(tcp(40000, 9090, b"x" * 300))),
        "pure ACK": eth4(ipv4(tcp(40000, 8080)), pad_to=60),
        "traced 300B": eth4(ipv4(tcp(40000, 8080, b"x" * 300))),
        "traced 1400B": eth4(ipv4(tcp(40000, 8080, b"x" * 1400))),
        "traced v6": eth6(ipv6(tcp(40000, 8080, b"x" * 300))),
    }
    results = {}
    for name, frame in cases.items():
        results[name] = min(
            test_run(obj.prog_fd("clv_tc_ingress"), frame, repeat=20000).duration_ns
            for _ in range(3)
        )
    with capsys.disabled():
        print(
            "\nper-packet (BPF_PROG_TEST_RUN): "
            + ", ".join(f"{k} {v} ns" for k, v in results.items())
        )
    assert obj.counters()["lost"] == 0
    assert all(v < 5000 for v in results.values())


# --- real traffic through veths ---------------------------------------------------

SERVER_PORT = 8080


@dataclass
class Net:
    topo: Topology
    docroot: Path

    @property
    def server(self) -> str:
        return self.topo.pods["server"].netns

    @property
    def client(self) -> str:
        return self.topo.pods["client"].netns

    def curl(self, url: str, *extra: str) -> tuple[int, int]:
        """GET ``url`` from the client pod; (header bytes, body bytes)."""
        out = self.topo.run(
            self.client,
            [
                "curl",
                "-sS",
                "-g",
                "--max-time",
                "20",
                "-o",
                "/dev/null",
                "-w",
                "%{size_header} %{size_download}",
                *extra,
                url,
            ],
        )
        header, body = out.stdout.split()
        return int(header), int(body)


# http.server's GET, plus a POST that reads the whole body; dual-stack on ::
HTTP_SERVER = """
import http.server, socket, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    def do_POST(self):
        left = int(self.headers["Content-Length"])
        while left:
            left -= len(self.rfile.read(min(left, 65536)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()
handler = lambda *a: Handler(*a, directory=sys.argv[2])
Server(("::", int(sys.argv[1])), handler).serve_forever()
"""


@pytest.fixture
def net(kernel_ok: None, tmp_path: Path) -> Iterator[Net]:
    """server + client pods behind a node namespace, an HTTP server in the server pod."""
    docroot = tmp_path / "www"
    docroot.mkdir()
    (docroot / "small.txt").write_bytes(b"hello from clovisor\n" * 10)
    (docroot / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 123))
    with Topology(prefix="clvk", pods=("server", "client")) as topo:
        # own process group via Topology.spawn; stopped by pid in topo.close()
        topo.spawn(
            topo.pods["server"].netns,
            [sys.executable, "-c", HTTP_SERVER, str(SERVER_PORT), str(docroot)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        pod = topo.pods["server"]
        # probe from inside the server pod: the probe never crosses the traced veth
        topo.wait_for_port(pod.netns, pod.ipv4, SERVER_PORT)
        topo.wait_for_port(pod.netns, pod.ipv6, SERVER_PORT)
        yield Net(topo, docroot)


def collect(
    reader: RingReader, done: Callable[[list[Segment]], bool], timeout: float = 5.0
) -> list[Segment]:
    segments: list[Segment] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        segments += reader.poll(50)
        if done(segments):
            break
    return segments


def flow_of(segments: list[Segment], request_prefix: bytes) -> list[Segment]:
    """The segments of the one connection whose request starts with ``request_prefix``."""
    starts = [
        s
        for s in segments
        if s.direction == Direction.REQUEST and s.payload.startswith(request_prefix)
    ]
    # One connection; a retransmitted first segment may repeat the prefix.
    assert len({s.sport for s in starts}) == 1, segments
    port = starts[0].sport  # the client's port, whichever side is traced
    return [s for s in segments if port in (s.sport, s.dport)]


def by_offset(flow: list[Segment], direction: Direction) -> list[tuple[int, Segment]]:
    """The payload records of one direction, each with its stream offset, retransmissions kept."""
    syn = next(s for s in flow if s.direction == direction and s.flags & SYN)
    return sorted(
        (
            ((s.seq - syn.seq - 1) % 2**32, s)
            for s in flow
            if s.direction == direction and s.payload_len
        ),
        key=lambda piece: piece[0],
    )


def coverage(pieces: list[tuple[int, Segment]]) -> list[tuple[int, int]]:
    """The byte ranges the records cover, merged. A retransmission may cut a GSO skb's bytes
    differently from the first send, so counting bytes per offset would undercount."""
    merged: list[tuple[int, int]] = []
    for off, s in pieces:
        end = off + s.payload_len
        if merged and off <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((off, end))
    return merged


def closed(seg_list: list[Segment]) -> bool:
    fins = {s.direction for s in seg_list if s.flags & FIN}
    return fins == {Direction.REQUEST, Direction.RESPONSE}


def test_http_over_ipv4(net: Net, bpf_object: Factory) -> None:
    obj = bpf_object(capture_bytes=512, pair_http=False)
    pod = net.topo.pods["server"]
    obj.set_server_port(pod.host_ifindex, SERVER_PORT, Protocol.HTTP)
    with RingReader(obj) as reader, tcx_attached(obj, net.topo.node_ns, pod.host_ifindex):
        header, body = net.curl(f"http://{pod.ipv4}:{SERVER_PORT}/small.txt")
        assert body == 200  # the traffic went through untouched
        segments = collect(reader, closed)
    flow = flow_of(segments, b"GET /small.txt HTTP/1.1\r\n")
    assert all(s.ifindex == pod.host_ifindex and s.family == 4 for s in flow)
    assert all(s.payload_len > 0 or s.flags & (SYN | FIN | RST) for s in flow)  # no pure ACK
    req = [s for s in flow if s.direction == Direction.REQUEST]
    resp = [s for s in flow if s.direction == Direction.RESPONSE]
    assert all(s.role == Role.SERVER and s.protocol == Protocol.HTTP for s in flow)
    client_addr = socket.inet_aton(net.topo.pods["client"].ipv4)
    assert {(s.saddr, s.daddr, s.dport) for s in req} == {
        (client_addr, socket.inet_aton(pod.ipv4), SERVER_PORT)
    }
    assert {s.sport for s in resp} == {SERVER_PORT}
    # the handshake, then data at ISN + 1 on each side
    syn = next(s for s in req if s.flags & SYN)
    synack = next(s for s in resp if s.flags & SYN)
    assert synack.flags & ACK and synack.ack == syn.seq + 1
    data_req = [s for s in req if s.payload_len]
    data_resp = [s for s in resp if s.payload_len]
    assert data_req[0].seq == syn.seq + 1
    assert data_resp[0].seq == synack.seq + 1
    assert data_resp[0].payload.startswith(b"HTTP/1.0 200 OK\r\n")
    assert coverage(by_offset(flow, Direction.RESPONSE)) == [(0, header + body)]
    assert b"".join(s.payload for s in data_resp).endswith(b"hello from clovisor\n" * 10)
    counters = obj.counters()
    assert counters["events"] == counters["matched"] >= len(flow)
    assert counters["packets"] > counters["matched"]  # pure ACKs were seen, not sent
    assert counters["lost"] == counters["malformed"] == 0


def test_large_response_prefix_tail_and_byte_accounting(
    net: Net, bpf_object: Factory, tmp_path: Path
) -> None:
    cap = 128
    obj = bpf_object(capture_bytes=cap, pair_http=False)
    pod = net.topo.pods["server"]
    obj.set_server_port(pod.host_ifindex, SERVER_PORT, Protocol.HTTP)
    headers_file = tmp_path / "headers"
    with RingReader(obj) as reader, tcx_attached(obj, net.topo.node_ns, pod.host_ifindex):
        header, body = net.curl(f"http://{pod.ipv4}:{SERVER_PORT}/big.bin", "-D", str(headers_file))
        segments = collect(reader, closed)
    stream = headers_file.read_bytes() + (net.docroot / "big.bin").read_bytes()
    assert len(stream) == header + body
    flow = flow_of(segments, b"GET /big.bin HTTP/1.1\r\n")
    assert obj.counters()["lost"] == 0
    data = by_offset(flow, Direction.RESPONSE)
    for off, s in data:
        assert len(s.payload) == min(cap, s.payload_len)
        assert s.payload == stream[off : off + len(s.payload)]
        end = off + s.payload_len
        assert len(s.tail) == min(16, s.payload_len - len(s.payload))
        assert s.tail == stream[end - len(s.tail) : end]
    assert coverage(data) == [(0, len(stream))]
    last = max(data, key=lambda piece: piece[0] + piece[1].payload_len)[1]
    assert (last.payload + last.tail).endswith(stream[-min(last.payload_len, 16) :])
    assert sum(len(s.tail) == 16 for _, s in data) > len(data) // 2
    # GSO/GRO: fewer records than wire packets
    assert sum(s.packets for _, s in data) >= len(data)
    print(f"{len(data)} response records for {sum(s.packets for _, s in data)} packets")


def test_large_request_byte_accounting(net: Net, bpf_object: Factory, tmp_path: Path) -> None:
    """A 3 MB upload: the request direction crosses as GSO skbs on the host veth's egress."""
    obj = bpf_object(capture_bytes=512, pair_http=False)  # enough for curl's request header
    pod = net.topo.pods["server"]
    obj.set_server_port(pod.host_ifindex, SERVER_PORT, Protocol.HTTP)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(3 * 1024 * 1024))
    with RingReader(obj) as reader, tcx_attached(obj, net.topo.node_ns, pod.host_ifindex):
        net.curl(f"http://{pod.ipv4}:{SERVER_PORT}/upload", "-H", "Expect:",
                 "--data-binary", f"@{upload}")  # fmt: skip
        segments = collect(reader, closed)
    flow = flow_of(segments, b"POST /upload HTTP/1.1\r\n")
    assert obj.counters()["lost"] == 0
    data = by_offset(flow, Direction.REQUEST)
    assert data[0][0] == 0
    head = data[0][1].payload
    header_len = len(head.split(b"\r\n\r\n", 1)[0]) + 4 if b"\r\n\r\n" in head else None
    assert header_len is not None, head
    assert coverage(data) == [(0, header_len + upload.stat().st_size)]
    body = upload.read_bytes()
    for off, s in data:
        if off >= header_len:
            assert s.payload == body[off - header_len : off - header_len + len(s.payload)]


def test_http_over_ipv6(net: Net, bpf_object: Factory) -> None:
    obj = bpf_object(pair_http=False)
    pod = net.topo.pods["server"]
    obj.set_server_port(pod.host_ifindex, SERVER_PORT, Protocol.HTTP)
    with RingReader(obj) as reader, tcx_attached(obj, net.topo.node_ns, pod.host_ifindex):
        header, body = net.curl(f"http://[{pod.ipv6}]:{SERVER_PORT}/small.txt")
        segments = collect(reader, closed)
    flow = flow_of(segments, b"GET /small.txt HTTP/1.1\r\n")
    server6 = ipaddress.IPv6Address(pod.ipv6).packed
    client6 = ipaddress.IPv6Address(net.topo.pods["client"].ipv6).packed
    assert all(s.family == 6 for s in flow)
    assert {(s.saddr, s.daddr) for s in flow if s.direction == Direction.REQUEST} == {
        (client6, server6)
    }
    resp = [s for s in flow if s.direction == Direction.RESPONSE and s.payload_len]
    assert resp[0].payload.startswith(b"HTTP/1.0 200 OK")
    assert coverage(by_offset(flow, Direction.RESPONSE)) == [(0, header + body)]


def test_egress_client_role(net: Net, bpf_object: Factory) -> None:
    obj = bpf_object(pair_http=False)
    server, client = net.topo.pods["server"], net.topo.pods["client"]
    obj.set_egress(
        client.host_ifindex, SERVER_PORT, ipaddress.ip_address(server.ipv4), Protocol.HTTP
    )
    with RingReader(obj) as reader, tcx_attached(obj, net.topo.node_ns, client.host_ifindex):
        net.curl(f"http://{server.ipv4}:{SERVER_PORT}/small.txt")
        segments = collect(reader, closed)
    flow = flow_of(segments, b"GET /small.txt")
    assert {s.role for s in flow} == {Role.CLIENT}
    assert {
        (s.direction, s.dport if s.direction == Direction.REQUEST else s.sport) for s in flow
    } == {(Direction.REQUEST, SERVER_PORT), (Direction.RESPONSE, SERVER_PORT)}


def test_unconfigured_port_produces_nothing(net: Net, bpf_object: Factory) -> None:
    obj = bpf_object()
    pod = net.topo.pods["server"]
    obj.set_server_port(pod.host_ifindex, 9999, Protocol.HTTP)
    with RingReader(obj) as reader, tcx_attached(obj, net.topo.node_ns, pod.host_ifindex):
        net.curl(f"http://{pod.ipv4}:{SERVER_PORT}/big.bin")
        segments = collect(reader, lambda _: False, timeout=0.5)
    assert segments == []
    counters = obj.counters()
    assert counters["packets"] > 10  # GSO/GRO: a 2 MB response is few skbs
    assert counters["matched"] == counters["events"] == 0


def test_lost_records_are_counted(net: Net, bpf_object: Factory) -> None:
    # one page of ring and nobody reading: it fills within a few segments
    obj = bpf_object(ring_bytes=4096, capture_bytes=512, wakeup_bytes=1024, pair_http=False)
    pod = net.topo.pods["server"]
    obj.set_server_port(pod.host_ifindex, SERVER_PORT, Protocol.HTTP)
    with tcx_attached(obj, net.topo.node_ns, pod.host_ifindex):
        _header, body = net.curl(f"http://{pod.ipv4}:{SERVER_PORT}/big.bin")
    assert body == 2 * 1024 * 1024 + 123
    counters = obj.counters()
    assert counters["lost"] > 0
    assert counters["events"] + counters["lost"] == counters["matched"]
    assert counters["events"] <= 4096 // (88 + 8)
    with RingReader(obj) as reader:  # what did fit is intact
        kept = reader.poll(0)
    assert len(kept) == counters["events"] and reader.malformed == 0


# --- wake-up batching ---------------------------------------------------------------


def _readable(fd: int, timeout: float) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready)


def test_wakeup_only_when_the_threshold_is_crossed(bpf_object: Factory) -> None:
    # records of 88 + 64 bytes (+ 8 bytes of ring header): the 7th crosses 1000
    obj = bpf_object(capture_bytes=64, wakeup_bytes=1000)
    obj.set_server_port(LO, 8080, Protocol.HTTP)
    frame = eth4(ipv4(tcp(40000, 8080, b"x" * 64)))
    with RingReader(obj) as reader:
        fd = reader.epoll_fd()
        test_run(obj.prog_fd("clv_tc_ingress"), frame, repeat=6)
        assert not _readable(fd, 0.2)  # below the threshold: no wake-up...
        assert len(reader.poll(10)) == 6  # ...but the timed poll drains the ring
        test_run(obj.prog_fd("clv_tc_ingress"), frame, repeat=7)
        assert _readable(fd, 2.0)
        assert len(reader.poll(1000)) == 7


def test_wakeup_bytes_zero_wakes_for_every_record(bpf_object: Factory) -> None:
    obj = bpf_object(capture_bytes=64, wakeup_bytes=0)
    obj.set_server_port(LO, 8080, Protocol.HTTP)
    with RingReader(obj) as reader:
        test_run(obj.prog_fd("clv_tc_ingress"), eth4(ipv4(tcp(40000, 8080, b"x"))))
        assert _readable(reader.epoll_fd(), 2.0)
        assert len(reader.poll(0)) == 1


def test_wakeup_never_leaves_the_reader_asleep(bpf_object: Factory) -> None:
    obj = bpf_object(capture_bytes=64, wakeup_bytes=CLV_WAKEUP_NEVER)
    obj.set_server_port(LO, 8080, Protocol.HTTP)
    frame = eth4(ipv4(tcp(40000, 8080, b"x" * 64)))
    with RingReader(obj) as reader:
        test_run(obj.prog_fd("clv_tc_ingress"), frame, repeat=500)  # ~80 KiB queued
        assert not _readable(reader.epoll_fd(), 0.2)  # no record woke it...
        assert len(reader.poll(0)) == 500  # ...and the timed drain gets them all
    assert obj.counters()["lost"] == 0


def test_reader_counts_malformed_records_without_raising(bpf_object: Factory) -> None:
    obj = bpf_object(capture_bytes=64, wakeup_bytes=0)
    obj.set_server_port(LO, 8080, Protocol.HTTP)
    with RingReader(obj, walk="libbpf") as reader:
        test_run(obj.prog_fd("clv_tc_ingress"), eth4(ipv4(tcp(40000, 8080, b"x"))))
        assert reader._libbpf is not None
        # as if the callback had copied a bad record ahead of the good one
        reader._libbpf._raw.append(b"\x07" * 100)
        [seg] = reader.poll(0)
    assert seg.payload == b"x" and reader.malformed == 1
    # the mapped walk on a ring with a bad record: tests/kernel/test_ringbuf.py


def _port_bit(obj: BpfObject, port: int) -> bool:
    index, word = ctypes.c_uint32(port >> 6), ctypes.c_uint64()
    lookup = libbpf.bind(
        "bpf_map_lookup_elem", ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p
    )
    libbpf.check(lookup(obj.map_fd("port_bits"), ctypes.byref(index), ctypes.byref(word)), "get")
    return bool(word.value >> (port & 63) & 1)


def test_port_bits_follow_the_ports_map(bpf_object: Factory) -> None:
    obj = bpf_object()
    addr = ipaddress.ip_address(SERVER4)
    obj.set_server_port(5, 80, Protocol.HTTP)
    obj.set_server_port(6, 80, Protocol.HTTP)
    obj.set_egress(5, 81, addr, Protocol.TCP)
    obj.set_server_port(5, 63, Protocol.TCP)  # same word as 0..62, neighbour bits
    assert [_port_bit(obj, p) for p in (62, 63, 64, 79, 80, 81, 82)] == [
        False, True, False, False, True, True, False,
    ]  # fmt: skip
    obj.remove_server_port(5, 80)
    assert _port_bit(obj, 80)  # ifindex 6 still traces it
    obj.clear_ifindex(6)
    assert not _port_bit(obj, 80)
    obj.remove_egress(5, 81, addr)
    assert not _port_bit(obj, 81) and _port_bit(obj, 63)
