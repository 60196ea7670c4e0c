"""Streaming relay against real simulated upstreams (SPEC §1.1, §3, §5)."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import math
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
import attrs
import openai
import orjson
import pytest
from aiohttp import web
from conftest import Stack, await_for, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from lrproxy import relay, sse
from lrproxy.simupstream import RecordedRequest
from lrproxy.sse import EventSplitter, Kind, classify, event_data

LLAMA = "meta/llama-3.1-8b"  # served only by eu-north-a, the cleanest region: one sim
MINI = "openai/gpt-4o-mini"  # eu-west-a/b and us-east-a
KEY_LABELS = {"key": "team-a", "model": LLAMA, "region": "eu-north"}
MSGS: list[Any] = [{"role": "user", "content": "tell me about the grid tonight"}]
KEEPALIVE = b": keep-alive\n\n"

MakeStack = Callable[..., Stack]


# ---------------------------------------------------------------------------------------
# helpers


def live_stack(make_stack: MakeStack, tmp_path: Path, **timeouts: float) -> Stack:
    """A stack whose eu-north region has a fresh live reading (30 g/kWh, as its static
    figure), so upstream usage makes eco `measured` and estimated tokens show."""
    feed = tmp_path / "eu-north.json"
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    feed.write_text(json.dumps({"zone": "SE", "carbonIntensity": 30, "datetime": now,
                                "updatedAt": now}))

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["eu-north"]["intensity_feed"] = str(feed)
        d["timeouts"].update(timeouts)

    return make_stack(mutate)


def split_events(data: bytes | bytearray) -> list[bytes]:
    """Complete events of a whole SSE body; there must be no unfinished tail."""
    sp = EventSplitter()
    events = sp.feed(bytes(data))
    assert sp.close() == b""
    return events


def obj_of(event: bytes) -> dict[str, Any]:
    data = event_data(event)
    assert data is not None, event
    doc = orjson.loads(data)
    assert isinstance(doc, dict)
    return doc


def kinds(events: list[bytes], kind: int) -> list[bytes]:
    return [e for e in events if classify(e)[0] == kind]


def usage_sent(up: RecordedRequest) -> dict[str, int]:
    """The upstream's own usage, from its usage-only chunk."""
    (chunk,) = [obj_of(e) for e in kinds(split_events(up.sent), Kind.FINAL)
                if obj_of(e)["choices"] == []]
    return {"prompt": chunk["usage"]["prompt_tokens"],
            "completion": chunk["usage"]["completion_tokens"]}




def prompt_estimate(messages: list[Any]) -> int:
    """README's prompt estimate without usage: the messages' text, plus 16 characters
    per message for its role and framing, over 4, rounded up."""
    return math.ceil((sum(len(m["content"]) for m in messages) + 16 * len(messages)) / 4)


def chunks_with_choices(up_events: list[bytes]) -> int:
    """README's completion estimate without usage: one per chunk with choices that the
    upstream sent, up to a malformed event (where the relay stops reading)."""
    n = 0
    for e in up_events:
        data = event_data(e)
        if data is None or data == b"[DONE]":
            continue
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            break
        n += bool(doc.get("choices"))
    return n


def body_of(model: str = LLAMA, usage: bool | None = None, **knobs: Any) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": MSGS, "stream": True}
    if knobs:
        body["sim"] = knobs
    if usage is not None:
        body["stream_options"] = {"include_usage": usage}
    return orjson.dumps(body)


def auth(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.key}", "Content-Type": "application/json"}


@attrs.define
class Raw:
    """One raw streaming exchange: what the client got and what the upstream sent."""

    status: int
    headers: Mapping[str, str]
    events: list[bytes]
    up: RecordedRequest
    up_events: list[bytes]
    elapsed: float


async def raw_post(stack: Stack, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
    """POST a streaming request with aiohttp; (status, headers, the whole raw body)."""
    async with aiohttp.ClientSession() as s, s.post(
        f"{stack.base_url}/chat/completions", data=body, headers=auth(stack),
        timeout=aiohttp.ClientTimeout(total=15),
    ) as r:
        data = await r.read()  # raises if the chunked body does not end cleanly
        return r.status, r.headers.copy(), data


async def raw_stream(stack: Stack, body: bytes) -> Raw:
    """A raw streaming exchange, with the simulated upstream's record of it."""
    t0 = time.monotonic()
    status, headers, data = await raw_post(stack, body)
    elapsed = time.monotonic() - t0
    up = stack.requests_to(headers["X-LowRouter-Upstream"])[-1]
    await await_for(lambda: up.finished_at is not None)
    return Raw(status, headers, split_events(data), up, split_events(up.sent), elapsed)


def check_passthrough(raw: Raw, client_usage: bool) -> dict[str, Any]:
    """Everything before the end is byte for byte the upstream's; the end is as §1.1 says.

    Returns the `lowrouter` object of the final chunk.
    """
    assert raw.status == 200
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    assert raw.headers["Cache-Control"] == "no-cache"
    assert raw.headers["X-Accel-Buffering"] == "no"
    assert "Content-Encoding" not in raw.headers
    passed = kinds(raw.up_events, Kind.PASS)
    finals = kinds(raw.up_events, Kind.FINAL)
    (up_done,) = kinds(raw.up_events, Kind.DONE)
    (finish,) = [e for e in finals if obj_of(e)["choices"]]
    (usage,) = [e for e in finals if obj_of(e)["choices"] == []]
    n = len(passed)
    assert raw.events[:n] == passed
    assert raw.events[-1] == up_done
    if client_usage:
        assert raw.events[n:] == [finish, raw.events[-2], up_done]
        last = obj_of(raw.events[-2])
        lr = last.pop("lowrouter")
        assert last == obj_of(usage)
    else:
        assert len(raw.events) == n + 2
        last = obj_of(raw.events[-2])
        lr = last.pop("lowrouter")
        assert last == obj_of(finish)
        assert all(obj_of(e).get("choices") != [] for e in raw.events[:-1] if event_data(e))
    assert lr["eco"]["tokens"] == usage_sent(raw.up)
    assert lr["eco"]["accuracy"] == "measured"
    assert lr["route"] == {"model": LLAMA, "region": "eu-north", "upstream": "eu-north-a",
                           "pinned": False, "attempts": 1}
    assert lr["request_id"] == raw.headers["X-Request-Id"]
    return lr


def error_event(raw: Raw) -> dict[str, Any]:
    """The §1.1 error end: events so far byte for byte, one error event, no [DONE]."""
    assert raw.status == 200
    assert not kinds(raw.events, Kind.DONE)
    passed = kinds(raw.up_events, Kind.PASS)
    assert raw.events[:-1] == passed[: len(raw.events) - 1]
    last = obj_of(raw.events[-1])
    assert set(last["error"]) == {"message", "type", "code"}
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "error"}]
    assert "lowrouter" in last
    return last


@pytest.fixture
def live(make_stack: MakeStack, tmp_path: Path) -> Stack:
    return live_stack(make_stack, tmp_path)


@attrs.define
class Canned:
    """A hand-written upstream: every chat request gets `events`, one write each, `pause`
    seconds apart; a None in the list waits for `go` to be set."""

    events: list[bytes | None] = attrs.Factory(list)
    pause: float = 0.0
    requests: list[Any] = attrs.Factory(list)
    cookies: list[str | None] = attrs.Factory(list)  # each request's Cookie header
    go: asyncio.Event = attrs.Factory(asyncio.Event)
    url: str = ""
    json: bytes | None = None  # when set: the answer, as application/json, not `events`


@pytest.fixture
async def canned() -> AsyncIterator[Canned]:
    c = Canned()

    async def chat(request: web.Request) -> web.StreamResponse:
        c.requests.append(await request.json())
        c.cookies.append(request.headers.get("Cookie"))
        if c.json is not None:
            return web.Response(body=c.json, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.set_cookie("lb_session", f"for-request-{len(c.requests)}")
        await resp.prepare(request)
        for ev in c.events:
            if ev is None:
                await c.go.wait()
            else:
                await resp.write(ev)
                if c.pause:
                    await asyncio.sleep(c.pause)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    c.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    yield c
    c.go.set()
    await runner.cleanup()


def canned_stack(make_stack: MakeStack, canned: Canned) -> Stack:
    """A stack whose eu-north-a (the one upstream for LLAMA) is the canned upstream."""

    def mutate(d: dict[str, Any]) -> None:
        d["upstreams"][2]["base_url"] = canned.url

    return make_stack(mutate)


def chunk(choices: list[dict[str, Any]] | None = None, usage: dict[str, int] | None = None,
          *, content: str | None = None, finish: str | None = None, index: int = 0) -> bytes:
    """One chat.completion.chunk event, as OpenAI spells it."""
    if choices is None:
        delta = {} if content is None else {"content": content}
        choices = [{"index": index, "delta": delta, "finish_reason": finish}]
    doc: dict[str, Any] = {"id": "chatcmpl-c", "object": "chat.completion.chunk", "created": 1,
                           "model": "llama-3.1-8b", "choices": choices}
    if usage is not None:
        doc["usage"] = usage
    return b"data: " + orjson.dumps(doc) + b"\n\n"


# ---------------------------------------------------------------------------------------
# the OpenAI SDK's own loop


def test_sdk_sync_loop_never_meets_empty_choices(live: Stack) -> None:
    """The README loop `chunk.choices[0].delta.content` runs to the end; eco is on the last chunk."""
    stream = live.client().chat.completions.create(
        model=LLAMA, messages=MSGS, stream=True, extra_body={"sim": {"text": "one two three"}})
    text, last = "", None
    for chunk in stream:
        text += chunk.choices[0].delta.content or ""
        last = chunk
    assert text == "one two three "
    assert last is not None and last.choices[0].finish_reason == "stop"
    lr = (last.model_extra or {})["lowrouter"]
    assert lr["eco"]["tokens"] == usage_sent(live.requests_to("eu-north-a")[-1])


async def test_sdk_async_loop_never_meets_empty_choices(live: Stack) -> None:
    """The async README loop meets no empty `choices` either."""
    async with live.aclient() as client:
        stream = await client.chat.completions.create(
            model=LLAMA, messages=MSGS, stream=True, extra_body={"sim": {"chunks": 20}})
        chunks = [c async for c in stream]
    assert all(c.choices and c.choices[0].delta is not None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).count(" ") == 20
    assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "stop"]
    assert "lowrouter" in (chunks[-1].model_extra or {})
    assert not any("lowrouter" in (c.model_extra or {}) for c in chunks[:-1])


def test_sdk_stream_helper_gives_eco_on_its_chunk_events(live: Stack) -> None:
    """The README's snippet for the SDK's `chat.completions.stream(...)` helper: the eco
    metadata is read off its `chunk` events (its final completion keeps typed fields
    only), and is the upstream's usage."""
    with live.client().chat.completions.stream(model=LLAMA, messages=MSGS) as stream:
        eco = None
        for event in stream:
            if event.type == "chunk":
                eco = (event.chunk.model_extra or {}).get("lowrouter", {}).get("eco") or eco
    assert eco is not None and eco["accuracy"] in ("measured", "estimated")
    assert eco["tokens"] == usage_sent(live.requests_to("eu-north-a")[-1])


def test_sdk_include_usage_gets_usage_chunk_last(live: Stack) -> None:
    """With include_usage the SDK gets finish chunk, then usage chunk carrying lowrouter."""
    stream = live.client().chat.completions.create(
        model=LLAMA, messages=MSGS, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    lr = (chunks[-1].model_extra or {})["lowrouter"]
    assert lr["eco"]["tokens"] == {"prompt": chunks[-1].usage.prompt_tokens,
                                   "completion": chunks[-1].usage.completion_tokens}
    assert all(c.choices for c in chunks[:-1])


# ---------------------------------------------------------------------------------------
# byte for byte


@pytest.mark.parametrize("knobs", [
    {},
    {"split": "bytes"},
    {"split": "coalesce"},
    {"crlf": True},
    {"keepalive": True},
    {"split": "bytes", "crlf": True, "keepalive": True},
    {"split": "coalesce", "crlf": True, "keepalive": True, "chunks": 10},
], ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "plain")
async def test_events_pass_byte_for_byte(live: Stack, knobs: dict[str, Any]) -> None:
    """Each event before the end reaches the client exactly as the upstream sent it."""
    raw = await raw_stream(live, body_of(**knobs))
    check_passthrough(raw, client_usage=False)
    if knobs.get("crlf"):
        assert b"\r\n" in raw.events[1]


@pytest.mark.parametrize("knobs", [{}, {"split": "bytes", "crlf": True, "keepalive": True}])
async def test_include_usage_on(live: Stack, knobs: dict[str, Any]) -> None:
    """include_usage: finish chunk as sent, then the usage chunk with lowrouter, then [DONE]."""
    raw = await raw_stream(live, body_of(usage=True, **knobs))
    check_passthrough(raw, client_usage=True)
    assert raw.up.json["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("usage", [None, False])
async def test_include_usage_off_is_asked_upstream_but_consumed(live: Stack, usage: bool | None) -> None:
    """Without include_usage no `choices: []` chunk reaches the client, yet upstream is asked."""
    raw = await raw_stream(live, body_of(usage=usage))
    check_passthrough(raw, client_usage=False)
    assert raw.up.json["stream_options"] == {"include_usage": True}
    assert any(obj_of(e)["choices"] == [] for e in kinds(raw.up_events, Kind.FINAL))


async def test_omit_usage_estimates_tokens(live: Stack) -> None:
    """An upstream that sends no usage gets its tokens estimated, and accuracy says so."""
    raw = await raw_stream(live, body_of(omit_usage=True, chunks=6))
    assert raw.status == 200
    assert not [e for e in raw.up_events if b'"usage":{' in e]
    passed = kinds(raw.up_events, Kind.PASS)
    assert raw.events[: len(passed)] == passed
    lr = obj_of(raw.events[-2])["lowrouter"]
    assert raw.events[-1] == b"data: [DONE]\n\n"
    assert lr["eco"]["accuracy"] == "estimated"
    # README's rule: the role chunk, six words and the finish chunk are 8 chunks with choices
    assert lr["eco"]["tokens"] == {"prompt": prompt_estimate(MSGS),
                                   "completion": chunks_with_choices(raw.up_events)}
    assert lr["eco"]["tokens"]["completion"] == 8
    await await_for(lambda: live.metric("lrproxy_tokens_total", **KEY_LABELS, kind="prompt") > 0)
    assert live.metric("lrproxy_tokens_total", **KEY_LABELS, kind="completion") == \
        lr["eco"]["tokens"]["completion"]


async def test_finish_reason_in_content_chunk(live: Stack) -> None:
    """A content chunk that also finishes is held, then sent with lowrouter and its text."""
    raw = await raw_stream(live, body_of(text="a b c", finish_in_content=True))
    last = obj_of(raw.events[-2])
    assert last["choices"][0] == {"index": 0, "delta": {"content": "c "}, "logprobs": None,
                                  "finish_reason": "stop"}
    assert last["lowrouter"]["eco"]["tokens"] == usage_sent(raw.up)


async def test_stream_without_done_is_finished_by_the_proxy(live: Stack) -> None:
    """An upstream that ends cleanly without [DONE] still gives the client the full tail."""
    raw = await raw_stream(live, body_of(no_done=True))
    assert not kinds(raw.up_events, Kind.DONE)
    assert raw.events[-1] == b"data: [DONE]\n\n"
    assert obj_of(raw.events[-2])["lowrouter"]["eco"]["tokens"] == usage_sent(raw.up)


async def test_metrics_count_the_final_chunks_tokens(live: Stack) -> None:
    """Tokens, carbon and energy counted equal the eco object of the final chunk."""
    raw = await raw_stream(live, body_of(chunks=9))
    lr = check_passthrough(raw, client_usage=False)
    eco = lr["eco"]
    await await_for(lambda: live.metric("lrproxy_requests_total", **KEY_LABELS, code="200") == 1)
    assert live.metric("lrproxy_tokens_total", **KEY_LABELS, kind="prompt") == eco["tokens"]["prompt"]
    assert live.metric("lrproxy_tokens_total", **KEY_LABELS, kind="completion") == 9
    assert live.metric("lrproxy_carbon_grams_total", **KEY_LABELS) == pytest.approx(eco["carbon_g"])
    assert live.metric("lrproxy_energy_wh_total", **KEY_LABELS) == pytest.approx(eco["energy_wh"])


# ---------------------------------------------------------------------------------------
# upstream failures after the first byte


@pytest.mark.parametrize("knob", ["cut_after", "malformed_after"])
async def test_upstream_failure_mid_stream_ends_with_error_event(live: Stack, knob: str) -> None:
    """A cut or malformed stream ends with one error event, no [DONE], a clean chunked end."""
    # 20 ms apart: the first events go out before the failure is read (see
    # test_faults.py for a failure in the first read, which fails over)
    raw = await raw_stream(live, body_of(**{knob: 3, "chunks": 8, "chunk_delay_s": 0.02}))
    last = error_event(raw)
    assert last["error"]["code"] == "upstream_error"
    assert len(kinds(raw.events, Kind.PASS)) == 1 + 3  # the role chunk and three words
    # README's estimate: the chunks with choices the upstream sent before it failed
    assert last["lowrouter"]["eco"]["tokens"] == {
        "prompt": prompt_estimate(MSGS), "completion": chunks_with_choices(raw.up_events)}
    assert last["lowrouter"]["eco"]["tokens"]["completion"] == 1 + 3
    await await_for(
        lambda: live.metric("lrproxy_requests_total", **KEY_LABELS, code="stream_error") == 1)
    assert live.metric("lrproxy_tokens_total", **KEY_LABELS, kind="completion") == \
        last["lowrouter"]["eco"]["tokens"]["completion"]


@pytest.mark.parametrize("knob", ["cut_after", "malformed_after"])
def test_sdk_raises_api_error_on_failed_stream(live: Stack, knob: str) -> None:
    """The OpenAI SDK raises APIError at the error event, after the text so far."""
    stream = live.client().chat.completions.create(
        model=LLAMA, messages=MSGS, stream=True,
        extra_body={"sim": {knob: 2, "chunk_delay_s": 0.02}})
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert len(got) == 3
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "upstream_error"


async def test_failure_after_a_finish_chunk_still_sends_it(live: Stack) -> None:
    """An upstream cut after its finish chunk, before [DONE]: the held finish chunk was
    only delayed (SPEC §1.1), so it reaches the client byte for byte, then the error event."""
    raw = await raw_stream(live, body_of(chunks=3, finish_in_content=True, cut_after=3,
                                         chunk_delay_s=0.02))
    (finish,) = kinds(raw.up_events, Kind.FINAL)
    assert obj_of(finish)["choices"][0]["finish_reason"] == "stop"
    assert not kinds(raw.up_events, Kind.DONE)
    passed = kinds(raw.up_events, Kind.PASS)
    assert raw.status == 200 and not kinds(raw.events, Kind.DONE)
    assert raw.events[:-1] == [*passed, finish]
    last = obj_of(raw.events[-1])
    assert last["error"]["code"] == "upstream_error"
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "error"}]
    assert last["lowrouter"]["eco"]["tokens"] == {
        "prompt": prompt_estimate(MSGS), "completion": chunks_with_choices(raw.up_events)}


async def test_stall_longer_than_idle_times_out(make_stack: MakeStack, tmp_path: Path) -> None:
    """Silence past timeouts.idle ends the stream with an upstream_timeout error event."""
    stack = live_stack(make_stack, tmp_path, idle=0.4)
    raw = await raw_stream(stack, body_of(stall_after=2, stall_s=5))
    last = error_event(raw)
    assert last["error"]["code"] == "upstream_timeout"
    assert len(kinds(raw.events, Kind.PASS)) == 3
    assert 0.35 < raw.elapsed < 2.5
    assert raw.up.client_closed  # the proxy hung up on the stalled upstream


async def test_upstream_cookies_are_neither_kept_nor_passed_on(
    canned: Canned, make_stack: MakeStack
) -> None:
    """An upstream's Set-Cookie (a load balancer's session, say) goes to no client, and is
    not sent back upstream with later requests: one client's cookie never rides along
    with another client's request."""
    # By name: aiohttp's default cookie jar takes no cookies from an IP address.
    canned.url = canned.url.replace("127.0.0.1", "localhost")
    stack = canned_stack(make_stack, canned)
    canned.events = [chunk(content="a"), chunk(finish="stop"), b"data: [DONE]\n\n"]
    for _ in range(3):
        status, headers, _ = await raw_post(stack, body_of())
        assert status == 200 and "Set-Cookie" not in headers
    assert canned.cookies == [None, None, None]


async def test_upstream_error_object_mid_stream(canned: Canned, make_stack: MakeStack) -> None:
    """An error object inside the upstream's stream, after events went to the client,
    ends the client's stream with the error event. (In the stream's first read, before
    any byte went out, it fails over instead: test_faults.py.)"""
    stack = canned_stack(make_stack, canned)
    before = [chunk(content="a"), b": note\n\n", chunk(content="b")]
    canned.events = [*before, None,
                     b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
                     chunk(content="never")]
    asyncio.get_running_loop().call_later(0.2, canned.go.set)
    status, _, data = await raw_post(stack, body_of())
    events = split_events(data)
    assert status == 200 and events[:3] == before and len(events) == 4
    last = obj_of(events[-1])
    assert last["error"]["code"] == "upstream_error"
    assert last["choices"][0]["finish_reason"] == "error"
    assert last["lowrouter"]["eco"]["tokens"]["completion"] == 2


async def test_usage_on_content_chunks_is_not_held(canned: Canned, make_stack: MakeStack) -> None:
    """Content chunks that carry usage (vLLM continuous_usage_stats) go out at once."""
    stack = canned_stack(make_stack, canned)
    words = [chunk(content=w, usage={"prompt_tokens": 5, "completion_tokens": i + 1})
             for i, w in enumerate(["x", "y"])]
    finish = chunk(finish="stop", usage={"prompt_tokens": 5, "completion_tokens": 2})
    canned.events = [*words, None, finish, chunk([], {"prompt_tokens": 5, "completion_tokens": 2}),
                     b"data: [DONE]\n\n"]
    async with aiohttp.ClientSession() as s, s.post(
        f"{stack.base_url}/chat/completions", data=body_of(), headers=auth(stack),
        timeout=aiohttp.ClientTimeout(total=15),
    ) as r:
        async with asyncio.timeout(3):  # held chunks would never come before `go`
            got = [await r.content.readuntil(b"\n\n") for _ in words]
        assert got == words
        canned.go.set()
        rest = split_events(await r.read())
    assert rest[-1] == b"data: [DONE]\n\n" and len(rest) == 2
    last = obj_of(rest[0])
    assert last.pop("lowrouter")["eco"]["tokens"] == {"prompt": 5, "completion": 2}
    assert last == obj_of(finish)


@pytest.mark.parametrize("bad", [{"prompt_tokens": 2**64 - 6, "completion_tokens": 2},
                                 {"prompt_tokens": 2**64 - 6, "total_tokens": 2**64 - 4},
                                 {"prompt_tokens": 11, "total_tokens": "16"},
                                 {"prompt_tokens": 11}])
@pytest.mark.parametrize("stream", [True, False])
async def test_implausible_upstream_usage_is_estimated(
    canned: Canned, make_stack: MakeStack, stream: bool, bad: dict[str, Any],
) -> None:
    """A usage count past sse.MAX_USAGE_TOKENS (2**64 - 6: an upstream's unsigned
    underflow), or a chat answer's usage with no count of its completion, is no usage:
    the tokens are estimated (not a measured 0), and the counters stay usable."""
    stack = canned_stack(make_stack, canned)
    if stream:
        canned.events = [chunk(content="x"), chunk(finish="stop"), chunk([], bad),
                         b"data: [DONE]\n\n"]
        status, _, data = await raw_post(stack, body_of())
        eco = obj_of(split_events(data)[-2])["lowrouter"]["eco"]
    else:
        canned.json = orjson.dumps({
            "id": "x", "object": "chat.completion", "created": 1, "model": "llama-3.1-8b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}], "usage": bad})
        async with aiohttp.ClientSession() as s, s.post(
            f"{stack.base_url}/chat/completions", headers=auth(stack),
            data=orjson.dumps({"model": LLAMA, "messages": MSGS}),
        ) as r:
            status, eco = r.status, (await r.json())["lowrouter"]["eco"]
    assert status == 200 and eco["accuracy"] == "estimated"
    prompt = eco["tokens"]["prompt"]
    assert 0 < prompt < 1000  # the estimate from MSGS' text, not the upstream's figure
    await await_for(lambda: stack.metric_sum("lrproxy_tokens_total", kind="prompt") == prompt)


@pytest.mark.parametrize("odd", ["azure", "null", "ping"])
@pytest.mark.parametrize("usage", [True, False])
async def test_chunk_of_empty_choices_without_usage(
    canned: Canned, make_stack: MakeStack, usage: bool, odd: str,
) -> None:
    """Azure's first chunk (`choices: []`, `prompt_filter_results`, no usage) is not the
    usage-only chunk: a client that asked for usage (and so handles empty choices) gets
    it at once, as sent; one that did not never meets it, as it never meets the usage
    chunk (SPEC §1.1). It is not counted as a token either way. So too a chunk whose
    `choices` is null, or a data event without any (a ping), which would fail the
    OpenAI SDK's `chunk.choices[0]` loop as well."""
    stack = canned_stack(make_stack, canned)
    filt = {
        "azure": chunk([]).replace(b'"choices":[]', b'"choices":[],"prompt_filter_results":'
                                   b'[{"prompt_index":0,"content_filter_results":{}}]'),
        "null": chunk([]).replace(b'"choices":[]', b'"choices":null'),
        "ping": b'data: {"type":"ping"}\n\n',
    }[odd]
    words = [chunk(content=w) for w in ("x", "y")]
    canned.events = [filt, *words, None, chunk(finish="stop"), b"data: [DONE]\n\n"]
    first = [filt, *words] if usage else words
    async with aiohttp.ClientSession() as s, s.post(
        f"{stack.base_url}/chat/completions", data=body_of(usage=usage), headers=auth(stack),
        timeout=aiohttp.ClientTimeout(total=15),
    ) as r:
        async with asyncio.timeout(3):  # a held chunk would not come before `go`
            got = [await r.content.readuntil(b"\n\n") for _ in first]
        assert got == first
        canned.go.set()
        rest = split_events(await r.read())
    assert rest[-1] == b"data: [DONE]\n\n" and len(rest) == 2
    eco = obj_of(rest[0])["lowrouter"]["eco"]
    assert eco["accuracy"] == "estimated"
    assert eco["tokens"]["completion"] == 3  # the two words and the finish chunk


async def test_json_answer_to_a_stream_request_is_a_502(
    canned: Canned, make_stack: MakeStack,
) -> None:
    """An upstream that answers `"stream": true` with a JSON completion would give the
    SDK's stream loop no chunk and no error: the proxy fails the attempt instead."""
    stack = canned_stack(make_stack, canned)
    canned.json = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]})
    status, headers, body = await raw_post(stack, body_of())
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert len(canned.requests) == 1 and headers["X-LowRouter-Upstream"] != "eu-north-a"
    lr = obj_of(split_events(body)[-2])["lowrouter"]
    assert lr["route"]["attempts"] == 2  # failed over, as from a malformed event
    async with aiohttp.ClientSession() as s, s.post(  # pinned: nowhere else to go
        f"{stack.base_url}/chat/completions", data=body_of(),
        headers={**auth(stack), "X-LowRouter-Region": "eu-north"},
        timeout=aiohttp.ClientTimeout(total=15),
    ) as r:
        assert r.status == 502
        err = (await r.json())["error"]
    assert err["code"] == "upstream_error"
    assert "without an event stream" in err["message"] and "application/json" in err["message"]
    assert len(canned.requests) >= 2  # retried where it was pinned, then answered


async def test_comments_before_the_first_event_do_not_commit(
    canned: Canned, make_stack: MakeStack,
) -> None:
    """An upstream that sends only a comment (`: OPENROUTER PROCESSING`) and then ends
    has sent no event: the attempt fails over, or is a 502 where pinned, instead of a
    200 and an error event; comments before a first event go on with it, as they came."""
    stack = canned_stack(make_stack, canned)
    comment = b": OPENROUTER PROCESSING\n\n"
    canned.events = [comment]
    status, headers, body = await raw_post(stack, body_of())
    assert status == 200 and headers["X-LowRouter-Upstream"] != "eu-north-a"
    assert obj_of(split_events(body)[-2])["lowrouter"]["route"]["attempts"] == 2
    assert comment not in body
    status, headers, body = await _pinned_post(stack)
    assert status == 502 and orjson.loads(body)["error"]["code"] == "upstream_error"
    canned.events = [comment, comment, chunk(content="a"), chunk(finish="stop"),
                     b"data: [DONE]\n\n"]
    canned.pause = 0.02
    status, headers, body = await _pinned_post(stack)
    assert status == 200 and body.startswith(comment + comment + chunk(content="a"))


async def _pinned_post(stack: Stack) -> tuple[int, Mapping[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(
        f"{stack.base_url}/chat/completions", data=body_of(),
        headers={**auth(stack), "X-LowRouter-Region": "eu-north"},
        timeout=aiohttp.ClientTimeout(total=15),
    ) as r:
        return r.status, r.headers.copy(), await r.read()


@pytest.mark.parametrize("broken", [
    b'}}],"usage":null}', b'}},"usage":null}',  # a bracket short, after a good chunk
    b'}}],"usage":null,}',  # a trailing comma
])
async def test_malformed_chunk_of_a_learnt_shape_ends_the_stream(
    canned: Canned, make_stack: MakeStack, broken: bytes,
) -> None:
    """Content chunks one per read teach the relay their shape; a chunk with the same
    start whose JSON is broken (though it ends in `}`), or whose text holds an escape
    JSON has not, is never relayed: the stream ends with the error event (SPEC §1.1),
    and the SDK raises APIError."""
    stack = canned_stack(make_stack, canned)
    good = [chunk(content=w).replace(b"}]}", b'}],"usage":null}') for w in ["One", " two"]]
    bad = [good[0].replace(b'"One"', b'" three"').replace(b'}],"usage":null}', broken),
           good[0].replace(b'"One"', b'" thr\\qee"')]
    for b in bad:
        canned.events = [*good, b, good[1], chunk(finish="stop"), b"data: [DONE]\n\n"]
        canned.pause = 0.02
        status, _, body = await raw_post(stack, body_of())
        events = split_events(body)
        assert status == 200 and events[:2] == good and len(events) == 3, events
        err = obj_of(events[2])
        assert err["error"]["code"] == "upstream_error" and "malformed" in err["error"]["message"]
        assert err["choices"][0]["finish_reason"] == "error" and b"[DONE]" not in body
    client = stack.client(max_retries=0)
    with pytest.raises(openai.APIError):
        await asyncio.to_thread(lambda: list(client.chat.completions.create(
            model=LLAMA, messages=MSGS, stream=True)))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [
    # a JSON object over two data lines joined by CR CR: one valid event to a parser that
    # takes no lone CR for a line end, two halves of JSON to the SDK (the SSE standard's)
    b'data: {"id":"chatcmpl-c","object":"chat.completion.chunk",\r\r'
    b'data: "choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n',
    b": \xff\xfe\n\n",  # a comment, not UTF-8: the SDK decodes every line
    b"event: \xc3\ndata: " + chunk(content="x")[6:],  # a field, not UTF-8
])
async def test_event_the_sdk_would_read_otherwise_ends_the_stream(
    canned: Canned, make_stack: MakeStack, bad: bytes,
) -> None:
    """An event with a lone CR or bytes that are not UTF-8 outside its data is
    malformed: never relayed, the stream ends with the error event, and the SDK raises
    APIError (it raised JSONDecodeError or UnicodeDecodeError, and the request counted as
    the client's close)."""
    stack = canned_stack(make_stack, canned)
    good = [chunk(content=w) for w in ["One", " two"]]
    canned.events = [*good, bad, chunk(finish="stop"), b"data: [DONE]\n\n"]
    canned.pause = 0.02
    status, _, body = await raw_post(stack, body_of())
    events = split_events(body)
    assert status == 200 and events[:2] == good and len(events) == 3, events
    err = obj_of(events[2])
    assert "malformed" in err["error"]["message"] and bad not in body
    client = stack.client(max_retries=0)
    with pytest.raises(openai.APIError):
        await asyncio.to_thread(lambda: list(client.chat.completions.create(
            model=LLAMA, messages=MSGS, stream=True)))  # type: ignore[arg-type]


async def test_finish_chunks_past_the_cap_end_the_stream(
    canned: Canned, make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finish chunks are held until [DONE] (SPEC §1.1), but not without end: past
    MAX_EVENT_BYTES of them (a server in a loop) the stream ends with the error event,
    and the ones held are dropped, not relayed."""
    from lrproxy import relay

    monkeypatch.setattr(relay, "MAX_EVENT_BYTES", 4096)
    stack = canned_stack(make_stack, canned)
    fin = chunk(finish="stop")
    n = 4096 // len(fin) + 1
    canned.events = [chunk(content="One"), *[fin] * (n + 5), b"data: [DONE]\n\n"]
    canned.pause = 0.01  # a read each: the first chunk commits the stream (no failover)
    status, _, body = await raw_post(stack, body_of())
    events = split_events(body)
    assert status == 200 and events[0] == chunk(content="One"), events[:2]
    assert len(events) == 2 and b'"finish_reason":"stop"' not in body, events
    assert "16 MiB of finish chunks" in obj_of(events[-1])["error"]["message"]


async def test_stall_inside_an_event_says_so(canned: Canned, make_stack: MakeStack) -> None:
    """An upstream silent past `idle` in the middle of an event: the error event says
    it went silent inside an event, not between events."""
    def mutate(d: dict[str, Any]) -> None:
        d["upstreams"][2]["base_url"] = canned.url
        d["timeouts"]["idle"] = 0.3

    stack = make_stack(mutate)
    one = chunk(content="One")
    canned.events = [one, one[:20], None, one[20:]]
    status, _, body = await raw_post(stack, body_of())
    canned.go.set()
    events = split_events(body)
    assert status == 200 and events[0] == one
    assert "went silent inside an event" in obj_of(events[-1])["error"]["message"]


async def test_tool_call_answer_without_usage_counts_its_calls(
    canned: Canned, make_stack: MakeStack,
) -> None:
    """A JSON answer of tool calls (content null) with no usage: the completion tokens
    are estimated from the calls' names and arguments, not counted as none."""
    from lrproxy.eco import estimate_tokens

    stack = canned_stack(make_stack, canned)
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": name, "arguments": orjson.dumps(args).decode()}}
             for i, (name, args) in enumerate([("get_weather", {"city": "Paris", "unit": "c"}),
                                               ("get_time", {"tz": "Europe/Paris"})])]
    canned.json = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": calls},
         "finish_reason": "tool_calls"}]})
    async with aiohttp.ClientSession() as s, s.post(
        f"{stack.base_url}/chat/completions",
        data=orjson.dumps({"model": LLAMA, "messages": MSGS}),
        headers={**auth(stack), "X-LowRouter-Region": "eu-north"},
        timeout=aiohttp.ClientTimeout(total=15),
    ) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["choices"][0]["message"]["tool_calls"] == calls
    chars = sum(len(c["function"]["name"]) + len(c["function"]["arguments"]) for c in calls)
    tokens = doc["lowrouter"]["eco"]["tokens"]
    assert tokens["completion"] == estimate_tokens(chars) > 0
    assert doc["lowrouter"]["eco"]["accuracy"] == "estimated"


async def test_chunks_shaped_alike_take_the_short_check(
    canned: Canned, make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Content chunks one per read, as from a live model: after the first, those of the
    same shape pass by `sse.ChunkShape`'s check, the rest (a quote in the text, a new
    shape, the finish chunk) by the full one; the client gets the upstream's bytes, and
    every content chunk is counted."""
    fitted: list[bytes] = []
    real = sse.ChunkShape.fits

    def spy(self: sse.ChunkShape, data: bytes) -> bool:
        ok = real(self, data)
        if ok:
            fitted.append(data)
        return ok

    monkeypatch.setattr(sse.ChunkShape, "fits", spy)
    stack = canned_stack(make_stack, canned)
    role = chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                   "finish_reason": None}])
    words = [chunk(content=w) for w in ["One", " two", ' "three"', " four\\", " five"]]
    padded = [chunk(content=w).replace(b"}]}\n\n", b'}],"obfuscation":"%s"}\n\n' % pad)
              for w, pad in [(" six", b"ab"), (" seven", b"c"), (" eight", b"def")]]
    canned.events = [role, *words, *padded, chunk(finish="stop"), b"data: [DONE]\n\n"]
    canned.pause = 0.02
    status, _, data = await raw_post(stack, body_of())
    events = split_events(data)
    assert status == 200 and events[:9] == [role, *words, *padded] and len(events) == 11
    # no usage came: the estimate is one token per chunk, the finish chunk's included
    assert obj_of(events[9]).pop("lowrouter")["eco"]["tokens"]["completion"] == 10
    # the role chunk taught the first shape, " One" the next: " two" fits it, the quoted
    # text does not, the text ending in an escaped backslash not either; " five" does
    assert fitted[:2] == [words[1], words[4]]
    assert fitted[2:] == padded[1:]  # the padded chunks: a shape of their own


@pytest.mark.parametrize("usage", [False, True])
async def test_two_choices_hold_every_finish_chunk(
    canned: Canned, make_stack: MakeStack, usage: bool,
) -> None:
    """With n=2 both finish chunks wait for the end, in order; lowrouter goes on the last."""
    stack = canned_stack(make_stack, canned)
    fin0, fin1 = chunk(finish="stop", index=0), chunk(finish="length", index=1)
    use = chunk([], {"prompt_tokens": 4, "completion_tokens": 6})
    canned.events = [chunk(content="a", index=0), chunk(content="b", index=1), fin0,
                     chunk(content="c", index=1), fin1, use, b"data: [DONE]\r\n\r\n"]
    status, _, data = await raw_post(stack, body_of(usage=usage))
    events = split_events(data)
    assert status == 200
    assert events[:3] == [chunk(content="a", index=0), chunk(content="b", index=1),
                          chunk(content="c", index=1)]
    assert events[-1] == b"data: [DONE]\r\n\r\n"
    assert events[3] == fin0
    last = obj_of(events[-2])
    assert last.pop("lowrouter")["eco"]["tokens"] == {"prompt": 4, "completion": 6}
    if usage:
        assert events[4] == fin1 and last == obj_of(use) and len(events) == 7
    else:
        assert last == obj_of(fin1) and len(events) == 6
    assert canned.requests[0]["stream_options"] == {"include_usage": True}


async def test_a_finish_beside_another_choices_text_is_not_held(
    canned: Canned, make_stack: MakeStack,
) -> None:
    """A chunk that ends choice 0 and carries choice 1's text (an upstream that packs
    choices together) goes out at once: held, its text would come after choice 1's next
    piece. Only the chunk that ends choice 1 waits, and carries lowrouter."""
    stack = canned_stack(make_stack, canned)
    both = chunk([{"index": 0, "delta": {"content": "A1"}, "finish_reason": None},
                  {"index": 1, "delta": {"content": "B1 "}, "finish_reason": None}])
    mixed = chunk([{"index": 0, "delta": {}, "finish_reason": "stop"},
                   {"index": 1, "delta": {"content": "B2 "}, "finish_reason": None}])
    fin1 = chunk(finish="length", index=1)
    canned.events = [both, mixed, chunk(content="B3", index=1), fin1,
                     chunk([], {"prompt_tokens": 4, "completion_tokens": 5}), b"data: [DONE]\n\n"]
    status, _, data = await raw_post(stack, body_of())
    events = split_events(data)
    assert status == 200 and events[-1] == b"data: [DONE]\n\n", events
    assert events[:3] == [both, mixed, chunk(content="B3", index=1)]
    text = "".join(c["delta"].get("content", "") for ev in events[:-1]
                   for c in obj_of(ev)["choices"] if c["index"] == 1)
    assert text == "B1 B2 B3"
    last = obj_of(events[3])
    assert last.pop("lowrouter")["eco"]["tokens"] == {"prompt": 4, "completion": 5}
    assert last == obj_of(fin1) and len(events) == 5


@pytest.mark.parametrize("logprobs", [None, {"content": [], "refusal": None}])
@pytest.mark.parametrize("usage", [False, True])
async def test_a_usage_chunk_with_an_empty_choice_stays_behind_the_finish(
    canned: Canned, make_stack: MakeStack, usage: bool, logprobs: Any,
) -> None:
    """Usage on a chunk whose one choice has an empty delta (and no logprobs, or empty
    ones), after the finish chunk: held with it, in the upstream's order, so the SDK
    still reads usage off the last chunk. The same shape before any finish (a role chunk
    with usage) goes out at once."""
    stack = canned_stack(make_stack, canned)
    empty = [{"index": 0, "delta": {"content": ""}, "logprobs": logprobs,
              "finish_reason": None}]
    role = chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                   "finish_reason": None}], {"prompt_tokens": 4, "completion_tokens": 0})
    fin = chunk(finish="stop")
    tally = chunk(empty, {"prompt_tokens": 4, "completion_tokens": 1})
    canned.events = [role, chunk(content="x"), None, fin, tally, b"data: [DONE]\n\n"]
    async with aiohttp.ClientSession() as s, s.post(
        f"{stack.base_url}/chat/completions", data=body_of(usage=usage), headers=auth(stack),
        timeout=aiohttp.ClientTimeout(total=15),
    ) as r:
        async with asyncio.timeout(3):  # a held chunk would not come before `go`
            got = [await r.content.readuntil(b"\n\n") for _ in range(2)]
        assert got == [role, chunk(content="x")]
        canned.go.set()
        rest = split_events(await r.read())
    assert rest[0] == fin and rest[-1] == b"data: [DONE]\n\n" and len(rest) == 3, rest
    last = obj_of(rest[1])
    assert last.pop("lowrouter")["eco"]["tokens"] == {"prompt": 4, "completion": 1}
    assert last == obj_of(tally)


async def test_the_chunk_made_for_lowrouter_is_shaped_as_the_upstreams(
    canned: Canned, make_stack: MakeStack,
) -> None:
    """No finish chunk came (the stream ended at [DONE] after its text): the chunk the
    proxy makes to carry lowrouter has the upstream chunks' id, created, model and
    system_fingerprint, which the OpenAI chunk schema requires."""
    stack = canned_stack(make_stack, canned)
    first = orjson.loads(chunk(content="hello")[6:])
    first["system_fingerprint"] = "fp_1"
    canned.events = [b"data: " + orjson.dumps(first) + b"\n\n",
                     chunk([], {"prompt_tokens": 4, "completion_tokens": 1}),
                     b"data: [DONE]\n\n"]
    status, _, data = await raw_post(stack, body_of())
    events = split_events(data)
    assert status == 200 and len(events) == 3, events
    made = obj_of(events[1])
    assert made.pop("lowrouter")["eco"]["tokens"] == {"prompt": 4, "completion": 1}
    assert made == {"id": first["id"], "object": "chat.completion.chunk",
                    "created": first["created"], "model": first["model"],
                    "system_fingerprint": "fp_1",
                    "choices": [{"index": 0, "delta": {}, "finish_reason": None}]}


@pytest.mark.parametrize(("sent", "ask", "want"), [
    (None, True, {"include_usage": True}),
    ({"include_usage": False, "continuous_usage_stats": True}, True,
     {"include_usage": True, "continuous_usage_stats": True}),  # (SPEC §2: the rest as sent)
    (None, False, None),
    ({}, False, None),
    ({"include_usage": False, "continuous_usage_stats": True}, False,
     {"continuous_usage_stats": True}),
    ({"include_usage": True}, False, None),  # the client's ask, answered by the proxy
])
async def test_stream_options_sent_upstream(
    canned: Canned, make_stack: MakeStack, sent: dict[str, Any] | None, ask: bool,
    want: dict[str, Any] | None,
) -> None:
    """A stream asks the upstream for usage, the client's other stream_options kept;
    with `stream_usage = false` (Mistral's API refuses the field with a 422) the upstream
    gets the client's other stream_options only, even when the client asked for usage.
    Mistral's usage on its finish chunk is then counted, and a client that asked reads
    it there, as from Mistral directly: one usage report, not two."""
    def mutate(d: dict[str, Any]) -> None:
        d["upstreams"][2]["base_url"] = canned.url
        d["upstreams"][2]["stream_usage"] = ask

    stack = make_stack(mutate)
    canned.events = [chunk(content="hi"),
                     chunk(finish="stop", usage={"prompt_tokens": 7, "completion_tokens": 2}),
                     b"data: [DONE]\n\n"]
    body = orjson.loads(body_of())
    if sent is not None:
        body["stream_options"] = sent
    status, _, data = await raw_post(stack, orjson.dumps(body))
    assert status == 200
    assert canned.requests[0].get("stream_options") == want
    events = split_events(data)
    last = obj_of(events[-2])
    assert last["lowrouter"]["eco"]["tokens"] == {"prompt": 7, "completion": 2}
    assert last["choices"][0]["finish_reason"] == "stop"
    # one usage report, the upstream's own (a made usage chunk beside it: LangChain adds
    # them up)
    assert [obj_of(e).get("usage") for e in events[:-1]] == [
        None, {"prompt_tokens": 7, "completion_tokens": 2}]


# ---------------------------------------------------------------------------------------
# keep-alive


async def test_stall_shorter_than_idle_gets_keepalives(make_stack: MakeStack, tmp_path: Path) -> None:
    """Upstream silence past timeouts.keepalive sends `: keep-alive`; the stream then completes."""
    stack = live_stack(make_stack, tmp_path, keepalive=0.15, idle=5)
    raw = await raw_stream(stack, body_of(stall_after=2, stall_s=0.8))
    assert KEEPALIVE not in raw.up_events
    ours = [i for i, e in enumerate(raw.events) if e == KEEPALIVE]
    assert len(ours) >= 2
    assert ours == list(range(ours[0], ours[0] + len(ours)))  # together, during the stall
    assert ours[0] == 3  # after the role chunk and two words
    raw.events = [e for e in raw.events if e != KEEPALIVE]
    check_passthrough(raw, client_usage=False)


async def test_slow_first_event_commits_with_keepalive(make_stack: MakeStack, tmp_path: Path) -> None:
    """A first event later than timeouts.keepalive: 200 and keep-alive come before it."""
    stack = live_stack(make_stack, tmp_path, keepalive=0.2)
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s, s.post(
        f"{stack.base_url}/chat/completions", data=body_of(first_delay_s=1.2), headers=auth(stack),
        timeout=aiohttp.ClientTimeout(total=15),
    ) as r:
        t_headers = time.monotonic() - t0
        first = await r.content.readuntil(b"\n\n")
        t_first = time.monotonic() - t0
        rest = await r.read()
    assert r.status == 200
    assert t_headers < 0.9 and t_first < 0.9
    assert first == KEEPALIVE
    events = split_events(first + rest)
    assert events[-1] == b"data: [DONE]\n\n"
    assert obj_of(events[-2])["choices"][0]["finish_reason"] == "stop"


async def test_idle_shorter_than_first_byte_does_not_cut_the_first_wait(
    make_stack: MakeStack, tmp_path: Path,
) -> None:
    """After a keep-alive commit the first event may take first_byte, not idle: a model
    slow to start and quick after (idle < first_byte) still answers."""
    stack = live_stack(make_stack, tmp_path, keepalive=0.2, idle=0.5, first_byte=5)
    raw = await raw_stream(stack, body_of(first_delay_s=1.2))
    assert raw.status == 200 and raw.events[0] == KEEPALIVE
    raw.events = [e for e in raw.events if e != KEEPALIVE]
    assert raw.events[-1] == b"data: [DONE]\n\n"
    assert obj_of(raw.events[-2])["choices"][0]["finish_reason"] == "stop"


async def test_first_byte_timeout_counts_from_the_request(make_stack: MakeStack, tmp_path: Path) -> None:
    """Keep-alives do not extend timeouts.first_byte: the error comes at first_byte, not later."""
    stack = live_stack(make_stack, tmp_path, keepalive=0.6, first_byte=0.8)
    raw = await raw_stream(stack, body_of(first_delay_s=5))
    assert raw.events[0] == KEEPALIVE
    raw.events = [e for e in raw.events if e != KEEPALIVE]
    last = error_event(raw)
    assert last["error"]["code"] == "upstream_timeout"
    assert raw.elapsed < 1.15  # 0.8 s; the keep-alive time (0.6 s) must not be added


# ---------------------------------------------------------------------------------------
# failover before the first byte


async def test_503_before_first_event_fails_over_within_region(stack: Stack) -> None:
    """A 503 before the first event fails over to the other upstream of the pinned region."""
    stack.sims["eu-west-a"].faults.fail_status = 503
    stack.sims["eu-west-a"].faults.fail_count = -1
    body = orjson.loads(body_of(MINI))
    body["route"] = {"region": "eu-west"}
    raw = await raw_stream(stack, orjson.dumps(body))
    assert raw.status == 200
    assert raw.headers["X-LowRouter-Upstream"] == "eu-west-b"
    assert [r.sent for r in stack.requests_to("eu-west-a")] == [
        bytearray(b'{"error":{"message":"Simulated error 503 from eu-west-a.",'
                  b'"type":"server_error","param":null,"code":null}}')]
    assert stack.requests_to("us-east-a") == []
    passed = kinds(raw.up_events, Kind.PASS)
    assert raw.events[: len(passed)] == passed
    assert raw.events[-1] == b"data: [DONE]\n\n" and len(raw.events) == len(passed) + 2
    lr = obj_of(raw.events[-2])["lowrouter"]
    assert lr["route"] == {"model": MINI, "region": "eu-west", "upstream": "eu-west-b",
                           "pinned": True, "attempts": 2}
    assert stack.metric("lrproxy_upstream_attempts_total", upstream="eu-west-a",
                        outcome="status_5xx") == 1


# ---------------------------------------------------------------------------------------
# the client leaves


async def test_client_disconnect_cancels_upstream_and_counts(live: Stack) -> None:
    """A client gone mid-stream cancels the upstream request at once; tokens so far count."""
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{live.base_url}/chat/completions",
                         data=body_of(chunks=400, chunk_delay_s=0.05), headers=auth(live))
        for _ in range(4):
            await r.content.readuntil(b"\n\n")
        up = live.requests_to("eu-north-a")[-1]
        r.close()
        t_close = time.monotonic()
    await await_for(lambda: up.finished_at is not None, timeout=3)
    assert up.finished_at is not None
    assert up.finished_at - t_close < 0.5
    assert up.client_closed
    assert len(split_events(up.sent)) < 20
    code = {**KEY_LABELS, "code": "client_closed"}
    await await_for(lambda: live.metric("lrproxy_requests_total", **code) == 1)
    assert live.metric("lrproxy_tokens_total", **KEY_LABELS, kind="prompt") > 0
    assert live.metric("lrproxy_tokens_total", **KEY_LABELS, kind="completion") >= 3
    assert live.metric("lrproxy_carbon_grams_total", **KEY_LABELS) > 0
    assert live.sims["eu-north-a"].open_streams == 0


# ---------------------------------------------------------------------------------------
# backpressure


def test_slow_reader_stalls_the_upstream(stack: Stack) -> None:
    """A client that stops reading stalls the upstream's writes: nothing buffers unboundedly."""
    chunks = 200_000  # a stream of over 30 MB, several times what the socket buffers hold
    body = body_of(chunks=chunks)
    sim = stack.sims["eu-north-a"]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", stack.port))
        sock.sendall(
            b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: lrproxy\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer " + stack.key.encode()
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert sock.recv(64).startswith(b"HTTP/1.1 200 ")
        wait_for(lambda: sim.requests and len(sim.requests[-1].sent) > 0, timeout=10)
        up = sim.requests[-1]
        # Read nothing: the upstream's `sent` must stop growing, far below the whole stream.
        sizes = [len(up.sent)]
        deadline = time.monotonic() + 8
        while len(sizes) < 3 or sizes[-1] != sizes[-3]:
            assert time.monotonic() < deadline, f"upstream never stalled: {sizes[-5:]}"
            time.sleep(0.15)
            sizes.append(len(up.sent))
        stalled_at = sizes[-1]
        smallest = min(map(len, EventSplitter().feed(bytes(up.sent[: 1 << 20]))))
        assert stalled_at < chunks * smallest // 3, (stalled_at, chunks * smallest)
        assert sim.open_streams == 1 and up.finished_at is None
        # Reading again lets the upstream write again.
        got = 0
        while got < 4 << 20:
            data = sock.recv(1 << 16)
            assert data, "connection closed early"
            got += len(data)
        wait_for(lambda: len(up.sent) > stalled_at)
        t_close = time.monotonic()
    # The client leaves with most of the stream unsent: the upstream is cancelled.
    wait_for(lambda: up.finished_at is not None)
    assert up.client_closed and up.finished_at is not None
    assert up.finished_at - t_close < 0.5
    assert len(up.sent) < chunks * smallest // 2


async def test_stream_writes_go_straight_to_the_transport(
    live: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the installed aiohttp, a stream's chunks after its first events take the
    direct write (`relay._ChunkWriter`), and arrive as the upstream sent them."""
    from lrproxy import relay

    written: list[bytes] = []
    real = relay._ChunkWriter.write

    def spy(self: relay._ChunkWriter, data: bytes) -> bool:
        written.append(data)
        return real(self, data)

    monkeypatch.setattr(relay._ChunkWriter, "write", spy)
    raw = await raw_stream(live, body_of(chunks=8, chunk_delay_s=0.01))
    check_passthrough(raw, client_usage=False)
    assert len(written) >= 3  # chunks 10 ms apart: a write each, mostly
    # what went the direct way is the upstream's content chunks after the first, in order
    assert b"".join(written) == b"".join(raw.up_events[1:1 + len(split_events(b"".join(written)))])


async def test_direct_writer_only_for_plain_chunked_responses() -> None:
    """`_ChunkWriter.of` takes a prepared chunked response as it is, and declines one
    whose writer would change the bytes (compression) or count them (a length)."""
    from lrproxy import relay

    seen: dict[str, bool] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        kind = request.query["kind"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if kind == "compressed":
            resp.enable_compression()
        elif kind == "length":
            resp.content_length = 7
        await resp.prepare(request)
        await resp.write(b"first\n\n")
        fast = relay._ChunkWriter.of(request)
        seen[kind] = fast is not None
        if fast is not None:
            assert fast.write(b"second\n\n") is False
            await resp.write_eof()
        elif kind == "length":
            await resp.write_eof(b"")
        else:
            await resp.write_eof(b"second\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as s:
            for kind in ("plain", "compressed", "length"):
                async with s.get(f"http://127.0.0.1:{port}/", params={"kind": kind},
                                 headers={"Accept-Encoding": "gzip"}) as r:
                    body = await r.read()
                assert body == (b"first\n\nsecond\n\n" if kind != "length" else b"first\n\n")
    finally:
        await runner.cleanup()
    assert seen == {"plain": True, "compressed": False, "length": False}


# ---------------------------------------------------------------------------------------
# the shape's fast path: same bytes, same counts as parsing every event

_HEAD = b'data: {"id":"c","object":"chat.completion.chunk","model":"m",'
_READ_EVENTS: list[bytes] = [
    _HEAD + b'"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}],"usage":null}\n\n',
    _HEAD + b'"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":null}]}\n\n',
    _HEAD + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n',
    _HEAD + b'"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n',
    _HEAD + b'"choices":[{"index":0,"delta":{"content":"c"},"finish_reason":null}]}\r\n\r\n',
    b": keep-alive\n\n",
    b'data: {"error":{"message":"x"}}\n\n',
    b"data: [DONE]\n\n",
    # a content chunk's bytes with a bracket short: no JSON, though it ends in }
    _HEAD + b'"choices":[{"index":0,"delta":{"content":"d"},"finish_reason":null},"usage":null}\n\n',
    _HEAD + b'"choices":[{"index":0,"delta":{"content":"e\\q"},"finish_reason":null}],"usage":null}\n\n',
]


@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.sampled_from(_READ_EVENTS), max_size=12),
       points=st.lists(st.integers(0, 100_000), max_size=6))
def test_shaped_chunks_fast_path_equals_parsing_every_event(
    events: list[bytes], points: list[int]
) -> None:
    """However the upstream's bytes are cut into reads, `relay._take` (which passes
    chunks of a learnt shape unparsed) forwards the same bytes and counts the same
    events, usage, held chunks and end as splitting every read into events and parsing
    each one; a malformed chunk among them fails the stream in both."""
    from lrproxy import relay

    data = b"".join(events)
    bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    reads = [data[a:b] for a, b in itertools.pairwise(bounds)]
    fast_sp, slow_sp = EventSplitter(), EventSplitter()
    fast, slow = relay._Tail(), relay._Tail()
    slow.shape.lessons = 0  # learns nothing, so fits nothing: every event is parsed
    fast_out, slow_out = [], []
    fast_n = slow_n = 0
    for r in reads:
        if fast.done or fast.failure:
            break
        out, n = relay._take(r, fast_sp, fast)
        fast_out.append(out)
        fast_n += n
        evs = slow_sp.feed(r)
        slow_out.append(relay._take_events(evs, slow) if evs else b"")
        slow_n += len(evs)
    assert b"".join(fast_out) == b"".join(slow_out)
    assert attrs.asdict(fast, recurse=False, filter=lambda a, v: a.name not in ("failure", "shape")) \
        == attrs.asdict(slow, recurse=False, filter=lambda a, v: a.name not in ("failure", "shape"))
    assert type(fast.failure) is type(slow.failure)
    if not (fast.done or fast.failure):
        assert fast_n == slow_n


def test_streams_and_answers_reuse_one_upstream_connection(live: Stack) -> None:
    """Streams and answers one after another all travel on one upstream
    connection: a stream's end, which may come after [DONE], is read so that its
    connection is kept (and the client does not wait for it)."""
    client = live.client()
    for i in range(6):
        if i % 3 == 2:
            client.chat.completions.create(model=LLAMA, messages=MSGS)
        else:
            t0 = time.monotonic()
            for _ in client.chat.completions.create(
                    model=LLAMA, messages=MSGS, stream=True,
                    stream_options={"include_usage": bool(i % 2)},
                    extra_body={"sim": {"end_delay_s": 0.5}}):
                pass
            assert time.monotonic() - t0 < 0.4  # the client does not wait for it
            time.sleep(0.7)  # the proxy reads the upstream's end meanwhile
    peers = {r.peer for r in live.requests_to("eu-north-a")}
    assert len(live.requests_to("eu-north-a")) == 6
    assert len(peers) == 1 and None not in peers


# Texts for the holes of a learnt shape, hostile ones among them: quotes, escapes that
# JSON has or has not, lone surrogates, bytes that are not UTF-8 or cut short, CR, LF,
# a finish or usage spelled inside the text.
_HOLE_TOKENS: Final = [
    b"a", b"Hi", b" ", b'"', b"\\", b"\\\\", b"\\n", b"\\u00e9", b"\\ud83d", b"\\ude00",
    b"\\u12", b"\xff", b"\xe2\x82", b"\xe2\x82\xac", b"\r", b"\n", b"\t", b"\x7f",
    b'","finish_reason":"stop', b'"}],"usage":{"prompt_tokens":1},"x":{"y":"', b"\xc2\x85",
    b"\xe2\x80\xa8", b"}", b"]", b",",
]
_holes = st.lists(st.sampled_from(_HOLE_TOKENS), max_size=5).map(b"".join)
_FIELDS: Final = [b"", b"id: 7\n", b": c\n", b"event: message\n", b': "content":"x",\n']


def _chunk_json(text: bytes, pad: bytes | None, fin: bytes, key: bytes) -> bytes:
    s = (b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"'
         + key + b'":"' + text + b'"},"finish_reason":' + fin + b"}]")
    return s + (b"" if pad is None else b',"obfuscation":"' + pad + b'"') + b"}"


@st.composite
def _shaped_stream(draw: st.DrawFn) -> list[bytes]:
    """A stream whose first content chunk teaches a shape of any spelling (CRLF, fields
    and comments before its data, its JSON over two data lines, `data:` without a space,
    padding or none), then chunks of that shape with any texts, among other events."""
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    fields = draw(st.sampled_from(_FIELDS)).replace(b"\n", eol)
    key = draw(st.sampled_from([b"content", b"reasoning_content"]))
    padded, split = draw(st.booleans()), draw(st.booleans())
    data = draw(st.sampled_from([b"data: ", b"data:"]))

    def event(text: bytes, pad: bytes, fin: bytes) -> bytes:
        body = _chunk_json(text, pad if padded else None, fin, key)
        if split:
            i = body.find(b'"choices"')
            body = body[:i] + eol + b"data: " + body[i:]
        return fields + data + body + eol + eol

    others = [b": ping" + eol + eol, b"data: [DONE]" + eol + eol,
              b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}' + eol + eol,
              b'data: {"error":{"message":"x"}}' + eol + eol]
    shaped = st.builds(event, _holes, _holes, st.sampled_from([b"null"] * 5 + [b'"stop"']))
    rest = draw(st.lists(st.one_of(shaped, shaped, shaped, st.sampled_from(others)),
                         max_size=10))
    return [event(b"Hi", b"abc", b"null"), *rest]


@settings(max_examples=300, deadline=None)
@given(events=_shaped_stream(), points=st.lists(st.integers(0, 4000), max_size=6),
       whole=st.booleans())
def test_any_learnt_shape_fast_path_equals_parsing_every_event(
    events: list[bytes], points: list[int], whole: bool
) -> None:
    """The same as the test above for shapes learnt from chunks of any spelling and
    texts of any bytes (a review's property): what `relay._take` forwards, holds,
    counts and fails at is what parsing every event gives."""
    from lrproxy import relay

    data = b"".join(events)
    if whole:  # a read per event, as from a live model: the shape's usual case
        reads = events
    else:
        bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
        reads = [data[a:b] for a, b in itertools.pairwise(bounds) if a < b]

    def run(learn: bool) -> tuple[Any, ...]:
        splitter, tail = EventSplitter(), relay._Tail()
        if not learn:
            tail.shape.lessons = 0  # fits nothing: every event is parsed
        out = []
        for r in reads:
            out.append(relay._take(r, splitter, tail)[0])
            if tail.failure is not None or tail.done:
                break
        return (b"".join(out), tail.held, tail.usage, tail.done, str(tail.failure),
                tail.content_events, bytes(splitter.held))

    assert run(True) == run(False)


def test_lone_cr_inside_a_one_line_data_event_is_malformed() -> None:
    """A lone CR in an event that is otherwise one `data: ` line and its blank line:
    CR is JSON whitespace, so the proxy's parse reads one chunk, but the SDK ends a line
    there and reads `data: {"id":"c",` alone as an event (JSONDecodeError). The quick path
    for one-line events must not take it."""
    for ev in (b'data: {"id":"c",\r\r"choices":[]}\n\n',
               b'data: {"a":1,\r"b":2}\n\n'):
        assert classify(ev) == (Kind.MALFORMED, None), ev


async def test_lone_cr_event_valid_as_json_ends_the_stream(
    canned: Canned, make_stack: MakeStack,
) -> None:
    """The same end to end: a content chunk whose JSON is valid with its CR CR, but
    which the SDK would read as two events, is never relayed."""
    stack = canned_stack(make_stack, canned)
    good = chunk(content="One")
    bad = chunk(content="x").replace(b'"choices"', b'\r\r"choices"')
    canned.events = [good, bad, chunk(finish="stop"), b"data: [DONE]\n\n"]
    canned.pause = 0.02
    status, _, body = await raw_post(stack, body_of())
    events = split_events(body)
    assert status == 200 and events[0] == good and len(events) == 2, events
    assert "malformed" in obj_of(events[1])["error"]["message"] and bad not in body


def _fin() -> bytes:
    return chunk(finish="stop")


def test_events_after_the_finish_chunk_cap_in_the_same_read_are_not_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_EVENT_BYTES of finish chunks the stream fails there: the events after
    the cap in the same read (a content chunk, [DONE]) are neither forwarded nor make it
    a stream that ended well."""
    monkeypatch.setattr(relay, "MAX_EVENT_BYTES", 4096)
    fin = _fin()
    n = 4096 // len(fin) + 1
    tail = relay._Tail()
    out = relay._take_events([*[fin] * n, chunk(content="late"), fin, b"data: [DONE]\n\n"], tail)
    assert out == b""
    assert tail.failure is not None and "16 MiB of finish chunks" in str(tail.failure)
    assert tail.done is False and tail.held == [] and tail.content_events == n


async def test_finish_chunks_past_the_cap_in_one_read_end_the_stream(
    canned: Canned, make_stack: MakeStack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A content chunk, finish chunks past the cap, another content chunk and [DONE]
    in one upstream write: the stream ends with the error event after the events before
    the cap (the first content chunk is relayed); nothing after the cap is."""
    monkeypatch.setattr(relay, "MAX_EVENT_BYTES", 4096)
    stack = canned_stack(make_stack, canned)
    fin = _fin()
    n = 4096 // len(fin) + 1
    late, two = chunk(content="late"), chunk(content="Two")
    canned.events = [chunk(content="One"),
                     b"".join([two, *[fin] * (n + 3), late, fin, b"data: [DONE]\n\n"])]
    canned.pause = 0.01
    status, _, body = await raw_post(stack, body_of())
    events = split_events(body)
    assert status == 200 and events[0] == chunk(content="One"), events[:2]
    assert events[1] == two, events[:3]
    assert len(events) == 3 and late not in body and b"[DONE]" not in body, events
    assert "16 MiB of finish chunks" in obj_of(events[-1])["error"]["message"]


def test_finish_chunks_of_exactly_the_cap_are_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap is MAX_EVENT_BYTES of finish chunks held: exactly that many bytes are
    still held (not a failure), one byte more is."""
    fin = _fin()
    monkeypatch.setattr(relay, "MAX_EVENT_BYTES", 3 * len(fin))
    tail = relay._Tail()
    relay._take_events([fin] * 3, tail)
    assert tail.failure is None and tail.held == [fin] * 3
    relay._take_events([b": x\n\n", fin], tail)
    assert tail.failure is not None and tail.held == []


async def test_lowrouter_goes_on_the_last_finish_chunk_written_anew(
    canned: Canned, make_stack: MakeStack,
) -> None:
    """n=2: two finish chunks held, the last with CRLF line ends (so `lowrouter` is
    added by writing it anew from its JSON): the client gets each choice's own finish
    chunk, the second carrying `lowrouter`, not the first's JSON twice."""
    stack = canned_stack(make_stack, canned)
    fin0 = chunk(content=None, finish="stop", index=0)
    fin1 = chunk(content=None, finish="length", index=1).replace(b"\n", b"\r\n")
    canned.events = [chunk(content="One"), fin0, fin1, b"data: [DONE]\n\n"]
    canned.pause = 0.01
    status, _, body = await raw_post(stack, body_of())
    events = split_events(body)
    assert status == 200 and events[-1] == b"data: [DONE]\n\n", events
    assert events[1] == fin0, events
    last = obj_of(events[2])
    assert last["choices"] == [{"index": 1, "delta": {}, "finish_reason": "length"}], last
    assert "lowrouter" in last and "lowrouter" not in obj_of(events[1])
