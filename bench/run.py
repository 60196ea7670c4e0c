"""lrproxy benchmark: the proxy against a direct connection, a minimal relay and nginx.

Usage (from the repository root, with lrproxy installed and `wrk` and `taskset` on PATH;
nginx, uvloop and py-spy are used when installed):

    python bench/run.py                 # full run: 3 repetitions, about 8 minutes
    python bench/run.py --quick         # shorter runs, fewer streams: about 3 minutes
    python bench/run.py --scenarios workers   # only 1 against 2 workers (lrproxy, the
                                              # minimal relay, nginx): ~2 min
    python bench/run.py --profile [S]   # py-spy (else cProfile) summary of lrproxy under
                                        # S seconds (10) of 64-connection non-streaming load
    python bench/run.py --soak 100000   # VmRSS of each proxy every 20k of 100k requests
    python bench/run.py --litellm ~/litellm-venv/bin/litellm   # also a LiteLLM proxy column
    options: --reps N; --loop asyncio (keep uvloop from the proxies); --only NAME,...
    (targets besides direct and minimal); --scenarios wrk,gaps,slow,memory,workers (a subset);
    --workers-upstream nginx|sim (the workers scenario's upstream; nginx when installed);
    --workers-refs minimal,nginx (the workers scenario's references; '' for none);
    --prompt-kib N (N KiB of earlier turns in every request); --wait-quiet S (first
    wait up to S seconds for idle cores); --json FILE (every repetition's figures);
    with --profile: --profile-streams, --profile-spaced, --profile-target minimal, --profiler cprofile,
    --profile-raw FILE (py-spy's collapsed stacks).

It starts the simulated upstream (`python -m lrproxy.simupstream`, on uvloop when
installed) and, in front of it, each target in turn: `direct` (the client talks to the
sim), `minimal` (bench/minimal_relay.py, the ~60-line aiohttp byte relay), `lrproxy`
(`lrproxy serve`: one region, one upstream, one model, one sha256 client key, metrics
listener on, its default JSON access log on stdout going to a file), `lrproxy-nolog`
(the same with `--no-access-log`) and `nginx` (proxy_buffering off, keep-alive upstream;
skipped when nginx is not installed), and `litellm` (LiteLLM's proxy, `litellm --config`
with the sim as an `openai/` model at its `api_base`; only with `--litellm PATH` naming
its `litellm` command, installed in a venv of its own). The proxy under test runs alone
on core 0 (`taskset -c 0`); the sim, wrk and this script's clients share core 1.
LiteLLM takes ~100 times the others' CPU per request, so its column runs with fewer
requests and connections (LITELLM_CONNS where a row says 64 or 32, runs of at least
LITELLM_MIN_WRK_S, a tenth of the warm-up and memory requests, at most 200 slow
streams), and it is let settle after each wrk run (requests wrk left behind).

Scenarios, each run `--reps` times with the targets interleaved; one table of medians:
- chat completions, non-streaming and 20-chunk streams, through `wrk -t1` (a Lua script
  POSTs the JSON with an Authorization header) at 1 and 64 connections: req/s, p50
  latency, and the proxy's CPU time per request (utime+stime of its process tree from
  /proc/PID/stat around the run, divided by the requests wrk completed);
- streams of 20 chunks sent 5 ms apart (each chunk its own read, as from a live model)
  at 32 connections through wrk: req/s and the proxy's CPU per stream;
- time to the first chunk and the gaps between chunks of streams whose chunks the sim
  sends 20 ms apart (an aiohttp client timestamps each event as it arrives);
- slow streams held open (1000; 200 with --quick) in a fresh process: VmRSS growth per
  stream (with --quick, at the end of the other process instead);
- memory flatness: VmRSS after 2k requests and again once 20k are served, the wrk runs
  included (500 and 4k with --quick);
- workers (after the rest, in its own table): `lrproxy serve --no-access-log` with
  `server.workers = 1` and with `= 2`, otherwise the same config, a fresh process tree
  each repetition, under 64-connection non-streaming wrk runs of 5 s (2 s with --quick):
  req/s of each, the ratio 2w/1w, and CPU per request of lrproxy (the supervisor and its
  workers summed), the upstream and the load. Here the proxy, an upstream of its own, wrk
  and this script all run on both cores (`taskset -c 0,1`): there is no third core for
  the load, so the ratio is a lower bound on how lrproxy itself scales. The upstream is
  nginx answering with the sim's own answers (~45 µs a request here, where the
  sim takes ~250), so that the proxy gets as much of the two cores as it can; without
  nginx, or with `--workers-upstream sim`, the sim itself. The references go through the
  same runs, interleaved (`--workers-refs`): the minimal relay as 1 and as 2 processes
  on one port (SO_REUSEPORT, as lrproxy's workers) and nginx with `worker_processes` 1
  and 2, so that the ceiling the machine sets shows for a proxy of the same cost and
  for one ten times cheaper. About 2 minutes.
Latency is compared with `direct` (ms added), CPU with `minimal` (ratio); the issue's
targets are checked at the end. Noise rows say how much CPU other processes took on the
two cores during the wrk runs: on a shared machine, read the table with them. Loopback
only; every process started here is stopped by its PID, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import platform
import pstats
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
PROXY_CORE = "0"
LOAD_CORE = "1"
MODEL_ID = "openai/gpt-4o-mini"  # the LowRouter id clients of lrproxy send
SIM_MODEL = "gpt-4o-mini"  # the upstream's own name, which direct/minimal/nginx send
CHUNKS = 20
GAP_DELAY_S = 0.02
# A live LLM stream: its chunks arrive apart, one upstream read each, so the per-read
# cost counts. 20 chunks 5 ms apart on 32 connections: ~300 streams/s, 6,000 reads/s.
SPACED_S = 0.005
SPACED_CONNS = 32
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Plan:
    reps: int
    wrk_s: float
    warmup: int
    mem_first: int
    mem_total: int
    slow_streams: int
    gap_streams: int
    gap_conc: int = 4
    slow_in_own_process: bool = True  # else after the rest, in the same process (faster)
    workers_s: float = 5.0  # each wrk run of the workers scenario


FULL = Plan(reps=3, wrk_s=3.0, warmup=300, mem_first=2000, mem_total=20000,
            slow_streams=1000, gap_streams=16)
QUICK = Plan(reps=3, wrk_s=1.0, warmup=200, mem_first=500, mem_total=4000,
             slow_streams=200, gap_streams=8, slow_in_own_process=False, workers_s=2.0)
SCENARIOS = ("wrk", "gaps", "slow", "memory", "workers")
BOTH_CORES = "0,1"  # the workers scenario: everything on both cores
# Paced runs: 64 connections, each pausing this long before a request, for about 900
# requests or 450 streams a second: below what every proxy here can take, so all of
# them work at the same rate. Saturated runs are bimodal on this VM (the same relay
# has taken 250 and 500 µs a request in one run, by how its loop batches events);
# paced ones compare the code's cost at equal load.
PACE_MS: Final = {"ns": 70, "st": 140}
# LiteLLM's proxy (--litellm): ~40-100 req/s on one core here, 10-50 ms of CPU a request.
# Its wrk runs use at most this many connections (64 would leave most of a short run's
# streams unfinished), last at least LITELLM_MIN_WRK_S, and its plan is scaled down
# (Bench.plan_for), so that its column adds ~1 minute per repetition.
LITELLM_CONNS: Final = 8
LITELLM_MIN_WRK_S: Final = 2.0
LITELLM_START_S: Final = 90.0  # its start imports for ~15 s on an idle core


# ---------------------------------------------------------------------------------------
# processes


class Procs:
    """Every process this script starts, stopped by PID in reverse order."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], *, log: Path, env: dict[str, str] | None = None,
              stdout: Path | None = None, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        with open(log, "ab") as err, open(stdout or log, "ab") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 env=env, cwd=cwd)
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        if p in self.live:
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.live)):
            self.stop(p)


def worktree(rev: str, made: list[Path]) -> Path:
    """The tree of revision `rev` (a new git worktree, added to `made`); `.` is this one
    as it is (bench/ab.py, bench/instr.py)."""
    if rev == ".":
        return ROOT
    wt = Path(tempfile.mkdtemp(prefix="lrproxy-rev-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), rev],
                   check=True, capture_output=True)
    made.append(wt)
    return wt


def remove_worktrees(made: list[Path]) -> None:
    for wt in made:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)],
                       capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, p: subprocess.Popen[bytes] | None, log: Path, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if p is not None and p.poll() is not None:
            raise SystemExit(f"process {p.args} exited with {p.returncode}:\n"
                             f"{log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {HOST}:{port} after {timeout}s; see {log}")


def wait_listening(port: int, n: int, p: subprocess.Popen[bytes], log: Path,
                   timeout: float = 20) -> None:
    """Until n sockets listen on `port` (SO_REUSEPORT relays each bind their own)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        if sum(r[1].endswith(f":{port:04X}") and r[3] == "0A" for r in rows) >= n:
            return
        if p.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"{n} listeners on {HOST}:{port} not up after {timeout}s; see {log}")


def pid_tree(pid: int) -> list[int]:
    """The process and its descendants (nginx's worker, lrproxy's workers if any)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def tree_cpu_s(pid: int) -> dict[int, float]:
    """utime + stime of each process of the tree, in seconds."""
    out = {}
    for p in pid_tree(pid):
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            out[p] = (int(fields[11]) + int(fields[12])) / TICK  # fields 14, 15 of stat(5)
    return out


def cpu_s(pid: int) -> float:
    """utime + stime of the process tree (the process and all its descendants), in seconds."""
    return sum(tree_cpu_s(pid).values())


def rss_kib(pid: int) -> int:
    total = 0
    for p in pid_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


# ---------------------------------------------------------------------------------------
# request bodies and wrk scripts


def body(model: str, *, stream: bool, sim: dict[str, Any], history_kib: int = 0) -> bytes:
    """A chat completion request; history_kib adds earlier turns of about that size."""
    history = []
    words = ("the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while",
             "carbon", "aware", "routers", "count")
    for i in range(history_kib):  # one 1 KiB turn each, user and assistant alternating
        text = " ".join(words[(i + k) % len(words)] for k in range(180))[:1000]
        history.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    obj: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            *history,
            {"role": "user", "content": "Write a short haiku about carbon-aware routing of "
                                        "language model requests between two regions."},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
        "sim": sim,
    }
    if stream:
        # Usage on for every target, so that all of them relay the same upstream bytes
        # (lrproxy asks for it anyway, SPEC §1.1).
        obj["stream"] = True
        obj["stream_options"] = {"include_usage": True}
    return json.dumps(obj, separators=(",", ":")).encode()


_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
local bodies = { %(bodies)s }
local reqs = {}
local i = 0
local limit = tonumber(os.getenv("BENCH_LIMIT") or "0")
local pause = tonumber(os.getenv("BENCH_PAUSE_MS") or "0")
local n = 0
if pause > 0 then
  delay = function() return pause end
end
init = function(args)
  for k, b in ipairs(bodies) do reqs[k] = wrk.format(nil, nil, nil, b) end
end
request = function()
  i = i %% #reqs + 1
  return reqs[i]
end
%(response)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,'
    .. '"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

# Stop after BENCH_LIMIT answers: wrk's own -d sleeps on, so interrupt it (SIGINT makes
# it print its summary); system() ignores SIGINT while it waits, hence the background job.
_LUA_LIMIT = """\
response = function(status, headers, body)
  n = n + 1
  if n == limit then
    wrk.thread:stop()
    os.execute("(sleep 0.05; kill -INT $PPID) &")
  end
end"""


def write_lua(path: Path, key: str, bodies: list[bytes], limit: bool) -> Path:
    path.write_text(_LUA % {
        "key": key,
        "bodies": ", ".join(f"[==[{b.decode()}]==]" for b in bodies),
        "response": _LUA_LIMIT if limit else "",
    })
    return path


def core_busy_s() -> tuple[float, float]:
    """Busy seconds of cores 0 and 1 since boot, from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name in ("cpu0", "cpu1"):
                v = [int(x) for x in vals]
                out[name] = (sum(v[:8]) - v[3] - v[4]) / TICK  # all but idle and iowait
    return out["cpu0"], out["cpu1"]


def wait_quiet(limit_s: float, busy_pct: float = 15.0) -> float:
    """Wait up to limit_s for 3 s in which cores 0 and 1 are each under busy_pct; the busiest %."""
    end = time.monotonic() + limit_s
    while True:
        a, t0 = core_busy_s(), time.monotonic()
        time.sleep(3)
        b, t1 = core_busy_s(), time.monotonic()
        worst = max(100 * (y - x) / (t1 - t0) for x, y in zip(a, b, strict=True))
        if worst < busy_pct or time.monotonic() > end:
            return worst
        print(f"waiting for a quiet machine: cores {worst:.0f}% busy", file=sys.stderr, flush=True)


def own_s() -> float:
    """CPU seconds of this script and its reaped children (wrk runs)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def run_wrk(url: str, script: Path, conns: int, seconds: float, pid: int | None,
            limit: int = 0, sim_pid: int | None = None, cores: str = LOAD_CORE,
            pause_ms: int = 0) -> dict[str, float]:
    """One wrk run; the proxy's CPU seconds, and the cores' use by others, around it.

    `pause_ms`: each connection waits that long before each request (wrk's delay()),
    which paces the load below what any of the proxies can take.
    """
    env = {**os.environ, "BENCH_LIMIT": str(limit), "BENCH_PAUSE_MS": str(pause_ms)}
    argv = ["taskset", "-c", cores, "wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s",
            "--timeout", "10s", "--latency", "-s", str(script), url]
    t0, (b0, b1), o0 = time.monotonic(), core_busy_s(), own_s()
    c0 = cpu_s(pid) if pid else 0.0
    s0 = cpu_s(sim_pid) if sim_pid else 0.0
    out = subprocess.run(argv, capture_output=True, text=True, env=env,
                         timeout=seconds + 60).stdout
    c1 = cpu_s(pid) if pid else 0.0
    s1 = cpu_s(sim_pid) if sim_pid else 0.0
    t1, (e0, e1), o1 = time.monotonic(), core_busy_s(), own_s()
    m = re.search(r"^WRKJSON (\{.*\})$", out, re.M)
    if m is None:
        raise SystemExit(f"wrk gave no summary:\n{out}")
    r = json.loads(m.group(1))
    n = max(r["requests"], 1)
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    wall = max(t1 - t0, 1e-3)
    return {
        "requests": r["requests"],
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "errors": errors,
        "cpu_us": (c1 - c0) * 1e6 / n if pid else float("nan"),
        # what other processes took of the proxy's core and of the load core, in %
        "others0": max(0.0, 100 * ((e0 - b0) - (c1 - c0)) / wall),
        "others1": max(0.0, 100 * ((e1 - b1) - (s1 - s0) - (o1 - o0)) / wall),
        # the same for both cores together (of 200%), and the sim's and the load's CPU
        "busy": 100 * ((e0 - b0) + (e1 - b1)) / wall,
        "others": max(0.0, 100 * ((e0 - b0) + (e1 - b1) - (c1 - c0) - (s1 - s0) - (o1 - o0))
                      / wall),
        "sim_us": (s1 - s0) * 1e6 / n if sim_pid else float("nan"),
        "load_us": (o1 - o0) * 1e6 / n,  # wrk and this script
    }


# ---------------------------------------------------------------------------------------
# targets


@dataclass
class Target:
    name: str
    model: str
    start: Callable[[], subprocess.Popen[bytes] | None]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    lua: dict[str, Path] = field(default_factory=dict)
    heavy: bool = False  # LiteLLM: fewer connections and requests (Bench.plan_for)
    # The workers scenario's references: the canned upstream answers a stream only to
    # `Accept: text/event-stream`, which the minimal relay does not pass on
    check_stream: bool = True

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1/chat/completions"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args = args
        self.plan = plan
        self.procs = Procs()
        self.tmp = Path(tempfile.mkdtemp(prefix="lrproxy-bench-"))
        self.key = "sk-bench-" + secrets.token_urlsafe(16)
        self.sim_port = 0
        self.sim: subprocess.Popen[bytes] | None = None
        self.uvloop = args.loop == "auto" and _has_uvloop()
        self.scenarios = set(args.scenarios.split(","))
        # the workers scenario's upstream: nginx with the sim's answers canned, or the sim
        self.workers_upstream = getattr(args, "workers_upstream", None) or (
            "nginx" if shutil.which("nginx") else "sim")
        self.served = 0  # requests answered by the process under test so far
        # bench/instr.py: a command the proxies run under (valgrind), and their start time
        self.wrap: list[str] = []
        self.start_timeout = 20.0
        self.rss_mark = 0
        self.results: dict[str, dict[str, list[float]]] = collections.defaultdict(
            lambda: collections.defaultdict(list))
        # the workers scenario: "1" and "2" workers -> metric -> one value per repetition
        self.wresults: dict[str, dict[str, list[float]]] = collections.defaultdict(
            lambda: collections.defaultdict(list))

    # -- processes under test ---------------------------------------------------------

    def start_sim(self, cores: str = LOAD_CORE) -> None:
        self.sim_port = free_port()
        argv = ["--listen", f"{HOST}:{self.sim_port}", "--api-key", self.key,
                "--models", SIM_MODEL]
        # The sim is load, not the thing measured: give it uvloop when there is one.
        code = ("import sys, asyncio\n"
                "try:\n import uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"
                "except ImportError: pass\n"
                "from lrproxy.simupstream import main\nsys.exit(main(sys.argv[1:]))")
        log = self.tmp / "sim.log"
        p = self.procs.start(["taskset", "-c", cores, sys.executable, "-c", code, *argv],
                             log=log)
        wait_port(self.sim_port, p, log)
        self.sim = p

    def _python(self) -> list[str]:
        """The interpreter for the proxies; --loop asyncio hides uvloop from them."""
        if self.uvloop:
            return [sys.executable]
        return [sys.executable, "-c",
                "import sys, runpy; sys.modules['uvloop'] = None; sys.argv[0] = 'bench';"
                "runpy.run_module(sys.argv.pop(1), run_name='__main__')"]

    def start_minimal(self, t: Target, cores: str = PROXY_CORE,
                      processes: int = 1) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{t.name}.log"
        argv = ["taskset", "-c", cores, *self.wrap, sys.executable,
                str(HERE / "minimal_relay.py"),
                "--listen", f"{HOST}:{t.port}", "--upstream", f"http://{HOST}:{self.sim_port}",
                "--loop", "auto" if self.uvloop else "asyncio"]
        if processes > 1:
            argv += ["--processes", str(processes)]
        p = self.procs.start(argv, log=log)
        wait_port(t.port, p, log, self.start_timeout)
        if processes > 1:
            wait_listening(t.port, processes, p, log)
        return p

    def lrproxy_config(self, port: int, workers: int | None = None) -> Path:
        cfg = self.tmp / f"lrproxy-{port}.toml"
        cfg.write_text(f"""\
[server]
listen = "{HOST}:{port}"
metrics_listen = "{HOST}:{free_port()}"
shutdown_grace_s = 1
{"" if workers is None else f"workers = {workers}"}

[auth]
keys = [{{ name = "bench", sha256 = "{hashlib.sha256(self.key.encode()).hexdigest()}" }}]

[regions.eu-west]
grid_intensity_g_per_kwh = 290
pue = 1.2

[models."{MODEL_ID}"]
energy_wh_per_1k_prompt_tokens = 0.02
energy_wh_per_1k_completion_tokens = 0.3

[[upstreams]]
name = "sim"
region = "eu-west"
base_url = "http://{HOST}:{self.sim_port}/v1"
api_key_env = "LRPROXY_BENCH_UPSTREAM_KEY"
models = {{ "{MODEL_ID}" = "{SIM_MODEL}" }}
""")
        return cfg

    def start_lrproxy(self, t: Target, access_log: bool, workers: int | None = None,
                      cores: str = PROXY_CORE, root: Path = ROOT) -> subprocess.Popen[bytes]:
        """`python -m lrproxy serve` from `root`: its lrproxy/ package is the one run
        (bench/ab.py points it at other revisions' worktrees)."""
        log = self.tmp / f"{t.name}.log"
        cfg = self.lrproxy_config(t.port, workers)
        argv = ["taskset", "-c", cores, *self.wrap, *self._python()]
        if self.uvloop:
            argv += ["-m", "lrproxy"]
        else:
            argv += ["lrproxy"]
        argv += ["serve", "--config", str(cfg), "--log-level", "warning"]
        if not access_log:
            argv.append("--no-access-log")
        env = {**os.environ, "LRPROXY_BENCH_UPSTREAM_KEY": self.key}
        if not self.uvloop and workers is not None:
            # The supervisor starts its workers as `python -m lrproxy`, out of reach of
            # _python()'s trick: hide uvloop from them with a sitecustomize instead.
            d = self.tmp / "no-uvloop"
            d.mkdir(exist_ok=True)
            (d / "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None\n")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(d), env.get("PYTHONPATH")]))
        p = self.procs.start(argv, log=log, env=env, stdout=self.tmp / f"{t.name}.access.log",
                             cwd=root)
        wait_port(t.port, p, log, self.start_timeout)
        if workers is not None and workers > 1:  # the supervisor has started them all
            end = time.monotonic() + 20
            while len(pid_tree(p.pid)) < 1 + workers:
                if time.monotonic() > end or p.poll() is not None:
                    raise SystemExit(f"{t.name}: {workers} workers did not start; see {log}")
                time.sleep(0.05)
        return p

    def run_nginx(self, name: str, port: int, http: str, cores: str,
                  workers: int = 1) -> subprocess.Popen[bytes]:
        """nginx in the foreground, `workers` worker processes, with `http` inside its
        http block (its own files under the bench's directory), listening on `port`."""
        d = self.tmp / f"{name}-{port}"
        d.mkdir(exist_ok=True)
        conf = d / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(f"""\
{user}
daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 100000;
{http}
}}
""")
        log = self.tmp / f"{name}.log"
        p = self.procs.start(["taskset", "-c", cores, "nginx", "-p", str(d), "-c", str(conf),
                              "-e", str(d / "error.log")], log=log)
        wait_port(port, p, log)
        return p

    def start_nginx(self, t: Target, cores: str = PROXY_CORE,
                    workers: int = 1) -> subprocess.Popen[bytes]:
        return self.run_nginx(t.name, t.port, f"""\
  upstream sim {{ server {HOST}:{self.sim_port}; keepalive 256; keepalive_requests 100000; }}
  server {{
    listen {HOST}:{t.port} backlog=1024;
    location / {{
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
    }}
  }}""", cores, workers)

    def sim_answer(self, stream: bool) -> bytes:
        """The sim's answer to the workers scenario's request, as lrproxy would send it."""
        obj = json.loads(body(SIM_MODEL, stream=stream, sim={"chunks": CHUNKS},
                                history_kib=self.args.prompt_kib))
        if stream:
            obj["stream_options"] = {"include_usage": True}
        req = urllib.request.Request(
            f"http://{HOST}:{self.sim_port}/v1/chat/completions", data=json.dumps(obj).encode(),
            method="POST", headers={"Authorization": f"Bearer {self.key}",
                                    "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return bytes(r.read())

    def start_canned(self, answers: dict[str, bytes], cores: str) -> subprocess.Popen[bytes]:
        """nginx answering every chat completion with the same bytes: a JSON answer (its
        `return 200`), or an event stream to `Accept: text/event-stream` (lrproxy's stream
        requests; from a file: nginx's static files answer a POST with 405, which
        error_page turns into the file, fetched anew). An upstream at ~45 µs a request
        here, where the sim takes ~250: the workers scenario's load then leaves more of
        the two cores to the proxy."""
        self.sim_port = port = free_port()
        answer = {"json": "answer.json", "stream": "answer.sse"}
        for kind, file in answer.items():
            (self.tmp / file).write_bytes(answers[kind])
        # A JSON answer of under 4 KiB, the usual one, is nginx's `return`: half the
        # work of the file (nginx takes a quoted parameter of up to 4 KiB)
        text = answers["json"].decode()
        json_answer = "rewrite ^ /answer.json last;"
        if len(text) < 3500 and "$" not in text:
            json_answer = "default_type application/json; return 200 \"{}\";".format(
                text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                .replace("\r", "\\r"))
        return self.run_nginx("canned", port, f"""\
  client_body_buffer_size 1m;
  open_file_cache max=16;
  etag off;
  server {{
    listen {HOST}:{port} backlog=1024;
    root {self.tmp};
    location = /v1/chat/completions {{
      if ($http_accept = "text/event-stream") {{ rewrite ^ /answer.sse last; }}
      {json_answer}
    }}
    location = /answer.json {{ default_type application/json; error_page 405 =200 $uri; }}
    location = /answer.sse {{ default_type text/event-stream; error_page 405 =200 $uri; }}
  }}""", cores)

    def start_litellm(self, t: Target) -> subprocess.Popen[bytes]:
        """LiteLLM's proxy (`--litellm PATH`), one process, with the sim as an OpenAI-
        compatible model: clients send SIM_MODEL with the bench key, which is also its
        master key; it sends the same key to the sim."""
        cfg = self.tmp / "litellm.yaml"
        cfg.write_text(f"""\
model_list:
  - model_name: {SIM_MODEL}
    litellm_params:
      model: openai/{SIM_MODEL}
      api_base: http://{HOST}:{self.sim_port}/v1
      api_key: {self.key}
general_settings:
  master_key: {self.key}
""")
        log = self.tmp / f"{t.name}.log"
        # no fetch of the model cost map from GitHub at start; errors only in its log
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
        argv = ["taskset", "-c", PROXY_CORE, self.args.litellm, "--config", str(cfg),
                "--host", HOST, "--port", str(t.port), "--num_workers", "1"]
        p = self.procs.start(argv, log=log, env=env)
        wait_port(t.port, p, log, LITELLM_START_S)
        return p

    def plan_for(self, t: Target) -> Plan:
        """The plan, scaled down for LiteLLM (see LITELLM_CONNS)."""
        if not t.heavy:
            return self.plan
        p = self.plan
        return dataclasses.replace(
            p, wrk_s=max(p.wrk_s, LITELLM_MIN_WRK_S), warmup=max(20, p.warmup // 10),
            mem_first=max(50, p.mem_first // 10), mem_total=max(200, p.mem_total // 20),
            slow_streams=min(p.slow_streams, 200))

    @staticmethod
    def conns(t: Target, n: int) -> int:
        return min(n, LITELLM_CONNS) if t.heavy else n

    def settle(self, t: Target, limit_s: float = 10.0) -> None:
        """LiteLLM: wait (up to limit_s) until it has finished what a wrk run left behind
        (its CPU under 10 % for 0.3 s), so that it does not count in the next run."""
        if not t.heavy or not t.pid:
            return
        end = time.monotonic() + limit_s
        while time.monotonic() < end:
            c0 = cpu_s(t.pid)
            time.sleep(0.3)
            if cpu_s(t.pid) - c0 < 0.03:
                return

    def targets(self) -> list[Target]:
        ts = [
            Target("direct", SIM_MODEL, lambda: None),
            Target("minimal", SIM_MODEL, lambda: None),
            Target("lrproxy", MODEL_ID, lambda: None),
            Target("lrproxy-nolog", MODEL_ID, lambda: None),
        ]
        ts[1].start = lambda t=ts[1]: self.start_minimal(t)
        ts[2].start = lambda t=ts[2]: self.start_lrproxy(t, access_log=True)
        ts[3].start = lambda t=ts[3]: self.start_lrproxy(t, access_log=False)
        if shutil.which("nginx"):
            ng = Target("nginx", SIM_MODEL, lambda: None)
            ng.start = lambda t=ng: self.start_nginx(t)
            ts.append(ng)
        else:
            print("nginx not installed: its column is skipped", file=sys.stderr)
        if self.args.litellm:
            ll = Target("litellm", SIM_MODEL, lambda: None, heavy=True)
            ll.start = lambda t=ll: self.start_litellm(t)
            ts.append(ll)
        if self.args.only:
            keep = set(self.args.only.split(",")) | {"direct", "minimal"}
            ts = [t for t in ts if t.name in keep]
        for t in ts:
            t.port = self.sim_port if t.name == "direct" else free_port()
            kib = self.args.prompt_kib
            ns = body(t.model, stream=False, sim={"chunks": CHUNKS}, history_kib=kib)
            st = body(t.model, stream=True, sim={"chunks": CHUNKS}, history_kib=kib)
            t.lua = {
                "ns": write_lua(self.tmp / f"{t.name}-ns.lua", self.key, [ns], False),
                "st": write_lua(self.tmp / f"{t.name}-st.lua", self.key, [st], False),
                "mix": write_lua(self.tmp / f"{t.name}-mix.lua", self.key, [ns, st], True),
                "sts": write_lua(self.tmp / f"{t.name}-sts.lua", self.key, [body(
                    t.model, stream=True, sim={"chunks": CHUNKS, "chunk_delay_s": SPACED_S},
                    history_kib=kib)], False),
            }
        return ts

    @contextlib.contextmanager
    def running(self, t: Target) -> Iterator[None]:
        t.proc = t.start()
        try:
            self.check(t)
            yield
        finally:
            if t.proc is not None:
                self.procs.stop(t.proc)
                t.proc = None

    def check(self, t: Target) -> None:
        """One answer of each kind, so that a broken target fails loudly, not fast."""
        for stream in (False, True)[:1 + t.check_stream]:
            req = urllib.request.Request(
                t.url, data=body(t.model, stream=stream, sim={"chunks": 3}), method="POST",
                headers={"Authorization": f"Bearer {self.key}",
                         "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                data = r.read()
                ok = r.status == 200 and (data.rstrip().endswith(b"[DONE]") if stream
                                          else b'"choices"' in data)
            if t.name.startswith("lrproxy") and b'"lowrouter"' not in data:
                ok = False
            if not ok:
                raise SystemExit(f"{t.name}: unexpected answer {r.status}: {data[:300]!r}")

    # -- scenarios --------------------------------------------------------------------

    def record(self, t: Target, metric: str, value: float) -> None:
        self.results[t.name][metric].append(value)

    def wrk(self, t: Target, script: str, conns: int, seconds: float, pid: int | None,
            **kw: Any) -> dict[str, float]:
        """run_wrk of `t.lua[script]` at `t`'s share of `conns` (Bench.conns), then `t`
        let settle (Bench.settle)."""
        r = run_wrk(t.url, t.lua[script], self.conns(t, conns), seconds, pid, **kw)
        self.settle(t)
        return r

    def warm(self, t: Target) -> None:
        self.served += self.wrk(t, "mix", 8, 60, None, limit=self.plan_for(t).warmup)["requests"]

    def memory_mark(self, t: Target) -> None:
        """Memory flatness, part 1: VmRSS once mem_first requests are served."""
        assert t.pid
        r = self.wrk(t, "mix", 64, 600, t.pid,
                     limit=max(1, self.plan_for(t).mem_first - self.served))
        self.served += r["requests"]
        self.rss_mark = rss_kib(t.pid)
        self.record(t, "rss_first_mib", self.rss_mark / 1024)
        self.record(t, "errors", r["errors"])

    def memory_end(self, t: Target) -> None:
        """Part 2: top up to mem_total requests (the wrk runs count), VmRSS again."""
        assert t.pid
        mem_total = self.plan_for(t).mem_total
        if self.served < mem_total:
            r = self.wrk(t, "mix", 64, 600, t.pid, limit=mem_total - self.served)
            self.served += r["requests"]
            self.record(t, "errors", r["errors"])
        self.record(t, "rss_growth_kib", rss_kib(t.pid) - self.rss_mark)
        self.record(t, "served", self.served)

    def scenario_wrk(self, t: Target) -> None:
        for kind in ("ns", "st"):
            for conns in (1, 64, 0):  # 0: 64 connections, paced
                r = self.wrk(t, kind, conns or 64, self.plan_for(t).wrk_s, t.pid,
                             sim_pid=self.sim.pid if self.sim else None,
                             pause_ms=0 if conns else PACE_MS[kind])
                self.served += r["requests"]
                name = f"{kind}{conns}" if conns else f"{kind}p"
                self.record(t, f"{name}_rps", r["rps"])
                if conns:
                    self.record(t, f"{name}_p50", r["p50_ms"])
                self.record(t, f"{name}_cpu", r["cpu_us"])
                self.record(t, "errors", r["errors"])
                self.record(t, "others0", r["others0"])
                self.record(t, "others1", r["others1"])
        r = self.wrk(t, "sts", SPACED_CONNS, self.plan_for(t).wrk_s, t.pid,
                     sim_pid=self.sim.pid if self.sim else None)
        self.served += r["requests"]
        self.record(t, "sts_rps", r["rps"])
        self.record(t, "sts_cpu", r["cpu_us"])
        self.record(t, "errors", r["errors"])

    def scenario_gaps(self, t: Target) -> None:
        b = body(t.model, stream=True, sim={"chunks": CHUNKS, "chunk_delay_s": GAP_DELAY_S},
                 history_kib=self.args.prompt_kib)
        ttfc, gaps = _arun(stream_timings(t.url, self.key, b, self.plan.gap_streams,
                                          self.plan.gap_conc), self.uvloop)
        gaps.sort()
        self.record(t, "ttfc_p50", statistics.median(ttfc) * 1000)
        self.record(t, "gap_p50", statistics.median(gaps) * 1000)
        self.record(t, "gap_p99", gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] * 1000)

    def scenario_slow(self, t: Target) -> None:
        assert t.pid
        b = body(t.model, stream=True, sim={"chunks": 2, "chunk_delay_s": 600},
                 history_kib=self.args.prompt_kib)
        per = _arun(hold_streams(t.port, self.key, b, self.plan_for(t).slow_streams, t.pid),
                    self.uvloop)
        self.record(t, "slow_kib", per)

    def run_target(self, t: Target) -> None:
        t0 = time.monotonic()
        want = self.scenarios
        if t.name == "direct":
            self.check(t)
            self.warm(t)
            if "wrk" in want:
                self.scenario_wrk(t)
            if "gaps" in want:
                self.scenario_gaps(t)
        else:
            if "slow" in want and self.plan_for(t).slow_in_own_process:
                with self.running(t):  # a fresh process: memory per open stream
                    self.warm(t)
                    self.scenario_slow(t)
            if want & {"memory", "wrk", "gaps"}:
                # Another: memory after mem_first requests, the load, then after mem_total.
                with self.running(t):
                    self.served = 0
                    self.warm(t)
                    if "memory" in want:
                        self.memory_mark(t)
                    if "wrk" in want:
                        self.scenario_wrk(t)
                    if "gaps" in want:
                        self.scenario_gaps(t)
                    if "memory" in want:
                        self.memory_end(t)
                    if "slow" in want and not self.plan_for(t).slow_in_own_process:
                        self.scenario_slow(t)
        print(f"  {t.name}: {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)

    def run(self) -> None:
        if self.scenarios - {"workers"}:
            self.start_sim()
            targets = self.targets()
            for rep in range(self.plan.reps):
                print(f"repetition {rep + 1}/{self.plan.reps}", file=sys.stderr, flush=True)
                for t in targets:
                    self.run_target(t)
        if "workers" in self.scenarios:
            self.run_workers()

    def run_workers(self) -> None:
        """lrproxy-nolog with server.workers = 1 and = 2, everything on both cores, and
        the same for each reference of --workers-refs (the minimal relay as 1 and 2
        processes on one port, nginx with 1 and 2 worker processes): the ceiling the
        machine sets is theirs too.

        Its own sim (the other one is pinned to core 1), then per repetition one fresh
        process tree of each, warmed up, and one non-streaming wrk -c64 run.
        """
        t0 = time.monotonic()
        old_sim, old_port = self.sim, self.sim_port
        self.start_sim(cores=BOTH_CORES)
        if self.workers_upstream == "nginx":  # the sim's answers, canned in nginx
            answers = {"json": self.sim_answer(False), "stream": self.sim_answer(True)}
            assert self.sim is not None
            self.procs.stop(self.sim)
            self.sim = self.start_canned(answers, cores=BOTH_CORES)
        sim = self.sim
        assert sim is not None
        refs = [r for r in self.args.workers_refs.split(",") if r]
        if "nginx" in refs and not shutil.which("nginx"):
            refs.remove("nginx")
        # results key ("1", "2" for lrproxy; "minimal-2", ...) -> target, n, processes
        ts: dict[str, tuple[Target, int, int]] = {}
        for kind in ("lrproxy", *refs):
            model = MODEL_ID if kind == "lrproxy" else SIM_MODEL
            ns = body(model, stream=False, sim={"chunks": CHUNKS},
                      history_kib=self.args.prompt_kib)
            mix = [ns, body(model, stream=True, sim={"chunks": CHUNKS},
                            history_kib=self.args.prompt_kib)]
            for n in (1, 2):
                t = Target(f"{kind}-{n}w", model, lambda: None, port=free_port(),
                           check_stream=kind == "lrproxy")
                if kind == "lrproxy":
                    t.start = lambda t=t, n=n: self.start_lrproxy(
                        t, access_log=False, workers=n, cores=BOTH_CORES)
                elif kind == "minimal":
                    t.start = lambda t=t, n=n: self.start_minimal(t, BOTH_CORES, n)
                else:
                    t.start = lambda t=t, n=n: self.start_nginx(t, BOTH_CORES, n)
                t.lua = {"ns": write_lua(self.tmp / f"{t.name}-ns.lua", self.key, [ns], False),
                         "mix": write_lua(self.tmp / f"{t.name}-mix.lua", self.key, mix, True)}
                # nginx: its master and n workers; the others: one process, or a
                # supervisor and n
                procs = 1 + n if kind == "nginx" or n > 1 else 1
                ts[str(n) if kind == "lrproxy" else f"{kind}-{n}"] = (t, n, procs)
        try:
            for rep in range(self.plan.reps):
                print(f"workers: repetition {rep + 1}/{self.plan.reps}", file=sys.stderr,
                      flush=True)
                for key, (t, n, procs) in ts.items():
                    with self.running(t):
                        assert t.pid
                        self.warm(t)
                        self.scenario_workers(t, key, n, procs, sim.pid)
        finally:
            self.procs.stop(sim)
            self.sim, self.sim_port = old_sim, old_port
        print(f"  workers: {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)

    def scenario_workers(self, t: Target, key: str, n: int, procs: int, sim_pid: int) -> None:
        assert t.pid
        before = tree_cpu_s(t.pid)
        r = run_wrk(t.url, t.lua["ns"], 64, self.plan.workers_s, t.pid, sim_pid=sim_pid,
                    cores=BOTH_CORES)
        after = tree_cpu_s(t.pid)
        if len(after) != procs or set(after) != set(before):
            raise SystemExit(f"{t.name}: expected {procs} processes throughout the run, "
                             f"had {sorted(before)} then {sorted(after)}")
        res = self.wresults[key]
        for k in ("rps", "p50_ms", "p99_ms", "cpu_us", "sim_us", "load_us", "busy", "others",
                  "errors"):
            res[k].append(r[k])
        res["procs"].append(len(after))
        if n > 1:  # how evenly the 64 connections were spread: busiest worker's share
            used = {p: after[p] - before[p] for p in after if p != t.pid}
            res["top_worker_pct"].append(100 * max(used.values()) / max(sum(used.values()),
                                                                        1e-9))
            res["supervisor_us"].append((after[t.pid] - before[t.pid]) * 1e6
                                        / max(r["requests"], 1))

    def soak(self, total: int, steps: int = 5) -> str:
        """VmRSS of each proxy every total/steps mixed requests, in one fresh process each."""
        self.start_sim()
        targets = [t for t in self.targets() if t.name != "direct" and not t.heavy]
        if self.args.litellm:
            print("--soak: the litellm column is skipped (100 times slower)", file=sys.stderr)
        lines = ["| requests | " + " | ".join(f"{t.name} RSS MiB" for t in targets) + " |"]
        lines.append("|" + "---|" * (len(lines[0].split("|")) - 2))
        rows: dict[int, list[str]] = {}
        for t in targets:
            with self.running(t):
                assert t.pid
                self.served = 0
                self.warm(t)
                for k in range(1, steps + 1):
                    goal = total * k // steps
                    if self.served < goal:
                        r = run_wrk(t.url, t.lua["mix"], 64, 3600, t.pid,
                                    limit=goal - self.served)
                        self.served += r["requests"]
                    rows.setdefault(goal, []).append(f"{rss_kib(t.pid) / 1024:.1f}")
                    print(f"  {t.name}: {self.served} requests", file=sys.stderr, flush=True)
        for mark in sorted(rows):
            lines.append(f"| {mark:,} | " + " | ".join(rows[mark]) + " |")
        return "\n".join(lines)

    # -- profile ----------------------------------------------------------------------

    def profile(self, seconds: float, kind: str) -> str:
        what = {"ns": "non-streaming", "st": f"{CHUNKS}-chunk streams",
                "sts": f"{CHUNKS}-chunk streams, chunks {SPACED_S * 1000:g} ms apart"}[kind]
        conns = SPACED_CONNS if kind == "sts" else 64
        self.start_sim()
        name = self.args.profile_target
        t = next(t for t in self.targets() if t.name == name)
        out = self.tmp / "profile"
        if self.args.profiler == "py-spy":
            with self.running(t):
                assert t.pid
                self.warm(t)
                spy = self.procs.start(
                    ["taskset", "-c", LOAD_CORE, "py-spy", "record", "-r", "250",
                     "-d", str(int(seconds)), "-f", "raw", "-o", str(out), "-p", str(t.pid)],
                    log=self.tmp / "py-spy.log")
                r = run_wrk(t.url, t.lua[kind], conns, seconds + 1, t.pid)
                spy.wait(timeout=60)
                self.procs.stop(spy)
            head = (f"py-spy, {seconds:g}s at 250 Hz of {name} under wrk -c{conns} "
                    f"{what}: {r['rps']:.0f} req/s, {r['cpu_us']:.0f} us CPU/req "
                    "(sampling slows it)\n")
            if self.args.profile_raw:
                shutil.copy(out, self.args.profile_raw)
            return head + summarize_collapsed(out.read_text())
        # cProfile fallback: the whole process, start-up included
        if name == "minimal":
            raise SystemExit("bench: --profile-target minimal needs py-spy")
        prof = self.tmp / "lrproxy.prof"
        log = self.tmp / "lrproxy-cprofile.log"
        cfg = self.lrproxy_config(t.port)
        env = {**os.environ, "LRPROXY_BENCH_UPSTREAM_KEY": self.key}
        p = self.procs.start(["taskset", "-c", PROXY_CORE, sys.executable, "-m", "cProfile", "-o",
                              str(prof), "-m", "lrproxy", "serve", "--config", str(cfg),
                              "--log-level", "warning",
                              *(["--no-access-log"] if name == "lrproxy-nolog" else [])],
                             log=log, env=env,
                             stdout=self.tmp / "cprofile.access.log")
        wait_port(t.port, p, log)
        t.proc = p
        self.warm(t)
        r = run_wrk(t.url, t.lua[kind], conns, seconds, t.pid)
        self.procs.stop(p)
        buf = io.StringIO()
        st = pstats.Stats(str(prof), stream=buf)
        st.strip_dirs().sort_stats("tottime").print_stats(30)
        st.sort_stats("cumtime").print_stats(r"relay|app|upstream|sse|eco|log|metrics", 30)
        return (f"cProfile of {name} under wrk -c{conns} {what}: {r['rps']:.0f} req/s\n"
                + buf.getvalue())


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _arun(coro: Any, uvloop: bool) -> Any:
    if uvloop:
        import uvloop as uv
        return uv.run(coro)
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------
# asyncio clients


async def stream_timings(url: str, key: str, data: bytes, n: int, conc: int
                         ) -> tuple[list[float], list[float]]:
    """Time to the first event, and gaps between the first CHUNKS+1 events, of n streams.

    `conc` streams at a time, started GAP_DELAY_S/conc apart.
    """
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    ttfc: list[float] = []
    gaps: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     auto_decompress=False) as s:

        async def one(keep: bool, delay: float = 0.0) -> None:
            await asyncio.sleep(delay)
            t0 = time.perf_counter()
            stamps: list[float] = []
            last = b""
            async with s.post(url, data=data, headers=headers) as r:
                if r.status != 200:
                    raise SystemExit(f"{url}: stream answered {r.status}")
                async for chunk in r.content.iter_any():
                    t = time.perf_counter()
                    stamps.extend([t] * (last + chunk).count(b"\n\n"))
                    last = chunk[-1:]
            if keep:
                ttfc.append(stamps[0] - t0)
                ev = stamps[:CHUNKS + 1]  # role chunk + content chunks: nothing held back
                gaps.extend(b - a for a, b in itertools.pairwise(ev))

        async with asyncio.timeout(120):
            await asyncio.gather(*(one(False) for _ in range(conc)))  # open the connections
            # staggered, so that the streams' chunks do not all arrive at the same instant
            for i in range(0, n, conc):
                await asyncio.gather(*(one(True, k * GAP_DELAY_S / conc)
                                       for k in range(min(conc, n - i))))
    return ttfc, gaps


async def hold_streams(port: int, key: str, data: bytes, n: int, pid: int) -> float:
    """Open n streams that stay open; KiB of proxy RSS per stream."""
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
           f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(data)}\r\n\r\n").encode() + data
    sem = asyncio.Semaphore(64)
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        async with sem:
            r, w = await asyncio.open_connection(HOST, port)
            writers.append(w)
            w.write(req)
            buf = b""
            while True:
                chunk = await r.read(65536)
                if not chunk:
                    raise SystemExit(f"port {port}: a slow stream closed early: {buf[:200]!r}")
                buf += chunk
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if sep and b"\n\n" in rest:
                    break
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"port {port}: slow stream answered {head[:60]!r}")

    before = rss_kib(pid)
    try:
        async with asyncio.timeout(120):
            await asyncio.gather(*(one() for _ in range(n)))
        await asyncio.sleep(0.5)
        after = rss_kib(pid)
    finally:
        for w in writers:
            w.close()
        await asyncio.sleep(1.0)  # let the proxy see the closes and cancel upstream
    return (after - before) / n


# ---------------------------------------------------------------------------------------
# profile summary


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def summarize_collapsed(text: str, top: int = 15) -> str:
    """Self and inclusive sample shares by function and by package from py-spy's raw output."""
    self_fn: collections.Counter[str] = collections.Counter()
    incl_fn: collections.Counter[str] = collections.Counter()
    pkg: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        names = []
        for fr in stack.split(";"):
            m = _FRAME.match(fr)
            if m is None:
                continue  # the "process ..."/"thread ..." frames
            names.append(f"{m['func']} ({_short(m['file'])})")
        if not names:
            continue
        self_fn[names[-1]] += c
        leaf_file = names[-1].rpartition("(")[2].rstrip(")")
        pkg[leaf_file.split("/")[0] if "/" in leaf_file else leaf_file] += c
        for nm in set(names):
            incl_fn[nm] += c
    lines = [f"{total} samples\n", "self time by package / top-level module:"]
    lines += [f"  {100 * c / total:5.1f}%  {k}" for k, c in pkg.most_common(12)]
    lines.append(f"\ntop {top} functions by self time:")
    lines += [f"  {100 * c / total:5.1f}%  {k}" for k, c in self_fn.most_common(top)]
    lines.append(f"\ntop {top} lrproxy functions by inclusive time:")
    lr = [(k, c) for k, c in incl_fn.most_common() if "(lrproxy/" in k][:top]
    lines += [f"  {100 * c / total:5.1f}%  {k}" for k, c in lr]
    lines.append(f"\ntop {top} other functions by inclusive time:")
    other = [(k, c) for k, c in incl_fn.most_common()
             if "(lrproxy/" not in k and "<module>" not in k and "run_forever" not in k
             and "run_until_complete" not in k and "_run_once" not in k][:top]
    lines += [f"  {100 * c / total:5.1f}%  {k}" for k, c in other]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# report


# (metric, label, comparison): "x" ratio to direct, "+" added to direct, "m" ratio to minimal
ROWS = [
    ("ns1_rps", "non-stream, 1 conn: req/s", "x"),
    ("ns1_p50", "non-stream, 1 conn: p50 ms", "+"),
    ("ns64_rps", "non-stream, 64 conns: req/s", "x"),
    ("ns64_p50", "non-stream, 64 conns: p50 ms", "+"),
    ("ns1_cpu", "non-stream, 1 conn: proxy CPU µs/req", "m"),
    ("ns64_cpu", "non-stream, 64 conns: proxy CPU µs/req", "m"),
    ("st1_rps", "stream 20 chunks, 1 conn: req/s", "x"),
    ("st1_p50", "stream 20 chunks, 1 conn: p50 ms", "+"),
    ("st64_rps", "stream 20 chunks, 64 conns: req/s", "x"),
    ("st64_p50", "stream 20 chunks, 64 conns: p50 ms", "+"),
    ("st1_cpu", "stream, 1 conn: proxy CPU µs/req", "m"),
    ("st64_cpu", "stream, 64 conns: proxy CPU µs/req", "m"),
    ("nsp_rps", f"non-stream, 64 conns paced ({PACE_MS['ns']} ms pauses): req/s", "x"),
    ("nsp_cpu", "non-stream, 64 conns paced: proxy CPU µs/req", "m"),
    ("stp_rps", f"stream, 64 conns paced ({PACE_MS['st']} ms pauses): req/s", "x"),
    ("stp_cpu", "stream, 64 conns paced: proxy CPU µs/req", "m"),
    ("sts_rps", f"stream, chunks {SPACED_S * 1000:g} ms apart, {SPACED_CONNS} conns: req/s", "x"),
    ("sts_cpu", f"stream, chunks {SPACED_S * 1000:g} ms apart: proxy CPU µs/req", "m"),
    ("ttfc_p50", "stream: time to first chunk p50 ms", "+"),
    ("gap_p50", "stream: gap between chunks p50 ms (20 ms sent)", "+"),
    ("gap_p99", "stream: gap between chunks p99 ms", "+"),
    ("slow_kib", "RSS per open slow stream KiB", ""),
    ("rss_first_mib", "RSS after the first mixed requests MiB", ""),
    ("rss_growth_kib", "RSS growth over the rest KiB", ""),
    ("served", "requests served by that process in all", ""),
    ("errors", "errors (socket + non-2xx), all wrk runs", "sum"),
    ("others0", "noise: other processes' use of core 0 during wrk runs %", ""),
    ("others1", "noise: other processes' use of core 1 during wrk runs %", ""),
]


def _fmt(v: float) -> str:
    if v != v:  # NaN
        return "–"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def medians(results: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for t, ms in results.items():
        out[t] = {m: (sum(v) if m == "errors" else statistics.median(v)) for m, v in ms.items()}
    return out


def table(med: dict[str, dict[str, float]], plan: Plan) -> str:
    names = list(med)
    hdr = "| metric (median of runs) | " + " | ".join(names) + " |"
    lines = [hdr, "|" + "---|" * (len(names) + 1)]
    direct, minimal = med.get("direct", {}), med.get("minimal", {})
    for key, label, cmp in ROWS:
        if all(med[n].get(key) is None for n in names):
            continue  # a scenario left out with --scenarios
        label = label.replace("the first mixed requests", f"{plan.mem_first} mixed requests")
        label = label.replace("the rest", f"{plan.mem_first}→≥{plan.mem_total} requests")
        cells = []
        for n in names:
            v = med[n].get(key)
            if v is None or v != v:
                cells.append("–")
                continue
            s = _fmt(v)
            if cmp == "x" and n != "direct" and direct.get(key):
                s += f" (×{v / direct[key]:.2f})"
            elif cmp == "+" and n != "direct" and key in direct:
                s += f" ({v - direct[key]:+.2f})"
            elif cmp == "m" and n != "minimal" and minimal.get(key):
                s += f" (×{v / minimal[key]:.2f})"
            cells.append(s)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(med: dict[str, dict[str, float]], plan: Plan) -> str:
    """The issue's targets, checked on this run's medians (ratios within the same run)."""
    d, m = med.get("direct", {}), med.get("minimal", {})
    nan = float("nan")

    def ratio(a: float | None, b: float | None) -> float:
        return a / b if a is not None and b else nan

    def diff(a: float | None, b: float | None) -> float:
        return a - b if a is not None and b is not None else nan

    out = []
    for name in ("lrproxy", "lrproxy-nolog"):
        lr = med.get(name)
        if not lr:
            continue
        checks = [
            ("non-stream CPU/req ≤ 1.3 × minimal (64 conns)",
             ratio(lr.get("ns64_cpu"), m.get("ns64_cpu")), 1.3, "×{:.2f}"),
            ("stream CPU/req ≤ 1.3 × minimal (64 conns)",
             ratio(lr.get("st64_cpu"), m.get("st64_cpu")), 1.3, "×{:.2f}"),
            ("non-stream CPU/req ≤ 1.3 × minimal (64 conns, paced)",
             ratio(lr.get("nsp_cpu"), m.get("nsp_cpu")), 1.3, "×{:.2f}"),
            ("stream CPU/req ≤ 1.3 × minimal (64 conns, paced)",
             ratio(lr.get("stp_cpu"), m.get("stp_cpu")), 1.3, "×{:.2f}"),
            ("stream CPU/req ≤ 1.3 × minimal (chunks apart)",
             ratio(lr.get("sts_cpu"), m.get("sts_cpu")), 1.3, "×{:.2f}"),
            ("added p50 latency at 1 conn ≤ 0.5 ms",
             diff(lr.get("ns1_p50"), d.get("ns1_p50")), 0.5, "{:+.2f} ms"),
            ("no added gap between chunks beyond the minimal relay's (p50, ≤ +0.25 ms)",
             diff(lr.get("gap_p50"), m.get("gap_p50")), 0.25, "{:+.2f} ms"),
            ("≤ 32 KiB per open slow stream", lr.get("slow_kib", nan), 32, "{:.1f} KiB"),
            (f"memory flat {plan.mem_first}→≥{plan.mem_total} requests (growth ≤ 1 MiB)",
             lr.get("rss_growth_kib", nan), 1024, "{:+.0f} KiB"),
        ]
        out.append(f"{name}:")
        for label, v, limit, f in checks:
            if v == v:
                out.append(f"  {'PASS' if v <= limit else 'FAIL'}  {label}: {f.format(v)}")
    return "\n".join(out)


WORKER_ROWS = [
    ("rps", "non-stream, 64 conns: req/s", True),
    ("p50_ms", "non-stream, 64 conns: p50 ms", True),
    ("p99_ms", "non-stream, 64 conns: p99 ms", True),
    ("cpu_us", "lrproxy CPU µs/req (supervisor + workers)", True),
    ("supervisor_us", "of which the supervisor µs/req", False),
    ("top_worker_pct", "busiest worker's share of the workers' CPU %", False),
    ("sim_us", "upstream CPU µs/req", True),
    ("load_us", "wrk + this script CPU µs/req", True),
    ("busy", "both cores busy % (of 200)", False),
    ("others", "noise: other processes' use of both cores % (of 200)", False),
    ("errors", "errors (socket + non-2xx), all runs", False),
]


def workers_report(wres: dict[str, dict[str, list[float]]], plan: Plan) -> str:
    """The workers scenario's table of medians, the per-repetition req/s and a CPU ceiling."""
    one, two = wres.get("1", {}), wres.get("2", {})

    def med(r: dict[str, list[float]], k: str) -> float | None:
        v = r.get(k)
        if not v:
            return None
        return sum(v) if k == "errors" else statistics.median(v)

    lines = ["| metric (median of runs) | workers = 1 | workers = 2 | 2w / 1w |",
             "|---|---|---|---|"]
    for key, label, ratio in WORKER_ROWS:
        a, b = med(one, key), med(two, key)
        if a is None and b is None:
            continue
        r = f"×{b / a:.2f}" if ratio and a and b is not None else ""
        f = (lambda v: f"{v:.0f}") if key == "errors" else _fmt
        lines.append(f"| {label} | {'–' if a is None else f(a)} | "
                     f"{'–' if b is None else f(b)} | {r} |")
    a_rps, b_rps = one.get("rps", []), two.get("rps", [])
    lines.append("")
    lines.append("req/s per repetition: workers = 1: " + ", ".join(f"{v:,.0f}" for v in a_rps)
                 + "; workers = 2: " + ", ".join(f"{v:,.0f}" for v in b_rps)
                 + "; 2w/1w: " + ", ".join(f"×{b / a:.2f}" for a, b in zip(a_rps, b_rps,
                                                                            strict=False)))
    per = [med(two, k) for k in ("cpu_us", "sim_us", "load_us")]
    if all(v for v in per) and med(one, "rps"):
        ceiling = 2e6 / sum(v for v in per if v)
        lines.append(f"CPU ceiling with workers = 2: 2 cores / ({' + '.join(_fmt(v or 0) for v in per)}"
                     f" µs per request, lrproxy + upstream + load) = {ceiling:,.0f} req/s, "
                     f"×{ceiling / (med(one, 'rps') or 1):.2f} the workers = 1 req/s.")
    refs = sorted({k.rsplit("-", 1)[0] for k in wres if "-" in k})
    if refs:
        lines += ["", "The same with 1 and 2 processes of each proxy, in the same run "
                  "(medians; the ceiling as above, from each one's own CPU per request):", "",
                  "| proxy | req/s, 1 | req/s, 2 | 2 / 1 | proxy CPU µs/req, 1 | 2 | "
                  "upstream + load µs/req, 2 | ceiling 2 / 1 | errors |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, a, b in [("lrproxy", one, two)] + [
                (r, wres.get(f"{r}-1", {}), wres.get(f"{r}-2", {})) for r in refs]:
            ra, rb = med(a, "rps"), med(b, "rps")
            ca, cb = med(a, "cpu_us"), med(b, "cpu_us")
            ul = (med(b, "sim_us") or 0) + (med(b, "load_us") or 0)
            if not (ra and rb and ca and cb):
                continue
            lines.append(f"| {name} | {ra:,.0f} | {rb:,.0f} | ×{rb / ra:.2f} | {_fmt(ca)} | "
                         f"{_fmt(cb)} | {_fmt(ul)} | ×{2e6 / (cb + ul) / ra:.2f} | "
                         f"{(med(a, 'errors') or 0) + (med(b, 'errors') or 0):.0f} |")
    return "\n".join(lines)


def litellm_version(path: str) -> str:
    """The version of the LiteLLM a `litellm` command runs, read by its interpreter
    (`litellm --version` imports the proxy: ~15 s)."""
    with contextlib.suppress(OSError, IndexError, subprocess.SubprocessError):
        with open(path, "rb") as f:
            first = f.readline().decode(errors="replace")
        if first.startswith("#!"):
            py = first[2:].split()[0]
            out = subprocess.run([py, "-c", "import importlib.metadata as m; "
                                  "print(m.version('litellm'))"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
            if out:
                return out
    return "?"


def machine(uvloop: bool, litellm: str | None = None) -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    parts = [f"nproc {os.cpu_count()}", f"CPU {cpu}", f"Linux {platform.release()}",
             f"Python {platform.python_version()}", f"aiohttp {aiohttp.__version__}"]
    with contextlib.suppress(ImportError):
        import uvloop as uv
        parts.append(f"uvloop {uv.__version__}" + ("" if uvloop else " (not used: --loop asyncio)"))
    if not uvloop:
        parts.append("event loop: asyncio")
    if shutil.which("nginx"):
        v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
        parts.append(v.replace("nginx version: ", ""))
    if litellm:
        parts.append(f"LiteLLM {litellm_version(litellm)}")
    v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    parts.append(" ".join(v.split()[:2]))
    rev = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    if rev:
        parts.append(f"lrproxy at {rev}")
    return ", ".join(parts)


def parser() -> argparse.ArgumentParser:
    """run.py's options (bench/ab.py and bench/instr.py take their defaults from it)."""
    ap = argparse.ArgumentParser(description="lrproxy benchmark (see the module docstring)")
    ap.add_argument("--quick", action="store_true", help="shorter runs (~3 minutes)")
    ap.add_argument("--reps", type=int, help="repetitions of each scenario (default 3)")
    ap.add_argument("--loop", choices=("auto", "asyncio"), default="auto",
                    help="auto: proxies use uvloop when installed (as `lrproxy serve` does)")
    ap.add_argument("--only", help="comma-separated targets besides direct and minimal")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma-separated subset of wrk,gaps,slow,memory,workers "
                         "(default: all)")
    ap.add_argument("--workers-upstream", choices=("nginx", "sim"),
                    help="the workers scenario's upstream: nginx answering the sim's "
                         "canned answers (default when installed), or the sim itself")
    ap.add_argument("--workers-refs", default="minimal,nginx", metavar="NAMES",
                    help="the workers scenario's references, also run with 1 and 2 "
                         "processes: comma-separated subset of minimal,nginx (nginx when "
                         "installed), '' for none (default: both)")
    ap.add_argument("--prompt-kib", type=int, default=0, metavar="N",
                    help="add N KiB of earlier conversation turns to every request (default 0)")
    ap.add_argument("--wait-quiet", type=float, metavar="SECONDS", default=0,
                    help="first wait up to SECONDS for both cores to be under 15%% busy")
    ap.add_argument("--litellm", metavar="PATH",
                    help="also measure LiteLLM's proxy: PATH is its `litellm` command (from "
                         "`pip install 'litellm[proxy]'` in a venv of its own); skipped "
                         "when not given")
    ap.add_argument("--json", help="write every repetition's figures to this file")
    ap.add_argument("--soak", type=int, metavar="N",
                    help="instead: VmRSS of each proxy every N/5 of N mixed requests (64 conns)")
    ap.add_argument("--profile", nargs="?", const=10.0, type=float, metavar="SECONDS",
                    help="profile lrproxy under 64-connection non-streaming load instead")
    ap.add_argument("--profiler", choices=("py-spy", "cprofile"),
                    default="py-spy" if shutil.which("py-spy") else "cprofile",
                    help="with --profile: py-spy when installed, else cProfile")
    ap.add_argument("--profile-streams", action="store_true",
                    help="with --profile: under 20-chunk streams instead")
    ap.add_argument("--profile-spaced", action="store_true",
                    help=f"with --profile: under streams whose chunks come {SPACED_S * 1000:g} ms apart")
    ap.add_argument("--profile-target", default="lrproxy",
                    choices=("lrproxy", "lrproxy-nolog", "minimal"),
                    help="with --profile: the process to profile (py-spy only for minimal)")
    ap.add_argument("--profile-raw", metavar="FILE",
                    help="with --profile: keep py-spy's collapsed stacks in FILE")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        ap.error(f"--scenarios: unknown {','.join(sorted(unknown))} (known: {','.join(SCENARIOS)})")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed", file=sys.stderr)
            return 2
    if (os.cpu_count() or 1) < 2:
        print("bench: needs 2 cores (proxy on core 0, load on core 1)", file=sys.stderr)
        return 2
    if args.litellm:
        args.litellm = shutil.which(args.litellm) or args.litellm
        if not (os.path.isfile(args.litellm) and os.access(args.litellm, os.X_OK)):
            print(f"bench: --litellm {args.litellm}: no such executable", file=sys.stderr)
            return 2
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan.reps = args.reps
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * plan.slow_streams + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.wait_quiet:
        worst = wait_quiet(args.wait_quiet)
        print(f"starting with the busiest core {worst:.0f}% busy", file=sys.stderr)
    bench = Bench(args, plan)
    t0 = time.monotonic()
    try:
        if args.profile:
            print(bench.profile(args.profile, "sts" if args.profile_spaced
                                else "st" if args.profile_streams else "ns"))
            return 0
        if args.soak:
            print(bench.soak(args.soak))
            return 0
        bench.run()
    finally:
        bench.procs.stop_all()
        shutil.rmtree(bench.tmp, ignore_errors=True)
    med = medians(bench.results)
    cmd = "python bench/run.py" + ("" if argv is None and len(sys.argv) == 1
                                   else " " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"\n`{cmd}` — {plan.reps} repetitions, {time.monotonic() - t0:.0f}s; "
          f"{machine(bench.uvloop, args.litellm)}")
    if med:
        print(f"wrk -t1 runs of {plan.wrk_s:g}s; streams of {CHUNKS} chunks (+ finish, usage, "
              f"[DONE]); gaps over {plan.gap_streams} streams, {GAP_DELAY_S * 1000:g} ms "
              f"apart; {plan.slow_streams} slow streams. (×r) = ratio to direct (req/s) or to "
              "minimal (CPU); (+d) = ms added to direct.\n")
        print(table(med, plan))
        if "litellm" in med:
            lp = bench.plan_for(Target("litellm", SIM_MODEL, lambda: None, heavy=True))
            print(f"\nlitellm: at most {LITELLM_CONNS} connections where a row says 64 or "
                  f"{SPACED_CONNS}, wrk runs of {lp.wrk_s:g}s, {lp.warmup} warm-up requests, "
                  f"memory after {lp.mem_first} and ≥{lp.mem_total} requests, "
                  f"{lp.slow_streams} slow streams (it takes ~100× the CPU per request).")
        print()
        print(verdicts(med, plan))
    if bench.wresults:
        print(f"\nWorkers: lrproxy --no-access-log with server.workers = 1 and = 2, each a "
              f"fresh process tree per repetition, `taskset -c {BOTH_CORES}`; wrk -t1 -c64 "
              f"runs of {plan.workers_s:g}s of non-streaming requests. The upstream "
              + ("(nginx with the sim's answers canned)"
                 if bench.workers_upstream == "nginx" else "(the sim)")
              + ", wrk and this script share the same 2 cores, so 2w/1w is a lower bound "
              "on how lrproxy scales.\n")
        print(workers_report(bench.wresults, plan))
    if args.json:
        Path(args.json).write_text(json.dumps({"plan": plan.__dict__, "results": bench.results,
                                               "workers": bench.wresults}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
