"""Shared fixtures: a real lrproxy in front of real simulated upstreams, all on 127.0.0.1.

`Stack` runs the proxy and the simulators in an event loop of their own, in a thread,
so the synchronous OpenAI SDK, the async SDK (in the test's loop) and raw sockets can
all talk to it, while tests still read the simulators' records and the proxy's metrics.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import openai
import pytest
from aiohttp import web
from procs import SimThread
from prometheus_client import CollectorRegistry

from lrproxy.app import RUNTIME, Runtime, make_app
from lrproxy.config import Config, parse_config, resolve_secrets
from lrproxy.protocol import Runner
from lrproxy.simupstream import SimUpstream

T = TypeVar("T")

TEAM_A_KEY = "sk-team-a-7c1d9e"
CI_KEY = "sk-ci-0b5f44"
UPSTREAM_KEYS = {
    "eu-west-a": "up-eu-west-a-CANARY-1f2e",
    "eu-west-b": "up-eu-west-b-CANARY-3d4c",
    "eu-north-a": "up-eu-north-a-CANARY-5b6a",
    "us-east-a": "up-us-east-a-CANARY-7988",
}
MODEL_MAP = {"openai/gpt-4o-mini": "gpt-4o-mini", "meta/llama-3.1-8b": "llama-3.1-8b"}


def base_config() -> dict[str, Any]:
    """The test topology: three regions, four upstreams; base_url filled in by Stack."""
    return {
        "server": {"listen": "127.0.0.1:0", "retries": 2},
        "timeouts": {"connect": 2, "first_byte": 10, "idle": 10, "keepalive": 15},
        "auth": {"keys": [
            {"name": "team-a", "sha256": hashlib.sha256(TEAM_A_KEY.encode()).hexdigest()},
            {"name": "ci", "key_env": "LRPROXY_KEY_CI"},
        ]},
        "regions": {
            "eu-west": {"grid_intensity_g_per_kwh": 290, "pue": 1.2},
            "eu-north": {"grid_intensity_g_per_kwh": 30, "pue": 1.1},
            "us-east": {"grid_intensity_g_per_kwh": 380, "pue": 1.3},
        },
        "models": {
            "openai/gpt-4o-mini": {"energy_wh_per_1k_prompt_tokens": 0.02,
                                   "energy_wh_per_1k_completion_tokens": 0.3},
            "meta/llama-3.1-8b": {"active_params_b": 8},
            "acme/unrated": {},
        },
        "upstreams": [
            {"name": "eu-west-a", "region": "eu-west", "models": dict(MODEL_MAP),
             "api_key_env": "UP_EU_WEST_A"},
            {"name": "eu-west-b", "region": "eu-west", "models": dict(MODEL_MAP),
             "api_key_env": "UP_EU_WEST_B"},
            {"name": "eu-north-a", "region": "eu-north",
             "models": {"meta/llama-3.1-8b": "llama-3.1-8b", "acme/unrated": "unrated-1"},
             "api_key_env": "UP_EU_NORTH_A"},
            {"name": "us-east-a", "region": "us-east", "models": dict(MODEL_MAP),
             "api_key_env": "UP_US_EAST_A"},
        ],
        "auto": {"models": ["openai/gpt-4o-mini", "meta/llama-3.1-8b"]},
    }


ENVIRON = {
    "LRPROXY_KEY_CI": CI_KEY,
    "UP_EU_WEST_A": UPSTREAM_KEYS["eu-west-a"],
    "UP_EU_WEST_B": UPSTREAM_KEYS["eu-west-b"],
    "UP_EU_NORTH_A": UPSTREAM_KEYS["eu-north-a"],
    "UP_US_EAST_A": UPSTREAM_KEYS["us-east-a"],
}


class Stack:
    """lrproxy and its simulated upstreams, serving from a background thread."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sims: dict[str, SimUpstream] = {}
        self.registry = CollectorRegistry()
        self.key = TEAM_A_KEY
        self._clients: list[openai.OpenAI] = []  # closed with the stack: no socket left to GC
        try:
            self.run(self._start())
        except BaseException:  # what started is stopped, the loop's thread ended
            self.close()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function in the server's loop (to touch its state safely)."""

        async def wrap() -> T:
            return fn()

        return self.run(wrap())

    async def _start(self) -> None:
        for u in self.data["upstreams"]:
            if "base_url" not in u:
                sim = SimUpstream(name=u["name"], api_key=UPSTREAM_KEYS.get(u["name"]),
                                  models=sorted(set(u["models"].values())))
                u["base_url"] = await sim.start()
                self.sims[u["name"]] = sim
        self.config: Config = parse_config(self.data, source="test")
        self.app = make_app(self.config, resolve_secrets(self.config, ENVIRON),
                            registry=self.registry)
        self.runner = Runner(self.app, header_timeout=self.config.timeouts.client_header,
                             access_log=None, handler_cancellation=True, shutdown_timeout=2,
                             max_connections=self.config.server.max_connections or None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.origin = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.origin}/api/v1"
        self.port = port

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    def client(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("api_key", self.key)
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 20)
        client = openai.OpenAI(base_url=self.base_url, **kw)
        self._clients.append(client)
        return client

    def aclient(self, **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("api_key", self.key)
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 20)
        return openai.AsyncOpenAI(base_url=self.base_url, **kw)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value, 0.0 when the series does not exist (yet)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def metric_sum(self, name: str, **match: str) -> float:
        total = 0.0
        for fam in self.registry.collect():
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                    total += s.value
        return total

    def requests_to(self, name: str) -> list[Any]:
        return [r for r in self.sims[name].requests if r.path.endswith(("completions", "embeddings"))]

    def close(self) -> None:
        for client in self._clients:
            client.close()

        async def stop() -> None:
            if hasattr(self, "runner"):  # (not when its start failed before it)
                await self.runner.cleanup()
            for sim in self.sims.values():
                await sim.stop()

        try:
            self.run(stop(), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def wait_for(cond: Callable[[], Any], timeout: float = 3.0) -> None:
    """Poll until `cond()` is true (the server runs in another thread); bounded."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.005)


async def await_for(cond: Callable[[], Any], timeout: float = 3.0) -> None:
    """`wait_for` from a coroutine, yielding to the test's own event loop."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimThread]:
    """A simulated upstream in a thread, for the tests that run lrproxy as a process."""
    s = SimThread()
    yield s
    s.close()


@pytest.fixture
def make_stack() -> Iterator[Callable[..., Stack]]:
    """Build a Stack; `mutate(data)` edits the config mapping before it starts."""
    stacks: list[Stack] = []

    def make(mutate: Callable[[dict[str, Any]], None] | None = None) -> Stack:
        data = copy.deepcopy(base_config())
        if mutate is not None:
            mutate(data)
        s = Stack(data)
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        s.close()


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack()
