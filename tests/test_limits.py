"""Pure limits (issue 5): the per-key token bucket and the retry budget."""

from __future__ import annotations

import pytest

from lrproxy.limits import TokenBucket, bucket_for, retry_allowed


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
    (0, 0, True), (2, 1, True), (3, 1, False),  # the README's floor of 3
    (19, 100, True), (20, 100, False), (20, 101, True),
])
def test_retry_budget(retries: int, inflight: int, allowed: bool) -> None:
    """Retries in progress stay under max(3, 20 % of requests in flight)."""
    assert retry_allowed(retries, inflight) is allowed


@pytest.mark.parametrize(("wait", "header"), [(0.2, "1"), (2.5, "3"), (86400.0, "86400"),
                                              (1e300, "86400"), (float("inf"), "86400")])
def test_retry_after_is_whole_seconds_up_to_a_day(wait: float, header: str) -> None:
    """A refusal's Retry-After: whole seconds rounded up, at least 1, at most a day
    (a slow key's bucket, or any wait, never gives a header hundreds of digits long)."""
    from lrproxy.errors import RateLimited

    assert RateLimited("x", retry_after=wait).headers() == {"Retry-After": header}
