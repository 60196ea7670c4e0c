"""Live grid-intensity feeds (SPEC §3): fresh readings are used and make figures `measured`."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from lrproxy.feeds import poll_feeds


def _write_feed(path: Path, value: float, age_s: float = 0.0) -> None:
    when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    path.write_text(json.dumps({
        "zone": "FR", "carbonIntensity": value,
        "datetime": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "updatedAt": when.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
    }))


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


def test_reload_without_the_feed_drops_its_reading(make_stack: Any, tmp_path: Path) -> None:
    """A reload that removes a region's feed puts it back on its static figure at once;
    one that puts the same, unchanged file back reads it again; one that names another
    file (with the same stamp) reads that file, not the old file's reading."""
    from conftest import ENVIRON

    from lrproxy.config import parse_config, resolve_secrets

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
        region = stack.data["regions"]["eu-west"]
        region.pop("intensity_feed", None)
        if path is not None:
            region["intensity_feed"] = str(path)
        config = parse_config(stack.data, source="test")
        stack.call(lambda: stack.runtime.install(config, resolve_secrets(config, ENVIRON)))
        stack.call(lambda: poll_feeds(stack.runtime))  # the poller's next pass

    assert grid() == 55
    reload(None)
    assert grid() == 290
    assert stack.metric("lrproxy_grid_intensity_g_per_kwh", region="eu-west") == 290
    reload(feed)
    assert grid() == 55
    reload(other)
    assert grid() == 77
