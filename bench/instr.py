"""Instructions per request: lrproxy against the minimal relay, counted, not timed.

CPU time per request swings 5-10 % between processes and runs on this VM, which hides
any change under that size (bench/RESULTS.md). Instructions executed do not swing: this
runs each proxy under valgrind's callgrind (about 50 times slower), sends it requests
one at a time on one kept-alive connection (or, with `--conns N`, one on each of N
connections at once, round after round, as a loaded proxy gets them), and counts the instructions the proxy's
process executes per request, everything included: the event loop, aiohttp, the
interpreter, the C libraries and the kernel's share excluded (system calls are counted
as one instruction each). Cache misses and branch mispredictions are not counted, so
this measures how much work a request is, not how long it takes; a request runs ~3-4
times slower from cold caches than hot, which only the timed benchmarks show.

    python bench/instr.py                      # minimal, lrproxy, lrproxy-nolog; ~4 min
    python bench/instr.py --requests 300 HEAD~1 .   # two revisions of lrproxy
    python bench/instr.py --kinds ns --reps 3
    python bench/instr.py --kinds ns --conns 64 --requests 320 --warmup 256

Per kind (ns: non-streaming; st: 20-chunk streams sent at once; sts: 20 chunks
`--sts-ms` apart) and target: `--warmup` requests, then `--reps` counts of `--requests`
requests each (a quarter of both for sts, whose requests take 20 x `--sts-ms`).
Non-streaming counts agree within 0.5 % from process to process; stream counts within
~2 %, as the upstream's events fall into reads by timing. Chunks apart are 25 ms apart
here, not the timed benchmarks' 5 ms: a proxy under callgrind takes a few ms per read,
so chunks 5 ms apart fell into its reads by chance, and counts moved up to 15 %. Needs valgrind
(`apt-get install valgrind`); loopback only; every process started here is stopped.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as B  # bench/run.py, beside this file

KINDS = ("ns", "st", "sts")
_SUMMARY = re.compile(rb"^summary:\s*(\d+)", re.M)


class Counted:
    """One proxy process under callgrind: zero its counts, dump them, read the dump."""

    def __init__(self, t: B.Target, out: Path, conns: int = 1) -> None:
        self.t, self.out = t, out
        self.conns = [http.client.HTTPConnection(B.HOST, t.port, timeout=120)
                      for _ in range(conns)]

    def request(self, data: bytes, key: str, conns: int = 1) -> None:
        """One request on each of the first `conns` connections, all sent before any
        answer is read: the proxy has them all at once, as under wrk's load."""
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        for conn in self.conns[:conns]:
            conn.request("POST", "/v1/chat/completions", data, headers)
        for conn in self.conns[:conns]:
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise SystemExit(f"{self.t.name}: {r.status} {body[:300]!r}")

    def control(self, what: str, wake: bytes, key: str) -> None:
        """`callgrind_control -z/-d`: valgrind takes the command only while the process
        runs, so requests wake it until it does (one or two, against --requests)."""
        assert self.t.pid is not None
        ctl = subprocess.Popen(["callgrind_control", what, str(self.t.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 60
        while ctl.poll() is None:
            if time.monotonic() > end:
                ctl.kill()
                raise SystemExit(f"{self.t.name}: callgrind_control {what} got no answer")
            self.request(wake, key)
            time.sleep(0.1)

    def count(self, data: bytes, n: int, key: str) -> float:
        """Instructions per request over `n` requests (rounded up to whole rounds of
        one request per connection)."""
        before = set(self.out.parent.glob(self.out.name + ".*"))
        rounds = -(-n // len(self.conns))
        n = rounds * len(self.conns)
        self.control("-z", data, key)
        for _ in range(rounds):
            self.request(data, key, len(self.conns))
        self.control("-d", data, key)
        new = sorted(set(self.out.parent.glob(self.out.name + ".*")) - before,
                     key=lambda p: int(p.suffix[1:]))
        m = _SUMMARY.search(new[-1].read_bytes())
        assert m is not None, new[-1]
        return int(m[1]) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revs", nargs="*", metavar="REV",
                    help="lrproxy revisions (git worktrees); default: the working tree, "
                         "with and without its access log")
    ap.add_argument("--requests", type=int, default=300, help="requests per count (300)")
    ap.add_argument("--warmup", type=int, default=200, help="requests before counting (200)")
    ap.add_argument("--reps", type=int, default=2, help="counts per kind and target (2)")
    ap.add_argument("--kinds", default="ns,st", help=f"of {','.join(KINDS)} (ns,st)")
    ap.add_argument("--conns", type=int, default=1,
                    help="connections, each with a request in flight at once (1)")
    ap.add_argument("--sts-ms", type=float, default=25.0,
                    help="ms between the chunks of sts streams (25)")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(KINDS):
        ap.error(f"--kinds: unknown {','.join(sorted(unknown))}")
    if not shutil.which("valgrind"):
        raise SystemExit("bench/instr.py needs valgrind (apt-get install valgrind)")
    bench = B.Bench(B.parser().parse_args(["--scenarios", "wrk", "--only", "lrproxy"]), B.FULL)
    bench.start_timeout = 180.0
    made: list[Path] = []
    results: dict[str, dict[str, list[float]]] = {}
    try:
        bench.start_sim()
        os.sched_setaffinity(0, {int(B.LOAD_CORE)})  # this client beside the sim
        plan: list[tuple[str, B.Target]] = []
        minimal = B.Target("minimal", B.SIM_MODEL, lambda: None, port=B.free_port())
        minimal.start = lambda: bench.start_minimal(minimal)
        plan.append(("minimal", minimal))
        for rev in args.revs or ["."]:
            root = B.worktree(rev, made)
            logs = (True,) if args.revs else (True, False)
            for log_on in logs:
                name = rev if args.revs else ("lrproxy" if log_on else "lrproxy-nolog")
                t = B.Target(name, B.MODEL_ID, lambda: None, port=B.free_port())
                t.start = (lambda t=t, log_on=log_on, root=root:
                           bench.start_lrproxy(t, access_log=log_on, root=root))
                plan.append((name, t))
        for name, t in plan:
            out = bench.tmp / f"callgrind-{t.port}"
            bench.wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"]
            print(f"{name}: starting under callgrind", file=sys.stderr, flush=True)
            t.proc = t.start()
            try:
                c = Counted(t, out.with_name(f"{out.name}.{t.proc.pid}"), args.conns)
                results[name] = {}
                for kind in kinds:
                    data = _body(t.model, kind, args.sts_ms / 1000)
                    share = 4 if kind == "sts" else 1
                    for _ in range(max(1, args.warmup // share // args.conns)):
                        c.request(data, bench.key, args.conns)
                    results[name][kind] = [c.count(data, max(1, args.requests // share),
                                                   bench.key)
                                           for _ in range(args.reps)]
                    print(f"  {kind}: " + ", ".join(f"{v:,.0f}" for v in results[name][kind]),
                          file=sys.stderr, flush=True)
            finally:
                bench.procs.stop(t.proc)
                t.proc = None
        print(report(results, kinds, args))
    finally:
        bench.procs.stop_all()
        B.remove_worktrees(made)
    return 0


def _body(model: str, kind: str, spacing_s: float) -> bytes:
    sim: dict[str, object] = {"chunks": B.CHUNKS}
    if kind == "sts":
        sim["chunk_delay_s"] = spacing_s
    return B.body(model, stream=kind != "ns", sim=sim)


def _conns(n: int) -> str:
    return "one connection" if n == 1 else f"{n} connections, a request on each at once"


def report(results: dict[str, dict[str, list[float]]], kinds: list[str],
           args: argparse.Namespace) -> str:
    names = list(results)
    lines = [f"Instructions per request (callgrind; {args.reps} counts of {args.requests} "
             f"requests after {args.warmup}, {_conns(args.conns)}; median, ×minimal)", "",
             "| kind | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    label = {"ns": "non-stream", "st": "stream, 20 chunks at once",
             "sts": f"stream, chunks {args.sts_ms:g} ms apart"}
    for kind in kinds:
        base = statistics.median(results["minimal"][kind])
        cells = []
        for n in names:
            v = statistics.median(results[n][kind])
            cells.append(f"{v / 1000:,.0f} k" + ("" if n == "minimal" else f" (×{v / base:.2f})"))
        lines.append(f"| {label[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
