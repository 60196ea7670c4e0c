"""The repository's own tooling runs as part of the test command (STYLE §15)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_ruff_is_clean() -> None:
    """ruff finds nothing in the package, the tests and the benchmark."""
    ruff = shutil.which("ruff")
    assert ruff, "ruff is part of the test extra"
    paths = [p for p in ("lrproxy", "tests", "bench") if (ROOT / p).is_dir()]
    r = subprocess.run([ruff, "check", *paths], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_mypy_strict_is_clean() -> None:
    """mypy --strict (settings in setup.cfg) finds nothing in lrproxy/."""
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
