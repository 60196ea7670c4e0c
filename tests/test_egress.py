"""Corporate egress (SPEC §6): per-upstream forward proxy and CA bundle, and trust_env.

A real forward proxy (Debian's tinyproxy) on loopback carries lrproxy's CONNECT to a
simulated upstream serving HTTPS with a certificate from a CA made in the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import UPSTREAM_KEYS

from lrproxy.simupstream import SimUpstream

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
needs_tinyproxy = pytest.mark.skipif(
    not os.path.exists(TINYPROXY) and os.environ.get("CI") != "true",
    reason="Debian's tinyproxy is not installed (.ci/run installs it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_ca(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost / 127.0.0.1, made with openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=lrproxy test CA", "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "srv.key", "-out", "srv.csr")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "srv.pem")
    return d / "ca.pem", d / "srv.pem", d / "srv.key"


class _TlsSim:
    """A SimUpstream serving HTTPS from a loop of its own."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.sim = SimUpstream(name="eu-west-a", api_key=UPSTREAM_KEYS["eu-west-a"],
                               models=["gpt-4o-mini", "llama-3.1-8b"])
        self.base_url = asyncio.run_coroutine_threadsafe(
            self.sim.start(ssl_context=ctx, url_host="localhost"), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[_TlsSim, Path]]:
    ca, cert, key = _make_ca(tmp_path)
    sim = _TlsSim(cert, key)
    yield sim, ca
    sim.close()


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A tinyproxy on a free loopback port; yields its URL and its log file."""
    if not os.path.exists(TINYPROXY):
        pytest.fail("tinyproxy is missing; .ci/run installs Debian's package")
    port = _free_port()  # fixed: tinyproxy refuses Port 0 ("You MUST set a Port")
    log = tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\nLogFile \"{log}\"\n"
        "LogLevel Connect\nMaxClients 20\nDisableViaHeader Yes\n"
    )
    proc = subprocess.Popen([TINYPROXY, "-d", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("tinyproxy did not start")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def make_stack(tls: Any, tinyproxy: Any, make_stack: Any) -> Any:
    """conftest's make_stack, set up after the TLS simulator and tinyproxy so that its
    stacks close first: lrproxy's pooled TLS connections then end with the close_notify
    exchange while the simulator's loop still runs. Stopping the simulator first left
    its side of such a connection waiting for the peer's close_notify when its loop
    closed: an unclosed transport for the garbage collector (a ResourceWarning in
    whichever later test it happened to run in)."""
    return make_stack


def _pin_eu_west_a(base_url: str, **extra: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        up = d["upstreams"][0]
        assert up["name"] == "eu-west-a"
        up.update(base_url=base_url, **extra)
        d["upstreams"] = [up, *(u for u in d["upstreams"][1:] if u["region"] != "eu-west")]
    return mutate


def _ask(stack: Any) -> Any:
    return stack.client().chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        extra_body={"route": {"region": "eu-west"}},
    )


def _connects(log: Path) -> list[str]:
    """The CONNECT requests tinyproxy served (its log also notes bare connections)."""
    return [line for line in log.read_text(errors="replace").splitlines()
            if "Request" in line and "CONNECT localhost" in line]


@needs_tinyproxy
def test_upstream_through_forward_proxy_with_ca_file(make_stack: Any, tls: Any, tinyproxy: Any) -> None:
    """`proxy` sends the upstream connection through CONNECT; `ca_file` verifies its TLS."""
    sim, ca = tls
    proxy_url, log = tinyproxy
    stack = make_stack(_pin_eu_west_a(sim.base_url, proxy=proxy_url, ca_file=str(ca)))
    r = _ask(stack)
    assert r.model_extra["lowrouter"]["route"]["upstream"] == "eu-west-a"
    assert any(f"localhost:{sim.sim.port}" in line for line in _connects(log))
    got = sim.sim.requests[-1]
    assert got.headers["Authorization"] == f"Bearer {UPSTREAM_KEYS['eu-west-a']}"


@needs_tinyproxy
def test_unknown_ca_is_refused(make_stack: Any, tls: Any, tinyproxy: Any) -> None:
    """Without the test CA the TLS handshake fails: 502, and the upstream saw nothing."""
    sim, _ = tls
    proxy_url, _log = tinyproxy
    stack = make_stack(_pin_eu_west_a(sim.base_url, proxy=proxy_url))
    with pytest.raises(openai.APIStatusError) as e:
        _ask(stack)
    assert e.value.status_code == 502
    assert e.value.body["code"] == "upstream_error"
    assert not sim.sim.requests


@needs_tinyproxy
def test_trust_env_honours_https_proxy(make_stack: Any, tls: Any, tinyproxy: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With server.trust_env, HTTPS_PROXY carries upstream traffic; without it, it is ignored."""
    sim, ca = tls
    proxy_url, log = tinyproxy
    monkeypatch.setenv("HTTPS_PROXY", proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    ignoring = make_stack(_pin_eu_west_a(sim.base_url, ca_file=str(ca)))
    _ask(ignoring)
    assert _connects(log) == []

    def trusting(d: dict[str, Any]) -> None:
        _pin_eu_west_a(sim.base_url, ca_file=str(ca))(d)
        d["server"]["trust_env"] = True

    _ask(make_stack(trusting))
    assert len(_connects(log)) == 1


@pytest.mark.parametrize("how", ["403", "close"])
def test_egress_proxy_refusing_connect_is_a_connect_error(
    make_stack: Any, tls: Any, how: str,
) -> None:
    """An egress proxy that refuses the CONNECT (403: a port it does not allow), or
    closes without an answer, is a connect failure, as a refused connection is: 502,
    outcome `connect_error` (not the `bad_response` of an upstream that answers no HTTP,
    nor the `connection_lost` of an upstream that cut a request), said of the proxy."""
    sim, ca = tls
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def refuse() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                with conn:
                    conn.recv(65536)
                    if how == "403":
                        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=refuse, daemon=True).start()
    try:
        stack = make_stack(_pin_eu_west_a(sim.base_url, proxy=f"http://127.0.0.1:{port}",
                                          ca_file=str(ca)))
        with pytest.raises(openai.APIStatusError) as e:
            _ask(stack)
        assert e.value.status_code == 502
        assert "egress proxy" in e.value.message, e.value.message
        assert stack.metric("lrproxy_upstream_attempts_total", upstream="eu-west-a",
                            outcome="connect_error") >= 1
        for wrong in ("bad_response", "connection_lost"):
            assert stack.metric("lrproxy_upstream_attempts_total", upstream="eu-west-a",
                                outcome=wrong) == 0
        assert not sim.sim.requests
    finally:
        srv.close()


def test_an_upstreams_identity_is_its_urls_key_proxy_and_ca_certificates(tmp_path: Path) -> None:
    """What a reload compares to tell a mended upstream from the same one (Pool.configure):
    a new CA bundle written over the old file is a change, as a new key, URL or proxy
    is; the bundle read again as it was, or a new max_concurrency, is none."""
    from lrproxy.config import Upstream
    from lrproxy.upstream import Target, identity

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ca_a, ca_b = _make_ca(tmp_path / "a")[0], _make_ca(tmp_path / "b")[0]
    bundle = tmp_path / "bundle.pem"

    def target(ca: Path | None = None, key: str = "sk-one", url: str = "https://x/v1",
               proxy: str | None = None, cap: int = 0) -> Target:
        ctx = None
        if ca is not None:
            bundle.write_bytes(ca.read_bytes())
            ctx = ssl.create_default_context(cafile=str(bundle))
        up = Upstream("u", "r", url, {}, max_concurrency=cap, ca_file=str(bundle))
        return Target(up, url + "/chat/completions", url + "/embeddings", f"Bearer {key}",
                      ctx, proxy)

    first = identity(target(ca_a))
    assert identity(target(ca_a)) == first
    assert identity(target(ca_a, cap=3)) == first
    assert identity(target(ca_b)) != first
    assert identity(target()) != first
    assert identity(target(ca_a, key="sk-two")) != first
    assert identity(target(ca_a, url="https://y/v1")) != first
    assert identity(target(ca_a, proxy="http://127.0.0.1:3128")) != first
