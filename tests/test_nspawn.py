"""systemd/lrproxy.service and lrproxy.socket under a real systemd (SPEC §6, issue 7).

The build machine has no systemd as PID 1, so this boots the machine's own OS tree in
a container (`systemd-nspawn -b`), on an overlay whose writes stay in the test's
directory, with the unit files installed as the README says: every hardening setting
(DynamicUser=, ProtectSystem=strict, MemoryDenyWriteExecute=, SystemCallFilter=, ...)
in force. Its only target wants lrproxy.socket and lrproxy.service; the container
shares the host's network, so the test talks to the socket on 127.0.0.1 and lrproxy
reaches the test's simulated upstream the same way. Needs root and systemd-nspawn
(Debian's systemd-container, which .ci/run installs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from procs import CLIENT_KEY, MODEL, SimThread, config_toml, free_port, http_get, wait_for
from sandbox import unit_settings

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
NSPAWN = shutil.which("systemd-nspawn")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or (NSPAWN is None and os.environ.get("CI") != "true"),
    reason="needs root and systemd-nspawn (apt-get install systemd-container)")

TARGET = """\
[Unit]
Description=lrproxy's test target: the socket and the service, nothing else
Wants=lrproxy.socket lrproxy.service
"""


# This Python, its packages and this checkout: the container and the service must see
# them (nspawn gives the container a /tmp of its own, the unit a private /tmp and an
# empty /root)
PATHS: list[str] = sorted({os.path.realpath(p) for p in (
    sys.base_prefix, sys.prefix, ROOT, os.path.dirname(os.path.realpath(sys.executable)))})


def _dropin() -> str:
    """The README's change for an install outside /usr/local: the unit's own Exec*= lines
    with this interpreter for /usr/local/bin/lrproxy, and (this Python and checkout may
    live under /root, which ProtectHome=yes hides, or /tmp) ProtectHome=tmpfs with them
    bound in read-only."""
    run = f"{sys.executable} -m lrproxy"
    lines = ["[Service]"]
    for key, values in unit_settings(UNITS / "lrproxy.service").items():
        if key.startswith("Exec") and key != "ExecReload":
            lines.append(f"{key}=")
            lines += [f"{key}={v.replace('/usr/local/bin/lrproxy', run)}" for v in values]
    lines += ["ProtectHome=tmpfs", f"BindReadOnlyPaths={' '.join(PATHS)}"]
    return "\n".join(lines) + "\n"


class Container:
    """The host's OS tree booted under systemd-nspawn, on an overlay in `d`."""

    def __init__(self, d: Path, port: int, config: str) -> None:
        self.d, self.root, self.upper = d, d / "root", d / "upper"
        for sub in ("root", "upper", "work"):
            (d / sub).mkdir()
        etc = self.upper / "etc"
        units = etc / "systemd" / "system"
        (units / "lrproxy.service.d").mkdir(parents=True)
        (units / "lrproxy.service").write_text((UNITS / "lrproxy.service").read_text())
        (units / "lrproxy.socket").write_text(
            (UNITS / "lrproxy.socket").read_text().replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
        (units / "lrproxy.service.d" / "test.conf").write_text(_dropin())
        (units / "lrtest.target").write_text(TARGET)
        (etc / "lrproxy" / "credentials").mkdir(parents=True, mode=0o700)
        (etc / "lrproxy").chmod(0o755)
        (etc / "lrproxy" / "lrproxy.toml").write_text(config)
        (etc / "lrproxy" / "lrproxy.toml").chmod(0o644)
        key = etc / "lrproxy" / "credentials" / "openai-key"
        key.write_text("sk-upstream-in-a-credential")
        key.chmod(0o600)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir=/,upperdir={self.upper},workdir={d / 'work'}", str(self.root)],
                       check=True, capture_output=True, timeout=30)
        self.log = (d / "boot.log").open("wb")
        self.proc = subprocess.Popen(
            [NSPAWN or "systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit",
             "--console=read-only", f"--machine=lrtest{os.getpid()}",
             *(f"--bind-ro={p}" for p in PATHS), "-b", "--", "--unit=lrtest.target"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.leader: int | None = None

    def boot_log(self) -> str:
        return (self.d / "boot.log").read_text(errors="replace")

    def find_leader(self) -> int | None:
        """The container's PID 1, as the host sees it: a child of nspawn's."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if (fields.get("NSpid", "").split()[-1:] == ["1"] and len(fields["NSpid"].split()) > 1
                    and int(fields.get("PPid", "0")) in (self.proc.pid, *self._children())):
                return int(entry)
        return None

    def _children(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in Path(
                f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        return []

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        assert self.leader is not None
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", *cmd],
                              capture_output=True, text=True, timeout=timeout)

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "-u", "lrproxy", "--no-pager", "-o", "cat", *args).stdout

    def close(self) -> None:
        """Power the container off; failing that, kill its PID 1, which ends every
        process in its PID namespace (killing nspawn alone would leave them running)."""
        if self.proc.poll() is None:
            if self.leader is None:
                self.leader = self.find_leader()
            if self.leader is not None:
                with contextlib.suppress(subprocess.SubprocessError):
                    self.run("systemctl", "poweroff", timeout=10)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                if self.leader is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
        self.log.close()
        subprocess.run(["umount", "-l", str(self.root)], capture_output=True, timeout=30)


@pytest.fixture
def container(tmp_path: Path, sim: SimThread) -> Iterator[tuple[Container, int]]:
    if NSPAWN is None:
        pytest.fail("systemd-nspawn is missing; .ci/run installs systemd-container")
    port = free_port()  # fixed: named in lrproxy.socket's ListenStream=, where systemd refuses 0
    c = Container(tmp_path, port, config_toml(sim.base_url, port, intensity=100))
    try:
        c.leader = wait_for(c.find_leader, 30, "the container's systemd")
        yield c, port
    finally:
        c.close()


def _healthy(port: int) -> bool:
    try:
        return http_get(port, "/healthz", timeout=2)[0] == 200
    except OSError:
        return False


def _chat(port: int) -> openai.types.chat.ChatCompletion:
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key=CLIENT_KEY,
                       max_retries=0, timeout=20) as client:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])


def _stream(port: int, **kw: object) -> list[openai.types.chat.ChatCompletionChunk]:
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key=CLIENT_KEY,
                       max_retries=0, timeout=20) as client:
        return list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
            **kw))  # type: ignore[call-overload]


def test_the_units_under_systemd(container: tuple[Container, int], sim: SimThread) -> None:
    """Under systemd 252 with every setting of the unit: the socket starts the service,
    which serves as its dynamic user with no capability, under seccomp, with the
    credential loaded; `systemctl reload` re-reads the config; `systemctl restart`
    finishes a stream in flight while the socket holds new connections (none refused);
    two workers serve and reload the same way; the service stops cleanly."""
    c, port = container
    wait_for(lambda: _healthy(port), 60, "lrproxy behind the container's socket")
    status = c.run("systemctl", "show", "lrproxy.service", "-p", "ActiveState",
                   "-p", "MainPID", "-p", "NRestarts").stdout
    assert "ActiveState=active" in status and "NRestarts=0" in status, (status, c.journal())
    main = int(status.split("MainPID=")[1].split()[0])
    proc = c.run("cat", f"/proc/{main}/status").stdout
    assert "NoNewPrivs:\t1" in proc and "Seccomp:\t2" in proc, proc
    assert "CapEff:\t0000000000000000" in proc, proc
    assert c.run("ps", "-o", "user=", "-p", str(main)).stdout.strip() == "lrproxy"

    r = _chat(port)
    assert r.model_extra["lowrouter"]["eco"]["grid_intensity_g_per_kwh"] == 100  # type: ignore[index]
    chunks = _stream(port)
    assert chunks[-1].choices[0].finish_reason == "stop"

    conf = c.root / "etc" / "lrproxy" / "lrproxy.toml"  # (through the overlay)
    conf.write_text(config_toml(sim.base_url, port, intensity=250))
    assert c.run("systemctl", "reload", "lrproxy").returncode == 0
    assert _chat(port).model_extra["lowrouter"]["eco"]["grid_intensity_g_per_kwh"] == 250  # type: ignore[index]

    def slow_stream(into: list[object]) -> None:
        into.extend(_stream(port, extra_body={"sim": {"chunks": 12, "chunk_delay_s": 0.2}}))

    for workers in (1, 2):
        if workers == 2:
            conf.write_text(config_toml(sim.base_url, port, intensity=250,
                                        extra_server="workers = 2\n"))
        streamed: list[object] = []
        sent = sim.chat_requests()
        slow = threading.Thread(target=slow_stream, args=(streamed,))
        slow.start()
        wait_for(lambda: sim.chat_requests() > sent, 5,  # noqa: B023 (waited for here)
                 "the slow stream under way")
        time.sleep(0.3)
        restart = subprocess.Popen(["nsenter", "-t", str(c.leader), "-a",
                                    "systemctl", "restart", "lrproxy"])
        answers = []
        try:
            end = time.monotonic() + 4
            while time.monotonic() < end:
                answers.append(_chat(port).choices[0].finish_reason)
        finally:  # (waited for, whatever the requests did)
            assert restart.wait(60) == 0
        slow.join(30)
        assert len(streamed) >= 12 and streamed[-1].choices[0].finish_reason == "stop"  # type: ignore[attr-defined]
        assert answers and set(answers) == {"stop"}
        assert "draining 1 request" in c.journal()
        if workers == 2:
            tree = c.run("ps", "-o", "pid=", "--ppid", c.run(
                "systemctl", "show", "-p", "MainPID", "--value", "lrproxy").stdout.strip()).stdout
            assert len(tree.split()) == 2, tree
            assert "2 workers serving" in c.journal()
    assert c.run("systemctl", "reload", "lrproxy").returncode == 0
    assert _chat(port).choices[0].finish_reason == "stop"

    assert c.run("systemctl", "stop", "lrproxy.service").returncode == 0
    log = c.journal()
    assert "Traceback" not in log and "error:" not in log, log
    assert "Deactivated successfully" in c.run(
        "journalctl", "-u", "lrproxy", "--no-pager").stdout


def test_a_bad_config_fails_the_service_once(tmp_path: Path) -> None:
    """A config that `serve` refuses (exit 78) fails the service and is not restarted
    (RestartPreventExitStatus=78), whichever process of the unit refuses it: it was an
    ExecStartPre= check-config, whose 78 systemd does not match against that setting, so
    the service was started again every RestartSec= for ever."""
    if NSPAWN is None:
        pytest.fail("systemd-nspawn is missing; .ci/run installs systemd-container")
    port = free_port()
    c = Container(tmp_path, port, 'server.retries = "two"\n')
    try:
        c.leader = wait_for(c.find_leader, 30, "the container's systemd")

        def state() -> str:
            return c.run("systemctl", "show", "lrproxy.service", "-p", "ActiveState",
                         "-p", "NRestarts", "-p", "ExecMainStatus").stdout

        wait_for(lambda: "ActiveState=failed" in state(), 30, "the service to fail")
        time.sleep(6)  # three RestartSec= (2 s) in which it must not start again
        status = state()
        assert "ActiveState=failed" in status and "NRestarts=0" in status, (status, c.journal())
        assert "ExecMainStatus=78" in status, status
        # at the error priority (`<3>`, which journald takes off the line), not info
        assert "server.retries: expected an integer" in c.journal("-p", "err")
    finally:
        c.close()
