"""Request limits as pure state machines (issue 5): per-key token buckets, the retry budget.

They take `now` rather than reading a clock, so tests drive them exactly.
"""

from __future__ import annotations

from typing import Final

import attrs

RETRY_BUDGET_RATIO: Final = 0.2  # retries in progress ≤ 20 % of requests in flight …
RETRY_BUDGET_MIN: Final = 3  # … but always at least 3 (Envoy's retry budget defaults)


@attrs.define
class TokenBucket:
    """`rate` requests per second on average, bursts of up to `burst`."""

    rate: float
    burst: float
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> float:
        """Take one token: 0.0 if allowed, else the seconds until one is available."""
        if self.tokens < 0:  # a new bucket starts full
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def bucket_for(rate_per_s: float) -> TokenBucket:
    return TokenBucket(rate=rate_per_s, burst=max(1.0, rate_per_s))


def retry_allowed(retries_in_progress: int, requests_in_flight: int) -> bool:
    """The retry budget: a failing region is not hammered by retries of every request."""
    return retries_in_progress < max(RETRY_BUDGET_MIN, RETRY_BUDGET_RATIO * requests_in_flight)
