"""Checkpoints that SGLang 0.5.17 refuses although it can serve them exactly."""

from __future__ import annotations

from typing import Any

from lragent_sglang.server.config import selected


def gemma2_hidden_act(layer: Any, layer_id: int, config: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook of `Gemma2DecoderLayer.__init__`: transformers 5 writes Gemma-2 configs
    with `hidden_activation` only, SGLang's Gemma-2 reads `hidden_act` (and requires both
    to be `gelu_pytorch_tanh`), so such a checkpoint did not load."""
    from sglang.srt.server_args import get_global_server_args

    if getattr(config, "hidden_act", None) is None and selected(get_global_server_args()):
        config.hidden_act = config.hidden_activation
