"""Server-sent events, bytes in and exact event bytes out (SPEC §1.1).

`EventSplitter` finds event boundaries in whatever pieces the upstream's bytes arrive
and returns each complete event's bytes exactly as received (LF or CRLF line ends,
comment lines and multi-line `data:` included). `classify` parses an event's JSON and
tells the relay whether to pass it on, hold it back (a finish or usage chunk) or end
the stream (an error, data that is not a JSON object). `ChunkShape` vouches for a
content chunk without parsing it, when it is an earlier parsed chunk's bytes around
other text. Lone-CR line ends (allowed by the SSE standard, sent by no OpenAI-compatible
server we know) are not treated as line ends: an event with one is malformed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

import orjson

DONE: Final = b"[DONE]"
_DONE_EVENT: Final = b"data: [DONE]\n\n"
# An unfinished event this long is gathered in a bytearray, read by read, without a
# copy of it or a search through it per read (quadratic in its length): it is joined
# and searched once a read may end it.
_LONG_EVENT: Final = 64 * 1024

class EventSplitter:
    """Incremental SSE splitter: `feed(bytes) -> [event bytes]`, `close() -> leftover bytes`."""

    __slots__ = ("_scan", "held")

    def __init__(self) -> None:
        # The bytes of an unfinished event, read by the relay on each read (an attribute,
        # not a property: a property costs a Python call there); a bytearray once it is
        # _LONG_EVENT long.
        self.held: bytes | bytearray = b""
        self._scan = 0  # where to resume the search for a blank line in `held`

    def feed(self, data: bytes) -> list[bytes]:
        held = self.held
        if isinstance(held, bytearray):
            # A long event goes on unless this read may end it: a blank line in it, or
            # one across its start ("\n" + "\n", "\n" + "\r\n", "\n\r" + "\n").
            edge = held[-2:] + data[:2]
            if (data.find(b"\n\n") < 0 and data.find(b"\n\r\n") < 0
                    and edge.find(b"\n\n") < 0 and edge.find(b"\n\r\n") < 0):
                held += data
                return []
            buf = bytes(held) + data
        else:
            buf = held + data if held else data
        if buf.endswith(b"\n\n") and buf.find(b"\r") < 0:
            # Whole one-line events with LF line ends (every OpenAI-compatible stream):
            # split at each LF (a memchr; a split at LF LF searches ~10 times slower),
            # the lines alternate event, blank, event, blank, ... and a last blank.
            lines = buf.split(b"\n")
            if not any(lines[1::2]) and all(lines[0:-1:2]):
                self.held, self._scan = b"", 0
                if len(lines) == 3:
                    return [buf]
                return [line + b"\n\n" for line in lines[0:-1:2]]
        if buf.find(b"\r") < 0 and buf.find(b"\n\n\n") < 0 and buf[:1] != b"\n":
            # LF line ends and no blank line of its own (every OpenAI-compatible stream):
            # each blank line ends an event, one split finds them all.
            *parts, rest = buf.split(b"\n\n")
            self.held = rest if len(rest) < _LONG_EVENT else bytearray(rest)
            self._scan = max(0, len(rest) - 2)
            if not rest and len(parts) == 1:
                return [buf]
            return [p + b"\n\n" for p in parts]
        events: list[bytes] = []
        start = 0
        scan = self._scan
        n = len(buf)
        # The next "\n\n" and "\n\r\n" at or after `scan` (-1: none in buf). Each is searched
        # for again only once passed, so that a read holding many events (an LF stream has
        # no "\n\r\n" at all) is split in linear time, not rescanned to its end per event.
        a = b = -2
        while start < n:
            # A blank line at the very start of an event is an (empty) event of its own.
            if buf[start] == 0x0A:
                end = start + 1
            elif buf.startswith(b"\r\n", start):
                end = start + 2
            else:
                if a != -1 and a < scan:
                    a = buf.find(b"\n\n", scan)
                if b != -1 and b < scan:
                    b = buf.find(b"\n\r\n", scan)
                if a == -1 and b == -1:
                    break
                end = a + 2 if b == -1 or (a != -1 and a < b) else b + 3
            events.append(buf[start:end] if start or end != n else buf)
            start = scan = end
        rest = buf[start:] if start < n else b""
        # The terminators are up to 3 bytes long: resume 2 bytes before the end.
        self._scan = max(0, len(rest) - 2)
        self.held = bytearray(rest) if len(rest) >= _LONG_EVENT else rest
        return events

    def close(self) -> bytes:
        """The bytes of an unfinished event at the end of the stream (usually empty)."""
        rest, self.held, self._scan = self.held, b"", 0
        return bytes(rest)


# A content chunk's text, and OpenAI's `obfuscation` padding after it, are the only
# parts of a stream's content chunks that change from one to the next.
_TEXT_KEY: Final = re.compile(rb'"content": ?"')
_PAD_KEY: Final = re.compile(rb'"obfuscation": ?"')
# A text of plain ASCII characters, no quote, no backslash: the usual text of a chunk,
# which one charset search (about as fast as a memchr) vouches for.
_ODD_IN_HOLE: Final = re.compile(rb'[\x00-\x1f"\\\x80-\xff]')
# Any other text is vouched for when it holds none of what a JSON string's text may not
# hold as it is: a quote, a control character, a backslash that starts no escape; also
# (for fewer cases to think about) a \u escape of either half of a UTF-16 surrogate
# pair, which orjson takes only in pairs; and its bytes are UTF-8. Else its chunk is
# parsed instead.
_BAD_IN_HOLE: Final = re.compile(
    rb'[\x00-\x1f"]|\\(?![\\/bfnrt]|u(?![dD][89a-fA-F])[0-9a-fA-F]{4})')
# Shapes a stream may learn that no chunk fitted (role chunk, content chunks, changes);
# a shape that some chunk fitted costs no lesson (a `created` stamped anew each second).
_LESSONS: Final = 4


class ChunkShape:
    """The bytes a stream's content chunks share around their text, learnt from one.

    A server writes each content chunk of a stream as the same bytes (id, created,
    model, `"finish_reason":null`, ...) around its text, and OpenAI around one more
    string, its `obfuscation` padding. `learn` takes those bytes from a content chunk
    `classify` parsed and passed. `fits(event)` is True for an event of exactly those
    bytes around texts that are valid JSON string contents (no quote, no control
    character, only valid escapes, no backslash at the end, valid UTF-8): the learnt
    chunk with other text in the same strings, so valid JSON of the same skeleton,
    which `classify` would pass on as it passed that one. Five or seven C calls against
    a parse (bench/RESULTS.md). Call it only at an event boundary.
    """

    __slots__ = ("_head_len", "_mid_len", "_seen", "_tail_len", "head", "lessons", "mid",
                 "tail")

    def __init__(self) -> None:
        # Nothing learnt: a head no read of a plain chunk starts with, and a head length
        # no read has, so that `fits` is False after one comparison.
        self.head, self.mid, self.tail = b"\n", b"", b""
        self._head_len, self._mid_len, self._tail_len = 1 << 62, 0, 0
        self.lessons = _LESSONS
        self._seen = -1  # the stream's content chunks when the shape was last learnt

    def fits(self, data: bytes) -> bool:
        start = self._head_len
        end = len(data) - self._tail_len  # where the last string's closing quote is
        if (end < start or not data.startswith(self.head) or not data.endswith(self.tail)
                or data[end - 1] == 0x5C):  # a backslash would escape that quote
            return False
        if not self._mid_len:
            return _ODD_IN_HOLE.search(data, start, end) is None or _text_ok(data, start, end)
        mid = data.find(self.mid, start, end)
        if mid <= 0 or data[mid - 1] == 0x5C:
            return False
        pad = mid + self._mid_len
        return ((_ODD_IN_HOLE.search(data, start, mid) is None or _text_ok(data, start, mid))
                and (_ODD_IN_HOLE.search(data, pad, end) is None or _text_ok(data, pad, end)))

    def fitting(self, events: Sequence[bytes], i: int = 0) -> int:
        """How many of `events`, from the `i`-th on, fit in a row."""
        fits = self.fits
        k, n = i, len(events)
        while k < n and fits(events[k]):
            k += 1
        return k - i

    def learn(self, event: bytes, seen: int = 0) -> None:
        """Take the shape of `event`, a content chunk `classify` parsed and passed on
        (PASS, with non-empty choices) that `fits` declined, unless only its text was
        the reason, it has no text, or the lessons are used. `seen`: the stream's
        content chunks so far, this one included; more than one since the last shape
        was taken means chunks fitted that shape, and the new one costs no lesson."""
        if self.lessons <= 0 or (event.startswith(self.head) and event.endswith(self.tail)):
            return
        holes: list[tuple[int, int]] = []
        at = 0
        for key in (_TEXT_KEY, _PAD_KEY):
            m = key.search(event, at)
            if m is None:
                break
            start = m.end()
            at = event.find(b'"', start)
            # The hole's string ends at that quote (no backslash before it escapes it),
            # and a value ends there: the bytes after a hole never make a key with it.
            if (at < 0 or event.find(b"\\", start, at) >= 0 or at + 1 == len(event)
                    or event[at + 1] not in b",}]"):
                return
            holes.append((start, at))
        if not holes:
            return
        if seen - self._seen <= 1:
            self.lessons -= 1
        self._seen = seen
        (start, end), rest = holes[0], holes[1:]
        self.head = event[:start]
        self.mid = event[end:rest[0][0]] if rest else b""
        self.tail = event[rest[0][1] if rest else end:]
        self._head_len, self._mid_len, self._tail_len = start, len(self.mid), len(self.tail)


def _text_ok(data: bytes, start: int, end: int) -> bool:
    """`data[start:end]` is a valid JSON string's text, in UTF-8 (checked in the whole
    of `data`, the rest of which is a parsed chunk's)."""
    if _BAD_IN_HOLE.search(data, start, end) is not None:
        return False
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def event_data(event: bytes) -> bytes | None:
    """The event's data (its `data:` lines joined by LF), or None if it has none;
    raises BadEvent for one the relay ends the stream at (`_event_data`)."""
    return _event_data(event)[0]


class BadEvent(ValueError):
    """An event a client's SSE parser would not read as the proxy does."""


def _event_data(event: bytes) -> tuple[bytes | None, bool]:
    """`event_data`, and whether the event has an `id` field; raises BadEvent for an
    event with a lone CR (the OpenAI SDK, as the SSE standard, ends a line there: it
    would read other events than the proxy checked) or bytes that are not UTF-8 (the
    SDK decodes every line, comments too). Data lines are UTF-8-checked by their parse."""
    n = len(event)
    if event[:6] == b"data: " and event.find(b"\n") == n - 2 and event.find(b"\r") < 0:
        # one `data: ` line and its blank line: every stream's events
        return event[6:n - 2], False
    if event.find(b"\r") >= 0 and event.count(b"\r") != event.count(b"\r\n"):
        raise BadEvent("a lone CR")  # (counts: no copy of the event)
    if not event.isascii():
        try:
            event.decode()
        except UnicodeDecodeError:
            raise BadEvent("not UTF-8") from None
    parts: list[bytes] = []
    has_id = False
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            parts.append(b"")
        elif line.startswith(b"id:") or line == b"id":
            has_id = True
    if not parts:
        return None, has_id
    return parts[0] if len(parts) == 1 else b"\n".join(parts), has_id


class Kind:
    """What an event is to the relay."""

    PASS: Final = 0  # forward as it is (content chunk, comment, other field)
    FINAL: Final = 1  # a chunk with a finish_reason or usage: hold until [DONE]
    # (`choices: []` with no usage, as Azure's prompt_filter_results, passes: SPEC §1.1
    # holds back only the usage-only chunk)
    DONE: Final = 2  # data: [DONE]
    ERROR: Final = 3  # an upstream error object inside the stream
    MALFORMED: Final = 4  # data that is not JSON


def classify(event: bytes) -> tuple[int, dict[str, Any] | None]:
    """Kind of one event and, for one with data, its JSON object. Every data event is
    parsed: one that is not a JSON object ends the stream (MALFORMED), never reaching
    the client (SPEC §1.1); `ChunkShape` spares the parse of most content chunks."""
    kind, obj, _ = classify_event(event)
    return kind, obj


def error_object(obj: dict[str, Any], answer: bool = False) -> bool:
    """Whether a chunk, or with `answer` a whole JSON answer, is an upstream's error: an
    error member beside choices or not (OpenRouter's failure after tokens went:
    `"error": {...}, "choices": [{"delta": {}, "finish_reason": "error"}]`, the shape of
    the §1.1 error event itself), or an empty one with no choices (false, 0, "", [] and
    null are no error; nor is {} on a chunk that has usage, a stream's usage chunk,
    where an answer of usage alone is no answer)."""
    err = obj.get("error")
    return bool(err) or (err == {} and not obj.get("choices")
                         and (answer or not obj.get("usage")))


def classify_event(event: bytes) -> tuple[int, dict[str, Any] | None, bool]:
    """`classify`, and whether the event has an `id` field: after one the OpenAI SDK
    takes every blank line for an event (it keeps the last id), keep-alives included."""
    if event == _DONE_EVENT:  # every stream's last event, as OpenAI writes it
        return Kind.DONE, None, False
    try:
        data, has_id = _event_data(event)
    except BadEvent:
        return Kind.MALFORMED, None, False
    if data is None:
        if b"error:" in event:
            return _error_field(event, has_id)
        return Kind.PASS, None, has_id
    if data == DONE:
        return Kind.DONE, None, has_id
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return Kind.MALFORMED, None, has_id
    if not isinstance(obj, dict):
        return Kind.MALFORMED, None, has_id
    choices = obj.get("choices")
    if error_object(obj):
        return Kind.ERROR, obj, has_id
    if isinstance(choices, list):
        for c in choices:  # a loop: any() of a generator costs a frame and its resumes
            if isinstance(c, dict) and (why := c.get("finish_reason")):
                return (Kind.ERROR if why == "error" else Kind.FINAL), obj, has_id
    if obj.get("usage"):
        return Kind.FINAL, obj, has_id
    return Kind.PASS, obj, has_id


def _error_field(event: bytes, has_id: bool) -> tuple[int, dict[str, Any] | None, bool]:
    """An event of an `error:` field alone, llama.cpp's server's way (before 2025) to
    fail a stream: `error: {"code": 500, "message": ..., "type": ...}`, then its end.
    The SDK, as the SSE standard, ignores the field; an error object in it is the
    upstream's error (Kind.ERROR, quoted to the client) rather than a stream cut short
    without a word. Anything else in it passes as any unknown field does."""
    for line in event.splitlines():  # (beside an `id:` or `event: error` line, say)
        if line.startswith(b"error:"):
            break
    else:
        return Kind.PASS, None, has_id
    try:
        err = orjson.loads(line[6:])
    except orjson.JSONDecodeError:
        return Kind.PASS, None, has_id
    if not isinstance(err, dict) or not err:
        return Kind.PASS, None, has_id
    return Kind.ERROR, {"error": err}, has_id


def make_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def with_member(data: bytes, obj: dict[str, Any], name: str, value: Any) -> bytes:
    """`data`, the JSON text of the object `obj`, with `name: value` added to it: the
    member written in before its closing brace, the rest of the bytes as they were; an
    empty object, or one that has `name` already, is written anew from `obj`."""
    end = data.rfind(b"}")
    if not obj or name in obj or end < 0:
        return orjson.dumps({**obj, name: value})
    return b"%b,%b:%b%b" % (data[:end], orjson.dumps(name), orjson.dumps(value), data[end:])


def add_member(event: bytes, obj: dict[str, Any], name: str, value: Any) -> bytes:
    """`event`, whose data is the JSON object `obj`, with `name: value` added to it.

    An event of one `data: {...}` line keeps the upstream's bytes (`with_member`); any
    other event is written anew from `obj` (LF line ends, orjson's spelling, one data
    line where its first was), its other fields (`id:`, `event:`, comments) kept.
    """
    n = len(event)
    if (event.startswith(b"data: {") and event.endswith(b"}\n\n")
            and event.find(b"\n") == n - 2 and event.find(b"\r") < 0):
        return b"data: %b\n\n" % with_member(event[6:n - 2], obj, name, value)
    lines: list[bytes] = []
    written = False
    for line in event.splitlines():
        if line.startswith(b"data:") or line == b"data":
            if not written:
                lines.append(b"data: " + orjson.dumps({**obj, name: value}))
                written = True
        elif line:
            lines.append(line)
    return b"\n".join(lines) + b"\n\n"


# The most tokens one request's usage may count: ten times the longest context window
# (10 M) there is. A count above it is an upstream's bug (an unsigned underflow sends
# 2**64 - 6), which would put the token and carbon counters where the next requests'
# figures vanish under float rounding; the request's tokens are estimated instead.
MAX_USAGE_TOKENS: Final = 100_000_000


def usage_of(obj: dict[str, Any], chat: bool = True) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI `usage` object, if it has plausible
    ones: integers from 0 to MAX_USAGE_TOKENS. An embedding's has no completion_tokens
    (0); a chat answer's without them has them as total_tokens - prompt_tokens, and
    without both is no count of its completion (estimated, not a measured 0)."""
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        groq = obj.get("x_groq")  # Groq's finish chunk carries its usage there
        usage = groq.get("usage") if isinstance(groq, dict) else None
        if not isinstance(usage, dict):
            return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens", None if chat else 0)
    if c is None and "completion_tokens" not in usage:
        total = usage.get("total_tokens")
        if isinstance(total, int) and isinstance(p, int) and total >= p:
            c = total - p
    if (isinstance(p, int) and isinstance(c, int) and not isinstance(p, bool)
            and not isinstance(c, bool) and 0 <= p <= MAX_USAGE_TOKENS
            and 0 <= c <= MAX_USAGE_TOKENS):
        return p, c
    return None
