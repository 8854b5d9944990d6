"""On the GPU machine: start our launcher (LRAgent backends) and stock SGLang (triton) on
the same random-weight SmolLM2-shaped checkpoint with three role adapters, send the same
greedy requests to both, and print startup times and whether the outputs agree.

    python3 scripts/device_launcher_check.py --tokenizer-from DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lragent_sglang.adapters.make import make_role_adapters
from lragent_sglang.agents.server_process import ServerProcess

sys.path.insert(0, str(Path(__file__).parent))
from make_random_llama import PRESETS, copy_tokenizer, write_checkpoint  # noqa: E402

GPU_FLAGS = [
    "--sampling-backend", "pytorch", "--grammar-backend", "none", "--lora-backend", "triton",
    "--max-loras-per-batch", "4", "--max-lora-rank", "8", "--mem-fraction-static", "0.5",
]
PROMPTS = [[1, 520, 3111, 282, 4649, 314], [1, 27, 2013, 42, 1]]
ROLES = [None, "plan", "action", "reflect"]


def greedy(server: ServerProcess) -> dict[str, list[list[int]]]:
    out = {}
    for role in ROLES:
        payload = {"input_ids": PROMPTS,
                   "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}
        if role:
            payload["lora_path"] = [role] * len(PROMPTS)
        out[str(role)] = [r["output_ids"] for r in server.generate(**payload)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-from", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/launcher-check"))
    args = parser.parse_args()
    work = Path("/tmp/launcher-check-work")
    model = write_checkpoint(dict(PRESETS["smollm2-135m"]), work / "model")
    copy_tokenizer(args.tokenizer_from, model)
    adapters = make_role_adapters(model, work / "adapters")
    lora = ["--enable-lora", "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()]]
    runs = {
        "lragent": ("lragent_sglang.server.launch_server", ["--lragent-scheme", "base-lr-shared"]),
        "stock-triton": ("sglang.launch_server", ["--attention-backend", "triton"]),
    }
    results = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (module, extra) in runs.items():
        start = time.monotonic()
        srv = ServerProcess(["--model-path", str(model), *lora, *GPU_FLAGS, *extra],
                            module=module, log_path=args.out / f"{name}.log")
        with srv:
            ready = time.monotonic() - start
            outputs = greedy(srv)
        results[name] = {"ready_s": round(ready, 1), "outputs": outputs}
        print(f"{name}: {module} ready in {ready:.1f} s; plan -> {outputs['plan'][0][:8]}")
    same = results["lragent"]["outputs"] == results["stock-triton"]["outputs"]
    differ = len({json.dumps(v) for v in results["lragent"]["outputs"].values()}) == len(ROLES)
    results["identical_to_stock"] = same
    (args.out / "launcher_check.json").write_text(json.dumps(results, indent=2))
    print(f"greedy outputs identical to stock SGLang triton: {same}; roles differ: {differ}")
    return 0 if same and differ else 1


if __name__ == "__main__":
    sys.exit(main())
