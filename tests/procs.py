"""Helpers for tests that run lrproxy as a real process (SPEC §6).

`Proxy` starts `python -m lrproxy serve --config FILE` with its output in files (no pipe
can fill up), `SimThread` runs a `SimUpstream` in a thread of its own, `Notify` is the
datagram socket systemd would hold for `NOTIFY_SOCKET`. Every wait is bounded and every
process is stopped by its own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lrproxy.simupstream import SimUpstream

T = TypeVar("T")

CLIENT_KEY = "sk-ops-test-4e1f"
MODEL = "openai/gpt-4o-mini"
# Variables of a systemd service that must not leak into a child from the test's own env.
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                 "LISTEN_FDNAMES")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now: racy (anything may take
    it before the server binds it), so only for a port that must be known before the
    start. Otherwise listen on port 0 and read the port off the log (`bound_ports`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The API's address as bound, in lrproxy's start line (cli._serve: one process, or each
# worker) and in the workers' supervisor's once all are ready (workers._supervise).
_BOUND_RE = re.compile(
    r"(?:listening|workers starting|workers serving) on http://(?:\[[^\]]+\]|[^/:\s]+):(\d+)/api/v1")
# /metrics' address as bound, in the same lines (one process's, the supervisor's)
_METRICS_RE = re.compile(r"/metrics on http://(?:\[[^\]]+\]|[^/:\s]+):(\d+)/metrics")


def bound_ports(log: str) -> list[int]:
    """The API ports named by the start lines in lrproxy's stderr `log`, in order (with
    port 0 in its config, the one the kernel picked)."""
    return [int(m[1]) for m in _BOUND_RE.finditer(log)]


def listen_backlogs(port: int) -> list[int]:
    """The backlog of each socket listening on 127.0.0.1:`port`, as `ss` (iproute2)
    shows it (Send-Q), and the most the kernel allows (net.core.somaxconn)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                         text=True, check=True).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def port_refuses(port: int) -> bool:
    """True when a TCP connect to 127.0.0.1:port is refused (or reset as it is made: a
    probe that reached the queue of a listener closing under it; nothing was sent).
    A SYN that a stopping lrproxy drops (workers.stop_queueing) is sent again a second
    later, and refused then: the timeout leaves room for that; past it, False."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3.5):
            return False
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except TimeoutError:
        return False


def wait_for(pred: Callable[[], T], timeout: float, what: str, step: float = 0.02) -> T:
    """Poll `pred` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def chat_request_bytes(body: bytes | None = None) -> bytes:
    """A whole chat request (`body`, else a short one), as on the wire, with
    `Connection: close`."""
    if body is None:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: lrproxy\r\n"
            b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def queued_requests(port: int, n: int) -> list[socket.socket]:
    """`n` connections to 127.0.0.1:port, each with a whole chat request written on it
    (`Connection: close`); with the proxy stopped (SIGSTOP), the kernel queues them."""
    req = chat_request_bytes()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=15)
        s.sendall(req)
        socks.append(s)
    return socks


def status_lines(socks: list[socket.socket]) -> list[bytes]:
    """Each connection's answer's status line, read to its end and closed: b"reset" for a
    connection reset, b"" for one closed without an answer."""
    out = []
    for s in socks:
        with s:
            got = b""
            try:
                while data := s.recv(65536):
                    got += data
            except ConnectionResetError:
                got = b"reset"
            out.append(got.split(b"\r\n", 1)[0])
    return out


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def config_toml(sim_url: str, port: int, *, intensity: float = 100.0,
                grace: float | None = None, extra_server: str = "", auto: bool = True) -> str:
    """One region, one upstream (the simulator), one client key by SHA-256; the model in
    [auto] unless `auto=False` (lrproxy then warns that lowrouter/auto answers 404)."""
    sha = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    server = f'listen = "127.0.0.1:{port}"\n'
    if grace is not None:
        server += f"shutdown_grace_s = {grace}\n"
    return f"""\
[server]
{server}{extra_server}
[timeouts]
connect = 2
first_byte = 20
idle = 20

[auth]
keys = [{{ name = "ops", sha256 = "{sha}" }}]

[regions.r1]
grid_intensity_g_per_kwh = {intensity}
pue = 1.0

[models."{MODEL}"]
energy_wh_per_1k_prompt_tokens = 0.02
energy_wh_per_1k_completion_tokens = 0.3

[[upstreams]]
name = "sim"
region = "r1"
base_url = "{sim_url}"
models = {{ "{MODEL}" = "gpt-4o-mini" }}
""" + (f'\n[auto]\nmodels = ["{MODEL}"]\n' if auto else "")


# A config that parses as TOML but fails validation on exactly one key.
BROKEN_KEY = "regions.r1.grid_intensity_g_per_kwh"


def broken_toml(sim_url: str, port: int) -> str:
    return config_toml(sim_url, port).replace(
        "grid_intensity_g_per_kwh = 100.0", 'grid_intensity_g_per_kwh = "lots"')


class SimThread:
    """A SimUpstream serving from its own event loop in a daemon thread."""

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("models", ("gpt-4o-mini",))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sim = SimUpstream(**kw)
        self.base_url: str = self._run(self.sim.start("127.0.0.1", 0))

    def _run(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def chat_requests(self) -> int:
        return sum(1 for r in list(self.sim.requests) if r.path.endswith("/chat/completions"))

    def close(self) -> None:
        try:
            self._run(self.sim.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


class Notify:
    """The NOTIFY_SOCKET end: an AF_UNIX datagram socket, read with bounded waits."""

    def __init__(self, directory: Path) -> None:
        path = directory / "notify.sock"
        self._tmpdir: str | None = None
        if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
            self._tmpdir = tempfile.mkdtemp(prefix="lrp-", dir="/tmp")
            path = Path(self._tmpdir) / "n.sock"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def recv(self, timeout: float) -> dict[str, str] | None:
        """The next datagram as KEY=VALUE pairs, or None after `timeout` seconds."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        msg = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append(msg)
        return msg

    def wait_for(self, key: str, timeout: float, skip: Sequence[str] = ("WATCHDOG",)) -> dict[str, str]:
        """Next datagram carrying `key`; datagrams with only `skip` keys are passed over,
        any other one before it fails the test (so the order is checked)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            msg = self.recv(left) if left > 0 else None
            if msg is None:
                raise AssertionError(f"no {key}=1 within {timeout}s; got {self.messages}")
            if key in msg:
                return msg
            if not set(msg) <= set(skip):
                raise AssertionError(f"expected {key}, got {msg} (all: {self.messages})")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._tmpdir)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
    env.update(extra)
    return env


# Runs in the child before lrproxy: puts the inherited listening socket on fd 3 and sets
# LISTEN_FDS/LISTEN_PID for its own PID, then execs lrproxy in the same process (same PID).
_ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_FDS'] = '1'\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'lrproxy', *sys.argv[2:]])\n"
)


class Proxy:
    """`python -m lrproxy ARGS` as a child process; stdout and stderr go to files."""

    def __init__(self, args: Sequence[str], workdir: Path, *, env: dict[str, str] | None = None,
                 listen_sock: socket.socket | None = None, port: int | None = None,
                 wrap: Sequence[str] = (), stdout: int | None = None) -> None:
        """`wrap`: a command that runs the proxy's command line (tests/sandbox.py);
        `stdout`: a descriptor for its stdout instead of the file."""
        self.port = port
        self.out_path = workdir / "proxy.stdout"
        self.err_path = workdir / "proxy.stderr"
        env = child_env() if env is None else env
        if listen_sock is not None:
            fd = listen_sock.fileno()
            cmd = [sys.executable, "-c", _ACTIVATE, str(fd), *args]
            pass_fds: tuple[int, ...] = (fd,)
        else:
            cmd = [sys.executable, "-m", "lrproxy", *args]
            pass_fds = ()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([*wrap, *cmd], stdin=subprocess.DEVNULL,
                                         stdout=out if stdout is None else stdout, stderr=err,
                                         env=env, pass_fds=pass_fds, cwd=workdir)
        self.pid = self.proc.pid

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lrproxy did not exit within {timeout}s; stderr:\n"
                                 f"{self.stderr}") from None

    def wait_port(self, timeout: float = 15.0) -> int:
        """The API port lrproxy's start line names (its config may say port 0), once it is
        logged; kept as `port`. Every start line (each worker's) names the same one."""
        self.port = self._logged_port(bound_ports, "lrproxy's start line", timeout)
        return self.port

    def metrics_port(self, timeout: float = 15.0) -> int:
        """The /metrics port lrproxy's start line names (`metrics_listen` may say port 0),
        once it is logged: one process's line, or the workers' supervisor's."""
        return self._logged_port(lambda log: [int(m[1]) for m in _METRICS_RE.finditer(log)],
                                 "lrproxy's /metrics line", timeout)

    def _logged_port(self, ports_in: Callable[[str], list[int]], what: str,
                     timeout: float) -> int:
        """The one non-zero port that `ports_in` finds in stderr, once it finds any."""

        def logged() -> list[int]:
            if ports := ports_in(self.stderr):
                return ports
            if self.proc.poll() is not None:
                raise AssertionError(f"lrproxy exited with {self.proc.returncode}:\n{self.stderr}")
            return []

        ports = set(wait_for(logged, timeout, what, step=0.02))
        assert len(ports) == 1 and 0 not in ports, (ports, self.stderr)
        return ports.pop()

    def wait_healthy(self, timeout: float = 15.0) -> None:
        """/healthz answers 200 on `port`; without one, on the port the start line names."""
        if self.port is None:
            self.wait_port(timeout)

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"lrproxy exited with {self.proc.returncode}:\n{self.stderr}")
            try:
                return http_get(self.port, "/healthz", timeout=1)[0] == 200  # type: ignore[arg-type]
            except OSError:
                return False

        wait_for(healthy, timeout, "/healthz", step=0.05)

    def stop(self) -> None:
        """Terminate, wait (bounded), kill if need be; safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


_WRK_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(key)s"
wrk.body = [==[%(body)s]==]
local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) ok = 0; unavailable = 0; other = 0 end
response = function(status, headers, body)
  if status == 200 then ok = ok + 1
  elseif status == 503 then unavailable = unavailable + 1
  else other = other + 1 end
end
done = function(summary, latency, requests)
  local c = {ok = 0, unavailable = 0, other = 0}
  for _, t in ipairs(threads) do
    for k, _ in pairs(c) do c[k] = c[k] + t:get(k) end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"200":%%d,"503":%%d,"other":%%d,"connect":%%d,"read":%%d,"write":%%d,'
    .. '"timeout":%%d}\\n', c.ok, c.unavailable, c.other, e.connect, e.read, e.write,
    e.timeout))
end
"""


def wrk_through_sigterm(port: int, proxy: Proxy, workdir: Path, *, conns: int = 64,
                        seconds: int = 3, sigterm_after: float = 1.0) -> dict[str, int]:
    """`wrk` (its `conns` connections, kept alive, each sending its next chat request as
    soon as an answer ends, and connecting again at once when its connection ends or a
    connect is refused) at 127.0.0.1:port for `seconds`, SIGTERM to `proxy` after
    `sigterm_after`: the steady stream of connections a busy gateway has when it stops.

    The answers by status ("200", "503", "other") and wrk's socket errors: "read" is a
    connection reset or closed before its answer, a request lost; "write" counts the
    connects refused once the proxy stopped listening (wrk meets the refusal as it
    writes), which a client may retry elsewhere."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    lua = workdir / "sigterm.lua"
    lua.write_text(_WRK_LUA % {"key": CLIENT_KEY, "body": body})
    wrk = subprocess.Popen(
        ["wrk", "-t2", f"-c{conns}", f"-d{seconds}", "-s", str(lua),
         f"http://127.0.0.1:{port}/api/v1/chat/completions"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(sigterm_after)
        proxy.signal(signal.SIGTERM)
        out, _ = wrk.communicate(timeout=seconds + 30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    return dict(json.loads(line.removeprefix("WRKJSON ")))
