"""The OpenAI SDK snippets of the client documentation run unchanged against `lrproxy serve --demo`.

`tests/data/CLIENT-DOCS.md` is a copy of the LowRouter client documentation. Each ```python
block runs in its own interpreter with only the hosted base URL swapped for the demo's;
a block that uses names an earlier block defines (its `client`, its `import os`) gets that
block in front of it, as a reader running the page top to bottom would have it.
"""

from __future__ import annotations

import ast
import builtins
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import attrs
import pytest
from procs import bound_ports

from lrproxy.simupstream import _VOCAB

DOCS = Path(__file__).resolve().parent / "data" / "CLIENT-DOCS.md"
HOSTED_BASE_URL = "https://lowrouter.ai/api/v1"
MARK = "=== snippet output ==="
START_TIMEOUT_S = 20.0
SNIPPET_TIMEOUT_S = 60.0
# A string that finds each python block of the docs, in the docs' order.
NEEDLES = ("client = OpenAI(", "stream=True", "model_extra", "extra_body=", "def make_client",
           "AsyncOpenAI")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", DOCS.read_text(encoding="utf-8"), re.S | re.M)


def block_with(needle: str) -> int:
    """Index of the one python block containing `needle`."""
    found = [i for i, b in enumerate(python_blocks()) if needle in b]
    assert len(found) == 1, (needle, found)
    return found[0]


def bound_and_free(code: str) -> tuple[set[str], set[str]]:
    """Names a block binds, and names it uses without binding them (builtins aside)."""
    bound: set[str] = set()
    used: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return bound, used - bound - set(dir(builtins))


def program(index: int, extra: str = "") -> str:
    """Block `index` as a program, after the nearest earlier block defining what it uses.

    Later blocks of the docs continue the first one (its `client`, its `import os`), as a
    reader would run them one after the other.
    """
    blocks = python_blocks()
    code = blocks[index]
    prefix = ""
    _, free = bound_and_free(code)
    if free:
        earlier = [b for b in blocks[:index] if free <= bound_and_free(b)[0]]
        assert earlier, f"block {index} uses {sorted(free)}, which no earlier block defines"
        prefix = earlier[-1]
        assert not bound_and_free(prefix)[1], "the prefix block must stand alone"
    return f"{prefix}\nprint({MARK!r})\n{code}{extra}"


@attrs.define
class Demo:
    proc: subprocess.Popen[str]
    base_url: str
    api_key: str
    port: int

    def run_all(self, sources: dict[str, str]) -> dict[str, subprocess.CompletedProcess[str]]:
        """Run snippets, each as `python -c` and all at once, the hosted base URL swapped."""
        env = dict(os.environ)
        env["LOWROUTER_API_KEY"] = self.api_key
        env["LOWROUTER_BASE_URL"] = self.base_url
        env["NO_PROXY"] = ",".join(filter(None, ["127.0.0.1", env.get("NO_PROXY")]))
        procs = {
            name: subprocess.Popen(
                [sys.executable, "-c", src.replace(HOSTED_BASE_URL, self.base_url)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for name, src in sources.items()
        }
        results = {}
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=SNIPPET_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return results


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Keep reading the server's stdout (access lines) so the pipe never fills."""
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """`lrproxy serve --demo` on port 0 (`port`: the one its start line names); stopped
    with SIGTERM, which must exit 0."""
    script = Path(sys.executable).with_name("lrproxy")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lrproxy"]
    stderr_path = tmp_path_factory.mktemp("demo") / "stderr.log"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [*cmd, "serve", "--demo", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    pump.start()
    found: dict[str, str] = {}
    try:
        while len(found) < 2:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                pytest.fail("the demo printed no LOWROUTER_* lines in time")
            if line is None:
                pytest.fail(f"the demo exited early: {stderr_path.read_text()}")
            name, sep, value = line.strip().partition("=")
            if sep and name in ("LOWROUTER_BASE_URL", "LOWROUTER_API_KEY"):
                found[name] = value
        [port] = bound_ports(stderr_path.read_text())  # (logged before those lines)
        assert port != 0
        yield Demo(proc, found["LOWROUTER_BASE_URL"], found["LOWROUTER_API_KEY"], port)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            pump.join(5)
            proc.stdout.close()
    assert rc == 0, stderr_path.read_text()


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    """What the snippet itself printed (after the marker); the run must have exited 0."""
    assert result.returncode == 0, result.stderr
    assert MARK in result.stdout, result.stdout
    return result.stdout.split(MARK + "\n", 1)[1]


def test_demo_stops_cleanly_on_sighup(tmp_path: Path) -> None:
    """SIGHUP to the demo (its terminal closed) ends it as SIGTERM does, with a line
    that says why and exit 0: not the signal's default, which ended it without a word,
    nor serving on with its key shown only on the closed terminal."""
    script = Path(sys.executable).with_name("lrproxy")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lrproxy"]
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:  # read for its start line while it runs
        proc = subprocess.Popen([*cmd, "serve", "--demo", "--listen", "127.0.0.1:0"],
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        end = time.monotonic() + START_TIMEOUT_S
        while not (ports := bound_ports(stderr_path.read_text())):
            assert time.monotonic() < end and proc.poll() is None, "the demo did not start"
            time.sleep(0.05)
        [port] = ports
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < end and proc.poll() is None, "the demo did not start"
                time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)
        proc.wait(15)
        err = stderr_path.read_text()
        assert proc.returncode == 0, err
        assert "SIGHUP: --demo reads no config file to reload; stopping" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_demo_whose_stdout_has_no_reader_says_so_and_exits(tmp_path: Path) -> None:
    """The demo's two variables are all it is good for: with a stdout nobody reads (the
    pipe's reader gone), it says so in one line and exits 1, closing what it opened,
    not a BrokenPipeError traceback and an "Unclosed client session" after it."""
    script = Path(sys.executable).with_name("lrproxy")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lrproxy"]
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([*cmd, "serve", "--demo", "--listen", "127.0.0.1:0"],
                              stdout=w, stderr=subprocess.PIPE, text=True,
                              timeout=START_TIMEOUT_S)
    finally:
        os.close(w)
    assert proc.returncode == 1, proc.stderr
    assert "--demo: cannot print LOWROUTER_BASE_URL and LOWROUTER_API_KEY on stdout" in proc.stderr
    assert "Traceback" not in proc.stderr and "Unclosed" not in proc.stderr, proc.stderr


def test_demo_prints_where_it_listens(demo: Demo) -> None:
    """The demo prints its base URL (the address --listen bound, /api/v1) and a client key:
    the port its start line names, and the one it answers on."""
    assert demo.base_url == f"http://127.0.0.1:{demo.port}/api/v1"
    with urllib.request.urlopen(demo.base_url.removesuffix("/api/v1") + "/healthz",
                                timeout=5) as r:
        assert r.status == 200
    assert demo.api_key and " " not in demo.api_key


def test_docs_have_the_known_python_blocks() -> None:
    """Every python block of the docs is one of the snippets these tests run."""
    indices = sorted(block_with(n) for n in NEEDLES)
    assert indices == list(range(len(python_blocks())))


# Extra lines after a snippet, to check what it did (the snippet itself stays unchanged).
_PRINT_ROUTE = 'print(r.model_extra["lowrouter"]["route"]["region"], ' \
    'r.model_extra["lowrouter"]["route"]["pinned"])\n'
EXTRA = {
    "extra_body=": "\nr = response\n" + _PRINT_ROUTE,
    "def make_client": "".join(
        f'\nr = make_client({arg}).chat.completions.create(model="openai/gpt-4o-mini", '
        f'messages=[{{"role": "user", "content": "hi"}}])\n' + _PRINT_ROUTE
        for arg in ("", '"us-east"')
    ),
}


@pytest.fixture(scope="module")
def outputs(demo: Demo) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every snippet run once against the demo, keyed by the needle that finds it."""
    return demo.run_all({n: program(block_with(n), EXTRA.get(n, "")) for n in NEEDLES})


def _is_the_demos_answer(out: str) -> None:
    """`out` is what print() makes of the demo upstreams' answer: eight words of the
    simulator's vocabulary, each followed by a space (not None, nor an empty line)."""
    words = out.split()
    assert len(words) == 8 and set(words) <= set(_VOCAB), out
    assert out == "".join(w + " " for w in words) + "\n", out


def test_non_streaming_snippet(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """The first snippet prints the completion's text."""
    _is_the_demos_answer(output_of(outputs["client = OpenAI("]))


def test_streaming_snippet(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """The streaming snippet (reusing the first block's client) prints the streamed words."""
    out = output_of(outputs["stream=True"])
    words = out.split()
    assert words and all(w.isalpha() for w in words), out
    assert not out.endswith("\n")  # printed chunk by chunk with end=""


def test_eco_snippet(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """The eco snippet prints carbon per 1k tokens and its accuracy (static intensity)."""
    out = output_of(outputs["model_extra"])
    m = re.fullmatch(r"(\d+\.\d{3}) gCO2e/1k tokens \(estimated\)\n", out)
    assert m, out
    assert float(m[1]) > 0


def test_extra_body_region_snippet(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """The extra_body snippet's request is pinned to eu-west."""
    assert output_of(outputs["extra_body="]) == "eu-west True\n"


def test_make_client_snippet(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """make_client's default header pins its requests to the region it was given."""
    assert output_of(outputs["def make_client"]) == "eu-west True\nus-east True\n"


def test_async_snippet(outputs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    """The AsyncOpenAI snippet prints the completion's text."""
    _is_the_demos_answer(output_of(outputs["AsyncOpenAI"]))
