"""Flash-LoRA attention kernels in Triton behind FlashInfer-style plan()/run() wrappers."""
