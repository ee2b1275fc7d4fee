"""A passive HTTP/1.x message framer for one direction of a connection.

It sees chunks (see :mod:`reassembly`) of which often only a prefix was
captured, so it frames messages by stream offset: a Content-Length body is
skipped by arithmetic, a chunked body is followed chunk by chunk while the
chunk-size lines are visible and by its last-chunk marker after that, and a
message whose header block was not fully captured ends where the next one
visibly starts. A response whose request the connection did not see may have
answered a HEAD, so the body it announces is in doubt until its first bytes
show whether they start the next response. The state machine is an explicit
table: a transition that is not in it is a bug, reported as
:class:`ProtocolError`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Protocol

from .budget import UNLIMITED, Budget
from .errors import ProtocolError
from .frozen import builder
from .reassembly import Chunk


class _FastHash(enum.Enum):
    """Members hash by identity: Enum's own ``__hash__`` is Python code, and
    every transition looks up a (state, trigger) pair."""

    __hash__ = object.__hash__


class State(_FastHash):
    IDLE = enum.auto()  # at a message boundary
    SEEK = enum.auto()  # lost: waiting for a chunk that starts a message
    HEADERS = enum.auto()
    BODY_LENGTH = enum.auto()
    CHUNK_SIZE = enum.auto()
    CHUNK_DATA = enum.auto()
    CHUNK_TRAILER = enum.auto()
    CHUNK_SCAN = enum.auto()  # chunk framing lost: look for the last-chunk marker
    BODY_CLOSE = enum.auto()  # delimited by the connection closing
    BODY_UNKNOWN = enum.auto()  # header block not captured: ends at the next start
    TUNNEL = enum.auto()  # after CONNECT or Upgrade: not HTTP any more


class Trigger(_FastHash):
    START = enum.auto()
    GARBAGE = enum.auto()
    SKIP = enum.auto()
    HEAD_DONE = enum.auto()  # no body
    HEAD_LENGTH = enum.auto()
    HEAD_CHUNKED = enum.auto()
    HEAD_CLOSE = enum.auto()
    HEAD_TUNNEL = enum.auto()
    HEAD_TRUNCATED = enum.auto()
    HEAD_INVALID = enum.auto()
    BODY_DONE = enum.auto()
    CHUNK_HEADER = enum.auto()
    LAST_CHUNK = enum.auto()
    CHUNK_DONE = enum.auto()
    FRAMING_LOST = enum.auto()
    GAP = enum.auto()
    LOST = enum.auto()  # lost bytes (a full ring) inside a chunked body
    NO_BODY = enum.auto()  # an announced body that was the next message (a HEAD's answer)
    NEXT_START = enum.auto()  # chunk framing lost, and the next message visibly starts
    UPGRADED = enum.auto()
    FOREIGN = enum.auto()  # another protocol's signature, taken by the sink (see MessageSink)


S, T = State, Trigger
_BODY_STATES = (S.BODY_LENGTH, S.CHUNK_SIZE, S.CHUNK_DATA, S.CHUNK_TRAILER, S.CHUNK_SCAN)
_TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (S.IDLE, T.START): S.HEADERS,
    (S.IDLE, T.GARBAGE): S.SEEK,
    (S.IDLE, T.GAP): S.SEEK,
    (S.SEEK, T.START): S.HEADERS,
    (S.SEEK, T.SKIP): S.SEEK,
    (S.SEEK, T.GAP): S.SEEK,
    (S.BODY_UNKNOWN, T.START): S.HEADERS,
    (S.BODY_UNKNOWN, T.SKIP): S.BODY_UNKNOWN,
    (S.BODY_UNKNOWN, T.GAP): S.BODY_UNKNOWN,
    (S.HEADERS, T.HEAD_DONE): S.IDLE,
    (S.HEADERS, T.HEAD_LENGTH): S.BODY_LENGTH,
    (S.HEADERS, T.HEAD_CHUNKED): S.CHUNK_SIZE,
    (S.HEADERS, T.HEAD_CLOSE): S.BODY_CLOSE,
    (S.HEADERS, T.HEAD_TUNNEL): S.TUNNEL,
    (S.HEADERS, T.HEAD_TRUNCATED): S.BODY_UNKNOWN,
    (S.HEADERS, T.HEAD_INVALID): S.SEEK,
    (S.HEADERS, T.GAP): S.BODY_UNKNOWN,
    (S.BODY_LENGTH, T.BODY_DONE): S.IDLE,
    (S.CHUNK_SIZE, T.CHUNK_HEADER): S.CHUNK_DATA,
    (S.CHUNK_SIZE, T.LAST_CHUNK): S.CHUNK_TRAILER,
    (S.CHUNK_SIZE, T.FRAMING_LOST): S.CHUNK_SCAN,
    (S.CHUNK_SIZE, T.GAP): S.CHUNK_SCAN,
    (S.CHUNK_DATA, T.CHUNK_DONE): S.CHUNK_SIZE,
    (S.CHUNK_DATA, T.FRAMING_LOST): S.CHUNK_SCAN,
    (S.CHUNK_TRAILER, T.BODY_DONE): S.IDLE,
    (S.CHUNK_TRAILER, T.FRAMING_LOST): S.CHUNK_SCAN,
    (S.CHUNK_TRAILER, T.GAP): S.CHUNK_SCAN,
    (S.CHUNK_SCAN, T.BODY_DONE): S.IDLE,
    (S.CHUNK_SCAN, T.GAP): S.CHUNK_SCAN,
    # Without a visible last-chunk marker (trailers, or the marker not at the
    # end of its segment), the body ends where the next message visibly starts.
    (S.CHUNK_SCAN, T.NEXT_START): S.IDLE,
    # Where a chunked body ends cannot be known across lost bytes: it ends
    # at the next visible message start.
    (S.CHUNK_SIZE, T.LOST): S.BODY_UNKNOWN,
    (S.CHUNK_TRAILER, T.LOST): S.BODY_UNKNOWN,
    (S.CHUNK_SCAN, T.LOST): S.BODY_UNKNOWN,
    # A response whose request was not seen may have answered a HEAD: if the
    # body it announces starts with a response, it had none.
    (S.BODY_LENGTH, T.NO_BODY): S.IDLE,
    (S.CHUNK_SIZE, T.NO_BODY): S.IDLE,
    (S.BODY_CLOSE, T.NO_BODY): S.IDLE,
    # If lost bytes follow such a head, whether they were its body or the
    # next messages cannot be known: it ends at the next visible start.
    (S.BODY_LENGTH, T.LOST): S.BODY_UNKNOWN,
    (S.BODY_CLOSE, T.LOST): S.BODY_UNKNOWN,
    (S.BODY_CLOSE, T.GAP): S.BODY_CLOSE,
    (S.TUNNEL, T.SKIP): S.TUNNEL,
    (S.TUNNEL, T.GAP): S.TUNNEL,
    (S.IDLE, T.UPGRADED): S.TUNNEL,
    (S.IDLE, T.FOREIGN): S.TUNNEL,
    (S.HEADERS, T.FOREIGN): S.TUNNEL,
    (S.SEEK, T.UPGRADED): S.TUNNEL,
    (S.BODY_UNKNOWN, T.UPGRADED): S.TUNNEL,
}


class Kind(_FastHash):
    REQUEST = "request"
    RESPONSE = "response"


# Headers a session may record; everything else is parsed for framing only.
# Credentials (authorization, cookie, ...) are deliberately absent.
RECORDED_HEADERS = frozenset(
    {
        "host",
        "user-agent",
        "x-request-id",
        "x-envoy-decorator-operation",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "b3",
        "traceparent",
        "tracestate",
        "uber-trace-id",
        "content-type",
        "upgrade",  # which protocol a 101 switches to (h2c is then still traced)
    }
)

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (\S+) HTTP/1\.([01])\Z")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (.*))?\Z")
_HEADER_NAME = re.compile(_TOKEN + rb"\Z")
_TOKEN_PREFIX = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*\Z")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\Z")
# Methods that make a chunk a plausible message start when we are lost.
_KNOWN_METHODS = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
    b"PROPFIND ",
    b"PROPPATCH ",
    b"MKCOL ",
    b"COPY ",
    b"MOVE ",
    b"LOCK ",
    b"UNLOCK ",
    b"REPORT ",
    b"PURGE ",
)
_LAST_CHUNK = b"\r\n0\r\n\r\n"
_MAX_CHUNK_LINE = 1024


def _is_last_chunk(chunk: Chunk) -> bool:
    """Whether a chunk visibly ends a chunked body (with no trailers)."""
    if chunk.ends_with(_LAST_CHUNK):
        return True
    # Servers often write the last chunk on its own: the whole chunk is "0\r\n\r\n".
    return chunk.complete and chunk.data[: chunk.length] == b"0\r\n\r\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class Head:
    """A parsed request or response head."""

    kind: Kind
    version: str
    method: str = ""  # requests
    target: str = ""
    status_code: int = 0  # responses
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # recorded ones only
    content_length: int | None = None
    chunked: bool = False
    connection_close: bool = False
    upgrade: bool = False
    truncated: bool = False  # the header block was not fully captured
    header_bytes: int = 0


class MessageSink(Protocol):
    """Where a framer reports messages (the connection that owns it)."""

    def message_head(self, kind: Kind, head: Head, ts_ns: int, ack: int) -> str | None:
        """A head was parsed; for a response, return the request's method."""

    def message_end(self, kind: Kind, ts_ns: int, body_size: int | None) -> None:
        """The current message ended with its last byte at ts_ns."""

    def message_error(self, kind: Kind, reason: str) -> None:
        """Bytes that were not HTTP/1.x (counted, never raised)."""

    def message_truncated(self, kind: Kind) -> None:
        """A head was not fully captured (counted; its message is still reported)."""

    def foreign(self, kind: Kind, chunk: Chunk) -> bool:
        """Bytes at a message boundary that are not HTTP/1.x: True if the sink takes
        them as another protocol (the framer then hands it every later byte)."""

    def tunnel(self, kind: Kind, chunk: Chunk) -> None:
        """Bytes after a switch of protocols (101, CONNECT, :meth:`foreign`)."""


class Framer:
    """Frames the HTTP/1.x messages of one direction of one connection."""

    __slots__ = (
        "_body_start",
        "_budget",
        "_buf",
        "_doubt",
        "_head_ts",
        "_kind",
        "_last_ts",
        "_remaining",
        "_sink",
        "_state",
        "_window",
        "ack",
        "in_message",
        "lost_start",
        "max_header_bytes",
        "message_bytes",
        "message_packets",
        "start_offset",
    )

    def __init__(
        self,
        kind: Kind,
        sink: MessageSink,
        *,
        synced: bool,
        max_header_bytes: int = 65536,
        budget: Budget = UNLIMITED,
    ) -> None:
        self._budget = budget
        self._kind = kind
        self._sink = sink
        self._state = State.IDLE if synced else State.SEEK
        self._buf = b""  # header block or chunk-size line being gathered (budgeted)
        self._remaining = 0  # body bytes (or chunk bytes + CRLF) still to come
        self._body_start = 0
        self._head_ts = 0
        self._last_ts = 0
        self._window = b""  # last known bytes while scanning for the last chunk
        # The body just announced may not exist: the request it answers is unknown.
        self._doubt = False
        self.in_message = False
        # Set when lost bytes (a full ring) went by: messages may have been
        # in them. The connection clears it once it has accounted for that.
        self.lost_start = False
        self.message_bytes = 0
        self.message_packets = 0
        self.ack = 0  # the ack number of the segment that started the message
        self.start_offset = 0  # stream offset of the message's first byte
        self.max_header_bytes = max_header_bytes

    @property
    def state(self) -> State:
        return self._state

    def _fire(self, trigger: Trigger) -> None:
        try:
            self._state = _TRANSITIONS[(self._state, trigger)]
        except KeyError:
            raise ProtocolError(
                f"no transition from {self._state.name} on {trigger.name}"
            ) from None

    # -- input ---------------------------------------------------------------

    def feed(self, chunk: Chunk, ack: int) -> None:
        """Consume one in-order chunk (``ack`` is its segment's ack number)."""
        first = True
        while chunk.length > 0:
            if self.in_message and first:
                self.message_packets += chunk.packets
            first = False
            rest = self._step(chunk, ack)
            if rest is None:
                return
            chunk = rest

    def feed_run(
        self, offset: int, length: int, data: bytes, tail: bytes, ts_ns: int, packets: int,
        ack: int,
    ) -> None:
        """``feed(Chunk(offset, length, data, tail, ts_ns, packets), ack)``, faster.

        The common segment holds whole messages: a request, or a response
        with its Content-Length body, written at once. Those are framed here
        straight from the bytes, with no Chunk per step; the first byte this
        cannot frame, and everything after it, goes through :meth:`feed`.
        Both ways end in the same state with the same calls to the sink (the
        tests hold them to that).
        """
        pos = 0
        if self._state is State.IDLE and not self.in_message and not self._buf:
            pos = self._whole_messages(offset, length, data, ts_ns, packets, ack)
            if pos >= length:
                return
        chunk = Chunk(offset, length, data, tail, ts_ns, packets)
        self.feed(chunk.split(pos)[1] if pos else chunk, ack)

    def _whole_messages(
        self, offset: int, length: int, data: bytes, ts_ns: int, packets: int, ack: int
    ) -> int:
        """Frame the messages at the front of a run whose header blocks were captured.

        Exactly what ``_start``, ``_headers``, ``_head_done`` and ``_counted``
        do for such a message; returns how many bytes of the run it consumed.
        """
        pos = 0
        captured = len(data)
        kind = self._kind
        while pos < captured and self._state is State.IDLE:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            used = end + 4 - pos
            head = parse_head(kind, data[pos : end + 4], truncated=False, header_bytes=used)
            if head is None:
                break  # the general path reports it
            # A parsed start line is a plausible start (_looks_like_start).
            self._fire(Trigger.START)
            self.in_message = True
            self.message_bytes = used
            # later messages of the run are split off it, and splits count no packets
            self.message_packets = packets if pos == 0 else 0
            self.ack = ack
            self.start_offset = offset + pos
            self._head_ts = self._last_ts = ts_ns
            pos += used
            self._framed(head)
            if self._doubt:
                break  # the general path decides whether the body is there
            if self.state is State.BODY_LENGTH:  # (the property: _framed moved it)
                n = min(self._remaining, length - pos)
                self._remaining -= n
                self.message_bytes += n
                pos += n
                if self._remaining == 0:
                    self._fire(Trigger.BODY_DONE)
                    self._end(ts_ns, self.message_bytes - self._body_start)
        return pos

    def close(self, ts_ns: int) -> bool:
        """The sender closed (FIN): end a close-delimited body. True if one ended."""
        if self._state is State.BODY_CLOSE:
            self._end(ts_ns, self.message_bytes - self._body_start)
            self._state = State.IDLE
            return True
        if self._state is State.BODY_UNKNOWN and self.in_message:
            self._end(self._last_ts, None)
            self._state = State.SEEK
            return True
        if self._state is State.CHUNK_SCAN:
            # No marker seen, but nothing follows: every byte to the FIN was the body.
            self._window = b""
            self._end(self._last_ts, self.message_bytes - self._body_start)
            self._state = State.IDLE
            return True
        return False

    # -- the machine -------------------------------------------------------------

    def _step(self, chunk: Chunk, ack: int) -> Chunk | None:
        """Consume a prefix of the chunk; return what is left of it."""
        if self._doubt:
            return self._doubted(chunk)
        state = self._state
        if not chunk.data and state not in (State.BODY_LENGTH, State.CHUNK_DATA):
            if state is State.IDLE and not chunk.lost:
                return self._unseen_start(chunk, ack)
            return self._gap(chunk)
        if state is State.IDLE or state is State.SEEK or state is State.BODY_UNKNOWN:
            return self._start(chunk, ack)
        if state is State.HEADERS:
            return self._headers(chunk)
        if state is State.BODY_LENGTH or state is State.CHUNK_DATA:
            return self._counted(chunk)
        if state is State.CHUNK_SIZE:
            return self._chunk_size(chunk)
        if state is State.CHUNK_TRAILER:
            return self._chunk_trailer(chunk)
        if state is State.CHUNK_SCAN:
            return self._chunk_scan(chunk)
        if state is State.BODY_CLOSE:
            self._account(chunk.length, chunk.ts_ns)
            return None
        self._fire(Trigger.SKIP)  # TUNNEL
        self._sink.tunnel(self._kind, chunk)
        return None

    def _doubted(self, chunk: Chunk) -> Chunk:
        """The first bytes after the head of a response whose request was not seen.

        Only a HEAD's answer announces a body it does not send, so a body
        that begins with a response start is taken to be that next response
        (for a real body to begin so, it would have to carry an HTTP message).
        """
        self._doubt = False
        if chunk.lost:
            self._fire(Trigger.LOST)
        elif self._looks_like_start(chunk.data, strict=True):
            self._fire(Trigger.NO_BODY)
            self._end(self._last_ts, 0)
        return chunk

    def _unseen_start(self, chunk: Chunk, ack: int) -> Chunk | None:
        """A message starts here (we are at a boundary) but none of it was captured.

        Typically a pipelined request queued right behind a body in one GSO
        segment, beyond the captured prefix. Its head is unknown, yet it is a
        message: registering it keeps the pairing of the next responses right
        and the session count complete. Framing resumes at the next visible
        message start.
        """
        self._begin(chunk, ack)
        self._account(chunk.length, chunk.ts_ns)
        self._head_done(b"", truncated=True)
        return None

    def _begin(self, chunk: Chunk, ack: int) -> None:
        """A message starts at the chunk's first byte."""
        self._fire(Trigger.START)
        self.in_message = True
        self.message_bytes = 0
        self.message_packets = chunk.packets
        self.ack = ack
        self.start_offset = chunk.offset
        self._head_ts = chunk.ts_ns

    def _gap(self, chunk: Chunk) -> Chunk | None:
        """Bytes whose content mattered but was not captured."""
        state = self._state
        if state is State.HEADERS:
            self._account(chunk.length, chunk.ts_ns)
            self._head_done(self._buf, truncated=True)
            # Past the end of the cut-off head, whole messages may have been
            # lost: that is news for the heads after this one.
            self.lost_start = self.lost_start or chunk.lost
            return None
        if chunk.lost:
            # Whole messages may lie in the lost bytes; the connection decides.
            self.lost_start = True
            if state is State.CHUNK_SIZE or state is State.CHUNK_TRAILER or (
                state is State.CHUNK_SCAN
            ):
                self._account(chunk.length, chunk.ts_ns)
                self._drop_buf()
                self._window = b""
                self._fire(Trigger.LOST)
                return None
        if state is State.CHUNK_SIZE or state is State.CHUNK_TRAILER:
            self._account(chunk.length, chunk.ts_ns)
            self._lost(chunk)
            return None
        if state is State.CHUNK_SCAN:
            return self._chunk_scan(chunk)
        if state is State.BODY_CLOSE or state is State.BODY_UNKNOWN:
            self._account(chunk.length, chunk.ts_ns)
        self._fire(Trigger.GAP)
        return None

    def _hold(self, buf: bytes) -> bool:
        """Keep ``buf`` for the next chunk, if the byte budget allows."""
        grow = len(buf) - len(self._buf)
        if grow > 0 and not self._budget.take(grow):
            self._drop_buf()
            return False
        if grow < 0:
            self._budget.give(-grow)
        self._buf = buf
        return True

    def _drop_buf(self) -> None:
        if self._buf:
            self._budget.give(len(self._buf))
            self._buf = b""

    def release(self) -> None:
        """The connection is gone: return what this framer holds."""
        self._drop_buf()

    def _account(self, n: int, ts_ns: int) -> None:
        self.message_bytes += n
        self._last_ts = ts_ns

    def _start(self, chunk: Chunk, ack: int) -> Chunk | None:
        data = chunk.data
        plausible = self._looks_like_start(data, strict=self._state is not State.IDLE)
        if not plausible:
            if self._state is State.IDLE and self._sink.foreign(self._kind, chunk):
                self._fire(Trigger.FOREIGN)
                return None
            if self._state is State.IDLE:
                self._sink.message_error(self._kind, "bytes where a message should start")
                self._fire(Trigger.GARBAGE)
            else:
                if self._state is State.BODY_UNKNOWN:
                    self._account(chunk.length, chunk.ts_ns)
                self._fire(Trigger.SKIP)
            return None
        if self._state is State.BODY_UNKNOWN and self.in_message:
            self._end(self._last_ts, None)
        self._begin(chunk, ack)
        self._drop_buf()
        return self._headers(chunk)

    def could_start(self, data: bytes) -> bool:
        """Whether bytes at a message boundary could begin a message of this kind."""
        return self._looks_like_start(data, strict=False)

    def _looks_like_start(self, data: bytes, *, strict: bool) -> bool:
        """Whether a chunk can begin a message; strict when we are lost."""
        if self._kind is Kind.RESPONSE:
            return data.startswith(b"HTTP/1.") or (not strict and b"HTTP/1.".startswith(data[:7]))
        if strict and data.startswith(_KNOWN_METHODS):
            return True
        line, sep, _ = data.partition(b"\n")
        if sep:
            return _REQUEST_LINE.match(line.rstrip(b"\r")) is not None
        if strict:
            return False
        # At a boundary a short prefix is a start if it can still become a method.
        method, space, _ = line.partition(b" ")
        return (bool(space) or len(method) <= 32) and _TOKEN_PREFIX.match(method) is not None

    def _headers(self, chunk: Chunk) -> Chunk | None:
        before = len(self._buf)
        buf = self._buf + chunk.data
        search_from = max(0, before - 3)
        end = buf.find(b"\r\n\r\n", search_from)
        sep = 4
        if end < 0:
            end = buf.find(b"\n\n", max(0, before - 1))
            sep = 2
        if end >= 0:
            used = end + sep - before  # bytes of this chunk in the header block
            self._drop_buf()
            self._account(used, chunk.ts_ns)
            head_rest = chunk.split(used)[1] if used < chunk.length else None
            self._head_done(buf[: end + sep], truncated=False)
            return head_rest
        self._account(chunk.length, chunk.ts_ns)
        if not chunk.complete:
            self._head_done(buf, truncated=True)
            return None
        if len(buf) > self.max_header_bytes:
            self._invalid("header block larger than the limit")
            return None
        if not self._hold(buf):
            self._head_done(buf, truncated=True)
        return None

    def _head_done(self, block: bytes, *, truncated: bool) -> None:
        self._drop_buf()
        if truncated:
            self._sink.message_truncated(self._kind)
        head = parse_head(self._kind, block, truncated=truncated, header_bytes=self.message_bytes)
        if head is None:
            foreign = Chunk(self.start_offset, len(block), block, b"", self._head_ts, 0)
            if not truncated and self._sink.foreign(self._kind, foreign):
                self.in_message = False
                self._fire(Trigger.FOREIGN)
                return
            self._invalid("malformed start line or header")
            return
        self._framed(head)

    def _framed(self, head: Head) -> None:
        """Report a parsed head and enter the state its body framing calls for."""
        method = self._sink.message_head(self._kind, head, self._head_ts, self.ack)
        self._body_start = self.message_bytes
        if head.truncated:
            self._fire(Trigger.HEAD_TRUNCATED)
            return
        framing = body_framing(head, method)
        self._doubt = (
            method is None
            and self._kind is Kind.RESPONSE
            and framing in (_Framing.LENGTH, _Framing.CHUNKED, _Framing.CLOSE)
        )
        if framing is _Framing.NONE:
            self._fire(Trigger.HEAD_DONE)
            self._end(self._last_ts, 0)
        elif framing is _Framing.LENGTH:
            assert head.content_length is not None
            self._remaining = head.content_length
            self._fire(Trigger.HEAD_LENGTH)
        elif framing is _Framing.CHUNKED:
            self._fire(Trigger.HEAD_CHUNKED)
        elif framing is _Framing.CLOSE:
            self._fire(Trigger.HEAD_CLOSE)
        elif framing is _Framing.TUNNEL:
            self._fire(Trigger.HEAD_TUNNEL)
            self._end(self._last_ts, 0)
        else:  # _Framing.INTERIM: a 1xx response; the real one follows
            self._fire(Trigger.HEAD_DONE)
            self.in_message = False

    def _invalid(self, reason: str) -> None:
        self._sink.message_error(self._kind, reason)
        self._drop_buf()
        self.in_message = False
        self._fire(Trigger.HEAD_INVALID)

    def _counted(self, chunk: Chunk) -> Chunk | None:
        n = min(self._remaining, chunk.length)
        self._remaining -= n
        self._account(n, chunk.ts_ns)
        rest = chunk.split(n)[1] if n < chunk.length else None
        if self._remaining == 0:
            if self._state is State.BODY_LENGTH:
                self._fire(Trigger.BODY_DONE)
                self._end(chunk.ts_ns, self.message_bytes - self._body_start)
            else:
                self._fire(Trigger.CHUNK_DONE)
        return rest

    def _chunk_size(self, chunk: Chunk) -> Chunk | None:
        before = len(self._buf)
        buf = self._buf + chunk.data
        nl = buf.find(b"\n", max(0, before))
        if nl < 0:
            self._account(chunk.length, chunk.ts_ns)
            if not chunk.complete or len(buf) > _MAX_CHUNK_LINE or not self._hold(buf):
                self._lost(chunk)
            return None
        used = nl + 1 - before
        self._account(used, chunk.ts_ns)
        self._drop_buf()
        line = buf[:nl].rstrip(b"\r")
        m = _CHUNK_SIZE.match(line)
        rest = chunk.split(used)[1] if used < chunk.length else None
        if m is None:
            self._sink.message_error(self._kind, "malformed chunk size")
            self._fire(Trigger.FRAMING_LOST)
            if rest is not None:
                return self._chunk_scan(rest)
            return None
        size = int(m.group(1), 16)
        if size == 0:
            self._fire(Trigger.LAST_CHUNK)
        else:
            self._remaining = size + 2  # the data and its CRLF
            self._fire(Trigger.CHUNK_HEADER)
        return rest

    def _chunk_trailer(self, chunk: Chunk) -> Chunk | None:
        before = len(self._buf)
        buf = self._buf + chunk.data
        # The trailer section ends with an empty line; usually it is just CRLF.
        if buf.startswith(b"\r\n") or buf.startswith(b"\n"):
            end, sep = 0, (2 if buf.startswith(b"\r\n") else 1)
        else:
            end, sep = buf.find(b"\r\n\r\n"), 4
        if end < 0:
            self._account(chunk.length, chunk.ts_ns)
            if not chunk.complete or len(buf) > self.max_header_bytes or not self._hold(buf):
                self._lost(chunk)
            return None
        used = end + sep - before
        self._drop_buf()
        self._account(used, chunk.ts_ns)
        self._fire(Trigger.BODY_DONE)
        self._end(chunk.ts_ns, self.message_bytes - self._body_start)
        return chunk.split(used)[1] if used < chunk.length else None

    def _lost(self, chunk: Chunk) -> None:
        """Chunk framing fell into bytes we did not capture: scan for the end."""
        self._drop_buf()
        self._window = b""
        self._fire(Trigger.FRAMING_LOST)
        self._scan(chunk)

    def _chunk_scan(self, chunk: Chunk) -> Chunk | None:
        if chunk.packets and self._looks_like_start(chunk.data, strict=True):
            # A segment that starts the next message: the body was every byte before it.
            self._window = b""
            self._fire(Trigger.NEXT_START)
            self._end(self._last_ts, self.message_bytes - self._body_start)
            return chunk
        self._account(chunk.length, chunk.ts_ns)
        self._scan(chunk)
        return None

    def _scan(self, chunk: Chunk) -> None:
        """End the body at a visible last-chunk marker.

        ``_window`` keeps the last known bytes of the stream while they are
        contiguous, so a marker split across two segments is still seen.
        """
        if chunk.complete:
            window = (self._window + chunk.data[: chunk.length])[-len(_LAST_CHUNK) :]
        else:
            window = chunk.tail[-len(_LAST_CHUNK) :]
        self._window = window
        if window.endswith(_LAST_CHUNK) or _is_last_chunk(chunk):
            self._window = b""
            self._fire(Trigger.BODY_DONE)
            self._end(chunk.ts_ns, self.message_bytes - self._body_start)

    def upgraded(self) -> None:
        """The peer switched protocols (101, CONNECT): stop parsing this side too."""
        if self._state in (State.IDLE, State.SEEK, State.BODY_UNKNOWN):
            self._fire(Trigger.UPGRADED)

    def _end(self, ts_ns: int, body_size: int | None) -> None:
        self.in_message = False
        self._sink.message_end(self._kind, ts_ns, body_size)


class _Framing(enum.Enum):
    NONE = enum.auto()
    LENGTH = enum.auto()
    CHUNKED = enum.auto()
    CLOSE = enum.auto()
    TUNNEL = enum.auto()
    INTERIM = enum.auto()


def body_framing(head: Head, request_method: str | None) -> _Framing:
    """How the body of a message is delimited (RFC 9112, section 6.3)."""
    if head.kind is Kind.REQUEST:
        if head.chunked:
            return _Framing.CHUNKED
        if head.content_length:
            return _Framing.LENGTH
        return _Framing.NONE
    code = head.status_code
    if code == 101 or (request_method == "CONNECT" and 200 <= code < 300):
        return _Framing.TUNNEL
    if 100 <= code < 200:
        return _Framing.INTERIM
    if request_method == "HEAD" or code in (204, 304):
        return _Framing.NONE
    if head.chunked:
        return _Framing.CHUNKED
    if head.content_length is not None:
        return _Framing.LENGTH if head.content_length else _Framing.NONE
    return _Framing.CLOSE


# Header fields whose values matter: framing ones by code, recorded ones by
# their (str) name. Keyed by lower-cased bytes, so that every other field is
# skipped without being decoded.
_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION = 1, 2, 3
_FIELD_ROLES: dict[bytes, int | str] = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    **{name.encode("ascii"): name for name in RECORDED_HEADERS},
}
if any(isinstance(_FIELD_ROLES.get(n), int) for n in (r.encode() for r in RECORDED_HEADERS)):
    raise AssertionError("a framing header cannot also be a recorded one")

# The common shape of a header section, checked in one pass: every line
# "token:value" ended by CRLF, no bare LF, no CR inside a line, no folding.
# Where it holds, splitting at CRLF and at the first colon finds exactly the
# fields the line-by-line loop would; anything else takes that loop.
# (Possessive quantifiers: nothing to backtrack into.)
_CLEAN_FIELDS = re.compile(rb"(?:" + _TOKEN + rb"+:[^\r\n]*+\r\n)*+\r\n")

# (content_length, chunked, close, upgrade) while a head is read
_Framing4 = tuple[int | None, bool, bool, bool]


def _framing_field(
    role: int, value_b: bytes, kind: Kind, state: _Framing4
) -> _Framing4 | None:
    """Fold one framing header into ``state``; None if it makes the head unusable."""
    content_length, chunked, close, upgrade = state
    if role == _CONTENT_LENGTH:
        if not value_b.isdigit():
            return None
        n = int(value_b)
        if content_length is not None and content_length != n:
            return None
        return n, chunked, close, upgrade
    if role == _TRANSFER_ENCODING:
        codings = [c.strip().lower() for c in value_b.split(b",")]
        chunked = codings[-1] == b"chunked"
        if not chunked and kind is Kind.REQUEST:
            return None  # a request body without a length cannot be framed
        return content_length, chunked, close, upgrade
    if b"," not in value_b:  # the usual single token: keep-alive, close
        token = value_b.strip().lower()
        return content_length, chunked, token == b"close", upgrade or token == b"upgrade"
    tokens = {t.strip().lower() for t in value_b.split(b",")}
    return content_length, chunked, b"close" in tokens, upgrade or b"upgrade" in tokens


def _field_lines(block: bytes, *, truncated: bool) -> list[bytes] | None:
    """The "name:value" lines of any header block; None if one is not a field.

    Tolerant of bare LF, blank lines and obsolete folding; a truncated
    block ends at its last complete line (or at the first line that is not
    a field, since the rest may be body bytes).
    """
    lines = block.split(b"\n")
    last = len(lines) - 1
    out = []
    for i in range(1, len(lines)):
        line = lines[i].rstrip(b"\r")
        if not line:
            continue
        if truncated and i == last:
            break  # a line cut off by the capture length: its value is unknown
        if line[0] in b" \t":
            continue  # obsolete line folding: a continuation of a header we skip
        name_b, colon, _ = line.partition(b":")
        if not colon or not _HEADER_NAME.match(name_b):
            if truncated:
                break
            return None
        out.append(line)
    return out


_build_head = builder(Head)


def parse_head(kind: Kind, block: bytes, *, truncated: bool, header_bytes: int) -> Head | None:
    """Parse a header block (possibly cut short); None if it is not HTTP/1.x."""
    if truncated and not block:
        return Head(kind=kind, version="", truncated=True, header_bytes=header_bytes)
    nl = block.find(b"\n")
    start = (block[:nl] if nl >= 0 else block).rstrip(b"\r")
    method = target = reason = ""
    status = 0
    if kind is Kind.REQUEST:
        m = _REQUEST_LINE.match(start)
        if m is None:
            if not truncated or nl >= 0:
                return None
            # Only part of the request line was captured: keep what is certain.
            parts = start.split(b" ")
            if len(parts) < 2 or not _HEADER_NAME.match(parts[0]):
                return None
            method, target, version = parts[0].decode("ascii"), _text(parts[1]), "1.1"
        else:
            method_b, target_b, minor = m.groups()
            method = method_b.decode("ascii")
            target = target_b.decode("latin-1")  # _text, inline: once per message
            version = "1.1" if minor == b"1" else "1.0"
    else:
        m = _STATUS_LINE.match(start)
        if m is None:
            return None
        minor, code, reason_b = m.groups()
        version = "1.1" if minor == b"1" else "1.0"
        status = int(code)
        reason = _text(reason_b) if reason_b else ""
    recorded: list[tuple[str, str]] = []
    framing: _Framing4 = (None, False, False, False)
    lines: list[bytes] | None
    if not truncated and nl >= 0 and _CLEAN_FIELDS.fullmatch(block, nl + 1):
        # block ends with the empty line: [nl + 1:-4] is the fields without their last CRLF
        lines = block[nl + 1 : -4].split(b"\r\n") if len(block) - nl > 3 else []
    else:
        lines = _field_lines(block, truncated=truncated)
        if lines is None:
            return None
    roles = _FIELD_ROLES
    for line in lines:
        name_b, _, value_b = line.partition(b":")
        role = roles.get(name_b.lower())
        if role is None:
            continue
        value_b = value_b.strip(b" \t")
        if isinstance(role, str):
            recorded.append((role, value_b.decode("latin-1")))  # _text, inline
        else:
            folded = _framing_field(role, value_b, kind, framing)
            if folded is None:
                return None
            framing = folded
    content_length, chunked, close, upgrade = framing
    if chunked:
        content_length = None  # Transfer-Encoding overrides Content-Length
    return _build_head(
        kind, version, method, target, status, reason, tuple(recorded),
        content_length, chunked, close, upgrade, truncated, header_bytes,
    )  # fmt: skip


def _text(b: bytes) -> str:
    # Header values are bytes of unknown charset; keep them lossless and printable.
    return b.decode("latin-1")


__all__ = ["RECORDED_HEADERS", "Framer", "Head", "Kind", "MessageSink", "State", "parse_head"]
