"""Upstream I/O: one ClientSession, passive health and load per upstream (SPEC §2).

This is the only module that catches aiohttp's client errors: each becomes one of
ours (`UpstreamError`, `UpstreamTimeout`, `UpstreamAuthFailed`) so the relay can fail
over before the first byte, or end a stream with the §1.1 error event after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import errno
import hashlib
import inspect
import io
import logging
import math
import os
import socket
import ssl
import time
import types
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, Literal

import aiohttp
import attrs
import orjson
from aiohttp.http import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from lrproxy.config import Config, Secrets, Upstream
from lrproxy.errors import (
    NoUpstreamAvailable,
    UpstreamAuthFailed,
    UpstreamBadResponse,
    UpstreamConnectionLost,
    UpstreamError,
    UpstreamFailed,
    UpstreamTimeout,
)
from lrproxy.log import MAIN, Seldom
from lrproxy.protocol import unsent

log = logging.getLogger(MAIN)
EJECT_AFTER: Final = 5  # consecutive failures
NO_CAP: Final = 1 << 62  # max_concurrency 0: no cap of its own
COOL_DOWN_S: Final = 30.0  # × the number of ejections in a row
COOL_DOWN_CAP_S: Final = 300.0
# A write waiting for its client looks at what it has taken this many times per send
# timeout (Watch.arm_send): cut at most a twelfth of it late
SEND_LOOKS: Final = 12
USER_AGENT: Final = "lrproxy"
_LARGE_BODY: Final = 1 << 20


@attrs.define
class Health:
    """Passive health and load of one upstream; kept across reloads while it exists as
    the same upstream (Pool.configure: its URLs, key, proxy and CA bundle unchanged)."""

    outstanding: int = 0
    failures: int = 0  # consecutive
    ejections: int = 0  # in a row, for the growing cool-down
    ejected_until: float = 0.0
    trial: bool = False  # the one trial request after a cool-down is out
    # Failing, but its region's last usable upstream (for one of its models), so kept:
    # its cool-down and trial run as an ejection's, but it stays usable, tried after
    # the others until a success of its own (Pool.last_resort)
    kept: bool = False

    def ejected(self) -> bool:
        """Out for a cool-down and its one trial: failing, and not kept."""
        return self.failures >= EJECT_AFTER and not self.kept

    def usable(self, now: float) -> bool:
        if not self.ejected():
            return True
        if now < self.ejected_until:
            return False
        return not self.trial  # cool-down over: exactly one trial request

    def cool_down_left(self, now: float) -> float:
        return max(0.0, self.ejected_until - now)


class Pool:
    """Health and load of every upstream, with the ejection rule of SPEC §2."""

    def __init__(self) -> None:
        self.on_change: Callable[[], None] | None = None  # an upstream was ejected or came back
        self.health: dict[str, Health] = {}
        self.region_of: dict[str, str] = {}
        self.models_of: dict[str, frozenset[str]] = {}  # the LowRouter ids each serves
        self.capacity: dict[str, int] = {}
        self._auth_logged: dict[str, Seldom] = {}  # auth_refused's line, per upstream
        self._full_logged: dict[tuple[str, ...], Seldom] = {}  # at_capacity's line
        self._identity: dict[str, bytes] = {}  # `identity` of each upstream, by name

    def configure(self, upstreams: Iterable[Upstream],
                  identities: Mapping[str, bytes] | None = None) -> None:
        """Adopt a (new) config: keep the state of upstreams that stay, drop the rest.

        `identities` (`identity` of each upstream's target): one whose identity changed
        (its URL, key, proxy or CA bundle) is a new upstream, with fresh health: its
        failures were those of what it was (a wrong key's 401s, a wrong URL's refused
        connections), and the reload that mends it must not leave it cooling down."""
        ups = list(upstreams)
        ids = dict(identities or {})
        old = self.health
        changed = {n for n, d in ids.items() if self._identity.get(n, d) != d}
        self.health = {u.name: (None if u.name in changed else old.get(u.name)) or Health()
                       for u in ups}
        for name in sorted(changed):
            h = old.get(name)
            if h is not None and h.failures:
                log.info("upstream %s changed (its URL, key, proxy or CA bundle): its "
                         "failures are forgotten, it is tried as a new upstream", name)
        self._identity = ids
        self.region_of = {u.name: u.region for u in ups}
        self.models_of = {u.name: frozenset(u.models) for u in ups}
        self.capacity = {u.name: u.max_concurrency or NO_CAP for u in ups}
        # An ejected upstream that the new config leaves its region's last usable one
        # (the others removed, or no longer serving one of its models) is kept, as its
        # ejection would have been under this config: else that region's pinned
        # requests got 503 for the rest of its cool-down, though the last usable
        # upstream of a region is never ejected (SPEC §2). In config order: the first
        # kept counts for the next.
        for name, h in self.health.items():
            if h.ejected() and self._last_of_region(name):
                h.kept = True
                log.warning("upstream %s, ejected, is left by the reload region %s's last "
                            "usable upstream for a model it serves: kept, and tried last "
                            "for the rest of its cool-down", name, self.region_of[name])

    # A request routes on the config it began with (SPEC §6), which may name upstreams
    # that a reload has removed since: those are tried as they were, untracked.

    def usable(self, name: str, now: float) -> bool:
        h = self.health.get(name)
        return h is None or h.failures < EJECT_AFTER or h.usable(now)  # the usual case first

    def last_resort(self, name: str, now: float) -> bool:
        """True for a failing upstream kept only as its region's last usable one (for one
        of its models, `_last_of_region`), for the cool-down an ejection would have had
        and while its trial after it is out: its region's pinned requests still go to it,
        other requests to it last (SPEC §2)."""
        h = self.health.get(name)
        return h is not None and h.kept and (now < h.ejected_until or h.trial)

    def load(self, name: str) -> int:
        h = self.health.get(name)
        return 0 if h is None else h.outstanding

    def acquire(self, name: str, now: float) -> tuple[Health | None, bool]:
        """One more request in flight: the `Health` it counts on, for `release`, and
        True if it is the trial after a cool-down, which ends with `succeeded`, `failed`
        or (no verdict) `abandoned`."""
        h = self.health.get(name)
        if h is None:
            return None, False
        h.outstanding += 1
        # (only one: a kept upstream, usable while its trial is out, takes other requests)
        if h.failures >= EJECT_AFTER and now >= h.ejected_until and not h.trial:
            h.trial = True
            return h, True
        return h, False

    @staticmethod
    def release(held: Health | None) -> None:
        """The request that `acquire` counted on `held` has ended. The very object, not
        the name's: a reload that removed the upstream and the next that added it back
        have given the name a new `Health`, whose count this request is not in."""
        if held is not None:
            held.outstanding -= 1

    # A verdict counts for the upstream's state as it was when its request was sent: an
    # answer to a request sent before the ejection (a slow one, in flight meanwhile)
    # neither lengthens the cool-down nor ends it; only the trial's verdict does.

    def _judged(self, name: str, held: Health | None) -> Health | None:
        """The Health a verdict is for: `held`, the one its request was counted on
        (`acquire`), while it is still the name's; none once a reload that removed the
        upstream and one that added it back have replaced it. Without `held`, the name's."""
        h = self.health.get(name)
        return h if held is None or h is held else None

    def succeeded(self, name: str, trial: bool = False, held: Health | None = None) -> None:
        h = self._judged(name, held)
        if h is not None and h.failures:
            if h.ejected() and not trial:
                return  # only the trial lets it back (SPEC §2)
            was_ejected = h.ejections > 0
            h.failures = h.ejections = 0
            h.ejected_until = 0.0
            h.trial = h.kept = False
            if was_ejected:
                log.info("upstream %s is usable again: it answered", name)
                if self.on_change is not None:
                    self.on_change()

    def abandoned(self, name: str, held: Health | None = None) -> None:
        """The trial after a cool-down ended with no verdict on the upstream (its client
        left first, the proxy's own limit): the counts stay, another trial may go. Only
        for the attempt that `acquire` made the trial."""
        h = self._judged(name, held)
        if h is not None:
            h.trial = False

    def failed(self, name: str, now: float, retry_after: float | None = None,
               trial: bool = False, held: Health | None = None, why: str = "") -> None:
        """One failure of `name` (`why`: its kind, for the log line of an ejection)."""
        h = self._judged(name, held)
        if h is None or (h.failures >= EJECT_AFTER and not trial):
            return  # ejected already: a late failure does not eject it again
        h.failures += 1
        h.trial = False
        if h.failures < EJECT_AFTER:
            return
        h.ejections += 1
        cool = min(COOL_DOWN_S * h.ejections, COOL_DOWN_CAP_S)
        if retry_after is not None:
            cool = max(cool, min(retry_after, COOL_DOWN_CAP_S))
        h.ejected_until = now + cool
        # The last usable upstream of a region (for one of its models) is never ejected,
        # but kept: for the cool-down, and while the trial after it is out, requests that
        # may go elsewhere try it last: a dead region must not hold up every unpinned
        # request (or, with retries spent on it, fail them)
        h.kept = self._last_of_region(name)
        # One line per ejection (as nginx's "upstream server temporarily disabled"): at
        # most one per cool-down of each upstream, however many requests fail meanwhile
        if h.kept:
            log.warning("upstream %s failed %d times in a row (the last: %s); kept, as "
                        "region %s's last usable upstream for a model it serves, and "
                        "tried last for %g s", name, h.failures, why or "unknown",
                        self.region_of.get(name, "?"), cool)
        else:
            log.warning("upstream %s ejected for %g s after %d failures in a row (the "
                        "last: %s)", name, cool, h.failures, why or "unknown")
        if self.on_change is not None:
            self.on_change()
            if not h.kept:  # and again when the cool-down ends, for the usable gauge
                # (nothing else happens then: the next request finds it usable)
                with contextlib.suppress(RuntimeError):  # no loop: a unit test's pool
                    asyncio.get_running_loop().call_later(cool, self._cooled)

    def auth_refused(self, name: str, status: int | None) -> None:
        """The upstream refused the proxy's own key (401/403): the operator's to mend
        (a revoked or rotated provider key), said once a minute at most per upstream."""
        if self._auth_logged.setdefault(name, Seldom(60.0)).due():
            log.error("upstream %s refused the proxy's key (%s): check its api_key_env or "
                      "api_key_file", name, status)

    def at_capacity(self, names: tuple[str, ...]) -> None:
        """A request refused (503) as every upstream it may take is at its max_concurrency:
        said once a minute at most per set of upstreams, as nginx says "no live upstreams",
        for the operator to raise the caps or add upstreams."""
        if self._full_logged.setdefault(names, Seldom(60.0)).due():
            caps = ", ".join(f"{n} ({self.capacity.get(n, '?')})" for n in names)
            log.warning("every upstream a request may take is at its max_concurrency: %s; "
                        "such requests get 503 no_upstream_available", caps)

    def _last_of_region(self, name: str) -> bool:
        """Whether `name` is its region's last usable upstream (SPEC §2), or its region's
        last usable one for one of the models it serves: ejecting it would leave that
        model's pinned requests in the region nowhere to go (503) while it may still
        answer some, as Envoy's panic threshold keeps a cluster's last hosts.

        The others that count are the healthy and the kept: not one ejected whose
        cool-down is over, usable for its one trial only (once that trial is out, the
        region would have none)."""
        region, mine = self.region_of[name], self.models_of[name]
        others = [n for n, r in self.region_of.items()
                  if r == region and n != name and not self.health[n].ejected()]
        return not others or not mine <= frozenset().union(*(self.models_of[n] for n in others))

    def _cooled(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def retry_after(self, names: Iterable[str], now: float) -> float:
        """Seconds until the first of these upstreams may be tried again (at least 1)."""
        waits = [self.health[n].cool_down_left(now) for n in names if n in self.health]
        return max(1.0, min(waits, default=1.0))


RETRY_AFTER_CAP_S: Final = 86400.0  # a day: a provider's daily quota, spent


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header: a number of seconds or an HTTP date (from
    `now`, a Unix time, by default the clock's), at most RETRY_AFTER_CAP_S; None for
    anything else. The cool-down takes at most COOL_DOWN_CAP_S of it, the client all."""
    if value is None:
        return None
    try:
        s = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):  # (a year 10**20)
            return None
        if when.tzinfo is None:  # (-0000: no zone said) an HTTP date is in GMT
            when = when.replace(tzinfo=dt.UTC)
        s = max(0.0, when.timestamp() - (time.time() if now is None else now))
    if not 0 <= s < math.inf:  # (NaN fails both)
        return None
    return min(s, RETRY_AFTER_CAP_S)


@attrs.frozen
class Target:
    """Everything needed to send to one upstream, prepared once per config."""

    upstream: Upstream
    chat_url: str
    embeddings_url: str
    auth: str | None  # the Authorization header value
    ssl_context: ssl.SSLContext | None
    proxy: str | None
    # CIMultiDicts: aiohttp makes one of a request's headers, and a copy of these costs
    # less than one made from a dict.
    json_headers: CIMultiDict[str] = attrs.field(init=False)
    stream_headers: CIMultiDict[str] = attrs.field(init=False)
    post_options: dict[str, Any] = attrs.field(init=False)  # only what differs from defaults
    secret: bytes = attrs.field(init=False)  # the key itself, that no answer may quote
    # How `send` posts to it (`_Direct`, or False: through the ClientSession), found at
    # its first request, in the running loop
    direct: _Direct | Literal[False] | None = attrs.field(init=False, default=None, eq=False)

    def __attrs_post_init__(self) -> None:
        # Nothing of the client's goes upstream: these headers are the whole set.
        base = {"Content-Type": "application/json", "Accept-Encoding": "identity",
                "User-Agent": USER_AGENT}
        if self.auth is not None:
            base["Authorization"] = self.auth
        object.__setattr__(self, "json_headers",
                           CIMultiDict({**base, "Accept": "application/json"}))
        object.__setattr__(self, "stream_headers",
                           CIMultiDict({**base, "Accept": "text/event-stream"}))
        opts: dict[str, Any] = {}
        if self.ssl_context is not None:
            opts["ssl"] = self.ssl_context
        if self.proxy is not None:
            opts["proxy"] = self.proxy
        object.__setattr__(self, "post_options", opts)
        object.__setattr__(self, "secret",
                           self.auth.partition(" ")[2].encode() if self.auth else b"")


def identity(target: Target) -> bytes:
    """A digest of what an upstream's passive health is about: its URLs, its key (only
    this digest of it is kept), its proxy and the CA certificates it trusts (the bundle's
    content, as loaded: one mended in place is a change too)."""
    ctx = target.ssl_context
    cas = None if ctx is None else [hashlib.sha256(c).hexdigest()
                                    for c in ctx.get_ca_certs(binary_form=True)]
    parts = [target.chat_url, target.embeddings_url, target.auth, target.proxy, cas]
    return hashlib.sha256(orjson.dumps(parts)).digest()


def make_targets(config: Config, secrets: Secrets) -> dict[str, Target]:
    """Each upstream's target; raises nothing (resolve_secrets has read every file)."""
    out = {}
    for u in config.upstreams:
        key = secrets.upstream_keys.get(u.name)
        out[u.name] = Target(
            u, u.base_url + "/chat/completions", u.base_url + "/embeddings",
            f"Bearer {key}" if key else None, secrets.ca_contexts.get(u.name), u.proxy,
        )
    return out


# The task running now, given its loop: on Python 3.11 asyncio.current_task() is a Python
# function around this C dict's get(); where that dict is not there, the function itself.
# Either returns None for a loop of None (not known yet): callers fall back on
# asyncio.current_task().
_current_tasks = getattr(asyncio.tasks, "_current_tasks", None)
task_of: Final[Callable[[asyncio.AbstractEventLoop | None], asyncio.Task[Any] | None]] = (
    _current_tasks.get
    if isinstance(_current_tasks, dict) and isinstance(asyncio.current_task, types.FunctionType)
    else asyncio.current_task)


class Deadlines:
    """Deadlines of many tasks on one timer.

    `asyncio.timeout()` creates and cancels a timer per use (~8 µs on uvloop here), and
    upstream calls nearly always end long before theirs. Here a deadline is a `Watch`:
    arming one moves no timer unless it is due before the timer fires; the one timer
    wakes at the earliest deadline armed, cancels the tasks that are overdue, and
    re-arms at the earliest one left. `timeout()` is a `with` block over a Watch of its
    own; a loop of waits (a stream's reads) keeps one Watch and re-arms it each wait.
    """

    __slots__ = ("_due", "_loop", "_timer", "due_at")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """`loop`: the one all its tasks run in, when known; it spares `timeout()` a
        get_running_loop() (on Python 3.11 a getpid() system call each). A Deadlines
        serves one loop: the first it is used in, when not given one."""
        self._due: set[Watch] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.due_at = math.inf  # when the timer fires
        self._loop = loop

    def timeout(self, seconds: float) -> _Deadline:
        """`with deadlines.timeout(s):` is `async with asyncio.timeout(s):` on the shared
        timer: the current task's own expiry becomes TimeoutError, any other cancel
        stays a CancelledError."""
        task = task_of(self._loop) or asyncio.current_task()
        assert task is not None
        self._loop = loop = task.get_loop()
        return _Deadline(self, task, loop.time() + seconds)

    def watch(self, task: asyncio.Task[Any]) -> Watch:
        """A deadline that `task` moves itself, for a loop of waits; `close()` it after.

        Before each wait `w.arm(t)`, after it `w.armed = False`; when the wait raises
        CancelledError, `w.expired()` tells whether it was this deadline's. Unarmed (the
        task busy elsewhere, e.g. writing to its client), it cancels nothing.
        """
        self._loop = task.get_loop()
        w = Watch(self, task, math.inf)
        self._due.add(w)
        return w

    def _schedule(self, when: float) -> None:
        """Make the timer fire at `when`, an armed deadline earlier than the timer's."""
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop
        assert loop is not None
        self.due_at = when
        self._timer = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        loop = self._loop
        assert loop is not None
        self._timer, self.due_at = None, math.inf
        now, nxt = loop.time(), math.inf
        for w in self._due:
            if not w.armed or w.fired:
                continue
            # (a write's client still taking it moves its deadline on: Watch.took)
            if w.when <= now and (w.client is None or now >= w.until or not w.took(now)):
                w.fired = True
                w.task.cancel()
                continue
            if w.when < nxt:
                nxt = w.when
        if nxt < math.inf:
            self._schedule(nxt)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self.due_at = None, math.inf


class Watch:
    """One task's deadline on a `Deadlines` timer (see `Deadlines.watch`)."""

    __slots__ = ("_owner", "armed", "base", "client", "fired", "idle_s", "left", "moved",
                 "task", "until", "when")

    def __init__(self, owner: Deadlines, task: asyncio.Task[Any], when: float) -> None:
        self._owner, self.task, self.when = owner, task, when
        self.armed = self.fired = False
        self.base = task.cancelling()  # cancels that are not ours
        self.client: asyncio.BaseTransport | None = None  # a write's (arm_send)
        self.left, self.moved, self.idle_s, self.until = -1, 0.0, math.inf, math.inf

    def arm_send(self, now: float, client: asyncio.BaseTransport, idle_s: float,
                 until: float) -> None:
        """For a write to `client` that waits for it to read: due once none of what it
        has been sent is taken for `idle_s` (nginx's send_timeout, which runs from the
        peer's last read), or at `until`. Looked at every SEND_LOOKS-th of `idle_s`."""
        self.client, self.left, self.moved, self.idle_s, self.until = (
            client, -1, now, idle_s, until)
        self.arm(min(until, now + idle_s / SEND_LOOKS))

    def took(self, now: float) -> bool:
        """(Due, armed by arm_send.) Whether to wait on: the client has taken some of
        it within `idle_s`; the deadline is then moved to the next look."""
        assert self.client is not None
        left = unsent(self.client)
        if 0 <= left < self.left:
            self.moved = now
        self.left = left
        if now - self.moved >= self.idle_s:
            return False
        self.when = min(self.until, now + self.idle_s / SEND_LOOKS, self.moved + self.idle_s)
        return True

    def arm(self, when: float) -> None:
        self.when = when
        self.armed = True
        if when < self._owner.due_at:
            self._owner._schedule(when)

    def expired(self) -> bool:
        """Disarm. True when this deadline passed while armed and its cancel was the
        task's only one: the caller then turns its CancelledError into a timeout."""
        self.armed = False
        self.client = None
        if not self.fired:
            return False
        self.fired = False
        return self.task.uncancel() <= self.base

    def close(self) -> None:
        self.armed = False
        self._owner._due.discard(self)


class _Deadline(Watch):
    """`Deadlines.timeout()`: a Watch armed for one `with` block."""

    __slots__ = ()

    # arm(), close() and expired() inline: this is on every upstream call's path.

    def __enter__(self) -> None:
        owner = self._owner
        owner._due.add(self)
        self.armed = True
        if self.when < owner.due_at:
            owner._schedule(self.when)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.armed = False
        self._owner._due.discard(self)
        if self.fired:
            self.fired = False
            if self.task.uncancel() <= self.base and kind is asyncio.CancelledError:
                raise TimeoutError from exc


class UpstreamResponse:
    """An upstream answer whose status is 2xx or a client error to pass through.

    Made by `send` from aiohttp's ClientResponse, or from what `_Direct.post` read: the
    parsed head, the body's reader and the pooled connection itself (`_conn`). Either
    way the connection goes back to the pool once the body is read to its end.
    """

    __slots__ = ("_conn", "_resp", "_takes", "content", "headers", "status")

    def __init__(self, status: int, headers: CIMultiDictProxy[str], content: aiohttp.StreamReader,
                 resp: aiohttp.ClientResponse | None = None, conn: Any = None) -> None:
        self.status, self.headers, self.content = status, headers, content
        self._resp, self._conn = resp, conn
        self._takes = resp is None and _TAKE_BUFFERED  # (read_some)
        if conn is not None:
            content.on_eof(self._at_eof)  # as aiohttp's own response does

    def _at_eof(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        transport = conn.transport
        if transport is not None and transport.get_write_buffer_size():
            # The answer ended before the request's body was all out (a 413 from the
            # head alone, say): the rest would go out ahead of the next request on this
            # connection, so it closes, as aiohttp's own response closes it then.
            conn.close()
        else:
            conn.release()

    @property
    def content_type(self) -> str:
        """The media type as aiohttp's own response gives it (lowercased, without
        parameters, "application/octet-stream" when there is none); read only for a
        stream request's answer."""
        return _MediaType(self.headers).content_type

    async def read_some(self) -> bytes:
        """The next bytes of the body, b"" at its end; raises UpstreamError if cut.

        Through _Direct, buffered bytes are taken in one step (`_take_buffered`) until
        the connection is seen paused for a full buffer: from then on aiohttp's parser
        may keep a later read's bytes back (its pause outlives the protocol's), which
        only `readany`, resuming it after each chunk it takes, brings in.
        """
        content = self.content
        try:
            if self._takes:
                if not content._buffer and not content._eof and content._exception is None:
                    await content._wait("readany")  # (readany's own wait)
                if data := _take_buffered(content):
                    return data
                self._takes = not content._protocol._reading_paused
            return await content.readany()
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamConnectionLost(f"upstream connection lost: {_why(e)}") from _untraced(e)

    def read_complete(self) -> bytes | None:
        """The whole body when it has already arrived (usual for a JSON answer), else None.

        Saves the deadlines and the read loop of `relay._read_answer` on the common path.
        """
        content = self.content
        if not content.is_eof():
            return None
        try:
            if self._takes and (data := _take_buffered(content)):
                return data
            return content.read_nowait()
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamConnectionLost(f"upstream connection lost: {_why(e)}") from _untraced(e)

    def done(self) -> bool:
        """True when the whole body has been read (the connection can go back)."""
        return self.content.is_eof()

    def gone(self) -> bool:
        """True when the connection has closed under a body not at its end: asked after
        a read waited in vain. aiohttp leaves that read waiting for ever when its parser
        fails on the body (a chunk size that is no number, from a broken middlebox): it
        closes the connection but tells the body's reader nothing."""
        conn = self._conn if self._resp is None else self._resp.connection
        proto = None if conn is None else conn.protocol
        return not self.content.is_eof() and (proto is None or not proto.is_connected())

    async def finish(self, deadlines: Deadlines, limit: int = 65536, timeout: float = 1.0) -> None:
        """Read the rest of a body the relay is done with, then release the connection.

        A stream is done at its [DONE] event, which may come before the chunked
        encoding's end. Releasing a body not read to its end closes the connection,
        and the next request pays a new TCP connection (and TLS): read the rest first,
        unless it is over `limit` bytes or takes over `timeout` seconds.
        """
        size = 0
        try:
            with deadlines.timeout(timeout):
                while size <= limit and (data := await self.content.readany()):
                    size += len(data)
        except (TimeoutError, aiohttp.ClientError, OSError):
            size = limit + 1
        except BaseException:  # the proxy stops
            self.close()
            raise
        if size > limit:
            self.close()
        else:
            self.release()

    def close(self) -> None:
        """Drop the connection: the upstream stops generating (client gone, error)."""
        if self._resp is not None:
            self._resp.close()
            return
        content = self.content
        if content.exception() is None:  # a read still waiting ends, as aiohttp's does
            content.set_exception(aiohttp.ClientConnectionError("Connection closed"))
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def release(self) -> None:
        """Give a fully read connection back to the pool (one not read to its end is
        closed: the pool takes back only a connection whose answer has ended)."""
        if self._resp is not None:
            self._resp.release()
        else:
            self._at_eof()


class _MediaType(aiohttp.helpers.HeadersMixin):
    """aiohttp's parse of a Content-Type header, for an answer read past ClientResponse."""

    def __init__(self, headers: CIMultiDictProxy[str]) -> None:
        self._headers = headers


async def send(
    session: aiohttp.ClientSession,
    target: Target,
    chat: bool,
    stream: bool,
    body: bytes,
    request_id: str,
    deadlines: Deadlines,
    timeout: float,
    client_timeout: aiohttp.ClientTimeout,
) -> UpstreamResponse:
    """POST to an upstream; raises UpstreamFailed for what may fail over (SPEC §1, §2).

    `timeout` bounds the time until the response headers. Redirects are never followed:
    they would carry our key to another host. The request goes out on aiohttp's pooled
    connection directly (`_Direct`) where it can; else through the ClientSession.
    """
    direct = target.direct
    if direct is None:
        direct = _Direct.of(target, session)
        object.__setattr__(target, "direct", direct)  # (a frozen attrs class)
    try:
        with deadlines.timeout(timeout):
            if direct:
                status, headers, content, conn = await direct.post(
                    chat, stream, body, request_id, client_timeout)
                resp = None
            else:
                req_headers = (target.stream_headers if stream else target.json_headers).copy()
                req_headers["X-Request-Id"] = request_id
                resp = await session.post(
                    # aiohttp writes bytes over 1 MiB in one go, with a warning; BytesIO
                    # streams them.
                    target.chat_url if chat else target.embeddings_url,
                    data=body if len(body) < _LARGE_BODY else io.BytesIO(body),
                    headers=req_headers, allow_redirects=False, timeout=client_timeout,
                    **target.post_options,
                )
                status, headers, content, conn = resp.status, resp.headers, resp.content, None
    except TimeoutError as e:  # ours, or aiohttp's ServerTimeoutError (one too)
        raise UpstreamTimeout("upstream did not answer in time") from _untraced(e)
    except aiohttp.ClientHttpProxyError as e:  # the egress proxy refused the CONNECT
        raise UpstreamError(f"upstream connection failed: {_why(e)}") from _untraced(e)
    except (aiohttp.ClientResponseError, HttpProcessingError) as e:
        # it answered, but no HTTP it could parse
        raise UpstreamBadResponse("upstream answered no valid HTTP") from _untraced(e)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
        if isinstance(e, aiohttp.ClientConnectorError):  # (a ClientOSError too)
            if e.os_error.errno in (errno.EMFILE, errno.ENFILE):
                raise _out_of_files(target.upstream.name) from _untraced(e)
            raise UpstreamError(f"upstream connection failed: {_why(e)}") from _untraced(e)
        raise UpstreamConnectionLost(  # connected, then cut before its answer's headers
            f"upstream connection lost: {_why(e)}") from _untraced(e)
    except (aiohttp.ClientError, OSError) as e:
        raise UpstreamError(f"upstream connection failed: {_why(e)}") from _untraced(e)
    answer = UpstreamResponse(status, headers, content, resp, conn)
    if status < 300 or (400 <= status < 500 and status not in (401, 403, 407, 429)):
        if status < 300 and "Content-Encoding" in headers:
            # The proxy asks for no coding (`Accept-Encoding: identity`) and reads every
            # answer as it comes: a compressed success would fail as a body "not JSON"
            # or a stream "ended before any event", saying nothing of the cause
            coding = body_coding(headers)
            if coding is not None:
                answer.close()
                raise UpstreamBadResponse(
                    f"the upstream answered with its body compressed (Content-Encoding: "
                    f"{coding}), which the proxy did not ask for")
        return answer
    retry_after = parse_retry_after(headers.get("Retry-After"))
    answer.close()
    err: UpstreamFailed
    if status == 407:
        # A forward proxy's refusal (to a plain-http upstream it answers the request
        # itself): the egress failed, as when it refuses a CONNECT (no upstream status:
        # counted as connect_error), never the client's request, which a passed-on 407
        # would tell the SDK.
        err = UpstreamError(f"upstream connection failed: {_EGRESS_REFUSED} (407)")
    elif status in (401, 403):
        # The upstream's text may echo our key: never pass it on (SPEC §1).
        err = UpstreamAuthFailed("the upstream rejected the proxy's credentials")
    elif status < 400:
        err = UpstreamError(f"upstream answered with a redirect ({status}); not followed")
    else:
        err = UpstreamError(f"upstream answered {status}")
    err.upstream_status = None if status == 407 else status
    err.retry_after = retry_after
    try:
        raise err
    finally:
        del err  # (see relay._try_candidates)


def body_coding(headers: CIMultiDictProxy[str]) -> str | None:
    """The compressions an answer's `Content-Encoding` names, or None when it names
    none. A value that is no compression (`UTF-8`, a server's known misconfiguration
    over a plain body) is not one: such a body is read as it comes (and fails as "not
    JSON" if it is not plain after all)."""
    known = [c for v in headers.getall("Content-Encoding", ()) for part in v.split(",")
             if (c := part.strip().lower()) in _CODINGS]
    return ", ".join(dict.fromkeys(known)) if known else None


_CODINGS: Final = frozenset(("gzip", "x-gzip", "deflate", "br", "zstd", "compress", "x-compress"))


def _untraced(e: BaseException) -> BaseException:
    """`e`, and the exceptions behind it, without their tracebacks: kept as the cause of
    the UpstreamFailed that says what failed, they would hold the frames they passed
    through (`send`'s and `_Direct.post`'s with the request's body; aiohttp's connector's,
    which hold them in turn: a cycle) until the cyclic GC ran, ~3 bodies per request
    that an upstream down refused. Their messages and types stay; no log shows their
    tracebacks (an upstream's failure is one line)."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        x.__traceback__ = None
        x = x.__cause__ or x.__context__
    return e


def _response_params() -> dict[str, Any] | None:
    """The arguments of aiohttp's `ResponseHandler.set_response_params` for a POST's
    answer, as a ClientSession of ours sets them (its defaults, no decompression, read
    to the connection's end when no length is given); None where this aiohttp's
    internals are not as `_Direct` needs them, which then is not used."""
    try:
        from aiohttp.client_proto import ResponseHandler
        from aiohttp.connector import Connection

        have = inspect.signature(ResponseHandler.set_response_params).parameters
        defaults = inspect.signature(aiohttp.ClientSession.__init__).parameters
        if not (callable(getattr(ResponseHandler, "read", None))
                and isinstance(getattr(Connection, "transport", None), property)
                and {"skip_payload", "read_until_eof", "auto_decompress", "read_timeout",
                     "read_bufsize", "max_line_size", "max_field_size"} <= set(have)):
            return None
        params: dict[str, Any] = {"skip_payload": False, "read_until_eof": True,
                                  "auto_decompress": False, "read_timeout": None}
        for name in ("read_bufsize", "max_line_size", "max_field_size", "max_headers"):
            if name in have and name in defaults:
                params[name] = defaults[name].default
        return params
    except Exception:  # any surprise: the ClientSession's way
        return None


_RESPONSE_PARAMS: Final = _response_params()


def _take_buffered_ok() -> bool:
    """Whether this aiohttp's StreamReader and protocol hold the fields `_take_buffered`
    reads and writes (3.14's do); else reads go through `readany`."""
    try:
        from aiohttp.base_protocol import BaseProtocol

        return ({"_buffer", "_buffer_offset", "_cursor", "_eof", "_exception",
                 "_http_chunk_splits", "_protocol", "_size", "_timer"}
                <= set(getattr(aiohttp.StreamReader, "__slots__", ()))
                and "_reading_paused" in getattr(BaseProtocol, "__slots__", ())
                and callable(getattr(aiohttp.StreamReader, "_wait", None)))
    except Exception:  # any surprise: aiohttp's own way
        return False


_TAKE_BUFFERED: Final = _RESPONSE_PARAMS is not None and _take_buffered_ok()


def _take_buffered(content: Any) -> bytes:
    """What `content.readany()` returns when the body's bytes are buffered, without its
    cost per HTTP chunk: aiohttp takes the buffer's chunks one by one, and after each
    calls the protocol's `resume_reading`, which re-feeds its parser an empty read and
    resumes the transport, paused or not (bench/RESULTS.md, round 17: 15 % of the
    instructions of a stream of 25 chunks). b"" when there is nothing to take this way
    (aiohttp's own read then runs): nothing buffered, a partial read's offset, a failed
    body, or a protocol paused for a full buffer, which must resume."""
    buf = content._buffer
    if (not buf or content._buffer_offset or content._exception is not None
            or content._protocol._reading_paused):
        return b""
    data: bytes = buf[0] if len(buf) == 1 else b"".join(buf)
    buf.clear()
    content._size -= len(data)
    cursor = content._cursor = content._cursor + len(data)
    splits = content._http_chunk_splits
    while splits and splits[0] < cursor:  # (as aiohttp drops those behind the cursor)
        splits.popleft()
    return data


_NO_TRACES: Final[list[Any]] = []  # (the connector only iterates it)
# A body this long goes out in a write of its own, not copied behind the head
_JOIN_BODY: Final = 64 * 1024


class _Direct:
    """A target's POSTs written on a pooled connection of the session's connector, the
    answer read from aiohttp's own protocol and parser, past the ClientSession.

    `ClientSession.post` builds a ClientRequest and a ClientResponse with their timer,
    tracing, cookie and header machinery for every request: about half the CPU of an
    upstream call (bench/RESULTS.md). The connector (pool, DNS cache, TLS, keep-alive)
    and the HTTP parser are aiohttp's, as before; the request head is written here,
    bytes for bytes what aiohttp writes (tests/test_upstream.py compares them). Used for
    a target with no egress proxy, in a session that reads no proxy from the
    environment, on an aiohttp whose internals are as `_response_params` checks.
    """

    __slots__ = ("connector", "heads", "req")

    def __init__(self, connector: aiohttp.BaseConnector, req: Any, heads: tuple[bytes, ...]):
        self.connector, self.req, self.heads = connector, req, heads

    @classmethod
    def of(cls, target: Target, session: aiohttp.ClientSession) -> _Direct | Literal[False]:
        """The target's `_Direct`, or False where the ClientSession must send."""
        connector = session.connector
        if (_RESPONSE_PARAMS is None or target.proxy is not None or session.trust_env
                or connector is None):
            return False
        try:
            # The connector keys its pool by what a ClientRequest says of the URL's host,
            # port and TLS: one made once stands for every request to the target.
            req = aiohttp.ClientRequest(
                "POST", URL(target.chat_url), loop=asyncio.get_running_loop(),
                session=session, ssl=target.ssl_context or True)
            heads: list[bytes] = []
            for url in (target.embeddings_url, target.chat_url):  # (heads[chat * 2 + stream])
                for headers in (target.json_headers, target.stream_headers):
                    lines = [f"POST {URL(url).raw_path_qs} HTTP/1.1",
                             f"Host: {req.headers['Host']}",
                             *(f"{k}: {v}" for k, v in headers.items())]
                    if any("\r" in line or "\n" in line for line in lines):
                        return False  # aiohttp refuses such a header: let it say so
                    heads.append("\r\n".join((*lines, "X-Request-Id: ")).encode())
            return cls(connector, req, tuple(heads))
        except Exception:  # any surprise: the ClientSession's way
            log.debug("upstream %s: sent through the ClientSession", target.upstream.name,
                      exc_info=True)
            return False

    async def post(self, chat: bool, stream: bool, body: bytes, request_id: str,
                   timeout: aiohttp.ClientTimeout,
                   ) -> tuple[int, CIMultiDictProxy[str], aiohttp.StreamReader, Any]:
        # _Connector.connect's work, inline: its coroutine around the base class's would
        # cost ~5 k instructions a request (1 %); its loop only for a stale connection
        try:
            conn = await aiohttp.TCPConnector.connect(self.connector, self.req, _NO_TRACES,
                                                      timeout)
        except aiohttp.ServerDisconnectedError as e:
            raise _ClosedWhileConnecting.of(self.req) from e
        if _stale(conn, self.req):
            conn.close()
            conn = await self.connector.connect(self.req, traces=_NO_TRACES, timeout=timeout)
        try:
            proto = conn.protocol
            transport = conn.transport
            if proto is None or transport is None or transport.is_closing():
                raise aiohttp.ServerDisconnectedError()
            proto.set_response_params(**_RESPONSE_PARAMS)  # type: ignore[arg-type]
            head = self.heads[chat * 2 + stream]
            if len(body) < _JOIN_BODY:
                transport.write(b"%b%b\r\nContent-Length: %d\r\n\r\n%b" % (
                    head, request_id.encode(), len(body), body))
            else:
                transport.write(b"%b%b\r\nContent-Length: %d\r\n\r\n" % (
                    head, request_id.encode(), len(body)))
                transport.write(body)
            while True:
                message, content = await proto.read()
                code = message.code
                if code < 100 or code > 199 or code == 101:  # (1xx: the answer follows)
                    return code, message.headers, content, conn
        except BaseException:
            conn.close()
            raise


_out_of_files_logged: Final = Seldom(60.0)
_DNS_ERROR: Final[type[BaseException]] = getattr(aiohttp, "ClientConnectorDNSError",
                                                 socket.gaierror)  # (aiohttp 3.10 on)
# What broke, in words, for messages a client reads (not aiohttp's class names)
_UNRESOLVED: Final = "the upstream's host name did not resolve"
_EGRESS_REFUSED: Final = "the egress proxy refused it"
_WHY: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (_DNS_ERROR, _UNRESOLVED),
    (aiohttp.ClientHttpProxyError, _EGRESS_REFUSED),
    (aiohttp.ClientSSLError, "TLS failed"),
    (aiohttp.ServerDisconnectedError, "the upstream closed it"),
    (aiohttp.ClientPayloadError, "the answer's body broke off"),
    (aiohttp.ServerFingerprintMismatch, "TLS failed"),
)


def _why(e: BaseException) -> str:
    """A failure of an upstream connection in plain words: the system's for an OS error
    ("Connection refused"), else what the kind of failure means."""
    if isinstance(e, _ClosedWhileConnecting):
        return str(e)
    for kind, words in _WHY:
        if isinstance(e, kind):
            return words
    os_error = getattr(e, "os_error", e)  # a ClientConnectorError's cause
    if isinstance(os_error, socket.gaierror):  # (before aiohttp 3.10)
        return _UNRESOLVED
    if isinstance(os_error, OSError) and os_error.errno and os_error.errno > 0:
        return os.strerror(os_error.errno)  # (its strerror may name the upstream's
    return "the connection failed"  # address: asyncio's connect's does)


def _out_of_files(name: str) -> NoUpstreamAvailable:
    """The proxy's own shortage, not the upstream's failure: its health stays as it was,
    the client gets a 503 to retry, and the operator a log line (once a minute)."""
    if _out_of_files_logged.due():
        log.error("out of open files connecting to upstream %s: raise the limit "
                  "(LimitNOFILE=) or lower server.max_connections", name)
    return NoUpstreamAvailable("The proxy is out of open files; retry later.", retry_after=1)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, but a pooled connection that got bytes while it was idle is
    closed, not used: the upstream's answer nobody asked for (a second answer, a 408
    before it closes) would be read as the next request's, and every answer on it
    after that one request late (nginx closes such a connection too)."""

    async def connect(self, req: aiohttp.ClientRequest, traces: list[Any],
                      timeout: aiohttp.ClientTimeout) -> Any:
        try:
            conn = await super().connect(req, traces, timeout)
            for _ in range(_STALE_TRIES):  # each the pool's next connection, or a new one
                if not _stale(conn, req):
                    break
                conn.close()
                conn = await super().connect(req, traces, timeout)
            return conn
        except aiohttp.ServerDisconnectedError as e:
            raise _ClosedWhileConnecting.of(req) from e


def _stale(conn: Any, req: aiohttp.ClientRequest) -> bool:
    """A connection from the pool that got bytes while idle (should_close: a parsed
    answer waiting, bytes past one, an error, or an answer that asked to close; a
    connection went into the pool with none of them)."""
    if conn.protocol is None or not conn.protocol.should_close:
        return False
    log.debug("upstream connection to %s:%s got bytes while idle: closed", req.host, req.port)
    return True


class _ClosedWhileConnecting(aiohttp.ClientConnectionError):
    """A connection closed before it was made (a connect failure, `_why` says whose)."""

    @classmethod
    def of(cls, req: aiohttp.ClientRequest) -> _ClosedWhileConnecting:
        # before the answer to CONNECT (an egress proxy's doing), not the upstream's
        # cut after a request
        return cls("the egress proxy closed it" if req.proxy is not None
                   else "the upstream closed it while connecting")


_STALE_TRIES: Final = 64


def make_session(config: Config) -> aiohttp.ClientSession:
    # (keepalive_timeout: how long an idle connection is kept for reuse; an upstream
    # that closes it first, as a request goes on it, fails that request: config.Timeouts)
    connector = _Connector(
        limit=0, ttl_dns_cache=300, enable_cleanup_closed=False,
        keepalive_timeout=config.timeouts.pool_idle,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.timeouts.connect),
        auto_decompress=False,
        trust_env=config.server.trust_env,
        # No skip_auto_headers: Target's headers already hold User-Agent, Accept and
        # Accept-Encoding, so aiohttp adds none of its own, and skipping costs ~4 µs a call.
        raise_for_status=False,
        # One session serves every client: cookies an upstream sets (a load balancer's,
        # say) must not ride along with other clients' requests. Kept none, sent none.
        cookie_jar=aiohttp.DummyCookieJar(),
    )
