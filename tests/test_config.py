"""Config (SPEC §4): the example files, every kind of problem, secrets, check-config, hash-key."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lrproxy import cli, config
from lrproxy.config import (
    Config,
    ConfigError,
    Listen,
    ServerConfig,
    Timeouts,
    parse_config,
    read_config,
    resolve_secrets,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_TOML = ROOT / "etc" / "lrproxy.toml"
EXAMPLE_INI = ROOT / "etc" / "lrproxy.ini"
EX_CONFIG = 78


def base_toml(upstream_extra: str = "", tail: str = "") -> str:
    """A small valid config; `upstream_extra` goes into its one upstream, `tail` after it."""
    return f"""
[regions.eu-west]
grid_intensity_g_per_kwh = 290
pue = 1.2

[models."openai/gpt-4o-mini"]
energy_wh_per_1k_prompt_tokens = 0.02
energy_wh_per_1k_completion_tokens = 0.3

[[upstreams]]
name = "eu-west-a"
region = "eu-west"
base_url = "https://eu.example.com/v1"
models = {{ "openai/gpt-4o-mini" = "gpt-4o-mini" }}
{upstream_extra}

{tail}
"""


BASE_INI = """
[region:eu-west]
grid_intensity_g_per_kwh = 290
pue = 1.2

[model:openai/gpt-4o-mini]
energy_wh_per_1k_prompt_tokens = 0.02
energy_wh_per_1k_completion_tokens = 0.3
"""


def write(tmp_path: Path, text: str, name: str = "lrproxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    """The problem lines read_config reports for a file (none when it is valid)."""
    try:
        read_config(path)
    except ConfigError as e:
        return e.problems
    return []


def check(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, list[str], list[str]]:
    """Run `lrproxy check-config PATH`: exit status, stdout lines, stderr lines."""
    rc = cli.main(["check-config", str(path)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def same(a: Config, b: Config) -> bool:
    return attrs.evolve(a, source="-") == attrs.evolve(b, source="-")


# ---------------------------------------------------------------------------------------
# the example configs


def test_example_toml_and_ini_load_to_the_same_config() -> None:
    """etc/lrproxy.toml and etc/lrproxy.ini describe the same Config, apart from `source`."""
    toml_cfg, ini_cfg = read_config(EXAMPLE_TOML), read_config(EXAMPLE_INI)
    assert (toml_cfg.source, ini_cfg.source) == ("lrproxy.toml", "lrproxy.ini")
    assert attrs.evolve(ini_cfg, source="x") == attrs.evolve(toml_cfg, source="x")


def test_example_configs_saved_with_a_bom_load_as_without(tmp_path: Path) -> None:
    """A config a Windows editor saved with a UTF-8 BOM loads as the same file without
    it, TOML and INI; it was refused, with "not valid TOML: Invalid statement (at line 1,
    column 1)" or "not valid INI: File contains no section headers"."""
    for shipped in (EXAMPLE_TOML, EXAMPLE_INI):
        copy = tmp_path / Path(shipped).name
        copy.write_bytes(b"\xef\xbb\xbf" + Path(shipped).read_bytes())
        assert read_config(copy) == read_config(shipped)


def test_example_config_has_the_spec_topology() -> None:
    """The example declares eu-west and us-east, both model kinds, three upstreams, keys and auto."""
    cfg = read_config(EXAMPLE_TOML)
    assert {"eu-west", "us-east"} <= set(cfg.regions)
    assert cfg.regions["eu-west"].grid_intensity_g_per_kwh == 290
    assert cfg.regions["eu-west"].pue == 1.2
    mini = cfg.models["openai/gpt-4o-mini"]
    assert (mini.e_prompt, mini.e_completion, mini.source) == (0.02, 0.3, "config")
    assert [m.source for m in cfg.models.values()].count("size_class") >= 1
    by_region = {r: [u for u in cfg.upstreams if u.region == r] for r in cfg.regions}
    assert len(by_region["eu-west"]) == 2 and len(by_region["us-east"]) == 1
    # Active sources: only what systemd/lrproxy.service provides (test_systemd.py); the
    # other kinds are shown commented (test_example_configs_mention_every_key).
    assert any(u.api_key_file for u in cfg.upstreams)
    assert all(k.sha256 for k in cfg.keys)
    assert "openai/gpt-4o-mini" in cfg.auto_models


def test_example_config_uses_the_spec_defaults() -> None:
    """The example's [server] and [timeouts] values are SPEC §4's, which are also the built-in defaults."""
    cfg = read_config(EXAMPLE_TOML)
    spec_server = ServerConfig(
        listen=Listen("127.0.0.1", 8080), metrics_listen=Listen("127.0.0.1", 9464),
        max_body_bytes=8_388_608, retries=2, shutdown_grace_s=30, workers=1, trust_env=False,
    )
    assert cfg.server == spec_server
    assert cfg.server == attrs.evolve(ServerConfig(), metrics_listen=Listen("127.0.0.1", 9464))
    spec_timeouts = Timeouts(connect=5, first_byte=60, idle=120, total=1800, keepalive=15,
                             client_header=10, client_body=60, pool_idle=4)
    assert cfg.timeouts == spec_timeouts == Timeouts()


@pytest.mark.parametrize("path", [EXAMPLE_TOML, EXAMPLE_INI], ids=["toml", "ini"])
def test_example_configs_mention_every_key(path: Path) -> None:
    """Each example names every key the parser accepts (set, or commented out with its value)."""
    text = path.read_text(encoding="utf-8")
    schemas: list[Mapping[str, Any]] = [
        config._SERVER, config._TIMEOUTS, config._KEY, config._REGION, config._MODEL, config._UPSTREAM
    ]
    keys = {k for schema in schemas for k in schema} - {"name"}  # INI: names are section names
    missing = [k for k in sorted(keys) if not re.search(rf"(?m)(?:^|[#\s{{,]){k} = \S", text)]
    assert missing == []


def test_example_secrets_resolve_under_the_service(tmp_path: Path) -> None:
    """With the one credential the unit loads, the example's keys all resolve."""
    (tmp_path / "openai-key").write_text("sk-openai\n")
    cfg = read_config(EXAMPLE_TOML)
    secrets = resolve_secrets(cfg, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert secrets.upstream_keys == {"eu-west-a": "sk-openai", "eu-west-b": None,
                                     "us-east-a": "sk-openai"}
    hashes = dict(secrets.client_hashes)
    assert hashes["ci"] == hashlib.sha256(b"sk-ci-example").digest()
    assert set(hashes) == {"team-a", "ci"}


@pytest.mark.parametrize("path", [EXAMPLE_TOML, EXAMPLE_INI], ids=["toml", "ini"])
def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    """`lrproxy check-config` on an example exits 0, prints one ok line and nothing on stderr."""
    rc, out, err = check(capsys, path)
    assert (rc, err) == (0, [])
    assert out == [f"{path}: ok (3 upstreams, 2 models, 2 regions)"]


def test_check_config_as_a_real_process() -> None:
    """`python -m lrproxy check-config etc/lrproxy.toml` exits 0 in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    r = subprocess.run([sys.executable, "-m", "lrproxy", "check-config", "etc/lrproxy.toml"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("etc/lrproxy.toml: ok")


def test_check_config_warns_as_serve_does(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A legal config that serve would warn about (a model no upstream serves: its
    requests get 404; no client keys: every request gets 401) passes check-config,
    exit 0, with the same warnings on stderr, so that a slip is seen before the reload."""
    text = EXAMPLE_TOML.read_text()
    text = text.replace('[models."openai/gpt-4o-mini"]', '[models."acme/unserved"]\n'
                        'energy_wh_per_1k_prompt_tokens = 0.02\n'
                        'energy_wh_per_1k_completion_tokens = 0.3\n\n'
                        '[models."openai/gpt-4o-mini"]', 1)
    path = tmp_path / "lrproxy.toml"
    path.write_text(text)
    rc, out, err = check(capsys, path)
    assert rc == 0 and out == [f"{path}: ok (3 upstreams, 3 models, 2 regions)"]
    assert err == [f"{path}: warning: model acme/unserved is served by no upstream: "
                   "requests for it get 404"]


def test_check_config_exits_78_as_a_real_process(tmp_path: Path) -> None:
    """A broken config makes `python -m lrproxy check-config` exit 78 with its problem on stderr."""
    path = write(tmp_path, base_toml(tail='[server]\nretries = "two"'))
    r = subprocess.run([sys.executable, "-m", "lrproxy", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == EX_CONFIG
    assert r.stderr == "lrproxy.toml: server.retries: expected an integer (got 'two')\n"
    assert r.stdout == ""


# ---------------------------------------------------------------------------------------
# one test per kind of problem, each with its exact line


def test_small_base_config_is_valid(tmp_path: Path) -> None:
    """The base config the problem tests start from has no problem of its own."""
    assert problems(write(tmp_path, base_toml())) == []


def test_unknown_key(tmp_path: Path) -> None:
    """A key the schema does not have is named with its full path."""
    path = write(tmp_path, base_toml(tail="[timeouts]\nconect = 5"))
    assert problems(path) == ["lrproxy.toml: timeouts.conect: unknown key"]


def test_unknown_key_in_a_list_item(tmp_path: Path) -> None:
    """An unknown key inside [[upstreams]] is named by the item's index."""
    path = write(tmp_path, base_toml('max_conns = 5'))
    assert problems(path) == ["lrproxy.toml: upstreams[0].max_conns: unknown key"]


def test_upstream_stream_usage(tmp_path: Path) -> None:
    """`stream_usage` (true unless set) is a boolean of each upstream."""
    assert problems(write(tmp_path, base_toml('stream_usage = "no"'))) == [
        "lrproxy.toml: upstreams[0].stream_usage: expected true or false (got 'no')"]
    cfg = read_config(write(tmp_path, base_toml("stream_usage = false")))
    assert cfg.upstreams[0].stream_usage is False
    assert read_config(write(tmp_path, base_toml())).upstreams[0].stream_usage is True


def test_unknown_section(tmp_path: Path) -> None:
    """A top-level table the schema does not have is an unknown section."""
    path = write(tmp_path, base_toml(tail='[logging]\nlevel = "debug"'))
    assert problems(path) == ["lrproxy.toml: logging: unknown section"]


@pytest.mark.parametrize(("tail", "line"), [
    ('[timeouts]\nconnect = "5"', "timeouts.connect: expected a number (got '5')"),
    ('[server]\nretries = "two"', "server.retries: expected an integer (got 'two')"),
    ("[server]\nretries = 2.5", "server.retries: expected an integer (got 2.5)"),
    ('[server]\ntrust_env = "yes"', "server.trust_env: expected true or false (got 'yes')"),
    ("[server]\nworkers = true", "server.workers: expected an integer (got True)"),
    ("[timeouts]\nidle = inf", "timeouts.idle: expected a number (got inf)"),
    ('[auto]\nmodels = "openai/gpt-4o-mini"', "auto.models: expected a list of model ids"),
])
def test_wrong_type(tmp_path: Path, tail: str, line: str) -> None:
    """A value of the wrong type is reported with what was expected and what was given."""
    assert problems(write(tmp_path, base_toml(tail=tail))) == [f"lrproxy.toml: {line}"]


def test_section_of_the_wrong_type(tmp_path: Path) -> None:
    """A section given as a plain value instead of a table is reported as such."""
    path = write(tmp_path, "server = 3\nauth = []\n" + base_toml())
    assert problems(path) == ["lrproxy.toml: server: expected a table",
                              "lrproxy.toml: auth: expected a table"]


def test_out_of_range_values(tmp_path: Path) -> None:
    """Numbers of the right type but outside their range are reported."""
    tail = "[server]\nworkers = 65\nmax_body_bytes = 0\n[timeouts]\nconnect = -1"
    assert problems(write(tmp_path, base_toml(tail=tail))) == [
        "lrproxy.toml: server.max_body_bytes: must be > 0 (got 0)",
        "lrproxy.toml: server.workers: at most 64 (got 65)",
        "lrproxy.toml: timeouts.connect: must be > 0 (got -1.0)",
    ]


def test_max_concurrency_zero_is_no_cap_and_below_is_refused(tmp_path: Path) -> None:
    """An upstream's max_concurrency: 0, the default, is no cap of its own; below 0 is
    a typo, refused."""
    assert read_config(write(tmp_path, base_toml())).upstreams[0].max_concurrency == 0
    text = base_toml().replace('region = "eu-west"\nbase_url',
                               'region = "eu-west"\nmax_concurrency = -1\nbase_url', 1)
    assert problems(write(tmp_path, text)) == [
        "lrproxy.toml: upstreams[0].max_concurrency: must be >= 0 (got -1)"]


def test_figures_past_any_real_one_are_refused(tmp_path: Path) -> None:
    """A typo of a figure (1e308 g/kWh, 1e-300 requests a second) is refused, not taken:
    eco figures would be infinities (null in answers, +Inf counters for good) and a
    Retry-After 300 digits long."""
    text = base_toml(tail=(
        '[regions.far]\ngrid_intensity_g_per_kwh = 1e308\npue = 11\n'
        '[models."acme/huge"]\nenergy_wh_per_1k_prompt_tokens = 1e308\n'
        'energy_wh_per_1k_completion_tokens = 0.3\n'
        '[models."acme/big"]\nactive_params_b = 1e9\n'
        '[auth]\nkeys = [{ name = "slow", sha256 = "' + "a" * 64 + '", rate_per_s = 1e-300 }]'))
    assert problems(write(tmp_path, text)) == [
        "lrproxy.toml: auth.keys[0].rate_per_s: must be at least one a day, 1/86400 "
        "(got 1e-300)",
        "lrproxy.toml: regions.far.grid_intensity_g_per_kwh: must be <= 5000 (got 1e+308)",
        "lrproxy.toml: regions.far.pue: must be <= 10 (got 11.0)",
        "lrproxy.toml: models.\"acme/huge\".energy_wh_per_1k_prompt_tokens: must be <= 1000 "
        "(got 1e+308)",
        "lrproxy.toml: models.\"acme/big\".active_params_b: must be <= 100000 (got 1000000000.0)",
    ]


def test_huge_integer_for_a_number_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    """An integer beyond the float range is reported as out of range."""
    huge = "9" * 400
    path = write(tmp_path, base_toml(tail=f"[timeouts]\nconnect = {huge}"))
    assert problems(path) == [f"lrproxy.toml: timeouts.connect: number out of range (got {huge})"]


def test_upstream_naming_an_unknown_region(tmp_path: Path) -> None:
    """An upstream's region must be declared; the line lists the known ones."""
    path = write(tmp_path, base_toml(tail=(
        '[[upstreams]]\nname = "us-east-a"\nregion = "eu-wst"\nbase_url = "https://us.example.com/v1"\n'
        'models = { "openai/gpt-4o-mini" = "gpt-4o-mini" }'
    )))
    assert problems(path) == ["lrproxy.toml: upstreams[1].region: unknown region 'eu-wst' (known: eu-west)"]


def test_upstream_naming_an_unknown_model(tmp_path: Path) -> None:
    """Every model an upstream serves must be declared under [models]."""
    text = base_toml().replace('"openai/gpt-4o-mini" = "gpt-4o-mini" }',
                               '"openai/gpt-4o-mini" = "gpt-4o-mini", "openai/gpt-4o" = "gpt-4o" }')
    assert problems(write(tmp_path, text)) == [
        "lrproxy.toml: upstreams[0].models.\"openai/gpt-4o\": unknown model 'openai/gpt-4o' "
        "(declare it in [models])"
    ]


def test_duplicate_upstream_name(tmp_path: Path) -> None:
    """Two upstreams may not share a name (it is their metrics label)."""
    path = write(tmp_path, base_toml(tail=(
        '[[upstreams]]\nname = "eu-west-a"\nregion = "eu-west"\nbase_url = "https://b.example.com/v1"\n'
        'models = { "openai/gpt-4o-mini" = "gpt-4o-mini" }'
    )))
    assert problems(path) == ["lrproxy.toml: upstreams[1].name: duplicate upstream name 'eu-west-a'"]


def test_duplicate_key_name(tmp_path: Path) -> None:
    """Two client keys may not share a name."""
    path = write(tmp_path, base_toml(tail=(
        '[auth]\nkeys = [{ name = "ci", key_env = "A" }, { name = "ci", key_env = "B" }]'
    )))
    assert problems(path) == ["lrproxy.toml: auth.keys[1].name: duplicate key name 'ci'"]


def test_the_metrics_placeholder_words_are_reserved(tmp_path: Path) -> None:
    """A key called `unknown`, a model `unknown` or a region `none` would share its
    metrics with the requests that have no valid key, no known model or no region."""
    toml = base_toml(tail=(
        '[auth]\nkeys = [{ name = "unknown", key_env = "A" }]\n'
        "[regions.none]\ngrid_intensity_g_per_kwh = 100\n"
        '[models."unknown"]\nenergy_wh_per_1k_prompt_tokens = 0.02\n'
        "energy_wh_per_1k_completion_tokens = 0.3\n"))
    got = problems(write(tmp_path, toml))
    assert [g.split(": ")[1] for g in got] == ["auth.keys[0].name", "regions.none",
                                               'models."unknown"'], got
    assert all("is reserved" in g for g in got)


@pytest.mark.parametrize("sha", ["9f86d0", "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08",
                                 "z" * 64])
def test_bad_sha256(tmp_path: Path, sha: str) -> None:
    """A client key's sha256 must be 64 lowercase hex digits."""
    path = write(tmp_path, base_toml(tail=f'[auth]\nkeys = [{{ name = "team-a", sha256 = "{sha}" }}]'))
    assert problems(path) == [
        "lrproxy.toml: auth.keys[0].sha256: expected 64 lowercase hex digits (see `lrproxy hash-key`)"
    ]


NL_SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\\n"


@pytest.mark.parametrize(("upstream_extra", "tail", "line"), [
    ('name = "eu-west-b\\n"', "",
     r"upstreams[0].name: not a valid name: 'eu-west-b\n'"),
    ("", '[auth]\nkeys = [{ name = "ci\\n", key_env = "K" }]',
     r"auth.keys[0].name: not a valid name: 'ci\n'"),
    ("", '[regions."eu-north\\n"]\ngrid_intensity_g_per_kwh = 30',
     r"regions.eu-north\n: not a valid region name: 'eu-north\n'"),
    ("", '[models."acme/m\\n"]\nactive_params_b = 8',
     r"""models."acme/m\n": not a valid model id: 'acme/m\n'"""),
    ("", f'[auth]\nkeys = [{{ name = "ci", sha256 = "{NL_SHA}" }}]',
     "auth.keys[0].sha256: expected 64 lowercase hex digits (see `lrproxy hash-key`)"),
], ids=["upstream", "key", "region", "model", "sha256"])
def test_a_trailing_newline_does_not_pass_a_name_check(
    tmp_path: Path, upstream_extra: str, tail: str, line: str
) -> None:
    """Names and sha256 match as a whole: a final newline (which `$` lets through) is refused,
    in one problem line, by `check-config` as a real process."""
    text = base_toml(tail=tail)
    if upstream_extra:
        text = text.replace('name = "eu-west-a"', upstream_extra)
    path = write(tmp_path, text)
    r = subprocess.run([sys.executable, "-m", "lrproxy", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (EX_CONFIG, "")
    assert r.stderr == f"lrproxy.toml: {line}\n"


@pytest.mark.parametrize("sources", [
    'sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", key_env = "K"',
    'key_env = "K", key_file = "/run/k"',
    "",
])
def test_client_key_needs_exactly_one_source(tmp_path: Path, sources: str) -> None:
    """A client key gives exactly one of sha256, key_env and key_file."""
    key = f'{{ name = "team-a", {sources} }}' if sources else '{ name = "team-a" }'
    path = write(tmp_path, base_toml(tail=f"[auth]\nkeys = [{key}]"))
    assert problems(path) == ["lrproxy.toml: auth.keys[0]: give exactly one of sha256, key_env, key_file"]


def test_upstream_with_both_key_sources(tmp_path: Path) -> None:
    """An upstream gives at most one of api_key_env and api_key_file."""
    path = write(tmp_path, base_toml('api_key_env = "K"\napi_key_file = "k"'))
    assert problems(path) == ["lrproxy.toml: upstreams[0]: give at most one of api_key_env, api_key_file"]


@pytest.mark.parametrize(("listen", "what"), [
    ("localhost", 'expected "HOST:PORT"'),
    ("127.0.0.1:99999", "port out of range"),
    ("127.0.0.1:", 'expected "HOST:PORT"'),
    ("::1:8080", 'expected "HOST:PORT"'),
])
def test_invalid_listen(tmp_path: Path, listen: str, what: str) -> None:
    """server.listen must be HOST:PORT or [V6]:PORT with a port up to 65535."""
    path = write(tmp_path, base_toml(tail=f'[server]\nlisten = "{listen}"'))
    assert problems(path) == [f"lrproxy.toml: server.listen: {what} (got {listen!r})"]


def test_metrics_listen_equal_to_listen(tmp_path: Path) -> None:
    """/metrics cannot share the API's HOST:PORT (serve would fail to bind); port 0 twice
    is two ports, so it may."""
    path = write(tmp_path, base_toml(tail=(
        '[server]\nlisten = "127.0.0.1:8080"\nmetrics_listen = "127.0.0.1:8080"')))
    assert problems(path) == [
        "lrproxy.toml: server.metrics_listen: must differ from server.listen (both 127.0.0.1:8080)"
    ]
    path = write(tmp_path, base_toml(tail=(
        '[server]\nlisten = "127.0.0.1:0"\nmetrics_listen = "127.0.0.1:0"')))
    assert problems(path) == []


@pytest.mark.parametrize(("api", "metrics", "overlap"), [
    ("0.0.0.0:8080", "127.0.0.1:8080", True), ("127.0.0.1:8080", "0.0.0.0:8080", True),
    ("[::]:8080", "127.0.0.1:8080", True), ("0.0.0.0:8080", "127.0.0.1:9090", False),
    ("127.0.0.1:8080", "127.0.0.2:8080", False),
])
def test_metrics_listen_overlapping_listen(tmp_path: Path, api: str, metrics: str,
                                           overlap: bool) -> None:
    """The same port with a wildcard address on either side: refused, as the second
    bind would fail at serve."""
    path = write(tmp_path, base_toml(tail=(
        f'[server]\nlisten = "{api}"\nmetrics_listen = "{metrics}"')))
    got = problems(path)
    assert (got != []) is overlap, got
    if overlap:
        assert got[0].startswith("lrproxy.toml: server.metrics_listen: overlaps server.listen")


def test_valid_listen_forms(tmp_path: Path) -> None:
    """IPv4, host names and bracketed IPv6 addresses are accepted."""
    path = write(tmp_path, base_toml(tail='[server]\nlisten = "[::1]:8080"\nmetrics_listen = "localhost:0"'))
    cfg = read_config(path)
    assert cfg.server.listen == Listen("::1", 8080)
    assert str(cfg.server.listen) == "[::1]:8080"
    assert cfg.server.metrics_listen == Listen("localhost", 0)


def test_invalid_base_url(tmp_path: Path) -> None:
    """base_url must be an http(s) URL."""
    text = base_toml().replace("https://eu.example.com/v1", "ftp://eu.example.com/v1")
    assert problems(write(tmp_path, text)) == [
        "lrproxy.toml: upstreams[0].base_url: expected an http(s) URL (got 'ftp://eu.example.com/v1')"
    ]


@pytest.mark.parametrize(("url", "what"), [
    ("https://eu.example.com:99999/v1", "expected an http(s) URL with a port of 1-65535"),
    ("https://eu.example.com:0/v1", "expected an http(s) URL with a port of 1-65535"),
    ("https://eu.example.com/v 1", "expected an http(s) URL without spaces or control characters"),
    ("https://eu.example.com/v1#x", "expected an http(s) URL without a query (?) or fragment "
                                    "(#): the API paths are appended to it"),
])
def test_base_url_that_can_never_work(tmp_path: Path, url: str, what: str) -> None:
    """A base_url with a port out of range, whitespace or a fragment is refused."""
    text = base_toml().replace("https://eu.example.com/v1", url)
    assert problems(write(tmp_path, text)) == [
        f"lrproxy.toml: upstreams[0].base_url: {what} (got {url!r})"]


@pytest.mark.parametrize(("url", "what"), [
    ("https://user:hunter2@eu.example.com/v1",
     "credentials in a URL are not allowed; use api_key_env or api_key_file"),
    ("htps://user:hunter2@eu.example.com/v1",
     "credentials in a URL are not allowed; use api_key_env or api_key_file"),
    ("user:hunter2@eu.example.com/v1", "expected an http(s) URL"),
    ("https://eu.example.com/v1?api-key=hunter2",
     "expected an http(s) URL without a query (?) or fragment (#): the API paths are "
     "appended to it"),
    ("https://eu.example.com:99999/v1?key=hunter2",
     "expected an http(s) URL with a port of 1-65535"),
])
def test_credentials_in_a_url_are_refused_and_not_echoed(
    tmp_path: Path, url: str, what: str
) -> None:
    """A URL with user:password (a bad scheme too) or a query is refused, and the problem
    line does not repeat the URL, which may hold a password or a key."""
    text = base_toml().replace("https://eu.example.com/v1", url)
    assert problems(write(tmp_path, text)) == [f"lrproxy.toml: upstreams[0].base_url: {what}"]


def test_a_key_in_place_of_a_variable_name_is_not_echoed(tmp_path: Path) -> None:
    """api_key_env / key_env holding something that is no variable name (the key itself,
    a common slip) is refused at load without quoting it."""
    path = write(tmp_path, base_toml('api_key_env = "sk-proj-REALKEY-abcdef"', tail=(
        '[auth]\nkeys = [{ name = "ci", key_env = "sk-client key" }]')))
    what = ("expected the name of an environment variable (letters, digits and _, not "
            "first a digit), not the key itself")
    assert problems(path) == [f"lrproxy.toml: auth.keys[0].key_env: {what}",
                              f"lrproxy.toml: upstreams[0].api_key_env: {what}"]


def test_invalid_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is not TOML gets one line naming the file and the parser's position."""
    path = write(tmp_path, base_toml(tail="[server\nlisten = 1"))
    rc, out, err = check(capsys, path)
    assert (rc, out, len(err)) == (EX_CONFIG, [], 1)
    assert re.fullmatch(r"lrproxy\.toml: not valid TOML: .*\(at line \d+, column \d+\)", err[0])


def test_toml_nested_too_deeply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Valid TOML nested 5000 deep (Python's parser recurses): one line and 78, not a
    RecursionError's thousands of lines and 1, which systemd would restart for ever."""
    path = write(tmp_path, base_toml(tail="[extra]\nx = " + "[" * 5000 + "]" * 5000))
    rc, out, err = check(capsys, path)
    assert (rc, out, err) == (EX_CONFIG, [], ["lrproxy.toml: not valid TOML here: nested "
                                              "too deeply"])


def test_dotted_keys_nested_too_deeply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A dotted key 2000 deep (a.a.a… = 1), which the TOML parser takes without
    recursing but the check's message would quote: one line and 78, not a traceback."""
    path = write(tmp_path, base_toml(tail="[server]\nretries." + ".".join(["a"] * 2000)
                                     + " = 1"))
    rc, out, err = check(capsys, path)
    assert (rc, out, err) == (EX_CONFIG, [], ["lrproxy.toml: not valid here: nested too "
                                              "deeply"])


def test_invalid_ini(tmp_path: Path) -> None:
    """A file that is not INI (here a key outside any section) gets one line naming the file."""
    path = write(tmp_path, "listen = 1\n" + BASE_INI, "lrproxy.ini")
    [line] = problems(path)
    assert line.startswith("lrproxy.ini: not valid INI: ")
    assert "\n" not in line


def test_unreadable_config_file(tmp_path: Path) -> None:
    """A config file that cannot be read is one problem naming the path."""
    missing = tmp_path / "nope.toml"
    assert problems(missing) == [f"{missing}: cannot read: No such file or directory"]


def test_unknown_suffix(tmp_path: Path) -> None:
    """Only .toml and .ini (and .conf/.cfg as INI) files are read, the suffix in any
    case; the problem line names the suffixes."""
    path = write(tmp_path, base_toml(), "lrproxy.yaml")
    assert problems(path) == ["lrproxy.yaml: unknown config format (name it .toml, or "
                              ".ini, .conf or .cfg for INI)"]
    assert problems(write(tmp_path, base_toml(), "LRPROXY.TOML")) == []


def test_several_problems_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config prints every problem, one line each, and exits 78."""
    path = write(tmp_path, base_toml("max_conns = 1", tail=(
        '[server]\nretries = "two"\nlisten = "nowhere"\n'
        '[[upstreams]]\nname = "b"\nregion = "eu-wst"\nbase_url = "https://b.example.com"\n'
        'models = { "x/y" = "y" }\n'
    )))
    rc, out, err = check(capsys, path)
    assert (rc, out) == (EX_CONFIG, [])
    assert err == [
        "lrproxy.toml: server.listen: expected \"HOST:PORT\" (got 'nowhere')",
        "lrproxy.toml: server.retries: expected an integer (got 'two')",
        "lrproxy.toml: upstreams[0].max_conns: unknown key",
        "lrproxy.toml: upstreams[1].region: unknown region 'eu-wst' (known: eu-west)",
        "lrproxy.toml: upstreams[1].models.\"x/y\": unknown model 'x/y' (declare it in [models])",
    ]


def test_check_config_exits_78_on_one_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A single problem is enough for exit status 78 (EX_CONFIG)."""
    rc, out, err = check(capsys, write(tmp_path, base_toml(tail="[timeouts]\nconect = 5")))
    assert (rc, out, err) == (EX_CONFIG, [], ["lrproxy.toml: timeouts.conect: unknown key"])


# ---------------------------------------------------------------------------------------
# secrets


def test_unreadable_key_file_is_reported_by_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config reads absolute key files and reports those it cannot read."""
    gone = tmp_path / "missing.key"
    path = write(tmp_path, base_toml(f'api_key_file = "{gone}"', tail=(
        f'[auth]\nkeys = [{{ name = "batch", key_file = "{tmp_path / "nokey"}" }}]'
    )))
    rc, out, err = check(capsys, path)
    assert (rc, out) == (EX_CONFIG, [])
    assert err == [
        f"lrproxy.toml: auth.keys[0].key_file: cannot read '{tmp_path / 'nokey'}': No such file or directory",
        f"lrproxy.toml: upstreams[0].api_key_file: cannot read '{gone}': No such file or directory",
    ]


def test_empty_key_file_is_a_problem(tmp_path: Path) -> None:
    """A key file holding only whitespace is refused."""
    (tmp_path / "up.key").write_text(" \n")
    cfg = read_config(write(tmp_path, base_toml(f'api_key_file = "{tmp_path / "up.key"}"')))
    with pytest.raises(ConfigError) as info:
        resolve_secrets(cfg, {}, check_env=False)
    assert info.value.problems == [
        f"lrproxy.toml: upstreams[0].api_key_file: '{tmp_path / 'up.key'}' is empty"
    ]


def test_missing_env_var_only_reported_under_the_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check-config ignores an unset key variable; resolve_secrets(check_env=True) reports it."""
    monkeypatch.delenv("LRPROXY_TEST_UNSET", raising=False)
    monkeypatch.delenv("LRPROXY_TEST_UNSET_UP", raising=False)
    path = write(tmp_path, base_toml('api_key_env = "LRPROXY_TEST_UNSET_UP"', tail=(
        '[auth]\nkeys = [{ name = "ci", key_env = "LRPROXY_TEST_UNSET" }]'
    )))
    rc, _, err = check(capsys, path)
    assert rc == 0 and not [line for line in err if "LRPROXY_TEST_UNSET" in line], err
    with pytest.raises(ConfigError) as info:
        resolve_secrets(read_config(path), {}, check_env=True)
    assert info.value.problems == [
        "lrproxy.toml: auth.keys[0].key_env: environment variable LRPROXY_TEST_UNSET is not set",
        "lrproxy.toml: upstreams[0].api_key_env: environment variable LRPROXY_TEST_UNSET_UP is not set",
    ]


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_a_key_variable_of_only_whitespace_is_empty(tmp_path: Path, value: str) -> None:
    """A key variable that is empty or holds only whitespace is refused as an empty key
    file is, for a client key (which could never authenticate) and an upstream key."""
    path = write(tmp_path, base_toml('api_key_env = "UP"', tail=(
        '[auth]\nkeys = [{ name = "ci", key_env = "CI" }]')))
    with pytest.raises(ConfigError) as info:
        resolve_secrets(read_config(path), {"UP": value, "CI": value})
    assert info.value.problems == [
        "lrproxy.toml: auth.keys[0].key_env: environment variable CI is empty",
        "lrproxy.toml: upstreams[0].api_key_env: environment variable UP is empty",
    ]


def test_relative_key_file_is_read_from_credentials_directory(tmp_path: Path) -> None:
    """A relative api_key_file is read under $CREDENTIALS_DIRECTORY, whitespace stripped."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "eu-west-a.key").write_text("\n  sk-upstream-eu \t\n")
    (creds / "client.key").write_text("sk-client\n")
    cfg = read_config(write(tmp_path, base_toml('api_key_file = "eu-west-a.key"', tail=(
        '[auth]\nkeys = [{ name = "batch", key_file = "client.key" }]'
    ))))
    secrets = resolve_secrets(cfg, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert secrets.upstream_keys == {"eu-west-a": "sk-upstream-eu"}
    assert secrets.client_hashes == (("batch", hashlib.sha256(b"sk-client").digest()),)


def test_a_key_file_saved_with_a_bom_holds_the_key_without_it(tmp_path: Path) -> None:
    """A key file a Windows editor saved with a UTF-8 BOM (and CRLF): the BOM is no part
    of the key, as `lrproxy hash-key` of the same file leaves it out. A client key kept
    with it was accepted and then never matched (every request 401); an upstream key
    was refused as holding a character a header cannot carry."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "eu-west-a.key").write_bytes(b"\xef\xbb\xbfsk-upstream-eu\r\n")
    (creds / "client.key").write_bytes(b"\xef\xbb\xbfsk-client\r\n")
    cfg = read_config(write(tmp_path, base_toml('api_key_file = "eu-west-a.key"', tail=(
        '[auth]\nkeys = [{ name = "batch", key_file = "client.key" }]'
    ))))
    secrets = resolve_secrets(cfg, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert secrets.upstream_keys == {"eu-west-a": "sk-upstream-eu"}
    assert secrets.client_hashes == (("batch", hashlib.sha256(b"sk-client").digest()),)
    with (creds / "client.key").open("rb") as f:
        hashed = subprocess.run([sys.executable, "-m", "lrproxy", "hash-key"], stdin=f,
                                capture_output=True, check=True)
    assert hashed.stdout.decode().strip() == hashlib.sha256(b"sk-client").hexdigest()


def test_check_config_reads_relative_key_files_under_credentials_directory(tmp_path: Path) -> None:
    """With $CREDENTIALS_DIRECTORY set (check-config run under the service) check-config
    reads a relative key file too, so a missing credential is named there (exit 78)."""
    creds = tmp_path / "creds"
    creds.mkdir()
    cfg = read_config(write(tmp_path, base_toml('api_key_file = "eu-west-a.key"')))
    with pytest.raises(ConfigError) as info:
        resolve_secrets(cfg, {"CREDENTIALS_DIRECTORY": str(creds)}, check_env=False)
    assert info.value.problems == [
        f"lrproxy.toml: upstreams[0].api_key_file: cannot read '{creds / 'eu-west-a.key'}': "
        "No such file or directory"]
    (creds / "eu-west-a.key").write_text("sk-x\n")
    secrets = resolve_secrets(cfg, {"CREDENTIALS_DIRECTORY": str(creds)}, check_env=False)
    assert secrets.upstream_keys == {"eu-west-a": "sk-x"}


def test_relative_key_file_without_credentials_directory(tmp_path: Path) -> None:
    """Under the service a relative key file needs $CREDENTIALS_DIRECTORY; check-config skips it."""
    cfg = read_config(write(tmp_path, base_toml('api_key_file = "eu-west-a.key"')))
    assert resolve_secrets(cfg, {}, check_env=False).upstream_keys == {"eu-west-a": None}
    with pytest.raises(ConfigError) as info:
        resolve_secrets(cfg, {})
    assert info.value.problems == [
        "lrproxy.toml: upstreams[0].api_key_file: relative path 'eu-west-a.key' needs $CREDENTIALS_DIRECTORY"
    ]


@pytest.mark.parametrize("key", ["sk-a\nX-Injected: 1", "sk-a\rb", "sk-\x00a", "sk-\u00e9"])
def test_upstream_key_a_header_cannot_carry_is_refused(tmp_path: Path, key: str) -> None:
    """An upstream key with a line break inside (a file of two lines, say) would break
    every request's Authorization header: refused, and never quoted."""
    (tmp_path / "up.key").write_text(key + "\n")
    cfg = read_config(write(tmp_path, base_toml(f'api_key_file = "{tmp_path / "up.key"}"')))
    with pytest.raises(ConfigError) as info:
        resolve_secrets(cfg, {})
    [line] = info.value.problems
    assert line.startswith("lrproxy.toml: upstreams[0].api_key_file: the key holds a line break")
    assert "sk-" not in line
    cfg = read_config(write(tmp_path, base_toml('api_key_env = "UP_KEY"')))
    with pytest.raises(ConfigError):
        resolve_secrets(cfg, {"UP_KEY": key})
    (tmp_path / "up.key").write_text("  sk-fine with spaces \n")
    cfg = read_config(write(tmp_path, base_toml(f'api_key_file = "{tmp_path / "up.key"}"')))
    assert resolve_secrets(cfg, {}).upstream_keys == {"eu-west-a": "sk-fine with spaces"}


@pytest.mark.parametrize("key", ["key-one\nkey-two", "sk-a\rb", "sk-\x00a"])
def test_client_key_no_header_can_carry_is_refused(tmp_path: Path, key: str) -> None:
    """A client key file of two lines (or a variable with a line break) was hashed whole:
    a key no Authorization header can carry, so every request of that entry got 401 and
    nothing said why. Refused like an upstream key, and never quoted."""
    (tmp_path / "client.key").write_text(key + "\n")
    cfg = read_config(write(tmp_path, base_toml(tail=(
        f'[auth]\nkeys = [{{ name = "batch", key_file = "{tmp_path / "client.key"}" }}]'))))
    with pytest.raises(ConfigError) as info:
        resolve_secrets(cfg, {})
    [line] = info.value.problems
    assert line.startswith("lrproxy.toml: auth.keys[0].key_file: the key holds a line break")
    assert "key-" not in line and "sk-" not in line
    cfg = read_config(write(tmp_path, base_toml(tail=(
        '[auth]\nkeys = [{ name = "ci", key_env = "CI_KEY" }]'))))
    with pytest.raises(ConfigError):
        resolve_secrets(cfg, {"CI_KEY": key})
    (tmp_path / "client.key").write_text("  sk-fine with spaces, \u00e9 \n")
    cfg = read_config(write(tmp_path, base_toml(tail=(
        f'[auth]\nkeys = [{{ name = "batch", key_file = "{tmp_path / "client.key"}" }}]'))))
    assert resolve_secrets(cfg, {}).client_hashes == (
        ("batch", hashlib.sha256("sk-fine with spaces, \u00e9".encode()).digest()),)


_NUL_PATHS: Final = {  # where: the config with a NUL in that path
    "upstreams[0].ca_file": base_toml('ca_file = "/etc/ca\\u0000.pem"'),
    "upstreams[0].api_key_file": base_toml('api_key_file = "/etc/k\\u0000"'),
    "auth.keys[0].key_file": base_toml(
        tail='[auth]\nkeys = [{ name = "ci", key_file = "/etc/k\\u0000" }]'),
    "regions.eu-west.intensity_feed": base_toml().replace(
        "pue = 1.2", 'pue = 1.2\nintensity_feed = "/run/f\\u0000.json"'),
}


@pytest.mark.parametrize("where", sorted(_NUL_PATHS))
def test_a_path_with_a_nul_is_a_problem_line(tmp_path: Path, where: str) -> None:
    """A path no file can have (a NUL in it: every open() raises ValueError) is one
    problem line for check-config, at start and at reload: not a crash there, nor a
    feed poller that dies later."""
    [line] = problems(write(tmp_path, _NUL_PATHS[where]))
    assert line.startswith(f"lrproxy.toml: {where}: a path cannot hold a NUL character (got '/"), line
    assert line.endswith("\\x00.json')" if "feed" in where else "')"), line


def test_a_copy_read_for_its_original_names_the_original(tmp_path: Path) -> None:
    """The workers' supervisor validates a copy of the file: problems name the original."""
    from lrproxy.workers import _accept

    original = write(tmp_path, "x = 1\n\xff\n")
    original.write_bytes(b"x = 1\n\xff\n")  # not UTF-8
    (tmp_path / "run" / "config").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        _accept(str(original), tmp_path / "run" / "config" / "lrproxy.toml")
    [line] = info.value.problems
    assert line.startswith(f"{original}: cannot read: "), line


def test_sha256_keys_resolve_to_their_digest(tmp_path: Path) -> None:
    """A sha256 client key needs no secret at run time; its digest is kept as bytes."""
    digest = hashlib.sha256(b"sk-a").hexdigest()
    tail = f'[auth]\nkeys = [{{ name = "a", sha256 = "{digest}" }}]'
    cfg = read_config(write(tmp_path, base_toml(tail=tail)))
    assert resolve_secrets(cfg, {}).client_hashes == (("a", bytes.fromhex(digest)),)


def test_the_same_key_in_two_entries_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two auth.keys entries with one secret (by sha256, file or variable) are refused,
    naming both entries and never the key: one name would get both teams' requests."""
    (tmp_path / "b.key").write_text("sk-shared-4242\n")
    digest = hashlib.sha256(b"sk-shared-4242").hexdigest()
    path = write(tmp_path, base_toml(tail=(
        f'[auth]\nkeys = [{{ name = "team-a", sha256 = "{digest}" }},\n'
        f'  {{ name = "team-b", key_file = "{tmp_path / "b.key"}" }},\n'
        '  { name = "team-c", key_env = "C" }, { name = "team-d", key_env = "D" }]')))
    line = ("lrproxy.toml: auth.keys[1]: the same key as auth.keys[0] ('team-a'); "
            "each entry needs a key of its own")
    rc, _, err = check(capsys, path)
    assert (rc, err) == (EX_CONFIG, [line])
    with pytest.raises(ConfigError) as info:
        resolve_secrets(read_config(path), {"C": "sk-c", "D": " sk-c "})
    assert info.value.problems == [line, line.replace("[1]", "[3]").replace(
        "[0] ('team-a')", "[2] ('team-c')")]
    assert "sk-" not in capsys.readouterr().err
    ini = write(tmp_path, BASE_INI + f"""
[upstream:eu-west-a]
region = eu-west
base_url = https://eu.example.com/v1
models = openai/gpt-4o-mini = gpt-4o-mini

[key:team-a]
sha256 = {digest}

[key:team-b]
key_file = {tmp_path / "b.key"}
""", "lrproxy.ini")
    with pytest.raises(ConfigError) as info:
        resolve_secrets(read_config(ini), {})
    assert info.value.problems == [
        "lrproxy.ini: [key:team-b]: the same key as [key:team-a] ('team-a'); "
        "each entry needs a key of its own"]


# ---------------------------------------------------------------------------------------
# INI specifics


def test_ini_problems_name_the_ini_section(tmp_path: Path) -> None:
    """In the INI form a problem in an upstream or key names its [upstream:NAME] / [key:NAME] section."""
    text = BASE_INI + """
[upstream:eu-west-a]
region = eu-wst
base_url = https://eu.example.com/v1
models = openai/gpt-4o-mini = gpt-4o-mini

[upstream:eu-west-b]
region = eu-west
base_url = https://b.example.com/v1
models = openai/gpt-4o-mini
api_key_env = A
api_key_file = b

[key:team-a]
sha256 = 1234
"""
    assert problems(write(tmp_path, text, "lrproxy.ini")) == [
        "lrproxy.ini: [key:team-a] sha256: expected 64 lowercase hex digits (see `lrproxy hash-key`)",
        "lrproxy.ini: [upstream:eu-west-a] region: unknown region 'eu-wst' (known: eu-west)",
        "lrproxy.ini: [upstream:eu-west-b]: give at most one of api_key_env, api_key_file",
        "lrproxy.ini: [upstream:eu-west-b] models: expected a table of LowRouter id = upstream model name",
    ]


def test_ini_key_problems_name_the_ini_section(tmp_path: Path) -> None:
    """Problems found when keys and CA files are read name the INI section too."""
    text = BASE_INI + """
[upstream:eu-west-a]
region = eu-west
base_url = https://eu.example.com/v1
models = openai/gpt-4o-mini = gpt-4o-mini
api_key_env = NOT_SET_ANYWHERE
ca_file = /nonexistent/ca.pem

[key:team-a]
key_file = /nonexistent/team-a.key
"""
    cfg = read_config(write(tmp_path, text, "lrproxy.ini"))
    with pytest.raises(ConfigError) as info:
        resolve_secrets(cfg, {})
    assert [ln.split(": ", 2)[:2] for ln in info.value.problems] == [
        ["lrproxy.ini", "[key:team-a] key_file"],
        ["lrproxy.ini", "[upstream:eu-west-a] api_key_env"],
        ["lrproxy.ini", "[upstream:eu-west-a] ca_file"],
    ]


def test_ini_strings_are_converted_to_numbers_and_bools(tmp_path: Path) -> None:
    """INI values are strings; numbers, underscores and yes/no/on/off become typed values."""
    text = BASE_INI + """
[server]
retries = 3
max_body_bytes = 1_048_576
shutdown_grace_s = 2.5
trust_env = yes
workers = 4

[timeouts]
connect = 1.5

[upstream:eu-west-a]
region = eu-west
base_url = https://eu.example.com/v1
models = openai/gpt-4o-mini = gpt-4o-mini
max_concurrency = 8
"""
    cfg = read_config(write(tmp_path, text, "lrproxy.ini"))
    assert cfg.server == attrs.evolve(ServerConfig(), retries=3, max_body_bytes=1_048_576,
                                      shutdown_grace_s=2.5, trust_env=True, workers=4)
    assert type(cfg.server.retries) is int and type(cfg.server.trust_env) is bool
    assert cfg.timeouts.connect == 1.5
    assert cfg.upstreams[0].max_concurrency == 8
    assert cfg.regions["eu-west"].grid_intensity_g_per_kwh == 290.0


@pytest.mark.parametrize(("value", "expected"), [
    ("yes", True), ("On", True), ("1", True), ("true", True),
    ("no", False), ("off", False), ("0", False), ("FALSE", False),
])
def test_ini_bool_words(tmp_path: Path, value: str, expected: bool) -> None:
    """The INI form accepts the usual true/false words, in any case."""
    text = BASE_INI + f"""
[server]
trust_env = {value}
[upstream:a]
region = eu-west
base_url = https://a.example.com
models = openai/gpt-4o-mini = m
"""
    assert read_config(write(tmp_path, text, "lrproxy.ini")).server.trust_env is expected


def test_ini_wrong_types_are_reported(tmp_path: Path) -> None:
    """INI strings that are not numbers or bools are reported like TOML type errors."""
    text = BASE_INI + """
[server]
retries = 2.5
trust_env = maybe
[timeouts]
idle = soon
[upstream:a]
region = eu-west
base_url = https://a.example.com
models = openai/gpt-4o-mini = m
"""
    assert problems(write(tmp_path, text, "lrproxy.ini")) == [
        "lrproxy.ini: [server] retries: expected an integer (got '2.5')",
        "lrproxy.ini: [server] trust_env: expected true, false, yes, no, on, off, 1 or 0 (got 'maybe')",
        "lrproxy.ini: [timeouts] idle: expected a number (got 'soon')",
    ]


@pytest.mark.parametrize("section", ["upstreams", "auth", "regions", "models"])
def test_ini_plain_container_section_is_unknown(tmp_path: Path, section: str) -> None:
    """A plain [upstreams]/[auth]/[regions]/[models] in INI is an unknown section, not a crash or a loss."""
    text = BASE_INI + f"""
[{section}]
keys = x

[upstream:a]
region = eu-west
base_url = https://a.example.com
models = openai/gpt-4o-mini = m

[key:team-a]
sha256 = 1234
"""
    lines = problems(write(tmp_path, text, "lrproxy.ini"))
    assert lines == [
        f"lrproxy.ini: [{section}]: unknown section",
        "lrproxy.ini: [key:team-a] sha256: expected 64 lowercase hex digits (see `lrproxy hash-key`)",
    ]


def test_ini_name_key_is_refused(tmp_path: Path) -> None:
    """In INI the section gives the upstream's name; a `name` key inside it is not silently used."""
    text = BASE_INI + """
[upstream:a]
name = b
region = eu-west
base_url = https://a.example.com
models = openai/gpt-4o-mini = m
"""
    [line] = problems(write(tmp_path, text, "lrproxy.ini"))
    assert line.startswith("lrproxy.ini: [upstream:a] name") and line.endswith(": unknown key")


# ---------------------------------------------------------------------------------------
# hash-key


def test_hash_key_prints_the_sha256_of_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lrproxy hash-key` reads one key on stdin (newline stripped) and prints its SHA-256 hex."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"sk-team-a\n")))
    assert cli.main(["hash-key"]) == 0
    out, err = capsys.readouterr()
    assert out == hashlib.sha256(b"sk-team-a").hexdigest() + "\n"
    assert err == ""
    assert out.strip() == config.hash_key("sk-team-a")


def _hash_key_at_a_terminal(typed: bytes) -> tuple[int, bytes, bytes]:
    """`lrproxy hash-key` with a pty as its stdin and stderr (no controlling terminal:
    getpass uses stdin), `typed` at its prompt: its exit status, its stdout, and what
    the terminal showed."""
    import select

    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lrproxy", "hash-key"], stdin=slave,
                            stdout=subprocess.PIPE, stderr=slave, start_new_session=True)
    os.close(slave)
    screen = b""
    try:
        end = time.monotonic() + 20
        while b"Key" not in screen and time.monotonic() < end:  # the prompt
            if select.select([master], [], [], 0.5)[0]:
                screen += os.read(master, 1024)
        assert b"Key" in screen, screen
        os.write(master, typed)
        out, _ = proc.communicate(timeout=20)
        while select.select([master], [], [], 0.2)[0]:
            try:
                screen += os.read(master, 1024)
            except OSError:  # (EIO: the child has closed its end)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    return proc.returncode, out, screen


def test_hash_key_typed_at_a_terminal_is_not_shown() -> None:
    """A key typed at a terminal (stdin a tty) is read without echo, as passwd reads a
    password: it stays off the screen and out of the scrollback; a prompt on the
    terminal says so."""
    rc, out, screen = _hash_key_at_a_terminal(b"sk-typed-here\n")
    assert rc == 0
    assert out.decode().strip() == config.hash_key("sk-typed-here")
    assert b"sk-typed" not in screen, screen


def test_hash_key_typed_at_a_terminal_not_utf8_is_one_line_not_a_traceback() -> None:
    """Bytes that are not UTF-8 typed at the terminal are the usage error (64) that
    they are on a piped stdin, in the same one line: getpass decodes what it reads, and
    its UnicodeDecodeError was a Python traceback (exit 1)."""
    rc, out, screen = _hash_key_at_a_terminal(b"\xff\xfe-typed\n")
    assert (rc, out) == (64, b""), screen
    assert screen.rstrip().endswith(b"lrproxy hash-key: the key on stdin is not UTF-8 text")
    assert b"Traceback" not in screen


def test_hash_key_output_is_accepted_as_sha256(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What hash-key prints is a valid auth.keys[].sha256 value."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"sk-x")))
    cli.main(["hash-key"])
    digest = capsys.readouterr().out.strip()
    tail = f'[auth]\nkeys = [{{ name = "x", sha256 = "{digest}" }}]'
    cfg = read_config(write(tmp_path, base_toml(tail=tail)))
    assert cfg.keys[0].sha256 == digest


def test_hash_key_leaves_out_a_bom(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key saved by an editor that puts a UTF-8 BOM first hashes as the key itself:
    no Authorization header carries the BOM, so its hash would match no request."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfsk-team-a\n")))
    assert cli.main(["hash-key"]) == 0
    assert capsys.readouterr().out == config.hash_key("sk-team-a") + "\n"


def test_hash_key_without_a_key_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty stdin prints nothing on stdout and exits 64 (EX_USAGE)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert cli.main(["hash-key"]) == 64
    out, err = capsys.readouterr()
    assert out == "" and "no key" in err


@pytest.mark.parametrize(("stdin", "err"), [
    (b"\xff\xfe\n", "lrproxy hash-key: the key on stdin is not UTF-8 text\n"),
    (None, "lrproxy hash-key: no key on stdin\n"),  # closed: Python's sys.stdin is None
])
def test_hash_key_on_odd_stdin_is_one_line_not_a_traceback(stdin: bytes | None, err: str) -> None:
    """Bytes that are not UTF-8, or a closed stdin, are a usage error (64) in one line;
    each was a Python traceback."""
    if stdin is None:
        proc = subprocess.run([sys.executable, "-m", "lrproxy", "hash-key"], stdin=None,
                              capture_output=True, text=True, timeout=30,
                              preexec_fn=lambda: os.close(0))
    else:
        proc = subprocess.run([sys.executable, "-m", "lrproxy", "hash-key"], input=stdin,
                              capture_output=True, timeout=30)
        proc.stderr = proc.stderr.decode()
    assert (proc.returncode, proc.stderr) == (64, err)


# ---------------------------------------------------------------------------------------
# untrusted input: junk never crashes the parser

_KEY_NAMES = sorted({k for s in (config._SERVER, config._TIMEOUTS, config._KEY, config._REGION,
                                 config._MODEL, config._UPSTREAM) for k in s})
_SECTIONS = ["server", "timeouts", "auth", "regions", "models", "upstreams", "auto"]
_edges = st.sampled_from([10**400, -1, 0, 2**63, 1e308, "inf", "nan", "1_0", "9" * 400])
_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | _edges
            | st.sampled_from(["127.0.0.1:8080", "[::1]:0", "https://a.example/v1", "http://u:p@a/",
                               "eu-west", "openai/gpt-4o-mini", "lowrouter/auto", "yes",
                               "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]))
_junk = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=10,
)


def _table(schema: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A table whose keys are mostly the schema's own, with junk values."""
    return st.dictionaries(st.sampled_from(sorted(schema)) | st.text(max_size=6), _edges | _scalars | _junk,
                           max_size=6)


_upstream = _table({**config._UPSTREAM, "models": None}) | st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b"]), "region": st.sampled_from(["eu-west", "nowhere"]),
     "base_url": st.just("https://a.example/v1"),
     "models": st.dictionaries(st.sampled_from(["openai/gpt-4o-mini", "x"]) | st.text(max_size=4), _junk)},
)
_configs = st.fixed_dictionaries({}, optional={
    # near-valid shapes reach deep into the parser; plain junk covers the rest
    "server": _table(config._SERVER) | _junk,
    "timeouts": _table(config._TIMEOUTS) | _junk,
    "auth": st.fixed_dictionaries({"keys": st.lists(_table(config._KEY) | _junk, max_size=3)}) | _junk,
    "regions": st.dictionaries(st.sampled_from(["eu-west", "us-east"]) | st.text(max_size=6),
                               _table(config._REGION) | _junk, max_size=3) | _junk,
    "models": st.dictionaries(st.sampled_from(["openai/gpt-4o-mini", "lowrouter/auto"])
                              | st.text(max_size=6), _table(config._MODEL) | _junk, max_size=3) | _junk,
    "upstreams": st.lists(_upstream | _junk, max_size=3) | _junk,
    "auto": _table({"models": None}) | _junk,
}) | st.dictionaries(st.sampled_from(_SECTIONS) | st.text(max_size=8), _junk, max_size=7)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_configs, ini=st.booleans())
@example(data={"timeouts": {"connect": 10**400}}, ini=False)  # beyond float: OverflowError once
@example(data={"regions": {"r": {"pue": "9" * 5000}}}, ini=True)  # over int_max_str_digits
@example(data={"upstreams": [{"name": 1, "models": {"a": 1}}], "auth": {"keys": [[]]}}, ini=False)
def test_parse_config_on_junk_only_raises_config_error(data: dict[str, Any], ini: bool) -> None:
    """Whatever nested junk it is given, parse_config returns a Config or raises ConfigError."""
    try:
        cfg = parse_config(data, source="junk", ini_names={} if ini else None)
    except ConfigError as e:
        assert e.problems
        assert all(line.startswith("junk: ") for line in e.problems)
    else:
        assert isinstance(cfg, Config)


_INI_SECTIONS = ["server", "auth", "auto", "regions", "models", "upstreams", "upstream:a", "key:k",
                 "region:eu-west", "model:m", "x:y"]
_ini_lines = st.dictionaries(
    st.sampled_from([*_KEY_NAMES, "keys", "name"]) | st.text("abc_", min_size=1, max_size=5),
    _edges.map(str) | st.text("ab1.,=:/ ", max_size=12),
    max_size=4,
)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_ini_text_on_junk_only_raises_config_error(data: st.DataObject) -> None:
    """Any INI text made of plausible sections and keys gives a Config or ConfigError, never a crash."""
    order = data.draw(st.permutations(_INI_SECTIONS))
    text = ""
    for name in order[: data.draw(st.integers(0, len(order)))]:
        text += f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in data.draw(_ini_lines).items())
    try:
        mapping, names = config._ini_to_mapping(text, "junk.ini")
        parse_config(mapping, source="junk.ini", ini_names=names)
    except ConfigError as e:
        assert all(line.startswith("junk.ini: ") for line in e.problems)


def test_ini_region_and_model_problems_name_their_sections(tmp_path: Path) -> None:
    """INI problems in [region:…] and [model:…] name those sections, as the file does."""
    text = """\
[region:eu-west]
grid_intensity_g_per_kwh = lots
[model:openai/gpt-4o-mini]
energy_wh_per_1k_prompt_tokens = 0.02
[upstream:a]
region = eu-west
base_url = https://a.example.com
models = openai/gpt-4o-mini = m
"""
    assert problems(write(tmp_path, text, "lrproxy.ini")) == [
        "lrproxy.ini: [region:eu-west] grid_intensity_g_per_kwh: expected a number (got 'lots')",
        "lrproxy.ini: [model:openai/gpt-4o-mini]: give both energy_wh_per_1k_prompt_tokens and "
        "energy_wh_per_1k_completion_tokens, or active_params_b",
    ]


def test_proxy_url_may_carry_credentials_never_echoed(tmp_path: Path) -> None:
    """A forward proxy URL may hold credentials; a malformed one is refused without echoing them."""
    base = '[regions.r]\ngrid_intensity_g_per_kwh = 1\n[models."m/x"]\n[[upstreams]]\nname = "u"\n' \
        'region = "r"\nbase_url = "https://a.example.com/v1"\nmodels = { "m/x" = "x" }\n'
    ok = write(tmp_path, base + 'proxy = "http://user:s3cret@proxy.corp:3128"\n', "ok.toml")
    assert read_config(ok).upstreams[0].proxy == "http://user:s3cret@proxy.corp:3128"
    bad = write(tmp_path, base + 'proxy = "ftp://user:s3cret@proxy.corp"\n', "bad.toml")
    lines = problems(bad)
    assert lines and all("s3cret" not in line for line in lines)


@pytest.mark.parametrize(("soft", "hard", "configured", "want", "raised", "warned"), [
    (1024, 1024, 0, 384, False, False),  # auto: (limit - 256) / 2
    (1024, 65536, 0, 32640, True, False),  # the soft limit raised to the hard one first
    (65536, 65536, 1000, 1000, False, False),
    (1024, 1024, 1000, 1000, False, True),  # kept, but over what the limit allows: warned
    (100, 100, 0, 16, False, False),  # never below 16
])
def test_connection_cap_follows_the_open_files_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, soft: int, hard: int,
    configured: int, want: int, raised: bool, warned: bool,
) -> None:
    """server.max_connections = 0 takes what the open-files limit allows, after raising
    the soft limit to the hard one; a configured cap is kept, and warned about when the
    limit cannot hold it (2 fds per connection, 256 spare)."""
    import resource
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda _, v: calls.append(v))
    cfg = read_config(EXAMPLE_TOML)
    cfg = attrs.evolve(cfg, server=attrs.evolve(cfg.server, max_connections=configured))
    assert cli.connection_cap(cfg) == want
    assert calls == ([(hard, hard)] if raised else [])
    assert ("is over what the open-files limit" in caplog.text) == warned


def test_figures_at_their_bounds_are_taken(tmp_path: Path) -> None:
    """The bounds are inclusive: the message says "must be <= 5000", so 5000 is fine."""
    text = base_toml(tail=(
        '[regions.far]\ngrid_intensity_g_per_kwh = 5000\npue = 10\n'
        '[models."acme/huge"]\nenergy_wh_per_1k_prompt_tokens = 1000\n'
        'energy_wh_per_1k_completion_tokens = 1000\n'
        '[models."acme/big"]\nactive_params_b = 100000\n'
        '[auth]\nkeys = [{ name = "slow", sha256 = "' + "a" * 64
        + '", rate_per_s = 1.1574074074074073e-05 }]'))  # one a day
    assert problems(write(tmp_path, text)) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_rate_that_is_no_number_is_refused(tmp_path: Path, value: str) -> None:
    """rate_per_s = nan (TOML has it) would make every take() compare False: never a
    token, a 429 with a Retry-After of NaN; inf no limit at all. Both are refused."""
    text = base_toml(tail='[auth]\nkeys = [{ name = "x", sha256 = "' + "a" * 64
                     + f'", rate_per_s = {value} }}]')
    got = problems(write(tmp_path, text))
    assert got and "rate_per_s" in got[0], got


@pytest.mark.parametrize(("stdin", "stdout", "code", "err"), [
    ("readable", "/dev/full", 74, "lrproxy hash-key: cannot write the hash: No space left on device\n"),
    ("write-only", None, 64, "lrproxy hash-key: cannot read stdin: Bad file descriptor\n"),
])
def test_hash_key_that_cannot_read_or_write_says_so_in_one_line(
    tmp_path: Path, stdin: str, stdout: str | None, code: int, err: str
) -> None:
    """A stdout that fails (a full disk) is exit 74 (EX_IOERR), a stdin it cannot read
    (open for writing only) 64, each in one line: they were Python tracebacks, the
    first twice (once more as Python flushed its stdout at exit)."""
    src = open(tmp_path / "key", "w" if stdin == "write-only" else "w+")  # noqa: SIM115
    src.write("sk-x\n")
    src.seek(0)
    with src, open(stdout or os.devnull, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "lrproxy", "hash-key"], stdin=src,
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (code, err)
