"""LowRouter proxy: an OpenAI-compatible LLM gateway with carbon accounting."""

__version__ = "0.1.0"
