"""systemd integration (SPEC §6, issue 7): the unit files through systemd-analyze, sd_notify
read off a real datagram socket, and socket activation, all against `python -m lrproxy`."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from procs import (
    BROKEN_KEY,
    CLIENT_KEY,
    MODEL,
    Notify,
    Proxy,
    SimThread,
    bound_ports,
    broken_toml,
    child_env,
    config_toml,
    free_port,
    http_get,
    listen_backlogs,
    port_refuses,
    somaxconn,
    wait_for,
)
from sandbox import unit_settings

from lrproxy.protocol import api_urls
from lrproxy.sdnotify import Notifier, activated_sockets

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
_EXPOSURE_RE = re.compile(r"Overall exposure level for lrproxy\.service:\s*([0-9]+(?:\.[0-9]+)?)")


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("systemd-analyze is missing; .ci/run installs the systemd package")
        pytest.skip("systemd-analyze is not installed")
    return path


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """Copies of the unit files whose ExecStart= names the lrproxy really installed."""
    exe = shutil.which("lrproxy")
    assert exe, "the lrproxy console script is installed with the package"
    for name in ("lrproxy.service", "lrproxy.socket"):
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/lrproxy", exe))
    return tmp_path


def _service() -> dict[str, list[str]]:
    """The service file as key -> every value given (systemd keys may repeat)."""
    return unit_settings(UNITS / "lrproxy.service")


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _intensity(port: int) -> float:
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key=CLIENT_KEY,
                       max_retries=0, timeout=10) as client:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].finish_reason == "stop"
    return float(r.model_extra["lowrouter"]["eco"]["grid_intensity_g_per_kwh"])  # type: ignore[index]


# ---------------------------------------------------------------------------------------
# the unit files


def test_unit_files_verify_clean(systemd_analyze: str, units: Path) -> None:
    """`systemd-analyze verify` on lrproxy.service and lrproxy.socket says nothing and exits 0."""
    r = subprocess.run([systemd_analyze, "verify", str(units / "lrproxy.service"),
                        str(units / "lrproxy.socket")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).strip() == ""


def test_unit_security_exposure_ok(systemd_analyze: str, units: Path) -> None:
    """`systemd-analyze security --offline=true` rates the service's exposure at 2.0 or less."""
    r = subprocess.run([systemd_analyze, "security", "--offline=true", "--no-pager",
                        str(units / "lrproxy.service")], capture_output=True, text=True, timeout=60)
    m = _EXPOSURE_RE.search(r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_example_config_needs_only_what_the_unit_provides() -> None:
    """etc/lrproxy.toml, installed as the README says, starts under the unit as it is: every
    relative key file it names is a LoadCredential= of the unit, and it needs no variable
    (the unit's EnvironmentFile= is optional and the README does not create it)."""
    from lrproxy.config import read_config

    cfg = read_config(ROOT / "etc" / "lrproxy.toml")
    loaded = {v.split(":", 1)[0] for v in _service()["LoadCredential"]}
    files = [f for f in [*(u.api_key_file for u in cfg.upstreams), *(k.key_file for k in cfg.keys)]
             if f is not None and not f.startswith("/")]
    assert files and set(files) <= loaded, (files, loaded)
    assert not [u.name for u in cfg.upstreams if u.api_key_env]
    assert not [k.name for k in cfg.keys if k.key_env]


def test_unit_settings() -> None:
    """The service is Type=notify, reloads by SIGHUP, does not retry exit 78, is hardened."""
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / "lrproxy.service")
    assert cp.has_section("Unit") and cp.has_section("Install")
    svc = _service()
    one = {k: v[-1] for k, v in svc.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] in ("main", "all")
    assert "-HUP" in one["ExecReload"] and "$MAINPID" in one["ExecReload"]
    assert "serve --config /etc/lrproxy/" in one["ExecStart"]
    assert one["ExecStart"].split()[0] == "/usr/local/bin/lrproxy"
    assert one["Restart"] in ("on-failure", "always")
    assert "78" in one["RestartPreventExitStatus"].split()
    # RestartPreventExitStatus= sees only the main process: a control process (an
    # ExecStartPre= check-config) exiting 78 is restarted every RestartSec= for ever.
    assert not [v for k in ("ExecStartPre", "ExecStartPost", "ExecCondition")
                for v in svc.get(k, []) if "check-config" in v], svc.get("ExecStartPre")
    assert any(v.startswith("/etc/lrproxy/") or ":/etc/lrproxy/" in v for v in svc["LoadCredential"])
    assert one["DynamicUser"] == "yes"
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict"
    assert one["CapabilityBoundingSet"] == ""
    assert set(one["RestrictAddressFamilies"].split()) <= {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in svc["SystemCallFilter"]
    # TimeoutStopSec leaves room for the default 30 s drain.
    assert int(one["TimeoutStopSec"].rstrip("s")) > 30
    sock = configparser.ConfigParser(strict=False, interpolation=None)
    sock.read(UNITS / "lrproxy.socket")
    assert sock.get("Socket", "ListenStream")


# ---------------------------------------------------------------------------------------
# sd_notify


def test_sd_notify_ready_reload_stopping(tmp_path: Path, sim: SimThread) -> None:
    """READY=1 when serving; RELOADING=1+MONOTONIC_USEC, READY=1 on any SIGHUP; STOPPING=1 on SIGTERM."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, intensity=100))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path,
                  env=child_env(NOTIFY_SOCKET=str(notify.path)))
    try:
        ready = notify.wait_for("READY", 20)
        assert ready["READY"] == "1"
        port = proxy.wait_port()  # logged before READY=1: no wait
        assert http_get(port, "/healthz")[0] == 200  # no retry: READY=1 means serving
        assert _intensity(port) == 100

        cfg.write_text(config_toml(sim.base_url, 0, intensity=250))
        before = _monotonic_usec()
        proxy.signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", 5)
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= _monotonic_usec()
        assert notify.wait_for("READY", 5)["READY"] == "1"
        assert _intensity(port) == 250

        cfg.write_text(broken_toml(sim.base_url, 0))
        proxy.signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING", 5)["MONOTONIC_USEC"].isdigit()
        assert notify.wait_for("READY", 5)["READY"] == "1"  # after a refused reload too
        refused = [ln for ln in proxy.stderr.splitlines() if BROKEN_KEY in ln]
        assert len(refused) == 1, proxy.stderr
        assert "lrproxy.toml" in refused[0] and '"level":"error"' in refused[0]
        assert _intensity(port) == 250  # the old config keeps serving

        proxy.signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING", 5)["STOPPING"] == "1"
        assert proxy.wait(10) == 0
        assert all("WATCHDOG" not in m for m in notify.messages)  # not asked for
    finally:
        proxy.stop()
        notify.close()


def test_sd_notify_watchdog(tmp_path: Path, sim: SimThread) -> None:
    """With WATCHDOG_USEC=200000 WATCHDOG=1 arrives about every 0.1 s."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path,
                  env=child_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000"))
    try:
        notify.wait_for("READY", 20)
        start = len(notify.messages)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            notify.recv(0.5)
        pings = [m for m in notify.messages[start:] if m.get("WATCHDOG") == "1"]
        assert 5 <= len(pings) <= 15, notify.messages
        # the gaps stay under WATCHDOG_USEC, so systemd would never kill it
        proxy.signal(signal.SIGTERM)
        notify.wait_for("STOPPING", 5)
        assert proxy.wait(10) == 0
    finally:
        proxy.stop()
        notify.close()


def test_a_notify_socket_that_is_gone_is_warned_about_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """NOTIFY_SOCKET naming a socket no one listens on (a stale one): each send fails,
    as WATCHDOG=1 does every few seconds; the warning comes once a minute, not each time."""
    from lrproxy.sdnotify import Notifier

    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level("WARNING", logger="lrproxy"):
        for _ in range(5):
            n.send("WATCHDOG=1")
    n.close()
    assert [r.getMessage() for r in caplog.records].count(
        "sd_notify failed: No such file or directory") == 1


def test_without_notify_socket_nothing_breaks(tmp_path: Path, sim: SimThread) -> None:
    """Without NOTIFY_SOCKET (WATCHDOG_USEC set all the same) serving, reload and stop work."""
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, 0, intensity=100))
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path,
                  env=child_env(WATCHDOG_USEC="200000"))
    try:
        port = proxy.wait_port()
        proxy.wait_healthy()
        assert _intensity(port) == 100
        cfg.write_text(config_toml(sim.base_url, 0, intensity=300))
        proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "config reloaded" not in proxy.stderr and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _intensity(port) == 300
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(10) == 0
        assert "sd_notify" not in proxy.stderr
        assert '"level":"error"' not in proxy.stderr and '"level":"warning"' not in proxy.stderr
    finally:
        proxy.stop()


def test_notifier_datagrams_in_process(tmp_path: Path) -> None:
    """Notifier: silent without NOTIFY_SOCKET, `@` abstract sockets, WATCHDOG_PID respected."""
    off = Notifier({})
    assert not off.enabled and off.watchdog_s is None
    off.ready()  # a no-op, no error
    assert Notifier({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 0.1

    name = f"lrproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(b"\0" + name.encode())
        rx.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        try:
            n.ready("up")
            assert rx.recv(4096).decode().splitlines() == ["READY=1", "STATUS=up"]
            n.stopping()
            assert rx.recv(4096) == b"STOPPING=1"
        finally:
            n.close()


# ---------------------------------------------------------------------------------------
# the unit's seccomp filters (tests/sandbox.py): MemoryDenyWriteExecute=,
# SystemCallFilter=, RestrictAddressFamilies= as systemd 252 loads them

SANDBOX = [sys.executable, str(ROOT / "tests" / "sandbox.py"), str(UNITS / "lrproxy.service"),
           "--"]

_PROBE = """
import errno, mmap, os, socket
def refused(call):
    try:
        call()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "allowed"
print(refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)),
      refused(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()),
      refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()),
      refused(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
      refused(lambda: socket.sethostname(os.uname().nodename)),
      refused(lambda: socket.socket(socket.AF_INET6).close()),
      refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC).close()))
"""


def test_sandbox_refuses_what_the_unit_forbids(systemd_analyze: str) -> None:
    """The sandbox is in force, in the command it runs: a writable and executable mapping
    (MemoryDenyWriteExecute=), a packet or netlink socket (RestrictAddressFamilies=),
    sched_setaffinity (~@resources) and sethostname (outside @system-service) are
    refused with the unit's errors; an IPv6 socket and an executable read-only mapping
    are not. Without it, the same probe's first answer differs (it cannot pass vacuously)."""
    boxed = subprocess.run([*SANDBOX, sys.executable, "-c", _PROBE], capture_output=True,
                           text=True, timeout=60, check=True).stdout.split()
    assert boxed == ["EPERM", "EAFNOSUPPORT", "EAFNOSUPPORT", "EPERM", "EPERM",
                     "allowed", "allowed"]
    bare = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=60, check=True).stdout.split()
    assert bare[0] == "allowed" and bare[3] == "allowed"


@pytest.mark.parametrize("workers", [1, 2])
def test_serves_under_the_units_seccomp_filters(
    tmp_path: Path, sim: SimThread, systemd_analyze: str, workers: int,
) -> None:
    """lrproxy, under the unit's system call filter, W^X memory and address families
    (the event loop, orjson, aiohttp's parsers, a rate bucket, the workers' supervisor
    and their prctl): a JSON and a streamed answer through the OpenAI SDK, /metrics,
    a reload and a clean stop, with nothing logged above info."""
    cfg = tmp_path / "lrproxy.toml"
    extra = f'workers = {workers}\nmetrics_listen = "127.0.0.1:0"\n'
    cfg.write_text(config_toml(sim.base_url, 0, intensity=100, extra_server=extra))
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path,
                  env=child_env(NOTIFY_SOCKET=str(notify.path)), wrap=SANDBOX)
    sent = sim.chat_requests()
    try:
        assert notify.wait_for("READY", 30)["READY"] == "1"
        port, mport = proxy.wait_port(), proxy.metrics_port()
        assert _intensity(port) == 100
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key=CLIENT_KEY,
                           max_retries=0, timeout=10) as client:
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))
        assert chunks[-1].choices[0].finish_reason == "stop"
        eco = chunks[-1].model_extra["lowrouter"]["eco"]  # type: ignore[index]
        assert eco["grid_intensity_g_per_kwh"] == 100 and eco["tokens"]["completion"] > 0
        status, body = http_get(mport, "/metrics")
        assert status == 200 and b"lrproxy_tokens_total{" in body

        cfg.write_text(config_toml(sim.base_url, 0, intensity=250, extra_server=extra))
        proxy.signal(signal.SIGHUP)
        notify.wait_for("RELOADING", 10)
        assert notify.wait_for("READY", 20)["READY"] == "1"
        assert _intensity(port) == 250

        proxy.signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING", 10)["STOPPING"] == "1"
        assert proxy.wait(20) == 0
        assert sim.chat_requests() - sent == 3
        for level in ("warning", "error", "critical"):
            assert f'"level":"{level}"' not in proxy.stderr, proxy.stderr
        assert "Traceback" not in proxy.stderr and "Operation not permitted" not in proxy.stderr
    finally:
        proxy.stop()
        notify.close()


# ---------------------------------------------------------------------------------------
# socket activation


@pytest.mark.parametrize("workers", [1, 2])
def test_socket_activation(tmp_path: Path, sim: SimThread, workers: int) -> None:
    """With LISTEN_FDS=1 and a listening socket on fd 3 lrproxy serves on it, not on its
    listen, and its start lines name that socket (the workers' supervisor named the
    config's address). After the stop the socket, systemd's, queues connections for the
    next start as it did before (nothing of the stop's is left on it)."""
    conf_port = free_port()  # fixed: the config names it, and it must be found refused
    cfg = tmp_path / "lrproxy.toml"
    cfg.write_text(config_toml(sim.base_url, conf_port, extra_server=f"workers = {workers}\n"))
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1024)  # as lrproxy.socket's Backlog=
    port = lsock.getsockname()[1]
    notify = Notify(tmp_path)
    proxy = Proxy(["serve", "--config", str(cfg)], tmp_path, listen_sock=lsock, port=port,
                  env=child_env(NOTIFY_SOCKET=notify.path))
    try:  # systemd holds it too
        # what systemctl status shows: the socket it got (it named server.listen)
        assert notify.wait_for("READY", 30)["STATUS"] == (
            "serving on" if workers == 1 else "2 workers serving on") + f" 127.0.0.1:{port}"
        proxy.wait_healthy()
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key=CLIENT_KEY,
                           max_retries=0, timeout=10) as client:
            r = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert r.choices[0].finish_reason == "stop"
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))
            assert chunks[-1].choices[0].finish_reason == "stop"
        assert port_refuses(conf_port)
        if workers > 1:
            wait_for(lambda: "2 workers serving" in proxy.stderr, 15, "both workers")
        # the start lines name the socket it got (each worker's, the supervisor's two)
        assert bound_ports(proxy.stderr) == [port] * (1 if workers == 1 else 4), proxy.stderr
        assert str(conf_port) not in proxy.stderr
        # 1024, the unit's Backlog= (aiohttp listens on it anew: by default with 128)
        assert listen_backlogs(port) == [min(1024, somaxconn())]
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(10) == 0
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            lsock.settimeout(3)
            lsock.accept()[0].close()
    finally:
        proxy.stop()
        notify.close()
        lsock.close()


def test_start_lines_name_each_socket_as_an_operator_writes_it() -> None:
    """The sockets systemd may pass (ListenStream= of an address, an IPv6 one, a path,
    an abstract name), each named once, as in a unit file: an abstract socket was
    Python's bytes repr (unix:b'\\x00name')."""
    assert api_urls([("127.0.0.1", 8080), ("::1", 8081, 0, 0), "/run/lrproxy/api.sock",
                     b"\0lrproxy", ("127.0.0.1", 8080)]) == (
        "http://127.0.0.1:8080/api/v1, http://[::1]:8081/api/v1, "
        "http://unix:/run/lrproxy/api.sock/api/v1, http://unix:@lrproxy/api/v1",
        "127.0.0.1:8080, [::1]:8081, unix:/run/lrproxy/api.sock, unix:@lrproxy")


def test_listen_fds_for_another_pid_are_ignored() -> None:
    """LISTEN_FDS meant for another process (LISTEN_PID differs) is not taken."""
    assert activated_sockets({"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1)}) == []
    assert activated_sockets({"LISTEN_FDS": "1"}) == []
