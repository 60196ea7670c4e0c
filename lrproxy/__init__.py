"""LowRouter proxy: an OpenAI-compatible LLM gateway with carbon accounting."""

__version__ = "0.1.0"

# When a worker got SIGTERM as it started (__main__: time.monotonic()), for cli._serve
# to drain at once, within shutdown_grace_s from then
TERM_EARLY: list[float] = []
