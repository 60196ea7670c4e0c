"""Streams end to end, differentially (SPEC §1.1, §3): generated OpenAI-style event
streams from a scripted raw upstream, through a real lrproxy on 127.0.0.1, against a
model of the contract.

The upstream's events come in any TCP split, 0-2 ms apart, with n choices each with its
own finish chunk (or a finish beside another choice's text), tool-call deltas, logprobs,
OpenAI's padding, comments, `id:`, `event:` and `retry:` fields, LF and CRLF line ends,
multi-line `data:`, events over 64 KiB, a usage chunk or none (before or after the finish
chunks; usage on every chunk, or on the finish chunk; counts that are no counts),
`[DONE]` or none, close-delimited, chunked or of a Content-Length; or the stream fails (a
cut, an end inside an event, a lone CR, malformed data, an error object). The client asks
for usage or not. What it gets is compared byte for byte with what the model of §1.1
says (keep-alive comments aside), its `lowrouter` object with the usage, the access line
and the counters with it, and its bytes are read as the OpenAI SDK reads them: they must
be readable whenever the upstream's own are. Run with keep-alives every 1 ms (a commit
before the first event), and against an upstream with `stream_usage = false`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import attrs
import httpx2
import openai
import orjson
import pytest
from conftest import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder
from openai.types.chat import ChatCompletionChunk
from test_faults import (  # noqa: F401 (its fixtures, and its guard)
    LLAMA,
    MSGS,
    MakeStack,
    Scripted,
    Seen,
    cfg,
    make_stack,
    post,
    scripted,
    seen,
)

from lrproxy import eco, relay, sse
from lrproxy.log import ACCESS

CHUNK_ID = {"id": "chatcmpl-e2e", "object": "chat.completion.chunk", "created": 1764390000,
            "model": "llama-3.1-8b"}
MAX_TOKENS = sse.MAX_USAGE_TOKENS


@attrs.define
class Ev:
    """One upstream event and what it is to the contract."""

    raw: bytes
    # chunk: a chunk with choices (passes, or held when it ends the answer); usage: the
    # usage-only chunk; empty: `choices` [], null or absent without usage (to a client
    # that asked for usage only); other: a comment, a blank line, fields without data;
    # done: [DONE]; bad: malformed or an error (the stream fails at it)
    role: str
    obj: dict[str, Any] | None = None
    said: str = ""  # a bad event's error message, quoted in the error event


# ---------------------------------------------------------------------------------------
# the upstream's events

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=6)
_FIELDS = (b"id: 7", b"id:chatcmpl-e2e-1", b"event: completion", b"retry: 3000", b": note",
           b":")


def _dumps(obj: Any, how: int) -> list[bytes]:
    """The data lines of `obj` written by one of several JSON writers."""
    if how == 0:
        return [orjson.dumps(obj)]
    if how == 1:
        return [json.dumps(obj, separators=(",", ":")).encode()]  # \u escapes
    if how == 2:
        return [json.dumps(obj, ensure_ascii=False).encode()]  # ", " and ": "
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2).split(b"\n")  # multi-line data


@st.composite
def _render(draw: st.DrawFn, obj: Any, cr: bool = False) -> bytes:
    """An event of `obj`'s data: mostly OpenAI's own `data: {...}\\n\\n`; else any
    writer, fields and comments around its data lines, LF or CRLF each line; with `cr`,
    one line end a lone CR (at least two lines then)."""
    if not cr and draw(st.integers(0, 9)) < 6:
        return b"data: " + orjson.dumps(obj) + b"\n\n"
    prefix = draw(st.sampled_from([b"data: ", b"data:"]))
    lines = [prefix + ln for ln in _dumps(obj, draw(st.integers(0, 3)))]
    for f in draw(st.lists(st.sampled_from(_FIELDS), min_size=int(cr), max_size=2)):
        lines.insert(draw(st.integers(0, len(lines))), f)
    eols = [draw(st.sampled_from([b"\n", b"\r\n"])) for _ in range(len(lines) + 1)]
    if cr:
        eols[draw(st.integers(0, len(lines) - 2))] = b"\r"
    return b"".join(ln + e for ln, e in zip(lines, eols[:-1], strict=True)) + eols[-1]


def _chunk(choices: list[dict[str, Any]], usage_null: bool, **more: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {**CHUNK_ID, "choices": choices, **more}
    if usage_null and "usage" not in obj:
        obj["usage"] = None  # OpenAI's content chunks once usage is asked for
    return obj


@st.composite
def _choice_deltas(draw: st.DrawFn, i: int, tools: bool, logprobs: bool) -> list[dict[str, Any]]:
    """Choice `i`'s content pieces: its role, texts or tool-call deltas, logprobs."""
    out: list[dict[str, Any]] = [{"index": i, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}]
    for k in range(draw(st.integers(0, 5))):
        if tools and draw(st.booleans()):
            call: dict[str, Any] = {"index": 0, "function": {"arguments": draw(_TEXT)}}
            if k == 0:
                call.update(id="call_e2e", type="function")
                call["function"]["name"] = "get_weather"
            delta: dict[str, Any] = {"tool_calls": [call]}
        else:
            delta = {"content": draw(_TEXT)}
        lp = None
        if logprobs:
            lp = {"content": [{"token": "x", "logprob": -0.25, "bytes": [120],
                               "top_logprobs": []}]}
        out.append({"index": i, "delta": delta, "logprobs": lp, "finish_reason": None})
    return out


@attrs.define
class Case:
    events: list[Ev]
    # ok; cut (no finish, no [DONE]), mid (ends inside an event), cr (a lone CR), bad
    # (malformed), error (an error object): the stream fails
    mode: str
    body: bytes  # the upstream's event stream
    parts: list[bytes | float]  # the upstream's answer as written: bytes and pauses
    keep_open: bool
    options: dict[str, Any] | None  # the client's stream_options

    @property
    def client_usage(self) -> bool:
        return self.options is not None and self.options.get("include_usage") is True


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 3))
    tools, logprobs, usage_null = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    mode = draw(st.sampled_from(["ok"] * 6 + ["cut", "mid", "cr", "bad", "error"]))
    # usage on every chunk (vLLM's continuous_usage_stats), or on the last finish chunk
    # (servers that put it there), besides the usage chunk or not
    usage_on = draw(st.sampled_from(["none", "none", "every", "finish"]))
    pad, stamp = draw(st.booleans()), draw(st.booleans())
    queues = [draw(_choice_deltas(i, tools, logprobs)) for i in range(n)]
    finishes = mode not in ("cut",) and draw(st.integers(0, 5)) > 0
    if finishes:
        for i, q in enumerate(queues):
            last: dict[str, Any] = {}
            if draw(st.booleans()):
                last = {"content": draw(_TEXT)}  # its last text on the finish chunk
            q.append({"index": i, "delta": last, "logprobs": None,
                      "finish_reason": draw(st.sampled_from(["stop", "length", "tool_calls"]))})
    order = draw(st.permutations([i for i, q in enumerate(queues) for _ in q]))
    pieces = [queues[i].pop(0) for i in order]
    # a chunk that ends one choice while it carries another's next piece (n > 1)
    chunks: list[list[dict[str, Any]]] = []
    for p in pieces:
        if (chunks and len(chunks[-1]) == 1 and chunks[-1][0]["finish_reason"]
                and chunks[-1][0]["index"] != p["index"] and not p["finish_reason"]
                and draw(st.integers(0, 3)) == 0):
            chunks[-1].append(p)
        else:
            chunks.append([p])
    events: list[Ev] = []
    for k, ch in enumerate(chunks):
        more: dict[str, Any] = {}
        if usage_on == "every" or (usage_on == "finish" and k == len(chunks) - 1
                                   and ch[-1]["finish_reason"]):
            more["usage"] = draw(_usages())
        if pad:  # OpenAI's padding, a string of its own after the text
            more["obfuscation"] = draw(st.text("abcXYZ019", max_size=8))
        if stamp and draw(st.integers(0, 3)) == 0:  # `created` stamped anew each second
            more["created"] = CHUNK_ID["created"] + k
        if k and draw(st.integers(0, 30)) == 0:  # over 64 KiB, in any number of reads
            ch = [{**ch[0], "delta": {"content": "long " * 14000}}, *ch[1:]]
        obj = _chunk(ch, usage_null, **more)
        events.append(Ev(draw(_render(obj)), "chunk", obj))
    if usage_on == "every" and events and draw(st.booleans()):
        # vLLM's last usage chunk may have an empty choice rather than none
        obj = _chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": None}],
                     False, usage=draw(_usages()))
        events.append(Ev(draw(_render(obj)), "chunk", obj))
    # the usage chunk, anywhere after the first chunk (before or among the finish chunks)
    if mode != "cut" and draw(st.integers(0, 3)) > 0:
        obj = {**CHUNK_ID, "choices": [], "usage": draw(_usages())}
        at = draw(st.integers(1, len(events)))
        events.insert(at, Ev(draw(_render(obj)), "usage", obj))
    # chunks without choices (Azure's prompt_filter_results; a ping), comments, blank lines
    for _ in range(draw(st.integers(0, 2))):
        obj = draw(st.sampled_from([
            {**CHUNK_ID, "choices": [], "prompt_filter_results": [{"prompt_index": 0}]},
            {**CHUNK_ID, "choices": None}, {"object": "ping"}]))
        events.insert(draw(st.integers(0, len(events))), Ev(draw(_render(obj)), "empty", obj))
    for _ in range(draw(st.integers(0, 3))):
        raw = draw(st.sampled_from([b": OPENROUTER PROCESSING\n\n", b":\r\n\r\n", b": ka\n\n",
                                    b"\n", b"\r\n", b"event: ping\n: x\n\n",
                                    ": caf\u00e9 \u2615\r\n\r\n".encode()]))
        at = draw(st.integers(0, len(events)))
        if raw in (b"\n", b"\r\n") and (at == 0 or events[at - 1].role in ("other",)):
            continue  # (a stream that starts with a blank line: an empty first event)
        events.insert(at, Ev(raw, "other"))
    # the way it fails, after its first chunk
    first = next(k for k, e in enumerate(events) if e.role == "chunk")
    if mode in ("cr", "bad", "error"):
        at = draw(st.integers(first + 1, len(events)))
        if mode == "cr":
            obj = _chunk([{"index": 0, "delta": {"content": "cr"}, "finish_reason": None}],
                         usage_null)
            events.insert(at, Ev(draw(_render(obj, cr=True)), "bad", obj))
        elif mode == "bad":
            events.insert(at, Ev(b'data: {"choices": [{"index": 0, "delta": \n\n', "bad"))
        else:  # an error object (alone, beside a failed choice), llama.cpp's error field
            err = {"message": "the GPU fell over 42", "type": "server_error"}
            raw = draw(st.sampled_from([
                _render({"error": err}),
                _render({**CHUNK_ID, "error": err, "choices": [
                    {"index": 0, "delta": {}, "finish_reason": "error"}]}),
                st.just(b"error: " + orjson.dumps({**err, "code": 500}) + b"\n\n"),
            ]).flatmap(lambda x: x if isinstance(x, st.SearchStrategy) else st.just(x)))
            events.insert(at, Ev(raw, "bad", said=err["message"]))
    tail = b""
    if mode == "ok":
        done = draw(st.sampled_from([
            b"data: [DONE]\n\n", b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n",
            b"data:[DONE]\n\n", b"id: 9\ndata: [DONE]\n\n", b"data: [DONE]", b"data: [DONE]\n",
            b"data: [DONE]\r\n", b""]))
        if done:
            events.append(Ev(done, "done"))
            if done.endswith((b"\n\n", b"\n\r\n")) and draw(st.booleans()):  # ignored after [DONE]
                tail = draw(st.sampled_from([
                    b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\n',
                    b"data: [DONE]\n\n", b": bye\n\n", b"data: {not json\n\n"]))
    elif mode == "mid":
        tail = draw(st.sampled_from([b"data: {\"choices\"", b"data: {}\n", b": x"]))
    body = b"".join(e.raw for e in events) + tail
    framing = draw(st.sampled_from(["close", "chunked", "length"]))
    parts: list[bytes | float] = []
    if framing == "chunked":
        wire = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in [*_split(draw, body), b""])
        head = b"Transfer-Encoding: chunked\r\n"
    elif framing == "length":
        wire, head = body, b"Content-Length: %d\r\n" % len(body)
    else:
        wire, head = body, b"Connection: close\r\n"
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + head + b"\r\n" + wire
    for piece in _split(draw, wire):
        parts.append(piece)
        parts.append(draw(st.sampled_from([0.0, 0.0, 0.001, 0.002])))
    options: dict[str, Any] | None = None
    if draw(st.integers(0, 3)):  # the client's stream_options, its other members kept
        options = {"include_usage": draw(st.sampled_from([None, False, True]))}
        if draw(st.booleans()):
            options["continuous_usage_stats"] = draw(st.booleans())
    return Case(events, mode, body, parts, framing != "close", options)


def _usages() -> st.SearchStrategy[dict[str, Any]]:
    def usage(p: int, c: int, how: int) -> dict[str, Any]:
        return [
            {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            {"prompt_tokens": p, "total_tokens": p + c},  # completion as total - prompt
            {"prompt_tokens": p, "completion_tokens": -1},  # no count: estimated
            {"prompt_tokens": 2**64 - 6, "completion_tokens": c},  # an underflow: estimated
        ][how]

    return st.builds(usage, st.integers(0, 5000), st.integers(0, 5000),
                     st.sampled_from([0, 0, 0, 1, 2, 3]))


def _split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8))))
    cuts = [c for c in cuts if 0 < c < len(data)]
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# ---------------------------------------------------------------------------------------
# the model of the contract


@attrs.define
class Expected:
    before: bytes  # every byte before the event that carries `lowrouter`
    last: Ev | None  # the event that gets `lowrouter` (None: a made chunk or the error)
    after: bytes  # [DONE], as the upstream wrote it
    objs: list[dict[str, Any]]  # the data the SDK reads, lowrouter's chunk included
    usage: tuple[int, int] | None  # the upstream's counts, when plausible
    completion: int  # chunks with choices that came (the estimate without usage)
    failed: bool  # (a 502 if it came in the first read of events: no byte had gone)
    said: str = ""  # the upstream's error message the error event quotes


def expect(case: Case) -> Expected:
    asked = case.client_usage
    passed: list[Ev] = []
    held: list[Ev] = []
    usage_ev: Ev | None = None
    usage: tuple[int, int] | None = None
    completion = 0
    failed = case.mode in ("cut", "mid")
    said = ""
    done = b"data: [DONE]\n\n"
    ended = False
    for e in case.events:
        if e.role == "done":
            ended = True
            if e.raw.endswith((b"\n\n", b"\n\r\n")):  # (one without its blank line:
                done = e.raw  # the proxy's own)
            break
        if e.role == "bad":
            failed, said = True, e.said
            break
        obj = e.obj
        if obj is not None and obj.get("usage"):
            usage = _plausible(obj["usage"]) or usage  # the last counts that are counts
        if e.role == "chunk":
            assert obj is not None
            completion += 1
            choices = obj["choices"]
            # held: a chunk that ends the answer (a finish, or usage after one), with
            # no choice that carries something
            if (any(c["finish_reason"] for c in choices) or (held and obj.get("usage"))) \
                    and not any(_carries(c) for c in choices):
                held.append(e)
            else:
                passed.append(e)
        elif e.role == "other" or (e.role == "empty" and asked):
            passed.append(e)
        elif e.role == "usage":
            usage_ev = e
    # an end without [DONE] before any finish (or usage) chunk is a cut
    failed = failed or not (ended or held or usage_ev is not None)
    if failed:  # what came, the held finish chunks, then the error event
        return Expected(b"".join(e.raw for e in passed + held), None, b"",
                        [e.obj for e in passed + held if e.obj is not None], usage,
                        completion, True, said)
    if asked and usage_ev is not None:
        last: Ev | None = usage_ev
        order = passed + held + [usage_ev]
    elif held:
        last, order = held[-1], passed + held
    else:
        last, order = None, passed
    before = b"".join(e.raw for e in order if e is not last)
    objs = [e.obj for e in order if e.obj is not None and e.role != "other"]
    return Expected(before, last, done, objs, usage, completion, False)


def _carries(choice: dict[str, Any]) -> bool:
    """A choice that does not finish and carries something (text, a call, logprobs)."""
    delta = choice.get("delta") or {}
    return not choice.get("finish_reason") and (
        any(v for k, v in delta.items() if k != "role") or bool(choice.get("logprobs")))


def _plausible(u: dict[str, Any]) -> tuple[int, int] | None:
    p, c = u.get("prompt_tokens"), u.get("completion_tokens")
    if c is None and isinstance(u.get("total_tokens"), int) and isinstance(p, int):
        c = u["total_tokens"] - p
    if isinstance(p, int) and isinstance(c, int) and 0 <= p <= MAX_TOKENS and 0 <= c <= MAX_TOKENS:
        return p, c
    return None


# ---------------------------------------------------------------------------------------
# the test


def _sdk_read(client: openai.OpenAI, body: bytes) -> tuple[list[ChatCompletionChunk], Exception | None]:
    """The chunks the OpenAI SDK yields for an event stream, and what it raised."""
    resp = httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"},
                           request=httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions"))
    got: list[ChatCompletionChunk] = []
    try:
        for c in openai.Stream(cast_to=ChatCompletionChunk, response=resp, client=client):
            got.append(c)
    except Exception as e:  # (what the SDK raises is the finding)
        return got, e
    return got, None


def _sdk_data(body: bytes) -> list[dict[str, Any]]:
    """The JSON of each event the SDK's decoder reads, up to [DONE]."""
    out = []
    for ev in SSEDecoder().iter_bytes(iter([body])):
        if ev.data.startswith("[DONE]"):
            break
        out.append(json.loads(ev.data))
    return out


def _access(got: Seen, request_id: str) -> dict[str, Any]:
    recs = [r.fields for r in got.records  # type: ignore[attr-defined]
            if r.name == ACCESS and r.fields["request_id"] == request_id]
    assert len(recs) == 1, recs
    return recs[0]


def _keepalives(body: bytes) -> tuple[bytes, int, int]:
    """`body` without the proxy's keep-alive comments (between events: one of their own,
    or a line before an event), and how many of each there were."""
    events, lines = [], 0
    for ev in sse.EventSplitter().feed(body):
        if ev == relay.KEEPALIVE_EVENT:
            continue
        while ev.startswith(relay.KEEPALIVE_LINE):
            ev, lines = ev[len(relay.KEEPALIVE_LINE):], lines + 1
        events.append(ev)
    out = b"".join(events)
    return out, body.count(relay.KEEPALIVE_EVENT), lines


@pytest.mark.slow
@pytest.mark.parametrize(("keepalive", "stream_usage"), [(15.0, True), (0.001, True),
                                                      (15.0, False)])
def test_streams_end_to_end_match_the_contract(
    make_stack: MakeStack,  # noqa: F811
    scripted: Callable[..., Scripted],  # noqa: F811
    seen: Seen,  # noqa: F811
    tmp_path: Any, keepalive: float, stream_usage: bool,
) -> None:
    now: list[Case] = []

    def script(conn: int, n: int, body: bytes) -> tuple[list[bytes | float], bool]:
        return now[-1].parts, now[-1].keep_open

    up = scripted(script, gap=0.0)
    feed = tmp_path / "eu-north.json"  # a live reading: usage makes `measured`
    at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    feed.write_text(json.dumps({"zone": "SE", "carbonIntensity": 31.5, "datetime": at,
                                "updatedAt": at}))

    def mutate(d: dict[str, Any]) -> None:
        cfg(server={"retries": 0}, timeouts={"keepalive": keepalive},
            upstreams={"eu-north-a": {"base_url": up.base_url, "stream_usage": stream_usage}})(d)
        d["regions"]["eu-north"]["intensity_feed"] = str(feed)

    stack = make_stack(mutate)
    client = stack.client()
    request_body: dict[str, Any] = {"model": LLAMA, "messages": MSGS, "stream": True,
                                    "route": {"region": "eu-north"}}
    prompt_est = eco.estimate_tokens(relay._prompt_chars(request_body, True))

    def tokens() -> tuple[float, float, float, float]:
        return (stack.metric_sum("lrproxy_tokens_total", kind="prompt"),
                stack.metric_sum("lrproxy_tokens_total", kind="completion"),
                stack.metric_sum("lrproxy_requests_total", code="200"),
                stack.metric_sum("lrproxy_upstream_attempts_total", outcome="ok"))

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=cases())
    def run(case: Case) -> None:
        now.append(case)
        body = dict(request_body)
        if case.options is not None:
            body["stream_options"] = case.options
        t0 = tokens()
        a = post(stack, body)
        want = expect(case)
        sent = orjson.loads(up.requests[-1].body)
        others = {k: v for k, v in (case.options or {}).items() if k != "include_usage"}
        if stream_usage:
            assert sent["stream_options"] == {**others, "include_usage": True}
        else:  # (Mistral's API refuses the member)
            assert sent.get("stream_options") == (others or None)
        if a.status == 502 and want.failed:
            a.error(502, "upstream_error")
            return
        assert a.status == 200, (a.status, a.body[:300])
        assert (a.header("content-type") or "").startswith("text/event-stream")
        wire = a.body
        a.body, ka_events, ka_lines = _keepalives(a.body)
        if keepalive > 1:
            assert (ka_events, ka_lines) == (0, 0)
        else:  # a comment of its own before the upstream's first id only (the SDK
            # takes every blank line after an id for an event)
            first_id = next((k for k, ln in enumerate(wire.splitlines()) if ln.startswith(b"id")),
                            None)
            if first_id is not None:
                assert relay.KEEPALIVE_EVENT not in b"\n".join(wire.splitlines()[first_id:])
        rid = a.header("x-request-id")
        assert rid
        _, upstream_err = _sdk_read(client, case.body)
        got, err = _sdk_read(client, a.body)
        if want.failed:
            assert a.body.startswith(want.before), (a.body, want.before)
            rest = a.body[len(want.before):]
            (last,) = sse.EventSplitter().feed(rest)
            assert last == rest and last.startswith(b"data: {") and last.endswith(b"}\n\n")
            lr_obj = orjson.loads(last[6:])
            assert lr_obj["choices"] == [{"index": 0, "delta": {}, "finish_reason": "error"}]
            assert want.said in lr_obj["error"]["message"]
            assert b"[DONE]" not in a.body[len(want.before):]
            lr = lr_obj["lowrouter"]
            try:
                sdk = _sdk_data(a.body)
            except json.JSONDecodeError:  # an empty data after an id: the upstream's own
                assert upstream_err is not None
            else:
                assert sdk[:-1] == want.objs
                assert isinstance(err, openai.APIError), err
                assert len(got) == len(want.objs)
        else:
            assert a.body.startswith(want.before), (a.body, want.before)
            assert a.body.endswith(want.after), (a.body[-200:], want.after)
            middle = a.body[len(want.before):len(a.body) - len(want.after)]
            (lr_ev,) = sse.EventSplitter().feed(middle)
            assert lr_ev == middle
            data = sse.event_data(lr_ev)
            assert data is not None
            lr_obj = orjson.loads(data)
            lr = lr_obj.pop("lowrouter")
            if want.last is None:
                assert lr_obj["choices"] == [{"index": 0, "delta": {}, "finish_reason": None}]
                assert all(lr_obj[k] == v for k, v in CHUNK_ID.items())
            else:
                assert lr_obj == want.last.obj
                raw = want.last.raw
                if raw.startswith(b"data: {") and raw.count(b"\n") == 2 and b"\r" not in raw:
                    # the upstream's own bytes, lowrouter written in before the brace
                    assert lr_ev == raw[:-3] + b',"lowrouter":' + orjson.dumps(lr) + b"}\n\n"
                else:  # written anew: its other lines kept, in order
                    assert [ln for ln in lr_ev.splitlines() if ln and not ln.startswith(b"data")] \
                        == [ln for ln in raw.splitlines() if ln and not ln.startswith(b"data")]
            try:
                sdk = _sdk_data(a.body)
            except json.JSONDecodeError:  # an empty data after an id: the upstream's own
                assert upstream_err is not None
                sdk = []
            if upstream_err is None:
                assert [*sdk[:-1], {k: v for k, v in sdk[-1].items() if k != "lowrouter"}] \
                    == want.objs + ([] if want.last is not None else [lr_obj])
                assert err is None, err
                assert len(got) == len(want.objs) + (want.last is None)
                assert got[-1].model_extra is not None and "lowrouter" in got[-1].model_extra
                if not case.client_usage:
                    assert all(c.choices for c in got)
        assert "eco" in lr
        tk = lr["eco"]["tokens"]
        if want.usage is not None:
            assert (tk["prompt"], tk["completion"]) == want.usage
            assert lr["eco"]["accuracy"] == "measured"
        else:
            assert (tk["prompt"], tk["completion"]) == (prompt_est, want.completion)
            assert lr["eco"]["accuracy"] == "estimated"
        assert lr["request_id"] == rid
        wait_for(lambda: any(r.name == ACCESS and r.fields["request_id"] == rid  # type: ignore[attr-defined]
                             for r in seen.records))
        line = _access(seen, rid)
        assert line["status"] == ("stream_error" if want.failed else 200), line
        assert (line["prompt_tokens"], line["completion_tokens"]) == (tk["prompt"], tk["completion"])
        t1 = tokens()
        assert [b - a for a, b in zip(t0, t1, strict=True)] == [
            tk["prompt"], tk["completion"], not want.failed, not want.failed]

    run()
