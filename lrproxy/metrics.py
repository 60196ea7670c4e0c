"""Every Prometheus metric of SPEC §5 in one holder, built on an injected registry.

Label values come only from config (key names, model ids, regions, upstream names) or
from the fixed words below, so a client cannot add series by inventing names.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from lrproxy import protocol
from lrproxy.config import NONE as NONE  # the words come from config, which reserves them
from lrproxy.config import UNKNOWN as UNKNOWN
from lrproxy.config import Listen

RELOAD_RESULTS: Final = ("ok", "error")
_LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
)
# Histogram.observe() puts a value in the first bucket whose bound is >= it, +Inf last.
_BOUNDS: Final = (*(float(b) for b in _LATENCY_BUCKETS), math.inf)


@attrs.frozen
class Metrics:
    requests: Counter
    tokens: Counter
    carbon: Counter
    energy: Counter
    attempts: Counter
    duration: Histogram
    ttfb: Histogram
    inflight: Gauge
    usable: Gauge
    intensity: Gauge
    reloads: Counter
    # In multiprocess mode (server.workers) the figures go to the worker's files at the
    # end of the event-loop turn that counted them (at once outside a loop), so that a
    # worker killed by a signal loses nothing counted in an earlier turn. One write per
    # turn, not per request: each figure written costs ~1 µs there (a lock and an mmap
    # write), ~12 µs a request, which made 2 workers take 1.2 times the CPU per request
    # of one.
    immediate: bool = False
    # Labelled children by label values: `labels()` costs microseconds per call on the
    # hot path; the values are bounded (config names, fixed words), so is this cache.
    _children: dict[tuple[str, ...], Any] = attrs.field(factory=dict, init=False)
    # Figures of finished requests not yet in the metrics above: one dict update per
    # request under one lock, where prometheus_client takes a lock per inc() and
    # observe() (8-9 per request). Moved in by `flush`, which every collection of the
    # registry runs first, so a scrape never misses a request that has ended. Durations
    # wait as bucket counts and sums, so the memory held is one list per label set.
    _pending: dict[tuple[Any, ...], _Pending] = attrs.field(factory=dict, init=False)
    _attempts: dict[tuple[str, str], int] = attrs.field(factory=dict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def child(self, metric: Counter | Histogram | Gauge, *values: str) -> Any:
        key = (metric._name, *values)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*values)
        return c

    def record(
        self, key: str, model: str, region: str, code: str, stream: bool, prompt: int,
        completion: int, carbon_g: float, energy_wh: float, duration: float, ttfb: float | None,
    ) -> None:
        """One finished request's figures (SPEC §5)."""
        with self._lock:
            # (the first figure since the last flush: later ones find it scheduled)
            due = self.immediate and not self._pending and not self._attempts
            p = self._pending.get(k := (key, model, region, code, stream))
            if p is None:
                p = self._pending[k] = _Pending()
            p.requests += 1
            p.prompt += prompt
            p.completion += completion
            p.carbon_g += carbon_g
            p.energy_wh += energy_wh
            p.durations[bisect_left(_BOUNDS, duration)] += 1
            p.duration_sum += duration
            if ttfb is not None:
                p.ttfbs[bisect_left(_BOUNDS, ttfb)] += 1
                p.ttfb_sum += ttfb
        if due:
            self._flush_soon()

    def attempt(self, upstream: str, outcome: str) -> None:
        """One upstream attempt's outcome."""
        k = (upstream, outcome)
        with self._lock:
            due = self.immediate and not self._pending and not self._attempts
            self._attempts[k] = self._attempts.get(k, 0) + 1
        if due:
            self._flush_soon()

    def _flush_soon(self) -> None:
        """`flush` once the callbacks of this loop turn have run (asyncio runs the ones
        they schedule in the next turn, without waiting on I/O); at once without a loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Move the pending figures into the Prometheus metrics."""
        with self._lock:
            if not self._pending and not self._attempts:
                return
            for (key, model, region, code, stream), p in self._pending.items():
                self.child(self.requests, key, model, region, code).inc(p.requests)
                if p.prompt or p.completion:  # a token series exists once tokens were counted
                    self.child(self.tokens, key, model, region, "prompt").inc(p.prompt)
                    self.child(self.tokens, key, model, region, "completion").inc(p.completion)
                    self.child(self.carbon, key, model, region).inc(p.carbon_g)
                    self.child(self.energy, key, model, region).inc(p.energy_wh)
                _add_observations(
                    self.child(self.duration, model, region, "true" if stream else "false"),
                    p.durations, p.duration_sum)
                if any(p.ttfbs):
                    _add_observations(self.child(self.ttfb, model, region), p.ttfbs, p.ttfb_sum)
            for (upstream, outcome), n in self._attempts.items():
                self.child(self.attempts, upstream, outcome).inc(n)
            self._pending.clear()
            self._attempts.clear()

    @classmethod
    def create(cls, registry: CollectorRegistry, *, immediate: bool | None = None) -> Metrics:
        """The metrics on `registry`; `immediate` defaults to prometheus-client's own
        test for multiprocess mode (PROMETHEUS_MULTIPROC_DIR set)."""
        if immediate is None:
            immediate = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        _check_bulk_observe()
        flusher = _FlushFirst()
        registry.register(flusher)  # before the metrics: collected, so flushed, first
        kmr = ("key", "model", "region")
        m = cls(
            requests=Counter("lrproxy_requests", "Requests answered, by HTTP status or end",
                             (*kmr, "code"), registry=registry),
            tokens=Counter("lrproxy_tokens", "Tokens processed", (*kmr, "kind"),
                           registry=registry),
            carbon=Counter("lrproxy_carbon_grams", "Estimated grams CO2e of the answers",
                           kmr, registry=registry),
            energy=Counter("lrproxy_energy_wh", "Estimated energy of the answers in Wh",
                           kmr, registry=registry),
            attempts=Counter("lrproxy_upstream_attempts", "Upstream attempts by outcome",
                             ("upstream", "outcome"), registry=registry),
            duration=Histogram("lrproxy_request_duration_seconds", "Whole request duration",
                               ("model", "region", "stream"), buckets=_LATENCY_BUCKETS,
                               registry=registry),
            ttfb=Histogram("lrproxy_time_to_first_byte_seconds",
                           "Time until the first body byte went to the client",
                           ("model", "region"), buckets=_LATENCY_BUCKETS, registry=registry),
            inflight=Gauge("lrproxy_inflight_requests", "Requests being handled",
                           registry=registry, multiprocess_mode="livesum"),
            usable=Gauge("lrproxy_upstream_usable", "1 while the upstream may be tried",
                         ("upstream",), registry=registry, multiprocess_mode="livemax"),
            intensity=Gauge("lrproxy_grid_intensity_g_per_kwh",
                            "Grid intensity in use per region", ("region",),
                            registry=registry, multiprocess_mode="livemax"),
            reloads=Counter("lrproxy_config_reloads", "Config reloads by result", ("result",),
                            registry=registry),
            immediate=immediate,
        )
        flusher.metrics = m
        # Both results exist at 0 from the start, so PromQL's increase() also sees the
        # first failed reload (a series born at 1 shows no increase).
        for result in RELOAD_RESULTS:
            m.reloads.labels(result)
        return m


@attrs.define(slots=True)
class _Pending:
    """The figures of one label set's finished requests, until the next flush."""

    requests: int = 0
    prompt: int = 0
    completion: int = 0
    carbon_g: float = 0.0
    energy_wh: float = 0.0
    durations: list[int] = attrs.Factory(lambda: [0] * len(_BOUNDS))  # counts per bucket
    duration_sum: float = 0.0
    ttfbs: list[int] = attrs.Factory(lambda: [0] * len(_BOUNDS))
    ttfb_sum: float = 0.0


def _add_observations(hist: Any, counts: list[int], total: float) -> None:
    """What `observe()` of each value would add, for values already counted per bucket.

    prometheus_client has no public call for this; a histogram child keeps a value per
    bucket (`_buckets`, non-cumulative, in `_upper_bounds` order) and `_sum`, as in
    every release since 0.4. tests/test_metrics.py checks the result against
    `observe()` so a change there fails the tests rather than the figures.
    """
    buckets = hist._buckets
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    hist._sum.inc(total)


@functools.cache  # once per process: the library does not change under it
def _check_bulk_observe() -> None:
    """Refuse to start, rather than count wrong, on a prometheus_client whose histogram
    internals differ from what `_add_observations` expects."""
    values = (0.0, 0.005, 0.3, 7.0, 5000.0)
    # In multiprocess mode every value would be stored in this process's files and show
    # in /metrics: the check's two histograms keep theirs in memory.
    stored = prometheus_values.ValueClass
    prometheus_values.ValueClass = prometheus_values.MutexValue
    try:
        bulk = Histogram("check_bulk", "", buckets=_LATENCY_BUCKETS, registry=None)
        each = Histogram("check_bulk", "", buckets=_LATENCY_BUCKETS, registry=None)
    finally:
        prometheus_values.ValueClass = stored
    counts = [0] * len(_BOUNDS)
    for v in values:
        counts[bisect_left(_BOUNDS, v)] += 1
        each.observe(v)
    try:
        _add_observations(bulk, counts, sum(values))
        ok = _samples(bulk) == _samples(each)
    except (AttributeError, IndexError, TypeError):
        ok = False
    if not ok:
        raise RuntimeError("this prometheus_client's Histogram is not supported by lrproxy's "
                           "deferred metrics; install prometheus-client 0.19 to 0.26")


def _samples(hist: Histogram) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in hist.collect() for s in m.samples
            if not s.name.endswith("_created")]


def add_process_metrics(registry: CollectorRegistry,
                        workers: Callable[[], Iterable[int]] | None = None) -> None:
    """The `process_*` series every Prometheus client library exports (CPU seconds,
    resident and virtual memory, open and maximum descriptors, start time: Linux, from
    /proc) and `python_info`. With `workers` (the pids of the running ones, from the
    supervisor) the figures are the whole service's: the supervisor's own, plus each
    running worker's, plus the CPU time of the workers that have ended, so the counter
    never goes back when a worker is restarted; the start time and the descriptor limit
    are the supervisor's."""
    PlatformCollector(registry=registry)
    if workers is None:
        ProcessCollector(registry=registry)
    else:
        registry.register(_ServiceProcess(workers))


class _ServiceProcess:
    """ProcessCollector's families, summed over the supervisor and its workers."""

    SUMMED: Final = ("process_virtual_memory_bytes", "process_resident_memory_bytes",
                     "process_open_fds", "process_cpu_seconds")

    def __init__(self, workers: Callable[[], Iterable[int]]) -> None:
        self.workers = workers

    def collect(self) -> Iterable[Metric]:
        # Ended workers' CPU first, then the live ones': a worker reaped in between is
        # missed by this scrape (and counted by the next), never counted twice.
        ended = os.times()
        families = list(ProcessCollector(registry=None).collect())
        by_name = {m.name: m for m in families}
        if "process_cpu_seconds" not in by_name:  # no /proc: nothing to add to
            return families
        extra = dict.fromkeys(self.SUMMED, 0.0)
        extra["process_cpu_seconds"] = ended.children_user + ended.children_system
        for pid in self.workers():
            for m in ProcessCollector(pid=functools.partial(int, pid), registry=None).collect():
                if m.name in extra and m.samples:
                    extra[m.name] += m.samples[0].value
        for name, more in extra.items():
            if (own := by_name.get(name)) is not None and own.samples:
                own.samples[0] = own.samples[0]._replace(value=own.samples[0].value + more)
        return families


class _FlushFirst:
    """A collector with no samples of its own: it flushes the pending figures."""

    metrics: Metrics | None = None

    def collect(self) -> Iterable[Metric]:
        if self.metrics is not None:
            self.metrics.flush()
        return ()

    def describe(self) -> Iterable[Metric]:
        return ()


async def serve_metrics(registry: Callable[[], CollectorRegistry], listen: Listen,
                        header_timeout: float) -> web.AppRunner:
    """/metrics on its own listener, so API clients cannot read it (SPEC §5).

    `registry` is called per scrape: the process's own registry, or a fresh one that
    sums every worker's files (multiprocess mode). Its connections have the API's limits
    (protocol.Runner): `timeouts.client_header` for a request's headers, and idle
    kept-alive connections closed after 75 s (aiohttp's default is an hour).
    """

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry()),
                            headers={"Content-Type": CONTENT_TYPE_LATEST, "Server": "lrproxy"})

    @web.middleware
    async def limits(request: web.Request, handler: Any) -> web.StreamResponse:
        """Each request (a 404 or 405 too) marked as the API's edge does, so that a
        kept-alive scraper's next request has its own header deadline."""
        proto = request.protocol
        if isinstance(proto, protocol.LimitsHandler):
            proto.lr_busy = True
        rid = protocol.request_id_of(request.headers.get("X-Request-Id"))  # (SPEC §1)
        try:
            resp: web.StreamResponse = await handler(request)
        except web.HTTPException as e:  # the router's 404 and 405: said as the API says them
            resp = protocol.not_routed(request, e, "the metrics listener (GET /metrics)")[1]
            resp.headers["Server"] = "lrproxy"
        finally:
            if isinstance(proto, protocol.LimitsHandler):
                proto.lr_end()
        resp.headers["X-Request-Id"] = rid
        return resp

    app = web.Application(middlewares=[limits])
    # a request refused before it is parsed (a 400, 414, 408) has its id too (SPEC §1)
    app[protocol.REFUSED] = lambda status, code: protocol.request_id_of(None)
    app.router.add_get("/metrics", metrics)
    runner = protocol.Runner(app, header_timeout=header_timeout, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, listen.host, listen.port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
