"""Request handling: check, route, fail over, relay (SPEC §1, §1.1, §2, §3).

A request is checked and routed, then tried on its candidates in carbon order until
one answers; retries happen only before the first byte reaches the client. Answers
get their `lowrouter` object: spliced into a JSON body, or added to the last chunk of a
stream, whose other events pass through byte for byte.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import orjson
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict, CIMultiDictProxy

from lrproxy import eco, errors, limits, protocol, sse, upstream
from lrproxy.app import Rec, Runtime, State, finish_headers, send_continue, server_timing
from lrproxy.log import MAIN
from lrproxy.routing import Candidate, order_candidates, pick_candidates

log = logging.getLogger(MAIN)
# A JSON answer is held whole (its usage read, `lowrouter` added): up to this. The
# largest OpenAI answers, 2048 embeddings of 3072 floats, are ~145 MB as text.
MAX_UPSTREAM_BODY: Final = 256 * 1024 * 1024
# No next attempt with less of timeouts.total left: it could only time out, and the
# upstream would be charged a failure that was the request's (nginx's
# proxy_next_upstream_timeout stops likewise).
MIN_ATTEMPT_S: Final = 0.05
MAX_EVENT_BYTES: Final = 16 * 1024 * 1024  # one SSE event; no chunk of an LLM stream is near it
KEEPALIVE_EVENT: Final = b": keep-alive\n\n"
# Once a stream's events have carried an `id:` field, a blank line with no field of its
# own is an event to the OpenAI SDK (it keeps the last id), with empty data that it
# fails to parse: the comment then goes without a blank line, into the next event.
KEEPALIVE_LINE: Final = b": keep-alive\n"
LATE_MESSAGE_CHARS: Final = 1000  # of an upstream's error message quoted in an error event
DONE_EVENT: Final = b"data: [DONE]\n\n"
_STREAM_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


# ---------------------------------------------------------------------------------------
# the request


def _body_now(request: web.Request, st: State) -> bytes | None:
    """Check the body's length and encoding; the body when it came with the headers
    (usual for a small one), else None for `_read_body` (no coroutine on the usual path)."""
    limit = st.config.server.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise errors.RequestTooLarge(f"Request body over the limit of {limit} bytes.")
    headers = request.headers
    # (a Transfer-Encoding comes without Content-Length: aiohttp refuses both at once)
    if "Content-Encoding" in headers or (length is None and "Transfer-Encoding" in headers):
        _check_codings(headers)
    content = request.content
    if length is not None and content.is_eof():
        return content.read_nowait()
    return None


def _check_codings(headers: CIMultiDictProxy[str]) -> None:
    """Refuse a compressed body (no gzip bombs): a Content-Encoding, in any of its
    headers, or a transfer coding but chunked (`Transfer-Encoding: gzip, chunked`)."""
    for name, allowed in (("Content-Encoding", ("identity", "")), ("Transfer-Encoding",
                                                                  ("chunked", "identity", ""))):
        for value in headers.getall(name, ()):
            for coding in value.split(","):
                if coding.strip().lower() not in allowed:
                    raise errors.UnsupportedMediaType(
                        f"{name} '{errors.printable(value.strip()[:32])}' is not accepted; "
                        "send the body uncompressed.")


async def _read_body(request: web.Request, st: State) -> bytes:
    """The rest of a body that did not come with the headers, within the limits."""
    limit = st.config.server.max_body_bytes
    content = request.content
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(st.config.timeouts.client_body):
            await send_continue(request)  # the key, length and encoding have passed
            while data := await content.readany():
                size += len(data)
                if size > limit:
                    raise errors.RequestTooLarge(f"Request body over the limit of {limit} bytes.")
                chunks.append(data)
    except TimeoutError as e:
        raise errors.RequestTimeout("The request body did not arrive in time.") from e
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _as_sent(payload: bytes, obj: dict[str, Any], body: bytes) -> bytes:
    """`payload`, or where the client wrote an integer beyond 64 bits (which orjson
    reads as a float, and writes as one: `1.2345678901234568e+29`), the body with each
    number as the client wrote it (SPEC §2: forwarded as sent) and what the relay sets
    (`_parse_body`, `model`) set, by the standard library's json, exact but slower."""
    at = payload.find(b"e+")
    while at >= 0 and not payload[at - 1:at].isdigit():  # "e+" in text
        at = payload.find(b"e+", at + 2)
    sent = _exact_loads(body) if at >= 0 else None
    if sent is None:
        return payload  # (no "e+" after a digit, or a float of the client's own)
    sent.pop("route", None)
    sent["model"] = obj["model"]
    so = obj.get("stream_options")
    if "stream_options" not in obj:  # (taken out for an upstream that refuses it)
        sent.pop("stream_options", None)
    elif isinstance(so, dict):  # a stream's: the client's members as written, but ours
        exact = sent.get("stream_options")
        if not isinstance(exact, dict):
            exact = {}
        sent["stream_options"] = {k: exact[k] if k in exact and k != "include_usage"
                                  else v for k, v in so.items()}
    # (else a request that does not stream: the client's value, untouched)
    return _exact_dumps(sent)


def _exact_loads(body: bytes) -> dict[str, Any] | None:
    """The body read by the standard library's json, when it is strict JSON holding an
    integer orjson cannot (beyond 64 bits: orjson makes a float of it; over 309 digits:
    an infinite float, refused); None for anything else: NaN, Infinity, 1e999 stay
    refused, and a body without such an integer is orjson's to read."""
    def refuse(word: str) -> None:
        raise ValueError(word)

    try:
        obj = json.loads(body.decode(), parse_constant=refuse)  # (UTF-8 only, no BOM)
        if (isinstance(obj, dict) and _holds(obj, _beyond_64_bits)
                and not _holds(obj, _infinite)):
            _exact_dumps(obj)  # (a lone surrogate, which orjson refuses, cannot be written)
            return obj
    except (ValueError, RecursionError):
        pass
    return None


def _exact_payload(obj: dict[str, Any]) -> bytes:
    """What orjson could not write: `obj` holding one of _exact_loads' integers, by the
    standard library's json; else, nested over 254 levels, a 400."""
    try:
        if _holds(obj, _beyond_64_bits):
            return _exact_dumps(obj)
    except (ValueError, RecursionError):
        pass
    raise errors.InvalidRequest(
        "The request body is nested too deeply to forward (over 254 levels).")


def _exact_dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _beyond_64_bits(value: Any) -> bool:
    return type(value) is int and not -(1 << 63) <= value < 1 << 64


def _infinite(value: Any) -> bool:
    return type(value) is float and not math.isfinite(value)


def _holds(value: Any, pred: Callable[[Any], bool]) -> bool:
    """Whether `value` or any value inside it (its objects' and arrays') is `pred`'s."""
    if isinstance(value, dict):
        return any(_holds(v, pred) for v in value.values())
    if isinstance(value, list):
        return any(_holds(v, pred) for v in value)
    return pred(value)


def _parse_body(body: bytes, chat: bool, headers: CIMultiDictProxy[str]) -> tuple[
    dict[str, Any], str, str | None, bool, bool, str
]:
    """(body object, model id, region pin, stream, client asked for usage, where the pin
    came from: `route.region` or the header, for errors' `param`); raises 400s."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        obj = _exact_loads(body)  # an integer orjson cannot read (over 309 digits)
        if obj is None:
            raise errors.InvalidRequest("The request body is not valid JSON.") from e
    if not isinstance(obj, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise errors.InvalidRequest("'model' must be a non-empty string.", param="model")
    if chat:
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise errors.InvalidRequest("'messages' must be a non-empty array.", param="messages")
        for m in msgs:  # a loop: all() of a generator resumes it once per message
            if not isinstance(m, dict):
                raise errors.InvalidRequest("Each message must be an object.", param="messages")
    else:
        inp = obj.get("input")
        if not isinstance(inp, str | list) or not inp:
            raise errors.InvalidRequest("'input' must be a string or a non-empty array.",
                                        param="input")
    stream = obj.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise errors.InvalidRequest("'stream' must be a boolean.", param="stream")
    if stream and not chat:
        raise errors.InvalidRequest("Embeddings do not stream.", param="stream")
    region = None
    if "route" in obj:
        route = obj.pop("route")
        if route is not None:
            if not isinstance(route, dict):
                raise errors.InvalidRequest("'route' must be an object.", param="route")
            for k in route:
                if k != "region":
                    raise errors.InvalidRequest(f"Unknown field 'route.{str(k)[:40]}'.",
                                                param=f"route.{str(k)[:40]}")
            r = route.get("region")
            if r is not None:
                if not isinstance(r, str) or not r:
                    raise errors.InvalidRequest("'route.region' must be a non-empty string.",
                                                param="route.region")
                region = r  # the body wins over the header (SPEC §2)
    pin = "route.region"
    if region is None:
        region = headers.get(REGION_HEADER)
        if region is not None:
            _check_region_header(region, headers)
            pin = REGION_HEADER
    client_usage = False
    if stream:
        so = obj.get("stream_options")
        if so is None:
            so = {}
        elif not isinstance(so, dict):
            raise errors.InvalidRequest("'stream_options' must be an object.",
                                        param="stream_options")
        asked = so.get("include_usage")  # null as absent, as for `stream`
        if asked is not None and not isinstance(asked, bool):  # the upstream, sent `true`,
            # cannot say so: the client would get no usage chunk, and no word why
            raise errors.InvalidRequest("'stream_options.include_usage' must be a boolean.",
                                        param="stream_options.include_usage")
        client_usage = asked is True
        obj["stream_options"] = {**so, "include_usage": True}  # we always count (SPEC §1.1)
    return obj, model, region, stream, client_usage, pin


REGION_HEADER: Final = "X-LowRouter-Region"


def _check_region_header(region: str, headers: CIMultiDictProxy[str]) -> None:
    """A pin by header must name one region: an empty value (an unset variable in the
    client's `default_headers`), or copies that differ (one added on the way), would
    otherwise pin nothing, or the first copy only (SPEC §2)."""
    if not region:
        raise errors.InvalidRequest(f"The {REGION_HEADER} header is empty; name a region, "
                                    "or send no such header.", param=REGION_HEADER)
    if len(values := headers.getall(REGION_HEADER)) > 1 and any(v != region for v in values):
        raise errors.InvalidRequest(f"The {REGION_HEADER} header is given more than once, "
                                    "with different regions.", param=REGION_HEADER)


def _prompt_chars(obj: dict[str, Any], chat: bool) -> int:
    """Characters of prompt text, for estimating tokens when the upstream sends no usage:
    the messages' text, the names and arguments of their tool calls, and the tools'
    definitions (an agent's prompt is often mostly these)."""
    if not chat:
        inp = obj.get("input")
        items = inp if isinstance(inp, list) else [inp]
        return sum(len(i) if isinstance(i, str) else 4 * len(i) if isinstance(i, list) else 4
                   for i in items)
    total = 0
    for m in obj.get("messages", ()):
        total += 16  # role and message framing
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):  # text parts (a client's `text: 5` counts nothing)
            for p in content:
                text = p.get("text") if isinstance(p, dict) else None
                if isinstance(text, str):
                    total += len(text)
        if isinstance(calls := m.get("tool_calls"), list):
            for call in calls:
                if isinstance(call, dict):
                    total += _call_chars(call.get("function"))
        if (call := m.get("function_call")) is not None:  # the older single-call shape
            total += _call_chars(call)
    for key in ("tools", "functions"):  # as the JSON they came in, near what models read
        if (defs := obj.get(key)) and isinstance(defs, list):
            try:
                total += len(orjson.dumps(defs))
            except TypeError:  # an integer beyond 64 bits (_exact_loads), or nested past
                total += len(_exact_dumps(defs))  # orjson's 255 levels with one: as sent
    return total


@attrs.define(slots=True)
class _Attempt:
    """A candidate that answered: what to relay."""

    cand: Candidate
    resp: upstream.UpstreamResponse
    body: bytes = b""  # a whole JSON answer (non-streaming, or an error to pass through)
    doc: dict[str, Any] | None = None  # the answer's JSON object, for a success
    splitter: sse.EventSplitter | None = None  # a stream's; with its tail and first bytes
    tail: _Tail | None = None
    first: bytes = b""  # what the stream's first events give the client
    got_event: bool = False
    t_sent: float = 0.0
    trial: bool = False  # the one request let through to an ejected upstream
    # the upstream key this attempt sent (its config's, not the one a reload has since
    # put in): an answer quoting it is withheld
    secret: bytes = b""
    held: upstream.Health | None = None  # what pool.acquire counted it on, for release


class _Committed(Exception):
    """An attempt failed after the client got its 200 (`_EarlyCommit`, in `rec.out`): no
    failover, the stream ends with the §1.1 error event; `attempt`, a stream that failed
    in its first events, has the events before the failure and what they counted."""

    def __init__(self, error: errors.ProxyError, cand: Candidate,
                 attempt: _Attempt | None = None) -> None:
        super().__init__(error.message)
        self.error, self.cand, self.attempt = error, cand, attempt


class _Refused(Exception):
    """An error event with a client error's code (400, 404, 413, 422, ...) before a
    stream's first event: the upstream refused the request itself (vLLM's invalid
    guided-decoding schema, a context too long), which no other upstream would take
    either. Answered as its 4xx answer would be (SPEC §1: passed through): that status
    and its error object, counted `passed_4xx`, no failover, not the upstream's failure."""

    def __init__(self, status: int, said: Any, secret: bytes) -> None:
        super().__init__(status)
        self.status = status
        body = orjson.dumps({"error": said["error"]})  # (decoded: an escaped quote shows)
        if secret and secret in body:
            body = errors.error_body(
                "The upstream's error message was withheld: it quoted the proxy's credentials.",
                "invalid_request_error", "upstream_error")
        self.body = body


def _refusal_status(said: Any) -> int | None:
    """The 4xx an in-stream error object gives as its `code` (vLLM and OpenRouter send
    the HTTP status there), but 401, 403 and 429, which are the upstream's own state."""
    err = said.get("error") if isinstance(said, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    if isinstance(code, str) and len(code) == 3 and code.isdigit():
        code = int(code)
    if (isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 500
            and code not in (401, 403, 429)):
        return code
    return None


class _EarlyCommit:
    """A stream whose upstream is slow to send even its headers: once the client has
    heard nothing for `keepalive` seconds, it gets its 200 and a `: keep-alive` comment
    every `keepalive` seconds while the wait goes on (SPEC §1.1), from a task of its own,
    as the request's task is waiting in the upstream call. The response is `rec.out`.
    Once it has fired there is no failover. `stop()` is synchronous: the beat writes only
    in whole steps (prepare and a write, or a write), so once cancelled it writes nothing
    more."""

    __slots__ = ("_cand", "_keepalive", "_rec", "_request", "_rt", "_t_sent", "_task",
                 "_timer")

    def __init__(self, request: web.Request, rt: Runtime, rec: Rec, cand: Candidate,
                 t_sent: float, delay: float, keepalive: float) -> None:
        self._request, self._rt, self._rec, self._cand = request, rt, rec, cand
        self._t_sent, self._keepalive = t_sent, keepalive
        self._task: asyncio.Task[None] | None = None
        loop = rt.loop or asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        task = (self._rt.loop or asyncio.get_running_loop()).create_task(self._beat())
        task.add_done_callback(_beat_ended)
        self._task = task

    async def _beat(self) -> None:
        rec, cand = self._rec, self._cand
        rec.upstream, rec.region, rec.model = cand.upstream.name, cand.region.name, cand.model.id
        out = rec.out = _stream_response(self._rt, rec, time.perf_counter() - self._t_sent,
                                         self._request)
        await out.prepare(self._request)
        rec.ttfb = time.perf_counter() - rec.t0
        while True:
            await out.write(KEEPALIVE_EVENT)
            await asyncio.sleep(self._keepalive)

    def stop(self) -> bool:
        """End the keep-alives; True if the client's 200 has gone (`rec.out`)."""
        if self._timer is not None:  # it has not fired: the usual case
            self._timer.cancel()
            self._timer = None
            return False
        if self._task is not None:
            self._task.cancel()
            self._task = None
        out = self._rec.out
        return out is not None and out.prepared


def _beat_ended(task: asyncio.Task[None]) -> None:
    """Cancelled (the usual end), or the client gone; anything else is a bug of ours."""
    if not task.cancelled() and not isinstance(task.exception(), ConnectionResetError | None):
        log.error("keep-alive task failed", exc_info=task.exception())


async def _relay(request: web.Request, rt: Runtime, rec: Rec, chat: bool) -> web.StreamResponse:
    st = rt.state  # one snapshot for the whole request (reloads swap rt.state)
    rec.api = True
    rec.key = key = st.authenticate(request.headers)
    rec.total_s = st.config.timeouts.total
    # The global in-flight cap and the key's rate: a fast 429, never a queue.
    if len(rt.tasks) > st.config.server.max_inflight:
        raise errors.RateLimited("The proxy is at its limit of requests in flight; retry shortly.",
                                 retry_after=1)
    bucket = rt.buckets.get(key)
    if bucket is not None:
        wait = bucket.take(time.monotonic())
        if wait:
            raise errors.RateLimited(f"Rate limit of key '{key}' reached; retry shortly.",
                                     retry_after=wait)
    body = _body_now(request, st)
    if body is None:
        body = await _read_body(request, st)
    obj, model_id, region, stream, client_usage, pin = _parse_body(body, chat, request.headers)
    rec.stream = stream
    if model_id in st.table.by_model:
        rec.model = model_id
    if region in st.regions:
        rec.region = region
    cands = st.table.by_model.get(model_id) if region is None else None
    if not cands:  # a pinned region, or an error to raise: pick_candidates says which
        cands = pick_candidates(st.table, model_id, region, pin)
    try:
        attempt = await _try_candidates(request, rt, st, rec, obj, body, cands, chat, stream,
                                        client_usage)
    except _Refused as r:  # as an upstream's 4xx answer (`_answer`)
        rec.error = "upstream_4xx"
        return web.Response(status=r.status, body=r.body,
                            headers=_answer_headers(rt, rec, stream=False))
    except _Committed as c:  # the client has its 200 and keep-alives: the error event
        assert rec.out is not None
        tail, error, first = _Tail(), c.error, b""
        if c.attempt is not None and c.attempt.tail and c.attempt.tail.failure is not None:
            # an event failed it in its first read of events: those before it go on as
            # they came, and count, as in a later read (_relay_stream)
            tail, first = c.attempt.tail, c.attempt.first
            error = _failure(tail, c.attempt.secret)
        await _stream_error(rt, rec, _prompt_chars(obj, chat), c.cand, region, tail,
                            error, rec.out, request, first)
        return rec.out
    cand = attempt.cand
    try:  # from here on, the upstream's place is released whatever happens
        # What the answer still needs of the request; a long stream need not keep the
        # parsed request (often the whole conversation) alive.
        prompt_chars = _prompt_chars(obj, chat)
        del body, obj
        if rec.out is not None and attempt.splitter is None:
            # Committed early, then a JSON answer (an error for a stream request): the
            # status has gone, so the error event says what came.
            attempt.resp.close()
            rec.upstream_s = time.perf_counter() - attempt.t_sent
            await _stream_error(rt, rec, prompt_chars, cand, region, _Tail(),
                                errors.UpstreamError(_late_status(attempt)), rec.out, request)
            return rec.out
        if attempt.splitter is not None:
            return await _relay_stream(request, rt, st, rec, prompt_chars, attempt, region)
        return _answer(rt, rec, prompt_chars, attempt, region, chat)
    finally:
        rt.pool.release(attempt.held)


# The handlers are the relay's coroutine itself, not one awaiting it: each coroutine in
# the chain is resumed at every wake-up of the request (py-spy: ~7 µs a request under
# paced load). partial: a C call, no frame of its own.
chat_completions: Final = functools.partial(_relay, chat=True)
embeddings: Final = functools.partial(_relay, chat=False)


async def _try_candidates(
    request: web.Request, rt: Runtime, st: State, rec: Rec, obj: dict[str, Any],
    body: bytes, cands: tuple[Candidate, ...], chat: bool, stream: bool, client_usage: bool,
) -> _Attempt:
    """Send to candidates in order until one answers (SPEC §2); raise the last failure."""
    pool = rt.pool
    now = time.monotonic()
    if len(cands) == 1:  # the usual case: no ordering to do, nor its calls
        order = list(cands) if pool.usable(cands[0].upstream.name, now) else []
    else:
        order = order_candidates(cands, lambda n: pool.usable(n, now), pool.load,
                                 lambda n: pool.last_resort(n, now))
    if not order:
        raise errors.NoUpstreamAvailable(
            "No upstream may be tried for this request right now.",
            retry_after=pool.retry_after((c.upstream.name for c in cands), now),
        )
    tmo = st.config.timeouts
    deadline = now + tmo.total
    # A stream's client hears something every `keepalive` seconds, however many
    # attempts its wait takes (_EarlyCommit).
    beat_at = now + tmo.keepalive if stream else math.inf
    tried: list[str] = []
    last: errors.UpstreamFailed | None = None
    soonest: float | None = None  # the earliest Retry-After of the upstreams' 429s
    # A stream's stream_options, usage asked for (by the proxy, or the client)
    asked = obj.get("stream_options") if stream else None
    for n in range(st.config.server.retries + 1):
        if n and not limits.retry_allowed(rt.retries_in_progress, len(rt.tasks)):
            break  # the retry budget is spent: answer with the last failure
        if n and deadline - time.monotonic() < MIN_ATTEMPT_S:
            break  # timeouts.total is spent: no upstream is tried (and charged) with none
        cand = _next_candidate(order, tried, pool, time.monotonic() if n else None)
        if cand is None:
            break
        obj["model"] = cand.upstream_model
        if asked is not None:
            if cand.upstream.stream_usage:
                obj["stream_options"] = asked
            # An upstream that refuses the field gets the client's other members only (a
            # client that asked reads the usage it sends unasked, as from it directly:
            # Mistral's on its finish chunk)
            elif rest := {k: v for k, v in asked.items() if k != "include_usage"}:
                obj["stream_options"] = rest
            else:
                obj.pop("stream_options", None)
        try:
            payload = orjson.dumps(obj)
        except orjson.JSONEncodeError:  # orjson reads JSON 1024 levels deep, writes 254
            payload = _exact_payload(obj)
        if payload.find(b"+") >= 0:  # (a float of 1e16 or more, or text: rare; a memchr)
            payload = _as_sent(payload, obj, body)
        name = cand.upstream.name
        tried.append(name)
        rec.attempts += 1
        # routed: an answer that ends here, a failure too, says where it went (SPEC §1)
        rec.upstream, rec.region, rec.model = name, cand.region.name, cand.model.id
        held, trial = pool.acquire(name, time.monotonic())
        target = st.targets[name]
        t_sent = time.perf_counter()
        now = time.monotonic()
        first_byte = min(tmo.first_byte, deadline - now)
        early = (_EarlyCommit(request, rt, rec, cand, t_sent, max(0.0, beat_at - now),
                              tmo.keepalive)
                 if beat_at < now + first_byte else None)
        rt.retries_in_progress += n > 0
        failed_stream: _Attempt | None = None  # one that failed in its first events
        try:
            resp = await upstream.send(
                rt.session, target, chat, stream,  # type: ignore[arg-type]  # (cleanup_ctx)
                payload, rec.request_id, rt.deadlines, first_byte, st.client_timeout,
            )
            attempt = _Attempt(cand, resp, t_sent=t_sent, trial=trial, held=held,
                               secret=target.secret)
            if stream and resp.status == 200 and resp.content_type == "text/event-stream":
                # first_byte runs from the request's sending to the first event (SPEC §4)
                left = first_byte - (time.perf_counter() - t_sent)
                failed_stream = attempt
                await _first_events(attempt, rt.deadlines, left, tmo.keepalive, client_usage)
            elif stream and resp.status < 300:
                # A JSON body here would reach the SDK's stream loop as no chunks at all,
                # with no error: a failure of this upstream, as a malformed event is.
                resp.close()
                ctype = resp.content_type
                raise errors.UpstreamBadResponse(
                    f"the upstream answered a stream request with {resp.status}, not 200"
                    if ctype == "text/event-stream" else
                    "the upstream answered a stream request without an event stream "
                    f"({ctype or 'no content type'})")
            else:
                answer = _answer_now(resp, chat)
                if answer is None:  # the body comes after the headers: read it as it comes
                    answer = await _read_answer(
                        resp, chat, first_byte - (time.perf_counter() - t_sent), tmo.idle,
                        deadline - time.monotonic())
                attempt.body, attempt.doc = answer
        except _Refused as r:
            rec.upstream_s = (rec.upstream_s or 0.0) + time.perf_counter() - t_sent
            pool.succeeded(name, trial, held)  # it answered: the request was the fault
            pool.release(held)
            committed = early is not None and early.stop()
            rt.metrics.attempt(name, "passed_4xx")  # (committed or not: a success)
            if committed:  # the client has its 200: the error event says what came
                raise _Committed(errors.UpstreamBadResponse(_upstream_said(
                    _INNER_ERROR, orjson.loads(r.body), b"")), cand) from None
            raise
        except errors.UpstreamFailed as e:
            rec.upstream_s = (rec.upstream_s or 0.0) + time.perf_counter() - t_sent
            pool.release(held)
            now = time.monotonic()
            # A wait cut short: under nine tenths of a first attempt's time, the request's
            # earlier attempts took it (never a first attempt: its body's making may take
            # a few ms of a short total; nor a retry after a failure that came at once).
            cut_short = n > 0 and first_byte < 0.9 * min(tmo.first_byte, tmo.total)
            if ((cut_short and isinstance(e, errors.UpstreamTimeout)
                 and now >= deadline - 0.005) or isinstance(e, errors.UpstreamTooLarge)):
                # timeouts.total ran out in a wait that the request's earlier attempts
                # had cut short (a first attempt's timeout, with all the time any
                # attempt gets, is its upstream's failure), or its answer is over the
                # proxy's cap: not this upstream's failure
                if trial:
                    pool.abandoned(name, held)
            else:
                if isinstance(e, errors.UpstreamAuthFailed):
                    pool.auth_refused(name, e.upstream_status)
                pool.failed(name, now, e.retry_after, trial, held, _failure_kind(e))
            committed = early is not None and early.stop()
            rt.metrics.attempt(name, ("stream_" if committed else "") + _outcome(e))
            if committed:  # the client has its 200: no failover (SPEC §1.1)
                raise _Committed(e, cand, failed_stream) from None
            if isinstance(e, errors.UpstreamTooLarge):
                raise  # as large from any upstream: no failover
            last = e.with_traceback(None)  # (its traceback holds this frame: a cycle)
            if e.upstream_status == 429 or isinstance(e, _NOT_AGAIN):
                # Retried on a different upstream only: after a 429 (SPEC §2), a timeout
                # or a refused key the same limit, wait or refusal would come again (a
                # region's only upstream, hung, would cost a first_byte per retry), as
                # nginx never retries a server within a request
                order = [c for c in order if c.upstream.name != name]
                if e.retry_after is not None and e.upstream_status == 429:
                    soonest = e.retry_after if soonest is None else min(soonest, e.retry_after)
            continue
        except BaseException as exc:  # the client gone, the drain, a bug of ours
            pool.release(held)
            if trial:
                pool.abandoned(name, held)
            task = asyncio.current_task(rt.loop)
            # (asked, not taken back: the edge answers the drain's 503 when nothing has
            # gone to the client yet)
            gone = (isinstance(exc, asyncio.CancelledError)
                    and (task is None or not rt.by_drain(task)))
            rt.metrics.attempt(name, "client_closed" if gone else "cancelled")
            if early is None or not early.stop():
                raise
            if not isinstance(exc, asyncio.CancelledError):
                raise _Committed(_bug_in_stream(rec), cand) from None
            if task is None or not rt.ended_by_drain(task):
                raise  # the client has gone
            raise _Committed(_drain_ends_stream(), cand) from None
        finally:
            rt.retries_in_progress -= n > 0
        if early is not None:
            early.stop()
        if attempt.splitter is None:  # a stream's verdict and outcome come at its end
            pool.succeeded(name, trial, held)
            rt.metrics.attempt(name, "ok" if resp.status < 400 else "passed_4xx")
        return attempt
    if last is None:  # (the first candidate is only ever passed over for capacity)
        pool.at_capacity(tuple(sorted({c.upstream.name for c in order})))
        raise errors.NoUpstreamAvailable(
            "Every upstream for this request is at capacity.", retry_after=1
        )
    if last.upstream_status == 429:  # every upstream tried is rate-limiting us: say so
        raise errors.RateLimited("The upstream providers are rate-limiting this request; "
                                 "retry later.", retry_after=1 if soonest is None else soonest)
    try:
        raise last
    finally:  # (else the frame in its traceback holds it: a cycle of the whole attempt's
        last = None  # state, for the cyclic GC; so in upstream.send)


# Failures after which a request does not try the same upstream again (see above)
_NOT_AGAIN: Final = (errors.UpstreamTimeout, errors.UpstreamAuthFailed)


def _next_candidate(order: list[Candidate], tried: list[str], pool: upstream.Pool,
                    now: float | None) -> Candidate | None:
    """The first candidate with room on an upstream not tried yet; else one tried already.

    With `now` (a retry), only upstreams usable now: the order was made before the
    earlier attempts, and an upstream ejected since is not tried in its cool-down.
    """
    fallback = None
    health, capacity = pool.health, pool.capacity
    for c in order:
        name = c.upstream.name
        h = health.get(name)  # room on it: the pool's own count, read without a call
        if h is not None and h.outstanding >= capacity[name]:
            continue
        if now is not None and not pool.usable(name, now):
            continue
        if name not in tried:
            return c
        if fallback is None:
            fallback = c
    return fallback


def _too_large() -> errors.UpstreamTooLarge:
    return errors.UpstreamTooLarge(
        f"The upstream's answer is over {MAX_UPSTREAM_BODY >> 20} MiB, the most the proxy "
        "holds; ask for less (fewer inputs, or encoding_format \"base64\").")


def _failure_kind(e: errors.UpstreamFailed) -> str:
    """A failure's kind for the log, with the upstream's status: words of ours only."""
    return _outcome(e) if e.upstream_status is None else f"{_outcome(e)} {e.upstream_status}"


def _outcome(e: errors.UpstreamFailed) -> str:
    if isinstance(e, errors.UpstreamTimeout):
        return "timeout"
    if isinstance(e, errors.UpstreamAuthFailed):
        return "auth_failed"
    if isinstance(e, errors.UpstreamBadResponse):
        return "bad_response"
    if isinstance(e, errors.UpstreamConnectionLost):
        return "connection_lost"
    s = e.upstream_status
    if s is None:
        return "connect_error"
    if s == 429:
        return "rate_limited"
    return "redirect" if s < 400 else "status_5xx"


async def _read_answer(
    resp: upstream.UpstreamResponse, chat: bool, first_byte: float, idle: float, total: float,
) -> tuple[bytes, dict[str, Any] | None]:
    """The whole answer and, for a success, its JSON object; raises UpstreamFailed.

    The body's first bytes must come within `first_byte` seconds, each next ones within
    `idle` of the last, and all of it within `total` (SPEC §4's timeouts, as for a stream).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + total
    chunks: list[bytes] = []
    size = 0
    wait = first_byte
    try:
        while True:
            try:
                async with asyncio.timeout(min(wait, end - loop.time())):
                    data = await resp.read_some()
            except TimeoutError:
                raise errors.UpstreamTimeout(
                    "upstream did not finish its answer in time" if chunks
                    else "upstream sent no answer in time") from None
            if not data:
                break
            size += len(data)
            if size > MAX_UPSTREAM_BODY:
                raise _too_large()
            chunks.append(data)
            wait = idle
    except BaseException:  # a failure, or the client gone: the upstream stops at once
        resp.close()
        raise
    return _answer_doc(resp, b"".join(chunks), chat)


def _answer_now(
    resp: upstream.UpstreamResponse, chat: bool,
) -> tuple[bytes, dict[str, Any] | None] | None:
    """`_read_answer` without its coroutine when the whole answer has already arrived
    (the usual case for a JSON answer), else None."""
    try:
        data = resp.read_complete()
        if data is None:
            return None
        if len(data) > MAX_UPSTREAM_BODY:
            raise _too_large()
    except BaseException:
        resp.close()
        raise
    return _answer_doc(resp, data, chat)


def _answer_doc(
    resp: upstream.UpstreamResponse, data: bytes, chat: bool,
) -> tuple[bytes, dict[str, Any] | None]:
    resp.release()
    if resp.status >= 300:
        return data, None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise errors.UpstreamBadResponse("upstream answered with a body that is not JSON") from e
    if not isinstance(doc, dict):
        raise errors.UpstreamBadResponse("upstream answered with a body that is not an object")
    if (b'"error"' in data or b"\\u" in data) and (  # (one or two C searches: the usual
            # answer has neither; "\u0065rror" would hide the key from the first)
            # (an embeddings answer's data beside an error member: its vectors came)
            (sse.error_object(doc, answer=True) and (chat or not doc.get("data")))
            or _failed_choice(doc.get("choices"))):
        # a failed generation some servers answer with 200 (OpenRouter), with choices
        # (`finish_reason: "error"`) or without: a failure of this attempt, as the same
        # object inside a stream is (and, as after a 5xx, its words stay here)
        raise errors.UpstreamBadResponse("the upstream answered 200 with an error object")
    return data, doc


def _failed_choice(choices: Any) -> bool:
    """Whether an answer's choices hold one that ended with `finish_reason: "error"`."""
    if isinstance(choices, list):
        for c in choices:
            if isinstance(c, dict) and c.get("finish_reason") == "error":
                return True
    return False


async def _first_events(
    attempt: _Attempt, deadlines: upstream.Deadlines, first_byte: float, keepalive: float,
    client_usage: bool,
) -> None:
    """Read until the stream's first event (SPEC §1.1: the status waits for it).

    Past `keepalive` seconds of silence the caller commits and sends keep-alive comments
    (no failover after that); past `first_byte` the attempt has failed.
    """
    splitter = attempt.splitter = sse.EventSplitter()
    tail = attempt.tail = _Tail(client_usage=client_usage)
    resp = attempt.resp
    try:
        with deadlines.timeout(min(first_byte, keepalive)):
            while not attempt.got_event:
                data = await resp.read_some()
                if not data:
                    raise errors.UpstreamBadResponse("upstream ended the stream before any event")
                out, events = _take(data, splitter, tail)
                if tail.failure is not None:  # nothing has reached the client: fail over
                    attempt.first += out  # (or, committed early, what goes before the error)
                    status = None if tail.began() else _refusal_status(tail.said)
                    if status is not None:  # … unless the request was the fault (its first
                        raise _Refused(status, tail.said, attempt.secret)  # event: not
                    raise tail.failure  # a failure after tokens, which vLLM codes 400 too)
                if out and len(attempt.first) > MAX_EVENT_BYTES:  # comments, comments…
                    raise errors.UpstreamBadResponse(
                        "the upstream sent over 16 MiB of comments before its first event")
                if len(splitter.held) > MAX_EVENT_BYTES:  # as between events (_relay_stream)
                    raise errors.UpstreamBadResponse("the upstream sent an event over 16 MiB")
                attempt.first += out
                attempt.got_event = events > 0 and tail.began()
    except TimeoutError:
        if resp.gone():  # its framing broke (upstream.gone): fail over
            resp.close()
            raise errors.UpstreamConnectionLost("upstream connection lost") from None
        if keepalive < first_byte:
            return  # silent for the keep-alive time: commit and wait on in the relay
        resp.close()
        raise errors.UpstreamTimeout("upstream sent no event in time") from None
    except BaseException:  # a failure, or the client gone: the upstream stops at once
        resp.close()
        raise


# ---------------------------------------------------------------------------------------
# answers


def _lowrouter(
    rt: Runtime, rec: Rec, cand: Candidate, region_pin: str | None,
    prompt: int, completion: int, measured: bool,
) -> dict[str, Any]:
    """The §3 object; also books the figures on `rec` for the metrics, so both agree."""
    # The region as the request's own config has it, its own feed's reading included:
    # a reload mid-stream changes nothing (rt.reading, inline).
    feed = cand.region.intensity_feed
    reading = None if feed is None else rt.readings.get(feed)
    intensity = (cand.static_intensity if reading is None
                 else eco.current_intensity(cand.region, reading, rt.clock()))
    figures = eco.eco_figures(
        cand.model, cand.region, intensity, prompt, completion, tokens_measured=measured,
    )
    rec.prompt, rec.completion = prompt, completion
    rec.energy_wh, rec.carbon_g = figures["energy_wh"], figures["carbon_g"]
    return {
        "eco": figures,
        "route": {
            "model": cand.model.id, "region": cand.region.name, "upstream": cand.upstream.name,
            "pinned": region_pin is not None, "attempts": rec.attempts,
        },
        "request_id": rec.request_id,
    }


def _answer(
    rt: Runtime, rec: Rec, prompt_chars: int, attempt: _Attempt, region: str | None,
    chat: bool,
) -> web.Response:
    """A whole JSON answer: eco spliced into a success, a client error passed through."""
    resp, data = attempt.resp, attempt.body
    rec.upstream_s = time.perf_counter() - attempt.t_sent
    headers = _answer_headers(rt, rec, stream=False)
    if resp.status >= 300:  # an upstream 4xx (bad parameters, context too long): as it is
        rec.error = "upstream_4xx"
        secret = attempt.secret  # … unless it quotes our key (issue 5: no key anywhere)
        doc = _json_object(data)
        # (in its bytes, or once decoded: `\/` for `/`, as PHP's json_encode writes it)
        if secret and (secret in data or (doc is not None and secret in orjson.dumps(doc))):
            data = errors.error_body(
                "The upstream's error message was withheld: it quoted the proxy's credentials.",
                "invalid_request_error", "upstream_error")
        elif doc is None:  # an HTML page (a wrong base_url), text, gzip…
            coding = upstream.body_coding(resp.headers)
            data = errors.error_body(
                f"The upstream answered {resp.status} with a body that is not a JSON object "
                f"({resp.content_type or 'no content type'}"
                f"{'' if coding is None else ', compressed: ' + coding}).",
                "invalid_request_error", "upstream_error")
        return web.Response(status=resp.status, body=data, headers=headers)
    doc = attempt.doc
    assert doc is not None  # _read_answer parsed every success
    usage = sse.usage_of(doc, chat)
    if usage is not None:
        lr = _lowrouter(rt, rec, attempt.cand, region, *usage, measured=True)
    else:
        prompt = eco.estimate_tokens(prompt_chars)
        lr = _lowrouter(rt, rec, attempt.cand, region, prompt,
                        eco.estimate_tokens(_completion_chars(doc)), measured=False)
    rec.ttfb = time.perf_counter() - rec.t0
    return web.Response(body=sse.with_member(data, doc, "lowrouter", lr), headers=headers)


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _late_status(attempt: _Attempt) -> str:
    """The error event's message for an error status that came once the client had its
    200 (`_EarlyCommit`): the status, and the upstream's own message when it has one
    (why a request was refused: a context too long, a bad parameter)."""
    said = f"the upstream answered {attempt.resp.status} once the stream had begun"
    try:
        doc = orjson.loads(attempt.body)
    except orjson.JSONDecodeError:
        return said
    return _upstream_said(said, doc, attempt.secret)


def _upstream_said(said: str, doc: Any, secret: bytes) -> str:
    """`said`, then the upstream's own message from its error object `doc` when it has
    one, cut to LATE_MESSAGE_CHARS; withheld when it quotes `secret`."""
    err = doc.get("error") if isinstance(doc, dict) else None
    message = err.get("message") if isinstance(err, dict) else err  # or {"error": "why"}
    if not isinstance(message, str) or not message.strip():
        return said
    if secret and secret in message.encode(errors="replace"):
        return said + " (its message was withheld: it quoted the proxy's credentials)"
    if len(message) > LATE_MESSAGE_CHARS:
        message = message[:LATE_MESSAGE_CHARS] + "…"
    return f"{said}: {message}"


def _answer_headers(rt: Runtime, rec: Rec, stream: bool) -> CIMultiDict[str]:
    """An answer's headers: its content type (and a stream's no-cache ones) and the
    route; a stream's also hold a place for Server-Timing, which `_stream_response`
    fills (a JSON answer gets it at the edge, as every answer not prepared here does).
    The set is built once per route and kind, and copied: a copy and two values cost
    less than a CIMultiDict made from a dict (the cache goes with the config's State)."""
    sets = rt.state.header_sets
    route = (rec.region, rec.model, rec.upstream, stream)
    base = sets.get(route)
    if base is None:
        route_pairs = rec.route_headers().items()
        base = sets[route] = CIMultiDict(
            [*_STREAM_HEADERS.items(), *route_pairs, ("Server-Timing", "")] if stream
            else [*route_pairs, ("Content-Type", "application/json")])
    headers = base.copy()  # the values below replace the empty ones, in place
    headers["X-Request-Id"] = rec.request_id
    return headers


def _completion_chars(doc: dict[str, Any]) -> int:
    """The characters a JSON answer generated, for its estimate when it has no usage:
    text, refusal and reasoning, and the names and arguments of tool and function calls."""
    total = 0
    for c in doc.get("choices") or ():
        if not isinstance(c, dict):
            continue
        total += _text_chars(c.get("text"))  # legacy completions
        msg = c.get("message")
        if not isinstance(msg, dict):
            continue
        for key in ("content", "refusal", "reasoning_content", "reasoning"):
            total += _text_chars(msg.get(key))
        calls = msg.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                total += _call_chars(call.get("function"))
        total += _call_chars(msg.get("function_call"))  # the older single-call shape
    return total


def _text_chars(value: Any) -> int:
    """A string's length, or the text parts' of a content list."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(p["text"]) for p in value
                   if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _call_chars(fn: Any) -> int:
    if not isinstance(fn, dict):
        return 0
    return _text_chars(fn.get("name")) + _text_chars(fn.get("arguments"))


# ---------------------------------------------------------------------------------------
# streams


@attrs.define(slots=True)
class _Tail:
    """What a stream holds back until its end (SPEC §1.1), and what it has counted."""

    held: list[bytes] = attrs.Factory(list)  # finish chunks
    last_held: dict[str, Any] | None = None  # the last one's JSON, for `lowrouter`
    held_bytes: int = 0  # at most MAX_EVENT_BYTES of them
    usage_chunk: tuple[bytes, dict[str, Any]] | None = None
    usage: tuple[int, int] | None = None
    content_events: int = 0
    done_event: bytes = DONE_EVENT
    done: bool = False
    client_usage: bool = False  # the client asked for usage: it takes `choices: []` chunks
    shape: sse.ChunkShape = attrs.Factory(sse.ChunkShape)  # of the content chunks so far
    failure: errors.UpstreamFailed | None = None  # raised once the events before it are out
    ids: bool = False  # an event has had an `id:` field (KEEPALIVE_LINE)
    said: dict[str, Any] | None = None  # the upstream's error object that is the failure
    meta: dict[str, Any] | None = None  # the first parsed chunk's id, created, model, ...

    def began(self) -> bool:
        """True once a data event has come: comments (`: OPENROUTER PROCESSING`) before
        it are not the stream's first event, which the status line waits for (SPEC §1.1)."""
        return bool(self.content_events or self.held or self.usage_chunk is not None
                    or self.done)


def _take(data: bytes, splitter: sse.EventSplitter, tail: _Tail) -> tuple[bytes, int]:
    """What to forward of one upstream read, and how many events it completed.

    A read of one content chunk shaped as an earlier one (`sse.ChunkShape`, the usual
    read of a live stream) goes on as it is; any other is split into events, looked at
    one by one (`_take_events`).
    """
    if not splitter.held and tail.shape.fits(data):
        tail.content_events += 1
        return data, 1
    events = splitter.feed(data)
    return (_take_events(events, tail) if events else b""), len(events)


def _take_events(events: list[bytes], tail: _Tail) -> bytes:
    """The bytes to forward now; hold finish and usage chunks; note a broken stream.

    A content chunk of a learnt shape passes unparsed; every other data event is
    parsed (`sse.classify`), and a content chunk among them teaches its shape. A broken
    event sets `tail.failure`, for the caller to raise after it has written the events
    that came before it in the same read.
    """
    out: list[bytes] = []
    shape = tail.shape
    n, i = len(events), 0
    while i < n:
        k = shape.fitting(events, i)
        if k:
            tail.content_events += k
            out.extend(events[i:i + k] if i or k < n else events)
            i += k
            if i == n:
                break
        ev = events[i]
        i += 1
        kind, obj, has_id = sse.classify_event(ev)
        if has_id:  # (a learnt shape's head is a classified event's: the events that
            tail.ids = True  # fit it need no look)
        if kind == sse.Kind.PASS:
            if obj is None:
                pass  # a comment, or an event without data
            elif not obj.get("choices"):  # `[]` without usage (Azure's prompt_filter_
                # results), null or none at all (a ping): no token, and a client that did
                # not ask for usage does not get it: its chunk.choices[0] loop would fail
                if not tail.client_usage:
                    continue  # (SPEC §1.1)
            else:
                tail.content_events += 1
                if tail.meta is None:
                    tail.meta = _chunk_meta(obj)
                shape.learn(ev, tail.content_events)
            out.append(ev)
            continue
        if kind == sse.Kind.FINAL:
            assert obj is not None
            usage = sse.usage_of(obj)
            if usage is not None:
                tail.usage = usage
            choices = obj.get("choices")
            if choices == [] or not choices:
                tail.usage_chunk = (ev, obj)
                continue
            tail.content_events += 1
            if tail.meta is None:
                tail.meta = _chunk_meta(obj)
            if isinstance(choices, list) and not _ends(choices, bool(tail.held)):
                # Usage on a content chunk (vLLM's continuous_usage_stats), or a finish
                # beside another choice's text: passed on, as only the end waits (SPEC
                # §1.1), and that text must not fall behind the choice's next chunk.
                out.append(ev)
                continue
            tail.held.append(ev)
            tail.last_held = obj
            tail.held_bytes += len(ev)
            if tail.held_bytes > MAX_EVENT_BYTES:  # a server in a loop: the chunks
                tail.held, tail.last_held = [], None  # are dropped, not relayed
                tail.failure = errors.UpstreamBadResponse(
                    "the upstream sent over 16 MiB of finish chunks")
                break
            continue
        if kind == sse.Kind.DONE:
            tail.done, tail.done_event = True, ev
            break
        if kind == sse.Kind.ERROR:
            tail.failure, tail.said = errors.UpstreamBadResponse(_INNER_ERROR), obj
        else:
            tail.failure = errors.UpstreamBadResponse("the upstream sent a malformed event")
        break
    return out[0] if len(out) == 1 else b"".join(out)


def _ends(choices: list[Any], after_end: bool) -> bool:
    """Whether a chunk with a finish or usage is one of the stream's end, to hold: each
    of its choices finishes or carries nothing, and one finishes, or (`after_end`, a
    finish chunk already held) none needs to (a usage chunk with an empty choice)."""
    finished = after_end
    for c in choices:  # a loop, not any() of a generator: no frame of its own
        if not isinstance(c, dict):
            return False
        if c.get("finish_reason"):
            finished = True
        elif not _empty(c.get("logprobs")) or not _empty(c.get("delta"), "role"):
            return False
    return finished


def _empty(member: Any, but: str = "") -> bool:
    """A delta or logprobs that carries nothing: null, or an object whose values (but
    `but`'s, a delta's role) are all empty (`{"content": [], "refusal": null}`)."""
    if not member:
        return True
    if not isinstance(member, dict):
        return False
    return all(not v or k == but for k, v in member.items())


_META: Final = ("id", "object", "created", "model", "system_fingerprint")


def _chunk_meta(obj: dict[str, Any]) -> dict[str, Any]:
    """A chunk's own fields, for a chunk the proxy makes (`_finish`) to look like the
    upstream's: the OpenAI schema requires id, created and model."""
    return {k: obj[k] for k in _META if k in obj}


_INNER_ERROR: Final = "the upstream reported an error inside the stream"
_DONE_LINES: Final = frozenset((b"data: [DONE]", b"data:[DONE]"))


def _failure(tail: _Tail, secret: bytes, first: bool = False) -> errors.UpstreamFailed:
    """`tail.failure` for the client of a started stream: an error object's message is
    quoted, unless it quotes `secret`, the upstream key sent (before the stream starts,
    it is a failure to fail over, said as after a 5xx). With `first`, no data event
    came before it: an error object with a client error's code is then a refusal of
    the request (`_Refused`), said the same way, and not the upstream's failure."""
    assert tail.failure is not None
    if tail.said is None:
        return tail.failure
    said = _upstream_said(_INNER_ERROR, tail.said, secret)
    if first and _refusal_status(tail.said) is not None:
        return _LateRefusal(said)
    return errors.UpstreamBadResponse(said)


class _LateRefusal(errors.UpstreamBadResponse):
    """`_Refused` after the keep-alive commit: the client has its 200, so it gets the
    error event, but the attempt is the upstream's success (`passed_4xx`)."""


def _finish(
    rt: Runtime, rec: Rec, prompt_chars: int, cand: Candidate, region: str | None,
    tail: _Tail,
) -> tuple[bytes, dict[str, Any]]:
    """The tail of a stream that ended well: finish chunks, usage, lowrouter, [DONE]."""
    lr = _stream_lowrouter(rt, rec, prompt_chars, cand, region, tail)
    out = tail.held[:-1]
    if tail.client_usage and tail.usage_chunk is not None:
        if tail.held:
            out.append(tail.held[-1])
        out.append(sse.add_member(*tail.usage_chunk, "lowrouter", lr))
    elif tail.held:
        assert tail.last_held is not None
        out.append(sse.add_member(tail.held[-1], tail.last_held, "lowrouter", lr))
    else:  # no finish chunk came: carry lowrouter on an empty delta, never on choices: []
        out.append(sse.make_event({
            **(tail.meta or {}), "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {}, "finish_reason": None}], "lowrouter": lr,
        }))
    out.append(tail.done_event)
    return b"".join(out), lr


def _stream_lowrouter(
    rt: Runtime, rec: Rec, prompt_chars: int, cand: Candidate, region: str | None, tail: _Tail
) -> dict[str, Any]:
    if tail.usage is not None:
        return _lowrouter(rt, rec, cand, region, *tail.usage, measured=True)
    # No event came (a refusal or a silence after the keep-alive commit): no tokens, as
    # for a refusal before it
    prompt = eco.estimate_tokens(prompt_chars) if tail.began() else 0
    return _lowrouter(rt, rec, cand, region, prompt, tail.content_events, measured=False)


async def _relay_stream(
    request: web.Request, rt: Runtime, st: State, rec: Rec, prompt_chars: int,
    attempt: _Attempt, region: str | None,
) -> web.StreamResponse:
    """Relay an SSE stream event by event; only the end is held back (SPEC §1.1)."""
    resp, splitter, tail, cand = attempt.resp, attempt.splitter, attempt.tail, attempt.cand
    assert splitter is not None and tail is not None
    tmo = st.config.timeouts
    if rec.out is None:  # else committed early (_EarlyCommit)
        rec.out = _stream_response(rt, rec, time.perf_counter() - attempt.t_sent, request)
    out = rec.out
    task = asyncio.current_task(rt.loop)
    assert task is not None
    loop = task.get_loop()
    started = loop.time()
    # Both limits count from before the wait in _first_events (SPEC §4: first_byte runs
    # until the first event, total caps the whole request), not from here.
    deadline = started + tmo.total - (time.perf_counter() - rec.t0)
    first_deadline = started + tmo.first_byte - (time.perf_counter() - attempt.t_sent)
    got_event = attempt.got_event
    last_byte = loop.time()
    finished = judged = over_total = False  # judged: the pool has been told how it did
    outcome = "ok"  # the attempt's, counted at the end
    # Moved before each read below, and before each write that waits for the client:
    # one that stops reading is held no longer than the request's total (SPEC §4).
    watch = rt.deadlines.watch(task)
    client = request.transport  # (for the writes that wait for it: _send)
    idle, keepalive = tmo.idle, tmo.keepalive
    try:
        # (comments that came before a silence long enough to commit go as they came)
        data = attempt.first if got_event or attempt.first else KEEPALIVE_EVENT
        attempt.first = b""
        if not out.prepared:
            await out.prepare(request)
            rec.ttfb = time.perf_counter() - rec.t0
        rec.status = 200
        # What comes with [DONE] goes out with the stream's end, in one write.
        last = data if tail.done else b""
        if data and not tail.done:
            await _send(out.write(data), watch, deadline, client)
        if tail.failure is not None:
            raise _failure(tail, attempt.secret, not got_event)
        fast = _ChunkWriter.of(request)
        read, feed, fits = resp.read_some, splitter.feed, tail.shape.fits
        while not tail.done:
            # The read ends by the first of: the total; until the first event its
            # deadline (first_byte alone: an idle shorter than it, for a model slow to
            # start, does not cut that wait short), after it idle since the last byte;
            # and (between events) the keep-alive.
            now = loop.time()
            limit = last_byte + idle if got_event else first_deadline
            if limit > deadline:
                limit = deadline
            if limit > now + 3600.0:  # with no limits configured, an hour of silence
                limit = now + 3600.0
            when = limit
            if when > now + keepalive and not splitter.held:
                when = now + keepalive  # keep-alive comments go only between events
            watch.arm(when)
            try:
                chunk = await read()
            except asyncio.CancelledError:
                if not watch.expired():
                    raise
                now = loop.time()
                if now >= limit - 0.001:
                    over_total = now >= deadline - 0.001
                    raise errors.UpstreamTimeout(
                        "the stream reached timeouts.total" if over_total else
                        # (its comments may have come: they are no event, SPEC §4)
                        "the upstream sent no event within timeouts.first_byte"
                        if not got_event else "the upstream went silent inside an event"
                        if splitter.held else "the upstream went silent between events"
                    ) from None
                if resp.gone():  # its framing broke (upstream.gone): no more is coming
                    raise errors.UpstreamConnectionLost("upstream connection lost") from None
                await _send(out.write(KEEPALIVE_LINE if tail.ids else KEEPALIVE_EVENT),
                            watch, deadline, client)
                continue
            finally:  # never armed outside the read: not while writing to the client
                watch.armed = False
            # (A timer due as the read completes still cancels the task before it
            # resumes: asyncio throws CancelledError into the await, the data stays
            # buffered, and the branch above takes it as the deadline's.)
            if not chunk:
                break  # a clean end without [DONE]: finish as if it came (SPEC §1.1)
            last_byte = loop.time()
            # `_take`, written out: the read is one content chunk shaped as before, or
            # is split into events and looked at one by one
            if not splitter.held and fits(chunk):
                tail.content_events += 1
                data, events = chunk, 1
            else:
                taken = feed(chunk)
                events = len(taken)
                data = _take_events(taken, tail) if taken else b""
            if events:
                if not got_event:
                    got_event = tail.began()
                if tail.done:
                    last = data
                elif not data:
                    pass
                elif fast is None:
                    await _send(out.write(data), watch, deadline, client)
                elif fast.write(data):
                    await _send(fast.drain(), watch, deadline, client)
                if tail.failure is not None:
                    raise _failure(tail, attempt.secret, not got_event)
            elif len(splitter.held) > MAX_EVENT_BYTES:
                raise errors.UpstreamBadResponse("the upstream sent an event over 16 MiB")
        if not tail.done:
            # An end without [DONE] is a clean one (SPEC §1.1) when the answer came to
            # its finish: a last `data: [DONE]` without its blank line counts as [DONE];
            # any other unfinished event, or no finish chunk at all, is a cut (a stream
            # without chunked framing ends at any close, a reset included).
            rest = splitter.held
            if rest and bytes(rest).rstrip(b"\r\n") not in _DONE_LINES:  # (or a bytearray)
                raise errors.UpstreamBadResponse("the upstream stream ended inside an event")
            if not rest and not tail.held and tail.usage_chunk is None:
                raise errors.UpstreamConnectionLost(
                    "the upstream stream ended before its finish chunk")
        end, _ = _finish(rt, rec, prompt_chars, cand, region, tail)
        # The upstream's part is done, whatever becomes of the last write: the attempt
        # has succeeded. (aiohttp puts the body's terminating chunk out before it waits
        # for the client: nothing may follow it, see below.)
        finished = judged = True
        rt.pool.succeeded(cand.upstream.name, attempt.trial, attempt.held)
        await _send(out.write_eof(last + end if last else end), watch, deadline, client)
    except errors.UpstreamFailed as e:
        # timeouts.total is the proxy's own cap on a request, not the upstream's failure:
        # five long generations must not eject a healthy upstream
        judged = not over_total
        if isinstance(e, _LateRefusal):  # the request was the fault, not the upstream
            judged = True
            rt.pool.succeeded(cand.upstream.name, attempt.trial, attempt.held)
            outcome = "passed_4xx"
        else:
            if judged:
                rt.pool.failed(cand.upstream.name, time.monotonic(), trial=attempt.trial,
                               held=attempt.held, why=_failure_kind(e))
            outcome = "stream_" + _outcome(e)
        await _stream_error(rt, rec, prompt_chars, cand, region, tail, e, out, request)
    except (ConnectionResetError, asyncio.CancelledError):
        if finished:  # in the last write: its end is out, no error event may follow
            finished = False  # (the upstream connection is dropped, not pooled)
            _cut(request)
            if watch.expired():
                rec.status, rec.error = "stream_error", "request_timeout"
            elif rt.ended_by_drain(task):
                rec.status, rec.error = "stream_error", "shutting_down"
            else:
                rec.status = "client_closed"
                if task.cancelling():
                    raise
            return out
        outcome = "cancelled"  # ended on the proxy's side: not the upstream's doing
        if watch.expired():  # a write outlived the total or protocol.SEND_TIMEOUT_S: the
            resp.close()  # client stopped reading
            why = ("The stream reached timeouts.total before the client had taken it."
                   if asyncio.get_running_loop().time() >= deadline
                   else f"The client took none of the stream for {protocol.SEND_TIMEOUT_S:g} s.")
            await _stream_error(rt, rec, prompt_chars, cand, region, tail,
                                errors.RequestTimeout(why), out, request)
            return out
        if rt.ended_by_drain(task):  # the drain's deadline, not the client: the error event
            resp.close()
            await _stream_error(rt, rec, prompt_chars, cand, region, tail, _drain_ends_stream(),
                                out, request)
            return out
        # The client left: drop the upstream connection at once so it stops generating,
        # and keep the tokens so far for the metrics (SPEC §1.1).
        resp.close()
        rec.status = outcome = "client_closed"
        _stream_lowrouter(rt, rec, prompt_chars, cand, region, tail)
        if task.cancelling():
            raise
    except Exception:
        # A bug of ours mid-stream: end it the §1.1 way, never with a second status line.
        err = _bug_in_stream(rec)
        if finished:  # in the last write: its end is out, no error event may follow
            finished = False
            rec.status, rec.error = "stream_error", err.code
            _cut(request)
            return out
        outcome = "cancelled"
        resp.close()
        await _stream_error(rt, rec, prompt_chars, cand, region, tail, err, out, request)
    finally:
        watch.close()
        if not finished:
            resp.close()
        if not judged and attempt.trial:  # the client left, the drain, a bug: no verdict
            rt.pool.abandoned(cand.upstream.name, attempt.held)
        rt.metrics.attempt(cand.upstream.name, outcome)
        rec.upstream_s = time.perf_counter() - attempt.t_sent
    if finished:
        if resp.done():
            resp.release()
        else:  # the upstream's end is still coming: read it apart from the client's request
            rt.spawn(resp.finish(rt.deadlines))
    return out


def _cut(request: web.BaseRequest) -> None:
    """Drop the client's connection, and what its buffer still holds (closed already,
    gracefully, it waits for the client to take that: protocol.lr_transport)."""
    transport = request.transport or getattr(request.protocol, "lr_transport", None)
    if transport is not None:
        transport.abort()


async def _send(write: Awaitable[None], watch: upstream.Watch, deadline: float,
                client: asyncio.BaseTransport | None) -> None:
    """A write to a stream's client that may wait for it to read: under the request's
    total (`deadline`, on the stream's `watch`) and protocol.SEND_TIMEOUT_S with none of
    it taken (nginx's send_timeout, from the client's last read, as for a JSON answer),
    so that a client that stops reading does not hold its upstream, and their places,
    for long, while one that reads slowly is served."""
    now = asyncio.get_running_loop().time()
    if client is None:
        watch.arm(min(deadline, now + protocol.SEND_TIMEOUT_S))
    else:
        watch.arm_send(now, client, protocol.SEND_TIMEOUT_S, deadline)
    try:
        await write
    finally:
        watch.armed = False
        watch.client = None


class _ChunkWriter:
    """A started stream's body writes, straight to the client's transport.

    `StreamResponse.write` goes through two coroutines and three calls per write (about
    a tenth of a stream's relaying here, bench/instr.py), to end in the same
    `transport.write` of a chunk. This writes the chunk itself, for a response whose
    writer does nothing else with it: chunked, no compression, no length, no hooks, its
    headers out (checked once, in `of`; else the relay uses `write`). It keeps the
    writer's byte count, and the client's buffer bounded: `write` says when the
    transport has paused writing, and the caller awaits `drain`.
    """

    __slots__ = ("_proto", "_writer")

    def __init__(self, writer: Any, proto: Any) -> None:
        self._writer, self._proto = writer, proto

    @classmethod
    def of(cls, request: web.Request) -> _ChunkWriter | None:
        w = request.writer
        proto = getattr(w, "protocol", None)
        if (not getattr(w, "chunked", False) or getattr(w, "length", 0) is not None
                or getattr(w, "on_body_write", None) is not None
                or getattr(w, "_compress", 0) is not None
                or getattr(w, "_on_chunk_sent", 0) is not None
                or getattr(w, "_headers_buf", 0) is not None
                or not isinstance(getattr(proto, "_paused", None), bool)
                or not isinstance(getattr(w, "output_size", None), int)):
            return None
        return cls(w, proto)

    def write(self, data: bytes) -> bool:
        """Write one chunk; True when the client reads slower than we write."""
        proto = self._proto
        transport = proto.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client has gone")
        self._writer.output_size += len(data)
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        paused: bool = proto._paused
        return paused

    async def drain(self) -> None:
        await self._writer.drain()


def _drain_ends_stream() -> errors.ProxyError:
    """A started stream's end at the drain's deadline (its §1.1 error event)."""
    return errors.ShuttingDown("The proxy is shutting down; the stream was ended early.")


def _bug_in_stream(rec: Rec) -> errors.ProxyError:
    """A started stream's end after an exception of ours: logged, then its error event.
    Call it in the `except` block, where the traceback is."""
    log.exception("unexpected error in a stream", extra={"fields": {"request_id": rec.request_id}})
    return errors.ProxyError("Internal error in the proxy; see its log.")


def _stream_response(rt: Runtime, rec: Rec, upstream_s: float,
                     request: web.BaseRequest) -> web.StreamResponse:
    """The client's event stream, not yet prepared. Server-Timing goes with the headers,
    so for a stream it covers the time to its first byte: the upstream's wait so far,
    and what the proxy added."""
    headers = _answer_headers(rt, rec, stream=True)
    headers["Server-Timing"] = server_timing(rec, upstream_s)  # prepared before the edge
    out = web.StreamResponse(status=200, headers=headers)
    finish_headers(rt, out, rec.request_id)
    if request.version < HttpVersion11:
        # No chunked encoding before HTTP/1.1: the body ends where the connection does.
        out.force_close()
    return out


async def _stream_error(
    rt: Runtime, rec: Rec, prompt_chars: int, cand: Candidate, region: str | None,
    tail: _Tail, e: errors.ProxyError, out: web.StreamResponse, request: web.Request,
    first: bytes = b"",
) -> None:
    """End a started stream with the §1.1 error event: no [DONE], a clean end of body;
    `first`, events not written yet that came before the failure, go before it."""
    rec.status, rec.error = "stream_error", e.code
    lr = _stream_lowrouter(rt, rec, prompt_chars, cand, region, tail)
    event = sse.make_event({
        "error": {"message": e.message, "type": e.type, "code": e.code},
        "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
        "lowrouter": lr,
    })
    try:
        # Within the request's total, and a second at least for the event itself: past
        # it the client, which reads nothing, is cut off (SPEC §4).
        with rt.deadlines.timeout(max(1.0, rec.total_s - (time.perf_counter() - rec.t0))):
            if not out.prepared:
                await out.prepare(request)
            await out.write(b"".join([first, *tail.held, event]))
            await out.write_eof()
    except ConnectionResetError:
        rec.status = "client_closed"
    except TimeoutError:
        _cut(request)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # (a real cancel: the client gone, or the drain's deadline)
        # aiohttp's drain waiter, cancelled with an earlier write to a client that
        # stopped reading, fails every later drain at once: the event is in the buffer,
        # for the client to take, or dropped with the connection when none of it has
        # gone for protocol.SEND_TIMEOUT_S (LimitsHandler._lr_check)
