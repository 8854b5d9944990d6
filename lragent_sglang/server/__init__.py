"""What runs inside SGLang's processes: the plugin, its patch table, the backends behind
`--attention-backend lragent` / `--radix-cache-backend lragent`, the LoRA split, the LR
pool, statistics and metrics, the CPU compatibility layer and our launcher.

Nothing here imports the client side (`lragent_sglang.agents`), the adapter trainer or
PEFT: a scheduler process loads only what serving needs (tests/test_layout.py checks).
"""
