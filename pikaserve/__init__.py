"""pikaserve: a compact, very fast OpenAI-compatible LLM inference server."""

__version__ = "0.1.0"
