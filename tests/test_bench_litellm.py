"""bench/run.py's optional LiteLLM column (`--litellm PATH`): its config, its bounds."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def _bench(run: Any, tmp_path: Path, litellm: str | None) -> Any:
    ns = type("Args", (), {"loop": "asyncio", "scenarios": "wrk,gaps,slow,memory",
                           "workers_upstream": "sim", "prompt_kib": 0, "only": None,
                           "litellm": litellm})()
    b = run.Bench(ns, run.FULL)
    shutil.rmtree(b.tmp)
    b.tmp = tmp_path
    return b


def test_litellm_is_a_target_only_when_given(tmp_path: Path) -> None:
    run = _run_module()
    names = [t.name for t in _bench(run, tmp_path, None).targets()]
    assert "litellm" not in names
    ts = {t.name: t for t in _bench(run, tmp_path, "/opt/ll/bin/litellm").targets()}
    assert ts["litellm"].heavy and ts["litellm"].model == run.SIM_MODEL
    assert not any(t.heavy for n, t in ts.items() if n != "litellm")


def test_litellm_config_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run.py writes LiteLLM's config into its temp dir: the sim as an openai/ model at
    its api_base with the sim's key, the bench key as master key; pinned to the proxy core."""
    run = _run_module()
    b = _bench(run, tmp_path, "/opt/ll/bin/litellm")
    b.sim_port = 12345
    started: dict[str, Any] = {}

    def fake_start(argv: list[str], *, log: Path, env: dict[str, str] | None = None,
                   **kw: Any) -> object:
        started.update(argv=argv, env=env)
        return object()

    monkeypatch.setattr(b.procs, "start", fake_start)
    monkeypatch.setattr(run, "wait_port", lambda *a, **k: None)
    t = next(t for t in b.targets() if t.name == "litellm")
    b.start_litellm(t)
    cfg = (tmp_path / "litellm.yaml").read_text()
    assert f"model_name: {run.SIM_MODEL}" in cfg
    assert f"model: openai/{run.SIM_MODEL}" in cfg
    assert "api_base: http://127.0.0.1:12345/v1" in cfg
    assert cfg.count(b.key) == 2  # the sim's key, and the master key clients present
    argv = started["argv"]
    assert argv[:3] == ["taskset", "-c", run.PROXY_CORE]
    assert argv[3] == "/opt/ll/bin/litellm"
    assert argv[argv.index("--port") + 1] == str(t.port)
    assert started["env"]["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"


def test_litellm_plan_is_bounded(tmp_path: Path) -> None:
    """LiteLLM (~100 req/s) gets a small share of the requests; the others the plan."""
    run = _run_module()
    b = _bench(run, tmp_path, "/opt/ll/bin/litellm")
    ts = {t.name: t for t in b.targets()}
    assert b.plan_for(ts["minimal"]) is b.plan
    p = b.plan_for(ts["litellm"])
    assert p.mem_total <= 1000 and p.mem_first <= 200 and p.warmup <= 30
    assert p.slow_streams <= 200 and p.wrk_s <= 3
    assert b.conns(ts["litellm"], 64) == run.LITELLM_CONNS <= 16
    assert b.conns(ts["minimal"], 64) == 64


def test_litellm_path_must_be_executable(capsys: pytest.CaptureFixture[str]) -> None:
    if not (shutil.which("wrk") and shutil.which("taskset")):
        pytest.skip("run.py checks wrk and taskset first")
    run = _run_module()
    assert run.main(["--litellm", "/nonexistent/litellm"]) == 2
    assert "--litellm /nonexistent/litellm: no such executable" in capsys.readouterr().err
