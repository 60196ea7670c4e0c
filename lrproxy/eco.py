"""The eco model (SPEC §3): tokens, model and region in; energy, carbon and accuracy out.

Pure arithmetic: no clock (callers pass `now`), no I/O. Energy figures per model come
from config or from the EcoLogits-style size classes resolved in `config.py`.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Final, Literal

import attrs
import orjson

from lrproxy.config import MAX_INTENSITY, Model, Region

Accuracy = Literal["measured", "estimated", "default"]
CHARS_PER_TOKEN: Final = 4  # the usual rule of thumb for English text with BPE tokenizers


@attrs.frozen
class Reading:
    """A live grid-intensity reading (Electricity Maps `carbon-intensity/latest` shape)."""

    g_per_kwh: float
    at: float  # epoch seconds of the reading's `datetime`


@attrs.frozen
class Intensity:
    g_per_kwh: float
    live: bool


def current_intensity(region: Region, reading: Reading | None, now: float) -> Intensity:
    """The live reading when fresh enough, else the region's static figure (SPEC §3).
    A reading dated over FUTURE_SKEW_S ahead is no live one: a feed whose clock is off
    (or whose updater stopped after a wrong date) would else count until that date."""
    if (reading is not None
            and -FUTURE_SKEW_S <= now - reading.at <= region.intensity_max_age_s):
        return Intensity(reading.g_per_kwh, True)
    return Intensity(region.grid_intensity_g_per_kwh, False)


FUTURE_SKEW_S: Final = 300.0  # how far ahead of this clock a feed's may run


MAX_FEED_BYTES: Final = 65536  # a carbon-intensity/latest answer is a few hundred


def parse_reading(data: bytes) -> Reading:
    """Parse a feed file (read up to MAX_FEED_BYTES + 1 bytes, to tell a larger one);
    raises ValueError naming what is wrong."""
    if len(data) > MAX_FEED_BYTES:
        raise ValueError(f"larger than {MAX_FEED_BYTES // 1024} KiB: not a "
                         "carbon-intensity/latest answer")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    value = doc.get("carbonIntensity")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("carbonIntensity: expected a number")
    if value < 0:
        raise ValueError("carbonIntensity: must be >= 0")
    if value > MAX_INTENSITY:
        raise ValueError(f"carbonIntensity: must be <= {MAX_INTENSITY:g}")
    stamp = doc.get("datetime")
    if not isinstance(stamp, str):
        raise ValueError("datetime: expected an ISO 8601 string")
    try:
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"datetime: {e}") from e
    if at.tzinfo is None:
        raise ValueError("datetime: needs a time zone (e.g. a trailing Z)")
    return Reading(float(value), at.timestamp())


def carbon_per_1k_reference(model: Model, pue: float, intensity: float) -> float:
    """g CO2e per 1k tokens of a reference request of 1k prompt + 1k completion (SPEC §2)."""
    return (model.e_prompt + model.e_completion) * pue * intensity / 2000


def estimate_tokens(chars: int) -> int:
    """Tokens for `chars` characters of text when the upstream sent no usage."""
    return -(-chars // CHARS_PER_TOKEN)


def accuracy(model: Model, tokens_measured: bool, intensity_live: bool) -> Accuracy:
    if model.source == "default":
        return "default"
    return "measured" if tokens_measured and intensity_live else "estimated"


def eco_figures(
    model: Model,
    region: Region,
    intensity: Intensity,
    prompt_tokens: int,
    completion_tokens: int,
    *,
    tokens_measured: bool,
) -> dict[str, Any]:
    """The `lowrouter.eco` object of SPEC §3, in plain (unrounded) floats."""
    energy_wh = (
        (prompt_tokens * model.e_prompt + completion_tokens * model.e_completion)
        / 1000
        * region.pue
    )
    carbon_g = energy_wh / 1000 * intensity.g_per_kwh
    total = prompt_tokens + completion_tokens
    return {
        "carbon_per_1k_tokens_g": carbon_g * 1000 / total if total else 0.0,
        "carbon_g": carbon_g,
        "energy_wh": energy_wh,
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens},
        "grid_intensity_g_per_kwh": intensity.g_per_kwh,
        "pue": region.pue,
        "accuracy": accuracy(model, tokens_measured, intensity.live),
    }
