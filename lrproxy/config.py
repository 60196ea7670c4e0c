"""The config model (SPEC §4): frozen attrs classes, parsed in one place, every problem at once.

`read_config(path)` turns a TOML or INI file into one plain mapping; `parse_config`
checks that mapping against the schema and returns a `Config` or raises `ConfigError`
listing every problem as `file: key: what is wrong`. Nothing here logs or exits.
Secrets (client keys, upstream keys) and upstreams' CA bundles are resolved separately by
`resolve_secrets`, because the environment variables and credential files exist only
under the service.
"""

from __future__ import annotations

import configparser
import hashlib
import math
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import attrs

AUTO_MODEL: Final = "lowrouter/auto"
# The words the metrics and the access line give a request with no valid key or no
# known model (UNKNOWN) and one routed to no region (NONE): no key, model or region may
# be called so, or its figures would merge with those.
UNKNOWN: Final = "unknown"
NONE: Final = "none"

# SPEC §3: size classes by active parameters (billions) -> Wh per 1k completion tokens.
SIZE_CLASSES: Final = ((15.0, 0.10), (150.0, 0.60), (math.inf, 3.0))
PREFILL_RATIO: Final = 0.1
DEFAULT_E_COMPLETION: Final = 0.60  # the medium class, used for models with no figures

# Used with fullmatch() only: `$` also matches before a final newline, and a name ending in
# one would pass, then break every response header it goes into.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_SHA_RE: Final = re.compile(r"[0-9a-f]{64}")


class ConfigError(Exception):
    """Invalid config; `problems` holds one `file: key: what` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.frozen
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class ServerConfig:
    listen: Listen = Listen("127.0.0.1", 8080)
    metrics_listen: Listen | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    retries: int = 2
    shutdown_grace_s: float = 30.0
    workers: int = 1
    trust_env: bool = False
    max_inflight: int = 4096
    max_connections: int = 0  # 0: from the open-files limit (cli.connection_cap)


@attrs.frozen
class Timeouts:
    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 120.0
    total: float = 1800.0
    keepalive: float = 15.0
    client_header: float = 10.0
    client_body: float = 60.0
    # An idle upstream connection is reused for this long, then closed: under the 5 s
    # after which uvicorn (vLLM, SGLang, LiteLLM), Node.js and llama.cpp's server close
    # theirs, so that a request never goes on a connection the upstream is closing
    pool_idle: float = 4.0


@attrs.frozen
class ClientKey:
    """A client key: its name (the metrics label) and where its secret comes from."""

    name: str
    sha256: str | None = None
    key_env: str | None = None
    key_file: str | None = None
    rate_per_s: float | None = None


@attrs.frozen
class Region:
    name: str
    grid_intensity_g_per_kwh: float
    pue: float = 1.0
    intensity_feed: str | None = None
    intensity_max_age_s: float = 3600.0


@attrs.frozen
class Model:
    """A LowRouter model id with its energy figures in Wh per 1k tokens (SPEC §3)."""

    id: str
    e_prompt: float
    e_completion: float
    source: Literal["config", "size_class", "default"]
    active_params_b: float | None = None


@attrs.frozen
class Upstream:
    name: str
    region: str
    base_url: str
    models: Mapping[str, str]  # LowRouter id -> the upstream's own model name
    api_key_env: str | None = None
    api_key_file: str | None = None
    max_concurrency: int = 0  # 0: no cap of its own (server.max_inflight bounds it)
    proxy: str | None = None
    ca_file: str | None = None
    # Streams ask it for usage (stream_options.include_usage, SPEC §1.1); false for an
    # upstream that refuses the field (Mistral's API: 422) and sends usage unasked
    stream_usage: bool = True


@attrs.frozen
class Config:
    server: ServerConfig
    timeouts: Timeouts
    keys: tuple[ClientKey, ...]
    regions: Mapping[str, Region]
    models: Mapping[str, Model]
    upstreams: tuple[Upstream, ...]
    auto_models: tuple[str, ...]
    source: str = "<config>"
    # An INI file's section of each list item (`upstreams[0]`: `[upstream:eu-west-a]`),
    # so that problems found later (keys, CA files) name the section too.
    ini_names: Mapping[str, str] | None = attrs.field(default=None, eq=False)


# What a reload cannot change in a running process: its sockets, its worker count, the
# upstream session's proxy settings and idle time, and the connection handlers' header
# timer and cap.
AT_RESTART: Final = ("server.listen", "server.metrics_listen", "server.workers",
                     "server.trust_env", "timeouts.client_header", "server.max_connections",
                     "timeouts.pool_idle")
# Of those, what a worker's own process uses (the supervisor has the others)
WORKER_KEPT: Final = ("server.trust_env", "timeouts.client_header", "server.max_connections",
                      "timeouts.pool_idle")


def setting(config: Config, name: str) -> Any:
    """The value of `section.key` (of AT_RESTART) in `config`."""
    section, key = name.split(".")
    return getattr(getattr(config, section), key)


def kept_until_restart(new: Config, running: Config) -> list[str]:
    """The settings of AT_RESTART a reload to `new` changes, which stay as `running` has them."""
    return [name for name in AT_RESTART if setting(new, name) != setting(running, name)]


def keep(config: Config, values: Mapping[str, Any]) -> Config:
    """`config` with the settings `values` names (`section.key`) as they are there: a
    worker started after a reload runs with the values the service started with, as
    the other workers do."""
    for name, value in values.items():
        section, key = name.split(".")
        config = attrs.evolve(config, **{
            section: attrs.evolve(getattr(config, section), **{key: value})})
    return config


def energy_from_size(active_params_b: float) -> tuple[float, float]:
    """(e_prompt, e_completion) for a model known only by its active parameters (SPEC §3)."""
    for limit, e_completion in SIZE_CLASSES:
        if active_params_b <= limit:
            return PREFILL_RATIO * e_completion, e_completion
    raise AssertionError("unreachable: the last size class has no limit")


# ---------------------------------------------------------------------------------------
# reading files


_ANY_HOST: Final = frozenset({"0.0.0.0", "::", ""})


def listens_clash(api: Listen, metrics: Listen | None) -> Literal["same", "overlap"] | None:
    """Whether /metrics' address is the API's ("same"), or its port with a wildcard
    address on either side, so that the second bind would fail ("overlap"). Port 0
    twice is two ports."""
    if metrics is None or metrics.port == 0 or metrics.port != api.port:
        return None
    if metrics == api:
        return "same"
    return "overlap" if metrics.host in _ANY_HOST or api.host in _ANY_HOST else None


def read_config(path: str | os.PathLike[str], shown: str | None = None) -> Config:
    """Read and parse a `.toml` or INI (`.ini`, `.conf`, `.cfg`) config file, its suffix
    in any case; raises ConfigError. Problems name
    the file `shown` when given (a copy's original), else `path`."""
    p = Path(path)
    label = p.name
    try:
        # (utf-8-sig: a BOM a Windows editor put first, which tomllib and configparser
        # would refuse as a cryptic "invalid statement at line 1, column 1")
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{shown or p}: cannot read: {getattr(e, 'strerror', None) or e}"]
                          ) from e
    suffix = p.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except ValueError as e:  # TOMLDecodeError, or an integer of over 4300 digits
            raise ConfigError([f"{label}: not valid TOML: {e}"]) from e
        except RecursionError:  # arrays or tables nested thousands deep
            raise ConfigError([f"{label}: not valid TOML here: nested too deeply"]) from None
        try:
            return parse_config(data, source=label)
        except RecursionError:  # dotted keys (a.a.a…) the parser takes flat, then deep
            raise ConfigError([f"{label}: not valid here: nested too deeply"]) from None
    if suffix in (".ini", ".conf", ".cfg"):
        data, names = _ini_to_mapping(text, label)
        return parse_config(data, source=label, ini_names=names)
    raise ConfigError([f"{label}: unknown config format (name it .toml, or .ini, .conf "
                       "or .cfg for INI)"])


_INI_SECTIONS: Final = {"region": "regions", "model": "models"}
_INI_CONTAINERS: Final = ("regions", "models", "upstreams", "auth")


def _ini_to_mapping(text: str, label: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Turn the INI form into the TOML-shaped mapping (values stay strings).

    Returns the mapping and, for each list item, the INI section it came from, so that
    problems name `[upstream:eu-west-a]` rather than `upstreams[0]`.
    """
    cp = configparser.ConfigParser(interpolation=None, delimiters=("=",), strict=True)
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        cp.read_string(text, source=label)
    except configparser.Error as e:
        raise ConfigError([f"{label}: not valid INI: {' '.join(str(e).split())}"]) from e
    data: dict[str, Any] = {}
    names: dict[str, str] = {}
    for section in cp.sections():
        items = dict(cp.items(section, raw=True))
        kind, sep, name = section.partition(":")
        if not sep:
            if section in _INI_CONTAINERS:
                # written as [upstream:NAME] etc.; a plain [upstreams] would collide with them
                data[f"[{section}]"] = items  # reported as an unknown section below
                continue
            if section == "auto" and "models" in items:
                items["models"] = _ini_list(items["models"])  # type: ignore[assignment]
            data[section] = items
        elif kind in _INI_SECTIONS:
            data.setdefault(_INI_SECTIONS[kind], {})[name] = items
        elif kind in ("upstream", "key"):
            if "name" in items:
                items["name "] = items.pop("name")  # an unknown key: the name is the section's
            lst = data.setdefault("upstreams", []) if kind == "upstream" else (
                data.setdefault("auth", {}).setdefault("keys", [])
            )
            if kind == "upstream" and "models" in items:
                items["models"] = _ini_map(items["models"])  # type: ignore[assignment]
            names[f"{'upstreams' if kind == 'upstream' else 'auth.keys'}[{len(lst)}]"] = (
                f"[{section}]"
            )
            lst.append({"name": name, **items})
        else:
            data[section] = items  # reported as an unknown section below
    return data, names


def _ini_list(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\n]", value) if v.strip()]


def _ini_map(value: str) -> dict[str, str] | str:
    out: dict[str, str] = {}
    for item in _ini_list(value):
        k, sep, v = item.partition("=")
        if not sep or not k.strip() or not v.strip():
            return value  # reported as a type error by the parser
        out[k.strip()] = v.strip()
    return out


# ---------------------------------------------------------------------------------------
# parsing


class _Problems:
    def __init__(self, source: str, ini_names: Mapping[str, str] | None) -> None:
        self.source = source
        self.ini = ini_names
        self.lines: list[str] = []

    def add(self, path: str, what: str) -> None:
        if self.ini is not None:
            path = self._ini_path(path)
        # A TOML key may hold any character: escaped, a newline in one cannot split the line.
        path = "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
        self.lines.append(f"{self.source}: {path}: {what}")

    def shown(self, path: str) -> str:
        """`path` as a problem line names it (the INI form's section, for one)."""
        return path if self.ini is None else self._ini_path(path)

    def _ini_path(self, path: str) -> str:
        """Name the key as the INI file has it: `[upstream:eu-west-a] region`."""
        for prefix, section in (self.ini or {}).items():
            if path == prefix or path.startswith(prefix + "."):
                return f"{section} {path[len(prefix) + 1 :]}".rstrip()
        m = re.fullmatch(r'(regions|models)\.("[^"]*"|[^.]+)(?:\.(.+))?', path)
        if m:
            kind = "region" if m.group(1) == "regions" else "model"
            return f"[{kind}:{m.group(2).strip(chr(34))}] {m.group(3) or ''}".rstrip()
        m = re.fullmatch(r"(server|timeouts|auto)\.(.+)", path)
        if m:
            return f"[{m.group(1)}] {m.group(2)}"
        return path


_Conv = Callable[[Any, bool], Any]


class _Secret(ValueError):
    """A problem with a value that must not be echoed (it holds credentials)."""


def _conv_int(v: Any, ini: bool) -> int:
    if ini and isinstance(v, str):
        try:
            v = int(v.replace("_", ""))
        except ValueError:
            raise TypeError("expected an integer") from None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("expected an integer")
    return v


def _conv_float(v: Any, ini: bool) -> float:
    if ini and isinstance(v, str):
        v = float(v.replace("_", ""))
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError("expected a number")
    try:
        f = float(v)
    except OverflowError:  # an int beyond the float range
        raise ValueError("number out of range") from None
    if not math.isfinite(f):
        raise TypeError("expected a number")
    return f


def _conv_bool(v: Any, ini: bool) -> bool:
    if ini and isinstance(v, str):
        low = v.strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
    if not isinstance(v, bool):
        raise TypeError("expected true, false, yes, no, on, off, 1 or 0" if ini
                        else "expected true or false")
    return v


def _conv_str(v: Any, ini: bool) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError("expected a non-empty string")
    return v


def _conv_path(v: Any, ini: bool) -> str:
    s = _conv_str(v, ini)
    if "\0" in s:  # no file can be named so: every open() of it raises ValueError
        raise ValueError("a path cannot hold a NUL character")
    return s


def _conv_listen(v: Any, ini: bool) -> Listen:
    if not isinstance(v, str):
        raise TypeError("expected \"HOST:PORT\"")
    return parse_listen(v)


def parse_listen(v: str) -> Listen:
    """Parse `HOST:PORT` or `[V6]:PORT`; raises ValueError (not naming the value)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s\[\]]+):(\d{1,5})", v.strip())
    if not m:
        raise ValueError("expected \"HOST:PORT\"")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError("port out of range")
    return Listen(host, port)


def _conv_url(v: Any, ini: bool) -> str:
    """An upstream's base URL, to which the API paths are appended."""
    s = _conv_str(v, ini)
    # Echoed in the problem line only when it cannot hold a secret: user:password@, or
    # a query such as ?api-key=…, are never quoted, nor is a typo near them.
    err = _Secret if "@" in s or "?" in s else ValueError
    try:
        u = urlsplit(s)
    except ValueError:  # an unclosed [IPv6 address
        raise err("expected an http(s) URL") from None
    if u.username or u.password or "@" in u.netloc:
        raise _Secret("credentials in a URL are not allowed; use api_key_env or api_key_file")
    if u.scheme not in ("http", "https") or not u.hostname:
        raise err("expected an http(s) URL")
    try:
        port = u.port
    except ValueError:  # not a number, or over 65535
        port = 0
    if port == 0:
        raise err("expected an http(s) URL with a port of 1-65535")
    if re.search(r"[\s\x00-\x1f\x7f]", s):
        raise err("expected an http(s) URL without spaces or control characters")
    if "?" in s or "#" in s:
        raise err("expected an http(s) URL without a query (?) or fragment (#): the API "
                  "paths are appended to it")
    return s.rstrip("/")


_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _conv_env_name(v: Any, ini: bool) -> str:
    """The name of an environment variable; anything else is never echoed, as it may be
    the key itself written in its place."""
    s = _conv_str(v, ini)
    if not _ENV_NAME_RE.fullmatch(s):
        raise _Secret("expected the name of an environment variable (letters, digits and "
                      "_, not first a digit), not the key itself")
    return s


def _conv_proxy(v: Any, ini: bool) -> str:
    """A forward proxy URL; it may carry credentials (never echoed in a problem line)."""
    if not isinstance(v, str) or not v:
        raise _Secret("expected a non-empty string")
    u = urlsplit(v)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise _Secret("expected an http(s) URL such as http://proxy.corp:3128")
    return v


def _take(
    p: _Problems,
    path: str,
    table: Any,
    schema: Mapping[str, tuple[_Conv, Any]],
    ini: bool,
    required: Iterable[str] = (),
) -> dict[str, Any]:
    """Check one table against a schema of key -> (converter, default)."""
    if not isinstance(table, Mapping):
        p.add(path, "expected a table")
        return {k: d for k, (_, d) in schema.items()}
    out: dict[str, Any] = {}
    for key in table:
        if key not in schema:
            p.add(f"{path}.{key}".lstrip("."), "unknown key")
    for key, (conv, default) in schema.items():
        full = f"{path}.{key}".lstrip(".")
        if key not in table:
            if key in required:
                p.add(full, "missing")
            out[key] = default
            continue
        try:
            out[key] = conv(table[key], ini)
        except (TypeError, ValueError) as e:
            msg = str(e)
            if isinstance(e, ValueError) and msg.startswith(("invalid literal", "could not")):
                msg = "expected a number"
            p.add(full, msg if isinstance(e, _Secret) else f"{msg} (got {table[key]!r})")
            out[key] = default
    return out


def _positive(p: _Problems, path: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        p.add(path, f"must be {'>= 0' if zero_ok else '> 0'} (got {value!r})")


# Bounds far past any real figure, so that a typo (1e308, 1e-300) is refused rather than
# turning eco figures into infinities (null in JSON, +Inf counters for good) or a
# Retry-After of 300 digits.
MAX_INTENSITY: Final = 5000.0  # g/kWh; the dirtiest grids are near 1,100
MAX_PUE: Final = 10.0
MAX_WH_PER_1K: Final = 1000.0  # Wh per 1k tokens; LLMs are near 0.01-10
MAX_ACTIVE_PARAMS_B: Final = 100_000.0
MIN_RATE_PER_S: Final = 1 / 86400  # one request a day


def _at_most(p: _Problems, path: str, value: float | None, limit: float) -> None:
    if value is not None and value > limit:
        p.add(path, f"must be <= {limit:g} (got {value!r})")


_SERVER: Final[Mapping[str, tuple[_Conv, Any]]] = {
    "listen": (_conv_listen, Listen("127.0.0.1", 8080)),
    "metrics_listen": (_conv_listen, None),
    "max_body_bytes": (_conv_int, 8 * 1024 * 1024),
    "retries": (_conv_int, 2),
    "shutdown_grace_s": (_conv_float, 30.0),
    "workers": (_conv_int, 1),
    "trust_env": (_conv_bool, False),
    "max_inflight": (_conv_int, 4096),
    "max_connections": (_conv_int, 0),
}
_TIMEOUTS: Final = {f.name: (_conv_float, f.default) for f in attrs.fields(Timeouts)}
_KEY: Final[Mapping[str, tuple[_Conv, Any]]] = {
    "name": (_conv_str, None),
    "sha256": (_conv_str, None),
    "key_env": (_conv_env_name, None),
    "key_file": (_conv_path, None),
    "rate_per_s": (_conv_float, None),
}
_REGION: Final[Mapping[str, tuple[_Conv, Any]]] = {
    "grid_intensity_g_per_kwh": (_conv_float, 0.0),
    "pue": (_conv_float, 1.0),
    "intensity_feed": (_conv_path, None),
    "intensity_max_age_s": (_conv_float, 3600.0),
}
_MODEL: Final[Mapping[str, tuple[_Conv, Any]]] = {
    "energy_wh_per_1k_prompt_tokens": (_conv_float, None),
    "energy_wh_per_1k_completion_tokens": (_conv_float, None),
    "active_params_b": (_conv_float, None),
}
_UPSTREAM: Final[Mapping[str, tuple[_Conv, Any]]] = {
    "name": (_conv_str, None),
    "region": (_conv_str, None),
    "base_url": (_conv_url, None),
    "models": (lambda v, ini: v, {}),
    "api_key_env": (_conv_env_name, None),
    "api_key_file": (_conv_path, None),
    "max_concurrency": (_conv_int, 0),
    "proxy": (_conv_proxy, None),
    "ca_file": (_conv_path, None),
    "stream_usage": (_conv_bool, True),
}
_TOP: Final = ("server", "timeouts", "auth", "regions", "models", "upstreams", "auto")


def parse_config(
    data: Mapping[str, Any], *, source: str = "<config>", ini_names: Mapping[str, str] | None = None
) -> Config:
    """Check a TOML-shaped mapping and build the Config; raises ConfigError with every problem.

    With `ini_names` the scalar values may be strings (the INI form) and are converted.
    """
    ini = ini_names is not None
    p = _Problems(source, ini_names)
    for key in data:
        if key not in _TOP:
            p.add(key, "unknown section")

    srv = _take(p, "server", data.get("server", {}), _SERVER, ini)
    for k in ("max_body_bytes", "workers", "max_inflight"):
        _positive(p, f"server.{k}", srv[k])
    _positive(p, "server.retries", srv["retries"], zero_ok=True)
    _positive(p, "server.max_connections", srv["max_connections"], zero_ok=True)
    _positive(p, "server.shutdown_grace_s", srv["shutdown_grace_s"], zero_ok=True)
    if srv["workers"] > 64:
        p.add("server.workers", f"at most 64 (got {srv['workers']})")
    m, api = srv["metrics_listen"], srv["listen"]
    clash = listens_clash(api, m)
    if clash == "same":
        p.add("server.metrics_listen", f"must differ from server.listen (both {api})")
    elif clash == "overlap":
        p.add("server.metrics_listen", f"overlaps server.listen ({m} and {api}: the same "
              "port, and one of them binds every address)")
    server = ServerConfig(**srv)

    tmo = _take(p, "timeouts", data.get("timeouts", {}), _TIMEOUTS, ini)
    for k, v in tmo.items():
        _positive(p, f"timeouts.{k}", v)
    timeouts = Timeouts(**tmo)

    keys = _parse_keys(p, data.get("auth", {}), ini)
    regions = _parse_regions(p, data.get("regions", {}), ini)
    models = _parse_models(p, data.get("models", {}), ini)
    upstreams = _parse_upstreams(p, data.get("upstreams", []), ini, regions, models)

    auto = data.get("auto", {})
    auto_models: tuple[str, ...] = ()
    if not isinstance(auto, Mapping):
        p.add("auto", "expected a table")
    else:
        for key in auto:
            if key != "models":
                p.add(f"auto.{key}", "unknown key")
        lst = auto.get("models", [])
        if not isinstance(lst, list) or not all(isinstance(m, str) for m in lst):
            p.add("auto.models", "expected a list of model ids")
        else:
            for i, m in enumerate(lst):
                if m not in models:
                    p.add(f"auto.models[{i}]", f"unknown model {m!r}")
            auto_models = tuple(dict.fromkeys(lst))

    if p.lines:
        raise ConfigError(p.lines)
    return Config(server, timeouts, keys, regions, models, upstreams, auto_models, source,
                  ini_names)


def _parse_keys(p: _Problems, auth: Any, ini: bool) -> tuple[ClientKey, ...]:
    if not isinstance(auth, Mapping):
        p.add("auth", "expected a table")
        return ()
    for key in auth:
        if key != "keys":
            p.add(f"auth.{key}", "unknown key")
    raw = auth.get("keys", [])
    if not isinstance(raw, list):
        p.add("auth.keys", "expected a list of tables")
        return ()
    out: list[ClientKey] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        path = f"auth.keys[{i}]"
        k = _take(p, path, item, _KEY, ini, required=("name",))
        name = k["name"]
        if name is not None:
            if not _NAME_RE.fullmatch(name):
                p.add(f"{path}.name", f"not a valid name: {name!r}")
            elif name == UNKNOWN:
                p.add(f"{path}.name", f"{UNKNOWN!r} is reserved: the metrics' key of a "
                      "request without a valid key")
            elif name in seen:
                p.add(f"{path}.name", f"duplicate key name {name!r}")
            seen.add(name)
        # as written: one refused by its converter (reported) is given all the same
        given = [s for s in ("sha256", "key_env", "key_file")
                 if k[s] is not None or (isinstance(item, Mapping) and s in item)]
        if len(given) != 1:
            p.add(path, "give exactly one of sha256, key_env, key_file")
        if k["sha256"] is not None and not _SHA_RE.fullmatch(k["sha256"]):
            p.add(f"{path}.sha256", "expected 64 lowercase hex digits (see `lrproxy hash-key`)")
        if k["rate_per_s"] is not None and not k["rate_per_s"] >= MIN_RATE_PER_S:
            p.add(f"{path}.rate_per_s",
                  f"must be at least one a day, 1/86400 (got {k['rate_per_s']!r})")
        if name is not None:
            out.append(ClientKey(**k))
    return tuple(out)


def _parse_regions(p: _Problems, raw: Any, ini: bool) -> dict[str, Region]:
    if not isinstance(raw, Mapping):
        p.add("regions", "expected a table of regions")
        return {}
    out: dict[str, Region] = {}
    for name, table in raw.items():
        path = f"regions.{name}"
        if not _NAME_RE.fullmatch(name):
            p.add(path, f"not a valid region name: {name!r}")
        elif name == NONE:
            p.add(path, f"{NONE!r} is reserved: the metrics' region of a request routed nowhere")
        r = _take(p, path, table, _REGION, ini, required=("grid_intensity_g_per_kwh",))
        _positive(p, f"{path}.grid_intensity_g_per_kwh", r["grid_intensity_g_per_kwh"], zero_ok=True)
        _at_most(p, f"{path}.grid_intensity_g_per_kwh", r["grid_intensity_g_per_kwh"],
                 MAX_INTENSITY)
        if r["pue"] < 1.0:
            p.add(f"{path}.pue", f"must be >= 1.0 (got {r['pue']!r})")
        _at_most(p, f"{path}.pue", r["pue"], MAX_PUE)
        _positive(p, f"{path}.intensity_max_age_s", r["intensity_max_age_s"])
        out[name] = Region(name=name, **r)
    return out


def _parse_models(p: _Problems, raw: Any, ini: bool) -> dict[str, Model]:
    if not isinstance(raw, Mapping):
        p.add("models", "expected a table of models")
        return {}
    out: dict[str, Model] = {}
    for mid, table in raw.items():
        path = f'models."{mid}"'
        if mid == AUTO_MODEL:
            p.add(path, f"{AUTO_MODEL} is built in; list its models under [auto]")
        elif not _NAME_RE.fullmatch(mid):
            p.add(path, f"not a valid model id: {mid!r}")
        elif mid == UNKNOWN:
            p.add(path, f"{UNKNOWN!r} is reserved: the metrics' model of a request for no "
                  "known model")
        m = _take(p, path, table, _MODEL, ini)
        ep, ec, size = (
            m["energy_wh_per_1k_prompt_tokens"],
            m["energy_wh_per_1k_completion_tokens"],
            m["active_params_b"],
        )
        for k, v in m.items():
            if v is not None:
                _positive(p, f"{path}.{k}", v, zero_ok=k != "active_params_b")
                _at_most(p, f"{path}.{k}", v,
                         MAX_ACTIVE_PARAMS_B if k == "active_params_b" else MAX_WH_PER_1K)
        source: Literal["config", "size_class", "default"]
        if ep is not None or ec is not None:
            if ep is None or ec is None:
                p.add(path, "give both energy_wh_per_1k_prompt_tokens and "
                      "energy_wh_per_1k_completion_tokens, or active_params_b")
                ep = ec = 0.0  # keep the model, so upstreams naming it add no more problems
            source = "config"
        elif size is not None:
            ep, ec = energy_from_size(size)
            source = "size_class"
        else:
            ec = DEFAULT_E_COMPLETION
            ep = PREFILL_RATIO * ec
            source = "default"
        out[mid] = Model(mid, ep, ec, source, size)
    return out


def _parse_upstreams(
    p: _Problems, raw: Any, ini: bool, regions: Mapping[str, Region], models: Mapping[str, Model]
) -> tuple[Upstream, ...]:
    if not isinstance(raw, list):
        p.add("upstreams", "expected a list of tables ([[upstreams]])")
        return ()
    out: list[Upstream] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        path = f"upstreams[{i}]"
        u = _take(p, path, item, _UPSTREAM, ini, required=("name", "region", "base_url", "models"))
        name, region = u["name"], u["region"]
        if name is not None:
            if not _NAME_RE.fullmatch(name):
                p.add(f"{path}.name", f"not a valid name: {name!r}")
            elif name in seen:
                p.add(f"{path}.name", f"duplicate upstream name {name!r}")
            seen.add(name)
        if region is not None and region not in regions:
            known = ", ".join(sorted(regions)) or "none configured"
            p.add(f"{path}.region", f"unknown region {region!r} (known: {known})")
        if u["api_key_env"] is not None and u["api_key_file"] is not None:
            p.add(path, "give at most one of api_key_env, api_key_file")
        _positive(p, f"{path}.max_concurrency", u["max_concurrency"], zero_ok=True)
        mapping = u["models"]
        if not isinstance(mapping, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in mapping.items()
        ):
            p.add(f"{path}.models", "expected a table of LowRouter id = upstream model name")
            mapping = {}
        elif not mapping and "models" in (item if isinstance(item, Mapping) else {}):
            p.add(f"{path}.models", "serves no model")
        for mid in mapping:
            if mid not in models:
                p.add(f'{path}.models."{mid}"', f"unknown model {mid!r} (declare it in [models])")
        if None not in (name, region, u["base_url"]):
            out.append(Upstream(**{**u, "models": dict(mapping)}))
    if not raw:
        p.add("upstreams", "no upstream configured")
    return tuple(out)


# ---------------------------------------------------------------------------------------
# secrets


@attrs.frozen
class Secrets:
    """Resolved secrets: client key hashes by name, upstream keys by upstream name, and
    the TLS context of each upstream with a `ca_file`, loaded with the keys so that a
    bundle that cannot be read or parsed is a config problem, not a failure later."""

    client_hashes: tuple[tuple[str, bytes], ...]  # (name, sha256 digest)
    upstream_keys: Mapping[str, str | None]
    ca_contexts: Mapping[str, ssl.SSLContext] = attrs.field(factory=dict)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# What an upstream key may hold to go in `Authorization: Bearer …`: visible ASCII and spaces.
_HEADER_SAFE: Final = re.compile(r"[\x20-\x7e]+")
# What no header value holds (a client key may be any other text: it is hashed as UTF-8).
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _read_secret_file(path: str, environ: Mapping[str, str]) -> str:
    p = Path(path)
    if not p.is_absolute():
        base = environ.get("CREDENTIALS_DIRECTORY")
        if not base:
            raise ValueError(f"relative path {path!r} needs $CREDENTIALS_DIRECTORY")
        p = Path(base) / p
    try:
        # (utf-8-sig: a BOM that a Windows editor put first is no part of the key, as
        # `lrproxy hash-key` leaves it out; else a client key would silently never match)
        value = p.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {str(p)!r}: {getattr(e, 'strerror', None) or e}") from e
    if not value:
        raise ValueError(f"{str(p)!r} is empty")
    return value


def _env_secret(environ: Mapping[str, str], name: str) -> str:
    """A key from the environment; one of only whitespace is refused, as in a file."""
    value = environ.get(name)
    if value is None:
        raise ValueError(f"environment variable {name} is not set")
    if not value.strip():
        raise ValueError(f"environment variable {name} is empty")
    return value


def _checkable(path: str, environ: Mapping[str, str]) -> bool:
    """check-config reads a key file when it can: an absolute path, or a relative one with
    $CREDENTIALS_DIRECTORY set (as under the service)."""
    return Path(path).is_absolute() or bool(environ.get("CREDENTIALS_DIRECTORY"))


def _one_name_per_key(p: _Problems, config: Config, first: dict[bytes, int], i: int,
                      digest: bytes) -> None:
    """Refuse a key that an earlier auth.keys entry has too: its requests would all be
    counted under one of the two names (SPEC §5)."""
    j = first.setdefault(digest, i)
    if j != i:
        p.add(f"auth.keys[{i}]", f"the same key as {p.shown(f'auth.keys[{j}]')} "
              f"({config.keys[j].name!r}); each entry needs a key of its own")


def resolve_secrets(
    config: Config, environ: Mapping[str, str], *, check_env: bool = True
) -> Secrets:
    """Read every client and upstream key from the environment or files, and every
    upstream's CA bundle; raises ConfigError.

    `check_env=False` (check-config) skips environment variables, which exist only
    under the service, but still checks that key files can be read: absolute ones, and
    relative ones when $CREDENTIALS_DIRECTORY is set.
    """
    p = _Problems(config.source, config.ini_names)
    hashes: list[tuple[str, bytes]] = []
    first: dict[bytes, int] = {}  # digest -> the entry that has it
    for i, k in enumerate(config.keys):
        path = f"auth.keys[{i}]"
        value: str | None = None
        try:
            if k.sha256 is not None:
                hashes.append((k.name, bytes.fromhex(k.sha256)))
                _one_name_per_key(p, config, first, i, hashes[-1][1])
                continue
            if k.key_env is not None:
                if not check_env:
                    continue
                value = _env_secret(environ, k.key_env)
            elif k.key_file is not None:
                if not (check_env or _checkable(k.key_file, environ)):
                    continue
                value = _read_secret_file(k.key_file, environ)
        except ValueError as e:
            p.add(f"{path}.{'key_env' if k.key_env else 'key_file'}", str(e))
            continue
        if value is not None:
            if _CONTROL.search(value.strip()):  # never quoted: it is a secret
                p.add(f"{path}.{'key_env' if k.key_env else 'key_file'}",
                      "the key holds a line break or another control character, which no "
                      "Authorization header carries: no client could present it")
                continue
            hashes.append((k.name, hashlib.sha256(value.strip().encode()).digest()))
            _one_name_per_key(p, config, first, i, hashes[-1][1])
    up_keys: dict[str, str | None] = {}
    contexts: dict[str, ssl.SSLContext] = {}
    for i, u in enumerate(config.upstreams):
        path = f"upstreams[{i}]"
        up_keys[u.name] = None
        try:
            if u.api_key_env is not None and check_env:
                up_keys[u.name] = _env_secret(environ, u.api_key_env).strip()
            elif u.api_key_file is not None and (check_env or _checkable(u.api_key_file, environ)):
                up_keys[u.name] = _read_secret_file(u.api_key_file, environ)
            key = up_keys[u.name]
            if key is not None and not _HEADER_SAFE.fullmatch(key):
                # never quoted: it is a secret
                raise ValueError("the key holds a line break or another character an "
                                 "Authorization header cannot carry")
        except ValueError as e:
            p.add(f"{path}.{'api_key_env' if u.api_key_env else 'api_key_file'}", str(e))
        if u.ca_file is not None:
            try:
                contexts[u.name] = ssl.create_default_context(cafile=u.ca_file)
            except (OSError, ValueError) as e:  # SSLError is an OSError: not PEM, no
                # certificate in it; a ValueError: a path with a NUL in it
                why = (e.strerror or e.reason if isinstance(e, ssl.SSLError)
                       else e.strerror if isinstance(e, OSError) else str(e))
                p.add(f"{path}.ca_file", f"cannot load {u.ca_file!r} as a CA bundle: "
                      f"{why or type(e).__name__}")
    if p.lines:
        raise ConfigError(p.lines)
    return Secrets(tuple(hashes), up_keys, contexts)
