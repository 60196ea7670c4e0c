"""The eco model (SPEC §3): energy, carbon, accuracy, size classes and live readings."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from lrproxy import eco
from lrproxy.config import Model, Region, energy_from_size, parse_config, read_config
from lrproxy.eco import Intensity, Reading

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_750_000_000.0

MINI = Model("openai/gpt-4o-mini", e_prompt=0.02, e_completion=0.3, source="config")
EU_WEST = Region("eu-west", grid_intensity_g_per_kwh=290, pue=1.2, intensity_max_age_s=3600)


def energy_wh(prompt: int, completion: int, e_prompt: float, e_completion: float, pue: float) -> float:
    """SPEC §3's energy formula, written out independently of the code under test."""
    return (prompt * e_prompt + completion * e_completion) / 1000 * pue


def parse_models(models: dict[str, Any]) -> dict[str, Model]:
    """The models that parse_config builds from a `[models]` table."""
    data = {
        "regions": {"r": {"grid_intensity_g_per_kwh": 100}},
        "models": models,
        "upstreams": [{"name": "u", "region": "r", "base_url": "http://127.0.0.1:1",
                       "models": {mid: "m" for mid in models}}],
    }
    return dict(parse_config(data).models)


# ---------------------------------------------------------------------------------------
# SPEC §3's example


def test_spec_example_figures() -> None:
    """12 + 23 tokens of gpt-4o-mini in eu-west (pue 1.2, 290 g/kWh, static) give SPEC §3's figures."""
    intensity = eco.current_intensity(EU_WEST, None, NOW)
    fig = eco.eco_figures(MINI, EU_WEST, intensity, 12, 23, tokens_measured=True)
    e = energy_wh(12, 23, 0.02, 0.3, 1.2)
    c = e / 1000 * 290
    assert fig["energy_wh"] == pytest.approx(e, rel=1e-12)
    assert fig["carbon_g"] == pytest.approx(c, rel=1e-12)
    assert fig["carbon_per_1k_tokens_g"] == pytest.approx(c * 1000 / 35, rel=1e-12)
    # and the literals printed in the SPEC
    assert fig["energy_wh"] == pytest.approx(0.008568, rel=1e-12)
    assert fig["carbon_g"] == pytest.approx(0.00248472, rel=1e-12)
    assert fig["carbon_per_1k_tokens_g"] == pytest.approx(0.070992, rel=1e-12)
    assert fig["tokens"] == {"prompt": 12, "completion": 23}
    assert (fig["grid_intensity_g_per_kwh"], fig["pue"], fig["accuracy"]) == (290, 1.2, "estimated")
    assert list(fig) == ["carbon_per_1k_tokens_g", "carbon_g", "energy_wh", "tokens",
                         "grid_intensity_g_per_kwh", "pue", "accuracy"]


def test_spec_example_from_the_example_config() -> None:
    """The figures of etc/lrproxy.toml's gpt-4o-mini and eu-west reproduce SPEC §3's example."""
    cfg = read_config(ROOT / "etc" / "lrproxy.toml")
    region = cfg.regions["eu-west"]
    fig = eco.eco_figures(cfg.models["openai/gpt-4o-mini"], region,
                          eco.current_intensity(region, None, NOW), 12, 23, tokens_measured=True)
    assert (fig["energy_wh"], fig["carbon_g"], fig["carbon_per_1k_tokens_g"]) == pytest.approx(
        (0.008568, 0.00248472, 0.070992), rel=1e-12)
    assert fig["accuracy"] == "estimated"


def test_figures_are_plain_unrounded_floats() -> None:
    """Figures are floats carrying full precision, not rounded to a few digits."""
    fig = eco.eco_figures(MINI, EU_WEST, Intensity(290.0, False), 1, 1, tokens_measured=False)
    expected = energy_wh(1, 1, 0.02, 0.3, 1.2)
    assert type(fig["energy_wh"]) is float and fig["energy_wh"] == pytest.approx(expected, rel=1e-12)
    assert fig["carbon_g"] == pytest.approx(expected / 1000 * 290, rel=1e-12)
    assert fig["carbon_g"] != round(fig["carbon_g"], 6)  # 0.00011136: more digits than 6 places


@pytest.mark.parametrize(("prompt", "completion"), [(1, 0), (0, 1), (1000, 1000), (7, 4093)])
def test_energy_and_carbon_follow_the_formula(prompt: int, completion: int) -> None:
    """energy_wh, carbon_g and carbon per 1k tokens follow SPEC §3 for any token split."""
    region = Region("us-east", grid_intensity_g_per_kwh=380, pue=1.3)
    fig = eco.eco_figures(MINI, region, Intensity(380.0, False), prompt, completion, tokens_measured=True)
    e = energy_wh(prompt, completion, 0.02, 0.3, 1.3)
    assert fig["energy_wh"] == pytest.approx(e, rel=1e-12)
    assert fig["carbon_g"] == pytest.approx(e * 380 / 1000, rel=1e-12)
    assert fig["carbon_per_1k_tokens_g"] == pytest.approx(e * 380 / (prompt + completion), rel=1e-12)


def test_carbon_uses_the_given_intensity_not_the_static_one() -> None:
    """carbon_g is computed from the intensity in force (a live one here), and that figure is reported."""
    fig = eco.eco_figures(MINI, EU_WEST, Intensity(100.0, True), 12, 23, tokens_measured=True)
    assert fig["carbon_g"] == pytest.approx(energy_wh(12, 23, 0.02, 0.3, 1.2) / 1000 * 100, rel=1e-12)
    assert fig["grid_intensity_g_per_kwh"] == 100.0


def test_zero_tokens() -> None:
    """No tokens means no energy, no carbon and carbon per 1k of 0, not a division by zero."""
    fig = eco.eco_figures(MINI, EU_WEST, Intensity(290.0, False), 0, 0, tokens_measured=True)
    assert (fig["energy_wh"], fig["carbon_g"], fig["carbon_per_1k_tokens_g"]) == (0.0, 0.0, 0.0)
    assert fig["tokens"] == {"prompt": 0, "completion": 0}


def test_reference_carbon_per_1k() -> None:
    """Ranking uses a 1k + 1k reference request: (e_prompt + e_completion) × pue × intensity / 2000."""
    assert eco.carbon_per_1k_reference(MINI, 1.2, 290) == pytest.approx((0.02 + 0.3) * 1.2 * 290 / 2000)
    fig = eco.eco_figures(MINI, EU_WEST, Intensity(290.0, False), 1000, 1000, tokens_measured=True)
    assert eco.carbon_per_1k_reference(MINI, 1.2, 290) == pytest.approx(fig["carbon_per_1k_tokens_g"])


# ---------------------------------------------------------------------------------------
# size classes


@pytest.mark.parametrize(("params_b", "e_completion"), [
    (0.5, 0.10), (15, 0.10), (15.001, 0.60), (70, 0.60), (150, 0.60), (150.001, 3.0), (671, 3.0),
])
def test_size_classes_at_their_boundaries(params_b: float, e_completion: float) -> None:
    """≤ 15 B active is small (0.10), ≤ 150 B medium (0.60), above that large (3.0); prefill is 0.1×."""
    e_p, e_c = energy_from_size(params_b)
    assert e_c == e_completion
    assert e_p == pytest.approx(0.1 * e_completion)
    [model] = parse_models({"m/x": {"active_params_b": params_b}}).values()
    assert (model.e_prompt, model.e_completion, model.source) == (e_p, e_c, "size_class")
    assert model.active_params_b == params_b


def test_size_class_model_energy() -> None:
    """A model known only by its size uses its class's figures in the energy formula."""
    [model] = parse_models({"meta/llama-3.1-8b": {"active_params_b": 8}}).values()
    fig = eco.eco_figures(model, EU_WEST, Intensity(290.0, False), 100, 50, tokens_measured=True)
    assert fig["energy_wh"] == pytest.approx(energy_wh(100, 50, 0.01, 0.10, 1.2), rel=1e-12)
    assert fig["accuracy"] == "estimated"


def test_model_without_figures_gets_the_default() -> None:
    """A model with no figures gets the medium class (0.06 / 0.60) and accuracy `default`."""
    [model] = parse_models({"acme/unrated": {}}).values()
    assert (model.e_prompt, model.e_completion, model.source) == (pytest.approx(0.06), 0.60, "default")


def test_configured_figures_win_over_size() -> None:
    """Explicit energy figures are used as given, even when active_params_b is also set."""
    [model] = parse_models({"m/x": {"energy_wh_per_1k_prompt_tokens": 0.5,
                                    "energy_wh_per_1k_completion_tokens": 0.7,
                                    "active_params_b": 8}}).values()
    assert (model.e_prompt, model.e_completion, model.source) == (0.5, 0.7, "config")


# ---------------------------------------------------------------------------------------
# accuracy


def fresh(g: float = 120.0, age: float = 60.0) -> Reading:
    return Reading(g_per_kwh=g, at=NOW - age)


def test_measured_needs_usage_tokens_and_a_fresh_live_reading() -> None:
    """`measured` only when the tokens are the upstream's usage and the intensity a fresh live reading."""
    live = eco.current_intensity(EU_WEST, fresh(), NOW)
    static = eco.current_intensity(EU_WEST, None, NOW)
    assert live == Intensity(120.0, True) and static == Intensity(290.0, False)

    def acc(intensity: Intensity, measured: bool) -> str:
        return str(eco.eco_figures(MINI, EU_WEST, intensity, 5, 5, tokens_measured=measured)["accuracy"])

    assert acc(live, True) == "measured"
    assert acc(live, False) == "estimated"
    assert acc(static, True) == "estimated"
    assert acc(static, False) == "estimated"


def test_stale_reading_falls_back_to_the_static_figure() -> None:
    """A reading older than intensity_max_age_s is ignored: static figure, and `estimated`."""
    stale = fresh(age=3600.5)
    intensity = eco.current_intensity(EU_WEST, stale, NOW)
    assert intensity == Intensity(290.0, False)
    fig = eco.eco_figures(MINI, EU_WEST, intensity, 12, 23, tokens_measured=True)
    assert (fig["grid_intensity_g_per_kwh"], fig["accuracy"]) == (290.0, "estimated")
    assert fig["carbon_g"] == pytest.approx(0.00248472, rel=1e-12)


def test_reading_dated_ahead_counts_only_within_the_skew() -> None:
    """A reading dated ahead (a feed's clock) is live within FUTURE_SKEW_S, and beyond it
    falls back to the static figure, as a stale one does, rather than count until then."""
    assert eco.current_intensity(EU_WEST, fresh(age=-eco.FUTURE_SKEW_S), NOW) == Intensity(
        120.0, True)
    for ahead in (eco.FUTURE_SKEW_S + 1, 365 * 86400.0):
        assert eco.current_intensity(EU_WEST, fresh(age=-ahead), NOW) == Intensity(290.0, False)


def test_reading_exactly_at_max_age_is_still_fresh() -> None:
    """A reading exactly intensity_max_age_s old still counts as live."""
    assert eco.current_intensity(EU_WEST, fresh(age=3600), NOW) == Intensity(120.0, True)


def test_max_age_is_per_region() -> None:
    """Freshness is judged by the region's own intensity_max_age_s."""
    strict = Region("eu-north", grid_intensity_g_per_kwh=30, pue=1.1, intensity_max_age_s=300)
    assert eco.current_intensity(strict, fresh(g=25, age=301), NOW) == Intensity(30.0, False)
    assert eco.current_intensity(strict, fresh(g=25, age=299), NOW) == Intensity(25.0, True)


def test_default_model_accuracy_is_default() -> None:
    """A model on the global default figures reports `default`, even with usage and a live reading."""
    [model] = parse_models({"acme/unrated": {}}).values()
    live = eco.current_intensity(EU_WEST, fresh(), NOW)
    assert eco.eco_figures(model, EU_WEST, live, 5, 5, tokens_measured=True)["accuracy"] == "default"
    assert eco.accuracy(model, False, False) == "default"


# ---------------------------------------------------------------------------------------
# live feed readings


def test_parse_reading_electricity_maps_shape() -> None:
    """The Electricity Maps carbon-intensity/latest answer gives its intensity and datetime."""
    body = orjson.dumps({
        "zone": "DE",
        "carbonIntensity": 302,
        "datetime": "2024-05-21T14:00:00.000Z",
        "updatedAt": "2024-05-21T14:47:09.385Z",
        "createdAt": "2024-05-18T14:49:31.913Z",
        "emissionFactorType": "lifecycle",
        "isEstimated": True,
        "estimationMethod": "TIME_SLICER_AVERAGE",
    })
    reading = eco.parse_reading(body)
    assert reading == Reading(302.0, datetime(2024, 5, 21, 14, 0, tzinfo=UTC).timestamp())
    assert type(reading.g_per_kwh) is float


def test_parse_reading_accepts_offsets_and_fractions() -> None:
    """A numeric offset and a float intensity are read as such."""
    reading = eco.parse_reading(b'{"carbonIntensity": 41.5, "datetime": "2024-05-21T16:00:00+02:00"}')
    assert reading == Reading(41.5, datetime(2024, 5, 21, 14, 0, tzinfo=UTC).timestamp())


@pytest.mark.parametrize(("body", "what"), [
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b'{"carbonIntensity": NaN, "datetime": "2024-05-21T14:00:00Z"}', "not JSON"),
    (b"[302]", "expected a JSON object"),
    (b'{"datetime": "2024-05-21T14:00:00Z"}', "carbonIntensity: expected a number"),
    (b'{"carbonIntensity": null, "datetime": "2024-05-21T14:00:00Z"}', "carbonIntensity: expected a number"),
    (b'{"carbonIntensity": "302", "datetime": "2024-05-21T14:00:00Z"}', "carbonIntensity: expected a number"),
    (b'{"carbonIntensity": true, "datetime": "2024-05-21T14:00:00Z"}', "carbonIntensity: expected a number"),
    (b'{"carbonIntensity": -1, "datetime": "2024-05-21T14:00:00Z"}', "carbonIntensity: must be >= 0"),
    (b'{"carbonIntensity": 1e308, "datetime": "2024-05-21T14:00:00Z"}',
     "carbonIntensity: must be <= 5000"),
    (b'{"carbonIntensity": 302}', "datetime: expected an ISO 8601 string"),
    (b'{"carbonIntensity": 302, "datetime": 1716300000}', "datetime: expected an ISO 8601 string"),
    (b'{"carbonIntensity": 302, "datetime": "yesterday"}', "datetime: "),
    (b'{"carbonIntensity": 302, "datetime": "2024-05-21T14:00:00"}', "datetime: needs a time zone"),
])
def test_parse_reading_errors(body: bytes, what: str) -> None:
    """A malformed feed raises ValueError saying which field is wrong."""
    with pytest.raises(ValueError) as info:
        eco.parse_reading(body)
    assert str(info.value).startswith(what)


# ---------------------------------------------------------------------------------------
# token estimates


@pytest.mark.parametrize(("chars", "tokens"), [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (4001, 1001)])
def test_estimate_tokens_rounds_up_at_four_chars_per_token(chars: int, tokens: int) -> None:
    """Without usage, tokens are estimated as characters / 4, rounded up."""
    assert eco.estimate_tokens(chars) == tokens
