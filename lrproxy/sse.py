"""Server-sent events, bytes in and exact event bytes out (SPEC §1.1).

`EventSplitter` finds event boundaries in whatever pieces the upstream's bytes arrive
and returns each complete event's bytes exactly as received (LF or CRLF line ends,
comment lines and multi-line `data:` included). `classify` looks at one event just
enough to tell the relay whether it must be held back (a finish or usage chunk), and
only then parses its JSON. Lone-CR line ends (allowed by the SSE standard, sent by no
OpenAI-compatible server we know) are not treated as line ends.
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

DONE: Final = b"[DONE]"
_DONE_EVENT: Final = b"data: [DONE]\n\n"

# A chunk needs a closer look only if it may finish a choice or carry usage; every
# OpenAI content chunk has `"finish_reason":null`, so match a non-null value only.
# Three searches, not one of three alternatives: each starts with a literal, which `re`
# finds fast, and a finish chunk (what mostly comes here) stops at the first.
_FINAL_HINTS: Final = (
    re.compile(rb'"finish_reason"\s*:\s*[^n\s]'),
    re.compile(rb'"usage"\s*:\s*\{'),
    re.compile(rb'"choices"\s*:\s*\[\s*\]'),
)
# One `data:` line holding `{...}`: a content chunk as every server sends it, passed on
# unparsed. Anything else with data (a cut `{not json`, [DONE], multi-line data) is parsed.
_PLAIN_CHUNK: Final = re.compile(rb"data: ?\{[^\r\n]*\}\r?\n\r?\n")


class EventSplitter:
    """Incremental SSE splitter: `feed(bytes) -> [event bytes]`, `close() -> leftover bytes`."""

    __slots__ = ("_scan", "held")

    def __init__(self) -> None:
        # The bytes of an unfinished event, read by the relay on each read (an attribute,
        # not a property: a property costs a Python call there).
        self.held = b""
        self._scan = 0  # where to resume the search for a blank line in `held`

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.held + data if self.held else data
        if buf.find(b"\r") < 0 and buf.find(b"\n\n\n") < 0 and buf[:1] != b"\n":
            # LF line ends and no blank line of its own (every OpenAI-compatible stream):
            # each blank line ends an event, one split finds them all.
            *parts, rest = buf.split(b"\n\n")
            self.held = rest
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
        self.held = buf[start:] if start < n else b""
        # The terminators are up to 3 bytes long: resume 2 bytes before the end.
        self._scan = max(0, len(self.held) - 2) if start < n else 0
        return events

    def close(self) -> bytes:
        """The bytes of an unfinished event at the end of the stream (usually empty)."""
        rest, self.held, self._scan = self.held, b"", 0
        return rest


# Where a read stops being plain content chunks: usage or a finish_reason that is not
# null (OpenAI sends `"usage":null` on every chunk), an error, or a CR line end. Each
# regex starts with a literal, which `re` finds at memchr speed.
_NOT_NULL: Final = (re.compile(rb'"finish_reason"(?!:null)'), re.compile(rb'"usage"(?!:null)'))
_ERROR: Final = b'"error"'


def plain_prefix(data: bytes) -> tuple[int, int]:
    """(length, events) of the longest start of `data` made of whole plain content chunks.

    A plain chunk is one `data: {...}` line and its blank line, with no error, usage or
    finish_reason other than null, and non-empty choices: what `classify` passes on
    unparsed. The relay forwards such a prefix as it is, without splitting it into
    events, which is most of every read of a stream; only the rest goes through
    `EventSplitter` and `classify`. Checked by scanning bytes (about ten scans of the
    read), never by parsing, and on any doubt the answer is (0, 0): the careful path
    then does it all. Call it only at an event boundary (the splitter holds nothing).
    """
    # A live stream mostly arrives one chunk per read: that case in fewer scans, with
    # the answer `_plain_prefix_scan` gives (tests/test_sse.py checks both agree).
    n = len(data)
    if (
        data.find(b"\n") == n - 2
        and data.endswith(b"}\n\n")
        and data.startswith(b"data: {")
        and data.find(b"\r") < 0  # find(), not `in`: ~1,000 instructions less each
        and data.find(_ERROR) < 0
        and data.count(b'"choices":[{') == 1
        and _NOT_NULL[0].search(data) is None
        and _NOT_NULL[1].search(data) is None
    ):
        return n, 1
    return _plain_prefix_scan(data)


# A content chunk's text, and OpenAI's `obfuscation` padding after it, are the only
# parts of a stream's content chunks that change from one to the next.
_TEXT_KEY: Final = re.compile(rb'"content": ?"')
_PAD_KEY: Final = re.compile(rb'"obfuscation": ?"')
_NOT_IN_HOLE: Final = re.compile(rb'["\r\n]')
_LESSONS: Final = 4  # shapes a stream may learn (role chunk, content chunks, a change)


class ChunkShape:
    """The bytes a stream's content chunks share around their text, learnt from one.

    A server writes each content chunk of a stream as the same bytes (id, created,
    model, `"finish_reason":null`, ...) around its text, and OpenAI around one more
    string, its `obfuscation` padding. `fits(read)` is True for a read of exactly those
    bytes around strings that hold no quote, CR or LF and do not end in a backslash:
    the chunk it was learnt from with other text in the same JSON string, which is as
    plain as that chunk was (`plain_prefix`), though not always by `plain_prefix`'s
    checks (a text of `error` makes `"error"`). Five or seven C calls where
    `plain_prefix` makes ten (bench/RESULTS.md). Call it only at an event boundary.
    """

    __slots__ = ("_head_len", "_mid_len", "_tail_len", "head", "lessons", "mid", "tail")

    def __init__(self) -> None:
        # Nothing learnt: a head no read of a plain chunk starts with, and a head length
        # no read has, so that `fits` is False after one comparison.
        self.head, self.mid, self.tail = b"\n", b"", b""
        self._head_len, self._mid_len, self._tail_len = 1 << 62, 0, 0
        self.lessons = _LESSONS

    def fits(self, data: bytes) -> bool:
        start = self._head_len
        end = len(data) - self._tail_len  # where the last string's closing quote is
        if end < start or not data.startswith(self.head) or not data.endswith(self.tail):
            return False
        if data[end - 1] == 0x5C:  # a backslash would escape the closing quote
            return False
        if not self._mid_len:
            return _NOT_IN_HOLE.search(data, start, end) is None
        mid = data.find(self.mid, start, end)
        return (mid > 0 and data[mid - 1] != 0x5C
                and _NOT_IN_HOLE.search(data, start, mid) is None
                and _NOT_IN_HOLE.search(data, mid + self._mid_len, end) is None)

    def learn(self, event: bytes) -> None:
        """Take the shape of `event`, one whole plain chunk (by `plain_prefix`) that
        `fits` declined, unless only its text was the reason or the lessons are used."""
        if self.lessons <= 0 or (event.startswith(self.head) and event.endswith(self.tail)):
            return
        self.lessons -= 1
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
        (start, end), rest = holes[0], holes[1:]
        self.head = event[:start]
        self.mid = event[end:rest[0][0]] if rest else b""
        self.tail = event[rest[0][1] if rest else end:]
        self._head_len, self._mid_len, self._tail_len = start, len(self.mid), len(self.tail)


def _plain_prefix_scan(data: bytes) -> tuple[int, int]:
    """`plain_prefix` for a read of any number of events.

    Every check is one C scan of the read (a regex search costs ~3 times a count, see
    bench/instr.py): a read of a whole stream spends most of its relay's work here.
    """
    if data.find(b"\r") >= 0:
        return 0, 0
    end = data.rfind(b"\n\n") + 2
    # A finish_reason usually is in the read (its last), so search for it: after the
    # last null one when those before it are all null (two counts cost half the search);
    # usage:null is on every content chunk, so its two counts agree unless a usage is in
    # the way.
    start = data.rfind(b'"finish_reason":null', 0, end)
    if start < 0 or (data.count(b'"finish_reason"', 0, start)
                     != data.count(b'"finish_reason":null', 0, start)):
        start = 0
    m = _NOT_NULL[0].search(data, start, end)
    if m is not None:
        end = data.rfind(b"\n\n", 0, m.start()) + 2
    if data.count(b'"usage"', 0, end) != data.count(b'"usage":null', 0, end):
        m = _NOT_NULL[1].search(data, 0, end)
        assert m is not None  # some "usage" is not followed by :null
        end = data.rfind(b"\n\n", 0, m.start()) + 2
    i = data.find(_ERROR, 0, end)
    if i >= 0:
        end = data.rfind(b"\n\n", 0, i) + 2
    if end < 2:
        return 0, 0
    # Each event is exactly one line, `data: {` … `}` LF LF ([DONE] is not `{`): the
    # n - 1 `}` LF LF `data: {` between them and the `}` LF LF at the end hold all 2n LFs.
    # Taken out (one pass), the last two LFs are left, which a memchr finds; counting
    # the LFs instead costs ~5 instructions a byte.
    body = data if end == len(data) else data[:end]
    rest = body.replace(b"}\n\ndata: {", b"")
    n = (len(body) - len(rest)) // 10 + 1
    if (
        not data.startswith(b"data: {")
        or not rest.endswith(b"}\n\n")
        or rest.find(b"\n") != len(rest) - 2
        or data.count(b'"choices":[{', 0, end) != n
    ):
        return 0, 0
    return end, n


def event_data(event: bytes) -> bytes | None:
    """The event's data (its `data:` lines joined by LF), or None if it has none."""
    n = len(event)
    if event[:6] == b"data: " and event.find(b"\n") == n - 2 and event.find(b"\r") < 0:
        return event[6:n - 2]  # one `data: ` line and its blank line: every stream's events
    parts: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            parts.append(b"")
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b"\n".join(parts)


class Kind:
    """What an event is to the relay."""

    PASS: Final = 0  # forward as it is (content chunk, comment, other field)
    FINAL: Final = 1  # a chunk with a finish_reason or usage: hold until [DONE]
    # (`choices: []` with no usage, as Azure's prompt_filter_results, passes: SPEC §1.1
    # holds back only the usage-only chunk)
    DONE: Final = 2  # data: [DONE]
    ERROR: Final = 3  # an upstream error object inside the stream
    MALFORMED: Final = 4  # data that is not JSON


def _plain_chunk(event: bytes) -> bool:
    """One `data: {...}` line and its blank line: what `_PLAIN_CHUNK` matches, by plain
    byte searches (a regex over every event cost ~3 µs, a stream has dozens)."""
    if event.startswith(b"data: {"):
        start = 7
    elif event.startswith(b"data:{"):
        start = 6
    else:
        return False
    if event.endswith(b"}\n\n"):
        end = len(event) - 2
    elif event.endswith(b"}\r\n\r\n"):
        end = len(event) - 4
    elif event.endswith((b"}\r\n\n", b"}\n\r\n")):
        end = len(event) - 3
    else:
        return False
    return event.find(b"\n", start, end - 1) == -1 and event.find(b"\r", start, end - 1) == -1


def classify(event: bytes) -> tuple[int, dict[str, Any] | None]:
    """Kind of one event and, when it had to be parsed, its JSON object."""
    if event == _DONE_EVENT:  # every stream's last event, as OpenAI writes it
        return Kind.DONE, None
    if (
        _FINAL_HINTS[0].search(event) is None
        and _FINAL_HINTS[1].search(event) is None
        and _FINAL_HINTS[2].search(event) is None
        and event.find(b'"error"') < 0
        and (_plain_chunk(event) or not is_data_event(event))
    ):
        return Kind.PASS, None
    data = event_data(event)
    if data is None:
        return Kind.PASS, None
    if data == DONE:
        return Kind.DONE, None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return Kind.MALFORMED, None
    if not isinstance(obj, dict):
        return Kind.MALFORMED, None
    if obj.get("error") is not None and not obj.get("choices"):
        return Kind.ERROR, obj
    choices = obj.get("choices")
    if obj.get("usage"):
        return Kind.FINAL, obj
    if isinstance(choices, list):
        for c in choices:  # a loop: any() of a generator costs a frame and its resumes
            if isinstance(c, dict) and c.get("finish_reason"):
                return Kind.FINAL, obj
    return Kind.PASS, obj


def is_data_event(event: bytes) -> bool:
    """True for events that carry data (not comments, not blank lines)."""
    return event.startswith(b"data") or b"\ndata" in event


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
    other event is written anew from `obj` (LF line ends, orjson's spelling).
    """
    n = len(event)
    if (event.startswith(b"data: {") and event.endswith(b"}\n\n")
            and event.find(b"\n") == n - 2 and event.find(b"\r") < 0):
        return b"data: %b\n\n" % with_member(event[6:n - 2], obj, name, value)
    return make_event({**obj, name: value})


def usage_of(obj: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI `usage` object, if it has them."""
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if (isinstance(p, int) and isinstance(c, int) and not isinstance(p, bool)
            and not isinstance(c, bool) and p >= 0 and c >= 0):
        return p, c
    return None
