"""Command line (SPEC §6): serve, check-config, hash-key, --version."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import hashlib
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from lrproxy import HUP_EARLY, TERM_EARLY, WORKER_FDS_ENV, __version__
from lrproxy.app import RUNTIME, Runtime, make_app
from lrproxy.config import (
    AUTO_MODEL,
    Config,
    ConfigError,
    Listen,
    Secrets,
    hash_key,
    keep,
    kept_until_restart,
    listens_clash,
    parse_config,
    parse_listen,
    read_config,
    resolve_secrets,
)
from lrproxy.feeds import poll_feeds
from lrproxy.log import (
    ACCESS_FLUSH_MS,
    MAIN,
    close_access,
    setup_logging,
    to_journal,
    with_priority,
)
from lrproxy.metrics import add_process_metrics, serve_metrics
from lrproxy.protocol import Runner, api_urls, named
from lrproxy.routing import RoutingTable, build_table, unserved
from lrproxy.sdnotify import Notifier, activated_sockets, ignore_hangups, ignore_user_signals
from lrproxy.workers import (
    CONFIG_SHOWN_ENV,
    KEPT_ENV,
    LISTEN_BACKLOG,
    WORKER_INDEX_ENV,
    die_with_supervisor,
    speaks_for_all,
    stop_queueing,
    supervise,
    worker_sockets,
)

EX_CONFIG: Final = 78  # sysexits.h; systemd's RestartPreventExitStatus= understands it
EX_USAGE: Final = 64
EX_IOERR: Final = 74
GC_THRESHOLDS: Final = (20_000, 20, 100)  # see _tune_gc
log = logging.getLogger(MAIN)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrproxy",
        description="LowRouter proxy: an OpenAI-compatible LLM gateway with region pinning "
        "and carbon accounting.",
    )
    p.add_argument("--version", action="version", version=f"lrproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the proxy",
                       description="Run the proxy with a config file, or with --demo in "
                       "front of built-in simulated upstreams (no provider keys needed).")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="FILE", help="config file (.toml or .ini)")
    src.add_argument("--demo", action="store_true",
                     help="start simulated upstreams in two regions on loopback and print "
                     "LOWROUTER_BASE_URL and LOWROUTER_API_KEY")
    s.add_argument("--listen", metavar="HOST:PORT", help="override server.listen")
    s.add_argument("--metrics-listen", metavar="HOST:PORT", help="override server.metrics_listen")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="level of the proxy's own log on stderr (default: info)")
    s.add_argument("--log-format", default="json", choices=("json", "plain"),
                   help="stderr log format; 'plain' reads best in the journal (default: json)")
    s.add_argument("--no-access-log", action="store_true",
                   help="do not write the per-request JSON line on stdout")
    s.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"),
                   help="event loop: uvloop (installed with lrproxy on CPython, not on "
                   "Windows; 10-25%% less CPU per request), asyncio's own, or auto: uvloop "
                   "when it can be imported (default: auto)")
    s.add_argument("--access-log-flush-ms", type=_non_negative_int, default=ACCESS_FLUSH_MS,
                   metavar="MS",
                   help="gather access lines for up to MS ms and write them together "
                   "(0: at the end of each event-loop turn); they are written at exit too, "
                   "a SIGKILL loses at most MS ms of them (default: %(default)s)")

    c = sub.add_parser("check-config", help="validate a config file and exit",
                       description="Validate a config file: print every problem, one line "
                       "each, and exit 78; exit 0 when it is valid. Environment variables "
                       "holding keys, and key files relative to $CREDENTIALS_DIRECTORY "
                       "while it is unset, are not checked (they exist only under the "
                       "service).")
    c.add_argument("file", metavar="FILE")

    sub.add_parser("hash-key", help="print the SHA-256 of a key read on stdin",
                   description="Read a client key on stdin (its first line; a UTF-8 BOM "
                   "and spaces around it left out; at a terminal, without showing it) "
                   "and print its SHA-256 hex, for "
                   "auth.keys[].sha256. Exit 64 when there is no key to read, 74 when the "
                   "hash cannot be written.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    _std_fds_open()
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "hash-key":
        return _hash_key()
    setup_logging(args.log_level, args.log_format, access=not args.no_access_log,
                  access_flush_ms=args.access_log_flush_ms)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 0
    finally:
        close_access()


def _std_fds_open() -> None:
    """Started with stdin, stdout or stderr closed (`>&-`), the next socket would take
    its number, and uvloop aborts when it closes a descriptor under 3; so, as daemons
    do, each closed one becomes /dev/null."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # (those below it are open: the lowest free number is `fd`)
            os.open(os.devnull, os.O_RDWR)


def _hash_key() -> int:
    """`lrproxy hash-key`: the SHA-256 of the key on stdin's first line, as the proxy
    hashes an Authorization header's key (its UTF-8 bytes; a BOM, which an editor may
    put before it and no header carries, is not part of it)."""
    try:
        if sys.stdin is not None and sys.stdin.isatty():  # typed: not shown, as passwd does
            line = getpass.getpass("Key (not shown): ").encode()
        else:
            line = sys.stdin.buffer.readline() if sys.stdin is not None else b""
    except EOFError:  # (Ctrl-D at the prompt)
        line = b""
    except UnicodeError:  # typed: getpass decodes it (strictly, or with surrogates
        # that .encode() refuses: stdin's own, in the C locale), as a piped one is below
        print("lrproxy hash-key: the key on stdin is not UTF-8 text", file=sys.stderr)
        return EX_USAGE
    except OSError as e:  # (a stdin open for writing only, say)
        print(f"lrproxy hash-key: cannot read stdin: {e.strerror or e}", file=sys.stderr)
        return EX_USAGE
    try:
        key = line.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        print("lrproxy hash-key: the key on stdin is not UTF-8 text", file=sys.stderr)
        return EX_USAGE
    if not key:
        print("lrproxy hash-key: no key on stdin", file=sys.stderr)
        return EX_USAGE
    try:
        sys.stdout.write(hashlib.sha256(key.encode()).hexdigest() + "\n")
        sys.stdout.flush()
    except OSError as e:  # a full disk, a closed pipe: said once, not at exit again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"lrproxy hash-key: cannot write the hash: {e.strerror or e}", file=sys.stderr)
        return EX_IOERR
    return 0


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _check_config(path: str) -> int:
    try:
        config = read_config(path)
        resolve_secrets(config, os.environ, check_env=False)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return EX_CONFIG
    print(f"{path}: ok ({len(config.upstreams)} upstreams, {len(config.models)} models, "
          f"{len(config.regions)} regions)")
    for line in _unserved(config, build_table(config, {})):  # as serve says them
        print(f"{path}: warning: {line}", file=sys.stderr)
    return 0


def _load(path: str) -> tuple[Config, Secrets]:
    config = read_config(path)
    return config, resolve_secrets(config, os.environ)


def _run(args: argparse.Namespace) -> int:
    uvloop: Any = None
    if args.loop != "asyncio":
        try:
            uvloop = __import__("uvloop")
        except ImportError:
            if args.loop == "uvloop":
                print("lrproxy serve: --loop uvloop: uvloop is not installed "
                      "(pip install uvloop)", file=sys.stderr)
                return EX_USAGE
    runner = uvloop.run if uvloop is not None else asyncio.run
    try:
        return int(runner(_serve(args)))
    except ConfigError as e:
        journal = to_journal(sys.stderr)
        for line in e.problems:
            print(with_priority(line, logging.ERROR) if journal else line, file=sys.stderr)
        return EX_CONFIG
    finally:  # the loop, closed, has put SIGHUP back to its default (sdnotify.ignore_hangups)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def connection_cap(config: Config, worker: bool = False) -> int:
    """server.max_connections, or for 0 what the open-files limit allows: each client
    connection may hold an upstream one too, and 256 are left for the rest. The soft
    limit is first raised to the hard one (as nginx's worker_rlimit_nofile does); a
    configured cap over what it allows is kept, with a warning (past the limit, accept()
    and upstream connects fail with EMFILE)."""
    cap = config.server.max_connections
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ImportError, ValueError, OSError):
        return cap or 1 << 62
    if soft == resource.RLIM_INFINITY:
        return cap or 1 << 62
    allowed = max(16, (soft - 256) // 2)
    if not cap:
        return allowed
    if cap > allowed and not worker:
        log.warning("server.max_connections = %d is over what the open-files limit (%d) "
                    "allows (%d): raise the limit (LimitNOFILE=) or lower max_connections",
                    cap, soft, allowed)
    return cap


async def _serve(args: argparse.Namespace) -> int:
    if os.environ.get(WORKER_FDS_ENV) is not None:
        die_with_supervisor(os.environ)
    notifier = Notifier(os.environ)
    sims: list[Any] = []
    if args.demo:
        config, secrets_, key, sims = await _demo_config(args.listen or "127.0.0.1:8080")
    else:
        config, secrets_ = _load(args.config)
        if (kept := os.environ.get(KEPT_ENV)) is not None:  # a worker: as the service started
            config = keep(config, orjson.loads(kept))
    try:
        listen = parse_listen(args.listen) if args.listen else config.server.listen
        mlisten = parse_listen(args.metrics_listen) if args.metrics_listen else (
            config.server.metrics_listen
        )
    except ValueError as e:
        print(f"lrproxy serve: --listen/--metrics-listen: {e}", file=sys.stderr)
        return EX_USAGE
    if listens_clash(listen, mlisten) == "same":  # "overlap": the bind's own error line
        print(f"lrproxy serve: --listen/--metrics-listen: the API and /metrics need "
              f"different addresses (both {listen})", file=sys.stderr)
        return EX_USAGE
    worker = os.environ.get(WORKER_FDS_ENV) is not None
    cap = connection_cap(config, worker)
    if config.server.workers > 1 and not args.demo and not worker:
        passed = [f"--log-level={args.log_level}", f"--log-format={args.log_format}"]
        if args.no_access_log:
            passed.append("--no-access-log")
        passed.append(f"--access-log-flush-ms={args.access_log_flush_ms}")
        passed.append(f"--loop={args.loop}")
        return await supervise(config, args.config, listen, mlisten, passed)
    if worker:
        notifier.ready_status = f"worker {os.environ.get(WORKER_INDEX_ENV, '0')}"
        mlisten = None  # the supervisor serves /metrics for all workers
    registry = CollectorRegistry()
    if not worker:  # (a worker's figures reach /metrics through the supervisor)
        add_process_metrics(registry)
    app = make_app(config, secrets_, registry=registry)
    rt = app[RUNTIME]
    _warn_unserved(rt)
    runner = Runner(app, header_timeout=config.timeouts.client_header, access_log=None,
                    handler_cancellation=True, shutdown_timeout=1.0,
                    max_connections=cap)
    await runner.setup()
    mrunner = None
    try:
        own = await _start_sites(runner, listen, config.server.workers > 1)
    except OSError as e:
        log.error("cannot listen on %s: %s", listen, e.strerror or e)
        await _abandon(runner, sims)
        return 1
    if mlisten:
        try:
            mrunner = await serve_metrics(lambda: registry, mlisten,
                                          config.timeouts.client_header)
        except OSError as e:
            log.error("cannot listen on %s for /metrics: %s", mlisten, e.strerror or e)
            await _abandon(runner, sims)
            return 1
    urls, at = api_urls(runner.addresses)  # (each socket systemd passed)
    mat = named(mrunner.addresses) if mrunner else []
    loop_name = "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") \
        else "asyncio"
    log.info("lrproxy %s listening on %s%s (%s)", __version__, urls,
             "".join(f", /metrics on http://{m}/metrics" for m in mat), loop_name,
             extra={"fields": {"listen": at, "metrics": ", ".join(mat) or None,
                               "loop": loop_name}})
    if args.demo:
        try:
            print(f"LOWROUTER_BASE_URL=http://{named(runner.addresses)[0]}/api/v1", flush=True)
            print(f"LOWROUTER_API_KEY={key}", flush=True)
        except OSError as e:  # stdout closed, or its reader gone: a demo nobody can use
            log.error("--demo: cannot print LOWROUTER_BASE_URL and LOWROUTER_API_KEY on "
                      "stdout: %s", e.strerror or e)
            if mrunner is not None:
                await mrunner.cleanup()
            await _abandon(runner, sims)
            return 1

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ignore_user_signals(loop)
    if TERM_EARLY:  # a worker told to stop as it started: it drains what has queued
        signal.alarm(0)  # (__main__'s deadline for reaching this point)
        stop.set()
    if not args.demo:
        # a worker reads its supervisor's copy of the file, but names the original
        shown = os.environ.get(CONFIG_SHOWN_ENV, args.config) if worker else args.config
        loop.add_signal_handler(signal.SIGHUP, _reload, app, args.config, notifier, shown,
                                config)
        if HUP_EARLY:  # noted by __main__ as it started: the file may have changed since
            log.info("SIGHUP came while starting: reloading now that it serves")
            loop.call_soon(_reload, app, args.config, notifier, shown, config)  # (after READY=1)
    else:  # a terminal's hangup (the demo runs in one): ends it as SIGTERM does, and
        # says so (SIGHUP's default ended it without a word, mid-request)
        def hangup() -> None:
            log.info("SIGHUP: --demo reads no config file to reload; stopping")
            stop.set()

        loop.add_signal_handler(signal.SIGHUP, hangup)
        if HUP_EARLY:
            hangup()
    watchdog = asyncio.create_task(_watchdog(notifier)) if notifier.watchdog_s else None
    _tune_gc()
    notifier.ready(f"serving on {at}")
    await stop.wait()
    ignore_hangups(loop)
    notifier.stopping()
    grace = rt.state.config.server.shutdown_grace_s
    if TERM_EARLY:  # the grace counts from the SIGTERM, as the supervisor's limit does
        grace = max(0.0, grace - (time.monotonic() - TERM_EARLY[0]))
    await _drain(runner, rt, grace, own)
    if watchdog is not None:
        watchdog.cancel()
    if mrunner is not None:
        await mrunner.cleanup()
    for sim in sims:
        await sim.stop()
    notifier.close()
    log.info("stopped")
    return 0


async def _abandon(runner: Runner, sims: list[Any]) -> None:
    """A start that failed: close what was opened (the app's ClientSession, the demo's
    simulated upstreams), so the one error line is all that is printed."""
    await runner.cleanup()
    for sim in sims:
        await sim.stop()


def _tune_gc() -> None:
    """Fewer, cheaper cyclic-GC passes under load (bench/RESULTS.md: about 10 % of CPU).

    Everything alive once the server is up (modules, config, the app) is moved out of
    the collector's generations for good, and young collections wait for 20,000 new
    container objects instead of 700: a request allocates a few hundred, nearly all
    freed by reference counting, so the default ran a pass every few requests.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLDS[0], GC_THRESHOLDS[1], GC_THRESHOLDS[2])


async def _start_sites(runner: web.AppRunner, listen: Listen, reuse_port: bool) -> bool:
    """Listen on the sockets systemd (socket activation) or the supervisor passed, else
    on `listen`: True then, the sockets are this process's own."""
    socks = worker_sockets(os.environ) or activated_sockets(os.environ)
    if socks:
        for sock in socks:
            # (aiohttp listens on it anew: with its default of 128 unless told)
            await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        log.debug("listening on %d inherited socket(s)", len(socks))
        return False
    await web.TCPSite(runner, listen.host, listen.port, backlog=LISTEN_BACKLOG,
                      reuse_port=reuse_port or None).start()
    return True


async def _drain(runner: Runner, rt: Runtime, grace: float, own: bool) -> None:
    """Stop accepting, let requests in flight finish for up to `grace` seconds (SPEC §6).

    What is still running then is ended properly: a 503 for a request not yet answered,
    the §1.1 error event for a stream, never a cut connection.
    """
    rt.draining = True
    runner.take_no_new_requests()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    if own:  # (a worker's are the supervisor's: it did so as the stop began)
        stop_queueing(_listening(runner))
    await _take_queued(runner)
    for site in list(runner.sites):  # (no await between the last look and the close)
        await site.stop()
    # The connections just taken have their requests' bytes waiting to be read (asyncio
    # takes the whole queue in the turn that sees the signal, before _take_queued looks):
    # a few turns of the loop read them, and they are in flight, or arriving, below.
    await asyncio.sleep(SETTLE_S)
    n = max(len(rt.tasks), runner.unfinished())
    if n:
        log.info("draining %d request(s) for up to %ss", n, grace)
    # Requests in flight: handled, or their bytes come and their handler not yet begun
    # (their headers still coming), or their answer still being written. Closing their
    # connections would cut them.
    while (left := deadline - loop.time()) > 0 and (rt.tasks or runner.unfinished()):
        if rt.tasks:
            await asyncio.wait(set(rt.tasks), timeout=min(left, 0.05))
        else:
            await asyncio.sleep(min(left, 0.01))
    if rt.tasks:
        log.warning("shutdown_grace_s over: ending %d request(s) early", len(rt.tasks))
        rt.drain_expired = True
        for task in list(rt.tasks):
            task.cancel()
        await asyncio.wait(set(rt.tasks), timeout=2.0)
    await _linger(runner, rt)
    await runner.cleanup()


async def _linger(runner: Runner, rt: Runtime) -> None:
    """Before the connections close: a client sends its next request on a kept-alive
    connection as soon as an answer ends (a stream committed before the drain, or ended
    by it, said nothing of a close), and the close would drop it unanswered. Requests
    that come until QUIET_S passes without one are answered (503, take_no_new_requests),
    for up to TAKE_QUEUED_S."""
    loop = asyncio.get_running_loop()
    end = loop.time() + TAKE_QUEUED_S
    quiet = loop.time() + QUIET_S
    while (now := loop.time()) < min(end, quiet):
        await asyncio.sleep(SETTLE_S)
        if rt.tasks or runner.unfinished():
            quiet = now + QUIET_S


TAKE_QUEUED_S: Final = 1.0
SETTLE_S: Final = 0.02
QUIET_S: Final = 0.1


async def _take_queued(runner: Runner, limit_s: float = TAKE_QUEUED_S) -> None:
    """Before the listening sockets close, let the server accept the connections queued
    on them, up to `limit_s`. A close would reset them: their clients had connected and
    may have written a request (a POST they cannot know was not acted on), and would get
    no answer. Accepted here, they are served as requests in flight; a connect after the
    sockets close is refused, which a client may safely retry elsewhere. Under socket
    activation systemd keeps the socket and its queue for the next start, so nothing is
    reset either way."""
    socks = _listening(runner)
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    # (a count in the kernel, which no event tells of: looked at every 2 ms)
    while any(_queued(s) for s in socks) and loop.time() < end:  # noqa: ASYNC110
        await asyncio.sleep(0.002)  # the loop accepts them meanwhile


def _listening(runner: web.AppRunner) -> list[Any]:
    """The sites' listening sockets (asyncio's TransportSocket, or a socket: uvloop)."""
    return [s for site in runner.sites
            for s in (getattr(getattr(site, "_server", None), "sockets", None) or ())]


def _queued(sock: Any) -> int:
    """Connections the kernel has queued on a listening socket for accept (Linux: TCP_INFO
    of a listener has the accept queue's length as tcpi_unacked); 0 when unknown."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError, TypeError, ValueError):
        return 0
    if len(info) < 28 or info[0] != _TCP_LISTEN:
        return 0
    return int(struct.unpack_from("I", info, 24)[0])


_TCP_LISTEN: Final = 10  # tcpi_state of a listening socket (<netinet/tcp.h>)


async def _watchdog(notifier: Notifier) -> None:
    """WATCHDOG=1 from the event loop itself, so a blocked loop is caught (sd_watchdog_enabled(3))."""
    assert notifier.watchdog_s is not None
    while True:
        notifier.watchdog()
        await asyncio.sleep(notifier.watchdog_s)


def _reload(app: web.Application, path: str, notifier: Notifier, shown: str,
            started: Config) -> None:
    """SIGHUP: validate, then swap atomically; a bad config leaves the old one serving.
    `shown` is the file the log names (a worker reads the supervisor's copy, `path`);
    `started`, the config the process started with (for what waits for a restart)."""
    notifier.reloading()
    try:
        _reload_now(app[RUNTIME], path, shown, started)
    finally:
        # always after RELOADING=1, or `systemctl reload` hangs; and after the new config
        # is in force and counted, which a supervisor's READY=1 then vouches for
        notifier.ready()


def _reload_now(rt: Runtime, path: str, shown: str, started: Config) -> None:
    try:
        config, secrets_ = _load(path)
    except ConfigError as e:
        rt.metrics.reloads.labels("error").inc()
        for line in e.problems:
            log.error("reload refused, the old config stays: %s", line)
        return
    try:
        rt.install(config, secrets_)
    except Exception as e:  # a bug of ours: install() builds all before it changes anything
        rt.metrics.reloads.labels("error").inc()
        log.exception("reload refused, the old config stays: %s: %s", shown, type(e).__name__)
        return
    poll_feeds(rt)  # a feed the reload names counts from now, not from the next poll
    later = kept_until_restart(config, started)
    if later and os.environ.get(WORKER_FDS_ENV) is None:  # (a supervisor says it once)
        log.warning("changed, but kept until a restart: %s", ", ".join(later))
    rt.metrics.reloads.labels("ok").inc()
    log.info("config reloaded from %s", shown)
    _warn_unserved(rt)


def _warn_unserved(rt: Runtime) -> None:
    """Say what `_unserved` finds. With `server.workers`, the first worker says it for
    all: they read one config."""
    if not speaks_for_all():
        return
    for line in _unserved(rt.state.config, rt.state.table):
        log.warning("%s", line)


def _unserved(config: Config, table: RoutingTable) -> list[str]:
    """Which model ids answer 404 because no upstream serves them, and that every
    request answers 401 with no client key: legal, often a slip (serve and check-config
    say so)."""
    lines = []
    if not config.keys:
        lines.append("no client keys are configured ([auth] keys): every request gets 401")
    for mid in unserved(table):
        if mid == AUTO_MODEL and config.auto_models:
            lines.append(f"no upstream serves any [auto] model: requests for {mid} get 404")
        elif mid == AUTO_MODEL:
            lines.append(f"no [auto] models are configured: requests for {mid} get 404")
        else:
            lines.append(f"model {mid} is served by no upstream: requests for it get 404")
    return lines


async def _demo_config(listen: str) -> tuple[Config, Secrets, str, list[Any]]:
    """Two simulated upstream regions of different grid intensity on loopback (SPEC §6)."""
    from lrproxy.simupstream import SimUpstream

    us = SimUpstream(name="demo-us-east", models=("gpt-4o-mini", "llama-3.1-8b"), record=False)
    eu = SimUpstream(name="demo-eu-west", models=("gpt-4o-mini", "llama-3.1-8b"), record=False)
    eu_url, us_url = await eu.start(), await us.start()
    key = "lr-demo-" + secrets.token_urlsafe(18)
    models = {"openai/gpt-4o-mini": "gpt-4o-mini", "meta/llama-3.1-8b": "llama-3.1-8b"}
    data = {
        "server": {"listen": listen},
        "auth": {"keys": [{"name": "demo", "sha256": hash_key(key)}]},
        "regions": {
            "eu-west": {"grid_intensity_g_per_kwh": 290, "pue": 1.2},
            "us-east": {"grid_intensity_g_per_kwh": 380, "pue": 1.3},
        },
        "models": {
            "openai/gpt-4o-mini": {"energy_wh_per_1k_prompt_tokens": 0.02,
                                   "energy_wh_per_1k_completion_tokens": 0.3},
            "meta/llama-3.1-8b": {"active_params_b": 8},
        },
        "upstreams": [
            {"name": "demo-eu-west", "region": "eu-west", "base_url": eu_url, "models": models},
            {"name": "demo-us-east", "region": "us-east", "base_url": us_url, "models": models},
        ],
        "auto": {"models": list(models)},
    }
    config = parse_config(data, source="--demo")
    return config, resolve_secrets(config, {}), key, [eu, us]


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
