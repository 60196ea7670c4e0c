"""Prometheus metrics (SPEC §5) and the request log (SPEC §6), against a real stack.

The figures must add up: what the clients were told in `lowrouter.eco` is what the
counters grew by, counted once, cut and abandoned streams included (SPEC §1.1); label
values stay within config names and fixed words whatever clients send.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import CI_KEY, TEAM_A_KEY, UPSTREAM_KEYS, Stack, base_config, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lrproxy.log import ACCESS, MAIN, JsonFormatter
from lrproxy.simupstream import Faults

MODEL = "openai/gpt-4o-mini"
PROMPT = "zanzibar quokka marmalade 7731 tell me a secret"
ANSWER = "plugh xyzzy frobnicate 4417 answer"  # the simulator says this instead of its words
# Client keys (good and bad ones: "sk-not-a-key", the flood's "sk-x…"), upstream keys,
# prompt and completion words: none may reach a log line.
SECRETS = (TEAM_A_KEY, CI_KEY, *UPSTREAM_KEYS.values(), "sk-not-a-key", "sk-x", "zanzibar",
           "quokka", "plugh", "xyzzy", "frobnicate")
MESSAGES = [{"role": "user", "content": PROMPT}]
SIM = {"text": ANSWER}

# SPEC §5: name (as the parser names the family) -> type, labels.
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "lrproxy_requests": ("counter", {"key", "model", "region", "code"}),
    "lrproxy_tokens": ("counter", {"key", "model", "region", "kind"}),
    "lrproxy_carbon_grams": ("counter", {"key", "model", "region"}),
    "lrproxy_energy_wh": ("counter", {"key", "model", "region"}),
    "lrproxy_upstream_attempts": ("counter", {"upstream", "outcome"}),
    "lrproxy_request_duration_seconds": ("histogram", {"model", "region", "stream"}),
    "lrproxy_time_to_first_byte_seconds": ("histogram", {"model", "region"}),
    "lrproxy_inflight_requests": ("gauge", set()),
    "lrproxy_upstream_usable": ("gauge", {"upstream"}),
    "lrproxy_grid_intensity_g_per_kwh": ("gauge", {"region"}),
    "lrproxy_config_reloads": ("counter", {"result"}),
}
OUTCOMES = {"ok", "passed_4xx", "timeout", "auth_failed", "connect_error", "rate_limited",
            "redirect", "status_5xx", "bad_response", "connection_lost"}
FIXED_WORDS = {
    "unknown", "none", "client_closed", "stream_error", "true", "false", "prompt",
    "completion", "ok", "error", *OUTCOMES, *(f"stream_{o}" for o in OUTCOMES),
}
ACCESS_FIELDS = {"ts", "method", "path", "client", "request_id", "key", "model", "region",
                 "upstream", "status", "prompt_tokens", "completion_tokens", "carbon_g",
                 "ttfb_ms", "duration_ms"}


# ---------------------------------------------------------------------------------------
# helpers


class _Records(logging.Handler):
    """Keeps every record (the stack logs from its own thread; emit holds the lock)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def access(self) -> list[dict[str, Any]]:
        return [r.fields for r in self.records if r.name == ACCESS]  # type: ignore[attr-defined]


@pytest.fixture
def logs() -> Iterator[_Records]:
    """Capture the `lrproxy` and `lrproxy.access` loggers at their most verbose."""
    h = _Records()
    loggers = [logging.getLogger(MAIN), logging.getLogger(ACCESS)]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    loggers[0].setLevel(logging.DEBUG)
    loggers[1].setLevel(logging.INFO)
    loggers[1].propagate = False  # each record reaches `h` once
    for lg in loggers:
        lg.addHandler(h)
    yield h
    for lg, level, propagate in saved:
        lg.removeHandler(h)
        lg.setLevel(level)
        lg.propagate = propagate


def _families(stack: Stack) -> dict[str, Any]:
    text = generate_latest(stack.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


Figures = dict[tuple[str, str, str], dict[str, float]]  # (key, model, region) -> figures
_FIGURE_OF = {"lrproxy_carbon_grams_total": "carbon", "lrproxy_energy_wh_total": "energy"}


def _figures(stack: Stack) -> Figures:
    """The counters whose growth the accounting test compares with what clients saw,
    per (key, model, region) label set: a figure under the wrong label does not add up."""
    out: Figures = {}
    for fam in stack.registry.collect():
        for s in fam.samples:
            what = s.labels.get("kind") if s.name == "lrproxy_tokens_total" else (
                _FIGURE_OF.get(s.name))
            if what is not None:
                k = (s.labels["key"], s.labels["model"], s.labels["region"])
                out.setdefault(k, {})[what] = s.value
    return out


def _growth(before: Figures, after: Figures) -> Figures:
    """What each label set's figures grew by; label sets that did not grow are left out."""
    out: Figures = {}
    for k, figs in after.items():
        grew = {w: v - before.get(k, {}).get(w, 0.0) for w, v in figs.items()}
        if any(grew.values()):
            out[k] = grew
    return out


def _sse_data(raw: bytes) -> list[dict[str, Any]]:
    """The JSON `data:` payloads of an SSE body (enough for the proxy's own events)."""
    out = []
    for block in re.split(rb"\r?\n\r?\n", raw):
        data = b"\n".join(line[5:].lstrip() for line in block.splitlines()
                          if line.startswith(b"data:"))
        if data and data != b"[DONE]":
            out.append(orjson.loads(data))
    return out


def _tapped_client(stack: Stack, bodies: list[bytearray], **kw: Any) -> openai.OpenAI:
    """An SDK client whose HTTP layer keeps a copy of every response body it reads.

    The SDK drops everything but `error` from a stream's error event, so the cut stream's
    `lowrouter` is read from these bytes. The SDK's HTTP package (httpx or its successor)
    is found from its default client's base class.
    """
    http = importlib.import_module(openai.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])

    class Tee(http.SyncByteStream):  # type: ignore[misc, name-defined]
        def __init__(self, inner: Any, buf: bytearray) -> None:
            self.inner, self.buf = inner, buf

        def __iter__(self) -> Iterator[bytes]:
            for chunk in self.inner:
                self.buf += chunk
                yield chunk

        def close(self) -> None:
            self.inner.close()

    def hook(response: Any) -> None:
        buf = bytearray()
        bodies.append(buf)
        response.stream = Tee(response.stream, buf)

    return stack.client(http_client=openai.DefaultHttpxClient(event_hooks={"response": [hook]}),
                        **kw)


def _lowrouters(bodies: list[bytearray]) -> list[dict[str, Any]]:
    """Every `lowrouter` object the client received: JSON bodies and final SSE events."""
    out = []
    for raw in bodies:
        docs = [orjson.loads(raw)] if raw.lstrip().startswith(b"{") else _sse_data(bytes(raw))
        out += [d["lowrouter"] for d in docs if "lowrouter" in d]
    return out


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


async def _abandon(stack: Stack, request_id: str, events: int) -> int:
    """Read a few events of a slow stream, then drop the connection; returns bytes read."""
    body = {"model": MODEL, "messages": MESSAGES, "stream": True,
            "sim": {**SIM, "chunks": 40, "chunk_delay_s": 0.02}}
    headers = {"Authorization": f"Bearer {stack.key}", "X-Request-Id": request_id}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(f"{stack.base_url}/chat/completions", json=body, headers=headers)
        assert resp.status == 200
        seen, got = 0, 0
        while seen < events:
            chunk = await resp.content.readany()
            assert chunk, "the stream ended before the client left"
            got += len(chunk)
            seen += chunk.count(b"\n\n")
        resp.close()  # leave mid-stream: the connection is dropped, not released
    return got


def _mixed_traffic(stack: Stack) -> dict[str, Any]:
    """A known mix of answers, errors, cut and abandoned streams; what clients were told."""
    bodies: list[bytearray] = []
    client = _tapped_client(stack, bodies)
    sdk_seen: list[dict[str, Any]] = []  # lowrouter objects as the SDK exposes them

    def rid(name: str) -> dict[str, Any]:
        return {"extra_headers": {"X-Request-Id": f"t-{name}"}}

    # Non-streaming, pinned and not.
    for i, region in enumerate(("eu-west", "us-east", None)):
        extra: dict[str, Any] = {"sim": SIM}
        if region:
            extra["route"] = {"region": region}
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra,
                                           extra_query={"note": "q"} if i == 0 else None,
                                           **rid(f"plain-{i}"))
        sdk_seen.append(r.model_extra["lowrouter"])
        assert r.usage is not None
        assert r.model_extra["lowrouter"]["eco"]["tokens"] == {
            "prompt": r.usage.prompt_tokens, "completion": r.usage.completion_tokens}
    # Streams, with and without include_usage.
    for usage in (True, False):
        opts: Any = {"include_usage": True} if usage else openai.NOT_GIVEN
        stream = client.chat.completions.create(
            model="meta/llama-3.1-8b", messages=MESSAGES, stream=True, stream_options=opts,
            extra_body={"sim": SIM}, **rid(f"stream-{usage}"))
        chunks = list(stream)
        finals = [c.model_extra["lowrouter"] for c in chunks if c.model_extra.get("lowrouter")]
        assert len(finals) == 1
        sdk_seen.append(finals[0])
        assert any(c.usage for c in chunks) is usage
        assert all(c.choices for c in chunks) is not usage
    # A stream the upstream cuts after three content chunks: the SDK raises.
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_body={"sim": {**SIM, "cut_after": 3}},
        **rid("cut"))
    with pytest.raises(openai.APIError) as exc:
        for _ in stream:
            pass
    assert exc.value.code == "upstream_error"
    # Failover: both eu-west upstreams fail once with a 500; the third attempt answers.
    for name in ("eu-west-a", "eu-west-b"):
        stack.call(lambda name=name: setattr(stack.sims[name], "faults",
                                             Faults(fail_status=500, fail_count=1)))
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, **rid("failover"),
                                       extra_body={"sim": SIM, "route": {"region": "eu-west"}})
    assert r.model_extra["lowrouter"]["route"]["attempts"] == 3
    sdk_seen.append(r.model_extra["lowrouter"])
    # Errors: an upstream 400 passed through, the only upstream answering 429 (429), unknown model
    # (404), a wrong key (401).
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, **rid("up400"),
                                       extra_body={"sim": {"status": 400}})
    with pytest.raises(openai.RateLimitError) as exc5:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, **rid("up429"),
                                       extra_body={"sim": {"status": 429},
                                                   "route": {"region": "us-east"}})
    assert exc5.value.status_code == 429
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="acme/no-such-model", messages=MESSAGES,
                                       **rid("nomodel"))
    # /models is an API request too: counted and logged, without tokens.
    assert client.models.list(**rid("models")).data
    bad = stack.client(api_key="sk-not-a-key-" + TEAM_A_KEY[::-1])
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=MESSAGES, **rid("badkey"))
    bad.close()
    client.close()

    # A client that leaves mid-stream: counted once the proxy notices (SPEC §1.1).
    closed_before = stack.metric_sum("lrproxy_requests_total", code="client_closed")
    asyncio.run(_abandon(stack, "t-abandon", events=3))
    _wait(lambda: stack.metric_sum("lrproxy_requests_total", code="client_closed")
          > closed_before)
    _wait(lambda: stack.metric("lrproxy_inflight_requests") == 0)

    received = _lowrouters(bodies)
    # The SDK exposed the same objects the bytes held (cut stream aside: SDK drops it).
    for lr in sdk_seen:
        assert lr in received
    return {"received": received, "requests": 13,
            "ids": ["t-plain-0", "t-plain-1", "t-plain-2", "t-stream-True", "t-stream-False",
                    "t-cut", "t-failover", "t-up400", "t-up429", "t-nomodel", "t-models",
                    "t-badkey", "t-abandon"]}


# ---------------------------------------------------------------------------------------
# tests


def test_every_metric_exists_with_its_labels_and_type(stack: Stack, logs: _Records) -> None:
    """After traffic every SPEC §5 metric is exposed with exactly its labels and type."""
    _mixed_traffic(stack)
    fams = _families(stack)
    for name, (kind, labels) in FAMILIES.items():
        assert name in fams, name
        fam = fams[name]
        assert fam.type == kind, name
        assert fam.samples, name
        for s in fam.samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    assert {s.labels["region"]: s.value for s in fams["lrproxy_grid_intensity_g_per_kwh"].samples
            } == {r: v["grid_intensity_g_per_kwh"] for r, v in base_config()["regions"].items()}
    assert {s.labels["upstream"]: s.value for s in fams["lrproxy_upstream_usable"].samples} == {
        u["name"]: 1.0 for u in base_config()["upstreams"]}
    assert [s.value for s in fams["lrproxy_inflight_requests"].samples] == [0.0]
    # Both reload results exist at 0 before any reload, so increase() sees the first one.
    assert {s.labels["result"]: s.value for s in fams["lrproxy_config_reloads"].samples
            if s.name.endswith("_total")} == {"ok": 0.0, "error": 0.0}
    hist = {s.labels["stream"] for s in fams["lrproxy_request_duration_seconds"].samples}
    assert hist == {"true", "false"}


def test_figures_add_up_counted_once(stack: Stack, logs: _Records) -> None:
    """Σ eco the clients were told (+ the abandoned stream's line) = the counters' growth."""
    before, requests_before = _figures(stack), stack.metric_sum("lrproxy_requests_total")
    seen = _mixed_traffic(stack)
    grown = _growth(before, _figures(stack))
    received = seen["received"]
    assert len(received) == 7  # 3 plain, 2 streams, the cut stream's error event, failover
    cut = [lr for lr in received if lr["request_id"] == "t-cut"]
    assert len(cut) == 1 and cut[0]["eco"]["accuracy"] == "estimated"
    # README's estimate: (prompt chars + 16 per message) / 4 rounded up; one completion
    # token per chunk with choices the upstream sent: the role chunk and three words
    assert cut[0]["eco"]["tokens"] == {"prompt": math.ceil((len(PROMPT) + 16) / 4),
                                       "completion": 1 + 3}

    lines = {f["request_id"]: f for f in logs.access()}
    abandoned = lines["t-abandon"]
    assert abandoned["status"] == "client_closed"
    assert abandoned["completion_tokens"] > 0 and abandoned["carbon_g"] > 0
    # What the proxy logged for each answer is what the client was told.
    for lr in received:
        line = lines[lr["request_id"]]
        assert line["carbon_g"] == lr["eco"]["carbon_g"]
        assert (line["prompt_tokens"], line["completion_tokens"]) == (
            lr["eco"]["tokens"]["prompt"], lr["eco"]["tokens"]["completion"])

    # Each figure under the labels of the request it is for: the key that asked (every
    # answer here went to team-a), the model and region it was routed to.
    expected: Figures = {}
    told = [(("team-a", lr["route"]["model"], lr["route"]["region"]), lr["eco"]["carbon_g"],
             lr["eco"]["energy_wh"], lr["eco"]["tokens"]["prompt"],
             lr["eco"]["tokens"]["completion"]) for lr in received]
    told.append(((abandoned["key"], abandoned["model"], abandoned["region"]),
                 abandoned["carbon_g"], abandoned["energy_wh"], abandoned["prompt_tokens"],
                 abandoned["completion_tokens"]))
    for labels, carbon, energy, prompt, completion in told:
        e = expected.setdefault(labels, dict.fromkeys(
            ("carbon", "energy", "prompt", "completion"), 0.0))
        e["carbon"] += carbon
        e["energy"] += energy
        e["prompt"] += prompt
        e["completion"] += completion
    assert len(expected) >= 3  # gpt-4o-mini in two regions, llama: the labels differ
    assert set(grown) == set(expected)
    for labels, e in expected.items():
        g = grown[labels]
        assert g["carbon"] == pytest.approx(e["carbon"], rel=1e-9), labels
        assert g["energy"] == pytest.approx(e["energy"], rel=1e-9), labels
        assert (g["prompt"], g["completion"]) == (e["prompt"], e["completion"]), labels
    assert stack.metric_sum("lrproxy_requests_total") - requests_before == seen["requests"]


def test_request_codes_attempt_outcomes_and_gauges(stack: Stack, logs: _Records) -> None:
    """requests_total by code, attempts by outcome on failover, inflight back to 0."""
    _mixed_traffic(stack)
    m = stack.metric
    codes: dict[str, float] = {}
    for fam in stack.registry.collect():
        for s in fam.samples:
            if s.name == "lrproxy_requests_total":
                codes[s.labels["code"]] = codes.get(s.labels["code"], 0) + s.value
    assert codes == {"200": 7, "400": 1, "401": 1, "404": 1, "429": 1,
                     "stream_error": 1, "client_closed": 1}
    assert m("lrproxy_requests_total", key="unknown", model="unknown", region="none",
             code="401") == 1
    assert m("lrproxy_requests_total", key="team-a", model="unknown", region="none",
             code="404") == 1
    assert m("lrproxy_requests_total", key="team-a", model=MODEL, region="eu-west",
             code="stream_error") == 1
    assert m("lrproxy_requests_total", key="team-a", model=MODEL, region="eu-west",
             code="client_closed") == 1
    # Failover: one 500 from each eu-west upstream, then eu-west-a answered.
    assert m("lrproxy_upstream_attempts_total", upstream="eu-west-a", outcome="status_5xx") == 1
    assert m("lrproxy_upstream_attempts_total", upstream="eu-west-b", outcome="status_5xx") == 1
    # A 429 is retried on a different upstream only (SPEC §2); us-east has just one.
    assert m("lrproxy_upstream_attempts_total", upstream="us-east-a", outcome="rate_limited") == 1
    assert m("lrproxy_upstream_attempts_total", upstream="eu-west-a", outcome="passed_4xx") == 1
    assert m("lrproxy_upstream_attempts_total", upstream="eu-west-a",
             outcome="stream_connection_lost") == 1
    # one outcome an attempt: the stream cut mid-way is stream_connection_lost alone,
    # the one its client left client_closed
    assert stack.metric_sum("lrproxy_upstream_attempts_total", outcome="ok") == 6
    assert stack.metric_sum("lrproxy_upstream_attempts_total", outcome="client_closed") == 1
    assert m("lrproxy_inflight_requests") == 0
    assert m("lrproxy_time_to_first_byte_seconds_count", model=MODEL, region="eu-west") >= 4
    assert m("lrproxy_request_duration_seconds_count", model="meta/llama-3.1-8b",
             region="eu-north", stream="true") == 2


def test_usable_gauge_follows_ejection(stack: Stack, logs: _Records) -> None:
    """An upstream ejected after 5 failures in a row shows 0 in lrproxy_upstream_usable."""
    stack.call(lambda: setattr(stack.sims["eu-west-a"].faults, "fail_status", 500))
    stack.call(lambda: setattr(stack.sims["eu-west-a"].faults, "fail_count", -1))
    client = stack.client()
    for _ in range(12):
        client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                       extra_body={"route": {"region": "eu-west"}})
        if stack.metric("lrproxy_upstream_usable", upstream="eu-west-a") == 0:
            break
    client.close()
    assert stack.metric("lrproxy_upstream_attempts_total", upstream="eu-west-a",
                        outcome="status_5xx") == 5
    assert stack.metric("lrproxy_upstream_usable", upstream="eu-west-a") == 0
    assert stack.metric("lrproxy_upstream_usable", upstream="eu-west-b") == 1


def test_access_log_one_line_per_request_without_secrets(stack: Stack, logs: _Records) -> None:
    """One JSON access line per API request, its fields set; no key or text in any log.
    Each says when the request began (a Unix time), its method,
    path (without a query string) and client address, as nginx's and Envoy's do."""
    began = time.time()
    seen = _mixed_traffic(stack)
    ended = time.time()
    lines = logs.access()
    assert sorted(f["request_id"] for f in lines) == sorted(seen["ids"])
    for f in lines:
        assert set(f) >= ACCESS_FIELDS, f
        assert isinstance(orjson.loads(orjson.dumps(f)), dict)
        assert isinstance(f["duration_ms"], float) and f["duration_ms"] >= 0
    by_id = {f["request_id"]: f for f in lines}
    ok = by_id["t-plain-0"]
    assert (ok["key"], ok["model"], ok["region"], ok["status"]) == ("team-a", MODEL, "eu-west", 200)
    assert ok["upstream"] in ("eu-west-a", "eu-west-b")
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] == len(ANSWER.split())
    assert ok["carbon_g"] > 0 and ok["ttfb_ms"] > 0
    assert (ok["method"], ok["client"]) == ("POST", "127.0.0.1")
    assert ok["path"].endswith("/chat/completions")  # (its ?note=q left out)
    for f in lines:
        t = f["ts"]
        assert began - 0.001 <= t <= ended and t + f["duration_ms"] / 1000 <= ended + 0.001
    assert by_id["t-failover"]["attempts"] == 3
    assert by_id["t-cut"]["status"] == "stream_error"
    assert (by_id["t-badkey"]["key"], by_id["t-badkey"]["status"]) == ("unknown", 401)
    assert by_id["t-nomodel"]["model"] == "unknown"
    assert (by_id["t-models"]["key"], by_id["t-models"]["status"]) == ("team-a", 200)
    _assert_no_secrets(logs)


def test_every_request_but_health_probes_is_logged_and_counted(
    stack: Stack, logs: _Records
) -> None:
    """Requests off the API paths (a scanner's `/admin`, `/`, `//v1/models`) get their
    access line and count too (SPEC §6); the health probes a load balancer sends every
    second do not."""
    import http.client

    base = stack.base_url.removesuffix("/api/v1")
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    got = {}
    for method, path in (("GET", "/admin"), ("GET", "/"), ("GET", "//v1/models"),
                         ("GET", "/V1/MODELS"), ("POST", "/healthz"), ("GET", "/healthz"),
                         ("HEAD", "/readyz"), ("GET", "/healthz?probe=lb")):
        conn.request(method, path, headers={"X-Request-Id": f"t-{method}{path}".replace(
            "/", "-").replace("?", "-").replace("=", "-")})
        r = conn.getresponse()
        r.read()
        got[method, path] = r.status
    conn.close()
    assert list(got.values()) == [404, 404, 404, 404, 405, 200, 200, 200]
    _wait(lambda: stack.metric_sum("lrproxy_requests_total") == 5)
    ids = sorted(f["request_id"] for f in logs.access())
    assert ids == sorted(f"t-{m}{p}".replace("/", "-") for (m, p), s in got.items()
                         if s != 200)  # (the probe with a query string is not logged either)


def _assert_no_secrets(logs: _Records) -> None:
    fmt = JsonFormatter()
    assert logs.records
    for record in logs.records:
        text = fmt.format(record)
        for secret in SECRETS:
            assert secret not in text, (secret, text)


# ---------------------------------------------------------------------------------------
# bounded cardinality


def _allowed_values(stack: Stack) -> set[str]:
    c = stack.config
    return {
        *(k.name for k in c.keys), *c.models, "lowrouter/auto", *c.regions,
        *(u.name for u in c.upstreams), *FIXED_WORDS,
    }


def _label_values(stack: Stack) -> set[tuple[str, str]]:
    out = set()
    for fam in stack.registry.collect():
        if fam.name.startswith("lrproxy_"):
            for s in fam.samples:
                out |= {(k, v) for k, v in s.labels.items() if k != "le"}
    return out


@pytest.mark.slow
async def test_invented_names_add_no_label_values(stack: Stack, logs: _Records) -> None:
    """4,000 requests with invented models, regions, keys and paths add no label values."""
    # 4,000 rather than 10,000: client and proxy share one process (and the GIL) here, at
    # about 1,000 requests/s; 500 invented names per request shape show unbounded labels
    # as surely as 1,250 would, in a third of the time.
    n, workers = 4_000, 64
    url = stack.base_url
    auth = {"Authorization": f"Bearer {stack.key}"}

    def request(i: int) -> tuple[str, dict[str, Any] | None, dict[str, str], int]:
        inv = f"x{i}-évil\"{{}}"
        match i % 8:
            case 0:
                return "/chat/completions", {"model": f"acme/{inv}", "messages": MESSAGES}, auth, 404
            case 1:
                return "/chat/completions", {"model": MODEL, "messages": MESSAGES,
                                             "route": {"region": f"mars-{inv}"}}, auth, 400
            case 2:
                return "/chat/completions", {"model": MODEL, "messages": MESSAGES}, {
                    **auth, "X-LowRouter-Region": f"moon-{i}"}, 400
            case 3:
                return "/embeddings", {"model": f"emb-{inv}", "input": "hi"}, {
                    "Authorization": f"Bearer sk-{inv}"}, 401
            case 4:
                return f"/x-{i}", {"model": inv}, auth, 404
            case 5:
                return "/chat/completions", {"model": MODEL, "messages": MESSAGES,
                                             "route": {"region": "eu-north"}}, auth, 400
            case 6:
                return "/chat/completions", {"model": inv, "messages": MESSAGES}, {
                    **auth, "X-LowRouter-Region": "eu-west", "X-Request-Id": inv[:20]}, 404
            case _:
                return "/chat/completions", {"model": "lowrouter/auto", "messages": MESSAGES,
                                             "sim": {"chunks": 1}}, {
                    **auth, "X-Request-Id": f"rid-{i}"}, 200

    statuses: dict[int, int] = {}
    wrong: list[tuple[int, int]] = []
    todo = iter(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=workers)) as s:

        async def worker() -> None:
            for i in todo:
                path, body, headers, want = request(i)
                async with s.post(url + path, data=orjson.dumps(body), headers=headers) as r:
                    await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if r.status != want:
                    wrong.append((i, r.status))

        await asyncio.gather(*(worker() for _ in range(workers)))
    assert not wrong[:5], statuses
    assert sum(statuses.values()) == n
    values = _label_values(stack)
    allowed = _allowed_values(stack)
    strays = {(k, v) for k, v in values if v not in allowed
              and not (k == "code" and re.fullmatch(r"[1-5]\d\d", v))}
    assert not strays
    assert stack.metric_sum("lrproxy_requests_total") == n
    assert len(logs.access()) == n
    _assert_no_secrets(logs)


def test_inflight_gauge_counts_requests_being_handled(stack: Stack, logs: _Records) -> None:
    """lrproxy_inflight_requests is 1 while a stream is open and 0 once it ended."""
    client = stack.client()
    with client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True,
        extra_body={"sim": {"chunks": 3, "chunk_delay_s": 0.2}},
    ) as s:
        next(iter(s))
        assert stack.metric("lrproxy_inflight_requests") == 1
        for _ in s:
            pass
    wait_for(lambda: stack.metric("lrproxy_inflight_requests") == 0)


def test_pending_figures_are_bounded_and_immediate_mode_writes_at_once() -> None:
    """Finished requests wait for the next collection as one entry per label set
    (bounded memory); in multiprocess mode (immediate) each goes into the metrics as it
    ends."""
    from prometheus_client import CollectorRegistry

    from lrproxy.metrics import Metrics

    deferred = Metrics.create(dreg := CollectorRegistry(), immediate=False)
    for i in range(1500):
        deferred.record("k", "m", "r", "200", False, 3, 4, 0.5, 0.25, 0.001 * i, 0.005)
    assert len(deferred._pending) == 1
    labels = {"key": "k", "model": "m", "region": "r"}
    assert dreg.get_sample_value("lrproxy_requests_total", {**labels, "code": "200"}) == 1500
    assert dreg.get_sample_value("lrproxy_tokens_total", {**labels, "kind": "prompt"}) == 4500
    assert dreg.get_sample_value("lrproxy_time_to_first_byte_seconds_count",
                                 {"model": "m", "region": "r"}) == 1500
    assert not deferred._pending
    immediate = Metrics.create(ireg := CollectorRegistry(), immediate=True)
    immediate.record("k", "m", "r", "200", True, 3, 4, 0.5, 0.25, 0.01, None)
    immediate.attempt("u", "ok")
    assert not immediate._pending and not immediate._attempts
    assert ireg.get_sample_value("lrproxy_tokens_total", {**labels, "kind": "prompt"}) == 3
    assert ireg.get_sample_value("lrproxy_upstream_attempts_total",
                                 {"upstream": "u", "outcome": "ok"}) == 1


async def test_immediate_mode_writes_once_per_loop_turn() -> None:
    """In multiprocess mode, what a loop turn counts is written together once its
    callbacks have run (an mmap write per figure costs ~1 µs): before the next turn
    waits on I/O, not per request."""
    from prometheus_client import CollectorRegistry

    from lrproxy.metrics import Metrics

    m = Metrics.create(CollectorRegistry(), immediate=True)
    for _ in range(3):
        m.record("k", "m", "r", "200", False, 3, 4, 0.5, 0.25, 0.01, 0.005)
        m.attempt("u", "ok")
    assert m._pending[("k", "m", "r", "200", False)].requests == 3
    assert m._attempts == {("u", "ok"): 3}
    await asyncio.sleep(0)  # the next turn
    assert not m._pending and not m._attempts
    labels = {"key": "k", "model": "m", "region": "r"}
    assert m.requests.labels(*labels.values(), "200")._value.get() == 3
    assert m.attempts.labels("u", "ok")._value.get() == 3
    m.attempt("u", "ok")  # a later turn's figure is written in its own turn
    await asyncio.sleep(0)
    assert not m._attempts and m.attempts.labels("u", "ok")._value.get() == 4


_ON_BOUNDS = st.sampled_from([0.005, 0.01, 0.25, 1.0, 2.5, 1800.0])


@given(st.lists(st.tuples(st.floats(0, 4000, allow_nan=False) | _ON_BOUNDS, st.booleans()),
                min_size=1, max_size=60),
       st.integers(1, 5))
@settings(max_examples=60, deadline=None)
def test_deferred_histograms_equal_observe(values: list[tuple[float, bool]], flushes: int) -> None:
    """Durations counted per bucket and added at a flush give exactly the samples that
    observe() of each value gives (bucket bounds included: a value on a bound counts
    in that bucket), whatever the flushes in between."""
    from prometheus_client import CollectorRegistry, Histogram

    from lrproxy.metrics import _LATENCY_BUCKETS, Metrics

    m = Metrics.create(reg := CollectorRegistry(), immediate=False)
    ref_reg = CollectorRegistry()
    ref_d = Histogram("d", "d", buckets=_LATENCY_BUCKETS, registry=ref_reg)
    ref_t = Histogram("t", "t", buckets=_LATENCY_BUCKETS, registry=ref_reg)
    for i, (v, has_ttfb) in enumerate(values):
        m.record("k", "m", "r", "200", True, 1, 1, 0.0, 0.0, v, v / 2 if has_ttfb else None)
        ref_d.observe(v)
        if has_ttfb:
            ref_t.observe(v / 2)
        if i % flushes == 0:
            m.flush()

    def samples(r: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
        return {(s.name.rpartition("_")[2], s.labels.get("le", "")): s.value
                for metric in r.collect() if metric.name == name for s in metric.samples
                if not s.name.endswith("_created")}

    # Sums are added in another order: equal up to float rounding; counts exactly.
    got = samples(reg, "lrproxy_request_duration_seconds")
    assert got == pytest.approx(samples(ref_reg, "d"), rel=1e-9, abs=1e-9)
    if any(t for _, t in values):
        assert samples(reg, "lrproxy_time_to_first_byte_seconds") == pytest.approx(
            samples(ref_reg, "t"), rel=1e-9, abs=1e-9)
    else:
        assert not samples(reg, "lrproxy_time_to_first_byte_seconds")


def test_startup_check_leaves_nothing_in_multiprocess_files(tmp_path: Any) -> None:
    """The start-up check of the histogram internals keeps its values in memory: in
    multiprocess mode (workers) /metrics shows only SPEC §5 series, nothing of it."""
    import subprocess
    import sys

    code = (
        "from prometheus_client import CollectorRegistry, multiprocess\n"
        "from lrproxy.metrics import Metrics\n"
        "m = Metrics.create(CollectorRegistry())\n"
        "m.record('k', 'm', 'r', '200', False, 1, 2, 0.1, 0.2, 0.3, 0.1)\n"
        "r = CollectorRegistry()\n"
        "multiprocess.MultiProcessCollector(r)\n"
        "print(' '.join(sorted({f.name for f in r.collect()})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    names = set(out.stdout.split())
    assert "lrproxy_request_duration_seconds" in names  # the files are read: a real check
    assert all(n.startswith("lrproxy_") for n in names), names
