"""The client API end to end (SPEC §1, §2, §3): the real OpenAI SDK, lrproxy, simulated upstreams.

Expected figures are computed here from the test config (`conftest.base_config`) and from
what the upstream really sent, never copied from the proxy's answer.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import multidict
import openai
import orjson
import pytest
import yarl
from conftest import CI_KEY, UPSTREAM_KEYS, Stack, wait_for
from openai.types.chat import ChatCompletionMessageParam

MINI = "openai/gpt-4o-mini"
LLAMA = "meta/llama-3.1-8b"
AUTO = "lowrouter/auto"
MSGS: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three rivers of Europe please"},
]
# SPEC §3: (largest active params in B, Wh per 1k completion tokens); prefill is a tenth.
SIZE_CLASSES = ((15.0, 0.10), (150.0, 0.60), (math.inf, 3.0))
ROUTE_HEADERS = ("X-LowRouter-Region", "X-LowRouter-Model", "X-LowRouter-Upstream")

# ---------------------------------------------------------------------------------------
# expectations computed from the config


def energy_per_1k(data: dict[str, Any], model_id: str) -> tuple[float, float]:
    """(e_prompt, e_completion) of a model per SPEC §3."""
    m = data["models"][model_id]
    if "energy_wh_per_1k_prompt_tokens" in m:
        return m["energy_wh_per_1k_prompt_tokens"], m["energy_wh_per_1k_completion_tokens"]
    if "active_params_b" not in m:  # no figures at all: README's default, the medium class
        e_c = SIZE_CLASSES[1][1]
        return 0.1 * e_c, e_c
    size = m["active_params_b"]
    e_c = next(e for limit, e in SIZE_CLASSES if size <= limit)
    return 0.1 * e_c, e_c


def carbon_ref(data: dict[str, Any], model_id: str, region: str) -> float:
    """Reference carbon per 1k tokens of a candidate (SPEC §2)."""
    e_p, e_c = energy_per_1k(data, model_id)
    r = data["regions"][region]
    return (e_p + e_c) * r["pue"] * r["grid_intensity_g_per_kwh"] / 2000


def candidates(data: dict[str, Any], model_id: str, region: str | None = None
               ) -> list[tuple[float, str, str, str]]:
    """(carbon, upstream, region, LowRouter model) of every way to serve `model_id`."""
    ids = data["auto"]["models"] if model_id == AUTO else [model_id]
    out = []
    for u in data["upstreams"]:
        for mid in ids:
            if mid in u["models"] and region in (None, u["region"]):
                out.append((carbon_ref(data, mid, u["region"]), u["name"], u["region"], mid))
    return out


def best(data: dict[str, Any], model_id: str, region: str | None = None
         ) -> list[tuple[float, str, str, str]]:
    """The lowest-carbon candidates (several when they tie)."""
    cands = candidates(data, model_id, region)
    low = min(c[0] for c in cands)
    return [c for c in cands if c[0] == low]


def region_of(data: dict[str, Any], upstream: str) -> str:
    return next(u["region"] for u in data["upstreams"] if u["name"] == upstream)


def check_eco(data: dict[str, Any], eco: dict[str, Any], model_id: str, region: str,
              prompt: int, completion: int, accuracy: str) -> None:
    """`eco` is the SPEC §3 formula applied to these tokens, model and region."""
    e_p, e_c = energy_per_1k(data, model_id)
    r = data["regions"][region]
    energy_wh = (prompt * e_p + completion * e_c) / 1000 * r["pue"]
    carbon_g = energy_wh / 1000 * r["grid_intensity_g_per_kwh"]
    assert eco["tokens"] == {"prompt": prompt, "completion": completion}
    assert eco["energy_wh"] == pytest.approx(energy_wh, rel=1e-12)
    assert eco["carbon_g"] == pytest.approx(carbon_g, rel=1e-12)
    assert eco["carbon_per_1k_tokens_g"] == pytest.approx(
        carbon_g * 1000 / (prompt + completion), rel=1e-12)
    assert eco["grid_intensity_g_per_kwh"] == r["grid_intensity_g_per_kwh"]
    assert eco["pue"] == r["pue"]
    assert eco["accuracy"] == accuracy
    assert all(type(eco[k]) is float for k in ("energy_wh", "carbon_g", "carbon_per_1k_tokens_g"))


# ---------------------------------------------------------------------------------------
# upstream-side records


def hits(stack: Stack) -> dict[str, int]:
    """How many API requests each upstream received."""
    return {n: len(stack.requests_to(n)) for n in stack.sims}


def only_hit(stack: Stack) -> Any:
    """The one request the whole pool received."""
    recs = [r for n in stack.sims for r in stack.requests_to(n)]
    assert len(recs) == 1, hits(stack)
    return recs[0]


def sent_doc(rec: Any) -> dict[str, Any]:
    """The JSON the upstream answered with."""
    doc: dict[str, Any] = json.loads(bytes(rec.sent))
    return doc


def lowrouter(resp: Any) -> dict[str, Any]:
    assert resp.model_extra is not None
    lr: dict[str, Any] = resp.model_extra["lowrouter"]
    return lr


def check_client_headers(headers: Any) -> None:
    """The upstream's own Set-Cookie / Server / X-Sim-Name never reach the client."""
    assert "set-cookie" not in headers
    assert headers.get("server") != "sim"
    assert "x-sim-name" not in headers


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def auth(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.key}"}


# ---------------------------------------------------------------------------------------
# the happy paths


def test_chat_sync_sdk_relays_answer_with_eco_of_upstream_usage(stack: Stack) -> None:
    """A non-streaming chat returns the upstream's answer plus §3 eco from its own usage."""
    with stack.client() as client:
        raw = client.chat.completions.with_raw_response.create(model=MINI, messages=MSGS)
    r = raw.parse()
    rec = only_hit(stack)
    up = sent_doc(rec)
    lr = lowrouter(r)
    route = lr["route"]
    expected = best(stack.data, MINI)
    assert (route["upstream"], route["region"]) in {(c[1], c[2]) for c in expected}
    assert rec in stack.requests_to(route["upstream"])
    assert route == {"model": MINI, "region": region_of(stack.data, route["upstream"]),
                     "upstream": route["upstream"], "pinned": False, "attempts": 1}
    assert r.choices[0].message.content == up["choices"][0]["message"]["content"]
    assert r.id == up["id"] and r.model == up["model"]
    usage = up["usage"]
    assert r.usage is not None and r.usage.prompt_tokens == usage["prompt_tokens"]
    check_eco(stack.data, lr["eco"], MINI, route["region"], usage["prompt_tokens"],
              usage["completion_tokens"], "estimated")  # static intensity
    assert lr["request_id"] == raw.headers["x-request-id"]
    assert [raw.headers[h] for h in ROUTE_HEADERS] == [route["region"], MINI, route["upstream"]]
    check_client_headers(raw.headers)
    labels = {"key": "team-a", "model": MINI, "region": route["region"]}
    assert stack.metric("lrproxy_tokens_total", **labels, kind="prompt") == usage["prompt_tokens"]
    assert stack.metric("lrproxy_tokens_total", **labels, kind="completion") == (
        usage["completion_tokens"])
    assert stack.metric("lrproxy_carbon_grams_total", **labels) == pytest.approx(
        lr["eco"]["carbon_g"])


async def test_chat_async_sdk_pinned_size_class_model(stack: Stack) -> None:
    """AsyncOpenAI works the same; a size-class model's eco uses SPEC §3's defaults."""
    async with stack.aclient() as client:
        r = await client.chat.completions.create(
            model=LLAMA, messages=MSGS, extra_body={"route": {"region": "us-east"}})
    rec = only_hit(stack)
    assert rec in stack.requests_to("us-east-a")
    up = sent_doc(rec)
    lr = lowrouter(r)
    assert lr["route"] == {"model": LLAMA, "region": "us-east", "upstream": "us-east-a",
                           "pinned": True, "attempts": 1}
    assert r.choices[0].message.content == up["choices"][0]["message"]["content"]
    check_eco(stack.data, lr["eco"], LLAMA, "us-east", up["usage"]["prompt_tokens"],
              up["usage"]["completion_tokens"], "estimated")


def test_answer_without_usage_gets_estimated_tokens(stack: Stack) -> None:
    """An upstream answer without `usage` still gets eco, from tokens the proxy estimated."""
    with stack.client() as client:
        r = client.chat.completions.create(model=MINI, messages=MSGS,
                                           extra_body={"sim": {"omit_usage": True}})
    up = sent_doc(only_hit(stack))
    assert "usage" not in up
    lr = lowrouter(r)
    tokens = lr["eco"]["tokens"]
    content = up["choices"][0]["message"]["content"]
    prompt_chars = sum(len(m["content"]) for m in MSGS)  # type: ignore[arg-type]
    # About four characters per token; message framing may add a few prompt tokens.
    assert tokens["completion"] == pytest.approx(len(content) / 4, abs=1)
    assert prompt_chars / 4 - 1 <= tokens["prompt"] <= prompt_chars / 4 + 8 * len(MSGS)
    check_eco(stack.data, lr["eco"], MINI, lr["route"]["region"], tokens["prompt"],
              tokens["completion"], "estimated")


def test_estimated_prompt_counts_tool_calls_and_tool_definitions(stack: Stack) -> None:
    """An agent's prompt is mostly its tools' definitions and earlier calls' arguments:
    without usage, they are estimated too (README: the characters of the messages' text
    and of their tool calls' names and arguments, the tools as their JSON, 16 per
    message), not only the messages' text."""
    tools: list[Any] = [{"type": "function", "function": {
        "name": "grid_intensity", "description": "Live grid carbon intensity of a zone " * 8,
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                       "required": ["zone"]}}}]
    args = json.dumps({"zone": "GB-north-scotland", "note": "tonight, hourly " * 20})
    messages: list[Any] = [
        {"role": "user", "content": "How clean is the grid in Aberdeen tonight?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "grid_intensity", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"g_per_kwh": 31}'},
    ]
    with stack.client() as client:
        r = client.chat.completions.create(model=MINI, messages=messages, tools=tools,
                                           extra_body={"sim": {"omit_usage": True}})
    rec = only_hit(stack)
    assert "usage" not in sent_doc(rec)
    got = rec.json
    chars = sum(16 + len(m.get("content") or "") for m in got["messages"])
    chars += sum(len(c["function"]["name"]) + len(c["function"]["arguments"])
                 for m in got["messages"] for c in m.get("tool_calls", ()))
    chars += len(orjson.dumps(got["tools"]))
    assert lowrouter(r)["eco"]["tokens"]["prompt"] == math.ceil(chars / 4)


@pytest.mark.parametrize("encoding_format", [None, "float"])
def test_embeddings(stack: Stack, encoding_format: str | None) -> None:
    """Embeddings relay the vectors (SDK default base64 or float) with prompt-only eco."""
    kw: dict[str, Any] = {} if encoding_format is None else {"encoding_format": encoding_format}
    inputs = ["carbon aware routing", "second input here"]
    with stack.client() as client:
        r = client.embeddings.create(model=MINI, input=inputs, **kw)
    rec = only_hit(stack)
    assert rec.path.endswith("/embeddings")
    assert rec.json["encoding_format"] == (encoding_format or "base64")  # the SDK's default
    up = sent_doc(rec)
    for got, want in zip(r.data, up["data"], strict=True):
        vec = want["embedding"]
        if isinstance(vec, str):
            raw = base64.b64decode(vec)
            vec = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        assert got.embedding == pytest.approx(vec)
    assert len(r.data) == len(inputs)
    lr = lowrouter(r)
    assert lr["route"]["model"] == MINI and lr["route"]["attempts"] == 1
    check_eco(stack.data, lr["eco"], MINI, lr["route"]["region"],
              up["usage"]["prompt_tokens"], 0, "estimated")


def test_models_list(stack: Stack) -> None:
    """GET /models lists every served model and lowrouter/auto, each with regions and carbon."""
    with stack.client() as client:
        page = client.models.list()
    data = stack.data
    by_id = {m.id: m for m in page.data}
    assert set(by_id) == set(data["models"]) | {AUTO}
    for mid, m in by_id.items():
        lr = m.model_extra["lowrouter"]  # type: ignore[index]
        cands = candidates(data, mid)
        assert lr["regions"] == sorted({c[2] for c in cands})
        if mid == AUTO:
            assert lr["models"] == data["auto"]["models"]
            continue
        assert set(lr["carbon_per_1k_tokens_g"]) == set(lr["regions"])
        for region, value in lr["carbon_per_1k_tokens_g"].items():
            assert value == pytest.approx(carbon_ref(data, mid, region))
        check_model_eco(data, mid, lr["eco"])


def check_model_eco(data: dict[str, Any], mid: str, eco: dict[str, Any]) -> None:
    """A /models entry's eco figures are the model's from the config, or SPEC §3's
    size-class and default figures where it gives none."""
    e_p, e_c = energy_per_1k(data, mid)
    m = data["models"][mid]
    source = ("config" if "energy_wh_per_1k_prompt_tokens" in m
              else "size_class" if "active_params_b" in m else "default")
    assert eco == {"energy_wh_per_1k_prompt_tokens": pytest.approx(e_p, rel=1e-12),
                   "energy_wh_per_1k_completion_tokens": pytest.approx(e_c, rel=1e-12),
                   "source": source}, mid


def test_models_retrieve_answers_the_listed_entry(stack: Stack) -> None:
    """GET /models/{id} (the SDK's models.retrieve, which escapes the id's slash) answers
    the entry /models lists for that id, with the same headers; an unknown id is 404
    model_not_found, as OpenAI answers it."""
    with stack.client() as client:
        listed = {m.id: m.model_dump() for m in client.models.list().data}
        for mid in (MINI, AUTO):
            raw = client.models.with_raw_response.retrieve(mid)
            assert raw.parse().model_dump() == listed[mid], mid
            if mid != AUTO:  # the figures themselves, not only as /models has them
                check_model_eco(stack.data, mid, listed[mid]["lowrouter"]["eco"])
            assert raw.headers["Server"] == "lrproxy" and "X-Request-Id" in raw.headers
            assert _server_timing(raw.headers["Server-Timing"])["upstream"] == 0.0
            assert not any(h in raw.headers for h in ROUTE_HEADERS)
        with pytest.raises(openai.NotFoundError) as ei:
            client.models.retrieve("acme/nope")
    assert check_error(ei.value, 404, "model_not_found")["param"] == "model"
    assert sum(hits(stack).values()) == 0


async def test_health_and_readiness(stack: Stack, http: aiohttp.ClientSession) -> None:
    """/healthz and /readyz answer 200 without a key while upstreams are usable."""
    for path in ("/healthz", "/readyz"):
        async with http.get(stack.origin + path) as r:
            assert r.status == 200, path
            assert "X-Request-Id" in r.headers
            assert r.headers.getall("Server") == ["lrproxy"]  # no library versions


async def test_readiness_is_503_while_draining(stack: Stack, http: aiohttp.ClientSession) -> None:
    """/readyz is 200 while upstreams are usable, and 503 `{"status": "draining"}` once the
    proxy drains (SPEC §1), so a load balancer stops sending it new requests."""
    async with http.get(stack.origin + "/readyz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ready"
    stack.call(lambda: setattr(stack.runtime, "draining", True))
    async with http.get(stack.origin + "/readyz") as r:
        assert r.status == 503
        assert await r.json() == {"status": "draining"}


async def test_v1_alias_serves_the_same_api(stack: Stack, http: aiohttp.ClientSession) -> None:
    """/v1 is an alias of /api/v1: same models list, same chat handling."""
    bodies = []
    for base in ("/api/v1", "/v1"):
        async with http.get(f"{stack.origin}{base}/models", headers=auth(stack)) as r:
            assert r.status == 200
            bodies.append(await r.json())
    assert bodies[0] == bodies[1]
    async with openai.AsyncOpenAI(base_url=f"{stack.origin}/v1", api_key=stack.key,
                                  max_retries=0) as client:
        r = await client.chat.completions.create(model=MINI, messages=MSGS)
    up = sent_doc(only_hit(stack))
    assert r.choices[0].message.content == up["choices"][0]["message"]["content"]
    assert lowrouter(r)["route"]["model"] == MINI


def test_key_from_environment_authenticates(stack: Stack) -> None:
    """A key configured through key_env works, and is counted under its own name."""
    with stack.client(api_key=CI_KEY) as client:
        r = client.chat.completions.create(model=MINI, messages=MSGS)
    region = lowrouter(r)["route"]["region"]
    assert stack.metric("lrproxy_requests_total", key="ci", model=MINI, region=region,
                        code="200") == 1


# ---------------------------------------------------------------------------------------
# errors (SPEC §1 table)


def check_error(e: openai.APIStatusError, status: int, code: str) -> dict[str, Any]:
    assert e.status_code == status
    body = e.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert "x-request-id" in e.response.headers
    err: dict[str, Any] = body["error"]
    return err


@pytest.mark.parametrize("path", ["/chat/completions", "/embeddings", "/models",
                                  "/models/" + MINI])
@pytest.mark.parametrize("header", [None, "Bearer sk-wrong", "Basic dGVhbS1hOng=", "Bearer "])
async def test_missing_or_unknown_key_is_401(
    stack: Stack, http: aiohttp.ClientSession, path: str, header: str | None
) -> None:
    """No key, a wrong key or another scheme: 401 invalid_api_key, nothing sent upstream."""
    headers = {} if header is None else {"Authorization": header}
    body = {"model": MINI, "messages": MSGS, "input": "x"}
    method = http.get if path.startswith("/models") else http.post
    async with method(stack.base_url + path, json=body, headers=headers) as r:
        assert r.status == 401
        err = (await r.json())["error"]
        assert err["code"] == "invalid_api_key"
        assert "X-Request-Id" in r.headers
    assert sum(hits(stack).values()) == 0


@pytest.mark.parametrize("path", ["/chat/completions", "/models"])
@pytest.mark.parametrize("second", ["same", "another team's", "wrong"])
async def test_more_than_one_authorization_header_is_401(
    stack: Stack, http: aiohttp.ClientSession, path: str, second: str
) -> None:
    """Two Authorization headers: which counts would be a guess (the first was taken),
    so 401 invalid_api_key, saying why, and nothing sent upstream."""
    other = {"same": stack.key, "another team's": CI_KEY, "wrong": "sk-wrong"}[second]
    headers = multidict.CIMultiDict([("Authorization", f"Bearer {stack.key}"),
                                     ("Authorization", f"Bearer {other}")])
    body = {"model": MINI, "messages": MSGS}
    method = http.get if path == "/models" else http.post
    async with method(stack.base_url + path, json=body, headers=headers) as r:
        assert r.status == 401
        err = (await r.json())["error"]
        assert err["code"] == "invalid_api_key"
        assert "More than one Authorization header" in err["message"]
    assert sum(hits(stack).values()) == 0


def test_wrong_key_raises_authentication_error(stack: Stack) -> None:
    """The SDK raises AuthenticationError for an unknown key."""
    with stack.client(api_key="sk-not-a-key") as client, pytest.raises(
            openai.AuthenticationError) as ei:
        client.chat.completions.create(model=MINI, messages=MSGS)
    check_error(ei.value, 401, "invalid_api_key")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/chat/completions", b"{not json", None),
    ("/chat/completions", b"", None),
    ("/chat/completions", b'["model"]', None),
    ("/chat/completions", {"model": 5, "messages": MSGS}, "model"),
    ("/chat/completions", {"messages": MSGS}, "model"),
    ("/chat/completions", {"model": MINI, "messages": "hi"}, "messages"),
    ("/chat/completions", {"model": MINI, "messages": MSGS, "stream": "yes"}, "stream"),
    ("/chat/completions", {"model": MINI, "messages": MSGS, "stream": True,
                           "stream_options": "x"}, "stream_options"),
    ("/chat/completions", {"model": MINI, "messages": MSGS, "stream": True,
                           "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("/chat/completions", {"model": MINI, "messages": MSGS, "stream": True,
                           "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ("/chat/completions", {"model": MINI, "messages": MSGS, "route": "eu-west"}, "route"),
    ("/chat/completions", {"model": MINI, "messages": MSGS, "route": {"region": 5}},
     "route.region"),
    ("/embeddings", {"model": MINI, "input": 5}, "input"),
    ("/embeddings", {"model": [MINI], "input": "x"}, "model"),
])
async def test_bad_body_is_400_naming_the_field(
    stack: Stack, http: aiohttp.ClientSession, path: str, body: Any, param: str | None
) -> None:
    """A body that is not JSON, not an object or has a mistyped field: 400 invalid_request."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**auth(stack), "Content-Type": "application/json"}
    async with http.post(stack.base_url + path, data=raw, headers=headers) as r:
        assert r.status == 400
        err = (await r.json())["error"]
    assert err["code"] == "invalid_request"
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert sum(hits(stack).values()) == 0


def test_bad_route_through_sdk_raises_bad_request(stack: Stack) -> None:
    """A mistyped `route` sent through extra_body raises BadRequestError with param route."""
    with stack.client() as client, pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MINI, messages=MSGS, extra_body={"route": ["x"]})
    assert check_error(ei.value, 400, "invalid_request")["param"] == "route"


def test_unknown_model_is_404(stack: Stack) -> None:
    """An unknown model raises NotFoundError with code model_not_found."""
    with stack.client() as client, pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="acme/nope", messages=MSGS)
    check_error(ei.value, 404, "model_not_found")
    assert sum(hits(stack).values()) == 0


@pytest.mark.parametrize("via", ["body", "header", "both"])
def test_unknown_region_lists_the_configured_ones(stack: Stack, via: str) -> None:
    """An unknown region (body or header) is 400 unknown_region naming every region,
    its param where the pin came from: the body wins over the header (SPEC §2), also
    when both name the same region."""
    kw: dict[str, Any] = {}
    if via != "header":
        kw["extra_body"] = {"route": {"region": "mars-1"}}
    if via != "body":
        kw["extra_headers"] = {"X-LowRouter-Region": "mars-1"}
    with stack.client() as client, pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MINI, messages=MSGS, **kw)
    err = check_error(ei.value, 400, "unknown_region")
    for region in stack.data["regions"]:
        assert region in err["message"]
    assert err["param"] == ("X-LowRouter-Region" if via == "header" else "route.region")
    assert sum(hits(stack).values()) == 0


def test_model_not_in_region(stack: Stack) -> None:
    """A model pinned to a configured region that does not offer it: 400 model_not_in_region."""
    regions = {c[2] for c in candidates(stack.data, MINI)}
    missing = sorted(set(stack.data["regions"]) - regions)[0]
    with stack.client() as client, pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MINI, messages=MSGS,
                                       extra_body={"route": {"region": missing}})
    check_error(ei.value, 400, "model_not_in_region")
    assert sum(hits(stack).values()) == 0


async def test_body_over_limit_is_413(make_stack: Callable[..., Stack],
                                      http: aiohttp.ClientSession) -> None:
    """A body over server.max_body_bytes is 413, with or without Content-Length."""
    limit = 2048

    def small(data: dict[str, Any]) -> None:
        data["server"]["max_body_bytes"] = limit

    stack = make_stack(small)
    big: list[ChatCompletionMessageParam] = [{"role": "user", "content": "word " * limit}]
    async with stack.aclient() as client:
        with pytest.raises(openai.APIStatusError) as ei:
            await client.chat.completions.create(model=MINI, messages=big)
        check_error(ei.value, 413, "request_too_large")

        async def chunked() -> AsyncIterator[bytes]:
            payload = json.dumps({"model": MINI, "messages": big}).encode()
            for i in range(0, len(payload), 512):
                yield payload[i:i + 512]

        async with http.post(stack.base_url + "/chat/completions", data=chunked(),
                             headers={**auth(stack), "Content-Type": "application/json"}) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"
        assert sum(hits(stack).values()) == 0
        r2 = await client.chat.completions.create(model=MINI, messages=MSGS)  # under the limit
    assert r2.choices[0].message.content


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_of_exactly_the_limit_is_accepted(
    make_stack: Callable[..., Stack], http: aiohttp.ClientSession, framing: str
) -> None:
    """A body of exactly server.max_body_bytes is relayed; one byte more is 413 (SPEC §1:
    "over" the limit), whether its length is declared or it comes chunked."""
    limit = 2048

    def small(data: dict[str, Any]) -> None:
        data["server"]["max_body_bytes"] = limit

    stack = make_stack(small)

    def body(size: int) -> bytes:
        empty = json.dumps({"model": MINI, "messages": [{"role": "user", "content": ""}]})
        pad = "x" * (size - len(empty))
        data = json.dumps({"model": MINI, "messages": [{"role": "user", "content": pad}]})
        assert len(data.encode()) == size
        return data.encode()

    async def post(payload: bytes) -> tuple[int, Any]:
        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 512):
                yield payload[i:i + 512]

        data = payload if framing == "content-length" else pieces()
        async with http.post(stack.base_url + "/chat/completions", data=data,
                             headers={**auth(stack), "Content-Type": "application/json"}) as r:
            assert ("Content-Length" in r.request_info.headers) is (framing == "content-length")
            return r.status, await r.json()

    status, doc = await post(body(limit))
    assert status == 200, doc
    assert only_hit(stack).json["messages"] == json.loads(body(limit))["messages"]
    status, doc = await post(body(limit + 1))
    assert status == 413 and doc["error"]["code"] == "request_too_large"
    assert sum(hits(stack).values()) == 1


async def test_unknown_path_is_404_in_openai_shape(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """A path outside the API is 404 with an OpenAI error body and a request id; its
    message names the path as sent (an escaped slash is not the API's path)."""
    for method, path in (("GET", "/api/v1/nope"), ("POST", "/api/v2/chat/completions"),
                         ("GET", "/"), ("POST", "/v1/chat%2Fcompletions"),
                         ("GET", "/v1/nope?model=x")):
        async with http.request(method, yarl.URL(stack.origin + path, encoded=True),
                                headers=auth(stack)) as r:
            assert r.status == 404, path
            body = await r.json()
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["message"] == (
                f"{method} {path.partition('?')[0]} is not part of this API")
            assert "X-Request-Id" in r.headers
            assert r.headers.getall("Server") == ["lrproxy"]


async def test_a_line_feed_in_the_path_is_still_ours(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """An escaped line feed (%0A) in the path: `.` in a route pattern does not match it,
    so such a path matched no route and aiohttp answered with its own text 404 and
    Server header (its version), no request id, no access line. It is ours: the OpenAI
    shape, and for a model id with one, model_not_found."""
    for path, code in (("/v1/%0A", "not_found"), ("/api/v1/nope%0Ax", "not_found"),
                       ("/v1/models/a%0Ab", "model_not_found"),
                       ("/api/v1/models/%0A", "model_not_found")):
        async with http.get(yarl.URL(stack.origin + path, encoded=True),
                            headers=auth(stack)) as r:
            assert r.status == 404, path
            assert r.headers.getall("Server") == ["lrproxy"], path
            assert "X-Request-Id" in r.headers, path
            assert r.content_type == "application/json", path
            assert (await r.json())["error"]["code"] == code, path


# ---------------------------------------------------------------------------------------
# upstream failures


def fail_all(stack: Stack, names: list[str], **faults: Any) -> None:
    def apply() -> None:
        for n in names:
            for k, v in faults.items():
                setattr(stack.sims[n].faults, k, v)

    stack.call(apply)


def test_pinned_region_all_failing_is_502_and_stays_in_region(stack: Stack) -> None:
    """Every upstream of the pinned region answering 503: 502 after retries, no other region."""
    region = "eu-west"
    inside = [u["name"] for u in stack.data["upstreams"] if u["region"] == region]
    fail_all(stack, inside, fail_status=503, fail_count=-1)
    with stack.client() as client, pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model=MINI, messages=MSGS,
                                       extra_body={"route": {"region": region}})
    check_error(ei.value, 502, "upstream_error")
    counts = hits(stack)
    assert sum(counts.values()) == stack.data["server"]["retries"] + 1
    assert all(counts[n] >= 1 for n in inside)  # each retry to a different upstream first
    assert all(counts[n] == 0 for n in counts if n not in inside)


def test_retries_never_exceed_server_retries(make_stack: Callable[..., Stack]) -> None:
    """With server.retries = 1, a failing pool sees exactly two attempts."""

    def one_retry(data: dict[str, Any]) -> None:
        data["server"]["retries"] = 1

    stack = make_stack(one_retry)
    fail_all(stack, list(stack.sims), fail_status=500, fail_count=-1)
    with stack.client() as client, pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model=MINI, messages=MSGS)
    check_error(ei.value, 502, "upstream_error")
    assert sum(hits(stack).values()) == 2


def test_failover_within_pinned_region(stack: Stack) -> None:
    """eu-west-a failing 503: a pinned eu-west request succeeds on eu-west-b, attempt 2."""
    fail_all(stack, ["eu-west-a"], fail_status=503, fail_count=-1)
    with stack.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MINI, messages=MSGS, extra_body={"route": {"region": "eu-west"}})
    r = raw.parse()
    route = lowrouter(r)["route"]
    assert route == {"model": MINI, "region": "eu-west", "upstream": "eu-west-b",
                     "pinned": True, "attempts": 2}
    assert raw.headers["X-LowRouter-Upstream"] == "eu-west-b"
    assert hits(stack) == {"eu-west-a": 1, "eu-west-b": 1, "eu-north-a": 0, "us-east-a": 0}
    assert r.choices[0].message.content == sent_doc(
        stack.requests_to("eu-west-b")[0])["choices"][0]["message"]["content"]


def test_unpinned_failover_walks_the_carbon_order(stack: Stack) -> None:
    """Unpinned, with the cleanest region down, the next-cleanest region answers."""
    data = stack.data
    order = sorted(candidates(data, MINI))
    low_region = order[0][2]
    down = [c[1] for c in order if c[2] == low_region]
    fail_all(stack, down, fail_status=503, fail_count=-1)
    with stack.client() as client:
        r = client.chat.completions.create(model=MINI, messages=MSGS)
    route = lowrouter(r)["route"]
    nxt = min(c for c in order if c[2] != low_region)
    assert (route["upstream"], route["region"], route["pinned"]) == (nxt[1], nxt[2], False)
    assert route["attempts"] == len(down) + 1
    assert route["attempts"] <= data["server"]["retries"] + 1


def test_redirects_are_not_followed(stack: Stack) -> None:
    """An upstream redirect is a failure (502), never followed to its target."""
    target = stack.sims["us-east-a"].base_url + "/chat/completions"
    inside = ["eu-west-a", "eu-west-b"]
    fail_all(stack, inside, redirect_to=target)
    with stack.client() as client, pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model=MINI, messages=MSGS,
                                       extra_body={"route": {"region": "eu-west"}})
    check_error(ei.value, 502, "upstream_error")
    assert stack.sims["us-east-a"].requests == []  # the redirect's target saw nothing
    counts = hits(stack)
    assert counts["eu-west-a"] + counts["eu-west-b"] == stack.data["server"]["retries"] + 1
    assert counts["eu-north-a"] == 0


def test_upstream_401_is_502_without_its_message(make_stack: Callable[..., Stack]) -> None:
    """An upstream rejecting our key: 502 upstream_auth_failed; its message (echoing the key) is dropped."""

    def wrong_key(data: dict[str, Any]) -> None:
        for u in data["upstreams"]:
            if u["name"] == "eu-north-a":
                u["api_key_env"] = "UP_US_EAST_A"

    stack = make_stack(wrong_key)
    with stack.client() as client, pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(model=LLAMA, messages=MSGS,
                                       extra_body={"route": {"region": "eu-north"}})
    err = check_error(ei.value, 502, "upstream_auth_failed")
    echoed = UPSTREAM_KEYS["us-east-a"]
    recs = stack.requests_to("eu-north-a")
    assert recs and all(echoed.encode() in bytes(rec.sent) for rec in recs)  # it did echo
    assert echoed not in ei.value.response.text
    assert "Incorrect API key" not in err["message"]
    assert sum(hits(stack).values()) == len(recs)


def test_upstream_401_fails_over_to_another_upstream(make_stack: Callable[..., Stack]) -> None:
    """An upstream 401 counts as that upstream's failure: the next one in the region answers."""

    def wrong_key(data: dict[str, Any]) -> None:
        data["upstreams"][0]["api_key_env"] = "UP_US_EAST_A"  # eu-west-a

    stack = make_stack(wrong_key)
    with stack.client() as client:
        r = client.chat.completions.create(model=MINI, messages=MSGS,
                                           extra_body={"route": {"region": "eu-west"}})
    route = lowrouter(r)["route"]
    assert route["upstream"] == "eu-west-b"
    assert route["attempts"] == 1 + len(stack.requests_to("eu-west-a"))


@pytest.mark.parametrize("knobs", [{"status": 400}, {"bogus_knob": 1}, {"chunks": -1}])
def test_upstream_400_passes_through(stack: Stack, knobs: dict[str, Any]) -> None:
    """An upstream 400 reaches the client with its status and body, unchanged, no failover."""
    with stack.client() as client, pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MINI, messages=MSGS, extra_body={"sim": knobs})
    rec = only_hit(stack)
    assert ei.value.status_code == 400
    assert ei.value.response.content == bytes(rec.sent)
    headers = ei.value.response.headers
    assert headers["X-LowRouter-Upstream"] in stack.sims
    assert headers["X-LowRouter-Model"] == MINI
    check_client_headers(headers)


# ---------------------------------------------------------------------------------------
# request ids and headers


@pytest.mark.parametrize(("sent", "echoed"), [
    ("client-req_01.abc:9", True),
    ("has spaces in it", False),
    ("x" * 300, False),
    ("<script>", False),
    (None, False),
])
def test_request_id(stack: Stack, sent: str | None, echoed: bool) -> None:
    """A sane client X-Request-Id is echoed (body and header), an insane one replaced."""
    extra = {} if sent is None else {"X-Request-Id": sent}
    with stack.client(default_headers=extra) as client:
        raw = client.chat.completions.with_raw_response.create(model=MINI, messages=MSGS)
        with pytest.raises(openai.NotFoundError) as ei:
            client.chat.completions.create(model="acme/nope", messages=MSGS)
    rid = raw.headers["X-Request-Id"]
    err_rid = ei.value.response.headers["X-Request-Id"]
    if echoed:
        assert rid == sent and err_rid == sent
    else:
        assert rid != sent and err_rid != sent
        assert rid and 0 < len(rid) <= 128 and rid.isprintable() and " " not in rid
        assert rid != err_rid  # generated per request
    assert lowrouter(raw.parse())["request_id"] == rid


def test_routed_responses_carry_route_headers(stack: Stack) -> None:
    """Routed answers name region, model and upstream; unrouted errors do not."""
    with stack.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model=AUTO, messages=MSGS, extra_body={"route": {"region": "us-east"}})
        with pytest.raises(openai.NotFoundError) as ei:
            client.chat.completions.create(model="acme/nope", messages=MSGS)
    route = lowrouter(raw.parse())["route"]
    assert [raw.headers[h] for h in ROUTE_HEADERS] == [
        route["region"], route["model"], route["upstream"]]
    assert not any(h in ei.value.response.headers for h in ROUTE_HEADERS)


# ---------------------------------------------------------------------------------------
# routing (SPEC §2), checked on the upstream side


@pytest.mark.parametrize(("body_region", "header_region", "want"), [
    ("us-east", None, "us-east"),
    (None, "us-east", "us-east"),
    ("us-east", "eu-west", "us-east"),  # the body wins
    ("eu-west", "us-east", "eu-west"),
])
def test_region_pinning_reaches_only_that_region(
    stack: Stack, body_region: str | None, header_region: str | None, want: str
) -> None:
    """A pinned request reaches only that region, with its key, model name and the client's fields."""
    fields: dict[str, Any] = {
        "model": MINI, "messages": MSGS, "temperature": 0.25, "user": "user-42",
        "metadata": {"ticket": "T-1001", "team": "search"}, "max_tokens": 64, "seed": 7,
    }
    extra_body = None if body_region is None else {"route": {"region": body_region}}
    headers = {} if header_region is None else {"X-LowRouter-Region": header_region}
    with stack.client(default_headers=headers) as client:
        r = client.chat.completions.create(**fields, extra_body=extra_body)
    rec = only_hit(stack)
    name = lowrouter(r)["route"]["upstream"]
    assert region_of(stack.data, name) == want
    assert rec in stack.requests_to(name)
    up_model = next(u for u in stack.data["upstreams"] if u["name"] == name)["models"][MINI]
    assert rec.json == {**fields, "model": up_model}  # no `route`, everything else as sent
    assert rec.headers["Authorization"] == f"Bearer {UPSTREAM_KEYS[name]}"
    assert all(stack.key not in v for v in rec.headers.values())
    assert stack.key.encode() not in rec.body
    assert lowrouter(r)["route"]["pinned"] is True


@pytest.mark.parametrize("stream", [False, True])
def test_integers_beyond_64_bits_are_forwarded_as_sent(stack: Stack, stream: bool) -> None:
    """SPEC §2: every field but `route` is forwarded as the client sent it; orjson reads
    an integer beyond 64 bits as a float, which went upstream as 1.2345678901234568e+29.
    A float of the client's own, and "e+" in text, are forwarded as they were."""
    fields: dict[str, Any] = {
        "model": MINI, "messages": [{"role": "user", "content": "x = 2e+30 + 1e+5"}],
        "seed": 123456789012345678901234567890,
        "metadata": {"low": -(2**63) - 1, "high": 2**64, "fits": 2**64 - 1, "f": 1e20},
    }
    extra: dict[str, Any] = {"route": {"region": "eu-west"}}
    if stream:
        extra["stream_options"] = {"tag": 2**100 + 1}
    with stack.client() as client:
        r = client.chat.completions.create(**fields, stream=stream, extra_body=extra)
        if stream:
            r = list(r)[-1]
    rec = only_hit(stack)
    up_model = next(u for u in stack.data["upstreams"]
                    if u["name"] == lowrouter(r)["route"]["upstream"])["models"][MINI]
    want = {**fields, "model": up_model, "stream": stream}
    if stream:
        want["stream_options"] = {"tag": 2**100 + 1, "include_usage": True}
    assert json.loads(rec.body) == want  # (the standard library's: integers exact)
    assert b'"seed":123456789012345678901234567890' in rec.body


@pytest.mark.parametrize("body", [
    b'{"model":"m","messages":[{"role":"user","content":"size+1, 2e+30"}]}',  # text
    b'{"model":"m","messages":[],"f":1e20,"g":-3.5e+300}',  # the client's own floats
    b'{"model":"m","messages":[],"i":9223372036854775807,"u":18446744073709551615}',
])
def test_bodies_without_integers_beyond_64_bits_keep_orjsons_payload(body: bytes) -> None:
    """The exact (slower) path is taken only for an integer orjson cannot hold: any
    other body's payload is orjson's own, the same object."""
    from lrproxy import relay

    obj = orjson.loads(body)
    payload = orjson.dumps(obj)
    assert relay._as_sent(payload, obj, body) is payload


@pytest.mark.parametrize("model", [MINI, LLAMA, "acme/unrated", AUTO])
def test_unpinned_goes_to_the_lowest_carbon_candidate(stack: Stack, model: str) -> None:
    """Unpinned requests go to the candidate with the lowest reference carbon per 1k tokens."""
    with stack.client() as client:
        r = client.chat.completions.create(model=model, messages=MSGS)
    rec = only_hit(stack)
    route = lowrouter(r)["route"]
    want = best(stack.data, model)
    assert (route["upstream"], route["region"], route["model"]) in {
        (c[1], c[2], c[3]) for c in want}
    assert rec in stack.requests_to(route["upstream"])
    assert route["pinned"] is False and route["attempts"] == 1


@pytest.mark.parametrize("region", [None, "eu-west", "us-east", "eu-north"])
def test_auto_keeps_upstream_model_and_names_lowrouter_id(stack: Stack, region: str | None) -> None:
    """lowrouter/auto picks the cleanest auto model; `model` stays the upstream's own name."""
    extra = None if region is None else {"route": {"region": region}}
    with stack.client() as client:
        r = client.chat.completions.create(model=AUTO, messages=MSGS, extra_body=extra)
    rec = only_hit(stack)
    route = lowrouter(r)["route"]
    want = best(stack.data, AUTO, region)
    assert (route["upstream"], route["model"]) in {(c[1], c[3]) for c in want}
    up_model = next(u for u in stack.data["upstreams"]
                    if u["name"] == route["upstream"])["models"][route["model"]]
    assert rec.json["model"] == up_model
    assert r.model == sent_doc(rec)["model"] == up_model
    assert route["pinned"] is (region is not None)
    up = sent_doc(rec)["usage"]
    check_eco(stack.data, lowrouter(r)["eco"], route["model"], route["region"],
              up["prompt_tokens"], up["completion_tokens"], "estimated")


def test_large_request_body_reaches_the_upstream_intact(stack: Any) -> None:
    """A 2 MiB prompt (under max_body_bytes) is relayed whole, without aiohttp's large-body path failing."""
    text = "lorem " * (2 * 1024 * 1024 // 6)
    r = stack.client().chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": text}],
        extra_body={"route": {"region": "eu-west"}},
    )
    upstream = r.model_extra["lowrouter"]["route"]["upstream"]
    got = stack.requests_to(upstream)[-1].json
    assert got["messages"][0]["content"] == text


def _server_timing(value: str) -> dict[str, float]:
    out = {}
    for part in value.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_server_timing_splits_upstream_and_proxy_time(stack: Any, stream: bool) -> None:
    """Server-Timing names the upstream's share (here ≥ its 200 ms delay) and the proxy's own."""
    raw = stack.client().chat.completions.with_raw_response.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        stream=stream, extra_body={"route": {"region": "eu-west"}, "sim": {"headers_delay_s": 0.2}},
    )
    timing = _server_timing(raw.headers["Server-Timing"])
    assert set(timing) == {"upstream", "proxy"}
    assert timing["upstream"] >= 200.0
    assert 0.0 <= timing["proxy"] < timing["upstream"]
    raw.parse()


async def test_every_answer_has_server_timing(stack: Stack, http: aiohttp.ClientSession) -> None:
    """Not only routed answers: errors of the proxy's own, plain GETs, and an error after
    failed attempts (whose upstream share is those attempts' time) carry Server-Timing."""
    body = json.dumps({"model": MINI, "messages": MSGS}).encode()
    cases = [("GET", "/healthz", {}, b"", 200), ("GET", "/readyz", {}, b"", 200),
             ("GET", "/v1/models", auth(stack), b"", 200), ("GET", "/v1/nope", {}, b"", 404),
             ("POST", "/v1/chat/completions", {}, body, 401),
             ("POST", "/v1/chat/completions", auth(stack), b"{", 400)]
    for method, path, headers, data, status in cases:
        async with http.request(method, stack.origin + path, headers=headers, data=data) as r:
            assert r.status == status, path
            timing = _server_timing(r.headers["Server-Timing"])
            assert timing["upstream"] == 0.0 and 0.0 <= timing["proxy"] < 1000, (path, timing)
    failing = json.dumps({"model": MINI, "messages": MSGS,
                          "sim": {"status": 503, "headers_delay_s": 0.1}}).encode()
    async with http.post(stack.origin + "/v1/chat/completions", data=failing,
                         headers={**auth(stack), "X-LowRouter-Region": "eu-west"}) as r:
        assert r.status == 502
        timing = _server_timing(r.headers["Server-Timing"])
        # routed, though it failed: the region, model and the last upstream tried
        assert [r.headers[h] for h in ROUTE_HEADERS[:2]] == ["eu-west", MINI]
        assert r.headers["X-LowRouter-Upstream"] in ("eu-west-a", "eu-west-b")
    attempts = sum(hits(stack).values())
    assert attempts >= 2 and timing["upstream"] >= 100.0 * attempts


def test_generated_request_ids_are_unique_hex_of_uuid_length() -> None:
    """Generated ids: 32 hex digits, all different, with a per-process random part."""
    from lrproxy.protocol import request_id_of

    ids = [request_id_of(None) for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len({i[:16] for i in ids}) == 1


async def test_head_is_answered_where_get_is(stack: Stack, http: aiohttp.ClientSession) -> None:
    """HEAD on a GET path answers like GET, without a body; an encoded slash is no path."""
    for path in ("/healthz", "/readyz", "/v1/models", "/api/v1/models",
                 "/v1/models/" + MINI, "/api/v1/models/" + AUTO):
        async with http.head(stack.origin + path, headers=auth(stack)) as r:
            assert r.status == 200, path
            assert r.headers.getall("Server") == ["lrproxy"]
            assert await r.read() == b""
    async with http.get(stack.origin + "/v1%2Fmodels", headers=auth(stack)) as r:
        assert r.status == 404


def test_direct_dispatch_takes_exact_targets_only() -> None:
    """protocol.direct: the app's handler for an exact path and method it has, with no
    Expect; the router for everything else, which decodes, splits the query, answers
    Expect, 404 and 405 (test_paths_the_router_takes_reach_the_same_handler)."""
    from aiohttp.test_utils import make_mocked_request

    from lrproxy.protocol import direct

    called: list[str] = []

    def named(name: str) -> Any:
        async def h(request: Any) -> Any:
            called.append(name)
        return h

    handle = direct({"/v1/models": {"GET": named("models"), "HEAD": named("models")},
                     "/v1/chat/completions": {"POST": named("chat")}}, named("router"))
    cases = [("GET", "/v1/models", {}, "models"), ("HEAD", "/v1/models", {}, "models"),
             ("POST", "/v1/chat/completions", {}, "chat"),
             ("POST", "/v1/chat/completions", {"Expect": "100-continue"}, "router"),
             ("POST", "/v1/chat/completions?api-version=1", {}, "router"),
             ("POST", "/v1/chat/%63ompletions", {}, "router"),
             ("POST", "/v1/models", {}, "router"), ("GET", "/v1/models/", {}, "router"),
             ("GET", "/nope", {}, "router")]
    for method, target, headers, want in cases:
        called.clear()
        coro = handle(make_mocked_request(method, target, headers=headers))
        with pytest.raises(StopIteration):
            coro.send(None)  # type: ignore[attr-defined]
        assert called == [want], (method, target, headers)


async def test_paths_the_router_takes_reach_the_same_handler(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """A query string (Azure's SDK sends api-version) or an escaped letter in the path
    goes past the direct dispatch to the router: the same answer as the plain path."""
    body = {"model": MINI, "messages": MSGS}
    for path in ("/v1/chat/completions", "/v1/chat/completions?api-version=2024-10-21",
                 "/v1/chat/%63ompletions"):
        async with http.post(stack.origin + path, json=body, headers=auth(stack)) as r:
            assert r.status == 200, path
            assert (await r.json())["lowrouter"]["route"]["model"] == MINI
            assert r.headers.getall("Server") == ["lrproxy"] and "X-Request-Id" in r.headers
    async with http.get(stack.origin + "/v1/models?limit=1", headers=auth(stack)) as r:
        assert r.status == 200
        assert {m["id"] for m in (await r.json())["data"]} >= {MINI}
    # /models/{id} is only the router's (a pattern): its slash plain or escaped, a query
    for path in ("/v1/models/openai/gpt-4o-mini", "/v1/models/openai%2Fgpt-4o-mini?x=1",
                 "/api/v1/models/openai%2Fgpt-4o-%6Dini"):
        async with http.get(yarl.URL(stack.origin + path, encoded=True),
                            headers=auth(stack)) as r:
            assert r.status == 200, path
            assert (await r.json())["id"] == MINI
            assert r.headers.getall("Server") == ["lrproxy"] and "X-Request-Id" in r.headers
    # an escaped `%` is part of the id, which no model has
    async with http.get(yarl.URL(stack.origin + "/v1/models/openai%252Fgpt-4o-mini",
                                 encoded=True), headers=auth(stack)) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "model_not_found"
    wait_for(lambda: stack.metric_sum("lrproxy_requests_total", code="200") == 7)


def test_expect_continue_comes_only_after_the_checks(stack: Stack) -> None:
    """`Expect: 100-continue` on a chat request: a client refused by its key, its
    Content-Length or its encoding gets the refusal instead of `100 Continue`, and never
    sends its body; one that passes gets `100 Continue`, sends, and has its answer."""
    import socket

    host, port = stack.origin.removeprefix("http://").split(":")
    body = json.dumps({"model": MINI, "messages": MSGS}).encode()

    def ask(headers: dict[str, str], send_body: bool) -> tuple[bytes, bytes]:
        """(what came before the body was sent, what came after)"""
        lines = ["POST /v1/chat/completions HTTP/1.1", f"Host: {host}",
                 "Content-Type: application/json", "Expect: 100-continue",
                 *(f"{k}: {v}" for k, v in headers.items())]
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            first = s.recv(65536)
            if not send_body:
                return first, b""
            s.sendall(body)
            rest = b""
            while b'"lowrouter"' not in rest:
                data = s.recv(65536)
                assert data, rest
                rest += data
            return first, rest

    key = {"Authorization": f"Bearer {stack.key}"}
    for headers, status in (({"Content-Length": "10000000"}, b"401"),
                            ({**key, "Content-Length": "10000000"}, b"413"),
                            ({**key, "Content-Length": str(len(body)),
                              "Content-Encoding": "gzip"}, b"415")):
        first, _ = ask(headers, send_body=False)
        assert first.startswith(b"HTTP/1.1 " + status), first[:200]
        assert b"100 Continue" not in first and b'"error"' in first
    first, rest = ask({**key, "Content-Length": str(len(body))}, send_body=True)
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.startswith(b"HTTP/1.1 200 ")


def test_targets_with_no_path_get_the_openai_404(stack: Stack) -> None:
    """`OPTIONS *`, `CONNECT host:port` and an absolute URL with no path match no route:
    a 404 in the OpenAI shape from lrproxy, not aiohttp's text page and Server header."""
    import socket

    host, port = stack.origin.removeprefix("http://").split(":")
    for target, extra in (("OPTIONS *", "Connection: close"),
                          ("CONNECT example.com:443", "Connection: close"),
                          (f"GET http://{host}:{port}", "Connection: close"),
                          # waits for 100 Continue: the 404 comes, saying the connection
                          # closes, as no body is coming
                          ("OPTIONS *", "Expect: 100-continue\r\nContent-Length: 5")):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(f"{target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n\r\n".encode())
            raw = b""
            while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < int(
                    raw.split(b"Content-Length: ")[1].split(b"\r\n")[0]):
                data = s.recv(65536)
                assert data, raw
                raw += data
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(ln.split(": ", 1) for ln in lines[1:])
        assert lines[0] == "HTTP/1.1 404 Not Found", target
        assert headers["Connection"] == "close"
        assert headers["Server"] == "lrproxy" and "X-Request-Id" in headers, headers
        assert "Server-Timing" in headers
        err = json.loads(body)["error"]
        assert err["code"] == "not_found" and target.split()[1] in err["message"], err


async def test_wrong_method_is_405_with_allow(stack: Stack, http: aiohttp.ClientSession) -> None:
    """A known path with another method: 405 in the OpenAI shape, naming what is allowed."""
    for method, path, allow in (("GET", "/api/v1/chat/completions", {"POST"}),
                                ("DELETE", "/v1/models", {"GET", "HEAD"}),
                                ("POST", "/v1/models/" + MINI, {"GET", "HEAD"}),
                                ("POST", "/healthz", {"GET", "HEAD"})):
        async with http.request(method, stack.origin + path, headers=auth(stack)) as r:
            assert r.status == 405, (method, path)
            error = (await r.json())["error"]
            assert error["code"] == "method_not_allowed"
            assert set(r.headers["Allow"].split(",")) == allow
            assert error["message"] == f"{path} takes {', '.join(sorted(allow))}, not {method}"
            assert r.headers.getall("Server") == ["lrproxy"] and "X-Request-Id" in r.headers


async def test_expect_header(stack: Stack, http: aiohttp.ClientSession) -> None:
    """`Expect: 100-continue` (curl sends it for large bodies) works; any other
    expectation is a 417 in the OpenAI shape, from lrproxy, counted."""
    body = json.dumps({"model": MINI, "messages": MSGS}).encode()
    url = stack.base_url + "/chat/completions"
    async with http.post(url, data=body, headers=auth(stack), expect100=True) as r:
        assert r.status == 200
        assert (await r.json())["lowrouter"]["route"]["model"] == MINI
    async with http.post(url, data=body, headers={**auth(stack), "Expect": "magic",
                                                  "X-Request-Id": "my-trace-42"}) as r:
        assert r.status == 417
        assert (await r.json())["error"]["code"] == "expectation_failed"
        assert r.headers.getall("Server") == ["lrproxy"]
        assert r.headers["X-Request-Id"] == "my-trace-42"  # a sane one is echoed (SPEC §1)
        assert _server_timing(r.headers["Server-Timing"])["upstream"] == 0.0
    wait_for(lambda: stack.metric_sum("lrproxy_requests_total", code="417") == 1)


def _raw_chat(stack: Stack, lines: list[bytes], body: bytes) -> tuple[bytes, bytes]:
    """A chat request with header `lines` as raw bytes (which no HTTP client sends as
    given: non-UTF-8, repeated, empty), on a connection of its own: (head, body)."""
    import socket

    host, port = stack.origin.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Authorization: Bearer " + stack.key.encode() + b"\r\n"
                  + b"".join(line + b"\r\n" for line in lines)
                  + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        raw = b""
        while data := s.recv(65536):
            raw += data
    head, _, answer = raw.partition(b"\r\n\r\n")
    return head, answer


def test_header_bytes_that_are_not_utf8_are_quoted_escaped(stack: Stack) -> None:
    """A header value with a byte that is not UTF-8, which the refusal quotes
    (X-LowRouter-Region, Expect, Content-Encoding): the refusal in the OpenAI shape with
    the byte escaped, counted under the status the client got; never aiohttp's plain 500."""
    body = json.dumps({"model": MINI, "messages": MSGS}).encode()
    cases = ((b"X-LowRouter-Region: eu\xff", 400, "unknown_region"),
             (b"Expect: 100-continu\xff", 417, "expectation_failed"),
             (b"Content-Encoding: gz\xffip", 415, "unsupported_media_type"))
    for header, status, code in cases:
        head, answer = _raw_chat(stack, [header], body)
        assert head.startswith(b"HTTP/1.1 %d " % status), head[:300]
        assert b"Content-Type: application/json" in head
        err = json.loads(answer)["error"]
        assert err["code"] == code and "\\udcff" in err["message"], err
    wait_for(lambda: all(stack.metric_sum("lrproxy_requests_total", code=str(c[1])) == 1
                         for c in cases))
    assert stack.metric_sum("lrproxy_requests_total", code="500") == 0


@pytest.mark.parametrize(("lines", "want", "body_region"), [
    ([b"X-LowRouter-Region: "], 400, None),  # an unset variable in default_headers
    ([b"X-LowRouter-Region:    "], 400, None),
    ([b"X-LowRouter-Region: us-east", b"X-LowRouter-Region: eu-west"], 400, None),
    ([b"X-LowRouter-Region: ", b"X-LowRouter-Region: eu-west"], 400, None),
    ([b"X-LowRouter-Region: eu-west", b"x-lowrouter-region: eu-west"], 200, None),
    ([b"X-LowRouter-Region: eu-west"], 200, None),
    # the body's pin wins (SPEC §2): the header, whatever it holds, is not read
    ([b"X-LowRouter-Region: "], 200, "eu-west"),
    ([b"X-LowRouter-Region: us-east", b"X-LowRouter-Region: eu-north"], 200, "eu-west"),
])
def test_a_region_header_must_name_one_region(
    stack: Stack, lines: list[bytes], want: int, body_region: str | None,
) -> None:
    """A pin by header that is empty, or given twice with different regions, is refused
    (400, param naming the header), never taken for no pin or for its first copy: either
    could send a pinned request out of its region (SPEC §2). Copies that agree pin; a
    body that pins wins over any header."""
    fields: dict[str, Any] = {"model": MINI, "messages": MSGS}
    if body_region is not None:
        fields["route"] = {"region": body_region}
    head, answer = _raw_chat(stack, lines, json.dumps(fields).encode())
    assert head.startswith(b"HTTP/1.1 %d " % want), head[:300]
    doc = json.loads(answer)
    if want == 400:
        assert doc["error"]["code"] == "invalid_request"
        assert doc["error"]["param"] == "X-LowRouter-Region"
        assert not any(stack.requests_to(u["name"]) for u in stack.data["upstreams"])
    else:
        assert doc["lowrouter"]["route"]["region"] == "eu-west"
        assert doc["lowrouter"]["route"]["pinned"] is True


def test_error_body_never_fails_on_lone_surrogates() -> None:
    """errors.error_body escapes a lone surrogate that a message quoting client text
    still holds, rather than raising."""
    from lrproxy.errors import error_body

    err = json.loads(error_body("bad 'x\udcff'", "invalid_request_error", "c", "p\ud800"))
    assert err["error"] == {"message": "bad 'x\\udcff'", "type": "invalid_request_error",
                            "param": "p\\ud800", "code": "c"}


def test_upstream_accept_header_follows_the_request_kind(stack: Stack) -> None:
    """A streamed chat asks the upstream for `text/event-stream`; a JSON chat and an
    embeddings request ask for `application/json`."""
    client = stack.client()
    client.chat.completions.create(model=MINI, messages=[{"role": "user", "content": "hi"}])
    list(client.chat.completions.create(model=MINI, stream=True,
                                        messages=[{"role": "user", "content": "hi"}]))
    client.embeddings.create(model=MINI, input="hi")
    reqs = [r for up in stack.sims for r in stack.requests_to(up)]
    seen = sorted((r.path.rsplit("/", 1)[-1], bool((r.json or {}).get("stream")),
                   {k.lower(): v for k, v in r.headers.items()}["accept"]) for r in reqs)
    assert seen == [("completions", False, "application/json"),
                    ("completions", True, "text/event-stream"),
                    ("embeddings", False, "application/json")], seen
