"""LowRouter proxy: an OpenAI-compatible LLM gateway with carbon accounting."""

__version__ = "0.1.0"

# A SIGTERM a worker got while it started (__main__), for cli._serve to drain at once
TERM_EARLY: list[int] = []
