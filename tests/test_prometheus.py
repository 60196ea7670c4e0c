"""Prometheus side (SPEC §5): the shipped config and rules pass promtool, and a real
Prometheus scraping a real `lrproxy serve` process sees what the clients were told.

Needs Debian's `prometheus` and `promtool`; without them the tests skip, except in CI
(`CI=true`), where a missing binary is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import openai
import pytest
from conftest import CI_KEY, TEAM_A_KEY, UPSTREAM_KEYS
from procs import bound_ports

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "etc" / "prometheus"
CLIENT_KEY = TEAM_A_KEY
UPSTREAM_KEY = UPSTREAM_KEYS["eu-west-a"]
PROMPT = "zanzibar quokka marmalade 7731 tell me a secret"
ANSWER = "plugh xyzzy frobnicate 4417 answer"
SECRETS = (TEAM_A_KEY, CI_KEY, *UPSTREAM_KEYS.values(), "zanzibar", "quokka", "plugh", "xyzzy",
           "frobnicate")
MODEL = "openai/gpt-4o-mini"

CONFIG = """
[server]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{metrics_port}"
shutdown_grace_s = 2

[auth]
keys = [{{ name = "team-p", key_env = "LRPROXY_TEST_KEY" }}]

[regions.eu-west]
grid_intensity_g_per_kwh = {intensity}
pue = 1.2

[models."openai/gpt-4o-mini"]
energy_wh_per_1k_prompt_tokens = 0.02
energy_wh_per_1k_completion_tokens = 0.3

[[upstreams]]
name = "sim-eu"
region = "eu-west"
base_url = "{sim_url}"
api_key_env = "LRPROXY_TEST_UPSTREAM_KEY"
models = {{ "openai/gpt-4o-mini" = "gpt-4o-mini" }}
"""

PROMETHEUS = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: lrproxy
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
"""


def _tool(name: str) -> str:
    """The binary's path; a skip without it, a failure in CI."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK)
                                  else None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required in CI (apt-get install prometheus)")
        pytest.skip(f"{name} is not installed")
    return path


def _wait_for(what: str, probe: Callable[[], Any], timeout: float) -> Any:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            last = probe()
            if last:
                return last
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as r:
        body = r.read()
    return json.loads(body) if body.lstrip().startswith((b"{", b"[")) else body


class Procs:
    """Processes started by a test; each is stopped by its PID at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes], IO[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Any:
        out = open(self.tmp / f"{name}.out", "w+b")  # noqa: SIM115  # closed in stop_all
        err = open(self.tmp / f"{name}.err", "w+b")  # noqa: SIM115
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=self.tmp)
        self.procs.append((p, out, err))
        return p

    @staticmethod
    def stop(p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def stop_all(self) -> None:
        for p, out, err in reversed(self.procs):
            self.stop(p)
            out.close()
            err.close()

    def output(self, name: str) -> tuple[bytes, bytes]:
        return (self.tmp / f"{name}.out").read_bytes(), (self.tmp / f"{name}.err").read_bytes()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.stop_all()


# ---------------------------------------------------------------------------------------
# promtool


def test_promtool_check_config() -> None:
    """promtool accepts etc/prometheus/prometheus.yml and the rule file it names."""
    r = subprocess.run([_tool("promtool"), "check", "config", "prometheus.yml"], cwd=PROM_DIR,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_rules() -> None:
    """promtool accepts every recording rule and alert in lrproxy-rules.yml."""
    r = subprocess.run([_tool("promtool"), "check", "rules", "lrproxy-rules.yml"], cwd=PROM_DIR,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_rule_unit_tests() -> None:
    """The alerts and recording rules behave as lrproxy-rules.test.yml says."""
    r = subprocess.run([_tool("promtool"), "test", "rules", "lrproxy-rules.test.yml"],
                       cwd=PROM_DIR, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------
# a real scrape


def _chat(client: openai.OpenAI, **kw: Any) -> dict[str, Any]:
    """Send one chat request (streamed or not); the `lowrouter` object the client got."""
    kw = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
          "extra_body": {"sim": {"text": ANSWER}}, **kw}
    if not kw.get("stream"):
        return client.chat.completions.create(**kw).model_extra["lowrouter"]  # type: ignore[no-any-return]
    found = [c.model_extra["lowrouter"] for c in client.chat.completions.create(**kw)
             if c.model_extra.get("lowrouter")]
    assert len(found) == 1
    return found[0]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_prometheus_scrapes_what_clients_were_told(tmp_path: Path, procs: Procs) -> None:
    """A real Prometheus scraping `lrproxy serve` sums to the clients' carbon and tokens."""
    prometheus = _tool("prometheus")
    env = {**os.environ, "LRPROXY_TEST_KEY": CLIENT_KEY, "LRPROXY_TEST_UPSTREAM_KEY": UPSTREAM_KEY,
           "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)

    sim = procs.start("sim", [sys.executable, "-m", "lrproxy.simupstream", "--listen",
                              "127.0.0.1:0", "--api-key", UPSTREAM_KEY, "--models", "gpt-4o-mini"])

    def sim_url() -> str | None:
        assert sim.poll() is None, procs.output("sim")
        for line in procs.output("sim")[0].decode().splitlines():
            if line.startswith("SIM_BASE_URL="):
                return line.partition("=")[2]
        return None

    url = _wait_for("the simulated upstream", sim_url, 15)
    cfg = tmp_path / "lrproxy.toml"
    fill = {"port": 0, "metrics_port": 0, "sim_url": url}
    cfg.write_text(CONFIG.format(intensity=290, **fill))
    proxy = procs.start("lrproxy", [sys.executable, "-m", "lrproxy", "serve", "--config",
                                    str(cfg)], env=env)

    def bound() -> tuple[int, int] | None:
        assert proxy.poll() is None, procs.output("lrproxy")
        err = procs.output("lrproxy")[1].decode()
        ports, metrics = bound_ports(err), re.search(r"/metrics on http://127\.0\.0\.1:(\d+)/", err)
        return (ports[0], int(metrics[1])) if ports and metrics else None

    port, metrics_port = _wait_for("lrproxy's start line", bound, 15)

    def healthy() -> bool:
        assert proxy.poll() is None, procs.output("lrproxy")
        return bool(_get(f"http://127.0.0.1:{port}/healthz"))

    _wait_for("lrproxy /healthz", healthy, 15)
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS.format(
        rules=PROM_DIR / "lrproxy-rules.yml", metrics_port=metrics_port))
    prom = procs.start("prometheus", [
        prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        "--web.listen-address=127.0.0.1:0", "--web.enable-lifecycle",
        "--log.level=info",  # for its line naming the port it bound
    ])

    def prom_bound() -> str | None:
        assert prom.poll() is None, procs.output("prometheus")
        m = re.search(r'msg="Listening on" address=(127\.0\.0\.1:\d+)',
                      procs.output("prometheus")[1].decode())
        return m[1] if m else None

    api = f"http://{_wait_for('the port Prometheus bound', prom_bound, 20)}"

    def ready() -> bool:
        assert prom.poll() is None, procs.output("prometheus")
        return bool(_get(f"{api}/-/ready"))

    _wait_for("Prometheus /-/ready", ready, 20)

    # Traffic through the OpenAI SDK: plain, streamed with and without usage.
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key=CLIENT_KEY,
                           max_retries=0, timeout=20)
    told = [
        _chat(client), _chat(client),
        _chat(client, stream=True, stream_options={"include_usage": True}),
        _chat(client, stream=True),
    ]
    client.close()
    carbon = sum(lr["eco"]["carbon_g"] for lr in told)
    tokens = sum(lr["eco"]["tokens"]["prompt"] + lr["eco"]["tokens"]["completion"]
                 for lr in told)
    assert carbon > 0 and tokens > 0

    def query(q: str) -> float | None:
        doc = _get(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": q}))
        result = doc["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def matches(q: str, want: float) -> Callable[[], bool]:
        def probe() -> bool:
            got = query(q)
            return got is not None and got == pytest.approx(want, rel=1e-9)
        return probe

    _wait_for("Prometheus to see the carbon",
              matches("sum(lrproxy_carbon_grams_total)", carbon), 20)
    _wait_for("Prometheus to see the tokens", matches("sum(lrproxy_tokens_total)", tokens), 20)
    assert query('sum(lrproxy_requests_total{code="200"})') == 4
    assert query('lrproxy_grid_intensity_g_per_kwh{region="eu-west"}') == 290

    # A broken config on SIGHUP is refused, counted, and fires the reload alert.
    cfg.write_text(CONFIG.format(intensity='"lots"', **fill))
    proxy.send_signal(signal.SIGHUP)
    _wait_for("the failed reload to be scraped",
              lambda: query('lrproxy_config_reloads_total{result="error"}') == 1, 20)

    def alert_firing() -> bool:
        alerts = _get(f"{api}/api/v1/alerts")["data"]["alerts"]
        return any(a["labels"]["alertname"] == "LrproxyConfigReloadFailed"
                   and a["state"] == "firing" for a in alerts)

    _wait_for("LrproxyConfigReloadFailed to fire", alert_firing, 20)
    groups = _get(f"{api}/api/v1/rules")["data"]["groups"]
    assert {g["name"] for g in groups} == {"lrproxy-carbon", "lrproxy-traffic", "lrproxy-alerts"}
    for g in groups:
        for rule in g["rules"]:
            assert rule["health"] in ("ok", "unknown"), rule

    # Stop lrproxy cleanly, then read everything it printed.
    procs.stop(proxy)
    assert proxy.returncode == 0
    out, err = procs.output("lrproxy")
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert len(lines) == 4
    assert {(f["key"], f["model"], f["region"], f["upstream"], f["status"]) for f in lines} == {
        ("team-p", MODEL, "eu-west", "sim-eu", 200)}
    assert sum(f["carbon_g"] for f in lines) == pytest.approx(carbon, rel=1e-9)
    assert "reload refused" in err.decode()
    for line in err.decode().splitlines():
        json.loads(line)  # the default --log-format is JSON lines
    printed = out + err + b"".join(procs.output("sim"))
    for secret in SECRETS:
        assert secret.encode() not in printed, secret
