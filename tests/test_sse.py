"""The pure SSE core (lrproxy.sse): bytes in, exact event bytes out (SPEC §1.1)."""

from __future__ import annotations

import itertools
import unittest.mock
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lrproxy import sse
from lrproxy.sse import (
    MAX_USAGE_TOKENS,
    EventSplitter,
    Kind,
    classify,
    event_data,
    usage_of,
)

HEAD = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
ROLE = HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
CONTENT = HEAD + b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}\n\n'
FINISH = HEAD + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
USAGE = HEAD + b'"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}}\n\n'
DONE = b"data: [DONE]\n\n"

# A realistic OpenAI stream, with a keep-alive comment, a CRLF event and a blank line.
REALISTIC: list[bytes] = [
    b": keep-alive\n\n",
    ROLE,
    CONTENT,
    CONTENT.replace(b"\n", b"\r\n"),
    b"\n",
    CONTENT.replace(b'"Hi"', b'"line\\nbreak {}"'),
    FINISH,
    USAGE,
    DONE,
]


def feed_all(pieces: list[bytes]) -> tuple[list[bytes], bytes]:
    """Feed every piece into one splitter; (all events, close() leftover)."""
    sp = EventSplitter()
    out: list[bytes] = []
    for p in pieces:
        out.extend(sp.feed(p))
    return out, sp.close()


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (any order, duplicates allowed: empty pieces)."""
    bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------------------------------
# EventSplitter: examples


def test_lf_events_split_at_blank_lines() -> None:
    """LF events come out one by one, each with its own terminator."""
    assert feed_all([b"data: a\n\ndata: b\n\n"]) == ([b"data: a\n\n", b"data: b\n\n"], b"")


def test_crlf_events_keep_their_crlf() -> None:
    """CRLF line ends are kept byte for byte."""
    data = b"data: a\r\n\r\ndata: b\r\nid: 3\r\n\r\n"
    assert feed_all([data]) == ([b"data: a\r\n\r\n", b"data: b\r\nid: 3\r\n\r\n"], b"")


def test_mixed_line_ends_inside_one_event() -> None:
    """An LF line followed by a CRLF blank line (and the reverse) ends an event."""
    assert feed_all([b"data: a\n\r\ndata: b\r\n\n"]) == ([b"data: a\n\r\n", b"data: b\r\n\n"], b"")


def test_comment_lines_are_events_or_part_of_one() -> None:
    """A comment-only event is an event; a comment inside an event stays in it."""
    data = b": keep-alive\n\n:\n\n: note\ndata: x\n\n"
    assert feed_all([data]) == ([b": keep-alive\n\n", b":\n\n", b": note\ndata: x\n\n"], b"")


def test_multi_line_data_is_one_event() -> None:
    """Several data lines before the blank line make one event."""
    ev = b"data: {\ndata: \"a\": 1\ndata: }\n\n"
    assert feed_all([ev]) == ([ev], b"")
    assert event_data(ev) == b'{\n"a": 1\n}'


def test_blank_line_only_events() -> None:
    """A blank line where an event would begin is an (empty) event of its own."""
    data = b"\n\r\n\ndata: a\n\n\n"
    assert feed_all([data]) == ([b"\n", b"\r\n", b"\n", b"data: a\n\n", b"\n"], b"")
    assert feed_all([b"\r", b"\n", b"\n"]) == ([b"\r\n", b"\n"], b"")


def test_close_returns_trailing_partial_event() -> None:
    """Bytes after the last complete event come back from close(), once."""
    sp = EventSplitter()
    assert sp.feed(b"data: a\n\ndata: b\n") == [b"data: a\n\n"]
    assert len(sp.held) == len(b"data: b\n")
    assert sp.close() == b"data: b\n"
    assert sp.close() == b"" and not sp.held
    assert sp.feed(b"data: c\n\n") == [b"data: c\n\n"]


def test_terminator_split_across_feeds() -> None:
    """The blank line may arrive byte by byte, in any number of reads."""
    sp = EventSplitter()
    assert sp.feed(b"data: a\r") == []
    assert sp.feed(b"\n") == []
    assert sp.feed(b"\r") == []
    assert sp.feed(b"\n") == [b"data: a\r\n\r\n"]
    assert sp.feed(b"") == []
    assert sp.close() == b""


def test_lone_cr_is_not_a_line_end() -> None:
    """Lone CR is not a line end (documented choice): it stays inside the event."""
    assert feed_all([b"data: a\r\rdata: b\n\n"]) == ([b"data: a\r\rdata: b\n\n"], b"")


def test_one_byte_at_a_time() -> None:
    """Feeding the realistic stream a byte at a time gives the same events."""
    data = b"".join(REALISTIC)
    assert feed_all([data[i:i + 1] for i in range(len(data))]) == (REALISTIC, b"")


def test_every_single_split_point_of_a_realistic_stream() -> None:
    """Cut anywhere in two: the events are exactly the original ones."""
    data = b"".join(REALISTIC)
    for i in range(len(data) + 1):
        events, rest = feed_all([data[:i], data[i:]])
        assert events == REALISTIC, i
        assert rest == b""


def test_every_split_point_with_a_partial_tail() -> None:
    """Cut anywhere in two with an unfinished event at the end: close() returns it."""
    tail = b"data: {\"partial\": tr"
    data = b"".join(REALISTIC) + tail
    for i in range(len(data) + 1):
        assert feed_all([data[:i], data[i:]]) == (REALISTIC, tail), i


# ---------------------------------------------------------------------------------------
# EventSplitter: properties

_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40
).map(lambda s: s.encode())
_EOL = st.sampled_from([b"\n", b"\r\n"])
_LINE = st.one_of(
    _TEXT.map(lambda t: b"data: " + t),
    _TEXT.map(lambda t: b"data:" + t),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**53), 2**53) | st.text(max_size=8), max_size=3).map(
        lambda d: b"data: " + orjson.dumps(d)
    ),
    _TEXT.map(lambda t: b":" + t),
    st.sampled_from([b"data", b"event: message", b"id: 7", b"retry: 1000", b"data: [DONE]"]),
)


@st.composite
def _event(draw: st.DrawFn) -> bytes:
    """One valid event: zero or more lines, each LF or CRLF ended, then a blank line."""
    lines = draw(st.lists(st.tuples(_LINE, _EOL), max_size=4))
    return b"".join(line + eol for line, eol in lines) + draw(_EOL)


@st.composite
def _partial(draw: st.DrawFn) -> bytes:
    """An unfinished event: whole lines, maybe an unterminated last line, no blank line."""
    lines = draw(st.lists(st.tuples(_LINE, _EOL), max_size=3))
    last = draw(st.one_of(st.just(b""), _LINE))
    return b"".join(line + eol for line, eol in lines) + last


@settings(max_examples=200, deadline=None)
@given(events=st.lists(_event(), max_size=12), points=st.lists(st.integers(0, 10_000), max_size=12))
@example(events=[b"\r\n", b"data: a\r\n\r\n"], points=[1, 3])
def test_any_split_gives_the_original_events(events: list[bytes], points: list[int]) -> None:
    """Whatever the TCP split, the splitter returns the sent events byte for byte."""
    data = b"".join(events)
    got, rest = feed_all(cut(data, points))
    assert got == events
    assert b"".join(got) == data
    assert rest == b""


@settings(max_examples=200, deadline=None)
@given(events=st.lists(_event(), max_size=6), tail=_partial(),
       points=st.lists(st.integers(0, 10_000), max_size=8))
def test_any_split_keeps_the_partial_tail(events: list[bytes], tail: bytes, points: list[int]) -> None:
    """An unfinished last event is never emitted, and close() gives back its bytes."""
    got, rest = feed_all(cut(b"".join(events) + tail, points))
    assert got == events
    assert rest == tail


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), points=st.lists(st.integers(0, 10_000), max_size=8))
def test_arbitrary_bytes_are_conserved(data: bytes, points: list[int]) -> None:
    """Untrusted input: no byte is lost or invented, and the split does not matter."""
    whole = feed_all([data])
    got, rest = feed_all(cut(data, points))
    assert b"".join(got) + rest == data
    assert (got, rest) == whole


@settings(max_examples=200, deadline=None)
@given(events=st.lists(_event(), max_size=8), tail=_partial(),
       points=st.lists(st.integers(0, 10_000), max_size=12))
def test_long_events_gathered_in_a_bytearray_split_alike(
    events: list[bytes], tail: bytes, points: list[int],
) -> None:
    """With the long-event threshold at 3 bytes, (nearly) every unfinished event is
    gathered read by read (the bytearray path): the events and the tail are the same."""
    with unittest.mock.patch.object(sse, "_LONG_EVENT", 3):
        got, rest = feed_all(cut(b"".join(events) + tail, points))
    assert got == events
    assert rest == tail and type(rest) is bytes


def test_a_long_event_in_many_reads_is_gathered_in_place() -> None:
    """A 16 MiB event in 64 KiB reads grows one buffer in place, read after read: not
    copied and searched whole per read (quadratic: ~4 s where this takes ~0.08 s)."""
    ev = b"data: " + b"x" * (16 * 1024 * 1024) + b"\n\n"
    reads = [ev[i:i + 65536] for i in range(0, len(ev), 65536)]
    sp = EventSplitter()
    buffers = set()
    for r in reads[:-1]:
        assert sp.feed(r) == []
        if len(sp.held) > sse._LONG_EVENT:
            buffers.add(id(sp.held))
    assert len(buffers) == 1 and type(sp.held) is bytearray
    assert sp.feed(reads[-1]) == [ev] and sp.close() == b""


# ---------------------------------------------------------------------------------------
# classify


def test_content_chunk_is_parsed_and_passes() -> None:
    """A content chunk (finish_reason null, usage null) is PASS with its object; a
    comment or an event without data is PASS with none."""
    for ev in (ROLE, CONTENT, CONTENT.replace(b"\n", b"\r\n"),
               CONTENT.replace(b'"finish_reason":null', b'"finish_reason": null')):
        kind, obj = classify(ev)
        assert kind == Kind.PASS and obj == orjson.loads(event_data(ev) or b""), ev
    for ev in (b": keep-alive\n\n", b"\n", b"event: ping\n\n"):
        assert classify(ev) == (Kind.PASS, None), ev


def test_chunk_that_looks_whole_but_is_not_json_is_malformed() -> None:
    """Data that starts with { and ends with } but is not JSON (a bracket short, a
    trailing comma, a bad escape, bytes that are not UTF-8) is MALFORMED: the relay
    ends the stream instead of passing it on."""
    broken = [CONTENT.replace(b"}],", b"},"), CONTENT.replace(b"null}\n", b"null,}\n"),
              CONTENT.replace(b'"Hi"', b'"H\\qi"'), CONTENT.replace(b'"Hi"', b'"H\xffi"')]
    for ev in broken:
        assert ev != CONTENT and classify(ev) == (Kind.MALFORMED, None), ev


def test_finish_chunk_is_final() -> None:
    """A chunk with a non-null finish_reason is held: FINAL, with its parsed object."""
    kind, obj = classify(FINISH)
    assert kind == Kind.FINAL and obj is not None
    assert obj["choices"][0]["finish_reason"] == "stop"
    spaced = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
    assert classify(spaced)[0] == Kind.FINAL
    assert classify(FINISH.replace(b'"stop"', b'"length"').replace(b"\n", b"\r\n"))[0] == Kind.FINAL


def test_finish_reason_inside_content_text_is_not_final() -> None:
    """The words `"finish_reason": "stop"` inside the content text do not finish a chunk."""
    ev = CONTENT.replace(b'"Hi"', b'"say \\"finish_reason\\": \\"stop\\" and \\"error\\""')
    kind, _ = classify(ev)
    assert kind == Kind.PASS


def test_usage_only_chunk_is_final() -> None:
    """The usage-only chunk (`choices: []`) is held: FINAL."""
    kind, obj = classify(USAGE)
    assert kind == Kind.FINAL and obj is not None and obj["choices"] == []



def test_empty_choices_without_usage_passes() -> None:
    """`choices: []` with no usage (Azure's prompt_filter_results chunk) is not the
    usage-only chunk: it passes (SPEC §1.1 holds back no other chunk)."""
    for ev in (b'data: {"choices": [], "usage": null}\n\n',
               b'data: {"choices":[],"prompt_filter_results":[{"prompt_index":0}]}\n\n'):
        kind, obj = classify(ev)
        assert kind == Kind.PASS and obj is not None and obj["choices"] == [], ev


def test_done() -> None:
    """`data: [DONE]` in its usual spellings is DONE."""
    for ev in (DONE, b"data:[DONE]\n\n", b"data: [DONE]\r\n\r\n"):
        assert classify(ev) == (Kind.DONE, None), ev


def test_malformed() -> None:
    """Data that is not a JSON object is MALFORMED, even when it looks like a content chunk."""
    for ev in (b"data: {not json\n\n", b"data: {not json\r\n\r\n", b"data: [1, 2]\n\n",
               b'data: {"finish_reason": "stop"\n\n'):
        assert classify(ev) == (Kind.MALFORMED, None), ev


def test_lone_cr_or_bytes_not_utf8_are_malformed() -> None:
    """An event the SDK would read as other events (a lone CR ends a line for it) or
    could not decode (it decodes comments and fields too) is MALFORMED; CRLF is fine."""
    for ev in (b'data: {"a":\r\rdata: 1}\n\n', b"data: {}\r\n\r\r\n", b": x\ry\n\n",
               b": \xff\n\n", b"id: \xc3\ndata: {}\n\n", b"event: e\ndata: {}\r\n\xfe\n\n"):
        assert classify(ev) == (Kind.MALFORMED, None), ev
    for ev in (b"data: {}\r\n\r\n", b": keep-alive\r\n\r\n", b": caf\xc3\xa9\n\n",
               b"id: 1\r\nevent: e\r\ndata: {}\r\n\r\n"):
        assert classify(ev)[0] in (Kind.PASS,), ev


def test_error_object() -> None:
    """An upstream error object inside the stream is ERROR."""
    ev = b'data: {"error": {"message": "overloaded", "type": "server_error", "code": null}}\n\n'
    kind, obj = classify(ev)
    assert kind == Kind.ERROR and obj is not None and obj["error"]["message"] == "overloaded"
    assert classify(b'event: error\ndata: {"error":{"message":"x"}}\n\n')[0] == Kind.ERROR


@pytest.mark.parametrize(("data", "kind"), [
    # OpenRouter's failure after tokens went (and the shape of the §1.1 error event)
    (b'{"error": {"code": "server_error", "message": "Provider disconnected"}, '
     b'"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}',
     Kind.ERROR),
    (b'{"error": "gone", "choices": [{"index": 0, "delta": {"content": "x"}}]}', Kind.ERROR),
    (b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "error"}]}', Kind.ERROR),
    (b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "error"}], '
     b'"usage": {"prompt_tokens": 1, "completion_tokens": 1}}', Kind.ERROR),
    # no error: null, or empty beside choices
    (b'{"error": null, "choices": [{"index": 0, "delta": {"content": "x"}}]}', Kind.PASS),
    (b'{"error": {}, "choices": [{"index": 0, "delta": {"content": "x"}}]}', Kind.PASS),
    (b'{"error": {}, "choices": []}', Kind.ERROR),
    (b'{"error": {}}', Kind.ERROR),
    (b'{"error": {}, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}',
     Kind.FINAL),
    (b'{"error": {}, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}', Kind.FINAL),
    # a falsy member on a usage-only chunk (choices []), as on the chunks before it
    (b'{"error": false, "choices": [], "usage": {"prompt_tokens": 1, '
     b'"completion_tokens": 1}}', Kind.FINAL),
    (b'{"error": 0, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}',
     Kind.FINAL),
    (b'{"error": "", "choices": []}', Kind.PASS),
    (b'{"error": [], "choices": [{"index": 0, "delta": {"content": "x"}}]}', Kind.PASS),
    (b'{"error": null, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}',
     Kind.FINAL),
])
def test_error_beside_choices(data: bytes, kind: int) -> None:
    """An error object beside choices, or a choice that finished with "error", is ERROR:
    the stream failed, however many tokens went before."""
    assert classify(b"data: " + data + b"\n\n")[0] == kind


# ---------------------------------------------------------------------------------------
# usage_of, event_data, make_event


@pytest.mark.parametrize(("obj", "want"), [
    ({"usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}}, (12, 2)),
    ({"usage": {"prompt_tokens": 5, "total_tokens": 5}}, (5, 0)),  # embeddings
    ({"usage": {"prompt_tokens": 0, "completion_tokens": 0}}, (0, 0)),
    ({}, None),
    ({"usage": None}, None),
    ({"usage": [1, 2]}, None),
    ({"usage": {"completion_tokens": 2}}, None),
    ({"usage": {"prompt_tokens": "12", "completion_tokens": 2}}, None),
    ({"usage": {"prompt_tokens": 1.5, "completion_tokens": 2}}, None),
    ({"usage": {"prompt_tokens": -1, "completion_tokens": 2}}, None),
    ({"usage": {"prompt_tokens": 3, "completion_tokens": -2}}, None),
    ({"usage": {"prompt_tokens": True, "completion_tokens": 2}}, None),
    ({"usage": {"prompt_tokens": 3, "completion_tokens": True}}, None),
    ({"usage": {"prompt_tokens": 3, "completion_tokens": None}}, None),
    ({"usage": {"prompt_tokens": MAX_USAGE_TOKENS, "completion_tokens": MAX_USAGE_TOKENS}},
     (MAX_USAGE_TOKENS, MAX_USAGE_TOKENS)),
    ({"usage": {"prompt_tokens": MAX_USAGE_TOKENS + 1, "completion_tokens": 2}}, None),
    ({"usage": {"prompt_tokens": 3, "completion_tokens": MAX_USAGE_TOKENS + 1}}, None),
    ({"usage": {"prompt_tokens": 2**64 - 6, "completion_tokens": 2}}, None),  # u64 underflow
    ({"x_groq": {"usage": {"prompt_tokens": 11, "completion_tokens": 5}}}, (11, 5)),  # Groq
    ({"x_groq": {"id": "req_1"}}, None),
    ({"x_groq": "usage"}, None),
])
def test_usage_of(obj: dict[str, Any], want: tuple[int, int] | None) -> None:
    """Only integer counts from 0 to MAX_USAGE_TOKENS are trusted; anything else is no usage."""
    assert usage_of(obj) == want


@pytest.mark.parametrize(("usage", "chat", "want"), [
    ({"prompt_tokens": 11, "total_tokens": 16}, True, (11, 5)),  # completion = total - prompt
    ({"prompt_tokens": 11}, True, None),  # no count of the completion: estimated
    ({"prompt_tokens": 11, "total_tokens": 3}, True, None),
    ({"prompt_tokens": 11, "total_tokens": "16"}, True, None),
    ({"prompt_tokens": 11, "completion_tokens": None, "total_tokens": 16}, True, None),
    ({"prompt_tokens": 11}, False, (11, 0)),  # an embedding's has no completion
    ({"prompt_tokens": 11, "total_tokens": 11}, False, (11, 0)),
])
def test_usage_without_completion_tokens(
    usage: dict[str, Any], chat: bool, want: tuple[int, int] | None,
) -> None:
    """A chat answer's usage without completion_tokens is no measured 0: the upstream's
    total less its prompt, or no usage at all (the tokens are then estimated)."""
    assert usage_of({"usage": usage}, chat) == want


@pytest.mark.parametrize(("event", "want"), [
    (b"data: x\n\n", b"x"),
    (b"data:x\n\n", b"x"),
    (b"data:  x\n\n", b" x"),  # only one leading space is part of the field syntax
    (b"data: a\r\ndata: b\r\n\r\n", b"a\nb"),
    (b"data\n\n", b""),
    (b"data: a\ndata\n\n", b"a\n"),
    (b": c\nevent: m\nid: 1\ndata: y\n\n", b"y"),
    (b": keep-alive\n\n", None),
    (b"\n", None),
    (b"event: ping\n\n", None),
])
def test_event_data(event: bytes, want: bytes | None) -> None:
    """The data lines joined by LF, or None without any."""
    assert event_data(event) == want


def test_make_event_round_trips() -> None:
    """A built event is one complete LF event whose data is the object's JSON."""
    ev = sse.make_event({"a": [1, "ü"]})
    assert feed_all([ev]) == ([ev], b"")
    assert orjson.loads(event_data(ev) or b"") == {"a": [1, "ü"]}


class _Scanned(bytes):
    """Bytes that add up how many bytes their find() calls look at."""

    scanned = 0

    def find(self, sub: Any, start: Any = None, end: Any = None) -> int:
        at = super().find(sub, start, end)
        _Scanned.scanned += (len(self) if at < 0 else at + len(sub)) - (start or 0)
        return at


@pytest.mark.parametrize("event", [CONTENT, CONTENT.replace(b"\n\n", b"\r\n\r\n"),
                                   b": ping\n\n" + CONTENT], ids=["LF", "CRLF", "comments"])
def test_a_read_of_many_events_is_searched_in_linear_time(event: bytes) -> None:
    """A 2 MB read of small events is split searching each byte a few times, not
    rescanned to its end per event (which took ~15 s; counted, not timed)."""
    data = event * (2_000_000 // len(event))
    _Scanned.scanned = 0
    events = EventSplitter().feed(_Scanned(data))
    assert b"".join(events) == data and len(events) == data.count(b"data: ") * (
        2 if event.startswith(b":") else 1)
    assert _Scanned.scanned <= 4 * len(data), _Scanned.scanned


# ---------------------------------------------------------------------------------------
# ChunkShape: the relay's check of a read of one content chunk shaped as the last

def _chunk_doc(text: str, style: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 7,
                           "model": "m", "choices": [{"index": 0, "delta": {"content": text},
                                                      "logprobs": None, "finish_reason": None}]}
    if style == "openai":  # as OpenAI sends it today: padding after the choices
        doc["obfuscation"] = "x" * (12 - len(text) % 12)
    elif style == "usage-null":
        doc["usage"] = None
    return doc


def _shaped(text: str, style: str) -> bytes:
    doc = _chunk_doc(text, style)
    if style == "spaced":  # Python's json.dumps, as some servers write it
        import json
        return b"data: " + json.dumps(doc).encode() + b"\n\n"
    return b"data: " + orjson.dumps(doc) + b"\n\n"


_STYLES = ["openai", "usage-null", "spaced", "vllm"]


@pytest.mark.parametrize("style", _STYLES)
def test_chunk_shape_fits_the_next_chunks_of_a_stream(style: str) -> None:
    """Learnt from one content chunk, the shape takes the next ones (other text, other
    padding), and declines a text it cannot vouch for and every other kind of event."""
    shape = sse.ChunkShape()
    first = _shaped("Hello", style)
    assert not shape.fits(first)  # nothing learnt yet
    shape.learn(first)
    for text in ["", " world", "new\nline", "tab\there", "ünï €", "{}[],:", "error", "usage"]:
        assert shape.fits(_shaped(text, style)), text
    for text in ['say "hi"', "back\\", "\\"]:
        assert not shape.fits(_shaped(text, style)), text
    head, tail = first[:first.find(b"Hello")], first[first.find(b"Hello") + 5:]
    for hole in [b"x\rx", b"x\nx", b"x\x01x", b"x\\qx", b"\\u12", b"\\ud800", b"\\udc00",
                 b"x\xffx", b"\xc3"]:  # raw controls, bad escapes, lone surrogates, not UTF-8
        assert not shape.fits(head + hole + tail), hole
    for hole in [b"\\n\\t\\\"", b"\\u00e9", "ünï".encode()]:
        assert shape.fits(head + hole + tail) == (b'\\"' not in hole), hole
    for other in [FINISH, USAGE, DONE, ROLE, b": keep-alive\n\n", first[:-1], first + first,
                  first.replace(b"chatcmpl-9", b"chatcmpl-8")]:
        assert not shape.fits(other)


def test_chunk_shape_learns_again_when_the_chunks_change_but_not_for_ever() -> None:
    """The role chunk's shape gives way to the content chunks'; a text the shape declined
    teaches nothing; after `_LESSONS` shapes the stream keeps the last one."""
    shape = sse.ChunkShape()
    role = _shaped("", "vllm").replace(b'{"content"', b'{"role":"assistant","content"')
    shape.learn(role)
    assert shape.fits(role) and not shape.fits(_shaped("a", "vllm"))
    shape.learn(_shaped("a", "vllm"))
    assert shape.fits(_shaped("b", "vllm"))
    lessons = shape.lessons
    shape.learn(_shaped('q"q', "vllm"))  # same shape, a text it declines: no lesson
    assert shape.lessons == lessons and shape.fits(_shaped("b", "vllm"))
    for n in range(lessons):
        shape.learn(_shaped("a", "vllm").replace(b'"created":7', b'"created":%d' % (10 + n)))
    assert shape.lessons == 0
    last = _shaped("z", "vllm").replace(b'"created":7', b'"created":%d' % (10 + lessons - 1))
    shape.learn(_shaped("a", "openai"))
    assert shape.fits(last) and not shape.fits(_shaped("a", "openai"))
    shape = sse.ChunkShape()
    shape.learn(_shaped("back\\slash", "vllm"))  # its text's end is not sure: nothing learnt
    assert not shape.fits(_shaped("a", "vllm"))


def test_chunk_shape_spends_lessons_only_on_shapes_nothing_fitted() -> None:
    """Chunks with no text to learn from (content null: reasoning, tool calls) cost no
    lesson; a shape some chunks fitted costs none either, so a server that stamps
    `created` anew each second keeps learning; shapes that no chunk fits use them up."""
    shape = sse.ChunkShape()
    blank = _shaped("", "vllm").replace(b'"content":""', b'"content":null')
    for n in range(1, 10):
        shape.learn(blank, n)
    assert shape.lessons == sse._LESSONS and not shape.fits(_shaped("a", "vllm"))
    seen = 10
    for second in range(20):  # one learnt chunk, then three that fit, each second
        stamped = _shaped("a", "vllm").replace(b'"created":7', b'"created":%d' % second)
        assert not shape.fits(stamped)
        seen += 1
        shape.learn(stamped, seen)
        for text in ("b", "c", "d"):
            assert shape.fits(stamped.replace(b'"a"', b'"%s"' % text.encode()))
            seen += 1
    assert shape.lessons == sse._LESSONS  # the first was the first; the others had fitted
    for second in range(20, 30):  # a new shape every chunk: nothing ever fits
        seen += 1
        shape.learn(_shaped("a", "vllm").replace(b'"created":7', b'"created":%d' % second), seen)
    assert shape.lessons == 0


@settings(max_examples=500, deadline=None)
@given(style=st.sampled_from(_STYLES), text=st.text(max_size=12),
       hole=st.binary(max_size=12), pad=st.binary(max_size=6))
@example(style="vllm", text="a", hole=b"error", pad=b"")
@example(style="openai", text="a", hole=b"finish_reason", pad=b"usage")
@example(style="vllm", text="a", pad=b"",  # a finish hidden in the text's place
         hole=b'x"}}],"usage":{"prompt_tokens":1,"completion_tokens":1},"z":[{"a":{"b":"')
@example(style="openai", text="a", hole=b"x", pad=b'x"}],"usage":{"prompt_tokens":1},"z":{"y":"')
@example(style="vllm", text="a", hole=b"\\q", pad=b"")  # not a JSON escape
@example(style="vllm", text="a", hole=b"\xff", pad=b"")  # not UTF-8
@example(style="vllm", text="a", hole=b"\\ud800", pad=b"")  # a lone surrogate
@example(style="vllm", text="a", hole=b"\\udc00", pad=b"")  # a lone low surrogate
def test_chunk_shape_fits_only_events_classify_passes(
    style: str, text: str, hole: bytes, pad: bytes
) -> None:
    """Whatever bytes stand in the text (and the padding) of a learnt chunk, a read the
    shape fits is one whole event of valid JSON, of the learnt chunk's skeleton, that
    `classify` passes on, as it would were the chunk parsed."""
    first = _shaped("Hi", style)
    shape = sse.ChunkShape()
    shape.learn(first)
    nxt = _shaped(text, style)
    if ('"' not in text and "\\" not in text and not any(ord(c) < 0x20 for c in text)
            and (style != "spaced" or text.isascii())):  # json.dumps escapes the rest
        assert shape.fits(nxt)  # no escapes in the text: nothing for the shape to doubt
    i = first.find(b"Hi")
    raw = first[:i] + hole + first[i + 2:]
    if style == "openai":
        j = raw.rfind(b'"obfuscation":"') + 15
        raw = raw[:j] + pad + raw[raw.find(b'"', j):]
    for event in (nxt, raw):
        if shape.fits(event):
            assert feed_all([event]) == ([event], b"")
            assert classify(event)[0] == Kind.PASS
            doc = orjson.loads(event[6:])  # valid JSON: never a malformed event passed on
            assert _skeleton(doc) == _skeleton(_chunk_doc("", style))


@settings(max_examples=300, deadline=None)
@given(lesson=st.binary(max_size=80) | st.sampled_from([b'"content":"x"', b'"content":"']),
       read=st.binary(max_size=80))
def test_chunk_shape_takes_any_bytes_without_failing(lesson: bytes, read: bytes) -> None:
    """Whatever it is taught or shown, the shape answers: never an exception."""
    shape = sse.ChunkShape()
    shape.learn(lesson)
    assert shape.fits(read) in (True, False)
    assert shape.fits(lesson) in (True, False)


def _skeleton(doc: Any) -> Any:
    """`doc` with every string emptied: the same skeleton is the same kind of chunk."""
    if isinstance(doc, dict):
        return {k: _skeleton(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_skeleton(v) for v in doc]
    return "" if isinstance(doc, str) else doc


# ---------------------------------------------------------------------------------------
# add_member: lowrouter on the stream's last chunk

def test_add_member_keeps_the_upstreams_bytes_of_a_one_line_event() -> None:
    spaced = b'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 1}}\n\n'
    for event in (FINISH, USAGE, spaced):
        obj = orjson.loads(event_data(event))
        out = sse.add_member(event, obj, "lowrouter", {"eco": {"carbon_g": 0.5}})
        assert out == event[:-3] + b',"lowrouter":{"eco":{"carbon_g":0.5}}}\n\n'
    # other line ends, several data lines, a member already there: written anew
    for event in (FINISH.replace(b"\n", b"\r\n"), b'data: {"a":\ndata: 1}\n\n',
                  b'data: {"a":1,"lowrouter":{"old":1}}\n\n', b"data: {}\n\n"):
        obj = orjson.loads(event_data(event))
        out = sse.add_member(event, obj, "lowrouter", {"new": 2})
        assert out == b"data: " + orjson.dumps({**obj, "lowrouter": {"new": 2}}) + b"\n\n"


def test_add_member_keeps_an_events_other_fields() -> None:
    """An event with other fields than its data (`id:`, `event:`, a comment) keeps them,
    in their places, when it is written anew with the member."""
    obj = orjson.loads(event_data(FINISH))
    data = b"data: " + orjson.dumps({**obj, "lowrouter": {"new": 2}})
    for event, want in [
        (b"id: 7\n" + FINISH, b"id: 7\n" + data + b"\n\n"),
        (FINISH[:-1] + b"id: 7\n\n", data + b"\nid: 7\n\n"),
        (b"event: chunk\r\n: note\r\n" + FINISH.replace(b"\n", b"\r\n"),
         b"event: chunk\n: note\n" + data + b"\n\n"),
    ]:
        out = sse.add_member(event, obj, "lowrouter", {"new": 2})
        assert out == want and feed_all([out]) == ([out], b"")


_json_leaf = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)


@settings(max_examples=200, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=6), _json_leaf | st.lists(_json_leaf, max_size=3),
                           max_size=5),
       value=st.dictionaries(st.text(max_size=6), _json_leaf, max_size=3),
       spaced=st.booleans(), crlf=st.booleans())
def test_add_member_gives_one_event_of_the_object_and_the_member(
    obj: dict[str, Any], value: dict[str, Any], spaced: bool, crlf: bool
) -> None:
    import json

    data = json.dumps(obj).encode() if spaced else orjson.dumps(obj)
    event = b"data: " + data + (b"\r\n\r\n" if crlf else b"\n\n")
    out = sse.add_member(event, obj, "lowrouter", value)
    assert feed_all([out]) == ([out], b"")
    assert orjson.loads(event_data(out)) == {**obj, "lowrouter": value}


@pytest.mark.parametrize(("event", "has_id"), [
    (ROLE, False),
    (b"id: 7\n" + ROLE, True),
    (ROLE[:-1] + b"id: 7\n\n", True),
    (b"id\n\n", True),
    (b": id: 7\n\n", False),  # a comment, not a field
    (b"idx: 7\n" + ROLE, False),  # another field
    (b"data: [DONE]\n\n", False),
])
def test_classify_event_says_whether_an_event_has_an_id(event: bytes, has_id: bool) -> None:
    """The relay's keep-alives change form once an event has had an `id` field (the
    OpenAI SDK keeps the last id); classify's kind and object are the same as without."""
    kind, obj, got = sse.classify_event(event)
    assert got is has_id and (kind, obj) == classify(event)
