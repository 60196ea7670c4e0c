"""LowRouter proxy: an OpenAI-compatible LLM gateway with carbon accounting."""

__version__ = "0.1.0"

# Here, not in workers.py, for __main__, which reads them before its (slow) imports.
WORKER_FDS_ENV = "LRPROXY_WORKER_FDS"  # listening fds a worker inherits
# A directory the workers share: each feed file's last good reading (feeds.poll_feeds)
FEED_CACHE_ENV = "LRPROXY_FEED_CACHE"
# A worker told to stop as it starts ends itself this long after, unless it serves
TERM_START_S = 10
# When a worker got SIGTERM as it started (__main__: time.monotonic()), for cli._serve
# to drain at once, within shutdown_grace_s from then
TERM_EARLY: list[float] = []
# When `serve` got SIGHUP as it started (__main__), for cli._serve and the supervisor to
# reload once they serve (or, for --demo, to stop)
HUP_EARLY: list[float] = []
