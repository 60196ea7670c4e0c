"""Routing (SPEC §2): candidates for a model and a region pin, ordered by carbon, then load."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from lrproxy.config import AUTO_MODEL, Config, parse_config
from lrproxy.errors import ModelNotFound, ModelNotInRegion, UnknownRegion
from lrproxy.routing import (
    Candidate,
    RoutingTable,
    build_table,
    order_candidates,
    pick_candidates,
    unserved,
)

MINI, LLAMA, UNRATED = "openai/gpt-4o-mini", "meta/llama-3.1-8b", "acme/unrated"

DATA: dict[str, Any] = {
    "regions": {
        "eu-west": {"grid_intensity_g_per_kwh": 290, "pue": 1.2},
        "eu-north": {"grid_intensity_g_per_kwh": 30, "pue": 1.1},
        "us-east": {"grid_intensity_g_per_kwh": 380, "pue": 1.3},
    },
    "models": {
        MINI: {"energy_wh_per_1k_prompt_tokens": 0.02, "energy_wh_per_1k_completion_tokens": 0.3},
        LLAMA: {"active_params_b": 8},
        UNRATED: {},
    },
    "upstreams": [
        {"name": "eu-west-a", "region": "eu-west", "base_url": "http://127.0.0.1:1",
         "models": {MINI: "gpt-4o-mini", LLAMA: "llama-3.1-8b"}},
        {"name": "eu-west-b", "region": "eu-west", "base_url": "http://127.0.0.1:2",
         "models": {MINI: "gpt-4o-mini", LLAMA: "llama-3.1-8b"}},
        {"name": "eu-north-a", "region": "eu-north", "base_url": "http://127.0.0.1:3",
         "models": {LLAMA: "llama-3.1-8b", UNRATED: "unrated-1"}},
        {"name": "us-east-a", "region": "us-east", "base_url": "http://127.0.0.1:4",
         "models": {MINI: "gpt-4o-mini-2024-07-18", LLAMA: "llama-3.1-8b"}},
    ],
    "auto": {"models": [MINI, LLAMA]},
}


def config(mutate: Callable[[dict[str, Any]], None] | None = None) -> Config:
    data = copy.deepcopy(DATA)
    if mutate is not None:
        mutate(data)
    return parse_config(data, source="test")


def table(intensities: Mapping[str, float] | None = None) -> RoutingTable:
    return build_table(config(), intensities or {})


def names(cands: Any) -> list[str]:
    return [c.upstream.name for c in cands]


def every(_: str) -> bool:
    return True


def no_load(_: str) -> int:
    return 0


def ranked(model: str, region: str | None = None, **kw: Any) -> list[str]:
    """Upstream names in the order a request would try them."""
    t = kw.pop("table", None) or table()
    return names(order_candidates(pick_candidates(t, model, region),
                                  kw.get("usable", every), kw.get("load", no_load)))


def reference(e_prompt: float, e_completion: float, pue: float, intensity: float) -> float:
    """SPEC §2's ranking figure, written out independently of the code under test."""
    return (e_prompt + e_completion) * pue * intensity / 2000


# ---------------------------------------------------------------------------------------
# the table


def test_table_holds_every_model_and_auto_sorted_by_carbon() -> None:
    """build_table lists, per model and for lowrouter/auto, every serving upstream by rising carbon."""
    t = table()
    assert set(t.by_model) == {MINI, LLAMA, UNRATED, AUTO_MODEL}
    assert names(t.by_model[MINI]) == ["eu-west-a", "eu-west-b", "us-east-a"]
    assert names(t.by_model[LLAMA]) == ["eu-north-a", "eu-west-a", "eu-west-b", "us-east-a"]
    assert names(t.by_model[UNRATED]) == ["eu-north-a"]
    assert t.regions == ("eu-north", "eu-west", "us-east")
    for cands in t.by_model.values():
        assert [c.carbon_per_1k for c in cands] == sorted(c.carbon_per_1k for c in cands)


def test_candidate_carries_the_upstream_model_name_and_reference_carbon() -> None:
    """Each candidate knows the upstream's own model name and its carbon per 1k reference tokens."""
    us = next(c for c in table().by_model[MINI] if c.upstream.name == "us-east-a")
    assert isinstance(us, Candidate)
    assert (us.model.id, us.upstream_model, us.region.name) == (MINI, "gpt-4o-mini-2024-07-18", "us-east")
    assert us.carbon_per_1k == pytest.approx(reference(0.02, 0.3, 1.3, 380))
    north = table().by_model[LLAMA][0]
    assert north.carbon_per_1k == pytest.approx(reference(0.01, 0.1, 1.1, 30))


def test_model_served_nowhere_is_404() -> None:
    """A declared model no upstream serves is known, listed by unserved(), and a 404."""
    t = build_table(config(lambda d: d["models"].update({"x/idle": {}})), {})
    assert t.by_model["x/idle"] == () and unserved(t) == ["x/idle"]
    with pytest.raises(ModelNotFound):
        pick_candidates(t, "x/idle", None)


# ---------------------------------------------------------------------------------------
# ordering


def test_lowest_carbon_first() -> None:
    """Unpinned, the candidate with the lowest carbon per 1k tokens comes first."""
    assert ranked(LLAMA) == ["eu-north-a", "eu-west-a", "eu-west-b", "us-east-a"]
    assert ranked(MINI)[-1] == "us-east-a"


def test_carbon_beats_load() -> None:
    """A busier upstream with lower carbon still comes before an idle dirtier one."""
    load = {"eu-north-a": 500, "us-east-a": 0, "eu-west-a": 0, "eu-west-b": 0}.__getitem__
    assert ranked(LLAMA, load=load)[0] == "eu-north-a"


@pytest.mark.parametrize(("loads", "order"), [
    ({"eu-west-a": 5, "eu-west-b": 1}, ["eu-west-b", "eu-west-a"]),
    ({"eu-west-a": 1, "eu-west-b": 5}, ["eu-west-a", "eu-west-b"]),
])
def test_ties_broken_by_load(loads: dict[str, int], order: list[str]) -> None:
    """Between upstreams of equal carbon the one with fewer requests outstanding comes first."""
    load = {**loads, "us-east-a": 0}.__getitem__
    assert ranked(MINI, load=load) == [*order, "us-east-a"]


def test_unusable_upstreams_are_skipped() -> None:
    """Upstreams that may not be tried (cooling down, at capacity) are left out."""
    def usable(name: str) -> bool:
        return name not in ("eu-west-a", "eu-north-a")

    assert ranked(LLAMA, usable=usable) == ["eu-west-b", "us-east-a"]
    assert ranked(MINI, usable=lambda _: False) == []


def test_single_usable_candidate_needs_no_load() -> None:
    """With one usable candidate there is nothing to sort, so load is not consulted."""
    def load(name: str) -> int:
        raise AssertionError("load asked for " + name)

    assert ranked(UNRATED, load=load) == ["eu-north-a"]


def test_live_intensities_change_the_order() -> None:
    """A live reading replaces a region's static intensity in the ranking."""
    assert ranked(LLAMA, table=table({"eu-west": 10}))[:2] == ["eu-west-a", "eu-west-b"]
    assert ranked(MINI, table=table({"us-east": 1}))[0] == "us-east-a"
    live = table({"eu-north": 500})
    assert ranked(LLAMA, table=live)[-1] == "eu-north-a"
    north = next(c for c in live.by_model[LLAMA] if c.region.name == "eu-north")
    assert north.carbon_per_1k == pytest.approx(reference(0.01, 0.1, 1.1, 500))


# ---------------------------------------------------------------------------------------
# pinning and errors


def test_pinned_region_gives_only_its_upstreams() -> None:
    """A pinned request only gets upstreams of that region, even dirtier ones."""
    assert ranked(LLAMA, "us-east") == ["us-east-a"]
    assert ranked(MINI, "eu-west") == ["eu-west-a", "eu-west-b"]
    assert all(c.region.name == "eu-west" for c in pick_candidates(table(), LLAMA, "eu-west"))


def test_pinned_region_with_none_usable_gets_nothing() -> None:
    """When the pinned region's upstreams are all unusable, no other region steps in."""
    assert ranked(MINI, "eu-west", usable=lambda n: not n.startswith("eu-west")) == []


def test_unknown_model() -> None:
    """An undeclared model raises ModelNotFound: 404, model_not_found, naming the model."""
    with pytest.raises(ModelNotFound) as info:
        pick_candidates(table(), "openai/gpt-5", None)
    err = info.value
    assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert "openai/gpt-5" in err.message


def test_unknown_model_wins_over_unknown_region() -> None:
    """With both an unknown model and an unknown region, the model is reported."""
    with pytest.raises(ModelNotFound):
        pick_candidates(table(), "openai/gpt-5", "mars-1")


def test_unknown_region_lists_the_configured_ones() -> None:
    """An unknown pinned region raises UnknownRegion (400) whose message lists the configured regions."""
    with pytest.raises(UnknownRegion) as info:
        pick_candidates(table(), MINI, "eu-wst")
    err = info.value
    assert (err.status, err.code, err.param) == (400, "unknown_region", "route.region")
    assert "'eu-wst'" in err.message
    assert err.message.endswith("configured regions: eu-north, eu-west, us-east")


def test_model_not_in_pinned_region() -> None:
    """A known model not offered in the pinned region raises ModelNotInRegion (400)."""
    with pytest.raises(ModelNotInRegion) as info:
        pick_candidates(table(), MINI, "eu-north")
    err = info.value
    assert (err.status, err.code) == (400, "model_not_in_region")
    assert MINI in err.message and "eu-north" in err.message


# ---------------------------------------------------------------------------------------
# lowrouter/auto


def test_auto_spans_the_auto_models() -> None:
    """lowrouter/auto's candidates are every (model, upstream) pair of auto.models, and only those."""
    cands = pick_candidates(table(), AUTO_MODEL, None)
    pairs = {(c.model.id, c.upstream.name) for c in cands}
    assert pairs == {(m, u["name"]) for u in DATA["upstreams"] for m in u["models"] if m in (MINI, LLAMA)}
    assert UNRATED not in {c.model.id for c in cands}


def test_auto_picks_the_lowest_carbon_pair() -> None:
    """lowrouter/auto orders all pairs by carbon, across models: here llama in eu-north first."""
    order = order_candidates(pick_candidates(table(), AUTO_MODEL, None), every, no_load)
    assert (order[0].model.id, order[0].upstream.name) == (LLAMA, "eu-north-a")
    assert [c.carbon_per_1k for c in order] == sorted(c.carbon_per_1k for c in order)
    assert (order[-1].model.id, order[-1].upstream.name) == (MINI, "us-east-a")


def test_auto_within_a_pinned_region() -> None:
    """A pinned lowrouter/auto request chooses among the auto models of that region only."""
    cands = pick_candidates(table(), AUTO_MODEL, "us-east")
    assert [(c.model.id, c.upstream.name) for c in cands] == [(LLAMA, "us-east-a"), (MINI, "us-east-a")]


def test_auto_follows_the_configured_list() -> None:
    """Changing auto.models changes what lowrouter/auto may pick; an empty list gives no candidate."""
    only_unrated = build_table(config(lambda d: d.update(auto={"models": [UNRATED]})), {})
    assert [(c.model.id, c.upstream.name) for c in only_unrated.by_model[AUTO_MODEL]] == [
        (UNRATED, "eu-north-a")
    ]
    empty = build_table(config(lambda d: d.pop("auto")), {})
    assert empty.by_model[AUTO_MODEL] == () and unserved(empty) == [AUTO_MODEL]
    for region in (None, "eu-west"):  # 404 (no retry helps), not 503 with Retry-After
        with pytest.raises(ModelNotFound) as info:
            pick_candidates(empty, AUTO_MODEL, region)
        assert info.value.status == 404 and "no [auto] models" in info.value.message


def test_model_served_by_no_upstream_is_404() -> None:
    """A model declared in [models] that no upstream serves: 404 model_not_found, saying so."""
    def drop_llama(d: dict[str, Any]) -> None:
        for u in d["upstreams"]:
            u["models"].pop(LLAMA, None)
        d["auto"]["models"].remove(LLAMA)

    t = build_table(config(drop_llama), {})
    assert unserved(t) == [LLAMA]
    with pytest.raises(ModelNotFound) as info:
        pick_candidates(t, LLAMA, None)
    assert (info.value.status, info.value.code) == (404, "model_not_found")
    assert "not served by any upstream" in info.value.message


def test_auto_models_served_by_no_upstream_say_so(caplog: pytest.LogCaptureFixture) -> None:
    """[auto] models that exist but that no upstream serves: the 404 and the start's
    warning say that, not that no [auto] models are configured."""
    from prometheus_client import CollectorRegistry

    from lrproxy import cli
    from lrproxy.app import RUNTIME, make_app
    from lrproxy.config import resolve_secrets

    def only_unserved_auto(d: dict[str, Any]) -> None:
        d["auth"] = {"keys": [{"name": "ops", "sha256": "a" * 64}]}  # (no keys: a warning)
        d["auto"]["models"] = [UNRATED]
        d["upstreams"] = [u for u in d["upstreams"] if u["name"] != "eu-north-a"]

    cfg = config(only_unserved_auto)
    t = build_table(cfg, {})
    assert unserved(t) == [UNRATED, AUTO_MODEL]
    with pytest.raises(ModelNotFound) as info:
        pick_candidates(t, AUTO_MODEL, None)
    assert "no upstream serves its [auto] models" in info.value.message
    app = make_app(cfg, resolve_secrets(cfg, {}), registry=CollectorRegistry())
    with caplog.at_level("WARNING", logger="lrproxy"):
        cli._warn_unserved(app[RUNTIME])
    assert [r.getMessage() for r in caplog.records] == [
        f"model {UNRATED} is served by no upstream: requests for it get 404",
        f"no upstream serves any [auto] model: requests for {AUTO_MODEL} get 404"]


def test_no_client_keys_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """A config without [auth] keys is legal (check-config says ok), but every request
    gets 401: the start (and each reload) says so, once."""
    from prometheus_client import CollectorRegistry

    from lrproxy import cli
    from lrproxy.app import RUNTIME, make_app
    from lrproxy.config import resolve_secrets

    def a_key(d: dict[str, Any]) -> None:
        d["auth"] = {"keys": [{"name": "ops", "sha256": "a" * 64}]}

    for mutate, want in ((None, 1), (a_key, 0)):  # (DATA has no [auth])
        cfg = config(mutate)
        app = make_app(cfg, resolve_secrets(cfg, {}), registry=CollectorRegistry())
        caplog.clear()
        with caplog.at_level("WARNING", logger="lrproxy"):
            cli._warn_unserved(app[RUNTIME])
        said = [r.getMessage() for r in caplog.records if "client keys" in r.getMessage()]
        assert said == ["no client keys are configured ([auth] keys): every request "
                        "gets 401"] * want
