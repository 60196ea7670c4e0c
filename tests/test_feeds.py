"""Live grid-intensity feeds (SPEC §3): fresh readings are used and make figures `measured`."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from lrproxy.feeds import poll_feeds
from lrproxy.log import MAIN


def _write_feed(path: Path, value: float, age_s: float = 0.0) -> None:
    when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    path.write_text(json.dumps({
        "zone": "FR", "carbonIntensity": value,
        "datetime": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "updatedAt": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
    }))


def _reload_feed(stack: Any, path: Path | None) -> None:
    """Reload `stack` with eu-west's feed at `path` (or none), then the poller's pass."""
    from conftest import ENVIRON

    from lrproxy.config import parse_config, resolve_secrets

    region = stack.data["regions"]["eu-west"]
    region.pop("intensity_feed", None)
    if path is not None:
        region["intensity_feed"] = str(path)
    config = parse_config(stack.data, source="test")
    stack.call(lambda: stack.runtime.install(config, resolve_secrets(config, ENVIRON)))
    stack.call(lambda: poll_feeds(stack.runtime))


def test_fresh_feed_is_used_and_measured(make_stack: Any, tmp_path: Path) -> None:
    """A fresh live reading replaces the static figure; with upstream usage it is `measured`."""
    feed = tmp_path / "eu-west.json"
    _write_feed(feed, 55)

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["eu-west"]["intensity_feed"] = str(feed)

    stack = make_stack(mutate)
    r = stack.client().chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        extra_body={"route": {"region": "eu-west"}},
    )
    eco = r.model_extra["lowrouter"]["eco"]
    assert eco["grid_intensity_g_per_kwh"] == 55
    assert eco["accuracy"] == "measured"
    assert eco["carbon_g"] == eco["energy_wh"] / 1000 * 55
    assert stack.metric("lrproxy_grid_intensity_g_per_kwh", region="eu-west") == 55


def test_stale_feed_falls_back_to_static(make_stack: Any, tmp_path: Path) -> None:
    """A reading older than intensity_max_age_s is ignored: static figure, `estimated`."""
    feed = tmp_path / "eu-west.json"
    _write_feed(feed, 55, age_s=7200)

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["eu-west"].update(intensity_feed=str(feed), intensity_max_age_s=3600)

    stack = make_stack(mutate)
    r = stack.client().chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        extra_body={"route": {"region": "eu-west"}},
    )
    eco = r.model_extra["lowrouter"]["eco"]
    assert eco["grid_intensity_g_per_kwh"] == 290
    assert eco["accuracy"] == "estimated"


def test_feed_change_reorders_routing(make_stack: Any, tmp_path: Path) -> None:
    """A new reading re-ranks candidates: a very clean us-east grid wins unpinned traffic."""
    feed = tmp_path / "us-east.json"

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["us-east"]["intensity_feed"] = str(feed)

    stack = make_stack(mutate)
    ask = lambda: stack.client().chat.completions.create(  # noqa: E731
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
    ).model_extra["lowrouter"]["route"]["region"]
    assert ask() == "eu-west"  # 290 g/kWh beats the static 380
    _write_feed(feed, 10)
    stack.call(lambda: poll_feeds(stack.runtime))
    assert ask() == "us-east"


def test_bad_feed_keeps_the_last_good_reading(make_stack: Any, tmp_path: Path) -> None:
    """A feed file that stops being valid JSON is refused; the previous reading stays."""
    feed = tmp_path / "eu-west.json"
    _write_feed(feed, 70)

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["eu-west"]["intensity_feed"] = str(feed)

    stack = make_stack(mutate)
    feed.write_text("{not json")
    stack.call(lambda: poll_feeds(stack.runtime))
    assert stack.call(lambda: stack.runtime.intensity("eu-west").g_per_kwh) == 70


def test_a_feed_over_64_kib_is_refused_as_too_large(
    make_stack: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A valid JSON file over 64 KiB (another endpoint's answer, say) is refused as too
    large, not as "not JSON: unexpected end of data" at the 65,536th character (it was
    read cut short); the last good reading stays."""
    feed = tmp_path / "eu-west.json"
    _write_feed(feed, 70)

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["eu-west"]["intensity_feed"] = str(feed)

    stack = make_stack(mutate)
    doc = json.loads(feed.read_text())
    feed.write_text(json.dumps({**doc, "carbonIntensity": 80, "history": ["x" * 100] * 1000}))
    with caplog.at_level("WARNING", logger=MAIN):
        stack.call(lambda: poll_feeds(stack.runtime))
    assert [r.getMessage() for r in caplog.records] == [
        f"intensity feed of region eu-west refused: {feed}: larger than 64 KiB: not a "
        "carbon-intensity/latest answer"]
    assert stack.call(lambda: stack.runtime.intensity("eu-west").g_per_kwh) == 70


def test_a_missing_feed_is_said_once_until_it_comes_and_goes(
    make_stack: Any, tmp_path: Path, caplog: Any
) -> None:
    """A feed file that is not there (its timer has not run yet) is logged once, not at
    every poll; once it has been read and goes again, once more."""
    feed = tmp_path / "eu-west.json"

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["eu-west"]["intensity_feed"] = str(feed)

    stack = make_stack(mutate)

    def unreadable() -> int:
        return sum("unreadable" in r.getMessage() for r in caplog.records)

    with caplog.at_level("WARNING", logger="lrproxy"):
        for _ in range(3):
            stack.call(lambda: poll_feeds(stack.runtime))
        assert unreadable() == 1
        _write_feed(feed, 70)
        stack.call(lambda: poll_feeds(stack.runtime))
        assert stack.call(lambda: stack.runtime.intensity("eu-west").g_per_kwh) == 70
        feed.unlink()
        for _ in range(3):
            stack.call(lambda: poll_feeds(stack.runtime))
        assert unreadable() == 2
    assert stack.call(lambda: stack.runtime.intensity("eu-west").g_per_kwh) == 70  # kept


def test_a_feed_that_cannot_be_opened_is_said_once(
    make_stack: Any, tmp_path: Path, caplog: Any
) -> None:
    """A feed path that is there but cannot be read (a directory here; a file root's
    timer wrote 0600 in life) is logged once too, not at every poll."""
    feed = tmp_path / "eu-west.json"
    feed.mkdir()

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["eu-west"]["intensity_feed"] = str(feed)

    stack = make_stack(mutate)
    with caplog.at_level("WARNING", logger="lrproxy"):
        for _ in range(3):
            stack.call(lambda: poll_feeds(stack.runtime))
    assert sum("unreadable" in r.getMessage() for r in caplog.records) == 1


def test_reload_without_the_feed_drops_its_reading(make_stack: Any, tmp_path: Path) -> None:
    """A reload that removes a region's feed puts it back on its static figure at once;
    one that puts the same, unchanged file back reads it again; one that names another
    file (with the same stamp) reads that file, not the old file's reading."""
    feed, other = tmp_path / "eu-west.json", tmp_path / "other.json"
    _write_feed(feed, 55)
    _write_feed(other, 77)
    st = feed.stat()
    assert other.stat().st_size == st.st_size
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same stamp but its path

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["eu-west"]["intensity_feed"] = str(feed)

    stack = make_stack(mutate)

    def grid() -> float:
        r = stack.client().chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            extra_body={"route": {"region": "eu-west"}},
        )
        return float(r.model_extra["lowrouter"]["eco"]["grid_intensity_g_per_kwh"])

    def reload(path: Path | None) -> None:
        _reload_feed(stack, path)

    assert grid() == 55
    reload(None)
    assert grid() == 290
    assert stack.metric("lrproxy_grid_intensity_g_per_kwh", region="eu-west") == 290
    reload(feed)
    assert grid() == 55
    reload(other)
    assert grid() == 77


def test_reading_that_ages_out_reroutes_at_the_next_poll(
    make_stack: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A reading that grows older than intensity_max_age_s, its file unchanged, gives way
    to the static figure in routing, the gauge and /models at the next poll, as it does
    in the eco figures at once (SPEC §2, §3, §5). A warning says so, naming the file,
    once; a fresh reading's return is one info line."""
    import time

    caplog.set_level(logging.INFO, logger=MAIN)

    feed = tmp_path / "us-east.json"
    _write_feed(feed, 10)

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["us-east"].update(intensity_feed=str(feed), intensity_max_age_s=600)

    stack = make_stack(mutate)

    def ask() -> dict[str, Any]:
        r = stack.client().chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        return r.model_extra["lowrouter"]  # type: ignore[no-any-return,index]

    def listed() -> dict[str, float]:
        models = stack.client().models.list()
        entry = next(m for m in models.data if m.id == "openai/gpt-4o-mini")
        return entry.model_extra["lowrouter"]["carbon_per_1k_tokens_g"]  # type: ignore[no-any-return,index]

    lr = ask()
    assert lr["route"]["region"] == "us-east" and lr["eco"]["accuracy"] == "measured"
    fresh = listed()
    assert fresh["us-east"] < fresh["eu-west"]
    stack.runtime.clock = lambda: time.time() + 3600  # the file stays as it was
    stack.call(lambda: poll_feeds(stack.runtime))
    lr = ask()
    assert lr["route"]["region"] == "eu-west"  # 290 g/kWh beats us-east's static 380
    assert stack.metric("lrproxy_grid_intensity_g_per_kwh", region="us-east") == 380
    stale = listed()
    assert stale["us-east"] > stale["eu-west"] and stale["eu-west"] == fresh["eu-west"]
    stack.call(lambda: poll_feeds(stack.runtime))  # still stale: said once
    said = [r.getMessage() for r in caplog.records if "intensity feed" in r.getMessage()]
    assert said == [f"intensity feed of region us-east: no reading in {feed} newer than "
                    "intensity_max_age_s (600 s); the static 380 g/kWh counts until one comes"]
    _write_feed(feed, 12, age_s=-3600)  # (dated in the shifted clock's present)
    stack.call(lambda: poll_feeds(stack.runtime))
    said = [r.getMessage() for r in caplog.records if "intensity feed" in r.getMessage()]
    assert said[1:] == ["intensity feed of region us-east: a fresh reading (12 g/kWh) counts again"]


def test_a_reading_dated_ahead_is_said_to_be_ahead(
    make_stack: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A reading dated over 5 minutes ahead of the proxy's clock (a timer writing local
    time with a `Z`, its zone east of UTC) counts as no live one; the warning says it is
    dated ahead, not that no reading is newer than intensity_max_age_s, and a reading
    that goes from stale to ahead is said too (it used to go unsaid)."""
    caplog.set_level(logging.INFO, logger=MAIN)
    feed = tmp_path / "eu-west.json"
    _write_feed(feed, 55, age_s=7200)

    def mutate(d: dict[str, Any]) -> None:
        d["regions"]["eu-west"]["intensity_feed"] = str(feed)

    stack = make_stack(mutate)

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "intensity feed" in r.getMessage()]

    assert said() == [f"intensity feed of region eu-west: no reading in {feed} newer than "
                      "intensity_max_age_s (3600 s); the static 290 g/kWh counts until one "
                      "comes"]
    _write_feed(feed, 56, age_s=-3600)
    os.utime(feed, ns=(0, 1))  # (another stamp than the stale file's, whatever the clock)
    stack.call(lambda: poll_feeds(stack.runtime))
    stack.call(lambda: poll_feeds(stack.runtime))  # said once
    assert len(said()) == 2, said()
    assert re.fullmatch(
        rf"intensity feed of region eu-west: the reading in {re.escape(str(feed))} is dated "
        r"3[56]\d\d s ahead of this clock \(at most 300 s may be\); the static 290 g/kWh "
        "counts until one comes", said()[1]), said()[1]
    assert stack.metric("lrproxy_grid_intensity_g_per_kwh", region="eu-west") == 290
    _write_feed(feed, 57)
    stack.call(lambda: poll_feeds(stack.runtime))
    assert said()[2:] == ["intensity feed of region eu-west: a fresh reading (57 g/kWh) "
                          "counts again"]


def test_a_stream_in_flight_keeps_the_feeds_of_its_config(make_stack: Any, tmp_path: Path) -> None:
    """A reload that adds a feed to the region of a stream in flight, or removes it,
    leaves that stream's eco on the config it began with (SPEC §6); later requests
    take the new one."""
    feed = tmp_path / "eu-west.json"
    _write_feed(feed, 10)
    stack = make_stack()

    def reload(path: Path | None) -> None:
        _reload_feed(stack, path)

    def stream_across(path: Path | None) -> dict[str, Any]:
        chunks = iter(stack.client().chat.completions.create(
            model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
            stream=True, extra_body={"route": {"region": "eu-west"},
                                     "sim": {"chunks": 4, "chunk_delay_s": 0.1}}))
        next(chunks)
        reload(path)
        eco: dict[str, Any] = [c for c in chunks if c.model_extra.get("lowrouter")][-1] \
            .model_extra["lowrouter"]["eco"]  # type: ignore[index]
        return eco

    eco = stream_across(feed)  # began on the static figure, the feed came mid-stream
    assert (eco["grid_intensity_g_per_kwh"], eco["accuracy"]) == (290, "estimated")
    eco = stream_across(None)  # began on the feed, which went mid-stream
    assert (eco["grid_intensity_g_per_kwh"], eco["accuracy"]) == (10, "measured")
    r = stack.client().chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        extra_body={"route": {"region": "eu-west"}})
    assert r.model_extra["lowrouter"]["eco"]["grid_intensity_g_per_kwh"] == 290  # type: ignore[index]


def test_the_poller_outlives_a_pass_that_fails(monkeypatch: Any, caplog: Any) -> None:
    """A pass that raises (a bug of ours, as a NUL in a feed's path was) is logged and
    the next pass runs: the task that polls the feeds, and ends cool-downs, must not die
    for the rest of the process's life."""
    import asyncio
    import contextlib
    import types

    from lrproxy import feeds

    passes: list[int] = []

    def poll(rt: Any) -> None:
        passes.append(1)
        if len(passes) in (2, 3):
            raise ValueError("embedded null byte")

    monkeypatch.setattr(feeds, "poll_feeds", poll)
    monkeypatch.setattr(feeds, "publish_usable", lambda rt: None)

    async def run() -> None:
        ctx = feeds.feeds_ctx({feeds.RUNTIME: types.SimpleNamespace(feed_poll_s=0.001)})
        await ctx.__anext__()  # the first pass, then the poller's task
        for _ in range(2000):
            if len(passes) >= 5:
                break
            await asyncio.sleep(0.001)
        with contextlib.suppress(StopAsyncIteration):
            await ctx.__anext__()  # the app's cleanup: the task is cancelled

    with caplog.at_level("ERROR", logger="lrproxy"):
        asyncio.run(run())
    assert len(passes) >= 5
    assert [r.getMessage() for r in caplog.records] == [
        "intensity feed poll failed: ValueError: embedded null byte"]  # once: Seldom(60)
