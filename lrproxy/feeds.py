"""Live grid-intensity feeds (SPEC §3): JSON files re-read when they change.

Each region may name an `intensity_feed`, a file in the shape of Electricity Maps'
`carbon-intensity/latest` answer, which something else (a timer running curl, say) keeps
fresh. A background task polls the files' stat every few seconds and, when a reading or
its freshness changes, rebuilds the routing table so carbon ranking follows the grid.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from lrproxy import FEED_CACHE_ENV, eco
from lrproxy.app import RUNTIME, Runtime, publish_usable
from lrproxy.log import MAIN, Seldom
from lrproxy.workers import speaks_for_all

POLL_S: Final = 5.0
log = logging.getLogger(MAIN)
_failed: Final = Seldom(60.0)


def poll_feeds(rt: Runtime) -> None:
    """One pass: read changed feed files, then rebuild the table if any region's figure
    is not the one it was built with: a new reading, or one that has aged out.

    With server.workers, a directory all workers share (FEED_CACHE_ENV) keeps each
    file's last good reading, so that a worker started while the file is missing or
    broken keeps it as the others do (README: the last good reading stays), not the
    static figure. Every pass uses it, a reload's too.
    """
    cache = os.environ.get(FEED_CACHE_ENV) or None
    seen = rt.feed_stamps
    for region in rt.state.config.regions.values():
        path = region.intensity_feed
        if path is None:
            continue
        reading = None
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
            if seen.get(path) == stamp:
                continue
            with open(path, "rb") as f:
                data = f.read(eco.MAX_FEED_BYTES + 1)
        except OSError as e:
            # Said once until it is read again: a file that is not there yet (its timer
            # has not run), or that lrproxy's user may not read, must not fill the
            # journal every POLL_S
            if seen.get(path, ()) is not None:
                seen[path] = None
                if speaks_for_all():
                    log.warning("intensity feed of region %s unreadable: %s: %s",
                                region.name, path, e.strerror)
        else:
            seen[path] = stamp  # (read: refused or not, looked at again once it changes)
            try:
                reading = eco.parse_reading(data)
            except ValueError as e:
                if speaks_for_all():
                    log.warning("intensity feed of region %s refused: %s: %s",
                                region.name, path, e)
        if reading is None:
            if cache is not None and path not in rt.readings:
                _restore(rt, cache, path, region.name)
            continue
        if cache is not None and rt.readings.get(path) != reading:
            _keep(cache, path, data)
        rt.readings[path] = reading
    _say_freshness(rt)
    if rt.intensities() != rt.state.intensities:
        rt.refresh_table()


def _say_freshness(rt: Runtime) -> None:
    """A line when a region's live reading ages out (the static figure counts from
    then on, and `accuracy` says `estimated`), when it is dated too far ahead of this
    clock, and when a fresh one comes back: the gauge alone does not say why its figure
    moved. Once per change, per region.

    A reading dated ahead is said as such: a timer writing local time with a `Z` (its
    zone east of UTC) makes one, and "no reading newer than intensity_max_age_s" would
    send its operator looking for a feed that stopped."""
    now = rt.clock()
    for region in rt.state.config.regions.values():
        path = region.intensity_feed
        if path is None:
            continue
        reading = rt.readings.get(path)
        current = eco.current_intensity(region, reading, now)
        ahead = 0.0 if reading is None else reading.at - now
        state = ("live" if current.live else "ahead" if ahead > eco.FUTURE_SKEW_S
                 else "stale")
        was = rt.feed_live.get(region.name)
        rt.feed_live[region.name] = state
        if (state == was or (was is None and (current.live or reading is None))
                or not speaks_for_all()):
            continue  # (nothing read yet: the unreadable line has said why)
        if current.live:
            log.info("intensity feed of region %s: a fresh reading (%g g/kWh) counts again",
                     region.name, current.g_per_kwh)
        elif state == "ahead":
            log.warning("intensity feed of region %s: the reading in %s is dated %.0f s ahead "
                        "of this clock (at most %.0f s may be); the static %g g/kWh counts "
                        "until one comes", region.name, path, ahead,
                        eco.FUTURE_SKEW_S, region.grid_intensity_g_per_kwh)
        else:
            log.warning("intensity feed of region %s: no reading in %s newer than "
                        "intensity_max_age_s (%g s); the static %g g/kWh counts until one "
                        "comes", region.name, path, region.intensity_max_age_s,
                        region.grid_intensity_g_per_kwh)


def _cached(cache: str, path: str) -> str:
    return os.path.join(cache, hashlib.sha256(os.fsencode(path)).hexdigest()[:32])


def _keep(cache: str, path: str, data: bytes) -> None:
    """A good reading's bytes, for the workers started later (written whole, renamed)."""
    dest = _cached(cache, path)
    part = f"{dest}.{os.getpid()}"
    try:
        with open(part, "wb") as f:
            f.write(data)
        os.replace(part, dest)
    except OSError as e:
        log.debug("cannot keep the intensity feed's reading in %s: %s", cache, e)


def _restore(rt: Runtime, cache: str, path: str, region: str) -> None:
    """The last good reading another worker kept, if any (it ages out as any does)."""
    try:
        with open(_cached(cache, path), "rb") as f:
            reading = eco.parse_reading(f.read(65536))
    except (OSError, ValueError):
        return
    rt.readings[path] = reading
    log.info("intensity feed of region %s: the last good reading the workers read stays "
             "(until it ages out)", region)


async def feeds_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: poll the feeds while the app runs."""
    rt = app[RUNTIME]
    poll_feeds(rt)

    async def run() -> None:
        while True:
            await asyncio.sleep(rt.feed_poll_s)
            try:
                poll_feeds(rt)
                publish_usable(rt)  # cool-downs end with time, not with an event
            except Exception as e:  # a bug of ours: the next pass tries again
                if _failed.due():
                    log.error("intensity feed poll failed: %s: %s", type(e).__name__, e)

    task = asyncio.create_task(run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
