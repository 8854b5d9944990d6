"""What KV sharing costs in output quality (`fidelity`; driven by scripts/eval_fidelity.py)."""
