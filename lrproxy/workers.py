"""`server.workers = N`: a supervisor and N worker processes sharing the port (SPEC §4, §6).

The supervisor binds one SO_REUSEPORT socket per worker and keeps them open, so the
kernel spreads connections over the workers and a worker that crashes loses nothing
queued on its socket: its successor takes the same socket over. A worker that exits
before it was ready has its socket closed, so the kernel routes nothing to a socket
nobody accepts on. Workers report READY=1 to the supervisor over a datagram socket (the
sd_notify protocol, the same code as under systemd); the supervisor tells systemd once
all are ready, forwards SIGTERM, restarts crashed workers, and serves one /metrics
summing every worker through prometheus-client's multiprocess mode.

Workers read their config from the supervisor's copy of the file as it last accepted
it, never from the file itself: on SIGHUP the supervisor validates the file and only
then makes it the copy and signals the workers, so a refused reload cannot reach a
worker started later (after a crash), whatever stays on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client import multiprocess as prom_mp
from prometheus_client.metrics_core import Metric

from lrproxy import FEED_CACHE_ENV, HUP_EARLY, TERM_START_S, WORKER_FDS_ENV, protocol
from lrproxy.buckets import SHARED_BUCKETS_ENV, SharedBuckets
from lrproxy.config import (
    WORKER_KEPT,
    Config,
    ConfigError,
    Listen,
    kept_until_restart,
    read_config,
    resolve_secrets,
    setting,
)
from lrproxy.log import MAIN
from lrproxy.metrics import add_process_metrics, serve_metrics
from lrproxy.sdnotify import Notifier, activated_sockets, ignore_hangups, ignore_user_signals

SUPERVISOR_ENV: Final = "LRPROXY_SUPERVISOR_PID"  # a worker's parent, which it dies with
WORKER_INDEX_ENV: Final = "LRPROXY_WORKER_INDEX"  # 0, 1, …: which worker this is
CONFIG_SHOWN_ENV: Final = "LRPROXY_CONFIG_SHOWN"  # the operator's file, for a worker's log
# JSON: config.WORKER_KEPT's settings as the service started, which a worker started
# after a reload keeps (a reload does not change them in the running workers)
KEPT_ENV: Final = "LRPROXY_KEPT"
_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>
# Connections the kernel queues for accept, as lrproxy.socket's Backlog= (and capped by
# net.core.somaxconn): on every socket, a worker's and an activated one too (cli).
LISTEN_BACKLOG: Final = 1024
RESTART_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
_EX_CONFIG: Final = 78  # a worker's exit status for a config or credential problem (cli)
log = logging.getLogger(MAIN)


def speaks_for_all() -> bool:
    """Whether this process logs what every worker would find alike (a config's
    warnings, a feed file's changes): one process, or the first worker, so that N
    workers reading one config or file do not say each thing N times."""
    return os.environ.get(WORKER_INDEX_ENV, "0") == "0"


def worker_sockets(environ: dict[str, str] | os._Environ[str]) -> list[socket.socket]:
    """The listening sockets a worker got from its supervisor."""
    fds = environ.get(WORKER_FDS_ENV, "")
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd.isdigit()]


def die_with_supervisor(environ: dict[str, str] | os._Environ[str]) -> None:
    """In a worker: end (SIGTERM, so a drain) when the supervisor does, even by SIGKILL.
    An orphan would go on serving its old config on the port, outside any /metrics."""
    supervisor = environ.get(SUPERVISOR_ENV, "")
    if not supervisor.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes  # only here: prctl(2) has no binding in the standard library

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(supervisor):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _bind(listen: Listen, *, listening: bool = True, reuse_port: bool = True) -> socket.socket:
    """A SO_REUSEPORT socket on `listen`. Not `listening`, it joins the port's group (and
    gets connections) only once its worker listens on it (asyncio and uvloop do)."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((listen.host, listen.port))
    if listening:
        sock.listen(LISTEN_BACKLOG)
    return sock  # not inheritable: spawn() lets each worker inherit its own only


def stop_queueing(socks: Iterable[socket.socket]) -> None:
    """Before listening sockets of ours close at a stop: the kernel drops the SYNs of new
    connections to them from now on, so that their accept queues, emptied by the
    workers, stay empty. A close resets what is queued (clients that had connected, and
    may have sent a POST), and under a steady stream of connects something always is; a
    dropped SYN is sent again a second later and then refused, which a client may retry
    elsewhere. Only a new connection's SYN is dropped: the final ACK (or first request)
    of a handshake under way, whose SYN came before, must pass, as its client saw its
    connect() succeed and may have sent a POST; dropped, the connection would never
    complete and the close would reset it. (SO_ATTACH_FILTER, socket(7): a classic BPF
    program reading the TCP flags; the connections already made do not carry it.) Never
    on systemd's sockets, which outlive us: the next start would get no connection."""
    import ctypes  # only here: the filter is passed by address

    prog = ctypes.create_string_buffer(_DROP_SYN)
    fprog = struct.pack("HP", len(_DROP_SYN) // 8, ctypes.addressof(prog))
    for sock in socks:
        if sock.fileno() == -1:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
        except (OSError, AttributeError) as e:  # not Linux: a close resets what queued
            log.debug("cannot stop queueing on %s: %s", sock, e)


_SO_ATTACH_FILTER: Final = getattr(socket, "SO_ATTACH_FILTER", 26)  # <asm/socket.h>
# struct sock_filter {u16 code; u8 jt, jf; u32 k}, each. A listener's filter sees a
# segment from its TCP header on: a SYN without ACK is dropped (ret #0, "keep no byte"),
# any other segment kept whole (the handshakes under way end, RSTs come through).
_DROP_SYN: Final = b"".join(struct.pack("HBBI", *insn) for insn in (
    (0x30, 0, 0, 13),  # ldb [13]: the flags byte
    (0x54, 0, 0, 0x12),  # and #(SYN | ACK)
    (0x15, 0, 1, 0x02),  # jeq #SYN: the next instruction, else the one after
    (0x06, 0, 0, 0),  # ret #0
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1
))


def _accept(path: str, accepted: Path) -> Config:
    """Validate the config file at `path` (secrets included) and make its bytes the copy
    at `accepted`, which workers start and reload from; raises ConfigError, leaving
    `accepted` as it was.

    The bytes are validated as a file named like the original (problem lines name it),
    in a directory next to `accepted`, then moved over it at once.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from e
    candidate = accepted.parent.parent / "candidate" / accepted.name
    candidate.parent.mkdir(mode=0o700, exist_ok=True)
    candidate.write_bytes(raw)
    config = read_config(candidate, shown=path)
    resolve_secrets(config, os.environ)
    os.replace(candidate, accepted)
    return config


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self, handle: Callable[[bytes], None]) -> None:
        self.handle = handle

    def datagram_received(self, data: bytes, addr: Any) -> None:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            self.handle(data)


class _Worker:
    def __init__(self, index: int, socks: list[socket.socket]) -> None:
        self.index = index
        self.socks = socks
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.crashes = 0
        self.ready = asyncio.Event()
        self.serving = False  # this process has sent READY=1
        self.generation = 0  # of the accepted config when it started

    @property
    def fds(self) -> list[int]:
        return [s.fileno() for s in self.socks]


async def supervise(
    config: Config, config_path: str, listen: Listen, metrics_listen: Listen | None,
    worker_args: Sequence[str],
) -> int:
    """Run N workers until SIGTERM/SIGINT; returns the exit status.

    However it ends (a start failure, an exception), no worker outlives the supervisor
    and its temporary directory is removed.
    """
    workers: list[_Worker] = []
    async with contextlib.AsyncExitStack() as cleanup:
        return await _supervise(cleanup, workers, config, config_path, listen, metrics_listen,
                                worker_args)
    raise AssertionError("unreachable")  # mypy: an exit stack may swallow an exception


async def _reap(workers: list[_Worker], grace: float) -> None:
    """SIGTERM every worker still running, SIGKILL those still there after `grace`."""
    running = [w.proc for w in workers if w.proc is not None and w.proc.returncode is None]
    if not running:
        return
    log.error("supervisor stopping: ending %d worker(s)", len(running))
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    await _wait_or_kill(running, grace)


async def _wait_or_kill(procs: list[asyncio.subprocess.Process], grace: float) -> None:
    """Wait for `procs` to exit; SIGKILL those still there after `grace` seconds."""
    try:
        async with asyncio.timeout(grace):
            await asyncio.gather(*(proc.wait() for proc in procs))
    except TimeoutError:
        for proc in procs:
            if proc.returncode is None:
                log.error("worker (pid %d) still running at the stop's time limit "
                          "(shutdown_grace_s + 5 s): killed", proc.pid)
                proc.kill()
        await asyncio.gather(*(proc.wait() for proc in procs))


async def _supervise(
    cleanup: contextlib.AsyncExitStack, workers: list[_Worker], config: Config,
    config_path: str, listen: Listen, metrics_listen: Listen | None,
    worker_args: Sequence[str],
) -> int:
    n = config.server.workers
    notifier = Notifier(os.environ)
    cleanup.callback(notifier.close)
    # Under systemd, its RuntimeDirectory (/run/lrproxy: never aged away by tmpfiles'
    # cleaning of /tmp, removed at stop); else the temporary directory.
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    prom_dir = tempfile.mkdtemp(prefix="lrproxy-metrics-", dir=runtime or None)
    cleanup.callback(shutil.rmtree, prom_dir, ignore_errors=True)
    # Callbacks run last first: workers are ended after the sockets close, before rmtree.
    cleanup.push_async_callback(_reap, workers, config.server.shutdown_grace_s + 5)
    (Path(prom_dir) / "config").mkdir(mode=0o700)
    accepted = Path(prom_dir) / "config" / Path(config_path).name
    config = _accept(config_path, accepted)  # the bytes workers start from, checked again
    at_start = config  # what a reload cannot change stays as it is here
    generation = 0  # of the accepted config: one more at each accepted reload
    refused = 0  # reloads refused here, added to the workers' error count in /metrics
    inherited = activated_sockets(os.environ)
    if inherited:  # systemd's socket: every worker accepts on it
        socks = inherited
        per_worker = [list(socks) for _ in range(n)]
        for s in socks:
            s.set_inheritable(True)
    else:
        socks = []
        cleanup.callback(_close_all, socks)
        try:
            # A plain bind first: SO_REUSEPORT alone would join the group of any other
            # process on the port (a second instance), which would split the traffic.
            _bind(listen, listening=False, reuse_port=False).close()
            for _ in range(n):
                socks.append(_bind(listen))
                if listen.port == 0:  # any free port: one, the first socket's, for all
                    listen = Listen(listen.host, socks[0].getsockname()[1])
        except OSError as e:
            log.error("cannot listen on %s: %s", listen, e.strerror or e)
            return 1
        per_worker = [[s] for s in socks]

    def live() -> list[int]:
        """The pids of the workers running (or exited, not yet reaped)."""
        return [w.proc.pid for w in workers if w.proc is not None and w.proc.returncode is None]

    # Bound before any worker starts: a failure here leaves nothing running.
    mat: list[str] = []  # /metrics' address as bound
    if metrics_listen:
        try:
            mrunner = await serve_metrics(lambda: _summed(prom_dir, refused, config, live),
                                          metrics_listen, config.timeouts.client_header)
        except OSError as e:
            log.error("cannot listen on %s for /metrics: %s", metrics_listen, e.strerror or e)
            return 1
        cleanup.push_async_callback(mrunner.cleanup)
        mat = protocol.named(mrunner.addresses)
    # The addresses bound (a port 0's, or systemd's sockets: server.listen is not read
    # then), named before the workers are ready.
    urls, at = protocol.api_urls(s.getsockname() for s in socks)
    metrics_at = "".join(f", /metrics on http://{m}/metrics" for m in mat)
    fields = {"listen": at, "metrics": ", ".join(mat) or None, "workers": n}
    log.info("%d workers starting on %s%s", n, urls, metrics_at, extra={"fields": fields})
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    cleanup.callback(inbox.close)
    inbox_path = os.path.join(prom_dir, "notify.sock")
    inbox.bind(inbox_path)
    inbox.setblocking(False)
    workers.extend(_Worker(i, per_worker[i]) for i in range(n))
    by_pid: dict[int, _Worker] = {}
    stopping = False
    loop = asyncio.get_running_loop()

    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                        "LISTEN_PID", "LISTEN_FDNAMES")}
    env["PROMETHEUS_MULTIPROC_DIR"] = prom_dir
    # The keys' rate_per_s buckets, one file for all workers (buckets.SharedBuckets)
    buckets = os.path.join(prom_dir, "buckets")
    SharedBuckets.create(buckets).close()
    env[SHARED_BUCKETS_ENV] = buckets
    # Each feed's last good reading, for a worker started after the file broke
    feed_cache = os.path.join(prom_dir, "feeds")
    os.mkdir(feed_cache, 0o700)
    env[FEED_CACHE_ENV] = feed_cache
    env[CONFIG_SHOWN_ENV] = config_path
    env[KEPT_ENV] = orjson.dumps({k: setting(at_start, k) for k in WORKER_KEPT}).decode()
    env["NOTIFY_SOCKET"] = inbox_path

    spawning = asyncio.Lock()

    async def spawn(w: _Worker) -> bool:
        """Start a worker on the accepted config; False when its socket cannot be bound."""
        async with spawning:
            if stopping:  # a restart that lost the race with SIGTERM
                return True
            if not inherited and all(s.fileno() == -1 for s in w.socks):
                # Closed when its last process failed to start. Bound but not listening,
                # it gets connections only once the new worker listens, ready to accept.
                try:
                    w.socks = [_bind(listen, listening=False)]
                except OSError as e:
                    log.error("worker %d: cannot bind %s again: %s", w.index, listen,
                              e.strerror or e)
                    return False
                socks.extend(w.socks)
            await start(w)
        return True

    async def start(w: _Worker) -> None:
        """Start w's process on its sockets (under `spawning`)."""
        w.ready.clear()
        w.serving = False
        # uvloop's spawn passes every inheritable descriptor, whatever pass_fds says: a
        # worker holding another's socket would keep it open (queueing connections that
        # nobody accepts) while it drains. So a worker's own sockets are inheritable only
        # while it is spawned, one spawn at a time.
        for fd in w.fds:
            os.set_inheritable(fd, True)
        w.generation = generation  # it reads the accepted copy after this
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lrproxy", "serve", "--config", str(accepted),
                *worker_args,
                env={**env, WORKER_FDS_ENV: ",".join(map(str, w.fds)),
                     WORKER_INDEX_ENV: str(w.index), SUPERVISOR_ENV: str(os.getpid())},
                pass_fds=w.fds, stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            if not inherited:  # systemd's sockets go to every worker
                for fd in w.fds:
                    os.set_inheritable(fd, False)
        w.started = time.monotonic()
        by_pid[w.proc.pid] = w
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    async def watch(w: _Worker) -> None:
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            by_pid.pop(w.proc.pid, None)
            prom_mp.mark_process_dead(w.proc.pid, prom_dir)  # type: ignore[no-untyped-call]
            if stopping:
                return
            w.crashes = w.crashes + 1 if time.monotonic() - w.started < 30 else 1
            delay = RESTART_BACKOFF_S[min(w.crashes, len(RESTART_BACKOFF_S)) - 1]
            if w.serving or inherited:
                # Its socket stays open: what the kernel queues on it meanwhile waits
                # for the successor.
                log.error("worker %d (pid %d) exited with %s; restarting in %ss",
                          w.index, w.proc.pid, code, delay)
            else:
                # It never accepted: held open, its socket would queue connections that
                # hang until a successor manages to start, which may be never.
                _close_all(w.socks)
                log.error("worker %d (pid %d) exited with %s before it was ready%s; its "
                          "socket is closed, so connections go to the other workers only; "
                          "retrying in %ss", w.index, w.proc.pid, code,
                          " (a config or credential problem, logged above)"
                          if code == _EX_CONFIG else "", delay)
                if not any(x.serving for x in workers):
                    log.error("no worker is serving: connections to %s are refused", at)
            while True:
                await asyncio.sleep(delay)
                if stopping or await spawn(w):
                    break
                delay = RESTART_BACKOFF_S[-1]
            if stopping:
                return

    def on_datagram(data: bytes) -> None:
        # Without SCM_CREDENTIALS the sender is unknown: each worker names itself in
        # STATUS=worker N.
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        status = fields.get("STATUS", "")
        if fields.get("READY") == "1" and status.startswith("worker "):
            idx = int(status.split()[1])
            if 0 <= idx < n:
                w = workers[idx]
                w.ready.set()
                if not w.serving:
                    w.serving = True
                    if w.generation != generation and w.proc is not None:
                        # It read the config before a reload accepted a newer one and
                        # was not yet ready for that reload's SIGHUP.
                        w.ready.clear()
                        w.proc.send_signal(signal.SIGHUP)

    async def reload() -> None:
        notifier.reloading()
        try:
            await reload_workers()
        finally:
            notifier.ready()  # always after RELOADING=1, or `systemctl reload` hangs

    async def reload_workers() -> None:
        nonlocal config, generation, refused
        try:
            config = _accept(config_path, accepted)
        except ConfigError as e:
            refused += 1
            for line in e.problems:
                log.error("reload refused, the old config stays: %s", line)
            return
        except Exception as e:  # a bug of ours, say: the old config stays all the same
            refused += 1
            log.error("reload refused, the old config stays: %s: %s", config_path,
                      e or type(e).__name__)
            return
        generation += 1
        log.info("config accepted from %s; workers reload it", config_path)
        if later := kept_until_restart(config, at_start):
            log.warning("changed, but kept until a restart: %s", ", ".join(later))
        # A worker still starting has no SIGHUP handler yet (the signal would end it): it
        # is sent one when it is ready, see on_datagram.
        told = [w for w in workers
                if w.serving and w.proc is not None and w.proc.returncode is None]
        for w in told:
            w.ready.clear()
            w.generation = generation
            assert w.proc is not None
            w.proc.send_signal(signal.SIGHUP)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(w.ready.wait() for w in told))

    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()  # those under way (ended ones leave it)

    def reload_now() -> None:
        task = asyncio.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def hangup() -> None:
        if started:
            reload_now()
        else:  # RELOADING=1 and READY=1 now would tell systemd it is up: after READY
            HUP_EARLY.append(time.monotonic())

    started = False
    loop.add_signal_handler(signal.SIGHUP, hangup)
    ignore_user_signals(loop)
    for w in workers:
        await spawn(w)
    watchers = [asyncio.create_task(watch(w)) for w in workers]
    cleanup.callback(_cancel_all, watchers)  # before _reap: no restart while it runs
    transport, _ = await loop.create_datagram_endpoint(lambda: _Inbox(on_datagram), sock=inbox)
    cleanup.callback(transport.close)
    ready: asyncio.Future[Any] = asyncio.ensure_future(
        asyncio.gather(*(w.ready.wait() for w in workers)))
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    await asyncio.wait([ready, stopped], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if ready.done():
        notifier.ready(f"{n} workers serving on {at}")
        log.info("%d workers serving on %s%s", n, urls, metrics_at, extra={"fields": fields})
    else:
        ready.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ready
        if not stop.is_set():
            log.error("not every worker became ready within 30 s")
    started = True
    if HUP_EARLY and not stop.is_set():  # noted as it started (__main__, hangup)
        log.info("SIGHUP came while starting: reloading now that the workers serve")
        reload_now()

    watchdog = None
    if notifier.watchdog_s:
        async def ping() -> None:
            while True:
                notifier.watchdog()
                await asyncio.sleep(notifier.watchdog_s or 1)
        watchdog = asyncio.create_task(ping())
    await stop.wait()
    stopping = True
    ignore_hangups(loop)  # (its private config copy goes at exit: no reload from it)
    notifier.stopping()
    async with spawning:  # a restart under way ends first, and none starts after
        # A worker that had already exited (waiting for its restart) was logged then;
        # the exit status says whether those running now stopped cleanly.
        running = [w for w in workers if w.proc is not None and w.proc.returncode is None]
        budget = loop.time() + config.server.shutdown_grace_s + 5  # for all of the stop
        # Our copies of the listening sockets: held open, they would go on queueing new
        # connections after a worker stops accepting, to reset them at exit. Each is
        # closed once its worker has been told (its socket then goes when the worker
        # closes it: connects are refused); a down worker's at once, unless it has a
        # queue to answer.
        own = not inherited
        if own:  # from now on no new connection queues on them (the workers empty them)
            stop_queueing(socks)
        for w in workers if own else ():
            if w in running:
                continue
            if any(s.fileno() != -1 for s in w.socks):
                # It served, died, and waits for its restart; its socket, held open, has
                # queued what the kernel sent it meanwhile. Its successor, started now and
                # told to stop once it serves, answers those before it drains.
                log.warning("worker %d was down at the stop: started again to answer the "
                            "connections queued on its socket", w.index)
                try:
                    await start(w)
                except OSError as e:
                    log.error("worker %d: cannot start: %s", w.index, e.strerror or e)
                else:
                    running.append(w)
                    continue
            _close_all(w.socks)
        # A worker still starting is told once it serves, or after START_WAIT_S: until
        # `python -m lrproxy` has set its handler, a SIGTERM would end it at once, and
        # the connections queued on its socket would be reset; serving, it drains them.
        await asyncio.gather(*(_term_once_serving(w, own) for w in running))
    procs = [w.proc for w in running if w.proc is not None]
    await _wait_or_kill(procs, max(1.0, budget - loop.time()))
    for t in (*watchers, *reloads, *([watchdog] if watchdog else [])):
        t.cancel()
    return 0 if all(proc.returncode == 0 for proc in procs) else 1


# How long a stop waits for a starting worker's READY before it sends SIGTERM anyway
# (its handler is set within milliseconds of its start: __main__). The worker then ends
# itself if it does not serve within TERM_START_S (__main__: SIGALRM).
START_WAIT_S: Final = 3.0


async def _term_once_serving(w: _Worker, close: bool) -> None:
    proc = w.proc
    assert proc is not None
    if not w.serving:  # its READY (on_datagram sets w.ready), or its end, or the time
        log.info("worker %d still starting: told to stop once it serves, or in %.0f s",
                 w.index, START_WAIT_S)
        waits = [asyncio.ensure_future(w.ready.wait()), asyncio.ensure_future(proc.wait())]
        done, _ = await asyncio.wait(waits, timeout=START_WAIT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        for t in waits:
            t.cancel()
        if not done:
            log.warning("worker %d not serving after %.0f s: told to stop as it starts "
                        "(it ends itself %d s later if it still does not serve)",
                        w.index, START_WAIT_S, TERM_START_S)
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    if close:
        _close_all(w.socks)


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()  # a second close() does nothing


def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()


def _summed(prom_dir: str, refused: int, config: Config,
            pids: Callable[[], Iterable[int]]) -> CollectorRegistry:
    """A registry summing every worker's metric files (prometheus-client multiprocess),
    with the reloads the supervisor refused (no worker saw them) in the error count, and
    the service's process_* (the supervisor's and its workers', `pids`)."""
    registry = CollectorRegistry()
    registry.register(_Summed(prom_dir, refused, config))
    add_process_metrics(registry, pids)
    return registry


class _Summed:
    def __init__(self, prom_dir: str, refused: int, config: Config) -> None:
        self.dir = prom_dir
        self.refused = refused
        # The gauges' series of the accepted config only (SPEC §5): a worker's files keep
        # an upstream or region a reload removed, where one process removes its series.
        self.configured = {
            "lrproxy_upstream_usable": ("upstream", {u.name for u in config.upstreams}),
            "lrproxy_grid_intensity_g_per_kwh": ("region", set(config.regions)),
        }

    def files(self) -> list[str]:
        """The workers' metric files, but for those still empty: a worker (re)starting
        creates its file, then sizes it; read between the two, an empty file fails the
        whole merge (prometheus-client reads its header unchecked), and the scrape 500."""
        with os.scandir(self.dir) as entries:
            return [e.path for e in entries
                    if e.name.endswith(".db") and _size(e) > 0]

    def collect(self) -> Iterable[Metric]:
        merged = prom_mp.MultiProcessCollector.merge(self.files(), accumulate=True)  # type: ignore[no-untyped-call]
        for metric in merged:
            if metric.name == "lrproxy_config_reloads" and self.refused:
                for i, s in enumerate(metric.samples):
                    if s.name.endswith("_total") and s.labels == {"result": "error"}:
                        metric.samples[i] = s._replace(value=s.value + self.refused)
            kept = self.configured.get(metric.name)
            if kept is not None:
                label, names = kept
                metric.samples = [s for s in metric.samples if s.labels.get(label) in names]
            yield metric


def _size(entry: os.DirEntry[str]) -> int:
    try:
        return entry.stat().st_size
    except FileNotFoundError:  # removed since the listing (a worker's live gauges)
        return 0
