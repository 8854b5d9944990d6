"""On the GPU machine: the schemes through the Flash-LoRA Triton backend against stock.

Writes a random-weight SmolLM2-shaped bf16 checkpoint and three shared-A role adapters,
then for each scheme starts our launcher and sends single-adapter and no-adapter greedy
requests (each prompt family read by one adapter only, so every scheme should agree with
non-shared up to bf16 kernel differences). Prints token agreement with non-shared.

    python3 scripts/device_scheme_check.py --tokenizer-from DIR --work DIR
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from lragent_sglang.adapters import make_role_adapters
from lragent_sglang.server_process import ServerProcess

sys.path.insert(0, str(Path(__file__).parent))
from make_random_llama import PRESETS, copy_tokenizer, write_checkpoint  # noqa: E402

FLAGS = ["--sampling-backend", "pytorch", "--grammar-backend", "none", "--lora-backend", "triton",
         "--max-loras-per-batch", "4", "--max-lora-rank", "8", "--mem-fraction-static", "0.5",
         "--disable-cuda-graph", "--skip-tokenizer-init"]


def families(seed: int = 0) -> dict[str, list[list[int]]]:
    """Per role a chain of prompts sharing a prefix; no two roles share a first token."""
    rng = random.Random(seed)
    out = {}
    for i, role in enumerate(["plan", "action", "none"]):
        head = [200 + i] + [rng.randrange(300, 30000) for _ in range(200)]
        out[role] = [head, head + [rng.randrange(300, 30000) for _ in range(100)]]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-from", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/scheme-check"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/scheme-check/result.json"))
    args = parser.parse_args()
    model = write_checkpoint(dict(PRESETS["smollm2-135m"]), args.work / "model")
    copy_tokenizer(args.tokenizer_from, model)
    adapters = make_role_adapters(model, args.work / "adapters", shared_v_a=True)
    lora = ["--enable-lora", "--lora-paths", *[f"{r}={p}" for r, p in adapters.items()]]
    prompts = families()
    outputs: dict[str, dict[str, list[list[int]]]] = {}
    for scheme in ("non-shared", "base-shared", "base-lr-shared"):
        with ServerProcess(["--model-path", str(model), *lora, *FLAGS, "--lragent-scheme", scheme],
                           log_path=args.work / f"{scheme}.log") as srv:
            outputs[scheme] = {}
            for role, chain in prompts.items():
                outputs[scheme][role] = []
                for ids in chain:
                    payload = {"input_ids": ids, "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}}
                    if role != "none":
                        payload["lora_path"] = role
                    outputs[scheme][role].append(srv.generate(**payload)["output_ids"])
    ref = outputs["non-shared"]
    report = {}
    for scheme, outs in outputs.items():
        same = total = 0
        for role in prompts:
            for a, b in zip(outs[role], ref[role]):
                same += sum(x == y for x, y in zip(a, b))
                total += len(b)
        report[scheme] = same / total
        print(f"{scheme:15s} token agreement with non-shared: {same}/{total} = {same / total:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"agreement": report, "outputs": outputs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
