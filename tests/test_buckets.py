"""The workers' shared token buckets (buckets.py): one rate per key across processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrproxy import buckets
from lrproxy.buckets import SharedBuckets
from lrproxy.limits import TokenBucket


def test_shared_buckets_hold_one_rate_for_every_process(tmp_path: Path) -> None:
    """Two maps of one file (two workers) take from one bucket per key: a burst of 2
    in all, not 2 each; another key has its own; another process too takes from it."""
    path = str(tmp_path / "buckets")
    a, b = SharedBuckets.create(path), SharedBuckets(path)
    try:
        ka, kb = a.bucket("team-a", 2.0), b.bucket("team-a", 2.0)
        other = b.bucket("team-b", 2.0)
        now = time.monotonic()
        assert [ka.take(now), kb.take(now)] == [0.0, 0.0]
        assert kb.take(now) == pytest.approx(0.5)
        assert ka.take(now) == pytest.approx(0.5)
        assert other.take(now) == 0.0
        assert kb.take(now + 0.5) == 0.0  # a token later, for either
        assert ka.take(now + 0.5) > 0
        # a process of its own: its bucket is empty too
        code = ("import sys, time; from lrproxy.buckets import SharedBuckets; "
                "print(SharedBuckets(sys.argv[1]).bucket('team-a', 2.0).take(time.monotonic()))")
        out = subprocess.run([sys.executable, "-c", code, path], capture_output=True,
                             text=True, check=True, timeout=30).stdout
        assert 0 < float(out) <= 0.5
    finally:
        a.close()
        b.close()


def test_shared_buckets_a_full_table_falls_back_to_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With every slot taken, a new key's bucket is its process's own (and says so)."""
    monkeypatch.setattr(buckets, "SLOTS", 2)
    t = SharedBuckets.create(str(tmp_path / "buckets"))
    try:
        kinds = [type(t.bucket(f"k{i}", 1.0)) for i in range(3)]
        assert kinds == [buckets.SharedBucket, buckets.SharedBucket, TokenBucket]
        assert type(t.bucket("k0", 1.0)) is buckets.SharedBucket  # its slot is kept
    finally:
        t.close()


def test_a_worker_does_not_make_a_bucket_file_of_its_own(tmp_path: Path) -> None:
    """The supervisor makes the file (0600); a worker only opens it: when it has gone,
    FileNotFoundError (the worker then keeps its own buckets, and says so), never a new
    file that no other worker shares."""
    path = tmp_path / "buckets"
    with pytest.raises(FileNotFoundError):
        SharedBuckets(str(path))
    assert not path.exists()
    SharedBuckets.create(str(path)).close()
    assert path.stat().st_mode & 0o777 == 0o600
