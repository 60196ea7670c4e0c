"""A deterministic simulated OpenAI-compatible upstream, for demos, tests and benchmarks.

`SimUpstream` serves `POST /v1/chat/completions` (streaming or not), `POST /v1/embeddings`
and `GET /v1/models` on aiohttp. Answers are a pure function of the request (the words
come from a CRC-32 of the prompt), so tests can predict them byte for byte. Faults can be
injected server-wide (`SimUpstream.faults`) or per request through a `"sim": {...}` object
in the JSON body (clients pass it with the OpenAI SDK's `extra_body`); see `_Knobs`.
With `record=True` every request and every byte written back is kept in `requests`.

It is also a small CLI: `python -m lrproxy.simupstream --listen 127.0.0.1:9000`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import signal
import ssl
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any

import attrs
import orjson
from aiohttp import web

__all__ = ["Faults", "RecordedRequest", "SimUpstream", "main"]

# Fixed vocabulary for generated text: 64 words, so a 6-bit slice of the PRNG picks one.
# fmt: off
_VOCAB = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "amber", "birch", "cedar", "dune",
    "ember", "fjord", "glade", "heath", "islet", "jade", "kelp", "lagoon", "meadow", "nectar",
    "orchid", "pine", "quartz", "river", "sage", "tundra", "umber", "valley", "willow",
    "yarrow", "zephyr", "acorn", "brook", "cliff", "dawn", "estuary", "fern", "grove", "hollow",
    "ivy", "jasper", "knoll", "larch", "moss",
)
# fmt: on
assert len(_VOCAB) == 64
# Each content chunk is "word " as a JSON string, encoded once.
_VOCAB_JSON = tuple(orjson.dumps(w + " ") for w in _VOCAB)
_VOCAB_TEXT = tuple(w + " " for w in _VOCAB)

_DEFAULT_CHUNKS = 8
_DEFAULT_DIMENSIONS = 8
_BYTES_SPLIT_PAUSE_S = 0.001
_COALESCE_EVENTS = 3
_SHUTDOWN_TIMEOUT_S = 0.2
_MAX_BODY = 64 * 1024 * 1024

_KIND_CHAT = 0
_KIND_EMBED = 1
_KIND_MODELS = 2

_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

# Fixed pieces of a chat.completion.chunk; the per-request head is spliced in front.
_ROLE_CHOICE = (
    b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
)
_CONTENT_PRE = b'{"index":0,"delta":{"content":'
_CONTENT_POST = b'},"logprobs":null,"finish_reason":null}]'
_CONTENT_POST_STOP = b'},"logprobs":null,"finish_reason":"stop"}]'
_FINISH_CHOICE = b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]'


@attrs.define
class RecordedRequest:
    """One request as the simulator saw it, plus the exact response bytes it wrote."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    sent: bytearray
    client_closed: bool = False
    finished_at: float | None = None
    peer: Any = None  # the client's (host, port): the same for requests on one connection


@attrs.define
class Faults:
    """Server-wide fault knobs; tests may change them at any time, they apply at once."""

    fail_status: int | None = None
    fail_count: int = 0
    retry_after: str | None = None
    headers_delay_s: float = 0.0
    redirect_to: str | None = None
    reset: bool = False


@attrs.define(slots=True)
class _Knobs:
    """Per-request behaviour, from the request's `"sim"` object (all optional).

    Streams: `first_delay_s` waits after the headers, `chunk_delay_s` between events;
    `cut_after`/`stall_after`/`malformed_after` count content chunks (0 = right after
    the role chunk); `split` is "none" (one write per event), "bytes" (three writes cut
    mid-line, 1 ms apart) or "coalesce" (three events per write). Non-streaming answers
    sleep `first_delay_s + chunk_delay_s * chunks` (+ `stall_s`), a `cut_after` within
    the text drops the connection instead, and `malformed_after` gives a non-JSON body.
    `headers_delay_s` replaces the server's `latency_s`; `status` answers that error.
    `end_delay_s` waits between a stream's last event and the end of its body.
    """

    chunks: int = _DEFAULT_CHUNKS
    text: str | None = None
    first_delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    headers_delay_s: float | None = None
    split: str = "none"
    crlf: bool = False
    keepalive: bool = False
    cut_after: int | None = None
    stall_after: int | None = None
    stall_s: float = 0.0
    malformed_after: int | None = None
    omit_usage: bool = False
    status: int | None = None
    retry_after: str | None = None
    no_done: bool = False
    finish_in_content: bool = False
    end_delay_s: float = 0.0


_DEFAULT_KNOBS = _Knobs()
_KNOB_TYPES: dict[str, tuple[type, ...]] = {
    "chunks": (int,),
    "text": (str,),
    "first_delay_s": (int, float),
    "chunk_delay_s": (int, float),
    "headers_delay_s": (int, float),
    "split": (str,),
    "crlf": (bool,),
    "keepalive": (bool,),
    "cut_after": (int,),
    "stall_after": (int,),
    "stall_s": (int, float),
    "malformed_after": (int,),
    "omit_usage": (bool,),
    "status": (int,),
    "retry_after": (str,),
    "no_done": (bool,),
    "finish_in_content": (bool,),
    "end_delay_s": (int, float),
}
_SPLITS = frozenset({"none", "bytes", "coalesce"})


class _BadRequest(Exception):
    """A client error to answer with an OpenAI 400 body."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _parse_knobs(raw: Any) -> _Knobs:
    """Validate the `"sim"` object; a typo or wrong type is a 400, not silently ignored."""
    if raw is None:
        return _DEFAULT_KNOBS
    if not isinstance(raw, dict):
        raise _BadRequest("sim must be an object", "sim")
    for key, value in raw.items():
        types = _KNOB_TYPES.get(key)
        if types is None:
            raise _BadRequest(f"unknown sim knob {key!r}", f"sim.{key}")
        if value is None:
            continue
        bad_bool = isinstance(value, bool) and bool not in types
        if bad_bool or not isinstance(value, types):
            raise _BadRequest(f"sim.{key} has the wrong type", f"sim.{key}")
    knobs = _Knobs(**{k: v for k, v in raw.items() if v is not None})
    if knobs.split not in _SPLITS:
        raise _BadRequest("sim.split must be none, bytes or coalesce", "sim.split")
    if knobs.chunks < 0:
        raise _BadRequest("sim.chunks must be >= 0", "sim.chunks")
    return knobs


def _error_body(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    """OpenAI error JSON."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def _prng_words(seed: int, n: int) -> list[int]:
    """`n` vocabulary indices from a small LCG seeded with `seed` (cheap and reproducible)."""
    out = []
    x = seed & 0x7FFFFFFF
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out.append((x >> 16) & 63)
    return out


def _prompt(messages: Any) -> tuple[str, int]:
    """Prompt text (for the hash) and prompt tokens: words in all contents + 3 per message."""
    if not isinstance(messages, list):
        raise _BadRequest("messages must be an array", "messages")
    parts: list[str] = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for p in content:
                if isinstance(p, dict) and isinstance(p.get("text"), str):
                    parts.append(p["text"])
    text = "\n".join(parts)
    return text, len(text.split()) + 3 * len(messages)


def _embedding(item: bytes, dims: int) -> list[float]:
    """`dims` floats in [-1, 1] derived from the CRC-32 of one input."""
    x = zlib.crc32(item)
    out = []
    for _ in range(dims):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(round(x / 0x3FFFFFFF - 1.0, 6))
    return out


class _Emitter:
    """Writes SSE events to the response in the requested split mode and records them."""

    __slots__ = ("_pending", "_resp", "_sent", "_split")

    def __init__(self, resp: web.StreamResponse, sent: bytearray | None, split: str) -> None:
        self._resp = resp
        self._sent = sent
        self._split = split
        self._pending: list[bytes] = []

    async def _write(self, data: bytes) -> None:
        await self._resp.write(data)
        if self._sent is not None:
            self._sent += data

    async def event(self, ev: bytes) -> None:
        """Send one complete event (or buffer it, in coalesce mode)."""
        if self._split == "none":
            await self._write(ev)
        elif self._split == "bytes":
            a, b = len(ev) // 3, 2 * len(ev) // 3
            await self._write(ev[:a])
            await asyncio.sleep(_BYTES_SPLIT_PAUSE_S)
            await self._write(ev[a:b])
            await asyncio.sleep(_BYTES_SPLIT_PAUSE_S)
            await self._write(ev[b:])
        else:
            self._pending.append(ev)
            if len(self._pending) >= _COALESCE_EVENTS:
                await self.flush()

    async def flush(self) -> None:
        """Write out whatever coalesce mode is holding."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            await self._write(data)


class SimUpstream:
    """A simulated OpenAI-compatible upstream server (see the module docstring)."""

    def __init__(
        self,
        *,
        name: str = "sim",
        api_key: str | None = None,
        models: Sequence[str] = ("sim-small", "sim-large"),
        latency_s: float = 0.0,
        record: bool = True,
    ) -> None:
        self.name = name
        self.api_key = api_key
        self.models = tuple(models)
        # Default wait before the headers of chat/embeddings answers (a `sim.headers_delay_s`
        # knob replaces it), to model time-to-first-byte in benchmarks.
        self.latency_s = latency_s
        self.record = record
        self.faults = Faults()
        self.requests: list[RecordedRequest] = []
        self.open_streams = 0
        self.port = 0
        self.base_url = ""
        self._model_set = frozenset(self.models)
        self._auth = None if api_key is None else f"Bearer {api_key}"
        self._created = int(time.time())
        self._created_b = str(self._created).encode()
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": self._created, "owned_by": name}
                    for m in self.models
                ],
            }
        )
        self.app = web.Application(client_max_size=_MAX_BODY)
        self.app.on_response_prepare.append(self._on_prepare)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_post("/v1/embeddings", self._embeddings)
        self.app.router.add_get("/v1/models", self._models)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *,
        ssl_context: ssl.SSLContext | None = None, url_host: str | None = None,
    ) -> str:
        """Listen on host:port (0 = any free port); return the base URL ending in /v1.

        With `ssl_context` it serves HTTPS; `url_host` names the host in the URL (the
        name in the test certificate, e.g. localhost).
        """
        self._stopping = False
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        h = url_host or (f"[{host}]" if ":" in host else host)
        scheme = "https" if ssl_context is not None else "http"
        self.base_url = f"{scheme}://{h}:{self.port}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop listening; in-flight handlers get a short grace period, then are cancelled."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self._stopping = True
            await runner.cleanup()

    # -- request plumbing --------------------------------------------------------------

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Headers every answer carries (tests check that a proxy strips or keeps them)."""
        h = response.headers
        h["Server"] = "sim"
        h["Set-Cookie"] = "sim=1"
        h["X-Sim-Name"] = self.name

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, _KIND_CHAT)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, _KIND_EMBED)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, _KIND_MODELS)

    async def _handle(self, request: web.Request, kind: int) -> web.StreamResponse:
        """Record the request, then answer it; notes a client disconnect and the end time."""
        body = await request.read() if request.can_read_body else b""
        data: Any = None
        bad_json = False
        if body:
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                bad_json = True
        rec: RecordedRequest | None = None
        if self.record:
            rec = RecordedRequest(
                method=request.method,
                path=request.path,
                headers=dict(request.headers.items()),
                body=body,
                json=data,
                sent=bytearray(),
                peer=request.transport.get_extra_info("peername") if request.transport else None,
            )
            self.requests.append(rec)
        try:
            return await self._answer(request, kind, data, bad_json, rec)
        except asyncio.CancelledError:
            if rec is not None and not self._stopping:
                rec.client_closed = True
            raise
        finally:
            if rec is not None:
                rec.finished_at = time.monotonic()

    def _json(
        self,
        body: bytes,
        rec: RecordedRequest | None,
        status: int = 200,
        retry_after: str | None = None,
    ) -> web.Response:
        """A JSON answer whose body is recorded as sent."""
        if rec is not None:
            rec.sent += body
        resp = web.Response(body=body, status=status, headers=_JSON_HEADERS)
        if retry_after is not None:
            resp.headers["Retry-After"] = retry_after
        return resp

    def _fail(
        self, status: int, rec: RecordedRequest | None, retry_after: str | None
    ) -> web.Response:
        """An injected failure with an OpenAI error body typed by status."""
        if status == 429:
            type_, code = "requests", "rate_limit_exceeded"
        elif status >= 500:
            type_, code = "server_error", None
        else:
            type_, code = "invalid_request_error", None
        msg = f"Simulated error {status} from {self.name}."
        return self._json(_error_body(msg, type_, None, code), rec, status, retry_after)

    @staticmethod
    def _abort(request: web.Request) -> web.StreamResponse:
        """Drop the TCP connection at once (no response, or a cut one).

        The handler returns a response anyway; aiohttp's attempt to finish it meets the
        closed transport and is dropped quietly as a "premature disconnection".
        """
        transport = request.transport
        if transport is not None:
            transport.abort()
        return web.StreamResponse()

    async def _answer(
        self,
        request: web.Request,
        kind: int,
        data: Any,
        bad_json: bool,
        rec: RecordedRequest | None,
    ) -> web.StreamResponse:
        """Server faults, auth, validation, per-request knobs, then the real answer."""
        f = self.faults
        if f.reset:
            return self._abort(request)
        if f.redirect_to is not None:
            return web.Response(status=307, headers={"Location": f.redirect_to})
        if f.fail_status is not None and f.fail_count != 0:
            if f.fail_count > 0:
                f.fail_count -= 1
            return self._fail(f.fail_status, rec, f.retry_after)
        if f.headers_delay_s > 0:
            await asyncio.sleep(f.headers_delay_s)

        if self._auth is not None:
            got = request.headers.get("Authorization")
            if got != self._auth:
                if got is None:
                    msg = "You didn't provide an API key."
                else:
                    key = got[7:] if got[:7].lower() == "bearer " else got
                    msg = f"Incorrect API key provided: {key}."
                err = _error_body(msg, "invalid_request_error", None, "invalid_api_key")
                return self._json(err, rec, 401)

        if kind == _KIND_MODELS:
            return self._json(self._models_body, rec)
        try:
            if bad_json or not isinstance(data, dict):
                raise _BadRequest("We could not parse the JSON body of your request.", None)
            knobs = _parse_knobs(data.get("sim"))
            model = data.get("model")
            if not isinstance(model, str):
                raise _BadRequest("you must provide a model parameter", "model")
        except _BadRequest as e:
            err = _error_body(e.message, "invalid_request_error", e.param, "invalid_request")
            return self._json(err, rec, 400)

        delay = self.latency_s if knobs.headers_delay_s is None else knobs.headers_delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        if knobs.status is not None:
            return self._fail(knobs.status, rec, knobs.retry_after)
        if model not in self._model_set:
            msg = f"The model `{model}` does not exist or you do not have access to it."
            err = _error_body(msg, "invalid_request_error", None, "model_not_found")
            return self._json(err, rec, 404)
        try:
            if kind == _KIND_EMBED:
                return self._embed(data, model, rec)
            return await self._completion(request, data, model, knobs, rec)
        except _BadRequest as e:
            err = _error_body(e.message, "invalid_request_error", e.param, "invalid_request")
            return self._json(err, rec, 400)

    # -- endpoints ---------------------------------------------------------------------

    def _embed(self, data: dict[str, Any], model: str, rec: RecordedRequest | None) -> web.Response:
        """Embeddings: `dimensions` (default 8) deterministic floats per input."""
        inp = data.get("input")
        items: list[Any]
        if isinstance(inp, list) and inp and all(isinstance(i, str | list) for i in inp):
            items = inp  # several strings or token arrays
        elif isinstance(inp, str) or (
            isinstance(inp, list) and inp and all(isinstance(i, int) for i in inp)
        ):
            items = [inp]  # one string or one token array
        else:
            raise _BadRequest("input must be a string or an array", "input")
        dims = data.get("dimensions", _DEFAULT_DIMENSIONS)
        if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 4096:
            raise _BadRequest("dimensions must be an integer in 1..4096", "dimensions")
        b64 = data.get("encoding_format") == "base64"
        tokens = 0
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                tokens += len(item.split())
                vec = _embedding(item.encode(), dims)
            else:
                tokens += len(item)
                vec = _embedding(orjson.dumps(item), dims)
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec
            out.append({"object": "embedding", "index": i, "embedding": emb})
        body = orjson.dumps(
            {
                "object": "list",
                "data": out,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
        return self._json(body, rec)

    async def _completion(
        self,
        request: web.Request,
        data: dict[str, Any],
        model: str,
        knobs: _Knobs,
        rec: RecordedRequest | None,
    ) -> web.StreamResponse:
        """Chat completion: words from the prompt hash, or `sim.text`; stream or JSON."""
        text, prompt_tokens = _prompt(data.get("messages"))
        seed = zlib.crc32(text.encode())
        if knobs.text is not None:
            words = knobs.text.split()
            chunks = [orjson.dumps(w + " ") for w in words]
            content = "".join(w + " " for w in words)
        else:
            idx = _prng_words(seed, knobs.chunks)
            chunks = [_VOCAB_JSON[i] for i in idx]
            content = "".join([_VOCAB_TEXT[i] for i in idx])
        n = len(chunks)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "total_tokens": prompt_tokens + n,
        }
        cid = f"chatcmpl-sim{seed:08x}"
        if data.get("stream") is True:
            opts = data.get("stream_options")
            include_usage = (
                isinstance(opts, dict)
                and opts.get("include_usage") is True
                and not knobs.omit_usage
            )
            return await self._stream(request, cid, model, chunks, usage, include_usage, knobs, rec)

        # Non-streaming: the same delays and faults, taken before the single answer.
        delay = knobs.first_delay_s + knobs.chunk_delay_s * n
        if knobs.stall_after is not None and knobs.stall_after <= n:
            delay += knobs.stall_s
        if knobs.cut_after is not None and knobs.cut_after <= n:
            delay = knobs.first_delay_s + knobs.chunk_delay_s * knobs.cut_after
        if delay > 0:
            await asyncio.sleep(delay)
        if knobs.cut_after is not None and knobs.cut_after <= n:
            return self._abort(request)
        if knobs.malformed_after is not None:
            return self._json(b"{not json", rec)
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": self._created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
        }
        if not knobs.omit_usage:
            obj["usage"] = usage
        return self._json(orjson.dumps(obj), rec)

    async def _stream(
        self,
        request: web.Request,
        cid: str,
        model: str,
        chunks: list[bytes],
        usage: dict[str, int],
        include_usage: bool,
        knobs: _Knobs,
        rec: RecordedRequest | None,
    ) -> web.StreamResponse:
        """Send the SSE stream, applying the per-request stream knobs in order."""
        eol = b"\r\n" if knobs.crlf else b"\n"
        end = eol + eol
        head = (
            b'data: {"id":' + orjson.dumps(cid)
            + b',"object":"chat.completion.chunk","created":' + self._created_b
            + b',"model":' + orjson.dumps(model)
            + b',"system_fingerprint":null,"choices":['
        )  # fmt: skip
        tail = (b',"usage":null}' if include_usage else b"}") + end
        comment = b": keep-alive" + end
        n = len(chunks)
        stop_in_content = knobs.finish_in_content and n > 0
        delay = knobs.chunk_delay_s

        resp = web.StreamResponse(headers=_SSE_HEADERS)
        out = _Emitter(resp, rec.sent if rec is not None else None, knobs.split)
        self.open_streams += 1
        try:
            await resp.prepare(request)
            if knobs.first_delay_s > 0:
                await asyncio.sleep(knobs.first_delay_s)
            if knobs.keepalive:
                await out.event(comment)
            await out.event(head + _ROLE_CHOICE + tail)
            for k in range(n + 1):
                if k:
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if knobs.keepalive:
                        await out.event(comment)
                    post = _CONTENT_POST_STOP if stop_in_content and k == n else _CONTENT_POST
                    await out.event(head + _CONTENT_PRE + chunks[k - 1] + post + tail)
                if knobs.cut_after == k:
                    await out.flush()
                    self._abort(request)
                    return resp
                if knobs.stall_after == k and knobs.stall_s > 0:
                    await out.flush()
                    await asyncio.sleep(knobs.stall_s)
                if knobs.malformed_after == k:
                    await out.event(b"data: {not json" + end)
            finals = [] if stop_in_content else [head + _FINISH_CHOICE + tail]
            if include_usage:
                finals.append(head + b'],"usage":' + orjson.dumps(usage) + b"}" + end)
            if not knobs.no_done:
                finals.append(b"data: [DONE]" + end)
            for ev in finals:
                if delay > 0:
                    await asyncio.sleep(delay)
                if knobs.keepalive:
                    await out.event(comment)
                await out.event(ev)
            await out.flush()
            if knobs.end_delay_s > 0:
                await asyncio.sleep(knobs.end_delay_s)
            await resp.write_eof()
        except ConnectionResetError:
            # The client went away while we wrote; aiohttp finishes the stub response quietly.
            if rec is not None and not self._stopping:
                rec.client_closed = True
        finally:
            self.open_streams -= 1
        return resp


def _parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` to a (host, port) pair."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _serve(sim: SimUpstream, host: str, port: int) -> None:
    """Run the simulator until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    base_url = await sim.start(host, port)
    try:
        print(f"SIM_BASE_URL={base_url}", flush=True)
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI entry: `python -m lrproxy.simupstream --listen 127.0.0.1:9000 [...]`."""
    ap = argparse.ArgumentParser(
        prog="python -m lrproxy.simupstream",
        description="Deterministic simulated OpenAI-compatible upstream.",
    )
    ap.add_argument("--listen", default="127.0.0.1:0", type=_parse_listen, help="HOST:PORT")
    ap.add_argument("--api-key", default=None, help="require this Bearer key")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="wait before each answer")
    ap.add_argument("--models", default="sim-small,sim-large", help="comma-separated ids")
    ap.add_argument("--name", default="sim", help="X-Sim-Name and owned_by value")
    args = ap.parse_args(argv)
    host, port = args.listen
    sim = SimUpstream(
        name=args.name,
        api_key=args.api_key,
        models=[m for m in args.models.split(",") if m],
        latency_s=args.latency_ms / 1000.0,
        record=False,
    )
    asyncio.run(_serve(sim, host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
