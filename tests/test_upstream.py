"""The upstream request on the wire (upstream.send): the direct path (`_Direct`), which
writes a POST on aiohttp's pooled connection itself, sends what the ClientSession sends,
byte for byte, and reads answers as aiohttp's own response does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrproxy import upstream
from lrproxy.config import Upstream
from lrproxy.errors import UpstreamBadResponse, UpstreamConnectionLost, UpstreamError

Answer = Callable[[bytes], Awaitable[bytes]]  # the request's bytes -> the answer's
Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Servers = Callable[[Serve], Awaitable[str]]
Wires = Callable[..., Awaitable[tuple["Wire", str]]]


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    """Starts raw TCP servers, each handling its connections with a `serve` of the
    test's own (a connection closes when its `serve` returns) and given as its base
    URL; after the test all stop, their connections closed and their handlers ended."""
    started: list[asyncio.Server] = []
    open_: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def start(serve: Serve) -> str:
        async def tracked(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            open_[task] = w
            try:
                await serve(r, w)
            finally:  # a connection ends with its handler
                open_.pop(task, None)
                w.close()

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        started.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"

    yield start
    for server in started:
        server.close()
    for w in open_.values():
        w.close()
    await asyncio.gather(*open_, return_exceptions=True)
    for server in started:
        await server.wait_closed()


async def _request_of(r: asyncio.StreamReader) -> bytes:
    """One request's head and body, as a raw server reads it."""
    head = await r.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await r.readexactly(length)


class Wire:
    """A raw HTTP/1.1 server's handling (`serve`, for `servers`): keeps each
    connection's requests, answers each with what `answer` gives for it (after reading
    its whole body), and closes the connection after that answer when `close` says so."""

    def __init__(self, answer: Answer, close: bool = False) -> None:
        self.answer, self.close = answer, close
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request bytes)
        self.conns = 0

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.conns += 1
        n = self.conns
        try:
            while True:
                req = await _request_of(r)
                self.requests.append((n, req))
                w.write(await self.answer(req))
                await w.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


@pytest.fixture
def wires(servers: Servers) -> Wires:
    """Starts `Wire`s, each given as (the wire, its base URL)."""
    async def make(answer: Answer, close: bool = False) -> tuple[Wire, str]:
        wire = Wire(answer, close)
        return wire, await servers(wire.serve)

    return make


def _ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> Answer:
    async def answer(req: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra
                + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return answer


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     cookie_jar=aiohttp.DummyCookieJar()) as s:
        yield s


def _target(base_url: str, auth: str | None = "Bearer sk-up") -> upstream.Target:
    u = Upstream(name="u", region="r", base_url=base_url, models={"m": "m"})
    return upstream.Target(u, base_url + "/chat/completions", base_url + "/embeddings",
                           auth, None, None)


async def _send(session: aiohttp.ClientSession, target: upstream.Target, body: bytes,
                chat: bool = True, stream: bool = False,
                rid: str = "req-1") -> upstream.UpstreamResponse:
    return await upstream.send(session, target, chat, stream, body, rid,
                               upstream.Deadlines(), 5.0, aiohttp.ClientTimeout(total=None))


async def _read(resp: upstream.UpstreamResponse) -> bytes:
    out = b""
    while data := await resp.read_some():
        out += data
    resp.release()
    return out


async def test_direct_request_is_the_client_sessions_byte_for_byte(
        session: aiohttp.ClientSession, wires: Wires) -> None:
    """For chat and embeddings, JSON and stream answers, with and without a key, a
    body short and long: the bytes the upstream reads are those ClientSession sends."""
    wire, base = await wires(_ok())
    base += "/prefix"
    async with aiohttp.ClientSession(trust_env=True, auto_decompress=False) as plain:
        for auth in ("Bearer sk-up", None):
            for chat in (True, False):
                for stream in (False, True):
                    for size in (10, 100_000, 1_500_000):
                        body = b'{"x":"' + b"a" * size + b'"}'
                        sent = []
                        for s in (session, plain):  # trust_env: the ClientSession's path
                            target = _target(base, auth)
                            await _read(await _send(s, target, body, chat, stream, "rid-7"))
                            assert bool(target.direct) is (s is session)
                            sent.append(wire.requests[-1][1])
                        direct, through_session = sent
                        assert direct == through_session, (chat, stream, size)
                        path = b"/v1/prefix/chat/completions" if chat else b"/v1/prefix/embeddings"
                        assert direct.startswith(b"POST " + path + b" HTTP/1.1\r\n")
                        assert b"\r\nX-Request-Id: rid-7\r\n" in direct
                        assert direct.endswith(b"\r\n\r\n" + body)


async def test_direct_connection_is_pooled_and_closed_when_the_answer_says(
        session: aiohttp.ClientSession, wires: Wires) -> None:
    """Answers read to their end leave the connection in the pool; `Connection: close`
    or an answer closed before its end do not."""
    closing = {"yes": False}

    async def answer(req: bytes) -> bytes:
        body = b'{"ok":true}'
        if req.endswith(b'{"partial":1}'):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body
        if closing["yes"]:
            return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 11\r\n\r\n" + body
        return b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + body

    wire, base = await wires(answer)
    target = _target(base)
    for _ in range(3):
        assert await _read(await _send(session, target, b"{}")) == b'{"ok":true}'
    assert [n for n, _ in wire.requests] == [1, 1, 1]
    closing["yes"] = True
    await _read(await _send(session, target, b"{}"))
    closing["yes"] = False
    await _read(await _send(session, target, b"{}"))
    assert [n for n, _ in wire.requests] == [1, 1, 1, 1, 2]
    resp = await _send(session, target, b'{"partial":1}')  # closed before its end
    assert not resp.done()
    resp.close()
    with pytest.raises(UpstreamConnectionLost):
        await resp.read_some()
    await _read(await _send(session, target, b"{}"))
    assert [n for n, _ in wire.requests][-2:] == [2, 3]


async def test_direct_reads_past_an_interim_answer_and_to_the_close(
        session: aiohttp.ClientSession, wires: Wires) -> None:
    """A `100 Continue` before the answer is skipped, as aiohttp's response skips it; a
    body with neither length nor chunks is read until the upstream closes."""
    async def answer(req: bytes) -> bytes:
        return (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream"
                b"; charset=utf-8\r\nConnection: close\r\n\r\ndata: [DONE]\n\n")

    _, base = await wires(answer, close=True)
    resp = await _send(session, _target(base), b"{}", stream=True)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    assert await _read(resp) == b"data: [DONE]\n\n"


@pytest.mark.parametrize(("answer", "error"), [
    (b"garbage\r\n\r\n", UpstreamBadResponse),
    (b"HTTP/1.1 200 OK\r\nContent-Len", UpstreamConnectionLost),  # cut in its head
    (b"", UpstreamConnectionLost),  # closed without a word
])
async def test_direct_failures_are_the_client_sessions(
        session: aiohttp.ClientSession, wires: Wires, answer: bytes,
        error: type[Exception]) -> None:
    """A broken or missing answer is the same failure on either path."""
    async def give(req: bytes) -> bytes:
        return answer

    wire, base = await wires(give, close=True)
    got = []
    async with aiohttp.ClientSession(trust_env=True) as plain:
        for s in (session, plain):
            with pytest.raises(error) as e:
                await _send(s, _target(base), b"{}")
            got.append(str(e.value))
    assert got[0] == got[1]
    assert len(wire.requests) == 2
    with socket.socket() as sock:  # a port nothing listens on: the connect's failure
        sock.bind(("127.0.0.1", 0))
        idle = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(UpstreamError, match="Connection refused"):
        await _send(session, _target(idle), b"{}")


async def test_a_header_aiohttp_would_refuse_is_left_to_it(
        session: aiohttp.ClientSession, wires: Wires) -> None:
    """A key with a line break in it is not written into the head: the target goes
    through the ClientSession, which refuses it (as before the direct path)."""
    wire, base = await wires(_ok())
    target = _target(base, auth="Bearer sk\r\nX-Evil: 1")
    with pytest.raises(ValueError, match=r"control character|[Nn]ewline"):
        await _send(session, target, b"{}")
    assert target.direct is False
    assert wire.requests == []


def test_direct_needs_no_egress_proxy_and_no_proxy_from_the_environment() -> None:
    """Only a target without `proxy`, in a session with trust_env off, goes direct."""
    async def check() -> list[Any]:
        out = []
        u = Upstream(name="u", region="r", base_url="http://127.0.0.1:9/v1", models={"m": "m"})
        for proxy, trust in ((None, False), ("http://127.0.0.1:3128", False), (None, True)):
            t = upstream.Target(u, u.base_url + "/chat/completions", u.base_url + "/embeddings",
                                None, None, proxy)
            async with aiohttp.ClientSession(trust_env=trust) as s:
                out.append(bool(upstream._Direct.of(t, s)))
        return out

    assert asyncio.run(check()) == [True, False, False]


async def test_answer_before_the_body_is_out_closes_the_connection(
        session: aiohttp.ClientSession, servers: Servers) -> None:
    """An upstream that answers from a request's head alone (a 413 for a big body) and
    keeps the connection: what is left of the body must not go out ahead of the next
    request. The connection closes, as aiohttp's response closes it then, and the next
    request goes on a new one."""
    got: list[tuple[int, bytes]] = []
    conns = 0

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        n = conns
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                got.append((n, head.split(b"\r\n")[0]))
                if not head.startswith(b"POST "):
                    return
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if length > 1_000_000:  # refused at once, its body left unread
                    w.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\n{}")
                    await asyncio.sleep(0.2)
                    continue
                await r.readexactly(length)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await w.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass

    target = _target(await servers(serve))
    big = b'{"x":"' + b"a" * 12_000_000 + b'"}'
    resp = await _send(session, target, big)
    assert resp.status == 413
    await _read(resp)
    for _ in range(2):
        resp = await _send(session, target, b'{"small":1}')
        assert resp.status == 200 and await _read(resp) == b"{}"
    assert [(n, line[:5]) for n, line in got] == [(1, b"POST "), (2, b"POST "), (2, b"POST ")]


@pytest.mark.parametrize("ctype", [None, "", "textevent-stream", "a, b", "Text/Event-Stream",
                                   "text/event-stream; charset=utf-8", "application/json"])
async def test_media_type_is_aiohttps(session: aiohttp.ClientSession, wires: Wires,
                                      ctype: str | None) -> None:
    """The media type read from an answer's Content-Type is the one aiohttp's own
    response gives, odd values included (the stream check and its message use it)."""
    async def answer(req: bytes) -> bytes:
        header = b"" if ctype is None else b"Content-Type: %b\r\n" % ctype.encode()
        return b"HTTP/1.1 200 OK\r\n" + header + b"Content-Length: 2\r\n\r\n{}"

    _, base = await wires(answer)
    resp = await _send(session, _target(base), b"{}")
    direct = resp.content_type
    await _read(resp)
    async with session.post(base + "/chat/completions", data=b"{}") as r:
        assert direct == r.content_type


@pytest.mark.parametrize("via_proxy", [True, False], ids=["egress-proxy", "direct"])
async def test_a_407_is_the_egress_failing_not_the_clients_request(
        session: aiohttp.ClientSession, wires: Wires, via_proxy: bool) -> None:
    """A forward proxy that refuses our credentials answers a plain-http upstream's
    request itself, with 407: a failure to fail over (as its refused CONNECT is), not
    a client error to pass on with its status (the client would get a 407 it cannot
    act on, and the upstream would count it as a success)."""
    page = b"<html>ERR_CACHE_ACCESS_DENIED</html>"

    async def refuse(req: bytes) -> bytes:
        return (b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Type: text/html\r\n"
                b'Proxy-Authenticate: Basic realm="corp"\r\n'
                b"Content-Length: %d\r\n\r\n%b" % (len(page), page))

    wire, proxy_url = await wires(refuse)
    origin = proxy_url.removesuffix("/v1")
    base = "http://upstream.invalid:8000/v1" if via_proxy else proxy_url
    u = Upstream(name="u", region="r", base_url=base, models={"m": "m"},
                 proxy=origin if via_proxy else None)
    target = upstream.Target(u, base + "/chat/completions", base + "/embeddings",
                             "Bearer sk-up", None, u.proxy)
    with pytest.raises(UpstreamError, match="egress proxy refused it") as e:
        await _send(session, target, b"{}")
    assert e.value.upstream_status is None  # counted as connect_error, as a CONNECT's
    assert len(wire.requests) == 1


async def test_a_failed_status_with_its_body_still_coming_drops_the_connection(
        session: aiohttp.ClientSession, servers: Servers) -> None:
    """A 503 whose body is still coming: send raises, and the connection is closed at
    once (the upstream sees its end), not left open with the answer nobody reads."""
    closed = asyncio.Event()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request_of(r)
        w.write(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nbusy,\r\n")  # and the rest never comes
        await w.drain()
        if await r.read() == b"":
            closed.set()

    target = _target(await servers(serve))
    with pytest.raises(UpstreamError, match="upstream answered 503") as e:
        await _send(session, target, b"{}")
    assert target.direct
    await asyncio.wait_for(closed.wait(), 2.0)
    assert e.value.upstream_status == 503  # (the failure, kept till here)


async def test_a_101_answer_is_the_client_sessions(
        session: aiohttp.ClientSession, servers: Servers) -> None:
    """Of the 1xx answers only those before the answer are skipped: a `101 Switching
    Protocols` is the answer itself, as for aiohttp's own response (which stops its
    1xx loop there), not a wait for another head that never comes."""
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request_of(r)
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
        await w.drain()
        await r.read()

    base = await servers(serve)
    got = []
    async with aiohttp.ClientSession(trust_env=True, auto_decompress=False) as plain:
        for s in (session, plain):  # trust_env: the ClientSession's path
            target = _target(base)
            resp = await asyncio.wait_for(_send(s, target, b"{}"), 2.0)
            assert bool(target.direct) is (s is session)
            got.append(resp.status)
            resp.close()
    assert got == [101, 101]


class _Proto:
    """The part of aiohttp's protocol a StreamReader uses: pause and resume."""

    def __init__(self) -> None:
        self._reading_paused = False
        self.connected = True

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False


def _state(r: aiohttp.StreamReader) -> tuple[Any, ...]:
    return (r._size, r._cursor, list(r._http_chunk_splits or ()), list(r._buffer),
            r._buffer_offset)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=90), st.booleans()), max_size=30),
       st.sampled_from([16, 64, 2 ** 16]))
def test_a_buffered_read_is_readanys(chunks: list[tuple[bytes, bool]], limit: int) -> None:
    """`_take_buffered` takes what aiohttp's `readany` takes, and leaves the reader as
    it does (size, cursor, chunk ends), for any HTTP chunks, read after any of them;
    it leaves a reader whose protocol has paused to readany, which resumes it."""
    assert upstream._TAKE_BUFFERED  # (on this aiohttp, reads of _Direct take this way)
    loop = asyncio.new_event_loop()
    try:
        ours, theirs = (aiohttp.StreamReader(_Proto(), limit, loop=loop),  # type: ignore[arg-type]
                        aiohttp.StreamReader(_Proto(), limit, loop=loop))  # type: ignore[arg-type]
        for r in (ours, theirs):
            r.begin_http_chunk_receiving()
        taken, read = b"", b""
        for data, read_now in [*chunks, (b"", True)]:
            for r in (ours, theirs):
                if data:
                    r.feed_data(data)
                    r.end_http_chunk_receiving()
            if not read_now:
                continue
            if not ours._buffer:  # (readany would wait for more)
                assert upstream._take_buffered(ours) == b""
                continue
            paused = ours._protocol._reading_paused
            before = _state(ours)
            got = upstream._take_buffered(ours)
            if paused:
                assert got == b"" and _state(ours) == before
                got = loop.run_until_complete(ours.readany())
            taken += got
            read += loop.run_until_complete(theirs.readany())
            assert taken == read and _state(ours) == _state(theirs)
        assert taken == b"".join(d for d, _ in chunks)
    finally:
        loop.close()


async def test_a_stream_that_outruns_its_reader_comes_whole(
        session: aiohttp.ClientSession, servers: Servers) -> None:
    """An upstream that sends faster than the proxy reads fills aiohttp's buffer, which
    pauses the connection; the body still comes whole and in order (the read that
    resumes it is aiohttp's own)."""
    events = [b"data: {\"n\": %d, \"pad\": \"%s\"}\n\n" % (i, b"x" * 900) for i in range(600)]

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request_of(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        for ev in events:
            w.write(b"%x\r\n%b\r\n" % (len(ev), ev))
        w.write(b"0\r\n\r\n")
        await w.drain()
        await r.read()

    target = _target(await servers(serve))
    resp = await _send(session, target, b"{}", stream=True)
    assert target.direct
    out, paused = b"", 0
    await asyncio.sleep(0.2)  # (the upstream's ~550 KB are out by now)
    while True:
        paused += resp.content._protocol._reading_paused
        if not (data := await asyncio.wait_for(resp.read_some(), 5.0)):
            break
        out += data
    resp.release()
    assert out == b"".join(events)
    assert paused  # (the case this is about: the buffer's high water was reached)


@pytest.mark.parametrize("wait", [0.0, 0.2])
async def test_a_stream_of_tiny_chunks_that_paused_comes_whole(
        session: aiohttp.ClientSession, servers: Servers, wait: float) -> None:
    """A body of tiny HTTP chunks, 16,385 of them in one write (aiohttp's chunk-count
    limit, which pauses the connection), then the rest: after that pause aiohttp's
    parser keeps the bytes of a later read back until the reader resumes it once per
    chunk it takes; taking the buffer in one step without that stalled the body there,
    until the stream's idle timeout (review 17A)."""
    body = b"".join(b"data: {\"n\": %d}\n\n" % i for i in range(1500))
    chunks = [b"1\r\n%b\r\n" % body[i:i + 1] for i in range(len(body))]

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _request_of(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(chunks[:16385]))
        await w.drain()
        await asyncio.sleep(0.3)
        w.write(b"".join(chunks[16385:]) + b"0\r\n\r\n")
        await w.drain()
        await r.read()

    target = _target(await servers(serve))
    resp = await _send(session, target, b"{}", stream=True)
    assert target.direct
    await asyncio.sleep(wait)
    out = b""
    while data := await asyncio.wait_for(resp.read_some(), 3.0):
        out += data
    resp.release()
    assert out == body
