"""Every Prometheus metric of SPEC §5 in one holder, built on an injected registry.

Label values come only from config (key names, model ids, regions, upstream names) or
from the fixed words below, so a client cannot add series by inventing names.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from lrproxy.config import Listen

UNKNOWN: Final = "unknown"
NONE: Final = "none"
RELOAD_RESULTS: Final = ("ok", "error")
_PENDING_MAX: Final = 512  # observations held per series before a flush (bounded memory)

_LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
)


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
    # In multiprocess mode (server.workers) each figure goes to the worker's files at
    # once, so that a worker killed by a signal loses nothing already counted.
    immediate: bool = False
    # Labelled children by label values: `labels()` costs microseconds per call on the
    # hot path; the values are bounded (config names, fixed words), so is this cache.
    _children: dict[tuple[str, ...], Any] = attrs.field(factory=dict, init=False)
    # Figures of finished requests not yet in the metrics above: one dict update per
    # request under one lock, where prometheus_client takes a lock per inc() and
    # observe() (8-9 per request). Moved in by `flush`, which every collection of the
    # registry runs first, so a scrape never misses a request that has ended.
    _pending: dict[tuple[Any, ...], list[Any]] = attrs.field(factory=dict, init=False)
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
            p = self._pending.get(k := (key, model, region, code, stream))
            if p is None:
                p = self._pending[k] = [0, 0, 0, 0.0, 0.0, [], []]
            p[0] += 1
            p[1] += prompt
            p[2] += completion
            p[3] += carbon_g
            p[4] += energy_wh
            p[5].append(duration)
            if ttfb is not None:
                p[6].append(ttfb)
            full = len(p[5]) >= _PENDING_MAX
        if full or self.immediate:
            self.flush()

    def attempt(self, upstream: str, outcome: str) -> None:
        """One upstream attempt's outcome."""
        k = (upstream, outcome)
        with self._lock:
            self._attempts[k] = self._attempts.get(k, 0) + 1
        if self.immediate:
            self.flush()

    def flush(self) -> None:
        """Move the pending figures into the Prometheus metrics."""
        with self._lock:
            if not self._pending and not self._attempts:
                return
            for (key, model, region, code, stream), (n, p, c, g, e, durations, ttfbs) in (
                self._pending.items()
            ):
                self.child(self.requests, key, model, region, code).inc(n)
                if p or c:  # a token series exists once tokens were counted, as before
                    self.child(self.tokens, key, model, region, "prompt").inc(p)
                    self.child(self.tokens, key, model, region, "completion").inc(c)
                    self.child(self.carbon, key, model, region).inc(g)
                    self.child(self.energy, key, model, region).inc(e)
                hist = self.child(self.duration, model, region, "true" if stream else "false")
                for d in durations:
                    hist.observe(d)
                if ttfbs:
                    hist = self.child(self.ttfb, model, region)
                    for t in ttfbs:
                        hist.observe(t)
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
                         ("upstream",), registry=registry, multiprocess_mode="max"),
            intensity=Gauge("lrproxy_grid_intensity_g_per_kwh",
                            "Grid intensity in use per region", ("region",),
                            registry=registry, multiprocess_mode="max"),
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


class _FlushFirst:
    """A collector with no samples of its own: it flushes the pending figures."""

    metrics: Metrics | None = None

    def collect(self) -> Iterable[Metric]:
        if self.metrics is not None:
            self.metrics.flush()
        return ()

    def describe(self) -> Iterable[Metric]:
        return ()


async def serve_metrics(registry: Callable[[], CollectorRegistry], listen: Listen) -> web.AppRunner:
    """/metrics on its own listener, so API clients cannot read it (SPEC §5).

    `registry` is called per scrape: the process's own registry, or a fresh one that
    sums every worker's files (multiprocess mode).
    """

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry()),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, listen.host, listen.port).start()
    return runner
