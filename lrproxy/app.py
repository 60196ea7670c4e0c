"""The aiohttp application: state, the error edge, and the small endpoints (SPEC §1).

`Runtime` is the app's one mutable holder. Its `state` is a frozen snapshot of the config
and what derives from it; a handler reads it once, so a reload swaps it atomically and
requests in flight finish on the config they began with.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import os
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, Final

import aiohttp
import attrs
import orjson
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry

from lrproxy import __version__, eco, errors, limits, protocol
from lrproxy.buckets import SHARED_BUCKETS_ENV, SharedBucket, SharedBuckets
from lrproxy.config import AUTO_MODEL, Config, Region, Secrets
from lrproxy.log import ACCESS, MAIN, access_line
from lrproxy.metrics import NONE, UNKNOWN, Metrics
from lrproxy.protocol import ID_MASK, ID_PREFIX, REQUEST_ID_RE, ids, request_id_of
from lrproxy.routing import Candidate, RoutingTable, build_table, pick_candidates
from lrproxy.upstream import (
    Deadlines,
    Pool,
    Target,
    identity,
    make_session,
    make_targets,
    task_of,
)

log = logging.getLogger(MAIN)
SERVER_HEADER: Final = "lrproxy"


@attrs.frozen
class State:
    """Everything derived from one config; replaced whole on reload or a new intensity."""

    config: Config
    secrets: Secrets
    table: RoutingTable
    targets: Mapping[str, Target]
    regions: frozenset[str]
    client_timeout: aiohttp.ClientTimeout
    # The grid intensities `table` ranks by (feeds.py rebuilds it when the current ones,
    # which change as readings age, differ).
    intensities: Mapping[str, float]
    # SHA-256 of each client key -> its name. A lookup's timing can only tell how a
    # presented key's digest compares with known digests, which reveals nothing of a
    # key, and it stays one lookup however many keys (teams) there are.
    key_names: Mapping[bytes, str] = attrs.field(init=False)
    # Answer headers prepared per route (relay._answer_headers); names come from this
    # config only, so the cache is bounded and goes with it on reload.
    header_sets: dict[tuple[str, str, str, bool], Any] = attrs.field(
        init=False, factory=dict, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "key_names", dict(
            (digest, name) for name, digest in self.secrets.client_hashes))

    def authenticate(self, headers: CIMultiDictProxy[str]) -> str:
        """The key's configured name, from the request's Authorization (SPEC §1)."""
        given = headers.getall("Authorization", ())  # (one lookup: the hot path)
        if len(given) > 1:  # which one counts would be a guess (a front proxy's, say)
            raise errors.InvalidApiKey(
                "More than one Authorization header: send exactly one, 'Bearer <key>'.")
        header = given[0] if given else None
        if not header:
            raise errors.InvalidApiKey(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.InvalidApiKey("Malformed Authorization header: expected 'Bearer <key>'.")
        found = self.key_names.get(
            hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest())
        if found is None:
            raise errors.InvalidApiKey("Incorrect API key provided.")
        return found


@attrs.define
class Runtime:
    """The app's mutable holder: current state, health, live intensities, metrics."""

    state: State
    pool: Pool
    metrics: Metrics
    # Live readings by feed file: a region's figure is its own config's feed's reading,
    # so that a request keeps the feed of the config it began with (SPEC §6).
    readings: dict[str, eco.Reading] = attrs.Factory(dict)
    # Each feed file's (mtime, size) when last read (feeds.py): not read again until
    # that changes; None while it is unreadable, which has been logged once.
    feed_stamps: dict[str, tuple[int, int] | None] = attrs.Factory(dict)
    # Each region's reading, as last logged: "live", "stale" or "ahead" (feeds.py)
    feed_live: dict[str, str] = attrs.Factory(dict)
    session: aiohttp.ClientSession | None = None
    deadlines: Deadlines = attrs.Factory(Deadlines)  # upstream waits, on one timer
    # The app's loop, from its start: asyncio.current_task(loop) with the loop given
    # skips get_running_loop(), a getpid() system call on Python 3.11.
    loop: asyncio.AbstractEventLoop | None = None
    background: set[asyncio.Task[Any]] = attrs.Factory(set)  # short tasks of finished requests
    draining: bool = False
    drain_expired: bool = False  # shutdown_grace_s is over: end what is left with an error
    tasks: set[asyncio.Task[Any]] = attrs.Factory(set)  # handlers in flight, for the drain
    buckets: dict[str, limits.TokenBucket | SharedBucket] = attrs.Factory(dict)  # per
    # key with rate_per_s; with workers, in the file they share (SharedBuckets)
    shared_buckets: SharedBuckets | None = None
    retries_in_progress: int = 0
    clock: Callable[[], float] = time.time  # wall clock for intensity ages
    feed_poll_s: float = 5.0

    def ended_by_drain(self, task: asyncio.Task[Any]) -> bool:
        """True, with the cancel taken back, when `task`'s CancelledError is the drain's
        at shutdown_grace_s (cli._drain cancels each task once), not a client that left:
        the request is then answered properly, never cut (SPEC §6). Once only: ask
        `by_drain` where the answer is given elsewhere."""
        if self.by_drain(task):
            task.uncancel()
            return True
        return False

    def by_drain(self, task: asyncio.Task[Any]) -> bool:
        """`ended_by_drain`, the cancel left as it is."""
        return self.drain_expired and task.cancelling() == 1

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as a task of its own, held until it ends (cancelled at shutdown)."""
        task = (self.loop or asyncio.get_running_loop()).create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def intensity(self, region: str) -> eco.Intensity:
        r = self.state.config.regions[region]
        return eco.current_intensity(r, self.reading(r), self.clock())

    def reading(self, region: Region) -> eco.Reading | None:
        """The live reading of `region`'s own feed, if it has one and it has been read."""
        feed = region.intensity_feed
        return None if feed is None else self.readings.get(feed)

    def intensities(self) -> dict[str, float]:
        return self._intensities(self.state.config)

    def install(self, config: Config, secrets: Secrets) -> None:
        """Adopt a validated config atomically (start and reload): the new state is built
        first, so that if anything fails the old config goes on serving, untouched."""
        # Readings are kept by feed file, each config's regions reading their own: a
        # region whose feed was removed is on its static figure at once, one moved to
        # another file waits for that file's reading, and a request in flight keeps the
        # feed of its config. A file no region names any more keeps its reading (a few
        # bytes per file ever named) for those requests, and for its return.
        intensities = self._intensities(config)
        state = make_state(config, secrets, intensities)
        # A series per configured name only. (In multiprocess mode prometheus-client
        # warns, in plain text amid the JSON log, that a worker's files keep theirs: the
        # supervisor's sum keeps the accepted config's names, workers._Summed.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for u in set(self.pool.health) - {u.name for u in config.upstreams}:
                self.metrics.usable.remove(u)
            for r in set(self.state.config.regions) - set(config.regions):
                with contextlib.suppress(KeyError):
                    self.metrics.intensity.remove(r)
        self.pool.configure(config.upstreams,
                            {n: identity(t) for n, t in state.targets.items()})
        buckets: dict[str, limits.TokenBucket | SharedBucket] = {}
        shared = self.shared_buckets
        for k in config.keys:  # a changed rate takes effect at once, tokens kept
            if k.rate_per_s is None:
                continue
            old = self.buckets.get(k.name)
            if shared is not None and not isinstance(old, limits.TokenBucket):
                buckets[k.name] = shared.bucket(k.name, k.rate_per_s)  # (tokens in the file)
                continue
            new = limits.bucket_for(k.rate_per_s)
            buckets[k.name] = (attrs.evolve(new, tokens=old.tokens, at=old.at)
                               if isinstance(old, limits.TokenBucket) else new)
        self.buckets = buckets
        self.state = state
        self._publish_intensities(intensities)
        self.pool.on_change = lambda: publish_usable(self)
        publish_usable(self)

    def refresh_table(self) -> None:
        """Rebuild the routing table for new live intensities (feeds.py)."""
        st = self.state
        intensities = self._intensities(st.config)
        self.state = attrs.evolve(st, table=build_table(st.config, intensities),
                                  intensities=intensities)
        self._publish_intensities(intensities)

    def _intensities(self, config: Config) -> dict[str, float]:
        now = self.clock()
        return {name: eco.current_intensity(r, self.reading(r), now).g_per_kwh
                for name, r in config.regions.items()}

    def _publish_intensities(self, intensities: Mapping[str, float]) -> None:
        for region, value in intensities.items():
            self.metrics.intensity.labels(region).set(value)  # not cached: reloads remove series


def make_state(config: Config, secrets: Secrets, intensities: Mapping[str, float]) -> State:
    return State(
        config, secrets, build_table(config, intensities), make_targets(config, secrets),
        frozenset(config.regions),
        aiohttp.ClientTimeout(total=None, sock_connect=config.timeouts.connect),
        intensities,
    )


RUNTIME: Final = web.AppKey("runtime", Runtime)


@attrs.define(slots=True)
class Rec:
    """What one request did, for the metrics and the access line."""

    request_id: str
    t0: float
    api: bool = False
    key: str = UNKNOWN
    model: str = UNKNOWN
    region: str = NONE
    upstream: str = ""
    stream: bool = False
    status: int | str = 0
    error: str | None = None
    attempts: int = 0
    prompt: int = 0
    completion: int = 0
    energy_wh: float = 0.0
    carbon_g: float = 0.0
    ttfb: float | None = None
    upstream_s: float | None = None
    total_s: float = math.inf  # timeouts.total of the config the request began with
    out: web.StreamResponse | None = None  # a stream's response, once it may be prepared

    def route_headers(self) -> dict[str, str]:
        if not self.upstream:
            return {"X-Request-Id": self.request_id}
        return {
            "X-Request-Id": self.request_id,
            "X-LowRouter-Region": self.region,
            "X-LowRouter-Model": self.model,
            "X-LowRouter-Upstream": self.upstream,
        }


# Every route's handler takes the request, the app's Runtime and the request's Rec from
# the edge, which has them at hand: `request.app[RUNTIME]` and `request[KEY]` are each
# two or three Python calls in aiohttp.
Handler = Callable[[web.Request, "Runtime", Rec], Awaitable[web.StreamResponse]]

_PROBES: Final = frozenset({"/healthz", "/readyz"})
_GET_HEAD: Final = frozenset({"GET", "HEAD"})  # a probe's methods; /models/{id}'s


# Every answer's share of time upstream and in the proxy, in ms (W3C Server-Timing).
# %-formatting: half the time of an f-string's float format here (~0.9 against 1.7 µs).
_SERVER_TIMING: Final = "upstream;dur=%.3f, proxy;dur=%.3f"


def server_timing(rec: Rec, upstream_s: float) -> str:
    """The Server-Timing value of `rec`'s answer, of which `upstream_s` went upstream."""
    return _SERVER_TIMING % (
        upstream_s * 1000, max(0.0, time.perf_counter() - rec.t0 - upstream_s) * 1000)


def _error_response(e: errors.ProxyError, rec: Rec) -> web.Response:
    return web.Response(
        status=e.status, body=e.body(), content_type="application/json",
        headers={**e.headers(), **rec.route_headers()},
    )


def edged(handler: Handler, rt: Runtime) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`handler` inside the edge: request id, the OpenAI error shape for every error,
    metrics and the access line. Every route's handler is wrapped in it (a middleware
    would cost aiohttp's middleware chain per request: ~4 calls and a cache lookup)."""

    return functools.partial(_edge, handler=handler, rt=rt)  # a C call, no frame of its own


async def _edge(request: web.Request, handler: Handler, rt: Runtime) -> web.StreamResponse:
    value = request.headers.get("X-Request-Id")  # request_id_of(value), inline
    rec = Rec(value if value is not None and REQUEST_ID_RE.fullmatch(value) else
              ID_PREFIX + "%016x" % (next(ids) & ID_MASK), time.perf_counter())
    # Every request gets its access line and count (SPEC §6), /models and unknown paths
    # too (a scanner's), but the health probes a load balancer sends every second.
    rec.api = request.method not in _GET_HEAD or request.path not in _PROBES  # (?x too)
    task = task_of(rt.loop) or asyncio.current_task()
    assert task is not None
    rt.tasks.add(task)
    count_inflight = rt.metrics.immediate  # else the gauge reads len(rt.tasks) itself
    if count_inflight:
        rt.metrics.inflight.inc()
    proto = request.protocol  # else aiohttp's own (tests' servers)
    limits_of = proto if isinstance(proto, protocol.LimitsHandler) else None
    if limits_of is not None:
        limits_of.lr_busy = True
    try:
        if limits_of is not None and limits_of.lr_refuse and rec.api:  # (False first)
            # begun after SIGTERM on a kept-alive connection (take_no_new_requests)
            raise errors.ShuttingDown("The proxy is shutting down; retry the request.",
                                      retry_after=1)
        resp = await handler(request, rt, rec)
        if not rec.status:
            rec.status = resp.status
    except errors.ProxyError as e:
        resp = await _answer_error(rec, e)
        _close_if_body_unsent(request, resp)
    except web.HTTPException as e:  # aiohttp's own: unknown path, wrong method
        err, resp = protocol.not_routed(request, e, "this API")
        rec.status, rec.error = e.status, err.code
        _close_if_body_unsent(request, resp)
    except asyncio.CancelledError:
        if not rt.ended_by_drain(task):
            if not rec.status:
                rec.status = "client_closed"
            raise
        resp = await _answer_error(rec, errors.ShuttingDown(
            "The proxy is shutting down; retry the request.", retry_after=1))
    except Exception:
        log.exception("unhandled error", extra={"fields": {"request_id": rec.request_id}})
        resp = await _answer_error(rec, errors.ProxyError("Internal error; see the proxy's log."))
    finally:
        if limits_of is not None:
            limits_of.lr_end(request)
        rt.tasks.discard(task)
        if count_inflight:
            rt.metrics.inflight.dec()
        if rec.api:
            _account(rt.metrics, rec, request)
    if not resp.prepared:  # a stream has set these itself (relay._relay_stream)
        headers = resp.headers  # finish_headers(rt, resp, rec.request_id), inline
        headers["Server"] = SERVER_HEADER
        headers["X-Request-Id"] = rec.request_id
        # the upstream's share: the answer's attempt, the failed ones, or none
        headers["Server-Timing"] = server_timing(rec, rec.upstream_s or 0.0)
        if rt.draining:
            resp.force_close()
    return resp


def _close_if_body_unsent(request: web.Request, resp: web.StreamResponse) -> None:
    """A refusal given before `100 Continue` went: the body is not coming, so the
    connection closes rather than waiting for it; as after a body that failed to parse."""
    content = request.content
    if content.exception() is not None or (resp.status == 408 and not content.is_eof()):
        # a body that broke (protocol), or stopped coming (client_body): read no more of
        # it (no lingering read of what was not coming anyway) and close
        content.feed_eof()
        resp.force_close()
    elif "Expect" in request.headers and not content.is_eof():
        resp.force_close()


async def _answer_error(rec: Rec, e: errors.ProxyError) -> web.StreamResponse:
    """The error's answer in the OpenAI shape; after a stream's 200 has gone (a path the
    relay did not end itself), the §1.1 error event and a clean end instead, never a
    second status line."""
    out = rec.out
    if out is None or not out.prepared:
        rec.status, rec.error = e.status, e.code
        return _error_response(e, rec)
    rec.status, rec.error = "stream_error", e.code
    event = b"data: " + orjson.dumps({
        "error": {"message": e.message, "type": e.type, "code": e.code},
        "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
    }) + b"\n\n"
    with contextlib.suppress(ConnectionResetError, RuntimeError):  # gone, or already ended
        await out.write(event)
        await out.write_eof()
    return out


def finish_headers(rt: Runtime, resp: web.StreamResponse, request_id: str) -> None:
    """What every answer carries, set before it is prepared. (A response-prepare signal
    would do it for all, at a cost of ~5 µs per request for its coroutines.)"""
    headers = resp.headers
    headers["Server"] = SERVER_HEADER
    headers["X-Request-Id"] = request_id
    if rt.draining:  # no new request on a kept-alive connection (SPEC §6)
        resp.force_close()  # aiohttp then says Connection: close


async def send_continue(request: web.Request) -> None:
    """`HTTP/1.1 100 Continue` when the client waits for it, before its body is read."""
    if (request.version == aiohttp.HttpVersion11
            and request.headers.get("Expect", "").lower() == "100-continue"):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # what follows is the answer's own start


async def _expect(request: web.Request, at_once: bool = True) -> web.StreamResponse | None:
    """aiohttp's handling of `Expect:` (100-continue), with what it refuses answered in
    the OpenAI shape; it runs before the route's handler, so outside the edge. For the
    routes that take a body (chat, embeddings: `_expect_later`) `100 Continue` goes only
    once the key, the length and the encoding have passed (`send_continue`), so that a
    refused client (401, 413, 415) never sends its body."""
    expect = request.headers.get("Expect", "")
    if request.version != aiohttp.HttpVersion11:
        return None
    if expect.lower() == "100-continue":
        if at_once:
            await send_continue(request)
        return None
    err = errors.ExpectationFailed(f"'Expect: {errors.printable(expect[:40])}' is not supported; "
                                   "send the request without it.")
    rt = request.app[RUNTIME]
    rid = _refused(rt, err.status, err.code, request.headers.get("X-Request-Id"))
    resp = web.Response(status=err.status, body=err.body(), content_type="application/json",
                        headers={"Server-Timing": protocol.NO_TIME})
    finish_headers(rt, resp, rid)
    _close_if_body_unsent(request, resp)
    proto = request.protocol  # the request is answered, outside the edge: the next
    if isinstance(proto, protocol.LimitsHandler):  # one's header deadline starts anew
        proto.lr_end(request)
    return resp


_expect_later: Final = functools.partial(_expect, at_once=False)


def _refused(rt: Runtime, status: int, code: str, request_id: str | None = None) -> str:
    """An answer given before a request could be parsed (protocol.REFUSED), or before
    its route (a refused `Expect:`, with the client's X-Request-Id): counted and logged
    like any other, with no key, model or region; returns its request id."""
    rec = Rec(request_id_of(request_id), time.perf_counter(), api=True, status=status,
              error=code)
    _account(rt.metrics, rec)
    return rec.request_id


def publish_usable(rt: Runtime) -> None:
    """lrproxy_upstream_usable from passive health: on ejection and recovery (the pool's
    hook) and every few seconds from the background task, for cool-downs that end."""
    now = time.monotonic()
    for name in rt.pool.health:
        rt.metrics.usable.labels(name).set(1 if rt.pool.usable(name, now) else 0)


_CODES: Final[dict[int | str, str]] = {s: str(s) for s in range(100, 600)}  # str() done once

# The access logger's level check, made before the fields are built: a disabled access
# log costs nothing more.
_access_enabled: Final = logging.getLogger(ACCESS).isEnabledFor


def _account(m: Metrics, rec: Rec, request: web.BaseRequest | None = None) -> None:
    """Count `rec` and write its access line; `request` names the method, path and
    client (none for an answer given before a request could be parsed)."""
    duration = time.perf_counter() - rec.t0
    key, model, region, status = rec.key, rec.model, rec.region, rec.status
    m.record(key, model, region, _CODES.get(status) or str(status),
             rec.stream, rec.prompt, rec.completion, rec.carbon_g, rec.energy_wh, duration,
             rec.ttfb)
    if _access_enabled(logging.INFO):
        # Milliseconds to 3 decimals as round(x * 1000, 3) gives them (a tie within a
        # float's last bit aside), at half its cost: that one rounds through a decimal
        # string.
        access_line({
            # when the request began, as a Unix time (as Envoy's %START_TIME(%s.%6f)%):
            # an ISO text would cost ~1 µs of formatting per request here, this ~0.1
            "ts": time.time() - duration,
            "method": None if request is None else request.method,
            # (the relative path: no query string, no absolute-form target's host or
            # user info, where a key may be, which no log may hold)
            "path": None if request is None else request.rel_url.raw_path[:256],
            "client": None if request is None else request.remote or None,  # (a unix socket's: '')
            "request_id": rec.request_id, "key": key, "model": model,
            "region": region, "upstream": rec.upstream or None, "status": rec.status,
            "error": rec.error, "stream": rec.stream, "attempts": rec.attempts,
            "prompt_tokens": rec.prompt, "completion_tokens": rec.completion,
            "carbon_g": rec.carbon_g, "energy_wh": rec.energy_wh,
            "ttfb_ms": None if rec.ttfb is None else round(rec.ttfb * 1e6) / 1e3,
            "duration_ms": round(duration * 1e6) / 1e3,
        })


# ---------------------------------------------------------------------------------------
# small endpoints


async def healthz(request: web.Request, rt: Runtime, rec: Rec) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=_dumps)


async def readyz(request: web.Request, rt: Runtime, rec: Rec) -> web.Response:
    now = time.monotonic()
    usable = [n for n in rt.pool.health if rt.pool.usable(n, now)]
    if rt.draining:
        return web.json_response({"status": "draining"}, status=503, dumps=_dumps)
    if not usable:
        return web.json_response({"status": "no usable upstream"}, status=503, dumps=_dumps)
    return web.json_response({"status": "ready", "usable_upstreams": len(usable)}, dumps=_dumps)


async def models(request: web.Request, rt: Runtime, rec: Rec) -> web.Response:
    st = rt.state
    rec.key = st.authenticate(request.headers)
    return web.Response(body=_models_body(st), content_type="application/json")


# GET /models/{id}: ids hold a slash (openai/gpt-4o-mini), so it is a pattern, which
# the router matches (never protocol.direct, which takes exact paths); the SDK escapes
# the slash (openai%2Fgpt-4o-mini) and the router unescapes it.
async def model(request: web.Request, rt: Runtime, rec: Rec) -> web.Response:
    """The entry `/models` lists for one id (OpenAI's `GET /models/{model}`, the SDK's
    `models.retrieve`), or 404 model_not_found where `/models` lists none."""
    if request.method not in _GET_HEAD:  # the route takes every method: a 405, as /models
        raise web.HTTPMethodNotAllowed(request.method, _GET_HEAD)
    st = rt.state
    rec.key = st.authenticate(request.headers)
    mid = request.match_info["id"]
    entry = _model_entry(st, mid, pick_candidates(st.table, mid, None))
    return web.Response(body=orjson.dumps(entry), content_type="application/json")


def _models_body(st: State) -> bytes:
    return orjson.dumps({"object": "list", "data": [
        _model_entry(st, mid, cands) for mid, cands in st.table.by_model.items() if cands]})


def _model_entry(st: State, mid: str, cands: tuple[Candidate, ...]) -> dict[str, Any]:
    per_region: dict[str, float] = {}
    for c in cands:
        per_region.setdefault(c.region.name, c.carbon_per_1k)
    entry: dict[str, Any] = {
        "id": mid, "object": "model", "created": 0, "owned_by": "lowrouter",
        "lowrouter": {
            "regions": sorted(per_region),
            "carbon_per_1k_tokens_g": per_region,
            "upstreams": sorted({c.upstream.name for c in cands}),
        },
    }
    if mid == AUTO_MODEL:
        entry["lowrouter"]["models"] = list(st.config.auto_models)
    else:
        m = st.config.models[mid]
        entry["lowrouter"]["eco"] = {
            "energy_wh_per_1k_prompt_tokens": m.e_prompt,
            "energy_wh_per_1k_completion_tokens": m.e_completion,
            "source": m.source,
        }
    return entry


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def make_app(
    config: Config,
    secrets: Secrets,
    *,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The lrproxy application for one config; tests build it directly."""
    from lrproxy import feeds, relay  # they need RUNTIME and Rec from here

    metrics = Metrics.create(registry or CollectorRegistry())
    rt = Runtime(make_state(config, secrets, {}), Pool(), metrics, clock=clock)
    shared = os.environ.get(SHARED_BUCKETS_ENV)  # a worker's (workers.py)
    if shared:
        try:
            rt.shared_buckets = SharedBuckets(shared)
        except OSError as e:  # gone (a /tmp cleaner's doing, outside systemd)
            log.warning("the workers' shared rate_per_s buckets cannot be opened (%s): "
                        "this worker's are its own", e.strerror or e)
    rt.install(config, secrets)
    if not metrics.immediate:  # in multiprocess mode a function cannot be summed
        metrics.inflight.set_function(lambda: len(rt.tasks))
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[RUNTIME] = rt
    app[protocol.REFUSED] = lambda status, code: _refused(rt, status, code)
    routes: dict[str, tuple[str, Handler]] = {"/healthz": ("GET", healthz),
                                              "/readyz": ("GET", readyz)}
    for base in ("/api/v1", "/v1"):
        routes[f"{base}/chat/completions"] = ("POST", relay.chat_completions)
        routes[f"{base}/embeddings"] = ("POST", relay.embeddings)
        routes[f"{base}/models"] = ("GET", models)
    allowed: dict[str, set[str]] = {}
    direct: dict[str, dict[str, Any]] = {}
    for path, (method, handler) in routes.items():
        allowed[path] = {method, "HEAD"} if method == "GET" else {method}
        h = edged(handler, rt)
        expect = _expect_later if method == "POST" else _expect
        for m in allowed[path]:  # HEAD as add_get() gives it: the GET handler, no body
            app.router.add_route(m, path, h, expect_handler=expect)
            direct.setdefault(path, {})[m] = h
    app[protocol.ROUTES] = direct  # the same handlers without the router (protocol.direct)
    # The patterns below take every character, a line feed (`%0A`, which `.` does not
    # match) too: else such a path matches no route and aiohttp answers it itself, a
    # text 404 with its own Server header, uncounted and unlogged.
    for base in ("/api/v1", "/v1"):  # every method: the handler answers 405 to the others
        app.router.add_route("*", base + r"/models/{id:[\s\S]+}", edged(model, rt),
                             expect_handler=_expect)

    async def no_route(request: web.Request, rt: Runtime, rec: Rec) -> web.StreamResponse:
        """Every other path and method, for the edge to answer in the OpenAI shape."""
        path = request.rel_url.raw_path  # as routed: /v1%2Fmodels is not /v1/models
        if path in allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed[path])
        raise web.HTTPNotFound()

    unrouted: Any = edged(no_route, rt)  # it takes the app's requests, web.Request
    app.router.add_route("*", r"/{tail:[\s\S]*}", unrouted,  # last: matched last
                         expect_handler=_expect)
    app[protocol.UNROUTED] = unrouted  # for targets with no path, which no route matches
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(feeds.feeds_ctx)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    rt.loop = asyncio.get_running_loop()
    rt.deadlines = Deadlines(rt.loop)
    rt.session = make_session(rt.state.config)
    log.debug("lrproxy %s: upstream session open", __version__)
    yield
    for task in list(rt.background):
        task.cancel()
    await asyncio.gather(*rt.background, return_exceptions=True)
    rt.deadlines.close()
    await rt.session.close()
    rt.metrics.flush()  # what the last turn counted (in multiprocess mode)
