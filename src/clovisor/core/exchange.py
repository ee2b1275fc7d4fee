"""Sessions of the exchanges the classifier paired itself.

The kernel frames an exchange only where the user-space framer would frame
it the same way (``bpf/http1.h``), and sends both header blocks whole. So
the session comes from the same :func:`~clovisor.core.http1.parse_head` and
the same rules as :class:`~clovisor.core.sessions.HttpConnection`'s: the
tests feed the same traffic both ways and compare the sessions.
"""

from __future__ import annotations

from .events import Exchange, Outcome, Phase, Protocol, Session
from .http1 import Kind, parse_head
from .sessions import _build_request, _build_response, _build_session

__all__ = ["exchange_session"]


def exchange_session(
    ex: Exchange,
    client_addr: str,
    server_addr: str,
    *,
    outcome: Outcome = Outcome.COMPLETE,
    end_ns: int | None = None,
) -> Session | None:
    """The session of a paired exchange, or of one still held (with ``outcome``
    and the time it was decided, ``end_ns``); None if a head does not parse.

    A held exchange is reported as the framer reports a connection that
    ends with that request open: a request whose body was not all seen
    keeps its Content-Length as the body size, a response whose body was
    not all seen has no body size, and a request with no response head has
    no response and no response bytes.
    """
    req_head = parse_head(
        Kind.REQUEST, ex.request_head, truncated=False, header_bytes=len(ex.request_head)
    )
    if req_head is None:
        return None
    phase = ex.phase
    if phase is Phase.REQUEST:
        req_body = req_head.content_length
    else:
        req_body = ex.request_bytes - len(ex.request_head)
    request = _build_request(
        req_head.method, req_head.target, req_head.version, req_head.headers, req_body, False
    )
    response = None
    resp_packets = resp_bytes = 0
    if phase is Phase.COMPLETE or phase is Phase.RESPONSE:
        resp_head = parse_head(
            Kind.RESPONSE, ex.response_head, truncated=False, header_bytes=len(ex.response_head)
        )
        if resp_head is None:
            return None
        body = ex.response_bytes - len(ex.response_head) if phase is Phase.COMPLETE else None
        response = _build_response(
            resp_head.status_code, resp_head.reason, resp_head.version, resp_head.headers, body,
            False,
        )
        resp_packets = max(1, ex.response_packets)
        resp_bytes = ex.response_bytes
    end = ex.end_ns if end_ns is None else end_ns
    # the positional builders of sessions.py: one exchange costs three of these
    session: Session = _build_session(
        ex.role, Protocol.HTTP, ex.ifindex, ex.family, client_addr, ex.client_port, server_addr,
        ex.server_port, ex.start_ns, max(end, ex.start_ns), outcome, request, response,
        max(1, ex.request_packets), ex.request_bytes, resp_packets, resp_bytes, "", (),
    )
    return session
