"""The pure core does no I/O (STYLE convention 1): checked on the modules' source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lrproxy"
CORE = ("config", "eco", "routing", "sse", "errors", "limits")
FORBIDDEN = {"aiohttp", "asyncio", "socket", "prometheus_client"}


def imported_modules(source: str) -> set[str]:
    """Every module an `import` or `from … import` anywhere in the source names, absolute form."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (("lrproxy." * (node.level > 0)) + (node.module or "")).rstrip(".")
            found.add(base)
            # `from lrproxy import eco` imports the module lrproxy.eco
            found.update(f"{base}.{alias.name}" for alias in node.names if base == "lrproxy")
    return found


def test_import_scanner_sees_nested_and_from_imports() -> None:
    """The scanner finds imports inside functions, `from` imports and package-relative ones."""
    src = "import os\nfrom aiohttp import web\ndef f():\n    import socket.x\nfrom . import app\n"
    assert {"os", "aiohttp", "socket.x", "lrproxy", "lrproxy.app"} <= imported_modules(src)


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io(module: str) -> None:
    """A core module imports none of aiohttp, asyncio, socket, prometheus_client."""
    mods = imported_modules((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    assert {m for m in mods if m.split(".")[0] in FORBIDDEN} == set()


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_only_core_siblings(module: str) -> None:
    """A core module imports no shell module of lrproxy, which would bring the I/O in with it."""
    mods = imported_modules((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    ours = {m.split(".")[1] for m in mods if m.startswith("lrproxy.")}
    assert ours <= set(CORE)
