"""Client-side connection limits aiohttp lacks: a header deadline, a cap on connections
and OpenAI-shaped parse errors.

aiohttp has no deadline for receiving a request's headers (slowloris), no cap on open
connections, and answers unparsable requests (oversized or too many headers, both
Content-Length and Transfer-Encoding, duplicate Content-Length) with a plain-text 400.
This wraps its `RequestHandler` so that a connection that has not delivered its headers
within `timeouts.client_header` gets a 408 and is closed, a connection past
`server.max_connections` takes an idle one's place or gets a 429, and parse errors get
the OpenAI error shape with 431 for header limits (SPEC §1, issue 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import re
import sys
import termios
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, Final

from aiohttp import hdrs, web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler

from lrproxy import errors
from lrproxy.config import Listen
from lrproxy.log import MAIN, Seldom

log = logging.getLogger(MAIN)
MAX_HEADERS: Final = 128
MAX_FIELD_SIZE: Final = 16384  # one header line; OpenAI SDK headers are far below this
MAX_LINE_SIZE: Final = 8190  # a request's target (aiohttp's default; != MAX_FIELD_SIZE)
# A request's whole head, all its lines: aiohttp caps each line and their count only,
# which let 128 lines of 16 KiB (2 MiB, held as ~4 MiB while it comes) through. nginx
# takes 4 x 8 KiB by default, Envoy 60 KiB; an OpenAI SDK's head is under 1 KiB.
MAX_HEAD_BYTES: Final = 64 * 1024
# A chunked body whose framing outweighs its bytes, past this much of it, is refused:
# aiohttp spends ~1.2 us of Python per chunk, so 1-byte chunks (6 bytes on the wire
# each) cost ~0.2 s of CPU per MB received, ~150 times a plain body's, and a refused
# request's body is still read (and dropped) for aiohttp's lingering 10 s.
FRAMING_SLACK: Final = 64 * 1024
KEEPALIVE_S: Final = 75.0  # idle keep-alive connections, as nginx's keepalive_timeout
SEND_TIMEOUT_S: Final = 60.0  # an answer none of which the client takes, as nginx's send_timeout
_EVICT_IDLE_S: Final = 1.0  # at max_connections, what counts as idle (_lr_evict)
LINGER_S: Final = 1.0  # after an answer of _lr_answer's, the longest its bytes are read
# A new connection with no byte yet is a request on its way for this long (a drain waits)
_FRESH_S: Final = 1.0
# The most connections lingering at once, past which the close is a plain one: each holds
# its file for up to LINGER_S outside max_connections, and a burst of refused connects
# would otherwise take the files kept for upstream connections (cli.connection_cap)
LINGER_MAX: Final = 128
# Called with (status, code) for each answer given here, before the app saw a request
# (parse errors, the header deadline), so that metrics and the access log count it too;
# it returns the request id it logged, which the answer carries in X-Request-Id.
REFUSED: Final = web.AppKey[Callable[[int, str], str]]("lrproxy_refused")

_Handle = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# The app's own routes, {path: {method: handler}}, each path as it is routed (SPEC §1):
# the connections' handler calls these itself (`direct`), without the router.
ROUTES: Final = web.AppKey[dict[str, dict[str, _Handle]]]("lrproxy_routes")
# The app's answer to a target that is no path at all (`OPTIONS *`, `CONNECT host:443`,
# `GET http://host`), which aiohttp's router would answer with its own text 404.
UNROUTED: Final = web.AppKey[_Handle]("lrproxy_unrouted")


def direct(routes: dict[str, dict[str, _Handle]], app_handle: _Handle,
           unrouted: _Handle | None = None) -> _Handle:
    """The server's request handler: a request whose target is exactly one of `routes`'
    paths, with a method it takes and no `Expect:`, goes straight to that handler; a
    target with no path to `unrouted`; any other (a query string, an escape, an unknown
    path or method) to `app_handle`, the application's router, which would have picked
    the same handler for the first kind.

    The router's resolve, match info and middleware check cost ~30 k instructions a
    request (bench/RESULTS.md, ninth round), a twentieth of a minimal relay's. The
    handlers here never look at `request.match_info` or `request.app`.
    """
    get = routes.get

    def handle(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        methods = get(request.raw_path)
        if methods is not None and hdrs.EXPECT not in request.headers:
            h = methods.get(request.method)
            if h is not None:
                return h(request)
        if unrouted is not None and not request.path.startswith("/"):
            return unrouted(request)
        return app_handle(request)

    return handle


# Request ids: 16 random hex digits per process, then a counter; unique across workers
# and restarts like uuid4().hex, without a getrandom() call per request. A client's own
# (X-Request-Id) is kept when it is sane.
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
ID_PREFIX: Final = os.urandom(8).hex()
ids: Final = itertools.count(int.from_bytes(os.urandom(4), "big"))
ID_MASK: Final = 0xFFFFFFFFFFFFFFFF


def request_id_of(value: str | None) -> str:
    """The client's X-Request-Id `value` if it is sane, else a new one."""
    if value is not None and REQUEST_ID_RE.fullmatch(value):
        return value
    return ID_PREFIX + "%016x" % (next(ids) & ID_MASK)  # %: faster than an f-string


def not_routed(request: web.BaseRequest, e: web.HTTPException,
               where: str) -> tuple[errors.ProxyError, web.Response]:
    """aiohttp's router's refusal (404: no such path, 405: not that method, with its
    Allow) as ours, in the OpenAI shape; `where` names what the listener serves."""
    path = request.raw_path.partition("?")[0][:200]
    err: errors.ProxyError
    if e.status == 405:  # (the path is ours: its method is not)
        allow = ", ".join(sorted(e.headers.get("Allow", "").split(",")))
        err = errors.MethodNotAllowed(f"{path} takes {allow}, not {request.method}")
    elif e.status == 404:
        err = errors.NotFound(f"{request.method} {path} is not part of {where}")
    else:
        err = errors.NotFound(e.reason)
    resp = web.Response(status=e.status, body=err.body(), content_type="application/json")
    if "Allow" in e.headers:
        resp.headers["Allow"] = e.headers["Allow"]
    return err, resp


def unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes written to `transport` that its peer has not yet taken: the transport's
    buffer and the socket's send queue (SIOCOUTQ). Both shrink as a client reads, however
    slowly; the buffer alone may not for minutes (the kernel says a socket is writable
    only once a third of its send buffer is free), and a slow reader would be taken for
    one that reads nothing (SEND_TIMEOUT_S)."""
    size: int = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):  # (not TCP, or closed)
            size += int.from_bytes(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)),
                                   sys.byteorder, signed=True)
    return size


class LimitsHandler(RequestHandler):
    """aiohttp's protocol, plus the header deadline, the connection cap and JSON error pages."""

    header_timeout: float = 10.0
    on_refused: ClassVar[Callable[[int, str], str] | None] = None
    # The server's open connections, oldest first (one dict shared by its handlers), and
    # their cap (server.max_connections): at it, a new connection takes the place of the
    # oldest idle kept-alive one, closed; with none idle, it gets its 429 and is closed.
    max_connections: ClassVar[int] = 1 << 62
    connections: ClassVar[dict[LimitsHandler, None]] = {}
    # Set by Runner.take_no_new_requests (SIGTERM): a request begun on a connection after
    # its answer ended from then on is not run (lr_refuse)
    draining: ClassVar[bool] = False
    lingering: ClassVar[set[LimitsHandler]] = set()  # its connections in _lr_answer's close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # aiohttp's force_close() drops its `transport` as it closes it, gracefully: an
        # answer the client does not take would then hold the connection for ever
        # (_lr_check looks at this one until connection_lost).
        self.lr_transport: asyncio.Transport | None = self.transport
        self.lr_busy = False  # set by the app's edge while it handles a request
        # The app's edge answers this connection's next request 503 shutting_down: it
        # comes after the drain began, on a connection kept alive (SPEC §6)
        self.lr_refuse = False
        self._lr_seen = False  # bytes of a request arrived since the deadline was set
        # Bytes of the head being received (MAX_HEAD_BYTES): those that came while no
        # body was being received, since the last request's head was whole
        self._lr_head = 0
        self._lr_payload: Any = None  # the last parsed request's body
        self._lr_dropping = False  # a head over the cap: no more of it goes to the parser
        self._lr_wire = 0  # bytes received while a body was, and what the body got of them
        self._lr_got = 0
        self._lr_body: StreamReader | None = None  # an answered request's body still coming
        self._lr_body_sized = True  # … with a Content-Length
        self._lr_timer: asyncio.TimerHandle | None = None
        self._lr_kept = -1.0  # when its last request ended (_lr_evict); -1: none yet
        self._lr_opened = self._loop.time()  # (Runner.unfinished)
        self._lr_stuck = (0, 0.0)  # its unsent answer bytes, and since when (_lr_check)
        conns = self.connections
        conns[self] = None
        if len(conns) > self.max_connections and not self._lr_evict():
            self._lr_over()
            return
        # One timer per connection, moved lazily: a request only sets attributes.
        self._lr_deadline = self._loop.time() + self.header_timeout
        self._lr_timer = self._loop.call_at(self._lr_deadline, self._lr_check)

    def _lr_evict(self) -> bool:
        """Close the least recently used idle kept-alive connection (answered at least
        _EVICT_IDLE_S ago, no byte of its next request come since), as nginx reuses idle
        connections when it has no free ones; False when none is idle. Its client sees
        a keep-alive close, which it retries. A new connection yet to send its request
        is not idle: its header deadline bounds it."""
        idle_since = self._loop.time() - _EVICT_IDLE_S
        for h in self.connections:  # (least recently used first: lr_end moves them last)
            transport = h.transport
            if h._lr_kept > idle_since:
                break  # the rest were used more recently still
            # (aiohttp's handler waits for the next request, its answer all written)
            if (h._lr_kept >= 0 and not h._lr_seen and getattr(h, "_waiter", None) is not None
                    and not h.lr_busy and not h._messages and transport is not None
                    and not transport.is_closing() and not transport.get_write_buffer_size()):
                transport.close()
                del self.connections[h]  # (its connection_lost comes later)
                return True
        return False

    def _lr_over(self) -> None:
        """A connection over server.max_connections: a 429 (before any request: its
        bytes are not read) and the close, logged once a minute at most."""
        now = self._loop.time()
        if _over_logged.due():
            log.warning("server.max_connections (%d) reached: new connections get 429 "
                        "and are closed", self.max_connections)
        self._lr_seen = True  # (its bytes, should any come before the close, are no
        self._lr_deadline = now  # request to wait for)
        self._lr_answer(errors.RateLimited(
            "The proxy has too many open connections; retry later.", retry_after=1),
            b"429 Too Many Requests")

    def data_received(self, data: bytes) -> None:
        if not data:  # no bytes of a request: aiohttp's own call as it resumes reading,
            queued = len(self._messages)  # which parses the heads it held back (its
            super().data_received(data)  # queue of 32 was full): checked as any are
            if len(self._messages) > queued:
                self._lr_parsed(queued, True)
            return
        if self._lr_dropping:
            return
        if not self._lr_seen and not self.lr_busy:
            body = self._lr_body
            if body is not None:
                if not body.is_eof():
                    # the rest of the body of a request answered before it came (a 401,
                    # a 413), which aiohttp reads and drops: no next request's bytes,
                    # unless some follow the body's end
                    fed = body.total_bytes
                    queued = len(self._messages)
                    super().data_received(data)
                    if self._lr_framing(len(data), body.total_bytes - fed):
                        body.feed_eof()  # aiohttp's lingering read of it ends, and
                        self.close()  # the connection with it (its answer has gone)
                        return
                    if body.is_eof():
                        after = len(data) - (body.total_bytes - fed)
                        self._lr_body_ended(
                            after > 0 and bool(data[len(data) - after:].lstrip(b"\r\n")))
                        if len(self._messages) > queued:  # the next head came whole too
                            self._lr_parsed(queued, after > MAX_HEAD_BYTES)
                        else:  # (the next head's first bytes, if any)
                            self._lr_wire = self._lr_got = 0
                            self._lr_head = after
                    return
                self._lr_body = None
            if data[0] in _CRLF and not data.lstrip(b"\r\n"):
                super().data_received(data)  # line ends before a request line, which
                return  # the parser skips (RFC 9112 §2.2): no request's bytes
            # A request's first bytes: its headers are due within header_timeout from
            # now (on a new connection, from its start; on a kept-alive one also past
            # the idle close's time). The timer is never further off than
            # header_timeout (_lr_check), so it need not move.
            due = self._loop.time() + self.header_timeout
            if due < self._lr_deadline or self._lr_kept >= 0:
                self._lr_deadline = due
        self._lr_seen = True
        queued = len(self._messages)
        payload = self._lr_payload
        in_head = payload is None or payload.is_eof()  # (else these are a body's bytes)
        fed = 0 if in_head else payload.total_bytes
        super().data_received(data)
        if len(self._messages) > queued:  # a head came whole (or failed to parse)
            self._lr_parsed(queued, in_head and self._lr_head + len(data) > MAX_HEAD_BYTES)
            if self.lr_busy:
                self._lr_body_broken()
        elif not in_head:
            if self._lr_framing(len(data), payload.total_bytes - fed):
                payload.set_exception(errors.InvalidRequest(
                    "Malformed request body: its chunked encoding is mostly framing "
                    "(chunks of a few bytes); send it in larger chunks, or with a "
                    "Content-Length."))
        else:
            self._lr_head += len(data)
            if self._lr_head > MAX_HEAD_BYTES:
                self._lr_head_too_large()

    def _lr_parsed(self, first: int, measure: bool) -> None:
        """Heads parsed (`self._messages[first:]`, `measure` as for _lr_heads_checked):
        checked, and the last one's body, still coming, is the one whose bytes the next
        reads are (not a head's)."""
        self._lr_heads_checked(first, measure)
        payload = self._messages[-1][1]
        self._lr_payload = None if payload.is_eof() else payload  # (not kept: a cycle)
        self._lr_head = self._lr_wire = self._lr_got = 0

    def _lr_framing(self, wire: int, got: int) -> bool:
        """Count a read of `wire` bytes of a body that gave it `got`: True, and nothing
        more is parsed, once over FRAMING_SLACK of framing has come and it outweighs
        the body's bytes (a chunked body of chunks under ~5 bytes)."""
        self._lr_wire += wire
        self._lr_got += got
        framing = self._lr_wire - self._lr_got
        if framing <= FRAMING_SLACK or framing <= self._lr_got:
            return False
        self._lr_dropping = True
        return True

    def _lr_heads_checked(self, first: int, measure: bool) -> None:
        """The heads parsed from the last read (`self._messages[first:]`) turned into
        the parse errors they are: over MAX_HEAD_BYTES in all (when `measure`: a head
        over it may end in this read), a 431; an HTTP/1.0 request with a
        Transfer-Encoding (RFC 9112 §6.1: its framing is faulty, as nginx answers it)
        or one of another version than 1.0 and 1.1, a 400. The connection closes with
        the error: no body is read after it."""
        messages = self._messages
        for i in range(first, len(messages)):
            msg = messages[i][0]
            if _ERR_INFO is None or not isinstance(msg, RawRequestMessage):
                continue  # (a parse error already)
            if measure and sum(len(k) + len(v) + 4 for k, v in msg.raw_headers) > MAX_HEAD_BYTES:
                exc = BadHttpMessage("Request headers too long")
                messages[i] = (_ERR_INFO(status=431, exc=exc, message=exc.message), EMPTY_PAYLOAD)
            elif msg.version != (1, 1) and (
                    msg.version != (1, 0) or hdrs.TRANSFER_ENCODING in msg.headers):
                # HTTP/2.0 or 0.9 in a request line (answered as such by aiohttp), or
                # HTTP/1.0 with a Transfer-Encoding
                exc = BadHttpMessage("Unsupported HTTP version or framing")
                messages[i] = (_ERR_INFO(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)

    def _lr_head_too_large(self) -> None:
        """A head over MAX_HEAD_BYTES, not whole yet: none of the rest is parsed. With
        no answer under way, a 431 and the close; behind a request being answered (a
        pipelining client's), the close after that answer (a 431 now would go first)."""
        self._lr_dropping = True
        if self.lr_busy or self._messages:
            self.close()  # aiohttp's: the connection closes once those are answered
            return
        self._lr_answer(errors.HeadersTooLarge("Request headers too large or too many."),
                        b"431 Request Header Fields Too Large")

    def _lr_body_ended(self, after: bool) -> None:
        """A refused request's body ended within a read, `after` it bytes (other than
        line ends, which the parser skips): the next request's first ones, its headers
        due within header_timeout (a slowloris sends them with the body's end). A
        chunked body's framing is in them too: then the connection, whether or not a
        request began, closes at header_timeout if none has come whole, quietly (no 408
        for what may be none)."""
        self._lr_body = None
        due = self._loop.time() + self.header_timeout
        if self._lr_body_sized and after:
            self._lr_seen = True
        elif self._lr_body_sized:
            return
        if due < self._lr_deadline:
            self._lr_deadline = due

    def _lr_body_broken(self) -> None:
        """A parse error in the body of the request being handled (a chunk size that is
        no number, a chunk longer than it said): aiohttp queues its 400 for after the
        handler, whose read of the body would wait meanwhile until client_body. That
        read ends now, with a 400 in the OpenAI shape; the connection closes after it
        (app._close_if_body_unsent)."""
        msg = self._messages[-1][0]
        request = getattr(self, "_current_request", None)
        if (_ERR_INFO is None or not isinstance(msg, _ERR_INFO) or request is None
                or request.content.is_eof()):
            return
        self._messages.pop()
        request.content.set_exception(errors.InvalidRequest(
            "Malformed request body (its chunked encoding)."))

    def lr_disarm(self) -> None:
        if self._lr_timer is not None:
            self._lr_timer.cancel()
            self._lr_timer = None

    def lr_end(self, request: web.BaseRequest | None = None) -> None:
        """The app's edge is done with `request` (it set `lr_busy` at its start), whose
        body may not have all come yet (an answer before it: a 401, a 413)."""
        self.lr_busy = False
        self._lr_seen = False
        self._lr_body = None
        self.lr_refuse = self.draining
        if request is not None and not (body := request.content).is_eof():
            self._lr_body = body  # (a Content-Length body, or a chunked one)
            self._lr_body_sized = hdrs.CONTENT_LENGTH in request.headers
        now = self._loop.time()
        self._lr_kept = now
        conns = self.connections  # least recently used first (_lr_evict)
        if conns.pop(self, 0) is None:  # (an over-cap one never got here)
            conns[self] = None
        # Keep-alive: an idle connection closes after KEEPALIVE_S (here: aiohttp's own
        # timer, a backstop, runs header_timeout longer); a next request begun before
        # then has the same header deadline from its first byte (data_received).
        self._lr_deadline = now + KEEPALIVE_S

    def _lr_check(self) -> None:
        self._lr_timer = None
        transport = self.lr_transport
        if transport is None:
            return
        now = self._loop.time()
        buffered = transport.get_write_buffer_size()
        if transport.is_closing() and not buffered:
            return
        if buffered and not self.lr_busy:
            # An answer the client does not take: cut once none of it has gone for
            # SEND_TIMEOUT_S (nginx's send_timeout); close() would wait on it for ever.
            size, since = self._lr_stuck
            if (left := unsent(transport)) != size:
                self._lr_stuck = (left, now)
            elif now - since >= SEND_TIMEOUT_S:
                transport.abort()
                return
            if transport.is_closing():  # (an answer with Connection: close) look again
                self._lr_timer = self._loop.call_at(now + self.header_timeout, self._lr_check)
                return
        if self.lr_busy or self._messages or buffered:
            # a request is being handled, or parsed and waiting for the last answer to
            # be written out (a pipelining client's, which the edge has not begun)
            self._lr_timer = self._loop.call_at(now + self.header_timeout, self._lr_check)
        elif now < self._lr_deadline:
            # never further off than header_timeout: a kept-alive connection's deadline,
            # far off while it idles, comes near at a request's first bytes
            self._lr_timer = self._loop.call_at(
                min(self._lr_deadline, now + self.header_timeout), self._lr_check)
        else:
            self._lr_expired()

    def _lr_expired(self) -> None:
        transport = self.transport
        assert transport is not None
        if not self._lr_seen:  # an idle connection, not a slow request: just close it
            transport.close()
            return
        self._lr_answer(errors.RequestTimeout("The request headers did not arrive in time."),
                        b"408 Request Timeout")

    def _lr_answer(self, err: errors.ProxyError, status_line: bytes) -> None:
        """`err`, counted and logged as a request, as the connection's last answer."""
        transport = self.transport
        assert transport is not None
        rid = self._lr_refused(err)
        body = err.body()
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                         for k, v in err.headers().items())
        transport.write(
            b"HTTP/1.1 " + status_line
            + b"\r\nServer: lrproxy\r\nContent-Type: application/json\r\n"
            + (b"X-Request-Id: " + rid.encode() + b"\r\n" if rid else b"")
            + b"Server-Timing: " + NO_TIME.encode() + b"\r\n" + extra
            + b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body
        )
        # Not a plain close: one with the request's bytes unread makes the kernel reset
        # the connection, and a client still sending (its body) sees the reset on its
        # write, never this answer. Its side ended, the connection reads and drops what
        # comes until the client closes (eof_received), LINGER_S at most, as nginx's
        # lingering close does.
        self.lr_disarm()
        self._lr_dropping = True
        # It takes no more requests: no max_connections place (a lingering over-cap one
        # would refuse a new client while a place is free) and no request for the drain
        # to wait on (Runner.unfinished)
        self.connections.pop(self, None)
        if not transport.can_write_eof() or len(self.lingering) >= LINGER_MAX:
            transport.close()  # (TCP and unix sockets can end their side)
            return
        self.lingering.add(self)
        transport.write_eof()
        self._loop.call_later(LINGER_S, self._lr_linger_end)

    def _lr_linger_end(self) -> None:
        """The close, LINGER_S after _lr_answer's answer. An answer still unsent (behind
        an earlier one the client does not read) is cut once none of it has gone for
        SEND_TIMEOUT_S (_lr_check), as any other: close() alone would wait on it for ever."""
        transport = self.lr_transport
        if transport is None:
            return
        transport.close()
        if transport.get_write_buffer_size():
            self._lr_check()

    def _lr_refused(self, err: errors.ProxyError) -> str:
        hook = type(self).on_refused
        return "" if hook is None else hook(err.status, err.code)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lr_disarm()
        self.lr_transport = self._lr_payload = None
        self.connections.pop(self, None)
        self.lingering.discard(self)
        super().connection_lost(exc)

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Requests aiohttp could not parse: the OpenAI error shape, never a traceback."""
        if status == 500:
            return super().handle_error(request, status, exc, message)
        err: errors.ProxyError
        text = str(getattr(exc, "message", "") or message or "")
        if (isinstance(exc, LineTooLong) and len(exc.args) > 1
                and str(exc.args[1]) == str(MAX_LINE_SIZE)):
            # over the request line's limit (its target's: the only part aiohttp
            # measures), not a header's (MAX_FIELD_SIZE): the error names the limit
            err = errors.UriTooLong("Request target too long.")
        elif isinstance(exc, LineTooLong) or "Too many headers" in text or "too long" in text:
            err = errors.HeadersTooLarge("Request headers too large or too many.")
        else:
            err = errors.InvalidRequest("Malformed HTTP request.")
        rid = self._lr_refused(err)
        resp = web.Response(status=err.status, body=err.body(), content_type="application/json",
                            headers={"Server": "lrproxy", "Server-Timing": NO_TIME,
                                     **({"X-Request-Id": rid} if rid else {})})
        resp.force_close()
        return resp


_over_logged: Final = Seldom(60.0)  # the max_connections warning
_CRLF: Final = frozenset(b"\r\n")
# aiohttp's queued parse error (private: without it, a broken body waits for client_body)
_ERR_INFO: Final = getattr(web_protocol, "_ErrInfo", None)
# The Server-Timing of an answer given before a request could be read (app.server_timing)
NO_TIME: Final = "upstream;dur=0.000, proxy;dur=0.000"


class Runner(web.AppRunner):
    """An AppRunner whose connections have the limits above."""

    def __init__(self, app: web.Application, *, header_timeout: float,
                 max_connections: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("max_headers", MAX_HEADERS)
        kwargs.setdefault("max_field_size", MAX_FIELD_SIZE)
        kwargs.setdefault("max_line_size", MAX_LINE_SIZE)
        # (past ours: aiohttp's closes a connection with a request begun but not whole)
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_S + header_timeout + 1.0)
        kwargs.setdefault("auto_decompress", False)  # compressed bodies are refused (415)
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._handler: type[LimitsHandler] | None = None

    def unfinished(self) -> int:
        """Connections with a request not yet answered in full: its bytes come and its
        handler not yet begun (its headers still coming, or whole and waiting), its
        handler running, or its answer still being written (a JSON answer is written
        after the handler returns); or taken in the last _FRESH_S with no byte yet (its
        client has just connected and is sending its request: closed, a POST it had
        written would be reset unanswered). The drain waits for these."""
        if self._handler is None:
            return 0
        fresh = asyncio.get_running_loop().time() - _FRESH_S
        return sum(1 for h in self._handler.connections
                   if ((h._lr_seen and not h.lr_busy) or getattr(h, "_request_in_progress", False)
                       or (h._lr_kept < 0 and h._lr_opened > fresh))
                   and h.transport is not None and not h.transport.is_closing())

    def take_no_new_requests(self) -> None:
        """A drain begins: a request begun from now on on a connection kept alive (idle
        now, or once its answer ends) gets 503 shutting_down and the close, and is not
        run, so no new work starts after SIGTERM; one whose bytes have begun to come is
        in flight. (A kept-alive connection cannot be closed safely: its client may be
        sending on it, and a stream begun before the drain has promised nothing of a
        close.)"""
        if self._handler is None:
            return
        self._handler.draining = True
        for h in self._handler.connections:
            if h._lr_kept >= 0 and not h._lr_seen and not h.lr_busy:
                h.lr_refuse = True

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        timeout, cap = self.header_timeout, self.max_connections
        refused = self.app.get(REFUSED)

        class Handler(LimitsHandler):
            header_timeout = timeout
            on_refused = refused
            max_connections = LimitsHandler.max_connections if cap is None else cap
            connections: ClassVar[dict[LimitsHandler, None]] = {}
            lingering: ClassVar[set[LimitsHandler]] = set()

        class Server(web.Server):
            def __call__(self) -> RequestHandler:
                return Handler(self, loop=self._loop, **self._kwargs)

        server.__class__ = Server  # aiohttp builds the Server; we only pick its handler
        self._handler = Handler
        if routes := self.app.get(ROUTES):
            server.request_handler = direct(routes, server.request_handler,
                                            self.app.get(UNROUTED))
        return server


def named(addresses: Iterable[Any]) -> list[str]:
    """Socket addresses (`getsockname()`'s, or a runner's: what was bound on port 0, or
    inherited from systemd) as an operator writes them, each once: HOST:PORT,
    [V6]:PORT, unix:PATH, or unix:@NAME for an abstract one (`ListenStream=@NAME`,
    given as bytes with a NUL)."""
    return list(dict.fromkeys(_named(a) for a in addresses))


def api_urls(addresses: Iterable[Any]) -> tuple[str, str]:
    """The API's base URLs on these socket addresses, for the start line; and the
    addresses alone (`named`), for its `listen` field."""
    names = named(addresses)
    return ", ".join(f"http://{a}/api/v1" for a in names), ", ".join(names)


def _named(address: Any) -> str:
    if isinstance(address, tuple):
        return str(Listen(str(address[0]), int(address[1])))
    if isinstance(address, bytes):
        address = address.decode(errors="backslashreplace")
    return f"unix:{'@' + address[1:] if address.startswith(chr(0)) else address}"
