"""`server.workers = N`: a supervisor and N worker processes sharing the port (SPEC §4, §6).

The supervisor binds one SO_REUSEPORT socket per worker and keeps them open, so the
kernel spreads connections over the workers and a worker that crashes loses nothing
queued on its socket: its successor takes the same socket over. Workers report
READY=1 to the supervisor over a datagram socket (the sd_notify protocol, the same code
as under systemd); the supervisor tells systemd once all are ready, forwards SIGHUP and
SIGTERM, restarts crashed workers, and serves one /metrics summing every worker through
prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client import multiprocess as prom_mp

from lrproxy.config import Config, Listen
from lrproxy.log import MAIN
from lrproxy.metrics import serve_metrics
from lrproxy.sdnotify import Notifier, activated_sockets

WORKER_FDS_ENV: Final = "LRPROXY_WORKER_FDS"  # listening fds a worker inherits
RESTART_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
log = logging.getLogger(MAIN)


def worker_sockets(environ: dict[str, str] | os._Environ[str]) -> list[socket.socket]:
    """The listening sockets a worker got from its supervisor."""
    fds = environ.get(WORKER_FDS_ENV, "")
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd.isdigit()]


def _bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((listen.host, listen.port))
    sock.listen(1024)
    return sock  # not inheritable: spawn() lets each worker inherit its own only


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self, handle: Callable[[bytes], None]) -> None:
        self.handle = handle

    def datagram_received(self, data: bytes, addr: Any) -> None:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            self.handle(data)


class _Worker:
    def __init__(self, index: int, fds: list[int]) -> None:
        self.index = index
        self.fds = fds
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.crashes = 0
        self.ready = asyncio.Event()


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
    try:
        async with asyncio.timeout(grace):
            await asyncio.gather(*(proc.wait() for proc in running))
    except TimeoutError:
        for proc in running:
            if proc.returncode is None:
                proc.kill()
        await asyncio.gather(*(proc.wait() for proc in running))


async def _supervise(
    cleanup: contextlib.AsyncExitStack, workers: list[_Worker], config: Config,
    config_path: str, listen: Listen, metrics_listen: Listen | None,
    worker_args: Sequence[str],
) -> int:
    n = config.server.workers
    notifier = Notifier(os.environ)
    cleanup.callback(notifier.close)
    prom_dir = tempfile.mkdtemp(prefix="lrproxy-metrics-")
    cleanup.callback(shutil.rmtree, prom_dir, ignore_errors=True)
    # Callbacks run last first: workers are ended after the sockets close, before rmtree.
    cleanup.push_async_callback(_reap, workers, config.server.shutdown_grace_s + 5)
    inherited = activated_sockets(os.environ)
    if inherited:  # systemd's socket: every worker accepts on it
        socks = inherited
        per_worker = [[s.fileno() for s in socks] for _ in range(n)]
        for s in socks:
            s.set_inheritable(True)
    else:
        socks = []
        cleanup.callback(_close_all, socks)
        try:
            for _ in range(n):
                socks.append(_bind(listen))
        except OSError as e:
            log.error("cannot listen on %s: %s", listen, e.strerror or e)
            return 1
        per_worker = [[s.fileno()] for s in socks]
    # Bound before any worker starts: a failure here leaves nothing running.
    if metrics_listen:
        try:
            mrunner = await serve_metrics(lambda: _summed(prom_dir), metrics_listen)
        except OSError as e:
            log.error("cannot listen on %s for /metrics: %s", metrics_listen, e.strerror or e)
            return 1
        cleanup.push_async_callback(mrunner.cleanup)
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
    env["NOTIFY_SOCKET"] = inbox_path

    spawning = asyncio.Lock()

    async def spawn(w: _Worker) -> None:
        w.ready.clear()
        # uvloop's spawn passes every inheritable descriptor, whatever pass_fds says: a
        # worker holding another's socket would keep it open (queueing connections that
        # nobody accepts) while it drains. So a worker's own sockets are inheritable only
        # while it is spawned, one spawn at a time.
        async with spawning:
            if stopping:  # a restart that lost the race with SIGTERM
                return
            for fd in w.fds:
                os.set_inheritable(fd, True)
            try:
                w.proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "lrproxy", "serve", "--config", config_path,
                    *worker_args,
                    env={**env, WORKER_FDS_ENV: ",".join(map(str, w.fds)),
                         "LRPROXY_WORKER_INDEX": str(w.index)},
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
            log.error("worker %d (pid %d) exited with %s; restarting in %ss",
                      w.index, w.proc.pid, code, delay)
            await asyncio.sleep(delay)
            if stopping:
                return
            await spawn(w)

    def on_datagram(data: bytes) -> None:
        # Without SCM_CREDENTIALS the sender is unknown: each worker names itself in
        # STATUS=worker N.
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        status = fields.get("STATUS", "")
        if fields.get("READY") == "1" and status.startswith("worker "):
            idx = int(status.split()[1])
            if 0 <= idx < n:
                workers[idx].ready.set()

    async def reload() -> None:
        notifier.reloading()
        for w in workers:
            w.ready.clear()
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signal.SIGHUP)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.gather(*(w.ready.wait() for w in workers))
        notifier.ready()

    stop = asyncio.Event()
    reloads: list[asyncio.Task[None]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.append(asyncio.create_task(reload())))
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
        notifier.ready(f"{n} workers serving on {listen}")
        log.info("%d workers serving on http://%s/api/v1", n, listen)
    else:
        ready.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ready
        if not stop.is_set():
            log.error("not every worker became ready within 30 s")

    watchdog = None
    if notifier.watchdog_s:
        async def ping() -> None:
            while True:
                notifier.watchdog()
                await asyncio.sleep(notifier.watchdog_s or 1)
        watchdog = asyncio.create_task(ping())
    await stop.wait()
    stopping = True
    notifier.stopping()
    async with spawning:  # a restart under way ends first, and none starts after
        for w in workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signal.SIGTERM)
        if not inherited:
            # Our copies of the listening sockets: held open, they would go on queueing
            # new connections after the workers stop accepting, to reset them at exit.
            # Closed, each socket goes when its worker closes it: connects are refused.
            for s in socks:
                s.close()
    grace = config.server.shutdown_grace_s + 5
    procs = [w.proc.wait() for w in workers if w.proc is not None]
    try:
        async with asyncio.timeout(grace):
            await asyncio.gather(*procs)
    except TimeoutError:
        for w in workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.kill()
    for t in (*watchers, *reloads, *([watchdog] if watchdog else [])):
        t.cancel()
    codes = [w.proc.returncode for w in workers if w.proc is not None]
    return 0 if all(c == 0 for c in codes) else 1


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()  # a second close() does nothing


def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()


def _summed(prom_dir: str) -> CollectorRegistry:
    """A registry summing every worker's metric files (prometheus-client multiprocess)."""
    registry = CollectorRegistry()
    prom_mp.MultiProcessCollector(registry, path=prom_dir)  # type: ignore[no-untyped-call]
    return registry
