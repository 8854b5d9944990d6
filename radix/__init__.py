"""The LRAgent prefix tree: token-keyed nodes holding shared base pages and per-adapter LR pages."""
