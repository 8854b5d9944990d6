"""Entry point of the `sglang.srt.plugins` group (filled in below)."""


def register() -> None:
    """Register the LRAgent backends in this SGLang process."""
