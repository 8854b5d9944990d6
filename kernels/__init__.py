"""Flash-LoRA attention kernels in Triton behind FlashInfer-style plan()/run() wrappers.

``O = softmax(q K^T * scale) (V_base + L B)`` computed as ``P V_base + (P L) B`` without
materialising V; paged K / V_base / LR caches with token-granular indices (see wrappers).
"""

from .cascade import find_cascade_groups, flash_lora_cascade_decode
from .decode import DecodeConfig, flash_lora_decode
from .extend import ExtendConfig, flash_lora_extend
from .reference import decode_reference, extend_reference
from .wrappers import FlashLoRACascadeDecodeWrapper, FlashLoRADecodeWrapper, FlashLoRAExtendWrapper

__all__ = [
    "DecodeConfig",
    "ExtendConfig",
    "FlashLoRACascadeDecodeWrapper",
    "FlashLoRADecodeWrapper",
    "FlashLoRAExtendWrapper",
    "decode_reference",
    "extend_reference",
    "find_cascade_groups",
    "flash_lora_cascade_decode",
    "flash_lora_decode",
    "flash_lora_extend",
]
