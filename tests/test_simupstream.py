"""Tests for the simulated upstream (lrproxy.simupstream)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from lrproxy.simupstream import SimUpstream

KEY = "sk-sim-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSGS: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "hello there simulated world"}
]


@pytest.fixture
async def sim() -> AsyncIterator[SimUpstream]:
    s = SimUpstream(name="sim-a", api_key=KEY)
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def client(sim: SimUpstream) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def raw_chat(
    http: aiohttp.ClientSession, sim: SimUpstream, stream: bool = True, **knobs: Any
) -> tuple[int, bytes]:
    body = {"model": "sim-small", "messages": MSGS, "stream": stream, "sim": knobs}
    async with http.post(f"{sim.base_url}/chat/completions", json=body, headers=AUTH) as r:
        return r.status, await r.read()


def events(raw: bytes) -> list[bytes]:
    """Split an SSE body into its non-comment events, line ends normalised."""
    evs = raw.replace(b"\r\n", b"\n").split(b"\n\n")
    return [e for e in evs if e and not e.startswith(b":")]


async def test_chat_non_stream_is_deterministic(client: AsyncOpenAI, sim: SimUpstream) -> None:
    """Same prompt gives the same text; usage counts words + 3 per message and 8 chunks."""
    r1 = await client.chat.completions.create(model="sim-small", messages=MSGS)
    r2 = await client.chat.completions.create(model="sim-small", messages=MSGS)
    assert r1.choices[0].message.content == r2.choices[0].message.content
    assert r1.model == "sim-small" and r1.choices[0].finish_reason == "stop"
    assert r1.usage is not None
    assert (r1.usage.prompt_tokens, r1.usage.completion_tokens, r1.usage.total_tokens) == (7, 8, 15)
    other = await client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "user", "content": [{"type": "text", "text": "a b"}]}],
        extra_body={"sim": {"text": "one two three"}},
    )
    assert other.choices[0].message.content == "one two three "
    assert other.usage is not None and other.usage.prompt_tokens == 5
    assert sim.requests[0].json == {"model": "sim-small", "messages": MSGS}
    assert orjson.loads(sim.requests[0].sent)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_usage_on_off(client: AsyncOpenAI, include_usage: bool) -> None:
    """Streams match the non-streamed text; the usage-only chunk appears only when asked."""
    full = await client.chat.completions.create(model="sim-large", messages=MSGS)
    stream = await client.chat.completions.create(
        model="sim-large",
        messages=MSGS,
        stream=True,
        stream_options={"include_usage": include_usage},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
        assert all(c.usage is None for c in chunks[:-1])
    else:
        assert all(c.choices and c.usage is None for c in chunks)


async def test_embeddings_and_models(client: AsyncOpenAI) -> None:
    """Embeddings give 8 deterministic floats (base64 and float forms); models list ids."""
    e1 = await client.embeddings.create(model="sim-small", input=["a b c", "d"])
    e2 = await client.embeddings.create(model="sim-small", input="a b c", encoding_format="float")
    assert [len(d.embedding) for d in e1.data] == [8, 8]
    assert e1.data[0].embedding == pytest.approx(e2.data[0].embedding, abs=1e-6)
    assert e1.usage.prompt_tokens == 4
    assert [m.id async for m in client.models.list()] == ["sim-small", "sim-large"]


async def test_401_echoes_presented_key(sim: SimUpstream) -> None:
    """A wrong key gets 401 invalid_api_key whose message echoes the key, like OpenAI."""
    async with AsyncOpenAI(base_url=sim.base_url, api_key="sk-wrong-123", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as ei:
            await c.models.list()
    assert ei.value.status_code == 401 and ei.value.code == "invalid_api_key"
    assert "sk-wrong-123" in ei.value.message
    assert sim.requests[0].headers["Authorization"] == "Bearer sk-wrong-123"


async def test_404_unknown_model_and_400_bad_json(
    client: AsyncOpenAI, sim: SimUpstream, http: aiohttp.ClientSession
) -> None:
    """Unknown model is 404 model_not_found; a non-JSON body is 400."""
    with pytest.raises(openai.NotFoundError) as ei:
        await client.chat.completions.create(model="nope", messages=MSGS)
    assert ei.value.code == "model_not_found"
    async with http.post(f"{sim.base_url}/chat/completions", data=b"{x", headers=AUTH) as r:
        assert r.status == 400
        assert set((await r.json())["error"]) == {"message", "type", "param", "code"}


async def test_fail_status_count_and_headers(sim: SimUpstream, http: aiohttp.ClientSession) -> None:
    """fail_status answers the next fail_count requests, with Retry-After; then normal."""
    sim.faults.fail_status, sim.faults.fail_count, sim.faults.retry_after = 503, 2, "7"
    got = []
    for _ in range(3):
        async with http.get(f"{sim.base_url}/models", headers=AUTH) as r:
            got.append((r.status, r.headers.get("Retry-After")))
            assert r.headers["Server"] == "sim" and r.headers["X-Sim-Name"] == "sim-a"
            assert r.headers["Set-Cookie"] == "sim=1"
    assert got == [(503, "7"), (503, "7"), (200, None)]
    status, _ = await raw_chat(http, sim, status=429, retry_after="1")
    assert status == 429
    sim.faults.redirect_to = "http://example.invalid/"
    async with http.get(f"{sim.base_url}/models", headers=AUTH, allow_redirects=False) as r:
        assert r.status == 307 and r.headers["Location"] == "http://example.invalid/"
    sim.faults.redirect_to, sim.faults.reset = None, True
    with pytest.raises(aiohttp.ClientConnectionError):
        await raw_chat(http, sim)


async def test_cut_after_is_a_client_payload_error(
    sim: SimUpstream, http: aiohttp.ClientSession
) -> None:
    """cut_after drops the connection mid-stream; the client sees a payload error."""
    with pytest.raises(aiohttp.ClientPayloadError):
        await raw_chat(http, sim, cut_after=2)
    sent = bytes(sim.requests[-1].sent)
    assert len(events(sent)) == 3 and b"[DONE]" not in sent
    assert not sim.requests[-1].client_closed and sim.open_streams == 0


async def test_split_and_crlf_give_the_same_events(
    sim: SimUpstream, http: aiohttp.ClientSession
) -> None:
    """split modes, CRLF and keep-alive comments change framing only, not the events."""
    _, base = await raw_chat(http, sim, chunks=5)
    assert events(base)[-1] == b"data: [DONE]" and len(events(base)) == 8
    for knobs in (
        {"split": "bytes"},
        {"split": "coalesce", "crlf": True},
        {"keepalive": True, "crlf": True, "chunk_delay_s": 0.001},
    ):
        status, raw = await raw_chat(http, sim, chunks=5, **knobs)
        assert status == 200 and events(raw) == events(base), knobs
        assert raw == bytes(sim.requests[-1].sent)
    _, raw = await raw_chat(http, sim, chunks=2, malformed_after=1, no_done=True)
    assert events(raw)[2] == b"data: {not json" and b"[DONE]" not in raw
    _, raw = await raw_chat(http, sim, chunks=2, finish_in_content=True, omit_usage=True)
    assert b'"finish_reason":"stop"' in events(raw)[2] and len(events(raw)) == 4


async def test_client_disconnect_sets_client_closed(
    sim: SimUpstream, http: aiohttp.ClientSession
) -> None:
    """A client leaving mid-stream cancels the handler: client_closed, finished_at, counts."""
    body = {"model": "sim-small", "messages": MSGS, "stream": True, "sim": {"chunk_delay_s": 0.2}}
    async with http.post(f"{sim.base_url}/chat/completions", json=body, headers=AUTH) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        await r.content.readuntil(b"\n\n")
        assert sim.open_streams == 1
        r.close()
    rec = sim.requests[-1]
    for _ in range(100):
        if rec.finished_at is not None:
            break
        await asyncio.sleep(0.01)
    assert rec.client_closed and rec.finished_at is not None and sim.open_streams == 0


async def test_cli_prints_base_url_and_stops_on_sigterm(http: aiohttp.ClientSession) -> None:
    """The CLI prints SIM_BASE_URL once listening and exits 0 on SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lrproxy.simupstream", "--listen", "127.0.0.1:0",
        "--models", "m1", stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
    assert line.startswith("SIM_BASE_URL=http://127.0.0.1:")
    async with http.get(line.split("=", 1)[1] + "/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["m1"]
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
