"""Adapter tooling: read and check PEFT LoRA adapters against a model (`io`, `check`,
light enough for the server to import), make random role adapters (`make`), train role
adapters with PEFT (`train`), the joint LR basis (`joint_basis`) and the
`lragent-adapters` command (`cli`; also `python -m lragent_sglang.adapters`).

This package's `__init__` imports nothing: `make` and `train` pull in PEFT and
transformers, which a serving process must not pay for.
"""
