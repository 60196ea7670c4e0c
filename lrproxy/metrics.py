"""Every Prometheus metric of SPEC §5 in one holder, built on an injected registry.

Label values come only from config (key names, model ids, regions, upstream names) or
from the fixed words below, so a client cannot add series by inventing names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import attrs
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lrproxy.config import Listen

UNKNOWN: Final = "unknown"
NONE: Final = "none"
RELOAD_RESULTS: Final = ("ok", "error")

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
    # Labelled children by label values: `labels()` costs microseconds per call on the
    # hot path; the values are bounded (config names, fixed words), so is this cache.
    _children: dict[tuple[str, ...], Any] = attrs.field(factory=dict, init=False)

    def child(self, metric: Counter | Histogram | Gauge, *values: str) -> Any:
        key = (metric._name, *values)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*values)
        return c

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
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
        )
        # Both results exist at 0 from the start, so PromQL's increase() also sees the
        # first failed reload (a series born at 1 shows no increase).
        for result in RELOAD_RESULTS:
            m.reloads.labels(result)
        return m


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
