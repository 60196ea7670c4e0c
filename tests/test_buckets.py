"""The workers' shared token buckets (buckets.py): one rate per key across processes."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_config import base_toml, write

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


def _hammer(path: str, n: int, q: mp.Queue) -> None:  # type: ignore[type-arg]
    b = SharedBuckets(path).bucket("k", 1.0)
    granted = 0
    for _ in range(n):
        granted += b.take(time.monotonic()) == 0.0
    q.put(granted)


def test_takes_from_many_processes_at_once_grant_no_more_than_the_rate(tmp_path: Path) -> None:
    """Four processes take from one key's bucket (1/s, burst 1) as fast as they can:
    in all, no more tokens than burst + rate x elapsed. Without the lock, reads and
    writes of the slot interleave and tokens are granted twice."""
    path = str(tmp_path / "buckets")
    SharedBuckets.create(path).close()
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    t0 = time.monotonic()
    ps = [ctx.Process(target=_hammer, args=(path, 20000, q)) for _ in range(4)]
    for p in ps:
        p.start()
    total = sum(q.get(timeout=60) for _ in ps)
    for p in ps:
        p.join(10)
    assert total <= 1 + 1.0 * (time.monotonic() - t0) + 1, total


def test_a_keys_own_bucket_keeps_its_tokens_over_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the shared table full, a key's bucket is its process's own; a reload
    keeps its tokens (as for any key), rather than asking the full table again and
    starting a full bucket."""
    from prometheus_client import CollectorRegistry

    from lrproxy.app import RUNTIME, make_app
    from lrproxy.config import read_config, resolve_secrets

    monkeypatch.setattr(buckets, "SLOTS", 1)
    path = str(tmp_path / "buckets")
    SharedBuckets.create(path).close()
    monkeypatch.setenv(buckets.SHARED_BUCKETS_ENV, path)
    keys = ", ".join(f'{{ name = "{n}", sha256 = "{n * 64}", rate_per_s = 0.01 }}'
                     for n in "ab")
    text = base_toml(tail=f"[auth]\nkeys = [{keys}]")
    cfg = read_config(write(tmp_path, text))
    sec = resolve_secrets(cfg, {})
    app = make_app(cfg, sec, registry=CollectorRegistry())
    rt = app[RUNTIME]
    own = [n for n, b in rt.buckets.items() if not isinstance(b, buckets.SharedBucket)]
    assert len(own) == 1
    now = time.monotonic()
    assert rt.buckets[own[0]].take(now) == 0.0  # its one token
    rt.install(cfg, sec)  # a reload
    assert rt.buckets[own[0]].take(now) > 0  # still spent


def test_a_new_keys_shared_bucket_starts_full_whatever_the_clock(tmp_path: Path) -> None:
    """A key's first take is allowed (a new bucket starts full) even where
    CLOCK_MONOTONIC is small (a host up for seconds) and the rate slow: the slot's
    "full at first take" mark, not tokens earned since the clock's zero."""
    t = SharedBuckets.create(str(tmp_path / "buckets"))
    try:
        b = t.bucket("k", 0.01)  # a token per 100 s
        assert b.take(5.0) == 0.0
        assert b.take(5.0) > 0
    finally:
        t.close()
