"""Build the segments a classifier would report for scripted TCP conversations."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from clovisor.core.events import ACK, FIN, PSH, RST, SYN, Direction, Protocol, Role, Segment

CLIENT = bytes([10, 200, 1, 2])
SERVER = bytes([10, 200, 0, 2])


class Conversation:
    """One TCP connection between a client and a traced server port."""

    def __init__(
        self,
        *,
        capture: int = 1024,
        tail: int = 16,
        client: bytes = CLIENT,
        server: bytes = SERVER,
        cport: int = 40000,
        sport: int = 80,
        ts: int = 1_000_000_000,
        protocol: Protocol = Protocol.HTTP,
        role: Role = Role.SERVER,
        client_isn: int = 1000,
        server_isn: int = 5000,
    ) -> None:
        self.capture, self.tail_len = capture, tail
        self.client, self.server, self.cport, self.sport = client, server, cport, sport
        self.ts = ts
        self.protocol, self.role = protocol, role
        self.seq = {Direction.REQUEST: client_isn, Direction.RESPONSE: server_isn}

    def _seg(self, d: Direction, seq: int, payload: bytes, flags: int) -> Segment:
        self.ts += 1000
        other = Direction.RESPONSE if d is Direction.REQUEST else Direction.REQUEST
        fwd = d is Direction.REQUEST
        src, dst = (self.client, self.server) if fwd else (self.server, self.client)
        sp, dp = (self.cport, self.sport) if d is Direction.REQUEST else (self.sport, self.cport)
        n = len(payload)
        cap = payload[: self.capture]
        tail = payload[-min(self.tail_len, n - len(cap)) :] if n > len(cap) else b""
        return Segment(
            ts_ns=self.ts,
            ifindex=7,
            role=self.role,
            direction=d,
            protocol=self.protocol,
            family=4 if len(src) == 4 else 6,
            saddr=src,
            daddr=dst,
            sport=sp,
            dport=dp,
            seq=seq & 0xFFFFFFFF,
            ack=self.seq[other] & 0xFFFFFFFF,
            flags=flags,
            payload_len=n,
            payload=cap,
            tail=tail,
        )

    def handshake(self) -> list[Segment]:
        out = []
        for d in (Direction.REQUEST, Direction.RESPONSE):
            out.append(self._seg(d, self.seq[d], b"", SYN | (ACK if d else 0)))
            self.seq[d] += 1
        return out

    def send(self, d: Direction, data: bytes, sizes: Iterable[int] | None = None) -> list[Segment]:
        """Segments carrying data, cut at the given sizes (one segment by default)."""
        out = []
        for piece in _cut(data, sizes):
            out.append(self._seg(d, self.seq[d], piece, ACK | PSH))
            self.seq[d] += len(piece)
        return out

    def request(self, data: bytes, sizes: Iterable[int] | None = None) -> list[Segment]:
        return self.send(Direction.REQUEST, data, sizes)

    def response(self, data: bytes, sizes: Iterable[int] | None = None) -> list[Segment]:
        return self.send(Direction.RESPONSE, data, sizes)

    def fin(self, d: Direction) -> list[Segment]:
        seg = self._seg(d, self.seq[d], b"", FIN | ACK)
        self.seq[d] += 1
        return [seg]

    def rst(self, d: Direction) -> list[Segment]:
        return [self._seg(d, self.seq[d], b"", RST)]

    def close(self) -> list[Segment]:
        return self.fin(Direction.REQUEST) + self.fin(Direction.RESPONSE)


def _cut(data: bytes, sizes: Iterable[int] | None) -> Iterator[bytes]:
    if sizes is None:
        yield data
        return
    pos = 0
    for n in sizes:
        if pos >= len(data):
            return
        yield data[pos : pos + max(1, n)]
        pos += max(1, n)
    if pos < len(data):
        yield data[pos:]


def bytewise(data: bytes) -> list[int]:
    return [1] * len(data)
