"""Pure limits (issue 5): the per-key token bucket (and its file shared by workers), the retry budget."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrproxy import limits
from lrproxy.limits import RETRY_BUDGET_MIN, SharedBuckets, TokenBucket, bucket_for, retry_allowed


def test_bucket_allows_a_burst_then_paces() -> None:
    """A new bucket allows `burst` requests at once, then one per 1/rate seconds."""
    b = bucket_for(4.0)
    assert [b.take(100.0) for _ in range(4)] == [0.0] * 4
    wait = b.take(100.0)
    assert wait == pytest.approx(0.25)
    assert b.take(100.0 + wait) == 0.0


def test_bucket_refills_no_more_than_burst() -> None:
    """A long idle time refills the bucket to its burst size, never beyond."""
    b = TokenBucket(rate=2.0, burst=3.0)
    for _ in range(3):
        assert b.take(0.0) == 0.0
    taken = [b.take(1000.0) for _ in range(4)]
    assert taken[:3] == [0.0] * 3 and taken[3] > 0


def test_slow_rates_have_a_burst_of_one() -> None:
    """Below one request per second the burst is one request, and the wait is long."""
    b = bucket_for(0.5)
    assert b.take(0.0) == 0.0
    assert b.take(0.0) == pytest.approx(2.0)


@pytest.mark.parametrize(("retries", "inflight", "allowed"), [
    (0, 0, True), (RETRY_BUDGET_MIN - 1, 1, True), (RETRY_BUDGET_MIN, 1, False),
    (19, 100, True), (20, 100, False), (20, 101, True),
])
def test_retry_budget(retries: int, inflight: int, allowed: bool) -> None:
    """Retries in progress stay under max(3, 20 % of requests in flight)."""
    assert retry_allowed(retries, inflight) is allowed


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
        code = ("import sys, time; from lrproxy.limits import SharedBuckets; "
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
    monkeypatch.setattr(limits, "SLOTS", 2)
    t = SharedBuckets.create(str(tmp_path / "buckets"))
    try:
        kinds = [type(t.bucket(f"k{i}", 1.0)) for i in range(3)]
        assert kinds == [limits.SharedBucket, limits.SharedBucket, TokenBucket]
        assert type(t.bucket("k0", 1.0)) is limits.SharedBucket  # its slot is kept
    finally:
        t.close()


@pytest.mark.parametrize(("wait", "header"), [(0.2, "1"), (2.5, "3"), (86400.0, "86400"),
                                              (1e300, "86400"), (float("inf"), "86400")])
def test_retry_after_is_whole_seconds_up_to_a_day(wait: float, header: str) -> None:
    """A refusal's Retry-After: whole seconds rounded up, at least 1, at most a day
    (a slow key's bucket, or any wait, never gives a header hundreds of digits long)."""
    from lrproxy.errors import RateLimited

    assert RateLimited("x", retry_after=wait).headers() == {"Retry-After": header}


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
