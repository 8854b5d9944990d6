"""LRAgent KV-cache sharing for multi-LoRA agents, as an SGLang 0.5.17 plugin."""

__version__ = "0.1.0"


