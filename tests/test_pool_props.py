"""Passive health as a state machine (SPEC §2): whatever its upstreams answer, however
time passes and whatever reloads come, a region keeps a usable upstream for every model
it serves: the last usable upstream of a region, for one of its models, is never ejected.

Requests are started, and given their verdicts, in any order: late verdicts, trials whose
client left, reloads while they are in flight (an upstream removed and added back, or
given a new key), as the relay makes them.
"""

from __future__ import annotations

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lrproxy import upstream
from lrproxy.config import Upstream

NAMES = ("a", "b", "c", "d")
REGIONS = ("r1", "r2")
MODELS = ("m1", "m2")


@attrs.define
class InFlight:
    name: str
    held: upstream.Health | None
    trial: bool


# An upstream of a config: (name, region, its models, its identity: its key, say)
_upstream = st.tuples(st.sampled_from(REGIONS),
                      st.sets(st.sampled_from(MODELS), min_size=1),
                      st.sampled_from((b"k1", b"k1", b"k1", b"k2")))  # mostly unchanged
_config = st.dictionaries(st.sampled_from(NAMES), _upstream, min_size=1)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = upstream.Pool()
        self.ups: list[Upstream] = []
        self.now = 0.0
        self.flying: list[InFlight] = []

    def _configure(self, config: dict[str, tuple[str, set[str], bytes]]) -> None:
        self.ups = [Upstream(n, region, f"http://{n}/v1", {m: m for m in models})
                    for n, (region, models, _) in sorted(config.items())]
        self.pool.configure(self.ups, {n: ident for n, (_, _, ident) in config.items()})

    @initialize(config=_config)
    def start(self, config: dict[str, tuple[str, set[str], bytes]]) -> None:
        self._configure(config)

    @rule(config=_config)
    def reload(self, config: dict[str, tuple[str, set[str], bytes]]) -> None:
        self._configure(config)

    @rule(dt=st.sampled_from((0.5, 5.0, upstream.COOL_DOWN_S, 2 * upstream.COOL_DOWN_S,
                              upstream.COOL_DOWN_CAP_S)))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @rule(i=st.integers(0, len(NAMES) - 1))
    def send(self, i: int) -> None:
        """A request to an upstream that is usable now (the relay tries no other)."""
        name = NAMES[i]
        if name in self.pool.health and self.pool.usable(name, self.now):
            held, trial = self.pool.acquire(name, self.now)
            self.flying.append(InFlight(name, held, trial))

    @rule(i=st.integers(0, len(NAMES) - 1), n=st.integers(1, upstream.EJECT_AFTER),
          ok=st.booleans())
    def run_of_answers(self, i: int, n: int, ok: bool) -> None:
        """`n` requests in a row to an upstream while it is usable, each answered at once:
        what ejects one (or keeps it), quicker to come by than one step at a time."""
        name = NAMES[i]
        for _ in range(n):
            if name not in self.pool.health or not self.pool.usable(name, self.now):
                return
            held, trial = self.pool.acquire(name, self.now)
            if ok:
                self.pool.succeeded(name, trial, held)
            else:
                self.pool.failed(name, self.now, None, trial, held, "test")
            self.pool.release(held)

    @precondition(lambda self: bool(self.flying))
    @rule(i=st.integers(0, 7), verdict=st.sampled_from(("ok", "fail", "fail_ra", "none")))
    def answer(self, i: int, verdict: str) -> None:
        r = self.flying.pop(i % len(self.flying))
        if verdict == "ok":
            self.pool.succeeded(r.name, r.trial, r.held)
        elif verdict.startswith("fail"):
            ra = 120.0 if verdict == "fail_ra" else None
            self.pool.failed(r.name, self.now, ra, r.trial, r.held, "test")
        elif r.trial:
            self.pool.abandoned(r.name, r.held)
        self.pool.release(r.held)

    @invariant()
    def every_region_keeps_a_usable_upstream_for_each_of_its_models(self) -> None:
        for region in REGIONS:
            for model in MODELS:
                serving = [u.name for u in self.ups
                           if u.region == region and model in u.models]
                if serving:
                    assert any(self.pool.usable(n, self.now) for n in serving), (
                        region, model, {n: self.pool.health[n] for n in serving})

    @invariant()
    def counts_match_the_requests_in_flight(self) -> None:
        for name, h in self.pool.health.items():
            assert h.outstanding == sum(r.held is h for r in self.flying), name


PoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40,
                                         deadline=None)
test_pool = PoolMachine.TestCase
