"""Compare lrproxy revisions side by side: several processes of each, one minimal relay.

A process keeps its own speed for its whole life here: three processes of the same build
differ by 5-10 % in CPU per request (memory layout, hash seeds), so a comparison of one
process against one other measures that as much as the change. This starts `--processes`
lrproxy processes of each revision at once (`--no-access-log` unless `--access-log`; all
on core 0, like bench/run.py's), alternates short wrk runs over them and the minimal
relay, and prints each process's median CPU per request and each revision's median over
its processes.

    python bench/ab.py HEAD~3 .            # a revision against the working tree
    python bench/ab.py --kinds ns,st,sts --paced --processes 3 main my-branch
    python bench/ab.py --conns 1 --access-log HEAD~1 .   # one connection: CPU and p50

REV is anything `git worktree add` takes, or `.` for the working tree as it is. Kinds:
ns (non-streaming), st (20-chunk streams sent at once), sts (20 chunks 5 ms apart, on
32 connections). `--paced` puts wrk's pauses of bench/run.py between requests (ns, st).
Loopback only; every process and worktree made here is removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as B  # bench/run.py, beside this file

KINDS = ("ns", "st", "sts")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revs", nargs="+", metavar="REV")
    ap.add_argument("--processes", type=int, default=3, help="lrproxy processes per revision (3)")
    ap.add_argument("--reps", type=int, default=5, help="wrk runs per process and kind (5)")
    ap.add_argument("--secs", type=float, default=3.0, help="seconds per wrk run (3)")
    ap.add_argument("--kinds", default="ns,st", help=f"of {','.join(KINDS)} (ns,st)")
    ap.add_argument("--paced", action="store_true", help="pauses between requests (ns, st)")
    ap.add_argument("--conns", type=int, default=64,
                    help="connections of the ns and st runs (64; 1: one connection's cost)")
    ap.add_argument("--access-log", action="store_true",
                    help="run lrproxy with its access log on (to a file), as by default")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(KINDS):
        ap.error(f"--kinds: unknown {','.join(sorted(unknown))}")
    bench = B.Bench(B.parser().parse_args(["--scenarios", "wrk", "--only", "lrproxy-nolog"]), B.FULL)
    made: list[Path] = []
    try:
        roots = {rev: B.worktree(rev, made) for rev in args.revs}
        bench.start_sim()
        minimal = next(t for t in bench.targets() if t.name == "minimal")
        minimal.proc = bench.start_minimal(minimal)
        targets = [minimal]
        for rev, root in roots.items():
            for i in range(args.processes):
                t = B.Target(f"{rev}#{i + 1}", B.MODEL_ID, lambda: None, port=B.free_port())
                t.lua = _luas(bench, t)
                t.proc = bench.start_lrproxy(t, access_log=args.access_log, root=root)
                targets.append(t)
        minimal.lua = _luas(bench, minimal)
        for t in targets:
            bench.check(t)
            B.run_wrk(t.url, t.lua["mix"], 8, 60, None, limit=300)
        cpu: dict[tuple[str, str], list[float]] = {(t.name, k): [] for t in targets for k in kinds}
        p50: dict[tuple[str, str], list[float]] = {(t.name, k): [] for t in targets for k in kinds}
        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
            for k in kinds:
                for t in targets:
                    conns = B.SPACED_CONNS if k == "sts" else args.conns
                    pause = B.PACE_MS[k] if args.paced and k in B.PACE_MS else 0
                    r = B.run_wrk(t.url, t.lua[k], conns, args.secs, t.pid, pause_ms=pause)
                    cpu[(t.name, k)].append(r["cpu_us"])
                    p50[(t.name, k)].append(r["p50_ms"])
        for k in kinds:
            base = statistics.median(cpu[("minimal", k)])
            conns = B.SPACED_CONNS if k == "sts" else args.conns
            print(f"\n{k}{' paced' if args.paced and k in B.PACE_MS else ''}, {conns} conns: "
                  f"minimal {base:,.0f} µs per request, "
                  f"p50 {statistics.median(p50[('minimal', k)]):.3f} ms")
            for rev in roots:
                names = [f"{rev}#{i + 1}" for i in range(args.processes)]
                per = [statistics.median(cpu[(n, k)]) for n in names]
                mid = statistics.median(per)
                lat = statistics.median(statistics.median(p50[(n, k)]) for n in names)
                print(f"  {rev}: {mid:,.0f} µs (×{mid / base:.2f}), p50 {lat:.3f} ms; "
                      "processes: " + ", ".join(f"{v:,.0f}" for v in per))
    finally:
        bench.procs.stop_all()
        B.remove_worktrees(made)
    return 0


def _luas(bench: B.Bench, t: B.Target) -> dict[str, Path]:
    """bench/run.py's wrk scripts for this target's model, written for it."""
    ns = B.body(t.model, stream=False, sim={"chunks": B.CHUNKS})
    st = B.body(t.model, stream=True, sim={"chunks": B.CHUNKS})
    sts = B.body(t.model, stream=True, sim={"chunks": B.CHUNKS, "chunk_delay_s": B.SPACED_S})
    name = t.name.replace("/", "_").replace("#", "-")
    return {
        "ns": B.write_lua(bench.tmp / f"ab-{name}-ns.lua", bench.key, [ns], False),
        "st": B.write_lua(bench.tmp / f"ab-{name}-st.lua", bench.key, [st], False),
        "sts": B.write_lua(bench.tmp / f"ab-{name}-sts.lua", bench.key, [sts], False),
        "mix": B.write_lua(bench.tmp / f"ab-{name}-mix.lua", bench.key, [ns, st], True),
    }


if __name__ == "__main__":
    sys.exit(main())
