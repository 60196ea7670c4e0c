"""Routing (SPEC §2): the candidates for a model and a region pin, ordered by carbon, then load.

The table is built once per config (and again when a live intensity changes); a request
only looks up its tuple and, when there is more than one usable candidate, sorts by load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import attrs

from lrproxy import eco
from lrproxy.config import AUTO_MODEL, Config, Model, Region, Upstream
from lrproxy.errors import ModelNotFound, ModelNotInRegion, UnknownRegion, printable


@attrs.frozen
class Candidate:
    """One way to serve a request: a LowRouter model on one upstream."""

    model: Model
    upstream: Upstream
    upstream_model: str
    region: Region
    carbon_per_1k: float
    # The region's static figure, as eco.current_intensity gives it without a live reading.
    static_intensity: eco.Intensity = attrs.field(init=False, eq=False, default=attrs.Factory(
        lambda c: eco.Intensity(c.region.grid_intensity_g_per_kwh, False), takes_self=True))


@attrs.frozen
class RoutingTable:
    by_model: Mapping[str, tuple[Candidate, ...]]  # every model and AUTO_MODEL, by carbon
    regions: tuple[str, ...]
    auto_models: tuple[str, ...] = ()  # what AUTO_MODEL chooses among, served or not


def build_table(config: Config, intensities: Mapping[str, float]) -> RoutingTable:
    """Every (model, upstream) pair with its reference carbon, sorted lowest first."""
    by_model: dict[str, list[Candidate]] = {mid: [] for mid in config.models}
    for up in config.upstreams:
        region = config.regions[up.region]
        intensity = intensities.get(region.name, region.grid_intensity_g_per_kwh)
        for mid, name in up.models.items():
            model = config.models[mid]
            c = Candidate(model, up, name, region, eco.carbon_per_1k_reference(model, region.pue, intensity))
            by_model[mid].append(c)
    auto = [c for mid in config.auto_models for c in by_model[mid]]
    table = {mid: tuple(sorted(cs, key=_carbon)) for mid, cs in by_model.items()}
    table[AUTO_MODEL] = tuple(sorted(auto, key=_carbon))
    return RoutingTable(table, tuple(sorted(config.regions)), tuple(config.auto_models))


def _carbon(c: Candidate) -> float:
    return c.carbon_per_1k


def pick_candidates(
    table: RoutingTable, model_id: str, region: str | None, region_param: str | None = "route.region"
) -> tuple[Candidate, ...]:
    """The candidates for a model, within the pinned region if any; raises the §1 errors.

    `region_param` names where the pin came from in errors (the header's name for
    the header).
    """
    cands = table.by_model.get(model_id)
    if cands is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
    if not cands:  # a 404, not a 503: no retry will change it before a reload
        if model_id != AUTO_MODEL:
            why = f"The model '{model_id}' is not served by any upstream of this proxy"
        else:
            why = (f"The model '{model_id}' has no models to choose from on this proxy ("
                   + ("no upstream serves its [auto] models)" if table.auto_models
                      else "its config has no [auto] models)"))
        raise ModelNotFound(why, param="model")
    if region is None:
        return cands
    if region not in table.regions:
        raise UnknownRegion(
            f"Unknown region '{printable(region[:40])}'; configured regions: "
            f"{', '.join(table.regions)}",
            param=region_param,
        )
    pinned = tuple(c for c in cands if c.region.name == region)
    if not pinned:
        raise ModelNotInRegion(
            f"The model '{model_id}' is not offered in region '{region}'", param="model"
        )
    return pinned


def order_candidates(
    cands: Sequence[Candidate], usable: Callable[[str], bool], load: Callable[[str], int],
    last_resort: Callable[[str], bool] = lambda name: False,
) -> list[Candidate]:
    """Usable candidates, lowest carbon first; equal carbon goes to the least loaded.
    A `last_resort` one (failing, kept as its region's last: Pool.last_resort) comes
    after the rest."""
    ok = [c for c in cands if usable(c.upstream.name)]
    if len(ok) > 1:
        ok.sort(key=lambda c: (last_resort(c.upstream.name), c.carbon_per_1k,
                               load(c.upstream.name)))
    return ok


def unserved(table: RoutingTable) -> list[str]:
    """Model ids (lowrouter/auto included) that no upstream serves: each answers 404."""
    return [mid for mid, cands in table.by_model.items() if not cands]
